"""Train a pico-decoder: the config, then the training loop.

    python train.py configs/local.py [--training.max_steps=100 ...]

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
import yaml

import checkpoint
import data
from model import ModelConfig, PicoDecoder

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

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda': no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("training.device='mps': no MPS device is available")
    return torch.device(name)


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
    (data.collate)."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = n_bytes = 0
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
    mean_loss = nll.item() / n_tokens
    results = {"perplexity": math.exp(mean_loss), "loss": mean_loss, "tokens": n_tokens}
    if byte_level:  # every token but the end-of-document id is one byte of text
        results["bits_per_byte"] = nll.item() / math.log(2) / n_bytes
    return results


class Metrics:
    """metrics.jsonl, and Weights & Biases when monitoring.save_to_wandb: the same records."""

    def __init__(self, path: Path, config: Config, log: logging.Logger):
        self.path, self.wandb = path, None
        if not config.monitoring.save_to_wandb:
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def run_evaluation(step: int, model, eval_rows, config: Config, device, autocast, run_dir: Path,
                   metrics: Metrics, log: logging.Logger):
    """Evaluate checkpoint `step` once: results already on disk are not computed again."""
    out = run_dir / "eval_results" / f"step_{step}.json"
    if eval_rows is None or out.exists():
        return
    results = evaluate(model, eval_rows, config.evaluation.paloma.batch_size, device, autocast,
                       byte_level=config.data.tokenizer.name == "bytes")
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


def capture_modules(model: PicoDecoder, config: Config) -> dict:
    """The modules whose learning dynamics are captured; a suffix that matches none is an error."""
    ld = config.checkpointing.learning_dynamics
    modules = checkpoint.capture_modules(model, ld.layer_suffixes, ld.layers)
    valid = sorted(name.split(".", 2)[2] for name in checkpoint.capture_modules(model, [""], [0]))
    for suffix in ld.layer_suffixes:
        if not any(name.endswith(suffix) for name in modules):
            raise ConfigError(f"checkpointing.learning_dynamics.layer_suffixes: {suffix!r} matches no "
                              f"module; expected some of {', '.join(valid)}")
    return modules


def learning_dynamics(model, train_batch, val_rows, modules, config: Config, device, autocast) -> dict:
    """The captures of one checkpoint: on the global batch its last step trained on, and on the
    fixed evaluation rows."""
    ld = config.checkpointing.learning_dynamics
    splits = {}
    if ld.capture_train:
        splits["train"] = list(train_batch.reshape(-1, train_batch.shape[-1]).cpu())
    if val_rows is not None:
        splits["val"] = val_rows
    return {split: checkpoint.capture_learning_dynamics(model, rows, modules, ld.sequence_idx,
                                                        ld.batch_size, device, autocast)
            for split, rows in splits.items()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: python train.py CONFIG [--section.key=value ...]")
    config = load_config(argv[0], argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: this version trains in one "
                          f"process; run python train.py")
    world_size, rank = 1, 0
    validate(config, world_size)
    device = pick_device(config.training.device)
    opt_cfg, ckpt_cfg = config.training.optimization, config.checkpointing
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32"
    use_compile = device.type == "cuda" if config.training.compile is None else config.training.compile
    global_batch = config.data.dataloader.batch_size
    accum = opt_cfg.gradient_accumulation_steps
    max_steps = config.training.max_steps
    seq_len = config.model.max_seq_len

    # Resume: find and fully read the latest checkpoint before anything is built or written.
    if ckpt_cfg.run_name is None:
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
        print(f"{run_dir}: already trained to step {start_step} (training.max_steps={max_steps}); "
              f"nothing to do")
        if ckpt_cfg.save_to_hf and checkpoint.read_uploads(run_dir)["pending"]:  # failed uploads
            log = setup_logging(run_dir, config.monitoring.logging.log_level)
            hub_uploader(config, run_dir, log).close()
        return 0

    shards = data.open_dataset(config.data.dataset.name, seq_len + 1, config.model.vocab_size,
                               config.data.seed, config.data.dataset.max_cached_shards)
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
    batches = data.BatchStream(shards, global_batch, world_size, rank, start_step, max_steps,
                               pin_memory=device.type == "cuda")

    torch.manual_seed(config.training.seed)
    model = PicoDecoder(config.model).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
        init_state = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if resumed:
        checkpoint.restore_checkpoint(resumed, model, optimizer, scheduler)
        del resumed
    captured = capture_modules(model, config)

    # Everything checked: now the run directory may be written.
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    checkpoints_dir.mkdir(exist_ok=True)
    (run_dir / "training_config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    metrics_path = run_dir / "metrics.jsonl"
    keep_metrics_up_to(metrics_path, start_step)
    log = setup_logging(run_dir, config.monitoring.logging.log_level)
    metrics = Metrics(metrics_path, config, log)
    log.info(f"run {run_dir} | code {code_version()} | torch {torch.__version__} | device {device} | "
             f"precision {precision} | compile {use_compile}")
    log.info(f"model: {model.num_params():,} parameters | data: {shards.num_rows:,} rows in "
             f"{len(shards.files)} shards | global batch {global_batch} x {seq_len} tokens, "
             f"{accum} micro-step(s)")
    uploader = None
    if ckpt_cfg.save_to_hf:  # on rank 0 only, once this trains on many processes
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
    step_model = torch.compile(model) if use_compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    mfu_peak = peak_flops(device)
    flops_per_step = model.flops_per_token(seq_len) * global_batch * seq_len

    last_saved = start_step if resume_from is not None else None

    def save(done: int, train_batch):
        """Checkpoint `done` (optimizer steps completed) with its learning-dynamics captures."""
        nonlocal last_saved
        if done == last_saved:
            return
        captures = learning_dynamics(model, train_batch, ld_rows, captured, config, device, autocast)
        path = checkpoint.save_checkpoint(checkpoints_dir, done, model, optimizer, scheduler,
                                          data_position=done * global_batch, learning_dynamics=captures)
        if ckpt_cfg.keep_last_n_optimizer_states is not None:
            checkpoint.drop_old_optimizer_states(checkpoints_dir, ckpt_cfg.keep_last_n_optimizer_states)
        last_saved = done
        log.info(f"saved {path}")

    def evaluate_and_upload(done: int):
        """What follows a saved checkpoint; each skips what an earlier start already did."""
        run_evaluation(done, model, eval_rows, config, device, autocast, run_dir, metrics, log)
        if uploader:  # in the background: the next step starts now
            uploader.submit(done)

    stop = StopSignals()
    log_every = config.monitoring.logging.log_every_n_steps
    t_start = t_log = time.perf_counter()
    steps_at_log = start_step
    model.train()
    try:
        if resume_from is not None:  # a run may have stopped before evaluating or uploading it
            evaluate_and_upload(start_step)
        for step in range(start_step, max_steps):
            # Fetch: this rank's rows of global batch `step`, split into micro-batches in order.
            batch = next(batches).to(device, non_blocking=True).view(accum, -1, seq_len + 1)
            if step == 0 and last_saved is None and is_checkpoint_step(0, config):
                save(0, batch)  # the initialisation, captured on the first batch
                evaluate_and_upload(0)
            # Forward and backward: each micro-batch's mean loss, scaled so the gradient is that
            # of the mean over the whole global batch.
            step_loss = torch.zeros((), device=device)
            for micro in batch:
                with autocast:
                    _, loss = step_model(micro[:, :-1], micro[:, 1:])
                (loss / accum).backward()
                step_loss += loss.detach() / accum
            logging_step = (step + 1) % log_every == 0 or step + 1 == max_steps
            grad_norm = None
            if opt_cfg.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.max_grad_norm)
            elif logging_step:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1  # optimizer steps completed: the model is now "at step `done`"

            # Log: the only place the loop waits for the device.
            if logging_step:
                loss_value, norm_value = step_loss.item(), grad_norm.item()
                now = time.perf_counter()
                tokens_per_s = (done - steps_at_log) * global_batch * seq_len / (now - t_log)
                elapsed = now - t_start
                eta = elapsed / (done - start_step) * (max_steps - done)
                record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                          "tokens_seen": done * global_batch * seq_len,
                          "tokens_per_s": tokens_per_s}
                mfu = ""
                if mfu_peak:
                    record["mfu"] = flops_per_step * tokens_per_s / (global_batch * seq_len) / mfu_peak
                    mfu = f" | mfu {record['mfu']:.1%}"
                metrics.write(record)
                log.info(f"step {done}/{max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                         f"{tokens_per_s:,.0f} tok/s{mfu} | elapsed {format_seconds(elapsed)} | "
                         f"eta {format_seconds(eta)}")
                t_log, steps_at_log = now, done

            # Checkpoint: on schedule, at the end, and when asked to stop.
            if is_checkpoint_step(done, config) or stop.received:
                paused = time.perf_counter()
                save(done, batch)
                if stop.received:  # no time to evaluate or upload now: the resumed run does it
                    log.info(f"{stop.received}: stopped at step {done}; re-run the same command "
                             f"to resume")
                    return 0
                evaluate_and_upload(done)
                t_log += time.perf_counter() - paused  # tokens/s counts training time only
    finally:
        batches.close()
        metrics.close()
        stop.restore()
        if uploader:  # waits for the last checkpoints' uploads (bounded; the rest stay pending)
            uploader.close()
    log.info(f"done: {max_steps} steps in {format_seconds(time.perf_counter() - t_start)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
