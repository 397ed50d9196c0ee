"""The ranks of a run: who this process is (`rank_and_world`), and how it leaves
torch.distributed and ends its process without aborting at exit.

Why this is needed (gloo, CPU): a gloo process group runs each collective on a worker thread
("pt_gloo_runloop"). The thread marks the collective done, which wakes the caller, and only THEN
drops its own reference to the work. When that last reference holds a tensor whose Python object
Python has already let go of, dropping it takes the GIL. If the interpreter has meanwhile begun
its teardown, taking the GIL ends the thread inside a C++ destructor, and the process dies with
"terminate called without an active exception" (SIGABRT); torchrun then SIGTERMs the other rank.
The window is small (a worker thread descheduled right after a collective, which a loaded machine
makes likely) but real: a rank that ends right after its last collective loses the race now and
then. A backtrace of it: pt_gloo_runloop -> ~AsyncAllgatherWork -> TensorImpl::decref_pyobject
-> take_gil -> PyThread_exit_thread -> std::terminate, with the main thread in Py_FinalizeEx.

`destroy_process_group` closes the window only when the group object really goes away: its
destructor joins the worker threads. Others keep handles on the groups: DeepSpeed (the engine,
its optimizer, every ZeRO-3 parameter's `ds_process_group`, some reachable from autograd hooks
that outlive the engine), and even a plain `tsd evaluate` under torchrun ends with the world
group's threads alive after the destroy (measured: 4 threads per rank after a ZeRO-3 run, 2 after
`tsd evaluate`). Hence two steps, used by the training entry (`pipeline.training.loop.main_entry`, then
`pipeline.launch.worker`) and by the evaluation entry (`run_evaluation`, then `cli.cmd_evaluate`):

- `leave_process_group`: the ranks meet at a barrier (so none tears its connections down while a
  peer still sends), then the groups are destroyed, DeepSpeed's handles included.
- `end_process`: exit as usual when no gloo worker thread is left; otherwise do the interpreter's
  own exit work (wait for non-daemon threads, run atexit handlers, flush) and os._exit, so the
  teardown that would race with those threads never starts.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist

from tsd import collectives

def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bind_device(local_index: int | None = None) -> torch.device:
    """Make this process's GPU the current CUDA device, before any other CUDA call or collective
    (the CPU where there is no GPU). Every launcher entry calls it first.

    local_index: the GPU among the visible ones (Ray Train knows it: ray.train.torch.get_device);
    else LOCAL_RANK, which torchrun and the DeepSpeed launcher set (one GPU per local rank).
    Without it every rank of a node would work on GPU 0: object collectives, peak-memory counters,
    `mem_get_info` (the memory budget that picks the strategy) and NCCL itself all use the current
    device."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) if local_index is None else local_index
    visible = torch.cuda.device_count()
    if not 0 <= index < visible:
        raise RuntimeError(
            f"local rank {index} has no GPU of its own: this process sees {visible} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one rank per GPU"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def gloo_worker_threads() -> int | None:
    """How many gloo worker threads this process has (None where /proc cannot tell)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == GLOO_WORKER_THREAD
        except OSError:
            pass  # the thread ended while we looked
    return n


def leave_process_group(together: bool = True) -> None:
    """Destroy every process group of this rank (a no-op if none is initialized).

    together: meet the other ranks at a barrier first. Pass False when leaving because of an
    error: a peer that failed would never arrive, and this rank would wait out the timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        collectives.barrier()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        # Also drops DeepSpeed's module-level handles on the groups (its world group clone etc.)
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()  # a group kept only by a reference cycle goes now, joining its threads


def end_process(code: int | str | None = 0) -> NoReturn:
    """End this rank's process with `code` (as sys.exit takes it), after `leave_process_group`.

    With no gloo worker thread left this is sys.exit. Otherwise (something still holds a group,
    see the module's doc) it does what the interpreter does before its teardown and leaves
    with os._exit: unlike sys.exit, nothing can then abort after the work is done and reported.
    Objects still alive are not finalized; everything this project writes is closed by then.
    """
    if gloo_worker_threads() == 0:
        sys.exit(code)
    main = threading.main_thread()
    for t in threading.enumerate():  # as the interpreter's exit waits for non-daemon threads
        if t is not main and not t.daemon and t is not threading.current_thread():
            t.join()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # MLflow's, logging's, tqdm's ... handlers (it reports their errors itself)
    exit_now(code)


_last_words: list[Callable[[], None]] = []


def before_exit(fn: Callable[[], None]) -> None:
    """Run `fn` on `exit_now` (hence `end_process` too), which skips `finally` blocks and atexit:
    what must not be left behind by a failed rank (its run folder's lock, pipeline.run_lock)."""
    _last_words.append(fn)


def exit_now(code: int) -> NoReturn:
    """os._exit after flushing what this process printed or logged: no atexit handlers, no
    interpreter teardown, no waiting on anything (also the way out of a failed rank)."""
    for fn in _last_words:
        try:
            fn()
        except Exception:
            pass  # leaving anyway
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def prefer_interpreter_tools() -> None:
    """Put this interpreter's bin folder first on PATH (once). DeepSpeed compiles an op it needs
    (CPU Adam for an optimizer offload) with the `ninja` it finds on PATH, cached in
    ~/.cache/torch_extensions, and rebuilds it whenever that ninja changes: runs started with and
    without the venv on PATH (a test harness, a sweep script) alternated between the venv's ninja
    and the system's and recompiled at every start, 20-60 s of every core each time."""
    bin_dir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in parts if p != bin_dir]])


def skip_unused_deepspeed_comm_op() -> None:
    """Tell DeepSpeed its CPU shared-memory all-reduce op is unavailable, before its comm backend
    starts (deepspeed.init_distributed, deepspeed.initialize). The backend compiles that op when it
    starts on CPU: 35-90 s of every core at a venv's first launch, and again whenever its build
    folder or compiler changes. Only DeepSpeed's inference all-reduce (its tensor-parallel
    inference layers) uses it, and nothing here calls that: training's collectives are
    torch.distributed's with or without it. DeepSpeed then starts as on a machine without a
    compiler. Its op table is one dict, computed once and kept, so the mark holds for the process.
    Only DeepSpeed's CPU accelerator has the op: elsewhere (CUDA) nothing is touched, since reading
    the table would make DeepSpeed probe every op (compiler runs) at each rank's start."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
