"""MLflow tracking: the driver creates the run, rank 0 logs into it, MLflow never stops training.

Who does what:
- the driver (one process, before any worker starts) calls `ensure_experiment` and `start_run`.
  Creating a NEW sqlite store from two processes at once crashes MLflow (`duplicate column
  name: step`), so the store is always created here, once;
- rank 0 of the workers attaches to that run with `RunLogger(uri, run_id)` (an explicit
  `MlflowClient`, never the fluent `mlflow.start_run` global state, which would open a second
  run); every other rank builds `RunLogger(..., enabled=False)`, on which every call is a no-op;
- the driver closes the run with `end_run`.

A tracking hiccup (server restarting, sqlite locked, network blip) must never cost the run:
`RunLogger` catches the error, warns once, keeps what it could not send (metrics, params, and
artifacts staged on local disk) and sends it on a later call or on `flush()`.

Nothing secret is logged: `mask_secrets` rewrites `scheme://user:pass@host` to
`scheme://user:***@host` and secret query values, and values under keys that name a secret
(password, token, secret, api_key, ...) become `***`.

mlflow and matplotlib are imported lazily: `import pipeline.tracking.logger` is cheap, and an offline
run never pays the ~4 s mlflow import.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

    from tsd.directions import LayerDirections

log = logging.getLogger(__name__)

# MLflow's own limits (mlflow/utils/validation.py, 3.x): longer values are rejected or cut.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

MASK = "***"
TRUNCATION_MARK = "...[truncated]"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")

# MLflow errors that retrying cannot fix: the request itself is wrong.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}
)


# --------------------------------------------------------------------------- secrets, params


_SECRET_KEY_RE = re.compile(
    r"(^|_)(password|passwd|pwd|passphrase|token|secret|api_?key|access_?key|private_?key|"
    r"credentials?|authorization|auth_token|session_key|signature)(_|$)"
)
# The password runs to the LAST "@" of the authority (it ends at the first / ? #), as urlsplit
# reads it: `http://u:p@ss@host` connects with password "p@ss", so all of it is masked.
_URI_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^/?#\s]*)@")
_SECRET_QUERY_RE = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:password|passwd|token|secret|key|signature|sig|credential)[^=&#\s]*=)[^&#\s]*",
    re.IGNORECASE,
)
_BEARER_RE = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True when a (possibly dotted, camelCase or snake_case) key names a secret.

    Matches whole words only, so `hf_token`, `db.password`, `apiKey` are secret while
    `tokenizer` and `max_new_tokens` are not.
    """
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))
    words = re.sub(r"[^A-Za-z0-9]+", "_", words).lower()
    return bool(_SECRET_KEY_RE.search(words))


def mask_secrets(value: Any) -> str:
    """The string form of `value` with URI passwords, secret query values and bearer tokens masked.

    `http://user:pass@host` -> `http://user:***@host`; `...?token=abc&x=1` -> `...?token=***&x=1`.
    """
    text = str(value)
    text = _URI_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _SECRET_QUERY_RE.sub(lambda m: f"{m['key']}{MASK}", text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a nested structure with secret-named keys masked and secrets in strings masked."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if key and is_secret_key(key) and obj not in (None, ""):
        return MASK
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_secrets(obj)
    return obj


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _sanitize_key(key: str) -> str:
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
        out[_sanitize_key(key)] = _truncate(text, MAX_PARAM_VALUE_LENGTH)
    return out


def _tag_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        value = ",".join(str(v) for v in value)
    return _truncate(mask_secrets(value), MAX_TAG_VALUE_LENGTH)


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {
        _sanitize_key(k): (MASK if is_secret_key(k) and v not in (None, "") else _tag_value(v))
        for k, v in (tags or {}).items()
    }


# --------------------------------------------------------------------------- stores, runs


def _mlflow():
    import mlflow  # noqa: PLC0415 (lazy: ~4 s import)

    return mlflow


def _client(tracking_uri: str) -> MlflowClient:
    path = sqlite_path(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)  # sqlite will not create folders
    return _mlflow().MlflowClient(tracking_uri=tracking_uri)


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


def ensure_experiment(tracking_uri: str, experiment_name: str, artifact_root: str | None = None) -> str:
    """The id of `experiment_name`, created (with the store itself) when missing.

    Call it from ONE process (the driver) before workers start. New experiments put artifacts
    under `<artifact_root>/<experiment name>`; the root defaults to `mlartifacts` next to a
    sqlite store, and to the server's own choice for an `http(s)://` tracking server.
    """
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment_name)
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
        return client.create_experiment(experiment_name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(experiment_name).experiment_id  # lost a race: fine


def _context_tags() -> dict[str, str]:
    """MLflow's usual source tags (user, entry point, git commit), as the fluent API sets them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags  # noqa: PLC0415

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
    from mlflow.entities import Param  # noqa: PLC0415

    experiment_id = ensure_experiment(tracking_uri, experiment)
    client = _client(tracking_uri)
    all_tags = {**_context_tags(), **_clean_tags(tags)}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    try:
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated with `status` (FINISHED, FAILED or KILLED)."""
    status = status.upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"end_run: status must be one of {RUN_STATUSES}, got {status!r}")
    client = _client(tracking_uri)
    if mask_secrets(tracking_uri) == tracking_uri:
        client.set_terminated(run_id, status)
        return
    # For an http(s) store MLflow prints "View run ... at: <tracking URI>/#/..." to stdout,
    # password included; the driver and the CLI print the run (masked) themselves.
    with _env("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        client.set_terminated(run_id, status)


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


def list_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively, as run-relative paths."""
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        out.extend(list_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(out)


def summarize_run(tracking_uri: str, run_id: str) -> dict:
    """Status, params, tags, latest metrics and the artifact file list of one run."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
        "artifacts": list_artifacts(client, run_id),
    }


