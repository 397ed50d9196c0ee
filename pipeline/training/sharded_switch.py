"""The switch, spread over all ranks: each rank decomposes only its share of the weights.

1. Every rank builds the same cost-balanced plan (`tsd.plan.shard_plan`).
2. With an SVD cache (keyed by the weights), items whose decomposition is on disk are found
   from each rank's own slices (`tsd.svd_cache.partition_key`): only their small LoRA factors
   travel to the owner, several items per gather, and no weight is assembled.
3. Rounds over the rest: in round j, rank k's j-th item is assembled on rank k alone
   (`gather_to`: the other ranks send their ZeRO-3 slices of W, A, B in one message), then
   every rank decomposes its own item at the same time. Memory per rank: one full weight and
   its factors at a time, never the whole model.
4. After each round (or chunk of cached items) every owner broadcasts what it selected
   (indices, sigma, U_s, V_s, change rates) in one message and all ranks install it at once,
   so all ranks hold all directions and none holds more than a round's worth in flight.
   Installing: dash directions are replicated buffers (local copy); LoRA-Init edits the partitioned
   base weight and LoRA factors (a collective per layer) and their optimizer master copies.

Under ZeRO-2 and plain data parallel every rank holds every weight whole: the same plan and
rounds run, but an owner reads its items from its own copy (`gather_to` moves nothing), and
LoRA-Init edits each rank's copy with the same broadcast selection.

Without a process group (one process) the same code runs the items in order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.training.distributed import rank_and_world
from pipeline.training.faults import NO_FAULTS, Faults
from tsd.directions import Decomposition, LayerDirections, decompose, layer_directions
from tsd.inject import tsd_layers
from tsd import collectives
from tsd.partition import full_shape, gather_to, is_partitioned, local_part
from tsd.plan import plan_loads, shard_plan
from tsd.svd_cache import SVDCache, part_digest, partition_key, weight_key
from tsd.switch import SwitchItem, switch_items, switch_kind


@dataclass
class SwitchReport:
    kind: str
    step: int
    world_size: int
    seconds: float = 0.0  # the whole switch on this rank, wall time
    decompose_seconds: float = 0.0  # this rank's own SVD work
    decomposed: list[str] = field(default_factory=list)  # items this rank decomposed
    cache_hits: int = 0
    plan_loads: list[int] = field(default_factory=list)
    directions: list[LayerDirections] = field(default_factory=list)


def _selection_size(item: SwitchItem) -> int:
    m, n = item.shape
    return (m + n + 2) * item.count + min(m, n)


def _pack(d: LayerDirections, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    parts = [d.U.reshape(-1), d.V.reshape(-1), d.sigma, d.change_rates, d.indices]
    return torch.cat([p.to(device=device, dtype=dtype) for p in parts])


def _unpack(buf: torch.Tensor, item: SwitchItem) -> LayerDirections:
    """The selection as it arrived, on the broadcast's device (the fills move it to the layer's)."""
    m, n = item.shape
    c, k = item.count, min(m, n)
    sizes = [m * c, n * c, c, k, c]
    U, V, sigma, rates, idx = torch.split(buf, sizes)
    # Indices travel as floats of the SVD precision: exact below 2^24 (float32), ample for
    # any min(m, n) a weight has.
    return LayerDirections(item.name, idx.round().long(), sigma, U.view(m, c), V.view(n, c), rates)


def _chunks(indices: list[int], size_of, limit: int) -> list[list[int]]:
    """Consecutive runs of `indices` whose sizes add up to at most `limit` (at least one each)."""
    out: list[list[int]] = []
    total = limit + 1
    for i in indices:
        if total + size_of(i) > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size_of(i)
    return out


def _cache_lookup(layers, items, owner, rank, svd_dtype, cache) -> tuple[dict[int, str], dict[int, str]]:
    """For this rank's items: the partition keys (aliases), and the content keys of those the
    cache holds, found without moving a weight: every rank hashes its own slices, and one
    all-gather shares the digests. Whole (replicated) weights need neither: each owner hashes
    its own items' weights, the content key itself (no aliases)."""
    if not any(is_partitioned(layers[it.name].base_layer.weight) for it in items):
        found = {}
        for i, it in enumerate(items):
            if owner[i] == rank:
                key = weight_key(layers[it.name].base_layer.weight.data, svd_dtype)
                if cache.path(key).is_file():
                    found[i] = key
        return {}, found
    digests = torch.tensor(
        [list(part_digest(local_part(layers[it.name].base_layer.weight))) for it in items], dtype=torch.uint8
    ).reshape(len(items), 32)
    all_digests = collectives.all_gather(digests)
    aliases, found = {}, {}
    for i, it in enumerate(items):
        if owner[i] != rank:
            continue
        w = layers[it.name].base_layer.weight
        aliases[i] = partition_key(it.shape, w.dtype, svd_dtype, [bytes(d[i].tolist()) for d in all_digests])
        key = cache.resolve(aliases[i])
        if key is not None:
            found[i] = key
    return aliases, found


