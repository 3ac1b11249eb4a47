"""KottaExecutor against CPython's own executor tests (Lib/test/test_concurrent_futures):
what a user switching from ``ProcessPoolExecutor`` relies on.

Real components only: the executor starts its own node on a fresh embedded enclave.
Each test names the CPython test it follows.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import gc
import os
import re
import weakref

import pytest

from kotta_executor import KottaExecutor
from tests import tasks
from tests.conftest import GUARD, wait_for


class Dummy:
    """A result the client can hold a weak reference to (unpickled there)."""

    def __init__(self, value):
        self.value = value


def make_dummy(i):
    return Dummy(i)


@pytest.mark.parametrize("n", [10, 600], ids=["one-item-tasks", "packed-tasks"])
def test_map_iterator_keeps_no_reference_to_results_it_yielded(make_executor, n):
    """ExecutorTest.test_free_reference (bpo-14406): the result iterator must not keep
    an internal reference to the objects it yielded.  (600 items: the executor packs
    several into a task, max_workers=2.)"""
    ex = make_executor(2)
    kept = []
    for obj in ex.map(make_dummy, range(n)):
        wr = weakref.ref(obj)
        del obj  # (no cycle holds a Dummy: freed at once, unless someone else holds it)
        kept.append(wr() is not None)
    assert not any(kept), f"{sum(kept)} of {n} results were still referenced"


def test_submitted_function_is_not_kept_once_its_future_is_done(make_executor):
    """ExecutorTest.test_no_stale_references (bpo-16284): the executor must not hang on
    to what it was given.  CPython's test submits a bound method; a nested function (a
    closure, with whatever it captured) must not be kept either."""
    ex = make_executor(2)
    collected = []

    def submit_a_nested_function():
        payload = tuple(range(1000))

        def task():
            return len(payload)

        wr = weakref.ref(task, lambda _: collected.append(True))
        assert ex.submit(task).result(timeout=GUARD) == 1000
        return wr

    wr = submit_a_nested_function()
    gc.collect()
    assert wr() is None and collected, "the executor still references the submitted function"


def test_future_repr_says_what_a_stdlib_future_says(make_executor, tmp_path):
    """FutureTests.test_repr: ``state=cancelled`` (not the internal
    ``CANCELLED_AND_NOTIFIED``), ``returned TYPE`` and ``raised TYPE`` once finished."""
    ex = make_executor(2)
    ok = ex.submit(divmod, 7, 2)
    bad = ex.submit(divmod, 1, 0)
    cf.wait([ok, bad], timeout=GUARD)
    assert re.search(r"state=finished returned tuple\b", repr(ok)), repr(ok)
    assert re.search(r"state=finished raised ZeroDivisionError\b", repr(bad)), repr(bad)
    assert ok.job_id in repr(ok)

    release = tmp_path / "release"
    blockers = [ex.submit(tasks.touch_then_wait, str(tmp_path / f"s{i}"), str(release))
                for i in range(2)]
    wait_for(lambda: all((tmp_path / f"s{i}").exists() for i in range(2)),
             what="both workers to be busy")
    queued = ex.submit(divmod, 1, 1)
    try:
        assert queued.cancel()
        assert re.search(r"state=cancelled>?", repr(queued)), repr(queued)
        assert "cancelled_and_notified" not in repr(queued).lower()
    finally:
        (tmp_path / "release.tmp").write_text("go")  # atomically: tasks poll for it
        os.replace(tmp_path / "release.tmp", release)
        cf.wait(blockers, timeout=GUARD)


def _drop_and_see_it_stop(held: list, why: str) -> None:
    """Drop the executor in ``held`` (the caller's only reference to it): it must be
    collected (``why``: what no longer holds it), its manager thread end and the local
    nodes it started stop."""
    ex = held.pop()
    manager, nodes = ex._manager, list(ex._nodes.values())
    wr = weakref.ref(ex)
    del ex
    try:
        wait_for(lambda: (gc.collect(), wr() is None)[1],
                 what=f"the executor to be collected ({why})")
        manager.join(GUARD)
        assert not manager.is_alive()
        for proc in nodes:
            assert proc.wait(GUARD) is not None
    finally:
        left = wr()
        if left is not None:
            left.shutdown(wait=True)
        del left


def test_an_executor_dropped_without_shutdown_stops_its_manager_and_nodes(enclave_dir):
    """ExecutorShutdownTest.test_del_shutdown: once nothing references the executor, its
    resources go (ProcessPoolExecutor's manager thread holds it weakly, and shuts down when
    it is collected).  KottaExecutor's manager thread held the executor itself, so a
    dropped executor kept its thread, its local node and that node's workers until the
    interpreter exited: a program that made an executor per call, without ``with``,
    leaked a thread each time, and its node ran on."""
    ex = KottaExecutor(2, enclave=enclave_dir)
    assert list(ex.map(abs, range(-5, 5))) == [abs(v) for v in range(-5, 5)]
    # (once the manager's turn, which holds it, ends)
    held = [ex]
    del ex
    _drop_and_see_it_stop(held, "not held by its manager thread")


def test_an_executor_dropped_while_its_done_futures_are_kept_stops_its_nodes(enclave_dir):
    """A ProcessPoolExecutor's futures do not hold it: dropped, it is collected (its
    workers end) while its results are kept.  A KottaFuture held its executor, so a
    program that kept the futures of an executor it dropped (a list of results in a
    notebook) kept the executor, its manager thread, its local node and that node's
    workers alive as long as it kept them.  A done future holds its executor weakly; it
    still says how its job ended."""
    ex = KottaExecutor(2, enclave=enclave_dir)
    fs = [ex.submit(tasks.square, i) for i in range(4)]
    killed = ex.submit(tasks.sleep_and_return, 60)
    cancelled = ex.submit(tasks.add, killed, 1)  # (never sent while killed runs)
    assert [f.result(timeout=GUARD) for f in fs] == [0, 1, 4, 9]
    wait_for(killed.running, what="the task to be killed to run")
    assert cancelled.cancel() and killed.kill()
    cf.wait([killed], timeout=GUARD)
    held = [ex]
    del ex
    _drop_and_see_it_stop(held, "not held by its done futures")
    assert [f.result() for f in fs] == [0, 1, 4, 9]
    assert [f.status() for f in (fs[0], killed, cancelled)] == [
        "completed", "cancelled", "cancelled"]
    assert not fs[0].cancel() and not fs[0].kill() and cancelled.cancel()



def test_an_executor_dropped_while_an_exception_of_its_tasks_is_kept_stops_its_nodes(
        enclave_dir):
    """A task's exception comes with its remote traceback, rebuilt from frames run on the
    manager thread: their callers' frames came with it, and their locals (the executor,
    the reply bodies of the turn that read it, up to a thousand results).  A program
    that kept an exception (a DependencyError, whose cause it is, too) kept the dropped
    executor, its manager thread and its local node alive, and those results."""
    ex = KottaExecutor(2, enclave=enclave_dir)
    failed = ex.submit(tasks.raise_value_error, "kept")
    after = ex.submit(tasks.add, failed, 1)
    err = after.exception(timeout=GUARD)
    assert type(err.__cause__) is ValueError
    frames = []
    tb = err.__cause__.__traceback__
    while tb is not None:  # the remote traceback: the task's frames, as before
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "raise_value_error"
    held = [ex]
    del ex
    _drop_and_see_it_stop(held, "not held by an exception of its tasks")
    assert str(err.__cause__) == "kept"

def test_initializer_runs_once_in_each_worker_before_its_tasks(make_executor):
    """InitializerMixin.test_initializer: ``initializer(*initargs)`` runs in each worker
    process before the tasks it runs, once per process."""
    ex = make_executor(2, initializer=tasks.set_init_status, initargs=("initialized",))
    got = [f.result(timeout=GUARD) for f in [ex.submit(tasks.get_init_status) for _ in range(20)]]
    assert {(status, runs) for status, runs, _ in got} == {("initialized", 1)}
    # and for map's packed tasks too
    assert {(s, r) for s, r, _ in ex.map(tasks.get_init_status, range(300))} == {
        ("initialized", 1)}


def test_mp_context_initializer_and_initargs_may_be_given_by_position(make_executor):
    """``ProcessPoolExecutor(max_workers, mp_context, initializer, initargs)``: the three
    are positional there (only ``max_tasks_per_child`` is keyword-only), and code written
    for it passes them so (``ProcessPoolExecutor(4, mp.get_context("spawn"))``).  They
    were keyword-only here: such code failed with "takes from 1 to 2 positional
    arguments"."""
    import inspect
    import multiprocessing

    ours = list(inspect.signature(KottaExecutor).parameters.values())[:4]
    theirs = list(inspect.signature(cf.ProcessPoolExecutor).parameters.values())[:4]
    assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs]
    ex = make_executor(1, multiprocessing.get_context("spawn"), tasks.set_init_status,
                       ("positional",))
    status, runs, _ = ex.submit(tasks.get_init_status).result(timeout=GUARD)
    assert (status, runs) == ("positional", 1)


