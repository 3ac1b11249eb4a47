"""The embedded enclave as a client sees it: its sends while another process holds the
write lock, its write-ahead log while no node runs, and its connections once closed.

Real components: an embedded enclave (an SQLite file), real node processes where a test
needs one.  Tests synchronise on events and ``wait_for``; timeouts are deadlock guards.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from kotta_executor import AuthenticationError, KottaExecutor
from kotta_executor.backends import embedded
from tests import tasks
from tests.conftest import GUARD, wait_for


@contextlib.contextmanager
def _write_lock_held(enclave_dir):
    """The enclave's write lock, held by another connection (as by another process: a
    client stopped by ^Z inside a transaction, a long `kotta prune`) until the block ends
    (or it commits)."""
    lock = sqlite3.connect(Path(enclave_dir) / "kotta.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        yield lock
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()


def _map_past_its_first_item(ex, tmp_path):
    """A map of six tasks on a 1-worker executor, its first item yielded: the second runs,
    waiting for the file ``later`` (returned), and the others wait for the worker."""
    first, later = tmp_path / "first", tmp_path / "later"
    it = ex.map(tasks.wait_for_file, [str(first)] + [str(later)] * 5)
    tasks.release(first, "first")
    assert next(it) == "first"
    return it, later


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
    with _write_lock_held(enclave_dir) as lock:
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
    assert f.result(timeout=GUARD) == big
    job = enclave.jobs.get(f.job_id)
    assert job.attempts == 1


def test_the_log_is_cut_back_while_no_node_runs(make_executor, enclave_dir, monkeypatch):
    """Only nodes checkpointed the enclave's write-ahead log (their connections, as every
    one, checkpoint nothing by themselves): a client submitting to a queue no node served
    (none started yet, or failing) grew kotta.db-wal with every task, without bound.  Its
    manager now checkpoints a log over the limit as nodes do, and the next write starts
    the log over, cut back to the limit.  (The limit made small: 1 MiB.)"""
    limit = 1 << 20
    monkeypatch.setattr(embedded, "WAL_SIZE_LIMIT", limit)
    wal = enclave_dir / "kotta.db-wal"
    ex = make_executor(1, start_node=False)
    big = b"x" * (100 * 1024)  # each task some 100 KB of log (kept in its message)
    fs = [ex.submit(tasks.noop, big)]
    wait_for(wal.exists, what="the log")
    while wal.stat().st_size <= 3 * limit:  # past the limit
        fs.extend(ex.submit(tasks.noop, big) for _ in range(10))
    # writes go on (a submit a look), and one after a checkpoint starts the log over
    wait_for(lambda: (fs.append(ex.submit(tasks.noop, 1)), wal.stat().st_size <= limit)[1],
             what="the log to be cut back")
    assert not any(f.done() for f in fs)  # (no node: nothing ran)


def test_the_log_is_cut_back_once_a_client_without_a_node_stops_writing(
        make_executor, enclave_dir, monkeypatch):
    """A client that wrote its log past the limit with no node running, and then wrote
    nothing more (its tasks waiting for a node): its manager's checkpoint copied the log,
    but only a write after it would have cut the file back, and none came; kotta.db-wal
    kept its largest size for as long as the client ran.  It is cut back at once now."""
    limit = 1 << 20
    monkeypatch.setattr(embedded, "WAL_SIZE_LIMIT", limit)
    wal = enclave_dir / "kotta.db-wal"
    ex = make_executor(1, start_node=False)
    big = b"x" * (100 * 1024)
    fs = [ex.submit(tasks.noop, big)]
    wait_for(wal.exists, what="the log")
    while wal.stat().st_size <= 3 * limit:  # past the limit, then no more submits
        fs.extend(ex.submit(tasks.noop, big) for _ in range(10))
    wait_for(lambda: all(ex._enclave.jobs.get(f.job_id) for f in fs),
             what="the jobs to be recorded")
    wait_for(lambda: wal.stat().st_size <= limit, what="the log to be cut back")


def _open_files(directory) -> list[str]:
    """The files under ``directory`` this process holds descriptors of."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (closed meanwhile: the listing's own)
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def test_an_executor_leaves_no_database_file_open_once_its_with_block_ends(enclave_dir):
    """EmbeddedEnclave.close() closed no SQLite connection: an executor's own enclave, once
    its `with` block ended, kept kotta.db, its log and its shared memory open (four
    descriptors: the caller's thread's connection, and the manager's, which SQLite keeps
    while another connection of the process has the file) for as long as the executor was
    referenced, and then until the garbage collector ran.  They are closed now; a call
    after that (a future's status) opens a connection again."""
    with KottaExecutor(1, enclave=enclave_dir, start_node=False) as ex:
        f = ex.submit(tasks.noop, 1)  # (a lone submit: recorded from this thread)
        wait_for(lambda: f.status() == "pending", what="the job to be recorded")
        assert f.cancel()
    assert _open_files(enclave_dir.resolve()) == []
    assert f.status() == "cancelled"
    ex.enclave.close()
    assert _open_files(enclave_dir.resolve()) == []


