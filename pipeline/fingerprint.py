"""A cheap fingerprint of a model folder: which base weights a run was trained on.

Lean checkpoints hold only what training changed; at resume the frozen base (and LoRA-Init's
residual) is rebuilt from `model.path`, and under ZeRO-3 every node reads its own copy. A
re-downloaded revision, a re-saved folder or a half-synced node would give a silently wrong base,
so a run records its base's fingerprint (the run folder's `base_fingerprint.json`, each
checkpoint tag's `layout.json`) and resumes and reruns compare against it.

What is hashed, per file, so that it costs milliseconds even for a 16 GB file:
- the weight files HF would load (a safetensors index's shards, else `model.safetensors`, else the
  `.bin` equivalents, else any weight-like file): the size, a safetensors file's whole header
  (tensor names, dtypes, shapes, offsets, metadata) and SAMPLE_WINDOWS evenly spaced windows of
  WINDOW bytes of its data (the whole data when it is smaller than that), first and last included;
  a shard the index names but the folder lacks is recorded as missing;
- `config.json`, parsed, without the keys that only say who wrote it (`transformers_version`,
  `_name_or_path`).
The digest is the first 16 hex digits of a SHA-256 over the per-file entries (the folder's path is
not part of it: the same weights elsewhere are the same base). Sampling means a change outside
the windows of a file of the same size and header goes unseen: this catches another revision,
re-saved or truncated weights and missing shards, not a single flipped bit in a 16 GB file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tsd import collectives

SAMPLE_WINDOWS = 16
WINDOW = 64 * 1024
CONFIG = "config.json"
_UNSTABLE_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # who wrote config.json, not what it is
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_PARTS = {"missing": "missing", "size": "size", "header": "header", "sample": "sampled bytes", "content": "contents"}


class BaseMismatchError(ValueError):
    """model.path is not the base a run was trained on, or the nodes' copies differ (exit 2)."""


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # 16 hex digits
    files: dict[str, dict]  # file name (relative to the folder) -> {"size", "header", "sample", "content", "missing"}
    bytes_read: int = field(default=0, compare=False)  # what computing it cost (not recorded)

    def to_dict(self) -> dict:
        return {"digest": self.digest, "files": self.files}

    @classmethod
    def from_dict(cls, raw) -> Fingerprint | None:
        """A recorded fingerprint, or None when `raw` is not one (absent or unreadable)."""
        if not (isinstance(raw, dict) and isinstance(raw.get("digest"), str) and isinstance(raw.get("files"), dict)):
            return None
        return cls(raw["digest"], raw["files"])


# ----------------------------------------------------------------------------- computing
def weight_file_names(folder: Path) -> tuple[list[str], list[str]]:
    """(the weight files a loader would read, relative names; those an index names but the folder lacks)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"model.path: {index} is unreadable ({e})") from None
            return [n for n in names if (folder / n).is_file()], [n for n in names if not (folder / n).is_file()]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [single], []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES), []


def sample_offsets(start: int, length: int) -> list[tuple[int, int]]:
    """(offset, size) of the windows hashed in a data region: all of it when small, else
    SAMPLE_WINDOWS windows of WINDOW bytes, evenly spaced, the first at its start, the last at its end."""
    if length <= SAMPLE_WINDOWS * WINDOW:
        return [(start, length)]
    return [(start + i * (length - WINDOW) // (SAMPLE_WINDOWS - 1), WINDOW) for i in range(SAMPLE_WINDOWS)]


def _short(h) -> str:
    return h.hexdigest()[:16]


def _file_entry(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    entry: dict = {"size": size}
    read = 0
    with path.open("rb") as f:
        data_start = 0
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            if 8 + n <= size:  # else a truncated file: its size and sampled bytes tell it apart
                entry["header"] = _short(hashlib.sha256(f.read(n)))
                data_start, read = 8 + n, 8 + n
        sample = hashlib.sha256()
        for offset, length in sample_offsets(data_start, size - data_start):
            f.seek(offset)
            chunk = f.read(length)
            sample.update(chunk)
            read += len(chunk)
        entry["sample"] = _short(sample)
    return entry, read


def _config_entry(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _UNSTABLE_CONFIG_KEYS}
        canonical = json.dumps(data, sort_keys=True).encode()
    except ValueError:
        canonical = raw
    return {"content": _short(hashlib.sha256(canonical))}, len(raw)


def fingerprint(folder: str | Path) -> Fingerprint:
    """The fingerprint of model folder `folder` (see the module doc); reads ~1 MiB per weight file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path: {folder} is not a folder")
    files: dict[str, dict] = {}
    read = 0
    present, missing = weight_file_names(folder)
    for name in present:
        files[name], n = _file_entry(folder / name)
        read += n
    for name in missing:
        files[name] = {"missing": True}
    if (folder / CONFIG).is_file():
        files[CONFIG], n = _config_entry(folder / CONFIG)
        read += n
    digest = _short(hashlib.sha256(json.dumps(files, sort_keys=True).encode()))
    return Fingerprint(digest, files, read)


