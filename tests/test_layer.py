"""TSDLinear against the dense formula of METHOD.md:

    y = x W^T + b + scaling * x A^T B^T + c * x (U_s diag(d) V_s^T)^T,   c = scaling if dash_scaled else 1

computed independently in float64 from the layer's tensors; merge/unmerge; base weights in
fp32, bf16 and fp16."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tsd
from tsd.layer import TSDLinear

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tolerance on outputs, relative to the largest |output|, per base dtype (the half-precision
# base matmul and the final cast dominate; measured errors are ~3x smaller)
REL_TOL = {"float32": 2e-6, "bfloat16": 6e-3, "float16": 1e-3}


def out_tol(dtype: str, ref: torch.Tensor) -> float:
    return REL_TOL[dtype] * float(ref.abs().max())

M, N, R, S = 20, 28, 4, 3


def make_layer(dtype=torch.float32, dash_scaled=False, use_rslora=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(N, M, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(M, N, generator=g) * 0.3)
        if bias:
            base.bias.copy_(torch.randn(M, generator=g) * 0.3)
    base = base.to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    layer = TSDLinear(base, r=R, alpha=12.0, use_rslora=use_rslora, dash_size=S, dash_scaled=dash_scaled)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(R, N, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(M, R, generator=g) * 0.1)
    return layer


def switch_and_set_scalars(layer, seed=1, step=5):
    dirs = tsd.layer_directions("L", layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling, S)
    layer.fill_dash(dirs, step)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.dash_scalars.copy_(torch.randn(S, generator=g) * 2.0 + 1.0)
    return dirs


@torch.no_grad()
def dense_reference(layer, x, dash=True):
    """float64, dense matrices, straight from the formula."""
    W = layer.base_layer.weight.double()
    b = layer.base_layer.bias.double() if layer.base_layer.bias is not None else 0.0
    A, B = layer.lora_A.double(), layer.lora_B.double()
    xd = x.double()
    y = xd @ W.T + b + layer.scaling * (xd @ A.T @ B.T)
    if dash:
        D = layer.dash_U.double() @ torch.diag(layer.dash_scalars.double()) @ layer.dash_V.double().T
        c = layer.scaling if layer.dash_scaled else 1.0
        y = y + c * (xd @ D.T)
    return y


def inputs(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, N, generator=g).to(dtype)


@pytest.mark.parametrize("dash_scaled", [False, True])
@pytest.mark.parametrize("dtype", list(BASE_DTYPES))
def test_dash_forward_equals_dense_formula(dtype, dash_scaled):
    dt = BASE_DTYPES[dtype]
    layer = make_layer(dt, dash_scaled=dash_scaled)
    x = inputs(dt)
    lora_only = dense_reference(layer, x, dash=False)
    switch_and_set_scalars(layer)
    assert layer.dash_active
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dt and y.shape == (3, 5, M)
    ref = dense_reference(layer, x)
    tol = out_tol(dtype, ref)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
    # the dash term is really there (much larger than the tolerance) ...
    assert float((ref - lora_only).abs().max()) > 20 * tol
    # ... and carries the right factor: the other convention is far off
    c_wrong = 1.0 if dash_scaled else layer.scaling
    D = layer.dash_U.double() @ torch.diag(layer.dash_scalars.detach().double()) @ layer.dash_V.double().T
    wrong = lora_only + c_wrong * (x.double() @ D.T)
    assert float((y.double() - wrong).abs().max()) > 10 * tol


def test_dash_forward_rslora_scaling():
    layer = make_layer(use_rslora=True, dash_scaled=True)
    assert layer.scaling == pytest.approx(12.0 / math.sqrt(R))
    switch_and_set_scalars(layer)
    x = inputs(torch.float32)
    ref = dense_reference(layer, x)
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=out_tol("float32", ref))


def test_fill_dash_keeps_output_and_installs_directions():
    layer = make_layer()
    x = inputs(torch.float32)
    with torch.no_grad():
        layer.dash_scalars.fill_(0.7)  # must not act before the switch, and be zeroed by it
    before = layer(x)
    ref = dense_reference(layer, x, dash=False)
    torch.testing.assert_close(before.double(), ref, rtol=0, atol=out_tol("float32", ref))
    dirs = tsd.layer_directions("L", layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling, S)
    layer.fill_dash(dirs, 12)
    assert layer.dash_active and int(layer.dash_step) == 12
    assert torch.all(layer.dash_scalars == 0)
    # Unchanged up to rounding: the dash phase evaluates LoRA fused with the (zero) dash term.
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.dash_indices, dirs.indices)
    assert torch.equal(layer.dash_U, dirs.U) and torch.equal(layer.dash_V, dirs.V)
    assert torch.equal(layer.dash_sigma, dirs.sigma) and torch.equal(layer.dash_change_rates, dirs.change_rates)


def test_dash_scalar_gradient_zero_before_switch_and_matches_dense_after():
    layer = make_layer()
    x = inputs(torch.float32)
    target = torch.randn(3, 5, M, generator=torch.Generator().manual_seed(9))

    layer(x).sub(target).pow(2).sum().backward()
    assert layer.dash_scalars.grad is not None and torch.all(layer.dash_scalars.grad == 0)
    layer.zero_grad(set_to_none=True)

    switch_and_set_scalars(layer)
    layer(x).sub(target).pow(2).sum().backward()
    # the same loss through the dense float64 formula, differentiated by autograd
    d = layer.dash_scalars.detach().double().requires_grad_(True)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    xd = x.double()
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    U, V = layer.dash_U.double(), layer.dash_V.double()
    y = xd @ W.T + b + layer.scaling * (xd @ A.T @ B.T) + xd @ (U @ torch.diag(d) @ V.T).T
    y.sub(target.double()).pow(2).sum().backward()
    assert float(d.grad.abs().max()) > 1e-3
    torch.testing.assert_close(layer.dash_scalars.grad.double(), d.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=1e-4, atol=1e-4)
    # frozen parts get nothing
    assert layer.base_layer.weight.grad is None
    assert not layer.dash_U.requires_grad and not layer.dash_V.requires_grad


@pytest.mark.parametrize("dash_scaled", [False, True])
@pytest.mark.parametrize("dtype", list(BASE_DTYPES))
def test_merge_equals_unmerged_and_unmerge_restores(dtype, dash_scaled):
    dt = BASE_DTYPES[dtype]
    layer = make_layer(dt, dash_scaled=dash_scaled)
    switch_and_set_scalars(layer)
    x = inputs(dt)
    W0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    ref = dense_reference(layer, x)

    layer.merge()
    assert layer.merged
    # the merged weight is W + the dense update
    c = layer.scaling if dash_scaled else 1.0
    dW = layer.scaling * layer.lora_B.double() @ layer.lora_A.double() + c * (
        layer.dash_U.double() @ torch.diag(layer.dash_scalars.double()) @ layer.dash_V.double().T
    )
    w_tol = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double() + dW, rtol=0, atol=w_tol)
    merged = layer(x)
    tol = out_tol(dtype, ref)
    torch.testing.assert_close(merged.double(), unmerged.double(), rtol=0, atol=2 * tol)
    torch.testing.assert_close(merged.double(), ref, rtol=0, atol=2 * tol)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double() + dW, rtol=0, atol=w_tol)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double(), rtol=0, atol=w_tol)
    if dt == torch.float32:
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=tol)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double(), rtol=0, atol=w_tol)


def test_merge_of_a_float64_base_keeps_float64_precision():
    """A float64 base is merged in float64 (a float32 merge would round W + dW to ~1e-7)."""
    layer = make_layer(torch.float64)
    switch_and_set_scalars(layer)
    W0 = layer.base_layer.weight.detach().clone()
    dW = layer.scaling * layer.lora_B.double() @ layer.lora_A.double() + (
        layer.dash_U.double() @ torch.diag(layer.dash_scalars.double()) @ layer.dash_V.double().T
    )
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, W0 + dW, rtol=0, atol=1e-13)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-13)


def test_merge_before_dash_switch_ignores_scalars():
    layer = make_layer()
    with torch.no_grad():
        layer.dash_scalars.fill_(3.0)  # inactive: must not be merged
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    expected = W0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=0, atol=1e-6)


def test_layer_without_dash_is_plain_lora():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(N, M)
    layer = TSDLinear(base, r=R, alpha=8.0)
    assert not hasattr(layer, "dash_scalars")
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(M, R, generator=g))
    x = inputs(torch.float32)
    ref = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * (x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=2e-5)
    with pytest.raises(RuntimeError):
        layer.fill_dash(None, 0)


def test_fresh_layer_is_identity_update():
    """A Kaiming-uniform, B zero: the wrapped layer starts as the base layer."""
    base = nn.Linear(N, M)
    layer = TSDLinear(base, r=R, alpha=8.0, dash_size=S)
    assert torch.all(layer.lora_B == 0) and float(layer.lora_A.detach().abs().max()) > 0
    bound = 1.0 / math.sqrt(N)  # kaiming_uniform(a=sqrt(5)) bound on fan_in N
    assert float(layer.lora_A.detach().abs().max()) <= bound + 1e-6
    x = inputs(torch.float32)
    assert torch.equal(layer(x), base(x))