def test_an_initializer_that_raises_fails_the_task_with_its_exception_and_runs_again(
        make_executor, tmp_path):
    """ProcessPoolExecutor breaks the pool (BrokenProcessPool) when its initializer raises.
    Here the task that was to run after it fails with the initializer's own exception, which
    says where it came from; the initializer has not run, so the worker tries it again
    before its next task."""
    marker = tmp_path / "failed-once"
    ex = make_executor(1, initializer=tasks.init_failing_once, initargs=(str(marker), "up"))
    first = ex.submit(tasks.get_init_status)
    exc = first.exception(timeout=GUARD)
    assert type(exc) is ConnectionError and str(exc) == "the database is not up yet"
    assert any("raised by the executor's initializer" in n for n in exc.__notes__)
    assert marker.exists()
    status, runs, _ = ex.submit(tasks.get_init_status).result(timeout=GUARD)
    assert (status, runs) == ("up", 1)


def test_an_initializer_that_cannot_be_unpickled_on_the_node_says_so(make_executor):
    """An initializer (or its arguments) that the node cannot unpickle (a module it lacks):
    the task failed with that error, noted "raised by the executor's initializer", which
    never ran.  Now it is a SerializationError saying so, as for the task's own function,
    with the error as its cause; and the task never ran."""
    from kotta_executor import SerializationError

    ex = make_executor(1, initializer=tasks.set_init_status,
                       initargs=(tasks.LoadsBadly("no unpickling here"),))
    exc = ex.submit(tasks.get_init_status).exception(timeout=GUARD)
    assert type(exc) is SerializationError
    assert str(exc) == ("the executor's initializer could not be unpickled on the node: "
                        "RuntimeError: no unpickling here")
    assert type(exc.__cause__) is RuntimeError and str(exc.__cause__) == "no unpickling here"
    assert not any("raised by the executor's initializer" in n for n in exc.__notes__)


def test_an_initializer_that_cannot_be_sent_is_refused_at_once(make_executor):
    """Bad input gets a clear error when the executor is made, before any task."""
    import threading

    from kotta_executor import SerializationError

    with pytest.raises(TypeError, match="initializer 5 is not callable"):
        make_executor(1, initializer=5)
    with pytest.raises(SerializationError, match=r"argument 0 \(<unlocked _thread.lock"):
        make_executor(1, initializer=tasks.set_init_status, initargs=(threading.Lock(),))
    with pytest.raises(ValueError, match="load big data inside the initializer"):
        make_executor(1, initializer=tasks.set_init_status, initargs=(b"x" * (1 << 20),))


def test_a_child_the_initializer_forked_runs_no_task(make_executor, tmp_path):
    """A child an initializer forks and that returns from it, as the parent does, comes
    back into the worker's code: it ran the task's first call too (a second run), and
    could go on to read the worker's next tasks.  It ends there now."""
    import psutil

    out, child = tmp_path / "pids", tmp_path / "child"
    ex = make_executor(1, initializer=tasks.init_forking, initargs=(str(child),))
    pid = ex.submit(tasks.append_pid_line, str(out)).result(timeout=GUARD)
    forked = int(child.read_text())

    def ended() -> bool:
        try:
            return psutil.Process(forked).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(ended, what="the initializer's child to end")
    assert out.read_text().split() == [str(pid)]


def test_a_dropped_executor_still_sends_and_runs_what_was_submitted(
        enclave_dir, make_executor, tmp_path):
    """ProcessPoolExecutor runs what was submitted to an executor dropped since.  The
    manager holds its executor while it has work outstanding: a task waiting for another
    task's result, not yet sent, was dropped with it, though submit() had given its job
    id.  Once idle, it is collected, and its manager ends."""
    ex = KottaExecutor(2, enclave=enclave_dir)
    started, release, out = tmp_path / "started", tmp_path / "release", tmp_path / "out"
    a = ex.submit(tasks.touch_then_wait, str(started), str(release))
    b = ex.submit(tasks.append_line, str(out), a)  # waits for a, in the client
    b_id = b.job_id
    wait_for(started.exists, what="the first task to start")
    manager, wr = ex._manager, weakref.ref(ex)
    del a, b, ex
    gc.collect()
    assert wr() is not None  # (work outstanding: its manager holds it)
    tasks.release(release, "go")
    wait_for(out.exists, what="the waiting task to run")
    wait_for(lambda: (gc.collect(), wr() is None)[1], what="the executor, idle, to go")
    manager.join(GUARD)
    assert not manager.is_alive()
    assert out.read_text() == "go\n"
    assert make_executor(1, start_node=False).attach(b_id).result(timeout=GUARD) == "go"


def test_max_tasks_per_child_replaces_a_worker_after_that_many_tasks(make_executor):
    """ProcessPoolExecutorTest.test_max_tasks_per_child: with one worker and
    ``max_tasks_per_child=3``, three tasks run in one process and the fourth in a new one."""
    ex = make_executor(1, max_tasks_per_child=3)
    pids = [ex.submit(os.getpid).result(timeout=GUARD) for _ in range(4)]
    assert pids[0] == pids[1] == pids[2] != pids[3]


def test_max_tasks_per_child_holds_for_a_burst_and_for_map(make_executor):
    """Tasks that arrive together are piped to workers several at a time: still no worker
    runs more than the limit.  map (chunksize=1) packs no items into a task: each counts,
    as each is a work item for ProcessPoolExecutor."""
    ex = make_executor(2, max_tasks_per_child=3)
    pids = collections.Counter(
        f.result(timeout=GUARD) for f in [ex.submit(os.getpid) for _ in range(40)])
    assert sum(pids.values()) == 40 and max(pids.values()) <= 3 and len(pids) >= 14
    items = collections.Counter(ex.map(tasks.get_init_status, range(60)))
    per_worker = collections.Counter(pid for (*_, pid) in items.elements())
    assert sum(per_worker.values()) == 60 and max(per_worker.values()) <= 3


def test_workers_live_on_without_max_tasks_per_child(make_executor):
    """ProcessPoolExecutorTest.test_max_tasks_per_child_defaults: by default a worker
    serves every task."""
    ex = make_executor(1)
    assert len({ex.submit(os.getpid).result(timeout=GUARD) for _ in range(5)}) == 1


