"""Pre-tokenized Parquet shards, read in a fixed order.

The training order is file order (sorted paths), then row order within a file, exactly as
pico-lm/pretokenized-dolma is meant to be read: the rows were shuffled when the dataset was made.
Every row is max_seq_len + 1 token ids in the column `input_ids`.

The sample at global position p = step * global_batch + i is the same for every model size,
world size and accumulation setting, and a run's data position is a function of its step alone.
Of the global batch of G rows, rank r of W holds the contiguous block [r * G/W, (r+1) * G/W)
(`rank_rows`) and splits it into gradient_accumulation_steps micro-batches, in order; so the
ranks' blocks concatenated in rank order are the global batch in data order (how captures gather).

The shards come from a local directory or a dataset repo on the Hugging Face Hub (`HubShards`:
downloaded one at a time, the next in the background, at most a few kept on disk). Also here:
the offline demo's embedded corpus (`python data.py prepare-local`), `python data.py verify
PATH_OR_REPO`, which checks every shard and counts rows and tokens, and the command line of
`python data.py tokenize`, which makes a corpus of shards from text (corpus.py).

Core, on the reading path (README): this opening and rank_rows. The rest is machinery that
serves them: reading shards (local, from the Hub), the evaluation sets, the demo's corpus.
"""

import argparse
import bisect
import contextlib
import fcntl
import itertools
import json
import os
import queue
import re
import sys
import sysconfig
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from huggingface_hub import HfApi, HfFileSystem, constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import silent_tqdm
from huggingface_hub.utils import tqdm as hf_tqdm

from config import ConfigError, load_config

COLUMN = "input_ids"
SOURCE = "source"  # an evaluation set's optional column: evaluation reports a perplexity per source

# The offline corpus: the Python standard library's own source, one byte = one token.
EMBEDDED_CORPUS = "builtin:stdlib-bytes"
EOD_ID = 256  # end of document, after the 256 byte values
BYTE_VOCAB_SIZE = 257
CORPUS_ROOT = Path(__file__).resolve().parent / "corpora"
CORPUS_RECORD = "corpus.json"  # beside a corpus's data/: what made it (corpus.py)
VAL_ROWS = 512
ROWS_PER_SHARD = 8192
ROWS_PER_ROW_GROUP = 1024


class DataError(Exception):
    """Bad data: the message names the file and what was expected."""


def list_shards(directory: Path, key: str = "data.dataset.name") -> list[Path]:
    """The Parquet files of a local directory, in data order; errors name the config key."""
    if not directory.is_dir():
        raise DataError(f"{key}: directory {directory} does not exist; expected a directory of Parquet "
                        f"shards, a Hub dataset repo (namespace/name[@revision]) or {EMBEDDED_CORPUS!r}")
    files = sorted(directory.rglob("*.parquet"))
    if not files:
        raise DataError(f"{key}: {directory} holds no .parquet files")
    return files


def read_footer(name: str, path, filesystem=None) -> pq.FileMetaData:
    """The Parquet footer (row groups, row counts) of a shard, a local path or a path on
    `filesystem` (the Hub), checked to hold the column `input_ids` of lists of integers."""
    try:
        meta = pq.read_metadata(path, filesystem=filesystem)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, OSError) and filesystem is not None:
            raise  # the Hub's (the network, offline mode), for HubShards to report
        raise DataError(f"{name}: not a readable Parquet file ({e})") from None
    if COLUMN not in schema.names:
        raise DataError(f"{name}: no column '{COLUMN}' (has {', '.join(schema.names)}); "
                        f"expected pre-tokenized rows of token ids")
    kind = schema.field(COLUMN).type
    lists = (pa.ListType, pa.LargeListType, pa.FixedSizeListType)
    if not isinstance(kind, lists) or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{name}: column '{COLUMN}' has type {kind}, expected a list of integers")
    return meta


def read_column(name: str, read):
    """read(), columns of a shard or row group; a damaged file is one line naming it."""
    try:
        return read()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{name}: cannot be read ({str(e).splitlines()[0] if str(e) else e}); "
                        f"expected an intact Parquet file") from None


def read_tokens(name: str, column: pa.ChunkedArray, vocab_size: int, min_len: int, max_len: int,
                first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64, concatenated) and row offsets of a column of rows, checked: each row holds
    min_len to max_len tokens, each id is in [0, vocab_size). first_row: its first row's index in its file."""
    column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    if column.null_count or column.flatten().null_count:  # a row, or an id in one, that is null
        null_rows = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        null_ids = pc.list_parent_indices(column).filter(column.flatten().is_null()).to_numpy()
        bad = first_row + int(min(null_rows.tolist() + null_ids.tolist()))
        raise DataError(f"{name}: row {bad} holds a null; expected token ids only")
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    wrong = (lengths < min_len) | (lengths > max_len)
    if wrong.any():
        bad = int(np.argmax(wrong))
        expected = f"{min_len} to " if min_len != max_len else ""
        raise DataError(f"{name}: row {first_row + bad} has {lengths[bad]} tokens, expected "
                        f"{expected}model.max_seq_len + 1 = {max_len}")
    ids = column.flatten().to_numpy().astype(np.int64)
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise DataError(f"{name}: token id {bad} is outside [0, model.vocab_size={vocab_size})")
    return ids, offsets - offsets[0]


