"""Evaluation of a classifier (model.task seq_cls): accuracy and Matthews correlation per test set.

The GLUE protocol the paper follows: one forward pass per row, the predicted class is the
argmax of the head's logits, accuracy over the whole test set, and Matthews correlation where
GLUE scores with it (CoLA) — here logged for every set, because on unbalanced binary sets (the
sarcasm headlines are 44/56) it says what accuracy hides. The macro average of accuracies is
`acc_avg`, the column `tsd compare` prints, as for the generation tasks.

Sharded like generation (pipeline.evaluate): rank k scores rows k::world and the rows are
gathered on every rank. Under ZeRO-3 every forward is a collective, so every rank makes the
same number of forward calls; a rank out of rows makes padding calls and drops their results
(pipeline.eval_rows, shared with generation).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.loader import collate_labelled, tokenize_labelled
from pipeline.eval_rows import gather_rows, rank_batches
from pipeline.logs import log
from pipeline.training.distributed import rank_and_world
from tsd.partition import is_partitioned

METRIC_PREFIX, MCC_PREFIX, AVERAGE_METRIC = "acc_", "mcc_", "acc_avg"


def matthews(truth: Sequence[int], predicted: Sequence[int]) -> float:
    """Matthews correlation of two label sequences over any number of classes (Gorodkin's R_K,
    which for two classes is (TP TN - FP FN) / sqrt(...)); 0 when a marginal is constant, as
    scikit-learn and GLUE report it."""
    if len(truth) != len(predicted):
        raise ValueError(f"matthews: {len(truth)} labels but {len(predicted)} predictions")
    classes = sorted(set(truth) | set(predicted))
    n = len(truth)
    correct = sum(1 for t, p in zip(truth, predicted) if t == p)
    t_count = {k: 0 for k in classes}
    p_count = {k: 0 for k in classes}
    for t, p in zip(truth, predicted):
        t_count[t] += 1
        p_count[p] += 1
    cov_tp = correct * n - sum(t_count[k] * p_count[k] for k in classes)
    cov_pp = n * n - sum(v * v for v in p_count.values())
    cov_tt = n * n - sum(v * v for v in t_count.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_pp * cov_tt)


def summarize(predictions: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """Per-set accuracy, Matthews correlation and counts; the macro average; the MLflow metrics."""
    tasks, metrics = {}, {}
    for task, rows in predictions.items():
        truth = [r["label_id"] for r in rows]
        guess = [r["prediction_id"] for r in rows]
        correct = sum(1 for r in rows if r["correct"])
        tasks[task] = {"accuracy": correct / len(rows), "mcc": matthews(truth, guess), "correct": correct,
                       "total": len(rows), "no_match": 0}
        metrics[f"{METRIC_PREFIX}{task}"] = tasks[task]["accuracy"]
        metrics[f"{MCC_PREFIX}{task}"] = tasks[task]["mcc"]
    average = sum(t["accuracy"] for t in tasks.values()) / len(tasks)
    metrics[AVERAGE_METRIC] = average
    return {"tasks": tasks, "average": average, "metrics": metrics}


@torch.no_grad()
def evaluate_classification(model, tokenizer, tasks: Mapping[str, Sequence[Mapping[str, Any]]], names: list[str], *,
                            batch_size: int = 32, cutoff_len: int = 256, limit: int | None = None,
                            progress: bool = True) -> dict:
    """Classify every row of every test set (name -> labelled records, pipeline.classification.rows).

    With torch.distributed initialized, call it on EVERY rank: all receive the whole result.
    Returns the shape `pipeline.evaluate.evaluate_tasks` returns ({"tasks", "average", "metrics",
    "predictions", "settings", "seconds"}), so the same writers and loggers serve both."""
    from pipeline.classification.rows import encode_labels

    rank, world = rank_and_world()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    synced = world > 1 and any(is_partitioned(p) for p in model.parameters())
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    local: dict[str, list[dict]] = {}
    try:
        for task, records in tasks.items():
            records = list(records)[:limit] if limit else list(records)
            if not records:
                raise ValueError(f"test set {task!r}: no rows to evaluate")
            labels = encode_labels(records, names, source=task)
            local[task] = _rows(model, tokenizer, task, records, labels, names, batch_size, cutoff_len, device,
                                synced, show=progress and rank == 0)
    finally:
        model.train(was_training)
    predictions = gather_rows(local)
    result = summarize(predictions)
    result["predictions"] = predictions
    result["settings"] = {"batch_size": batch_size, "cutoff_len": cutoff_len, "limit": limit, "world_size": world,
                          "classes": names}
    result["seconds"] = time.perf_counter() - t0
    if progress and rank == 0:
        for task, t in result["tasks"].items():
            log(f"{task}: accuracy {100 * t['accuracy']:.2f}% ({t['correct']}/{t['total']}), MCC {t['mcc']:.4f}")
    return result


def _rows(model, tokenizer, task, records, labels, names, batch_size, cutoff_len, device, synced, show) -> list[dict]:
    """This rank's scored rows of one set: rows rank::world in batches (equal counts under ZeRO-3)."""
    batches = rank_batches(len(records), batch_size, synced)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=sum(len(b) for b in batches if b is not None), desc=f"eval {task}", unit="row", file=sys.stderr, mininterval=2.0, disable=not show)
    rows = []
    for batch in batches:
        idx = batch if batch is not None else [0]
        inputs = collate_labelled([tokenize_labelled(tokenizer, records[i], labels[i], cutoff_len) for i in idx], pad)
        inputs.pop("labels")
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float()
        if batch is None:
            continue  # a padding call under ZeRO-3: keeps the collectives in step
        for i, guess, scores in zip(idx, logits.argmax(-1).tolist(), logits.tolist()):
            rows.append({"index": i, "task": task, "text": records[i]["text"], "text_pair": records[i].get("text_pair"),
                         "label": names[labels[i]], "prediction": names[guess], "label_id": labels[i],
                         "prediction_id": guess, "correct": guess == labels[i], "logits": scores})
        bar.update(len(idx))
    bar.close()
    return rows
