"""The direction report of a switch: which singular directions each layer selected, and why.

For every layer the switch decomposed (`tsd.directions.LayerDirections`):
  directions.csv / .json  one row per selected direction: layer, rank position (0 = largest
                          change rate), index into the singular spectrum, sigma, change rate
  change_rates.json       every layer's full change-rate spectrum (to re-plot)
  change_rates.png        change rate vs direction index, selected directions marked

`RunLogger.log_directions` writes these at each switch and logs them under `directions/<kind>/`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.reports.plots import new_figure, save_figure

if TYPE_CHECKING:  # pragma: no cover
    from tsd.directions import LayerDirections

DIRECTION_COLUMNS = ("layer", "position", "index", "sigma", "change_rate")


def _floats(t) -> list[float]:
    return t.detach().cpu().double().reshape(-1).tolist()


def _ints(t) -> list[int]:
    return [int(i) for i in t.detach().cpu().reshape(-1).tolist()]


def direction_rows(directions: Sequence[LayerDirections]) -> list[tuple[str, int, int, float, float]]:
    """One row per selected direction: layer, rank position (0 = largest change rate), index
    into the singular spectrum, its singular value, its change rate."""
    rows = []
    for d in directions:
        rates = _floats(d.change_rates)
        for pos, (idx, sig) in enumerate(zip(_ints(d.indices), _floats(d.sigma))):
            rows.append((d.name, pos, idx, sig, rates[idx]))
    return rows


def write_direction_tables(
    directions: Sequence[LayerDirections], folder: str | os.PathLike, kind: str, step: int | None
) -> list[Path]:
    """directions.csv, directions.json ({kind, step, columns, data}) and change_rates.json
    (every layer's full spectrum, for re-plotting) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = direction_rows(directions)
    csv_path = folder / "directions.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DIRECTION_COLUMNS)
        for name, pos, idx, sig, rate in rows:
            w.writerow([name, pos, idx, repr(sig), repr(rate)])  # repr: exact float round trip
    json_path = folder / "directions.json"
    json_path.write_text(
        json.dumps({"kind": kind, "step": step, "columns": list(DIRECTION_COLUMNS), "data": [list(r) for r in rows]})
    )
    spectra_path = folder / "change_rates.json"
    spectra_path.write_text(
        json.dumps({"kind": kind, "step": step, "layers": {d.name: _floats(d.change_rates) for d in directions}})
    )
    return [csv_path, json_path, spectra_path]


def representative_layers(n: int, max_layers: int) -> list[int]:
    """At most `max_layers` evenly spaced indices of `n` layers, the first and the last included."""
    if n <= max_layers:
        return list(range(n))
    step = (n - 1) / (max_layers - 1)
    return sorted({round(i * step) for i in range(max_layers)})


def _draw_spectrum(ax, d: LayerDirections) -> None:
    """One layer's panel: its change rates (log y) with the selected directions in red."""
    rates = _floats(d.change_rates)
    idx = _ints(d.indices)
    ax.plot(range(len(rates)), rates, lw=0.9, color="tab:blue", label="change rate")
    sel_x = [i for i in idx if rates[i] > 0] if any(r > 0 for r in rates) else idx
    ax.plot(sel_x, [rates[i] for i in sel_x], "o", ms=4, color="red", label="selected direction")
    if any(r > 0 for r in rates):
        ax.set_yscale("log", nonpositive="mask")
    else:
        ax.text(0.5, 0.5, "all change rates are 0", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(f"{d.name} ({len(idx)} selected)", fontsize=8)
    ax.set_xlabel("singular direction index (by descending sigma)", fontsize=7)
    ax.set_ylabel("change rate", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)


def plot_change_rates(
    directions: Sequence[LayerDirections],
    path: str | os.PathLike,
    title: str | None = None,
    max_layers: int = 6,
) -> Path:
    """PNG of change rate vs singular-direction index, one panel per layer, log y.

    With more than `max_layers` layers, evenly spaced representatives (first and last
    included) are drawn. Selected directions are red markers. Pure: writes only `path`.
    """
    chosen = [directions[i] for i in representative_layers(len(directions), max(1, max_layers))]
    ncols = min(3, max(1, len(chosen)))
    nrows = math.ceil(max(1, len(chosen)) / ncols)
    fig = new_figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, d in zip(axes, chosen):
        _draw_spectrum(ax, d)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    if not chosen:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no layers", ha="center", va="center")
    plural = "" if len(directions) == 1 else "s"
    shown = f"{len(chosen)} of {len(directions)} layers" if len(chosen) < len(directions) else f"{len(directions)} layer{plural}"
    fig.suptitle(f"{title or 'change-rate spectra'} ({shown})", fontsize=10)
    if chosen:  # one legend for the figure: per-panel legends hide the (top-right) selected points
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    return save_figure(fig, path)
