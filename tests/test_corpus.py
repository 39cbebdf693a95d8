"""Your own corpus (corpus.py, `python data.py tokenize`): text, JSONL, Parquet or a Hub dataset
repo in; pre-tokenized shards out, as pico-train packs its data, checked here against an
independent tokenization of the same documents."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus
import data
import launcher
import train

ROOT = Path(__file__).resolve().parent.parent
SEQ = 16  # rows of 17 ids
WORDS = "the cat sat on a mat while a dog ran after its log , and héllo wörld ünïcode".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of words (a document's number is its first word)."""
    rng = np.random.default_rng(seed)
    return [" ".join([str(i), *rng.choice(WORDS, size=rng.integers(1, 40))]) for i in range(n)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json trained here with `tokenizers`, its end-of-text <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(200), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Each document's ids, end-of-text last: independently of corpus.py."""
    if tokenizer == "bytes":
        return [[*text.encode(), data.EOD_ID] for text in texts]
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(tokenizer))
    return [bpe.encode(text).ids + [bpe.token_to_id("<|endoftext|>")] for text in texts]


def packed(texts: list[str], tokenizer, row_len: int = SEQ + 1) -> np.ndarray:
    """The documents back to back in rows of row_len ids, the partial last row dropped."""
    ids = np.concatenate([np.array(d) for d in encode(texts, tokenizer)])
    return ids[:len(ids) // row_len * row_len].reshape(-1, row_len)


def rows(out: Path, split: str) -> np.ndarray:
    files = sorted((out / "data").glob(f"{split}-*.parquet"))
    return np.concatenate([np.stack(pq.read_table(f)[data.COLUMN].to_numpy(zero_copy_only=False))
                           for f in files]) if files else np.empty((0, SEQ + 1), dtype=np.int64)


def tokenize(*args, out: Path, tokenizer="bytes") -> Path:
    data.main(["tokenize", *map(str, args), "--tokenizer", str(tokenizer), "--seq-len", str(SEQ),
               "--out", str(out)])
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(texts)))
    return path


def write_text_files(folder: Path, texts: list[str]) -> Path:
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i:03d}.txt").write_text(text)
    return folder


def write_parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts}), path, row_group_size=7)
    return path


# ---------------------------------------------------------------------------------------------
# The shards are the documents, packed as pico-train packs them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text files", "lines", "jsonl", "parquet"])
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_unshuffled_rows_are_the_documents_packed_with_end_of_text(tmp_path, bpe, kind, tokenizer):
    texts = documents(60)
    tokenizer = bpe if tokenizer == "bpe" else "bytes"
    inputs = {"text files": lambda: [write_text_files(tmp_path / "docs", texts)],
              "lines": lambda: [write_text_files(tmp_path / "docs", ["\n".join(texts[:30]) + "\n\n",
                                                                      "\r\n".join(texts[30:])]), "--lines"],
              "jsonl": lambda: [write_jsonl(tmp_path / "docs.jsonl", texts)],
              "parquet": lambda: [write_parquet(tmp_path / "docs.parquet", texts)]}[kind]()
    out = tokenize(*inputs, "--no-shuffle", "--val-fraction", 0, out=tmp_path / "out", tokenizer=tokenizer)
    np.testing.assert_array_equal(rows(out, "train"), packed(texts, tokenizer))
    assert rows(out, "val").size == 0


def test_shuffled_rows_are_the_same_rows_in_a_seeded_order(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(80))
    in_order = rows(tokenize(source, "--no-shuffle", out=tmp_path / "in-order"), "train")
    shuffled = rows(tokenize(source, out=tmp_path / "shuffled"), "train")
    np.testing.assert_array_equal(shuffled, in_order[np.random.default_rng(0).permutation(len(in_order))])
    reseeded = rows(tokenize(source, "--seed", 1, out=tmp_path / "reseeded"), "train")
    assert not np.array_equal(reseeded, shuffled)


