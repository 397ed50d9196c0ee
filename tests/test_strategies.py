"""ZeRO-2 and plain data parallel (DeepSpeed stage 0) train the same model as ZeRO-3.

The same tiny LLaMA, seed, data and dropout on 2 CPU ranks under each strategy: the switch
selections (LoRA-Init's and the dash directions' indices) must be identical and the exported
adapters equal within 1e-5, for LoRA-Dash, LoRA-Init and LoRA-TSD; a run stopped between the
two switches of LoRA-TSD and resumed ends with the same adapter. Under ZeRO-2 the LoRA-Init
switch must also overwrite the optimizer's fp32 master copy of A and B (else the next step
undoes it and the adapters differ by far more than 1e-5). The auto choice is checked on
synthetic sizes (no model loaded).
"""

from pathlib import Path

import pytest
import torch
import yaml
from proc_group import lora_tsd_run, tiny_config, train_config
from safetensors.torch import load_file

from pipeline.training.strategy import ModelSizes, bytes_per_rank, choose_strategy, model_sizes

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# ----------------------------------------------------------------------------- the auto choice (fast)
def test_auto_picks_the_fastest_strategy_that_fits():
    # An 8B model in bf16 (16 GiB) with a LoRA of 20M parameters, on 80 GiB GPUs, 8 ranks: ddp.
    lora_8b = ModelSizes(params=8 * 10**9, weight_bytes=16 * GiB, largest_weight_bytes=1 * GiB, trainable=20 * 10**6)
    assert choose_strategy("auto", "auto", lora_8b, 8, 80 * GiB).strategy == "ddp"
    # The same on 24 GiB cards: the whole model x 2 margin does not fit; ZeRO-3 (2 GiB + 4 gathered layers) does.
    choice = choose_strategy("auto", "auto", lora_8b, 8, 24 * GiB)
    assert choice.strategy == "zero3" and "ddp ~16.30 GiB" in choice.why
    # Full fine-tuning of a 1B fp32 model (4 GiB weights, 16 bytes of state per parameter) on 2 ranks:
    # ddp needs ~19 GiB, ZeRO-2 ~4 + 4 + 6 = ~14 GiB per rank. With 32 GiB: ZeRO-2.
    full_1b = ModelSizes(params=10**9, weight_bytes=4 * 10**9, largest_weight_bytes=2 * 10**8, trainable=10**9)
    assert bytes_per_rank("ddp", full_1b, 2) > bytes_per_rank("zero2", full_1b, 2) > bytes_per_rank("zero3", full_1b, 2)
    assert choose_strategy("auto", "auto", full_1b, 2, 32 * GiB).strategy == "zero2"
    assert choose_strategy("auto", "auto", full_1b, 2, 64 * GiB).strategy == "ddp"
    # Nothing fits: ZeRO-3, the least memory, and the reason says so.
    assert "nothing fits" in choose_strategy("auto", "auto", full_1b, 2, 1 * GiB).why
    # Unknown size: ZeRO-3.
    assert choose_strategy("auto", None, None, 2, 64 * GiB).strategy == "zero3"


def test_the_users_choice_wins_and_a_contradiction_is_named():
    small = ModelSizes(params=10**6, weight_bytes=4 * 10**6, largest_weight_bytes=10**5, trainable=10**4)
    assert choose_strategy("zero3", "auto", small, 2, 64 * GiB).strategy == "zero3"  # explicit beats auto
    assert choose_strategy("auto", 3, small, 2, 64 * GiB).strategy == "zero3"  # a stage in the JSON is explicit
    assert choose_strategy("auto", 2, small, 2, 64 * GiB).strategy == "zero2"
    with pytest.raises(ValueError, match=r"deepspeed.strategy: ddp contradicts zero_optimization.stage 3 in z3.json"):
        choose_strategy("ddp", 3, small, 2, 64 * GiB, json_path="z3.json")
    # A resumed run keeps its checkpoint's strategy under auto, and refuses another explicit one.
    assert choose_strategy("auto", "auto", small, 2, 64 * GiB, resumed="zero3").strategy == "zero3"
    with pytest.raises(ValueError, match="written under zero3"):
        choose_strategy("zero2", "auto", small, 2, 64 * GiB, resumed="zero3")


