"""Train a pico-decoder: main() is the whole run, read top to bottom.

    python train.py configs/local.py [--training.max_steps=100 ...]
    torchrun --nproc_per_node=8 train.py configs/demo.py [...]     # DDP (or FSDP) on 8 GPUs

Re-running the same command resumes from runs/RUN/checkpoints/latest; SIGTERM or Ctrl-C saves a
checkpoint at the current step and exits 0. The config is config.py's (docs/config.md: its table).

Core, on the reading path (README): main, train_step, clip_gradients, lr_lambda, then build.
The rest is machinery that main calls, each rare path into the file that owns it: set-up and
resume (setup, open_run, open_data), DDP and FSDP (parallelize), the asides around each step
(Monitor), checkpoints (Checkpoints: checkpoint.py, evaluation.py, records.py), stop signals and
lost ranks (distributed.py).
"""

import collections
import contextlib
import dataclasses
import datetime
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import data
import distributed
import evaluation
from config import Config, ConfigError, check_resume_compatible, load_config, validate
from model import PicoDecoder
from records import Records, counted, hub_uploader, lock_run_directory, log_plan, read_uploads, run_log, save_spike

try:  # FSDP2: public from torch 2.6, under torch.distributed._composable in 2.5
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        MixedPrecisionPolicy = fully_shard = None


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: python train.py CONFIG [--section.key=value ...]")
    config = load_config(argv[0], argv[1:])
    env = setup(config)
    run = open_run(config, env)  # what the run starts from, read whole: nothing is written yet
    max_steps, seq_len = config.training.max_steps, config.model.max_seq_len
    if run.start_step > max_steps or run.start_step == max_steps and evaluation.evaluated(run.dir, max_steps):
        return already_done(config, run, env)  # before any data is opened
    shards, measures, ld_rows = open_data(config, env, run)
    if run.start_step == max_steps and measures.done(max_steps):  # nothing to measure either
        return already_done(config, run, env)

    # Several processes: join the others. Each has checked the same inputs: a bad one stopped them all.
    flags = distributed.start(config.training.backend, env.device, config.training.distributed == "fsdp",
                              config.training.collective_timeout)
    batches = data.BatchStream(shards, config.data.dataloader.batch_size, env.world_size, env.rank,
                               run.start_step, max_steps, pin_memory=env.device.type == "cuda",
                               timeout=config.data.dataset.read_timeout)
    if env.rank == 0:  # all read and checked, the first batch too: the run directory is now this job's
        run.lock = lock_run_directory(run.dir, run.start_over)
    model, step_model, wrapper, optimizer, scheduler = build(config, env, run)
    distributed.barrier()  # every rank has read the run directory before rank 0 writes to it
    records = Records(run.dir, config, run.start_step, measures.done(run.start_step))  # the first write
    if run.branched and env.rank == 0:  # the parent's checkpoint is the branch's first
        checkpoint.adopt(run.resumed_from, run.dir / "checkpoints")
    progress = Progress(config, env, run, model, records, shards, measures)  # logs the first lines
    stop, finite = StopSignals(), FiniteCheck(env.device, flags)
    saver = Checkpoints(config, env, run, model, optimizer, scheduler, measures, ld_rows, finite, records)
    if env.rank == 0:
        log_plan(records.log, config, run.dir, model, progress.checkpoints, ld_rows, saver.tokenizer)
    watch = Monitor(config, env, model, optimizer, progress, finite, saver)
    accum = config.training.optimization.gradient_accumulation_steps
    micro_batches = lambda rows: rows.to(env.device, non_blocking=True).view(accum, -1, seq_len + 1)
    try:
        if run.resumed_from is not None:  # a run may have stopped before evaluating or uploading it
            saver.evaluate_and_upload(run.start_step)
        else:  # checkpoint 0: the initialisation, captured on the first step's batch
            with progress.paused():
                saver.save(0, micro_batches(batches.peek()))
        for step in range(run.start_step, max_steps):
            # This rank's rows of global batch `step`. In one process a stop signal ends the wait
            # (several keep in step through any_rank below); the first step's rows are already read.
            rows = batches.get(until=lambda: env.world_size == 1 and stop.received is not None)
            if rows is None:  # stopped while waiting for data: the steps done are saved
                saver.save(step, batch, evaluate=False)  # with the batch the last of them trained on
                return stop.stopped(step, records.log)

            # The step. Monitor's asides never make the device wait; the one inside the step comes
            # where both this step's gradients and the weights before its update exist.
            batch = micro_batches(rows)
            loss = train_step(step_model, wrapper, batch, env.autocast)  # forward and backward
            watch.before_update(step)  # aside: the step before's loss spike; layer statistics
            grad_norm = clip_gradients(model, config.training.optimization.max_grad_norm, watch.logging)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            watch.after_update(step + 1, loss, grad_norm, batch)  # aside: the finite check, the log

            # Checkpoint: on schedule, at the end, and when any rank was asked to stop (a
            # cluster's notice may reach the ranks at different steps; they agree here).
            stopping = distributed.any_rank(stop.received is not None, flags)
            if is_checkpoint_step(step + 1, config) or stopping:
                with progress.paused():
                    saver.save(step + 1, batch, evaluate=not stopping)
                if stopping:  # no time to evaluate or upload now: the resumed run does it
                    return stop.stopped(step + 1, records.log)
        # The ranks finish together, before rank 0 waits for its last uploads on its own (in a
        # collective the others could time out). A barrier holds no tensor: a group destroyed while
        # gloo's worker thread still frees the last collective's tensor can deadlock on the GIL.
        distributed.barrier()
    except RuntimeError as e:  # a collective that failed: another rank died or stopped answering?
        raise lost_rank(e, run, config.training.collective_timeout) from None
    finally:
        batches.close()
        records.close()
        stop.restore()
        saver.close()
    records.log.info(f"done: {max_steps} steps in {progress.elapsed()}")
    return 0


