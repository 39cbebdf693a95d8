"""Perplexity at every checkpoint, on the same sequences every time."""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluation
from model import ModelConfig, PicoDecoder
from test_train import run

SEQ, VOCAB = 32, 64


def write_eval_set(directory: Path, lengths: list[int], seed: int = 1) -> list[np.ndarray]:
    """Rows of unequal lengths, as an evaluation set may hold."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, VOCAB, n) for n in lengths]
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))}),
                   directory / "val-00000-of-00001.parquet")
    return rows


def eval_args(directory: Path) -> list[str]:
    return ["--evaluation.metrics=['paloma']", f"--evaluation.paloma.dataset_name={directory}",
            "--evaluation.paloma.batch_size=3"]


def test_each_checkpoint_is_evaluated_with_the_perplexity_a_direct_computation_gives(tiny, tmp_path):
    config, runs = tiny
    rows = write_eval_set(tmp_path / "paloma" / "val", [33, 20, 33, 2, 17, 33, 9])
    run(config, "--training.max_steps=8", *eval_args(tmp_path / "paloma"))
    for step in (4, 8):
        reported = json.loads((runs / "run" / "eval_results" / f"step_{step}.json").read_text())
        model = PicoDecoder.from_pretrained(str(runs / "run" / "checkpoints" / f"step_{step}")).eval()
        with torch.no_grad():  # one sequence at a time: no padding at all
            nll = sum(model(torch.from_numpy(r[None, :-1]), torch.from_numpy(r[None, 1:]))[1].item()
                      * (len(r) - 1) for r in rows)
        tokens = sum(len(r) - 1 for r in rows)
        assert math.isclose(reported["paloma"], math.exp(nll / tokens), rel_tol=1e-5)
        record = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()
                  if "paloma_perplexity" in line and json.loads(line)["step"] == step]
        assert len(record) == 1 and record[0]["paloma_tokens"] == tokens
        assert math.isclose(record[0]["paloma_loss"], nll / tokens, rel_tol=1e-5)


def test_each_checkpoint_records_every_evaluation_rows_loss_as_a_separate_forward_gives(tiny, tmp_path):
    config, runs = tiny
    rows = write_eval_set(tmp_path / "paloma" / "val", [33, 20, 33, 2, 17, 33, 9])
    run(config, "--training.max_steps=4", *eval_args(tmp_path / "paloma"))
    for step in (0, 4):
        recorded = np.load(runs / "run" / "eval_results" / f"step_{step}_rows.npy")
        model = PicoDecoder.from_pretrained(str(runs / "run" / "checkpoints" / f"step_{step}")).eval()
        with torch.no_grad():
            losses = [model(torch.from_numpy(r[None, :-1]), torch.from_numpy(r[None, 1:]))[1].item()
                      for r in rows]
        assert recorded.dtype.names == ("loss", "tokens")
        assert recorded["tokens"].tolist() == [len(r) - 1 for r in rows]
        np.testing.assert_allclose(recorded["loss"], losses, rtol=1e-5)


def test_paloma_rows_evaluates_the_first_rows_of_the_evaluation_set_alone(tiny, tmp_path):
    config, runs = tiny
    write_eval_set(tmp_path / "paloma" / "val", [33, 20, 33, 2, 17])
    run(config, "--training.max_steps=1", *eval_args(tmp_path / "paloma"), "--evaluation.paloma.rows=3")
    assert np.load(runs / "run" / "eval_results" / "step_1_rows.npy")["tokens"].tolist() == [32, 19, 32]


def test_a_resumed_run_does_not_evaluate_a_checkpoint_again(tiny, tmp_path):
    config, runs = tiny
    write_eval_set(tmp_path / "paloma", [33, 33])
    run(config, "--training.max_steps=4", *eval_args(tmp_path / "paloma"))
    first = (runs / "run" / "eval_results" / "step_4.json").stat().st_mtime_ns
    run(config, "--training.max_steps=8", *eval_args(tmp_path / "paloma"))
    assert (runs / "run" / "eval_results" / "step_4.json").stat().st_mtime_ns == first
    steps = [json.loads(line)["step"] for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()
             if "paloma_perplexity" in line]
    assert steps == [0, 1, 2, 4, 8]  # each once, though the second run started at 4


def test_a_checkpoint_left_without_results_is_evaluated_when_the_run_resumes(tiny, tmp_path):
    config, runs = tiny
    write_eval_set(tmp_path / "paloma", [33, 33])
    run(config, "--training.max_steps=4", *eval_args(tmp_path / "paloma"))
    (runs / "run" / "eval_results" / "step_4.json").unlink()  # as if killed before writing it,
    run(config, "--training.max_steps=8", *eval_args(tmp_path / "paloma"))  # its record written
    assert (runs / "run" / "eval_results" / "step_4.json").is_file()
    records = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["step"] for r in records if "paloma_loss" in r]
    assert 4 in evaluations and len(evaluations) == len(set(evaluations))  # once, though evaluated twice
    assert [r for r in records if r["step"] == 4 and "loss" in r]  # its training record is kept


@pytest.mark.parametrize("evaluated", [True, False])
def test_a_resumed_run_drops_its_checkpoints_evaluation_records_only_to_evaluate_again(tmp_path, evaluated):
    from config import Config
    from records import Records

    # Evaluation records are known by their mark, whatever their keys (a fork's new measurement's)
    records = [{"step": 3, "loss": 3.0}, {"step": 3, "evaluation": True, "paloma_loss": 3.1},
               {"step": 4, "loss": 2.0}, {"step": 4, "evaluation": True, "paloma_loss": 2.1},
               {"step": 4, "evaluation": True, "my_new_measure": 2.2}, {"step": 5, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Records(tmp_path, Config(), start_step=4, evaluated=evaluated).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == (records[:5] if evaluated else records[:3])  # step 5's always goes: it is replayed


def test_evaluation_rows_longer_than_max_seq_len_plus_one_are_refused(tiny, tmp_path):
    config, runs = tiny
    write_eval_set(tmp_path / "paloma", [33, 34])
    result = run(config, *eval_args(tmp_path / "paloma"), check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "row 1 has 34 tokens" in result.stderr and "val-00000-of-00001.parquet" in result.stderr
    assert not runs.exists()


def test_bits_per_byte_for_the_byte_tokenizer_is_the_loss_in_bits_per_text_byte():
    rows = [np.array([104, 105, 256, 33, 10]), np.array([256, 97, 98])]
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=1, attention_n_heads=4,
                                          attention_n_kv_heads=2, activation_hidden_dim=64,
                                          vocab_size=257, max_seq_len=8))
    results = evaluation.evaluate(model, rows, 2, torch.device("cpu"), contextlib.nullcontext(), True)
    predicted_bytes = 3 + 2  # the labels, less the end-of-document id
    assert results["tokens"] == 6
    assert math.isclose(results["bits_per_byte"], results["loss"] * 6 / math.log(2) / predicted_bytes)


def test_the_evaluation_set_comes_from_the_split_files_of_a_hub_dataset_repo(hub, tmp_path):
    import data

    rows = write_eval_set(tmp_path / "paloma" / "data", [33, 20, 5])
    # Another split in the same repo, which must not be read.
    pq.write_table(pa.table({"input_ids": pa.array([[1] * 40], pa.list_(pa.int32()))}),
                   tmp_path / "paloma" / "data" / "test-00000-of-00001.parquet")
    hub.add_repo("pico-test/paloma-tinsy", tmp_path / "paloma")
    loaded = data.load_eval_set("pico-test/paloma-tinsy", "val", SEQ + 1, VOCAB)
    assert [r.tolist() for r in loaded] == [r.tolist() for r in rows]
    with pytest.raises(data.DataError, match="no split 'validation'"):
        data.load_eval_set("pico-test/paloma-tinsy", "validation", SEQ + 1, VOCAB)


def test_an_evaluation_set_with_a_source_column_gets_a_perplexity_per_source(tiny, tmp_path):
    config, runs = tiny
    rows = [np.random.default_rng(i).integers(0, VOCAB, n) for i, n in enumerate([33, 20, 33, 9, 17])]
    sources = ["c4", "wiki", "c4", "code", "wiki"]  # as pico-lm/pretokenized-paloma-tinsy's 16 corpora
    (tmp_path / "paloma" / "val").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32())),
                             "source": sources}), tmp_path / "paloma" / "val" / "val-00000-of-00001.parquet")
    run(config, "--training.max_steps=2", *eval_args(tmp_path / "paloma"))
    reported = json.loads((runs / "run" / "eval_results" / "step_2.json").read_text())
    model = PicoDecoder.from_pretrained(str(runs / "run" / "checkpoints" / "step_2")).eval()
    with torch.no_grad():
        nll = [model(torch.from_numpy(r[None, :-1]), torch.from_numpy(r[None, 1:]))[1].item() * (len(r) - 1)
               for r in rows]
    assert sorted(reported["paloma_by_source"]) == ["c4", "code", "wiki"]
    for source, value in reported["paloma_by_source"].items():
        mine = [i for i, s in enumerate(sources) if s == source]
        expected = math.exp(sum(nll[i] for i in mine) / sum(len(rows[i]) - 1 for i in mine))
        assert math.isclose(value, expected, rel_tol=1e-5), source
    record = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()
              if '"paloma_perplexity"' in line][-1]
    assert record["paloma_perplexity/wiki"] == reported["paloma_by_source"]["wiki"]
