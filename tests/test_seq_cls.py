"""model.task seq_cls: a classifier (encoder + head) under the same pipeline, checked against
independent references.

- Matthews correlation against its textbook definition (binary) and the covariance form (k classes).
- Single process: an adapter with a trained head (PEFT's modules_to_save) loads in stock PEFT
  and reproduces this project's logits.
- 2-rank ZeRO-3 runs of a tiny BERT encoder, one per method but LoRA-Init: the exported adapter (head
  included) in stock PEFT gives the logits the trained, partitioned model gave while the run
  evaluated; the fully fine-tuned model reloads to the same logits; the dash directions are those
  a single-process selection picks from the checkpointed factors; `tsd evaluate` scores the
  adapter as the run did.
- The scripts behind docs/RESULTS.md's tables, on those runs: the LoRA and LoRA-Dash runs are
  trained by the method sweep (benchmarks/sweep_methods.py, the same worker entry); a second call
  skips them as finished, and the report (benchmarks/report_comparison.py) turns them into its
  files, whose numbers are checked against the runs' own result.json.
"""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from proc_group import ROOT, child_env, torchrun_worker
from safetensors.torch import load_file

import tsd
from pipeline.classification.evaluation import matthews
from pipeline.data.synthetic import make_encoder_dir
from pipeline.classification.head import init_head

