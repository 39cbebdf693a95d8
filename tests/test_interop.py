"""Hugging Face interop: PicoDecoder.from_pretrained reads transformers' Llama checkpoints (whole
or sharded), pico-train's published format and our export, from a directory or a Hub repo and
revision; what the decoder cannot express is refused in one line naming the field or tensor; and
train.py starts a run from any of them (checkpointing.training.init_from)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import data
import train
from hub_server import point_huggingface_hub_at
from model import ModelConfig, PicoDecoder
from test_train import losses, run

# A transformers Llama with grouped-query attention and a theta and eps that are not the defaults,
# so a field read wrongly shows. initializer_range 0.5: logits far apart, so greedy decoding
# never hangs on a near-tie that float rounding could break either way.
LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=500.0, initializer_range=0.5)
# LLAMA's shape as our ModelConfig.
TINY = dict(d_model=64, n_layers=2, attention_n_heads=4, attention_n_kv_heads=2,
            activation_hidden_dim=160, vocab_size=101, max_seq_len=64, norm_eps=1e-5,
            position_emb_theta=500.0)


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, LLAMA["vocab_size"], (batch, length), generator=generator)


def save_llama(directory, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A randomly initialised transformers LlamaForCausalLM, saved with save_pretrained (in
    shards of at most max_shard_size, if given)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()
    hf.generation_config.eos_token_id = None  # never stop early on Llama's default eos id 2
    hf.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return hf


def save_pico_train(model: PicoDecoder, directory):
    """pico-train's published format, written by hand: its ModelConfig's fields (batch_size
    too), model_type "pico_decoder", weights under "pico_decoder.", RoPE interleaved."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**dataclasses.asdict(model.config), "batch_size": 1024, "model_type": "pico_decoder",
              "architectures": ["PicoDecoderHF"], "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({f"pico_decoder.{k}": v.contiguous() for k, v in model.state_dict().items()},
              directory / "model.safetensors", metadata={"format": "pt"})


def save_export(model: PicoDecoder, directory):
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.export_hf(model.state_dict(), model.config, directory)


def pico(seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    return PicoDecoder(ModelConfig(**TINY)).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def refusal(path_or_repo_id, **kwargs) -> str:
    """The one-line message from_pretrained refuses with."""
    with pytest.raises(checkpoint.CheckpointError) as error:
        PicoDecoder.from_pretrained(str(path_or_repo_id), **kwargs)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    return message


# ---------------------------------------------------------------------------------------------
# transformers' LlamaForCausalLM -> PicoDecoder
# ---------------------------------------------------------------------------------------------

def test_a_transformers_llama_loads_with_the_same_logits(tmp_path):
    hf = save_llama(tmp_path)
    ours = PicoDecoder.from_pretrained(str(tmp_path))
    assert ours.config == ModelConfig(**TINY)
    ids = token_ids(2, 40)
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-4


def test_greedy_generation_of_a_loaded_llama_agrees_with_transformers_for_32_tokens(tmp_path):
    hf = save_llama(tmp_path)
    ours = PicoDecoder.from_pretrained(str(tmp_path))
    prompt = token_ids(2, 8)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                         do_sample=False, pad_token_id=0)
    generated = ours.generate(prompt, max_new_tokens=32, temperature=0)
    assert generated.shape == (2, 40)
    assert torch.equal(generated, theirs)


