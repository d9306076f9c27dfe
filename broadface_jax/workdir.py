"""What a run keeps in its workdir besides checkpoints: its lock, its config, its log.

* ``run.lock``: one writer per workdir. Process 0 holds an exclusive
  ``fcntl.flock`` on it for the whole run (the file says which host and pid);
  a second run on the same workdir stops at once with :class:`WorkdirBusyError`
  naming the holder. The OS releases the lock when the holder exits, however
  it exits (SIGKILL included), so there are no stale locks to clean up. Object
  stores (``gs://``) have no locks: the check is skipped there, with a warning.
* ``config.json``: the config the run's state was last started or resumed
  with. A resume compares the current config with it (:func:`compare_config`)
  before anything is read or written; config changes fall in four classes,
  by what they do to the saved state:

  1. *layout* changes (another model, width, embedding size, class count,
     image size for a model whose head depends on it, ...): the state the new
     config builds has other leaves, shapes or dtypes than the checkpoint.
     Derived, not listed: ``elastic.restore`` compares the abstract state with
     the checkpoint's metadata before reading it and refuses with one line
     naming the leaves (``checkpointing.LayoutMismatchError``); the checkpoint
     is never set aside for it. The queue's row count is the exception: a
     change of device count or (allowed) of ``queue.size_per_device`` re-lays
     the queue out;
  2. *optimizer-state* changes (``optimizer.*.momentum``, ``weight_decay``,
     ``grad_clip_norm``, and the lr fields): the saved state survives; a
     transform that gains or loses state (momentum switched on or off) has
     its leaves initialised or dropped, by name. Accepted and logged;
  3. *semantic* changes (:data:`SEMANTIC_FIELDS`: seed, data, loss, batch,
     queue, optimizer type, model): the shapes may stay the same but the
     state would mean something else. Refused unless
     ``config.allow_resume_changes`` names them;
  4. everything else (schedule, logging, evaluation, paths, mesh): logged.

  ``config.json`` is written only once the state has been restored or
  initialised (a refused or failed resume leaves it as it was); a resume
  with changes replaces it and appends the previous record to
  ``config.replaced.jsonl``.
* ``metrics.jsonl``: one record per logged step. On resume from step N the
  records after N (logged by the interrupted run after its last checkpoint,
  or by a run rolled back to N) are moved to ``metrics.replaced.jsonl``, so the
  file never holds two records of one step and nothing written is lost.
  :class:`JsonlWriter` writes it (a clu metric writer, beside TensorBoard's).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from typing import Any, Iterator, Mapping, Optional

from absl import logging

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
REPLACED_CONFIG_FILE = "config.replaced.jsonl"
METRICS_FILE = "metrics.jsonl"
REPLACED_METRICS_FILE = "metrics.replaced.jsonl"
#: Evaluation outputs of a run (ROC curves, ``results_<step>.json``), beside its checkpoints.
EVAL_SUBDIR = "eval"

#: Layout of the saved train state, recorded in ``config.json`` under
#: :data:`FORMAT_KEY`. A resume refuses a workdir of another format with one
#: clear message instead of a list of missing checkpoint leaves. History:
#: 1 (no key): up to 2026-12-01; 2: ``TrainState.loss_state`` (stateful
#: losses), the optimizer state of ``optax.inject_hyperparams`` (the applied
#: lr), margin fields a loss does not use recorded as None.
STATE_FORMAT = 2
FORMAT_KEY = "broadface_jax.state_format"

#: Dotted prefixes whose change alters what the saved state means, whether or
#: not it alters its layout (class 3 of the module doc; layout changes are
#: derived from the state itself). Optimizer hyperparameters are not here: the
#: saved optimizer state survives them (class 2).
SEMANTIC_FIELDS = ("seed", "model", "num_classes", "queue.size_per_device", "queue.compensate",
                   "per_device_batch_size", "image_size", "dataset.name", "dataset.tfds_name",
                   "dataset.split", "dataset.synthetic", "dataset.random_flip", "loss",
                   "optimizer.encoder.name", "optimizer.classifier.name")


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class ResumeConfigError(ValueError):
    """The config differs from the workdir's in fields that give the state its meaning."""