def test_max_tasks_per_child_counts_what_a_worker_ran_for_other_executors(make_executor):
    """A node's workers serve every executor of their owner: a task whose limit is 1 does
    not run in a worker that ran another executor's tasks, but in a fresh one."""
    warm = make_executor(1)
    ran = {warm.submit(os.getpid).result(timeout=GUARD) for _ in range(3)}
    fresh = make_executor(1, start_node=False, max_tasks_per_child=1)
    pids = [fresh.submit(os.getpid).result(timeout=GUARD) for _ in range(3)]
    assert len(set(pids)) == 3 and not set(pids) & ran
    assert warm.submit(os.getpid).result(timeout=GUARD) not in pids  # (each one retired)


def test_a_replaced_worker_runs_the_initializer_again(make_executor):
    """Each fresh worker runs the initializer once, before its first task."""
    ex = make_executor(1, initializer=tasks.set_init_status, initargs=("up",),
                       max_tasks_per_child=2)
    got = [ex.submit(tasks.get_init_status).result(timeout=GUARD) for _ in range(6)]
    assert [(status, runs) for status, runs, _ in got] == [("up", 1)] * 6
    assert len({pid for *_, pid in got}) == 3


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "max_tasks_per_child must be >= 1"),
    (-2, ValueError, "max_tasks_per_child must be >= 1"),
    ("3", TypeError, "max_tasks_per_child must be an integer"),
    (2.0, TypeError, "max_tasks_per_child must be an integer"),
])
def test_a_bad_max_tasks_per_child_is_refused_as_process_pool_executor_does(
        make_executor, value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        cf.ProcessPoolExecutor(1, max_tasks_per_child=value)
    with pytest.raises(error, match=f"^{message}$"):
        make_executor(1, max_tasks_per_child=value)


def test_a_worker_that_dies_under_its_task_raises_broken_process_pool(make_executor):
    """ExecutorDeadlockTest (test_crash_during_func_exec_on_worker): code written for
    ``ProcessPoolExecutor`` catches ``BrokenProcessPool`` when a worker dies under a task.
    Here the task fails with a ``WorkerDied``, which is one, naming the exit status; but
    nothing else is broken: the executor runs the next task."""
    from concurrent.futures.process import BrokenProcessPool

    from kotta_executor import WorkerDied

    ex = make_executor(1)
    with pytest.raises(BrokenProcessPool, match="exited with code 3") as caught:
        ex.submit(os._exit, 3).result(timeout=GUARD)
    assert type(caught.value) is WorkerDied and caught.value.exitcode == 3
    assert ex.submit(divmod, 7, 2).result(timeout=GUARD) == (3, 1)


@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_end_the_executors_tasks_at_once(
        make_executor, tmp_path, how):
    """ProcessPoolExecutorTest.test_terminate_workers / test_kill_workers (Python 3.14): the
    running task ends at once, what waits never runs, and the executor takes no more.  A
    worker here serves every executor of its owner: another executor's task runs on."""
    from kotta_executor import TaskKilled

    ex = make_executor(2)
    other = make_executor(1, start_node=False)  # (the same node)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    running = ex.submit(tasks.touch_then_wait, str(mine), str(tmp_path / "never"))
    wait_for(mine.exists, what="the task to start")
    bystander = other.submit(tasks.touch_then_wait, str(theirs), str(tmp_path / "go"))
    wait_for(theirs.exists, what="the other executor's task to start")
    waiting = [ex.submit(tasks.square, i) for i in range(20)]
    getattr(ex, how)()
    with pytest.raises(TaskKilled):
        running.result(timeout=GUARD)
    for f in waiting:  # cancelled, or killed in a worker's pipe: never run
        assert f.cancelled() or type(f.exception(timeout=GUARD)) is TaskKilled
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 2)
    assert not bystander.done()
    tasks.release(tmp_path / "go", "on")
    assert bystander.result(timeout=GUARD) == "on"


@pytest.mark.parametrize("value, error, message", [
    ("foo", TypeError, "buffersize must be an integer or None"),
    (2.0, TypeError, "buffersize must be an integer or None"),
    (0, ValueError, "buffersize must be None or > 0"),
    (-1, ValueError, "buffersize must be None or > 0"),
])
def test_map_checks_buffersize_as_python_3_14_does(make_executor, value, error, message):
    """ExecutorTest.test_map_buffersize_type_validation / _value_validation (3.14)."""
    ex = make_executor(1)
    with pytest.raises(error, match=f"^{message}$"):
        ex.map(str, range(4), buffersize=value)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_with_a_buffersize_gives_every_value_in_order(make_executor, chunksize):
    """ExecutorTest.test_map_buffersize, _on_multiple_iterables, _on_empty_iterable,
    _without_iterable (3.14); and through with_options."""
    ex = make_executor(2)
    for buffersize in (1, 2, 4, 8):
        assert list(ex.map(str, range(4), chunksize=chunksize, buffersize=buffersize)) == [
            "0", "1", "2", "3"]
        assert list(ex.map(tasks.add, range(4), range(4), chunksize=chunksize,
                           buffersize=buffersize)) == [0, 2, 4, 6]
    assert list(ex.map(str, [], buffersize=2)) == []
    assert list(ex.map(str, buffersize=2)) == []
    view = ex.with_options(walltime=1)
    assert list(view.map(str, range(5), buffersize=2)) == ["0", "1", "2", "3", "4"]


def test_map_with_a_buffersize_reads_an_infinite_iterable_lazily(make_executor):
    """ExecutorTest.test_map_buffersize_on_infinite_iterable and
    _on_multiple_infinite_iterables (3.14); closing the iterator cancels what is left."""
    import itertools

    ex = make_executor(1)
    res = ex.map(str, itertools.count(), buffersize=2)
    assert [next(res), next(res), next(res)] == ["0", "1", "2"]
    res.close()
    res = ex.map(tasks.add, itertools.count(), itertools.count(), buffersize=2)
    assert [next(res), next(res), next(res)] == [0, 2, 4]


def test_map_with_a_full_buffer_reads_no_further(make_executor):
    """ExecutorTest.test_map_buffersize_when_buffer_is_full (3.14): without iteration, only
    ``buffersize`` tasks' items are read (``chunksize`` items a task)."""
    ex = make_executor(1)
    ints = iter(range(10))
    ex.map(str, ints, buffersize=2)
    assert next(ints) == 2
    ex.map(str, ints, chunksize=3, buffersize=2)  # items 3 to 8
    assert next(ints) == 9
    ex.shutdown(wait=True)


def test_map_with_a_buffersize_stops_at_an_item_that_cannot_be_sent(make_executor):
    """An item read during iteration that cannot be pickled raises from ``next()``, as
    its submit would in Executor.map, and the iterator ends."""
    import threading

    from kotta_executor import SerializationError

    ex = make_executor(1)
    res = ex.map(str, [1, 2, threading.Lock(), 4], buffersize=1)
    assert next(res) == "1"
    with pytest.raises(SerializationError, match=r"argument 0 \(<unlocked _thread.lock") as info:
        next(res)
    assert "it is item 2 of the map's iterables (counting from 0)" in info.value.__notes__
    assert next(res, None) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_max_workers_defaults_to_the_cpus_the_process_may_use(enclave_dir):
    """ProcessPoolExecutor's default since Python 3.13 (os.process_cpu_count): a job that a
    batch system or ``taskset`` holds to one CPU starts one worker, not one per CPU of the
    machine.  (In a child process, whose affinity the test may change.)"""
    import subprocess
    import sys

    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from kotta_executor import KottaExecutor; from node.daemon import NodeConfig;"
        f"ex = KottaExecutor(enclave={str(enclave_dir)!r}, start_node=False);"
        "print(ex._max_workers, NodeConfig(queue='test').workers); ex.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=GUARD, check=True, cwd=os.getcwd())
    assert out.stdout.split() == ["1", "1"], out.stderr


