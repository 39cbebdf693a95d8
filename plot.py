"""The curves a researcher looks at first, of one run or of several side by side, in one PNG.

    python plot.py runs/RUN [--out runs/RUN/curves.png]
    python plot.py runs/A runs/B ... [--x tokens] [--log-x] [--out compare.png]
    python plot.py runs/A runs/B ... --table [--out compare.png]      # compare.csv and compare.md

Reads RUN/metrics.jsonl (each step's last record wins, as after a resume) and draws, each where
the run recorded it: the training loss with the evaluation loss and loss spikes, the evaluation
perplexity (also per source), the learning rate, the gradient norm, the throughput, the training
probe's loss and memorization (seen and unseen rows), per layer (monitoring.logging.layer_stats)
the weight norm, the gradient norm and the update over the weights, and the behaviour measured at
each checkpoint: the in-context learning score, induction heads, attention entropy, each task's
accuracy against its chance level. From
RUN/eval_results, the loss at each position of every checkpoint. Needs matplotlib, an optional
extra: pip install matplotlib.

Several runs share the panels, one colour per run, and one legend names each run with what sets it
apart: the keys of its training_config.yaml whose values differ among the runs (led by the
parameter count where the model differs). --table writes, instead of the figure, each run's
measurements at the checkpoints that all the runs share, as CSV and as markdown (no matplotlib).
"""

import argparse
import contextlib
import csv
import dataclasses
import fnmatch
import json
import math
import re
import textwrap
from pathlib import Path

import yaml

from checkpoint import step_directories
from config import flat
from records import EVALUATION

# Where a run is kept, not what it is: its name already says it, so no legend lists them
PLACE = {"checkpointing.run_name", "checkpointing.runs_dir"}
LEGEND_KEYS = 6  # differing keys a legend entry lists; the table's CSV has them all
SIGNIFICANT = 5  # digits of the markdown table; the CSV holds the values as recorded


