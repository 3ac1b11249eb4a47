"""KottaExecutor as a user sees it: a drop-in ``concurrent.futures`` executor.

Every test runs against real components: the executor starts a real ``python -m node``
process on a fresh embedded enclave, tasks run in real worker subprocesses.  Tests
synchronise on files (``tasks.touch_then_wait`` / ``tasks.wait_for_file``) and ``wait_for``;
the only timeouts are deadlock guards.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import functools
import os
import pickle
import re
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import psutil
import pytest

import kotta_executor
from kotta_executor import KottaExecutor, KottaFuture, SerializationError, TaskKilled, UnknownJob
from kotta_executor import executor as executor_module
from tests import tasks
from tests.conftest import GUARD, wait_for

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def process_pool():
    """A real ProcessPoolExecutor to compare against."""
    with cf.ProcessPoolExecutor(2) as pool:
        yield pool


class Gate:
    """Files in a test's tmp_path that start and release blocking tasks."""

    def __init__(self, root: Path):
        self.root = root
        self.release = root / "release"
        self._n = 0

    def started(self) -> Path:
        self._n += 1
        return self.root / f"started-{self._n}"

    def open(self, text: str = "released") -> None:
        # atomically: a task polling for the file must never read it half written
        tmp = self.root / "release.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.release)

    def submit_blocking(self, ex, started: Path | None = None) -> tuple[KottaFuture, Path]:
        started = started or self.started()
        return ex.submit(tasks.touch_then_wait, str(started), str(self.release)), started


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(tmp_path)


def wait_started(*paths: Path) -> None:
    for p in paths:
        wait_for(p.exists, what=f"{p.name} (the task to start)")


def job_state(enclave, job_id: str) -> str | None:
    job = enclave.jobs.get(job_id)
    return None if job is None else str(job.state)


# --------------------------------------------------------------------------- futures


def test_submit_returns_a_kotta_future_with_a_job_id(executor):
    f = executor.submit(tasks.square, 7)
    assert isinstance(f, KottaFuture)
    assert isinstance(f, cf.Future)
    assert JOB_ID.match(f.job_id)
    assert f.result(timeout=GUARD) == 49
    assert f.done() and not f.cancelled() and f.exception() is None
    other = executor.submit(tasks.square, 7)
    assert other.job_id != f.job_id
    assert other.result(timeout=GUARD) == 49


def test_job_ids_begin_with_the_submit_time_and_sort_in_submit_order(executor):
    """Ids made later sort later (their first 48 bits are the time in milliseconds), so
    that a job table's index takes each new one at its end; the other 80 bits are random,
    so ids made in the same millisecond still differ."""
    before = time.time_ns() // 1_000_000
    fs = [executor.submit(tasks.square, i) for i in range(300)]
    after = time.time_ns() // 1_000_000
    ids = [f.job_id for f in fs]
    assert all(JOB_ID.match(i) for i in ids)
    assert len(set(ids)) == len(ids)
    stamps = [int(i[:12], 16) for i in ids]
    assert before <= stamps[0] and stamps[-1] <= after
    assert stamps == sorted(stamps)
    assert len({i[12:] for i in ids}) == len(ids)
    assert [f.result(timeout=GUARD) for f in fs] == [i * i for i in range(300)]


def test_wait_as_completed_and_result_timeout(executor, gate):
    slow, started = gate.submit_blocking(executor)
    quick = executor.submit(tasks.add, 2, 3)

    wait_started(started)
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        slow.exception(timeout=0.05)

    done, not_done = cf.wait([slow, quick], timeout=GUARD, return_when=cf.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}

    it = cf.as_completed([slow, quick], timeout=GUARD)
    assert next(it) is quick
    gate.open("go")
    assert next(it) is slow
    with pytest.raises(StopIteration):
        next(it)
    assert slow.result() == "go"

    done, not_done = cf.wait([slow, quick], timeout=GUARD)
    assert done == {slow, quick} and not not_done


def test_add_done_callback_runs_once_with_the_future(executor, gate):
    calls: list[cf.Future] = []
    after: list[cf.Future] = []
    f, started = gate.submit_blocking(executor)
    f.add_done_callback(calls.append)
    wait_started(started)
    assert calls == []
    gate.open()
    assert f.result(timeout=GUARD) == "released"
    wait_for(lambda: calls, what="the done callback")
    # a callback added once the future is done runs at once, in the caller's thread
    f.add_done_callback(after.append)
    assert after == [f]
    # nothing delivers the result again
    executor.submit(tasks.noop).result(timeout=GUARD)
    assert calls == [f]


def test_a_done_callback_waiting_for_another_future_of_its_executor_raises(executor):
    """Done-callbacks run on the executor's manager thread, the one that resolves its
    futures: a callback that waited (no timeout) for another of them, or called a blocking
    decorated function, waited for ever, and with it every future of the executor, its
    shutdown and the interpreter's exit.  Now that wait raises a RuntimeError that says
    why, and the executor goes on."""
    got: list = []

    def follow_up(f):
        g = executor.submit(tasks.square, f.result())
        got.append(g)
        for wait in (g.result, g.exception):
            try:
                wait()
            except RuntimeError as exc:
                got.append(str(exc))

    executor.submit(tasks.square, 3).add_done_callback(follow_up)
    wait_for(lambda: len(got) == 3, what="the callback to end")
    g, *errors = got
    assert len(errors) == 2 and all("manager thread" in e and g.job_id in e for e in errors)
    assert g.result(timeout=GUARD) == 81  # the callback's own task runs all the same
    assert executor.submit(tasks.square, 4).result(timeout=GUARD) == 16


