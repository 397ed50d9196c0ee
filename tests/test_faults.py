"""Numerical faults with 2 ranks: a NaN gradient behind a finite loss stops the run cleanly (last
good checkpoint kept, no adapter that looks complete, MLflow run FAILED). A NaN loss does the
same: tests/test_resume.py's crashed run is stopped by one at step 7, checked there before its
rerun resumes it."""

import re
from pathlib import Path

import pytest
from proc_group import make_tiny_model, tiny_config, torchrun_worker
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "model")


def _run(tmp_path, model_dir, mode, fault="TSD_INJECT_NAN_AT_STEP"):
    cfg = tiny_config(model_dir, tmp_path / "runs", f"nan-{mode}")
    cfg["train"].update(checkpoint_every=1)
    cfg["tracking"].update(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="faults")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun_worker(path, **{fault: "3"})
    return proc, tmp_path / "runs" / f"nan-{mode}"


def _run_status(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_nan_gradient_with_a_finite_loss_stops_before_saving_the_step(tmp_path, model_dir):
    proc, run_dir = _run(tmp_path, model_dir, "grad", fault="TSD_INJECT_NAN_GRAD_AT_STEP")
    assert proc.returncode != 0
    # DeepSpeed's global norm reports a NaN gradient as inf
    assert re.search(r"non-finite gradient norm \((nan|inf)\) at optimizer step 3 with a finite loss", proc.stderr)
    assert "The last good checkpoint (step2" in proc.stderr
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step2"
    assert not (run_dir / "checkpoints/step3").exists()
    assert not (run_dir / "adapter").exists()
    assert _run_status(tmp_path).info.status == "FAILED"
