"""The Ray driver: `tsd train CONFIG` starts N DeepSpeed ZeRO-3 workers with Ray Train.

Where the cluster comes from, in order: `workers.address` in the config; the cluster of the Ray
job this driver runs in (`ray job submit` sets RAY_ADDRESS); otherwise an embedded local Ray
started here and stopped at the end. The driver creates the MLflow experiment and run before
any worker starts (two processes creating one sqlite store at once crash), hands the run id to
the workers, and closes the run with the outcome.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pipeline.config import ConfigError, RunConfig


# ----------------------------------------------------------------------------- preflight
def check_tracking_reachable(uri: str | None, timeout_s: float = 5.0) -> None:
    """An `http(s)://` tracking server must answer at start-up: fail fast (a clear error, not
    minutes of MLflow retries and a traceback) unless the run is `tracking.offline`."""
    from urllib.parse import urlsplit

    from pipeline.tracking import mask_secrets

    if not uri or not uri.startswith(("http://", "https://")):
        return  # sqlite / file stores are local: nothing to reach
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(  # a ValueError: the CLI prints it as one line and exits 2
            f"tracking.uri: the MLflow tracking server {mask_secrets(uri)} is not reachable ({reason}); "
            f"start it (launch/mlflow_server.sh), fix tracking.uri, or set tracking.offline: true to train without MLflow"
        ) from None


def _check_model(cfg: RunConfig) -> None:
    """model.path is a model folder whose architecture has the targets, each big enough for r
    and s: checked on the model's config alone, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tsd.inject import inject

    path = Path(cfg.model.path)
    if not path.exists():
        raise FileNotFoundError(f"model.path: {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # a broken or unsupported config.json: any library error, named once
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"model.path: {path / 'config.json'} cannot be used: {type(e).__name__}: {first}") from None
    try:
        inject(model, cfg.method.tsd())  # raises TargetError (no match, r or s too large) before changing anything
    except ValueError as e:
        msg = str(e)
        key = "" if msg.startswith("targets") else "num_directions: " if "num_directions" in msg else "r: " if " r=" in msg else "targets: "
        raise ConfigError(f"method.{key}{msg} (model {path})") from None


def _check_data(cfg: RunConfig) -> int:
    """Training (and test) files parse; test answers can be scored. Returns the training rows used."""
    from pipeline.data import extract_answer, load_many, load_records
    from pipeline.evaluate import row_format

    n = len(load_many(cfg.data.train))
    if cfg.data.limit:
        n = min(n, cfg.data.limit)
    for task, path in cfg.data.test_sets().items():
        rows = load_records(path)
        for i, row in enumerate(rows):
            fam = row_format(task, row)
            if extract_answer(fam, str(row["answer"])) is None:
                raise ValueError(
                    f"data.test: {path}: row {i}: answer {row['answer']!r} can never match the {fam!r} "
                    f"answer format of task {task!r}, so the row could never be scored correct"
                )
    return n


def _check_resources(cfg: RunConfig) -> None:
    """A local Ray (no address) gets this machine only: the workers must fit on it."""
    import torch

    w = cfg.workers
    if w.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's resources are checked once connected (run())
    if w.use_gpu and torch.cuda.device_count() < w.num_workers:
        raise ConfigError(
            f"workers.use_gpu: {w.num_workers} workers need {w.num_workers} GPUs; this machine has "
            f"{torch.cuda.device_count()} (set workers.use_gpu: false or fewer workers)"
        )
    cpus = os.cpu_count() or 1
    if w.num_workers * w.cpus_per_worker > cpus:
        raise ConfigError(
            f"workers: {w.num_workers} workers x {w.cpus_per_worker} CPUs need {w.num_workers * w.cpus_per_worker} "
            f"CPUs; this machine has {cpus} (lower workers.num_workers or workers.cpus_per_worker)"
        )
    if not w.use_gpu and w.num_workers * w.cpus_per_worker == cpus:
        # Measured (docs/BENCHMARKS.md, benchmark 4): Ray's own processes take ~0.1 core in
        # steady state; with no core left for them, CPU workers run ~7% slower than under a
        # bare launcher, and as fast with one core spare.
        print(f"[tsd driver] note: the workers take all {cpus} CPUs of this machine, so Ray's own processes "
              "(~0.1 CPU in steady state) share their cores (2 workers on 2 CPUs: 7% fewer tokens/s than a bare "
              "launcher). One CPU left free avoids it.", flush=True)


def preflight(cfg: RunConfig, tracking_uri: str | None = None, world: int | None = None, ray: bool = True) -> None:
    """Everything a run needs that can be checked before Ray or any worker starts, so a user
    error is one line and exit 2 instead of a worker traceback minutes later: the model folder
    and its targets, the data files, the DeepSpeed config, that the switch fits in training,
    the workers against this machine (local Ray) and the tracking server."""
    from pipeline.config import check_paths
    from pipeline.train import deepspeed_config, optimizer_steps

    check_paths(cfg)  # every input exists as a file/folder, every output folder can be made
    deepspeed_config(cfg)  # exists, is JSON, is ZeRO-3
    _check_model(cfg)
    n = _check_data(cfg)
    optimizer_steps(cfg, n, world or cfg.workers.num_workers)  # data enough for a step; the switch fits
    if ray:
        _check_resources(cfg)
    if not cfg.tracking.offline:
        check_tracking_reachable(tracking_uri if tracking_uri is not None else cfg.tracking.uri)


