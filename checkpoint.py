"""Everything the trainer writes to disk, and reads back: the run's records (training_config.yaml,
logs/, metrics.jsonl), its checkpoints, their Hugging Face export and learning-dynamics captures,
and their upload to the Hub.

A checkpoint is a directory, checkpoints/step_N/, holding:
  config.json, model.safetensors   the Hugging Face Llama export: transformers loads it with no
                                   custom code, and resume reads the weights back from it
  optimizer/                       AdamW's state by parameter name, in torch.distributed.checkpoint's
                                   format: one file per rank that saved it, readable at any
                                   world size, by one process, DDP or FSDP; resume needs it
  training_state.pt                step, data position, scheduler and every RNG state
  learning_dynamics/               {train,val}_{activations,weights,gradients}.pt for pico-analyze,
                                   and train_data/: the train rows, as datasets' save_to_disk writes
  checkpoint.json                  the manifest, written last: each file's size and crc32

It is written to a hidden temporary directory and renamed into place, and only then does the
`latest` symlink move to it (an atomic rename of a new link). A kill at any moment therefore
leaves `latest` pointing at a complete checkpoint; a half-written one is a stray temporary.
Rank 0 writes every shared file; a single process is rank 0 of a world of 1.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import socket
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import data
from model import ModelConfig, PicoDecoder

MANIFEST = "checkpoint.json"  # in each checkpoint: its files and their sizes, written last
UPLOADS = "uploads.json"  # in the run directory: the steps pending upload, and those uploaded
CODE = ["*.py", "configs/*.py", "requirements*.txt"]  # the project's files copied into each run


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def _describe(e: Exception) -> str:
    """An error's kind and the first line of its message: one line for a one-line error."""
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0]}" if lines else e.__class__.__name__


