"""What a suite needs beyond one run: a data-order seed, tokenizers in checkpoints, a disk and
time plan, and the code and logs that make a run reproducible from its directory."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import launcher
import test_hub
import test_train
from test_data import LAYOUT, N_ROWS, ROW_LEN, VOCAB, write_dataset

# One worker runs this file: its tests share runs made once (a module fixture)
pytestmark = pytest.mark.xdist_group("suite")

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# data.order_seed
# ---------------------------------------------------------------------------------------------

def positions(shards, start: int = 0, count: int = N_ROWS) -> list[int]:
    """The dataset positions (each row's first token) of the rows read at [start, start + count)."""
    return shards.read(start, count)[:, 0].tolist()


def test_order_seed_0_is_the_datasets_own_order(tmp_path):
    shards = data.open_dataset(str(write_dataset(tmp_path / "shards")), ROW_LEN, VOCAB, order_seed=0)
    assert positions(shards) == list(range(N_ROWS))


def test_an_order_seed_gives_another_order_of_the_same_rows(tmp_path):
    directory = str(write_dataset(tmp_path / "shards"))
    one, two = (positions(data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=s)) for s in (1, 2))
    assert sorted(one) == sorted(two) == list(range(N_ROWS))  # each row once per epoch
    assert one != list(range(N_ROWS)) and two != list(range(N_ROWS)) and one != two
    last = sum(LAYOUT["train-00002-of-00003.parquet"])
    assert sorted(one[-last:]) == list(range(N_ROWS - last, N_ROWS))  # the last shard stays last
    # the rows of a row group stay together: a batch reads a group or two, the shards in sequence
    starts = np.cumsum([0] + [n for groups in LAYOUT.values() for n in groups])
    group_of = {p: int(np.searchsorted(starts, p, side="right")) - 1 for p in range(N_ROWS)}
    runs = [group_of[p] for p in one]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == len(starts) - 2  # one change per group


def test_any_rows_of_a_seeded_order_are_read_without_reading_the_earlier_ones(tmp_path):
    directory = str(write_dataset(tmp_path / "shards"))
    whole = positions(data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=3))
    for start, count in [(0, 5), (7, 13), (30, 18), (47, 1)]:  # a resumed run, `data.py batch`
        fresh = data.open_dataset(directory, ROW_LEN, VOCAB, order_seed=3)
        assert positions(fresh, start, count) == whole[start:start + count]


def test_the_hub_gives_a_seeded_order_as_a_local_copy_does(hub, tmp_path):
    repo = test_hub.write_repo(tmp_path / "repo", rows=[16, 16, 16, 7])
    hub.add_repo(test_hub.REPO, repo)
    local = data.open_dataset(str(repo / "data"), test_hub.ROW_LEN, test_hub.VOCAB, order_seed=5)
    remote = data.open_dataset(test_hub.REPO, test_hub.ROW_LEN, test_hub.VOCAB, order_seed=5)
    assert positions(remote, 0, 55) == positions(local, 0, 55) != list(range(55))


def test_data_batch_command_agrees_with_the_trainer_under_an_order_seed(tmp_path, monkeypatch):
    import train

    rows = np.random.default_rng(0).integers(0, 64, size=(256, 33))
    data.write_shards(rows, tmp_path / "shards")
    config = tmp_path / "c.py"
    config.write_text(test_train.TINY.format(data=str(tmp_path / "shards"), runs=str(tmp_path / "runs"))
                      + "training.max_steps = 4\ndata.order_seed = 11\n")
    consumed = []  # what the training loop took from the data stream, step by step
    real_get = data.BatchStream.get
    monkeypatch.setattr(data.BatchStream, "get", lambda self, *a, **k: consumed.append(
        real_get(self, *a, **k).clone()) or consumed[-1])
    assert train.main([str(config)]) == 0
    unseeded = data.open_dataset(str(tmp_path / "shards"), 33, 64)
    for step in (0, 3):
        out = tmp_path / f"batch_{step}.npy"
        launcher.run([sys.executable, "data.py", "batch", str(config), "--step", str(step), "--out",
                      str(out)], check=True, capture_output=True, cwd=ROOT)
        np.testing.assert_array_equal(np.load(out), consumed[step].numpy())
        assert not np.array_equal(np.load(out), unseeded.read(8 * step, 8))  # another order


def test_resume_under_an_order_seed_is_the_same_run(tiny):
    config, runs = tiny
    seeded = ["--data.order_seed=3", "--training.max_steps=12", "--checkpointing.save_every_n_steps=6",
              "--checkpointing.log_spaced_until=0"]
    test_train.run(config, *seeded, "--checkpointing.run_name=whole")
    test_train.run(config, *seeded[:3], "--checkpointing.log_spaced_until=0", "--training.max_steps=12",
                   "--checkpointing.run_name=whole-again")
    proc = test_train.start(config, *seeded)
    for line in proc.stdout:
        if "saved" in line and "step_6" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert max(test_train.losses(runs / "run")) < 12, "the run finished before it was killed"
    test_train.run(config, *seeded)
    test_train.assert_same_run(runs / "whole", runs / "run")
    other = test_train.run(config, "--data.order_seed=4", "--training.max_steps=12", check=False)
    assert other.returncode == 1 and "data.order_seed (run: 3, new config: 4)" in other.stderr