def test_closing_an_enclave_closes_the_threads_connection(enclave_dir):
    """close() closes the calling thread's connection (another thread's is closed as that
    thread ends); the enclave can be used again after it."""
    e = embedded.EmbeddedEnclave(enclave_dir)
    try:
        assert e.jobs.get("0" * 32) is None
        t = threading.Thread(target=lambda: e.jobs.get("0" * 32))
        t.start()
        t.join(GUARD)
        e.close()
        assert _open_files(enclave_dir.resolve()) == []
        assert e.jobs.get("0" * 32) is None  # (used again)
    finally:
        e.close()
    assert _open_files(enclave_dir.resolve()) == []


def _shut_down_under_a_held_lock(ex, enclave_dir, within: float, waited: str) -> None:
    """``ex.shutdown(wait=True)`` returns within ``within`` seconds while another
    connection (another process's long write transaction) holds the enclave's write lock,
    and the lock is still held as it returns."""
    with _write_lock_held(enclave_dir) as lock:
        returned = threading.Event()
        closer = threading.Thread(target=lambda: (ex.shutdown(wait=True), returned.set()),
                                  daemon=True)
        closer.start()
        assert returned.wait(within), waited
        assert lock.in_transaction  # (still held as it returned)


def test_shutdown_returns_while_another_process_holds_the_write_lock(
        start_node, enclave_dir, monkeypatch):
    """Its tasks all done, an executor's shutdown(wait=True) (the end of its `with` block)
    waited for the whole lock timeout (60 s; here made longer than the test's guard) while
    another process held the enclave's write lock: its manager, as it ended, deleted what
    was left on its reply queue (best effort, as a node deletes old replies anyway), in a
    write transaction that waited for the lock.  It waits no longer than a moment now."""
    monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 10 * GUARD)
    start_node()
    ex = KottaExecutor(1, enclave=enclave_dir, start_node=False)
    assert ex.submit(tasks.square, 3).result(timeout=GUARD) == 9
    _shut_down_under_a_held_lock(ex, enclave_dir, GUARD,
                                 "shutdown() waited for the other process's write lock")


