"""The evaluation's whole-copy vs partitioned decision (pipeline.eval_memory): the rule on its
numbers, what a rank counts as room (CUDA calls mocked: CI has no GPU), that it is decided after
the optimizer state is freed, and that a whole copy is loaded straight onto the rank's GPU."""

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import eval_memory
from pipeline.eval_memory import (EVAL_PARTITIONED, EVAL_TRAINED, EVAL_WHOLE, decide_eval_model, measured_room,
                                  room_on_gpu, room_on_host)

GiB = 2**30


def test_the_rule_takes_a_whole_copy_only_when_it_fits_with_headroom():
    assert decide_eval_model("auto", False, 8 * GiB, None, "")[0] == EVAL_TRAINED  # ZeRO-2 / ddp: no copy
    assert decide_eval_model("whole", True, 8 * GiB, None, "")[0] == EVAL_WHOLE  # the user's choice wins
    assert decide_eval_model("partitioned", True, 8 * GiB, None, "")[0] == EVAL_PARTITIONED
    how, why = decide_eval_model("auto", True, 8 * GiB, 10 * GiB, "measured")
    assert how == EVAL_WHOLE and "8.00 GiB x 1.25 headroom, fits every rank's room of 10.00 GiB (measured)" in why
    how, why = decide_eval_model("auto", True, 8 * GiB, 10 * GiB - 1, "measured")
    assert how == EVAL_PARTITIONED and "does not fit" in why
    assert decide_eval_model("auto", True, 8 * GiB, None, "")[0] == EVAL_PARTITIONED  # room unknown


def test_gpu_room_counts_the_allocators_unused_reserve_and_the_slices_about_to_be_freed():
    # The driver reports 2 GiB free; torch has reserved 6 GiB of which 1 GiB is in use (this
    # rank's 0.5 GiB of model slices and some buffers): 2 + 5 + 0.5 GiB for a copy.
    assert room_on_gpu(free=2 * GiB, reserved=6 * GiB, allocated=1 * GiB, share=GiB // 2) == 7.5 * GiB
    assert room_on_gpu(free=2 * GiB, reserved=GiB, allocated=GiB, share=0) == 2 * GiB
    # A 5 GiB model fits that (6.25 GiB with headroom); the driver's free memory alone would not.
    assert decide_eval_model("auto", True, 5 * GiB, 7.5 * GiB, "")[0] == EVAL_WHOLE
    assert decide_eval_model("auto", True, 5 * GiB, 2 * GiB, "")[0] == EVAL_PARTITIONED
    # On CPU the node's available memory is shared by its ranks.
    assert room_on_host(available=12 * GiB, ranks_on_node=4, share=GiB) == 4 * GiB


def _partitioned_module(share_numel: int, full_numel: int) -> nn.Module:
    """A module whose one parameter looks ZeRO-3 partitioned: an empty local tensor, `ds_tensor`
    this rank's slice, `ds_numel` the full size."""
    module = nn.Module()
    param = nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_numel, param.ds_tensor = 0, full_numel, torch.zeros(share_numel)
    module.weight = param
    return module


def test_measured_room_on_a_gpu_uses_the_bound_device_and_the_allocators_numbers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (3 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 4 * GiB)
    module = _partitioned_module(share_numel=GiB // 4, full_numel=GiB)  # a 1 GiB float32 slice
    room, how = measured_room(module)
    assert room == 3 * GiB + 6 * GiB + 1 * GiB and "unused reserve" in how


class _Engine:
    def __init__(self, module):
        self.module, self.freed = module, []


def test_the_choice_is_made_after_the_optimizer_state_is_freed(monkeypatch, tmp_path):
    """evaluate_after_training frees the optimizer state, then chooses (counting what is left),
    then frees the model's slices only for a whole copy."""
    from pipeline import eval_after_training as evaluate
    from pipeline.config import load_config

    events = []
    monkeypatch.setattr(evaluate, "release_training_state",
                        lambda engine, keep_module: events.append(("release", keep_module)))

    def choose(cfg, module):
        events.append(("choose",))
        return EVAL_WHOLE, "fits"

    monkeypatch.setattr(evaluate, "choose_eval_model", choose)
    monkeypatch.setattr(evaluate, "unpartitioned_copy", lambda cfg, state: events.append(("copy",)) or nn.Linear(1, 1))
    monkeypatch.setattr(evaluate, "evaluate_tasks", lambda *a, **k: {"metrics": {}})
    monkeypatch.setattr(evaluate, "load_records", lambda path: [])
    monkeypatch.setattr(evaluate, "_record", lambda result, *a: {})
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny_cpu.yaml")
    evaluate.evaluate_after_training(_Engine(nn.Linear(1, 1)), {}, None, cfg, tmp_path, None, 1)
    assert events == [("release", True), ("choose",), ("release", False), ("copy",)]


def test_a_whole_copy_is_loaded_straight_onto_the_ranks_gpu(monkeypatch, tmp_path):
    """device_map binds every weight to this rank's GPU as it is read: never a host-memory model
    moved afterwards (which needed every local rank's whole model in the node's RAM at once)."""
    from pipeline import eval_after_training as evaluate
    from pipeline.config import load_config

    seen = {}

    class Loaded(nn.Linear):
        def to(self, *a, **k):
            raise AssertionError("the copy was built elsewhere and moved")

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return Loaded(1, 1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(evaluate.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(evaluate, "apply_state", lambda model, config, state: None)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny_cpu.yaml", ["model.dtype=float32"])
    evaluate.unpartitioned_copy(cfg, {})
    assert seen["device_map"] == {"": torch.device("cuda", 3)}


def test_workers_memory_budget_replaces_the_measurement(monkeypatch):
    from pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny_cpu.yaml", ["workers.memory_budget_gb=1e-6"])
    monkeypatch.setattr(eval_memory, "measured_room", lambda module: pytest.fail("measured despite the budget"))
    how, why = eval_memory.choose_eval_model(cfg, _partitioned_module(4, 10**6))
    assert how == EVAL_PARTITIONED and "workers.memory_budget_gb" in why
