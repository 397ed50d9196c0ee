"""Benchmark 6: what crossing a node boundary costs: two nodes vs one, same 2 ranks, same cores.

  one-node  torchrun --standalone --nproc_per_node 2 -m pipeline.launch.worker CONFIG
  two-node  torchrun --nnodes 2 --nproc_per_node 1 ... on two hosts made of network namespaces
            (tests/netns_cluster.py: each rank on its own host, gloo over a veth link)

Both run on this machine's cores, so the difference is the network path (loopback vs a veth
pair between namespaces) and the rendezvous, not extra compute. Per run: the median step time
of rank 0's `step k/N ... s/step` lines (warm-up steps and the switch step left out) and the
switch time (`switch_dash_seconds` in result.json). Variants alternate, `--repeat` rounds.
Needs root (ip netns).

  python benchmarks/bench_multinode.py --quick   # tiny LLaMA, 1 round
  python benchmarks/bench_multinode.py           # SmolLM2-135M widths, 4 layers, 3 rounds

Headline: two_node_over_one_node=<median step time on two nodes / on one node>.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT / "tests"))
from netns_cluster import TwoHosts  # noqa: E402
from proc_group import TINY_DATA, child_env, tiny_config  # noqa: E402

STEP_RE = re.compile(r"\[tsd rank 0\] step (\d+)/\d+ .* (\S+)s/step")


def make_model(path: Path, quick: bool) -> Path:
    from pipeline.data.synthetic import make_model_dir
    from pipeline.data.tasks import generate_prompt, load_records

    texts = [generate_prompt(r) for r in load_records(TINY_DATA)]
    shape = {} if quick else dict(C.SMOLLM2, num_hidden_layers=4)
    return make_model_dir(path, texts=texts, **shape)


def write_config(work: Path, model: Path, steps: int, switch: int) -> Path:
    import yaml

    cfg = tiny_config(model, work / "runs", "bench")
    cfg["method"].update(method="dash", switch_step=switch)
    cfg["train"].update(max_steps=steps, log_every=1)
    cfg["train"].pop("checkpoint_every", None)  # no checkpoints: they would dominate short steps
    cfg["tracking"]["offline"] = True
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(variant: str, net: TwoHosts, cfg: Path, name: str, port: int) -> dict:
    sets = ["--set", f"name={name}"]
    t0 = time.perf_counter()
    if variant == "one-node":
        cmd = [C.PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline.launch.worker", str(cfg), *sets]
        outs = [subprocess.run(cmd, cwd=C.ROOT, env=child_env(), capture_output=True, text=True, timeout=900)]
        codes = [outs[0].returncode]
        text = outs[0].stdout + outs[0].stderr
    else:
        procs = [net.run(host, [C.PYTHON, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                f"--node_rank={r}", f"--master_addr={net.address('head')}", f"--master_port={port}",
                                "-m", "pipeline.launch.worker", str(cfg), *sets],
                         env=child_env(), cwd=C.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r, host in enumerate(TwoHosts.NAMES)]
        texts = [p.communicate(timeout=900)[0] for p in procs]
        codes = [p.returncode for p in procs]
        text = "\n".join(texts)
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"{variant} failed ({codes}):\n{text[-4000:]}")
    steps = {int(m.group(1)): float(m.group(2)) for m in STEP_RE.finditer(text)}
    result = json.loads((cfg.parent / "runs" / name / "result.json").read_text())
    return {"steps": steps, "switch_s": result.get("switch_dash_seconds", float("nan")), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args()
    why = TwoHosts.available()
    if why is not None:
        raise SystemExit(f"needs network namespaces: {why}")
    repeat = args.repeat or (1 if args.quick else 3)
    steps, switch, skip = (12, 4, 2) if args.quick else (30, 10, 3)
    C.print_header("bench_multinode", args)
    work = C.work_dir("bench-multinode")
    cfg = write_config(work, make_model(work / "model", args.quick), steps, switch)
    got: dict[str, list[dict]] = {"one-node": [], "two-node": []}
    with TwoHosts() as net:
        for i in range(repeat):
            order = ["one-node", "two-node"] if i % 2 == 0 else ["two-node", "one-node"]
            for variant in order:
                got[variant].append(run(variant, net, cfg, f"{variant}-{i}", 29700 + i))
                print(f"  round {i + 1}: {variant} done in {got[variant][-1]['wall_s']:.1f}s", flush=True)
    rows, medians = [], {}
    for variant, runs in got.items():
        step_times = [t for r in runs for k, t in r["steps"].items() if k > skip and k != switch]
        medians[variant] = C.med(step_times)
        rows.append([variant, C.fmt_spread(step_times, 1000, 1) + " ms", C.fmt_spread([r["switch_s"] for r in runs], 1000, 1)
                     + " ms", C.fmt_spread([r["wall_s"] for r in runs], 1, 1) + " s"])
    print(C.table(["variant", "step time (median [IQR])", "switch", "command wall time"], rows))
    C.print_footer_load()
    C.headline("two_node_over_one_node", medians["two-node"] / medians["one-node"])


if __name__ == "__main__":
    main()
