"""MLflow tracking: the driver creates the run, a separate (worker) process logs into it.

Fast tests use throw-away sqlite stores under tmp_path; the server test (slow) starts
launch/mlflow_server.sh on a free loopback port and stops it by its PID.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_group import free_port, group_alive
import torch

from pipeline.reports.directions import plot_change_rates, representative_layers
from pipeline.tracking import store
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.registry import RegistryUnavailableError, model_registry_problem, register_adapter
from pipeline.tracking.secrets import mask_secrets, redact
from pipeline.tracking.store import (
    default_tracking_uri,
    end_run,
    ensure_experiment,
    flatten_params,
    start_run,
    summarize_run,
)
from tsd.directions import LayerDirections, layer_directions

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _directions(n_layers: int = 4, count: int = 3, seed: int = 0) -> list[LayerDirections]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        m, n, r = 24 + 4 * i, 16, 4
        w = torch.randn(m, n, generator=g)
        a = torch.randn(r, n, generator=g)
        b = torch.randn(m, r, generator=g)
        out.append(layer_directions(f"model.layers.{i}.self_attn.q_proj", w, a, b, 2.0, count))
    return out


def _as_plain(dirs: list[LayerDirections]) -> list[dict]:
    return [
        {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in vars(d).items()} for d in dirs
    ]


def _from_plain(rows: list[dict]) -> list[LayerDirections]:
    return [
        LayerDirections(
            name=r["name"],
            indices=torch.tensor(r["indices"], dtype=torch.long),
            sigma=torch.tensor(r["sigma"], dtype=torch.float64),
            U=torch.tensor(r["U"]),
            V=torch.tensor(r["V"]),
            change_rates=torch.tensor(r["change_rates"], dtype=torch.float64),
        )
        for r in rows
    ]


LOSSES = [2.5, 1.75, 1.25, 0.875, 0.5]


def _worker(uri: str, run_id: str, plain_dirs: list[dict], staging: str) -> None:
    """What rank 0 does inside a worker process: attach by run_id and log."""
    logger = RunLogger(uri, run_id, staging_dir=staging)
    assert logger.verify()
    for step, loss in enumerate(LOSSES):
        logger.log_metrics({"train/loss": loss, "train/lr": 1e-4 * (step + 1)}, step=step)
    logger.log_params({"worker": {"rank": 0, "hf_token": "hf_SECRET"}})
    logger.log_directions(_from_plain(plain_dirs), kind="switch", step=3)
    logger.log_dict({"tracking": {"uri": "http://bob:hunter2@mlflow:5000"}, "api_key": "k-SECRET"}, "config/run.json")
    ok = logger.close()
    # the non-zero ranks: every call is a no-op, nothing is created
    silent = RunLogger(uri, run_id, enabled=False)
    silent.log_metrics({"train/loss": 99.0}, step=0)
    silent.log_directions(_from_plain(plain_dirs), "switch", 0)
    sys.exit(0 if ok and logger.pending() == {"metrics": 0, "params": 0, "artifacts": 0} else 3)


# --------------------------------------------------------------------------- pure helpers


def test_secrets_are_masked_and_params_flattened():
    assert mask_secrets("http://user:pass@host:5000/x") == "http://user:***@host:5000/x"
    assert mask_secrets("postgresql://u:p%40ss@db/mlflow?sslmode=require") == "postgresql://u:***@db/mlflow?sslmode=require"
    assert mask_secrets("https://s3/x?X-Amz-Signature=abc&y=1") == "https://s3/x?X-Amz-Signature=***&y=1"
    assert mask_secrets("Authorization: Bearer abcdef123456") == "Authorization: Bearer ***"
    assert mask_secrets("http://host:5000") == "http://host:5000"

    flat = flatten_params(
        {
            "tracking": {"uri": "http://alice:s3cret@mlflow:5000", "password": "pw", "nested": {"apiKey": "k"}},
            "train": {"lr": 2e-4, "eval_max_new_tokens": 32, "targets": ["q_proj", "v_proj"]},
            "model": {"tokenizer": "tok", "path": None},
            "hf_token": "hf_x",
            "empty": {},
            "long": "x" * 10_000,
        }
    )
    assert flat["tracking.uri"] == "http://alice:***@mlflow:5000"
    assert flat["tracking.password"] == "***"
    assert flat["tracking.nested.apiKey"] == "***"
    assert flat["hf_token"] == "***"
    assert flat["train.lr"] == "0.0002"
    assert flat["train.eval_max_new_tokens"] == "32"  # "tokens" is not a secret word
    assert flat["model.tokenizer"] == "tok"
    assert flat["train.targets"] == '["q_proj", "v_proj"]'
    assert flat["model.path"] == "None"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == store.MAX_PARAM_VALUE_LENGTH
    assert all("s3cret" not in v and "hf_x" not in v for v in flat.values())
    assert redact({"a": {"secret": 1, "u": "http://a:b@c"}, "l": [{"token": "t"}]}) == {
        "a": {"secret": "***", "u": "http://a:***@c"},
        "l": [{"token": "***"}],
    }


def test_a_password_with_an_at_sign_is_masked_whole():
    """urlsplit (and so MLflow's requests) reads the password up to the LAST @ of the authority."""
    from urllib.parse import urlsplit

    uri = "http://alice:p@ss@word@mlflow:5000/x@y"
    assert urlsplit(uri).password == "p@ss@word"
    assert mask_secrets(uri) == "http://alice:***@mlflow:5000/x@y"
    assert mask_secrets("see http://a:b@h1 and http://c:d@e@h2/p") == "see http://a:***@h1 and http://c:***@h2/p"


SECRET = "pw-Zq81-s3cret"


def test_train_success_lines_mask_the_password(tmp_path, monkeypatch, capsys):
    """`tsd train`'s closing lines (run, UI hint) on the success path: the run itself is faked
    here (the slow test below runs a real one); what is printed is the CLI's own code."""
    import yaml

    import pipeline.launch.driver
    import pipeline.launch.preflight
    from pipeline.launch.cli import main

    uri = f"http://alice:{SECRET}@127.0.0.1:5000"
    seen = {}

    def fake_run(cfg, tracking_uri):
        seen["uri"] = tracking_uri  # the connection gets the full URI
        return {"run_id": "r" * 32, "metrics": {"wall_seconds": 1.0, "final_loss": 0.5}}

    monkeypatch.setattr(pipeline.launch.preflight, "preflight", lambda cfg: None)
    monkeypatch.setattr(pipeline.launch.driver, "run", fake_run)
    cfg = {"name": "x", "output_dir": str(tmp_path / "runs"), "model": {"path": "m"}, "data": {"train": "d.json"},
           "tracking": {"uri": uri}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr()
    assert seen["uri"] == uri
    assert SECRET not in out.out + out.err
    assert f"MLflow run {'r' * 32} in experiment 'lora-tsd' at http://alice:***@127.0.0.1:5000" in out.out
    assert "open the UI:  http://127.0.0.1:5000/#/experiments" in out.out


def test_default_uri_is_absolute_sqlite(tmp_path):
    uri = default_tracking_uri(tmp_path / "work")
    assert uri == f"sqlite:///{(tmp_path / 'work').resolve().as_posix()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # sqlite:/// + an absolute path
    assert store.default_artifact_root(uri) == (tmp_path / "work" / "mlartifacts").resolve().as_uri()
    assert store.resolve_tracking_uri(None, tmp_path / "work") == uri
    assert store.resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"
    here = Path.cwd().resolve().as_posix()
    assert store.resolve_tracking_uri("sqlite:///rel/m.db", tmp_path) == f"sqlite:///{here}/rel/m.db"


def test_plot_change_rates_is_pure_and_valid_png(tmp_path):
    dirs = _directions(n_layers=9)
    zero = layer_directions("zero", torch.randn(8, 8), torch.randn(2, 8), torch.zeros(8, 2), 1.0, 2)
    out = plot_change_rates(dirs + [zero], tmp_path / "plots" / "rates.png", title="t", max_layers=4)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["rates.png"]
    assert representative_layers(10, 4) == [0, 3, 6, 9]
    from PIL import Image

    with Image.open(out) as im:
        im.verify()


# --------------------------------------------------------------------------- driver + worker


def test_worker_process_logs_into_the_driver_run(tmp_path):
    uri = default_tracking_uri(tmp_path)
    dirs = _directions()
    run_id = start_run(
        uri,
        "tsd-test",
        run_name="dash-tiny",
        tags={"method": "dash", "world_size": 2, "hosts": ["node-a", "node-b"], "db": "http://u:pw@h"},
        params={"method": {"r": 8, "targets": ["q_proj"]}, "tracking": {"uri": "http://u:topsecret@h:5000"}},
    )

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_worker, args=(uri, run_id, _as_plain(dirs), str(tmp_path / "stage")))
    proc.start()
    try:
        proc.join(timeout=180)
        assert proc.exitcode == 0, f"worker exit code {proc.exitcode}"
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    end_run(uri, run_id, "FINISHED")

    client = store.client(uri)
    exp_id = ensure_experiment(uri, "tsd-test")  # idempotent: the same experiment
    runs = client.search_runs([exp_id])
    assert [r.info.run_id for r in runs] == [run_id]  # exactly one run: the worker created none

    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(enumerate(LOSSES))

    s = summarize_run(uri, run_id)
    assert s["status"] == "FINISHED"
    assert s["run_name"] == "dash-tiny"
    assert s["metrics"]["train/loss"] == LOSSES[-1]
    assert s["params"]["method.r"] == "8"
    assert s["params"]["tracking.uri"] == "http://u:***@h:5000"
    assert s["params"]["worker.hf_token"] == "***"
    assert {k: s["tags"][k] for k in ("method", "world_size", "hosts", "db")} == {
        "method": "dash",
        "world_size": "2",
        "hosts": "node-a,node-b",
        "db": "http://u:***@h",
    }
    assert "topsecret" not in json.dumps(s) and "hf_SECRET" not in json.dumps(s)
    assert set(s["artifacts"]) == {
        "config/run.json",
        "directions/switch/directions.csv",
        "directions/switch/directions.json",
        "directions/switch/change_rates.json",
        "directions/switch/change_rates.png",
    }
    assert s["artifact_uri"].startswith((tmp_path / "mlartifacts").resolve().as_uri())

    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    with (local / "directions/switch/directions.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = [
        (d.name, pos, int(i), float(sg), float(d.change_rates[int(i)]))
        for d in dirs
        for pos, (i, sg) in enumerate(zip(d.indices, d.sigma.double()))
    ]
    got = [(r["layer"], int(r["position"]), int(r["index"]), float(r["sigma"]), float(r["change_rate"])) for r in rows]
    assert got == expected
    table = json.loads((local / "directions/switch/directions.json").read_text())
    assert table["kind"] == "switch" and table["step"] == 3
    assert [tuple(r) for r in table["data"]] == expected
    spectra = json.loads((local / "directions/switch/change_rates.json").read_text())["layers"]
    assert spectra == {d.name: d.change_rates.double().tolist() for d in dirs}
    png = (local / "directions/switch/change_rates.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    cfg = (local / "config/run.json").read_text()
    assert "hunter2" not in cfg and "k-SECRET" not in cfg and "bob:***@mlflow" in cfg
    assert not any((tmp_path / "stage").rglob("*.*")), "staged copies are removed once uploaded"


def test_disabled_logger_does_nothing(tmp_path):
    logger = RunLogger("sqlite:///" + str(tmp_path / "never" / "mlflow.db"), "0" * 32, enabled=False)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_params({"a": 1})
    logger.log_text("x", "a.txt")
    logger.log_dict({"a": 1}, "a.json")
    logger.log_artifact(__file__)
    logger.log_artifacts(tmp_path, "x")
    logger.log_directions(_directions(1), "switch", 0)
    assert logger.flush() and logger.close()
    assert logger.pending() == {"metrics": 0, "params": 0, "artifacts": 0}
    assert logger._client_obj is None and not (tmp_path / "never").exists()


def test_unreachable_server_never_raises_and_keeps_the_buffer(tmp_path, caplog):
    port = free_port()  # nothing listens here
    logger = RunLogger(f"http://127.0.0.1:{port}", "f" * 32, http_max_retries=0, retry_interval_s=3600,
                       staging_dir=tmp_path / "stage")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.logger"):
        t0 = time.monotonic()
        logger.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)
        logger.log_metrics({"loss": 0.5}, step=1)  # within retry_interval_s: buffered only
        assert time.monotonic() - t0 < 30
        assert logger.pending()["metrics"] == 3 and not logger.healthy
        logger.log_text("notes", "notes/a.txt")  # staged on disk, not lost
        assert logger.flush() is False
        assert logger.close() is False
        assert logger.verify() is False
    assert logger.pending() == {"metrics": 3, "params": 0, "artifacts": 1}
    staged = list((tmp_path / "stage").rglob("a.txt"))
    assert len(staged) == 1 and staged[0].read_text() == "notes"
    assert sum("not reachable" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_transient_failure_is_retried_and_bad_params_do_not_block(tmp_path, caplog):
    uri = default_tracking_uri(tmp_path)
    run_id = start_run(uri, "retry", "r", tags={}, params={"fixed": 1})
    logger = RunLogger(uri, run_id, retry_interval_s=0.0)
    real = logger._client.log_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("tracking server restarting")
        return real(*args, **kwargs)

    logger._client.log_batch = flaky
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.logger"):
        logger.log_metrics({"loss": 3.0}, step=0)  # fails: kept
        assert logger.pending()["metrics"] == 1
        logger.log_metrics({"loss": 2.0}, step=1)  # retried: both sent
        assert logger.pending()["metrics"] == 0 and logger.healthy
        logger.log_params({"fixed": 2})  # MLflow params are immutable: rejected, dropped, no raise
        logger.log_metrics({"loss": 1.0}, step=2)
        assert logger.close()
    history = sorted(store.client(uri).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert summarize_run(uri, run_id)["params"]["fixed"] == "1"
    assert any("rejected params" in r.getMessage() for r in caplog.records)


def test_end_run_rejects_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="status must be one of"):
        end_run(default_tracking_uri(tmp_path), "0" * 32, "DONE")


# --------------------------------------------------------------------------- model registry


def _exported_adapter(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny base model folder and a real LoRA adapter exported for it (as tests/test_export.py
    does): (base folder, adapter folder, the adapter's saved tensors)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tsd
    from conftest import randomize_lora
    from pipeline.data.synthetic import make_model_dir

    base = make_model_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = tsd.TSDConfig(method="lora", r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"], switch_step=5)
    tsd.inject(model, config)
    randomize_lora(model, seed=1)  # nonzero A and B: a trained adapter, not the zero-initialised one
    adapter = tsd.save_adapter(model, tmp_path / "adapter", config, base_model_name_or_path=str(base))
    return base, adapter, load_file(str(adapter / "adapter_model.safetensors"))


def test_registered_adapter_is_a_loadable_model_version(tmp_path, monkeypatch):
    import mlflow.pyfunc
    from peft import PeftModel, get_peft_model_state_dict

    base, adapter, saved = _exported_adapter(tmp_path)
    uri = default_tracking_uri(tmp_path / "store")
    run_id = start_run(uri, "registry", "tiny")
    with RunLogger(uri, run_id) as logger:
        logger.log_artifacts(adapter, "adapter")  # as the training loop logs its export
    assert register_adapter(uri, run_id, "adapter", "tiny-adapter") == "1"
    assert register_adapter(uri, run_id, "adapter", "tiny-adapter") == "2"  # a later run: the next version
    end_run(uri, run_id)

    version = store.client(uri).get_model_version("tiny-adapter", "1")
    assert version.run_id == run_id and version.tags["base_model"] == str(base)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where `models:/` URIs are looked up
    loaded = mlflow.pyfunc.load_model("models:/tiny-adapter/1")
    peft_model = loaded.unwrap_python_model().model
    assert isinstance(peft_model, PeftModel)
    weights = get_peft_model_state_dict(peft_model)
    assert sorted(weights) == sorted(saved) and len(saved) == 8  # 2 layers x (q, v) x (A, B)
    for key, tensor in saved.items():
        assert torch.equal(weights[key], tensor), key
    (text,) = loaded.predict(["the quick brown fox"])
    assert isinstance(text, str)


def test_a_registered_classifier_names_the_class_the_trained_model_picks(tmp_path, monkeypatch):
    """A seq_cls adapter (PEFT SEQ_CLS, head in modules_to_save) registers as a model whose
    predict() gives the class name of the trained model's argmax: names from the sidecar, and
    ids "0".."k-1" for a stock PEFT adapter without one."""
    import mlflow.pyfunc
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import tsd
    from conftest import randomize_lora
    from pipeline.data.synthetic import make_encoder_dir

    words = "good bad fine awful great poor nice dull".split()
    encoder = make_encoder_dir(tmp_path / "encoder", texts=[" ".join(words)])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=3)
    config = tsd.TSDConfig(method="lora", r=4, alpha=8.0, dropout=0.0, targets=["query", "value"],
                           modules_to_save=["classifier"])
    tsd.inject(model, config)
    randomize_lora(model, seed=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(2))
    names = ["negative", "neutral", "positive"]
    adapter = tsd.save_adapter(model, tmp_path / "adapter", config, base_model_name_or_path=str(encoder),
                               task_type="SEQ_CLS", extra_metadata={"labels": json.dumps(names)})
    stock = tmp_path / "stock"
    shutil.copytree(adapter, stock)
    (stock / "tsd_state.safetensors").unlink()  # what stock PEFT alone writes
    texts = ["good great nice", "awful poor dull", "fine bad", "dull nice good bad", "great"]
    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    with torch.no_grad():
        expected = [int(model.eval()(**tokenizer(t, return_tensors="pt")).logits[0].argmax()) for t in texts]
    assert len(set(expected)) > 1  # the check can tell classes apart

    uri = default_tracking_uri(tmp_path / "store")
    run_id = start_run(uri, "registry", "classifier")
    with RunLogger(uri, run_id) as logger:
        logger.log_artifacts(adapter, "adapter")
        logger.log_artifacts(stock, "stock")
    assert register_adapter(uri, run_id, "adapter", "tiny-classifier") == "1"
    assert register_adapter(uri, run_id, "stock", "tiny-classifier") == "2"
    end_run(uri, run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.pyfunc.load_model("models:/tiny-classifier/1").predict(texts) == [names[i] for i in expected]
    assert mlflow.pyfunc.load_model("models:/tiny-classifier/2").predict(texts) == [str(i) for i in expected]


def test_registering_needs_a_database_store_and_a_logged_adapter(tmp_path):
    with pytest.raises(RegistryUnavailableError, match=r"tracking\.register_as needs a database-backed MLflow store"):
        register_adapter(f"file://alice:pw@{tmp_path}/mlruns", "0" * 32, "adapter", "x")
    assert "alice:***@" in model_registry_problem(f"file://alice:pw@{tmp_path}/mlruns")
    assert model_registry_problem(str(tmp_path / "mlruns")) is not None  # a bare folder is a file store too
    uri = default_tracking_uri(tmp_path)
    assert model_registry_problem(uri) is None and model_registry_problem("http://h:5000") is None
    run_id = start_run(uri, "registry", "no-adapter")
    with pytest.raises(FileNotFoundError, match=f"run {run_id} has no PEFT adapter under its artifact path 'adapter'"):
        register_adapter(uri, run_id, "adapter", "x")
    assert store.client(uri).search_registered_models() == []  # nothing half-registered


# --------------------------------------------------------------------------- tracking server


@pytest.mark.slow
def test_server_script_serves_runs_over_http(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_DIR": str(tmp_path / "srv"), "PORT": str(port), "PYTHON": sys.executable}
    script = str(REPO / "launch" / "mlflow_server.sh")
    pid_file = tmp_path / "srv" / "mlflow_server.pid"
    pid = None
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr
        uri = started.stdout.strip().splitlines()[-1]
        assert uri == f"http://127.0.0.1:{port}"
        pid = int(pid_file.read_text())
        assert group_alive(pid)

        run_id = start_run(uri, "over-http", "r", tags={"method": "dash"}, params={"tracking": {"uri": uri}})
        with RunLogger(uri, run_id) as logger:
            logger.log_metrics({"loss": 1.5}, step=0)
            logger.log_metrics({"loss": 0.5}, step=1)
            logger.log_directions(_directions(2), "switch", step=1)
        end_run(uri, run_id)
        s = summarize_run(uri, run_id)
        assert s["metrics"] == {"loss": 0.5} and s["status"] == "FINISHED"
        assert "directions/switch/change_rates.png" in s["artifacts"]
        assert s["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server
        assert list((tmp_path / "srv" / "mlartifacts").rglob("directions.csv"))

        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not group_alive(pid) and not pid_file.exists()
    finally:
        if pid is None and pid_file.exists():  # start failed or timed out half-way
            pid = int(pid_file.read_text())
        if pid is not None and group_alive(pid):  # the script failed to stop it: do it here
            os.killpg(pid, signal.SIGKILL)


# A password in the URI of a real server, through the API and a Ray run: tests/test_pipeline_e2e.py


def test_close_run_against_a_dead_server_warns_with_the_password_masked_and_does_not_raise(caplog):
    """The end of a finished run must not fail because the tracking server went away."""
    from pipeline.tracking.store import close_run

    uri = f"http://user:s3cret@127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        assert close_run(uri, "0" * 32, "FINISHED") is False
    text = caplog.text
    assert "could not be marked FINISHED" in text and "s3cret" not in text and "user:***@" in text
