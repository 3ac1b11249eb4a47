"""Client-side races and leaks: submit racing shutdown, attach to a job failed before it was
sent, cancelling many waiting tasks, the wake-up pipe, records of tasks never sent, and
``running()``.

Real components: an embedded enclave, and a real node where a test needs one.  Tests
synchronise on ``threading.Event`` objects, on files and on ``wait_for``; the only timeouts
are deadlock guards (and one bound on the cost of cancelling many tasks).
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import sqlite3
import sys
import threading

import pytest

from kotta_executor import DependencyError, JobFailed, KottaExecutor, SerializationError
from kotta_executor import executor as executor_module
from kotta_executor.backends.base import NewJob
from kotta_executor.security.audit import AuditLog
from kotta_executor.states import JobState
from tests import tasks
from tests.conftest import GUARD, thread_frame, wait_for


class Stall:
    """An argument whose pickling blocks until released; it pickles as ``value``."""

    def __init__(self, entered: threading.Event, release: threading.Event, value=5):
        self.entered = entered
        self.release = release
        self.value = value

    def __reduce__(self):
        self.entered.set()
        self.release.wait(GUARD)
        return (type(self.value), (self.value,))


def _blob_files(enclave) -> list[str]:
    root = enclave.blobs.root
    return sorted(
        name for _, _, names in os.walk(root) for name in names if not name.startswith(".")
    )


# --------------------------------------------------------------------------- submit vs shutdown


@pytest.mark.parametrize("big", [False, True], ids=["inline", "blob"])
def test_submit_racing_shutdown_is_refused_and_leaves_nothing(make_executor, enclave, big):
    """A submit still pickling when shutdown(wait=True) completes is refused, as a process
    pool's would be; it used to return a future that never resolved.  A refused task's
    blobs (a large argument) are removed."""
    ex = make_executor(2)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # the manager runs
    entered, release = threading.Event(), threading.Event()
    value = b"x" * (enclave.inline_limit + 1) if big else 5
    out: list = []

    def submit():
        try:
            out.append(ex.submit(tasks.noop, Stall(entered, release, value)))
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            out.append(exc)

    blobs_before = _blob_files(enclave)
    t = threading.Thread(target=submit)
    t.start()
    try:
        assert entered.wait(GUARD)  # submit passed its first check, and is pickling
        stopper = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
        stopper.start()
        stopper.join(GUARD)  # nothing of ours is outstanding: shutdown completes first
        assert not stopper.is_alive()
        assert not ex._manager.is_alive()
    finally:
        release.set()
        t.join(GUARD)
    (outcome,) = out
    assert isinstance(outcome, RuntimeError), outcome
    assert "after shutdown" in str(outcome)
    assert ex._futures == {}
    assert _blob_files(enclave) == blobs_before


def test_submit_registered_before_shutdown_runs_and_shutdown_waits(make_executor):
    """The other side of the race: a future registered before shutdown() keeps the manager
    until it is done, and shutdown(wait=True) returns with it done."""
    ex = make_executor(2)
    dep: cf.Future = cf.Future()
    f = ex.submit(tasks.square, dep)  # registered; sent only once dep is done
    stopper = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_for(lambda: ex._shutdown, what="shutdown to begin")
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 3)
    assert stopper.is_alive() and ex._manager.is_alive()
    dep.set_result(6)
    stopper.join(GUARD)
    assert not stopper.is_alive()
    assert f.result(timeout=0) == 36


# --------------------------------------------------------------------------- attach to a failed job


@pytest.mark.parametrize(
    "dependency, error",
    [("failed", DependencyError), ("unpicklable", SerializationError)],
)
def test_attach_to_a_job_failed_before_it_was_sent(make_executor, dependency, error):
    """A task failed by its dependency (or by a dependency value that cannot be pickled)
    is recorded with a result: attach() raises the same type and message as the original
    future, and the attaching executor shuts down."""
    ex = make_executor(2, start_node=False)  # nothing is ever sent: no node needed
    dep: cf.Future = cf.Future()
    f = ex.submit(tasks.square, dep)
    if dependency == "failed":
        dep.set_exception(ValueError("upstream"))
    else:
        dep.set_result(threading.Lock())
    original = f.exception(timeout=GUARD)
    assert type(original) is error
    assert f.status() == "failed"  # the job table knows it failed

    other = make_executor(2, start_node=False)  # e.g. a restarted kernel
    g = other.attach(f.job_id)
    got = g.exception(timeout=GUARD)
    assert type(got) is error
    assert str(got) == str(original)
    if dependency == "failed":
        assert isinstance(got.__cause__, ValueError) and str(got.__cause__) == "upstream"
    stopper = threading.Thread(target=other.shutdown, kwargs={"wait": True})
    stopper.start()
    stopper.join(GUARD)
    assert not stopper.is_alive()


def test_attach_to_a_failed_job_without_a_result(make_executor, enclave):
    """A final job recorded without a result (as this client wrote them before) settles
    an attached future with JobFailed and the recorded reason."""
    ex = make_executor(2, start_node=False)
    job_id = os.urandom(16).hex()
    enclave.jobs.create([NewJob(job_id, ex.owner, "gone", "test", "tests.tasks:square", 60.0, b"")])
    enclave.jobs.transition([job_id], JobState.FAILED, reason="DependencyError: upstream")
    err = ex.attach(job_id).exception(timeout=GUARD)
    assert type(err) is JobFailed
    assert "DependencyError: upstream" in str(err)


# --------------------------------------------------------------------------- cancel many


def test_shutdown_cancel_futures_cancels_thousands_of_waiting_tasks(make_executor, enclave):
    """(It was quadratic in the number of tasks: 16 s for 16,000.  Not timed here: the
    benchmarks time things, tests do not.)"""
    ex = make_executor(2, start_node=False)
    dep: cf.Future = cf.Future()  # never done: every task waits ("thousands may wait")
    fs = [ex.submit(tasks.square, dep) for _ in range(16000)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in fs)
    records = enclave.jobs.get_many([f.job_id for f in fs])
    assert {r.state for r in records.values()} == {JobState.CANCELLED} and len(records) == 16000


def test_cancelling_a_cancelled_future_again_does_not_raise(make_executor):
    """cancel() and shutdown(cancel_futures=True), or a cancel seen in the job table, may
    both mark one future cancelled: the second must not notify (and raise) again."""
    ex = make_executor(2, start_node=False)
    f = ex.submit(tasks.square, cf.Future())
    assert f.cancel()
    f._cancel_and_notify()  # as a cancel seen in the job table does; used to raise "Future in unexpected state"
    assert f.cancel()
    done, _ = cf.wait([f], timeout=0)
    assert done == {f}


# --------------------------------------------------------------------------- the wake-up pipe


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_executors_closed_in_a_loop_do_not_leak_file_descriptors(enclave_dir):
    def one():
        with KottaExecutor(2, enclave=enclave_dir, start_node=False) as ex:
            ex.submit(tasks.noop).cancel()  # no node: cancellable, so shutdown returns
        # never started a manager: shutdown closes the pipe itself
        KottaExecutor(2, enclave=enclave_dir, start_node=False).shutdown()

    one()
    gc.collect()
    before = _open_fds()
    for _ in range(30):
        one()
    gc.collect()
    leaked = _open_fds() - before
    assert leaked < 10, f"{leaked} file descriptors leaked by 60 closed executors"


def test_threads_that_used_an_executor_close_their_database_connections_as_they_end(executor):
    """Each thread that reads the enclave (attach, status, map) opens a connection of its
    own; a thread that ended used to keep it, with its descriptors of kotta.db and its
    log, until the garbage collector ran, which a long-lived process with many objects (a
    notebook's kernel) does rarely.  Here it does not run at all."""
    job_id = executor.submit(tasks.add, 1, 2).job_id
    assert executor.attach(job_id).result(GUARD) == 3

    seen = []

    def look():
        seen.append((executor.attach(job_id).status(), list(executor.map(tasks.add, [1, 2]))))

    def database_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(executor.enclave.home))
            except OSError:
                pass
        return n

    gc.collect()
    gc.disable()
    try:
        for i in range(30):
            t = threading.Thread(target=look)
            t.start()
            t.join(GUARD)
            if i == 2:
                after_3 = database_fds()
        after_30 = database_fds()
    finally:
        gc.enable()
    assert seen == [("completed", [1, 2])] * 30
    assert after_30 <= after_3 + 3, (
        f"{after_30 - after_3} descriptors of the enclave's database left by 27 ended threads")


