"""Training in several processes (torchrun, two CPU processes over gloo) is training in one.

Every run here is the command a user types: `torchrun --standalone --nproc_per_node=2 train.py`
against `python train.py`, on the same tiny model and data, compared through what they write.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import config as pico_config
import data
import launcher
import train
from test_evaluation import eval_args, write_eval_set
from test_probe import PROBE
from test_tasks import BYTES, CHOICE, PAIRS, task_args, write_task
from test_train import ROOT, SEQ, TINY, VOCAB, final_weights, losses, optimizer_state, run, snapshot

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("distributed")

STEPS = 6
# Global batch 8 = 2 processes x 2 micro-steps x 2 rows: accumulation under DDP and FSDP too.
TWO = ["--training.optimization.gradient_accumulation_steps=2"]
COMMON = [f"--training.max_steps={STEPS}", "--checkpointing.learning_dynamics.batch_size=3"]


def torchrun(config, *overrides, nproc=2, check=True, timeout=300):
    # OMP_NUM_THREADS: torchrun would set 1 and say so in a warning; the same, silently.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(ROOT / "train.py"), str(config), *overrides],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps, with evaluation and train and val captures: in one process, in two
    DDP processes and in two FSDP processes. Returns {name: run directory} and the config."""
    tmp = tmp_path_factory.mktemp("dist")
    data.write_shards(np.random.default_rng(0).integers(0, VOCAB, size=(1024, SEQ + 1)), tmp / "shards")
    # 7 evaluation rows of unequal lengths: the two ranks get 3 and 4 of them.
    write_eval_set(tmp / "val" / "val", [33, 20, 33, 2, 17, 33, 9])
    # 5 minimal pairs and 4 questions: the ranks get 2 and 3, 2 and 2 of them
    tasks = task_args(write_task(tmp / "blimp", PAIRS), write_task(tmp / "quiz", CHOICE))[1:]
    config = tmp / "tiny.py"
    config.write_text(TINY.format(data=str(tmp / "shards"), runs=str(tmp / "runs")))
    common = [*COMMON, *eval_args(tmp / "val"), f"--checkpointing.learning_dynamics.eval_data={tmp / 'val'}",
              *PROBE, "--evaluation.probe.rows=11",  # split 5 and 6 over the ranks
              *BYTES, *tasks,
              "--evaluation.metrics=['paloma', 'probe', 'induction', 'attention', 'tasks']", "--evaluation.induction.sequences=5",
              "--evaluation.induction.batch_size=2", "--evaluation.attention.rows=3",
              "--monitoring.loss_spikes.std_devs=0.01", "--monitoring.loss_spikes.window=2"]  # most rises
    run(config, *common, "--checkpointing.run_name=one")
    torchrun(config, *common, *TWO, "--checkpointing.run_name=ddp")
    torchrun(config, *common, *TWO, "--checkpointing.run_name=fsdp", "--training.distributed=fsdp")
    return {name: tmp / "runs" / name for name in ("one", "ddp", "fsdp")}, config, common


def assert_same_losses(a: Path, b: Path, steps=range(1, STEPS + 1)):
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(steps)
    for step in steps:
        assert abs(la[step] - lb[step]) <= 1e-5 * abs(la[step]), (step, la[step], lb[step])


