"""The shard plan and the SVD cache, against brute force and plain recomputation."""

import itertools

import pytest
import torch
from safetensors.torch import save_file

from pipeline.training.sharded_switch import sharded_switch
from tsd import TSDConfig, inject, run_switch, tsd_layers
from tsd.directions import decompose
from tsd.plan import plan_loads, shard_plan
from tsd.svd_cache import SVDCache, part_digest, partition_key, weight_key
from tsd.switch import SwitchItem


def _items(shapes):
    return [SwitchItem(f"l{i}", s, 2) for i, s in enumerate(shapes)]


def test_plan_is_deterministic_complete_and_near_optimal():
    shapes = [(576, 576), (192, 576), (192, 576), (1536, 576), (576, 1536)] * 6
    items = _items(shapes)
    owner = shard_plan(items, 2)
    assert owner == shard_plan(items, 2)
    assert set(owner) == {0, 1}
    loads = plan_loads(items, owner, 2)
    assert sum(loads) == sum(i.cost for i in items)
    # LPT is within 4/3 of optimal; against brute force on a small instance it is close.
    small = _items([(64, 64), (128, 64), (32, 96), (96, 96), (64, 128), (16, 16)])
    best = min(
        max(plan_loads(small, list(a), 2)) for a in itertools.product([0, 1], repeat=len(small))
    )
    assert max(plan_loads(small, shard_plan(small, 2), 2)) <= 4 / 3 * best
    assert shard_plan(items, 1) == [0] * len(items)
    with pytest.raises(ValueError):
        shard_plan(items, 0)


def test_cache_key_follows_the_weights_and_entries_round_trip(tmp_path):
    w = torch.randn(40, 24)
    k = weight_key(w, "float32")
    assert k == weight_key(w.clone(), "float32")
    assert k != weight_key(w, "float64")
    w2 = w.clone()
    w2[3, 4] += 1e-6
    assert k != weight_key(w2, "float32")
    cache = SVDCache(tmp_path)
    assert cache.get(k) is None and cache.misses == 1
    dec = decompose(w)
    cache.put(k, dec)
    got = cache.get(k)
    assert cache.hits == 1
    for a, b in ((got.U, dec.U), (got.S, dec.S), (got.V, dec.V)):
        assert torch.equal(a, b)
    assert got.weight_dtype == torch.float32
    kb = weight_key(w.bfloat16(), "float32")
    cache.put(kb, decompose(w.bfloat16()))
    assert cache.get(kb).weight_dtype == torch.bfloat16  # the zero-sigma guard needs it (rank_tolerance)
    save_file({"U": dec.U.contiguous(), "S": dec.S, "V": dec.V.contiguous()}, str(cache.path(k)))  # an entry from before weight_dtype
    assert cache.get(k) is None  # ... is recomputed, not trusted with the SVD's precision alone
    cache.path(k).write_bytes(b"not a safetensors file")
    assert cache.get(k) is None  # a damaged entry is a miss, never an error


def test_partition_key_names_the_slices_in_order_and_aliases_fail_safe(tmp_path):
    w = torch.randn(10, 7)
    flat = w.reshape(-1)
    halves = [part_digest(flat[:35]), part_digest(flat[35:])]
    key = partition_key((10, 7), w.dtype, "float32", halves)
    assert key == partition_key((10, 7), w.dtype, "float32", [part_digest(flat[:35].clone()), halves[1]])
    assert key != partition_key((10, 7), w.dtype, "float32", halves[::-1])
    assert key != partition_key((10, 7), w.dtype, "float64", halves)
    assert key != partition_key((10, 7), w.dtype, "float32", [part_digest(flat)])  # another world size
    assert part_digest(flat[:35]) != part_digest((flat + 1e-6)[:35])

    cache = SVDCache(tmp_path)
    content = weight_key(w, "float32")
    assert cache.resolve(key) is None
    cache.put_alias(key, content)
    assert cache.resolve(key) is None  # the alias names an entry that is not there
    cache.put(content, decompose(w))
    assert cache.resolve(key) == content
    cache.alias_path(key).write_text("../../etc/passwd")
    assert cache.resolve(key) is None  # a damaged alias is a miss, never a path
    assert not list(tmp_path.glob(".tmp-*"))


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    inject(model, TSDConfig(method="dash", r=4, alpha=8, dropout=0.0, switch_step=1, num_directions=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in tsd_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def test_single_process_sharded_switch_with_cold_and_warm_cache_equals_run_switch(tmp_path):
    ref = run_switch(_model(), "dash", 1)
    cold = sharded_switch(_model(), "dash", 1, cache_dir=str(tmp_path))
    warm = sharded_switch(_model(), "dash", 1, cache_dir=str(tmp_path))
    assert cold.cache_hits == 0 and warm.cache_hits == len(ref)
    # Whole weights (no ZeRO-3) are found by their content key alone: no partition aliases.
    assert len(list(tmp_path.glob("*.safetensors"))) == len(ref) and not list(tmp_path.glob("*.alias"))
    damaged = sorted(tmp_path.glob("*.safetensors"))[0]  # a damaged entry is a miss, recomputed and rewritten
    damaged.write_bytes(b"garbage")
    again = sharded_switch(_model(), "dash", 1, cache_dir=str(tmp_path))
    assert again.cache_hits == len(ref) - 1 and damaged.stat().st_size > 100
    for r, c, w, a in zip(ref, cold.directions, warm.directions, again.directions):
        assert torch.equal(r.indices, c.indices) and torch.equal(c.indices, w.indices)
        assert torch.equal(w.indices, a.indices)
        torch.testing.assert_close(r.change_rates, w.change_rates)