class ParquetShards:
    """Random access by global row position over an ordered list of Parquet shards. Only the
    footers are read up front; rows are read and checked one row group at a time, and only the
    current one is kept in memory. row_len None (`data.py verify`): the first row's length holds
    for all. Errors name each file by its path, or by `names` (HubShards: its Hub address)."""

    def __init__(self, files: list[Path], row_len: int | None, vocab_size: int,
                 names: list[str] | None = None, order_seed: int = 0, filesystem=None):
        self.files, self.row_len, self.vocab_size = files, row_len, vocab_size
        self.names = names or [str(path) for path in files]
        self.order_seed = order_seed
        self.filesystem = filesystem  # the Hub's, for HubShards.read_at; None: local files
        self.groups = []  # in data order: (global position of its first row, shard, row group, row in shard)
        self.num_rows = 0
        for f, (path, name) in enumerate(zip(files, self.names)):
            meta = read_footer(name, path, filesystem)
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            firsts = np.cumsum([0] + sizes[:-1]).tolist()  # each group's first row in the shard
            order = self._shuffle(path).permutation(len(sizes)) if order_seed else range(len(sizes))
            for g in order:
                self.groups.append((self.num_rows, f, int(g), firsts[g]))
                self.num_rows += sizes[g]
        self._cached = (None, None)  # (group, its rows)

    def _shuffle(self, path, *group: int) -> np.random.Generator:
        """data.order_seed's generator for a shard (or one of its row groups), keyed by the shard's
        file name rather than its place, so a local copy and the Hub give the same order."""
        return np.random.default_rng([self.order_seed, zlib.crc32(Path(path).name.encode()), *group])

    def _rows(self, group: tuple[int, int, int, int]) -> np.ndarray:
        if self._cached[0] != group:
            _, f, g, row = group  # row: the group's first row's index in its shard, for errors

            def read():
                with contextlib.ExitStack() as files:
                    source = self.files[f] if self.filesystem is None else files.enter_context(
                        self.filesystem.open(self.files[f], "rb"))  # range requests for this group only
                    return pq.ParquetFile(source).read_row_group(g, columns=[COLUMN]).column(0)
            column = read_column(self.names[f], read)
            if self.row_len is None and len(column):
                self.row_len = len(column[0])
            ids, _ = read_tokens(self.names[f], column, self.vocab_size, self.row_len, self.row_len, row)
            ids = ids.reshape(-1, self.row_len)
            if self.order_seed:
                ids = ids[self._shuffle(self.files[f], g).permutation(len(ids))]
            self._cached = (group, ids)
        return self._cached[1]

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) in data order, as int64 [count, row_len]."""
        end = start + count
        if end > self.num_rows:
            raise DataError(f"rows up to {end} requested, the dataset has {self.num_rows}")
        # the row groups from the one holding `start` to the last one starting before `end`
        first = bisect.bisect_right(self.groups, start, key=lambda group: group[0]) - 1
        last = max(bisect.bisect_left(self.groups, end, key=lambda group: group[0]), first + 1)
        return np.concatenate([self._rows(group)[max(start - group[0], 0):end - group[0]]
                               for group in self.groups[first:last]])

    def read_at(self, positions) -> np.ndarray:
        """The rows at scattered positions (the training probe's), as int64 [len(positions), row_len]."""
        return np.stack([self.read(int(p), 1)[0] for p in positions])


def hub_failure(e: Exception) -> str:
    """Why a huggingface_hub request failed, in one line: offline without a cached copy, or the
    root cause at the endpoint (e.g. "ConnectError: ... Connection refused")."""
    if constants.is_offline_mode():
        return f"HF_HUB_OFFLINE=1 and it is not in the cache {constants.HF_HUB_CACHE}"
    while e.__cause__ is not None:
        e = e.__cause__
    return f"at {constants.ENDPOINT}: {e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def without_token(text: str) -> str:
    """text with the Hub token (HF_TOKEN or the stored login) masked, should a server echo it."""
    token = get_token()
    return text.replace(token, "***") if token else text


def hub_repo(name: str) -> tuple[str, str] | None:
    """(repo id, revision) if data.dataset.name names a Hub dataset repo, not a local path:
    namespace/name, optionally @revision (a branch, tag or commit)."""
    match = re.fullmatch(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?", name)
    if match is None or Path(name).exists():
        return None
    return match["repo_id"], match["revision"] or "main"


def hub_request(what: str, call, key: str, repo_id: str, revision: str, local: str):
    """call(), a huggingface_hub request about dataset repo_id@revision, which config key `key`
    named; its errors become one line naming the key, the repo and what failed, never the token,
    and saying what a local copy would be: a directory of `local`."""
    name = repo_id if revision == "main" else f"{repo_id}@{revision}"
    try:
        return call()
    except DataError:
        raise
    except RepositoryNotFoundError:
        message = (f"{key}={name!r}: no local directory of that name, and no dataset repo "
                   f"{repo_id} on {constants.ENDPOINT} (a private or gated repo needs a token: "
                   f"set HF_TOKEN or run `hf auth login`)")
    except RevisionNotFoundError:
        message = f"{key}={name!r}: dataset repo {repo_id} has no revision {revision!r}"
    except Exception as e:
        message = (f"could not {what} of {name} ({hub_failure(e)}); to use a local copy set {key} "
                   f"to a directory of {local}")
    raise DataError(without_token(message)) from None


class HubShards:
    """The Parquet shards of a dataset repo on the Hugging Face Hub, read like ParquetShards.

    Position -> shard: a resumed run must not download the shards before its position, so every
    shard but the last is taken to hold as many rows R as the first (pretokenized-dolma: 20,480):
    position p is row p % R of shard p // R (R: see `_index`). A shard that breaks this is an
    error naming it when it is opened, before any of its rows is used.

    Shards are downloaded with hf_hub_download into the Hugging Face cache (so HF_HUB_OFFLINE=1
    reads them from there) when first needed, the next max_cached_shards - 1 in background threads.
    At most max_cached_shards of this repo's shards stay on disk; older ones are deleted (never
    offline, where the cache is the only copy). So two runs that share a cache and read the same
    dataset at different positions delete each other's shards: give them separate HF_HUB_CACHE.

    shared: one torchrun job's processes share their node's cache, each a few steps ahead of or
    behind the others, so each also keeps the shard before its own and the one after those it
    keeps, which another may be reading or have just downloaded: max_cached_shards + 2 per node.
    """

    def __init__(self, repo_id: str, revision: str, row_len: int | None, vocab_size: int,
                 max_cached_shards: int = 2, key: str = "data.dataset.name", shared: bool = False,
                 order_seed: int = 0, split: str | None = None):
        self.key = key  # the config key that named the repo, for error messages
        self.repo_id, self.revision, self.row_len, self.vocab_size = repo_id, revision, row_len, vocab_size
        self.max_cached_shards, self.shared = max_cached_shards, shared
        self.name = repo_id if revision == "main" else f"{repo_id}@{revision}"
        self.sha = self._hub(f"look up revision {revision}", lambda: HfApi().resolve_revision(
            repo_id, repo_type="dataset", revision=revision,
            local_files_only=constants.is_offline_mode()).resolved)
        storage = Path(constants.HF_HUB_CACHE).expanduser().resolve() / repo_folder_name(
            repo_id=repo_id, repo_type="dataset")
        self.snapshot = storage / "snapshots" / self.sha  # where hf_hub_download puts the files
        self.own_files = storage / "pico-shards"  # this reader's: the commit's index, probe rows
        files, self.rows_per_shard = self._index(self.own_files / f"{self.sha}.json", split)
        self.files = shard_order(files, order_seed)
        self.first_file, self.order_seed = files[0], order_seed  # R was read from the first
        if self.rows_per_shard < 1:
            raise DataError(f"{self.url(self.first_file)}: no rows; expected pre-tokenized rows")
        self.num_rows = self.rows_per_shard * len(self.files)  # until the last shard is opened
        self._order = {f: k for k, f in enumerate(self.files)}
        self._fetches: dict[int, threading.Thread] = {}  # shard -> its download
        self._current = (None, None)  # (shard index, ParquetShards)
        self._lock = threading.Lock()

    def url(self, file: str) -> str:
        return f"hf://datasets/{self.name}/{file}"

    def _hub(self, what: str, call):
        return hub_request(what, call, self.key, self.repo_id, self.revision, "Parquet shards")

    def _index(self, path: Path, split: str | None) -> tuple[list[str], int]:
        """The commit's shards (of `split`, split_files, unless None) and R (the first one's row count),
        from an index cached at `path` for good (a commit never changes), also offline: the listing
        and the row counts of the first shards asked for. HfFileSystem's listing caches the sizes,
        so pyarrow reads a footer by HTTP range requests (64 KB), with no download."""
        index = {}
        with contextlib.suppress(OSError, ValueError):
            index = json.loads(path.read_text())
        rows = index.setdefault("rows", {})
        if "rows_per_shard" in index:  # an index written before splits were read: its first shard's
            rows.setdefault(index["files"][0], index.pop("rows_per_shard"))
        fs = HfFileSystem(skip_instance_cache=True, block_size=1 << 16)  # cached ones keep old listings
        root = f"datasets/{self.repo_id}@{self.sha}"
        if "files" not in index:
            listing = self._hub("list the files", lambda: fs.find(root))
            index["files"] = sorted(name[len(root) + 1:] for name in listing if name.endswith(".parquet"))
        if not index["files"]:
            raise DataError(f"{self.key}={self.name!r}: dataset repo {self.name} holds no "
                            f".parquet files; expected pre-tokenized Parquet shards")
        files = index["files"] if split is None else split_files(index["files"], split, name=self.name)
        if files[0] not in rows:
            meta = self._hub(f"read the footer of {files[0]}",
                             lambda: read_footer(self.url(files[0]), f"{root}/{files[0]}", fs))
            rows[files[0]] = meta.num_rows
            with contextlib.suppress(OSError):  # a read-only cache: the listing is asked for again next time
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(index))
                tmp.replace(path)
        return files, rows[files[0]]

    def _download(self, k: int) -> Path:
        return Path(self._hub(f"download {self.files[k]}", lambda: hf_hub_download(
            self.repo_id, self.files[k], repo_type="dataset", revision=self.sha, tqdm_class=silent_tqdm)))

    def _prefetch(self, k: int):
        if k < len(self.files) and k not in self._fetches:
            self._fetches[k] = threading.Thread(target=self._fetch, args=(k,), daemon=True,
                                                name=f"prefetch {self.files[k]}")
            self._fetches[k].start()

    def _fetch(self, k: int):
        with contextlib.suppress(DataError):  # shard() downloads it again, and reports the error
            self._download(k)

    def _evict(self, window: range):
        """Delete this repo's shards from the cache but the window and, while fewer than
        max_cached_shards, those nearest to it (so a bound above the number of shards keeps all)."""
        if constants.is_offline_mode():
            return  # nothing was downloaded, and the cache is the only copy
        for k in [k for k in self._fetches if k not in window]:  # left behind by a jump back
            self._fetches.pop(k).join()
        cached = ((self._order.get(path.relative_to(self.snapshot).as_posix()), path)
                  for path in self.snapshot.rglob("*.parquet"))
        others = {k: path for k, path in cached if k is not None and k not in window}
        nearest = sorted(others, key=lambda k: abs(k - window.start))
        for k in nearest[max(self.max_cached_shards - len(window), 0):]:
            blob = others[k].resolve()  # the snapshot entry links to the blob holding the bytes
            others[k].unlink()
            blob.unlink(missing_ok=True)

    def shard(self, k: int) -> ParquetShards:
        """Shard k, downloaded if needed and checked; the next ones start downloading."""
        if self._current[0] == k:
            return self._current[1]
        self._current = (None, None)  # its file may be deleted now
        window = range(k, min(k + self.max_cached_shards, len(self.files)))
        # before downloading: the bound holds at every moment
        self._evict(range(max(k - 1, 0), min(window.stop + 1, len(self.files))) if self.shared else window)
        self._prefetch(k)
        self._fetches.pop(k).join()
        path = self._download(k)  # from the cache, no request; a failed prefetch gets a second chance
        for j in window[1:]:
            self._prefetch(j)
        shard = ParquetShards([path], self.row_len, self.vocab_size, names=[self.url(self.files[k])],
                              order_seed=self.order_seed)
        self._current = (k, self._counted(k, shard))
        return shard

    def _counted(self, k: int, shard: ParquetShards) -> ParquetShards:
        """Shard k, once its row count is checked: positions are found assuming every shard but the
        last holds as many rows as the first."""
        rows, expected = shard.num_rows, self.rows_per_shard
        if k == len(self.files) - 1 and rows <= expected:
            self.num_rows = expected * k + rows  # only the last shard may be shorter
        elif rows != expected:
            raise DataError(f"{self.url(self.files[k])}: {rows:,} rows, expected {expected:,} as in "
                            f"{self.first_file}: data from the Hub is read assuming every shard but "
                            f"the last holds as many rows as the first; download the dataset and "
                            f"set data.dataset.name to its directory")
        return shard

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) in data order, as int64 [count, row_len]."""
        end, pieces = start + count, []
        with self._lock:
            while start < end:
                k, row = divmod(start, self.rows_per_shard)
                shard = self.shard(k) if end <= self.num_rows else None  # the last may be shorter
                if shard is None or row >= shard.num_rows:
                    raise DataError(f"rows up to {end} requested, {self.name} has {self.num_rows}")
                pieces.append(shard.read(row, min(end - start, shard.num_rows - row)))
                start += len(pieces[-1])
        return np.concatenate(pieces)

    def read_at(self, positions) -> np.ndarray:
        """The rows at scattered positions (the training probe's) without downloading their shards:
        each row's row group alone, by HTTP range requests, so the cache of whole shards stays the
        training stream's. Kept in the cache with their positions, where the node's other
        processes, a resumed run and the suite's other sizes (the same positions) find them; the
        first process reads them while the others wait on a lock. Offline and not there: from the
        cached shards."""
        positions = np.asarray(positions, dtype=np.int64)
        path = self.own_files / f"{self.sha}-order-{self.order_seed}-rows-{zlib.crc32(positions):08x}.npz"
        with contextlib.ExitStack() as held:
            with contextlib.suppress(OSError):  # a read-only cache: every process reads them
                path.parent.mkdir(parents=True, exist_ok=True)
                fcntl.flock(held.enter_context(open(path.with_suffix(".lock"), "w")), fcntl.LOCK_EX)
            with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as saved:
                rows = saved["rows"]
                if (np.array_equal(saved["positions"], positions) and rows.shape == (len(positions),
                        self.row_len) and rows.min() >= 0 and rows.max() < self.vocab_size):
                    return rows  # else read again, and checked
            rows = self._read_at(positions)
            with contextlib.suppress(OSError):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.savez(f, positions=positions, rows=rows)
                tmp.replace(path)
            return rows

    def _read_at(self, positions) -> np.ndarray:
        if constants.is_offline_mode():
            return np.stack([self.read(int(p), 1)[0] for p in positions])
        fs = HfFileSystem(skip_instance_cache=True, block_size=1 << 16)
        root, shards, rows = f"datasets/{self.repo_id}@{self.sha}", {}, []
        for p in map(int, positions):
            k, row = divmod(p, self.rows_per_shard)
            if k >= len(self.files):
                raise DataError(f"row {p} requested, {self.name} has {self.num_rows}")
            if k not in shards:
                path, name = f"{root}/{self.files[k]}", self.url(self.files[k])
                shard = self._hub(f"read the footer of {self.files[k]}", lambda: ParquetShards(
                    [path], self.row_len, self.vocab_size, [name], self.order_seed, filesystem=fs))
                shards[k] = self._counted(k, shard)
            rows.append(shards[k].read(row, 1)[0])
        return np.stack(rows)


def probe_positions(n: int, run_rows: int) -> np.ndarray:
    """The training probe: n positions spread evenly over the rows a run trains on (the middle row
    of each of n equal parts), the same for every model size, world size and accumulation."""
    return (2 * np.arange(n, dtype=np.int64) + 1) * run_rows // (2 * n)


def rank_rows(step: int, global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first global position, number of rows) that this rank trains on at `step`."""
    per_rank = global_batch // world_size
    return step * global_batch + rank * per_rank, per_rank


class BatchStream:
    """This rank's rows of each step from start_step on, read ahead in a background thread so
    the accelerator never waits on Parquet decoding. At most `prefetch` steps are held."""

    def __init__(self, shards: ParquetShards, global_batch: int, world_size: int, rank: int,
                 start_step: int, end_step: int, pin_memory: bool = False, prefetch: int = 2,
                 timeout: float = 30.0):
        self.shards, self.pin_memory, self.timeout = shards, pin_memory, timeout
        self.args = (global_batch, world_size, rank)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # The first batch is read in the caller's thread: a bad shard is reported before any compute.
        # (A run resumed at its end only evaluates: it reads none, so a dataset of exactly the
        # run's rows has no row too few.)
        if start_step < end_step:
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
            while not self.stop.is_set():  # wait for room, unless stopped
                with contextlib.suppress(queue.Full):
                    self.queue.put(item, timeout=0.1)
                    break
            failed = isinstance(item, Exception)
            # Once handed over, the batch is the loop's: were this thread to hold its last
            # reference, the tensor would be freed here, and a thread that frees a tensor while
            # the interpreter shuts down aborts the process (close() says how).
            del item
            if self.stop.is_set() or failed:
                return

    def peek(self) -> torch.Tensor:
        """The next step's rows, left in place: at the start, the first step's (read in __init__)."""
        with self.queue.mutex:
            return self.queue.queue[0]

    def __next__(self) -> torch.Tensor:
        return self.get()

    def get(self, until=lambda: False, timeout: float | None = None) -> torch.Tensor | None:
        """The next step's rows, once they are there; else None as soon as until() holds (a stop
        signal), checked every second, so waiting on a slow Hub never keeps a run from stopping.
        Rows already read are always handed over, so the first step always gets its batch. A
        reader that hands over nothing for `timeout` seconds (data.dataset.read_timeout) is stuck:
        an error, not a hang."""
        timeout = self.timeout if timeout is None else timeout
        for _ in range(max(1, int(timeout))):
            with contextlib.suppress(queue.Empty):
                item = self.queue.get(timeout=1.0)
                if isinstance(item, Exception):
                    raise item
                return item
            if until():
                return None
        source = getattr(self.shards, "name", None) or Path(self.shards.files[0]).parent
        raise DataError(f"{source}: no rows for the next step after {timeout:g} s (data.dataset."
                        f"read_timeout): the reader is stuck, on a Hub that stopped answering?; "
                        f"re-run the same command to resume")

    def close(self, timeout: float = 5.0):
        """Stop the reader and wait for it (a read in flight ends within `timeout` seconds; one
        stuck on the network is left behind). A daemon thread still running as the interpreter
        shuts down is ended by pthread_exit wherever it next takes the GIL; inside a C++
        destructor (a batch's tensor, freed at the end of _run) that aborts the whole process
        with "terminate called without an active exception", turning a stop signal's exit 0 into
        134."""
        self.stop.set()
        self.thread.join(timeout)


def shard_order(files: list, order_seed: int) -> list:
    """The shards in data.order_seed's order. 0: file order. Another seed permutes every shard but
    the last, the one that may be shorter, so a position still finds its shard by division
    (HubShards); ParquetShards then permutes each shard's row groups, and the rows of each group.
    A batch's rows stay within a row group or two, so the shards are still read one after
    another, and the rows are those of the dataset's order, each once per epoch."""
    if not order_seed:
        return files
    shuffled = np.random.default_rng([order_seed, len(files)]).permutation(len(files) - 1)
    return [files[i] for i in shuffled] + files[-1:]


def open_dataset(name: str, row_len: int, vocab_size: int, seed: int = 0, max_cached_shards: int = 2,
                 shared: bool = False, order_seed: int = 0,
                 key: str = "data.dataset.name") -> ParquetShards | HubShards:
    """The training shards named by data.dataset.name: a local directory, a Hub dataset repo
    (namespace/name[@revision]) or the embedded corpus; shared: HubShards read by one job's processes;
    key: the config key that named them, for errors."""
    if repo := hub_repo(name):
        return HubShards(*repo, row_len, vocab_size, max_cached_shards, key, shared, order_seed, split="train")
    directory = prepare_local(row_len - 1, seed) if name == EMBEDDED_CORPUS else Path(name)
    check_vocabulary(directory, vocab_size)
    files = split_files(list_shards(directory, key), "train", directory, f"{key}={name!r}")
    return ParquetShards(shard_order(files, order_seed), row_len, vocab_size, order_seed=order_seed)


def corpus_record(directory: Path) -> dict | None:
    """The record of a corpus made by `data.py tokenize` (corpus.json, in the directory or the one
    above its data/), if it has one: what made its ids."""
    for path in (directory / CORPUS_RECORD, directory.parent / CORPUS_RECORD):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if isinstance(record, dict) and isinstance(record.get("tokenizer"), dict):
                return {**record, "path": str(path)}
    return None


def check_vocabulary(directory: Path, vocab_size: int):
    """A tokenizer whose ids reach model.vocab_size is refused before any row is read, naming it,
    where the corpus has a record. (Each row read is checked too, naming only its shard.)"""
    record = corpus_record(directory)
    if record and record["tokenizer"].get("vocab_size", 0) > vocab_size:
        tokenizer = record["tokenizer"]
        raise DataError(f"model.vocab_size={vocab_size}: the corpus {directory} was tokenized with "
                        f"{tokenizer.get('name')!r} ({record['path']}), whose ids go up to "
                        f"{tokenizer['vocab_size'] - 1}; expected model.vocab_size >= {tokenizer['vocab_size']}")


def training_rows(config, shared: bool = False) -> "ParquetShards | HubShards | Spliced":
    """The rows a run trains on, by global position: data.dataset's, in data.order_seed's order. A
    branch (checkpointing.training.branch_from) trains on its own data from its step N on, and on its
    parent's before: each branch point of its lineage's data_before (the parent's own branch points
    first) splices that data in before it, so the probe and `data.py batch` find the rows trained on."""
    d, row_len = config.data, config.model.max_seq_len + 1

    def opened(name: str, seed: int, order_seed: int, key: str = "data.dataset.name"):
        return open_dataset(name, row_len, config.model.vocab_size, seed, d.dataset.max_cached_shards, shared,
                            order_seed, key)
    rows = opened(d.dataset.name, d.seed, d.order_seed)
    earlier = (config.checkpointing.training.lineage or {}).get("data_before", [])
    for i, was in reversed(list(enumerate(earlier))):
        key = f"checkpointing.training.lineage.data_before[{i}].name"
        rows = Spliced(opened(was["name"], was["seed"], was["order_seed"], key), rows,
                       was["until_step"] * d.dataloader.batch_size)
    return rows


class Spliced:
    """The rows of `before` at the positions below `at`, and those of `after` from `at` on, each at
    its own position: a branch's data (training_rows) that changed at its step."""

    def __init__(self, before, after, at: int):
        self.before, self.after, self.at = before, after, at

    @property
    def files(self) -> list:
        return self.after.files

    @property
    def num_rows(self) -> int:  # a HubShards' grows when its last shard is opened
        return self.after.num_rows

    @property
    def name(self) -> str | None:  # a HubShards' repo, for BatchStream's errors
        return getattr(self.after, "name", None)

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count), as int64 [count, row_len]."""
        split = min(max(self.at - start, 0), count)  # how many come before `at`
        pieces = [self.before.read(start, split)] if split else []
        return np.concatenate(pieces + ([self.after.read(start + split, count - split)] if split < count else []))

    def read_at(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        early = positions < self.at
        parts = [(mask, source.read_at(positions[mask])) for mask, source in ((early, self.before),
                                                                              (~early, self.after)) if mask.any()]
        rows = np.empty((len(positions), parts[0][1].shape[1]), dtype=np.int64)
        for mask, part in parts:
            rows[mask] = part
        return rows


def read_rows(path: Path, max_row_len: int, vocab_size: int, name: str | None = None) -> tuple:
    """Every row of one shard whose rows may differ in length (an evaluation set), checked, and
    each row's `source` where the shard has that column (Paloma's: the corpus a row comes from),
    else None. Errors name the file by `name` (a Hub address) or its path."""
    name = name or str(path)
    columns = [COLUMN] + ([SOURCE] if SOURCE in read_footer(name, path).schema.names else [])
    table = read_column(name, lambda: pq.read_table(path, columns=columns))
    ids, bounds = read_tokens(name, table[COLUMN], vocab_size, 2, max_row_len)
    sources = [str(source) for source in table[SOURCE].to_pylist()] if SOURCE in columns else None
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])], sources


class EvalRows(list):
    """An evaluation set's rows, with `sources`: each row's source, or None where a shard has none."""

    def __init__(self, parts: list[tuple[list, list | None]]):
        super().__init__(row for rows, _ in parts for row in rows)
        known = parts and all(sources is not None for _, sources in parts)
        self.sources = [s for _, sources in parts for s in sources] if known else None

    def first(self, n: int | None) -> "EvalRows":
        """The first n rows, with their sources; all of them for None."""
        if n is None or n >= len(self):
            return self
        return EvalRows([(self[:n], None if self.sources is None else self.sources[:n])])


def collate(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of rows that may differ in length: row[:-1] and row[1:], padded at the
    end (input 0, label -100), where causal attention keeps padding out of the real tokens."""
    width = max(len(row) for row in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row)
        inputs[i, :len(row) - 1], labels[i, :len(row) - 1] = row[:-1], row[1:]
    return inputs, labels