def test_results_come_back_while_threads_keep_submitting(executor):
    """The manager sent the outbox until it was empty: threads that kept submitting (two
    were enough) kept it sending, and no future of the executor was resolved, nor a
    callback run, until every one of them stopped (11 s for 8 threads of 15,000 submits).
    Now each turn sends a thousand tasks at most, and results come back meanwhile."""
    assert executor.submit(tasks.noop).result(timeout=GUARD) is None  # its node serves
    cap = 100_000  # submits a thread (many seconds of them, four threads at a time: a
    # margin for a loaded machine; it stops at the first result)
    first_back = threading.Event()
    counts = [0] * 4

    def submit_on(i):
        while not first_back.is_set() and counts[i] < cap:
            f = executor.submit(tasks.noop, i)
            if i == 0 and counts[i] == 0:
                f.add_done_callback(lambda _: first_back.set())
            counts[i] += 1

    threads = [threading.Thread(target=submit_on, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    executor.shutdown(wait=False, cancel_futures=True)
    assert first_back.is_set() and max(counts) < cap, (
        f"no result came back while the threads submitted ({counts} submits)")


def test_many_tasks_complete_and_are_delivered_exactly_once(executor):
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def count(fut):
        with lock:
            seen[fut.job_id] += 1

    fs = []
    for i in range(500):
        f = executor.submit(tasks.square, i)
        f.add_done_callback(count)
        fs.append(f)
    done, not_done = cf.wait(fs, timeout=GUARD)
    assert not not_done
    assert [f.result() for f in fs] == [i * i for i in range(500)]
    wait_for(lambda: sum(seen.values()) >= 500, what="500 callbacks")
    assert len({f.job_id for f in fs}) == 500
    assert set(seen) == {f.job_id for f in fs}
    assert set(seen.values()) == {1}
    # a later task does not bring any of them back
    executor.submit(tasks.noop).result(timeout=GUARD)
    assert sum(seen.values()) == 500


# --------------------------------------------------------------------------- map


def test_map_matches_process_pool(executor, process_pool):
    cases = [
        (tasks.square, (range(10),)),
        (tasks.add, (range(10), range(100, 107))),  # zip: the shortest iterable wins
        (pow, ([2, 3, 4, 5], [5, 4, 3], [7, 7, 7, 7, 7])),
        (tasks.add, ([1, 2, 3], [])),
        (tasks.square, ([],)),
        (tasks.square, (range(300),)),  # enough items for several tasks per worker
    ]
    for chunksize in (1, 3, 100):
        for fn, iterables in cases:
            expected = list(process_pool.map(fn, *iterables, chunksize=chunksize))
            got = list(executor.map(fn, *iterables, chunksize=chunksize))
            assert got == expected, (fn, iterables, chunksize)
    assert list(executor.map(tasks.add, range(3), range(5), chunksize=2)) == [0, 2, 4]
    assert list(executor.map(tasks.square, [])) == []
    assert list(executor.map(tasks.square, iter([]), chunksize=5)) == []
    assert list(executor.map(tasks.add, [1, 2], [])) == []
    assert list(executor.map(tasks.square, (x for x in range(4)))) == [0, 1, 4, 9]


def test_map_raises_at_the_failing_item_after_earlier_ones(executor, process_pool):
    def collect(ex, chunksize):
        got = []
        with pytest.raises(ValueError, match="item 3 is bad"):
            for value in ex.map(tasks.fail_on, range(6), [3] * 6, chunksize=chunksize):
                got.append(value)
        return got

    assert collect(process_pool, 1) == [0, 10, 20]
    for chunksize in (1, 2, 4, 10):
        assert collect(executor, chunksize) == [0, 10, 20], chunksize
    # (with chunksize > 1, ProcessPoolExecutor loses the good items of the failing chunk;
    # KottaExecutor yields every item before the failing one whatever the chunking)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_a_packed_map_items_exception_shows_the_stderr_up_to_its_own_failure(
        make_executor, chunksize):
    """The note of a failed item of a task of several items shows its task's stderr up to
    that item's failure (its own output last), not what the items after it wrote: that was
    the tail of the whole task's stderr, so item 1 of [0, 1, 2] showed item 2's lines as
    its "remote stderr".  The future's (and attach()'s) stderr is still the whole task's."""
    ex = make_executor(1)  # 192 items: 3 a task (192 // 64), as with chunksize=3
    with pytest.raises(ValueError, match="item 1 is bad") as info:
        list(ex.map(tasks.complain_on, range(192), [1] * 192, chunksize=chunksize,
                    timeout=GUARD))
    note = next(n for n in info.value.__notes__ if n.startswith("kotta job "))
    job_id = note.split()[2]
    assert ex.enclave.jobs.get(job_id).n == 3
    assert note.endswith("--- remote stderr (tail) ---\nitem 0 err\nitem 1 err"), note
    attached = ex.attach(job_id)
    with pytest.raises(ValueError, match="item 1 is bad"):
        attached.result(timeout=GUARD)
    assert attached.stderr == "item 0 err\nitem 1 err\nitem 2 err\n"


def test_map_timeout_raises_on_iteration_not_at_call(executor, gate):
    it = executor.map(tasks.wait_for_file, [str(gate.release)], timeout=0.3)
    with pytest.raises(TimeoutError):
        next(it)
    gate.open()


def test_map_packing_keeps_each_items_walltime(make_executor):
    """With chunksize=1 the executor packs items into tasks itself: a task of n items gets
    n walltimes, so items that each fit their walltime never fail together."""
    ex = make_executor(1, walltime=0.01)  # 0.6 s an item
    # 640 items of 0.1 s: 10 a task (640 // 64), 1 s a task, over one item's walltime
    it = ex.map(tasks.sleep_and_return, [0.1] * 640, range(640))
    try:
        assert [next(it) for _ in range(12)] == list(range(12))  # two tasks' worth
    finally:
        it.close()  # cancels the rest


def test_a_map_abandoned_cancels_its_other_tasks_together(make_executor, enclave, gate):
    """Leaving a map's iterator (a break, an item's exception, close()) cancels the tasks
    of the items not yet yielded: in one cancel, not one transaction (on AWS, one round of
    calls) each.  (A spy counts the executor's own cancels, which run as they are.)"""
    ex = make_executor(1)
    real, calls = ex._cancel_jobs, []

    def cancel_jobs(ids, *args):
        calls.append(len(ids))
        return real(ids, *args)

    ex._cancel_jobs = cancel_jobs
    later = gate.root / "later"
    it = ex.map(tasks.wait_for_file, [str(gate.release)] + [str(later)] * 39)  # 40 tasks
    gate.open("first")
    try:
        assert next(it) == "first"  # the second runs, waiting; 38 wait for the worker
        it.close()
        assert calls == [39]  # one cancel, for all the items not yet yielded
        states = Counter(str(j.state) for j in enclave.jobs.list(limit=100))
        assert states["completed"] == 1 and states["cancelled"] >= 37, states
    finally:
        tasks.release(later)


def test_map_packs_no_more_items_than_fit_under_the_queues_walltime_cap(
    make_executor, enclave
):
    ex = make_executor(1, walltime=25, start_node=False)  # the test queue's cap: 60 min
    it = ex.map(tasks.square, range(1000))

    def recorded():
        jobs = enclave.jobs.list(limit=1000)
        return len(jobs) == 500 and jobs

    try:
        jobs = wait_for(recorded, what="the map's 500 tasks recorded")
        assert {j.n for j in jobs} == {2}  # not 1000 // 64 = 15: 2 x 25 min fit under 60
        assert {j.walltime for j in jobs} == {2 * 25 * 60.0}
    finally:
        it.close()


def test_the_last_packed_map_task_of_fewer_items_gets_their_walltimes_only(
    make_executor, enclave
):
    """129 items on one worker pack 2 a task (129 // 64): the 65th task holds the one item
    left, and got 2 walltimes all the same, so that item ran on past its own walltime,
    up to twice it, before it was killed."""
    ex = make_executor(1, walltime=1, start_node=False)
    it = ex.map(tasks.square, range(129))

    def recorded():
        jobs = enclave.jobs.list(limit=1000)
        return len(jobs) == 65 and jobs

    try:
        jobs = wait_for(recorded, what="the map's 65 tasks recorded")
        assert sorted((j.n, j.walltime) for j in jobs)[0] == (1, 60.0)  # not (1, 120.0)
        assert {(j.n, j.walltime) for j in jobs if j.n != 1} == {(2, 120.0)}
    finally:
        it.close()


def test_packed_map_runs_on_a_node_whose_cap_is_under_the_packed_sum(
    enclave_dir, start_node, make_executor, enclave
):
    """Each item asks for 5 minutes, the node takes 10, a packed task of 3 asks for 15:
    it runs, its walltime held to the node's cap."""
    start_node("--max-walltime", "10", workers=1)
    ex = make_executor(1, walltime=5, start_node=False)
    assert list(ex.map(tasks.square, range(192), timeout=GUARD)) == [i * i for i in range(192)]
    jobs = enclave.jobs.list(limit=100)
    assert {j.n for j in jobs} == {3} and {j.state for j in jobs} == {"completed"}


def test_a_task_whose_walltime_each_is_not_a_walltime_is_refused(make_executor, enclave):
    import kotta_executor.executor as E

    ex = make_executor(1)
    opts = E.replace(ex._options, walltime=60.0, walltime_each=90.0)  # more than the sum
    f = ex._submit(tasks.square, [((2,), {})], opts)
    with pytest.raises(kotta_executor.CorruptTask, match="walltime_each 90.0 is not a walltime"):
        f.result(GUARD)


def test_a_task_whose_max_tasks_per_child_is_malformed_is_refused(make_executor):
    """A client that skipped the executor's check (here, by setting what it checks):
    the node refuses the signed task as corrupt, naming the field."""
    ex = make_executor(1)
    ex._max_tasks_per_child = "2"
    with pytest.raises(kotta_executor.CorruptTask, match="'max_tasks_per_child' must be an "
                                                         "integer of at least 1"):
        ex.submit(tasks.square, 2).result(GUARD)
    ex._max_tasks_per_child = 2  # (and a good one runs)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4


def test_map_items_that_wait_for_futures_are_not_packed_together(executor):
    """A failed dependency fails its own item only: items with futures are not packed
    (one failing would fail the others of its task)."""
    def done(value=None, exc=None) -> cf.Future:
        f: cf.Future = cf.Future()
        f.set_running_or_notify_cancel()
        f.set_exception(exc) if exc is not None else f.set_result(value)
        return f

    items = [done(5), done(exc=ValueError("bad")), *range(254)]  # 2 workers: 2 a task
    it = executor.map(tasks.square, items, timeout=GUARD)
    assert next(it) == 25  # item 0's own dependency succeeded
    with pytest.raises(kotta_executor.DependencyError):
        next(it)


def test_map_chunksize_below_one_raises_value_error(executor, process_pool):
    for chunksize in (0, -1):
        with pytest.raises(ValueError):
            process_pool.map(tasks.square, [1, 2], chunksize=chunksize)
        with pytest.raises(ValueError):
            executor.map(tasks.square, [1, 2], chunksize=chunksize)


def test_map_chunksize_not_an_integer_raises_value_error_naming_it(
    executor, process_pool, enclave
):
    """As ProcessPoolExecutor, whose islice refuses it: a float chunksize (``len(xs) / 4``)
    is a ValueError, 1.0 too, with a buffersize or not.  (It was a TypeError from range()
    that named no argument, and 1.0 was taken as 1.)  An integer numpy's stands for works."""
    for chunksize in (1.0, 2.0, 2.5):
        with pytest.raises(ValueError):
            process_pool.map(tasks.square, [1, 2], chunksize=chunksize)
        for buffersize in (None, 2):
            with pytest.raises(ValueError, match=r"chunksize must be an integer, not [.0-9]+$"):
                executor.map(tasks.square, [1, 2], chunksize=chunksize, buffersize=buffersize)
    assert enclave.jobs.list() == []  # nothing was sent
    np = pytest.importorskip("numpy")
    assert list(executor.map(tasks.square, range(5), chunksize=np.int64(2))) == [
        0, 1, 4, 9, 16,
    ]


# --------------------------------------------------------------------------- what can be sent


def test_local_and_main_functions_closures_lambdas_and_kwargs(executor, process_pool):
    offset = 1000

    def shifted(x, *, scale=1):
        return x * scale + offset

    def make_adder(n):
        return lambda x: x + n

    fs = [
        executor.submit(shifted, 5),
        executor.submit(shifted, 5, scale=3),
        executor.submit(lambda a, b: a - b, 10, b=4),
        executor.submit(make_adder(7), 1),
        executor.submit(functools.partial(tasks.add, b=5), 1),
        executor.submit(tasks.add, 1, b=2),
        executor.submit(tasks.add, a=4, b=5),
    ]
    assert [f.result(timeout=GUARD) for f in fs] == [1005, 1015, 6, 8, 6, 3, 9]
    assert list(executor.map(shifted, [1, 2])) == [1001, 1002]

    # functions of a ``__main__`` module (a script, a notebook) travel by value
    namespace = {"__name__": "__main__"}
    exec(
        "factor = 3\n"
        "def triple(x):\n"
        "    return x * factor\n"
        "def outer(n):\n"
        "    def inner(x):\n"
        "        return triple(x) + n\n"
        "    return inner\n",
        namespace,
    )
    assert namespace["triple"].__module__ == "__main__"
    assert executor.submit(namespace["triple"], 4).result(timeout=GUARD) == 12
    assert executor.submit(namespace["outer"](1), 4).result(timeout=GUARD) == 13

    # ``fn`` is positional-only: a task with a parameter called ``fn`` gets it as a keyword
    assert executor.submit(tasks.apply_fn, fn=tasks.square, x=6).result(timeout=GUARD) == 36
    view = executor.with_options(walltime=1)
    assert view.submit(tasks.apply_fn, fn=tasks.square, x=5).result(timeout=GUARD) == 25
    # like the stdlib, the callable itself cannot be passed as fn=
    with pytest.raises(TypeError):
        process_pool.submit(fn=tasks.square, x=2)
    with pytest.raises(TypeError):
        executor.submit(fn=tasks.square, x=2)
    with pytest.raises(TypeError):
        executor.submit(42)


def test_unpicklable_call_fails_at_submit_and_sends_nothing(executor, enclave):
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match=r"argument 0 .*lock"):
        executor.submit(tasks.noop, threading.Lock())
    with pytest.raises(SerializationError, match=r"keyword argument 'b'"):
        executor.submit(tasks.add, 1, b=threading.Lock())
    with pytest.raises(SerializationError, match=r"uses_lock.*function itself") as info:
        executor.submit(uses_lock)
    assert isinstance(info.value, kotta_executor.KottaError)
    assert isinstance(info.value, pickle.PicklingError)

    ok = executor.submit(tasks.square, 3)
    assert ok.result(timeout=GUARD) == 9
    assert [j.job_id for j in enclave.jobs.list()] == [ok.job_id]


