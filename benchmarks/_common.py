"""Shared helpers of the benchmarks: device choice, statistics, tables, memory, machine info.

Every benchmark measures ratios against a baseline in the same run, interleaves its variants,
warms up, repeats, prints a table of medians with their spread, and ends with one line
`name=value` holding its headline ratio.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PYTHON = sys.executable


# ----------------------------------------------------------------------------- device
def pick_device(arg: str = "auto"):
    """`auto`: CUDA when present, else CPU."""
    import torch

    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return dev


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


# Random-init LLaMA-7B-shaped layers (used on a GPU).
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
# SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads).
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- statistics
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs):
    """(q1, q3): the interquartile range, the spread reported with every median."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def fmt_spread(xs, unit_scale: float = 1.0, digits: int = 3) -> str:
    """'median [q1, q3] (n)'."""
    q1, q3 = quartiles(xs)
    s = unit_scale
    return f"{med(xs) * s:.{digits}f} [{q1 * s:.{digits}f}, {q3 * s:.{digits}f}] (n={len(xs)})"


def table(headers, rows) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- memory (Linux)
# One RSS reader for the project and its benchmarks (pipeline/training/memory.py).
from pipeline.training.memory import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402,F401
from pipeline.training.memory import trim_heap as trim_malloc  # noqa: E402,F401


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": "%.2f %.2f %.2f" % load,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_header(name: str, args) -> None:
    info = machine_info()
    print(f"# benchmark {name}: " + " ".join(sys.argv[1:]))
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("# load average above nproc means the cores were shared with other work during the run", flush=True)


def print_footer_load() -> None:
    load = os.getloadavg()
    print(f"# load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (nproc {os.cpu_count()})")


def headline(name: str, value: float) -> None:
    print(f"{name}={value:.4f}", flush=True)


def work_dir(prefix: str) -> Path:
    """A scratch folder for models, SVD caches and run stores (gigabytes for the switch
    benchmarks), removed when the script exits, also on an error. TSD_BENCH_KEEP=1 keeps it."""
    import atexit
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("TSD_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work
