"""Export to a stock PEFT LoRA adapter (exact), with a sidecar of the raw TSD state; import back.

The dash term folds into a LoRA of rank r + s with the same scaling (METHOD.md):

    scaling * B A + c U_s diag(d) V_s^T = scaling * [B | c U_s diag(d) / scaling] [A ; V_s^T]

(c = scaling when `dash_scaled`, else 1). LoRA-Init / LoRA-TSD moved the base weight to
W_res = W - scaling B0 A0, so the update is exported against the ORIGINAL W, as PEFT does for
PiSSA: [B | -B0 | ...] [A ; A0 ; ...], rank 2r + s. `PeftModel.from_pretrained` on the original
base model then reproduces this project's outputs without this project.

Files:  adapter_config.json, adapter_model.safetensors (stock PEFT)
        tsd_state.safetensors (every TSD-layer tensor + metadata: config, method, base model)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from tsd.config import TSDConfig
from tsd.inject import inject, saved_modules, tsd_layers
from tsd.layer import TSDLinear, subtract_update_
from tsd.partition import gathered

SIDECAR = "tsd_state.safetensors"
FORMAT = "lora-tsd/1"


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete or does not fit the model."""


def layer_state(layer: TSDLinear) -> dict[str, torch.Tensor]:
    """The layer's own tensors (everything but the frozen base), full and on CPU.
    Under ZeRO-3 this gathers: every rank must call it, for the same layers, in order."""
    params = [layer.lora_A, layer.lora_B] + ([layer.dash_scalars] if layer.dash_size else [])
    with gathered(params):
        return {
            k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in layer.state_dict().items()
            if not k.startswith("base_layer.")
        }


def collect_state(model: nn.Module, modules_to_save: list[str] = ()) -> dict[str, torch.Tensor]:
    """All TSD layers' tensors keyed `<module name>.<tensor>`, and the parameters of the
    modules trained whole (`modules_to_save`, e.g. a classification head) keyed
    `<module name>.<parameter>` (a collective under ZeRO-3)."""
    state = {}
    for name, layer in tsd_layers(model):
        for k, v in layer_state(layer).items():
            state[f"{name}.{k}"] = v
    for name, module in saved_modules(model, list(modules_to_save)):
        for k, param in module.named_parameters():
            with gathered([param]):
                state[f"{name}.{k}"] = param.detach().to("cpu", copy=True).contiguous()
    return state


