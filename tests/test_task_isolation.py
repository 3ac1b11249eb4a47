"""What one task does to its process cannot cost another task, or the user's files:

* a task that closes fds 1 or 2, or points them at a file of its own, still returns its
  value; the next task on that worker writes to its own capture again, and the user's
  file is left alone; so with ``sys.stdout`` replaced, or rewrapped (which closes the
  worker's own buffer when the wrapper goes), or detached from its buffer;
* what a task started is ended with it: a child that ignores SIGTERM, when the task is
  killed or over its walltime (SIGKILL after the grace period, also once the worker has
  died at the SIGTERM); the children of a task whose worker died under it.

(What a task changes in ``os.environ`` stays for the next task of the same owner on that
worker, as in ProcessPoolExecutor's reused workers: docs/guide.md.)

The task functions below are pickled by value (this module is not importable by workers).
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import sys

import cloudpickle
import psutil
import pytest

from kotta_executor import TaskKilled, WalltimeExceeded
from tests import tasks
from tests.conftest import GUARD, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- task functions

_STUBBORN_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def spawn_stubborn_child_and_sleep(pid_file, seconds=120.0):
    """A task with a helper that ignores SIGTERM; the task itself does not handle SIGTERM
    (the default: the worker dies at the soft signal)."""
    import subprocess as sp
    import sys as _sys
    import time as _time
    from pathlib import Path as _P

    sp.Popen([_sys.executable, "-c", _STUBBORN_CHILD, str(pid_file)])
    deadline = _time.monotonic() + 30
    while not _P(pid_file).exists() and _time.monotonic() < deadline:
        _time.sleep(0.01)
    _time.sleep(seconds)


def redirect_fd1_into(path, readable=False):
    """Send C-level stdout into a file of the user's and leave it so (as a task that wraps
    a Fortran/C library which prints too much might); ``readable``: opened "w+"."""
    import os as _os

    mode = _os.O_RDWR if readable else _os.O_WRONLY
    fd = _os.open(path, mode | _os.O_CREAT | _os.O_TRUNC, 0o644)
    _os.dup2(fd, 1)
    _os.close(fd)
    _os.write(1, b"precious results\n")
    return "redirected"


def close_fd1_and_return(value):
    import os as _os

    _os.close(1)
    return value


def echo(text):
    import os as _os

    _os.write(1, text.encode() + b"\n")
    return text






def print_then_truncate_stdout_by_path(text):
    """Print ``text``, then run a child told to write to ``/dev/stdout`` (``cmd -o
    /dev/stdout``, ``> /dev/stdout`` in a script) that writes nothing: it opens the
    capture file anew and empties it, where the worker's offset in it stays past ``text``."""
    import subprocess as sp

    print(text)
    sp.run(["sh", "-c", "true > /dev/stdout"], check=True)
    return "truncated"


def replace_sys_stdout(path):
    import sys as _sys

    _sys.stdout = open(path, "w")
    print("to my log")
    return "replaced"


def say(text):
    print(text)
    return text