_HOLDS = """
import functools, socket, threading

LOCK = threading.Lock()
CONFIG = {"retries": 3, "guard": threading.RLock()}
SOCK = socket.socket()

def uses_lock():
    with LOCK:
        return 1

def uses_config():
    return CONFIG["retries"]

def calls_helper():
    return uses_lock() + 1

def with_default(x, sock=SOCK):
    return x

def make_closure():
    guard = threading.Lock()
    def closure():
        with guard:
            return 1
    return closure
"""


def test_an_unpicklable_global_or_closure_variable_of_main_is_named(executor, enclave):
    """A function of a script or notebook that uses a module-level lock, socket or a dict
    holding one: submit said "the function itself cannot be pickled (cannot pickle
    '_thread.lock' object)", not which of the values it uses is at fault, and a function
    uses many.  The error names it now (a global, a closure variable, a default), and the
    function through which it is used."""
    ns = {"__name__": "__main__"}
    exec(compile(_HOLDS, "<cell>", "exec"), ns)  # noqa: S102 - a notebook cell's functions
    try:
        for fn, what in (
            (ns["uses_lock"], r"global 'LOCK' of uses_lock \(<unlocked _thread.lock"),
            (ns["uses_config"], r"global 'CONFIG' of uses_config \(\{'retries': 3"),
            (ns["calls_helper"], r"global 'LOCK' of uses_lock \(.*\), used by calls_helper"),
            (ns["with_default"], r"default 'sock' of with_default \(<socket.socket"),
            (ns["make_closure"](), r"closure variable 'guard' of make_closure.<locals>.closure"),
            (functools.partial(ns["calls_helper"]), r"global 'LOCK' of uses_lock"),
        ):
            with pytest.raises(SerializationError, match="function itself cannot be pickled: "
                                                         + what):
                executor.submit(fn)
    finally:
        ns["SOCK"].close()
    assert enclave.jobs.list() == []


def test_a_task_that_would_take_the_clients_executor_is_refused_naming_it(executor, enclave):
    """A notebook function that uses the executor (or the decorator's connection, or a
    with_options view) was refused with pickle's "cannot pickle '_thread._local' object",
    which names none of them."""
    konn = kotta_executor.connect(enclave.home)
    view = executor.with_options(walltime=2)

    def resubmits(x):
        return executor.submit(tasks.square, x).result()

    def attaches(job_id):
        return konn.attach(job_id)

    for fn, what in ((resubmits, "a KottaExecutor"), (attaches, r"a connection \(kotta_executor\.connect\(\)\)")):
        with pytest.raises(SerializationError, match=f"function itself .*{what} cannot be "
                                                     "sent to a task: it is the client's"):
            executor.submit(fn, 1)
    with pytest.raises(SerializationError, match=r"argument 0 .*with_options\(\) view cannot"):
        executor.submit(tasks.noop, view)
    assert enclave.jobs.list() == []


def test_a_map_with_an_unpicklable_item_raises_and_runs_none_of_its_earlier_items(
    make_executor, gate, tmp_path
):
    ex = make_executor(1)
    blocker, started = gate.submit_blocking(ex)  # holds the one worker: the map's tasks wait
    wait_started(started)
    marks = [str(tmp_path / f"item-{i}") for i in range(3)]
    with pytest.raises(SerializationError, match=r"argument 0 .*lock") as info:
        ex.map(tasks.create_file, [*marks, threading.Lock()], chunksize=1)
    # "argument 0" is the place in the call, the same for every item: which item is it
    assert "it is item 3 of the map's iterables (counting from 0)" in info.value.__notes__
    made = [j for j in ex.enclave.jobs.list(limit=10) if j.job_id != blocker.job_id]
    assert made and {str(j.state) for j in made} == {"cancelled"}, made
    gate.open()
    assert blocker.result(timeout=GUARD) == "released"
    assert ex.submit(tasks.square, 3).result(timeout=GUARD) == 9  # after the map's tasks
    assert not any(Path(m).exists() for m in marks)


# --------------------------------------------------------------------------- shutdown


def test_context_manager_and_submit_after_shutdown(make_executor, enclave):
    with make_executor(1) as ex:
        assert ex.submit(tasks.square, 4).result(timeout=GUARD) == 16
        assert enclave.nodes.live("test")
    # shutdown(wait=True) stopped the node this executor started
    assert enclave.nodes.live("test") == []
    with pytest.raises(RuntimeError):
        ex.submit(tasks.square, 2)
    with pytest.raises(RuntimeError):
        ex.with_options(walltime=1).submit(tasks.square, 2)
    with pytest.raises(RuntimeError):
        ex.map(tasks.square, [1])
    ex.shutdown()  # a second shutdown is harmless


def test_shutdown_without_any_submit(make_executor):
    ex = make_executor(1)
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        ex.submit(tasks.noop)


