"""The training loop: ``train_and_evaluate(config, workdir)``.

One call builds the mesh and a state born sharded, then picks its start:

1. a checkpoint in ``workdir`` -> resume: the whole state (encoder, batch
   statistics, classifier, optimizer states, BroadFace queue, step, RNG), and
   the input pipeline restarted at that step, so the run continues exactly
   as if it had never stopped;
2. else ``config.init_from`` -> warm start: encoder parameters and batch
   statistics (and the classifier if ``config.init_classifier``) from another
   run's checkpoint, fresh optimizer and empty queue (the paper starts
   BroadFace from an ArcFace-trained model);
3. else from scratch (``config.seed``).

The loop shards each host batch onto the mesh and runs the jitted step.
Metrics stay on the device between log steps; at a log step they are fetched,
checked for NaN/inf (a non-finite value stops the run with the step and the
metric named, before any checkpoint of the bad state is written), averaged
over the interval and written through one clu metric writer
(:func:`create_writer`): ``workdir/metrics.jsonl`` (one JSON object per
logged step), TensorBoard (``workdir/tensorboard``) and the absl log on
process 0, the log only on the others. ``clu.periodic_actions`` report
progress (steps/s, ETA, time in evaluation) and trace
``config.profile_steps`` steps for TensorBoard's profiler; parameter counts
and the step's XLA FLOPs are logged once (:func:`log_model_size`).
Checkpoints every ``checkpoint_every_steps`` and at the end; evaluation every
``eval_every_steps`` and at the end, through the run's ``evaluation.Evaluators``
(each target's evaluator built once per run).
``config.num_classes = 0`` takes the class count from the data set's metadata.

metrics.jsonl holds one record per logged step: a resume from step N first
moves the records after N (logged by the interrupted run after its last
checkpoint) to ``metrics.replaced.jsonl``. Parameters and batch statistics
are checked for NaN/inf before every checkpoint as well, so a finite loss
over a diverged update cannot slip a bad state onto disk.

What keeps a run safe from its operators (``broadface_jax.workdir``,
``preemption``, ``config_check``): the whole config is checked before
anything is written, including what needs the devices (mesh, queue chunks,
``restore_step``, the memory per device: :func:`check_before_writing`);
process 0 holds ``<workdir>/run.lock`` for the whole run, so a second run on
the same workdir stops at once; a resume compares the config with the
workdir's ``config.json`` (semantic changes refused unless allowed) and the
checkpoint's layout with the state the config builds (layout changes
refused naming the leaves, optimizer changes carried over; see
``broadface_jax.workdir`` for the classes), and ``config.json`` is written
only once the state is restored; SIGTERM / SIGINT finish the step,
checkpoint it and raise :class:`preemption.Preempted`; a failed save (disk
full) stops the run with one line; a checkpoint that cannot be read or fails
its checksums is set aside once an older one is restored, and a workdir
whose checkpoints are all unreadable stops the run unless
``config.start_over``; ``config.restore_step`` rolls back to an older kept
checkpoint on each command that asks (:func:`rollback_target`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from broadface_jax import (checkpointing, config_check, distributed, elastic, preemption,
                           sharding, train_step, workdir as workdir_lib)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
EVAL_SUBDIR = workdir_lib.EVAL_SUBDIR

# Metrics reported as their value at the log step rather than the interval mean.
_LAST_VALUE_METRICS = ("lr", "lr_encoder", "lr_classifier", "queue_fill", "queue_used")
#: config.profile_steps: the trace starts this many steps after the run (re)starts.
PROFILE_SKIP_STEPS = 5


class NonFiniteError(FloatingPointError):
    """A loss or another training metric became NaN or infinite."""


# ------------------------------------------------------------------ durations


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to log, checkpoint and evaluate: every duration in one place.

    Each ``*_every`` is a number of steps; 0 or less means "only at the end".
    The last step always logs, checkpoints and evaluates.
    """

    total_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int

    @classmethod
    def from_config(cls, config: Any) -> "Schedule":
        """The schedule of ``config`` (its fields' rules are ``config_check``'s)."""
        fields = ("total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps")
        config_check.check(config, only=fields)
        return cls(*(int(config[field]) for field in fields))

    @staticmethod
    def _due(step: int, every: int, total: int) -> bool:
        return step == total or (every > 0 and step % every == 0)

    def is_log(self, step: int) -> bool:
        return self._due(step, self.log_every, self.total_steps)

    def is_checkpoint(self, step: int) -> bool:
        return self._due(step, self.checkpoint_every, self.total_steps)

    def is_eval(self, step: int) -> bool:
        return self._due(step, self.eval_every, self.total_steps)


# ------------------------------------------------------------------ checks


