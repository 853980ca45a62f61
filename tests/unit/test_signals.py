"""A child forked while the run's signal handlers are installed (a DataLoader or FashionScenes
pool worker) gets the default handlers back, and a signal sent right after the fork is not lost."""
import os
import signal
import time

from tasks.engine.signals import Terminated, hold_signals, stop_on_sigterm


def _fork_and_signal(sig: int) -> int:
    """Fork a child that sleeps, send it ``sig`` at once; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: exit status 7 if it outlived the signal
        try:
            time.sleep(2)
        finally:
            os._exit(7)
    os.kill(pid, sig)
    return os.waitpid(pid, 0)[1]


def test_sigterm_right_after_fork_kills_the_child():
    # CPython forgets a signal that reaches the child before its after-fork set-up ends: without
    # the fork hooks nearly every one of these children slept on (Pool.terminate then waits for ever)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_on_sigterm():
        statuses = [_fork_and_signal(signal.SIGTERM) for _ in range(12)]
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # the parent's mask is back
    assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGTERM for s in statuses), statuses


def test_held_signals_act_as_defaults_in_a_child():
    with hold_signals(reraise=False):
        term = _fork_and_signal(signal.SIGTERM)
        pid = os.fork()
        if pid == 0:  # 0 if the child's SIGINT handler is Python's own
            os._exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 1)
        intr = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(term) and os.WTERMSIG(term) == signal.SIGTERM
    assert os.WIFEXITED(intr) and os.WEXITSTATUS(intr) == 0


def test_sigterm_still_stops_the_parent():
    try:
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    except Terminated:
        return
    raise AssertionError("SIGTERM did not raise Terminated in the process that installed the handler")
