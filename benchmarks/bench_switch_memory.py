"""Benchmark 3: resident memory per rank during the switch, over the memory before it.

The sharded switch with 2 ZeRO-3 workers (torchrun, gloo, one thread each) on two depths of
the same LLaMA-shaped model. Per rank: freed heap returned to the OS (malloc_trim), the
resident high-water mark reset (/proc/self/clear_refs), then the first switch of the process
(no cache); increase = VmHWM - VmRSS before. Budget: 1.5 x (the largest single target
weight and its thin-SVD factors U, S, V), and the increase must not grow with depth.
Depths alternate (shallow, deep[, deep, shallow] in full mode).

  python benchmarks/bench_switch_memory.py --quick   # SmolLM2 widths, 4 and 8 layers (20 / 40 targets)
  python benchmarks/bench_switch_memory.py           # SmolLM2 widths, 10 and 30 layers (50 / 150 targets)

Also the floor: on each rank, after the switch, the peak of assembling the largest weight and
decomposing it alone (torch.linalg.svd = LAPACK gesdd: its copy of the input, U, S, V^T and
its workspace), measured the same way. No switch that runs that SVD can stay below it.

Headline: increase_over_budget=<largest per-rank increase / budget> (goal <= 1.0);
also increase_over_floor=<largest increase / largest floor> and
deep_over_shallow=<increase at the larger depth / at the smaller> (goal: ~1, no growth).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_switch import launch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--depths", default=None, help="two decoder-layer counts, e.g. 10,30")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=None, help="launches per depth (alternating)")
    p.add_argument("--svd-dtype", default="float32")
    args = p.parse_args()
    import torch

    from pipeline.data.synthetic import make_model_dir

    depths = [int(x) for x in (args.depths or ("4,8" if args.quick else "10,30")).split(",")]
    repeat = args.repeat or (1 if args.quick else 2)
    order = []
    for i in range(repeat):
        order += depths if i % 2 == 0 else depths[::-1]
    C.print_header("switch_memory", args)
    widths = C.LLAMA7B if torch.cuda.is_available() else C.SMOLLM2
    work = C.work_dir("tsd-bench-swmem-")
    dirs = {d: make_model_dir(work / f"model{d}", num_hidden_layers=d, vocab_size=256, **widths) for d in depths}
    args.reps = 0
    res = {d: [] for d in depths}
    for i, d in enumerate(order):
        out, wall = launch(args.workers, dirs[d], work / f"out{i}.json", args, work / "cache")
        res[d].append(out)
        print(f"# launch {i}: depth {d}, {out['targets']} targets, process wall {wall:.1f}s, first switch "
              f"{out['first_switch']['wall']:.2f}s, VmHWM reset {'ok' if out['first_switch']['hwm_reset'] else 'FAILED'}",
              flush=True)
    info = res[depths[0]][0]
    budget = 1.5 * info["weight_and_factors_mb"]
    m, n = info["biggest"]
    print(f"# widths {widths}; largest target weight {m}x{n}: weight + U,S,V = {info['weight_and_factors_mb']:.2f} MB "
          f"-> budget 1.5x = {budget:.2f} MB; {args.workers} workers, svd {args.svd_dtype}")
    rows, worst, floors = [], {}, {}
    for d in depths:
        incs = [r["increase_mb"] for o in res[d] for r in o["first_switch"]["per_rank"]]
        befores = [r["rss_before_mb"] for o in res[d] for r in o["first_switch"]["per_rank"]]
        floors[d] = [r["floor_mb"] for o in res[d] for r in o["first_switch"]["per_rank"]]
        worst[d] = max(incs)
        rows.append([d, res[d][0]["targets"], C.fmt_spread(befores, 1, 1), C.fmt_spread(incs, 1, 2), f"{max(incs):.2f}",
                     f"{max(incs) / budget:.2f}", C.fmt_spread(floors[d], 1, 2), f"{max(incs) / max(floors[d]):.2f}"])
    print()
    print(C.table(["depth", "targets", "RSS before MB (all ranks)", "increase MB: median [IQR] (n ranks x launches)",
                   "max increase MB", "max / budget", "floor MB: assemble + decompose the largest weight alone",
                   "max / max floor"], rows))
    C.print_footer_load()
    floor = max(max(f) for f in floors.values())
    print(f"# floor {floor:.2f} MB = {floor / info['weight_and_factors_mb']:.2f} x (weight + U,S,V) "
          f"= {floor / budget:.2f} x the budget")
    print(f"increase_over_floor={max(worst.values()) / floor:.4f}")
    print(f"deep_over_shallow={worst[depths[-1]] / worst[depths[0]]:.4f}")
    C.headline("increase_over_budget", max(worst.values()) / budget)


if __name__ == "__main__":
    main()