SPLITS = ("train", "val", "validation", "test", "dev")


def split_files(files: list, split: str, root: Path | None = None, name: str = "") -> list:
    """The files of `split` where a dataset names its splits (pico-lm's repos and `data.py tokenize`:
    data/train-*.parquet beside data/val-*.parquet; or folders train/ and val/), else all of them:
    training reads a corpus's train split only, evaluation its val split. Local files are named
    relative to `root`; errors name the dataset by `name`."""
    names = [Path(f).relative_to(root).as_posix() if root else f for f in files]
    picked = [f for f, named in zip(files, names) if in_split(named, split)]
    if not picked and any(in_split(named, other) for named in names for other in SPLITS):
        raise DataError(f"{name or root}: no files of split {split!r} ({split}-*.parquet or a folder "
                        f"{split}/) among {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return picked or files


def in_split(file: str, split: str) -> bool:
    """Whether a repo file belongs to `split`: a folder of that name, or a file name that starts
    with it (pico-lm's "data/val-00000-of-00001.parquet")."""
    parts = Path(file).parts
    return split in parts[:-1] or re.match(rf"{re.escape(split)}[-_.]", parts[-1]) is not None


class QuietTqdm(hf_tqdm):
    """huggingface_hub's progress bar, switched off: a run's output is its log."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


def hub_parquet_files(name: str, split: str | None, key: str) -> list[tuple[str, Path]]:
    """The .parquet files of a Hub dataset repo (namespace/name[@revision]), of `split` only
    (in_split) unless it is None, downloaded into the Hugging Face cache (so HF_HUB_OFFLINE=1 reads
    them there): [(its hf:// address, for errors; its local path)] in path order. For a dataset of
    other columns than pre-tokenized rows (evaluation.tasks); errors name the key and the repo."""
    repo_id, revision = hub_repo(name)
    # snapshot_download's patterns are fnmatch's, where * also crosses "/": in_split picks exactly
    patterns = ["*.parquet"] if split is None else [f"*{split}/*.parquet", f"{split}[-_.]*.parquet",
                                                    f"*/{split}[-_.]*.parquet"]
    folder = Path(hub_request("download the Parquet files", lambda: snapshot_download(
        repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns, tqdm_class=QuietTqdm),
        key, repo_id, revision, "Parquet files"))
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.parquet"))
    picked = [file for file in files if split is None or in_split(file, split)]
    if not picked:
        of_split = "" if split is None else f" of split {split!r} (a folder {split}/ or files named {split}-*)"
        raise DataError(f"{key}={name!r}: dataset repo {repo_id} holds no .parquet files{of_split}")
    return [(f"hf://datasets/{name}/{file}", folder / file) for file in picked]


def load_eval_set(name: str, split: str, max_row_len: int, vocab_size: int, seed: int = 0,
                  key: str = "evaluation.paloma.dataset_name"):
    """The fixed evaluation sequences: the embedded corpus's validation split, the `split` files of a
    Hub dataset repo (pico-lm/pretokenized-paloma-tinsy), or of a local directory (split_files: else
    all of its files). Rows of up to max_seq_len + 1 tokens, held in memory (a small set)."""
    if name == EMBEDDED_CORPUS:
        name, split = str(prepare_local(max_row_len - 1, seed)), "val"  # whatever split was asked for
    if repo := hub_repo(name):
        hub = HubShards(*repo, None, vocab_size, key=key)
        picked = [k for k, f in enumerate(hub.files) if not split or in_split(f, split)]
        if not picked:
            raise DataError(f"{key}: dataset repo {hub.name} has no split {split!r}: "
                            f"no .parquet files of it (files: {', '.join(hub.files[:5])})")
        return EvalRows([read_rows(hub._download(k), max_row_len, vocab_size, hub.url(hub.files[k]))
                         for k in picked])
    files = split_files(list_shards(Path(name), key), split, Path(name), f"{key}={name!r}")
    return EvalRows([read_rows(path, max_row_len, vocab_size) for path in files])


class EvalSets:
    """The fixed evaluation sets a run reads at start (load_eval_set), each once however many use
    it: Paloma's and the val captures' are the same set by default."""

    def __init__(self, max_row_len: int, vocab_size: int, seed: int = 0):
        self.args, self.read_sets = (max_row_len, vocab_size, seed), {}

    def read(self, name: str, split: str, key: str) -> EvalRows:
        """The rows of `split` of `name`; key: the config key that named it, for errors."""
        if (name, split) not in self.read_sets:
            self.read_sets[name, split] = load_eval_set(name, split, *self.args, key=key)
        return self.read_sets[name, split]


# The shards' format, and the embedded corpus: the offline demo's data --------------------------

def shard_table(rows: np.ndarray) -> pa.Table:
    """Rows [n, row_len] of ids as a table of pico's shards: the column input_ids, lists of int32."""
    offsets = pa.array(np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32))
    return pa.table({COLUMN: pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1).astype(np.int32)))})


