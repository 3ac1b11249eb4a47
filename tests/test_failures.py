"""Failure injection: one table, one row per way a task can fail (after CPython's
test_concurrent_futures/test_deadlock.py and loky's crash cases).

Each row names where the failure is injected, the exception the user sees and a fragment of
its message.  For every row the test also checks what the enclave recorded (a final state
and a reason in the job table) and that the next ordinary task on the same executor still
runs: the node survives every failure and replaces a worker that died.
"""

from __future__ import annotations

import datetime as _dt
import re
import threading
import traceback
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from kotta_executor import (
    KottaExecutor,
    RemoteError,
    SerializationError,
    WalltimeExceeded,
    WorkerDied,
)
from kotta_executor.states import FINAL
from tests import tasks
from tests.conftest import GUARD, gone, wait_for


@dataclass(frozen=True)
class Row:
    #: submits the failing call; returns its future (or raises, for failures at submit)
    submit: Callable[[KottaExecutor, Path], object]
    #: the exception the user sees
    raises: type[BaseException]
    #: a fragment of its message
    fragment: str
    #: the job's final state in the enclave (None: no job was ever created)
    state: str | None = "failed"
    #: the worker that ran the task is still the one serving the owner afterwards
    worker_survives: bool = True
    #: extra checks on the exception (and the test directory)
    check: Callable[[BaseException, Path], None] | None = None
    #: a fragment of the reason recorded in the job table (default: ``fragment``)
    reason: str | None = None


# ---------------------------------------------------------------------- per-row extra checks


def _check_unpickle_on_node(exc: BaseException, _: Path) -> None:
    assert isinstance(exc.__cause__, RuntimeError)
    assert str(exc.__cause__) == "no unpickling here"
    assert "tests.tasks.noop" in str(exc)  # the task is named


def _check_value_error(exc: BaseException, _: Path) -> None:
    assert type(exc) is ValueError  # not wrapped
    assert exc.args == ("bad value 42",)
    assert any(n.startswith("kotta job ") for n in getattr(exc, "__notes__", []))


def _check_remote_error(exc: BaseException, _: Path) -> None:
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "tests.tasks.UnpicklableError"
    assert exc.message == "holds a lock"
    assert "raise_unpicklable" in exc.remote_traceback
    assert "Traceback" in exc.remote_traceback


def _check_result_unpicklable(exc: BaseException, _: Path) -> None:
    assert "_thread.lock" in str(exc)


def _check_client_unpickle(exc: BaseException, _: Path) -> None:
    assert isinstance(exc.__cause__, RuntimeError)
    assert str(exc.__cause__) == "not on this client"


def _check_exit(exc: BaseException, _: Path) -> None:
    assert isinstance(exc, WorkerDied)
    assert exc.exitcode == 7
    assert exc.signal is None


def _check_segfault(exc: BaseException, _: Path) -> None:
    assert isinstance(exc, WorkerDied)
    assert exc.signal == 11
    assert exc.exitcode == -11


def _check_walltime(exc: BaseException, tmp: Path) -> None:
    assert isinstance(exc, TimeoutError)  # ``except TimeoutError`` catches a walltime
    pid = int((tmp / "grandchild.pid").read_text())

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, what=f"the task's grandchild {pid} to be killed")


def _check_cause_is_system_exit(exc: BaseException, _: Path) -> None:
    assert type(exc.__cause__) is SystemExit


def _check_remote_error_exits(exc: BaseException, _: Path) -> None:
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "tests.tasks.ErrorExitsWhenLoaded"
    assert "raise_error_exits_when_loaded" in exc.remote_traceback


def _check_deep(exc: BaseException, _: Path) -> None:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    remote = [fr for fr in frames if fr.name in ("recurse_forever", "raise_deep")]
    assert len(remote) == 99  # 100 remote frames travel, the first being the worker's own
    note = next(n for n in exc.__notes__ if "frames in the middle" in n)
    assert re.fullmatch(r"kotta: \d+ frames in the middle of the remote traceback are left "
                        r"out \(of \d+\)", note), note


def _check_system_exit(exc: BaseException, _: Path) -> None:
    assert type(exc) is SystemExit
    assert exc.args == (3,)


def _check_node_only_class(exc: BaseException) -> None:
    import traceback

    assert isinstance(exc, RemoteError)
    assert exc.type_name == "node_only_errors.ParseError"
    assert exc.message == "bad row 17"
    assert "raise ParseError(message)" in exc.remote_traceback
    assert [fr.name for fr in traceback.extract_tb(exc.__traceback__)][-2:] == [
        "raise_from_a_node_only_module", "parse"]
    assert any("cannot be imported on the client" in n for n in exc.__notes__)


