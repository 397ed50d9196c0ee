"""Task data in the LLM-Adapters format: loading, the harness's prompts, tokenization, answers.

Records are JSON objects with `instruction`, `input` (optional), `output` and `answer`, stored
either as one JSON list (what LLM-Adapters ships, e.g. commonsense_170k.json) or as JSONL, which
this module parses itself (its checks and messages name the file, row, line and field); the same
columns in a .csv or .parquet file, a `save_to_disk` folder or a hub dataset are read through HF
`datasets` (pipeline.data.sources) and checked by the same row rules.

The prompt text, the tokenization convention and the answer extraction reproduce the harness
the paper used: LLM-Adapters' finetune.py / commonsense_evaluate.py, as carried in the
reference repository (Chongjie-Si/Subspace-Tuning, CR_MR/). Two details of that harness are
kept on purpose because they change what the model sees:

* the TRAINING prompt (finetune.py) and the EVALUATION prompt (commonsense_evaluate.py) are not
  the same string: the training one has trailing spaces after the first sentence and
  16-space "blank" lines, the evaluation one has truly empty lines and ends in 16 spaces.
  `generate_prompt` is the training text, `generate_eval_prompt` the evaluation text.
* the evaluation script never passes `input` (it calls generate_prompt(instruction, None)),
  so at evaluation time the no-input template is used for every commonsense task.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import DataError  # noqa: F401 -- raised here, and imported from here by callers

IGNORE_INDEX = -100  # label value the loss ignores (prompt tokens when train_on_inputs=False)


# ----------------------------------------------------------------------------- prompts
_PAD = " " * 16  # the harness's f-strings are indented by 16 spaces inside the function body

_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_HEAD_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def generate_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """The training prompt of LLM-Adapters' finetune.py, character for character.

    `output=None` gives the prompt with an empty response: the "user prompt" the harness
    tokenizes to find how many tokens to mask when train_on_inputs is False.
    """
    out = "" if output is None else output
    if input:
        return (
            f"{_HEAD_INPUT} \n\n"
            f"{_PAD}### Instruction:\n{_PAD}{instruction}\n{_PAD}\n"
            f"{_PAD}### Input:\n{_PAD}{input}\n{_PAD}\n"
            f"{_PAD}### Response:\n{_PAD}{out}"
        )
    return (
        f"{_HEAD_NO_INPUT}  \n\n"
        f"{_PAD}### Instruction:\n{_PAD}{instruction}\n{_PAD}\n"
        f"{_PAD}### Response:\n{_PAD}{out}"
    )


def generate_eval_prompt(instruction: str, input: str | None = None) -> str:
    """The evaluation prompt of LLM-Adapters' commonsense_evaluate.py, character for character.

    Note: that script calls it without `input`; pass `input` only to mirror other harnesses.
    """
    if input:
        return (
            f"{_HEAD_INPUT}\n\n"
            f"{_PAD}### Instruction:\n{_PAD}{instruction}\n\n"
            f"{_PAD}### Input:\n{_PAD}{input}\n\n"
            f"{_PAD}### Response:\n{_PAD}"
        )
    return (
        f"{_HEAD_NO_INPUT} \n\n"
        f"{_PAD}### Instruction:\n{_PAD}{instruction}\n\n"
        f"{_PAD}### Response:\n{_PAD}"
    )


def response_text(decoded: str) -> str:
    """What the harness scores: the decoded sequence after the last "### Response:", stripped
    (the reference code's `o.split("### Response:")[-1].strip()`)."""
    return decoded.split("### Response:")[-1].strip()


# ----------------------------------------------------------------------------- answers
# Answer families: the harness's regex for each (commonsense_evaluate.py, extract_answer).
ANSWER_PATTERNS: dict[str, str] = {
    "truefalse": r"true|false",
    "solution": r"solution1|solution2",
    "answer": r"answer1|answer2|answer3|answer4|answer5",
    "ending": r"ending1|ending2|ending3|ending4",
    "option": r"option1|option2",
}
_COMPILED = {k: re.compile(v) for k, v in ANSWER_PATTERNS.items()}

# Task name -> answer family. The eight harness tasks as the harness names them, plus the real
# tasks this project builds from packages (pipeline/data/task_packages.py).
TASK_ANSWER_FORMAT: dict[str, str] = {
    "boolq": "truefalse",
    "piqa": "solution",
    "social_i_qa": "answer",
    "ARC-Challenge": "answer",
    "ARC-Easy": "answer",
    "openbookqa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
    # built from packages (DATA.md)
    "quartz": "option",  # two options, WinoGrande's option1/option2 family
    "strategyqa": "truefalse",  # yes/no questions in BoolQ's true/false family
}
_TASK_LOWER = {k.lower(): v for k, v in TASK_ANSWER_FORMAT.items()}


def answer_format(task: str) -> str:
    """The answer family of a task name (case-insensitive) or of a family name itself."""
    if task in ANSWER_PATTERNS:
        return task
    fam = TASK_ANSWER_FORMAT.get(task) or _TASK_LOWER.get(task.lower())
    if fam is None:
        raise ValueError(
            f"unknown task {task!r}: known tasks are {', '.join(TASK_ANSWER_FORMAT)}; "
            f"answer families are {', '.join(ANSWER_PATTERNS)}"
        )
    return fam


_FORMAT_LINE = re.compile(r"Answer format:\s*([A-Za-z]+)\d*\s*/")


def answer_format_from_instruction(instruction: str) -> str | None:
    """The answer family named by an instruction's "Answer format: ..." text (the harness data
    puts it at the end of every instruction), or None when there is none. Lets a mixed file such
    as commonsense_170k be scored per row."""
    m = None
    for m in _FORMAT_LINE.finditer(instruction):
        pass
    if m is None:
        return None
    word = m.group(1).lower()
    if word in ("true", "false"):
        return "truefalse"
    return word if word in ANSWER_PATTERNS else None


def extract_answer(task: str, text: str) -> str | None:
    """The harness's prediction: the first match of the task family's regex in the stripped
    response, or None when nothing matches (the harness returns "" there: always wrong).
    Matching is case-sensitive, as in the harness ("True" does not match boolq)."""
    m = _COMPILED[answer_format(task)].search(text.strip())
    return m.group(0) if m else None


# ----------------------------------------------------------------------------- loading
REQUIRED_FIELDS = ("instruction", "output", "answer")


def _check_row(row: Any, where: str, require_answer: bool) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields instruction/input/output/answer, got {type(row).__name__}")
    for key in REQUIRED_FIELDS:
        if key == "answer" and not require_answer:
            continue
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
    inst = row["instruction"]
    if not isinstance(inst, str) or not inst.strip():
        raise DataError(f"{where}: field 'instruction' must be a non-empty string, got {inst!r:.80}")
    if not isinstance(row["output"], str):
        raise DataError(f"{where}: field 'output' must be a string, got {row['output']!r:.80}")
    inp = row.get("input")
    if inp is not None and not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string or null, got {inp!r:.80}")
    out = dict(row)
    out["input"] = inp or ""
    if "answer" in row:
        ans = row["answer"]
        if isinstance(ans, bool) or not isinstance(ans, (str, int, float)) or (isinstance(ans, float) and math.isnan(ans)):
            raise DataError(f"{where}: field 'answer' must be a string (or number), got {ans!r:.80}")
        out["answer"] = ans if isinstance(ans, str) else str(ans)
    return out


def read_data_text(p: Path, expected: str) -> str:
    """A data file's text, or the error a user can act on: missing, a folder (`expected` says what
    was wanted), empty, not UTF-8. A leading BOM is dropped (spreadsheet programs write one)."""
    if not p.exists():
        raise FileNotFoundError(f"{p}: data file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, expected {expected}")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def load_records(path: str | Path, require_answer: bool = True) -> list[dict]:
    """Read an LLM-Adapters file (a JSON list, or JSONL: one object a line) and check every row.

    Returns dicts with `instruction`, `input` ("" when absent or null), `output`, `answer`
    (numbers turned into strings) and any extra keys unchanged. Raises DataError naming the file,
    the row (0-based index in the list; for JSONL also the line) and the field at fault.
    A .csv or .parquet file, a `save_to_disk` folder or a `hub:` name is read through `datasets`
    (pipeline.data.sources) and its rows checked the same way (the row, without a line).
    """
    if not is_own_format(path):
        # Deferred: `datasets` takes about a second to import, and the JSON files need none of it.
        from pipeline.data import sources

        source = sources.parse(str(path))
        records = [_check_row(row, f"{source}: row {i}", require_answer) for i, row in enumerate(sources.rows(source))]
        if not records:
            raise DataError(f"{source}: contains no records")
        return records
    p = Path(path)
    text = read_data_text(p, "a .json or .jsonl file")

    records: list[dict] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, row in enumerate(rows):
            records.append(_check_row(row, f"{p}: row {i}", require_answer))
    else:
        row_i = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}: row {row_i} (line {lineno}): invalid JSON at column {e.colno}: {e.msg} "
                    "(expected a JSON list or JSONL, one object per line)"
                ) from None
            records.append(_check_row(row, f"{p}: row {row_i} (line {lineno})", require_answer))
            row_i += 1
    if not records:
        raise DataError(f"{p}: contains no records")
    return records


