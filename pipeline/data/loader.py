"""The training data as a `DataLoader`, sharded over the ranks by a `DistributedSampler`, and able
to start part-way through an epoch when a run resumes.

Training reads its examples from pipeline.data.training_set (tokenized once per node into a
memory-mapped Arrow cache). `TokenizedTasks` and `TokenizedLabelled` here are the same examples
built in this process's memory, one row at a time: the reference the tests compare the cache
with, and what single-process tools (benchmarks/peers) use on small data.

Every rank draws the same seeded shuffle of the whole set for an epoch (seed + epoch) and takes
every world-th example of it, so the shards are disjoint and the order is reproducible; the tail
that would give ranks unequal shares is dropped, and so is a last micro-batch that is not full.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import DataConfig
from pipeline.data.tasks import collate, load_many, tokenize_example


class TokenizedTasks(Dataset):
    """The training records of `data.train` (first `data.limit`), tokenized with the harness's
    prompt. Built once per process: the loader's epochs reuse it."""

    def __init__(self, data: DataConfig, tokenizer):
        records = load_many(data.train)
        if data.limit:
            records = records[: data.limit]
        self.examples = [tokenize_example(tokenizer, r, cutoff_len=data.cutoff_len,
                                          train_on_inputs=data.train_on_inputs) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def class_names(data: DataConfig, num_labels: int | None = None) -> list[str]:
    """The classes of a seq_cls run, in id order: those of data.train (pipeline.classification.rows),
    or `num_labels` ids when the config fixes more classes than the training rows show."""
    from pipeline.classification.rows import label_names, load_labelled

    records = [r for path in data.train for r in load_labelled(path)]
    names = label_names(records, source=", ".join(data.train))
    if num_labels is not None:
        if num_labels < len(names):
            raise ValueError(f"model.num_labels: {num_labels}, but data.train has {len(names)} classes ({', '.join(names)})")
        if any(not n.isdigit() for n in names) and num_labels != len(names):
            raise ValueError(f"model.num_labels: {num_labels}, but data.train names {len(names)} classes "
                             f"({', '.join(names)}); extra classes need integer labels")
        names = names + [str(i) for i in range(len(names), num_labels)]
    return names


def tokenize_labelled(tokenizer, record: dict, label: int, cutoff_len: int) -> dict:
    """One classification example: the text (and its pair, as the tokenizer joins sentence pairs,
    e.g. BERT's [SEP] and token types), truncated to `cutoff_len` tokens, and its class id."""
    enc = tokenizer(record["text"], record.get("text_pair") or None, truncation=True, max_length=cutoff_len,
                    padding=False, return_tensors=None)
    example = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    example["labels"] = label
    return example


def tokenize_labelled_batch(tokenizer, texts: list[str], pairs: list[str | None], labels: list[int],
                            cutoff_len: int) -> dict[str, list]:
    """`tokenize_labelled` over many rows in at most two tokenizer calls (the rows without a pair,
    then those with one): the same tokens, row for row, in the rows' order."""
    pairs = [p or None for p in pairs]
    rows: list[dict] = [{} for _ in texts]
    for with_pair in (False, True):
        idx = [i for i, p in enumerate(pairs) if (p is not None) == with_pair]
        if not idx:
            continue
        enc = tokenizer([texts[i] for i in idx], [pairs[i] for i in idx] if with_pair else None, truncation=True,
                        max_length=cutoff_len, padding=False, return_tensors=None)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for j, i in enumerate(idx):
            rows[i] = {k: list(enc[k][j]) for k in keys}
    out = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    out["labels"] = list(labels)
    return out


class TokenizedLabelled(Dataset):
    """The text/label rows of `data.train` (first `data.limit`), tokenized, labels as class ids
    of `names`. The seq_cls counterpart of TokenizedTasks; batch with `collate_labelled`."""

    labelled = True  # which collate train_loader uses

    def __init__(self, data: DataConfig, tokenizer, names: list[str]):
        from pipeline.classification.rows import encode_labels, load_labelled

        self.examples = []
        for path in data.train:
            records = load_labelled(path)
            labels = encode_labels(records, names, source=path)
            self.examples += [tokenize_labelled(tokenizer, r, y, data.cutoff_len) for r, y in zip(records, labels)]
        if data.limit:
            self.examples = self.examples[: data.limit]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate_labelled(batch: list[dict], pad_id: int) -> dict:
    """Right-pad classification examples: input_ids with `pad_id`, attention_mask and
    token_type_ids with 0; labels are one class id per row."""
    width = max(len(ex["input_ids"]) for ex in batch)
    out: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in batch[0]:
            out[key] = torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in batch], dtype=torch.long)
    out["labels"] = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
    return out


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` whose next epoch can begin after the micro-batches a checkpoint
    already trained on: the skipped examples are never tokenized, collated or run again."""

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int, micro_batch_size: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.micro_batch_size = micro_batch_size
        self._skip = 0

    def start_at(self, epoch: int, micro_batches_done: int) -> None:
        """The next iteration is epoch `epoch`, without its first `micro_batches_done` micro-batches."""
        self.set_epoch(epoch)
        self._skip = micro_batches_done * self.micro_batch_size

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())[self._skip:]
        self._skip = 0  # only the first epoch after a resume is partial
        return iter(order)


def micro_batches_per_epoch(n_examples: int, world: int, micro_batch_size: int) -> int:
    """Full micro-batches one rank gets from an epoch (the loader drops partial ones)."""
    return n_examples // world // micro_batch_size


def train_loader(dataset: Dataset, rank: int, world: int, seed: int, micro_batch_size: int,
                 pad_id: int) -> DataLoader:
    """This rank's micro-batches; call `loader.sampler.start_at(epoch, done)` before each epoch."""
    batch = collate_labelled if getattr(dataset, "labelled", False) else collate
    sampler = ResumableSampler(dataset, rank, world, seed, micro_batch_size)
    # A generator of its own: each `iter(loader)` draws a seed from it, which would otherwise come
    # from the global RNG and shift dropout's stream differently in a resumed run.
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=True,
                      collate_fn=partial(batch, pad_id=pad_id), generator=torch.Generator().manual_seed(seed))
