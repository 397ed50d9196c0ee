"""train.gradient_checkpointing: the same loss and gradients as without, on 2 ZeRO-3 ranks, for
LoRA-TSD after both switches (dropout on) and for full fine-tuning (tests/dist/checkpointing.py);
and the config's path to it (refused where transformers cannot, on the model alone)."""

import sys
from pathlib import Path

import pytest
import torch
from proc_group import child_env, make_tiny_model, run_group
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def passes(tmp_path_factory):
    wd = tmp_path_factory.mktemp("checkpointing")
    model = make_tiny_model(wd / "model")
    out = wd / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/checkpointing.py"), str(model), str(out)]
    proc = run_group(cmd, cwd=ROOT, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tsd", "full"])
@pytest.mark.parametrize("rank", [0, 1])
def test_checkpointed_pass_gives_the_same_loss_and_gradients(passes, case, rank):
    plain = load_file(str(passes / f"{case}-plain-rank{rank}.safetensors"))
    ckpt = load_file(str(passes / f"{case}-checkpointed-rank{rank}.safetensors"))
    assert plain.keys() == ckpt.keys() and len(plain) > 1
    # The checkpointed pass really recomputed (a layer's forward ran again in the backward pass).
    assert (int(plain["forward_calls"]), int(ckpt["forward_calls"])) == (1, 2)
    assert torch.allclose(plain["loss"], ckpt["loss"], rtol=0, atol=1e-6), (plain["loss"], ckpt["loss"])
    names = [k for k in plain if k not in ("loss", "forward_calls")]
    if case == "tsd":  # the adapters, the dash scalars: every trainable tensor of the method
        assert any(k.endswith("lora_A") for k in names) and any(k.endswith("dash_scalars") for k in names)
    for k in names:
        scale = plain[k].abs().max().item()
        assert scale > 0, f"{k}: no gradient reached it"
        assert (plain[k] - ckpt[k]).abs().max().item() <= 1e-5 * scale, k


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_master_copy_of_a_size_the_world_does_not_divide(passes, rank):
    """set_master_copy under ZeRO-3 on 2 ranks, 3 elements (the last slice padded)."""
    masters = load_file(str(passes / f"masters-rank{rank}.safetensors"))
    assert masters and all(torch.equal(m, torch.linspace(0.5, 1.5, 3)) for m in masters.values())


def test_gradient_checkpointing_switches_on_transformers_non_reentrant_form():
    from conftest import make_base

    from pipeline.training.engine import enable_gradient_checkpointing

    model = make_base(0)
    enable_gradient_checkpointing(model)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_a_model_without_checkpointing_is_refused_by_name():
    from pipeline.training.engine import enable_gradient_checkpointing

    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="train.gradient_checkpointing: Plain does not support"):
        enable_gradient_checkpointing(Plain())
