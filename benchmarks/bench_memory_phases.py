"""Benchmark 7: peak resident memory per rank in each phase of a run, against the rank's share.

A synthetic LLaMA too big for one rank's budget (full mode: hidden 2048, MLP 5504, 12 layers,
~2.4 GB of fp32 weights in 256 MB shard files), LoRA-Dash on 2 ZeRO-3 ranks (torchrun, gloo,
one thread each), the real training loop end to end, twice:
  run A: load, train 3 steps (the dash switch after step 2, checkpoints at 2 and 3), export,
         evaluate (2 rows per rank's share, on the path `auto` picks under a per-rank budget
         of 0.75 x the model: the partitioned one);
  run B: the same command on a copy of A's step-2 checkpoint: load, resume, train, export, evaluate;
  run C (only with --with-whole): as B with train.eval_model: whole, for the whole-copy row.
Each rank's peaks come from the run's own `memory.json` (pipeline.training.memory: VmHWM reset
at every phase). The share is model bytes / world + the trainable parameters' bytes x 4 (the
module's slice, the fp32 master copy, Adam's two moments). Ratios: peak / share, and
(peak - the process's resident size before the model) / share, the interpreter and libraries
(~0.5 GB per process here) being a constant no partitioning can remove.

  python benchmarks/bench_memory_phases.py --quick   # hidden 1024, 4 layers (~0.2 GB): the mechanics
  python benchmarks/bench_memory_phases.py           # ~2.4 GB model

Headline: worst_phase_over_share=<max over phases and ranks of peak / share> (goal <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PHASES = ["load", "resume", "train", "switch", "checkpoint", "export", "evaluate"]


def make_model(work: Path, quick: bool) -> Path:
    from pipeline.data.synthetic import make_model_dir
    from pipeline.data.tasks import generate_prompt, load_records

    rows = load_records(C.ROOT / "tests/data/tiny_train.json")
    widths = (dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4) if quick
              else dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=12))
    return make_model_dir(work / "model", texts=[generate_prompt(r["instruction"], r.get("input"), r["output"]) for r in rows],
                          num_attention_heads=16, num_key_value_heads=16, max_shard_size="256MB", **widths)


def config(work: Path, mdir: Path, name: str, budget_gb: float, **train) -> Path:
    import yaml

    tiny = str(C.ROOT / "tests/data/tiny_train.json")
    cfg = {
        "name": name, "output_dir": str(work / "runs"),
        "model": {"path": str(mdir)},
        "data": {"train": tiny, "cutoff_len": 32, "test": [tiny], "task": "social_i_qa"},
        "method": {"method": "dash", "r": 8, "alpha": 16, "switch_step": 2, "num_directions": 8},
        "train": {"lr": 1e-4, "warmup_steps": 1, "micro_batch_size": 1, "max_steps": 3, "checkpoint_every": 2,
                  "keep_checkpoints": None, "eval_limit": 4, "eval_num_beams": 1, "eval_max_new_tokens": 2,
                  **train},
        "deepspeed": {"config": str(C.ROOT / "configs/deepspeed/zero3.json")},
        "workers": {"num_workers": 2, "cpus_per_worker": 1, "memory_budget_gb": budget_gb},
        "tracking": {"offline": True},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, log: Path) -> tuple[dict, str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [str(Path(C.PYTHON).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.launch.worker", str(cfg)]
    t0 = time.perf_counter()
    with log.open("w") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=C.ROOT)
    text = log.read_text()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-4000:]}")
    import yaml

    name = yaml.safe_load(cfg.read_text())["name"]
    memory = json.loads((cfg.parent / "runs" / name / "memory.json").read_text())
    return memory, text, time.perf_counter() - t0


def resumed_copy(work: Path, src: str, dst: str, tag: str) -> None:
    ckpt = work / "runs" / dst / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(work / "runs" / src / "checkpoints" / tag, ckpt / tag)
    (ckpt / "latest").write_text(tag)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--with-whole", action="store_true", help="also run C: evaluation on a whole copy per rank")
    args = p.parse_args()
    C.print_header("memory_phases", args)
    work = C.work_dir("tsd-bench-memphases-")
    mdir = make_model(work, args.quick)
    from pipeline.training.strategy import model_sizes

    weights = model_sizes(mdir, "float32", None, 0).weight_bytes  # as the runs below load it
    budget_gb = 0.75 * weights / 2**30
    print(f"# model {weights / 2**30:.2f} GiB of fp32 weights; per-rank budget (workers.memory_budget_gb) "
          f"{budget_gb:.2f} GiB = 0.75 x the model: a whole copy does not fit a rank", flush=True)

    runs = {}
    runs["A"] = run(config(work, mdir, "A", budget_gb), work / "A.log")
    resumed_copy(work, "A", "B", "step2")
    runs["B"] = run(config(work, mdir, "B", budget_gb), work / "B.log")
    if args.with_whole:
        resumed_copy(work, "A", "C", "step2")
        runs["C"] = run(config(work, mdir, "C", budget_gb, eval_model="whole"), work / "C.log")
    for key, (_, text, wall) in runs.items():
        how = re.search(r"with the (whole|partitioned) model", text)
        print(f"# run {key}: {wall:.0f}s wall, evaluation on the {how.group(1) if how else '?'} model", flush=True)

    trainable = int(re.search(r"trainable params: ([\d,]+)", runs["A"][1]).group(1).replace(",", ""))
    share = weights / 2 + 4 * 4 * trainable
    print(f"# share per rank = model / 2 + 16 B x {trainable:,} trainable = {share / 2**20:.0f} MiB")
    rows, worst = [], 0.0
    for key, (memory, _, _) in runs.items():
        ranks = memory["ranks"]
        assert all(r["peaks_reset"] for r in ranks), "VmHWM could not be reset: peaks would be cumulative"
        base = max(r["baseline_rss_mb"] for r in ranks)
        for phase in PHASES:
            if phase not in ranks[0]["rss_mb"] or (key != "A" and phase not in ("resume", "evaluate")):
                continue  # B repeats A's other phases; C is there for its evaluation row
            peaks = [r["rss_mb"][phase] for r in ranks]
            ratio = max(peaks) * 2**20 / share
            label = phase + (" (whole copy)" if key == "C" and phase == "evaluate" else "")
            if key != "C":
                worst = max(worst, ratio)
            rows.append([label, key, " / ".join(f"{x:.0f}" for x in peaks), f"{ratio:.2f}",
                         f"{(max(peaks) - base) * 2**20 / share:.2f}"])
    print()
    print(C.table(["phase", "run", "peak RSS MiB (rank 0 / rank 1)", "max / share",
                   "(max - process before the model) / share"], rows))
    print(f"# process before the model: {max(r['baseline_rss_mb'] for r in runs['A'][0]['ranks']):.0f} MiB per rank")
    C.print_footer_load()
    C.headline("worst_phase_over_share", worst)


if __name__ == "__main__":
    main()
