"""The device rules of the GPU path (issue 23), checked on CPU:
- the switch's local math (dash fill, LoRA-Init fill, the residual rebuilt at resume) with the
  layer on one device and the broadcast selection on another gives the all-CPU result;
- every launcher entry binds its GPU (cuda:LOCAL_RANK, or the GPU Ray assigns) before any other
  CUDA call or collective (CUDA mocked);
- steady training reads a tensor's value on the host at most once per optimizer step.
The stand-in device is tests/fake_device.py; the collectives' own rule is tests/test_collectives.py.
"""

import copy
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import TARGETS, make_base, randomize_lora
from fake_device import FakeDeviceTensor, fake_device
from proc_group import child_env, free_port, make_tiny_model, run_group, tiny_config

import tsd
from tsd.partition import gathered
from tsd.switch import compute_directions, switch_items, switch_kind

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the switch's local math
def _model(method: str):
    model = make_base(0)
    torch.manual_seed(0)
    tsd.inject(model, tsd.TSDConfig(method=method, r=4, alpha=8, dropout=0.0, targets=TARGETS, switch_step=2,
                                    num_directions=3))
    randomize_lora(model, seed=3)
    return model


def _selections(model, kind: str) -> dict:
    """Each layer's selection, computed on the CPU (as an owner computes it before broadcasting)."""
    layers = dict(tsd.tsd_layers(model))
    out = {}
    for item in switch_items(model, kind):
        with gathered([layers[item.name].base_layer.weight]):
            out[item.name] = compute_directions(layers[item.name], item, "float32", kind=kind)
    return out


def _on_device(model, device):
    """A copy of `model` whose parameters and buffers live on `device` (the stand-in GPU)."""
    moved = copy.deepcopy(model)
    for module in moved.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.to(device)
    return moved


