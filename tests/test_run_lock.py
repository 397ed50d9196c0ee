"""One writer per run folder, and ranks that end with their launcher (issue 25, item 7).

A second launch of a live run's config (the worker entry, `tsd train --fresh`) is refused with exit
2 and one line naming the holder, while the live run finishes normally and alone; a lock whose
process has ended, or whose heartbeat is old, is taken over; `kill -9` of torchrun ends its ranks
within seconds and they write nothing more; the DeepSpeed launcher's runner is watched the same
way (a stand-in process chain: the real launcher costs a minute of CPU).

The two 2-rank torchrun runs start together (module fixture) to share their start-up time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from proc_group import BIN, ROOT, child_env, make_tiny_model, tiny_config

from pipeline.config import load_config
from pipeline.run_folder import RESULT_FILE, check_rerun, recorded_config
from pipeline.run_lock import LOCK_FILE, STALE_AFTER_S, RunFolderBusy, RunLock, read_holder, why_stale


# ----------------------------------------------------------------------------- helpers
def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (orphans may never be reaped here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _cmdline_bytes(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _wait_for(what: str, cond, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


def _kill_group(proc: subprocess.Popen, ranks: tuple[int, ...] = ()) -> None:
    """End what a test started: its session, and by pid the `ranks` it started (torchrun gives each
    rank a session of its own, so the launcher's group does not hold them)."""
    ranks = (*ranks, *(_children(proc.pid) if proc.poll() is None else ()))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid in ranks:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _foreign_lock(run_dir: Path, heartbeat: float) -> None:
    """A lock as a holder on another node writes it (its pid means nothing here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({
        "host": "node7", "pid": 4242, "what": "torchrun rank 0", "command": "torchrun ...", "started": heartbeat,
        "heartbeat": heartbeat, "token": "elsewhere", "scope": "node7/boot/pid:[1]"}))


# ----------------------------------------------------------------------------- the lock itself
def test_a_held_lock_refuses_others_until_released(tmp_path):
    run_dir = tmp_path / "runs/a"
    lock = RunLock(run_dir, "torchrun rank 0").acquire()
    holder = read_holder(run_dir / LOCK_FILE)
    assert (holder.pid, holder.host, holder.what) == (os.getpid(), socket.gethostname(), "torchrun rank 0")
    with pytest.raises(RunFolderBusy) as e:
        RunLock(run_dir, "another").acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "heartbeat 0s ago" in msg
    assert "--set name=NEW" in msg and "wait for it to end or stop it" in msg
    lock.release()
    lock.release()  # idempotent
    assert not run_dir.exists()  # the lock made the folder and nothing else was written: no trace
    with RunLock(run_dir, "another"):
        assert read_holder(run_dir / LOCK_FILE).what == "another"


def test_a_lock_whose_process_ended_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "runs/b"
    code = f"import os; from pipeline.run_lock import RunLock; RunLock({str(run_dir)!r}, 'a crashed rank 0').acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, timeout=60)
    dead = read_holder(run_dir / LOCK_FILE)
    assert dead is not None and why_stale(dead) == "its process has ended"
    with RunLock(run_dir, "the rerun"):
        assert read_holder(run_dir / LOCK_FILE).pid == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the lock of a crashed rank 0 on host {socket.gethostname()}, pid {dead.pid}" in err


def test_a_foreign_lock_counts_by_its_heartbeat(tmp_path, capsys):
    run_dir = tmp_path / "runs/c"
    _foreign_lock(run_dir, heartbeat=time.time() - 5)  # alive on another node: its pid cannot be checked here
    with pytest.raises(RunFolderBusy, match=r"torchrun rank 0, pid 4242 on host node7, heartbeat 5s ago"):
        RunLock(run_dir, "rerun").acquire()
    _foreign_lock(run_dir, heartbeat=time.time() - STALE_AFTER_S - 30)
    with RunLock(run_dir, "rerun"):
        pass
    assert "took over the lock of torchrun rank 0 on host node7, pid 4242" in capsys.readouterr().err
    assert not (run_dir / LOCK_FILE).exists()


def test_fresh_never_clears_a_live_run_and_keeps_its_own_lock(tmp_path):
    """check_rerun(--fresh) on a folder another live process holds: refused, nothing touched. Under
    this command's own lock: the finished run is cleared (interrupted: moved aside), the lock stays."""
    cfg_file = tmp_path / "c.yaml"
    data = yaml.safe_load((ROOT / "configs/tiny_cpu.yaml").read_text())
    cfg_file.write_text(yaml.safe_dump({**data, "name": "f", "output_dir": str(tmp_path / "runs")}))
    cfg = load_config(cfg_file, [])
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text(json.dumps(recorded_config(cfg)))
    (run_dir / RESULT_FILE).write_text(json.dumps({"steps": 5}))
    _foreign_lock(run_dir, heartbeat=time.time())
    with pytest.raises(RunFolderBusy):
        check_rerun(cfg, fresh=True)
    assert (run_dir / RESULT_FILE).is_file()
    (run_dir / LOCK_FILE).unlink()
    with RunLock(run_dir, "tsd train (Ray driver)") as lock:
        assert check_rerun(cfg, fresh=True).kind == "new"
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
        (run_dir / "checkpoints/step1").mkdir(parents=True)  # now an interrupted run
        assert check_rerun(cfg, fresh=True).kind == "new"
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
        aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("f.interrupted-")]
        assert len(aside) == 1 and (aside[0] / "checkpoints/step1").is_dir() and not (aside[0] / LOCK_FILE).exists()
        assert read_holder(run_dir / LOCK_FILE).token == lock.token
        lock.beat()  # the heartbeat goes on in the new folder
        assert read_holder(run_dir / LOCK_FILE).token == lock.token
    assert not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- lifeline