def test_terminate_workers_kills_a_task_submitted_as_it_began(make_executor, tmp_path):
    """terminate_workers() took the list of the executor's futures to kill before it shut
    the executor down: a task another thread submitted in between was not in it, and a
    node started it before the shutdown's cancel came, so it ran on (ProcessPoolExecutor
    kills every worker, whatever it runs).  The submit is made to happen there with a
    trace function, at the call that shuts down."""
    import sys

    from kotta_executor import TaskKilled

    ex = make_executor(2)
    first, late = tmp_path / "first", tmp_path / "late"
    running = ex.submit(tasks.touch_then_wait, str(first), str(tmp_path / "never"), 30)
    wait_for(first.exists, what="the first task to start")
    slipped: list = []

    def trace(frame, event, arg):  # (another thread's submit, as the lock is let go)
        if (event == "call" and frame.f_code.co_name in ("shutdown", "_shut_down")
                and not slipped
                and frame.f_code.co_filename.endswith(os.path.join("kotta_executor",
                                                                   "executor.py"))):
            slipped.append(ex.submit(tasks.touch_then_wait, str(late),
                                     str(tmp_path / "never"), 30))
            wait_for(late.exists, what="the task submitted meanwhile to start")

    sys.settrace(trace)
    try:
        ex.terminate_workers()
    finally:
        sys.settrace(None)
    assert slipped
    assert type(running.exception(timeout=GUARD)) is TaskKilled
    assert type(slipped[0].exception(timeout=GUARD)) is TaskKilled


def test_terminate_workers_leaves_a_pending_job_it_attached_to(
        make_executor, start_node, enclave, tmp_path):
    """terminate_workers() says jobs the executor attached to run on; its
    shutdown(cancel_futures=True) cancelled those not started yet all the same (another
    client's, whose own future then raised CancelledError)."""
    start_node(workers=1)
    owner = make_executor(1, start_node=False)
    started, go = tmp_path / "started", tmp_path / "go"
    blocker = owner.submit(tasks.touch_then_wait, str(started), str(go))
    try:
        wait_for(started.exists, what="the blocker to begin")
        queued = owner.submit(tasks.square, 5)  # (behind it, on the one worker)
        wait_for(lambda: enclave.jobs.get(queued.job_id) is not None,
                 what="the queued job to be recorded")
        ex = make_executor(1, start_node=False)
        attached = ex.attach(queued.job_id)
        ex.terminate_workers()
        assert not attached.cancelled() and not queued.cancelled()
    finally:
        tasks.release(go, "go")
    assert blocker.result(GUARD) == "go"
    assert queued.result(GUARD) == 25
    assert attached.result(GUARD) == 25


_FORK_SCRIPT = """
import os, sys
import kotta_executor
from tests import tasks
tmp = sys.argv[1]
konn = kotta_executor.connect(sys.argv[2], max_workers=1)
ex = konn.executor
go = [os.path.join(tmp, f"go{i}") for i in range(3)]
it = ex.map(tasks.touch_then_wait, [os.path.join(tmp, f"s{i}") for i in range(3)], go)
tasks.release(go[0], "a")
assert next(it) == "a"
pid = os.fork()
if pid == 0:  # a child that exits as a script does: atexit, then its globals go
    try:
        ex.submit(tasks.square, 5)
        print("child: submitted")
    except RuntimeError as exc:
        print("child: refused:", exc)
    # (on another queue: the parent's node is busy with the parent's map)
    own = konn.executor.with_options(queue="production")
    print("child: its own", own.submit(tasks.square, 3).result(timeout=30))
    sys.stdout.flush()
    sys.exit(0)
assert os.waitpid(pid, 0)[1] == 0
tasks.release(go[1], "b")
tasks.release(go[2], "c")
print("parent: rest", list(it))
print("parent: next", ex.submit(tasks.square, 2).result(timeout=60))
ex.shutdown()
"""


def test_a_forked_child_leaves_the_parents_executor_alone(enclave_dir, tmp_path):
    """A child forked from a client (``os.fork()``, a fork-based ``multiprocessing``)
    inherits the executor.  It closed the parent's map iterator as it exited, cancelling
    the parent's tasks (the parent's map raised CancelledError); and a submit there took
    the job id the parent's next submit was to take (the ids come from a generator the
    child inherited), so the parent's future got the child's value.  ProcessPoolExecutor's
    child touches nothing of the parent's.  Here the child's submit is refused, and its
    exit leaves the parent's tasks alone; a connection (``kotta_executor.connect``) makes
    the child an executor of its own."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, str(tmp_path), str(enclave_dir)],
                         capture_output=True, text=True, timeout=100, cwd=ROOT,
                         env=subprocess_env())
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert any(line.startswith("child: refused: this KottaExecutor was made by process")
               for line in lines), out.stdout
    assert "child: its own 9" in lines, out.stdout  # (a connection makes the child its own)
    assert "parent: rest ['b', 'c']" in lines and "parent: next 4" in lines, out.stdout


_FORK_AS_THE_SEND_LOCK_IS_HELD = """
import os, signal, sys, threading, time
from kotta_executor import KottaExecutor
from tests import tasks
from tests.conftest import wait_for
ex = KottaExecutor(1, enclave=sys.argv[1], start_node=False)
f = ex.submit(tasks.square, 3)  # (no node: it stays pending)
held, forked = threading.Event(), threading.Event()

def hold():  # as the manager holds it while it sends a batch
    with ex._send_lock:
        held.set()
        forked.wait(60)

threading.Thread(target=hold).start()
assert held.wait(60)
pid = os.fork()
if pid == 0:
    for what in ("cancel", "kill"):
        try:
            print("child:", what, getattr(f, what)(), flush=True)
        except RuntimeError as exc:
            print("child: refused:", exc, flush=True)
    ex.terminate_workers()  # (leaves them alone, as shutdown there does)
    print("child: terminated", flush=True)
    os._exit(0)
forked.set()
deadline = time.monotonic() + 45  # (a guard: the child hangs for ever otherwise)
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("the child hung", flush=True)
        break
    time.sleep(0.05)
# the manager records the job once the send lock is free: on a loaded machine that may
# be after the child has ended (read before it, the record was None, and this script
# died of that, its pending future then keeping it alive until the test's timeout)
wait_for(lambda: ex.enclave.jobs.get(f.job_id), what="the parent's job to be recorded")
print("parent:", ex.enclave.jobs.get(f.job_id).state, f.cancel(), flush=True)
ex.shutdown()
"""


def test_a_forked_childs_cancel_or_kill_of_the_parents_future_is_refused(enclave_dir):
    """cancel() or kill() of an inherited future in a child forked while another thread of
    the client held the executor's send lock (its manager, sending a batch) waited for
    that lock for ever: no thread of the child holds it.  (Forked at another moment, it
    cancelled the parent's job behind the parent's back.)  As submit there, it is refused,
    and the parent's job is left alone, as terminate_workers() there leaves it."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-c", _FORK_AS_THE_SEND_LOCK_IS_HELD,
                          str(enclave_dir)], capture_output=True, text=True, timeout=100,
                         cwd=ROOT, env=subprocess_env())
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    refused = [line for line in lines if line.startswith("child: refused: this KottaExecutor "
                                                         "was made by process")]
    assert len(refused) == 2, out.stdout
    assert "child: terminated" in lines, out.stdout
    assert "parent: pending True" in lines, out.stdout

_FORK_AS_NODE_STARTS = """
import fcntl, os, sys
from kotta_executor import KottaExecutor
from tests import tasks
from tests.conftest import wait_for
enclave = sys.argv[1]
ex = KottaExecutor(1, enclave=enclave)
f = ex.submit(tasks.square, 3)
wait_for(lambda: ex._start_claims, interval=0.001, what="its node to be starting")
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # a long-lived child that never uses the executor (a pool's worker)
    os.close(w)
    os.read(r, 1)
    os._exit(0)
os.close(r)
print("parent: first", f.result(timeout=60))
ex.shutdown()  # (its node stops)
fd = os.open(os.path.join(enclave, "node-start-test.lock"), os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("parent: the claim to start a node is free")
except OSError:  # (no client could start a node while the child lives)
    print("parent: the claim to start a node is held")
    os.close(w)
    os.waitpid(pid, 0)
    sys.exit(1)
os.close(fd)
with KottaExecutor(1, enclave=enclave) as ex2:
    print("parent: second", ex2.submit(tasks.square, 4).result(timeout=60))
os.close(w)
os.waitpid(pid, 0)
"""


