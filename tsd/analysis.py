"""Exploring task-specific directions: how much the directions selected by different runs (LoRA
ranks, switch steps, seeds, methods) and by different layers agree.

The paper's finding (METHOD.md) is that a short LoRA run already points at the same TSDs
whatever the rank, step or layer. These functions measure that on saved adapters, from the
sidecar `tsd_state.safetensors` (keys `<layer>.dash_indices`, `.dash_U`, `.dash_V`,
`.dash_change_rates`, `.dash_step`; for LoRA-Init `.init_indices`, `.init_A0`, `.init_B0`,
`.init_step`).

Overlap measures between two selections of one layer, each in [0, 1], 1 for identical sets:

  index  |I ∩ J| / s                     the selected positions in the singular spectrum
  U      ||U_a^T U_b||_F^2 / s           the left singular subspaces
  V      ||V_a^T V_b||_F^2 / s           the right singular subspaces
  UV     ||(U_a^T U_b) ∘ (V_a^T V_b)||_F^2 / s
                                          the span of the rank-one directions u_i v_i^T (as
                                          vectors of R^{m x n} they are orthonormal, and
                                          <u_i v_i^T, u_j v_j^T>_F = (u_i·u_j)(v_i·v_j))

with s = min(|I|, |J|) when the two selections differ in size. All are invariant under the
sign ambiguity of singular vectors (a column's sign flips a row or column of the Gram
matrices, never a squared entry). Index overlap only means something between selections of the
SAME spectrum: a LoRA-TSD run selects its dash directions from the residual W - U_I S_I V_I^T,
whose spectrum is W's without the LoRA-Init directions, re-indexed; compare those with U/V/UV.

LoRA-Init stores its starting factors, not the singular vectors: B0 = U_I diag(sqrt(s_I)) / c
and A0 = diag(sqrt(s_I)) V_I^T / c, so U_I and V_I are B0's columns and A0's rows normalised.

Plain torch: no MLflow, no Ray, no plotting (pipeline/reports/analyze.py draws the figures).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tsd.export import SIDECAR

KINDS = ("dash", "init")
MEASURES = ("index", "U", "V", "UV")


class AnalysisError(ValueError):
    """An adapter has no usable selection of the requested kind."""


@dataclass
class LayerSelection:
    """The directions one layer selected: spectrum indices (s,), U (m, s), V (n, s)."""

    layer: str
    indices: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    change_rates: torch.Tensor | None = None
    step: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])


@dataclass
class Selections:
    """Every switched layer's selection of one kind ("dash" or "init") in one adapter."""

    label: str
    kind: str
    layers: dict[str, LayerSelection]
    path: str | None = None
    info: dict[str, object] = field(default_factory=dict)  # method, r, s, step: for captions
    base_model: str | None = None  # as recorded at export


def caveats(selections: Sequence[Selections]) -> list[str]:
    """Comparisons the numbers cannot support: different base models, or index overlap between
    a LoRA-TSD dash selection (indices into the residual's spectrum) and another method's."""
    notes = []
    bases = {s.base_model for s in selections if s.base_model}
    if len(bases) > 1:
        notes.append(f"the adapters were exported from different base models ({', '.join(sorted(bases))}): "
                     "their directions are not comparable")  # fmt: skip
    methods = {s.info.get("method") for s in selections}
    if selections and selections[0].kind == "dash" and "tsd" in methods and len(methods) > 1:
        notes.append("LoRA-TSD selects its dash directions from the residual base W - U_I S_I V_I^T: its indices "
                     "count a different spectrum than LoRA-Dash's, so read U/V/UV, not index, across methods")  # fmt: skip
    return notes


