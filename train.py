"""Train a pico-decoder: the config, then the training loop.

    python train.py configs/local.py [--training.max_steps=100 ...]
    torchrun --nproc_per_node=8 train.py configs/demo.py [...]     # DDP (or FSDP) on 8 GPUs

Re-running the same command resumes from runs/RUN/checkpoints/latest; SIGTERM or Ctrl-C saves a
checkpoint at the current step and exits 0. See README.md for the config reference.
"""

import ast
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import data
from model import ModelConfig, PicoDecoder, rope_tables

try:  # FSDP2: public from torch 2.6, under torch.distributed._composable in 2.5
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        MixedPrecisionPolicy = fully_shard = None

# ---------------------------------------------------------------------------------------------
# Config: dataclass sections with pico-train's names and defaults (its recipe: global batch
# 1024 x 2048 tokens, AdamW 3e-4, 2,500 warm-up steps, linear decay to 0 at 200,000 steps).
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    # A Hub dataset repo ("namespace/name", optionally "@revision"), a local directory of Parquet
    # shards, or "builtin:stdlib-bytes" (the offline corpus).
    name: str = "pico-lm/pretokenized-dolma"
    # Shards of a Hub dataset kept on disk (in the Hugging Face cache): the one being read and the
    # next ones, downloaded in the background; older ones are deleted (a dolma shard: 42M tokens).
    max_cached_shards: int = 2


@dataclass
class DataLoaderConfig:
    batch_size: int = 1024  # the GLOBAL batch, in sequences, summed over ranks and micro-steps


@dataclass
class TokenizerConfig:
    name: str = "allenai/OLMo-7B-0724-hf"  # what made the token ids; the trainer never runs it
    vocab_size: int = 50304


@dataclass
class DataConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Shuffles the rows of the embedded corpus when it is built. The order of Parquet shards
    # (pretokenized-dolma, local directories) is fixed by their files and never shuffled.
    seed: int = 0


@dataclass
class OptimizationConfig:
    optimizer: str = "adamw"
    lr: float = 3e-4
    lr_scheduler: str = "linear_with_warmup"  # or "cosine_with_warmup"; both decay to 0
    lr_warmup_steps: int = 2500
    weight_decay: float = 0.01  # PyTorch's AdamW default, as pico-train uses it
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None  # gradient clipping; None: off, as in pico-train


@dataclass
class TrainingConfig:
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    max_steps: int = 200_000
    seed: int = 42  # the model's initialisation; the data order depends on no seed
    device: str = "auto"  # "auto": CUDA, else MPS, else CPU
    precision: str = "auto"  # "bf16-mixed" or "32"; auto: bf16-mixed on CUDA, else 32
    compile: bool | None = None  # torch.compile; None: on for CUDA, off elsewhere
    # Under torchrun. "ddp" keeps a whole replica of the model, gradients and optimizer on every
    # GPU and all-reduces the gradients once per step, overlapped with the backward pass. "fsdp"
    # (FSDP2) shards all three over the ranks, and all-gathers each block's weights for its
    # forward and again for its backward. DDP is the default: the largest of the suite (570M
    # parameters, 16 bytes each with AdamW's state: 9 GB) fits on any training GPU, so FSDP's
    # memory saving buys nothing for it and its gathers cost time. Take FSDP for models or
    # batches that do not fit.
    distributed: str = "ddp"
    backend: str = "auto"  # torch.distributed's backend; auto: NCCL on CUDA, gloo on CPU
    # FSDP: free each block's gathered weights after its forward, and gather them again for its
    # backward. False keeps them: less communication, the memory of one whole model more.
    reshard_after_forward: bool = True


@dataclass
class TrainingCheckpointingConfig:
    auto_resume: bool = True
    # The weights a new run starts from: a checkpoint directory or a Hub model repo
    # ("namespace/name[@revision]"), in any format PicoDecoder.from_pretrained reads, e.g. to
    # continue a published pico-decoder. Its shape must equal model.*. A resumed run ignores it.
    init_from: str | None = None


@dataclass
class HuggingFaceCheckpointingConfig:
    repo_id: str = ""  # with checkpointing.save_to_hf: each checkpoint goes to branch run_name here
    collection_slug: str | None = None
    # A failed upload is tried upload_attempts times in all, upload_retry_delay seconds apart, then
    # twice that, ...; a checkpoint still not uploaded is uploaded at the run's next start.
    upload_attempts: int = 5
    upload_retry_delay: float = 10.0


@dataclass
class LearningDynamicsCheckpointingConfig:
    # Modules captured in every layer, by the end of their names (see model.py)
    layer_suffixes: list[str] = field(
        default_factory=lambda: ["attention.v_proj", "attention.o_proj", "swiglu.w_2"])
    layers: list[int] | None = None  # None: every layer
    sequence_idx: int = -1  # the position whose activations are kept; -1: each row's last
    batch_size: int = 8  # sub-batch of the capture's forward/backward; never changes the result
    capture_train: bool = True  # train_*.pt: on the batch the checkpoint's last step trained on
    # val_*.pt: on this fixed set (a Hub repo's val split, a directory or builtin:stdlib-bytes);
    # None: no val captures, as in pico-train
    eval_data: str | None = "pico-lm/pretokenized-paloma-tinsy"


