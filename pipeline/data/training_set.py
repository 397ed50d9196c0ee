"""The training set of a run: `data.train` read through HF `datasets`, checked, tokenized in batches
ONCE per cache folder (pipeline.data.cache: one rank per node, or per job on a shared folder) and
memory-mapped by every rank, which then draws its micro-batches from it (pipeline.data.loader).

The rows keep today's rules: every row of every file is checked (pipeline.data.tasks `_check_row`,
pipeline.classification.rows `_check_row` and `encode_labels`), also past `data.limit`; the first
`data.limit` rows of the files, in order, are tokenized. A file in one of the project's own formats
(LLM-Adapters JSON/JSONL; labelled CSV/JSON/JSONL) that `datasets` cannot read, or whose rows fail
a check, is read again by the project's own parser, so the error names the file, row, line and
field exactly as before (and a file only that parser accepts is trained on as it reads it).

The cache key (the entry's spec) holds everything that changes the tokens: each source's
fingerprint (path, size, modification time; a hub dataset's cached revision), the tokenizer (its
`datasets` fingerprint without the folder it was loaded from), cutoff_len, train_on_inputs, the
prompt (generate_prompt's text and code) and the tokenization code, limit, and for a classifier
the class names in id order.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.fingerprint import Hasher

from pipeline.data import cache, sources
from pipeline.classification import rows as labelled_rows
from pipeline.data import tasks
from pipeline.data.loader import tokenize_labelled_batch
from pipeline.data.tasks import DataError, generate_prompt, tokenize_batch

FORMAT = 1  # the layout of an entry; bump when it changes
BATCH = 1000  # rows per tokenizer call and per Arrow record batch
TASK_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                   "attention_mask": datasets.List(datasets.Value("int8")),
                                   "labels": datasets.List(datasets.Value("int32"))})


class ArrowExamples(torch.utils.data.Dataset):
    """Tokenized examples memory-mapped from the cache: each a dict of lists (input_ids,
    attention_mask, labels; a classifier's labels are one class id), as TokenizedTasks gives them.
    `__getitems__` lets the DataLoader fetch a micro-batch in one read."""

    def __init__(self, table: datasets.Dataset, labelled: bool, entry: Path | None = None):
        self.table = table
        self.labelled = labelled  # which collate the loader uses (pipeline.data.loader.train_loader)
        self.entry = entry
        self._columns = table.column_names

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return self.table[int(i)]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        cols = self.table[[int(i) for i in indices]]
        return [dict(zip(self._columns, values)) for values in zip(*(cols[c] for c in self._columns))]


@dataclass(frozen=True)
class Plan:
    """What to tokenize: the sources in order, the settings that shape the tokens."""

    sources: tuple[sources.Source, ...]
    cutoff_len: int
    train_on_inputs: bool
    limit: int | None
    classes: tuple[str, ...] | None  # a classifier's class names in id order; None: LLM-Adapters records

    @classmethod
    def of(cls, data, classes: Sequence[str] | None = None) -> Plan:
        return cls(tuple(sources.parse(str(e)) for e in data.train), data.cutoff_len, data.train_on_inputs, data.limit,
                   tuple(classes) if classes else None)


def cache_folder(cfg) -> Path:
    """data.cache_dir, or <output_dir>/data-cache: on the disk every node shares, and shared by
    every run of that output_dir (a sweep tokenizes once)."""
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data-cache").resolve()


def training_dataset(cfg, tokenizer, classes: Sequence[str] | None, rank: int = 0, nodes=()) -> ArrowExamples:
    """This run's training examples (all ranks call it; see the module doc)."""
    plan = Plan.of(cfg.data, classes)
    folder = cache_folder(cfg)
    entry = cache.build_once(folder, lambda: spec(plan, tokenizer), lambda tmp: build(plan, tokenizer, tmp), rank,
                             nodes, lambda e, built, s: describe(plan, e, built, s))
    return ArrowExamples(cache.load(entry), labelled=plan.classes is not None, entry=entry)


def describe(plan: Plan, entry: Path, built: bool, seconds: float) -> str:
    what = ", ".join(str(s) for s in plan.sources)
    if built:
        return f"data: {what} tokenized in {seconds:.1f}s into {entry} (other ranks and later runs map it)"
    return f"data: {what} tokenized before, mapped from {entry}"


# ----------------------------------------------------------------------------- the key
def spec(plan: Plan, tokenizer) -> dict:
    """Everything that changes the tokens (the module doc); its hash names the cache entry."""
    code = [tokenize_batch, tasks._tokenize_many, generate_prompt, tokenize_labelled_batch, build, _task_fn,
            _labelled_fn]
    out = {
        "format": FORMAT,
        "sources": [sources.fingerprint(s) for s in plan.sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "cutoff_len": plan.cutoff_len,
        "limit": plan.limit,
        "code": hashlib.sha256("".join(_source_of(f) for f in code).encode()).hexdigest(),
    }
    if plan.classes is None:
        out["train_on_inputs"] = plan.train_on_inputs
        # the prompt as text too: the code hash alone would miss a change in what it reads
        out["prompt"] = hashlib.sha256((generate_prompt("\x01I", "\x01N", "\x01O") + "\x00" +
                                        generate_prompt("\x01I", None, "\x01O")).encode()).hexdigest()
    else:
        out["classes"] = list(plan.classes)
    return out


def _source_of(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return fn.__qualname__


def tokenizer_fingerprint(tokenizer) -> str:
    """`datasets`' hash of the tokenizer (vocabulary, merges, normalizer, special tokens, settings),
    without the folder it was loaded from: the same tokenizer in another folder is the same key."""
    try:
        bare = copy.copy(tokenizer)
        bare.init_kwargs = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}
        bare.name_or_path = ""
        return Hasher.hash(bare)
    except Exception:  # noqa: BLE001 -- an exotic tokenizer: its full hash (the folder included) is still a key
        return Hasher.hash(tokenizer)


# ----------------------------------------------------------------------------- the build
def build(plan: Plan, tokenizer, tmp: Path) -> int:
    """Check every row of every source, tokenize the first `limit` rows into tmp/part-*.arrow;
    returns the rows written."""
    scratch = tmp / "raw"  # datasets' Arrow copies of json/csv/parquet files: gone with the build folder
    left = plan.limit
    written = 0
    for j, source in enumerate(plan.sources):
        if plan.classes is None:
            rows, ids = checked_task_rows(source, scratch), None
        else:
            rows, ids = checked_labelled_rows(source, scratch, plan.classes)
        if left is not None:
            if left <= 0:
                continue  # checked, not trained on
            if left < len(rows):
                rows = rows.select(range(left))
            left -= len(rows)
        if plan.classes is None:
            fn, features = _task_fn(tokenizer, plan), TASK_FEATURES
        else:
            fn, features = _labelled_fn(tokenizer, plan, ids), _labelled_features(tokenizer, plan.cutoff_len)
        part = rows.map(fn, batched=True, batch_size=BATCH, with_indices=True, remove_columns=rows.column_names,
                        features=features, cache_file_name=str(tmp / f"part-{j:05d}.arrow"), load_from_cache_file=False,
                        new_fingerprint=f"tsd-part-{j}-{time.time_ns()}", writer_batch_size=BATCH)
        written += len(part)
        del part
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def _task_fn(tokenizer, plan: Plan):
    def fn(batch, indices):
        n = len(indices)
        inputs = batch["input"] if "input" in batch else [None] * n
        return tokenize_batch(tokenizer, batch["instruction"], inputs, batch["output"], plan.cutoff_len,
                              plan.train_on_inputs)
    return fn


def _labelled_fn(tokenizer, plan: Plan, ids: list[int]):
    def fn(batch, indices):
        n = len(indices)
        pairs = batch["text_pair"] if "text_pair" in batch else [None] * n
        return tokenize_labelled_batch(tokenizer, batch["text"], pairs, [ids[i] for i in indices], plan.cutoff_len)
    return fn


def _labelled_features(tokenizer, cutoff_len: int) -> datasets.Features:
    probe = tokenize_labelled_batch(tokenizer, ["a"], [None], [0], cutoff_len)
    small = {"attention_mask", "token_type_ids"}
    return datasets.Features({k: (datasets.Value("int64") if k == "labels" else
                                  datasets.List(datasets.Value("int8" if k in small else "int32"))) for k in probe})


# ----------------------------------------------------------------------------- checked rows
def checked_task_rows(source: sources.Source, scratch: Path) -> datasets.Dataset:
    """The LLM-Adapters records of `source`, every row checked as pipeline.data.tasks does."""

    def check(rows: datasets.Dataset) -> datasets.Dataset:
        if len(rows) == 0:
            raise DataError(f"{source}: contains no records")
        for i, row in enumerate(sources.iter_rows(rows)):
            tasks._check_row(row, f"{source}: row {i}", require_answer=True)
        return rows

    def own_parser() -> datasets.Dataset:
        records = tasks.load_records(source.entry)  # raises the exact error, if there is one
        return datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in ("instruction", "input", "output")})

    return _read_checked(source, scratch, tasks.is_own_format(source.entry), check, own_parser)


