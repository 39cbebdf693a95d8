"""The training loop, end to end, through the same command line a user types."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import config as pico_config
import data
import launcher
import train

ROOT = Path(__file__).resolve().parent.parent
VOCAB, SEQ = 64, 32

TINY = """
data.dataset.name = {data!r}
data.dataloader.batch_size = 8
model.vocab_size = 64
model.max_seq_len = 32
model.d_model = 32
model.n_layers = 2
model.attention_n_heads = 4
model.attention_n_kv_heads = 2
model.activation_hidden_dim = 64
training.max_steps = 12
training.optimization.lr = 3e-3
training.optimization.lr_warmup_steps = 3
checkpointing.run_name = "run"
checkpointing.runs_dir = {runs!r}
checkpointing.save_every_n_steps = 4
evaluation.metrics = ["probe"]  # with probe.rows = 0: nothing measured
evaluation.probe.rows = 0
checkpointing.learning_dynamics.eval_data = None
monitoring.logging.log_every_n_steps = 1
data.tokenizer.name = None
"""


def run(config, *overrides, check=True):
    result = launcher.run([sys.executable, str(ROOT / "train.py"), str(config), *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def start(config, *overrides):
    return launcher.Popen([sys.executable, "-u", str(ROOT / "train.py"), str(config), *overrides],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")


def optimizer_state(step_dir: Path) -> dict:
    """A checkpoint's optimizer state as one plain dict: {"state": {parameter name: {...}}, ...}."""
    whole = step_dir.parent / f".{step_dir.name}-optimizer.pt"
    dcp_to_torch_save(step_dir / "optimizer", whole)
    try:
        return torch.load(whole, weights_only=True)["optimizer"]
    finally:
        whole.unlink()


def assert_same_run(a: Path, b: Path):
    assert losses(a) == losses(b)  # bit for bit: floats survive JSON exactly
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_writes_the_contracted_run_directory(tiny):
    config, runs = tiny
    run(config)
    run_dir = runs / "run"
    assert (run_dir / "training_config.yaml").is_file() and list((run_dir / "logs").iterdir())
    saved = yaml.safe_load((run_dir / "training_config.yaml").read_text())
    assert set(saved) == {"model", "data", "training", "checkpointing", "evaluation", "monitoring"}
    assert saved["model"]["d_model"] == 32 and saved["checkpointing"]["run_name"] == "run"
    assert sorted(losses(run_dir)) == list(range(1, 13))
    checkpoints = run_dir / "checkpoints"
    # every save_every_n_steps=4, at the end, and log-spaced early: 0, 1, 2, 4, ... (up to 512)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest", "step_0", "step_1", "step_12", "step_2", "step_4", "step_8"]
    assert os.readlink(checkpoints / "latest") == "step_12"
    for name in ("config.json", "model.safetensors", "optimizer/.metadata", "training_state.pt"):
        assert (checkpoints / "step_12" / name).is_file()


def test_rerunning_a_finished_run_does_nothing(tiny):
    config, runs = tiny
    run(config)
    before = (runs / "run" / "metrics.jsonl").read_text()
    assert "nothing to do" in run(config).stdout
    assert (runs / "run" / "metrics.jsonl").read_text() == before


def test_a_finished_run_that_stopped_while_evaluating_its_last_checkpoint_evaluates_it(tiny):
    config, runs = tiny
    probe = "--evaluation.probe.rows=8"  # an evaluation of each checkpoint
    run(config, probe)
    results = runs / "run" / "eval_results" / "step_12.json"
    evaluation = results.read_text()
    results.unlink()  # as if killed while evaluating it
    result = run(config, probe)
    assert "nothing to do" not in result.stdout and "done: 12 steps" in result.stdout
    assert results.read_text() == evaluation
    assert "nothing to do" in run(config, probe).stdout


def test_resume_after_sigterm_is_the_same_run(tiny, tmp_path):
    config, runs = tiny
    longer = ["--training.max_steps=60", "--data.dataloader.batch_size=32"]
    run(config, *longer, "--checkpointing.run_name=whole")
    proc = start(config, *longer)
    for line in proc.stdout:
        if "step 3/60" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    stopped = int(os.readlink(runs / "run" / "checkpoints" / "latest").split("_")[1])
    assert stopped < 60, "the run finished before the signal arrived"
    assert "SIGTERM: stopped at step" in output
    run(config, *longer)
    assert_same_run(runs / "whole", runs / "run")


def test_a_resume_under_another_schedule_says_which_keys_changed(tiny):
    config, _ = tiny
    run(config, "--training.max_steps=4")
    said = run(config, "--training.max_steps=8", "--training.optimization.lr=1e-3").stdout
    assert ("resumed with another schedule than the run's training_config.yaml, from step 4 on: "
            "training.max_steps (run: 4, now: 8); training.optimization.lr (run: 0.003, now: 0.001)") in said
    said = run(config, "--training.max_steps=12", "--training.optimization.lr=1e-3").stdout
    assert "from step 8 on: training.max_steps (run: 8, now: 12)\n" in said  # the lr is the run's now


