"""`tsd compare`: the paper's results table from an MLflow experiment.

Rows are (method, r); columns the tasks (from the runs' `acc_<task>` metrics), the average and
the trainable-parameter percentage. Runs of the same (method, r) with different seeds are
pooled: mean ± sample standard deviation (ddof 1) over runs, and n. Only FINISHED runs that
carry a `method.method` param are read; runs tagged `tsd.kind=comparison` (this command's own
output runs) are skipped. Each method is also paired with LoRA at the same rank, seed by
seed (same data order and LoRA init up to the switch), which removes most of the seed noise.

Where the numbers come from (what the pipeline logs):
  params  `method.method`, `method.r`, `train.seed` (the driver flattens the run config);
          `trainable_percent` (the training loop; a metric of that name is accepted too)
  metrics `acc_<task>` and `acc_avg`, fractions in [0, 1] (pipeline/evaluate.py). A run whose
          accuracies exceed 1 is taken to have logged percentages. The table prints percent.
          A run without `acc_avg` gets the mean of its task accuracies.
          With metric="mcc" the same from `mcc_<task>` (Matthews correlation, which
          classification runs log: pipeline/classification/evaluation.py), printed x 100 as GLUE tables print it.

Outputs: the table and the paired differences on stdout; with an output folder, comparison.md, comparison.csv and
comparison.png (grouped bars with std error bars); optionally all three logged to a new
"comparison" run of the experiment, or to an existing run, under `comparison/`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline.reports.paired import paired_sections, training_loss_tail
from pipeline.reports.results import (COMPARISON_TAG, COMPARISON_VALUE, METHOD_ORDER, METRICS, TASK_ORDER,
                                      VARIANT_SEP, Cell, CompareError, Row, RunResult, Table, _float, _int,
                                      format_cell, method_label, task_label)
from pipeline.reports.plots import new_figure, save_figure
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import client, end_run, sqlite_path, start_run

# ----------------------------------------------------------------------------- reading runs
def run_result(run, metric: str = "acc") -> RunResult | None:
    """A `RunResult` from an MLflow Run, or None when it is not a training run of this project.
    Its `acc`/`avg` hold `metric` (see METRICS), x 100."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    if tags.get(COMPARISON_TAG) == COMPARISON_VALUE:
        return None
    method = params.get("method.method")
    if not method:
        return None
    prefix, avg_key = f"{metric}_", f"{metric}_avg"
    acc = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and k != avg_key}
    acc = {k: v for k, v in acc.items() if _float(v) is not None}
    avg = _float(metrics.get(avg_key))
    values = list(acc.values()) + ([avg] if avg is not None else [])
    percent = any(abs(v) > 1.0 for v in values)  # logged as percentages already
    scale = 1.0 if percent else 100.0
    acc = {k: v * scale for k, v in acc.items()}
    if avg is not None:
        avg *= scale
    elif acc:
        avg = statistics.fmean(acc.values())
    tp = _float(params.get("trainable_percent", metrics.get("trainable_percent")))
    return RunResult(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        method=_with_variant(method, _float(params.get("train.dash_lr_scale"))),
        r=None if method == "full" else _int(params.get("method.r")),  # full fine-tuning has no rank
        seed=params.get("train.seed"),
        trainable_percent=tp,
        acc=acc,
        avg=avg,
    )


def _with_variant(method: str, dash_lr_scale: float | None) -> str:
    if method in ("dash", "tsd") and dash_lr_scale is not None and dash_lr_scale != 1.0:
        return f"{method}{VARIANT_SEP}{dash_lr_scale:g}"
    return method


