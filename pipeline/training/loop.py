"""The training loop: one function, `train`, that every launcher calls on every rank.

Read it top to bottom: set-up (seed, DeepSpeed config, model loaded partitioned, TSD layers
injected, data, engine), optional resume, the step loop with the step-driven switches, the
final checkpoint, the adapter export and the evaluation. The launcher only decides how the
processes start (Ray Train, the DeepSpeed launcher, torchrun) and hands over a `WorkerContext`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import RunConfig, check_switch_fits
from pipeline.data.loader import class_names, micro_batches_per_epoch, train_loader
from pipeline.data.training_set import training_dataset
from pipeline.evaluate import evaluate_after_training
from pipeline.logs import log, setup_logging
from pipeline.model_task import PEFT_TASK_TYPE
from pipeline.paths import write_json_atomic
from pipeline.precision import settle as settle_precision, with_precision
from pipeline.run_folder import RESULT_FILE, record_base, write_run_config
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.registry import register_adapter
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import client, close_run, start_or_continue_run
from pipeline.training import rank_failure
from pipeline.training.base_check import check_base
from pipeline.training.checkpoint import (choose_resume_tag, rebuild_after_resume, restore_rng, save_checkpoint,
                                         weights_only_checkpoint_engine)
from pipeline.training.distributed import bind_device, leave_process_group, prefer_interpreter_tools, rank_and_world
from pipeline.training.engine import (assert_partitioned, deepspeed_config, load_model,
                                      lr_lambda_factory, read_deepspeed_json, refresh_master_copies, reset_optimizer_state,
                                      restart_schedule,
                                      seed_everything, zero3_is_roomy)
from pipeline.training.faults import Faults
from pipeline.training.memory import (PhaseMemory, gather_and_log, release_freed_heap, return_large_frees_to_os,
                                      smallest_budget)
from pipeline.training.nodes import (Node, check_shared_storage, gather_nodes, node_table, shared_folders,
                                     start_system_metrics)
from pipeline.training.rank_failure import on_peer_failure
from pipeline.training.reshard import (Layout, checkpoint_run_id, keep_global_batch, load_resharded, map_data_position,
                                      read_layout)
from pipeline.training.sharded_switch import sharded_switch
from pipeline.training.strategy import ModelSizes, choose_strategy, run_model_sizes
from tsd import collectives
from tsd.export import collect_state, save_adapter, save_full_model
from tsd.inject import inject, tsd_layers
from tsd.switch import due_switches, switch_kind, switch_steps


@dataclass
class WorkerContext:
    """What the launcher tells the loop."""

    run_id: str | None = None  # the MLflow run to log into (rank 0); None: rank 0 makes one
    tracking_uri: str | None = None
    report: Callable[[dict], None] | None = None  # e.g. ray.train.report
    launcher: str = "local"
    local_rank: int | None = None  # this rank's GPU among the visible ones; None: LOCAL_RANK (bind_device)
    faults: Faults = field(default_factory=Faults.from_env)  # only the reliability tests set any


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainResult:
    steps: int = 0
    final_loss: float = float("nan")
    adapter_dir: str | None = None
    switch_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data
def optimizer_steps(cfg: RunConfig, n_examples: int, world: int) -> int:
    """The run's optimizer steps for `n_examples` over `world` ranks (max_steps, else epochs),
    refusing data too small for one step and a switch that would not happen before the end.
    The driver's preflight and the loop both call it, so they cannot disagree."""
    t = cfg.train
    per_epoch = micro_batches_per_epoch(n_examples, world, t.micro_batch_size) // t.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"data.train: {n_examples} examples are too few for {world} rank(s) x micro batch "
            f"{t.micro_batch_size} x grad_accum {t.grad_accum}"
        )
    steps = t.max_steps or max(1, int(t.epochs * per_epoch))
    check_switch_fits(cfg, steps)
    return steps


