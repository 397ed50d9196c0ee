"""The TSD exploration (docs/RESULTS.md, part 2): do short LoRA runs point at the same
task-specific directions whatever the pre-launch length t, the rank r and the seed?

    python benchmarks/explore_tsd.py run    --model minilm     # the runs (resumable)
    python benchmarks/explore_tsd.py report --model minilm     # tables and plots

Each point is a real LoRA-Dash run of the pipeline (2 CPU ranks, torchrun) stopped one step
after its switch at step t: its adapter holds the s = 8 directions per layer that the change
rates of the LoRA update at step t select (`dash_indices`, `dash_U`, `dash_V`). Runs of the same
seed share the data order, the LoRA start and (a constant rate after 4 warm-up steps) the
schedule, so t = 8, 16, 32, 64 are four looks at ONE training trajectory. The grid (each row varies one thing, the others at r = 8, t = 32, seed 1):

    t    in 8, 16, 32, 64        r    in 2, 4, 8, 16        seed in 1, 2, 3

Overlap of two selections of one layer (tsd/analysis.py): index |I ∩ J| / s, and UV, the
overlap of the spans of the rank-one directions u_i v_i^T. Chance, for s of the k = min(m, n)
singular directions drawn uniformly at random: s / k for both (the u_i v_i^T of one SVD are
orthonormal, so UV of two index sets is their index overlap). Where in the spectrum the
selections sit: the selected indices as fractions of k.

A second, harder baseline, because the change rate |u_i^T dW v_i| / sigma_i divides by the
singular value and so leans towards the bottom of the spectrum whatever dW is: "chance given the
spectrum", the overlap of the selections that two independent RANDOM rank-r updates (Gaussian
factors) get from the same weights and the same rule. Agreement above it is agreement that the
training signal, not the 1/sigma weighting, produced.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.reports.plots import new_figure, save_figure  # noqa: E402
from safetensors import safe_open  # noqa: E402

from tsd.analysis import chance_index_overlap, index_overlap, layer_overlaps, read_selections  # noqa: E402
from tsd.directions import decompose, layer_directions  # noqa: E402

S = 8
BASE = {"t": 32, "r": 8, "seed": 1}
AXES = {"t": [8, 16, 32, 64], "r": [2, 4, 8, 16], "seed": [1, 2, 3]}
MODELS = {
    "minilm": {"config": "configs/sarcasm_minilm.yaml", "path": ".cache/models/all-minilm-l6-v2",
               "sets": ["train.micro_batch_size=8", "train.warmup_steps=4", "data.test=[]"]},
    "smollm2": {"config": "configs/smollm2_social_i_qa.yaml", "path": ".cache/models/smollm2-135m-instruct",
                "sets": ["train.micro_batch_size=4", "train.grad_accum=1", "train.warmup_steps=4",
                         "data.test=[]", "method.svd_cache=.cache/svd"]},
}


def points() -> list[dict]:
    """Every (t, r, seed) of the grid once."""
    seen, out = set(), []
    for axis, values in AXES.items():
        for v in values:
            p = {**BASE, axis: v}
            key = (p["t"], p["r"], p["seed"])
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def run_name(p: dict) -> str:
    return f"t{p['t']}-r{p['r']}-s{p['seed']}"


def run_points(model: str, out: Path) -> int:
    spec = MODELS[model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    todo = points()
    for i, p in enumerate(todo, 1):
        name = run_name(p)
        if (out / name / "adapter/tsd_state.safetensors").is_file():
            print(f"[{i}/{len(todo)}] {name}: done already", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {name}: running", flush=True)
        sets = [f"name={name}", f"output_dir={out}", "method.method=dash", f"method.r={p['r']}",
                f"method.alpha={2 * p['r']}", f"method.switch_step={p['t']}", f"method.num_directions={S}",
                f"train.max_steps={p['t'] + 1}", f"train.seed={p['seed']}", "train.checkpoint_every=1000",
                # constant after warm-up: runs of one seed then share their first t steps exactly
                # (a decay over max_steps would give each t its own trajectory)
                "train.schedule=constant",
                f"tracking.experiment=tsd-exploration-{model}", *spec["sets"]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline.launch.worker", str(ROOT / spec["config"]), *[a for s in sets for a in ("--set", s)]]
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{name}.log", "a") as log:
            subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if not (out / name / "adapter/tsd_state.safetensors").is_file():
            print(f"  failed: see {out}/{name}.log; rerun to resume", flush=True)
            return 1
    return 0


def module_type(layer: str) -> str:
    """The layer's name without its block prefix: "bert.encoder.layer.3.attention.self.query" ->
    "attention.self.query"; "model.layers.3.mlp.up_proj" -> "mlp.up_proj"."""
    return re.sub(r"^.*?\.layers?\.\d+\.", "", layer)


def report(model: str, runs: Path, out: Path) -> str:
    sel = {run_name(p): read_selections(runs / run_name(p) / "adapter", "dash", run_name(p)) for p in points()}
    rows, lines = [], [f"### {model}: overlap of the selected directions, mean over layers of each type", ""]
    summary = {}
    for axis, values in AXES.items():
        names = [run_name({**BASE, axis: v}) for v in values]
        for a, b in itertools.combinations(names, 2):
            for layer, la in sel[a].layers.items():
                lb = sel[b].layers[layer]
                o = layer_overlaps(la, lb)
                chance = chance_index_overlap(S, S, min(la.shape))
                rows.append({"axis": axis, "a": a, "b": b, "layer": layer, "type": module_type(layer),
                             "index": o["index"], "UV": o["UV"], "chance": chance})
        summary[axis] = rows_of(rows, axis)
    null = spectrum_null(model, list(sel[run_name(BASE)].layers))
    for r in rows:
        r["spectrum_null"] = null[r["layer"]]
    types = sorted({r["type"] for r in rows})
    lines += ["| varied | pairs | " + " | ".join(types) + " | all layers | chance (s/k) | chance given the spectrum |",
              "| --- | ---: | " + " | ".join("---:" for _ in types) + " | ---: | ---: | ---: |"]
    for axis, rs in summary.items():
        pairs = len({(r["a"], r["b"]) for r in rs})
        per_type = [statistics.fmean(r["index"] for r in rs if r["type"] == t) for t in types]
        lines.append(f"| {axis} ({', '.join(map(str, AXES[axis]))}) | {pairs} | " +
                     " | ".join(f"{v:.2f}" for v in per_type) +
                     f" | **{statistics.fmean(r['index'] for r in rs):.2f}** | {statistics.fmean(r['chance'] for r in rs):.3f} "
                     f"| {statistics.fmean(r['spectrum_null'] for r in rs):.2f} |")
    lines.append("| chance given the spectrum, per type | | " + " | ".join(
        f"{statistics.fmean(null[l] for l in null if module_type(l) == t):.2f}" for t in types) + " | | | |")
    lines += ["", "Index overlap |I ∩ J| / s (s = 8); the UV overlap (overlaps.csv) equals it to 1e-6: one spectrum. "
              "Chance: s / min(m, n).", ""]
    # where in the spectrum: fractions of k of every selected index, per module type, base point
    base = sel[run_name(BASE)]
    positions = {}
    for layer, ls in base.layers.items():
        positions.setdefault(module_type(layer), []).extend((ls.indices.double() / min(ls.shape)).tolist())
    lines += ["Where the directions sit (base point t = 32, r = 8, seed 1): selected index / k.", "",
              "| type | k | median | share in the top 10% | share in the bottom 50% |", "| --- | ---: | ---: | ---: | ---: |"]
    for t in types:
        v = positions[t]
        k = min(next(ls.shape for n, ls in base.layers.items() if module_type(n) == t))
        lines.append(f"| {t} | {k} | {statistics.median(v):.2f} | {sum(x < 0.1 for x in v) / len(v):.2f} | "
                     f"{sum(x >= 0.5 for x in v) / len(v):.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "overlaps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "positions.json").write_text(json.dumps(positions, indent=1))
    plot(model, summary, types, positions, out / "exploration.png")
    text = "\n".join(lines) + "\n"
    (out / "exploration.md").write_text(text)
    return text


def spectrum_null(model: str, layers: list[str], r: int = BASE["r"], draws: int = 3) -> dict[str, float]:
    """Per layer, the mean index overlap of the selections of independent random rank-r updates
    (A, B Gaussian) on the layer's real weight: what the 1/sigma weighting alone makes agree."""
    import torch

    folder = ROOT / MODELS[model]["path"]
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i, layer in enumerate(layers):
            key = next(k for k in (f"{layer}.weight", f"{layer.split('.', 1)[1]}.weight") if k in keys)
            weight = f.get_tensor(key).float()
            dec = decompose(weight)
            g = torch.Generator().manual_seed(1000 + i)
            picks = [layer_directions(layer, None, torch.randn(r, weight.shape[1], generator=g),
                                      torch.randn(weight.shape[0], r, generator=g), 1.0, S, decomposition=dec).indices
                     for _ in range(draws)]
            out[layer] = statistics.fmean(index_overlap(a, b) for a, b in itertools.combinations(picks, 2))
    return out


