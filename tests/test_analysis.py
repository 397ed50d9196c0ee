"""Direction analysis (tsd/analysis.py, pipeline/reports/analyze.py) against naive computations."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import tsd
from conftest import TARGETS, clone, make_base, naive_rates, outer_products, randomize_lora
from tsd.analysis import (
    AnalysisError,
    LayerSelection,
    Selections,
    cross_layer_overlaps,
    direction_overlap,
    index_overlap,
    layer_overlaps,
    pairwise_overlaps,
    read_selections,
    selections_from_state,
    subspace_overlap,
)


def _orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return q


def _flip(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (x.shape[1],), generator=g).to(x.dtype) * 2 - 1
    assert (signs < 0).any()
    return x * signs


def _selection(basis_u, basis_v, idx, name="l") -> LayerSelection:
    idx = torch.tensor(idx)
    return LayerSelection(name, idx, basis_u[:, idx], basis_v[:, idx])


def naive_subspace(A: torch.Tensor, B: torch.Tensor) -> float:
    s = min(A.shape[1], B.shape[1])
    return sum(float(A[:, i] @ B[:, j]) ** 2 for i in range(A.shape[1]) for j in range(B.shape[1])) / s


def naive_direction(Ua, Va, Ub, Vb) -> float:
    """Flatten the rank-one directions u_i v_i^T and project one set onto the other."""
    Ma = torch.einsum("mi,ni->imn", Ua, Va).reshape(Ua.shape[1], -1)
    Mb = torch.einsum("mi,ni->imn", Ub, Vb).reshape(Ub.shape[1], -1)
    return float((Ma @ Mb.T).pow(2).sum()) / min(Ua.shape[1], Ub.shape[1])


def test_identical_disjoint_and_partial():
    U, V = _orthonormal(24, 16, 0), _orthonormal(20, 16, 1)
    a = _selection(U, V, [0, 3, 5, 7])
    assert layer_overlaps(a, a) == pytest.approx({"index": 1.0, "U": 1.0, "V": 1.0, "UV": 1.0, "chance": 4 / 20},
                                              abs=1e-12)  # chance: s / min(m, n) = 4 / 20
    disjoint = _selection(U, V, [1, 2, 4, 6])
    assert layer_overlaps(a, disjoint) == pytest.approx({"index": 0.0, "U": 0.0, "V": 0.0, "UV": 0.0, "chance": 0.2}, abs=1e-12)
    half = _selection(U, V, [5, 7, 8, 9])
    assert layer_overlaps(a, half) == pytest.approx({"index": 0.5, "U": 0.5, "V": 0.5, "UV": 0.5, "chance": 0.2}, abs=1e-12)
    # the same left vectors paired with other right vectors: U agrees, the directions do not
    mixed = LayerSelection("l", torch.tensor([0, 3, 5, 7]), U[:, [0, 3, 5, 7]], V[:, [1, 2, 4, 6]])
    assert layer_overlaps(a, mixed)["U"] == pytest.approx(1.0)
    assert layer_overlaps(a, mixed)["UV"] == pytest.approx(0.0, abs=1e-12)
    # different sizes: normalised by the smaller set
    assert index_overlap(torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4])) == 1.0
    assert subspace_overlap(U[:, :2], U[:, :4]) == pytest.approx(1.0)


def test_sign_invariant_and_equal_to_naive():
    Ua, Va = _orthonormal(24, 5, 2), _orthonormal(20, 5, 3)
    # a partly overlapping, rotated second set: no exact zeros or ones
    Ub = torch.linalg.qr(Ua @ _orthonormal(5, 5, 4) + 0.7 * _orthonormal(24, 5, 5))[0]
    Vb = torch.linalg.qr(Va @ _orthonormal(5, 5, 6) + 0.7 * _orthonormal(20, 5, 7))[0]
    u, v, uv = subspace_overlap(Ua, Ub), subspace_overlap(Va, Vb), direction_overlap(Ua, Va, Ub, Vb)
    assert 0.05 < u < 0.95 and 0.05 < v < 0.95 and 0.0 < uv < 0.95
    assert u == pytest.approx(naive_subspace(Ua, Ub), abs=1e-12)
    assert v == pytest.approx(naive_subspace(Va, Vb), abs=1e-12)
    assert uv == pytest.approx(naive_direction(Ua, Va, Ub, Vb), abs=1e-12)
    # flip signs of columns independently in U and in V (an SVD may return any of these)
    for seed in range(3):
        Uf, Vf = _flip(Ub, seed), _flip(Vb, seed + 10)
        assert subspace_overlap(Ua, Uf) == pytest.approx(u, abs=1e-12)
        assert subspace_overlap(Vf, Va) == pytest.approx(v, abs=1e-12)
        assert direction_overlap(_flip(Ua, seed + 20), Va, Uf, Vf) == pytest.approx(uv, abs=1e-12)
    # shape mismatch is undefined, not an error
    assert math.isnan(subspace_overlap(Ua, Va))


def test_pairwise_matrix_averages_common_layers():
    U, V = _orthonormal(12, 12, 0), _orthonormal(12, 12, 1)
    a = Selections("a", "dash", {"l1": _selection(U, V, [0, 1], "l1"), "l2": _selection(U, V, [2, 3], "l2")})
    b = Selections("b", "dash", {"l1": _selection(U, V, [0, 5], "l1"), "l2": _selection(U, V, [6, 7], "l2"),
                                 "l3": _selection(U, V, [0, 1], "l3")})  # fmt: skip
    rep = pairwise_overlaps([a, b])
    assert rep.common_layers[(0, 1)] == 2
    assert rep.per_layer[(0, 1)]["l1"]["index"] == 0.5 and rep.per_layer[(0, 1)]["l2"]["index"] == 0.0
    assert rep.matrices["index"].tolist() == [[1.0, 0.25], [0.25, 1.0]]
    assert rep.matrices["UV"][0, 1] == pytest.approx(0.25)
    names, mat = cross_layer_overlaps(b, "index")
    assert names == ["l1", "l2", "l3"]
    assert mat.tolist() == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]


# ----------------------------------------------------------------------------- real adapters
def _adapter(tmp_path, name, method="dash", r=4, s=3, lora_seed=1, base_seed=0):
    model = clone(make_base(base_seed))
    cfg = tsd.TSDConfig(method=method, r=r, alpha=2 * r, dropout=0.0, targets=TARGETS, switch_step=2, num_directions=s)
    torch.manual_seed(0)
    tsd.inject(model, cfg)
    randomize_lora(model, seed=lora_seed)
    if cfg.uses_init:
        tsd.run_switch(model, tsd.INIT, 2)
    if cfg.uses_dash:
        tsd.run_switch(model, tsd.DASH, 4 if cfg.uses_init else 2)
    return tsd.save_adapter(model, tmp_path / name / "adapter", cfg), model


def test_sidecar_selections_are_the_layers_buffers(tmp_path):
    path, model = _adapter(tmp_path, "run-a")
    sel = read_selections(path)
    assert sel.label == "run-a" and sel.info["method"] == "dash" and sel.info["r"] == 4 and sel.info["step"] == 2
    layers = dict(tsd.tsd_layers(model))
    assert list(sel.layers) == sorted(layers)
    for name, ls in sel.layers.items():
        assert torch.equal(ls.indices, layers[name].dash_indices)
        assert torch.equal(ls.U, layers[name].dash_U.double())
    assert pairwise_overlaps([sel, sel]).matrices["UV"].sub(1).abs().max() < 1e-5


def test_init_selection_recovers_the_singular_vectors(tmp_path):
    """LoRA-Init keeps B0/A0, not U_I/V_I: normalising their columns/rows must give the top-r
    singular vectors by change rate (compared as sign-free outer products)."""
    base = make_base(0)
    path, model = _adapter(tmp_path, "init-run", method="init", r=3)
    sel = read_selections(path, kind="init")
    ref = clone(base)
    cfg = tsd.TSDConfig(method="lora", r=3, alpha=6, dropout=0.0, targets=TARGETS)
    torch.manual_seed(0)
    tsd.inject(ref, cfg)
    randomize_lora(ref, seed=1)
    for name, layer in tsd.tsd_layers(ref):
        rates, U, S, V = naive_rates(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
        top = torch.argsort(rates, descending=True)[:3]
        ls = sel.layers[name]
        assert sorted(ls.indices.tolist()) == sorted(top.tolist())
        order = [int((ls.indices == i).nonzero()) for i in top]
        got = outer_products(ls.U[:, order], ls.V[:, order])
        assert torch.allclose(got, outer_products(U[:, top], V[:, top]), atol=1e-5)
    with pytest.raises(AnalysisError, match="kind='init'"):
        read_selections(path, kind="dash")


def test_unswitched_adapter_is_refused(tmp_path):
    model = clone(make_base(0))
    cfg = tsd.TSDConfig(method="dash", r=4, alpha=8, dropout=0.0, targets=TARGETS, num_directions=3)
    tsd.inject(model, cfg)
    path = tsd.save_adapter(model, tmp_path / "early", cfg)
    with pytest.raises(AnalysisError, match="no layer holds switched dash"):
        read_selections(path)
    assert selections_from_state({}, "dash").layers == {}


def test_cli_writes_tables_and_plots(tmp_path, capsys):
    from pipeline.launch import cli

    a, _ = _adapter(tmp_path, "r4", r=4)
    b, _ = _adapter(tmp_path, "r8", r=8)
    c, _ = _adapter(tmp_path, "seed2", r=4, lora_seed=7)
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(a), str(b), str(c), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## index overlap" in printed and "**r8**" in printed
    with (out / "overlap_index.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["", "r4", "r8", "seed2"]
    mat = [[float(x) for x in r[1:]] for r in rows[1:]]
    assert all(mat[i][i] == 1.0 for i in range(3)) and all(mat[i][j] == mat[j][i] for i in range(3) for j in range(3))
    # matches the per-layer values averaged by hand
    with (out / "per_layer.csv").open() as f:
        per = list(csv.DictReader(f))
    ab = [float(r["UV"]) for r in per if (r["adapter_a"], r["adapter_b"]) == ("r4", "r8")]
    assert len(ab) == 2 * len(TARGETS)  # 2 decoder layers x 5 targets
    with (out / "overlap_UV.csv").open() as f:
        uv = list(csv.reader(f))
    assert float(uv[1][2]) == pytest.approx(sum(ab) / len(ab))
    for png in ["overlap_heatmaps.png", "cross_layer_r4.png", "cross_layer_r8.png", "cross_layer_seed2.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "overlap.md").read_text()
    assert "| r4 vs r8 |" in md and "| r4 vs r8 | chance |" in md
    assert "## Chance: the same measures for uniformly random choices" in md
    assert cli.main(["analyze", str(a), "--labels", "x,y", "--out", str(out)]) == 2


def test_caveats_for_incomparable_selections():
    from tsd.analysis import caveats

    def sel(method, base="/m"):
        s = Selections(method, "dash", {}, info={"method": method})
        s.base_model = base
        return s

    assert caveats([sel("dash"), sel("lora")]) == []
    assert "residual" in caveats([sel("dash"), sel("tsd")])[0]
    assert "different base models" in caveats([sel("dash"), sel("dash", "/other")])[0]


def test_chance_baselines_match_a_simulation():
    """The overlap expected by chance, against 4000 random draws (standard error ~0.3% here)."""
    from tsd.analysis import chance_index_overlap, chance_subspace_overlap, index_overlap, subspace_overlap

    g = torch.Generator().manual_seed(0)
    for s_a, s_b, k in [(8, 8, 64), (4, 16, 576), (8, 8, 8)]:
        sims = [index_overlap(torch.randperm(k, generator=g)[:s_a], torch.randperm(k, generator=g)[:s_b])
                for _ in range(4000)]
        assert sum(sims) / len(sims) == pytest.approx(chance_index_overlap(s_a, s_b, k), rel=0.03, abs=2e-3)
    for a, b, m in [(8, 8, 64), (4, 16, 96)]:
        sims = []
        for _ in range(2000):
            A = torch.linalg.qr(torch.randn(m, a, generator=g, dtype=torch.float64))[0]
            B = torch.linalg.qr(torch.randn(m, b, generator=g, dtype=torch.float64))[0]
            sims.append(subspace_overlap(A, B))
        assert sum(sims) / len(sims) == pytest.approx(chance_subspace_overlap(a, b, m), rel=0.03)
