"""Fetch and convert the real model and the real task data into the cache folder.

Nothing here is committed: every download and every derived file lives under the cache folder
(`cache_dir` argument, else $TSD_CACHE, else `<repo>/.cache`, git-ignored). See DATA.md.

  prepare_model()           pipeline.data.packaged_models (SmolLM2-135M, all-MiniLM-L6-v2)
  prepare_data(task)        social_i_qa / quartz (evals==3.0.1.post1 wheel), strategyqa
                            (bigbench==1.0.0 sdist) -> LLM-Adapters train/test JSON + meta JSON;
                            sarcasm / quartz_cls (evals wheel), winowhy (bigbench sdist) ->
                            labelled text/label train/test JSON + meta JSON (model.task seq_cls)
  prepare_user_file(path)   checks a user's LLM-Adapters file (e.g. commonsense_170k.json) or a
                            labelled text/label file (pipeline.classification.rows)

Every step is idempotent and every write is atomic (temp file or folder, then rename), so an
interrupted run never leaves something that looks complete.
"""


from __future__ import annotations

import json
import hashlib
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.logs import log
from pipeline.classification.rows import label_names, load_labelled, write_labelled
from pipeline.data.packages import _atomic_write_json, _read_member, cache_root, pip_download, sha256_file
from pipeline.data.task_packages import (CLS_TASKS, TASKS, _USER_ONLY, build_cls_records, build_task_records,
                                         resolve_test_size, split_records)
from pipeline.data.tasks import (
    DataError,
    answer_format,
    answer_format_from_instruction,
    load_records,
    write_records,
)


# ----------------------------------------------------------------------------- data
def _fmt_size(x) -> str:
    return str(x).replace(".", "p")


