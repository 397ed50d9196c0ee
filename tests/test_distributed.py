"""A rank's way out (pipeline.training.distributed): no rank may abort at exit after its work is done.

The failure this guards against: a gloo worker thread drops its last collective's tensors after
the interpreter's teardown has begun and the process dies with "terminate called without an
active exception" (SIGABRT). It needs gloo's threads alive at exit: after a ZeRO-3 run they
always are, DeepSpeed's own references keep the groups past `destroy_process_group`.
With sys.exit in place of `end_process`, the first test failed twice out of two, at runs 3 and 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from proc_group import ROOT, child_env, free_port

RUNS = 8

_RANK = """
import atexit, sys
import torch.distributed as dist
from pipeline.training.distributed import end_process, gloo_worker_threads, leave_process_group

atexit.register(print, "atexit handlers ran", flush=True)
dist.init_process_group("gloo")
held = dist.new_group(list(range(dist.get_world_size())))  # as DeepSpeed makes a group of its own
for i in range(20):  # all_gather_object: tensors whose Python objects are gone when it returns
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"step": i})
    dist.all_gather_object(parts, i, group=held)
if sys.argv[1] == "leave":
    del held  # nothing but torch holds a group now
    leave_process_group(together=False)
    print(f"gloo worker threads after leaving: {gloo_worker_threads()}", flush=True)
# "busy": out right after the last collective with the groups alive, the narrowest window
# (leave_process_group's barrier and destroy only narrow it, and leave DeepSpeed's groups alive)
end_process(0)
"""


def _two_ranks(mode: str, timeout: int = 120) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each of two ranks running _RANK."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), PYTHONPATH=str(ROOT))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, mode], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))  # fmt: skip
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:  # a rank left waiting for an aborted peer, or past the timeout
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


@pytest.mark.slow
def test_ranks_exit_cleanly_while_gloo_threads_are_alive():
    """RUNS two-rank runs of the exit path alone, each rank leaving right after its last
    collective: every rank exits 0, every time, having run its atexit handlers."""
    for run in range(RUNS):
        for rank, (rc, out, err) in enumerate(_two_ranks("busy")):
            assert rc == 0 and "terminate called" not in err, f"run {run}, rank {rank}: rc {rc}\n{err[-2000:]}"
            assert "atexit handlers ran" in out, out


@pytest.mark.slow
def test_leaving_joins_gloo_threads_when_nothing_else_holds_the_groups():
    """When only torch holds the groups, leaving destroys them and joins their threads, and the
    process then exits the usual way (sys.exit) with its atexit handlers."""
    for rank, (rc, out, err) in enumerate(_two_ranks("leave")):
        assert rc == 0, f"rank {rank}: rc {rc}\n{err[-2000:]}"
        assert "gloo worker threads after leaving: 0" in out and "atexit handlers ran" in out, out
