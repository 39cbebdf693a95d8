"""Learning-dynamics captures in every checkpoint, read the way pico-analyze reads them."""

import contextlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import yaml

import checkpoint
import data
import launcher
from model import ModelConfig, PicoDecoder
from test_evaluation import write_eval_set
from test_train import ROOT, TINY, losses, optimizer_state, run

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("learning_dynamics")

SUFFIXES = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory):
    """A tiny run with train and val captures, and the same run with none."""
    tmp = tmp_path_factory.mktemp("ld")
    rows = np.random.default_rng(0).integers(0, 64, size=(1024, 33))
    data.write_shards(rows, tmp / "shards")
    val = write_eval_set(tmp / "val", [33, 20, 33, 9, 33])
    config = tmp / "tiny.py"
    config.write_text(TINY.format(data=str(tmp / "shards"), runs=str(tmp / "runs")))
    common = ["--training.max_steps=4", "--checkpointing.learning_dynamics.batch_size=3"]
    run(config, *common, f"--checkpointing.learning_dynamics.eval_data={tmp / 'val'}")
    run(config, *common, "--checkpointing.run_name=none",
        "--checkpointing.learning_dynamics.capture_train=False")
    return config, tmp / "runs" / "run", tmp / "runs" / "none", val


def load(run_dir, step, name):
    return torch.load(run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics" / name,
                      weights_only=True)


def test_every_checkpoint_holds_the_contracted_files_keys_and_shapes(captured_run):
    _, run_dir, _, val = captured_run
    for step in (0, 1, 2, 4):
        for split, n_samples in (("train", 8), ("val", len(val))):
            acts, weights, grads = (load(run_dir, step, f"{split}_{kind}.pt")
                                    for kind in ("activations", "weights", "gradients"))
            expected = {f"layers.{i}.{s}" for i in range(2) for s in SUFFIXES}
            assert set(acts) == set(weights) == set(grads) == expected
            for key in expected:
                out_features, in_features = weights[key].shape
                assert acts[key].shape == (n_samples, out_features)
                assert grads[key].shape == (out_features, in_features)
                assert all(t.dtype == torch.float32 and t.device.type == "cpu"
                           for t in (acts[key], weights[key], grads[key]))


def test_eval_rows_captures_on_the_first_rows_of_the_evaluation_set(captured_run):
    config, run_dir, _, val = captured_run
    run(config, "--training.max_steps=4", "--checkpointing.learning_dynamics.batch_size=3", "--checkpointing.run_name=two",
        f"--checkpointing.learning_dynamics.eval_data={run_dir.parent.parent / 'val'}",
        "--checkpointing.learning_dynamics.eval_rows=2")
    for step in (0, 4):
        first, all_rows = (load(directory, step, "val_activations.pt") for directory in (run_dir.parent / "two", run_dir))
        for key in all_rows:
            torch.testing.assert_close(first[key], all_rows[key][:2])


