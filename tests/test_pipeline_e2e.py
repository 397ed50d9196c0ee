"""End to end on a tiny LLaMA with 2 CPU workers: Ray Train and the DeepSpeed launcher run the
same loop, produce the same adapter, and leave a complete MLflow run. The Ray run logs to a real
MLflow server through a URI with a password, which nothing shows or stores.

The Ray run and the launcher run use the same config and seed; their adapters must agree
(one training loop for every launcher), and stock PEFT must reproduce the trained model.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from proc_group import free_port, group_alive, make_tiny_model, run_group
from proc_group import child_env as _env
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e")
    make_tiny_model(wd / "model")
    return wd


def _config(workdir: Path, name: str, method: str = "dash") -> Path:
    cfg = yaml.safe_load((ROOT / "configs/tiny_cpu.yaml").read_text())
    cfg["name"] = name
    cfg["output_dir"] = str(workdir / "runs")
    cfg["model"]["path"] = str(workdir / "model")
    cfg["data"]["train"] = str(ROOT / "tests/data/tiny_train.json")
    # Two test sets, as the paper evaluates several tasks after one training run.
    tiny = str(ROOT / "tests/data/tiny_train.json")
    cfg["data"].update(test=[tiny, f"ARC-Easy={tiny}"], task="social_i_qa")
    cfg["train"].update(eval_limit=4, eval_num_beams=2, eval_max_new_tokens=6)
    cfg["method"]["method"] = method
    cfg["deepspeed"]["config"] = str(ROOT / "configs/deepspeed/zero3.json")
    cfg["tracking"]["uri"] = f"sqlite:///{workdir}/mlflow.db"
    cfg["tracking"]["experiment"] = "e2e"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd, timeout=600, **env):
    proc = run_group(cmd, cwd=ROOT, env=_env(**env), timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


SECRET = "pw-Zq81-s3cret"


@pytest.fixture(scope="module")
def server_with_password(tmp_path_factory):
    """A real `mlflow server` (launch/mlflow_server.sh) reached through a URI with user:password.
    The plain server accepts any credentials; the client still sends them (requests' basic
    auth from the URL), so this is the success path a password-protected server takes."""
    srv = tmp_path_factory.mktemp("srv")
    env = {**os.environ, "MLFLOW_DIR": str(srv), "PORT": str(free_port()), "PYTHON": sys.executable}
    script = str(ROOT / "launch" / "mlflow_server.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180)
    pid_file = srv / "mlflow_server.pid"
    try:
        assert started.returncode == 0, started.stderr
        plain = started.stdout.strip().splitlines()[-1]
        yield {"uri": plain.replace("http://", f"http://alice:{SECRET}@"), "dir": srv}
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=60)
        if pid_file.exists() and group_alive(int(pid_file.read_text())):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_run(workdir, server_with_password):
    """`tsd train` (Ray, 2 workers) logging to the server through a URI with a password, the
    adapter registered as a model version. Ray's session goes under a folder of this test's
    (scanned for the password), with Ray Train's state tracking (its dashboard's Train page;
    off by default) switched on and exported to files: the scan covers what Ray shows of
    train_loop_config."""
    cfg = _config(workdir, "ray-dash")
    data = yaml.safe_load(cfg.read_text())
    data["tracking"].update(uri=server_with_password["uri"], register_as="e2e-dash")
    cfg.write_text(yaml.safe_dump(data))
    ray_tmp = Path(tempfile.mkdtemp(prefix="tsdray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        # A build folder of its own (test_no_rank_compiles_deepspeeds_unused_comm_op)
        proc = _run([str(BIN / "tsd"), "train", str(cfg)], TORCH_EXTENSIONS_DIR=str(workdir / "ext-ray"),
                    RAY_TMPDIR=str(ray_tmp), RAY_TRAIN_ENABLE_STATE_TRACKING="1", RAY_enable_export_api_write="1")
        yield {"proc": proc, "dir": workdir / "runs/ray-dash", "uri": server_with_password["uri"],
               "ray_tmp": ray_tmp}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def launcher_run(workdir):
    """Through launch/deepspeed.sh with an override: --set must reach every rank (it once went to
    the deepspeed launcher, which refused it); the run's name, hence its folder, comes from it."""
    cfg = _config(workdir, "ds-dash-unset")
    proc = _run(["bash", "launch/deepspeed.sh", str(cfg), "--set", "name=ds-dash"],
                NPROC="2", MASTER_PORT="29533", DEEPSPEED=str(BIN / "deepspeed"),
                TORCH_EXTENSIONS_DIR=str(workdir / "ext-launcher"))
    assert not (workdir / "runs/ds-dash-unset").exists()
    return {"proc": proc, "dir": workdir / "runs/ds-dash"}


