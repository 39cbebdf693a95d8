"""The config of a run: six sections with pico-train's names and defaults (its recipe: global
batch 1024 x 2048 tokens, AdamW 3e-4, 2,500 warm-up steps, linear decay to 0 at 200,000 steps).

A Python config file (`model.d_model = 96`), a pico-train YAML (`model: {d_model: 96}`) and the
command line (`--model.d_model=96`) all set keys through one walker, `set_key`. A field's type
says what it accepts, checked by one generic check; `validate()` relates several keys.

Machinery for every file, and the reference of every key: the comment beside each field says
what it does (docs/config.md gathers them in a table).
"""

import ast
import dataclasses
import functools
import math
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import yaml

from model import CAPTURED_BY_DEFAULT, ModelConfig, PicoDecoder


class ConfigError(Exception):
    """A bad config: the message names the key, the value and what was expected."""


Positive, NonNegative = Annotated[int, "positive"], Annotated[int, "non-negative"]
PositiveFloat, NonNegativeFloat = Annotated[float, "positive"], Annotated[float, "non-negative"]


# Each section is a dataclass with slots, so a misspelled field is an error (docs/config.md: every field).
@dataclass(slots=True)
class DatasetConfig:
    name: str = "pico-lm/pretokenized-dolma"  # a Hub repo[@revision], a directory, "builtin:stdlib-bytes"
    max_cached_shards: Positive = 2  # Hub shards kept on disk: the one read and the next ones
    read_timeout: PositiveFloat = 30.0  # seconds the loop waits for a step's rows, then stops


@dataclass(slots=True)
class DataLoaderConfig:
    batch_size: Positive = 1024  # the GLOBAL batch, in sequences, summed over ranks and micro-steps


@dataclass(slots=True)
class TokenizerConfig:
    # What made the ids (a Hub model repo, a tokenizer.json or its folder, or "bytes"): saved with
    # every checkpoint; None: none
    name: str | None = "allenai/OLMo-7B-0724-hf"
    vocab_size: Positive = 50304


@dataclass(slots=True)
class DataConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: NonNegative = 0  # shuffles the embedded corpus once, when built
    order_seed: NonNegative = 0  # the order of the rows; 0: the dataset's own (see data.py)


@dataclass(slots=True)
class OptimizationConfig:
    optimizer: Literal["adamw"] = "adamw"
    lr: PositiveFloat = 3e-4
    lr_scheduler: Literal["linear_with_warmup", "cosine_with_warmup"] = "linear_with_warmup"
    lr_warmup_steps: NonNegative = 2500
    weight_decay: float = 0.01  # PyTorch's AdamW default, as pico-train uses it
    gradient_accumulation_steps: Positive = 1
    max_grad_norm: PositiveFloat | None = None  # gradient clipping; None: off, as in pico-train


@dataclass(slots=True)
class TrainingConfig:
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    max_steps: Positive = 200_000
    seed: NonNegative = 42  # the model's initialisation; the data order's is data.order_seed
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA, else MPS, else CPU
    precision: Literal["auto", "bf16-mixed", "32"] = "auto"  # auto: bf16-mixed on CUDA, else 32
    compile: bool | None = None  # torch.compile; None: on for CUDA, off elsewhere
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; see train.py's parallelize
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, gloo on CPU
    # Seconds a collective waits for a rank that stopped answering before it fails, so torchrun can
    # restart the group; it must outlast rank 0's save of the largest checkpoint while the others wait
    collective_timeout: PositiveFloat = 600.0
    reshard_after_forward: bool = True  # FSDP: gather each block again for its backward
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory
    # CUDA: deterministic kernels (cuBLAS's workspace, SDPA's math backend, ...; train.deterministic_kernels),
    # so that two runs of one config on one machine are bit for bit the same, at a cost in speed and
    # memory (docs/branching.md). The CPU's kernels are so already: there it changes nothing
    deterministic: bool = False


