"""Labelled data for model.task seq_cls: pipeline.classification.rows (CSV/JSON/JSONL rows, class names,
class ids) and the classification tasks of pipeline.data.prepare (sarcasm, winowhy, quartz_cls).

The offline tests write every file into tmp_path (fake package archives stand in for the real
ones). The real-data tests read the real archives when the cache already holds them
(<repo>/.cache/downloads or $TSD_CACHE/downloads, filled by `tsd prepare-data ...`) and are
skipped otherwise, so the suite never downloads 400 MB; they link the archives into a
temporary cache and so never write into the real one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline.classification.rows import encode_labels, label_names, load_labelled, write_labelled
from pipeline.data.prepare import prepare_data, prepare_user_file
from pipeline.data.task_packages import (
    BIGBENCH,
    CLS_TASKS,
    EVALS,
    LabelledItem,
    _parse_quartz_cls,
    _parse_sarcasm,
    _parse_winowhy,
    build_cls_records,
)
from pipeline.data.tasks import DataError


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


ROWS = [
    {"text": "the cat sat", "label": "pos"},
    {"text": "a premise", "text_pair": "a hypothesis", "label": "neg", "id": "r1"},
    {"text": "no pair", "text_pair": None, "label": "pos"},
]


# ----------------------------------------------------------------------------- reading
def test_json_and_jsonl_round_trip_with_pairs_and_extras(tmp_path):
    expected = [dict(r, text_pair=r.get("text_pair")) for r in ROWS]
    p = _write(tmp_path / "rows.json", json.dumps(ROWS))
    assert load_labelled(p) == expected
    q = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_labelled(q) == expected
    write_labelled(tmp_path / "out" / "again.json", expected)
    assert load_labelled(tmp_path / "out" / "again.json") == expected
    assert oct((tmp_path / "out" / "again.json").stat().st_mode & 0o777) == "0o644"
    ints = _write(tmp_path / "ints.json", json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": 2, "text_pair": ""}]))
    assert [(r["label"], r["text_pair"]) for r in load_labelled(ints)] == [(0, None), (2, None)]


def test_csv_round_trip(tmp_path):
    p = _write(tmp_path / "rows.csv", '\ufefftext,text_pair,label,id\n'
                                      '"hello, world",,1,a\n'
                                      '\n'
                                      '"a ""quoted""\ntwo-line text",the pair,0,b\n')
    rows = load_labelled(p)
    assert rows == [
        {"text": "hello, world", "text_pair": None, "label": 1, "id": "a"},
        {"text": 'a "quoted"\ntwo-line text', "text_pair": "the pair", "label": 0, "id": "b"},
    ]
    named = load_labelled(_write(tmp_path / "named.csv", "label,text\nTrue,x\nfalse,y\n"))
    assert [(r["label"], r["text_pair"]) for r in named] == [("True", None), ("false", None)]  # CSV words are names


@pytest.mark.parametrize(
    "row,message",
    [
        ({"label": 1}, "missing field 'text'"),
        ({"text": "t"}, "missing field 'label'"),
        ({"text": "  ", "label": 1}, "field 'text' must be a non-empty string"),
        ({"text": 3, "label": 1}, "field 'text' must be a non-empty string"),
        ({"text": "t", "text_pair": 4, "label": 1}, "field 'text_pair' must be a string or null"),
        ({"text": "t", "label": True}, "field 'label' must be an integer class id (>= 0) or a class name"),
        ({"text": "t", "label": 1.0}, "field 'label' must be an integer class id (>= 0) or a class name"),
        ({"text": "t", "label": -1}, "negative id -1"),
        ({"text": "t", "label": ""}, "got an empty string"),
        ({"text": "t", "label": None}, "field 'label' must be"),
        ({"text": "t", "label": [1]}, "field 'label' must be"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, row, message):
    p = _write(tmp_path / "bad.json", json.dumps([{"text": "ok", "label": 0}, row]))
    with pytest.raises(DataError) as e:
        load_labelled(p)
    assert f"{p}: row 1: " in str(e.value) and message in str(e.value)
    q = _write(tmp_path / "bad.jsonl", json.dumps({"text": "ok", "label": 0}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1 \(line 3\): "):
        load_labelled(q)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.csv: data file not found"):
        load_labelled(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="is a folder"):
        load_labelled(tmp_path)
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_labelled(_write(tmp_path / "empty.jsonl", " \n\n"))
    latin1 = "text,label\ncafé,1\n".encode("latin-1")
    with pytest.raises(DataError, match=r"latin\.csv: not valid UTF-8 \(bad byte 0xe9"):
        load_labelled(_write(tmp_path / "latin.csv", latin1))
    with pytest.raises(DataError, match=r"syntax\.json: invalid JSON at line 1"):
        load_labelled(_write(tmp_path / "syntax.json", '[{"text": "x",]'))
    with pytest.raises(DataError, match=r"broken\.jsonl: row 1 \(line 2\): invalid JSON"):
        load_labelled(_write(tmp_path / "broken.jsonl", '{"text": "a", "label": 1}\n{not json\n'))
    with pytest.raises(DataError, match=r"notobj\.json: row 0: expected an object"):
        load_labelled(_write(tmp_path / "notobj.json", '["just a string"]'))
    with pytest.raises(DataError, match=r"none\.json: contains no rows"):
        load_labelled(_write(tmp_path / "none.json", "[]"))
    with pytest.raises(DataError, match=r"header\.csv: contains no rows"):
        load_labelled(_write(tmp_path / "header.csv", "text,label\n"))


def test_bad_csv(tmp_path):
    with pytest.raises(DataError, match=r"cols\.csv: the header has no 'label' column \(its columns: 'text', 'y'\)"):
        load_labelled(_write(tmp_path / "cols.csv", "text,y\na,1\n"))
    with pytest.raises(DataError, match=r"semi\.csv: the header has no 'text' or 'label' column \(its columns: 'text;label'\)"):
        load_labelled(_write(tmp_path / "semi.csv", "text;label\na;1\n"))
    with pytest.raises(DataError, match="names column 'text' twice"):
        load_labelled(_write(tmp_path / "twice.csv", "text,label,text\na,1,b\n"))
    with pytest.raises(DataError, match=r"cells\.csv: row 1 \(line 4\): 3 cells, but the header has 2 columns"):
        load_labelled(_write(tmp_path / "cells.csv", "text,label\na,1\n\nb,1,extra\n"))
    with pytest.raises(DataError, match=r"float\.csv: row 0 \(line 2\): field 'label' must be an integer class id"):
        load_labelled(_write(tmp_path / "float.csv", "text,label\na,1.0\n"))
    with pytest.raises(DataError, match=r"neg\.csv: row 0 \(line 2\): .*negative id -2"):
        load_labelled(_write(tmp_path / "neg.csv", "text,label\na,-2\n"))
    with pytest.raises(DataError, match=r"blank\.csv: row 0 \(line 2\): field 'text' must be a non-empty string"):
        load_labelled(_write(tmp_path / "blank.csv", "text,label\n,1\n"))
    with pytest.raises(DataError, match=r"quote\.csv: row 1 \(line 3\): not valid CSV \(unexpected end of data\)"):
        load_labelled(_write(tmp_path / "quote.csv", 'text,label\na,1\n"b,0\n'))
    # the line of a row is where it starts, also after a cell spanning lines
    with pytest.raises(DataError, match=r"multi\.csv: row 1 \(line 4\): field 'label'"):
        load_labelled(_write(tmp_path / "multi.csv", 'text,label\n"two\nlines",1\nb,\n'))


def test_mixed_label_kinds_are_refused(tmp_path):
    p = _write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(r) for r in
                                                  [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": "pos"}]))
    with pytest.raises(DataError, match=r"mixed\.jsonl: row 2 \(line 3\): field 'label' is a class name \('pos'\) "
                                        r"but row 0 has a class id \(0\)"):
        load_labelled(p)
    q = _write(tmp_path / "mixed.csv", "text,label\na,neg\nb,1\n")
    with pytest.raises(DataError, match=r"mixed\.csv: row 1 \(line 3\): field 'label' is a class id \(1\) but row 0 has a class name"):
        load_labelled(q)


# ----------------------------------------------------------------------------- classes
def test_label_names():
    assert label_names([{"label": 1}, {"label": 0}, {"label": 3}]) == ["0", "1", "2", "3"]  # max + 1 classes
    assert label_names([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}]) == ["neg", "pos"]
    with pytest.raises(DataError, match=r"f\.csv: only the class 'pos': a classifier needs at least 2 classes"):
        label_names([{"label": "pos"}, {"label": "pos"}], source="f.csv")
    with pytest.raises(DataError, match="at least 2 classes"):
        label_names([{"label": 0}])
    with pytest.raises(DataError, match="no rows"):
        label_names([])
    with pytest.raises(DataError, match=r"a\.json, b\.json: row 1 .* mix class ids and class names"):
        label_names([{"label": 0}, {"label": "x"}], source="a.json, b.json")


def test_encode_labels():
    names = ["neg", "pos"]
    assert encode_labels([{"label": "pos"}, {"label": "neg"}, {"label": 1}], names) == [1, 0, 1]
    assert encode_labels([{"label": 0}, {"label": 2}], ["0", "1", "2"]) == [0, 2]  # ids are ids
    with pytest.raises(DataError, match=r"t\.json: row 1: field 'label' is class id 2, but there are 2 classes \(ids 0\.\.1\)"):
        encode_labels([{"label": 0}, {"label": 2}], names, source="t.json")
    with pytest.raises(DataError, match=r"t\.json: row 0: field 'label' is 'maybe', not one of the 2 known classes \('neg', 'pos'\)"):
        encode_labels([{"label": "maybe"}], names, source="t.json")


def test_loaded_files_feed_label_names_and_encode_labels(tmp_path):
    rows = load_labelled(_write(tmp_path / "r.csv", "text,label\na,1\nb,0\nc,1\n"))
    names = label_names(rows, source="r.csv")
    assert names == ["0", "1"] and encode_labels(rows, names) == [1, 0, 1]


# ----------------------------------------------------------------------------- task sources (offline)
def _chat(system, user, ideal):
    return json.dumps({"input": [{"role": "system", "content": system}, {"role": "user", "content": user}], "ideal": ideal})


SYSTEM = "Respond with only a 1 or 0 to signify if the user's message includes sarcasm, or not"
SARCASM_LINES = [
    _chat(SYSTEM, "area man wins argument with toaster", "1"),
    _chat(SYSTEM, "senate passes budget bill", "0"),
    _chat(SYSTEM, "area man wins argument with toaster", "1"),  # duplicate: dropped, first kept
    _chat(SYSTEM, "local dog elected mayor", "1"),
    _chat(SYSTEM, "local dog elected mayor", "0"),  # conflicting: both dropped
    _chat(SYSTEM, "no label here", "maybe"),  # unparseable
] + [_chat(SYSTEM, f"headline number {i}", str(i % 2)) for i in range(14)]

QUARTZ_LINES = [
    json.dumps({"input": [{"role": "user", "content": f"Question {i} about resistance\n\n A: more {i}\n B: less {i}"}],
                "ideal": "AB"[i % 2]}) for i in range(10)
]

WINOWHY = {"canary": "x", "examples": [
    {"input": "The trophy doesn't fit into the suitcase because it is too large. The 'it' refers to the trophy "
              "because the trophy is the thing that has to fit.", "target_scores": {"correct": 1, "incorrect": 0}},
    {"input": "The trophy doesn't fit into the suitcase because it is too large. The 'it' refers to the trophy "
              "because suitcases are made of leather.", "target_scores": {"correct": 0, "incorrect": 1}},
    {"input": "No claim in this one.", "target_scores": {"correct": 1, "incorrect": 0}},
] + [{"input": f"Sentence {i} with it. The 'it' refers to thing {i} because reason {i}.",
      "target_scores": {"correct": i % 2, "incorrect": 1 - i % 2}} for i in range(8)]}


def test_parse_sarcasm_and_build_records():
    items, bad = _parse_sarcasm("\n".join(SARCASM_LINES).encode())
    assert bad == [5] and items[0] == LabelledItem(0, "area man wins argument with toaster", None, 1)
    recs, dropped = build_cls_records("sarcasm", items)
    assert dropped == {"duplicates_dropped": [2], "conflicting_dropped": [3, 4]}
    assert recs[0] == {"id": "sarcasm-00000", "text": "area man wins argument with toaster", "label": 1}
    assert len(recs) == 16 and all("text_pair" not in r for r in recs)


def test_parse_winowhy_splits_sentence_and_claim():
    items, bad = _parse_winowhy(json.dumps(WINOWHY).encode())
    assert bad == [2]
    assert items[0] == LabelledItem(
        0, "The trophy doesn't fit into the suitcase because it is too large.",
        "The 'it' refers to the trophy because the trophy is the thing that has to fit.", 1)
    assert items[1].label == 0 and items[1].text == items[0].text


def test_parse_quartz_cls_matches_quartz():
    items, bad = _parse_quartz_cls("\n".join(QUARTZ_LINES).encode())
    assert bad == [] and items[1] == LabelledItem(1, "Question 1 about resistance", "A: more 1 B: less 1", 1)
    recs, _ = build_cls_records("quartz_cls", items)
    assert recs[0]["id"] == "quartz-00000"  # quartz's ids: both tasks split the same questions alike


def _fake_archives(cache: Path) -> None:
    d = cache / "downloads"
    d.mkdir(parents=True)
    name, version = EVALS.split("==")
    with zipfile.ZipFile(d / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(CLS_TASKS["sarcasm"].source.member, "\n".join(SARCASM_LINES) + "\n")
        z.writestr(CLS_TASKS["quartz_cls"].source.member, "\n".join(QUARTZ_LINES) + "\n")
    name, version = BIGBENCH.split("==")
    data = json.dumps(WINOWHY).encode()
    with tarfile.open(d / f"{name}-{version}.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo(CLS_TASKS["winowhy"].source.member)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("task,usable,pairs", [("sarcasm", 16, False), ("winowhy", 10, True), ("quartz_cls", 10, True)])
def test_prepare_cls_offline(tmp_path, capsys, task, usable, pairs):
    _fake_archives(tmp_path)
    out = prepare_data(task, cache_dir=tmp_path, seed=3, test_size=3)
    train, test = load_labelled(out["train"]), load_labelled(out["test"])
    meta = json.loads(out["meta"].read_text())
    assert out["train"].parent == tmp_path / "data" / task / "seed3-test3"
    assert meta["task_type"] == "seq_cls" and meta["labels"] == list(CLS_TASKS[task].labels)
    if task == "winowhy":  # split by sentence: 3 test sentences, none of them in train
        assert len({r["text"] for r in test}) == 3 and not {r["text"] for r in train} & {r["text"] for r in test}
        assert len(train) + len(test) == usable and meta["split_by"] == "text"
    else:
        assert len(test) == 3 and len(train) == usable - 3 == meta["counts"]["train"]
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert meta["splits"] == {"train": [r["id"] for r in train], "test": [r["id"] for r in test]}
    assert all(isinstance(r["label"], int) for r in train + test)
    assert all((r["text_pair"] is not None) == pairs for r in train + test)
    assert sum(meta["counts"]["train_labels"].values()) == len(train)
    mtime = out["train"].stat().st_mtime_ns
    assert prepare_data(task, cache_dir=tmp_path, seed=3, test_size=3) == out
    assert out["train"].stat().st_mtime_ns == mtime and "ready" in capsys.readouterr().err


def test_prepare_rejects_unknown_task_naming_both_kinds(tmp_path):
    with pytest.raises(ValueError, match=r"social_i_qa, quartz, strategyqa \(LLM-Adapters format\) and sarcasm, winowhy, quartz_cls"):
        prepare_data("imdb", cache_dir=tmp_path)


def test_prepare_user_file_labelled(tmp_path):
    p = _write(tmp_path / "mine.csv", "text,text_pair,label\na,b,yes\nc,,no\nd,,yes\n")
    before = p.read_bytes()
    info = prepare_user_file(p)
    assert info["task_type"] == "seq_cls" and info["rows"] == 3 and info["labels"] == ["no", "yes"]
    assert info["label_counts"] == {"no": 1, "yes": 2} and info["pairs"] == 1 and p.read_bytes() == before
    q = _write(tmp_path / "mine.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert prepare_user_file(q)["labels"] == ["0", "1"]  # found by its fields
    assert prepare_user_file(q, task_type="seq_cls")["label_counts"] == {"0": 1, "1": 1}
    with pytest.raises(DataError, match="at least 2 classes"):
        prepare_user_file(_write(tmp_path / "one.json", '[{"text": "a", "label": "x"}]'))
    with pytest.raises(DataError, match="missing field 'instruction'"):  # told it is an LLM-Adapters file
        prepare_user_file(q, task_type="causal_lm")
    with pytest.raises(ValueError, match="task_type must be"):
        prepare_user_file(q, task_type="cls")
    llm = _write(tmp_path / "llm.json", json.dumps([{"instruction": "Q?\n\nAnswer format: true/false", "output": "o",
                                                     "answer": "true"}]))
    assert prepare_user_file(llm)["task_type"] == "causal_lm"


# ----------------------------------------------------------------------------- real data
def _real_archive(spec: str) -> Path | None:
    name, version = spec.split("==")
    for root in (os.environ.get("TSD_CACHE"), Path(__file__).resolve().parents[1] / ".cache"):
        if root:
            for f in Path(root, "downloads").glob(f"{name}-{version}*"):
                if f.is_file():
                    return f
    return None


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """A temporary cache whose downloads/ links the real archives; every new task is prepared
    in it once, through the CLI with its defaults (seed 0, test_size 0.2)."""
    from pipeline.launch.cli import main

    archives = [_real_archive(EVALS), _real_archive(BIGBENCH)]
    if None in archives:
        pytest.skip("the real evals/bigbench archives are not in the cache: run "
                    "`tsd prepare-data sarcasm winowhy quartz_cls` once to fetch them")
    cache = tmp_path_factory.mktemp("cache")
    (cache / "downloads").mkdir()
    for a in archives:
        (cache / "downloads" / a.name).symlink_to(a)
    assert main(["prepare-data", "sarcasm", "winowhy", "quartz_cls", "--cache", str(cache)]) == 0
    return cache


# task -> (source rows, duplicates, conflicting, share of class 1 in the usable rows +- 1 point)
REAL = {"sarcasm": (28614, 116, 0, 0.475), "winowhy": (2865, 3, 6, 0.443), "quartz_cls": (3860, 0, 32, 0.500)}


@pytest.mark.parametrize("task", list(REAL))
def test_real_cls_task(real_cache, capsys, task):
    n_source, dup, conflict, share = REAL[task]
    out = {k: real_cache / "data" / task / "seed0-test0p2" / f"{k}.json" for k in ("train", "test", "meta")}
    meta = json.loads(out["meta"].read_text())
    train, test = load_labelled(out["train"]), load_labelled(out["test"])
    c = meta["counts"]
    assert (c["source_rows"], c["duplicates_dropped"], c["conflicting_dropped"]) == (n_source, dup, conflict)
    assert c["usable"] == n_source - dup - conflict == len(train) + len(test)
    if task == "winowhy":  # whole sentences on one side: 20% of the sentences in test
        sentences = {r["text"] for r in train + test}
        assert len({r["text"] for r in test}) == round(0.2 * len(sentences))
        assert not {r["text"] for r in train} & {r["text"] for r in test}
    else:
        assert len(test) == round(0.2 * c["usable"])
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids) and not {r["id"] for r in train} & {r["id"] for r in test}
    assert meta["task_type"] == "seq_cls" and meta["labels"] == list(CLS_TASKS[task].labels)
    assert meta["source"]["archive_sha256"] and len(meta["source"]["member_sha256"]) == 64
    labels = Counter(r["label"] for r in train + test)
    assert set(labels) == {0, 1} and set(Counter(r["label"] for r in test)) == {0, 1}
    assert labels[1] / len(ids) == pytest.approx(share, abs=0.01)
    assert len({(r["text"], r["text_pair"]) for r in train + test}) == len(ids)  # no text twice
    assert encode_labels(train, label_names(train)) == [r["label"] for r in train]
    # idempotent: the second call finds the split complete and rewrites nothing
    mtime = out["train"].stat().st_mtime_ns
    again = prepare_data(task, cache_dir=real_cache)
    assert again == out and out["train"].stat().st_mtime_ns == mtime and "ready" in capsys.readouterr().err


def test_real_quartz_cls_splits_like_quartz(real_cache):
    quartz = json.loads(prepare_data("quartz", cache_dir=real_cache)["meta"].read_text())
    cls = json.loads((real_cache / "data" / "quartz_cls" / "seed0-test0p2" / "meta.json").read_text())
    assert quartz["splits"] == cls["splits"]


def test_real_rows_look_right(real_cache):
    def first(task):
        return load_labelled(real_cache / "data" / task / "seed0-test0p2" / "train.json")

    assert all(r["text_pair"] is None and r["text"] == r["text"].lower() for r in first("sarcasm"))
    assert all(" refers to " in r["text_pair"] and " because " in r["text_pair"] for r in first("winowhy"))
    assert all(r["text_pair"].startswith("A: ") and " B: " in r["text_pair"] for r in first("quartz_cls"))