def write_shards(rows: np.ndarray, directory: Path):
    """Rows [n, row_len] as shards XXXXX-of-YYYYY.parquet of ROWS_PER_SHARD rows in a new directory
    (a dataset of rows made in memory, as tests make them)."""
    directory.mkdir(parents=True)
    n_shards = max(1, -(-len(rows) // ROWS_PER_SHARD))
    for s in range(n_shards):
        pq.write_table(shard_table(rows[s * ROWS_PER_SHARD:(s + 1) * ROWS_PER_SHARD]),
                       directory / f"{s:05d}-of-{n_shards:05d}.parquet", row_group_size=ROWS_PER_ROW_GROUP)


def prepare_local(seq_len: int, seed: int = 0) -> Path:
    """Build (once) the embedded corpus for rows of seq_len + 1 tokens, as `data.py tokenize` builds
    a corpus (corpus.py): every .py file of this Python's standard library (no tests, no installed
    packages), one document each, in sorted path order, so the corpus is the same each time it is
    built on this install; the byte tokenizer; its val split VAL_ROWS rows. Returns its directory."""
    import corpus  # which builds on this module

    out = CORPUS_ROOT / "stdlib-bytes" / f"seq{seq_len}-seed{seed}"
    if out.is_dir():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    paths = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    stdlib = corpus.CorpusInput(f"{root}: its .py files, no tests or installed packages", paths, root)
    try:
        corpus.build_corpus([stdlib], corpus.text_tokenizer("bytes"), seq_len, out, seed, held_out_rows=VAL_ROWS,
                            show=False, key="model.max_seq_len")
    except (DataError, OSError):
        if not (out / CORPUS_RECORD).is_file():
            raise
        # else another process of a torchrun job finished the same (deterministic) corpus first
    return out


def byte_text(ids) -> str:
    """Text of byte-level token ids, the end-of-document id shown as <eod>."""
    runs = itertools.groupby((int(i) for i in ids), key=lambda i: i == EOD_ID)
    return "".join("<eod>" * len(list(run)) if eod else bytes(run).decode("utf-8", errors="replace")
                   for eod, run in runs)


# What AutoTokenizer.from_pretrained reads from a directory, whichever of them a tokenizer has.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt"]


def tokenizer_files(name: str, max_seq_len: int) -> dict[str, bytes]:
    """The files of data.tokenizer.name, so that every checkpoint loads with AutoTokenizer:
    tokenizer_source's; for "bytes", made here."""
    if name == "bytes":
        return byte_tokenizer(max_seq_len)
    return tokenizer_source(name)[0]


def tokenizer_source(name: str, key: str = "data.tokenizer.name") -> tuple[dict[str, bytes], str | None]:
    """The files of a tokenizer (TOKENIZER_FILES) and its revision: a local tokenizer.json (with
    the tokenizer_config.json beside it, if any) or a folder of them (revision None), or a Hub
    model repo's (namespace/name[@revision], its commit), downloaded once into the Hugging Face
    cache (so HF_HUB_OFFLINE=1 reads them there)."""
    path, revision = Path(name), None
    if path.is_file():
        files = {"tokenizer.json": path.read_bytes()}
        if (path.parent / "tokenizer_config.json").is_file():
            files["tokenizer_config.json"] = (path.parent / "tokenizer_config.json").read_bytes()
        return files, None
    if path.is_dir():
        folder = path
    else:
        repo_id, _, revision = name.partition("@")
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=TOKENIZER_FILES))
        except Exception as e:
            raise DataError(f"{key}={name!r}: {without_token(hub_failure(e))}") from None
        revision = folder.name  # the snapshot of a commit
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.name in TOKENIZER_FILES}
    if not files:
        raise DataError(f"{key}={name!r}: has none of {', '.join(TOKENIZER_FILES)}")
    return files, revision