def test_a_kick_after_shutdown_writes_nowhere(enclave_dir):
    """Dependency callbacks and the reply poller may wake the manager after it exited:
    the pipe's numbers may belong to another file by then."""
    ex = KottaExecutor(2, enclave=enclave_dir, start_node=False)
    w = ex._wake.w
    ex.shutdown()
    r2, w2 = os.pipe()  # likely reuses the numbers just freed
    try:
        os.set_blocking(r2, False)
        ex._kick(force=True)
        if w in (r2, w2):
            with pytest.raises(BlockingIOError):
                os.read(r2, 1)
        assert ex._wake.w == -1
    finally:
        os.close(r2)
        os.close(w2)


# --------------------------------------------------------------------------- records of unsent tasks


def _one_cancelled_one_failed(ex):
    """Two tasks never sent: one cancelled while it waited, one whose dependency failed."""
    never: cf.Future = cf.Future()
    cancelled = ex.submit(tasks.square, never)
    assert cancelled.cancel()
    bad: cf.Future = cf.Future()
    bad.set_exception(ValueError("upstream"))
    failed = ex.submit(tasks.square, bad)
    with pytest.raises(DependencyError):
        failed.result(timeout=GUARD)
    return cancelled, failed


def test_unsent_tasks_are_recorded_without_a_task_message(make_executor, enclave):
    ex = make_executor(2, start_node=False)
    cancelled, failed = _one_cancelled_one_failed(ex)
    assert enclave.jobs.get(cancelled.job_id).state == JobState.CANCELLED
    assert enclave.jobs.get(failed.job_id).state == JobState.FAILED
    assert enclave.queue.depth("test") == 0