def test_shutdown_without_wait_still_delivers(make_executor, gate):
    ex = make_executor(1)
    f, started = gate.submit_blocking(ex)
    wait_started(started)
    ex.shutdown(wait=False)
    assert not f.done()
    with pytest.raises(RuntimeError):
        ex.submit(tasks.noop)
    gate.open("after shutdown")
    assert f.result(timeout=GUARD) == "after shutdown"


@pytest.mark.parametrize("workers", [0, -1])
def test_max_workers_must_be_positive(enclave_dir, workers):
    with pytest.raises(ValueError):
        KottaExecutor(workers, enclave=enclave_dir)


@pytest.mark.parametrize("workers", [2.0, 2.5, "2"])
def test_max_workers_must_be_an_integer(enclave_dir, workers):
    """As ProcessPoolExecutor, a TypeError when the executor is made.  A float (``n / 2``)
    was taken, and the node the executor started refused ``--workers 2.0``: every submit
    waited while it tried, until the executor broke (BrokenEnclave) six node starts later."""
    with pytest.raises(TypeError):
        cf.ProcessPoolExecutor(workers)
    with pytest.raises(TypeError):
        KottaExecutor(workers, enclave=enclave_dir)


def test_shutdown_wait_waits_for_running_tasks(executor, gate, enclave):
    f, started = gate.submit_blocking(executor)
    wait_started(started)
    calling = threading.Event()
    seen = {}

    def shut():
        calling.set()
        executor.shutdown(wait=True)
        seen["done"] = f.done()

    t = threading.Thread(target=shut)
    t.start()
    assert calling.wait(GUARD)
    t.join(0.3)
    assert t.is_alive(), "shutdown(wait=True) returned while a task was still running"
    gate.open("finished")
    t.join(GUARD)
    assert not t.is_alive()
    assert seen["done"] is True
    assert f.result() == "finished"
    assert job_state(enclave, f.job_id) == "completed"


def test_shutdown_cancel_futures(executor, gate, tmp_path, enclave):
    running = [gate.submit_blocking(executor) for _ in range(2)]
    wait_started(*(s for _, s in running))
    markers = [tmp_path / f"marker-{i}" for i in range(3)]
    queued = [executor.submit(tasks.create_file, str(m)) for m in markers]
    wait_for(
        lambda: all(job_state(enclave, f.job_id) == "pending" for f in queued),
        what="the queued jobs to be recorded",
    )
    calling = threading.Event()
    t = threading.Thread(
        target=lambda: (calling.set(), executor.shutdown(wait=True, cancel_futures=True))
    )
    t.start()
    assert calling.wait(GUARD)
    wait_for(lambda: all(f.cancelled() for f in queued), what="queued futures to be cancelled")
    for f in queued:
        assert f.done()
        with pytest.raises(cf.CancelledError):
            f.result(timeout=0)
        assert job_state(enclave, f.job_id) == "cancelled"
        assert f.status() == "cancelled"
    assert not any(f.done() for f, _ in running)
    gate.open("kept")
    t.join(GUARD)
    assert not t.is_alive()
    assert [f.result(timeout=0) for f, _ in running] == ["kept", "kept"]
    assert not any(m.exists() for m in markers)  # the node is gone: they never ran
    with pytest.raises(RuntimeError):
        executor.submit(tasks.noop)


# --------------------------------------------------------------------------- output


def test_stdout_and_stderr_each_task_its_own(make_executor, monkeypatch):
    # Without PYTHONUNBUFFERED (the usual case) libc stdout into a file is fully buffered.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    ex = make_executor(1)  # one worker: every task runs on the same warm worker
    f = ex.submit(tasks.write_everywhere)
    assert f.result(timeout=GUARD) == "done"
    for line in ("python stdout", "c stdout", "child stdout"):
        assert line in f.stdout
    for line in ("python stderr", "child stderr"):
        assert line in f.stderr
    assert "stderr" not in f.stdout and "stdout" not in f.stderr

    first = ex.submit(tasks.say, "first")
    pid = first.result(timeout=GUARD)
    second = ex.submit(tasks.say, "second")
    assert second.result(timeout=GUARD) == pid  # same warm worker
    third = ex.submit(tasks.c_puts_flushed, "third")
    assert third.result(timeout=GUARD) == pid
    assert first.stdout == "first out\n" and first.stderr == "first err\n"
    assert second.stdout == "second out\n" and second.stderr == "second err\n"
    assert third.stdout == "third\n" and third.stderr in ("", None)

    # C output the task left in libc's buffer stays with that task
    fourth = ex.submit(tasks.c_puts_unflushed, "fourth")
    assert fourth.result(timeout=GUARD) == pid
    fifth = ex.submit(tasks.say, "fifth")
    assert fifth.result(timeout=GUARD) == pid
    assert fourth.stdout == "fourth\n"
    assert fifth.stdout == "fifth out\n"


@pytest.mark.parametrize("how", ["segfault", "wait", "child"])
def test_what_a_task_printed_is_in_its_stdout_when_it_crashed_was_killed_or_ran_a_child(
        how, start_node, make_executor, monkeypatch, tmp_path):
    """Without PYTHONUNBUFFERED (the usual case) the worker's stdout is a file: the bug
    was a block-buffered ``sys.stdout``, whose last prints were still in the worker when
    it died (``stdout == ""``), and came after a child's output (``"child\nstep 1..."``)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    f = ex.submit(tasks.print_then, how, str(started), str(release))
    if how == "segfault":
        with pytest.raises(kotta_executor.WorkerDied):
            f.result(GUARD)
    elif how == "wait":
        wait_for(started.exists, what="the task to print and start waiting")
        assert f.kill()
        with pytest.raises(TaskKilled):
            f.result(GUARD)
    else:
        f.result(GUARD)
    assert f.stdout == ("step 1\nstep 2\nchild\nstep 3\n" if how == "child"
                        else "step 1\nstep 2\n")


@pytest.mark.parametrize("how", ["segfault", "return"])
def test_what_c_code_printed_is_in_the_tasks_stdout_in_order_also_when_it_crashed(
        how, start_node, make_executor, monkeypatch):
    """libc's stdout into a file is fully buffered: the bug was C's lines lost when the
    task crashed the worker (``"py 2\n"``), and after the task's Python prints
    (``"py 2\npy 4\nC 1\nC 3\n"``), where a terminal shows them as written."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.c_puts_then, how)
    if how == "segfault":
        with pytest.raises(kotta_executor.WorkerDied):
            f.result(GUARD)
        assert f.stdout == "C 1\npy 2\nC 3\n"
    else:
        f.result(GUARD)
        assert f.stdout == "C 1\npy 2\nC 3\npy 4\n"


# --------------------------------------------------------------------------- status, cancel


def test_status_pending_processing_completed_failed(executor, gate):
    a, sa = gate.submit_blocking(executor)
    b, sb = gate.submit_blocking(executor)
    c = executor.submit(tasks.square, 5)
    assert c.status() == "pending"
    wait_started(sa, sb)
    wait_for(lambda: a.status() == "processing", what="a to be processing")
    # (a task can begin before its node's claim commits: the node hands it over first)
    wait_for(lambda: b.status() == "processing", what="b to be processing")
    assert c.status() == "pending"  # both workers are busy
    gate.open()
    assert c.result(timeout=GUARD) == 25
    assert [a.result(timeout=GUARD), b.result(timeout=GUARD)] == ["released"] * 2
    assert a.status() == b.status() == c.status() == "completed"

    bad = executor.submit(tasks.raise_value_error, "nope")
    with pytest.raises(ValueError, match="nope"):
        bad.result(timeout=GUARD)
    assert bad.status() == "failed"


def test_cancel_a_queued_task_never_runs_it(executor, gate, tmp_path, enclave):
    a, sa = gate.submit_blocking(executor)
    b, sb = gate.submit_blocking(executor)
    wait_started(sa, sb)
    marker = tmp_path / "must-not-exist"
    queued = executor.submit(tasks.create_file, str(marker), "ran")
    wait_for(lambda: job_state(enclave, queued.job_id) == "pending", what="queued job record")

    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    assert queued.cancel() is True  # cancelling again is fine
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=0)
    assert queued.status() == "cancelled"
    assert job_state(enclave, queued.job_id) == "cancelled"
    done, _ = cf.wait([queued], timeout=0)
    assert done == {queued}

    # a running task cannot be cancelled; it completes
    assert a.cancel() is False
    assert not a.cancelled()
    gate.open()
    assert a.result(timeout=GUARD) == b.result(timeout=GUARD) == "released"
    # work queued after the cancelled task runs; the cancelled one never does
    later = [executor.submit(tasks.noop, i) for i in range(4)]
    assert [f.result(timeout=GUARD) for f in later] == [0, 1, 2, 3]
    assert not marker.exists()
    assert job_state(enclave, queued.job_id) == "cancelled"