@dataclass(slots=True)
class TrainingCheckpointingConfig:
    auto_resume: bool = True  # False: a run directory that holds checkpoints is refused
    start_over: bool = False  # move the run directory's checkpoints and records aside, start anew
    # A new run's first weights alone (then a fresh optimizer, schedule and data from step 0), any
    # from_pretrained format; resume ignores it
    init_from: str | None = None
    # A new run that continues a checkpoint of another with its whole state (weights, optimizer,
    # schedule, data position, RNG, the probe's rows) from its step N: RUN/checkpoints/step_N (a
    # path, or one under runs_dir), or a Hub model repo@revision that holds one (a run uploaded with
    # hf_checkpoint.upload_optimizer; revision its tag RUN-stepN, a branch or a commit). The branch may
    # change the lr and its schedule, max_steps, the data (from step N on) and the measurements, not
    # the model's shapes or the global batch (docs/branching.md). Resume ignores it
    branch_from: str | None = None
    # Written by the trainer when a branch starts, and read back from training_config.yaml when it
    # resumes (a value given here is replaced): `source` (branch_from resolved), `parent_run`,
    # `parent_step`, `changed` ({key: [the parent's value, the branch's]}) and `data_before`, the data
    # the rows before each branch point came from (data.training_rows)
    lineage: dict | None = None


@dataclass(slots=True)
class HuggingFaceCheckpointingConfig:
    repo_id: str = ""  # with checkpointing.save_to_hf: each checkpoint goes to branch run_name here
    collection_slug: str | None = None  # pico-train's; unread: pico adds no checkpoint to a collection
    upload_attempts: Positive = 5  # tries of a failed upload; then it waits for the next start
    upload_retry_delay: NonNegativeFloat = 10.0  # seconds before the second try, doubling after
    upload_optimizer: bool = False  # the optimizer and training state too, so the Hub copy resumes


@dataclass(slots=True)
class LearningDynamicsCheckpointingConfig:
    layer_suffixes: list[str] = field(default_factory=lambda: list(CAPTURED_BY_DEFAULT))  # model.py's names
    layers: list[int] | None = None  # None: every layer
    sequence_idx: int = -1  # the position whose activations are kept; -1: each row's last
    batch_size: Positive = 8  # sub-batch of the capture's forward/backward; the result within float32 rounding
    capture_train: bool = True  # train_*.pt: on the batch the checkpoint's last step trained on
    # val_*.pt on this fixed set (a Hub repo's val split, a directory...); None: none, as pico-train
    eval_data: str | None = "pico-lm/pretokenized-paloma-tinsy"
    # Its first N rows; None: all of them, as pico-train captures. A bound makes each checkpoint's
    # captures cheaper where they would cost much of the training (the demo's 64: configs/local.py says why)
    eval_rows: Positive | None = None


@dataclass(slots=True)
class CheckpointingConfig:
    run_name: str | None = None  # a directory in runs_dir; None: a new name from the time
    runs_dir: str = "runs"
    save_every_n_steps: Positive = 1000
    log_spaced_until: NonNegative = 512  # Pythia's early checkpoints: steps 0, 1, 2, 4, ... up to it; 0: step 0 only
    keep_last_n_optimizer_states: Positive | None = None  # optimizer state (2x model) in newest N; None: all
    save_to_hf: bool = False
    hf_checkpoint: HuggingFaceCheckpointingConfig = field(default_factory=HuggingFaceCheckpointingConfig)
    training: TrainingCheckpointingConfig = field(default_factory=TrainingCheckpointingConfig)
    learning_dynamics: LearningDynamicsCheckpointingConfig = field(
        default_factory=LearningDynamicsCheckpointingConfig)


@dataclass(slots=True)
class PalomaEvaluationConfig:
    dataset_name: str = "pico-lm/pretokenized-paloma-tinsy"
    dataset_split: str = "val"
    max_length: int = 2048  # pico-train's; unread: an evaluation row has at most max_seq_len + 1
    batch_size: Positive = 16
    rows: Positive | None = None  # its first N rows, for every measurement of it; None: all
    # Olsson et al.'s in-context learning score, from the same pass: the mean loss at the second
    # position minus that at the first. None: their 50 and 500, scaled to model.max_seq_len / 2048
    icl_positions: list[NonNegative] | None = None


