"""Everything measured on a checkpoint's weights: each checkpoint N is evaluated once it is saved.

A measurement is a function `measure(model, rows, at) -> Measured`: of the model, the rows it
measures and the checkpoint `at` (its step, the config, the device). It returns its entries of
eval_results/step_N.json, its record of metrics.jsonl, any per-row arrays (each saved as
eval_results/step_N_{name}.npy, or several as one .npz) and a line for the log. Every rank runs it the same way: each
takes its block of the rows (distributed.my_rows) and the results are gathered or summed over the
ranks, so every rank returns the same and rank 0 writes them.

Its rows are read once, before the first step, by a function of the run's start (None: nothing to
measure), so that a bad input stops the run before anything is trained or written. MEASUREMENTS
pairs the two under the measurement's name, which evaluation.metrics lists to turn it on (and
bench.py --measure to time it): adding a measurement is a function and a line there.

    paloma       the evaluation set (Paloma): perplexity overall and per source, each row's loss,
                 the loss at every position and the in-context learning score
    probe        the training probe: rows spread over the run, each one's loss and Pythia's
                 memorization test, by whether and how long ago the run trained on it
    induction    induction heads: each head's prefix matching on repeated random tokens
    attention    each head's attention entropy on the evaluation set's first rows
    tasks        minimal pairs and multiple choice (evaluation.tasks): each task's accuracy, overall
                 and per group, and each item's result

Machinery: the measurements that train.Checkpoints runs on each checkpoint (docs/measurements.md
says what each one means and costs).
"""

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

import data
from checkpoint import save_array, write_atomically
from config import Config, ConfigError
from data import DataError
from distributed import gather_rows, my_rows, world
from model import PicoDecoder
from records import Records, json_line


@dataclasses.dataclass
class Start:
    """What a measurement's rows are read from, once, before the first step."""
    config: Config
    shards: object  # the training rows (data.open_dataset)
    eval_sets: data.EvalSets  # the evaluation sets, each read once for all that use it
    carried: dict  # what the checkpoint resumed from carries on with (Evaluation.run_state's)
    notes: list[str] = dataclasses.field(default_factory=list)  # warnings for the log, once it is open


@dataclasses.dataclass
class At:
    """The checkpoint being measured, and where to compute."""
    step: int
    config: Config
    device: torch.device
    autocast: contextlib.AbstractContextManager


