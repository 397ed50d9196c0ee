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


# ----------------------------------------------------------------------------- the tensors, one slice at a time
KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _write_zero3_tag(tag: Path, shapes: dict[str, tuple], full: dict[str, dict], old_world: int,
                     cuts: tuple[int, ...] = ()) -> None:
    """A tag as ZeRO-3 writes it on `old_world` ranks: each rank's flat holds every parameter's
    ceil(numel/world) slice (zero-padded) one after another, split into sub-groups at `cuts`
    (ZeRO-3's sub_group_size), with Adam's moments laid out the same way. `full`: {key: {name:
    tensor}}, or None to fill each rank's flats with arbitrary values (the memory test)."""
    import math

    import torch

    tag.mkdir(parents=True, exist_ok=True)
    per_rank = sum(math.ceil(math.prod(s) / old_world) for s in shapes.values())
    torch.save({"param_shapes": [dict(shapes)], "module": {}, "buffer_names": [], "global_steps": 3,
                "global_samples": 6, "skipped_steps": 0}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    for rank in range(old_world):
        flats = {}
        for key in KEYS:
            if full is None:
                flats[key] = torch.full((per_rank,), float(rank + 1))
                continue
            pieces = []
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / old_world)
                mine = full[key][name].reshape(-1)[rank * part : (rank + 1) * part]
                pieces.append(torch.cat([mine, torch.zeros(part - mine.numel())]))
            flats[key] = torch.cat(pieces)
        bounds = [0, *cuts, per_rank]
        groups = {key: [flats[key][a:b].clone() for a, b in zip(bounds, bounds[1:])] for key in KEYS}
        state = {i: {"step": torch.tensor(3.0), "exp_avg": groups["exp_avg"][i], "exp_avg_sq": groups["exp_avg_sq"][i]}
                 for i in range(len(bounds) - 1)}
        torch.save({"optimizer_state_dict": {"fp32_flat_groups": groups["fp32"],
                                             "optimizer_state_dict": {"state": state, "param_groups": [{"lr": 1e-3}]}}},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (2, 3), (3, 2), (1, 4), (4, 3)])
def test_each_new_rank_gets_its_slice_of_every_parameter_and_moment(tmp_path, old_world, new_world):
    """Sizes no world divides, and sub-group boundaries inside parameters: each new rank's slice
    (ZeRO-3's ceil(numel/world) from rank x that, zero past the end) is the full tensor's."""
    import math

    import torch

    from pipeline.training.reshard import OldRankSlices

    shapes = {"a.weight": (7, 5), "b.bias": (3,), "c.weight": (4, 11), "d": (1,)}
    gen = torch.Generator().manual_seed(0)
    full = {key: {n: torch.randn(s, generator=gen) for n, s in shapes.items()} for key in KEYS}
    per_rank = sum(math.ceil(math.prod(s) / old_world) for s in shapes.values())
    _write_zero3_tag(tmp_path, shapes, full, old_world, cuts=(per_rank // 3, per_rank // 3 + 5))
    old = OldRankSlices(tmp_path, Layout(old_world), bf16=False)
    for rank in range(new_world):
        for name, shape in shapes.items():
            size = math.ceil(math.prod(shape) / new_world)
            for key in KEYS:
                want = torch.zeros(size)
                have = full[key][name].reshape(-1)[rank * size : (rank + 1) * size]
                want[: have.numel()] = have
                torch.testing.assert_close(old.new_slice(name, key, rank * size, size), want, rtol=0, atol=0)


_MEASURE_NEW_SLICES = '''
import math, sys
from pathlib import Path
from pipeline.training.checkpoint import weights_only_checkpoint_engine
from pipeline.training.reshard import Layout, OldRankSlices

tag, old_world, rank, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
weights_only_checkpoint_engine(None)  # imports deepspeed before the baseline


def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set
except OSError:
    sys.exit(3)  # the peak cannot be reset here: it would include the imports
before = status_mb("VmRSS")
old = OldRankSlices(tag, Layout(old_world), bf16=False)
total = 0.0
for name, shape in old.shapes.items():  # as load_resharded does: one parameter's slices at a time
    size = math.ceil(math.prod(shape) / world)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        total += float(old.new_slice(name, key, rank * size, size).sum())
print(status_mb("VmHWM") - before, total)
'''


def test_resharding_reads_one_ranks_share_not_the_whole_optimizer_state(tmp_path):
    """Full fine-tuning trains every parameter, so the optimizer state is 12 bytes per parameter
    of the model: resharding must cost a rank its share of it, not the whole. 24M parameters
    written by 2 ranks (288 MB of fp32 master + Adam moments) resumed on 4: one new rank's peak
    stays within 1.5x its share (69 MiB) + 64 MiB (measured 118 MiB; the constant is page
    granularity: a touched range of a mapped file brings in whole folios, up to 2 MiB per parameter
    and key). Putting the whole tensors back together on every rank, as it once did, measured
    1091 MiB here."""
    import os
    import subprocess
    import sys

    shapes = {f"layers.{i}.weight": (1000, 3000) for i in range(8)}  # 24M parameters, 3M each
    _write_zero3_tag(tmp_path, shapes, None, old_world=2, cuts=(5_000_000,))
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE_NEW_SLICES)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "2", "1", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode == 3:
        pytest.skip("/proc/self/clear_refs cannot reset the peak resident set here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb, total = (float(x) for x in proc.stdout.split()[-2:])
    share_mb = 12 * 24_000_000 / 4 / 2**20
    # new rank 1 of 4 holds elements [750k, 1.5M) of each parameter, all in old rank 0's slice (value 1.0)
    assert total == 3 * 24_000_000 / 4
    assert peak_mb <= 1.5 * share_mb + 64, f"peak {peak_mb:.0f} MB for a share of {share_mb:.0f} MB"
