"""The training set through HF `datasets` (pipeline.data.sources, .training_set, .cache): every
format gives the examples the in-memory reference (pipeline.data.loader.TokenizedTasks /
TokenizedLabelled, one row at a time) gives; the cache is found on a second start and rebuilt when
a file, the tokenizer or a setting changes; the checks keep their messages; one rank per node
tokenizes (tests/dist/data_once_per_node.py, 2 ranks). Files are written into tmp_path; one
word-level tokenizer (built once per module) serves most tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from pipeline.config import DataConfig
from pipeline.data import training_set
from pipeline.data.loader import (TokenizedLabelled, TokenizedTasks, tokenize_labelled, tokenize_labelled_batch,
                                  train_loader)
from pipeline.data.tasks import DataError, generate_prompt, load_records, tokenize_batch, tokenize_example
from proc_group import ROOT, TINY_DATA, child_env, run_group

TASK_ROWS = json.loads(TINY_DATA.read_text())
LABELLED_ROWS = [
    {"text": f"the movie number {i} was {'great' if i % 3 else 'dull'}", "label": "pos" if i % 3 else "neg",
     **({"text_pair": f"a remark about {i}"} if i % 2 else {})}
    for i in range(12)
]


def _special_tokenizer(texts: list[str]):
    """A fast word-level tokenizer with a BOS/EOS template and BERT-style pair type ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B:1 </s>:1",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_input_names=["input_ids", "attention_mask", "token_type_ids"])


