"""Behaviour across training, measured at every checkpoint: the loss at each position and the
in-context learning score, induction heads, attention entropy (tasks: tests/test_tasks.py). Each
score is computed again here, independently, from what the run saved: transformers on the
exported checkpoint, the saved sequences, the evaluation rows."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import config as pico_config

from test_evaluation import eval_args, write_eval_set
from test_train import assert_same_run, run

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("behaviour")

BEHAVIOUR = ["--evaluation.metrics=['paloma', 'induction', 'attention']", "--evaluation.induction.sequences=5",
             "--evaluation.induction.batch_size=2", "--evaluation.attention.rows=3"]
LENGTHS = [33, 20, 33, 9, 33]  # evaluation rows: some shorter than the model's 32 positions


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny run of 8 steps with every behaviour measurement on; (run directory, eval rows)."""
    tmp = tmp_path_factory.mktemp("behaviour")
    from conftest import tiny_files
    config, runs = tiny_files(tmp)
    rows = write_eval_set(tmp / "paloma" / "val", LENGTHS)
    run(config, "--training.max_steps=8", *eval_args(tmp / "paloma"), *BEHAVIOUR)
    return runs / "run", rows


def transformers_model(run_dir, step):
    return AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step_{step}",
                                                attn_implementation="eager").eval()


def test_the_loss_at_each_position_and_the_in_context_score_are_those_of_the_rows(measured):
    run_dir, rows = measured
    model = transformers_model(run_dir, 8)
    sums, counts = np.zeros(32), np.zeros(32)
    with torch.no_grad():
        for row in rows:
            ids = torch.from_numpy(row[None])
            losses = F.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:], reduction="none").numpy()
            sums[:len(losses)] += losses
            counts[:len(losses)] += 1
    reported = json.loads((run_dir / "eval_results" / "step_8.json").read_text())
    np.testing.assert_allclose(reported["paloma_loss_by_position"], sums / counts, rtol=1e-4)
    early, late = 0, 7  # Olsson et al.'s 50 and 500 of 2048, scaled to max_seq_len 32
    icl = reported["paloma_icl"]
    assert icl["positions"] == [early, late]
    assert math.isclose(icl["score"], sums[late] / counts[late] - sums[early] / counts[early], rel_tol=1e-4)
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"paloma_icl_score"' in line and json.loads(line)["step"] == 8]
    assert len(record) == 1 and record[0]["paloma_icl_score"] == icl["score"] and record[0]["evaluation"] is True


def test_induction_scores_are_the_attention_transformers_computes_on_the_saved_sequences(measured):
    run_dir, _ = measured
    sequences = np.load(run_dir / "eval_results" / "induction_sequences.npy")
    half = 8  # a quarter of max_seq_len 32
    assert sequences.shape == (5, 2 * half) and (sequences[:, :half] == sequences[:, half:]).all()
    model = transformers_model(run_dir, 8)
    with torch.no_grad():
        out = model(torch.from_numpy(sequences), output_attentions=True)
    query = np.arange(half, 2 * half)
    expected = np.stack([a[:, :, query, query - half + 1].mean(dim=(0, 2)).numpy() for a in out.attentions])
    per_head = np.load(run_dir / "eval_results" / "step_8_induction.npy")
    assert per_head["layer"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and per_head["head"].tolist() == [0, 1, 2, 3] * 2
    np.testing.assert_allclose(per_head["prefix_matching"], expected.ravel(), rtol=1e-4)
    losses = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), torch.from_numpy(sequences[:, 1:]),
                             reduction="none")
    reported = json.loads((run_dir / "eval_results" / "step_8.json").read_text())["induction"]
    assert math.isclose(reported["loss_first_half"], losses[:, :half - 1].mean().item(), rel_tol=1e-4)
    assert math.isclose(reported["loss_second_half"], losses[:, half:].mean().item(), rel_tol=1e-4)
    np.testing.assert_allclose(reported["prefix_matching"], expected, rtol=1e-4)


