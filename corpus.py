"""Your own corpus: text in, pico's pre-tokenized Parquet shards out (`python data.py tokenize`).

data.py reads shards in the training order; this module makes them, once, before training, from
files or folders of text, JSONL, Parquet or a Hub dataset repo (docs/corpus.md). The embedded
corpus of the offline demo is made here too (data.prepare_local).

The rules are pico-train's, as pico-lm/pico-dataset made pretokenized-dolma: each document's ids
(the tokenizer's encoding, with its own special tokens: none for OLMo's) are followed by the
end-of-text id; a split's documents are packed back to back into rows of seq_len + 1 ids, the
partial last row dropped; the rows are shuffled once, so that file order is a good training
order. Beyond it: a held-out split chosen by document (`held_out`), and a record of what made the
corpus (data.CORPUS_RECORD). Three passes, in memory that does not grow with the input:
  check: every input is read once, hashed and checked (UTF-8, JSON, the text column), so that a
    bad input is an error before anything is written;
  pack: documents are tokenized in chunks of about CHUNK_CHARS characters (by a tokenizer.json in
    worker processes, at most 2 chunks each in flight, taken back in input order) and each split's
    rows are appended to a temporary file of raw ids (RowFile);
  write: each split's rows, in the order of a seeded permutation, are read back one row group at a
    time and written as Parquet shards.
The result depends on neither the number of workers nor the size of the chunks. Memory: the
chunks in flight (workers x 2 x CHUNK_CHARS of text and their ids), one row group, and the
permutation (8 bytes a row); and a whole document when a tokenizer.json encodes it (the byte
tokenizer reads a long one in pieces). Disk: the temporary rows, 4 bytes a token.

Machinery, off the reading path: it serves data.py, whose shards it makes.
"""

import codecs
import collections
import concurrent.futures
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

import data

CHUNK_CHARS = 1 << 18  # a worker's share of work: small enough that all are busy to the end
HUB_TEXT_FILES = ["*.txt", "*.txt.gz", "*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.parquet"]
END_OF_TEXT_TOKENS = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]  # GPT-2's and OLMo's, Llama's...


@dataclasses.dataclass
class CorpusInput:
    """An input as named (a file, a folder, a Hub dataset repo) and its files, in reading order."""
    name: str
    files: list[Path]
    root: Path | None = None  # a folder's (or Hub snapshot's) path: its files are named relative to it
    revision: str | None = None  # a Hub repo's commit


@dataclasses.dataclass
class TextTokenizer:
    """What turns text into ids: the byte tokenizer (json None) or a tokenizer.json."""
    name: str
    eod_id: int
    vocab_size: int  # every id it gives is below it
    json: str | None = None
    revision: str | None = None  # a Hub repo's commit, or the tokenizer.json's sha256

    def record(self) -> dict:
        return {"name": self.name, "revision": self.revision, "eod_id": self.eod_id, "vocab_size": self.vocab_size}


