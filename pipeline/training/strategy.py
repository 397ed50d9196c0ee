"""How the weights are spread over the ranks: DeepSpeed ZeRO-3, ZeRO-2, or plain data parallel.

  zero3  every weight partitioned (a rank holds 1/world of the model): the only way for a model
         that does not fit one rank; each layer's weights are gathered for every forward and
         backward, which costs time when the model would have fit.
  zero2  whole weights on every rank; gradients and optimizer state partitioned.
  ddp    whole weights, gradients and optimizer state on every rank (DeepSpeed stage 0): the
         least communication (one all-reduce of the trainable gradients per step).

`deepspeed.strategy: auto` picks the fastest of these (ddp, then zero2, then zero3) whose memory
per rank, estimated from the model folder's safetensors headers (nothing loaded) and the
trainable parameters, fits every rank's budget with a margin; a stage written in the DeepSpeed
JSON, or an explicit strategy, is the user's choice and wins. A resumed run keeps its
checkpoint's strategy (a checkpoint is laid out for one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

STAGES = {"zero3": 3, "zero2": 2, "ddp": 0}
FASTEST_FIRST = ("ddp", "zero2", "zero3")
# Activations, the switch's one full weight and its SVD, allocator slack: the estimate below
# counts none of them, so a strategy is chosen only when twice its estimate fits.
MARGIN = 2.0
# Bytes per trainable parameter beyond the model's own weights: the fp32 parameter (or master
# copy), its gradient and AdamW's two moments.
TRAINABLE_STATE_BYTES = 16
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class ModelSizes:
    """What the choice needs to know of a model, read from its weight files' headers."""

    params: int  # parameters of the base model
    weight_bytes: int  # the base model in the run's dtype (model.dtype)
    largest_weight_bytes: int  # its largest tensor, in the run's dtype
    trainable: int  # trainable parameters of the run (the adapter, or every parameter)


def stage_of(strategy: str) -> int:
    return STAGES[strategy]


def strategy_of_stage(stage: int) -> str:
    for name, s in STAGES.items():
        if s == stage:
            return name
    raise ValueError(f"ZeRO stage {stage} is not one of the strategies {STAGES}")


def model_sizes(folder, dtype: str, targets: list[str] | None, r: int) -> ModelSizes | None:
    """The sizes of a model folder's weights from the safetensors headers (no tensor read),
    with `dtype` the dtype the run loads them in. `targets` None: every parameter trains (full
    fine-tuning); else LoRA of rank r on each 2-D weight whose module matches a target.
    None when the folder has no safetensors weights."""
    from pipeline.training.partitioned_load import CannotLoadPartitioned, weight_files
    from tsd.inject import matches_target

    try:
        files = weight_files(Path(folder))
    except CannotLoadPartitioned:
        return None
    run_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}.get(dtype, 4)
    params = largest = trainable = 0
    for path in files:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__" or not entry.get("dtype", "F32").startswith(("F", "BF")):
                continue
            n = 1
            for d in entry["shape"]:
                n *= d
            params += n
            largest = max(largest, n)
            module = name.rsplit(".", 1)[0]
            if targets is None:
                trainable += n
            elif len(entry["shape"]) == 2 and name.endswith(".weight") and matches_target(module, targets):
                trainable += r * sum(entry["shape"])
    return ModelSizes(params, params * run_bytes, largest * run_bytes, trainable)


def run_model_sizes(cfg) -> ModelSizes | None:
    """The run's one estimate of its model's size, in the dtype the run loads the weights in
    (`weights_dtype`), not the files': a bfloat16 folder trained in float32 takes twice its files'
    bytes. The strategy choice and ZeRO-3's limits (engine.zero3_is_roomy) both size from it."""
    from pipeline.precision import weights_dtype

    m = cfg.method
    return model_sizes(cfg.model.path, weights_dtype(cfg), None if m.method == "full" else list(m.targets), m.r)


def bytes_per_rank(strategy: str, sizes: ModelSizes, world: int) -> int:
    """Estimated steady memory of one rank under `strategy` (weights + trainable state), before
    the margin. ZeRO-3 adds a few gathered layers in flight (4 of the largest tensor)."""
    state = sizes.trainable * TRAINABLE_STATE_BYTES
    if strategy == "ddp":
        return sizes.weight_bytes + state
    if strategy == "zero2":  # the fp32 parameters whole; gradients and moments partitioned
        return sizes.weight_bytes + sizes.trainable * 4 + (state - sizes.trainable * 4) // world
    return sizes.weight_bytes // world + state // world + 4 * sizes.largest_weight_bytes


@dataclass(frozen=True)
class StrategyChoice:
    strategy: str
    why: str


def choose_strategy(requested: str, json_stage, sizes: ModelSizes | None, world: int, budget: int,
                    budget_source: str = "", resumed: str | None = None, json_path: str = "") -> StrategyChoice:
    """The strategy of a run (pure: every rank computes the same from the same inputs).

    requested: deepspeed.strategy; json_stage: zero_optimization.stage of the DeepSpeed JSON
    (an int, or "auto"/None); budget: bytes one rank may use (the smallest over the ranks);
    resumed: the strategy of the checkpoint the run resumes from, if any."""
    pinned = json_stage if isinstance(json_stage, int) and not isinstance(json_stage, bool) else None
    if requested != "auto":
        if pinned is not None and pinned != STAGES[requested]:
            raise ValueError(f"deepspeed.strategy: {requested} contradicts zero_optimization.stage {pinned} in "
                             f"{json_path or 'deepspeed.config'}; set one of them (the stage to \"auto\")")
        if resumed is not None and resumed != requested:
            raise ValueError(f"deepspeed.strategy: {requested}, but the checkpoint this run resumes from was written "
                             f"under {resumed}; resume with deepspeed.strategy: {resumed} (or auto), or start a "
                             f"fresh run folder")
        return StrategyChoice(requested, f"deepspeed.strategy: {requested}")
    if resumed is not None:
        if pinned is not None and strategy_of_stage(pinned) != resumed:
            raise ValueError(f"zero_optimization.stage {pinned} in {json_path or 'deepspeed.config'}, but the "
                             f"checkpoint this run resumes from was written under {resumed}")
        return StrategyChoice(resumed, f"the checkpoint this run resumes from was written under {resumed}")
    if pinned is not None:
        return StrategyChoice(strategy_of_stage(pinned), f"zero_optimization.stage {pinned} in "
                                                         f"{json_path or 'deepspeed.config'}")
    if sizes is None:
        return StrategyChoice("zero3", "the model's size is unknown (no safetensors headers): ZeRO-3, which "
                                       "needs the least memory per rank")
    gib = 2**30
    tried = []
    for strategy in FASTEST_FIRST:
        need = bytes_per_rank(strategy, sizes, world)
        tried.append(f"{strategy} ~{need / gib:.2f} GiB")
        if need * MARGIN <= budget:
            return StrategyChoice(strategy, f"fastest that fits: {', '.join(tried)} per rank x {MARGIN} margin "
                                            f"<= {budget / gib:.2f} GiB ({budget_source}); "
                                            f"deepspeed.strategy overrides")
    return StrategyChoice("zero3", f"nothing fits with margin ({', '.join(tried)} per rank x {MARGIN} > "
                                   f"{budget / gib:.2f} GiB, {budget_source}): ZeRO-3, the least memory per rank")
