"""Peak memory per phase (pipeline.training.memory): each phase is charged its own peak only."""

import torch

from pipeline.training.memory import PhaseMemory


def test_each_phase_reports_its_own_peak_not_an_earlier_ones():
    mem = PhaseMemory()
    mem.enter("small")
    small = torch.ones(2**20)  # 4 MiB, touched
    mem.enter("big")
    big = torch.ones(100 * 2**18)  # 100 MiB, touched
    del big
    mem.enter("after")  # the 100 MiB were freed (and handed back) before this phase
    more = torch.ones(2**20)
    peaks = mem.finish()
    assert peaks["peaks_reset"], "this Linux cannot reset VmHWM: peaks would be cumulative"
    rss = peaks["rss_mb"]
    assert rss["big"] - rss["small"] > 90, rss
    assert rss["after"] < rss["big"] - 80, rss
    mem.enter("big")  # a phase entered again keeps its largest peak
    assert mem.finish()["rss_mb"]["big"] == rss["big"]
    del small, more


def test_frozen_start_up_objects_leave_later_cycles_collectable():
    """A rank freezes what its imports left (freeze_startup_objects): collections skip those, and
    a model built afterwards is still freed by one when it is dropped in a reference cycle."""
    import gc
    import weakref

    from pipeline.training.memory import freeze_startup_objects

    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 100_000, "deepspeed's and torch's objects should be frozen"
        model = torch.nn.Linear(64, 64)
        model.self_ref = [model]  # a cycle: only the collector frees it
        gone = weakref.ref(model)
        del model
        gc.collect()
        assert gone() is None, "an object made after the freeze must still be collected"
    finally:
        gc.unfreeze()  # this is pytest's process, not a rank's


def test_cpu_by_process_counts_a_child_it_never_reaps(tmp_path):
    """benchmarks/cpu_by_process.py (docs/TESTING.md's machine-wide figures): a process that burns
    CPU for 2 s is listed with at least the second it was seen for; the summary totals it."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    marker = f"burn-{os.getpid()}-{time.time_ns()}"
    burn = f"import time; t = time.process_time()\nwhile time.process_time() - t < 2: pass  # {marker}"
    out = tmp_path / "cpu.jsonl"
    proc = subprocess.run([sys.executable, str(root / "benchmarks/cpu_by_process.py"), "--out", str(out), "--",
                           sys.executable, "-c", burn], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    mine = [r for r in rows if marker in r["cmdline"] and "cpu_by_process" not in r["cmdline"]]  # not the sampler
    assert len(mine) == 1 and 0.9 <= mine[0]["cpu_s"] <= 2.5, mine
    assert "pytest and test helpers" in proc.stdout and "all" in proc.stdout
