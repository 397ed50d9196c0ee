"""The real tasks inside PyPI packages (evals, bigbench), as LLM-Adapters records or labelled
text/label rows: each task's parser (its source file's layout), formatter (the harness's prompt)
and the seeded splits that make train and test disjoint and reproducible (DATA.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable


# ----------------------------------------------------------------------------- splits
def resolve_test_size(test_size: int | float, n: int) -> int:
    """`test_size` as a row count: an int is a count, a float a fraction of n (0 < f < 1); at
    least one row must be left on each side."""
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size: a float is a fraction and must be in (0, 1), got {test_size}")
        k = max(1, round(n * test_size))
    elif isinstance(test_size, int) and not isinstance(test_size, bool):
        k = test_size
    else:
        raise ValueError(f"test_size must be a count (int) or a fraction (float), got {test_size!r}")
    if not 1 <= k < n:
        raise ValueError(f"test_size {test_size!r} gives {k} test rows out of {n}: need 1 <= test rows < {n}")
    return k


def split_ids(ids: list[str], test_size: int | float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded, deterministic, disjoint train/test split of unique ids.

    Ids are ordered by sha256(f"{seed}:{id}") and the first `test_size` go to test. The result
    depends only on the set of ids and the seed (not on their order, the platform or the
    Python version), and for a fixed seed a smaller test_size gives a subset of the larger
    one's test ids. Both lists come back in that (seeded, shuffled) order.
    """
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"split_ids: ids must be unique ({dup!r} repeats)")
    k = resolve_test_size(test_size, len(ids))
    order = sorted(ids, key=lambda i: (hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i))
    return order[k:], order[:k]


def split_records(records: list[dict], test_size: int | float, seed: int, id_key: str = "id",
                  group_key: str | None = None) -> tuple[list[dict], list[dict]]:
    """`split_ids` applied to records carrying a unique `id_key`. With `group_key`, whole groups
    (rows sharing that field's value) are split instead, `test_size` counting groups: no group
    has rows on both sides."""
    by_id = {r[id_key]: r for r in records}
    if len(by_id) != len(records):
        raise ValueError(f"split_records: '{id_key}' values are not unique")
    if group_key is None:
        train, test = split_ids(list(by_id), test_size, seed)
        return [by_id[i] for i in train], [by_id[i] for i in test]
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r[group_key]), []).append(r)
    train_g, test_g = split_ids(list(groups), test_size, seed)
    return [r for g in train_g for r in groups[g]], [r for g in test_g for r in groups[g]]


# ----------------------------------------------------------------------------- task sources
@dataclass(frozen=True)
class Source:
    package: str
    member: str
    no_binary: bool = False
    direct_url_deps: bool = False
    note: str = ""


@dataclass(frozen=True)
class Item:
    """One parsed source row: a question, its options (or none for true/false) and the label."""

    index: int  # 0-based row index in the source file
    question: str
    options: tuple[str, ...]
    label: str  # the answer token: "answer2", "option1", "true", ...


EVALS = "evals==3.0.1.post1"
BIGBENCH = "bigbench==1.0.0"
_SIQA_RE = re.compile(r"^(?P<q>.*) A: (?P<a>.*?); B: (?P<b>.*?); C: (?P<c>.*)\.$", re.S)
_QUARTZ_RE = re.compile(r"^(?P<q>.*?)\n\n A: (?P<a>[^\n]*)\n B: (?P<b>[^\n]*)$", re.S)


def _jsonl(data: bytes) -> list[tuple[int, dict]]:
    return [(i, json.loads(line)) for i, line in enumerate(data.decode("utf-8").splitlines()) if line.strip()]


