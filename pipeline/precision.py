"""Training precision and the weights' dtype, decided together in one place.

Three settings say something about precision: `train.precision` (what DeepSpeed trains in),
`model.dtype` (what the weights are loaded as) and the DeepSpeed JSON's `bf16.enabled` /
`fp16.enabled`. Each pairs with one dtype (fp32 <-> float32, bf16 <-> bfloat16, fp16 <-> float16);
weights loaded in another dtype than the training precision's are either cast by DeepSpeed after
loading (twice the memory while loading, and every size estimate made from the files is wrong) or
trained in a precision nobody asked for. So the settings must agree; whichever are left `auto`
follow the ones that are set; and when none is set: bf16 on a GPU that supports it, else fp32.

`contradiction` is checked when the config is read (the two config keys); `settle` runs on every
rank before anything is loaded (it knows the hardware and reads the DeepSpeed JSON).
"""

from __future__ import annotations

import dataclasses
from typing import Any

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_PRECISION = {v: k for k, v in PRECISION_DTYPE.items()}


def contradiction(precision: str, dtype: str) -> str | None:
    """The one-line reason `train.precision` and `model.dtype` cannot go together, or None."""
    if precision == "auto" or dtype == "auto" or PRECISION_DTYPE[precision] == dtype:
        return None
    return (f"train.precision {precision} contradicts model.dtype {dtype}: they go in pairs (fp32 with float32, "
            f"bf16 with bfloat16, fp16 with float16); set one of them to auto and it follows the other")


def json_precision(ds_json: dict) -> str | None:
    """The precision a DeepSpeed JSON asks for explicitly (bf16 or fp16 enabled: true; both false:
    fp32), or None where it leaves it to the run config ("auto" or absent)."""
    bf16, fp16 = (ds_json.get(k, {}).get("enabled", "auto") for k in ("bf16", "fp16"))
    if bf16 is True and fp16 is True:
        return "both"
    if bf16 is True or fp16 is True:
        return "bf16" if bf16 is True else "fp16"
    if bf16 is False and fp16 is False:
        return "fp32"
    return None


def settle(cfg: Any, ds_json: dict, json_path: str, on_gpu: bool, gpu_has_bf16: bool) -> tuple[Any, str]:
    """(the config with train.precision and model.dtype concrete, why), or ValueError naming the
    settings that disagree."""
    t, m = cfg.train, cfg.model
    from_json = json_precision(ds_json)
    if from_json == "both":
        raise ValueError(f"deepspeed.config: {json_path} enables both bf16 and fp16; enable one (or leave both "
                         f"\"auto\" and set train.precision)")
    asked = {f"train.precision {t.precision}": t.precision} if t.precision != "auto" else {}
    if m.dtype != "auto":
        asked[f"model.dtype {m.dtype}"] = DTYPE_PRECISION[m.dtype]
    if from_json is not None:
        asked[f"{json_path} ({from_json})"] = from_json
    if len(set(asked.values())) > 1:
        raise ValueError(f"precision: {' vs '.join(asked)} disagree; fp32 goes with float32, bf16 with bfloat16, "
                         f"fp16 with float16 (leave the others auto)")
    if asked:
        precision, why = next(iter(asked.values())), f"set by {', '.join(asked)}"
    elif on_gpu and gpu_has_bf16:
        precision, why = "bf16", "auto: a GPU with bf16"
    else:
        precision, why = "fp32", "auto: " + ("a GPU without bf16" if on_gpu else "CPU")
    return with_precision(cfg, precision, PRECISION_DTYPE[precision]), \
        f"precision {precision}, weights {PRECISION_DTYPE[precision]} ({why})"


def weights_dtype(cfg: Any) -> str:
    """The dtype the weights load in: model.dtype, else train.precision's pair, else the hardware's
    default (what `settle` would choose without a DeepSpeed JSON); for callers given a config
    that was not settled (tests, tools)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if cfg.train.precision != "auto":
        return PRECISION_DTYPE[cfg.train.precision]
    import torch  # deferred: the config layer imports this module without needing torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def with_precision(cfg: Any, precision: str, dtype: str) -> Any:
    """`cfg` with train.precision and model.dtype replaced (e.g. the settled config's values put
    back to the user's `auto` where the config is recorded for a rerun to compare against)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision),
                               model=dataclasses.replace(cfg.model, dtype=dtype))