def test_cancel_a_task_not_yet_sent(make_executor, enclave):
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.noop, 1)
    assert f.cancel() is True
    assert f.cancelled()
    assert f.status() == "cancelled"
    assert job_state(enclave, f.job_id) == "cancelled"  # recorded, though never sent


def received_by_a_node(enclave, job_id: str) -> bool:
    """Has a node taken the job's task message off the queue?  (A node receives and
    dispatches in one transaction, so once this is true the dispatch decision was made.)"""
    rows = enclave._db.read("SELECT receive_count FROM messages WHERE job_id=?", (job_id,))
    return bool(rows) and rows[0][0] > 0


def test_task_queued_behind_a_running_one_on_warm_workers_stays_cancellable(
    executor, gate, tmp_path, enclave
):
    warm = [executor.submit(tasks.noop, i) for i in range(400)]  # warm workers: tiny tasks
    assert not cf.wait(warm, timeout=GUARD).not_done
    running = [gate.submit_blocking(executor) for _ in range(2)]
    try:
        wait_started(*(s for _, s in running))
        marker = tmp_path / "must-not-exist"
        queued = executor.submit(tasks.create_file, str(marker), "ran")
    except BaseException:
        gate.open()
        raise
    _assert_taken_but_cancellable(executor, enclave, gate, running, queued, marker)


def _assert_taken_but_cancellable(executor, enclave, gate, running, queued, marker):
    """``queued`` reached a node while ``running`` block every worker: it has not started,
    is pending and can be cancelled; once released, it never runs."""
    try:
        wait_started(*(s for _, s in running))
        wait_for(lambda: received_by_a_node(enclave, queued.job_id), what="the node to take it")
        assert not marker.exists()  # it has not started...
        assert queued.status() == "pending"  # ...so it is pending
        assert queued.cancel() is True  # ...and cancellable
    finally:
        gate.open()
    assert [f.result(timeout=GUARD) for f, _ in running] == ["released"] * 2
    assert executor.submit(tasks.noop, 1).result(timeout=GUARD) == 1
    assert not marker.exists()


def test_tasks_arriving_with_long_ones_on_warm_workers_stay_cancellable(
    executor, gate, tmp_path, enclave
):
    warm = [executor.submit(tasks.noop, i) for i in range(400)]  # warm workers: tiny tasks
    assert not cf.wait(warm, timeout=GUARD).not_done
    marker = tmp_path / "must-not-exist"
    # Submitted together, as a user does with a few calls in a row.  Holding the lock the
    # manager sends under makes them one batch, which the node takes in one step.
    with executor._send_lock:
        running = [gate.submit_blocking(executor) for _ in range(2)]
        queued = executor.submit(tasks.create_file, str(marker), "ran")
    _assert_taken_but_cancellable(executor, enclave, gate, running, queued, marker)


@pytest.mark.parametrize("workers", [1, 3])
def test_tasks_queued_behind_many_cancelled_ones_start_at_once(make_executor, start_node,
                                                                 tmp_path, workers):
    """Cancelled jobs leave their task messages on the queue, and a node drops each as it
    claims it.  One planned for a worker takes that worker's turn, and the tasks behind it
    were skipped for it; once it was dropped the worker was free, but nothing woke the node
    for them (a worker's result does; a dropped task's nothing) until its next poll.  So a
    backlog of a few hundred cancelled tasks (a shutdown(cancel_futures=True), an abandoned
    map) went a few a poll interval, and the tasks behind it (a new executor's first task)
    waited minutes: here, with a long poll interval, past the guard."""
    start_node("--poll-interval", "120", workers=workers)
    ex = make_executor(1, start_node=False)
    go = tmp_path / "go"
    blockers = [ex.submit(tasks.touch_then_wait, str(tmp_path / f"started{i}"), str(go))
                for i in range(workers)]
    wait_for(lambda: all((tmp_path / f"started{i}").exists() for i in range(workers)),
             what="the blockers to start")
    queued = [ex.submit(tasks.square, i) for i in range(200)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert sum(f.cancelled() for f in queued) > 150  # (a few wait in the workers' pipes)
    tasks.release(go, "go")
    assert [b.result(timeout=GUARD) for b in blockers] == ["go"] * workers
    probe = make_executor(1, start_node=False)
    assert list(probe.map(tasks.square, [3], timeout=GUARD)) == [9]  # (a deadlock guard)


def test_two_cancels_at_once_both_say_true_for_a_job_that_never_runs(make_executor, enclave):
    """shutdown(cancel_futures=True) in one thread has recorded the job cancelled, and not
    yet marked its future, when f.cancel() comes from another: the second found nothing
    left to cancel and said False, for a job that never runs and a future that ends
    cancelled (the stdlib says False only once the call runs or is done).  The delay is
    injected around the executor's own cancel (which runs as it is)."""
    from kotta_executor.states import JobState

    ex = make_executor(2, start_node=False)  # no node: the job stays pending
    f = ex.submit(tasks.noop, 1)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job recorded")
    recorded, go = threading.Event(), threading.Event()
    real, stopper = ex._cancel_jobs, []

    def cancel_jobs(ids, *args):  # the stopper pauses once it has recorded the cancellation
        done = real(ids, *args)
        if threading.current_thread() in stopper:
            recorded.set()
            go.wait(GUARD)
        return done

    ex._cancel_jobs = cancel_jobs
    t = threading.Thread(target=ex.shutdown, kwargs={"wait": False, "cancel_futures": True})
    stopper.append(t)
    t.start()
    try:
        assert recorded.wait(GUARD)
        answer = f.cancel()
    finally:
        go.set()
        t.join(GUARD)
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
    assert answer is True and f.cancelled()


def test_shutdown_cancels_a_submit_it_accepted_before_its_job_was_placed(make_executor,
                                                                        enclave):
    """A submit accepted (its future registered) before shutdown(cancel_futures=True), whose
    job was not yet in the outbox, a hand-off or the job table when the cancel looked: its
    future was not cancelled, and its job was sent and ran (a process pool cancels every
    pending future it accepted).  The window is held open by a delay injected before the
    executor's own send."""
    from kotta_executor.states import JobState

    ex = make_executor(2, start_node=False)
    ex.submit(tasks.noop).cancel()  # the manager runs
    real = ex._send_now
    at_send, go = threading.Event(), threading.Event()

    def send_now(job):
        at_send.set()
        go.wait(GUARD)
        return real(job)

    ex._send_now = send_now
    out: list[KottaFuture] = []
    t = threading.Thread(target=lambda: out.append(ex.submit(tasks.noop, 7)))
    t.start()
    try:
        assert at_send.wait(GUARD)  # accepted: registered, not yet placed
        ex.shutdown(wait=False, cancel_futures=True)
    finally:
        go.set()
        t.join(GUARD)
    (f,) = out
    assert f.cancelled()
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="its record")
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED


def test_cancel_while_another_thread_submits(make_executor):
    ex = make_executor(2, start_node=False)  # no node: nothing starts, everything is cancellable
    fs: list[KottaFuture] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    deadline = time.monotonic() + 2.0  # a stress run, not a wait

    def submit():
        while not stop.is_set() and time.monotonic() < deadline:
            fs.append(ex.submit(tasks.noop))
        stop.set()

    def cancel():  # cancel every other future, soon after it was submitted
        i = 0
        while not stop.is_set():
            n = len(fs)
            for f in fs[i:n:2]:
                try:
                    f.cancel()
                except Exception as exc:  # noqa: BLE001 - any error from cancel() is the bug
                    errors.append(exc)
                    stop.set()
                    break
            i += (n - i + 1) // 2 * 2

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: exercise the interleavings
    threads = [threading.Thread(target=submit), threading.Thread(target=cancel)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD)
    finally:
        stop.set()
        sys.setswitchinterval(old)
    try:
        assert errors == []
        # nothing ran (no node), so every future can still be cancelled: none was dropped
        ex.shutdown(wait=False, cancel_futures=True)
        assert [f for f in fs if not f.cancelled()] == []
    finally:
        ex._futures.clear()  # a lost future would keep shutdown() waiting forever