def text_tokenizer(name: str, eod: str | None = None) -> TextTokenizer:
    """--tokenizer: "bytes", a tokenizer.json (or a folder holding one), or a Hub model repo
    (namespace/name[@revision]). The end-of-text id: --eod (a token or an id), else the eos_token
    of its tokenizer_config.json (pico-train's data: OLMo's <|endoftext|>, 50279), else the first
    of END_OF_TEXT_TOKENS it has."""
    if name == "bytes":
        if eod is not None and eod != str(data.EOD_ID):
            raise data.DataError(f"--eod {eod}: the byte tokenizer's end-of-text id is {data.EOD_ID}")
        return TextTokenizer("bytes", data.EOD_ID, data.BYTE_VOCAB_SIZE)
    files, revision = data.tokenizer_source(name, key="--tokenizer")
    if "tokenizer.json" not in files:
        raise data.DataError(f"--tokenizer {name}: has no tokenizer.json; expected 'bytes', a tokenizer.json "
                             f"or a Hub model repo that has one")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise data.DataError(f"--tokenizer {name}: needs the tokenizers package (pip install tokenizers); "
                             f"the byte tokenizer needs none") from None
    text = files["tokenizer.json"].decode()
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:
        raise data.DataError(f"--tokenizer {name}: its tokenizer.json cannot be read ({e})") from None
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if eod is not None:
        eod_id = int(eod) if eod.isdigit() else tokenizer.token_to_id(eod)
        if eod_id is None or eod_id >= vocab_size:
            raise data.DataError(f"--eod {eod}: not a token of {name}, nor an id below its {vocab_size}")
    else:
        eos = json.loads(files.get("tokenizer_config.json", b"{}")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        ids = [tokenizer.token_to_id(token) for token in [eos, *END_OF_TEXT_TOKENS] if token]
        eod_id = next((i for i in ids if i is not None), None)
        if eod_id is None:
            raise data.DataError(f"--tokenizer {name}: names no end-of-text token (no eos_token in a "
                                 f"tokenizer_config.json, none of {', '.join(END_OF_TEXT_TOKENS)}); give one "
                                 f"with --eod")
    revision = revision or hashlib.sha256(files["tokenizer.json"]).hexdigest()
    return TextTokenizer(name, eod_id, vocab_size, text, revision)


def corpus_inputs(names: list[str], hub_files: list[str] | None = None) -> list[CorpusInput]:
    """Each INPUT: a file; a folder (its files, hidden ones left out, in path order); or a Hub
    dataset repo (namespace/name[@revision]), its files matching hub_files (default HUB_TEXT_FILES)
    downloaded into the Hugging Face cache, where HF_HUB_OFFLINE=1 reads them."""
    inputs = []
    for name in names:
        path = Path(name)
        if path.is_file():
            inputs.append(CorpusInput(name, [path]))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise data.DataError(f"{name}: an empty folder; expected files of text, JSONL or Parquet")
            inputs.append(CorpusInput(name, files, path))
        elif repo := data.hub_repo(name):
            repo_id, revision = repo
            patterns = hub_files or HUB_TEXT_FILES
            folder = Path(data.hub_request("download the files", lambda: snapshot_download(
                repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns,
                tqdm_class=data.QuietTqdm), "INPUT", repo_id, revision, "text files"))
            # offline, the snapshot may also hold files of other patterns: fnmatch's, where * crosses "/"
            files = sorted(p for p in folder.rglob("*") if p.is_file() and any(
                fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern) for pattern in patterns))
            if not files:
                raise data.DataError(f"{name}: dataset repo {repo_id} holds no files matching "
                                     f"{' '.join(patterns)}; expected text, JSONL or Parquet (--hub-files)")
            inputs.append(CorpusInput(name, files, folder, folder.name))
        else:
            raise data.DataError(f"{name}: no such file or folder, nor a Hub dataset repo (namespace/name[@revision])")
    return inputs


def file_kind(path: Path) -> str:
    """How a file is read, by its name: "parquet", "jsonl" (.jsonl or .json), else "text";
    a .gz through gzip."""
    suffixes = [suffix.lower() for suffix in path.suffixes if suffix.lower() != ".gz"]
    return {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffixes[-1] if suffixes else "", "text")


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def check_input(item: CorpusInput, lines: bool, text_field: str, progress: "Progress") -> tuple[dict, int]:
    """Read every file of an input once: it must hold text (a file or folder of nothing is a mistake,
    not a corpus), as its kind says. Returns its record (files, bytes, and a sha256 over its files':
    that of the lines `sha256sum` prints for them) and its characters of text."""
    listing, size, chars = hashlib.sha256(), 0, 0
    for path in item.files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
        chars += check_file(path, lines, text_field)
        listing.update(f"{digest.hexdigest()}  {path.relative_to(item.root) if item.root else path.name}\n".encode())
        progress.update(path.stat().st_size)
    if not chars:
        raise data.DataError(f"{item.name}: {'holds no text' if len(item.files) > 1 else 'empty'}; expected text")
    record = {"input": item.name, "files": len(item.files), "bytes": size, "sha256": listing.hexdigest()}
    return ({**record, "revision": item.revision} if item.revision else record), chars


def check_file(path: Path, lines: bool, text_field: str) -> int:
    """The characters of text in a file, once it is checked to be what its kind says."""
    kind = file_kind(path)
    try:
        if kind == "parquet":
            return check_parquet(path, text_field)
        if kind == "jsonl":
            return check_jsonl(path, text_field)
        return check_text(path, lines)
    except (OSError, EOFError, zlib.error) as e:  # gzip's
        raise data.DataError(f"{path}: cannot be read ({e})") from None


