"""Wrap a model's target linear layers in `TSDLinear` and freeze everything else."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tsd.config import TSDConfig
from tsd.layer import TSDLinear
from tsd.partition import full_shape


class TargetError(ValueError):
    """The target modules cannot be wrapped; the message names the module and the reason."""


@dataclass
class InjectionReport:
    layers: list[str]
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"{len(self.layers)} layers wrapped; trainable params: {self.trainable_params:,} || "
            f"all params: {self.total_params:,} || trainable%: {self.trainable_percent:.4f}"
        )


def matches_target(name: str, targets: list[str]) -> bool:
    """PEFT's `target_modules` rule for a list: the full name or its last dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def tsd_layers(model: nn.Module) -> list[tuple[str, TSDLinear]]:
    """Every TSD layer of the model, in module order (the order all ranks walk)."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, TSDLinear)]


def saved_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules `modules_to_save` names (outermost matches only), in module order. Names the
    model lacks are skipped, as PEFT skips its sequence-classification defaults; none at all
    matching is an error (a head that never trains would be silently random)."""
    if not names:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if name and matches_target(name, names) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, mod))
    if not found:
        raise TargetError(f"modules_to_save {names}: no module of {type(model).__name__} matched "
                          f"(its top-level modules are {[n for n, _ in model.named_children()]})")
    return found


def numel(param) -> int:
    n = 1
    for d in full_shape(param):
        n *= d
    return n


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting full sizes of ZeRO-3-partitioned parameters."""
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total


def inject(model: nn.Module, config: TSDConfig) -> InjectionReport:
    """Replace every target `nn.Linear` with a `TSDLinear` and freeze all other parameters but
    those of `modules_to_save` (method full: wrap nothing, train every parameter).

    Call it with the same seed on every rank: the Kaiming init of A must be identical
    everywhere before DeepSpeed partitions the new parameters.
    """
    if any(isinstance(m, TSDLinear) for m in model.modules()):
        raise TargetError("the model already holds TSD layers; inject once")
    if config.is_full:  # full fine-tuning: nothing wrapped, everything trains
        for p in model.parameters():
            p.requires_grad_(True)
        trainable, total = parameter_counts(model)
        return InjectionReport(layers=[], trainable_params=trainable, total_params=total)
    matched = [(name, mod) for name, mod in model.named_modules() if name and matches_target(name, config.targets)]
    if not matched:
        linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})
        raise TargetError(
            f"targets {config.targets}: no module of {type(model).__name__} matched; "
            f"its linear layers are named {linear}"
        )
    for name, mod in matched:
        if not isinstance(mod, nn.Linear):
            raise TargetError(
                f"target {name!r} is a {type(mod).__name__}, not nn.Linear; only linear layers can be "
                f"wrapped (narrow `targets` so it matches only linear layers)"
            )
        m, n = full_shape(mod.weight)
        if config.r > min(m, n):
            raise TargetError(f"{name}: r={config.r} exceeds min(out, in)={min(m, n)} of its weight {m}x{n}")
        if config.dash_size > min(m, n):
            raise TargetError(
                f"{name}: num_directions s={config.dash_size} exceeds min(out, in)={min(m, n)} of its weight {m}x{n}"
            )

    saved = saved_modules(model, config.modules_to_save)
    clash = [n for n, _ in matched if any(n == s or n.startswith(s + ".") for s, _ in saved)]
    if clash:
        raise TargetError(f"{clash[0]} is both a target and inside modules_to_save; a module trains one way or the other")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, mod in saved:  # trained whole, beside the adapter (a classification head)
        for p in mod.parameters():
            p.requires_grad_(True)
    for name, mod in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = TSDLinear(
            mod,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            dash_size=config.dash_size,
            dash_scaled=config.dash_scaled,
            keep_init=config.uses_init,
        )
        setattr(parent, child, wrapped)
    trainable, total = parameter_counts(model)
    return InjectionReport(layers=[n for n, _ in matched], trainable_params=trainable, total_params=total)
