"""The switches of the methods, driven by optimizer steps, as lists of per-layer work items.

  dash:  at step t, the top-s dash directions of each layer (LoRA-Dash).
  init:  at step t, LoRA re-initialised from the top-r directions (LoRA-Init).
  tsd:   init at step t, then dash at step 2t (LoRA-TSD).

A switch is a list of independent `SwitchItem`s (one per target layer): decompose the base
weight, rate the directions against the current LoRA update, select, fill. Here they run one
after the other in one process (`run_switch`); the pipeline spreads the same items over ranks.
Whether a switch already happened is read from the layers' buffers, which checkpoints carry, so
a resumed run never selects twice. What differs between the two kinds (how many directions,
what is excluded, how a selection is installed, whether training restarts) lives in the small
`Dash` and `Init` objects; everything else is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tsd.config import TSDConfig
from tsd.directions import Decomposition, LayerDirections, layer_directions
from tsd.inject import tsd_layers
from tsd.layer import TSDLinear, subtract_update_
from tsd.partition import full_shape, gathered, set_master_copy

DASH = "dash"
INIT = "init"


@dataclass(frozen=True)
class SwitchItem:
    """One layer's share of a switch."""

    name: str
    shape: tuple[int, int]
    count: int  # directions to select: s for dash, r for init

    @property
    def cost(self) -> int:
        """Relative SVD cost, ~ m n min(m, n) (what the shard plan balances)."""
        m, n = self.shape
        return m * n * min(m, n)


class Dash:
    """The LoRA-Dash switch: s directions per layer into the dash buffers; A and B keep training.
    After LoRA-Init (LoRA-TSD) the subspaces LoRA-Init moved out of the base are excluded."""

    name = DASH
    restarts_training = False  # the optimizer and schedule go on

    def count(self, layer: TSDLinear) -> int:
        return layer.dash_size

    def done(self, layer: TSDLinear) -> bool:
        return layer.dash_active

    def exclude(self, layer: TSDLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B0, A0) after LoRA-Init (see directions.outside_subspaces), else None."""
        return (layer.init_B0, layer.init_A0) if layer.init_done else None

    def fill(self, layer: TSDLinear, directions: LayerDirections, step: int, modifier_rank: int | None = 0) -> None:
        layer.fill_dash(directions, step)  # buffers only: replicated, no collective

    def installed(self, layer: TSDLinear, d: LayerDirections) -> LayerDirections:
        """What a report keeps of the installed selection: U_s, V_s are the layer's own buffers."""
        return LayerDirections(d.name, d.indices.clone(), d.sigma.clone(), layer.dash_U, layer.dash_V,
                               d.change_rates.clone())


class Init:
    """The LoRA-Init switch: A, B from the top-r directions, the base becomes the residual, and
    training restarts (METHOD.md: fresh optimizer state and schedule, done by the trainer)."""

    name = INIT
    restarts_training = True

    def count(self, layer: TSDLinear) -> int:
        return layer.r

    def done(self, layer: TSDLinear) -> bool:
        return layer.init_done

    def exclude(self, layer: TSDLinear) -> None:
        return None

    def fill(self, layer: TSDLinear, directions: LayerDirections, step: int, modifier_rank: int | None = 0) -> None:
        """Edits the (possibly partitioned) base weight and LoRA factors: under ZeRO-3 every rank
        calls this, in the same order. Also the optimizer's fp32 master copy of A and B, or the
        next step would silently undo the edit (a no-op without a ZeRO-3 optimizer)."""
        with gathered([layer.base_layer.weight, layer.lora_A, layer.lora_B], modifier_rank=modifier_rank):
            layer.fill_init(directions, step)
        A, B = layer.init_factors(directions)
        set_master_copy(layer.lora_A, A)
        set_master_copy(layer.lora_B, B)

    def installed(self, layer: TSDLinear, d: LayerDirections) -> LayerDirections:
        """What a report keeps of the installed selection: a copy (U_r, V_r are nowhere else)."""
        return LayerDirections(d.name, d.indices.clone(), d.sigma.clone(), d.U.clone(), d.V.clone(),
                               d.change_rates.clone())

    def rebuild_residual(self, layer: TSDLinear, modifier_rank: int | None = 0) -> None:
        """The residual base W - scaling B0 A0 again, from the ORIGINAL weight in the layer and the
        stored init_A0/init_B0: what a checkpoint without the frozen base needs at resume. The same
        arithmetic as the switch (subtract_update_), so bit for bit when A0, B0 are stored in the
        precision the switch computed them in (float32); in bf16 they were rounded once, and the
        residual differs from the switch's by that rounding times B0 A0. Collective under ZeRO-3."""
        if not layer.init_done:
            return
        with gathered([layer.base_layer.weight], modifier_rank=modifier_rank):
            w = layer.base_layer.weight  # gathered: where ZeRO-3 assembles it, not always the buffers' device
            subtract_update_(w, layer.init_B0.to(w.device, torch.float32), layer.init_A0.to(w.device, torch.float32),
                             layer.scaling)


KINDS: dict[str, Dash | Init] = {DASH: Dash(), INIT: Init()}


def switch_kind(kind: str) -> Dash | Init:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown switch kind {kind!r}; one of {sorted(KINDS)}") from None


def switch_steps(config: TSDConfig) -> dict[str, int]:
    """At which completed optimizer step each switch of the method happens."""
    t = config.switch_step
    return {"lora": {}, "full": {}, "dash": {DASH: t}, "init": {INIT: t}, "tsd": {INIT: t, DASH: 2 * t}}[config.method]


def due_switches(model: nn.Module, config: TSDConfig, step: int) -> list[str]:
    """The switches due after `step` completed optimizer steps that have not happened yet
    (in the order they must run)."""
    layers = tsd_layers(model)
    due = []
    for kind, at in sorted(switch_steps(config).items(), key=lambda kv: kv[1]):
        if step >= at and layers and not all(switch_kind(kind).done(layer) for _, layer in layers):
            due.append(kind)
    return due


def switch_items(model: nn.Module, kind: str) -> list[SwitchItem]:
    switch = switch_kind(kind)
    return [SwitchItem(name=name, shape=full_shape(layer.base_layer.weight), count=switch.count(layer))
            for name, layer in tsd_layers(model)]


def compute_directions(
    layer: TSDLinear,
    item: SwitchItem,
    svd_dtype: str,
    decomposition: Decomposition | None = None,
    kind: str = DASH,
) -> LayerDirections:
    """Decompose, rate and select for one layer. The caller makes W, A and B whole first."""
    return layer_directions(
        item.name,
        layer.base_layer.weight,
        layer.lora_A,
        layer.lora_B,
        layer.scaling,
        item.count,
        svd_dtype,
        decomposition,
        exclude=switch_kind(kind).exclude(layer),
    )


def run_switch(model: nn.Module, kind: str, step: int, svd_dtype: str = "float32") -> list[LayerDirections]:
    """The whole switch over all layers in one process."""
    by_name = dict(tsd_layers(model))
    results = []
    for item in switch_items(model, kind):
        layer = by_name[item.name]
        with gathered([layer.base_layer.weight, layer.lora_A, layer.lora_B]):
            directions = compute_directions(layer, item, svd_dtype, kind=kind)
        switch_kind(kind).fill(layer, directions, step)
        results.append(directions)
    return results
