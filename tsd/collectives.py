"""Every torch.distributed collective of the project, in one place, under one rule.

The rule: a tensor handed to a collective lives on the process group's device (NCCL: this
rank's GPU; gloo: the CPU), and what comes back lives on the device of the tensor the caller
handed in. Callers pass tensors from wherever they have them (a loss on the GPU, a flag built
on the CPU) and never think about the backend; `tests/test_collectives.py` fails when code in
pipeline/ or tsd/ calls a torch.distributed collective anywhere else.

Why one module and not a process group whose per-device backends make CPU tensors legal
("cpu:gloo,cuda:nccl"): the group is created by three launchers in three ways (Ray Train's
TorchConfig takes one backend name, DeepSpeed's init_distributed and torchrun's env:// another),
and a second backend is a second set of connections to set up, time out and tear down on every
node, for messages of a few numbers. Here the cost is a copy of those few numbers to the GPU
and back (docs/BENCHMARKS.md, "Collectives"); on gloo nothing moves.

Without a process group, or in a group of one, the collectives return their input and call
nothing. `TSD_FORCE_COLLECTIVES=1` (a debug switch) sends them through the group even alone, so
one GPU exercises every collective path under NCCL (benchmarks/gpu_check.py).

Object collectives (pickled Python values) use the device torch picks for the backend: under
NCCL the current GPU, which is why a process binds `cuda:LOCAL_RANK` before its first
collective (pipeline.training.distributed.bind_device).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

FORCE_ENV = "TSD_FORCE_COLLECTIVES"

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether collectives go through the process group: more than one rank, or forced."""
    if not initialized():
        return False
    return dist.get_world_size() > 1 or os.environ.get(FORCE_ENV) == "1"


def group_device() -> torch.device:
    """Where tensors must be for this process group's collectives: the current GPU under NCCL,
    else the CPU (gloo)."""
    if initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_group(t: torch.Tensor) -> torch.Tensor:
    # A copy even when already there: the collectives below work in place, and the caller's
    # tensor must not change under it.
    return t.detach().to(group_device(), copy=True)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The element-wise sum (max, min) over ranks of `t`, as a new tensor on t's device."""
    if not active():
        return t.detach().clone()
    work = _to_group(t)
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
    return work.to(t.device)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (the same shape and dtype on every rank), in rank order, on t's device."""
    if not active():
        return [t.detach().clone()]
    work = _to_group(t)
    out = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(out, work)
    return [o.to(t.device) for o in out]


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """Rank `src`'s `t` on every rank, on the device of each rank's `t` (the others pass a
    tensor of the same shape and dtype whose values are ignored)."""
    if not active():
        return t
    work = _to_group(t)
    dist.broadcast(work, src=src)
    return work.to(t.device)


def gather(t: torch.Tensor, dst: int) -> torch.Tensor | None:
    """Every rank's flat `t` (the same size everywhere) on rank `dst` as ONE buffer of
    world x numel elements in rank order, on the device of dst's `t`; None elsewhere."""
    if not active():
        return t.detach().reshape(-1).clone() if dst == 0 else None
    work = _to_group(t).reshape(-1)
    if dist.get_rank() != dst:
        dist.gather(work, None, dst=dst)
        return None
    received = torch.empty(dist.get_world_size() * work.numel(), dtype=work.dtype, device=work.device)
    dist.gather(work, list(received.split(work.numel())), dst=dst)
    return received.to(t.device)


def barrier() -> None:
    """Every rank waits for every other (nothing without a group)."""
    if not active():
        return
    if group_device().type == "cuda":
        # The bound GPU, named: left to itself NCCL guesses device 0 and warns.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
