"""How a run ends: its background threads are stopped before the interpreter shuts down, so a
stop signal's save always exits 0 (a thread left running at shutdown can abort the process)."""

import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import checkpoint
import data
import launcher
from test_train import ROOT, start


def test_closing_the_batch_stream_ends_its_reader(tiny):
    config, _ = tiny
    shards = data.open_dataset(str(config.parent / "shards"), 33, 64)
    stream = data.BatchStream(shards, 8, 1, 0, start_step=0, end_step=100)
    next(stream)
    time.sleep(0.2)  # the reader has filled the queue and waits, holding the batch after it
    stream.close()
    assert not stream.thread.is_alive()


def test_a_stuck_reader_keeps_close_bounded():
    release = threading.Event()

    class Stuck:  # a Hub that stops answering after the first batch
        calls = 0

        def read(self, start, count):
            Stuck.calls += 1
            if Stuck.calls > 1:
                release.wait()
            return np.zeros((count, 33), dtype=np.int64)
    stream = data.BatchStream(Stuck(), 8, 1, 0, start_step=0, end_step=100)
    began = time.monotonic()
    stream.close(timeout=1.0)
    assert 0.9 < time.monotonic() - began < 5
    release.set()
    stream.thread.join(5)
    assert not stream.thread.is_alive()


def test_a_run_resumed_at_its_end_reads_no_batch(tiny):
    """A finished run that was stopped before evaluating resumes only to evaluate: it needs no row
    past its last step, even when the dataset holds exactly the run's rows."""
    config, _ = tiny
    shards = data.open_dataset(str(config.parent / "shards"), 33, 64)
    every_row = shards.num_rows // 8
    stream = data.BatchStream(shards, 8, 1, 0, start_step=every_row, end_step=every_row)
    assert stream.queue.empty()
    stream.close()


@pytest.mark.slow
def test_stops_at_random_moments_under_load_exit_0(tiny):
    """SIGTERM or SIGINT at random moments of training and saving, with both cores busy, started
    by the test launcher and by plain subprocess: before BatchStream.close waited for its reader,
    about one stop in thirty aborted with "terminate called without an active exception"."""
    config, runs = tiny
    rng = random.Random(0)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(24):
            overrides = ["--training.max_steps=60", "--data.dataloader.batch_size=32",
                         "--checkpointing.save_every_n_steps=3", f"--checkpointing.run_name=stop{i}"]
            if i % 2:
                proc = start(config, *overrides)
            else:
                proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), str(config), *overrides],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
            at, delay = rng.randint(1, 50), rng.uniform(0, 0.3)
            sig = rng.choice([signal.SIGTERM, signal.SIGINT])
            for line in proc.stdout:
                if f"step {at}/60" in line:
                    time.sleep(delay)  # into the next steps, a save or an evaluation
                    proc.send_signal(sig)
                    break
            output = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, f"stop {i} ({sig.name} after step {at} + {delay:.2f} s):\n{output}"
            assert "terminate called" not in output
            latest = runs / f"stop{i}" / "checkpoints" / "latest"
            checkpoint.check_complete(latest)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


assert launcher  # the test launcher is test_train.start's
