"""Everything measured on a checkpoint's weights: each checkpoint N is evaluated once it is saved.

A measurement is a function `measure(model, rows, at) -> Measured`: of the model, the rows it
measures and the checkpoint `at` (its step, the config, the device). It returns its entries of
eval_results/step_N.json, its record of metrics.jsonl, any per-row arrays (each saved as
eval_results/step_N_{name}.npy, or several as one .npz) and a line for the log. Every rank runs it the same way: each
takes its block of the rows (distributed.my_rows) and the results are gathered or summed over the
ranks, so every rank returns the same and rank 0 writes them.

Its rows are read once, before the first step, by a function of the run's start that returns
None when the measurement is off, so that a bad input stops the run before anything is trained or
written. MEASUREMENTS pairs the two: adding a measurement is a function and a line there.

    perplexity   the evaluation set (Paloma): perplexity overall and per source, each row's loss
    probe        the training probe: rows spread over the run, each one's loss and Pythia's
                 memorization test, by whether and how long ago the run trained on it
"""

import contextlib
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from checkpoint import save_array, write_atomically
from config import Config, ConfigError
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


# Perplexity on the evaluation set ------------------------------------------------------------

def eval_rows(start: Start):
    """evaluation.paloma's rows, when evaluation.metrics holds "paloma"."""
    config = start.config.evaluation
    if "paloma" not in (config.metrics or []):
        return None
    rows = start.eval_sets.read(config.paloma.dataset_name, config.paloma.dataset_split,
                                key="evaluation.paloma.dataset_name")
    if not rows:
        raise ConfigError(f"evaluation.paloma.dataset_name={config.paloma.dataset_name!r}: its "
                          f"{config.paloma.dataset_split!r} split has no rows; expected an evaluation set")
    return rows


def paloma(model: PicoDecoder, rows, at: At) -> Measured:
    """Perplexity on the evaluation set (overall, per source, bits per byte for the byte
    tokenizer); each row's loss in step_N_rows.npy."""
    r = evaluate(model, rows, at.config.evaluation.paloma.batch_size, at.device, at.autocast,
                 byte_level=at.config.data.tokenizer.name == "bytes")
    per_row = r.pop("rows")
    by_source = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("perplexity/")}
    bits = f" | {r['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in r else ""
    return Measured(results={"paloma": r["perplexity"], **({"paloma_by_source": by_source} if by_source else {})},
                    record={f"paloma_{k}": v for k, v in r.items()}, per_row={"rows": per_row},
                    line=f"eval step {at.step} | paloma perplexity {r['perplexity']:.3f} | loss "
                         f"{r['loss']:.4f} | {r['tokens']:,} tokens{bits}")


@torch.no_grad()
def evaluate(model: PicoDecoder, rows: list, batch_size: int, device: torch.device, autocast,
             byte_level: bool) -> dict:
    """Perplexity of the model on the evaluation rows: exp of the mean next-token loss over all
    their tokens. (pico-train's `evaluate` metric averages per-sequence perplexities instead,
    which weighs a short sequence as much as a long one.) Rows may differ in length
    (data.collate). Under torch.distributed each rank evaluates its block of the rows and the
    sums are added up (a collective): every rank returns the same results. results["rows"]: each
    row's mean loss and its number of tokens, in order (the per-example probe)."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = 0
    sources = getattr(rows, "sources", None)  # data.EvalRows: each row's source (Paloma's corpora)
    rows, counts = my_rows(rows)
    row_nll = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs, labels = data.collate(chunk)
        counted = int((labels != -100).sum())  # counted on the host: the loop need not wait for the GPU
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast:
            logits, loss = model(inputs, labels)
        nll += loss.double() * counted
        n_tokens += counted
        n_bytes += sum(int((row[1:] < 256).sum()) for row in chunk) if byte_level else 0
        for row_logits, row_labels in zip(logits, labels):  # one row's float32 logits at a time
            row_nll.append(F.cross_entropy(row_logits.float(), row_labels, ignore_index=-100,
                                           reduction="sum"))
    model.train()
    lengths = torch.tensor([len(row) - 1 for row in rows], dtype=torch.float64, device=device)
    mine = torch.stack([torch.stack(row_nll).double() if row_nll else lengths.new_zeros(0), lengths], dim=1)
    per_row = gather_rows(mine, counts).cpu().numpy()
    totals = torch.stack([nll, nll.new_tensor(n_tokens), nll.new_tensor(n_bytes)])  # float64, on the device
    if dist.is_initialized():
        dist.all_reduce(totals)
    nll, n_tokens, n_bytes = totals.tolist()
    mean_loss = nll / n_tokens
    results = {"perplexity": perplexity(mean_loss), "loss": mean_loss, "tokens": int(n_tokens),
               "rows": np.rec.fromarrays([per_row[:, 0] / per_row[:, 1], per_row[:, 1].astype(np.int64)],
                                         names="loss,tokens")}
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


# What every checkpoint measures, in this order: (its rows, read at start; the measurement). ------

MEASUREMENTS = [
    (eval_rows, paloma),
    (probe_rows, probe),
]


class Evaluation:
    """The measurements that are on, with their rows, run on each checkpoint by every rank."""

    def __init__(self, start: Start, run_dir: Path):
        self.measures = [(measure, rows) for read, measure in MEASUREMENTS if (rows := read(start)) is not None]
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