def rows_of(rows: list[dict], axis: str) -> list[dict]:
    return [r for r in rows if r["axis"] == axis]


def plot(model: str, summary: dict, types: list[str], positions: dict, path: Path) -> Path:
    fig = new_figure(11, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.8 / len(summary)
    for k, (axis, rs) in enumerate(summary.items()):
        means = [statistics.fmean(r["index"] for r in rs if r["type"] == t) for t in types]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(types))]
        ax1.bar(xs, means, width, label=f"across {axis}", color=f"C{k}")
    first = next(iter(summary.values()))
    chance = [statistics.fmean(r["chance"] for r in first if r["type"] == t) for t in types]
    null = [statistics.fmean(r["spectrum_null"] for r in first if r["type"] == t) for t in types]
    ax1.scatter(range(len(types)), chance, marker="_", s=400, color="k", label="chance s/k", zorder=3)
    ax1.scatter(range(len(types)), null, marker="_", s=400, color="r", label="chance given the spectrum", zorder=3)
    ax1.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=7)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("index overlap |I∩J|/s")
    ax1.set_title(f"{model}: agreement of the selected directions", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.hist([positions[t] for t in types], bins=20, range=(0, 1), stacked=True, label=types)
    ax2.set_xlabel("selected index / k (0 = largest singular value)")
    ax2.set_ylabel("directions")
    ax2.set_title("where in the spectrum (t=32, r=8, seed 1)", fontsize=9)
    ax2.legend(fontsize=6)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("--model", choices=list(MODELS), default="minilm")
    p.add_argument("--runs", type=Path, default=None, help="default runs/explore-<model>")
    p.add_argument("--out", type=Path, default=None, help="default docs/results/exploration/<model>")
    args = p.parse_args(argv)
    runs = args.runs or ROOT / f"runs/explore-{args.model}"
    if args.what == "run":
        return run_points(args.model, runs)
    print(report(args.model, runs, args.out or ROOT / f"docs/results/exploration/{args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
