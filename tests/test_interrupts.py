"""A KeyboardInterrupt (Ctrl-C in a script, a notebook's "interrupt") in the caller's
thread, in the middle of a call to the executor or its futures.

Afterwards the executor is as usable as a ``ProcessPoolExecutor`` is: no future stays
pending for ever, the enclave is not left locked, nothing is lost.  The interrupt is a real
SIGINT to the main thread, delivered with ``signal.pthread_kill``; to make it come at one
precise point of the call (a window of microseconds), a profile function
(``sys.setprofile``, which sees each call and return of this thread) sends it there.
Nothing of kotta's is replaced.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import pytest

from tests import tasks
from tests.conftest import GUARD, thread_frame, wait_for

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="SIGINT raises KeyboardInterrupt in the main thread only",
)


@contextlib.contextmanager
def sigint_when(match, again=None):
    """SIGINT to the main thread, once, at the first profile event (``frame``, ``event``,
    ``arg``, as ``sys.setprofile`` gives them) that ``match`` accepts; Python raises the
    KeyboardInterrupt at once, where the profiled code is then.  Yields an Event set once
    it was sent.  ``again``: a second SIGINT at the first event after that it accepts."""
    sent = threading.Event()
    main = threading.main_thread().ident

    def profile(frame, event, arg):
        if not sent.is_set() and match(frame, event, arg):
            sent.set()
            if again is None:
                sys.setprofile(None)
            signal.pthread_kill(main, signal.SIGINT)
        elif sent.is_set() and again is not None and again(frame, event, arg):
            sys.setprofile(None)
            signal.pthread_kill(main, signal.SIGINT)

    sys.setprofile(profile)
    try:
        yield sent
    finally:
        sys.setprofile(None)


def after_begin(frame, event, arg) -> bool:
    """Just as an SQLite write transaction of this thread has begun."""
    return (event == "c_return" and getattr(arg, "__name__", "") == "execute"
            and frame.f_locals.get("args") == ("BEGIN IMMEDIATE",))


def in_the_transaction(frame, event, arg) -> bool:
    """As a statement of this thread's transaction has run (after its BEGIN)."""
    return event == "c_return" and getattr(arg, "__name__", "") == "execute"


def test_an_interrupt_as_a_cancel_begins_its_transaction_leaves_the_enclave_unlocked(
        make_executor, tmp_path):
    """Ctrl-C just as ``cancel()`` began its write transaction on the embedded enclave
    left the transaction open on the caller's connection: the whole enclave was locked
    (the node could record no result: ``database is locked``, for every client and node
    of the enclave, until the process ended), and the next cancel, or anything else that
    writes from that thread, raised ``cannot start a transaction within a transaction``.
    Now the transaction is rolled back: the cancel did nothing, and can be tried again.
    (A cancel holds one Ctrl-C until it has ended: the second, in its transaction, is
    raised there.)"""
    ex = make_executor(1)
    started, go = tmp_path / "started", tmp_path / "go"
    blocker = ex.submit(tasks.touch_then_wait, str(started), str(go))
    wait_for(started.exists, what="the blocker to start")
    queued = ex.submit(tasks.square, 3)  # behind it, on the one worker
    try:
        with sigint_when(after_begin, again=in_the_transaction) as sent, pytest.raises(
                KeyboardInterrupt):
            queued.cancel()
        assert sent.is_set()
        assert not queued.done()
        assert queued.cancel() and queued.cancelled()
    finally:
        tasks.release(go, "go")
    assert blocker.result(timeout=GUARD) == "go"  # (its node could record it)
    assert ex.submit(tasks.square, 4).result(timeout=GUARD) == 16


def entering(name: str):
    """As this thread enters a function of kotta's called ``name``."""
    def match(frame, event, arg) -> bool:
        return (event == "call" and frame.f_code.co_name == name
                and "kotta_executor" in frame.f_code.co_filename)
    return match


def shut_down_within_guard(ex) -> bool:
    """``ex.shutdown(wait=True)`` on a helper thread; whether it returned within GUARD."""
    done = threading.Event()
    threading.Thread(target=lambda: (ex.shutdown(wait=True), done.set()), daemon=True).start()
    return done.wait(GUARD)