# ----------------------------------------------------------------------------- the loop
def train(cfg: RunConfig, ctx: WorkerContext | None = None) -> TrainResult:
    setup_logging()  # first: dependency warnings are filtered before anything can raise them
    ctx = ctx or WorkerContext()
    bind_device(ctx.local_rank)  # before any other CUDA call or collective, DeepSpeed's import included
    prefer_interpreter_tools()  # before DeepSpeed compiles (or finds compiled) its CPU op
    # Deferred: importing deepspeed takes seconds and probes the accelerator; the preflight and
    # the driver import this module without training.
    import deepspeed

    if not dist.is_initialized():
        # The backstop for a rank that vanishes without a word (a lost node): its peers' collectives
        # fail after this long. A rank that raises ends the job at once (pipeline.training.rank_failure).
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=cfg.workers.collective_timeout_s))
    rank, world = rank_and_world()
    threads = cfg.workers.threads_per_worker or cfg.workers.cpus_per_worker
    torch.set_num_threads(max(1, threads))
    seed_everything(cfg.train.seed)
    # Before anything is written: every node must see the folders ranks on other nodes write.
    check_shared_storage(shared_folders(cfg), rank, world)

    # The run to log into: made by the driver; made here (rank 0 only) under a bare launcher.
    run_id = ctx.run_id
    owns_run = rank == 0 and run_id is None and not cfg.tracking.offline
    if owns_run:
        run_id, continued = start_or_continue_run(
            ctx.tracking_uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or cfg.name,
            tags={"method": cfg.method.method, "world_size": str(world), "launcher": ctx.launcher},
            params=cfg.to_dict(),
            previous=checkpoint_run_id(cfg.run_dir.resolve()),
        )
        if continued:
            log(f"continuing MLflow run {run_id}, which this run folder's newest checkpoint belongs to")
        # Another rank's failure ends this one from a watcher thread (main_entry): close the run first.
        on_peer_failure(lambda line: close_run(ctx.tracking_uri, run_id, "FAILED"))
    stage = cfg.run_dir.resolve() / "mlflow-stage"  # where logs wait if the tracking server is away
    tracker = RunLogger(ctx.tracking_uri, run_id, enabled=(rank == 0 and run_id is not None), staging_dir=stage)
    tracker.verify()
    nodes = gather_nodes(rank, world)
    monitor = None
    if cfg.tracking.system_metrics_every_s and not cfg.tracking.offline:
        monitor = start_system_metrics(_shared_run_id(run_id), ctx.tracking_uri, nodes, rank,
                                       cfg.tracking.system_metrics_every_s)
    try:
        result = _train(cfg, ctx, tracker, rank, world, nodes)
    except BaseException:
        if owns_run:
            tracker.flush()
            close_run(ctx.tracking_uri, run_id, "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    tracker.close()
    if owns_run:
        close_run(ctx.tracking_uri, run_id, "FINISHED")
    return result


@dataclass
class Session:
    """What set-up builds and the loop runs on (one per process and run)."""

    cfg: RunConfig  # the run config, with train.grad_accum adapted when resuming on another world size
    engine: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    loader: Any  # DataLoader of this rank's micro-batches (pipeline.data.loader)
    ds_config: dict
    total_steps: int
    sched_state: dict  # {"phase_start": step}: LoRA-Init restarts the schedule (lr_lambda_factory)
    hf_ds: Any  # HfDeepSpeedConfig: stays referenced while ZeRO-3 generation may run
    consumed_micro: int = 0  # micro-batches a resumed checkpoint already trained on
    memory: PhaseMemory = field(default_factory=PhaseMemory)  # peak memory per phase
    strategy: str = "zero3"  # how the weights are spread over the ranks (pipeline.training.strategy)
    tight: bool = False  # ZeRO-3 with a rank that cannot hold the model twice: freed memory is returned at once
    last_loss: float = float("nan")  # the last trained step's loss (a resumed run's, from its checkpoint)
    classes: list[str] | None = None  # model.task seq_cls: the class names in id order


def setup(cfg: RunConfig, tracker, rank: int, world: int, nodes: list[Node]) -> Session:
    """Model loaded partitioned, TSD layers injected, optimizer + schedule, DeepSpeed engine;
    then the newest whole checkpoint, if any, and the run's set-up logged to MLflow."""
    import deepspeed

    memory = PhaseMemory()
    memory.enter("load")
    given = cfg
    cfg, precision = settle_precision(cfg, read_deepspeed_json(cfg), cfg.deepspeed.config, torch.cuda.is_available(),
                                      torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    log(precision)
    # The checkpoint to resume from is chosen before the engine exists: it fixes the strategy
    # (a checkpoint is laid out for one), and one written by another number of ranks changes
    # train.grad_accum (the same global batch), hence the engine's config.
    bf16 = deepspeed_config(cfg).get("bf16", {}).get("enabled") is True
    tag = choose_resume_tag(cfg.run_dir.resolve() / "checkpoints", rank, world, bf16=bf16)
    saved = read_layout(cfg.run_dir.resolve() / "checkpoints" / tag) if tag else None
    # Before any weight is read: every node's copy of model.path is the same, and the checkpoint's base.
    base = check_base(cfg.model.path, cfg.run_dir.resolve(), tag, saved, nodes)
    sizes = run_model_sizes(cfg)  # one estimate, in the run's dtype, for the strategy and ZeRO-3's limits
    strategy = decide_strategy(cfg, world, saved, sizes)
    roomy = True
    if strategy == "zero3":
        roomy, why = zero3_is_roomy(cfg, sizes)
        log(f"ZeRO-3 limits: {'DeepSpeed defaults (fastest)' if roomy else 'sized to the model (least memory)'}: {why}")
        if not roomy:
            log(f"memory: {return_large_frees_to_os()}")
    if saved is not None and saved.world_size != world:
        cfg = keep_global_batch(cfg, saved, world)
    ds_config = deepspeed_config(cfg, strategy, roomy)
    t0 = time.perf_counter()
    classes = class_names(cfg.data, cfg.model.num_labels) if cfg.model.task == "seq_cls" else None
    model, tokenizer, hf_ds = load_model(cfg, ds_config, classes)
    if strategy == "zero3":
        assert_partitioned(model)
    # The same seed on every rank: A's Kaiming init must agree before ZeRO-3 partitions it.
    torch.manual_seed(cfg.train.seed)
    injection = inject(model, cfg.method.tsd())
    how = f"partitioned over {world} rank(s)" if strategy == "zero3" else f"whole on each of {world} rank(s)"
    attention = getattr(model.config, "_attn_implementation", None) or "the model's own"
    log(f"model {cfg.model.path} loaded {how} in {time.perf_counter() - t0:.1f}s, attention {attention}; {injection}")

    # Tokenized once per node (or job) into a memory-mapped cache, every rank maps it (pipeline.data.training_set).
    dataset = training_dataset(cfg, tokenizer, classes, rank, nodes)
    total_steps = optimizer_steps(cfg, len(dataset), world)
    loader = train_loader(dataset, rank, world, cfg.train.seed, cfg.train.micro_batch_size, tokenizer.pad_token_id)
    sched_state = {"phase_start": 0}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg, total_steps, sched_state))
    # On a GPU, DeepSpeed is told the device bind_device chose; left alone it would pick
    # cuda:LOCAL_RANK, which under Ray need not be this worker's GPU.
    ds_args = SimpleNamespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, optimizer, _, scheduler = deepspeed.initialize(
        args=ds_args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine.checkpoint_engine)
    session = Session(cfg, engine, optimizer, scheduler, tokenizer, loader, ds_config, total_steps, sched_state, hf_ds,
                      memory=memory, strategy=strategy, tight=not roomy, classes=classes)
    if tag is not None:
        memory.enter("resume")
        resume(session, tag, saved, len(dataset), tracker)

    log(f"{world} rank(s) on {len(nodes)} node(s): " + "; ".join(f"{n.label()} ranks {n.ranks}" for n in nodes))
    tracker.set_tags({"hosts": ",".join(n.label() for n in nodes), "nodes": str(len(nodes)), "world_size": str(world),
                      "strategy": strategy, "precision": cfg.train.precision})
    if rank == 0:
        cfg.run_dir.resolve().mkdir(parents=True, exist_ok=True)
        # A rerun compares its config with this one (pipeline.run_folder): the precision as the user wrote it.
        write_run_config(with_precision(cfg, given.train.precision, given.model.dtype))
        record_base(cfg.run_dir.resolve(), base, replace=tag is None)  # every later checkpoint tag carries it
        write_json_atomic(cfg.run_dir.resolve() / "nodes.json", node_table(nodes))
        tracker.log_artifact(cfg.run_dir.resolve() / "nodes.json", "nodes")
    tracker.log_dict(cfg.to_dict(), "config/run_config.json")
    tracker.log_dict(ds_config, "config/deepspeed_config.json")
    if saved is None or saved.world_size == world:
        tracker.log_params({"total_steps": total_steps, "world_size": world,
                            "trainable_params": injection.trainable_params,
                            "trainable_percent": round(injection.trainable_percent, 6)})
    else:  # MLflow params cannot change within a run: the new world size is a tag
        tracker.set_tags({"resharded": f"{saved.world_size} -> {world} ranks at step {session.engine.global_steps}"})
    return session