# ---------------------------------------------------------------------------------------------
# The byte demo: its tokenizer in every checkpoint, the plan, the code in the run directory
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """configs/local.py for 2 steps: checkpoints 0 and 2, with captures on its held-out rows."""
    runs = tmp_path_factory.mktemp("demo")
    result = launcher.run([sys.executable, "train.py", "configs/local.py", "--training.max_steps=2",
                           "--checkpointing.save_every_n_steps=2", "--checkpointing.log_spaced_until=0",
                           "--evaluation.metrics=[]", f"--checkpointing.runs_dir={runs}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    return runs / "local", result.stdout


def test_autotokenizer_loads_a_byte_checkpoint_and_the_export_generates_text(demo):
    transformers = pytest.importorskip("transformers")
    latest = demo[0] / "checkpoints" / "latest"
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest)
    text = (Path(data.__file__).read_text())[:300] + "héllo ☃"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode())  # the ids of the embedded corpus: one per byte
    assert tokenizer.decode([*ids[:5], data.EOD_ID]) == data.byte_text([*ids[:5], data.EOD_ID])
    assert tokenizer.eos_token_id == data.EOD_ID
    model = transformers.AutoModelForCausalLM.from_pretrained(latest)
    prompt = tokenizer("def ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12) and tokenizer.decode(out[0]).startswith("def ")


def size_of(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_the_plan_states_the_bytes_the_checkpoints_then_take(demo):
    run_dir, output = demo
    plan = next(line for line in output.splitlines() if "per checkpoint" in line)
    each, total = (size_of(m) for m in (plan.split("plan: ")[1].split(" per checkpoint")[0],
                                         plan.split("), ")[1].split(" in all")[0]))
    assert "plan: 2 checkpoints, at steps 0, 2" in output and "free on the file system of" in plan
    written = [sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
               for step in sorted((run_dir / "checkpoints").glob("step_*"))]
    assert len(written) == 2
    for size in written:
        assert abs(each - size) / size < 0.10
    assert abs(total - sum(written)) / sum(written) < 0.10
    assert "plan: " in output and " to step 2: " in output  # the time, once the first step is logged


def test_a_plan_that_does_not_fit_on_the_disk_is_a_warning(tiny, monkeypatch, capsys):
    import collections

    import records
    import train

    config, _ = tiny
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(records.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert train.main([str(config), "--training.max_steps=2"]) == 0
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "is free" in line]
    assert re.search(r"plan: the checkpoints need [\d.]+ [KM]B and only 1 KB is free", warning)


def test_the_run_directory_holds_the_code_of_each_start(demo):
    run_dir, _ = demo
    (copy,) = (run_dir / "code").iterdir()
    assert (run_dir / "logs" / f"log_{copy.name}.log").is_file()  # the same start
    for name in ("train.py", "model.py", "config.py", "data.py", "checkpoint.py", "evaluation.py", "records.py",
                 "distributed.py", "configs/local.py", "requirements.txt"):
        assert (copy / name).read_bytes() == (ROOT / name).read_bytes()


def test_a_fork_without_git_history_still_records_its_code(tiny, tmp_path):
    config, runs = tiny
    fork = tmp_path / "fork"
    for path in [*ROOT.glob("*.py"), *ROOT.glob("configs/*.py")]:
        (fork / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (fork / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    result = launcher.run([sys.executable, str(fork / "train.py"), str(config), "--training.max_steps=2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| code unknown |" in result.stdout
    (copy,) = (runs / "run" / "code").iterdir()
    assert (copy / "train.py").read_bytes() == (ROOT / "train.py").read_bytes()


# ---------------------------------------------------------------------------------------------
# A tokenizer from the Hub; activation checkpointing; the xl size
# ---------------------------------------------------------------------------------------------

def test_a_hub_tokenizer_is_saved_in_every_checkpoint_and_a_missing_one_is_a_warning(tiny, hub, tmp_path):
    config, runs = tiny
    files = data.byte_tokenizer(32)
    (tmp_path / "tokenizer").mkdir()
    for name, content in files.items():
        (tmp_path / "tokenizer" / name).write_bytes(content)
    hub.add_repo("pico-test/tokenizer", tmp_path / "tokenizer", repo_type="model")
    test_train.run(config, "--data.tokenizer.name=pico-test/tokenizer", "--training.max_steps=2")
    for step in ("step_0", "step_1", "step_2"):
        for name, content in files.items():
            assert (runs / "run" / "checkpoints" / step / name).read_bytes() == content
    missing = test_train.run(config, "--data.tokenizer.name=pico-test/nothing", "--training.max_steps=2",
                             "--checkpointing.run_name=other")
    warning = [line for line in missing.stdout.splitlines() if "without a tokenizer" in line]
    assert len(warning) == 1 and "data.tokenizer.name='pico-test/nothing'" in warning[0]
    assert not (runs / "other" / "checkpoints" / "step_2" / "tokenizer.json").exists()


def test_activation_checkpointing_trains_the_same_run(tiny):
    config, runs = tiny
    test_train.run(config, "--training.max_steps=4", "--checkpointing.run_name=plain")
    test_train.run(config, "--training.max_steps=4", "--training.activation_checkpointing=True")
    test_train.assert_same_run(runs / "plain", runs / "run")


def test_the_xl_config_has_its_stated_parameter_count():
    import torch

    from config import load_config
    from model import PicoDecoder

    config = load_config(str(ROOT / "configs" / "pico-decoder-xl.py"), [])
    with torch.device("meta"):
        assert PicoDecoder(config.model).num_params() == 1_166_139_648
