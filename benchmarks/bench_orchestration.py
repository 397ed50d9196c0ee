"""Benchmark 4: orchestration overhead of the three launchers on the same short training run.

  ray        tsd train CONFIG                                     (Ray Train, embedded Ray)
  deepspeed  deepspeed --num_gpus 2 --module pipeline.launch.worker CONFIG   (the DeepSpeed launcher)
  torchrun   torchrun --standalone --nproc_per_node 2 -m pipeline.launch.worker CONFIG

Same config, data order, seed and step count for all (2 workers, one CPU thread each, ZeRO-3,
LoRA-Dash with its switch early). Per run:
  steady-state tokens/s: from the per-step `tokens_per_s` / `step_time_s` that rank 0 logs to
    MLflow (one sqlite store per run), over the steps after the switch and after `--skip`
    warm-up steps; tokens = tokens_per_s x step_time_s. Two rates: wall-clock = tokens over the
    time between the metrics' timestamps (the headline), and loop-timer = tokens over the sum of
    step_time_s (what the loop reports; it leaves out the work between steps);
  start-up: launch -> the start of optimizer step 1 (its MLflow timestamp minus its step time);
  total wall time of the command.
Launchers run in rotated order, `--repeat` times. The same figures are cross-checked with the
per-step lines `[tsd rank 0] step k/N ... tok/s ...s/step` on stderr.

  python benchmarks/bench_orchestration.py --quick   # tiny random LLaMA (< 1 min per launcher on an idle machine)
  python benchmarks/bench_orchestration.py           # SmolLM2-135M on Social-IQa, 2 rounds

Headline: ray_over_deepspeed=<steady tokens/s under Ray / under the DeepSpeed launcher>
(goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STEP_RE = re.compile(r"\[tsd rank 0\] step (\d+)/(\d+) loss \S+ lr \S+ (\S+) tok/s (\S+)s/step")
BIN = Path(C.PYTHON).parent


def commands(launcher: str, config: str, sets: list[str], port: int, gpu: bool, workers: int = 2) -> list[str]:
    over = [x for s in sets for x in ("--set", s)]
    if launcher == "ray":
        return [str(BIN / "tsd"), "train", config, *over]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(workers), "--master_port", str(port), "--module", "pipeline.launch.worker",
                config, *over]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(workers), "-m", "pipeline.launch.worker", config, *over]
    raise ValueError(launcher)


def run_one(launcher: str, args, work: Path, idx: int) -> dict:
    name = f"{launcher}-{idx}"
    out_dir = work / "runs"
    uri = f"sqlite:///{work / name / 'mlflow.db'}"
    (work / name).mkdir(parents=True, exist_ok=True)
    sets = list(args.sets) + [f"name={name}", f"output_dir={out_dir}", f"tracking.uri={uri}",
                              f"tracking.experiment=bench-{name}"]
    cmd = commands(launcher, args.config, sets, 29600 + idx, args.gpu, args.workers)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0")
    env["PYTHONPATH"] = str(C.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    lines = []
    t_launch = time.time()
    proc = subprocess.Popen(cmd, cwd=C.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def reader():
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    wall = time.time() - t_launch
    (work / name / "output.log").write_text("\n".join(l for _, l in lines))
    if rc != 0:
        tail = "\n".join(l for _, l in lines[-40:])
        raise RuntimeError(f"{launcher} run failed (rc {rc}): {' '.join(cmd)}\n{tail}")

    # Per-step figures from stderr (rank 0's lines; under Ray prefixed by the worker's name).
    seen = {}
    for t, l in lines:
        m = STEP_RE.search(l)
        if m and int(m.group(1)) not in seen:
            seen[int(m.group(1))] = (t, float(m.group(3)), float(m.group(4)))
    # The same from MLflow (timestamps taken in-process by rank 0).
    steps = {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exps = client.search_experiments()
        runs = [r for e in exps for r in client.search_runs([e.experiment_id])]
        run = runs[0]
        st = {m.step: m for m in client.get_metric_history(run.info.run_id, "step_time_s")}
        tp = {m.step: m for m in client.get_metric_history(run.info.run_id, "tokens_per_s")}
        for k in st:
            steps[k] = (st[k].timestamp / 1000.0, tp[k].value, st[k].value)
        source = "mlflow"
    except Exception as e:  # fall back to the log lines
        print(f"# {name}: MLflow read failed ({e}); using stderr lines", flush=True)
        steps, source = seen, "stderr"
    first = min(steps)
    start_of_step1 = steps[first][0] - steps[first][2]
    steady = [k for k in sorted(steps) if k > max(args.switch_step + 1, args.skip)]
    toks = sum(steps[k][1] * steps[k][2] for k in steady)
    secs = sum(steps[k][2] for k in steady)
    # The loop's step_time_s window excludes what happens between steps (logging,
    # ray.train.report, ...): the wall-clock rate over the same steps, from their timestamps.
    wall_span = steps[steady[-1]][0] - steps[steady[0] - 1][0] if steady and (steady[0] - 1) in steps else float("nan")
    last_ts = steps[max(steps)][0]
    return {
        "launcher": launcher, "name": name, "source": source,
        "startup_s": start_of_step1 - t_launch,
        "steady_tok_s": toks / secs if secs else float("nan"),
        "steady_wall_tok_s": toks / wall_span if wall_span else float("nan"),
        "between_steps_s": (wall_span - secs) / len(steady) if steady else float("nan"),
        "step_s": [steps[k][2] for k in steady],
        "tok_s": [steps[k][1] for k in steady],
        "stderr_tok_s_median": C.med([seen[k][1] for k in steady if k in seen]),
        "after_last_step_s": t_launch + wall - last_ts,
        "wall_s": wall,
        "steps": len(steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None, help="rounds over the launchers (order rotated)")
    p.add_argument("--launchers", default="deepspeed,ray,torchrun")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the steady state")
    p.add_argument("--set", dest="extra", action="append", default=[])
    p.add_argument("--workers", type=int, default=2,
                   help="workers per run (1 leaves a core of this 2-core machine to Ray's own processes)")
    args = p.parse_args()
    import torch

    args.gpu = torch.cuda.is_available()
    work = C.work_dir("tsd-bench-orch-")
    if args.quick:
        from pipeline.data.synthetic import make_model_dir

        texts = [json.loads((C.ROOT / "tests/data/tiny_train.json").read_text())[0]["instruction"]]
        mdir = make_model_dir(work / "model", texts=texts, hidden_size=64, intermediate_size=128)
        args.config = str(C.ROOT / "configs/tiny_cpu.yaml")
        args.steps = args.steps or 30
        args.switch_step = 2
        base = [f"model.path={mdir}", f"train.max_steps={args.steps}", "method.switch_step=2", "train.warmup_steps=1"]
        args.repeat = args.repeat or 1
    else:
        args.config = str(C.ROOT / "configs/demo.yaml")
        args.steps = args.steps or 20
        args.switch_step = 4
        base = [f"train.max_steps={args.steps}", "method.switch_step=4", f"method.svd_cache={work / 'svd'}"]
        args.repeat = args.repeat or 2
    if args.gpu:
        base += ["workers.use_gpu=true"]
    args.sets = base + [f"workers.num_workers={args.workers}"] + args.extra
    C.print_header("orchestration", args)
    launchers = args.launchers.split(",")
    results = {l: [] for l in launchers}
    idx = 0
    for rnd in range(args.repeat):
        order = launchers[rnd % len(launchers):] + launchers[: rnd % len(launchers)]
        for l in order:
            r = run_one(l, args, work, idx)
            idx += 1
            results[l].append(r)
            print(f"# {r['name']}: start-up {r['startup_s']:.1f}s, steady {r['steady_wall_tok_s']:.1f} tok/s wall-clock "
                  f"({r['between_steps_s']:.3f}s/step outside the loop's step timer), loop-timer {r['steady_tok_s']:.1f} tok/s over "
                  f"{len(r['step_s'])} steps ({r['source']}; stderr median {r['stderr_tok_s_median']:.1f}), "
                  f"after last step {r['after_last_step_s']:.1f}s, wall {r['wall_s']:.1f}s", flush=True)
    print(f"# config {args.config} with {' '.join(args.sets)}; steady state = steps > max(switch+1, {args.skip})")
    base_l = "deepspeed" if "deepspeed" in launchers else launchers[0]
    ref = C.med([r["steady_wall_tok_s"] for r in results[base_l]])
    ref_loop = C.med([r["steady_tok_s"] for r in results[base_l]])
    rows = []
    for l in launchers:
        rs = results[l]
        steady = [r["steady_wall_tok_s"] for r in rs]
        loop = [r["steady_tok_s"] for r in rs]
        rows.append([l, C.fmt_spread(steady, 1, 1), f"{C.med(steady) / ref:.3f}",
                     C.fmt_spread(loop, 1, 1), f"{C.med(loop) / ref_loop:.3f}",
                     C.fmt_spread([r["between_steps_s"] for r in rs], 1, 3),
                     C.fmt_spread([s for r in rs for s in r["step_s"]], 1, 3),
                     C.fmt_spread([r["startup_s"] for r in rs], 1, 1), C.fmt_spread([r["wall_s"] for r in rs], 1, 1)])
    print()
    print(C.table(["launcher", "steady wall-clock tok/s (runs)", f"/ {base_l}", "loop-timer tok/s (MLflow tokens_per_s)",
                   f"/ {base_l}", "s/step outside the step timer", "loop-timer s/step (all steady steps)",
                   "start-up s", "total wall s"], rows))
    C.print_footer_load()
    for l in launchers:
        if l != base_l:
            print(f"{l}_over_{base_l}_startup={C.med([r['startup_s'] for r in results[l]]) / C.med([r['startup_s'] for r in results[base_l]]):.4f}")
    for l in launchers:
        if l != base_l:
            print(f"{l}_over_{base_l}_looptimer={C.med([r['steady_tok_s'] for r in results[l]]) / ref_loop:.4f}")
    if "torchrun" in results and base_l != "torchrun":
        print(f"torchrun_over_{base_l}={C.med([r['steady_wall_tok_s'] for r in results['torchrun']]) / ref:.4f}")
    if "ray" in results:
        C.headline(f"ray_over_{base_l}", C.med([r["steady_wall_tok_s"] for r in results["ray"]]) / ref)


if __name__ == "__main__":
    main()
