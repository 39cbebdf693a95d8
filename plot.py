"""The curves a researcher looks at first, from a run directory, in one PNG.

    python plot.py runs/RUN [--out runs/RUN/curves.png]

Reads RUN/metrics.jsonl (each step's last record wins, as after a resume) and draws, each where
the run recorded it: the training loss with the evaluation loss and loss spikes, the evaluation
perplexity (also per source), the learning rate, the gradient norm, the throughput, the training
probe's loss and memorization (seen and unseen rows), per layer (monitoring.logging.layer_stats)
the weight norm, the gradient norm and the update over the weights, and the behaviour measured at
each checkpoint: the in-context learning score, induction heads, attention entropy, each task's
accuracy against its chance level. From
RUN/eval_results, the loss at each position of every checkpoint. Needs matplotlib, an optional
extra: pip install matplotlib.
"""

import argparse
import contextlib
import json
import math
import re
from pathlib import Path


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] in step order} of every number metrics.jsonl holds."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; expected a run directory (runs/RUN)")
    by_step: dict[tuple[str, int], float] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line a crash cut short; the trainer drops it on resume
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step[key, record["step"]] = float(value)
    series: dict[str, list[tuple[int, float]]] = {}
    for (key, step), value in sorted(by_step.items(), key=lambda item: item[0][1]):
        series.setdefault(key, []).append((step, value))
    return series


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


def plot(run_dir: Path, out: Path):
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is None:
        raise SystemExit("error: plot.py needs matplotlib, an optional extra: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt

    series, by_position = read_metrics(run_dir), read_loss_by_position(run_dir)
    shown = panels(series)
    if not shown:
        raise SystemExit(f"error: {run_dir / 'metrics.jsonl'}: no records to plot yet")
    columns = 2
    rows = math.ceil((len(shown) + bool(by_position)) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, keys, log) in zip(axes.flat, shown):
        for key in keys:
            steps, values = zip(*series[key])
            spikes = key == "loss_spike"  # marked, not joined
            ax.plot(steps, values, label=key, marker="x" if spikes else "." if len(steps) < 30 else None,
                    linewidth=0 if spikes else 1)
        if log and all(v > 0 for key in keys for _, v in series[key] if math.isfinite(v)):
            ax.set_yscale("log")
        for chance in {f"tasks/{key.split('/')[1]}/chance" for key in keys if key.startswith("tasks/")}:
            if chance in series:  # a task's chance level: what its accuracy rises from
                ax.axhline(series[chance][-1][1], color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=6, ncol=2 if len(keys) > 8 else 1)
    if by_position:  # one curve per checkpoint, later ones darker: the drop at late positions is ICL
        ax = axes.flat[len(shown)]
        colors = plt.get_cmap("viridis")
        for i, (step, losses) in enumerate(by_position.items()):
            ax.plot(range(len(losses)), losses, color=colors(i / max(1, len(by_position) - 1)), linewidth=1,
                    label=f"step {step}" if i in (0, len(by_position) - 1) else None)
        ax.set_xscale("symlog")
        ax.set_title("evaluation loss by position, each checkpoint")
        ax.set_xlabel("position")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shown) + bool(by_position):]:
        ax.set_visible(False)
    figure.suptitle(run_dir.resolve().name)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, runs/RUN")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "curves.png"
    plot(args.run_dir, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
