"""Peak memory of each phase of a run, per rank: load, resume, train, switch, checkpoint, export,
evaluate. ZeRO-3 is there so that no rank ever holds the whole model; this is how a run shows it.

Per phase, the resident set's high-water mark (Linux VmHWM, reset at each phase's start through
/proc/self/clear_refs) and, on a GPU, `torch.cuda.max_memory_allocated` (reset likewise). At each
phase's start freed heap is handed back to the OS first (gc, glibc malloc_trim), so a phase is
not charged for what an earlier one freed but the allocator kept. A phase entered several times
(train, switch, checkpoint) reports its largest peak. Rank 0 gathers every rank's figures into
`<run>/memory.json` and logs the largest over the ranks as `peak_rss_mb_<phase>` (and
`peak_cuda_mb_<phase>`) to MLflow.
"""

from __future__ import annotations

import ctypes
import gc

import torch

from pipeline.paths import write_json_atomic
from tsd import collectives

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (musl, macOS)
    _LIBC = None

def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """This process's resident memory now, MiB (nan where /proc is missing). The one RSS reader
    of the project: the phases here and the benchmarks (benchmarks/_common.py) use it."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM) since the start or the last reset, MiB."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel cannot (Linux < 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size" (Linux >= 4.0)
        return True
    except OSError:
        return False


def freeze_startup_objects() -> None:
    """Put every object alive now out of the garbage collector's reach (gc.freeze), once per rank
    process, after the imports and before training. torch, transformers, DeepSpeed and MLflow
    leave ~520k objects that live as long as the process; each full collection walked them all,
    0.28 s of CPU on this machine, and a rank collects at every phase (`trim_heap`) and when it
    leaves its process group: ~2 s a rank, a sixth of a tiny run's CPU time. Objects made
    later are collected as before. Only for a process that runs one training (a rank): in a
    long-lived process the cycles frozen here could never be collected. Called before the model
    is built: a model, optimizer or dataset frozen here would never be freed by a collection."""
    import deepspeed  # noqa: F401  every rank's engine needs it: its objects (and MLflow's, which it imports) too

    gc.collect()  # what is already garbage goes now, not into the frozen generation
    gc.freeze()


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back, so the next peak starts from a clean RSS."""
    gc.collect()
    release_freed_heap()


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim, which also releases whole
    free pages in the middle of the heap). ZeRO-3 gathers and frees full weights all the time;
    once glibc's dynamic mmap threshold has risen past a weight's size those buffers come from
    the heap, and what is freed stays resident (benchmark 3 and 7 measured ~0.9 GB per rank
    for a 2.3 GB model). Called after every optimizer step on a tight ZeRO-3 rank and every
    generation call on a partitioned model, nowhere else: the next step faults the returned
    pages back in, which cost 12% of a step where memory was not short (benchmark 8)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


class PhaseMemory:
    """`enter(phase)` closes the current phase (its peak is recorded) and opens the next."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.rss_mb: dict[str, float] = {}
        self.cuda_mb: dict[str, float] = {}
        self.resets = True  # False where the high-water mark cannot be reset: peaks are since the start
        self.baseline_rss_mb = rss_mb()  # the process before the model: interpreter, libraries

    def enter(self, phase: str) -> None:
        self._close()
        trim_heap()
        self.resets = reset_peak_rss() and self.resets
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.current = phase

    def _close(self) -> None:
        if self.current is None:
            return
        self.rss_mb[self.current] = max(self.rss_mb.get(self.current, 0.0), peak_rss_mb())
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
            self.cuda_mb[self.current] = max(self.cuda_mb.get(self.current, 0.0), peak)
        self.current = None

    def finish(self) -> dict:
        """This rank's peaks ({"rss_mb": {phase: MB}, "cuda_mb": ..., "peaks_reset": bool})."""
        self._close()
        return {"rss_mb": dict(self.rss_mb), "cuda_mb": dict(self.cuda_mb), "peaks_reset": self.resets,
                "baseline_rss_mb": self.baseline_rss_mb}


