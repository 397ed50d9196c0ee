"""`tsd analyze`: tables and heatmaps of how much selected directions agree (tsd/analysis.py).

For adapters a_1..a_k (different ranks, switch steps, seeds, methods):
  overlap.md            every measure's k x k matrix (mean over common layers), the per-pair
                        per-module-type means, and each adapter's cross-layer summary
  overlap_<measure>.csv the k x k matrix of one measure (index, U, V, UV)
  per_layer.csv         layer, adapter_a, adapter_b, index, U, V, UV (one row per pair and layer)
  per_layer.md          the same, one table per pair
  overlap_heatmaps.png  one heatmap per measure (the k x k matrices)
  cross_layer_<label>.png  layer x layer index overlap within each adapter
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.file_checks import check_adapter_folder, check_safetensors
from pipeline.reports.plots import new_figure, save_figure
from tsd.analysis import (
    MEASURES,
    OverlapReport,
    Selections,
    caveats,
    cross_layer_overlaps,
    pairwise_overlaps,
    per_group_mean,
    read_selections,
    spectrum_positions,
)

MEASURE_TITLES = {
    "index": "index overlap |I∩J|/s",
    "U": "left subspace ||Ua^T Ub||²/s",
    "V": "right subspace ||Va^T Vb||²/s",
    "UV": "direction span overlap",
}


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab}#{n + 1}")
    return out


def matrix_markdown(labels: Sequence[str], mat: torch.Tensor, digits: int = 3) -> str:
    out = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for i, lab in enumerate(labels):
        out.append(f"| {lab} | " + " | ".join(_fmt(float(mat[i, j]), digits) for j in range(len(labels))) + " |")
    return "\n".join(out)


def write_matrix_csv(path: Path, labels: Sequence[str], mat: torch.Tensor) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([""] + list(labels))
        for i, lab in enumerate(labels):
            w.writerow([lab] + ["" if math.isnan(float(v)) else repr(float(v)) for v in mat[i]])
    return path


def report_markdown(report: OverlapReport, selections: Sequence[Selections], digits: int = 3) -> str:
    parts = ["# Task-specific directions: overlap between adapters", ""]
    for s in selections:
        pos = spectrum_positions(s)
        mean_pos = sum(float(p.mean()) for p in pos.values()) / max(1, len(pos))
        info = ", ".join(f"{k}={v}" for k, v in s.info.items() if v not in (None, []))
        parts.append(f"- **{s.label}**: {s.kind} directions of {len(s.layers)} layers ({info}); mean spectrum "
                     f"position of the selected indices {mean_pos:.2f} (0 = largest singular value, 1 = smallest)")  # fmt: skip
    parts.append("")
    for note in caveats(selections):
        parts += [f"> **Caveat:** {note}", ""]
    for m in MEASURES:
        parts += [f"## {MEASURE_TITLES[m]} (mean over common layers)", "", matrix_markdown(report.labels, report.matrices[m], digits), ""]
    parts += ["## Chance: the same measures for uniformly random choices of s of each layer's k = min(m, n) "
              "singular directions (s / k; mean over common layers)", "",
              matrix_markdown(report.labels, report.matrices["chance"], digits), ""]
    if report.per_layer:
        parts += ["## Per module type (mean over layers)", ""]
        groups = sorted({g for vals in report.per_layer.values() for g in per_group_mean(vals, "index")})
        parts.append("| pair | measure | " + " | ".join(groups) + " |")
        parts.append("|---|---|" + "---:|" * len(groups))
        for (i, j), vals in report.per_layer.items():
            for m in (*MEASURES, "chance"):
                means = per_group_mean(vals, m)
                parts.append(f"| {report.labels[i]} vs {report.labels[j]} | {m} | "
                             + " | ".join(_fmt(means.get(g, math.nan), digits) for g in groups) + " |")  # fmt: skip
        parts.append("")
    parts += ["## Across layers (index overlap between the layers of one adapter, mean off-diagonal)", ""]
    for s in selections:
        names, mat = cross_layer_overlaps(s, "index")
        off = [float(mat[i, j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        parts.append(f"- {s.label}: {_fmt(sum(off) / len(off), digits) if off else '-'} over {len(names)} layers")
    return "\n".join(parts) + "\n"


def per_layer_markdown(report: OverlapReport, digits: int = 3) -> str:
    parts = ["# Per-layer overlap", ""]
    for (i, j), vals in report.per_layer.items():
        parts += [f"## {report.labels[i]} vs {report.labels[j]} ({report.common_layers[(i, j)]} common layers)", "",
                  "| layer | " + " | ".join(MEASURES) + " |", "|---|" + "---:|" * len(MEASURES)]  # fmt: skip
        for layer, v in vals.items():
            parts.append(f"| {layer} | " + " | ".join(_fmt(v[m], digits) for m in MEASURES) + " |")
        parts.append("")
    return "\n".join(parts)


def write_per_layer_csv(path: Path, report: OverlapReport) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "adapter_a", "adapter_b", *MEASURES])
        for (i, j), vals in report.per_layer.items():
            for layer, v in vals.items():
                w.writerow([layer, report.labels[i], report.labels[j]]
                           + ["" if math.isnan(v[m]) else repr(v[m]) for m in MEASURES])  # fmt: skip
    return path


# ----------------------------------------------------------------------------- plots
def _heatmap(ax, mat: torch.Tensor, labels: Sequence[str], title: str, annotate: bool) -> object:
    import numpy as np  # noqa: PLC0415

    data = np.ma.masked_invalid(mat.numpy())
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    n = len(labels)
    fs = 7 if n <= 12 else 5
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    ax.set_title(title, fontsize=9)
    if annotate:
        for i in range(n):
            for j in range(n):
                v = float(mat[i, j])
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    return im


def plot_overlap_heatmaps(report: OverlapReport, path: str | os.PathLike) -> Path:
    """One heatmap per measure of the k x k adapter matrices."""
    k = len(report.labels)
    side = max(3.0, 0.45 * k + 1.8)
    fig = new_figure(side * 2, side * 2)
    axes = fig.subplots(2, 2).reshape(-1)
    im = None
    for ax, m in zip(axes, MEASURES):
        im = _heatmap(ax, report.matrices[m], report.labels, MEASURE_TITLES[m], annotate=k <= 10)
    fig.colorbar(im, ax=list(axes), shrink=0.6)
    return save_figure(fig, path)


def plot_cross_layer(sel: Selections, path: str | os.PathLike, measure: str = "index") -> Path:
    names, mat = cross_layer_overlaps(sel, measure)
    short = [re.sub(r"^(base_model\.model\.)?model\.layers\.", "", n) for n in names]
    side = max(4.0, 0.22 * len(names) + 2)
    fig = new_figure(side + 1, side)
    ax = fig.subplots()
    im = _heatmap(ax, mat, short, f"{sel.label}: {MEASURE_TITLES[measure]} between layers", annotate=len(names) <= 12)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the command
def analyze_adapters(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    kind: str = "dash",
    labels: Sequence[str] | None = None,
    digits: int = 3,
) -> dict:
    """Read every adapter's selections, write the tables and plots to `out_dir`; returns
    {"report", "selections", "files", "markdown"}."""
    if not paths:
        raise ValueError("analyze: give at least one adapter folder")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"analyze: {len(labels)} labels for {len(paths)} adapters")
    for p in map(Path, paths):  # a truncated or garbage file: named, exit 2 (not safetensors' own error)
        if p.is_dir():
            check_adapter_folder(p, "analyze")
        elif p.suffix == ".safetensors" and p.is_file():
            check_safetensors(p, "analyze")
    selections = [read_selections(p, kind, lab) for p, lab in zip(paths, labels or [None] * len(paths))]
    for s, lab in zip(selections, unique_labels([s.label for s in selections])):
        s.label = lab
    report = pairwise_overlaps(selections)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = report_markdown(report, selections, digits)
    (out / "overlap.md").write_text(md)
    files.append(out / "overlap.md")
    for m in MEASURES:
        files.append(write_matrix_csv(out / f"overlap_{m}.csv", report.labels, report.matrices[m]))
    if report.per_layer:
        files.append(write_per_layer_csv(out / "per_layer.csv", report))
        (out / "per_layer.md").write_text(per_layer_markdown(report, digits))
        files.append(out / "per_layer.md")
    files.append(plot_overlap_heatmaps(report, out / "overlap_heatmaps.png"))
    for s in selections:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", s.label)
        files.append(plot_cross_layer(s, out / f"cross_layer_{safe}.png"))
    return {"report": report, "selections": selections, "files": files, "markdown": md}