def fetch_runs(tracking_uri: str, experiment: str, statuses: Sequence[str] = ("FINISHED",),
               metric: str = "acc") -> list[RunResult]:
    """The experiment's runs with the given statuses, as `RunResult`s of `metric` (others skipped)."""
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r}; one of: {', '.join(METRICS)}")
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # do not create an empty store just to find nothing
        raise CompareError(f"no MLflow store at {db}; pass --tracking-uri (the `tracking.uri` of the runs)")
    mlflow_client = client(tracking_uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in mlflow_client.search_experiments())
        raise CompareError(
            f"no experiment named {experiment!r} at {mask_secrets(tracking_uri)}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    # MLflow's filter language has no OR: filter one status server-side, several here.
    status_filter = f"attributes.status = '{statuses[0]}'" if len(statuses) == 1 else ""
    out, token = [], None
    while True:
        page = mlflow_client.search_runs([exp.experiment_id], filter_string=status_filter, max_results=1000, page_token=token)
        for run in page:
            if run.info.status in statuses:
                res = run_result(run, metric)
                if res is not None:
                    out.append(res)
        token = page.token
        if not token:
            break
    return out


# ----------------------------------------------------------------------------- the table
def order_tasks(tasks: Iterable[str]) -> list[str]:
    """The paper's eight tasks in its order, then any others alphabetically."""
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER), key=str.lower)


def _row_key(row: Row):
    base = row.method.partition(VARIANT_SEP)[0]
    m = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (m, row.method, row.r if row.r is not None else -1)


def build_table(runs: Sequence[RunResult], experiment: str = "", metric: str = "acc") -> Table:
    """Group runs by (method, r) and pool them: one `Row` per group, in method then rank order."""
    tasks = order_tasks(t for run in runs for t in run.acc)
    groups: dict[tuple[str, int | None], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.method, run.r), []).append(run)
    rows = []
    for (method, r), members in groups.items():
        cells = {t: Cell([m.acc[t] for m in members if t in m.acc]) for t in tasks}
        cells["avg"] = Cell([m.avg for m in members if m.avg is not None])
        trainable = Cell([m.trainable_percent for m in members if m.trainable_percent is not None])
        rows.append(Row(method=method, r=r, runs=members, cells=cells, trainable=trainable))
    rows.sort(key=_row_key)
    return Table(experiment=experiment, tasks=tasks, rows=rows, metric=metric)


def _trainable_text(cell: Cell) -> str:
    return "-" if cell.mean is None else f"{cell.mean:.4g}"


