"""The pre-registered method comparison (docs/RESULTS.md, part 1): every method x every seed of
one config, run one after another through the real pipeline (2 CPU ranks under torchrun, the
bare-launcher path; MLflow runs in the config's store), resumable.

    python benchmarks/sweep_methods.py                       # configs/sarcasm_minilm.yaml, 5 x 5
    python benchmarks/sweep_methods.py --seeds 1 2 --methods lora dash
    python benchmarks/sweep_methods.py --methods dash10      # the follow-up arm (RESULTS part 1b)

Runs are named <method>-s<seed>. A finished run is skipped in a second (pipeline.run_folder), an
interrupted one resumes from its last checkpoint: after an interruption, run the same command
again. Seed-major order, so a partial sweep holds complete pairs. Method full trains every
weight at a rate suited to it (`FULL_LR`, 1/10 of the adapters' rate, as is usual for encoders):
stated in the pre-registration. Arms beyond the five methods (`ARMS`) are a method with other
settings, run only when named. Each run's output goes to <output_dir>/<name>.log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "dash", "init", "tsd", "full"]
FULL_LR = "5.0e-5"
# arm -> (method, extra settings): pre-registered follow-ups, paired with the same seeds' LoRA runs
ARMS = {"dash10": ("dash", ["train.dash_lr_scale=10"])}


def run_one(config: Path, arm: str, seed: int, out: Path, nproc: int) -> tuple[int, float]:
    name = f"{arm}-s{seed}"
    method, extra = ARMS.get(arm, (arm, []))
    sets = [f"name={name}", f"method.method={method}", f"train.seed={seed}", f"output_dir={out}", *extra]
    if method == "full":
        sets.append(f"train.lr={FULL_LR}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.launch.worker", str(config), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / f"{name}.log", "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return code, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/sarcasm_minilm.yaml")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--out", type=Path, default=ROOT / "runs/sarcasm", help="the runs' output_dir")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    todo = [(m, s) for s in args.seeds for m in args.methods]
    for i, (method, seed) in enumerate(todo, 1):
        done = (args.out / f"{method}-s{seed}" / "result.json").is_file()
        print(f"[{i}/{len(todo)}] {method} seed {seed}: {'finished already' if done else 'running'}", flush=True)
        if done:
            continue
        code, seconds = run_one(args.config, method, seed, args.out, args.nproc)
        # torchrun exits 1 whatever the worker's code: the run folder's result file is the truth
        if not (args.out / f"{method}-s{seed}" / "result.json").is_file():
            print(f"  failed (exit {code}) after {seconds:.0f}s; see {args.out}/{method}-s{seed}.log. "
                  "Rerun this command to resume.", flush=True)
            return 1
        print(f"  done in {seconds:.0f}s", flush=True)
    print("sweep complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
