"""The paths of a resolved run config, checked before anything is written (the preflight,
pipeline.launch.preflight, and `tsd analyze --out`): what the run reads exists and is a file or
folder as needed; what it writes (run folder, SVD cache, the MLflow store) can be created. Every
problem is a ConfigError naming the config key.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pipeline.config import ConfigError, RunConfig
from pipeline.data.sources import is_dataset_folder
from pipeline.tracking.store import sqlite_path


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder_can_be_made(key: str, path: str | os.PathLike) -> None:
    """`path` is a writable folder or can be created as one: its nearest existing ancestor is a
    writable folder. Creates nothing (os.access, no probe file), so a refused run leaves no trace."""
    path = Path(path).expanduser().absolute()
    found = _existing_ancestor(path)
    if not found.is_dir():
        raise ConfigError(f"{key}: {found} is a file, not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        if found == path:
            raise ConfigError(f"{key}: {path} is not writable")
        raise ConfigError(f"{key}: {path} cannot be created: {found} is not writable")


def _check_input(key: str, path: str, kind: str) -> None:
    p = Path(path)
    if kind == "folder":
        if not p.exists():
            raise ConfigError(f"{key}: {p} does not exist")
        if not p.is_dir():
            raise ConfigError(f"{key}: {p} is a file, not a model folder")
        return
    if kind == "data" and path.startswith("hub:"):
        return  # a hub dataset resolves when it is read (pipeline.data.sources names what is missing)
    if not p.exists():
        raise ConfigError(f"{key}: {p}: data file not found" if kind == "data" else f"{key}: {p} not found")
    if p.is_dir() and not (kind == "data" and is_dataset_folder(p)):
        raise ConfigError(f"{key}: {p} is a folder, not a {'data' if kind == 'data' else 'JSON'} file"
                          + (" or a folder written by Dataset.save_to_disk" if kind == "data" else ""))


def check_paths(cfg: RunConfig) -> None:
    """Every path of a resolved config (pipeline.paths.resolve_paths), before anything is written:
    what the run reads exists and is a file or folder as needed; what it writes (run folder, SVD
    cache, the MLflow store) can be created. Raises ConfigError naming the key."""
    _check_input("model.path", cfg.model.path, "folder")
    for i, p in enumerate(cfg.data.train):
        _check_input("data.train" if len(cfg.data.train) == 1 else f"data.train[{i}]", p, "data")
    for i, entry in enumerate(cfg.data.test):
        _, sep, p = entry.partition("=")
        _check_input("data.test" if len(cfg.data.test) == 1 else f"data.test[{i}]", p if sep else entry, "data")
    _check_input("deepspeed.config", cfg.deepspeed.config, "json")
    check_folder_can_be_made("output_dir", cfg.output_dir)
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"name: the run folder {run_dir} is a file, not a folder; remove it or choose another name")
    if cfg.method.svd_cache:
        check_folder_can_be_made("method.svd_cache", cfg.method.svd_cache)
    if cfg.tracking.uri and not cfg.tracking.offline:
        _check_store_path(cfg.tracking.uri)


def _check_store_path(uri: str) -> None:
    """A local MLflow store (sqlite file, file:// folder) can be opened or created."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if parts.scheme.lower() == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            return  # refused by _check_tracking_uri
        if db.is_dir():
            raise ConfigError(f"tracking.uri: {db} is a folder, not a sqlite database file")
        if db.exists():
            if not os.access(db, os.R_OK | os.W_OK):
                raise ConfigError(f"tracking.uri: {db} is not writable")
        else:
            check_folder_can_be_made("tracking.uri", db.parent)
    elif scheme == "file":
        check_folder_can_be_made("tracking.uri", url2pathname(parts.path))
    elif scheme == "":  # a bare path: MLflow's file store
        check_folder_can_be_made("tracking.uri", uri)
