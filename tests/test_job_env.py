"""Secrets never in a Ray job's runtime environment (issue 25 item 5): launch/ray_submit.sh refuses
a JOB_ENV that carries one before anything is submitted; the job reads them from $TSD_ENV_FILE."""

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.launch.job_env import check_job_env, load_env_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job_env, key", [
    ('{"MLFLOW_TRACKING_PASSWORD": "hunter2"}', "MLFLOW_TRACKING_PASSWORD"),
    ('{"HF_TOKEN": "hf_abc"}', "HF_TOKEN"),
    ('{"MLFLOW_TRACKING_URI": "http://me:hunter2@10.0.0.1:5000"}', "MLFLOW_TRACKING_URI"),
])
def test_ray_submit_refuses_a_secret_in_the_jobs_environment(job_env, key):
    """Refused before `ray job submit` runs (RAY points nowhere: reaching it would fail otherwise)."""
    proc = subprocess.run(["bash", "launch/ray_submit.sh", "configs/demo.yaml"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "JOB_ENV": job_env, "RAY": "/nonexistent/ray"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]  # one line
    assert f"JOB_ENV: {key} carries a secret" in proc.stderr and "TSD_ENV_FILE" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_plain_settings_and_the_secrets_files_path_pass():
    assert check_job_env('{"HF_HOME": "/shared/hf", "TSD_ENV_FILE": "/shared/secrets.env"}')["HF_HOME"] == "/shared/hf"
    assert check_job_env("") == {}
    with pytest.raises(ValueError, match="JOB_ENV is not valid JSON"):
        check_job_env("{HF_HOME: x}")


def test_the_job_reads_its_secrets_from_the_file_the_environment_names(tmp_path, monkeypatch):
    f = tmp_path / "secrets.env"
    f.write_text("# tracking server credentials\nexport MLFLOW_TRACKING_PASSWORD='hunter2'\n\nTSD_TEST_ALREADY=file\n")
    monkeypatch.setenv("TSD_ENV_FILE", str(f))
    monkeypatch.setenv("TSD_TEST_ALREADY", "env")  # the environment wins
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert load_env_file() == ["MLFLOW_TRACKING_PASSWORD"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2" and os.environ["TSD_TEST_ALREADY"] == "env"
    f.write_text("NOT A LINE\n")
    with pytest.raises(ValueError, match=r"secrets.env:1: expected KEY=VALUE"):
        load_env_file()
    with pytest.raises(FileNotFoundError, match="must exist at that path on every node"):
        load_env_file(str(tmp_path / "missing.env"))


def test_ray_workers_get_the_files_path_not_its_values(monkeypatch):
    """The driver hands the workers the path in their runtime env; each worker reads the file."""
    import ray

    from pipeline.config import load_config
    from pipeline.launch import driver

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("TSD_ENV_FILE", "/shared/secrets.env")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    driver._connect(load_config(str(ROOT / "configs/demo.yaml")))
    env = seen["runtime_env"]["env_vars"]
    assert env["TSD_ENV_FILE"] == "/shared/secrets.env" and "hunter2" not in str(seen)