@dataclass
class CheckpointingConfig:
    run_name: str | None = None  # None: a timestamp (which never resumes)
    runs_dir: str = "runs"
    save_every_n_steps: int = 1000
    # Pythia-style extra checkpoints early on, where most learning dynamics happen: steps 0, 1,
    # 2, 4, ... up to this step. 0: none.
    log_spaced_until: int = 512
    # optimizer.pt is twice the model's size: keep it in the newest N checkpoints only (resume
    # always has the newest); weights and learning dynamics stay in all. None: keep every one.
    keep_last_n_optimizer_states: int | None = None
    save_to_hf: bool = False
    hf_checkpoint: HuggingFaceCheckpointingConfig = field(default_factory=HuggingFaceCheckpointingConfig)
    training: TrainingCheckpointingConfig = field(default_factory=TrainingCheckpointingConfig)
    learning_dynamics: LearningDynamicsCheckpointingConfig = field(
        default_factory=LearningDynamicsCheckpointingConfig)


@dataclass
class PalomaEvaluationConfig:
    dataset_name: str = "pico-lm/pretokenized-paloma-tinsy"
    dataset_split: str = "val"
    max_length: int = 2048
    batch_size: int = 16


@dataclass
class EvaluationConfig:
    metrics: list[str] | None = field(default_factory=lambda: ["paloma"])
    paloma: PalomaEvaluationConfig = field(default_factory=PalomaEvaluationConfig)


@dataclass
class LoggingConfig:
    log_level: str = "INFO"
    log_every_n_steps: int = 100


@dataclass
class WandbConfig:
    project: str = ""
    entity: str = ""


@dataclass
class MonitoringConfig:
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    save_to_wandb: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


# pico-train keys with no meaning here: a pico-train YAML that sets them gets one warning each.
PICO_TRAIN_ONLY = {
    "training.fabric": "has no meaning under torchrun (launch with torchrun; see README)",
    "model.model_type": "the pico-decoder is the only model",
    "model.batch_size": "the batch is data.dataloader.batch_size",
    "checkpointing.checkpoints_dir": "the run directory layout is fixed (see README)",
    "checkpointing.logs_dir": "the run directory layout is fixed (see README)",
    "checkpointing.fabric_checkpoint_dir": "checkpoints are plain PyTorch files",
    "checkpointing.fabric_checkpoint_filename": "checkpoints are plain PyTorch files",
    "checkpointing.learning_dynamics_dir": "the run directory layout is fixed (see README)",
    "checkpointing.evaluation": "the run directory layout is fixed (see README)",
    "monitoring.save_to_picolabs": "Pico Labs reporting is not supported",
    "monitoring.pico_report": "Pico Labs reporting is not supported",
}


class ConfigError(Exception):
    """A bad config: the message names the key, the value and what was expected."""


def _field_names(section) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