def world() -> tuple[int, int]:
    """(world size, rank) of this process in torch.distributed's group; (1, 0) outside one."""
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_rows(mine: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's rows of a result (rank r: counts[r] of them), concatenated in rank order,
    which is data order: rank r holds the r-th block of rows (data.rank_slice)."""
    if world()[0] == 1:
        return mine
    padded = mine.new_zeros(max(counts), *mine.shape[1:])  # all_gather: equal sizes
    padded[:len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def my_rows(rows):
    """This rank's block of fixed rows (evaluation, probe, captures: data.rank_slice) and every
    rank's number of rows, which gather_rows takes to put the results back in data order."""
    world_size, rank = world()
    blocks = [data.rank_slice(len(rows), world_size, r) for r in range(world_size)]
    return rows[blocks[rank]], [b.stop - b.start for b in blocks]


def any_rank(flag: bool, group) -> bool:
    """Whether the flag is set on any rank, so every rank acts on it at the same step."""
    if world()[0] == 1:
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return bool(votes.item())


# The Hugging Face Llama format ---------------------------------------------------------------

def _hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers' LlamaForCausalLM name."""
    per_layer = {"attention_norm": "input_layernorm", "swiglu_norm": "post_attention_layernorm",
                 **{f"attention.{x}_proj": f"self_attn.{x}_proj" for x in "qkvo"},
                 "swiglu.w_0": "mlp.gate_proj", "swiglu.w_1": "mlp.up_proj", "swiglu.w_2": "mlp.down_proj"}
    return {"embedding_proj.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "de_embedding_proj.weight": "lm_head.weight",
            **{f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
               for i in range(n_layers) for ours, theirs in per_layer.items()}}


def _reorder_rope_rows(state: dict[str, torch.Tensor], config: ModelConfig, to_halves: bool) -> dict:
    """Reorder, in place, each head's rows of q_proj and k_proj from RoPE on interleaved pairs (ours,
    pico-train's, Meta's) to RoPE on halves (transformers'): rows 0,2,4,... then 1,3,5,...; or back."""
    heads = {"q_proj": config.attention_n_heads, "k_proj": config.attention_n_kv_heads}
    for name, w in state.items():
        n_heads = heads.get(name.split(".")[-2])
        if n_heads:  # a head's rows viewed as [pair, 0 or 1] (interleaved) or [0 or 1, pair] (halves)
            pairs = (-1, 2) if to_halves else (2, -1)
            state[name] = w.view(n_heads, *pairs, w.shape[1]).transpose(1, 2).reshape(w.shape)
    return state


# A Llama config.json's field for each of ours (pico-train's uses ours); head_dim is only checked.
HF_FIELDS = {"d_model": "hidden_size", "activation_hidden_dim": "intermediate_size",
             "n_layers": "num_hidden_layers", "attention_n_heads": "num_attention_heads",
             "attention_n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings",
             "norm_eps": "rms_norm_eps", "position_emb_theta": "rope_theta"}


def hf_config(config: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **{theirs: getattr(config, ours) for ours, theirs in HF_FIELDS.items()},
            # transformers 4.x reads rope_theta (above), 5.x rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": config.position_emb_theta},
            "rope_scaling": None,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            # No tokenizer is implied: without these, transformers would assume Llama's ids 1 and 2.
            "bos_token_id": None, "eos_token_id": None,
            "torch_dtype": "float32"}


def export_hf(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path):
    names = _hf_names(config.n_layers)
    ours = {name: state[name].detach().to("cpu", torch.float32) for name in names}
    halves = _reorder_rope_rows(ours, config, to_halves=True)
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    save_file({names[name]: w.contiguous() for name, w in halves.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})


def read_weights(directory: Path, config: ModelConfig, model_type: str = "llama", tied: bool = False) -> dict:
    """Our state dict from model.safetensors, or from the shards of model.safetensors.index.json
    (save_pretrained splits a big model so). Every weight must be there with its shape, and no other
    parameter (a weight or bias the decoder would drop computes something else); buffers, such as
    older Llamas' rotary inv_freq, are derived and skipped. Errors name the tensor and its file."""
    names, ignored = _hf_names(config.n_layers), set()
    if model_type == "pico_decoder":  # pico-train's: our names under "pico_decoder.", RoPE as ours
        names = {ours: "pico_decoder." + ours for ours in names}
    elif tied:  # the output projection is the embedding, often with no lm_head tensor at all: untied
        # weights that start equal compute exactly what the tied model does (training unties them)
        names["de_embedding_proj.weight"], ignored = "model.embed_tokens.weight", {"lm_head.weight"}
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    origin: dict[str, Path] = {}  # tensor name -> its file, as the index says or as found
    if single.is_file():
        files, listing = [single], single
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            origin = {name: directory / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot be read ({_describe(e)}); expected "
                                  f"a weight_map of tensor name -> file") from None
        files, listing = sorted(set(origin.values())), index
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors weights are read)")
    tensors = {}
    for path in files:
        try:
            part = load_file(path)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"{path}: cannot be read ({_describe(e)})") from None
        tensors |= part
        origin = {**dict.fromkeys(part, path), **origin}
    with torch.device("meta"):  # shapes only, no memory
        shapes = {k: v.shape for k, v in PicoDecoder(config).state_dict().items()}
    state = {}
    for ours, theirs in names.items():
        w = tensors.get(theirs)
        if w is None:
            raise CheckpointError(f"{origin.get(theirs, listing)}: tensor {theirs} is missing")
        if w.shape != shapes[ours]:
            raise CheckpointError(f"{origin[theirs]}: tensor {theirs} has shape {list(w.shape)}, "
                                  f"expected {list(shapes[ours])} for this model shape")
        state[ours] = w.float()
    for name in sorted(set(tensors) - set(names.values()) - ignored):
        if name.endswith((".weight", ".bias")):
            raise CheckpointError(f"{origin[name]}: tensor {name} is not a weight of the "
                                  f"pico-decoder (a model with it computes something else)")
    return state if model_type == "pico_decoder" else _reorder_rope_rows(state, config, to_halves=False)