@dataclasses.dataclass
class Measured:
    """What one measurement found at a checkpoint."""
    results: dict  # entries of eval_results/step_N.json
    record: dict  # metrics.jsonl's record (its step and evaluation mark are added)
    # name: an array, saved as eval_results/step_N_{name}.npy, or {key: array}, as step_N_{name}.npz
    per_row: dict[str, np.ndarray | dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    line: str = ""  # the log's
    # name: an input the measurement is a function of, kept as eval_results/{name}.npy so that
    # anyone can compute it again (induction's random sequences)
    inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


# Perplexity on the evaluation set ------------------------------------------------------------

def evaluation_set(start: Start) -> data.EvalRows:
    """The evaluation set, evaluation.paloma's (its first paloma.rows): read once for all that measure it."""
    paloma = start.config.evaluation.paloma
    rows = start.eval_sets.read(paloma.dataset_name, paloma.dataset_split, key="evaluation.paloma.dataset_name")
    rows = rows.first(paloma.rows)
    if not rows:
        raise ConfigError(f"evaluation.paloma.dataset_name={paloma.dataset_name!r}: its "
                          f"{paloma.dataset_split!r} split has no rows; expected an evaluation set")
    return rows


def eval_rows(start: Start):
    """The evaluation set."""
    rows = evaluation_set(start)
    late, longest = icl_positions(start.config)[1], max(len(row) - 1 for row in rows)
    if late >= longest:  # a reason to say so, not to stop
        start.notes.append(f"evaluation.paloma.icl_positions: the evaluation rows predict at most {longest} "
                           f"tokens, none at position {late}; no in-context learning score")
    return rows


def icl_positions(config: Config) -> tuple[int, int]:
    """evaluation.paloma.icl_positions, or Olsson et al.'s 50 and 500 scaled to model.max_seq_len."""
    if config.evaluation.paloma.icl_positions is not None:
        return tuple(config.evaluation.paloma.icl_positions)
    seq_len = config.model.max_seq_len
    late = max(1, min(seq_len - 1, 500 * seq_len // 2048))
    return min(late - 1, 50 * seq_len // 2048), late


def paloma(model: PicoDecoder, rows, at: At) -> Measured:
    """Perplexity on the evaluation set (overall, per source, bits per byte for the byte
    tokenizer); each row's loss in step_N_rows.npy. From the same pass, the mean loss at each
    position and Olsson et al.'s in-context learning score: the loss at a late position minus
    that at an early one, negative once the model uses its context."""
    r = evaluate(model, rows, at.config.evaluation.paloma.batch_size, at.device, at.autocast,
                 byte_level=at.config.data.tokenizer.name == "bytes")
    per_row, by_position = r.pop("rows"), r.pop("loss_by_position")
    by_source = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("perplexity/")}
    results = {"paloma": r["perplexity"], **({"paloma_by_source": by_source} if by_source else {}),
               "paloma_loss_by_position": by_position}
    early, late = icl_positions(at.config)
    if late < len(by_position):
        icl = {"score": by_position[late] - by_position[early], "early_loss": by_position[early],
               "late_loss": by_position[late]}
        r.update({f"icl_{k}": v for k, v in icl.items()})
        results["paloma_icl"] = {"positions": [early, late], **icl}
    bits = f" | {r['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in r else ""
    score = f" | in-context score {r['icl_score']:.3f}" if "icl_score" in r else ""
    return Measured(results=results, record={f"paloma_{k}": v for k, v in r.items()}, per_row={"rows": per_row},
                    line=f"eval step {at.step} | paloma perplexity {r['perplexity']:.3f} | loss "
                         f"{r['loss']:.4f} | {r['tokens']:,} tokens{bits}{score}")


@torch.no_grad()
def evaluate(model: PicoDecoder, rows: list, batch_size: int, device: torch.device, autocast,
             byte_level: bool) -> dict:
    """Perplexity of the model on the evaluation rows: exp of the mean next-token loss over all
    their tokens. (pico-train's `evaluate` metric averages per-sequence perplexities instead,
    which weighs a short sequence as much as a long one.) Rows may differ in length
    (data.collate). Under torch.distributed each rank evaluates its block of the rows and the
    sums are added up (a collective): every rank returns the same results. results["rows"]: each
    row's mean loss and its number of tokens, in order (the per-example probe);
    results["loss_by_position"]: at each position p, the mean loss of predicting token p + 1 from
    the p + 1 before it, over the rows that long."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = 0
    position_nll = torch.zeros(model.config.max_seq_len, dtype=torch.float64, device=device)
    position_count = np.zeros(model.config.max_seq_len)  # counted on the host, as the tokens are
    sources = getattr(rows, "sources", None)  # data.EvalRows: each row's source (Paloma's corpora)
    rows, counts = my_rows(rows)
    row_nll = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs, labels = data.collate(chunk)
        n_tokens += int((labels != -100).sum())  # counted on the host: the loop need not wait for the GPU
        n_bytes += sum(int((row[1:] < 256).sum()) for row in chunk) if byte_level else 0
        with autocast:  # each token's loss, 0 at padding: the logits are never whole (OutputHead)
            _, losses = model(inputs.to(device), labels.to(device), reduction="none")
        losses = losses.double()
        nll += losses.sum()
        row_nll.append(losses.sum(dim=1))
        position_nll[:losses.shape[1]] += losses.sum(dim=0)
        for row in chunk:
            position_count[:len(row) - 1] += 1
    model.train()
    lengths = torch.tensor([len(row) - 1 for row in rows], dtype=torch.float64, device=device)
    mine = torch.stack([torch.cat(row_nll) if row_nll else lengths.new_zeros(0), lengths], dim=1)
    per_row = gather_rows(mine, counts).cpu().numpy()
    totals = torch.cat([torch.stack([nll, nll.new_tensor(n_tokens), nll.new_tensor(n_bytes)]), position_nll,
                        torch.from_numpy(position_count).to(device)])  # float64, on the device
    if dist.is_initialized():
        dist.all_reduce(totals)
    (nll, n_tokens, n_bytes), (position_nll, position_count) = totals[:3].tolist(), totals[3:].view(2, -1).cpu()
    mean_loss = nll / n_tokens
    reached = int((position_count > 0).sum())  # the positions some row reaches
    results = {"perplexity": perplexity(mean_loss), "loss": mean_loss, "tokens": int(n_tokens),
               "rows": np.rec.fromarrays([per_row[:, 0] / per_row[:, 1], per_row[:, 1].astype(np.int64)],
                                         names="loss,tokens"),
               "loss_by_position": (position_nll[:reached] / position_count[:reached]).tolist()}
    sources = np.array(sources or [])
    for source in sorted(set(sources)):  # each over every token of its rows, as the whole
        ours = sources == source
        results[f"perplexity/{source}"] = perplexity(per_row[ours, 0].sum() / per_row[ours, 1].sum())
    if byte_level:  # every token but the end-of-document id is one byte of text
        results["bits_per_byte"] = nll / math.log(2) / n_bytes
    return results


def perplexity(mean_loss: float) -> float:
    # exp overflows past a mean loss of 709 (a diverged run): its perplexity is infinite, not an error
    return math.exp(mean_loss) if mean_loss < 709 else math.inf


# The training probe and memorization ---------------------------------------------------------

@dataclasses.dataclass
class Probe:
    """The training probe's rows (evaluation.probe): rows spread over the run, and the step that
    trains on each, from the data order alone: checkpoint N has seen a row when N >= seen_at (the
    row is in the batch of `data.py batch --step seen_at-1`)."""
    positions: np.ndarray  # global row positions
    seen_at: np.ndarray
    rows: list
    memorize: bool  # whether Pythia's memorization test fits in model.max_seq_len


def probe_rows(start: Start) -> Probe | None:
    """evaluation.probe.rows training rows spread evenly over the run; a run resumed with as many
    keeps the rows it had, whatever its training.max_steps."""
    config = start.config
    cfg, global_batch = config.evaluation.probe, config.data.dataloader.batch_size
    if not cfg.rows:
        return None
    run_rows = config.training.max_steps * global_batch
    positions = np.array(start.carried.get("probe_positions", []), dtype=np.int64)
    if len(positions) != min(cfg.rows, run_rows):
        positions = data.probe_positions(min(cfg.rows, run_rows), run_rows)
    memorize = cfg.memorization_tokens > 0
    if memorize and cfg.memorization_prefix + cfg.memorization_tokens > config.model.max_seq_len:
        memorize = False  # a default a short model cannot run: a reason to say so, not to stop
        start.notes.append(f"evaluation.probe: memorization of {cfg.memorization_tokens} tokens from "
                           f"{cfg.memorization_prefix} does not fit in model.max_seq_len="
                           f"{config.model.max_seq_len}; the probe runs without it")
    return Probe(positions, positions // global_batch + 1, list(start.shards.read_at(positions)), memorize)


def probe(model: PicoDecoder, rows: Probe, at: At) -> Measured:
    """The training probe at checkpoint N: each row's loss and memorization in step_N_probe.npy;
    probe_summary's means in step_N.json and (flat) in metrics.jsonl."""
    cfg = at.config.evaluation.probe
    losses = evaluate(model, rows.rows, cfg.batch_size, at.device, at.autocast, byte_level=False)["rows"]
    fields = {"position": rows.positions, "seen_at": rows.seen_at, "loss": losses.loss, "tokens": losses.tokens}
    if rows.memorize:
        fields["token_match"] = memorization(model, rows.rows, cfg.memorization_prefix,
                                             cfg.memorization_tokens, cfg.batch_size, at.device, at.autocast)
        fields["exact_match"] = fields["token_match"] == 1
    per_row = np.rec.fromarrays(list(fields.values()), names=list(fields))
    summary = probe_summary(per_row, at.step)
    groups = [group for group in ("seen", "unseen") if summary[group]["rows"]]
    return Measured(
        results={"probe": summary},
        record={f"probe/{name}_{group}": value for group in groups
                for name, value in summary[group].items() if name != "rows"},
        per_row={"probe": per_row},
        line=f"probe step {at.step} | " + " | ".join(
            f"{group} {summary[group]['rows']} rows: loss {summary[group]['loss']:.4f}" + (
                f", memorized {summary[group]['exact_match']:.1%}" if rows.memorize else "")
            for group in groups))


def probe_summary(per_row: np.ndarray, done: int) -> dict:
    """The probe's means at checkpoint `done`: over the rows seen and those not yet seen (the
    control), and over the seen ones by steps since seen, in bins [0, 1), [1, 2), [2, 4), ..."""
    since = done - per_row["seen_at"]
    seen = since >= 0
    measured = [name for name in ("loss", "token_match", "exact_match") if name in per_row.dtype.names]

    def means(rows: np.ndarray) -> dict:
        return {"rows": int(rows.sum()), **{name: float(per_row[name][rows].mean()) for name in measured
                                            if rows.any()}}
    bins, low, high = [], 0, 1
    while seen.any() and low <= since[seen].max():
        rows = seen & (since >= low) & (since < high)
        if rows.any():
            bins.append({"steps_since_seen": [low, high], **means(rows)})
        low, high = high, 2 * high
    return {"seen": means(seen), "unseen": means(~seen), "by_steps_since_seen": bins}


@torch.no_grad()
def memorization(model: PicoDecoder, rows: list, prefix: int, n_new: int, batch_size: int,
                 device: torch.device, autocast) -> np.ndarray:
    """Pythia's memorization test: each row's greedy continuation (the KV-cache `generate`) of its
    first `prefix` tokens, n_new tokens long, against the row's own next n_new tokens. Returns each
    row's share of matching tokens, in order; the ranks split the rows as in evaluate."""
    rows, counts = my_rows(rows)
    matches = [torch.zeros(0, device=device)]
    for start in range(0, len(rows), batch_size):
        chunk = torch.as_tensor(np.stack(rows[start:start + batch_size]), device=device)
        with autocast:
            generated = model.generate(chunk[:, :prefix], n_new, temperature=0)[:, prefix:]
        matches.append((generated == chunk[:, prefix:prefix + n_new]).float().mean(dim=1))
    mine = torch.cat(matches)[:, None]
    return gather_rows(mine, counts)[:, 0].cpu().numpy()


# Induction heads and attention entropy ------------------------------------------------------

def induction_rows(start: Start) -> np.ndarray | None:
    """evaluation.induction.sequences sequences of random tokens, each half the same, [n, 2 x
    half]: seeded by evaluation.induction.seed alone, so every size of a suite reads the same."""
    config = start.config
    cfg, half = config.evaluation.induction, induction_half(config)
    first = np.random.default_rng([cfg.seed, half]).integers(0, config.model.vocab_size, (cfg.sequences, half))
    return np.concatenate([first, first], axis=1)


def induction_half(config: Config) -> int:
    return config.evaluation.induction.length or min(256, config.model.max_seq_len // 4)


@torch.no_grad()
def induction(model: PicoDecoder, sequences: np.ndarray, at: At) -> Measured:
    """Olsson et al.'s induction heads on repeated random tokens. Each head's prefix matching: its
    attention from each token of the second half to the token after that token's occurrence in the
    first (where an induction head looks, to copy it), averaged. And the loss of the tokens of
    each half (the first token of the repeat, which nothing predicts, left out): random in the
    first, copied in the second by a model that has induction heads."""
    cfg, half = at.config.evaluation.induction, sequences.shape[1] // 2
    mine, _ = my_rows(sequences)
    c = model.config
    matching = torch.zeros(c.n_layers, c.attention_n_heads, dtype=torch.float64, device=at.device)
    losses = torch.zeros(2, dtype=torch.float64, device=at.device)  # the sums over each half's tokens
    # The token at half + i repeats token i; where it occurred, token i + 1 came next
    query = torch.arange(half, half * 2, device=at.device)

    def each(layer: int, probabilities: torch.Tensor):
        matching[layer] += probabilities[:, :, query, query - half + 1].sum(dim=(0, 2)).double()
    model.eval()
    for start in range(0, len(mine), cfg.batch_size):
        chunk = torch.as_tensor(mine[start:start + cfg.batch_size], device=at.device)
        labels = torch.cat([chunk[:, 1:], chunk.new_full((len(chunk), 1), -100)], dim=1)  # none after the last
        with at.autocast:
            x = model.with_attention(chunk, each=each)
            _, token_losses = model.decode(x, labels, reduction="none")
        # position p predicts token p + 1: tokens 1 .. half - 1 are the first half's, half + 1 .. the second's
        losses += torch.stack([token_losses[:, :half - 1].sum(), token_losses[:, half:].sum()]).double()
    model.train()
    totals = torch.cat([matching.flatten(), losses])
    if dist.is_initialized():
        dist.all_reduce(totals)
    matching = (totals[:-2] / (len(sequences) * half)).view(c.n_layers, -1).cpu()
    first, second = (totals[-2:] / (len(sequences) * (half - 1))).tolist()
    best = divmod(int(matching.argmax()), c.attention_n_heads)
    layers, heads = np.indices(matching.shape)
    return Measured(
        results={"induction": {"prefix_matching": matching.tolist(), "loss_first_half": first,
                               "loss_second_half": second}},
        record={"induction/prefix_matching_max": matching.max().item(), "induction/loss_first_half": first,
                "induction/loss_second_half": second,
                **{f"induction/prefix_matching/layers.{i}": v for i, v in enumerate(matching.amax(1).tolist())}},
        per_row={"induction": np.rec.fromarrays([layers.ravel(), heads.ravel(), matching.numpy().ravel()],
                                                names="layer,head,prefix_matching")},
        inputs={"induction_sequences": sequences},
        line=f"induction step {at.step} | best head layers.{best[0]} head {best[1]}: prefix matching "
             f"{matching.max():.3f} | loss {first:.3f} on the first half, {second:.3f} on the repeat")


def attention_rows(start: Start):
    """The first evaluation.attention.rows rows of the evaluation set."""
    return evaluation_set(start)[:start.config.evaluation.attention.rows]


@torch.no_grad()
def attention_entropy(model: PicoDecoder, rows: list, at: At) -> Measured:
    """Each head's attention entropy in nats, averaged over the rows' tokens: 0 for a head that
    attends to one token, ln(t + 1) for one spread evenly over the t + 1 it can see. One row at a
    time, so that no padding enters and one [heads, T, T] map is held at once."""
    mine, _ = my_rows(rows)
    c = model.config
    entropy = torch.zeros(c.n_layers, c.attention_n_heads, dtype=torch.float64, device=at.device)

    def each(layer: int, probabilities: torch.Tensor):
        entropy[layer] += torch.special.entr(probabilities).sum(dim=(0, 2, 3)).double()
    model.eval()
    for row in mine:
        with at.autocast:
            model.with_attention(torch.as_tensor(row[None, :-1], device=at.device), each=each)
    model.train()
    totals = torch.cat([entropy.flatten(), entropy.new_tensor([sum(len(row) - 1 for row in mine)])])
    if dist.is_initialized():
        dist.all_reduce(totals)
    entropy = (totals[:-1] / totals[-1]).view(c.n_layers, -1).cpu()
    layers, heads = np.indices(entropy.shape)
    return Measured(
        results={"attention_entropy": entropy.tolist()},
        record={f"attention/entropy/layers.{i}": v for i, v in enumerate(entropy.mean(1).tolist())},
        per_row={"attention": np.rec.fromarrays([layers.ravel(), heads.ravel(), entropy.numpy().ravel()],
                                                names="layer,head,entropy")},
        line=f"attention step {at.step} | entropy per layer " + ", ".join(f"{v:.3f}" for v in entropy.mean(1).tolist()))


# Tasks: minimal pairs and multiple choice ------------------------------------------------------
#
# A task is a dataset of items, each scored by the log-probabilities the model gives to texts:
#   minimal pairs (BLiMP, Warstadt et al. 2020): columns sentence_good and sentence_bad; an item
#     is right when the good sentence has the higher total log-probability;
#   multiple choice (lm-eval-harness): a context (one of CONTEXT_COLUMNS), choices (a list of
#     strings) and label (the right choice's index); each choice is scored as the continuation of
#     the context, after one space (lm-eval-harness's target delimiter) unless either side has it.
# GROUP_COLUMNS that a task has (BLiMP's UID and linguistics_term) give an accuracy per group.
# Every text is preceded by the tokenizer's document start (the byte tokenizer's end-of-document
# id; else bos_token, else eos_token), as a document of the training data is, so that the first
# token is predicted too. No tokenizer runs in the training loop: every item is read and
# tokenized once, before the first step.

BUILTIN_PYTHON_SYNTAX = "builtin:python-syntax"
CONTEXT_COLUMNS = ("context", "ctx", "question")
GROUP_COLUMNS = ("UID", "linguistics_term", "field", "corruption")
TASK_NAMES = (f"a Hub dataset repo (namespace/name[@revision]), a local directory of Parquet files or "
              f"{BUILTIN_PYTHON_SYNTAX!r}")


@dataclasses.dataclass
class Task:
    """A task's items, tokenized: each item's texts (a pair's good and bad sentence, a question's
    choices) as (token ids, how many of the last ones are scored)."""
    name: str  # as evaluation.tasks.names gives it
    key: str  # its short name in records and files
    kind: str  # "minimal_pairs" or "multiple_choice"
    items: np.ndarray  # each item's index in the task's rows (its files in path order, then row order)
    texts: list  # per item, per choice: (token ids, scored tokens)
    label: np.ndarray  # the right choice's index; 0 (the good sentence) for minimal pairs
    text_bytes: np.ndarray  # [items, most choices]: UTF-8 bytes of each scored text, nan where none
    groups: dict  # grouping column: each item's value


def task_rows(start: Start) -> list[Task] | None:
    """evaluation.tasks.names, each read, checked and tokenized."""
    config = start.config
    cfg, encode = config.evaluation.tasks, text_encoder(config)
    keys, tasks = {}, []
    for name in cfg.names:
        key = task_key(name)
        if key in keys:
            raise ConfigError(f"evaluation.tasks.names: {name!r} and {keys[key]!r} have the same short "
                              f"name {key!r}; expected tasks of different names")
        keys[key] = name
        columns, where = read_task(name, cfg.split, config)
        task = tokenize_task(name, key, columns, where, cfg.max_items, encode, config.model.max_seq_len + 1)
        largest = max(int(ids.max()) for item in task.texts for ids, _ in item)
        if largest >= config.model.vocab_size:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size}: the tokenizer data.tokenizer.name="
                              f"{config.data.tokenizer.name!r} gives task {name} token id {largest}; expected "
                              f"the tokenizer of the model's vocabulary")
        tasks.append(task)
    return tasks


def task_key(name: str) -> str:
    """A task's short name: the last part of its repo id or directory, without any @revision."""
    if name.startswith("builtin:"):
        return name[len("builtin:"):]
    return Path(name.split("@")[0].rstrip("/")).name


class ByteEncoder:
    """The byte tokenizer's: each UTF-8 byte is its id."""
    document_start = data.EOD_ID

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class TokenizerEncoder:
    """data.tokenizer.name's tokenizer.json, with the `tokenizers` package, as the checkpoints carry it."""

    def __init__(self, name: str, files: dict[str, bytes]):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("evaluation.tasks needs the tokenizers package: pip install tokenizers") from None
        if "tokenizer.json" not in files:
            raise ConfigError(f"data.tokenizer.name={name!r}: has no tokenizer.json; evaluation.tasks "
                              f"needs one")
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
        settings = json.loads(files.get("tokenizer_config.json", b"{}"))
        starts = [settings.get(k) for k in ("bos_token", "eos_token")]
        starts = [s.get("content") if isinstance(s, dict) else s for s in starts]
        ids = [self.tokenizer.token_to_id(s) for s in starts if s]
        if not any(i is not None for i in ids):
            raise ConfigError(f"data.tokenizer.name={name!r}: its tokenizer_config.json names no "
                              f"bos_token or eos_token; evaluation.tasks starts every text with one")
        self.document_start = next(i for i in ids if i is not None)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def text_encoder(config: Config):
    name = config.data.tokenizer.name
    if name == "bytes":
        return ByteEncoder()
    if name is None:
        raise ConfigError("data.tokenizer.name=None: evaluation.tasks needs the tokenizer that made the "
                          "ids ('bytes' or a Hub model repo) to tokenize its texts")
    return TokenizerEncoder(name, data.tokenizer_files(name, config.model.max_seq_len))


def read_task(name: str, split: str | None, config: Config) -> tuple[dict, list]:
    """A task's columns, every file's rows concatenated in path order, and where each row comes
    from: [(file, its first row's index)]."""
    key = "evaluation.tasks.names"
    if name == BUILTIN_PYTHON_SYNTAX:
        return python_syntax_pairs(config.model.max_seq_len, config.data.seed), [(name, 0)]
    if name.startswith("builtin:"):
        raise ConfigError(f"{key}: {name!r} is not a built-in task; expected {TASK_NAMES}")
    if Path(name).is_dir():
        directory = Path(name)
        if split is not None and (directory / split).is_dir():
            directory, split = directory / split, None
        paths = sorted(directory.rglob("*.parquet"))
        files = [(str(path), path) for path in paths
                 if split is None or data.in_split(path.relative_to(directory).as_posix(), split)]
        if not files:
            of_split = "" if split is None else f" of split {split!r} (a folder {split}/ or files named {split}-*)"
            raise DataError(f"{key}: {name} holds no .parquet files{of_split}")
    elif data.hub_repo(name):
        files = data.hub_parquet_files(name, split, key)
    else:
        raise ConfigError(f"{key}: {name!r} is no directory and no Hub repo id; expected {TASK_NAMES}")
    columns, where = {}, []
    for file, path in files:
        table = data.read_column(file, lambda: pq.read_table(path))
        kind = task_kind(table.schema, file, name)
        if columns and kind != columns["kind"]:
            raise DataError(f"{file}: a {kind.replace('_', ' ')} file in task {name}, whose first file "
                            f"holds {columns['kind'].replace('_', ' ')}; expected one kind of task")
        where.append((file, len(columns.get("label", columns.get("sentence_good", [])))))
        columns["kind"] = kind
        scored = ["sentence_good", "sentence_bad"] if kind == "minimal_pairs" else ["choices", "label"]
        for column in scored + [c for c in GROUP_COLUMNS if c in table.schema.names]:
            columns.setdefault(column, []).extend(checked_column(table, column, file))
        if kind == "multiple_choice":  # one context column, whichever of the names the file uses
            context = next(c for c in CONTEXT_COLUMNS if c in table.schema.names)
            columns.setdefault("context", []).extend(checked_column(table, context, file))
    return columns, where


def task_kind(schema, file: str, name: str) -> str:
    names = set(schema.names)
    if {"sentence_good", "sentence_bad"} <= names:
        return "minimal_pairs"
    if {"choices", "label"} <= names and names & set(CONTEXT_COLUMNS):
        return "multiple_choice"
    raise DataError(f"{file}: task {name} has columns {', '.join(schema.names)}; expected sentence_good "
                    f"and sentence_bad (minimal pairs), or one of {', '.join(CONTEXT_COLUMNS)} with choices "
                    f"and label (multiple choice)")


def checked_column(table, column: str, file: str) -> list:
    """A column's values, checked to be of its kind: text, a list of texts, an integer label."""
    kind = table.schema.field(column).type
    expected = {"choices": "a list of strings", "label": "integers"}.get(column, "strings")
    def text(kind) -> bool:
        return pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if column == "choices":
        fits = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and text(kind.value_type)
    else:
        fits = pa.types.is_integer(kind) if column == "label" else text(kind)
    if not fits:
        raise DataError(f"{file}: column {column!r} has type {kind}; expected {expected}")
    values = table.column(column).to_pylist()
    bad = next((i for i, v in enumerate(values) if v is None or column == "choices" and None in v), None)
    if bad is not None:
        raise DataError(f"{file}: row {bad} holds a null in column {column!r}; expected {expected}")
    return values


def tokenize_task(name: str, key: str, columns: dict, where: list, max_items: int | None, encode,
                  max_len: int) -> Task:
    """The task's items, checked (labels in range), up to max_items spread evenly over them
    (BLiMP's files are sorted by phenomenon: the first N would be one or two), tokenized."""
    kind = columns.get("kind")
    n = len(columns.get("sentence_good" if kind == "minimal_pairs" else "label", []))
    if n == 0:
        raise DataError(f"evaluation.tasks.names: task {name} has no items; expected at least one row")

    def file_of(i: int) -> tuple[str, int]:
        file, first = next((f, first) for f, first in reversed(where) if first <= i)
        return file, i - first
    if kind == "minimal_pairs":
        choices = [[good, bad] for good, bad in zip(columns["sentence_good"], columns["sentence_bad"])]
        labels, contexts = [0] * n, [""] * n
    else:
        choices, labels, contexts = columns["choices"], columns["label"], columns["context"]
        for i, (options, label) in enumerate(zip(choices, labels)):
            if not 0 <= label < len(options):
                file, row = file_of(i)
                raise DataError(f"{file}: row {row} has label {label} for {len(options)} choices; expected "
                                f"an index in [0, {len(options)})")
    picked = np.arange(n) if max_items is None or max_items >= n else data.probe_positions(max_items, n)
    texts, text_bytes = [], np.full((len(picked), max(len(choices[i]) for i in picked)), np.nan)
    for row, i in enumerate(picked):
        context = encode(contexts[i]) if contexts[i] else []
        texts.append([])
        for c, choice in enumerate(choices[i]):
            spaced = not contexts[i] or contexts[i][-1:].isspace() or choice[:1].isspace()
            continuation = choice if spaced else " " + choice
            # lm-eval-harness's split: the context's tokens, then what encoding both together adds
            whole = encode(contexts[i] + continuation) if contexts[i] else encode(continuation)
            ids = [encode.document_start] + whole
            scored = len(whole) - len(context)
            if not choice or scored < 1:  # nothing to score: no log-probability, no normalisation
                file, row_in_file = file_of(i)
                what = ("sentence_good", "sentence_bad")[c] if kind == "minimal_pairs" else f"choice {c}"
                raise DataError(f"{file}: row {row_in_file}'s {what} is empty"
                                f"{'' if not choice else ' once tokenized'}; expected text")
            texts[-1].append((np.array(ids[-max_len:], dtype=np.int64), min(scored, max_len - 1)))
            text_bytes[row, c] = len(continuation.encode("utf-8"))
    groups = {column: [columns[column][i] for i in picked] for column in GROUP_COLUMNS if column in columns}
    return Task(name, key, kind, picked, texts, np.array([labels[i] for i in picked]), text_bytes, groups)


def python_syntax_pairs(seq_len: int, seed: int, per_corruption: int = 200) -> dict:
    """The offline demo's minimal pairs: lines of Python from the embedded corpus's held-out rows
    (data.prepare_local's val split, which the run does not train on), each against the same
    line made ungrammatical, of the same length so that a model that knows nothing (step 0) is at
    chance. Two corruptions, as the "corruption" group: "bracket", a closing bracket replaced by
    another kind (`f(x)` -> `f(x]`); "swap", two adjacent words swapped (`return x` -> `x
    return`). Only lines with no string or comment (where a word or a bracket could be text)
    that Python parses alone or as a block's head, and only corruptions that it then refuses.
    Seeded by data.seed, as the corpus is: the same pairs for every run of the same corpus."""
    corpus = data.prepare_local(seq_len, seed)
    held_out = data.split_files(data.list_shards(corpus), "val", corpus)
    rows = [row for path in held_out for row in data.read_rows(path, seq_len + 1, data.BYTE_VOCAB_SIZE)[0]]
    lines = []
    for row in rows:
        for document in np.split(row, np.flatnonzero(row == data.EOD_ID)):
            # whole lines only: a document's ends are cut by the row's, or by its EOD
            for line in bytes(document[document != data.EOD_ID].astype(np.uint8)).split(b"\n")[1:-1]:
                line = line.strip()
                if 12 <= len(line) <= min(80, seq_len - 1) and line.isascii() and not set(line) & set(b"'\"#\\"):
                    lines.append(line.decode())
    lines = list(dict.fromkeys(lines))  # each line once, in corpus order
    rng = np.random.default_rng([seed, 1])
    made = {"bracket": [], "swap": []}
    for line in (line for line in lines if parses(line)):  # code, not the prose of a docstring
        for corruption in made:
            bad = corrupt(line, corruption, rng)
            if bad is not None and not parses(bad):
                made[corruption].append((line, bad))
    good, bad, kinds = [], [], []
    for corruption, pairs in made.items():
        for i in data.probe_positions(min(per_corruption, len(pairs)), len(pairs)) if pairs else []:
            good.append(pairs[i][0])
            bad.append(pairs[i][1])
            kinds.append(corruption)
    return {"kind": "minimal_pairs", "sentence_good": good, "sentence_bad": bad, "corruption": kinds}


def parses(line: str) -> bool:
    """Whether a line is a Python statement alone, or the head of a block (`def f(x):`)."""
    for source in (line, line + " pass"):
        try:
            compile(source, "<line>", "exec")
            return True
        except (SyntaxError, ValueError):
            pass
    return False


def corrupt(line: str, corruption: str, rng: np.random.Generator) -> str | None:
    """The line made ungrammatical by `corruption`, or None where it cannot be."""
    if corruption == "bracket":  # only where the line's own brackets match, so that the change breaks them
        stack, closing = [], []
        for i, char in enumerate(line):
            if char in "([{":
                stack.append(char)
            elif char in ")]}":
                if not stack or "([{"[")]}".index(char)] != stack.pop():
                    return None
                closing.append(i)
        if stack or not closing:
            return None
        i = closing[rng.integers(len(closing))]
        other = [c for c in ")]}" if c != line[i]][rng.integers(2)]
        return line[:i] + other + line[i + 1:]
    words = [m for m in re.finditer(r"\w+", line)]
    # two words with only spaces between: in Python a keyword and a name, never right the other way round
    pairs = [(a, b) for a, b in zip(words, words[1:]) if line[a.end():b.start()].isspace() and a[0] != b[0]]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    return line[:a.start()] + b[0] + line[a.end():b.start()] + a[0] + line[b.end():]


@torch.no_grad()
def tasks(model: PicoDecoder, rows: list[Task], at: At) -> Measured:
    """Each task's accuracy, overall and per group, in step_N.json and metrics.jsonl; each item's
    result in step_N_tasks.npz, one array per task (task_results)."""
    results, record, per_row, line = {}, {}, {}, []
    for task in rows:
        logp = choice_logprobs(model, task, at.config.evaluation.tasks.batch_size, at.device, at.autocast)
        summary, items = task_results(task, logp)
        results[task.key] = summary
        record.update({f"tasks/{task.key}/{name}": value for name, value in summary.items()
                       if isinstance(value, float)})  # chance too, for a plot to draw
        record.update({f"tasks/{task.key}/{column}/{value}": accuracy
                       for column, by_value in summary["groups"].items() for value, accuracy in by_value.items()})
        per_row[task.key] = items
        line.append(f"{task.key} {summary['accuracy']:.3f} (chance {summary['chance']:.3f})")
    return Measured(results={"tasks": results}, record=record, per_row={"tasks": per_row},
                    line=f"tasks step {at.step} | " + " | ".join(line))


def choice_logprobs(model: PicoDecoder, task: Task, batch_size: int, device: torch.device, autocast) -> np.ndarray:
    """[items, most choices]: the summed log-probability of each choice's scored tokens, nan where
    an item has fewer choices. Each rank scores its block of the items; every rank returns all."""
    mine, counts = my_rows(task.texts)
    texts = [text for item in mine for text in item]
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i][0]))  # batches of like lengths: little padding
    scores = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        chunk = [texts[i] for i in by_length[start:start + batch_size]]
        inputs, labels = data.collate([ids for ids, _ in chunk])
        for i, (ids, scored) in enumerate(chunk):  # only the continuation's tokens count
            labels[i, :len(ids) - 1 - scored] = -100
        with autocast:
            _, losses = model(inputs.to(device), labels.to(device), reduction="none")
        scores.append(-losses.double().sum(dim=1))
    model.train()
    logp = torch.full((len(mine), task.text_bytes.shape[1]), math.nan, dtype=torch.float64, device=device)
    if scores:  # a rank may have no items, when there are fewer than ranks
        item, choice = zip(*[(i, c) for i, texts_of_item in enumerate(mine) for c in range(len(texts_of_item))])
        order = torch.tensor(by_length, device=device)
        logp[torch.tensor(item, device=device)[order], torch.tensor(choice, device=device)[order]] = torch.cat(scores)
    return gather_rows(logp, counts).cpu().numpy()