def test_running_turns_true_soon_after_a_node_starts_the_job(make_executor, gate, monkeypatch):
    """Without a call to status(): the executor looks the oldest futures up now and then
    (running() had waited for the 5 s reconcile; here that never comes)."""
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 3600.0)
    ex = make_executor(1)
    first, started = gate.submit_blocking(ex)
    second = ex.submit(tasks.square, 3)  # behind it: pending, not running
    wait_started(started)
    wait_for(first.running, what="running() to say the job runs")
    assert not second.running() and not second.done()
    gate.open()
    assert first.result(timeout=GUARD) == "released" and second.result(timeout=GUARD) == 9


def test_running_turns_true_soon_after_the_executor_was_idle(make_executor, gate, monkeypatch):
    """An idle manager (no future outstanding) slept 2 s a turn, and a lone submit, sent
    from the caller's thread, did not wake it: running() of a job submitted after a pause
    turned True up to 2 s after the job started (1.3 to 1.9 s measured), not within about
    RUNNING_LOOK as docs/guide.md says.  The manager never sleeps longer than a look."""
    waits: list[float] = []
    real_readable = executor_module._readable

    def recording_readable(fds, timeout):
        if threading.current_thread().name.startswith("kotta-manager-"):
            waits.append(timeout)
        return real_readable(fds, timeout)

    monkeypatch.setattr(executor_module, "_readable", recording_readable)
    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4
    turns = len(waits)
    wait_for(lambda: len(waits) >= turns + 2, what="the manager's turns once idle")
    f, started = gate.submit_blocking(ex)
    wait_started(started)
    wait_for(f.running, what="running() to say the job runs")
    gate.open()
    assert f.result(timeout=GUARD) == "released"
    assert max(waits) <= executor_module.RUNNING_LOOK, sorted(set(waits))


def test_running_turns_true_behind_tasks_waiting_for_dependencies(make_executor, tmp_path,
                                                                   monkeypatch):
    """Tasks waiting for a dependency have no job to look up: they filled the look's
    window, and a job started behind them never turned running() True (no reconcile)."""
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 3600.0)
    monkeypatch.setattr(executor_module, "RUNNING_WINDOW", 2)
    ex = make_executor(2)
    release = tmp_path / "release"
    marks = [tmp_path / f"started-{i}" for i in range(2)]
    hold = ex.submit(tasks.touch_then_wait, str(marks[0]), str(release))
    waiting = [ex.submit(tasks.add, hold, "!") for _ in range(3)]  # until hold is done
    later = ex.submit(tasks.touch_then_wait, str(marks[1]), str(release))
    wait_started(*marks)
    wait_for(later.running, what="running() of the job behind the waiting tasks")
    assert not any(f.running() or f.done() for f in waiting)
    tasks.release(release, "released")
    assert later.result(timeout=GUARD) == "released"
    assert [f.result(timeout=GUARD) for f in waiting] == ["released!"] * 3


def test_running_turns_true_beyond_the_first_window_of_futures(make_executor, tmp_path, monkeypatch):
    """The look took the oldest RUNNING_WINDOW futures, then dropped those known to run:
    with more than that many running, the later ones never learnt it (here 1 and 2)."""
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 3600.0)
    monkeypatch.setattr(executor_module, "RUNNING_WINDOW", 1)
    ex = make_executor(2)
    release = tmp_path / "release"
    marks = [tmp_path / f"started-{i}" for i in range(2)]
    fs = [ex.submit(tasks.touch_then_wait, str(m), str(release)) for m in marks]
    wait_started(*marks)
    for f in fs:
        wait_for(f.running, what=f"running() of job {f.job_id}")
    tasks.release(release, "released")
    assert [f.result(timeout=GUARD) for f in fs] == ["released"] * 2


def test_kill_stops_a_running_task(executor, gate, enclave):
    f, started = gate.submit_blocking(executor)
    wait_started(started)
    pid = int(started.read_text())
    assert psutil.pid_exists(pid)
    t0 = time.monotonic()
    assert f.kill() is True
    with pytest.raises(TaskKilled) as info:
        f.result(timeout=GUARD)
    elapsed = time.monotonic() - t0
    # touch_then_wait would have waited 60 s on its own: it was stopped, not left to finish
    assert elapsed < GUARD / 2
    assert isinstance(info.value, cf.CancelledError)
    assert f.job_id in "".join(getattr(info.value, "__notes__", []))
    assert f.status() == "cancelled"
    assert job_state(enclave, f.job_id) == "cancelled"
    assert not psutil.pid_exists(pid)
    assert f.kill() is False  # already finished
    # the node replaced the worker: later tasks still run, elsewhere
    pids = [executor.submit(tasks.worker_pid).result(timeout=GUARD) for _ in range(3)]
    assert pid not in pids
    assert executor.submit(tasks.square, 9).result(timeout=GUARD) == 81


def test_kill_a_queued_task_cancels_it(executor, gate, tmp_path, enclave):
    running = [gate.submit_blocking(executor) for _ in range(2)]
    wait_started(*(s for _, s in running))
    marker = tmp_path / "killed-before-start"
    queued = executor.submit(tasks.create_file, str(marker))
    wait_for(lambda: job_state(enclave, queued.job_id) == "pending", what="queued job record")
    assert queued.kill() is True
    assert queued.cancelled()
    gate.open()
    assert [f.result(timeout=GUARD) for f, _ in running] == ["released"] * 2
    assert executor.submit(tasks.noop, 1).result(timeout=GUARD) == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- options


def test_with_options_per_call(executor, enclave, gate):
    f = executor.with_options(walltime=2).submit(tasks.square, 3)
    g = executor.with_options(walltime=dt.timedelta(seconds=90)).submit(tasks.square, 4)
    h = executor.submit(tasks.square, 5)
    results = [x.result(timeout=GUARD) for x in (f, g, h)]
    assert results == [9, 16, 25]
    assert enclave.jobs.get(f.job_id).walltime == 120.0
    assert enclave.jobs.get(g.job_id).walltime == 90.0
    assert enclave.jobs.get(h.job_id).walltime == 300.0  # the executor's default: 5 minutes
    assert list(executor.with_options(walltime=1).map(tasks.square, [1, 2])) == [1, 4]

    # a walltime as a timedelta is enforced
    short = executor.with_options(walltime=dt.timedelta(seconds=1))
    late = short.submit(tasks.wait_for_file, str(gate.release))
    with pytest.raises(kotta_executor.WalltimeExceeded) as info:
        late.result(timeout=GUARD)
    assert isinstance(info.value, TimeoutError)
    assert enclave.jobs.get(late.job_id).walltime == 1.0
    assert late.status() == "failed"

    # options views chain, and a view's shutdown leaves the executor alive
    view = executor.with_options(walltime=3).with_options(queue="Test")
    view.shutdown()
    k = view.submit(tasks.square, 6)
    assert k.result(timeout=GUARD) == 36
    job = enclave.jobs.get(k.job_id)
    assert (job.queue, job.walltime) == ("test", 180.0)


def test_with_options_queue_production(executor, enclave):
    f = executor.with_options(queue="prod").submit(tasks.square, 11)
    assert f.result(timeout=GUARD) == 121
    assert enclave.jobs.get(f.job_id).queue == "production"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue": "nope"},
        {"queue": ""},
        {"queue": 3},
        {"walltime": 0},
        {"walltime": -1},
        {"walltime": float("inf")},
        {"walltime": float("nan")},
        {"walltime": "5"},
        {"walltime": True},
        {"walltime": dt.timedelta(0)},
        {"walltime": dt.timedelta(seconds=-5)},
    ],
)
def test_with_options_rejects_invalid_values(enclave_dir, kwargs):
    ex = KottaExecutor(1, enclave=enclave_dir, start_node=False)
    try:
        with pytest.raises(ValueError):
            ex.with_options(**kwargs)
        with pytest.raises(ValueError):
            KottaExecutor(1, enclave=enclave_dir, start_node=False, **kwargs)
    finally:
        ex.shutdown()


# --------------------------------------------------------------------------- attach


def test_attach_to_a_finished_job(executor, make_executor):
    f = executor.submit(tasks.square, 12)
    assert f.result(timeout=GUARD) == 144
    other = make_executor(1, start_node=False)
    g = other.attach(f.job_id)
    assert isinstance(g, KottaFuture)
    assert g.job_id == f.job_id
    assert g.result(timeout=GUARD) == 144
    assert g.status() == "completed"

    bad = executor.submit(tasks.raise_value_error, "remote")
    with pytest.raises(ValueError):
        bad.result(timeout=GUARD)
    with pytest.raises(ValueError, match="remote"):
        other.attach(bad.job_id).result(timeout=GUARD)