def _mlflow_runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    return client, client.search_runs([exp.experiment_id])


def test_ray_run_produces_one_complete_mlflow_run(workdir, ray_run):
    from pipeline.tracking.store import summarize_run

    client, runs = _mlflow_runs(ray_run["uri"])
    mine = [r for r in runs if r.info.run_name == "ray-dash"]
    assert len(mine) == 1, "the driver must create exactly one run; workers must not add more"
    s = summarize_run(ray_run["uri"], mine[0].info.run_id)
    assert s["status"] == "FINISHED"
    assert s["params"]["method.method"] == "dash" and s["params"]["method.num_directions"] == "3"
    assert s["tags"]["method"] == "dash" and s["tags"]["world_size"] == "2" and s["tags"]["launcher"] == "ray"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "switch_dash_seconds", "acc_social_i_qa"):
        assert key in s["metrics"], key
    history = client.get_metric_history(mine[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    arts = set(s["artifacts"])
    for a in ("directions/dash/directions.csv", "directions/dash/change_rates.png", "adapter/adapter_model.safetensors",
              "adapter/adapter_config.json", "adapter/tsd_state.safetensors", "config/deepspeed_config.json",
              "eval/predictions/social_i_qa.jsonl", "eval/metrics.json"):
        assert a in arts, a
    # The logged accuracy is the one of the saved predictions (evaluated sharded over 2 ranks).
    preds = [json.loads(l) for l in (ray_run["dir"] / "eval/predictions/social_i_qa.jsonl").read_text().splitlines()]
    assert len(preds) == 4
    assert s["metrics"]["acc_social_i_qa"] == pytest.approx(sum(p["correct"] for p in preds) / 4)
    arc = [json.loads(l) for l in (ray_run["dir"] / "eval/predictions/ARC-Easy.jsonl").read_text().splitlines()]
    assert len(arc) == 4 and s["metrics"]["acc_ARC-Easy"] == pytest.approx(sum(p["correct"] for p in arc) / 4)
    assert s["metrics"]["acc_avg"] == pytest.approx((s["metrics"]["acc_social_i_qa"] + s["metrics"]["acc_ARC-Easy"]) / 2)
    # tracking.register_as: version 1 of the registered model comes from this run, tagged on it.
    version = client.get_model_version("e2e-dash", "1")
    assert version.run_id == mine[0].info.run_id and s["tags"]["registered_model"] == "e2e-dash/1"
    # The logged direction table is the adapter's own selection.
    assert s["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server
    local = client.download_artifacts(mine[0].info.run_id, "directions/dash/directions.json", str(workdir / "dl"))
    rows = json.loads(Path(local).read_text())
    state = load_file(str(ray_run["dir"] / "adapter/tsd_state.safetensors"))
    cols = rows["columns"]
    first = [dict(zip(cols, r)) for r in rows["data"] if dict(zip(cols, r))["layer"] == "model.layers.0.self_attn.q_proj"]
    assert [r["index"] for r in first] == state["model.layers.0.self_attn.q_proj.dash_indices"].tolist()


def _files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_ray_run_never_shows_the_password(workdir, ray_run, server_with_password):
    """The Ray run logged through a URI with a password: stdout/stderr (driver, Ray's worker
    logs), the run folder, the MLflow store (params, tags, artifacts such as
    config/run_config.json) and Ray's own session files, Train state exports included, never
    contain it; the masked URI is what is shown and stored."""
    from pipeline.tracking import store

    proc, ray_tmp = ray_run["proc"], ray_run["ray_tmp"]
    shown = ray_run["uri"].replace(SECRET, "***")
    assert "[tsd driver] MLflow run" in proc.stderr and shown in proc.stderr
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    assert "step 5/5" in proc.stderr  # the workers' own log lines came through
    assert _files_containing(ray_run["dir"], SECRET) == []
    assert _files_containing(server_with_password["dir"], SECRET) == []
    assert list(ray_tmp.rglob("session_*/logs/*.log")), "Ray's session is not under RAY_TMPDIR: nothing scanned"
    exports = [p for p in ray_tmp.rglob("export_events/*") if p.is_file()]
    assert any(re.search(rb"train_?[lL]oop_?[cC]onfig", p.read_bytes()) for p in exports), \
        f"Ray exported no train run (train_loop_config): {[(p.name, p.stat().st_size) for p in exports]}"
    assert _files_containing(ray_tmp, SECRET) == []
    client = store.client(ray_run["uri"])
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
              if r.info.run_name == "ray-dash"]
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == shown
    local = Path(client.download_artifacts(run.info.run_id, "config", str(workdir / "dl-config")))
    assert shown in (local / "run_config.json").read_text()


def test_tracking_api_never_shows_the_password(server_with_password, tmp_path, capfd):
    """start_run / RunLogger / end_run against the server: nothing printed, logged or stored has
    the password (MLflow itself prints "View run ... at: <URI>" when a run ends)."""
    from pipeline.tracking.logger import RunLogger
    from pipeline.tracking.store import end_run, start_run, summarize_run

    uri = server_with_password["uri"]
    run_id = start_run(uri, "masked", "r", tags={"method": "dash"}, params={"tracking": {"uri": uri}})
    with RunLogger(uri, run_id, staging_dir=tmp_path / "stage") as logger:
        logger.log_metrics({"loss": 0.5}, step=1)
        logger.log_dict({"tracking": {"uri": uri}}, "config/run_config.json")
    end_run(uri, run_id)
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    s = summarize_run(uri, run_id)
    assert s["status"] == "FINISHED" and s["params"]["tracking.uri"] == uri.replace(SECRET, "***")
    assert SECRET not in json.dumps(s)
    assert _files_containing(server_with_password["dir"], SECRET) == []


def test_ray_driver_shows_each_worker_line_once_and_no_dependency_warnings(ray_run):
    """Ray Train echoed every worker line twice (its print patch + the streamed stderr), and
    torch.distributed's FutureWarning came with every ZeRO-3 collective."""
    out = ray_run["proc"].stdout + ray_run["proc"].stderr
    written = [line for line in out.splitlines() if "[tsd rank 0] adapter written to" in line]
    assert len(written) == 1, written
    steps = [line for line in out.splitlines() if "[tsd rank 0] step 3/5 " in line]
    assert len(steps) == 1, steps
    assert "FutureWarning" not in out and "[tsd rank 1] step" not in out
    assert "[tsd driver] MLflow run" in out


def test_adapter_loads_in_stock_peft_and_matches_tsd_import(workdir, ray_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tsd

    adapter = ray_run["dir"] / "adapter"
    state = load_file(str(adapter / "tsd_state.safetensors"))
    scalars = [v for k, v in state.items() if k.endswith("dash_scalars")]
    assert scalars and all(int(v) >= 0 for k, v in state.items() if k.endswith("dash_step"))
    assert any(s.abs().sum() > 0 for s in scalars), "dash scalars never trained"
    x = torch.randint(4, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32)
    tsd.load_adapter(ours, adapter)
    base = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(input_ids=x).logits, ours.eval()(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)


def test_deepspeed_launcher_runs_the_same_loop_to_the_same_adapter(workdir, ray_run, launcher_run):
    a = load_file(str(ray_run["dir"] / "adapter/tsd_state.safetensors"))
    b = load_file(str(launcher_run["dir"] / "adapter/tsd_state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    _, runs = _mlflow_runs(f"sqlite:///{workdir}/mlflow.db")
    ds = [r for r in runs if r.info.run_name == "ds-dash"]
    assert len(ds) == 1 and ds[0].info.status == "FINISHED"
    assert ds[0].data.tags["launcher"] == "deepspeed"


def test_no_rank_compiles_deepspeeds_unused_comm_op(workdir, ray_run, launcher_run):
    """DeepSpeed compiles its CPU shared-memory all-reduce when its comm backend starts (35-90 s
    of every core at a venv's first launch), yet only its inference layers use it: every rank
    marks it unavailable first. Both runs had an empty build folder of their own; it stays so."""
    for run, folder in ((ray_run, "ext-ray"), (launcher_run, "ext-launcher")):
        out = run["proc"].stdout + run["proc"].stderr
        assert "deepspeed_shm_comm" not in out, folder
        assert not (workdir / folder).exists() or not any((workdir / folder).iterdir()), folder


def test_partitioned_evaluation_predicts_what_the_whole_copy_predicts(workdir, launcher_run):
    """train.eval_model auto with a per-rank budget smaller than the model: the evaluation runs
    on the ZeRO-3 model itself (synced generation) and predicts exactly what the launcher run's
    whole copies predicted for the same rows (same config and seed, hence the same adapter;
    there auto chose the whole copy, as the tiny model fits). Its two test sets are the first 3
    rows (an odd count: rank 1 runs one padding call) and the first row alone (rank 1 has no
    row at all and only pads): a rank that skipped its padding calls would hang the others."""
    from proc_group import torchrun_worker

    rows = json.loads((ROOT / "tests/data/tiny_train.json").read_text())
    sizes = {"social_i_qa": 3, "ARC-Easy": 1}
    for task, n in sizes.items():
        (workdir / f"first{n}.json").write_text(json.dumps(rows[:n]))
    path = _config(workdir, "tr-dash-partitioned")
    cfg = yaml.safe_load(path.read_text())
    cfg["workers"].update(memory_budget_gb=1e-6)
    cfg["data"]["test"] = [str(workdir / "first3.json"), f"ARC-Easy={workdir / 'first1.json'}"]
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun_worker(path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "with the partitioned model (the whole model" in proc.stderr and "does not fit" in proc.stderr
    assert "with the whole model (the whole model" in launcher_run["proc"].stdout + launcher_run["proc"].stderr
    for task, n in sizes.items():
        whole = (launcher_run["dir"] / f"eval/predictions/{task}.jsonl").read_text().splitlines()
        part = (workdir / f"runs/tr-dash-partitioned/eval/predictions/{task}.jsonl").read_text().splitlines()
        assert len(whole) == 4 and part == whole[:n]


def test_bad_config_is_a_clear_error_without_traceback(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text("name: x\nmethod:\n  rank: 8\n")
    proc = subprocess.run([str(BIN / "tsd"), "train", str(bad)], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "method.rank: unknown key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI missing")
def test_ray_job_submit_against_a_local_head_node(workdir, tmp_path):
    """`launch/ray_submit.sh` against a head node started here (token auth, loopback). The job
    runs offline (tracking.offline, its URI pointing at nothing): it trains without the tracking
    server, with its metrics in the log only, and makes no MLflow run."""
    cfg = _config(workdir, "job-dash")
    data = yaml.safe_load(cfg.read_text())
    data["tracking"].update(uri=f"http://127.0.0.1:{free_port()}", offline=True)
    cfg.write_text(yaml.safe_dump(data))
    env = _env(RAY_AUTH_MODE="token", HOME=str(tmp_path))  # the token goes to $HOME/.ray/auth_token
    ray = str(BIN / "ray")
    port = str(free_port())
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    gen = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert (tmp_path / ".ray/auth_token").is_file()
    # Every port of its own: another Ray on the machine (a user's run) holds the defaults, and a
    # head whose job agent cannot bind answers "No available agent" to every submission.
    ports = [str(free_port()) for _ in range(7)]
    start = subprocess.run(
        [ray, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", port, "--include-dashboard", "true", "--disable-usage-stats",
         "--temp-dir", ray_tmp, "--port", ports[0], "--dashboard-agent-listen-port", ports[1],
         "--dashboard-agent-grpc-port", ports[2], "--runtime-env-agent-port", ports[3],
         "--metrics-export-port", ports[4], "--node-manager-port", ports[5], "--object-manager-port", ports[6],
         "--ray-client-server-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        # The head answers before its job agent is up ("No available agent to submit job"):
        # wait until the job API lists jobs, as a person would before submitting.
        for _ in range(60):
            ready = subprocess.run([ray, "job", "list", "--address", f"http://127.0.0.1:{port}"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if ready.returncode == 0:
                break
            time.sleep(2)
        # Even then the submission can meet "No available agent to submit job, please try again
        # later" on a loaded machine; nothing was submitted in that case, so submit again.
        for _ in range(30):
            proc = subprocess.run(
                ["bash", "launch/ray_submit.sh", str(cfg)], cwd=ROOT,
                env={**env, "RAY_ADDRESS": f"http://127.0.0.1:{port}", "RAY": ray},
                capture_output=True, text=True, timeout=600,
            )
            if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr + proc.stdout:
                break
            time.sleep(3)
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert "succeeded" in proc.stdout.lower()
        assert (workdir / "runs/job-dash/adapter/adapter_model.safetensors").is_file()
        assert "step 5/5 loss" in proc.stdout  # the job's log: metrics only there
        assert "MLflow run" not in proc.stdout + proc.stderr
    finally:
        _stop_processes_using(ray_tmp)  # not `ray stop`: it kills every Ray on the machine
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_processes_using(marker: str, grace_s: float = 20.0) -> None:
    """Stop the processes this test's head started (their command lines name its temp dir),
    SIGTERM first, then SIGKILL; any other Ray on the machine is left alone."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in mine:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