def task_results(task: Task, logp: np.ndarray) -> tuple[dict, np.ndarray]:
    """A task's summary (step_N.json's) and each item's result (a structured array) from each
    choice's log-probability."""
    label, n = task.label, len(task.items)
    tokens = np.array([[scored for _, scored in item] + [np.nan] * (logp.shape[1] - len(item))
                       for item in task.texts], dtype=np.float64)
    right = logp[np.arange(n), label]
    if task.kind == "minimal_pairs":
        margin = logp[:, 0] - logp[:, 1]
        fields = {"item": task.items, "correct": margin > 0, "margin": margin, "logp_good": logp[:, 0],
                  "logp_bad": logp[:, 1]}
        summary = {"kind": task.kind, "items": n, "chance": 0.5, "accuracy": float(fields["correct"].mean())}
    else:
        per_token, per_byte = logp / tokens, logp / task.text_bytes

        def best(scores):  # nan (no such choice) never wins
            return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
        others = np.where(np.arange(logp.shape[1]) == label[:, None], np.nan, per_token)
        others_best = np.max(np.where(np.isnan(others), -np.inf, others), axis=1)
        bits = -right / (math.log(2) * task.text_bytes[np.arange(n), label])
        fields = {"item": task.items, "label": label, "correct": best(per_token) == label,
                  "correct_per_byte": best(per_byte) == label, "correct_raw": best(logp) == label,
                  "margin": per_token[np.arange(n), label] - others_best, "bits_per_byte": bits,
                  "logp": logp, "per_token": per_token, "per_byte": per_byte}
        right_bytes = task.text_bytes[np.arange(n), label].sum()
        summary = {"kind": task.kind, "items": n,
                   "chance": float(np.mean(1 / np.sum(~np.isnan(task.text_bytes), axis=1))),
                   "accuracy": float(fields["correct"].mean()),
                   "accuracy_per_byte": float(fields["correct_per_byte"].mean()),
                   "accuracy_raw": float(fields["correct_raw"].mean()),
                   "bits_per_byte": float(-right.sum() / (math.log(2) * right_bytes))}
    summary["groups"] = {column: {str(value): float(fields["correct"][np.array(values) == value].mean())
                                  for value in sorted(set(values))} for column, values in task.groups.items()}
    return summary, structured(fields)