def _is_local(path: str) -> bool:
    return "://" not in path


# ------------------------------------------------------------------ lock


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Process 0 holds ``<workdir>/run.lock`` for the body.

    Raises:
      WorkdirBusyError: in every process, when another run holds the lock
        (the processes of a multi-host run learn it from process 0).
    """
    import jax

    error = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(_flock(workdir))
            except WorkdirBusyError as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            busy = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
            if busy and error is None:
                error = WorkdirBusyError(f"workdir {workdir} is in use by another run "
                                         f"(process 0 could not take {LOCK_FILE})")
        if error is not None:
            raise error
        yield


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    if not _is_local(workdir):
        logging.warning("workdir %s is not a local path: no lock against a second run "
                        "on it (make sure only one job writes there)", workdir)
        yield
        return
    import fcntl

    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise WorkdirBusyError(
                f"workdir {workdir} is in use by another run ({holder}); wait for it to "
                "finish or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {started}\n"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------ config record


def flatten(config: Any) -> dict[str, Any]:
    """Dotted field -> JSON value (tuples as lists)."""
    out: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if hasattr(value, "items"):
            for k, v in value.items():
                visit(f"{prefix}{k}.", v)
        elif isinstance(value, (tuple, list)):
            out[prefix[:-1]] = [v if isinstance(v, (bool, int, float, str)) or v is None
                                else str(v) for v in value]
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    visit("", config)
    return out


def _matches(field: str, prefixes: Any) -> bool:
    return any(field == p or field.startswith(p + ".") for p in prefixes)


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any],
                    allowed: str = "") -> tuple[list[str], list[str]]:
    """``(refused, accepted)`` differences, each ``'field: saved -> current'``.

    A difference is refused when the field is in :data:`SEMANTIC_FIELDS` and not in
    ``allowed`` (comma-separated dotted names or prefixes; ``*`` allows all).
    """
    allow = [a.strip() for a in allowed.split(",") if a.strip()]
    refused, accepted = [], []
    for field in sorted(set(saved) | set(current)):
        if field == "allow_resume_changes":
            continue
        old, new = saved.get(field, "<absent>"), current.get(field, "<absent>")
        if old == new:
            continue
        line = f"{field}: {old!r} -> {new!r}"
        if _matches(field, SEMANTIC_FIELDS) and "*" not in allow and not _matches(field, allow):
            refused.append(line)
        else:
            accepted.append(line)
    return refused, accepted


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _current_record(config: Any) -> dict[str, Any]:
    return {**flatten(config), FORMAT_KEY: STATE_FORMAT}


def read_config(workdir: str) -> Optional[dict[str, Any]]:
    """The workdir's ``config.json`` (None if absent).

    Raises:
      ResumeConfigError: it exists but cannot be read.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    exists = os.path.exists(path) if _is_local(workdir) else _epath(path).exists()
    if not exists:
        return None
    try:
        raw = (open(path, encoding="utf-8").read() if _is_local(workdir)
               else _epath(path).read_text())
        return json.loads(raw)
    except (OSError, ValueError) as e:
        raise ResumeConfigError(f"{path} cannot be read ({e}); it records the run's "
                                "config: restore it or remove it to record the current one")


