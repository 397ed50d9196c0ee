"""Precision in one place (pipeline/precision.py) and the attention kernel (model.attn_implementation):
contradictions refused in one line, `auto` settled by the hardware, the kernel reaching transformers."""

from pathlib import Path

import pytest
import yaml
from proc_group import make_tiny_model, tiny_config

from pipeline.config import ConfigError, from_dict
from pipeline.precision import settle

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**sections):
    base = {"model": {"path": "m"}, "data": {"train": ["d.json"]}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return from_dict(base, "test")


@pytest.mark.parametrize("precision, dtype", [("fp32", "bfloat16"), ("bf16", "float16"), ("fp16", "float32"),
                                              ("bf16", "float32")])
def test_a_contradictory_pair_is_refused_in_one_line(precision, dtype):
    with pytest.raises(ConfigError) as e:
        _cfg(train={"precision": precision}, model={"dtype": dtype})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"train.precision {precision} contradicts model.dtype {dtype}" in msg and "set one of them to auto" in msg


@pytest.mark.parametrize("on_gpu, has_bf16, precision, dtype", [
    (False, False, "fp32", "float32"), (True, True, "bf16", "bfloat16"), (True, False, "fp32", "float32")])
def test_auto_is_bf16_on_a_gpu_that_has_it_else_fp32(on_gpu, has_bf16, precision, dtype):
    cfg, why = settle(_cfg(), {}, "ds.json", on_gpu, has_bf16)
    assert (cfg.train.precision, cfg.model.dtype) == (precision, dtype)
    assert why.startswith(f"precision {precision}, weights {dtype} (auto")


@pytest.mark.parametrize("given, want", [
    ({"train": {"precision": "fp16"}}, ("fp16", "float16")),  # the weights follow the precision
    ({"model": {"dtype": "bfloat16"}}, ("bf16", "bfloat16")),  # and the precision the weights
])
def test_one_explicit_setting_decides_the_other(given, want):
    cfg, why = settle(_cfg(**given), {}, "ds.json", on_gpu=False, gpu_has_bf16=False)
    assert (cfg.train.precision, cfg.model.dtype) == want and "set by" in why


def test_the_deepspeed_json_counts_as_a_choice_and_must_agree():
    cfg, why = settle(_cfg(), {"bf16": {"enabled": True}}, "z.json", on_gpu=False, gpu_has_bf16=False)
    assert (cfg.train.precision, cfg.model.dtype) == ("bf16", "bfloat16") and "z.json (bf16)" in why
    with pytest.raises(ValueError, match=r"precision: train.precision fp32 vs z.json \(bf16\) disagree"):
        settle(_cfg(train={"precision": "fp32"}), {"bf16": {"enabled": True}}, "z.json", False, False)
    with pytest.raises(ValueError, match="z.json enables both bf16 and fp16"):
        settle(_cfg(), {"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "z.json", False, False)
    # "auto" in the JSON (the shipped ones) leaves it to the run config
    cfg, _ = settle(_cfg(), {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, "z.json", False, False)
    assert cfg.train.precision == "fp32"


def test_the_deepspeed_config_gets_the_settled_precision():
    from pipeline.training.engine import deepspeed_config

    cfg, _ = settle(_cfg(deepspeed={"config": str(ROOT / "configs/deepspeed/default.json")}), {}, "x", True, True)
    ds = deepspeed_config(cfg, "zero3")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


# ----------------------------------------------------------------------------- the attention kernel
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("attn") / "model")


@pytest.mark.parametrize("kernel, want", [("eager", "eager"), ("sdpa", "sdpa"), ("auto", "sdpa")])
def test_the_attention_kernel_reaches_transformers(model_dir, tmp_path, kernel, want):
    """auto: transformers' own choice, sdpa for LLaMA."""
    from pipeline.training.engine import load_model

    cfg = from_dict(tiny_config(model_dir, tmp_path, "attn"), "test")
    cfg = from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "attn_implementation": kernel,
                                                 "dtype": "float32"}}, "test")
    model, _, _ = load_model(cfg, {"zero_optimization": {"stage": 0}})
    assert model.config._attn_implementation == want


def test_flash_attention_without_its_package_is_refused_before_anything_starts(model_dir, tmp_path, capsys):
    from pipeline.launch import worker

    cfg = tiny_config(model_dir, tmp_path, "flash")
    cfg["model"]["attn_implementation"] = "flash_attention_2"
    cfg["tracking"]["offline"] = True
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert worker.main([str(path)]) == 2  # the preflight, before any process group or DeepSpeed
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: model.attn_implementation: flash_attention_2 needs the flash-attn package")
    assert not (tmp_path / "flash").exists()