def _model_config(cfg: dict, source: str) -> ModelConfig:
    """The decoder's shape from a config.json, pico-train's (our field names) or a Llama's (HF_FIELDS).
    A shape the decoder cannot have is refused naming the checkpoint's field: heads that do not
    divide d_model, ...; in a Llama also biases, another activation, scaled RoPE, its own head_dim."""
    llama = cfg.get("model_type") == "llama"
    if not llama and cfg.get("model_type") != "pico_decoder":
        raise CheckpointError(f"{source}: model_type={cfg.get('model_type')!r}, expected 'llama' "
                              f"(the export this trainer writes) or 'pico_decoder' (pico-train's)")
    rope = cfg.get("rope_parameters") or {}  # transformers 5.x writes rope_theta here, 4.x on top
    if llama and not isinstance(rope, dict):
        raise CheckpointError(f"{source}: rope_parameters={json.dumps(rope)}: expected an object")
    if llama:  # absent or null: transformers' defaults (multi-head attention; theta 10000)
        cfg = {**cfg, "rope_theta": cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
               "num_key_value_heads": cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")}
    elif cfg.get("attention_n_kv_heads", 0) is None:  # pico-train's null: one KV head per head
        cfg = {**cfg, "attention_n_kv_heads": cfg.get("attention_n_heads")}
    fields = HF_FIELDS if llama else {}
    values = {}
    for field in dataclasses.fields(ModelConfig):
        key, kind = fields.get(field.name, field.name), type(field.default)
        if key not in cfg:
            raise CheckpointError(f"{source}: field {key} is missing")
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise CheckpointError(f"{source}: {key}={json.dumps(value)}: expected "
                                  f"{'an integer' if kind is int else 'a number'}")
        values[field.name] = kind(value)
    config = ModelConfig(**values)
    if problems := config.problems():
        raise CheckpointError(f"{source}: " + re.sub(r"model\.(\w+)", lambda m: fields.get(m[1], m[1]),
                                                     problems[0]))
    if not llama:
        return config
    no_bias, unscaled = "false (the decoder has no biases)", "(the decoder's RoPE is unscaled)"
    for key, value, ok, expected in [
        ("hidden_act", cfg.get("hidden_act", "silu"), lambda v: v in ("silu", "swish"),
         '"silu" (the SwiGLU gate)'),
        ("attention_bias", cfg.get("attention_bias", False), lambda v: v is False, no_bias),
        ("mlp_bias", cfg.get("mlp_bias", False), lambda v: v is False, no_bias),
        ("rope_scaling", cfg.get("rope_scaling"), lambda v: v is None or isinstance(v, dict) and (
            v.get("rope_type") or v.get("type")) == "default", "null " + unscaled),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), lambda v: v == "default",
         '"default" ' + unscaled),
        ("head_dim", cfg.get("head_dim"), lambda v: v in (None, config.head_dim),
         f"hidden_size / num_attention_heads = {config.head_dim}"),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", False),
         lambda v: isinstance(v, bool), "true or false"),
    ]:
        if not ok(value):
            raise CheckpointError(f"{source}: {key}={json.dumps(value)}: the pico-decoder cannot "
                                  f"express it; expected {expected}")
    return config


def locate_pretrained(path_or_repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """A checkpoint's directory, and its name for messages: path_or_repo_id, or a snapshot of a Hub
    model repo ("namespace/name", "@revision": pico-train publishes each step as a revision) in the
    Hugging Face cache, which HF_HUB_OFFLINE=1 reads. Errors name the repo, never the token."""
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id), path_or_repo_id
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    repo_id = path_or_repo_id
    if revision is None and "@" in repo_id:
        repo_id, revision = repo_id.rsplit("@", 1)
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        return Path(snapshot_download(  # with a progress bar: a model can be gigabytes
            repo_id, revision=revision,
            # the top level only: a repo may hold other files (pico-train's training state, ...)
            allow_patterns=["config.json", "model.safetensors.index.json", "model*.safetensors"])), name
    except HFValidationError:
        message = "no such directory, and not a Hub model repo id (namespace/name, optionally @revision)"
    except RepositoryNotFoundError:
        message = (f"no local directory of that name, and no model repo {repo_id} on {constants.ENDPOINT} "
                   f"(a private or gated repo needs a token: set HF_TOKEN or run `hf auth login`)")
    except RevisionNotFoundError:
        message = f"model repo {repo_id} on {constants.ENDPOINT} has no revision {revision!r}"
    except OSError as e:  # huggingface_hub's HTTP, offline and not-in-cache errors among them
        message = (f"no local directory of that name, and could not download model repo {name} "
                   f"({data.hub_failure(e)})")
    raise CheckpointError(data.without_token(f"{path_or_repo_id}: {message}"))


def read_pretrained(path_or_repo_id: str, revision: str | None = None) -> tuple[ModelConfig, dict, str]:
    """The shape, weights and name of a checkpoint: our export, a Llama, or pico-train's."""
    directory, name = locate_pretrained(path_or_repo_id, revision)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{name}: no config.json; expected a Hugging Face checkpoint "
                              f"(this trainer's export, a Llama, or pico-train's)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({_describe(e)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of config fields")
    config = _model_config(cfg, str(cfg_path))
    tied = cfg.get("tie_word_embeddings", False)
    return config, read_weights(directory, config, cfg["model_type"], tied), name


def load_pretrained(path_or_repo_id: str, revision: str | None = None) -> PicoDecoder:
    config, state, _ = read_pretrained(path_or_repo_id, revision)
    model = PicoDecoder(config)
    model.load_state_dict(state)
    return model


# Learning-dynamics captures: what pico-analyze reads from checkpoints/step_N/learning_dynamics/ ---

