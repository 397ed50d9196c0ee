"""The pre-registered comparison's report (docs/RESULTS.md, part 1), from the sweep's run folders
(benchmarks/sweep_methods.py) and their MLflow experiment:

    python benchmarks/report_comparison.py [--runs runs/sarcasm] [--out docs/results/sarcasm]

Writes to --out:
  runs.csv             one row per run: method, seed, accuracy, MCC, final loss, MLflow run id
  paired.md            each method - LoRA by seed: accuracy and MCC differences, mean, 95%
                       t-interval, exact sign-flip p (pipeline/reports/stats.py)
  dash_magnitude.csv   per dash/tsd run: the median over layers and directions of |d_i| / |LoRA's
                       component u_i^T dW v_i| and of ||dash term|| / ||LoRA's dW|| (Frobenius);
                       for LoRA-Dash runs also what the layers compute on the first --rows test rows:
                       the median over layers of ||x V_s diag(d) U_s^T|| / ||scaling x A^T B^T||
                       (the dash term's share of the update's OUTPUT), and of the input energy
                       along V_s, ||x V_s||^2 / ||x||^2, as a multiple of s / n (isotropic input);
                       and the same model with its dash scalars zeroed: the mean largest logit
                       change over the mean logit spread, and the rows whose class changes
  paired.png           the paired accuracy differences: one dot per seed, mean and 95% interval
  comparison.*         `tsd compare` of the MLflow experiment (the paper-style table)
  mcc/comparison.*     the same of Matthews correlation x 100 (`tsd compare --metric mcc`)
Partial sweeps report what is there (pairs need both runs of a seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.reports.compare import compare_experiment  # noqa: E402
from pipeline.reports.results import METHOD_NAMES  # noqa: E402
from pipeline.reports.plots import new_figure, save_figure  # noqa: E402
from pipeline.reports.stats import mean_ci95, sign_flip_p  # noqa: E402

METHODS = ["lora", "dash", "init", "tsd", "full", "dash10"]
LABELS = {**METHOD_NAMES, "dash10": "LoRA-Dash, dash lr x10"}  # the follow-up arm (benchmarks/sweep_methods.py ARMS)
# The dash check's pre-registered threshold on the median |d_i| / |LoRA component| (RESULTS 1 and 1b)
CHECK_THRESHOLD = {"dash": 3, "tsd": 3, "dash10": 10}


def read_runs(runs: Path, task: str) -> list[dict]:
    out = []
    for result in sorted(runs.glob("*-s*/result.json")):
        method, _, seed = result.parent.name.rpartition("-s")
        r = json.loads(result.read_text())
        out.append({"method": method, "seed": int(seed), "acc": 100 * r[f"acc_{task}"], "mcc": r[f"mcc_{task}"],
                    "final_loss": r.get("final_loss"), "mlflow_run_id": r.get("mlflow_run_id"), "dir": result.parent})
    return out


def paired(runs: list[dict], key: str) -> dict[str, dict]:
    """method -> {seeds, diffs, mean, ci, p} of `key` minus LoRA's at the same seed."""
    lora = {r["seed"]: r[key] for r in runs if r["method"] == "lora"}
    out = {}
    for method in METHODS[1:]:
        mine = {r["seed"]: r[key] for r in runs if r["method"] == method and r["seed"] in lora}
        seeds = sorted(mine)
        if not seeds:
            continue
        diffs = [mine[s] - lora[s] for s in seeds]
        out[method] = {"seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs), "ci": mean_ci95(diffs),
                       "p": sign_flip_p(diffs) if len(diffs) > 1 else None}
    return out


