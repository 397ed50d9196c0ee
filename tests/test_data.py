"""pipeline.data.tasks and the offline parts of pipeline.data.prepare: harness prompts, answer extraction,
tokenization, loading errors, splits and task building. No network and no big downloads:
every file is hand-written into tmp_path (a fake package archive stands in for the real one).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.data.tasks import (
    ANSWER_PATTERNS,
    IGNORE_INDEX,
    TASK_ANSWER_FORMAT,
    DataError,
    TokenizedDataset,
    answer_format,
    answer_format_from_instruction,
    build_examples,
    collate,
    extract_answer,
    generate_eval_prompt,
    generate_prompt,
    load_records,
    response_text,
    tokenize_example,
    write_records,
)
from pipeline.data.packages import cache_root
from pipeline.data.prepare import prepare_data, prepare_user_file
from pipeline.data.task_packages import (
    EVALS,
    Item,
    _parse_quartz,
    _parse_siqa,
    _parse_strategyqa,
    build_task_records,
    resolve_test_size,
    split_ids,
    split_records,
)


# ----------------------------------------------------------------------------- prompts
# The harness's functions, laid out exactly as in LLM-Adapters' finetune.py (training) and
# commonsense_evaluate.py (evaluation), as carried by Chongjie-Si/Subspace-Tuning CR_MR/.
# Whitespace is significant: 16-space indentation, 16-space "blank" lines in the training
# prompt, trailing spaces after "request." (two without input, one with input in training;
# one without input, none with input in evaluation).
def harness_train_prompt(data_point):
    if data_point["input"]:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. 

                ### Instruction:
                {data_point["instruction"]}
                
                ### Input:
                {data_point["input"]}
                
                ### Response:
                {data_point["output"]}"""  # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request.  

                ### Instruction:
                {data_point["instruction"]}
                
                ### Response:
                {data_point["output"]}"""  # noqa: E501


def harness_eval_prompt(instruction, input=None):
    if input:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

                ### Instruction:
                {instruction}

                ### Input:
                {input}

                ### Response:
                """  # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request. 

                ### Instruction:
                {instruction}

                ### Response:
                """  # noqa: E501


SIQA_INSTRUCTION = (
    "Please choose the correct answer to the question: Carson was at a friend's house but suddenly announced they "
    "needed to go home. Why did Carson do this?\n\nAnswer1: caught a bus Answer2: called a cab Answer3: forgot to "
    "feed the dog\n\nAnswer format: answer1/answer2/answer3"
)


def test_reference_layout_was_not_mangled():
    # Guards the reference above against editors that strip trailing whitespace.
    p = harness_train_prompt({"instruction": "I", "input": "", "output": "O"})
    assert "the request.  \n\n" in p and "\n" + " " * 16 + "\n" in p
    e = harness_eval_prompt("I")
    assert "the request. \n\n" in e and e.endswith("### Response:\n" + " " * 16)


@pytest.mark.parametrize("inp", ["", "a context paragraph\nwith two lines"])
@pytest.mark.parametrize("out", ["the correct answer is answer3", ""])
def test_train_prompt_matches_harness(inp, out):
    dp = {"instruction": SIQA_INSTRUCTION, "input": inp, "output": out}
    assert generate_prompt(SIQA_INSTRUCTION, inp, out) == harness_train_prompt(dp)


def test_train_prompt_without_output_is_the_user_prompt():
    assert generate_prompt("Q", None) == generate_prompt("Q", "", "") == harness_train_prompt({"instruction": "Q", "input": "", "output": ""})
    assert generate_prompt("Q", "ctx", None) == harness_train_prompt({"instruction": "Q", "input": "ctx", "output": ""})
    assert generate_prompt("Q").endswith("### Response:\n" + " " * 16)


@pytest.mark.parametrize("inp", [None, "", "some input"])
def test_eval_prompt_matches_harness(inp):
    assert generate_eval_prompt(SIQA_INSTRUCTION, inp) == harness_eval_prompt(SIQA_INSTRUCTION, inp)


def test_train_and_eval_prompts_differ_as_in_the_harness():
    # The harness trains and evaluates with different whitespace; both are reproduced.
    assert generate_prompt("Q", "", "") != generate_eval_prompt("Q")
    assert generate_prompt("Q", "", "").strip() != generate_eval_prompt("Q").strip()


def test_response_text():
    decoded = generate_eval_prompt("Q") + "the correct answer is answer2"
    assert response_text(decoded) == "the correct answer is answer2"


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    "task,text,expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, it is not true", "false"),
        ("boolq", "The correct answer is True", None),  # case-sensitive, as in the harness
        ("boolq", "yes", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "solution3", None),
        ("social_i_qa", "  the correct answer is answer3\n", "answer3"),
        ("social_i_qa", "answer2 or answer1", "answer2"),
        ("social_i_qa", "Answer2", None),
        ("ARC-Challenge", "answer4", "answer4"),
        ("ARC-Easy", "the correct answer is answer5", "answer5"),
        ("openbookqa", "answer6", None),
        ("openbookqa", "answer12", "answer1"),  # first regex match, a substring, as in the harness
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("hellaswag", "ending5", None),
        ("winogrande", "the correct answer is option2", "option2"),
        ("winogrande", "option3", None),
        ("quartz", "the correct answer is option1", "option1"),
        ("strategyqa", "the correct answer is false", "false"),
        ("strategyqa", "No", None),
        ("social_i_qa", "", None),
    ],
)
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_answer_formats_cover_every_task_and_family():
    harness = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
    for t in harness + ["quartz", "strategyqa"]:
        assert TASK_ANSWER_FORMAT[t] in ANSWER_PATTERNS
    assert set(TASK_ANSWER_FORMAT.values()) == set(ANSWER_PATTERNS)
    assert answer_format("arc-challenge") == "answer" and answer_format("option") == "option"
    with pytest.raises(ValueError, match="unknown task 'gsm8k'"):
        extract_answer("gsm8k", "42")


@pytest.mark.parametrize(
    "instruction,family",
    [
        ("Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false", "truefalse"),
        ("Please choose the correct solution to the question: x\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2", "solution"),
        (SIQA_INSTRUCTION, "answer"),
        ("Please choose the correct ending ...\n\nAnswer format: ending1/ending2/ending3/ending4", "ending"),
        ("Please choose the correct answer to fill in the blank: _\n\nOption1: a Option2: b Answer format: option1/option2", "option"),
        ("Tell me a story.", None),
    ],
)
def test_answer_format_from_instruction(instruction, family):
    assert answer_format_from_instruction(instruction) == family


# ----------------------------------------------------------------------------- tokenization
class CharTokenizer:
    """One token per character (id = ord + 10), optional BOS; HF call signature."""

    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, bos: int | None = None):
        self.bos = bos

    def __call__(self, text, truncation=False, max_length=None, padding=False, return_tensors=None):
        ids = ([self.bos] if self.bos is not None else []) + [ord(c) + 10 for c in text]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


REC = {"instruction": "Pick one.\n\nAnswer format: answer1/answer2", "input": "", "output": "the correct answer is answer2", "answer": "answer2"}


@pytest.mark.parametrize("bos", [None, 1])
def test_tokenize_train_on_inputs(bos):
    tok = CharTokenizer(bos)
    ex = tokenize_example(tok, REC, cutoff_len=1024, train_on_inputs=True)
    full = generate_prompt(REC["instruction"], "", REC["output"])
    assert len(ex["input_ids"]) == len(full) + (bos is not None) + 1
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"] == ex["input_ids"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


@pytest.mark.parametrize("bos", [None, 1])
def test_tokenize_masks_the_prompt(bos):
    tok = CharTokenizer(bos)
    ex = tokenize_example(tok, REC, cutoff_len=1024, train_on_inputs=False)
    k = len(generate_prompt(REC["instruction"], "")) + (bos is not None)
    assert ex["labels"][:k] == [IGNORE_INDEX] * k
    assert ex["labels"][k:] == ex["input_ids"][k:]
    assert "".join(chr(i - 10) for i in ex["labels"][k:-1]) == REC["output"]
    assert ex["labels"][-1] == tok.eos_token_id


def test_tokenize_cutoff():
    tok = CharTokenizer()
    n_full = len(generate_prompt(REC["instruction"], "", REC["output"]))
    # shorter than cutoff: EOS appended
    assert len(tokenize_example(tok, REC, cutoff_len=n_full + 5)["input_ids"]) == n_full + 1
    # exactly at cutoff: no room, no EOS (harness: only when len < cutoff_len)
    ex = tokenize_example(tok, REC, cutoff_len=n_full)
    assert len(ex["input_ids"]) == n_full and ex["input_ids"][-1] != tok.eos_token_id
    # truncated into the prompt: every label masked when training on outputs only
    ex = tokenize_example(tok, REC, cutoff_len=20, train_on_inputs=False)
    assert len(ex["input_ids"]) == 20 and ex["labels"] == [IGNORE_INDEX] * 20
    # no EOS when add_eos=False
    ex = tokenize_example(tok, REC, cutoff_len=1024, add_eos=False)
    assert len(ex["input_ids"]) == n_full and ex["input_ids"][-1] != tok.eos_token_id
    with pytest.raises(ValueError):
        tokenize_example(tok, REC, cutoff_len=0)


def test_tokenize_with_input_field():
    tok = CharTokenizer()
    rec = dict(REC, input="extra context")
    ex = tokenize_example(tok, rec, cutoff_len=2048, train_on_inputs=False)
    k = len(generate_prompt(rec["instruction"], rec["input"]))
    assert ex["labels"].count(IGNORE_INDEX) == k


def test_tokenize_with_a_real_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([generate_prompt(REC["instruction"], "", REC["output"])] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    a = tokenize_example(tok, REC, cutoff_len=256, train_on_inputs=True)
    b = tokenize_example(tok, REC, cutoff_len=256, train_on_inputs=False)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"][-1] == tok.eos_token_id
    k = b["labels"].count(IGNORE_INDEX)
    assert 0 < k < len(b["labels"]) and b["labels"][:k] == [IGNORE_INDEX] * k
    assert "answer2" in tok.decode(b["labels"][k:])
    batch = collate(TokenizedDataset([REC, dict(REC, output="no")], tok, 256), tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2


def test_collate_pads_right():
    ex = build_examples([REC, dict(REC, output="x")], CharTokenizer(), cutoff_len=1024, train_on_inputs=False)
    n0, n1 = len(ex[0]["input_ids"]), len(ex[1]["input_ids"])
    assert n0 > n1
    b = collate(ex, pad_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, n0) for t in b.values())
    assert b["input_ids"][1, n1:].eq(0).all() and b["attention_mask"][1, n1:].eq(0).all()
    assert b["labels"][1, n1:].eq(IGNORE_INDEX).all()
    assert b["input_ids"][1, :n1].tolist() == ex[1]["input_ids"]
    assert b["attention_mask"][0].eq(1).all()
    b8 = collate(ex, pad_id=0, pad_to_multiple_of=8)
    assert b8["input_ids"].shape[1] % 8 == 0 and b8["input_ids"].shape[1] >= n0
    with pytest.raises(ValueError, match="pad_id"):
        collate(ex, pad_id=None)
    with pytest.raises(ValueError, match="lengths differ"):
        collate([{"input_ids": [1, 2], "attention_mask": [1], "labels": [1, 2]}], 0)


# ----------------------------------------------------------------------------- loading
def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


ROWS = [
    {"instruction": "Q1\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Q2\n\nAnswer format: true/false", "output": "the correct answer is false", "answer": "false"},
    {"instruction": "How many?", "input": None, "output": "3", "answer": 3},
]


def test_load_json_list_and_jsonl(tmp_path):
    a = load_records(_write(tmp_path / "a.json", json.dumps(ROWS, indent=4)))
    b = load_records(_write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n"))
    assert a == b and len(a) == 3
    assert a[1]["input"] == "" and a[2]["input"] == "" and a[2]["answer"] == "3"
    assert load_records(_write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps(ROWS).encode()))[0] == a[0]


@pytest.mark.parametrize(
    "row,field",
    [
        ({"input": "", "output": "o", "answer": "a"}, "missing field 'instruction'"),
        ({"instruction": "i", "input": "", "answer": "a"}, "missing field 'output'"),
        ({"instruction": "i", "input": "", "output": "o"}, "missing field 'answer'"),
        ({"instruction": "  ", "output": "o", "answer": "a"}, "field 'instruction'"),
        ({"instruction": "i", "output": 5, "answer": "a"}, "field 'output'"),
        ({"instruction": "i", "input": ["x"], "output": "o", "answer": "a"}, "field 'input'"),
        ({"instruction": "i", "output": "o", "answer": None}, "field 'answer'"),
        ({"instruction": "i", "output": "o", "answer": True}, "field 'answer'"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, row, field):
    p = _write(tmp_path / "bad.json", json.dumps([ROWS[0], row]))
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert str(p) in msg and "row 1" in msg and field in msg


def test_malformed_jsonl_row_names_row_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", json.dumps(ROWS[0]) + "\n\n" + json.dumps({"instruction": "i", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1 \(line 3\): missing field 'output'"):
        load_records(p)
    p = _write(tmp_path / "broken.jsonl", json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 1 \(line 2\): invalid JSON"):
        load_records(p)
    p = _write(tmp_path / "notobj.json", json.dumps([ROWS[0], "just a string"]))
    with pytest.raises(DataError, match=r"notobj\.json: row 1: expected an object"):
        load_records(p)


def test_load_errors_empty_encoding_syntax(tmp_path):
    with pytest.raises(DataError, match=r"empty\.json: file is empty"):
        load_records(_write(tmp_path / "empty.json", ""))
    with pytest.raises(DataError, match="file is empty"):
        load_records(_write(tmp_path / "blank.jsonl", "\n  \n"))
    latin1 = json.dumps([dict(ROWS[0], instruction="café")], ensure_ascii=False).encode("latin-1")
    with pytest.raises(DataError, match=r"latin\.json: not valid UTF-8 \(bad byte 0xe9"):
        load_records(_write(tmp_path / "latin.json", latin1))
    with pytest.raises(DataError, match=r"syntax\.json: invalid JSON at line 1"):
        load_records(_write(tmp_path / "syntax.json", '[{"instruction": "x",]'))
    with pytest.raises(DataError, match="contains no records"):
        load_records(_write(tmp_path / "none.json", "[]"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(tmp_path / "missing.json")


def test_optional_answer(tmp_path):
    p = _write(tmp_path / "train.json", json.dumps([{"instruction": "i", "output": "o"}]))
    assert load_records(p, require_answer=False)[0]["output"] == "o"


# ----------------------------------------------------------------------------- splits
IDS = [f"t-{i:05d}" for i in range(200)]


def test_split_disjoint_complete_deterministic():
    train, test = split_ids(IDS, 50, seed=0)
    assert len(test) == 50 and len(train) == 150
    assert not set(train) & set(test) and set(train) | set(test) == set(IDS)
    assert split_ids(IDS, 50, seed=0) == (train, test)
    assert split_ids(list(reversed(IDS)), 50, seed=0) == (train, test)  # input order does not matter
    assert split_ids(IDS, 50, seed=1)[1] != test
    assert set(split_ids(IDS, 20, seed=0)[1]) <= set(test)  # smaller test set: a subset
    assert split_ids(IDS, 0.25, seed=0) == (train, test)  # fraction == count


def test_split_rejects_bad_sizes_and_duplicates():
    for bad in (0, 200, 1.0, 0.0, 10.0, -3, True, "10"):
        with pytest.raises(ValueError):
            split_ids(IDS, bad, seed=0)
    with pytest.raises(ValueError, match="unique"):
        split_ids(["a", "b", "a"], 1, seed=0)
    assert resolve_test_size(0.001, 200) == 1
    assert resolve_test_size(10, 200) == 10


def test_split_records_round_trip(tmp_path):
    recs = [{"id": i, "instruction": f"question {i}?\n\nAnswer format: true/false", "input": "",
             "output": "the correct answer is true", "answer": "true"} for i in IDS]
    train, test = split_records(recs, 0.2, seed=3)
    write_records(tmp_path / "train.json", train)
    write_records(tmp_path / "test.json", test)
    assert load_records(tmp_path / "train.json") == train
    assert load_records(tmp_path / "test.json") == test
    assert sorted(train + test, key=lambda r: r["id"]) == recs


# ----------------------------------------------------------------------------- task sources
def _chat(content, ideal):
    return json.dumps({"input": [{"role": "user", "content": content}], "ideal": ideal})


SIQA_LINES = [
    _chat("Carson was at a friend's house but suddenly announced they needed to go home. Why did Carson do this? "
          "A: caught a bus; B: called a cab; C: forgot to feed the dog.", "C"),
    _chat("Tracy led their army. How would you describe Tracy? A: peasant; B: ruler; C: powerful.", "C"),
    _chat("Tracy led their army. How would you describe Tracy? A: peasant; B: ruler; C: powerful.", "C"),  # duplicate
    _chat("no options here", "A"),  # unparseable
] + [_chat(f"Person {i} did thing {i}. Why? A: reason a{i}; B: reason b{i}; C: reason c{i}.", "ABC"[i % 3]) for i in range(12)]


def test_parse_siqa_and_build_records():
    items, bad = _parse_siqa("\n".join(SIQA_LINES).encode())
    assert bad == [3] and len(items) == 15
    assert items[0] == Item(0, "Carson was at a friend's house but suddenly announced they needed to go home. Why did Carson do this?",
                            ("caught a bus", "called a cab", "forgot to feed the dog"), "answer3")
    recs, dropped = build_task_records("social_i_qa", items)
    assert dropped == {"duplicates_dropped": [2], "conflicting_dropped": []}
    assert recs[0] == {"id": "social_i_qa-00000", "instruction": SIQA_INSTRUCTION, "input": "",
                       "output": "the correct answer is answer3", "answer": "answer3"}
    for r in recs:
        assert extract_answer("social_i_qa", r["output"]) == r["answer"]
        assert answer_format_from_instruction(r["instruction"]) == "answer"


def test_parse_quartz_and_conflicts():
    lines = [
        _chat("Eric adds more resistors to the series circuit. The resistance\n\n A: increases\n B: decreases", "A"),
        _chat("Same question\n\n A: up\n B: down", "A"),
        _chat("Same question\n\n A: up\n B: down", "B"),  # conflicting label: both dropped
    ]
    items, bad = _parse_quartz("\n".join(lines).encode())
    assert bad == [] and items[0].options == ("increases", "decreases") and items[0].label == "option1"
    recs, dropped = build_task_records("quartz", items)
    assert dropped["conflicting_dropped"] == [1, 2] and len(recs) == 1
    assert recs[0]["instruction"].endswith("Option1: increases Option2: decreases Answer format: option1/option2")
    assert extract_answer("quartz", recs[0]["output"]) == "option1"


def test_parse_strategyqa():
    task = {"canary": "x", "examples": [
        {"input": "Would a pear sink in water?", "target_scores": {"Yes": 0, "No": 1}, "target": "No. ..."},
        {"input": "Is frost common at commencements?", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes."},
        {"input": "Broken?", "target_scores": {"Maybe": 1}},
    ]}
    items, bad = _parse_strategyqa(json.dumps(task).encode())
    assert bad == [2] and [i.label for i in items] == ["false", "true"]
    recs, _ = build_task_records("strategyqa", items)
    assert recs[0]["instruction"] == ("Please answer the following question with true or false, question: "
                                      "Would a pear sink in water?\n\nAnswer format: true/false")
    assert extract_answer("strategyqa", recs[0]["output"]) == "false"


# ----------------------------------------------------------------------------- prepare (offline)
def _fake_evals_wheel(cache):
    d = cache / "downloads"
    d.mkdir(parents=True)
    name, version = EVALS.split("==")
    with zipfile.ZipFile(d / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr("evals/registry/data/theory_of_mind/socialiqa/test.jsonl", "\n".join(SIQA_LINES) + "\n")


def test_prepare_data_offline_from_cached_archive(tmp_path, capsys):
    _fake_evals_wheel(tmp_path)
    out = prepare_data("social_i_qa", cache_dir=tmp_path, seed=7, test_size=4)
    train, test = load_records(out["train"]), load_records(out["test"])
    meta = json.loads(out["meta"].read_text())
    assert len(test) == 4 and len(train) == 10
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert meta["splits"] == {"train": [r["id"] for r in train], "test": [r["id"] for r in test]}
    assert meta["seed"] == 7 and meta["counts"]["usable"] == 14 and meta["counts"]["unparseable"] == 1
    assert meta["counts"]["duplicates_dropped"] == 1 and len(meta["source"]["member_sha256"]) == 64
    # idempotent: a second call finds it complete and rewrites nothing
    mtime = out["train"].stat().st_mtime_ns
    assert prepare_data("social_i_qa", cache_dir=tmp_path, seed=7, test_size=4) == out
    assert out["train"].stat().st_mtime_ns == mtime and "ready" in capsys.readouterr().err
    # limit: prefixes of the full split, in their own folder
    small = prepare_data("social_i_qa", cache_dir=tmp_path, seed=7, test_size=4, limit=3, test_limit=2)
    assert small["train"].parent != out["train"].parent
    assert [r["id"] for r in load_records(small["train"])] == [r["id"] for r in train[:3]]
    assert [r["id"] for r in load_records(small["test"])] == [r["id"] for r in test[:2]]
    # a tampered file is noticed and rebuilt
    out["test"].write_text("[]")
    prepare_data("social_i_qa", cache_dir=tmp_path, seed=7, test_size=4)
    assert len(load_records(out["test"])) == 4


def test_prepare_data_rejects_unknown_and_user_only_tasks(tmp_path):
    with pytest.raises(ValueError, match="prepare_user_file"):
        prepare_data("boolq", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        prepare_data("nope", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        prepare_data("social_i_qa", cache_dir=tmp_path, limit=0)


def test_prepare_user_file(tmp_path):
    p = _write(tmp_path / "commonsense_mini.json", json.dumps(ROWS[:2]))
    before = p.read_bytes()
    info = prepare_user_file(p)
    assert info["rows"] == 2 and info["answer_formats"] == {"truefalse": 2} and p.read_bytes() == before
    q = _write(tmp_path / "math.json", json.dumps(ROWS))
    with pytest.raises(DataError, match=r"math\.json: row 2: field 'instruction' names no answer format"):
        prepare_user_file(q)
    assert prepare_user_file(q, task="boolq")["answer_formats"] == {"truefalse": 3}


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "c"))
    assert cache_root() == (tmp_path / "c").resolve() and (tmp_path / "c").is_dir()
    assert cache_root(tmp_path / "d") == (tmp_path / "d").resolve()


# ----------------------------------------------------------------------------- the training loader
def _ids_of(loader) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in loader]


def test_train_loader_shards_are_disjoint_full_and_reproducible():
    from pipeline.data.loader import micro_batches_per_epoch, train_loader

    examples = [{"input_ids": [i, 1, 2], "labels": [i, 1, 2]} for i in range(23)]
    loaders = [train_loader(examples, rank, 2, seed=7, micro_batch_size=3, pad_id=0) for rank in range(2)]
    for loader in loaders:
        loader.sampler.start_at(0, 0)
    batches = [_ids_of(loader) for loader in loaders]
    assert [len(b) for b in batches] == [micro_batches_per_epoch(23, 2, 3)] * 2 == [3, 3]
    seen = [i for b in batches for batch in b for i in batch]
    assert len(seen) == len(set(seen)) == 18  # disjoint; 23 // 2 = 11 each, 3 full batches of 3
    loaders[0].sampler.start_at(0, 0)
    assert _ids_of(loaders[0]) == batches[0]
    loaders[0].sampler.start_at(1, 0)
    assert _ids_of(loaders[0]) != batches[0]  # a new shuffle every epoch


def test_train_loader_resumes_mid_epoch_and_leaves_the_global_rng_alone():
    import torch

    from pipeline.data.loader import train_loader

    examples = [{"input_ids": [i], "labels": [i]} for i in range(40)]
    whole = train_loader(examples, 1, 2, seed=3, micro_batch_size=2, pad_id=0)
    whole.sampler.start_at(2, 0)
    full_epoch = _ids_of(whole)
    resumed = train_loader(examples, 1, 2, seed=3, micro_batch_size=2, pad_id=0)
    resumed.sampler.start_at(2, 4)
    state = torch.get_rng_state()
    assert _ids_of(resumed) == full_epoch[4:]
    assert torch.equal(torch.get_rng_state(), state)  # dropout's stream is the same resumed or not
    resumed.sampler.start_at(3, 0)  # the skip applies to one epoch only
    assert len(_ids_of(resumed)) == len(full_epoch)


def test_the_default_cache_is_the_repository_s_own_dot_cache(monkeypatch):
    """configs/*.yaml and launch/demo.sh name .cache/models/... and .cache/data/... under the
    repository: the default must be that folder wherever prepare.py lives in the package."""
    from pipeline.data.packages import cache_root

    monkeypatch.delenv("TSD_CACHE", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert cache_root() == repo / ".cache"
    assert (repo / "configs/demo.yaml").read_text().count(".cache/") >= 2
