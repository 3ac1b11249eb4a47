"""Tasks that handle the node's stop signals themselves (a SIGTERM handler that exits or
raises, SIGTERM ignored or blocked, SIGINT ignored), with real nodes and workers: a
walltime or kill() still ends as WalltimeExceeded / TaskKilled, and the worker's next
task runs normally."""

from __future__ import annotations

import datetime as _dt
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kotta_executor import TaskKilled, WalltimeExceeded
from tests import tasks
from tests.conftest import GUARD, wait_for

# ---------------------------------------------------------------------- task functions
# (importable by workers as tests.test_signal_handling_tasks)


def _exit_0(*_):
    sys.exit(0)


def _interrupt(*_):
    raise KeyboardInterrupt


def _exit_0_once(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (the node signals twice: tree, group)
    sys.exit(0)


_HANDLERS = {"exit": _exit_0, "interrupt": _interrupt, "ignore": signal.SIG_IGN,
             "exit once": _exit_0_once}


def install_sigterm_handler(kind):
    """Install a SIGTERM handler and return (it stays on the warm worker)."""
    signal.signal(signal.SIGTERM, _HANDLERS[kind])
    return os.getpid()


def handle_sigterm_and_sleep(kind, started, seconds=60.0):
    """Install a SIGTERM handler of ``kind``, say so in ``started``, and sleep."""
    signal.signal(signal.SIGTERM, _HANDLERS[kind])
    return sleep_past(started, seconds)


def block_sigterm_and_sleep(started, seconds=60.0):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return sleep_past(started, seconds)


def sleep_past(started, seconds=60.0):
    Path(started).write_text(f"{os.getpid()}\n")
    print("began", flush=True)
    deadline = time.monotonic() + seconds  # deadlock guard of a test that went wrong
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return "slept"


def log_each_sigterm(log, started, seconds=60.0):
    """Append a line to ``log`` for each SIGTERM (a handler that cleans up and stays), and
    run until SIGKILL."""
    signal.signal(signal.SIGTERM, lambda *_: Path(log).open("a").write("SIGTERM\n"))
    return sleep_past(started, seconds)


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return os.getpid()


# ---------------------------------------------------------------------- helpers

SHORT = _dt.timedelta(seconds=2)


def _end(f, how, started):
    """End ``f`` (which writes ``started`` as it begins) by walltime or by kill()."""
    if how == "kill":
        wait_for(started.exists, what="the task to begin")
        assert f.kill()


def _expected(how):
    return WalltimeExceeded if how == "walltime" else TaskKilled


def _submit(ex, how, fn, *args):
    view = ex.with_options(walltime=SHORT) if how == "walltime" else ex
    return view.submit(fn, *args)


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["walltime", "kill"])
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_sigterm_handler_an_earlier_task_left_does_not_hide_a_walltime_or_kill(
        start_node, make_executor, tmp_path, how, kind):
    """An earlier task's SIGTERM handler that exits (or raises KeyboardInterrupt) stays on
    the warm worker; a later task stopped by the node raised SystemExit(0) there, which the
    client's result() re-raised: the user's program ended quietly."""
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(install_sigterm_handler, kind).result(GUARD)
    f = _submit(ex, how, sleep_past, str(started))
    _end(f, how, started)
    exc = f.exception(GUARD)
    assert isinstance(exc, _expected(how)), repr(exc)
    assert f.status() == ("failed" if how == "walltime" else "cancelled")
    # the next task runs normally (on a new worker: the old one was killed)
    assert ex.submit(tasks.worker_pid).result(GUARD) != pid
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


def test_what_a_task_raised_after_the_sigterm_is_named_with_the_walltime(
        start_node, make_executor, tmp_path):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.with_options(walltime=SHORT).submit(
        handle_sigterm_and_sleep, "exit once", str(started))
    exc = f.exception(GUARD)
    assert isinstance(exc, WalltimeExceeded), repr(exc)
    assert "exceeded its walltime of 2 s (the task then raised SystemExit: 0)" in str(exc)
    assert f.stdout == "began\n"  # its output and usage are kept
    assert f.usage()["wall"] > 1


@pytest.mark.parametrize("how", ["walltime", "kill"])
@pytest.mark.parametrize("kind", ["exit", "interrupt", "ignore"])
def test_a_task_handling_sigterm_itself_still_ends_as_walltime_or_kill(
        start_node, make_executor, tmp_path, how, kind):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = _submit(ex, how, handle_sigterm_and_sleep, kind, str(started))
    _end(f, how, started)
    exc = f.exception(GUARD)
    assert isinstance(exc, _expected(how)), repr(exc)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


@pytest.mark.parametrize("how", ["walltime", "kill"])
def test_a_task_blocking_sigterm_still_ends_as_walltime_or_kill(
        start_node, make_executor, tmp_path, how):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = _submit(ex, how, block_sigterm_and_sleep, str(started))
    _end(f, how, started)
    exc = f.exception(GUARD)
    assert isinstance(exc, _expected(how)), repr(exc)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


@pytest.mark.parametrize("how", ["walltime", "kill"])
def test_a_task_ignoring_sigint_leaves_later_tasks_and_stops_normal(
        start_node, make_executor, tmp_path, how):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(ignore_sigint).result(GUARD)
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same, warm worker
    f = _submit(ex, how, sleep_past, str(started))
    _end(f, how, started)
    assert isinstance(f.exception(GUARD), _expected(how))
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


def test_a_sigterm_handler_an_earlier_task_left_does_not_hide_the_memory_limit(
        start_node, make_executor):
    from kotta_executor import MemoryLimitExceeded

    start_node("--memory-limit", "100", workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(install_sigterm_handler, "exit").result(GUARD)
    f = ex.submit(tasks.allocate_and_sleep, 300)
    exc = f.exception(GUARD)
    # the bug: SystemExit(0), re-raised by result()
    assert isinstance(exc, MemoryLimitExceeded), repr(exc)
    assert f.status() == "failed"
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


def test_a_kill_sends_a_task_one_sigterm_not_two(start_node, make_executor, tmp_path):
    """The node signalled each process of the tree, then the worker's process group: every
    one of them got SIGTERM twice, and a task's clean-up handler ran twice, the second
    time inside the first."""
    log, started = tmp_path / "log", tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(log_each_sigterm, str(log), str(started))
    wait_for(started.exists, what="the task to begin")
    assert f.kill()
    assert isinstance(f.exception(GUARD), TaskKilled)
    assert log.read_text() == "SIGTERM\n"