def _walltime_submit(ex: KottaExecutor, tmp: Path):
    short = ex.with_options(walltime=_dt.timedelta(seconds=1))
    return short.submit(tasks.spawn_child_and_sleep, str(tmp / "grandchild.pid"))


ROWS = [
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.noop, threading.Lock()),
            raises=SerializationError,
            fragment="argument 0",
            state=None,
        ),
        id="pickle-argument",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.noop, tasks.LoadsBadly("no unpickling here")),
            raises=SerializationError,
            fragment="could not be unpickled on the node",
            check=_check_unpickle_on_node,
        ),
        id="unpickle-on-node",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.raise_value_error, "bad value 42"),
            raises=ValueError,
            fragment="bad value 42",
            check=_check_value_error,
        ),
        id="raises",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.raise_unpicklable, "holds a lock"),
            raises=RemoteError,
            fragment="tests.tasks.UnpicklableError: holds a lock",
            check=_check_remote_error,
            reason="UnpicklableError: holds a lock",
        ),
        id="unpicklable-exception",
    ),
    pytest.param(
        Row(
            # its class is in a module only the node has (a package of the task's
            # requirements): the client had raised "could not be unpickled on the client:
            # No module named ...", with neither the message nor the traceback
            submit=lambda ex, tmp: ex.submit(tasks.raise_from_a_node_only_module,
                                             str(tmp / "node-only"), "bad row 17"),
            raises=RemoteError,
            fragment="node_only_errors.ParseError: bad row 17",
            check=lambda exc, _: _check_node_only_class(exc),
            reason="ParseError: bad row 17",
        ),
        id="exception-class-only-on-the-node",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.return_lock),
            raises=SerializationError,
            fragment="the result of the call",
            check=_check_result_unpicklable,
            reason="could not be pickled",
        ),
        id="pickle-result",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.return_unloadable, "not on this client"),
            raises=SerializationError,
            fragment="could not be unpickled on the client",
            # The node never unpickles results, so it cannot know: the job did complete and
            # its result is kept (another client may be able to load it).
            state="completed",
            check=_check_client_unpickle,
        ),
        id="unpickle-result-on-client",
    ),
    pytest.param(
        Row(
            # unpickling the result raises SystemExit on the client: that future fails, not
            # the executor's manager thread (which had broken every other future)
            submit=lambda ex, tmp: ex.submit(tasks.return_exits_when_loaded),
            raises=SerializationError,
            fragment="could not be unpickled on the client: SystemExit: no loading here",
            state="completed",
            check=_check_cause_is_system_exit,
        ),
        id="result-exits-when-unpickled-on-client",
    ),
    pytest.param(
        Row(
            # pickling the result raises SystemExit in the worker, which had killed it
            submit=lambda ex, tmp: ex.submit(tasks.return_exits_when_pickled),
            raises=SerializationError,
            fragment="(tests.tasks.ExitsWhenPickled) could not be pickled to send back",
            reason="could not be pickled",
        ),
        id="result-exits-when-pickled",
    ),
    pytest.param(
        Row(
            # an exception whose unpickling would exit: it travels as a RemoteError, and
            # the worker lives on (its round-trip check had let the SystemExit out)
            submit=lambda ex, tmp: ex.submit(tasks.raise_error_exits_when_loaded),
            raises=RemoteError,
            fragment="tests.tasks.ErrorExitsWhenLoaded: exits when loaded",
            check=_check_remote_error_exits,
            reason="ErrorExitsWhenLoaded: exits when loaded",
        ),
        id="exception-exits-when-unpickled",
    ),
    pytest.param(
        Row(
            # the worker's summary of it for the job record called str(), which raised
            # SystemExit and killed the worker
            submit=lambda ex, tmp: ex.submit(tasks.raise_str_exits_on_the_node),
            raises=tasks.StrExitsOnTheNode,
            fragment="fine on the client",
            reason="StrExitsOnTheNode",
        ),
        id="exception-str-exits",
    ),
    pytest.param(
        Row(
            # its 1,000-frame traceback had made the worker die of a second RecursionError
            submit=lambda ex, tmp: ex.submit(tasks.recurse_forever),
            raises=RecursionError,
            fragment="maximum recursion depth exceeded",
            check=_check_deep,
        ),
        id="recursion-error",
    ),
    pytest.param(
        Row(
            # a traceback of 600 frames had made it a SerializationError
            submit=lambda ex, tmp: ex.submit(tasks.raise_deep, 600),
            raises=ValueError,
            fragment="raised deep down",
            check=_check_deep,
        ),
        id="deep-traceback",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.exit_hard, 7),
            raises=WorkerDied,
            fragment="exited with code 7",
            worker_survives=False,
            check=_check_exit,
        ),
        id="worker-exit",
    ),
    pytest.param(
        Row(
            # a task that writes a framed message on the worker's result pipe, which begins
            # as a result does: too short to hold the head of its task's result, it is
            # garbage, and the node ends the worker, whose real result is not read (nor
            # taken for the next task's)
            submit=lambda ex, tmp: ex.submit(tasks.forge_a_result),
            raises=WorkerDied,
            fragment="wrote something on its result pipe that is not a message",
            worker_survives=False,
        ),
        id="forged-result",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.garble_the_result_pipe),
            raises=WorkerDied,
            fragment="wrote something on its result pipe that is not a message",
            worker_survives=False,
        ),
        id="garbled-result-pipe",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.write_text_on_the_result_pipe),
            raises=WorkerDied,
            fragment="wrote something on its result pipe that is not a message",
            worker_survives=False,
        ),
        id="text-on-result-pipe",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.close_the_result_pipe_and_sleep, 60),
            raises=WorkerDied,
            fragment="the worker's result pipe was closed",
            worker_survives=False,
        ),
        id="result-pipe-closed",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.segfault),
            raises=WorkerDied,
            fragment="SIGSEGV (signal 11)",
            worker_survives=False,
            check=_check_segfault,
        ),
        id="segfault",
    ),
    pytest.param(
        Row(
            submit=_walltime_submit,
            raises=WalltimeExceeded,
            fragment="exceeded its walltime of 1 s",
            worker_survives=False,
            check=_check_walltime,
        ),
        id="walltime",
    ),
    pytest.param(
        Row(
            submit=lambda ex, tmp: ex.submit(tasks.raise_system_exit, 3),
            raises=SystemExit,
            fragment="3",
            check=_check_system_exit,
            reason="SystemExit: 3",
        ),
        id="system-exit",
    ),
]


