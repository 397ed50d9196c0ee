"""Export to a stock PEFT LoRA adapter and back (METHOD.md, "Exporting as a stock PEFT LoRA adapter").

The reference for every export is stock `PeftModel.from_pretrained` on an untouched copy of
the ORIGINAL base model: it must reproduce this project's logits."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import tsd
from conftest import TARGETS, batch, clone, lm_loss, logits, make_base, randomize_lora, set_dash_scalars

R, ALPHA, S = 4, 8.0, 3


def perturb_lora(model, seed, scale=0.05):
    """Stand-in for main-phase training after a switch: move A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def trained_model(method, base, use_rslora=False, dash_scaled=False):
    """A model of `method` in its final phase, with every adapter tensor nonzero."""
    model = clone(base)
    config = tsd.TSDConfig(
        method=method, r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, switch_step=5,
        num_directions=S, use_rslora=use_rslora, dash_scaled=dash_scaled,
    )
    torch.manual_seed(123)
    tsd.inject(model, config)
    randomize_lora(model, seed=1)  # the pre-launch LoRA run
    if config.uses_init:
        tsd.run_switch(model, tsd.INIT, 5)
        perturb_lora(model, seed=2)  # main phase
    if config.uses_dash:
        tsd.run_switch(model, tsd.DASH, 10 if config.uses_init else 5)
        set_dash_scalars(model, seed=3, scale=0.5)
        perturb_lora(model, seed=4)
    model.eval()
    return model, config


def peft_logits(base, path, ids):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(clone(base), str(path))
    pm.eval()
    return logits(pm, ids), pm


CASES = {
    "dash": dict(method="dash"),
    "dash-scaled": dict(method="dash", dash_scaled=True),
    "dash-rslora": dict(method="dash", use_rslora=True),
    "init": dict(method="init"),
    "tsd": dict(method="tsd"),
    "tsd-rslora-scaled": dict(method="tsd", use_rslora=True, dash_scaled=True),
    "lora": dict(method="lora"),
}
EXPECTED_RANK = {"dash": R + S, "init": 2 * R, "tsd": 2 * R + S, "lora": R}


