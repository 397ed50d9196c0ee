"""Tokenized data on disk: an entry is built by ONE rank per cache folder, every rank memory-maps it.

An entry is a folder of Arrow files (`part-00000.arrow` ...) and `meta.json`, named by the SHA-256 of a
spec: everything that changes the tokens (pipeline.data.training_set says what). A run whose spec is
already there builds nothing; a changed file, tokenizer, cutoff, prompt or label set is another
name, so a stale entry is never read (old entries stay until the folder is deleted).

Who builds, and the wait. In each node the first rank (the local rank 0 of torchrun and the
DeepSpeed launcher, the node's first worker under Ray) is the node's candidate. With one node it
builds; the other ranks wait in a collective (tsd/collectives.py) until it is done, then map the
same files. With several nodes, rank 0 leaves a probe in the folder: every node that sees it shares
rank 0's folder (the default, under output_dir, which every node must share: README "Multi-node"),
so rank 0 alone builds for all of them (one tokenization per JOB; the entry is read over the shared
disk and page-cached per node); a node that does not see it (a node-local `data.cache_dir`, e.g. a
local NVMe disk, faster to map) has its own candidate build into its own folder (one per NODE).
Why not always one per node: on a shared folder the nodes' candidates would build the same entry
side by side, N times the work for one result.

Writes are atomic: an entry is built in a hidden folder of the builder's own (host, pid) and
renamed into place; two builders of the same entry (two jobs sharing a cache, or nodes sharing a
folder rank 0 cannot see) both finish and the second rename loses, harmlessly. A builder that died
leaves its hidden folder, which the next build on that host removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import datasets

from pipeline.errors import DataError
from pipeline.logs import log
from tsd import collectives

META = "meta.json"
PROBE = ".tsd-cache-probe-"


def entry_name(spec: dict) -> str:
    """The entry folder's name: the SHA-256 of the spec's canonical JSON (first 32 hex digits)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


def find_or_build(folder: Path, spec: dict, build: Callable[[Path], int]) -> tuple[Path, bool]:
    """The entry of `spec` under `folder`: found, or made by `build(tmp)`, which writes the Arrow
    parts into `tmp` and returns the row count. Returns (entry, built)."""
    entry = folder / entry_name(spec)
    if (entry / META).is_file():
        return entry, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: {folder} cannot be created ({e.strerror}); set data.cache_dir to a "
                        "writable folder") from None
    host = socket.gethostname()
    _remove_dead_builds(folder, entry.name, host)
    tmp = folder / f".{entry.name}.{host}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        rows = build(tmp)
        meta = {"spec": spec, "rows": rows, "built_on": host, "seconds": round(time.perf_counter() - t0, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / META).is_file():
                raise
            # another builder of the same spec finished first: its entry is the same data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, True


def _remove_dead_builds(folder: Path, name: str, host: str) -> None:
    """Hidden build folders of `name` left on this host by a process that no longer runs."""
    for old in folder.glob(f".{name}.{host}.*.tmp"):
        try:
            pid = int(old.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass  # alive, or not ours to judge


def load(entry: Path) -> datasets.Dataset:
    """An entry's rows, memory-mapped (nothing is read into this process's memory until touched)."""
    meta = json.loads((entry / META).read_text())
    parts = sorted(entry.glob("part-*.arrow"))
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts]) if parts else None
    if table is None or len(table) != meta["rows"]:
        raise DataError(f"data cache entry {entry} is damaged ({len(table) if table else 0} rows, {meta['rows']} "
                        "written); delete the folder and start again")
    return table


def builders(folder: Path, rank: int, nodes) -> dict[int, int]:
    """rank -> the rank that builds its entry (same answer on every rank; see the module doc).
    `nodes`: pipeline.training.nodes.Node list (each with its `ranks`), the same on every rank."""
    firsts = {r: n.ranks[0] for n in nodes for r in n.ranks}
    if len(nodes) <= 1:
        return firsts or {rank: rank}
    token = None
    if rank == 0:
        token = uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{PROBE}{token}").write_text(token)
    token = collectives.broadcast_object(token, src=0)  # rank 0 has written the probe when this returns
    sees = (folder / f"{PROBE}{token}").is_file() if firsts.get(rank) == rank else None
    seen = collectives.all_gather_object(sees)
    if rank == 0:
        (folder / f"{PROBE}{token}").unlink(missing_ok=True)
    return {r: (0 if seen[first] or first == firsts.get(0) else first) for r, first in firsts.items()}


def build_once(folder: Path, spec: Callable[[], dict], build: Callable[[Path], int], rank: int, nodes,
               describe: Callable[[Path, bool, float], str]) -> Path:
    """The entry of `spec()` (computed by the builders only), built (or found) by one rank per cache
    folder while the others wait; every rank returns the same entry path. A builder's error is
    raised on every rank, the same type and message for the user's errors (bad data, a missing file), so every rank stops alike.
    The builder logs `describe(entry, built, seconds)`."""
    builder = builders(folder, rank, nodes).get(rank, rank)
    result = None
    error: BaseException | None = None
    if builder == rank:
        t0 = time.perf_counter()
        try:
            entry, built = find_or_build(folder, spec(), build)
            log(describe(entry, built, time.perf_counter() - t0), all_ranks=True)
            result = ("ok", str(entry))
        except BaseException as e:  # noqa: BLE001 -- handed to every rank below, then raised
            error = e
            result = ("error", type(e).__name__, str(e))
    results = collectives.all_gather_object(result)  # the others wait here for their builder
    if error is not None:
        raise error
    mine = results[builder] if builder < len(results) else result
    if mine[0] == "error":
        kinds = {"DataError": DataError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
        if mine[1] in kinds:
            raise kinds[mine[1]](mine[2])
        raise RuntimeError(f"rank {builder} could not build the training data: {mine[1]}: {mine[2]}")
    return Path(mine[1])