def test_the_induction_sequences_are_the_same_for_every_size_of_a_suite(measured, tiny):
    run_dir, _ = measured
    config, runs = tiny
    run(config, "--training.max_steps=1", "--model.d_model=64", "--evaluation.metrics=['induction']",
        "--evaluation.induction.sequences=5")
    wider = np.load(runs / "run" / "eval_results" / "induction_sequences.npy")
    assert np.array_equal(wider, np.load(run_dir / "eval_results" / "induction_sequences.npy"))


def test_attention_entropy_is_that_of_transformers_attention_on_the_first_rows(measured):
    run_dir, rows = measured
    model = transformers_model(run_dir, 4)
    sums, tokens = np.zeros((2, 4)), 0
    with torch.no_grad():
        for row in rows[:3]:
            attentions = model(torch.from_numpy(row[None, :-1]), output_attentions=True).attentions
            sums += np.stack([torch.special.entr(a).sum(dim=(0, 2, 3)).numpy() for a in attentions])
            tokens += len(row) - 1
    per_head = np.load(run_dir / "eval_results" / "step_4_attention.npy")
    np.testing.assert_allclose(per_head["entropy"], (sums / tokens).ravel(), rtol=1e-4)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    layer = [r["attention/entropy/layers.1"] for r in records if r["step"] == 4 and "attention/entropy/layers.1" in r]
    assert layer == [pytest.approx((sums / tokens)[1].mean(), rel=1e-4)]


def test_losses_weights_and_captures_are_the_same_with_the_measurements_on_or_off(tiny, tmp_path):
    from test_tasks import BYTES, CHOICE, PAIRS, task_args, write_task
    config, runs = tiny
    rows_dir = tmp_path / "paloma"
    write_eval_set(rows_dir / "val", LENGTHS)
    tasks = task_args(write_task(tmp_path / "blimp", PAIRS), write_task(tmp_path / "quiz", CHOICE))[1:]
    run(config, "--training.max_steps=8", *BYTES, *eval_args(rows_dir), "--checkpointing.run_name=off")
    run(config, "--training.max_steps=8", *BYTES, *eval_args(rows_dir), *BEHAVIOUR, *tasks,
        "--evaluation.metrics=['paloma', 'induction', 'attention', 'tasks']", "--checkpointing.run_name=on")
    assert (runs / "on" / "eval_results" / "step_8_tasks.npz").is_file()
    assert_same_run(runs / "off", runs / "on")
    for kind in ("activations", "gradients"):
        off, on = (torch.load(runs / name / "checkpoints" / "step_8" / "learning_dynamics" / f"train_{kind}.pt",
                              weights_only=True) for name in ("off", "on"))
        assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


@pytest.mark.parametrize("overrides, culprit", [
    (["--evaluation.paloma.icl_positions=[9, 3]"], "evaluation.paloma.icl_positions=[9, 3]"),
    (["--evaluation.paloma.icl_positions=[3, 32]"], "below model.max_seq_len=32"),
    (["--evaluation.induction.length=17"], "evaluation.induction.length=17"),
    (["--evaluation.metrics=['induction', 'heads']"], "evaluation.metrics"),
])
def test_bad_behaviour_settings_are_one_line_before_anything_is_written(tiny, overrides, culprit):
    config, runs = tiny
    result = run(config, *overrides, check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert culprit in result.stderr and not runs.exists()


def test_induction_is_on_by_default_and_needs_rows_of_8_tokens():
    config = pico_config.Config()
    assert config.evaluation.metrics == ["paloma", "probe", "induction", "attention"]
    config.model.max_seq_len = 4
    with pytest.raises(pico_config.ConfigError, match="no 'induction' when model.max_seq_len=4 < 8"):
        pico_config.validate(config, 1)
    config.evaluation.induction.length = 2
    pico_config.validate(config, 1)
