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
from tests.conftest import GUARD, wait_for

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="SIGINT raises KeyboardInterrupt in the main thread only",
)


@contextlib.contextmanager
def sigint_when(match):
    """SIGINT to the main thread, once, at the first profile event (``frame``, ``event``,
    ``arg``, as ``sys.setprofile`` gives them) that ``match`` accepts; Python raises the
    KeyboardInterrupt at once, where the profiled code is then.  Yields an Event set once
    it was sent."""
    sent = threading.Event()
    main = threading.main_thread().ident

    def profile(frame, event, arg):
        if not sent.is_set() and match(frame, event, arg):
            sent.set()
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


def test_an_interrupt_as_a_cancel_begins_its_transaction_leaves_the_enclave_unlocked(
        make_executor, tmp_path):
    """Ctrl-C just as ``cancel()`` began its write transaction on the embedded enclave
    left the transaction open on the caller's connection: the whole enclave was locked
    (the node could record no result: ``database is locked``, for every client and node
    of the enclave, until the process ended), and the next cancel, or anything else that
    writes from that thread, raised ``cannot start a transaction within a transaction``.
    Now the transaction is rolled back: the cancel did nothing, and can be tried again."""
    ex = make_executor(1)
    started, go = tmp_path / "started", tmp_path / "go"
    blocker = ex.submit(tasks.touch_then_wait, str(started), str(go))
    wait_for(started.exists, what="the blocker to start")
    queued = ex.submit(tasks.square, 3)  # behind it, on the one worker
    try:
        with sigint_when(after_begin) as sent, pytest.raises(KeyboardInterrupt):
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
        frame = sys._current_frames().get(main)
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