def _parse_siqa(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, row in _jsonl(data):
        m = _SIQA_RE.match(row["input"][-1]["content"].strip())
        ideal = str(row.get("ideal", "")).strip()
        if not m or ideal not in ("A", "B", "C"):
            bad.append(i)
            continue
        opts = tuple(m.group(k).strip() for k in "abc")
        items.append(Item(i, m.group("q").strip(), opts, f"answer{'ABC'.index(ideal) + 1}"))
    return items, bad


def _parse_quartz(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, row in _jsonl(data):
        m = _QUARTZ_RE.match(row["input"][-1]["content"].strip())
        ideal = str(row.get("ideal", "")).strip()
        if not m or ideal not in ("A", "B"):
            bad.append(i)
            continue
        items.append(Item(i, m.group("q").strip(), (m.group("a").strip(), m.group("b").strip()), f"option{'AB'.index(ideal) + 1}"))
    return items, bad


def _parse_strategyqa(data: bytes) -> tuple[list[Item], list[int]]:
    items, bad = [], []
    for i, ex in enumerate(json.loads(data.decode("utf-8"))["examples"]):
        scores = ex.get("target_scores") or {}
        q = str(ex.get("input", "")).strip()
        if not q or sorted(scores) != ["No", "Yes"] or sorted(scores.values()) != [0, 1]:
            bad.append(i)
            continue
        items.append(Item(i, q, (), "true" if scores["Yes"] == 1 else "false"))
    return items, bad


# Instruction texts. social_i_qa is LLM-Adapters' own template (dataset/social_i_qa/*.json);
# strategyqa uses LLM-Adapters' BoolQ template; quartz follows the WinoGrande layout (options
# and the answer-format line on one line). The last "Answer format: ..." text names the family.
def _fmt_siqa(it: Item) -> str:
    a, b, c = it.options
    return (
        f"Please choose the correct answer to the question: {it.question}\n\n"
        f"Answer1: {a} Answer2: {b} Answer3: {c}\n\nAnswer format: answer1/answer2/answer3"
    )


def _fmt_quartz(it: Item) -> str:
    a, b = it.options
    return (
        "Please choose the correct answer to complete the given sentence or answer the question: "
        f"{it.question}\n\nOption1: {a} Option2: {b} Answer format: option1/option2"
    )


def _fmt_boolq(it: Item) -> str:
    return f"Please answer the following question with true or false, question: {it.question}\n\nAnswer format: true/false"


@dataclass(frozen=True)
class TaskSpec:
    source: Source
    parse: Callable[[bytes], tuple[list[Item], list[int]]]
    instruction: Callable[[Item], str]


TASKS: dict[str, TaskSpec] = {
    "social_i_qa": TaskSpec(Source(EVALS, "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"), _parse_siqa, _fmt_siqa),
    "quartz": TaskSpec(Source(EVALS, "evals/registry/data/quartz/samples.jsonl"), _parse_quartz, _fmt_quartz),
    "strategyqa": TaskSpec(
        Source(BIGBENCH, "bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json", no_binary=True,
               direct_url_deps=True, note="BIG-bench canary: do not republish this data"),
        _parse_strategyqa,
        _fmt_boolq,
    ),
}
_USER_ONLY = ("boolq", "piqa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")


def build_task_records(task: str, items: list[Item]) -> tuple[list[dict], dict]:
    """LLM-Adapters records (with a stable `id`) from parsed items. Rows repeating the same
    instruction are merged (kept once if they agree, dropped entirely if their labels conflict),
    so a question can never sit on both sides of a split."""
    spec = TASKS[task]
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(spec.instruction(it), []).append(it)
    records, dup, conflict = [], [], []
    for inst, its in groups.items():
        if len({it.label for it in its}) > 1:
            conflict.extend(it.index for it in its)
            continue
        dup.extend(it.index for it in its[1:])
        it = its[0]
        records.append({
            "id": f"{task}-{it.index:05d}",
            "instruction": inst,
            "input": "",
            "output": f"the correct answer is {it.label}",
            "answer": it.label,
        })
    records.sort(key=lambda r: r["id"])
    return records, {"duplicates_dropped": sorted(dup), "conflicting_dropped": sorted(conflict)}


# ----------------------------------------------------------------------------- classification sources
# Tasks for model.task seq_cls: rows {"id", "text", "label" (class id), optional "text_pair"}
# in pipeline.classification.rows's layout, with the class names in meta.json's "labels".
@dataclass(frozen=True)
class LabelledItem:
    """One parsed source row of a classification task."""

    index: int  # 0-based row index in the source file
    text: str
    text_pair: str | None
    label: int  # class id: an index into the task's `labels`


def _parse_sarcasm(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """The evals sarcasm rows: a system prompt ("Respond with only a 1 or 0 to signify if the
    user's message includes sarcasm"), the headline as the one user message, `ideal` "1"
    (sarcastic) or "0"."""
    items, bad = [], []
    for i, row in _jsonl(data):
        users = [m.get("content") for m in row.get("input", []) if isinstance(m, dict) and m.get("role") == "user"]
        ideal = str(row.get("ideal", "")).strip()
        if len(users) != 1 or not isinstance(users[0], str) or not users[0].strip() or ideal not in ("0", "1"):
            bad.append(i)
            continue
        items.append(LabelledItem(i, users[0].strip(), None, int(ideal)))
    return items, bad


# WinoWhy inputs are a Winograd sentence followed by one claim about it: "<sentence> The 'they'
# refers to the city councilmen because <reason>". The claim is the first "The '<pronoun>'
# refers to" (it occurs once per input).
_WINOWHY_RE = re.compile(r"^(?P<sentence>.*?)\s+(?P<claim>The '[^']+' refers to .+? because .*)$", re.S)


def _parse_winowhy(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """BIG-bench winowhy: is the reason given for a pronoun's referent correct? The sentence is
    `text` and the claim (referent + reason) `text_pair`, so a pair encoder sees the sentence and
    the explanation as its two segments; label 1 = correct (target_scores "correct": 1).

    The 2,865 rows are 271 sentences with ~10 human-written reasons each (right and wrong ones
    for the same sentence): a row split puts every sentence on both sides with different reasons.
    """
    items, bad = [], []
    for i, ex in enumerate(json.loads(data.decode("utf-8"))["examples"]):
        m = _WINOWHY_RE.match(str(ex.get("input", "")).strip())
        scores = ex.get("target_scores") or {}
        if not m or sorted(scores) != ["correct", "incorrect"] or sorted(scores.values()) != [0, 1]:
            bad.append(i)
            continue
        items.append(LabelledItem(i, m.group("sentence").strip(), m.group("claim").strip(), scores["correct"]))
    return items, bad


def _parse_quartz_cls(data: bytes) -> tuple[list[LabelledItem], list[int]]:
    """QuaRTz as two-choice classification: the question, then "A: <option> B: <option>" as the
    pair; label 0 = A, 1 = B. The same rows as the `quartz` task (parsed by _parse_quartz)."""
    items, bad = _parse_quartz(data)
    return [LabelledItem(it.index, it.question, f"A: {it.options[0]} B: {it.options[1]}",
                         ("option1", "option2").index(it.label)) for it in items], bad


@dataclass(frozen=True)
class ClsTaskSpec:
    source: Source
    parse: Callable[[bytes], tuple[list[LabelledItem], list[int]]]
    labels: tuple[str, ...]  # class names in id order
    # Row ids are f"{id_prefix}-{source row:05d}". quartz_cls takes quartz's prefix: the same
    # usable rows then get the same ids, so for a seed both tasks test on the same questions.
    id_prefix: str | None = None
    note: str = ""  # what a user of the split should know about the data (written to meta.json)
    # Split whole groups of rows sharing this field (test_size then counts groups), when rows of
    # one group would leak the answer across the split.
    split_by: str | None = None


CLS_TASKS: dict[str, ClsTaskSpec] = {
    "sarcasm": ClsTaskSpec(Source(EVALS, "evals/registry/data/sarcasm/samples.jsonl"), _parse_sarcasm,
                           ("not_sarcastic", "sarcastic")),
    "winowhy": ClsTaskSpec(
        Source(BIGBENCH, "bigbench-1.0.0/bigbench/benchmark_tasks/winowhy/task.json", no_binary=True,
               direct_url_deps=True, note="BIG-bench canary: do not republish this data"),
        _parse_winowhy,
        ("incorrect", "correct"),
        note="271 Winograd sentences with ~10 reasons each: split by sentence (test_size counts sentences), "
             "so no test sentence occurs in train with other reasons",
        split_by="text",
    ),
    "quartz_cls": ClsTaskSpec(TASKS["quartz"].source, _parse_quartz_cls, ("A", "B"), id_prefix="quartz"),
}


def build_cls_records(task: str, items: list[LabelledItem]) -> tuple[list[dict], dict]:
    """Labelled rows (with a stable `id`) from parsed items. Rows repeating the same text (and
    pair) are merged as in build_task_records: kept once if their labels agree, dropped entirely
    if they conflict, so no text sits on both sides of a split or under two labels."""
    prefix = CLS_TASKS[task].id_prefix or task
    groups: dict[tuple[str, str | None], list[LabelledItem]] = {}
    for it in items:
        groups.setdefault((it.text, it.text_pair), []).append(it)
    records, dup, conflict = [], [], []
    for its in groups.values():
        if len({it.label for it in its}) > 1:
            conflict.extend(it.index for it in its)
            continue
        dup.extend(it.index for it in its[1:])
        it = its[0]
        row = {"id": f"{prefix}-{it.index:05d}", "text": it.text, "label": it.label}
        if it.text_pair is not None:
            row["text_pair"] = it.text_pair
        records.append(row)
    records.sort(key=lambda r: r["id"])
    return records, {"duplicates_dropped": sorted(dup), "conflicting_dropped": sorted(conflict)}


