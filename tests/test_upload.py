"""Upload to the Hub (checkpointing.save_to_hf): each checkpoint pushed to branch run_name of
checkpointing.hf_checkpoint.repo_id, in pico-train's layout and with its commit titles, so that
pico-analyze's --repo_id/--branch mode finds the steps. Against the local stand-in for the Hub
(tests/hub_server.py, the `hub` fixture): through the command line a user types, and through
records.HubUploader for what a short run cannot show."""

import json
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

import checkpoint
import data
import launcher
import records
import test_train
import train as trainer
from hub_server import point_huggingface_hub_at
from model import PicoDecoder

ROOT = Path(__file__).resolve().parent.parent
REPO = "pico-test/tiny-model"
TOKEN = "hf_pico_test_secret_token"
# pico-analyze's (src/utils/data.py, _get_learning_dynamics_commits): it matches this against the
# titles of list_repo_commits(repo_id, revision=branch), then snapshot_downloads that commit.
PICO_ANALYZE = r"Saving Learning Dynamics Data \((train|val)\) -- Step (\d+)"
LEARNING_DYNAMICS = [*(f"learning_dynamics/{split}_{kind}.pt" for split in ("train", "val")
                       for kind in ("activations", "weights", "gradients")),
                     *(f"learning_dynamics/train_data/{name}"
                       for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"))]

# Checkpoints 0, 1 (log-spaced) and 2. The learning rate of the first step is 0 (warm-up from 0),
# so checkpoint 1 holds checkpoint 0's bytes: its commits must be made all the same.
# test_train's tiny model, for 2 steps, evaluated and captured on the fixed rows of `eval`.
TINY = test_train.TINY + """
training.max_steps = 2
training.optimization.lr = 3e-4
training.optimization.lr_warmup_steps = 1
checkpointing.save_every_n_steps = 2
checkpointing.hf_checkpoint.upload_attempts = 2
checkpointing.hf_checkpoint.upload_retry_delay = 0.01
checkpointing.learning_dynamics.eval_data = {eval!r}
evaluation.metrics = ["paloma"]
evaluation.paloma.dataset_name = {eval!r}
"""


@pytest.fixture
def tiny(hub, tmp_path, monkeypatch):
    """A config file for a tiny model on random tokens, evaluated and captured on 8 fixed rows;
    train.py finds the stand-in Hub, and a token, in its environment."""
    rng = np.random.default_rng(0)
    data.write_shards(rng.integers(0, 64, size=(256, 33)), tmp_path / "shards")
    data.write_shards(rng.integers(0, 64, size=(8, 33)), tmp_path / "eval")
    config = tmp_path / "tiny.py"
    config.write_text(TINY.format(data=str(tmp_path / "shards"), runs=str(tmp_path / "runs"),
                                  eval=str(tmp_path / "eval")))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return config


def train(config: Path, *overrides) -> subprocess.CompletedProcess:
    return launcher.run([sys.executable, str(ROOT / "train.py"), str(config),
                         "--checkpointing.save_to_hf=True",
                         f"--checkpointing.hf_checkpoint.repo_id={REPO}", *overrides],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)


def run_dir(config: Path) -> Path:
    return config.parent / "runs" / "run"


def saved_steps(config: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir(config) / "checkpoints").glob("step_*"))


def titles_of(step: int) -> list[str]:
    """pico-train's commits for one checkpoint, in our order."""
    return [f"Saving HF Model -- Step {step}", f"Saving Learning Dynamics Data (train) -- Step {step}",
            f"Saving Learning Dynamics Data (val) -- Step {step}", f"Saving Evaluation Results -- Step {step}",
            f"Saving Logs -- Step {step}"]


def branch_titles() -> list[str]:
    """The titles of branch run's commits, oldest first, after the repo's initial commit."""
    commits = HfApi().list_repo_commits(REPO, revision="run")
    assert commits[-1].title == "initial commit"
    return [c.title for c in reversed(commits[:-1])]


def files_in(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def upload_failures(output: str) -> dict[int, str]:
    """step -> its failure line, asserting there is one line per step."""
    lines = [line for line in output.splitlines() if "upload of step" in line]
    steps = [int(re.search(r"upload of step (\d+) ", line).group(1)) for line in lines]
    assert len(steps) == len(set(steps)), lines
    return dict(zip(steps, lines))


# ---------------------------------------------------------------------------------------------
# Through train.py
# ---------------------------------------------------------------------------------------------

def test_each_checkpoint_is_pushed_to_branch_run_name_in_pico_trains_layout(tiny, hub):
    result = train(tiny)
    assert result.returncode == 0, result.stderr
    steps, run = saved_steps(tiny), run_dir(tiny)
    assert steps == [0, 1, 2]
    branch = Path(snapshot_download(REPO, revision="run"))
    # The HF model and the config at the root, and the run's records; the optimizer and training
    # state stay in the run directory (without checkpointing.hf_checkpoint.upload_optimizer).
    assert files_in(branch) == {"config.json", "model.safetensors", "training_config.yaml",
                                *LEARNING_DYNAMICS, *(f"eval_results/step_{s}{end}" for s in steps
                                                      for end in (".json", "_rows.npy")),
                                "metrics.jsonl", *(f"logs/{p.name}" for p in (run / "logs").iterdir())}
    assert (branch / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    assert (branch / "training_config.yaml").read_bytes() == (run / "training_config.yaml").read_bytes()
    for s in steps:
        assert (branch / f"eval_results/step_{s}.json").read_bytes() == \
            (run / "eval_results" / f"step_{s}.json").read_bytes()
    # At its commit, each step's model is that checkpoint's.
    commits = {c.title: c.commit_id for c in HfApi().list_repo_commits(REPO, revision="run")}
    for s in steps:
        for name in ("config.json", "model.safetensors"):
            uploaded = hf_hub_download(REPO, name, revision=commits[f"Saving HF Model -- Step {s}"])
            assert Path(uploaded).read_bytes() == (run / "checkpoints" / f"step_{s}" / name).read_bytes()
    assert records.read_uploads(run) == {"pending": [], "uploaded": steps, "untagged": []}


def test_list_repo_commits_finds_every_step_by_pico_analyzes_titles(tiny, hub):
    assert train(tiny).returncode == 0
    steps, run = saved_steps(tiny), run_dir(tiny)
    assert branch_titles() == [title for s in steps for title in titles_of(s)]
    # What pico-analyze does: match the titles, then read learning_dynamics/ at that commit.
    found = {"train": {}, "val": {}}
    for commit in HfApi().list_repo_commits(REPO, revision="run"):
        if match := re.search(PICO_ANALYZE, commit.title):
            found[match.group(1)][int(match.group(2))] = commit.commit_id
    assert {split: sorted(by_step) for split, by_step in found.items()} == {"train": steps, "val": steps}
    for split, by_step in found.items():
        for s, commit_id in by_step.items():
            snapshot = Path(snapshot_download(REPO, revision=commit_id))
            for kind in ("activations", "weights", "gradients"):
                name = f"{split}_{kind}.pt"
                assert (snapshot / "learning_dynamics" / name).read_bytes() == \
                    (run / "checkpoints" / f"step_{s}" / "learning_dynamics" / name).read_bytes()


def test_with_upload_optimizer_the_branch_at_a_step_resumes_as_that_checkpoint(tiny, hub):
    result = train(tiny, "--checkpointing.hf_checkpoint.upload_optimizer=True")
    assert result.returncode == 0, result.stderr
    assert "Saving Training State -- Step 2" in branch_titles()
    # The branch holds step_2's files at their paths in step_2/: a complete checkpoint once copied
    # into a run directory, which the same command then resumes from.
    branch = Path(snapshot_download(REPO, revision="run"))
    local = run_dir(tiny) / "checkpoints" / "step_2"
    assert files_in(local) <= files_in(branch)
    copy = tiny.parent / "runs" / "from-hub" / "checkpoints" / "step_2"
    copy.mkdir(parents=True)
    for name in files_in(local):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((branch / name).read_bytes())
    (copy.parent.parent / "training_config.yaml").write_bytes((branch / "training_config.yaml").read_bytes())
    assert checkpoint.check_complete(copy)["step"] == 2
    resumed = train(tiny, "--checkpointing.run_name=from-hub", "--training.max_steps=3")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr


def tagged() -> dict[str, str]:
    """The repo's tags: name -> the title of the commit it names."""
    titles = {c.commit_id: c.title for c in HfApi().list_repo_commits(REPO, revision="run")}
    return {ref.name: titles[ref.target_commit] for ref in HfApi().list_repo_refs(REPO).tags}


def test_each_checkpoint_loads_by_its_tag_in_pico_and_in_transformers(tiny, hub):
    transformers = pytest.importorskip("transformers")
    assert train(tiny).returncode == 0
    run, steps = run_dir(tiny), saved_steps(tiny)
    # Each step's tag names the last commit of its upload: "run-step1", Pythia's "step1" with the run
    assert tagged() == {records.hub_tag("run", s): f"Saving Logs -- Step {s}" for s in steps}
    assert records.hub_tag("run", 1) == "run-step1"
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    for s in steps:
        local = PicoDecoder.from_pretrained(str(run / "checkpoints" / f"step_{s}"))
        expected = local(ids)[0]
        assert torch.equal(PicoDecoder.from_pretrained(REPO, revision=f"run-step{s}")(ids)[0], expected)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(REPO, revision="run-step2")
    with torch.no_grad():
        assert (theirs(ids).logits - expected).abs().max() <= 1e-4
    assert records.read_uploads(run)["untagged"] == []


def test_a_tag_that_fails_leaves_its_step_uploaded_and_is_made_at_the_next_start(tiny, hub):
    hub.fail_tags = 500
    result = train(tiny)
    assert result.returncode == 0, result.stderr
    run, steps = run_dir(tiny), saved_steps(tiny)
    left = records.read_uploads(run)
    assert left["pending"] == [] and left["uploaded"] == steps and [s for s, _ in left["untagged"]] == steps
    failures = [line for line in result.stdout.splitlines() if re.search(r"tag run-step\d+ .* failed", line)]
    assert len(failures) == len(steps) and all("500" in line for line in failures)  # once each
    assert tagged() == {}
    hub.fail_tags = None
    again = train(tiny)  # nothing left to train: the tags only
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert tagged() == {f"run-step{s}": f"Saving Logs -- Step {s}" for s in steps}
    assert records.read_uploads(run)["untagged"] == []


def test_a_branch_goes_on_from_a_checkpoint_on_the_hub_named_by_its_tag(tiny, hub):
    optimizer = "--checkpointing.hf_checkpoint.upload_optimizer=True"
    assert train(tiny, optimizer).returncode == 0
    result = train(tiny, optimizer, "--checkpointing.run_name=from-hub",
                   f"--checkpointing.training.branch_from={REPO}@run-step1")
    assert result.returncode == 0, result.stderr
    run, branch = run_dir(tiny), tiny.parent / "runs" / "from-hub"
    commit = next(ref.target_commit for ref in HfApi().list_repo_refs(REPO).tags if ref.name == "run-step1")
    first = json.loads((branch / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 1, "branch_from": f"{REPO}@{commit}", "parent_run": "run", "parent_step": 1,
                     "changed": []}
    # It changes nothing: step 2 as the parent trained it, bit for bit
    assert test_train.losses(branch) == {2: test_train.losses(run)[2]}
    ours, theirs = test_train.final_weights(branch), test_train.final_weights(run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_branch_from_a_hub_checkpoint_without_its_training_state_is_one_line(tiny, hub, tmp_path):
    config = trainer.load_config(str(tiny), [])
    (tmp_path / "weights").mkdir()  # what an upload without checkpointing.hf_checkpoint.upload_optimizer has
    checkpoint.export_hf(PicoDecoder(config.model).state_dict(), config.model, tmp_path / "weights")
    hub.add_repo(REPO, tmp_path / "weights", branch="run", repo_type="model")
    with pytest.raises(trainer.ConfigError) as error:
        trainer.main([str(tiny), f"--checkpointing.training.branch_from={REPO}@run"])
    message = str(error.value)
    assert len(message.splitlines()) == 1 and f"{REPO}@run holds no training state" in message
    assert "checkpointing.hf_checkpoint.upload_optimizer=True" in message
    assert not (tmp_path / "runs").exists()


def test_commits_failing_do_not_stop_training_and_are_logged_once_per_checkpoint(tiny, hub):
    hub.fail_commits = 500
    result = train(tiny)
    assert result.returncode == 0, result.stderr
    run, steps = run_dir(tiny), saved_steps(tiny)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    failures = upload_failures(result.stdout)
    assert sorted(failures) == steps
    assert all("500 Internal Server Error" in line and "stays pending" in line for line in failures.values())
    assert records.read_uploads(run) == {"pending": steps, "uploaded": [], "untagged": []}


def test_the_same_command_again_uploads_the_steps_left_pending(tiny, hub):
    hub.fail_commits = 500
    assert train(tiny).returncode == 0
    hub.fail_commits = None
    result = train(tiny)  # nothing left to train: only the uploads
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr
    steps = saved_steps(tiny)
    assert branch_titles() == [title for s in steps for title in titles_of(s)]
    assert records.read_uploads(run_dir(tiny)) == {"pending": [], "uploaded": steps, "untagged": []}


def test_the_token_goes_to_the_hub_only_and_is_never_printed(tiny, hub):
    hub.fail_commits = 500  # failures print their reasons: where a token could slip out
    result = train(tiny)
    assert result.returncode == 0, result.stderr
    api = [r for r in hub.log if r["method"] == "POST"]
    assert api and all(r["authorization"] == f"Bearer {TOKEN}" for r in api)
    run = run_dir(tiny)
    written = [result.stdout, result.stderr] + [
        p.read_text() for p in run.rglob("*") if p.suffix in (".log", ".json", ".jsonl", ".yaml")]
    assert "upload of step" in result.stdout and all(TOKEN not in text for text in written)


def test_save_to_hf_without_a_repo_id_is_one_line_naming_the_key(tiny):
    config = trainer.load_config(str(tiny), ["--checkpointing.save_to_hf=True"])
    with pytest.raises(trainer.ConfigError) as error:
        trainer.validate(config, world_size=1)
    assert "checkpointing.hf_checkpoint.repo_id" in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Through records.HubUploader
# ---------------------------------------------------------------------------------------------

def fake_run(run: Path, steps: list[int], learning_dynamics: bool = False, eval_results: bool = False):
    """A run directory with checkpoints of made-up bytes."""
    (run / "eval_results").mkdir(parents=True)
    (run / "training_config.yaml").write_text("model: {d_model: 32}\n")
    for step in steps:
        directory = run / "checkpoints" / f"step_{step}"
        (directory / "learning_dynamics").mkdir(parents=True)
        (directory / "config.json").write_text('{"model_type": "llama"}\n')
        (directory / "model.safetensors").write_bytes(b"weights of step %d" % step)
        for name in ("optimizer.pt", "training_state.pt", "checkpoint.json"):
            (directory / name).write_bytes(b"local only")
        if learning_dynamics:
            for name in LEARNING_DYNAMICS:
                (directory / name).parent.mkdir(exist_ok=True)  # train_data/
                (directory / name).write_bytes(b"%s of step %d" % (name.encode(), step))
        if eval_results:
            (run / "eval_results" / f"step_{step}.json").write_text('{"paloma": 42.0}\n')


def uploader(run: Path, **retries) -> records.HubUploader:
    return records.HubUploader(run, REPO, "run", logging.getLogger("test_upload"),
                                  **{"attempts": 2, "retry_delay": 0.01, **retries})


def test_a_kind_without_files_makes_no_commit(hub, tmp_path):
    fake_run(tmp_path / "run", [3])  # no learning dynamics, no evaluation results
    hub_uploader = uploader(tmp_path / "run")
    hub_uploader.submit(3)
    hub_uploader.close()
    assert branch_titles() == ["Saving HF Model -- Step 3"]
    branch = Path(snapshot_download(REPO, revision="run"))
    assert files_in(branch) == {"config.json", "model.safetensors", "training_config.yaml"}


def test_loss_spikes_go_up_with_the_first_checkpoint_after_them(hub, tmp_path):
    fake_run(tmp_path / "run", [2, 4])
    for step in (1, 3):
        spike = tmp_path / "run" / "spikes" / f"step_{step}"
        (spike / "learning_dynamics").mkdir(parents=True)
        (spike / "spike.json").write_text('{"step": %d}\n' % step)
        (spike / "learning_dynamics" / "train_weights.pt").write_bytes(b"weights at spike %d" % step)
    hub_uploader = uploader(tmp_path / "run")
    hub_uploader.submit(2)
    hub_uploader.submit(4)
    hub_uploader.close()
    assert branch_titles() == ["Saving HF Model -- Step 2", "Saving Loss Spikes -- Step 2",
                               "Saving HF Model -- Step 4", "Saving Loss Spikes -- Step 4"]
    branch = Path(snapshot_download(REPO, revision="run"))
    assert {f for f in files_in(branch) if f.startswith("spikes/")} == {
        f"spikes/step_{s}/{name}" for s in (1, 3)
        for name in ("spike.json", "learning_dynamics/train_weights.pt")}


def test_steps_left_pending_by_an_earlier_run_are_uploaded_first(hub, tmp_path, caplog):
    run = tmp_path / "run"
    fake_run(run, [3, 6, 9], learning_dynamics=True, eval_results=True)
    (run / records.UPLOADS).write_text(json.dumps({"pending": [3, 6], "uploaded": []}))
    with caplog.at_level(logging.INFO, logger="test_upload"):
        hub_uploader = uploader(run)  # queues 3 and 6
        hub_uploader.submit(6)  # queued already: once only
        hub_uploader.submit(9)
        hub_uploader.close()
    assert "steps [3, 6], left pending by an earlier run, are queued first" in caplog.text
    assert branch_titles() == [title for s in (3, 6, 9) for title in titles_of(s)[:-1]]  # no logs in fake_run
    assert records.read_uploads(run) == {"pending": [], "uploaded": [3, 6, 9], "untagged": []}


def test_a_hub_out_of_reach_is_logged_once_per_checkpoint_and_leaves_it_pending(
        tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_huggingface_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
    fake_run(tmp_path / "run", [3, 6])
    with caplog.at_level(logging.INFO, logger="test_upload"):
        hub_uploader = uploader(tmp_path / "run")
        hub_uploader.submit(3)
        hub_uploader.submit(6)
        hub_uploader.close()
    failures = upload_failures(caplog.text)
    assert sorted(failures) == [3, 6]
    assert all("ConnectError" in line and "stays pending" in line for line in failures.values())
    assert records.read_uploads(tmp_path / "run") == {"pending": [3, 6], "uploaded": [], "untagged": []}


def test_close_waits_a_bounded_time_and_leaves_the_rest_pending(hub, tmp_path, caplog):
    fake_run(tmp_path / "run", [5])
    hub.fail_commits = 500  # and a minute before the next try: the upload cannot finish
    hub_uploader = uploader(tmp_path / "run", attempts=3, retry_delay=60)
    hub_uploader.submit(5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="test_upload"):
        hub_uploader.close(timeout=0.5)
    assert time.monotonic() - started < 2
    assert "still not done after 0.5 s; steps [5] stay pending" in caplog.text
    assert records.read_uploads(tmp_path / "run")["pending"] == [5]
    hub_uploader.thread.join(timeout=5)  # it stops trying once close() has given up
    assert not hub_uploader.thread.is_alive() and "upload of step" not in caplog.text
