"""The data order (data.py): Parquet shards read in file order then row order, each rank's part of
every global batch, the prefetching stream, bad data, and the embedded corpus."""

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import data
import launcher

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("data")

VOCAB = 1000  # more ids than rows, so a row's first token can be its global position
ROW_LEN = 9  # max_seq_len 8, plus the token the last position predicts
# Three shards of 16 rows in row groups of unequal sizes: 48 rows in all.
LAYOUT = {"train-00000-of-00003.parquet": [5, 3, 7, 1],
          "train-00001-of-00003.parquet": [4, 12],
          "train-00002-of-00003.parquet": [6, 2, 8]}
N_ROWS = 48


def row(position: int) -> list[int]:
    """The row at global position `position`: its first token is the position itself."""
    return [position] + [(7 * position + j) % VOCAB for j in range(1, ROW_LEN)]


def write_shard(path, rows: list[list[int]], group_sizes: list[int]):
    """One Parquet file with one row group per entry of group_sizes."""
    assert sum(group_sizes) == len(rows)
    schema = pa.schema([(data.COLUMN, pa.list_(pa.int32()))])
    with pq.ParquetWriter(path, schema) as writer:
        done = 0
        for size in group_sizes:
            part = pa.table({data.COLUMN: pa.array(rows[done:done + size], pa.list_(pa.int32()))})
            writer.write_table(part, row_group_size=size)
            done += size
    assert pq.ParquetFile(path).metadata.num_row_groups == len(group_sizes)


def write_dataset(directory, replace: dict[int, list[int]] | None = None):
    """LAYOUT's shards, written last file first (the order must come from the names); `replace`
    swaps the rows at some global positions for others."""
    directory.mkdir()
    starts, start = {}, 0
    for name, groups in LAYOUT.items():
        starts[name] = start
        start += sum(groups)
    for name in reversed(LAYOUT):
        positions = range(starts[name], starts[name] + sum(LAYOUT[name]))
        rows = [(replace or {}).get(p, row(p)) for p in positions]
        write_shard(directory / name, rows, LAYOUT[name])
    return directory


@pytest.fixture
def shards(tmp_path):
    return data.open_dataset(str(write_dataset(tmp_path / "shards")), ROW_LEN, VOCAB)


def expected_rows(start: int, count: int) -> np.ndarray:
    return np.array([row(p) for p in range(start, start + count)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Reading: file order, then row order
# ---------------------------------------------------------------------------------------------

def test_shards_are_read_in_file_order_then_row_order(shards):
    assert [p.name for p in shards.files] == sorted(LAYOUT)
    assert shards.num_rows == N_ROWS
    rows = shards.read(0, N_ROWS)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, expected_rows(0, N_ROWS))


@pytest.mark.parametrize("start, count", [(3, 4),    # across row groups of one shard
                                          (14, 5),   # across two shards
                                          (15, 18),  # across three shards, one whole
                                          (20, 12),  # one whole row group
                                          (47, 1)])  # the last row
def test_a_read_may_span_row_groups_and_shards(shards, start, count):
    np.testing.assert_array_equal(shards.read(start, count), expected_rows(start, count))


def test_reading_past_the_last_row_is_a_data_error(shards):
    with pytest.raises(data.DataError, match=f"has {N_ROWS}"):
        shards.read(N_ROWS - 2, 3)


# ---------------------------------------------------------------------------------------------
# Each rank's part of the global batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_ranks_and_micro_batches_make_up_each_global_batch_in_data_order(shards, world_size, accum):
    global_batch = 8
    for step in range(N_ROWS // global_batch):
        micro_batches_by_rank = []
        for rank in range(world_size):
            start, count = data.rank_rows(step, global_batch, world_size, rank)
            block = torch.from_numpy(shards.read(start, count))
            # As train.py splits a rank's block: accum equal, consecutive micro-batches.
            micro_batches = block.view(accum, -1, ROW_LEN)
            assert micro_batches.shape[1] == global_batch // (world_size * accum)
            micro_batches_by_rank.append(torch.cat(list(micro_batches)))
        gathered = torch.cat(micro_batches_by_rank)
        expected = shards.read(step * global_batch, global_batch)
        assert torch.equal(gathered, torch.from_numpy(expected))
        # The sample at p = step * G + i is row p, whatever the world size and accumulation.
        positions = torch.arange(step * global_batch, (step + 1) * global_batch)
        assert torch.equal(gathered[:, 0], positions)


# ---------------------------------------------------------------------------------------------
# The prefetching stream
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 1])
def test_batch_stream_resumed_at_a_step_yields_that_steps_rows(shards, rank):
    global_batch, world_size, start_step, end_step = 4, 2, 3, 9
    stream = data.BatchStream(shards, global_batch, world_size, rank, start_step, end_step)
    try:
        for step in range(start_step, end_step):
            start, count = data.rank_rows(step, global_batch, world_size, rank)
            assert torch.equal(next(stream), torch.from_numpy(shards.read(start, count)))
    finally:
        stream.close()