def decide_strategy(cfg: RunConfig, world: int, saved: Layout | None, sizes: ModelSizes | None) -> str:
    """deepspeed.strategy, or for auto the fastest that fits every rank (pipeline.training.strategy);
    logged with why. Every rank calls it (the memory budget is the smallest over the ranks).
    `sizes`: strategy.run_model_sizes, the estimate ZeRO-3's limits are sized from too."""
    ds_json = read_deepspeed_json(cfg)
    budget, source = smallest_budget(cfg) if cfg.deepspeed.strategy == "auto" else (0, "")
    choice = choose_strategy(cfg.deepspeed.strategy, ds_json.get("zero_optimization", {}).get("stage"), sizes, world,
                             budget, source, resumed=saved.strategy if saved else None,
                             json_path=cfg.deepspeed.config)
    log(f"strategy {choice.strategy}: {choice.why}")
    return choice.strategy


def resume(session: Session, tag: str, saved: Layout, n_examples: int, tracker) -> None:
    """Load checkpoint `tag` (every rank has it whole; TSD state rides in the module buffers):
    with DeepSpeed's own loader on the world size that wrote it, resharded on any other."""
    rank, world = rank_and_world()
    cfg, engine = session.cfg, session.engine
    ckpt_dir = cfg.run_dir.resolve() / "checkpoints"
    if saved.world_size == world or saved.strategy == "ddp":
        # Not strict: a lean checkpoint has no frozen base (the model folder's weights stay).
        # Data parallel: the model file holds the whole optimizer state, whatever the world.
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    else:
        path = ckpt_dir / tag
        client = load_resharded(engine, path, saved, bf16=session.ds_config.get("bf16", {}).get("enabled") is True)
    rebuilt = rebuild_after_resume(engine.module, client)
    if rebuilt:
        log(f"LoRA-Init residual base rebuilt from the model folder and init_A0/init_B0 in {rebuilt} layers")
    session.consumed_micro = int(client.get("consumed_micro_batches", 0))
    if saved.world_size != world:
        mbs = cfg.train.micro_batch_size
        old_epoch = micro_batches_per_epoch(n_examples, saved.world_size, saved.micro_batch_size or mbs)
        session.consumed_micro = map_data_position(session.consumed_micro, saved, old_epoch, world, mbs,
                                                   len(session.loader))
    session.sched_state["phase_start"] = int(client.get("phase_start", 0))
    session.last_loss = float(client.get("last_loss", float("nan")))
    if rank < saved.world_size:
        restore_rng(ckpt_dir / tag)
    else:
        log(f"rank {rank} did not exist in the {saved.world_size}-rank checkpoint: its random generators start "
            f"from the seed", all_ranks=True)
    log(f"resumed from {path} at optimizer step {engine.global_steps}")
    # A resume in the same MLflow run (a Ray Train worker restart, or the same command rerun
    # after a crash) is recorded, so a run's history shows it was stitched together.
    record_restart(tracker, engine.global_steps)