def _state(model) -> dict:
    return {k: (v.elem if isinstance(v, FakeDeviceTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def test_switch_fills_work_when_the_selection_arrives_on_another_device():
    """LoRA-TSD's two switches and the resume's residual rebuild on a layer on the stand-in GPU,
    the selections on the CPU (where the sharded switch used to leave them, `buf.cpu()`): the
    same tensors as on the CPU alone. Before the fix, LoRA-Init's fill subtracted a CPU B @ A
    from the GPU weight and raised."""
    cpu = _model("tsd")
    init = _selections(cpu, "init")
    with fake_device() as device:
        dev = _on_device(cpu, device)
        dev_layers = dict(tsd.tsd_layers(dev))
        for name, layer in tsd.tsd_layers(cpu):
            switch_kind("init").fill(layer, init[name], 2)
            switch_kind("init").fill(dev_layers[name], init[name], 2)
        dash = _selections(cpu, "dash")
        for name, layer in tsd.tsd_layers(cpu):
            switch_kind("dash").fill(layer, dash[name], 4)
            switch_kind("dash").fill(dev_layers[name], dash[name], 4)
        assert all(layer.init_done and layer.dash_active for layer in dev_layers.values())
        got, want = _state(dev), _state(cpu)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k

        # The residual rebuilt at resume from the original weight and the stored A0, B0
        original = _on_device(_model("tsd"), device)
        rebuilt_cpu = _model("tsd")
        for (name, layer), (_, ref) in zip(tsd.tsd_layers(original), tsd.tsd_layers(rebuilt_cpu)):
            for target, source in ((layer, dev_layers[name]), (ref, dict(tsd.tsd_layers(cpu))[name])):
                target.init_A0.copy_(source.init_A0)
                target.init_B0.copy_(source.init_B0)
                target.init_step.fill_(2)
                target._init_on = True
            switch_kind("init").rebuild_residual(layer)
            switch_kind("init").rebuild_residual(ref)
            assert torch.equal(layer.base_layer.weight.elem, ref.base_layer.weight), name


def test_the_residual_subtraction_refuses_factors_on_another_device():
    from tsd.layer import subtract_update_

    with fake_device() as device:
        w = torch.zeros(4, 3).to(device)
        with pytest.raises(RuntimeError, match="must be moved to the weight's device"):
            subtract_update_(w, torch.ones(4, 2), torch.ones(2, 3), 1.0)


def test_a_broadcast_selection_stays_on_the_device_it_arrived_on():
    from pipeline.training.sharded_switch import _pack, _unpack
    from tsd.switch import SwitchItem

    sel = _selections(_model("dash"), "dash")
    name, d = next(iter(sel.items()))
    item = SwitchItem(name, tuple(d.U.shape[:1] + d.V.shape[:1]), 3)
    with fake_device() as device:
        got = _unpack(_pack(d, torch.float32, device), item)
        assert {t.device for t in (got.U, got.V, got.sigma, got.indices, got.change_rates)} == {device}
        assert torch.equal(got.indices.to("cpu"), d.indices) and torch.equal(got.U.to("cpu"), d.U)


# ----------------------------------------------------------------------------- launchers bind their GPU first
class Stop(Exception):
    """Raised where the process group would be created: the test has seen what it needs."""


class CudaCalls:
    """A mocked CUDA with `count` GPUs that records, in order, every call touching a device and
    the process group's creation."""

    TOUCHING = ["current_device", "mem_get_info", "memory_allocated", "max_memory_allocated",
                "reset_peak_memory_stats", "get_rng_state", "set_rng_state", "empty_cache", "synchronize"]

    def __init__(self, count: int = 4):
        self.events, self.count, self.bound = [], count, 0

    def patches(self):
        def set_device(i):
            self.bound = int(torch.device(i).index if isinstance(i, torch.device) else i)
            self.events.append(("set_device", self.bound))

        def touching(name):
            def call(*a, **k):
                self.events.append((name,))
                return self.bound if name == "current_device" else (1 << 30, 1 << 31) if name == "mem_get_info" else 0
            return call

        def init(*a, **k):
            self.events.append(("init_process_group",))
            raise Stop()

        patches = [mock.patch("torch.cuda.is_available", lambda: True),
                   mock.patch("torch.cuda.device_count", lambda: self.count),
                   mock.patch("torch.cuda.set_device", set_device),
                   mock.patch("torch.distributed.init_process_group", init),
                   mock.patch("deepspeed.init_distributed", init)]
        patches += [mock.patch(f"torch.cuda.{n}", touching(n)) for n in self.TOUCHING]
        return patches

    def first(self) -> tuple:
        return self.events[0] if self.events else ()


@pytest.fixture
def cuda_calls():
    calls = CudaCalls()
    active = calls.patches()
    for p in active:
        p.start()
    try:
        yield calls
    finally:
        for p in reversed(active):
            p.stop()


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    wd = tmp_path_factory.mktemp("bind")
    cfg = tiny_config(make_tiny_model(wd / "model"), wd / "runs", "bind")
    cfg["tracking"]["offline"] = True
    cfg["workers"]["use_gpu"] = True
    path = wd / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _assert_bound_first(calls: CudaCalls, index: int) -> None:
    assert calls.first() == ("set_device", index), calls.events[:5]
    assert ("init_process_group",) in calls.events, "the test must reach the process group's creation"


@pytest.mark.parametrize("how", ["--local_rank", "LOCAL_RANK"])
def test_the_worker_entry_binds_its_gpu_before_anything_else(cuda_calls, tiny_cfg, monkeypatch, how):
    """torchrun sets LOCAL_RANK; the DeepSpeed launcher passes --local_rank too."""
    from pipeline.launch import worker
    from pipeline.training import loop

    monkeypatch.setenv("LOCAL_RANK", "3")
    seen = {}

    def entry(cfg, ctx):  # main_entry without its job-ending error handling
        seen["local_rank"] = ctx.local_rank
        with pytest.raises(Stop):
            loop.train(cfg, ctx)

    monkeypatch.setattr(worker, "main_entry", entry)
    worker.main([str(tiny_cfg), *(["--local_rank", "3"] if how == "--local_rank" else [])])
    assert seen["local_rank"] == 3
    _assert_bound_first(cuda_calls, 3)


def test_the_ray_entry_binds_the_gpu_ray_assigned(cuda_calls, tiny_cfg, monkeypatch):
    """Ray Train shows a node's workers all of its GPUs: the index is Ray's, not LOCAL_RANK."""
    import ray.train.torch

    from pipeline.config import load_config
    from pipeline.launch import driver
    from pipeline.training import loop

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 2))
    cfg = load_config(str(tiny_cfg))
    with pytest.raises(Stop):
        driver._train_fn({"cwd": str(ROOT), "config": cfg.to_dict(), "run_id": None, "tracking_uri": None})
    _assert_bound_first(cuda_calls, 2)
    assert loop  # the same loop as every launcher


def test_the_evaluation_entry_binds_its_gpu_before_the_group(cuda_calls, monkeypatch):
    from pipeline.eval_command import _init_distributed_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Stop):
        _init_distributed_from_env()
    _assert_bound_first(cuda_calls, 1)