def dash_magnitude(adapter: Path) -> dict[str, float]:
    """Median |d_i| / |u_i^T dW_lora v_i| and median ||dash|| / ||dW_lora|| over the layers."""
    state = load_file(str(adapter / "tsd_state.safetensors"))
    with safe_open(str(adapter / "tsd_state.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["tsd_config"])
    scaling = config["alpha"] / config["r"]
    ratios, shares = [], []
    for key in sorted(k for k in state if k.endswith(".dash_scalars")):
        name = key[: -len(".dash_scalars")]
        A, B = state[f"{name}.lora_A"].double(), state[f"{name}.lora_B"].double()
        delta = scaling * B @ A
        if f"{name}.init_A0" in state:  # LoRA-TSD: the update is against the original weight
            delta -= scaling * state[f"{name}.init_B0"].double() @ state[f"{name}.init_A0"].double()
        U, V, d = state[f"{name}.dash_U"].double(), state[f"{name}.dash_V"].double(), state[key].double()
        own = torch.einsum("mi,mn,ni->i", U, delta, V)
        ratios += (d.abs() / own.abs().clamp_min(1e-12)).tolist()
        dash = (U * d) @ V.T
        shares.append(float(dash.norm() / delta.norm().clamp_min(1e-12)))
    return {"median_scalar_ratio": statistics.median(ratios), "median_norm_share": statistics.median(shares),
            "median_abs_scalar": statistics.median(float(x) for k in state if k.endswith(".dash_scalars")
                                                   for x in state[k].abs()),
            "directions": len(ratios)}


@torch.no_grad()
def dash_activations(run_dir: Path, rows: int) -> dict[str, float]:
    """What the dash term adds to the layers' outputs on real inputs, beside LoRA's term (a
    LoRA-Dash run: the update is scaling B A + the dash term, against the original base)."""
    from pipeline.classification.rows import load_labelled
    from pipeline.data.loader import tokenize_labelled
    from pipeline.eval_command import load_model
    from tsd.inject import tsd_layers

    config = json.loads((run_dir / "run_config.json").read_text())
    test = config["data"]["test"][0].partition("=")[2]
    model, tokenizer = load_model(None, run_dir / "adapter", device="cpu")
    sums: dict[str, list[float]] = {}

    def hook(name, layer):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            lora = layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
            along = x @ layer.dash_V
            dash = (along * layer.dash_scalars) @ layer.dash_U.t()
            acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate((dash.square().sum(), lora.square().sum(), along.square().sum(), x.square().sum())):
                acc[i] += float(v)
        return record

    layers = dict(tsd_layers(model))
    encoded = [tokenize_labelled(tokenizer, record, 0, config["data"]["cutoff_len"]) for record in load_labelled(test)[:rows]]
    inputs = [{k: torch.tensor([v]) for k, v in enc.items() if k != "labels"} for enc in encoded]
    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    with_dash = [model(**x).logits[0] for x in inputs]
    for h in handles:
        h.remove()
    saved = {name: layer.dash_scalars.clone() for name, layer in layers.items()}
    for layer in layers.values():  # the same model without its dash term: what the term changes
        layer.dash_scalars.zero_()
    without = [model(**x).logits[0] for x in inputs]
    for name, layer in layers.items():
        layer.dash_scalars.copy_(saved[name])
    spread = statistics.fmean(float(a.max() - a.min()) for a in with_dash)
    out_share = [(d / l) ** 0.5 for d, l, _, _ in sums.values()]
    energy = [(a / x) / (layers[name].dash_V.shape[1] / layers[name].dash_V.shape[0])
              for name, (_, _, a, x) in sums.items()]
    return {"median_output_share": statistics.median(out_share), "median_input_energy_vs_isotropic": statistics.median(energy),
            "logit_change_vs_spread": statistics.fmean(float((a - b).abs().max()) for a, b in zip(with_dash, without)) / spread,
            "rows_flipped_without_dash": sum(int(a.argmax() != b.argmax()) for a, b in zip(with_dash, without))}


def paired_markdown(pairs: dict[str, dict], unit: str, digits: int) -> str:
    lines = [f"| Method | mean − LoRA ({unit}) | 95% CI | sign-flip p | per seed | n |", "| --- | ---: | ---: | ---: | --- | ---: |"]
    for method, p in pairs.items():
        ci = f"[{p['ci'][0]:+.{digits}f}, {p['ci'][1]:+.{digits}f}]" if p["ci"] else "—"
        pv = f"{p['p']:.3f}" if p["p"] is not None else "—"
        seeds = ", ".join(f"s{s}: {d:+.{digits}f}" for s, d in zip(p["seeds"], p["diffs"]))
        lines.append(f"| {LABELS[method]} | {p['mean']:+.{digits}f} | {ci} | {pv} | {seeds} | {len(p['diffs'])} |")
    return "\n".join(lines)


def plot_paired(pairs: dict[str, dict], path: Path) -> Path:
    fig = new_figure(6.5, 3.6)
    ax = fig.subplots()
    for i, (method, p) in enumerate(pairs.items()):
        ax.scatter([i] * len(p["diffs"]), p["diffs"], color="0.55", s=14, zorder=2, label="one seed" if i == 0 else None)
        if p["ci"]:
            ax.errorbar([i + 0.12], [p["mean"]], yerr=[[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]], fmt="o",
                        color=f"C{i}", capsize=4, zorder=3)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(pairs)), [LABELS[m] for m in pairs])
    ax.set_ylabel("test accuracy − LoRA, same seed (pp)")
    ax.set_title("paired with LoRA: seeds (grey), mean and 95% t-interval", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs/sarcasm")
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/sarcasm")
    p.add_argument("--task", default="sarcasm")
    p.add_argument("--tracking-uri", default=None, help="default: the sweep's store, <runs>/mlflow.db")
    p.add_argument("--experiment", default="sarcasm-minilm")
    p.add_argument("--rows", type=int, default=256, help="test rows for the dash term's output share")
    args = p.parse_args(argv)
    runs = read_runs(args.runs, args.task)
    if not runs:
        print(f"no finished runs under {args.runs}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "accuracy_pct", "mcc", "final_loss", "mlflow_run_id"])
        for r in sorted(runs, key=lambda r: (METHODS.index(r["method"]), r["seed"])):
            w.writerow([r["method"], r["seed"], f"{r['acc']:.4f}", f"{r['mcc']:.5f}", r["final_loss"], r["mlflow_run_id"]])
    acc, mcc = paired(runs, "acc"), paired(runs, "mcc")
    text = ["## Accuracy (percentage points)", "", paired_markdown(acc, "pp", 2), "",
            "## Matthews correlation", "", paired_markdown(mcc, "MCC", 4), ""]
    by_method = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    text += ["## Per method", "", "| Method | n | accuracy % mean ± sd | MCC mean ± sd |", "| --- | ---: | ---: | ---: |"]
    for method in METHODS:
        rs = by_method.get(method, [])
        if rs:
            a, m = [r["acc"] for r in rs], [r["mcc"] for r in rs]
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
            text.append(f"| {LABELS[method]} | {len(rs)} | {statistics.fmean(a):.2f} ± {sd(a):.2f} | "
                        f"{statistics.fmean(m):.4f} ± {sd(m):.4f} |")
    rows = []
    for r in runs:
        if r["method"] in ("dash", "tsd", "dash10"):
            row = {"method": r["method"], "seed": r["seed"], **dash_magnitude(r["dir"] / "adapter")}
            if r["method"] != "tsd":  # LoRA-TSD's update is against a re-initialised base: not this formula
                row.update(dash_activations(r["dir"], args.rows))
            rows.append(row)
    if rows:
        with open(args.out / "dash_magnitude.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for x in rows for k in x)))
            w.writeheader()
            w.writerows(rows)
        text += ["", "## Dash magnitude (pre-registered check: median ratio >= 3; part 1b's arm: >= 10)", "",
                 "| Method | seed | median \\|d_i\\| / \\|LoRA component\\| | median \\|\\|dash\\|\\| / \\|\\|LoRA dW\\|\\| | median \\|d_i\\| "
                 f"| dash output / LoRA output ({args.rows} test rows) | input energy along V_s / (s/n) "
                 "| logit change without the dash term / logit spread | rows whose class changes without it |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        text += [f"| {LABELS[x['method']]} | {x['seed']} | {x['median_scalar_ratio']:.2f} | "
                 f"{x['median_norm_share']:.3f} | {x['median_abs_scalar']:.4f} | "
                 + (f"{x['median_output_share']:.3f} | {x['median_input_energy_vs_isotropic']:.2f} | "
                    f"{x['logit_change_vs_spread']:.4f} | {x['rows_flipped_without_dash']} / {args.rows} |"
                    if "median_output_share" in x else "— | — | — | — |") for x in rows]
        text += [""] + [f"{LABELS[m]}: median of the runs' median ratios "
                        f"{statistics.median(x['median_scalar_ratio'] for x in rows if x['method'] == m):.2f} "
                        f"({sum(x['median_scalar_ratio'] >= need for x in rows if x['method'] == m)} of "
                        f"{sum(x['method'] == m for x in rows)} runs at >= {need}, its pre-registered threshold)."
                        for m, need in CHECK_THRESHOLD.items() if any(x["method"] == m for x in rows)]
    (args.out / "paired.md").write_text("\n".join(text) + "\n")
    if acc:
        plot_paired(acc, args.out / "paired.png")
    uri = args.tracking_uri or f"sqlite:///{args.runs.resolve() / 'mlflow.db'}"
    compare_experiment(uri, args.experiment, out_dir=args.out, digits=2)
    compare_experiment(uri, args.experiment, out_dir=args.out / "mcc", digits=2, metric="mcc")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
