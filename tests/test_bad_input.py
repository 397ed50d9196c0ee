"""Malformed input, one case per test: the `tsd` CLI prints one clear line naming what is wrong
and where, exits 2, shows no Python traceback, and writes nothing that looks like a finished run
(no adapter, no result.json, no MLflow store). `tsd train` fails in its preflight, before Ray
starts, so every case here is in-process and takes well under a second (a few subprocess cases
prove the same from the shell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.launch.cli import main
from proc_group import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = ROOT / "tests/data/tiny_train.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pipeline.data.synthetic import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("bad-input") / "model")


@pytest.fixture
def base(tmp_path, model_dir):
    """A valid tiny config (as a dict) whose outputs all go under tmp_path/runs."""
    cfg = tiny_config(model_dir, tmp_path / "runs", "bad")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path}/runs/mlflow.db"
    return cfg


def _write(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_clear_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, f"expected one error line:\n{err}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


def _assert_nothing_complete(tmp_path):
    run = tmp_path / "runs" / "bad"
    assert not (run / "adapter").exists()
    assert not (run / "result.json").exists()
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def _train(tmp_path, cfg, capsys, *sets):
    argv = ["train", _write(tmp_path, cfg)]
    for s in sets:
        argv += ["--set", s]
    rc, err = _cli(argv, capsys)
    _assert_nothing_complete(tmp_path)
    return rc, err


# ----------------------------------------------------------------------------- config
def test_unknown_key(tmp_path, base, capsys):
    base["method"]["rank"] = 8
    _assert_clear_error(*_train(tmp_path, base, capsys), "method.rank: unknown key", "cfg.yaml")


def test_wrong_type(tmp_path, base, capsys):
    _assert_clear_error(*_train(tmp_path, base, capsys, "train.lr=fast"), "train.lr: expected a number, got 'fast'")


def test_non_positive_value(tmp_path, base, capsys):
    _assert_clear_error(*_train(tmp_path, base, capsys, "train.micro_batch_size=0"), "train.micro_batch_size: must be > 0")


def test_switch_step_not_before_the_end(tmp_path, base, capsys):
    # tiny_cpu: dash, max_steps 5; a switch at step 5 would never train its directions
    rc, err = _train(tmp_path, base, capsys, "method.switch_step=5")
    _assert_clear_error(rc, err, "method.switch_step:", "step 5", "only 5 steps")


def test_register_as_without_a_run_to_register(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "tracking.register_as=my-adapter", "tracking.offline=true")
    _assert_clear_error(rc, err, "tracking.register_as:", "tracking.offline")


def test_register_as_on_a_file_store(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "tracking.register_as=my-adapter", f"tracking.uri=file://{tmp_path}/mlruns")
    _assert_clear_error(rc, err, "tracking.register_as needs a database-backed MLflow store", "file store")


def test_register_as_with_full_fine_tuning(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "tracking.register_as=my-adapter", "method.method=full")
    _assert_clear_error(rc, err, "tracking.register_as registers a PEFT adapter", "method: full")


def test_num_directions_larger_than_a_layer(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "method.num_directions=40")
    _assert_clear_error(rc, err, "method.num_directions:", "q_proj", "s=40 exceeds min(out, in)=32")


def test_rank_larger_than_a_layer(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "method.r=20")
    _assert_clear_error(rc, err, "method.r:", "k_proj", "r=20 exceeds min(out, in)=16")


def test_no_target_matched(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "method.targets=[qkv_proj]")
    _assert_clear_error(rc, err, "method.targets ['qkv_proj']: no module of LlamaForCausalLM matched", "q_proj")


def test_target_not_linear(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "method.targets=[self_attn]")
    _assert_clear_error(rc, err, "method.targets:", "self_attn", "not nn.Linear")


def test_workers_need_more_cpus_than_the_machine_has(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "workers.cpus_per_worker=100000")
    _assert_clear_error(rc, err, "workers: 2 workers x 100000 CPUs need 200000 CPUs; this machine has")


def test_gpu_workers_without_gpus(tmp_path, base, capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    rc, err = _train(tmp_path, base, capsys, "workers.use_gpu=true")
    _assert_clear_error(rc, err, "workers.use_gpu: 2 workers need 2 GPUs")


def test_bad_max_failures(tmp_path, base, capsys):
    _assert_clear_error(*_train(tmp_path, base, capsys, "workers.max_failures=-2"), "workers.max_failures: must be >= 0")


def test_missing_model_path(tmp_path, base, capsys):
    base["model"]["path"] = str(tmp_path / "no-such-model")
    _assert_clear_error(*_train(tmp_path, base, capsys), "model.path:", "no-such-model does not exist")


def test_model_path_without_config_json(tmp_path, base, capsys):
    (tmp_path / "empty-model").mkdir()
    base["model"]["path"] = str(tmp_path / "empty-model")
    _assert_clear_error(*_train(tmp_path, base, capsys), "model.path:", "empty-model", "no config.json")


def test_model_config_json_broken(tmp_path, base, capsys):
    (tmp_path / "broken-model").mkdir()
    (tmp_path / "broken-model/config.json").write_text("{not json")
    base["model"]["path"] = str(tmp_path / "broken-model")
    _assert_clear_error(*_train(tmp_path, base, capsys), "model.path:", "broken-model/config.json is not valid JSON")


def test_deepspeed_config_missing(tmp_path, base, capsys):
    base["deepspeed"]["config"] = str(tmp_path / "nope.json")
    _assert_clear_error(*_train(tmp_path, base, capsys), "deepspeed.config:", "nope.json not found")


def test_deepspeed_config_not_json(tmp_path, base, capsys):
    (tmp_path / "ds.json").write_text("zero_optimization: {stage: 3}")
    base["deepspeed"]["config"] = str(tmp_path / "ds.json")
    _assert_clear_error(*_train(tmp_path, base, capsys), "deepspeed.config:", "ds.json is not valid JSON")


def test_deepspeed_config_unsupported_stage(tmp_path, base, capsys):
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    base["deepspeed"]["config"] = str(tmp_path / "ds.json")
    _assert_clear_error(*_train(tmp_path, base, capsys), "deepspeed.config:", "zero_optimization.stage 1 is not one of")


def test_strategy_contradicting_the_deepspeed_json(tmp_path, base, capsys):
    base["deepspeed"].update(config=str(ROOT / "configs/deepspeed/zero3.json"), strategy="ddp")
    _assert_clear_error(*_train(tmp_path, base, capsys), "deepspeed.strategy: ddp contradicts zero_optimization.stage 3")


def test_strategy_unknown(tmp_path, base, capsys):
    base["deepspeed"]["strategy"] = "zero4"
    _assert_clear_error(*_train(tmp_path, base, capsys), "deepspeed.strategy")


def test_config_file_missing(tmp_path, capsys):
    rc, err = _cli(["train", str(tmp_path / "nope.yaml")], capsys)
    _assert_clear_error(rc, err, "nope.yaml: config file not found")


def test_config_not_yaml(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("model: [unclosed\n")
    rc, err = _cli(["train", str(tmp_path / "cfg.yaml")], capsys)
    _assert_clear_error(rc, err, "cfg.yaml: not valid YAML")


# ----------------------------------------------------------------------------- data
def _data(tmp_path, base, content, name="train.json", key="train"):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    base["data"][key] = str(f)
    return f


def test_data_missing_field(tmp_path, base, capsys):
    _data(tmp_path, base, json.dumps([{"instruction": "q", "answer": "a"}]))
    _assert_clear_error(*_train(tmp_path, base, capsys), "train.json: row 0: missing field 'output'")


def test_data_empty_file(tmp_path, base, capsys):
    _data(tmp_path, base, "")
    _assert_clear_error(*_train(tmp_path, base, capsys), "train.json: file is empty")


def test_data_bad_encoding(tmp_path, base, capsys):
    _data(tmp_path, base, b'[{"instruction": "caf\xe9", "output": "x", "answer": "x"}]')
    _assert_clear_error(*_train(tmp_path, base, capsys), "train.json: not valid UTF-8", "0xe9")


def test_data_invalid_json(tmp_path, base, capsys):
    _data(tmp_path, base, '[{"instruction": "q", "output": "x", "answer": "x"},]')
    _assert_clear_error(*_train(tmp_path, base, capsys), "train.json: invalid JSON at line 1")


def test_data_invalid_jsonl_line(tmp_path, base, capsys):
    _data(tmp_path, base, '{"instruction": "q", "output": "x", "answer": "x"}\n{"instruction": \n', name="train.jsonl")
    _assert_clear_error(*_train(tmp_path, base, capsys), "train.jsonl: row 1 (line 2): invalid JSON")


def test_data_file_missing(tmp_path, base, capsys):
    base["data"]["train"] = str(tmp_path / "nope.json")
    _assert_clear_error(*_train(tmp_path, base, capsys), "nope.json: data file not found")


def test_data_too_few_examples_for_the_workers(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "data.limit=3")
    _assert_clear_error(rc, err, "data.train: 3 examples are too few for 2 rank(s) x micro batch 2")


def test_test_answers_no_regex_can_match(tmp_path, base, capsys):
    rows = json.loads(TRAIN.read_text())[:4]
    rows[2]["answer"] = "the second one"
    _data(tmp_path, base, json.dumps(rows), name="test.json", key="test")
    base["data"]["task"] = "social_i_qa"
    rc, err = _train(tmp_path, base, capsys)
    _assert_clear_error(rc, err, "data.test:", "test.json: row 2: answer 'the second one' can never match", "'answer'")


def test_test_without_task(tmp_path, base, capsys):
    base["data"]["test"] = str(TRAIN)
    _assert_clear_error(*_train(tmp_path, base, capsys), "data.task: required with data.test")


def test_unknown_test_task(tmp_path, base, capsys):
    # (an unknown task name is fine when every row's instruction names its "Answer format: ...")
    _data(tmp_path, base, json.dumps([{"instruction": "q", "output": "x", "answer": "answer1"}]), name="test.json", key="test")
    base["data"]["task"] = "no_such_task"
    _assert_clear_error(*_train(tmp_path, base, capsys), "task 'no_such_task': unknown task name")


# ----------------------------------------------------------------------------- CLI arguments
def test_unknown_subcommand(capsys):
    rc, err = _cli(["trian", "x.yaml"], capsys)
    _assert_clear_error(rc, err, "invalid choice: 'trian'")


def test_missing_config_argument(capsys):
    rc, err = _cli(["train"], capsys)
    _assert_clear_error(rc, err, "the following arguments are required: config")


def test_bad_set_syntax(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "method.r")
    _assert_clear_error(rc, err, "override 'method.r' must look like section.key=value")


def test_set_into_a_value_not_a_section(tmp_path, base, capsys):
    rc, err = _train(tmp_path, base, capsys, "name.first=x")
    _assert_clear_error(rc, err, "override 'name.first=x': name is not a section")


def test_prepare_data_unknown_task(tmp_path, capsys):
    rc, err = _cli(["prepare-data", "no_such_task", "--cache", str(tmp_path)], capsys)
    _assert_clear_error(rc, err, "unknown task 'no_such_task': prepare_data builds")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_data_without_path(model_dir, capsys):
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--data", "social_i_qa="], capsys)
    _assert_clear_error(rc, err, "--data 'social_i_qa=': expected TASK=PATH")


def test_evaluate_data_file_missing(tmp_path, model_dir, capsys):
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--data", f"social_i_qa={tmp_path}/nope.json"], capsys)
    _assert_clear_error(rc, err, "nope.json: data file not found")


def test_evaluate_adapter_not_a_folder(tmp_path, model_dir, capsys):
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"),
                    "--data", f"social_i_qa={TRAIN}", "--out", str(tmp_path / "eval")], capsys)
    _assert_clear_error(rc, err, "--adapter:", "nope is not a folder")
    assert not (tmp_path / "eval").exists()


def test_evaluate_model_without_config_json(tmp_path, capsys):
    rc, err = _cli(["evaluate", "--model", str(tmp_path), "--data", f"social_i_qa={TRAIN}",
                    "--out", str(tmp_path / "eval")], capsys)
    _assert_clear_error(rc, err, "--model:", "no config.json")
    assert not (tmp_path / "eval").exists()


def test_evaluate_bad_dtype(model_dir, capsys):
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--data", f"social_i_qa={TRAIN}", "--dtype", "int8"], capsys)
    _assert_clear_error(rc, err, "argument --dtype: invalid choice: 'int8'")


# ----------------------------------------------------------------------------- from the shell
def _shell(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "tsd"), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_shell_rank_too_large_no_traceback_exit_2(tmp_path, base):
    proc = _shell(["train", _write(tmp_path, base), "--set", "method.r=20"])
    _assert_clear_error(proc.returncode, proc.stderr, "method.r:", "r=20 exceeds min(out, in)=16")
    _assert_nothing_complete(tmp_path)


def test_shell_worker_entry_runs_the_same_preflight(tmp_path, base):
    """`python -m pipeline.launch.worker` (the torchrun / DeepSpeed launcher entry) checks the same."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.launch.worker", _write(tmp_path, base), "--set", "method.targets=[nope]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_clear_error(proc.returncode, proc.stderr, "method.targets ['nope']: no module")
    _assert_nothing_complete(tmp_path)


