"""`tsd merge`: an adapter folded into its base model, written as a plain Hugging Face model folder.

Serving stacks (vLLM, TGI) and `from_pretrained` load the result as is: safetensors shards in the
base's dtype (with `model.safetensors.index.json` when there are several), the base's config,
generation config and tokenizer files. No PEFT and no lora-tsd file is needed to load it.

The adapter is a stock PEFT LoRA adapter (a lora-tsd export or PEFT's own): the export already
folds the dash term and LoRA-Init's `[B | -B0][A ; A0]` form into the PEFT factors
(tsd/export.py), so each target weight becomes what PEFT's merge computes,

    W' = W + scaling * B @ A,

here in float32 (float64 for a float64 base) and rounded once to the base dtype, the arithmetic of
`TSDLinear.merge` (PEFT rounds the update to a 16-bit dtype before adding it: twice). A
classifier's head (`modules_to_save`) comes from the adapter.

Why it lives in pipeline/ and not tsd/: it works on model folders through transformers (the
model class of the adapter's task defines the weight names, ties and the head's config) and on
`pipeline.model_task`'s rules for that head; tsd/ is the method on a torch module and stays light.

Host memory stays near one output shard: the base is read one tensor at a time
(`safe_open`), each target's factors are read when it is reached, and a shard is written as soon
as the next tensor would overflow it. The folder is written under a hidden temporary sibling and
renamed into place at the end: an interrupted merge never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.merge_inputs import (INDEX, Adapter, MergeError, TaskModel, _open_safetensors, read_adapter,
                                   resolve_base, task_model)
from pipeline.training.partitioned_load import weight_files

# Files of a base folder that are weights (never copied: the merged shards replace them).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every tensor of the merged folder, in writing order, and where it comes from."""

    entries: list[tuple[str, Path | None, str]] = field(default_factory=list)  # (out key, base file or None: adapter, key)
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)  # out key -> (lora_A, lora_B) keys
    dropped: list[str] = field(default_factory=list)  # base tensors the task model does not have
    dtype: torch.dtype = torch.float32  # the base's dtype (of the weights the adapter changes)


def plan_merge(base: Path, adapter: Adapter, schema: TaskModel) -> Plan:
    """Map the base files' names onto the task model, check that every target and every
    parameter is found, with fitting shapes, before anything is written."""
    plan, seen, shapes, dtypes = Plan(), set(), {}, {}
    known = schema.parameters | schema.buffers
    for file in weight_files(base):
        with _open_safetensors(file, "--model") as f:
            for key in f.keys():
                name = key if key in known or not schema.prefix else f"{schema.prefix}.{key}"
                if name not in known and adapter.task_type == "SEQ_CLS":
                    plan.dropped.append(key)  # e.g. a decoder's lm_head under a classifier
                    continue
                name = name if name in known else key  # a name transformers maps itself: kept as the base has it
                canonical = schema.tied.get(name, name)
                if canonical in seen or name in adapter.whole:
                    continue  # a tied alias saved already; a head the adapter replaces
                seen.add(canonical)
                sl = f.get_slice(key)
                shapes[canonical], dtypes[canonical] = tuple(sl.get_shape()), sl.get_dtype()
                plan.entries.append((canonical, file, key))
    _check_targets(plan, adapter, schema, shapes, base)
    plan.entries += [(name, None, key) for name, key in adapter.whole.items()]
    seen |= set(adapter.whole)
    missing = sorted(p for p in schema.parameters if schema.tied.get(p, p) not in seen)
    if missing:
        raise MergeError(f"--model: {base} has no weight {missing[0]} ({len(missing)} missing) that "
                         f"{type(schema.config).__name__[:-6]} needs; is it the adapter's base model?")
    plan.dtype = _dtype(Counter(dtypes[t] for t in plan.targets).most_common(1)[0][0])
    return plan


def _check_targets(plan: Plan, adapter: Adapter, schema: TaskModel, shapes: dict, base: Path) -> None:
    with _open_safetensors(adapter.weights_file, "--adapter") as f:
        for weight, (a_key, b_key) in adapter.targets.items():
            if weight in schema.tied or weight in schema.tied.values():
                raise MergeError(f"--adapter: {adapter.path} changes {weight}, which {base} ties to another weight; "
                                 f"merging would change both")
            if weight not in shapes:
                raise MergeError(f"--adapter: {adapter.path} targets {weight[:-7]}, which {base} does not have; is "
                                 f"--model the base this adapter was trained on?")
            out_dim, in_dim = f.get_slice(b_key).get_shape()[0], f.get_slice(a_key).get_shape()[1]
            if shapes[weight] != (out_dim, in_dim):
                raise MergeError(f"--adapter: {weight} is {tuple(shapes[weight])} in {base} but the adapter's update "
                                 f"is {(out_dim, in_dim)}; is --model the base this adapter was trained on?")
            plan.targets[weight] = (a_key, b_key)


def _dtype(safetensors_dtype: str) -> torch.dtype:
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if safetensors_dtype not in names:
        raise MergeError(f"--model: the adapter's target weights are stored as {safetensors_dtype}; tsd merge folds "
                         f"updates into float weights only (quantized bases are not supported)")
    return names[safetensors_dtype]