@pytest.mark.parametrize("case", list(CASES))
def test_stock_peft_reproduces_logits(case, tmp_path):
    kw = CASES[case]
    base = make_base(0)
    model, config = trained_model(base=base, **kw)
    ids = batch(5, bsz=2, seqlen=12)
    ours = logits(model, ids)
    # the adapter is not trivial: far from the base model's output
    assert float((ours - logits(base, ids)).abs().max()) > 1e-2

    out = tsd.save_adapter(model, tmp_path / "adapter", config, "tiny-llama")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tsd_state.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    r_out = EXPECTED_RANK[kw["method"]]
    assert cfg["r"] == r_out
    # alpha' keeps the scaling: alpha'/r' (or alpha'/sqrt(r')) == alpha/r (or alpha/sqrt(r))
    peft_scaling = cfg["lora_alpha"] / (math.sqrt(r_out) if config.use_rslora else r_out)
    assert peft_scaling == pytest.approx(config.scaling)
    assert cfg["use_rslora"] == config.use_rslora
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    assert cfg["base_model_name_or_path"] == "tiny-llama"

    theirs, pm = peft_logits(base, out, ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    mod = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert mod.lora_A["default"].weight.shape == (r_out, 32)
    # the base weights under PEFT are the ORIGINAL ones (LoRA-Init's residual is not needed)
    torch.testing.assert_close(mod.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x| (normal range), in float64."""
    eps = torch.finfo(dtype).eps  # the ulp of 1.0
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))) * eps


@torch.no_grad()
@pytest.mark.parametrize("method", ["init", "tsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exported_update_matches_the_trained_model_within_half_an_ulp_of_the_residual(method, dtype):
    """LoRA-Init stores W_res = W - scaling B0 A0 in the base's own dtype; the export is the
    update against the original W. Effective weights in float64 from the stored tensors: the
    loaded adapter's W + scaling B' A' and the trained layer's W_res + scaling B A + c U_s d V_s^T
    differ by the rounding of W_res (at most half an ulp of it per entry, README: departures)
    plus, with a dash term, the float32 rounding of the exported U_s d c / scaling block (bounded
    entrywise by eps32/2 |U_s| |c d| |V_s|^T). With the residual computed in float32 the excess
    over half an ulp measured 0.56 bf16 ulp."""
    base = make_base(0).to(dtype)
    model, config = trained_model(method, base)
    state = tsd.export.collect_state(model)
    originals = dict(base.named_modules())
    worst = 0.0
    for name, layer in tsd.tsd_layers(model):
        A, B = tsd.export.peft_factors(layer, state, name + ".")
        exported = originals[name].weight.double() + layer.scaling * (B.double() @ A.double())
        w_res = layer.base_layer.weight.double()
        update = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
        allowance = torch.zeros_like(w_res)
        if layer.dash_active:
            c = layer.scaling if layer.dash_scaled else 1.0
            U, V, d = layer.dash_U.double(), layer.dash_V.double(), layer.dash_scalars.double() * c
            update = update + (U * d) @ V.mT
            allowance = 0.5 * torch.finfo(torch.float32).eps * (U.abs() * d.abs()) @ V.abs().mT
        assert float(update.abs().max()) > 1e-2  # a real update is there
        excess = (w_res + update - exported).abs() - allowance
        worst = max(worst, float((excess / _ulp(w_res, dtype)).max()))
    assert worst <= 0.5 + 1e-6, f"{worst:.4f} ulp of W_res"


def test_dash_export_before_switch_is_plain_lora(tmp_path):
    """Saved in the pre-launch phase, the dash block is zero and the adapter is the plain LoRA."""
    base = make_base(0)
    model = clone(base)
    config = tsd.TSDConfig(method="dash", r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, num_directions=S)
    tsd.inject(model, config)
    randomize_lora(model, seed=1)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            layer.dash_scalars.fill_(1.0)  # inactive: must not leak into the export
    ids = batch(6)
    out = tsd.save_adapter(model, tmp_path / "a", config)
    theirs, _ = peft_logits(base, out, ids)
    torch.testing.assert_close(theirs, logits(model, ids), rtol=0, atol=1e-5)


def state_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["dash", "init", "tsd"])
def test_load_adapter_restores_model_and_state(method, tmp_path):
    base = make_base(0)
    model, config = trained_model(method, base)
    ids = batch(7, bsz=2, seqlen=12)
    ours = logits(model, ids)
    out = tsd.save_adapter(model, tmp_path / "adapter", config, "tiny-llama")

    fresh = clone(base)
    torch.manual_seed(999)  # a different A init in inject: everything must come from the file
    loaded_config = tsd.load_adapter(fresh, out)
    assert loaded_config == config
    fresh.eval()
    torch.testing.assert_close(logits(fresh, ids), ours, rtol=0, atol=1e-6)

    # every TSD buffer and parameter, bitwise
    state_equal(tsd.collect_state(fresh), tsd.collect_state(model))
    for (name, a), (_, b) in zip(tsd.tsd_layers(model), tsd.tsd_layers(fresh)):
        assert b.dash_active == a.dash_active, name
        assert b.init_done == a.init_done, name
        # LoRA-Init's residual base W - scaling B0 A0 is rebuilt, bit for bit
        assert torch.equal(b.base_layer.weight, a.base_layer.weight), name
        if config.uses_dash:
            assert a.dash_active and int(b.dash_step) == int(a.dash_step) >= 0
            assert torch.equal(b.dash_indices, a.dash_indices)
            assert torch.equal(b.dash_U, a.dash_U) and torch.equal(b.dash_V, a.dash_V)
            assert torch.equal(b.dash_scalars, a.dash_scalars) and float(b.dash_scalars.detach().abs().max()) > 0
        if config.uses_init:
            assert int(b.init_step) == 5

    # no switch is due again on the restored model
    assert tsd.due_switches(fresh, config, 10_000) == []

    # it can continue training: gradients reach A, B (and d), and the loss goes down
    fresh.train()
    params = [p for p in fresh.parameters() if p.requires_grad]
    names = {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad}
    assert names == ({"lora_A", "lora_B", "dash_scalars"} if config.uses_dash else {"lora_A", "lora_B"})
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for step in range(5):
        opt.zero_grad()
        loss = lm_loss(fresh, ids)
        loss.backward()
        if step == 0:
            first = float(loss)
            for n, p in fresh.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and float(p.grad.abs().max()) > 0, n
        opt.step()
    assert float(lm_loss(fresh, ids)) < first - 1e-3


def _saved(tmp_path):
    base = make_base(0)
    model, config = trained_model("dash", base)
    return base, tsd.save_adapter(model, tmp_path / "adapter", config)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors", "tsd_state.safetensors"])
def test_incomplete_adapter_dir_raises(missing, tmp_path):
    base, out = _saved(tmp_path)
    (out / missing).unlink()
    target = clone(base)
    with pytest.raises(tsd.AdapterError, match=missing.replace(".", r"\.")):
        tsd.load_adapter(target, out)
    assert tsd.tsd_layers(target) == []  # refused before touching the model


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "tsd_state.safetensors"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_safetensors_raise_adapter_error(name, how, tmp_path):
    base, out = _saved(tmp_path)
    f = out / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a safetensors file")
    target = clone(base)
    with pytest.raises(tsd.AdapterError, match=name.replace(".", r"\.")):
        tsd.load_adapter(target, out)
    assert tsd.tsd_layers(target) == []


def test_sidecar_missing_a_tensor_raises(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, out = _saved(tmp_path)
    side = out / "tsd_state.safetensors"
    with safe_open(str(side), "pt") as fh:
        meta = fh.metadata()
    state = load_file(str(side))
    del state["model.layers.1.mlp.up_proj.dash_U"]
    save_file(state, str(side), metadata=meta)
    with pytest.raises(tsd.AdapterError, match=r"model\.layers\.1\.mlp\.up_proj.*dash_U"):
        tsd.load_adapter(clone(base), out)


def test_missing_adapter_dir_raises(tmp_path):
    with pytest.raises(tsd.AdapterError):
        tsd.load_adapter(make_base(0), tmp_path / "nope")


def test_adapter_for_another_model_raises(tmp_path):
    """Same layer names, different sizes: must be refused (it used to load silently, keeping
    the random A of inject wherever the shapes did not fit)."""
    _, out = _saved(tmp_path)
    other = make_base(0, hidden_size=48, intermediate_size=64)
    with pytest.raises(tsd.AdapterError, match="model.layers.0.self_attn.q_proj"):
        tsd.load_adapter(other, out)


def test_adapter_with_more_layers_than_model_raises(tmp_path):
    _, out = _saved(tmp_path)
    smaller = make_base(0, num_hidden_layers=1)
    with pytest.raises(tsd.AdapterError, match="model.layers.1"):
        tsd.load_adapter(smaller, out)


def test_adapter_with_fewer_layers_than_model_raises(tmp_path):
    _, out = _saved(tmp_path)
    bigger = make_base(0, num_hidden_layers=3)
    with pytest.raises(tsd.AdapterError, match="model.layers.2"):
        tsd.load_adapter(bigger, out)


def test_sidecar_with_wrong_format_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    base, out = _saved(tmp_path)
    side = out / "tsd_state.safetensors"
    save_file(load_file(str(side)), str(side), metadata={"format": "something-else"})
    with pytest.raises(tsd.AdapterError, match="format"):
        tsd.load_adapter(clone(base), out)


def test_empty_peft_weights_raise(tmp_path):
    """The ZeRO-3 failure mode: an adapter_model.safetensors with no tensors."""
    from safetensors.torch import save_file

    base, out = _saved(tmp_path)
    save_file({}, str(out / "adapter_model.safetensors"))
    with pytest.raises(tsd.AdapterError):
        tsd.load_adapter(clone(base), out)


def test_save_overwrites_atomically(tmp_path):
    base = make_base(0)
    model, config = trained_model("dash", base)
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    out = tsd.save_adapter(model, target, config)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind
