#!/usr/bin/env bash
# The reproduction on this machine: SmolLM2-135M trained on three real tasks together
# (Social-IQa, QuaRTz, StrategyQA; configs/smollm2_commonsense3.yaml), LoRA vs LoRA-Dash vs
# LoRA-Init vs LoRA-TSD at equal rank and equal step budget, several ranks and seeds, then the
# paper-style table. Every run is a normal `tsd train` (Ray, 2 ZeRO-3 workers, MLflow).
#   launch/reproduce.sh                          # defaults below (docs/RESULTS.md's sweep)
#   METHODS="lora dash" RANKS="8" SEEDS="0" STEPS=60 launch/reproduce.sh
# Runs that already finished (their result.json exists) are skipped, so it can be resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
TSD="${TSD:-.venv/bin/tsd}"
METHODS="${METHODS:-lora dash init tsd}"
RANKS="${RANKS:-4 8}"   # the paper reports its largest Dash gains at low rank
SEEDS="${SEEDS:-0 1 2}"
STEPS="${STEPS:-30}"
SWITCH="${SWITCH:-8}"
EVAL_LIMIT="${EVAL_LIMIT:-30}"   # rows per task
BEAMS="${BEAMS:-1}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-16}"
CONFIG="${CONFIG:-configs/smollm2_commonsense3.yaml}"
EXPERIMENT="${EXPERIMENT:-smollm2-commonsense3-repro}"
EXTRA="${EXTRA:-}"  # more overrides, e.g. EXTRA="--set train.grad_accum=1"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$TSD" prepare-model >/dev/null
"$TSD" prepare-data social_i_qa quartz strategyqa >/dev/null
for seed in $SEEDS; do
  for r in $RANKS; do
    for method in $METHODS; do
      name="repro-${method}-r${r}-s${seed}"
      if [ -f "runs/${name}/result.json" ]; then echo "== skip ${name} (done)"; continue; fi
      echo "== ${name}"
      start=$(date +%s)
      "$TSD" train "$CONFIG" \
        --set name="${name}" --set method.method="${method}" --set method.r="${r}" \
        --set method.alpha=$((2 * r)) --set method.switch_step="${SWITCH}" \
        --set train.seed="${seed}" --set train.max_steps="${STEPS}" \
        --set train.eval_limit="${EVAL_LIMIT}" --set train.eval_num_beams="${BEAMS}" \
        --set train.eval_max_new_tokens="${MAX_NEW_TOKENS}" \
        --set tracking.experiment="${EXPERIMENT}" $EXTRA
      echo "== ${name} took $(( $(date +%s) - start ))s"
    done
  done
done
out="${OUTPUT_DIR:-runs}/compare-${EXPERIMENT}"
"$TSD" compare "${EXPERIMENT}" --loss-window 10 --out "$out"
# What the table came from, to commit beside it: the code (commit, uncommitted changes), when
# and where, the settings, and every run's own result.json.
export METHODS RANKS SEEDS STEPS SWITCH EVAL_LIMIT BEAMS MAX_NEW_TOKENS CONFIG EXPERIMENT EXTRA
"$(dirname "$TSD")/python" - "$out" <<'PYEOF'
import datetime, glob, json, os, platform, subprocess, sys

out = sys.argv[1]
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.rstrip("\n")
keys = "METHODS RANKS SEEDS STEPS SWITCH EVAL_LIMIT BEAMS MAX_NEW_TOKENS CONFIG EXPERIMENT EXTRA".split()
prov = {"commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--untracked-files=no").splitlines(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: os.environ.get(k, "") for k in keys}}
with open(os.path.join(out, "provenance.json"), "w") as f:
    json.dump(prov, f, indent=2)
with open(os.path.join(out, "runs.jsonl"), "w") as f:
    for path in sorted(glob.glob("runs/repro-*/result.json")):
        with open(path) as r:
            f.write(json.dumps({"run": path.split("/")[1], **json.load(r)}) + "\n")
print(f"provenance.json and runs.jsonl written to {out}")
PYEOF