def print_much(size):
    line = "x" * 1023
    for _ in range(size // 1024):
        print(line)
    return "printed"


def replace_sys_stdout_and_its_original(path):
    import sys as _sys

    _sys.stdout = _sys.__stdout__ = open(path, "w")
    print("to my log")
    return "replaced"


def rewrap_sys_stdout_and_stderr():
    """The idiom for UTF-8 output on an old Python: a new wrapper on the worker's own
    buffers, left in place (it closes them when it goes)."""
    import io
    import sys as _sys

    _sys.stdout = io.TextIOWrapper(_sys.stdout.buffer, encoding="utf-8")
    _sys.stderr = io.TextIOWrapper(_sys.stderr.buffer, encoding="utf-8")
    print("wrapped \u00e9")
    return "wrapped"


def detach_and_rewrap_sys_stdout_and_stderr():
    """The other idiom for it: the worker's own streams detached from their buffers."""
    import io
    import sys as _sys

    _sys.stdout = io.TextIOWrapper(_sys.stdout.detach(), encoding="utf-8")
    _sys.stderr = io.TextIOWrapper(_sys.stderr.detach(), encoding="utf-8")
    print("detached \u00e9")
    return "detached"


def replace_time_sleep():
    """Replace ``time.sleep`` (as a task that hurries a library's retries might) with one
    that notes which threads call it, and leave it so."""
    import threading
    import time as _time

    real, calls = _time.sleep, []

    def noting_sleep(seconds):
        calls.append(threading.current_thread().name)
        real(seconds)

    _time.sleep, _time.noted_sleeps, _time.real_sleep = noting_sleep, calls, real
    return "replaced"


def who_called_time_sleep_meanwhile(seconds):
    """The threads that called the replaced ``time.sleep`` while this task waited
    ``seconds`` (without calling it), then the real one put back."""
    import threading
    import time as _time

    _time.noted_sleeps.clear()
    threading.Event().wait(seconds)
    _time.sleep = _time.real_sleep
    return sorted(set(_time.noted_sleeps))


def say_on_both(text):
    import sys as _sys

    print(text)
    print(text, file=_sys.stderr)
    return text


def reconfigure_sys_stdout_and_stderr(**settings):
    """The idiom for UTF-8 output on a console that lacks it, ``encoding="utf-8"`` (which
    also sets ``errors="strict"``), or another's, left in place."""
    import sys as _sys

    _sys.stdout.reconfigure(**settings)
    _sys.stderr.reconfigure(**settings)
    return "reconfigured"


def say_undecodable_on_both(text):
    """Print ``text`` and a file name that is not UTF-8 (``os.listdir`` gives it with a
    surrogate), on both streams."""
    import os as _os
    import sys as _sys

    name = _os.fsdecode(b"caf\xe9.csv")
    print(text, name)
    print(text, name, file=_sys.stderr)
    return [(s.line_buffering, s.write_through) for s in (_sys.stdout, _sys.stderr)]







def spawn_child_then_exit(pid_file, code=3):
    """A task that starts a helper, then its worker dies under it (a crash, os._exit)."""
    import os as _os
    import subprocess as sp
    from pathlib import Path as _P

    p = sp.Popen(["sleep", "120"])
    _P(pid_file).write_text(str(p.pid))
    _os._exit(code)




def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["walltime", "kill"])
def test_walltime_or_kill_ends_a_child_that_ignores_sigterm(how, start_node, make_executor,
                                                           tmp_path):
    child = tmp_path / "child.pid"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(tasks.worker_pid).result(GUARD)  # a warm worker
    if how == "walltime":
        f = ex.with_options(walltime=_dt.timedelta(seconds=3)).submit(
            spawn_stubborn_child_and_sleep, str(child))
    else:
        f = ex.submit(spawn_stubborn_child_and_sleep, str(child))
    pid = None
    try:
        wait_for(child.exists, what="the task's child to start")
        pid = int(child.read_text())
        if how == "kill":
            assert f.kill()
        with pytest.raises(WalltimeExceeded if how == "walltime" else TaskKilled):
            f.result(GUARD)
        # "SIGTERM to the worker, its process group and every descendant psutil can see,
        # then SIGKILL to all of them 0.5 s later"
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's child, which ignores SIGTERM, to be SIGKILLed")
    finally:
        if pid is not None:
            _kill(pid)


@pytest.mark.parametrize("how", ["dup2-write-only-file", "close"])
def test_a_task_that_leaves_fd1_redirected_or_closed_still_returns_its_value(
        how, start_node, make_executor, tmp_path):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    if how == "close":
        f = ex.submit(close_fd1_and_return, 42)
        assert f.result(GUARD) == 42
    else:
        f = ex.submit(redirect_fd1_into, str(tmp_path / "my-output.txt"))
        assert f.result(GUARD) == "redirected"


def test_a_task_that_redirects_fd1_does_not_cost_the_next_task_or_its_file(
        start_node, make_executor, tmp_path):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    mine = tmp_path / "my-output.txt"
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    # opened read-write ("w+"), so that the worker's read of fd 1 after the task works
    assert ex.submit(redirect_fd1_into, str(mine), True).result(GUARD) == "redirected"
    assert mine.read_bytes() == b"precious results\n"
    nxt = ex.submit(echo, "next task")
    assert nxt.result(GUARD) == "next task"
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout
    problems = []
    if mine.read_bytes() != b"precious results\n":
        problems.append(f"the user's file now holds {mine.read_bytes()!r}")
    if nxt.stdout != "next task\n":
        problems.append(f"the next task's stdout is {nxt.stdout!r}")
    assert not problems, problems


