"""What train.gradient_checkpointing saves: peak activation memory of one LoRA training step with
and without, at sequence lengths where activations dominate, and what it costs in time.

    python benchmarks/bench_checkpointing.py [--device cpu|cuda] [--seq 512 1024 2048] [--repeats 3]

A random-init LLaMA (hidden 512, 8 layers, intermediate 1408, vocab 8192, fp32 on CPU / bf16 on a
GPU) with LoRA r=16 on q_proj, v_proj (tsd.inject), micro batch 2. Each (variant, length) runs in a
fresh process: the model is built, one warm-up step taken, then the peak memory of a timed
forward+backward is measured above the memory held before it (CPU: the resident set's high-water
mark, reset through /proc/self/clear_refs, with glibc returning every large free at once; GPU:
torch.cuda.max_memory_allocated). Variants
alternate so that drift on a shared machine hits both. Headline: the activation memory with
checkpointing as a fraction of without, at the longest length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned to the OS
# when freed, so the resident set follows the live tensors (with glibc's default the warm-up's freed
# activations stay in the heap and the measured step reuses them unseen).
ONE_ENV = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}


def one(device: str, seq: int, checkpointing: bool) -> dict:
    """One fresh process's measurement (run as `--one`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tsd
    from benchmarks._common import peak_rss_mb, reset_peak_rss, rss_mb
    from pipeline.training.engine import enable_gradient_checkpointing

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    tsd.inject(model, tsd.TSDConfig(method="lora", r=16, alpha=32, targets=["q_proj", "v_proj"]))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8192, (2, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists before the measured step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        before = rss_mb()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    return {"seconds": time.perf_counter() - t0, "activation_mb": peak - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("SEQ", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.device, int(args.one[0]), args.one[1] == "1")))
        return
    results: dict[tuple[int, bool], list[dict]] = {}
    for _ in range(args.repeats):
        for seq in args.seq:
            for ck in (False, True):  # interleaved
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", str(seq), str(int(ck))],
                                     capture_output=True, text=True, check=True, env=ONE_ENV)
                results.setdefault((seq, ck), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"LoRA r=16 (q, v) on a random-init LLaMA (512 hidden, 8 layers), micro batch 2, {args.device}, "
          f"medians of {args.repeats}")
    print(f"{'seq':>6} {'activation MB without':>22} {'with':>8} {'ratio':>7} {'step s without':>15} {'with':>7} {'ratio':>7}")
    for seq in args.seq:
        a = {k: statistics.median(r[k] for r in results[(seq, False)]) for k in ("activation_mb", "seconds")}
        b = {k: statistics.median(r[k] for r in results[(seq, True)]) for k in ("activation_mb", "seconds")}
        print(f"{seq:>6} {a['activation_mb']:>22.0f} {b['activation_mb']:>8.0f} {b['activation_mb'] / a['activation_mb']:>7.2f} "
              f"{a['seconds']:>15.2f} {b['seconds']:>7.2f} {b['seconds'] / a['seconds']:>7.2f}")
    last = args.seq[-1]
    ratio = (statistics.median(r["activation_mb"] for r in results[(last, True)])
             / statistics.median(r["activation_mb"] for r in results[(last, False)]))
    print(f"checkpointing_activation_ratio_at_{last}={ratio:.3f}")


if __name__ == "__main__":
    main()
