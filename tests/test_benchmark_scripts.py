"""A smoke test of the scripts that produce docs/RESULTS.md's tables (issue 26): the method sweep
(benchmarks/sweep_methods.py) runs two real 2-rank runs of a tiny classifier through the real
worker entry, a second call skips them as finished, and the report (benchmarks/report_comparison.py)
turns them into its files, whose numbers are checked against the runs' own result.json.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from proc_group import ROOT, child_env
from test_seq_cls import make_toy

pytestmark = pytest.mark.slow


def test_the_sweep_runs_resumes_and_the_report_reads_it(tmp_path):
    toy = make_toy(tmp_path / "toy")
    runs = tmp_path / "runs"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "unused", "output_dir": str(runs),
        "model": {"path": str(toy["encoder"]), "task": "seq_cls"},
        "data": {"train": str(toy["train"]), "test": [f"toy={toy['test']}"], "cutoff_len": 32},
        "method": {"r": 4, "alpha": 8, "dropout": 0.0, "switch_step": 2, "num_directions": 3,
                   "targets": ["query", "value"]},
        "train": {"lr": 1e-2, "warmup_steps": 1, "micro_batch_size": 4, "max_steps": 4, "eval_batch_size": 8},
        "deepspeed": {"config": str(ROOT / "configs/deepspeed/zero3.json")},
        "workers": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{runs / 'mlflow.db'}", "experiment": "sweep-smoke"},
    }))
    sweep = [sys.executable, str(ROOT / "benchmarks/sweep_methods.py"), "--config", str(config),
             "--methods", "lora", "dash", "--seeds", "1", "--out", str(runs), "--nproc", "2"]
    first = subprocess.run(sweep, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "sweep complete" in first.stdout, first.stdout + first.stderr
    again = subprocess.run(sweep, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert again.stdout.count("finished already") == 2, again.stdout

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks/report_comparison.py"), "--runs", str(runs),
                             "--out", str(out), "--task", "toy", "--experiment", "sweep-smoke", "--rows", "8"],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    results = {m: json.loads((runs / f"{m}-s1/result.json").read_text()) for m in ("lora", "dash")}
    table = {row["method"]: row for row in csv.DictReader((out / "runs.csv").open())}
    assert set(table) == {"lora", "dash"}
    for method, result in results.items():
        assert float(table[method]["accuracy_pct"]) == pytest.approx(100 * result["acc_toy"], abs=1e-4)
        assert float(table[method]["mcc"]) == pytest.approx(result["mcc_toy"], abs=1e-5)
    diff = 100 * (results["dash"]["acc_toy"] - results["lora"]["acc_toy"])
    assert f"| LoRA-Dash | {diff:+.2f} | — | — | s1: {diff:+.2f} | 1 |" in (out / "paired.md").read_text()
    magnitude = list(csv.DictReader((out / "dash_magnitude.csv").open()))
    assert [m["method"] for m in magnitude] == ["dash"] and float(magnitude[0]["median_scalar_ratio"]) > 0
    for f in ("paired.png", "comparison.md", "comparison.csv", "mcc/comparison.md"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
