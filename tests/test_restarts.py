"""A worker lost under `torchrun --max-restarts` costs only the steps since the last checkpoint.

Every run here is the command a user types, two CPU processes over gloo: on one node
(`--standalone --nproc_per_node=2`) or on two simulated on this host (two torchrun agents,
`--nnodes=2`, one process each, c10d rendezvous on localhost). A worker is killed (or stopped)
when rank 0 logs a given step; torchrun starts the group again, the run resumes from
checkpoints/latest and must end as the run that lost nothing ends: the same losses and final
weights, bit for bit.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import data
from test_distributed import assert_same_losses, assert_same_weights, children, only_rank_0_writes
from test_train import ROOT, SEQ, TINY, VOCAB, assert_same_run, losses, run

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = [pytest.mark.xdist_group("restarts"),
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")]

STEPS = 24
LONGER = [f"--training.max_steps={STEPS}", "--data.dataloader.batch_size=16"]  # checkpoints 0, 1, 2, 4, 8, ...


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A config for a tiny model on random tokens; returns (config, runs dir)."""
    tmp = tmp_path_factory.mktemp("restarts")
    data.write_shards(np.random.default_rng(0).integers(0, VOCAB, size=(1024, SEQ + 1)), tmp / "shards")
    config = tmp / "tiny.py"
    config.write_text(TINY.format(data=str(tmp / "shards"), runs=str(tmp / "runs")))
    return config, tmp / "runs"


@pytest.fixture(scope="module")
def whole(job):
    """The run that lost nothing, in two processes on one node: its run directory."""
    config, runs = job
    result = torchrun(config, *LONGER, "--checkpointing.run_name=whole")
    assert result.returncode == 0, result.output[-3000:]
    return runs / "whole"


@pytest.fixture(scope="module")
def one(job):
    """The same run in one process: its run directory."""
    config, runs = job
    run(config, *LONGER, "--checkpointing.run_name=one")
    return runs / "one"


@pytest.fixture(scope="module")
def killed(job):
    """Rank 1 killed (SIGKILL) while training step 11, under --max-restarts=1: checkpoint 8 is the
    latest, and steps 9 and 10 are trained again. Returns the Finished job and its run directory."""
    config, runs = job
    result = torchrun(config, *LONGER, "--checkpointing.run_name=killed", max_restarts=1,
                      signals=[(10, 1, signal.SIGKILL)])
    assert result.returncode == 0, result.output[-3000:]
    return result, runs / "killed"


class Finished:
    def __init__(self, returncode: int, output: str):
        self.returncode, self.output = returncode, output
        self.lines = output.splitlines()


