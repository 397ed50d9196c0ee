"""Checkpoints of a run: what is saved, how it is loaded safely, and which one a resume uses.

A checkpoint is DeepSpeed's (module incl. the TSD buffers, optimizer, scheduler) plus the data
position and each rank's RNG state. Files are written under a temporary name then renamed, and
loaded weights-only (never unpickled). `choose_resume_tag` finds the newest checkpoint that
every rank has whole, so all ranks resume from the same one or none.
"""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

try:  # NumPy is optional for torch; its generator is saved when it is there
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

from pipeline.file_checks import safetensors_problem
from pipeline.logs import log
from pipeline.run_folder import recorded_base
from pipeline.training.distributed import rank_and_world
from pipeline.training.reshard import LATEST_FILE, latest_tag, read_layout, write_layout
from pipeline.training.strategy import strategy_of_stage
from pipeline.training.weights_only import weights_only_checkpoint_engine  # noqa: F401 -- loop and tests use it from here
from tsd import collectives
from tsd.inject import tsd_layers
from tsd.switch import INIT, switch_kind


def save_checkpoint(engine, ckpt_dir: Path, step: int, micro_index: int, sched_state: dict,
                    keep: int | None = None, switch_at: tuple[int, ...] = (), run_id: str | None = None) -> None:
    """A DeepSpeed checkpoint (module incl. the TSD buffers, optimizer, schedule) plus the data
    position and this rank's RNG state (dropout), so a resumed run continues bit for bit; and
    the tag's layout (world size, batch settings, the base weights' fingerprint from the run
    folder's record: pipeline.run_folder.record_base), so it can resume on another world size
    and a resume can check it rebuilds the same base."""
    tag = f"step{step}"
    rank, world = rank_and_world()
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    tensors, meta = rng_state()
    save_file(tensors, str(ckpt_dir / tag / f"rng_rank{rank}.safetensors"), metadata=meta)
    # DeepSpeed's code writes its `latest` on rank 0 right after rank 0's own files, before its
    # closing barrier (in 0.18 the ranks happen to be in step by then, but nothing promises it).
    # Once save_checkpoint returns, every rank's files are complete: only then is `latest`
    # moved, atomically, to the new tag, so it never names a tag some rank is still writing.
    engine.save_checkpoint(
        str(ckpt_dir),
        tag=tag,
        client_state={"consumed_micro_batches": micro_index, "phase_start": sched_state["phase_start"],
                      "last_loss": float(sched_state.get("last_loss", float("nan"))), LEAN: True},
        save_latest=False,
        # Lean: the frozen base is never written (it is the model folder's, or after LoRA-Init the
        # residual rebuilt from it and init_A0/init_B0 at resume: rebuild_after_resume).
        exclude_frozen_parameters=True,
    )
    if rank == 0:
        base = recorded_base(ckpt_dir.parent)
        write_layout(ckpt_dir / tag, world, engine.train_micro_batch_size_per_gpu(),
                     engine.gradient_accumulation_steps(), run_id, strategy_of_stage(engine.zero_optimization_stage()),
                     base.to_dict() if base else None)
        pending = ckpt_dir / "latest.tmp"
        pending.write_text(tag)
        os.replace(pending, ckpt_dir / "latest")
    log(f"checkpoint {tag} written to {ckpt_dir}")
    deleted = prune_checkpoints(ckpt_dir, keep, switch_at)
    if deleted:
        log(f"deleted older checkpoint(s) {', '.join(deleted)} (train.keep_checkpoints: {keep})")
    # Rank 0 alone moves `latest` and prunes: the others wait for it, so that on every rank,
    # once this returns, `latest` names this tag and no older tag is half deleted (without it a
    # rank reading `latest` right after saving could see the previous tag: CI caught that once).
    collectives.barrier()


LEAN = "frozen_base_not_saved"  # client-state key of a checkpoint without the frozen base


def rebuild_after_resume(model, client_state: dict) -> int:
    """After loading a lean checkpoint, the base weights are the model folder's: make each
    LoRA-Init layer's base the residual again. Every rank, same order. Returns the layers rebuilt."""
    if not client_state.get(LEAN):
        return 0  # an older checkpoint: it carried the residual base itself
    init = switch_kind(INIT)
    rebuilt = 0
    for _, layer in tsd_layers(model):
        if layer.init_done:
            init.rebuild_residual(layer)
            rebuilt += 1
    return rebuilt