class _Section:
    """A config section as a Python config file sees it: a misspelled name is an error."""

    def __init__(self, section, path: str):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name):
        if name not in _field_names(self._section):
            raise ConfigError(f"{self._path}.{name} is not a config key; expected one of "
                              f"{', '.join(_field_names(self._section))}")
        value = getattr(self._section, name)
        return _Section(value, f"{self._path}.{name}") if dataclasses.is_dataclass(value) else value

    def __setattr__(self, name, value):
        if name not in _field_names(self._section):
            raise ConfigError(f"{self._path}.{name} is not a config key; expected one of "
                              f"{', '.join(_field_names(self._section))}")
        if dataclasses.is_dataclass(getattr(self._section, name)):
            raise ConfigError(f"{self._path}.{name} is a section; set its fields instead")
        setattr(self._section, name, value)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_value(value, hint, key: str):
    """value converted to hint's type (an int where a float is expected), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_check_value(v, args[0], key) for v in value]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}")


def _check_types(section, path: str):
    hints = typing.get_type_hints(type(section))
    for name in _field_names(section):
        value = getattr(section, name)
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{path}.{name}" if path else name)
        else:
            key = f"{path}.{name}"
            setattr(section, name, _check_value(value, hints[name], key))


def _apply_yaml(section, values: dict, path: str, source: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {path or 'the file'} must be a mapping of keys, got {values!r}")
    for name, value in values.items():
        key = f"{path}.{name}" if path else str(name)
        if PICO_TRAIN_ONLY.get(key):
            print(f"warning: {source}: {key} ignored: {PICO_TRAIN_ONLY[key]}", file=sys.stderr)
        elif name not in _field_names(section):
            raise ConfigError(f"{source}: {key} is not a config key; expected one of "
                              f"{', '.join(_field_names(section))}")
        elif dataclasses.is_dataclass(getattr(section, name)):
            _apply_yaml(getattr(section, name), value or {}, key, source)
        else:
            setattr(section, name, value)


def _parse_override(arg: str, config: Config):
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"argument {arg!r}: expected --section.key=value")
    key, text = arg[2:].split("=", 1)
    *path, name = key.split(".")
    section, walked = config, []
    for part in path:
        walked.append(part)
        if part not in _field_names(section) or not dataclasses.is_dataclass(getattr(section, part)):
            raise ConfigError(f"--{key}: {'.'.join(walked)} is not a config section")
        section = getattr(section, part)
    if not path or name not in _field_names(section):
        raise ConfigError(f"--{key} is not a config key" + (
            f"; expected one of {', '.join(_field_names(section))}" if path else ""))
    if dataclasses.is_dataclass(getattr(section, name)):
        raise ConfigError(f"--{key} is a section; set its fields instead")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # "falling back to strings"
    hint = typing.get_type_hints(type(section))[name]
    alternatives = (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
                    else (hint,))
    if str in alternatives and not isinstance(value, (str, type(None))):
        value = text  # --checkpointing.run_name=123 means the string "123"
    setattr(section, name, value)


def load_config(path: str, overrides: list[str]) -> Config:
    """The config of a run: defaults, then the file (Python or pico-train YAML), then overrides."""
    config = Config()
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file {path} does not exist; expected a configs/*.py or YAML file")
    if source.suffix in (".yaml", ".yml"):
        try:
            values = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        _apply_yaml(config, values, "", path)
    elif source.suffix == ".py":
        namespace = {name: _Section(getattr(config, name), name) for name in _field_names(config)}
        try:
            exec(compile(source.read_text(), str(source), "exec"), namespace)
        except ConfigError as e:
            line = e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?"
            raise ConfigError(f"{path}, line {line}: {e}") from None
        except Exception as e:
            raise ConfigError(f"{path}: {e.__class__.__name__}: {e}") from None
    else:
        raise ConfigError(f"config file {path}: expected a .py or .yaml file")
    for arg in overrides:
        _parse_override(arg, config)
    _check_types(config, "")
    return config


def validate(config: Config, world_size: int):
    """Every impossible combination, each named, before anything is built or written."""
    problems = config.model.problems()
    opt, training = config.training.optimization, config.training
    ld, hf = config.checkpointing.learning_dynamics, config.checkpointing.hf_checkpoint
    per_step = world_size * opt.gradient_accumulation_steps
    for key, value, ok, expected in [
        ("training.optimization.gradient_accumulation_steps", opt.gradient_accumulation_steps,
         opt.gradient_accumulation_steps >= 1, "a positive integer"),
        ("data.dataloader.batch_size", config.data.dataloader.batch_size,
         config.data.dataloader.batch_size >= 1 and config.data.dataloader.batch_size % max(per_step, 1) == 0,
         f"a positive multiple of world size x training.optimization.gradient_accumulation_steps "
         f"= {world_size} x {opt.gradient_accumulation_steps} = {per_step}"),
        ("training.optimization.optimizer", opt.optimizer, opt.optimizer == "adamw", "'adamw'"),
        ("training.optimization.lr", opt.lr, opt.lr > 0, "a positive number"),
        ("training.optimization.lr_scheduler", opt.lr_scheduler,
         opt.lr_scheduler in ("linear_with_warmup", "cosine_with_warmup"),
         "'linear_with_warmup' or 'cosine_with_warmup'"),
        ("training.optimization.lr_warmup_steps", opt.lr_warmup_steps, opt.lr_warmup_steps >= 0,
         "a non-negative integer"),
        ("training.optimization.max_grad_norm", opt.max_grad_norm,
         opt.max_grad_norm is None or opt.max_grad_norm > 0, "None or a positive number"),
        ("training.max_steps", training.max_steps, training.max_steps >= 1, "a positive integer"),
        ("training.device", training.device, training.device in ("auto", "cpu", "cuda", "mps"),
         "'auto', 'cpu', 'cuda' or 'mps'"),
        ("training.precision", training.precision,
         training.precision in ("auto", "bf16-mixed", "32"), "'auto', 'bf16-mixed' or '32'"),
        ("training.distributed", training.distributed, training.distributed in ("ddp", "fsdp"),
         "'ddp' or 'fsdp'"),
        ("training.distributed", training.distributed,
         training.distributed != "fsdp" or fully_shard is not None,
         f"'ddp': torch {torch.__version__} has no fully_shard (FSDP2 needs torch>=2.5)"),
        ("training.backend", training.backend, training.backend in ("auto", "nccl", "gloo"),
         "'auto', 'nccl' or 'gloo'"),
        ("training.backend", training.backend,
         training.backend != "nccl" or (torch.cuda.is_available() and training.device in ("auto", "cuda")),
         "'gloo' or 'auto': NCCL needs CUDA GPUs, and " + (
             "training.device is not 'cuda'" if torch.cuda.is_available() else "this machine has none")),
        ("checkpointing.save_every_n_steps", config.checkpointing.save_every_n_steps,
         config.checkpointing.save_every_n_steps >= 1, "a positive integer"),
        ("checkpointing.log_spaced_until", config.checkpointing.log_spaced_until,
         config.checkpointing.log_spaced_until >= 0, "a non-negative integer"),
        ("checkpointing.keep_last_n_optimizer_states", config.checkpointing.keep_last_n_optimizer_states,
         (config.checkpointing.keep_last_n_optimizer_states or 1) >= 1, "None or a positive integer"),
        ("checkpointing.hf_checkpoint.repo_id", hf.repo_id, hf.repo_id or not config.checkpointing.save_to_hf,
         "a Hub model repo id (namespace/name) when checkpointing.save_to_hf is true"),
        ("checkpointing.hf_checkpoint.upload_attempts", hf.upload_attempts, hf.upload_attempts >= 1,
         "a positive integer"),
        ("checkpointing.hf_checkpoint.upload_retry_delay", hf.upload_retry_delay,
         hf.upload_retry_delay >= 0, "a non-negative number of seconds"),
        ("checkpointing.learning_dynamics.batch_size", ld.batch_size, ld.batch_size >= 1,
         "a positive integer"),
        ("checkpointing.learning_dynamics.sequence_idx", ld.sequence_idx,
         -config.model.max_seq_len <= ld.sequence_idx < 1, "a position from the end of each row, "
         "-1 (the last) to -model.max_seq_len, or 0 (the first)"),
        ("checkpointing.learning_dynamics.layers", ld.layers,
         all(0 <= i < config.model.n_layers for i in ld.layers or []),
         f"None or layer indices in [0, model.n_layers={config.model.n_layers})"),
        ("monitoring.logging.log_every_n_steps", config.monitoring.logging.log_every_n_steps,
         config.monitoring.logging.log_every_n_steps >= 1, "a positive integer"),
        ("data.dataset.max_cached_shards", config.data.dataset.max_cached_shards,
         config.data.dataset.max_cached_shards >= 1, "a positive integer"),
        ("evaluation.metrics", config.evaluation.metrics,
         set(config.evaluation.metrics or []) <= {"paloma"}, "a list of metrics among ['paloma']"),
        ("evaluation.paloma.batch_size", config.evaluation.paloma.batch_size,
         config.evaluation.paloma.batch_size >= 1, "a positive integer"),
        ("monitoring.logging.log_level", config.monitoring.logging.log_level,
         config.monitoring.logging.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"),
         "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ]:
        if not ok:
            problems.append(f"{key}={value!r}: expected {expected}")
    if problems:
        raise ConfigError(problems[0])


# Keys that fix what a checkpoint means: a resumed run must agree on them.
RESUME_KEYS = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)] + ["data.dataloader.batch_size"]


def check_resume_compatible(config: Config, saved_path: Path):
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved_path}: cannot be read ({e}); expected the config of the run "
                          f"being resumed") from None
    new = dataclasses.asdict(config)
    differ = []
    for key in RESUME_KEYS:
        a, b = saved, new
        for part in key.split("."):
            a, b = (a or {}).get(part), b[part]
        if a != b:
            differ.append(f"{key} (run: {a!r}, new config: {b!r})")
    if differ:
        raise ConfigError(f"resume refused: {saved_path} disagrees with the new config on "
                          f"{'; '.join(differ)}; use another checkpointing.run_name")


def read_init_weights(config: Config) -> tuple[dict, str]:
    """The weights of checkpointing.training.init_from, and where they came from, after checking
    that its shape is the config's model.*."""
    source = config.checkpointing.training.init_from
    try:
        shape, state, name = checkpoint.read_pretrained(source)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"checkpointing.training.init_from={source!r}: {e}") from None
    differ = [f"model.{f.name} (checkpoint: {getattr(shape, f.name)!r}, config: "
              f"{getattr(config.model, f.name)!r})" for f in dataclasses.fields(ModelConfig)
              if getattr(shape, f.name) != getattr(config.model, f.name)]
    if differ:
        raise ConfigError(f"checkpointing.training.init_from={source!r}: its shape differs from the "
                          f"config on {'; '.join(differ)}; set those model.* keys to the checkpoint's")
    return state, name


