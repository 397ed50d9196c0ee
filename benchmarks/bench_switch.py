"""Benchmark 2: wall time of the whole LoRA-Dash switch (decompose, rate, select, fill).

The sharded switch (pipeline/training/sharded_switch.py) on a LLaMA-shaped model with >= 60 target
weights, ZeRO-3 partitioned, under torchrun with 1 and with 2 workers (one torch thread each),
timed on rank 0 around the sharded_switch call with barriers on both sides; and with an SVD
cache: cold (a fresh folder: decompose and write) and warm (the same folder again).
Launches alternate 1 and 2 workers (full mode: 1, 2, 2, 1); every launch warms LAPACK up on
each weight shape first and repeats the switch.

  python benchmarks/bench_switch.py --quick   # random-init, hidden 256, 12 layers = 60 targets (< 1 min)
  python benchmarks/bench_switch.py           # the real SmolLM2-135M: 30 layers = 150 targets
  (on a GPU: random-init LLaMA-7B-shaped layers, nccl; set --layers)

Headlines: two_over_one=<2-worker / 1-worker wall time> (goal <= 0.6),
warm_over_cold_cache=<warm-cache / cold-cache wall time> (goal <= 0.05; also printed over
no cache at all, a stricter base); the last line is two_over_one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def model_dir(args, work: Path) -> Path:
    import torch

    if args.model == "smollm2":
        return C.SMOLLM2_DIR
    from pipeline.data.synthetic import make_model_dir

    widths = C.LLAMA7B if torch.cuda.is_available() else dict(args.widths)
    return make_model_dir(work / "model", num_hidden_layers=args.layers, vocab_size=256, **widths)


def launch(nproc: int, mdir: Path, out: Path, args, cache_root: Path) -> tuple[dict, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(C.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [str(Path(C.PYTHON).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).with_name("_switch_worker.py")), str(mdir), str(out),
           "--reps", str(args.reps), "--cache-root", str(cache_root), "--svd-dtype", args.svd_dtype]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=C.ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    return json.loads(out.read_text()), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", choices=["synthetic", "smollm2"], default=None)
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the synthetic model (5 targets each)")
    p.add_argument("--reps", type=int, default=None, help="switches of each kind per launch")
    p.add_argument("--launches", default=None, help="worker counts in launch order, e.g. 1,2,2,1")
    p.add_argument("--svd-dtype", default="float32")
    args = p.parse_args()
    import torch

    if args.model is None:
        args.model = "synthetic" if (args.quick or torch.cuda.is_available()) else "smollm2"
    args.widths = (dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2)
                   if args.quick else C.SMOLLM2)
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    launches = [int(x) for x in (args.launches or ("1,2" if args.quick else "1,2,2,1")).split(",")]
    C.print_header("switch", args)
    work = C.work_dir("tsd-bench-switch-")
    mdir = model_dir(args, work)
    runs = {1: [], 2: []}
    for i, n in enumerate(launches):
        res, wall = launch(n, mdir, work / f"out{i}.json", args, work / f"cache{i}")
        runs[n].append(res)
        print(f"# launch {i}: {n} worker(s), {res['targets']} targets, process wall {wall:.1f}s, "
              f"plan loads {res['first_switch']['plan_loads']}", flush=True)
    counts = [n for n in (1, 2) if runs[n]]
    info = runs[counts[0]][0]
    print(f"# model: {args.model} ({mdir}), {info['targets']} target weights, shapes {info['shapes']}, "
          f"svd {args.svd_dtype}; one torch thread per worker; gloo; ZeRO-3 (persistence threshold 0)")

    def pool(n, kind, key="wall"):
        return [t for r in runs[n] for t in r[key][kind]]  # the first switch of a launch is not pooled

    rows = []
    for n in counts:
        for kind, label in (("none", "no cache"), ("cold", "cold cache (decompose + write)"), ("warm", "warm cache")):
            rows.append([n, label, C.fmt_spread(pool(n, kind), 1, 3), C.fmt_spread(pool(n, kind, "cpu_max_rank"), 1, 3)])
    print()
    print(C.table(["workers", "switch", "wall s: median [IQR] (n)", "CPU s of the busiest rank"], rows))
    for n in counts:
        b = runs[n][-1].get("breakdown", {})  # kind -> one dict per rank
        if b:
            print(f"# where each rank's time goes, {n} worker(s), last switch of each kind (s):")
            labels = sorted({k for v in b.values() for r in v for k in r if k != "total"})
            cols = [(kind, r) for kind in b for r in range(len(b[kind]))]
            print(C.table(["part"] + [f"{kind} r{r}" for kind, r in cols],
                          [[lab] + [f"{b[kind][r].get(lab, 0):.3f}" for kind, r in cols] for lab in labels + ["total"]]))
    if runs[2]:
        l2 = runs[2][0]["first_switch"]["plan_loads"]
        print(f"# plan balance with 2 workers: loads {l2} -> ideal two_over_one >= {max(l2) / sum(l2):.3f}")
    C.print_footer_load()
    for n in counts:  # "cold" two ways: the cold-cache switch (the words), and no cache at all (stricter)
        print(f"warm_over_cold_cache_{n}w={C.med(pool(n, 'warm')) / C.med(pool(n, 'cold')):.4f}")
        print(f"warm_over_no_cache_{n}w={C.med(pool(n, 'warm')) / C.med(pool(n, 'none')):.4f}")
    if runs[1]:
        print(f"cold_cache_over_none_1w={C.med(pool(1, 'cold')) / C.med(pool(1, 'none')):.4f}")
    if len(counts) == 2:
        cpu_ratio = C.med(pool(2, "none", "cpu_max_rank")) / C.med(pool(1, "none", "cpu_max_rank"))
        print(f"two_over_one_cpu_busiest_rank={cpu_ratio:.4f}")
        C.headline("two_over_one", C.med(pool(2, "none")) / C.med(pool(1, "none")))


if __name__ == "__main__":
    main()
