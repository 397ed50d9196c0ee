"""An on-disk cache of base-weight decompositions, keyed by the weights themselves.

Sweeps over ranks, seeds and methods decompose the same frozen base weights again and again;
the key is a SHA-256 of the weight's bytes, shape and dtype plus the SVD precision, so a
changed weight (another model, LoRA-Init's residual) can never hit a stale entry. Entries are
safetensors written atomically. Size: U, S, V of every target weight in the SVD precision
(about 2x the weights' fp32 size for square weights).

Under ZeRO-3 no rank holds a whole weight, and gathering every weight just to hash it would
cost more than the rest of a warm switch. So each rank hashes only its own slice, and the
slices' digests name the weight too (`partition_key`: the same slices in the same order are
the same bytes). An alias file maps that name to the content key; it is written when the
weight is first assembled (a miss), and a later switch with the same partitioning finds its
entries without moving any weight. Another world size partitions differently: its aliases
miss, the weight is assembled once, hashed, and found under its content key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tsd.directions import Decomposition


_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def _hash_bytes(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    if t.numel():
        h.update(t.view(torch.uint8).reshape(-1).numpy())  # the buffer itself: no copy of the weight


def weight_key(weight: torch.Tensor, svd_dtype: str) -> str:
    """The content key: the whole weight's bytes, shape, dtype and the SVD precision."""
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|{svd_dtype}|".encode())
    _hash_bytes(h, weight)
    return h.hexdigest()


def part_digest(part: torch.Tensor) -> bytes:
    """SHA-256 of one rank's slice of a weight (`tsd.partition.local_part`)."""
    h = hashlib.sha256()
    _hash_bytes(h, part)
    return h.digest()


def partition_key(shape: tuple[int, ...], dtype: torch.dtype, svd_dtype: str, digests: list[bytes]) -> str:
    """The key of a weight from its slices' digests in rank order (see the module's text).
    Slices are contiguous runs of the row-major data, so equal digests in equal order mean
    equal bytes; the number of slices is part of the key."""
    h = hashlib.sha256(f"partition|{tuple(shape)}|{dtype}|{svd_dtype}|{len(digests)}|".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


class SVDCache:
    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | str = "cpu") -> Decomposition | None:
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(p), framework="pt", device=str(device)) as f:
                # The stored weight's dtype bounds which singular values count (rank_tolerance);
                # an entry without it (written before it was recorded) is recomputed.
                weight_dtype = _DTYPES_BY_NAME[f.metadata()["weight_dtype"]]
                dec = Decomposition(U=f.get_tensor("U"), S=f.get_tensor("S"), V=f.get_tensor("V"),
                                    weight_dtype=weight_dtype)
        except Exception:  # a damaged entry is a miss, never an error: it is recomputed
            self.misses += 1
            return None
        self.hits += 1
        return dec

    def put(self, key: str, dec: Decomposition) -> None:
        tensors = {"U": dec.U.contiguous().cpu(), "S": dec.S.contiguous().cpu(), "V": dec.V.contiguous().cpu()}
        meta = {"weight_dtype": str(dec.weight_dtype).removeprefix("torch.")}
        self._write(self.path(key), lambda tmp: save_file(tensors, tmp, metadata=meta))

    def alias_path(self, alias: str) -> Path:
        return self.folder / f"{alias}.alias"

    def resolve(self, alias: str) -> str | None:
        """The content key an alias names, if the alias and its entry exist (else None)."""
        try:
            key = self.alias_path(alias).read_text().strip()
        except OSError:
            return None
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key) or not self.path(key).is_file():
            return None  # damaged alias or pruned entry: a miss, the weight is assembled again
        return key

    def put_alias(self, alias: str, key: str) -> None:
        self._write(self.alias_path(alias), lambda tmp: Path(tmp).write_text(key))

    def _write(self, dest: Path, write) -> None:
        """Write under a temporary name, then rename: a reader sees a whole file or none."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=dest.suffix, dir=self.folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
