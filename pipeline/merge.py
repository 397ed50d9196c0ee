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
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.file_checks import check_adapter_folder, check_model_folder
from pipeline.training.partitioned_load import CannotLoadPartitioned, weight_files

PEFT_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SIDECAR = "tsd_state.safetensors"  # tsd.export.SIDECAR; spelled out so `tsd merge` does not import tsd
# Files of a base folder that are weights (never copied: the merged shards replace them).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MergeError(ValueError):
    """The adapter, the base or the output folder cannot be merged as asked (a user error: exit 2)."""


# ----------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class Adapter:
    """What a merge needs from an adapter folder: the LoRA targets (module names in the task
    model's namespace), the whole tensors of `modules_to_save`, the scaling, the task."""

    path: Path
    scaling: float
    task_type: str  # PEFT's: CAUSAL_LM or SEQ_CLS
    targets: dict[str, tuple[str, str]]  # "<module>.weight" -> (lora_A key, lora_B key) in the file
    whole: dict[str, str]  # model key -> key in the file (a classifier head)
    base: str | None  # the base recorded at export
    labels: list[str] | None  # a classifier's class names (lora-tsd sidecar), in id order

    @property
    def weights_file(self) -> Path:
        return self.path / "adapter_model.safetensors"


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check an adapter folder's config and tensor names (no tensor data is loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"--adapter: {path} is not a folder; give an exported adapter folder (runs/<name>/adapter)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise MergeError(f"--adapter: {path} has no {name}; not a PEFT adapter folder (an export writes "
                             f"adapter_config.json and adapter_model.safetensors)")
    check_adapter_folder(path, "--adapter")  # a truncated or garbage file: named, exit 2
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as e:
        raise MergeError(f"--adapter: {path}/adapter_config.json is not JSON ({e})") from e
    _check_plain_lora(config, path)
    r = int(config["r"])
    scaling = float(config["lora_alpha"]) / (r ** 0.5 if config.get("use_rslora") else r)
    targets, whole = _adapter_keys(path, r)
    metadata = _sidecar_metadata(path)
    labels = json.loads(metadata["labels"]) if "labels" in metadata else None
    return Adapter(path=path, scaling=scaling, task_type=config.get("task_type") or "CAUSAL_LM", targets=targets,
                   whole=whole, base=config.get("base_model_name_or_path") or metadata.get("base_model") or None,
                   labels=labels)


def _check_plain_lora(config: dict, path: Path) -> None:
    """Refuse the PEFT variants whose merge is not `W + scaling B A` (lora-tsd never writes them)."""
    if config.get("peft_type") != "LORA":
        raise MergeError(f"--adapter: {path} is a {config.get('peft_type')} adapter; only LoRA adapters are merged")
    unsupported = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers", "lora_bias": "LoRA biases",
                   "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)"}
    for key, what in unsupported.items():
        if config.get(key):
            raise MergeError(f"--adapter: {path} uses {what}, which tsd merge does not handle; merge it with "
                             f"PEFT's merge_and_unload() instead")
    if config.get("task_type") not in (None, "CAUSAL_LM", "SEQ_CLS"):
        raise MergeError(f"--adapter: {path} has task_type {config['task_type']!r}; tsd merge writes CAUSAL_LM and "
                         f"SEQ_CLS models")


def _adapter_keys(path: Path, r: int) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Split the adapter file's keys into LoRA pairs (by target weight) and whole tensors."""
    pairs: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    with _open_safetensors(path / "adapter_model.safetensors", "--adapter") as f:
        for key in f.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
            if match:
                pairs.setdefault(match.group(1) + ".weight", {})[match.group(2)] = key
            elif ".lora_" in name:
                raise MergeError(f"--adapter: {path} holds {key}, not a plain LoRA tensor (LoRA on embeddings or "
                                 f"convolutions is not merged here)")
            else:
                whole[name] = key
            if match and f.get_slice(key).get_shape()[0 if match.group(2) == "A" else 1] != r:
                raise MergeError(f"--adapter: {path}: {key} has shape {f.get_slice(key).get_shape()}, "
                                 f"which does not fit rank r={r} of adapter_config.json")
    for weight, ab in pairs.items():
        if len(ab) != 2:
            lacking = "B" if "A" in ab else "A"
            raise MergeError(f"--adapter: {path}/adapter_model.safetensors has no lora_{lacking} for {weight[:-7]}; "
                             f"the adapter file is incomplete")
    if not pairs:
        raise MergeError(f"--adapter: {path}/adapter_model.safetensors holds no LoRA factors")
    return {w: (ab["A"], ab["B"]) for w, ab in pairs.items()}, whole


