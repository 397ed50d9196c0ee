"""Broken files and unreachable servers, in every command (issue 25 item 6): one `error:` line,
exit 2, no traceback, nothing written, and never a password, whatever the command.

- Broken files: a model folder's weights truncated in their data or in their header, or garbage;
  its config.json, tokenizer.json, tokenizer_config.json cut in half; an adapter's files garbage
  or cut; a data file cut. Commands: train, the worker entry, evaluate, merge, analyze.
- Unreachable servers: an http tracking URI with a password, nothing listening, for every command
  that takes one (train and the worker through tracking.uri or --tracking-uri, evaluate --run-id,
  compare; $MLFLOW_TRACKING_URI too), and a server that goes away after the start-up check (MLflow's
  own connection error, recognised by type).
- The last resort: an exception nobody expected is a traceback and exit 1, its secrets masked, in
  `tsd` and in the worker entry's top level.

Every case runs in-process (`cli.main`, the worker's `main` or its `__main__` block via runpy).
"""

from __future__ import annotations

import random
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.launch import cli
from proc_group import TINY_DATA, free_port, make_tiny_model, tiny_config

PASSWORD = "pw-that-must-not-show"


@pytest.fixture(scope="module")
def dead() -> str:
    """An http tracking URI with a password where nothing listens."""
    return f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}/"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder and a LoRA-Dash adapter of it (no training: the switch run in-process)."""
    import tsd
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("good")
    model = make_tiny_model(root / "model")
    net = AutoModelForCausalLM.from_pretrained(str(model))
    config = tsd.TSDConfig(method="dash", r=2, targets=["q_proj", "v_proj"], switch_step=1, num_directions=2)
    tsd.inject(net, config)
    tsd.run_switch(net, tsd.DASH, 1)
    adapter = tsd.save_adapter(net, root / "adapter", config, str(model))
    return {"model": model, "adapter": adapter}


def _break(src: Path, dst: Path, name: str, how: str) -> Path:
    """A copy of folder `src` (or file) at `dst` whose file `name` is cut in its data (half), cut
    inside its header (head: the first 50 bytes) or garbage."""
    if src.is_dir():
        shutil.copytree(src, dst)
        target = dst / name
    else:
        shutil.copy(src, dst)
        target = dst
    data = target.read_bytes()
    target.write_bytes({"half": data[: len(data) // 2], "head": data[:50],
                        "garbage": random.Random(0).randbytes(300)}[how])
    return dst


def _run(fn, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_error_line(rc, out, err, *fragments) -> str:
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    assert PASSWORD not in out + err, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line:\n{err}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def _config(tmp_path: Path, model: Path, **tracking) -> Path:
    cfg = tiny_config(model, tmp_path / "runs", "broken")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path}/runs/mlflow.db"
    cfg["tracking"].update(tracking)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def worker_main(monkeypatch):
    """The worker entry's `main`, as one process started by hand (no launcher, one rank)."""
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    from pipeline.launch.worker import main

    return main


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- broken files
MODEL_BREAKS = [("model.safetensors", "half", "its tensors end at byte"),
                ("model.safetensors", "head", "truncated, or not safetensors"),
                ("model.safetensors", "garbage", "truncated, or not safetensors"),
                ("config.json", "half", "is not valid JSON"),
                ("config.json", "garbage", "is not valid JSON"),
                ("tokenizer.json", "half", "is not valid JSON"),
                ("tokenizer_config.json", "half", "is not valid JSON")]


def _model_command(command, tmp_path, good, model, worker_main):
    """(the function to call, argv, the key the message names) for `command` on base model `model`."""
    out = str(tmp_path / "out")
    if command == "train":
        return cli.main, ["train", str(_config(tmp_path, model))], "model.path"
    if command == "worker":
        return worker_main, [str(_config(tmp_path, model))], "model.path"
    if command == "evaluate":
        return cli.main, ["evaluate", "--model", str(model), "--adapter", str(good["adapter"]),
                          "--data", f"boolq={TINY_DATA}", "--out", out], "--model"
    return cli.main, ["merge", "--adapter", str(good["adapter"]), "--model", str(model), "--out", out], "--model"


@pytest.mark.parametrize("name, how, says", MODEL_BREAKS, ids=[f"{n}-{h}" for n, h, _ in MODEL_BREAKS])
@pytest.mark.parametrize("command", ["train", "worker", "evaluate", "merge"])
def test_a_broken_model_file_is_one_line(tmp_path, capsys, good, worker_main, command, name, how, says):
    model = _break(good["model"], tmp_path / "model", name, how)
    fn, argv, key = _model_command(command, tmp_path, good, model, worker_main)
    _assert_one_error_line(*_run(fn, argv, capsys), f"{key}: {model / name} ", says)
    _nothing_written(tmp_path)


ADAPTER_BREAKS = [("adapter_model.safetensors", "garbage", "truncated, or not safetensors"),
                  ("adapter_model.safetensors", "half", "its tensors end at byte"),
                  ("tsd_state.safetensors", "garbage", "truncated, or not safetensors"),
                  ("tsd_state.safetensors", "half", "its tensors end at byte"),
                  ("adapter_config.json", "half", "is not valid JSON")]


@pytest.mark.parametrize("name, how, says", ADAPTER_BREAKS, ids=[f"{n}-{h}" for n, h, _ in ADAPTER_BREAKS])
@pytest.mark.parametrize("command", ["evaluate", "merge", "analyze"])
def test_a_broken_adapter_file_is_one_line(tmp_path, capsys, good, command, name, how, says):
    adapter = _break(good["adapter"], tmp_path / "adapter", name, how)
    out = str(tmp_path / "out")
    argv, key = {
        "evaluate": (["evaluate", "--model", str(good["model"]), "--adapter", str(adapter), "--data",
                      f"boolq={TINY_DATA}", "--out", out], "--adapter"),
        "merge": (["merge", "--adapter", str(adapter), "--model", str(good["model"]), "--out", out], "--adapter"),
        "analyze": (["analyze", str(adapter), str(good["adapter"]), "--out", out], "analyze"),
    }[command]
    _assert_one_error_line(*_run(cli.main, argv, capsys), f"{key}: {adapter / name} ", says)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["train", "worker", "evaluate"])