def test_a_rank_whose_launcher_ended_before_it_armed_leaves(tmp_path):
    ready, out = tmp_path / "imported", tmp_path / "rank.err"
    rank = (f"import pathlib, time; from pipeline.launch import lifeline; pathlib.Path({str(ready)!r}).touch(); "
            f"time.sleep(1.5); lifeline.die_with_launcher(); print('still running')")
    launcher = (f"import subprocess, sys, time, pathlib; subprocess.Popen([sys.executable, '-c', {rank!r}], "
                f"stdout=open({str(out)!r}, 'w'), stderr=subprocess.STDOUT); "
                f"[time.sleep(0.05) for _ in range(600) if not pathlib.Path({str(ready)!r}).exists()]")
    subprocess.run([sys.executable, "-c", launcher], cwd=ROOT, env=child_env(LOCAL_RANK="0"), timeout=60, check=True)
    _wait_for("the orphaned rank to leave", lambda: "ended before the rank started" in out.read_text(), 30)
    time.sleep(0.5)
    assert "still running" not in out.read_text()


def test_a_rank_ends_with_the_deepspeed_runner(tmp_path):
    """runner -> launch.py -> rank, as `deepspeed` starts them (argv alike): kill -9 of the runner
    leaves launch.py alive, and the rank still ends within seconds."""
    pid_file = tmp_path / "rank.pid"
    rank = (f"import os, pathlib, time; from pipeline.launch import lifeline; lifeline.die_with_launcher(); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)")
    launch_py = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}], "
                 f"env={{**os.environ, 'LOCAL_RANK': '0'}}); time.sleep(120)")
    runner = tmp_path / "deepspeed"  # the console script's name is what marks the runner
    runner.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-u', '-c', {launch_py!r}, "
                      f"'-m', 'deepspeed.launcher.launch'])\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(runner)], cwd=ROOT, env=child_env(), start_new_session=True)
    try:
        rank_pid = int(_wait_for("the rank", lambda: pid_file.exists() and pid_file.read_text(), 60, proc))
        time.sleep(2.5)  # watched for a while: nothing happens while the runner lives
        assert _alive(rank_pid)
        launch_pid = _children(proc.pid)[0]
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _wait_for("the rank to end", lambda: not _alive(rank_pid), 10)
        assert time.monotonic() - t0 < 5 and _alive(launch_pid)  # launch.py (a stand-in: it never reaps) lives on
    finally:
        _kill_group(proc)


