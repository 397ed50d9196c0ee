"""Evaluation by generation (pipeline/evaluate.py) against the harness's rules, recomputed here.

The model is a tiny random LLaMA with a word-level tokenizer whose vocabulary holds the
siqa prompts' words (so "answer1"/"answer2" can be generated) but not "true"/"false" (so
every boolq row is a no-match). Its weights are scaled up so that greedy/beam outputs depend on
the prompt, and the answer words' logits boosted so that correct, wrong and unanswered rows
all occur.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from proc_group import child_env

import tsd
from pipeline.launch import cli
from pipeline.data.tasks import generate_eval_prompt, write_records
from pipeline.eval_command import load_model
from pipeline.evaluate import PREDICTION_FIELDS, evaluate_tasks, score

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alex jordan casey taylor sam riley morgan lunch keys chess bread party friend home game won lost "
         "forgot baked shared happy sad proud worried bored generous selfish").split()  # fmt: skip
# The harness's regexes, written out again (not imported) for an independent recomputation.
PATTERNS = {"social_i_qa": r"answer1|answer2|answer3|answer4|answer5", "boolq": r"true|false"}
MAX_NEW = 4


def _rows(seed: int):
    rng = random.Random(seed)
    siqa = []
    for i in range(9):
        q = " ".join(rng.choice(WORDS) for _ in range(6))
        siqa.append({
            "instruction": f"Please choose the correct answer to the question: {q}\n\n"
                           f"Answer1: {rng.choice(WORDS)} Answer2: {rng.choice(WORDS)}\n\nAnswer format: answer1/answer2",
            "input": "", "output": "", "answer": f"answer{1 + i % 2}",
        })  # fmt: skip
    boolq = [
        {"instruction": f"Please answer the question: is {rng.choice(WORDS)} {rng.choice(WORDS)}?\n\n"
                        "Answer format: true/false", "input": "", "output": "", "answer": rng.choice(["true", "false"])}
        for _ in range(3)
    ]  # fmt: skip
    return siqa, boolq


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.synthetic import make_model_dir

    root = tmp_path_factory.mktemp("eval")
    siqa, boolq = _rows(0)
    write_records(root / "siqa.json", siqa)
    write_records(root / "boolq.json", boolq)
    model_dir = make_model_dir(root / "model", texts=[generate_eval_prompt(r["instruction"]) for r in siqa])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.convert_tokens_to_ids("true") == tok.unk_token_id  # boolq can never match
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.lm_head.weight[[tok.convert_tokens_to_ids(w) for w in ("answer1", "answer2")]] *= 2.0
    model.save_pretrained(str(model_dir))

    # A LoRA-Dash adapter with a large update, exported as this project does after training.
    cfg = tsd.TSDConfig(method="dash", r=4, alpha=8, dropout=0.0, switch_step=1, num_directions=2)
    torch.manual_seed(0)
    tsd.inject(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    tsd.run_switch(model, tsd.DASH, 1)
    with torch.no_grad():
        for _, layer in tsd.tsd_layers(model):
            layer.dash_scalars.copy_(torch.randn(layer.dash_size, generator=g))
    adapter = tsd.save_adapter(model, root / "run" / "adapter", cfg, base_model_name_or_path=str(model_dir))
    model.eval()
    return {"root": root, "model_dir": model_dir, "adapter": adapter, "tuned": model, "tok": tok,
            "data": [f"social_i_qa={root / 'siqa.json'}", f"boolq={root / 'boolq.json'}"]}  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recompute(task: str, row: dict) -> tuple[str | None, bool]:
    text = row["output"].split("### Response:")[-1].strip()
    m = re.search(PATTERNS[task], text)
    pred = m.group(0) if m else None
    return pred, pred == row["answer"]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_cli_accuracy_is_what_the_predictions_say(setup, tmp_path, num_beams, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(setup["model_dir"]), "--adapter", str(setup["adapter"]),
            "--num-beams", str(num_beams), "--max-new-tokens", str(MAX_NEW), "--out", str(out)]  # fmt: skip
    for d in setup["data"]:
        argv += ["--data", d]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    siqa, boolq = _rows(0)
    accs = {}
    for task, records in (("social_i_qa", siqa), ("boolq", boolq)):
        rows = _read_jsonl(out / "predictions" / f"{task}.jsonl")
        assert [r["index"] for r in rows] == list(range(len(records)))
        assert all(set(r) == set(PREDICTION_FIELDS) for r in rows)
        assert [r["instruction"] for r in rows] == [r["instruction"] for r in records]
        assert [r["answer"] for r in rows] == [r["answer"] for r in records]
        correct = 0
        for r in rows:
            pred, ok = _recompute(task, r)
            assert (r["prediction"], r["correct"]) == (pred, ok), r
            correct += ok
        accs[task] = correct / len(rows)
        t = metrics["tasks"][task]
        assert t == {"accuracy": accs[task], "correct": correct, "total": len(rows),
                     "no_match": sum(_recompute(task, r)[0] is None for r in rows)}  # fmt: skip
        assert metrics["metrics"][f"acc_{task}"] == accs[task]
        if task == "social_i_qa":
            # the fixture gives every kind of row; if it stops doing so this test proves less
            kinds = {("none" if r["prediction"] is None else r["correct"]) for r in rows}
            assert kinds >= {True, False}, [r["output"] for r in rows]
    assert accs["boolq"] == 0.0 and metrics["tasks"]["boolq"]["no_match"] == 3  # no match = wrong
    assert metrics["average"] == pytest.approx((accs["social_i_qa"] + accs["boolq"]) / 2, abs=0)
    assert metrics["metrics"]["acc_avg"] == metrics["average"]
    assert metrics["settings"]["num_beams"] == num_beams
    assert f"social_i_qa: {100 * accs['social_i_qa']:.2f}%" in printed


def test_adapter_loaded_from_disk_matches_the_trained_model(setup):
    siqa, _ = _rows(0)
    tasks = {"social_i_qa": siqa}
    mine = evaluate_tasks(setup["tuned"], setup["tok"], tasks, num_beams=2, max_new_tokens=MAX_NEW, progress=False)
    model, tok = load_model(setup["model_dir"], setup["adapter"])
    loaded = evaluate_tasks(model, tok, tasks, num_beams=2, max_new_tokens=MAX_NEW, progress=False)
    assert loaded["predictions"] == mine["predictions"]
    base, tok = load_model(setup["model_dir"])
    plain = evaluate_tasks(base, tok, tasks, num_beams=2, max_new_tokens=MAX_NEW, progress=False)
    assert [r["output"] for r in plain["predictions"]["social_i_qa"]] != [r["output"] for r in mine["predictions"]["social_i_qa"]]
    # the model is left in the mode it came in
    model.train()
    evaluate_tasks(model, tok, tasks, num_beams=1, max_new_tokens=1, limit=1, progress=False)
    assert model.training


def test_scoring_rules():
    rec = {"instruction": "q", "answer": "answer1"}
    assert score("social_i_qa", rec, "answer1 is right")["correct"]
    wrong = score("social_i_qa", rec, "maybe answer3, or answer1")
    assert (wrong["prediction"], wrong["correct"]) == ("answer3", False)  # the FIRST match counts
    none = score("social_i_qa", rec, "Answer1")  # case-sensitive, as the harness
    assert (none["prediction"], none["correct"]) == (None, False)
    assert score("social_i_qa", rec, "answer2 ### Response: answer1")["prediction"] == "answer1"
    assert not score("boolq", {"instruction": "q", "answer": "true"}, "")["correct"]
    # an unknown task name is scored by the instruction's "Answer format" line
    mixed = score("mixed", {"instruction": "x\n\nAnswer format: option1/option2", "answer": "option2"}, "option2")
    assert mixed["correct"]
    with pytest.raises(ValueError, match="unknown task"):
        score("mixed", {"instruction": "no format here", "answer": "a"}, "a")


def test_mlflow_logging(setup, tmp_path):
    from pipeline.eval_command import run_evaluation
    from pipeline.tracking.store import default_tracking_uri, start_run, summarize_run

    uri = default_tracking_uri(tmp_path)
    run_id = start_run(uri, "evals", "r1")
    res = run_evaluation(str(setup["model_dir"]), str(setup["adapter"]), setup["data"], num_beams=1,
                         max_new_tokens=2, limit=2, out=str(tmp_path / "o"), tracking_uri=uri, run_id=run_id)  # fmt: skip
    s = summarize_run(uri, run_id)
    assert s["metrics"]["acc_social_i_qa"] == res["tasks"]["social_i_qa"]["accuracy"]
    assert s["metrics"]["acc_avg"] == res["average"]
    assert {"eval/metrics.json", "eval/predictions/social_i_qa.jsonl", "eval/predictions/boolq.jsonl"} <= set(s["artifacts"])
    assert res["tasks"]["boolq"]["total"] == 2
    bad = ["evaluate", "--model", str(setup["model_dir"]), "--data", setup["data"][0], "--out", str(tmp_path / "x"),
           "--tracking-uri", uri, "--run-id", "0" * 32]  # fmt: skip
    assert cli.main(bad) == 2 and not (tmp_path / "x").exists()


def test_errors(setup, tmp_path):
    assert cli.main(["evaluate", "--model", str(tmp_path), "--data", setup["data"][0]]) == 2
    write_records(tmp_path / "bare.json", [{"instruction": "no format line", "output": "", "answer": "a"}])
    model = ["evaluate", "--model", str(setup["model_dir"]), "--out", str(tmp_path / "o")]
    assert cli.main([*model, "--data", f"nope={tmp_path / 'bare.json'}"]) == 2  # task unknown, no format line
    with pytest.raises(SystemExit) as bad_flag:  # argparse checks the count and names the flag
        cli.main([*model, "--data", f"boolq={tmp_path / 'bare.json'}", "--num-beams", "0"])
    assert bad_flag.value.code == 2
    assert cli.main([*model, "--data", "boolq=/does/not/exist.json"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_rank_sharded_evaluation_equals_single_process(setup, tmp_path):
    """torchrun, 2 CPU ranks (gloo): rank k generates rows k::2 (9 and 3 rows: uneven shards),
    all_gather_object merges; the files rank 0 writes equal the single-process run's."""
    common = ["--model", str(setup["model_dir"]), "--adapter", str(setup["adapter"]), "--num-beams", "2",
              "--max-new-tokens", str(MAX_NEW)] + [a for d in setup["data"] for a in ("--data", d)]  # fmt: skip
    assert cli.main(["evaluate", *common, "--out", str(tmp_path / "single")]) == 0
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.launch.cli", "evaluate", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("predictions and metrics:") == 1  # only rank 0 reports
    for task in ("social_i_qa", "boolq"):
        two = _read_jsonl(tmp_path / "two" / "predictions" / f"{task}.jsonl")
        assert two == _read_jsonl(tmp_path / "single" / "predictions" / f"{task}.jsonl")
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert m2["tasks"] == m1["tasks"] and m2["settings"]["world_size"] == 2


