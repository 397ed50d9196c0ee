"""Bad arguments raise errors that name the setting / layer and the offending value, and a
refused injection leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tsd
from conftest import TARGETS, make_base

LINEAR_NAMES = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def assert_untouched(model):
    assert tsd.tsd_layers(model) == []
    assert all(p.requires_grad for p in model.parameters())


def test_num_directions_larger_than_a_layer():
    model = make_base(0)
    # q_proj is 32x32 (fits s=20); k_proj is 16x32, min(out, in) = 16
    config = tsd.TSDConfig(method="dash", r=4, targets=["q_proj", "k_proj"], num_directions=20)
    with pytest.raises(tsd.TargetError) as e:
        tsd.inject(model, config)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj" in msg and "20" in msg and "16" in msg
    assert "num_directions" in msg
    assert_untouched(model)


def test_num_directions_is_ignored_without_dash():
    """lora / init allocate no dash term, so a large s is not an error there."""
    model = make_base(0)
    tsd.inject(model, tsd.TSDConfig(method="init", r=4, targets=["k_proj"], num_directions=20))
    assert all(not layer.dash_size for _, layer in tsd.tsd_layers(model))


def test_rank_larger_than_a_layer():
    model = make_base(0)
    with pytest.raises(tsd.TargetError) as e:
        tsd.inject(model, tsd.TSDConfig(method="lora", r=17, targets=["q_proj", "v_proj"]))
    msg = str(e.value)
    assert "model.layers.0.self_attn.v_proj" in msg and "r=17" in msg and "16" in msg
    assert_untouched(model)


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8"])
def test_bad_rank(r):
    with pytest.raises(tsd.TSDConfigError) as e:
        tsd.TSDConfig(r=r)
    assert "r:" in str(e.value) and repr(r) in str(e.value)


@pytest.mark.parametrize("method", ["loradash", "", "LoRA", "dora"])
def test_unknown_method(method):
    with pytest.raises(tsd.TSDConfigError) as e:
        tsd.TSDConfig(method=method)
    msg = str(e.value)
    assert "method" in msg and repr(method) in msg
    assert all(m in msg for m in tsd.METHODS)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(alpha=0), "alpha"),
        (dict(alpha=-2.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(switch_step=-1), "switch_step"),
        (dict(switch_step=2.0), "switch_step"),
        (dict(method="init", switch_step=0), "switch_step"),  # B = 0 at step 0: nothing to rate
        (dict(method="dash", num_directions=0), "num_directions"),
        (dict(method="tsd", num_directions=-3), "num_directions"),
        (dict(targets=[]), "targets"),
        (dict(targets=[""]), "targets"),
        (dict(svd_dtype="float16"), "svd_dtype"),
    ],
)
def test_bad_settings_name_setting_and_value(kwargs, setting):
    with pytest.raises(tsd.TSDConfigError) as e:
        tsd.TSDConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith(setting + ":")
    value = next(iter(kwargs.values())) if setting != "num_directions" else kwargs["num_directions"]
    assert repr(value) in msg


def test_plain_lora_accepts_any_switch_step():
    assert tsd.TSDConfig(method="lora", switch_step=0).switch_step == 0


def test_config_errors_are_value_errors():
    assert issubclass(tsd.TSDConfigError, ValueError)
    assert issubclass(tsd.TargetError, ValueError)
    assert issubclass(tsd.AdapterError, ValueError)


def test_lora_method_needs_no_directions():
    c = tsd.TSDConfig(method="lora", num_directions=0)
    assert c.dash_size == 0


def test_no_target_matched_lists_linear_layers():
    model = make_base(0)
    with pytest.raises(tsd.TargetError) as e:
        tsd.inject(model, tsd.TSDConfig(targets=["query", "value"]))
    msg = str(e.value)
    assert "query" in msg and "value" in msg and "LlamaForCausalLM" in msg
    for name in LINEAR_NAMES:
        assert repr(name) in msg, name
    assert_untouched(model)


def test_partial_names_do_not_match():
    """PEFT's rule: a full dotted component, not a substring ("proj" matches nothing)."""
    model = make_base(0)
    with pytest.raises(tsd.TargetError):
        tsd.inject(model, tsd.TSDConfig(targets=["proj"]))
    assert_untouched(model)


@pytest.mark.parametrize("target, kind, name", [("mlp", "LlamaMLP", "model.layers.0.mlp"), ("self_attn", "LlamaAttention", "model.layers.0.self_attn"), ("embed_tokens", "Embedding", "model.embed_tokens")])
def test_target_matching_a_non_linear_module(target, kind, name):
    model = make_base(0)
    with pytest.raises(tsd.TargetError) as e:
        tsd.inject(model, tsd.TSDConfig(targets=["q_proj", target]))
    msg = str(e.value)
    assert repr(name) in msg and kind in msg and "nn.Linear" in msg
    assert_untouched(model)


def test_inject_twice():
    model = make_base(0)
    config = tsd.TSDConfig(targets=TARGETS, num_directions=4)
    tsd.inject(model, config)
    with pytest.raises(tsd.TargetError, match="inject once"):
        tsd.inject(model, config)


def test_inject_report_counts():
    model = make_base(0)
    total_before = sum(p.numel() for p in model.parameters())
    report = tsd.inject(model, tsd.TSDConfig(method="dash", r=2, targets=["q_proj", "up_proj"], num_directions=3))
    assert report.layers == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]
    # q_proj 32x32: A 2*32 + B 32*2 + d 3; up_proj 48x32: A 2*32 + B 48*2 + d 3
    per_block = (64 + 64 + 3) + (64 + 96 + 3)
    assert report.trainable_params == 2 * per_block
    assert report.total_params == total_before + 2 * per_block


def test_fill_dash_with_wrong_count_names_layer():
    layer = tsd.TSDLinear(nn.Linear(8, 6), r=2, alpha=4.0, dash_size=3)
    dirs = tsd.layer_directions("blk.0.q", layer.base_layer.weight, layer.lora_A, layer.lora_B, 2.0, 2)
    with pytest.raises(ValueError, match=r"blk\.0\.q.*2.*3"):
        layer.fill_dash(dirs, 0)
    assert not layer.dash_active


def test_fill_init_without_keep_init():
    layer = tsd.TSDLinear(nn.Linear(8, 6), r=2, alpha=4.0)
    dirs = tsd.layer_directions("x", layer.base_layer.weight, layer.lora_A, layer.lora_B, 2.0, 2)
    with pytest.raises(RuntimeError, match="keep_init"):
        layer.fill_init(dirs, 0)


def test_select_more_directions_than_exist_names_layer():
    with pytest.raises(ValueError, match=r"blk\.3\.v.*7.*5"):
        tsd.select_directions(torch.rand(5), 7, name="blk.3.v")


def test_tsdlinear_wraps_only_linear():
    with pytest.raises(TypeError, match="Conv1d"):
        tsd.TSDLinear(nn.Conv1d(3, 3, 1), r=1, alpha=1.0)


def test_decompose_needs_2d_and_known_dtype():
    with pytest.raises(ValueError, match=r"\(4, 3, 2\)"):
        tsd.decompose(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="float16"):
        tsd.decompose(torch.zeros(4, 3), "float16")


def test_save_adapter_without_tsd_layers(tmp_path):
    with pytest.raises(tsd.AdapterError):
        tsd.save_adapter(make_base(0), tmp_path / "a", tsd.TSDConfig())
    assert not (tmp_path / "a").exists()