def byte_tokenizer(max_seq_len: int) -> dict[str, bytes]:
    """The embedded corpus's tokenizer for transformers: byte b is id b and <eod> is EOD_ID, so
    text round-trips to the ids of the corpus. A byte-level BPE without merges, the bytes written
    as GPT-2's printable stand-ins (the format of byte-level tokenizers in tokenizer.json)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = {b: chr(b) for b in printable}
    stand_in.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    eod = {"id": EOD_ID, "content": "<eod>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "vocab": {stand_in[b]: b for b in range(256)}, "merges": []}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [eod],
                 "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
                 "decoder": byte_level, "model": model}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eod>",
              "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": json.dumps(tokenizer).encode(),
            "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def row_text(tokenizer: str | None, max_seq_len: int):
    """ids -> text, with the documents' ends shown, where data.tokenizer.name's tokenizer is at hand:
    the byte tokenizer's (byte_text), or a tokenizer.json's with the tokenizers package (its
    end-of-text token as written); else None."""
    if tokenizer == "bytes":
        return byte_text
    try:
        from tokenizers import Tokenizer
        decoder = Tokenizer.from_str(tokenizer_files(tokenizer, max_seq_len)["tokenizer.json"].decode())
    except Exception:  # no tokenizer, none at hand, none of that format: the ids are shown instead
        return None
    return lambda ids: decoder.decode([int(i) for i in ids], skip_special_tokens=False)


def print_batch(config_path: str, overrides: list[str], step: int, out: str | None):
    config = load_config(config_path, overrides)
    seq_len, global_batch = config.model.max_seq_len, config.data.dataloader.batch_size
    start, count = rank_rows(step, global_batch, world_size=1, rank=0)  # one rank: the whole batch
    rows = training_rows(config).read(start, count)
    # the ids' own tokenizer where the corpus records it, else the one the run names
    name = config.data.dataset.name
    record = corpus_record(prepare_local(seq_len, config.data.seed) if name == EMBEDDED_CORPUS else Path(name))
    decode = (record and row_text(record["tokenizer"].get("name"), seq_len)) or row_text(
        config.data.tokenizer.name, seq_len)
    print(f"step {step}: rows {start:,} to {start + count - 1:,} of {config.data.dataset.name}, "
          f"{count} x {seq_len + 1} tokens")
    if out is None:
        for i, row in enumerate(rows):
            shown = repr(decode(row)[:100]) if decode else " ".join(map(str, row[:16])) + " ..."
            print(f"{start + i}: {shown}")
    elif out.endswith(".npy"):
        np.save(out, rows)
    elif out.endswith(".jsonl"):
        with open(out, "w") as f:
            for i, row in enumerate(rows):
                text = {"text": decode(row)} if decode else {}
                f.write(json.dumps({"position": start + i, "input_ids": row.tolist(), **text}) + "\n")
    else:
        raise DataError(f"--out {out}: expected a file name ending in .npy or .jsonl")


def verify(name: str, row_len: int | None = None, vocab_size: int | None = None) -> tuple[int, int]:
    """Read and check every shard of a local directory or Hub dataset repo (schema, row length,
    token ids; for a repo, the shards training reads, with the equal row counts its reading
    assumes), printing the rows and tokens of each. Returns (rows, tokens). row_len None: the
    first row's length."""
    vocab = vocab_size or np.iinfo(np.int64).max  # no vocabulary given: ids need only be >= 0
    hub = HubShards(*repo, row_len, vocab, split="train") if (repo := hub_repo(name)) else None
    files = hub.files if hub else list_shards(Path(name))
    total_rows, max_id = 0, -1
    for k, file in enumerate(files):
        # a repo's shards are downloaded as for training, into the bounded cache
        shard = hub.shard(k) if hub else ParquetShards([file], row_len, vocab)
        max_id = max([max_id] + [int(shard._rows(group).max(initial=-1)) for group in shard.groups])
        row_len = row_len or shard.row_len  # the first shard's row length holds for all
        if hub:
            hub.row_len = row_len
        print(f"{file}: {shard.num_rows:,} rows, {shard.num_rows * (row_len or 0):,} tokens")
        total_rows += shard.num_rows
    tokens = total_rows * (row_len or 0)
    print(f"total: {len(files)} shards, {total_rows:,} rows of {row_len} tokens, {tokens:,} tokens, "
          f"largest token id {max_id}")
    return total_rows, tokens