# --------------------------------------------------------------------------- directions


def _floats(t) -> list[float]:
    import torch  # noqa: PLC0415

    return t.detach().to("cpu", torch.float64).reshape(-1).tolist()


def _ints(t) -> list[int]:
    return [int(i) for i in t.detach().cpu().reshape(-1).tolist()]


DIRECTION_COLUMNS = ("layer", "position", "index", "sigma", "change_rate")


def direction_rows(directions: Sequence[LayerDirections]) -> list[tuple[str, int, int, float, float]]:
    """One row per selected direction: layer, rank position (0 = largest change rate), index
    into the singular spectrum, its singular value, its change rate."""
    rows = []
    for d in directions:
        rates = _floats(d.change_rates)
        for pos, (idx, sig) in enumerate(zip(_ints(d.indices), _floats(d.sigma))):
            rows.append((d.name, pos, idx, sig, rates[idx]))
    return rows


def _representative(n: int, max_layers: int) -> list[int]:
    if n <= max_layers:
        return list(range(n))
    step = (n - 1) / (max_layers - 1)
    return sorted({round(i * step) for i in range(max_layers)})


def plot_change_rates(
    directions: Sequence[LayerDirections],
    path: str | os.PathLike,
    title: str | None = None,
    max_layers: int = 6,
) -> Path:
    """PNG of change rate vs singular-direction index, one panel per layer, log y.

    With more than `max_layers` layers, evenly spaced representatives (first and last
    included) are drawn. Selected directions are red markers. Pure: writes only `path`.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)  # no display on workers
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = [directions[i] for i in _representative(len(directions), max(1, max_layers))]
    n = max(1, len(chosen))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    # A bare Figure (not pyplot's registry): nothing leaks between calls in a long-lived worker.
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, d in zip(axes, chosen):
        rates = _floats(d.change_rates)
        idx = _ints(d.indices)
        xs = range(len(rates))
        ax.plot(xs, rates, lw=0.9, color="tab:blue", label="change rate")
        sel_x = [i for i in idx if rates[i] > 0] if any(r > 0 for r in rates) else idx
        ax.plot(sel_x, [rates[i] for i in sel_x], "o", ms=4, color="red", label="selected direction")
        if any(r > 0 for r in rates):
            ax.set_yscale("log", nonpositive="mask")
        else:
            ax.text(0.5, 0.5, "all change rates are 0", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"{d.name} ({len(idx)} selected)", fontsize=8)
        ax.set_xlabel("singular direction index (by descending sigma)", fontsize=7)
        ax.set_ylabel("change rate", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    if not chosen:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no layers", ha="center", va="center")
    plural = "" if len(directions) == 1 else "s"
    shown = f"{len(chosen)} of {len(directions)} layers" if len(chosen) < len(directions) else f"{len(directions)} layer{plural}"
    fig.suptitle(f"{title or 'change-rate spectra'} ({shown})", fontsize=10)
    if chosen:  # one legend for the figure: per-panel legends hide the (top-right) selected points
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_direction_tables(
    directions: Sequence[LayerDirections], folder: str | os.PathLike, kind: str, step: int | None
) -> list[Path]:
    """directions.csv, directions.json ({kind, step, columns, data}) and change_rates.json
    (every layer's full spectrum, for re-plotting) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = direction_rows(directions)
    csv_path = folder / "directions.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DIRECTION_COLUMNS)
        for name, pos, idx, sig, rate in rows:
            w.writerow([name, pos, idx, repr(sig), repr(rate)])  # repr: exact float round trip
    json_path = folder / "directions.json"
    json_path.write_text(
        json.dumps({"kind": kind, "step": step, "columns": list(DIRECTION_COLUMNS), "data": [list(r) for r in rows]})
    )
    spectra_path = folder / "change_rates.json"
    spectra_path.write_text(
        json.dumps({"kind": kind, "step": step, "layers": {d.name: _floats(d.change_rates) for d in directions}})
    )
    return [csv_path, json_path, spectra_path]


# --------------------------------------------------------------------------- the rank-0 logger


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying later? Bad requests are not; connection, server and lock errors are."""
    code = getattr(exc, "error_code", None)
    if code is not None:
        return code not in _PERMANENT_ERROR_CODES
    return not isinstance(exc, (TypeError, ValueError, AttributeError, KeyError))


_URLLIB3_LOG = logging.getLogger("urllib3.connectionpool")


def _drop_all(record: logging.LogRecord) -> bool:
    return False


@dataclasses.dataclass
class _PendingArtifact:
    local_path: Path
    artifact_path: str | None
    is_dir: bool
    cleanup: Path | None  # our staged copy: removed once uploaded


class RunLogger:
    """Logs into an existing run by run_id; never creates a run, never raises on tracking errors.

    Built on every rank; only rank 0 passes `enabled=True`. Metrics are sent with `log_batch`
    (at most every `flush_interval_s`, default every call). When MLflow fails with a transient
    error, the logger warns once, keeps metrics/params/artifacts buffered (text, dicts and
    direction tables are staged as files on local disk) and retries on the next call (metrics:
    not before `retry_interval_s`) or on `flush()`. Errors that retrying cannot fix (an invalid
    request) are warned about and dropped. For an `http(s)://` server, MLflow's own per-request
    retries are capped (`http_max_retries`, `http_timeout_s`) so a dead server costs seconds per
    attempt instead of MLflow's default ~4 minutes; set MLFLOW_HTTP_REQUEST_MAX_RETRIES /
    MLFLOW_HTTP_REQUEST_TIMEOUT in the environment to override.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        enabled: bool = True,
        *,
        flush_interval_s: float = 0.0,
        retry_interval_s: float = 30.0,
        http_max_retries: int = 2,
        http_timeout_s: int = 30,
        max_buffered_metrics: int = 200_000,
        staging_dir: str | os.PathLike | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.enabled = bool(enabled)
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.http_max_retries = http_max_retries
        self.http_timeout_s = http_timeout_s
        self.max_buffered_metrics = max_buffered_metrics
        self.staging_dir = staging_dir
        self._client_obj = None
        self._metrics: list = []
        self._params: dict[str, str] = {}
        self._artifacts: list[_PendingArtifact] = []
        self._staging: Path | None = None
        self._lock = threading.RLock()
        self._failing_since: float | None = None
        self._last_attempt = 0.0
        self._last_metric_send = 0.0
        self._dropped_metrics = 0
        self._is_http = tracking_uri.startswith(("http://", "https://"))

    # -- plumbing

    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:  # lazy: constructing never touches the store
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    @contextlib.contextmanager
    def _http_limits(self):
        """Cap MLflow's per-request HTTP retries for our calls (it reads these per request)."""
        if not self._is_http:
            yield
            return
        ours = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_max_retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.http_timeout_s),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }
        set_here = [k for k in ours if k not in os.environ]
        for k in set_here:
            os.environ[k] = ours[k]
        # urllib3 logs every retry; after our one warning about an outage, keep it quiet
        quiet = self._failing_since is not None
        if quiet:
            _URLLIB3_LOG.addFilter(_drop_all)
        try:
            yield
        finally:
            for k in set_here:
                os.environ.pop(k, None)
            if quiet:
                _URLLIB3_LOG.removeFilter(_drop_all)

    def _stage_dir(self) -> Path:
        if self._staging is None:
            if self.staging_dir is not None:
                Path(self.staging_dir).mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=f"mlflow-stage-{self.run_id[:8]}-", dir=self.staging_dir))
        path = self._staging / uuid.uuid4().hex[:12]
        path.mkdir()
        return path

    def verify(self) -> bool:
        """True when the run exists and is reachable; warns (never raises) otherwise.

        Call once at start-up on rank 0 to catch a wrong run_id or URI early."""
        if not self.enabled:
            return True
        try:
            with self._http_limits():
                self._client.get_run(self.run_id)
            return True
        except Exception as e:
            log.warning("MLflow run %s at %s is not usable: %s: %s", self.run_id, mask_secrets(self.tracking_uri),
                        type(e).__name__, mask_secrets(str(e).splitlines()[0] if str(e) else ""))  # fmt: skip
            return False

    def pending(self) -> dict[str, int]:
        """How much is waiting to be sent: {"metrics": n, "params": n, "artifacts": n}."""
        with self._lock:
            return {"metrics": len(self._metrics), "params": len(self._params), "artifacts": len(self._artifacts)}

    @property
    def healthy(self) -> bool:
        """False while the last attempt to reach MLflow failed."""
        return self._failing_since is None

    def _failed(self, what: str, exc: BaseException) -> None:
        self._last_attempt = time.monotonic()
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "MLflow is not reachable (%s at %s: %s: %s); training continues, %s kept in memory/staged "
                "and retried on later calls and flush() (further failures are not reported)",
                what,
                mask_secrets(self.tracking_uri),
                type(exc).__name__,
                mask_secrets(str(exc).splitlines()[0] if str(exc) else ""),
                self.pending(),
            )

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "MLflow reachable again after %.0f s; buffered data sent", time.monotonic() - self._failing_since
            )
            self._failing_since = None

    def _send(self) -> bool:
        """Try to send everything pending, params first; stop at the first transient failure."""
        from mlflow.entities import Param  # noqa: PLC0415

        with self._lock, self._http_limits():
            self._last_attempt = time.monotonic()
            # params
            if self._params:
                items = list(self._params.items())
                for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    chunk = items[i : i + MAX_PARAMS_PER_BATCH]
                    try:
                        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
                    except Exception as e:
                        if _is_transient(e):
                            self._failed("log_batch(params)", e)
                            return False
                        log.warning("MLflow rejected params %s: %s; dropped", [k for k, _ in chunk], e)
                    for k, _ in chunk:
                        self._params.pop(k, None)
            # metrics
            while self._metrics:
                chunk = self._metrics[:MAX_METRICS_PER_BATCH]
                try:
                    self._client.log_batch(self.run_id, metrics=chunk)
                except Exception as e:
                    if _is_transient(e):
                        self._failed("log_batch(metrics)", e)
                        return False
                    log.warning("MLflow rejected %d metrics (%s): %s; dropped", len(chunk), chunk[0].key, e)
                del self._metrics[: len(chunk)]
                self._last_metric_send = time.monotonic()
            # artifacts
            while self._artifacts:
                item = self._artifacts[0]
                try:
                    if item.is_dir:
                        self._client.log_artifacts(self.run_id, str(item.local_path), item.artifact_path)
                    else:
                        self._client.log_artifact(self.run_id, str(item.local_path), item.artifact_path)
                except Exception as e:
                    if not item.local_path.exists():
                        log.warning("artifact %s vanished before it could be logged; dropped", item.local_path)
                    elif _is_transient(e):
                        self._failed(f"log_artifact({item.local_path.name})", e)
                        return False
                    else:
                        log.warning("MLflow rejected artifact %s: %s; dropped", item.local_path, e)
                self._artifacts.pop(0)
                if item.cleanup is not None:
                    shutil.rmtree(item.cleanup, ignore_errors=True)
            self._succeeded()
            return True

    def _maybe_send_metrics(self) -> None:
        now = time.monotonic()
        if self._failing_since is not None and now - self._last_attempt < self.retry_interval_s:
            return  # backing off: buffer only, the training step must not wait on a dead server
        if self._failing_since is None and now - self._last_metric_send < self.flush_interval_s:
            return
        self._send()

    # -- public API

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, timestamp_ms: int | None = None) -> None:
        """Queue `metrics` (name -> number, tensors fine) at `step` and send them in one batch."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric  # noqa: PLC0415

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        with self._lock:
            for k, v in metrics.items():
                try:
                    value = float(v.item() if hasattr(v, "item") else v)
                except (TypeError, ValueError):
                    log.warning("metric %r: value %r is not a number; skipped", k, v)
                    continue
                self._metrics.append(Metric(_sanitize_key(k), value, ts, int(step or 0)))
            overflow = len(self._metrics) - self.max_buffered_metrics
            if overflow > 0:  # a very long outage: keep the newest
                del self._metrics[:overflow]
                self._dropped_metrics += overflow
                if self._dropped_metrics == overflow:
                    log.warning("MLflow metric buffer full (%d); dropping the oldest", self.max_buffered_metrics)
            self._maybe_send_metrics()

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log (nested) params: flattened to dotted keys, masked, truncated."""
        if not self.enabled:
            return
        with self._lock:
            self._params.update(flatten_params(params))
            self._send()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified, secrets masked); a tracking error only warns."""
        if not self.enabled or not tags:
            return
        try:
            client = self._client
            for k, v in _clean_tags(tags).items():
                client.set_tag(self.run_id, k, v)
        except Exception as exc:  # noqa: BLE001 - tags are informative; never stop training for them
            log.warning("MLflow set_tags failed: %s", exc)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one local file (kept in place and retried if MLflow is unavailable)."""
        self._queue_artifact(Path(path), artifact_path, is_dir=False)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local folder's files under `artifact_path`."""
        self._queue_artifact(Path(local_dir), artifact_path, is_dir=True)

    def _queue_artifact(self, path: Path, artifact_path: str | None, is_dir: bool, cleanup: Path | None = None) -> None:
        if not self.enabled:
            return
        if not (path.is_dir() if is_dir else path.is_file()):
            log.warning("log_artifact%s: %s is not an existing %s; skipped", "s" if is_dir else "", path,
                        "folder" if is_dir else "file")  # fmt: skip
            return
        with self._lock:
            self._artifacts.append(_PendingArtifact(path.resolve(), artifact_path or None, is_dir, cleanup))
            self._send()

    def _stage_file(self, artifact_file: str, write) -> None:
        artifact_file = artifact_file.strip("/")
        folder, name = posix_split(artifact_file)
        stage = self._stage_dir()
        write(stage / name)
        self._queue_artifact(stage / name, folder, is_dir=False, cleanup=stage)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log `text` (secrets in URIs masked) as the artifact `artifact_file` (e.g. "notes/x.txt")."""
        if self.enabled:
            self._stage_file(artifact_file, lambda p: p.write_text(mask_secrets(text)))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log a dict (secret keys masked) as JSON, or YAML when `artifact_file` ends .yaml/.yml."""
        if not self.enabled:
            return
        clean = redact(obj)

        def write(p: Path) -> None:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # noqa: PLC0415

                p.write_text(yaml.safe_dump(clean, sort_keys=False, default_flow_style=False))
            else:
                p.write_text(json.dumps(clean, indent=2, default=str))

        self._stage_file(artifact_file, write)

    def log_directions(self, directions: Sequence[LayerDirections], kind: str, step: int | None = None) -> None:
        """Log the selected directions under `directions/<kind>/`: directions.csv and
        directions.json (layer, position, index, sigma, change_rate), change_rates.json (full
        spectra) and change_rates.png (`plot_change_rates`)."""
        if not self.enabled:
            return
        kind = _sanitize_key(kind).replace("/", "_")
        try:
            folder = self._stage_dir()
            files = write_direction_tables(directions, folder, kind, step)
            title = f"{kind} directions" + (f" at step {step}" if step is not None else "")
            files.append(plot_change_rates(directions, folder / "change_rates.png", title=title))
        except Exception as e:  # a plotting bug must not stop training either
            log.warning("could not write the %s direction tables/plot: %s: %s", kind, type(e).__name__, e)
            return
        # one staged folder, uploaded as one unit and removed once uploaded
        self._queue_artifact(folder, f"directions/{kind}", is_dir=True, cleanup=folder)

    def flush(self) -> bool:
        """Send everything pending now; True when nothing is left."""
        if not self.enabled:
            return True
        with self._lock:
            return self._send()

    def close(self) -> bool:
        """Flush; warn (with where staged files are) if something could still not be sent."""
        if not self.enabled:
            return True
        ok = self.flush()
        if not ok:
            log.warning(
                "MLflow still unreachable at close: %s not logged to run %s; staged files kept in %s",
                self.pending(), self.run_id, self._staging,
            )  # fmt: skip
        elif self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        return ok

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def posix_split(artifact_file: str) -> tuple[str | None, str]:
    """"a/b/c.txt" -> ("a/b", "c.txt"); "c.txt" -> (None, "c.txt")."""
    folder, _, name = artifact_file.rpartition("/")
    if not name:
        raise ValueError(f"artifact_file must name a file, got {artifact_file!r}")
    return (folder or None), name