def test_documents_are_held_out_whole_and_each_split_is_packed_on_its_own(tmp_path, bpe):
    texts = documents(300)
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", texts), "--no-shuffle", "--val-fraction", 0.2,
                   out=tmp_path / "out", tokenizer=bpe)
    record = json.loads((out / data.CORPUS_RECORD).read_text())
    from tokenizers import Tokenizer

    decode = Tokenizer.from_file(str(bpe)).decode
    split_of = {}  # document number (its first word) -> the splits it is found in
    for split in ("train", "val"):
        ids = rows(out, split).reshape(-1)
        for document in np.split(ids, np.flatnonzero(ids == record["tokenizer"]["eod_id"]) + 1):
            if document.size:  # the last may be the start of one, its end dropped with the partial row
                split_of.setdefault(int(decode(document.tolist()).split()[0]), set()).add(split)
    assert sorted(split_of) == list(range(len(texts))) or sorted(split_of) == list(range(len(texts) - 1))
    assert all(len(splits) == 1 for splits in split_of.values())  # no document in both
    held = [text for i, text in enumerate(texts) if split_of.get(i) == {"val"}]
    assert 0.1 < len(held) / len(texts) < 0.3  # about --val-fraction
    np.testing.assert_array_equal(rows(out, "val"), packed(held, bpe))  # in input order, on their own
    assert record["splits"]["val"]["documents"] + record["splits"]["train"]["documents"] == len(texts)


def test_many_chunks_in_flight_come_back_whole_and_in_order(tmp_path, bpe, monkeypatch):
    texts = documents(300)
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 97)  # a chunk of a document or two: many of them
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", texts), "--no-shuffle", "--val-fraction", 0,
                   "--workers", 2, out=tmp_path / "out", tokenizer=bpe)
    np.testing.assert_array_equal(rows(out, "train"), packed(texts, bpe))


def test_the_bytes_are_the_same_with_one_worker_or_two_and_whatever_the_chunks(tmp_path, bpe, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(400))
    one = tokenize(source, "--workers", 1, out=tmp_path / "one", tokenizer=bpe)
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 97)  # many small chunks in flight at once
    two = tokenize(source, "--workers", 2, out=tmp_path / "two", tokenizer=bpe)
    files = sorted(p.relative_to(one) for p in one.rglob("*.parquet"))
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.parquet")) and len(files) == 2
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_a_long_document_is_read_in_pieces_by_the_byte_tokenizer(tmp_path, monkeypatch):
    text = "é" * 500 + "x" * 333  # pieces cut inside a document, and between bytes of a character
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 100)
    out = tokenize(write_text_files(tmp_path / "docs", [text, "short"]), "--no-shuffle", "--val-fraction", 0,
                   out=tmp_path / "out")
    np.testing.assert_array_equal(rows(out, "train"), packed([text, "short"], "bytes"))


def test_the_record_names_the_inputs_their_hashes_the_tokenizer_and_the_counts(tmp_path, bpe):
    import hashlib

    source = write_jsonl(tmp_path / "docs.jsonl", documents(50))
    out = tokenize(source, "--seed", 3, out=tmp_path / "out", tokenizer=bpe)
    record = json.loads((out / data.CORPUS_RECORD).read_text())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["inputs"] == [{"input": str(source), "files": 1, "bytes": source.stat().st_size,
                                 "sha256": hashlib.sha256(f"{digest}  docs.jsonl\n".encode()).hexdigest()}]
    assert record["tokenizer"] == {"name": str(bpe), "revision": hashlib.sha256(bpe.read_bytes()).hexdigest(),
                                   "eod_id": 0, "vocab_size": 320}
    assert (record["seq_len"], record["seed"], record["shuffled"], record["documents"]) == (SEQ, 3, True, 50)
    assert record["splits"]["train"]["rows"] == len(rows(out, "train"))


def test_the_embedded_corpus_is_made_by_the_same_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CORPUS_ROOT", tmp_path)
    record = json.loads((data.prepare_local(255) / data.CORPUS_RECORD).read_text())
    assert record["tokenizer"]["name"] == "bytes" and record["splits"]["val"]["rows"] == data.VAL_ROWS
    assert record["inputs"][0]["files"] > 100  # the standard library's modules


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line each, before anything is written
# ---------------------------------------------------------------------------------------------