def test_cancelled_or_dependency_failed_tasks_raise_no_security_alarm(make_executor, enclave):
    ex = make_executor(2)
    ex.submit(tasks.noop).result(timeout=GUARD)  # a node serves the queue
    cancelled, failed = _one_cancelled_one_failed(ex)
    # whatever went on the queue for them, the node has dealt with it
    wait_for(lambda: enclave.queue.depth("test") == 0, what="the queue to empty")
    ours = {cancelled.job_id, failed.job_id}
    assert [d for d in enclave.queue.dead_letters("test") if d["job_id"] in ours] == []
    assert [r for r in AuditLog(enclave).show(action="task-rejected")
            if r.get("job_id") in ours] == []


# --------------------------------------------------------------------------- running()


def test_running_task_reports_running_after_status(make_executor, tmp_path):
    ex = make_executor(2)
    started, release = tmp_path / "started", tmp_path / "release"
    f = ex.submit(tasks.touch_then_wait, str(started), str(release))
    try:
        wait_for(started.exists, what="the task to start")
        assert f.status() == "processing"
        assert f.running()
        assert not f.cancel()  # it runs: too late to cancel
    finally:
        tasks.release(release, "go")
    assert f.result(timeout=GUARD) == "go"
    assert not f.running() and f.done()


def test_manager_marks_a_started_task_running(make_executor, tmp_path, monkeypatch):
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 0.0)  # look at every turn
    ex = make_executor(2)
    started, release = tmp_path / "started", tmp_path / "release"
    f = ex.submit(tasks.touch_then_wait, str(started), str(release))
    try:
        wait_for(started.exists, what="the task to start")
        wait_for(f.running, what="the manager to mark the future running")
    finally:
        tasks.release(release, "go")
    assert f.result(timeout=GUARD) == "go"


def test_mark_running_leaves_a_cancelled_future_alone(make_executor):
    ex = make_executor(2, start_node=False)
    f = ex.submit(tasks.square, cf.Future())
    assert f.cancel()
    f._mark_running()
    assert f.cancelled() and not f.running()


# --------------------------------------------------------------------------- finalizers


