"""The CUDA paths CPU CI cannot run, as ONE command on a single-GPU machine (< 10 minutes).

NOT RUN ON A GPU YET: written and tested on CPU (--cpu, --dry-run) while no GPU was at hand.

The GPU machine (docs/BENCHMARKS.md, "GPU check") has torch (CUDA), transformers, peft,
accelerate and safetensors but not deepspeed, pydantic, ray or mlflow, and reaches no package
registry: what it lacks travels as wheels, packed here.

  python benchmarks/gpu_check.py --pack runs/gpu-wheels       # here (registry): the wheels it lacks
  python benchmarks/gpu_check.py --dry-run [--wheels DIR]     # fast, offline: the list, the size, the commands
  python3 benchmarks/gpu_check.py --wheels runs/gpu-wheels    # there: install (no network), run the checks
  python benchmarks/gpu_check.py --cpu                        # the same checks on CPU/gloo (tests this script)

Wheels: REQUIRED are installed always (the image lacks them); FALLBACK ones (the image has them,
KINDS.md 2026-11-17) only where the image's copy is missing or older than a REQUIRED wheel asks.
They go into a private folder (`pip install --no-index --no-deps --target`) put first on
PYTHONPATH; compiled ones (pydantic-core, msgpack) are packed for CPython 3.10-3.13 and the
install picks the one this interpreter takes, or stops with a message naming both.

Checks, each through the real per-rank entry `python -m torch.distributed.run --standalone
--nproc_per_node=1 -m pipeline.launch.worker CFG` (world size 1: the machine has one GPU;
workers.use_gpu true, tracking.offline true), on a random-init tiny LLaMA:
  imports            deepspeed, pydantic and the worker's modules import; versions
  nccl-forced        NCCL with TSD_FORCE_COLLECTIVES=1 (every collective through the group even
                     alone): LoRA-TSD through both switches and the export; adapter equal to the
                     same run on the single-process shortcut (<= 1e-5)
  bf16-master-copies bf16 under ddp, zero2, zero3 x methods init, tsd: finite; lora_A/B still near
                     the init factors the sidecar recorded (|A-A0| <= 0.25 |A0|; undone: ~5); the
                     exported update of each strategy equal to zero3's within 2^-4 of LoRA-Init's
                     move max |scaling B0 A0| (sign/order-free; undone: ~1)
  cuda-rng-resume    dropout 0.1 on the GPU, resume from the step-3 checkpoint: adapter equal to
                     the uninterrupted run (<= 1e-5; CUDA generators restored)
  eval-generation    ZeRO-3 partitioned evaluation with generation (2 tiny test sets) writes its
                     predictions and metrics
  bf16-export        the bf16 zero3 tsd adapter: stock PEFT loads it; exported update vs the
                     trained model <= half an ulp of the residual (README); merged logits match
  step-time          benchmarks/bench_step.py on the GPU: dash / LoRA and stock PEFT / lora-tsd
                     LoRA step-time ratios (reported, not judged)
One line each: `gpu_check <name>: PASS|FAIL (<s>s) <detail>`, then `gpu_check: k/n passed on
<device>`; exit 1 on a failure. Runs go in parallel (--jobs) except step-time, which runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "gpu-check"  # runs/ is git-ignored: nothing here travels unless carried
DEFAULT_WHEELS = "runs/gpu-wheels"
LIMIT_MIB = 64  # what one device call may carry: the working tree plus the carried paths
MANIFEST = "gpu_check_manifest.json"

# What `import deepspeed` and the worker path (pipeline.launch.worker, pipeline.training.loop)
# need that the GPU image lacks (found with an import-closure check against the image's list).
REQUIRED = ("deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson")
# What they need that the image already has: carried in case the image's copy is missing or old
# (typing-extensions: pydantic asks >= 4.16). Installed only then.
FALLBACK = ("typing-extensions", "py-cpuinfo", "msgpack", "ninja", "einops", "psutil")
# Compiled for one CPython: one wheel per version in PYTHONS. (ninja, psutil: one wheel for all.)
PER_PYTHON = ("pydantic-core", "msgpack")
PLATFORM_WHEELS = ("ninja", "psutil")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # the image's python3 was 3.12.3 (KINDS.md, 2026-11)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")
# Sizes measured when packing (KiB; for the estimate a dry run without --wheels prints).
EST_KIB = {"deepspeed": 2118, "pydantic": 470, "pydantic-core": 2212, "annotated-types": 14,
           "typing-inspection": 15, "hjson": 54, "typing-extensions": 45, "py-cpuinfo": 22, "msgpack": 465,
           "ninja": 180, "einops": 65, "psutil": 152}
# The image's versions, for the report (KINDS.md's pip list; its peft version is not recorded).
IMAGE_SEEN = {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "safetensors": "0.8.0"}

# bf16-master-copies' limits. Measured on CPU (6 steps, lr 1e-3, switch at 2): zero2 vs zero3 0.009,
# A vs A0 0.07; with LoRA-Init undone (ddp before its master refresh) 1.03 and 4.7.
BF16_TOL = 2 ** -4  # max |U_strategy - U_zero3| <= BF16_TOL * max |scaling B0 A0| (U: the exported update)
NEAR_INIT = 0.25  # max |A - A0| <= NEAR_INIT * max |A0| (and B, B0) at the end of the run


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cp_tag(python: str) -> str:
    return "cp" + python.replace(".", "")


# ============================================================================= wheels: list, pack
def local_versions() -> dict[str, str]:
    """The versions this checkout is tested with: the ones installed here."""
    import importlib.metadata as md

    out, missing = {}, []
    for name in (*REQUIRED, *FALLBACK):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"gpu_check: {', '.join(missing)} not installed here: cannot tell which versions to pack")
    return out


def expected_wheels(versions: dict[str, str], pythons=PYTHONS) -> list[tuple[str, str, str | None]]:
    """(name, version, python or None) for every wheel the folder must hold."""
    out = []
    for name in (*REQUIRED, *FALLBACK):
        if name in PER_PYTHON:
            out += [(name, versions[name], py) for py in pythons]
        else:
            out.append((name, versions[name], None))
    return out


def packaging_module(name: str):
    """packaging.<name>, or pip's vendored copy where packaging itself is not installed."""
    import importlib

    try:
        return importlib.import_module(f"packaging.{name}")
    except ImportError:
        return importlib.import_module(f"pip._vendor.packaging.{name}")


