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

Without a process group (one process) the same code runs the items in order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from pipeline.training.distributed import rank_and_world
from pipeline.training.faults import NO_FAULTS, Faults
from tsd.directions import Decomposition, LayerDirections, decompose, layer_directions
from tsd.inject import tsd_layers
from tsd.partition import full_shape, gather_to, local_part
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


def _comm_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _selection_size(item: SwitchItem) -> int:
    m, n = item.shape
    return (m + n + 2) * item.count + min(m, n)


def _pack(d: LayerDirections, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    parts = [d.U.reshape(-1), d.V.reshape(-1), d.sigma, d.change_rates, d.indices]
    return torch.cat([p.to(device=device, dtype=dtype) for p in parts])


def _unpack(buf: torch.Tensor, item: SwitchItem) -> LayerDirections:
    m, n = item.shape
    c, k = item.count, min(m, n)
    sizes = [m * c, n * c, c, k, c]
    U, V, sigma, rates, idx = torch.split(buf.cpu(), sizes)
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


def _cache_lookup(layers, items, owner, rank, world, svd_dtype, cache, device) -> tuple[dict[int, str], dict[int, str]]:
    """For this rank's items: the partition keys (aliases), and the content keys of those the
    cache holds, found without moving a weight: every rank hashes its own slices, and one
    all-gather shares the digests."""
    digests = torch.tensor(
        [list(part_digest(local_part(layers[it.name].base_layer.weight))) for it in items], dtype=torch.uint8
    ).reshape(len(items), 32)
    if world > 1:
        all_digests = [torch.empty_like(digests, device=device) for _ in range(world)]
        dist.all_gather(all_digests, digests.to(device))
        all_digests = [d.cpu() for d in all_digests]
    else:
        all_digests = [digests]
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


def _all_ranks_union(mine: set[int], n: int, world: int, device: torch.device) -> set[int]:
    """The union over ranks of sets of item indices (one all-reduce)."""
    if world == 1:
        return set(mine)
    flags = torch.zeros(n, dtype=torch.int32)
    flags[sorted(mine)] = 1
    flags = flags.to(device)
    dist.all_reduce(flags)
    return {int(i) for i in torch.nonzero(flags.cpu()).flatten()}


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
    rank, world = rank_and_world()
    layers = dict(tsd_layers(model))
    switch = switch_kind(kind)
    items = switch_items(model, kind)
    owner = shard_plan(items, world)
    report = SwitchReport(kind=kind, step=step, world_size=world, plan_loads=plan_loads(items, owner, world))
    cache = SVDCache(cache_dir) if cache_dir else None
    dtype = {"float32": torch.float32, "float64": torch.float64}[svd_dtype]
    device = _comm_device()
    # Each rank's queue in descending cost (the plan's order), so the items of one round are
    # of like size and no rank waits long for another's SVD before the next round's gather.
    queues = [sorted((i for i in range(len(items)) if owner[i] == k), key=lambda i: (-items[i].cost, i))
              for k in range(world)]
    mine: dict[int, LayerDirections] = {}
    results: list[LayerDirections | None] = [None] * len(items)

    def factors(i: int) -> list[torch.Tensor]:
        layer = layers[items[i].name]
        return [layer.lora_A, layer.lora_B]

    def own(i: int, dec: Decomposition, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        layer = layers[items[i].name]
        # The same selection as the single-process run_switch; the weight itself is not needed
        # once decomposed. Excluded subspaces are replicated buffers: no communication.
        mine[i] = layer_directions(items[i].name, None, lora_A, lora_B, layer.scaling, items[i].count,
                                   decomposition=dec, exclude=switch.exclude(layer))
        report.decomposed.append(items[i].name)

    def share(done: list[list[int]]) -> None:
        """done[k]: the items rank k has just selected (the same lists on every rank). Each owner
        broadcasts its selections in one message and every rank installs them at once, so no
        rank ever holds more than a round's selections beyond the layers' own buffers."""
        for k, its in enumerate(done):
            if not its:
                continue
            if world == 1:
                got = [mine.pop(i) for i in its]
            else:
                sizes = [_selection_size(items[i]) for i in its]
                if k == rank:
                    buf = torch.cat([_pack(mine.pop(i), dtype, device) for i in its])
                else:
                    buf = torch.empty(sum(sizes), dtype=dtype, device=device)
                dist.broadcast(buf, src=k)
                got = [_unpack(part, items[i]) for i, part in zip(its, torch.split(buf, sizes))]
            for i, d in zip(its, got):
                layer = layers[d.name]
                switch.fill(layer, d, step, modifier_rank=0)
                results[i] = switch.installed(layer, d)

    # 1. Warm cache: items whose decomposition is on disk need only their (small) LoRA
    #    factors at the owner: packed, several items per gather, no weight moves.
    aliases, keys = _cache_lookup(layers, items, owner, rank, world, svd_dtype, cache, device) if cache else ({}, {})
    cached = _all_ranks_union(set(keys), len(items), world, device) if cache else set()
    if cached:
        def factor_bytes(i: int) -> int:
            return sum(math.prod(full_shape(p)) * p.element_size() for p in factors(i))

        # A gather holds at most as many bytes as the largest weight, which the switch holds anyway.
        limit = max(math.prod(it.shape) * layers[it.name].base_layer.weight.element_size() for it in items)
        # Round j: every rank's j-th chunk is gathered to it, then each processes its own, side by side.
        chunks = [_chunks([i for i in queues[k] if i in cached], factor_bytes, limit) for k in range(world)]
        for j in range(max(len(c) for c in chunks)):
            late = set()
            assembled = _gather_round([[p for i in c[j] for p in factors(i)] if j < len(c) else None for c in chunks], rank)
            for n, i in enumerate(chunks[rank][j] if assembled is not None else []):
                t0 = time.perf_counter()
                dec = cache.get(keys[i], device=assembled[2 * n].device)
                if dec is None:  # damaged since it was looked up: assembled and decomposed below
                    late.add(i)
                    continue
                own(i, dec, assembled[2 * n], assembled[2 * n + 1])
                report.cache_hits += 1
                report.decompose_seconds += time.perf_counter() - t0
                del dec
            del assembled
            late = _all_ranks_union(late, len(items), world, device)
            cached -= late
            share([[i for i in c[j] if i not in late] if j < len(c) else [] for c in chunks])

    # 2. Rounds over the rest: rank k's j-th item is assembled on rank k (its weight and LoRA
    #    factors in one gather) while the others send their slices; then every rank decomposes
    #    its own item at the same time. Memory: one full weight and its factors per rank.
    queues = [[i for i in q if i not in cached] for q in queues]
    for j in range(max(len(q) for q in queues)):
        assembled = _gather_round([[layers[items[q[j]].name].base_layer.weight, *factors(q[j])] if j < len(q) else None
                                   for q in queues], rank)
        if assembled is not None:
            t0 = time.perf_counter()
            i = queues[rank][j]
            weight, lora_A, lora_B = assembled
            del assembled
            dec = None
            if cache is not None:
                key = weight_key(weight, svd_dtype)
                dec = cache.get(key, device=weight.device)  # decomposed before, under another partitioning
            if dec is None:
                dec = decompose(weight, svd_dtype)
                faults.in_switch(rank)  # reliability tests: a rank failing mid-switch
                if cache is not None:
                    cache.put(key, dec)
            else:
                report.cache_hits += 1
            if cache is not None:
                cache.put_alias(aliases[i], key)
            del weight
            own(i, dec, lora_A, lora_B)
            report.decompose_seconds += time.perf_counter() - t0
            del dec, lora_A, lora_B
        # 3. Every owner sends what it selected this round to all ranks, which install it.
        share([[q[j]] if j < len(q) else [] for q in queues])

    report.directions = results
    report.seconds = time.perf_counter() - t_start
    return report
