"""Resume a checkpoint on a different number of ranks (a job restarted on fewer or more GPUs/nodes).

DeepSpeed's ZeRO-3 loader only takes back a checkpoint written by as many ranks as are loading
it: each rank's file holds that rank's flat slice of every trainable parameter and of its Adam
moments. Here every new rank memory-maps all the old ranks' files and, one parameter at a time,
reads only the old ranges that make up its own new slice (`OldRankSlices`), so its host memory is
its share of the optimizer state, also under full fine-tuning, where every parameter trains:

- the trainable parameters' fp32 master copy and Adam's `exp_avg`/`exp_avg_sq`, per parameter
  name (ZeRO-3 slices each parameter into `ceil(numel/world)` pieces, padded at the end, and
  lays the parameters one after another in the order of the checkpoint's `param_shapes`), handed
  to DeepSpeed's `safe_set_local_*` API; the module's own (compute-precision) slice is set from
  the same values;
- Adam's step count, the learning-rate schedule, the engine's step and sample counters and the
  loss scaler, from old rank 0's files;
- the TSD buffers (the switches' state: selected directions, LoRA-Init's A0/B0, step flags),
  which ZeRO-3 never partitions, from old rank 0's module state.

The data position is mapped by `map_data_position` and the global batch is kept when the new
world divides it (`keep_global_batch`); README "Resuming on a different number of ranks" says what
is exact and what is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.logs import log
from pipeline.training.weights_only import weights_only_checkpoint_engine

LAYOUT_FILE = "layout.json"  # per tag: how many ranks wrote it, with which batch settings


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was made: what a resume on another world size needs before it starts."""

    world_size: int
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    mlflow_run_id: str | None = None  # the MLflow run the checkpoint belongs to (a rerun continues it)
    strategy: str = "zero3"  # how the weights were spread (pipeline.training.strategy); older tags: ZeRO-3
    base: dict | None = None  # the base weights' fingerprint (pipeline.fingerprint); older tags: None

    @property
    def global_batch(self) -> int | None:
        if self.micro_batch_size is None or self.grad_accum is None:
            return None
        return self.world_size * self.micro_batch_size * self.grad_accum


def write_layout(tag_dir: Path, world: int, micro_batch_size: int, grad_accum: int,
                 mlflow_run_id: str | None = None, strategy: str = "zero3", base: dict | None = None) -> None:
    """Rank 0, after every rank's files of the tag are complete (written before `latest` moves).
    `base`: the fingerprint of the base weights the tag's training ran on (a resume checks it)."""
    tmp = tag_dir / f".{LAYOUT_FILE}.tmp"
    tmp.write_text(json.dumps({"world_size": world, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
                               "mlflow_run_id": mlflow_run_id, "strategy": strategy, "base_fingerprint": base}))
    tmp.replace(tag_dir / LAYOUT_FILE)


def read_layout(tag_dir: Path) -> Layout:
    """The tag's layout; a checkpoint from before layout.json existed is counted by its files."""
    path = tag_dir / LAYOUT_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            return Layout(int(raw["world_size"]), int(raw["micro_batch_size"]), int(raw["grad_accum"]),
                          raw.get("mlflow_run_id"), str(raw.get("strategy", "zero3")), raw.get("base_fingerprint"))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {tag_dir}: {LAYOUT_FILE} is unreadable ({e})") from None
    ranks = len(list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))
    return Layout(max(ranks, 1))


LATEST_FILE = "latest"  # in the checkpoints folder: the name of the newest complete tag


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `ckpt_dir/latest` names; None when there is no `latest`. Its content is only ever a
    tag of this run: the plain name of a folder directly in `ckpt_dir` (`step12`), never a path.
    Anything else (`../x`, `/abs/path`, `step2/../../x`, empty, binary) would make a resume read
    from outside the run folder: it raises ValueError, which every reader treats like a corrupt
    `latest` (choose_resume_tag falls back to the newest whole older tag)."""
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        name = raw.decode().strip()
    except UnicodeDecodeError:
        name = None
    if not name or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        shown = raw[:80].decode(errors="replace").strip()
        raise ValueError(f"{path} holds {shown!r}, which is not a checkpoint tag of this run (the name of a "
                         f"folder directly in {ckpt_dir}, such as step12)")
    return name


def checkpoint_run_id(run_dir: Path) -> str | None:
    """The MLflow run of the run folder's newest checkpoint (the tag `latest` names), if it says."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        tag = latest_tag(ckpt_dir)
        return read_layout(ckpt_dir / tag).mlflow_run_id if tag else None
    except (OSError, ValueError):
        return None