@dataclasses.dataclass
class Run:
    dir: Path
    name: str  # the directory's name; the path as given where two runs share a name
    config: dict | None  # training_config.yaml, flat: {"model.d_model": 96, ...}; None: missing
    series: dict[str, list[tuple[int, float]]]  # read_metrics'
    measured: list[str]  # the keys of its evaluation records, in the order first recorded
    checkpoints: set[int]  # the steps of its checkpoints: evaluated, or in checkpoints/

    def tokens_per_step(self) -> int:
        """The global batch in tokens, as the trainer counts tokens_seen."""
        path = self.dir / "training_config.yaml"
        if self.config is None:
            raise SystemExit(f"error: {path}: no such file; expected the run's resolved config, whose "
                             f"global batch in tokens --x tokens counts by")
        try:
            return self.config["data.dataloader.batch_size"] * self.config["model.max_seq_len"]
        except KeyError as e:
            raise SystemExit(f"error: {path}: no {e.args[0]}; expected the run's resolved config") from None


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, in the order written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; expected a run directory (runs/RUN)")
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line a crash cut short; the trainer drops it on resume
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def number(value) -> float | None:
    """A record's value as a float: a JSON number, or a number that is not finite as
    records.json_line spells it ("Infinity", "NaN"); None for anything else."""
    if isinstance(value, bool):
        return None
    return float(value) if isinstance(value, (int, float)) or value in ("Infinity", "-Infinity", "NaN") else None


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] in step order} of every number metrics.jsonl holds."""
    return series_of(read_records(run_dir))


def series_of(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    by_step: dict[tuple[str, int], float] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and (value := number(value)) is not None:
                by_step[key, record["step"]] = value
    series: dict[str, list[tuple[int, float]]] = {}
    for (key, step), value in sorted(by_step.items(), key=lambda item: item[0][1]):
        series.setdefault(key, []).append((step, value))
    return series


def read_config(run_dir: Path) -> dict | None:
    """training_config.yaml as {dotted key: value}; None where the run has none."""
    path = run_dir / "training_config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {path}: cannot be read ({str(e).splitlines()[0]}); expected the run's "
                         f"resolved config") from None
    if not isinstance(config, dict):
        raise SystemExit(f"error: {path}: holds {type(config).__name__}; expected the run's resolved config, "
                         f"a mapping of its six sections")
    return flat(config)


def read_runs(run_dirs: list[Path]) -> list[Run]:
    runs = []
    for run_dir in run_dirs:
        if twice := next((r.dir for r in runs if r.dir.resolve() == run_dir.resolve()), None):
            raise SystemExit(f"error: {run_dir}: given twice (also as {twice}); expected each run once")
        records = read_records(run_dir)
        measured = [key for record in records if record.get(EVALUATION) is True for key in record
                    if number(record[key]) is not None and key != "step"]
        checkpoints = {r["step"] for r in records if r.get(EVALUATION) is True} | {
            int(p.name[len("step_"):]) for p in step_directories(run_dir / "checkpoints")}
        runs.append(Run(run_dir, run_dir.resolve().name, read_config(run_dir), series_of(records),
                        list(dict.fromkeys(measured)), checkpoints))
    for run in runs:
        if sum(other.name == run.name for other in runs) > 1:
            run.name = str(run.dir)
    return runs


def differences(runs: list[Run]) -> list[dict]:
    """For each run, {key: value} of what sets it apart: the keys of training_config.yaml whose
    values differ among the runs that have one (a value of None, or none, is left out), led by
    "params", the parameter count, where a model key differs. Generic, so that whatever an
    experiment changed (a size, a seed, a data order, the checkpoint a run branched from) shows."""
    configs = [run.config for run in runs if run.config is not None]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    differ = [key for key in keys if key not in PLACE and len({repr(c.get(key)) for c in configs}) > 1]
    sized = any(key.startswith("model.") for key in differ)
    return [{} if run.config is None else {
        **({"params": params} if sized and (params := parameter_count(run.config)) else {}),
        **{key: run.config[key] for key in differ if run.config.get(key) is not None}} for run in runs]


def parameter_count(config: dict) -> int | None:
    """The model's parameters, counted by model.py on the meta device (no memory); None for a model
    section that this model.py cannot build (another version's)."""
    import torch

    from model import ModelConfig, PicoDecoder
    try:
        shape = ModelConfig(**{key[len("model."):]: value for key, value in config.items() if key.startswith("model.")})
    except TypeError:  # a field this ModelConfig does not have
        return None
    if shape.problems():
        return None
    with torch.device("meta"):
        return PicoDecoder(shape).num_params()


def apart(differs: dict, runs: list[Run]) -> str:
    """What sets a run apart (its differences()), short: each key by the shortest end of its dotted
    name that no other key of the runs' configs has (d_model, training.seed), at most LEGEND_KEYS."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config or {}))

    def short(key):
        parts = key.split(".")
        ends = (".".join(parts[-n:]) for n in range(1, len(parts)))
        return next((end for end in ends if sum(k == end or k.endswith("." + end) for k in keys) == 1), key)
    said = [f"{count(value)} params" if key == "params" else f"{short(key)}={shown(value)}"
            for key, value in differs.items()]
    more = f", and {len(said) - LEGEND_KEYS} more (--table)" if len(said) > LEGEND_KEYS else ""
    return ", ".join(said[:LEGEND_KEYS]) + more


def count(n: int) -> str:
    """11282784 as 11.3M."""
    return next((f"{n / size:.3g}{unit}" for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)) if n >= size),
                str(n))


def shown(value) -> str:
    """A config value, short: a run's checkpoint (runs/RUN/checkpoints/step_N, the run directory's
    layout) as RUN/step_N, a long string by its end."""
    if isinstance(value, str):
        if checkpoint := re.search(r"([^/]+)/checkpoints/(step_\d+)/?$", value):
            return f"{checkpoint[1]}/{checkpoint[2]}"
        return value if len(value) <= 32 else "…" + value[-31:]
    return f"{value:g}" if isinstance(value, float) else str(value)


def chosen_keys(runs: list[Run], patterns: list[str]) -> list[str]:
    """The recorded keys that --metrics's shell-style patterns match, in the order recorded."""
    recorded = list(dict.fromkeys(key for run in runs for key in run.series))
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in recorded):
            raise SystemExit(f"error: --metrics {pattern!r}: no key of the runs' metrics.jsonl matches; "
                             f"expected one of {', '.join(recorded[:12])}{', ...' if len(recorded) > 12 else ''}")
    return [key for key in recorded if any(fnmatch.fnmatchcase(key, p) for p in patterns)]