def test_a_task_whose_child_emptied_stdout_by_its_path_leaves_the_next_tasks_output_alone(
        start_node, make_executor):
    """Emptied by another open of it (documented: what the task printed before is lost),
    the capture file stayed empty, so the worker took it for one that needs no emptying,
    and left its offset where the task's output had ended: the next task's stdout began
    with that many NUL bytes (gigabytes of them, sparse, after a task that logged much)."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    assert ex.submit(print_then_truncate_stdout_by_path, "x" * 99).result(GUARD) == "truncated"
    nxt = ex.submit(say, "hello")
    assert nxt.result(GUARD) == "hello"
    assert nxt.stdout == "hello\n"
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout


def test_a_task_that_printed_much_leaves_no_disk_space_held_by_its_idle_worker(
        start_node, make_executor):
    """A worker's capture files hold all a task printed (its result carries the last
    4 MiB), and were emptied only when the next task began: an idle worker held the
    space of a chatty task's output, 60 MiB of progress lines say, on the node's disk for
    as long as it idled; on a disk the enclave shares, the node's next write failed
    ("database or disk is full") and it died.  The files are emptied once the result is
    sent; the output is the result's, and the next task's stdout is its own."""
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(print_much, 8 << 20)
    assert f.result(GUARD) == "printed"
    assert f.stdout.endswith("x" * 1023 + "\n") and len(f.stdout) > 4 << 20
    [worker] = node.worker_pids()
    captures = [f"/proc/{worker}/fd/{fd}" for fd in (1, 2)]
    wait_for(lambda: all(os.stat(c).st_size == 0 for c in captures),
             what="the idle worker's capture files to be emptied")
    nxt = ex.submit(say, "hello")
    assert nxt.result(GUARD) == "hello"
    assert nxt.stdout == "hello\n"


def test_a_task_that_replaces_sys_stdout_does_not_swallow_the_next_tasks_prints(
        start_node, make_executor, tmp_path):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(replace_sys_stdout, str(tmp_path / "log.txt")).result(GUARD) == "replaced"
    nxt = ex.submit(say, "hello")
    assert nxt.result(GUARD) == "hello"
    assert nxt.stdout == "hello\n"


def test_a_task_that_rebinds_sys_dunder_stdout_does_not_take_the_next_tasks_prints(
        start_node, make_executor, tmp_path):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    mine = tmp_path / "log.txt"
    assert ex.submit(replace_sys_stdout_and_its_original, str(mine)).result(GUARD) == "replaced"
    nxt = ex.submit(say, "hello")
    assert nxt.result(GUARD) == "hello"
    # the bug: the worker put back sys.__stdout__, the task's file: "" here, and the
    # next task's "hello" in the user's file
    assert nxt.stdout == "hello\n"
    assert mine.read_text() == "to my log\n"


@pytest.mark.parametrize("rewrap, said", [
    # the bug: "ValueError: I/O operation on closed file" at the next task's print
    (rewrap_sys_stdout_and_stderr, "wrapped"),
    # the bug: WorkerDied ("exited with code 120"; "ValueError: underlying buffer has been
    # detached" in the worker, as it put its streams back), with the first task's output
    (detach_and_rewrap_sys_stdout_and_stderr, "detached"),
], ids=["rewraps the buffer", "detaches it"])
def test_a_task_that_rewraps_sys_stdout_leaves_the_next_tasks_prints_alone(
        start_node, make_executor, rewrap, said):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    first = ex.submit(rewrap)
    assert first.result(GUARD) == said
    assert first.stdout == f"{said} \u00e9\n"
    nxt = ex.submit(say_on_both, "hello")
    assert nxt.result(GUARD) == "hello"
    assert (nxt.stdout, nxt.stderr) == ("hello\n", "hello\n")
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout


@pytest.mark.parametrize("settings", [
    # the bug: the next task's print of a non-UTF-8 file name raised UnicodeEncodeError
    # ("surrogates not allowed"), where a fresh worker's prints it escaped
    {"encoding": "utf-8"},
    # the bug: the same, and the next task's "\u00e9" came back as "\ufffd"
    {"encoding": "latin-1"},
    # the bug: the next task's prints were block-buffered (lost at a crash or kill)
    {"line_buffering": False, "write_through": False},
], ids=["utf-8", "latin-1", "block-buffered"])
def test_a_task_that_reconfigures_sys_stdout_leaves_the_next_tasks_prints_alone(
        start_node, make_executor, settings):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    first = ex.submit(say_undecodable_on_both, "\u00e9")  # as a fresh worker prints it
    buffering = first.result(GUARD)
    assert (first.stdout, first.stderr) == ("\u00e9 caf\\udce9.csv\n",) * 2
    assert ex.submit(reconfigure_sys_stdout_and_stderr, **settings).result(GUARD) == "reconfigured"
    nxt = ex.submit(say_undecodable_on_both, "\u00e9")
    assert nxt.result(GUARD) == buffering
    assert (nxt.stdout, nxt.stderr) == (first.stdout, first.stderr)
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout


def test_a_task_that_replaces_time_sleep_leaves_the_workers_own_threads_alone(
        start_node, make_executor):
    """The worker's thread that watches for the node's death slept with ``time.sleep``,
    looked up each time: replaced by one that returns at once, it spun, and took the GIL
    from every later task of the worker (a second of waiting cost a second of CPU)."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    assert ex.submit(replace_time_sleep).result(GUARD) == "replaced"
    # a window for the watcher (every 0.25 s) to come round a few times; not a wait for
    # anything: with the fix no other thread calls the task's sleep at all
    assert ex.submit(who_called_time_sleep_meanwhile, 1.0).result(GUARD) == []
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout


def test_the_children_of_a_task_whose_worker_died_do_not_run_on(start_node, make_executor,
                                                                tmp_path):
    from kotta_executor import WorkerDied

    pid_file = tmp_path / "child.pid"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(spawn_child_then_exit, str(pid_file))
    try:
        with pytest.raises(WorkerDied, match="exited with code 3"):
            f.result(GUARD)
        pid = int(pid_file.read_text())
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node went on
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the child of the failed task to be ended")
    finally:
        if pid_file.exists():
            _kill(int(pid_file.read_text()))
