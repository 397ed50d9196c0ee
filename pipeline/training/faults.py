"""Faults injected on purpose, for the reliability tests; nothing happens unless a test asks.

Tests start real processes (torchrun, the DeepSpeed launcher, Ray workers), so they ask
through environment variables, read once here into a `Faults` the worker context carries. The
product code calls its hooks at the few points a test needs to break:

  TSD_INJECT_NAN_AT_STEP=k          the loss of optimizer step k becomes NaN
  TSD_INJECT_NAN_GRAD_AT_STEP=k     step k keeps a finite loss but gets a NaN gradient
  TSD_INJECT_STEP_DELAY_S=x         sleep x s after every step (to act on a run mid-way)
  TSD_INJECT_PAUSE_FILE=path        after every step, wait while this file exists (to act on a
                                    live run at a known point, however slow the machine)
  TSD_INJECT_FAIL_IN_SWITCH_RANK=r  rank r raises in the switch, after its first SVD (its peers
                                    are then in, or entering, the round's collectives)
  TSD_INJECT_SWITCH_PEER_DELAY_S=x  with the above, the other ranks stay busy x s there instead
                                    (a long SVD: not in a collective that would notice)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def _number(env: Mapping[str, str], name: str, kind):
    value = env.get(name)
    return kind(value) if value else None


@dataclass(frozen=True)
class Faults:
    nan_loss_at_step: int | None = None
    nan_grad_at_step: int | None = None
    step_delay_s: float = 0.0
    fail_in_switch_rank: int | None = None
    switch_peer_delay_s: float = 0.0
    pause_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        return cls(
            nan_loss_at_step=_number(env, "TSD_INJECT_NAN_AT_STEP", int),
            nan_grad_at_step=_number(env, "TSD_INJECT_NAN_GRAD_AT_STEP", int),
            step_delay_s=_number(env, "TSD_INJECT_STEP_DELAY_S", float) or 0.0,
            fail_in_switch_rank=_number(env, "TSD_INJECT_FAIL_IN_SWITCH_RANK", int),
            switch_peer_delay_s=_number(env, "TSD_INJECT_SWITCH_PEER_DELAY_S", float) or 0.0,
            pause_file=env.get("TSD_INJECT_PAUSE_FILE") or None,
        )

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of optimizer step `step`, broken if asked."""
        if step == self.nan_loss_at_step:
            return loss * float("nan")
        if step == self.nan_grad_at_step:
            return loss + torch.sqrt(loss * 0.0)  # the same finite value; d/dx sqrt(0) = inf -> NaN
        return loss

    def after_step(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        while self.pause_file and os.path.exists(self.pause_file):
            time.sleep(0.1)

    def in_switch(self, rank: int) -> None:
        """Called by each rank after decomposing a weight in the switch."""
        if self.fail_in_switch_rank is None:
            return
        if rank == self.fail_in_switch_rank:
            raise RuntimeError(f"injected failure in the switch on rank {rank} (TSD_INJECT_FAIL_IN_SWITCH_RANK)")
        time.sleep(self.switch_peer_delay_s)


NO_FAULTS = Faults()