def panels(series: dict) -> list[tuple[str, list[str], bool]]:
    """(title, keys, log y axis) of each panel the run has data for."""
    def per_layer(kind):  # in the model's order (and the evaluation's per source)
        return [key for key in series if key.startswith(kind + "/")]
    found = [("loss", ["loss", "paloma_loss", "loss_spike"], False),
             ("evaluation perplexity", ["paloma_perplexity", *per_layer("paloma_perplexity")], True),
             ("learning rate", ["lr"], False),
             ("gradient norm", ["grad_norm"], True),
             ("tokens/s", ["tokens_per_s"], False),
             ("training probe loss", ["probe/loss_seen", "probe/loss_unseen"], False),
             ("training probe memorized", [f"probe/{m}_{g}" for m in ("exact_match", "token_match")
                                           for g in ("seen", "unseen")], False),
             ("in-context learning score (late minus early position's loss)", ["paloma_icl_score"], False),
             ("induction heads: prefix matching, best head", ["induction/prefix_matching_max",
                                                             *per_layer("induction/prefix_matching")], False),
             ("induction: loss on random tokens and on their repeat", ["induction/loss_first_half",
                                                                      "induction/loss_second_half"], False),
             ("attention entropy per layer (nats)", per_layer("attention/entropy"), False),
             ("weight norm per layer", per_layer("weight_norm"), False),
             ("gradient norm per layer", per_layer("grad_norm"), True),
             ("update / weight norm per layer", per_layer("update_ratio"), True)]
    for task in [key.split("/")[1] for key in series if re.fullmatch(r"tasks/[^/]+/accuracy", key)]:
        overall = [f"tasks/{task}/{name}" for name in ("accuracy", "accuracy_per_byte", "accuracy_raw")]
        groups = [key for key in series if key.startswith(f"tasks/{task}/") and key.count("/") == 3]
        found.append((f"task {task}: accuracy (dashed: chance)", overall + (groups if len(groups) <= 12 else []),
                      False))
    found.append(("tasks: bits per byte of the right choice",
                  [key for key in series if re.fullmatch(r"tasks/[^/]+/bits_per_byte", key)], False))
    return [(title, [key for key in keys if key in series], log) for title, keys, log in found
            if any(key in series for key in keys)]