def structured(fields: dict) -> np.ndarray:
    """A structured array of equally long columns, some of them 2-D (one value per choice)."""
    columns = {name: np.asarray(values) for name, values in fields.items()}
    out = np.empty(len(next(iter(columns.values()))),
                   dtype=[(name, values.dtype, values.shape[1:]) for name, values in columns.items()])
    for name, values in columns.items():
        out[name] = values
    return out


# What a checkpoint can measure, by its name in evaluation.metrics, in the order they run: (its
# rows, read once at start, or None for nothing to measure; the measurement). --------------------

MEASUREMENTS = {
    "paloma": (eval_rows, paloma),
    "probe": (probe_rows, probe),
    "induction": (induction_rows, induction),
    "attention": (attention_rows, attention_entropy),
    "tasks": (task_rows, tasks),
}


def chosen(config: Config) -> list[str]:
    """The names in evaluation.metrics, each checked to be one of MEASUREMENTS'."""
    names = config.evaluation.metrics or []
    if unknown := [name for name in names if name not in MEASUREMENTS]:
        raise ConfigError(f"evaluation.metrics={names!r}: {unknown[0]!r} is not a measurement; expected "
                          f"names of evaluation.py's MEASUREMENTS: {', '.join(MEASUREMENTS)}")
    return names


