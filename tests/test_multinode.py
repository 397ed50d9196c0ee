"""Two nodes for real: a Ray cluster, torchrun and the DeepSpeed launcher (pdsh over ssh, an sshd in
each namespace) across two network namespaces (tests/netns_cluster.py).

The head namespace runs `ray start --head`, the MLflow server (launch/mlflow_server.sh) and
rank 0 of torchrun; the node namespace runs `ray start --address` and the other rank. Each
result is checked against the same config trained on one node (torchrun --standalone): the
adapters must agree to 1e-6. Storage is shared the way a cluster shares a disk (one folder all
namespaces see); one test hides it from the node and expects a clear refusal.

Where namespaces cannot be made (no root), those tests skip with the reason and the last test
runs instead: a Ray job on `ray.cluster_utils.Cluster`, two raylets on one address
(TSD_FORCE_RAYLET_FALLBACK=1 runs it anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netns_cluster import TwoHosts
from proc_group import BIN, ROOT, child_env, make_tiny_model, run_group, tiny_config
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
RAY = str(BIN / "ray")
STEPS = 10


@pytest.fixture(scope="module")
def net():
    why = TwoHosts.available()
    if why is not None:
        pytest.skip(f"multi-node tests need network namespaces (ip netns): {why}")
    with TwoHosts() as hosts:
        yield hosts


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The cluster's shared storage: model, data copy, configs, run outputs, the MLflow store."""
    wd = tmp_path_factory.mktemp("multinode")
    make_tiny_model(wd / "model")
    (wd / "home").mkdir()
    return wd