def test_a_map_iterator_collected_while_its_thread_holds_the_send_lock(
        make_executor, start_node, enclave, tmp_path):
    """A map's iterator left unfinished cancels the tasks of the items it has not yielded
    when it is closed, and the garbage collector closes one abandoned in a reference
    cycle, on whichever thread it happens to run: there the cancel took the send lock.
    The manager thread collecting garbage while it sends a batch (under that lock) waited
    for the lock it held: a deadlock, every future of the executor hung.  The collection
    is made to happen there with a trace function on the manager thread (as an allocation
    may trigger one), at its call to record a batch."""
    import sys

    start_node(workers=1)
    first, later = tmp_path / "first", tmp_path / "later"
    armed, collected = threading.Event(), threading.Event()

    def trace(frame, event, arg):  # the manager thread's, set before it starts
        if (event == "call" and armed.is_set() and frame.f_code.co_name == "create"
                and frame.f_code.co_filename.endswith(os.path.join("backends", "embedded.py"))
                and ex._send_lock._is_owned()):
            armed.clear()
            gc.collect()
            collected.set()

    gc.disable()  # the cycle is collected where the test says, not by chance
    threading.settrace(trace)
    try:
        ex = make_executor(1, start_node=False)
        ex.submit(tasks.square, 2).result(GUARD)  # the manager runs, traced
        threading.settrace(None)
        it = ex.map(tasks.wait_for_file, [str(first)] + [str(later)] * 5)
        tasks.release(first, "first")
        assert next(it) == "first"  # started: closing it cancels the other five
        cycle: list = [it]
        cycle.append(cycle)
        del it, cycle  # garbage, for the collector only
        armed.set()
        batch = ex.map(tasks.square, range(3))  # sent by the manager, as one batch
        deadlocked = not collected.wait(10.0)
        if deadlocked:  # (unblock the manager so that the test can end)
            ex._send_lock.release()
        assert not deadlocked, "the manager thread deadlocked on its own send lock"
        # the manager cancels them instead: those no node has started
        wait_for(lambda: not [j for j in enclave.jobs.list() if j.state == JobState.PENDING
                              and j.fn.endswith("wait_for_file")],
                 what="the abandoned map's tasks to be cancelled")
        tasks.release(later, "later")
        assert list(batch) == [0, 1, 4]
    finally:
        threading.settrace(None)
        sys.settrace(None)
        gc.enable()
        tasks.release(later, "later")



def test_a_map_iterator_collected_while_its_thread_makes_a_futures_condition(
        make_executor, start_node, enclave, tmp_path):
    """The same, on any thread that makes a future's condition (on its first use: the
    manager's set_result, a caller's result()), under the module lock that guards that:
    the collection there closed the abandoned map's iterator, whose cancel asks each of
    its futures done() (their first use too) and so waited for that lock, held by its
    own thread: a deadlock, and every future's first use after it hung.  The collection
    is made to happen there with a trace function, at the Condition's making."""
    import sys

    from kotta_executor import future as future_module
    from kotta_executor.future import KottaFuture

    start_node(workers=1)
    first, later = tmp_path / "first", tmp_path / "later"
    ex = make_executor(1, start_node=False)
    it = ex.map(tasks.wait_for_file, [str(first)] + [str(later)] * 5)
    tasks.release(first, "first")
    assert next(it) == "first"  # started: closing it cancels the other five
    gc.disable()  # the cycle is collected where the test says, not by chance
    try:
        cycle: list = [it]
        cycle.append(cycle)
        del it, cycle  # garbage, for the collector only
        collected = threading.Event()

        def trace(frame, event, arg):
            if (event == "call" and frame.f_code.co_name == "__init__"
                    and frame.f_code.co_filename == threading.__file__
                    and frame.f_back.f_code.co_name == "_condition"  # (under the lock)
                    and not collected.is_set()):
                collected.set()
                gc.collect()

        def first_use():
            sys.settrace(trace)
            try:
                KottaFuture("0" * 32, ex)._condition  # noqa: B018 - made under the lock
            finally:
                sys.settrace(None)

        user = threading.Thread(target=first_use, daemon=True)
        user.start()
        user.join(10.0)
        deadlocked = user.is_alive()
        if deadlocked:  # (let it go, so that the test can end)
            future_module._CONDITION_LOCK.release()
            user.join(GUARD)
        assert collected.is_set()
        assert not deadlocked, "a thread making a future's condition deadlocked on its lock"
        # the manager cancels them instead: those no node has started
        wait_for(lambda: not [j for j in enclave.jobs.list() if j.state == JobState.PENDING
                              and j.fn.endswith("wait_for_file")],
                 what="the abandoned map's tasks to be cancelled")
    finally:
        gc.enable()
        tasks.release(later, "later")
    # (what runs ends before the node the fixture started is stopped)
    wait_for(lambda: all(f.done() for f in list(ex._futures.values())),
             what="the tasks that ran to end")


