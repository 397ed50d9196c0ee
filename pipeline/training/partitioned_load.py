"""Load a model folder's weights straight into each rank's ZeRO-3 slices: no rank ever holds the
whole model, not even while loading.

transformers' own ZeRO-3 path (`from_pretrained` under `HfDeepSpeedConfig`, 5.x) merges every
checkpoint file into one state dict on rank 0 and copies it into gathered parameters: rank 0
peaks at the whole model plus its slice (measured 3.8x a rank's share for a 2.3 GB model,
benchmarks/bench_memory_phases.py). Here the model is built empty and partitioned
(`from_config` under ZeRO-3 skips initialisation), and every rank reads from the safetensors
files only the rows that hold its slice of each parameter: ZeRO-3 keeps a parameter as equal
flat pieces of its row-major data, so rank k's piece of a tensor is a contiguous range, covered
by a few whole rows.

Anything this cannot map exactly (weights only in `.bin` files, a name transformers would rename
on load, a parameter no file has) falls back to `from_pretrained`, with a warning saying why:
correctness first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open



class CannotLoadPartitioned(Exception):
    """The folder's weights cannot be mapped one to one onto the model's parameters."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded via its index, or the single file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CannotLoadPartitioned(f"{folder} has no model.safetensors (or index); only safetensors are read here")


def load_partitioned(model: torch.nn.Module, folder: Path, new_modules: list[str] = ()) -> int:
    """Fill every ZeRO-3 parameter's local slice (and every buffer the files hold) from the
    folder's safetensors files. Returns the number of tensors read. Raises CannotLoadPartitioned
    before writing anything when a parameter is not in the files under its own name, unless it
    belongs to one of `new_modules` (a classification head the caller initialises itself)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights: every alias
    buffers = dict(model.named_buffers())
    prefix = getattr(model, "base_model_prefix", "")
    files = weight_files(folder)
    where: dict[str, tuple[Path, str]] = {}  # model name -> (file, key)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key if key in params or key in buffers else f"{prefix}.{key}"
                if name in params or name in buffers:
                    where[name] = (path, key)
    aliases: dict[int, list[str]] = {}  # tied weights are one parameter under several names
    for n, p in params.items():
        aliases.setdefault(id(p), []).append(n)
    fresh = tuple(new_modules)

    def is_new(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}" for m in fresh)

    missing = [n for n in params if not any(a in where for a in aliases[id(params[n])]) and not is_new(n)]
    if missing:
        raise CannotLoadPartitioned(f"{len(missing)} parameter(s) not found under their own name, e.g. {missing[0]}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    read = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name, (file, key) in where.items():
                if file != path:
                    continue
                if name in params:
                    _fill_slice(params[name], f.get_slice(key), rank, name)
                else:
                    buffers[name].data.copy_(f.get_tensor(key).to(buffers[name].dtype))
                read += 1
    return read


def _fill_slice(param: torch.Tensor, source, rank: int, name: str) -> None:
    shape = tuple(source.get_shape())
    full = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
    if shape != full:
        raise CannotLoadPartitioned(f"{name}: the file's shape {shape} is not the model's {full}")
    if not hasattr(param, "ds_tensor"):  # not partitioned (never under ZeRO-3's Init, but be exact)
        param.data.copy_(source[:].to(param.dtype))
        return
    local = param.ds_tensor.data.reshape(-1)
    numel = math.prod(shape)
    start = rank * local.numel()
    end = min(start + local.numel(), numel)
    local.zero_()  # ZeRO-3's padding after the last element stays zero
    if start >= end:
        return
    if len(shape) == 0:
        local[:1].copy_(source[:].reshape(-1).to(local.dtype))
        return
    row = math.prod(shape[1:])  # elements per row: rank k's range is covered by rows r0..r1
    r0, r1 = start // row, -(-end // row)
    block = source[r0:r1].reshape(-1)
    local[: end - start].copy_(block[start - r0 * row : end - r0 * row].to(local.dtype))