def test_resume_after_kill_9_is_the_same_run(tiny):
    config, runs = tiny
    longer = ["--training.max_steps=60", "--data.dataloader.batch_size=32",
              "--checkpointing.save_every_n_steps=10"]
    run(config, *longer, "--checkpointing.run_name=whole")
    proc = start(config, *longer)
    for line in proc.stdout:
        if "saved" in line and "step_10" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert max(losses(runs / "run")) < 60, "the run finished before it was killed"
    run(config, *longer)
    assert_same_run(runs / "whole", runs / "run")


def test_a_temporary_checkpoint_left_by_a_crash_is_ignored(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=4")
    stray = runs / "run" / "checkpoints" / ".step_8.tmp"
    stray.mkdir()
    (stray / "optimizer.pt").write_bytes(b"half written")
    run(config, "--training.max_steps=8")
    assert os.readlink(runs / "run" / "checkpoints" / "latest") == "step_8"


SHARD = "optimizer/__0_0.distcp"  # the one process's part of the optimizer state


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, culprit", [
    (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:100]), SHARD),
    (lambda d: (d / "checkpoint.json").unlink(), "checkpoint.json"),
    (lambda d: (d / "training_state.pt").write_bytes(b"x" * (d / "training_state.pt").stat().st_size),
     "training_state.pt"),
    (lambda d: (d / "model.safetensors").write_bytes(b"y" * (d / "model.safetensors").stat().st_size),
     "model.safetensors"),
])
def test_a_damaged_checkpoint_is_named_and_nothing_is_touched(tiny, damage, culprit):
    config, runs = tiny
    run(config, "--training.max_steps=8")
    damage(runs / "run" / "checkpoints" / "step_8")
    before = snapshot(runs)
    result = run(config, "--training.max_steps=12", check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and culprit in result.stderr
    assert snapshot(runs) == before
    assert (runs / "run" / "checkpoints" / "step_4" / "checkpoint.json").is_file()


def test_resume_with_another_model_shape_is_refused(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=4")
    before = snapshot(runs)
    result = run(config, "--model.d_model=64", "--model.n_layers=3", check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "model.d_model" in result.stderr and "model.n_layers" in result.stderr
    assert snapshot(runs) == before


@pytest.mark.parametrize("overrides, culprit", [
    (["--model.d_modle=64"], "model.d_modle"),
    (["--modle.d_model=64"], "modle"),
    (["--training.max_steps=many"], "training.max_steps='many'"),
    (["--training.optimization.lr=fast"], "training.optimization.lr"),
    (["--model.d_model=30"], "model.d_model=30"),
    (["--model.attention_n_kv_heads=3"], "model.attention_n_heads=4"),
    (["--data.dataloader.batch_size=6", "--training.optimization.gradient_accumulation_steps=4"],
     "data.dataloader.batch_size=6"),
    (["--data.dataset.name=/no/such/directory"], "/no/such/directory"),
    (["--training.max_steps=100000"], "training.max_steps=100000"),
    (["--training.optimization.lr_scheduler=exponential"], "lr_scheduler"),
    (["training.max_steps=5"], "training.max_steps=5"),
    (["--monitoring.loss_spikes.window=1"], "monitoring.loss_spikes.window=1"),
])
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(tiny, overrides, culprit):
    config, runs = tiny
    result = run(config, *overrides, check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert culprit in result.stderr
    assert not runs.exists()


def test_a_misspelled_key_in_a_config_file_names_file_line_and_key(tiny, tmp_path):
    config, runs = tiny
    bad = tmp_path / "bad.py"
    bad.write_text(config.read_text() + "model.n_layer = 3\n")
    result = run(bad, check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "bad.py, line" in result.stderr and "model.n_layer" in result.stderr
    assert not runs.exists()


@pytest.mark.parametrize("problem, culprit", [
    ("no_column", "no column 'input_ids'"),
    ("row_length", "expected model.max_seq_len + 1 = 33"),
    ("token_id", "token id 64"),
])
def test_a_bad_shard_is_named_before_anything_is_written(tiny, tmp_path, problem, culprit):
    config, runs = tiny
    shards = tmp_path / "shards"
    shutil.rmtree(shards)
    rows = np.zeros((128, SEQ + 1 if problem != "row_length" else SEQ), dtype=np.int64)
    if problem == "token_id":
        rows[5, 7] = VOCAB
    data.write_shards(rows, shards)
    if problem == "no_column":
        path = next(shards.iterdir())
        data.pq.write_table(data.pa.table({"tokens": [[1, 2]]}), path)
    result = run(config, check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert culprit in result.stderr and ".parquet" in result.stderr
    assert not runs.exists()


def test_pico_train_yaml_is_accepted_and_fabric_is_ignored_with_a_warning(tiny, tmp_path):
    _, runs = tiny
    config = tmp_path / "demo.yaml"
    config.write_text(f"""
data:
  dataset: {{name: {tmp_path / 'shards'}}}
  dataloader: {{batch_size: 8}}
model: {{d_model: 32, n_layers: 1, attention_n_heads: 4, attention_n_kv_heads: 2,
         activation_hidden_dim: 64, vocab_size: 64, max_seq_len: 32}}
training:
  max_steps: 2
  fabric: {{num_devices: 1, precision: bf16-mixed}}
  optimization: {{lr: 0.001, lr_warmup_steps: 1, gradient_accumulation_steps: 2}}
checkpointing: {{run_name: yaml-run, runs_dir: {runs}, learning_dynamics: {{eval_data: null}}}}
evaluation: {{metrics: []}}
""")
    result = run(config)
    assert "training.fabric ignored" in result.stderr
    saved = yaml.safe_load((runs / "yaml-run" / "training_config.yaml").read_text())
    assert saved["training"]["optimization"]["gradient_accumulation_steps"] == 2


def test_overrides_parse_python_literals_and_fall_back_to_strings(tiny):
    config, _ = tiny
    cfg = pico_config.load_config(str(config), ["--training.optimization.max_grad_norm=0.5",
                                          "--checkpointing.run_name=123",
                                          "--evaluation.metrics=['paloma']",
                                          "--checkpointing.learning_dynamics.layer_suffixes=['swiglu.w_2']",
                                          "--training.optimization.lr=1"])
    assert cfg.training.optimization.max_grad_norm == 0.5
    assert cfg.checkpointing.run_name == "123"
    assert cfg.evaluation.metrics == ["paloma"]
    assert cfg.checkpointing.learning_dynamics.layer_suffixes == ["swiglu.w_2"]
    assert cfg.training.optimization.lr == 1.0 and isinstance(cfg.training.optimization.lr, float)


@pytest.mark.parametrize("text, value", [("false", False), ("FALSE", False), ("True", True), ("true", True)])
def test_booleans_are_spelt_as_yaml_or_python_in_any_case(tiny, text, value):
    config, _ = tiny
    cfg = pico_config.load_config(str(config), [f"--monitoring.logging.layer_stats={text}"])
    assert cfg.monitoring.logging.layer_stats is value


def test_a_boolean_key_refuses_any_other_word_naming_the_key(tiny):
    config, _ = tiny
    with pytest.raises(pico_config.ConfigError, match="monitoring.logging.layer_stats='nope': expected "
                                                      "true or false"):
        pico_config.load_config(str(config), ["--monitoring.logging.layer_stats=nope"])
    names = pico_config.load_config(str(config), ["--checkpointing.run_name=false"]).checkpointing.run_name
    assert names == "false"  # a string key keeps the word


def test_resume_compares_the_models_tensors_not_every_model_field(tmp_path):
    saved = pico_config.Config()
    saved.model.d_model, saved.model.norm_eps = 96, 1e-6
    (tmp_path / "training_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(saved)))
    same_tensors = pico_config.Config()
    same_tensors.model.d_model, same_tensors.model.norm_eps = 96, 1e-5  # as a lower lr would: allowed
    pico_config.check_resume_compatible(same_tensors, tmp_path / "training_config.yaml")
    wider = pico_config.Config()
    wider.model.d_model, wider.model.norm_eps = 192, 1e-5
    with pytest.raises(pico_config.ConfigError) as refused:
        pico_config.check_resume_compatible(wider, tmp_path / "training_config.yaml")
    assert "model.d_model (run: 96, new config: 192)" in str(refused.value)
    longer = pico_config.Config()  # no weight changes shape, but the RoPE tables and the rows do
    longer.model.d_model, longer.model.max_seq_len = 96, 4096
    with pytest.raises(pico_config.ConfigError, match="model.max_seq_len"):
        pico_config.check_resume_compatible(longer, tmp_path / "training_config.yaml")


def test_schedule_is_pico_trains_linear_warmup_then_linear_decay_to_zero():
    cfg = pico_config.Config()
    cfg.training.max_steps, cfg.training.optimization.lr_warmup_steps = 100, 10
    f = train.lr_lambda(cfg)
    assert [f(0), f(5), f(10), f(55), f(100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cfg.training.optimization.lr_scheduler = "cosine_with_warmup"
    f = train.lr_lambda(cfg)
    assert f(10) == 1.0 and abs(f(55) - 0.5) < 1e-12 and f(100) == 0.0


def test_loss_falls_on_the_embedded_corpus(tmp_path):
    # configs/local.py, narrowed so the test takes seconds
    run(ROOT / "configs" / "local.py", "--training.max_steps=40", "--data.dataloader.batch_size=8",
        "--model.d_model=64", "--model.n_layers=2", "--model.activation_hidden_dim=256",
        "--checkpointing.log_spaced_until=0", "--evaluation.metrics=[]",
        f"--checkpointing.runs_dir={tmp_path}", "--monitoring.logging.log_every_n_steps=5")
    curve = losses(tmp_path / "local")
    assert curve[5] > 4.0  # about ln(257) = 5.55 at the start: nothing learned yet
    assert curve[40] < curve[5] - 1.5, curve


def test_without_wandb_installed_the_run_says_so_once_and_goes_on(tiny):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    config, runs = tiny
    result = run(config, "--training.max_steps=2", "--monitoring.save_to_wandb=True")
    assert result.stdout.count("wandb is not installed") == 1
    assert sorted(losses(runs / "run")) == [1, 2]
