"""Is this working tree's run the same run, bit for bit, as the one a commit trains?

    python tests/same_run.py 569942f [--steps 30] [--keep DIR] [--new=--key=value ...]

Trains the commit's configs/local.py for --steps steps (a checkpoint every steps / 2, a log line
every step) twice, sequentially: once with the commit's code (from `git archive`, in a temporary
directory) and once with this working tree's, each into its own runs directory. Both read the
commit's config, so what differs is the code; --new gives the new run overrides of its own, for a
key whose meaning the new code changed (a measurement that must now be named to be on). Then compares what each run
wrote: every value of every training record of metrics.jsonl (loss, lr, grad_norm, tokens_seen;
not the timings; keys only the new run records are listed), every evaluation record and
eval_results file, the same checkpoint steps, and in each checkpoint
the exported weights, the learning-dynamics captures, the training state (step, data position,
scheduler, torch's RNG) and the optimizer state, tensor by tensor with torch.equal. Prints each
difference and exits 1 if there is any. A refactoring that keeps the run must print "identical".
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"tokens_per_s", "mfu"}  # differ from run to run by nature
# Python's and NumPy's global generators, which the trainer neither seeds nor draws from: each
# process starts them from the OS's entropy, so two runs of the same code differ in them.
UNSEEDED = ("rng.python", "rng.numpy")


def train(code: Path, config: Path, runs: Path, steps: int, overrides: list[str]):
    command = [sys.executable, str(code / "train.py"), str(config),
               f"--training.max_steps={steps}", f"--checkpointing.save_every_n_steps={max(1, steps // 2)}",
               "--monitoring.logging.log_every_n_steps=1", f"--checkpointing.runs_dir={runs}", *overrides]
    print(f"training with {code} ...", flush=True)
    subprocess.run(command, cwd=code, check=True, stdout=subprocess.DEVNULL)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def tensors(path: Path) -> dict:
    """Every tensor of a checkpoint file, flattened to {dotted key: tensor or plain value}."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return flatten(torch.load(path, map_location="cpu", weights_only=True))


def optimizer(step_dir: Path, scratch: Path) -> dict:
    out = scratch / f"{step_dir.parent.parent.parent.name}-{step_dir.name}-optimizer.pt"
    dcp_to_torch_save(step_dir / "optimizer", out)
    return flatten(torch.load(out, map_location="cpu", weights_only=True))


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def relative(a, b) -> float:
    """How far b is from a: the largest difference over the largest magnitude of a (inf where
    they differ in kind, shape or anything not a number)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.is_floating_point():
        scale = a.double().abs().max().item() if a.numel() else 0.0
        difference = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        return difference / scale if scale else (0.0 if difference == 0 else float("inf"))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) / abs(a) if a else (0.0 if a == b else float("inf"))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max([relative(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max([relative(a[k], b[k]) for k in a], default=0.0)
    return float("inf")


def compare(name: str, a: dict, b: dict, differences: list[str], added: set):
    """a: the reference's entries, each of which b must hold, the same; b's others go to `added`.
    Where some differ, the largest relative difference among them is said."""
    keys = [key for key in sorted(a) if not key.startswith(UNSEEDED)]
    missing = [key for key in keys if key not in b]
    differ = [key for key in keys if key in b and not same(a[key], b[key])]
    added.update(f"{name.split('/', 1)[-1]}: {key}" for key in b.keys() - a.keys())
    if missing or differ:
        largest = max((relative(a[key], b[key]) for key in differ), default=0.0)
        differences.append(f"{name}: {len(differ)} of {len(keys)} entries differ ({', '.join(differ[:3])}"
                           f"{', ...' if len(differ) > 3 else ''}; by {largest:.1e} at most, relatively); "
                           f"{len(missing)} missing in the new run" + (f" ({', '.join(missing[:3])})" if missing else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("commit", help="the commit whose run is the reference, e.g. 569942f")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--keep", help="a directory to keep both runs in (default: a temporary one)")
    parser.add_argument("--compare-only", action="store_true", help="compare the runs already in --keep")
    parser.add_argument("--new", action="append", default=[], help="an override for the new run only")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="same-run-"))
    if not args.compare_only:
        reference = work / "reference-code"
        reference.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", args.commit], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(reference)], input=archive.stdout, check=True)
        config = reference / "configs" / "local.py"
        train(reference, config, work / "reference-runs", args.steps, [])
        train(ROOT, config, work / "new-runs", args.steps, args.new)

    a, b = work / "reference-runs" / "local", work / "new-runs" / "local"
    differences: list[str] = []
    # A newer trainer may record more (per-layer statistics, the probe's records and keys): every
    # value the reference recorded must be there, the same; what only the new run records is
    # listed, not a difference.
    old, new = records(a), records(b)
    known = {key for record in old for key in record} - {"step"}
    added = {key for record in new if not record.keys() & known for key in record}  # the probe's records
    new = [record for record in new if record.keys() & known]
    if len(old) != len(new):
        differences.append(f"metrics.jsonl: {len(old)} records against {len(new)}")
    elif unequal := [(o["step"], key, relative(value, r.get(key))) for o, r in zip(old, new)
                     for key, value in o.items() if r.get(key) != value]:
        step, key, largest = max(unequal, key=lambda u: u[2])
        first_step, first_key, _ = unequal[0]
        differences.append(f"metrics.jsonl: {len(unequal)} values differ (beyond tokens_per_s and mfu), the first "
                           f"{first_key} at step {first_step}; by {largest:.1e} at most, relatively ({key} at step {step})")
    added.update(key for o, r in zip(old, new) for key in r.keys() - o.keys())
    added.discard("step")
    for results in sorted({p.name for p in (a / "eval_results").glob("*.json")} |
                          {p.name for p in (b / "eval_results").glob("*.json")}):
        old_file, new_file = a / "eval_results" / results, b / "eval_results" / results
        if not old_file.is_file() or not new_file.is_file():
            differences.append(f"eval_results/{results} in one run only")
        else:
            compare(f"eval_results/{results}", json.loads(old_file.read_text()),
                    json.loads(new_file.read_text()), differences, added)
    steps = [sorted(p.name for p in (run / "checkpoints").glob("step_*")) for run in (a, b)]
    if steps[0] != steps[1]:
        differences.append(f"checkpoints: {steps[0]} against {steps[1]}")
    for step in steps[0]:
        old, new = a / "checkpoints" / step, b / "checkpoints" / step
        for file in ["model.safetensors", "training_state.pt"] + sorted(
                f"learning_dynamics/{p.name}" for p in (old / "learning_dynamics").glob("*.pt")):
            compare(f"{step}/{file}", tensors(old / file), tensors(new / file), differences, added)
        compare(f"{step}/optimizer", optimizer(old, work), optimizer(new, work), differences, added)
    if added:
        names = sorted({key.split(": ")[-1].split("/")[0].split(".")[0] for key in added})  # their groups
        print(f"recorded by the new run only: {len(added)} keys ({', '.join(names[:8])}"
              f"{', ...' if len(names) > 8 else ''})")
    for line in differences:
        print(line)
    print(f"{len(steps[0])} checkpoints and {len(records(a))} records compared in {work}: "
          + (f"{len(differences)} differences" if differences else "identical"))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
