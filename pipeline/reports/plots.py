"""The one plotting set-up every report draws with: matplotlib's Agg backend and bare Figures.

- matplotlib is imported on the first figure, not with this module: the training workers and
  the commands that draw nothing never pay for it;
- the Agg backend: workers and CI machines have no display (`force=False` keeps a backend the
  user already chose, e.g. in a notebook);
- a bare `Figure`, not pyplot: it is registered in no global figure list, so nothing leaks
  between plots in a long-lived worker and nothing needs closing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

DPI = 110


def new_figure(width: float, height: float) -> Figure:
    """An empty `width` x `height` inch figure with constrained layout (labels never overlap)."""
    import matplotlib  # noqa: PLC0415 (lazy: see the module docstring)

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG to `path` (its folder created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
