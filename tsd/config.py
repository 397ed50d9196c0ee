"""The method's settings: one small dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

METHODS = ("lora", "dash", "init", "tsd", "full")
SVD_DTYPES = ("float32", "float64")


class TSDConfigError(ValueError):
    """A method setting is invalid; the message names the setting and the value."""


@dataclass
class TSDConfig:
    """What to fine-tune and how (METHOD.md).

    method:        lora (plain LoRA) | dash (LoRA-Dash) | init (LoRA-Init) | tsd (LoRA-Init, then
                   LoRA-Dash) | full (full fine-tuning, the paper's "Fully FT" baseline: every
                   parameter trains; r, alpha, targets and the switch settings are unused).
    r, alpha:      LoRA rank and alpha; scaling = alpha / r (alpha / sqrt(r) with use_rslora).
    dropout:       dropout on the layer input of the LoRA and dash branches.
    targets:       module-name suffixes to wrap, as PEFT's `target_modules` (a list matches a
                   module whose name equals an entry or ends with "." + entry).
    switch_step:   t, the number of optimizer steps of plain LoRA before the switch (pre-launch).
    num_directions: s, the dash directions kept per layer.
    dash_scaled:   multiply the dash term by `scaling` (the reference code does not; off).
    svd_dtype:     precision of the base-weight SVD.
    modules_to_save: whole modules trained beside the adapter and exported with it, as PEFT's
                   `modules_to_save` (a classification head: `classifier`, `score`); a name
                   matches like `targets`. Names the model lacks are skipped (PEFT does the
                   same for its sequence-classification defaults), but at least one must match.
    """

    method: str = "dash"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    switch_step: int = 100
    num_directions: int = 8
    dash_scaled: bool = False
    svd_dtype: str = "float32"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TSDConfigError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise TSDConfigError(f"r: the LoRA rank must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise TSDConfigError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise TSDConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise TSDConfigError(f"targets: need a non-empty list of module names, got {self.targets!r}")
        # At least one step of plain LoRA before a switch: at step 0, B = 0, every change rate is
        # 0 and the "selection" would be the first indices. Plain LoRA ignores the value.
        low = 0 if self.method in ("lora", "full") else 1
        if not isinstance(self.switch_step, int) or isinstance(self.switch_step, bool) or self.switch_step < low:
            raise TSDConfigError(
                f"switch_step: must be an integer >= {low}{f' for method {self.method!r}' if low else ''}, "
                f"got {self.switch_step!r}"
            )
        if self.method not in ("lora", "full"):
            if not isinstance(self.num_directions, int) or isinstance(self.num_directions, bool) or self.num_directions <= 0:
                raise TSDConfigError(f"num_directions: s must be a positive integer, got {self.num_directions!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise TSDConfigError(f"modules_to_save: need a list of module names, got {self.modules_to_save!r}")
        if self.svd_dtype not in SVD_DTYPES:
            raise TSDConfigError(f"svd_dtype: choose one of {', '.join(SVD_DTYPES)}, got {self.svd_dtype!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def is_full(self) -> bool:
        """Full fine-tuning: no adapter layers, every parameter trains."""
        return self.method == "full"

    @property
    def uses_dash(self) -> bool:
        return self.method in ("dash", "tsd")

    @property
    def uses_init(self) -> bool:
        return self.method in ("init", "tsd")

    @property
    def dash_size(self) -> int:
        """s as the layers allocate it: 0 for methods without a dash term."""
        return self.num_directions if self.uses_dash else 0

    def to_dict(self) -> dict:
        return asdict(self)
