"""A stand-in accelerator for CPU-only tests: tensors on a second device that keep their data.

CI has no GPU, yet the bugs the GPU path had are about devices: a CPU tensor handed to NCCL,
a selection on the CPU subtracted from a weight on the GPU. A CPU build of torch refuses the
`cuda` device before any Python hook can see it, so the stand-in borrows the `meta` device
(which torch accepts everywhere) and gives it data. Inside `fake_device()`:
- `.to("meta")` and `device="meta"` factories give `FakeDeviceTensor`s, whose device is `meta`
  and whose values are a CPU tensor's;
- an op that mixes such a tensor with a CPU tensor of more than one element raises, as CUDA
  does ("Expected all tensors to be on the same device"); 0-dim CPU tensors are allowed beside
  it, as torch allows them beside a GPU tensor; copies between the two devices are allowed;
- everything else computes on the CPU values and keeps its inputs' device, so results can be
  checked against an all-CPU run, and reading a value on the host (`item`, `tolist`) works, as
  a GPU synchronisation would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")


class FakeDeviceTensor(torch.Tensor):
    """A tensor whose device is `meta` and whose data is the CPU tensor `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                  device=DEVICE, requires_grad=elem.requires_grad,
                                                  storage_offset=elem.storage_offset())
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"FakeDeviceTensor({self.elem!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Reading values on the host (a GPU synchronisation on a real GPU) reads the CPU data.
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
                    torch.Tensor.__bool__, torch.Tensor.numpy):
            return func(args[0].elem, *args[1:], **(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_fake(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _run(func, args, kwargs):
    devices = set()

    name = func.overloadpacket.__name__
    # Element-wise ops take a CPU scalar beside a GPU tensor; joining ops (cat, stack) do not.
    scalars_ok = name not in ("cat", "stack")

    def note(t):
        if isinstance(t, FakeDeviceTensor):
            devices.add("fake")
        elif isinstance(t, torch.Tensor) and (t.dim() > 0 or not scalars_ok) and t.device.type == "cpu":
            devices.add("cpu")
        return t

    tree_map(note, (args, kwargs))
    wants = kwargs.get("device")
    if name in ("_to_copy", "empty_like", "zeros_like", "ones_like", "full_like") or "device" in kwargs:
        # Conversions and factories: the result's device is the one asked for, else the input's.
        on_fake = _on_fake(wants) if "device" in kwargs else "fake" in devices
    else:
        if devices == {"fake", "cpu"} and name not in ("copy_", "_copy_from", "_copy_from_and_resize"):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! (in {func})")
        on_fake = "fake" in devices
    unwrapped_args, unwrapped_kwargs = tree_map(lambda t: t.elem if isinstance(t, FakeDeviceTensor) else t,
                                                (args, kwargs))
    if "device" in unwrapped_kwargs:
        unwrapped_kwargs = {**unwrapped_kwargs, "device": torch.device("cpu")}
    out = func(*unwrapped_args, **unwrapped_kwargs)
    if name in ("copy_",) and isinstance(args[0], FakeDeviceTensor):
        return args[0]  # in place: the destination's data was written
    if not on_fake:
        return out
    return tree_map(lambda t: FakeDeviceTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, FakeDeviceTensor)
                    else t, out)


class _FakeDeviceMode(TorchDispatchMode):
    """Catches what plain CPU tensors do towards the stand-in device (`.to("meta")`, factories)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, FakeDeviceTensor) for t in types) or _on_fake(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device() -> Iterator[torch.device]:
    with _FakeDeviceMode():
        yield DEVICE
