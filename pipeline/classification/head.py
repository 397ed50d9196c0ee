"""A classifier's head (model.task seq_cls): its config (classes, the pad id a decoder pools by)
and its start.

The head is not in the pretrained files. transformers initialises it from the global RNG, whose
state depends on everything drawn before (launcher, world size, strategy), so the head would
start differently under each launcher. `init_head` draws it from a generator seeded by the run's
seed instead: the same start everywhere, and a single-process reference can reproduce it.
"""

from __future__ import annotations

import torch
from torch import nn

from tsd.inject import saved_modules
from tsd.partition import gathered

HEAD_MODULES = ("classifier", "score")  # BERT-style heads and decoder heads; PEFT's SEQ_CLS defaults


def head_config(config, num_labels: int, labels: list[str] | None, pad_token_id: int | None) -> None:
    """Set a model config for a head of `num_labels` classes (names in id order when known).
    A decoder head pools the last non-pad token: it needs the pad id to find it."""
    config.num_labels = num_labels
    if labels:
        config.id2label = {i: name for i, name in enumerate(labels)}
        config.label2id = {name: i for i, name in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id


@torch.no_grad()
def init_head(model: nn.Module, seed: int, names=HEAD_MODULES) -> list[str]:
    """Give the classification head its starting values from `seed` alone: weights normal with
    the model's `initializer_range` (transformers' rule for these heads), biases zero. Every rank
    calls it (a collective under ZeRO-3). Returns the initialised modules' names."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    done = []
    for name, module in saved_modules(model, list(names)):
        for pname, param in sorted(module.named_parameters()):  # a fixed order: the draws are reproducible
            with gathered([param], modifier_rank=0):
                if pname.endswith("bias"):
                    param.zero_()
                else:
                    value = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                    param.copy_(value.to(param.dtype))
        done.append(name)
    return done
