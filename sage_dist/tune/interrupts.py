"""Interrupts of a study driver: SIGTERM handled like Ctrl+C, so a stopped study can close its MLflow runs as
KILLED (never FINISHED) and tell how to resume, instead of dying with its runs shown RUNNING."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class StudyInterrupted(KeyboardInterrupt):
    """A signal stopped the study (SIGTERM; a second Ctrl+C arrives as a plain ``KeyboardInterrupt``)."""


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs in the main thread, SIGTERM acts as Ctrl+C: when a Python SIGINT handler other than
    Python's own is installed (Ray Tune's, inside ``Tuner.fit()``: a graceful stop that saves the experiment
    state and returns early) it is called, else :class:`StudyInterrupted` is raised. The previous SIGTERM
    handler is restored afterwards; outside the main thread (where signals cannot be handled) nothing changes.
    Enter it after ``ray.init``, which installs a SIGTERM handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise StudyInterrupted(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:  # None: the previous handler was not installed from Python (nothing to give back but the default)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def watch_tune_interrupt():
    """Around ``Tuner.fit()``: yields a dict whose ``"interrupted"`` is True afterwards when Ray Tune caught a
    stop signal (Ctrl+C, SIGUSR1, or SIGTERM through :func:`stop_on_sigterm`) and returned early.

    Tune installs its SIGINT handler when ``fit`` starts and, on the first signal, sets the handler it found
    back; so a sentinel handler installed here and found in place again after ``fit`` means Tune caught a
    signal (unless ``TUNE_DISABLE_SIGINT_HANDLER=1`` kept Tune from installing one: then a Ctrl+C raises
    ``KeyboardInterrupt`` out of ``fit`` instead). The sentinel acts as Python's own handler."""
    state = {"interrupted": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def sentinel(signum, frame):
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, sentinel)
    try:
        yield state
    finally:
        tune_handler_disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "1"
        state["interrupted"] = signal.getsignal(signal.SIGINT) is sentinel and not tune_handler_disabled
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
