"""LoRA-Init under every (strategy, precision) DeepSpeed builds here: the optimizer's master
copies must follow the switch (issue 23, item 3).

The switch edits lora_A, lora_B in place. DeepSpeed's 16-bit optimizers keep fp32 master copies
apart and copy them into the model after every step; a stale master silently restores the old
factors over the residual base. So: switch, `refresh_master_copies` (as the training loop does),
one optimizer step at lr=0, and A, B must still be the switched values.

One subprocess (world size 1, gloo) builds every combination in turn, once with the refresh and
once without (what the check must catch), and writes what it saw as JSON; running this file as
a script is that worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # DeepSpeed in a subprocess: ~15 s once its shm op is built
ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"ddp": 0, "zero2": 2, "zero3": 3}
PRECISIONS = ("fp32", "bf16", "fp16")
LR = 1e-2


# ----------------------------------------------------------------------------- the worker


def ds_config(strategy: str, precision: str) -> dict:
    """configs/deepspeed/default.json's choices, filled; no fused ops (torch AdamW, PLATFORM.md)."""
    zero = {"stage": STRATEGIES[strategy], "overlap_comm": False, "contiguous_gradients": True}
    if strategy == "zero3":
        zero["stage3_param_persistence_threshold"] = 0  # or the tiny weights stay whole
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        # A static scale: a dynamic one skips its first steps on overflow, and a skipped step
        # copies no master back, so it would hide the bug.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 1.0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def master_of(engine, param):
    """The optimizer's fp32 copy of `param` (the parameter itself where there is none)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None:
        return safe_get_full_fp32_param(param)
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is param:
                return hp.detach()
    assert isinstance(opt, torch.optim.Optimizer), f"unknown master layout of {type(opt).__name__}"
    return param.detach()


def combination(strategy: str, precision: str, refresh: bool) -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import tsd
    from conftest import batch, tiny_llama_config
    from pipeline.training.engine import refresh_master_copies
    from pipeline.training.sharded_switch import sharded_switch
    from tsd.partition import gathered
    from tsd.switch import switch_kind

    ds = ds_config(strategy, precision)
    keep = HfDeepSpeedConfig(ds) if strategy == "zero3" else None  # zero.Init while the model is built
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32)
    tsd.inject(model, tsd.TSDConfig(method="tsd", r=4, alpha=8, dropout=0.0, switch_step=2, num_directions=3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    del keep
    layers = tsd.tsd_layers(engine.module)
    ids = batch(seed=3)

    def train(lr: float) -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    def factors() -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in layers:
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B), ("s", layer.dash_scalars)):
                with gathered([p]):
                    out[f"{name}.{key}"] = p.detach().float().clone()
        return out

    def master_gap() -> float:
        """max |master - model| over the TSD layers' trainable parameters, the master rounded
        to the model's dtype as the step's copy into the model rounds it."""
        gap = 0.0
        for _, layer in layers:
            for p in (layer.lora_A, layer.lora_B, layer.dash_scalars):
                master = master_of(engine, p)
                with gathered([p]):
                    gap = max(gap, (master.to(p.dtype).float() - p.detach().float()).abs().max().item())
        return gap

    def max_diff(a: dict, b: dict, keys=("A", "B")) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a if k.rsplit(".", 1)[1] in keys)

    res = {"optimizer": type(engine.optimizer).__name__,
           "lora_dtype": str(layers[0][1].lora_A.dtype).removeprefix("torch."),
           "base_dtype": str(layers[0][1].base_layer.weight.dtype).removeprefix("torch.")}
    for _ in range(2):  # LoRA's pre-launch phase: B != 0, and Adam moments and masters that lag
        train(LR)
    before = factors()
    rep = sharded_switch(engine.module, "init", 2, "float32")
    switched = factors()
    res["switch_moved"] = max_diff(switched, before)  # how far a stale master would pull A, B back
    res["gap_before_refresh"] = master_gap()
    if refresh and switch_kind("init").restarts_training:  # as run_due_switches calls it
        res["refresh"] = refresh_master_copies(engine)
    res["gap_after_refresh"] = master_gap()
    # The exact fp32 factors (what set_master_copy wrote): where the optimizer keeps them, the
    # refresh must not have rounded them to 16 bits.
    exact = {}
    for d in rep.directions:
        layer = dict(layers)[d.name]
        exact[f"{d.name}.A"], exact[f"{d.name}.B"] = layer.init_factors(d)
    res["master_vs_exact"] = max(
        (master_of(engine, p).float() - exact[f"{name}.{key}"]).abs().max().item()
        for name, layer in layers for key, p in (("A", layer.lora_A), ("B", layer.lora_B)))
    res["model_vs_exact"] = max_diff(switched, exact)

    train(0.0)  # lr=0: a step that changes nothing, but copies the masters into the model
    res["step_drift"] = max_diff(factors(), switched)
    res["skipped_steps"] = int(engine.skipped_steps)  # a skipped step copies no master back

    # LoRA-TSD's second switch: dash fills buffers and zeroes the scalars; nothing to refresh.
    train(LR)
    sharded_switch(engine.module, "dash", 4, "float32")
    dashed = factors()
    res["dash_scalars_max"] = max(v.abs().max().item() for k, v in dashed.items() if k.endswith(".s"))
    res["dash_gap"] = master_gap()
    try:
        train(0.0)
    except RuntimeError as e:
        res["dash_error"] = str(e)[:300]
        return res
    res["dash_step_drift"] = max_diff(factors(), dashed, keys=("A", "B", "s"))
    return res


def worker(out: Path) -> None:
    """Every combination twice: as the training loop runs it, and with the refresh left out
    (what the check must catch)."""
    import deepspeed
    import torch

    from pipeline.training.distributed import skip_unused_deepspeed_comm_op

    torch.set_num_threads(1)
    skip_unused_deepspeed_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, dict] = {"refresh": {}, "no_refresh": {}}
    # ZeRO-3 last: its engine leaves torch.nn.functional.linear patched for the whole process.
    for strategy in STRATEGIES:
        for precision in PRECISIONS:
            key = f"{strategy}/{precision}"
            for mode, refresh in (("refresh", True), ("no_refresh", False)):
                try:
                    results[mode][key] = combination(strategy, precision, refresh)
                except ValueError as e:
                    # DeepSpeed's CPU accelerator builds fp16 only where oneDNN has fp16 kernels
                    # (AVX512-FP16 / AMX-FP16); elsewhere: "Type fp16 is not supported on your device."
                    if precision != "fp16" or "not supported" not in str(e):
                        raise
                    results[mode][key] = {"skip": f"DeepSpeed refuses fp16 here: {e}"}
            out.write_text(json.dumps(results, indent=1))  # what there is, should a later one crash
    from pipeline.training.distributed import end_process, leave_process_group

    leave_process_group()
    end_process(0)


# ----------------------------------------------------------------------------- the tests


def run_worker(tmp: Path) -> dict:
    from proc_group import child_env, free_port, run_group

    out = tmp / "results.json"
    # DeepSpeed's CPU accelerator unless DS_ACCELERATOR says otherwise, also on a GPU machine:
    # which optimizer wraps AdamW does not depend on the device, and gloo runs the collectives.
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                    LOCAL_WORLD_SIZE="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out)]
    proc = run_group(cmd, cwd=ROOT, env=env, timeout=400)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("master_copies"))


COMBINATIONS = [f"{s}/{p}" for s in STRATEGIES for p in PRECISIONS]


def built(results: dict, key: str, mode: str = "refresh") -> dict:
    r = results[mode][key]
    if "skip" in r:
        pytest.skip(r["skip"])
    return r


def stage0_16bit(r: dict) -> bool:
    """DeepSpeed's stage-0 16-bit wrappers (FP16_UnfusedOptimizer, or FP16_Optimizer around a
    fused Adam): fp32 masters that set_master_copy cannot reach."""
    return r["optimizer"].startswith("FP16_")


@pytest.mark.parametrize("key", COMBINATIONS)
def test_init_switch_survives_the_next_step(results, key):
    r = built(results, key)
    assert r["switch_moved"] > 0.1, r  # the switch really changed A, B: a stale master would show
    assert r["skipped_steps"] == 0, r
    assert r["gap_after_refresh"] == 0.0, r  # every master, rounded to the model's dtype, is the model
    assert r["step_drift"] == 0.0, r  # lr=0: A, B are still the switched values


@pytest.mark.parametrize("key", COMBINATIONS)
def test_the_check_catches_stale_masters(results, key):
    """Without the refresh the stage-0 16-bit optimizers restore the old factors (issue 23 item
    3); everywhere else set_master_copy alone already keeps the masters right."""
    r = built(results, key, "no_refresh")
    assert r["skipped_steps"] == 0, r
    if stage0_16bit(r):
        assert r["gap_before_refresh"] > 0.1 and r["step_drift"] > 0.1, r
    else:
        assert r["gap_before_refresh"] == 0.0 and r["step_drift"] == 0.0, r


@pytest.mark.parametrize("key", COMBINATIONS)
def test_exact_masters_are_not_rounded(results, key):
    """Where the switch wrote the exact fp32 factors into the masters, the refresh keeps them;
    the stage-0 16-bit masters can only hold the model's rounded values."""
    r = built(results, key)
    if stage0_16bit(r):
        assert r["master_vs_exact"] == r["model_vs_exact"] > 0, r
    else:
        assert r["master_vs_exact"] == 0.0, r


@pytest.mark.parametrize("key", COMBINATIONS)
def test_dash_switch_leaves_masters_consistent(results, key):
    r = built(results, key)
    assert r["dash_scalars_max"] == 0.0, r
    assert r["dash_gap"] == 0.0, r
    # DeepSpeed casts parameters to 16 bits but leaves buffers fp32: before TSDLinear.forward
    # computed the dash term in the factors' dtype, fp32 dash_V met bf16 lora_A here and raised.
    assert "dash_error" not in r, r
    assert r["dash_step_drift"] == 0.0, r


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(Path(sys.argv[1]))
