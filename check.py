"""Check a fork in under a minute: every part of a run, once, on a small copy of its model.

    python check.py [CONFIG] [--section.key=value ...]      # CONFIG: configs/local.py

CONFIG's data, schedule, precision, measurements and captures are kept; its model is shrunk to 2
blocks of 8 dimensions per head (its variant fields kept), and it trains 4 steps of 2 rows per
micro-step, with checkpoints at steps 0, 2 and 4. train.py runs three times, as a user runs it:

  1. the whole run, steps 0 to 4;
  2. the same run, sent SIGTERM once checkpoint 0 is saved: it saves the step it is at and exits 0;
  3. the same command again: it resumes there and finishes.

Then the resumed run must be the whole run bit for bit: the loss, lr and every other training
record of each step, the evaluation of each checkpoint both have, and every file of checkpoint 4
(training_state.pt's unseeded Python and NumPy generators, and optimizer/.metadata, which holds a
random id, aside). It runs on the CPU, where bit for bit holds (README, "Stop and resume"). Last, checkpoint 4's export is
loaded back with PicoDecoder.from_pretrained, and with transformers where it is installed and the
export is a Llama, and measured again: the perplexity the run recorded, the same logits. A line for
each part, then one saying what passed; exit status 1 at the first part that fails. The runs are
written to a temporary directory, removed when the check passes, or to checkpointing.runs_dir
where an override names one, and kept.
"""

import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import evaluation
from config import ConfigError, load_config
from model import PicoDecoder

ROOT = Path(__file__).resolve().parent
STEPS, EVERY = 4, 2  # checkpoints at 0, 2 and 4; the stop comes at 1, between two of them


class Failed(Exception):
    """A part of the run that did not do what it should: the message says what."""


def main(argv: list[str]) -> int:
    config_path, overrides = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else (
        str(ROOT / "configs" / "local.py"), argv)
    config = load_config(config_path, overrides)  # a bad config or override: its one line, now
    heads, accum = config.model.attention_n_heads, config.training.optimization.gradient_accumulation_steps
    width = 8 * heads
    keep = any(arg.startswith("--checkpointing.runs_dir=") for arg in overrides)
    runs = Path(config.checkpointing.runs_dir) if keep else Path(tempfile.mkdtemp(prefix="pico-check-"))
    if earlier := [name for name in ("whole", "stopped") if (runs / name).exists()]:
        raise ConfigError(f"checkpointing.runs_dir={str(runs)!r} holds the runs {' and '.join(earlier)} of an "
                          f"earlier check; expected a directory without them")
    shrink = ["--model.n_layers=2", f"--model.d_model={width}", f"--model.activation_hidden_dim={4 * width}",
              f"--data.dataloader.batch_size={2 * accum}", f"--training.max_steps={STEPS}",
              f"--checkpointing.save_every_n_steps={EVERY}", "--checkpointing.log_spaced_until=0",
              f"--checkpointing.runs_dir={runs}", "--checkpointing.save_to_hf=False",
              "--monitoring.save_to_wandb=False", "--monitoring.logging.log_every_n_steps=1"]
    # On the CPU, where a resumed run is the same bit for bit (CUDA's kernels need training.deterministic)
    overrides = ["--training.device=cpu", *overrides]
    command = [sys.executable, str(ROOT / "train.py"), config_path, *overrides, *shrink]
    config = load_config(config_path, overrides + shrink)
    started = time.perf_counter()
    print(f"check: {config_path} with {PicoDecoder.__name__} shrunk to 2 blocks of width {width}, "
          f"{STEPS} steps of {2 * accum} rows, in {runs}", flush=True)
    try:
        whole = train(command, runs, "whole")
        print(f"  trains: {STEPS} steps, loss {whole['losses'][1]:.4f} at step 1, {whole['losses'][STEPS]:.4f} "
              f"at step {STEPS}; checkpoints 0, {EVERY} and {STEPS} with learning-dynamics captures", flush=True)
        said = [line.split("measured at each checkpoint: ")[1].strip() for line in whole["stdout"].splitlines()
                if "measured at each checkpoint: " in line]
        measured = said[0] if said else "nothing"
        print(f"  measures each checkpoint: {measured}", flush=True)
        stopped_at = stop_after_checkpoint_0(command)
        print(f"  stops on SIGTERM at step {stopped_at}, saving it; exits 0", flush=True)
        resumed = train(command, runs, "stopped")
        if "resumed from" not in resumed["stdout"]:
            raise Failed("started again, the stopped run did not resume from its checkpoint")
        compare(runs / "whole", runs / "stopped")
        print(f"  resumes from step {stopped_at} and is the same run bit for bit: training records, "
              f"evaluations and checkpoint {STEPS}", flush=True)
        print(f"  exports: {export(runs / 'whole', config)}", flush=True)
    except Failed as e:
        print(f"check FAILED: {e}; the runs are in {runs}", flush=True)
        return 1
    if not keep:
        shutil.rmtree(runs)
    print(f"check passed in {time.perf_counter() - started:.0f} s: trains, checkpoints with captures, "
          f"measures {measured}, stops, resumes bit for bit, exports and loads back", flush=True)
    return 0