def _shared_run_id(run_id: str | None) -> str | None:
    """The MLflow run id on every rank (under a bare launcher only rank 0 made it)."""
    return collectives.broadcast_object(run_id, src=0)


def _train(cfg: RunConfig, ctx: WorkerContext, tracker, rank: int, world: int, nodes: list[Node]) -> TrainResult:
    s = setup(cfg, tracker, rank, world, nodes)
    cfg = s.cfg  # train.grad_accum may differ: a checkpoint of another world size keeps its global batch
    engine, total_steps, ckpt_dir = s.engine, s.total_steps, cfg.run_dir.resolve() / "checkpoints"
    result = TrainResult(final_loss=s.last_loss)  # a resume at the last step trains nothing: the checkpoint's
    accum = cfg.train.grad_accum
    switch_at = tuple(sorted(switch_steps(cfg.method.tsd()).values()))  # retention keeps their state's tags
    step_t0, step_stats, micro_in_step = time.perf_counter(), StepStats(), 0
    # The data position: micro-batches trained on so far, over all epochs (a resume starts there).
    micro_index = s.consumed_micro
    epoch, done_in_epoch = divmod(micro_index, len(s.loader))
    done = engine.global_steps >= total_steps
    engine.train()
    s.memory.enter("train")
    while not done:
        s.loader.sampler.start_at(epoch, done_in_epoch)
        done_in_epoch = 0
        for batch in s.loader:
            micro_index += 1
            lr_now = s.optimizer.param_groups[0]["lr"]  # the rate this step applies
            # non_blocking: a blocking host-to-GPU copy waits for the GPU to finish the queued work
            # (a synchronisation per micro-batch); the batch is in pageable memory, staged at once.
            out = engine(**{k: v.to(engine.device, non_blocking=True) for k, v in batch.items()})
            loss = ctx.faults.loss(out.loss, engine.global_steps + 1)
            # A non-finite loss is found once the step is complete (one host synchronisation per
            # optimizer step, not one per micro-batch) and stops the run before that step is
            # saved. No "skip" mode: under ZeRO-3 a forward without its backward desynchronises the
            # ranks' parameter fetches (the run hangs), and a zero-loss backward still lets AdamW's
            # momentum move the weights, so a skip would not be a skip.
            step_stats.add(loss, batch["attention_mask"])
            engine.backward(loss)
            engine.step()
            if s.tight:  # only where memory is short: re-faulting the freed pages costs ~12% of a step
                release_freed_heap()
            micro_in_step += 1
            if micro_in_step < accum:
                continue
            step = engine.global_steps
            loss_mean, tokens, bad, norm = step_stats.agreed(accum, world, engine.get_global_grad_norm())
            if bad:  # summed over the ranks: every rank takes this branch at the same step
                raise non_finite(f"non-finite loss ({loss_mean}) at optimizer step {step}, micro-batches "
                                 f"{micro_index - accum + 1}-{micro_index}; stopping", ckpt_dir)
            seconds = time.perf_counter() - step_t0
            metrics = {
                "loss": loss_mean,
                "lr": float(lr_now),
                "tokens_per_s": tokens / seconds,
                "step_time_s": seconds,
            }
            if norm is not None:
                metrics["grad_norm"] = norm
                if not math.isfinite(norm):  # global norm: every rank sees the same value
                    raise non_finite(f"non-finite gradient norm ({norm}) at optimizer step {step} with a finite "
                                     f"loss ({metrics['loss']:.4g}); stopping before this step's weights are saved",
                                     ckpt_dir)
            result.final_loss = metrics["loss"]
            if step % cfg.train.log_every == 0 or step == total_steps:
                tracker.log_metrics(metrics, step)
                log(f"step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['tokens_per_s']:.0f} tok/s {seconds:.2f}s/step")
                # No per-step ray.train.report: each call blocks ~2 s in Ray Train V2 (measured),
                # which cost 94% of Ray's throughput. MLflow gets every step; Ray gets the end.
            ctx.faults.after_step()
            run_due_switches(s, cfg, ctx, tracker, step, result)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total_steps:
                s.memory.enter("checkpoint")
                save_checkpoint(engine, ckpt_dir, step, micro_index, {**s.sched_state, "last_loss": result.final_loss},
                                cfg.train.keep_checkpoints, switch_at, tracker.run_id)
                s.memory.enter("train")
            step_t0, step_stats, micro_in_step = time.perf_counter(), StepStats(), 0
            if step >= total_steps:
                done = True
                break
        epoch += 1  # optimizer_steps refused data without a full step per epoch: this ends

    result.steps = engine.global_steps
    s.memory.enter("checkpoint")
    save_checkpoint(engine, ckpt_dir, result.steps, micro_index, {**s.sched_state, "last_loss": result.final_loss},
                    cfg.train.keep_checkpoints, switch_at, tracker.run_id)
    return finish(s, cfg, ctx, tracker, result)