def capture_modules(model: PicoDecoder, suffixes: list[str], layers: list[int] | None) -> dict:
    """{"layers.{i}.{name}": module} of the linear layers of `layers` (None: all) whose names end in
    a suffix. One that matches none is an error (a model on the meta device finds it up front)."""
    linears = {name: module for name, module in model.named_modules()
               if name.startswith("layers.") and isinstance(module, torch.nn.Linear)}
    found = {name: module for name, module in linears.items()
             if (layers is None or int(name.split(".")[1]) in layers) and name.endswith(tuple(suffixes))}
    for suffix in suffixes:
        if not any(name.endswith(suffix) for name in found):
            valid = sorted({name.split(".", 2)[2] for name in linears})
            raise CheckpointError(f"checkpointing.learning_dynamics.layer_suffixes: {suffix!r} matches no "
                                  f"module; expected some of {', '.join(valid)}")
    return found


def learning_dynamics(model: PicoDecoder, train_batch, val_rows, ld, device, autocast) -> dict:
    """A checkpoint's captures, {split: {kind: {module name: float32 CPU tensor}}}. train: on the
    global batch its last step trained on (this rank's part of it), and that batch's rows under
    kind "data" (int64 CPU [rows, max_seq_len + 1], every rank's, in data order); val: on the
    fixed evaluation rows (all of them). ld: the checkpointing.learning_dynamics section."""
    modules = capture_modules(model, ld.layer_suffixes, ld.layers)
    world_size = world()[0]
    splits = {}  # split: (this rank's rows, every rank's number of rows, tokens of all rows)
    if ld.capture_train:
        mine = list(train_batch.reshape(-1, train_batch.shape[-1]).cpu())
        splits["train"] = (mine, [len(mine)] * world_size, len(mine) * world_size * (len(mine[0]) - 1))
    if val_rows is not None:
        splits["val"] = (*my_rows(val_rows), sum(len(row) - 1 for row in val_rows))
    captures = {split: _capture(model, rows, counts, total_tokens, modules, ld, device, autocast)
                for split, (rows, counts, total_tokens) in splits.items()}
    if ld.capture_train:  # written as train_data/, as pico-train saves the batch it captured on
        batch_rows = train_batch.reshape(-1, train_batch.shape[-1])
        captures["train"]["data"] = gather_rows(batch_rows, [len(batch_rows)] * world_size).cpu()
    return captures


def _capture(model: PicoDecoder, rows: list, counts: list[int], total_tokens: int, modules: dict, ld,
             device, autocast) -> dict:
    """One split's captures of this rank's rows, gathered from every rank (counts: their numbers of
    rows). Gradients of the mean loss over total_tokens: sub-batches of ld.batch_size change only
    memory. autograd.grad leaves the run's .grad untouched; no random number is drawn."""
    weights = [module.weight for module in modules.values()]
    gradients = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    activations = {module: [] for module in modules.values()}
    positions = None  # of the current sub-batch, for the hooks

    def hook(module, inputs, output):
        activations[module].append(output[torch.arange(len(positions)), positions].detach().float())
    hooks = [module.register_forward_hook(hook) for module in modules.values()]
    recompute, model.checkpoint_blocks = model.checkpoint_blocks, False  # hooks would see blocks twice
    try:
        for start in range(0, len(rows), ld.batch_size):
            chunk = rows[start:start + ld.batch_size]
            positions = torch.tensor([ld.sequence_idx % (len(row) - 1) if ld.sequence_idx < 0
                                      else ld.sequence_idx for row in chunk], device=device)
            inputs, labels = data.collate(chunk)
            n_tokens = int((labels != -100).sum())  # counted on the host: no wait for the GPU
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast:
                _, loss = model(inputs, labels)
            for g, new in zip(gradients, torch.autograd.grad(loss * (n_tokens / total_tokens), weights)):
                g += new.float()
    finally:
        model.checkpoint_blocks = recompute
        for handle in hooks:
            handle.remove()
    outputs = [torch.cat(parts) if parts else torch.zeros(0, w.shape[0], device=device)
               for parts, w in zip(activations.values(), weights)]
    if world()[0] > 1:
        # Made whole: gradients summed (each rank's is its rows' share of the mean), activations
        # gathered in data order.
        for g in gradients:
            dist.all_reduce(g)
        outputs = [gather_rows(mine, counts) for mine in outputs]
    return {"activations": {name: out.cpu() for name, out in zip(modules, outputs)},
            "weights": {name: w.detach().float().cpu().clone() for name, w in zip(modules, weights)},
            "gradients": {name: g.cpu() for name, g in zip(modules, gradients)}}