def _sidecar_metadata(path: Path) -> dict[str, str]:
    """The lora-tsd sidecar's metadata (class names, recorded base); empty for a stock PEFT adapter."""
    if not (path / SIDECAR).is_file():
        return {}
    with _open_safetensors(path / SIDECAR, "--adapter") as f:
        return dict(f.metadata() or {})


def _open_safetensors(file: Path, flag: str):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # truncated, or not safetensors at all
        raise MergeError(f"{flag}: {file} is not a readable safetensors file ({e})") from e


# ----------------------------------------------------------------------------- the base
def resolve_base(model: str | os.PathLike | None, adapter: Adapter) -> Path:
    """The base model folder: --model, else the one the adapter records; it must hold
    config.json and safetensors weights."""
    if model is None:
        if not adapter.base:
            raise MergeError(f"--model is required: the adapter {adapter.path} records no base model path")
        if not Path(adapter.base).is_dir():
            raise MergeError(f"the adapter's base model {adapter.base} (recorded in {adapter.path}/adapter_config.json) "
                             f"is not a folder here; give the base model folder with --model")
    path = Path(model if model is not None else adapter.base)
    if not (path / "config.json").is_file():
        raise MergeError(f"--model: {path} is not a Hugging Face model folder (no config.json)")
    check_model_folder(path, "--model")  # truncated weights, config or tokenizer files: named, exit 2
    try:
        weight_files(path)
    except CannotLoadPartitioned as e:
        raise MergeError(f"--model: {path} holds no safetensors weights (model.safetensors or {INDEX}); convert it "
                         f"once with AutoModelForCausalLM.from_pretrained(...).save_pretrained(...)") from e
    return path


@dataclass(frozen=True)
class TaskModel:
    """The names the merged folder must hold, read from the adapter's task model built on the
    meta device (no memory): parameter and buffer names, which names are one tied tensor, and
    the prefix a bare encoder's weight names lack."""

    config: object  # the transformers config the merged folder declares
    parameters: frozenset[str]
    buffers: frozenset[str]
    tied: dict[str, str]  # alias -> the name it is saved under (e.g. lm_head.weight -> model.embed_tokens.weight)
    prefix: str


def task_model(base: Path, adapter: Adapter) -> TaskModel:
    """The adapter's task model (causal LM, or classifier over the base) on the meta device: the
    class, not the files, says which names a folder of it must hold and which are tied."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # deferred: ~2 s

    config = AutoConfig.from_pretrained(str(base))
    if adapter.task_type == "SEQ_CLS":
        _classifier_config(config, base, adapter)
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as e:  # an architecture this transformers does not know, a broken config
        raise MergeError(f"--model: transformers cannot build a {auto.__name__[12:]} from {base}/config.json ({e})") from e
    if adapter.task_type == "SEQ_CLS":
        config.architectures = [type(model).__name__]
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = {}
    for name, tensor in state.items():  # module order: the embedding comes before the lm_head tied to it
        owner = first.setdefault(id(tensor), name)
        if owner != name:
            tied[name] = owner
    buffers = frozenset(n for n, _ in model.named_buffers())
    return TaskModel(config=config, parameters=frozenset(state) - buffers, buffers=buffers & frozenset(state),
                     tied=tied, prefix=getattr(model, "base_model_prefix", "") or "")


def _classifier_config(config, base: Path, adapter: Adapter) -> None:
    """A classifier's config as training set it (pipeline.model_task.head_config): the classes
    (named when the lora-tsd sidecar records them) and, for a decoder, the pad token it pools at."""
    from pipeline.model_task import HEAD_MODULES, head_config

    heads = [k for k in adapter.whole if k.endswith(tuple(f"{h}.weight" for h in HEAD_MODULES))]
    if not heads:
        raise MergeError(f"--adapter: {adapter.path} is a SEQ_CLS adapter without a saved head "
                         f"({', '.join(HEAD_MODULES)}); its classifier cannot be rebuilt")
    with _open_safetensors(adapter.weights_file, "--adapter") as f:
        num_labels = f.get_slice(adapter.whole[heads[0]]).get_shape()[0]
    labels = adapter.labels if adapter.labels and len(adapter.labels) == num_labels else None
    head_config(config, num_labels, labels, _pad_token_id(base) if getattr(config, "pad_token_id", None) is None else None)


def _pad_token_id(base: Path) -> int | None:
    """The pad id training used: the tokenizer's, else its eos (pipeline.training.engine.load_model)."""
    from transformers import AutoTokenizer  # deferred with the rest of transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except Exception:  # no tokenizer in the folder: the config has nothing better to say
        return None
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