def _check_paths(config: Any) -> None:
    """Fails early, naming the config field, when ``config.init_from`` is missing.

    (A missing data directory is named by ``input_pipeline.resolve_num_classes``,
    which reads the data set's metadata before anything is written.)
    """
    init_from = str(config.init_from)
    from broadface_jax import interop  # noqa: PLC0415 (weights files: .pth / .pt / .onnx)

    if init_from and interop.is_model_file(init_from):
        try:
            interop.resolve_files(init_from)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.init_from={init_from!r}: {e}") from e
    elif init_from and "://" not in init_from and not os.path.exists(init_from):
        raise FileNotFoundError(
            f"config.init_from={init_from!r} does not exist (a workdir or "
            "checkpoint folder of another run to warm-start from)")


def _make_mesh(config: Any) -> jax.sharding.Mesh:
    """``sharding.make_mesh(config.mesh)``; a mesh the devices cannot form is a ConfigError."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError as e:
        raise config_check.ConfigError(_on_devices(e)) from None


def _on_devices(error: Exception) -> str:
    """The message, with the device count when it does not say already."""
    text = str(error)
    return text if "device" in text else f"{text} (on {jax.device_count()} devices)"


def check_before_writing(config: Any, workdir: str, model=None, *,
                         parts: Optional[train_step.Parts] = None) -> None:
    """What needs the devices, checked before the workdir, config.json or run.lock exist.

    The mesh shape (``mesh.data`` x ``mesh.model`` against the devices), the
    sizes the step relies on (``train_step.validate_config``: queue chunks,
    batch), ``restore_step`` against the kept checkpoints, and the memory the
    step needs (:func:`check_memory`).

    Raises:
      config_check.ConfigError: one line per field at fault.
    """
    mesh = _make_mesh(config)
    try:
        train_step.validate_config(config, mesh)
    except ValueError as e:
        raise config_check.ConfigError(_on_devices(e)) from None
    rollback_target(config, workdir)
    check_memory(config, mesh, model, parts=parts)


#: Fraction of a device's memory the train state, its gradients and the loss's
#: logits may take; the rest is left to activations and XLA's buffers.
MEMORY_FRACTION = 0.9


def device_memory_bytes() -> int:
    """Memory of one local device: its allocator's limit, or host RAM / local devices (CPU)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory statistics)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, jax.local_device_count())


def memory_estimate(config: Any, mesh: jax.sharding.Mesh, model=None, *,
                    parts: Optional[train_step.Parts] = None) -> dict[str, int]:
    """Bytes per device the step needs at least, by the config field that sets them.

    From shapes only (``jax.eval_shape``, nothing allocated): each leaf of the
    train state counted with its shard's shape on the mesh, the parameters once
    more for their gradients, and the queue loss's logits (a chunk of queue
    rows against this device's classes, forward and backward). Activations of
    the encoder come on top.
    """
    abstract, shardings = train_step.abstract_train_state(config, mesh, model, parts=parts)
    out: dict[str, int] = {}

    def add(field: str, leaf: Any, sh: Any, times: int = 1) -> None:
        shape = sh.shard_shape(leaf.shape) if hasattr(sh, "shard_shape") else leaf.shape
        item = 4 if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jnp.dtype(
            leaf.dtype).itemsize
        out[field] = out.get(field, 0) + times * math.prod(shape) * item

    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_sh = jax.tree.leaves(shardings)
    for (path, leaf), sh in zip(flat, flat_sh):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name.startswith("queue."):
            field = "queue.size_per_device"
        elif "classifier" in name:
            field = "num_classes"
        elif name.startswith(("params", "opt_state", "batch_stats")):
            field = "model"
        else:
            field = "other"
        add(field, leaf, sh, 2 if name.startswith("params.") else 1)
    rows = int(config.queue.size_per_device)
    chunk = train_step.queue_chunk(config, mesh) or rows
    if rows:
        # n class shards: each device scores n x chunk/n rows against C/n classes
        n = sharding.classifier_shards(mesh, config.classifier_sharding)
        local_classes = train_step.padded_num_classes(config, mesh) // n
        out["queue.chunk_size"] = 3 * n * min(chunk, rows) * local_classes * 4
    return out


def check_memory(config: Any, mesh: jax.sharding.Mesh, model=None, *,
                 parts: Optional[train_step.Parts] = None) -> None:
    """Refuses a config whose state and step cannot fit one device's memory, naming the fields."""
    need = memory_estimate(config, mesh, model, parts=parts)
    total, limit = sum(need.values()), device_memory_bytes()
    if total <= MEMORY_FRACTION * limit:
        return
    values = {"queue.size_per_device": config.queue.size_per_device,
              "num_classes": config.num_classes, "model": config.model.name,
              "queue.chunk_size": config.queue.chunk_size}
    parts = ", ".join(f"config.{k}={values.get(k, '')!r}: {_size(v)}"
                      for k, v in sorted(need.items(), key=lambda kv: -kv[1])
                      if v > 0.01 * total and k != "other")
    raise config_check.ConfigError(
        f"the train state and step need at least {_size(total)} per device "
        f"({parts}), more than {MEMORY_FRACTION:.0%} of the {_size(limit)} one "
        f"device has: lower the largest of these fields or use more devices")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024
    return f"{n:.1f} GiB"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _rollback_hint(workdir: str, manager=None) -> str:
    """Which checkpoints are kept, and how to resume from an earlier one."""
    if manager is not None:
        try:
            checkpointing.wait(manager)  # a save in flight is kept too
        except checkpointing.CheckpointWriteError as e:
            logging.warning("%s", e)
    steps = checkpointing.all_steps(workdir)
    if not steps:
        return "No checkpoint is kept yet."
    hint = (f"Kept checkpoints: {steps} (the last good one is kept; it may already be "
            "past the point where the loss started to grow).")
    if len(steps) > 1:
        hint += (f" To resume from an earlier one, run again with "
                 f"--config.restore_step={steps[-2]} (later checkpoints are moved to "
                 f"{checkpointing.SET_ASIDE_SUBDIR}/, not deleted).")
    return hint