def keep_global_batch(cfg, saved: Layout, world: int):
    """The run config for resuming a checkpoint of `saved.world_size` ranks on `world` ranks:
    `train.grad_accum` changed so that world x micro batch x accumulation is the checkpoint's
    global batch, when `world` divides it (then each optimizer step sees the same examples as it
    would have before). Otherwise the config is returned as it is and the change is logged."""
    t = cfg.train
    if world == saved.world_size:
        return cfg
    if saved.global_batch is None:
        log(f"WARNING: the {saved.world_size}-rank checkpoint does not say its batch settings (written before "
            f"{LAYOUT_FILE} existed); train.grad_accum stays {t.grad_accum}")
        return cfg
    per_step = world * t.micro_batch_size
    if saved.global_batch % per_step == 0:
        accum = saved.global_batch // per_step
        if accum != t.grad_accum:
            log(f"resuming {saved.world_size}-rank checkpoint on {world} rank(s): train.grad_accum {t.grad_accum} -> "
                f"{accum}, keeping the global batch of {saved.global_batch} examples per optimizer step")
        return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accum))
    log(f"WARNING: resuming a {saved.world_size}-rank checkpoint on {world} rank(s): the global batch of "
        f"{saved.global_batch} is not a multiple of {world} rank(s) x micro batch {t.micro_batch_size}; it becomes "
        f"{per_step * t.grad_accum} per optimizer step from here on")
    return cfg


def map_data_position(consumed_micro: int, saved: Layout, saved_epoch_len: int, world: int, micro_batch_size: int,
                      epoch_len: int) -> int:
    """The micro-batches this rank has "consumed" in the new world, for the same point in the data.

    The sampler gives every rank every world-th example of the same shuffled epoch, so after k
    micro-batches per rank the ranks together have used exactly the first k x world x micro batch
    examples of the epoch's order, whatever the world. The epoch and that example count carry
    over; the new ranks skip the same examples (rounded down to whole micro-batches: a few
    examples may be seen again, never skipped)."""
    epoch, done = divmod(consumed_micro, max(saved_epoch_len, 1))
    examples = done * saved.world_size * (saved.micro_batch_size or micro_batch_size)
    mapped = examples // (world * micro_batch_size)
    if mapped >= epoch_len:  # the new world uses fewer of the epoch's examples: the epoch is over
        return (epoch + 1) * epoch_len
    return epoch * epoch_len + mapped


# ----------------------------------------------------------------------------- the tensors
OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the fp32 master copy and Adam's two moments


def _load(path: Path, mmap: bool = False):
    return weights_only_checkpoint_engine(None).load(str(path), map_location="cpu", mmap=mmap)


def _partition_numel(numel: int, world: int) -> int:
    return math.ceil(numel / world)