def assert_same_weights(a: Path, b: Path):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_and_weights_of_one(runs, strategy):
    dirs, _, _ = runs
    assert_same_losses(dirs["one"], dirs[strategy])
    assert_same_weights(dirs["one"], dirs[strategy])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_record_each_evaluation_rows_loss_as_one_does(runs, strategy):
    dirs, _, _ = runs
    for step in (0, 1, 2, 4, 6):
        one, two = (np.load(dirs[name] / "eval_results" / f"step_{step}_rows.npy")
                    for name in ("one", strategy))
        assert one["tokens"].tolist() == two["tokens"].tolist() == [32, 19, 32, 1, 16, 32, 8]  # data order
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_record_the_behaviour_measurements_of_one(runs, strategy):
    dirs, _, _ = runs
    for step in (0, 4, 6):
        one, two = (json.loads((dirs[name] / "eval_results" / f"step_{step}.json").read_text())
                    for name in ("one", strategy))
        np.testing.assert_allclose(two["paloma_loss_by_position"], one["paloma_loss_by_position"], rtol=1e-5)
        assert math.isclose(two["paloma_icl"]["score"], one["paloma_icl"]["score"], rel_tol=1e-4, abs_tol=1e-6)
        for name in ("induction", "attention"):  # sequences split 2 and 3, rows 1 and 2 over the ranks
            a, b = (np.load(dirs[d] / "eval_results" / f"step_{step}_{name}.npy") for d in ("one", strategy))
            assert a.dtype == b.dtype and a["head"].tolist() == b["head"].tolist()
            np.testing.assert_allclose(b[a.dtype.names[-1]], a[a.dtype.names[-1]], rtol=1e-4)
        assert math.isclose(two["induction"]["loss_second_half"], one["induction"]["loss_second_half"],
                            rel_tol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_record_the_task_scores_of_one(runs, strategy):
    dirs, _, _ = runs
    for step in (0, 4, 6):
        one, two = (json.loads((dirs[name] / "eval_results" / f"step_{step}.json").read_text())["tasks"]
                    for name in ("one", strategy))
        assert one.keys() == two.keys() == {"blimp", "quiz"}
        for task in one:
            assert one[task]["items"] == two[task]["items"] and one[task]["groups"] == two[task]["groups"]
        with np.load(dirs["one"] / "eval_results" / f"step_{step}_tasks.npz") as a, \
                np.load(dirs[strategy] / "eval_results" / f"step_{step}_tasks.npz") as b:
            for task in ("blimp", "quiz"):
                assert a[task].dtype == b[task].dtype and a[task]["item"].tolist() == b[task]["item"].tolist()
                assert a[task]["correct"].tolist() == b[task]["correct"].tolist()
                np.testing.assert_allclose(b[task]["margin"], a[task]["margin"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_record_the_per_layer_statistics_of_one(runs, strategy):
    dirs, _, _ = runs
    one, two = ([r for r in map(json.loads, (dirs[name] / "metrics.jsonl").read_text().splitlines())
                 if "loss" in r] for name in ("one", strategy))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        stats = [key for key in a if "/" in key]
        # embedding, 2 blocks, output: 3 statistics each
        assert len(stats) == 3 * 4 and stats == [key for key in b if "/" in key]
        for key in stats:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-7), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_record_the_probe_and_the_loss_spikes_of_one(runs, strategy):
    dirs, _, _ = runs
    for step in (0, 1, 2, 4, 6):
        one, two = (np.load(dirs[name] / "eval_results" / f"step_{step}_probe.npy")
                    for name in ("one", strategy))
        for field in ("position", "seen_at", "tokens", "token_match", "exact_match"):
            assert one[field].tolist() == two[field].tolist(), (step, field)
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    spikes = sorted(p.name for p in (dirs["one"] / "spikes").iterdir())
    assert spikes and spikes == sorted(p.name for p in (dirs[strategy] / "spikes").iterdir())
    for name in spikes:
        one, two = (json.loads((dirs[d] / "spikes" / name / "spike.json").read_text())
                    for d in ("one", strategy))
        assert one["positions"] == two["positions"] and math.isclose(one["loss"], two["loss"], rel_tol=1e-5)
        for kind in ("activations", "gradients"):
            a, b = (torch.load(dirs[d] / "spikes" / name / "learning_dynamics" / f"train_{kind}.pt",
                               weights_only=True) for d in ("one", strategy))
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_under_two_processes_gives_the_run_of_one(runs, strategy):
    dirs, config, common = runs
    torchrun(config, *common, *TWO, f"--checkpointing.run_name={strategy}-ac",
             f"--training.distributed={strategy}", "--training.activation_checkpointing=True")
    assert_same_losses(dirs["one"], dirs["one"].parent / f"{strategy}-ac")
    assert_same_weights(dirs["one"], dirs["one"].parent / f"{strategy}-ac")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_write_the_learning_dynamics_of_one(runs, strategy):
    dirs, _, _ = runs
    steps = [0, 1, 2, 4, 6]
    for step in steps:
        ld_one, ld_two = (dirs[name] / "checkpoints" / f"step_{step}" / "learning_dynamics"
                          for name in ("one", strategy))
        assert sorted(p.name for p in ld_two.iterdir()) == sorted(p.name for p in ld_one.iterdir())
        # The global batch's rows, each rank's gathered in rank order: data order, the same bytes.
        rows_one, rows_two = ({p.name: p.read_bytes() for p in (d / "train_data").iterdir()}
                              for d in (ld_one, ld_two))
        assert len(rows_one) == 3 and rows_one == rows_two
        for path in ld_one.glob("*.pt"):
            one, two = (torch.load(d / path.name, weights_only=True) for d in (ld_one, ld_two))
            assert one.keys() == two.keys()
            for key in one:  # activations in data order: the ranks' rows gathered in rank order
                assert one[key].shape == two[key].shape, (step, path.name, key)
                torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_split_across_ranks_gives_the_perplexity_of_one_process(runs, strategy):
    dirs, _, _ = runs
    for path in (dirs["one"] / "eval_results").glob("*.json"):
        one = json.loads(path.read_text())["paloma"]
        two = json.loads((dirs[strategy] / "eval_results" / path.name).read_text())["paloma"]
        assert two == pytest.approx(one, rel=1e-5)


def only_rank_0_writes(run_dir: Path):
    """One log per start, one record per step: nothing written twice by two ranks."""
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == sorted(set(steps))
    return len(list((run_dir / "logs").iterdir()))


def test_only_rank_0_writes_the_shared_files(runs):
    dirs, _, _ = runs
    assert only_rank_0_writes(dirs["ddp"]) == 1
    # FSDP: each rank wrote its shard of the optimizer state, and the manifest lists both.
    manifest = json.loads((dirs["fsdp"] / "checkpoints" / "latest" / "checkpoint.json").read_text())
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= set(manifest["files"])


def resume_at_step_4(source: Path, name: str) -> Path:
    """A copy of a finished run as it stood after its checkpoint at step 4, as if stopped there."""
    target = source.parent / name
    shutil.copytree(source, target, symlinks=True)
    shutil.rmtree(target / "checkpoints" / "step_6")
    os.replace(target / "checkpoints" / "latest", target / "checkpoints" / "old-latest")
    (target / "checkpoints" / "latest").symlink_to("step_4")
    (target / "checkpoints" / "old-latest").unlink()
    return target


def test_a_two_process_fsdp_checkpoint_resumes_in_one_process(runs):
    dirs, config, common = runs
    resumed = resume_at_step_4(dirs["fsdp"], "fsdp-to-one")
    result = run(config, *common, "--checkpointing.run_name=fsdp-to-one")
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert_same_losses(dirs["one"], resumed)
    assert_same_weights(dirs["one"], resumed)
    one, two = (optimizer_state(d / "checkpoints" / "step_6") for d in (dirs["one"], resumed))
    for name, state in one["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(two["state"][name][key], value, rtol=1e-4, atol=1e-6)


def test_a_one_process_checkpoint_resumes_in_two_processes(runs):
    dirs, config, common = runs
    resumed = resume_at_step_4(dirs["one"], "one-to-fsdp")
    torchrun(config, *common, *TWO, "--checkpointing.run_name=one-to-fsdp", "--training.distributed=fsdp")
    assert_same_losses(dirs["one"], resumed)
    assert_same_weights(dirs["one"], resumed)


@pytest.mark.slow
def test_a_two_process_ddp_checkpoint_resumes_in_two_fsdp_processes(runs):
    dirs, config, common = runs
    resumed = resume_at_step_4(dirs["ddp"], "ddp-to-fsdp")
    torchrun(config, *common, "--checkpointing.run_name=ddp-to-fsdp", "--training.distributed=fsdp")
    assert_same_losses(dirs["one"], resumed)
    assert_same_weights(dirs["one"], resumed)


def test_a_failure_on_one_rank_ends_the_job_with_its_message(tmp_path):
    # Row groups of 4 rows: at global batch 8, rank 0 reads group 2s and rank 1 group 2s + 1 at
    # step s. A token id out of range in group 5 fails rank 1 alone, at step 2, mid-training.
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(256, SEQ + 1))
    rows[5 * 4 + 1, 7] = VOCAB
    (tmp_path / "shards").mkdir()
    offsets = pa.array(np.arange(0, rows.size + 1, SEQ + 1, dtype=np.int32))
    pq.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))}),
                   tmp_path / "shards" / "00000-of-00001.parquet", row_group_size=4)
    config = tmp_path / "tiny.py"
    config.write_text(TINY.format(data=str(tmp_path / "shards"), runs=str(tmp_path / "runs")))
    started = time.monotonic()
    result = torchrun(config, check=False, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines and lines[0].startswith("error: rank 1: ") and f"token id {VOCAB}" in lines[0], result.stderr[-3000:]
    assert "step 2/" in result.stdout and "step 3/" not in result.stdout
    assert os.readlink(tmp_path / "runs" / "run" / "checkpoints" / "latest") == "step_2"


def test_a_world_size_that_does_not_divide_the_batch_is_one_line(tiny):
    config, runs = tiny
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    result = launcher.run([sys.executable, str(ROOT / "train.py"), str(config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=env)
    assert result.returncode != 0 and not runs.exists()
    assert result.stderr.strip().splitlines() == [
        "error: data.dataloader.batch_size=8: expected a positive multiple of world size x "
        "training.optimization.gradient_accumulation_steps = 3 x 1 = 3"]


def test_fsdp_on_a_torch_without_fully_shard_is_refused(monkeypatch):
    monkeypatch.setattr(train, "fully_shard", None)
    config = pico_config.Config()
    config.training.distributed = "fsdp"
    with pytest.raises(pico_config.ConfigError, match=r"^training.distributed='fsdp': expected 'ddp': torch "
                                                      r"\S+ has no fully_shard"):
        train.setup(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: NCCL is valid")
def test_nccl_on_a_machine_without_cuda_is_one_line(tiny):
    config, runs = tiny
    result = run(config, "--training.backend=nccl", check=False)
    assert result.returncode != 0 and not runs.exists()
    assert result.stderr.strip().splitlines() == [
        "error: training.backend='nccl': expected 'gloo' or 'auto': NCCL needs CUDA GPUs, and this "
        "machine has none"]


def test_a_checkpoint_with_optimizer_pt_instead_of_optimizer_is_refused(tiny):
    """optimizer.pt (AdamW's state by parameter position) was never written by a released pico:
    only optimizer/ resumes, and a checkpoint without it is refused before anything is written."""
    config, runs = tiny
    run(config, "--training.max_steps=4")
    step_dir = runs / "run" / "checkpoints" / "step_4"
    torch.save({"optimizer": optimizer_state(step_dir)}, step_dir / "optimizer.pt")
    shutil.rmtree(step_dir / "optimizer")
    manifest = json.loads((step_dir / "checkpoint.json").read_text())
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("optimizer/")}
    files["optimizer.pt"] = (step_dir / "optimizer.pt").stat().st_size
    (step_dir / "checkpoint.json").write_text(json.dumps({**manifest, "files": files}))

    before = snapshot(runs / "run")
    result = run(config, "--training.max_steps=8", check=False)
    assert result.returncode != 0 and snapshot(runs / "run") == before
    assert result.stderr.strip().splitlines() == [
        f"error: {step_dir.resolve()}: holds no optimizer state (checkpointing.keep_last_n_optimizer_states "
        f"dropped it); expected optimizer/"]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the parent's pid
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny):
    config, runs = tiny
    longer = ["--training.max_steps=30", "--data.dataloader.batch_size=16"]
    run(config, *longer, "--checkpointing.run_name=whole")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(ROOT / "train.py"), str(config), *longer],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step 3/30" in line:
            workers = children(proc.pid)
            assert len(workers) == 2
            os.kill(workers[-1], signal.SIGTERM)  # one rank only, as a node's own notice would
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    stopped = int(os.readlink(runs / "run" / "checkpoints" / "latest").split("_")[1])
    assert stopped < 30, "the run finished before the signal arrived"
    assert f"stopped at step {stopped}" in output
    torchrun(config, *longer)
    assert_same_losses(runs / "whole", runs / "run", steps=range(1, 31))
    assert_same_weights(runs / "whole", runs / "run")
