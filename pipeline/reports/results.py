"""What a comparison is made of (pipeline.reports.compare builds it, .paired pairs it): a run's
results, the cells (mean, sample std, n over seeds), the rows (method, r), the table; the
paper's method and task names and order.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

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


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(value) -> int | None:
    v = _float(value)
    return int(v) if v is not None and v == int(v) else None


def format_cell(cell: Cell, digits: int = 1) -> str:
    if cell.mean is None:
        return "-"
    if cell.std is None:
        return f"{cell.mean:.{digits}f}"
    return f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}"