def test_batch_stream_reads_at_most_prefetch_steps_ahead(shards):
    stream = data.BatchStream(shards, 4, 1, 0, start_step=0, end_step=12, prefetch=2)
    try:
        deadline = time.monotonic() + 5
        while not stream.queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time enough to read all 12 steps, were the queue not bounded
        assert stream.queue.qsize() == 2
        assert stream.thread.is_alive()  # waiting for room, not done
        assert torch.equal(next(stream)[:, 0], torch.arange(0, 4))
    finally:
        stream.close()


def test_closing_a_batch_stream_stops_its_reader(shards):
    stream = data.BatchStream(shards, 4, 1, 0, start_step=0, end_step=12, prefetch=1)
    stream.close()
    stream.thread.join(timeout=5)
    assert not stream.thread.is_alive()


# ---------------------------------------------------------------------------------------------
# Bad data: a DataError whose message names the file
# ---------------------------------------------------------------------------------------------

def test_a_missing_directory_is_a_data_error_naming_the_setting(tmp_path):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(data.DataError) as error:
        data.open_dataset(str(missing), ROW_LEN, VOCAB)
    assert "data.dataset.name" in str(error.value)
    assert str(missing) in str(error.value)


def test_a_directory_without_parquet_files_is_a_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here\n")
    with pytest.raises(data.DataError) as error:
        data.open_dataset(str(tmp_path), ROW_LEN, VOCAB)
    assert str(tmp_path) in str(error.value)
    assert ".parquet" in str(error.value)


def test_a_shard_without_the_input_ids_column_is_a_data_error_naming_it(tmp_path):
    directory = write_dataset(tmp_path / "shards")
    bad = directory / "train-00001-of-00003.parquet"
    pq.write_table(pa.table({"tokens": pa.array([row(p) for p in range(16)])}), bad)
    with pytest.raises(data.DataError) as error:
        data.open_dataset(str(directory), ROW_LEN, VOCAB)
    assert str(bad) in str(error.value)
    assert "input_ids" in str(error.value)


def test_a_column_that_is_not_lists_of_integers_is_a_data_error_naming_the_shard(tmp_path):
    directory = write_dataset(tmp_path / "shards")
    bad = directory / "train-00002-of-00003.parquet"
    pq.write_table(pa.table({data.COLUMN: pa.array(["some text"] * 16)}), bad)
    with pytest.raises(data.DataError) as error:
        data.open_dataset(str(directory), ROW_LEN, VOCAB)
    assert str(bad) in str(error.value)


def bad_row_stream(tmp_path, bad_row: list[int], start_step: int):
    """A stream of 4-row steps over shards whose global row 21 (shard 1, row 5: step 5) is bad."""
    directory = write_dataset(tmp_path / "shards", replace={21: bad_row})
    shards = data.open_dataset(str(directory), ROW_LEN, VOCAB)  # footers only: no error yet
    return data.BatchStream(shards, 4, 1, 0, start_step=start_step, end_step=12)


@pytest.mark.parametrize("bad_row, problem", [
    (row(21)[:-1], f"has {ROW_LEN - 1} tokens"),    # too short
    (row(21) + [0], f"has {ROW_LEN + 1} tokens"),   # too long
    (row(21)[:-1] + [VOCAB], f"token id {VOCAB}"),  # an id the embedding does not have
    (row(21)[:-1] + [-1], "token id -1"),           # a negative id
])
def test_a_bad_row_in_the_first_batch_is_a_data_error_before_training(tmp_path, bad_row, problem):
    with pytest.raises(data.DataError) as error:
        bad_row_stream(tmp_path, bad_row, start_step=5)
    assert str(tmp_path / "shards" / "train-00001-of-00003.parquet") in str(error.value)
    assert problem in str(error.value)


def test_a_wrong_length_row_names_its_row_within_the_shard(tmp_path):
    with pytest.raises(data.DataError, match="row 5 has"):
        bad_row_stream(tmp_path, row(21)[:-1], start_step=5)