def train_step(step_model, wrapper, batch: torch.Tensor, autocast) -> torch.Tensor:
    """Forward and backward over one step's micro-batches, batch [micro-steps, rows, T + 1] of this
    rank's rows. Each micro-batch's loss is scaled so the gradient is that of the mean over this
    rank's rows; only the last backward averages the gradients over the ranks (DDP, FSDP): that of
    the mean over the global batch. Returns this rank's mean loss, left on the device."""
    accum = len(batch)
    step_loss = torch.zeros((), device=batch.device)
    for i, micro in enumerate(batch):
        if isinstance(wrapper, DistributedDataParallel):
            wrapper.require_backward_grad_sync = i == accum - 1  # the flag DDP's no_sync() clears
        elif wrapper is not None:  # FSDP
            wrapper.set_requires_gradient_sync(i == accum - 1)
        with autocast:
            _, loss = step_model(micro[:, :-1], micro[:, 1:])
        (loss / accum).backward()
        step_loss += loss.detach() / accum
    return step_loss


def clip_gradients(model: PicoDecoder, max_norm: float | None, measure: bool) -> torch.Tensor | None:
    if max_norm is None and not measure:
        return None  # neither clipping nor a log needs the norm
    # max_norm inf measures without clipping (the gradients are multiplied by 1).
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: over all shards


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


def is_checkpoint_step(step: int, config: Config) -> bool:
    """On schedule (save_every_n_steps), at the end, and at the log-spaced early steps."""
    ckpt = config.checkpointing
    early = step <= ckpt.log_spaced_until and (step == 0 or step & (step - 1) == 0)
    return step % ckpt.save_every_n_steps == 0 or step == config.training.max_steps or early


def checkpoint_steps(config: Config, first: int) -> list[int]:
    return [step for step in range(first, config.training.max_steps + 1) if is_checkpoint_step(step, config)]


@dataclasses.dataclass
class Env:
    device: torch.device
    precision: str  # "bf16-mixed" or "32"
    compile: bool
    world_size: int  # torchrun's processes; 1 without torchrun
    rank: int
    autocast: contextlib.AbstractContextManager


