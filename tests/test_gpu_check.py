"""benchmarks/gpu_check.py --dry-run: the GPU check's wheel list, size and commands, offline and
in seconds (the check itself needs a GPU machine; docs/BENCHMARKS.md, "GPU check")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def dry_run(*extra: str) -> subprocess.CompletedProcess:
    # No registry may be reached: a proxy that does not exist makes any download fail loudly.
    env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "PIP_NO_INDEX": "1", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def size_mib(out: str) -> float:
    m = re.search(r"= ([\d.]+) MiB of 64 MiB", out)
    assert m, out
    return float(m.group(1))


def test_dry_run_lists_the_wheels_the_size_and_the_commands():
    proc = dry_run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "gpu_check --dry-run: OK" in out
    for name in gpu_check.REQUIRED + gpu_check.FALLBACK:
        assert f"{name}==" in out, name
    for py in gpu_check.PYTHONS:  # the compiled wheel, once per Python the image may have
        assert f"pydantic-core==" in out and f"cp{py.replace('.', '')}" in out
    assert 0 < size_mib(out) < 64
    # the exact commands of the GPU run: the install, each check's worker entry, the benchmark
    assert "pip install -q --no-index --no-deps" in out and "--target runs/gpu-check/site" in out
    workers = re.findall(r"-m torch\.distributed\.run --standalone --nproc_per_node=1 -m pipeline\.launch\.worker "
                         r"runs/gpu-check/(\S+)\.yaml", out)
    assert {"forced", "shortcut", "resumed", "eval", "bf16-zero3-tsd", "bf16-ddp-init"} <= set(workers)
    assert "TSD_FORCE_COLLECTIVES=1" in out
    assert "benchmarks/bench_step.py --device cuda" in out
    assert "carry=['runs/gpu-wheels']" in out


def fake_folder(tmp_path: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """Correctly named empty wheel files for what --pack would download."""
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    versions = gpu_check.local_versions()
    for name, version, py in gpu_check.expected_wheels(versions):
        if name == drop:
            continue
        dist = name.replace("-", "_")
        tag = f"cp{py.replace('.', '')}-cp{py.replace('.', '')}-manylinux_2_17_x86_64" if py else "py3-none-any"
        (folder / f"{dist}-{version}-{tag}.whl").write_bytes(b"")
    if extra:
        (folder / extra).write_bytes(b"")
    return folder


def test_dry_run_accepts_a_complete_folder(tmp_path):
    proc = dry_run("--wheels", str(fake_folder(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PROBLEM" not in proc.stdout and "(measured)" in proc.stdout
    assert size_mib(proc.stdout) < 64


def test_dry_run_fails_on_a_missing_or_doubled_wheel(tmp_path):
    proc = dry_run("--wheels", str(fake_folder(tmp_path / "a", drop="pydantic-core")))
    assert proc.returncode == 1 and "missing pydantic-core==" in proc.stdout and "CPython 3.12" in proc.stdout
    proc = dry_run("--wheels", str(fake_folder(tmp_path / "b", extra="hjson-0.1-py3-none-any.whl")))
    assert proc.returncode == 1 and "hjson: other versions ['0.1']" in proc.stdout


def test_dry_run_fails_when_too_big(tmp_path):
    folder = fake_folder(tmp_path)
    with open(folder / "deepspeed-ballast.bin", "wb") as f:  # a sparse 65 MiB file in the carried folder
        f.truncate(65 * 2**20)
    proc = dry_run("--wheels", str(folder))
    assert proc.returncode == 1 and "over the 64 MiB" in proc.stdout