class OldRankSlices:
    """The trainable state of a ZeRO-3 tag as its ranks wrote it, read one range at a time.

    Every old rank's optimizer file is memory-mapped (torch.load(mmap=True)), so nothing is read
    until a range is asked for and a range touches only its own pages. A new rank asks for its
    own slice of one parameter at a time (`new_slice`): what it reads and holds is its share of
    the checkpoint, 12 bytes per parameter of that share, whatever the old and new world sizes.
    Putting whole tensors back together instead cost every rank ~24 bytes per trainable
    parameter, ~190 GB per rank for full fine-tuning of an 8B model."""

    def __init__(self, tag_dir: Path, saved: Layout, bf16: bool) -> None:
        self.tag_dir, self.old_world = tag_dir, saved.world_size
        self.model0 = _load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", mmap=True)
        self.shapes = {name: tuple(shape) for group in self.model0["param_shapes"] for name, shape in group.items()}
        # ZeRO-3 lays each parameter's ceil(numel/world) slice one after another in every rank's flat
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += _partition_numel(math.prod(shape), self.old_world)
        self.optimizer0: dict = {}
        self.chunks: list[dict[str, list[torch.Tensor]]] = []  # per old rank, per key: its sub-group flats
        for rank in range(self.old_world):
            osd = _load(self._optim_file(rank, bf16), mmap=True)["optimizer_state_dict"]
            self.optimizer0 = self.optimizer0 or osd
            groups, states = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
            self.chunks.append({"fp32": [g.reshape(-1) for g in groups],
                                **{key: [states[i][key].reshape(-1) for i in range(len(groups))]
                                   for key in ("exp_avg", "exp_avg_sq")}})
        for key in OPTIMIZER_KEYS:
            held = [sum(c.numel() for c in per_rank[key]) for per_rank in self.chunks]
            if any(n != offset for n in held):
                raise ValueError(f"checkpoint {tag_dir}: the {key} slices hold {held} values, the parameters "
                                 f"listed need {offset} per rank; the files do not belong together")

    def _optim_file(self, rank: int, bf16: bool) -> Path:
        names = [f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                 f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        return next((self.tag_dir / n for n in names if (self.tag_dir / n).is_file()), self.tag_dir / names[-1])

    def new_slice(self, name: str, key: str, start: int, size: int) -> torch.Tensor:
        """Elements [start, start + size) of parameter `name`'s flattened full `key` tensor, as
        float32, zero past its end (a new rank's ZeRO-3 slice: start = rank x size). Only the old
        ranks whose slices overlap the range are read."""
        numel, offset = math.prod(self.shapes[name]), self.offsets[name]
        old_part = _partition_numel(numel, self.old_world)
        out = torch.zeros(size, dtype=torch.float32)
        stop = min(start + size, numel)
        for rank in range(self.old_world):
            lo, hi = max(start, rank * old_part), min(stop, (rank + 1) * old_part)
            if lo < hi:
                first = offset + lo - rank * old_part  # where element lo sits in old rank's flat
                _copy_range(self.chunks[rank][key], first, first + hi - lo, out[lo - start : hi - start])
        return out


def _copy_range(chunks: list[torch.Tensor], begin: int, end: int, out: torch.Tensor) -> None:
    """Copy elements [begin, end) of `chunks` laid end to end (ZeRO-3's sub-group flats) into
    `out`, without concatenating them (a concatenation would read every chunk whole)."""
    pos, base = 0, 0
    for chunk in chunks:
        lo, hi = max(begin, base), min(end, base + chunk.numel())
        if lo < hi:
            out[pos : pos + hi - lo].copy_(chunk[lo - base : hi - base])
            pos += hi - lo
        base += chunk.numel()
        if base >= end:
            break


def load_resharded(engine, tag_dir: Path, saved: Layout, bf16: bool) -> dict:
    """Load a checkpoint written by `saved.world_size` ranks into this engine (any world size).
    Every rank calls it. Returns the checkpoint's client state (as engine.load_checkpoint does)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    old = OldRankSlices(tag_dir, saved, bf16)
    model0 = old.model0
    module = engine.module
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if trainable.keys() != old.shapes.keys():
        missing, extra = sorted(trainable.keys() - old.shapes.keys()), sorted(old.shapes.keys() - trainable.keys())
        raise ValueError(f"checkpoint {tag_dir} does not fit this model: trainable parameters missing from it "
                         f"{missing[:3]}, in it but not trainable here {extra[:3]} (another method or targets?)")
    from tsd.partition import full_shape

    for name, param in trainable.items():
        if old.shapes[name] != full_shape(param):
            raise ValueError(f"checkpoint {tag_dir}: {name} has shape {old.shapes[name]}, the model's is "
                             f"{full_shape(param)} (another r or model?)")
    # torch's AdamW creates a parameter's state at its first step; a resumed one has it already.
    # ZeRO-3's inner optimizer steps over one flat fp32 tensor per parameter sub-group.
    optim0 = old.optimizer0
    saved_state = optim0["optimizer_state_dict"]
    step = saved_state["state"][0]["step"]
    inner = engine.optimizer.optimizer
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        inner.state[flat] = {"step": step.clone() if torch.is_tensor(step) else step,
                             "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    rank = torch.distributed.get_rank()
    for name, param in trainable.items():  # one parameter's slices at a time: the peak is one rank's share
        size = param.ds_tensor.numel()  # ZeRO-3's ceil(numel/world), padded at the end
        mine = old.new_slice(name, "fp32", rank * size, size).to(param.ds_tensor.device)
        safe_set_local_fp32_param(param, mine)
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_local_optimizer_state(param, old.new_slice(name, key, rank * size, size).to(mine.device), key)
        param.ds_tensor.data.copy_(mine.view_as(param.ds_tensor).to(param.ds_tensor.dtype))  # the module's copy

    saved_groups = saved_state["param_groups"]  # one per optimizer group (train.dash_lr_scale makes two)
    if len(saved_groups) != len(inner.param_groups):
        raise ValueError(f"checkpoint {tag_dir}: {len(saved_groups)} optimizer parameter group(s), this run has "
                         f"{len(inner.param_groups)} (was train.dash_lr_scale changed?)")
    for group, saved_group in zip(inner.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for attr in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if attr in optim0:
            setattr(engine.optimizer, attr, optim0[attr])

    buffers = {n: model0["module"][n] for n in model0.get("buffer_names", []) if n in model0["module"]}
    _, unexpected = module.load_state_dict(buffers, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {tag_dir}: buffers this model does not have: {unexpected[:3]}")
    if engine.lr_scheduler is not None and model0.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model0["lr_scheduler"])
    engine.global_steps = model0["global_steps"]
    engine.global_samples = model0["global_samples"]
    engine.skipped_steps = model0["skipped_steps"]
    log(f"checkpoint {tag_dir.name} of {saved.world_size} rank(s) resharded onto {torch.distributed.get_world_size()} "
        f"rank(s): {len(trainable)} trainable tensors with their Adam moments, {len(buffers)} buffers")
    return model0