_ZERO3_WORKER = '''
import json, sys
import deepspeed, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
import tsd
from pipeline.eval_command import load_tasks
from pipeline.evaluate import evaluate_tasks

model_dir, adapter, out, data = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
from pipeline.training.distributed import skip_unused_deepspeed_comm_op
skip_unused_deepspeed_comm_op()
deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)
ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
keep = HfDeepSpeedConfig(ds)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tsd.load_adapter(model, adapter)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
del keep  # as the training loop does: the synced mode must not rely on transformers' global flag
assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
tok = AutoTokenizer.from_pretrained(model_dir)
res = evaluate_tasks(engine.module, tok, load_tasks(data), num_beams=2, max_new_tokens=4, progress=False)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        f.write(json.dumps(res["predictions"]))
# The training entry's way out (main_entry + pipeline.launch.worker): a plain exit here aborted a rank
# now and then ("terminate called without an active exception", see pipeline.training.distributed).
from pipeline.training.distributed import end_process, leave_process_group
leave_process_group()
end_process(0)
'''


@pytest.mark.slow
def test_zero3_sharded_evaluation_equals_single_process(setup, tmp_path):
    """Under ZeRO-3 every forward is a collective: ranks with fewer rows (9 rows over 2 ranks)
    must run padding calls and generate in synced mode, or the run hangs. Same predictions."""
    single = evaluate_tasks(*load_model(setup["model_dir"], setup["adapter"]),
                            {"social_i_qa": _rows(0)[0], "boolq": _rows(0)[1]}, num_beams=2,
                            max_new_tokens=MAX_NEW, progress=False)  # fmt: skip
    script = tmp_path / "zero3_eval.py"
    script.write_text(_ZERO3_WORKER)
    env = child_env(PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(setup["model_dir"]), str(setup["adapter"]), str(tmp_path / "z3.json"), *setup["data"]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "z3.json").read_text()) == single["predictions"]


def test_batched_generation_equals_batch_one(setup):
    """Left padding + attention mask: batching prompts must not change what is generated."""
    tasks = {"social_i_qa": _rows(0)[0]}
    one = evaluate_tasks(setup["tuned"], setup["tok"], tasks, num_beams=2, max_new_tokens=MAX_NEW, progress=False)
    three = evaluate_tasks(setup["tuned"], setup["tok"], tasks, num_beams=2, max_new_tokens=MAX_NEW, batch_size=4,
                           progress=False)  # fmt: skip
    assert three["predictions"] == one["predictions"]
    assert setup["tok"].padding_side == "right"  # restored
