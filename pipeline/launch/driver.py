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

# Ray at the top: this module is the Ray launcher (`tsd train` imports it only to train, so the
# other commands never load Ray).
import ray
import ray.train
import ray.train.torch
from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import RunConfig, from_dict
from pipeline.launch.job_env import ENV_FILE, load_env_file
from pipeline.logs import log
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import close_run, start_or_continue_run
from pipeline.training.reshard import checkpoint_run_id
from pipeline.training.loop import WorkerContext, train
from pipeline.training.memory import freeze_startup_objects


def _train_fn(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same loop as every other launcher."""
    os.chdir(loop_config["cwd"])
    freeze_startup_objects()  # a Ray Train worker process runs this one training
    load_env_file()  # secrets from $TSD_ENV_FILE (pipeline.launch.job_env), never through Ray's runtime env
    cfg = from_dict(loop_config["config"], "driver")
    tracking_uri = loop_config["tracking_uri"]
    if tracking_uri is not None and not isinstance(tracking_uri, str):  # an object ref: see run()
        tracking_uri = ray.get(tracking_uri)

    def report(metrics: dict) -> None:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    ctx = WorkerContext(
        run_id=loop_config["run_id"], tracking_uri=tracking_uri, report=report, launcher="ray",
        local_rank=ray_gpu_index(),
    )
    train(cfg, ctx)


def ray_gpu_index() -> int | None:
    """This worker's GPU among those it sees: Ray Train shows a node's workers all of the node's
    assigned GPUs, so the index is Ray's to tell (it need not equal the local rank); None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = ray.train.torch.get_device()
    return device.index if device.type == "cuda" else None


def _masked_config(cfg: RunConfig) -> dict:
    """The config as a dict with tracking.uri's password masked (workers connect with ctx's URI)."""
    data = cfg.to_dict()
    if data["tracking"]["uri"]:
        data["tracking"]["uri"] = mask_secrets(data["tracking"]["uri"])
    return data


def _connect(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray; True when this process started it and must stop it."""
    if ray.is_initialized():
        return False
    address = cfg.workers.address or os.environ.get("RAY_ADDRESS")
    # Ray Train turns a worker's print() into a log record on a console handler of its own, and
    # the worker's stderr reaches the driver too: every printed line would show twice.
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""), ENV_FILE: os.environ.get(ENV_FILE, "")}
    for key in ("DS_ACCELERATOR", ENV_FILE):
        if not env_vars[key]:
            del env_vars[key]  # the secrets file's PATH travels; the workers read the values themselves
    # The reliability tests' injected faults (pipeline.training.faults) reach the workers too.
    env_vars.update({k: v for k, v in os.environ.items() if k.startswith("TSD_INJECT_")})
    # Inside a Ray job, Ray refuses a key the job's own runtime env sets as well; those reach
    # every worker already, with the job's value.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    env = {"env_vars": {k: v for k, v in env_vars.items() if k not in (job_env.get("env_vars") or {})}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    need = cfg.workers.num_workers * cfg.workers.cpus_per_worker
    # The dashboard (loopback only) serves the State API that Ray Train's placement-group
    # cleaner polls; without it the cleaner floods the log with warnings.
    # address="local": always a new embedded instance, never a cluster someone else started here.
    ray.init(address="local", num_cpus=need, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=True)
    return True


def _start_run(cfg: RunConfig, tracking_uri: str) -> str:
    """The job's MLflow run (a rerun after a crash continues the run its checkpoints name)."""
    run_id, continued = start_or_continue_run(
        tracking_uri,
        cfg.tracking.experiment,
        cfg.tracking.run_name or cfg.name,
        tags={"method": cfg.method.method, "world_size": str(cfg.workers.num_workers), "launcher": "ray",
              "hosts": socket.gethostname()},
        params=cfg.to_dict(),
        previous=checkpoint_run_id(cfg.run_dir.resolve()),
    )
    log(f"{'continuing ' if continued else ''}MLflow run {run_id} in experiment {cfg.tracking.experiment!r} "
        f"at {mask_secrets(tracking_uri)}")
    return run_id


def _trainer(cfg: RunConfig, run_id: str | None, tracking_uri: str) -> TorchTrainer:
    """Ray Train's trainer of `workers.num_workers` workers, each running _train_fn."""
    w = cfg.workers
    return TorchTrainer(
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
            num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker={"CPU": w.cpus_per_worker},
            placement_strategy=w.placement_strategy,
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


def run(cfg: RunConfig, tracking_uri: str) -> dict:
    """Train with Ray Train; returns the final metrics."""
    w = cfg.workers
    run_id = None if cfg.tracking.offline else _start_run(cfg, tracking_uri)
    if w.max_failures and not cfg.train.checkpoint_every:
        log("warning: workers.max_failures is set but train.checkpoint_every is not: a restarted "
            "worker group starts again from step 0")
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
        result = _trainer(cfg, run_id, tracking_uri).fit()
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
            close_run(tracking_uri, run_id, status)
        if started_here:
            ray.shutdown()