def test_a_big_task_cancelled_in_the_outbox_leaves_no_blob(make_executor, enclave):
    """A task whose big argument went to a blob (``args-<job id>``) when it was pickled,
    cancelled while it still waited in the client's outbox, is recorded cancelled and
    never sent: no node ever sees it, and its blob stayed for ever.  The client deletes
    it.  (The test holds the send lock, as the manager does while it sends a batch: the
    submit, from another thread, leaves its task in the outbox.)"""
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.noop, 1).cancel() is True  # (the manager runs: it started then)
    submitted: list = []
    with ex._send_lock:
        t = threading.Thread(
            target=lambda: submitted.append(ex.submit(tasks.noop, b"x" * (enclave.inline_limit + 1)))
        )
        t.start()
        t.join(GUARD)
        (f,) = submitted
        blobs = [p.name for p in (enclave.home / "blobs").rglob("*") if p.is_file()]
        assert blobs == [f"args-{f.job_id}"]
        assert f.cancel() is True  # (this thread holds the lock: it takes it again)
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
    assert [p for p in (enclave.home / "blobs").rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------- cancel vs send


def _in_function(thread: threading.Thread, name: str) -> bool:
    frame = thread_frame(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def _cancel_during_send(ex, enclave):
    """Submit a task, and cancel it from another thread while the manager waits to record
    its batch (the enclave's write lock held here); what cancel() said, and the future."""
    db = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None, timeout=GUARD)
    try:
        db.execute("BEGIN IMMEDIATE")  # the send of the batch below waits for this
        submitted: list = []
        with ex._send_lock:  # (held: the submit leaves its task in the outbox)
            t = threading.Thread(target=lambda: submitted.append(ex.submit(tasks.noop, 1)))
            t.start()
            t.join(GUARD)
        (f,) = submitted
        # the manager took it (under the send lock) and waits to record it
        wait_for(lambda: not ex._outbox, what="the manager to take the batch")
        said: list = []
        canceller = threading.Thread(target=lambda: said.append(f.cancel()))
        canceller.start()
        wait_for(lambda: _in_function(canceller, "_cancel_jobs"),
                 what="the cancel to wait for the send")
        db.execute("COMMIT")
        canceller.join(GUARD)
    finally:
        db.close()
    return said, f


def test_cancel_while_its_task_is_being_sent_wins(make_executor, enclave):
    """A cancel() that comes while the manager sends its task's batch (taken from the
    outbox, not yet recorded: here the enclave's write lock is held by another connection,
    as a busy node or a `kotta` command may hold it) waited for the send, then raced the
    node for the job: a node that claimed it first ran it, and cancel() said False of a
    task no node had started when it was called.  The cancel is recorded in the send's
    own transaction: it says True, and no node ever runs the task.  (Several rounds: the
    node won the race about one time in three.)"""
    ex = make_executor(2)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # the node serves
    for _ in range(6):
        said, f = _cancel_during_send(ex, enclave)
        assert said == [True]
        assert f.cancelled()
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.started) == (JobState.CANCELLED, None)
    assert ex.submit(tasks.square, 3).result(timeout=GUARD) == 9  # (and it serves on)


def test_shutdown_cancel_futures_while_their_tasks_are_being_sent_cancels_them(
        make_executor, enclave):
    """As a cancel() (above): shutdown(cancel_futures=True) while the manager sends a batch
    of tasks waited for the send, then raced the node, which ran some of them.  (Several
    executors, one after the other: the node won in about one in six.)"""
    for _ in range(6):
        ex = make_executor(2)
        assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # the node serves
        db = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None, timeout=GUARD)
        try:
            db.execute("BEGIN IMMEDIATE")  # the send of the batch below waits for this
            fs: list = []
            with ex._send_lock:  # (held: the submits leave their tasks in the outbox)
                t = threading.Thread(target=lambda ex=ex, fs=fs: fs.extend(
                    ex.submit(tasks.noop, i) for i in range(20)))
                t.start()
                t.join(GUARD)
            wait_for(lambda ex=ex: not ex._outbox, what="the manager to take the batch")
            closer = threading.Thread(
                target=lambda ex=ex: ex.shutdown(wait=True, cancel_futures=True))
            closer.start()
            wait_for(lambda closer=closer: _in_function(closer, "_cancel_jobs"),
                     what="the shutdown's cancel to wait for the send")
            db.execute("COMMIT")
            closer.join(GUARD)
        finally:
            db.close()
        assert [f for f in fs if not f.cancelled()] == []
        assert {enclave.jobs.get(f.job_id).started for f in fs} == {None}