# ---------------------------------------------------------------------------------------------
# Set-up helpers the loop calls
# ---------------------------------------------------------------------------------------------

def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process: under torchrun, GPU number LOCAL_RANK of its node."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda': no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device='mps': no MPS device is available")
    if name != "cuda":
        return torch.device(name)
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank}: this node has {torch.cuda.device_count()} GPUs; "
                          f"expected torchrun --nproc_per_node at most that")
    torch.cuda.set_device(local_rank)  # NCCL and every kernel of this process go to its own GPU
    return torch.device("cuda", local_rank)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): one per GPU, each on its own rows of every global batch
# ---------------------------------------------------------------------------------------------

# How long a collective waits for a rank that does not arrive before it fails, so one rank's
# crash or hang ends the job instead of stalling it. It must outlast what rank 0 does while the
# others wait: writing a checkpoint of the largest model (seconds to a minute).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def start_distributed(config: Config, device: torch.device):
    """Join the job's process group: torchrun's (its environment names the rendezvous), or a
    group of one when FSDP runs in a single process. Returns a group for host-side flags: a gloo
    all-reduce of one number costs the GPU nothing, where an NCCL one would wait for it."""
    backend = config.training.backend  # validate() refused NCCL without a GPU
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if backend == "nccl" else {}
    if "MASTER_ADDR" not in os.environ:  # not under torchrun
        options.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **options)
    return dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend == "nccl" else None


