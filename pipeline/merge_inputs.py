"""What `tsd merge` merges (pipeline.merge): the adapter (a stock PEFT LoRA adapter, a lora-tsd
export or PEFT's own: its config, its factors' names and the classifier head it carries) and the
base model folder it was trained on (the recorded one, or the one given), with the model class of
the adapter's task that fixes the weight names, ties and the head's config.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.file_checks import check_adapter_folder, check_model_folder
from pipeline.training.partitioned_load import CannotLoadPartitioned, weight_files

PEFT_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SIDECAR = "tsd_state.safetensors"  # tsd.export.SIDECAR; spelled out so `tsd merge` does not import tsd
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
    from pipeline.classification.head import HEAD_MODULES, head_config

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
