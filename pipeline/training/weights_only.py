"""The one way this project loads a DeepSpeed checkpoint file: weights-only, never unpickled.

Its own module because both the checkpoint code (pipeline.training.checkpoint: saving, choosing
the tag to resume) and the resharding code (pipeline.training.reshard: reading old ranks' files
onto another world size) load through it, and neither should import the other.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch


def weights_only_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine loads with torch.load(weights_only=False), i.e. it
    unpickles: a checkpoint folder from elsewhere could run code when a run resumes from it.
    This returns an engine that saves the same files (atomically) but loads them with
    weights_only=True, allowing only the plain-data DeepSpeed classes ZeRO-3 checkpoints hold
    (the stage enum, the loss scalers and ZeRO-2's fragment addresses, rebuilt from their
    attributes, no code of theirs run).
    Any other checkpoint engine configured in the DeepSpeed config is refused, not trusted."""
    # deepspeed imported here, not at the top: commands that only read checkpoints' names
    # (preflight, tests) need not pay for importing it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # fragment_address: a dataclass of two ints (numel, start) in ZeRO-2's optimizer files.
    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            # Temporary name, then rename: a crash mid-write never leaves a truncated file
            # under the real name (resume also checks every file it needs).
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                torch.save(state_dict, tmp, _use_new_zipfile_serialization=self.zipfile_serialization)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        def load(self, path: str, map_location=None, mmap: bool = False):
            # mmap: tensors stay in the file until read (a reshard reads only its ranges of them);
            # only torch.save's zip format can be mapped, an older file is read whole.
            mmap = mmap and zipfile.is_zipfile(path)
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
                raise RuntimeError(
                    f"checkpoint {path}: refused by the weights-only load, it holds more than tensors and plain "
                    f"data ({what or 'unreadable'}); lora-tsd never unpickles checkpoints"
                ) from None

    if current is not None and type(current) not in (TorchCheckpointEngine, WeightsOnlyCheckpointEngine):
        raise ValueError(
            f"deepspeed.config: checkpoint engine {type(current).__name__} is not supported (it unpickles on load); "
            "remove its settings so the torch engine, with weights-only loads, is used"
        )
    engine = WeightsOnlyCheckpointEngine()
    engine.zipfile_serialization = getattr(current, "zipfile_serialization", True)  # the same files as before
    return engine
