"""A failure on one rank ends the whole job promptly, under every launcher, with that rank's message.

Rank 1 raises in the middle of the switch (TSD_INJECT_FAIL_IN_SWITCH_RANK) while rank 0 is still
busy with its own SVD (TSD_INJECT_SWITCH_PEER_DELAY_S, far longer than the bound), i.e. not in a
collective that could notice rank 1 is gone. The job must end within BOUND_S of the failure (gloo
alone would wait up to its 30 min timeout), exit non-zero, say that rank 1 failed and why, close
the MLflow run as FAILED and leave no adapter."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from proc_group import child_env, free_port, make_tiny_model, tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BOUND_S = 120  # from the failure to the end of the job: generous for a loaded 2-core machine
PEER_BUSY_S = "900"  # rank 0's stand-in for a long SVD, far beyond the bound
INJECTED = "injected failure in the switch on rank 1 (TSD_INJECT_FAIL_IN_SWITCH_RANK)"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rank-failure") / "model")


def _config(tmp_path: Path, model_dir: Path, name: str) -> Path:
    cfg = tiny_config(model_dir, tmp_path / "runs", name)
    cfg["tracking"].update(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="rank-failure")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_failing_job(cmd: list[str], overall_s: float = 600) -> tuple[int, str, float]:
    """Run `cmd` (its own process group) with rank 1 failing in the switch; returns the exit code,
    the output and the seconds from the failure's first appearance to the end of the job. Fails
    the test (after killing the group) if the job outlives the failure by BOUND_S."""
    env = child_env(TSD_INJECT_FAIL_IN_SWITCH_RANK="1", TSD_INJECT_SWITCH_PEER_DELAY_S=PEER_BUSY_S)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    failed_at: list[float] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if INJECTED in line and not failed_at:
                failed_at.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            now = time.monotonic()
            late = failed_at and now - failed_at[0] > BOUND_S
            if late or now - t0 > overall_s:
                what = f"still running {BOUND_S}s after rank 1 failed" if late else f"no end in {overall_s}s"
                raise AssertionError(f"{cmd[:3]}...: {what}:\n{''.join(lines)[-8000:]}")
            time.sleep(0.2)
        ended = time.monotonic()
    finally:
        try:  # ranks, launchers or Ray processes left behind: this group's only
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reader.join(10)
    out = "".join(lines)
    assert failed_at, f"the injected failure never happened:\n{out[-6000:]}"
    return proc.returncode, out, ended - failed_at[0]


def _mlflow_status(tmp_path: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rank-failure").experiment_id])
    assert len(runs) == 1
    return runs[0].info.status


def _check_common(tmp_path: Path, name: str, rc: int, out: str) -> None:
    assert rc != 0, out[-6000:]
    assert f"RuntimeError: {INJECTED}" in out
    assert _mlflow_status(tmp_path) == "FAILED"
    assert not (tmp_path / "runs" / name / "adapter").exists(), "a failed job must not leave an adapter"


def _check_bare_launcher(out: str) -> None:
    """Under torchrun and the DeepSpeed launcher every rank says which rank failed and why."""
    line = f"rank 1 of 2 ({os.uname().nodename}) failed: RuntimeError: {INJECTED}"
    assert f"[tsd rank 1] error: {line}; stopping the job" in out, out[-6000:]
    assert f"[tsd rank 0] stopping: {line}" in out, out[-6000:]
    assert "Connection closed by peer" not in out  # rank 0 left on rank 1's word, not on a broken socket


def test_torchrun_ends_the_job_when_rank_1_fails_in_the_switch(tmp_path, model_dir):
    cfg = _config(tmp_path, model_dir, "torchrun-fail")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.launch.worker", str(cfg)]
    rc, out, seconds = _run_failing_job(cmd)
    _check_common(tmp_path, "torchrun-fail", rc, out)
    _check_bare_launcher(out)
    # torchrun's own summary names rank 1 as the root cause, with its error.
    root = out.split("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 1 (local_rank: 1)" in root and INJECTED in root, out[-4000:]
    print(f"torchrun: job ended {seconds:.1f}s after rank 1 failed")


def test_deepspeed_launcher_ends_the_job_when_rank_1_fails_in_the_switch(tmp_path, model_dir):
    cfg = _config(tmp_path, model_dir, "deepspeed-fail")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "pipeline.launch.worker", str(cfg)]
    rc, out, seconds = _run_failing_job(cmd)
    _check_common(tmp_path, "deepspeed-fail", rc, out)
    _check_bare_launcher(out)
    print(f"deepspeed: job ended {seconds:.1f}s after rank 1 failed")


def test_ray_train_ends_the_job_when_rank_1_fails_in_the_switch(tmp_path, model_dir):
    cfg = _config(tmp_path, model_dir, "ray-fail")
    rc, out, seconds = _run_failing_job([str(BIN / "tsd"), "train", str(cfg)])
    _check_common(tmp_path, "ray-fail", rc, out)
    # Ray Train's controller reports the failed rank with its error; the driver marks the run FAILED.
    assert "[Rank 1 Error Snippet]" in out, out[-6000:]
    print(f"ray: job ended {seconds:.1f}s after rank 1 failed")


# ----------------------------------------------------------------------------- a failure every rank reaches
# One rank's process with the process group and its store stood in for (no launcher): rank 1 of 2,
# whose peer (rank 0) has just published a failure in the store. argv: the delay before this
# rank's own main thread reports the same error (end_job), or "none": it never does.
_RANK_1 = """
import sys, threading, time
import torch.distributed as dist
from pipeline.training import rank_failure

class Store:
    def __init__(self):
        self.d = {"tsd/failure/attempt0/first": b"1\\trank 0 of 2 (h) failed: ValueError: the same check",
                  "tsd/failure/attempt0/count": 1}
    def check(self, keys):
        return all(k in self.d for k in keys)
    def get(self, k):
        return self.d[k]
    def set(self, k, v):
        self.d[k] = v
    def add(self, k, n):
        self.d[k] = self.d.get(k, 0) + n
        return self.d[k]

dist.is_available = lambda: True
dist.is_initialized = lambda: True
dist.get_rank = lambda: 1
rank_failure.rank_and_world = lambda: (1, 2)
store = Store()
rank_failure._store = lambda: store
rank_failure.watch()
if sys.argv[1] == "none":
    time.sleep(30)
time.sleep(float(sys.argv[1]))
rank_failure.end_job(ValueError("the same check"), code=2, logged=True)
"""


@pytest.mark.parametrize("own_report_after_s, code", [("0.6", 2), ("none", 1)])
def test_a_rank_failing_the_same_check_a_moment_after_its_peer_exits_with_its_own_code(own_report_after_s, code):
    """The peer's failure is in the store before this rank's main thread reports its own (0.6 s
    later: three of the watcher's polls, as a loaded machine delays one rank). The watcher lets it:
    the rank exits 2 with its own error, not 1 on the peer's word. A rank with nothing to report
    (blocked elsewhere) still leaves on the peer's word, with 1."""
    proc = subprocess.run([sys.executable, "-c", _RANK_1, own_report_after_s], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 1:
        assert "stopping: rank 0 of 2 (h) failed: ValueError: the same check" in proc.stderr


def test_a_leaving_rank_keeps_its_exit_code_when_the_launcher_terminates_it():
    """end_job's rank waits for its peers' acknowledgements; the launcher's SIGTERM in that wait
    (it terminates the ranks left once one has exited) must leave its code, 2, not -15."""
    script = """
import os, signal, sys, threading, time
from pipeline.training import rank_failure
rank_failure._keep_exit_code_on_sigterm(2)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
time.sleep(30)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