def test_a_local_rank_without_a_gpu_is_named(cuda_calls):
    from pipeline.training.distributed import bind_device

    with pytest.raises(RuntimeError, match="local rank 5 has no GPU of its own: this process sees 4 GPU"):
        bind_device(5)


# ----------------------------------------------------------------------------- host synchronisations
@pytest.mark.slow
def test_steady_training_reads_the_device_once_per_optimizer_step(tmp_path):
    """LoRA-TSD (switches after steps 2 and 4), 2 micro-batches a step, ZeRO-3, one rank with
    every collective forced through the group: each step without a switch reads a tensor's value
    into Python once (the step's agreed statistics). Before: twice per micro-batch (the loss and
    the NaN vote) plus once per LoRA-Init layer per step (`init_done` read a buffer)."""
    cfg = tiny_config(make_tiny_model(tmp_path / "model"), tmp_path / "runs", "syncs")
    cfg["method"].update(method="tsd", switch_step=2)
    cfg["train"].update(max_steps=7, grad_accum=2, log_every=1)
    cfg["deepspeed"].update(config=str(ROOT / "configs/deepspeed/zero3.json"), strategy="zero3")
    cfg["model"]["attn_implementation"] = "eager"  # through the partitioned (ZeRO-3) load too
    cfg["tracking"]["offline"] = True
    cfg["workers"].update(num_workers=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "reads.json"
    env = child_env(TSD_FORCE_COLLECTIVES="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run_group([sys.executable, str(ROOT / "tests/dist/count_host_syncs.py"), str(path), str(out)], cwd=ROOT,
                     env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Precision left auto: fp32 on a CPU, and recorded as written for a rerun to compare.
    assert "precision fp32, weights float32 (auto: CPU)" in proc.stderr
    recorded = json.loads((tmp_path / "runs/syncs/run_config.json").read_text())
    assert (recorded["train"]["precision"], recorded["model"]["dtype"]) == ("auto", "auto")
    assert "attention eager" in proc.stderr
    windows = json.loads(out.read_text())["windows"]
    assert [w[0] for w in windows] == list(range(1, 8))
    # Step k's window: its training, bookkeeping and switches. Step 1's also holds the set-up;
    # steps 2 and 4 end with a switch. The others are steady training.
    steady = {w[0]: w[1:] for w in windows if w[0] not in (1, 2, 4)}
    assert all(len(reads) <= 1 for reads in steady.values()), steady
    assert len({tuple(reads) for reads in steady.values()}) == 1, steady  # the same one read every step


# ----------------------------------------------------------------------------- the GPU's random generator
def test_the_bound_gpus_generator_is_saved_and_restored_onto_the_bound_gpu(tmp_path, monkeypatch):
    """Only this rank's GPU (asking every visible GPU opens a CUDA context on each, from every
    rank of the node); restored onto the GPU bound now, and an older checkpoint's `cuda.<i>` of
    that GPU is read too. CUDA is mocked: a state per device, and the calls recorded."""
    from safetensors.torch import save_file

    from pipeline.training.checkpoint import restore_rng, rng_state

    states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(4)}
    calls, bound = [], {"device": 2}

    def get_rng_state(device="cuda"):
        calls.append(("get", device))
        return states[bound["device"] if device == "cuda" else torch.device(device).index or device]

    def set_rng_state(state, device="cuda"):
        calls.append(("set", device, int(state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: bound["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    tensors, meta = rng_state()
    assert calls == [("get", "cuda")] and torch.equal(tensors["cuda"], states[2])
    assert not any(k.startswith("cuda.") for k in tensors)
    save_file(tensors, str(tmp_path / "rng_rank0.safetensors"), metadata=meta)
    calls.clear()
    bound["device"] = 1  # the same rank bound to another index after a restart: its own stream follows it
    restore_rng(tmp_path)
    assert calls == [("set", "cuda", 2)]
    # an older checkpoint: every visible GPU's generator as cuda.<i>; the bound GPU's is restored
    old = {k: v for k, v in tensors.items() if k != "cuda"} | {f"cuda.{i}": s for i, s in states.items()}
    save_file(old, str(tmp_path / "rng_rank0.safetensors"), metadata=meta)
    calls.clear()
    restore_rng(tmp_path)
    assert calls == [("set", "cuda", 1)]
