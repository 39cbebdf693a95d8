"""plot.py: a run directory's curves in one PNG; several runs side by side, and their table."""

import csv
import dataclasses
import json
import math
import sys

import pytest
import yaml

import config as pico_config
import plot
from test_evaluation import eval_args, write_eval_set
from test_train import run as train


def write_run(run_dir, records, tail="", config=None):
    """A run directory: metrics.jsonl of these records (and tail), and config as its
    training_config.yaml (a dict, as resolved() gives)."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if config is not None:
        (run_dir / "training_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_plots_the_curves_a_run_recorded(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    records = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4,
                **{f"{kind}/{layer}": 0.1 * s for kind in ("weight_norm", "grad_norm", "update_ratio")
                   for layer in ("embedding", "layers.0", "output")}}
               for s in range(1, 20)] + [{"step": 10, "paloma_perplexity": 30.0, "paloma_loss": 3.4},
                                         {"step": 10, "probe/loss_seen": 3.1, "probe/loss_unseen": 3.6,
                                          "probe/exact_match_seen": 0.25, "probe/token_match_seen": 0.5},
                                         {"step": 12, "loss_spike": 6.0}]
    write_run(run, records, tail='{"step": 20, "lo')  # a line a crash cut short is skipped
    plot.main([str(run)])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = plot.panels(plot.read_metrics(run))
    assert [title for title, _, _ in shown] == [
        "loss", "evaluation perplexity", "learning rate", "gradient norm", "tokens/s",
        "training probe loss", "training probe memorized",
        "weight norm per layer", "gradient norm per layer", "update / weight norm per layer"]
    assert shown[0][1] == ["loss", "paloma_loss", "loss_spike"]
    assert shown[6][1] == ["probe/exact_match_seen", "probe/token_match_seen"]
    assert plot.panels(plot.read_metrics(run))[7][1] == [
        "weight_norm/embedding", "weight_norm/layers.0", "weight_norm/output"]  # the model's order


def test_plots_the_behaviour_measured_at_each_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    records = [{"step": s, "evaluation": True, "paloma_icl_score": -0.1 * s, "induction/prefix_matching_max": 0.1 * s,
                "induction/prefix_matching/layers.0": 0.05 * s, "induction/loss_first_half": 10.0,
                "induction/loss_second_half": 10.0 - s, "attention/entropy/layers.0": 2.0 - 0.1 * s}
               for s in (0, 1, 2, 4)]
    write_run(run, records)
    (run / "eval_results").mkdir()
    for step in (0, 4):
        (run / "eval_results" / f"step_{step}.json").write_text(json.dumps(
            {"paloma": 9.0, "paloma_loss_by_position": [3.0, 2.5 - 0.1 * step, 2.0 - 0.2 * step]}))
    plot.main([str(run)])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [title for title, _, _ in plot.panels(plot.read_metrics(run))] == [
        "in-context learning score (late minus early position's loss)",
        "induction heads: prefix matching, best head", "induction: loss on random tokens and on their repeat",
        "attention entropy per layer (nats)"]
    assert plot.read_loss_by_position(run) == {0: [3.0, 2.5, 2.0], 4: [3.0, 2.1, 1.2]}


def test_plots_each_tasks_accuracy_with_its_chance_level(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    records = [{"step": s, "evaluation": True, "tasks/python-syntax/accuracy": 0.5 + 0.1 * s,
                "tasks/python-syntax/chance": 0.5, "tasks/python-syntax/corruption/swap": 0.5 + 0.05 * s,
                "tasks/quiz/accuracy": 0.3, "tasks/quiz/accuracy_per_byte": 0.4, "tasks/quiz/chance": 0.25,
                "tasks/quiz/bits_per_byte": 2.0 - 0.1 * s} for s in (0, 1, 2, 4)]
    write_run(run, records)
    plot.main([str(run)])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.panels(plot.read_metrics(run)) == [
        ("task python-syntax: accuracy (dashed: chance)",
         ["tasks/python-syntax/accuracy", "tasks/python-syntax/corruption/swap"], False),
        ("task quiz: accuracy (dashed: chance)", ["tasks/quiz/accuracy", "tasks/quiz/accuracy_per_byte"], False),
        ("tasks: bits per byte of the right choice", ["tasks/quiz/bits_per_byte"], False)]


def test_a_resumed_run_plots_each_step_once_with_its_last_record(tmp_path):
    run = tmp_path / "run"
    write_run(run, [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}, {"step": 2, "loss": 7.0}])
    assert plot.read_metrics(run)["loss"] == [(1, 9.0), (2, 7.0)]


def test_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: .*metrics.jsonl: no such file; expected a run directory"):
        plot.main([str(tmp_path)])


def test_without_matplotlib_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    write_run(tmp_path / "run", [{"step": 1, "loss": 9.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match=r"^error: plot.py needs matplotlib.*pip install matplotlib$"):
        plot.main([str(tmp_path / "run")])


# ---------------------------------------------------------------------------------------------
# Several runs: one colour each, a legend that says what sets each apart, x by step or tokens
# ---------------------------------------------------------------------------------------------

SIZES = {"tiny": (96, 384), "small": (384, 1536), "medium": (768, 3072), "large": (1536, 6144),
         "xl": (2304, 9216)}  # configs/pico-decoder-*.py


def resolved(changes: dict) -> dict:
    """The resolved config as the trainer writes it to training_config.yaml, with changes (dotted keys)."""
    config = pico_config.Config()
    for key, value in changes.items():
        pico_config.set_key(config, key, value, "test")
    return dataclasses.asdict(config)


def curves(fall: float, checkpoints=(0, 1, 2, 4, 8)) -> list[dict]:
    """Training records at steps 1..8 and evaluation records at the checkpoints, a loss that falls
    by `fall` a step."""
    return ([{"step": s, "loss": 5.0 - fall * s, "lr": 1e-3} for s in range(1, 9)]
            + [{"step": s, "evaluation": True, "paloma_loss": 4.5 - fall * s} for s in checkpoints])


@pytest.fixture
def suite(tmp_path):
    """Six runs as the suite's configs make them: the five sizes at seed 42, and tiny at seed 43."""
    members = [(size, 42) for size in SIZES] + [("tiny", 43)]
    dirs = []
    for i, (size, seed) in enumerate(members):
        d_model, hidden = SIZES[size]
        dirs.append(tmp_path / "runs" / f"pico-decoder-{size}-seed{seed}")
        write_run(dirs[-1], curves(0.01 * (i + 1)), config=resolved({
            "model.d_model": d_model, "model.activation_hidden_dim": hidden, "training.seed": seed,
            "training.optimization.gradient_accumulation_steps": 8 if size == "xl" else 4,
            "checkpointing.run_name": dirs[-1].name}))
    return dirs


