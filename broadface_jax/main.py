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

from typing import Sequence

from absl import app, flags, logging

from broadface_jax import cli, distributed  # distributed defines the multi-host flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard "
    "events and evaluation outputs; an existing run there is resumed.")
_CONFIG = cli.define_config_flag("Path to a config file (configs/X.py or configs/X.py:variant).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.load_config()
    from broadface_jax import input_pipeline

    input_pipeline.hide_gpus_from_tensorflow()  # tf.data runs beside JAX
    distributed.maybe_initialize()

    import jax

    logging.info("JAX process %d / %d, %d local / %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    logging.info("config:\n%s", config)
    run(config, _WORKDIR.value)


def run(config, workdir: str, model=None) -> None:
    """``train.train_and_evaluate`` with the ways a run ends turned into exit codes.

    A stop on SIGTERM / SIGINT (after its checkpoint) exits with
    ``preemption.EXIT_PREEMPTED``; a busy workdir, a refused config change, a
    failed save (disk full), a storage error or a NaN loss exit with 1 and one
    message, without a traceback. Anything else propagates.
    """
    from broadface_jax import (checkpointing, config_check, preemption, train,
                               workdir as workdir_lib)

    try:
        train.train_and_evaluate(config, workdir, model=model)
    except preemption.Preempted as e:
        cli.fail(str(e), preemption.EXIT_PREEMPTED)
    except config_check.ConfigError as e:  # the checks that need the devices (mesh, memory)
        cli.fail(str(e), cli.EXIT_USAGE)
    except (workdir_lib.WorkdirBusyError, workdir_lib.ResumeConfigError,
            checkpointing.CheckpointWriteError, train.NonFiniteError) as e:
        cli.fail(str(e), 1)
    except OSError as e:
        cause = checkpointing.describe_io_error(e)
        if cause is None:
            raise
        cli.fail(f"{getattr(e, 'filename', None) or workdir}: {cause} (the last finished "
              "checkpoint is kept)", 1)


if __name__ == "__main__":
    app.run(main)