def _cancel_during_lone_send(ex, enclave, cancel):
    """Submit a lone task, sent from the caller's thread (``_send_now``: its body is over
    the hand-off limit, so that thread records it itself, and waits here for the enclave's
    write lock, held by another connection), and ``cancel(f)`` from another thread
    meanwhile; the future and what the cancel returned."""
    before = set(ex._futures)
    db = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None, timeout=GUARD)
    try:
        db.execute("BEGIN IMMEDIATE")  # the submit's own send waits for this
        submitted: list = []
        submitter = threading.Thread(
            target=lambda: submitted.append(ex.submit(tasks.noop, b"x" * (100 * 1024))))
        submitter.start()
        wait_for(lambda: _in_function(submitter, "_send_now") and _in_function(submitter, "tx"),
                 what="the submit to record its job itself")  # (to begin its transaction)
        (job_id,) = set(ex._futures) - before
        f = ex._futures[job_id]
        said: list = []
        canceller = threading.Thread(target=lambda: said.append(cancel(f)))
        canceller.start()
        wait_for(lambda: _in_function(canceller, "_cancel_jobs"),
                 what="the cancel to wait for the send")
        db.execute("COMMIT")
        submitter.join(GUARD)
        canceller.join(GUARD)
    finally:
        db.close()
    assert submitted == [f]
    return said, f


def test_cancel_while_a_lone_submit_sends_its_task_wins(make_executor, enclave, monkeypatch):
    """A lone submit records its job from its own thread (``_send_now``), under the send
    lock; a cancel() from another thread meanwhile waited for it, then raced the node for
    the job: cancel() said False (and the task ran) about one time in two, for a task no
    node had when it was called.  As for the manager's sends, the cancel is recorded in
    the send's own transaction.  (The submit's wait for the lock made as long as the
    guard: it gives up after SEND_NOW_LOCK_WAIT, too soon to be caught waiting.)"""
    monkeypatch.setattr(executor_module, "SEND_NOW_LOCK_WAIT", GUARD)
    ex = make_executor(2)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # the node serves
    for _ in range(6):
        said, f = _cancel_during_lone_send(ex, enclave, lambda f: f.cancel())
        assert said == [True]
        assert f.cancelled()
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.started) == (JobState.CANCELLED, None)
    assert ex.submit(tasks.square, 3).result(timeout=GUARD) == 9  # (and it serves on)



# --------------------------------------------------------------------------- kill of a map's attached view


def test_a_kill_of_a_map_task_attached_to_as_its_job_is_handed_back_ends_the_map(
        make_executor):
    """``kill()`` on the future ``attach()`` gives for a task of this executor's ``map`` (a
    job of two packed items) first cancels the map's own future, which refuses (its job
    runs); a stopping node that then hands the job back, never begun, before the kill's
    own cancel of it (the job table is written here as that node does, at that moment)
    left the map's future pending for ever: that cancel took the map's future out of the
    executor's and marked the attached one only.  Now the kill acts on the map's future,
    as the attached one's cancel does, and the map raises CancelledError."""
    ex = make_executor(1, start_node=False)  # (no node: the test moves the job)
    values = ex.map(tasks.square, [1, 2], chunksize=2, timeout=GUARD)
    [source] = [f for f in list(ex._futures.values()) if f._batch is True]
    wait_for(lambda: ex.enclave.jobs.get(source.job_id), what="the map's job recorded")
    assert ex.enclave.jobs.transition([source.job_id], JobState.PROCESSING, node="n1")
    view = ex.attach(source.job_id)
    wait_for(view.running, what="the map's future seen running")

    def hand_back_once_the_map_future_refused(frame, event, arg) -> None:
        if (event == "return" and frame.f_code.co_name == "cancel" and arg is False
                and frame.f_locals.get("self") is source):
            sys.setprofile(None)
            assert ex.enclave.jobs.transition([source.job_id], JobState.PENDING,
                                              from_states={JobState.PROCESSING}, node="n1",
                                              held_by="n1")

    sys.setprofile(hand_back_once_the_map_future_refused)
    try:
        assert view.kill()
    finally:
        sys.setprofile(None)
    assert ex.enclave.jobs.get(source.job_id).state == JobState.CANCELLED
    with pytest.raises(cf.CancelledError):
        next(values)
    assert source.cancelled() and view.cancelled()
