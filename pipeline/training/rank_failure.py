"""A failure on any rank ends the whole job promptly, with that rank's message.

Under the DeepSpeed launcher and torchrun, a rank that raises must not linger: its peers may be
blocked in a collective with it (gloo waits up to its timeout, 30 minutes by default) or busy in
a long SVD, and its own way out (`destroy_process_group`, the interpreter's teardown) can itself
wait on them. `end_job`, called on the failing rank:

1. prints the traceback and one line naming the rank and the error;
2. records that line for torchrun's failure summary (TORCHELASTIC_ERROR_FILE);
3. publishes it in the process group's store (the first failure wins);
4. waits a moment (at most ACK_WAIT_S) until every other rank has acknowledged: each rank's
   watcher thread (`watch`) polls the store, sees the line within POLL_S even while its main
   thread is blocked in a collective, gives its main thread OWN_REPORT_GRACE_S to report an
   error of its own (every rank fails a shared check together), then prints the line, runs its
   callbacks (rank 0 marks the MLflow run it made FAILED), acknowledges and leaves with os._exit;
5. leaves with os._exit(code): no further collective, no destroy_process_group; a SIGTERM from
   the launcher while it waits ends it with the same code.

The acknowledgement is why the failing rank waits at all: the launcher reacts to the first
non-zero exit by terminating the other ranks (torchrun's agent and the DeepSpeed launcher both
send SIGTERM, then SIGKILL after 30 s), which would cut rank 0 off before it marks the run FAILED.

Under Ray Train none of this runs: the exception goes back to the Train controller, which shows
the rank's error and tears the worker group down itself (measured ~3 s), and the driver marks the
run FAILED.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from pipeline.logs import log
from pipeline.tracking.secrets import mask_secrets
from pipeline.training.distributed import exit_now, rank_and_world

POLL_S = 0.2  # how often a watcher looks for a failure: the job ends within about this much of it
ACK_WAIT_S = 15.0  # the most the failing rank waits for the others (e.g. rank 0 ending an MLflow run)
# How long a watcher lets its own rank report an error first. A check every rank makes after one
# collective (the base's fingerprint at a resume) fails on every rank at once, and each should
# exit with its own message and code; on a busy machine one rank's main thread can reach
# `end_job` a scheduling delay after a peer published the same failure. A rank blocked in a
# collective with the failed one leaves this much later.
OWN_REPORT_GRACE_S = 2.0

_lock = threading.Lock()
_leaving = False  # this process has begun to leave, by its own failure or a peer's
_callbacks: list[Callable[[str], None]] = []
_stop = threading.Event()
_thread: threading.Thread | None = None


def _keys() -> tuple[str, str, str, str]:
    # torchrun keeps its store across restarts of the worker group: a failure of an earlier
    # attempt must not end the next one.
    base = f"tsd/failure/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return f"{base}/count", f"{base}/first", f"{base}/acks", f"{base}/done"


def _ack(store, rank: int) -> None:
    """Acknowledge the first failure. Rank 0 then stays until the failing rank is done with the
    store: under the DeepSpeed launcher and Ray rank 0 serves it, and a store that vanishes under
    a client costs that client a C++ stack dump in the log."""
    _, _, acks_key, done_key = _keys()
    try:
        store.add(acks_key, 1)
        deadline = time.monotonic() + ACK_WAIT_S
        while rank == 0 and not store.check([done_key]) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass


def _store():
    """The key-value store every rank of the default process group shares, or None."""
    try:
        # Private, but the only handle on the store init_process_group built (torchrun's agent
        # serves it; under the DeepSpeed launcher rank 0 does). A separate store would need a
        # port of its own agreed on by every launcher.
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def on_peer_failure(callback: Callable[[str], None]) -> None:
    """Run `callback(line)` on this rank when another rank fails, before this rank leaves
    (from the watcher thread; it must not enter a collective)."""
    _callbacks.append(callback)


def watch() -> None:
    """Start this rank's watcher thread (idempotent). It waits for the process group, then
    polls the store for a failure of another rank."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()
    _thread = threading.Thread(target=_watch, name="tsd-rank-failure-watch", daemon=True)
    _thread.start()


def stop() -> None:
    """Stop watching (a normal end: before the process group goes away)."""
    _stop.set()
    _callbacks.clear()
    if _thread is not None and _thread is not threading.current_thread():
        _thread.join(timeout=2 * POLL_S + 1)


