"""Who this process is among the job's, which rows it holds, and the collectives every rank joins.

Under torchrun each process (a rank) trains on its block of every global batch (data.rank_rows)
and takes its block of each fixed set of rows (evaluation, probe, captures: `my_rows`); results
come back in data order by `gather_rows`, because the blocks in rank order are the rows in order.
A lone `python train.py` is rank 0 of a world of 1, and every helper here is then a no-op, so the
rest of the code never asks whether it runs distributed.

Machinery for several processes (docs/distributed.md); train.parallelize lists where FSDP differs.
"""

import datetime
import os
import secrets
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model import PicoDecoder, rope_tables


def world() -> tuple[int, int]:
    """(world size, rank) of this process in torch.distributed's group; (1, 0) outside one."""
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def start(backend: str, device: torch.device, group_of_one: bool, timeout: float = 600.0):
    """Join the job's process group: torchrun's (its environment names the rendezvous), or, with
    group_of_one (FSDP in a single process), a group of one. Returns a group for host-side flags:
    a gloo all-reduce of one number costs the GPU nothing, where an NCCL one would wait for it.
    timeout (training.collective_timeout, seconds): a collective fails when a rank does not arrive
    within it, so one rank's crash or hang ends the group instead of stalling it, and torchrun can
    start it again. It must outlast what rank 0 does while the others wait: writing a checkpoint
    of the largest model (xl: about 14 GB of weights and AdamW's moments, 12 bytes a parameter,
    written and checksummed at a few hundred MB/s to 2 GB/s: tens of seconds to a minute)."""
    under_torchrun = "MASTER_ADDR" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not under_torchrun and not group_of_one:
        return None
    if backend == "auto":  # config.validate refused NCCL without a GPU
        backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if backend == "nccl" else {}
    timeout = datetime.timedelta(seconds=timeout)
    if under_torchrun:  # torch's own env:// rendezvous, in a key space of this start's own
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        space = join_attempt(store, rank, world_size, timeout)
        options.update(store=dist.PrefixStore(f"pico/{space}/group", store), rank=rank, world_size=world_size)
        global _attempt
        _attempt = store, space
    else:
        options.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, timeout=timeout, **options)
    return dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None


# The store and key space of this start (join_attempt), where the survivors of a lost rank answer
# a roll call (lost_ranks).
_attempt = None


class LostRank(Exception):
    """A rank that died or stopped answering: the message names it and what happens next."""


