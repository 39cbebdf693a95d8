"""The checkpoint format: save, verify, `latest`, load; the Hugging Face export and import; and
the learning-dynamics captures that pico-analyze reads.

A checkpoint is a directory, checkpoints/step_N/, holding:
  config.json, model.safetensors   the weights: the Hugging Face Llama export, which transformers
                                   loads with no custom code, where Llama expresses the model;
                                   else pico's own (pico-train's) format. Resume reads them back
  optimizer/                       AdamW's state by parameter name, in torch.distributed.checkpoint's
                                   format: one file per rank that saved it, readable at any
                                   world size, by one process, DDP or FSDP; resume needs it
  training_state.pt                step, data position, scheduler, rank 0's RNG states, and
                                   what the run carries on with (restore_checkpoint)
  learning_dynamics/               {train,val}_{activations,weights,gradients}.pt for pico-analyze,
                                   and train_data/: the train rows, as datasets' save_to_disk writes
  checkpoint.json                  the manifest, written last: each file's size and crc32

It is written to a hidden temporary directory and renamed into place, and only then does the
`latest` symlink move to it (an atomic rename of a new link). A kill at any moment therefore
leaves `latest` pointing at a complete checkpoint; a half-written one is a stray temporary.
Rank 0 writes every shared file; a single process is rank 0 of a world of 1. The run's other
records (metrics.jsonl, logs, uploads) are records.py's.

Core, on the reading path (README): this opening, save_checkpoint, read_checkpoint and
restore_checkpoint (exact resume), learning_dynamics and _capture (the captures). The rest is
machinery: the Hugging Face export and loading any format back, the manifest and `latest`.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import data
from config import ConfigError, branch_changes, read_run_config, saved_value, typed
from distributed import barrier, gather_rows, lost_peer, my_rows, world
from model import ModelConfig, PicoDecoder

MANIFEST = "checkpoint.json"  # in each checkpoint: its files and their sizes, written last
PICO_PREFIX = "pico_decoder."  # pico-train's format: the weights' names are the modules' under it


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def describe_error(e: Exception) -> str:
    """An error's kind and the first line of its message: one line for a one-line error."""
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0]}" if lines else e.__class__.__name__


# The weights and config.json: the Hugging Face Llama export, or pico's own format ------------

def _hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers' LlamaForCausalLM name: the export's map. A variant that
    Llama computes with other names is a line here; one that Llama cannot compute needs another
    architecture (beyond_llama, hf_config, model_config and read_weights with it; docs/forking.md)."""
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
# Every format has these; a ModelConfig field not here is a variant's, which Llama cannot express.
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


def beyond_llama(config: ModelConfig) -> list[str]:
    """What makes this model one that transformers' Llama does not compute, as "model.field=value":
    the fields that a Llama config.json has no key for (a variant's, in model.py) and that are off
    their defaults, which are the Llama architecture. None: the Llama export holds the model."""
    return [f"model.{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
            if f.name not in HF_FIELDS and getattr(config, f.name) != f.default]


def export_hf(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path):
    """config.json and model.safetensors: the Hugging Face Llama export where Llama expresses the
    model (transformers loads it as is); else pico's own format, pico-train's: model_type
    "pico_decoder" with every ModelConfig field, the weights under "pico_decoder." and their module
    names, which PicoDecoder.from_pretrained loads and transformers cannot (no custom code is shipped)."""
    if beyond_llama(config):
        (directory / "config.json").write_text(json.dumps(
            {"model_type": "pico_decoder", **dataclasses.asdict(config)}, indent=2) + "\n")
        save_file({PICO_PREFIX + name: w.detach().to("cpu", torch.float32).contiguous() for name, w in state.items()},
                  directory / "model.safetensors", metadata={"format": "pt"})
        return
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
    with torch.device("meta"):  # shapes only, no memory
        shapes = {k: v.shape for k, v in PicoDecoder(config).state_dict().items()}
    names, ignored = _hf_names(config.n_layers), set()
    if model_type == "pico_decoder":  # pico-train's: our names under "pico_decoder.", RoPE as ours
        names = {ours: PICO_PREFIX + ours for ours in shapes}
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
            raise CheckpointError(f"{index}: cannot be read ({describe_error(e)}); expected "
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
            raise CheckpointError(f"{path}: cannot be read ({describe_error(e)})") from None
        tensors |= part
        origin = {**dict.fromkeys(part, path), **origin}
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


def model_config(cfg: dict, source: str) -> ModelConfig:
    """The decoder's config from a config.json: pico's own format (pico-train's and a variant's:
    our field names) or a Llama's (HF_FIELDS). The fields of HF_FIELDS are required in both; any
    other (a variant's) is read where the file has it, else its default, which is what a Llama is.
    Each value is checked against its ModelConfig type. A shape the decoder cannot have is refused
    naming the checkpoint's field: heads that do not divide d_model, ...; in a Llama also biases,
    another activation, scaled RoPE, its own head_dim."""
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
    hints, values = typing.get_type_hints(ModelConfig), {}
    for field in dataclasses.fields(ModelConfig):
        key, required = fields.get(field.name, field.name), field.name in HF_FIELDS
        if key not in cfg or llama and not required:
            if required:
                raise CheckpointError(f"{source}: field {key} is missing")
            continue  # a variant's field: Llama has no such key, pico-train's configs predate it
        try:
            values[field.name] = typed(cfg[key], hints[field.name])
        except ValueError as e:
            raise CheckpointError(f"{source}: {key}={json.dumps(cfg[key])}: {e}") from None
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


# What from_pretrained reads of a Hub repo: the top level only, where a repo may hold other files
# (pico-train's training state, a run's records, ...)
WEIGHT_FILES = ["config.json", "model.safetensors.index.json", "model*.safetensors"]


def locate_pretrained(path_or_repo_id: str, revision: str | None = None,
                      files: list[str] = WEIGHT_FILES) -> tuple[Path, str]:
    """A checkpoint's directory, and its name for messages: path_or_repo_id, or a snapshot of a Hub
    model repo ("namespace/name", "@revision": pico-train publishes each step as a revision; pico tags
    it too, records.hub_tag) in the Hugging Face cache, which HF_HUB_OFFLINE=1 reads: its `files`
    (snapshot_download's patterns). Errors name the repo, never the token."""
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id), path_or_repo_id
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    repo_id = path_or_repo_id
    if revision is None and "@" in repo_id:
        repo_id, revision = repo_id.rsplit("@", 1)
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        # with a progress bar: a model can be gigabytes
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files)), name
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
        raise CheckpointError(f"{cfg_path}: cannot be read ({describe_error(e)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of config fields")
    config = model_config(cfg, str(cfg_path))
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


