"""Time one training step of PicoDecoder against transformers' LlamaForCausalLM of the same shape.

    python bench.py [--model tiny] [--batch-size 4] [--seq-len 256] [--compile] [--rounds 10]
    python bench.py --all        # tiny and small, eager and compiled: one markdown table

A step is forward, loss, backward, AdamW step and zero_grad, on random tokens. Both models are
built in this process from the same ModelConfig (weights differ, shapes and parameter counts do
not), in float32 on CPU, under bf16 autocast with float32 weights and fused AdamW on CUDA. The
timed steps alternate between the two models, so machine noise (other jobs, clock changes,
thermal throttling) falls on both alike; each figure is the median over the rounds.

ratio = transformers ms / pico ms: above 1 pico is faster, below 1 slower. MFU (CUDA only) is
training FLOPs per token (PicoDecoder.flops_per_token) x tokens/s over the device's bf16 peak.

    python bench.py --data [--data-steps 32]

The data path instead: tokens/s of data.BatchStream handing over consecutive global batches of
pico's shape (1024 rows of 2049 tokens) with nothing else running, from local Parquet shards and
from a dataset repo on a local stand-in for the Hub (downloads included, starting cold).

    torchrun --nproc_per_node=N bench.py --scaling [--distributed ddp|fsdp] [--model small ...]

Scaling across processes: pico's training step with each process on its own batch of
--batch-size rows (weak scaling, as data parallelism is used), first in rank 0 alone with no
wrapper, then in all N processes under DDP or FSDP as train.py sets them up, in the same run.
efficiency = tokens/s of the N processes / (N x tokens/s of the one).

    python bench.py --tokenize [--text-mb 8] [--rounds 3] [--memory-mb 64] [--tokenizer NAME]

`data.py tokenize` (corpus.py) against the `tokenizers` library's own encode_batch of the same
documents (JSONL of this Python's standard library, pieces of modules) on the same cores,
interleaved: tokens/s of the whole command (check, tokenize in one worker per core, pack, shuffle,
write the shards) over those of encode_batch alone. Then the peak memory of the command on
--memory-mb of text and on 4 times as much, with the byte tokenizer and with the tokenizer.

    python bench.py --layer-stats [--model small] [--batch-size 4] [--seq-len 256]

The cost of monitoring.logging.layer_stats on a logging step: pico's training step with and
without train.LayerStats around its optimizer step, interleaved, in the same run. Steps that do
not log run no code of it at all.

    python bench.py --probe [--model small] [--batch-size 4] [--seq-len 256]

The training probe and memorization test at one checkpoint (evaluation.probe's defaults) as a
share of the 1,000 steps between two checkpoints: of --batch-size rows, and of the suite's 1,024
(the step's time scaled by rows); and loss-spike detection's cost per step (each step's loss
copied to the host and read during the next step), with and without it in interleaved blocks of
steps.

    python bench.py --measure [paloma probe induction attention tasks] [--model tiny small ...]
                    [--seq-len 2048] [--val-rows 64]

What one checkpoint costs, for each size: its save, its learning-dynamics captures (on the step's
batch and on the evaluation rows) and each measurement of evaluation.py (all unless some are named),
at the config's defaults, each as a share of the 1,000 training steps between two checkpoints: of
--batch-size rows, and of the suite's 1,024 (the step and its batch's captures scaled by rows).
Random tokens; --val-rows rows in the evaluation set; tasks: the demo's builtin:python-syntax, byte
by byte. --seq-len 2048, the suite's, sizes induction's halves (256 tokens) and attention
entropy's rows as the suite has them. docs/measurements.md's table ("What the measurements cost") comes
from it.

    python bench.py --peak-memory [--model small] [--seq-len 2048] [--batch-size 16]

The peak resident memory of one evaluation batch (Paloma's 16 rows) and of one training
micro-batch (--batch-size rows, forward and backward) of each size, float32 on the CPU, each in a
process of its own, beside that of the process before it (the model, its gradients and AdamW's
state): what the chunked loss (model.OutputHead) bounds.

    python bench.py --memory --model xl --seq-len 2048 [--gpus 16] [--micro-batch 8]

Memory per GPU for a suite size, under DDP and under FSDP over --gpus GPUs, with and without
training.activation_checkpointing: the states from the parameter count (float32 weights,
gradients, DDP's gradient buckets, AdamW's two moments), the activations a micro-batch keeps for
the backward measured here (the bytes of every tensor autograd saves, under bf16 autocast, for
models of 1 and 2 blocks at two lengths, extrapolated to the size's 12 blocks and --seq-len).
Eager figures: compiled code keeps less around the float32 logits; allocator slack not counted.

    python bench.py --train [--model tiny small ... | --all-sizes] [--seq-len 2048]
                            [--attention default flash cudnn efficient math] [--micro-batch 16 32 ...]
                            [--ddp-graph per-bucket one per-block] [--deterministic off on]

The trainer's own training step: each size's config file (configs/pico-decoder-SIZE.py, with its
micro-steps per optimizer step), set up by train.setup (compiled and bf16-mixed on CUDA), built by
train.build and train.parallelize under DDP in a process group of one (as a single-GPU run under
torchrun --nproc_per_node=1), each step the lines of train.py's loop for a step that neither logs
nor checkpoints: train.train_step, the read of the step before's loss for spike detection, AdamW,
the lr schedule. Random tokens. Rows per step: on CUDA the suite's per GPU (the global batch over 16
GPUs: 64 rows of 2048 tokens in 4 micro-steps, xl 8), on CPU 4 micro-steps of 2 rows of 256. Each
size once per variant, so that the variants compare in one run: per --attention backend
(torch.nn.attention.sdpa_kernel held around its every step, compilation included), per --micro-batch
(the same rows per step in fewer, larger micro-steps), per --ddp-graph (DDP_GRAPHS), per --deterministic
(training.deterministic off or on: train.deterministic_kernels; cuBLAS reads its workspace setting
at its first call, so with "on" among them it is set for the whole run, both variants). A variant that
cannot run (a backend that cannot run the shape, a micro-batch out of memory) is a row that says
why. Each row is printed as it is measured, then the tables whole. Per size: tokens/s over --rounds
consecutive steps after --warmup untimed, MFU as train.py logs it, peak memory (CUDA: allocated;
CPU: the process's peak resident set, all sizes so far), and one checkpoint's evaluation-side work
as train.Checkpoints runs it, one GPU's share in the suite (checkpoint_work: captures, evaluation
and the probe; --val-rows the evaluation set's rows), as a share of the 1,000 steps between two
checkpoints. Then a profiled window of --rounds steps (3 at most) by kind of work (KERNEL_CLASSES):
device kernels on CUDA, with idle = wall time when no kernel runs; on CPU the ops' own (self) CPU
time, with idle = time in no op. Kernels that run at once on two streams (DDP's all-reduce beside
the backward) can make the shares add up to more than 100%.
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from huggingface_hub import constants
from torch.nn.attention import SDPBackend, sdpa_kernel

import checkpoint
import data
import distributed
import evaluation
import train
from config import Config, load_config
from model import SUITE, ModelConfig, PicoDecoder


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; "
            f"torch {torch.__version__}" + (f", transformers {sys.modules['transformers'].__version__}"
                                             if "transformers" in sys.modules else ""))


def shape(name: str, seq_len: int) -> ModelConfig:
    """A suite size's model, or the demo's (configs/local.py), at seq_len tokens."""
    if name == "demo":
        config = load_config(str(Path(__file__).resolve().parent / "configs" / "local.py"), []).model
        return dataclasses.replace(config, max_seq_len=seq_len)
    return ModelConfig(**SUITE[name], max_seq_len=seq_len)


def build(name: str, seq_len: int, device: torch.device):
    """The two models of size `name` (shape()), each with its own AdamW."""
    config = shape(name, seq_len)
    torch.manual_seed(0)
    pico = PicoDecoder(config).to(device)
    import transformers  # the reference: imported where it is compared, not by every mode

    transformers.logging.set_verbosity_error()
    hf_config = transformers.LlamaConfig(**checkpoint.hf_config(config), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config).to(device)
    n_pico, n_hf = pico.num_params(), sum(p.numel() for p in hf.parameters())
    if n_pico != n_hf:
        raise SystemExit(f"--model {name}: pico has {n_pico:,} parameters, transformers {n_hf:,}: "
                         f"expected the same shape")
    print(f"{name}: {n_pico:,} parameters in both models", flush=True)
    fused = device.type == "cuda"
    return [(model.train(), torch.optim.AdamW(model.parameters(), fused=fused))
            for model in (pico, hf)]


def pico_loss(model, tokens):
    return model(tokens[:, :-1], tokens[:, 1:])[1]  # our labels are the next tokens, unshifted


def hf_loss(model, tokens):
    # transformers shifts labels itself. use_cache=False: training builds no KV-cache.
    inputs = tokens[:, :-1]
    return model(input_ids=inputs, labels=inputs, use_cache=False).loss


def step(model, optimizer, loss_fn, tokens, device) -> float:
    """One training step; its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()  # time this step only, not kernels still queued from the last
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = loss_fn(model, tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def untimed_steps(args, use_compile: bool) -> int:
    """Steps run before timing: compilation, allocator and optimizer-state set-up happen there."""
    return max(args.warmup, 3) if use_compile else args.warmup


def bench(name: str, use_compile: bool, args, device: torch.device) -> str:
    """Time both models of one configuration; its markdown table row."""
    (pico, pico_opt), (hf, hf_opt) = build(name, args.seq_len, device)
    flops_per_token = pico.flops_per_token(args.seq_len)  # the same shape: the same for both
    if use_compile:
        pico, hf = torch.compile(pico), torch.compile(hf)
    runs = [(pico, pico_opt, pico_loss, []), (hf, hf_opt, hf_loss, [])]
    vocab = pico.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
    for model, optimizer, loss_fn, _ in runs:
        for _ in range(untimed_steps(args, use_compile)):
            step(model, optimizer, loss_fn, tokens, device)
    for r in range(args.rounds):
        # Swap who goes first every round, so neither always runs on a cache the other warmed.
        for model, optimizer, loss_fn, times in (runs if r % 2 == 0 else runs[::-1]):
            times.append(step(model, optimizer, loss_fn, tokens, device))
    pico_s, hf_s = (statistics.median(times) for *_, times in runs)
    tokens_per_step = args.batch_size * args.seq_len
    row = [name, "compiled" if use_compile else "eager", device.type,
           f"{pico_s * 1e3:.1f}", f"{hf_s * 1e3:.1f}", f"{hf_s / pico_s:.2f}",
           f"{tokens_per_step / pico_s:,.0f}"]
    peak = train.peak_flops(device)
    if peak:
        row += [f"{flops_per_token * tokens_per_step / s / peak:.1%}" for s in (pico_s, hf_s)]
    else:
        row += ["-", "-"]
    return "| " + " | ".join(row) + " |"


def write_token_shards(directory: Path, rows: int, rows_per_shard: int, row_len: int, vocab: int):
    """Shards of random token ids laid out as pretokenized-dolma's: data/train-XXXXX-of-N.parquet."""
    rng = np.random.default_rng(0)
    n = -(-rows // rows_per_shard)
    (directory / "data").mkdir(parents=True)
    for k in range(n):
        count = min(rows_per_shard, rows - k * rows_per_shard)
        offsets = pa.array(np.arange(0, count * row_len + 1, row_len, dtype=np.int32))
        ids = pa.array(rng.integers(0, vocab, count * row_len, dtype=np.int32))
        pq.write_table(pa.table({data.COLUMN: pa.ListArray.from_arrays(offsets, ids)}),
                       directory / "data" / f"train-{k:05d}-of-{n:05d}.parquet",
                       row_group_size=data.ROWS_PER_ROW_GROUP)


def stream_tokens_per_s(shards, global_batch: int, steps: int, started: float) -> float:
    """Tokens/s of a BatchStream reading `steps` global batches, timed from `started`."""
    stream = data.BatchStream(shards, global_batch, 1, 0, start_step=0, end_step=steps)
    try:
        tokens = sum(next(stream).numel() for _ in range(steps))
    finally:
        stream.close()
    return tokens / (time.perf_counter() - started)


def bench_data(steps: int, rows_per_shard: int = 4096, global_batch: int = 1024, row_len: int = 2049,
               vocab: int = 50304):
    # The stand-in Hub is test code (tests/hub_server.py); bench.py borrows it rather than keep a
    # second copy, so the figure is measured against the same server the tests check.
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
    from hub_server import HubServer, client_config

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_token_shards(repo, steps * global_batch, rows_per_shard, row_len, vocab)
        n_shards = len(list((repo / "data").iterdir()))
        size = sum(p.stat().st_size for p in (repo / "data").iterdir())
        results = []
        started = time.perf_counter()
        local = data.open_dataset(str(repo / "data"), row_len, vocab)
        results.append(("local shards", stream_tokens_per_s(local, global_batch, steps, started)))
        with HubServer() as hub:
            env, values = client_config(hub.endpoint, Path(tmp) / "hf-cache")
            os.environ.update(env)
            for key, value in values.items():
                setattr(constants, key, value)
            hub.add_repo("bench/tokens", repo)
            started = time.perf_counter()
            remote = data.open_dataset("bench/tokens", row_len, vocab, max_cached_shards=2)
            results.append(("stand-in Hub, cold cache, max_cached_shards=2",
                            stream_tokens_per_s(remote, global_batch, steps, started)))
    print(f"\nMachine: {machine(torch.device('cpu'))}. {steps} global batches of {global_batch} x "
          f"{row_len} tokens through data.BatchStream, from {n_shards} shards of {rows_per_shard} rows "
          f"({size / 1e6:.0f} MB of Parquet).\n")
    print("| source | tokens/s |\n|---|---:|")
    for source, tokens_per_s in results:
        print(f"| {source} | {tokens_per_s:,.0f} |")


def bench_text(path: Path, megabytes: float, seed: int = 0) -> list[str]:
    """JSONL of about `megabytes` of documents (path) made of this Python's standard library: each
    document a module's lines, cut at random line breaks into pieces of 1 to 200 lines (about the
    length of a web page), in random order. Returns the documents."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for p in sorted(root.rglob("*.py"))[:400] for line in p.read_text(errors="replace").split("\n")]
    rng, texts, size = np.random.default_rng(seed), [], 0
    while size < megabytes * 1e6:
        start = int(rng.integers(len(lines)))
        texts.append("\n".join(lines[start:start + int(rng.integers(1, 200))]))
        size += len(texts[-1]) + 1
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return texts


def peak_memory_mb(command: list[str]) -> float:
    """The peak memory of a command and the processes it starts, sampled every 20 ms: the sum of
    their proportional set sizes (Linux's Pss: a page that n processes share counts 1/n in each,
    so forked workers are not counted n times over, as their resident sizes would be)."""
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        tree, grown = {process.pid}, True
        while grown:
            grown = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= grown
        total = 0
        for pid in tree:
            with contextlib.suppress(OSError, StopIteration, ValueError):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                total += int(next(line for line in rollup if line.startswith("Pss:")).split()[1])
        peak = max(peak, total)
        time.sleep(0.02)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
    return peak / 1024


def bench_tokenize(args):
    """`data.py tokenize` (corpus.build_corpus, in this process: every pass, writing the shards too)
    against the `tokenizers` library's own encode_batch of the same documents on the same cores,
    interleaved; then the peak memory of the command (peak_memory_mb) on inputs of two sizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import corpus

    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # encode_batch on every core (corpus's workers use one each)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = bench_text(tmp / "text.jsonl", args.text_mb)
        if args.tokenizer:
            name = args.tokenizer
        else:  # a byte-level BPE of 32,000 ids trained here: no download
            bpe = Tokenizer(models.BPE())
            bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
            bpe.train_from_iterator(texts[:2000], trainers.BpeTrainer(
                vocab_size=32000, special_tokens=["<|endoftext|>"], show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
            bpe.save(str(tmp / "tokenizer.json"))
            name = str(tmp / "tokenizer.json")
        tokenizer = corpus.text_tokenizer(name)
        reference, inputs = Tokenizer.from_str(tokenizer.json), corpus.corpus_inputs([str(tmp / "text.jsonl")])
        tokens = sum(len(encoding.ids) + 1 for encoding in reference.encode_batch(texts[:200]))  # warm-up
        times = {"pico": [], "tokenizers": []}
        for r in range(args.rounds):
            for run in (["tokenizers", "pico"] if r % 2 == 0 else ["pico", "tokenizers"]):
                started = time.perf_counter()
                if run == "pico":
                    record = corpus.build_corpus(inputs, tokenizer, 2048, tmp / f"corpus-{r}", workers=cores,
                                                 show=False)
                else:
                    tokens = sum(len(encoding.ids) + 1 for encoding in reference.encode_batch(texts))
                times[run].append(time.perf_counter() - started)
        assert record["splits"]["train"]["rows"] > 0
        speed = {run: tokens / statistics.median(seconds) for run, seconds in times.items()}
        print(f"\nMachine: {machine(torch.device('cpu'))}, {cores} cores. {len(texts):,} documents, "
              f"{args.text_mb:g} MB of text, {tokens:,} tokens with {name} ({tokenizer.vocab_size:,} ids); "
              f"median of {args.rounds} interleaved rounds.\n")
        print("| run | tokens/s | ratio |\n|---|---:|---:|")
        print(f"| tokenizers' encode_batch, {cores} threads | {speed['tokenizers']:,.0f} | 1 |")
        print(f"| data.py tokenize, {cores} workers: read, check, tokenize, pack, shuffle, write | "
              f"{speed['pico']:,.0f} | {speed['pico'] / speed['tokenizers']:.2f} |")

        rows = []
        for scale in (1, 4) if args.memory_mb else ():  # memory: the command on a text 4 times larger
            source, out = tmp / f"memory-{scale}.jsonl", tmp / f"memory-corpus-{scale}"
            bench_text(source, scale * args.memory_mb, seed=scale)
            for name, workers in (("bytes", 1), (str(tmp / "tokenizer.json") if not args.tokenizer else name, cores)):
                command = [sys.executable, "data.py", "tokenize", str(source), "--tokenizer", name, "--seq-len",
                           "2048", "--out", str(out / name.replace("/", "-")), "--workers", str(workers)]
                rows.append(f"| {source.stat().st_size / 1e6:,.0f} MB | {Path(name).name} | {workers} | "
                            f"{peak_memory_mb(command):,.0f} MB |")
        if rows:
            print("\nPeak memory of `python data.py tokenize` and its workers (the sum of their Pss), seq_len "
                  "2048:\n")
            print("| JSONL | tokenizer | workers | peak memory |\n|---:|---|---:|---:|")
            print("\n".join(rows))


def bench_layer_stats(args, device: torch.device):
    (model, optimizer), _ = build(args.model, args.seq_len, device)
    stats = train.LayerStats(model)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

    def timed(with_stats: bool) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = pico_loss(model, tokens)
        loss.backward()
        before = stats.before() if with_stats else None
        optimizer.step()
        if with_stats:
            stats.after(before)
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start
    for _ in range(args.warmup):
        timed(False), timed(True)
    times = {False: [], True: []}
    for r in range(args.rounds):
        for with_stats in ((False, True) if r % 2 == 0 else (True, False)):
            times[with_stats].append(timed(with_stats))
    plain, logged = (statistics.median(times[k]) for k in (False, True))
    print(f"\nMachine: {machine(device)}. pico-decoder-{args.model}, {args.batch_size} x {args.seq_len} "
          f"tokens, median of {args.rounds} interleaved steps: {plain * 1e3:.1f} ms without, "
          f"{logged * 1e3:.1f} ms with per-layer statistics: +{logged / plain - 1:.1%} on a logging step.")


def bench_probe(args, device: torch.device):
    """The training probe with memorization at one checkpoint (evaluation.probe's defaults), against
    the 1,000 training steps between two checkpoints; and loss-spike detection, whose cost is
    the read of each step's loss: blocks of steps queued back to back, with and without it,
    interleaved."""
    (model, optimizer), _ = build(args.model, args.seq_len, device)
    probe = Config().evaluation.probe
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
    rows = list(np.random.default_rng(0).integers(0, vocab, (probe.rows, args.seq_len + 1)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def steps(n: int, spikes: train.LossSpikes | None) -> float:
        sync()
        start = time.perf_counter()
        for i in range(n):
            with autocast:
                loss = pico_loss(model, tokens)
            loss.backward()
            if spikes:  # as train.main(): the step before's loss, read once this step's work is queued
                spikes.read()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if spikes:
                spikes.watch(i + 1, loss, tokens)
        if spikes:
            spikes.read()
        sync()
        return (time.perf_counter() - start) / n

    def probe_time() -> float:
        sync()
        start = time.perf_counter()
        evaluation.evaluate(model, rows, probe.batch_size, device, autocast, byte_level=False)
        evaluation.memorization(model, rows, probe.memorization_prefix, probe.memorization_tokens,
                                probe.batch_size, device, autocast)
        sync()
        return time.perf_counter() - start
    steps(args.warmup, None), probe_time()
    times = {"plain": [], "spikes": [], "probe": []}
    for r in range(args.rounds):
        for name in (("plain", "spikes") if r % 2 == 0 else ("spikes", "plain")):
            spikes = train.LossSpikes(Config().monitoring.loss_spikes, {}) if name == "spikes" else None
            times[name].append(steps(5, spikes))
        if r < 3:
            times["probe"].append(probe_time())
    plain, spiky, probed = (statistics.median(times[k]) for k in ("plain", "spikes", "probe"))
    print(f"\nMachine: {machine(device)}. pico-decoder-{args.model}, {args.batch_size} x {args.seq_len} "
          f"tokens a step; probe of {probe.rows} rows, {probe.memorization_tokens} tokens decoded from "
          f"{probe.memorization_prefix}.\n")
    # A step of the suite's global batch (1,024 rows) takes 1,024 / --batch-size times this one.
    suite = Config().data.dataloader.batch_size / args.batch_size
    print("| step | step with spike detection | probe + memorization | probe / 1,000 steps | "
          f"probe / 1,000 steps of {Config().data.dataloader.batch_size} rows |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {plain * 1e3:,.1f} ms | {spiky * 1e3:,.1f} ms ({spiky / plain - 1:+.1%}) | "
          f"{probed * 1e3:,.0f} ms | {probed / (1000 * plain):.2%} | {probed / (1000 * plain * suite):.3%} |")


def bench_checkpoint(args, device: torch.device):
    """What one checkpoint costs, for each --model size: saving it (checkpoint.save_checkpoint), its
    learning-dynamics captures on the step's batch and on the evaluation rows, and each measurement
    of evaluation.MEASUREMENTS that --measure names (all by default), at the config's defaults; each
    against the 1,000 training steps between two checkpoints of --batch-size rows, and of the
    suite's 1,024 (the step and the captures of its batch scaled by rows). Under torchrun the suite
    splits the batch and every measurement's rows over its GPUs alike, so the shares hold there too.
    Random tokens: local shards (the probe's rows), --val-rows rows as the evaluation set (Paloma's
    and the captures'); tasks: the demo's builtin:python-syntax, byte by byte (a suite's BPE
    tokenizer makes its texts about 4 times shorter, BLiMP's 2,000 pairs about as long)."""
    suite_rows, val_rows = Config().data.dataloader.batch_size, args.val_rows or 64
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(work) -> float:
        sync()
        started = time.perf_counter()
        work()
        sync()
        return time.perf_counter() - started
    print(f"\nMachine: {machine(device)}. {args.seq_len} tokens a row, a step of {args.batch_size} rows "
          f"(median of {args.rounds}), {val_rows} evaluation rows.\n")
    print(f"| size | part | seconds | / 1,000 steps of {args.batch_size} rows | / 1,000 steps of {suite_rows} rows |")
    print("|---|---|---:|---:|---:|")
    for name in args.model:
        torch.manual_seed(0)
        model = PicoDecoder(shape(name, args.seq_len)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda")
        config, vocab = Config(), model.config.vocab_size
        config.model = model.config
        config.evaluation.metrics = args.measure or list(evaluation.MEASUREMENTS)
        config.training.max_steps, config.data.dataloader.batch_size = 1, suite_rows  # the probe's rows
        config.data.tokenizer.name, config.evaluation.tasks.names = "bytes", ["builtin:python-syntax"]
        ld = config.checkpointing.learning_dynamics
        tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
        with tempfile.TemporaryDirectory() as tmp:
            write_token_shards(Path(tmp) / "train", suite_rows, suite_rows, args.seq_len + 1, vocab)
            write_token_shards(Path(tmp) / "eval", val_rows, suite_rows, args.seq_len + 1, vocab)
            config.evaluation.paloma.dataset_name = str(Path(tmp) / "eval" / "data")
            shards = data.open_dataset(str(Path(tmp) / "train" / "data"), args.seq_len + 1, vocab)
            eval_sets = data.EvalSets(args.seq_len + 1, vocab)
            evaluated = evaluation.Evaluation(evaluation.Start(config, shards, eval_sets, {}), Path(tmp))
            measures = list(zip(evaluated.names, evaluated.measures))
            val = evaluation.evaluation_set(evaluation.Start(config, shards, eval_sets, {}))
            at = evaluation.At(1000, config, device, autocast)

            def train_step():
                with autocast:
                    loss = pico_loss(model, tokens)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for _ in range(args.warmup):
                train_step()
            for _, (measure, rows) in measures if device.type == "cuda" else []:  # kernels' first launches
                measure(model, rows, at)
            step_s = statistics.median(seconds(train_step) for _ in range(args.rounds))
            captures = {}
            costs = {  # part: (seconds, whether it grows with the step's rows)
                "captures, the step's batch": (seconds(lambda: captures.update(checkpoint.learning_dynamics(
                    model, tokens[None], None, ld, device, autocast))), True),
                "captures, the evaluation rows": (seconds(lambda: captures.update(checkpoint.learning_dynamics(
                    model, tokens[None], val, dataclasses.replace(ld, capture_train=False), device, autocast))), False)}
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1.0)
            costs["save"] = (seconds(lambda: checkpoint.save_checkpoint(
                Path(tmp) / "checkpoints", 1000, model, optimizer, scheduler, 0, learning_dynamics=captures)), False)
            costs.update({measured: (seconds(lambda: measure(model, rows, at)), False)
                          for measured, (measure, rows) in measures})
        scale = suite_rows / args.batch_size
        costs["all"] = (sum(s for s, _ in costs.values()), False)
        suite_all = sum(s * (scale if grows else 1) for part, (s, grows) in costs.items() if part != "all")
        print(f"| {name} | one training step | {step_s:,.3f} | | |")
        for part, (cost, grows) in costs.items():
            suite = suite_all if part == "all" else cost * (scale if grows else 1)
            print(f"| {name} | {part} | {cost:,.2f} | {cost / (1000 * step_s):.3%} | "
                  f"{suite / (1000 * step_s * scale):.4%} |", flush=True)


def bench_peak_memory(args):
    """The peak resident memory of one evaluation batch (evaluation.evaluate, Paloma's batch of 16
    rows) and of one training micro-batch (forward and backward of --batch-size rows) of each
    --model size at --seq-len, float32 on the CPU: each in a process of its own, whose peak
    (ru_maxrss) is its alone, less that of the same process before the batch (the model, its
    gradients and AdamW's state, and PyTorch itself)."""
    print(f"\nMachine: {machine(torch.device('cpu'))}. {args.seq_len} tokens a row, float32.\n")
    print("| size | work | rows | process before | peak | the batch's own |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.model:
        for work, rows in (("evaluation", 16), ("training micro-batch", args.batch_size)):
            result = subprocess.run([sys.executable, __file__, "--peak-memory-of", work, "--model", name,
                                     "--seq-len", str(args.seq_len), "--batch-size", str(rows)],
                                    capture_output=True, text=True)
            if result.returncode != 0:  # -9: the kernel's OOM killer, most often
                why = f"exited {result.returncode}" + (" (out of memory?)" if result.returncode == -9 else "")
                print(f"| {name} | {work} | {rows} | | {why} | |", flush=True)
                continue
            before, peak = map(int, result.stdout.split())
            print(f"| {name} | {work} | {rows} | {before / 1e9:.2f} GB | {peak / 1e9:.2f} GB | "
                  f"{(peak - before) / 1e9:.2f} GB |", flush=True)


def peak_memory_of(work: str, args):
    """bench_peak_memory's measurement, in this process: prints the peak before and after (bytes)."""
    torch.manual_seed(0)
    model = PicoDecoder(shape(args.model, args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters())
    rows = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1))
    pico_loss(model, rows[:1]).backward()  # gradients and AdamW's state exist, as in a run
    optimizer.step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if work == "evaluation":
        evaluation.evaluate(model, list(rows), args.batch_size, torch.device("cpu"), contextlib.nullcontext(),
                            byte_level=False)
    else:
        pico_loss(model, rows).backward()
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def saved_bytes(config: ModelConfig, tokens: int, checkpoint_blocks: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward of one row of `tokens` tokens (bf16
    autocast, on the CPU), weights and their bf16 copies included."""
    torch.manual_seed(0)
    model = PicoDecoder(config)
    model.checkpoint_blocks = checkpoint_blocks
    kept = {}  # storage address: bytes; a tensor saved twice is counted once

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    ids = torch.randint(0, config.vocab_size, (1, tokens + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(ids[:, :-1], ids[:, 1:])
    return sum(kept.values())


def bench_memory(args):
    gb = 1e9
    full = ModelConfig(**SUITE[args.model], max_seq_len=args.seq_len)
    with torch.device("meta"):
        params = PicoDecoder(full).num_params()
    # float32 weights and gradients and AdamW's two moments (16 B per parameter), and under DDP its
    # gradient buckets (4 more); FSDP shards all of it over the GPUs
    ddp_states, fsdp_states = 20 * params / gb, 16 * params / gb / args.gpus
    block_params = (params - 2 * full.vocab_size * full.d_model) / full.n_layers
    # FSDP gathers bf16 weights: a block or two at a time, and the output layer, never resharded
    fsdp_gathered = 2 * (2 * block_params + full.vocab_size * full.d_model) / gb
    print(f"\npico-decoder-{args.model}: {params:,} parameters; micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens per GPU; FSDP over {args.gpus} GPUs. GB per GPU:\n")
    print("| activation checkpointing | activations | DDP, in all | FSDP, in all |")
    print("|---|---:|---:|---:|")
    for checkpoint_blocks in (False, True):
        per_token = {}
        for n_layers in (1, 2):
            small = ModelConfig(**SUITE[args.model], max_seq_len=256, n_layers=n_layers)
            short, long = (saved_bytes(small, t, checkpoint_blocks) for t in (128, 256))
            per_token[n_layers] = (long - short) / 128  # the part that grows with the tokens: no weights
        per_block = per_token[2] - per_token[1]
        activations = (per_token[1] + (full.n_layers - 1) * per_block) * args.micro_batch * args.seq_len / gb
        # Under autocast, DDP keeps each block's bf16 weight copies for the backward too.
        copies = 0 if checkpoint_blocks else 2 * block_params * full.n_layers / gb
        ddp = ddp_states + copies + activations
        fsdp = fsdp_states + fsdp_gathered + activations
        print(f"| {'on' if checkpoint_blocks else 'off'} | {activations:.1f} | {ddp:.1f} | {fsdp:.1f} |")
    print(f"\nStates: DDP {ddp_states:.1f} GB, FSDP {fsdp_states:.2f} GB; FSDP's gathered bf16 weights "
          f"{fsdp_gathered:.1f} GB.")


def bench_scaling(args):
    """Under torchrun: tokens/s per process of one process alone and of all of them together."""
    config = Config()
    config.model = ModelConfig(**SUITE[args.model], max_seq_len=args.seq_len)
    config.training.distributed, config.training.compile = args.distributed, args.compile
    env = train.setup(config)  # as train.py sets it up: device, precision, rank
    distributed.start(config.training.backend, env.device, config.training.distributed == "fsdp")
    rank, world_size, device = env.rank, env.world_size, env.device
    tokens = torch.randint(0, config.model.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

    def tokens_per_s(wrap) -> float:
        """Of a fresh model wrapped by wrap(model) -> the module each step calls."""
        torch.manual_seed(0)
        model = PicoDecoder(config.model).to(device).train()
        step_model = wrap(model)
        optimizer = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda")
        for _ in range(untimed_steps(args, args.compile)):
            step(step_model, optimizer, pico_loss, tokens, device)
        times = [step(step_model, optimizer, pico_loss, tokens, device) for _ in range(args.rounds)]
        return args.batch_size * args.seq_len / statistics.median(times)

    alone = None
    if rank == 0:  # the reference, while the other processes wait
        alone = tokens_per_s(lambda model: torch.compile(model) if args.compile else model)
    torch.distributed.barrier()
    together = tokens_per_s(lambda model: train.parallelize(model, config, env)[0])
    per_rank = [None] * world_size
    torch.distributed.all_gather_object(per_rank, together)
    if rank == 0:
        mode = "compiled" if args.compile else "eager"
        print(f"\nMachine: {machine(device)}; {world_size} processes. pico-decoder-{args.model}, "
              f"{mode}, {args.batch_size} x {args.seq_len} tokens per process and step, median of "
              f"{args.rounds} steps after {args.warmup} untimed.\n")
        print("| processes | strategy | tokens/s, 1 process alone | tokens/s per process | "
              "tokens/s, all | efficiency |")
        print("|---:|---|---:|---:|---:|---:|")
        slowest = min(per_rank)  # the processes wait for each other every step
        print(f"| {world_size} | {args.distributed} | {alone:,.0f} | {slowest:,.0f} | "
              f"{slowest * world_size:,.0f} | {slowest / alone:.1%} |")
    torch.distributed.barrier()  # as train.py ends: no collective left in flight
    torch.distributed.destroy_process_group()


# --train's kinds of work, for a profiled window: each class's patterns, searched in a CUDA kernel's
# name or a CPU op's (case-insensitive). The first class that matches wins, so the order matters:
# cuDNN's and CUTLASS's attention kernels have gemm-like names, and the compiled loss's triton
# kernels are named after log_softmax. A triton kernel named after attention only moves data around
# it: inductor leaves attention itself to its own kernels. On CPU an op takes the class of its
# outermost caller that has one, so aten::mm under aten::linear is matmul and the elementwise ops
# of AdamW's loop (under Optimizer.step) are optimizer; any other aten op there is elementwise.
# Unmatched: "other" (copies, memsets, autograd's and DDP's Python bookkeeping).
KERNEL_CLASSES = {
    "communication": r"nccl|gloo|c10d|all_?reduce",
    "optimizer": r"adam|multi_tensor|_foreach_|optimizer\.",
    "attention": r"^(?!triton_).*(flash|fmha|attention|sdpa|scaled_dot_product)",
    "cross-entropy": r"cross_entropy|log_?softmax|nll_loss|softmax",
    "matmul": r"gemm|cutlass|xmma|sm90|nvjet|cublas|aten::(mm|addmm|bmm|matmul|linear)$",
    "elementwise": r"triton_|elementwise|reduce|cpp_fused|aten::",
}
CLASS_PATTERNS = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in KERNEL_CLASSES.items()}
# The suite trains on 16 GPUs: a GPU's rows per step are the global batch over 16.
SUITE_GPUS = 16
# --train: the suite's evaluation set, captured and evaluated at each checkpoint. 1,000 is the least
# pico-lm/pretokenized-paloma-tinsy's Hub card gives (1K-10K rows): --val-rows its count.
SUITE_EVAL_ROWS = 1000
PROFILE_STEPS = 3  # --train: the most steps in the profiled window (--rounds, if fewer)
# --train --attention: scaled_dot_product_attention held to one backend; "default": PyTorch's choice
SDPA_BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# --train --ddp-graph: how the compiled step's graphs meet DDP, and torch._dynamo's optimize_ddp for
# it. torch.compile of the DDP wrapper (train.py's) cuts the graph at each 25 MB gradient bucket by
# default, so that a bucket's all-reduce can start while the backward goes on; "one" graph fuses
# across the cuts, but its all-reduces all wait for the whole backward: one process measures what
# the cuts cost, not what they buy on several GPUs. "per-block": each block and the loss compiled on
# their own, as train.parallelize does under FSDP, and the DDP wrapper eager; a checkpoint's captures
# then run through the compiled blocks, whose hooks make them compile again.
DDP_GRAPHS = {"per-bucket": True, "one": False, "per-block": True}


@functools.cache  # a step runs the same few hundred kernels thousands of times
def kernel_class(name: str) -> str:
    return next((kind for kind, pattern in CLASS_PATTERNS.items() if pattern.search(name)), "other")


def op_class(event) -> str:
    """A CPU op's class: that of its outermost caller (or itself) that has one."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return next((kind for kind in map(kernel_class, reversed(names)) if kind != "other"), "other")


def covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) spans."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def profile_window(run_step, steps: int, device: torch.device) -> dict | None:
    """Shares of the wall time of `steps` consecutive steps by class, and idle; None when the
    profiler saw no CUDA kernel (no CUPTI)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On CUDA the kernels alone: recording every CPU op too would slow the host, which a small
    # model's step waits on, and inflate idle.
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as profiler:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    events = profiler.events()
    if cuda:
        busy = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)]  # a span the profiler marks, no kernel
        if not busy:
            return None
        times = [(kernel_class(e.name), e.time_range.elapsed_us()) for e in busy]
    else:
        busy = [e for e in events if e.cpu_parent is None]  # the outermost ops: in any op at all
        times = [(op_class(e), e.self_cpu_time_total) for e in events]
    shares = dict.fromkeys([*KERNEL_CLASSES, "other"], 0.0)
    for kind, us in times:
        shares[kind] += us / wall_us
    shares["idle"] = max(0.0, 1 - covered([(e.time_range.start, e.time_range.end) for e in busy]) / wall_us)
    return shares


def profile_steps(args) -> int:
    return min(args.rounds, PROFILE_STEPS)


def suite_config(name: str, args, cuda: bool, micro_batch: int | None) -> Config:
    """The size's config file, with one process's rows per step: on CUDA a GPU's of the suite, on
    CPU 2 rows per micro-step. Given micro_batch, the same rows in micro-steps of that many rows:
    fewer micro-steps, as a config's gradient_accumulation_steps would set them."""
    config = load_config(str(Path(__file__).resolve().parent / "configs" / f"pico-decoder-{name}.py"), [])
    optimization = config.training.optimization
    if cuda:
        rows = config.data.dataloader.batch_size // SUITE_GPUS
    else:
        rows = 2 * optimization.gradient_accumulation_steps
    if micro_batch is not None:
        if rows % micro_batch:
            raise ValueError(f"{rows} rows per step are no whole number of micro-batches of {micro_batch}")
        optimization.gradient_accumulation_steps = rows // micro_batch
    if args.seq_len is not None:
        config.model.max_seq_len = args.seq_len
    elif not cuda:
        config.model.max_seq_len = 256
    config.data.dataloader.batch_size = rows
    config.training.compile = True if args.compile else None  # None: train.py's, on for CUDA only
    config.evaluation.probe.rows = 0  # the probe is --probe's; without it a short --seq-len is valid
    return config


def join_group_of_one(env: train.Env):
    """A process group of one, as distributed.start makes for FSDP in one process, so that
    DDP wraps the model as in a run under torchrun --nproc_per_node=1."""
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    options = {"device_id": env.device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **options)


def loop_step(config: Config, env: train.Env, built: tuple, rows: torch.Tensor, finite: train.FiniteCheck,
              spikes: train.LossSpikes | None, step: int):
    """One pass of train.main()'s loop at a step that neither logs nor checkpoints."""
    model, step_model, wrapper, optimizer, scheduler = built
    accum = config.training.optimization.gradient_accumulation_steps
    batch = rows.to(env.device, non_blocking=True).view(accum, -1, config.model.max_seq_len + 1)
    loss = train.train_step(step_model, wrapper, batch, env.autocast)
    if spikes:  # on by default: the step before's loss, read while this step's work runs
        spikes.read()
    grad_norm = train.clip_gradients(model, config.training.optimization.max_grad_norm, False)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    finite.watch(step + 1, loss, grad_norm)
    if spikes:
        dist.all_reduce(loss)
        spikes.watch(step + 1, loss, batch)


def checkpoint_work(config: Config, env: train.Env, model: PicoDecoder, rows: torch.Tensor,
                    val_rows: int) -> float:
    """Seconds of one GPU's share of a checkpoint's evaluation-side work in the suite, as
    train.Checkpoints runs it on the unwrapped model (eager): the learning-dynamics captures on the
    step's batch and on the evaluation rows, evaluation.evaluate on those rows, then the training
    probe (evaluation.evaluate and evaluation.memorization, evaluation.probe's defaults). Each rank
    takes its block of the fixed rows (distributed.my_rows): here 1/SUITE_GPUS of val_rows and of
    the probe's."""
    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seq_len, probe = config.model.max_seq_len, Config().evaluation.probe
    # The first ranks' blocks are the larger ones: rounded up.
    val, probed = (list(torch.randint(0, config.model.vocab_size, (-(-n // SUITE_GPUS), seq_len + 1)))
                   for n in (val_rows, probe.rows))
    memorize = probe.memorization_tokens and probe.memorization_prefix + probe.memorization_tokens <= seq_len
    accum = config.training.optimization.gradient_accumulation_steps
    batch = rows.to(env.device).view(accum, -1, seq_len + 1)

    def once() -> float:
        sync()
        start = time.perf_counter()
        checkpoint.learning_dynamics(model, batch, val, config.checkpointing.learning_dynamics, env.device,
                                     env.autocast)
        evaluation.evaluate(model, val, config.evaluation.paloma.batch_size, env.device, env.autocast,
                            byte_level=False)
        evaluation.evaluate(model, probed, probe.batch_size, env.device, env.autocast, byte_level=False)
        if memorize:  # as evaluation.probe_rows: only where the prefix and the decoded tokens fit
            evaluation.memorization(model, probed, probe.memorization_prefix, probe.memorization_tokens,
                                    probe.batch_size, env.device, env.autocast)
        sync()
        return time.perf_counter() - start
    if cuda:  # the eager kernels' first launches (cuBLAS handles, autotuning): once a run, not a checkpoint
        once()
    return once()


def bench_train_size(name: str, args, attention: str = "default", micro_batch: int | None = None,
                     graph: str = "per-bucket", deterministic: bool = False) -> tuple[str, str, train.Env]:
    """One size's row of each --train table, and its Env, in one variant: attention, an SDPA
    backend (SDPA_BACKENDS) that every step is held to, compilation included, or PyTorch's own
    choice; micro_batch, rows per micro-step (None: the suite's); graph, how torch.compile cuts
    the DDP wrapper's graph (DDP_GRAPHS); deterministic, training.deterministic."""
    variant = [attention] if attention != "default" else []
    variant += [f"{graph} graph"] if graph != "per-bucket" else []
    variant += ["deterministic"] if deterministic else []
    label = f"{name} ({', '.join(variant)})" if variant else name
    with contextlib.ExitStack() as held:
        if attention != "default":
            held.enter_context(sdpa_kernel(SDPA_BACKENDS[attention]))
        held.enter_context(torch._dynamo.config.patch(optimize_ddp=DDP_GRAPHS[graph]))
        try:
            return measure_train_step(name, label, args, micro_batch, graph, deterministic)
        # "No available kernel": the backend cannot run the shape; out of memory; rows per step; an op
        # without a deterministic kernel
        except (RuntimeError, ValueError) as e:
            cells = [label, f"not run: {why_not_run(e)[:100]}"]
            return "| " + " | ".join(cells + [""] * 6) + " |", "| " + label + " |", None
        finally:
            if deterministic:  # the next variant runs PyTorch's own kernels again
                train.deterministic_kernels(torch.cuda.is_available(), on=False)


def why_not_run(error: Exception) -> str:
    """The first line of the innermost exception error was raised from or while handling: compiled
    code says "RuntimeError when making fake tensor call", its innermost cause says why."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def measure_train_step(name: str, label: str, args, micro_batch: int | None, graph: str,
                       deterministic: bool) -> tuple[str, str, train.Env]:
    cuda = torch.cuda.is_available()
    config = suite_config(name, args, cuda, micro_batch)
    config.training.deterministic = deterministic  # train.setup applies it
    env = train.setup(config)
    if not dist.is_initialized():
        join_group_of_one(env)
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    built = train.build(config, env, train.Run(Path("unused")))  # no checkpoint to read: nothing on disk
    model = built[0]
    if graph == "per-block" and env.compile:  # torch.compile is lazy: the wrapper was never compiled
        train.compile_blocks(model)
        built = (model, built[2], *built[2:])  # each step calls the DDP wrapper itself
    print(f"pico-decoder-{name}: {model.num_params():,} parameters", flush=True)
    accum, seq_len = config.training.optimization.gradient_accumulation_steps, config.model.max_seq_len
    rows = torch.randint(0, config.model.vocab_size, (config.data.dataloader.batch_size, seq_len + 1))
    rows = rows.pin_memory() if cuda else rows  # as data.BatchStream hands them over

    spike_config = config.monitoring.loss_spikes
    spikes = train.LossSpikes(spike_config, {}) if spike_config.std_devs else None
    finite, step = train.FiniteCheck(env.device, None), itertools.count()

    def run_step():
        loop_step(config, env, built, rows, finite, spikes, next(step))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(untimed_steps(args, env.compile)):
        run_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.rounds):
        run_step()
    sync()
    step_s = (time.perf_counter() - start) / args.rounds
    tokens_per_s = config.data.dataloader.batch_size * seq_len / step_s
    if cuda:
        memory = f"{torch.cuda.max_memory_allocated(env.device) / 1e9:.1f} GB"
    else:  # ru_maxrss is in kB on Linux
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB RSS"
    peak = train.peak_flops(env.device)
    mfu = f"{model.flops_per_token(seq_len) * tokens_per_s / peak:.1%}" if peak else "n/a"
    shares = profile_window(run_step, profile_steps(args), env.device)
    work_s = checkpoint_work(config, env, model, rows, args.val_rows)
    micro_batch = config.data.dataloader.batch_size // accum
    row = [label, f"{accum} x {micro_batch} x {seq_len}", f"{step_s * 1e3:,.1f}", f"{tokens_per_s:,.0f}", mfu,
           memory, f"{work_s:,.2f} s", f"{work_s / (config.checkpointing.save_every_n_steps * step_s):.2%}"]
    kinds = [*KERNEL_CLASSES, "other", "idle"]
    breakdown = [label] + ([f"{shares[kind]:.1%}" for kind in kinds] if shares else ["n/a"] * len(kinds))
    return "| " + " | ".join(row) + " |", "| " + " | ".join(breakdown) + " |", env


def bench_train(args):
    sizes = list(SUITE) if args.all_sizes else args.model
    args.val_rows = args.val_rows or SUITE_EVAL_ROWS
    rows, breakdowns, env = [], [], None
    deterministic = [switch == "on" for switch in args.deterministic]
    if any(deterministic):  # cuBLAS's workspace setting, before its first call: for every variant
        train.deterministic_kernels(torch.cuda.is_available())
        train.deterministic_kernels(torch.cuda.is_available(), on=False)
    variants = itertools.product(sizes, args.attention, args.micro_batch or [None], args.ddp_graph, deterministic)
    for name, attention, micro_batch, graph, on in variants:
        row, breakdown, measured = bench_train_size(name, args, attention, micro_batch, graph, on)
        print(row, flush=True)  # a run cut short by a time limit still shows what it measured
        rows.append(row)
        breakdowns.append(breakdown)
        env = measured or env
        # Free this size's model before the next one's peak memory is measured: the compiled
        # code, which holds on to it, too.
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if env is None:
        sys.exit("no --train step could run: " + "; ".join(rows))
    print(f"\nMachine: {machine(env.device)}. train.py's step: DDP in a process group of one "
          f"({dist.get_backend()}), precision {env.precision}, compile {env.compile}; micro-steps x rows "
          f"x tokens per step, mean of {args.rounds} consecutive steps after "
          f"{untimed_steps(args, env.compile)} untimed. A checkpoint: one GPU's share of "
          f"{args.val_rows:,} evaluation rows and {Config().evaluation.probe.rows:,} "
          f"probe rows over {SUITE_GPUS} GPUs.\n")
    print("| model | step | ms/step | tokens/s | MFU | peak memory "
          "| checkpoint: captures, evaluation, probe | checkpoint / 1,000 steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    where = ("device kernels' time; idle: no kernel running" if env.device.type == "cuda"
             else "ops' own CPU time; idle: in no op (Python, waits)")
    print(f"\nA profiled window of {profile_steps(args)} steps by kind of work, shares of its wall time "
          f"({where}):\n")
    print("| model | " + " | ".join([*KERNEL_CLASSES, "other", "idle"]) + " |")
    print("|---|" + "---:|" * (len(KERNEL_CLASSES) + 2))
    print("\n".join(breakdowns))
    dist.barrier()  # as train.py ends: no collective left in flight
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*SUITE, "demo"], nargs="+", default=["tiny"],
                        help="several with --train, --measure and --peak-memory; demo: configs/local.py's "
                             "model, for the comparison and --measure")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int,
                        help="tokens per row; default 256, with --train on CUDA the suite's 2048")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (--train: compile on CPU too)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed steps of each model (--train: then profiled, 3 at most)")
    parser.add_argument("--attention", nargs="+", choices=list(SDPA_BACKENDS), default=["default"],
                        help="--train: the SDPA backends to time, each size with each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    parser.add_argument("--all", action="store_true", help="tiny and small, eager and compiled")
    parser.add_argument("--data", action="store_true", help="the data path's tokens/s instead")
    parser.add_argument("--data-steps", type=int, default=32, help="global batches read by --data")
    parser.add_argument("--tokenize", action="store_true",
                        help="data.py tokenize's tokens/s against tokenizers' encode_batch, and its memory")
    parser.add_argument("--text-mb", type=float, default=8, help="--tokenize: MB of text timed")
    parser.add_argument("--memory-mb", type=float, default=64, help="--tokenize: MB of text whose memory is "
                        "measured, then 4 times as much (0: none)")
    parser.add_argument("--tokenizer", help="--tokenize: a tokenizer.json or Hub model repo (default: a BPE "
                        "of 32,000 ids trained on the text)")
    parser.add_argument("--val-rows", type=int,
                        help="evaluation rows: --measure 64; --train the suite's evaluation set, of which "
                             f"one GPU takes 1/{SUITE_GPUS} ({SUITE_EVAL_ROWS:,} rows unless given)")
    parser.add_argument("--scaling", action="store_true",
                        help="under torchrun: tokens/s of N processes against one (see above)")
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp", help="for --scaling")
    parser.add_argument("--memory", action="store_true", help="memory per GPU under DDP and FSDP instead")
    parser.add_argument("--layer-stats", action="store_true", help="the cost of per-layer statistics instead")
    parser.add_argument("--probe", action="store_true",
                        help="the cost of the training probe, memorization and spike detection instead")
    parser.add_argument("--measure", nargs="*", choices=list(evaluation.MEASUREMENTS),
                        help="the cost of a checkpoint instead: its save, captures and these measurements "
                             "(all if none named), for each --model (see above)")
    parser.add_argument("--peak-memory", action="store_true",
                        help="peak memory of an evaluation batch and a training micro-batch, each --model")
    parser.add_argument("--peak-memory-of", choices=["evaluation", "training micro-batch"], help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=16, help="for --memory: FSDP's number of GPUs")
    parser.add_argument("--micro-batch", type=int, nargs="+",
                        help="rows per GPU and micro-step: --memory 8; --train the suite's on CUDA, 2 on "
                             "CPU, or several, each with the same rows per step")
    parser.add_argument("--ddp-graph", nargs="+", choices=list(DDP_GRAPHS), default=["per-bucket"],
                        help="--train, compiled: the compiled DDP wrapper's graph per gradient bucket "
                             "(PyTorch's default) or one")
    parser.add_argument("--deterministic", nargs="+", choices=["off", "on"], default=["off"],
                        help="--train: without and with training.deterministic, each size with each")
    parser.add_argument("--train", action="store_true",
                        help="train.py's own step: tokens/s, MFU, memory, time by kind of work instead")
    parser.add_argument("--all-sizes", action="store_true", help="for --train: every size of the suite")
    args = parser.parse_args()
    if args.train:
        return bench_train(args)
    args.seq_len = 256 if args.seq_len is None else args.seq_len
    if args.measure is not None:
        return bench_checkpoint(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.peak_memory:
        return bench_peak_memory(args)
    if args.peak_memory_of:
        args.model = args.model[0]
        return peak_memory_of(args.peak_memory_of, args)
    for name, values in (("--model", args.model), ("--micro-batch", args.micro_batch or [8])):
        if len(values) > 1:
            parser.error(f"{name} {' '.join(map(str, values))}: expected one (several only with --train, "
                         f"--measure and --peak-memory)")
    args.model, args.micro_batch = args.model[0], (args.micro_batch or [8])[0]
    if args.memory:
        return bench_memory(args)
    if args.layer_stats:
        return bench_layer_stats(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.probe:
        return bench_probe(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.scaling:
        return bench_scaling(args)
    if args.data:
        return bench_data(args.data_steps)
    if args.tokenize:
        return bench_tokenize(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: fp32 matmuls outside autocast
    configs = ([(m, c) for m in ("tiny", "small") for c in (False, True)] if args.all
               else [(args.model, args.compile)])
    rows = [bench(name, use_compile, args, device) for name, use_compile in configs]
    print(f"\nMachine: {machine(device)}. Batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.rounds} interleaved steps after {args.warmup} untimed.\n")
    print("| model | mode | device | pico ms/step | transformers ms/step | ratio | pico tokens/s "
          "| pico MFU | transformers MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