# ----------------------------------------------------------------------------- comparing
def differing_files(recorded: Fingerprint, now: Fingerprint) -> list[str]:
    """What differs, file by file: 'model.safetensors (sampled bytes)', 'x (not in the recorded base)'."""
    out = []
    for name in sorted(set(recorded.files) | set(now.files)):
        a, b = recorded.files.get(name), now.files.get(name)
        if a is None:
            out.append(f"{name} (not in the recorded base)")
        elif b is None:
            out.append(f"{name} (absent here)")
        elif a != b:
            if b.get("missing"):
                out.append(f"{name} (missing here)")
                continue
            parts = [label for key, label in _PARTS.items() if a.get(key) != b.get(key)]
            out.append(f"{name} ({', '.join(parts)})")
    return out


def mismatch_message(path: str | Path, recorded: Fingerprint, now: Fingerprint, where: str) -> str:
    """The one message a resume or rerun against another base stops with (`where`: what recorded it)."""
    files = "; ".join(differing_files(recorded, now)) or "none listed"
    return (f"model.path {path} is not the base this run was trained on: its fingerprint is {now.digest}, "
            f"{where} records {recorded.digest} (differing files: {files}); point model.path at the original "
            f"weights, or start a new run (--fresh / another name)")


def check_same_base(path: str | Path, recorded: Fingerprint | None, now: Fingerprint, where: str) -> bool:
    """Raise BaseMismatchError when `now` is not `recorded`; False when nothing was recorded
    (an older run or checkpoint: the base cannot be checked), True when it matches."""
    if recorded is None:
        return False
    if recorded.digest != now.digest:
        raise BaseMismatchError(mismatch_message(path, recorded, now, where))
    return True


def rank_mismatch(path: str | Path, per_rank: list[Fingerprint], hosts: dict[int, str] | None = None) -> str | None:
    """None when every rank's copy of model.path has rank 0's fingerprint; else the message naming
    the ranks (and their hosts) whose copy differs from rank 0's, and the files."""
    hosts = hosts or {}
    reference = per_rank[0]
    groups: dict[str, list[int]] = {}
    for rank, fp in enumerate(per_rank):
        if fp.digest != reference.digest:
            groups.setdefault(fp.digest, []).append(rank)
    if not groups:
        return None

    def who(ranks: list[int]) -> str:
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(hosts.get(r, "?"), []).append(r)
        return " and ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {h}"
                         for h, rs in by_host.items())

    same = [r for r, fp in enumerate(per_rank) if fp.digest == reference.digest]
    differ = "; ".join(f"{who(ranks)} read {digest} (differing files: "
                       f"{'; '.join(differing_files(reference, per_rank[ranks[0]])) or 'none listed'})"
                       for digest, ranks in groups.items())
    return (f"model.path {path} is not the same on every node: {who(same)} read fingerprint {reference.digest}, "
            f"{differ}; every node must hold the same weights at model.path: copy the folder again to the nodes "
            f"named (or put it on storage every node shares), then rerun")


def agree_on_base(path: str | Path, hosts: dict[int, str] | None = None) -> Fingerprint:
    """Every rank fingerprints its own copy of model.path and the ranks compare (one all-gather):
    this rank's fingerprint, or BaseMismatchError on every rank when some node's copy differs."""
    mine = fingerprint(path)
    everyone = collectives.all_gather_object(mine.to_dict())
    problem = rank_mismatch(path, [Fingerprint.from_dict(d) for d in everyone], hosts)
    if problem:
        raise BaseMismatchError(problem)
    return mine
