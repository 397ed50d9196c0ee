"""Evaluation by generation, as the paper's harness does it (LLM-Adapters' commonsense_evaluate.py).

For every test row: the evaluation prompt (`generate_eval_prompt`, instruction only: the
harness never passes `input`), deterministic generation (`num_beams` 4, `max_new_tokens` 32,
batch 1 by default), the response text after "### Response:", and the prediction = the first
match of the task's answer regex (`extract_answer`). No match is a wrong answer. Accuracy =
exact match with the row's `answer`; the average is the mean of the per-task accuracies (the
paper's "Avg." column). Accuracies are fractions in [0, 1]; `tsd compare` prints percentages.

Works in three settings, with the same function, `evaluate_tasks`:
- one process (the `tsd evaluate` command: a base model folder + an exported adapter);
- several processes with torch.distributed initialized: rank k generates rows k::world of each
  task and the rows are gathered with `all_gather_object`, so every rank returns the whole
  result (rank 0 writes and logs it);
- inside the training loop under DeepSpeed ZeRO-3: every forward is a collective there, so all
  ranks must run the same number of `generate` calls and keep stepping until the longest
  generation on any rank ends. Ranks with fewer rows run padding calls on a dummy row (results
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
import torch.distributed as dist
from peft import PeftModel
from tqdm.auto import tqdm
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from pipeline.data.tasks import (
    answer_format,
    answer_format_from_instruction,
    extract_answer,
    generate_eval_prompt,
    load_records,
    response_text,
)
from pipeline.config import RunConfig
from pipeline.eval_memory import EVAL_PARTITIONED, EVAL_TRAINED, EVAL_WHOLE, choose_eval_model
from pipeline.file_checks import check_adapter_folder, check_model_folder
from pipeline.eval_rows import gather_rows, rank_batches
from pipeline.logs import log
from pipeline.model_task import HEAD_MODULES, head_config, task_of_folder
from pipeline.precision import weights_dtype
from pipeline.training.distributed import bind_device, leave_process_group, rank_and_world
from pipeline.training.engine import release_training_state
from pipeline.training.memory import release_freed_heap
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.secrets import mask_secrets
from pipeline.tracking.store import DB_FILE, check_reachable, resolve_tracking_uri
from tsd.export import SIDECAR, apply_state, load_adapter, read_sidecar
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


# ----------------------------------------------------------------------------- loading
# ----------------------------------------------------------------------------- after training


def unpartitioned_copy(cfg: RunConfig, state: dict):
    """Each rank's own whole copy of the base model with the just-exported adapter.

    Generating with the ZeRO-3 engine all-gathers every weight for every new token (measured
    ~15 s per Social-IQa row for SmolLM2 on CPU); a whole copy per rank generates its shard of
    the test set at full speed. It costs one model's memory per rank for the evaluation only.
    """
    unset_hf_deepspeed_config()  # from here on from_pretrained must not partition
    full = cfg.method.method == "full"  # the exported fine-tuned model itself, no adapter
    # Straight onto this rank's GPU, weight by weight (device_map): built in host memory first, a
    # whole copy per rank would need the node's RAM to hold every local rank's model at once.
    on_gpu = {"device_map": {"": torch.device("cuda", torch.cuda.current_device())}} if torch.cuda.is_available() else {}
    model = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir.resolve() / "model") if full else cfg.model.path,
                                                 dtype=getattr(torch, weights_dtype(cfg)),
                                                 trust_remote_code=cfg.model.trust_remote_code, **on_gpu)
    if not full:
        apply_state(model, cfg.method.tsd(), state)  # the layers are made on their base weight's device
    return model.eval()


def evaluate_after_training(engine, adapter_state: dict, tokenizer, cfg: RunConfig, run_dir: Path, tracker,
                            step: int, classes: list[str] | None = None) -> dict:
    """The paper's protocol on every test set of data.test, sharded over the ranks (every rank
    calls it), on a whole copy per rank or on the partitioned model (`choose_eval_model`). The
    training engine is released first either way: its optimizer state always, its share of the
    base too before a whole copy is built. The engine cannot train after this.

    A classifier (model.task seq_cls, class names `classes`) is scored on the trained model as
    it is, partitioned or not: one forward per batch of rows needs no whole copy to be fast."""
    t = cfg.train
    sets = cfg.data.test_sets()
    if cfg.model.task == "seq_cls":
        from pipeline.classify import evaluate_classification
        from pipeline.data.labelled import load_labelled

        how = EVAL_PARTITIONED if _is_partitioned(engine.module) else EVAL_TRAINED
        log(f"classifying {', '.join(sets)} with the {how} model; batch {t.eval_batch_size}, limit {t.eval_limit} rows")
        release_training_state(engine, keep_module=True)
        result = evaluate_classification(engine.module, tokenizer, {task: load_labelled(path) for task, path in sets.items()},
                                         classes, batch_size=t.eval_batch_size, cutoff_len=cfg.data.cutoff_len,
                                         limit=t.eval_limit)
        return _record(result, run_dir, tracker, step, how)
    # The optimizer state goes first, then the choice counts what is really left (for full
    # fine-tuning the state is several times the model); the model's slices go only for a copy.
    release_training_state(engine, keep_module=True)
    how, why = choose_eval_model(cfg, engine.module)
    log(f"evaluating on {', '.join(sets)} with the {how} model ({why}); beams {t.eval_num_beams}, "
        f"max new tokens {t.eval_max_new_tokens}, batch {t.eval_batch_size}, limit {t.eval_limit} rows per task")
    if how == EVAL_WHOLE:
        release_training_state(engine, keep_module=False)
    eval_model = unpartitioned_copy(cfg, adapter_state) if how == EVAL_WHOLE else engine.module
    result = evaluate_tasks(
        eval_model, tokenizer, {task: load_records(path) for task, path in sets.items()},
        num_beams=t.eval_num_beams, max_new_tokens=t.eval_max_new_tokens, limit=t.eval_limit,
        batch_size=t.eval_batch_size,
    )
    del eval_model
    return _record(result, run_dir, tracker, step, how)


def _record(result: dict, run_dir: Path, tracker, step: int, how: str) -> dict:
    """Rank 0 writes the evaluation under <run>/eval and logs it; every rank returns the metrics."""
    rank, _ = rank_and_world()
    if rank == 0:
        out = write_results(result, run_dir / "eval")
        tracker.log_metrics(result["metrics"], step)
        tracker.log_artifacts(str(out), "eval")
        tracker.set_tags({"eval_model": how})
        log("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return dict(result["metrics"])


def parse_data_arg(spec: str) -> tuple[str, Path]:
    """"task=path.json" -> (task, path). Without "task=", the task is the file's folder name
    when the file is test.json(l) (LLM-Adapters' dataset/<task>/test.json), else its stem."""
    if "=" in spec:
        task, _, path = spec.partition("=")
        if not task or not path:
            raise ValueError(f"--data {spec!r}: expected TASK=PATH")
        return task, Path(path)
    p = Path(spec)
    return (p.parent.name if p.stem == "test" and p.parent.name else p.stem), p


def load_tasks(specs: Sequence[str]) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = {}
    for spec in specs:
        task, path = parse_data_arg(spec)
        if task in tasks:
            raise ValueError(f"--data: task {task!r} given twice")
        tasks[task] = load_records(path)
        row_format(task, tasks[task][0])
    return tasks


def load_model(model_dir: str | os.PathLike | None, adapter_dir: str | os.PathLike | None = None,
               dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): the base model folder plus, optionally, an exported adapter.

    A lora-tsd adapter (with tsd_state.safetensors) is restored with `tsd.load_adapter` on the
    original base, unmerged; a stock PEFT adapter (no sidecar) with `PeftModel.from_pretrained`.
    Without `model_dir` the base recorded in the adapter is used.
    """
    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"--adapter: {adapter} is not a folder")
    if adapter is not None:
        check_adapter_folder(adapter, "--adapter")  # truncated or garbage files: named, before any library reads them
    if model_dir is None:
        model_dir = _recorded_base(adapter) if adapter is not None else None
        if not model_dir:
            raise ValueError("--model is required (the adapter records no base model path)")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {path} is not a Hugging Face model folder (no config.json)")
    check_model_folder(path, "--model")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: {dtype!r} is not one of float32, bfloat16, float16")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    classes = adapter_classes(adapter) if adapter is not None else None
    if classes is None and task_of_folder(path) == "seq_cls":  # a fully fine-tuned classifier
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=getattr(torch, dtype))
    elif classes is not None:  # a head over `classes`, filled from the adapter below
        config = AutoConfig.from_pretrained(str(path))
        head_config(config, len(classes), classes, tokenizer.pad_token_id)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    if adapter is not None:
        if (adapter / SIDECAR).is_file():
            load_adapter(model, adapter)
        elif (adapter / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(model, str(adapter))
        else:
            raise FileNotFoundError(f"--adapter: {adapter} holds neither {SIDECAR} nor adapter_config.json")
    model.to(device)
    model.eval()
    return model, tokenizer


def adapter_classes(adapter: Path) -> list[str] | None:
    """The class names of a classifier's adapter, in id order (None: not a classifier): the names
    a lora-tsd sidecar records, else for a stock PEFT SEQ_CLS adapter ids "0".."k-1", k read
    from its head's weight."""
    if (adapter / SIDECAR).is_file():
        _, _, metadata = read_sidecar(adapter)
        if "labels" in metadata:
            return json.loads(metadata["labels"])
    config = adapter / "adapter_config.json"
    if not config.is_file() or json.loads(config.read_text()).get("task_type") != "SEQ_CLS":
        return None
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        heads = [k for k in f.keys() if k.endswith(tuple(f"{h}.weight" for h in HEAD_MODULES)) and "lora_" not in k]
        if not heads:
            raise ValueError(f"--adapter: {adapter} is a SEQ_CLS adapter without a saved head ({', '.join(HEAD_MODULES)})")
        return [str(i) for i in range(f.get_slice(heads[0]).get_shape()[0])]


def model_classes(model) -> list[str] | None:
    """A loaded classifier's class names in id order (its config's id2label), else None."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    return [str(base.config.id2label[i]) for i in range(base.config.num_labels)]


def _recorded_base(adapter: Path) -> str | None:
    cfg = adapter / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            return base
    return None


# ----------------------------------------------------------------------------- the command
def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded store `tsd train` uses by default (runs/mlflow.db)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return resolve_tracking_uri(env, "runs")
    return "sqlite:///" + (Path("runs").resolve() / DB_FILE).as_posix()  # no folder made just by asking


def _init_distributed_from_env() -> bool:
    """Join the process group a launcher (torchrun, deepspeed) describes in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    bind_device()  # cuda:LOCAL_RANK before the group exists (a no-op on CPU)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def run_evaluation(
    model: str | None,
    adapter: str | None,
    data: Sequence[str],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    limit: int | None = None,
    use_input: bool = False,
    out: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    step: int | None = None,
) -> dict:
    """`tsd evaluate`: load, evaluate (sharded over ranks when launched by torchrun), write the
    predictions and metrics to `out` and, with `run_id`, log them to that MLflow run (rank 0)."""
    started = _init_distributed_from_env()
    finished = False
    try:
        rank, _ = rank_and_world()
        if device is None and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        uri = tracking_uri or default_tracking_uri()
        if run_id:  # before hours of generation, not after (every rank checks: none is left waiting)
            check_reachable(uri, "--tracking-uri" if tracking_uri else "$MLFLOW_TRACKING_URI",
                            "start it, or fix the URI, or leave out --run-id to evaluate without logging")
            if not RunLogger(uri, run_id).verify():
                raise ValueError(f"--run-id {run_id}: no such MLflow run at {mask_secrets(uri)} (see the warning above)")
        mdl, tok = load_model(model, adapter, dtype=dtype, device=device)
        classes = model_classes(mdl)
        if classes is not None:  # a classifier: test files of text/label rows, accuracy and MCC
            from pipeline.classify import evaluate_classification
            from pipeline.data.labelled import load_labelled

            sets = dict(parse_data_arg(spec) for spec in data)
            result = evaluate_classification(mdl, tok, {t: load_labelled(p) for t, p in sets.items()}, classes,
                                             batch_size=batch_size, limit=limit)
        else:
            result = evaluate_tasks(mdl, tok, load_tasks(data), num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, limit=limit, use_input=use_input)  # fmt: skip
        out_dir = Path(out) if out else (Path(adapter).resolve().parent / "eval" if adapter else Path("eval"))
        result["out_dir"] = str(out_dir)
        result["rank"] = rank
        if rank == 0:
            write_results(result, out_dir)
            if run_id:
                if not log_results(result, uri, run_id, out_dir, step=step):
                    log(f"warning: not everything reached MLflow run {run_id}")
                result["logged_to"] = {"tracking_uri": uri, "run_id": run_id}
        finished = True
        return result
    finally:
        if started:  # before the interpreter's teardown, which can abort a rank (pipeline.training.distributed)
            leave_process_group(together=finished)