def join_attempt(store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A key space for this start of the group, the same on every rank and new. torchrun's agent
    serves one store for the whole job (TORCHELASTIC_USE_AGENT_STORE), so a group started again
    after a lost rank finds the keys of the group before; a rank that reads a dead peer's address
    there fails to connect (gloo's connectFullMesh, NCCL's unique id), or waits for it. Nor can
    TORCHELASTIC_RESTART_COUNT name the space: each node's agent counts only its own restarts. So
    rank 0 draws a name and gives it to each rank in answer to a token that rank has just drawn,
    which no earlier start can have answered; a rank's answer stays until it says it has joined."""
    if rank != 0:
        token = secrets.token_hex(8)
        store.set(f"pico/ask/{rank}", token)
        try:
            space = store.get(f"pico/answer/{rank}/{token}").decode()  # waits up to the timeout
        except RuntimeError:  # the store's timeout
            raise LostRank(f"rank 0 did not answer within training.collective_timeout="
                           f"{timeout.total_seconds():g} s") from None
        store.set(f"pico/{space}/process/{rank}", f"{socket.gethostname()} {os.getpid()}")  # for lost_ranks
        store.set(f"pico/{space}/joined/{rank}", "1")
        return space
    space, waiting, answered = secrets.token_hex(8), set(range(1, world_size)), {}
    store.set(f"pico/{space}/process/0", f"{socket.gethostname()} {os.getpid()}")
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for r in sorted(waiting):
            if store.check([f"pico/{space}/joined/{r}"]):
                waiting.discard(r)
            elif store.check([f"pico/ask/{r}"]):  # this start's token, or a dead rank's: answer both
                token = store.get(f"pico/ask/{r}").decode()
                if answered.get(r) != token:
                    store.set(f"pico/answer/{r}/{token}", space)
                    answered[r] = token
        if waiting and time.monotonic() > deadline:
            raise LostRank(f"rank{'s' * (len(waiting) > 1)} {', '.join(map(str, sorted(waiting)))} did not "
                           f"join within training.collective_timeout={timeout.total_seconds():g} s")
        time.sleep(0.01)
    return space


# Survivors of a lost rank fail in the same collective, moments apart; a rank that has not answered
# the roll call by then is lost. (One busy outside any collective, as rank 0 writing a checkpoint
# while the others wait, answers late and is named too: only the message is wrong.)
ROLL_CALL_SECONDS = 5.0


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank died or stopped answering: torch's own
    errors for that (NCCL's, the store's), or gloo's transport failing (a closed connection, a
    timeout), which torch raises as a plain RuntimeError."""
    return _attempt is not None and isinstance(error, RuntimeError) and (
        isinstance(error, getattr(dist, "DistError", ())) or "gloo/transport" in str(error))


def lost_ranks() -> list[int] | None:
    """After a lost peer (lost_peer): the ranks that did not answer a roll call in this start's key
    space, every survivor answering for itself: at once where each silent one ran on this host and
    its process has ended or is stopped, else after ROLL_CALL_SECONDS. None if the store is gone
    too (outside torchrun's agent, rank 0 hosts it)."""
    (store, space), (world_size, rank) = _attempt, world()
    deadline = time.monotonic() + ROLL_CALL_SECONDS
    try:
        store.set(f"pico/{space}/alive/{rank}", "1")
        while True:
            missing = [r for r in range(world_size) if not store.check([f"pico/{space}/alive/{r}"])]
            if time.monotonic() > deadline or all(_ended_here(store.get(f"pico/{space}/process/{r}"))
                                                  for r in missing):
                return missing
            time.sleep(0.05)
    except RuntimeError:
        return None


def _ended_here(process: bytes) -> bool:
    """Whether a process ("HOST PID") ran on this host and has ended, or is stopped (SIGSTOP)."""
    host, pid = process.decode().split()
    if host != socket.gethostname() or not os.path.exists("/proc/self/stat"):
        return False  # known lost only by its silence
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no such process
        return True
    return state in ("Z", "X", "T", "t")  # a zombie, dead, stopped, stopped by a tracer


def barrier():
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, group) -> bool:
    """Whether the flag is set on any rank, so every rank acts on it at the same step."""
    if world()[0] == 1:
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return bool(votes.item())


def rank_slice(n: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous block of n fixed rows (evaluation, captures): in rank order the
    blocks are the rows in order, so gathering results across ranks is a concatenation."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def my_rows(rows):
    """This rank's block of fixed rows and every rank's number of rows, which gather_rows takes
    to put the results back in data order."""
    world_size, rank = world()
    blocks = [rank_slice(len(rows), world_size, r) for r in range(world_size)]
    return rows[blocks[rank]], [b.stop - b.start for b in blocks]


def gather_rows(mine: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's rows of a result (rank r: counts[r] of them), concatenated in rank order,
    which is data order."""
    if world()[0] == 1:
        return mine
    padded = mine.new_zeros(max(counts), *mine.shape[1:])  # all_gather: equal sizes
    padded[:len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def whole_model(model: PicoDecoder, sharded: bool, device: torch.device) -> PicoDecoder:
    """The model with all its weights on this rank, for what needs whole weights: the checkpoint's
    export, evaluation and captures (whose hooks and gradients need plain modules). Under FSDP
    (sharded) an unsharded copy, gathered by every rank; built on the meta device, so no memory or
    random numbers go to an initialisation that the gathered weights overwrite."""
    if not sharded:
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        whole = PicoDecoder(model.config)
    whole.to_empty(device=device).load_state_dict(state)
    whole.rope_cos, whole.rope_sin = (t.to(device) for t in rope_tables(model.config))
    return whole