def _watch() -> None:
    global _leaving
    while not (dist.is_available() and dist.is_initialized()):
        if _stop.wait(POLL_S):
            return
    rank, world = rank_and_world()
    store = _store()
    if world < 2 or store is None:
        return
    _, first_key, _, _ = _keys()
    while not _stop.wait(POLL_S):
        try:
            if not store.check([first_key]):
                continue
            stamp, line = store.get(first_key).decode().split("\t", 1)
        except Exception:
            return  # the store is gone: the job is ending anyway, and the main thread sees it too
        deadline = time.monotonic() + OWN_REPORT_GRACE_S
        while time.monotonic() < deadline and not _leaving:
            time.sleep(0.05)
        with _lock:
            if _leaving:  # this rank is reporting an error of its own (end_job)
                return
            _leaving = True
        log(f"stopping: {line}", all_ranks=True)
        for callback in _callbacks:
            try:
                callback(line)
            except Exception as e:  # leaving anyway: say what could not be done
                log(f"WARNING: while stopping: {type(e).__name__}: {e}", all_ranks=True)
        # After the root cause, so torchrun's summary (the earliest timestamp) names it.
        _record_for_torchrun(f"stopped because {line}", f"stopped because {line}\n", int(stamp) + 1)
        _ack(store, rank)
        exit_now(1)


def end_job(exc: BaseException, code: int = 1, logged: bool = False) -> None:
    """End the whole job because of `exc` on this rank (see the module's doc); never returns in
    a multi-rank run. Returns at once in a single-process run, for the caller's usual exit.
    `logged`: the caller has already printed the error (no traceback then)."""
    global _leaving
    rank, world = rank_and_world()
    if world < 2:
        return
    with _lock:
        already, _leaving = _leaving, True
    if already:  # the watcher is ending this rank for a peer's failure: let it finish
        time.sleep(ACK_WAIT_S + 5)
        exit_now(code)
    _keep_exit_code_on_sigterm(code)
    first_line = mask_secrets(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    line = f"rank {rank} of {world} ({socket.gethostname()}) failed: {type(exc).__name__}: {first_line}"
    # A user error (`logged`: the caller printed its message) is reported by its message alone,
    # in torchrun's summary too; an unexpected one with its traceback.
    stack = mask_secrets(f"{type(exc).__name__}: {exc}" if logged else "".join(traceback.format_exception(exc)))
    if not logged:
        sys.stderr.write(stack)
    log(f"error: {line}; stopping the job", all_ranks=True)
    now = int(time.time())
    store = _store()
    count_key, first_key, acks_key, done_key = _keys()
    first = True
    if store is not None:
        try:
            first = store.add(count_key, 1) == 1  # the first failure is the one every rank reports
        except Exception as e:  # no store: the launcher still ends the job on this exit
            log(f"WARNING: could not tell the other ranks ({type(e).__name__}: {e})", all_ranks=True)
            store = None
    if first:
        # Recorded before the others hear of it: once they leave, the launcher may SIGTERM this rank.
        _record_for_torchrun(line, stack, now)
        if store is not None:
            try:
                store.set(first_key, f"{now}\t{line}")
                deadline = time.monotonic() + ACK_WAIT_S
                while store.add(acks_key, 0) < world - 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                store.set(done_key, "1")
            except Exception:
                pass
    else:  # another rank failed first: name it, and acknowledge it as a watcher would
        try:
            deadline = time.monotonic() + 2.0
            while not store.check([first_key]) and time.monotonic() < deadline:
                time.sleep(0.05)
            stamp, root = store.get(first_key).decode().split("\t", 1)
            _record_for_torchrun(f"{line} (after {root})", stack, int(stamp) + 1)
        except Exception:
            _record_for_torchrun(line, stack, now)
        _ack(store, rank)
    exit_now(code)


def _keep_exit_code_on_sigterm(code: int) -> None:
    """From here this rank only waits for its peers' acknowledgements and leaves. The launcher
    terminates the ranks still alive once one has exited (torchrun's agent looks every 0.1 s, the
    DeepSpeed launcher at once); a rank caught in that gap must still exit with its own code, not
    as killed by SIGTERM. Python runs the handler in the main thread, which is where this rank
    now waits (in Python, never in a collective)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: exit_now(code))
    except (ValueError, OSError):
        pass


def _record_for_torchrun(message: str, stack: str, timestamp: int) -> None:
    """torchrun's failure summary shows each rank's error file (the format of
    torch.distributed.elastic's ErrorHandler) and names the earliest as the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": stack, "timestamp": str(timestamp)}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass
