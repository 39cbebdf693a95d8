"""The pico-decoder (model.py) and its Hugging Face checkpoint format (checkpoint.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import checkpoint
import data
import launcher
import model as pico
from model import KVCache, ModelConfig, PicoDecoder

# A few thousand parameters: every test here runs in well under a second on a CPU.
TINY = dict(d_model=64, n_layers=2, attention_n_heads=4, attention_n_kv_heads=2,
            activation_hidden_dim=160, vocab_size=101, max_seq_len=64)


def tiny_model(seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    return PicoDecoder(ModelConfig(**TINY)).eval()


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=generator)


def greedy_by_recomputing(model: PicoDecoder, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the full sequence goes through the model at each step."""
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(ids)
            ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


# ---------------------------------------------------------------------------------------------
# Forward and loss
# ---------------------------------------------------------------------------------------------

def test_forward_returns_logits_without_labels_and_a_scalar_loss_without_logits_with_them():
    ids = token_ids(3, 10)
    logits, loss = tiny_model()(ids)
    assert logits.shape == (3, 10, TINY["vocab_size"]) and loss is None
    logits, loss = tiny_model()(ids, labels=token_ids(3, 10, seed=2))
    assert logits is None and loss.shape == ()


def labels_with_ignored() -> torch.Tensor:
    labels = token_ids(2, 12, seed=2)
    labels[0, :5] = -100
    labels[1, 7] = -100
    return labels