def is_own_format(path: str | Path) -> bool:
    """Whether this module parses `path` itself (JSON or JSONL: any file but .csv and .parquet, and
    a folder that is not a `save_to_disk` dataset, which read_data_text refuses) rather than `datasets`."""
    entry = str(path)
    if entry.startswith("hub:"):
        return False
    p = Path(entry)
    if p.is_dir():
        return not any((p / f).is_file() for f in ("state.json", "dataset_dict.json"))
    return p.suffix.lower() not in (".csv", ".parquet")


def load_many(paths: Sequence[str | Path], require_answer: bool = True) -> list[dict]:
    """The records of several files, in order (a training mixture such as commonsense_170k)."""
    return [r for p in paths for r in load_records(p, require_answer=require_answer)]


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """Write records as one JSON list (LLM-Adapters' layout), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(list(records), f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- tokenization
def _tokenize(tokenizer, text: str, cutoff_len: int, add_eos: bool) -> dict:
    enc = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    ids = list(enc["input_ids"])
    mask = list(enc["attention_mask"]) if "attention_mask" in enc else [1] * len(ids)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask}


def tokenize_example(tokenizer, record: dict, cutoff_len: int = 256, train_on_inputs: bool = True, add_eos: bool = True) -> dict:
    """One training example, as LLM-Adapters' generate_and_tokenize_prompt builds it.

    The full prompt (instruction, input, output) is tokenized with truncation to `cutoff_len`;
    EOS is appended when the sequence is shorter than `cutoff_len` and does not already end
    in it; labels copy input_ids. With train_on_inputs=False, the first k labels become -100,
    k being the token count of the same prompt with an empty output (tokenized without EOS).
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    full = _tokenize(tokenizer, generate_prompt(record["instruction"], record.get("input"), record.get("output", "")), cutoff_len, add_eos)
    labels = list(full["input_ids"])
    if not train_on_inputs:
        user = _tokenize(tokenizer, generate_prompt(record["instruction"], record.get("input"), ""), cutoff_len, add_eos=False)
        k = min(len(user["input_ids"]), len(labels))
        labels = [IGNORE_INDEX] * k + labels[k:]
    full["labels"] = labels
    return full


