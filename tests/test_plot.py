"""plot.py: a run directory's curves in one PNG."""

import json
import sys

import pytest

import plot


def write_run(run_dir, records, tail=""):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


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