def checked_labelled_rows(source: sources.Source, scratch: Path,
                          classes: Sequence[str]) -> tuple[datasets.Dataset, list[int]]:
    """The text/label rows of `source`, checked as pipeline.classification.rows does, and their class ids."""

    def check(rows: datasets.Dataset) -> tuple[datasets.Dataset, list[int]]:
        if len(rows) == 0:
            raise DataError(f"{source}: contains no rows")
        checked, wheres = [], []
        for i, row in enumerate(sources.iter_rows(rows)):
            if source.format == "csv" and isinstance(row.get("label"), str):  # every cell is text, as in the CSV reader
                row["label"] = labelled_rows._csv_label(row["label"])
            wheres.append(f"{source}: row {i}")
            checked.append({"label": labelled_rows._check_row(row, wheres[-1])["label"]})
        labelled_rows._check_one_label_kind(Path(source.entry), checked, wheres)
        return rows, labelled_rows.encode_labels(checked, classes, source=source.entry)

    def own_parser() -> tuple[datasets.Dataset, list[int]]:
        records = labelled_rows.load_labelled(source.entry)  # raises the exact error, if there is one
        ids = labelled_rows.encode_labels(records, classes, source=source.entry)
        return datasets.Dataset.from_dict({"text": [r["text"] for r in records],
                                           "text_pair": [r["text_pair"] for r in records]}), ids

    return _read_checked(source, scratch, labelled_rows.is_own_format(source.entry), check, own_parser)


def _read_checked(source: sources.Source, scratch: Path, own: bool, check, own_parser):
    """`check(rows)` of the rows `datasets` reads from `source`. A file in one of the project's own
    formats that `datasets` cannot read, or whose rows fail a check, goes to `own_parser()`, so the
    error names file, row, line and field as before; any other source's failure is one DataError."""
    try:
        return check(sources.read(source, scratch))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- the project's own parser names the problem, or reads the file
        if own:
            return own_parser()
        if isinstance(e, DataError):
            raise
        raise DataError(f"{source}: cannot be read as {source.format} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