def legend_texts(figure) -> list[str]:
    """The entries of the figure's legend of runs, each on one line."""
    legend = next(ax.get_legend() for ax in figure.axes if ax.get_legend() and ax.get_legend().get_title().get_text()
                  == "runs, and what sets each apart")
    return [" ".join(text.get_text().split()) for text in legend.get_texts()]


def panel(figure, title):
    return next(ax for ax in figure.axes if ax.get_title() == title)


def test_a_suite_of_six_runs_shares_the_panels_one_colour_per_run(suite, tmp_path):
    pytest.importorskip("matplotlib")
    figure = plot.draw(plot.read_runs(suite))
    assert len(legend_texts(figure)) == 6
    loss = panel(figure, "loss")
    training, evaluation = loss.lines[:6], loss.lines[6:]  # each key, run by run
    colours = [line.get_color() for line in training]
    assert len(set(colours)) == 6 and [line.get_color() for line in evaluation] == colours
    assert {line.get_linestyle() for line in training} == {"-"}
    assert {line.get_linestyle() for line in evaluation} == {"--"}
    assert list(training[2].get_ydata()) == [r["loss"] for r in curves(0.01 * 3) if "loss" in r]
    assert [line.get_color() for line in panel(figure, "learning rate").lines] == colours
    plot.main([*map(str, suite), "--out", str(tmp_path / "suite.png")])
    assert (tmp_path / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_legend_names_each_run_with_what_sets_it_apart(suite):
    pytest.importorskip("matplotlib")
    texts = legend_texts(plot.draw(plot.read_runs(suite)))
    assert texts[0] == ("pico-decoder-tiny-seed42: 11.3M params, d_model=96, activation_hidden_dim=384, "
                        "gradient_accumulation_steps=4, training.seed=42")  # CONTRACTS: tiny 11,282,784
    assert texts[1].startswith("pico-decoder-small-seed42: 64.6M params, d_model=384,")  # 64,595,328
    assert texts[3].startswith("pico-decoder-large-seed42: 570M params, d_model=1536,")  # 569,808,384
    assert texts[4].endswith("activation_hidden_dim=9216, gradient_accumulation_steps=8, training.seed=42")
    assert texts[5].endswith("training.seed=43")


def test_a_branched_run_is_told_by_its_parent_and_step(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    parent = resolved({"training.max_steps": 1000})
    branch = resolved({"training.max_steps": 1000, "data.order_seed": 7})
    branch["checkpointing"]["training"]["branch_from"] = str(runs / "parent" / "checkpoints" / "step_400")
    write_run(runs / "parent", curves(0.01), config=parent)
    write_run(runs / "reordered", curves(0.02, checkpoints=(4, 8)), config=branch)
    assert legend_texts(plot.draw(plot.read_runs([runs / "parent", runs / "reordered"]))) == [
        "parent: order_seed=0", "reordered: order_seed=7, branch_from=parent/step_400"]


def test_a_run_without_training_config_is_named_only(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", curves(0.01), config=resolved({"model.d_model": 32}))
    write_run(tmp_path / "b", curves(0.02), config=resolved({"model.d_model": 64}))
    write_run(tmp_path / "copied", curves(0.03))
    texts = legend_texts(plot.draw(plot.read_runs([tmp_path / "a", tmp_path / "b", tmp_path / "copied"])))
    assert texts[0].startswith("a: ") and "d_model=32" in texts[0] and texts[2] == "copied"


def test_x_by_tokens_is_the_step_times_the_global_batch_in_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", curves(0.01), config=resolved({"data.dataloader.batch_size": 8, "model.max_seq_len": 32}))
    write_run(tmp_path / "b", curves(0.01), config=resolved({"data.dataloader.batch_size": 4, "model.max_seq_len": 16}))
    figure = plot.draw(plot.read_runs([tmp_path / "a", tmp_path / "b"]), x="tokens")
    loss = panel(figure, "loss")
    assert list(loss.lines[0].get_xdata()) == [256 * s for s in range(1, 9)]
    assert list(loss.lines[1].get_xdata()) == [64 * s for s in range(1, 9)]
    assert list(loss.lines[3].get_xdata()) == [0, 64, 128, 256, 512]  # b's evaluations, step 0 on
    assert loss.get_xlabel() == "tokens"


def test_log_x_keeps_step_0_on_a_linear_stretch_of_one_step(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", curves(0.01), config=resolved({"data.dataloader.batch_size": 8, "model.max_seq_len": 32}))
    for x, one_step in [("step", 1), ("tokens", 256)]:
        loss = panel(plot.draw(plot.read_runs([tmp_path / "a"]), x=x, log_x=True), "loss")
        assert loss.get_xscale() == "symlog" and loss.xaxis.get_transform().linthresh == one_step
        assert loss.lines[1].get_xdata()[0] == 0  # the initialisation's evaluation, drawn


# ---------------------------------------------------------------------------------------------
# --table: the metrics at the checkpoints the runs share, as CSV and markdown
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def three(tmp_path):
    """Three runs of two sizes and two seeds, whose checkpoints are not all the same: a evaluated
    at 0, 1, 2, 4, 8; b at 0, 2, 4, 8 and 16 (resumed, so step 4 evaluated twice: the last counts);
    c at 0, 2, 4 and its checkpoint 8 saved but not evaluated, a diverged perplexity at 4."""
    def evaluation(step, loss):
        return {"step": step, "evaluation": True, "paloma_loss": loss, "paloma_perplexity": math.exp(loss)}
    a = [{"step": s, "loss": 4.0 + 0.1 / (s + 1), "lr": 1e-3} for s in range(1, 9)] + [
        evaluation(s, 3.0 + 1 / (s + 3)) for s in (0, 1, 2, 4, 8)]
    b = [evaluation(s, 2.5 + 1 / (s + 7)) for s in (0, 2, 4, 8, 16)] + [evaluation(4, 2.25)]
    c = [evaluation(0, 3.3), evaluation(2, 3.2), {"step": 4, "evaluation": True, "paloma_loss": 900.0,
                                                   "paloma_perplexity": "Infinity"}]
    dirs = [tmp_path / "runs" / name for name in "abc"]
    for run_dir, records, changes in zip(dirs, [a, b, c], [
            {"model.d_model": 32, "training.seed": 1}, {"model.d_model": 64, "training.seed": 1},
            {"model.d_model": 32, "training.seed": 2}]):
        write_run(run_dir, records, config=resolved({
            **changes, "model.n_layers": 1, "model.vocab_size": 64, "model.activation_hidden_dim": 64,
            "model.attention_n_heads": 4, "model.attention_n_kv_heads": 2,
            "data.dataloader.batch_size": 8, "model.max_seq_len": 32}))
    (dirs[2] / "checkpoints" / "step_8").mkdir(parents=True)
    return dirs, [a, b, c]


def recorded(records: list[dict], step: int, key: str):
    """What metrics.jsonl says of key at step: its last record there."""
    return [r[key] for r in records if r["step"] == step and key in r][-1]


def test_the_table_holds_the_recorded_values_at_the_checkpoints_all_runs_share(three, tmp_path):
    pandas = pytest.importorskip("pandas")
    dirs, records = three
    plot.main([*map(str, dirs), "--table", "--out", str(tmp_path / "three")])
    table = pandas.read_csv(tmp_path / "three.csv")
    assert list(table.columns) == ["run", "step", "tokens", "params", "model.d_model", "training.seed",
                                   "loss", "paloma_loss", "paloma_perplexity"]
    assert list(zip(table["run"], table["step"])) == [(run, step) for run in "abc" for step in (0, 2, 4, 8)]
    assert list(table["tokens"]) == [256 * step for step in (0, 2, 4, 8)] * 3
    assert list(table["model.d_model"]) == [32] * 4 + [64] * 4 + [32] * 4
    for row in table.itertuples(index=False):
        for key in ("loss", "paloma_loss", "paloma_perplexity"):
            value = getattr(row, key)
            try:
                expected = float(recorded(records["abc".index(row.run)], row.step, key))
            except IndexError:  # not recorded there: an empty cell
                assert math.isnan(value)
                continue
            assert value == expected
    assert table.loc[(table["run"] == "b") & (table["step"] == 4), "paloma_loss"].item() == 2.25
    assert table.loc[(table["run"] == "c") & (table["step"] == 4), "paloma_perplexity"].item() == math.inf


def test_the_markdown_table_gives_each_metric_a_table_with_a_column_per_run(three, tmp_path):
    dirs, records = three
    plot.main([*map(str, dirs), "--table", "--metrics", "paloma_*", "--out", str(tmp_path / "three")])
    text = (tmp_path / "three.md").read_text()
    assert "Rounded to 5 significant digits; three.csv holds the values as recorded." in text
    assert "| a | 13.4k params, d_model=32, training.seed=1 | 256 |" in text
    loss = text.split("## paloma_loss\n\n")[1].split("\n\n")[0].splitlines()
    assert loss[0] == "| step | a | b | c |"
    assert loss[2:] == ["| 0 | 3.3333 | 2.6429 | 3.3 |", "| 2 | 3.2 | 2.6111 | 3.2 |",
                        "| 4 | 3.1429 | 2.25 | 900 |", "| 8 | 3.0909 | 2.5667 |  |"]
    assert "## loss" not in text  # --metrics chose the columns


def test_the_table_needs_no_matplotlib(three, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot.main([*map(str, three[0]), "--table", "--out", str(tmp_path / "three")])
    with open(tmp_path / "three.csv") as f:
        assert len(list(csv.reader(f))) == 1 + 3 * 4


@pytest.mark.parametrize("args, culprit", [
    (["{a}", "{b}", "--table"], "no checkpoint step that all of them have"),
    (["{a}", "{b}", "--x", "tokens"], "b/training_config.yaml: no such file; expected the run's resolved config"),
    (["{a}", "{b}", "{a}/", "--table"], "a: given twice (also as "),
    (["{a}", "--table", "--metrics", "acc*"], "--metrics 'acc*': no key of the runs' metrics.jsonl matches"),
    (["{a}", "{damaged}"], "damaged/training_config.yaml: cannot be read"),
    (["{a}", "--metrics", "loss"], "--metrics chooses the columns of --table")])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, args, culprit):
    write_run(tmp_path / "a", curves(0.01, checkpoints=(0, 4)), config=resolved({}))
    write_run(tmp_path / "b", curves(0.01, checkpoints=(2, 8)))
    write_run(tmp_path / "damaged", curves(0.01), config=resolved({}))
    (tmp_path / "damaged" / "training_config.yaml").write_text("model: [1, 2\n")
    with pytest.raises(SystemExit) as stopped:
        plot.main([arg.format(**{run: tmp_path / run for run in ("a", "b", "damaged")}) for arg in args]
                  + ["--out", str(tmp_path / "out")])
    assert culprit in str(stopped.value) and "\n" not in str(stopped.value)
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------------------------------------
# Real runs: two tiny ones of different sizes and seeds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs of 2 steps (checkpoints 0 and 2, each evaluated): d_model 16 seed 1, 32 seed 2."""
    from conftest import tiny_files
    tmp = tmp_path_factory.mktemp("compare")
    config, runs = tiny_files(tmp)
    write_eval_set(tmp / "paloma" / "val", [33, 20, 33])
    for name, d_model, seed in [("narrow", 16, 1), ("wide", 32, 2)]:
        train(config, "--training.max_steps=2", "--checkpointing.save_every_n_steps=2",
              "--checkpointing.log_spaced_until=0", f"--checkpointing.run_name={name}", f"--model.d_model={d_model}",
              f"--training.seed={seed}", *eval_args(tmp / "paloma"))
    return [runs / "narrow", runs / "wide"]


@pytest.mark.xdist_group("plot")
def test_the_table_of_real_runs_is_what_their_metrics_jsonl_recorded(trained, tmp_path):
    plot.main([*map(str, trained), "--table", "--out", str(tmp_path / "real")])
    with open(tmp_path / "real.csv") as f:
        rows = list(csv.DictReader(f))
    by_run = {}
    for run_dir in trained:  # each step's last record, as a resumed run leaves them
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            by_run.setdefault(run_dir.name, {}).setdefault(record["step"], {}).update(record)
    assert [(row["run"], int(row["step"])) for row in rows] == [(run, step) for run in ("narrow", "wide")
                                                                 for step in (0, 2)]
    measured = [key for key in rows[0] if key.startswith("paloma_")]
    assert "paloma_loss" in measured and "paloma_icl_score" in measured
    for row in rows:
        record = by_run[row["run"]][int(row["step"])]
        assert all(float(row[key]) == record[key] for key in measured)
        assert row["loss"] == ("" if row["step"] == "0" else repr(record["loss"]))
        assert int(row["tokens"]) == int(row["step"]) * 8 * 32 and row["model.d_model"] in ("16", "32")
        assert row["training.seed"] == {"narrow": "1", "wide": "2"}[row["run"]]


@pytest.mark.xdist_group("plot")
def test_real_runs_draw_by_tokens_on_a_log_axis(trained, tmp_path):
    pytest.importorskip("matplotlib")
    plot.main([*map(str, trained), "--x", "tokens", "--log-x", "--out", str(tmp_path / "real.png")])
    assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
