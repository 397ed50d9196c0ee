"""What routing every collective through tsd/collectives.py costs: the module against raw
torch.distributed calls on the same group, for the messages this project sends (a few numbers:
the step statistics, a vote, a flag vector), interleaved, medians of repeats.

    python benchmarks/bench_collectives.py [--device cpu|cuda] [--calls 2000] [--repeats 7]

2 ranks on CPU (gloo); with --device cuda, one rank per GPU (NCCL, needs 2 GPUs) or, on one
GPU, one rank with TSD_FORCE_COLLECTIVES=1 (NCCL at world size 1). Per call the module adds a
copy of the tensor to the group's device and back to the caller's; the headline is the ratio
of the module's time per call to the raw call's, for a tensor that starts on the CPU (the
module moves it) and one already on the group's device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsd import collectives  # noqa: E402


def _time(fn, calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6  # microseconds per call


def _rank(rank: int, world: int, port: int, args, out) -> None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ["TSD_FORCE_COLLECTIVES"] = "1"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = collectives.group_device()
    host = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    on_group = host.to(group)

    def raw():  # what the code did before: the caller moves the tensor itself
        t = host.to(group, copy=True)
        dist.all_reduce(t)
        return t.to(host.device)

    variants = {
        "raw all_reduce (caller copies to the group and back)": raw,
        "collectives.all_reduce, tensor on the host": lambda: collectives.all_reduce(host),
        "collectives.all_reduce, tensor on the group's device": lambda: collectives.all_reduce(on_group),
        "raw all_reduce, tensor on the group's device, in place": lambda: dist.all_reduce(on_group),
    }
    for fn in variants.values():  # warm-up
        _time(fn, max(10, args.calls // 10), group)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved
            times[name].append(_time(fn, args.calls, group))
    if rank == 0:
        out.put({k: (statistics.median(v), min(v), max(v)) for k, v in times.items()})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    world = 2 if args.device == "cpu" else min(2, torch.cuda.device_count())
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = out.get(timeout=600)
    for proc in procs:
        proc.join()
    print(f"{world} rank(s), {args.device}, {args.calls} calls x {args.repeats} repeats, torch {torch.__version__}")
    print(f"{'variant':58s} {'us/call (median)':>16s} {'min':>8s} {'max':>8s}")
    for name, (med, lo, hi) in result.items():
        print(f"{name:58s} {med:16.1f} {lo:8.1f} {hi:8.1f}")
    base = result["raw all_reduce (caller copies to the group and back)"][0]
    mod = result["collectives.all_reduce, tensor on the host"][0]
    print(f"collectives_over_raw={mod / base:.3f}")


if __name__ == "__main__":
    main()