def appending_to(queue):
    """As this thread is about to append to ``queue`` (a deque)."""
    return lambda frame, event, arg: event == "c_call" and getattr(arg, "__self__", None) is queue


def after_a_square(ex) -> list:
    """Arguments that make a task wait for another's result: a done future."""
    dep = ex.submit(tasks.square, 3)
    dep.result(timeout=GUARD)
    return [dep]


@pytest.mark.parametrize("where, submit, outcome", [
    # a lone submit, sent at once from the caller's thread: it runs
    (lambda ex: entering("_send_now"), lambda ex: ex.submit(tasks.square, 3), "completed"),
    # a map's task, left in the outbox for the manager: it runs
    (lambda ex: appending_to(ex._outbox), lambda ex: ex.map(tasks.square, [3]), "completed"),
    # a task that waits for another's result, before it waits, or with its callback on
    # a done dependency interrupted (it waits for ever for that one): it never runs
    (lambda ex: entering("add"), lambda ex: ex.submit(tasks.square, *after_a_square(ex)),
     "cancelled"),
    (lambda ex: entering("_dependency_done"),
     lambda ex: ex.submit(tasks.square, *after_a_square(ex)), "cancelled"),
])
def test_an_interrupted_submit_leaves_no_future_pending_for_ever(
        make_executor, where, submit, outcome):
    """Ctrl-C in ``submit()`` (or ``map()``) after its future was registered, before its
    job was sent: the future stayed pending for ever, and ``shutdown(wait=True)`` (the end
    of a ``with`` block, the interpreter's exit) waited for it for ever, as did one with
    ``cancel_futures=True`` (no cancel found its job).  Now the job is sent all the same,
    once, and the shutdown waits for it to end; a task that waits for others' results,
    not yet sent, is cancelled instead (its waiting may be half set up)."""
    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # (its node serves)
    with sigint_when(where(ex)) as sent, pytest.raises(KeyboardInterrupt):
        submit(ex)
    assert sent.is_set()
    assert ex.submit(tasks.square, 5).result(timeout=GUARD) == 25
    assert shut_down_within_guard(ex), "shutdown(wait=True) waits for a job never sent"
    interrupted = [j.state for j in ex.enclave.jobs.list(owner=ex.owner)
                   if j.fn.endswith("square") and j.state != "completed"]
    finished = [j for j in ex.enclave.jobs.list(owner=ex.owner) if j.state == "completed"]
    if outcome == "completed":
        assert interrupted == [] and len(finished) == 3
    else:  # (never waiting: no record; else recorded cancelled)
        assert interrupted in ([], ["cancelled"]) and len(finished) == 3


def starting_a_thread(frame, event, arg) -> bool:
    """As ``Thread.start`` waits for its new thread to begin (the thread runs)."""
    return (event == "call" and frame.f_code.co_name == "wait" and frame.f_back is not None
            and frame.f_back.f_code.co_name == "start"
            and frame.f_back.f_code.co_filename == threading.__file__)


@pytest.mark.parametrize("where", [entering("_ensure_manager"), starting_a_thread],
                         ids=["before-the-manager", "as-the-manager-starts"])
def test_an_interrupted_first_submit_leaves_no_future_pending_for_ever(make_executor, where):
    """Ctrl-C in an executor's first ``submit()``, as it started its manager thread (its
    future registered, its job not sent): the future stayed pending for ever, and
    ``shutdown(wait=True)`` (the end of a ``with`` block, the interpreter's exit) waited
    for it for ever.  Now its job is sent all the same, and the shutdown returns."""
    ex = make_executor(1)
    with sigint_when(where) as sent, pytest.raises(KeyboardInterrupt):
        ex.submit(tasks.square, 3)
    assert sent.is_set()
    assert ex.submit(tasks.square, 5).result(timeout=GUARD) == 25
    assert shut_down_within_guard(ex), "shutdown(wait=True) waits for a job never sent"
    assert sorted(j.state for j in ex.enclave.jobs.list(owner=ex.owner)) == ["completed"] * 2