def run_due_switches(s: Session, cfg: RunConfig, ctx: WorkerContext, tracker, step: int, result: TrainResult) -> None:
    """The switches due after `step` (sharded over the ranks), and what follows each."""
    tsd_cfg = cfg.method.tsd()
    kinds = due_switches(s.engine.module, tsd_cfg, step)
    for kind in kinds:
        s.memory.enter("switch")
        rep = sharded_switch(s.engine.module, kind, step, tsd_cfg.svd_dtype, cfg.method.svd_cache, ctx.faults)
        if switch_kind(kind).restarts_training:
            # The switch edited A and B: the optimizer's own copies of them must follow, or the
            # next step restores the old ones (stage 0 in bf16/fp16 keeps fp32 masters apart).
            log(f"{kind} switch: {refresh_master_copies(s.engine)}")
            reset_optimizer_state(s.engine)
            restart_schedule(s.scheduler, s.sched_state, step)
        result.switch_seconds[kind] = rep.seconds
        log(f"{kind} switch at step {step}: {len(rep.directions)} layers in {rep.seconds:.2f}s "
            f"(this rank decomposed {len(rep.decomposed)} in {rep.decompose_seconds:.2f}s, "
            f"cache hits {rep.cache_hits}, plan loads {rep.plan_loads})", all_ranks=True)
        tracker.log_metrics({f"switch_{kind}_seconds": rep.seconds}, step)
        tracker.log_directions(rep.directions, kind, step)
    if kinds:
        s.memory.enter("train")