def torchrun(config, *overrides, nnodes=1, max_restarts=0, signals=(), timeout=600) -> Finished:
    """Trains under torchrun on `nnodes` simulated nodes (2 processes in all), sending each of
    `signals`, (when, rank, signal), in turn to that rank's worker: when rank 0 logs step `when`,
    or, for a path, as soon as it exists."""
    if nnodes == 1:
        layout = [["--standalone", "--nproc_per_node=2"]]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        layout = [[f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=test-{port}"]] * nnodes
    # OMP_NUM_THREADS: torchrun would set 1 and say so in a warning; the same, silently.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    read, write = os.pipe()  # the agents' output, line by line, in one stream
    agents = [subprocess.Popen([sys.executable, "-u", "-m", "torch.distributed.run", *flags,
                                f"--max-restarts={max_restarts}", str(ROOT / "train.py"), str(config), *overrides],
                               stdout=write, stderr=write, cwd=ROOT, env=env) for flags in layout]
    os.close(write)
    lines, sent = [], []
    sender = threading.Thread(target=send, args=(signals, agents, lines, sent), daemon=True)
    sender.start()
    try:
        with os.fdopen(read, errors="replace") as stream:
            lines.extend(stream)  # one line at a time, as the agents write them
        returncodes = [agent.wait(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    output = "".join(lines)
    assert len(sent) == len(signals), f"sent only {sent} of {signals}\n" + output[-3000:]
    return Finished(max(returncodes, key=abs), output)


def send(signals, agents, lines: list[str], sent: list):
    """Sends each signal once its moment has come, in order, a step's in the lines after the last."""
    seen = 0
    for when, rank, signum in signals:
        while not (when.exists() if isinstance(when, Path) else
                   any(f"step {when}/{STEPS} |" in line for line in lines[seen:])):
            if all(agent.poll() is not None for agent in agents):
                return
            time.sleep(0.001)
        os.kill(worker(agents, rank), signum)
        sent.append((when, rank, signum))
        seen = len(lines)


def worker(agents, rank: int) -> int:
    """The pid of the worker of global rank `rank`, a child of one of the agents."""
    for agent in agents:
        for pid in children(agent.pid):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank}")


def assert_complete(run_dir: Path):
    """Every checkpoint whole, no half-written one left, and one training record per step."""
    checkpoints = run_dir / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    for step_dir in checkpoint.step_directories(checkpoints):
        checkpoint.check_complete(step_dir)
    assert only_rank_0_writes(run_dir) >= 1
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_a_group_started_again_after_a_killed_rank_trains_the_run_of_one_process(one, killed):
    result, run_dir = killed
    assert "resumed from" in result.output and "at step 8" in result.output
    assert_same_losses(one, run_dir, steps=range(1, STEPS + 1))  # up to float32 rounding
    assert_same_weights(one, run_dir)
    assert_complete(run_dir)


@pytest.mark.slow
def test_a_killed_rank_costs_nothing_bit_for_bit(whole, killed):
    assert_same_run(whole, killed[1])


def test_the_survivor_names_the_lost_rank_and_the_step_the_run_resumes_from_in_one_line(killed):
    result, _ = killed
    said = [line for line in result.lines if "lost" in line]
    assert said == ["error: rank 0: lost rank 1 (connection closed); torchrun starts the group again "
                    "(1 of --max-restarts=1 left) and the run resumes from step 8"], result.output[-3000:]
    assert "Traceback" not in result.output and "[rank0]" not in result.output


@pytest.mark.slow
def test_two_simulated_nodes_train_the_run_of_one_process_and_survive_a_killed_rank(job, one, whole):
    config, runs = job
    result = torchrun(config, *LONGER, "--checkpointing.run_name=nodes", nnodes=2, max_restarts=2,
                      signals=[(10, 1, signal.SIGKILL)])
    assert result.returncode == 0, result.output[-3000:]
    assert "at step 8" in result.output
    assert_same_losses(one, runs / "nodes", steps=range(1, STEPS + 1))
    assert_same_weights(one, runs / "nodes")
    assert_same_run(whole, runs / "nodes")  # the same ranks as on one node: bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_while_rank_0_writes_a_checkpoint_leaves_no_partial_one(job, whole, rank):
    config, runs = job
    # training_state.pt: rank 0 is writing checkpoint 8 alone, the other rank waiting for it.
    writing = runs / f"mid-save-{rank}" / "checkpoints" / ".step_8.tmp" / "training_state.pt"
    result = torchrun(config, *LONGER, f"--checkpointing.run_name=mid-save-{rank}", max_restarts=1,
                      signals=[(writing, rank, signal.SIGKILL)])
    assert result.returncode == 0, result.output[-3000:]
    assert_same_run(whole, runs / f"mid-save-{rank}")
    assert_complete(runs / f"mid-save-{rank}")


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_group_within_the_collective_timeout(job, whole):
    config, runs = job
    result = torchrun(config, *LONGER, "--checkpointing.run_name=stopped", "--training.collective_timeout=5",
                      max_restarts=1, signals=[(10, 1, signal.SIGSTOP)])
    assert result.returncode == 0, result.output[-3000:]
    assert [line for line in result.lines if "lost" in line] == [
        "error: rank 0: lost rank 1 (no answer within training.collective_timeout=5 s); torchrun starts the "
        "group again (1 of --max-restarts=1 left) and the run resumes from step 8"], result.output[-3000:]
    assert_same_run(whole, runs / "stopped")


@pytest.mark.slow
@pytest.mark.parametrize("nnodes", [1, 2])
def test_random_ranks_killed_at_random_steps_still_finish_the_run_that_lost_nothing(job, whole, nnodes):
    config, runs = job
    chance = random.Random(nnodes)  # seeded: a failure can be run again
    kills = [(step, chance.randrange(2), signal.SIGKILL) for step in sorted(chance.sample(range(2, STEPS), 3))]
    result = torchrun(config, *LONGER, f"--checkpointing.run_name=random-{nnodes}", nnodes=nnodes,
                      max_restarts=len(kills), signals=kills)
    assert result.returncode == 0, f"{kills}\n{result.output[-3000:]}"
    assert_same_run(whole, runs / f"random-{nnodes}")
    assert_complete(runs / f"random-{nnodes}")
