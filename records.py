"""The run's records, beside its checkpoints: what a researcher reads while and after it trains.

  training_config.yaml   the resolved config, as pico-analyze reads it
  logs/                  the console log of each start
  metrics.jsonl          one JSON object per line, each with its "step" (mirrored to wandb)
  code/TIME/             the project's code at each start
  spikes/step_N/         a loss spike and the captures of its batch
  uploads.json           the checkpoints pushed to the Hub, and those still to push
  .lock                  who trains here

Rank 0 writes them all. Also here: the plan logged before the first step, and the upload of each
checkpoint to the Hub in a background thread.

Machinery: what train.py writes beside its checkpoints (docs/run-directory.md).
"""

import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import queue
import shutil
import socket
import sys
import threading
import warnings
from pathlib import Path

import yaml

import checkpoint
import data
from checkpoint import CheckpointError, describe_error, write_atomically
from distributed import world

UPLOADS = "uploads.json"  # in the run directory: the steps pending upload, and those uploaded
CODE = ["*.py", "configs/*.py", "requirements*.txt"]  # the project's files copied into each run
# The key of a branch's first record in metrics.jsonl (Records.branched)
BRANCH_FROM = "branch_from"
# The mark of a checkpoint's evaluation records in metrics.jsonl: a resumed run that evaluates its
# checkpoint again drops them first, whatever their other keys.
EVALUATION = "evaluation"


class Records:
    """What rank 0 records: training_config.yaml (as pico-analyze reads it), the log, metrics.jsonl
    (mirrored to Weights & Biases with monitoring.save_to_wandb), and the code of each start in
    code/TIME/ (TIME: its log's), so a fork without git history can still be reproduced. Other
    ranks log trouble only. A resumed run replays the steps after its checkpoint: their old
    records, and their loss spikes' captures, are dropped first; and where the checkpoint is not
    `evaluated` (so the run evaluates it again), the records of its evaluation."""

    def __init__(self, run_dir: Path, config, start_step: int, evaluated: bool = True):
        self.metrics, self.wandb = (run_dir / "metrics.jsonl" if world()[1] == 0 else None), None
        if self.metrics is None:
            self.log = logging.getLogger(f"pico.rank{world()[1]}")
            self.log.setLevel(logging.WARNING)
            return
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
        (run_dir / "training_config.yaml").write_text(resolved)
        kept = []
        if self.metrics.exists():  # a last line that a crash (a full disk) cut short goes too
            kept = [line for line in self.metrics.read_text().splitlines() if _step_of(line) < start_step
                    or _step_of(line) == start_step and (evaluated or not _is_evaluation(line))]
            write_atomically(self.metrics, "".join(line + "\n" for line in kept))
        for spike in (run_dir / "spikes").glob("step_*"):
            if int(spike.name[len("step_"):]) > start_step:
                shutil.rmtree(spike)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        self.log = run_log(run_dir, config.monitoring.logging.log_level, stamp)
        root = Path(__file__).resolve().parent
        for path in [p for pattern in CODE for p in root.glob(pattern)]:
            copy = run_dir / "code" / stamp / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        if config.monitoring.save_to_wandb:
            self.wandb = self._start_wandb(config)
        lineage = config.checkpointing.training.lineage
        if lineage and not any(BRANCH_FROM in json.loads(line) for line in kept):  # once, at its first start
            self.branched(lineage)

    def branched(self, lineage: dict):
        """A branch's first record, at the step where it starts (its lineage, as in
        training_config.yaml's checkpointing.training.lineage): what a comparison of runs reads."""
        step, changed = lineage["parent_step"], lineage["changed"]
        self.write({"step": step, BRANCH_FROM: lineage["source"], "parent_run": lineage["parent_run"],
                    "parent_step": step, "changed": list(changed)})
        said = "; ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changed.items())
        self.log.info(f"branch of run {lineage['parent_run']} at step {step} ({lineage['source']}): "
                      f"{'changed ' + said if said else 'nothing changed'}")

    def _start_wandb(self, config):
        """A wandb run with the run name's id, which a resumed run continues; or None, with a
        warning, where wandb is missing or cannot start (no network, no login): the run goes on."""
        name, wandb_config = config.checkpointing.run_name, config.monitoring.wandb
        try:
            import wandb

            return wandb.init(project=wandb_config.project or None, entity=wandb_config.entity or None,
                              name=name, id="".join(c if c.isalnum() or c in "-_" else "-" for c in name),
                              resume="allow", config=dataclasses.asdict(config),
                              settings=wandb.Settings(init_timeout=60))
        except ImportError:
            why = "wandb is not installed (pip install wandb)"
        except Exception as e:
            why = f"wandb did not start ({describe_error(e)})"
        self.log.warning(f"monitoring.save_to_wandb: {why}; metrics go to metrics.jsonl only")

    def write(self, record: dict, evaluation: bool = False):
        """One record of metrics.jsonl: a JSON object with its "step"; evaluation: one of a
        checkpoint's evaluation, marked so."""
        if self.metrics is None:
            return
        if evaluation:
            record = {"step": record["step"], EVALUATION: True, **record}
        try:
            with open(self.metrics, "a") as f:
                f.write(json_line(record))  # one write: a crash leaves at most one partial line
        except OSError as e:  # a full disk: one line, and the next start drops a partial record
            raise CheckpointError(f"{self.metrics}: cannot be written ({e.strerror or describe_error(e)}); "
                                  f"free space, then re-run the same command to resume") from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", EVALUATION)},
                           step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl record; infinity for a line that is no record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _is_evaluation(line: str) -> bool:
    return json.loads(line).get(EVALUATION) is True