def parse_wheel(path: Path):
    """(name, version, set of tags as strings) of a wheel file, None if the name is not a wheel's."""
    utils = packaging_module("utils")
    InvalidWheelFilename, parse_wheel_filename = utils.InvalidWheelFilename, utils.parse_wheel_filename

    try:
        name, version, _, tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename:
        return None
    return norm(name), str(version), {str(t) for t in tags}


def scan(folder: Path) -> dict[str, list[tuple[Path, str, set]]]:
    found: dict[str, list] = {}
    for p in sorted(folder.glob("*.whl")):
        parsed = parse_wheel(p)
        if parsed:
            found.setdefault(parsed[0], []).append((p, parsed[1], parsed[2]))
    return found


def check_folder(folder: Path, versions: dict[str, str], pythons=PYTHONS) -> list[str]:
    """Problems with the wheel folder (missing, wrong version, extra versions); [] if none."""
    found = scan(folder)
    problems = []
    for name, version, py in expected_wheels(versions, pythons):
        have = [w for w in found.get(name, []) if w[1] == version]
        if py is not None:
            have = [w for w in have if any(t.startswith(cp_tag(py) + "-") for t in w[2])]
        if not have:
            problems.append(f"missing {name}=={version}" + (f" for CPython {py}" if py else ""))
    for name, wheels in found.items():
        if name in versions and {w[1] for w in wheels} - {versions[name]}:
            problems.append(f"{name}: other versions {sorted({w[1] for w in wheels} - {versions[name]})} beside "
                            f"{versions[name]} (two versions stop the install)")
    return problems


