"""Training data from a dataset repo on the Hub (data.HubShards), against a local stand-in for the
Hub (tests/hub_server.py, the `hub` fixture): listing, download, prefetch, resume, the cache bound,
offline use, bad repos, and `python data.py verify`."""

import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import launcher
import test_train
from hub_server import point_huggingface_hub_at

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 1000  # more ids than rows, so a row's first token can be its global position
ROW_LEN = 9
ROWS = 16  # per shard, in row groups of 5, 5, 5, 1
REPO = "pico-test/tokens"


def row(position: int) -> list[int]:
    return [position] + [(7 * position + j) % VOCAB for j in range(1, ROW_LEN)]


def shard_name(k: int, n: int) -> str:
    return f"data/train-{k:05d}-of-{n:05d}.parquet"  # as pico-lm/pretokenized-dolma names them


def write_repo(directory: Path, n_shards: int = 4, rows: list[int] | None = None) -> Path:
    """A dataset repo's files: n_shards shards (rows[k] rows in shard k, default ROWS) holding
    row(p) at global position p, a README and a .gitattributes that are not shards."""
    rows = rows or [ROWS] * n_shards
    n_shards = len(rows)
    (directory / "data").mkdir(parents=True)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    (directory / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    start = 0
    for k, count in enumerate(rows):
        table = pa.table({data.COLUMN: pa.array([row(p) for p in range(start, start + count)],
                                                pa.list_(pa.int32()))})
        pq.write_table(table, directory / shard_name(k, n_shards), row_group_size=5)
        start += count
    return directory


def expected_rows(start: int, count: int) -> np.ndarray:
    return np.array([row(p) for p in range(start, start + count)], dtype=np.int64)


@pytest.fixture
def repo(hub, tmp_path):
    """REPO on the stand-in Hub: 4 shards of 16 rows."""
    hub.add_repo(REPO, write_repo(tmp_path / "repo"))
    return REPO


def open_repo(name=REPO, max_cached_shards=2):
    return data.open_dataset(name, ROW_LEN, VOCAB, max_cached_shards=max_cached_shards)


def shard_downloads(hub, k: int, n: int = 4) -> list[dict]:
    """Requests for the bytes of shard k (not ranged footer reads)."""
    return [r for r in hub.requests_for(shard_name(k, n)) if r["method"] == "GET" and not r["range"]]


def cached_shards(cache: Path) -> list[Path]:
    """Shard files on disk in the Hugging Face cache (whole blobs, not downloads in progress)."""
    return [p for p in cache.glob("datasets--*/blobs/*") if not p.name.endswith(".incomplete")]


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def one_line_error(call) -> str:
    with pytest.raises(data.DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Listing, download, prefetch
# ---------------------------------------------------------------------------------------------

def test_the_shards_are_the_repos_parquet_files_in_path_order(repo, hub):
    shards = open_repo()
    assert shards.files == [shard_name(k, 4) for k in range(4)]  # no README, no .gitattributes
    assert shards.num_rows == 4 * ROWS
    assert hub.requests_for(f"/api/datasets/{REPO}/tree/")
    # Opening reads the first shard's footer (its row count) and downloads nothing.
    assert all(not shard_downloads(hub, k) for k in range(4))
    assert all(r["range"] for r in hub.requests_for(shard_name(0, 4)))


def test_rows_are_downloaded_and_read_in_file_then_row_order(repo, hub, tmp_path):
    shards = open_repo()
    np.testing.assert_array_equal(shards.read(0, 4 * ROWS), expected_rows(0, 4 * ROWS))
    np.testing.assert_array_equal(shards.read(13, 20), expected_rows(13, 20))  # across shards
    assert (tmp_path / "hf-cache" / "datasets--pico-test--tokens" / "snapshots").is_dir()
    # LFS files come from the CDN (another origin), as on the real Hub.
    assert {r["host"].split(":")[0] for r in shard_downloads(hub, 0)} == {"localhost"}


def test_the_next_shard_is_downloaded_before_the_reader_reaches_it(repo, hub):
    shards = open_repo(max_cached_shards=2)
    np.testing.assert_array_equal(shards.read(0, 4), expected_rows(0, 4))  # shard 0 only
    wait_for(lambda: shard_downloads(hub, 1))
    time.sleep(0.2)
    assert not shard_downloads(hub, 2), "prefetch goes one shard ahead with max_cached_shards=2"


@pytest.mark.parametrize("order_seed", [0, 3])
def test_probe_rows_are_read_by_range_requests_without_downloading_a_shard(repo, hub, tmp_path, order_seed):
    positions = [1, 17, 30, 33, 60]  # four shards, two rows of one row group
    local = data.open_dataset(str(tmp_path / "repo" / "data"), ROW_LEN, VOCAB, order_seed=order_seed)
    remote = data.open_dataset(REPO, ROW_LEN, VOCAB, order_seed=order_seed)
    np.testing.assert_array_equal(remote.read_at(positions), local.read_at(positions))
    assert not any(shard_downloads(hub, k) for k in range(4)) and not cached_shards(tmp_path / "hf-cache")
    reads = [r for k in range(4) for r in hub.requests_for(shard_name(k, 4)) if r["method"] == "GET"]
    assert reads and all(r["range"] for r in reads)


def test_probe_rows_are_read_from_the_hub_once_then_from_the_cache_also_offline(repo, hub, tmp_path,
                                                                                monkeypatch):
    positions = [2, 21, 50]
    def shard_requests() -> int:
        return sum(len(hub.requests_for(shard_name(k, 4))) for k in range(4))
    first = open_repo().read_at(positions)
    reads = shard_requests()
    again = open_repo().read_at(positions)  # another process of the node, or a resumed run
    assert reads and shard_requests() == reads
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(first, expected_rows(0, 64)[positions])
    with pytest.raises(data.DataError, match=r"is outside \[0, model.vocab_size=21\)"):
        data.open_dataset(REPO, ROW_LEN, 21).read_at(positions)  # cached rows are checked, read again
    (cached,) = (tmp_path / "hf-cache").rglob("*-rows-*.npz")
    np.savez(cached, positions=[2, 21, 49], rows=first)  # other rows under its name: never trusted
    np.testing.assert_array_equal(open_repo().read_at(positions), first)
    assert shard_requests() > reads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data.constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(open_repo().read_at(positions), first)  # no shard is cached


def test_a_revision_other_than_main_is_read(hub, tmp_path):
    hub.add_repo(REPO, write_repo(tmp_path / "main"))
    hub.add_repo(REPO, write_repo(tmp_path / "v1", n_shards=2), branch="v1")
    shards = open_repo(f"{REPO}@v1")
    assert shards.files == [shard_name(0, 2), shard_name(1, 2)]
    np.testing.assert_array_equal(shards.read(0, 2 * ROWS), expected_rows(0, 2 * ROWS))


def test_a_shorter_last_shard_is_read_to_its_end(hub, tmp_path):
    hub.add_repo(REPO, write_repo(tmp_path / "repo", rows=[ROWS, ROWS, 7]))
    shards = open_repo()
    np.testing.assert_array_equal(shards.read(0, 2 * ROWS + 7), expected_rows(0, 2 * ROWS + 7))
    assert shards.num_rows == 2 * ROWS + 7
    assert "has 39" in one_line_error(lambda: shards.read(2 * ROWS + 5, 4))


# ---------------------------------------------------------------------------------------------
# Resume: straight to the shard and row of the step
# ---------------------------------------------------------------------------------------------

def test_resume_at_a_later_step_downloads_no_earlier_shard(repo, hub):
    global_batch, step = 8, 5  # position 40: shard 2, row 8
    stream = data.BatchStream(open_repo(), global_batch, 1, 0, start_step=step, end_step=8)
    try:
        assert torch.equal(next(stream), torch.from_numpy(expected_rows(40, 8)))
    finally:
        stream.close()
    assert not hub.requests_for(shard_name(1, 4))
    # Of shard 0, only its footer (a few KB, by range requests) gave the rows per shard.
    assert hub.requests_for(shard_name(0, 4)) and not shard_downloads(hub, 0)
    assert shard_downloads(hub, 2)


def test_resume_with_the_cache_of_an_earlier_run_requests_no_earlier_shard(repo, hub):
    open_repo().read(0, 2 * ROWS)  # an earlier run read shards 0 and 1
    for thread in threading.enumerate():  # and prefetched shard 2 in the background
        if thread.name.startswith("prefetch "):
            thread.join(timeout=10)
    hub.log.clear()
    np.testing.assert_array_equal(open_repo().read(3 * ROWS + 2, 8), expected_rows(3 * ROWS + 2, 8))
    assert not any(hub.requests_for(shard_name(k, 4)) for k in range(3))
    assert shard_downloads(hub, 3)


# ---------------------------------------------------------------------------------------------
# The cache bound
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_cached_shards", [1, 2, 3])
def test_at_most_max_cached_shards_stay_on_disk(hub, tmp_path, max_cached_shards):
    hub.add_repo(REPO, write_repo(tmp_path / "repo", n_shards=8))
    cache = tmp_path / "hf-cache"
    most, reading = [0], threading.Event()
    reading.set()

    def watch():
        while reading.is_set():
            most[0] = max(most[0], len(cached_shards(cache)))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        shards = open_repo(max_cached_shards=max_cached_shards)
        for start in range(0, 8 * ROWS, 4):
            np.testing.assert_array_equal(shards.read(start, 4), expected_rows(start, 4))
    finally:
        reading.clear()
        watcher.join()
    assert 1 <= most[0] <= max_cached_shards
    assert len(cached_shards(cache)) <= max_cached_shards
    assert all(len(shard_downloads(hub, k, 8)) == 1 for k in range(8))  # each downloaded once


@pytest.mark.parametrize("shared", [True, False])
def test_processes_sharing_a_cache_never_delete_a_shard_another_reads(hub, tmp_path, shared):
    # Two ranks of one torchrun job on one node: b's reader runs a few rows behind a's, so around
    # each boundary a reads shard k while b still reads shard k - 1.
    hub.add_repo(REPO, write_repo(tmp_path / "repo", n_shards=6))
    a, b = (data.open_dataset(REPO, ROW_LEN, VOCAB, max_cached_shards=1, shared=shared) for _ in "ab")
    try:
        for k in range(1, 6):
            for shards, start in ((a, k * ROWS), (b, k * ROWS - 4), (a, k * ROWS + 4)):
                np.testing.assert_array_equal(shards.read(start, 4), expected_rows(start, 4))
    except (OSError, data.DataError) as e:  # a shard gone under its reader: a one-line DataError
        assert not shared, e  # without `shared`, one deletes the shard the other is reading
        return
    assert shared, "expected a shard to vanish under a reader"
    assert len(cached_shards(tmp_path / "hf-cache")) <= 1 + 2


# ---------------------------------------------------------------------------------------------
# Offline, and the Hub out of reach
# ---------------------------------------------------------------------------------------------

def test_offline_reads_from_the_cache_after_a_first_pass(repo, hub, tmp_path, monkeypatch):
    open_repo(max_cached_shards=4).read(0, 4 * ROWS)  # room for all 4 shards: all stay cached
    hub.log.clear()
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    shards = open_repo(max_cached_shards=2)  # and offline, none is deleted
    np.testing.assert_array_equal(shards.read(0, 4 * ROWS), expected_rows(0, 4 * ROWS))
    assert hub.log == []
    assert len(cached_shards(tmp_path / "hf-cache")) == 4


def test_offline_without_a_cache_is_one_line_naming_the_repo(repo, hub, tmp_path, monkeypatch):
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    message = one_line_error(open_repo)
    assert REPO in message and "HF_HUB_OFFLINE=1" in message
    assert "set data.dataset.name to a directory of Parquet shards" in message


def test_offline_without_a_shard_is_one_line_naming_the_file(repo, hub, tmp_path, monkeypatch):
    open_repo(max_cached_shards=2).read(0, 3 * ROWS)  # shards 0 and 1 are deleted again
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    shards = open_repo()
    message = one_line_error(lambda: shards.read(0, 4))
    assert f"could not download {shard_name(0, 4)} of {REPO}" in message
    assert "set data.dataset.name to a directory of Parquet shards" in message


def test_a_hub_out_of_reach_is_one_line_within_seconds(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_huggingface_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
    started = time.monotonic()
    message = one_line_error(open_repo)
    assert time.monotonic() - started < 5
    assert REPO in message and endpoint in message and "Connection refused" in message
    assert "set data.dataset.name to a directory of Parquet shards" in message


# ---------------------------------------------------------------------------------------------
# Bad repos: one line naming the culprit
# ---------------------------------------------------------------------------------------------

def test_a_repo_that_does_not_exist_is_one_line_naming_it(repo):
    message = one_line_error(lambda: open_repo("pico-test/no-such-dataset"))
    assert "pico-test/no-such-dataset" in message and "data.dataset.name" in message


def test_a_revision_that_does_not_exist_is_one_line_naming_it(repo):
    message = one_line_error(lambda: open_repo(f"{REPO}@no-such-branch"))
    assert REPO in message and "no-such-branch" in message


def test_a_repo_without_parquet_files_is_one_line_naming_it(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("nothing here yet\n")
    hub.add_repo(REPO, tmp_path / "repo")
    message = one_line_error(open_repo)
    assert REPO in message and ".parquet" in message


@pytest.mark.parametrize("bad", [0, 2])  # the first: seen in its footer; a later one: when read
def test_a_shard_of_another_schema_is_one_line_naming_it(hub, tmp_path, bad):
    directory = write_repo(tmp_path / "repo")
    pq.write_table(pa.table({"text": ["some words"] * ROWS}), directory / shard_name(bad, 4))
    hub.add_repo(REPO, directory)
    message = one_line_error(lambda: open_repo().read(0, 4 * ROWS))
    assert f"hf://datasets/{REPO}/{shard_name(bad, 4)}" in message and "input_ids" in message


def test_a_shard_with_another_row_count_is_one_line_naming_it(hub, tmp_path):
    hub.add_repo(REPO, write_repo(tmp_path / "repo", rows=[ROWS, ROWS - 1, ROWS]))
    shards = open_repo()
    shards.read(0, ROWS)
    message = one_line_error(lambda: shards.read(ROWS, 4))
    assert f"hf://datasets/{REPO}/{shard_name(1, 3)}: 15 rows, expected 16" in message
    message = one_line_error(lambda: open_repo().read_at([ROWS + 3]))  # the probe's range reads too
    assert f"hf://datasets/{REPO}/{shard_name(1, 3)}: 15 rows, expected 16" in message


# ---------------------------------------------------------------------------------------------
# The token
# ---------------------------------------------------------------------------------------------

def test_the_token_goes_to_the_hub_only_and_is_never_printed(repo, hub, monkeypatch):
    token = "hf_pico_test_secret_token"
    monkeypatch.setenv("HF_TOKEN", token)
    open_repo().read(0, 2 * ROWS)
    api = [r for r in hub.log if r["host"].startswith("127.0.0.1")]
    cdn = [r for r in hub.log if r["host"].startswith("localhost")]
    assert api and all(r["authorization"] == f"Bearer {token}" for r in api)
    assert cdn and all(r["authorization"] is None for r in cdn)  # signed CDN URLs need none
    assert token not in one_line_error(lambda: open_repo("pico-test/no-such-dataset"))


# ---------------------------------------------------------------------------------------------
# Through the command line: train.py and data.py verify
# ---------------------------------------------------------------------------------------------

# test_train's tiny model, on the stand-in repo's rows of 9 tokens out of 1000.
TINY = test_train.TINY + """
data.dataset.max_cached_shards = 2
model.vocab_size = 1000
model.max_seq_len = 8
training.max_steps = 8
training.optimization.lr = 3e-4
training.optimization.lr_warmup_steps = 2
"""


def train(tmp_path, *overrides):
    config = tmp_path / "tiny.py"
    config.write_text(TINY.format(data=REPO, runs=str(tmp_path / "runs")))
    return launcher.run([sys.executable, str(ROOT / "train.py"), str(config), *overrides],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_training_on_a_hub_dataset_writes_its_run_directory(repo, hub, tmp_path, monkeypatch):
    token = "hf_pico_test_secret_token"
    monkeypatch.setenv("HF_TOKEN", token)
    result = train(tmp_path, "--evaluation.probe.rows=6", "--evaluation.probe.memorization_prefix=4",
                   "--evaluation.probe.memorization_tokens=2")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert (run / "checkpoints" / "latest" / "model.safetensors").is_file()
    probe = np.load(run / "eval_results" / "step_8_probe.npy")  # its rows: the Hub's at those positions
    assert probe["position"].tolist() == [5, 16, 26, 37, 48, 58] and (probe["tokens"] == 8).all()
    assert all(shard_downloads(hub, k) for k in range(4))  # 8 steps x 8 rows: all 64 rows
    written = result.stdout + result.stderr + "".join(p.read_text() for p in run.rglob("*.yaml"))
    written += "".join(p.read_text() for p in (run / "logs").iterdir())
    assert token not in written


@pytest.mark.parametrize("name, culprit", [
    ("pico-test/no-such-dataset", "pico-test/no-such-dataset"),
    (f"{REPO}@no-such-branch", "no-such-branch"),
    ("pico-test/no-shards", "pico-test/no-shards"),
    ("pico-test/text", f"hf://datasets/pico-test/text/{shard_name(0, 4)}"),
])
def test_a_bad_hub_dataset_stops_train_py_with_one_line_and_writes_nothing(repo, hub, tmp_path, name,
                                                                           culprit):
    (tmp_path / "no-shards").mkdir()
    (tmp_path / "no-shards" / "README.md").write_text("soon\n")
    hub.add_repo("pico-test/no-shards", tmp_path / "no-shards")
    text = write_repo(tmp_path / "text")
    pq.write_table(pa.table({"text": ["some words"] * ROWS}), text / shard_name(0, 4))
    hub.add_repo("pico-test/text", text)
    result = train(tmp_path, f"--data.dataset.name={name}")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and culprit in result.stderr
    assert not (tmp_path / "runs").exists()


def verify(capsys, *args) -> list[str]:
    data.main(["verify", *args])
    return capsys.readouterr().out.strip().splitlines()


def test_verify_counts_the_rows_and_tokens_of_a_directory(tmp_path, capsys):
    directory = write_repo(tmp_path / "repo", rows=[ROWS, ROWS, 7])
    lines = verify(capsys, str(directory), "--seq-len", str(ROW_LEN - 1), "--vocab-size", str(VOCAB))
    assert lines[:3] == [f"{directory / shard_name(k, 3)}: {n} rows, {n * ROW_LEN} tokens"
                         for k, n in enumerate([ROWS, ROWS, 7])]
    assert lines[3].startswith(f"total: 3 shards, 39 rows of {ROW_LEN} tokens, {39 * ROW_LEN} tokens")


def test_verify_counts_the_rows_and_tokens_of_a_repo(repo, capsys):
    lines = verify(capsys, REPO)  # the row length taken from the first row
    assert lines[:4] == [f"{shard_name(k, 4)}: {ROWS} rows, {ROWS * ROW_LEN} tokens" for k in range(4)]
    assert lines[4] == (f"total: 4 shards, {4 * ROWS} rows of {ROW_LEN} tokens, {4 * ROWS * ROW_LEN} "
                        f"tokens, largest token id {expected_rows(0, 4 * ROWS).max()}")


def test_verify_of_a_bad_shard_exits_non_zero_with_one_line_naming_it(tmp_path):
    directory = write_repo(tmp_path / "repo")
    bad = directory / shard_name(2, 4)
    pq.write_table(pa.table({data.COLUMN: pa.array([row(p)[:-1] for p in range(ROWS)])}), bad)
    result = launcher.run([sys.executable, str(ROOT / "data.py"), "verify", str(directory)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {bad}: row 0 has 8 tokens, expected "
                                                  f"model.max_seq_len + 1 = 9"]
