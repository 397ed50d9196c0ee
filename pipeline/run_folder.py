"""What a run folder (<output_dir>/<name>) already holds when a command starts, and what a rerun
of the same command does with it.

  new          nothing of a run: train.
  interrupted  checkpoints but no result: resume from the newest whole one (same MLflow run).
  finished     result.json (written last, atomically, after the adapter): say where the run
               and its adapter are, train nothing, create no MLflow run, exit 0.

Every run writes its config to `run_config.json` when it starts. A rerun whose config differs
in a key that shapes training (model, data, method, most of train) is refused with the keys
named: resuming a checkpoint made with other settings would silently mix two runs. Keys that
only say how or where it runs (workers, DeepSpeed strategy, tracking, evaluation, logging and
checkpoint cadence) may change. `--fresh` starts over: a finished run's folder is removed (its
MLflow run keeps its metrics and adapter), an interrupted one's is moved aside, never deleted;
neither while another command writes the folder (pipeline.run_lock: one writer per run folder).

The base weights are compared too: `base_fingerprint.json` records the fingerprint of the model
folder the run trained on (pipeline.fingerprint; each checkpoint tag's layout.json carries a copy),
and a rerun whose model.path now holds other weights (another revision, a re-saved or half-copied
folder) is refused with the files that differ; `--fresh` starts a new run on them instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.fingerprint import Fingerprint, check_same_base, fingerprint
from pipeline.run_lock import LOCK_FILE, check_not_busy

RUN_CONFIG_FILE = "run_config.json"
RESULT_FILE = "result.json"
BASE_FILE = "base_fingerprint.json"  # the fingerprint of the base weights the run trains on
# Keys that may differ between a run and its rerun: how and where it runs, not what it trains.
MAY_CHANGE = ("workers.", "deepspeed.", "tracking.", "train.eval_", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "data.test", "data.task", "data.cache_dir", "method.svd_cache")


@dataclass(frozen=True)
class FolderState:
    kind: str  # "new" | "interrupted" | "finished"
    run_dir: Path
    result: dict | None = None  # result.json of a finished run
    differences: tuple[str, ...] = ()  # config keys that differ from the folder's run


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(before: dict, now: dict) -> list[str]:
    """'key: before -> now' for each training-shaping key that differs (dotted, sorted)."""
    a, b = _flatten(before), _flatten(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_CHANGE) or key in ("name", "output_dir"):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


def folder_state(cfg) -> FolderState:
    """What the run folder of `cfg` holds (reads only)."""
    run_dir = Path(cfg.run_dir).resolve()
    differences: tuple[str, ...] = ()
    recorded = run_dir / RUN_CONFIG_FILE
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except ValueError as e:
            raise ValueError(f"{recorded} is unreadable ({e}); move the run folder away or choose another name") from None
        differences = tuple(config_differences(before, recorded_config(cfg)))
    result_file = run_dir / RESULT_FILE
    if result_file.is_file():
        try:
            result = json.loads(result_file.read_text())
        except ValueError:
            result = {}
        return FolderState("finished", run_dir, result, differences)
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(d.is_dir() and d.name.startswith("step") for d in ckpt.iterdir()):
        return FolderState("interrupted", run_dir, None, differences)
    return FolderState("new", run_dir, None, differences)


def recorded_config(cfg) -> dict:
    """The config as run_config.json holds it (tracking.uri left out: it may carry a password)."""
    data = cfg.to_dict()
    data["tracking"]["uri"] = None
    return data


def write_run_config(cfg) -> None:
    """Rank 0, when a run starts from nothing (a resumed run keeps the first session's)."""
    from pipeline.paths import write_json_atomic

    path = Path(cfg.run_dir).resolve() / RUN_CONFIG_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, recorded_config(cfg))