def test_shutdown_with_its_own_node_returns_while_another_process_holds_the_write_lock(
        enclave_dir):
    """An executor with a node of its own waits for that node to exit as it shuts down
    (the end of its `with` block).  With the enclave's write lock held by another process,
    it took a minute: the node, stopping, waited the whole lock timeout (60 s, the test's
    guard) to remove its row from the registry, then exited with an error.  It waits a
    moment now, and leaves the row (that of a process gone is reaped) to be removed later."""
    ex = KottaExecutor(1, enclave=enclave_dir)
    assert ex.submit(tasks.square, 3).result(timeout=GUARD) == 9  # its node is up
    # (half the guard: the node's own lock timeout, in its process, is the guard)
    _shut_down_under_a_held_lock(ex, enclave_dir, GUARD / 2,
                                 "shutdown() waited for the node's lock timeout")
    e = embedded.EmbeddedEnclave(enclave_dir)
    try:  # the row left behind is not a live node's, and goes at the next reaping
        assert e.nodes.live() == []
        e.reap_dead_nodes()
        assert e.nodes.all() == []
    finally:
        e.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_an_executor_refused_as_it_is_made_leaves_no_descriptor_open(enclave_dir):
    """An executor refused after it opened its enclave (an owner= not the token's, a
    revoked token, credentials of another enclave) left that enclave's database
    connection and sockets to the garbage collector, which frees them only in a full
    collection: each refused one held 2 or 3 descriptors meanwhile."""
    KottaExecutor(enclave=enclave_dir, start_node=False).shutdown()  # (its token made)
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            with pytest.raises(AuthenticationError, match="cannot submit as 'bob'"):
                KottaExecutor(enclave=enclave_dir, owner="bob", start_node=False)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_closing_a_map_early_returns_while_another_process_holds_the_write_lock(
        make_executor, enclave, enclave_dir, tmp_path, monkeypatch):
    """Closing a map's iterator early (a break, close()) cancels the tasks of the items
    not yet yielded.  With the enclave's write lock held by another process (a client
    stopped by ^Z inside a transaction), close() waited for the whole lock timeout (60 s;
    here made longer than the test's guard), as submit() did once.  It returns at once
    now, and the executor's manager cancels them once the lock is free."""
    monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 10 * GUARD)
    it, later = _map_past_its_first_item(make_executor(1), tmp_path)
    try:
        with _write_lock_held(enclave_dir) as lock:
            closed = threading.Event()
            threading.Thread(target=lambda: (it.close(), closed.set()), daemon=True).start()
            assert closed.wait(GUARD), "close() waited for the other process's write lock"
            assert lock.in_transaction  # (still held as it returned)
            lock.execute("COMMIT")
        # cancelled by the manager: all those no node has started
        wait_for(lambda: sum(j.state == "cancelled" for j in enclave.jobs.list(limit=10)) >= 3,
                 what="the items not yielded to be cancelled")
    finally:
        tasks.release(later)


def test_a_cancel_waiting_for_another_process_s_write_lock_says_so(
        make_executor, enclave, enclave_dir, monkeypatch, caplog):
    """cancel() must say whether the job is cancelled, so it waits for the enclave's write
    lock; but with that lock held by another process (a client stopped by ^Z inside a
    transaction) it waited up to the lock timeout, 60 s, in silence.  It says now, at
    once, that it waits, naming the enclave's database and what holds it, and answers
    once the lock is free."""
    import logging

    monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 10 * GUARD)
    caplog.set_level(logging.WARNING, logger="kotta.executor")
    ex = make_executor(1, start_node=False)  # no node: the job stays pending
    f = ex.submit(tasks.noop)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job recorded")
    said: list = []
    with _write_lock_held(enclave_dir) as lock:
        canceller = threading.Thread(target=lambda: said.append(f.cancel()), daemon=True)
        canceller.start()
        wait_for(lambda: "is waiting" in caplog.text, what="the cancel to say it waits")
        assert str(enclave_dir / "kotta.db") in caplog.text and "is locked" in caplog.text
        assert not said  # (still waiting: its answer comes once the lock is free)
        lock.execute("COMMIT")
    canceller.join(GUARD)
    assert said == [True] and f.cancelled()
    assert enclave.jobs.get(f.job_id).state == "cancelled"


def test_an_abandoned_maps_cancel_outlasting_the_lock_timeout_is_made_once_the_lock_is_free(
        make_executor, enclave, enclave_dir, tmp_path, monkeypatch, caplog):
    """The cancel of an abandoned map's items, left to the manager while another process
    held the enclave's write lock, failed once that lock had been held longer than the
    lock timeout (here made short, in this process only): the manager logged it and let
    it go, and the items ran, though their iterator had been closed.  It is made again at
    the manager's next turns, once the lock is free."""
    import logging

    it, later = _map_past_its_first_item(make_executor(1), tmp_path)
    try:
        caplog.set_level(logging.WARNING, logger="kotta.executor")
        monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 0.5)
        with _write_lock_held(enclave_dir) as lock:
            it.close()
            wait_for(lambda: "abandoned map" in caplog.text,
                     what="the manager's cancel to fail for the lock")
            lock.execute("COMMIT")
        monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 60.0)
        wait_for(lambda: sum(j.state == "cancelled" for j in enclave.jobs.list(limit=10)) >= 3,
                 what="the items not yielded to be cancelled")
    finally:
        tasks.release(later)
