#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this repository to
# every worker, install, run python -m broadface_jax.main on all workers at
# once, and delete it. Run with --help for usage; --dry-run prints the exact
# commands (a runnable script) instead of running them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=launch/_common.sh
source "$HERE/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [--config.FIELD=VALUE ...] [-- MAIN_FLAGS...]

Commands:
  create   create the TPU VM / pod slice (gcloud compute tpus tpu-vm create)
  setup    copy this repository (git archive HEAD) to every worker, pip install it and jax[tpu]
  train    run python -m broadface_jax.main on every worker (--worker=all); each worker
           writes ~/broadface_logs/RUN/worker-N.log and streams its lines prefixed [worker N]
  up       create, setup and train in one go
  logs     print the last lines of every worker's log
  delete   delete the TPU VM

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE  default v4-32 (4 hosts x 4 chips)
  --version VERSION        TPU software version; default from the accelerator generation:
                           v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                   create a Spot TPU VM
  --config PATH            config file relative to the repository, optionally FILE:VARIANT (train/up)
  --workdir DIR            run directory; use gs://BUCKET/... on a pod slice so that
                           all workers share it (train/up)
  --run-name NAME          log folder name on the workers (default: last part of --workdir)
  --detach                 start training in the background (nohup) and return at once;
                           follow it with the logs command
  --lines N                lines per worker for the logs command (default 20)
  --max-restarts N         train/up: a worker whose trainer exits 75 (stopped by SIGTERM
                           after its checkpoint, e.g. a maintenance event) runs it again,
                           which resumes, up to N times (default 10, or $BF_MAX_RESTARTS)
  --dry-run                print the commands instead of running them
  -h, --help               show this help

Arguments --config.FIELD=VALUE override config fields; everything after '--' goes to
broadface_jax.main unchanged. The trainer is started with --distributed=jax so that
JAX finds the other workers through the TPU metadata server.

Example:
  launch/tpu_vm.sh up --name bf-v4 --zone us-central2-b --accelerator-type v4-32 \
      --config configs/default.py --workdir gs://my-bucket/broadface/run1 \
      --config.init_from=gs://my-bucket/arcface/run0
EOF
}

# default_version TYPE : the TPU software version for an accelerator type.
default_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) bf_die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}

COMMAND=""
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR="v4-32"
VERSION=""
SPOT=0
CONFIG=""
WORKDIR=""
RUN_NAME=""
DETACH=0
LINES=20
declare -a EXTRA=()

if (($# == 0)); then
  usage >&2
  exit 2
fi
while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    create | setup | train | up | logs | delete)
      [[ -z $COMMAND ]] || bf_die "two commands given: '$COMMAND' and '$1'"
      COMMAND=$1; shift ;;
    --name) bf_need_value "$1" $# "${2:-}"; NAME=$2; shift 2 ;;
    --name=*) NAME=${1#*=}; shift ;;
    --zone) bf_need_value "$1" $# "${2:-}"; ZONE=$2; shift 2 ;;
    --zone=*) ZONE=${1#*=}; shift ;;
    --project) bf_need_value "$1" $# "${2:-}"; PROJECT=$2; shift 2 ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --accelerator-type) bf_need_value "$1" $# "${2:-}"; ACCELERATOR=$2; shift 2 ;;
    --accelerator-type=*) ACCELERATOR=${1#*=}; shift ;;
    --version) bf_need_value "$1" $# "${2:-}"; VERSION=$2; shift 2 ;;
    --version=*) VERSION=${1#*=}; shift ;;
    --spot) SPOT=1; shift ;;
    --config) bf_need_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --workdir) bf_need_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --run-name) bf_need_value "$1" $# "${2:-}"; RUN_NAME=$2; shift 2 ;;
    --run-name=*) RUN_NAME=${1#*=}; shift ;;
    --detach) DETACH=1; shift ;;
    --lines) bf_need_value "$1" $# "${2:-}"; LINES=$2; shift 2 ;;
    --lines=*) LINES=${1#*=}; shift ;;
    --max-restarts) bf_need_value "$1" $# "${2:-}"; BF_MAX_RESTARTS=$2; shift 2 ;;
    --max-restarts=*) BF_MAX_RESTARTS=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA+=("$@"); break ;;
    --config.*) bf_check_override "$1"; EXTRA+=("$1"); shift ;;
    *) bf_die "unknown argument '$1'" ;;
  esac
done