def check_text(path: Path, lines: bool) -> int:
    decoder, read, newlines, chars = codecs.getincrementaldecoder("utf-8")(), 0, 0, 0
    with open_binary(path) as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the bytes of a character cut by the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = read - pending + e.start
                line = newlines + (block[:max(e.start - pending, 0)]).count(b"\n") + 1
                raise data.DataError(f"{path}: byte {at} (line {line}) is not UTF-8; expected UTF-8 text") from None
            # --lines: the characters of the lines, without their endings (a file of blank lines has none)
            chars += len(text) - (text.count("\n") + text.count("\r") if lines else 0)
            read, newlines = read + len(block), newlines + block.count(b"\n")
            if not block:
                return chars


def check_jsonl(path: Path, text_field: str) -> int:
    chars = 0
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # also UnicodeDecodeError
                what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not JSON ({e})"
                raise data.DataError(f"{path}: line {n} is {what}; expected one JSON object per line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                has = f"has {', '.join(record)}" if isinstance(record, dict) else "is not an object"
                raise data.DataError(f"{path}: line {n} has no text field {text_field!r} ({has}); expected a "
                                     f"string there (--text-field)")
            chars += len(text)
    return chars


def check_parquet(path: Path, text_field: str) -> int:
    try:
        shard = pq.ParquetFile(path)
        schema = shard.schema_arrow
    except pa.ArrowException as e:
        raise data.DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in schema.names:
        raise data.DataError(f"{path}: no column {text_field!r} (has {', '.join(schema.names)}); expected a "
                             f"text column (--text-field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise data.DataError(f"{path}: column {text_field!r} has type {kind}; expected strings")
    chars, first = 0, 0
    for g in range(shard.num_row_groups):
        column = data.read_column(str(path), lambda: shard.read_row_group(g, columns=[text_field]).column(0))
        if column.null_count:
            bad = first + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise data.DataError(f"{path}: row {bad} of column {text_field!r} is null; expected a string")
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            raise data.DataError(f"{path}: column {text_field!r} holds bytes that are not UTF-8; "
                                 f"expected text") from None
        chars += pc.sum(pc.utf8_length(column)).as_py() or 0
        first += len(column)
    return chars


def read_documents(path: Path, lines: bool, text_field: str, piece: int | None):
    """A checked file's documents, in order, each as (text, whether it ends the document): a whole
    one, or in pieces of `piece` characters (a text file that is one document, where the tokenizer
    allows it). --lines: each line without its line ending, blank ones left out."""
    kind = file_kind(path)
    if kind == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
            yield from ((text, True) for text in batch.column(0).to_pylist())
        return
    with open_binary(path) as f:
        if kind == "jsonl":
            yield from ((json.loads(line)[text_field], True) for line in f if line.strip())
            return
        text_file = io.TextIOWrapper(f, encoding="utf-8", newline="\n" if lines else "")  # no translation
        if lines:
            for line in text_file:
                if line := line.removesuffix("\n").removesuffix("\r"):
                    yield line, True
            return
        text = text_file.read(piece or -1)
        while True:
            following = text_file.read(piece) if piece and text else ""
            yield text, not following
            if not following:
                return
            text = following


def held_out(seed: int, documents: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document (by its index in the input) is held out: the rule is a hash of the seed
    and the index (splitmix64) under `fraction`, so the split is the same however the work is cut."""
    x = documents.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2 ** 64)
    x = x + np.uint64(0x9E3779B97F4A7C15)  # numpy's uint64 arithmetic on arrays wraps, as the hash needs
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2 ** 53 < fraction


def encode_bytes(pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """The byte tokenizer: each piece's UTF-8 bytes, data.EOD_ID after a document's last piece.
    Returns the ids (int32) and each piece's count of them."""
    encoded = [text.encode("utf-8") for text, _ in pieces]
    ends = np.array([end for _, end in pieces])
    lengths = np.array([len(b) for b in encoded], dtype=np.int64) + ends
    ids = np.full(int(lengths.sum()), data.EOD_ID, dtype=np.int32)
    is_byte = np.ones(len(ids), dtype=bool)
    is_byte[(np.cumsum(lengths) - 1)[ends]] = False
    ids[is_byte] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return ids, lengths


ENCODER = None  # a worker's (tokenizers.Tokenizer, end-of-text id)


def start_encoder(tokenizer_json: str, eod_id: int):
    from tokenizers import Tokenizer
    global ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the workers are the parallelism
    ENCODER = Tokenizer.from_str(tokenizer_json), eod_id


def encode_texts(pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """A worker's: whole documents (a tokenizer.json needs all of one), as encode_bytes returns them."""
    tokenizer, eod_id = ENCODER
    documents = [encoding.ids for encoding in tokenizer.encode_batch([text for text, _ in pieces])]
    for ids in documents:
        ids.append(eod_id)
    lengths = np.array([len(ids) for ids in documents], dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(documents), np.int32, int(lengths.sum())), lengths


def encoded_chunks(chunks, tokenizer: TextTokenizer, workers: int):
    """(chunk, its ids, each piece's count of ids) in input order. A tokenizer.json encodes in
    `workers` processes (forked, so that they do not import torch again as data.py does), each
    chunk's result taken back in order, at most 2 chunks per worker in flight. The byte
    tokenizer's encoding is a copy: in this process."""
    if tokenizer.json is None:
        yield from ((chunk, *encode_bytes(chunk)) for chunk in chunks)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with concurrent.futures.ProcessPoolExecutor(workers, context, start_encoder,
                                                (tokenizer.json, tokenizer.eod_id)) as pool:
        in_flight = collections.deque()

        def oldest():
            chunk, result = in_flight.popleft()
            return chunk, *result.result()
        try:
            for chunk in chunks:
                in_flight.append((chunk, pool.submit(encode_texts, chunk)))
                if len(in_flight) >= 2 * workers:
                    yield oldest()
            while in_flight:
                yield oldest()
        except concurrent.futures.process.BrokenProcessPool:
            raise data.DataError(f"--workers {workers}: a worker process ended abruptly (killed for want of "
                                 f"memory?); nothing was written") from None
        finally:
            pool.shutdown(cancel_futures=True)


def chunked(pieces, chars: int):
    """Lists of consecutive pieces of about `chars` characters (at least one piece each)."""
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class RowFile:
    """A split's packed rows, appended as raw int32 ids to a temporary file: the ids that do not yet
    fill a row wait in `carry` (and are dropped at the end, as pico-train drops a last partial row)."""

    def __init__(self, path: Path, row_len: int):
        self.file, self.row_len = open(path, "w+b"), row_len
        self.carry = np.empty(0, dtype=np.int32)
        self.rows = self.documents = self.tokens = 0

    def append(self, ids: np.ndarray, documents: int):
        self.tokens, self.documents = self.tokens + len(ids), self.documents + documents
        ids = np.concatenate([self.carry, ids])
        full = len(ids) // self.row_len * self.row_len
        self.file.write(ids[:full].tobytes())
        self.carry = ids[full:]
        self.rows += full // self.row_len

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows at these indices, in this order: read in index order, a run of consecutive
        ones at a time (all of them where the rows are not shuffled)."""
        self.file.flush()
        order = np.argsort(rows, kind="stable")
        ordered = np.empty((len(rows), self.row_len), dtype=np.int32)
        starts = np.flatnonzero(np.diff(rows[order], prepend=-2) != 1)
        for a, b in zip(starts, [*starts[1:], len(rows)]):
            os.preadv(self.file.fileno(), [ordered[a:b]], int(rows[order[a]]) * self.row_len * 4)
        out = np.empty_like(ordered)
        out[order] = ordered
        return out


def write_split(rows: RowFile, order: np.ndarray, directory: Path, split: str, progress: "Progress") -> int:
    """Rows in `order` as the shards split-XXXXX-of-YYYYY.parquet of data.ROWS_PER_SHARD rows, each
    written one row group at a time. Returns how many shards."""
    n_shards = -(-len(order) // data.ROWS_PER_SHARD)
    for s in range(n_shards):
        with pq.ParquetWriter(directory / f"{split}-{s:05d}-of-{n_shards:05d}.parquet",
                              data.shard_table(np.empty((0, rows.row_len))).schema) as writer:
            shard = order[s * data.ROWS_PER_SHARD:(s + 1) * data.ROWS_PER_SHARD]
            for g in range(0, len(shard), data.ROWS_PER_ROW_GROUP):
                group = shard[g:g + data.ROWS_PER_ROW_GROUP]
                writer.write_table(data.shard_table(rows.read(group)), row_group_size=data.ROWS_PER_ROW_GROUP)
                progress.update(len(group))
    return n_shards


class Progress:
    """One line on stderr of what is done of a total, its rate and the time left: rewritten in place
    every second on a terminal, else a new line every 30 s; the last when closed."""

    def __init__(self, what: str, total: float, unit: str = "MB", scale: float = 1e6, tokens: bool = False,
                 visible: bool = True):
        self.what, self.total, self.unit, self.scale, self.tokens = what, total, unit, scale, tokens
        self.visible = visible
        self.done = self.token_count = 0
        self.started = self.shown = time.perf_counter()
        self.terminal = sys.stderr.isatty()

    def update(self, done: float, tokens: int = 0):
        self.done, self.token_count = self.done + done, self.token_count + tokens
        if self.visible and time.perf_counter() - self.shown >= (1 if self.terminal else 30):
            self.show()

    def show(self, end: str = ""):
        self.shown = time.perf_counter()
        seconds = max(self.shown - self.started, 1e-9)
        rate = self.done / seconds
        left = (self.total - self.done) / rate if rate else float("inf")
        line = (f"{self.what}: {self.done / self.scale:,.1f} of {self.total / self.scale:,.1f} {self.unit} "
                f"({100 * self.done / max(self.total, 1):.0f}%), {rate / self.scale:,.1f} {self.unit}/s")
        if self.tokens:
            line += f", {self.token_count / seconds:,.0f} tokens/s"
        line += f", {seconds:.0f} s" if end else f", ETA {left:.0f} s"
        print(("\r" if self.terminal else "") + line, end=end or ("" if self.terminal else "\n"),
              file=sys.stderr, flush=True)

    def close(self):
        if self.visible:
            self.show(end="\n")


def check_out(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "holds shards already" if out.is_dir() and any(out.rglob("*.parquet")) else "is not an empty folder"
        raise data.DataError(f"--out {out}: {held}; expected a new or empty folder")


def build_corpus(inputs: list[CorpusInput], tokenizer: TextTokenizer, seq_len: int, out: Path, seed: int = 0,
                 val_fraction: float = 0.0, shuffle: bool = True, workers: int = 1, lines: bool = False,
                 text_field: str = "text", held_out_rows: int = 0, show: bool = True,
                 key: str = "--seq-len") -> dict:
    """The corpus of these inputs in `out`, a new or empty folder: data/train-*.parquet,
    data/val-*.parquet and its record, corpus.json. Built in a folder of its own beside `out` and
    moved there whole, so that a failure leaves nothing behind. held_out_rows: the val split is
    instead the first rows of the shuffled rows (the embedded corpus's, which predates this
    command). key: the setting that gave seq_len, for errors. Returns the record."""
    check_out(out)
    size = sum(path.stat().st_size for item in inputs for path in item.files)
    progress = Progress("checking the inputs", size, visible=show)
    checked = [check_input(item, lines, text_field, progress) for item in inputs]
    progress.close()
    work = out.parent / f".{out.name}.{os.getpid()}.tmp"  # each process of a torchrun job its own
    work.mkdir(parents=True)
    try:
        row_len = seq_len + 1
        splits = {split: RowFile(work / f"{split}.rows", row_len) for split in ("train", "val")}
        piece_chars = CHUNK_CHARS if tokenizer.json is None else None  # a tokenizer.json needs whole documents
        pieces = (piece for item in inputs for path in item.files
                  for piece in read_documents(path, lines, text_field, piece_chars))
        progress = Progress("tokenizing", sum(chars for _, chars in checked), tokens=True, visible=show)
        documents = 0  # before the chunk's first piece
        for chunk, ids, lengths in encoded_chunks(chunked(pieces, CHUNK_CHARS), tokenizer, workers):
            ends = np.array([end for _, end in chunk])
            val = held_out(seed, documents + np.cumsum(ends) - ends, val_fraction)  # each piece's document's
            documents += int(ends.sum())
            in_val = np.repeat(val, lengths)
            splits["train"].append(ids[~in_val], int(ends[~val].sum()))
            splits["val"].append(ids[in_val], int(ends[val].sum()))
            progress.update(sum(len(text) for text, _ in chunk), len(ids))
        progress.close()

        # each split's rows in the order of one permutation of them (identity unless shuffled)
        order = {split: np.random.default_rng(seed).permutation(packed.rows) if shuffle else np.arange(packed.rows)
                 for split, packed in splits.items()}
        rows = dict(splits)  # where each split's rows are read
        if held_out_rows:
            if splits["train"].rows < 2 * held_out_rows:
                raise data.DataError(f"{key}={seq_len} leaves only {splits['train'].rows} rows of {inputs[0].name}; "
                                     f"expected at least {2 * held_out_rows}")
            rows["val"] = splits["train"]
            order["train"], order["val"] = order["train"][held_out_rows:], order["train"][:held_out_rows]
        if not sum(map(len, order.values())):  # (an all-val corpus is one to evaluate on)
            tokens = sum(packed.tokens for packed in splits.values())
            raise data.DataError(f"{key}={seq_len}: the inputs give {tokens:,} tokens, not one row of "
                                 f"{row_len}; expected more text or a shorter {key}")
        (work / "data").mkdir()
        progress = Progress("writing shards", sum(map(len, order.values())), "rows", 1, visible=show)
        shards = {split: write_split(rows[split], order[split], work / "data", split, progress) for split in order}
        progress.close()
        for split in splits.values():
            split.file.close()
            Path(split.file.name).unlink()
        record = {
            "made_by": "pico's python data.py tokenize (docs/corpus.md)",
            "inputs": [input_record for input_record, _ in checked],
            "tokenizer": tokenizer.record(),
            "seq_len": seq_len,
            "seed": seed,
            "shuffled": shuffle,
            "held_out": (f"the first {held_out_rows} rows of the shuffled rows" if held_out_rows else
                         f"each document with probability {val_fraction} (data.held_out: a hash of the "
                         f"seed and its index)"),
            "documents": documents,
            "splits": {split: {"rows": len(order[split]), "tokens": len(order[split]) * row_len,
                               "shards": shards[split]} for split in order},
        }
        if not held_out_rows:
            for split, packed in splits.items():
                record["splits"][split].update(documents=packed.documents, dropped_tokens=len(packed.carry))
        (work / data.CORPUS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(work, out)  # at once, onto a missing or empty folder
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record


def tokenize(args):
    """`data.py tokenize`: every setting checked and every input read before anything is written."""
    out = Path(args.out)
    check_out(out)
    if args.push_to:
        check_push_target(args.push_to)
    tokenizer = text_tokenizer(args.tokenizer, args.eod)
    record = build_corpus(corpus_inputs(args.inputs, args.hub_files), tokenizer, args.seq_len, out, args.seed,
                          args.val_fraction, not args.no_shuffle, args.workers, args.lines, args.text_field)
    for split, counts in record["splits"].items():
        print(f"{out / 'data'}/{split}-*: {counts['rows']:,} rows of {args.seq_len + 1} ids in "
              f"{counts['shards']} shards, from {counts['documents']:,} documents")
    print(f"{out / data.CORPUS_RECORD}: {tokenizer.name}, end-of-text id {tokenizer.eod_id}, ids below "
          f"{tokenizer.vocab_size} (model.vocab_size must be at least that)")
    if args.push_to:
        push_corpus(out, args.push_to)


def check_push_target(repo: str):
    """--push-to names a new or empty dataset repo on a Hub within reach (a repo that holds shards
    would be read with its old ones)."""
    if data.hub_repo(repo) is None or "@" in repo:
        raise data.DataError(f"--push-to {repo}: expected a Hub dataset repo id, namespace/name")
    if constants.is_offline_mode():
        raise data.DataError(f"--push-to {repo}: HF_HUB_OFFLINE=1; expected the Hub within reach")
    try:
        held = [f for f in HfApi().list_repo_files(repo, repo_type="dataset") if f.endswith(".parquet")]
    except RepositoryNotFoundError:
        return  # made when pushed
    except Exception as e:
        raise data.DataError(data.without_token(f"--push-to {repo}: {data.hub_failure(e)}")) from None
    if held:
        raise data.DataError(f"--push-to {repo}: holds shards already ({held[0]}); expected a new or empty "
                             f"dataset repo")


def push_corpus(out: Path, repo: str):
    """The corpus's files to dataset repo `repo`, made if need be, in one commit."""
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        url = api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=out,
                                commit_message=f"A corpus made by pico's data.py tokenize ({data.CORPUS_RECORD})")
    except Exception as e:
        failure = data.without_token(data.hub_failure(e))
        raise data.DataError(f"--push-to {repo}: {failure}; the corpus is whole in {out}: upload it with "
                             f"`hf upload {repo} {out} --repo-type dataset`") from None
    print(f"pushed to {url}")
