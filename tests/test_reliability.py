"""Reliability with 2 ranks: a corrupt or incomplete latest checkpoint falls back to the newest
whole older one (and still ends with the uninterrupted adapter); a worker killed under Ray Train
is restarted and resumes in the same MLflow run; an unreachable tracking server fails fast."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from proc_group import PicklePayload, free_port, lora_tsd_run, make_tiny_model, run_group, tiny_config, torchrun_worker
from proc_group import child_env as _env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _worker(cfg: Path):
    proc = torchrun_worker(cfg)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _base_config(wd: Path, name: str) -> dict:
    return tiny_config(wd / "model", wd / "runs", name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("reliability")
    make_tiny_model(wd / "model")
    return wd


@pytest.fixture(scope="module")
def full_run(workdir, tmp_path_factory):
    """The suite's uninterrupted LoRA-TSD run (proc_group.lora_tsd_run: switches at steps 2 and 4,
    a checkpoint every step): its folder, and its config for this file's resumes (offline, their
    runs under workdir/runs)."""
    shared, cfg = lora_tsd_run(tmp_path_factory)
    cfg = {**cfg, "output_dir": str(workdir / "runs"), "tracking": {**cfg["tracking"], "offline": True}}
    return {"dir": shared / "runs/full", "cfg": cfg}


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


# One way a tag can be broken per tag, newest first: `latest` names step5, and each of step5..step2
# is broken differently, so one resume must walk past all four to step1 (one 2-rank launch for
# four corruptions; each is named by the rank that finds it). The check line each one gives.
CORRUPTIONS = {
    "step5": (lambda tag: shutil.rmtree(tag), "{tag} does not exist"),
    "step4": (lambda tag: _truncate(tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"),
              "{tag}/zero_pp_rank_1_mp_rank_00_model_states.pt is empty or truncated"),
    "step3": (lambda tag: (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
              "{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
    "step2": (lambda tag: (tag / "rng_rank0.safetensors").write_bytes(b""),
              "{tag}/rng_rank0.safetensors is empty or truncated"),
}


def test_corrupt_latest_checkpoint_falls_back_past_every_broken_tag(workdir, full_run):
    """A crash that left `latest` -> step5 with step5 gone, step4's rank-1 model states truncated,
    step3's rank-0 optimizer states deleted and step2's rank-0 RNG file empty: every rank resumes
    from step1, the newest whole tag, and ends with the uninterrupted run's adapter (through both
    switches again, at steps 2 and 4): also tests/test_resume.py's resume before the switches."""
    name = "corrupt"
    ckpt = workdir / "runs" / name / "checkpoints"
    shutil.copytree(full_run["dir"] / "checkpoints", ckpt)
    shutil.rmtree(ckpt / "step6")
    (ckpt / "latest").write_text("step5")
    for tag, (corrupt, _) in CORRUPTIONS.items():
        corrupt(ckpt / tag)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**full_run["cfg"], "name": name}))
    proc = _worker(path)
    for tag, (_, line) in CORRUPTIONS.items():
        assert "checkpoint check: " + line.format(tag=ckpt / tag) in proc.stderr, (tag, proc.stderr[-6000:])
    assert f"the latest checkpoint 'step5' in {ckpt} is incomplete or corrupt" in proc.stderr
    assert "resuming from the newest whole older checkpoint 'step1' instead" in proc.stderr
    assert "at optimizer step 1" in proc.stderr
    want = load_file(str(full_run["dir"] / "adapter/tsd_state.safetensors"))
    got = load_file(str(workdir / "runs" / name / "adapter/tsd_state.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_latest_naming_a_path_resumes_from_this_runs_newest_tag(workdir, full_run):
    """`latest` holding `../x` (issue 25 item 4): a whole later tag planted at `<run>/x` is never
    loaded; both ranks resume from the run's own newest whole tag (step4) and end with the
    uninterrupted run's adapter: also tests/test_resume.py's resume after both switches."""
    name = "latest-path"
    run = workdir / "runs" / name
    ckpt = run / "checkpoints"
    shutil.copytree(full_run["dir"] / "checkpoints", ckpt)
    shutil.move(ckpt / "step6", run / "x")  # whole, and newer: loading it would skip steps 5 and 6
    shutil.rmtree(ckpt / "step5")
    (ckpt / "latest").write_text("../x")
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**full_run["cfg"], "name": name}))
    proc = _worker(path)
    assert f"{ckpt / 'latest'} holds '../x', which is not a checkpoint tag of this run" in proc.stderr
    assert "resuming from the newest whole checkpoint 'step4' instead" in proc.stderr
    assert "at optimizer step 4" in proc.stderr
    want = load_file(str(full_run["dir"] / "adapter/tsd_state.safetensors"))
    got = load_file(str(run / "adapter/tsd_state.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_resume_never_unpickles_a_planted_checkpoint(workdir, full_run):
    """The latest checkpoint's optimizer file carries a pickled payload (a whole, valid file):
    the resume refuses it by name and the payload never runs."""
    name = "planted"
    ckpt = workdir / "runs" / name / "checkpoints"
    shutil.copytree(full_run["dir"] / "checkpoints", ckpt)
    for later in (5, 6):
        shutil.rmtree(ckpt / f"step{later}")
    (ckpt / "latest").write_text("step4")
    victim = ckpt / "step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(victim, weights_only=False)  # the test's own trusted file
    marker = workdir / "payload-ran"
    state["planted"] = PicklePayload(str(marker))
    torch.save(state, victim)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**full_run["cfg"], "name": name}))
    proc = torchrun_worker(path)
    assert proc.returncode != 0
    assert f"{victim}: refused by the weights-only load" in proc.stderr + proc.stdout
    assert "GLOBAL" in proc.stderr + proc.stdout and "os.makedirs" in proc.stderr + proc.stdout
    assert not marker.exists()
    assert not (workdir / "runs" / name / "adapter").exists()


