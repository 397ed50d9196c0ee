"""Per-rank worker of bench_switch.py and bench_switch_memory.py (run under torchrun).

    torchrun --standalone --nproc_per_node N benchmarks/_switch_worker.py MODEL_DIR OUT.json \
        [--reps K] [--cache-root DIR] [--svd-dtype float32]

Loads the model partitioned by ZeRO-3 (as tests/dist/zero3_switch.py), injects LoRA-Dash, gives
LoRA a non-trivial update, then:
  1. memory: the first switch (no cache), peak resident memory over the resident memory before
     it (VmHWM reset via /proc/self/clear_refs after malloc_trim), per rank;
  2. time: K rounds of {no cache, cold cache (fresh folder: decompose + write),
     warm cache (the same folder again)}, order alternating, each timed on rank 0 between
     barriers (the wall time of the whole sharded_switch call: gather, decompose, rate, select,
     broadcast, fill). Also each rank's CPU seconds in the call.
Rank 0 writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cache-root", default=None)
    p.add_argument("--svd-dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import tsd
    from pipeline.training.distributed import skip_unused_deepspeed_comm_op
    from pipeline.training.sharded_switch import sharded_switch
    from tsd.partition import full_shape, gathered, set_master_copy

    cuda = torch.cuda.is_available()
    skip_unused_deepspeed_comm_op()  # as a training rank does
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.set_num_threads(args.threads)
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive while the model loads)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    cfg = tsd.TSDConfig(method="dash", r=8, alpha=16, dropout=0.0, switch_step=1, num_directions=8)
    torch.manual_seed(0)
    tsd.inject(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    m = engine.module
    layers = tsd.tsd_layers(m)
    g = torch.Generator().manual_seed(1)
    for _, layer in layers:  # a non-trivial LoRA update (B = 0 would make every rate 0)
        B = torch.randn(layer.lora_B.ds_shape, generator=g) * 0.02
        with gathered([layer.lora_B], modifier_rank=0):
            layer.lora_B.data.copy_(B)
        set_master_copy(layer.lora_B, B)
    shapes = [full_shape(l.base_layer.weight) for _, l in layers]
    # LAPACK's first calls are slow (PLATFORM.md): warm it up on each distinct shape (not timed).
    for shp in sorted(set(shapes)):
        tsd.directions.decompose(torch.randn(*shp), args.svd_dtype)

    # Where the time goes: wrap the switch's parts (as seen from this rank) with timers.
    import pipeline.training.sharded_switch as SS
    from tsd import svd_cache

    parts: dict[str, float] = {}

    def wrap(owner, attr, label):
        fn = getattr(owner, attr)

        def timed_part(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[label] = parts.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, attr, timed_part)

    wrap(SS, "gather_to", "gather (W,A,B per item, or packed A,B)")
    wrap(SS, "weight_key", "content key (SHA-256 of W)")
    wrap(SS, "part_digest", "slice digests (SHA-256 of own slices)")
    wrap(SS.dist, "all_gather", "all-gather digests")
    wrap(SS.dist, "all_reduce", "all-reduce cached set")
    wrap(svd_cache.SVDCache, "get", "cache read")
    wrap(svd_cache.SVDCache, "resolve", "alias lookup")
    wrap(SS, "partition_key", "partition keys")
    wrap(svd_cache.SVDCache, "put", "cache write")
    wrap(SS, "decompose", "SVD")
    wrap(tsd.directions, "change_rates", "change rates")  # called by layer_directions
    wrap(SS.dist, "broadcast", "broadcast selections")
    wrap(tsd.switch.Dash, "fill", "fill buffers")  # the switch kinds install selections
    wrap(tsd.switch.Init, "fill", "fill buffers")
    breakdown = {}

    def timed(cache_dir):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        rep = sharded_switch(m, "dash", 1, args.svd_dtype, cache_dir)
        c1 = time.process_time()
        dist.barrier()
        return time.perf_counter() - t0, c1 - c0, rep

    # 1. memory of the first switch
    dist.barrier()
    C.trim_malloc()
    rss_before = C.rss_mb()
    hwm_ok = C.reset_peak_rss()
    wall0, cpu0, rep0 = timed(None)
    peak = C.peak_rss_mb()
    # The floor: what any rank must hold to decompose the largest weight with torch's SVD (LAPACK
    # gesdd): the assembled weight plus decompose's own peak (its input copy, U, S, V^T and the
    # workspace), measured the same way in this process, outside the switch.
    biggest = max(shapes, key=lambda s: s[0] * s[1])
    dist.barrier()
    C.trim_malloc()
    floor_before = C.rss_mb()
    C.reset_peak_rss()
    w = torch.empty(biggest, dtype=dtype).normal_()
    dec = tsd.directions.decompose(w, args.svd_dtype)
    floor = C.peak_rss_mb() - floor_before
    del w, dec
    mem = torch.tensor([rss_before, peak, peak - rss_before, rep0.decompose_seconds, cpu0, floor], dtype=torch.float64)
    mems = [torch.zeros_like(mem) for _ in range(world)] if world > 1 else [mem]
    if world > 1:
        dist.all_gather(mems, mem)

    # 2. time
    res = {"none": [], "cold": [], "warm": []}
    cpu = {"none": [], "cold": [], "warm": []}
    root = Path(args.cache_root) if args.cache_root else None
    for i in range(args.reps):
        cache = str(root / f"w{world}-r{i}") if root else None
        order = ["none", "cold", "warm"] if i % 2 == 0 else ["cold", "warm", "none"]
        for kind in order:
            if kind != "none" and cache is None:
                continue
            parts.clear()
            w, c, rep = timed(None if kind == "none" else cache)
            per_rank = [dict(parts, total=w)]
            if world > 1:
                per_rank = [None] * world
                dist.all_gather_object(per_rank, dict(parts, total=w))
            breakdown[kind] = per_rank
            if kind == "warm":
                assert rep.cache_hits == len(rep.decomposed), (rep.cache_hits, len(rep.decomposed))
            t = torch.tensor([c], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res[kind].append(w)
            cpu[kind].append(float(t))

    if rank == 0:
        mm, nn = biggest
        k = min(mm, nn)
        factor_bytes = 8 if args.svd_dtype == "float64" else 4
        w_and_factors = (mm * nn * torch.finfo(dtype).bits // 8 + (mm * k + k + nn * k) * factor_bytes) / 2**20
        out = {
            "world": world, "targets": len(layers), "shapes": sorted(set(map(tuple, shapes))),
            "biggest": biggest, "weight_and_factors_mb": w_and_factors,
            "first_switch": {"wall": wall0, "per_rank": [
                {"rss_before_mb": float(t[0]), "peak_mb": float(t[1]), "increase_mb": float(t[2]),
                 "decompose_s": float(t[3]), "cpu_s": float(t[4]), "floor_mb": float(t[5])} for t in mems],
                "hwm_reset": hwm_ok, "plan_loads": rep0.plan_loads},
            "wall": res, "cpu_max_rank": cpu, "breakdown": breakdown,
        }
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