def _texts():
    return ([generate_prompt(r["instruction"], r.get("input"), r["output"]) for r in TASK_ROWS] +
            [r["text"] + " " + r.get("text_pair", "") for r in LABELLED_ROWS])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The tokenizer saved in a folder (a model folder's tokenizer files)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    _special_tokenizer(_texts()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _cfg(tmp_path, train, **data):
    train = [str(t) for t in (train if isinstance(train, list) else [train])]
    return SimpleNamespace(output_dir=str(tmp_path / "out"), data=DataConfig(train=train, **data))


def _rows(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# ----------------------------------------------------------------------------- batched tokenization
@pytest.mark.parametrize("cutoff_len", [8, 40, 1024])
@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_batched_tokenization_is_the_per_example_one(tok, cutoff_len, train_on_inputs):
    rows = TASK_ROWS[:6] + [dict(TASK_ROWS[6], input="some extra context")]
    one = [tokenize_example(tok, r, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs) for r in rows]
    many = tokenize_batch(tok, [r["instruction"] for r in rows], [r.get("input") for r in rows],
                          [r["output"] for r in rows], cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    assert [{k: many[k][i] for k in many} for i in range(len(rows))] == one
    if cutoff_len == 1024:  # EOS appended, labels masked up to the response when not training on inputs
        assert all(ex["input_ids"][-1] == tok.eos_token_id for ex in one)
        assert train_on_inputs or all(ex["labels"][0] == -100 for ex in one)


def test_batched_labelled_tokenization_is_the_per_row_one(tok):
    rows = LABELLED_ROWS
    one = [tokenize_labelled(tok, r, i % 2, cutoff_len=12) for i, r in enumerate(rows)]
    many = tokenize_labelled_batch(tok, [r["text"] for r in rows], [r.get("text_pair") for r in rows],
                                   [i % 2 for i in range(len(rows))], cutoff_len=12)
    assert [{k: many[k][i] for k in many} for i in range(len(rows))] == one
    assert any(1 in ex["token_type_ids"] for ex in one)  # the pairs really are pairs


# ----------------------------------------------------------------------------- formats
def _write_task_formats(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dict(r, input=r.get("input") or "") for r in TASK_ROWS]
    table = datasets.Dataset.from_list(rows)
    out = {"json": folder / "t.json", "jsonl": folder / "t.jsonl", "csv": folder / "t.csv",
           "parquet": folder / "t.parquet", "folder": folder / "t_saved"}
    out["json"].write_text(json.dumps(TASK_ROWS, indent=1))
    out["jsonl"].write_text("\n".join(json.dumps(r) for r in TASK_ROWS) + "\n\n")
    table.to_csv(out["csv"], index=False)
    table.to_parquet(out["parquet"])
    table.save_to_disk(out["folder"])
    return out


def test_every_format_gives_the_reference_examples_and_limit_spans_files(tmp_path, tok):
    files = _write_task_formats(tmp_path / "data")
    for train_on_inputs in (True, False):
        cfg = _cfg(tmp_path, files["json"], cutoff_len=64, train_on_inputs=train_on_inputs)
        want = [TokenizedTasks(cfg.data, tok)[i] for i in range(len(TASK_ROWS))]
        for fmt, path in files.items():
            got = training_set.training_dataset(_cfg(tmp_path, path, cutoff_len=64, train_on_inputs=train_on_inputs),
                                                tok, None)
            assert _rows(got) == want, fmt
            assert got.__getitems__([3, 0]) == [want[3], want[0]]
            mapped = [Path(f["filename"]) for f in got.table.cache_files]  # memory-mapped from the cache entry
            assert mapped and all(f.is_relative_to(got.entry) for f in mapped)
    # a limit across two files: the first 40 rows of the files in order, every row of both checked
    cfg = _cfg(tmp_path, [files["parquet"], files["jsonl"]], cutoff_len=64, limit=40)
    got = training_set.training_dataset(cfg, tok, None)
    ref = TokenizedTasks(_cfg(tmp_path, [files["json"], files["json"]], cutoff_len=64, limit=40).data, tok)
    assert len(got) == 40 and _rows(got) == [ref[i] for i in range(40)]
    assert load_records(files["parquet"]) == load_records(files["json"])  # the preflight's reader takes them too


def test_labelled_formats_give_the_reference_examples(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [dict(r, text_pair=r.get("text_pair")) for r in LABELLED_ROWS]
    table = datasets.Dataset.from_list(rows)
    files = {"json": folder / "l.json", "jsonl": folder / "l.jsonl", "csv": folder / "l.csv",
             "parquet": folder / "l.parquet", "folder": folder / "l_saved"}
    files["json"].write_text(json.dumps(LABELLED_ROWS))
    files["jsonl"].write_text("\n".join(json.dumps(r) for r in LABELLED_ROWS))
    files["csv"].write_text(" text , label,text_pair\n" + "".join(  # spaces around header names, as users write them
        f"{r['text']},{r['label']},{r.get('text_pair') or ''}\n" for r in LABELLED_ROWS))
    table.to_parquet(files["parquet"])
    table.save_to_disk(files["folder"])
    classes = ["neg", "pos"]
    want = _rows(TokenizedLabelled(_cfg(tmp_path, files["json"], cutoff_len=16).data, tok, classes))
    for fmt, path in files.items():
        got = training_set.training_dataset(_cfg(tmp_path, path, cutoff_len=16), tok, classes)
        assert got.labelled and _rows(got) == want, fmt
    from pipeline.data.loader import class_names

    assert class_names(_cfg(tmp_path, files["parquet"]).data) == classes


def test_the_loader_draws_the_same_batches_from_the_cache(tmp_path, tok):
    """Resume positions: the sampler's order and start_at do not depend on where examples live."""
    cfg = _cfg(tmp_path, TINY_DATA, cutoff_len=64)
    cached = training_set.training_dataset(cfg, tok, None)
    listed = TokenizedTasks(cfg.data, tok)
    for rank in (0, 1):
        a, b = (train_loader(d, rank, 2, seed=5, micro_batch_size=3, pad_id=tok.pad_token_id) for d in (cached, listed))
        a.sampler.start_at(1, 2)
        b.sampler.start_at(1, 2)
        got, want = list(a), list(b)
        assert len(got) == len(want) == 3
        for x, y in zip(got, want):
            assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


# ----------------------------------------------------------------------------- the cache
def test_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path, tok, tok_dir, monkeypatch):
    from transformers import AutoTokenizer

    builds = []
    real = training_set.build
    monkeypatch.setattr(training_set, "build", lambda *a, **k: builds.append(1) or real(*a, **k))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TASK_ROWS))
    cfg = _cfg(tmp_path, data, cutoff_len=64)

    def entry(c=cfg, t=tok):
        before = len(builds)
        return training_set.training_dataset(c, t, None).entry, len(builds) - before

    first, built = entry()
    assert built == 1
    assert entry() == (first, 0)  # a second start: found, nothing tokenized
    moved = tmp_path / "elsewhere"
    shutil.copytree(tok_dir, moved)
    assert entry(t=AutoTokenizer.from_pretrained(moved)) == (first, 0)  # the same tokenizer in another folder
    other = _special_tokenizer(_texts()[:5])  # another vocabulary
    changed = {entry(t=other), entry(c=_cfg(tmp_path, data, cutoff_len=32)),
               entry(c=_cfg(tmp_path, data, cutoff_len=64, train_on_inputs=False)),
               entry(c=_cfg(tmp_path, data, cutoff_len=64, limit=10))}
    assert len(changed) == 4 and all(b == 1 and e != first for e, b in changed)
    data.write_text("\n".join(json.dumps(r) for r in TASK_ROWS[:-1]))  # the file changes
    again, built = entry()
    assert built == 1 and again != first and len(training_set.training_dataset(cfg, tok, None)) == len(TASK_ROWS) - 1
    assert not [p for p in Path(cfg.output_dir, "data-cache").iterdir() if p.name.startswith(".")]  # no build left over
    meta = json.loads((again / "meta.json").read_text())
    assert meta["rows"] == len(TASK_ROWS) - 1 and meta["spec"]["sources"][0]["file"] == str(data)


def test_a_dead_builders_folder_is_removed_and_a_lost_race_is_harmless(tmp_path):
    from pipeline.data import cache

    folder = tmp_path / "c"
    spec = {"x": 1}
    name = cache.entry_name(spec)
    dead = folder / f".{name}.{os.uname().nodename}.999999999.tmp"  # no such pid
    dead.mkdir(parents=True)

    def build(tmp):
        datasets.Dataset.from_dict({"a": [1, 2]}).map(lambda b: b, batched=True,
                                                      cache_file_name=str(tmp / "part-00000.arrow"))
        if not (folder / name).exists():  # another builder of the same spec finishes first
            (folder / name).mkdir()
            (folder / name / "meta.json").write_text('{"rows": 2}')
        return 2

    entry, built = cache.find_or_build(folder, spec, build)
    assert built and entry == folder / name and not dead.exists()
    assert [p.name for p in folder.iterdir()] == [name]


# ----------------------------------------------------------------------------- checks and messages
def _raises(tmp_path, tok, path, exc, match, classes=None):
    with pytest.raises(exc, match=match):
        training_set.training_dataset(_cfg(tmp_path, path), tok, classes)


def test_bad_files_keep_their_messages(tmp_path, tok):
    def w(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    good = json.dumps(TASK_ROWS[0])
    _raises(tmp_path, tok, w("bad.jsonl", good + "\n\n" + json.dumps({"instruction": "i", "answer": "a"}) + "\n"),
            DataError, r"bad\.jsonl: row 1 \(line 3\): missing field 'output'")
    _raises(tmp_path, tok, w("broken.jsonl", good + "\n{not json\n"), DataError,
            r"broken\.jsonl: row 1 \(line 2\): invalid JSON")
    _raises(tmp_path, tok, w("types.json", json.dumps([TASK_ROWS[0], dict(TASK_ROWS[1], output=5)])), DataError,
            r"types\.json: row 1: field 'output' must be a string")
    _raises(tmp_path, tok, w("empty.json", ""), DataError, r"empty\.json: file is empty")
    _raises(tmp_path, tok, tmp_path / "missing.json", FileNotFoundError, r"missing\.json: data file not found")
    (tmp_path / "plain").mkdir()
    _raises(tmp_path, tok, tmp_path / "plain", DataError, "is a folder")
    rows = [dict(TASK_ROWS[0], input=""), dict(TASK_ROWS[1], input="", instruction=" ")]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "blank.parquet")
    _raises(tmp_path, tok, tmp_path / "blank.parquet", DataError,
            r"blank\.parquet: row 1: field 'instruction' must be a non-empty string")
    # a classifier's files: the CSV reader's own messages, and a class the run does not know
    _raises(tmp_path, tok, w("quote.csv", 'text,label\na,pos\n"b,neg\n'), DataError,
            r"quote\.csv: row 1 \(line 3\): not valid CSV \(unexpected end of data\)", classes=["neg", "pos"])
    _raises(tmp_path, tok, w("mixed.csv", "text,label\na,neg\nb,1\n"), DataError,
            r"mixed\.csv: row 1 \(line 3\): field 'label' is a class id \(1\)", classes=["neg", "pos"])
    _raises(tmp_path, tok, w("odd.csv", "text,label\na,neg\nb,meh\n"), DataError,
            r"odd\.csv: row 1: field 'label' is 'meh', not one of the 2 known classes", classes=["neg", "pos"])


def test_a_hub_name_resolves_only_from_the_local_cache_when_offline(tmp_path, tok, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    _raises(tmp_path, tok, "hub:someone/no-such-set:main@train", DataError,
            r"hub:someone/no-such-set:main@train: cannot load 'someone/no-such-set' config 'main' split 'train' "
            r"from the Hugging Face hub .*HF_HUB_OFFLINE is set")
    from pipeline.paths import resolve_paths
    from proc_group import tiny_config
    from pipeline.config import from_dict

    cfg = tiny_config(tmp_path, tmp_path / "runs", "hub")
    cfg["data"].update(train="hub:someone/set", cache_dir="cache")
    resolved = resolve_paths(from_dict(cfg), base=tmp_path)
    assert resolved.data.train == ["hub:someone/set"] and resolved.data.cache_dir == str(tmp_path / "cache")


def test_the_config_check_takes_saved_folders_and_hub_names_and_names_other_folders(tmp_path):
    """check_paths (before anything starts) lets a save_to_disk folder and a hub name through to
    pipeline.data.sources, and still refuses a plain folder, naming what it accepts."""
    from pipeline.config import ConfigError, from_dict
    from pipeline.launch.path_checks import check_paths
    from pipeline.paths import resolve_paths
    from proc_group import tiny_config

    files = _write_task_formats(tmp_path / "data")
    base = tiny_config(tmp_path, tmp_path / "runs", "paths")
    for train in ([str(files["folder"])], ["hub:someone/set@train", str(files["parquet"])]):
        base["data"]["train"] = train
        check_paths(resolve_paths(from_dict(base), base=tmp_path))
    base["data"]["train"] = str(tmp_path / "data")
    with pytest.raises(ConfigError, match=rf"data.train: {tmp_path / 'data'} is a folder, not a data file or a "
                                          r"folder written by Dataset.save_to_disk"):
        check_paths(resolve_paths(from_dict(base), base=tmp_path))


def test_under_a_launcher_rank_0_alone_reads_every_row_before_start(tmp_path, monkeypatch):
    """The worker's preflight reads the data rows on rank 0 only (one reader per job, not 8 per
    node); read_data=False really leaves the rows unread (a broken row passes it)."""
    from pipeline.config import from_dict
    from pipeline.launch import preflight as pf
    from pipeline.launch import worker
    from pipeline.paths import resolve_paths
    from proc_group import tiny_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TASK_ROWS[0]) + "\n{not json\n")
    base = tiny_config(tmp_path, tmp_path / "runs", "pf")
    base["data"]["train"] = str(bad)
    cfg = resolve_paths(from_dict(base), base=tmp_path)
    monkeypatch.setattr(pf, "check_tracking_reachable", lambda uri: None)
    monkeypatch.setattr(pf, "_check_model", lambda cfg: None)  # no model folder: the rows are the point
    pf.preflight(cfg, world=2, ray=False, read_data=False)
    with pytest.raises(DataError, match="bad.jsonl: row 1 .line 2.: invalid JSON"):
        pf.preflight(cfg, world=2, ray=False)
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["read_data"])
        raise ValueError("stop here")

    monkeypatch.setattr(worker, "preflight", record)
    monkeypatch.setattr(worker, "die_with_launcher", lambda: None)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(base))
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert worker.main([str(config)]) == 2
    assert seen == [True, False]