def json_line(record: dict) -> str:
    """A record as one line of strict JSON, where a value that is not finite (a diverged perplexity)
    is the string "Infinity", "NaN", ...: Python's float() and JavaScript's Number() read it."""
    def strict(value):
        if isinstance(value, dict):  # eval_results' perplexity per source, the probe's groups
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, list):
            return [strict(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value).replace("inf", "Infinity").replace("nan", "NaN")
        return value
    return json.dumps(strict(record), allow_nan=False) + "\n"


def lock_run_directory(run_dir: Path, start_over: bool):
    """Hold the run directory (rank 0, for the job's life; the returned file must stay open): a
    second training on it is refused, naming the holder. The kernel's lock (flock) dies with its
    process, so a killed one never blocks a resume. start_over: the old run moves to previous_TIME/."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise CheckpointError(f"checkpointing.runs_dir: cannot make {run_dir} "
                              f"({e.strerror or describe_error(e)}); expected a writable directory") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise CheckpointError(f"{run_dir}: in use by {holder}; expected one training per run "
                              f"directory: wait for it, or use another checkpointing.run_name")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}"
               f" since {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    lock.flush()
    if start_over:
        aside = run_dir / f"previous_{datetime.datetime.now():%Y%m%d_%H%M%S}"
        aside.mkdir()
        for name in ("checkpoints", "eval_results", "spikes", "logs", "metrics.jsonl", UPLOADS,
                     "training_config.yaml"):
            if (run_dir / name).exists():
                os.replace(run_dir / name, aside / name)
    return lock


def run_log(run_dir: Path, level: str, stamp: str | None = None) -> logging.Logger:
    """The run's log: stdout, and a file of its own in logs/ for each start of the run."""
    log = logging.getLogger("pico")
    log.setLevel(level)
    log.handlers.clear()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(run_dir / "logs" / f"log_{stamp}.log", encoding="utf-8")):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def save_spike(directory: Path, spike: dict, captures: dict):
    """spikes/step_N/: spike.json (the step, its loss, the window's mean and standard deviation,
    the global row positions of its batch) and the captures of its batch in learning_dynamics/,
    in the layout of a checkpoint's. Written aside and renamed: there whole, or not at all."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpoint.write_learning_dynamics(tmp / "learning_dynamics", captures)
    (tmp / "spike.json").write_text(json_line(spike))
    shutil.rmtree(directory, ignore_errors=True)  # the same step again, after a resume
    os.replace(tmp, directory)


# The plan, logged before the first step ------------------------------------------------------

def log_plan(log, config, run_dir: Path, model, steps: list[int], ld_rows, tokenizer: dict | None):
    """The checkpoints still to write (steps), their bytes and the room for them."""
    ckpt = config.checkpointing
    sizes = checkpoint.checkpoint_bytes(model, ckpt.learning_dynamics, config.data.dataloader.batch_size,
                                        len(ld_rows or []), tokenizer)
    with_optimizer = min(len(steps), ckpt.keep_last_n_optimizer_states or len(steps))
    total = len(steps) * sum(sizes.values()) - (len(steps) - with_optimizer) * sizes["optimizer"]
    free = shutil.disk_usage(run_dir).free
    shown = ", ".join(map(str, steps if len(steps) <= 16 else steps[:12] + ["..."] + steps[-2:]))
    log.info(f"plan: {counted(len(steps), 'checkpoint')}, at {'steps' if len(steps) != 1 else 'step'} {shown}")
    log.info(f"plan: {in_bytes(sum(sizes.values()))} per checkpoint (" + ", ".join(
        f"{part} {in_bytes(n)}" for part, n in sizes.items() if n) + f"), {in_bytes(total)} in all; "
             f"{in_bytes(free)} free on the file system of {run_dir}")
    if total > free:
        log.warning(f"plan: the checkpoints need {in_bytes(total)} and only {in_bytes(free)} is free: "
                    f"the run will stop when the disk is full (checkpointing.keep_last_n_optimizer_states "
                    f"keeps the optimizer state, 2/3 of a checkpoint, in the newest N only)")


def counted(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("s" if n != 1 else "")


def in_bytes(n: float) -> str:
    """Bytes in the largest unit that leaves a number of at least 1."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