def _gather_round(per_rank: list[list[torch.Tensor] | None], rank: int) -> list[torch.Tensor] | None:
    """per_rank[k]: the parameters rank k assembles this round (None: nothing). All of a
    round's gathers run first, so the ranks then work on their own items side by side.
    Returns this rank's full tensors."""
    mine = None
    for k, params in enumerate(per_rank):
        if params is not None:
            full = gather_to(params, k)
            if k == rank:
                mine = full
    return mine


def _all_ranks_union(mine: set[int], n: int) -> set[int]:
    """The union over ranks of sets of item indices (one all-reduce)."""
    flags = torch.zeros(n, dtype=torch.int32)
    flags[sorted(mine)] = 1
    return {int(i) for i in torch.nonzero(collectives.all_reduce(flags)).flatten()}


def sharded_switch(
    model: nn.Module,
    kind: str,
    step: int,
    svd_dtype: str = "float32",
    cache_dir: str | None = None,
    faults: Faults = NO_FAULTS,
) -> SwitchReport:
    """Run one switch (`dash` or `init`) over every TSD layer, spread over all ranks.
    Every rank must call it at the same step."""
    t_start = time.perf_counter()
    run = _ShardedSwitch(model, kind, step, svd_dtype, SVDCache(cache_dir) if cache_dir else None, faults)
    cached = run.from_cache() if run.cache is not None else set()
    run.decompose_the_rest(cached)
    run.report.directions = run.results
    run.report.seconds = time.perf_counter() - t_start
    return run.report