def finish(s: Session, cfg: RunConfig, ctx: WorkerContext, tracker, result: TrainResult) -> TrainResult:
    """Export the adapter, evaluate when data.test is set, log and write the result."""
    rank, _ = rank_and_world()
    run_dir = cfg.run_dir.resolve()
    s.memory.enter("export")
    result.adapter_dir, adapter_state = export_adapter(s.engine.module, cfg, cfg.method.tsd(), run_dir, tracker,
                                                       s.classes)
    if cfg.data.test:
        s.memory.enter("evaluate")
        result.metrics.update(evaluate_after_training(s.engine, adapter_state, s.tokenizer, cfg, run_dir, tracker,
                                                      result.steps, s.classes))
    gather_and_log(s.memory, tracker, run_dir, result.steps)
    if math.isfinite(result.final_loss):  # never a NaN for "nothing trained" (an old checkpoint's resume)
        tracker.log_metrics({"final_loss": result.final_loss}, result.steps)
    tracker.flush()  # the registry reads the adapter back from the run
    if cfg.tracking.register_as and tracker.enabled:
        register(tracker, cfg.tracking.register_as)
    result.metrics.update({"final_loss": result.final_loss, **{f"switch_{k}_seconds": v for k, v in result.switch_seconds.items()}})
    if rank == 0:
        # Written last: its presence is what marks the run finished (pipeline.run_folder).
        write_json_atomic(run_dir / RESULT_FILE, {**result.metrics, "steps": result.steps, "adapter": result.adapter_dir,
                                                  "mlflow_run_id": tracker.run_id})
    if ctx.report is not None:
        ctx.report({**result.metrics, "step": result.steps, "done": 1})
    return result