def test_a_broken_data_file_is_one_line(tmp_path, capsys, good, worker_main, command):
    data = _break(TINY_DATA, tmp_path / "train.json", "", "half")
    cfg = tiny_config(good["model"], tmp_path / "runs", "broken")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path}/runs/mlflow.db"
    cfg["data"]["train"] = str(data)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    fn, argv = {
        "train": (cli.main, ["train", str(tmp_path / "cfg.yaml")]),
        "worker": (worker_main, [str(tmp_path / "cfg.yaml")]),
        "evaluate": (cli.main, ["evaluate", "--model", str(good["model"]), "--adapter", str(good["adapter"]),
                                "--data", f"boolq={data}", "--out", str(tmp_path / "out")]),
    }[command]
    _assert_one_error_line(*_run(fn, argv, capsys), f"{data}: invalid JSON")
    _nothing_written(tmp_path)


# ----------------------------------------------------------------------------- unreachable servers
def _server_command(case, tmp_path, good, dead, worker_main, monkeypatch):
    """(function, argv, the setting the message names) of an unreachable-server case."""
    if case == "train tracking.uri":
        return cli.main, ["train", str(_config(tmp_path, good["model"], uri=dead))], "tracking.uri"
    if case == "worker tracking.uri":
        return worker_main, [str(_config(tmp_path, good["model"], uri=dead))], "tracking.uri"
    if case == "worker --tracking-uri":
        return worker_main, [str(_config(tmp_path, good["model"])), "--tracking-uri", dead], "tracking.uri"
    evaluate = ["evaluate", "--model", str(good["model"]), "--adapter", str(good["adapter"]), "--data",
                f"boolq={TINY_DATA}", "--out", str(tmp_path / "out"), "--run-id", "0123abcd"]
    if case == "evaluate --tracking-uri":
        return cli.main, evaluate + ["--tracking-uri", dead], "--tracking-uri"
    if case == "evaluate $MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
        return cli.main, evaluate, "$MLFLOW_TRACKING_URI"
    if case == "compare --tracking-uri":
        return cli.main, ["compare", "sweep", "--tracking-uri", dead, "--out", str(tmp_path / "out")], "--tracking-uri"
    assert case == "compare $MLFLOW_TRACKING_URI"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    return cli.main, ["compare", "sweep", "--log-run"], "$MLFLOW_TRACKING_URI"


