"""What the DeepSpeed engine is built from: seeds, the DeepSpeed config, the model loaded
partitioned by ZeRO-3, the learning-rate schedule (and its restart after a LoRA-Init switch), and
the optimizer state reset and master-copy refresh that follow an Init switch."""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.integrations import HfDeepSpeedConfig

from pipeline.config import RunConfig
from pipeline.precision import weights_dtype
from pipeline.logs import log
from pipeline.classification.head import HEAD_MODULES, head_config, init_head
from pipeline.model_task import model_class
from pipeline.training.partitioned_load import CannotLoadPartitioned, load_partitioned, weight_files
from pipeline.training.distributed import rank_and_world
from pipeline.training.strategy import STAGES
from tsd.partition import full_shape, is_partitioned, master_copy_reachable


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:  # numpy is optional for torch; seed it when it is there (data code may use it)
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def read_deepspeed_json(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON of deepspeed.config, checked: valid JSON, a ZeRO stage of 0, 2, 3 or
    "auto" (then deepspeed.strategy decides: pipeline.training.strategy)."""
    path = Path(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"deepspeed.config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    stage = ds.get("zero_optimization", {}).get("stage", "auto")
    if stage != "auto" and (isinstance(stage, bool) or stage not in STAGES.values()):
        raise ValueError(f"deepspeed.config: {path}: zero_optimization.stage {stage!r} is not one of 0 (ddp), "
                         f"2 (zero2), 3 (zero3) or \"auto\" (deepspeed.strategy decides)")
    return ds


def deepspeed_config(cfg: RunConfig, strategy: str = "zero3", roomy: bool = True) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the run config: the ZeRO stage of
    `strategy`, and under ZeRO-3 its limits (`zero3_limits`, by whether the whole model fits a
    rank: `roomy`). Settings only ZeRO-3 reads are dropped under the other strategies."""
    ds = read_deepspeed_json(cfg)
    t = cfg.train
    fills = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro x accum x world
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = STAGES[strategy]
    if strategy != "zero3":
        for key in [k for k in zero if k.startswith("stage3_") or k == "offload_param"]:
            del zero[key]
    for key, value in zero3_limits(cfg, roomy or strategy != "zero3").items():
        if zero.get(key, "auto") == "auto" and (strategy == "zero3" or not key.startswith("stage3_")):
            zero[key] = value
    for key, on in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    return ds


# Training under ZeRO-3 with a whole model's worth of weights gathered at once, on top of the
# rank's slices and the activations: below this multiple of the model a rank is "tight".
ROOMY_HEADROOM = 2.0



def zero3_is_roomy(cfg: RunConfig, sizes) -> tuple[bool, str]:
    """Whether the whole model fits every rank ROOMY_HEADROOM times over (then ZeRO-3 keeps
    DeepSpeed's fastest limits), with why. `sizes`: strategy.run_model_sizes, the estimate the
    strategy was chosen by (None: unknown, never roomy). Every rank calls it (collective)."""
    from pipeline.training.memory import whole_model_fits

    return whole_model_fits(cfg, sizes.weight_bytes if sizes is not None else None, ROOMY_HEADROOM)


def zero3_limits(cfg: RunConfig, roomy: bool) -> dict[str, int]:
    """ZeRO-3's bucket and live-parameter limits for the config's "auto" values.

    `roomy` (a whole model fits each rank twice over): DeepSpeed's own defaults, the fastest
    (gathered weights stay gathered from the forward to the backward: SmolLM2 on 2 CPU ranks
    runs 25% slower without that). Otherwise sized from the model: DeepSpeed's 1e9-element
    reuse distance keeps every gathered weight gathered in a model under 1e9 parameters, and
    generation keeps the whole model gathered (measured 4.3x a rank's share while training a
    2.3 GB model, benchmarks/bench_memory_phases.py); here a gathered weight is released unless
    used again within one MLP weight, and at most three MLP weights are live. Buckets follow the
    hidden size (transformers' rule for ZeRO-3: h^2 to reduce, 0.9 h^2 to prefetch)."""
    if roomy:
        return {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000}
    try:
        arch = json.loads((Path(cfg.model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # the preflight names a missing model folder; DeepSpeed's defaults stand
    text = arch.get("text_config", arch)  # multimodal configs nest the language model's
    hidden = int(text.get("hidden_size") or 4096)
    largest = hidden * int(text.get("intermediate_size") or 4 * hidden)
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_max_live_parameters": 3 * largest,
        "stage3_max_reuse_distance": largest,
    }


def load_model(cfg: RunConfig, ds_config: dict, labels: list[str] | None = None):
    """Load the base model: under ZeRO-3 partitioned (every rank keeps only its slices), else a
    whole copy on every rank. For model.task seq_cls, with a head over `labels` (class names in
    id order) started from the run's seed (pipeline.model_task.init_head).

    `HfDeepSpeedConfig` must exist, and stay referenced, while `from_pretrained` runs: it is
    how transformers knows to build the model inside `deepspeed.zero.Init` (ZeRO-3 only).
    """
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    hf_ds = HfDeepSpeedConfig(ds_config)
    dtype = getattr(torch, weights_dtype(cfg))  # the training loop settles it first (pipeline.precision)
    remote = cfg.model.trust_remote_code
    auto = model_class(cfg.model.task)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=remote)
    classifier = cfg.model.task == "seq_cls"
    if classifier:
        head_config(config, len(labels), labels, tokenizer.pad_token_id)
    new = list(HEAD_MODULES) if classifier else []  # not in the pretrained files
    kernel = {} if cfg.model.attn_implementation == "auto" else {"attn_implementation": cfg.model.attn_implementation}
    if ds_config["zero_optimization"]["stage"] != 3:
        model = auto.from_pretrained(str(path), config=config, dtype=dtype, trust_remote_code=remote, **kernel)
    else:
        try:
            weight_files(path)  # safetensors: each rank reads only its slices (no whole copy on rank 0)
            model = auto.from_config(config, dtype=dtype, trust_remote_code=remote, **kernel)
            load_partitioned(model, path, new_modules=new)
            if (path / "generation_config.json").is_file() and not classifier:
                model.generation_config = GenerationConfig.from_pretrained(str(path))
            model.eval()  # as from_pretrained leaves it; the loop switches to training mode
        except CannotLoadPartitioned as why:
            if not cfg.model.allow_whole_load:
                raise ValueError(f"model.path: {path} cannot be loaded slice by slice under ZeRO-3 ({why}); "
                                 f"transformers would load the whole model on rank 0 first. Convert the folder to "
                                 f"safetensors under the model's own parameter names, or set "
                                 f"model.allow_whole_load: true if rank 0 has the memory") from None
            log(f"WARNING: loading {path} through transformers' ZeRO-3 path, where rank 0 holds the whole model "
                f"while loading (model.allow_whole_load): {why}")
            model = auto.from_pretrained(str(path), config=config, dtype=dtype, trust_remote_code=remote, **kernel)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if classifier:
        heads = init_head(model, cfg.train.seed)
        log(f"classification head {', '.join(heads)} over {len(labels)} classes, started from seed {cfg.train.seed}")
    return model, tokenizer, hf_ds


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing, non-reentrant: each layer's activations are recomputed
    in the backward pass. Non-reentrant because the reentrant form needs an input that requires
    grad (a frozen embedding under LoRA gives none: no gradient would reach the adapters) and
    cannot follow ZeRO-3's parameter hooks; it also restores the RNG, so dropout draws the same
    mask when a layer is recomputed."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         f"checkpointing in transformers; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log("gradient checkpointing on: each layer's activations are recomputed in the backward pass")


def assert_partitioned(model) -> None:
    """ZeRO-3 must really have partitioned the base weights: the switch depends on it."""
    _, world = rank_and_world()
    big = [p for p in model.parameters() if len(full_shape(p)) == 2]
    if not big or not all(is_partitioned(p) for p in big):
        raise RuntimeError("the model's weights are not ZeRO-3 partitioned (HfDeepSpeedConfig not active?)")
    if world > 1 and any(p.ds_tensor.numel() >= p.ds_numel for p in big):
        raise RuntimeError("a ZeRO-3 partition holds a whole weight; partitioning is not effective")


def lr_lambda_factory(cfg: RunConfig, total_steps: int, state: dict):
    """Warmup then linear/cosine/constant decay; `state['phase_start']` restarts the schedule
    (LoRA-Init's main phase gets a fresh warmup and decay over the steps that remain)."""
    t = cfg.train

    def lr_lambda(step: int) -> float:
        start = state["phase_start"]
        local, span = step - start, max(total_steps - start, 1)
        if t.warmup_steps and local < t.warmup_steps:
            return (local + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(max((local - t.warmup_steps) / max(span - t.warmup_steps, 1), 0.0), 1.0)
        if t.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return lr_lambda


def restart_schedule(scheduler, sched_state: dict, step: int) -> None:
    """Start LoRA-Init's main phase's schedule at the next step (local step 0: warm-up's first
    rate). The switch runs after `engine.step()`, which has already asked the scheduler for the
    next step's rate under the old phase; that rate is recomputed here, or the first step with
    fresh Adam moments would run at the old phase's rate."""
    sched_state["phase_start"] = step
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates  # what get_last_lr() reports


def reset_optimizer_state(engine) -> None:
    """A fresh AdamW (zero moments, step 0) for LoRA-Init's main phase, in place: parameters
    cannot be re-registered with a running ZeRO-3 engine, but their state can be zeroed."""
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for state in inner.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


def refresh_master_copies(engine) -> str:
    """Make every copy of the trainable weights the optimizer keeps equal to the model's, after a
    switch edited them in place (LoRA-Init); returns what it did, for a log line.

    DeepSpeed's 16-bit optimizers keep fp32 master copies apart from the model and copy them into
    the model after every step: left stale, the next step silently restores the old A and B
    while the base is already the residual, undoing LoRA-Init. ZeRO-3's partitions and the
    optimizers that link each parameter to its master (`_hp_mapping`: ZeRO-1/2, BF16_Optimizer)
    were already given the exact fp32 factors by the switch (tsd.partition.set_master_copy);
    `refresh_fp32_params` would overwrite those with the 16-bit-rounded model values, so it runs
    only where that path does not reach: stage 0 with bf16/fp16 (FP16_UnfusedOptimizer,
    FP16_Optimizer), whose masters all become the model's 16-bit values, upcast (for parameters
    the switch did not touch, a modules_to_save head, a one-time rounding to what the model
    already computes with). In fp32 without ZeRO the optimizer steps the parameters themselves:
    nothing to do. Local to the rank (no collective); every rank calls it after the switch."""
    optimizer = engine.optimizer
    name = type(optimizer).__name__
    refresh = getattr(optimizer, "refresh_fp32_params", None)
    if refresh is None:
        return f"{name} steps the model's own parameters: no master copy to refresh"
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    if all(master_copy_reachable(p) for p in trainable):
        return f"{name}: fp32 master copies already set exactly by the switch (kept, not refreshed from 16 bits)"
    refresh()
    return f"{name}: fp32 master copies refreshed from the model's weights"


def release_training_state(engine, keep_module: bool) -> None:
    """Free what training needed and evaluation does not, once training is over: Adam's moments
    and the fp32 master copy of the trainable slices (ZeRO-3 keeps them apart from the module's
    own slices), and with `keep_module=False` this rank's share of the base weights too (a whole
    copy is about to replace the partitioned model). The engine cannot train afterwards."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None:
        inner.state.clear()
    # ZeRO-3's and ZeRO-2's names for the fp32 master partitions (stage 0 has none)
    masters = [*getattr(optimizer, "fp32_partitioned_groups_flat", []),
               *getattr(optimizer, "single_partition_of_fp32_groups", [])]
    for flat in masters:
        flat.grad = None
        flat.data = torch.empty(0, dtype=flat.dtype, device=flat.device)
    if not keep_module:
        for p in engine.module.parameters():
            if is_partitioned(p):
                p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
