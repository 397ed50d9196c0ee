"""Checkpoint loads never unpickle: the engine the training loop installs in DeepSpeed loads
with weights_only=True (issue 6, security). The stock engine is run on the same file to show
the payload is real, so the test fails if the swap stops protecting."""

from __future__ import annotations


import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from pipeline.training.checkpoint import weights_only_checkpoint_engine
from proc_group import PicklePayload


def test_weights_only_engine_loads_a_zero3_checkpoint_state(tmp_path):
    path = tmp_path / "optim_states.pt"
    scaler = LossScaler(scale=1.0)
    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": scaler, "exp_avg": torch.arange(4.0), "step": 3}
    torch.save(state, path)
    got = weights_only_checkpoint_engine(None).load(str(path), map_location=lambda s, loc: s)
    assert got["zero_stage"] is ZeroStageEnum.weights and got["step"] == 3
    assert type(got["loss_scaler"]) is LossScaler and vars(got["loss_scaler"]) == vars(scaler)
    torch.testing.assert_close(got["exp_avg"], torch.arange(4.0))


def test_weights_only_engine_refuses_a_pickled_payload(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": PicklePayload(str(tmp_path / "ran-by-ours"))}, path)
    with pytest.raises(RuntimeError, match=r"evil\.pt: refused by the weights-only load.*GLOBAL os\.makedirs.*never unpickles"):
        weights_only_checkpoint_engine(None).load(str(path))
    assert not (tmp_path / "ran-by-ours").exists()
    # The stock engine would have run it: what the swap protects against is real.
    TorchCheckpointEngine(None).load(str(path))
    assert (tmp_path / "ran-by-ours").exists()


def test_the_engine_keeps_the_save_format_and_refuses_other_engines():
    stock = TorchCheckpointEngine(None)
    stock.zipfile_serialization = True
    ours = weights_only_checkpoint_engine(stock)
    assert isinstance(ours, TorchCheckpointEngine) and ours.zipfile_serialization is True

    class OtherEngine(TorchCheckpointEngine):
        pass

    with pytest.raises(ValueError, match="checkpoint engine OtherEngine is not supported"):
        weights_only_checkpoint_engine(OtherEngine(None))


def test_checkpoint_files_are_written_under_a_temporary_name_first(tmp_path, monkeypatch):
    engine = weights_only_checkpoint_engine(None)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    engine.save({"w": torch.ones(3)}, str(path))
    assert torch.equal(engine.load(str(path))["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    def crash(obj, f, **kw):  # the process dies half-way through writing
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save({"w": torch.zeros(3)}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left
    monkeypatch.undo()
    assert torch.equal(engine.load(str(path))["w"], torch.ones(3))  # the old file is intact
