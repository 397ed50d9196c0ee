"""Labelled text for sequence classification (`model.task: seq_cls`): reading, class names, ids.

A labelled file holds one row per example:

  text       the text to classify (a non-empty string)
  text_pair  optional second text of a sentence pair (string or null; "" counts as none)
  label      a class id (an int >= 0) or a class name (a non-empty string), one kind per file

plus any extra fields (an `id`, a source...), kept as they are. Three layouts are read here: a CSV
file (`.csv`, comma-separated, a header row naming the columns), one JSON list, or JSONL (one
object a line). In a CSV every cell is text, so a label cell of digits is a class id and any
other a class name. The same columns in a .parquet file, a `save_to_disk` folder or a hub dataset
are read through HF `datasets` (pipeline.data.sources) and checked by the same row rules.

Class ids are what a classification head predicts; class names are what people read.
`label_names` turns the labels of some files into the names in id order and `encode_labels`
turns rows into ids of those names. No torch and no tokenizer here: tokenizing is the
loader's job (pipeline.data.loader).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.tasks import DataError, read_data_text, write_records
from pipeline.data.tasks import is_own_format as _tasks_own_format

LABEL_KINDS = "an integer class id (>= 0) or a class name (a non-empty string)"
_CSV_INT = re.compile(r"[+-]?[0-9]+")
_CSV_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")  # "1.0", ".5", "1e3"


# ----------------------------------------------------------------------------- one row
def _check_label(label: Any, where: str) -> int | str:
    # bool is an int subclass and a float "1.0" looks like an id: both are refused rather than
    # guessed, since a wrong guess silently trains on the wrong classes.
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: field 'label' must be {LABEL_KINDS}, got {label!r:.80}")
    if isinstance(label, int) and label < 0:
        raise DataError(f"{where}: field 'label' must be {LABEL_KINDS}, got the negative id {label}")
    if isinstance(label, str) and not label.strip():
        raise DataError(f"{where}: field 'label' must be {LABEL_KINDS}, got an empty string")
    return label


def _check_row(row: Any, where: str) -> dict:
    """One row as a dict with `text`, `text_pair` (None when absent or empty), `label` + extras."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields text/label (and optional text_pair), "
                        f"got {type(row).__name__}")
    for key in ("text", "label"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field 'text' must be a non-empty string, got {text!r:.80}")
    pair = row.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise DataError(f"{where}: field 'text_pair' must be a string or null, got {pair!r:.80}")
    out = dict(row)
    out["text_pair"] = pair or None
    out["label"] = _check_label(row["label"], where)
    return out


def _check_one_label_kind(p: Path, rows: list[dict], wheres: list[str]) -> None:
    """A file mixing ids and names is almost always a mistake (e.g. a header row pasted into the
    data, or "1" vs 1): refuse it naming the first row of the other kind."""
    first_is_id = isinstance(rows[0]["label"], int)
    for row, where in zip(rows, wheres):
        if isinstance(row["label"], int) != first_is_id:
            kinds = ("a class name", "a class id") if first_is_id else ("a class id", "a class name")
            raise DataError(f"{where}: field 'label' is {kinds[0]} ({row['label']!r:.40}) but row 0 has "
                            f"{kinds[1]} ({rows[0]['label']!r:.40}); use one kind of label in a file")


# ----------------------------------------------------------------------------- layouts
def _read_text(p: Path) -> str:
    return read_data_text(p, "a .csv, .json or .jsonl file")


def _csv_label(cell: str) -> int | str:
    # Every CSV cell is text: digits are an id, a decimal number is refused by _check_label (as a
    # float would be in JSON), anything else is a name.
    s = cell.strip()
    if _CSV_INT.fullmatch(s):
        return int(s)
    if _CSV_FLOAT.fullmatch(s):
        return float(s)
    return cell


def _read_csv(p: Path, text: str) -> tuple[list[dict], list[str]]:
    """Rows of a CSV with a header; the line of each row is where it starts (a quoted cell may
    span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: a stray quote is an error, not data
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise DataError(f"{p}: line 1: not valid CSV ({e})") from None
    missing = [c for c in ("text", "label") if c not in header]
    if missing:
        raise DataError(f"{p}: the header has no {' or '.join(repr(c) for c in missing)} column (its columns: "
                        f"{', '.join(repr(h) for h in header)}); expected comma-separated columns text, label "
                        "and optionally text_pair")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"{p}: the header names column {dup!r} twice")
    rows, wheres, end = [], [], reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{p}: row {len(rows)} (line {start}): not valid CSV ({e})") from None
        end = reader.line_num
        if cells is None:
            break
        if not cells:  # a blank line
            continue
        where = f"{p}: row {len(rows)} (line {start})"
        if len(cells) != len(header):
            raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns")
        row: dict[str, Any] = dict(zip(header, cells))
        row["label"] = _csv_label(row["label"])
        rows.append(_check_row(row, where))
        wheres.append(where)
    return rows, wheres


def _read_json(p: Path, text: str) -> tuple[list[dict], list[str]]:
    """Rows of a JSON list or of JSONL (the same two layouts as tasks.load_records)."""
    rows, wheres = [], []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, row in enumerate(data):
            wheres.append(f"{p}: row {i}")
            rows.append(_check_row(row, wheres[-1]))
        return rows, wheres
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}: row {len(rows)} (line {lineno})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg} "
                            "(expected a JSON list, JSONL with one object per line, or a .csv file)") from None
        rows.append(_check_row(row, where))
        wheres.append(where)
    return rows, wheres


def load_labelled(path: str | Path) -> list[dict]:
    """Read a labelled CSV, JSON list or JSONL file and check every row.

    Returns dicts with `text`, `text_pair` (None when absent or empty), `label` (int or str, as
    in the file) and any extra fields. Raises DataError naming the file, the row (0-based; for
    CSV and JSONL also the line) and the field at fault; FileNotFoundError for a missing file.
    """
    if not is_own_format(path):
        # Deferred: `datasets` takes about a second to import, and CSV and JSON files need none of it.
        from pipeline.data import sources

        source = sources.parse(str(path))
        rows, wheres = [], []
        for i, row in enumerate(sources.rows(source)):
            wheres.append(f"{source}: row {i}")
            rows.append(_check_row(row, wheres[-1]))
        if not rows:
            raise DataError(f"{source}: contains no rows")
        _check_one_label_kind(Path(str(path)), rows, wheres)
        return rows
    p = Path(path)
    text = _read_text(p)
    rows, wheres = (_read_csv if p.suffix.lower() == ".csv" else _read_json)(p, text)
    if not rows:
        raise DataError(f"{p}: contains no rows")
    _check_one_label_kind(p, rows, wheres)
    return rows


def is_own_format(path: str | Path) -> bool:
    """Whether this module reads `path` itself (CSV, JSON, JSONL: any file but .parquet, and a folder
    that is not a `save_to_disk` dataset, which _read_text refuses) rather than `datasets`."""
    return _tasks_own_format(path) or Path(str(path)).suffix.lower() == ".csv"


def write_labelled(path: str | Path, records: Iterable[dict]) -> None:
    """Write labelled rows as one JSON list, atomically (a temp file renamed into place)."""
    write_records(path, records)


# ----------------------------------------------------------------------------- classes
def label_names(records: Sequence[dict], source: str = "the data") -> list[str]:
    """The class names in id order.

    Integer labels are ids: the classes are "0" .. str(max id) (an id that never occurs still
    gets its class, so the head's outputs keep their meaning). String labels are names: the
    classes are the distinct names, sorted, so every file with the same names gives the same ids.
    """
    if not records:
        raise DataError(f"{source}: no rows, so no classes")
    ints = [isinstance(r["label"], int) for r in records]
    if any(ints) and not all(ints):
        i = next(i for i, v in enumerate(ints) if v != ints[0])
        raise DataError(f"{source}: row {i} has label {records[i]['label']!r} but row 0 has {records[0]['label']!r}: "
                        "the rows mix class ids and class names")
    if ints[0]:
        names = [str(i) for i in range(max(r["label"] for r in records) + 1)]
    else:
        names = sorted({r["label"] for r in records})
    if len(names) < 2:
        raise DataError(f"{source}: only the class {names[0]!r}: a classifier needs at least 2 classes")
    return names


def encode_labels(records: Sequence[dict], names: Sequence[str], source: str = "the data") -> list[int]:
    """The class id of every row: an int label is already an id (checked against the number of
    classes), a str label is looked up in `names`."""
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for i, r in enumerate(records):
        label = r["label"]
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(names):
                raise DataError(f"{source}: row {i}: field 'label' is class id {label}, but there are "
                                f"{len(names)} classes (ids 0..{len(names) - 1})")
            ids.append(label)
        elif label in index:
            ids.append(index[label])
        else:
            shown = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
            raise DataError(f"{source}: row {i}: field 'label' is {label!r:.80}, not one of the {len(names)} "
                            f"known classes ({shown})")
    return ids
