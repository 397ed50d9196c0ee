"""Change rates, selection and decomposition against a naive reference (METHOD.md).

Naive reference: a full `torch.linalg.svd` in float64 of the weight, dW = scaling * B @ A formed
explicitly, delta = |diag(U^T dW V)| / sigma. Singular vectors are compared only through the
sign-invariant outer products u_i v_i^T (or through indices and |values|).
"""

from __future__ import annotations

import pytest
import torch

import tsd
from conftest import naive_rates, outer_products

SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# float32 SVD: singular vectors are accurate to ~eps * sigma_max / gap.
TOL = {"float32": dict(rtol=2e-4, atol=2e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def random_problem(shape, seed, r=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(r, n, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    B = (torch.randn(m, r, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    return W, A, B


def relative_gap_ok(sorted_rates: torch.Tensor, s: int, margin: float = 1e-3) -> bool:
    """The s-th and (s+1)-th largest rates differ enough for the top-s set to be well defined."""
    if s >= sorted_rates.numel():
        return True
    a, b = float(sorted_rates[s - 1]), float(sorted_rates[s])
    return (a - b) > margin * max(a, 1e-30)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_change_rates_match_naive_definition(shape, dtype, seed):
    W, A, B = random_problem(SHAPES[shape], seed)
    scaling = 2.5
    dec = tsd.decompose(W, dtype)
    assert dec.S.dtype == DTYPES[dtype]
    rates = tsd.change_rates(dec, A, B, scaling)
    ref, _, S_ref, _ = naive_rates(W, A, B, scaling)
    k = min(SHAPES[shape])
    assert rates.shape == (k,)
    # the spectrum itself, then the rates
    torch.testing.assert_close(dec.S.double(), S_ref, **TOL[dtype])
    torch.testing.assert_close(rates.double(), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * float(ref.max()))
    # rates are not trivially equal to something else: they do vary across the spectrum
    assert float(ref.max()) > 5 * float(ref.min())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_selection_and_projectors_match_naive(shape, dtype):
    W, A, B = random_problem(SHAPES[shape], seed=3)
    scaling = 0.75
    ref, U_ref, S_ref, V_ref = naive_rates(W, A, B, scaling)
    order = torch.argsort(ref, descending=True)
    s = next(s for s in (6, 5, 7, 4, 8) if relative_gap_ok(ref[order], s))
    idx_ref = order[:s]

    got = tsd.layer_directions("some.layer", W, A, B, scaling, s, dtype)
    assert got.name == "some.layer"
    # same directions, in descending change rate
    assert got.indices.tolist() == idx_ref.tolist()
    rates_sel = got.change_rates[got.indices]
    assert torch.all(rates_sel[:-1] >= rates_sel[1:])
    torch.testing.assert_close(got.sigma.double(), S_ref[idx_ref], **TOL[dtype])
    # the projectors u_i v_i^T of the selected directions (sign-invariant)
    P = outer_products(got.U.double(), got.V.double())
    P_ref = outer_products(U_ref[:, idx_ref], V_ref[:, idx_ref])
    torch.testing.assert_close(P, P_ref, rtol=0, atol=2e-4 if dtype == "float32" else 1e-10)
    assert got.U.shape == (W.shape[0], s) and got.V.shape == (W.shape[1], s)
    # and each selected (u_i, v_i) is a singular pair of W: W v_i = sigma_i u_i
    Wd = W.double()
    torch.testing.assert_close(Wd @ got.V.double(), got.U.double() * got.sigma.double(), rtol=0, atol=1e-4)


def test_select_directions_top_s_and_ties():
    rates = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0, 0.9])
    assert tsd.select_directions(rates, 3).tolist() == [5, 1, 3]  # tie 1/3: lower index first
    assert tsd.select_directions(rates, 6).tolist() == [5, 1, 3, 2, 0, 4]


def test_change_rates_do_not_depend_on_svd_sign():
    """Flipping the sign of (u_i, v_i) pairs must leave the rates unchanged."""
    W, A, B = random_problem((20, 12), seed=5)
    dec = tsd.decompose(W, "float64")
    flip = torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)
    flipped = tsd.Decomposition(U=dec.U * flip, S=dec.S, V=dec.V * flip, weight_dtype=dec.weight_dtype)
    torch.testing.assert_close(tsd.change_rates(flipped, A, B, 1.3), tsd.change_rates(dec, A, B, 1.3))


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zero_singular_values_finite_and_never_selected(shape, dtype):
    """W with exactly-zero columns and rows has exactly-zero singular values; the LoRA update is
    put mostly into those null directions, so a naive |u^T dW v| / sigma would pick them."""
    m, n = SHAPES[shape]
    g = torch.Generator().manual_seed(7)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    W[:, -3:] = 0.0  # 3 zero columns
    W[-2:, :] = 0.0  # 2 zero rows
    rank = min(m - 2, n - 3)
    k = min(m, n)
    r = 4
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * 0.01
    A[:, -3:] = torch.randn(r, 3, generator=g, dtype=torch.float64) * 5.0  # mass on null inputs
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.01
    B[-2:, :] = torch.randn(2, r, generator=g, dtype=torch.float64) * 5.0  # mass on null outputs
    W, A, B = W.to(DTYPES[dtype]), A.to(DTYPES[dtype]), B.to(DTYPES[dtype])

    dec = tsd.decompose(W, dtype)
    null = dec.S <= 1e-6 * dec.S.max()
    assert int(null.sum()) == k - rank
    # precondition: the naive (unguarded) formula would rank a null direction first
    naive = (dec.U.mT @ (B @ A) @ dec.V).diagonal().abs() / dec.S
    assert int(torch.argmax(torch.nan_to_num(naive, posinf=float("inf"))).item()) in torch.nonzero(null).flatten().tolist()

    rates = tsd.change_rates(dec, A, B, 2.0)
    assert torch.isfinite(rates).all()
    assert torch.all(rates[null] == 0)
    for s in (1, 4, rank):
        got = tsd.layer_directions("z", W, A, B, 2.0, s, dtype)
        assert not null[got.indices].any(), f"s={s}: selected a null direction {got.indices.tolist()}"
        assert torch.all(got.sigma > 1e-3)
        assert torch.isfinite(got.change_rates).all()
    # non-null rates still follow the definition
    ref = (dec.U.mT.double() @ (2.0 * B.double() @ A.double()) @ dec.V.double()).diagonal().abs() / dec.S.double()
    keep = ~null
    torch.testing.assert_close(rates.double()[keep], ref[keep], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_numerically_zero_singular_values_never_selected(shape, dtype):
    """A low-rank product W = P Q: the SVD returns tiny (~eps * sigma_max) but not exactly zero
    singular values for the null directions; they must be treated as zero too."""
    m, n = SHAPES[shape]
    rank, r = 5, 4
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(8)
    W = (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)).to(dt)
    A = torch.randn(r, n, generator=g, dtype=torch.float64).to(dt)
    B = torch.randn(m, r, generator=g, dtype=torch.float64).to(dt)
    dec = tsd.decompose(W, dtype)
    assert float(dec.S[rank:].max()) < 1e-4 * float(dec.S[0])  # numerically zero ...
    assert float(dec.S[rank:].min()) > 0 or dtype == "float64"  # ... and (in float32) not exactly
    # precondition: unguarded, a null direction would win by orders of magnitude
    naive = (dec.U.mT @ (B @ A) @ dec.V).diagonal().abs() / dec.S
    assert int(torch.argmax(torch.nan_to_num(naive, nan=0.0)).item()) >= rank
    rates = tsd.change_rates(dec, A, B, 1.0)
    assert torch.isfinite(rates).all() and torch.all(rates[rank:] == 0)
    got = tsd.layer_directions("lowrank", W, A, B, 1.0, rank, dtype)
    assert sorted(got.indices.tolist()) == list(range(rank))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("svd", list(DTYPES))
def test_null_directions_judged_by_the_weights_own_precision(weight_dtype, svd):
    """A rank-5 weight stored in float32 or bf16: its null directions hold the storage's
    rounding noise (~0.2 eps_w sigma_max). A float64 SVD resolves that noise as non-zero
    singular values; they must still be rejected (the weight cannot tell them from zero),
    so both SVD precisions select the 5 real directions. Before the guard knew the weight's
    precision, float64 on a float32 weight picked 17..22 here."""
    m, n, rank = 40, 24, 5
    g = torch.Generator().manual_seed(8)
    W = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)).to(weight_dtype)
    A, B = torch.randn(4, n, generator=g), torch.randn(m, 4, generator=g)
    dec = tsd.decompose(W, svd)
    assert dec.weight_dtype == weight_dtype
    assert float(dec.S[rank:].max()) < 0.5 * torch.finfo(weight_dtype).eps * float(dec.S[0])  # noise level
    assert float(dec.S[rank:].min()) > 0  # ... resolved, not exactly zero
    rates = tsd.change_rates(dec, A, B, 1.0)
    assert torch.all(rates[rank:] == 0)
    got = tsd.layer_directions("lowrank", W, A, B, 1.0, rank, svd)
    assert sorted(got.indices.tolist()) == list(range(rank))


def test_all_zero_weight_gives_finite_zero_rates():
    W = torch.zeros(6, 4)
    A, B = torch.randn(2, 4), torch.randn(6, 2)
    rates = tsd.change_rates(tsd.decompose(W), A, B, 1.0)
    assert torch.isfinite(rates).all() and torch.all(rates == 0)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decompose_reconstructs(shape, dtype):
    m, n = SHAPES[shape]
    g = torch.Generator().manual_seed(11)
    W = torch.randn(m, n, generator=g)
    dec = tsd.decompose(W, dtype)
    k = min(m, n)
    assert dec.U.shape == (m, k) and dec.S.shape == (k,) and dec.V.shape == (n, k)
    assert dec.U.dtype == dec.S.dtype == dec.V.dtype == DTYPES[dtype]
    assert torch.all(dec.S[:-1] >= dec.S[1:]) and torch.all(dec.S >= 0)
    tol = 1e-5 if dtype == "float32" else 1e-12
    torch.testing.assert_close(dec.U @ torch.diag(dec.S) @ dec.V.mT, W.to(DTYPES[dtype]), rtol=0, atol=tol * 10)
    eye = torch.eye(k, dtype=DTYPES[dtype])
    torch.testing.assert_close(dec.U.mT @ dec.U, eye, rtol=0, atol=tol * 10)
    torch.testing.assert_close(dec.V.mT @ dec.V, eye, rtol=0, atol=tol * 10)
    # same singular values as the direct SVD
    torch.testing.assert_close(dec.S.double(), torch.linalg.svdvals(W.double()), rtol=0, atol=tol * 10)


def test_decompose_does_not_modify_or_keep_grad():
    W = torch.randn(5, 9, requires_grad=True)
    before = W.detach().clone()
    dec = tsd.decompose(W)
    assert not dec.U.requires_grad and not dec.V.requires_grad
    assert torch.equal(W.detach(), before)