def bad_inputs(tmp_path: Path) -> dict:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok\ncafé".encode("latin-1"))
    write_jsonl(tmp_path / "other.jsonl", ["a", "b"], field="body")
    write_parquet(tmp_path / "other.parquet", ["a", "b"], column="body")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    return {"empty file": (["empty.txt"], "empty.txt: empty; expected text"),
            "undecodable bytes": (["latin1.txt"], "latin1.txt: byte 6 (line 2) is not UTF-8"),
            "no text field": (["other.jsonl"], "other.jsonl: line 1 has no text field 'text' (has id, body)"),
            "no text column": (["other.parquet"], "other.parquet: no column 'text' (has body)"),
            "not JSON": (["broken.jsonl"], "broken.jsonl: line 2 is not JSON"),
            "missing": (["nowhere.txt"], "nowhere.txt: no such file or folder")}


def test_too_little_text_for_one_row_is_one_line_and_nothing_is_written(tmp_path):
    (tmp_path / "short.txt").write_text("hello")
    with pytest.raises(data.DataError, match=f"^--seq-len={SEQ}: the inputs give 6 tokens, not one row of "
                       f"{SEQ + 1}; expected more text or a shorter --seq-len$"):
        tokenize(tmp_path / "short.txt", out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("bad", ["empty file", "undecodable bytes", "no text field", "no text column", "not JSON",
                                 "missing"])
def test_a_bad_input_is_one_line_naming_it_and_nothing_is_written(tmp_path, bad):
    names, message = bad_inputs(tmp_path)[bad]
    good = write_jsonl(tmp_path / "good.jsonl", documents(20))
    with pytest.raises(data.DataError, match="^[^\n]*$") as error:
        tokenize(good, *[tmp_path / name for name in names], out=tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def killed(pieces):
    os._exit(9)  # as a worker the kernel ends for want of memory


def test_a_worker_that_dies_is_one_line_and_nothing_is_written(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(corpus, "encode_texts", killed)
    with pytest.raises(data.DataError, match="^--workers 2: a worker process ended abruptly"):
        tokenize(write_jsonl(tmp_path / "docs.jsonl", documents(20)), "--workers", 2, out=tmp_path / "out",
                 tokenizer=bpe)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_output_folder_that_holds_shards_is_refused_and_left_as_it_was(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", documents(20))
    out = tokenize(source, out=tmp_path / "out")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(data.DataError, match="holds shards already; expected a new or empty folder"):
        tokenize(source, "--seed", 1, out=out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_command_exits_with_one_line_on_a_bad_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = launcher.run([sys.executable, "data.py", "tokenize", str(tmp_path / "empty.txt"), "--tokenizer",
                           "bytes", "--seq-len", "8", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {tmp_path / 'empty.txt'}: empty; expected text"


# ---------------------------------------------------------------------------------------------
# Training on a corpus
# ---------------------------------------------------------------------------------------------

CONFIG = """
data.dataset.name = {corpus!r}
data.tokenizer.name = {tokenizer!r}
data.dataloader.batch_size = 4
model.vocab_size, model.max_seq_len, model.d_model, model.n_layers = {vocab}, 16, 16, 1
model.attention_n_heads, model.attention_n_kv_heads, model.activation_hidden_dim = 2, 1, 32
training.max_steps = 2
checkpointing.runs_dir = {runs!r}
checkpointing.run_name = "corpus"
checkpointing.learning_dynamics.eval_data = {corpus!r}
checkpointing.learning_dynamics.eval_rows = 4
evaluation.metrics = ["paloma"]
evaluation.paloma.dataset_name = {corpus!r}
evaluation.paloma.rows = 4
"""


def test_a_run_trains_on_the_train_split_evaluates_on_val_and_data_batch_shows_the_documents(tmp_path, bpe,
                                                                                           capsys):
    texts = documents(300)
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", texts), "--val-fraction", 0.1, out=tmp_path / "out",
                   tokenizer=bpe)
    config = tmp_path / "run.py"
    config.write_text(CONFIG.format(corpus=str(out), tokenizer=str(bpe), vocab=320, runs=str(tmp_path / "runs")))
    assert train.main([str(config)]) == 0
    run = tmp_path / "runs" / "corpus"
    assert json.loads((run / "eval_results" / "step_2.json").read_text())["paloma"] > 0
    shards = data.open_dataset(str(out), SEQ + 1, 320)
    assert [p.name for p in shards.files] == [p.name for p in sorted((out / "data").glob("train-*"))]
    capsys.readouterr()
    data.main(["batch", str(config), "--step", "1", "--data.tokenizer.name=None"])  # corpus.json names it
    shown = capsys.readouterr().out
    # packed documents: one's end as the tokenizer writes it, then the next's first word, its number
    assert any(f"<|endoftext|>{i} " in shown for i in range(len(texts)))


def test_a_model_vocabulary_smaller_than_the_corpus_tokenizer_is_refused_naming_it(tmp_path, bpe):
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", documents(50)), out=tmp_path / "out", tokenizer=bpe)
    config = tmp_path / "run.py"
    config.write_text(CONFIG.format(corpus=str(out), tokenizer=str(bpe), vocab=257, runs=str(tmp_path / "runs")))
    with pytest.raises(data.DataError, match=f"^model.vocab_size=257: the corpus {out} was tokenized with "
                       f"'{bpe}' .*, whose ids go up to 319; expected model.vocab_size >= 320$"):
        train.main([str(config)])
    assert not (tmp_path / "runs").exists()


def test_evaluating_on_a_split_the_corpus_does_not_have_is_an_error(tmp_path):
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", documents(50)), "--val-fraction", 0, out=tmp_path / "out")
    with pytest.raises(data.DataError, match="no files of split 'val'"):
        data.load_eval_set(str(out), "val", SEQ + 1, data.BYTE_VOCAB_SIZE)


def test_a_corpus_all_held_out_is_one_to_evaluate_on_not_to_train_on(tmp_path):
    texts = documents(50)
    out = tokenize(write_jsonl(tmp_path / "docs.jsonl", texts), "--val-fraction", 1, "--no-shuffle",
                   out=tmp_path / "out")
    val = data.load_eval_set(str(out), "val", SEQ + 1, data.BYTE_VOCAB_SIZE)
    np.testing.assert_array_equal(np.stack(val), packed(texts, "bytes"))
    with pytest.raises(data.DataError, match="no files of split 'train'"):
        data.open_dataset(str(out), SEQ + 1, data.BYTE_VOCAB_SIZE)


# ---------------------------------------------------------------------------------------------
# The Hub: a dataset repo in, a dataset repo out
# ---------------------------------------------------------------------------------------------

def test_a_hub_dataset_in_and_the_corpus_pushed_to_the_hub_trains_on_its_train_split(tmp_path, hub):
    texts = documents(200)
    repo = tmp_path / "text-repo"
    repo.mkdir()
    write_parquet(repo / "train.parquet", texts)
    (repo / "README.md").write_text("not a document")
    hub.add_repo("someone/text", repo)
    out = tokenize("someone/text", "--no-shuffle", "--val-fraction", 0.2, "--push-to", "someone/corpus",
                   out=tmp_path / "out")
    record = json.loads((out / data.CORPUS_RECORD).read_text())
    assert record["inputs"][0]["revision"] and record["documents"] == len(texts)  # not the README
    shards = data.open_dataset("someone/corpus", SEQ + 1, data.BYTE_VOCAB_SIZE)
    assert [Path(f).name for f in shards.files] == ["train-00000-of-00001.parquet"]
    np.testing.assert_array_equal(shards.read(0, shards.num_rows), rows(out, "train"))
    val = data.load_eval_set("someone/corpus", "val", SEQ + 1, data.BYTE_VOCAB_SIZE)
    np.testing.assert_array_equal(np.stack(val), rows(out, "val"))
    with pytest.raises(data.DataError, match="--push-to someone/corpus: holds shards already"):
        tokenize("someone/text", "--push-to", "someone/corpus", out=tmp_path / "again")


def test_a_hub_dataset_read_once_is_read_again_offline_from_the_cache(tmp_path, hub, monkeypatch):
    from hub_server import point_huggingface_hub_at

    repo = tmp_path / "text-repo"
    repo.mkdir()
    write_jsonl(repo / "docs.jsonl", documents(40))
    hub.add_repo("someone/text", repo)
    online = tokenize("someone/text", out=tmp_path / "online")
    hub.log.clear()
    point_huggingface_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    offline = tokenize("someone/text", out=tmp_path / "offline")
    assert hub.log == []
    assert [p.read_bytes() for p in sorted(online.rglob("*.parquet"))] == \
        [p.read_bytes() for p in sorted(offline.rglob("*.parquet"))]
