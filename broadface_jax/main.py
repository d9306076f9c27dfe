"""Command-line entry point: parse flags, set up JAX, train and evaluate.

    python -m broadface_jax.main --config configs/demo.py --workdir runs/demo
    python -m broadface_jax.main --config configs/lfw.py:smoke --workdir /tmp/lfw
    python -m broadface_jax.main --config configs/default.py \\
        --config.per_device_batch_size=64 --workdir runs/paper

``--config`` names a Python file whose ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict``; ``file.py:variant`` passes ``variant`` as
``arg``. Any field may be overridden with ``--config.<field>=<value>``; an
unknown field is an error. Running again with the same ``--workdir`` resumes
from the latest checkpoint there.

Multi-host runs (several processes, e.g. a TPU pod or several GPU nodes) get
their coordinator settings through ``broadface_jax.distributed``, which reads
its own flags / environment and is a no-op for a single process.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Sequence

from absl import app, flags, logging

from broadface_jax import cli, distributed  # distributed defines the multi-host flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard "
    "events and evaluation outputs; an existing run there is resumed.")
_CONFIG = cli.define_config_flag("Path to a config file (configs/X.py or configs/X.py:variant).")
flags.mark_flags_as_required(["config", "workdir"])


def _check_start() -> None:
    """Ends the command (exit 75 / 130, one line) if SIGTERM / SIGINT came during start-up."""
    from broadface_jax import preemption

    try:
        preemption.check_start()
    except preemption.StoppedBeforeStart as e:
        cli.fail(str(e), e.exit_code)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.load_config()
    _check_start()
    from broadface_jax import input_pipeline

    input_pipeline.hide_gpus_from_tensorflow()  # tf.data runs beside JAX
    _check_start()
    distributed.maybe_initialize()

    import jax

    _check_start()

    logging.info("JAX process %d / %d, %d local / %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    logging.info("config:\n%s", config)
    run(config, _WORKDIR.value)


def check_paths(config, workdir: str) -> None:
    """Ends the command (exit 2, one line) when a path it needs is wrong, before anything is written.

    ``--workdir`` (or a folder above it) is a file; ``config.init_from`` or the
    data set (``config.dataset.data_dir``, an unprepared TFDS data set) is
    missing.
    """
    from broadface_jax import input_pipeline, train

    path = os.path.abspath(workdir) if "://" not in workdir else None
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        what = "is a file" if path == os.path.abspath(workdir) else f"is inside {path}, a file"
        cli.fail(f"--workdir={workdir} {what}, not a folder: give a folder for the run "
                 "(checkpoints, metrics)", cli.EXIT_USAGE)
    try:
        train._check_paths(config)  # config.init_from
        input_pipeline.resolve_num_classes(config)  # the data set's folder and metadata
    except (FileNotFoundError, NotADirectoryError) as e:
        cli.fail(" ".join(str(e).split()), cli.EXIT_USAGE)


def _storage_failure(e: BaseException, workdir: str) -> str | None:
    """One line for a storage error (disk full, quota, permissions) anywhere in ``e``'s chain."""
    from broadface_jax import checkpointing

    cause = checkpointing.describe_io_error(e)
    if cause is None:
        return None
    where, link, seen = None, e, set()
    while link is not None and where is None and id(link) not in seen:
        seen.add(id(link))
        where = getattr(link, "filename", None)
        link = link.__cause__ or link.__context__
    if where is None and type(e).__name__ == "AsyncError":  # clu's asynchronous writer
        where = f"{os.path.join(workdir, 'tensorboard')} (TensorBoard events)"
    return (f"{where or workdir}: {cause}: stopped (the last finished checkpoint is kept; "
            "free space and run the same command again to resume)")


#: Set by the command (``__main__``): after a storage failure's line, stderr is closed.
_SILENCE_AFTER_STORAGE_FAILURE = False


def _fail_last(message: str) -> None:
    """:func:`cli.fail` (exit 1) for a storage failure, as the process's last line.

    A failed save leaves writes in flight in orbax's and tensorstore's threads;
    as they finish during the interpreter's exit they report the same failure
    again ("Event loop is closed" tracebacks printed straight to stderr, asyncio's
    "exception was never retrieved"), burying the line that matters. Once it is
    written, stderr goes to /dev/null for the rest of the exit.
    """
    py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
    logging.flush()
    print(f"broadface_jax: {message}", file=sys.stderr, flush=True)
    if not _SILENCE_AFTER_STORAGE_FAILURE:  # run() called from Python: leave stderr alone
        sys.exit(1)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass
    sys.exit(1)


def run(config, workdir: str, model=None) -> None:
    """``train.train_and_evaluate`` with the ways a run ends turned into exit codes.

    A stop on SIGTERM / SIGINT (after its checkpoint) exits with
    ``preemption.EXIT_PREEMPTED``; one during start-up, before the first step,
    with ``EXIT_PREEMPTED`` (SIGTERM) or ``EXIT_INTERRUPTED`` (130, SIGINT); a
    wrong path (workdir a file, missing data or init_from) exits with 2 before
    anything is written; a busy workdir, a refused config change, a failed save
    or write (disk full, from the checkpointer or the TensorBoard writer), a
    damaged data file or a NaN loss exit with 1 and one message, without a
    traceback. Anything else propagates.
    """
    from broadface_jax import checkpointing, config_check, input_pipeline, preemption, train
    from broadface_jax import workdir as workdir_lib

    check_paths(config, workdir)
    try:
        train.train_and_evaluate(config, workdir, model=model)
    except preemption.Preempted as e:
        cli.fail(str(e), preemption.EXIT_PREEMPTED)
    except preemption.StoppedBeforeStart as e:
        cli.fail(str(e), e.exit_code)
    except config_check.ConfigError as e:  # the checks that need the devices (mesh, memory)
        cli.fail(str(e), cli.EXIT_USAGE)
    except (workdir_lib.WorkdirBusyError, workdir_lib.ResumeConfigError,
            train.NonFiniteError) as e:
        cli.fail(str(e), 1)
    except checkpointing.CheckpointWriteError as e:
        _fail_last(str(e))
    except Exception as e:
        data = e if isinstance(e, input_pipeline.DataFileError) else e.__cause__
        if isinstance(data, input_pipeline.DataFileError):
            cli.fail(" ".join(str(e).split()), 1)
        message = _storage_failure(e, workdir)
        if message is None:
            raise
        _fail_last(message)


def cli_main() -> None:
    """The ``broadface-train`` console script: ``python -m broadface_jax.main``."""
    global _SILENCE_AFTER_STORAGE_FAILURE
    from broadface_jax import preemption

    # First thing: a SIGTERM / SIGINT during start-up (flag parsing, imports, restore,
    # compilation) is recorded and stops the command cleanly before its first step.
    preemption.install_early()
    _SILENCE_AFTER_STORAGE_FAILURE = True
    cli.run(main)  # one-line flag errors, exit 2


if __name__ == "__main__":
    cli_main()