# Upload to the Hub ---------------------------------------------------------------------------

def read_uploads(run_dir: Path) -> dict[str, list]:
    """run_dir/uploads.json: {"pending": [steps queued, not yet on the Hub], "uploaded": [...],
    "untagged": [[step, its commit], ...: uploaded, their tag still to make]} (a run's from before
    tags has none)."""
    path = Path(run_dir) / UPLOADS
    try:
        record = json.loads(path.read_text())
        return {"pending": list(record["pending"]), "uploaded": list(record["uploaded"]),
                "untagged": [list(pair) for pair in record.get("untagged", [])]}
    except FileNotFoundError:
        return {"pending": [], "uploaded": [], "untagged": []}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({describe_error(e)}); expected "
                              f'{{"pending": [steps], "uploaded": [steps], "untagged": [[step, commit]]}}') from None


def hub_tag(run_name: str, step: int) -> str:
    """The tag of checkpoint `step` of a run on the Hub. Pythia names its revisions step{N}, one
    repo per model; pico-train's repos hold runs side by side, a branch each, and a tag names a
    commit of the whole repo: the run's name comes first, so the tags of two runs never meet."""
    return f"{run_name}-step{step}"


def hub_uploader(config, run_dir: Path, log) -> "HubUploader":
    """checkpointing.save_to_hf's uploader, which says where it pushes."""
    hf = config.checkpointing.hf_checkpoint
    log.info(f"upload: each checkpoint to {hf.repo_id}, branch {config.checkpointing.run_name}")
    return HubUploader(run_dir, hf.repo_id, config.checkpointing.run_name, log,
                       hf.upload_attempts, hf.upload_retry_delay, hf.upload_optimizer)


