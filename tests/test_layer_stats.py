"""Per-layer statistics at each logging step (monitoring.logging.layer_stats): weight, gradient
and update norms of the embedding, each block and the output layer, in metrics.jsonl."""

import json
import math

from model import PicoDecoder
from test_train import assert_same_run, run

GROUPS = ["embedding", "layers.0", "layers.1", "output"]  # test_train.TINY has 2 layers


def records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def group_norms(weights: dict) -> dict[str, float]:
    squares = dict.fromkeys(GROUPS, 0.0)
    for name, w in weights.items():
        group = ".".join(name.split(".")[:2]) if name.startswith("layers.") else (
            "embedding" if name.startswith("embedding_proj") else "output")
        squares[group] += float(w.double().square().sum())
    return {g: math.sqrt(v) for g, v in squares.items()}


def checkpoint_weights(run_dir, step: int) -> dict:
    return PicoDecoder.from_pretrained(str(run_dir / "checkpoints" / f"step_{step}")).state_dict()


def test_each_log_step_records_the_norms_the_checkpoints_hold(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=4", "--checkpointing.save_every_n_steps=1")
    logged = records(runs / "run")
    assert sorted(logged) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        record, new, old = logged[step], checkpoint_weights(runs / "run", step), checkpoint_weights(
            runs / "run", step - 1)
        weight = group_norms(new)
        update = group_norms({name: new[name] - old[name] for name in new})
        for group in GROUPS:
            assert math.isclose(record[f"weight_norm/{group}"], weight[group], rel_tol=1e-5), (step, group)
            assert math.isclose(record[f"update_ratio/{group}"], update[group] / group_norms(old)[group],
                                rel_tol=1e-3), (step, group)
            assert record[f"update_ratio/{group}"] > 0
        # the per-layer gradient norms make up the global one (both before clipping)
        total = math.sqrt(sum(record[f"grad_norm/{group}"] ** 2 for group in GROUPS))
        assert math.isclose(total, record["grad_norm"], rel_tol=1e-5)


def test_the_statistics_change_nothing_in_the_run_and_off_they_are_not_recorded(tiny):
    config, runs = tiny
    run(config, "--training.max_steps=6", "--checkpointing.run_name=with")
    run(config, "--training.max_steps=6", "--monitoring.logging.layer_stats=False")
    assert_same_run(runs / "with", runs / "run")
    assert not any("/" in key for record in records(runs / "run").values() for key in record)
    assert all("weight_norm/layers.1" in record for record in records(runs / "with").values())
