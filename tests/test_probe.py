"""The training probe, memorization by step seen, and loss spikes: what a run records of how it
learns its own training rows."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

import launcher
import train
from config import LossSpikeConfig
from model import PicoDecoder
from test_train import ROOT, final_weights, losses, run

SPIKES = ["--monitoring.loss_spikes.std_devs=3.0", "--monitoring.loss_spikes.window=4"]
PROBE = ["--evaluation.probe.rows=20", "--evaluation.probe.memorization_prefix=8",
         "--evaluation.probe.memorization_tokens=6", "--evaluation.probe.batch_size=7"]


def records(run_dir, key: str) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if key in r}


def batch_rows(config, step: int, tmp_path) -> np.ndarray:
    """`data.py batch --step N`: the global batch that optimizer step N + 1 trained on."""
    out = tmp_path / f"batch-{step}.npy"
    launcher.run([sys.executable, str(ROOT / "data.py"), "batch", str(config), "--step", str(step),
                  "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    return np.load(out)


@pytest.fixture
def probed(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=8", *PROBE)
    return config, runs / "run"


def test_probe_rows_are_spread_over_the_run_and_seen_at_the_step_data_py_shows(probed, tmp_path):
    config, run_dir = probed
    probe = np.load(run_dir / "eval_results" / "step_8_probe.npy")
    assert probe.dtype.names == ("position", "seen_at", "loss", "tokens", "token_match", "exact_match")
    # 20 rows over the 8 x 8 rows the run trains on: the middle of each of 20 equal parts
    assert probe["position"].tolist() == [(2 * i + 1) * 64 // 40 for i in range(20)]
    assert probe["seen_at"].tolist() == [p // 8 + 1 for p in probe["position"]]
    for position, seen_at in zip(probe["position"], probe["seen_at"]):
        assert 0 <= position - (seen_at - 1) * 8 < 8  # in the batch of `data.py batch --step seen_at-1`
    assert probe["position"][probe["seen_at"] == 3].tolist() == [17, 20]
    rows = batch_rows(config, 2, tmp_path)
    for step in (0, 2, 8):  # every checkpoint: the same rows, their losses as a separate forward gives
        recorded = np.load(run_dir / "eval_results" / f"step_{step}_probe.npy")
        model = PicoDecoder.from_pretrained(str(run_dir / "checkpoints" / f"step_{step}")).eval()
        for row in recorded[recorded["seen_at"] == 3]:
            tokens = torch.from_numpy(rows[row["position"] - 16][None])
            with torch.no_grad():
                loss = model(tokens[:, :-1], tokens[:, 1:])[1].item()
            assert row["tokens"] == 32 and np.isclose(row["loss"], loss, rtol=1e-5)


def test_memorization_is_the_greedy_continuation_of_each_rows_prefix(probed, tmp_path):
    config, run_dir = probed
    recorded = np.load(run_dir / "eval_results" / "step_8_probe.npy")
    model = PicoDecoder.from_pretrained(str(run_dir / "checkpoints" / "step_8")).eval()
    for row in recorded[::5]:
        seen_in = batch_rows(config, int(row["seen_at"]) - 1, tmp_path)
        tokens = torch.from_numpy(seen_in[row["position"] % 8][None])
        out = model.generate(tokens[:, :8], 6, temperature=0)[0, 8:]
        match = (out == tokens[0, 8:14]).float().mean().item()
        assert row["token_match"] == pytest.approx(match) and row["exact_match"] == (match == 1)


def test_each_checkpoint_summarises_the_probe_seen_unseen_and_by_steps_since_seen(probed):
    _, run_dir = probed
    for step in (0, 1, 2, 4, 8):
        per_row = np.load(run_dir / "eval_results" / f"step_{step}_probe.npy")
        summary = json.loads((run_dir / "eval_results" / f"step_{step}.json").read_text())["probe"]
        seen = per_row["seen_at"] <= step
        assert summary["seen"]["rows"] == seen.sum() and summary["unseen"]["rows"] == (~seen).sum()
        if seen.any():
            assert summary["seen"]["loss"] == pytest.approx(per_row["loss"][seen].mean())
            assert summary["seen"]["exact_match"] == pytest.approx(per_row["exact_match"][seen].mean())
            bins = summary["by_steps_since_seen"]
            assert sum(b["rows"] for b in bins) == seen.sum()
            for b in bins:
                low, high = b["steps_since_seen"]
                assert high == max(1, 2 * low)  # [0, 1), [1, 2), [2, 4), ...
                since = step - per_row["seen_at"]
                assert b["rows"] == (seen & (since >= low) & (since < high)).sum()
        metrics = records(run_dir, "probe/loss_unseen" if (~seen).any() else "probe/loss_seen")[step]
        for group in ("seen", "unseen"):
            assert metrics.get(f"probe/loss_{group}") == summary[group].get("loss")
    assert summary["unseen"] == {"rows": 0}  # at the end every probe row has been trained on


def test_the_probe_is_capped_at_the_rows_the_run_trains_on(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=2", "--evaluation.probe.rows=1000",
        "--evaluation.probe.memorization_tokens=0", "--evaluation.probe.memorization_prefix=4")
    probe = np.load(runs / "run" / "eval_results" / "step_2_probe.npy")
    assert probe["position"].tolist() == list(range(16))  # all 2 x 8 of them
    assert "token_match" not in probe.dtype.names  # memorization off


def test_memorization_longer_than_the_context_is_left_out_with_a_warning(tiny):
    config, runs = tiny
    result = run(config, "--training.max_steps=1", "--evaluation.probe.rows=4",
                 "--evaluation.probe.memorization_tokens=30")  # 32 + 30 > model.max_seq_len=32
    assert ("evaluation.probe: memorization of 30 tokens from 32 does not fit in model.max_seq_len=32; "
            "the probe runs without it") in result.stdout
    probe = np.load(runs / "run" / "eval_results" / "step_1_probe.npy")
    assert probe.dtype.names == ("position", "seen_at", "loss", "tokens")


def spike_steps(spikes: train.LossSpikes, losses: list[float], first_step: int = 1) -> list[tuple]:
    """(step, captured) of each spike among the losses of steps first_step, first_step + 1, ..."""
    found = []
    for step, loss in enumerate(losses, first_step):
        spikes.watch(step, torch.tensor(loss, dtype=torch.float64), batch=None)
        if spikes.read():
            found.append((step, spikes.capture))
    return found


def test_a_run_resumed_with_more_steps_keeps_its_probe_rows_and_one_with_more_rows_gets_them(probed):
    config, run_dir = probed
    run(config, "--training.max_steps=12", *PROBE)
    positions = {step: np.load(run_dir / "eval_results" / f"step_{step}_probe.npy")["position"].tolist()
                 for step in (8, 12)}
    assert positions[12] == positions[8] == [(2 * i + 1) * 64 // 40 for i in range(20)]
    run(config, "--training.max_steps=16", *PROBE, "--evaluation.probe.rows=24")
    probe = np.load(run_dir / "eval_results" / "step_16_probe.npy")
    assert probe["position"].tolist() == [(2 * i + 1) * 128 // 48 for i in range(24)]


def test_loss_spikes_window_leaves_spikes_and_non_finite_losses_out():
    spikes = train.LossSpikes(LossSpikeConfig(std_devs=3.0, window=4), state={})
    assert spike_steps(spikes, [2.0, 2.1, 1.9, 2.0, 9.0, 9.0, float("nan"), 2.05]) == [(5, True), (6, False)]
    assert spikes.spike["step"] == 6 and spikes.spike["loss"] == 9.0  # still over the window before 5
    assert list(spikes.losses) == [2.1, 1.9, 2.0, 2.05]


def test_a_run_of_spikes_is_captured_once_and_max_captures_in_all():
    spikes = train.LossSpikes(LossSpikeConfig(std_devs=3.0, window=4, max_captures=2), state={})
    normal = [2.0, 2.1, 1.9, 2.0]
    found = spike_steps(spikes, normal + [9.0] * 3 + [2.0, 9.0, 2.0, 9.0, 9.0])
    assert found == [(5, True), (6, False), (7, False), (9, True), (11, False), (12, False)]
    assert spikes.captured == 2
    # the state a checkpoint saves: a resumed run goes on in the same run of spikes, with the same count
    resumed = train.LossSpikes(LossSpikeConfig(std_devs=3.0, window=4, max_captures=3), spikes.state())
    assert spike_steps(resumed, [9.0, 2.0, 9.0], 13) == [(13, False), (15, True)]


def test_a_run_of_spikes_as_long_as_the_window_is_the_losss_new_level():
    spikes = train.LossSpikes(LossSpikeConfig(std_devs=3.0, window=4), state={})
    assert spike_steps(spikes, [2.0, 2.1, 1.9, 2.0] + [5.0, 5.2, 4.8, 5.0] + [5.1, 9.0]) == [
        (5, True), (6, False), (7, False), (8, False), (10, True)]
    assert list(spikes.losses) == [5.2, 4.8, 5.0, 5.1]


def test_a_loss_spike_is_logged_and_its_batch_recorded_and_captured_as_a_checkpoint_would(tiny):
    config, runs = tiny
    run_dir = runs / "run"
    run(config, "--training.max_steps=8", *SPIKES)
    assert not (run_dir / "spikes").exists()
    # Resumed with a thousandfold lr, the loss leaps at step 11 and stays up. The window of the 4
    # losses before comes from checkpoint 8, so the resumed run can tell at once.
    result = run(config, "--training.max_steps=12", "--training.optimization.lr=3.0",
                 "--checkpointing.save_every_n_steps=1", *SPIKES)
    assert result.stdout.count("loss spike at step") == 1 and "loss spike at step 11" in result.stdout
    assert sorted(records(run_dir, "loss_spike")) == [11, 12]  # each logged, the first of a run captured
    assert [p.name for p in (run_dir / "spikes").iterdir()] == ["step_11"]
    spike = json.loads((run_dir / "spikes" / "step_11" / "spike.json").read_text())
    assert spike["step"] == 11 and spike["positions"] == [80, 88]  # the rows of `data.py batch --step 10`
    assert spike["loss"] == losses(run_dir)[11] > spike["mean"] + 3 * spike["std"]
    assert records(run_dir, "loss_spike")[11]["loss_spike"] == spike["loss"]
    # with the weights after step 11 on the batch step 11 trained on: checkpoint 11's own captures
    spike_dir = run_dir / "spikes" / "step_11"
    ckpt = run_dir / "checkpoints" / "step_11" / "learning_dynamics"
    for kind in ("activations", "weights", "gradients"):
        captured, saved = (torch.load(d / f"train_{kind}.pt", weights_only=True)
                           for d in (spike_dir / "learning_dynamics", ckpt))
        assert captured.keys() == saved.keys() and all(torch.equal(captured[k], saved[k]) for k in saved)
    arrow = "train_data/data-00000-of-00001.arrow"
    assert (spike_dir / "learning_dynamics" / arrow).read_bytes() == (ckpt / arrow).read_bytes()


def test_a_resumed_run_drops_the_spikes_it_replays_and_start_over_moves_them_aside(tiny):
    config, runs = tiny
    run_dir = runs / "run"

    def back_to_checkpoint_8():  # as if the run had stopped there
        shutil.rmtree(run_dir / "checkpoints" / "step_12")
        (run_dir / "checkpoints" / "latest").unlink()

    run(config, "--training.max_steps=8", *SPIKES)
    run(config, "--training.max_steps=12", "--training.optimization.lr=3.0", *SPIKES)
    assert [p.name for p in (run_dir / "spikes").iterdir()] == ["step_11"]
    back_to_checkpoint_8()
    run(config, "--training.max_steps=12", "--monitoring.loss_spikes.std_devs=None")  # looking for none
    assert not list((run_dir / "spikes").iterdir()) and not records(run_dir, "loss_spike")
    back_to_checkpoint_8()
    run(config, "--training.max_steps=12", "--training.optimization.lr=3.0", *SPIKES)
    run(config, "--training.max_steps=2", "--checkpointing.training.start_over=True", *SPIKES)
    (previous,) = run_dir.glob("previous_*")
    assert not (run_dir / "spikes").exists() and (previous / "spikes" / "step_11" / "spike.json").exists()


def test_probe_memorization_spikes_and_layer_statistics_leave_the_run_bit_identical(tiny):
    config, runs = tiny
    off = ["--checkpointing.run_name=off", "--monitoring.loss_spikes.std_devs=None",
           "--monitoring.logging.layer_stats=False"]
    on = ["--checkpointing.run_name=on", *PROBE, "--monitoring.loss_spikes.std_devs=0.01",
          "--monitoring.loss_spikes.window=2"]  # so sensitive that most rises are spikes, and captured
    run(config, "--training.max_steps=8", *off)
    run(config, "--training.max_steps=8", *on)
    assert list((runs / "on" / "spikes").iterdir())
    assert losses(runs / "off") == losses(runs / "on")
    for step in (0, 1, 2, 4, 8):
        a, b = (runs / name / "checkpoints" / f"step_{step}" for name in ("off", "on"))
        for name in ("model.safetensors", "learning_dynamics/train_activations.pt",
                     "learning_dynamics/train_gradients.pt"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), (step, name)
    wa, wb = final_weights(runs / "off"), final_weights(runs / "on")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