def prune_checkpoints(ckpt_dir: Path, keep: int | None, switch_at: tuple[int, ...] = ()) -> list[str]:
    """Delete all but the newest `keep` stepN tags (rank 0, after a save has completed on every
    rank, so the newest is whole before anything older goes; `latest` always names a kept one),
    except the first tag at or after each switch step in `switch_at`: it holds that switch's
    state (directions, LoRA-Init's A0/B0) and is the earliest point a run can go back to without
    decomposing again. Returns the tags deleted."""
    rank, _ = rank_and_world()
    if keep is None or rank != 0 or not ckpt_dir.is_dir():
        return []
    tags = sorted((d.name for d in ckpt_dir.iterdir() if d.is_dir() and _step_of(d.name) is not None), key=_step_of)
    try:
        latest = latest_tag(ckpt_dir)
    except ValueError:  # not a tag of this run: it protects none of them
        latest = None
    pinned = {next((t for t in tags if _step_of(t) >= at), None) for at in switch_at}
    doomed = [t for t in tags[:-keep] if t != latest and t not in pinned]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed


def _step_of(tag: str) -> int | None:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def _is_whole_file(path: Path) -> bool:
    """Cheap structural checks that catch truncated or empty files without loading them:
    torch.save writes a zip archive (its end record is at the very end), and a safetensors
    file's header declares where its last tensor ends."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        if path.suffix == ".pt":
            return zipfile.is_zipfile(path)
        if path.suffix == ".safetensors":
            return safetensors_problem(path) is None
        return True
    except OSError:
        return False


def tag_problem(tag_dir: Path, rank: int, bf16: bool, world: int | None = None) -> str | None:
    """Why this rank cannot resume from `tag_dir` (a missing, empty or truncated file), or None.

    On the world size that wrote it, each rank checks only the files it loads (ZeRO-3 and
    ZeRO-2 load each rank's optimizer partition from its own file). On another world size a
    ZeRO-3 rank reads every old rank's optimizer file and old rank 0's model file
    (pipeline.training.reshard); a data-parallel checkpoint is one model file whatever the world."""
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    try:
        layout = read_layout(tag_dir)
    except ValueError as e:
        return str(e)
    if world is None or world == layout.world_size or layout.strategy == "ddp":
        wanted = _rank_files(min(rank, layout.world_size - 1), bf16, layout.strategy)
    elif layout.strategy == "zero3":
        wanted = [["zero_pp_rank_0_mp_rank_00_model_states.pt"]] + [
            _rank_files(r, bf16, "zero3")[1] for r in range(layout.world_size)]
    else:  # not a damaged tag to skip: training from scratch instead would throw the run away
        raise ValueError(f"checkpoint {tag_dir} was written by {layout.world_size} ranks under {layout.strategy}, "
                         f"which resumes only on {layout.world_size} ranks (this run has {world}); rerun on "
                         f"{layout.world_size} ranks (ZeRO-3 and ddp checkpoints resume on any number)")
    for names in wanted:
        present = [tag_dir / n for n in names if (tag_dir / n).exists()]
        if not present:
            return f"{tag_dir / names[0]} is missing"
        if not _is_whole_file(present[0]):
            return f"{present[0]} is empty or truncated"
    return None


def _rank_files(rank: int, bf16: bool, strategy: str = "zero3") -> list[list[str]]:
    """The files one rank loads; a file is one of the names in a list (bf16 optimizer files
    carry a prefix). ZeRO-3: its own model and optimizer files; ZeRO-2: rank 0's model file and
    its own optimizer file; ddp: rank 0's model file (the optimizer state is in it)."""
    optim = [f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
             f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
    rng = [f"rng_rank{rank}.safetensors"]
    if strategy == "zero3":
        return [[f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"], optim, rng]
    if strategy == "zero2":
        return [["mp_rank_00_model_states.pt"], optim, rng]
    return [["mp_rank_00_model_states.pt"], rng]


def choose_resume_tag(ckpt_dir: Path, rank: int, world: int, bf16: bool = False) -> str | None:
    """The checkpoint tag every rank resumes from: the one `latest` names when it is whole on
    every rank, else the newest older stepN tag that is; None to start from scratch. A `latest`
    that names no tag of this run (a path: reshard.latest_tag) counts as corrupt: every stepN
    tag is then a fallback, and nothing outside `ckpt_dir` is read.

    Rank 0 lists the candidates and broadcasts them; every rank checks its own files and the
    verdicts are combined with an all-reduce, so all ranks load the same tag or none."""
    candidates: list[str] = []
    refused: str | None = None  # why `latest` was not used as a tag name
    if rank == 0 and (ckpt_dir / LATEST_FILE).is_file():
        try:
            latest = latest_tag(ckpt_dir)
        except ValueError as e:
            latest, refused = None, str(e)
        older = sorted((d.name for d in ckpt_dir.iterdir() if d.is_dir() and _step_of(d.name) is not None
                        and d.name != latest), key=_step_of, reverse=True)
        if latest is not None and _step_of(latest) is not None:  # only tags older than `latest`: never jump ahead of it
            older = [t for t in older if _step_of(t) < _step_of(latest)]
        candidates = [latest, *older] if latest is not None else older
    candidates, refused = collectives.broadcast_object((candidates, refused), src=0)
    if not candidates:
        if refused:
            log(f"WARNING: {refused}; it is ignored like a corrupt one, and there is no stepN tag to fall back to: "
                f"training starts from scratch")
        return None
    problems = [tag_problem(ckpt_dir / t, rank, bf16, world) for t in candidates]
    bad = collectives.all_reduce(torch.tensor([0.0 if p is None else 1.0 for p in problems]), op="max")
    for p in problems:
        if p is not None:
            log(f"checkpoint check: {p}", all_ranks=True)
    good = [t for t, b in zip(candidates, bad.tolist()) if b == 0.0]
    if refused:
        log(f"WARNING: {refused}; it is ignored like a corrupt one: "
            + (f"resuming from the newest whole checkpoint {good[0]!r} instead" if good else
               "no stepN tag is whole either, training starts from scratch"))
        return good[0] if good else None
    if not good:
        log(f"WARNING: no usable checkpoint in {ckpt_dir} (latest names {candidates[0]!r}, which is incomplete, "
            f"and no older whole stepN tag); training starts from scratch")
        return None
    if good[0] != candidates[0]:
        log(f"WARNING: the latest checkpoint {candidates[0]!r} in {ckpt_dir} is incomplete or corrupt; "
            f"resuming from the newest whole older checkpoint {good[0]!r} instead")
    return good[0]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every random generator this rank draws from, as tensors + metadata (safetensors: no
    pickle): torch's CPU generator, this rank's GPU's (the one it is bound to: asking every
    visible GPU would open a CUDA context on each, from every rank of the node), Python's `random`
    and NumPy's global one (data code and libraries may use them)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"python_version": str(version), "python_gauss": repr(gauss)}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
        meta.update(numpy_kind=kind, numpy_pos=str(pos), numpy_has_gauss=str(has_gauss), numpy_cached=repr(cached))
    return tensors, meta


def restore_rng(ckpt_path: Path) -> None:
    """Put back every generator `rng_state` saved for this rank (older checkpoints: torch's only)."""
    rank, _ = rank_and_world()
    f = ckpt_path / f"rng_rank{rank}.safetensors"
    if not f.is_file():
        return
    tensors = load_file(str(f))
    with safe_open(str(f), framework="pt") as handle:
        meta = handle.metadata() or {}
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        # This rank's GPU generator onto the GPU it is bound to now (the local rank may map to
        # another index than when saved); older checkpoints kept every visible GPU's as cuda.<i>.
        state = tensors.get("cuda", tensors.get(f"cuda.{torch.cuda.current_device()}"))
        if state is not None:
            torch.cuda.set_rng_state(state)
    if "python" in tensors:
        gauss = meta.get("python_gauss", "None")
        random.setstate((int(meta["python_version"]), tuple(tensors["python"].tolist()),
                         None if gauss == "None" else float(gauss)))
    if "numpy" in tensors and np is not None:
        np.random.set_state((meta["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                             int(meta["numpy_has_gauss"]), float(meta["numpy_cached"])))
