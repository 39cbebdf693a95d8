"""Task evaluation: minimal pairs and multiple choice at every checkpoint, each score computed
again here, independently: transformers and the tokenizer the checkpoint carries, on the exported
checkpoint; a model whose every answer is known, on a task served by the local Hub stand-in."""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import config as pico_config
import evaluation
from data import DataError
from model import ModelConfig, PicoDecoder
from test_train import run

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("tasks")

# The byte tokenizer, whose ids the tiny model's 257 cover; the tiny shards' ids are all below 64
BYTES = ["--data.tokenizer.name=bytes", "--data.tokenizer.vocab_size=257", "--model.vocab_size=257"]
PAIRS = {  # BLiMP's columns, two of its groupings
    "sentence_good": ["The cats sleep.", "Who did you see?", "She has eaten.", "Many dogs bark.", "It is here."],
    "sentence_bad": ["The cats sleeps.", "Who did you saw?", "She has ate.", "Many dog barks.", "Is it here is."],
    "UID": ["agreement", "question", "tense", "agreement", "word_order"],
    "linguistics_term": ["s-v", "wh", "morphology", "s-v", "syntax"],
}
CHOICE = {  # a context of 40 bytes: with a choice, longer than the model's 33 tokens (cut on the left)
    "question": ["2 + 2 =", "The sky is", "A long context that does not fit at all:", "Cats say"],
    "choices": [["4", "5", "22"], ["blue", "green"], ["yes", "no", "maybe", "so"], ["meow", "woof"]],
    "label": [0, 0, 2, 0],
}


def write_task(directory: Path, columns: dict, file: str = "validation-00000-of-00001.parquet") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), directory / file)
    return directory