# ----------------------------------------------------------------------------- once per node
@pytest.mark.slow
def test_one_rank_per_node_tokenizes_the_others_map_its_entry(tmp_path, tok_dir):
    """2 ranks under torchrun (tests/dist/data_once_per_node.py): see its doc for the five starts."""
    data = tmp_path / "train.json"
    data.write_text(json.dumps(TASK_ROWS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/data_once_per_node.py"), str(tok_dir), str(data), str(tmp_path)]
    proc = run_group(cmd, cwd=ROOT, env=child_env(), timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["nodes"] == [[0, 1]]
    first = (r0["first"], r1["first"])
    assert first[0]["build"] == 1 and first[0]["tokenize_batch"] >= 1  # local rank 0 tokenizes
    assert first[1]["build"] == 0 and first[1]["tokenize_batch"] == 0  # local rank 1 only maps
    assert first[0]["entry"] == first[1]["entry"] and first[0]["rows"] == first[1]["rows"] == len(TASK_ROWS)
    assert first[0]["first"] == first[1]["first"] and first[0]["last"] == first[1]["last"]
    assert r0["again"]["build"] == r1["again"]["build"] == 0 and r0["again"]["entry"] == first[0]["entry"]
    # two nodes on one shared folder: rank 0 builds for both; node-local folders: each node builds
    assert (r0["shared"]["build"], r1["shared"]["build"]) == (1, 0) and r0["shared"]["entry"] == r1["shared"]["entry"]
    assert (r0["local"]["build"], r1["local"]["build"]) == (1, 1) and r0["local"]["entry"] != r1["local"]["entry"]
    assert r0["local"]["first"] == r1["local"]["first"]
    # a bad file: the same error on both ranks
    assert r0["bad"]["error"] == r1["bad"]["error"] and "bad.jsonl: row 1 (line 2): invalid JSON" in r0["bad"]["error"]


def test_the_readme_config_for_your_own_model_and_data_checks_out(tmp_path, capsys):
    """configs/own_model_and_data.yaml (README "Your own model and data") with the user's paths: an
    HF model folder, parquet + CSV rows. `tsd train --check` reads every row of both and writes
    nothing; a bad CSV row is one line naming file, row and field, exit 2."""
    import yaml

    from pipeline.launch.cli import main
    from proc_group import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    rows = [dict(r, input=r.get("input") or "") for r in TASK_ROWS]
    datasets.Dataset.from_list(rows[:30]).to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows[30:]).to_csv(tmp_path / "extra.csv", index=False)
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/own_model_and_data.yaml").read_text())
    sets = [f"model.path={model}", f"data.train=[{tmp_path / 'rows.parquet'},{tmp_path / 'extra.csv'}]",
            "data.test=[]", f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}", "workers.use_gpu=false", "workers.num_workers=1",
            "workers.cpus_per_worker=1", "tracking.uri=", "method.targets=[q_proj,v_proj]", "method.r=4",
            "method.alpha=8", "method.num_directions=2", "method.switch_step=2", "train.micro_batch_size=2",
            "train.grad_accum=1", "train.warmup_steps=0", "train.gradient_checkpointing=false"]
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump(cfg))
    argv = ["train", str(config), "--check"] + [x for s in sets for x in ("--set", s)]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "check out; nothing was written" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    with open(tmp_path / "extra.csv", "a") as f:
        f.write(",,an output,an answer\n")  # an empty instruction
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"{tmp_path / 'extra.csv'}: row {len(rows) - 30}: field 'instruction' must be a non-empty string" in err, err
    assert not (tmp_path / "runs").exists()
