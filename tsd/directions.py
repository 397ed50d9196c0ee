"""Task-specific directions: SVD of one weight, change rates, per-layer selection.

For a frozen base W = U diag(sigma) V^T and an update dW = scaling * B A, the change rate of
core direction i is  delta_i = |u_i^T dW v_i| / sigma_i  (METHOD.md). The numerators are
computed in factored form,  u_i^T B A v_i = sum_k (U^T B)[i, k] (A V)[k, i],  at cost
O(r (m + n) min(m, n)): neither dW nor U^T dW V is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Decomposition:
    """Thin SVD W = U diag(S) V^T with U (m, k), S (k,) descending, V (n, k), k = min(m, n).

    `weight_dtype` is the precision W was stored in (bf16, fp32, ...), which may be coarser
    than the SVD's: it bounds which singular values mean anything (`rank_tolerance`).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    weight_dtype: torch.dtype


@dataclass
class LayerDirections:
    """The directions selected for one layer, in descending change rate.

    indices (c,) into the base weight's singular spectrum; sigma (c,) their singular values;
    U (m, c), V (n, c) their singular vectors; change_rates (k,) over the whole spectrum.
    """

    name: str
    indices: torch.Tensor
    sigma: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    change_rates: torch.Tensor

    def to(self, device: torch.device | str) -> LayerDirections:
        """The same selection on `device` (itself when it is there already)."""
        moved = [t.to(device) for t in (self.indices, self.sigma, self.U, self.V, self.change_rates)]
        return LayerDirections(self.name, *moved)


def svd_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"svd dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def decompose(weight: torch.Tensor, dtype: str | torch.dtype = "float32") -> Decomposition:
    """Thin SVD of a 2-D weight, in its faster orientation.

    LAPACK's divide-and-conquer SVD of a tall matrix is about 2x faster than of the same matrix
    wide (PLATFORM.md: 11008x4096 20 s vs 4096x11008 45 s), so a wide W is decomposed as W^T
    and the factors swapped back.
    """
    if weight.dim() != 2:
        raise ValueError(f"decompose expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(svd_dtype(dtype))
    m, n = w.shape
    if m >= n:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return Decomposition(U=U, S=S, V=Vh.mT, weight_dtype=weight.dtype)
    Ut, S, Vht = torch.linalg.svd(w.mT, full_matrices=False)
    return Decomposition(U=Vht.mT, S=S, V=Ut, weight_dtype=weight.dtype)


def rank_tolerance(dec: Decomposition, shape: tuple[int, int]) -> float:
    """Singular values at or below this are numerically zero, by the coarser of two limits:

    - the SVD's own error, NumPy's matrix_rank rule: max(m, n) * eps_svd * sigma_max;
    - the stored weight's rounding: W holds W_exact + E with |E_ij| <= eps_w / 2 |W_ij|, and
      every singular value moves by at most ||E||_2 (Weyl). For round-to-nearest storage,
      ||E||_2 measured 0.1-0.3 eps_w * sigma_max on low-rank float32 and bf16 weights
      (random-matrix estimate: at most ~0.6 eps_w * sigma_max), so eps_w * sigma_max.
    A float64 SVD of a float32 weight therefore does not promote its rounding noise
    (~1e-8 sigma_max) to directions: it rejects what a float32 SVD of the same weight rejects.
    """
    if dec.S.numel() == 0:
        return 0.0
    svd_error = max(shape) * torch.finfo(dec.S.dtype).eps
    storage_error = torch.finfo(dec.weight_dtype).eps if dec.weight_dtype.is_floating_point else 0.0
    return float(max(svd_error, storage_error) * dec.S.max())


def change_rates(dec: Decomposition, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """delta_i = |u_i^T (scaling B A) v_i| / sigma_i for every core direction i (shape (k,)).

    Zero singular values: their singular vectors are not unique (any basis of the null space
    is as good), so a "direction" there is not a property of W. Rates of numerically-zero
    sigma are defined as 0, which keeps them out of the selection, instead of dividing by an
    eps and letting an arbitrary null-space vector win.
    """
    dt = dec.S.dtype
    # (r, k) both: B^T U, not U^T B, keeps the small factor on the left, ~4x faster on CPU
    # BLAS for either memory order of U (it is most of a warm-cache switch's time).
    BtU = lora_B.to(dt).mT @ dec.U
    AV = lora_A.to(dt) @ dec.V
    numer = (BtU * AV).sum(dim=0).abs() * scaling
    m, n = dec.U.shape[0], dec.V.shape[0]
    nonzero = dec.S > rank_tolerance(dec, (m, n))
    return torch.where(nonzero, numer / torch.where(nonzero, dec.S, torch.ones_like(dec.S)), torch.zeros_like(numer))


def outside_subspaces(dec: Decomposition, col_basis: torch.Tensor, row_basis: torch.Tensor) -> torch.Tensor:
    """Mask (k,) of core directions with u_i outside span(col_basis) AND v_i outside
    span(row_basis).

    LoRA-TSD's dash switch needs it: LoRA-Init moved the top-r directions I out of the base
    (W_res = W - U_I diag(sigma_I) V_I^T), so W_res is numerically null on span(U_I) / span(V_I)
    -- but only down to the weight's rounding (about 1e-3 |W| for bf16), which no tolerance on
    sigma can tell from a genuine small direction. Those near-null directions would get huge
    change rates from the LoRA update that now lives exactly there, and win every layer. The
    directions a re-initialised LoRA already owns are excluded by geometry instead: the genuine
    singular vectors of W_res are orthogonal to U_I / V_I, the null ones lie inside them.
    """
    dt = dec.S.dtype
    Qc, _ = torch.linalg.qr(col_basis.to(dt))  # (m, r) orthonormal basis of colspace(B0)
    Qr, _ = torch.linalg.qr(row_basis.to(dt).mT)  # (n, r) orthonormal basis of rowspace(A0)
    in_col = (Qc.mT @ dec.U).pow(2).sum(0)  # ||P u_i||^2, 0 outside .. 1 inside
    in_row = (Qr.mT @ dec.V).pow(2).sum(0)
    return (in_col < 0.5) & (in_row < 0.5)


def select_directions(rates: torch.Tensor, count: int, name: str = "layer") -> torch.Tensor:
    """Indices of the `count` largest change rates, largest first (ties: lower index first)."""
    if count > rates.numel():
        raise ValueError(
            f"{name}: asked for {count} directions but the weight has only {rates.numel()} "
            f"singular directions (min(out, in)); lower num_directions / r for this layer"
        )
    return torch.argsort(rates, descending=True, stable=True)[:count]


def layer_directions(
    name: str,
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    count: int,
    dtype: str | torch.dtype = "float32",
    decomposition: Decomposition | None = None,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LayerDirections:
    """One whole work item of a switch for one layer: decompose (unless given; then `weight` may
    be None), rate, select. `exclude=(B0, A0)`: directions inside LoRA-Init's subspaces are never
    selected (rate 0)."""
    if decomposition is None and weight is None:
        raise ValueError(f"{name}: layer_directions needs the weight or its decomposition")
    dec = decomposition if decomposition is not None else decompose(weight, dtype)
    rates = change_rates(dec, lora_A, lora_B, scaling)
    if exclude is not None:
        rates = torch.where(outside_subspaces(dec, *exclude), rates, torch.zeros_like(rates))
    idx = select_directions(rates, count, name)
    return LayerDirections(
        name=name,
        indices=idx,
        sigma=dec.S[idx],
        U=dec.U[:, idx],
        V=dec.V[:, idx],
        change_rates=rates,
    )
