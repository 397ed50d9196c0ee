"""Pre-launch checks: everything a run needs that can be checked before Ray or any worker
starts (model folder and targets, data files, DeepSpeed config, that the switch fits, the
workers against this machine, the tracking server), so a user error is one line and exit 2
instead of a worker traceback minutes later. `tsd train` and `pipeline.launch.worker` both call
`preflight`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig

from pipeline.config import ConfigError, RunConfig
from pipeline.data.tasks import extract_answer, load_many, load_records
from pipeline.evaluate import row_format
from pipeline.file_checks import check_model_folder
from pipeline.data.loader import class_names
from pipeline.launch.path_checks import check_paths
from pipeline.logs import log
from pipeline.model_task import model_class
from pipeline.precision import settle as settle_precision
from pipeline.tracking.registry import model_registry_problem
from pipeline.tracking.store import check_reachable
from pipeline.training.engine import read_deepspeed_json
from pipeline.training.strategy import STAGES
from pipeline.training.session import optimizer_steps
from tsd.inject import inject


def check_tracking_reachable(uri: str | None, timeout_s: float = 5.0) -> None:
    """An `http(s)://` tracking server must answer at start-up: fail fast (a clear error, not
    minutes of MLflow retries and a traceback) unless the run is `tracking.offline`."""
    check_reachable(uri, "tracking.uri", "start it (launch/mlflow_server.sh), fix tracking.uri, or set "
                    "tracking.offline: true to train without MLflow", timeout_s)


def _check_model(cfg: RunConfig) -> None:
    """model.path is a model folder whose architecture has the targets, each big enough for r
    and s: checked on the model's config alone, built on the meta device (no weights read)."""
    path = Path(cfg.model.path)
    if not path.exists():
        raise FileNotFoundError(f"model.path: {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    check_model_folder(path, "model.path")  # a truncated download fails here, not in a worker after Ray starts
    try:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = model_class(cfg.model.task).from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # a broken or unsupported config.json: any library error, named once
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"model.path: {path / 'config.json'} cannot be used: {type(e).__name__}: {first}") from None
    _check_kernels(cfg, model)
    try:
        inject(model, cfg.method.tsd())  # raises TargetError (no match, r or s too large) before changing anything
    except ValueError as e:
        msg = str(e)
        key = "" if msg.startswith("targets") else "num_directions: " if "num_directions" in msg else "r: " if " r=" in msg else "targets: "
        raise ConfigError(f"method.{key}{msg} (model {path})") from None


def _check_kernels(cfg: RunConfig, model) -> None:
    """model.attn_implementation and train.gradient_checkpointing are possible for this
    architecture (asked of the model built on the meta device) and this installation."""
    name, kernel = type(model).__name__, cfg.model.attn_implementation
    if cfg.train.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {name} does not support gradient checkpointing in "
                          f"transformers; set it to false")
    if kernel == "sdpa" and not getattr(model, "_supports_sdpa", True):
        raise ConfigError(f"model.attn_implementation: {name} has no sdpa attention in transformers; use eager or auto")
    if kernel == "flash_attention_2":
        if not getattr(model, "_supports_flash_attn", getattr(model, "_supports_flash_attn_2", False)):
            raise ConfigError(f"model.attn_implementation: {name} has no flash_attention_2 in transformers; "
                              f"use sdpa, eager or auto")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install "
                              "flash-attn, on a CUDA machine); or use sdpa / auto")
        if not (cfg.workers.use_gpu or torch.cuda.is_available()):
            raise ConfigError("model.attn_implementation: flash_attention_2 runs on GPUs only; set workers.use_gpu: "
                              "true, or use sdpa / auto")


def _check_data(cfg: RunConfig) -> int:
    """Training (and test) files parse; test answers can be scored. Returns the training rows used."""
    if cfg.model.task == "seq_cls":
        return _check_labelled(cfg)
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


def _check_labelled(cfg: RunConfig) -> int:
    """A classifier's files: text/label rows, at least two classes in training, every test label
    one of them (pipeline.classification.rows). Returns the training rows used."""
    from pipeline.classification.rows import encode_labels, load_labelled

    names = class_names(cfg.data, cfg.model.num_labels)
    n = sum(len(load_labelled(path)) for path in cfg.data.train)
    for _, path in cfg.data.test_sets().items():
        encode_labels(load_labelled(path), names, source=path)
    return min(n, cfg.data.limit) if cfg.data.limit else n


def _check_resources(cfg: RunConfig) -> None:
    """A local Ray (no address) gets this machine only: the workers must fit on it."""
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
        log(f"note: the workers take all {cpus} CPUs of this machine, so Ray's own processes "
              "(~0.1 CPU in steady state) share their cores (2 workers on 2 CPUs: 7% fewer tokens/s than a bare "
              "launcher). One CPU left free avoids it.")


def preflight(cfg: RunConfig, tracking_uri: str | None = None, world: int | None = None, ray: bool = True,
              read_data: bool = True) -> None:
    """Everything a run needs that can be checked before Ray or any worker starts, so a user
    error is one line and exit 2 instead of a worker traceback minutes later: the model folder
    and its targets, the data files, the DeepSpeed config, that the switch fits in training,
    the workers against this machine (local Ray) and the tracking server. `read_data=False` leaves
    out reading every row (the ranks of a launcher other than rank 0: one reader per job, not one
    per rank; the training set checks every row again when it tokenizes)."""
    check_paths(cfg)  # every input exists as a file/folder, every output folder can be made
    stage = read_deepspeed_json(cfg).get("zero_optimization", {}).get("stage")  # exists, is JSON, a known stage
    if cfg.deepspeed.strategy != "auto" and isinstance(stage, int) and stage != STAGES[cfg.deepspeed.strategy]:
        raise ValueError(f"deepspeed.strategy: {cfg.deepspeed.strategy} contradicts zero_optimization.stage {stage} "
                         f"in {cfg.deepspeed.config}; set one of them (the stage to \"auto\")")
    # The precision settings agree (the hardware's default is settled on the workers).
    on_gpu = cfg.workers.use_gpu or torch.cuda.is_available()
    settle_precision(cfg, read_deepspeed_json(cfg), cfg.deepspeed.config, on_gpu, on_gpu)
    _check_model(cfg)
    if read_data:
        n = _check_data(cfg)
        optimizer_steps(cfg, n, world or cfg.workers.num_workers)  # data enough for a step; the switch fits
    if ray:
        _check_resources(cfg)
    uri = tracking_uri if tracking_uri is not None else cfg.tracking.uri
    if not cfg.tracking.offline:
        check_tracking_reachable(uri)
    _check_registry(cfg, uri)


def _check_registry(cfg: RunConfig, uri: str | None) -> None:
    """tracking.register_as needs a run to register from and a store that has a registry."""
    if not cfg.tracking.register_as:
        return
    if cfg.tracking.offline:
        raise ConfigError("tracking.register_as: a run with tracking.offline: true logs no adapter to register; "
                          "drop one of the two")
    if cfg.method.method == "full":
        raise ConfigError("tracking.register_as registers a PEFT adapter, and method: full exports the whole model "
                          "(the run's model/ folder and MLflow artifact) instead; drop tracking.register_as")
    problem = model_registry_problem(uri) if uri else None
    if problem:
        raise ConfigError(problem)