# The features as datasets 2.x and 3.x (pico-train pins 3.0 to 3.1) write them: 4.0 and later write
# List, which 3.x cannot read, and still read Sequence (checked with 2.21, 3.1 and 5.2).
ROWS_FEATURES = {"input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "Sequence"}}
ROWS_ARROW = "data-00000-of-00001.arrow"


def write_rows_dataset(rows: np.ndarray, directory: Path):
    """Token-id rows [n, length] as the directory datasets.Dataset.from_dict({"input_ids": rows})
    .save_to_disk(directory) makes, which datasets.load_from_disk reads, written with pyarrow alone
    (datasets is no dependency of the trainer): one Arrow IPC stream whose schema carries the
    features as datasets' "huggingface" metadata, dataset_info.json and state.json. Only the
    input_ids: pico-train adds a "text" column when it has a tokenizer, and we run none."""
    directory.mkdir(parents=True, exist_ok=True)
    # datasets stores a column named input_ids as int32 when every id fits, as any vocabulary's do
    ids = np.ascontiguousarray(rows, dtype=np.int32)
    offsets = np.arange(len(ids) + 1, dtype=np.int32) * ids.shape[1]
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1)))
    metadata = {"huggingface": json.dumps({"info": {"features": ROWS_FEATURES}})}
    schema = pa.schema([pa.field("input_ids", column.type)], metadata=metadata)
    table = pa.Table.from_arrays([column], schema=schema)
    with pa.OSFile(str(directory / ROWS_ARROW), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=1000)  # datasets' batches of 1,000 rows: its very bytes
    info = {"citation": "", "description": "", "features": ROWS_FEATURES, "homepage": "", "license": ""}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    state = {"_data_files": [{"filename": ROWS_ARROW}],
             # any hex string: this one, of the ids, makes the same rows the same bytes
             "_fingerprint": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def write_learning_dynamics(directory: Path, captures: dict):
    """learning_dynamics()'s captures as {split}_{kind}.pt files, and the train rows as train_data/."""
    for split, states in captures.items():
        directory.mkdir(exist_ok=True)
        for kind, tensors in states.items():
            if kind == "data":  # the rows themselves, as pico-train's datasets directory
                write_rows_dataset(tensors.numpy(), directory / f"{split}_data")
            else:
                torch.save(tensors, directory / f"{split}_{kind}.pt")


def save_spike(directory: Path, spike: dict, captures: dict):
    """spikes/step_N/: spike.json (the step, its loss, the window's mean and standard deviation,
    the global row positions of its batch) and the captures of its batch in learning_dynamics/,
    in the layout of a checkpoint's. Written aside and renamed: there whole, or not at all."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_learning_dynamics(tmp / "learning_dynamics", captures)
    (tmp / "spike.json").write_text(json_line(spike))
    shutil.rmtree(directory, ignore_errors=True)  # the same step again, after a resume
    os.replace(tmp, directory)


# Training checkpoints ------------------------------------------------------------------------

def save_array(path: Path, array: np.ndarray):
    """A NumPy array as an .npy file, replaced whole or not at all (write_atomically)."""
    content = io.BytesIO()
    np.save(content, array)
    write_atomically(path, content.getvalue())


def write_atomically(path: Path, content: str | bytes):
    """A small file replaced whole or not at all: a crash leaves the old one or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path):
    """Flush a file, or a directory's entries (what makes a rename durable), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> str:
    """A fast checksum (several GB/s) that finds damaged bytes a file's size cannot."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _dcp(call, optimizer_state: dict, path: Path):
    """dcp.save or dcp.load, without its warning, "assuming the intent is to save in a single
    process", whenever there is no process group: this trainer's normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        call({"optimizer": optimizer_state}, checkpoint_id=path)


def save_checkpoint(checkpoints_dir: Path, step: int, model: PicoDecoder, optimizer, scheduler,
                    data_position: int, model_state: dict | None = None,
                    learning_dynamics: dict | None = None, tokenizer: dict[str, bytes] | None = None,
                    run_state: dict | None = None) -> Path:
    """Write checkpoints/step_{step} completely, then point `latest` at it. Every rank calls it and
    writes its part of optimizer/ (DDP's replicated tensors once), keyed by parameter name so that
    it loads at another world size or strategy; rank 0 writes the rest. model_state: the whole
    weights (the FSDP gather) if not model.state_dict(); tokenizer: files beside config.json;
    run_state: what else a resumed run carries on with (the loss-spike window, the probe's rows)."""
    final, tmp = checkpoints_dir / f"step_{step}", checkpoints_dir / f".step_{step}.tmp"
    writer = world()[1] == 0
    try:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
            (tmp / "optimizer").mkdir(parents=True)
        barrier()  # the directory exists before any rank writes into it
        _dcp(dcp.save, get_optimizer_state_dict(model, optimizer), tmp / "optimizer")
        barrier()  # every rank's shard is on disk before rank 0 lists and seals the directory
        if writer:
            export_hf(model.state_dict() if model_state is None else model_state, model.config, tmp)
            for name, content in (tokenizer or {}).items():
                (tmp / name).write_bytes(content)
            np_state = np.random.get_state()  # as plain tensors and tuples: torch.load(weights_only=True)
            rng = {"python": random.getstate(),
                   "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
                   "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            torch.save({"step": step, "data_position": data_position, "scheduler": scheduler.state_dict(),
                        "rng": rng, "run_state": run_state or {}}, tmp / "training_state.pt")
            write_learning_dynamics(tmp / "learning_dynamics", learning_dynamics or {})
            # fsync every file and directory, then write the manifest that makes the checkpoint complete
            entries = sorted(tmp.rglob("*"))
            for path in entries:
                _fsync(path)
            files = {p.relative_to(tmp).as_posix(): p for p in entries if p.is_file()}
            manifest = {"step": step, "files": {name: p.stat().st_size for name, p in files.items()},
                        "crc32": {name: _crc32(p) for name, p in files.items()}}
            write_atomically(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            _fsync(tmp)
            # The same step saved again (a resumed run re-saving it) is replaced whole, the old kept aside.
            old = checkpoints_dir / f".step_{step}.old"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _point_latest(checkpoints_dir, final.name)
        barrier()  # no rank goes on (or exits on a stop signal) before the checkpoint is complete
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # a full disk, most often
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint must not hold the space
        previous = latest_checkpoint(checkpoints_dir)
        needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file()) if previous else 0
        raise CheckpointError(f"{tmp}: could not be written ({_describe(e)}); "
                              f"{shutil.disk_usage(checkpoints_dir).free:,} bytes free, the last "
                              f"checkpoint took {needed:,}: free space, then re-run to resume") from None
    return final


def checkpoint_bytes(model: PicoDecoder, ld, train_rows: int, val_rows: int,
                     tokenizer: dict[str, bytes] | None) -> dict[str, int]:
    """The bytes save_checkpoint will write, by part, from the shapes alone (for the run's plan):
    float32 weights, AdamW's two float32 moments, the captures (activations of each row, weights,
    gradients; the train rows' int32 ids) and the tokenizer; headers and the small files are left out."""
    modules = capture_modules(model, ld.layer_suffixes, ld.layers).values()
    rows = (train_rows if ld.capture_train else 0) + val_rows
    captured = {"activations": rows * sum(m.weight.shape[0] for m in modules),
                "weights and gradients": 2 * (bool(train_rows and ld.capture_train) + bool(val_rows))
                * sum(m.weight.numel() for m in modules),
                "train_data": (train_rows if ld.capture_train else 0) * (model.config.max_seq_len + 1)}
    return {"weights": 4 * model.num_params(), "optimizer": 8 * model.num_params(),
            "captures": 4 * sum(captured.values()), "tokenizer": sum(map(len, (tokenizer or {}).values()))}


def _point_latest(checkpoints_dir: Path, name: str):
    """`latest` -> name, by the atomic rename of a new symlink; where the file system has no
    symlinks, a file holding the name."""
    latest, tmp = checkpoints_dir / "latest", checkpoints_dir / "latest.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(name)
    except OSError:
        tmp.write_text(name + "\n")
    if latest.is_dir() and not latest.is_symlink():  # a copy made by cp -r, or rsync without -l
        shutil.rmtree(latest)
    os.replace(tmp, latest)
    _fsync(checkpoints_dir)


def drop_old_optimizer_states(checkpoints_dir: Path, keep: int):
    """Delete the optimizer state, twice the model's size, from all but the newest `keep` checkpoints.
    The manifest loses the files first: a crash in between leaves stray files, never a broken one."""
    for directory in step_directories(checkpoints_dir)[:-keep]:
        manifest = json.loads((directory / MANIFEST).read_text())
        kept = {name: size for name, size in manifest["files"].items() if not name.startswith("optimizer/")}
        if kept != manifest["files"]:
            write_atomically(directory / MANIFEST,
                                  json.dumps({**manifest, "files": kept}, indent=2) + "\n")
            shutil.rmtree(directory / "optimizer", ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint `latest` names; without a usable `latest` (copied as a directory, or lost), the
    newest complete step_N: a run with checkpoints never starts over by accident."""
    link = checkpoints_dir / "latest"
    if link.is_symlink() or link.is_file():
        named = checkpoints_dir / (os.readlink(link) if link.is_symlink() else link.read_text().strip())
        if named.is_dir():
            return named  # damaged or not: a damaged one is named when read, never skipped silently
    steps = step_directories(checkpoints_dir)[::-1]
    for step in steps:
        with contextlib.suppress(CheckpointError):
            check_complete(step, checksums=False)
            return step
    if steps:
        raise CheckpointError(f"{checkpoints_dir}: no complete checkpoint among "
                              f"{', '.join(p.name for p in steps)} and no usable latest; expected a "
                              f"step_N with its {MANIFEST}")
    return None


def step_directories(checkpoints_dir: Path) -> list[Path]:
    """checkpoints/step_N, by N."""
    steps = [p for p in checkpoints_dir.glob("step_*") if p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def check_complete(directory: Path, checksums: bool = True) -> dict:
    """A checkpoint's manifest, once every file it lists is there in full and, where it has their
    checksums (older checkpoints may not), unchanged."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files, crcs = manifest["files"], manifest.get("crc32", {}) if checksums else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path}: incomplete checkpoint, manifest unreadable "
                              f"({_describe(e)})") from None
    for name, size in files.items():
        path = directory / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise CheckpointError(f"{path}: expected {size} bytes, found "
                                  f"{'no file' if actual is None else f'{actual} bytes'}")
        if name in crcs and _crc32(path) != crcs[name]:
            raise CheckpointError(f"{path}: damaged (its crc32 is {_crc32(path)}, the manifest's "
                                  f"{crcs[name]}); expected the bytes saved")
    return manifest


def read_checkpoint(directory: Path, config: ModelConfig) -> dict:
    """Every part of a checkpoint that can be read before the model exists, so that a damaged one
    is named before anything is built or written. restore_checkpoint reads the optimizer's shards."""
    manifest = check_complete(directory)
    state = {"model": read_weights(directory, config)}
    path = directory / "training_state.pt"
    try:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # torch raises many kinds of errors for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({_describe(e)})") from None
    if not any(name.startswith("optimizer/") for name in manifest["files"]):
        raise CheckpointError(f"{directory}: holds no optimizer state (checkpointing."
                              f"keep_last_n_optimizer_states dropped it); expected optimizer/")
    return state


def restore_checkpoint(directory: Path, state: dict, model: PicoDecoder, optimizer, scheduler):
    """Apply read_checkpoint's state (its weights are in the model already, loaded before DDP or
    FSDP wrapped it); each rank reads its part of the optimizer state, resharded to this world."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # the layout to read into
    try:
        _dcp(dcp.load, optimizer_state, directory / "optimizer")
    except (Exception, dcp.api.CheckpointException) as e:  # a damaged shard, another model; the
        # latter is a BaseException, which `except Exception` would let through as a traceback
        raise CheckpointError(f"{directory / 'optimizer'}: cannot be read ({_describe(e)})") from None
    set_optimizer_state_dict(model, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():  # saved on a node that may have had more GPUs
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


# The run's records: training_config.yaml, logs/, metrics.jsonl -------------------------------

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
            why = f"wandb did not start ({_describe(e)})"
        self.log.warning(f"monitoring.save_to_wandb: {why}; metrics go to metrics.jsonl only")

    def write(self, record: dict):
        """One record of metrics.jsonl: a JSON object with its "step"."""
        if self.metrics is None:
            return
        try:
            with open(self.metrics, "a") as f:
                f.write(json_line(record))  # one write: a crash leaves at most one partial line
        except OSError as e:  # a full disk: one line, and the next start drops a partial record
            raise CheckpointError(f"{self.metrics}: cannot be written ({e.strerror or _describe(e)}); "
                                  f"free space, then re-run the same command to resume") from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

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
    """Whether a record is a checkpoint's evaluation: its keys paloma_* or probe/*."""
    return any(key.startswith(("paloma_", "probe/")) for key in json.loads(line))


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
                              f"({e.strerror or _describe(e)}); expected a writable directory") from None
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