def gather_and_log(memory: PhaseMemory, tracker, run_dir, step: int) -> dict | None:
    """Every rank's peaks to rank 0: `<run>/memory.json` and the per-phase maxima as metrics.
    Every rank calls it; returns the table on rank 0 (None elsewhere)."""
    from pipeline.training.distributed import rank_and_world

    mine = memory.finish()
    rank, _ = rank_and_world()
    table = collectives.all_gather_object(mine)
    if rank != 0:
        return None
    metrics = {}
    for kind in ("rss_mb", "cuda_mb"):
        for phase in table[0][kind]:
            metrics[f"peak_{kind}_{phase}"] = max(t[kind].get(phase, 0.0) for t in table)
    tracker.log_metrics(metrics, step)
    out = {"ranks": table, "max_over_ranks": metrics}
    write_json_atomic(run_dir / "memory.json", out)
    tracker.log_artifact(run_dir / "memory.json", "memory")
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
TIGHT_MMAP_THRESHOLD = 4 * 2**20


def return_large_frees_to_os() -> str:
    """For a rank short of memory: glibc serves every allocation of 4 MiB or more with its own
    mmap, so a freed gather buffer goes back to the OS at once. By default glibc raises that
    threshold as large blocks are freed (up to 32 MiB), after which ZeRO-3's gather buffers come
    from the heap and stay resident when freed: measured on a 2.3 GB model, 2 ranks, per-phase
    peaks fell from up to 2.65x to at most 1.88x a rank's share, for 25% more time per step
    (fresh pages for every gathered weight). A MALLOC_MMAP_THRESHOLD_ set by the user wins."""
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (set by the environment)"
    if _LIBC is None or not hasattr(_LIBC, "mallopt") or _LIBC.mallopt(M_MMAP_THRESHOLD, TIGHT_MMAP_THRESHOLD) != 1:
        return "glibc's default (mallopt unavailable)"
    return f"allocations >= {TIGHT_MMAP_THRESHOLD >> 20} MiB mapped and returned on free"


# ----------------------------------------------------------------------------- does a whole model fit a rank?
def rank_memory_budget() -> tuple[int, str]:
    """(bytes, where from) one rank may use when workers.memory_budget_gb is unset: on a GPU,
    its free memory plus what this process holds there; on CPU, the node's available memory
    shared by its ranks (ranks on the same host counted through the process group)."""
    import socket

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()  # of the GPU this rank is bound to (bind_device ran first)
        return free + torch.cuda.memory_allocated(), "free GPU memory + this rank's"
    hosts = collectives.all_gather_object(socket.gethostname())
    local = max(1, hosts.count(socket.gethostname()))
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return available // local, f"MemAvailable / {local} rank(s) on this node"


def smallest_budget(cfg) -> tuple[int, str]:
    """(bytes, where from): the smallest memory budget over all ranks (workers.memory_budget_gb,
    else each rank's measured budget, all-reduced). Every rank must call it."""
    if cfg.workers.memory_budget_gb is not None:
        return int(cfg.workers.memory_budget_gb * 2**30), "workers.memory_budget_gb"
    budget, source = rank_memory_budget()
    if collectives.active():
        budget = int(collectives.all_reduce(torch.tensor([budget], dtype=torch.int64), op="min").item())
        source = f"{source}, the smallest over the ranks"
    return budget, source


def whole_model_fits(cfg, need: int | None, headroom: float) -> tuple[bool, str]:
    """Whether `need` bytes x `headroom` fit EVERY rank's budget (the smallest: `smallest_budget`),
    with why. Every rank must call it (all ranks take the same, collective, path). `need` None
    (unknown) never fits."""
    budget, source = smallest_budget(cfg)
    ok = need is not None and need * headroom <= budget
    size = "of unknown size" if need is None else f"{need / 2**30:.2f} GiB"
    return ok, (f"the whole model, {size} x {headroom} headroom, {'fits' if ok else 'does not fit'} "
                f"every rank's budget of {budget / 2**30:.2f} GiB ({source})")