@pytest.mark.parametrize("row", ROWS)
def test_failure_injection(row: Row, make_executor, tmp_path):
    ex = make_executor(1)
    enclave = ex.enclave
    worker_before = ex.submit(tasks.worker_pid).result(GUARD)
    jobs_before = len(enclave.jobs.list(limit=1000))

    # -- what the user sees
    if row.state is None:  # fails at submit: nothing is sent
        with pytest.raises(row.raises, match=re.escape(row.fragment)) as info:
            row.submit(ex, tmp_path)
        exc = info.value
        assert len(enclave.jobs.list(limit=1000)) == jobs_before
        assert enclave.queue.depth("test") == 0
        job_id = None
    else:
        f = row.submit(ex, tmp_path)
        with pytest.raises(row.raises, match=re.escape(row.fragment)) as info:
            f.result(GUARD)
        exc = info.value
        assert f.done() and not f.cancelled()
        job_id = f.job_id
    if row.check is not None:
        row.check(exc, tmp_path)

    # -- the executor still works; the node replaced a worker that died
    worker_after = ex.submit(tasks.worker_pid).result(GUARD)
    if row.worker_survives:
        assert worker_after == worker_before
    else:
        assert worker_after != worker_before
        assert gone(worker_before)
    assert ex.submit(tasks.square, 7).result(GUARD) == 49

    # -- what the enclave recorded
    if job_id is None:
        return
    job = enclave.jobs.get(job_id)
    assert job is not None
    history = enclave.jobs.history(job_id)
    finals = [state for _, state, _ in history if state in FINAL]
    assert finals == [str(job.state)], history  # one final state, recorded once
    assert str(job.state) == row.state, (job.state, job.reason)
    if row.state != "completed":
        assert job.reason, f"job {job_id} is {job.state} without a reason"
        assert (row.reason or row.fragment) in job.reason
        # whoever wrote it (the worker, or the node: a walltime, a death, a refusal), a
        # reason names the type of the failure first
        assert re.match(r"[A-Za-z_][\w.]*(: |$)", job.reason), job.reason


def test_system_exit_keeps_its_code(make_executor):
    ex = make_executor(1)
    with pytest.raises(SystemExit) as info:
        ex.submit(tasks.raise_system_exit, 3).result(GUARD)
    assert info.value.code == 3