def _missed_eval(workdir: str, step: int) -> bool:
    """Whether metrics.jsonl lacks the evaluation of ``step`` (process 0 decides for all)."""
    missed = not workdir_lib.has_record(workdir, step, prefix="eval/")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
    return missed


def _first_non_finite(steps: list[int], host_metrics: list[Mapping[str, Any]]
                      ) -> Optional[tuple[int, str, float]]:
    """(step, metric name, value) of the first NaN/inf metric, or None."""
    for step, metrics in zip(steps, host_metrics):
        for name in sorted(metrics):
            value = float(np.asarray(metrics[name]))
            if not math.isfinite(value):
                return step, name, value
    return None


# ------------------------------------------------------------------ state


def warm_start(state: train_step.TrainState, shardings: train_step.TrainState,
               init_from: str, init_classifier: bool, config: Any = None
               ) -> train_step.TrainState:
    """Loads encoder (+ batch stats, + classifier) from another run's checkpoint.

    The optimizer state, queue, step and RNG stay freshly initialised.
    ``init_from`` may also name PyTorch / ONNX weights files (``.pth``, ``.pt``,
    ``.onnx``, or a comma list / glob of arcface_torch rank files): they are
    imported for ``config.model``; both go through
    :func:`broadface_jax.restore.restore_encoder`.

    Raises:
      checkpointing.CheckpointError: a shape differs (other backbone, other
        number of classes); the message names every leaf at fault.
      FileNotFoundError: ``init_from`` has no checkpoint.
    """
    from broadface_jax import restore  # noqa: PLC0415

    params = {"encoder": state.params["encoder"]}
    params_sh = {"encoder": shardings.params["encoder"]}
    if init_classifier:
        params["classifier"] = state.params["classifier"]
        params_sh["classifier"] = shardings.params["classifier"]
    part = checkpointing.abstract_like({"params": params, "batch_stats": state.batch_stats},
                                       {"params": params_sh, "batch_stats": shardings.batch_stats})
    try:
        loaded = restore.restore_encoder(init_from, config, target=part,
                                         with_classifier=init_classifier)
    except checkpointing.CheckpointError as e:
        hint = ("" if not init_classifier else
                "\n(set config.init_classifier=False to load only the encoder when "
                "the classes differ)")
        raise checkpointing.CheckpointError(
            f"warm start from config.init_from={init_from!r} failed: {e}{hint}") from e
    new_params = dict(state.params)
    new_params["encoder"] = loaded.params
    if init_classifier:
        new_params["classifier"] = {**state.params["classifier"], **loaded.classifier}
    return state.replace(params=new_params, batch_stats=loaded.batch_stats)


ROLLBACK_FILE = "rollback.json"
#: Environment variables that name one invocation of a run across requeues
#: (checked in order): a rollback request is keyed by it.
INVOCATION_VARIABLES = ("BROADFACE_RUN_ID", "SLURM_JOB_ID")


def invocation_id() -> Optional[str]:
    """What names this command across requeues, e.g. ``SLURM_JOB_ID=123`` (None: nothing)."""
    for name in INVOCATION_VARIABLES:
        value = os.environ.get(name, "")
        if value:
            task = os.environ.get("SLURM_ARRAY_TASK_ID", "") if name == "SLURM_JOB_ID" else ""
            return f"{name}={value}" + (f"_{task}" if task else "")
    return None