def test_a_result_of_a_later_wire_format_names_the_job_and_a_client_to_upgrade(
    executor, make_executor, enclave_dir
):
    """A node upgraded before its clients writes results of a later wire format: the
    future raised EnvelopeError "unsupported envelope version 3 (this kotta-executor reads
    1, 2)", naming neither the job nor what to do."""
    import sqlite3

    from kotta_executor import wire
    from kotta_executor.errors import EnvelopeError

    f = executor.submit(tasks.square, 12)
    assert f.result(timeout=GUARD) == 144
    with sqlite3.connect(enclave_dir / "kotta.db") as db:  # as a newer node would write it
        (body,) = db.execute("SELECT result FROM jobs WHERE job_id=?", (f.job_id,)).fetchone()
        newer = bytes([*body[:len(wire.MAGIC)], wire.VERSION + 1]) + body[len(wire.MAGIC) + 1:]
        db.execute("UPDATE jobs SET result=? WHERE job_id=?", (newer, f.job_id))
    other = make_executor(1, start_node=False)
    with pytest.raises(EnvelopeError) as info:
        other.attach(f.job_id).result(timeout=GUARD)
    message = str(info.value)
    assert f.job_id in message and f"version {wire.VERSION + 1}" in message
    assert "newer kotta-executor" in message and "upgrade this client" in message
    # the enclave too (not the default one): shown bare, the command looked in the
    # default enclave, and said "no job", as the note of a failed task did (bb37d58)
    assert f"`kotta status {f.job_id} --enclave {other.enclave.url}`" in message


def test_attach_to_a_running_job(executor, make_executor, gate):
    f, started = gate.submit_blocking(executor)
    wait_started(started)
    other = make_executor(1, start_node=False)
    g = other.attach(f.job_id)
    assert other.attach(f.job_id) is g
    assert not g.done()
    wait_for(lambda: g.status() == "processing", what="the attached job's record to say so")
    gate.open("attached")
    assert g.result(timeout=GUARD) == "attached"
    assert f.result(timeout=GUARD) == "attached"


def test_an_attached_running_job_and_a_refused_cancel_say_running(
    executor, make_executor, gate, monkeypatch
):
    """attach() reads the job's record: a job a node runs is running() at once, not only
    when the manager next looks; and a cancel() refused because a node has started the job
    leaves its future running(), as the stdlib's (cancel() False: running or done)."""
    f, started = gate.submit_blocking(executor)
    wait_started(started)
    for name in ("ATTACH_POLL", "RECONCILE_AFTER", "RUNNING_LOOK"):  # the manager looks
        monkeypatch.setattr(executor_module, name, 1e9)  # at no job: only what these say
    other = make_executor(1, start_node=False)
    try:
        g = other.attach(f.job_id)
        assert g.running() and not g.done()
        assert f.cancel() is False
        assert f.running() and not f.done()
    finally:
        monkeypatch.undo()
        gate.open("ran")
    other._kick(force=True)
    assert g.result(timeout=GUARD) == "ran" and f.result(timeout=GUARD) == "ran"


def test_attach_to_a_queued_job_no_node_serves_starts_a_node_for_it(make_executor, enclave):
    """A restarted session attaches to a job its previous one left queued, the node that
    served it gone: an executor that starts nodes (start_node="auto") starts one for the
    attached job's queue, as it does for a queue it submits to; else result() waits for
    ever."""
    submitter = make_executor(1, start_node=False)  # (no node: the job stays pending)
    queued = submitter.submit(tasks.square, 5)
    wait_for(lambda: enclave.jobs.get(queued.job_id) is not None, what="the job's record")
    assert enclave.nodes.live() == []
    fresh = make_executor(1)  # start_node="auto", on an embedded enclave
    assert fresh.attach(queued.job_id).result(timeout=GUARD) == 25
    assert queued.result(timeout=GUARD) == 25


def test_attached_jobs_are_looked_at_a_window_at_a_time_and_all_resolve(
    make_executor, enclave, start_node, monkeypatch
):
    """A session attached to more jobs than one look reads (ATTACH_WINDOW: a restarted
    kernel attaching to a whole sweep) looks at the next ones each time round: every
    attached future resolves, whichever window its job ends in."""
    monkeypatch.setattr(executor_module, "ATTACH_WINDOW", 2)
    submitter = make_executor(1, start_node=False)  # (no node yet: the jobs stay pending)
    fs = [submitter.submit(tasks.square, i) for i in range(7)]
    wait_for(lambda: len(enclave.jobs.get_many([f.job_id for f in fs])) == 7,
             what="the jobs' records")
    other = make_executor(1, start_node=False)
    attached = [other.attach(f.job_id) for f in fs]
    start_node(workers=1)
    assert [a.result(timeout=GUARD) for a in attached] == [i * i for i in range(7)]
    assert other._attached == set()


def test_attached_jobs_already_ended_settle_without_waiting_for_the_attach_poll(
    executor, make_executor, monkeypatch
):
    """A session attaching to a finished sweep gets every result at once: a window of
    attached jobs found mostly ended is followed by the next one at once, not ATTACH_POLL
    later (here an hour; the 5-second reconcile, too, is made an hour)."""
    fs = [executor.submit(tasks.square, i) for i in range(40)]
    assert [f.result(timeout=GUARD) for f in fs] == [i * i for i in range(40)]
    monkeypatch.setattr(executor_module, "ATTACH_WINDOW", 3)
    monkeypatch.setattr(executor_module, "ATTACH_POLL", 3600.0)
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 3600.0)
    other = make_executor(1, start_node=False)
    attached = [other.attach(f.job_id) for f in fs]
    assert [a.result(timeout=GUARD) for a in attached] == [i * i for i in range(40)]
    assert other._attached == set()


def test_job_cancelled_by_another_client_resolves_while_results_keep_coming(
    executor, make_executor, gate, enclave
):
    running = [gate.submit_blocking(executor) for _ in range(2)]
    wait_started(*(s for _, s in running))
    queued = executor.submit(tasks.noop, 1)
    wait_for(lambda: job_state(enclave, queued.job_id) == "pending", what="the queued job")
    other = make_executor(1, start_node=False)
    theirs = other.attach(queued.job_id)
    assert theirs.cancel() is True
    assert job_state(enclave, queued.job_id) == "cancelled"
    gate.open()
    assert [f.result(timeout=GUARD) for f, _ in running] == ["released"] * 2
    # the submitting executor keeps getting other results; its own future must still learn
    # what the job table says, within about the reconcile delay
    deadline = time.monotonic() + 1.5 * executor_module.RECONCILE_AFTER
    while not queued.done() and time.monotonic() < deadline:
        assert executor.submit(tasks.noop, 2).result(timeout=GUARD) == 2
        cf.wait([queued], timeout=0.25)
    assert queued.cancelled()


def test_a_with_options_view_attaches_as_its_executor_does(executor, make_executor):
    """A view of the executor made for another queue (``with_options``) attaches to a
    job as the executor does: it raised AttributeError, 'OptionsView' object has no
    attribute 'attach'."""
    f = executor.submit(tasks.square, 9)
    assert f.result(timeout=GUARD) == 81
    other = make_executor(1, start_node=False)
    view = other.with_options(queue="production", walltime=2)
    g = view.attach(f.job_id)
    assert g.result(timeout=GUARD) == 81 and g.status() == "completed"
    with pytest.raises(UnknownJob):
        view.attach("0" * 32)


def test_attach_unknown_or_malformed_job(executor):
    for job_id in ("0" * 32, "f" * 32):
        with pytest.raises(UnknownJob) as info:
            executor.attach(job_id)
        assert isinstance(info.value, LookupError)
    for job_id in ("nope", "0" * 31, "0" * 33, "G" * 32, ""):
        with pytest.raises(UnknownJob):
            executor.attach(job_id)
    # not a string at all: a TypeError naming what was given, as submit's checks (it was
    # UnknownJob, a LookupError, for a programming error: attach(None), attach(f))
    for job_id in (None, 12, b"0" * 32, ["0" * 32]):
        with pytest.raises(TypeError, match=re.escape(
                f"a job id is a string, not {type(job_id).__name__} {job_id!r}")):
            executor.attach(job_id)
        with pytest.raises(TypeError):
            executor.with_options(queue="test").attach(job_id)


# --------------------------------------------------------------------------- remote errors