def read_loss_by_position(run_dir: Path) -> dict[int, list[float]]:
    """{checkpoint step: the mean evaluation loss at each position}, from eval_results/step_N.json."""
    found = {}
    for path in (run_dir / "eval_results").glob("step_*.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError):  # one being written: drawn next time
            found[int(path.stem[len("step_"):])] = [float(v) for v in json.loads(path.read_text())[
                "paloma_loss_by_position"]]
    return dict(sorted(found.items()))


def write_table(run_dirs: list[Path], csv_path: Path, markdown_path: Path, patterns: list[str] | None = None):
    """Each run at each checkpoint that all the runs share (steps in metrics.jsonl's evaluation
    records or in checkpoints/), as CSV, one row per run and step in the runs' order: run, step,
    tokens (empty without training_config.yaml), what sets the runs apart (params, then the config
    keys by their full names), then the metrics, each the value recorded at that step or empty; and
    as markdown, one table per metric with a column per run. Metrics: --metrics's keys, or the
    training loss and every measurement of the checkpoints' evaluation."""
    runs = read_runs(run_dirs)
    shared = sorted(set.intersection(*(run.checkpoints for run in runs)))
    if not shared:
        raise SystemExit(f"error: {', '.join(str(run.dir) for run in runs)}: no checkpoint step that all of them "
                         f"have (checkpoints/step_N or an evaluation record); expected runs that share checkpoints")
    values = [{(key, step): value for key, points in run.series.items() for step, value in points} for run in runs]
    keys = chosen_keys(runs, patterns) if patterns else list(dict.fromkeys(
        ["loss", *(key for run in runs for key in run.measured)]))
    keys = [key for key in keys if any((key, step) in at for at in values for step in shared)]
    differs = differences(runs)
    told = list(dict.fromkeys(key for differ in differs for key in differ))
    rows = []
    for run, differ, at in zip(runs, differs, values):
        tokens = run.tokens_per_step() if run.config else None
        rows += [[run.name, step, None if tokens is None else step * tokens, *(differ.get(key) for key in told),
                  *(at.get((key, step)) for key in keys)] for step in shared]
    lines = [f"# {len(runs)} runs at the {len(shared)} checkpoints they share", "",
             f"Rounded to {SIGNIFICANT} significant digits; {csv_path.name} holds the values as recorded.", "",
             "| run | what sets it apart | tokens per step |", "| --- | --- | ---: |"]
    lines += [f"| {run.name} | {apart(differ, runs)} | {run.config and run.tokens_per_step() or ''} |"
              for run, differ in zip(runs, differs)]
    for key in keys:
        lines += ["", f"## {key}", "", "| step | " + " | ".join(run.name for run in runs) + " |",
                  "| ---: |" + " ---: |" * len(runs)]
        lines += [f"| {step} | " + " | ".join("" if at.get((key, step)) is None else f"{at[key, step]:.{SIGNIFICANT}g}"
                                            for at in values) + " |" for step in shared]
    with open(csv_path, "w", newline="") as f:  # csv writes a float as repr does: the value as recorded
        writer = csv.writer(f)
        writer.writerow(["run", "step", "tokens", *told, *keys])
        writer.writerows([["" if value is None else value for value in row] for row in rows])
    markdown_path.write_text("\n".join(lines) + "\n")


def plot(run_dirs: list[Path], out: Path, x: str = "step", log_x: bool = False):
    draw(read_runs(run_dirs), x, log_x).savefig(out, dpi=100)


def draw(runs: list[Run], x: str = "step", log_x: bool = False):
    """The figure of plot(): a panel per thing recorded, x by step or by tokens."""
    per_step = [run.tokens_per_step() if x == "tokens" else 1 for run in runs]
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is None:
        raise SystemExit("error: plot.py needs matplotlib, an optional extra: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    several = len(runs) > 1  # then a run is a colour, and a panel's keys are dashes or shades
    shown = panels({key: None for run in runs for key in run.series})
    if not shown:
        raise SystemExit(f"error: {', '.join(str(run.dir / 'metrics.jsonl') for run in runs)}: no records to plot yet")
    by_position = [read_loss_by_position(run.dir) for run in runs]
    columns = 2
    rows = math.ceil((len(shown) + any(by_position)) / columns)
    legend = 0.5 + 0.45 * math.ceil(len(runs) / 2)  # several: a first row, two columns of three-line entries
    figure, axes = plt.subplots(several + rows, columns, squeeze=False,
                                figsize=(6 * columns, 3.2 * rows + several * legend),
                                gridspec_kw={"height_ratios": [legend] + [3.2] * rows} if several else None)
    cells = list(axes.flat)[columns * several:]
    colours = [plt.get_cmap("tab10")(i) if len(runs) <= 10 else plt.get_cmap("viridis")(i / (len(runs) - 1))
               for i in range(len(runs))]
    for ax, (title, keys, log) in zip(cells, shown):
        for j, key in enumerate(keys):
            for i, run in enumerate(runs):
                if key not in run.series:
                    continue
                steps, values = zip(*run.series[key])
                style = {"color": colours[i], **key_style(j, len(keys))} if several else {"label": key}
                ax.plot([step * per_step[i] for step in steps], values, **marks(key, len(steps)), **style)
        if log and all(v > 0 for run in runs for key in keys for _, v in run.series.get(key, []) if math.isfinite(v)):
            ax.set_yscale("log")
        for chance in {f"tasks/{key.split('/')[1]}/chance" for key in keys if key.startswith("tasks/")}:
            for level in {run.series[chance][-1][1] for run in runs if chance in run.series}:
                ax.axhline(level, color="gray", linestyle="--", linewidth=1)  # what its accuracy rises from
        ax.set_title(title)
        ax.set_xlabel(x)
        if log_x:
            ax.set_xscale("symlog", linthresh=min(per_step))
            ax.set_xlim(left=0)  # not the margin's negative decades
        if len(keys) > 1 and several:  # which key is which, in gray: the colours are the runs'
            ax.legend(handles=[Line2D([], [], color="0.3", label=key, **marks(key, math.inf), **key_style(j, len(keys)))
                               for j, key in enumerate(keys)], fontsize=6, ncol=2 if len(keys) > 8 else 1)
        elif len(keys) > 1:
            ax.legend(fontsize=6, ncol=2 if len(keys) > 8 else 1)
    if any(by_position):  # the loss at each position: its drop at late positions is in-context learning
        ax = cells[len(shown)]
        if several:  # each run at the last checkpoint they all have, else at its own last
            common = set.intersection(*(set(curves) for curves in by_position if curves))
            for i, curves in enumerate(by_position):
                if curves:
                    losses = curves[max(common or curves)]
                    ax.plot(range(len(losses)), losses, color=colours[i], linewidth=1)
            ax.set_title(f"evaluation loss by position, at step {max(common)}" if common
                         else "evaluation loss by position, at each run's last checkpoint")
        else:  # one curve per checkpoint, later ones darker
            shades = plt.get_cmap("viridis")
            for i, (step, losses) in enumerate(by_position[0].items()):
                ax.plot(range(len(losses)), losses, color=shades(i / max(1, len(by_position[0]) - 1)), linewidth=1,
                        label=f"step {step}" if i in (0, len(by_position[0]) - 1) else None)
            ax.set_title("evaluation loss by position, each checkpoint")
            ax.legend(fontsize=6)
        ax.set_xscale("symlog")
        ax.set_xlabel("position")
    for ax in cells[len(shown) + any(by_position):]:
        ax.set_visible(False)
    if several:
        for ax in axes[0]:
            ax.remove()
        ax = figure.add_subplot(axes[0, 0].get_gridspec()[0, :])
        ax.axis("off")
        ax.legend(handles=[Line2D([], [], color=colour, linewidth=2, label=textwrap.fill(
            f"{run.name}: {apart(differ, runs)}" if differ else run.name, 80, subsequent_indent="    "))
            for run, differ, colour in zip(runs, differences(runs), colours)],
            loc="upper center", ncol=2, fontsize=8, frameon=False, title="runs, and what sets each apart")
    else:
        figure.suptitle(runs[0].dir.resolve().name)
    figure.tight_layout()
    plt.close(figure)  # pyplot lets it go; the caller saves it
    return figure


DASHES = ["-", "--", ":", "-."]


def marks(key: str, points: int) -> dict:
    """A loss spike is marked, not joined; a curve of few points shows them."""
    spikes = key == "loss_spike"
    return {"marker": "x" if spikes else "." if points < 30 else None, "linewidth": 0 if spikes else 1}


def key_style(j: int, n: int) -> dict:
    """How several runs draw a panel's j-th of n keys: by dash for a few keys, by shade for many
    (the first, the embedding or a source, lightest)."""
    return {"linestyle": DASHES[j]} if n <= len(DASHES) else {"alpha": 0.25 + 0.75 * j / (n - 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN",
                        help="run directories, runs/RUN; several share the panels")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN/curves.png, or compare.png for "
                        "several runs); --table writes its .csv and .md instead (default: RUN/table, compare)")
    parser.add_argument("--x", choices=["step", "tokens"], default="step",
                        help="the x axis: optimizer steps, or tokens trained on: step x data.dataloader.batch_size "
                        "x model.max_seq_len, from each run's training_config.yaml")
    parser.add_argument("--log-x", action="store_true",
                        help="a logarithmic x axis, matplotlib's symlog: linear from 0 to one step, so that step 0 "
                        "(the initialisation) stays on it, logarithmic beyond")
    parser.add_argument("--table", action="store_true",
                        help="instead of the figure: each run's metrics at the checkpoints all the runs share, as "
                        f"CSV (each value as recorded) and markdown (rounded to {SIGNIFICANT} significant digits)")
    parser.add_argument("--metrics", nargs="+", metavar="PATTERN",
                        help="--table's metrics: keys of metrics.jsonl, shell-style patterns ('paloma_*', "
                        "'tasks/*/accuracy'); default: the training loss and the checkpoints' evaluation")
    args = parser.parse_args(argv)
    if args.metrics and not args.table:
        raise SystemExit("error: --metrics chooses the columns of --table; expected --table with it")
    one = len(args.run_dirs) == 1
    if args.table:
        stem = args.out or (args.run_dirs[0] / "table" if one else Path("compare"))
        csv_path, markdown_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
        write_table(args.run_dirs, csv_path, markdown_path, args.metrics)
        print(f"wrote {csv_path} and {markdown_path}")
    else:
        out = args.out or (args.run_dirs[0] / "curves.png" if one else Path("compare.png"))
        plot(args.run_dirs, out, args.x, args.log_x)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
