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