@dataclass(slots=True)
class ProbeEvaluationConfig:
    # With "probe" in evaluation.metrics: training rows spread evenly over the run (data.probe_positions),
    # each one's loss recorded at every checkpoint: before, at and after the step that trains on it.
    # At most all the run's; 0: none.
    # A run resumed with another training.max_steps but as many rows keeps the rows it had
    rows: NonNegative = 256
    # Pythia's memorization test on them: greedy decoding of memorization_tokens tokens from each
    # row's first memorization_prefix tokens, compared with the row's own. 0 tokens: no test; a
    # model.max_seq_len shorter than both together: none either, with a warning
    memorization_prefix: Positive = 32
    memorization_tokens: NonNegative = 32
    batch_size: Positive = 16


@dataclass(slots=True)
class InductionEvaluationConfig:
    # Olsson et al.'s induction heads, with "induction" in evaluation.metrics: sequences of random
    # tokens (seeded: the same for every size of a suite), each repeated twice
    sequences: Positive = 32
    length: Positive | None = None  # tokens in each half; None: model.max_seq_len / 4, at most 256
    seed: NonNegative = 0
    batch_size: Positive = 8


@dataclass(slots=True)
class AttentionEvaluationConfig:
    # With "attention" in evaluation.metrics: each head's attention entropy on the first `rows`
    # rows of the evaluation set (evaluation.paloma's), one row at a time
    rows: Positive = 16


@dataclass(slots=True)
class TasksEvaluationConfig:
    # With "tasks" in evaluation.metrics: each a Hub dataset repo (namespace/name[@revision]), a local
    # directory of Parquet files or "builtin:python-syntax" (minimal pairs from the embedded corpus's
    # held-out rows). The kind of task follows from its columns (see evaluation.py and docs/measurements.md)
    names: list[str] = field(default_factory=list)
    # The files of one split: a folder of that name or files named split-* (data.in_split); None: all
    split: str | None = None
    max_items: Positive | None = None  # per task, spread evenly over its items; None: every item
    batch_size: Positive = 16  # sequences (a pair's sentences, a question's choices) per forward


@dataclass(slots=True)
class EvaluationConfig:
    # What every checkpoint measures: names of evaluation.py's MEASUREMENTS (checked there), "paloma"
    # (perplexity, loss by position and the in-context learning score), "probe" (the training probe
    # and memorization), "induction" (induction heads), "attention" (attention entropy), "tasks"
    # (evaluation.tasks: minimal pairs and multiple choice, each item's result kept). All but tasks
    # are on by default: each under 0.02% of the 1,000 suite steps between two checkpoints on 64 rows,
    # paloma under 0.1% on a whole evaluation set of 1,000 (2-core AMD EPYC; docs/measurements.md,
    # "What the measurements cost"); tasks need a dataset chosen
    metrics: list[str] | None = field(default_factory=lambda: ["paloma", "probe", "induction", "attention"])
    paloma: PalomaEvaluationConfig = field(default_factory=PalomaEvaluationConfig)
    probe: ProbeEvaluationConfig = field(default_factory=ProbeEvaluationConfig)
    induction: InductionEvaluationConfig = field(default_factory=InductionEvaluationConfig)
    attention: AttentionEvaluationConfig = field(default_factory=AttentionEvaluationConfig)
    tasks: TasksEvaluationConfig = field(default_factory=TasksEvaluationConfig)


@dataclass(slots=True)
class LoggingConfig:
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_every_n_steps: Positive = 100
    layer_stats: bool = True  # each log step: weight, gradient and update norms per layer


@dataclass(slots=True)
class LossSpikeConfig:
    # A step whose loss exceeds the mean of the `window` losses before it by more than std_devs
    # standard deviations (OLMo-core's rule: 6 over 128) is logged, and the first of a run of such
    # steps is captured in spikes/, up to max_captures times in the whole run. None: off
    std_devs: PositiveFloat | None = 6.0
    window: Positive = 128
    max_captures: NonNegative = 16


@dataclass(slots=True)
class WandbConfig:
    project: str = ""
    entity: str = ""


@dataclass(slots=True)
class MonitoringConfig:
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loss_spikes: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    save_to_wandb: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


