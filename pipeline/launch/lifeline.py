"""A rank ends with its launcher (torchrun, the DeepSpeed launcher): `die_with_launcher`.

`kill -9` of torchrun left its ranks training as orphans: they went on writing checkpoints, the
adapter and MLflow metrics with nobody to stop them, and a rerun met a live run in its folder.
`pipeline.launch.worker` calls `die_with_launcher()` first:

- prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel sends this rank SIGTERM when its parent ends,
  however it ends. The parent of a rank is torchrun itself (its agent runs in torchrun's
  process) or, under the DeepSpeed launcher, DeepSpeed's launch.py. SIGTERM keeps its default
  action in a rank: the process ends at once, even while its main thread waits in a collective
  (a Python handler would run only when that wait returns).
- The parent may have ended before prctl was called (during the interpreter's start): the parent
  recorded when this module was imported (the worker imports it first) is compared with the one
  now, and a rank whose launcher is already gone leaves.
- The DeepSpeed launcher is two processes: `deepspeed` (the runner) starts launch.py, which
  starts the ranks. `kill -9` of the runner, or on one node even a plain `kill` (the local runner
  forwards no signal), leaves launch.py and its ranks running. When a rank's parent is launch.py
  started by the runner, a daemon thread checks every WATCH_S that launch.py still has that parent,
  and ends the rank when it has not (launch.py then sees its ranks fail and ends too). With a
  hostfile the runner reaches the nodes through pdsh/ssh: launch.py's parent is the remote
  shell, whose end (the ssh session closing) ends launch.py, and prctl ends the ranks.
- Only under a launcher (LOCAL_RANK set, as torchrun and launch.py set it): a worker started by
  hand keeps running when the shell that started it ends (nohup). Ray's workers are Ray's actors:
  Ray ends them with their job, and they never come here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_S = 1.0
_PARENT_AT_IMPORT = os.getppid()  # the launcher, recorded as early as the worker can


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def deepspeed_runner(parent: int) -> int | None:
    """The pid of the `deepspeed` runner when `parent` is DeepSpeed's launch.py started by it on
    this node; None otherwise."""
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return None
    runner = _parent_of(parent)
    argv = _cmdline(runner) if runner else []
    named = any(os.path.basename(a) in ("deepspeed", "ds") for a in argv[:2])
    return runner if named or "deepspeed.launcher.runner" in argv else None


def _leave(why: str) -> None:
    print(f"[tsd] stopping: {why}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _watch_runner(launch_py: int, runner: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_S):
        if _parent_of(launch_py) != runner:
            _leave(f"the DeepSpeed launcher (pid {runner}) has ended")
            return


def die_with_launcher() -> None:
    """Make this rank end when its launcher does (see the module's doc). No-op off Linux and
    outside a launcher."""
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        print(f"[tsd] warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank "
              f"may outlive its launcher", file=sys.stderr)
    parent = os.getppid()
    if parent != _PARENT_AT_IMPORT:  # it ended before prctl could watch it
        print(f"[tsd] error: this rank's launcher (pid {_PARENT_AT_IMPORT}) ended before the rank started; exiting",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    runner = deepspeed_runner(parent)
    if runner is not None:
        threading.Thread(target=_watch_runner, args=(parent, runner), name="tsd-launcher-watch", daemon=True).start()
