"""A clean stop on SIGTERM / SIGINT: finish the step, checkpoint, exit.

Cloud TPUs and spot GPU machines are preempted with SIGTERM; a person stops a
run with Ctrl-C (SIGINT). Either way the run should end with a checkpoint of
the step it was on, not lose the work since the last scheduled one.

:class:`StopOnSignal` turns the first signal into a *request*: the handler
only records it (nothing is raised inside JAX, orbax or tf.data, so no
``KeyboardInterrupt`` is swallowed by a callback and no save is abandoned).
The loop asks ``should_stop(step)`` once after every step; when it says yes
the loop writes a checkpoint of that step, waits for it, and raises
:class:`Preempted`, which ``broadface_jax.main`` turns into a one-line
message and exit code :data:`EXIT_PREEMPTED`. A second signal aborts at once
(exit 128 + signal number); the newest finished checkpoint is still there.

Several processes must stop at the same step, or the ones that go on wait
forever in a collective. JAX's coordination service does this: its
preemption notifier catches SIGTERM in whichever process gets it, and
``multihost_utils.reached_preemption_sync_point(step)``, called at every
step by every process, becomes true in all of them at the same step (the
largest step any process had reached, plus one). So with more than one
process SIGTERM is left to JAX, and SIGINT is forwarded to it as a SIGTERM
to this process; once the processes agree, both signals abort.

Before the first step there is nothing to checkpoint: a command installs
the handlers first thing (:func:`install_early`, before flags are parsed and
before TensorFlow / JAX are imported), so a signal during start-up is only
recorded, never a ``KeyboardInterrupt`` or a default SIGTERM death inside an
import, a restore or a compilation (which ended in segmentation faults).
Start-up asks :func:`check_start` at points where nothing is half-written
(after the imports, after the distributed set-up, just before the first
step), which raises :class:`StoppedBeforeStart`: exit :data:`EXIT_PREEMPTED`
for SIGTERM, :data:`EXIT_INTERRUPTED` for SIGINT.

Handlers can only be installed from the main thread; elsewhere (a notebook
thread, a test runner's worker thread) the run keeps the default signal
behaviour and says so in the log.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

from absl import logging

#: Exit code of a run stopped cleanly by a signal: re-run the same command to resume
#: (sysexits' EX_TEMPFAIL, "temporary failure; retry"). Launchers requeue on it.
EXIT_PREEMPTED = 75

#: Exit code of a command stopped by SIGINT (Ctrl-C) before its first step (128 + SIGINT,
#: what a shell reports for Ctrl-C): a person asked it to stop, so launchers do not re-run it.
EXIT_INTERRUPTED = 130

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing ``step``."""

    def __init__(self, step: int, signal_name: str, checkpoint: str):
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        super().__init__(
            f"stopped by {signal_name} after step {step}: checkpoint written to "
            f"{checkpoint}; run the same command again to resume")


class StoppedBeforeStart(Exception):
    """A signal came during start-up: the command stops before its first step.

    ``exit_code`` is :data:`EXIT_INTERRUPTED` for SIGINT, else :data:`EXIT_PREEMPTED`.
    """

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        self.exit_code = (EXIT_INTERRUPTED if signal_name.startswith("SIGINT")
                          else EXIT_PREEMPTED)
        super().__init__(
            f"stopped by {signal_name} during start-up, before the first step: this start "
            "trained and checkpointed nothing; run the same command again to go on")


def _write_stderr(text: str) -> None:
    # Async-signal-safe enough for a Python handler: no logging locks.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopOnSignal:
    """Context manager that turns SIGTERM / SIGINT into ``should_stop(step) == True``."""

    def __init__(self, process_count: Optional[int] = None, starting: bool = False):
        self._starting = starting  # before the first step: no checkpoint to write
        if process_count is None:
            import jax

            process_count = jax.process_count()
        self._multi = process_count > 1
        self._received: Optional[str] = None
        self._agreed = False
        self._previous: dict[int, Any] = {}
        self._active = False

    @property
    def signal_name(self) -> str:
        return self._received or "a signal"

    # ---------------------------------------------------------------- handlers

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        name = signal.Signals(signum).name
        if self._received is not None or self._agreed:
            _write_stderr(f"\nbroadface_jax: second signal ({name}): aborting now; the "
                          "newest finished checkpoint is kept\n")
            os._exit(128 + signum)
        self._received = name
        if self._starting:
            _write_stderr(f"\nbroadface_jax: {name} received during start-up: stopping before "
                          "the first step (send it again to abort at once)\n")
        else:
            _write_stderr(f"\nbroadface_jax: {name} received: stopping after this step with a "
                          "checkpoint (send it again to abort at once)\n")
        if self._multi and signum != signal.SIGTERM:
            # JAX's preemption notifier listens for SIGTERM; it tells every process.
            os.kill(os.getpid(), signal.SIGTERM)

    def _install(self, signums: tuple[int, ...]) -> None:
        for signum in signums:
            if signum not in self._previous:
                self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def install(self) -> None:
        """Takes over SIGTERM / SIGINT (from the main thread only; see the module doc)."""
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: SIGTERM / SIGINT keep their "
                            "default behaviour (no checkpoint on stop)")
            return
        self._active = True
        # With several processes SIGTERM stays with JAX's preemption notifier.
        self._install((signal.SIGINT,) if self._multi else _SIGNALS)

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, previous in self._previous.items():
            # A handler installed outside Python (JAX's, for SIGTERM) reads as None.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._active = False

    def __enter__(self) -> "StopOnSignal":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # ---------------------------------------------------------------- the loop's side

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint ``step`` and stop; call once per step in every process."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                stop = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError as e:  # preemption service disabled
                if not getattr(self, "_warned", False):
                    logging.warning("no coordinated stop on SIGTERM: %s", e)
                    self._warned = True
                stop = False
            if stop and not self._agreed:
                self._agreed = True
                if self._received is None:
                    self._received = "SIGTERM (preemption notice)"
                if self._active:
                    self._install(_SIGNALS)  # from now on any signal aborts
            return stop
        return self._received is not None


# ------------------------------------------------------------------ start-up

_early: Optional[StopOnSignal] = None


def install_early() -> StopOnSignal:
    """Takes SIGTERM / SIGINT over for a command's start-up (call it first thing).

    A signal is then only recorded, and :func:`check_start` stops the command
    at the next point where nothing is half-written. The training loop's own
    :class:`StopOnSignal` takes over when it starts and puts this one back
    when it ends. A no-op outside the main thread.
    """
    global _early
    if _early is None:
        _early = StopOnSignal(process_count=1, starting=True)
        _early.install()
    return _early


def check_start(stopper: Optional[StopOnSignal] = None) -> None:
    """Raises :class:`StoppedBeforeStart` if a signal came during start-up.

    Looks at the start-up handler of :func:`install_early` and at ``stopper``
    (the loop's, installed but before its first step).
    """
    for each in (stopper, _early):
        if each is not None and each._received is not None:
            raise StoppedBeforeStart(each._received)
