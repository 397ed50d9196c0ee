"""What the peer systems of bench_peers.py share with lora-tsd: the run config, the tokenizer, the
tokenized examples and the order of the examples, all taken from the project's own code so every
system sees exactly the same token sequences, label masking and global batches.

  - config:    pipeline.config.load_config(CONFIG, --set ...), paths resolved (pipeline.paths)
  - tokenizer: AutoTokenizer of model.path, pad = eos when the tokenizer has none (as
               pipeline.training.engine.load_model)
  - examples:  pipeline.data.loader.TokenizedTasks (the first data.limit records, the harness's
               prompt, data.cutoff_len, data.train_on_inputs)
  - order:     the project's sampler (pipeline.data.loader.ResumableSampler, a DistributedSampler:
               seeded shuffle of the whole set per epoch, rank r takes every world-th example),
               micro-batches of train.micro_batch_size; optimizer step k uses micro-batch k of
               every rank. With world x micro = 4 the global batch of step k is the same 4
               examples whatever the world size (world 1 micro 4, or world 2 micro 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def say(line: str) -> None:
    """One line on stderr in one write (ranks share the pipe: no interleaving within a line)."""
    os.write(2, (line + "\n").encode())


def load_cfg(config: str, sets: list[str]):
    from pipeline.config import load_config
    from pipeline.paths import resolve_paths

    return resolve_paths(load_config(config, sets), ROOT)


def tokenizer_of(cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def dataset_of(cfg, tokenizer):
    from pipeline.data.loader import TokenizedTasks

    return TokenizedTasks(cfg.data, tokenizer)


def step_batches(n_examples: int, seed: int, world: int, micro: int, steps: int) -> list[list[list[int]]]:
    """For optimizer steps 1..steps: each rank's micro-batch (example indices), as the project's
    loader gives them (grad_accum 1): batches[k-1][r] is rank r's micro-batch of step k."""
    from pipeline.data.loader import ResumableSampler, micro_batches_per_epoch

    per_epoch = micro_batches_per_epoch(n_examples, world, micro)
    if per_epoch == 0:
        raise ValueError(f"{n_examples} examples are too few for {world} rank(s) x micro batch {micro}")
    out: list[list[list[int]]] = []
    epoch = 0
    while len(out) < steps:
        per_rank = []
        for r in range(world):
            s = ResumableSampler(range(n_examples), r, world, seed, micro)  # a sized "dataset" is enough
            s.set_epoch(epoch)
            order = list(iter(s))
            per_rank.append([order[j * micro:(j + 1) * micro] for j in range(per_epoch)])
        for j in range(per_epoch):
            out.append([per_rank[r][j] for r in range(world)])
        epoch += 1
    return out[:steps]


def tokens_per_step(dataset, batches) -> list[int]:
    """Non-pad tokens (attention_mask ones) of each step's global batch."""
    return [sum(sum(dataset[i]["attention_mask"]) for mb in step for i in mb) for step in batches]
