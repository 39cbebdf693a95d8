"""A branch (checkpointing.training.branch_from): a new run that goes on from a checkpoint of
another with its whole state, and what it may change; and training.deterministic on the CPU.

One parent run of a tiny model, checkpointed at every step (so that each step's batch is in a
checkpoint's train_data/), is shared by the file's tests; its lr warms up over more steps than any
run here takes, so a run's lr at a step does not depend on its training.max_steps."""

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

import checkpoint
import config as pico_config
import data
import train
from test_train import TINY, VOCAB, SEQ, optimizer_state, run, snapshot

pytestmark = pytest.mark.xdist_group("branch")  # one worker: the tests share the parent run

STEP = 4  # where the branches start
SHARDS, ROWS, GROUP = 3, 48, 16  # rows per shard and per row group: an order seed moves all three
BRANCH = TINY + """
model.n_layers = 1
training.max_steps = 8
training.optimization.lr_warmup_steps = 100
checkpointing.save_every_n_steps = 1
"""
TIMING = ("tokens_per_s", "mfu")  # the records' only fields that depend on the machine's speed


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, runs dir), the parent run trained to step 8 in runs/parent."""
    tmp = tmp_path_factory.mktemp("branch")
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(SHARDS * ROWS, SEQ + 1))
    (tmp / "shards").mkdir()
    for k in range(SHARDS):
        column = pa.array(rows[k * ROWS:(k + 1) * ROWS].tolist(), pa.list_(pa.int32()))
        pq.write_table(pa.table({"input_ids": column}), tmp / "shards" / f"{k:05d}-of-{SHARDS:05d}.parquet",
                       row_group_size=GROUP)
    config = tmp / "branch.py"
    config.write_text(BRANCH.format(data=str(tmp / "shards"), runs=str(tmp / "runs")))
    run(config, "--checkpointing.run_name=parent")
    return config, tmp / "runs"


def branch(parent, name: str, *overrides) -> Path:
    config, runs = parent
    run(config, f"--checkpointing.run_name={name}",
        f"--checkpointing.training.branch_from=parent/checkpoints/step_{STEP}", *overrides)
    return runs / name


@pytest.fixture(scope="module")
def unchanged(parent) -> Path:
    return branch(parent, "unchanged")


@pytest.fixture(scope="module")
def reordered(parent) -> Path:
    """A branch with another data order from step 4, then started again to train two steps more."""
    directory = branch(parent, "reordered", "--data.order_seed=7")
    (directory / "first-start").write_text(json.dumps(training_records(directory)))
    branch(parent, "reordered", "--data.order_seed=7", "--training.max_steps=10")
    return directory


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in records(run_dir) if "loss" in r}


def trained_rows(run_dir: Path, step: int) -> np.ndarray:
    """The rows that step `step` trained on: its checkpoint's learning_dynamics/train_data/."""
    arrow = run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train_data" / checkpoint.ROWS_ARROW
    with pa.ipc.open_stream(str(arrow)) as stream:
        return np.array(stream.read_all()["input_ids"].to_pylist())


def rows_in_order(directory: Path, order_seed: int) -> np.ndarray:
    """Every row of the Parquet shards in directory, read with pyarrow, in data.order_seed's order as
    data.py describes it: 0, file then row order; another seed, every shard but the last permuted
    by default_rng([seed, number of shards]), each shard's row groups by default_rng([seed, crc32
    of its file name]), and each group's rows by default_rng([seed, that crc32, the group])."""
    files = sorted(directory.glob("*.parquet"))
    if order_seed:
        shuffled = np.random.default_rng([order_seed, len(files)]).permutation(len(files) - 1)
        files = [files[i] for i in shuffled] + files[-1:]
    rows = []
    for path in files:
        parquet, key = pq.ParquetFile(path), zlib.crc32(path.name.encode())
        groups = range(parquet.num_row_groups)
        if order_seed:
            groups = np.random.default_rng([order_seed, key]).permutation(parquet.num_row_groups)
        for g in groups:
            group = np.array(parquet.read_row_group(int(g)).column("input_ids").to_pylist())
            rows.append(group[np.random.default_rng([order_seed, key, g]).permutation(len(group))]
                        if order_seed else group)
    return np.concatenate(rows)


