"""The training loop: one function, `train`, that every launcher calls on every rank.

Read it top to bottom: set-up (pipeline.training.session: seed, DeepSpeed config, model loaded
partitioned, TSD layers injected, data, engine, optional resume), the step loop with the
step-driven switches, the final checkpoint, the adapter export and the evaluation. The launcher only decides how the
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

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.eval_after_training import evaluate_after_training
from pipeline.logs import log, setup_logging
from pipeline.model_task import PEFT_TASK_TYPE
from pipeline.paths import write_json_atomic
from pipeline.run_folder import RESULT_FILE
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.registry import register_adapter
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import close_run, start_or_continue_run
from pipeline.training import rank_failure
from pipeline.training.checkpoint import save_checkpoint
from pipeline.training.distributed import (bind_device, leave_process_group, prefer_interpreter_tools, rank_and_world,
                                          skip_unused_deepspeed_comm_op)
from pipeline.training.engine import refresh_master_copies, reset_optimizer_state, restart_schedule, seed_everything
from pipeline.training.faults import Faults
from pipeline.training.memory import freeze_startup_objects, gather_and_log, release_freed_heap
from pipeline.training.nodes import Node, check_shared_storage, gather_nodes, shared_folders, start_system_metrics
from pipeline.training.rank_failure import on_peer_failure
from pipeline.training.reshard import checkpoint_run_id
from pipeline.training.session import Session, setup
from pipeline.training.sharded_switch import sharded_switch
from tsd import collectives
from tsd.export import collect_state, save_adapter, save_full_model
from tsd.inject import tsd_layers
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


# ----------------------------------------------------------------------------- the loop
def train(cfg: RunConfig, ctx: WorkerContext | None = None) -> TrainResult:
    setup_logging()  # first: dependency warnings are filtered before anything can raise them
    ctx = ctx or WorkerContext()
    bind_device(ctx.local_rank)  # before any other CUDA call or collective, DeepSpeed's import included
    prefer_interpreter_tools()  # before DeepSpeed compiles (or finds compiled) an op
    # Deferred: importing deepspeed takes seconds and probes the accelerator; the preflight and
    # the driver import this module without training.
    import deepspeed

    skip_unused_deepspeed_comm_op()  # before DeepSpeed's comm backend starts (here or in deepspeed.initialize)

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
            step, seconds = engine.global_steps, time.perf_counter() - step_t0
            metrics = step_metrics(engine, step_stats, accum, world, lr_now, seconds, micro_index, ckpt_dir)
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


def step_metrics(engine, step_stats: StepStats, accum: int, world: int, lr_now: float, seconds: float,
                 micro_index: int, ckpt_dir: Path) -> dict:
    """The optimizer step's metrics as every rank agrees them (one collective, one host read); a
    non-finite loss or gradient norm stops the run here, before the step is saved."""
    step = engine.global_steps
    loss_mean, tokens, bad, norm = step_stats.agreed(accum, world, engine.get_global_grad_norm())
    if bad:  # summed over the ranks: every rank takes this branch at the same step
        raise non_finite(f"non-finite loss ({loss_mean}) at optimizer step {step}, micro-batches "
                         f"{micro_index - accum + 1}-{micro_index}; stopping", ckpt_dir)
    metrics = {"loss": loss_mean, "lr": float(lr_now), "tokens_per_s": tokens / seconds, "step_time_s": seconds}
    if norm is not None:
        metrics["grad_norm"] = norm
        if not math.isfinite(norm):  # global norm: every rank sees the same value
            raise non_finite(f"non-finite gradient norm ({norm}) at optimizer step {step} with a finite "
                             f"loss ({loss_mean:.4g}); stopping before this step's weights are saved", ckpt_dir)
    return metrics


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
                                                       s.classes, s.tokenizer)
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


def export_adapter(model, cfg: RunConfig, tsd_cfg, run_dir: Path, tracker,
                   classes: list[str] | None = None, tokenizer=None) -> tuple[str, dict]:
    """Gather the TSD tensors and any head (every rank), write the PEFT adapter + sidecar (rank
    0), log it. Returns the folder and every rank's gathered copy of the state (evaluation needs
    no disk). A classifier's class names go into the sidecar's metadata. Full fine-tuning writes
    the whole model instead, with `tokenizer`: a folder that loads on its own."""
    rank, _ = rank_and_world()
    if tsd_cfg.is_full:  # full fine-tuning: the whole model, shard by shard (a collective under ZeRO-3)
        out = run_dir / "model"
        save_full_model(model, out, is_writer=rank == 0, tokenizer=tokenizer)
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
    # Here, not at the process's start: a rank that stops at a start check never imports DeepSpeed.
    freeze_startup_objects()
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