def setup(config: Config) -> Env:
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    validate(config, world_size)
    if config.training.distributed == "fsdp" and fully_shard is None:
        raise ConfigError(f"training.distributed='fsdp': expected 'ddp': torch {torch.__version__} "
                          f"has no fully_shard (FSDP2 needs torch>=2.5)")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = config.training.device
    name = next(n for n in available if available[n]) if name == "auto" else name
    if not available[name]:
        raise ConfigError(f"training.device={name!r}: no {name.upper()} device is available")
    device = torch.device(name)
    if name == "cuda":  # under torchrun, GPU number LOCAL_RANK of this node
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank}: this node has {torch.cuda.device_count()} GPUs; "
                              f"expected torchrun --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)  # NCCL and every kernel of this process go to its own GPU
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
    if config.training.deterministic:
        deterministic_kernels(name == "cuda")
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16-mixed" if name == "cuda" else "32"
    autocast = (torch.autocast(name, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    use_compile = name == "cuda" if config.training.compile is None else config.training.compile
    return Env(device, precision, use_compile, world_size, rank, autocast)


def deterministic_kernels(cuda: bool, on: bool = True):
    """training.deterministic: kernels that give the same bits for the same inputs on one machine
    (PyTorch's notes on reproducibility): deterministic algorithms wherever PyTorch has them (an op
    that has none raises, naming itself); on CUDA also cuBLAS's workspace setting (read at its first
    call: set before the model is built), cuDNN without benchmarking, and scaled_dot_product_attention
    held to its math backend, the one whose backward is deterministic in every torch from 2.5 (flash
    and memory-efficient attention accumulate their backward with atomics where a version does not
    switch them; the math backend keeps each head's T x T scores for the backward: more memory).
    on=False undoes it, for bench.py's comparison in one process."""
    if cuda and on and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(on)
    if cuda:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, False
        for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_cudnn_sdp):
            enable(not on)


@dataclasses.dataclass
class Run:
    dir: Path
    start_step: int = 0
    resumed_from: Path | None = None  # the checkpoint resumed, read whole into `state`
    state: dict | None = None
    weights: dict | None = None  # the checkpoint's, or checkpointing.training.init_from's
    start_over: bool = False  # move the directory's checkpoints and records aside first
    lock: object = None  # rank 0's hold on the directory (records.lock_run_directory)
    carried: dict = dataclasses.field(default_factory=dict)  # its Checkpoints.run_state
    schedule_changes: list = dataclasses.field(default_factory=list)  # resumed under another schedule
    branched: bool = False  # resumed_from is another run's: checkpointing.training.branch_from's


def open_run(config: Config, env: Env) -> Run:
    """Find the latest checkpoint (or init_from's weights) and read it whole, so a damaged one is
    named before anything is built or written. Every rank reads it: the run directory is on a
    file system all nodes share."""
    ckpt = config.checkpointing
    if ckpt.run_name is None:
        if env.world_size > 1:  # each rank would make its own timestamp
            raise ConfigError("checkpointing.run_name=None: expected a name when training in "
                              "several processes")
        # the time, and a random part: two runs started in the same second get two directories
        ckpt.run_name = f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    run = Run(Path(ckpt.runs_dir) / ckpt.run_name)
    run.start_over = ckpt.training.start_over and (run.dir / "checkpoints").exists()  # moved aside later
    latest = None if ckpt.training.start_over else checkpoint.latest_checkpoint(run.dir / "checkpoints")
    if latest is not None and not ckpt.training.auto_resume:  # never two runs mixed in one directory
        raise ConfigError(f"checkpointing.training.auto_resume=False: {run.dir} holds checkpoints "
                          f"(up to {latest.name}); expected another checkpointing.run_name, or "
                          f"checkpointing.training.start_over=True to move them aside and start over")
    if latest is not None:
        run.schedule_changes = check_resume_compatible(config, run.dir / "training_config.yaml")
    elif ckpt.training.branch_from is not None:  # a branch's first start, from its parent's checkpoint
        latest, run.branched = checkpoint.branch_point(config, Path(ckpt.runs_dir)), True
    if latest is not None:
        run.state = checkpoint.read_checkpoint(latest, config.model)
        run.resumed_from, run.start_step, run.weights = latest, run.state["step"], run.state.pop("model")
        run.carried = run.state.get("run_state", {})
    elif ckpt.training.init_from is not None:
        source = ckpt.training.init_from
        try:
            shape, run.weights, _ = checkpoint.read_pretrained(source)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"checkpointing.training.init_from={source!r}: {e}") from None
        differ = [f"model.{key} (checkpoint: {value!r}, config: {getattr(config.model, key)!r})"
                  for key, value in dataclasses.asdict(shape).items() if value != getattr(config.model, key)]
        if differ:
            raise ConfigError(f"checkpointing.training.init_from={source!r}: its shape differs from the "
                              f"config on {'; '.join(differ)}; set those model.* keys to the checkpoint's")
    return run


def already_done(config: Config, run: Run, env: Env) -> int:
    """A finished run started again: nothing to train, but uploads a crash left pending."""
    if env.rank == 0:
        print(f"{run.dir}: already trained to step {run.start_step} (training.max_steps="
              f"{config.training.max_steps}); nothing to do")
        if config.checkpointing.save_to_hf and ((left := read_uploads(run.dir))["pending"] or left["untagged"]):
            hub_uploader(config, run.dir, run_log(run.dir, config.monitoring.logging.log_level)).close()
    return 0


def open_data(config: Config, env: Env, run: Run) -> tuple:
    """The training shards, the val captures' rows and each measurement's (evaluation.py), read and
    checked before anything is built or written."""
    seq_len, vocab, seed = config.model.max_seq_len, config.model.vocab_size, config.data.seed
    shards = data.training_rows(config, shared=env.world_size > 1)
    max_steps, global_batch = config.training.max_steps, config.data.dataloader.batch_size
    if max_steps * global_batch > shards.num_rows:
        raise ConfigError(f"training.max_steps={max_steps}: needs {max_steps * global_batch:,} rows "
                          f"of data, {config.data.dataset.name} has {shards.num_rows:,} "
                          f"(at most {shards.num_rows // global_batch:,} steps)")
    ld, ld_rows = config.checkpointing.learning_dynamics, None
    eval_sets = data.EvalSets(seq_len + 1, vocab, seed)  # Paloma's and the val captures' are one set by default
    with torch.device("meta"):  # module names only: a suffix that matches none stops here
        checkpoint.capture_modules(PicoDecoder(config.model), ld.layer_suffixes, ld.layers)
    if ld.eval_data is not None:
        ld_rows = eval_sets.read(ld.eval_data, "val", key="checkpointing.learning_dynamics.eval_data")
        ld_rows = ld_rows.first(ld.eval_rows)
        if not ld_rows:
            raise ConfigError(f"checkpointing.learning_dynamics.eval_data={ld.eval_data!r}: its 'val' "
                              f"split has no rows; expected rows to capture on, or None")
        shortest = min(len(row) - 1 for row in ld_rows)
        if ld.sequence_idx < -shortest:
            raise ConfigError(f"checkpointing.learning_dynamics.sequence_idx={ld.sequence_idx}: "
                              f"{ld.eval_data} has rows of only {shortest} input tokens")
    measures = evaluation.Evaluation(evaluation.Start(config, shards, eval_sets, run.carried), run.dir)
    return shards, measures, ld_rows