def main(argv=None):
    import corpus  # `tokenize`'s, which builds on this module

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-local", help="build the embedded byte-level corpus")
    prep.add_argument("--seq-len", type=int, default=256, help="model.max_seq_len of the run")
    prep.add_argument("--seed", type=int, default=0, help="data.seed: the row shuffle")
    batch = sub.add_parser("batch", help="rebuild the global batch the trainer used at a step",
                           description="Computes the batch from the data order alone (no log is "
                           "read). Takes the run's config and its --section.key=value overrides.")
    batch.add_argument("config", help="the run's config file (configs/*.py or pico-train YAML)")
    batch.add_argument("--step", type=int, required=True, help="0-based: the batch that optimizer "
                       "step N+1 trained on, which checkpoint step_N+1 follows")
    batch.add_argument("--out", help="write the token ids: .npy (an array [batch, max_seq_len + 1]) "
                       "or .jsonl (one row per line, with its position, and text for the byte tokenizer)")
    check = sub.add_parser("verify", help="check every shard of a directory or Hub dataset repo, "
                           "count rows and tokens")
    check.add_argument("dataset", help="a directory of Parquet shards or a Hub dataset repo "
                       "(namespace/name[@revision])")
    check.add_argument("--seq-len", type=int, help="model.max_seq_len: rows must hold seq_len + 1 "
                       "tokens (default: the first row's length)")
    check.add_argument("--vocab-size", type=int, help="model.vocab_size: ids must be below it "
                       "(default: only checked to be non-negative)")
    text = sub.add_parser("tokenize", help="text in, a corpus of pre-tokenized shards out (docs/corpus.md)",
                          description="Tokenizes documents, joins them with the end-of-text id, packs them into "
                          "rows of seq_len + 1 ids, holds some documents out, shuffles the rows and writes "
                          "OUT/data/train-*.parquet, OUT/data/val-*.parquet and OUT/corpus.json, the record of "
                          "what made them. Same inputs and settings, same bytes, whatever --workers.")
    text.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="a file or folder of text (a document per file, or per line with --lines); JSONL "
                      "(.jsonl, .json); Parquet; .gz of text or JSONL; or a Hub dataset repo "
                      "(namespace/name[@revision]; offline from the cache with HF_HUB_OFFLINE=1)")
    text.add_argument("--tokenizer", required=True, help="'bytes' (byte b is id b, end-of-text 256), a "
                      "tokenizer.json (or its folder), or a Hub model repo (namespace/name[@revision])")
    text.add_argument("--seq-len", type=int, required=True, help="model.max_seq_len: rows of seq_len + 1 ids")
    text.add_argument("--out", required=True, help="a new or empty folder")
    text.add_argument("--lines", action="store_true", help="a document per line of a text file (blank "
                      "lines are none), not per file")
    text.add_argument("--text-field", default="text", help="JSONL's field, Parquet's column of the text")
    text.add_argument("--hub-files", action="append", metavar="GLOB", help="a Hub repo's files to read, "
                      f"once per pattern (default: {' '.join(corpus.HUB_TEXT_FILES)})")
    text.add_argument("--eod", help="the end-of-text token or id (default: the tokenizer's eos_token, else "
                      f"{' or '.join(corpus.END_OF_TEXT_TOKENS)})")
    text.add_argument("--val-fraction", type=float, default=0.01,
                      help="the share of documents held out in val-*, chosen by --seed (default 0.01)")
    text.add_argument("--seed", type=int, default=0, help="the held-out documents and the row shuffle")
    text.add_argument("--no-shuffle", action="store_true", help="rows in input order (a curriculum)")
    text.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(
                      os, "sched_getaffinity") else os.cpu_count(), help="processes that run a tokenizer.json "
                      "(default: every core; the byte tokenizer needs none)")
    text.add_argument("--push-to", metavar="REPO", help="then upload the corpus to this Hub dataset repo")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "tokenize" and not 0 <= args.val_fraction <= 1:
        parser.error(f"--val-fraction {args.val_fraction}: expected a share between 0 and 1")
    for flag, low in (("step", 0), ("seed", 0), ("seq_len", 1), ("vocab_size", 1), ("workers", 1)):
        if getattr(args, flag, None) is not None and getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a "
                         f"{'non-negative' if low == 0 else 'positive'} integer")
    if args.command == "batch":
        print_batch(args.config, overrides, args.step, args.out)
    elif overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.command == "prepare-local":
        verify(str(prepare_local(args.seq_len, args.seed)), args.seq_len + 1, BYTE_VOCAB_SIZE)
    if args.command == "tokenize":
        corpus.tokenize(args)
    if args.command == "verify":
        verify(args.dataset, args.seq_len + 1 if args.seq_len else None, args.vocab_size)


if __name__ == "__main__":
    # As the module `data` that corpus.py imports, not as this script's second copy of it: so that
    # the DataError it raises is the one caught here.
    import data

    try:
        data.main()
    except (data.DataError, ConfigError) as e:
        sys.exit(f"error: {e}")