def test_train_data_holds_the_rows_of_the_batch_each_checkpoint_captured_on(captured_run):
    datasets = pytest.importorskip("datasets")
    config, run_dir, none_dir, _ = captured_run
    for step in (0, 1, 2, 4):  # step_N: the batch of step N - 1, the last it trained on; step_0: the first
        out = config.parent / f"batch_{step}.npy"
        launcher.run([sys.executable, "data.py", "batch", str(config), "--step", str(max(step - 1, 0)),
                      "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
        saved = datasets.load_from_disk(run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics"
                                        / "train_data")
        assert saved.column_names == ["input_ids"]
        np.testing.assert_array_equal(np.array(saved["input_ids"]), np.load(out))
    assert not list(none_dir.glob("checkpoints/step_*/learning_dynamics/train_data"))


def test_the_rows_directory_is_the_one_datasets_save_to_disk_writes(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = np.random.default_rng(0).integers(0, 50304, size=(1003, 9))  # two of datasets' batches
    checkpoint.write_rows_dataset(rows, tmp_path / "ours")
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(tmp_path / "theirs")
    names = {p.name for p in (tmp_path / "theirs").iterdir()}
    assert {p.name for p in (tmp_path / "ours").iterdir()} == names
    for name in ("state.json", "dataset_info.json"):  # the same fields; datasets 4+ writes List
        ours, theirs = (json.loads((tmp_path / d / name).read_text()) for d in ("ours", "theirs"))
        assert ours.keys() == theirs.keys()
    ours, theirs = (datasets.load_from_disk(tmp_path / d) for d in ("ours", "theirs"))
    assert ours.features == theirs.features  # int32 ids, as datasets stores a column named input_ids
    assert ours["input_ids"][:] == theirs["input_ids"][:] == rows.tolist()


def direct(model, rows, key, sequence_idx=-1):
    """The activations of one module at each row's last input token, and the gradient of the
    mean next-token loss over all rows, computed plainly, one row at a time."""
    module = model.get_submodule(key)
    outputs = []
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o[0, sequence_idx]))
    model.zero_grad()
    total = sum(len(r) - 1 for r in rows)
    for r in rows:
        r = torch.as_tensor(r)
        _, loss = model(r[None, :-1], r[None, 1:])
        (loss * (len(r) - 1) / total).backward()
    handle.remove()
    return torch.stack(outputs).detach(), module.weight.grad


def test_captures_equal_a_direct_computation_with_the_checkpoints_weights(captured_run):
    config, run_dir, _, val = captured_run
    step = 4  # captured after 4 optimizer steps, on the batch the 4th step trained on (index 3)
    train_rows = data.open_dataset(str(run_dir.parent.parent / "shards"), 33, 64).read(3 * 8, 8)
    model = PicoDecoder.from_pretrained(str(run_dir / "checkpoints" / f"step_{step}"))
    for split, rows in (("train", list(train_rows)), ("val", val)):
        acts, grads = load(run_dir, step, f"{split}_activations.pt"), load(run_dir, step, f"{split}_gradients.pt")
        for key in ("layers.0.attention.v_proj", "layers.1.swiglu.w_2"):
            expected_acts, expected_grad = direct(model, rows, key)
            torch.testing.assert_close(acts[key], expected_acts, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grads[key], expected_grad, rtol=1e-4, atol=1e-6)
        weights = load(run_dir, step, f"{split}_weights.pt")
        assert torch.equal(weights["layers.1.attention.o_proj"], model.get_submodule("layers.1.attention.o_proj").weight)


def test_step_0_is_the_initialisation_captured_on_the_first_batch(captured_run):
    _, run_dir, _, _ = captured_run
    first = data.open_dataset(str(run_dir.parent.parent / "shards"), 33, 64).read(0, 8)
    model = PicoDecoder.from_pretrained(str(run_dir / "checkpoints" / "step_0"))
    expected, _ = direct(model, list(first), "layers.0.attention.o_proj")
    torch.testing.assert_close(load(run_dir, 0, "train_activations.pt")["layers.0.attention.o_proj"],
                               expected, rtol=1e-4, atol=1e-5)


def section(**fields) -> types.SimpleNamespace:
    """A checkpointing.learning_dynamics config section: the defaults, no train captures."""
    defaults = dict(layer_suffixes=SUFFIXES, layers=None, sequence_idx=-1, batch_size=8, capture_train=False)
    return types.SimpleNamespace(**{**defaults, **fields})


def test_the_sub_batch_size_does_not_change_the_captures():
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=2, attention_n_heads=4, attention_n_kv_heads=2,
                                    activation_hidden_dim=64, vocab_size=64, max_seq_len=32))
    rows = [np.random.default_rng(i).integers(0, 64, n) for i, n in enumerate([33, 5, 20, 33, 12])]
    modules = checkpoint.capture_modules(model, SUFFIXES, None)
    cpu, plain = torch.device("cpu"), contextlib.nullcontext()
    one, all_at_once = (checkpoint.learning_dynamics(model, None, rows, section(batch_size=size), cpu,
                                                     plain)["val"]
                        for size in (1, 5))
    for kind in ("activations", "gradients"):
        for key in modules:
            torch.testing.assert_close(one[kind][key], all_at_once[kind][key], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the training run's gradients untouched


def test_captures_leave_the_training_run_bit_identical(captured_run):
    _, run_dir, none_dir, _ = captured_run
    assert not (none_dir / "checkpoints" / "step_4" / "learning_dynamics").exists()
    assert losses(run_dir) == losses(none_dir)
    with_, without = (checkpoint.load_file(d / "checkpoints" / "step_4" / "model.safetensors")
                      for d in (run_dir, none_dir))
    assert all(torch.equal(with_[k], without[k]) for k in with_)
    opt_with, opt_without = (optimizer_state(d / "checkpoints" / "step_4") for d in (run_dir, none_dir))
    for name, state in opt_with["state"].items():
        assert all(torch.equal(v, opt_without["state"][name][k]) for k, v in state.items())


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two activation matrices [n_samples, features] (Kornblith et al. 2019), as
    pico-analyze's cka metric computes it (feature-space form)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_pico_analyze_reads_the_run_computes_cka_and_the_ov_circuit(captured_run):
    _, run_dir, _, _ = captured_run
    # pico-analyze: training_config.yaml, then torch.load of each step's files.
    training_config = yaml.safe_load(open(run_dir / "training_config.yaml"))
    d_model = training_config["model"]["d_model"]
    n_heads = training_config["model"]["attention_n_heads"]
    n_kv_heads = training_config["model"]["attention_n_kv_heads"]
    assert training_config["checkpointing"]["run_name"] == "run"
    states = {step: {kind: load(run_dir, step, f"val_{kind}.pt") for kind in ("activations", "weights")}
              for step in (2, 4)}
    prefix = os.path.commonprefix(list(states[4]["activations"]))
    assert prefix == "layers."
    head_dim = d_model // n_heads
    for layer in range(2):
        a2 = states[2]["activations"][f"{prefix}{layer}.swiglu.w_2"].numpy()
        a4 = states[4]["activations"][f"{prefix}{layer}.swiglu.w_2"].numpy()
        assert abs(linear_cka(a4, a4) - 1) < 1e-5
        assert 0 < linear_cka(a2, a4) <= 1 + 1e-6
        # pico-analyze's ov_circuit component: per head, W_V of its KV head, then W_O of the head.
        w_v = states[4]["weights"][f"{prefix}{layer}.attention.v_proj"]
        w_o = states[4]["weights"][f"{prefix}{layer}.attention.o_proj"]
        v_act = states[4]["activations"][f"{prefix}{layer}.attention.v_proj"]
        assert w_v.shape == (n_kv_heads * head_dim, d_model) and w_o.shape == (d_model, n_heads * head_dim)
        group = n_heads // n_kv_heads
        ov_acts = []
        for head in range(n_heads):
            kv = head // group  # the KV head this query head reads, as the decoder's GQA does
            ov_weights = w_v[kv * head_dim:(kv + 1) * head_dim] @ w_o[:, head * head_dim:(head + 1) * head_dim]
            assert ov_weights.shape == (head_dim, head_dim)
            ov_acts.append(v_act[:, kv * head_dim:(kv + 1) * head_dim]
                           @ w_o[:, head * head_dim:(head + 1) * head_dim].T)
            assert ov_acts[-1].shape == (v_act.shape[0], d_model)
        # Summed over heads, the OV activations are o_proj applied to each head's value vector:
        # the value activations as the model's grouped-query attention repeats them.
        repeated = v_act.view(-1, n_kv_heads, head_dim).repeat_interleave(group, dim=1).flatten(1)
        torch.testing.assert_close(sum(ov_acts), repeated @ w_o.T, rtol=1e-4, atol=1e-5)


def test_keeping_the_last_optimizer_states_only_leaves_every_checkpoint_complete(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=8", "--checkpointing.keep_last_n_optimizer_states=2")
    checkpoints = runs / "run" / "checkpoints"
    with_optimizer = sorted(int(p.parent.name[5:]) for p in checkpoints.glob("step_*/optimizer"))
    assert with_optimizer == [4, 8]
    for step_dir in checkpoints.glob("step_*"):
        checkpoint.check_complete(step_dir)
        assert (step_dir / "model.safetensors").is_file() and (step_dir / "learning_dynamics").is_dir()
    run(config, "--training.max_steps=12", "--checkpointing.keep_last_n_optimizer_states=2")
    assert sorted(int(p.parent.name[5:]) for p in checkpoints.glob("step_*/optimizer")) == [8, 12]


def test_a_layer_suffix_that_matches_no_module_is_named_with_the_valid_ones(tiny):
    config, runs = tiny
    result = run(config, "--checkpointing.learning_dynamics.layer_suffixes=['attention.x_proj']", check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "'attention.x_proj' matches no module" in result.stderr and "swiglu.w_2" in result.stderr
    assert not runs.exists()


@pytest.mark.slow
def test_captures_work_with_torch_compile(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=2", "--training.compile=True")
    acts = load(runs / "run", 2, "train_activations.pt")
    assert set(acts) == {f"layers.{i}.{s}" for i in range(2) for s in SUFFIXES}