def param_groups(model, train) -> list[dict]:
    """The trainable parameters as AdamW's groups: one at train.lr, and with train.dash_lr_scale
    != 1 a second of the dash scalars at lr x scale (LambdaLR schedules each group from its own
    base rate). Group 0 is the main one: its rate is the logged `lr`."""
    scalars = {id(p) for n, p in model.named_parameters() if p.requires_grad and n.endswith(".dash_scalars")}
    params = [p for p in model.parameters() if p.requires_grad]
    if train.dash_lr_scale == 1.0 or not scalars:
        return [{"params": params}]
    return [{"params": [p for p in params if id(p) not in scalars]},
            {"params": [p for p in params if id(p) in scalars], "lr": train.lr * train.dash_lr_scale}]


def register(tracker, name: str) -> None:
    """The run's adapter as the next version of registered model `name` (rank 0). A failure here
    warns and leaves the run as it is: training is done and the adapter is saved and logged."""
    try:
        version = register_adapter(tracker.tracking_uri, tracker.run_id, "adapter", name)
    except Exception as e:
        log(f"WARNING: the adapter was not registered as {name!r} ({type(e).__name__}: "
            f"{mask_secrets(str(e).splitlines()[0] if str(e) else '')}); it is logged in run {tracker.run_id}")
        return
    tracker.set_tags({"registered_model": f"{name}/{version}"})
    log(f"adapter registered in MLflow's model registry as {name} version {version}")


def non_finite(what: str, ckpt_dir: Path) -> NonFiniteLossError:
    """The error that stops a run on a NaN/inf, naming the checkpoint it can resume from."""
    last = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else "none"
    return NonFiniteLossError(
        f"{what}. The last good checkpoint ({last} in {ckpt_dir}) is kept; lower train.lr or check the data, "
        f"then rerun the same command to resume from it"
    )


