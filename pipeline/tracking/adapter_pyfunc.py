"""The MLflow model of a registered adapter: the base model with the run's PEFT adapter; a
causal LM generates text, a classifier (PEFT task_type SEQ_CLS, `model.task: seq_cls`) names a class.

This file is MLflow "models from code": `pipeline.tracking.registry` stores a copy of it with
every registered version, and MLflow runs that copy to build the model when the version is
loaded. Nothing is unpickled, and the version loads with mlflow, torch, transformers and peft
alone, so this file imports nothing of `pipeline` or `tsd`, and the project never imports it.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    model = mlflow.pyfunc.load_model("models:/NAME/1", model_config={"base_model": "/models/llama-7b"})
    model.predict(["Question: ... Answer:"])  # the generated texts (a classifier: the class names)
    peft_model = model.unwrap_python_model().model  # a peft.PeftModel

`model_config` (all optional): `base_model`, the base model folder or hub id (default: the
adapter's `base_model_name_or_path`, the training run's `model.path`); `device` (default: cuda
when available); `max_new_tokens` per prompt (default 32).
"""

from __future__ import annotations

import mlflow
import torch
from mlflow.pyfunc import PythonModel
import json
from pathlib import Path

from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

ADAPTER_ARTIFACT = "adapter"  # the key of the adapter folder in the model's artifacts
DEFAULT_MAX_NEW_TOKENS = 32
SIDECAR = "tsd_state.safetensors"  # lora-tsd's sidecar; its metadata "labels" holds a classifier's class names


def class_names(adapter_dir: str, config: PeftConfig) -> list[str]:
    """A classifier's class names in id order: the sidecar's, else ids "0".."k-1" with k the rows
    of the saved head (a stock PEFT adapter). This file may not import pipeline, whose
    `pipeline.eval_command.adapter_classes` reads the same two places."""
    sidecar = Path(adapter_dir) / SIDECAR
    if sidecar.is_file():
        with safe_open(str(sidecar), "pt") as f:
            labels = (f.metadata() or {}).get("labels")
        if labels:
            return json.loads(labels)
    heads = tuple(f"{name}.weight" for name in config.modules_to_save or ())
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(heads) and "lora_" not in k]
    if not rows:
        raise ValueError(f"{adapter_dir}: a SEQ_CLS adapter without a saved head (modules_to_save)")
    return [str(i) for i in range(rows[0])]


class PeftAdapterModel(PythonModel):
    """Base model + PEFT adapter; `.model`, `.tokenizer` and (classifiers) `.labels` after loading."""

    def load_context(self, context) -> None:
        adapter_dir = context.artifacts[ADAPTER_ARTIFACT]
        options = context.model_config or {}
        peft_config = PeftConfig.from_pretrained(adapter_dir)
        base = options.get("base_model") or peft_config.base_model_name_or_path
        device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        if self.tokenizer.pad_token_id is None:  # LLaMA tokenizers have none; generate() and a decoder head need one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.labels = None
        if str(peft_config.task_type) == "SEQ_CLS":
            self.labels = class_names(adapter_dir, peft_config)
            config = AutoConfig.from_pretrained(base, num_labels=len(self.labels))
            if config.pad_token_id is None:  # a decoder head pools the last non-pad token (as training set it)
                config.pad_token_id = self.tokenizer.pad_token_id
            base_model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype="auto")
        else:
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        self.model = PeftModel.from_pretrained(base_model, adapter_dir).to(device).eval()

    # The type hints are the model's signature: MLflow checks and converts inputs with them.
    def predict(self, context, model_input: list[str]) -> list[str]:
        """A classifier: each text's most likely class name. A causal LM: the greedy continuation
        of each prompt, at most `max_new_tokens` (model_config) tokens."""
        if self.labels is not None:
            out = []
            for text in model_input:
                ids = self.tokenizer(text, return_tensors="pt", truncation=True).to(self.model.device)
                with torch.no_grad():
                    out.append(self.labels[int(self.model(**ids).logits[0].argmax())])
            return out
        max_new_tokens = int((context.model_config or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        texts = []
        for prompt in model_input:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
            texts.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        return texts


mlflow.models.set_model(PeftAdapterModel())
