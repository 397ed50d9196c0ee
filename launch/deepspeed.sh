#!/usr/bin/env bash
# Run the training loop with the DeepSpeed launcher instead of Ray:
#   launch/deepspeed.sh CONFIG [--set key=value ...] [deepspeed launcher args...]
# e.g.   NPROC=2 launch/deepspeed.sh configs/demo.yaml --set train.max_steps=40   (one machine; CPU works)
#        GLOO_SOCKET_IFNAME=eth1 HOSTFILE=/shared/hostfile launch/deepspeed.sh configs/my_run.yaml
# Each rank runs `python -m pipeline.launch.worker CONFIG`; rank 0 creates and logs the MLflow run
# (use an `mlflow server` URI, launch/mlflow_server.sh, when ranks live on several nodes).
# The worker's own options (--set, --run-id, --tracking-uri) go to every rank; the rest to the launcher.
#
# With HOSTFILE (lines "host slots=N", launch/hostfile.example), DeepSpeed's default launcher, pdsh
# over ssh, starts the ranks on every host, in this project's folder at the same absolute path (a
# shared disk, or a copy at the same path). Before it starts, this script
#   - checks that every host answers over ssh within SSH_CONNECT_TIMEOUT (default 10) seconds, and
#     stops naming the hosts that do not (DeepSpeed itself checks only the first, and pdsh would wait);
#   - passes the first host as --master_addr (MASTER_ADDR overrides it): it must resolve to the same
#     address on every host;
#   - exports to the remote ranks what they need from this shell, which ssh does not carry: the
#     interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME; one set gives the other), PATH,
#     LD_LIBRARY_PATH and the GLOO_* NCCL_* TSD_* HF_* TRANSFORMERS_* TOKENIZERS_* OMP_* MKL_* TORCH_*
#     CUDA_* DS_* variables, through DeepSpeed's environment file (DS_ENV_FILE, read by the runner;
#     a ~/.deepspeed_env or ./.deepspeed_env of yours is added after them and wins). Names holding
#     TOKEN, PASSWORD, SECRET or KEY are left out: the exports appear on every host's process list;
#   - stops the job on every host when the ranks of one host fail (pdsh alone would wait; below).
# SSH_OPTS: extra ssh options for every connection (e.g. "-F /path/ssh_config -p 2222").
# With --no_ssh (one launcher per host, --node_rank N --master_addr HOST) nothing goes over ssh.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set key=value ...] [extra deepspeed args]" >&2
  exit 2
fi
CONFIG="$1"; shift
[ -f "$CONFIG" ] || { echo "error: config $CONFIG not found" >&2; exit 2; }
# Absolute before the cd below: the ranks start in the project folder, on every host.
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "error: HOSTFILE $HOSTFILE not found" >&2; exit 2; }
  HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
fi
cd "$(dirname "$0")/.."
DEEPSPEED="${DEEPSPEED:-$PWD/.venv/bin/deepspeed}"
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
NO_SSH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --set|--run-id|--tracking-uri)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      WORKER+=("$1" "$2"); shift 2 ;;
    --set=*|--run-id=*|--tracking-uri=*)
      WORKER+=("$1"); shift ;;
    *)
      [ "$1" = --no_ssh ] && NO_SSH=1
      ARGS+=("$1"); shift ;;
  esac
done
if [ -z "${HOSTFILE:-}" ] || [ "$NO_SSH" = 1 ]; then
  exec "$DEEPSPEED" "${ARGS[@]}" --module pipeline.launch.worker "$CONFIG" ${WORKER[@]+"${WORKER[@]}"}
fi