# ----------------------------------------------------------------------------- two real runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-rank torchrun runs of the tiny model, started together, each paused after its step 1
    until its test removes `<name>.pause` (TSD_INJECT_PAUSE_FILE): `live` (4 steps, tracked) and
    `killed` (20 steps of 1 s each once released, offline)."""
    wd = tmp_path_factory.mktemp("runlock")
    make_tiny_model(wd / "model")
    started = {}
    for name, steps, delay in (("live", 4, "0"), ("killed", 20, "1")):
        cfg = tiny_config(wd / "model", wd / "runs", name)
        cfg["train"].update(max_steps=steps, checkpoint_every=1, log_every=1)
        cfg["tracking"].update(uri=f"sqlite:///{wd}/{name}.db", experiment="runlock", offline=name == "killed")
        path, log, pause = wd / f"{name}.yaml", wd / f"{name}.log", wd / f"{name}.pause"
        path.write_text(yaml.safe_dump(cfg))
        pause.touch()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline.launch.worker", str(path)]
        env = child_env(TSD_INJECT_STEP_DELAY_S=delay, TSD_INJECT_PAUSE_FILE=str(pause))
        with open(log, "w") as out:  # a file, not a pipe nobody reads while the tests wait
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started[name] = (proc, path, wd / "runs" / name, log, pause)
    yield wd, started
    for name, (proc, path, *_) in started.items():
        # and any rank of it still alive (a failed check: the launcher killed, its ranks not)
        ranks = [int(e) for e in os.listdir("/proc") if e.isdigit() and str(path).encode() in _cmdline_bytes(int(e))]
        _kill_group(proc, tuple(ranks))


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints/latest"
    text = latest.read_text().strip() if latest.is_file() else ""
    return int(text[4:]) if text.startswith("step") and text[4:].isdigit() else 0


@pytest.mark.slow
def test_a_second_launch_of_a_live_run_is_refused_and_the_run_finishes_alone(runs):
    wd, started = runs
    proc, path, run_dir, log, pause = started["live"]
    _wait_for("step 1 of the live run", lambda: "step 1/4" in log.read_text(), 300, proc, log)
    holder = read_holder(run_dir / LOCK_FILE)
    assert holder.what == "torchrun rank 0" and holder.pid in _children(proc.pid)
    env = child_env()
    env.pop("LOCAL_RANK", None)
    second = [subprocess.Popen([sys.executable, "-m", "pipeline.launch.worker", str(path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
              subprocess.Popen([str(BIN / "tsd"), "train", str(path), "--fresh"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outs = [p.communicate(timeout=240) for p in second]
    assert proc.poll() is None
    for p, (out, err) in zip(second, outs):
        assert p.returncode == 2, err[-3000:]
        lines = [ln for ln in err.splitlines() if "in use by another run" in ln]
        assert len(lines) == 1, err[-3000:]
        assert f"torchrun rank 0, pid {holder.pid} on host {socket.gethostname()}, heartbeat " in lines[0]
        assert "wait for it to end or stop it, or train under another name (--set name=NEW)" in lines[0]
        assert "Started a local Ray" not in err
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith("live.interrupted")]  # --fresh moved nothing

    pause.unlink()
    assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    result = json.loads((run_dir / RESULT_FILE).read_text())
    assert result["steps"] == 4 and (run_dir / "adapter/adapter_model.safetensors").is_file()
    assert not list(run_dir.glob(f"{LOCK_FILE}*"))  # released, nothing of the lock left
    text = log.read_text()
    assert "resumed from" not in text and "took over" not in text
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{wd}/live.db")
    mlruns = client.search_runs([client.get_experiment_by_name("runlock").experiment_id])
    assert len(mlruns) == 1 and mlruns[0].info.status == "FINISHED" and "restarts" not in mlruns[0].data.tags
    assert [m.step for m in client.get_metric_history(mlruns[0].info.run_id, "loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_9_of_torchrun_ends_its_ranks_and_they_write_nothing_more(runs, capsys):
    wd, started = runs
    proc, path, run_dir, log, pause = started["killed"]
    _wait_for("step 1 of the run to kill", lambda: "step 1/20" in log.read_text(), 300, proc, log)
    pause.unlink()  # training again, a step a second
    _wait_for("step 3's checkpoint", lambda: _latest_step(run_dir) >= 3, 120, proc, log)
    ranks = _children(proc.pid)
    assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)
    holder = read_holder(run_dir / LOCK_FILE)
    assert holder.pid in ranks
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    _wait_for("the ranks to end", lambda: not any(_alive(pid) for pid in ranks), 15)
    ended_in = time.monotonic() - t0

    def files():
        return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}

    before, step_at_kill = files(), _latest_step(run_dir)
    time.sleep(3)  # the report's orphans wrote step 6, step 8 and the adapter after the launcher was gone
    assert files() == before and _latest_step(run_dir) == step_at_kill < 20
    assert not (run_dir / "adapter").exists() and not (run_dir / RESULT_FILE).exists()
    assert ended_in < 5, f"the ranks ended {ended_in:.1f}s after their launcher"
    # The killed rank 0 left its lock: the rerun's rank 0 takes it over at once (same host, pid gone).
    assert why_stale(read_holder(run_dir / LOCK_FILE)) == "its process has ended"
    with RunLock(run_dir, "torchrun rank 0"):
        pass
    assert f"took over the lock of torchrun rank 0 on host {socket.gethostname()}, pid {holder.pid}" in \
        capsys.readouterr().err
