#!/usr/bin/env bash
# Submit a training run to a Ray cluster as a Ray job:
#   launch/ray_submit.sh CONFIG [--set key=value ...]
# RAY_ADDRESS: the cluster's dashboard address (default http://127.0.0.1:8265).
# JOB_ENV: environment of the job as a JSON object, e.g. '{"HF_HOME": "/shared/hf"}' (default none).
#   Never a secret: Ray shows the job's environment in its dashboard and job API. Secrets go in a
#   KEY=VALUE file on the cluster's shared storage, named by TSD_ENV_FILE in JOB_ENV
#   (pipeline/launch/job_env.py); a secret-looking key or a URI password here is refused.
# Ray 2.60 requires token authentication for job submission: with RAY_AUTH_MODE=token the
# token is read from ~/.ray/auth_token (written by `ray start --head` with that mode), or from
# RAY_AUTH_TOKEN. The working directory is uploaded to the cluster (--working-dir .).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
[ -f "$CONFIG" ] || { echo "error: config $CONFIG not found" >&2; exit 2; }
RAY="${RAY:-.venv/bin/ray}"
"${PYTHON:-.venv/bin/python}" -m pipeline.launch.job_env "${JOB_ENV:-{\}}" || exit 2
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec "$RAY" job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env-json "{\"excludes\": [\".venv\", \".cache\", \"runs\", \".git\", \"mlartifacts\"], \"env_vars\": ${JOB_ENV:-{\}}}" \
  -- python -m pipeline.launch.cli train "$CONFIG" "$@"
