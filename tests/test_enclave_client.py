"""The embedded enclave as a client sees it: its sends while another process holds the
write lock, its write-ahead log while no node runs, and its connections once closed.

Real components: an embedded enclave (an SQLite file), real node processes where a test
needs one.  Tests synchronise on events and ``wait_for``; timeouts are deadlock guards.
"""

from __future__ import annotations

import sqlite3
import threading

from kotta_executor.backends import embedded
from tests import tasks
from tests.conftest import GUARD, wait_for


def test_a_lone_submit_returns_while_another_process_holds_the_write_lock(
        make_executor, enclave, enclave_dir, monkeypatch):
    """A lone submit records its job from the caller's thread (``_send_now``) when no node
    inbox takes it (here: over the hand-off limit).  With the enclave's write lock held by
    another process (a client stopped by ^Z inside a transaction, a long `kotta prune`),
    submit() waited for the whole lock timeout (60 s; here made longer than the test's
    guard) before the outbox took the job.  It returns at once now, the job in the outbox,
    and runs once the lock is free."""
    monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 10 * GUARD)
    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(timeout=GUARD) == 4  # the manager listens
    big = b"x" * (embedded.HAND_OFF_LIMIT + 1)  # no node inbox takes it: sent by the caller
    lock = sqlite3.connect(enclave_dir / "kotta.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # another process's long write transaction
        submitted: list = []
        returned = threading.Event()
        submitter = threading.Thread(
            target=lambda: (submitted.append(ex.submit(tasks.noop, big)), returned.set()),
            daemon=True)
        submitter.start()
        assert returned.wait(GUARD), "submit() waited for the other process's write lock"
        assert lock.in_transaction  # (still held as it returned)
        (f,) = submitted
        assert not f.done()
        lock.execute("COMMIT")
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    assert f.result(timeout=GUARD) == big
    job = enclave.jobs.get(f.job_id)
    assert job.attempts == 1