# Training checkpoints ------------------------------------------------------------------------

def save_array(path: Path, array: np.ndarray | dict[str, np.ndarray]):
    """A NumPy array as an .npy file, or a dict of them as an .npz file (np.load reads either),
    replaced whole or not at all (write_atomically)."""
    content = io.BytesIO()
    if isinstance(array, dict):
        np.savez(content, **array)
    else:
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
    """A fast checksum (2 GB/s on the README's 2-core AMD EPYC) that finds damaged bytes a file's size cannot."""
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
            _install(tmp, final)
        barrier()  # no rank goes on (or exits on a stop signal) before the checkpoint is complete
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # a full disk, most often
        if writer:  # rank 0's alone to remove: another rank's removal could race its rename
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint must not hold the space
        if lost_peer(e):  # another rank was lost mid-save: the training loop says so
            raise
        previous = latest_checkpoint(checkpoints_dir)
        needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file()) if previous else 0
        raise CheckpointError(f"{tmp}: could not be written ({describe_error(e)}); "
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


def _install(tmp: Path, final: Path):
    """A checkpoint complete in tmp renamed into place, then `latest` pointed at it. The same step
    saved again (a resumed run re-saving it) is replaced whole, the old one kept aside until then."""
    _fsync(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _point_latest(final.parent, final.name)


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
                              f"({describe_error(e)})") from None
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
    try:  # which of the two formats export_hf wrote
        model_type = json.loads((directory / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: cannot be read ({describe_error(e)})") from None
    state = {"model": read_weights(directory, config, model_type)}
    path = directory / "training_state.pt"
    try:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # torch raises many kinds of errors for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({describe_error(e)})") from None
    if not any(name.startswith("optimizer/") for name in manifest["files"]):
        raise CheckpointError(f"{directory}: holds no optimizer state (checkpointing."
                              f"keep_last_n_optimizer_states dropped it); expected optimizer/")
    return state


def restore_checkpoint(directory: Path, state: dict, model: PicoDecoder, optimizer, scheduler):
    """Apply read_checkpoint's state (its weights are in the model already, loaded before DDP or
    FSDP wrapped it); each rank reads its part of the optimizer state, resharded to this world.

    What an exact resume needs, and where each part comes from:
      the step              training_state.pt's "step" (train.open_run: the run's start_step)
      the weights           model.safetensors, read whole by read_checkpoint, loaded by train.build
      AdamW's moments       optimizer/, here
      the learning rate     a function of the step (train.lr_lambda): the scheduler's state is
                            restored here, then train.build sets the lr from the config's schedule
      the data position     a function of the step (data.rank_rows); training_state.pt's
                            "data_position" is written for readers (pico-train has it), never read
      random numbers        training draws none (the data order and the evaluation's rows are
                            seeded, the initialisation is overwritten); the states are restored
                            here for a fork that adds some, rank 0's on every rank
      the monitoring        training_state.pt's "run_state": the loss-spike window
                            (train.LossSpikes) and the probe's rows (evaluation.py)
      the records           records.Records drops metrics.jsonl's records after the step;
                            evaluation.Evaluation skips the measurements already written
      the same config       config.check_resume_compatible refuses another model or batch, and
                            names the schedule keys that changed"""
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # the layout to read into
    try:
        _dcp(dcp.load, optimizer_state, directory / "optimizer")
    except (Exception, dcp.api.CheckpointException) as e:  # a damaged shard, another model; the
        # latter is a BaseException, which `except Exception` would let through as a traceback
        raise CheckpointError(f"{directory / 'optimizer'}: cannot be read ({describe_error(e)})") from None
    set_optimizer_state_dict(model, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():  # saved on a node that may have had more GPUs
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


# Branches (checkpointing.training.branch_from): a new run that goes on from another's checkpoint ------

# What a branch reads of a checkpoint on the Hub, uploaded at step_N/'s paths with
# hf_checkpoint.upload_optimizer; and the run's training_config.yaml, which is beside it there
CHECKPOINT_FILES = [MANIFEST, "config.json", "model.safetensors", "training_state.pt", "optimizer/*",
                    "learning_dynamics/*", "training_config.yaml", *data.TOKENIZER_FILES]


def branch_point(config, runs_dir: Path) -> Path:
    """The checkpoint that checkpointing.training.branch_from names: RUN/checkpoints/step_N (a path,
    or one under runs_dir) or a Hub model repo@revision that holds one, whose run's
    training_config.yaml is beside its checkpoints/ (on the Hub: beside it). Checked complete (sizes;
    read_checkpoint checks the bytes) and against the config (config.branch_changes), then the
    branch's lineage is set in the config. A refusal is one line naming the key: nothing is written."""
    source = config.checkpointing.training.branch_from
    key = f"checkpointing.training.branch_from={source!r}"
    local = next((path for path in (Path(source), runs_dir / source) if path.is_dir()), None)
    for path in [] if local else (Path(source), runs_dir / source):
        if path.parent.name == "checkpoints" and (steps := step_directories(path.parent)):
            raise ConfigError(f"{key}: {path.parent} holds no {path.name}; expected one of its checkpoints: "
                              f"{', '.join(step.name for step in steps)}")
    try:
        directory = local or locate_pretrained(source, files=CHECKPOINT_FILES)[0]
        if not local and not (directory / MANIFEST).is_file():
            raise CheckpointError(f"{source} holds no training state ({MANIFEST}, optimizer/, training_state.pt); "
                                  f"expected a run uploaded with checkpointing.hf_checkpoint.upload_optimizer=True")
        step = check_complete(directory, checksums=False)["step"]
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    beside = directory.resolve().parent.parent if local else directory
    parent = read_run_config(beside / "training_config.yaml", f"the config of the run of {source}")
    changed = branch_changes(config, parent, step, source)
    # The data before this step is the parent's: a change of data or order (at this step, or at the
    # parent's own branch point) splices it in (data.training_rows)
    was = {name: saved_value(parent, f"data.{path}") for name, path in (
        ("name", "dataset.name"), ("seed", "seed"), ("order_seed", "order_seed"))}
    now = {"name": config.data.dataset.name, "seed": config.data.seed, "order_seed": config.data.order_seed}
    before = (saved_value(parent, "checkpointing.training.lineage") or {}).get("data_before", [])
    resolved = str(directory.resolve()) if local else f"{source.rsplit('@', 1)[0]}@{directory.name}"
    config.checkpointing.training.lineage = {
        "source": resolved, "parent_run": saved_value(parent, "checkpointing.run_name"), "parent_step": step,
        "changed": changed, "data_before": list(before) + ([{"until_step": step, **was}] if was != now else [])}
    return directory


def adopt(source: Path, checkpoints_dir: Path) -> Path:
    """A branch's first checkpoint: its parent's (source) made checkpoints/step_N of the branch, each
    file hard-linked where the file system allows (a checkpoint's files are replaced whole, never
    written in place, so the two runs never change each other's), else copied; then installed as
    save_checkpoint installs one. Rank 0's."""
    manifest = check_complete(source, checksums=False)
    final = checkpoints_dir / f"step_{manifest['step']}"
    tmp = checkpoints_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in [*manifest["files"], MANIFEST]:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        origin = (source / name).resolve()  # a Hub snapshot's files are links to the cache's blobs
        try:
            os.link(origin, tmp / name)
        except OSError:  # another file system
            shutil.copy2(origin, tmp / name)
            _fsync(tmp / name)
    for directory in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        _fsync(directory)
    _install(tmp, final)
    return final


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