class Evaluation:
    """The measurements that are on, with their rows, run on each checkpoint by every rank."""

    def __init__(self, start: Start, run_dir: Path):
        on = [(name, measure, rows) for name, (read, measure) in MEASUREMENTS.items()
              if name in chosen(start.config) and (rows := read(start)) is not None]
        self.names, self.measures = [name for name, _, _ in on], [(measure, rows) for _, measure, rows in on]
        self.dir, self.notes = run_dir / "eval_results", start.notes

    def done(self, step: int) -> bool:
        """Whether checkpoint `step` is evaluated, or has nothing to evaluate."""
        return not self.measures or evaluated(self.dir.parent, step)

    def run_state(self) -> dict:
        """What a run resumed from a checkpoint carries on with: the probe's rows, which stay the
        same when training.max_steps changes."""
        return {"probe_positions": rows.positions.tolist() for measure, rows in self.measures
                if measure is probe}

    def __call__(self, model: PicoDecoder, at: At, records: Records):
        """Checkpoint at.step's measurements, unless an earlier start made them: rank 0 writes each
        one's per-row files and record as it comes, and eval_results/step_N.json last, whose
        absence makes a resumed run measure the checkpoint again (dropping its records first)."""
        out = self.dir / f"step_{at.step}.json"
        if not self.measures or out.exists():
            return
        results = {}
        for measure, rows in self.measures:
            measured = measure(model, rows, at)
            results.update(measured.results)
            if world()[1] == 0:
                self.dir.mkdir(exist_ok=True)
                for name, array in measured.inputs.items():  # the same at every checkpoint: kept once
                    path = self.dir / f"{name}.npy"
                    if not path.exists() or not np.array_equal(np.load(path), array):
                        save_array(path, array)
                for name, array in measured.per_row.items():
                    suffix = "npz" if isinstance(array, dict) else "npy"
                    save_array(self.dir / f"step_{at.step}_{name}.{suffix}", array)
                if measured.record:
                    records.write({"step": at.step, **measured.record}, evaluation=True)
                if measured.line:
                    records.log.info(measured.line)
        if world()[1] == 0:
            write_atomically(out, json_line(results))


def evaluated(run_dir: Path, step: int) -> bool:
    """Whether checkpoint `step` has its evaluation: eval_results/step_N.json, written last."""
    return (run_dir / "eval_results" / f"step_{step}.json").exists()