def _rollback_requests(workdir: str) -> list[dict]:
    path = os.path.join(workdir, ROLLBACK_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return []
    if "requests" in record:
        return list(record["requests"])
    return [record]  # the one-entry format of earlier versions


def rollback_target(config: Any, workdir: str) -> int:
    """The step ``config.restore_step`` asks this command to roll back to (0: none).

    A rollback is a request made by a command, not a flag remembered by the
    workdir: every command that sets ``restore_step=N`` rolls the run back to
    checkpoint N (the newer ones are set aside), including the same command run
    again (e.g. after the rolled-back run diverged once more). The one exception
    is the same *invocation* started again by its scheduler: when the command
    runs under an id that names it across requeues (``$BROADFACE_RUN_ID``, or
    SLURM's ``$SLURM_JOB_ID``; :func:`invocation_id`) and ``rollback.json``
    records that this id already rolled back to N, the requeued job resumes
    from its own newest checkpoint instead of throwing its progress away.
    A retry loop of your own should export ``BROADFACE_RUN_ID`` once, outside
    the loop.

    Raises:
      config_check.ConfigError: checkpoint N is not kept (checked before
        anything is written).
    """
    want = int(config.restore_step)
    if not want:
        return 0
    invocation = invocation_id()
    requests = _rollback_requests(workdir)
    if (invocation is not None and requests and requests[-1].get("restore_step") == want
            and requests[-1].get("invocation") == invocation):
        logging.info("config.restore_step=%d: this invocation (%s) already rolled back to "
                     "step %d (%s); resuming from its newest checkpoint", want, invocation,
                     want, os.path.join(workdir, ROLLBACK_FILE))
        return 0
    steps = checkpointing.all_steps(workdir)
    if want not in steps:
        raise config_check.ConfigError(
            f"config.restore_step={want}: no checkpoint of that step in "
            f"{checkpointing.checkpoint_dir(workdir)}; kept steps: {steps or 'none'} "
            "(0 = resume from the latest)")
    return want


def checkpoints_to_try(config: Any, workdir: str) -> list[int]:
    """Checkpoint steps to resume from, best first.

    Normally every kept step, newest first; with a rollback request
    (:func:`rollback_target`) only that step. Nothing is moved here: the newer
    checkpoints of a rollback are set aside once its step has been restored.
    """
    want = rollback_target(config, workdir)
    return [want] if want else checkpointing.all_steps(workdir)[::-1]


def _finish_rollback(workdir: str, want: int) -> None:
    """Sets aside the checkpoints newer than ``want`` and records the request (process 0)."""
    newer = [s for s in checkpointing.all_steps(workdir) if s > want]
    if jax.process_index() == 0:
        for step in newer:
            logging.warning("rollback to step %d: checkpoint %d set aside to %s", want, step,
                            checkpointing.set_aside(workdir, step, "rolled-back"))
        requests = _rollback_requests(workdir) + [{
            "restore_step": want, "invocation": invocation_id(), "set_aside": newer,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        workdir_lib._write_atomic(os.path.join(workdir, ROLLBACK_FILE),
                                  json.dumps({"requests": requests}, indent=1) + "\n")
    distributed.sync("broadface_jax:rollback")


class NoReadableCheckpointError(workdir_lib.ResumeConfigError):
    """Checkpoints exist and none can be read; the run does not start over on its own."""


def initial_state(config: Any, mesh: jax.sharding.Mesh, workdir: str, model=None,
                  saved_config: Optional[Mapping[str, Any]] = None, *,
                  parts: Optional[train_step.Parts] = None
                  ) -> tuple[train_step.TrainState, train_step.TrainState, str]:
    """The state to start from: resumed, warm-started, or fresh.

    A resume tries the kept checkpoints newest first (:func:`checkpoints_to_try`).
    Each is first compared with the state this config builds, from its
    metadata (``elastic.restore``): a config that builds another layout stops
    the run (``workdir.ResumeConfigError`` naming the leaves and the changed
    fields); nothing is moved. One whose files cannot be read or fail their
    checksums (a save cut short, a flipped bit, a missing metadata file) is
    skipped for the next older one, and set aside
    (``checkpoints_set_aside/<step>.unreadable``) once an older one has been
    restored. When none is readable the run stops
    (:class:`NoReadableCheckpointError`) and moves nothing, unless
    ``config.start_over`` is True: then they are set aside and the run starts
    over (from ``init_from`` or the seed).

    Args:
      saved_config: the workdir's config.json record (its
        ``queue.size_per_device`` lays the saved queue out; its fields name
        what changed when the layout differs).

    Returns:
      ``(state, state_shardings, origin)`` with ``origin`` a short description
      for the log.
    """
    rng = jax.random.PRNGKey(int(config.seed))
    parts = train_step.resolve_parts(config, mesh, model, parts)  # built once for every use below
    want = rollback_target(config, workdir)
    steps = [want] if want else checkpointing.all_steps(workdir)[::-1]
    if steps:
        abstract, shardings = train_step.abstract_train_state(config, mesh, parts=parts)
        target = checkpointing.abstract_like(abstract, shardings)
        saved_per_device = (saved_config or {}).get("queue.size_per_device")
        unreadable = []
        for step in steps:
            try:
                state, note = elastic.restore(
                    workdir, target, step, saved_queue_per_device=saved_per_device,
                    fresh=lambda: train_step.create_train_state(config, mesh, rng,
                                                                parts=parts)[0])
            except checkpointing.LayoutMismatchError as e:
                raise workdir_lib.ResumeConfigError(
                    _layout_message(e, config, workdir, saved_config)) from None
            except checkpointing.UnreadableCheckpointError as e:
                logging.warning("skipping checkpoint %d: %s", step, e)
                unreadable.append(step)
                continue
            _set_aside(workdir, unreadable)
            if want:
                _finish_rollback(workdir, step)
            return state, shardings, (
                f"resumed from {checkpointing.checkpoint_dir(workdir)}/{step}"
                + (f" ({note})" if note else ""))
        if not bool(config.start_over):
            raise NoReadableCheckpointError(
                f"no checkpoint in {checkpointing.checkpoint_dir(workdir)} can be read "
                f"(steps {sorted(unreadable)}; the log says why for each) and nothing was "
                "moved: fix or move them, or start over with --config.start_over=True "
                f"(they are then moved to {checkpointing.SET_ASIDE_SUBDIR}/)")
        logging.warning("no readable checkpoint in %s: starting over (config.start_over=True)",
                        checkpointing.checkpoint_dir(workdir))
        _set_aside(workdir, unreadable)
    state, shardings = train_step.create_train_state(config, mesh, rng, parts=parts)
    if config.init_from:
        state = warm_start(state, shardings, str(config.init_from),
                           bool(config.init_classifier), config=config)
        what = "encoder + classifier" if config.init_classifier else "encoder"
        return state, shardings, f"warm start ({what}) from {config.init_from}"
    return state, shardings, f"from scratch (seed {config.seed})"


def _set_aside(workdir: str, steps: list[int]) -> None:
    """Moves unreadable checkpoints to checkpoints_set_aside/ (process 0), all processes wait."""
    for step in steps:
        if jax.process_index() == 0:
            logging.warning("checkpoint %d set aside to %s", step,
                            checkpointing.set_aside(workdir, step, "unreadable"))
        distributed.sync(f"broadface_jax:unreadable-{step}")


def _layout_message(error: Exception, config: Any, workdir: str,
                    saved_config: Optional[Mapping[str, Any]]) -> str:
    changed = ""
    if saved_config is not None:
        current = workdir_lib.flatten(config)
        _, lines = workdir_lib.compare_configs(
            {k: v for k, v in saved_config.items() if k != workdir_lib.FORMAT_KEY},
            current, "*")
        fields = [line for line in lines if not line.startswith(("total_steps", "restore_step"))]
        if fields:
            changed = f"; config fields changed since {workdir_lib.CONFIG_FILE}: " + "; ".join(
                fields[:8]) + (f"; and {len(fields) - 8} more" if len(fields) > 8 else "")
    return (f"cannot resume {workdir}: {error}{changed}. The config builds another train "
            "state than the run saved: use the run's values or another --workdir (to start "
            f"from this run's weights: --config.init_from={workdir}); no checkpoint was moved")


# ------------------------------------------------------------------ writers


def create_writer(workdir: str) -> Any:
    """clu metric writer of a run: metrics.jsonl + TensorBoard + log on process 0.

    Process 0: ``MultiWriter`` of :class:`workdir.JsonlWriter` (synchronous,
    one line per ``write_scalars``) and clu's default writer (absl logging and
    TensorBoard events in ``workdir/tensorboard``, asynchronous). Other
    processes only log (``just_logging``).
    """
    from clu import metric_writers  # noqa: PLC0415 (imports TensorFlow)

    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    return metric_writers.MultiWriter([
        workdir_lib.JsonlWriter(workdir),
        metric_writers.create_default_writer(os.path.join(workdir, TENSORBOARD_SUBDIR))])


def _flatten_config(config: Any) -> dict[str, Any]:
    """Dotted field -> scalar or string, for TensorBoard hparams."""
    return {k: v if isinstance(v, (bool, int, float, str)) else
            str(tuple(v) if isinstance(v, list) else v)
            for k, v in workdir_lib.flatten(config).items()}


def log_model_size(state: train_step.TrainState, step_fn: Any, batch: Any) -> dict[str, float]:
    """Logs the parameter table (clu.parameter_overview), counts and the step's XLA FLOPs, once.

    The FLOPs are XLA's cost analysis of the compiled step (per device: the
    program each device runs); compiling here fills jit's cache, so the first
    step does not compile again. Returns ``{'params/<part>': count,
    'step_flops_per_device': flops}`` (flops absent when XLA gives none).
    """
    from clu import parameter_overview  # noqa: PLC0415

    from broadface_jax import models  # noqa: PLC0415

    sizes = {f"params/{part}": float(models.count_params(tree))
             for part, tree in state.params.items()}
    sizes["batch_stats"] = float(models.count_params(state.batch_stats))
    logging.info("encoder parameters:\n%s", parameter_overview.get_parameter_overview(
        state.params["encoder"], include_stats=False))
    if hasattr(step_fn, "lower"):
        cost = step_fn.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
        if isinstance(cost, Mapping) and cost.get("flops", -1) >= 0:
            sizes["step_flops_per_device"] = float(cost["flops"])
    logging.info("model size: %s", ", ".join(f"{k} {v:,.0f}" for k, v in sizes.items()))
    return sizes


def _profiler(config: Any, workdir: str, start: int, total: int) -> Any:
    """``periodic_actions.Profile`` tracing ``config.profile_steps`` steps, or None.

    The window starts :data:`PROFILE_SKIP_STEPS` steps after the run (re)starts
    (compilation stays out of it) or earlier when the run is shorter; the
    trace goes to ``workdir/tensorboard`` (TensorBoard's profile tab).
    Process 0 only.
    """
    steps = int(config.profile_steps)
    if steps <= 0 or jax.process_index() != 0 or start >= total:
        return None
    from clu import periodic_actions  # noqa: PLC0415

    first = max(start + 1, min(start + PROFILE_SKIP_STEPS, total - steps))
    logging.info("profiling steps %d-%d to %s", first + 1, min(first + steps, total),
                 os.path.join(workdir, TENSORBOARD_SUBDIR))
    return periodic_actions.Profile(
        logdir=os.path.join(workdir, TENSORBOARD_SUBDIR), num_profile_steps=steps,
        profile_duration_ms=None, first_profile=first, every_steps=None, every_secs=None)


def _stop_profile() -> None:
    """Ends a trace the run's end cut short (a no-op when none is running)."""
    try:
        jax.profiler.stop_trace()
    except RuntimeError:  # no trace running
        pass


# ------------------------------------------------------------------ evaluation


def _flatten_eval(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"eval/{target}/{name}": float(value)
            for target, metrics in results.items() for name, value in metrics.items()
            if isinstance(value, (int, float, np.number))}


# ------------------------------------------------------------------ loop


def _next_batch(iterator: Iterator[dict], step: int, config: Any) -> dict:
    """The next host batch; input failures are re-raised naming the step and data."""
    where = (f"data set {config.dataset.name!r}"
             + (f" ({config.dataset.tfds_name})" if config.dataset.name == "tfds" else ""))
    try:
        return next(iterator)
    except StopIteration:
        raise RuntimeError(f"the input pipeline ({where}) ran out of batches before "
                           f"step {step}") from None
    except ValueError as e:
        raise ValueError(f"input pipeline ({where}) failed at step {step}: {e}") from e
    except Exception as e:  # tf.errors.* and the like
        raise RuntimeError(f"input pipeline ({where}) failed at step {step}: "
                           f"{type(e).__name__}: {e}") from e


def _summarise(host_metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """Interval means (last value for lr / queue fill)."""
    out = {}
    for name in host_metrics[-1]:
        values = np.array([float(np.asarray(m[name])) for m in host_metrics])
        out[name] = float(values[-1] if name in _LAST_VALUE_METRICS else values.mean())
    return out


class _Interval:
    """The steps since the last log: their device metrics and their wall time.

    Metrics stay on the device until :meth:`fetch` (a log or checkpoint step),
    which checks every step's metrics for NaN/inf. Evaluation time is kept out
    of ``images_per_sec`` (:meth:`restart_clock`).
    """

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.pending: list[tuple[int, Any]] = []
        self.host: list[Mapping[str, Any]] = []
        self.t0 = time.perf_counter()

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))

    def fetch(self, hint: Callable[[], str]) -> None:
        """Brings the interval's metrics to the host; NonFiniteError on NaN/inf."""
        self.host = jax.device_get([m for _, m in self.pending])
        bad = _first_non_finite([s for s, _ in self.pending], self.host)
        if bad is not None:
            raise NonFiniteError(
                f"step {bad[0]}: {bad[1]} = {bad[2]} is not finite; training stopped and "
                "no checkpoint of this state was written. Lower config.lr or set "
                "config.grad_clip_norm. " + hint())

    def summary(self) -> dict[str, float]:
        """Means of the fetched metrics plus throughput; starts the next interval."""
        elapsed, n = time.perf_counter() - self.t0, len(self.pending)
        out = _summarise(self.host)
        out["images_per_sec"] = self.global_batch * n / elapsed
        out["sec_per_step"] = elapsed / n
        self.pending, self.host = [], []
        self.restart_clock()
        return out

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()


def prefill_queue(config: Any, mesh: jax.sharding.Mesh, shardings: train_step.TrainState,
                  parts: train_step.Parts, state: train_step.TrainState
                  ) -> train_step.TrainState:
    """Enqueues stream batches 0 .. queue.prefill_steps - 1 without an update (step 0 only).

    Deterministic in (state, data), so a run restarted before its first
    checkpoint pre-fills the same queue again; later checkpoints hold the queue.
    """
    from broadface_jax import input_pipeline  # noqa: PLC0415

    n = train_step.data_offset(config)
    fn = train_step.make_prefill_step(config, mesh, shardings, parts=parts)
    it = input_pipeline.create_train_iterator(config, start_step=0)
    try:
        for i in range(n):
            state = fn(state, sharding.shard_batch(_next_batch(it, -(n - i), config), mesh))
    finally:
        if hasattr(it, "close"):
            it.close()
    logging.info("queue pre-filled with %d batches (%d valid rows)", n,
                 int(jax.device_get(jnp.sum(state.queue.valid))))
    return state


def train_and_evaluate(config: Any, workdir: str | os.PathLike, *, model=None
                       ) -> dict[str, float]:
    """Trains (or resumes) a run in ``workdir`` and evaluates it.

    Args:
      config: an ``ml_collections.ConfigDict`` with the fields of
        ``configs/default.py``.
      workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events and
        evaluation outputs go; a run already there is resumed.
      model: optional Flax module to use instead of
        ``models.build_encoder(config.model)`` (tests, notebooks).

    Returns:
      The final metrics: ``step``, the last interval's training metrics and
      ``eval/<target>/<metric>`` for every evaluation target.

    Raises:
      NonFiniteError: a metric became NaN/inf (the last good checkpoint stays).
      FileNotFoundError / ValueError / CheckpointError: bad paths, config
        values, data or checkpoints, each naming what is wrong.
    """
    workdir = os.fspath(workdir)
    from broadface_jax import input_pipeline  # noqa: PLC0415

    config_check.validate(config)  # every field, before anything is written
    schedule = Schedule.from_config(config)
    _check_paths(config)
    config = input_pipeline.resolve_num_classes(config)  # 0: from the data set's metadata
    mesh = _make_mesh(config)
    parts = train_step.build_parts(config, mesh, model)  # encoder, loss, optimizer: once
    check_before_writing(config, workdir, parts=parts)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lib.exclusive(workdir):
        return _train(config, workdir, schedule, mesh, parts)


def _train(config: Any, workdir: str, schedule: Schedule, mesh: jax.sharding.Mesh,
           parts: train_step.Parts) -> dict[str, float]:
    """``train_and_evaluate`` once the config is checked and the workdir is ours."""
    checkpointing.quiet_orbax_logging()  # before any save can fail in the background
    is_main = jax.process_index() == 0
    resuming = bool(checkpointing.all_steps(workdir))
    saved_config = workdir_lib.compare_config(workdir, config) if resuming else None
    state, shardings, origin = initial_state(config, mesh, workdir, saved_config=saved_config,
                                             parts=parts)
    if is_main:  # only now: a refused or failed resume leaves config.json as it was
        workdir_lib.record_config(workdir, config)
    start, total = int(jax.device_get(state.step)), schedule.total_steps
    if is_main:
        workdir_lib.truncate_metrics(workdir, start)
    logging.info("workdir %s: %s; step %d of %d, global batch %d on mesh %s", workdir,
                 origin, start, total, sharding.global_batch_size(config), dict(mesh.shape))
    with _Run(config, workdir, schedule, mesh, parts.model, state, parts=parts) as run:
        if start == 0:
            run.writer.write_hparams(_flatten_config(config))
        if start < total:
            run.train(shardings)
        elif run.targets and _missed_eval(workdir, start):
            logging.info("run already at step %d of %d: evaluating only", start, total)
            run.evaluate(start)
        else:
            logging.info("run already at step %d of %d and evaluated: nothing to do "
                         "(broadface_jax.evaluate evaluates it again)", start, total)
        run.save(int(jax.device_get(run.state.step)))
    return run.report()


class _Run:
    """One run's loop and what it holds open: writer, checkpoint manager, input, signals.

    Used as a context manager: leaving it (normally or by an error) closes the
    input, waits for the last save, closes the manager and the writer, and
    restores the signal handlers last (a signal while the last save finishes
    still waits for it).
    """

    def __init__(self, config: Any, workdir: str, schedule: Schedule,
                 mesh: jax.sharding.Mesh, model: Any, state: train_step.TrainState, *,
                 parts: Optional[train_step.Parts] = None):
        self.config, self.workdir, self.schedule = config, workdir, schedule
        self.parts = train_step.resolve_parts(config, mesh, model, parts)  # the run's, built once
        self.mesh, self.model, self.state = mesh, self.parts.model, state
        self.targets = tuple(config.eval.targets)
        from broadface_jax import evaluation  # noqa: PLC0415
        from broadface_jax.evaluation import embedding  # noqa: PLC0415

        self._bind_embed = (embedding.make_uint8_embed_fn(config, mesh, self.model)
                            if self.targets else None)
        self.evaluators = evaluation.Evaluators(config)  # this run's: built once, on first use
        self.final: dict[str, float] = {}
        self.eval_results: dict[str, Any] = {}
        self.iterator: Any = None
        self.profile: Any = None
        self.stopper = preemption.StopOnSignal()
        self.writer = create_writer(workdir)
        self.manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)

    def __enter__(self) -> "_Run":
        self.stopper.install()
        return self

    def train(self, shardings: train_step.TrainState) -> None:
        """Steps from the state's step to ``total_steps``: log, checkpoint, evaluate."""
        from clu import periodic_actions  # noqa: PLC0415

        from broadface_jax import input_pipeline  # noqa: PLC0415

        config, schedule, start = self.config, self.schedule, int(self.state.step)
        total = schedule.total_steps
        if start and self.targets and schedule.is_eval(start) and _missed_eval(self.workdir, start):
            self.evaluate(start)  # the run stopped between checkpoint and evaluation
        offset = train_step.data_offset(config)  # queue pre-fill batches come first
        if start == 0 and offset and self.state.queue.capacity:
            self.state = prefill_queue(config, self.mesh, shardings, self.parts, self.state)
        self.iterator = input_pipeline.create_train_iterator(config, start_step=start + offset)
        step_fn = train_step.make_train_step(config, self.mesh, shardings, parts=self.parts)
        progress = periodic_actions.ReportProgress(
            num_train_steps=total, every_steps=schedule.log_every if schedule.log_every > 0
            else None, every_secs=None)
        self.profile = _profiler(config, self.workdir, start, total)
        hooks = [h for h in (progress, self.profile) if h is not None]
        interval = _Interval(sharding.global_batch_size(config))
        preemption.check_start(self.stopper)  # a signal during start-up: stop before step 1
        for step in range(start + 1, total + 1):
            batch = sharding.shard_batch(_next_batch(self.iterator, step, config), self.mesh)
            if step == start + 1:
                log_model_size(self.state, step_fn, batch)
            self.state, metrics = step_fn(self.state, batch)
            checkpointing.check_saves(self.manager)  # a failed background save stops here
            stop = self.stopper.should_stop(step)  # SIGTERM / SIGINT: checkpoint this step
            interval.add(step, metrics)
            for hook in hooks:
                hook(step)
            log_now, ckpt_now = schedule.is_log(step) or stop, schedule.is_checkpoint(step) or stop
            if log_now or ckpt_now:
                interval.fetch(self.rollback_hint)
            if log_now:
                self.write(step, interval.summary())
            if ckpt_now:
                self.save(step)
            if stop:
                checkpointing.wait(self.manager)
                raise preemption.Preempted(step, self.stopper.signal_name,
                                           f"{checkpointing.checkpoint_dir(self.workdir)}/{step}")
            if schedule.is_eval(step) and self.targets:
                with progress.timed("eval"):
                    self.evaluate(step)
                interval.restart_clock()  # keep eval out of images/s

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        self.final.update(scalars)

    def evaluate(self, step: int) -> None:
        from broadface_jax import evaluation  # noqa: PLC0415
        from broadface_jax.evaluation import embedding  # noqa: PLC0415

        t0 = time.perf_counter()
        self.eval_results = self.evaluators.run(
            self.targets, self._bind_embed(self.state.params["encoder"], self.state.batch_stats),
            out_dir=os.path.join(self.workdir, EVAL_SUBDIR),
            progress=embedding.LogProgress)  # a log line per target, every 30 s while embedding
        self.write(step, _flatten_eval(self.eval_results))
        logging.info("step %d: evaluation (%.1f s)\n%s", step, time.perf_counter() - t0,
                     evaluation.format_table(self.eval_results))

    def save(self, step: int) -> None:
        """Checkpoints ``step`` (unless it is the latest already), after a NaN/inf check."""
        if not bool(_all_finite((self.state.params, self.state.batch_stats))):
            raise NonFiniteError(
                f"step {step}: parameters or batch statistics contain NaN/inf; "
                f"checkpoint not written. {self.rollback_hint()}")
        if self.manager.latest_step() != step:
            checkpointing.save(self.manager, step, self.state, force=True)

    def rollback_hint(self) -> str:
        return _rollback_hint(self.workdir, self.manager)

    def __exit__(self, kind, error, tb) -> None:
        failed = kind is not None
        if hasattr(self.iterator, "close"):
            self.iterator.close()  # release tf.data while the interpreter is alive
        if self.profile is not None:
            _stop_profile()
        # Every step runs even when an earlier one fails (a full disk fails them all); the
        # first failure is raised only when the run itself did not fail already, so
        # the error that stopped the run is the one reported (not a raw orbax / clu
        # re-raise of it from close()).
        errors: list[BaseException] = []
        for close in (lambda: checkpointing.wait(self.manager), self.manager.close,
                      self.writer.close):
            try:
                close()
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
        self.stopper.restore()
        if errors and not failed:
            raise errors[0]
        for e in errors:
            logging.warning("while stopping: %s", " ".join(str(e).split())[:300])

    def report(self) -> dict[str, float]:
        """The final metrics; prints the evaluation table (process 0)."""
        self.final["step"] = int(jax.device_get(self.state.step))
        if self.eval_results and jax.process_index() == 0:
            from broadface_jax import evaluation  # noqa: PLC0415

            print(f"\nVerification at step {self.final['step']} ({self.workdir}):\n"
                  f"{evaluation.format_table(self.eval_results)}", flush=True)
        return self.final