def test_a_child_forked_as_the_node_starts_lets_clients_start_nodes(enclave_dir):
    """A child forked from a client while the client's node was starting (a fork-based
    ``multiprocessing`` pool made just after a submit) inherited its claim to start a
    node, a flock, which lasted as long as the child lived: no client of the enclave, its
    parent included, could start a node for the queue meanwhile, and their tasks waited
    for ever.  The child lets go of the claim now."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-c", _FORK_AS_NODE_STARTS, str(enclave_dir)],
                         capture_output=True, text=True, timeout=100, cwd=ROOT,
                         env=subprocess_env())
    lines = out.stdout.splitlines()
    assert "parent: first 9" in lines, out.stdout + out.stderr
    assert "parent: the claim to start a node is free" in lines, out.stdout + out.stderr
    assert "parent: second 16" in lines, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr


_FORK_IN_POPEN = """
import os, subprocess, sys, threading
from kotta_executor import KottaExecutor
from tests import tasks
enclave = sys.argv[1]
real, in_popen, forked = subprocess._fork_exec, threading.Event(), threading.Event()


def held(*args):  # the node's exec held until the main thread has forked (or 2 s passed)
    in_popen.set()
    forked.wait(2)
    return real(*args)


subprocess._fork_exec = held
ex = KottaExecutor(1, enclave=enclave)
f = ex.submit(tasks.square, 3)
assert in_popen.wait(60), "no node started"
subprocess._fork_exec = real
r, w = os.pipe()
pid = os.fork()  # (it waits for the start of the node, now)
if pid == 0:  # a long-lived child that never uses the executor (a pool's worker)
    os.close(w)
    os.read(r, 1)
    os._exit(0)
forked.set()
os.close(r)
print("parent: first", f.result(timeout=60), flush=True)
ex.shutdown()
os.close(w)
os.waitpid(pid, 0)
print("parent: shut down", flush=True)
"""


def test_a_child_forked_as_the_node_is_being_executed_keeps_no_pipe_of_its_start(enclave_dir):
    """A child forked as the manager thread was inside Popen starting the node inherited
    the write end of Popen's exec-error pipe (and of the node's leave pipe): Popen waited
    for the child's end, the manager thread with it, and no future resolved while the
    child (a fork-based pool's worker) lived.  A fork now waits for the node's start."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-c", _FORK_IN_POPEN, str(enclave_dir)],
                         capture_output=True, text=True, timeout=100, cwd=ROOT,
                         env=subprocess_env())
    assert out.stdout.splitlines() == ["parent: first 9", "parent: shut down"], (
        out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr


_CTRL_C_IN_FORK_WAIT = """
import os, signal, sys, threading
from kotta_executor import executor
held, go = threading.Event(), threading.Event()


def manager():  # as the manager thread inside Popen, starting a node: _spawning held
    with executor._spawning:
        held.set()
        go.wait(30)


threading.Thread(target=manager).start()
held.wait()


def ctrl_c(*_):
    go.set()  # (the node started: the fork goes on)
    raise KeyboardInterrupt


signal.signal(signal.SIGALRM, ctrl_c)
signal.setitimer(signal.ITIMER_REAL, 0.2)  # as the fork waits for the node's start
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    threading.Event().wait(30)  # (the Ctrl-C, raised once the fork is done)
    print("the Ctrl-C was lost")
except KeyboardInterrupt:
    print("KeyboardInterrupt reached the program")
print("lock free:", executor._spawning.acquire(timeout=5))
"""


def test_a_ctrl_c_as_a_fork_waits_for_the_node_s_start_reaches_the_program(tmp_path):
    """A Ctrl-C as a fork waited for the start of the executor's node (the fork hook's
    wait for _spawning) was ignored by Python, printed, and the fork went on without the
    lock, whose release then failed in both processes ("cannot release un-acquired
    lock").  The fork now waits on, and the KeyboardInterrupt is raised after it."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "-c", _CTRL_C_IN_FORK_WAIT], capture_output=True,
                         text=True, timeout=100, cwd=ROOT, env=subprocess_env())
    assert out.stdout.splitlines() == ["KeyboardInterrupt reached the program",
                                       "lock free: True"], out.stdout + out.stderr
    assert "Exception ignored" not in out.stderr, out.stderr


_MP_CHILD = """
import multiprocessing, os, sys
from kotta_executor import KottaExecutor
from tests import tasks
enclave, out = sys.argv[1:3]

def child():  # leaves its executor open, as a script may: its exit waits for the task
    ex = KottaExecutor(1, enclave=enclave)
    ex.submit(tasks.release, out, "ran")

if __name__ == "__main__":
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join()
    print("child exit code", p.exitcode)
    print("the task ran:", os.path.exists(out))
"""


def test_a_fork_started_multiprocessing_child_waits_for_its_executors_tasks(enclave_dir,
                                                                             tmp_path):
    """A ``multiprocessing`` child started by fork ends with ``os._exit``, without the
    interpreter's exit and its atexit handlers: an executor it made and left open lost
    its tasks (not even recorded: the child was gone before its manager sent them), where
    a ``ProcessPoolExecutor`` there waits for its own (``threading``'s exit hooks run in
    such a child).  Its exit now waits for them, as a spawned child's does."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _MP_CHILD, str(enclave_dir), str(out)],
                          capture_output=True, text=True, timeout=100, cwd=ROOT,
                          env=subprocess_env())
    lines = proc.stdout.splitlines()
    assert "child exit code 0" in lines, proc.stdout + proc.stderr
    assert "the task ran: True" in lines, proc.stdout + proc.stderr


_FORK_AS_A_FUTURE_IS_MADE_READY = """
import os, signal, sys, threading, time
from kotta_executor import KottaExecutor
from tests import tasks
enclave = sys.argv[1]
holding, forked = threading.Event(), threading.Event()

def pause_in_first_use(frame, event, arg):
    # the manager thread, as it gives a future its condition (its first use): it holds
    # the futures' shared lock there while the main thread forks
    if (event == "call" and frame.f_code.co_name == "__init__" and not holding.is_set()
            and frame.f_back is not None and frame.f_back.f_code.co_name == "_condition"):
        holding.set()
        forked.wait(60)

threading.setprofile(pause_in_first_use)  # (for threads started from now on)
ex = KottaExecutor(1, enclave=enclave)
f = ex.submit(tasks.square, 3)
threading.setprofile(None)
assert holding.wait(60)
pid = os.fork()
if pid == 0:  # a child with an executor of its own
    own = KottaExecutor(1, enclave=enclave, start_node=False)
    g = own.submit(tasks.square, 4)
    print("child", g.result(timeout=60), flush=True)
    os._exit(0)
forked.set()
print("parent", f.result(timeout=60), flush=True)
deadline = time.monotonic() + 45  # (a guard: the child hangs for ever otherwise)
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("the child hung", flush=True)
        break
    time.sleep(0.05)
"""