def assert_same_tensors(a, b):
    """Nested dicts (and lists) of tensors, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_a_branch_that_changes_nothing_is_its_parent_bit_for_bit_from_its_step(parent, unchanged):
    _, runs = parent
    expected = {step: r for step, r in training_records(runs / "parent").items() if step > STEP}
    assert training_records(unchanged) == expected
    assert_same_tensors(load_file(runs / "parent" / "checkpoints" / "step_8" / "model.safetensors"),
                        load_file(unchanged / "checkpoints" / "step_8" / "model.safetensors"))
    assert_same_tensors(optimizer_state(runs / "parent" / "checkpoints" / "step_8"),
                        optimizer_state(unchanged / "checkpoints" / "step_8"))


def test_a_branch_starts_its_directory_with_its_parents_checkpoint_and_records_its_lineage(parent, unchanged):
    _, runs = parent
    source = str((runs / "parent" / "checkpoints" / f"step_{STEP}").resolve())
    assert records(unchanged)[0] == {"step": STEP, "branch_from": source, "parent_run": "parent",
                                     "parent_step": STEP, "changed": []}
    saved = yaml.safe_load((unchanged / "training_config.yaml").read_text())["checkpointing"]["training"]
    assert saved["branch_from"] == f"parent/checkpoints/step_{STEP}"
    assert saved["lineage"] == {"source": source, "parent_run": "parent", "parent_step": STEP,
                                "changed": {}, "data_before": []}
    # step_4 is the parent's, whole: the branch's first checkpoint, which a resume could start from
    ours, theirs = unchanged / "checkpoints" / f"step_{STEP}", runs / "parent" / "checkpoints" / f"step_{STEP}"
    assert checkpoint.check_complete(ours) == checkpoint.check_complete(theirs)
    assert snapshot(ours).keys() == {ours / p.relative_to(theirs) for p in snapshot(theirs)}
    assert sorted(p.name for p in (unchanged / "checkpoints").iterdir()) == [
        "latest", "step_4", "step_5", "step_6", "step_7", "step_8"]


def test_another_order_seed_trains_the_parents_batches_up_to_its_step_and_the_seeds_after(parent, reordered):
    config, runs = parent
    shards, batch = config.parent / "shards", 8
    dataset_order, seed_order = rows_in_order(shards, 0), rows_in_order(shards, 7)
    for step in range(1, STEP + 1):  # the parent's, in the dataset's order; the branch's step_4 is it
        assert np.array_equal(trained_rows(runs / "parent", step), dataset_order[(step - 1) * batch:step * batch])
    assert np.array_equal(trained_rows(reordered, STEP), trained_rows(runs / "parent", STEP))
    for step in range(STEP + 1, 11):  # steps 9 and 10 from the second start, its own step_8 resumed
        rows = trained_rows(reordered, step)
        assert np.array_equal(rows, seed_order[(step - 1) * batch:step * batch])
        assert not np.array_equal(rows, dataset_order[(step - 1) * batch:step * batch])


def test_a_branch_started_again_resumes_its_own_checkpoints_as_the_same_run(parent, reordered):
    first_start = {int(step): r for step, r in json.loads((reordered / "first-start").read_text()).items()}
    assert {step: r for step, r in training_records(reordered).items() if step <= 8} == first_start
    assert sorted(training_records(reordered)) == [5, 6, 7, 8, 9, 10]
    logs = sorted((reordered / "logs").iterdir())
    assert f"resumed from {reordered / 'checkpoints' / 'step_8'} at step 8" in logs[-1].read_text()
    assert [r for r in records(reordered) if "branch_from" in r] == [records(reordered)[0]]  # once
    # the lineage of its first start, read back: the data before step 4 is still the parent's
    lineage = yaml.safe_load((reordered / "training_config.yaml").read_text())["checkpointing"]["training"]["lineage"]
    assert lineage["changed"] == {"data.order_seed": [0, 7]}
    assert lineage["data_before"] == [{"until_step": STEP, "name": str(parent[0].parent / "shards"),
                                       "seed": 0, "order_seed": 0}]


def test_the_probe_and_data_py_batch_read_the_parents_rows_before_the_branchs_step(parent, reordered):
    config = pico_config.load_config(str(reordered / "training_config.yaml"), [])
    shards, batch = parent[0].parent / "shards", 8
    at = STEP * batch  # the branch's first row
    expected = np.concatenate([rows_in_order(shards, 0)[:at], rows_in_order(shards, 7)[at:]])
    rows = data.training_rows(config)
    positions = np.array([70, 3, at - 1, at])  # the probe's: scattered, on both sides
    assert np.array_equal(rows.read_at(positions), expected[positions])
    assert np.array_equal(rows.read(at - 2, 4), expected[at - 2:at + 2])  # a batch across the step


# Refused in one line, with nothing written ---------------------------------------------------

def damaged_copy(parent, tmp_path: Path, damage) -> Path:
    """A copy of the parent run whose step_4 is damaged by damage(step directory)."""
    _, runs = parent
    copy = tmp_path / "copy"
    shutil.copytree(runs / "parent", copy, symlinks=True)
    damage(copy / "checkpoints" / f"step_{STEP}")
    return copy / "checkpoints" / f"step_{STEP}"


SHARD = "optimizer/__0_0.distcp"


@pytest.mark.parametrize("overrides, culprit", [
    (["--model.d_model=64"], "model.d_model (parent: 32, branch: 64)"),
    (["--model.n_layers=2"], "model.n_layers (parent: 1, branch: 2)"),
    (["--data.dataloader.batch_size=16"], "data.dataloader.batch_size (parent: 8, branch: 16)"),
    (["--checkpointing.training.branch_from=parent/checkpoints/step_9"], "holds no step_9"),
    (["--checkpointing.training.init_from=parent/checkpoints/step_4"], "checkpointing.training.init_from"),
    (["--checkpointing.run_name=parent"], "holds another run"),
    (["--training.max_steps=4"], "training.max_steps=4"),
    ([lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:100])], SHARD),
    ([lambda d: (d / "model.safetensors").write_bytes(b"y" * (d / "model.safetensors").stat().st_size)],
     "model.safetensors"),
])
def test_a_branch_that_cannot_go_on_is_refused_in_one_line_and_writes_nothing(parent, tmp_path, overrides,
                                                                              culprit):
    config, runs = parent
    source = f"parent/checkpoints/step_{STEP}"
    if callable(overrides[0]):
        source, overrides = str(damaged_copy(parent, tmp_path, overrides[0])), []
    before = snapshot(runs)
    with pytest.raises((train.ConfigError, checkpoint.CheckpointError)) as error:
        train.main([str(config), "--checkpointing.run_name=refused",
                    f"--checkpointing.training.branch_from={source}", *overrides])
    message = str(error.value)
    assert len(message.splitlines()) == 1 and culprit in message, message
    assert snapshot(runs) == before and not (runs / "refused").exists()


# training.deterministic ----------------------------------------------------------------------

def test_training_deterministic_changes_nothing_on_the_cpu(parent):
    config, runs = parent
    run(config, "--checkpointing.run_name=deterministic", "--training.deterministic=True",
        f"--training.max_steps={STEP}")  # the parent's first steps: its lr does not depend on max_steps
    parents = {step: r for step, r in training_records(runs / "parent").items() if step <= STEP}
    assert training_records(runs / "deterministic") == parents
    assert_same_tensors(load_file(runs / "parent" / "checkpoints" / f"step_{STEP}" / "model.safetensors"),
                        load_file(runs / "deterministic" / "checkpoints" / f"step_{STEP}" / "model.safetensors"))
