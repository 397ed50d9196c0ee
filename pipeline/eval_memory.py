"""Where the evaluation after training generates: a whole copy of the model per rank, or the
ZeRO-3 model itself (pipeline.eval_after_training.evaluate_after_training).

The decision is taken after training's optimizer state is freed (release_training_state), and
counts what the device of each rank really has for the copy:

- on a GPU: the free memory the driver reports, the caching allocator's reserved-but-unused
  blocks (torch reuses them; `mem_get_info` counts them as used), and this rank's slices of the
  partitioned model, which are freed before a whole copy is built;
- on CPU: the node's available memory shared by its ranks, plus this rank's slices likewise.

`decide_eval_model` is the pure rule on those numbers; `choose_eval_model` measures them on
every rank and takes the smallest (every rank must reach the same answer: the partitioned path
is collective).
"""

from __future__ import annotations

import torch

from pipeline.training.memory import release_freed_heap
from tsd import collectives
from tsd.partition import is_partitioned

EVAL_WHOLE = "whole"  # each rank its own unpartitioned copy: fast generation, one model per rank
EVAL_PARTITIONED = "partitioned"  # the ZeRO-3 model itself: memory model/world, every token gathers
EVAL_TRAINED = "trained"  # ZeRO-2 / data parallel: the trained model, whole on every rank already
# A whole copy costs its weights plus generation's own memory (activations, beams' KV cache);
# the headroom below covers the latter for the harness's batch sizes.
WHOLE_COPY_HEADROOM = 1.25
GiB = 2**30


def model_bytes(module) -> int:
    """Bytes of the whole model (parameters at their full size, partitioned or not, and buffers)."""
    params = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in module.parameters())
    return params + sum(b.numel() * b.element_size() for b in module.buffers())


def partitioned_share_bytes(module) -> int:
    """Bytes of this rank's own slices of the partitioned parameters (freed for a whole copy)."""
    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters() if is_partitioned(p))


def room_on_gpu(free: int, reserved: int, allocated: int, share: int) -> int:
    """Bytes a whole copy can use on this rank's GPU: the driver's free memory, the allocator's
    reserved-but-unused blocks, and this rank's model slices (`share`, freed before the copy)."""
    return free + max(reserved - allocated, 0) + share


def room_on_host(available: int, ranks_on_node: int, share: int) -> int:
    """Bytes a whole copy can use on a CPU rank: the node's available memory shared by its ranks,
    plus this rank's model slices (`share`, freed before the copy)."""
    return available // max(ranks_on_node, 1) + share


def decide_eval_model(setting: str, partitioned: bool, need: int, room: int | None, room_source: str,
                      headroom: float = WHOLE_COPY_HEADROOM) -> tuple[str, str]:
    """(EVAL_WHOLE, EVAL_PARTITIONED or EVAL_TRAINED, why), from the numbers alone.

    setting: train.eval_model; partitioned: the trained model is ZeRO-3 partitioned; need: the
    whole model's bytes; room: the smallest over the ranks of what a whole copy may use (None
    when `setting` is not auto: nothing measured)."""
    if not partitioned:  # ZeRO-2 / data parallel: whole on every rank already, no copy needed
        return EVAL_TRAINED, "the trained model is whole on every rank (not ZeRO-3)"
    if setting != "auto":
        return setting, f"train.eval_model: {setting}; the whole model is {need / GiB:.2f} GiB"
    fits = room is not None and need * headroom <= room
    return (EVAL_WHOLE if fits else EVAL_PARTITIONED), (
        f"the whole model, {need / GiB:.2f} GiB x {headroom} headroom, {'fits' if fits else 'does not fit'} "
        f"every rank's room of {(room or 0) / GiB:.2f} GiB ({room_source}); train.eval_model: whole|partitioned "
        f"overrides")


def measured_room(module) -> tuple[int, str]:
    """(bytes, how counted): what a whole copy may use on this rank, measured now (after the
    optimizer state is freed). Every rank must call it (ranks per node are counted collectively)."""
    share = partitioned_share_bytes(module)
    if torch.cuda.is_available():  # the GPU bind_device bound this rank to
        free, _ = torch.cuda.mem_get_info()
        room = room_on_gpu(free, torch.cuda.memory_reserved(), torch.cuda.memory_allocated(), share)
        return room, "free GPU memory + the allocator's unused reserve + this rank's model slices"
    import socket

    release_freed_heap()  # what training freed counts as available only once the heap hands it back
    hosts = collectives.all_gather_object(socket.gethostname()) if collectives.active() else [socket.gethostname()]
    local = max(1, hosts.count(socket.gethostname()))
    return (room_on_host(_mem_available(), local, share),
            f"MemAvailable / {local} rank(s) on this node + this rank's model slices")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def choose_eval_model(cfg, module) -> tuple[str, str]:
    """(EVAL_WHOLE, EVAL_PARTITIONED or EVAL_TRAINED, why) for the evaluation after training.
    Every rank calls it, after release_training_state freed the optimizer state, and all get
    the same answer: the room is workers.memory_budget_gb, else the smallest measured room."""
    setting, need = cfg.train.eval_model, model_bytes(module)
    partitioned = any(is_partitioned(p) for p in module.parameters())
    room, source = None, ""
    if partitioned and setting == "auto":
        if cfg.workers.memory_budget_gb is not None:
            room, source = int(cfg.workers.memory_budget_gb * GiB), "workers.memory_budget_gb"
        else:
            room, source = measured_room(module)
            if collectives.active():
                room = int(collectives.all_reduce(torch.tensor([room], dtype=torch.int64), op="min").item())
                source += ", the smallest over the ranks"
    return decide_eval_model(setting, partitioned, need, room, source)