def parallelize(model: PicoDecoder, config: Config, device: torch.device, precision: str,
                use_compile: bool):
    """(the module each training step calls, its DDP or FSDP wrapper or None).

    DDP wraps the model and is compiled whole. FSDP2 shards the model in place, as torchtitan
    does: each block, then the output layer, then the root (embedding and final norm), each a
    unit whose weights are gathered just before it runs; each block is compiled on its own,
    so the compiled code is the block's, once, and FSDP's hooks between blocks stay eager."""
    strategy = config.training.distributed if dist.is_initialized() else None
    if strategy == "ddp":
        wrapper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return (torch.compile(wrapper) if use_compile else wrapper), wrapper
    if strategy == "fsdp":
        # Weights gathered in bf16 for bf16-mixed (half the traffic); gradients reduced in float32
        # so the sum over ranks loses nothing. Each rank keeps float32 shards for the optimizer.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
                                      reduce_dtype=torch.float32)
        reshard = config.training.reshard_after_forward
        for i, block in enumerate(model.layers):
            if use_compile:
                block.forward = torch.compile(block.forward)
            # The last block's backward and the output layer's come right after their forwards:
            # resharding in between would only gather the same weights twice.
            last = i == len(model.layers) - 1
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard and not last)
        fully_shard(model.de_embedding_proj, mp_policy=policy, reshard_after_forward=False)
        if use_compile:  # and the loss, whose float32 logits compiled code never stores whole
            model.next_token_loss = torch.compile(PicoDecoder.next_token_loss)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        return model, model
    return (torch.compile(model) if use_compile else model), None


def gradient_sync(wrapper, sync: bool):
    """Gradient accumulation: the inner micro-steps only add to this rank's gradients; the last
    one reduces the sum across ranks, once per optimizer step."""
    if isinstance(wrapper, DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapper.no_sync()
    if wrapper is not None:  # FSDP
        wrapper.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def gather_whole_model(model: PicoDecoder, config: ModelConfig, device: torch.device) -> PicoDecoder:
    """FSDP: an unsharded copy of the model on every rank (a collective), for what needs whole
    weights: the Hugging Face export, evaluation, and captures (whose hooks and gradients need
    plain modules). Built on the meta device, so no memory or random numbers go to an
    initialisation that the gathered weights overwrite."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        whole = PicoDecoder(config)
    whole.to_empty(device=device).load_state_dict(state)
    whole.rope_cos, whole.rope_sin = (t.to(device) for t in rope_tables(config))  # not in state
    return whole


def lr_lambda(config: Config):
    """The multiplier of the peak lr at optimizer step n (0-based): pico-train's schedule,
    linear warm-up from 0 then linear decay to 0 at max_steps; or the same with cosine decay."""
    warmup, total = config.training.optimization.lr_warmup_steps, config.training.max_steps
    cosine = config.training.optimization.lr_scheduler == "cosine_with_warmup"

    def multiplier(n: int) -> float:
        if n < warmup:
            return n / max(1, warmup)
        progress = min(1.0, (n - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0 - progress

    return multiplier


def setup_logging(run_dir: Path, level: str) -> logging.Logger:
    logger = logging.getLogger("pico")
    logger.setLevel(level)
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(run_dir / "logs" / f"log_{stamp}.log", encoding="utf-8")):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def hub_uploader(config: Config, run_dir: Path, log: logging.Logger) -> checkpoint.HubUploader:
    """Uploads of the run's checkpoints to checkpointing.hf_checkpoint.repo_id, branch run_name."""
    hf = config.checkpointing.hf_checkpoint
    return checkpoint.HubUploader(run_dir, hf.repo_id, config.checkpointing.run_name, log,
                                  hf.upload_attempts, hf.upload_retry_delay)


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def keep_metrics_up_to(path: Path, step: int):
    """A resumed run replays the steps after its checkpoint: drop their first records."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    checkpoint.write_text_atomically(path, "".join(line + "\n" for line in kept))


class StopSignals:
    """SIGTERM (a cluster's pre-emption notice) or SIGINT (Ctrl-C) asks the loop to save a
    checkpoint after the current step and exit 0. A second Ctrl-C kills at once."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H20", 148e12), ("A100", 312e12),
                       ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12)):  # vendors' datasheets
        if key in name:
            return flops
    return None


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


