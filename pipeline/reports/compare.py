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
          classification runs log: pipeline/classify.py), printed x 100 as GLUE tables print it.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.reports.plots import new_figure, save_figure
from pipeline.reports.stats import mean_ci95, sign_flip_p
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import client, end_run, sqlite_path, start_run

METHOD_NAMES = {"full": "Fully FT", "lora": "LoRA", "dash": "LoRA-Dash", "init": "LoRA-Init", "tsd": "LoRA-TSD"}
METHOD_ORDER = list(METHOD_NAMES)
# The paper's column order for the eight commonsense tasks, and its short headers.
TASK_ORDER = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
TASK_LABELS = {
    "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
}  # fmt: skip
ACC_PREFIX = "acc_"
AVG = "acc_avg"
# What can be tabulated: metric -> (its name in text, the plot's axis label).
METRICS = {"acc": ("accuracy", "accuracy (%)"), "mcc": ("Matthews correlation", "MCC x 100")}
COMPARISON_TAG = "tsd.kind"
COMPARISON_VALUE = "comparison"


class CompareError(ValueError):
    """The experiment cannot be compared (missing, or no usable runs)."""


# A dash/tsd run with train.dash_lr_scale != 1 is its own row, "<method>@<scale>": pooling it
# with the method's runs at the reference rate would mix two settings under one seed.
VARIANT_SEP = "@"


def method_label(method: str) -> str:
    base, _, scale = method.partition(VARIANT_SEP)
    label = METHOD_NAMES.get(base, base)
    return f"{label} (dash lr x{scale})" if scale else label


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


@dataclass
class RunResult:
    """What the table needs from one run. Accuracies in percent."""

    run_id: str
    run_name: str
    method: str
    r: int | None
    seed: str | None
    trainable_percent: float | None
    acc: dict[str, float]
    avg: float | None


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    method: str
    r: int | None
    runs: list[RunResult]
    cells: dict[str, Cell]  # task -> Cell, plus "avg"
    trainable: Cell

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[str]:
        return [run.seed for run in self.runs if run.seed is not None]


@dataclass
class Table:
    experiment: str
    tasks: list[str]
    rows: list[Row] = field(default_factory=list)
    metric: str = "acc"


# ----------------------------------------------------------------------------- reading runs
def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(value) -> int | None:
    v = _float(value)
    return int(v) if v is not None and v == int(v) else None


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


def format_cell(cell: Cell, digits: int = 1) -> str:
    if cell.mean is None:
        return "-"
    if cell.std is None:
        return f"{cell.mean:.{digits}f}"
    return f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}"


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
@dataclass
class Paired:
    """A method against LoRA at the same rank, run by run: runs with the same seed share the
    data order and the LoRA initialisation, so their difference removes most seed noise."""

    method: str
    r: int | None
    seeds: list[str]
    diffs: Cell  # method - LoRA, one per shared seed (accuracy: percentage points)
    higher_is_better: bool = True

    @property
    def wins(self) -> int:
        return sum((d > 0) if self.higher_is_better else (d < 0) for d in self.diffs.values)

    @property
    def losses(self) -> int:
        return sum((d < 0) if self.higher_is_better else (d > 0) for d in self.diffs.values)

    @property
    def ci95(self) -> tuple[float, float] | None:
        """The 95% t-interval of the mean paired difference."""
        return mean_ci95(self.diffs.values)

    @property
    def p(self) -> float | None:
        """Exact two-sided sign-flip p-value of "no difference"."""
        return sign_flip_p(self.diffs.values)


def paired_with_lora(table: Table, value: Callable[[RunResult], float | None] = lambda run: run.avg,
                     higher_is_better: bool = True) -> list[Paired]:
    """Each non-LoRA row against the LoRA row of its rank (full fine-tuning: of every rank, the
    Paired's r is LoRA's), over the seeds both ran (a seed run
    twice in a group is ambiguous and skipped). `value` picks what is compared (default: the
    average accuracy)."""

    def by_seed(row: Row) -> dict[str, float]:
        seeds = [r.seed for r in row.runs]
        out = {}
        for run in row.runs:
            v = value(run)
            if run.seed is not None and v is not None and seeds.count(run.seed) == 1:
                out[run.seed] = v
        return out

    lora = {row.r: by_seed(row) for row in table.rows if row.method == "lora"}
    out = []
    for row in table.rows:
        # Full fine-tuning has no rank: it is paired with the LoRA row of every rank.
        ranks = sorted(lora, key=lambda r: -1 if r is None else r) if row.method == "full" else [row.r]
        if row.method == "lora":
            continue
        for r in (r for r in ranks if r in lora):
            mine = by_seed(row)
            seeds = sorted(set(mine) & set(lora[r]), key=lambda s: (_float(s) is None, _float(s) or 0.0, s))
            if seeds:
                diffs = Cell([mine[s] - lora[r][s] for s in seeds])
                out.append(Paired(row.method, r, seeds, diffs, higher_is_better))
    return out


def training_loss_tail(tracking_uri: str, runs: Sequence[RunResult], window: int) -> dict[str, float]:
    """run_id -> mean of the logged training `loss` over its last `window` steps. With the same
    seed every method sees the same batches, so paired differences of this are a far finer
    signal than accuracy on a few hundred test rows (but it is training loss, not accuracy)."""
    mlflow_client = client(tracking_uri)
    out = {}
    for run in runs:
        history = sorted(mlflow_client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)
        if history:
            out[run.run_id] = statistics.fmean(m.value for m in history[-window:])
    return out


def format_paired_markdown(pairs: Sequence[Paired], digits: int = 1, what: str = "Avg. − LoRA") -> str:
    out = [f"| Method | r | {what} | 95% CI | sign-flip p | per seed | better / worse | n |",
           "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for p in pairs:
        per_seed = ", ".join(f"s{s}: {d:+.{digits}f}" for s, d in zip(p.seeds, p.diffs.values))
        ci = f"[{p.ci95[0]:+.{digits}f}, {p.ci95[1]:+.{digits}f}]" if p.ci95 else "—"
        pv = f"{p.p:.3f}" if p.p is not None and p.diffs.n > 1 else "—"
        out.append(f"| {method_label(p.method)} | {p.r} | {format_cell(p.diffs, digits)} | {ci} | {pv} | {per_seed} | "
                   f"{p.wins} / {p.losses} | {p.diffs.n} |")
    return "\n".join(out)


def paired_sections(table: Table, digits: int = 1, loss_tail: dict[str, float] | None = None,
                    window: int = 0) -> str:
    """The paired comparisons as Markdown: accuracy, and training loss when `loss_tail` is given."""
    text = ""
    pairs = paired_with_lora(table)
    if pairs:
        text += (f"\n## Paired with LoRA (same rank, same seed)\n\nDifference of the average {METRICS[table.metric][0]} "
                 f"(x 100: {'percentage points' if table.metric == 'acc' else 'MCC points'}), "
                 "mean ± sample std over seeds, the 95% t-interval of the mean and the exact sign-flip p-value "
                 "(pipeline/reports/stats.py).\n\n" + format_paired_markdown(pairs, digits) + "\n")
    if loss_tail:
        losses = paired_with_lora(table, lambda run: loss_tail.get(run.run_id), higher_is_better=False)
        if losses:
            text += (f"\n## Training loss paired with LoRA (mean of the last {window} logged steps)\n\n"
                     "Same seed = same batches; negative = lower loss than LoRA.\n\n"
                     + format_paired_markdown(losses, 4, "loss − LoRA") + "\n")
    return text


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