def prepare_data(
    task: str,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    test_size: int | float = 0.2,
    limit: int | None = None,
    test_limit: int | None = None,
    force: bool = False,
) -> dict:
    """Real task files with a seeded disjoint train/test split.

    LLM-Adapters format (model.task causal_lm): social_i_qa (Social-IQa, 3 options), quartz
    (2 options), strategyqa (true/false). Labelled text/label rows (model.task seq_cls, read with
    pipeline.classification.rows): sarcasm (headlines, binary), winowhy (is a Winograd reason correct,
    sentence pairs), quartz_cls (QuaRTz's two options as classes A/B).

    `test_size` is a count or a fraction of the usable rows. `limit` caps the train file (and,
    unless `test_limit` is given, the test file) for demos: the capped files are prefixes of
    the full seeded split, so a capped test set never overlaps the full training set.

    Returns {"train": Path, "test": Path, "meta": Path} under
    <cache>/data/<task>/seed<seed>-test<test_size>[-limit<N>[-<M>]]/. The meta JSON records the
    seed, counts, source package/file and sha256s, dropped rows and the ids of each split; for a
    seq_cls task also "task_type": "seq_cls" and "labels", the class names in id order.
    """
    _check_task_arguments(task, test_size, limit, test_limit)
    if test_limit is None:
        test_limit = limit
    spec = TASKS.get(task) or CLS_TASKS[task]
    root = cache_root(cache_dir)
    out_dir = root / "data" / task / _split_tag(seed, test_size, limit, test_limit)
    paths = {"train": out_dir / "train.json", "test": out_dir / "test.json", "meta": out_dir / "meta.json"}
    ready = None if force else _ready_split(paths, (task, seed, test_size, limit, test_limit,
                                                    getattr(spec, "split_by", None)))
    if ready is not None:
        log(f"{task}: ready ({ready['counts']['train']} train / {ready['counts']['test']} test) in {out_dir}")
        return paths

    t0 = time.time()
    archive, data = _source_bytes(task, spec.source, root)
    items, unparseable = spec.parse(data)
    records, dropped = (build_cls_records if task in CLS_TASKS else build_task_records)(task, items)
    split_by = getattr(spec, "split_by", None)
    train_full, test_full = split_records(records, test_size, seed, group_key=split_by)
    train = train_full[:limit] if limit is not None else train_full
    test = test_full[:test_limit] if test_limit is not None else test_full

    write = write_labelled if task in CLS_TASKS else write_records
    write(paths["train"], train)
    write(paths["test"], test)
    meta = {
        "task": task,
        **_task_kind(task),
        "seed": seed,
        "test_size": test_size,
        "limit": limit,
        "test_limit": test_limit,
        "split_method": "ids ordered by sha256(f'{seed}:{id}'); the first n_test are test, the rest train; "
                        "limit keeps a prefix of each" + (f"; whole groups of equal '{split_by}' are split, "
                                                          f"n_test counting groups" if split_by else ""),
        "split_by": split_by,
        "source": _source_record(spec.source, archive, data),
        "counts": _split_counts(len(items) + len(unparseable), unparseable, dropped, records, train_full, test_full,
                                train, test, _tally(task)),
        "dropped_source_rows": {"unparseable": unparseable, **dropped},
        "splits": {"train": [r["id"] for r in train], "test": [r["id"] for r in test]},
        "files": {k: {"path": paths[k].name, "sha256": sha256_file(paths[k])} for k in ("train", "test")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write_json(paths["meta"], meta)
    c = meta["counts"]
    log(f"{task}: {c['source_rows']} source rows -> {c['usable']} usable ({c['unparseable']} unparseable, "
        f"{c['duplicates_dropped']} duplicate, {c['conflicting_dropped']} conflicting dropped); "
        f"{c['train']} train / {c['test']} test in {time.time() - t0:.1f}s -> {out_dir}")
    return paths


def _source_bytes(task: str, source, root: Path) -> tuple[Path, bytes]:
    """The task's package (downloaded once into the cache) and the bytes of its source file."""
    archive = pip_download(source.package, root / "downloads", no_binary=source.no_binary,
                           direct_url_deps=source.direct_url_deps)
    log(f"{task}: reading {source.member} from {archive.name}")
    return archive, _read_member(archive, source.member)


def _split_tag(seed: int, test_size, limit: int | None, test_limit: int | None) -> str:
    """The split's folder name: what makes it (seed, test size, the limits)."""
    tag = f"seed{seed}-test{_fmt_size(test_size)}"
    if limit is not None or test_limit is not None:
        tag += f"-limit{limit if limit is not None else 'all'}"
        if test_limit != limit:
            tag += f"-{test_limit}"
    return tag


def _source_record(source, archive: Path, data: bytes) -> dict:
    """Where the rows came from, with the checksums that pin it (meta.json's "source")."""
    return {"package": source.package, "archive": archive.name, "archive_sha256": sha256_file(archive),
            "member": source.member, "member_sha256": hashlib.sha256(data).hexdigest(), "note": source.note}


def _task_kind(task: str) -> dict:
    """meta.json's word on what the rows are: an answer family (LLM-Adapters rows, as before
    classification existed) or "task_type": "seq_cls" with the class names in id order."""
    if task in CLS_TASKS:
        spec = CLS_TASKS[task]
        return {"task_type": "seq_cls", "labels": list(spec.labels), **({"note": spec.note} if spec.note else {})}
    return {"answer_format": answer_format(task)}


def _tally(task: str) -> tuple[str, Callable[[dict], str]]:
    """What the counts tally per split: answers of LLM-Adapters rows, class names of labelled ones."""
    if task in CLS_TASKS:
        names = CLS_TASKS[task].labels
        return "labels", lambda r: names[r["label"]]
    return "answers", lambda r: r["answer"]


def _check_task_arguments(task: str, test_size, limit, test_limit) -> None:
    """Refuse an unknown task or bad sizes before anything is downloaded."""
    if task not in TASKS and task not in CLS_TASKS:
        hint = ""
        if task in _USER_ONLY or task.lower() in {t.lower() for t in _USER_ONLY}:
            hint = (f" ({task} ships in no reachable package: get the LLM-Adapters file and check it "
                    "with prepare_user_file)")
        raise ValueError(f"unknown task {task!r}: prepare_data builds {', '.join(TASKS)} (LLM-Adapters format) "
                         f"and {', '.join(CLS_TASKS)} (text/label rows for model.task seq_cls){hint}")
    for name, v in (("limit", limit), ("test_limit", test_limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    resolve_test_size(test_size, 10**9)  # type/range check


def _ready_split(paths: dict, settings: tuple) -> dict | None:
    """The meta of a split already built with these settings whose files still match their
    sha256s; None when it must be (re)built."""
    if not paths["meta"].is_file():
        return None
    try:
        meta = json.loads(paths["meta"].read_text())
        files_ok = all(paths[k].is_file() and sha256_file(paths[k]) == meta["files"][k]["sha256"]
                       for k in ("train", "test"))
        same = (meta["task"], meta["seed"], meta["test_size"], meta["limit"], meta["test_limit"],
                meta.get("split_by")) == settings
    except (ValueError, KeyError, TypeError):
        return None
    return meta if files_ok and same else None


def _split_counts(n_source: int, unparseable: list, dropped: dict, records: list, train_full: list,
                  test_full: list, train: list, test: list, tally: tuple[str, Callable[[dict], str]]) -> dict:
    name, key = tally
    return {
        "source_rows": n_source,
        "unparseable": len(unparseable),
        "duplicates_dropped": len(dropped["duplicates_dropped"]),
        "conflicting_dropped": len(dropped["conflicting_dropped"]),
        "usable": len(records),
        "train_full": len(train_full),
        "test_full": len(test_full),
        "train": len(train),
        "test": len(test),
        f"train_{name}": dict(sorted(Counter(key(r) for r in train).items())),
        f"test_{name}": dict(sorted(Counter(key(r) for r in test).items())),
    }


def prepare_user_file(path: str | Path, task: str | None = None, task_type: str | None = None) -> dict:
    """Check a user-supplied data file and leave it unchanged.

    `task_type` "causal_lm": an LLM-Adapters file (e.g. commonsense_170k.json, boolq/test.json).
    Every row must be well formed (DataError names the row and field) and carry an answer
    family: `task`'s, or else the one its instruction's "Answer format:" text names. Returns
    {"path", "rows", "sha256", "task_type", "answer_formats": {family: rows}}.

    `task_type` "seq_cls": a labelled text/label file (CSV, JSON or JSONL; pipeline.classification.rows)
    with at least two classes. Returns {"path", "rows", "sha256", "task_type", "labels": class
    names in id order, "label_counts": {name: rows}, "pairs": rows with a text_pair}.

    `task_type` None: a .csv file, or a JSON file whose first row has `text` and `label` and no
    `instruction`, is a labelled file; anything else an LLM-Adapters file.
    """
    p = Path(path).expanduser().resolve()
    if task_type is None:
        task_type = "seq_cls" if _looks_labelled(p) else "causal_lm"
    if task_type == "seq_cls":
        if task is not None:
            raise ValueError(f"prepare_user_file: task= names an answer family of LLM-Adapters files; "
                             f"a labelled (seq_cls) file has none, got task={task!r}")
        return _check_labelled_file(p)
    if task_type != "causal_lm":
        raise ValueError(f"prepare_user_file: task_type must be 'causal_lm' or 'seq_cls', got {task_type!r}")
    records = load_records(p)
    fam_task = answer_format(task) if task else None
    formats: Counter = Counter()
    for i, r in enumerate(records):
        fam = fam_task or answer_format_from_instruction(r["instruction"])
        if fam is None:
            raise DataError(f"{p}: row {i}: field 'instruction' names no answer format "
                            "(no 'Answer format: ...' text); pass task= to say which family it is")
        formats[fam] += 1
    out = {"path": p, "rows": len(records), "sha256": sha256_file(p), "task_type": "causal_lm",
           "answer_formats": dict(sorted(formats.items()))}
    log(f"{p.name}: {len(records)} rows OK; answer formats {out['answer_formats']}")
    return out


def _looks_labelled(p: Path) -> bool:
    """Whether a file is text/label rows, judged from its name or its first JSON row only (a
    170k-row LLM-Adapters file is not parsed twice). Unreadable files say no: load_records then
    reports what is wrong with them."""
    if p.suffix.lower() == ".csv":
        return True
    try:
        with open(p, encoding="utf-8-sig") as f:
            head = f.read(1 << 16).lstrip()
        if head.startswith("["):
            head = head[1:].lstrip()
        first, _ = json.JSONDecoder().raw_decode(head)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(first, dict) and "text" in first and "label" in first and "instruction" not in first


def _check_labelled_file(p: Path) -> dict:
    records = load_labelled(p)
    names = label_names(records, source=str(p))
    counts = Counter(names[r["label"]] if isinstance(r["label"], int) else r["label"] for r in records)
    out = {"path": p, "rows": len(records), "sha256": sha256_file(p), "task_type": "seq_cls", "labels": names,
           "label_counts": {n: counts.get(n, 0) for n in names},
           "pairs": sum(r["text_pair"] is not None for r in records)}
    log(f"{p.name}: {len(records)} labelled rows OK; {len(names)} classes {out['label_counts']}"
        + (f"; {out['pairs']} sentence pairs" if out["pairs"] else ""))
    return out
