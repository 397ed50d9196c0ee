"""Each method against LoRA at the same rank, seed by seed (`tsd compare`'s second table): runs
with the same seed share the data order and LoRA's initialisation up to the switch, so their
difference removes most of the seed noise. Mean difference, 95% t-interval, wins and losses,
and the exact sign-flip p (pipeline.reports.stats); optionally the training loss's tail too.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.reports.results import METRICS, Cell, Row, RunResult, Table, _float, format_cell, method_label
from pipeline.reports.stats import mean_ci95, sign_flip_p
from pipeline.tracking.store import client


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
