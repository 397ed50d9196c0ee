"""A rank's set-up for training: the checkpoint to resume (chosen first: it fixes the strategy
and, from another world size, the batch split), the strategy, the model loaded (partitioned
under ZeRO-3) with the TSD layers injected, the data, the optimizer and schedule, the DeepSpeed
engine; then the resume itself and the set-up's records (run folder, MLflow). The training loop
(pipeline.training.loop) runs on the `Session` this builds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.config import RunConfig, check_switch_fits
from pipeline.data.loader import class_names, micro_batches_per_epoch, train_loader
from pipeline.data.training_set import training_dataset
from pipeline.logs import log
from pipeline.paths import write_json_atomic
from pipeline.precision import settle as settle_precision, with_precision
from pipeline.run_folder import record_base, write_run_config
from pipeline.tracking.store import client
from pipeline.training.base_check import check_base
from pipeline.training.checkpoint import choose_resume_tag, rebuild_after_resume, restore_rng
from pipeline.training.distributed import rank_and_world
from pipeline.training.engine import (assert_partitioned, deepspeed_config, load_model, lr_lambda_factory,
                                      read_deepspeed_json, zero3_is_roomy)
from pipeline.training.memory import PhaseMemory, return_large_frees_to_os, smallest_budget
from pipeline.training.nodes import Node, node_table
from pipeline.training.reshard import Layout, keep_global_batch, load_resharded, map_data_position, read_layout
from pipeline.training.strategy import ModelSizes, choose_strategy, run_model_sizes
from pipeline.training.weights_only import weights_only_checkpoint_engine
from tsd.inject import inject


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

    record_setup(session, given, tracker, nodes, base, injection, tag, saved)
    return session


def record_setup(s: Session, given: RunConfig, tracker, nodes: list[Node], base, injection, tag: str | None,
                 saved: Layout | None) -> None:
    """What the run was set up as: the nodes in the log and MLflow's tags, the run folder's
    records (rank 0: the config as the user wrote it, the base's fingerprint, the node table) and
    MLflow's params (or, resharded, a tag: params cannot change within a run)."""
    rank, world = rank_and_world()
    cfg = s.cfg
    log(f"{world} rank(s) on {len(nodes)} node(s): " + "; ".join(f"{n.label()} ranks {n.ranks}" for n in nodes))
    tracker.set_tags({"hosts": ",".join(n.label() for n in nodes), "nodes": str(len(nodes)), "world_size": str(world),
                      "strategy": s.strategy, "precision": cfg.train.precision})
    if rank == 0:
        cfg.run_dir.resolve().mkdir(parents=True, exist_ok=True)
        # A rerun compares its config with this one (pipeline.run_folder): the precision as the user wrote it.
        write_run_config(with_precision(cfg, given.train.precision, given.model.dtype))
        record_base(cfg.run_dir.resolve(), base, replace=tag is None)  # every later checkpoint tag carries it
        write_json_atomic(cfg.run_dir.resolve() / "nodes.json", node_table(nodes))
        tracker.log_artifact(cfg.run_dir.resolve() / "nodes.json", "nodes")
    tracker.log_dict(cfg.to_dict(), "config/run_config.json")
    tracker.log_dict(s.ds_config, "config/deepspeed_config.json")
    if saved is None or saved.world_size == world:
        tracker.log_params({"total_steps": s.total_steps, "world_size": world,
                            "trainable_params": injection.trainable_params,
                            "trainable_percent": round(injection.trainable_percent, 6)})
    else:
        tracker.set_tags({"resharded": f"{saved.world_size} -> {world} ranks at step {s.engine.global_steps}"})


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
