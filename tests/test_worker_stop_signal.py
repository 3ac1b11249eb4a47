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

import faulthandler
import os
import signal
import sys

import pytest

from kotta_executor import TaskKilled
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_node import _pids
from tests.test_node_pipelining import _pipe_together, _states

# ---------------------------------------------------------------------- task functions
# (importable by workers as tests.test_worker_stop_signal)


def take_sigusr1_for_faulthandler():
    """What a task that wants stack dumps on demand does (faulthandler's C handler)."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, chain=False)
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
    ignore_the_stop_signal,
    handle_the_stop_signal_itself,
    block_the_stop_signal,
])
def test_a_task_piped_behind_a_long_one_and_killed_never_runs_whatever_an_earlier_task_did(
        tamper, start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    tampered = ex.submit(tamper).result(GUARD)
    try:
        worker, (head, behind, *rest) = _pipe_together(enclave, ex, [
            (None, tasks.log_pid_and_wait, (str(log), str(release))),
            (None, tasks.append_line, (str(runs), "ran")),
            (None, tasks.square, (0,)),
            (None, tasks.square, (1,)),
        ])
        assert worker == tampered, "the scenario needs the tampered worker"
        wait_for(lambda: _pids(log), what="the head task to begin")
        assert _pids(log) == [worker]
        wait_for(lambda: _states(enclave, [behind]) == ["processing"],
                 what="the node to pipe the task behind the head")
        assert behind.kill()
        wait_for(lambda: behind.done(), what="the killed piped task to end")
        assert isinstance(behind.exception(), TaskKilled)
        assert "it never ran" in str(behind.exception())
    finally:
        release.write_text("go")
    assert head.result(GUARD) == worker
    assert [f.result(GUARD) for f in rest] == [0, 1]  # on a new worker
    # the bug: the worker, never told to stop, ran the killed task after the head
    assert not runs.exists(), "the killed task ran"
    assert enclave.jobs.get(behind.job_id).state == "cancelled"
