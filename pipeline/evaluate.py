"""Evaluation by generation, as the paper's harness does it (LLM-Adapters' commonsense_evaluate.py).

For every test row: the evaluation prompt (`generate_eval_prompt`, instruction only: the
harness never passes `input`), deterministic generation (`num_beams` 4, `max_new_tokens` 32,
batch 1 by default), the response text after "### Response:", and the prediction = the first
match of the task's answer regex (`extract_answer`). No match is a wrong answer. Accuracy =
exact match with the row's `answer`; the average is the mean of the per-task accuracies (the
paper's "Avg." column). Accuracies are fractions in [0, 1]; `tsd compare` prints percentages.

Works in three settings, with the same function, `evaluate_tasks`:
- one process (the `tsd evaluate` command, pipeline.eval_command: a base model folder + an
  exported adapter);
- several processes with torch.distributed initialized: rank k generates rows k::world of each
  task and the rows are gathered with `all_gather_object`, so every rank returns the whole
  result (rank 0 writes and logs it);
- inside the training loop (pipeline.eval_after_training) under DeepSpeed ZeRO-3: every forward
  is a collective there, so all ranks must run the same number of `generate` calls and keep
  stepping until the longest generation on any rank ends. Ranks with fewer rows run padding calls on a dummy row (results
  discarded), and `synced_gpus=True` is passed to `generate`.

One deliberate difference from the harness: it decodes the WHOLE sequence and splits on the
last "### Response:"; here only the generated tokens are decoded (then split the same way).
For a tokenizer that round-trips the prompt (LLaMA's) the scored text is the same; for one that
does not (e.g. a word-level tokenizer that drops unknown words or re-spaces punctuation), the
harness's split would miss and score the prompt itself, whose "Answer format: answer1/..."
line always matches.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from pipeline.data.tasks import (
    answer_format,
    answer_format_from_instruction,
    extract_answer,
    generate_eval_prompt,
    response_text,
)
from pipeline.eval_rows import gather_rows, rank_batches
from pipeline.logs import log
from pipeline.training.distributed import rank_and_world
from pipeline.training.memory import release_freed_heap
from pipeline.tracking.logger import RunLogger
from tsd.partition import is_partitioned

PREDICTION_FIELDS = ("index", "task", "instruction", "answer", "output", "prediction", "correct")
METRIC_PREFIX = "acc_"
AVERAGE_METRIC = "acc_avg"


# ----------------------------------------------------------------------------- scoring
def row_format(task: str, record: Mapping[str, Any]) -> str:
    """The answer family to score a row with: the task's, or (for a task name the harness does
    not know, e.g. a mixed file) the one the row's instruction names in "Answer format: ..."."""
    try:
        return answer_format(task)
    except ValueError:
        fam = answer_format_from_instruction(record.get("instruction", ""))
        if fam is None:
            raise ValueError(
                f"task {task!r}: unknown task name and the instruction names no 'Answer format: ...'; "
                f"name the task after its answer family (e.g. boolq=..., piqa=..., social_i_qa=...)"
            ) from None
        return fam


def score(task: str, record: Mapping[str, Any], output: str) -> dict:
    """One scored row: the generated `output` -> response text -> first regex match -> correct?"""
    prediction = extract_answer(row_format(task, record), response_text(output))
    answer = str(record.get("answer", ""))
    return {
        "task": task,
        "instruction": record["instruction"],
        "answer": answer,
        "output": output,
        "prediction": prediction,
        "correct": prediction is not None and prediction == answer,
    }