def train(command: list[str], runs: Path, name: str) -> dict:
    """train.py to the end under checkpointing.run_name=name: its output and training losses."""
    result = subprocess.run(command + [f"--checkpointing.run_name={name}"], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise Failed(f"train.py exited {result.returncode}: {last_line(result.stderr or result.stdout)}")
    records = training_records(runs / name, "loss")
    return {"stdout": result.stdout, "losses": {step: record["loss"] for step, record in records.items()}}


def stop_after_checkpoint_0(command: list[str]) -> int:
    """Start the run "stopped" and send it SIGTERM as soon as it has saved checkpoint 0, as a
    cluster's notice would; it finishes the step it is in (step 1, while checkpoint 0 is measured),
    saves it and exits 0. Returns the step it stopped at."""
    process = subprocess.Popen(command + ["--checkpointing.run_name=stopped"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "saved " in line and line.rstrip().endswith("step_0"):
            process.send_signal(signal.SIGTERM)
    if process.wait() != 0:
        raise Failed(f"after SIGTERM train.py exited {process.returncode}: {last_line(''.join(lines))}")
    stopped = [line for line in lines if ": stopped at step " in line]
    if not stopped:
        raise Failed("SIGTERM came too late: the run had finished (is the machine very busy?)")
    return int(stopped[0].split(": stopped at step ")[1].split(";")[0])


def compare(whole: Path, resumed: Path):
    """The resumed run against the whole one, bit for bit."""
    for kind in ("loss", "evaluation"):
        mine, theirs = training_records(whole, kind), training_records(resumed, kind)
        for step in sorted(set(mine) & set(theirs)):
            if mine[step] != theirs[step]:
                key = next(k for k in [*mine[step], *theirs[step]] if mine[step].get(k) != theirs[step].get(k))
                raise Failed(f"resumed, step {step}'s {key} is {theirs[step].get(key)!r}, not "
                             f"{mine[step].get(key)!r} as in the run that never stopped")
        if kind == "loss" and set(mine) != set(theirs):
            raise Failed(f"resumed, the run recorded steps {sorted(theirs)}, not {sorted(mine)}")
    for step in range(0, STEPS + 1, EVERY):
        a, b = (json.loads((run / "eval_results" / f"step_{step}.json").read_text())
                if (run / "eval_results" / f"step_{step}.json").exists() else None for run in (whole, resumed))
        if a != b:
            raise Failed(f"resumed, eval_results/step_{step}.json differs from the run that never stopped")
    final = [run / "checkpoints" / f"step_{STEPS}" for run in (whole, resumed)]
    crcs = [json.loads((d / "checkpoint.json").read_text())["crc32"] for d in final]
    # training_state.pt holds the unseeded Python and NumPy generators (compared apart, below), and
    # optimizer/.metadata the directory it was written in and a random id of the save
    differ = sorted(name for name in crcs[0].keys() | crcs[1].keys() if crcs[0].get(name) != crcs[1].get(name)
                    and name not in ("training_state.pt", "optimizer/.metadata"))
    if differ:
        raise Failed(f"resumed, checkpoint {STEPS}'s {', '.join(differ)} differ from the run that never stopped")
    states = [torch.load(d / "training_state.pt", weights_only=True) for d in final]
    for key in ("step", "data_position", "scheduler"):
        if states[0][key] != states[1][key]:
            raise Failed(f"resumed, checkpoint {STEPS}'s training_state.pt {key} differs")
    if not torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"]):
        raise Failed(f"resumed, checkpoint {STEPS}'s torch random state differs")


def export(run: Path, config) -> str:
    """Checkpoint STEPS's export, loaded back and measured again."""
    directory = run / "checkpoints" / f"step_{STEPS}"
    try:
        model = PicoDecoder.from_pretrained(str(directory)).eval()
    except Exception as e:
        raise Failed(f"PicoDecoder.from_pretrained({directory}) failed: {e}") from None
    said = [f"step_{STEPS} loads with PicoDecoder.from_pretrained"]
    if "paloma" in evaluation.chosen(config):
        import train  # its device and precision, as the run had them
        env = train.setup(config)
        eval_sets = data.EvalSets(config.model.max_seq_len + 1, config.model.vocab_size, config.data.seed)
        rows = evaluation.evaluation_set(evaluation.Start(config, None, eval_sets, {}))
        again = evaluation.evaluate(model.to(env.device), rows, config.evaluation.paloma.batch_size, env.device,
                                    env.autocast, byte_level=False)["perplexity"]
        recorded = json.loads((run / "eval_results" / f"step_{STEPS}.json").read_text())["paloma"]
        if not math.isclose(again, recorded, rel_tol=1e-6):
            raise Failed(f"the export's perplexity is {again}, the run recorded {recorded}")
        said.append(f"its perplexity {again:.4f} is the one the run recorded")
    if json.loads((directory / "config.json").read_text())["model_type"] == "llama":
        try:
            import transformers
        except ImportError:
            said.append("(transformers is not installed: not loaded there)")
            return "; ".join(said)
        transformers.utils.logging.disable_progress_bar()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        ids = torch.randint(0, config.model.vocab_size, (2, config.model.max_seq_len),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = (theirs(ids).logits - model.cpu()(ids)[0]).abs().max().item()
        if difference > 1e-4:
            raise Failed(f"transformers' logits differ from PicoDecoder's by {difference:.2g} (expected <= 1e-4)")
        said.append(f"transformers' LlamaForCausalLM loads it with the same logits (within {difference:.1g})")
    return "; ".join(said)


def training_records(run: Path, kind: str) -> dict[int, dict]:
    """metrics.jsonl's records by step, those with a loss (training) or the evaluations (merged
    by step); without timings, which differ from run to run by nature."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if (kind == "loss") == ("loss" in record and "evaluation" not in record):
            records.setdefault(record["step"], {}).update(
                {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu")})
    return records


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
