"""What a suite needs beyond one run: a data-order seed, tokenizers in checkpoints, a disk and
time plan, and the code and logs that make a run reproducible from its directory."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import test_hub
from test_data import LAYOUT, N_ROWS, ROW_LEN, VOCAB, write_dataset

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# data.order_seed
# ---------------------------------------------------------------------------------------------

def positions(shards, start: int = 0, count: int = N_ROWS) -> list[int]:
    """The dataset positions (each row's first token) of the rows read at [start, start + count)."""
    return shards.read(start, count)[:, 0].tolist()


def test_order_seed_0_is_the_datasets_own_order(tmp_path):
    shards = data.open_dataset(str(write_dataset(tmp_path / "shards")), ROW_LEN, VOCAB, order_seed=0)
    assert positions(shards) == list(range(N_ROWS))


def test_an_order_seed_gives_another_order_of_the_same_rows(tmp_path):
    directory = str(write_dataset(tmp_path / "shards"))
    one, two = (positions(data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=s)) for s in (1, 2))
    assert sorted(one) == sorted(two) == list(range(N_ROWS))  # each row once per epoch
    assert one != list(range(N_ROWS)) and two != list(range(N_ROWS)) and one != two
    last = sum(LAYOUT["train-00002-of-00003.parquet"])
    assert sorted(one[-last:]) == list(range(N_ROWS - last, N_ROWS))  # the last shard stays last
    # the rows of a row group stay together: a batch reads a group or two, the shards in sequence
    starts = np.cumsum([0] + [n for groups in LAYOUT.values() for n in groups])
    group_of = {p: int(np.searchsorted(starts, p, side="right")) - 1 for p in range(N_ROWS)}
    runs = [group_of[p] for p in one]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == len(starts) - 2  # one change per group


def test_any_rows_of_a_seeded_order_are_read_without_reading_the_earlier_ones(tmp_path):
    directory = str(write_dataset(tmp_path / "shards"))
    whole = positions(data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=3))
    for start, count in [(0, 5), (7, 13), (30, 18), (47, 1)]:  # a resumed run, `data.py batch`
        fresh = data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=3)
        assert positions(fresh, start, count) == whole[start:start + count]


def test_the_hub_gives_a_seeded_order_as_a_local_copy_does(hub, tmp_path):
    repo = test_hub.write_repo(tmp_path / "repo", rows=[16, 16, 16, 7])
    hub.add_repo(test_hub.REPO, repo)
    local = data.open_dataset(str(repo / "data"), test_hub.ROW_LEN, test_hub.VOCAB, order_seed=5)
    remote = data.open_dataset(test_hub.REPO, test_hub.ROW_LEN, test_hub.VOCAB, order_seed=5)
    assert positions(remote, 0, 55) == positions(local, 0, 55) != list(range(55))