class StepStats:
    """One optimizer step's loss, tokens and non-finite count, kept where the loss is (the GPU)
    until the step ends: then one all-reduce and ONE host synchronisation (`agreed`) give every
    rank the same numbers, where reading them per micro-batch would stall the GPU each time."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None  # sum over the step's micro-batches
        self.tokens: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None  # micro-batches with a non-finite loss

    def add(self, loss: torch.Tensor, attention_mask: torch.Tensor) -> None:
        value = loss.detach().to(torch.float64)
        # The mask is still on the host: counted there, the count copied without waiting for the GPU.
        tokens = attention_mask.sum().to(value.device, torch.float64, non_blocking=True)
        bad = (~torch.isfinite(value)).to(torch.float64)
        if self.loss is None:
            self.loss, self.tokens, self.bad = value, tokens, bad
        else:
            self.loss, self.tokens, self.bad = self.loss + value, self.tokens + tokens, self.bad + bad

    def agreed(self, accum: int, world: int, grad_norm) -> tuple[float, float, bool, float | None]:
        """(mean loss over the step's micro-batches and the ranks, tokens over the ranks, whether
        any rank saw a non-finite loss, the global gradient norm or None). Every rank calls it."""
        summed = collectives.all_reduce(torch.stack([self.loss, self.tokens, self.bad]))
        parts = [summed]
        if torch.is_tensor(grad_norm):  # the same on every rank: read in the same synchronisation
            parts.append(grad_norm.detach().reshape(1).to(summed.device, torch.float64, non_blocking=True))
        values = torch.cat(parts).tolist()  # the step's one host synchronisation
        norm = values[3] if len(values) > 3 else (None if grad_norm is None else float(grad_norm))
        return values[0] / (accum * world), values[1], values[2] > 0, norm


def record_restart(tracker, step: int) -> None:
    """Count this resume in the run: tag `restarts` (the running total) and a metric `restarts`
    at the step resumed from. Rank 0 only (the only enabled tracker); never fails the run."""
    if not tracker.enabled:
        return
    try:
        tags = client(tracker.tracking_uri).get_run(tracker.run_id).data.tags
        count = int(tags.get("restarts", "0")) + 1
    except Exception as e:  # the tracking server may be away: training goes on
        log(f"WARNING: could not read the run's restart count ({type(e).__name__}); not recording this resume")
        return
    tracker.set_tags({"restarts": str(count)})
    tracker.log_metrics({"restarts": float(count)}, step)
    log(f"resume #{count} recorded in MLflow run {tracker.run_id}")


def export_adapter(model, cfg: RunConfig, tsd_cfg, run_dir: Path, tracker,
                   classes: list[str] | None = None) -> tuple[str, dict]:
    """Gather the TSD tensors and any head (every rank), write the PEFT adapter + sidecar (rank
    0), log it. Returns the folder and every rank's gathered copy of the state (evaluation needs
    no disk). A classifier's class names go into the sidecar's metadata."""
    rank, _ = rank_and_world()
    if tsd_cfg.is_full:  # full fine-tuning: the whole model, shard by shard (a collective under ZeRO-3)
        out = run_dir / "model"
        save_full_model(model, out, is_writer=rank == 0)
        if rank == 0:
            log(f"fine-tuned model written to {out}")
            tracker.log_artifacts(str(out), "model")
        collectives.barrier()
        return str(out), {}
    state = collect_state(model, tsd_cfg.modules_to_save)  # a collective under ZeRO-3
    out = run_dir / "adapter"
    if rank == 0:
        save_adapter(model, out, tsd_cfg, base_model_name_or_path=str(Path(cfg.model.path).resolve()), state=state,
                     task_type=PEFT_TASK_TYPE[cfg.model.task],
                     extra_metadata={"labels": json.dumps(classes)} if classes else None)
        log(f"adapter written to {out} ({len(tsd_layers(model))} layers)")
        tracker.log_artifacts(str(out), "adapter")
    collectives.barrier()
    return str(out), state


def main_entry(cfg: RunConfig, ctx: WorkerContext) -> TrainResult:
    """Run `train`, turning a user error into a message and a non-zero exit, not a traceback.
    A failure on one rank ends every rank at once (pipeline.training.rank_failure), not at a timeout."""
    rank_failure.watch()
    try:
        return train(cfg, ctx)
    except (FileNotFoundError, ValueError) as e:
        log(f"error: {e}", all_ranks=True)
        rank_failure.end_job(e, code=2, logged=True)  # returns only in a single-process run
        sys.exit(2)
    except NonFiniteLossError as e:
        log(f"error: {e}")
        sys.exit(3)  # every rank raises it at the same step (the verdict is all-reduced)
    except Exception as e:
        rank_failure.end_job(e)  # returns only in a single-process run
        raise
    finally:
        rank_failure.stop()
        if os.environ.get("TSD_DESTROY_PG", "1") == "1" and dist.is_initialized() and ctx.launcher != "ray":
            # A barrier first only on a normal end (no exception on its way out): a failed peer
            # would never arrive. The process then ends with pipeline.training.distributed.end_process.
            leave_process_group(together=sys.exc_info()[1] is None)