def test_latest_names_a_checkpoint_only_once_every_rank_has_written_it(workdir, tmp_path):
    """`latest` must never name a tag some rank is still writing (a rank killed then would leave
    a resume pointing at a partial checkpoint). Rank 1 here writes 1 s late and looks at
    `latest` before and during each of its writes."""
    import json

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/checkpoint_latest.py"), str(workdir / "model"), str(tmp_path)]
    proc = run_group(cmd, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    seen = json.loads((tmp_path / "seen_rank1.json").read_text())
    assert len(seen["latest_before_each_write"]) >= 2  # model states and optimizer states
    assert all(v is None for v in seen["latest_before_each_write"]), seen
    assert seen["problem"] is None and seen["latest_after"] == "step1"


def _ray_workers(root_pid: int) -> list:
    """RayTrainWorker actor processes started under the test's own `tsd train` process."""
    import psutil

    found = []
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in kids:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) or "RayTrainWorker" in p.name():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_killed_ray_worker_is_restarted_and_resumes_in_the_same_mlflow_run(workdir):
    import mlflow

    cfg = _base_config(workdir, "ray-restart")
    cfg["train"].update(max_steps=30, checkpoint_every=1)
    cfg["workers"]["max_failures"] = 1
    cfg["tracking"].update(uri=f"sqlite:///{workdir}/restart-mlflow.db", experiment="restart")
    path = workdir / "ray-restart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    latest = workdir / "runs/ray-restart/checkpoints/latest"
    proc = subprocess.Popen([str(BIN / "tsd"), "train", str(path)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed: list[int] = []

    def watch():  # SIGKILL one training worker right after the first checkpoint is complete
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file():
                workers = _ray_workers(proc.pid)
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=550)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-3000:]}\n{err[-6000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    watcher.join(5)
    assert killed, f"no RayTrainWorker process was found to kill:\n{err[-4000:]}"
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-8000:]}"
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/restart-mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
    assert len(runs) == 1, "a restart must continue the driver's run, not add one"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert int(run.data.tags.get("restarts", 0)) >= 1, f"no restart recorded (killed {killed}):\n{err[-8000:]}"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "restarts")][:1] == [1.0]
    assert "resumed from" in err
    assert (workdir / "runs/ray-restart/adapter/adapter_model.safetensors").is_file()
    assert (workdir / "runs/ray-restart/adapter/tsd_state.safetensors").is_file()


def test_unreachable_tracking_server_fails_fast_with_the_uri_masked(workdir):
    port = free_port()
    cfg = _base_config(workdir, "no-tracking")
    cfg["tracking"]["uri"] = f"http://alice:s3cret@127.0.0.1:{port}"
    path = workdir / "no-tracking.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for argv in ([str(BIN / "tsd"), "train", str(path)], [sys.executable, "-m", "pipeline.launch.worker", str(path)]):
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert f"the MLflow tracking server http://alice:***@127.0.0.1:{port} is not reachable" in proc.stderr
        assert "tracking.offline: true" in proc.stderr and "s3cret" not in proc.stderr
        assert time.monotonic() - t0 < 120  # fast: no minutes of MLflow retries
    assert not (workdir / "runs/no-tracking").exists()


def _server(env: dict, action: str) -> str:
    proc = subprocess.run([str(ROOT / "launch/mlflow_server.sh"), action], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def test_tracking_server_going_away_mid_run_loses_no_metric(workdir):
    """The server dies after step 2 and comes back from step 5 on (same store): training never
    stops, and every step's loss, the switch's direction table (step 4, server down) and the
    adapter reach the one run."""
    import mlflow

    srv = workdir / "srv-outage"
    env = {**os.environ, "MLFLOW_DIR": str(srv), "PORT": str(free_port()), "PYTHON": sys.executable}
    uri = _server(env, "start")
    cfg = _base_config(workdir, "outage")
    cfg["method"].update(method="dash", switch_step=4)
    cfg["train"].update(max_steps=20)
    cfg["tracking"].update(uri=uri, experiment="outage")
    path = workdir / "outage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.launch.worker", str(path)]
    log = (workdir / "outage.log").open("w")
    train = subprocess.Popen(cmd, cwd=ROOT, env=_env(TSD_INJECT_STEP_DELAY_S="2"), stdout=log,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def wait_for(text: str, timeout: float = 300):
            t0 = time.monotonic()
            while text not in (workdir / "outage.log").read_text():
                assert train.poll() is None, f"training ended before {text!r}:\n{(workdir / 'outage.log').read_text()[-4000:]}"
                assert time.monotonic() - t0 < timeout, f"no {text!r} in {timeout}s"
                time.sleep(0.2)

        wait_for("step 2/20")
        _server(env, "stop")  # the switch (step 4) happens with no server
        wait_for("step 5/20")
        assert _server(env, "start") == uri
        assert train.wait(timeout=300) == 0, (workdir / "outage.log").read_text()[-4000:]
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
        log.close()
        _server(env, "stop")
    out = (workdir / "outage.log").read_text()
    assert "MLflow is not reachable" in out and "training continues" in out
    assert re.search(r"MLflow reachable again after \d+ s; buffered data sent", out)
    assert (workdir / "runs/outage/adapter/tsd_state.safetensors").is_file()  # written locally first
    _server(env, "start")
    try:
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 21))
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "directions/dash")}
        assert "directions/dash/directions.csv" in arts
        assert any(a.path == "adapter/tsd_state.safetensors" for a in client.list_artifacts(run.info.run_id, "adapter"))
    finally:
        _server(env, "stop")