# ----------------------------------------------------------------------------- numbers, duplicates, paths
# Each case: the one error line names the key, exit 2, and the run left NOTHING behind: no run
# folder, no MLflow store, no file anywhere under tmp_path that was not there before.
def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def no_training(monkeypatch):
    """A bad input must be refused before Ray starts: reaching the driver's run() fails the test
    at once (instead of training on a NaN learning rate for minutes)."""
    import pipeline.launch.driver

    def reached(*args, **kwargs):
        raise AssertionError("the bad input passed the preflight and reached run()")

    monkeypatch.setattr(pipeline.launch.driver, "run", reached)


def _train_nothing_written(tmp_path, cfg, capsys, *sets, text: str | None = None):
    path = tmp_path / "cfg.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(cfg))
    argv = ["train", str(path)]
    for s in sets:
        argv += ["--set", s]
    before = _files(tmp_path)
    rc, err = _cli(argv, capsys)
    assert _files(tmp_path) == before, f"written: {sorted(map(str, _files(tmp_path) - before))}"
    assert not (tmp_path / "runs").exists()
    return rc, err


NUMBER_CASES = [
    # non-finite numbers: the optimizer (or a worker) used to fail with a traceback
    (["train.lr=nan"], "train.lr: must be a finite number, got 'nan'"),
    (["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    (["train.lr=-inf"], "train.lr: must be a finite number, got '-inf'"),
    (["train.lr=1e999"], "train.lr: must be a finite number"),
    (["train.weight_decay=.nan"], "train.weight_decay: must be a finite number"),
    (["train.grad_clip=inf"], "train.grad_clip: must be a finite number"),
    (["train.epochs=.inf", "train.max_steps=null"], "train.epochs: must be a finite number"),
    (["method.alpha=.nan"], "method.alpha: must be a finite number"),
    (["method.dropout=.nan"], "method.dropout: must be a finite number"),
    # negative / zero where the value must be positive
    (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
    (["train.grad_clip=-1"], "train.grad_clip: must be >= 0 (0: no clipping), got -1.0"),
    (["train.epochs=-1"], "train.epochs: must be > 0, got -1.0"),
    (["train.log_every=0"], "train.log_every: must be > 0, got 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every: must be > 0"),
    (["train.checkpoint_every=-5"], "train.checkpoint_every: must be > 0"),
    (["train.eval_max_new_tokens=0"], "train.eval_max_new_tokens: must be > 0"),
    (["train.eval_num_beams=0"], "train.eval_num_beams: must be > 0"),
    (["train.eval_limit=0"], "train.eval_limit: must be > 0"),
    (["data.limit=0"], "data.limit: must be > 0"),
    (["data.limit=-3"], "data.limit: must be > 0"),
    (["workers.threads_per_worker=0"], "workers.threads_per_worker: must be > 0"),
    (["train.seed=-1"], "train.seed: must be in [0, 4294967295], got -1"),
    (["train.seed=4294967296"], "train.seed: must be in [0, 4294967295]"),
    # out of range / wrong kind (these were already refused; kept as the class's contract)
    (["method.dropout=1.0"], "method.dropout: must be in [0, 1)"),
    (["method.dropout=-0.5"], "method.dropout: must be in [0, 1)"),
    (["train.micro_batch_size=true"], "train.micro_batch_size: expected an integer, got True"),
    (["method.r=2.5"], "method.r: expected an integer, got 2.5"),
    (["train.lr=true"], "train.lr: expected a number, got True"),
]


@pytest.mark.parametrize("sets, message", NUMBER_CASES, ids=[" ".join(s) for s, _ in NUMBER_CASES])
def test_bad_number_names_its_key_and_writes_nothing(tmp_path, base, capsys, no_training, sets, message):
    _assert_clear_error(*_train_nothing_written(tmp_path, base, capsys, *sets), message, "cfg.yaml")


def test_non_finite_number_in_the_yaml_file(tmp_path, base, capsys, no_training):
    base["train"]["lr"] = float("nan")  # written as `lr: .nan`
    rc, err = _train_nothing_written(tmp_path, base, capsys)
    _assert_clear_error(rc, err, "cfg.yaml: train.lr: must be a finite number, got nan")


def test_non_finite_number_from_the_shell(tmp_path, base):
    path = _write(tmp_path, base)
    proc = _shell(["train", path, "--set", "train.lr=nan"])
    _assert_clear_error(proc.returncode, proc.stderr, "train.lr: must be a finite number")
    assert not (tmp_path / "runs").exists()


DUPLICATE_CASES = [
    ("train:\n  lr: 0.1\n  warmup_steps: 1\n  lr: 0.2\n", "train.lr: given twice (lines 2 and 4); keep one"),
    ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "train: given twice (lines 1 and 3)"),
    ("name: a\nname: b\n", "name: given twice (lines 1 and 2)"),
    ("method:\n  targets: [q_proj]\n  r: 4\n  r: 8\n", "method.r: given twice (lines 3 and 4)"),
]


@pytest.mark.parametrize("text, message", DUPLICATE_CASES, ids=[m.split(":")[0] for _, m in DUPLICATE_CASES])
def test_duplicated_yaml_key_names_it(tmp_path, base, capsys, no_training, text, message):
    # the valid base config, then the duplicated section appended as text
    # the duplicated section first (so the line numbers are the case's own), then the rest
    # of the valid base config
    body = yaml.safe_dump({k: v for k, v in base.items() if k != text.split(":")[0]})
    rc, err = _train_nothing_written(tmp_path, base, capsys, text=text + body)
    _assert_clear_error(rc, err, "cfg.yaml", message)


def _path_case(tmp_path: Path, base: dict, case: str) -> str:
    """Sets up one bad path in `base` (creating only the files the case needs); returns the message."""
    f = tmp_path / "a-file"
    f.write_text("x")
    d = tmp_path / "a-folder"
    d.mkdir()
    if case == "output_dir is a file":
        base["output_dir"] = str(f)
        base["tracking"]["uri"] = None
        return f"output_dir: {f} is a file, not a folder"
    if case == "output_dir under a file":
        base["output_dir"] = str(f / "runs")
        base["tracking"]["uri"] = None
        return f"output_dir: {f} is a file, not a folder"
    if case == "output_dir not writable":
        base["output_dir"] = "/proc/1/tsd-runs"
        return "output_dir: /proc/1/tsd-runs cannot be created: /proc/1 is not writable"
    if case == "run folder is a file":
        base["output_dir"] = str(d)
        (d / "bad").write_text("x")
        return f"name: the run folder {d / 'bad'} is a file"
    if case == "name with a slash":
        base["name"] = "../escape"
        return "name: '../escape' must be a plain folder name"
    if case == "empty name":
        base["name"] = ""
        return "name: must not be empty"
    if case == "model.path is a file":
        base["model"]["path"] = str(f)
        return f"model.path: {f} is a file, not a model folder"
    if case == "data.train missing":
        base["data"]["train"] = str(tmp_path / "nope.json")
        return f"data.train: {tmp_path / 'nope.json'}: data file not found"
    if case == "data.train is a folder":
        base["data"]["train"] = str(d)
        return f"data.train: {d} is a folder, not a data file"
    if case == "second data.train missing":
        base["data"]["train"] = [str(TRAIN), str(tmp_path / "nope.json")]
        return "data.train[1]: "
    if case == "data.test missing":
        base["data"]["test"] = f"social_i_qa={tmp_path / 'nope.json'}"
        return f"data.test: {tmp_path / 'nope.json'}: data file not found"
    if case == "deepspeed.config is a folder":
        base["deepspeed"]["config"] = str(d)
        return f"deepspeed.config: {d} is a folder, not a JSON file"
    if case == "svd_cache is a file":
        base["method"]["svd_cache"] = str(f)
        return f"method.svd_cache: {f} is a file, not a folder"
    if case == "svd_cache under a file":
        base["method"]["svd_cache"] = str(f / "svd")
        return f"method.svd_cache: {f} is a file, not a folder"
    if case == "sqlite store is a folder":
        base["tracking"]["uri"] = f"sqlite:///{d}"
        return f"tracking.uri: {d} is a folder, not a sqlite database file"
    if case == "sqlite store under a file":
        base["tracking"]["uri"] = f"sqlite:///{f}/mlflow.db"
        return f"tracking.uri: {f} is a file, not a folder"
    if case == "sqlite in memory":
        base["tracking"]["uri"] = "sqlite:///:memory:"
        return "tracking.uri: 'sqlite:///:memory:' names no database file"
    if case == "file store is a file":
        base["tracking"]["uri"] = f"file://{f}"
        return f"tracking.uri: {f} is a file, not a folder"
    if case == "http without host":
        base["tracking"]["uri"] = "http://:5000"
        return "tracking.uri: 'http://:5000' names no host"
    if case == "http bad port":
        base["tracking"]["uri"] = "http://127.0.0.1:99999"
        return "tracking.uri: 'http://127.0.0.1:99999': port out of range"
    if case == "unknown scheme":
        base["tracking"]["uri"] = "htp://127.0.0.1:5000"
        return "tracking.uri: unknown scheme 'htp'"
    if case == "empty experiment":
        base["tracking"]["experiment"] = ""
        return "tracking.experiment: must not be empty"
    raise AssertionError(case)


PATH_CASES = [
    "output_dir is a file", "output_dir under a file", "output_dir not writable", "run folder is a file",
    "name with a slash", "empty name", "model.path is a file", "data.train missing", "data.train is a folder",
    "second data.train missing", "data.test missing", "deepspeed.config is a folder", "svd_cache is a file",
    "svd_cache under a file", "sqlite store is a folder", "sqlite store under a file", "sqlite in memory",
    "file store is a file", "http without host", "http bad port", "unknown scheme", "empty experiment",
]


@pytest.mark.parametrize("case", PATH_CASES)
def test_bad_path_names_its_key_and_writes_nothing(tmp_path, base, capsys, no_training, case):
    message = _path_case(tmp_path, base, case)
    rc, err = _train_nothing_written(tmp_path, base, capsys)
    _assert_clear_error(rc, err, message)


def test_worker_entry_refuses_an_output_dir_that_is_a_file(tmp_path, base):
    """The torchrun / DeepSpeed launcher entry runs the same path checks."""
    (tmp_path / "a-file").write_text("x")
    base.update(output_dir=str(tmp_path / "a-file"))
    base["tracking"]["uri"] = None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.launch.worker", _write(tmp_path, base)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_clear_error(proc.returncode, proc.stderr, f"output_dir: {tmp_path / 'a-file'} is a file, not a folder")


EVAL_ARG_CASES = [
    (["--num-beams", "0"], "argument --num-beams: must be an integer > 0, got '0'"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer > 0, got '-1'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer > 0"),
    (["--limit", "0"], "argument --limit: must be an integer > 0"),
]


@pytest.mark.parametrize("args, message", EVAL_ARG_CASES, ids=[a[0] for a, _ in EVAL_ARG_CASES])
def test_evaluate_bad_numbers(tmp_path, model_dir, capsys, args, message):
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--data", f"social_i_qa={TRAIN}",
                    "--out", str(tmp_path / "eval"), *args], capsys)
    _assert_clear_error(rc, err, message)
    assert not (tmp_path / "eval").exists()


def test_evaluate_out_is_a_file(tmp_path, model_dir, capsys):
    (tmp_path / "eval").write_text("x")
    rc, err = _cli(["evaluate", "--model", str(model_dir), "--data", f"social_i_qa={TRAIN}",
                    "--out", str(tmp_path / "eval")], capsys)
    _assert_clear_error(rc, err, f"--out: {tmp_path / 'eval'} is a file, not a folder")
    assert (tmp_path / "eval").read_text() == "x"


@pytest.mark.parametrize("args, message", [
    (["compare", "x", "--digits", "-1"], "argument --digits: must be an integer >= 0"),
    (["compare", "x", "--loss-window", "-2"], "argument --loss-window: must be an integer >= 0"),
    (["prepare-data", "social_i_qa", "--test-size", "0"], "argument --test-size: must be an integer > 0"),
    (["prepare-data", "social_i_qa", "--limit", "-1"], "argument --limit: must be an integer > 0"),
])
def test_other_commands_bad_numbers(tmp_path, capsys, args, message):
    rc, err = _cli([*args, "--out" if args[0] == "compare" else "--cache", str(tmp_path / "out")], capsys)
    _assert_clear_error(rc, err, message)
    assert not (tmp_path / "out").exists()
