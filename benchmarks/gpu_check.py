"""The CUDA paths CPU CI cannot run, in one go on a machine with a GPU (< 8 minutes).

  python benchmarks/gpu_check.py            # prints one line per check, then a summary; exit 1 on a failure
  python benchmarks/gpu_check.py --cpu      # the same checks on CPU/gloo (tests this script, not CUDA)

Checks (tiny random LLaMA, ranks = min(2, GPUs), NCCL, the real per-rank entry under torchrun):
  nccl-switch       LoRA-TSD through both switches (the sharded switch's gathers and broadcasts
                    on NCCL) and the export
  nccl-offload      the same with configs/deepspeed/zero3_offload.json (shards in CPU memory,
                    moved to the GPU for NCCL): adapter equal to nccl-switch (<= 1e-5)
  cuda-rng-resume   dropout on the GPU, a resume from the step-3 checkpoint: adapter equal to
                    the uninterrupted run (<= 1e-5; CUDA generators restored)
  bf16-export       bf16 training and export; the adapter loads in stock PEFT, finite
  step-cost         benchmarks/bench_step.py --quick on the GPU (its headline line)

Written while no GPU was lent to the project: it has not run yet. Run it whenever a GPU is at
hand and put its output in docs/BENCHMARKS.md (GPU section).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from proc_group import child_env, make_tiny_model, tiny_config  # noqa: E402


def worker(cfg: dict, work: Path, nproc: int) -> None:
    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.launch.worker", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(OMP_NUM_THREADS="4"), capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['name']} exited {proc.returncode}: {proc.stderr[-1500:]}")


def max_diff(a_dir: Path, b_dir: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "tsd_state.safetensors")), load_file(str(b_dir / "tsd_state.safetensors"))
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def main() -> int:
    cpu = "--cpu" in sys.argv[1:]
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (--cpu runs the checks on CPU)")
        return 1
    nproc = 2 if cpu else min(2, torch.cuda.device_count())
    work = Path(ROOT / "runs" / "gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    model = make_tiny_model(work / "model")
    base = tiny_config(model, work / "runs", "plain")
    base["method"].update(method="tsd", switch_step=2, dropout=0.1)
    base["train"].update(max_steps=6, checkpoint_every=1, keep_checkpoints=None)
    base["tracking"]["offline"] = True
    base["workers"].update(use_gpu=not cpu, num_workers=nproc)
    runs = work / "runs"

    def with_(name: str, **changes) -> dict:
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["name"] = name
        for section, values in changes.items():
            cfg[section].update(values)
        return cfg

    def nccl_switch():
        worker(with_("plain"), work, nproc)
        return "adapter written", True

    def nccl_offload():
        worker(with_("offload", deepspeed={"config": str(ROOT / "configs/deepspeed/zero3_offload.json")}), work, nproc)
        d = max_diff(runs / "offload/adapter", runs / "plain/adapter")
        return f"max |offload - plain| = {d:.2e}", d <= 1e-5

    def cuda_rng_resume():
        ckpt = runs / "resumed/checkpoints"
        shutil.copytree(runs / "plain/checkpoints", ckpt)
        for later in range(4, 7):
            shutil.rmtree(ckpt / f"step{later}", ignore_errors=True)
        (ckpt / "latest").write_text("step3")
        worker(with_("resumed"), work, nproc)
        d = max_diff(runs / "resumed/adapter", runs / "plain/adapter")
        return f"max |resumed - uninterrupted| = {d:.2e}", d <= 1e-5

    def bf16_export():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        worker(with_("bf16", train={"precision": "bf16"}, model={"dtype": "bfloat16"}), work, nproc)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(runs / "bf16/adapter"))
        finite = all(torch.isfinite(p).all().item() for n, p in peft.named_parameters() if "lora_" in n)
        return "stock PEFT loaded the bf16 adapter", finite

    def step_cost():
        if cpu:
            return "skipped on CPU", True
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_step.py"), "--quick"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        return last, out.returncode == 0

    failed = 0
    for name, check in [("nccl-switch", nccl_switch), ("nccl-offload", nccl_offload),
                        ("cuda-rng-resume", cuda_rng_resume), ("bf16-export", bf16_export), ("step-cost", step_cost)]:
        t0 = time.perf_counter()
        try:
            detail, ok = check()
        except Exception as e:  # a check that cannot run is a failure, reported on its line
            detail, ok = f"{type(e).__name__}: {str(e)[:300]}", False
        failed += not ok
        print(f"gpu_check {name}: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f}s) {detail}", flush=True)
    where = "CPU (--cpu)" if cpu else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    print(f"gpu_check: {5 - failed}/5 passed on {where}, {nproc} rank(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
