"""The evaluation at the end of training (every rank calls it, inside the training loop): the
paper's protocol on every test set of data.test, sharded over the ranks, on a whole copy of the
model per rank or on the partitioned ZeRO-3 model itself (pipeline.eval_memory decides which,
after the training state is freed); the result written to the run folder and logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from pipeline.config import RunConfig
from pipeline.data.tasks import load_records
from pipeline.eval_memory import EVAL_PARTITIONED, EVAL_TRAINED, EVAL_WHOLE, choose_eval_model
from pipeline.evaluate import _is_partitioned, evaluate_tasks, write_results
from pipeline.logs import log
from pipeline.precision import weights_dtype
from pipeline.training.distributed import rank_and_world
from pipeline.training.engine import release_training_state
from tsd.export import apply_state


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
        from pipeline.classification.evaluation import evaluate_classification
        from pipeline.classification.rows import load_labelled

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
