"""SIGTERM for the whole life of a trainer process: exit at once while starting, else stop at a safe point.

Kubernetes sends SIGTERM before it kills a pod, and in a container the trainer
is PID 1, to which the kernel gives no default action for SIGTERM: without a
handler the pod ignores it until SIGKILL. `install` (main's first line) handles
it from then on, by phase:

- starting (reading data, building the model, loading weights): nothing is
  worth saving; the process exits 143 at once.
- training: `callbacks.StopOnSigterm` stops `fit` at the next step boundary; the
  backup holds the last completed epoch.
- finishing (final evaluation, exports, summary): what is being written is
  finished (an export is published whole or not at all), then the run stops
  with `Preempted`; a rerun completes it.

Only the standard library here: main imports it before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import threading
from typing import Any, Iterator

EXIT_CODE = 143  # 128 + SIGTERM: what Kubernetes and shells expect of a terminated process


class Preempted(Exception):
    """SIGTERM arrived; the run stopped where a rerun of the same command resumes it."""


class Phase(enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    FINISHING = "finishing"


_received = threading.Event()
_phase = Phase.STARTING
_installed = False


def install() -> None:
    """Handles SIGTERM for the rest of the process (see module docstring). Main thread only.

    The decision runs on a watcher thread woken by the signal's wakeup byte: the
    main thread may sit inside one long TensorFlow call (loading a SavedModel,
    reading a dataset) for minutes before Python would run a handler there.
    """
    global _installed
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    # A Python handler must be set for the wakeup byte to be written; the watcher acts on it.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="sigterm", daemon=True).start()
    _installed = True


def _watch(read_fd: int) -> None:
    # Messages go straight to stderr: before absl's handler is set up (TensorFlow still
    # loading) a logging call would be dropped, and os._exit flushes nothing.
    while True:
        if signal.SIGTERM in os.read(read_fd, 64):
            _received.set()
            if _phase is Phase.STARTING:
                os.write(sys.stderr.fileno(), b"error: SIGTERM received while starting: nothing "
                         b"to save yet; exiting. Rerun the same command to start again.\n")
                os._exit(EXIT_CODE)
            os.write(sys.stderr.fileno(), f"SIGTERM received while {_phase.value}: stopping at "
                     "the next safe point.\n".encode())


def _note(signum: int, frame: Any) -> None:
    _received.set()


@contextlib.contextmanager
def phase(new_phase: Phase) -> Iterator[None]:
    """Runs the block in `new_phase`; the previous phase is restored after it.

    Without `install` (the trainer used as a library), SIGTERM is caught for the
    block's duration only, when it runs on the main thread, and the previous
    handler is put back after it.
    """
    global _phase
    previous_phase, previous_handler = _phase, None
    if not _installed and threading.current_thread() is threading.main_thread():
        if new_phase is Phase.TRAINING:
            _received.clear()  # a run's first phase: an earlier SIGTERM stopped an earlier run
        previous_handler = signal.signal(signal.SIGTERM, _note)
    _phase = new_phase
    try:
        yield
    finally:
        _phase = previous_phase
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def received() -> bool:
    """Whether SIGTERM arrived (while training or finishing)."""
    return _received.is_set()


def stop_if_received(what: str) -> None:
    """Raises Preempted once SIGTERM arrived, saying what was completed.

    Raises:
      Preempted: SIGTERM arrived.
    """
    if _received.is_set():
        raise Preempted(f"SIGTERM received: stopped after {what}. Rerun the same command "
                        "to complete the run.")
