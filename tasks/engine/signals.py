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


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises ``Terminated`` (the default action would kill the process
    mid-write, leaving the lock and possibly a half-finished epoch). No-op off the main thread."""
    if not _main_thread():
        yield
        return
    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    terminate.onetrunk = True  # a forked child gets the default back (the fork hooks below)
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

    def hold(signum, frame):
        if not received:
            print(note, file=sys.stderr, flush=True)
        received.append(signum)

    hold.onetrunk = True  # a forked child gets the default back (the fork hooks below)
    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received and reraise and sys.exc_info()[0] is None:
            raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()


# A fork (a pool or DataLoader worker) while a handler above is installed. CPython runs a Python
# handler only once the child has finished its after-fork set-up, which forgets every signal that
# came before: a SIGTERM sent right after the fork (``Pool.terminate`` once the jobs are done
# before the last worker is up) was lost, and the pool waited for ever on that worker (lost in 297
# of 300 forks killed at once; a test's scene generation hung this way). So the forking thread
# blocks SIGTERM around the fork, and the child unblocks it once its handlers are Python's
# defaults again: a SIGTERM sent meanwhile waits, then kills it as it would any process. (SIGINT
# is not blocked: a KeyboardInterrupt raised inside a fork hook is swallowed, and a Ctrl-C that a
# new worker misses leaves nothing running: its parent gets one too and stops it.)
_fork = threading.local()  # .mask: the forking thread's signal mask while it forks (None: not ours)


def _ours(signum: int) -> bool:
    return getattr(signal.getsignal(signum), "onetrunk", False)


def _before_fork() -> None:
    ours = _ours(signal.SIGINT) or _ours(signal.SIGTERM)
    _fork.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if ours else None


def _after_fork_in_parent() -> None:
    mask = getattr(_fork, "mask", None)
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_in_child() -> None:
    mask = getattr(_fork, "mask", None)  # the child's one thread is the one that forked
    if mask is None:
        return
    try:
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if _ours(signum):
                signal.signal(signum, default)
    finally:  # never a child that SIGTERM cannot reach
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


if hasattr(signal, "pthread_sigmask") and hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