def test_a_sharded_llama_checkpoint_loads_with_the_same_logits(tmp_path):
    hf = save_llama(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = PicoDecoder.from_pretrained(str(tmp_path))
    ids = token_ids(2, 40)
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-4


def test_a_llama_with_tied_embeddings_loads_as_equal_untied_weights(tmp_path):
    # save_pretrained writes no lm_head tensor for a tied model: the embedding is copied into
    # de_embedding_proj, which computes exactly what the tied model does.
    hf = save_llama(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    ours = PicoDecoder.from_pretrained(str(tmp_path))
    assert torch.equal(ours.de_embedding_proj.weight, ours.embedding_proj.weight)
    assert ours.de_embedding_proj.weight.data_ptr() != ours.embedding_proj.weight.data_ptr()
    ids = token_ids(2, 40)
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-4


def test_our_export_of_a_loaded_llama_is_the_same_model_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = save_llama(tmp_path / "llama")
    save_export(PicoDecoder.from_pretrained(str(tmp_path / "llama")), tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = token_ids(2, 40)
    assert (logits(again, ids) - logits(hf, ids)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# pico-train's published format
# ---------------------------------------------------------------------------------------------

def test_a_pico_train_checkpoint_gives_identical_logits(tmp_path):
    model = pico()
    save_pico_train(model, tmp_path)
    loaded = PicoDecoder.from_pretrained(str(tmp_path))
    ids = token_ids(2, 40)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize("field, value, culprit", [
    ("norm_eps", "delete", "field norm_eps is missing"),
    ("d_model", "64", 'd_model="64": expected an integer'),
    ("attention_n_kv_heads", 3, "attention_n_heads=4: expected a multiple of attention_n_kv_heads=3"),
])
def test_a_pico_train_config_field_missing_or_wrong_is_named(tmp_path, field, value, culprit):
    save_pico_train(pico(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if value == "delete":
        del config[field]
    else:
        config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = refusal(tmp_path)
    assert culprit in message and str(tmp_path / "config.json") in message


def test_a_pico_train_tensor_missing_is_named_with_its_file(tmp_path):
    save_pico_train(pico(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["pico_decoder.output_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    message = refusal(tmp_path)
    assert "pico_decoder.output_norm.weight is missing" in message
    assert str(tmp_path / "model.safetensors") in message


# ---------------------------------------------------------------------------------------------
# What the decoder cannot express, and damaged checkpoints: one line naming the field or tensor
# ---------------------------------------------------------------------------------------------

def edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, culprit", [
    ("attention_bias", True, "attention_bias=true"),
    ("mlp_bias", True, "mlp_bias=true"),
    ("hidden_act", "gelu", 'hidden_act="gelu"'),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0},
     'rope_parameters.rope_type="llama3"'),
    ("head_dim", 32, "head_dim=32"),
    ("num_key_value_heads", 3, "num_attention_heads=4: expected a multiple of num_key_value_heads=3"),
    ("hidden_size", None, "hidden_size=null: expected an integer"),
])
def test_a_llama_the_decoder_cannot_express_is_refused_naming_the_field(tmp_path, field, value,
                                                                        culprit):
    save_export(pico(), tmp_path)
    edit_config(tmp_path, **{field: value})
    message = refusal(tmp_path)
    assert culprit in message and str(tmp_path / "config.json") in message


def test_a_missing_config_field_is_named(tmp_path):
    save_export(pico(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "field intermediate_size is missing" in refusal(tmp_path)


def test_an_unknown_format_is_refused_naming_the_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    message = refusal(tmp_path)
    assert "model_type='gpt2'" in message and str(tmp_path / "config.json") in message


def test_a_directory_without_config_json_is_refused_naming_it(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    message = refusal(tmp_path)
    assert str(tmp_path) in message and "config.json" in message


def test_a_checkpoint_without_safetensors_weights_is_refused_naming_the_directory(tmp_path):
    save_export(pico(), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    message = refusal(tmp_path)
    assert str(tmp_path) in message and "model.safetensors" in message


def rewrite_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_a_missing_tensor_is_named_with_its_file(tmp_path):
    save_export(pico(), tmp_path)
    rewrite_tensors(tmp_path / "model.safetensors",
                    lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = refusal(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight is missing" in message
    assert str(tmp_path / "model.safetensors") in message


def test_a_wrongly_shaped_tensor_is_named_with_its_file(tmp_path):
    save_export(pico(), tmp_path)
    rewrite_tensors(tmp_path / "model.safetensors",
                    lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    message = refusal(tmp_path)
    assert "model.norm.weight has shape [32], expected [64]" in message
    assert str(tmp_path / "model.safetensors") in message


def test_a_weight_the_decoder_has_no_place_for_is_named(tmp_path):
    save_export(pico(), tmp_path)
    rewrite_tensors(tmp_path / "model.safetensors",
                    lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    assert "model.layers.0.self_attn.q_proj.bias" in refusal(tmp_path)


def test_a_tensor_missing_from_a_shard_is_named_with_that_shard(tmp_path):
    save_llama(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    rewrite_tensors(shard, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    message = refusal(tmp_path)
    assert "model.layers.0.self_attn.k_proj.weight is missing" in message and str(shard) in message


# ---------------------------------------------------------------------------------------------
# From a Hub model repo and revision (tests/hub_server.py stands in for the Hub)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pico-train", "export", "transformers"])
def test_each_format_loads_from_a_hub_repo_by_id(hub, tmp_path, fmt):
    source = tmp_path / "repo"
    if fmt == "transformers":
        reference = save_llama(source)
    else:
        reference = pico()
        (save_pico_train if fmt == "pico-train" else save_export)(reference, source)
    hub.add_repo("pico-lm/pico-decoder-test", source, repo_type="model")
    loaded = PicoDecoder.from_pretrained("pico-lm/pico-decoder-test")
    ids = token_ids(2, 40)
    assert (logits(loaded, ids) - logits(reference, ids)).abs().max() <= 1e-4
    assert hub.requests_for("model.safetensors")


def test_a_hub_revision_loads_the_weights_of_that_branch(hub, tmp_path):
    # pico-train publishes each step as a revision: main holds the latest, a branch per step.
    latest, early = pico(seed=0), pico(seed=1)
    save_pico_train(latest, tmp_path / "latest")
    save_pico_train(early, tmp_path / "step_1000")
    hub.add_repo("pico-lm/pico-decoder-test", tmp_path / "latest", repo_type="model")
    hub.add_repo("pico-lm/pico-decoder-test", tmp_path / "step_1000", branch="step-1000",
                 repo_type="model")
    ids = token_ids(1, 20)
    by_keyword = PicoDecoder.from_pretrained("pico-lm/pico-decoder-test", revision="step-1000")
    by_suffix = PicoDecoder.from_pretrained("pico-lm/pico-decoder-test@step-1000")
    main = PicoDecoder.from_pretrained("pico-lm/pico-decoder-test")
    assert torch.equal(logits(by_keyword, ids), logits(early, ids))
    assert torch.equal(logits(by_suffix, ids), logits(early, ids))
    assert torch.equal(logits(main, ids), logits(latest, ids))


def test_a_downloaded_revision_loads_offline_from_the_cache(hub, tmp_path, monkeypatch):
    model = pico()
    save_export(model, tmp_path / "repo")
    hub.add_repo("pico-lm/pico-decoder-test", tmp_path / "repo", repo_type="model")
    PicoDecoder.from_pretrained("pico-lm/pico-decoder-test")
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    hub.stop()
    loaded = PicoDecoder.from_pretrained("pico-lm/pico-decoder-test")
    ids = token_ids(1, 20)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_an_unknown_hub_repo_is_one_line_naming_it_and_never_the_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    message = refusal("pico-lm/no-such-model")
    assert "pico-lm/no-such-model" in message and "hf_secret" not in message


def test_an_unknown_revision_is_one_line_naming_repo_and_revision(hub, tmp_path):
    save_export(pico(), tmp_path)
    hub.add_repo("pico-lm/pico-decoder-test", tmp_path, repo_type="model")
    message = refusal("pico-lm/pico-decoder-test", revision="step-999")
    assert "pico-lm/pico-decoder-test" in message and "'step-999'" in message


def test_offline_with_nothing_cached_is_one_line_naming_the_repo(hub, tmp_path, monkeypatch):
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "empty-cache", offline=True)
    message = refusal("pico-lm/pico-decoder-test@step-1000")
    assert "pico-lm/pico-decoder-test@step-1000" in message and "HF_HUB_OFFLINE=1" in message


def test_no_network_and_nothing_cached_is_one_line_naming_the_repo(hub):
    hub.stop()  # nothing listens at the endpoint any more
    message = refusal("pico-lm/pico-decoder-test")
    assert "pico-lm/pico-decoder-test" in message and hub.endpoint in message


def test_a_path_that_is_neither_a_directory_nor_a_repo_id_is_named(tmp_path):
    message = refusal(tmp_path / "no" / "such" / "checkpoint")
    assert str(tmp_path / "no" / "such" / "checkpoint") in message


# ---------------------------------------------------------------------------------------------
# train.py: checkpointing.training.init_from
# ---------------------------------------------------------------------------------------------

# The shape of test_train.py's tiny config.
TRAIN_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                   rms_norm_eps=1e-6, rope_theta=10000.0)


def test_training_starts_from_the_weights_of_init_from(tiny, tmp_path):
    config, runs = tiny
    hf = save_llama(tmp_path / "llama", **TRAIN_LLAMA)
    result = run(config, "--training.max_steps=1",
                 f"--checkpointing.training.init_from={tmp_path / 'llama'}")
    assert f"initial weights from {tmp_path / 'llama'}" in result.stdout
    # Step 1's loss is that of the starting weights on the first batch (rows 0-7 of the data,
    # before the optimizer step): computed here by transformers itself.
    rows = torch.from_numpy(data.open_dataset(str(tmp_path / "shards"), 33, 64).read(0, 8)).long()
    with torch.no_grad():
        expected = hf(rows, labels=rows).loss.item()
    assert abs(losses(runs / "run")[1] - expected) < 1e-5


def test_init_from_with_another_shape_is_refused_naming_the_keys_and_writes_nothing(tiny, tmp_path):
    config, runs = tiny
    save_export(pico(), tmp_path / "export")
    # In this process (a ConfigError is what `python train.py` prints as its one line of error).
    with pytest.raises(train.ConfigError) as error:
        train.main([str(config), f"--checkpointing.training.init_from={tmp_path / 'export'}"])
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "checkpointing.training.init_from" in message
    assert "model.d_model (checkpoint: 64, config: 32)" in message and "model.vocab_size" in message
    assert not runs.exists()


def test_a_resumed_run_ignores_init_from(tiny, tmp_path):
    config, runs = tiny
    assert train.main([str(config), "--training.max_steps=1"]) == 0
    save_export(pico(), tmp_path / "export")  # another shape: used, it would be refused
    assert train.main([str(config), "--training.max_steps=2",
                       f"--checkpointing.training.init_from={tmp_path / 'export'}"]) == 0
    log = "".join(path.read_text() for path in (runs / "run" / "logs").iterdir())
    assert "resumed from" in log and "checkpointing.training.init_from ignored" in log
    assert sorted(losses(runs / "run")) == [1, 2]
