"""Running the same command twice (issue 17).

A finished run rerun: one line, exit 0, no new MLflow run, nothing written. A rerun with another
config: refused with the changed keys named, nothing written. `--fresh`: a new complete run
(never an empty one). A run interrupted after its last checkpoint and before its export: the
rerun trains nothing and its final_loss is the last trained step's, not NaN. (An interrupted run
rerun continues its own MLflow run with restarts = 1 and the uninterrupted adapter:
tests/test_resume.py::test_crashed_run_rerun_on_one_rank_continues_its_mlflow_run.)
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from proc_group import child_env, make_tiny_model, tiny_config, torchrun_worker

from pipeline.run_folder import config_differences

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_config_differences_name_only_keys_that_shape_training():
    before = {"name": "a", "method": {"r": 4, "svd_cache": "/x"}, "train": {"lr": 1e-3, "eval_limit": 4,
              "log_every": 1}, "workers": {"num_workers": 2}, "tracking": {"uri": None}}
    now = {"name": "a", "method": {"r": 8, "svd_cache": "/y"}, "train": {"lr": 1e-3, "eval_limit": 9,
           "log_every": 5}, "workers": {"num_workers": 1}, "tracking": {"uri": "sqlite:///m.db"}}
    assert config_differences(before, now) == ["method.r: 4 -> 8"]
    assert config_differences(before, before) == []


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _mlflow_runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete 2-rank LoRA-Dash run of the tiny model, tracked in wd/mlflow.db."""
    wd = tmp_path_factory.mktemp("rerun")
    make_tiny_model(wd / "model")
    cfg = tiny_config(wd / "model", wd / "runs", "once")
    cfg["train"].update(checkpoint_every=1, keep_checkpoints=None)
    cfg["tracking"].update(uri=f"sqlite:///{wd}/mlflow.db", experiment="rerun")
    path = wd / "once.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun_worker(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd, path, cfg


@pytest.mark.slow
def test_a_finished_run_rerun_says_so_and_changes_nothing(finished):
    wd, path, cfg = finished
    client, before = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    files = _snapshot(wd / "runs/once")
    proc = torchrun_worker(path)  # the bare launcher: every rank sees it, rank 0 says it
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "already finished" in ln]
    assert len(lines) == 1 and before[0].info.run_id in lines[0] and "adapter" in lines[0] and "--fresh" in lines[0]
    # `tsd train` (Ray) recognises it before Ray or MLflow starts
    cli = subprocess.run([str(BIN / "tsd"), "train", str(path)], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "already finished" in cli.stdout and "Started a local Ray" not in cli.stderr
    _, after = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before]
    assert _snapshot(wd / "runs/once") == files


@pytest.mark.slow
def test_a_changed_config_is_refused_naming_the_keys(finished):
    wd, path, cfg = finished
    files = _snapshot(wd / "runs/once")
    _, before = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    changed = wd / "changed.yaml"
    changed.write_text(yaml.safe_dump({**cfg, "method": {**cfg["method"], "r": 2, "method": "lora"}}))
    cli = subprocess.run([str(BIN / "tsd"), "train", str(changed)], cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr
    err = [ln for ln in cli.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "method.method: 'dash' -> 'lora'" in err[0] and "method.r: 4 -> 2" in err[0]
    proc = torchrun_worker(changed, nproc=1)  # refused at the start check: one rank says what two would
    assert proc.returncode != 0 and "method.r: 4 -> 2" in proc.stderr
    assert _snapshot(wd / "runs/once") == files
    _, after = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    assert len(after) == len(before)


@pytest.mark.slow
def test_fresh_replaces_a_finished_run_with_a_new_complete_one(finished):
    wd, path, cfg = finished
    proc = torchrun_worker(path, extra=["--fresh"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--fresh: removed the finished run" in proc.stdout + proc.stderr
    client, runs = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    named = [r for r in runs if r.info.run_name == "once"]
    assert len(named) == 2 and all(r.info.status == "FINISHED" for r in named)
    for r in named:  # two complete runs, never an empty one
        assert math.isfinite(r.data.metrics["final_loss"]) and "total_steps" in r.data.params
    result = json.loads((wd / "runs/once/result.json").read_text())
    assert result["mlflow_run_id"] == runs[0].info.run_id  # the newest


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_keeps_its_final_loss(finished):
    """Killed between the last checkpoint and the export: the rerun trains nothing, exports,
    and its final_loss is the last trained step's (from the checkpoint), never NaN."""
    wd, path, cfg = finished
    ref = json.loads((wd / "runs/once/result.json").read_text())
    cut = wd / "runs/cut"
    shutil.copytree(wd / "runs/once/checkpoints", cut / "checkpoints")
    shutil.copy(wd / "runs/once/run_config.json", cut / "run_config.json")
    cut_cfg = wd / "cut.yaml"
    cut_cfg.write_text(yaml.safe_dump({**cfg, "name": "cut"}))
    proc = torchrun_worker(cut_cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((cut / "result.json").read_text())
    assert got["steps"] == ref["steps"] and got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-12)
    client, runs = _mlflow_runs(cfg["tracking"]["uri"], "rerun")
    run = next(r for r in runs if r.info.run_name == "cut")
    assert run.data.metrics["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-12)
