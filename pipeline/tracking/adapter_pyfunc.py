"""The MLflow model of a registered adapter: the base causal LM with the run's PEFT adapter.

This file is MLflow "models from code": `pipeline.tracking.registry` stores a copy of it with
every registered version, and MLflow runs that copy to build the model when the version is
loaded. Nothing is unpickled, and the version loads with mlflow, torch, transformers and peft
alone, so this file imports nothing of `pipeline` or `tsd`, and the project never imports it.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    model = mlflow.pyfunc.load_model("models:/NAME/1", model_config={"base_model": "/models/llama-7b"})
    model.predict(["Question: ... Answer:"])  # the generated texts
    peft_model = model.unwrap_python_model().model  # a peft.PeftModel

`model_config` (all optional): `base_model`, the base model folder or hub id (default: the
adapter's `base_model_name_or_path`, the training run's `model.path`); `device` (default: cuda
when available); `max_new_tokens` per prompt (default 32).
"""

from __future__ import annotations

import mlflow
import torch
from mlflow.pyfunc import PythonModel
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ADAPTER_ARTIFACT = "adapter"  # the key of the adapter folder in the model's artifacts
DEFAULT_MAX_NEW_TOKENS = 32


class PeftAdapterModel(PythonModel):
    """Generates text with a base model + PEFT adapter; `.model` and `.tokenizer` after loading."""

    def load_context(self, context) -> None:
        adapter_dir = context.artifacts[ADAPTER_ARTIFACT]
        options = context.model_config or {}
        base = options.get("base_model") or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
        device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        if self.tokenizer.pad_token_id is None:  # LLaMA tokenizers have none; generate() needs one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        self.model = PeftModel.from_pretrained(base_model, adapter_dir).to(device).eval()

    # The type hints are the model's signature: MLflow checks and converts inputs with them.
    def predict(self, context, model_input: list[str]) -> list[str]:
        """The greedy continuation of each prompt, at most `max_new_tokens` (model_config) tokens."""
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
