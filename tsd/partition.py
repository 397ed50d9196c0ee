"""The one seam between the method and DeepSpeed: reading (and editing) full tensors that
may be partitioned by ZeRO-3.

Under ZeRO-3 every rank holds a flat slice of each parameter and the local `.data` is empty;
`deepspeed.zero.GatheredParameters` rebuilds the full tensors for the duration of a block. It
is a collective: every rank must enter it, for the same parameters, in the same order. Outside
ZeRO-3 these helpers do nothing, so the method code runs unchanged in a single process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from tsd import collectives


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's full shape, whether or not it is partitioned."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make `params` whole inside the block.

    modifier_rank=None: read-only on every rank. modifier_rank=k: rank k may edit the tensors
    in place, and its values are re-partitioned to every rank on exit.
    """
    zero_params = [p for p in params if is_partitioned(p)]
    if not zero_params:
        yield
        return
    import deepspeed  # only reached under ZeRO-3, where deepspeed is necessarily installed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def local_part(param: torch.Tensor) -> torch.Tensor:
    """This rank's share of the parameter's row-major data, without ZeRO-3's padding (the
    whole tensor, flattened, when it is not partitioned). Concatenated in rank order, the
    shares are the full tensor."""
    if not is_partitioned(param):
        return param.data.reshape(-1)
    local = param.ds_tensor.data.reshape(-1)
    start = _rank() * local.numel()
    return local[: max(0, min(local.numel(), param.ds_numel - start))]


def gather_to(params: Sequence[torch.Tensor], dst: int) -> list[torch.Tensor] | None:
    """The full tensors on rank `dst` only (None elsewhere), in one collective; every rank
    must call it with the same parameters.

    Unlike GatheredParameters (an all-gather: every rank holds every tensor), only `dst`
    assembles them, so ranks can each rebuild a different weight at the same time and memory
    stays at one full weight per rank. ZeRO-3 keeps a parameter as equal flat slices of its
    row-major data, padded at the end (`ds_tensor`); each rank sends its slices of all
    `params` as one byte buffer, and `dst` cuts every parameter's slices back out, in rank
    order, and drops the padding.
    """
    if not any(is_partitioned(p) for p in params):
        return [p.data for p in params] if _rank() == dst else None
    if not all(is_partitioned(p) for p in params):
        raise ValueError("gather_to: either all or none of the parameters must be ZeRO-3 partitioned")
    # Bytes, so that parameters of different dtypes travel together; put on the group's device
    # by the caller, so the weights arrive where the SVD runs (NCCL: the rank's GPU, also when
    # ZeRO-3 offloads the shards to CPU memory).
    local = [p.ds_tensor.data.reshape(-1).view(torch.uint8) for p in params]
    send = (local[0] if len(local) == 1 else torch.cat(local)).to(collectives.group_device())
    received = collectives.gather(send, dst)
    if received is None:
        return None
    by_rank = received.view(-1, send.numel())
    out, offset = [], 0
    for p, part in zip(params, local):
        raw = by_rank[:, offset : offset + part.numel()].reshape(-1)  # a view when it is one parameter
        offset += part.numel()
        if raw.storage_offset() % p.ds_tensor.element_size():
            raw = raw.clone()  # a byte offset the dtype cannot be viewed at
        out.append(raw.view(p.ds_tensor.dtype)[: p.ds_numel].view(p.ds_shape))
    return out


def set_master_copy(param: torch.Tensor, value: torch.Tensor) -> None:
    """After editing a trainable parameter in place (under ZeRO-3 inside GatheredParameters
    with a modifier rank), also overwrite the optimizer's fp32 master partition, which ZeRO-3,
    ZeRO-2 and DeepSpeed's bf16 optimizer keep apart from the parameter; otherwise the next
    optimizer step computes from the stale master copy and silently undoes the edit. Without
    a master copy (plain data parallel in fp32, one process) there is nothing to do; stage 0 in
    16 bits keeps masters this cannot reach (pipeline.training.engine.refresh_master_copies)."""
    if not master_copy_reachable(param):
        return
    # Deferred: tsd/ runs without DeepSpeed.
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if not is_partitioned(param):
        safe_set_full_fp32_param(param, value.to(torch.float32))
        return
    # ZeRO-3: this rank's slice, padded as ZeRO-3 pads the last one. DeepSpeed's full setter
    # (0.19.8) cuts past the end of the value on the last rank whenever the world size does not
    # divide the parameter's size (3 ranks and an r x 4096 factor, say) and raises.
    n = param.ds_tensor.numel()
    group = getattr(param, "ds_process_group", None)
    start = (dist.get_rank(group) if dist.is_initialized() else 0) * n
    flat = value.detach().reshape(-1).to(torch.float32)
    local = torch.zeros(n, dtype=torch.float32, device=flat.device)
    piece = flat[start : start + n]
    local[: piece.numel()] = piece
    safe_set_local_fp32_param(param, local)


def master_copy_reachable(param: torch.Tensor) -> bool:
    """Whether `set_master_copy` can write this parameter's optimizer master copy exactly
    (deepspeed.utils.safe_set_full_fp32_param's two paths: ZeRO-3's partitions, and the
    parameters ZeRO-1/2 and BF16_Optimizer link to their masters through `_hp_mapping`)."""
    return (is_partitioned(param) and hasattr(param, "_z3_optimizer")) or hasattr(param, "_hp_mapping")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
