#!/usr/bin/env bash
# Submit launch/slurm_multinode.sbatch with your own #SBATCH values: writes a
# copy of it with a new #SBATCH header to --script-dir and runs
# `sbatch COPY --config=... --workdir=... [--config.x=y ...]`. Run with --help
# for usage; --dry-run prints the generated script and the sbatch command
# instead of writing or submitting anything.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE="$HERE/slurm_multinode.sbatch"
# shellcheck source=launch/_common.sh
source "$HERE/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_submit.sh --config PATH --workdir DIR [options] [--config.FIELD=VALUE ...] [-- MAIN_FLAGS...]

Options:
  --config PATH          config file, e.g. configs/default.py or configs/demo.py:smoke (required)
  --workdir DIR          run directory on storage every node sees (required)
  --nodes N              nodes (default 2)
  --gpus-per-node G      GPUs per node (default 8)
  --per-gpu              one process per GPU (--ntasks-per-node=G) instead of one
                         process per node driving all its GPUs (default)
  --cpus-per-node C      CPU cores per node, split evenly between its tasks (default 32)
  --time T               time limit (default 24:00:00)
  --job-name NAME        job name (default broadface)
  --partition P          SLURM partition (default: the cluster's)
  --account A            SLURM account (default: yours)
  --qos Q                quality of service
  --port PORT            coordinator port (default SLURM_JOB_ID % 4096 + 61440)
  --python PY            Python interpreter on the nodes (default python3)
  --script-dir DIR       where the generated sbatch script goes (default slurm_jobs)
  --dry-run              print the generated script and the sbatch command
  -h, --help             show this help

Arguments --config.FIELD=VALUE override config fields; everything after '--' goes to
broadface_jax.main unchanged. The job's output goes to slurm-JOBNAME-JOBID.out in the
directory you submit from; its environment is yours (sbatch --export=ALL).

Example:
  launch/slurm_submit.sh --nodes 4 --gpus-per-node 8 --partition gpu \
      --config configs/default.py --workdir /shared/runs/r100 --config.lr=0.005
EOF
}

CONFIG=""
WORKDIR=""
NODES=2
GPUS_PER_NODE=8
PER_GPU=0
CPUS_PER_NODE=32
TIME="24:00:00"
JOB_NAME="broadface"
PARTITION=""
ACCOUNT=""
QOS=""
PORT=""
PYTHON_BIN=""
SCRIPT_DIR="slurm_jobs"
declare -a EXTRA=()

while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --config) bf_need_value "$1" $# "${2:-}"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --workdir) bf_need_value "$1" $# "${2:-}"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --nodes) bf_need_value "$1" $# "${2:-}"; NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    --gpus-per-node) bf_need_value "$1" $# "${2:-}"; GPUS_PER_NODE=$2; shift 2 ;;
    --gpus-per-node=*) GPUS_PER_NODE=${1#*=}; shift ;;
    --per-gpu) PER_GPU=1; shift ;;
    --cpus-per-node) bf_need_value "$1" $# "${2:-}"; CPUS_PER_NODE=$2; shift 2 ;;
    --cpus-per-node=*) CPUS_PER_NODE=${1#*=}; shift ;;
    --time) bf_need_value "$1" $# "${2:-}"; TIME=$2; shift 2 ;;
    --time=*) TIME=${1#*=}; shift ;;
    --job-name) bf_need_value "$1" $# "${2:-}"; JOB_NAME=$2; shift 2 ;;
    --job-name=*) JOB_NAME=${1#*=}; shift ;;
    --partition) bf_need_value "$1" $# "${2:-}"; PARTITION=$2; shift 2 ;;
    --partition=*) PARTITION=${1#*=}; shift ;;
    --account) bf_need_value "$1" $# "${2:-}"; ACCOUNT=$2; shift 2 ;;
    --account=*) ACCOUNT=${1#*=}; shift ;;
    --qos) bf_need_value "$1" $# "${2:-}"; QOS=$2; shift 2 ;;
    --qos=*) QOS=${1#*=}; shift ;;
    --port) bf_need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --python) bf_need_value "$1" $# "${2:-}"; PYTHON_BIN=$2; shift 2 ;;
    --python=*) PYTHON_BIN=${1#*=}; shift ;;
    --script-dir) bf_need_value "$1" $# "${2:-}"; SCRIPT_DIR=$2; shift 2 ;;
    --script-dir=*) SCRIPT_DIR=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA+=("$@"); break ;;
    --config.*) bf_check_override "$1"; EXTRA+=("$1"); shift ;;
    *) bf_die "unknown argument '$1'" ;;
  esac
