"""The rank-0 logger: logs into the driver's run and never lets MLflow stop training.

rank 0 of the workers attaches to the run the driver created (`pipeline.tracking.store.start_run`)
with `RunLogger(uri, run_id)` (an explicit `MlflowClient`, never the fluent `mlflow.start_run`
global state, which would open a second run); every other rank builds
`RunLogger(..., enabled=False)`, on which every call is a no-op.

A tracking hiccup (server restarting, sqlite locked, network blip) must never cost the run:
`RunLogger` catches the error, warns once, keeps what it could not send (metrics, params, and
artifacts staged on local disk) and sends it on a later call or on `flush()`. Nothing secret is
logged (pipeline.tracking.secrets).

mlflow is imported lazily, on the first call that sends something: `import
pipeline.tracking.logger` must stay cheap, and an offline run (every logger disabled) never pays
the ~4 s mlflow import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.reports.directions import plot_change_rates, write_direction_tables
from pipeline.tracking.secrets import mask_secrets, redact
from pipeline.tracking.store import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    clean_tags,
    client,
    flatten_params,
    sanitize_key,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

    from tsd.directions import LayerDirections

log = logging.getLogger(__name__)

# MLflow errors that retrying cannot fix: the request itself is wrong.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}
)


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
            self._client_obj = client(self.tracking_uri)
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
                self._metrics.append(Metric(sanitize_key(k), value, ts, int(step or 0)))
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
            mlflow_client = self._client
            for k, v in clean_tags(tags).items():
                mlflow_client.set_tag(self.run_id, k, v)
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
        kind = sanitize_key(kind).replace("/", "_")
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