def summarize(predictions: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """Per-task accuracy/correct/total/no_match, the macro average and the MLflow metrics."""
    tasks = {}
    for task, rows in predictions.items():
        total = len(rows)
        correct = sum(1 for r in rows if r["correct"])
        tasks[task] = {
            "accuracy": correct / total if total else float("nan"),
            "correct": correct,
            "total": total,
            "no_match": sum(1 for r in rows if r["prediction"] is None),
        }
    accs = [t["accuracy"] for t in tasks.values()]
    average = sum(accs) / len(accs) if accs else float("nan")
    metrics = {f"{METRIC_PREFIX}{task}": t["accuracy"] for task, t in tasks.items()}
    metrics[AVERAGE_METRIC] = average
    return {"tasks": tasks, "average": average, "metrics": metrics}


# ----------------------------------------------------------------------------- generation
def generation_config(tokenizer, num_beams: int = 4, max_new_tokens: int = 32):
    """Deterministic beam search (greedy for num_beams=1) with the harness's settings.

    The harness builds a GenerationConfig with sampling knobs but never sets do_sample, so it
    never samples. Every knob that changes greedy/beam output is set explicitly here, so a
    model folder's own generation_config.json (which transformers merges into unset values)
    cannot switch on sampling or a repetition penalty behind our back.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=1,
        max_new_tokens=max_new_tokens,
        early_stopping=False,
        length_penalty=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _is_partitioned(model) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


@torch.no_grad()
def generate_outputs(model, tokenizer, prompts: Sequence[str], gen_config, synced: bool = False) -> list[str]:
    """The decoded generated text (prompt excluded, special tokens skipped) of each prompt,
    generated together as one left-padded batch."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=len(prompts) > 1)
    finally:
        tokenizer.padding_side = old_side
    device = _model_device(model)
    inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    out = model.generate(**inputs, generation_config=gen_config, synced_gpus=synced)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    limit: int | None = None,
    use_input: bool = False,
    synced: bool | None = None,
    progress: bool = True,
) -> dict:
    """Generate and score every row of every task (name -> LLM-Adapters records).

    With torch.distributed initialized, call it on EVERY rank: rank k generates rows k::world
    of each task and all ranks receive the gathered result. `synced` (default: True when the
    model's parameters are ZeRO-3 partitioned and world > 1) makes every rank run the same
    number of generate calls with `synced_gpus=True`, as ZeRO-3 requires.

    Returns {"tasks": {task: {accuracy, correct, total, no_match}}, "average", "metrics"
    ({"acc_<task>": .., "acc_avg": ..}), "predictions" ({task: [row, ...]} in file order, each
    row with PREDICTION_FIELDS), "settings", "seconds"}. The model is put in eval mode and
    returned to its previous mode.
    """
    rank, world = rank_and_world()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not tasks:
        raise ValueError("evaluate_tasks: no tasks given")
    if synced is None:
        synced = world > 1 and _is_partitioned(model)
    gen_config = generation_config(tokenizer, num_beams, max_new_tokens)
    t0 = time.perf_counter()

    was_training = model.training
    model.eval()
    local: dict[str, list[dict]] = {}
    try:
        for task, records in tasks.items():
            records = list(records)[:limit] if limit else list(records)
            if not records:
                raise ValueError(f"task {task!r}: no records to evaluate")
            for r in records[:1]:
                row_format(task, r)  # fail before generating if the task cannot be scored
            local[task] = _task_rows(model, tokenizer, task, records, gen_config, batch_size=batch_size,
                                     use_input=use_input, synced=synced, show=progress and rank == 0)
    finally:
        model.train(was_training)

    predictions = {task: [{k: row[k] for k in PREDICTION_FIELDS} for row in rows]
                   for task, rows in gather_rows(local).items()}
    result = summarize(predictions)
    result["predictions"] = predictions
    result["settings"] = {
        "num_beams": num_beams, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "limit": limit, "use_input": use_input, "world_size": world,
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - t0
    if progress and rank == 0:
        for line in result_lines(result):
            log(line)
    return result


def _task_rows(model, tokenizer, task: str, records: Sequence[Mapping[str, Any]], gen_config, *, batch_size: int,
               use_input: bool, synced: bool, show: bool) -> list[dict]:
    """This rank's scored rows of one task: rows rank::world, in batches; under ZeRO-3 every
    rank makes the same number of generate calls (padding calls are generated and dropped)."""
    batches = rank_batches(len(records), batch_size, synced)
    bar = tqdm(total=sum(len(b) for b in batches if b is not None), desc=f"eval {task}", unit="row", file=sys.stderr, dynamic_ncols=True,
               mininterval=2.0, disable=not show)
    rows = []
    for batch in batches:
        idx = batch if batch is not None else [0]
        prompts = [generate_eval_prompt(records[i]["instruction"], records[i].get("input") if use_input else None)
                   for i in idx]
        outputs = generate_outputs(model, tokenizer, prompts, gen_config, synced=synced)
        if synced:  # ZeRO-3 gathers and frees whole weights for every token: give the pages back
            release_freed_heap()
        if batch is None:
            continue  # a padding call under ZeRO-3: keeps the collectives in step
        for i, out in zip(idx, outputs):
            rows.append({"index": i, **score(task, records[i], out)})
        bar.update(len(idx))
    bar.close()
    return rows


def result_lines(result: Mapping[str, Any]) -> list[str]:
    """Human-readable accuracy lines: one per task and the average."""
    lines = []
    for task, t in result["tasks"].items():
        lines.append(f"{task}: {100 * t['accuracy']:.2f}% ({t['correct']}/{t['total']}, {t['no_match']} without an answer)")
    lines.append(f"average over {len(result['tasks'])} task(s): {100 * result['average']:.2f}%")
    return lines


# ----------------------------------------------------------------------------- files, MLflow
def _safe_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task) or "task"


def write_results(result: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """`out_dir/predictions/<task>.jsonl` (one scored row a line) and `out_dir/metrics.json`."""
    out = Path(out_dir)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in result["predictions"].items():
        path = pred_dir / f"{_safe_name(task)}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    summary = {k: result[k] for k in ("tasks", "average", "metrics", "settings") if k in result}
    summary["seconds"] = result.get("seconds")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return out


def log_results(result: Mapping[str, Any], tracking_uri: str, run_id: str, out_dir: str | os.PathLike,
                step: int | None = None, logger=None) -> bool:
    """Log `acc_<task>`/`acc_avg` and the written files (under `eval/`) to an existing MLflow
    run; `out_dir` must hold `write_results`' files. Returns False if MLflow kept something back."""
    own = logger is None
    logger = logger or RunLogger(tracking_uri, run_id)
    logger.log_metrics(result["metrics"], step)
    out = Path(out_dir)
    logger.log_artifact(out / "metrics.json", "eval")
    logger.log_artifacts(out / "predictions", "eval/predictions")
    return logger.close() if own else logger.flush()
