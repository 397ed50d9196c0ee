"""Stop-and-resume equivalence with 2 ranks: a run resumed from its checkpoint at step k ends
with the adapter of an uninterrupted run, before, between and after the switches.

LoRA-TSD with t=2 re-initialises at step 2 and adds the dash term at step 4 (6 steps). A crash
right after the step-k checkpoint is reproduced exactly by keeping only checkpoints <= k and
pointing `latest` at step k; the same command then resumes. Dropout is on, so the RNG state
must be restored too. Settings that make this exact: CPU, gloo, fixed seed, 1 thread per rank.
"""

import shutil
from pathlib import Path

import pytest
from proc_group import make_tiny_model, tiny_config, torchrun_worker
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _worker(cfg: Path):
    proc = torchrun_worker(cfg)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("resume")
    make_tiny_model(wd / "model")
    cfg = tiny_config(wd / "model", wd / "runs", "full")
    cfg["method"].update(method="tsd", switch_step=2, dropout=0.1)
    cfg["train"].update(max_steps=6, checkpoint_every=1, warmup_steps=2, schedule="linear", log_every=1)
    cfg["tracking"].update(uri=f"sqlite:///{wd}/mlflow.db", experiment="resume")
    path = wd / "full.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _worker(path)
    return wd, cfg


def intended_lr(step: int, lr: float, warmup: int, total: int, switch: int) -> float:
    """METHOD.md's LoRA-Init schedule written out: steps 1..switch run the pre-launch phase's
    warm-up + linear decay over all steps; from step switch+1 a fresh one over the rest."""
    start = 0 if step <= switch else switch
    local, span = step - 1 - start, total - start
    if local < warmup:
        return lr * (local + 1) / warmup
    return lr * (1 - (local - warmup) / (span - warmup))


def test_lora_init_restarts_the_schedule_at_the_step_after_the_switch(full_run):
    """The first step with fresh Adam moments (step 3) runs at the restarted warm-up's first
    rate (0.5 lr), not the old phase's rate (before the fix it ran at the full lr)."""
    import mlflow

    wd, cfg = full_run
    client = mlflow.MlflowClient(cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name("resume")
    run = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'full'")[0]
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    t = cfg["train"]
    want = {s: intended_lr(s, t["lr"], t["warmup_steps"], t["max_steps"], cfg["method"]["switch_step"]) for s in range(1, 7)}
    assert [round(want[s] / t["lr"], 6) for s in range(1, 7)] == [0.5, 1.0, 0.5, 1.0, 1.0, 0.5]
    assert got.keys() == want.keys()
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-6), f"step {s}: lr {got[s]} != intended {want[s]}"


@pytest.mark.parametrize("stop_at", [1, 3, 5], ids=["before-switches", "between-init-and-dash", "after-switches"])
def test_resumed_run_ends_with_the_uninterrupted_adapter(full_run, stop_at):
    wd, cfg = full_run
    name = f"resume{stop_at}"
    ckpt = wd / "runs" / name / "checkpoints"
    shutil.copytree(wd / "runs/full/checkpoints", ckpt)
    for later in range(stop_at + 1, 7):
        shutil.rmtree(ckpt / f"step{later}", ignore_errors=True)
    (ckpt / "latest").write_text(f"step{stop_at}")
    cfg = {**cfg, "name": name}
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _worker(path)
    assert "resumed from" in proc.stderr and f"at optimizer step {stop_at}" in proc.stderr
    want = load_file(str(wd / "runs/full/adapter/tsd_state.safetensors"))
    got = load_file(str(wd / "runs" / name / "adapter/tsd_state.safetensors"))
    assert want.keys() == got.keys()
    assert int(got["model.layers.0.self_attn.q_proj.init_step"]) == 2
    assert int(got["model.layers.0.self_attn.q_proj.dash_step"]) == 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