def test_model_sizes_come_from_the_safetensors_headers(tmp_path):
    from pipeline.data.synthetic import make_model_dir

    folder = make_model_dir(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    sizes = model_sizes(folder, "bfloat16", ["q_proj", "v_proj"], r=4)
    assert sizes.params == sum(t.numel() for t in state.values())
    assert sizes.weight_bytes == 2 * sizes.params  # in the run's dtype, not the file's (float32)
    want = sum(4 * sum(t.shape) for k, t in state.items() if k.endswith(("q_proj.weight", "v_proj.weight")))
    assert sizes.trainable == want > 0
    assert model_sizes(folder, "float32", None, r=4).trainable == sizes.params  # full fine-tuning


def test_a_bfloat16_folder_trained_in_float32_is_sized_in_float32_by_the_strategy_and_zero3s_limits(tmp_path):
    """One estimate for both decisions: the weights in the dtype the run loads them in. Sized
    from the files, a bfloat16 folder run in float32 looked half its size to ZeRO-3's limits."""
    from safetensors.torch import save_file

    from pipeline.config import load_config
    from pipeline.data.synthetic import make_model_dir
    from pipeline.training.engine import zero3_is_roomy
    from pipeline.training.strategy import run_model_sizes

    folder = make_model_dir(tmp_path / "m")
    weights = folder / "model.safetensors"
    save_file({k: t.to(torch.bfloat16) for k, t in load_file(str(weights)).items()}, str(weights), {"format": "pt"})
    params = sum(t.numel() for t in load_file(str(weights)).values())
    # Room for the files' bytes (bf16) twice over, but not for the float32 weights twice over.
    budget_gb = 1.5 * 4 * params / 2**30
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"model.path={folder}", "model.dtype=float32",
                                                       f"workers.memory_budget_gb={budget_gb}"])
    sizes = run_model_sizes(cfg)
    assert sizes.weight_bytes == 4 * params
    roomy, why = zero3_is_roomy(cfg, sizes)
    assert not roomy and f"{4 * params / 2**30:.2f} GiB" in why and "does not fit" in why
    # The strategy is chosen from the same sizes: data parallel needs the float32 weights whole.
    assert choose_strategy("auto", "auto", sizes, 2, int(budget_gb * 2**30)).strategy != "ddp"


# ----------------------------------------------------------------------------- 2-rank runs (slow)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (method, strategy) run once per module, on demand: name -> run folder."""
    wd = tmp_path_factory.mktemp("strategies")
    # ZeRO-3's LoRA-TSD run is the suite's shared one (proc_group.lora_tsd_run: the same config as
    # run() makes, tracked): every run here trains its model
    shared, _ = lora_tsd_run(tmp_path_factory)
    done: dict[str, Path] = {"tsd-zero3": shared / "runs/full"}

    def run(method: str, strategy: str, name: str | None = None, nproc: int = 2, copy_from: Path | None = None,
            stop_at: int | None = None, expect_ok: bool = True, dropout: float = 0.1):
        name = name or f"{method}-{strategy}"
        if name in done:
            return done[name]
        cfg = tiny_config(shared / "model", wd / "runs", name)
        cfg["deepspeed"].update(config=str(ROOT / "configs/deepspeed/default.json"), strategy=strategy)
        cfg["method"].update(method=method, switch_step=2, dropout=dropout)
        cfg["train"].update(max_steps=6, warmup_steps=2, checkpoint_every=1, keep_checkpoints=None)
        # ZeRO-2 and ddp recompute activations (dropout on, through both switches and the resumes):
        # they must still train what ZeRO-3 trains without.
        cfg["train"]["gradient_checkpointing"] = strategy != "zero3"
        cfg["tracking"].update(offline=True)
        proc = train_config(cfg, wd, nproc, copy_from, stop_at)
        if not expect_ok:
            return proc
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        done[name] = wd / "runs" / name
        done[name + ".log"] = proc.stderr
        return done[name]

    run.logs = done
    return run