def table_rows(table: Table, digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and body of the printed table (strings)."""
    header = ["Method", "r"] + [task_label(t) for t in table.tasks] + ["Avg.", "Params (%)", "n"]
    body = []
    for row in table.rows:
        body.append(
            [method_label(row.method), "-" if row.r is None else str(row.r)]
            + [format_cell(row.cells[t], digits) for t in table.tasks]
            + [format_cell(row.cells["avg"], digits), _trainable_text(row.trainable), str(row.n)]
        )
    return header, body


def format_text(table: Table, digits: int = 1) -> str:
    """A column-aligned plain-text table (what `tsd compare` prints)."""
    header, body = table_rows(table, digits)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in body])


def format_markdown(table: Table, digits: int = 1) -> str:
    header, body = table_rows(table, digits)
    align = ["---", "---:"] + ["---:"] * (len(header) - 2)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def to_csv(table: Table) -> str:
    """Every number unrounded: per column mean, std and n; the runs and seeds of each row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = table.tasks + ["avg"]
    w.writerow(["method", "method_name", "r", "n", "seeds", "run_ids"]
               + [f"{c}_{s}" for c in cols for s in ("mean", "std", "n")] + ["trainable_percent"])  # fmt: skip
    for row in table.rows:
        cells = []
        for c in cols:
            cell = row.cells[c]
            cells += [_num(cell.mean), _num(cell.std), cell.n]
        w.writerow([row.method, method_label(row.method), "" if row.r is None else row.r, row.n,
                    " ".join(row.seeds), " ".join(r.run_id for r in row.runs)]
                   + cells + [_num(row.trainable.mean)])  # fmt: skip
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


# ----------------------------------------------------------------------------- the plot
def plot_table(table: Table, path: str | os.PathLike, title: str | None = None) -> Path:
    """Grouped bars: one group per task (and Avg.), one bar per (method, r), std error bars."""
    cols = table.tasks + ["avg"]
    labels = [task_label(t) for t in table.tasks] + ["Avg."]
    n_rows = max(1, len(table.rows))
    fig = new_figure(max(6.0, 1.1 * len(cols) * max(1, n_rows) ** 0.5 + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / n_rows
    for k, row in enumerate(table.rows):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(cols))]
        means = [row.cells[c].mean if row.cells[c].mean is not None else math.nan for c in cols]
        errs = [row.cells[c].std or 0.0 for c in cols]
        name = f"{method_label(row.method)} r={row.r}" + (f" (n={row.n})" if row.n > 1 else "")
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=name, color=f"C{k % 10}")  # the tab10 cycle
    ax.set_xticks(range(len(cols)), labels, fontsize=8)
    ax.set_ylabel(METRICS[table.metric][1])
    ax.grid(True, axis="y", alpha=0.3)
    if not table.rows:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center")
    else:
        fig.legend(fontsize=7, loc="outside right upper")
    ax.set_title(title or f"experiment {table.experiment}", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the command
def write_outputs(table: Table, out_dir: str | os.PathLike, digits: int = 1, paired_text: str = "") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    md.write_text(f"# Experiment {table.experiment}\n\n{format_markdown(table, digits)}\n{paired_text}")
    csv_path = out / "comparison.csv"
    csv_path.write_text(to_csv(table))
    png = plot_table(table, out / "comparison.png")
    return [md, csv_path, png]


def log_outputs(files: Sequence[Path], tracking_uri: str, experiment: str, run_id: str | None = None) -> str:
    """Log the files under `comparison/` to `run_id`, or to a new FINISHED run named
    "comparison" (tagged tsd.kind=comparison, so later comparisons skip it). Returns the run id."""
    new = run_id is None
    if new:
        run_id = start_run(tracking_uri, experiment, "comparison", tags={COMPARISON_TAG: COMPARISON_VALUE})
    logger = RunLogger(tracking_uri, run_id)
    for f in files:
        logger.log_artifact(f, "comparison")
    ok = logger.close()
    if new:
        end_run(tracking_uri, run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise RuntimeError(f"could not log the comparison to MLflow run {run_id}")
    return run_id


def compare_experiment(
    tracking_uri: str,
    experiment: str,
    out_dir: str | os.PathLike | None = None,
    digits: int = 1,
    log_run: bool = False,
    log_to: str | None = None,
    statuses: Sequence[str] = ("FINISHED",),
    loss_window: int = 0,
    metric: str = "acc",
) -> dict:
    """Read, tabulate, write and (optionally) log; returns {"table", "text", "paired" (Markdown
    of the comparisons paired with LoRA; the training loss too when loss_window > 0), "files",
    "run_id"}."""
    runs = fetch_runs(tracking_uri, experiment, statuses, metric)
    if not runs:
        raise CompareError(
            f"experiment {experiment!r} has no {'/'.join(statuses)} runs with a method.method param to compare"
        )
    if not any(run.acc or run.avg is not None for run in runs):
        raise CompareError(f"no run of experiment {experiment!r} logged {metric}_<task> metrics"
                           + (" (classification runs, model.task: seq_cls, log them)" if metric == "mcc" else ""))
    table = build_table(runs, experiment, metric)
    text = format_text(table, digits)
    tail = training_loss_tail(tracking_uri, runs, loss_window) if loss_window > 0 else None
    paired = paired_sections(table, digits, tail, loss_window)
    files: list[Path] = []
    if out_dir is not None or log_run or log_to:
        if out_dir is None:
            import tempfile

            out_dir = tempfile.mkdtemp(prefix="tsd-compare-")
        files = write_outputs(table, out_dir, digits, paired)
    run_id = None
    if log_run or log_to:
        run_id = log_outputs(files, tracking_uri, experiment, run_id=log_to)
    return {"table": table, "text": text, "paired": paired, "files": files, "run_id": run_id}
