"""Pre-tokenized Parquet shards, read in a fixed order.

The training order is file order (sorted paths), then row order within a file, exactly as
pico-lm/pretokenized-dolma is meant to be read: the rows were shuffled when the dataset was made.
Every row is max_seq_len + 1 token ids in the column `input_ids`.

The sample at global position p = step * global_batch + i is the same for every model size,
world size and accumulation setting, and a run's data position is a function of its step alone.
How a process takes its part of each global batch (see `rank_rows`): rank r of W holds the
contiguous block of rows [r * G/W, (r+1) * G/W) of the global batch of G rows, and splits it
into gradient_accumulation_steps micro-batches, in order. So concatenating the ranks' blocks in
rank order gives back the global batch in data order, which is how captures are gathered.

Also here: the embedded corpus of the offline demo (`python data.py prepare-local`).
"""

import argparse
import bisect
import queue
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

COLUMN = "input_ids"

# The offline corpus: the Python standard library's own source, one byte = one token.
EMBEDDED_CORPUS = "builtin:stdlib-bytes"
EOD_ID = 256  # end of document, after the 256 byte values
BYTE_VOCAB_SIZE = 257
CORPUS_ROOT = Path(__file__).resolve().parent / "corpora"
VAL_ROWS = 512
ROWS_PER_SHARD = 8192
ROWS_PER_ROW_GROUP = 1024


class DataError(Exception):
    """Bad data: the message names the file and what was expected."""


def list_shards(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"data.dataset.name: directory {directory} does not exist; expected a "
                        f"directory of Parquet shards or {EMBEDDED_CORPUS!r}")
    files = sorted(directory.rglob("*.parquet"))
    if not files:
        raise DataError(f"data.dataset.name: {directory} holds no .parquet files")
    return files


class ParquetShards:
    """Random access by global row position over an ordered list of Parquet shards.

    Only the footers are read up front (row counts and schema); rows are read one row group at
    a time, checked when read, and only the current row group is kept in memory.
    """

    def __init__(self, files: list[Path], row_len: int, vocab_size: int):
        self.files, self.row_len, self.vocab_size = files, row_len, vocab_size
        self.group_starts = []  # per shard: the global position of each row group's first row
        start = 0
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
                schema = meta.schema.to_arrow_schema()
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            if COLUMN not in schema.names:
                raise DataError(f"{path}: no column '{COLUMN}' (has {', '.join(schema.names)}); "
                                f"expected pre-tokenized rows of token ids")
            kind = schema.field(COLUMN).type
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
                    or pa.types.is_fixed_size_list(kind)) or not pa.types.is_integer(kind.value_type):
                raise DataError(f"{path}: column '{COLUMN}' has type {kind}, expected a list of integers")
            starts = []
            for g in range(meta.num_row_groups):
                starts.append(start)
                start += meta.row_group(g).num_rows
            self.group_starts.append(starts)
        self.num_rows = start
        self._flat_starts = [(s, f, g) for f, starts in enumerate(self.group_starts)
                             for g, s in enumerate(starts)]
        self._keys = [s for s, _, _ in self._flat_starts]
        self._cached = (None, None)  # ((file, group), rows)

    def _row_group(self, f: int, g: int) -> np.ndarray:
        if self._cached[0] == (f, g):
            return self._cached[1]
        path = self.files[f]
        column = pq.ParquetFile(path).read_row_group(g, columns=[COLUMN]).column(0).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            lengths = np.full(len(column), column.type.list_size)
        else:
            lengths = np.diff(column.offsets.to_numpy())
        if len(lengths) and (lengths != self.row_len).any():
            bad = int(np.argmax(lengths != self.row_len))
            raise DataError(f"{path}: row {self.group_starts[f][g] - self.group_starts[f][0] + bad} "
                            f"has {lengths[bad]} tokens, expected model.max_seq_len + 1 = {self.row_len}")
        rows = column.flatten().to_numpy().astype(np.int64).reshape(-1, self.row_len)
        if rows.size and (rows.max() >= self.vocab_size or rows.min() < 0):
            bad = int(rows.max()) if rows.max() >= self.vocab_size else int(rows.min())
            raise DataError(f"{path}: token id {bad} is outside [0, model.vocab_size="
                            f"{self.vocab_size})")
        self._cached = ((f, g), rows)
        return rows

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) in data order, as int64 [count, row_len]."""
        if start + count > self.num_rows:
            raise DataError(f"rows up to {start + count} requested, the dataset has {self.num_rows}")
        out = np.empty((count, self.row_len), dtype=np.int64)
        done = 0
        while done < count:
            pos = start + done
            group_start, f, g = self._flat_starts[bisect.bisect_right(self._keys, pos) - 1]
            rows = self._row_group(f, g)
            take = min(count - done, group_start + len(rows) - pos)
            out[done:done + take] = rows[pos - group_start:pos - group_start + take]
            done += take
        return out


def rank_rows(step: int, global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first global position, number of rows) that this rank trains on at `step`."""
    per_rank = global_batch // world_size
    return step * global_batch + rank * per_rank, per_rank


