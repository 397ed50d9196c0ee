"""Where collective tensors live: one module (tsd/collectives.py) calls torch.distributed, and
under a stand-in process group that refuses tensors not on its device, the module and its
callers work whatever device their tensors are on (issue 23: NCCL takes GPU tensors only, and
the loss checks, step statistics, resume vote, memory budget and switch flags handed it CPU ones).
"""

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from fake_device import fake_device

from pipeline.training.loop import StepStats
from tsd import collectives

ROOT = Path(__file__).resolve().parents[1]
THE_PLACE = ROOT / "tsd" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "_all_gather_base", "_reduce_scatter_base",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def collective_calls(source: str) -> list[str]:
    """`module.fn(...)` calls and `from module import fn` of a collective of torch.distributed
    (or DeepSpeed's wrapper of it) in `source`, however the module was imported or renamed."""
    tree = ast.parse(source)
    aliases = set(DIST_MODULES)  # dotted names that mean a distributed module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_collective_outside_the_one_place():
    offenders = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("tsd/**/*.py")]):
        if path != THE_PLACE:
            offenders += [f"{path.relative_to(ROOT)} {c}" for c in collective_calls(path.read_text())]
    assert not offenders, "collectives outside tsd/collectives.py (which puts tensors on the group's device):\n" + \
        "\n".join(offenders)


def test_the_architecture_check_finds_every_spelling():
    bad = """
import torch.distributed as dist
import torch.distributed
from torch import distributed as d2
from torch.distributed import all_reduce
import deepspeed.comm as ds_comm
dist.all_reduce(x)
torch.distributed.broadcast(x, 0)
d2.barrier()
ds_comm.all_gather(out, x)
dist.get_rank()
"""
    assert [c.split(": ")[1] for c in collective_calls(bad)] == [
        "from torch.distributed import all_reduce", "dist.all_reduce", "torch.distributed.broadcast", "d2.barrier",
        "ds_comm.all_gather"]


class StandInGroup:
    """Two ranks that always hold the same values, on `device` only: a tensor anywhere else is
    refused as NCCL refuses a CPU tensor. Object collectives need no device (torch picks it)."""

    ReduceOp = dist.ReduceOp

    def __init__(self, device: torch.device):
        self.device, self.calls = device, []

    def _check(self, *tensors):
        for t in tensors:
            if t.device != self.device:
                raise RuntimeError(f"stand-in group: a tensor on {t.device}, this group's device is {self.device}")

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_rank(self):
        return 0

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        self._check(t)
        self.calls.append("all_reduce")
        if op == dist.ReduceOp.SUM:
            t.mul_(2)

    def all_gather(self, out, t):
        self._check(t, *out)
        self.calls.append("all_gather")
        for o in out:
            o.copy_(t)

    def broadcast(self, t, src):
        self._check(t)
        self.calls.append("broadcast")

    def gather(self, t, parts, dst):
        self._check(t, *(parts or []))
        self.calls.append("gather")
        for p in parts or []:
            p.copy_(t)

    def barrier(self, device_ids=None):
        self.calls.append("barrier")

    def broadcast_object_list(self, box, src):
        self.calls.append("broadcast_object_list")

    def all_gather_object(self, out, obj):
        self.calls.append("all_gather_object")
        out[:] = [obj] * len(out)


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in group, on a device that is not the CPU (tests/fake_device.py)."""
    with fake_device() as device:
        group = StandInGroup(device)
        monkeypatch.setattr(collectives, "dist", group)
        monkeypatch.setattr(collectives, "group_device", lambda: device)
        yield group


def test_the_stand_in_refuses_a_tensor_off_its_device(stand_in):
    with pytest.raises(RuntimeError, match="this group's device"):
        stand_in.all_reduce(torch.ones(3))


@pytest.mark.parametrize("where", ["cpu", "group"])
def test_every_collective_takes_tensors_from_anywhere_and_answers_on_their_device(stand_in, where):
    device = stand_in.device if where == "group" else torch.device("cpu")
    x = torch.arange(4.0).to(device)
    summed = collectives.all_reduce(x)
    assert summed.device == device and summed.to("cpu").tolist() == [0.0, 2.0, 4.0, 6.0]
    assert x.to("cpu").tolist() == [0.0, 1.0, 2.0, 3.0], "the caller's tensor must not change"
    assert collectives.all_reduce(x, op="max").to("cpu").tolist() == [0.0, 1.0, 2.0, 3.0]
    parts = collectives.all_gather(x)
    assert [p.device for p in parts] == [device] * 2 and all(p.to("cpu").tolist() == [0, 1, 2, 3] for p in parts)
    got = collectives.broadcast(x, src=1)
    assert got.device == device and got.to("cpu").tolist() == [0, 1, 2, 3]
    flat = collectives.gather(x.reshape(2, 2), dst=0)
    assert flat.device == device and flat.to("cpu").tolist() == [0, 1, 2, 3] * 2
    collectives.barrier()
    assert collectives.broadcast_object({"a": 1}) == {"a": 1} and collectives.all_gather_object(3) == [3, 3]
    assert stand_in.calls == ["all_reduce", "all_reduce", "all_gather", "broadcast", "gather", "barrier",
                              "broadcast_object_list", "all_gather_object"]


def test_the_callers_work_under_a_group_that_is_not_on_the_cpu(stand_in, tmp_path):
    """The calls that handed NCCL CPU tensors, run under the stand-in (each raised before)."""
    from pipeline.training.checkpoint import choose_resume_tag
    from pipeline.training.memory import smallest_budget
    from pipeline.training.sharded_switch import _all_ranks_union

    stats = StepStats()  # the loss on the accelerator, the batch's mask still on the host
    stats.add(torch.tensor(2.0).to(stand_in.device), torch.ones(2, 3, dtype=torch.long))
    stats.add(torch.tensor(4.0).to(stand_in.device), torch.ones(2, 2, dtype=torch.long))
    assert stats.agreed(accum=2, world=2, grad_norm=torch.tensor(0.5).to(stand_in.device)) == (3.0, 20.0, False, 0.5)
    assert _all_ranks_union({1, 3}, 5) == {1, 3}
    (tmp_path / "checkpoints").mkdir()
    assert choose_resume_tag(tmp_path / "checkpoints", 0, 2) is None
    budget, source = smallest_budget(SimpleNamespace(workers=SimpleNamespace(memory_budget_gb=None)))
    assert budget > 0 and "smallest over the ranks" in source


def test_a_nonfinite_loss_is_counted_on_the_device():
    stats = StepStats()
    stats.add(torch.tensor(float("nan")), torch.ones(1, 4, dtype=torch.long))
    stats.add(torch.tensor(1.0), torch.ones(1, 4, dtype=torch.long))
    loss, tokens, bad, norm = stats.agreed(accum=2, world=1, grad_norm=None)
    assert bad and tokens == 8.0 and norm is None and loss != loss  # NaN


def test_forcing_runs_the_collectives_through_a_group_of_one(tmp_path, monkeypatch):
    """TSD_FORCE_COLLECTIVES=1 (the GPU check's NCCL at world size 1): the group is used alone."""
    assert not collectives.active()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert not collectives.active()
        monkeypatch.setenv(collectives.FORCE_ENV, "1")
        assert collectives.active()
        assert collectives.all_reduce(torch.tensor([2.0])).tolist() == [2.0]
        assert collectives.gather(torch.tensor([1, 2]), dst=0).tolist() == [1, 2]
    finally:
        dist.destroy_process_group()