# Upload to the Hub ---------------------------------------------------------------------------

def read_uploads(run_dir: Path) -> dict[str, list[int]]:
    """run_dir/uploads.json: {"pending": [steps queued, not yet on the Hub], "uploaded": [...]}."""
    path = Path(run_dir) / UPLOADS
    try:
        record = json.loads(path.read_text())
        return {"pending": list(record["pending"]), "uploaded": list(record["uploaded"])}
    except FileNotFoundError:
        return {"pending": [], "uploaded": []}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({_describe(e)}); expected "
                              f'{{"pending": [steps], "uploaded": [steps]}}') from None


class HubUploader:
    """Pushes each checkpoint to branch `branch` (the run name) of the Hub model repo `repo_id` as
    pico-train does, with the tokenizer, metrics.jsonl and the logs; with upload_optimizer also the
    optimizer and training state, at their paths in step_N/, so the branch resumes as a checkpoint.
    One background thread uploads, so a training step never waits for the network. A step is
    pending in uploads.json from before it is queued until all its commits are made, so one that a
    crash or an outage left pending is queued again at the next start. A commit is tried `attempts`
    times, `retry_delay` seconds apart, then twice that, ...; a step that still fails is logged
    once and stays pending. Nothing here raises into the training loop or prints the token."""

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
        while (step := self.queue.get()) is not None:
            try:
                n_commits = self._upload(step)
                with self.lock:
                    self.record["pending"].remove(step)
                    self.record["uploaded"].append(step)
                    self._write()
                self.log.info(f"uploaded step {step} to {self.repo_id}@{self.branch} ({n_commits} commits)")
            except Exception as e:  # whatever went wrong, training goes on and the step stays pending
                if not self.given_up.is_set():  # else close() has said what is left
                    reason = data.without_token(_describe(e))  # should a server echo the token
                    self.log.warning(f"upload of step {step} to {self.repo_id}@{self.branch} failed "
                                     f"({reason}); it stays pending in "
                                     f"{self.run_dir / UPLOADS} for the next start")

    def _upload(self, step: int) -> int:
        """Commit checkpoint `step`, one commit per kind of file; how many. pico-analyze's --repo_id
        mode finds a step by its titles: r"Saving Learning Dynamics Data \\((train|val)\\) -- Step (\\d+)"."""
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
        results = [self.run_dir / "eval_results" / f"step_{step}{end}"
                   for end in (".json", "_rows.npy", "_probe.npy")]
        commits[f"Saving Evaluation Results -- Step {step}"] = {
            f"eval_results/{p.name}": p for p in results if p.exists()}
        spikes = {p.relative_to(self.run_dir).as_posix(): p
                  for p in sorted((self.run_dir / "spikes").glob("step_*/**/*")) if p.is_file()
                  and int(p.relative_to(self.run_dir / "spikes").parts[0][len("step_"):]) <= step}
        commits[f"Saving Loss Spikes -- Step {step}"] = {  # those since the last checkpoint's commit
            path: p for path, p in spikes.items() if path not in self.committed}
        logs = [self.run_dir / "metrics.jsonl", *sorted((self.run_dir / "logs").glob("*.log"))]
        commits[f"Saving Logs -- Step {step}"] = {
            p.relative_to(self.run_dir).as_posix(): p for p in logs if p.exists()}
        if self.upload_optimizer and (directory / "optimizer").is_dir():
            state = [directory / MANIFEST, directory / "training_state.pt",
                     *(directory / "optimizer").iterdir()]
            commits[f"Saving Training State -- Step {step}"] = {
                p.relative_to(directory).as_posix(): p for p in state}
        commits = {title: files for title, files in commits.items() if files}  # a kind without files: none
        for title, files in commits.items():
            for attempt in range(self.attempts):
                try:
                    self._commit(title, files)
                    break
                except Exception:
                    if attempt + 1 == self.attempts or self.given_up.wait(self.retry_delay * 2 ** attempt):
                        raise
        return len(commits)

    def _commit(self, title: str, files: dict[str, Path]):
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
        api.create_commit(self.repo_id, deletes + adds, commit_message=title, revision=self.branch)
        self.committed.update({op.path_in_repo: op.upload_info.sha256 for op in adds})


def verify(path: Path) -> int:
    """Check every checkpoint of a run directory (or one checkpoint) against its manifest: each
    file there, of its size, with its checksum. Prints one line per checkpoint; the number bad."""
    path = Path(path)
    directories = [path] if (path / MANIFEST).exists() else step_directories(path / "checkpoints")
    if not directories:
        raise CheckpointError(f"{path}: no checkpoint; expected a run directory or a checkpoint (step_N)")
    bad = 0
    for directory in directories:
        try:
            manifest = check_complete(directory)
            print(f"{directory}: ok, {len(manifest['files'])} files" + (
                "" if "crc32" in manifest else " (sizes only: saved before checksums)"))
        except CheckpointError as e:
            bad += 1
            print(f"{directory}: {e}")
    return bad


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Check the checkpoints of a run against their manifests.")
    parser.add_argument("command", choices=["verify"])
    parser.add_argument("path", help="a run directory (runs/RUN) or one checkpoint (.../step_N)")
    args = parser.parse_args()
    try:
        sys.exit(1 if verify(Path(args.path)) else 0)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
