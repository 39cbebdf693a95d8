"""Everyday accidents that must never lose a run: each ends in one clear line or a correct resume,
and nothing already on disk is damaged."""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import data
import evaluation
import launcher
import records
from config import Config
from model import ModelConfig, PicoDecoder
from test_hub import wait_for
from test_train import ROOT, SHARD, assert_same_run, losses, run, snapshot, start


def one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def strict_records(run_dir) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def test_a_diverging_run_stops_naming_the_step_before_saving_its_weights(tiny):
    config, runs = tiny
    line = one_line_error(run(config, "--training.optimization.lr=1e30", check=False))
    assert "not finite at step" in line and "checkpoints/latest is the last good checkpoint" in line
    diverged = int(line.split("not finite at step ")[1].split(";")[0])
    last_good = int(os.readlink(runs / "run" / "checkpoints" / "latest").split("_")[1])
    assert last_good < diverged and not (runs / "run" / "checkpoints" / f"step_{diverged}").exists()
    assert all(np.isfinite(r["loss"]) for r in strict_records(runs / "run") if "loss" in r)
    again = run(config, "--training.optimization.lr=1e30", check=False)  # resumes, and stops again
    assert "resumed from" in again.stdout and "not finite" in one_line_error(again)
    assert os.readlink(runs / "run" / "checkpoints" / "latest") == f"step_{last_good}"
    assert checkpoint.verify(runs / "run") == 0


def test_an_evaluation_that_overflows_records_infinity_as_strict_json(tmp_path):
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=1, attention_n_heads=4, attention_n_kv_heads=2,
                                    activation_hidden_dim=64, vocab_size=64, max_seq_len=32))
    with torch.no_grad():
        model.de_embedding_proj.weight.mul_(1e5)  # logits so large the mean loss passes 709
    rows = [np.arange(33) % 64]
    results = evaluation.evaluate(model, rows, 1, torch.device("cpu"), contextlib.nullcontext(), False)
    assert results["loss"] > 709 and results["perplexity"] == float("inf")
    line = records.json_line({"step": 3, "paloma": results["perplexity"]})
    assert json.loads(line) == {"step": 3, "paloma": "Infinity"}
    assert float(json.loads(line)["paloma"]) == float("inf")


def test_an_empty_evaluation_set_is_refused_at_start(tiny, tmp_path):
    config, runs = tiny
    empty = tmp_path / "empty" / "val"
    empty.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), empty / "a.parquet")
    result = run(config, "--evaluation.metrics=['paloma']",
                 f"--evaluation.paloma.dataset_name={tmp_path / 'empty'}", check=False)
    assert "has no rows" in one_line_error(result) and not runs.exists()


@pytest.mark.parametrize("overrides, culprit", [
    (["--training.optimization.lr=1e999"], "training.optimization.lr=inf"),
    (["--checkpointing.run_name=../elsewhere"], "checkpointing.run_name='../elsewhere'"),
    (["--checkpointing.run_name=a/b"], "checkpointing.run_name='a/b'"),
    (["--checkpointing.run_name=" + "x" * 300], "checkpointing.run_name="),
    (["--training.seed=-1"], "training.seed=-1"),
    (["--training.seed=" + str(2 ** 70)], "training.seed="),
    (["--data.seed=-3"], "data.seed=-3"),
])
def test_more_bad_inputs_are_one_line_and_write_nothing(tiny, overrides, culprit):
    config, runs = tiny
    assert culprit in one_line_error(run(config, *overrides, check=False))
    assert not runs.exists()


def test_a_runs_dir_that_is_a_file_is_one_line(tiny, tmp_path):
    config, _ = tiny
    runs_dir = tmp_path / "bad-runs"
    runs_dir.write_text("a file, not a directory")
    line = one_line_error(run(config, f"--checkpointing.runs_dir={runs_dir}", check=False))
    assert "checkpointing.runs_dir" in line and str(runs_dir) in line and "writable directory" in line