# pico-train keys with no meaning here: a pico-train YAML that sets them gets one warning each.
PICO_TRAIN_ONLY = {
    "training.fabric": "has no meaning under torchrun (launch with torchrun; see docs/suite.md)",
    "model.model_type": "the pico-decoder is the only model",
    "model.batch_size": "the batch is data.dataloader.batch_size",
    **dict.fromkeys(["checkpointing.checkpoints_dir", "checkpointing.logs_dir", "checkpointing.evaluation",
                     "checkpointing.learning_dynamics_dir"], "the run directory is fixed (see docs/run-directory.md)"),
    **dict.fromkeys(["checkpointing.fabric_checkpoint_dir", "checkpointing.fabric_checkpoint_filename"],
                    "checkpoints are plain PyTorch files"),
    **dict.fromkeys(["monitoring.save_to_picolabs", "monitoring.pico_report"],
                    "Pico Labs reporting is not supported"),
}


def _lookup(config: Config, key: str) -> tuple[object, str]:
    """(the section holding a dotted key, its last name); an error names the first unknown part."""
    section, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a config section")
        names = [f.name for f in dataclasses.fields(section)]
        if part not in names:
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a config key; expected one of "
                              f"{', '.join(names)}")
        holder, section = section, getattr(section, part)
    return holder, part


def set_key(config: Config, key: str, value, source: str):
    """Set a dotted key (training.optimization.lr) to value: the one way a config file, a YAML or
    an override writes the config. A mapping given to a section sets its keys."""
    if ignored := next((k for k in PICO_TRAIN_ONLY if key == k or key.startswith(k + ".")), None):
        print(f"warning: {source}: {ignored} ignored: {PICO_TRAIN_ONLY[ignored]}", file=sys.stderr)
        return
    holder, name = _lookup(config, key)
    if not dataclasses.is_dataclass(getattr(holder, name)):
        setattr(holder, name, value)
    elif isinstance(value, dict) or value is None:  # YAML: `section:` with nothing under it is None
        for sub, sub_value in (value or {}).items():
            set_key(config, f"{key}.{sub}", sub_value, source)
    else:
        raise ConfigError(f"{key}={value!r}: {key} is a section; expected a mapping of its keys")


class _Section:
    """A config section as a Python config file sees it: `model.d_model = 96` is set_key."""

    def __init__(self, config: Config, path: str, source: str):
        object.__setattr__(self, "_where", (config, path, source))

    def __getattr__(self, name):
        config, path, source = self._where
        value = getattr(*_lookup(config, f"{path}.{name}"))
        return _Section(config, f"{path}.{name}", source) if dataclasses.is_dataclass(value) else value

    def __setattr__(self, name, value):
        config, path, source = self._where
        set_key(config, f"{path}.{name}", value, source)


_NO = object()  # what _conform returns for a value of another type


def _conform(value, hint):
    """value as the type `hint` (an int where a float is expected), or _NO."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:  # Positive, NonNegative, ...
        value = _conform(value, args[0])
        return value if value is not _NO and (value > 0 if args[1] == "positive" else value >= 0) else _NO
    if origin in (typing.Union, types.UnionType):
        return next((v for v in (_conform(value, arg) for arg in args) if v is not _NO), _NO)
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NO
    if origin is list:
        items = [_conform(v, args[0]) for v in value] if isinstance(value, (list, tuple)) else [_NO]
        return _NO if any(v is _NO for v in items) else items
    if isinstance(value, bool) and hint is not bool:
        return _NO  # True is an int to Python, never a number to a config
    if hint is float and isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else _NO  # lr=1e999 is no learning rate
    return value if isinstance(value, hint) else _NO


def typed(value, hint):
    """value as the type `hint` (an int where a float is expected); ValueError naming what that
    type accepts where it is not of it."""
    conformed = _conform(value, hint)
    if conformed is _NO:
        raise ValueError(f"expected {describe(hint)}")
    return conformed


def describe(hint) -> str:
    """What a field of type `hint` accepts, in words: 'a positive integer', "'ddp' or 'fsdp'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return f"a {args[1]} {'integer' if args[0] is int else 'number'}"
    if origin in (typing.Union, types.UnionType):  # every union here is `X | None`
        return f"None or {describe(args[0])}"
    if origin is list:
        return f"a list, each {describe(args[0])}"
    if origin is Literal:
        return " or ".join(map(repr, args))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}[hint]