def peft_factors(layer: TSDLinear, state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked (A', B') of one layer such that layer.scaling * B' A' is its update to the
    ORIGINAL base weight."""
    A = state[prefix + "lora_A"].float()
    B = state[prefix + "lora_B"].float()
    blocks_A, blocks_B = [A], [B]
    if layer.keep_init:
        blocks_A.append(state[prefix + "init_A0"].float())
        blocks_B.append(-state[prefix + "init_B0"].float())
    if layer.dash_size:
        c = layer.scaling if layer.dash_scaled else 1.0
        active = int(state[prefix + "dash_step"]) >= 0
        U = state[prefix + "dash_U"].float()
        d = state[prefix + "dash_scalars"].float() if active else torch.zeros(layer.dash_size)
        blocks_A.append(state[prefix + "dash_V"].float().t())
        blocks_B.append(U * d * (c / layer.scaling))
    return torch.cat(blocks_A, 0).contiguous(), torch.cat(blocks_B, 1).contiguous()


def export_rank(config: TSDConfig) -> int:
    return config.r * (2 if config.uses_init else 1) + config.dash_size


def peft_alpha(config: TSDConfig) -> float:
    """lora_alpha' such that the exported rank keeps the same scaling."""
    r_out = export_rank(config)
    return config.scaling * (math.sqrt(r_out) if config.use_rslora else r_out)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: TSDConfig,
    base_model_name_or_path: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write the PEFT adapter and the sidecar to `out_dir` atomically (a temporary folder,
    renamed into place when complete). `state` is `collect_state(model)` when already gathered
    (under ZeRO-3: gather on every rank, write on one). `task_type` is PEFT's (CAUSAL_LM,
    SEQ_CLS): it picks the model class `AutoPeftModel` rebuilds."""
    from peft import LoraConfig  # deferred: importing peft takes ~1 s and `import tsd` must stay light

    state = collect_state(model, config.modules_to_save) if state is None else state
    layers = tsd_layers(model)
    if not layers:
        raise AdapterError("the model holds no TSD layers: nothing to export")
    peft_tensors = {}
    for name, layer in layers:
        A, B = peft_factors(layer, state, name + ".")
        peft_tensors[f"base_model.model.{name}.lora_A.weight"] = A
        peft_tensors[f"base_model.model.{name}.lora_B.weight"] = B
    for name, module in saved_modules(model, config.modules_to_save):  # PEFT's key: no "modules_to_save.default"
        for k, _ in module.named_parameters():
            peft_tensors[f"base_model.model.{name}.{k}"] = state[f"{name}.{k}"]
    peft_config = LoraConfig(
        r=export_rank(config),
        lora_alpha=peft_alpha(config),
        target_modules=list(config.targets),
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        bias="none",
        modules_to_save=list(config.modules_to_save) or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    metadata = {
        "format": FORMAT,
        "tsd_config": json.dumps(config.to_dict()),
        "base_model": base_model_name_or_path or "",
        **(extra_metadata or {}),
    }

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        peft_config.save_pretrained(str(tmp))
        save_file(peft_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file(state, str(tmp / SIDECAR), metadata=metadata)
        check_adapter_dir(tmp, expected_tensors=len(peft_tensors))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_adapter_dir(path: str | os.PathLike, expected_tensors: int | None = None) -> None:
    """Refuse an adapter folder that is incomplete or empty (the ZeRO-3 40-byte adapter)."""
    path = Path(path)
    for f in ("adapter_config.json", "adapter_model.safetensors", SIDECAR):
        if not (path / f).is_file():
            raise AdapterError(f"{path}: missing {f}; not a complete lora-tsd adapter")

    def _open(f: str):
        try:
            return safe_open(str(path / f), "pt")
        except Exception as e:  # truncated or not safetensors at all
            raise AdapterError(f"{path}/{f}: not a readable safetensors file ({e})") from e

    with _open(SIDECAR):
        pass
    with _open("adapter_model.safetensors") as fh:
        keys = list(fh.keys())
        if not keys or (expected_tensors is not None and len(keys) != expected_tensors):
            raise AdapterError(f"{path}/adapter_model.safetensors holds {len(keys)} tensors, expected {expected_tensors}")
        for k in keys:
            if fh.get_slice(k).get_shape() and 0 in fh.get_slice(k).get_shape():
                raise AdapterError(f"{path}/adapter_model.safetensors: tensor {k} is empty (was it saved unpartitioned?)")


def read_sidecar(path: str | os.PathLike) -> tuple[TSDConfig, dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    check_adapter_dir(path)
    with safe_open(str(path / SIDECAR), "pt") as fh:
        metadata = fh.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{path / SIDECAR}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    config = TSDConfig(**json.loads(metadata["tsd_config"]))
    return config, load_file(str(path / SIDECAR)), metadata


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> TSDConfig:
    """Inject TSD layers into the ORIGINAL base `model` and restore the exported state, so it
    evaluates identically and can continue training (LoRA-Init's residual base is rebuilt as
    W - scaling B0 A0)."""
    config, state, _ = read_sidecar(path)
    apply_state(model, config, state, source=str(path))
    return config


@torch.no_grad()
def apply_state(model: nn.Module, config: TSDConfig, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """`load_adapter` from tensors in memory (`collect_state`'s output), no files involved."""
    path = source
    inject(model, config)
    layers = dict(tsd_layers(model))
    whole = dict(saved_modules(model, config.modules_to_save))
    for name, module in whole.items():
        own = {k: state.get(f"{name}.{k}") for k, _ in module.named_parameters()}
        lost = [k for k, v in own.items() if v is None]
        if lost:
            raise AdapterError(f"{path}: no saved {name}.{lost[0]} (modules_to_save {config.modules_to_save})")
        for k, param in module.named_parameters():
            with gathered([param], modifier_rank=0):
                param.copy_(own[k].to(param.dtype))
    names = {k.rsplit(".", 1)[0] for k in state if not any(k.startswith(w + ".") for w in whole)}
    unknown = sorted(names - set(layers))
    if unknown:
        raise AdapterError(f"{path}: the adapter has layers the model lacks, e.g. {unknown[:3]}")
    for name, layer in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not own:
            raise AdapterError(f"{path}: no saved state for layer {name}")
        missing, unexpected, errors = [], [], []
        layer._load_from_state_dict(own, "", {}, True, missing, unexpected, errors)
        missing = [k for k in missing if not k.startswith("base_layer.")]
        if missing or unexpected or errors:
            raise AdapterError(
                f"{path}: layer {name} does not fit: missing {missing}, unexpected {unexpected}"
                + (f", {'; '.join(errors)}" if errors else "")
            )
        if layer.init_done:
            with gathered([layer.base_layer.weight], modifier_rank=0):
                # the same arithmetic as the switch, so the residual is rebuilt bit for bit
                subtract_update_(layer.base_layer.weight, layer.init_B0, layer.init_A0, layer.scaling)


# ----------------------------------------------------------------------------- full fine-tuning
FULL_INDEX = "model.safetensors.index.json"


def save_full_model(model: nn.Module, out_dir: str | os.PathLike, is_writer: bool = True,
                    shard_bytes: int = 2**30, tokenizer=None) -> list[str]:
    """The whole fine-tuned model as Hugging Face safetensors shards + index (method full), a
    folder `from_pretrained` loads, with `tokenizer` (what `save_pretrained` writes) when given:
    the folder then stands alone as a model. Under ZeRO-3 every rank must call it: parameters
    are made whole one at a time (`gathered`), so no rank ever holds more than one parameter
    beyond its own slices, and the writer (`is_writer`, rank 0) at most one shard of
    `shard_bytes`. Written to a temporary folder renamed at the end: never a half-written model.
    Returns the shard file names (writer only)."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, weight_map, names, total = 0, {}, [], 0

    def flush() -> None:
        nonlocal size
        if is_writer and shards[-1]:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shards[-1]})
        shards[-1] = {}
        size = 0

    for key, param in model.named_parameters():  # tied weights once, as save_pretrained does
        with gathered([param]):
            if is_writer:
                tensor = param.detach().to("cpu", copy=True).contiguous()
                if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
                    flush()
                shards[-1][key] = tensor
                size += tensor.numel() * tensor.element_size()
                total += tensor.numel() * tensor.element_size()
    flush()
    if not is_writer:
        return []
    if len(names) == 1:  # one shard: the plain file name from_pretrained looks for first
        (tmp / names[0]).rename(tmp / "model.safetensors")
        names = ["model.safetensors"]
    else:
        (tmp / FULL_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    config = getattr(model, "config", None)
    if config is not None:
        # what save_pretrained records: the class that holds these weights (a classifier built
        # from an encoder folder would otherwise still say "BertModel")
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return names
