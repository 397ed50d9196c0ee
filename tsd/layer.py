"""`TSDLinear`: a frozen `nn.Linear` plus LoRA and the LoRA-Dash term, in one small module.

    y = x W^T + b + scaling * (drop(x) A^T) B^T + (drop(x) V_s) diag(d) U_s^T

Every tensor the run will ever need is created here with its final shape, before any
DeepSpeed engine exists (parameters cannot be added to a running engine): the dash scalars
`d` are zero-initialised parameters, `U_s`/`V_s` and the bookkeeping of the switch are
buffers, filled in place when the switch happens. Buffers travel in `state_dict`, so a
checkpoint carries the whole TSD state (switch step, indices, sigma, change rates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tsd.directions import LayerDirections

NOT_SWITCHED = -1


class TSDLinear(nn.Module):
    """LoRA (+ dash) around a frozen linear layer.

    The layer owns exactly its adapter tensors:
      lora_A (r, in), lora_B (out, r)                  trainable
      dash_scalars (s,)                                trainable, zero until the dash switch
      dash_U (out, s), dash_V (in, s)                  frozen directions (buffers)
      dash_indices, dash_sigma, dash_change_rates,     what was selected and why (buffers)
      dash_step                                        optimizer step of the switch, -1 before
      init_A0, init_B0, init_indices, init_step        LoRA-Init's starting factors (buffers;
                                                       only with keep_init=True), needed to
                                                       export the update against the original W
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dash_size: int = 0,
        dash_scaled: bool = False,
        keep_init: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"TSDLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        # Read sizes from the module, not from the weight: under ZeRO-3 the local weight is empty.
        self.out_features = base_layer.out_features
        self.in_features = base_layer.in_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.dash_size = dash_size
        self.dash_scaled = dash_scaled
        self.merged = False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = base_layer.weight.device
        kw = dict(device=device, dtype=adapter_dtype)
        m, n = self.out_features, self.in_features
        self.lora_A = nn.Parameter(torch.empty(r, n, **kw))
        self.lora_B = nn.Parameter(torch.zeros(m, r, **kw))
        # LoRA's standard start (as PEFT): A Kaiming-uniform, B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        if dash_size:
            k = min(m, n)
            self.dash_scalars = nn.Parameter(torch.zeros(dash_size, **kw))
            self.register_buffer("dash_U", torch.zeros(m, dash_size, **kw))
            self.register_buffer("dash_V", torch.zeros(n, dash_size, **kw))
            self.register_buffer("dash_indices", torch.full((dash_size,), -1, dtype=torch.long, device=device))
            self.register_buffer("dash_sigma", torch.zeros(dash_size, **kw))
            self.register_buffer("dash_change_rates", torch.zeros(k, **kw))
            self.register_buffer("dash_step", torch.tensor(NOT_SWITCHED, dtype=torch.long, device=device))
        self.keep_init = keep_init
        if keep_init:
            self.register_buffer("init_A0", torch.zeros(r, n, **kw))
            self.register_buffer("init_B0", torch.zeros(m, r, **kw))
            self.register_buffer("init_indices", torch.full((r,), -1, dtype=torch.long, device=device))
            self.register_buffer("init_step", torch.tensor(NOT_SWITCHED, dtype=torch.long, device=device))
        # Python mirrors of dash_step >= 0 and init_step >= 0: forward and the per-step switch
        # bookkeeping (tsd.switch.due_switches) never read a device tensor (a GPU sync each).
        self._dash_on = False
        self._init_on = False

    # ----------------------------------------------------------------------------- state
    @property
    def dash_active(self) -> bool:
        return self._dash_on

    @property
    def init_done(self) -> bool:
        return self._init_on

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Once per load, not per step: the only places the buffers are read on the host.
        self._dash_on = bool(self.dash_size) and int(self.dash_step) >= 0
        self._init_on = self.keep_init and int(self.init_step) >= 0

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
            f"s={self.dash_size}, dash_active={self._dash_on}, merged={self.merged}"
        )

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        xd = self.lora_dropout(x).to(self.lora_A.dtype)
        if self.dash_size and self._dash_on:
            # LoRA and the dash term as ONE factored pair of width r + s:
            #   x [A; V_s^T]^T [scaling B | c U_s diag(d)]^T
            # Never the m x n matrix, and x is read once: two separate skinny products (one per
            # term) cost 7% over LoRA on CPU, the fused pair 2% (benchmarks/bench_step.py).
            c = self.scaling if self.dash_scaled else 1.0
            # The directions are buffers, which DeepSpeed leaves in fp32 when it casts the
            # parameters to bf16/fp16 (ddp, zero2): computed in the factors' dtype, as x is.
            dtype = self.lora_A.dtype
            down = torch.cat([self.lora_A, self.dash_V.t().to(dtype)], dim=0)
            up = torch.cat([self.lora_B * self.scaling, (self.dash_U.to(dtype) * (self.dash_scalars * c)).to(dtype)],
                           dim=1)
            update = F.linear(F.linear(xd, down), up)
        else:
            hidden = F.linear(xd, self.lora_A)
            if self.dash_size:
                # Before the switch d takes part in the graph with an exactly-zero gradient, so
                # gradient hooks (ZeRO-3 reduce-scatter) fire the same way in both phases; added
                # to the r-wide intermediate, not the m-wide output, it costs next to nothing.
                hidden = hidden + self.dash_scalars.sum() * 0.0
            update = F.linear(hidden, self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    # ----------------------------------------------------------------------------- merge
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's update to W in `dtype`: scaling * B A + U_s diag(d) V_s^T."""
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        if self.dash_size and self._dash_on:
            dash = (self.dash_U.to(dtype) * self.dash_scalars.to(dtype)) @ self.dash_V.to(dtype).t()
            delta = delta + (dash * self.scaling if self.dash_scaled else dash)
        return delta

    def _merge_dtype(self) -> torch.dtype:
        # float32 for 16-bit bases (one rounding at the end); a float64 base keeps its precision
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, acc = self.base_layer.weight, self._merge_dtype()
        w.copy_((w.to(acc) + self.delta_weight(acc)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, acc = self.base_layer.weight, self._merge_dtype()
        w.copy_((w.to(acc) - self.delta_weight(acc)).to(w.dtype))
        self.merged = False

    # ----------------------------------------------------------------------------- switches
    @torch.no_grad()
    def fill_dash(self, directions: LayerDirections, step: int) -> None:
        """Install the selected dash directions (the LoRA-Dash switch). `d` stays zero, so the
        model's output is unchanged at this instant; A and B keep training."""
        if not self.dash_size:
            raise RuntimeError("fill_dash on a layer created without a dash term (dash_size=0)")
        s = directions.indices.numel()
        if s != self.dash_size:
            raise ValueError(f"{directions.name}: got {s} dash directions, the layer holds {self.dash_size}")
        directions = directions.to(self.dash_U.device)  # where a broadcast left them (pipeline: the group's device)
        self.dash_U.copy_(directions.U)
        self.dash_V.copy_(directions.V)
        self.dash_indices.copy_(directions.indices)
        self.dash_sigma.copy_(directions.sigma)
        self.dash_change_rates.copy_(directions.change_rates)
        self.dash_scalars.zero_()
        self.dash_step.fill_(step)
        self._dash_on = True

    @torch.no_grad()
    def init_factors(self, directions: LayerDirections) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA-Init's factors from the top-r directions (METHOD.md):
        B = U_I diag(sqrt(sigma_I)) / sqrt(scaling), A = diag(sqrt(sigma_I)) V_I^T / sqrt(scaling),
        so that scaling * B A = U_I diag(sigma_I) V_I^T."""
        root = directions.sigma.float().clamp_min(0).sqrt()
        c = 1.0 / math.sqrt(self.scaling)
        B = directions.U.float() * root * c
        A = (directions.V.float() * root * c).t()
        return A, B

    @torch.no_grad()
    def fill_init(self, directions: LayerDirections, step: int, weight: torch.Tensor | None = None) -> None:
        """The LoRA-Init re-initialisation: A, B from the top-r directions and the residual base
        W_res = W - scaling * B A, so the output equals the ORIGINAL base's at this instant (the
        pre-launch LoRA update is discarded). `weight` is the full base weight to edit in place;
        by default the layer's own (the caller gathers it under ZeRO-3)."""
        if not self.keep_init:
            raise RuntimeError("fill_init on a layer created without keep_init=True")
        if directions.indices.numel() != self.r:
            raise ValueError(f"{directions.name}: LoRA-Init needs r={self.r} directions, got {directions.indices.numel()}")
        target = self.base_layer.weight if weight is None else weight
        # The factors are computed where the weight they edit lives: the selection arrives on the
        # device of the broadcast that shared it, which need not be the layer's.
        A, B = self.init_factors(directions.to(target.device))
        subtract_update_(target, B, A, self.scaling)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.init_A0.copy_(A)
        self.init_B0.copy_(B)
        self.init_indices.copy_(directions.indices)
        self.init_step.fill_(step)
        self._init_on = True


@torch.no_grad()
def subtract_update_(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> None:
    """weight <- weight - scaling * B A, computed in float64 and rounded ONCE to the weight's dtype.

    LoRA-Init's residual base must be the exact W - scaling B0 A0 correctly rounded: the export
    writes the update against the original W ([B | -B0] [A ; A0], export.py), so a loaded adapter
    differs from the trained model by the residual's rounding alone, at most half an ulp of W_res
    per entry. With float32 intermediates, scaling B0 A0 cancels most of W in some entries and its
    float32 error showed through (0.56 bf16 ulp measured). Row blocks keep the float64 copy small.
    """
    if not (weight.device == B.device == A.device):
        raise RuntimeError(f"subtract_update_: the weight is on {weight.device}, B on {B.device}, A on {A.device}; "
                           "the factors must be moved to the weight's device first")
    rows = max(1, (1 << 20) // max(weight.shape[1], 1))
    A64 = A.double()
    for i in range(0, weight.shape[0], rows):
        block = weight[i : i + rows]
        block.copy_((block.double() - (B[i : i + rows].double() @ A64) * scaling).to(weight.dtype))
