"""Stop-and-resume equivalence with 2 ranks: a run resumed from its checkpoint at step k ends
with the adapter of an uninterrupted run, before, between and after the switches. Between them
here (step 3); before both (step 1) and after both (step 4) in tests/test_reliability.py, whose
fallback and `latest` tests resume the same LoRA-TSD run (t=2, dropout on, 2 ranks) from those
tags and compare with its uninterrupted adapter.

LoRA-TSD with t=2 re-initialises at step 2 and adds the dash term at step 4 (6 steps). A crash
right after the step-k checkpoint is reproduced exactly by keeping only checkpoints <= k and
pointing `latest` at step k; the same command then resumes. Dropout is on, so the RNG state
must be restored too. Settings that make this exact: CPU, gloo, fixed seed, 1 thread per rank.
"""

import shutil
from pathlib import Path

import pytest
from proc_group import crashed_after, lora_tsd_run, torchrun_worker, tsd_run
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
    """The suite's shared LoRA-TSD run (proc_group.lora_tsd_run): (its folder, its config). This
    file's resumes write their runs and MLflow runs beside it; the other files only read it."""
    return lora_tsd_run(tmp_path_factory)


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


def test_checkpoints_hold_no_base_weight(full_run):
    """Lean checkpoints: adapter tensors, TSD buffers, optimizer, schedule, RNG, data position,
    and not one frozen base weight (after LoRA-Init too: the residual is rebuilt at resume)."""
    from pipeline.training.checkpoint import LEAN, weights_only_checkpoint_engine

    wd, _ = full_run
    loader = weights_only_checkpoint_engine(None)
    base = load_file(str(wd / "model/model.safetensors"))
    for tag in ("step1", "step3", "step6"):
        for rank in (0, 1):
            state = loader.load(str(wd / f"runs/full/checkpoints/{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))
            assert state.get(LEAN) is True and not state.get("frozen_param_fragments")
            frozen = [k for k in state["module"] if not k.endswith(("lora_A", "lora_B"))
                      and not any(b in k for b in ("dash_", "init_"))]
            assert frozen == [], frozen[:5]
    ckpt_bytes = sum(f.stat().st_size for f in (wd / "runs/full/checkpoints/step6").iterdir())
    base_bytes = sum(t.numel() * t.element_size() for t in base.values())
    print(f"checkpoint step6: {ckpt_bytes} bytes (2 ranks); base model: {base_bytes} bytes")


@pytest.mark.parametrize("stop_at", [3], ids=["between-init-and-dash"])  # 1 and 4: tests/test_reliability.py
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


def test_every_random_generator_a_rank_uses_is_saved_and_restored(tmp_path):
    """torch (CPU and each CUDA device), Python's random and NumPy's global generator."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    from pipeline.training.checkpoint import restore_rng, rng_state

    random.gauss(0, 1)  # a cached Gaussian in Python's state too
    tensors, meta = rng_state()
    save_file(tensors, str(tmp_path / "rng_rank0.safetensors"), metadata=meta)
    want = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2).tolist())
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    restore_rng(tmp_path)
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2).tolist())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_retention_keeps_the_newest_tags_and_never_the_one_latest_does_not_name_yet(tmp_path):
    """train.keep_checkpoints: older tags go only after a newer one is complete (`latest` moved
    to it); a save that crashed part-way leaves `latest` on the previous tag, which stays."""
    from pipeline.training.checkpoint import prune_checkpoints

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (ckpt / f"step{step}").mkdir(parents=True)
    (ckpt / "latest").write_text("step4")
    assert prune_checkpoints(ckpt, 2) == ["step1", "step2"]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["step3", "step4"]
    (ckpt / "step5").mkdir()  # being written when the process died: `latest` still says step4
    assert prune_checkpoints(ckpt, 1) == ["step3"]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["step4", "step5"]
    assert prune_checkpoints(ckpt, None) == []


def test_retention_also_keeps_the_first_tag_holding_each_switchs_state(tmp_path):
    """LoRA-TSD switching at steps 2 and 4, a checkpoint every 3 steps, keep 1: step3 (the first
    after the Init switch) and step6 (the first after the dash switch) stay with the newest."""
    from pipeline.training.checkpoint import prune_checkpoints

    ckpt = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12):
        (ckpt / f"step{step}").mkdir(parents=True)
    (ckpt / "latest").write_text("step12")
    assert prune_checkpoints(ckpt, 1, (2, 4)) == ["step9"]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["step12", "step3", "step6"]


def _whole_tag(tag_dir: Path, run_id: str) -> None:
    """A tag every check calls whole: one rank's data-parallel files and its layout.json."""
    from safetensors.torch import save_file

    from pipeline.training.reshard import write_layout

    tag_dir.mkdir(parents=True)
    torch.save({}, tag_dir / "mp_rank_00_model_states.pt")
    save_file({"torch": torch.zeros(2)}, str(tag_dir / "rng_rank0.safetensors"))
    write_layout(tag_dir, 1, 1, 1, run_id, "ddp")


@pytest.mark.parametrize("content", ["../x", "{abs}", "step2/../../x", "", "..", "step2\\..\\x", "\x00\x01"])
def test_latest_holding_a_path_is_treated_like_a_corrupt_one(tmp_path, capsys, content):
    """`checkpoints/latest` is only ever a tag name of this run: a path (up and out of the run
    folder, absolute, or through a tag) is refused with its content named, and the resume falls
    back to the newest whole tag; the whole tag planted outside is never used."""
    from pipeline.training.checkpoint import choose_resume_tag, prune_checkpoints
    from pipeline.training.reshard import checkpoint_run_id

    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    for step in (1, 2):
        _whole_tag(ckpt / f"step{step}", f"run-step{step}")
    _whole_tag(run / "x", "outside")  # what `../x` and `step2/../../x` reach
    _whole_tag(tmp_path / "abs", "outside")
    content = content.replace("{abs}", str(tmp_path / "abs"))
    (ckpt / "latest").write_text(content)
    assert choose_resume_tag(ckpt, 0, 1) == "step2"
    err = capsys.readouterr().err
    assert f"{ckpt / 'latest'} holds {content.strip()!r}, which is not a checkpoint tag of this run" in err, err
    assert "resuming from the newest whole checkpoint 'step2' instead" in err, err
    assert checkpoint_run_id(run) is None  # as for a corrupt `latest`: not the planted run's id
    assert prune_checkpoints(ckpt, 1) == ["step1"]


def test_latest_naming_a_tag_is_read_as_before(tmp_path, capsys):
    from pipeline.training.checkpoint import choose_resume_tag
    from pipeline.training.reshard import checkpoint_run_id

    ckpt = tmp_path / "run/checkpoints"
    for step in (1, 2):
        _whole_tag(ckpt / f"step{step}", f"run-step{step}")
    (ckpt / "latest").write_text("step1\n")
    assert choose_resume_tag(ckpt, 0, 1) == "step1" and checkpoint_run_id(tmp_path / "run") == "run-step1"
    assert "WARNING" not in capsys.readouterr().err
    (ckpt / "latest").write_text("../checkpoints/step2")  # inside the folder after all, but a path: refused
    assert choose_resume_tag(ckpt, 0, 1) == "step2" and checkpoint_run_id(tmp_path / "run") is None
    (ckpt / "latest").write_text("step9")  # a plain name whose folder is missing: as before, the fallback
    assert choose_resume_tag(ckpt, 0, 1) == "step2"
    assert f"the latest checkpoint 'step9' in {ckpt} is incomplete or corrupt" in capsys.readouterr().err


def test_cpu_offload_trains_switches_exports_and_resumes_like_the_plain_run(full_run):
    """configs/deepspeed/zero3_offload.json (parameters and optimizer state offloaded to CPU):
    the same LoRA-TSD run through both switches and the export, and a resume after the Init
    switch from its lean checkpoint, end with the plain ZeRO-3 run's adapter."""
    wd, cfg = full_run
    want = load_file(str(wd / "runs/full/adapter/tsd_state.safetensors"))
    for name, stop_at in (("offload", None), ("offload-resumed", 3)):
        run = {**cfg, "name": name, "tracking": {**cfg["tracking"], "offline": True},
               "deepspeed": {**cfg["deepspeed"], "config": str(ROOT / "configs/deepspeed/zero3_offload.json")}}
        if stop_at is not None:
            crashed_after(wd / "runs/offload", wd / "runs" / name, stop_at)
        path = wd / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run))
        proc = _worker(path)
        if stop_at is not None:
            assert f"at optimizer step {stop_at}" in proc.stderr
        got = load_file(str(wd / "runs" / name / "adapter/tsd_state.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{name}: {k}")


# ----------------------------------------------------------------------------- another world size
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """LoRA-TSD on 2 ranks, micro batch 1 x grad_accum 3 (global batch 6, which 1 and 3 ranks
    divide), 30 examples (an epoch is 5 steps on 1, 2 and 3 ranks alike), switches at 2 and 4,
    8 steps, a checkpoint every step. Dropout off: after a world-size change another rank draws
    each example's mask, so only dropout-free runs can be compared step by step."""
    return tsd_run(tmp_path_factory.mktemp("reshard"), "two", "reshard", dict(switch_step=2, dropout=0.0),
                    dict(max_steps=8, micro_batch_size=1, grad_accum=3), data=dict(limit=30))


def _losses(cfg: dict, name: str):
    import mlflow

    client = mlflow.MlflowClient(cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    run = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")[0]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}, run


TSD_STATE = (".dash_U", ".dash_V", ".dash_indices", ".dash_step", ".init_A0", ".init_B0", ".init_indices", ".init_step")


def _assert_same_adapter(ref: dict, new: dict) -> None:
    """The TSD state bit-identical, the trained tensors within float32 reduction-order error."""
    assert ref.keys() == new.keys()
    for k in ref:
        if any(b in k for b in TSD_STATE):
            assert torch.equal(new[k], ref[k]), f"TSD state {k} differs"
        else:
            torch.testing.assert_close(new[k], ref[k], atol=1e-6, rtol=0, msg=k)


def test_a_two_rank_checkpoint_resumes_on_three_ranks(two_rank_run):
    """The step-5 checkpoint (after both switches) continued on 3 ranks: the same loss at steps
    6-8 as the 2-rank run within float32 reduction-order error (rel 1e-5; measured ~1e-7), the
    same adapter (<= 1e-6; measured 7e-9) and bit-identical TSD state. Onto 1 rank: the next
    test (a crashed run rerun there), which checks the same."""
    wd, cfg = two_rank_run
    ranks = 3
    name = f"on{ranks}"
    ckpt = wd / "runs" / name / "checkpoints"
    shutil.copytree(wd / "runs/two/checkpoints/step5", ckpt / "step5")
    (ckpt / "latest").write_text("step5")
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name}))
    proc = torchrun_worker(path, nproc=ranks)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"train.grad_accum 3 -> {6 // ranks}" in proc.stderr
    assert f"resharded onto {ranks} rank(s)" in proc.stderr and "at optimizer step 5" in proc.stderr

    want, _ = _losses(cfg, "two")
    got, run = _losses(cfg, name)
    assert sorted(got) == [6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    assert run.data.tags["resharded"] == f"2 -> {ranks} ranks at step 5"

    _assert_same_adapter(load_file(str(wd / "runs/two/adapter/tsd_state.safetensors")),
                         load_file(str(wd / "runs" / name / "adapter/tsd_state.safetensors")))


def test_a_crashed_run_rerun_on_one_rank_continues_in_its_mlflow_run(two_rank_run):
    """The same config as the 2-rank run under another name, stopped by a NaN at step 7 (its
    MLflow run FAILED, checkpoint step6 kept, after both switches), rerun on 1 rank without the
    fault: resharded 2 -> 1 (grad_accum 3 -> 6), the same MLflow run continues (restarts = 1),
    steps 7-8 land in it with the 2-rank run's losses (rel 1e-5), and it ends FINISHED with the
    2-rank run's adapter (<= 1e-6) and bit-identical TSD state."""
    import mlflow

    wd, cfg = two_rank_run
    path = wd / "cut.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": "cut"}))
    first = torchrun_worker(path, TSD_INJECT_NAN_AT_STEP="7")
    # The NaN stops it cleanly (also test_faults.py's NaN-loss case): the last good checkpoint
    # kept and named, nothing of step 7 saved, no adapter that looks complete, the run FAILED.
    assert first.returncode != 0 and "non-finite loss (nan) at optimizer step 7" in first.stderr
    assert "The last good checkpoint (step6" in first.stderr
    assert (wd / "runs/cut/checkpoints/latest").read_text().strip() == "step6"
    assert not (wd / "runs/cut/checkpoints/step7").exists()
    assert not (wd / "runs/cut/adapter").exists(), "a stopped run must not leave an adapter that looks complete"
    client = mlflow.MlflowClient(cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'cut'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    proc = torchrun_worker(path, nproc=1)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "continuing MLflow run" in proc.stderr
    assert "train.grad_accum 3 -> 6" in proc.stderr
    assert "resharded onto 1 rank(s)" in proc.stderr and "at optimizer step 6" in proc.stderr
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'cut'")
    assert len(runs) == 1, "a rerun must not create a second MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1" and run.data.tags["resharded"] == "2 -> 1 ranks at step 6"
    want, _ = _losses(cfg, "two")
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(got) == list(range(1, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    ref = load_file(str(wd / "runs/two/adapter/tsd_state.safetensors"))
    new = load_file(str(wd / "runs/cut/adapter/tsd_state.safetensors"))
    _assert_same_adapter(ref, new)