def when_main_thread_waits_in(name: str, action) -> threading.Thread:
    """A helper thread that calls ``action()`` once the main thread is blocked in a
    lock's acquire under a function of kotta's called ``name`` (or after GUARD, so that
    nothing hangs)."""
    main = threading.main_thread().ident

    def blocked() -> bool:
        frame = thread_frame(main)
        if frame is None or frame.f_code.co_filename != threading.__file__:
            return False
        while frame is not None:
            if frame.f_code.co_name == name and "kotta_executor" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def run() -> None:
        try:
            wait_for(blocked, what=f"the main thread to wait in {name}")
        finally:
            action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_shutdown_interrupted_while_it_waits_still_waits_the_second_time(
        make_executor, tmp_path):
    """Ctrl-C while ``shutdown(wait=True)`` (the end of a ``with`` block) waited for a
    running task: Python 3.11's ``Thread.join``, interrupted, marks a thread that still
    runs as stopped (bpo-45274), so the next ``shutdown(wait=True)``, and the one at the
    interpreter's exit, returned at once, the task still running and its result never
    delivered: the program ended without it.  The wait is now for the manager's own
    signal that it is done."""
    ex = make_executor(1)
    started, go = tmp_path / "started", tmp_path / "go"
    running = ex.submit(tasks.touch_then_wait, str(started), str(go))
    wait_for(started.exists, what="the task to start")
    main = threading.main_thread().ident
    interrupt = when_main_thread_waits_in(
        "_shut_down", lambda: signal.pthread_kill(main, signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.shutdown(wait=True)
    finally:
        interrupt.join(GUARD)
    assert not running.done()
    release = when_main_thread_waits_in("_shut_down", lambda: tasks.release(go, "go"))
    try:
        ex.shutdown(wait=True)
        assert running.done(), "the second shutdown(wait=True) returned before the task ended"
        assert running.result() == "go"
    finally:
        release.join(GUARD)


def leaving(name: str):
    """As this thread returns from a function of kotta's called ``name``."""
    def match(frame, event, arg) -> bool:
        return (event == "return" and frame.f_code.co_name == name
                and "kotta_executor" in frame.f_code.co_filename)
    return match


def interrupt_as_cancel_waits_for_the_send_lock(ex, fs: list) -> contextlib.AbstractContextManager:
    """Hold the executor's send lock (the manager sends under it) on a helper thread until
    the main thread's cancel of ``fs[0]`` (appended later) waits for it; then SIGINT to the
    main thread, and let the lock go."""
    main = threading.main_thread().ident
    stat = f"/proc/self/task/{threading.main_thread().native_id}/stat"
    held, done = threading.Event(), threading.Event()
    seen = []

    def waiting() -> bool:
        # in _cancel_jobs, past its wish, and asleep (in the lock's acquire, not before it
        # waiting for the GIL: seen so twice, this thread sleeping in between)
        frame = thread_frame(main)
        with open(stat) as f:
            asleep = f.read().rsplit(")", 1)[1].split()[0] == "S"
        seen.append(frame is not None and frame.f_code.co_name == "_cancel_jobs" and asleep
                    and bool(fs) and fs[0].job_id in ex._cancel_wanted)
        return seen[-2:] == [True, True]

    def delivering() -> bool:
        with open(stat.replace("/stat", "/status")) as f:
            pending = next(line for line in f if line.startswith("SigPnd:"))
        return bool(int(pending.split()[1], 16) & 1 << (signal.SIGINT - 1))

    def run() -> None:
        with ex._send_lock:
            held.set()
            try:
                wait_for(waiting, what="the cancel to wait for the send lock")
            finally:
                signal.pthread_kill(main, signal.SIGINT)
                # let go once the signal has reached the thread (its acquire then returns
                # EINTR: let go before, the lock could be taken first)
                wait_for(lambda: not delivering(), what="the SIGINT to be delivered")
        done.set()

    @contextlib.contextmanager
    def interrupting():
        threading.Thread(target=run, daemon=True).start()
        held.wait(GUARD)
        yield
        done.wait(GUARD)
    return interrupting()


@pytest.mark.parametrize("where", [
    "before-the-record", "after-the-record", "as-the-future-is-marked", "waiting-for-the-lock"])
def test_a_cancel_interrupted_leaves_its_future_and_its_job_agreeing(
        make_executor, tmp_path, where):
    """Ctrl-C in ``cancel()`` once the enclave had recorded the job cancelled, before the
    future was marked, left the future pending: for ever when the executor had already let
    it go (it waited for no reply), else until the next reconcile, seconds later; and Ctrl-C
    as the cancel waited for the send lock left the cancel asked for, to be recorded by the
    manager's next send, after the interrupt said it had not happened.  Now an interrupt
    that comes during the cancel is raised once the cancel has ended: the job and its
    future are both cancelled, or (interrupted before the cancel began) both still run."""
    ex = make_executor(1)
    started, go = tmp_path / "started", tmp_path / "go"
    blocker = ex.submit(tasks.touch_then_wait, str(started), str(go))
    try:
        wait_for(started.exists, what="the blocker to start")
        if where == "waiting-for-the-lock":
            queued = []  # (submitted once the lock is held: it waits in the outbox)
            interrupt = interrupt_as_cancel_waits_for_the_send_lock(ex, queued)
        else:
            queued = [ex.submit(tasks.square, 3)]  # behind it, on the one worker
            wait_for(lambda: ex.enclave.jobs.get(queued[0].job_id), what="the job recorded")
            match = {"before-the-record": entering("_record_cancelled"),
                     "after-the-record": leaving("_record_cancelled"),
                     "as-the-future-is-marked": entering("_cancel_and_notify")}[where]
            interrupt = sigint_when(match)
        with interrupt, pytest.raises(KeyboardInterrupt):
            if not queued:
                queued.append(ex.submit(tasks.square, 3))
            queued[0].cancel()
        queued = queued[0]
        job = wait_for(lambda: ex.enclave.jobs.get(queued.job_id), what="the job recorded")
        assert queued.cancelled() == (job.state == "cancelled"), (job.state, queued)
    finally:
        tasks.release(go, "go")
    assert blocker.result(timeout=GUARD) == "go"
    if not queued.cancelled():
        assert queued.result(timeout=GUARD) == 9
    assert shut_down_within_guard(ex), "shutdown(wait=True) waits for a future left pending"
    assert ex.enclave.jobs.get(queued.job_id).state == ("cancelled" if queued.cancelled()
                                                        else "completed")


@pytest.mark.parametrize("how", ["kill", "shutdown"])
def test_a_kill_or_a_cancelling_shutdown_interrupted_leaves_no_future_pending(
        make_executor, tmp_path, how):
    """As for ``cancel()``: Ctrl-C in ``kill()`` or ``shutdown(cancel_futures=True)`` once
    the jobs were recorded cancelled, before their futures were marked, left the futures
    pending for ever (the executor had let them go).  Now the interrupt is raised once the
    futures are marked."""
    ex = make_executor(1)
    started, go = tmp_path / "started", tmp_path / "go"
    blocker = ex.submit(tasks.touch_then_wait, str(started), str(go))
    try:
        wait_for(started.exists, what="the blocker to start")
        queued = [ex.submit(tasks.square, n) for n in range(3)]
        wait_for(lambda: all(ex.enclave.jobs.get(f.job_id) for f in queued),
                 what="the jobs recorded")
        with sigint_when(entering("_cancel_and_notify")) as sent, pytest.raises(
                KeyboardInterrupt):
            if how == "kill":
                queued[0].kill()
            else:
                ex.shutdown(wait=False, cancel_futures=True)
        assert sent.is_set()
        for f in queued[:1] if how == "kill" else queued:
            assert ex.enclave.jobs.get(f.job_id).state == "cancelled"
            assert f.cancelled(), f
    finally:
        tasks.release(go, "go")
    assert blocker.result(timeout=GUARD) == "go"
    assert shut_down_within_guard(ex), "shutdown(wait=True) waits for a future left pending"