def build(config: Config, env: Env, run: Run) -> tuple:
    # The same initialisation on every rank (the same seed, drawn on the CPU), then the weights
    # of the checkpoint or of init_from, all before DDP or FSDP takes the model over.
    torch.manual_seed(config.training.seed)
    model = PicoDecoder(config.model).to(env.device)
    model.checkpoint_blocks = config.training.activation_checkpointing
    if run.weights is not None:
        model.load_state_dict(run.weights)
        run.weights = None
    step_model, wrapper = parallelize(model, config, env)
    opt = config.training.optimization
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay,
                                  fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if run.state is not None:
        checkpoint.restore_checkpoint(run.resumed_from, run.state, model, optimizer, scheduler)
        run.state = None
        # The schedule is the config's: a resumed run may lower the lr (after a divergence) or move
        # max_steps; with the same config this computes the very numbers the checkpoint holds.
        scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = opt.lr * lr_lambda(config)(scheduler.last_epoch)
    return model, step_model, wrapper, optimizer, scheduler


def parallelize(model: PicoDecoder, config: Config, env: Env) -> tuple:
    """(the module each training step calls, its DDP or FSDP wrapper or None). DDP, the default,
    keeps a whole replica per GPU and is compiled whole: with AdamW, 20 bytes a parameter (float32
    weights, gradients, DDP's gradient buckets and two moments), 23.3 GB for xl, the suite's
    largest (docs/suite.md). FSDP2 shards weights, gradients and optimizer state as torchtitan
    does: each block, then the output layer, then the root, each a unit gathered just before it
    runs; the blocks compiled each on its own (compile_blocks), FSDP's hooks between them eager.

    Every place where FSDP differs from DDP: `setup` (torch must have fully_shard);
    `distributed.start` (a process group even for one process); here; `train_step` (which
    micro-step syncs gradients); `clip_gradients` (the norm of sharded gradients);
    `LayerStats` (norms of shards, summed over ranks); `Checkpoints.whole_model` and
    `distributed.whole_model` (an unsharded copy for the export, captures and measurements);
    `checkpoint.save_checkpoint` and `restore_checkpoint` (each rank's optimizer shard, read back
    at any world size); `model.OutputHead` (its own module, so its weight is gathered around the
    chunked loss)."""
    strategy = config.training.distributed if dist.is_initialized() else None
    if strategy == "ddp":
        cuda = env.device.type == "cuda"
        wrapper = DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)
        return (torch.compile(wrapper) if env.compile else wrapper), wrapper
    if strategy == "fsdp":
        # Weights gathered in bf16 for bf16-mixed (half the traffic); gradients reduced in float32
        # so the sum over ranks loses nothing. Each rank keeps float32 shards for the optimizer.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if env.precision == "bf16-mixed" else None,
                                      reduce_dtype=torch.float32)
        reshard = config.training.reshard_after_forward
        if env.compile:
            compile_blocks(model)
        for i, block in enumerate(model.layers):
            # The last block's backward and the output layer's come right after their forwards:
            # resharding in between would only gather the same weights twice.
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard and i < len(model.layers) - 1)
        fully_shard(model.de_embedding_proj, mp_policy=policy, reshard_after_forward=False)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        return model, model
    return (torch.compile(model) if env.compile else model), None


def compile_blocks(model: PicoDecoder):
    """Each block compiled on its own, once, so that a wrapper's hooks between blocks stay eager; and
    the output head with its chunked loss."""
    for module in [*model.layers, model.de_embedding_proj]:
        module.forward = torch.compile(module.forward)


class Monitor:
    """The asides around each step, none of which makes the device wait: the loss spike of the step
    before (LossSpikes, every step), whether the loss and gradient norm stay finite (FiniteCheck),
    and at logging steps the layer statistics (LayerStats) and the log (Progress)."""

    def __init__(self, config: Config, env: Env, model: PicoDecoder, optimizer, progress: "Progress",
                 finite: "FiniteCheck", saver: "Checkpoints"):
        self.optimizer, self.progress, self.finite, self.saver = optimizer, progress, finite, saver
        self.spikes, self.world_size = saver.spikes, env.world_size
        self.layer_stats = LayerStats(model) if config.monitoring.logging.layer_stats else None
        self.log_every, self.max_steps = config.monitoring.logging.log_every_n_steps, config.training.max_steps
        self.logging, self.lr, self.before = False, None, None

    def before_update(self, step: int):
        """After step `step`'s backward, before its update: the device is busy with this step, so
        the step before's loss is there to read; the weights are still those after the step
        before, which a spike's captures need; and the gradients are not yet clipped."""
        done = step + 1
        self.logging = done % self.log_every == 0 or done == self.max_steps
        if self.spikes and self.spikes.read():
            with self.progress.paused():
                self.saver.record_spike()
        self.before = self.layer_stats.before() if self.logging and self.layer_stats else None
        self.lr = self.optimizer.param_groups[0]["lr"]  # this step's: the scheduler steps after it

    def after_update(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, batch: torch.Tensor):
        """After the update: `done` optimizer steps are complete, the last trained on `batch`."""
        self.finite.watch(done, loss, grad_norm)  # on the device: the loop does not wait for it
        if dist.is_initialized() and (self.logging or self.spikes):  # the mean over the global batch
            dist.all_reduce(loss)
            loss /= self.world_size
        if self.spikes:
            self.spikes.watch(done, loss, batch)
        if self.logging:
            self.finite.check()
            layers = self.layer_stats.after(self.before) if self.layer_stats else {}
            self.progress.log(done, loss, self.lr, grad_norm, layers)