SERVER_CASES = ["train tracking.uri", "worker tracking.uri", "worker --tracking-uri", "evaluate --tracking-uri",
                "evaluate $MLFLOW_TRACKING_URI", "compare --tracking-uri", "compare $MLFLOW_TRACKING_URI"]


@pytest.mark.parametrize("case", SERVER_CASES)
def test_an_unreachable_tracking_server_is_one_masked_line(tmp_path, capsys, good, dead, worker_main, monkeypatch,
                                                           case):
    fn, argv, key = _server_command(case, tmp_path, good, dead, worker_main, monkeypatch)
    masked = dead.replace(PASSWORD, "***")
    _assert_one_error_line(*_run(fn, argv, capsys), f"{key}: the MLflow tracking server {masked} is not reachable")
    _nothing_written(tmp_path)


def test_a_server_gone_after_the_check_is_one_masked_line(tmp_path, capsys, dead, monkeypatch):
    """MLflow's own error for a refused connection (an MlflowException raised while handling
    requests' ConnectionError), recognised by type: the server went away after the start-up check."""
    import pipeline.tracking.store

    monkeypatch.setattr(pipeline.tracking.store, "check_reachable", lambda *a, **k: None)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow reads it per request
    line = _assert_one_error_line(*_run(cli.main, ["compare", "sweep", "--tracking-uri", dead], capsys),
                                  "a server did not answer", "Connection refused")
    assert "alice:***@127.0.0.1" in line


# ----------------------------------------------------------------------------- the last resort
def test_an_unexpected_error_is_a_traceback_with_secrets_masked(tmp_path, capsys, dead, monkeypatch):
    import pipeline.reports.analyze

    def bug(*args, **kwargs):
        raise RuntimeError(f"something nobody expected near {dead}")

    monkeypatch.setattr(pipeline.reports.analyze, "analyze_adapters", bug)
    rc, out, err = _run(cli.main, ["analyze", str(tmp_path)], capsys)
    assert rc == 1 and "Traceback" in err and "RuntimeError: something nobody expected near http://alice:***@" in err
    assert PASSWORD not in out + err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
@pytest.mark.parametrize("raised, code", [("connection", 2), ("bug", 1)])
def test_the_worker_entrys_top_level_masks_and_names_a_dead_server(tmp_path, capsys, dead, good, worker_main,
                                                                   monkeypatch, raised, code):
    """`python -m pipeline.launch.worker`'s own handler (its __main__ block, run in-process): an
    error that escapes main() is one line when it is a connection error, else a traceback; either
    way without the password. (The process's end is stood in for: it would end pytest.)"""
    import pipeline.launch.preflight
    import pipeline.training.distributed

    def down(*args, **kwargs):
        if raised == "bug":
            raise RuntimeError(f"a bug near {dead}")
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:  # as MLflow raises its own error while handling the connection's
            raise RuntimeError(f"API request to {dead}api/2.0/mlflow/runs/get failed")  # noqa: B904

    def ended(code):
        raise SystemExit(code)

    monkeypatch.setattr(pipeline.launch.preflight, "preflight", down)
    monkeypatch.setattr(pipeline.training.distributed, "end_process", ended)
    monkeypatch.setattr(sys, "argv", ["pipeline.launch.worker", str(_config(tmp_path, good["model"]))])
    rc, out, err = _run(lambda _: runpy.run_module("pipeline.launch.worker", run_name="__main__"), None, capsys)
    assert rc == code and PASSWORD not in out + err, err
    if raised == "connection":
        _assert_one_error_line(rc, out, err, "a server did not answer (API request to http://alice:***@")
    else:
        assert "Traceback" in err and "RuntimeError: a bug near http://alice:***@" in err