def _config(shared: Path, name: str, **train) -> Path:
    cfg = tiny_config(shared / "model", shared / "runs", name)
    # LoRA-TSD: both switches (LoRA-Init at step 2, the dash at step 4) happen on two nodes too
    cfg["method"].update(method="tsd", switch_step=2)
    # 10 steps: the node-kill test needs its first checkpoint well before the end, and one
    # reference serves every test
    cfg["train"].update({"max_steps": STEPS, **train})
    cfg["workers"].update(num_workers=2, cpus_per_worker=1, placement_strategy="STRICT_SPREAD")
    cfg["tracking"].update(offline=True)
    path = shared / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _with_tracking(path: Path, uri: str, experiment: str) -> Path:
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"].update(offline=False, uri=uri, experiment=experiment)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_node(shared: Path, name: str, **train) -> Path:
    """The same config trained by 2 ranks on one node (the reference)."""
    cfg = _config(shared, name, **train)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.launch.worker", str(cfg)]
    proc = run_group(cmd, cwd=ROOT, env=child_env(), timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return shared / "runs" / name / "adapter"


def _assert_same_adapter(got: Path, want: Path) -> None:
    for name in ("adapter_model.safetensors", "tsd_state.safetensors"):
        a, b = load_file(str(got / name)), load_file(str(want / name))
        assert a.keys() == b.keys()
        for k in a:
            diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
            assert diff <= 1e-6, f"{name}:{k} differs by {diff}"


@pytest.fixture(scope="module")
def reference(shared):
    return _one_node(shared, "one-node")


def _env(shared: Path, **extra) -> dict:
    # The Ray token lives in $HOME/.ray/auth_token: one HOME for both "hosts", as a user copies it.
    return child_env(RAY_AUTH_MODE="token", HOME=str(shared / "home"), **extra)


@pytest.fixture(scope="module")
def cluster(net, shared):
    """Ray head + MLflow server on the head host, a Ray worker node on the other; 1 CPU each."""
    env = _env(shared)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    head, node = net.address("head"), net.address("node")
    t0 = time.perf_counter()
    net.check("head", [RAY, "start", "--head", f"--node-ip-address={head}", "--port=6379", "--num-cpus=1",
                       f"--dashboard-host={head}", "--include-dashboard=true", "--disable-usage-stats",
                       f"--temp-dir=/tmp/tsdr{os.getpid()}h"], env=env, timeout=180)
    net.check("node", _worker_node_start(head, node), env=env, timeout=180)
    mlflow_dir = shared / "mlflow"
    net.check("head", ["bash", str(ROOT / "launch/mlflow_server.sh"), "start"], timeout=180,
              env={**env, "MLFLOW_DIR": str(mlflow_dir), "HOST": head, "PORT": "5000"})
    _wait_for_job_api(net, env, f"http://{head}:8265")
    print(f"[multinode] two-node Ray cluster + MLflow server up in {time.perf_counter() - t0:.1f}s "
          f"(head {head}, node {node})")
    return {"env": env, "dashboard": f"http://{head}:8265", "mlflow": f"http://{head}:5000",
            "store": f"sqlite:///{mlflow_dir}/mlflow.db", "artifacts": mlflow_dir / "mlartifacts"}


def _worker_node_start(head: str, node: str) -> list[str]:
    return [RAY, "start", f"--address={head}:6379", f"--node-ip-address={node}", "--num-cpus=1",
            "--disable-usage-stats", f"--temp-dir=/tmp/tsdr{os.getpid()}n"]


def _wait_for_job_api(net: TwoHosts, env: dict, dashboard: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(net.command("head", [RAY, "job", "list", "--address", dashboard]), env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the job API at {dashboard} did not answer:\n{probe.stderr[-2000:]}")
        time.sleep(2)


def _submit(net: TwoHosts, cluster: dict, cfg: Path, timeout: float = 600, **env) -> str:
    """launch/ray_submit.sh from the head host, as a user would; retried only while the job agent
    says it is not up yet (nothing was submitted then)."""
    run_env = {**cluster["env"], "RAY_ADDRESS": cluster["dashboard"], "RAY": RAY, **env}
    for _ in range(20):
        proc = net.run("head", ["bash", "launch/ray_submit.sh", str(cfg)], env=run_env, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode == 0 or "No available agent to submit job" not in out:
            break
        time.sleep(3)
    assert proc.returncode == 0, out[-8000:]
    return out


def _mlflow_run(cluster: dict, experiment: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(cluster["store"])  # the server's own store, on the shared disk
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    assert len(runs) == 1, f"one MLflow run per job, found {len(runs)}"
    return client, runs[0]


def _artifacts(cluster: dict, run) -> Path:
    return cluster["artifacts"] / run.info.experiment_id / run.info.run_id / "artifacts"


def test_ray_job_across_two_nodes_equals_one_node(net, shared, cluster, reference):
    cfg = _with_tracking(_config(shared, "ray-2n"), cluster["mlflow"], "multinode")
    data = yaml.safe_load(cfg.read_text())
    data["tracking"]["system_metrics_every_s"] = 1
    cfg.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    out = _submit(net, cluster, cfg)
    print(f"[multinode] two-node ray job: {time.perf_counter() - t0:.1f}s")
    assert "succeeded" in out.lower()
    client, run = _mlflow_run(cluster, "multinode", "ray-2n")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    nodes = json.loads((_artifacts(cluster, run) / "nodes/nodes.json").read_text())
    assert len(nodes) == 2 and len({n["address"] for n in nodes}) == 2, nodes
    assert {n["address"] for n in nodes} == {net.address("head"), net.address("node")}
    assert sorted(r for n in nodes for r in n["ranks"]) == [0, 1]
    assert run.data.tags["nodes"] == "2" and len(run.data.tags["hosts"].split(",")) == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    for node in ("node0", "node1"):  # MLflow's system metrics, one series per node
        assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    arts = _artifacts(cluster, run)
    assert (arts / "directions/dash/directions.csv").is_file()
    assert (arts / "adapter/adapter_model.safetensors").is_file()
    _assert_same_adapter(shared / "runs/ray-2n/adapter", reference)
    _assert_same_adapter(arts / "adapter", reference)


def _torchrun_two_nodes(net: TwoHosts, shared: Path, cfg: Path, port: int, timeout: float = 400, env=None):
    head = net.address("head")
    procs = []
    for rank, host in enumerate(TwoHosts.NAMES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={rank}", f"--master_addr={head}", f"--master_port={port}",
               "-m", "pipeline.launch.worker", str(cfg)]
        procs.append(net.run(host, cmd, env=env or child_env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        seen = [p.communicate()[0] for p in procs]
        raise AssertionError("two-node torchrun timed out:\n" + "\n----\n".join(o[-5000:] for o in seen)) from None
    return [p.returncode for p in procs], outs


def test_torchrun_across_two_nodes_equals_one_node(net, shared, reference):
    cfg = _config(shared, "torchrun-2n")
    t0 = time.perf_counter()
    codes, outs = _torchrun_two_nodes(net, shared, cfg, port=29511)
    print(f"[multinode] two-node torchrun: {time.perf_counter() - t0:.1f}s")
    assert codes == [0, 0], "\n".join(o[-4000:] for o in outs)
    nodes = json.loads((shared / "runs/torchrun-2n/nodes.json").read_text())
    assert {n["address"] for n in nodes} == {net.address("head"), net.address("node")}
    _assert_same_adapter(shared / "runs/torchrun-2n/adapter", reference)


def test_a_node_without_the_shared_folder_is_refused_before_anything_is_written(net, shared):
    cfg = _config(shared, "no-share")
    with net.hidden("node", shared / "runs"):
        codes, outs = _torchrun_two_nodes(net, shared, cfg, port=29512, timeout=300)
    out = "\n".join(outs)
    assert codes[0] != 0 and codes[1] != 0, out[-4000:]
    assert "[tsd rank 1] error: shared storage: rank 1 on" in out and "cannot see output_dir" in out, out[-4000:]
    # torchrun prints its own ChildFailedError traceback for any failed node; none from the pipeline
    assert 'pipeline/training' not in out, out[-4000:]
    run = shared / "runs/no-share"
    assert not (run / "adapter").exists() and not (run / "checkpoints").exists()
    assert not (run / "result.json").exists()


def test_killed_worker_node_rejoins_and_the_run_resumes_to_the_same_adapter(net, shared, cluster, reference):
    cfg = _config(shared, "ray-kill", checkpoint_every=1)
    data = yaml.safe_load(cfg.read_text())
    data["workers"]["max_failures"] = 1
    cfg.write_text(yaml.safe_dump(data))
    _with_tracking(cfg, cluster["mlflow"], "multinode")
    latest = shared / "runs/ray-kill/checkpoints/latest"
    killed: list[int] = []

    def kill_the_node_after_the_first_checkpoint():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not latest.is_file():
            time.sleep(0.1)
        killed.extend(net.pids("node"))
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        net.check("node", _worker_node_start(net.address("head"), net.address("node")), env=cluster["env"],
                  timeout=180)

    import threading

    killer = threading.Thread(target=kill_the_node_after_the_first_checkpoint, daemon=True)
    killer.start()
    t0 = time.perf_counter()
    out = _submit(net, cluster, cfg, JOB_ENV=json.dumps({"TSD_INJECT_STEP_DELAY_S": "1"}))
    killer.join(200)
    print(f"[multinode] kill + rejoin + resume: {time.perf_counter() - t0:.1f}s")
    assert killed, "the worker node was never killed"
    _, run = _mlflow_run(cluster, "multinode", "ray-kill")
    assert run.info.status == "FINISHED" and int(run.data.tags.get("restarts", 0)) >= 1, out[-6000:]
    _assert_same_adapter(shared / "runs/ray-kill/adapter", reference)
    shutil.rmtree(shared / "runs/ray-kill/checkpoints", ignore_errors=True)


SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def ssh(net, tmp_path_factory):
    """An sshd on each host, bound to its address, with keys made for this test; the client's
    options (`-F <config>`: the key, the two host keys) for launch/deepspeed.sh's SSH_OPTS."""
    missing = [t for t, path in (("sshd", SSHD), ("ssh", shutil.which("ssh")), ("pdsh", shutil.which("pdsh")))
               if not path or not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"the DeepSpeed launcher test needs {', '.join(missing)} (apt-get install openssh-server pdsh; "
                    "`make multinode-tools` as root)")
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"tsd-test-{key}", "-f", str(d / key)],
                       check=True, capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    host_key = (d / "host.pub").read_text().split()[:2]
    (d / "known_hosts").write_text("".join(f"{net.address(h)} {' '.join(host_key)}\n" for h in TwoHosts.NAMES))
    (d / "ssh_config").write_text(
        f"Host *\n  IdentityFile {d / 'user'}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n"
        f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder, made by its service otherwise
    daemons = []
    for host in TwoHosts.NAMES:
        conf = d / f"sshd_{host}.conf"
        conf.write_text(
            f"ListenAddress {net.address(host)}\nPort 22\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / f'sshd_{host}.pid'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\nLogLevel ERROR\n")
        daemons.append(net.run(host, [SSHD, "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL))
    try:
        for host in TwoHosts.NAMES:
            net.wait_for_port(host, 22, timeout=30)
        yield {"opts": f"-F {d / 'ssh_config'}"}
    finally:  # the daemons by their PIDs (and their sessions with them); the namespaces go with `net`
        for proc in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _deepspeed_env(net: TwoHosts, ssh: dict, hostfile: Path, **extra) -> dict:
    """The launching shell as a user has it: the hostfile, ssh options (net.run adds GLOO_SOCKET_IFNAME);
    the ranks get none of it but through the launcher."""
    return child_env(HOSTFILE=str(hostfile), SSH_OPTS=ssh["opts"], MASTER_PORT="29514",
                     DEEPSPEED=str(BIN / "deepspeed"), **extra)


def test_deepspeed_launcher_over_ssh_across_two_hosts_equals_one_node(net, shared, cluster, reference, ssh):
    """launch/deepspeed.sh with a hostfile of both hosts, started on the head from another folder:
    pdsh reaches both hosts over ssh, whose sessions carry none of the launching shell's
    environment; the interface (GLOO_SOCKET_IFNAME, which gloo needs here: the shared host name
    resolves to no namespace's address) and the rest reach the ranks only through the launcher's
    export. One launch: LoRA-TSD through both switches, against the one-node reference."""
    cfg = _with_tracking(_config(shared, "ds-2n"), cluster["mlflow"], "multinode")
    hostfile = shared / "hostfile"
    hostfile.write_text(f"# the two test hosts\n{net.address('head')} slots=1\n{net.address('node')} slots=1\n")
    t0 = time.perf_counter()
    proc = net.run("head", ["bash", str(ROOT / "launch/deepspeed.sh"), os.path.relpath(cfg, shared)],
                   env=_deepspeed_env(net, ssh, hostfile), cwd=shared,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"launch/deepspeed.sh across two hosts timed out:\n{out[-8000:]}") from None
    print(f"[multinode] two-host deepspeed launcher over ssh: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, out[-8000:]
    assert "pdsh" in out and f"--master_addr={net.address('head')}" in out, out[-4000:]
    client, run = _mlflow_run(cluster, "multinode", "ds-2n")
    assert run.info.status == "FINISHED", out[-4000:]
    tags = run.data.tags
    assert tags["launcher"] == "deepspeed" and tags["world_size"] == "2" and tags["nodes"] == "2", tags
    assert {h.rsplit("@", 1)[-1] for h in tags["hosts"].split(",")} == {net.address("head"), net.address("node")}
    nodes = json.loads((_artifacts(cluster, run) / "nodes/nodes.json").read_text())
    assert {n["address"] for n in nodes} == {net.address("head"), net.address("node")}, nodes
    assert sorted(r for n in nodes for r in n["ranks"]) == [0, 1]
    # the shared-storage check ran on both hosts and cleaned up after itself
    assert not list((shared / "runs").glob(".tsd-shared-*")), list((shared / "runs").iterdir())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    _assert_same_adapter(shared / "runs/ds-2n/adapter", reference)
    _assert_same_adapter(_artifacts(cluster, run) / "adapter", reference)


def test_deepspeed_launcher_names_a_host_it_cannot_reach_and_stops(net, shared, ssh):
    """A hostfile with a third host nobody answers for: the launcher's ssh check stops within its
    timeout, naming that host, before any rank starts."""
    absent = f"{net.subnet}.9"
    hostfile = shared / "hostfile-absent"
    hostfile.write_text(f"{net.address('head')} slots=1\n{absent} slots=1\n")
    cfg = _config(shared, "ds-absent")
    t0 = time.perf_counter()
    out = subprocess.run(net.command("head", ["bash", str(ROOT / "launch/deepspeed.sh"), str(cfg)]), cwd=shared,
                         env=_deepspeed_env(net, ssh, hostfile, SSH_CONNECT_TIMEOUT="3"),
                         capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "not reachable over ssh from" in out.stderr and absent in out.stderr, out.stderr[-2000:]
    assert net.address("head") + " (" not in out.stderr, out.stderr[-2000:]  # the head answered
    assert took < 20, f"the check took {took:.1f}s"
    assert not (shared / "runs/ds-absent").exists()


def test_ray_job_on_two_raylets_where_namespaces_cannot_be_made(shared, request):
    """The fallback of a machine without root: Ray's own multi-raylet test cluster (two raylets,
    one address) instead of two hosts. STRICT_SPREAD can only be met by one worker per raylet."""
    why = TwoHosts.available()
    if why is None and os.environ.get("TSD_FORCE_RAYLET_FALLBACK") != "1":
        pytest.skip("network namespaces are available: the two-host tests above ran instead")
    print(f"[multinode] no network namespaces here ({why or 'forced'}): falling back to ray.cluster_utils.Cluster "
          f"(two raylets on one address; no separate network, no hidden folder, no node kill)")
    from ray.cluster_utils import Cluster

    reference = request.getfixturevalue("reference")  # only now: a skipped test trains nothing

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = _config(shared, "raylets-2n")
        data = yaml.safe_load(cfg.read_text())
        data["workers"]["address"] = cluster.address
        cfg.write_text(yaml.safe_dump(data))
        t0 = time.perf_counter()
        proc = run_group([str(BIN / "tsd"), "train", str(cfg)], cwd=ROOT, env=child_env(), timeout=600)
        print(f"[multinode] two-raylet ray job: {time.perf_counter() - t0:.1f}s")
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        _assert_same_adapter(shared / "runs/raylets-2n/adapter", reference)
    finally:
        cluster.shutdown()