def recorded_base(run_dir: Path) -> Fingerprint | None:
    """The base the run in `run_dir` trained on, as base_fingerprint.json records it (None: not recorded)."""
    try:
        return Fingerprint.from_dict(json.loads((Path(run_dir) / BASE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def record_base(run_dir: Path, base: Fingerprint, replace: bool) -> None:
    """Rank 0, at set-up: the base this session trains on (checked against the run's record when
    resuming). `replace`: the run starts from step 0, so whatever an earlier attempt recorded goes."""
    from pipeline.paths import write_json_atomic

    path = Path(run_dir) / BASE_FILE
    if replace or not path.is_file():
        write_json_atomic(path, base.to_dict())


def check_rerun(cfg, fresh: bool = False) -> FolderState:
    """Before anything starts or is written: refuse a changed config (ValueError naming the keys)
    or other base weights than the run's (pipeline.fingerprint.BaseMismatchError, a ValueError), and
    with `fresh` clear the folder of a previous run of the same config (printing what was done).
    Returns the state the command must act on ("finished": train nothing)."""
    state = folder_state(cfg)
    if state.kind != "new" and state.differences:
        what = ("an interrupted run made with another config", "keep its config to resume it, or choose")
        if state.kind == "finished":
            what = ("a finished run made with another config", "choose")
        raise ValueError(f"{state.run_dir} holds {what[0]} ({'; '.join(state.differences)}); {what[1]} another "
                         f"name to train with these settings (--set name=...)")
    recorded = recorded_base(state.run_dir) if state.kind != "new" and not fresh else None
    if recorded is not None:  # the same config on other weights would be a silently different run
        check_same_base(cfg.model.path, recorded, fingerprint(cfg.model.path), str(state.run_dir / BASE_FILE))
    if not fresh or state.kind == "new":
        return state
    check_not_busy(state.run_dir)  # never clear a live run's folder (pipeline.run_lock)
    if state.kind == "finished":
        _remove_all_but_lock(state.run_dir)
        print(f"[tsd] --fresh: removed the finished run {state.run_dir} (its MLflow run "
              f"{state.result.get('mlflow_run_id') or '-'} keeps its metrics and adapter)")
    else:
        aside = state.run_dir.with_name(f"{state.run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        _move_aside_but_lock(state.run_dir, aside)
        print(f"[tsd] --fresh: moved the interrupted run {state.run_dir} to {aside} (rerun with --set "
              f"name={aside.name} to resume it)")
    return FolderState("new", state.run_dir)


def _remove_all_but_lock(run_dir: Path) -> None:
    """--fresh on a finished run: remove the folder, or when this command holds its lock
    (pipeline.run_lock) everything in it but the lock."""
    if not (run_dir / LOCK_FILE).exists():
        shutil.rmtree(run_dir)
        return
    for entry in run_dir.iterdir():
        if not entry.name.startswith(LOCK_FILE):  # the lock and its heartbeat's files
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _move_aside_but_lock(run_dir: Path, aside: Path) -> None:
    """--fresh on an interrupted run: the folder is renamed (atomically); this command's lock
    comes back under the run folder's name, by a link that fails if another command took the name."""
    run_dir.rename(aside)
    held = aside / LOCK_FILE
    if held.exists():
        run_dir.mkdir(exist_ok=True)
        try:
            os.link(held, run_dir / LOCK_FILE)
        except FileExistsError:
            raise ValueError(f"{run_dir}: another command started a run there while --fresh moved the interrupted "
                             f"run to {aside}; rerun when it has ended") from None
        held.unlink()


def finished_line(state: FolderState, cfg) -> str:
    """The one line a rerun of a finished run prints."""
    r = state.result or {}
    where = (f"MLflow run {r['mlflow_run_id']} in experiment '{cfg.tracking.experiment}'" if r.get("mlflow_run_id")
             else "no MLflow run (tracking.offline)")
    return (f"[tsd] {cfg.name} is already finished ({r.get('steps', '?')} steps): {where}; adapter "
            f"{r.get('adapter') or state.run_dir / 'adapter'}. Nothing to train; to train again pass --fresh "
            f"(replaces it) or --set name=NEW")