class Progress:
    """The run's log: its first lines (what runs where, on what, from where), then at each
    logging step a record and a line: the loss over the global batch, lr, gradient norm,
    tokens/s of training time alone, MFU (of all the job's GPUs) and the time to the end."""

    def __init__(self, config: Config, env: Env, run: Run, model: PicoDecoder, records: Records, shards,
                 measures: evaluation.Evaluation):
        self.records, self.max_steps, self.start_step = records, config.training.max_steps, run.start_step
        try:  # the commit of this code, so the run can be reproduced from its log
            version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):  # no git, or a fork without its history
            version = "unknown"
        log = records.log
        log.info(f"run {run.dir} | code {version} | torch {torch.__version__} | device {env.device} | "
                 f"precision {env.precision} | compile {env.compile}" + (
                     f" | {env.world_size} processes, {config.training.distributed} over {dist.get_backend()}"
                     if dist.is_initialized() else ""))
        log.info(f"model: {model.num_params():,} parameters | data: {shards.num_rows:,} rows in "
                 f"{len(shards.files)} shards | global batch {config.data.dataloader.batch_size} x "
                 f"{config.model.max_seq_len} tokens, {env.world_size} process(es) x "
                 f"{config.training.optimization.gradient_accumulation_steps} micro-step(s)" + (
                     f" | measured at each checkpoint: {', '.join(measures.names)}"
                     if measures.measures else ""))
        if variant := checkpoint.beyond_llama(config.model):
            log.info(f"checkpoints: {', '.join(variant)} is beyond transformers' Llama, so the weights are "
                     f"saved in pico's own format: PicoDecoder.from_pretrained loads them, transformers cannot")
        init_from = config.checkpointing.training.init_from
        if run.resumed_from is not None:
            log.info(f"resumed from {run.resumed_from} at step {run.start_step}" + (
                "; checkpointing.training.init_from ignored" if init_from else ""))
        if run.schedule_changes:
            log.warning(f"resumed with another schedule than the run's training_config.yaml, from step "
                        f"{run.start_step} on: {'; '.join(run.schedule_changes)}")
        elif init_from is not None:
            log.info(f"initial weights from {init_from} (checkpointing.training.init_from)")
        self.tokens_per_step = config.data.dataloader.batch_size * config.model.max_seq_len
        peak = peak_flops(env.device) * env.world_size
        self.mfu_per_token = model.flops_per_token(config.model.max_seq_len) / peak if peak else None
        self.t_start = self.t_log = time.perf_counter()
        self.steps_at_log = run.start_step
        # those still to save (the one resumed from is saved)
        self.checkpoints = checkpoint_steps(config, run.start_step + (run.resumed_from is not None))
        self.saving = [0.0, 0]  # seconds spent saving checkpoints, and how many

    def log(self, done: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor, layers: dict):
        """Where the loop waits for the device (and in LossSpikes). loss: the global batch's mean;
        layers: LayerStats.after's record."""
        now = time.perf_counter()
        tokens_per_s = (done - self.steps_at_log) * self.tokens_per_step / (now - self.t_log)
        # The time to the end: the steps left at the pace so far, and the checkpoints left at theirs
        per_step = (now - self.t_start - self.saving[0]) / (done - self.start_step)
        per_checkpoint = self.saving[0] / max(1, self.saving[1])
        checkpoints_left = sum(step >= done for step in self.checkpoints)  # this step's is saved next
        eta = per_step * (self.max_steps - done) + per_checkpoint * checkpoints_left
        if self.steps_at_log == self.start_step:  # the first logged step: the plan's time
            self.records.log.info(f"plan: {datetime.timedelta(seconds=int(eta))} to step {self.max_steps}: "
                                  f"{per_step:.3g} s per step, {counted(checkpoints_left, 'checkpoint')} " + (
                                      f"of {per_checkpoint:.3g} s each (as far as measured)"
                                      if self.saving[1] else "(none timed yet)"))
        record = {"step": done, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_seen": done * self.tokens_per_step, "tokens_per_s": tokens_per_s, **layers}
        if self.mfu_per_token:
            record["mfu"] = self.mfu_per_token * tokens_per_s
        self.records.write(record)
        mfu = f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""
        self.records.log.info(f"step {done}/{self.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                              f"{tokens_per_s:,.0f} tok/s{mfu} | elapsed {self.elapsed()} | "
                              f"eta {datetime.timedelta(seconds=int(eta))}")
        self.t_log, self.steps_at_log = now, done

    def elapsed(self) -> str:
        return str(datetime.timedelta(seconds=int(time.perf_counter() - self.t_start)))

    @contextlib.contextmanager
    def paused(self):
        """Time spent here (saving a checkpoint) counts apart from training: not in tokens/s."""
        paused = time.perf_counter()
        yield
        self.t_log += time.perf_counter() - paused
        self.saving = [self.saving[0] + time.perf_counter() - paused, self.saving[1] + 1]


class LayerStats:
    """At logging steps, for the embedding, each block and the output layer (with its norm): the
    norm of the weights after the step, of the gradient (before clipping) and of the step's
    update over the weights' norm before it. All of it is one stacked tensor, read once; the
    other steps do nothing. The update needs the weights before the step: a copy, on log steps
    only. Under FSDP each rank holds a shard, so squared sums are added over the ranks."""

    def __init__(self, model: PicoDecoder):
        def group(name: str) -> str:
            return ".".join(name.split(".")[:2]) if name.startswith("layers.") else (
                "embedding" if name.startswith("embedding_proj") else "output")
        named = [(group(name), p) for name, p in model.named_parameters()]
        self.groups = list(dict.fromkeys(g for g, _ in named))  # in model order
        self.params = [p for _, p in named]
        self.index = torch.tensor([self.groups.index(g) for g, _ in named], device=self.params[0].device)
        self.sharded = hasattr(self.params[0], "to_local")  # FSDP's DTensors

    def local(self, tensors) -> list[torch.Tensor]:
        return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: this rank's shard

    def before(self) -> tuple:
        grads = self.local(p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params)
        return torch.stack(torch._foreach_norm(grads)), [w.detach().clone() for w in self.local(self.params)]

    def after(self, before: tuple) -> dict:
        grad_norms, old = before
        new = [w.detach() for w in self.local(self.params)]
        updates = torch._foreach_sub(new, old)
        norms = torch.stack([torch.stack(torch._foreach_norm(ws)) for ws in (new, old, updates)])
        squares = torch.zeros(4, len(self.groups), device=norms.device, dtype=torch.float32).index_add_(
            1, self.index, torch.cat([norms, grad_norms[None]]).float().square())
        if self.sharded:
            dist.all_reduce(squares)
        weight, previous, update, grad = squares.sqrt().tolist()  # the one wait for the device
        return {f"{kind}/{name}": value for i, name in enumerate(self.groups) for kind, value in (
            ("weight_norm", weight[i]), ("grad_norm", grad[i]), ("update_ratio", update[i] / previous[i]))}


# Dense bf16 peaks from the vendors' datasheets, for MFU; the first name in the device's wins.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "A10G": 70e12,
              "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)


class Checkpoints:
    """Checkpoint N: saved with its learning-dynamics captures (checkpoint.py), then measured
    (evaluation.py) and uploaded (records.py); and the captures of a loss spike. Every rank takes
    part; rank 0 writes. Under FSDP they share one gather of the whole model."""

    def __init__(self, config: Config, env: Env, run: Run, model, optimizer, scheduler,
                 measures: evaluation.Evaluation, ld_rows, finite: "FiniteCheck", records: Records):
        self.config, self.env, self.dir, self.records = config, env, run.dir, records
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.measures, self.ld_rows, self.finite = measures, ld_rows, finite
        spikes = config.monitoring.loss_spikes
        self.spikes = LossSpikes(spikes, run.carried.get("loss_spikes", {})) if spikes.std_devs else None
        if env.rank == 0:
            for note in measures.notes:
                records.log.warning(note)
        self.last_saved = run.start_step if run.resumed_from is not None else None
        save_to_hf = config.checkpointing.save_to_hf and env.rank == 0
        self.uploader = hub_uploader(config, run.dir, records.log) if save_to_hf else None
        self.tokenizer = None  # data.tokenizer.name's files, saved in every checkpoint by rank 0
        if env.rank == 0 and config.data.tokenizer.name is not None:
            try:
                self.tokenizer = data.tokenizer_files(config.data.tokenizer.name, config.model.max_seq_len)
            except data.DataError as e:  # a tokenizer is a convenience: never a reason to stop
                records.log.warning(f"{e}; checkpoints are saved without a tokenizer")

    def whole_model(self) -> PicoDecoder:
        return distributed.whole_model(self.model, self.config.training.distributed == "fsdp", self.env.device)

    def save(self, done: int, train_batch: torch.Tensor, evaluate: bool = True):
        """Checkpoint `done` (optimizer steps completed), captured on the batch its last step
        trained on; then, unless the run is stopping, its evaluation and upload."""
        if self.spikes and self.spikes.read():  # the window saved is the one after step `done`
            self.record_spike()
        if done == self.last_saved:
            return
        self.finite.check()  # never a checkpoint of weights a non-finite step made
        self.last_saved, whole, ckpt = done, self.whole_model(), self.config.checkpointing
        captures = checkpoint.learning_dynamics(whole, train_batch, self.ld_rows, ckpt.learning_dynamics,
                                                self.env.device, self.env.autocast)
        path = checkpoint.save_checkpoint(self.dir / "checkpoints", done, self.model, self.optimizer,
                                          self.scheduler, done * self.config.data.dataloader.batch_size,
                                          model_state=whole.state_dict(), learning_dynamics=captures,
                                          tokenizer=self.tokenizer,
                                          run_state=self.run_state())
        if ckpt.keep_last_n_optimizer_states is not None and self.env.rank == 0:
            checkpoint.drop_old_optimizer_states(self.dir / "checkpoints", ckpt.keep_last_n_optimizer_states)
        self.records.log.info(f"saved {path}")
        if evaluate:
            self.evaluate_and_upload(done, whole)

    def run_state(self) -> dict:
        """What a run resumed from this checkpoint carries on with, in training_state.pt."""
        return {**({"loss_spikes": self.spikes.state()} if self.spikes else {}), **self.measures.run_state()}

    def record_spike(self):
        """A spike (LossSpikes.spike) in metrics.jsonl; the first of a run also in spikes/step_N/:
        the spike (its loss, the window's mean and deviation, the global rows of its batch) and
        the learning-dynamics captures of its batch, as in a checkpoint: with the weights after
        step N (read during step N + 1, before its optimizer step), on the batch step N trained on."""
        spikes, global_batch = self.spikes, self.config.data.dataloader.batch_size
        spike, done = spikes.spike, spikes.spike["step"]
        spike["positions"] = [(done - 1) * global_batch, done * global_batch]  # [first, end) of its batch
        directory = self.dir / "spikes" / f"step_{done}"
        if spikes.capture:
            self.finite.check()  # never a capture of weights a non-finite step made
            ld = dataclasses.replace(self.config.checkpointing.learning_dynamics, capture_train=True)
            captures = checkpoint.learning_dynamics(self.whole_model(), spikes.batch, None, ld,
                                                    self.env.device, self.env.autocast)
        if self.env.rank != 0:  # every rank saw the same spike (the global loss): one says so
            return
        self.records.write({"step": done, "loss_spike": spike["loss"]})
        if spikes.capture:
            save_spike(directory, spike, captures)
        if spikes.first:  # one line for a run of spikes
            where = (f"its rows and captures in {directory}" if spikes.capture else f"not captured: "
                     f"the run took its monitoring.loss_spikes.max_captures={spikes.max_captures}")
            self.records.log.warning(f"loss spike at step {done}: {spike['loss']:.4f}, over the mean "
                                     f"{spike['mean']:.4f} of the last {spikes.losses.maxlen} steps by "
                                     f"{spike['deviations']:.1f} standard deviations; {where}")

    def evaluate_and_upload(self, done: int, whole: PicoDecoder | None = None):
        """What follows a saved checkpoint; each skips what an earlier start already did."""
        if not self.measures.done(done):
            at = evaluation.At(done, self.config, self.env.device, self.env.autocast)
            self.measures(whole or self.whole_model(), at, self.records)
        if self.uploader:  # in the background: the next step starts now
            self.uploader.submit(done)

    def close(self):
        if self.uploader:  # waits for the last checkpoints' uploads (bounded; the rest stay pending)
            self.uploader.close()


class LossSpikes:
    """A step whose loss exceeds the mean of the `window` losses before it by more than std_devs
    standard deviations (OLMo-core's rule) is a spike. Spikes stay out of the window, so one does
    not hide the next; a run of them as long as the window is the loss's new level, and becomes the
    window. The first spike of each run is captured (Checkpoints.record_spike), up to max_captures.
    Each step's loss is copied to the host without waiting and read during the next step, so
    the device never idles for it. The state is saved with each checkpoint: a resumed run finds
    the same spikes.

    A spike's places: here the rule; Monitor.before_update reads it; Checkpoints.record_spike
    records and captures it (checkpoint.learning_dynamics), records.save_spike writes spikes/step_N/;
    Checkpoints.run_state saves the window; records.Records drops the spikes a resumed run replays."""

    def __init__(self, config, state: dict):
        self.std_devs, self.max_captures = config.std_devs, config.max_captures
        self.losses = collections.deque(state.get("window", []), maxlen=config.window)
        self.spiking = list(state.get("spiking", []))  # the losses of the run of spikes going on
        self.captured = state.get("captured", 0)
        self.pending = None  # (step, its loss on the way to the host, its batch, an event when there)
        # the latest spike: spike.json's record, its batch, whether it began a run and is captured
        self.spike, self.batch, self.first, self.capture = None, None, False, False

    def state(self) -> dict:
        return {"window": list(self.losses), "spiking": self.spiking, "captured": self.captured}

    def watch(self, step: int, loss: torch.Tensor, batch: torch.Tensor):
        """Step `step`'s global loss, trained on `batch`: its copy to the host starts now."""
        copied = None
        if loss.is_cuda:
            loss, copied = loss.to("cpu", non_blocking=True), torch.cuda.Event()  # into pinned memory
            copied.record()
        self.pending = step, loss, batch, copied

    def read(self) -> bool:
        """Whether the step watched last was a spike (then in self.spike)."""
        if self.pending is None:
            return False
        step, loss, batch, copied = self.pending
        self.pending = None
        if copied is not None:
            copied.synchronize()  # long done: the step after it is queued by now
        loss = loss.item()
        if not math.isfinite(loss):
            return False  # FiniteCheck's to report
        if len(self.losses) < self.losses.maxlen:
            self.losses.append(loss)
            return False
        window = np.array(self.losses)  # numpy's std: a fifth of the statistics module's time (2-core Xeon)
        mean, std = float(window.mean()), float(window.std())
        if loss <= mean + self.std_devs * std:
            self.losses.append(loss)
            self.spiking.clear()
            return False
        self.spiking.append(loss)
        self.first, self.batch = len(self.spiking) == 1, batch
        self.capture = self.first and self.captured < self.max_captures
        self.captured += self.capture
        self.spike = {"step": step, "loss": loss, "mean": mean, "std": std,
                      "deviations": (loss - mean) / std if std else math.inf}
        if len(self.spiking) == self.losses.maxlen:
            self.losses.extend(self.spiking)
            self.spiking.clear()
        return True


class StopSignals:
    """SIGTERM (a cluster's pre-emption notice) or SIGINT (Ctrl-C) asks the loop to save a
    checkpoint after the current step and exit 0. A second Ctrl-C kills at once.

    A stop's places: here; main, which asks every rank (distributed.any_rank) after each step and
    saves without evaluating, or saves the steps done when the wait for a batch ends
    (data.BatchStream.get's `until`); the resumed run, which evaluates and uploads what the stop
    skipped (Checkpoints.evaluate_and_upload); and `__main__`'s KeyboardInterrupt, outside the loop."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stopped(self, step: int, log) -> int:
        log.info(f"{self.received or 'another rank was signalled'}: stopped at step {step}; re-run the "
                 f"same command to resume")
        return 0

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)


class Diverged(Exception):
    """A non-finite loss or gradient norm: the message names the step."""


class FiniteCheck:
    """A loss or gradient norm that is not finite stops the run, naming the first step it came
    at, before any checkpoint of the weights it made is written. Each step's check stays on the
    device (the loop never waits for it); it is read at logging steps and before checkpoints."""

    def __init__(self, device: torch.device, flags):
        self.first, self.flags = torch.full((), -1, dtype=torch.long, device=device), flags

    def watch(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None):
        values = torch.stack([loss.float()] + ([grad_norm.float()] if grad_norm is not None else []))
        self.first = torch.where((self.first < 0) & ~torch.isfinite(values).all(), step, self.first)

    def check(self):
        first = int(self.first.item())
        if distributed.any_rank(first >= 0, self.flags):  # every rank stops at the same step
            where = f"at step {first}" if first >= 0 else "on another rank"
            raise Diverged(f"the loss or gradient norm is not finite {where}; stopped before saving those "
                           f"weights, checkpoints/latest is the last good checkpoint: resume with a lower "
                           f"training.optimization.lr or a training.optimization.max_grad_norm")


def lost_rank(error: RuntimeError, run: Run, timeout: float) -> BaseException:
    """What the loop raises for an error: where a collective failed because another rank died or
    stopped answering (for `timeout` seconds), one line naming it and what follows, said by the
    lowest surviving rank for all (the others exit 1 quietly); any other error as it is. torchrun
    then starts the group again, which resumes from checkpoints/latest: the steps since are lost."""
    if not distributed.lost_peer(error):
        return error
    lost, (world_size, rank) = distributed.lost_ranks(), distributed.world()
    if lost == []:  # every rank answered: none is lost
        return error
    if lost and min(set(range(world_size)) - set(lost)) != rank:
        return SystemExit(1)
    text = str(error).lower()
    who = "another rank" if lost is None else f"rank{'s' * (len(lost) > 1)} {', '.join(map(str, lost))}"
    hung = "timed out" in text or "timeout" in text
    why = f"no answer within training.collective_timeout={timeout:g} s" if hung else "connection closed"
    latest = checkpoint.latest_checkpoint(run.dir / "checkpoints")
    resume = f"step {latest.name.removeprefix('step_')}" if latest else "step 0"
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS")  # this node's torchrun's
    left = int(restarts or 0) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    used_up = f"no torchrun restarts left (--max-restarts={restarts}): " if restarts else ""
    then = (f"torchrun starts the group again ({left} of --max-restarts={restarts} left) and the run resumes"
            if left > 0 else f"{used_up}re-run the same command to resume")
    return distributed.LostRank(f"lost {who} ({why}); {then} from {resume}")


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
    except (ConfigError, data.DataError, checkpoint.CheckpointError, Diverged, distributed.LostRank) as e:
        sys.exit(report(e))
    except KeyboardInterrupt:  # Ctrl-C where StopSignals is not listening: before the loop (reading
        # the first shard, compiling), with nothing trained, or after it (the last uploads' wait)
        print("interrupted (Ctrl-C) outside the training steps: every checkpoint on disk is complete; "
              "re-run the same command to start or resume", file=sys.stderr)
        sys.exit(130)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