def test_tasks_queued_behind_a_killed_task_still_end(start_node, make_executor):
    """A backlog pipes tasks behind running ones; when the running one is killed (or its
    worker dies), those go back to the node's pending list and must run, or be killed,
    or be cancelled: none may stay 'processing' with no one holding it.  (A node once
    refused to claim them again and dropped them.)"""
    start_node(workers=2)
    ex = make_executor(2, start_node=False)
    assert list(ex.map(tasks.noop, range(50))) == list(range(50))  # warm: tiny tasks pipe deep
    # One batch, which the node takes in one step: a backlog, piped deep.  (Submitted one by
    # one, the first two could each go to the node alone, one to each worker, and then the
    # running tasks' ages made the node pipe nothing behind them: 1 run in 25 hung here.)
    with ex._send_lock:
        futures = [ex.submit(tasks.sleep_and_return, 60, i) for i in range(40)]
    wait_for(lambda: sum(f.status() == "processing" for f in futures) > 2,
             what="tasks queued in the workers' pipes")
    for f in futures:
        f.cancel()
    for f in futures:
        if not f.done():
            f.kill()
    for f in futures:
        wait_for(f.done, what=f"job {f.job_id} to end")
    records = ex.enclave.jobs.get_many([f.job_id for f in futures])
    assert {str(r.state) for r in records.values()} <= {"cancelled"}


def test_a_worker_that_dies_starting_up_is_not_said_to_have_run_the_task(
        start_node, make_executor, enclave, tmp_path):
    """A worker that cannot start (here a sitecustomize that exits in workers; a broken
    requirements venv, a package's .pth that fails) dies before it began its task.  The
    future said "the worker process exited with code 3 while running the task", which
    sends the user looking in a task that never ran; it says the worker died starting up,
    and its stderr says why."""
    from tests.conftest import ROOT

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('KOTTA_WORKER_ID'):\n"
        "    sys.stderr.write('this site cannot start a worker\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n"
    )
    start_node(workers=1, env={"PYTHONPATH": f"{site}:{ROOT}"})
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 3)
    exc = f.exception(GUARD)
    assert isinstance(exc, WorkerDied), repr(exc)
    assert exc.exitcode == 3 and exc.signal is None
    assert "while running the task" not in str(exc)
    assert "starting up" in str(exc) and "before it began the task" in str(exc), str(exc)
    assert "this site cannot start a worker" in f.stderr
    assert "starting up" in enclave.jobs.get(f.job_id).reason


@pytest.mark.parametrize(("how", "status"), [("return", 0), ("exit", 5), ("raise", 1)])
def test_a_forked_child_back_in_the_worker_exits_without_answering(how, status, make_executor):
    """A task that forks, whose child returns or raises into the worker's code: the child
    exits with the status that means (as a forked multiprocessing child does); it neither
    sends a result on the worker's pipe nor reads its next tasks."""
    ex = make_executor(1)
    worker = ex.submit(tasks.worker_pid).result(GUARD)
    f = ex.submit(tasks.fork_and_wait, how)
    assert f.result(GUARD) == ("parent", status)
    if how == "raise":
        assert "ValueError: raised in the forked child" in f.stderr
    # the worker, not a child of the task, runs what comes next
    assert [ex.submit(tasks.worker_pid).result(GUARD) for _ in range(5)] == [worker] * 5
    assert list(ex.map(tasks.square, range(20))) == [x * x for x in range(20)]


def test_a_forked_child_that_returns_after_its_task_does_not_take_later_tasks(make_executor, tmp_path):
    ex = make_executor(1)
    worker = ex.submit(tasks.worker_pid).result(GUARD)
    pid_file, release = tmp_path / "child.pid", tmp_path / "release"
    assert ex.submit(tasks.fork_child_returns_later, str(pid_file), str(release)).result(GUARD) == "parent"
    wait_for(pid_file.exists, what="the forked child to start")
    child = psutil.Process(int(pid_file.read_text()))
    release.touch()  # the child returns into the worker's code now, between tasks

    def child_gone() -> bool:
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(child_gone, what="the forked child to exit")
    results = [ex.submit(tasks.square, i) for i in range(30)]
    assert [f.result(GUARD) for f in results] == [i * i for i in range(30)]
    assert ex.submit(tasks.worker_pid).result(GUARD) == worker


def test_an_exception_with_a_cause_only_the_node_can_import(make_executor, tmp_path):
    """The task's own exception comes back as itself; its cause, of a class the client
    cannot import, as a RemoteError (the whole exception had been a SerializationError).
    In a map, only the item that raised fails so."""
    ex = make_executor(1)
    directory = str(tmp_path / "node-only")
    with pytest.raises(RuntimeError, match="the task could not go on") as info:
        ex.submit(tasks.raise_from_a_node_only_module, directory, "bad row 3", True).result(GUARD)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert (cause.type_name, cause.message) == ("node_only_errors.ParseError", "bad row 3")
    assert info.value.__context__ is cause  # (not a stand-in left there)
    results = ex.map(tasks.raise_from_a_node_only_module, [directory] * 3, ["a", "b", "c"],
                     [True, False, True], chunksize=3)
    with pytest.raises(RuntimeError) as info:
        next(results)
    assert isinstance(info.value.__cause__, RemoteError)


