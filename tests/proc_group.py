"""Start multi-process commands for tests in their own process group, and always reap it:
on a timeout or failure no rank is left running."""

import os
import signal
import subprocess


def run_group(cmd, cwd, env, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{out[-3000:]}\n{err[-6000:]}") from None
    finally:
        try:  # ranks or helpers the launcher left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ----------------------------------------------------------------------------- shared by the
# multi-process pipeline tests (e2e, resume, faults, reliability)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "tests/data/tiny_train.json"
BIN = Path(sys.executable).parent


def child_env(**extra) -> dict:
    """The environment of a test's child processes: one thread per rank, no hub, the venv first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def tiny_config(model_dir: Path, output_dir: Path, name: str) -> dict:
    """configs/tiny_cpu.yaml on a test's own model, the tiny data and ZeRO-3, writing under
    `output_dir`: a dict for the test to adjust and write out."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/tiny_cpu.yaml").read_text())
    cfg.update(name=name, output_dir=str(output_dir))
    cfg["model"]["path"] = str(model_dir)
    cfg["data"]["train"] = str(TINY_DATA)
    cfg["deepspeed"]["config"] = str(ROOT / "configs/deepspeed/zero3.json")
    return cfg


def make_tiny_model(path: Path) -> Path:
    """A random-init tiny LLaMA whose word tokenizer knows every word of the tiny data's prompts."""
    from pipeline.data.tasks import generate_prompt, load_records
    from pipeline.data.synthetic import make_model_dir

    rows = load_records(TINY_DATA)
    return make_model_dir(path, texts=[generate_prompt(r["instruction"], r.get("input"), r["output"]) for r in rows])


def torchrun_worker(cfg: Path, timeout: int = 400, nproc: int = 2, extra: list[str] | None = None,
                    **env) -> subprocess.CompletedProcess:
    """`python -m pipeline.launch.worker CFG [extra...]` on `nproc` (2) CPU ranks under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.launch.worker", str(cfg), *(extra or [])]
    return run_group(cmd, cwd=ROOT, env=child_env(**env), timeout=timeout)


def group_alive(pid: int) -> bool:
    """Whether the process group `pid` leads still has a process."""
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PicklePayload:
    """Unpickling this calls os.makedirs(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def crashed_after(src_run: Path, dst_run: Path, step: int) -> Path:
    """dst_run as a crash right after src_run's step-`step` checkpoint would leave it: its
    checkpoints up to that tag, `latest` naming it. Returns dst_run's checkpoint folder."""
    import shutil

    ckpt = dst_run / "checkpoints"
    shutil.copytree(src_run / "checkpoints", ckpt)
    for tag in ckpt.iterdir():
        if tag.is_dir() and tag.name.startswith("step") and tag.name[4:].isdigit() and int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(f"step{step}")
    return ckpt


def train_config(cfg: dict, wd: Path, nproc: int = 2, copy_from: Path | None = None,
                 stop_at: int | None = None) -> subprocess.CompletedProcess:
    """Write `cfg` (a tiny_config dict) to wd/<name>.yaml and train it under torchrun; with
    `copy_from`, first leave the run folder as a crash after that run's step-`stop_at` checkpoint
    would (so the run resumes from it)."""
    import yaml

    name = cfg["name"]
    if copy_from is not None:
        crashed_after(copy_from, Path(cfg["output_dir"]) / name, stop_at)
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return torchrun_worker(path, nproc=nproc)


# ----------------------------------------------------------------------------- runs shared by files
def session_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once per test session, for every xdist worker: the first to
    ask makes it under a file lock, the others wait for it and read it. One that failed half-way
    is made again by the next to ask (its error shows there too). Readers copy what they change."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's folder, above each worker's own
    folder = base / "session" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock", timeout=1200):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def tsd_run(wd: Path, name: str, experiment: str, method: dict, train: dict,
            data: dict | None = None) -> tuple[Path, dict]:
    """A 2-rank LoRA-TSD run of a tiny model made in `wd`, a checkpoint every step (all kept),
    tracked in wd/mlflow.db, under wd/runs/<name>: (wd, its config dict)."""
    import yaml

    make_tiny_model(wd / "model")
    cfg = tiny_config(wd / "model", wd / "runs", name)
    cfg["data"].update(data or {})
    cfg["method"].update(method="tsd", **method)
    cfg["train"].update(checkpoint_every=1, keep_checkpoints=None, log_every=1, **train)
    cfg["tracking"].update(uri=f"sqlite:///{wd}/mlflow.db", experiment=experiment)
    path = wd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun_worker(path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return wd, cfg


def lora_tsd_run(tmp_path_factory) -> tuple[Path, dict]:
    """The suite's one uninterrupted 2-rank LoRA-TSD run, shared by test_resume, test_reliability
    and test_strategies (each trained its own, almost the same): the tiny model, switches at
    steps 2 (Init) and 4 (Dash), dropout 0.1, 6 steps, warm-up 2 then linear, ZeRO-3 (`tsd_run`).
    Returns (folder, its config dict): the run is <folder>/runs/full, the model <folder>/model."""
    import yaml

    wd = session_folder(tmp_path_factory, "lora-tsd", lambda wd: tsd_run(
        wd, "full", "resume", dict(switch_step=2, dropout=0.1), dict(max_steps=6, warmup_steps=2, schedule="linear")))
    return wd, yaml.safe_load((wd / "full.yaml").read_text())