@torch.no_grad()
def evaluate(model: PicoDecoder, rows: list, batch_size: int, device: torch.device, autocast,
             byte_level: bool) -> dict:
    """Perplexity of the model on the evaluation rows: exp of the mean next-token loss over all
    their tokens. (pico-train's `evaluate` metric averages per-sequence perplexities instead,
    which weighs a short sequence as much as a long one.) Rows may differ in length
    (data.collate). Under torch.distributed each rank evaluates its block of the rows and the
    sums are added up (a collective): every rank returns the same results."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = 0
    rows = rows[data.rank_slice(len(rows), *checkpoint.world())]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs, labels = (t.to(device) for t in data.collate(chunk))
        with autocast:
            _, loss = model(inputs, labels)
        counted = int((labels != -100).sum())  # known on the host: no device sync for it
        nll += loss.double() * counted
        n_tokens += counted
        n_bytes += sum(int((row[1:] < 256).sum()) for row in chunk) if byte_level else 0
    model.train()
    totals = torch.stack([nll, torch.tensor(n_tokens, dtype=torch.float64, device=device),
                          torch.tensor(n_bytes, dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    nll, n_tokens, n_bytes = totals.tolist()
    mean_loss = nll / n_tokens
    results = {"perplexity": math.exp(mean_loss), "loss": mean_loss, "tokens": int(n_tokens)}
    if byte_level:  # every token but the end-of-document id is one byte of text
        results["bits_per_byte"] = nll / math.log(2) / n_bytes
    return results


class Metrics:
    """metrics.jsonl, and Weights & Biases when monitoring.save_to_wandb: the same records."""

    def __init__(self, path: Path | None, config: Config, log: logging.Logger):
        self.path, self.wandb = path, None  # path None: a rank other than 0, which records nothing
        if path is None or not config.monitoring.save_to_wandb:
            return
        try:
            import wandb
        except ImportError:
            log.warning("monitoring.save_to_wandb: wandb is not installed (pip install wandb); "
                        "metrics go to metrics.jsonl only")
            return
        try:
            # A fixed id from the run name: a resumed run continues the same wandb run.
            self.wandb = wandb.init(
                project=config.monitoring.wandb.project or None,
                entity=config.monitoring.wandb.entity or None, name=config.checkpointing.run_name,
                id="".join(c if c.isalnum() or c in "-_" else "-" for c in config.checkpointing.run_name),
                resume="allow", config=dataclasses.asdict(config),
                settings=wandb.Settings(init_timeout=60))
        except Exception as e:  # no network, no login, ...: the run goes on with local logs
            log.warning(f"monitoring.save_to_wandb: wandb did not start "
                        f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__}); "
                        f"metrics go to metrics.jsonl only")

    def write(self, record: dict):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def run_evaluation(step: int, model, eval_rows, config: Config, device, autocast, run_dir: Path,
                   metrics: Metrics, log: logging.Logger):
    """Evaluate checkpoint `step` once: results already on disk are not computed again. Every
    rank takes part; rank 0 writes."""
    out = run_dir / "eval_results" / f"step_{step}.json"
    if eval_rows is None or out.exists():
        return
    results = evaluate(model, eval_rows, config.evaluation.paloma.batch_size, device, autocast,
                       byte_level=config.data.tokenizer.name == "bytes")
    if not checkpoint.is_writer():
        return
    out.parent.mkdir(exist_ok=True)
    checkpoint.write_text_atomically(out, json.dumps({"paloma": results["perplexity"]}) + "\n")
    metrics.write({"step": step, **{f"paloma_{k}": v for k, v in results.items()}})
    log.info(f"eval step {step} | paloma perplexity {results['perplexity']:.3f} | loss "
             f"{results['loss']:.4f} | {results['tokens']:,} tokens" +
             (f" | {results['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in results else ""))


def is_checkpoint_step(step: int, config: Config) -> bool:
    """On schedule (save_every_n_steps), at the end, and at the log-spaced early steps."""
    ckpt = config.checkpointing
    early = step <= ckpt.log_spaced_until and (step == 0 or step & (step - 1) == 0)
    return step % ckpt.save_every_n_steps == 0 or step == config.training.max_steps or early


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: python train.py CONFIG [--section.key=value ...]")
    config = load_config(argv[0], argv[1:])
    # torchrun's environment; without it, one process
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    validate(config, world_size)
    device = pick_device(config.training.device, int(os.environ.get("LOCAL_RANK", "0")))
    opt_cfg, ckpt_cfg = config.training.optimization, config.checkpointing
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32"
    use_compile = device.type == "cuda" if config.training.compile is None else config.training.compile
    fsdp = config.training.distributed == "fsdp"
    global_batch = config.data.dataloader.batch_size
    accum = opt_cfg.gradient_accumulation_steps
    max_steps = config.training.max_steps
    seq_len = config.model.max_seq_len

    # Resume: find and fully read the latest checkpoint before anything is built or written.
    # Every rank reads it (the run directory is on a file system all nodes share).
    if ckpt_cfg.run_name is None:
        if world_size > 1:  # each rank would make its own timestamp
            raise ConfigError("checkpointing.run_name=None: expected a name when training in "
                              "several processes")
        ckpt_cfg.run_name = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = Path(ckpt_cfg.runs_dir) / ckpt_cfg.run_name
    checkpoints_dir = run_dir / "checkpoints"
    resume_from = checkpoint.latest_checkpoint(checkpoints_dir) if ckpt_cfg.training.auto_resume else None
    resumed = init_state = init_name = None
    if resume_from is not None:
        check_resume_compatible(config, run_dir / "training_config.yaml")
        resumed = checkpoint.read_checkpoint(resume_from, config.model)
    elif ckpt_cfg.training.init_from is not None:  # a new run from given weights: read them now too
        init_state, init_name = read_init_weights(config)
    start_step = resumed["step"] if resumed else 0
    if start_step >= max_steps:
        if rank == 0:
            print(f"{run_dir}: already trained to step {start_step} (training.max_steps={max_steps}); "
                  f"nothing to do")
        if rank == 0 and ckpt_cfg.save_to_hf and checkpoint.read_uploads(run_dir)["pending"]:
            log = setup_logging(run_dir, config.monitoring.logging.log_level)
            hub_uploader(config, run_dir, log).close()  # failed uploads of the finished run
        return 0

    shards = data.open_dataset(config.data.dataset.name, seq_len + 1, config.model.vocab_size,
                               config.data.seed, config.data.dataset.max_cached_shards,
                               shared=world_size > 1)
    if max_steps * global_batch > shards.num_rows:
        raise ConfigError(f"training.max_steps={max_steps}: needs {max_steps * global_batch:,} rows "
                          f"of data, {config.data.dataset.name} has {shards.num_rows:,} "
                          f"(at most {shards.num_rows // global_batch:,} steps)")
    eval_rows = None
    if "paloma" in (config.evaluation.metrics or []):
        paloma = config.evaluation.paloma
        eval_rows = data.load_eval_set(paloma.dataset_name, paloma.dataset_split, seq_len + 1,
                                       config.model.vocab_size, config.data.seed)
    ld = ckpt_cfg.learning_dynamics
    ld_rows = None
    if ld.eval_data is not None:
        same = eval_rows is not None and (ld.eval_data, "val") == (paloma.dataset_name, paloma.dataset_split)
        ld_rows = eval_rows if same else data.load_eval_set(
            ld.eval_data, "val", seq_len + 1, config.model.vocab_size, config.data.seed,
            key="checkpointing.learning_dynamics.eval_data")
        shortest = min(len(row) - 1 for row in ld_rows)
        if ld.sequence_idx < -shortest:
            raise ConfigError(f"checkpointing.learning_dynamics.sequence_idx={ld.sequence_idx}: "
                              f"{ld.eval_data} has rows of only {shortest} input tokens")

    with torch.device("meta"):  # module names only: no memory, no weights
        # a suffix that matches none stops here
        checkpoint.capture_modules(PicoDecoder(config.model), ld.layer_suffixes, ld.layers)

    # Several processes: join the others. Every rank has read and checked the same config, data
    # and checkpoint, so a bad input has already stopped them all, each with the same line.
    flags_group = None
    if world_size > 1 or "MASTER_ADDR" in os.environ or fsdp:
        flags_group = start_distributed(config, device)
    batches = data.BatchStream(shards, global_batch, world_size, rank, start_step, max_steps,
                               pin_memory=device.type == "cuda")

    # The same initialisation on every rank (the same seed, drawn on the CPU), then the weights
    # of the checkpoint or of init_from, all before DDP or FSDP takes the model over.
    torch.manual_seed(config.training.seed)
    model = PicoDecoder(config.model).to(device)
    if init_state is not None or resumed:
        model.load_state_dict(resumed["model"] if resumed else init_state)
        init_state = None
    step_model, wrapper = parallelize(model, config, device, precision, use_compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if resumed:
        checkpoint.restore_checkpoint(resume_from, resumed, model, optimizer, scheduler)
        del resumed
    checkpoint.barrier()  # every rank has read the run directory before rank 0 writes to it

    def whole_model() -> PicoDecoder:
        """The model with all its weights on this rank."""
        return gather_whole_model(model, config.model, device) if fsdp else model


    # Everything checked: now the run directory may be written, by rank 0 alone.
    writer = rank == 0
    if writer:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        checkpoints_dir.mkdir(exist_ok=True)
        (run_dir / "training_config.yaml").write_text(
            yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        keep_metrics_up_to(run_dir / "metrics.jsonl", start_step)
        log = setup_logging(run_dir, config.monitoring.logging.log_level)
    else:  # the other ranks only report trouble, on stderr
        log = logging.getLogger(f"pico.rank{rank}")
        log.setLevel(logging.WARNING)
    metrics = Metrics(run_dir / "metrics.jsonl" if writer else None, config, log)
    log.info(f"run {run_dir} | code {code_version()} | torch {torch.__version__} | device {device} | "
             f"precision {precision} | compile {use_compile}" + (
                 f" | {world_size} processes, {config.training.distributed} over {dist.get_backend()}"
                 if dist.is_initialized() else ""))
    log.info(f"model: {model.num_params():,} parameters | data: {shards.num_rows:,} rows in "
             f"{len(shards.files)} shards | global batch {global_batch} x {seq_len} tokens, "
             f"{world_size} process(es) x {accum} micro-step(s)")
    uploader = None
    if ckpt_cfg.save_to_hf and writer:
        uploader = hub_uploader(config, run_dir, log)
        log.info(f"upload: each checkpoint to {ckpt_cfg.hf_checkpoint.repo_id}, branch {ckpt_cfg.run_name}")
    if eval_rows is not None:
        log.info(f"evaluation: {len(eval_rows):,} sequences of {config.evaluation.paloma.dataset_name}")
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {start_step}" + (
            "; checkpointing.training.init_from ignored" if ckpt_cfg.training.init_from else ""))
    elif init_name is not None:
        log.info(f"initial weights from {init_name} (checkpointing.training.init_from)")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    mfu_peak = peak_flops(device)
    flops_per_step = model.flops_per_token(seq_len) * global_batch * seq_len

    last_saved = start_step if resume_from is not None else None

    def save(done: int, train_batch, whole: PicoDecoder):
        """Checkpoint `done` (optimizer steps completed) with its learning-dynamics captures.
        Every rank takes part."""
        nonlocal last_saved
        if done == last_saved:
            return
        captures = checkpoint.learning_dynamics(whole, train_batch, ld_rows, ld, device, autocast)
        path = checkpoint.save_checkpoint(checkpoints_dir, done, model, optimizer, scheduler,
                                          data_position=done * global_batch,
                                          model_state=whole.state_dict(), learning_dynamics=captures)
        if ckpt_cfg.keep_last_n_optimizer_states is not None and writer:
            checkpoint.drop_old_optimizer_states(checkpoints_dir, ckpt_cfg.keep_last_n_optimizer_states)
        last_saved = done
        log.info(f"saved {path}")

    def evaluate_and_upload(done: int, whole: PicoDecoder):
        """What follows a saved checkpoint; each skips what an earlier start already did."""
        run_evaluation(done, whole, eval_rows, config, device, autocast, run_dir, metrics, log)
        if uploader:  # in the background: the next step starts now
            uploader.submit(done)

    stop = StopSignals()
    log_every = config.monitoring.logging.log_every_n_steps
    t_start = t_log = time.perf_counter()
    steps_at_log = start_step
    model.train()
    try:
        if resume_from is not None:  # a run may have stopped before evaluating or uploading it
            evaluate_and_upload(start_step, whole_model() if eval_rows is not None else model)
        for step in range(start_step, max_steps):
            # Fetch: this rank's rows of global batch `step`, split into micro-batches in order.
            batch = next(batches).to(device, non_blocking=True).view(accum, -1, seq_len + 1)
            if step == 0 and last_saved is None and is_checkpoint_step(0, config):
                whole = whole_model()
                save(0, batch, whole)  # the initialisation, captured on the first batch
                evaluate_and_upload(0, whole)
                del whole
            # Forward and backward: each micro-batch's mean loss, scaled so the gradient is that
            # of the mean over this rank's rows; DDP and FSDP average it over the ranks in the
            # last micro-step's backward, giving the gradient of the mean over the global batch.
            step_loss = torch.zeros((), device=device)
            for i, micro in enumerate(batch):
                with gradient_sync(wrapper, sync=i == accum - 1):
                    with autocast:
                        _, loss = step_model(micro[:, :-1], micro[:, 1:])
                    (loss / accum).backward()
                step_loss += loss.detach() / accum
            logging_step = (step + 1) % log_every == 0 or step + 1 == max_steps
            grad_norm = None
            if opt_cfg.max_grad_norm is not None or logging_step:
                # max_norm inf measures without clipping (the gradients are multiplied by 1).
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.max_grad_norm or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
                    grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1  # optimizer steps completed: the model is now "at step `done`"

            # Log: the only place the loop waits for the device.
            if logging_step:
                if dist.is_initialized():  # the mean over the global batch, not this rank's rows
                    dist.all_reduce(step_loss)
                    step_loss /= dist.get_world_size()
                loss_value, norm_value = step_loss.item(), grad_norm.item()
                now = time.perf_counter()
                tokens_per_s = (done - steps_at_log) * global_batch * seq_len / (now - t_log)
                elapsed = now - t_start
                eta = elapsed / (done - start_step) * (max_steps - done)
                record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                          "tokens_seen": done * global_batch * seq_len,
                          "tokens_per_s": tokens_per_s}
                mfu = ""
                if mfu_peak:  # tokens/s of the whole job over the peak of all its GPUs
                    record["mfu"] = (flops_per_step * tokens_per_s / (global_batch * seq_len)
                                     / (mfu_peak * world_size))
                    mfu = f" | mfu {record['mfu']:.1%}"
                metrics.write(record)
                log.info(f"step {done}/{max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                         f"{tokens_per_s:,.0f} tok/s{mfu} | elapsed {format_seconds(elapsed)} | "
                         f"eta {format_seconds(eta)}")
                t_log, steps_at_log = now, done

            # Checkpoint: on schedule, at the end, and when any rank was asked to stop (a
            # cluster's notice may reach the ranks at different steps; they agree here).
            stopping = checkpoint.any_rank(stop.received is not None, flags_group)
            if is_checkpoint_step(done, config) or stopping:
                paused = time.perf_counter()
                whole = whole_model()
                save(done, batch, whole)
                if stopping:  # no time to evaluate or upload now: the resumed run does it
                    log.info(f"{stop.received or 'another rank was signalled'}: stopped at step "
                             f"{done}; re-run the same command to resume")
                    return 0
                evaluate_and_upload(done, whole)
                del whole
                t_log += time.perf_counter() - paused  # tokens/s counts training time only
        # The ranks finish together, before rank 0 waits for its last uploads on its own: the
        # others must not wait for those in a collective, which could time out. (And a group
        # destroyed while gloo's worker thread still frees the last collective's tensor can
        # deadlock on the GIL; a barrier holds no tensor.)
        checkpoint.barrier()
    finally:
        batches.close()
        metrics.close()
        stop.restore()
        if uploader:  # waits for the last checkpoints' uploads (bounded; the rest stay pending)
            uploader.close()
    log.info(f"done: {max_steps} steps in {format_seconds(time.perf_counter() - t_start)}")
    return 0


def report(error: Exception):
    """The one line a failed run ends with. Under torchrun every rank fails alike on a bad input
    found before training, and only local rank 0 says so; a failure during training is rank
    specific, and each rank that fails names itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return f"error: {error}"
    if dist.is_initialized():
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's summary then names the cause
            ErrorHandler().record_exception(error)
        return f"error: rank {dist.get_rank()}: {error}"
    return f"error: {error}" if os.environ.get("LOCAL_RANK", "0") == "0" else 1


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except (ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        sys.exit(report(e))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