# ----------------------------------------------------------------------------- reading
def _normalize_columns(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=0, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def selections_from_state(state: Mapping[str, torch.Tensor], kind: str = "dash", label: str = "") -> Selections:
    """The layers' selections from a sidecar state dict (`<layer>.<tensor>` keys). Layers that
    never switched (step -1) are left out."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    suffix = f".{kind}_indices"
    layers: dict[str, LayerSelection] = {}
    for key in sorted(state):
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        step_t = state.get(f"{name}.{kind}_step")
        step = int(step_t) if step_t is not None else None
        idx = state[key].to(torch.long).reshape(-1)
        if (step is not None and step < 0) or bool((idx < 0).any()):
            continue  # not switched: the buffers still hold their placeholders
        if kind == "dash":
            U = state[f"{name}.dash_U"].to(torch.float64)
            V = state[f"{name}.dash_V"].to(torch.float64)
            rates = state.get(f"{name}.dash_change_rates")
        else:
            U = _normalize_columns(state[f"{name}.init_B0"].to(torch.float64))
            V = _normalize_columns(state[f"{name}.init_A0"].to(torch.float64).t())
            rates = None
        layers[name] = LayerSelection(name, idx, U, V, None if rates is None else rates.to(torch.float64), step)
    return Selections(label=label, kind=kind, layers=layers)


def read_selections(path: str | os.PathLike, kind: str = "dash", label: str | None = None) -> Selections:
    """The selections saved in an adapter folder (or a sidecar file itself)."""
    p = Path(path)
    file = p / SIDECAR if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"{p}: no {SIDECAR} (is it an adapter exported by this project?)")
    state = load_file(str(file))
    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata() or {}
    sel = selections_from_state(state, kind, label if label is not None else default_label(p))
    sel.path = str(p)
    sel.base_model = meta.get("base_model") or None
    try:
        cfg = json.loads(meta.get("tsd_config", "{}"))
    except json.JSONDecodeError:
        cfg = {}
    steps = sorted({ls.step for ls in sel.layers.values() if ls.step is not None})
    sel.info = {"method": cfg.get("method"), "r": cfg.get("r"), "s": cfg.get("num_directions"),
                "step": steps[0] if len(steps) == 1 else steps}  # fmt: skip
    if not sel.layers:
        method = cfg.get("method", "?")
        raise AnalysisError(
            f"{p}: no layer holds switched {kind} directions (method {method!r}); "
            + ("use kind='init' for LoRA-Init" if kind == "dash" and method == "init" else
               "was the adapter exported before the switch step?")
        )  # fmt: skip
    return sel


def default_label(path: str | os.PathLike) -> str:
    """runs/<name>/adapter -> <name>; any other folder -> its own name."""
    p = Path(path).resolve()
    if p.is_file():
        p = p.parent
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name


# ----------------------------------------------------------------------------- overlaps
def index_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|I ∩ J| / min(|I|, |J|) of two index sets."""
    sa, sb = {int(i) for i in a.reshape(-1)}, {int(i) for i in b.reshape(-1)}
    if not sa or not sb:
        return math.nan
    return len(sa & sb) / min(len(sa), len(sb))


def chance_index_overlap(s_a: int, s_b: int, k: int) -> float:
    """E[index_overlap] of two independent uniform random index sets of sizes s_a, s_b drawn from
    k singular directions: E|I ∩ J| = s_a s_b / k (each of I's indices is in J with probability
    s_b / k), over min(s_a, s_b) -> max(s_a, s_b) / k. What "the same TSDs" must beat."""
    if min(s_a, s_b) <= 0 or k <= 0:
        return math.nan
    return max(s_a, s_b) / k


def chance_subspace_overlap(a: int, b: int, m: int) -> float:
    """E[subspace_overlap] of two independent uniformly random subspaces of dimensions a and b in
    R^m: E||A^T B||_F^2 = a b / m (each of A's unit columns has expected squared projection b/m
    on a random b-dimensional subspace), over min(a, b) -> max(a, b) / m."""
    if min(a, b) <= 0 or m <= 0:
        return math.nan
    return max(a, b) / m


def subspace_overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """||A^T B||_F^2 / min(cols) for matrices with orthonormal columns (same row count)."""
    if A.shape[0] != B.shape[0]:
        return math.nan
    G = A.to(torch.float64).mT @ B.to(torch.float64)
    return float((G * G).sum()) / min(A.shape[1], B.shape[1])


def direction_overlap(Ua: torch.Tensor, Va: torch.Tensor, Ub: torch.Tensor, Vb: torch.Tensor) -> float:
    """Overlap of span{u_i v_i^T} (a) and span{u_j v_j^T} (b) in R^{m x n}."""
    if Ua.shape[0] != Ub.shape[0] or Va.shape[0] != Vb.shape[0]:
        return math.nan
    G = (Ua.to(torch.float64).mT @ Ub.to(torch.float64)) * (Va.to(torch.float64).mT @ Vb.to(torch.float64))
    return float((G * G).sum()) / min(Ua.shape[1], Ub.shape[1])


def layer_overlaps(a: LayerSelection, b: LayerSelection) -> dict[str, float]:
    """Every measure for one pair of selections; NaN where the shapes differ (U/V/UV); and
    "chance", what every measure averages when each selection is a uniformly random choice of
    its size among the layer's k = min(m, n) singular directions (the u_i, v_i and u_i v_i^T of
    one SVD are orthonormal, so all four measures then equal the index overlap)."""
    return {
        "index": index_overlap(a.indices, b.indices),
        "U": subspace_overlap(a.U, b.U),
        "V": subspace_overlap(a.V, b.V),
        "UV": direction_overlap(a.U, a.V, b.U, b.V),
        "chance": chance_index_overlap(a.indices.numel(), b.indices.numel(), min(a.shape)),
    }


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class OverlapReport:
    """Pairwise overlaps of several adapters' selections.

    matrices[measure] is (k, k): entry (i, j) is the mean over the layers both adapters hold;
    per_layer[(i, j)][layer][measure] the per-layer values (i < j); common_layers[(i, j)] how
    many layers entered the mean."""

    labels: list[str]
    matrices: dict[str, torch.Tensor]  # the MEASURES, and "chance"
    per_layer: dict[tuple[int, int], dict[str, dict[str, float]]]
    common_layers: dict[tuple[int, int], int]


def pairwise_overlaps(selections: Sequence[Selections]) -> OverlapReport:
    k = len(selections)
    mats = {m: torch.full((k, k), math.nan, dtype=torch.float64) for m in (*MEASURES, "chance")}
    per_layer: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    common_n: dict[tuple[int, int], int] = {}
    for i in range(k):
        for j in range(i, k):
            a, b = selections[i], selections[j]
            common = [n for n in a.layers if n in b.layers]
            values = {n: layer_overlaps(a.layers[n], b.layers[n]) for n in common}
            if i < j:
                per_layer[(i, j)] = values
                common_n[(i, j)] = len(common)
            for m in mats:
                v = _nanmean([values[n][m] for n in common])
                mats[m][i, j] = mats[m][j, i] = v
    return OverlapReport([s.label for s in selections], mats, per_layer, common_n)


def cross_layer_overlaps(sel: Selections, measure: str = "index") -> tuple[list[str], torch.Tensor]:
    """(layer names, (L, L) matrix) of one measure between the layers of one adapter. Subspace
    measures are NaN between layers of different shapes."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    names = list(sel.layers)
    L = len(names)
    mat = torch.full((L, L), math.nan, dtype=torch.float64)
    for i in range(L):
        for j in range(i, L):
            v = layer_overlaps(sel.layers[names[i]], sel.layers[names[j]])[measure]
            mat[i, j] = mat[j, i] = v
    return names, mat


def spectrum_positions(sel: Selections) -> dict[str, torch.Tensor]:
    """Per layer, the selected indices as fractions of the spectrum length min(m, n) (0 = the
    largest singular value): where in the spectrum the TSDs lie."""
    return {n: ls.indices.to(torch.float64) / max(1, min(ls.shape)) for n, ls in sel.layers.items()}


def layer_group(name: str) -> str:
    """The module type of a layer name: "model.layers.3.self_attn.q_proj" -> "q_proj"."""
    return name.rsplit(".", 1)[-1]


def per_group_mean(values: Mapping[str, Mapping[str, float]], measure: str) -> dict[str, float]:
    """Mean of one measure per module type (q_proj, v_proj, ...) over a pair's per-layer values."""
    groups: dict[str, list[float]] = {}
    for layer, vals in values.items():
        groups.setdefault(layer_group(layer), []).append(vals[measure])
    return {g: _nanmean(v) for g, v in groups.items()}
