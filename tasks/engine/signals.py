"""Process signals around a run: SIGTERM stops it like Ctrl-C, and a block that finishes the
run folder's files (a checkpoint, its log line, the lock) holds SIGINT / SIGTERM until it ends."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["Terminated", "stop_on_sigterm", "hold_signals"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``timeout``) raised in the main thread while
    ``stop_on_sigterm`` is active: a KeyboardInterrupt, so the run stops the same clean way as
    on Ctrl-C (checkpoint being written finished, lock released); ``run_cli`` exits 143."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers live there only


def _default_action(signum: int) -> None:
    """Do what ``signum`` does without a Python handler (forked children inherit the handlers
    below and must not turn a pool's SIGTERM into an exception)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises ``Terminated`` (the default action would kill the process
    mid-write, leaving the lock and possibly a half-finished epoch). No-op off the main thread."""
    if not _main_thread():
        yield
        return
    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:  # a forked child (a pool or DataLoader worker): the default action, as before
            _default_action(signum)
            return
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def hold_signals(note: str = "stopping: finishing the files being written (the run folder stays consistent)",
                 reraise: bool = True):
    """SIGINT and SIGTERM wait until the block ends: a second Ctrl-C while a checkpoint, its log
    line or the lock are being finished must not cut them short. A signal held while no exception
    is on its way out is raised at the end (KeyboardInterrupt / ``Terminated``; not with
    ``reraise=False``: the process is already stopping); while one is (the first Ctrl-C), it only
    says that the run is stopping. No-op off the main thread."""
    if not _main_thread():
        yield
        return
    received: list[int] = []
    owner = os.getpid()

    def hold(signum, frame):
        if os.getpid() != owner:  # a child forked inside the block
            _default_action(signum)
            return
        if not received:
            print(note, file=sys.stderr, flush=True)
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received and reraise and sys.exc_info()[0] is None:
            raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()
