"""Shared helpers for the tsd/ test suite: tiny LLaMA models built from configs (no hub),
naive references, and small utilities.

Every model here is a 2-layer LlamaForCausalLM with hidden 32 / intermediate 48, so the
target layers have all three orientations:
  q_proj 32x32 (square), k_proj / v_proj 16x32 (wide), up_proj 48x32 (tall), down_proj 32x48 (wide).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to oversubscription on a busy 2-core box

# No rank compiles DeepSpeed's CPU comm op any more (skip_unused_deepspeed_comm_op); an op DeepSpeed
# does need (CPU Adam) would be built once per venv, wherever HOME points (the two-host and Ray-job
# tests give their processes another HOME) and whichever venv ran before. The children also need
# one ninja (the venv's, first on PATH: proc_group.child_env): the system's and the venv's
# alternating on one build folder rebuilt the comm op at each start (five builds, 250 CPU-s, in
# one `make test` before both).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_base(seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM in eval mode; fully determined by `seed`.

    The initial weights are rescaled to std 0.2 (the default std 0.02 makes every
    logit ~0 and differences invisible at the tolerances used here)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1000)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    return model


def clone(model):
    return copy.deepcopy(model)


def batch(seed: int = 0, bsz: int = 2, seqlen: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (bsz, seqlen), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def randomize_lora(model, seed: int = 0, scale: float = 0.1) -> None:
    """Give every TSD layer a nonzero random B (and a fresh random A): a stand-in for a
    pre-launch LoRA run."""
    import tsd

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def set_dash_scalars(model, seed: int = 0, scale: float = 0.3) -> None:
    import tsd

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            if layer.dash_size:
                layer.dash_scalars.copy_(torch.randn(layer.dash_size, generator=g) * scale)


def naive_rates(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype=torch.float64):
    """The definition, spelled out: full SVD, dW formed explicitly,
    delta_i = |diag(U^T dW V)|_i / sigma_i. Returns (rates, U, S, V) in `dtype`."""
    W = W.detach().to(dtype)
    dW = scaling * (B.detach().to(dtype) @ A.detach().to(dtype))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.mT
    rates = torch.diagonal(U.mT @ dW @ V).abs() / S
    return rates, U, S, V


def outer_products(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(c, m, n): u_i v_i^T for each column i -- invariant under the SVD sign flip."""
    return torch.einsum("mc,nc->cmn", U, V)


# ----------------------------------------------------------------------------- profiling the suite
# TSD_TEST_PROFILE=FILE appends one JSON line per test phase: wall seconds and CPU seconds of the
# test process and of its reaped children (torchrun, its ranks, `tsd` commands). CPU seconds hold
# while other work shares the cores, which wall seconds do not (docs/TESTING.md); Ray's daemons
# are not reaped by the test, so Ray tests are undercounted there.
_PROFILE = os.environ.get("TSD_TEST_PROFILE")


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if _PROFILE:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import json

        t0, c0 = time.perf_counter(), _cpu_seconds()
        yield
        with open(_PROFILE, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "wall_s": round(time.perf_counter() - t0, 2),
                                "cpu_s": round(_cpu_seconds() - c0, 2), "end": round(time.time(), 1),
                                "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\n")


# ----------------------------------------------------------------------------- running on 2 workers
# `make test` runs the suite on pytest-xdist workers, a file at a time (--dist loadfile: a file's
# module fixtures, its trained runs, are made once). A worker takes the next file when it is
# free, so the longest files go first: a long file started last would leave the other worker
# idle at the end. The order: wall seconds measured with TSD_TEST_PROFILE (docs/TESTING.md).
# (--no-loadscope-reorder: xdist would otherwise order files by their number of tests.)
LONGEST_FIRST = [
    "test_multinode.py", "test_reliability.py", "test_pipeline_e2e.py", "test_resume.py", "test_full_ft.py",
    "test_rerun.py", "test_rank_failure.py", "test_seq_cls.py", "test_strategies.py", "test_dash_lr.py",
    "test_run_lock.py", "test_base_fingerprint.py", "test_tracking.py", "test_zero3.py", "test_architectures.py",
    "test_bad_input.py", "test_faults.py", "test_checkpointing.py", "test_evaluate.py", "test_compare.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # sorted() is stable: tests keep their order within a file
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))
