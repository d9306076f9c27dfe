#!/usr/bin/env bash
# Train on the GPUs of one machine. Default: one process drives every visible
# GPU (JAX's natural mode). --per-gpu: one process per GPU, joined through
# jax.distributed on localhost, each logging to --log-dir/process_N.log. Run with --help for usage; --dry-run prints the exact
# commands instead of running them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_common.sh
source "$HERE/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh --config PATH --workdir DIR [options] [--config.FIELD=VALUE ...] [-- MAIN_FLAGS...]

Options:
  --config PATH        config file, e.g. configs/default.py or configs/demo.py:smoke (required)
  --workdir DIR        run directory: checkpoints, summaries, logs (required)
  --gpus LIST          GPUs to use, e.g. 0,1,2,3 (exported as CUDA_VISIBLE_DEVICES;
                       default: every GPU, or CUDA_VISIBLE_DEVICES if already set)
  --per-gpu            one process per GPU instead of one process for all GPUs
  --port PORT          coordinator port on localhost for --per-gpu (default 29500)
  --log-dir DIR        --per-gpu: folder for process_N.log files (default logs/RUN,
                       RUN = last part of --workdir)
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory
                       XLA preallocates (default 0.90, leaving room for cuDNN/NCCL)
  --xla-flags FLAGS    extra XLA_FLAGS, appended to the defaults below
  --python PY          Python interpreter (default: $PYTHON or python3)
  --max-restarts N     re-run a preempted run (exit 75: stopped by SIGTERM after its
                       checkpoint) up to N times; it resumes (default 10, or $BF_MAX_RESTARTS)
  --dry-run            print the commands instead of running them
  -h, --help           show this help

Environment given to the trainer:
  XLA_PYTHON_CLIENT_MEM_FRACTION=F
  XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_latency_hiding_scheduler=true [--xla-flags]"
             (overlaps gradient all-reduces with compute)
  CUDA_VISIBLE_DEVICES=LIST (with --gpus)

Arguments --config.FIELD=VALUE override config fields; everything after '--' goes to
broadface_jax.main unchanged. Batch and queue sizes in the config are per device.

Examples:
  launch/gpu_single_node.sh --config configs/default.py --workdir runs/r100 --gpus 0,1,2,3
  launch/gpu_single_node.sh --config configs/default.py --workdir runs/r100 --per-gpu --gpus 0,1
EOF
}

CONFIG=""
WORKDIR=""
GPUS=""
PER_GPU=0
PORT=29500
LOG_DIR=""
MEM_FRACTION=0.90
XLA_EXTRA=""
PYTHON_BIN=${PYTHON:-python3}
declare -a EXTRA=()

while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config) bf_need_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --workdir) bf_need_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --gpus) bf_need_value "$1" $# "${2:-}"; GPUS=$2; shift 2 ;;
    --gpus=*) GPUS=${1#*=}; shift ;;
    --per-gpu) PER_GPU=1; shift ;;
    --port) bf_need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --log-dir) bf_need_value "$1" $# "${2:-}"; LOG_DIR=$2; shift 2 ;;
    --log-dir=*) LOG_DIR=${1#*=}; shift ;;
    --mem-fraction) bf_need_value "$1" $# "${2:-}"; MEM_FRACTION=$2; shift 2 ;;
    --mem-fraction=*) MEM_FRACTION=${1#*=}; shift ;;
    --xla-flags) bf_need_value "$1" $#; XLA_EXTRA=$2; shift 2 ;;
    --xla-flags=*) XLA_EXTRA=${1#*=}; shift ;;
    --python) bf_need_value "$1" $# "${2:-}"; PYTHON_BIN=$2; shift 2 ;;
    --python=*) PYTHON_BIN=${1#*=}; shift ;;
    --max-restarts) bf_need_value "$1" $# "${2:-}"; BF_MAX_RESTARTS=$2; shift 2 ;;
    --max-restarts=*) BF_MAX_RESTARTS=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA+=("$@"); break ;;
    --config.*) bf_check_override "$1"; EXTRA+=("$1"); shift ;;
    *) bf_die "unknown argument '$1'" ;;
  esac
done