def by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token's cross-entropy, with no shift (labels[b, t] is the token to predict at position
    t), 0 where the label is -100."""
    log_probs = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -log_probs * (labels != -100)


def test_loss_is_mean_cross_entropy_over_labels_that_are_not_minus_100():
    model, ids, labels = tiny_model(), token_ids(2, 12), labels_with_ignored()
    _, loss = model(ids, labels)
    assert (labels != -100).sum() == 24 - 6
    torch.testing.assert_close(loss, by_hand(model(ids)[0], labels).sum() / 18)


def test_each_tokens_loss_and_their_sum_are_those_of_the_logits():
    model, ids, labels = tiny_model(), token_ids(2, 12), labels_with_ignored()
    expected = by_hand(model(ids)[0], labels)
    _, each = model(ids, labels, reduction="none")
    _, total = model(ids, labels, reduction="sum")
    torch.testing.assert_close(each, expected)
    torch.testing.assert_close(total, expected.sum())


@pytest.mark.parametrize("chunk_tokens", [1, 5, 24])
def test_the_chunked_loss_and_its_gradients_are_those_of_the_whole_logits(monkeypatch, chunk_tokens):
    model, ids, labels = tiny_model().train(), token_ids(2, 12), labels_with_ignored()
    whole = by_hand(model(ids)[0], labels).sum() / (labels != -100).sum()
    (0.5 * whole).backward()  # the loss scaled, as a micro-batch's is in training
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(pico, "LOGITS_PER_CHUNK", chunk_tokens * TINY["vocab_size"])
    _, loss = model(ids, labels)
    (0.5 * loss).backward()
    torch.testing.assert_close(loss, whole)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_under_bf16_autocast_the_loss_is_float32_and_close_to_the_whole_logits():
    model, ids, labels = tiny_model().train(), token_ids(2, 12), labels_with_ignored()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(ids)
        _, loss = model(ids, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, by_hand(logits, labels).sum() / (labels != -100).sum())
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())


def test_decoding_the_residual_stream_is_the_forward_and_each_layers_output_is_handed_over():
    model, ids, labels = tiny_model(), token_ids(2, 12), labels_with_ignored()
    seen = []
    with torch.no_grad():
        x = model.residual_stream(ids, each=lambda i, out: seen.append((i, out)))
        assert torch.equal(model.decode(x)[0], model(ids)[0])
        assert torch.equal(model.decode(x, labels)[1], model(ids, labels)[1])
    assert [i for i, _ in seen] == list(range(TINY["n_layers"])) and seen[-1][1] is x
    assert all(out.shape == (2, 12, TINY["d_model"]) for _, out in seen)


def test_rms_norm_returns_its_inputs_dtype_and_float32_numbers_for_float32():
    norm = pico.RMSNorm(TINY["d_model"], 1e-6)
    x = torch.randn(3, TINY["d_model"])
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=0, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_forward_longer_than_max_seq_len_raises_value_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(token_ids(1, TINY["max_seq_len"] + 1))


# ---------------------------------------------------------------------------------------------
# Shape of the suite and module names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [("tiny", 11_282_784), ("small", 64_595_328),
                                            ("medium", 181_095_168), ("large", 569_808_384),
                                            ("xl", 1_166_139_648)])
def test_suite_sizes_have_pico_train_parameter_counts(size, expected):
    with torch.device("meta"):  # shapes only, no memory
        model = PicoDecoder(ModelConfig(**pico.SUITE[size]))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_params() == expected


def test_modules_have_the_names_learning_dynamics_and_pico_analyze_address():
    model = tiny_model()
    modules = dict(model.named_modules())
    assert isinstance(modules["embedding_proj"], nn.Embedding)
    for name in ("output_norm", "de_embedding_proj"):
        assert name in modules
    for i in range(TINY["n_layers"]):
        for suffix in ("attention_norm", "swiglu_norm"):
            assert f"layers.{i}.{suffix}" in modules
        for suffix in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                       "attention.o_proj", "swiglu.w_0", "swiglu.w_1", "swiglu.w_2"):
            assert isinstance(modules[f"layers.{i}.{suffix}"], nn.Linear)
    assert isinstance(modules["de_embedding_proj"], nn.Linear)


def test_state_dict_holds_exactly_the_weights_of_those_modules():
    # No biases and no RoPE tables: a checkpoint carries only the real weights.
    expected = {"embedding_proj.weight", "output_norm.weight", "de_embedding_proj.weight"}
    for i in range(TINY["n_layers"]):
        expected |= {f"layers.{i}.{suffix}.weight" for suffix in (
            "attention_norm", "swiglu_norm", "attention.q_proj", "attention.k_proj",
            "attention.v_proj", "attention.o_proj", "swiglu.w_0", "swiglu.w_1", "swiglu.w_2")}
    assert set(tiny_model().state_dict()) == expected


def test_linear_layers_have_no_bias():
    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * TINY["n_layers"] + 1
    assert all(m.bias is None for m in linears)


def test_input_and_output_embeddings_are_not_tied():
    model = tiny_model()
    assert model.embedding_proj.weight is not model.de_embedding_proj.weight
    assert model.embedding_proj.weight.data_ptr() != model.de_embedding_proj.weight.data_ptr()
    assert not torch.equal(model.embedding_proj.weight, model.de_embedding_proj.weight)


# ---------------------------------------------------------------------------------------------
# Attention: causality and RoPE
# ---------------------------------------------------------------------------------------------

def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny_model()
    ids = token_ids(2, 20)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        before, _ = model(ids)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :12], before[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 12:], before[:, 12:])


def test_rope_rotates_interleaved_pairs_as_meta_llama_does():
    model = PicoDecoder(ModelConfig(**{**TINY, "max_seq_len": 2048}))  # far positions too
    config = model.config
    T, H, D = config.max_seq_len, config.attention_n_heads, config.head_dim
    x = torch.randn(2, H, T, D, generator=torch.Generator().manual_seed(0))

    # Meta's LLaMA / pico-train: pairs (x[2i], x[2i+1]) as complex numbers, times e^(i t f_i).
    freqs = 1.0 / (config.position_emb_theta ** (torch.arange(0, D, 2).float() / D))
    angles = torch.outer(torch.arange(T).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [T, D/2]
    x_complex = torch.view_as_complex(x.reshape(2, H, T, D // 2, 2))
    expected = torch.view_as_real(x_complex * freqs_cis[None, None, :, :]).flatten(3)

    got = pico.apply_rope(x, model.rope_cos, model.rope_sin)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# KV-cache and generation
# ---------------------------------------------------------------------------------------------

def test_greedy_generate_with_cache_equals_recomputing_the_full_sequence():
    model = tiny_model()
    prompt = token_ids(2, 7)
    generated = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert generated.shape == (2, 27)
    assert torch.equal(generated[:, :7], prompt)
    assert torch.equal(generated, greedy_by_recomputing(model, prompt, 20))


def test_generate_from_a_one_token_prompt():
    model = tiny_model()
    prompt = token_ids(2, 1)
    generated = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(generated, greedy_by_recomputing(model, prompt, 12))


def test_prefill_then_one_token_decode_gives_the_full_forward_logits():
    model = tiny_model()
    ids = token_ids(2, 24)
    cache = KVCache(TINY["n_layers"])
    with torch.no_grad():
        full, _ = model(ids)
        steps = [model(ids[:, :9], kv_cache=cache)[0]]
        for t in range(9, 24):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache)[0])
    assert cache.seq_len == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_a_multi_token_chunk_after_a_cache_gives_the_full_forward_logits():
    model = tiny_model()
    ids = token_ids(2, 30)
    cache = KVCache(TINY["n_layers"])
    with torch.no_grad():
        full, _ = model(ids)
        chunks = [model(ids[:, a:b], kv_cache=cache)[0] for a, b in ((0, 10), (10, 25), (25, 30))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_generate_past_max_seq_len_raises_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(token_ids(1, 60), max_new_tokens=5, temperature=0)


def test_generate_may_fill_max_seq_len_exactly():
    generated = tiny_model().generate(token_ids(1, 60), max_new_tokens=4, temperature=0)
    assert generated.shape == (1, TINY["max_seq_len"])


# ---------------------------------------------------------------------------------------------
# Attention probabilities, for analysis
# ---------------------------------------------------------------------------------------------

def test_attention_probabilities_are_what_the_fused_kernel_attends_with():
    model = tiny_model()
    attention, cos, sin = model.layers[0].attention, model.rope_cos[:24], model.rope_sin[:24]
    x = torch.randn(2, 24, TINY["d_model"])
    probabilities = attention.probabilities(x, cos, sin)
    assert probabilities.shape == (2, TINY["attention_n_heads"], 24, 24)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, TINY["attention_n_heads"], 24))
    assert (probabilities.triu(1) == 0).all()  # causal: no weight on a later token
    _, _, v = attention.project(x, cos, sin)
    groups = TINY["attention_n_heads"] // TINY["attention_n_kv_heads"]  # query heads per KV head
    mixed = probabilities @ v.repeat_interleave(groups, dim=1)
    with torch.no_grad():
        expected = attention(x, cos, sin)  # SDPA, as training runs it
        got = attention.o_proj(mixed.transpose(1, 2).reshape(2, 24, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_with_attention_hands_over_every_layer_and_changes_no_logit():
    model, ids = tiny_model(), token_ids(2, 16)
    seen = {}
    with torch.no_grad():
        x = model.with_attention(ids, each=lambda i, p: seen.setdefault(i, p.shape))
        assert torch.equal(model.decode(x)[0], model(ids)[0])
    assert seen == {i: (2, TINY["attention_n_heads"], 16, 16) for i in range(TINY["n_layers"])}
    model(ids)  # the hooks are gone: nothing is handed over any more
    assert len(seen) == TINY["n_layers"] and not any(m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

def test_compiles_to_one_graph_with_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    model = tiny_model().train()
    ids, labels = token_ids(2, 16), token_ids(2, 16, seed=2)
    _, eager_loss = model(ids, labels)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # fullgraph=True fails on any graph break; aot_eager also traces the backward, without
    # needing a C++ compiler.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, loss = compiled(ids, labels)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=name)
    torch._dynamo.reset()


def loss_and_gradients(model: PicoDecoder, ids, labels, compiled: bool = False):
    _, loss = (torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model)(ids, labels)
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), gradients


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(compiled):
    torch._dynamo.reset()
    model = tiny_model().train()
    ids, labels = token_ids(2, 16), token_ids(2, 16, seed=2)
    loss, gradients = loss_and_gradients(model, ids, labels)
    model.checkpoint_blocks = True
    runs = []  # eager: a block runs again in the backward, which is the memory saved
    if not compiled:
        model.layers[0].register_forward_pre_hook(lambda *_: runs.append(1))
    recomputed_loss, recomputed = loss_and_gradients(model, ids, labels, compiled)
    assert torch.equal(recomputed_loss, loss)
    for name in gradients:
        torch.testing.assert_close(recomputed[name], gradients[name], rtol=0, atol=0, msg=name)
    assert len(runs) == (0 if compiled else 2)
    torch._dynamo.reset()


def test_activation_checkpointing_is_off_without_gradients():
    model = tiny_model()
    model.checkpoint_blocks = True
    with torch.no_grad():
        logits, _ = model(token_ids(1, 8))
    torch.testing.assert_close(logits, tiny_model()(token_ids(1, 8))[0].detach())


# ---------------------------------------------------------------------------------------------
# Checkpoints: the Hugging Face Llama export and loading back
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    """A tiny model and its Hugging Face export."""
    model = tiny_model()
    checkpoint.export_hf(model.state_dict(), model.config, tmp_path)
    return model, tmp_path


def test_export_config_names_llama_for_transformers(exported):
    _, directory = exported
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (directory / "model.safetensors").is_file()


def test_transformers_loads_the_export_with_the_same_logits(exported):
    transformers = pytest.importorskip("transformers")
    model, directory = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.dtype == torch.float32
    ids = token_ids(2, 40)
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_greedy_generation_agrees_with_transformers(exported):
    transformers = pytest.importorskip("transformers")
    model, directory = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    hf.generation_config.eos_token_id = None  # never stop early on Llama's default eos id 2
    prompt = token_ids(2, 8)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                         do_sample=False, pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=32, temperature=0)
    assert ours.shape == (2, 40)
    assert torch.equal(ours, theirs)


def test_from_pretrained_reads_the_export_back_exactly(exported):
    model, directory = exported
    loaded = PicoDecoder.from_pretrained(str(directory))
    assert loaded.config == model.config
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert set(reloaded) == set(original)
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), name


def test_from_pretrained_loads_a_pico_train_checkpoint(tmp_path):
    # pico-train's published format: its ModelConfig's fields, model_type "pico_decoder",
    # weights under "pico_decoder." with RoPE interleaved (no permutation).
    model = tiny_model()
    config = {**TINY, "norm_eps": 1e-6, "position_emb_theta": 10000.0, "batch_size": 1024,
              "model_type": "pico_decoder", "architectures": ["PicoDecoderHF"],
              "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"pico_decoder.{k}": v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = PicoDecoder.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_from_pretrained_rejects_an_unknown_model_type_naming_the_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(checkpoint.CheckpointError) as error:
        PicoDecoder.from_pretrained(str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value)
    assert "gpt2" in str(error.value)


# ---------------------------------------------------------------------------------------------
# ModelConfig.problems
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(pico.SUITE))
def test_suite_shapes_have_no_problems(size):
    assert ModelConfig(**pico.SUITE[size]).problems() == []


def test_d_model_not_divisible_by_heads_is_a_problem_naming_the_key():
    problems = ModelConfig(d_model=100, attention_n_heads=12, attention_n_kv_heads=4).problems()
    assert len(problems) == 1
    assert "model.d_model=100" in problems[0]
    assert "attention_n_heads" in problems[0]


def test_heads_not_divisible_by_kv_heads_is_a_problem_naming_the_key():
    problems = ModelConfig(attention_n_heads=12, attention_n_kv_heads=5).problems()
    assert len(problems) == 1
    assert "model.attention_n_heads=12" in problems[0]
    assert "attention_n_kv_heads=5" in problems[0]


def test_an_odd_head_dim_is_a_problem_naming_the_key():
    # RoPE rotates pairs, so each head needs an even number of dimensions.
    problems = ModelConfig(d_model=36, attention_n_heads=12, attention_n_kv_heads=4).problems()
    assert len(problems) == 1
    assert "model.d_model=36" in problems[0]


def test_every_problem_is_reported_at_once():
    problems = ModelConfig(d_model=100, attention_n_heads=12, attention_n_kv_heads=5).problems()
    assert len(problems) == 2


def test_sample_py_generates_text_from_a_byte_level_checkpoint(tmp_path):
    config = ModelConfig(d_model=32, n_layers=1, attention_n_heads=4, attention_n_kv_heads=2,
                         activation_hidden_dim=64, vocab_size=257, max_seq_len=64)
    torch.manual_seed(0)
    model = PicoDecoder(config)
    checkpoint.export_hf(model.state_dict(), config, tmp_path)
    result = launcher.run([sys.executable, "sample.py", str(tmp_path), "--prompt", "def ",
                           "--max-new-tokens", "12", "--temperature", "0"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                          check=True)
    expected = model.generate(torch.tensor([list(b"def ")]), 12, temperature=0)[0].tolist()
    assert result.stdout == data.byte_text(expected) + "\n"