def task_args(*tasks: Path) -> list[str]:
    return ["--evaluation.metrics=['tasks']", f"--evaluation.tasks.names={[str(t) for t in tasks]}",
            "--evaluation.tasks.batch_size=3"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny byte-level run of 4 steps, scored on a minimal-pair and a multiple-choice task."""
    tmp = tmp_path_factory.mktemp("tasks")
    from conftest import tiny_files
    config, runs = tiny_files(tmp)
    pairs, choice = write_task(tmp / "blimp", PAIRS), write_task(tmp / "quiz", CHOICE)
    run(config, "--training.max_steps=4", *BYTES, *task_args(pairs, choice))
    return runs / "run"


def transformers_scorer(step_dir: Path):
    """logp(context, continuation): the summed log-probability transformers gives the
    continuation's tokens (the checkpoint's own tokenizer's), after <eod> and the context, at most
    33 tokens kept from the right, as the model has 32 positions."""
    from test_behaviour import transformers_model
    tokenizer = AutoTokenizer.from_pretrained(step_dir)
    model = transformers_model(step_dir.parent.parent, int(step_dir.name[len("step_"):]))

    def logp(context: str, continuation: str) -> tuple[float, int]:
        context_ids = tokenizer(context, add_special_tokens=False).input_ids if context else []
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        ids = torch.tensor(([tokenizer.eos_token_id] + whole)[-33:])
        scored = len(whole) - len(context_ids)
        with torch.no_grad():
            logits = model(ids[None, :-1]).logits[0]
        token_logp = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
        return token_logp[-scored:].sum().item(), scored
    return logp


def test_minimal_pairs_are_right_when_transformers_gives_the_good_sentence_more_probability(scored):
    logp = transformers_scorer(scored / "checkpoints" / "step_4")
    good = np.array([logp("", s)[0] for s in PAIRS["sentence_good"]])
    bad = np.array([logp("", s)[0] for s in PAIRS["sentence_bad"]])
    items = np.load(scored / "eval_results" / "step_4_tasks.npz")["blimp"]
    assert items["item"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(items["margin"], good - bad, rtol=1e-4, atol=1e-4)
    assert items["correct"].tolist() == (good > bad).tolist()
    reported = json.loads((scored / "eval_results" / "step_4.json").read_text())["tasks"]["blimp"]
    assert reported["kind"] == "minimal_pairs" and reported["items"] == 5 and reported["chance"] == 0.5
    assert math.isclose(reported["accuracy"], (good > bad).mean())
    right = dict(zip(PAIRS["UID"], [[] for _ in PAIRS["UID"]]))
    for uid, correct in zip(PAIRS["UID"], good > bad):
        right[uid].append(correct)
    assert reported["groups"]["UID"] == {uid: float(np.mean(v)) for uid, v in right.items()}
    assert set(reported["groups"]["linguistics_term"]) == {"s-v", "wh", "morphology", "syntax"}


def test_multiple_choice_scores_are_those_of_transformers_per_token_per_byte_and_in_bits_per_byte(scored):
    logp = transformers_scorer(scored / "checkpoints" / "step_4")
    items = np.load(scored / "eval_results" / "step_4_tasks.npz")["quiz"]
    per_token, per_byte, raw, bits = [], [], [], []
    for i, (context, choices, label) in enumerate(zip(*CHOICE.values())):
        scores = [logp(context, " " + choice) for choice in choices]  # lm-eval-harness's delimiter
        sums = np.array([s for s, _ in scores])
        n_bytes = np.array([len(choice) + 1 for choice in choices])
        np.testing.assert_allclose(items["logp"][i, :len(choices)], sums, rtol=1e-4)
        assert np.isnan(items["logp"][i, len(choices):]).all()  # fewer choices than the most: none
        per_token.append(np.argmax(sums / [n for _, n in scores]) == label)
        per_byte.append(np.argmax(sums / n_bytes) == label)
        raw.append(np.argmax(sums) == label)
        bits.append((-sums[label] / math.log(2), n_bytes[label]))
    assert items["correct"].tolist() == per_token and items["correct_per_byte"].tolist() == per_byte
    assert items["correct_raw"].tolist() == raw
    reported = json.loads((scored / "eval_results" / "step_4.json").read_text())["tasks"]["quiz"]
    assert reported["kind"] == "multiple_choice" and reported["items"] == 4
    assert math.isclose(reported["chance"], np.mean([1 / 3, 1 / 2, 1 / 4, 1 / 2]))
    assert math.isclose(reported["accuracy"], np.mean(per_token))
    assert math.isclose(reported["accuracy_per_byte"], np.mean(per_byte))
    assert math.isclose(reported["bits_per_byte"], sum(b for b, _ in bits) / sum(n for _, n in bits), rel_tol=1e-4)


def test_each_items_trajectory_is_one_stack_of_the_checkpoints_files(scored):
    steps = [0, 1, 2, 4]
    trajectory = np.stack([np.load(scored / "eval_results" / f"step_{s}_tasks.npz")["blimp"]["correct"]
                           for s in steps])
    assert trajectory.shape == (4, 5) and trajectory.dtype == bool
    records = [json.loads(line) for line in (scored / "metrics.jsonl").read_text().splitlines()]
    accuracy = [(r["step"], r["tasks/blimp/accuracy"]) for r in records if "tasks/blimp/accuracy" in r]
    assert accuracy == [(s, pytest.approx(trajectory[i].mean())) for i, s in enumerate(steps)]
    assert all(r["evaluation"] for r in records if "tasks/quiz/accuracy_per_byte" in r)
    assert [r for r in records if "tasks/blimp/UID/agreement" in r]


def uniform_model() -> PicoDecoder:
    """A model with every weight 0: its logits are 0, every token has probability 1/257, so a
    text of n tokens has log-probability -n ln 257 and every answer is known."""
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=1, attention_n_heads=4, attention_n_kv_heads=2,
                                    activation_hidden_dim=64, vocab_size=257, max_seq_len=32))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def task_config(*names: str, split: str | None = None) -> pico_config.Config:
    config = pico_config.Config()
    config.model = uniform_model().config
    config.data.tokenizer.name = "bytes"
    config.evaluation.metrics = ["tasks"]
    config.evaluation.tasks.names, config.evaluation.tasks.split = list(names), split
    return config


def measure(config: pico_config.Config) -> evaluation.Measured:
    rows = evaluation.task_rows(evaluation.Start(config, None, None, {}))
    at = evaluation.At(0, config, torch.device("cpu"), contextlib.nullcontext())
    return evaluation.tasks(uniform_model(), rows, at)


def test_a_task_of_a_hub_dataset_repo_gets_the_answers_a_uniform_model_must_give(hub, tmp_path, monkeypatch):
    for revision in ("main", "v2"):
        write_task(tmp_path / revision / "data", PAIRS)
        # another split, whose bad sentence is shorter (always preferred): it must not be read
        write_task(tmp_path / revision / "data", {"sentence_good": ["a b c"], "sentence_bad": ["a"]},
                   "train-00000-of-00001.parquet")
        hub.add_repo("pico-test/blimp", tmp_path / revision, branch=revision)
    write_task(tmp_path / "main" / "data", CHOICE, "validation-00001-of-00001.parquet")  # not one kind
    with pytest.raises(DataError, match="validation-00001-of-00001.parquet: a multiple choice file in task"):
        measure(task_config("pico-test/blimp", split="validation"))
    measured = measure(task_config("pico-test/blimp@v2", split="validation"))
    items = measured.per_row["tasks"]["blimp"]
    lengths = np.array([[len(g), len(b)] for g, b in zip(PAIRS["sentence_good"], PAIRS["sentence_bad"])])
    assert items["correct"].tolist() == (lengths[:, 0] < lengths[:, 1]).tolist()  # the shorter is likelier
    np.testing.assert_allclose(items["margin"], (lengths[:, 1] - lengths[:, 0]) * math.log(257), rtol=1e-6)
    assert measured.results["tasks"]["blimp"]["accuracy"] == 0.4  # two shorter, two ties (wrong), one longer
    assert measured.record["tasks/blimp/UID/word_order"] == 1.0 and measured.record["tasks/blimp/UID/tense"] == 0.0
    from hub_server import point_huggingface_hub_at
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    offline = measure(task_config("pico-test/blimp@v2", split="validation"))  # from the cache alone
    assert offline.results == measured.results


def test_a_uniform_model_ties_every_normalised_choice_and_prefers_the_shortest_unnormalised(tmp_path):
    measured = measure(task_config(str(write_task(tmp_path / "quiz", CHOICE))))
    items, summary = measured.per_row["tasks"]["quiz"], measured.results["tasks"]["quiz"]
    first = [label == 0 for label in CHOICE["label"]]  # every normalised score ties: the first choice wins
    assert items["correct"].tolist() == items["correct_per_byte"].tolist() == first
    assert items["correct_raw"].tolist() == [True, True, False, True]  # item 2's shortest is "no", not "maybe"
    assert summary["accuracy_raw"] == 0.75
    assert math.isclose(summary["bits_per_byte"], math.log2(257))  # one token per byte, each 1/257


def test_max_items_spreads_the_items_over_the_task(tmp_path):
    many = {"sentence_good": [f"good {i}" for i in range(100)], "sentence_bad": [f"bad {i}" for i in range(100)]}
    config = task_config(str(write_task(tmp_path / "many", many)))
    config.evaluation.tasks.max_items = 4
    rows = evaluation.task_rows(evaluation.Start(config, None, None, {}))
    assert rows[0].items.tolist() == [12, 37, 62, 87]  # not the first 4: BLiMP's files go by phenomenon


def test_the_tokenizers_package_encodes_as_the_byte_tokenizer_does():
    import data
    encoder = evaluation.TokenizerEncoder("bytes", data.byte_tokenizer(32))
    text = "def f(x):\n    return x ** 2  # é"
    assert encoder(text) == evaluation.ByteEncoder()(text)
    assert encoder.document_start == evaluation.ByteEncoder.document_start == data.EOD_ID


def test_the_builtin_task_is_the_same_each_time_and_every_bad_line_is_bad_python():
    first, again = evaluation.python_syntax_pairs(256, 0), evaluation.python_syntax_pairs(256, 0)
    assert first == again
    assert len(first["sentence_good"]) == 400 and first["corruption"].count("bracket") == 200
    for good, bad in zip(first["sentence_good"], first["sentence_bad"]):
        assert len(good) == len(bad) and good != bad  # the same length: chance for a model that knows nothing
        assert evaluation.parses(good) and not evaluation.parses(bad)


@pytest.mark.parametrize("columns, culprit", [
    ({"text": ["a"], "label": [0]}, "has columns text, label; expected sentence_good and sentence_bad"),
    ({"question": ["q"], "choices": [["a", "b"]], "label": [2]}, "row 0 has label 2 for 2 choices"),
    ({"question": ["q"], "choices": ["a b"], "label": [0]}, "column 'choices' has type string; expected a list"),
    ({"sentence_good": pa.array([], pa.string()), "sentence_bad": pa.array([], pa.string())}, "has no items"),
    ({"sentence_good": ["a", "b"], "sentence_bad": ["c", None]}, "row 1 holds a null in column 'sentence_bad'"),
    ({"ctx": ["q", "r"], "choices": [["a"], ["b", ""]], "label": [0, 0]}, "row 1's choice 1 is empty"),
])
def test_a_bad_task_is_one_line_naming_its_file_and_what_was_expected(tmp_path, columns, culprit):
    task = write_task(tmp_path / "bad", columns)
    with pytest.raises((DataError, pico_config.ConfigError)) as error:
        measure(task_config(str(task)))
    assert culprit in str(error.value) and "\n" not in str(error.value)
    assert "bad" in str(error.value)  # the task's directory or file


@pytest.mark.parametrize("name, culprit", [
    ("builtin:syntax", "'builtin:syntax' is not a built-in task"),
    ("no/such/dir", "'no/such/dir' is no directory and no Hub repo id"),
])
def test_an_unknown_task_name_is_one_line(name, culprit):
    with pytest.raises(pico_config.ConfigError, match=culprit):
        measure(task_config(name))


def test_without_the_tokenizers_package_one_line_says_how_to_install_it(monkeypatch):
    import sys
    import data
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(pico_config.ConfigError, match="^evaluation.tasks needs the tokenizers package: "
                                                      "pip install tokenizers$"):
        evaluation.TokenizerEncoder("bytes", data.byte_tokenizer(32))


def test_tasks_without_names_or_the_tokenizer_of_the_vocabulary_are_refused(tmp_path):
    config = task_config()
    with pytest.raises(pico_config.ConfigError, match="evaluation.tasks.names=\\[\\]: expected at least one task"):
        pico_config.validate(config, 1)
    config = task_config(str(write_task(tmp_path / "quiz", CHOICE)))
    config.model.vocab_size = 64
    with pytest.raises(pico_config.ConfigError, match="model.vocab_size=64: the tokenizer"):
        measure(config)


def test_a_bad_task_stops_the_run_before_anything_is_written(tiny, tmp_path):
    config, runs = tiny
    task = write_task(tmp_path / "bad", {"question": ["q"], "choices": [["a", "b"]], "label": [-1]})
    result = run(config, *BYTES, *task_args(task), check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "validation-00000-of-00001.parquet: row 0 has label -1" in result.stderr and not runs.exists()
