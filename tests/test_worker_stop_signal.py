"""The node's "stop after your current task" request reaches a worker whatever its tasks do
with signals.

The node sends it when a task waiting in a worker's pipe is killed (and when it drains).  It
was SIGUSR1, and a task that took SIGUSR1 for itself (``faulthandler.register``, a debugger,
an MPI runtime) swallowed it: the worker ran on, into the task that had been killed.  Now it
is a real-time signal (``node.worker.STOP_SIGNAL``), and after each task the worker puts its
handler back and unblocks it, whatever the task did.

Scenario as in tests/test_node_pipelining.py: a task tampers with signals on the node's only
worker, then a long task runs with a short one piped behind it, which is killed.  It must
never run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys

import pytest

from kotta_executor import TaskKilled, WorkerDied
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_node import _pids
from tests.test_node_pipelining import _pipe_behind_a_long_task


@contextlib.contextmanager
def _kill_the_task_behind(enclave, ex, head_fn, tmp_path):
    """Pipe ``head_fn`` and the tasks behind it to the node's only worker
    (_pipe_behind_a_long_task) and kill the one right behind it; the head, which waits for
    a file, is released when the block ends.  Yields the paths the tasks write and the
    futures."""
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    try:
        worker, head, behind, rest = _pipe_behind_a_long_task(
            enclave, ex, head_fn, log, release, runs)
        assert behind.kill()
        yield log, runs, worker, head, behind, rest
    finally:
        tasks.release(release, "go")


# ---------------------------------------------------------------------- task functions
# (importable by workers as tests.test_worker_stop_signal)


def take_sigusr1_for_faulthandler():
    """What a task that wants stack dumps on demand does (faulthandler's C handler)."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, chain=False)
    return os.getpid()


def take_the_stop_signal_for_faulthandler():
    """A handler set from C (faulthandler's, a C library's sigaction), which
    signal.getsignal() does not show (found by review)."""
    from node.worker import STOP_SIGNAL

    faulthandler.register(STOP_SIGNAL, file=sys.stderr, chain=False)
    return os.getpid()


def ignore_the_stop_signal():
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    return os.getpid()


def handle_the_stop_signal_itself():
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, lambda *_: None)
    return os.getpid()


def block_the_stop_signal():
    from node.worker import STOP_SIGNAL

    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    return os.getpid()


@pytest.mark.parametrize("tamper", [
    take_sigusr1_for_faulthandler,
    take_the_stop_signal_for_faulthandler,
    ignore_the_stop_signal,
    handle_the_stop_signal_itself,
    block_the_stop_signal,
])
def test_a_task_piped_behind_a_long_one_and_killed_never_runs_whatever_an_earlier_task_did(
        tamper, start_node, make_executor, enclave, tmp_path):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    tampered = ex.submit(tamper).result(GUARD)
    with _kill_the_task_behind(enclave, ex, tasks.log_pid_and_wait, tmp_path) as (
            log, runs, worker, head, behind, rest):
        assert worker == tampered == _pids(log)[0], "the scenario needs the tampered worker"
        wait_for(lambda: behind.done(), what="the killed piped task to end")
        assert isinstance(behind.exception(), TaskKilled)
        assert "it never ran" in str(behind.exception())
    assert head.result(GUARD) == worker
    assert [f.result(GUARD) for f in rest] == [0, 1]  # on a new worker
    # the bug: the worker, never told to stop, ran the killed task after the head
    assert not runs.exists(), "the killed task ran"
    assert enclave.jobs.get(behind.job_id).state == "cancelled"


def reset_the_stop_signal_then_wait(log, release):
    """Give the stop signal its default action (to die), then run until ``release``."""
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, signal.SIG_DFL)
    return tasks.log_pid_and_wait(log, release)


def test_a_worker_killed_by_the_stop_request_says_so(start_node, make_executor, enclave,
                                                     tmp_path):
    """A task that resets the stop signal to its default dies of the node's request: its
    WorkerDied names the signal and what it was (not "signal 38 (signal 38)")."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    with _kill_the_task_behind(enclave, ex, reset_the_stop_signal_then_wait, tmp_path) as (
            log, runs, _, head, behind, rest):
        exc = head.exception(GUARD)
    from node.worker import STOP_SIGNAL

    assert isinstance(exc, WorkerDied)
    name = "SIGRTMIN+4" if hasattr(signal, "SIGRTMIN") else "SIGUSR1"
    assert f"killed by {name}, the node's stop request (signal {int(STOP_SIGNAL)})" in str(exc)
    assert isinstance(behind.exception(GUARD), TaskKilled)
    assert [f.result(GUARD) for f in rest] == [0, 1]
    assert not runs.exists()


def handle_the_stop_signal_then_wait(log, release):
    """Take the stop signal for itself, then run until ``release``: a request made now is
    swallowed (the one case the worker cannot recover; see docs/architecture.md)."""
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, lambda *_: None)
    return tasks.log_pid_and_wait(log, release)


def test_a_worker_that_missed_the_stop_request_does_not_hold_its_place(
        start_node, make_executor, enclave, tmp_path):
    """Found by review: the worker ran on, then waited for tasks the node never sends to a
    worker it asked to stop; the node (one worker) neither used nor replaced it, and every
    later task waited for ever.  Now the node also closes its pipe, once it has reported
    all it had."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    with _kill_the_task_behind(enclave, ex, handle_the_stop_signal_then_wait, tmp_path) as (
            log, runs, _, head, behind, rest):
        assert isinstance(behind.exception(GUARD), TaskKilled)
    assert head.result(GUARD) == _pids(log)[0]
    assert [f.result(GUARD) for f in rest] == [0, 1]
    assert enclave.jobs.get(behind.job_id).state == "cancelled"  # (it ran: the known gap)
    # the node goes on: a new worker takes the next task
    assert ex.submit(tasks.worker_pid).result(GUARD) != _pids(log)[0]