def _train_fn(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same loop as every other launcher."""
    import os as _os

    from pipeline.config import from_dict
    from pipeline.train import WorkerContext, train

    _os.chdir(loop_config["cwd"])
    cfg = from_dict(loop_config["config"], "driver")
    tracking_uri = loop_config["tracking_uri"]
    if tracking_uri is not None and not isinstance(tracking_uri, str):  # an object ref: see run()
        import ray

        tracking_uri = ray.get(tracking_uri)

    def report(metrics: dict) -> None:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    ctx = WorkerContext(
        run_id=loop_config["run_id"], tracking_uri=tracking_uri, report=report, launcher="ray"
    )
    train(cfg, ctx)


def _masked_config(cfg: RunConfig) -> dict:
    """The config as a dict with tracking.uri's password masked (workers connect with ctx's URI)."""
    from pipeline.tracking import mask_secrets

    data = cfg.to_dict()
    if data["tracking"]["uri"]:
        data["tracking"]["uri"] = mask_secrets(data["tracking"]["uri"])
    return data


def _connect(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray; True when this process started it and must stop it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.workers.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}}
    if not env["env_vars"]["DS_ACCELERATOR"]:
        del env["env_vars"]["DS_ACCELERATOR"]
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    need = cfg.workers.num_workers * cfg.workers.cpus_per_worker
    # The dashboard (loopback only) serves the State API that Ray Train's placement-group
    # cleaner polls; without it the cleaner floods the log with warnings.
    # address="local": always a new embedded instance, never a cluster someone else started here.
    ray.init(address="local", num_cpus=need, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=True)
    return True


def run(cfg: RunConfig, tracking_uri: str) -> dict:
    """Train with Ray Train; returns the final metrics."""
    import ray
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.tracking import end_run, mask_secrets, start_run

    w = cfg.workers
    run_id = None
    if not cfg.tracking.offline:
        run_id = start_run(
            tracking_uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or cfg.name,
            tags={
                "method": cfg.method.method,
                "world_size": str(w.num_workers),
                "launcher": "ray",
                "hosts": socket.gethostname(),
            },
            params=cfg.to_dict(),
        )
        print(f"[tsd driver] MLflow run {run_id} in experiment {cfg.tracking.experiment!r} at {mask_secrets(tracking_uri)}",
              flush=True)
    if w.max_failures and not cfg.train.checkpoint_every:
        print("[tsd driver] warning: workers.max_failures is set but train.checkpoint_every is not: a restarted "
              "worker group starts again from step 0", flush=True)
    started_here = _connect(cfg)
    status = "FAILED"
    t0 = time.perf_counter()
    try:
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        need = w.num_workers * w.cpus_per_worker
        if cluster_cpus < need:
            raise ValueError(
                f"workers: {w.num_workers} workers x {w.cpus_per_worker} CPUs need {need} CPUs; "
                f"the Ray cluster has {cluster_cpus:g}"
            )
        trainer = TorchTrainer(
            _train_fn,
            # Ray Train shows train_loop_config in its dashboard and state API (and exports it):
            # the workers get the password-bearing URI as an object ref, their config the masked one.
            train_loop_config={
                "config": _masked_config(cfg),
                "run_id": run_id,
                "tracking_uri": ray.put(tracking_uri) if mask_secrets(tracking_uri) != tracking_uri else tracking_uri,
                "cwd": os.getcwd(),
            },
            scaling_config=ScalingConfig(
                num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker={"CPU": w.cpus_per_worker}
            ),
            # timeout_s: how long a collective waits for a vanished worker (workers.collective_timeout_s).
            torch_config=TorchConfig(backend="nccl" if w.use_gpu else "gloo", timeout_s=w.collective_timeout_s),
            run_config=RayRunConfig(
                name=cfg.name,
                storage_path=str(Path(cfg.output_dir).resolve() / "ray"),
                # A restarted worker group resumes from <run_dir>/checkpoints (train.checkpoint_every).
                failure_config=FailureConfig(max_failures=w.max_failures),
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        status = "FINISHED"
        # Rank 0 writes the final figures next to the adapter (Ray's own result object
        # carries metrics only with checkpoints in Train V2).
        result_file = cfg.run_dir / "result.json"
        metrics = json.loads(result_file.read_text()) if result_file.is_file() else dict(result.metrics or {})
        metrics["wall_seconds"] = time.perf_counter() - t0
        return {"run_id": run_id, "metrics": metrics}
    finally:
        if run_id is not None:
            end_run(tracking_uri, run_id, status)
        if started_here:
            ray.shutdown()
