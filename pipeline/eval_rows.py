"""How an evaluation's rows are spread over the ranks and brought back: rows rank::world, in
batches, with padding calls where every forward is a collective (ZeRO-3), then every rank's
scored rows merged in file order. Shared by generation (pipeline.evaluate) and classification
(pipeline.classification.evaluation), which each import it, not each other.
"""

from __future__ import annotations

import math

from pipeline.training.distributed import rank_and_world
from tsd import collectives


def rank_batches(n_rows: int, batch_size: int, synced: bool) -> list[list[int] | None]:
    """This rank's share of rows 0..n_rows-1 (rows rank::world), in batches of row indices. With
    `synced` (ZeRO-3: every forward gathers weights, a collective) the ranks with fewer batches
    get `None` entries, a padding call each, so every rank makes the same number of calls."""
    rank, world = rank_and_world()
    mine = list(range(rank, n_rows, world))
    batches: list[list[int] | None] = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if synced:
        most = math.ceil(math.ceil(n_rows / world) / batch_size)
        batches += [None] * (most - len(batches))
    return batches


def gather_rows(local: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every rank's scored rows (each with its "index"), merged per set in file order, on every rank."""
    parts = collectives.all_gather_object(local)
    return {task: sorted((row for part in parts for row in part[task]), key=lambda r: r["index"]) for task in local}