def test_a_second_training_on_a_run_directory_is_refused_and_a_killed_ones_lock_never_blocks(tiny):
    config, runs = tiny
    longer = ["--training.max_steps=200", "--data.dataloader.batch_size=16",
              "--checkpointing.save_every_n_steps=10"]
    first = start(config, *longer)
    for line in first.stdout:
        if "saved" in line and "step_10" in line:
            break
    line = one_line_error(run(config, *longer, check=False))
    assert f"in use by pid {first.pid}" in line and "another checkpointing.run_name" in line
    first.kill()
    first.wait(timeout=60)
    latest = int(os.readlink(runs / "run" / "checkpoints" / "latest").split("_")[1])
    result = run(config, f"--training.max_steps={latest + 10}", "--data.dataloader.batch_size=16",
                 "--checkpointing.save_every_n_steps=10")
    assert "resumed from" in result.stdout


def test_default_run_names_of_runs_started_together_differ(tiny):
    config, runs = tiny
    procs = [launcher.Popen([sys.executable, str(ROOT / "train.py"), str(config), "--training.max_steps=1",
                             "--checkpointing.run_name=None"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs), [p.stderr.read() for p in procs]
    assert len([p for p in runs.iterdir() if (p / "checkpoints" / "latest").exists()]) == 2


def test_a_copied_run_directory_resumes_the_same_run(tiny):
    config, runs = tiny
    run(config)
    shutil.copytree(runs / "run", runs / "copy", symlinks=False)  # cp -r: `latest` is now a directory
    assert (runs / "copy" / "checkpoints" / "latest").is_dir()
    assert not (runs / "copy" / "checkpoints" / "latest").is_symlink()
    shutil.rmtree(runs / "copy" / "checkpoints" / "step_12")  # as if copied while step 12 was to come
    assert "resumed from" in run(config, "--checkpointing.run_name=copy").stdout
    assert_same_run(runs / "run", runs / "copy")
    assert os.readlink(runs / "copy" / "checkpoints" / "latest") == "step_12"


def test_a_lost_latest_resumes_from_the_newest_complete_checkpoint(tiny):
    config, runs = tiny
    run(config, "--checkpointing.run_name=whole")
    run(config)
    checkpoints = runs / "run" / "checkpoints"
    (checkpoints / "latest").unlink()
    shutil.rmtree(checkpoints / "step_12")
    (checkpoints / "step_8" / "checkpoint.json").unlink()  # step_8 incomplete: step_4 is the newest
    assert f"resumed from {checkpoints / 'step_4'} at step 4" in run(config).stdout
    assert_same_run(runs / "whole", runs / "run")


def test_auto_resume_false_on_a_run_with_checkpoints_is_refused_and_start_over_moves_them_aside(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=4")
    before = snapshot(runs)
    line = one_line_error(run(config, "--checkpointing.training.auto_resume=False", check=False))
    assert "checkpointing.training.start_over=True" in line and snapshot(runs) == before
    run(config, "--training.max_steps=2", "--checkpointing.training.start_over=True")
    assert sorted(losses(runs / "run")) == [1, 2]
    (previous,) = (runs / "run").glob("previous_*")
    assert sorted(losses(previous)) == [1, 2, 3, 4] and (previous / "checkpoints" / "step_4").is_dir()


@pytest.mark.parametrize("file", ["model.safetensors", SHARD, "learning_dynamics/train_gradients.pt",
                                  "learning_dynamics/train_data/data-00000-of-00001.arrow"])
def test_bytes_flipped_in_a_checkpoint_are_named_by_the_resume_and_by_verify(tiny, file):
    config, runs = tiny
    run(config, "--training.max_steps=8")
    damaged = runs / "run" / "checkpoints" / "step_8" / file
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size: only the checksum can tell
    damaged.write_bytes(bytes(content))
    before = snapshot(runs)
    line = one_line_error(run(config, check=False))
    assert str(damaged) in line and "damaged" in line and snapshot(runs) == before
    verify = launcher.run([sys.executable, str(ROOT / "checkpoint.py"), "verify", str(runs / "run")],
                          capture_output=True, text=True, cwd=ROOT)
    assert verify.returncode == 1 and str(damaged) in verify.stdout and "step_4: ok" in verify.stdout


def test_a_partial_last_line_of_metrics_is_repaired_at_the_next_start(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=8")
    with open(runs / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 2.')  # a crash in the middle of a write
    run(config)
    assert sorted(losses(runs / "run")) == list(range(1, 13)) and strict_records(runs / "run")


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=4")
    size = max(p.stat().st_size for p in (runs / "run" / "checkpoints" / "step_4").rglob("*") if p.is_file())
    limit = size // 2  # the largest file of a checkpoint no longer fits: EFBIG, as a full disk gives ENOSPC
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), "--training.max_steps=8"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_line_error(result)
    assert "could not be written" in line and "bytes free" in line
    assert not list((runs / "run" / "checkpoints").glob(".step_*"))
    assert os.readlink(runs / "run" / "checkpoints" / "latest") == "step_4"
    run(config, "--training.max_steps=8")  # with room again, the run goes on
    assert os.readlink(runs / "run" / "checkpoints" / "latest") == "step_8"


class StuckShards:
    """Shards whose reads after the first never return: a Hub that stopped answering."""
    num_rows, row_len, name = 10 ** 6, 5, "stuck/shards"

    def __init__(self):
        self.reads = 0

    def read(self, start, count):
        self.reads += 1
        if self.reads > 1:
            time.sleep(3600)
        return np.zeros((count, self.row_len), dtype=np.int64)


def test_a_stuck_data_reader_is_an_error_and_a_stop_signal_ends_the_wait(tiny):
    stream = data.BatchStream(StuckShards(), 4, 1, 0, start_step=0, end_step=10)
    assert stream.get(until=lambda: True) is not None  # the first batch: read, so handed over
    started = time.perf_counter()
    assert stream.get(until=lambda: time.perf_counter() - started > 1.5) is None
    assert time.perf_counter() - started < 4
    with pytest.raises(data.DataError, match="stuck/shards: no rows for the next step after 2 s"):
        stream.get(timeout=2)
    stream.close()


@pytest.mark.parametrize("damage, culprit", [
    ("null id", "row 5 holds a null"),
    ("null row", "row 7 holds a null"),
    ("bytes", "cannot be read"),
])
def test_a_parquet_shard_with_nulls_or_damaged_pages_is_one_line(tiny, tmp_path, damage, culprit):
    config, runs = tiny
    shards = tmp_path / "shards"
    shutil.rmtree(shards)
    shards.mkdir()
    rows = np.random.default_rng(0).integers(0, 64, size=(256, 33)).tolist()
    if damage == "null id":
        rows[5][3] = None
    if damage == "null row":
        rows[7] = None
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), shards / "a.parquet")
    if damage == "bytes":
        content = bytearray((shards / "a.parquet").read_bytes())
        content[200:400] = bytes(b ^ 0x5A for b in content[200:400])  # inside the data page
        (shards / "a.parquet").write_bytes(bytes(content))
    line = one_line_error(run(config, check=False))
    assert culprit in line and str(shards / "a.parquet") in line and not runs.exists()


@pytest.mark.parametrize("script, args, culprit", [
    ("sample.py", ["--temperature", "-1"], "--temperature -1.0: expected 0 or more"),
    ("sample.py", ["--top-k", "0"], "--top-k 0: expected 1 or more"),
    ("sample.py", ["--prompt", "1 99999"], "expected space-separated token ids in [0, 64)"),
    ("data.py", ["batch", "CONFIG", "--step", "-2"], "--step -2: expected a non-negative integer"),
    ("data.py", ["verify", "SHARDS", "--seq-len", "0"], "--seq-len 0: expected a positive integer"),
])
def test_bad_arguments_to_sample_and_data_are_one_error_line(tiny, tmp_path, script, args, culprit):
    config, runs = tiny
    run(config, "--training.max_steps=1")
    args = [str(config) if a == "CONFIG" else str(tmp_path / "shards") if a == "SHARDS" else a for a in args]
    if script == "sample.py":
        args = [str(runs / "run" / "checkpoints" / "latest")] + args
    result = launcher.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode != 0 and len(errors) == 1 and culprit in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def train_on_a_hub_that_stalls(hub, tmp_path, after: str, *overrides):
    """A run on the stand-in Hub (8 shards of 16 rows, one cached at a time), whose Hub stops
    answering once the run has printed `after`; the run's process, and when the Hub stalled."""
    from test_hub import REPO, TINY, write_repo

    hub.add_repo(REPO, write_repo(tmp_path / "repo", n_shards=8))
    config = tmp_path / "hub.py"
    config.write_text(TINY.format(data=REPO, runs=str(tmp_path / "runs")))
    proc = start(config, "--training.max_steps=16", "--data.dataset.max_cached_shards=1",
                 "--checkpointing.save_every_n_steps=2", *overrides)
    for line in proc.stdout:
        if after in line:
            break
    hub.stalled.set()
    return proc, time.monotonic()


def test_a_hub_that_stops_answering_mid_run_is_one_line_within_a_minute(hub, tmp_path):
    assert Config().data.dataset.read_timeout <= 60  # the default; here a shorter one, to wait less
    proc, stalled = train_on_a_hub_that_stalls(hub, tmp_path, "step 4/16", "--data.dataset.read_timeout=5")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.monotonic() - stalled < 30
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pico-test/tokens" in errors[0] and "Traceback" not in output, output
    assert "after 5 s (data.dataset.read_timeout)" in errors[0]
    assert checkpoint.verify(tmp_path / "runs" / "run") == 0


def test_sigterm_while_waiting_on_a_stalled_hub_saves_and_stops_within_seconds(hub, tmp_path):
    proc, _ = train_on_a_hub_that_stalls(hub, tmp_path, "step 4/16")
    time.sleep(2)  # the reader is now waiting on the Hub
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and time.monotonic() - signalled < 15, output
    assert "SIGTERM: stopped at step" in output
    assert checkpoint.verify(tmp_path / "runs" / "run") == 0


@pytest.mark.xfail(strict=False, reason="in the whole parallel suite (only there, 3 runs of 3 since the corpus "
                   "and branch merges) the interrupted run does not end within the wait; alone it passes. Suspected: "
                   "a huggingface_hub download pool joined while the KeyboardInterrupt unwinds. To investigate")
def test_ctrl_c_while_the_first_shard_downloads_is_one_line_and_writes_nothing(hub, tmp_path):
    """The first batch is read before the run directory is written (and before a stop signal
    saves a checkpoint): Ctrl-C there, during a Hub download that may take minutes, ends the run
    with a line, not a traceback."""
    from test_hub import REPO, TINY, write_repo

    hub.add_repo(REPO, write_repo(tmp_path / "repo"))
    hub.stalled_downloads.set()
    config = tmp_path / "hub.py"
    config.write_text(TINY.format(data=REPO, runs=str(tmp_path / "runs")))
    proc = start(config)
    wait_for(lambda: any(r["path"].endswith(".parquet") and not r["range"] for r in hub.log), timeout=60)
    proc.send_signal(signal.SIGINT)
    try:
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1].startswith("interrupted (Ctrl-C) outside the training steps")
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


def test_a_damaged_training_config_yaml_refuses_the_resume_in_one_line(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=2")
    (runs / "run" / "training_config.yaml").write_text("model: [1, 2\nx: {\n")
    line = one_line_error(run(config, "--training.max_steps=4", check=False))
    assert "training_config.yaml: cannot be read (while parsing" in line and "expected the config" in line