def test_a_child_forked_as_a_future_is_first_used_can_use_its_own_executor(enclave_dir):
    """A child forked while another thread of the client (its manager, resolving a
    future) held the lock every future takes at its first use: the child inherited it
    held, by no thread of its own, and its own executor's futures waited for it for
    ever (``result(timeout=...)`` too).  The child gets the lock afresh now, as the
    standard library's locks are after a fork."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _FORK_AS_A_FUTURE_IS_MADE_READY,
                           str(enclave_dir)], capture_output=True, text=True, timeout=100,
                          cwd=ROOT, env=subprocess_env())
    lines = proc.stdout.splitlines()
    assert "parent 9" in lines, proc.stdout + proc.stderr
    assert "child 16" in lines, proc.stdout + proc.stderr


_FORK_THEN_OWN_NODE = """
import os, sys
from kotta_executor import KottaExecutor
from tests import tasks
from tests.conftest import wait_for
enclave = sys.argv[1]
ex = KottaExecutor(1, enclave=enclave, start_node=False)  # its queue served by none yet
f = ex.submit(tasks.square, 2)
wait_for(lambda: ex._listening, what="its manager to run")
pid = os.fork()
if pid == 0:  # a child with an executor of its own, which starts a node for the queue
    own = KottaExecutor(1, enclave=enclave)
    print("child", own.submit(tasks.square, 3).result(timeout=60), flush=True)
    nodes = list(own._nodes.values())
    own.shutdown()
    print("child: its node runs on:", any(p.poll() is None for p in nodes), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", f.result(timeout=60), flush=True)
"""


def test_a_forked_childs_own_executor_stops_its_node_as_it_shuts_down(enclave_dir):
    """A child forked from a client made an executor of its own, which started a node for
    a queue the parent's executor used without one: its shutdown handed the node to the
    parent's executor, as a node goes to another open executor of the process, but the
    child's copy of it, which no manager runs, never stopped it: the node ran on after
    ``shutdown()``, for as long as the child lived.  It is stopped now."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-c", _FORK_THEN_OWN_NODE, str(enclave_dir)],
                          capture_output=True, text=True, timeout=100, cwd=ROOT,
                          env=subprocess_env())
    lines = proc.stdout.splitlines()
    assert "child 9" in lines and "parent 4" in lines, proc.stdout + proc.stderr
    assert "child: its node runs on: False" in lines, proc.stdout + proc.stderr


def test_an_argument_named_inputs_that_is_no_uri_says_how_to_pass_it(make_executor):
    """``submit(fn, inputs=x)`` stages ``x`` as dataset URIs (Cloud Kotta's keywords).  Code
    written for ProcessPoolExecutor, whose function has an argument so named (a model's
    ``inputs``), got only "a dataset URI must be a string, not int", with nothing saying
    why its argument was read as one.  A note says so now, and how to pass it."""
    import functools

    from kotta_executor.errors import InvalidDataUri

    ex = make_executor(1)
    for kwargs in ({"inputs": [1, 2, 3]}, {"outputs": "out.csv"}):
        with pytest.raises(InvalidDataUri) as info:
            ex.submit(tasks.count_inputs, **kwargs)
        assert (f"submit() takes {next(iter(kwargs))}= as the dataset URIs the task stages "
                "(s3://...); to pass count_inputs an argument so named, give it by position "
                "or with functools.partial") in info.value.__notes__
    assert ex.submit(tasks.count_inputs, [1, 2, 3]).result(timeout=GUARD) == 3
    bound = functools.partial(tasks.count_inputs, inputs=[1, 2])
    assert ex.submit(bound).result(timeout=GUARD) == 2


_CACHED = """
import functools

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

@functools.lru_cache(maxsize=8, typed=True)
def square(x):
    return x * x

@functools.cache
def cube(x):
    return x ** 3

def task(n):
    return fib(n), square(3), cube(2), square.cache_parameters(), cube.cache_parameters()

def give_back():
    return fib

fib.note = "set on the wrapper"

def note():
    return fib.note
"""