@pytest.mark.parametrize("notes", [
    ["kotta job 0123abcd (kotta status 0123abcd; kotta logs 0123abcd)"],  # of another job
    ("a tuple",),
    [1, 2],
], ids=["another-jobs-note", "tuple", "not-strings"])
def test_the_task_own_notes_neither_hide_the_job_nor_replace_the_exception(notes, make_executor):
    """The client adds a note naming the job to what a task raised.  A note of another
    kotta job (an exception the task got from a job of its own) had kept it from adding
    it; ``__notes__`` that were not a list of strings had made the future raise a
    TypeError or AttributeError of that, in place of the task's exception."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_with_notes, notes)
    exc = f.exception(GUARD)  # (not pytest.raises: its match= joins the notes, as strings)
    assert type(exc) is ValueError and exc.args == ("with notes of its own",)
    got = exc.__notes__
    if isinstance(notes, list):
        assert got[:-1] == notes
        where = f" --enclave {ex.enclave.url}"  # (not the default enclave: named)
        assert got[-1] == (f"kotta job {f.job_id} (kotta status {f.job_id}{where}; "
                           f"kotta logs {f.job_id}{where})")
    else:
        assert list(got) == list(notes)


def test_the_job_note_names_the_enclave_the_commands_would_not_find_by_default(
        make_executor, _private_kotta_home):
    """The note said "kotta status JOB; kotta logs JOB" of a job of an enclave given with
    enclave=...: run as shown, they looked in the default enclave, and said "no job"."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    named = make_executor(1)
    default = make_executor(1, enclave=None)  # (the one under $KOTTA_HOME)
    for ex in (named, default):
        f = ex.submit(tasks.raise_with_notes, [])
        note = f.exception(GUARD).__notes__[-1]
        status = note[note.index("kotta status"):note.index(";")].split()[1:]
        out = subprocess.run([sys.executable, "-m", "kotta_executor.cli", *status],
                             capture_output=True, text=True, timeout=GUARD, cwd=ROOT,
                             env=subprocess_env())
        assert out.returncode == 0 and f.job_id in out.stdout, note + out.stdout + out.stderr
        assert ("--enclave" in note) is (ex is named)


