#!/usr/bin/env bash
# Run the training loop with the DeepSpeed launcher instead of Ray:
#   launch/deepspeed.sh CONFIG [--set key=value ...] [deepspeed launcher args...]
# e.g.   NPROC=2 launch/deepspeed.sh configs/demo.yaml --set train.max_steps=40   (one machine; CPU works)
#        HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/paper/llama3_8b_commonsense.yaml
# Each rank runs `python -m pipeline.launch.worker CONFIG`; rank 0 creates and logs the MLflow run
# (use an `mlflow server` URI, launch/mlflow_server.sh, when ranks live on several nodes).
# The worker's own options (--set, --run-id, --tracking-uri) go to every rank; the rest to the launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...] [extra deepspeed args]" >&2
  exit 2
fi
CONFIG="$1"; shift
[ -f "$CONFIG" ] || { echo "error: config $CONFIG not found" >&2; exit 2; }
DEEPSPEED="${DEEPSPEED:-.venv/bin/deepspeed}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARGS=()
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE")
else
  # --num_gpus is how the launcher counts local processes, on CPU machines too.
  ARGS+=(--num_gpus "${NPROC:-2}")
fi
ARGS+=(--master_port "${MASTER_PORT:-29512}")
WORKER=()
while [ $# -gt 0 ]; do
  case "$1" in
    --set|--run-id|--tracking-uri)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      WORKER+=("$1" "$2"); shift 2 ;;
    --set=*|--run-id=*|--tracking-uri=*)
      WORKER+=("$1"); shift ;;
    *)
      ARGS+=("$1"); shift ;;
  esac
done
exec "$DEEPSPEED" "${ARGS[@]}" --module pipeline.launch.worker "$CONFIG" ${WORKER[@]+"${WORKER[@]}"}
