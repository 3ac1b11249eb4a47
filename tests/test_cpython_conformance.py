"""KottaExecutor against what CPython's own executor tests check of ProcessPoolExecutor
(Lib/test/test_concurrent_futures, 3.11's file and 3.12+'s package), for what
tests/test_stdlib_conformance.py does not already cover.

Real components only: the executor starts its own node on a fresh embedded enclave.
Each test names the CPython test it follows.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import pickle
import re
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import pytest

from tests import tasks
from tests.conftest import GUARD, ROOT, subprocess_env


def done_future(result=None, exception=None, cancelled=False) -> cf.Future:
    """A plain future already ended (CPython's SUCCESSFUL_FUTURE, EXCEPTION_FUTURE,
    CANCELLED_AND_NOTIFIED_FUTURE)."""
    f = cf.Future()
    if cancelled:
        f.cancel()
        f.set_running_or_notify_cancel()
    elif exception is not None:
        f.set_exception(exception)
    else:
        f.set_result(result)
    return f


def test_submit_and_map_as_executor_test_does(make_executor):
    # ExecutorTest.test_submit, test_submit_keyword, test_map, test_map_exception
    ex = make_executor(2)
    assert ex.submit(pow, 2, 8).result(GUARD) == 256
    assert ex.submit(tasks.add, 2, b=8).result(GUARD) == 10
    assert ex.submit(tasks.capture, 1, self=2, fn=3).result(GUARD) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        ex.submit(fn=tasks.capture, arg=1)
    with pytest.raises(TypeError):
        ex.submit(arg=1)
    expected = list(map(pow, range(10), range(10)))
    assert list(ex.map(pow, range(10), range(10), timeout=GUARD)) == expected
    assert list(ex.map(pow, range(10), range(10), chunksize=3, timeout=GUARD)) == expected
    it = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=GUARD)
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_chunksize_as_process_pool_executor_test_does(make_executor):
    # ProcessPoolExecutorTest.test_map_chunksize: a chunksize over the items is fine; one
    # below 1 is a ValueError (here at the call, before anything is sent)
    ex = make_executor(2)
    ref = list(map(pow, range(40), range(40)))
    for chunksize in (6, 50, 40):
        assert list(ex.map(pow, range(40), range(40), chunksize=chunksize, timeout=GUARD)) == ref
    with pytest.raises(ValueError):
        list(ex.map(pow, range(40), range(40), chunksize=-1))


def test_map_timeout_yields_what_came_back_in_time(make_executor, tmp_path):
    # ExecutorTest.test_map_timeout: the items back in time are yielded, then TimeoutError
    ex = make_executor(2)
    ready, release = tmp_path / "ready", tmp_path / "release"
    ready.write_text("ready")
    results = []
    try:
        with pytest.raises(cf.TimeoutError):
            for value in ex.map(tasks.wait_for_file, [ready, ready, release],
                                timeout=1.0):
                results.append(value)
    finally:
        release.write_text("late")
    assert results == ["ready", "ready"]


def test_a_dropped_object_whose_method_was_submitted_is_collected(make_executor):
    # ExecutorTest.test_no_stale_references: the future discarded, the executor holds
    # nothing of the call once it ran
    ex = make_executor(1)
    collected = threading.Event()
    owner = tasks.Owner()
    ref = weakref.ref(owner, lambda _: collected.set())
    ex.submit(owner.method)
    del owner
    assert collected.wait(GUARD), ref()


def test_max_workers_below_1_is_refused(enclave_dir):
    # ExecutorTest.test_max_workers_negative
    from kotta_executor import KottaExecutor

    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            KottaExecutor(max_workers=number, enclave=enclave_dir)


def test_wait_as_wait_tests_do(make_executor, tmp_path):
    # WaitTests: executor futures among plain ones already ended
    ex = make_executor(2)
    release = tmp_path / "release"
    cancelled = done_future(cancelled=True)
    success = done_future(42)
    failed = done_future(exception=OSError())
    try:
        quick = ex.submit(tasks.add, 21, 21)
        slow = ex.submit(tasks.wait_for_file, release)
        done, not_done = cf.wait([quick, slow], timeout=GUARD,
                                 return_when=cf.FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}
        done, not_done = cf.wait([cancelled, success, slow], return_when=cf.FIRST_COMPLETED)
        assert done == {cancelled, success} and not_done == {slow}
        bad = ex.submit(divmod, 21, 0)
        done, not_done = cf.wait([quick, bad, slow], timeout=GUARD,
                                 return_when=cf.FIRST_EXCEPTION)
        assert done == {quick, bad} and not_done == {slow}
        done, not_done = cf.wait([failed, slow], return_when=cf.FIRST_EXCEPTION)
        assert done == {failed} and not_done == {slow}
        done, not_done = cf.wait([cancelled, failed, success, quick, slow], timeout=0.2)
        assert done == {cancelled, failed, success, quick} and not_done == {slow}
    finally:
        release.write_text("done")
    done, not_done = cf.wait([cancelled, failed, success, quick, bad, slow], timeout=GUARD)
    assert not not_done


def test_as_completed_as_as_completed_tests_do(make_executor, tmp_path):
    # AsCompletedTests: no timeout, a zero timeout, duplicate futures
    ex = make_executor(2)
    plain = [done_future(cancelled=True), done_future(exception=OSError()), done_future(42)]
    ours = [ex.submit(tasks.add, 2, 21), ex.submit(tasks.add, 7, 6)]
    assert set(cf.as_completed(plain + ours, timeout=GUARD)) == set(plain + ours)
    release = tmp_path / "release"
    slow = ex.submit(tasks.wait_for_file, release)
    seen = set()
    try:
        with pytest.raises(cf.TimeoutError, match=r"1 \(of 4\) futures unfinished"):
            for f in cf.as_completed(plain + [slow], timeout=0):
                seen.add(f)
        assert seen == set(plain)
    finally:
        release.write_text("done")
    assert len(list(cf.as_completed(itertools.repeat(slow, 3), timeout=GUARD))) == 1


@pytest.mark.parametrize("kind, error", [("bool", tasks.FalseyBoolError),
                                         ("len", tasks.FalseyLenError)])
def test_an_exception_that_is_false_is_raised_by_result(make_executor, kind, error):
    # ExecutorTest.test_swallows_falsey_exceptions (gh-132063): result() on Python 3.11
    # tested ``if self._exception:``, so such an exception was lost and result() gave None
    ex = make_executor(1)
    with pytest.raises(error, match="falsey"):
        ex.submit(tasks.raise_falsey, kind, "falsey").result(GUARD)
    future = ex.submit(tasks.raise_falsey, kind, "falsey too")
    assert isinstance(future.exception(GUARD), error)
    with pytest.raises(error, match="falsey too"):
        future.result(0)
    with pytest.raises(error, match="in map"):
        list(ex.map(tasks.raise_falsey, [kind], ["in map"]))


def test_shutdown_as_executor_shutdown_test_does(make_executor):
    # ExecutorShutdownTest.test_run_after_shutdown, test_hang_issue12364,
    # test_hang_gh94440, test_shutdown_race_issue12456
    ex = make_executor(2)
    fs = [ex.submit(time.sleep, 0.01) for _ in range(50)]
    ex.map(str, [2] * 3)  # (its values never taken)
    ex.submit(int).cancel()
    ex.shutdown()
    assert [f.result(0) for f in fs] == [None] * 50
    with pytest.raises(RuntimeError, match="cannot schedule new futures"):
        ex.submit(pow, 2, 5)
    with pytest.raises(RuntimeError, match="cannot schedule new futures"):
        ex.map(pow, [2], [5])


def test_shutdown_cancel_futures_cancels_what_did_not_start(make_executor, tmp_path):
    # ExecutorShutdownTest.test_cancel_futures: the futures not cancelled end well
    ex = make_executor(1)
    started, release = tmp_path / "started", tmp_path / "release"
    first = ex.submit(tasks.touch_then_wait, started, release)
    tasks.wait_for_file(started)
    fs = [ex.submit(time.sleep, 0.01) for _ in range(20)]
    threading.Timer(0.5, release.write_text, ("done",)).start()
    ex.shutdown(cancel_futures=True)
    assert first.result(0) == "done"
    assert all(f.done() for f in fs)
    assert all(f.cancelled() or f.exception() is None for f in fs)
    assert sum(f.cancelled() for f in fs) > 10


@pytest.mark.parametrize("how", ["shutdown(wait=False)", "del"])
def test_a_map_gives_every_value_after_shutdown_without_wait_or_del(enclave_dir, how):
    # ProcessPoolShutdownTest.test_shutdown_no_wait, test_del_shutdown
    from kotta_executor import KottaExecutor

    ex = KottaExecutor(2, enclave=enclave_dir)
    res = ex.map(abs, range(-5, 5), timeout=GUARD)
    manager = ex._manager
    if how == "del":
        del ex
    else:
        ex.shutdown(wait=False)
    assert list(res) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    manager.join(GUARD)
    assert not manager.is_alive()


def test_max_tasks_per_child_with_an_early_shutdown(make_executor):
    # ProcessPoolExecutorTest.test_max_tasks_early_shutdown
    ex = make_executor(3, max_tasks_per_child=1)
    fs = [ex.submit(tasks.add, i, i * i - i) for i in range(6)]
    ex.shutdown()
    assert [f.result(0) for f in fs] == [i * i for i in range(6)]


@pytest.mark.parametrize("op", ["terminate_workers", "kill_workers"])
def test_terminating_after_a_worker_died_or_before_any_task_raises_nothing(make_executor, op):
    # ProcessPoolExecutorTest.test_force_shutdown_workers_dead_workers, _not_started_yet
    # and _stops_pool
    ex = make_executor(1)
    with pytest.raises(BrokenProcessPool):
        ex.submit(tasks.exit_hard, 1).result(GUARD)
    getattr(ex, op)()
    with pytest.raises(RuntimeError):
        ex.submit(time.sleep, 0)
    getattr(make_executor(1, start_node=False), op)()


@pytest.mark.parametrize("fn, args, error", [
    (id, (tasks.RaisesWhenPickled(),), pickle.PicklingError),
    (id, (tasks.CrashesWhenLoaded(),), BrokenProcessPool),
    (tasks.segfault, (), BrokenProcessPool),
    (tasks.raise_system_exit, (1,), SystemExit),
    (tasks.raise_value_error, (), ValueError),
    (tasks.return_raises_when_pickled, (), pickle.PicklingError),
], ids=["error-at-task-pickle", "crash-at-task-unpickle", "crash-in-the-call", "exit-in-the-call",
        "error-in-the-call", "error-at-result-pickle"])
def test_crashes_raise_as_executor_deadlock_test_says(make_executor, fn, args, error):
    # ExecutorDeadlockTest.test_crash (the cases where KottaExecutor raises what
    # ProcessPoolExecutor does; an error at unpickling is a SerializationError, a
    # PicklingError, see docs/guide.md "When things fail"), and the executor works on
    ex = make_executor(1)
    with pytest.raises(error):
        ex.submit(fn, *args).result(GUARD)
    assert ex.submit(pow, 2, 3).result(GUARD) == 8


def test_a_worker_that_dies_after_shutdown_began_raises_broken_process_pool(make_executor):
    # ExecutorDeadlockTest.test_shutdown_deadlock
    ex = make_executor(1)
    f = ex.submit(tasks.sleep_then_segfault, 0.1)
    ex.shutdown(wait=True)
    with pytest.raises(BrokenProcessPool):
        f.result(0)


def test_submit_in_an_atexit_function_raises_runtime_error(enclave_dir):
    # ExecutorShutdownTest.test_submit_after_interpreter_shutdown
    code = f"""if 1:
        import atexit
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from kotta_executor import KottaExecutor
        t = KottaExecutor(2, enclave={str(enclave_dir)!r})
        t.submit(id, 42).result()
        """
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=str(ROOT),
                          capture_output=True, timeout=GUARD)
    assert "RuntimeError: cannot schedule new futures" in proc.stderr.decode()
    assert proc.stdout.strip() == b"runtime-error"


def test_the_repr_of_a_future_whose_task_raised_an_exception_that_is_false_says_raised(
        make_executor):
    # FutureTests.test_repr ("state=finished raised OSError"): the stdlib's repr tests
    # ``if self._exception:`` too, and said "returned NoneType" for such a future
    ex = make_executor(1)
    future = ex.submit(tasks.raise_falsey, "len", "falsey")
    future.exception(GUARD)
    assert re.fullmatch(r"<KottaFuture job=[0-9a-f]{32} at 0x[0-9a-f]+ state=finished raised "
                        r"FalseyLenError>", repr(future)), repr(future)
