"""The MLflow store and its runs: where the store is, the experiment, creating and ending a run.

Who does what:
- the driver (one process, before any worker starts) calls `ensure_experiment` and `start_run`.
  Creating a NEW sqlite store from two processes at once crashes MLflow (`duplicate column
  name: step`), so the store is always created here, once;
- rank 0 of the workers attaches to that run with `pipeline.tracking.logger.RunLogger`;
- the driver closes the run with `end_run`.

Also the rules every value sent to MLflow follows (`flatten_params`, `clean_tags`,
`sanitize_key`): MLflow's length limits, its key alphabet, and secrets masked.

mlflow is imported lazily, inside the functions that talk to a store: `import
pipeline.tracking.store` must stay cheap for the commands and offline runs that never track
(the mlflow import alone takes ~4 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.errors import ServerUnreachableError
from pipeline.tracking.secrets import MASK, is_secret_key, mask_secrets

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# MLflow's own limits (mlflow/utils/validation.py, 3.x): longer values are rejected or cut.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

TRUNCATION_MARK = "...[truncated]"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")


# --------------------------------------------------------------------------- values MLflow accepts


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: alphanumerics, `_ - . / : space`; no `..`, no leading `/`."""
    key = re.sub(r"[^\w.\- :/]", "_", str(key))
    key = re.sub(r"/{2,}", "/", key).strip("/") or "_"
    key = key.replace("..", "__")
    return key[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = json.dumps(list(value), default=str)
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    return str(value)


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (or dataclasses) -> {"a.b.c": "value"}, secrets masked, values truncated.

    Lists become JSON; None becomes "None"; an empty dict is kept as "{}" so the key shows up.
    """
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key))
            continue
        if isinstance(v, Mapping):
            text = "{}"
        elif is_secret_key(key) and v not in (None, ""):
            text = MASK
        else:
            text = mask_secrets(_param_value(v))
        out[sanitize_key(key)] = _truncate(text, MAX_PARAM_VALUE_LENGTH)
    return out


def _tag_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        value = ",".join(str(v) for v in value)
    return _truncate(mask_secrets(value), MAX_TAG_VALUE_LENGTH)


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow takes them: keys sanitized, values stringified (lists comma-joined), secrets masked."""
    return {
        sanitize_key(k): (MASK if is_secret_key(k) and v not in (None, "") else _tag_value(v))
        for k, v in (tags or {}).items()
    }


# --------------------------------------------------------------------------- where the store is


def client(tracking_uri: str) -> MlflowClient:
    """An explicit `MlflowClient` for `tracking_uri` (never the fluent API's global state)."""
    import mlflow  # noqa: PLC0415 (lazy: ~4 s import, see the module docstring)

    path = sqlite_path(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)  # sqlite will not create folders
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def check_reachable(uri: str | None, key: str, fix: str, timeout_s: float = 5.0) -> None:
    """An `http(s)://` tracking server must accept a connection before a command starts its work:
    MLflow itself retries for minutes, then raises with the URI, password included, in its message.
    Raises ServerUnreachableError (exit 2) naming `key` (the setting or flag that gave the URI),
    the masked URI and `fix` (what to do). Other stores (sqlite, files) are local: nothing to reach."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:  # ValueError: a port that is not a number
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ServerUnreachableError(
            f"{key}: the MLflow tracking server {mask_secrets(uri)} is not reachable ({mask_secrets(reason)}); {fix}"
        ) from None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (absolute: four slashes), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    rest = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest).resolve() if rest and rest != ":memory:" else None


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    """The embedded store: `sqlite:////<abs workdir>/mlflow.db` (the folder is created)."""
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + (root / DB_FILE).as_posix()


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike) -> str:
    """The URI the driver hands to workers: `uri`, or the embedded default in `workdir`.

    A relative sqlite path (`sqlite:///mlflow.db`) is made absolute HERE, in the driver: Ray
    workers run in another folder (the job's working-dir copy), where the same relative URI
    would silently open a second, empty store.
    """
    if not uri:
        return default_tracking_uri(workdir)
    path = sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return "sqlite:///" + path.as_posix() + (f"?{query}" if query else "")
    return uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """`file://<db folder>/mlartifacts` next to a sqlite store; None (MLflow decides) otherwise.

    Without it MLflow would put a sqlite store's artifacts under `./mlruns` of whatever folder
    the process happened to start in.
    """
    path = sqlite_path(tracking_uri)
    return (path.parent / ARTIFACTS_DIR).as_uri() if path is not None else None


def _artifact_uri(root: str) -> str:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", root) and not re.match(r"^[A-Za-z]:[\\/]", root):
        return root.rstrip("/")
    return Path(root).expanduser().resolve().as_uri()  # a bare local path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


# --------------------------------------------------------------------------- experiments and runs


def ensure_experiment(tracking_uri: str, experiment_name: str, artifact_root: str | None = None) -> str:
    """The id of `experiment_name`, created (with the store itself) when missing.

    Call it from ONE process (the driver) before workers start. New experiments put artifacts
    under `<artifact_root>/<experiment name>`; the root defaults to `mlartifacts` next to a
    sqlite store, and to the server's own choice for an `http(s)://` tracking server.
    """
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (lazy, as `client`)

    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment_name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment {experiment_name!r} (id {found.experiment_id}) at {mask_secrets(tracking_uri)} "
                f"is deleted; restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`) "
                f"or set tracking.experiment to another name"
            )
        return found.experiment_id
    root = artifact_root if artifact_root is not None else default_artifact_root(tracking_uri)
    location = f"{_artifact_uri(root)}/{_slug(experiment_name)}" if root else None
    try:
        return mlflow_client.create_experiment(experiment_name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(experiment_name).experiment_id  # lost a race: fine


def _context_tags() -> dict[str, str]:
    """MLflow's usual source tags (user, entry point, git commit), as the fluent API sets them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags  # noqa: PLC0415 (lazy, as `client`)

        return {k: _tag_value(v) for k, v in resolve_tags().items()}
    except Exception as e:  # context detection is a nicety; never a reason to fail a run
        log.debug("could not resolve MLflow context tags: %s", e)
        return {}


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | Any | None = None,
) -> str:
    """Create the run (driver side, before workers start) and log its params; returns run_id.

    `experiment` is a name (created when missing). `params` may be nested (a config dict or
    dataclass): keys are flattened to dotted paths, values truncated to MLflow's limit, and
    secrets masked. `tags` (method, world_size, hosts, ...) are stringified and masked.
    """
    from mlflow.entities import Param  # noqa: PLC0415 (lazy, as `client`)

    experiment_id = ensure_experiment(tracking_uri, experiment)
    mlflow_client = client(tracking_uri)
    all_tags = {**_context_tags(), **clean_tags(tags)}
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    try:
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            mlflow_client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    except Exception:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def start_or_continue_run(tracking_uri: str, experiment: str, run_name: str | None, tags: Mapping[str, Any] | None,
                          params: Mapping[str, Any] | Any | None, previous: str | None) -> tuple[str, bool]:
    """The MLflow run of this training run: `previous` (the run its newest checkpoint belongs to)
    when that run exists, is this experiment's run of the same name and did not finish (a rerun
    after a crash, or on another number of ranks, continues it; `restarts` counts the resumes),
    else a new one (`start_run`). A continued run keeps its params (MLflow cannot change them;
    the config of each session is in config/run_config.json) and gets the new tags.
    Returns (run id, whether it is the previous run continued)."""
    if previous:
        try:
            run = client(tracking_uri).get_run(previous)
            exp = client(tracking_uri).get_experiment(run.info.experiment_id)
        except Exception:  # noqa: BLE001 - gone, or another store: a new run
            run = None
        if (run is not None and exp.name == experiment and run.info.run_name == run_name
                and run.info.lifecycle_stage == "active" and run.info.status != "FINISHED"):
            mlflow_client = client(tracking_uri)
            mlflow_client.update_run(previous, status="RUNNING")
            for k, v in clean_tags(tags).items():
                mlflow_client.set_tag(previous, k, v)
            return previous, True
    return start_run(tracking_uri, experiment, run_name, tags, params), False


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated with `status` (FINISHED, FAILED or KILLED)."""
    status = status.upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"end_run: status must be one of {RUN_STATUSES}, got {status!r}")
    mlflow_client = client(tracking_uri)
    if mask_secrets(tracking_uri) == tracking_uri:
        mlflow_client.set_terminated(run_id, status)
        return
    # For an http(s) store MLflow prints "View run ... at: <tracking URI>/#/..." to stdout,
    # password included; the driver and the CLI print the run (masked) themselves.
    with _env("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        mlflow_client.set_terminated(run_id, status)


def close_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> bool:
    """`end_run` that never raises: at the end of training a tracking server that is away must
    not turn a finished run into a failed job. MLflow's HTTP retries are capped (unless the
    user set them) so a dead server costs seconds, not minutes; False (and a warning) when the
    run could not be marked, e.g. it stays RUNNING in the UI while its logs wait staged."""
    caps = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    try:
        with contextlib.ExitStack() as stack:
            for name, value in caps.items():
                if name not in os.environ:
                    stack.enter_context(_env(name, value))
            end_run(tracking_uri, run_id, status)
        return True
    except Exception as e:  # noqa: BLE001 - tracking never fails a run that has done its work
        reason = mask_secrets(str(e).splitlines()[0] if str(e) else "")
        log.warning("MLflow run %s could not be marked %s at %s (%s: %s)", run_id, status,
                    mask_secrets(tracking_uri), type(e).__name__, reason)
        return False


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def list_artifacts(mlflow_client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively, as run-relative paths."""
    out: list[str] = []
    for info in mlflow_client.list_artifacts(run_id, path):
        out.extend(list_artifacts(mlflow_client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(out)


def summarize_run(tracking_uri: str, run_id: str) -> dict:
    """Status, params, tags, latest metrics and the artifact file list of one run."""
    mlflow_client = client(tracking_uri)
    run = mlflow_client.get_run(run_id)
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
        "artifacts": list_artifacts(mlflow_client, run_id),
    }


# ----------------------------------------------------------------------------- the URI's form (config check)
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores (+driver allowed)
_KNOWN_SCHEMES = ("", "file", "http", "https", "databricks", *_SQL_SCHEMES)


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with the form of `uri` as tracking.uri (its password masked), or None:
    pipeline.config refuses the config with it, before anything connects."""
    shown = mask_secrets(uri)  # never echo a password
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme not in _KNOWN_SCHEMES and not _mlflow_knows_scheme(uri):
        return (f"tracking.uri: unknown scheme {parts.scheme!r} in {shown!r}; use sqlite:///path/mlflow.db, "
                f"http(s)://host:port (an mlflow server) or file:///path")
    if parts.scheme.lower() == "sqlite" and sqlite_path(uri) is None:  # (sqlite+driver: left to MLflow)
        # Driver and workers are separate processes: an in-memory store is a different empty
        # store in each, and the workers would not find the driver's run.
        return (f"tracking.uri: {shown!r} names no database file (an in-memory sqlite store is not shared with the "
                f"workers); write sqlite:///relative/mlflow.db or sqlite:////absolute/mlflow.db")
    if scheme in ("http", "https"):
        if not parts.hostname:
            return f"tracking.uri: {shown!r} names no host; e.g. http://127.0.0.1:5000"
        try:
            parts.port
        except ValueError:
            return f"tracking.uri: {shown!r}: port out of range (0-65535)"
    return None


def _mlflow_knows_scheme(uri: str) -> bool:
    """True when an MLflow store plugin handles `uri` (or when MLflow's registry cannot be asked)."""
    # Deferred: importing MLflow costs seconds, and only an unusual scheme needs it.
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # a private MLflow name moved: let MLflow itself judge the URI later
        return True
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        return False
    return True