def test_a_cached_function_of_main_runs_on_the_node(make_executor):
    """A function of ``__main__`` (a script, a notebook) wrapped in ``functools.lru_cache``
    or ``functools.cache``, submitted or called by a task: ProcessPoolExecutor runs it.
    cloudpickle pickles such a wrapper by reference (cloudpipe/cloudpickle#178), as
    ``__main__.fib``, which the node cannot find: the task failed with "Can't get attribute
    'fib' on <module 'node.worker'>".  It travels by value now, its cache parameters kept
    (fib(80) returns at once only if its own recursive calls are cached)."""
    ns = {"__name__": "__main__"}
    exec(compile(_CACHED, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    ex = make_executor(1)
    assert ex.submit(ns["fib"], 80).result(timeout=GUARD) == 23416728348467685
    assert ex.submit(ns["task"], 90).result(timeout=GUARD) == (
        2880067194370816120, 9, 8, {"maxsize": 8, "typed": True},
        {"maxsize": None, "typed": False})
    assert list(ex.map(ns["square"], [2, 3])) == [4, 9]
    back = ex.submit(ns["give_back"]).result(timeout=GUARD)
    assert back(70) == 190392490709135 and back.__name__ == "fib"
    # what was set on the wrapper goes with it (it was lost: an AttributeError)
    assert ex.submit(ns["note"]).result(timeout=GUARD) == "set on the wrapper"
    assert back.note == "set on the wrapper"


_LOADER = """
_model = None
_calls = 0

def init(value):
    global _model
    _model = value

def task(x):
    return _model, x

def helper():
    return _model

def uses_helper(x):
    return helper(), x

def count(_):
    global _calls
    _calls += 1
    return _model, _calls

def replace(value):
    global _model
    _model = value
    return _model
"""


def test_globals_an_initializer_of_main_sets_are_seen_by_tasks_of_main(make_executor):
    """The usual way to load a model once a worker: an initializer that sets a global, and
    tasks that read it, both defined in a notebook or script (``__main__``).  In a
    ProcessPoolExecutor's worker they share the module's globals.  Here each function of
    ``__main__`` travels by value with its own copy of the globals it uses, as they were
    at submit: the tasks saw ``_model = None``, the initializer's work lost to them."""
    ns = {"__name__": "__main__"}
    exec(compile(_LOADER, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    ex = make_executor(1, initializer=ns["init"], initargs=("loaded",))
    assert ex.submit(ns["task"], 1).result(timeout=GUARD) == ("loaded", 1)
    assert ex.submit(ns["uses_helper"], 2).result(timeout=GUARD) == ("loaded", 2)
    # what a task then sets stays, as in a pool's worker: the initializer ran once
    assert [ex.submit(ns["count"], i).result(timeout=GUARD) for i in range(2)] == [
        ("loaded", 1), ("loaded", 2)]
    assert ex.submit(ns["replace"], "tuned").result(timeout=GUARD) == "tuned"
    assert ex.submit(ns["task"], 3).result(timeout=GUARD) == ("loaded", 3)  # (its own copy)
    assert ns["_model"] is None  # the client's own globals are not touched


_PREDICTOR = """
_model = None

def init(value):
    global _model
    _model = value

class Predictor:
    def __init__(self, k=0):
        self.k, self.seen = k, _model

    def predict(self, x):
        return _model, self.k, x

    def __call__(self, x):
        return self.predict(x)
"""


def test_globals_an_initializer_of_main_sets_are_seen_by_methods_of_main(make_executor):
    """The same, for a task that is a bound method, a callable object or a class of
    ``__main__`` (``ex.map(predictor.predict, xs)``): each saw ``_model = None``, as its
    globals are those of its class's functions, not its own."""
    ns = {"__name__": "__main__"}
    exec(compile(_PREDICTOR, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's class
    ex = make_executor(1, initializer=ns["init"], initargs=("loaded",))
    p = ns["Predictor"](7)
    assert ex.submit(p.predict, 1).result(timeout=GUARD) == ("loaded", 7, 1)
    assert list(ex.map(p.predict, [2, 3])) == [("loaded", 7, 2), ("loaded", 7, 3)]
    assert ex.submit(p, 4).result(timeout=GUARD) == ("loaded", 7, 4)
    assert ex.submit(ns["Predictor"]).result(timeout=GUARD).seen == "loaded"


def test_globals_an_initializer_of_main_sets_are_seen_by_objects_with_slots(make_executor):
    """The same, for a callable object of a class of ``__main__`` with ``__slots__`` (no
    weak reference to it can be made): it saw ``_model = None``."""
    slotted = _PREDICTOR.replace("class Predictor:\n",
                                 "class Predictor:\n    __slots__ = ('k', 'seen')\n")
    ns = {"__name__": "__main__"}
    exec(compile(slotted, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's class
    assert ns["Predictor"].__slots__
    ex = make_executor(1, initializer=ns["init"], initargs=("loaded",))
    p = ns["Predictor"](7)
    assert ex.submit(p, 4).result(timeout=GUARD) == ("loaded", 7, 4)
    assert ex.submit(p.predict, 5).result(timeout=GUARD) == ("loaded", 7, 5)


_WRAPPED_LOADER = """
import functools

_model = None

def init(value):
    global _model
    _model = value

@functools.cache
def cached(x):
    return _model, x

@functools.singledispatch
def dispatched(x):
    return _model, x

@dispatched.register
def _(x: str):
    return _model, "str " + x
"""


def test_globals_an_initializer_of_main_sets_are_seen_by_cached_and_generic_functions(
        make_executor):
    """The same, for a function of ``__main__`` wrapped in ``functools.cache`` or made
    generic by ``functools.singledispatch`` (which travel by value, their wrappers made
    anew): they saw ``_model = None``."""
    ns = {"__name__": "__main__"}
    exec(compile(_WRAPPED_LOADER, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's
    ex = make_executor(1, initializer=ns["init"], initargs=("loaded",))
    assert ex.submit(ns["cached"], 1).result(timeout=GUARD) == ("loaded", 1)
    assert ex.submit(ns["dispatched"], 2).result(timeout=GUARD) == ("loaded", 2)
    assert ex.submit(ns["dispatched"], "x").result(timeout=GUARD) == ("loaded", "str x")


def test_an_initializers_globals_reach_only_its_own_executors_tasks(make_executor):
    """A worker serves every executor of its owner.  Notebook A's initializer set ``data``;
    notebook B's tasks, of an executor with no initializer, run in the same worker, read a
    ``data`` of their own: they got A's instead, a silently wrong result (in a
    ProcessPoolExecutor, B's pool never runs A's initializer)."""
    a = {"__name__": "__main__"}
    exec(compile(_LOADER, "<cell>", "exec"), a)  # noqa: S102 - notebook A's functions
    b = {"__name__": "__main__"}
    exec(compile("_model = 'B own'\ndef task(x):\n    return _model, x\n", "<cell>", "exec"), b)  # noqa: S102
    ex_a = make_executor(1, initializer=a["init"], initargs=("A's",))
    assert ex_a.submit(a["task"], 1).result(timeout=GUARD) == ("A's", 1)
    ex_b = make_executor(1)  # (A's node serves it: the same worker, one a node)
    assert ex_b.submit(b["task"], 2).result(timeout=GUARD) == ("B own", 2)
    assert ex_a.submit(a["task"], 4).result(timeout=GUARD) == ("A's", 4)


def test_two_executors_initializing_the_same_functions_differently_keep_their_own(
        make_executor):
    """One notebook, two executors with the same initializer given other arguments (two
    models), submitting the same function: in the worker both ran, each setting ``_model``
    for its own executor's tasks.  The worker makes the function once (the same bytes),
    and it was given the last initializer's ``_model``: A's tasks then ran with B's
    model, a silently wrong result, and those of an executor with no initializer too (each
    ProcessPoolExecutor has workers of its own)."""
    ns = {"__name__": "__main__"}
    exec(compile(_LOADER, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    ex_a = make_executor(1, initializer=ns["init"], initargs=("A's",))
    assert ex_a.submit(ns["task"], 1).result(timeout=GUARD) == ("A's", 1)
    ex_b = make_executor(1, initializer=ns["init"], initargs=("B's",))  # (A's node, one worker)
    assert ex_b.submit(ns["task"], 2).result(timeout=GUARD) == ("B's", 2)
    assert ex_a.submit(ns["task"], 3).result(timeout=GUARD) == ("A's", 3)
    assert ex_b.submit(ns["task"], 4).result(timeout=GUARD) == ("B's", 4)
    ex_c = make_executor(1)  # no initializer: the globals as at submit, no one else's
    assert ex_c.submit(ns["task"], 5).result(timeout=GUARD) == (None, 5)


_MODEL = """
SCALE = 1

class Model:
    kind = "plain"

    def scale(self):
        return SCALE

def echo(value):
    return value

def tuned():
    Model.kind = "tuned on the node"
    return Model()
"""


def test_a_result_of_a_class_of_main_leaves_the_clients_class_as_it_is(make_executor):
    """A class of ``__main__`` travels by value, and comes back as the client's own class
    (cloudpickle finds it by its id); but cloudpickle also set on it, anew, the worker's
    copies of its attributes.  Its methods, copies with a copy of the globals they use
    as they were at submit, then read those: the client set ``SCALE = 2``, and its own
    ``Model().scale()`` said 1; and what a task set on its copy of the class (a class
    attribute) replaced the client's.  A ProcessPoolExecutor's result never changes the
    parent's classes."""
    ns = {"__name__": "__main__"}
    exec(compile(_MODEL, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's class
    model_class, scale = ns["Model"], ns["Model"].scale
    ex = make_executor(1)
    assert type(ex.submit(ns["echo"], model_class()).result(timeout=GUARD)) is model_class
    assert type(ex.submit(ns["tuned"]).result(timeout=GUARD)) is model_class
    assert model_class.scale is scale and model_class.kind == "plain"
    ns["SCALE"] = 2
    assert model_class().scale() == 2


_SCALER = """
SCALE = 1

class Scaler:
    def __call__(self, x):
        return SCALE * x
"""


def test_a_callable_object_of_main_runs_with_the_globals_of_its_own_submit(make_executor):
    """A callable object of a class of ``__main__`` is sent with the globals its methods use
    as they are at submit: ``SCALE`` 1, then 2, then 1 again.  The third submit sends the
    bytes of the first, and the worker reused the object it had made of them; but its
    class (one class in the worker, as on the client) had been given the second's
    methods since, which read ``SCALE = 2``: 20, not 10."""
    ns = {"__name__": "__main__"}
    exec(compile(_SCALER, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's class
    ex = make_executor(1)
    scaler = ns["Scaler"]()
    results = []
    for scale in (1, 2, 1):
        ns["SCALE"] = scale
        results.append(ex.submit(scaler, 10).result(timeout=GUARD))
    assert results == [10, 20, 10]


_DISPATCHED = """
import functools

class Shape:
    pass

class Square(Shape):
    def __init__(self, side):
        self.side = side

@functools.singledispatch
def describe(x):
    return "thing"

@describe.register
def _(x: int):
    return "int " + describe(str(x))

@describe.register(str)
def _(x):
    return "str"

@describe.register
def _(x: Shape):
    return "shape"

def task(x):
    return describe(x)

describe.note = "set on the wrapper"

def note():
    return describe.note
"""


def test_a_singledispatch_function_of_main_runs_on_the_node(make_executor):
    """A function of ``__main__`` (a script, a notebook) made generic by
    ``functools.singledispatch``, submitted or called by a task: ProcessPoolExecutor runs
    it.  cloudpickle sends its wrapper by value with the closure singledispatch made, a
    WeakKeyDictionary among it: submit raised "cannot pickle 'weakref.ReferenceType'
    object", which names nothing of the user's.  It travels by value now, with what was
    registered to it (a class of ``__main__`` too); its dispatch cache starts empty."""
    ns = {"__name__": "__main__"}
    exec(compile(_DISPATCHED, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    ex = make_executor(1)
    describe, square = ns["describe"], ns["Square"](2)
    assert ex.submit(describe, 3).result(timeout=GUARD) == "int str"
    assert ex.submit(describe, 2.5).result(timeout=GUARD) == "thing"
    assert ex.submit(describe, square).result(timeout=GUARD) == "shape"
    assert list(ex.map(ns["task"], [1, "a", square, None])) == ["int str", "str", "shape", "thing"]
    back = ex.submit(lambda: describe).result(timeout=GUARD)
    assert back(1) == "int str" and back.__name__ == "describe"
    assert len(back.registry) == 4 and {object, int, str} <= set(back.registry)
    assert ex.submit(ns["note"]).result(timeout=GUARD) == "set on the wrapper"


_CACHED_PROPERTY = """
import functools

class Circle:
    def __init__(self, r):
        self.r = r

    @functools.cached_property
    def area(self):
        \"\"\"The area, worked out once.\"\"\"
        return 3 * self.r * self.r

def area(circle):
    return circle.area, Circle.area.__doc__

class Rejected(Exception):
    @functools.cached_property
    def reason(self):
        return "rejected: " + self.args[0]

@functools.singledispatch
def check(x):
    raise Rejected(str(x))

def reject(x):
    raise Rejected(x)

class Carries(Exception):
    pass

def carries():
    raise Carries(check)
"""


def test_a_class_of_main_with_a_cached_property_travels(make_executor):
    """A class of ``__main__`` (a script, a notebook) with a ``functools.cached_property``:
    ProcessPoolExecutor sends its instances (by reference to the class).  Sent by value,
    the class's cached_property holds an RLock before Python 3.12: submit raised "cannot
    pickle '_thread.RLock' object" for an instance as an argument, and for the class as
    the function.  It travels by value now, a new lock made where it is unpickled."""
    ns = {"__name__": "__main__"}
    exec(compile(_CACHED_PROPERTY, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's
    ex = make_executor(1)
    circle = ns["Circle"](2)
    assert ex.submit(ns["area"], circle).result(timeout=GUARD) == (12, "The area, worked out once.")
    made = ex.submit(ns["Circle"], 3).result(timeout=GUARD)
    assert isinstance(made, ns["Circle"]) and made.area == 27
    assert list(ex.map(lambda c: c.area, [circle, made])) == [12, 27]


def test_an_exception_of_main_a_class_with_a_cached_property_or_holding_one_comes_back(
        make_executor):
    """An exception class of ``__main__`` with a ``functools.cached_property``, or one that
    holds a ``functools.singledispatch`` function of ``__main__``, raised by a task: the
    worker checked that it would travel with cloudpickle alone, which cannot pickle them
    (before Python 3.12 for the first), and sent a RemoteError instead, which ``except
    Rejected`` does not catch.  It comes back as itself now, as a result of those does."""
    ns = {"__name__": "__main__"}
    exec(compile(_CACHED_PROPERTY, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's
    ex = make_executor(1)
    with pytest.raises(ns["Rejected"]) as info:
        ex.submit(ns["reject"], "too big").result(timeout=GUARD)
    assert info.value.reason == "rejected: too big"
    with pytest.raises(ns["Carries"]) as info:
        ex.submit(ns["carries"]).result(timeout=GUARD)
    with pytest.raises(ns["Rejected"]):
        info.value.args[0](1)


_SLOTS = """
import dataclasses

class Pair:
    __slots__ = ("left", "right")

    def __init__(self, left, right):
        self.left, self.right = left, right

@dataclasses.dataclass(slots=True)
class Cell:
    value: int

def make(left, right):
    return Pair(left, right)

def swap(pair):
    return Pair(pair.right, pair.left), hasattr(pair, "__dict__")

def bump(cell):
    return Cell(cell.value + 1)
"""


def test_instances_of_a_class_of_main_with_slots_come_back(make_executor):
    """A class of ``__main__`` with ``__slots__`` (or a ``dataclass(slots=True)``), its
    instances made or returned by a task: ProcessPoolExecutor gives them back.  cloudpickle
    made the class again on the node without its slots, so the node's instances had a
    ``__dict__``, which the client's class has not: the future raised "could not be
    unpickled on the client: AttributeError: 'Pair' object has no attribute '__dict__'".
    The class keeps its slots on the node now."""
    ns = {"__name__": "__main__"}
    exec(compile(_SLOTS, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    ex = make_executor(1)
    pair = ex.submit(ns["make"], 1, 2).result(timeout=GUARD)
    assert type(pair) is ns["Pair"] and (pair.left, pair.right) == (1, 2)
    swapped, had_dict = ex.submit(ns["swap"], pair).result(timeout=GUARD)
    assert (swapped.left, swapped.right, had_dict) == (2, 1, False)
    assert ex.submit(ns["bump"], ns["Cell"](1)).result(timeout=GUARD) == ns["Cell"](2)
    assert [c.value for c in ex.map(ns["bump"], [ns["Cell"](5)])] == [6]


_NAMED_TUPLES = """
import typing
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")

class Point(typing.NamedTuple):
    x: int
    y: int = 0

    def norm(self):
        return abs(self.x) + abs(self.y)

class Box(NamedTuple, Generic[T]):
    item: T

def make(x, y):
    return Point(x, y)

def norm(point):
    return point.norm(), hasattr(point, "__dict__")
"""


def test_a_named_tuple_class_of_main_travels_as_its_instances_do(make_executor):
    """A ``typing.NamedTuple`` of ``__main__`` (a script's, a notebook's), submitted as the
    function (its constructor), passed as an argument or returned: ProcessPoolExecutor,
    and cloudpickle alone, send it.  Made again on the node with its ``__slots__`` (as a
    class of ``__main__`` with slots is), it failed there with "could not be unpickled on
    the node: AttributeError: Cannot overwrite NamedTuple attribute __slots__", every
    task that used it; typing makes it a named tuple, slots and all, by itself."""
    ns = {"__name__": "__main__"}
    exec(compile(_NAMED_TUPLES, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's
    ex = make_executor(1)
    Point, Box = ns["Point"], ns["Box"]
    assert ex.submit(Point, 1, 2).result(timeout=GUARD) == Point(1, 2)
    made = ex.submit(ns["make"], 3, -4).result(timeout=GUARD)
    assert type(made) is Point and made == (3, -4)
    assert ex.submit(ns["norm"], Point(5)).result(timeout=GUARD) == (5, False)
    assert ex.submit(Box, "a").result(timeout=GUARD) == Box("a")
    assert list(ex.map(ns["norm"], [Point(1, 1), Point(2)])) == [(2, False), (2, False)]


def test_an_executor_dropped_while_plain_futures_its_tasks_waited_for_are_kept_stops(
        enclave_dir):
    """A process pool's futures passed to tasks as arguments (the guide: any
    concurrent.futures.Future works) keep their done-callbacks for ever (the stdlib never
    lets go of them), and a task's callback held its executor: a program that kept
    those futures (its pool's results) kept the dropped executor, its manager thread,
    its local node and that node's workers alive as long as it kept them."""
    ex = KottaExecutor(1, enclave=enclave_dir)
    done, pending, failed = cf.Future(), cf.Future(), cf.Future()
    done.set_result(2)
    sent = ex.submit(tasks.add, done, 1)
    cancelled = ex.submit(tasks.add, pending, 1)
    fails = ex.submit(tasks.add, failed, 1)
    failed.set_exception(KeyError("no"))
    assert sent.result(timeout=GUARD) == 3
    assert cancelled.cancel()
    assert fails.exception(timeout=GUARD) is not None
    held = [ex]
    del ex
    _drop_and_see_it_stop(held, "not held by the plain futures its tasks waited for")
    assert sent.result() == 3 and not pending.done()
