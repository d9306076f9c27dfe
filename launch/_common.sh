# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run on its own.
#
# A script sets DRY_RUN=1 for --dry-run; every command then goes through
# bf_run, which prints it as one copy-pasteable shell line instead of running
# it, so the printed output of --dry-run is itself a runnable script.

DRY_RUN=${DRY_RUN:-0}

# bf_quote ARG... : print ARGs as one shell line, quoting only where needed.
bf_quote() {
  local arg sq="'" escaped
  local -a words=()
  for arg in "$@"; do
    if [[ -n $arg && $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$arg")
    else
      escaped=${arg//$sq/$sq\\$sq$sq}
      words+=("$sq$escaped$sq")
    fi
  done
  printf '%s\n' "${words[*]}"
}

# bf_run CMD ARG... : run the command, or print it under --dry-run.
bf_run() {
  if [[ $DRY_RUN == 1 ]]; then
    bf_quote "$@"
  else
    "$@"
  fi
}

# bf_note TEXT : a comment line (goes to stdout as '# TEXT' so dry-run output stays runnable).
bf_note() {
  printf '# %s\n' "$*"
}

# bf_die MESSAGE : print 'SCRIPT: error: MESSAGE' and a usage hint to stderr, exit 2.
bf_die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$0" >&2
  exit 2
}

# bf_need_value OPTION "$#" NEXT : die unless OPTION was followed by a value
# (NEXT, which may not look like another option: '--name --dry-run' is a mistake).
bf_need_value() {
  if (($2 < 2)); then
    bf_die "$1 needs a value"
  fi
  if [[ ${3:-} == --* ]]; then
    bf_die "$1 needs a value, got the option '$3'"
  fi
}

# bf_check_override ARG : die unless ARG is a --config.FIELD=VALUE override.
bf_check_override() {
  if [[ ! $1 =~ ^--config\.[A-Za-z_][A-Za-z0-9_.]*=.*$ ]]; then
    bf_die "unknown argument '$1' (config overrides look like --config.lr=0.1)"
  fi
}

# Exit status of a run that stopped cleanly after a checkpoint on SIGTERM
# (broadface_jax.preemption.EXIT_PREEMPTED): the same command resumes it.
BF_EXIT_PREEMPTED=75
# How many times a launcher re-runs a preempted run (--max-restarts / BF_MAX_RESTARTS).
BF_MAX_RESTARTS=${BF_MAX_RESTARTS:-10}
# Set by bf_trap_stop when this script itself gets SIGTERM / SIGINT: no more restarts.
BF_STOP=0
# One id for this launch, the same in every re-run of a preempted run: a
# --config.restore_step=N rollback is done by the first start only, the re-runs resume
# their own progress (broadface_jax.train.rollback_target keys rollbacks by it).
export BROADFACE_RUN_ID=${BROADFACE_RUN_ID:-launch-$(date -u +%Y%m%dT%H%M%S)-$$}

# bf_trap_stop : a SIGTERM / SIGINT to this script ends the restart loop. The
# trainer, in the same process group, gets the signal too, checkpoints and exits 75.
bf_trap_stop() {
  trap 'BF_STOP=1' TERM INT
}

# bf_check_restarts VALUE : die unless VALUE is a number of restarts.
bf_check_restarts() {
  [[ $1 =~ ^[0-9]+$ ]] || bf_die "--max-restarts '$1': expected a number (0: never re-run)"
}

# bf_retry CMD ARG... : run the command; while it exits 75 (preempted after its
# checkpoint) run it again, which resumes the run, at most BF_MAX_RESTARTS times.
# Any other status (0, a failure, 130 after Ctrl-C) ends the loop and is returned.
bf_retry() {
  local tries=0 status
  if [[ $DRY_RUN == 1 ]]; then
    bf_note "re-run while it exits $BF_EXIT_PREEMPTED (preempted; it resumes), at most $BF_MAX_RESTARTS times"
    bf_quote "$@"
    return 0
  fi
  while :; do
    status=0
    "$@" || status=$?
    if ((status != BF_EXIT_PREEMPTED || BF_STOP || tries >= BF_MAX_RESTARTS)); then
      return "$status"
    fi
    tries=$((tries + 1))
    printf '%s: preempted (exit %d): resuming, restart %d of %d\n' "${0##*/}" "$status" \
      "$tries" "$BF_MAX_RESTARTS" >&2
  done
}