done

[[ -n $CONFIG ]] || bf_die "--config is required"
[[ -n $WORKDIR ]] || bf_die "--workdir is required"
[[ -f ${CONFIG%%:*} ]] || bf_die "--config '$CONFIG': no such file '${CONFIG%%:*}'"
for pair in "nodes:$NODES" "gpus-per-node:$GPUS_PER_NODE" "cpus-per-node:$CPUS_PER_NODE"; do
  value=${pair#*:}
  [[ $value =~ ^[1-9][0-9]*$ ]] || bf_die "--${pair%%:*} '$value': expected a positive integer"
done
[[ -z $PORT || ($PORT =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65535) ]] ||
  bf_die "--port '$PORT' is not a TCP port"
[[ $TIME =~ ^[0-9:-]+$ ]] || bf_die "--time '$TIME': expected a SLURM time such as 24:00:00 or 2-00:00:00"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || bf_die "--job-name '$JOB_NAME': use letters, digits, '_', '.' and '-'"
grep -q '^# ---- end of #SBATCH header' "$TEMPLATE" || bf_die "$TEMPLATE lacks its '# ---- end of #SBATCH header' line"

TASKS_PER_NODE=1
((PER_GPU == 0)) || TASKS_PER_NODE=$GPUS_PER_NODE
CPUS_PER_TASK=$((CPUS_PER_NODE / TASKS_PER_NODE))
((CPUS_PER_TASK >= 1)) || bf_die "--cpus-per-node $CPUS_PER_NODE is fewer than the $TASKS_PER_NODE tasks per node"

# generate_script : the template with a new #SBATCH header, on stdout.
generate_script() {
  printf '#!/usr/bin/env bash\n'
  printf '# Generated by launch/slurm_submit.sh from launch/slurm_multinode.sbatch.\n'
  printf '#SBATCH --job-name=%s\n' "$JOB_NAME"
  printf '#SBATCH --nodes=%s\n' "$NODES"
  printf '#SBATCH --ntasks-per-node=%s\n' "$TASKS_PER_NODE"
  printf '#SBATCH --gpus-per-node=%s\n' "$GPUS_PER_NODE"
  printf '#SBATCH --cpus-per-task=%s\n' "$CPUS_PER_TASK"
  printf '#SBATCH --time=%s\n' "$TIME"
  printf '#SBATCH --output=slurm-%%x-%%j.out\n'
  printf '#SBATCH --requeue\n'
  printf '#SBATCH --signal=TERM@300\n'
  [[ -z $PARTITION ]] || printf '#SBATCH --partition=%s\n' "$PARTITION"
  [[ -z $ACCOUNT ]] || printf '#SBATCH --account=%s\n' "$ACCOUNT"
  [[ -z $QOS ]] || printf '#SBATCH --qos=%s\n' "$QOS"
  [[ -z $PORT ]] || printf 'export BF_COORDINATOR_PORT=%s\n' "$PORT"
  [[ -z $PYTHON_BIN ]] || printf 'export BF_PYTHON=%s\n' "$(bf_quote "$PYTHON_BIN")"
  sed -n '/^# ---- end of #SBATCH header/,$p' "$TEMPLATE"
}

SCRIPT="$SCRIPT_DIR/$JOB_NAME.sbatch"
SBATCH=(sbatch "$SCRIPT" "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [[ $DRY_RUN == 1 ]]; then
  bf_note "---- $SCRIPT (not written: --dry-run)"
  generate_script | sed 's/^/# | /'
  bf_note "---- end of $SCRIPT"
  bf_run "${SBATCH[@]}"
  exit 0
fi
command -v sbatch >/dev/null || bf_die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$SCRIPT_DIR"
generate_script >"$SCRIPT"
chmod +x "$SCRIPT"
printf 'wrote %s\n' "$SCRIPT"
"${SBATCH[@]}"