def compare_config(workdir: str, config: Any) -> Optional[dict[str, Any]]:
    """On resume: checks the config against ``config.json``; writes nothing.

    Every process compares (so all of them stop on a refused change).

    Returns:
      the saved config record (None when the workdir has no ``config.json``:
      then only the checkpoint's layout is checked).

    Raises:
      ResumeConfigError: listing every refused difference and how to allow it.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    saved = read_config(workdir)
    if saved is None:
        logging.warning("%s not found: resuming without the semantic config check (the "
                        "checkpoint's layout is still checked); the config is recorded once "
                        "the state is restored", path)
        return None
    saved = dict(saved)
    current = _current_record(config)
    saved_format = saved.pop(FORMAT_KEY, 1)
    current.pop(FORMAT_KEY)
    if saved_format != STATE_FORMAT:
        raise ResumeConfigError(
            f"workdir {workdir} holds checkpoints in state format {saved_format} ({path}), "
            f"written by an older broadface_jax; this version writes format {STATE_FORMAT} "
            "(the optimizer and loss state changed) and cannot resume them. Resume with the "
            "version that started the run, or start a new --workdir from this one's weights: "
            f"--config.init_from={workdir} (encoder, and the classifier with "
            "config.init_classifier=True); the checkpoints here are left as they are")
    refused, accepted = compare_configs(saved, current, str(config.allow_resume_changes))
    if refused:
        fields = ",".join(line.split(":")[0] for line in refused)
        raise ResumeConfigError(
            f"workdir {workdir} was started with another config ({path}); these fields "
            "change what the saved state means:\n  " + "\n  ".join(refused)
            + f"\nUse the run's values, another --workdir, or allow the change with "
              f"--config.allow_resume_changes={fields}")
    for line in accepted:
        logging.info("resume: config field changed since %s: %s", CONFIG_FILE, line)
    return saved


def record_config(workdir: str, config: Any) -> None:
    """Writes ``config.json`` (process 0, once the state is restored or initialised).

    A different record already there is appended to ``config.replaced.jsonl``
    first (with the time it was replaced), so no record is lost.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    current = _current_record(config)
    try:
        saved = read_config(workdir)
    except ResumeConfigError:
        saved = None
        if _is_local(workdir):  # unreadable: keep its bytes beside it
            os.replace(path, f"{path}.unreadable.{int(datetime.datetime.now().timestamp())}")
    if saved == current:
        return
    if saved is not None and _is_local(workdir):
        replaced = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(workdir, REPLACED_CONFIG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"replaced": replaced, "config": saved}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    if _is_local(workdir):
        _write_atomic(path, text)
    else:
        _epath(path).write_text(text)


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


# ------------------------------------------------------------------ metrics.jsonl


def truncate_metrics(workdir: str, step: int) -> int:
    """Moves the records of ``metrics.jsonl`` after ``step`` to ``metrics.replaced.jsonl``.

    Returns the number of records moved. A torn last line (a kill mid-write)
    is moved too. Local workdirs only (append-only object stores keep all).
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not _is_local(workdir) or not os.path.exists(path):
        return 0
    keep, moved = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                record_step = None
            (keep if record_step is not None and record_step <= step
             and line.endswith("\n") else moved).append(line)
    if not moved:
        return 0
    with open(os.path.join(workdir, REPLACED_METRICS_FILE), "a", encoding="utf-8") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
        f.flush()
        os.fsync(f.fileno())
    _write_atomic(path, "".join(keep))
    logging.info("resume from step %d: moved %d metrics.jsonl records of later steps to %s",
                 step, len(moved), REPLACED_METRICS_FILE)
    return len(moved)


class JsonlWriter:
    """A ``clu.metric_writers.MetricWriter`` that appends scalars to ``metrics.jsonl``.

    Each ``write_scalars(step, scalars)`` is one line ``{"step": step, **scalars}``,
    written and flushed at once (synchronously), so the records of a step are on
    disk before its checkpoint starts and :func:`truncate_metrics` can drop the
    later ones on resume. Composed with clu's TensorBoard and logging writers
    through ``metric_writers.MultiWriter``; other kinds of summary (images,
    texts, hparams, ...) are not kept here.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def has_record(workdir: str, step: int, prefix: str = "") -> bool:
    """Whether ``metrics.jsonl`` has a record of ``step`` with a field starting with ``prefix``."""
    path = os.path.join(workdir, METRICS_FILE)
    if not _is_local(workdir) or not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step") == step and any(k.startswith(prefix) for k in record
                                                   if k != "step"):
                return True
    return False
