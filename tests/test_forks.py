"""A fork changes one room: a copy of the project with one file changed as a researcher would change
it (a model variant in model.py, a new measurement in evaluation.py) trains, checkpoints, resumes
and records it, with nothing else touched."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import launcher
from test_evaluation import eval_args, write_eval_set
from test_train import ROOT, losses


def fork(tmp_path: Path, file: str, *edits: tuple[str, str]) -> Path:
    """The project's code copied to tmp_path / "fork", with `file` changed by each (old, new)."""
    copy = tmp_path / "fork"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("tests", "runs", "corpora", ".git", "__pycache__"))
    text = (copy / file).read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (copy / file).write_text(text)
    return copy


def train(code: Path, config: Path, *overrides):
    result = launcher.run([sys.executable, str(code / "train.py"), str(config), *overrides],
                          capture_output=True, text=True, cwd=code, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def python(code: Path, program: str) -> str:
    """What a program printed, run beside the fork's modules."""
    (code / "program.py").write_text(textwrap.dedent(program))
    result = launcher.run([sys.executable, str(code / "program.py")], capture_output=True, text=True,
                          cwd=code, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# An MLP beside SwiGLU: a class, a field, and the block choosing between them.
GELU_MLP = [
    ("    position_emb_theta: float = 10000.0\n",
     "    position_emb_theta: float = 10000.0\n    mlp: Literal['swiglu', 'gelu'] = 'swiglu'\n"),
    ("from dataclasses import dataclass\n", "from dataclasses import dataclass\nfrom typing import Literal\n"),
    ("class PicoDecoderBlock(nn.Module):", """class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)

    def forward(self, x):
        return self.w_2(F.gelu(self.w_1(x)))


class PicoDecoderBlock(nn.Module):"""),
    ("        self.swiglu = SwiGLU(config)\n",
     "        self.swiglu = SwiGLU(config) if config.mlp == 'swiglu' else GeluMLP(config)\n"),
]


def check(code: Path, config: Path, *overrides) -> subprocess.CompletedProcess:
    """check.py of a copy of the project, on config."""
    return launcher.run([sys.executable, str(code / "check.py"), str(config), *overrides], capture_output=True,
                        text=True, cwd=code, timeout=300)


def test_check_passes_on_the_demo_and_says_what_passed():
    result = check(ROOT, ROOT / "configs" / "local.py")
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("check passed in ") and last.endswith(
        "s: trains, checkpoints with captures, measures paloma, probe, induction, attention, tasks, stops, "
        "resumes bit for bit, exports and loads back")
    assert "transformers' LlamaForCausalLM loads it with the same logits" in result.stdout


def test_a_model_variant_in_model_py_alone_trains_checkpoints_resumes_and_loads(tiny, tmp_path):
    config, runs = tiny
    code = fork(tmp_path, "model.py", *GELU_MLP)
    result = check(code, config, "--model.mlp=gelu", f"--checkpointing.runs_dir={runs}")
    assert result.returncode == 0 and "check passed" in result.stdout, result.stdout + result.stderr
    assert "transformers cannot" in (runs / "whole" / "logs").glob("*.log").__next__().read_text()  # said at start
    step = runs / "whole" / "checkpoints" / "step_4"
    saved = json.loads((step / "config.json").read_text())
    assert saved["model_type"] == "pico_decoder" and saved["mlp"] == "gelu"
    activations = step / "learning_dynamics" / "train_activations.pt"
    assert "layers.1.swiglu.w_2" in python(code, f"import torch; print(list(torch.load({str(activations)!r})))")
    assert python(code, f"""
        import torch
        from model import PicoDecoder
        model = PicoDecoder.from_pretrained({str(step)!r})
        print(model.config.mlp, type(model.layers[0].swiglu).__name__)""").split() == ["gelu", "GeluMLP"]
    # The default stays the Llama export, which the fork loads as a SwiGLU model.
    train(code, config, "--training.max_steps=2", "--checkpointing.run_name=llama")
    llama = runs / "llama" / "checkpoints" / "step_2"
    assert json.loads((llama / "config.json").read_text())["model_type"] == "llama"
    assert python(code, f"from model import PicoDecoder; print(PicoDecoder.from_pretrained({str(llama)!r})"
                        f".config.mlp)").strip() == "swiglu"


# A schedule with a state of its own (the steps it has been asked about), which no checkpoint holds:
# a resumed run starts it again, and its learning rates are no longer the run's.
COUNTING_SCHEDULE = [("    def multiplier(n: int) -> float:\n",
                      "    calls = itertools.count()\n\n    def multiplier(n: int) -> float:\n"
                      "        n = next(calls)  # the bug: the steps this process has seen\n"),
                     ("import collections\n", "import collections\nimport itertools\n")]


def test_check_finds_a_fork_whose_resumed_run_is_another_run(tiny, tmp_path):
    config, _ = tiny
    result = check(fork(tmp_path, "train.py", *COUNTING_SCHEDULE), config)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("check FAILED: resumed, step 2's lr is ") and "as in the run that never stopped" in last


def test_a_variant_run_resumed_under_another_variant_of_the_same_shapes_is_refused_only_by_shape(tiny, tmp_path):
    config, runs = tiny
    code = fork(tmp_path, "model.py", *GELU_MLP)
    train(code, config, "--model.mlp=gelu", "--training.max_steps=4")
    result = launcher.run([sys.executable, str(code / "train.py"), str(config), "--model.mlp=swiglu",
                           "--training.max_steps=8"], capture_output=True, text=True, cwd=code, timeout=300)
    # SwiGLU has a w_0 the GELU MLP has not: another set of tensors, refused naming the field
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.mlp (run: 'gelu', new config: 'swiglu')" in result.stderr


# A logit lens (nostalgebraist 2020), added where measurements live: each layer's residual stream
# decoded by the output head, its loss on the evaluation rows.
LOGIT_LENS = [
    ("# What a checkpoint can measure,", '''@torch.no_grad()
def logit_lens(model, rows, at):
    """Each layer's mean loss on the evaluation rows, its output decoded by the output head."""
    mine, _ = my_rows(rows)
    sums = torch.zeros(model.config.n_layers + 1, dtype=torch.float64)
    for row in mine:
        inputs, labels = data.collate([row])

        def each(layer, x):
            sums[layer] += model.decode(x, labels, reduction="sum")[1].double()
        model.residual_stream(inputs, each=each)
        sums[-1] += len(row) - 1
    if dist.is_initialized():
        dist.all_reduce(sums)
    losses = (sums[:-1] / sums[-1]).tolist()
    return Measured(results={"logit_lens": losses},
                    record={f"logit_lens/layers.{i}": loss for i, loss in enumerate(losses)})


# What a checkpoint can measure,'''),
    ('    "probe": (probe_rows, probe),\n', '    "probe": (probe_rows, probe),\n    "logit_lens": (eval_rows, logit_lens),\n'),
]


def test_a_measurement_in_evaluation_py_alone_is_recorded_and_never_doubled_on_resume(tiny, tmp_path):
    config, runs = tiny
    code = fork(tmp_path, "evaluation.py", *LOGIT_LENS)
    write_eval_set(tmp_path / "paloma", [33, 20, 9])
    on = [*eval_args(tmp_path / "paloma"), "--evaluation.metrics=['paloma', 'logit_lens']"]
    train(code, config, "--training.max_steps=4", *on)
    results = runs / "run" / "eval_results"
    measured = json.loads((results / "step_4.json").read_text())
    lens = measured["logit_lens"]
    # The last layer decoded is the model itself: its loss is the evaluation's
    assert len(lens) == 2 and lens[-1] == pytest.approx(math.log(measured["paloma"]), rel=1e-5)
    (results / "step_4.json").unlink()  # as if killed while evaluating checkpoint 4
    train(code, config, "--training.max_steps=8", *on)
    records = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r["step"] for r in records if "logit_lens/layers.0" in r]
    assert measured == sorted(set(measured)) and 4 in measured and 8 in measured  # once each
    assert all(r["evaluation"] is True for r in records if "logit_lens/layers.0" in r)
    assert json.loads((results / "step_4.json").read_text())["logit_lens"] == pytest.approx(lens)
    assert sorted(losses(runs / "run")) == list(range(1, 9))