def test_a_bad_row_in_a_later_batch_is_raised_by_next(tmp_path):
    stream = bad_row_stream(tmp_path, row(21)[:-1], start_step=0)
    try:
        for step in range(5):
            assert torch.equal(next(stream)[:, 0], torch.arange(4 * step, 4 * step + 4))
        with pytest.raises(data.DataError, match="train-00001-of-00003.parquet"):
            next(stream)
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# The embedded corpus (reads ~12 MB of the standard library's source: a few seconds)
# ---------------------------------------------------------------------------------------------

SEQ_LEN = 255


@pytest.fixture(scope="module")
def corpus_builds(tmp_path_factory):
    """The embedded corpus built twice, into two different CORPUS_ROOTs."""
    built = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("first", "second"):
            patch.setattr(data, "CORPUS_ROOT", tmp_path_factory.mktemp(name))
            built.append(data.prepare_local(SEQ_LEN))
    return built


def test_embedded_corpus_builds_the_same_tokens_every_time(corpus_builds):
    first, second = corpus_builds
    files = sorted(p.relative_to(first) for p in first.rglob("*.parquet"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.parquet"))
    for path in files:
        tokens = pq.read_table(first / path).column(data.COLUMN)
        assert tokens.equals(pq.read_table(second / path).column(data.COLUMN)), path


def test_embedded_corpus_has_train_and_val_splits_of_byte_token_rows(corpus_builds):
    corpus = corpus_builds[0]
    n_rows = {}
    for split in ("train", "val"):
        files = data.split_files(data.list_shards(corpus), split, corpus)
        assert all(p.name.startswith(f"{split}-") for p in files)
        column = pa.concat_tables(pq.read_table(p) for p in files).column(data.COLUMN)
        n_rows[split] = len(column)
        assert pc.all(pc.equal(pc.list_value_length(column), SEQ_LEN + 1)).as_py()
        tokens = pc.list_flatten(column)
        bounds = pc.min_max(tokens).as_py()
        assert bounds["min"] >= 0 and bounds["max"] < data.BYTE_VOCAB_SIZE == 257
        assert pc.any(pc.equal(tokens, data.EOD_ID)).as_py()  # documents end with EOD (256)
    assert n_rows["val"] == data.VAL_ROWS
    assert n_rows["train"] > n_rows["val"]


def test_open_dataset_of_the_embedded_corpus_reads_its_train_split(corpus_builds, monkeypatch):
    corpus = corpus_builds[0]
    monkeypatch.setattr(data, "CORPUS_ROOT", corpus.parent.parent)  # already built: not rebuilt
    shards = data.open_dataset(data.EMBEDDED_CORPUS, SEQ_LEN + 1, data.BYTE_VOCAB_SIZE)
    assert shards.files == sorted((corpus / "data").glob("train-*.parquet"))
    assert shards.read(0, 2).shape == (2, SEQ_LEN + 1)


def test_data_batch_command_rebuilds_the_batch_the_trainer_consumed(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import train

    rows = np.random.default_rng(0).integers(0, 64, size=(256, 33))
    data.write_shards(rows, tmp_path / "shards")
    config = tmp_path / "c.py"
    config.write_text(f"""
data.dataset.name = {str(tmp_path / 'shards')!r}
data.dataloader.batch_size = 8
model.vocab_size, model.max_seq_len, model.d_model, model.n_layers = 64, 32, 32, 1
model.attention_n_heads, model.attention_n_kv_heads, model.activation_hidden_dim = 4, 2, 64
training.max_steps = 5
training.optimization.gradient_accumulation_steps = 2
checkpointing.runs_dir = {str(tmp_path / 'runs')!r}
checkpointing.run_name = "spy"
evaluation.metrics = []
checkpointing.learning_dynamics.eval_data = None
""")
    consumed = []  # what the training loop took from the data stream, step by step
    real_get = data.BatchStream.get

    def recording_get(self, *args, **kwargs):
        batch = real_get(self, *args, **kwargs)
        consumed.append(batch.clone())
        return batch

    monkeypatch.setattr(data.BatchStream, "get", recording_get)
    assert train.main([str(config)]) == 0
    assert len(consumed) == 5
    for step in (0, 3):
        out = tmp_path / f"batch_{step}.npy"
        launcher.run([sys.executable, "data.py", "batch", str(config), "--step", str(step),
                      "--out", str(out)], check=True, capture_output=True,
                     cwd=Path(data.__file__).parent)
        np.testing.assert_array_equal(np.load(out), consumed[step].numpy())


def test_data_batch_command_prints_text_for_the_byte_tokenizer():
    assert data.byte_text([104, 105, data.EOD_ID, 0xC3, 0xA9]) == "hi<eod>é"