class HubUploader:
    """Pushes each checkpoint to branch `branch` (the run name) of the Hub model repo `repo_id` as
    pico-train does, with the tokenizer, metrics.jsonl and the logs; with upload_optimizer also the
    optimizer and training state, at their paths in step_N/, so the branch resumes as a checkpoint.
    The step's last commit is then tagged (hub_tag), so that from_pretrained(repo_id, revision=tag)
    loads it. One background thread uploads, so a training step never waits for the network. A step
    is pending in uploads.json from before it is queued until all its commits are made, so one that a
    crash or an outage left pending is queued again at the next start. A commit, and a tag, is tried
    `attempts` times, `retry_delay` seconds apart, then twice that, ...; a step that still fails is
    logged once and stays pending. A tag that fails leaves its step uploaded and "untagged" with its
    commit: tried again, once, after each upload and at the next start, and logged once. Nothing
    here raises into the training loop or prints the token."""

    def __init__(self, run_dir: Path, repo_id: str, branch: str, log, attempts: int = 5,
                 retry_delay: float = 10.0, upload_optimizer: bool = False):
        self.run_dir, self.repo_id, self.branch, self.log = Path(run_dir), repo_id, branch, log
        self.attempts, self.retry_delay, self.upload_optimizer = attempts, retry_delay, upload_optimizer
        self.record = read_uploads(self.run_dir)  # and uploads.json, rewritten at each change
        self.lock = threading.Lock()  # around the record: the loop adds steps, the thread moves them
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.given_up = threading.Event()  # set by close() when its wait runs out
        self.repo_ready = False  # the repo and the branch exist
        self.committed: dict[str, bytes] = {}  # path in the repo -> sha256 of what we last put there
        self.tag_failed: set[int] = set()  # steps whose tag failed and was logged
        if left := self.record["pending"]:
            log.info(f"upload: steps {left}, left pending by an earlier run, are queued first")
        for step in left:
            self.queue.put(step)
        # train_data/'s .arrow file belongs in the model repo, where pico-train puts it too
        warnings.filterwarnings("ignore", message="It seems that you are about to commit a data file")
        self.thread = threading.Thread(target=self._work, name="hub upload", daemon=True)
        self.thread.start()

    def submit(self, step: int):
        """Queue checkpoint `step` (saved, and evaluated if evaluation is on), unless it is already."""
        with self.lock:
            if step in self.record["pending"] + self.record["uploaded"]:
                return
            self.record["pending"].append(step)
            self._write()
        self.queue.put(step)

    def close(self, timeout: float = 600.0):
        """Wait up to `timeout` seconds for the queued uploads; what is left stays pending."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.given_up.set()
            self.log.warning(f"upload: still not done after {timeout:g} s; steps "
                             f"{self.record['pending']} stay pending in "
                             f"{self.run_dir / UPLOADS} and are uploaded at the next start")

    def _write(self):
        record = {"repo_id": self.repo_id, "branch": self.branch, **self.record}
        write_atomically(self.run_dir / UPLOADS, json.dumps(record) + "\n")

    def _work(self):
        self._tag_left(attempts=1)
        while (step := self.queue.get()) is not None:
            try:
                n_commits, commit = self._upload(step)
                with self.lock:
                    self.record["pending"].remove(step)
                    self.record["uploaded"].append(step)
                    self.record["untagged"].append([step, commit])
                    self._write()
                self.log.info(f"uploaded step {step} to {self.repo_id}@{self.branch} ({n_commits} commits)")
            except Exception as e:  # whatever went wrong, training goes on and the step stays pending
                if not self.given_up.is_set():  # else close() has said what is left
                    self.log.warning(f"upload of step {step} to {self.repo_id}@{self.branch} failed "
                                     f"({self._reason(e)}); it stays pending in "
                                     f"{self.run_dir / UPLOADS} for the next start")
            self._tag_left(attempts=self.attempts)

    def _reason(self, e: Exception) -> str:
        return data.without_token(describe_error(e))  # should a server echo the token

    def _tag_left(self, attempts: int):
        """Tag the uploaded steps still untagged, each at the commit that completed it (hub_tag): the
        one just uploaded with every attempt, those a failure left with one each."""
        for step, commit in list(self.record["untagged"]):
            tag = hub_tag(self.branch, step)
            try:
                self._retrying(lambda: self._tag(tag, commit), attempts if step not in self.tag_failed else 1)
            except Exception as e:
                if not self.given_up.is_set() and step not in self.tag_failed:
                    self.log.warning(f"tag {tag} of step {step} (commit {commit}) on {self.repo_id} failed "
                                     f"({self._reason(e)}); the step is uploaded, its tag is tried again after "
                                     f"the next upload and at the next start ({self.run_dir / UPLOADS})")
                self.tag_failed.add(step)
                continue
            with self.lock:
                self.record["untagged"].remove([step, commit])
                self._write()
            if step in self.tag_failed:
                self.log.info(f"tagged step {step} on {self.repo_id}: {tag}")

    def _tag(self, tag: str, commit: str):
        """Point `tag` at `commit`. One there already was left by an earlier try of this step, which a
        crash kept from saying so, or by an earlier run of the same name, started over: it moves."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        try:
            api.create_tag(self.repo_id, tag=tag, revision=commit)
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code != 409:  # 409: the tag exists
                raise
            api.delete_tag(self.repo_id, tag=tag)
            api.create_tag(self.repo_id, tag=tag, revision=commit)

    def _retrying(self, call, attempts: int):
        """call(), tried `attempts` times, retry_delay seconds apart, then twice that, ...; not once
        more after close() has given up waiting."""
        for attempt in range(attempts):
            try:
                return call()
            except Exception:
                if attempt + 1 == attempts or self.given_up.wait(self.retry_delay * 2 ** attempt):
                    raise

    def _upload(self, step: int) -> tuple[int, str]:
        """Commit checkpoint `step`, one commit per kind of file: how many, and the last one's id.
        pico-analyze's --repo_id mode finds a step by its titles:
        r"Saving Learning Dynamics Data \\((train|val)\\) -- Step (\\d+)"."""
        directory = self.run_dir / "checkpoints" / f"step_{step}"
        if not directory.is_dir():
            raise CheckpointError(f"{directory} does not exist")
        commits = {f"Saving HF Model -- Step {step}": {
            "config.json": directory / "config.json",
            "model.safetensors": directory / "model.safetensors",
            "training_config.yaml": self.run_dir / "training_config.yaml",
            **{name: directory / name for name in data.TOKENIZER_FILES if (directory / name).exists()}}}
        dynamics = directory / "learning_dynamics"
        for split in ("train", "val"):  # each with its rows' directory where there is one (train_data/)
            files = sorted([*dynamics.glob(f"{split}_*.pt"), *dynamics.glob(f"{split}_data/*")])
            commits[f"Saving Learning Dynamics Data ({split}) -- Step {step}"] = {
                p.relative_to(directory).as_posix(): p for p in files}
        # step_N.json, its per-row files, and the inputs of the measurements (no step's)
        results = self.run_dir / "eval_results"
        commits[f"Saving Evaluation Results -- Step {step}"] = {
            f"eval_results/{p.name}": p for p in sorted([*results.glob(f"step_{step}.json"),
                                                         *results.glob(f"step_{step}_*"), *results.glob("*.npy")])
            if not p.name.endswith(".tmp") and (p.name.startswith(f"step_{step}") or not p.name.startswith("step_"))}
        spikes = {p.relative_to(self.run_dir).as_posix(): p
                  for p in sorted((self.run_dir / "spikes").glob("step_*/**/*")) if p.is_file()
                  and int(p.relative_to(self.run_dir / "spikes").parts[0][len("step_"):]) <= step}
        commits[f"Saving Loss Spikes -- Step {step}"] = {  # those since the last checkpoint's commit
            path: p for path, p in spikes.items() if path not in self.committed}
        logs = [self.run_dir / "metrics.jsonl", *sorted((self.run_dir / "logs").glob("*.log"))]
        commits[f"Saving Logs -- Step {step}"] = {
            p.relative_to(self.run_dir).as_posix(): p for p in logs if p.exists()}
        if self.upload_optimizer and (directory / "optimizer").is_dir():
            state = [directory / checkpoint.MANIFEST, directory / "training_state.pt",
                     *(directory / "optimizer").iterdir()]
            commits[f"Saving Training State -- Step {step}"] = {
                p.relative_to(directory).as_posix(): p for p in state}
        commits = {title: files for title, files in commits.items() if files}  # a kind without files: none
        for title, files in commits.items():
            commit = self._retrying(lambda: self._commit(title, files), self.attempts)
        return len(commits), commit

    def _commit(self, title: str, files: dict[str, Path]) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        api = HfApi()
        if not self.repo_ready:  # once per run, as pico-train's initialize_hf_checkpointing
            # A repo id without a namespace is the user's: the rest of the API needs the full one.
            self.repo_id = api.create_repo(self.repo_id, exist_ok=True).repo_id
            api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            self.repo_ready = True
        adds = [CommitOperationAdd(path, str(local)) for path, local in files.items()]
        deletes = []
        if all(self.committed.get(op.path_in_repo) == op.upload_info.sha256 for op in adds):
            # The bytes of the last commit (checkpoint 1 is checkpoint 0 when the first step's
            # learning rate is 0): huggingface_hub would skip the commit, and pico-analyze find
            # no commit for this step. Files deleted and added again in one commit are committed.
            deletes = [CommitOperationDelete(op.path_in_repo) for op in adds]
        made = api.create_commit(self.repo_id, deletes + adds, commit_message=title, revision=self.branch)
        self.committed.update({op.path_in_repo: op.upload_info.sha256 for op in adds})
        return made.oid  # the branch's head, where huggingface_hub skipped a commit of unchanged files
