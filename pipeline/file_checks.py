"""Cheap whole-file checks of the files a command is given, before a library reads them.

A broken download or copy (a truncated `model.safetensors`, a half-written `config.json` or
`tokenizer.json`, a garbage adapter file) otherwise ends in a library's message that names no
file, or in `tsd train` in a worker's traceback after Ray has started. These read headers and
sizes only (milliseconds for a 16 GB shard) and raise pipeline.errors.CorruptFileError naming the
setting, the file and what is wrong (exit 2).

A safetensors file is 8 bytes of header length n, n bytes of JSON header, then the tensors'
bytes; the header gives every tensor's dtype, shape and [start, end) in the data, and the data
ends exactly where the last tensor does. A truncated file fails the last rule; garbage fails the
first two. Bytes changed inside the data of a file whose size is right are not seen here
(pipeline.fingerprint samples the data for a resume's comparison).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import CorruptFileError
from pipeline.fingerprint import weight_file_names

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                "C64": 8}  # bytes per element; a dtype not listed here is checked by its offsets alone
_REFETCH = "a broken download or copy? Fetch or copy it again"


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with safetensors file `path` (truncated, garbage, inconsistent header), or None."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than a safetensors header"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER or 8 + n > size:
            return f"its first 8 bytes give a header of {n} bytes in a file of {size}: truncated, or not safetensors"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return f"its header is not JSON ({e})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets in the header"
        if not 0 <= start <= stop or (dtype in _DTYPE_BYTES and stop - start != numel * _DTYPE_BYTES[dtype]):
            return f"tensor {name!r}: data_offsets [{start}, {stop}] do not fit its {dtype} shape {info['shape']}"
        end = max(end, stop)
    if 8 + n + end != size:
        return (f"its tensors end at byte {8 + n + end}, the file has {size} bytes"
                + (": truncated" if size < 8 + n + end else ""))
    return None


def check_safetensors(path: str | Path, key: str) -> None:
    """Raise CorruptFileError (naming `key`, the setting or flag that gave the file) if `path` is
    not a whole safetensors file."""
    problem = safetensors_problem(path)
    if problem:
        raise CorruptFileError(f"{key}: {path} is not a whole safetensors file ({problem}); {_REFETCH}")


def check_json(path: str | Path, key: str) -> None:
    """Raise CorruptFileError if `path` is not JSON (a truncated or garbage file)."""
    try:
        json.loads(Path(path).read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(f"{key}: {path} is not valid JSON ({e}); {_REFETCH}") from None


def check_model_folder(folder: str | Path, key: str) -> None:
    """A Hugging Face model folder's files are whole: every JSON file in it (config, tokenizer,
    generation config, the shard index) parses, every shard the index names is there, and every
    safetensors weight file's header and size agree."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        check_json(path, key)
    present, missing = weight_file_names(folder)
    if missing:
        raise CorruptFileError(f"{key}: {folder} lacks {', '.join(missing[:3])}"
                               f"{' and more' if len(missing) > 3 else ''}, named by its shard index; {_REFETCH}")
    for name in present:
        if name.endswith(".safetensors"):
            check_safetensors(folder / name, key)


def check_adapter_folder(folder: str | Path, key: str) -> None:
    """An adapter folder's files are whole: its JSON files parse, its safetensors files
    (adapter_model, the lora-tsd sidecar) have headers that agree with their sizes."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        check_json(path, key)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path, key)
