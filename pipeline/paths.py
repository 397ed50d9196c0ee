"""Relative paths of a run config are resolved once, against the launch directory; small
files of a run are written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pipeline.config import RunConfig


def _abs(p: str | None, base: Path) -> str | None:
    if not p or p.startswith("hub:"):  # a dataset on the Hugging Face hub (pipeline.data.sources), not a path
        return p
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _abs_test(entry: str, base: Path) -> str:
    task, sep, path = entry.partition("=")
    return f"{task}={_abs(path, base)}" if sep else _abs(entry, base)


def resolve_paths(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy of `cfg` whose file paths are absolute (workers may start in another folder)."""
    base = Path(base or Path.cwd())
    return dataclasses.replace(
        cfg,
        output_dir=_abs(cfg.output_dir, base),
        model=dataclasses.replace(cfg.model, path=_abs(cfg.model.path, base)),
        data=dataclasses.replace(
            cfg.data,
            train=[_abs(p, base) for p in cfg.data.train],
            test=[_abs_test(e, base) for e in cfg.data.test],
            cache_dir=_abs(cfg.data.cache_dir, base),
        ),
        method=dataclasses.replace(cfg.method, svd_cache=_abs(cfg.method.svd_cache, base)),
        deepspeed=dataclasses.replace(cfg.deepspeed, config=_abs(cfg.deepspeed.config, base)),
    )


def write_json_atomic(path: Path, obj: dict) -> None:
    """`path` holds the whole JSON or its previous content, never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