class _ShardedSwitch:
    """One switch on this rank: the plan, this rank's queue, and what it has selected so far."""

    def __init__(self, model: nn.Module, kind: str, step: int, svd_dtype: str, cache: SVDCache | None,
                 faults: Faults):
        self.rank, self.world = rank_and_world()
        self.layers = dict(tsd_layers(model))
        self.switch = switch_kind(kind)
        self.step, self.svd_dtype, self.cache, self.faults = step, svd_dtype, cache, faults
        self.items = switch_items(model, kind)
        self.owner = shard_plan(self.items, self.world)
        self.report = SwitchReport(kind=kind, step=step, world_size=self.world,
                                   plan_loads=plan_loads(self.items, self.owner, self.world))
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[svd_dtype]
        self.device = collectives.group_device()
        # Each rank's queue in descending cost (the plan's order), so the items of one round are
        # of like size and no rank waits long for another's SVD before the next round's gather.
        self.queues = [sorted((i for i in range(len(self.items)) if self.owner[i] == k),
                              key=lambda i: (-self.items[i].cost, i)) for k in range(self.world)]
        self.mine: dict[int, LayerDirections] = {}  # selected here, not yet shared
        self.results: list[LayerDirections | None] = [None] * len(self.items)
        self.aliases: dict[int, str] = {}  # this rank's items' partition keys (SVD cache)

    def factors(self, i: int) -> list[torch.Tensor]:
        layer = self.layers[self.items[i].name]
        return [layer.lora_A, layer.lora_B]

    def own(self, i: int, dec: Decomposition, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Select item i's directions from its decomposition: the same selection as the
        single-process run_switch. Excluded subspaces are replicated buffers: no communication."""
        item, layer = self.items[i], self.layers[self.items[i].name]
        self.mine[i] = layer_directions(item.name, None, lora_A, lora_B, layer.scaling, item.count,
                                        decomposition=dec, exclude=self.switch.exclude(layer))
        self.report.decomposed.append(item.name)

    def share(self, done: list[list[int]]) -> None:
        """done[k]: the items rank k has just selected (the same lists on every rank). Each owner
        broadcasts its selections in one message and every rank installs them at once, so no
        rank ever holds more than a round's selections beyond the layers' own buffers."""
        for k, its in enumerate(done):
            if not its:
                continue
            if not collectives.active():
                got = [self.mine.pop(i) for i in its]
            else:
                sizes = [_selection_size(self.items[i]) for i in its]
                if k == self.rank:
                    buf = torch.cat([_pack(self.mine.pop(i), self.dtype, self.device) for i in its])
                else:
                    buf = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
                buf = collectives.broadcast(buf, src=k)
                got = [_unpack(part, self.items[i]) for i, part in zip(its, torch.split(buf, sizes))]
            for i, d in zip(its, got):
                layer = self.layers[d.name]
                self.switch.fill(layer, d, self.step, modifier_rank=0)
                self.results[i] = self.switch.installed(layer, d)

    def from_cache(self) -> set[int]:
        """Items whose decomposition is on disk need only their (small) LoRA factors at the
        owner: packed, several items per gather, no weight moves. Returns the items done."""
        items, world = self.items, self.world
        self.aliases, keys = _cache_lookup(self.layers, items, self.owner, self.rank, self.svd_dtype, self.cache)
        cached = _all_ranks_union(set(keys), len(items))
        if not cached:
            return cached

        def factor_bytes(i: int) -> int:
            return sum(math.prod(full_shape(p)) * p.element_size() for p in self.factors(i))

        # A gather holds at most as many bytes as the largest weight, which the switch holds anyway.
        limit = max(math.prod(it.shape) * self.layers[it.name].base_layer.weight.element_size() for it in items)
        # Round j: every rank's j-th chunk is gathered to it, then each processes its own, side by side.
        chunks = [_chunks([i for i in self.queues[k] if i in cached], factor_bytes, limit) for k in range(world)]
        for j in range(max(len(c) for c in chunks)):
            late = set()
            assembled = _gather_round([[p for i in c[j] for p in self.factors(i)] if j < len(c) else None
                                       for c in chunks], self.rank)
            for n, i in enumerate(chunks[self.rank][j] if assembled is not None else []):
                t0 = time.perf_counter()
                dec = self.cache.get(keys[i], device=assembled[2 * n].device)
                if dec is None:  # damaged since it was looked up: assembled and decomposed later
                    late.add(i)
                    continue
                self.own(i, dec, assembled[2 * n], assembled[2 * n + 1])
                self.report.cache_hits += 1
                self.report.decompose_seconds += time.perf_counter() - t0
                del dec
            del assembled
            late = _all_ranks_union(late, len(items))
            cached -= late
            self.share([[i for i in c[j] if i not in late] if j < len(c) else [] for c in chunks])
        return cached

    def decompose_the_rest(self, cached: set[int]) -> None:
        """Rounds over the items not cached: rank k's j-th item is assembled on rank k (its weight
        and LoRA factors in one gather) while the others send their slices; then every rank
        decomposes its own item at the same time, and the owners share what they selected.
        Memory: one full weight and its factors per rank."""
        queues = [[i for i in q if i not in cached] for q in self.queues]
        for j in range(max(len(q) for q in queues)):
            assembled = _gather_round([[self.layers[self.items[q[j]].name].base_layer.weight, *self.factors(q[j])]
                                       if j < len(q) else None for q in queues], self.rank)
            if assembled is not None:
                t0 = time.perf_counter()
                weight, lora_A, lora_B = assembled
                del assembled
                i = queues[self.rank][j]
                dec = self._decomposition(i, weight)
                del weight
                self.own(i, dec, lora_A, lora_B)
                self.report.decompose_seconds += time.perf_counter() - t0
                del dec, lora_A, lora_B
            self.share([[q[j]] if j < len(q) else [] for q in queues])

    def _decomposition(self, i: int, weight: torch.Tensor) -> Decomposition:
        """SVD of an assembled weight, from the cache when it was decomposed before under another
        partitioning (then found by the weight's own content), else computed and stored."""
        key = weight_key(weight, self.svd_dtype) if self.cache is not None else None
        dec = self.cache.get(key, device=weight.device) if key is not None else None
        if dec is None:
            dec = decompose(weight, self.svd_dtype)
            self.faults.in_switch(self.rank)  # reliability tests: a rank failing mid-switch
            if key is not None:
                self.cache.put(key, dec)
        else:
            self.report.cache_hits += 1
        if key is not None and i in self.aliases:  # partitioned weights are looked up by their slices
            self.cache.put_alias(self.aliases[i], key)
        return dec