def check_types(part, path: str = ""):
    """Every field of a config (part) against its type; ints become floats where floats are due."""
    hints = typing.get_type_hints(type(part), include_extras=True)
    for f in dataclasses.fields(part):
        key, value = f"{path}.{f.name}" if path else f.name, getattr(part, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, key)
        elif (conformed := _conform(value, hints[f.name])) is _NO:
            raise ConfigError(f"{key}={value!r}: expected {describe(hints[f.name])}")
        else:
            setattr(part, f.name, conformed)


def parse_override(arg: str, config: Config):
    """--section.key=value: the value a Python literal, else the text; the text too where only it
    fits the key (--checkpointing.run_name=123 names a run "123"). Booleans are also spelt as YAML
    and most command lines spell them: true, false, in any case."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError("expected --section.key=value")
    key, text = arg[2:].split("=", 1)
    holder, name = _lookup(config, key)
    hint = typing.get_type_hints(type(holder), include_extras=True)[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(text.lower(), text)
    set_key(config, key, next((v for v in (value, text) if _conform(v, hint) is not _NO), value), arg)


def load_config(path: str, overrides: list[str]) -> Config:
    """The config of a run: defaults, then the file (Python or pico-train YAML), then overrides.
    An error is named by what set the key: the file (a Python file's line too) or the override."""
    config, source, where = Config(), Path(path), path
    if not source.is_file() or source.suffix not in (".py", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: expected an existing configs/*.py or YAML file")
    try:
        if source.suffix == ".py":
            namespace = {f.name: _Section(config, f.name, path) for f in dataclasses.fields(config)}
            exec(compile(source.read_text(), str(source), "exec"), namespace)
        else:
            try:
                values = yaml.safe_load(source.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(values, dict):
                raise ConfigError(f"expected a mapping of config sections, got {values!r}")
            for name, value in values.items():
                set_key(config, str(name), value, path)
        for where in overrides:
            parse_override(where, config)
    except ConfigError as e:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(source)]
        raise ConfigError(f"{where}{f', line {lines[0]}' if lines else ''}: {e}") from None
    except Exception as e:  # a Python config file's own error, such as a NameError
        raise ConfigError(f"{path}: {e.__class__.__name__}: {e}") from None
    check_types(config)
    return config


def validate(config: Config, world_size: int):
    """The rules that relate several keys (or a key and this machine), each named, before
    anything is built or written. A single key's type, choice or sign is its field's type."""
    opt, training, ld = config.training.optimization, config.training, config.checkpointing.learning_dynamics
    batch, per_step = config.data.dataloader.batch_size, world_size * opt.gradient_accumulation_steps
    hf, name = config.checkpointing.hf_checkpoint, config.checkpointing.run_name
    icl, induction = config.evaluation.paloma.icl_positions, config.evaluation.induction.length
    seq_len, cuda = config.model.max_seq_len, torch.cuda.is_available()
    tasks, start = config.evaluation.tasks.names, config.checkpointing.training
    tasks_on = "tasks" in (config.evaluation.metrics or [])
    rules = [  # (key, value, whether it is right, what was expected)
        ("data.dataloader.batch_size", batch, batch % per_step == 0,
         f"a positive multiple of world size x training.optimization.gradient_accumulation_steps "
         f"= {world_size} x {opt.gradient_accumulation_steps} = {per_step}"),
        ("training.backend", training.backend,
         training.backend != "nccl" or (cuda and training.device in ("auto", "cuda")),
         "'gloo' or 'auto': NCCL needs CUDA GPUs, and " + (
             "training.device is not 'cuda'" if cuda else "this machine has none")),
        ("checkpointing.hf_checkpoint.repo_id", hf.repo_id, hf.repo_id or not config.checkpointing.save_to_hf,
         "a Hub model repo id (namespace/name) when checkpointing.save_to_hf is true"),
        ("checkpointing.learning_dynamics.sequence_idx", ld.sequence_idx,
         -config.model.max_seq_len <= ld.sequence_idx < 1, "a position from the end of each row, "
         "-1 (the last) to -model.max_seq_len, or 0 (the first)"),
        ("checkpointing.run_name", name, name is None or (0 < len(name.encode()) <= 200 and name not in (
            ".", "..") and not set(name) & set("/\\\0")), "a name in runs_dir (no '/', not '..', 1-200 B)"),
        ("training.seed", training.seed, training.seed < 2 ** 63, "a seed below 2**63"),
        ("monitoring.loss_spikes.window", config.monitoring.loss_spikes.window,
         config.monitoring.loss_spikes.window >= 2, "at least 2 losses, for a standard deviation"),
        ("checkpointing.learning_dynamics.layers", ld.layers,
         all(0 <= i < config.model.n_layers for i in ld.layers or []),
         f"None or layer indices in [0, model.n_layers={config.model.n_layers})"),
        ("evaluation.paloma.icl_positions", icl, icl is None or len(icl) == 2 and icl[0] < icl[1] < seq_len,
         f"None or two positions, the early before the late, below model.max_seq_len={seq_len}"),
        ("evaluation.induction.length", induction, induction is None or 2 <= induction <= seq_len // 2,
         f"None or 2 to model.max_seq_len / 2 = {seq_len // 2} tokens: the sequence is two of them"),
        ("evaluation.metrics", config.evaluation.metrics, "induction" not in (config.evaluation.metrics or [])
         or induction is not None or seq_len >= 8, f"no 'induction' when model.max_seq_len={seq_len} < 8 "
         f"(its halves are max_seq_len / 4 tokens, at least 2), or evaluation.induction.length set"),
        ("evaluation.tasks.names", tasks, tasks or not tasks_on,
         "at least one task (a Hub dataset repo, a directory of Parquet files or 'builtin:python-syntax') "
         "when evaluation.metrics holds 'tasks'"),
        ("evaluation.tasks.names", tasks, len(set(tasks)) == len(tasks), "each task once"),
        ("checkpointing.training.init_from", start.init_from, start.init_from is None or start.branch_from is None,
         "None when checkpointing.training.branch_from is set: init_from starts a new run from weights alone, "
         "branch_from continues a checkpoint's whole state; one of them"),
        ("checkpointing.training.lineage", start.lineage, start.lineage is None or start.branch_from is not None,
         "None: the trainer writes it for a run with checkpointing.training.branch_from"),
    ]
    problems = config.model.problems() + [f"{key}={value!r}: expected {expected}"
                                          for key, value, ok, expected in rules if not ok]
    if problems:
        raise ConfigError(problems[0])


def tensor_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The name and shape of every weight and buffer of the model (its RoPE tables fix the rows'
    length): what must stay the same for a checkpoint to resume. The model itself declares them."""
    with torch.device("meta"):
        model = PicoDecoder(config)
    return {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def saved_value(saved: dict, key: str):
    """A dotted key's value in a saved config (plain YAML); where it lacks the key (saved by a pico
    from before the key existed), the key's default, which that run had."""
    for part in key.split("."):
        if not isinstance(saved, dict) or part not in saved:
            return _defaults()[key]
        saved = saved[part]
    return saved


@functools.cache
def _defaults() -> dict:
    return flat(dataclasses.asdict(Config()))


def read_run_config(path: Path, expected: str) -> dict:
    """A run's training_config.yaml, read as plain YAML so that a run saved by a pico with other
    config keys still reads (a model field it lacks had its default); expected: what it should be,
    for the one-line error."""
    try:
        saved = yaml.safe_load(path.read_text())
        tensor_shapes(_saved_model(saved))  # a model that cannot be built is no config either
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]  # YAML's errors span several lines
        raise ConfigError(f"{path}: cannot be read ({first}); expected {expected}") from None
    return saved


def _saved_model(saved: dict) -> ModelConfig:
    return ModelConfig(**{f.name: saved["model"][f.name] for f in dataclasses.fields(ModelConfig)
                          if f.name in saved["model"]})


def cannot_continue(config: Config, saved: dict, then: str, now: str) -> list[str]:
    """What a run cannot go on under, as "key (then: old, now: new)": the model's tensor shapes (named
    by the model fields that differ; others, such as norm_eps, may change) and the global batch, on
    which every data position and the probe's steps depend."""
    old_model, differ = _saved_model(saved), []
    if tensor_shapes(old_model) != tensor_shapes(config.model):
        pairs = [(f.name, getattr(old_model, f.name), getattr(config.model, f.name))
                 for f in dataclasses.fields(old_model)]
        differ = [f"model.{name} ({then}: {old!r}, {now}: {new!r})" for name, old, new in pairs if old != new]
    old = saved_value(saved, "data.dataloader.batch_size")
    if old != config.data.dataloader.batch_size:
        differ.append(f"data.dataloader.batch_size ({then}: {old!r}, {now}: {config.data.dataloader.batch_size!r})")
    return differ


def check_resume_compatible(config: Config, saved_path: Path) -> list[str]:
    """A run resumes only under the model's tensor shapes, global batch and data order of its
    training_config.yaml (cannot_continue); the schedule may change (a lower lr after a divergence,
    more steps). Returns the schedule and optimizer keys that changed, as "key (run: old, now: new)",
    for the log to say. A branch resumes as itself: a config naming another branch_from is refused,
    and its lineage, which the data before its step depends on, is read back into the config."""
    saved = read_run_config(saved_path, "the config of the run being resumed")
    differ = cannot_continue(config, saved, "run", "new config")
    old_order = saved_value(saved, "data.order_seed")
    if old_order != config.data.order_seed:
        differ.append(f"data.order_seed (run: {old_order!r}, new config: {config.data.order_seed!r})")
    if differ:
        raise ConfigError(f"resume refused: {saved_path} disagrees with the new config on "
                          f"{'; '.join(differ)}; use another checkpointing.run_name")
    start, saved_from = config.checkpointing.training, saved_value(saved, "checkpointing.training.branch_from")
    if start.branch_from is not None and start.branch_from != saved_from:
        what = f"a branch from {saved_from}" if saved_from else "a run that is no branch"
        raise ConfigError(f"checkpointing.training.branch_from={start.branch_from!r}: {saved_path.parent} "
                          f"holds another run, with checkpoints ({what}); expected a new "
                          f"checkpointing.run_name for the branch")
    start.branch_from, start.lineage = saved_from, saved_value(saved, "checkpointing.training.lineage")
    # The schedule's keys (gradient_accumulation_steps only splits the same gradient differently)
    changed = [("training.max_steps", saved_value(saved, "training.max_steps"), config.training.max_steps)]
    changed += [(f"training.optimization.{f.name}", saved_value(saved, f"training.optimization.{f.name}"),
                 getattr(config.training.optimization, f.name))
                for f in dataclasses.fields(OptimizationConfig) if f.name != "gradient_accumulation_steps"]
    return [f"{key} (run: {old!r}, now: {new!r})" for key, old, new in changed if old != new]


def flat(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}."""
    out = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        out.update(flat(value, key + ".") if isinstance(value, dict) else {key: value})
    return out


def branch_changes(config: Config, parent: dict, step: int, source: str) -> dict:
    """What a branch from checkpoint `step` of a run whose training_config.yaml is `parent` changes:
    {key: [the parent's value, the branch's]}, over every key but those that say where the run is
    and where it starts from (checkpointing.run_name, runs_dir, training.*). A change the parent
    cannot go on under (cannot_continue) is refused, and a training.max_steps with nothing to train.
    source: checkpointing.training.branch_from, for the errors."""
    key = f"checkpointing.training.branch_from={source!r}"
    if differ := cannot_continue(config, parent, "parent", "branch"):
        raise ConfigError(f"{key}: the branch's config differs from the parent run's on {'; '.join(differ)}; "
                          f"expected the parent's model shapes and global batch, which a branch continues "
                          f"(checkpointing.training.init_from starts a new run from weights alone)")
    if config.training.max_steps <= step:
        raise ConfigError(f"training.max_steps={config.training.max_steps}: expected more than step {step}, "
                          f"where the branch starts ({key})")
    changed = {}
    for name, value in flat(dataclasses.asdict(config)).items():
        if name in ("checkpointing.run_name", "checkpointing.runs_dir") or name.startswith("checkpointing.training."):
            continue
        if (old := saved_value(parent, name)) != value:
            changed[name] = [old, value]
    return changed