def assert_same_training(got: Path, want: Path, method: str):
    """Identical selections, adapters within 1e-5 (and the switches did happen)."""
    for f in ("tsd_state.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(got / "adapter" / f)), load_file(str(want / "adapter" / f))
        assert a.keys() == b.keys(), f
        for k in a:
            if k.endswith(("_indices", "_step")):
                assert torch.equal(a[k], b[k]), f"{f} {k}: {a[k]} != {b[k]}"
            else:
                torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=f"{f} {k}")
    state = load_file(str(got / "adapter/tsd_state.safetensors"))
    layer = "model.layers.0.self_attn.q_proj"
    if method in ("init", "tsd"):
        assert int(state[f"{layer}.init_step"]) == 2
    if method in ("dash", "tsd"):
        assert int(state[f"{layer}.dash_step"]) == (4 if method == "tsd" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tsd"])  # both switches, Init then Dash: LoRA-Dash and LoRA-Init alone
@pytest.mark.parametrize("strategy", ["zero2", "ddp"])  # run the same switch code (each was a launch more)
def test_strategy_trains_what_zero3_trains(runs, method, strategy):
    # LoRA-TSD under ddp goes through auto: the tiny model fits, so auto must pick ddp.
    requested = "auto" if (method, strategy) == ("tsd", "ddp") else strategy
    got = runs(method, requested, name=f"{method}-{strategy}")
    assert f"strategy {strategy}: " in runs.logs[f"{method}-{strategy}.log"]
    assert "gradient checkpointing on" in runs.logs[f"{method}-{strategy}.log"]
    if requested == "auto":
        assert "strategy ddp: fastest that fits" in runs.logs[f"{method}-{strategy}.log"]
    assert_same_training(got, runs(method, "zero3"), method)
    layout = yaml.safe_load((got / "checkpoints/step6/layout.json").read_text())
    assert layout["strategy"] == strategy
    if strategy == "ddp":  # one model file holds the (lean) module and the whole optimizer state
        assert not list((got / "checkpoints/step6").glob("zero_pp_rank_*"))


@pytest.mark.slow
# ddp's checkpoint (one model file) resumes in test_ddp_checkpoint_resumes_on_one_rank...; the TSD
# state between the switches is the module's under every strategy (ZeRO-3's: tests/test_resume.py)
@pytest.mark.parametrize("strategy", ["zero2"])
def test_strategy_resumes_between_the_switches(runs, strategy):
    full = runs("tsd", "auto" if strategy == "ddp" else strategy, name=f"tsd-{strategy}")
    got = runs("tsd", strategy, name=f"tsd-{strategy}-resumed", copy_from=full, stop_at=3)
    assert "at optimizer step 3" in runs.logs[f"tsd-{strategy}-resumed.log"]
    assert_same_training(got, runs("tsd", "zero3"), "tsd")


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_rank_and_zero2_refuses_to(runs):
    """A data-parallel checkpoint is one model file: 2 ranks -> 1 rank (grad_accum 2 keeps the
    global batch) ends with the 2-rank adapter (no dropout: one rank cannot draw rank 1's masks).
    Resumed after both switches, as the ZeRO-3 reshard test does: from step 3, one step after
    LoRA-Init's fresh Adam moments, the gradients' different summation order (one rank's
    accumulation vs two ranks' all-reduce) is amplified by Adam's first steps to 2.4e-4, under
    ZeRO-3 as under ddp (measured).
    A ZeRO-2 checkpoint's optimizer partitions are laid out for its world size: another one is
    refused by name, nothing trained or written."""
    full = runs("tsd", "ddp", name="tsd-ddp-nodrop", dropout=0.0)
    got = runs("tsd", "ddp", name="tsd-ddp-on-1", nproc=1, copy_from=full, stop_at=5, dropout=0.0)
    assert "at optimizer step 5" in runs.logs["tsd-ddp-on-1.log"]
    assert_same_training(got, full, "tsd")
    zero2 = runs("tsd", "zero2")
    proc = runs("tsd", "zero2", name="tsd-zero2-on-1", nproc=1, copy_from=zero2, stop_at=3, expect_ok=False)
    assert proc.returncode != 0  # torchrun exits 1 whatever its worker's code (2 here)
    assert "exitcode  : 2" in proc.stderr
    assert "written by 2 ranks under zero2, which resumes only on 2 ranks (this run has 1)" in proc.stderr
    assert not (zero2.parent / "tsd-zero2-on-1" / "adapter").exists()
