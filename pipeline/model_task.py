"""What `model.task` changes about the model: its class, its head, and how the head starts.

causal_lm: `AutoModelForCausalLM`, answers generated (the paper's commonsense protocol).
seq_cls:   `AutoModelForSequenceClassification`: an encoder (BERT's pooled [CLS]) or a decoder
           (its last non-pad token) with a new linear head over `num_labels` classes, trained
           whole beside the adapter and exported as PEFT's `modules_to_save` (the paper's GLUE
           setting on DeBERTaV3).

The classification task itself (its head, its evaluation, its rows) lives in
pipeline.classification; this module is the seam the causal-LM path asks which model class a task
takes and what a model folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS = ("causal_lm", "seq_cls")
PEFT_TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def model_class(task: str):
    """The transformers Auto class of a task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"model.task: {task!r} is not one of {', '.join(TASKS)}")
    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def task_of_folder(folder: str | Path) -> str:
    """seq_cls when a model folder's config names a sequence-classification architecture (a
    fully fine-tuned classifier), else causal_lm."""
    try:
        arch = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return "causal_lm"
    return "seq_cls" if any(a.endswith("ForSequenceClassification") for a in arch) else "causal_lm"