def test_an_exception_that_cannot_travel_keeps_its_notes(make_executor):
    """A RemoteError in place of an exception that cannot be pickled shows the notes the
    task (or a library) added to it, before the client's own; they had been dropped."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_unpicklable_with_note, "holds a lock", "while reading row 17")
    with pytest.raises(RemoteError, match="holds a lock") as info:
        f.result(GUARD)
    assert info.value.__notes__[0] == "while reading row 17"
    assert info.value.__notes__[1].startswith(f"kotta job {f.job_id} ")


def test_a_chain_too_long_to_travel_whole_keeps_its_root_cause(make_executor):
    """A chain travels 32 exceptions deep: past that, its root (the error that began it,
    here a KeyError under 40 wrappings) comes back in place of the links left out, with a
    note saying how many; the chain had ended 32 deep, without its root or a word."""
    ex = make_executor(1)
    with pytest.raises(ValueError, match="in the node at depth 40") as info:
        ex.submit(tasks.raise_wrapped, 40).result(GUARD)
    chain = [info.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    assert type(root) is KeyError and root.args == ("missing field 'date'",)
    assert len(chain) == 33
    assert chain[-2].args == ("in the node at depth 9",)
    assert root.__notes__ == ["kotta: 8 chained exception(s) between this one and the next "
                              "are left out"]
    assert chain[-2].__context__ is root  # (shown as the cause it was)


def _frames(exc: BaseException) -> list[str]:
    return [f.f_code.co_name for f, _ in traceback.walk_tb(exc.__traceback__)]


def test_the_members_of_an_exception_group_keep_their_tracebacks_and_causes(make_executor):
    """An ExceptionGroup (asyncio.TaskGroup's) comes back with each member's remote frames
    and chained cause, nested groups too; the members came back bare, without a frame."""
    ex = make_executor(1)
    with pytest.raises(ExceptionGroup) as info:
        ex.submit(tasks.raise_group_of_task_failures).result(GUARD)
    by_type = {type(m): m for m in info.value.exceptions}
    read = by_type[FileNotFoundError]
    assert read.filename == "a.csv" and "_read_rows" in _frames(read)
    parse = by_type[ValueError]
    assert "_parse_rows" in _frames(parse)
    assert isinstance(parse.__cause__, FileNotFoundError)
    assert parse.__cause__.filename == "b.csv" and "_read_rows" in _frames(parse.__cause__)
    [inner] = by_type[ExceptionGroup].exceptions
    assert inner.filename == "c.csv" and "_read_rows" in _frames(inner)
    shown = "".join(traceback.format_exception(info.value))
    assert "_parse_rows" in shown and "c.csv" in shown


_SCRIPT = '''def boom(x):
    y = x + 1
    raise KeyError(f"bad key {y}")
'''


def test_a_remote_traceback_of_a_scripts_function_names_its_file_and_line(make_executor,
                                                                           tmp_path):
    """A function of a script or notebook (``__main__``) travels by value: cloudpickle
    names its code's file ``<dynamic-code>``, so the remote traceback said ``File
    "<dynamic-code>", line 3, in boom``, with no source line, where a ProcessPoolExecutor's
    shows the script's path and ``raise KeyError(...)``."""
    script = tmp_path / "analysis.py"
    script.write_text(_SCRIPT)
    ns = {"__name__": "__main__"}
    exec(compile(_SCRIPT, str(script), "exec"), ns)  # noqa: S102 - the script's function
    ex = make_executor(1)
    with pytest.raises(KeyError) as info:
        ex.submit(ns["boom"], 1).result(GUARD)
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (last.filename, last.lineno, last.name) == (str(script), 3, "boom")
    assert last.line == 'raise KeyError(f"bad key {y}")'  # (the client reads its own file)


@pytest.mark.parametrize("from_cause", [False, True], ids=["context", "cause"])
def test_an_exception_of_a_frozen_dataclass_comes_back_as_itself(from_cause, make_executor):
    """An exception class written as a frozen dataclass refuses setattr: rebuilding it on
    the client (its ``__cause__``, ``__context__``, ``__suppress_context__``) and adding
    the job's note had raised FrozenInstanceError, and the future a SerializationError."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_frozen, 7, from_cause)
    exc = f.exception(GUARD)
    assert type(exc) is tasks.FrozenError and exc.code == 7
    chained = exc.__cause__ if from_cause else exc.__context__
    assert type(chained) is KeyError and chained.args == ("the cause",)
    assert exc.__suppress_context__ is from_cause
    where = f" --enclave {ex.enclave.url}"
    assert exc.__notes__ == [f"kotta job {f.job_id} (kotta status {f.job_id}{where}; "
                             f"kotta logs {f.job_id}{where})"]
    assert "raise_frozen" in _frames(exc)


@pytest.mark.parametrize("frozen", [False, True], ids=["slots", "frozen-slots"])
def test_an_exception_of_a_dataclass_with_slots_keeps_its_fields(frozen, make_executor):
    """An exception class written as ``@dataclass(slots=True)`` keeps its fields in slots,
    not in its ``__dict__``: it came back without them (``exc.row`` raised AttributeError,
    and so did its repr), where a ProcessPoolExecutor's, made again by calling the class,
    has them."""
    ex = make_executor(1)
    exc = ex.submit(tasks.raise_row_error, 17, "no date", frozen).exception(GUARD)
    if frozen:
        assert type(exc) is tasks.FrozenRowError and exc.row == 17
        assert repr(exc) == "FrozenRowError(row=17)"
    else:
        assert type(exc) is tasks.RowError and (exc.row, exc.reason) == (17, "no date")
        assert repr(exc) == "RowError(row=17, reason='no date')"
    assert "raise_row_error" in _frames(exc)


def test_an_initializer_raising_a_frozen_dataclass_exception_fails_the_task_with_it(
        make_executor):
    """The worker notes where an initializer's exception came from: on a frozen dataclass's
    exception, add_note had raised FrozenInstanceError, which the task failed with."""
    ex = make_executor(1, initializer=tasks.raise_frozen, initargs=(5,))
    f = ex.submit(tasks.square, 3)
    exc = f.exception(GUARD)
    assert type(exc) is tasks.FrozenError and exc.code == 5
    assert exc.__notes__[0].startswith("raised by the executor's initializer")


def test_a_group_member_that_is_also_its_context_keeps_its_frames(make_executor):
    """An asyncio.TaskGroup whose body raised: that exception is a member of the group and
    its ``__context__``.  Boxed first as the context, the member had come back bare (no
    frame, no cause) and the context as a copy of it; now both are the same exception,
    with its frames and cause, as on the node."""
    ex = make_executor(1)
    with pytest.raises(ExceptionGroup) as info:
        ex.submit(tasks.raise_from_a_task_group_body, "d.csv").result(GUARD)
    [member] = info.value.exceptions
    assert type(member) is ValueError and member.args == ("cannot parse d.csv",)
    assert "_parse_rows" in _frames(member)
    assert isinstance(member.__cause__, FileNotFoundError)
    assert member.__cause__.filename == "d.csv"
    assert info.value.__context__ is member and info.value.__suppress_context__
    assert "_parse_rows" in "".join(traceback.format_exception(info.value))


def test_a_group_with_a_member_that_cannot_travel_keeps_the_others(make_executor):
    """A member of an ExceptionGroup that pickle cannot make again (an ``__init__`` with a
    keyword), or cannot pickle at all, had made the whole group a RemoteError, though
    the same exception raised alone comes back as itself: no ``except*`` matched any of
    it.  Now the group is itself; the first member comes back as itself, the second as
    itself too (as it would alone), the third as a RemoteError, each with its frames."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_group_with_members_pickle_cannot_remake, "holds a lock")
    group = f.exception(GUARD)
    assert type(group) is ExceptionGroup
    assert group.message == "unhandled errors in a TaskGroup"
    plain, needs_code, unpicklable = group.exceptions
    assert type(plain) is KeyError and plain.args == ("plain",)
    assert type(needs_code) is tasks.NeedsCode
    assert (needs_code.args, needs_code.code) == (("bad code",), 7)
    assert isinstance(unpicklable, RemoteError)
    assert (unpicklable.type_name, unpicklable.message) == ("tests.tasks.UnpicklableError",
                                                            "holds a lock")
    for member in group.exceptions:
        assert "fails" in _frames(member)
    assert group.__notes__[-1].startswith(f"kotta job {f.job_id} ")


@pytest.mark.parametrize("nested", [False, True], ids=["member", "member-of-a-member"])
def test_a_group_member_whose_init_writes_its_message_comes_back_as_raised(nested,
                                                                            make_executor):
    """A member of an ExceptionGroup whose ``__init__`` writes its message from its
    argument (``HTTP {status}``) came back with it written twice, "HTTP HTTP 404", as
    pickle makes it again by calling the class with the message; the same exception
    raised alone comes back as raised, and so do the members now, of a group in the
    group too (a TaskGroup in a task of another)."""
    ex = make_executor(1)
    group = ex.submit(tasks.raise_group_of_reformatting_members, [404, 503],
                      nested).exception(GUARD)
    assert type(group) is ExceptionGroup
    if nested:
        [group] = group.exceptions
        assert type(group) is ExceptionGroup
    members = sorted(group.exceptions, key=lambda m: m.status)
    assert [type(m) for m in members] == [tasks.HTTPStatusError] * 2
    assert [(m.args, m.status) for m in members] == [(("HTTP 404",), 404), (("HTTP 503",), 503)]
    for member in members:
        assert "fails" in _frames(member)


def test_a_group_with_members_only_the_node_can_import(make_executor, tmp_path):
    """The members of a TaskGroup's ExceptionGroup of a class the client cannot import (of
    a package ``requirements`` installed on the node only) come back as RemoteErrors in
    the group, which is itself with its other members; the whole result had been a
    SerializationError, hiding every failure's message."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_group_from_a_node_only_module, str(tmp_path / "node-only"),
                  ["bad row 3", "bad row 9"])
    group = f.exception(GUARD)
    assert type(group) is ExceptionGroup
    *parsed, missing = group.exceptions
    assert type(missing) is KeyError and "lookup" in _frames(missing)
    assert [(m.type_name, m.message) for m in parsed] == [
        ("node_only_errors.ParseError", "bad row 3"), ("node_only_errors.ParseError", "bad row 9")]
    for member in parsed:
        assert isinstance(member, RemoteError) and "parse" in _frames(member)
        assert "cannot be imported on the client" in member.__notes__[-1]
    assert group.__notes__[-1].startswith(f"kotta job {f.job_id} ")


@pytest.mark.parametrize("wrapped, slots", [(False, False), (True, False), (False, True)],
                         ids=["raised", "as-cause", "slots"])
def test_an_exception_holding_an_object_only_the_node_can_import(wrapped, slots,
                                                                 make_executor, tmp_path):
    """An exception of a class the client has, holding an object (in its args) of a class
    only the node can import: the future raised SerializationError "the result of job ...
    could not be unpickled on the client: No module named ...", which named no exception
    the task raised, nor its message or frames; now it is a RemoteError with its type
    name, message and frames, and a note naming the class (as the cause of an exception
    the client can read, there, the rest of the chain itself)."""
    ex = make_executor(1)
    f = ex.submit(tasks.raise_holding_a_node_only_object, str(tmp_path / "node-only"),
                  "bad row", wrapped, slots)
    exc = f.exception(GUARD)
    if wrapped:
        assert type(exc) is RuntimeError and str(exc) == "the task could not go on"
        assert exc.__notes__[-1].startswith(f"kotta job {f.job_id} ")
        exc = exc.__cause__
    assert isinstance(exc, RemoteError), repr(exc)
    assert exc.type_name == "builtins.ValueError"
    assert exc.message.startswith("('bad row', ")
    assert "raise_holding_a_node_only_object" in _frames(exc)
    assert "raise ValueError(message, node_only_rows.Row(17))" in exc.remote_traceback
    assert any("node_only_rows.Row" in n and "cannot be imported on the client" in n
               for n in exc.__notes__)


@pytest.mark.parametrize("kind, cls", [("attribute", AttributeError), ("name", NameError)])
def test_an_attribute_or_name_error_keeps_its_name(kind, cls, make_executor):
    """An AttributeError or NameError came back with ``name`` None (a field Python sets
    apart from its args, which pickle left out): ``except AttributeError as e: if e.name
    == ...`` took it for another; now it is the missing name."""
    ex = make_executor(1)
    exc = ex.submit(tasks.use_a_missing_name, kind).exception(GUARD)
    assert type(exc) is cls
    assert exc.name == "rows_read"
    assert "rows_read" in str(exc)


def test_an_os_error_whose_init_writes_its_message_comes_back_as_raised(make_executor):
    """An OSError subclass whose ``__init__`` writes its message from its argument came
    back with it written twice, "fetch failed: fetch failed: refused" (pickle makes it
    again by calling its class with the message), where an Exception subclass so written
    comes back as raised; now it does too."""
    ex = make_executor(1)
    exc = ex.submit(tasks.raise_fetch_failed, 111, "refused", "http://127.0.0.1:9/").exception(GUARD)
    assert type(exc) is tasks.FetchFailed
    assert str(exc) == "[Errno 111] fetch failed: refused: 'http://127.0.0.1:9/'"
    assert (exc.errno, exc.strerror, exc.filename) == (111, "fetch failed: refused",
                                                       "http://127.0.0.1:9/")
    assert "raise_fetch_failed" in _frames(exc)


def test_an_os_error_whose_init_takes_other_arguments_comes_back_as_raised(make_executor):
    """An OSError subclass (FileNotFoundError, ConnectionError, TimeoutError) whose
    ``__init__`` takes other arguments than pickle calls it with came back as a
    RemoteError, where an Exception subclass so written comes back as itself; now it is
    itself too, with its errno, filename, attributes and frames."""
    ex = make_executor(1)
    exc = ex.submit(tasks.raise_missing_input, "/data/run-7.csv", 3).exception(GUARD)
    assert type(exc) is tasks.MissingInput, repr(exc)
    assert (exc.errno, exc.strerror, exc.filename) == (2, "no input for stage 3",
                                                       "/data/run-7.csv")
    assert str(exc) == "[Errno 2] no input for stage 3: '/data/run-7.csv'"
    assert exc.stage == 3
    assert "raise_missing_input" in _frames(exc)
    # one whose args are not OSError's: urllib's HTTPError (its filename the url)
    exc = ex.submit(tasks.raise_http_error, "http://127.0.0.1:9/runs", 404).exception(GUARD)
    assert type(exc) is urllib.error.HTTPError, repr(exc)
    assert (exc.code, exc.filename, exc.url, str(exc)) == (
        404, "http://127.0.0.1:9/runs", "http://127.0.0.1:9/runs", "HTTP Error 404: Not Found")


def test_an_os_error_whose_init_takes_other_arguments_comes_back_as_raised_in_a_group(
        make_executor):
    """As above, a member of an ExceptionGroup: it came back of its class, but with no
    errno nor filename, its message "(2, 'no input for stage 3')"."""
    ex = make_executor(1)
    group = ex.submit(tasks.raise_missing_input, "/data/run-7.csv", 3, True).exception(GUARD)
    assert type(group) is ExceptionGroup
    member, plain = group.exceptions
    assert type(member) is tasks.MissingInput, repr(member)
    assert (member.errno, member.filename, member.stage) == (2, "/data/run-7.csv", 3)
    assert str(member) == "[Errno 2] no input for stage 3: '/data/run-7.csv'"
    assert type(plain) is FileNotFoundError and str(plain) == "[Errno 2] gone: '/data/run-7.csv.bak'"


def test_a_group_member_that_cannot_travel_and_is_its_context_keeps_its_frames(make_executor):
    """As above, the TaskGroup's body raising what cannot be pickled: its RemoteError, in
    the group, had come back without a remote frame, and the group's context another
    RemoteError; now they are one, with the frames."""
    ex = make_executor(1)
    group = ex.submit(tasks.raise_unpicklable_from_a_task_group_body, "locked").exception(GUARD)
    assert type(group) is ExceptionGroup
    [member] = group.exceptions
    assert isinstance(member, RemoteError) and member.message == "locked"
    assert "main" in _frames(member)
    assert group.__context__ is member