def test_remote_exception_type_message_traceback_and_note(executor):
    f = executor.submit(tasks.complain_and_fail, "it went wrong")
    exc = f.exception(timeout=GUARD)
    assert type(exc) is ValueError
    assert str(exc) == "it went wrong"
    text = "".join(traceback.format_exception(exc))
    assert "complain_and_fail" in text
    assert "tasks.py" in text
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert f.job_id in notes
    assert "about to fail: it went wrong" in notes  # the stderr tail
    assert "about to fail: it went wrong" in f.stderr
    with pytest.raises(ValueError, match="it went wrong"):
        f.result()


def test_a_remote_traceback_underlines_no_wrong_code(executor):
    """A remote traceback of a map's item, as Python 3.11+ prints it, draws no carets
    (^^^) under code that did not fail: rebuilt frames run a stub, whose columns are not
    those of the remote line (they underlined "ise ValueError(f" of ``raise ...``)."""
    it = executor.map(tasks.fail_on, [1, 2], [2, 2], timeout=GUARD)
    assert next(it) == 10
    with pytest.raises(ValueError, match="item 2 is bad") as info:
        next(it)
    lines = "".join(traceback.format_exception(info.value)).splitlines()
    underlined = [
        above[len(below) - len(below.lstrip()):len(below)].strip()
        for above, below in zip(lines, lines[1:], strict=False)
        if below.strip() and set(below.strip()) <= set("^~")
    ]
    last = lines.index("ValueError: item 2 is bad")
    assert 'raise ValueError(f"item {x} is bad")' in lines[last - 1]  # the line, no carets
    # what a local traceback would underline: the test's own next(it), the worker's call
    assert set(underlined) <= {"next(it)", "fn(*args, **kwargs)"}, underlined


def test_remote_exception_chain_and_local_exception_class(executor):
    f = executor.submit(tasks.chained)
    with pytest.raises(RuntimeError, match="outer failure") as info:
        f.result(timeout=GUARD)
    exc = info.value
    assert isinstance(exc.__cause__, KeyError)
    assert exc.__cause__.args == ("missing",)
    text = "".join(traceback.format_exception(exc))
    assert "direct cause" in text
    assert text.count("in chained") >= 2  # frames of both the cause and the outer exception
    assert f.job_id in "\n".join(exc.__notes__)

    # an exception class defined in the test itself travels by value and comes back
    class Local(Exception):
        pass

    def boom(n):
        raise Local(f"boom {n}")

    with pytest.raises(Exception, match="boom 3") as info:
        executor.submit(boom, 3).result(timeout=GUARD)
    assert type(info.value).__name__ == "Local"
    assert "boom" in "".join(traceback.format_exception(info.value))


def test_attach_to_a_map_task_gives_its_values(executor, make_executor):
    list(executor.map(tasks.square, range(6), chunksize=3))
    jobs = [j for j in executor.enclave.jobs.list(limit=10) if j.n == 3]
    assert len(jobs) == 2
    other = make_executor(1, start_node=False)
    values = sorted(other.attach(j.job_id).result(timeout=GUARD) for j in jobs)
    assert values == [[0, 1, 4], [9, 16, 25]]


def test_attach_to_a_map_task_of_this_executor_gives_its_values_too(make_executor, gate):
    """attach() by the executor running the map gives what any other client's gives (it
    had returned the map's own future, whose result is each call's (ok, value))."""
    executor = make_executor(1)  # one worker, held by the blocker: the maps wait
    blocker, started = gate.submit_blocking(executor)
    wait_started(started)
    ok = executor.map(tasks.square, [2, 3], chunksize=2)
    bad = executor.map(tasks.fail_on, [1, 2], [2, 2], chunksize=2)
    one = executor.map(tasks.square, [4], chunksize=1)
    wait_for(lambda: len(executor.enclave.jobs.list(limit=10)) == 4, what="the maps' jobs")
    jobs = {(j.fn.rsplit(".", 1)[-1], j.n): j.job_id for j in executor.enclave.jobs.list(limit=10)}
    views = [executor.attach(jobs[key]) for key in (("square", 2), ("fail_on", 2), ("square", 1))]
    assert [v.done() for v in views] == [False] * 3
    gate.open()
    assert views[0].result(timeout=GUARD) == [4, 9]
    with pytest.raises(ValueError, match="item 2 is bad"):
        views[1].result(timeout=GUARD)
    assert views[2].result(timeout=GUARD) == 16
    assert list(ok) == [4, 9] and list(one) == [16]  # the maps themselves are unchanged
    with pytest.raises(ValueError, match="item 2 is bad"):
        list(bad)
    assert blocker.result(timeout=GUARD) == "released"


def test_cancelling_the_attached_view_of_a_map_task_cancels_the_map_task(make_executor, gate):
    executor = make_executor(1)
    blocker, started = gate.submit_blocking(executor)
    wait_started(started)
    it = executor.map(tasks.square, [5, 6], chunksize=2)
    wait_for(lambda: len(executor.enclave.jobs.list(limit=10)) == 2, what="the map's job")
    [job] = [j for j in executor.enclave.jobs.list(limit=10) if j.n == 2]
    view = executor.attach(job.job_id)
    assert view.cancel() is True and view.cancelled()
    with pytest.raises(cf.CancelledError):
        list(it)
    assert job_state(executor.enclave, job.job_id) == "cancelled"
    gate.open()
    assert blocker.result(timeout=GUARD) == "released"


def test_the_attached_view_of_a_running_map_task_says_running(make_executor, gate):
    """attach() to a map task of this executor that a node runs gives a view that is
    running(), as an attach() from any other client is (it read False all through the
    run, and also after a cancel() refused because the task runs)."""
    executor = make_executor(1)
    started = [gate.started(), gate.started()]
    it = executor.map(tasks.touch_then_wait, [str(p) for p in started],
                      [str(gate.release)] * 2, chunksize=2)
    wait_started(started[0])
    [job] = [j for j in executor.enclave.jobs.list(limit=10) if j.n == 2]
    source = executor._futures[job.job_id]
    wait_for(source.running, what="the map's own future to say running")
    view = executor.attach(job.job_id)
    assert view.running() and not view.done()
    assert view.cancel() is False
    assert view.running() and not view.done()
    gate.open("ran")
    assert view.result(timeout=GUARD) == ["ran", "ran"]
    assert not view.running()
    assert list(it) == ["ran", "ran"]


def test_attaching_twice_to_a_map_task_of_this_executor_gives_one_future(make_executor):
    """attach() to the same job gives the same future, also for a map task of this
    executor: each attach() made another view, which the map's future held until the task
    ended (a loop polling attach(job).done() grew for as long as the task ran)."""
    executor = make_executor(1, start_node=False)  # (no node: the task stays queued)
    it = executor.map(tasks.square, [5, 6], chunksize=2)
    [job_id] = [j for j, f in list(executor._futures.items()) if f._batch is True]
    source = executor._futures[job_id]
    view = executor.attach(job_id)
    assert executor.attach(job_id) is view
    assert len(source._done_callbacks) == 1
    assert view.cancel() is True and view.cancelled()
    with pytest.raises(cf.CancelledError):
        list(it)


def test_shutdown_cancel_futures_cancels_an_attached_job_no_node_has_started(
        make_executor, enclave):
    """An attached future is the executor's like any other: shutdown(cancel_futures=True)
    cancels it while no node has started its job (as cancel() on it would), and the
    client that submitted the job sees it cancelled."""
    submitter = make_executor(1, start_node=False)  # (no node: it stays pending)
    queued = submitter.submit(tasks.square, 5)
    wait_for(lambda: enclave.jobs.get(queued.job_id) is not None, what="the job's record")
    ex = make_executor(1, start_node=False)
    attached = ex.attach(queued.job_id)
    ex.shutdown(wait=True, cancel_futures=True)
    assert attached.cancelled()
    assert enclave.jobs.get(queued.job_id).state == "cancelled"
    with pytest.raises(cf.CancelledError):
        queued.result(GUARD)


def test_an_executor_works_on_in_a_process_that_holds_a_thousand_files(make_executor):
    """The manager waited with select(), which takes no descriptor past 1024: an executor
    made, and then used in a process that had opened a thousand files since (a notebook's),
    made its sockets past that, and every future failed, BrokenEnclave (ValueError:
    filedescriptor out of range in select())."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"this process may hold only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    held = []
    try:
        ex = make_executor(1)
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        assert ex.submit(tasks.square, 3).result(GUARD) == 9
        assert list(ex.map(tasks.square, range(4))) == [0, 1, 4, 9]
        ex.shutdown()
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
