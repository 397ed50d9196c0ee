"""`tsd compare` on a throw-away sqlite MLflow store holding runs with known numbers."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest

from pipeline.launch import cli
from pipeline.reports.compare import build_table, compare_experiment, format_text, run_result
from pipeline.tracking.store import default_tracking_uri, end_run, start_run, summarize_run

EXP = "sweep"


def _run(uri, method, r, seed, metrics, trainable="0.5123", status="FINISHED", experiment=EXP, **train):
    run_id = start_run(uri, experiment, f"{method}-r{r}-s{seed}",
                       params={"method": {"method": method, "r": r}, "train": {"seed": seed, **train}})  # fmt: skip
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if trainable is not None:
        client.log_param(run_id, "trainable_percent", trainable)
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    end_run(uri, run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow"))
    # LoRA-Dash r=8, three seeds (fractions, as pipeline/evaluate.py logs them)
    for seed, (b, p, avg) in zip((1, 2, 3), [(0.70, 0.80, 0.75), (0.72, 0.81, 0.765), (0.74, 0.85, 0.795)]):
        _run(uri, "dash", 8, seed, {"acc_boolq": b, "acc_piqa": p, "acc_avg": avg}, trainable="0.8302")
    # LoRA r=8, one seed, no acc_avg: the mean of its tasks is used
    _run(uri, "lora", 8, 1, {"acc_boolq": 0.65, "acc_piqa": 0.78})
    # LoRA r=4 logged percentages
    _run(uri, "lora", 4, 1, {"acc_boolq": 60.0, "acc_piqa": 70.0, "acc_avg": 65.0}, trainable=None)
    # LoRA-TSD r=16: two seeds, no acc_avg (per-run means 37.5 and 60), one with an extra task
    # (ordered after the paper's eight)
    _run(uri, "tsd", 16, 1, {"acc_boolq": 0.5, "acc_zzz_custom": 0.25})
    _run(uri, "tsd", 16, 2, {"acc_boolq": 0.6})
    # excluded: failed / running runs, a run without method params, another experiment
    _run(uri, "dash", 8, 9, {"acc_boolq": 0.0, "acc_piqa": 0.0}, status="FAILED")
    start_run(uri, EXP, "still-running", params={"method": {"method": "dash", "r": 8}})
    other = start_run(uri, EXP, "no-method")
    end_run(uri, other)
    _run(uri, "dash", 8, 1, {"acc_boolq": 0.1}, experiment="other")
    return uri


EXPECTED_ROWS = [
    # method, r, BoolQ, PIQA, custom, Avg., Params, n
    ["LoRA", "4", "60.00", "70.00", "-", "65.00", "-", "1"],
    ["LoRA", "8", "65.00", "78.00", "-", "71.50", "0.5123", "1"],
    ["LoRA-Dash", "8", "72.00 ± 2.00", "82.00 ± 2.65", "-", "77.00 ± 2.29", "0.8302", "3"],
    ["LoRA-TSD", "16", "55.00 ± 7.07", "-", "25.00", "48.75 ± 15.91", "0.5123", "2"],
]


def test_printed_table(store, capsys):
    assert cli.main(["compare", EXP, "--tracking-uri", store, "--digits", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["Method", "r", "BoolQ", "PIQA", "zzz_custom", "Avg.", "Params", "(%)", "n"]
    assert set(lines[1]) <= {"-", " "}
    body = [[c.strip() for c in _split_cols(line)] for line in lines[2:6]]
    assert body == EXPECTED_ROWS
    assert not any("wrote" in line for line in lines)  # no --out: nothing written


def _split_cols(line: str) -> list[str]:
    # columns are separated by two spaces; "72.00 ± 2.00" has single spaces inside
    return [c for c in line.split("  ") if c.strip()]


def test_numbers_are_the_means_and_sample_stds(store):
    from pipeline.reports.compare import fetch_runs

    table = build_table(fetch_runs(store, EXP), EXP)
    dash = next(r for r in table.rows if r.method == "dash")
    assert dash.n == 3 and sorted(dash.seeds) == ["1", "2", "3"]
    assert dash.cells["boolq"].mean == pytest.approx(72.0)
    assert dash.cells["piqa"].std == pytest.approx(statistics.stdev([80.0, 81.0, 85.0]))
    assert dash.cells["piqa"].std == pytest.approx(math.sqrt(7.0))
    assert dash.cells["avg"].std == pytest.approx(math.sqrt(5.25))
    assert [(r.method, r.r) for r in table.rows] == [("lora", 4), ("lora", 8), ("dash", 8), ("tsd", 16)]
    assert table.tasks == ["boolq", "piqa", "zzz_custom"]


def test_files_and_comparison_run(store, tmp_path):
    out = compare_experiment(store, EXP, out_dir=tmp_path / "cmp", digits=2, log_run=True)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| LoRA-Dash | 8 | 72.00 ± 2.00 | 82.00 ± 2.65 | - | 77.00 ± 2.29 | 0.8302 | 3 |" in md
    # Paired with LoRA r=8, which ran seed 1 only: 75.00 - 71.50 (LoRA's mean of its tasks).
    assert "| LoRA-Dash | 8 | 3.50 | — | — | s1: +3.50 | 1 / 0 | 1 |" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "comparison.csv").read_text())))
    dash = next(r for r in rows if r["method"] == "dash")
    assert float(dash["boolq_mean"]) == pytest.approx(72.0) and float(dash["piqa_std"]) == pytest.approx(math.sqrt(7))
    assert dash["piqa_n"] == "3" and dash["method_name"] == "LoRA-Dash" and len(dash["run_ids"].split()) == 3
    tsd_row = next(r for r in rows if r["method"] == "tsd")
    assert tsd_row["piqa_mean"] == "" and tsd_row["boolq_n"] == "2"
    png = (tmp_path / "cmp" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    s = summarize_run(store, out["run_id"])
    assert s["status"] == "FINISHED" and s["run_name"] == "comparison"
    assert {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.png"} <= set(s["artifacts"])
    # the comparison run itself is not a row of later comparisons
    again = compare_experiment(store, EXP, digits=2)
    assert format_text(again["table"], 2) == out["text"]


def test_errors(store, capsys, tmp_path):
    assert cli.main(["compare", "nope", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "no experiment named 'nope'" in err and "sweep" in err
    missing = tmp_path / "none" / "mlflow.db"
    assert cli.main(["compare", EXP, "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not missing.parent.exists()
    start_run(store, "empty", "x")
    assert cli.main(["compare", "empty", "--tracking-uri", store]) == 2


def test_mcc_table_from_classification_runs(tmp_path, capsys):
    """--metric mcc tabulates mcc_<task> (x 100, negatives kept) and pairs it with LoRA; a store
    whose runs logged no MCC is an error naming the metric."""
    uri = default_tracking_uri(tmp_path / "mlflow")
    for seed, (acc_lora, mcc_lora, mcc_dash) in zip((1, 2), [(0.89, 0.78, 0.80), (0.90, -0.10, 0.05)]):
        _run(uri, "lora", 8, seed, {"acc_sarcasm": acc_lora, "acc_avg": acc_lora, "mcc_sarcasm": mcc_lora})
        _run(uri, "dash", 8, seed, {"acc_sarcasm": 0.5, "acc_avg": 0.5, "mcc_sarcasm": mcc_dash})
    out = compare_experiment(uri, EXP, digits=2, metric="mcc", out_dir=tmp_path / "cmp")
    rows = {r.method: r for r in out["table"].rows}
    assert sorted(rows["lora"].cells["sarcasm"].values) == pytest.approx([-10.0, 78.0])
    assert rows["dash"].cells["avg"].mean == pytest.approx(42.5)  # no mcc_avg: the mean of the tasks
    # paired: dash - lora per seed = +2 and +15 MCC points
    assert "| LoRA-Dash | 8 | 8.50 ± 9.19 |" in out["paired"] and "s1: +2.00, s2: +15.00" in out["paired"]
    assert "Matthews correlation" in out["paired"]
    assert cli.main(["compare", EXP, "--tracking-uri", uri, "--metric", "mcc"]) == 0
    assert "LoRA-Dash" in capsys.readouterr().out
    acc_only = default_tracking_uri(tmp_path / "acc-only")
    _run(acc_only, "lora", 8, 1, {"acc_boolq": 0.6})
    assert cli.main(["compare", EXP, "--tracking-uri", acc_only, "--metric", "mcc"]) == 2
    assert "logged mcc_<task> metrics" in capsys.readouterr().err


def test_a_dash_lr_scale_is_its_own_row(tmp_path):
    """Runs of one method at another train.dash_lr_scale are not pooled with it (same seeds,
    another setting): their own row, labelled, paired with LoRA like any other."""
    uri = default_tracking_uri(tmp_path / "mlflow")
    for seed in (1, 2):
        _run(uri, "lora", 8, seed, {"acc_avg": 0.80})
        _run(uri, "dash", 8, seed, {"acc_avg": 0.81}, dash_lr_scale=1.0)
        _run(uri, "dash", 8, seed, {"acc_avg": 0.83}, dash_lr_scale=10.0)
    out = compare_experiment(uri, EXP, digits=2)
    assert [(r.method, r.n) for r in out["table"].rows] == [("lora", 2), ("dash", 2), ("dash@10", 2)]
    assert "LoRA-Dash (dash lr x10)  8" in out["text"]
    assert "| LoRA-Dash (dash lr x10) | 8 | 3.00 ± 0.00 |" in out["paired"]
    assert "| LoRA-Dash | 8 | 1.00 ± 0.00 |" in out["paired"]


def test_run_result_skips_foreign_runs():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def run(params, metrics=None, tags=None):
        return Obj(info=Obj(run_id="x", run_name="n"), data=Obj(params=params, metrics=metrics or {}, tags=tags or {}))

    assert run_result(run({})) is None
    assert run_result(run({"method.method": "dash"}, tags={"tsd.kind": "comparison"})) is None
    res = run_result(run({"method.method": "init", "method.r": "16"}, {"acc_piqa": 0.5, "acc_avg": float("nan")}))
    assert (res.method, res.r, res.acc, res.avg) == ("init", 16, {"piqa": 50.0}, 50.0)


def test_paired_with_lora_matches_the_seed_by_seed_differences():
    from pipeline.reports.paired import paired_with_lora
    from pipeline.reports.results import RunResult

    def run(method, r, seed, avg):
        return RunResult(f"{method}{r}{seed}", "", method, r, seed, None, {"t": avg}, avg)

    runs = [run("lora", 4, s, a) for s, a in (("0", 50.0), ("1", 52.0), ("2", 54.0))]
    runs += [run("dash", 4, s, a) for s, a in (("0", 53.0), ("1", 51.0), ("2", 58.0), ("7", 99.0))]
    runs += [run("init", 4, "0", 40.0), run("init", 4, "0", 41.0)]  # seed 0 twice: ambiguous, skipped
    runs += [run("tsd", 8, "0", 60.0)]  # no LoRA at r=8: no pair
    table = build_table(runs)
    (dash,) = paired_with_lora(table)
    assert (dash.method, dash.r, dash.seeds) == ("dash", 4, ["0", "1", "2"])
    assert dash.diffs.values == [3.0, -1.0, 4.0]
    assert dash.diffs.mean == pytest.approx(2.0) and dash.diffs.std == pytest.approx(math.sqrt(7.0))
    assert (dash.wins, dash.losses) == (2, 1)
    half = 4.303 * math.sqrt(7.0) / math.sqrt(3)  # t(0.975, 2)
    assert dash.ci95 == pytest.approx((2.0 - half, 2.0 + half))
    assert dash.p == pytest.approx(4 / 8)  # of the 8 sums ±3±1±4, four reach |6|: 8, 6, -6, -8

    # Full fine-tuning has no rank: its row shows none and it pairs with LoRA of every rank.
    full = build_table(runs + [run("full", None, "0", 70.0), run("full", None, "1", 40.0)])
    assert [row.r for row in full.rows if row.method == "full"] == [None]
    pairs = [p for p in paired_with_lora(full) if p.method == "full"]
    assert [(p.r, p.diffs.values) for p in pairs] == [(4, [20.0, -12.0])]

    # Training loss: lower is better, so a negative difference is a win.
    loss = {"lora40": 1.0, "lora41": 1.0, "lora42": 1.0, "dash40": 0.9, "dash41": 1.2, "dash42": 0.8}
    (by_loss,) = paired_with_lora(table, lambda run: loss.get(run.run_id), higher_is_better=False)
    assert by_loss.diffs.values == pytest.approx([-0.1, 0.2, -0.2]) and (by_loss.wins, by_loss.losses) == (2, 1)


def test_loss_window_pairs_the_logged_training_loss(tmp_path):
    from mlflow import MlflowClient

    uri = default_tracking_uri(tmp_path)
    ids = {}
    for method, losses in (("lora", [3.0, 2.0, 1.0]), ("dash", [3.0, 1.5, 0.5])):
        ids[method] = _run(uri, method, 4, 0, {"acc_boolq": 0.5}, experiment="loss")
        for step, v in enumerate(losses, start=1):
            MlflowClient(uri).log_metric(ids[method], "loss", v, step=step)
    out = compare_experiment(uri, "loss", loss_window=2)
    # last 2 steps: dash (1.5 + 0.5) / 2 = 1.0, LoRA (2 + 1) / 2 = 1.5 -> -0.5, a win
    assert "| LoRA-Dash | 4 | -0.5000 | — | — | s0: -0.5000 | 1 / 0 | 1 |" in out["paired"]
    assert "mean of the last 2 logged steps" in out["paired"]