[[ -n $COMMAND ]] || bf_die "no command given (create, setup, train, up, logs or delete)"
[[ -n $NAME ]] || bf_die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  bf_die "--name '$NAME': use lowercase letters, digits and '-', starting with a letter"
[[ -n $ZONE ]] || bf_die "--zone is required"
[[ $LINES =~ ^[0-9]+$ ]] || bf_die "--lines '$LINES' is not a number"
bf_check_restarts "$BF_MAX_RESTARTS"
if [[ $COMMAND == train || $COMMAND == up || $COMMAND == logs ]]; then
  [[ -n $WORKDIR || -n $RUN_NAME ]] || bf_die "--workdir is required for '$COMMAND'"
fi
if [[ $COMMAND == train || $COMMAND == up ]]; then
  [[ -n $CONFIG ]] || bf_die "--config is required for '$COMMAND'"
  [[ -n $WORKDIR ]] || bf_die "--workdir is required for '$COMMAND'"
  [[ -f $REPO/${CONFIG%%:*} ]] || bf_die "--config '$CONFIG': no such file '${CONFIG%%:*}' in $REPO"
  if [[ $WORKDIR != gs://* ]]; then
    printf '%s: warning: --workdir %s is not a gs:// path; on a pod slice each worker would write its own copy\n' \
      "${0##*/}" "$WORKDIR" >&2
  fi
fi
[[ -n $VERSION ]] || VERSION=$(default_version "$ACCELERATOR")
if [[ -z $RUN_NAME ]]; then
  RUN_NAME=${WORKDIR%/}
  RUN_NAME=${RUN_NAME##*/}
fi
if [[ $COMMAND == train || $COMMAND == up || $COMMAND == logs ]]; then
  [[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] ||
    bf_die "--run-name '$RUN_NAME': use letters, digits, '_', '.' and '-'"
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")
ARCHIVE="/tmp/broadface_jax-$NAME.tar.gz"
# Expanded on the workers, not here.
# shellcheck disable=SC2088
REMOTE_LOGS="~/broadface_logs/$RUN_NAME"

do_create() {
  local -a cmd=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}"
    "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  ((SPOT == 0)) || cmd+=(--spot)
  bf_run "${cmd[@]}"
}

do_setup() {
  bf_note "copy the committed tree (git archive HEAD; uncommitted changes are not copied)"
  bf_run git -C "$REPO" archive --format=tar.gz --prefix=broadface_jax/ -o "$ARCHIVE" HEAD
  bf_run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:~/" "${WHERE[@]}" --worker=all
  local install
  install="set -e; rm -rf ~/broadface_jax; tar -xzf ~/${ARCHIVE##*/} -C ~; cd ~/broadface_jax"
  install+='; python3 -m pip install -U pip; python3 -m pip install -U "jax[tpu]"'
  install+="; python3 -m pip install -e ."
  bf_run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$install"
}

# train_command : the remote shell line every worker runs.
train_command() {
  local main
  main=$(printf ' %q' python3 -m broadface_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    --distributed=jax "${EXTRA[@]}")
  # The worker number comes from the TPU metadata server (hostname as a fallback);
  # expanded on the worker, hence the single quotes.
  # shellcheck disable=SC2016
  local worker='W=$(curl -sf -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
  # Exit 75 (preempted after a checkpoint): run it again, which resumes.
  # One BROADFACE_RUN_ID (set in _common.sh) for every worker and every re-run.
  local loop="export BROADFACE_RUN_ID=$(printf '%q' "$BROADFACE_RUN_ID"); n=0; while :; do${main}; rc=\$?; [ \$rc -eq $BF_EXIT_PREEMPTED ] && [ \$n -lt $BF_MAX_RESTARTS ] || break; n=\$((n + 1)); echo \"preempted (exit \$rc): resuming, restart \$n of $BF_MAX_RESTARTS\"; done; exit \$rc"
  local line="set -o pipefail; cd ~/broadface_jax && $worker && mkdir -p $REMOTE_LOGS && "
  if ((DETACH)); then
    line+="nohup bash -c $(printf '%q' "$loop") > $REMOTE_LOGS/worker-\$W.log 2>&1 < /dev/null & echo \"worker \$W started\""
  else
    line+="( $loop ) 2>&1 | tee $REMOTE_LOGS/worker-\$W.log | sed -u \"s/^/[worker \$W] /\""
  fi
  printf '%s\n' "$line"
}

do_train() {
  bf_run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$(train_command)"
}

do_logs() {
  bf_run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
    "--command=tail -n $LINES $REMOTE_LOGS/worker-*.log"
}

do_delete() {
  bf_run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null; then
  bf_die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
fi
case $COMMAND in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  up) do_create; do_setup; do_train ;;
  logs) do_logs ;;
  delete) do_delete ;;
esac