def pack(dest: Path, pythons=PYTHONS) -> int:
    """Put into `dest` the wheels the GPU machine lacks (registry access needed here)."""
    import hashlib
    import platform

    versions = local_versions()
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.glob("*.whl"):  # a folder packed before: no second version may stay
        parsed = parse_wheel(p)
        if parsed and parsed[0] in versions:
            p.unlink()
    pip = [sys.executable, "-m", "pip"]
    t0 = time.perf_counter()
    # DeepSpeed ships as an sdist: a pure-Python wheel without prebuilt ops (its ops build on first
    # use; this project uses none: torch AdamW, no offload). Built against the torch here.
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    run_or_die([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                f"deepspeed=={versions['deepspeed']}"], env)
    pure = [f"{n}=={versions[n]}" for n in (*REQUIRED, *FALLBACK)
            if n != "deepspeed" and n not in PER_PYTHON and n not in PLATFORM_WHEELS]
    run_or_die([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), *pure])
    compiled = [f"{n}=={versions[n]}" for n in (*PER_PYTHON, *PLATFORM_WHEELS)]
    for py in pythons:
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        run_or_die([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", py,
                    "--implementation", "cp", "--abi", cp_tag(py), *plat, "-d", str(dest), *compiled])
    problems = check_folder(dest, versions, pythons)
    wheels = {}
    for name, files in scan(dest).items():
        for p, version, tags in files:
            wheels[p.name] = {"name": name, "version": version, "bytes": p.stat().st_size,
                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                              "role": "required" if name in REQUIRED else "fallback", "tags": sorted(tags)}
    import importlib.metadata as md

    tested = {}
    for n in ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy"):
        try:
            tested[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    (dest / MANIFEST).write_text(json.dumps({
        "packed_on": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "pythons": list(pythons), "abis": [cp_tag(p) for p in pythons], "platforms": list(PLATFORMS),
        "tested_here_with": tested, "wheels": wheels}, indent=1))
    print(f"gpu_check --pack: {len(wheels)} wheels in {dest} ({time.perf_counter() - t0:.0f}s), for CPython "
          f"{', '.join(pythons)} on x86_64 manylinux")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return dry_run(dest, pythons) or (1 if problems else 0)


def run_or_die(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check --pack: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


# ============================================================================= size, dry run
def travelling_files(exclude: Path | None = None) -> list[Path]:
    """What a device call sends besides the carried paths: tracked files and untracked ones git
    does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    files = [ROOT / f for f in out.split("\0") if f]
    if exclude is not None:
        ex = exclude.resolve()
        files = [f for f in files if ex not in f.resolve().parents]
    return [f for f in files if f.is_file()]


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def plan_commands(wheels: str, cpu: bool) -> list[str]:
    """The commands the run executes, in order (the same plan the run builds)."""
    py = "python" if cpu else "python3"
    cmds = []
    if wheels:
        cmds.append(f"{py} -m pip install -q --no-index --no-deps --no-compile --target {rel(WORK / 'site')} "
                    f"<the wheels of {wheels} this Python takes>")
    pp = f"PYTHONPATH={rel(WORK / 'site') + ':' if wheels else ''}.:tests"
    cmds.append(f"{pp} {py} -c 'import deepspeed, pydantic, pipeline.launch.worker, pipeline.training.loop'")
    for job in build_jobs(WORK / "model", cpu):
        env = " ".join(f"{k}={v}" for k, v in job.env.items())
        prep = f"[copy {job.after}'s checkpoints up to step {job.resume_at}] " if job.after else ""
        cmds.append(f"{prep}{pp} {env + ' ' if env else ''}{py} -m torch.distributed.run --standalone "
                    f"--nproc_per_node=1 -m pipeline.launch.worker {rel(WORK / (job.name + '.yaml'))}")
    cmds.append(f"{pp} {py} {' '.join(bench_step_args(cpu))}")
    return cmds


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def dry_run(wheels: Path | None, pythons=PYTHONS) -> int:
    """Check the wheel list (and the folder, if given), the size, print the commands. No download."""
    t0 = time.perf_counter()
    versions = local_versions()
    need = expected_wheels(versions, pythons)
    ok = True
    print(f"gpu_check --dry-run: {len(need)} wheels needed (REQUIRED always installed, FALLBACK only where the "
          f"image's copy is missing or too old); compiled ones for CPython {', '.join(pythons)}")
    if wheels is not None:
        if not wheels.is_dir():
            print(f"  PROBLEM: {wheels}: no such folder (pack it: python benchmarks/gpu_check.py --pack {wheels})")
            return 1
        found = {p.name: p.stat().st_size for p in wheels.glob("*.whl")}
        problems = check_folder(wheels, versions, pythons)
        for p in problems:
            print(f"  PROBLEM: {p}")
        ok = not problems
        wheel_bytes = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
        for name in sorted(found):
            print(f"  {name:<80} {found[name] / 1024:8.0f} KiB")
        manifest = wheels / MANIFEST
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            print(f"  packed on {m.get('packed_on')} for ABIs {', '.join(m.get('abis', []))}; "
                  f"tested here with {m.get('tested_here_with')}")
        how = "measured"
    else:
        wheel_bytes = 0
        for name, version, py in need:
            kib = EST_KIB.get(name, 500)
            wheel_bytes += kib * 1024
            role = "required" if name in REQUIRED else "fallback"
            spec = f"{name}=={version}" + (f" ({cp_tag(py)})" if py else "")
            print(f"  {spec:<36} {role:<9} ~{kib:>5} KiB")
        how = "estimated"
    tree = travelling_files(exclude=wheels)
    tree_bytes = sum(f.stat().st_size for f in tree)
    total = tree_bytes + wheel_bytes
    print(f"size: wheels {mib(wheel_bytes)} ({how}) + working tree {mib(tree_bytes)} ({len(tree)} files: git "
          f"ls-files, tracked and untracked-not-ignored) = {mib(total)} of {LIMIT_MIB} MiB")
    if total > LIMIT_MIB * 2**20:
        print(f"  PROBLEM: over the {LIMIT_MIB} MiB a device call carries")
        ok = False
    w = rel(wheels) if wheels is not None else DEFAULT_WHEELS
    print("device call: run(command='PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --wheels "
          f"{w} --out $OUT', carry=['{w}'], timeout_s=600)")
    print("the GPU run executes (world size 1, runs in parallel except the last):")
    for c in plan_commands(w, cpu=False):
        print(f"  {c}")
    print(f"gpu_check --dry-run: {'OK' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f}s)")
    return 0 if ok else 1


# ============================================================================= install (GPU side)
def install(wheels: Path, target: Path) -> list[str]:
    """Install the wheels this interpreter needs into `target` (no network); returns a report.
    Raises SystemExit with a clear message when a needed wheel does not fit this Python."""
    import importlib.metadata as md

    Requirement = packaging_module("requirements").Requirement
    sys_tags = packaging_module("tags").sys_tags
    Version = packaging_module("version").Version

    here = [str(t) for t in sys_tags()]
    rank = {t: i for i, t in enumerate(here)}
    found = scan(wheels)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = json.loads((wheels / MANIFEST).read_text()) if (wheels / MANIFEST).is_file() else {}

    def pick(name: str) -> Path | None:
        fits = [(min(rank[t] for t in tags if t in rank), p) for p, _, tags in found.get(name, [])
                if any(t in rank for t in tags)]
        if fits:
            return min(fits)[1]
        if found.get(name):
            packed = sorted({t for _, _, tags in found[name] for t in tags})
            raise SystemExit(
                f"gpu_check: {name}: none of the carried wheels fits this interpreter (Python {pyver}, "
                f"{sys.executable}; it takes e.g. {', '.join(here[:3])}); carried: {', '.join(packed)}. "
                f"Repack for it here: python benchmarks/gpu_check.py --pack DIR --python {pyver}"
                + (f" (the folder was packed for CPython {', '.join(manifest['pythons'])})" if manifest else ""))
        return None

    chosen, report = {}, []
    for name in REQUIRED:
        p = pick(name)
        if p is None:
            raise SystemExit(f"gpu_check: {wheels} holds no {name} wheel; pack the folder with --pack")
        chosen[name] = p
    # What the required wheels ask for, against what the image has.
    wants: dict[str, list] = {}
    for p in chosen.values():
        with zipfile.ZipFile(p) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:"):
                    req = Requirement(line.split(":", 1)[1].strip())
                    if req.marker is None or req.marker.evaluate({"extra": ""}):
                        wants.setdefault(norm(req.name), []).append(req)
    unmet = []
    for name, reqs in sorted(wants.items()):
        if name in chosen:
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        ok = have is not None and all(r.specifier.contains(Version(have), prereleases=True) for r in reqs)
        if ok:
            report.append(f"{name} {have} (image)")
            continue
        p = pick(name)
        if p is None:
            unmet.append(f"{name} ({', '.join(str(r) for r in reqs)}; the image has {have or 'none'})")
            continue
        chosen[name] = p
        report.append(f"{name}: carried wheel (the image has {have or 'none'})")
    if unmet:
        raise SystemExit(f"gpu_check: this machine lacks what the carried wheels need and no wheel was carried "
                         f"for: {'; '.join(unmet)}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    files = [str(p) for p in chosen.values()]
    t0 = time.perf_counter()
    try:
        import pip  # noqa: F401

        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), *files],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gpu_check: pip install --target failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        how = "pip --no-index --no-deps --target"
    except ImportError:  # no pip: a wheel is a zip of what site-packages holds
        for f in files:
            with zipfile.ZipFile(f) as z:
                z.extractall(target)
        how = "unzipped (no pip here)"
    installed = ", ".join(sorted(f"{n} {parse_wheel(p)[1]}" for n, p in chosen.items()))
    return [f"installed into {rel(target)} ({how}, {time.perf_counter() - t0:.0f}s): {installed}",
            "image: " + "; ".join(report)]


# ============================================================================= the runs
class Job:
    def __init__(self, name: str, cfg: dict, env: dict | None = None, after: str | None = None,
                 resume_at: int | None = None):
        self.name, self.cfg, self.env, self.after, self.resume_at = name, cfg, env or {}, after, resume_at
        self.proc: subprocess.CompletedProcess | None = None
        self.seconds = 0.0
        self.start = self.end = 0.0
        self.error: str | None = None


STRATEGIES = ("ddp", "zero2", "zero3")
THREADS = {False: 2, True: 1}  # torch threads per rank: GPU machine (16 cores, runs in parallel), --cpu
BF16_METHODS = ("init", "tsd")


def build_jobs(model: Path, cpu: bool) -> list[Job]:
    """Every worker run of the check (their configs are written at run time)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from proc_group import tiny_config

    runs = WORK / "runs"
    base = tiny_config(model, runs, "base")
    base["method"].update(method="tsd", switch_step=2, dropout=0.1)
    base["train"].update(max_steps=6, checkpoint_every=1, keep_checkpoints=None)
    base["tracking"]["offline"] = True
    base["workers"].update(use_gpu=not cpu, num_workers=1, cpus_per_worker=1, threads_per_worker=THREADS[cpu])

    def cfg(name: str, **changes) -> dict:
        c = json.loads(json.dumps(base))
        c["name"] = name
        for section, values in changes.items():
            c[section].update(values)
        return c

    forced = {"TSD_FORCE_COLLECTIVES": "1"}
    if not cpu:
        forced["NCCL_DEBUG"] = "VERSION"  # NCCL prints its version when a communicator starts
    jobs = [Job("forced", cfg("forced"), forced),
            Job("shortcut", cfg("shortcut")),
            Job("resumed", cfg("resumed"), forced, after="forced", resume_at=3)]
    for strategy in STRATEGIES:
        for method in BF16_METHODS:
            jobs.append(Job(f"bf16-{strategy}-{method}", cfg(
                f"bf16-{strategy}-{method}", method={"method": method, "dropout": 0.0},
                train={"precision": "bf16", "checkpoint_every": None, "keep_checkpoints": 2},
                model={"dtype": "bfloat16"},
                deepspeed={"config": str(ROOT / "configs/deepspeed/default.json"), "strategy": strategy})))
    tiny = str(ROOT / "tests/data/tiny_train.json")
    jobs.append(Job("eval", cfg("eval", data={"test": [tiny, f"ARC-Easy={tiny}"], "task": "social_i_qa"},
                                train={"max_steps": 5, "checkpoint_every": None, "eval_limit": 4, "eval_num_beams": 2,
                                       "eval_max_new_tokens": 6, "eval_model": "partitioned"})))
    return jobs


def bench_step_args(cpu: bool) -> list[str]:
    dev = ["--device", "cpu", "--quick"] if cpu else ["--device", "cuda"]
    return ["benchmarks/bench_step.py", *dev, "--no-memory", "--variants", "lora,peft,dash", "--rounds", "8",
            "--steps", "2"]


def child_env(extra: dict, pythonpath: list[str], threads: int = 2) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_cmd(cmd: list[str], env: dict, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group, killed with everything it started on a timeout."""
    import signal

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\ngpu_check: killed after {timeout:.0f}s\n")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")


# ----------------------------------------------------------------------------- hiding (--cpu)
SITECUSTOMIZE = '''\
# Written by benchmarks/gpu_check.py --cpu: modules the GPU image lacks look uninstalled here,
# and every attempt to import one is appended to $GPU_CHECK_HIDDEN_LOG.
import os, sys, traceback
_hide = set(filter(None, os.environ.get("GPU_CHECK_HIDE", "").split(",")))
_log = os.environ.get("GPU_CHECK_HIDDEN_LOG")

class _Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _hide:
            if _log:
                frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename
                          and not f.filename.startswith("<")]
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
                with open(_log, "a") as f:
                    f.write(f"{name}\\t{where}\\n")
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, a):
        return getattr(self.inner, a)

if _hide:
    sys.meta_path[:] = [_Hide(f) if getattr(f, "__name__", "") == "PathFinder" else f for f in sys.meta_path]
'''


def hidden_modules(extra_allowed=()) -> list[str]:
    """Top-level modules installed here whose distributions the GPU image does not have (its list:
    /work/.library/device/KINDS.md, 2026-11-17, IMAGE below) and that neither the carried wheels
    nor the image's packages (as installed here, with their requirements) need."""
    import importlib.metadata as md

    allowed = {norm(n) for n in (*IMAGE, *REQUIRED, *FALLBACK, *extra_allowed)}
    todo = list(allowed)
    while todo:  # requirements of what is allowed, as installed here (e.g. huggingface_hub's http client)
        name = todo.pop()
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            dep = norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0])
            if dep not in allowed:
                allowed.add(dep)
                todo.append(dep)
    allowed.add("lora-tsd")  # this checkout (its own requirements are what is being checked)
    hide = []
    for top, dists in md.packages_distributions().items():
        if top.startswith("_") or not top.isidentifier() or top in ("pipeline", "tsd"):
            continue
        if not any(norm(d) in allowed for d in dists):
            hide.append(top)
    return sorted(hide)


# The GPU image's packages ('cuda' image, read 2026-11-17: /work/.library/device/KINDS.md).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()


# ============================================================================= the checks
def tsd_state(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "tsd_state.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def exported_updates(run: Path) -> tuple[dict, float]:
    """{layer: U} with U = scaling' B' A' from the run's stock PEFT adapter (the update against the
    ORIGINAL weight: LoRA-Init's -B0 A0 and the dash term included; free of the sign and order of
    the SVD's directions), in float64; and max |scaling B0 A0| over the layers (the size of
    LoRA-Init's move, the scale the strategies' differences are judged on)."""
    from safetensors.torch import load_file

    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, A in exported.items():
        if k.endswith("lora_A.weight"):
            out[k.rsplit(".lora_A", 1)[0]] = scaling * (exported[k.replace("lora_A", "lora_B")].double() @ A.double())
    st = tsd_state(run)
    init = [(scaling * (st[k[:-2] + "B0"].double() @ st[k].double())).abs().max().item()
            for k in st if k.endswith(".init_A0")]
    return out, max(init, default=1.0)


def run_checks(args) -> int:
    import torch

    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (--cpu runs the checks on CPU)")
        return 1
    t_all = time.perf_counter()
    deadline = t_all + args.budget
    device = torch.device("cpu" if cpu else "cuda")
    where = ("CPU (--cpu, gloo)" if cpu else
             f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"Python {sys.version.split()[0]})")
    site = [str(args.installed)] if args.installed else []
    pythonpath = [*site, str(ROOT), str(ROOT / "tests")]
    hidden_log = None
    extra_env = {}
    if cpu and not args.no_hide:
        emulate = WORK / "emulate"
        emulate.mkdir(parents=True, exist_ok=True)
        (emulate / "sitecustomize.py").write_text(SITECUSTOMIZE)
        hidden_log = WORK / "hidden_imports.tsv"
        hidden_log.unlink(missing_ok=True)
        hide = hidden_modules()
        extra_env = {"GPU_CHECK_HIDE": ",".join(hide), "GPU_CHECK_HIDDEN_LOG": str(hidden_log)}
        pythonpath.insert(0, str(emulate))
        print(f"gpu_check: emulating the GPU image: {len(hide)} modules installed here but not there look "
              f"uninstalled to the runs (e.g. {', '.join(h for h in hide if h in ('mlflow', 'ray', 'datasets'))})",
              flush=True)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, bool, float, str]] = []

    def report(name: str, ok: bool, seconds: float, detail: str) -> None:
        results.append((name, ok, seconds, detail))
        print(f"gpu_check {name}: {'PASS' if ok else 'FAIL'} ({seconds:.0f}s) {detail}", flush=True)

    # ---------------------------------------------------------------- imports (fails fast)
    t0 = time.perf_counter()
    probe = ("import sys, deepspeed, pydantic, torch, transformers, peft, accelerate, safetensors; "
             "import pipeline.launch.worker, pipeline.training.loop; "
             "print('versions:', ', '.join(f'{m.__name__} {m.__version__}' for m in "
             "(torch, transformers, peft, accelerate, safetensors, deepspeed, pydantic)), "
             "'| deepspeed from', deepspeed.__path__[0].rsplit('/', 2)[-2], "
             "'| mlflow/ray imported:', [m for m in ('mlflow', 'ray') if m in sys.modules])")
    proc = run_cmd([sys.executable, "-c", probe], child_env(extra_env, pythonpath), logs / "imports.log", 300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("versions:")), None)
    report("imports", proc.returncode == 0 and line is not None, time.perf_counter() - t0,
           line[len("versions: "):] if line else proc.stdout.strip()[-600:])
    if proc.returncode != 0:
        return summary(results, where, t_all, args, logs)

    # ---------------------------------------------------------------- the worker runs
    sys.path.insert(0, str(ROOT / "tests"))
    from proc_group import crashed_after

    import yaml

    shutil.rmtree(WORK / "runs", ignore_errors=True)
    shutil.rmtree(WORK / "model", ignore_errors=True)
    model = WORK / "model"
    made = run_cmd([sys.executable, "-c", f"from pathlib import Path; from proc_group import make_tiny_model; "
                    f"make_tiny_model(Path({str(model)!r}))"],
                   child_env(extra_env, pythonpath), logs / "model.log", 300)
    if made.returncode != 0:
        report("model", False, 0, "the tiny model could not be made: " + made.stdout.strip()[-600:])
        return summary(results, where, t_all, args, logs)
    jobs = {j.name: j for j in build_jobs(model, cpu)}
    for j in jobs.values():
        (WORK / f"{j.name}.yaml").write_text(yaml.safe_dump(j.cfg))

    def launch(j: Job) -> Job:
        if j.after:
            dep = futures[j.after].result()
            if dep.proc is None or dep.proc.returncode != 0:
                j.error = f"not run: {dep.name} failed"
                return j
            crashed_after(WORK / "runs" / dep.name, WORK / "runs" / j.name, j.resume_at)
        left = deadline - time.perf_counter() - 60  # keep a minute for the checks and step-time
        if left < 30:
            j.error = "not run: out of time (--budget)"
            return j
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "pipeline.launch.worker", str(WORK / f"{j.name}.yaml")]
        j.start = time.perf_counter()
        j.proc = run_cmd(cmd, child_env({**extra_env, **j.env}, pythonpath, THREADS[cpu]), logs / f"{j.name}.log", left)
        j.end = time.perf_counter()
        j.seconds = j.end - j.start
        if j.proc.returncode != 0:
            tail = [ln for ln in j.proc.stdout.splitlines() if ln.strip()][-6:]
            j.error = f"{j.name} exited {j.proc.returncode}: " + " | ".join(tail)[-700:]
        return j

    jobs_n = args.jobs or (2 if cpu else max(1, min(6, (os.cpu_count() or 2) // 2)))
    print(f"gpu_check: {len(jobs)} worker runs, {jobs_n} at a time", flush=True)
    with ThreadPoolExecutor(jobs_n) as pool:
        futures = {}
        for j in jobs.values():  # a run waits for the run it resumes from, submitted before it
            futures[j.name] = pool.submit(launch, j)
        for f in futures.values():
            f.result()

    def span(*names: str) -> float:
        ran = [jobs[n] for n in names if jobs[n].start]
        return max(j.end for j in ran) - min(j.start for j in ran) if ran else 0.0

    def failed(*names: str) -> str | None:
        errs = [jobs[n].error for n in names if jobs[n].error]
        return "; ".join(errs) if errs else None

    def check(name: str, runs: tuple[str, ...], fn) -> None:
        t0 = time.perf_counter()
        err = failed(*runs)
        if err:
            report(name, False, span(*runs), err)
            return
        try:
            detail, ok = fn()
        except Exception as e:  # a check that cannot judge is a failure, reported on its line
            detail, ok = f"{type(e).__name__}: {str(e)[:400]}", False
        report(name, ok, span(*runs) + time.perf_counter() - t0, detail)

    runs = WORK / "runs"

    def nccl_forced():
        st = tsd_state(runs / "forced")
        init = [int(v) for k, v in st.items() if k.endswith(".init_step")]
        dash = [int(v) for k, v in st.items() if k.endswith(".dash_step")]
        both = bool(init) and bool(dash) and min(init) >= 0 and min(dash) >= 0
        d = max_diff(st, tsd_state(runs / "shortcut"))
        files = sorted(p.name for p in (runs / "forced/adapter").iterdir())
        backend, nccl_seen = "", True
        if not cpu:  # NCCL_DEBUG=VERSION: NCCL prints its version when its first communicator starts
            m = re.search(r"NCCL version ([\w.+]+)", jobs["forced"].proc.stdout)
            nccl_seen = m is not None
            backend = f"NCCL {m.group(1)}; " if m else "NCCL's version line NOT seen (was NCCL used?); "
        ok = both and d <= 1e-5 and "adapter_model.safetensors" in files and nccl_seen
        return (f"{backend}{len(init)} layers through both switches (init at {min(init, default=-1)}, dash at "
                f"{min(dash, default=-1)}); max |forced - shortcut| = {d:.2e} (<= 1e-5); export {', '.join(files)}",
                ok)

    def bf16_master_copies():
        parts, ok = [], True
        for method in BF16_METHODS:
            ref, init_scale = exported_updates(runs / f"bf16-zero3-{method}")
            for strategy in STRATEGIES:
                run = runs / f"bf16-{strategy}-{method}"
                st = tsd_state(run)
                finite = all(torch.isfinite(v.double()).all().item() for v in st.values() if v.is_floating_point())
                near = 0.0  # the run's own A, B against the init factors its switch recorded
                for k in st:
                    if k.endswith(".init_A0") or k.endswith(".init_B0"):
                        own = k.rsplit(".", 1)[0] + (".lora_A" if k.endswith("A0") else ".lora_B")
                        x0 = st[k].double()
                        near = max(near, (st[own].double() - x0).abs().max().item() / max(x0.abs().max().item(), 1e-12))
                rel = 0.0
                if strategy != "zero3":
                    upd, _ = exported_updates(run)
                    rel = max((upd[n] - ref[n]).abs().max().item() for n in ref) / init_scale
                good = finite and near <= NEAR_INIT and rel <= BF16_TOL
                ok &= good
                parts.append(f"{strategy}/{method} {'ok' if good else 'BAD'}: near init {near:.3f}"
                             + (f", vs zero3 {rel:.4f}" if strategy != "zero3" else "")
                             + ("" if finite else ", NOT FINITE"))
        return (f"{'; '.join(parts)} (limits: |A-A0|, |B-B0| <= {NEAR_INIT} of max |A0|, |B0|; vs zero3: the exported "
                f"updates U = scaling B'A' differ by <= {BF16_TOL:.4f} of max |scaling B0 A0|; an undone LoRA-Init "
                f"is ~1 on both)", ok)

    def cuda_rng_resume():
        d = max_diff(tsd_state(runs / "resumed"), tsd_state(runs / "forced"))
        log = jobs["resumed"].proc.stdout
        resumed = "resumed from" in log
        return (f"max |resumed - uninterrupted| = {d:.2e} (<= 1e-5); dropout 0.1; "
                f"{'resumed from the step-3 checkpoint' if resumed else 'NO resume line in the log'}",
                d <= 1e-5 and resumed)

    def eval_generation():
        out = runs / "eval/eval"
        metrics = json.loads((out / "metrics.json").read_text())
        rows = {t: len((out / f"predictions/{t}.jsonl").read_text().splitlines()) for t in ("social_i_qa", "ARC-Easy")}
        partitioned = "with the partitioned model" in jobs["eval"].proc.stdout
        return (f"{'partitioned' if partitioned else 'NOT partitioned'} ZeRO-3 generation; rows {rows}; "
                f"metrics {json.dumps(metrics.get('metrics', metrics))[:200]} (random-init model: accuracy 0 expected)",
                partitioned and all(n == 4 for n in rows.values()))

    def bf16_export():
        return export_check(runs / "bf16-zero3-tsd", model, device)

    check("nccl-forced", ("forced", "shortcut"), nccl_forced)
    check("bf16-master-copies", tuple(f"bf16-{s}-{m}" for s in STRATEGIES for m in BF16_METHODS), bf16_master_copies)
    check("cuda-rng-resume", ("forced", "resumed"), cuda_rng_resume)
    check("eval-generation", ("eval",), eval_generation)
    check("bf16-export", ("bf16-zero3-tsd",), bf16_export)

    # ---------------------------------------------------------------- step time, alone
    t0 = time.perf_counter()
    left = deadline - time.perf_counter()
    if left < 45:
        report("step-time", False, 0, f"not run: out of time (--budget {args.budget}s)")
    else:
        proc = run_cmd([sys.executable, *bench_step_args(cpu)], child_env(extra_env, pythonpath),
                       logs / "step-time.log", left - 5)
        vals = dict(re.findall(r"^(\w+_over_lora(?:_wall)?)=([\d.]+|nan)$", proc.stdout, re.M))
        model_line = next((ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("# model:")), "")
        if proc.returncode == 0 and "dash_over_lora" in vals and "peft_over_lora_wall" in vals:
            dash, peft = float(vals["dash_over_lora"]), float(vals["peft_over_lora_wall"])
            report("step-time", True, time.perf_counter() - t0,
                   f"dash/LoRA {dash:.3f} (goal <= 1.03), stock PEFT/lora-tsd LoRA {peft:.3f} "
                   f"({'CPU time' if cpu else 'wall'}; medians per round; {model_line})")
        else:
            report("step-time", False, time.perf_counter() - t0, proc.stdout.strip()[-600:])

    if hidden_log is not None:
        asked = {}
        if hidden_log.is_file():
            for ln in hidden_log.read_text().splitlines():
                name, _, caller = ln.partition("\t")
                asked.setdefault(name.split(".")[0], set()).add(caller.split("site-packages/")[-1])
        print("gpu_check: imports of modules the GPU image lacks (they found nothing, and the runs went on): "
              + ("; ".join(f"{n} from {', '.join(sorted(w)[:3])}" for n, w in sorted(asked.items())) or "none"))
    return summary(results, where, t_all, args, logs)


def export_check(run: Path, model_dir: Path, device) -> tuple[str, bool]:
    """The run's bf16 adapter: stock PEFT loads it, finite; the exported update (W + scaling' B'A',
    from adapter_model.safetensors) equals the trained model's (W_res + scaling B A + the dash term,
    the model `tsd.load_adapter` rebuilds from the sidecar, as tests/test_export.py shows it
    reproduces the run's model) within half an ulp of W_res (+ the float32 rounding of the dash
    block), in float64; the merged PEFT model's logits match that model's within bf16 rounding."""
    import warnings

    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tsd

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    finite = all(torch.isfinite(v.double()).all().item() for v in exported.values())

    def base():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)

    ours = base()
    tsd.load_adapter(ours, adapter)
    originals = dict(base().named_modules())
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    worst, n_layers = 0.0, 0
    with torch.no_grad():
        for name, layer in tsd.tsd_layers(ours):
            key = next(k for k in exported if k.endswith(f"{name}.lora_A.weight"))
            A, B = exported[key].double(), exported[key.replace("lora_A", "lora_B")].double()
            w_res = layer.base_layer.weight.double()
            eff_export = originals[name].weight.double() + scaling * (B @ A)
            update = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
            allowance = torch.zeros_like(w_res)
            if layer.dash_size and layer.dash_active:
                c = layer.scaling if layer.dash_scaled else 1.0
                U, V, d = layer.dash_U.double(), layer.dash_V.double(), layer.dash_scalars.double() * c
                update = update + (U * d) @ V.mT
                allowance = 0.5 * torch.finfo(torch.float32).eps * (U.abs() * d.abs()) @ V.abs().mT
            ulp = torch.exp2(torch.floor(torch.log2(w_res.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))) \
                * torch.finfo(torch.bfloat16).eps
            excess = (w_res + update - eff_export).abs() - allowance
            worst = max(worst, float((excess / ulp).max()))
            n_layers += 1
    peft_model = PeftModel.from_pretrained(base(), str(adapter))
    lora_finite = all(torch.isfinite(p).all().item() for n, p in peft_model.named_parameters() if "lora_" in n)
    merged = peft_model.merge_and_unload().to(device).eval()
    ours = ours.to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, ours.config.vocab_size, (2, 16), generator=g).to(device)
    with torch.no_grad():
        a = ours(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    gap, scale = (a - b).abs().max().item(), a.abs().max().item()
    logits_tol = 2 ** -5 * scale  # bf16 weights (8 bits) and activations: a few ulps of the largest logit
    ok = finite and lora_finite and n_layers > 0 and worst <= 0.5 + 1e-6 and gap <= logits_tol
    return (f"stock PEFT loaded it (rank {r}, {n_layers} layers, finite {finite and lora_finite}); exported update vs "
            f"trained model: {worst:.3f} ulp of W_res (<= 0.5); merged-PEFT logits vs the run's model: max |diff| "
            f"{gap:.3e} (<= {logits_tol:.3e} = 2^-5 of max |logit| {scale:.2f})", ok)


def summary(results, where: str, t_all: float, args, logs: Path) -> int:
    passed = sum(ok for _, ok, _, _ in results)
    print(f"gpu_check: {passed}/{len(results)} passed on {where} in {time.perf_counter() - t_all:.0f}s", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(
            {"device": where,
             "results": [dict(name=n, ok=ok, seconds=round(s, 1), detail=d) for n, ok, s, d in results]},
            indent=1))
        with tarfile.open(out / "gpu_check_logs.tar.gz", "w:gz") as tar:
            for f in sorted(logs.glob("*.log")):
                tar.add(f, arcname=f.name)
    return 0 if passed == len(results) else 1


# ============================================================================= entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pack", metavar="DIR",
                      help="put the wheels the GPU machine lacks into DIR (needs the registry)")
    mode.add_argument("--dry-run", action="store_true", help="check the wheel list (and --wheels DIR), the size, "
                      "print the commands; downloads nothing")
    p.add_argument("--wheels", metavar="DIR", help="install these wheels (no network) and run the checks")
    p.add_argument("--cpu", action="store_true", help="run the checks on CPU/gloo (tests this script)")
    p.add_argument("--python", action="append", default=None, help="with --pack/--dry-run: CPython version(s) "
                   f"for the compiled wheels (default {', '.join(PYTHONS)})")
    p.add_argument("--jobs", type=int, default=None, help="worker runs at a time (default: 1 on CPU, "
                   "min(6, cores/2) on a GPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 540; --cpu 2400)")
    p.add_argument("--out", default=None, help="also write gpu_check.json and the runs' logs (a .tar.gz) here")
    p.add_argument("--no-hide", action="store_true", help="--cpu: do not hide the modules the GPU image lacks")
    p.add_argument("--installed", type=Path, default=None, help=argparse.SUPPRESS)  # the re-run after install
    args = p.parse_args(argv)
    pythons = tuple(args.python) if args.python else PYTHONS
    if args.budget is None:
        args.budget = 2400.0 if args.cpu else 540.0
    if args.pack:
        return pack(Path(args.pack).absolute(), pythons)
    if args.dry_run:
        return dry_run(Path(args.wheels).absolute() if args.wheels else None, pythons)
    if args.wheels and args.installed is None:
        t0 = time.perf_counter()
        target = WORK / "site"
        lines = install(Path(args.wheels).absolute(), target)
        print(f"gpu_check: {lines[0]}\ngpu_check: {lines[1]}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(target), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        again = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                 "--installed", str(target), "--budget", str(max(60.0, args.budget - (time.perf_counter() - t0)))]
        return subprocess.run(again, env=env).returncode
    sys.path.insert(0, str(ROOT))
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