# ----------------------------------------------------------------------------- the arithmetic
@torch.no_grad()
def fold_update(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in float32 (float64 for a float64 base), rounded once to W's dtype:
    the arithmetic of TSDLinear.merge, so a 16-bit base is rounded once, not twice as PEFT does."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    update = lora_B.to(acc) @ lora_A.to(acc)
    update.mul_(scaling).add_(weight.to(acc))  # in place: one temporary of W's size, not three
    return update.to(weight.dtype)


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """Collects tensors into shards of at most `limit` bytes (a tensor larger than that gets a
    shard of its own) and writes each one as soon as it is full: host memory holds one shard."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard and give the files their final names: model.safetensors when
        there is one, else model-0000k-of-0000n.safetensors and the index, as save_pretrained."""
        self.flush()
        if len(self.files) == 1:
            (self.folder / self.files[0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.files)
        final = {old: old.replace(".safetensors", f"-of-{n:05d}.safetensors") for old in self.files}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        index = {"metadata": {"total_size": self.total}, "weight_map": {k: final[v] for k, v in self.weight_map.items()}}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(final.values())


def write_tensors(plan: Plan, adapter: Adapter, writer: ShardWriter, progress: bool) -> None:
    """Stream the base one tensor at a time, fold the update into each target, hand every tensor
    to the writer. The adapter file stays open: each target's factors are read when reached."""
    bar = tqdm(total=len(plan.entries), desc="merge", unit="tensor", file=sys.stderr, disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    with _open_safetensors(adapter.weights_file, "--adapter") as lora, bar:
        for file, entries in _by_file(plan.entries):
            source = _open_safetensors(file, "--model") if file is not None else lora
            with source:
                for name, key in entries:
                    tensor = source.get_tensor(key)
                    if name in plan.targets:
                        a_key, b_key = plan.targets[name]
                        tensor = fold_update(tensor, lora.get_tensor(a_key), lora.get_tensor(b_key), adapter.scaling)
                    elif file is None and tensor.is_floating_point():
                        tensor = tensor.to(plan.dtype)  # a head trained in float32, stored as the base is
                    writer.add(name, tensor)
                    bar.update()


def _by_file(entries: list[tuple[str, Path | None, str]]):
    """Consecutive entries grouped by their source file (the plan keeps each file's run together)."""
    group: list[tuple[str, str]] = []
    current = object()
    for name, file, key in entries:
        if file != current and group:
            yield current, group
            group = []
        current = file
        group.append((name, key))
    if group:
        yield current, group


def copy_side_files(base: Path, out: Path, schema: TaskModel, adapter: Adapter) -> list[str]:
    """Every top-level file of the base that is not a weight (config, generation config,
    tokenizer, license). A classifier's config.json is written anew: its head and classes."""
    copied = []
    for item in sorted(base.iterdir()):
        if item.is_file() and not item.name.startswith(".") and not WEIGHT_FILE.fullmatch(item.name):
            if item.name == "config.json" and adapter.task_type == "SEQ_CLS":
                continue
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    if adapter.task_type == "SEQ_CLS":
        schema.config.save_pretrained(str(out))
        copied.append("config.json")
    return sorted(copied)


# ----------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class MergeResult:
    out: Path
    base: Path
    shards: list[str]
    tensors: int
    merged: int  # target weights that received an update
    heads: list[str]  # tensors taken whole from the adapter
    dropped: list[str]  # base tensors the task model does not use
    total_bytes: int
    dtype: torch.dtype
    copied: list[str]
    task_type: str

    def lines(self) -> list[str]:
        shards = f"{len(self.shards)} shard{'s' * (len(self.shards) > 1)}"
        lines = [f"folded the adapter into {self.merged} weights of {self.base}: {self.tensors} tensors, "
                 f"{self.total_bytes / 1e6:.1f} MB {str(self.dtype)[6:]} in {shards}"]
        if self.heads:
            lines.append(f"from the adapter, whole: {', '.join(self.heads)}")
        if self.dropped:
            lines.append(f"left out (not part of the classifier): {', '.join(self.dropped[:4])}"
                         + (f" and {len(self.dropped) - 4} more" if len(self.dropped) > 4 else ""))
        auto = "AutoModelForSequenceClassification" if self.task_type == "SEQ_CLS" else "AutoModelForCausalLM"
        lines.append(f"model folder: {self.out} (loads with {auto}.from_pretrained alone; vLLM and TGI serve it as is)")
        return lines


def parse_size(text: str | int) -> int:
    """'2GB' (decimal units, as transformers' max_shard_size), '500MiB' (binary) or a byte count."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise MergeError(f"--max-shard-size: {text!r} is not a size; give e.g. 2GB, 500MB or 4GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def check_out(out: Path) -> None:
    """Refuse an output folder that holds anything (never overwrite a model)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out: {out} exists and is not empty; give a new folder (or remove this one)")


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                  max_shard_size: str | int = "2GB", progress: bool = True) -> MergeResult:
    """Fold the adapter at `adapter_dir` into its base (`model`, default: the base it records)
    and write the result to `out_dir` as a Hugging Face model folder. Every input is checked
    before anything is written; raises MergeError (a user error) with what to do."""
    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    check_out(out)
    adapter = read_adapter(adapter_dir)
    base = resolve_base(model, adapter)
    schema = task_model(base, adapter)
    plan = plan_merge(base, adapter, schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        writer = ShardWriter(tmp, limit)
        write_tensors(plan, adapter, writer, progress)
        shards = writer.finish()
        copied = copy_side_files(base, tmp, schema, adapter)
        check_out(out)  # it may have appeared while we wrote
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out=out, base=base, shards=shards, tensors=len(plan.entries), merged=len(plan.targets),
                       heads=sorted(adapter.whole), dropped=plan.dropped, total_bytes=writer.total, dtype=plan.dtype,
                       copied=copied, task_type=adapter.task_type)