# ---- several hosts over ssh (pdsh)
mapfile -t HOSTS < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
[ ${#HOSTS[@]} -gt 0 ] || { echo "error: HOSTFILE $HOSTFILE names no host" >&2; exit 2; }
command -v pdsh >/dev/null || {
  echo "error: pdsh not found: DeepSpeed's multi-node launcher runs pdsh over ssh (apt-get install pdsh)" >&2; exit 2; }
TIMEOUT="${SSH_CONNECT_TIMEOUT:-10}"
SSH_ARGS="-o BatchMode=yes -o ConnectTimeout=$TIMEOUT ${SSH_OPTS:-}"
echo "checking ssh to ${HOSTS[*]} (${TIMEOUT}s each)" >&2
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PIDS=()
for i in "${!HOSTS[@]}"; do  # all hosts at once: the check takes one timeout, not one per host
  # shellcheck disable=SC2086  # SSH_ARGS is a list of options
  timeout $((TIMEOUT + 10)) ssh $SSH_ARGS "${HOSTS[$i]}" true </dev/null >"$TMP/ssh.$i" 2>&1 &
  PIDS+=($!)
done
UNREACHABLE=()
for i in "${!HOSTS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    UNREACHABLE+=("${HOSTS[$i]} ($(tail -n 1 "$TMP/ssh.$i" | tr -d '\r' || true))")
  fi
done
if [ ${#UNREACHABLE[@]} -gt 0 ]; then
  printf 'error: not reachable over ssh from %s: %s\n' "$(hostname)" "${UNREACHABLE[*]}" >&2
  echo "Every host of $HOSTFILE must accept passwordless ssh (BatchMode) from this one within ${TIMEOUT}s;" \
       "SSH_OPTS adds ssh options (a config file, a port), SSH_CONNECT_TIMEOUT sets the limit." >&2
  exit 2
fi

# What the remote ranks need from this shell (ssh starts them with the remote login environment).
if [ -n "${GLOO_SOCKET_IFNAME:-}" ] && [ -z "${NCCL_SOCKET_IFNAME:-}" ]; then export NCCL_SOCKET_IFNAME="$GLOO_SOCKET_IFNAME"; fi
if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then export GLOO_SOCKET_IFNAME="$NCCL_SOCKET_IFNAME"; fi
ENV_FILE="$TMP/deepspeed_env"
{
  env -0 | while IFS= read -r -d '' kv; do
    name="${kv%%=*}"
    case "$name" in
      *TOKEN*|*PASSWORD*|*SECRET*|*KEY*|DS_ENV_FILE) continue ;;
      PATH|LD_LIBRARY_PATH|GLOO_*|NCCL_*|TSD_*|HF_*|TRANSFORMERS_*|TOKENIZERS_*|OMP_*|MKL_*|TORCH_*|CUDA_*|DS_*) ;;
      *) continue ;;
    esac
    case "$kv" in *$'\n'*|*'"'*|*'`'*|*'$'*) echo "warning: $name not exported to the remote ranks (a quote, \$ or newline in its value)" >&2; continue ;; esac
    printf '%s\n' "$kv"
  done
  for own in "$HOME/.deepspeed_env" ./.deepspeed_env; do  # DS_ENV_FILE replaces these: keep them, last
    [ -f "$own" ] && grep -v '^[[:space:]]*$' "$own" || true
  done
} >"$ENV_FILE"
export DS_ENV_FILE="$ENV_FILE"  # an absolute path: DeepSpeed joins it to ~ and ., which keeps it
# pdsh's ssh: the same options, so a host that stops answering mid-launch fails within the timeout.
export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} $SSH_ARGS"
# DeepSpeed's own ssh check covers the first host only, with ssh's defaults: done above, for all.
MASTER="${MASTER_ADDR:-${HOSTS[0]}}"
ARGS+=(--no_ssh_check --master_addr "$MASTER")
# Not exec: the environment file must outlive the runner's start and then go, and a host whose ranks
# fail must end the others' too: pdsh waits for every host, and ranks on a healthy host would wait
# for the failed one in the rendezvous or a collective until workers.collective_timeout_s (30 min).
# pdsh reports "<host>: ssh exited with exit code N"; at the first such line (or a TERM/INT to this
# script) this job's launch processes are stopped on every host over ssh, found by this job's
# --master_addr/--master_port (the runner's own clean-up would pkill every DeepSpeed launch on the
# hosts); the ranks end with them (pipeline/launch/lifeline.py), pdsh and the runner follow.
mkfifo "$TMP/out"
"$DEEPSPEED" "${ARGS[@]}" --module pipeline.launch.worker "$CONFIG" ${WORKER[@]+"${WORKER[@]}"} >"$TMP/out" 2>&1 &
RUNNER=$!
STOPPING=""
stop_everywhere() {
  [ -z "$STOPPING" ] || return 0
  STOPPING=1
  local pattern="deepspeed[.]launcher[.]launch .*--master_addr=$MASTER --master_port=${MASTER_PORT:-29512}( |\$)" h
  for h in "${HOSTS[@]}"; do
    # shellcheck disable=SC2086
    timeout $((TIMEOUT + 10)) ssh $SSH_ARGS "$h" "pkill -TERM -f -- '$pattern'" </dev/null >/dev/null 2>&1 &
  done
}
trap stop_everywhere TERM INT
while true; do
  if IFS= read -r line; then
    printf '%s\n' "$line"
    case "$line" in
      *": ssh exited with exit code "[1-9]*)
        if [ -z "$STOPPING" ]; then
          host="${line%%: ssh exited*}"; host="${host##*: }"
          echo "error: the ranks on $host failed (${line##*: }, above): stopping this job on every host of $HOSTFILE" >&2
          stop_everywhere
        fi ;;
    esac
  elif [ $? -gt 128 ]; then continue  # a trapped signal interrupted the read: go on reading
  else break; fi
done <"$TMP/out"
CODE=0
wait "$RUNNER" || CODE=$?
while kill -0 "$RUNNER" 2>/dev/null; do wait "$RUNNER" || CODE=$?; done  # a signal cut the wait short
[ -z "$STOPPING" ] || [ "$CODE" != 0 ] || CODE=1
exit "$CODE"