[[ -n $CONFIG ]] || bf_die "--config is required"
[[ -n $WORKDIR ]] || bf_die "--workdir is required"
[[ -f ${CONFIG%%:*} ]] || bf_die "--config '$CONFIG': no such file '${CONFIG%%:*}'"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  bf_die "--gpus '$GPUS': expected comma-separated GPU indices such as 0,1,2,3"
if [[ ! $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  bf_die "--port '$PORT' is not a TCP port"
fi
bf_check_restarts "$BF_MAX_RESTARTS"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] ||
  bf_die "--mem-fraction '$MEM_FRACTION': expected a number in (0, 1], e.g. 0.9"

XLA="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true ${XLA_EXTRA}"
XLA=$(printf '%s' "$XLA" | tr -s ' ')
XLA=${XLA# }
XLA=${XLA% }
ENV=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION" "XLA_FLAGS=$XLA")
[[ -z $GPUS ]] || ENV+=("CUDA_VISIBLE_DEVICES=$GPUS")
MAIN=("$PYTHON_BIN" -m broadface_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")

if ((PER_GPU == 0)); then
  bf_trap_stop
  status=0
  bf_retry "${ENV[@]}" "${MAIN[@]}" "${EXTRA[@]}" || status=$?
  exit "$status"
fi

# ---- one process per GPU
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  bf_die "--per-gpu needs bash >= 5.1 (wait -n -p); this is bash $BASH_VERSION"
fi
if [[ -n $GPUS ]]; then
  NUM=$(tr ',' '\n' <<<"$GPUS" | wc -l)
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  NUM=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
elif command -v nvidia-smi >/dev/null; then
  NUM=$(nvidia-smi --list-gpus | grep -c '^GPU')
else
  bf_die "--per-gpu: cannot count the GPUs (no --gpus, no CUDA_VISIBLE_DEVICES, no nvidia-smi)"
fi
((NUM >= 1)) || bf_die "--per-gpu: no GPUs found"
if [[ -z $LOG_DIR ]]; then
  RUN=${WORKDIR%/}
  LOG_DIR="logs/${RUN##*/}"
fi

declare -a LOGS=() REMAINING=()
# cleanup : stop the training processes that have not finished (never a reaped pid).
cleanup() {
  local pid
  for pid in "${REMAINING[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}

bf_note "$NUM processes, one per GPU; coordinator localhost:$PORT"
bf_run mkdir -p "$LOG_DIR"
if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < NUM; i++)); do
    log="$LOG_DIR/process_$i.log"
    LOGS+=("$log")
    cmd=("${ENV[@]}" "${MAIN[@]}" "--coordinator_address=localhost:$PORT" "--num_processes=$NUM"
      "--process_id=$i" "--local_device_ids=$i" "${EXTRA[@]}")
    printf '%s > %s 2>&1 &\n' "$(bf_quote "${cmd[@]}")" "$(bf_quote "$log")"
  done
  printf 'tail -n +1 -F %s &\n' "$(bf_quote "${LOGS[@]}")"
  printf 'wait\n'
  exit 0
fi

# run_all : start every process, stream their logs, wait; returns the first failure's status.
run_all() {
  local i log pid finished status=0
  LOGS=() REMAINING=()
  for ((i = 0; i < NUM; i++)); do
    log="$LOG_DIR/process_$i.log"
    LOGS+=("$log")
    cmd=("${ENV[@]}" "${MAIN[@]}" "--coordinator_address=localhost:$PORT" "--num_processes=$NUM"
      "--process_id=$i" "--local_device_ids=$i" "${EXTRA[@]}")
    : >"$log" # create it now: the redirection below happens in the background job, after tail starts
    "${cmd[@]}" >"$log" 2>&1 &
    REMAINING+=($!)
  done
  tail -n +1 -F "${LOGS[@]}" &
  TAIL=$!
  # Stop everything as soon as one process fails: the others would wait for it forever.
  while ((${#REMAINING[@]} > 0)); do
    finished=""
    wait -n -p finished "${REMAINING[@]}" || status=$?
    declare -a still=()
    for pid in "${REMAINING[@]}"; do
      [[ $pid == "$finished" ]] || still+=("$pid")
    done
    REMAINING=("${still[@]}")
    if ((status == BF_EXIT_PREEMPTED)); then
      # The others stop at the same step (a coordinated stop): wait for them, do not kill.
      printf '%s: a training process was preempted (exit %d); waiting for the others (logs in %s)\n' \
        "${0##*/}" "$status" "$LOG_DIR" >&2
      break
    elif ((status != 0)); then
      printf '%s: a training process failed (exit %d); stopping the others (logs in %s)\n' \
        "${0##*/}" "$status" "$LOG_DIR" >&2
      break
    fi
  done
  ((status == BF_EXIT_PREEMPTED)) || cleanup
  for pid in "${REMAINING[@]}"; do # let them finish their checkpoint before any restart
    wait "$pid" 2>/dev/null || true
  done
  REMAINING=()
  sleep 1 # let tail print the last lines
  kill "$TAIL" 2>/dev/null || true
  wait "$TAIL" 2>/dev/null || true
  return "$status"
}

trap 'BF_STOP=1; cleanup' INT TERM
trap cleanup EXIT
tries=0
while :; do
  status=0
  run_all || status=$?
  if ((status != BF_EXIT_PREEMPTED || BF_STOP || tries >= BF_MAX_RESTARTS)); then
    break
  fi
  tries=$((tries + 1))
  printf '%s: preempted (exit %d): restarting all processes to resume, restart %d of %d\n' \
    "${0##*/}" "$status" "$tries" "$BF_MAX_RESTARTS" >&2
done
trap - INT TERM EXIT
exit "$status"
