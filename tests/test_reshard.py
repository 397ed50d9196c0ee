"""Resuming on another world size, the arithmetic: the global batch kept and the data position
mapped (the end-to-end resume on 1 and 3 ranks is in test_resume.py)."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.loader import micro_batches_per_epoch
from pipeline.training.reshard import Layout, keep_global_batch, map_data_position, read_layout, write_layout

ROOT = Path(__file__).resolve().parents[1]


def _positions_used(n: int, world: int, mbs: int, micro_done: int) -> set[int]:
    """Naive reference: the positions of the epoch's shuffled order the ranks have trained on
    after `micro_done` micro-batches each (DistributedSampler: rank r takes r, r+world, ...)."""
    per_rank = n // world
    used = set()
    for rank in range(world):
        mine = [rank + world * i for i in range(per_rank)]
        used.update(mine[: micro_done * mbs])
    return used


@pytest.mark.parametrize("old_world,new_world,mbs", [(2, 1, 1), (2, 3, 1), (3, 2, 2), (4, 3, 1), (1, 4, 2)])
def test_the_mapped_position_skips_exactly_the_examples_already_trained_on(old_world, new_world, mbs):
    n = 60
    old_len, new_len = (micro_batches_per_epoch(n, w, mbs) for w in (old_world, new_world))
    saved = Layout(old_world, mbs, 1)
    for done in range(old_len):
        consumed = 3 * old_len + done  # in epoch 3
        mapped = map_data_position(consumed, saved, old_len, new_world, mbs, new_len)
        epoch, new_done = divmod(mapped, new_len)
        before, after = _positions_used(n, old_world, mbs, done), _positions_used(n, new_world, mbs, new_done)
        if epoch == 4:  # past the new world's share of the epoch: every position it uses was trained on
            assert new_done == 0 and _positions_used(n, new_world, mbs, new_len) <= before
            continue
        assert epoch == 3
        assert after <= before, "a position not yet trained on would be skipped"
        assert len(before - after) < new_world * mbs, "more than one micro-batch per rank would be repeated"


def test_the_global_batch_is_kept_when_the_new_world_divides_it():
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml")  # micro batch 2, grad_accum 1
    saved = Layout(world_size=4, micro_batch_size=2, grad_accum=3)  # global 24
    assert keep_global_batch(cfg, saved, 2).train.grad_accum == 6
    assert keep_global_batch(cfg, saved, 3).train.grad_accum == 4
    assert keep_global_batch(cfg, saved, 5).train.grad_accum == 1  # 5 x 2 does not divide 24: config as is
    assert keep_global_batch(cfg, Layout(2), 1).train.grad_accum == 1  # an old checkpoint: batch unknown
    assert keep_global_batch(cfg, saved, 4) is cfg


def test_layout_round_trip_and_old_checkpoints_are_counted_by_their_files(tmp_path):
    write_layout(tmp_path, 3, 2, 4)
    assert read_layout(tmp_path) == Layout(3, 2, 4) and Layout(3, 2, 4).global_batch == 24
    old = tmp_path / "old"
    old.mkdir()
    for r in range(2):
        (old / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert read_layout(old) == Layout(2)
    (tmp_path / "layout.json").write_text("{not json")
    with pytest.raises(ValueError, match="layout.json is unreadable"):
        read_layout(tmp_path)