class BatchStream:
    """This rank's rows of each step from start_step on, read ahead in a background thread so
    the accelerator never waits on Parquet decoding. At most `prefetch` steps are held."""

    def __init__(self, shards: ParquetShards, global_batch: int, world_size: int, rank: int,
                 start_step: int, end_step: int, pin_memory: bool = False, prefetch: int = 2):
        self.shards, self.pin_memory = shards, pin_memory
        self.args = (global_batch, world_size, rank)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # The first batch is read here, in the caller's thread, so a bad shard is reported
        # before any compute starts.
        self.queue.put(self._load(start_step))
        self.thread = threading.Thread(target=self._run, args=(start_step + 1, end_step), daemon=True)
        self.thread.start()

    def _load(self, step: int) -> torch.Tensor:
        start, count = rank_rows(step, *self.args)
        batch = torch.from_numpy(self.shards.read(start, count))
        return batch.pin_memory() if self.pin_memory else batch

    def _run(self, first: int, end: int):
        for step in range(first, end):
            try:
                item = self._load(step)
            except Exception as e:  # hand it to the training loop, which re-raises it
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set() or isinstance(item, Exception):
                return

    def __next__(self) -> torch.Tensor:
        item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self.stop.set()


def open_dataset(name: str, row_len: int, vocab_size: int, seed: int = 0) -> ParquetShards:
    """The training shards named by data.dataset.name: a local directory or the embedded corpus."""
    if name == EMBEDDED_CORPUS:
        directory = prepare_local(row_len - 1, seed) / "train"
    else:
        directory = Path(name)
    return ParquetShards(list_shards(directory), row_len, vocab_size)


# ---------------------------------------------------------------------------------------------
# The embedded corpus
# ---------------------------------------------------------------------------------------------

def stdlib_documents() -> list[bytes]:
    """Every .py file of this Python's standard library (no tests, no installed packages),
    in sorted path order, so the corpus is the same each time it is built on this install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    paths = sorted(p for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts[:-1]))
    return [p.read_bytes() for p in paths]


def write_shards(rows: np.ndarray, directory: Path):
    directory.mkdir(parents=True)
    row_len = rows.shape[1]
    n_shards = max(1, -(-len(rows) // ROWS_PER_SHARD))
    for s in range(n_shards):
        part = rows[s * ROWS_PER_SHARD:(s + 1) * ROWS_PER_SHARD]
        offsets = pa.array(np.arange(0, part.size + 1, row_len, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1).astype(np.int32)))
        pq.write_table(pa.table({COLUMN: column}), directory / f"{s:05d}-of-{n_shards:05d}.parquet",
                       row_group_size=ROWS_PER_ROW_GROUP)


def prepare_local(seq_len: int, seed: int = 0) -> Path:
    """Build (once) the embedded corpus for rows of seq_len + 1 tokens: train/ and val/ splits
    of Parquet shards in the same format as pretokenized-dolma. Returns its directory."""
    out = CORPUS_ROOT / f"stdlib-bytes-seq{seq_len}-seed{seed}"
    if out.is_dir():
        return out
    # Documents end with EOD and are packed back to back; the partial last row is dropped.
    tokens = np.concatenate([np.append(np.frombuffer(doc, dtype=np.uint8).astype(np.int32), EOD_ID)
                             for doc in stdlib_documents()])
    row_len = seq_len + 1
    rows = tokens[:len(tokens) // row_len * row_len].reshape(-1, row_len)
    # Shuffle rows once, as pretokenized-dolma was, so that file order is a good training order.
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    if len(rows) < 2 * VAL_ROWS:
        raise DataError(f"model.max_seq_len={seq_len} leaves only {len(rows)} rows of the "
                        f"embedded corpus; expected at least {2 * VAL_ROWS}")
    tmp = CORPUS_ROOT / f".{out.name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    write_shards(rows[VAL_ROWS:], tmp / "train")
    write_shards(rows[:VAL_ROWS], tmp / "val")
    try:
        tmp.rename(out)  # atomic: a crash while writing never leaves a half corpus
    except OSError:
        if not out.is_dir():  # another process finished the same (deterministic) corpus first
            raise
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-local", help="build the embedded byte-level corpus")
    prep.add_argument("--seq-len", type=int, default=256, help="model.max_seq_len of the run")
    prep.add_argument("--seed", type=int, default=0, help="data.seed: the row shuffle")
    args = parser.parse_args(argv)
    if args.command == "prepare-local":
        out = prepare_local(args.seq_len, args.seed)
        for split in ("train", "val"):
            shards = ParquetShards(list_shards(out / split), args.seq_len + 1, BYTE_VOCAB_SIZE)
            print(f"{out / split}: {len(shards.files)} shards, {shards.num_rows:,} rows, "
                  f"{shards.num_rows * (args.seq_len + 1):,} tokens")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
