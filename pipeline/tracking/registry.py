"""The model registry: a run's adapter as a loadable MLflow model version (`tracking.register_as`).

`register_adapter(uri, run_id, "adapter", NAME)` turns the PEFT adapter a run logged (the
artifact folder `adapter/`, written by `pipeline.training.loop.export_adapter`) into the next
version of the registered model NAME. MLflow users find it under Models, and
`mlflow.pyfunc.load_model("models:/NAME/<version>")` gives the base model + adapter, loaded with
PEFT, ready to `.predict(prompts)` (see adapter_pyfunc.py).

What a version holds: an MLflow 3 "logged model" of the run (listed with the run, linked to the
version) with a copy of the adapter folder (megabytes: the version stays loadable when run
artifacts are cleaned up) and the model's code, adapter_pyfunc.py ("models from code": MLflow
runs that file on load instead of unpickling an object, as everywhere in this project). The base
model is NOT copied (13+ GB for the paper's LLaMA runs, per version): the version loads it from
the adapter's `base_model_name_or_path` (the run's `model.path`, also the version's tag
`base_model`) or, on another machine, from `model_config={"base_model": ...}`.

The registry needs a database-backed store: sqlite (the embedded default), postgresql, mysql,
mssql, or an `mlflow server` whose backend store is one.

mlflow is imported lazily, as in pipeline.tracking.store: importing this module stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import client

MODEL_CODE = Path(__file__).with_name("adapter_pyfunc.py")
ADAPTER_ARTIFACT = "adapter"  # the artifact key adapter_pyfunc.py reads (ADAPTER_ARTIFACT there)
# What loading a version needs; pinned to the versions that trained it (MLflow would otherwise
# infer the list by loading the model: base model and all, at registration time).
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "safetensors")
# File stores (a folder, file://) are not used for the registry: MLflow 3 keeps them in
# maintenance mode (refused unless MLFLOW_ALLOW_FILE_STORE=true; no further updates) and builds
# its registry features (logged models, their links to versions) for database stores.
_FILE_STORE_SCHEMES = ("", "file")
_MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS


class RegistryUnavailableError(RuntimeError):
    """The tracking store cannot hold a model registry."""


def model_registry_problem(tracking_uri: str) -> str | None:
    """Why `tracking_uri` cannot hold the registry `tracking.register_as` writes to, or None.

    Decided from the URI alone (no I/O), so a config check can call it before training; an
    `mlflow server` is only known at registration (its backend store decides)."""
    if urlsplit(tracking_uri).scheme.lower() in _FILE_STORE_SCHEMES:
        return (
            f"tracking.register_as needs a database-backed MLflow store for its model registry, and "
            f"tracking.uri {mask_secrets(tracking_uri)} is a file store; set tracking.uri to sqlite:///<folder>/mlflow.db "
            f"(the default), another database or an `mlflow server` backed by one, or drop tracking.register_as"
        )
    return None


def register_adapter(tracking_uri: str, run_id: str, artifact_path: str, name: str) -> str:
    """Register the PEFT adapter logged under `artifact_path` of run `run_id` as a new version of
    the registered model `name` (created when missing); returns the version ("1", "2", ...)."""
    problem = model_registry_problem(tracking_uri)
    if problem:
        raise RegistryUnavailableError(problem)
    mlflow_client = client(tracking_uri)
    run = mlflow_client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="register-adapter-") as tmp:
        adapter_dir = _download_adapter(mlflow_client, run_id, artifact_path, Path(tmp))
        base_model = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        _ensure_registered_model(mlflow_client, tracking_uri, name)  # nothing is written before the checks
        logged = _log_adapter_model(mlflow_client, run, name, adapter_dir, Path(tmp) / "model")
    # source: the logged model's artifact location, not `models:/<model_id>`, which MLflow's sqlite
    # registry resolves through the global tracking URI (a TODO in MLflow), not this client's.
    model_version = mlflow_client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
        tags={"base_model": str(base_model or "")}, description=f"PEFT adapter `{artifact_path}` of run {run_id}",
    )  # fmt: skip
    version = str(model_version.version)
    # the logged model's page lists the versions made from it, as mlflow.register_model records them
    versions = json.dumps([{"name": name, "version": version}])
    mlflow_client.set_logged_model_tags(logged.model_id, {_MODEL_VERSIONS_TAG: versions})
    return version


def _log_adapter_model(mlflow_client, run, name: str, adapter_dir: Path, scratch: Path):
    """A READY logged model of `run` holding the pyfunc model folder (see the module docstring)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # noqa: PLC0415 (lazy: see the docstring)

    run_id = run.info.run_id
    logged = mlflow_client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
    try:
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run lists it
        model_dir = _save_pyfunc(scratch, adapter_dir, logged, run_id)
        mlflow_client.log_model_artifacts(logged.model_id, str(model_dir))
    except BaseException:
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _ensure_registered_model(mlflow_client, tracking_uri: str, name: str) -> None:
    """Create the registered model `name` unless it exists; a store without a registry says so."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (lazy: see the docstring)

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return  # a later version of a model registered before
        if e.error_code == "FEATURE_DISABLED":  # e.g. a tracking server started without a registry
            raise RegistryUnavailableError(
                f"tracking.register_as: the MLflow store at tracking.uri {mask_secrets(tracking_uri)} has no model "
                f"registry ({mask_secrets(str(e).splitlines()[0])}); use a database store (sqlite:///<folder>/mlflow.db) "
                f"or an `mlflow server` backed by one"
            ) from e
        raise


def _download_adapter(mlflow_client, run_id: str, artifact_path: str, into: Path) -> Path:
    logged_files = {Path(a.path).name for a in mlflow_client.list_artifacts(run_id, artifact_path)}
    if "adapter_config.json" not in logged_files:
        raise FileNotFoundError(
            f"run {run_id} has no PEFT adapter under its artifact path {artifact_path!r} (no adapter_config.json); "
            f"register after the adapter is exported and its upload flushed"
        )
    return Path(mlflow_client.download_artifacts(run_id, artifact_path, str(into)))


def _save_pyfunc(path: Path, adapter_dir: Path, logged, run_id: str) -> Path:
    """The MLflow model folder: MLmodel, the model code, the adapter, the pinned requirements."""
    import mlflow.pyfunc  # noqa: PLC0415 (lazy: see the docstring)
    from mlflow.models import Model  # noqa: PLC0415

    # MLmodel records the logged model and the run, as mlflow.pyfunc.log_model would.
    mlmodel = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id)
    mlflow.pyfunc.save_model(
        path, python_model=str(MODEL_CODE), artifacts={ADAPTER_ARTIFACT: str(adapter_dir)}, mlflow_model=mlmodel,
        pip_requirements=[_pinned(p) for p in MODEL_REQUIREMENTS],
    )  # fmt: skip
    return path


def _pinned(package: str) -> str:
    # the public part of the version: a local build tag (torch's "+cpu") is no pip requirement
    return f"{package}=={importlib.metadata.version(package).split('+', 1)[0]}"