def tokenize_batch(tokenizer, instructions: Sequence[str], inputs: Sequence[str | None], outputs: Sequence[str],
                   cutoff_len: int = 256, train_on_inputs: bool = True, add_eos: bool = True) -> dict[str, list[list[int]]]:
    """`tokenize_example` over many records in two tokenizer calls instead of one or two per record
    (a fast tokenizer encodes a batch in Rust): the same tokens, EOS rule and label masking, row for
    row (tests/test_data_cache.py checks it against tokenize_example)."""
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    full = _tokenize_many(tokenizer, [generate_prompt(i, n, o) for i, n, o in zip(instructions, inputs, outputs)],
                          cutoff_len, add_eos)
    labels = [list(ids) for ids in full["input_ids"]]
    if not train_on_inputs:
        users = _tokenize_many(tokenizer, [generate_prompt(i, n, "") for i, n in zip(instructions, inputs)],
                               cutoff_len, add_eos=False)
        for row, user in zip(labels, users["input_ids"]):
            k = min(len(user), len(row))
            row[:k] = [IGNORE_INDEX] * k
    full["labels"] = labels
    return full


def _tokenize_many(tokenizer, texts: list[str], cutoff_len: int, add_eos: bool) -> dict:
    enc = tokenizer(texts, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    ids = [list(x) for x in enc["input_ids"]]
    masks = [list(m) for m in enc["attention_mask"]] if "attention_mask" in enc else [[1] * len(x) for x in ids]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        for x, m in zip(ids, masks):
            if len(x) < cutoff_len and (not x or x[-1] != eos):
                x.append(eos)
                m.append(1)
    return {"input_ids": ids, "attention_mask": masks}


def build_examples(records: Sequence[dict], tokenizer, cutoff_len: int = 256, train_on_inputs: bool = True, add_eos: bool = True) -> list[dict]:
    """`tokenize_example` over a list of records."""
    return [tokenize_example(tokenizer, r, cutoff_len, train_on_inputs, add_eos) for r in records]


class TokenizedDataset:
    """A map-style torch dataset of tokenized examples (lists of ints); batch with `collate`."""

    def __init__(self, records: Sequence[dict], tokenizer, cutoff_len: int = 256, train_on_inputs: bool = True, add_eos: bool = True):
        self.examples = build_examples(records, tokenizer, cutoff_len, train_on_inputs, add_eos)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate(batch: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad a list of examples on the right into LongTensors: input_ids with `pad_id`,
    attention_mask with 0, labels with -100 (examples without labels get labels = input_ids)."""
    if not batch:
        raise ValueError("collate: empty batch")
    if pad_id is None:
        raise ValueError("collate: pad_id is None (the tokenizer has no pad token; pass one explicitly)")

    def as_list(x):
        return x.tolist() if hasattr(x, "tolist") else list(x)

    rows = []
    for ex in batch:
        ids = as_list(ex["input_ids"])
        mask = as_list(ex["attention_mask"]) if "attention_mask" in ex else [1] * len(ids)
        labels = as_list(ex["labels"]) if "labels" in ex else list(ids)
        if not (len(ids) == len(mask) == len(labels)):
            raise ValueError(f"collate: input_ids/attention_mask/labels lengths differ ({len(ids)}/{len(mask)}/{len(labels)})")
        rows.append((ids, mask, labels))
    width = max(len(r[0]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, mask, labels in rows:
        n = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * n)
        out["attention_mask"].append(mask + [0] * n)
        out["labels"].append(labels + [IGNORE_INDEX] * n)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
