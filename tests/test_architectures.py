"""The architecture matrix (issue 24 item 5): tiny random-init Llama (untied; tied with sharded
safetensors and an index), Qwen2, Mistral, Gemma3 and Mixtral, each through 2-rank ZeRO-3 with
LoRA-TSD: partitioned load, both switches, export, and stock PEFT's reload equal to the trained
model's logits (tests/dist/architectures.py, one torchrun for all)."""

import json
import sys
from pathlib import Path

import pytest
from proc_group import child_env, run_group

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ARCHS = ["llama-untied", "llama-tied-sharded", "qwen2", "mistral", "gemma3", "mixtral"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("architectures")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/architectures.py"), str(out)]
    proc = run_group(cmd, cwd=ROOT, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {a: json.loads((out / f"{a}.json").read_text()) for a in ARCHS}, proc.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_partitioned_and_reloads_in_stock_peft(matrix, arch):
    r = matrix[0][arch]
    assert r["partitioned"] and r["largest_share"] <= 0.5, r  # no rank holds a whole weight
    assert r["switch_steps"] == [1, 2], r  # LoRA-Init at step 1, the dash switch at step 2
    assert r["layers"] == (8 if arch == "mixtral" else 14), r  # Mixtral: attention only (experts are 3-D)
    # fp32 on both sides; the trained model's forward is ZeRO-3's, PEFT's a plain one: summation order only
    assert r["max_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"]), r
    if arch == "llama-tied-sharded":
        assert len(r["files"]) > 1


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mixtral"])
def test_architectures_with_their_own_names_load_slice_by_slice(matrix, arch):
    assert matrix[0][arch]["refused"] is None


def test_renamed_weights_are_refused_by_name_unless_a_whole_load_is_allowed(matrix):
    """Mixtral's files name experts block_sparse_moe.experts.N.w1; transformers fuses them at load."""
    refused = matrix[0]["mixtral"]["refused"]
    assert refused.startswith("model.path: ") and "cannot be loaded slice by slice under ZeRO-3" in refused
    assert "model.allow_whole_load: true" in refused
    assert "(model.allow_whole_load)" in matrix[1]  # then loaded whole on rank 0, and said so