WORDS = "the a movie film plot actor scene story was is very quite".split()
TARGETS = ["query", "value"]


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Six neutral words and one that decides the class ("good": 1, "bad": 0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        words.insert(rng.randrange(7), "good" if i % 2 else "bad")
        rows.append({"id": f"r{i}", "text": " ".join(words), "label": i % 2})
    return rows


def make_toy(folder: Path) -> dict:
    """A tiny encoder, 64 training rows (JSONL) and 16 test rows (CSV: the other reader)."""
    rows = toy_rows(80)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (folder / "test.csv").write_text("id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in rows[64:]))
    encoder = make_encoder_dir(folder / "encoder", texts=[" ".join(WORDS + ["good", "bad"])])
    return {"encoder": encoder, "train": folder / "train.jsonl", "test": folder / "test.csv"}


# ----------------------------------------------------------------------------- Matthews correlation
def test_matthews_binary_is_the_textbook_formula():
    rng = random.Random(1)
    for _ in range(20):
        truth = [rng.randrange(2) for _ in range(50)]
        guess = [t if rng.random() < 0.7 else 1 - t for t in truth]
        tp = sum(t == 1 and g == 1 for t, g in zip(truth, guess))
        tn = sum(t == 0 and g == 0 for t, g in zip(truth, guess))
        fp = sum(t == 0 and g == 1 for t, g in zip(truth, guess))
        fn = sum(t == 1 and g == 0 for t, g in zip(truth, guess))
        want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert matthews(truth, guess) == pytest.approx(want, abs=1e-12)
    assert matthews([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert matthews([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # a constant predictor: 0, as GLUE reports it


def test_matthews_multiclass_is_the_correlation_of_one_hot_codes():
    rng = random.Random(2)
    truth = [rng.randrange(3) for _ in range(60)]
    guess = [t if rng.random() < 0.6 else rng.randrange(3) for t in truth]
    x = torch.nn.functional.one_hot(torch.tensor(truth), 3).double()
    y = torch.nn.functional.one_hot(torch.tensor(guess), 3).double()
    x, y = x - x.mean(0), y - y.mean(0)
    want = (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())
    assert matthews(truth, guess) == pytest.approx(float(want), abs=1e-12)


# ----------------------------------------------------------------------------- export, one process
def _classifier(encoder: Path, seed: int = 7):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=3)
    init_head(model, seed)
    return model.eval()


@pytest.mark.parametrize("method", ["dash", "tsd"])
def test_adapter_with_its_head_loads_in_stock_peft(method, tmp_path):
    from peft import PeftModel

    encoder = make_encoder_dir(tmp_path / "encoder", texts=[" ".join(WORDS + ["good", "bad"])])
    model = _classifier(encoder)
    config = tsd.TSDConfig(method=method, r=4, alpha=8, dropout=0.0, targets=TARGETS, switch_step=1, num_directions=2,
                           modules_to_save=["classifier", "score"])
    torch.manual_seed(0)
    tsd.inject(model, config)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n} == \
        {"classifier.weight", "classifier.bias"}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-ins for training: every adapter tensor and the head move
        for _, layer in tsd.tsd_layers(model):
            layer.lora_B.normal_(0, 0.1, generator=g)
        if config.uses_init:
            tsd.run_switch(model, tsd.INIT, 1)
        tsd.run_switch(model, tsd.DASH, 2)
        for _, layer in tsd.tsd_layers(model):
            layer.dash_scalars.normal_(0, 0.5, generator=g)
        model.classifier.weight.normal_(0, 0.3, generator=g)
        model.classifier.bias.normal_(0, 0.3, generator=g)
    tsd.save_adapter(model, tmp_path / "adapter", config, task_type="SEQ_CLS")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    ids = torch.tensor([[2, 5, 7, 9, 4, 3], [6, 8, 2, 2, 11, 5]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        peft = PeftModel.from_pretrained(_classifier(encoder, seed=99), str(tmp_path / "adapter")).eval()
        theirs = peft(input_ids=ids).logits
        reloaded = _classifier(encoder, seed=99)
        tsd.load_adapter(reloaded, tmp_path / "adapter")
        again = reloaded.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=1e-6)


def test_modules_to_save_naming_nothing_is_refused(tmp_path):
    encoder = make_encoder_dir(tmp_path / "encoder", texts=WORDS)
    model = _classifier(encoder)
    with pytest.raises(tsd.TargetError, match=r"modules_to_save \['head'\]: no module"):
        tsd.inject(model, tsd.TSDConfig(method="lora", targets=TARGETS, modules_to_save=["head"]))


def test_head_start_depends_on_the_seed_only(tmp_path):
    encoder = make_encoder_dir(tmp_path / "encoder", texts=WORDS)
    torch.manual_seed(1)
    a = _classifier(encoder, seed=5).classifier.weight.clone()
    torch.manual_seed(2)  # the global RNG (what transformers' own init draws from) does not matter
    b = _classifier(encoder, seed=5).classifier.weight
    c = _classifier(encoder, seed=6).classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.01 < float(a.detach().std()) < 0.04  # initializer_range 0.02


# ----------------------------------------------------------------------------- the pipeline, 2 ranks
METHODS = ["lora", "dash", "tsd", "full"]  # LoRA-Init alone: the export LoRA-TSD's run checks (Init's fold and Dash's)


def _config(toy: dict, out: Path, method: str, tracking: dict | None = None) -> Path:
    cfg = {
        "name": method, "output_dir": str(out),
        "model": {"path": str(toy["encoder"]), "task": "seq_cls"},
        "data": {"train": str(toy["train"]), "test": [f"toy={toy['test']}"], "cutoff_len": 32},
        "method": {"method": method, "r": 4, "alpha": 8, "dropout": 0.0, "switch_step": 2, "num_directions": 3,
                   "targets": TARGETS},
        "train": {"lr": 1e-2, "warmup_steps": 1, "micro_batch_size": 4, "max_steps": 6, "checkpoint_every": 1,
                  "keep_checkpoints": None, "eval_batch_size": 5},
        "deepspeed": {"config": str(ROOT / "configs/deepspeed/zero3.json")},
        "tracking": tracking or {"offline": True},
    }
    path = out / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("seqcls"))


SWEPT, SEED = ("lora", "dash"), 42  # trained by the sweep; 42 is the config's default seed, as for the others


def _sweep_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks/sweep_methods.py"), "--config", str(config),
            "--methods", *SWEPT, "--seeds", str(SEED), "--out", str(out), "--nproc", "2"]


@pytest.fixture(scope="module")
def sweep(toy, tmp_path_factory):
    """LoRA and LoRA-Dash trained by benchmarks/sweep_methods.py as docs/RESULTS.md's runs are
    (2 ranks, the worker entry), tracked in <out>/mlflow.db for the report."""
    out = tmp_path_factory.mktemp("seqcls_sweep")
    config = _config(toy, out, "unused", tracking={"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "sweep-smoke"})
    first = subprocess.run(_sweep_command(config, out), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0 and "sweep complete" in first.stdout, first.stdout + first.stderr
    return {"out": out, "config": config, "stdout": first.stdout}


@pytest.fixture(scope="module", params=METHODS)
def run(request, toy, sweep, tmp_path_factory):
    method = request.param
    if method in SWEPT:
        folder = sweep["out"] / f"{method}-s{SEED}"
        output = (sweep["out"] / f"{method}-s{SEED}.log").read_text()
    else:
        out = tmp_path_factory.mktemp(f"seqcls_{method}")
        proc = torchrun_worker(_config(toy, out, method))
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
        folder, output = out / method, proc.stderr + proc.stdout
    assert "loaded partitioned over 2 rank(s)" in output
    rows = [json.loads(line) for line in (folder / "eval/predictions/toy.jsonl").read_text().splitlines()]
    return {"method": method, "dir": folder, "rows": rows, "toy": toy}




def _ids(toy: dict, rows: list[dict]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(toy["encoder"]))
    return tok([r["text"] for r in rows], padding=True, return_tensors="pt")


@pytest.mark.slow
def test_exported_classifier_gives_the_logits_the_trained_model_gave(run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    enc = _ids(run["toy"], run["rows"])
    if run["method"] == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(run["dir"] / "model")).eval()
        assert model.config.num_labels == 2
    else:
        config = json.loads((run["dir"] / "adapter/adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
        base = AutoModelForSequenceClassification.from_pretrained(str(run["toy"]["encoder"]), num_labels=2)
        model = PeftModel.from_pretrained(base, str(run["dir"] / "adapter")).eval()
    with torch.no_grad():
        logits = model(**enc).logits
    trained = torch.tensor([r["logits"] for r in run["rows"]])
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-4)
    # the head trained: not where the seed started it
    start = AutoModelForSequenceClassification.from_pretrained(str(run["toy"]["encoder"]), num_labels=2)
    init_head(start, 42)
    head = model.classifier.weight if run["method"] == "full" else \
        model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.allclose(head, start.classifier.weight, atol=1e-4)


@pytest.mark.slow
def test_run_metrics_are_accuracy_and_mcc_of_its_predictions(run):
    result = json.loads((run["dir"] / "result.json").read_text())
    rows = run["rows"]
    assert len(rows) == 16 and [r["index"] for r in rows] == list(range(16))
    acc = sum(r["prediction_id"] == r["label_id"] for r in rows) / len(rows)
    assert result["acc_toy"] == pytest.approx(acc) and result["acc_avg"] == pytest.approx(acc)
    assert result["mcc_toy"] == pytest.approx(matthews([r["label_id"] for r in rows], [r["prediction_id"] for r in rows]))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dash"], indirect=True)  # the other switches: the same code (tests/test_zero3.py)
def test_dash_directions_are_the_single_process_selection(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tsd.directions import layer_directions

    state = load_file(str(run["dir"] / "adapter/tsd_state.safetensors"))
    factors = get_fp32_state_dict_from_zero_checkpoint(str(run["dir"] / "checkpoints"), tag="step2")
    base = load_file(str(Path(run["toy"]["encoder"]) / "model.safetensors"))
    layers = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".dash_indices")})
    assert len(layers) == 4
    for name in layers:
        weight = base[name.removeprefix("bert.") + ".weight"]
        ref = layer_directions(name, weight, factors[f"{name}.lora_A"], factors[f"{name}.lora_B"], 8 / 4, 3)
        assert torch.equal(state[f"{name}.dash_indices"], ref.indices), name


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dash", "full"], indirect=True)  # an adapter and a whole model
def test_tsd_evaluate_scores_the_adapter_as_the_run_did(run, tmp_path):
    what = ["--model", str(run["dir"] / "model")] if run["method"] == "full" else \
        ["--adapter", str(run["dir"] / "adapter")]
    proc = subprocess.run([sys.executable, "-m", "pipeline.launch.cli", "evaluate", *what, "--data",
                           f"toy={run['toy']['test']}", "--batch-size", "3", "--out", str(tmp_path / "eval")],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())["metrics"]
    result = json.loads((run["dir"] / "result.json").read_text())
    assert metrics["acc_toy"] == pytest.approx(result["acc_toy"]) and metrics["mcc_toy"] == pytest.approx(result["mcc_toy"])


# ----------------------------------------------------------------------------- the RESULTS scripts
@pytest.mark.slow
def test_the_sweep_skips_finished_runs_and_the_report_reads_them(sweep, tmp_path):
    out = sweep["out"]
    again = subprocess.run(_sweep_command(sweep["config"], out), cwd=ROOT, env=child_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.stdout.count("finished already") == 2, again.stdout
    report_dir = tmp_path / "report"
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks/report_comparison.py"), "--runs", str(out),
                             "--out", str(report_dir), "--task", "toy", "--experiment", "sweep-smoke", "--rows", "8"],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    results = {m: json.loads((out / f"{m}-s{SEED}/result.json").read_text()) for m in SWEPT}
    table = {row["method"]: row for row in csv.DictReader((report_dir / "runs.csv").open())}
    assert set(table) == set(SWEPT)
    for method, result in results.items():
        assert float(table[method]["accuracy_pct"]) == pytest.approx(100 * result["acc_toy"], abs=1e-4)
        assert float(table[method]["mcc"]) == pytest.approx(result["mcc_toy"], abs=1e-5)
    diff = 100 * (results["dash"]["acc_toy"] - results["lora"]["acc_toy"])
    assert f"| LoRA-Dash | {diff:+.2f} | — | — | s{SEED}: {diff:+.2f} | 1 |" in (report_dir / "paired.md").read_text()
    magnitude = list(csv.DictReader((report_dir / "dash_magnitude.csv").open()))
    assert [m["method"] for m in magnitude] == ["dash"] and float(magnitude[0]["median_scalar_ratio"]) > 0
    for f in ("paired.png", "comparison.md", "comparison.csv", "mcc/comparison.md"):
        assert (report_dir / f).is_file() and (report_dir / f).stat().st_size > 0, f
