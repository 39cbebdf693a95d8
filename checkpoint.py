"""Everything the trainer writes to disk, and reads back.

A checkpoint is a directory, checkpoints/step_N/, holding:
  config.json, model.safetensors   the Hugging Face Llama export: transformers loads it with no
                                   custom code, and resume reads the weights back from it
  optimizer.pt                     AdamW and learning-rate scheduler state
  training_state.pt                step, data position and every RNG state
  checkpoint.json                  the manifest, written last: each file's size

It is written to a hidden temporary directory and renamed into place, and only then does the
`latest` symlink move to it (an atomic rename of a new link). A kill at any moment therefore
leaves `latest` pointing at a complete checkpoint; a half-written one is a stray temporary.
"""

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, PicoDecoder

MANIFEST = "checkpoint.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# The Hugging Face Llama format
# ---------------------------------------------------------------------------------------------

def _hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers' LlamaForCausalLM name."""
    names = {"embedding_proj.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "de_embedding_proj.weight": "lm_head.weight"}
    per_layer = {"attention_norm": "input_layernorm", "swiglu_norm": "post_attention_layernorm",
                 "attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
                 "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.o_proj",
                 "swiglu.w_0": "mlp.gate_proj", "swiglu.w_1": "mlp.up_proj",
                 "swiglu.w_2": "mlp.down_proj"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head of q_proj/k_proj from RoPE on interleaved pairs (ours,
    pico-train's, Meta's) to RoPE on halves (transformers'): rows 0,2,4,... then 1,3,5,..."""
    out_features, in_features = w.shape
    return w.view(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(
        out_features, in_features)


def _halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.view(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2).reshape(
        out_features, in_features)


def hf_config(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "intermediate_size": config.activation_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention_n_heads,
        "num_key_value_heads": config.attention_n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.position_emb_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": config.position_emb_theta},  # ... 5.x this
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        # No tokenizer is implied: without these, transformers would assume Llama's ids 1 and 2.
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }


def to_hf_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in _hf_names(config.n_layers).items():
        w = state[ours].detach().to("cpu", torch.float32)
        if ours.endswith("q_proj.weight"):
            w = _interleaved_to_halves(w, config.attention_n_heads)
        elif ours.endswith("k_proj.weight"):
            w = _interleaved_to_halves(w, config.attention_n_kv_heads)
        out[theirs] = w.contiguous()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str):
    state = {}
    for ours, theirs in _hf_names(config.n_layers).items():
        if theirs not in tensors:
            raise CheckpointError(f"{source}: tensor {theirs} is missing")
        w = tensors[theirs].float()
        if ours.endswith("q_proj.weight"):
            w = _halves_to_interleaved(w, config.attention_n_heads)
        elif ours.endswith("k_proj.weight"):
            w = _halves_to_interleaved(w, config.attention_n_kv_heads)
        state[ours] = w
    return state


def model_config_from_hf(cfg: dict, source: str) -> ModelConfig:
    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{source}: model_type={cfg.get('model_type')!r}, expected 'llama' "
                              f"(the export this trainer writes) or 'pico_decoder' (pico-train's)")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        config = ModelConfig(
            d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            attention_n_heads=cfg["num_attention_heads"],
            attention_n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            activation_hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            max_seq_len=cfg["max_position_embeddings"], norm_eps=cfg["rms_norm_eps"],
            position_emb_theta=float(theta))
    except KeyError as e:
        raise CheckpointError(f"{source}: field {e.args[0]} is missing") from None
    if cfg.get("head_dim", config.head_dim) != config.head_dim:
        raise CheckpointError(f"{source}: head_dim={cfg['head_dim']}, the decoder needs "
                              f"hidden_size / num_attention_heads = {config.head_dim}")
    return config


def export_hf(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path):
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    save_file(to_hf_state(state, config), directory / "model.safetensors", metadata={"format": "pt"})


def load_hf_weights(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    path = directory / "model.safetensors"
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    return from_hf_state(tensors, config, str(path))


def load_pretrained(path_or_repo_id: str, revision: str | None = None) -> PicoDecoder:
    directory = Path(path_or_repo_id)
    if not directory.is_dir():
        # Not a local directory: a Hub model repo (pico-train publishes each step as a revision).
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path_or_repo_id, revision=revision,
                                           allow_patterns=["config.json", "*.safetensors"]))
    cfg_path = directory / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({e})") from None
    if cfg.get("model_type") == "pico_decoder":
        config, state = read_pico_train(directory, cfg)
    else:
        config = model_config_from_hf(cfg, str(cfg_path))
        state = load_hf_weights(directory, config)
    model = PicoDecoder(config)
    model.load_state_dict(state)
    return model


def read_pico_train(directory: Path, cfg: dict) -> tuple[ModelConfig, dict]:
    """pico-train's published format: its ModelConfig's fields in config.json, weights under
    "pico_decoder." + our module names, RoPE already interleaved (no permutation)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in cfg.items() if k in names and v is not None})
    if cfg.get("attention_n_kv_heads") is None:  # pico-train: None means one KV head per head
        config.attention_n_kv_heads = config.attention_n_heads
    path = directory / "model.safetensors"
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    prefix = "pico_decoder."
    return config, {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    # Plain tensors and tuples only, so torch.load(weights_only=True) reads it back.
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(checkpoints_dir: Path, step: int, model: PicoDecoder, optimizer, scheduler,
                    data_position: int) -> Path:
    """Write checkpoints/step_{step} completely, then point `latest` at it."""
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing it
    tmp.mkdir(parents=True)
    export_hf(model.state_dict(), model.config, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / "optimizer.pt")
    torch.save({"step": step, "data_position": data_position, "rng": _rng_state()},
               tmp / "training_state.pt")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync_dir(tmp)

    if final.exists():  # the same step saved again (a resumed run re-saving): replace it whole
        old = checkpoints_dir / f".step_{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    link_tmp = checkpoints_dir / "latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, checkpoints_dir / "latest")
    _fsync_dir(checkpoints_dir)
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    link = checkpoints_dir / "latest"
    return link.resolve() if link.is_symlink() else None


def check_complete(directory: Path) -> dict:
    """The manifest of a checkpoint, after checking every file it lists is there in full."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: incomplete checkpoint, manifest unreadable "
                              f"({e.__class__.__name__}: {e})") from None
    for name, size in files.items():
        path = directory / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise CheckpointError(f"{path}: expected {size} bytes, found "
                                  f"{'no file' if actual is None else f'{actual} bytes'}")
    return manifest


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds of errors for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_checkpoint(directory: Path, config: ModelConfig) -> dict:
    """Read and check every part of a checkpoint before any of it is applied, so a damaged one
    is reported (naming the file) without touching the model or the run directory."""
    check_complete(directory)
    model_state = load_hf_weights(directory, config)
    opt = _torch_load(directory / "optimizer.pt")
    training = _torch_load(directory / "training_state.pt")
    return {"model": model_state, **opt, **training}


def restore_checkpoint(state: dict, model: PicoDecoder, optimizer, scheduler) -> tuple[int, int]:
    """Apply a read checkpoint; returns (step, data_position)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["data_position"]
