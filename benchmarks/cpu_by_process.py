"""Where a command's CPU time goes, machine-wide, by kind of process: ranks, launchers, Ray's
daemons and workers, compilers, pip, the tsd CLI, MLflow servers.

    python benchmarks/cpu_by_process.py --out /tmp/cpu.jsonl -- make test

The command runs while every process on the machine is sampled once a second (/proc/<pid>/stat);
at the end each process that started after the sampling began is written to --out (pid, start,
CPU seconds, command line) and the totals per kind are printed. Unlike the test profile
(TSD_TEST_PROFILE, docs/TESTING.md), it sees processes nobody reaps: Ray's raylet, dashboard and
workers, a server a test leaves to its fixture. A process's last second before it exits is not
seen, nor a process that lives less than a second: the totals are a lower bound. The sampling
itself costs ~0.3% of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# First match wins: a torchrun agent's command line names the worker module too, so it comes first.
KINDS = [
    ("torchrun agent", "torch.distributed.run"),
    ("DeepSpeed launcher", "deepspeed.launcher"),
    ("rank (worker entry)", "pipeline.launch.worker"),
    ("Ray worker or daemon", "ray"),
    ("C++ compiler (DeepSpeed op)", "cc1plus"),
    ("pip / compileall", "pip"),
    ("pip / compileall", "compileall"),
    ("tsd CLI", "bin/tsd"),
    ("tsd CLI", "pipeline.launch.cli"),
    ("MLflow server", "mlflow"),
    ("MLflow server", "uvicorn"),
    ("pytest and test helpers", "python"),
]


def kind(cmdline: str) -> str:
    return next((name for name, key in KINDS if key in cmdline), "other")


def sample(seen: dict) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu, start = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[19])
            key = (int(entry), start)
            if key not in seen:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    seen[key] = [cpu, f.read().replace(b"\0", b" ").decode(errors="replace")[:400]]
            seen[key][0] = max(seen[key][0], cpu)
        except (OSError, IndexError):
            continue  # ended while we looked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per process")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to measure after --")
    with open("/proc/self/stat") as f:
        since = int(f.read().rsplit(")", 1)[1].split()[19])  # this process's start: older ones are not counted
    seen: dict = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen)
        time.sleep(1.0)
    sample(seen)
    wall = time.monotonic() - t0
    mine = {k: v for k, v in seen.items() if k[1] >= since and v[0] > 0}
    with open(args.out, "w") as f:
        for (pid, start), (cpu, cmdline) in mine.items():
            f.write(json.dumps({"pid": pid, "start": start, "cpu_s": cpu, "cmdline": cmdline}) + "\n")
    totals, counts = Counter(), Counter()
    for cpu, cmdline in mine.values():
        totals[kind(cmdline)] += cpu
        counts[kind(cmdline)] += 1
    print(f"\n{'kind':32s} {'processes':>9s} {'CPU s':>8s}")
    for name, cpu in totals.most_common():
        print(f"{name:32s} {counts[name]:9d} {cpu:8.0f}")
    print(f"{'all':32s} {sum(counts.values()):9d} {sum(totals.values()):8.0f}  in {wall:.0f} s of wall time "
          f"({sum(totals.values()) / wall / os.cpu_count():.0%} of {os.cpu_count()} cores)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
