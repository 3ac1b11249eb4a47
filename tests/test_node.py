"""The node daemon with real node processes: crashes, redelivery, dead letters, draining,
worker ownership and isolation.

Nodes are started with the ``start_node`` fixture (``python -m node`` processes) and the
executors never start their own (``start_node=False``).  Tasks that must be caught while
running block until a file appears and append their pid to a log, so the test can see where
(and how often) they ran.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from kotta_executor import CorruptTask, DeliveryFailed, WorkerDied, wire
from kotta_executor import executor as executor_module
from kotta_executor.backends.base import KILLED_PENDING, Finished, NewJob
from kotta_executor.states import FINAL, JobState
from node.worker import STOP_SIGNAL
from tests import tasks
from tests.conftest import GUARD, ROOT, gone, wait_for
from tests.test_requirements import offline_pip as offline_pip  # noqa: F401 - a fixture

# ---------------------------------------------------------------------- helpers


def _pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _finals(enclave, job_id: str) -> list[str]:
    return [state for _, state, _ in enclave.jobs.history(job_id) if state in FINAL]


def _stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: a signal sent to it before then may be
    handled rather than left pending (a SIGSTOP sent after it does not take it back)."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED,
             what=f"process {pid} to stop")


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits to be delivered to the (stopped) process ``pid`` (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (sig - 1)))


def _count_calls(f) -> list:
    calls: list = []
    f.add_done_callback(calls.append)
    return calls


def _holder(enclave, job_id: str) -> str | None:
    """The node holding a job's task message (white-box: the embedded queue's table)."""
    rows = enclave._db.read("SELECT holder FROM messages WHERE job_id=?", (job_id,))
    return rows[0][0] if rows else None


def _all_sent(ex, futures) -> None:
    """Wait until the client has sent every one of ``futures``' tasks (recorded, or one
    handed to a node's inbox), so that a frozen node, let go, takes them in one step: on a
    loaded machine the manager sent some only after it went on, and the node, taking a few
    in its first step, had no backlog to pipe deep, and piped only the head."""
    ids = {f.job_id for f in futures}
    wait_for(lambda: len(ex.enclave.jobs.get_many(ids)) + len(ex._handed.keys() & ids) == len(ids),
             what=f"the {len(ids)} tasks to be sent")


def _freeze(node, enclave_dir: Path) -> None:
    """SIGSTOP a node, but never while it holds the SQLite write lock (that would stall
    every other process for the lock timeout): retry until the database is writable."""
    for _ in range(100):
        os.kill(node.pid, signal.SIGSTOP)
        wait_for(
            lambda: psutil.Process(node.pid).status() == psutil.STATUS_STOPPED,
            what="the node to stop",
        )
        conn = sqlite3.connect(enclave_dir / "kotta.db", timeout=1.0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(node.pid, signal.SIGCONT)
        finally:
            conn.close()
    raise AssertionError("could not stop the node outside a write transaction")


# ---------------------------------------------------------------------- crash and redelivery


def test_task_of_a_killed_node_runs_again_on_another(start_node, make_executor, enclave,
                                                     tmp_path):
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    calls = _count_calls(f)
    try:
        wait_for(lambda: len(_pids(log)) == 1, what="the task to start on node A")
        first = _pids(log)[0]
        assert first in a.worker_pids()
        b = start_node(workers=1)
        a.kill()
        # the task does not run on unsupervised: A's worker dies with its node
        wait_for(lambda: gone(first), what="A's orphaned worker to die with its node")
        wait_for(lambda: len(_pids(log)) == 2, what="the task to run again on node B")
        second = _pids(log)[1]
        assert second in b.worker_pids()
    finally:
        tasks.release(release, "go")

    assert f.result(GUARD) == second
    assert ex.submit(tasks.square, 3).result(GUARD) == 9  # let any stray reply arrive
    assert calls == [f]
    job = enclave.jobs.get(f.job_id)
    assert job.state == "completed"
    assert job.node == b.node_id
    assert job.attempts == 2
    assert _finals(enclave, f.job_id) == ["completed"]


def test_duplicate_delivery_is_recorded_at_most_once(start_node, make_executor, enclave,
                                                     enclave_dir, tmp_path):
    log, release = tmp_path / "pids", tmp_path / "release"
    # A exits after reporting one job: that is how the test knows A reported its copy
    a = start_node("--max-jobs", "1", workers=1, visibility_timeout=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    calls = _count_calls(f)
    try:
        wait_for(lambda: len(_pids(log)) == 1, what="the task to start on node A")
        first = _pids(log)[0]
        _freeze(a, enclave_dir)  # A stops extending the visibility: the task is redelivered
        b = start_node(workers=1)
        wait_for(lambda: len(_pids(log)) == 2, what="node B to receive the redelivered task")
        second = _pids(log)[1]
        assert second in b.worker_pids() and second != first
        tasks.release(release, "go")  # both copies finish; A is frozen and cannot report yet
        assert f.result(GUARD) == second
    finally:
        tasks.release(release, "go")
        os.kill(a.pid, signal.SIGCONT)

    assert a.proc.wait(GUARD) == 0  # A reported its own copy (max-jobs 1), then exited
    job = enclave.jobs.get(f.job_id, with_result=True)
    assert job.state == "completed"
    assert job.node == b.node_id
    assert wire.outcomes(wire.decode(job.result)) == [(True, second)]  # B's result, not A's
    assert _finals(enclave, f.job_id) == ["completed"]
    assert ex.submit(tasks.square, 4).result(GUARD) == 16  # let any stray reply arrive
    assert calls == [f]
    assert f.result() == second


def test_a_task_queued_without_a_ring_runs_within_a_poll_interval(start_node, make_executor,
                                                                  enclave):
    """A node reads its queue when rung, and once a poll interval whatever happens: a
    lost ring (or a redelivery, which nobody rings for) only delays a task."""
    start_node(workers=1)  # --poll-interval 0.1
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4  # the node is up, and idle again
    job = ex._new_job(os.urandom(16).hex(), tasks.square, [((3,), {})], ex._options)
    enclave.jobs.create([job])  # recorded and queued, but no doorbell rung
    wait_for(lambda: enclave.jobs.get(job.job_id).state == "completed",
             what="the unrung task to run")
    result = enclave.jobs.get(job.job_id, with_result=True).result
    assert wire.outcomes(wire.decode(result)) == [(True, 9)]


def test_an_idle_node_with_a_long_poll_interval_keeps_its_heartbeat(start_node, enclave):
    # idle, with nothing to ring it, a node slept its whole --poll-interval: at 120 s (a
    # quiet AWS queue's) no heartbeat for two minutes, and it dropped out of the live nodes
    # after 30 s, its held messages' visibility running out as well
    node = start_node("--poll-interval", "120", visibility_timeout=1.5)

    def heartbeat() -> float:
        [info] = [n for n in enclave.nodes.all() if n.node_id == node.node_id]
        return info.heartbeat

    first = heartbeat()
    wait_for(lambda: heartbeat() >= first + 1.0, what="the idle node's next heartbeats")
    assert node.proc.poll() is None


def test_a_task_rung_in_while_the_node_is_full_runs_when_room_frees(start_node, make_executor,
                                                                   enclave, tmp_path):
    """A ring that finds the node with no room must not be lost: the task runs when room
    frees, not a poll interval (here 30 s) later."""
    log, release = tmp_path / "pids", tmp_path / "release"
    node = start_node("--poll-interval", "30", "--prefetch", "3", workers=1)  # room: 4 tasks
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 1).result(GUARD) == 1
    try:
        held = [ex.submit(tasks.log_pid_and_wait, str(log), str(release))]
        wait_for(lambda: _pids(log), what="the first task to run")
        for _ in range(3):  # taken one by one: the node is never backlogged
            held.append(ex.submit(tasks.sleep_and_return, 0.01, 0))
            wait_for(lambda: _holder(enclave, held[-1].job_id) == node.node_id,
                     what="the node to hold it")
        late = ex.submit(tasks.square, 5)  # rung in while the node holds 4: no room
        wait_for(lambda: enclave.jobs.get_many([late.job_id]), what="the late job's record")
        assert _holder(enclave, late.job_id) is None  # queued: the node had no room
        assert not held[0].done()  # (the node was full all along)
    finally:
        tasks.release(release, "go")
    assert [f.result(GUARD) for f in held[1:]] == [0, 0, 0]
    assert late.result(timeout=20) == 25  # the bug: ~30 s, at the next poll


def test_a_frame_bigger_than_the_pipe_does_not_stall_the_node(start_node, make_executor,
                                                             enclave_dir):
    """Tasks queued behind a running one travel in frames larger than a pipe holds; the
    node must not wait for the worker to read them, holding the database meanwhile."""
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 1).result(GUARD) == 1
    big = "x" * 150_000  # under the 256 KiB inline limit, over a pipe's 64 KiB
    # one long task, and three behind it (their length does not matter: their frame does)
    fs = [ex.submit(tasks.sleep_and_return, t, big) for t in (4.0, 0.0, 0.0, 0.0)]
    wait_for(lambda: fs[0].status() == "processing", what="the first task to run")
    db = sqlite3.connect(enclave_dir / "kotta.db", timeout=GUARD, isolation_level=None)
    try:
        longest = 0.0
        for _ in range(20):  # for about 3 s of the first task's 4
            t0 = time.monotonic()
            db.execute("BEGIN IMMEDIATE")  # what a submit or a cancel needs
            db.execute("ROLLBACK")
            longest = max(longest, time.monotonic() - t0)
            time.sleep(0.15)
    finally:
        db.close()
    assert longest < 2.0, f"the node held the database for {longest:.1f} s"
    assert [len(f.result(GUARD)) for f in fs] == [150_000] * 4
    assert node.proc.poll() is None


# ---------------------------------------------------------------------- dead letters


def test_corrupt_task_messages_are_dead_lettered(start_node, make_executor, enclave):
    ex = make_executor(1, start_node=False)
    # a real task body to corrupt: borrow the message of a task no node has seen yet
    template = ex.submit(tasks.square, 1)
    wait_for(lambda: enclave.jobs.get(template.job_id) is not None, what="the job")
    [d] = enclave.queue.receive("test", 10, 60.0, "test-thief")
    enclave.queue.release([d])
    real = d.body
    wire.decode(real)  # it is a valid envelope

    ids = [os.urandom(16).hex() for _ in range(3)]
    bodies = {
        ids[0]: b"garbage",
        ids[1]: real[:-3],  # truncated
        ids[2]: real,  # a valid task, but of another job
    }
    enclave.jobs.create([
        NewJob(job_id, ex.owner, ex.client_id, "test", "tests.tasks.square", 60.0, body)
        for job_id, body in bodies.items()
    ])
    futures = [ex.attach(job_id) for job_id in ids]
    # a task too big for a message whose blob was lost
    big = ex.submit(tasks.noop, b"x" * (enclave.inline_limit + 1))
    wait_for(lambda: enclave.jobs.get(big.job_id) is not None, what="the big job")
    blobs = [p.name for p in (enclave.home / "blobs").rglob("*") if p.is_file()]
    assert blobs, "the big argument should travel as a blob"
    enclave.blobs.delete(blobs)
    futures.append(big)
    ids.append(big.job_id)

    node = start_node(workers=1)
    for f in futures:
        with pytest.raises(CorruptTask, match="corrupt task message"):
            f.result(GUARD)
    assert template.result(GUARD) == 1

    dead = {d["job_id"]: d for d in enclave.queue.dead_letters("test")}
    assert set(dead) == set(ids)
    for job_id in ids:
        assert "corrupt" in dead[job_id]["reason"]
        job = enclave.jobs.get(job_id)
        assert job.state == "failed"
        assert "corrupt" in job.reason
        assert _finals(enclave, job_id) == ["failed"]
    assert enclave.queue.depth("test") == 0
    # the node survived and serves the next task
    assert node.proc.poll() is None
    assert ex.submit(tasks.square, 5).result(GUARD) == 25


@pytest.mark.parametrize("most", [1, 2])
def test_task_that_kills_its_node_is_dead_lettered_after_max_deliveries(start_node,
                                                                        make_executor,
                                                                        enclave, most):
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.kill_own_node)

    def final() -> bool:
        job = enclave.jobs.get(f.job_id)
        return job is not None and job.state.final

    nodes = []
    for _ in range(6):  # --max-deliveries N: N nodes die, the next dead-letters the task
        node = start_node("--max-deliveries", str(most), workers=1, wait=False)
        nodes.append(node)
        wait_for(lambda n=node: n.proc.poll() is not None or final(),
                 what="the node to die or the job to fail")
        if final():
            break
    # (counted as the dead letter counts them: the delivery that dead-lettered it too)
    said = f"delivered {most + 1} times without completing"
    with pytest.raises(DeliveryFailed, match=said):
        f.result(GUARD)
    assert len(nodes) == most + 1
    assert [n.proc.returncode for n in nodes[:most]] == [-signal.SIGKILL] * most
    assert nodes[most].proc.poll() is None

    [dead] = enclave.queue.dead_letters("test")
    assert dead["job_id"] == f.job_id
    assert dead["receive_count"] == most + 1
    job = enclave.jobs.get(f.job_id)
    assert job.state == "failed"
    assert said in job.reason
    assert _finals(enclave, f.job_id) == ["failed"]
    assert ex.submit(tasks.square, 6).result(GUARD) == 36  # the surviving node serves on


def test_receive_count_over_max_deliveries_is_dead_lettered(start_node, make_executor,
                                                            enclave):
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 2)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be created")
    for _ in range(3):  # three deliveries that never completed
        [d] = enclave.queue.receive("test", 10, 0.0, "test-thief")
        assert d.job_id == f.job_id
    node = start_node("--max-deliveries", "3", workers=1)
    with pytest.raises(DeliveryFailed, match="delivered 4 times"):  # (the node's, the 4th)
        f.result(GUARD)
    assert [d["job_id"] for d in enclave.queue.dead_letters("test")] == [f.job_id]
    assert enclave.jobs.get(f.job_id).state == "failed"
    assert node.proc.poll() is None
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


def _blob_files(enclave) -> list[str]:
    return sorted(p.name for p in (enclave.home / "blobs").rglob("*")
                  if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("end", ["cancelled", "dead-lettered"])
def test_a_task_that_never_runs_leaves_no_blob(make_executor, enclave, end):
    """A task's sections too big for its message go to blobs (``args-<job id>``), which
    the node deleted only with a result it recorded.  A job cancelled before a node took
    it (its message dropped), or dead-lettered (delivered too often), kept its blobs for
    ever.  Its node deletes them now, once the job has ended."""
    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.noop, b"x" * (enclave.inline_limit + 1))
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    assert _blob_files(enclave) == [f"args-{f.job_id}"]
    if end == "cancelled":
        assert f.cancel()
    else:  # three deliveries that never completed (their nodes died)
        for _ in range(3):
            enclave.queue.receive("test", 10, 0.0, "test-thief")
    Node(enclave, NodeConfig(queue="test", workers=1, burst=True, max_deliveries=3)).run()
    assert enclave.queue.depth("test") == 0
    r = enclave.jobs.get(f.job_id)
    assert r.state == (JobState.CANCELLED if end == "cancelled" else JobState.FAILED), r.reason
    assert _blob_files(enclave) == []


def test_a_task_whose_blob_cannot_be_read_fails_and_its_node_serves_on(start_node,
                                                                       make_executor, enclave):
    """A task's blob that is there but cannot be opened (another OS user's file, after a
    restore from a backup: EACCES; a failing disk: EIO; here a symlink to itself: ELOOP)
    ended the node that received the task, with a traceback, and the next node, and the
    next, until the executor gave up on them all (BrokenEnclave: the local node died 6
    times) and every task of the queue waited.  The task fails alone, naming the blob."""
    ex = make_executor(1, start_node=False)
    f = ex.submit(len, b"x" * (enclave.inline_limit + 1))
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    key = f"args-{f.job_id}"
    blob = enclave.home / "blobs" / key[:2] / key
    blob.unlink()
    blob.symlink_to(blob)
    node = start_node()
    with pytest.raises(CorruptTask, match=f"cannot be read .*{key}"):
        f.result(GUARD)
    assert enclave.jobs.get(f.job_id).state == JobState.FAILED
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    assert node.proc.poll() is None, node.output()


def test_task_blobs_that_no_job_records_are_deleted_once_old(start_node, enclave):
    """A client that dies between writing a task's big sections to blobs and recording
    its job (a kernel restarted during a burst of big submits) leaves blobs that nothing
    names, with the pickled arguments in them, for ever.  Nodes delete those written over
    STRAY_BLOB_AGE ago; not a recorded job's, nor a younger one (its client may record it
    yet), nor a blob that is not a task's."""
    import uuid

    from node.daemon import STRAY_BLOB_AGE

    recorded = uuid.uuid4().hex  # a job recorded, never queued: no node ends it
    enclave.jobs.create([NewJob(recorded, "someone", "client", "test", "fn", 60.0, b"", 1)],
                        enqueue=False)
    stray = [f"args-{uuid.uuid4().hex}", f"fn-{uuid.uuid4().hex}"]
    keep = [f"args-{recorded}", f"args-{uuid.uuid4().hex}", "args-not-a-job"]
    for key in (*stray, *keep):
        enclave.blobs.put(key, b"pickled arguments")
    then = time.time() - STRAY_BLOB_AGE - 60
    for key in (*stray, keep[0], keep[2]):  # written over STRAY_BLOB_AGE ago
        os.utime(enclave.home / "blobs" / key[:2] / key, (then, then))
    start_node(visibility_timeout=3.0)  # (its upkeep, and first look, a second after start)
    wait_for(lambda: not set(stray) & set(_blob_files(enclave)),
             what="the node to delete the stray blobs")
    assert _blob_files(enclave) == sorted(keep)


def test_task_blobs_of_ended_jobs_are_deleted_once_old(start_node, enclave):
    """A node deletes a task's blobs after the step that recorded its result has
    committed.  Killed in between (40 SIGKILLs of a node running 2,000 tasks with 300 KiB
    arguments left three ``args-`` blobs of completed jobs), it left them for good: the
    sweep spared every blob whose job has a record, and no delivery of an ended job runs
    again.  Here such a job is recorded as the killed node left it.  Nodes delete them once
    over STRAY_BLOB_AGE old; a blob of a job that has not ended stays."""
    import uuid

    from node.daemon import STRAY_BLOB_AGE

    ended, waiting = uuid.uuid4().hex, uuid.uuid4().hex
    enclave.jobs.create([NewJob(j, "someone", "client", "test", "fn", 60.0, b"", 1)
                         for j in (ended, waiting)], enqueue=False)
    enclave.jobs.transition([ended], JobState.PROCESSING, node="gone")
    assert enclave.jobs.finish([Finished(ended, JobState.COMPLETED, b"result")]) == [ended]
    keys = [f"args-{ended}", f"fn-{ended}", f"args-{waiting}"]
    for key in keys:
        enclave.blobs.put(key, b"pickled arguments")
    then = time.time() - STRAY_BLOB_AGE - 60
    for key in keys:
        os.utime(enclave.home / "blobs" / key[:2] / key, (then, then))
    start_node(visibility_timeout=3.0)  # (its upkeep, and first look, a second after start)
    wait_for(lambda: _blob_files(enclave) == [f"args-{waiting}"],
             what="the node to delete the ended job's blobs")


def test_result_blobs_a_killed_node_left_are_deleted_once_old(start_node, make_executor,
                                                              enclave):
    """A result over the inline limit goes to a blob (result-<job>-<suffix>), written
    before the transaction that records it.  A node killed while writing it left a
    half-written temporary file; one killed after the rename, before the commit, a blob
    that no record names; the task ran again elsewhere, into a blob of another name.
    Neither was ever removed (the sweep looked at task blobs only): the disk filled with
    results nobody can read.  Nodes delete them once over STRAY_BLOB_AGE old; the
    recorded result blob stays."""
    import uuid

    from node.daemon import STRAY_BLOB_AGE

    blobs = enclave.home / "blobs"
    first = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(bytes, 64 * 1024 * 1024)  # over the inline limit: a result blob

    def writing() -> list[Path]:
        return list(blobs.glob("re/.result-*.tmp")) if blobs.exists() else []

    wait_for(writing, interval=0.0002, what="the node to write the result's blob")
    first.kill()  # ...while it writes it
    assert writing()
    second = start_node(workers=1)
    assert len(f.result(GUARD)) == 64 * 1024 * 1024  # the task ran again
    second.terminate()
    recorded = f"result-{f.job_id}-" + _blob_files(enclave)[0].rpartition("-")[2]
    assert _blob_files(enclave) == [recorded]
    unrecorded = [f"result-{f.job_id}-{uuid.uuid4().hex[:12]}",  # killed before the commit
                  f"result-{uuid.uuid4().hex}-{uuid.uuid4().hex[:12]}"]  # and its job gone
    for key in unrecorded:
        enclave.blobs.put(key, b"a pickled result")
    then = time.time() - STRAY_BLOB_AGE - 60
    for path in blobs.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))
    start_node(workers=1)  # (its first look is at its first upkeep)
    wait_for(lambda: not writing() and _blob_files(enclave) == [recorded],
             what="the node to delete the stray result blobs")
    assert enclave.jobs.get(f.job_id, with_result=True).result is not None


def test_a_dependent_task_cancelled_as_its_blob_is_written_leaves_no_blob(make_executor,
                                                                         enclave):
    """A task that waits for a future is pickled, its big sections written to blobs, by
    the manager once the future is done, before it takes the task from the waiting ones
    (under the send lock).  Cancelled meanwhile, the task is recorded cancelled, and the
    manager drops it; its blob stayed, for ever: its job is recorded (the nodes' sweep
    leaves it), and no message of it ever reaches a node."""
    from concurrent.futures import Future

    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    dep: Future = Future()
    f = ex.submit(tasks.add, dep, b"x" * (64 * 1024 * 1024))  # (big: a blob)
    blobs = enclave.home / "blobs"

    def writing() -> bool:
        return blobs.exists() and any(p.name.startswith(".args-") for p in blobs.rglob("*"))

    dep.set_result(b"")  # the manager pickles the call, then writes its blob...
    wait_for(writing, interval=0.0002, what="the manager to write the task's blob")
    assert f.cancel()  # ...cancelled meanwhile
    wait_for(lambda: not writing(), what="the write to end")
    ex.shutdown(wait=True)
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
    Node(enclave, NodeConfig(queue="test", workers=1, burst=True)).run()
    assert _blob_files(enclave) == []


def test_a_dependent_task_whose_second_blob_cannot_be_written_leaves_no_blob(
        make_executor, enclave):
    """A task pickled once its dependency is done writes its big sections to blobs one by
    one: the function's written, the arguments' failed (here: a file where their
    directory goes).  The job is recorded failed, so the nodes' sweep keeps the blob
    written, for ever."""
    import functools
    from concurrent.futures import Future

    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    big = b"x" * (enclave.inline_limit + 1)
    blobs = enclave.home / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / "ar").write_bytes(b"")  # where args-* blobs go: writing one fails
    dep: Future = Future()
    f = ex.submit(functools.partial(tasks.add, big), dep, big)  # (two big sections)
    dep.set_result(b"")
    with pytest.raises(OSError):
        f.result(GUARD)
    ex.shutdown(wait=True)
    assert enclave.jobs.get(f.job_id).state == JobState.FAILED
    Node(enclave, NodeConfig(queue="test", workers=1, burst=True)).run()
    assert [n for n in _blob_files(enclave) if n != "ar"] == []


# A client that writes a big task's blob, then cannot record its job (the test holds the
# enclave's write lock), and is stopped there (SIGSTOP: Ctrl-Z, a debugger, a paused
# container) until the test lets it go on.
LATE_CLIENT = '''
import os, sys, time
from kotta_executor import KottaExecutor
enclave, ready, go = sys.argv[1:4]
ex = KottaExecutor(1, enclave=enclave, start_node=False)
warm = ex.submit(len, b"")  # (the manager up, a record written)
while ex.enclave.jobs.get(warm.job_id) is None:
    time.sleep(0.01)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
f = ex.submit(len, b"x" * (300 * 1024))  # over the inline limit: a blob
try:
    print("result", f.result(60), flush=True)
except BaseException as exc:
    print("error", type(exc).__name__, exc, flush=True)
'''


def test_a_client_stopped_past_the_sweeps_age_sees_its_task_fail_for_its_swept_blob(
        start_node, enclave, enclave_dir, tmp_path):
    """The limit of the sweep of stray task blobs: a client records a job within a minute
    of writing its blobs, or never (it gives up after SEND_RETRY_FOR), unless its process
    is stopped in between (SIGSTOP, Ctrl-Z, a laptop asleep), for longer than
    STRAY_BLOB_AGE (here: os.utime).  Once let go it records the job; a node's sweep has
    deleted the blob meanwhile.  The task then fails visibly, as a CorruptTask naming the
    blob, rather than running on something else."""
    import subprocess
    import sys

    from node.daemon import STRAY_BLOB_AGE
    from tests.conftest import ROOT, subprocess_env

    script, ready, go = tmp_path / "client.py", tmp_path / "ready", tmp_path / "go"
    script.write_text(LATE_CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), str(enclave_dir), str(ready), str(go)],
                            env=subprocess_env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(ready.exists, what="the client to start")
        lock = sqlite3.connect(enclave_dir / "kotta.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the client cannot record its job
        go.touch()
        wait_for(lambda: any(n.startswith("args-") for n in _blob_files(enclave)),
                 what="the client to write the task's blob")
        os.kill(proc.pid, signal.SIGSTOP)
        lock.execute("ROLLBACK")
        lock.close()
        (key,) = [n for n in _blob_files(enclave) if n.startswith("args-")]
        job_id = key[len("args-"):]
        assert enclave.jobs.get(job_id) is None  # not recorded yet
        then = time.time() - STRAY_BLOB_AGE - 60
        os.utime(enclave.home / "blobs" / key[:2] / key, (then, then))
        start_node(visibility_timeout=3.0)  # its first look: at its first upkeep, in a second
        wait_for(lambda: key not in _blob_files(enclave), what="the sweep to delete the blob")
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=GUARD)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error CorruptTask job {job_id} has a corrupt task message"), out
    assert f"no blob '{key}'" in last, out


# ---------------------------------------------------------------------- draining


@pytest.mark.parametrize("stop", [
    pytest.param(signal.SIGTERM, id="sigterm"),
    # ``kotta node`` in a terminal whose ssh session closed: it died at once, its running
    # task with it, and held the queued one till its visibility ran out
    pytest.param(signal.SIGHUP, id="hang_up"),
])
def test_a_stop_signal_finishes_the_running_task_and_hands_back_the_rest(
    start_node, make_executor, enclave, tmp_path, stop
):
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node("--prefetch", "1", workers=1)  # (holds one queued)
    ex = make_executor(1, start_node=False)
    running = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        wait_for(lambda: _pids(log), what="the task to start on node A")
        queued = [ex.submit(tasks.worker_pid) for _ in range(3)]
        # A has room for one task more than it runs: it holds the first queued one
        wait_for(lambda: _holder(enclave, queued[0].job_id) == a.node_id,
                 what="node A to take a queued task")
        assert enclave.jobs.get(queued[0].job_id).state == "pending"

        a.proc.send_signal(stop)
        wait_for(lambda: _holder(enclave, queued[0].job_id) is None,
                 what="node A to hand back the queued task")
        b = start_node(workers=1)
        results = [q.result(GUARD) for q in queued]  # well within A's 30 s visibility
        assert set(results) <= set(b.worker_pids())
        assert {enclave.jobs.get(q.job_id).node for q in queued} == {b.node_id}
        assert not running.done()
        assert a.proc.poll() is None  # still draining its running task
    finally:
        tasks.release(release, "go")

    assert running.result(GUARD) == _pids(log)[0]
    assert a.proc.wait(GUARD) == 0, a.output()
    job = enclave.jobs.get(running.job_id)
    assert job.state == "completed" and job.node == a.node_id
    assert a.node_id not in {n.node_id for n in enclave.nodes.live()}


def test_a_stopping_node_logs_which_signal_stopped_it_and_what_it_hands_back(
    start_node, make_executor, tmp_path
):
    """The log of a node that SIGTERM stopped said only "stopped after N jobs": not why
    it stopped (`kotta down`, a supervisor, a scaler?), nor what it did with its work."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    running = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        wait_for(lambda: _pids(log), what="the task to start")
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM" in a.output(), what="the node to log the signal")
    finally:
        tasks.release(release, "go")
    assert a.proc.wait(GUARD) == 0, a.output()
    assert running.result(GUARD) == _pids(log)[0]
    assert ("stopping on SIGTERM: taking no more tasks, letting 1 running finish (for up "
            "to 30 s)") in a.output()


def test_a_node_started_with_sighup_ignored_goes_on_after_a_hang_up(enclave_dir, make_executor,
                                                                    tmp_path):
    """Under ``nohup`` (SIGHUP ignored) a hang-up does not stop the node."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = tmp_path / "node.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "--enclave", str(enclave_dir), "--workers", "1",
             "--poll-interval", "0.1"], stdout=f, stderr=f, stdin=subprocess.DEVNULL,
            env=subprocess_env(), cwd=str(ROOT),
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        ex = make_executor(1, start_node=False)
        assert ex.submit(tasks.worker_pid).result(GUARD) > 0  # it serves
        proc.send_signal(signal.SIGHUP)
        # it still serves, after the hang-up (a task sent after it runs there)
        assert ex.submit(tasks.worker_pid).result(GUARD) > 0
        assert proc.poll() is None, out.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(GUARD) == 0, out.read_text()


def test_a_task_handed_to_a_node_does_not_overtake_the_clients_earlier_queued_task(
        start_node, make_executor, enclave, enclave_dir, tmp_path, monkeypatch):
    """A lone submit goes straight to a node's inbox; submits close together go through the
    queue.  The node adopts what its inbox holds before it receives from the queue, so a
    lone task handed to it took its room and ran before the same client's task submitted
    just before it, still queued (found by a helper: 1 run in 20 of the demo's cancel,
    where the earlier task ran late).  The third now goes through the queue too."""
    log = tmp_path / "order"
    # (the frozen node cannot take the first: its client would queue it after a second)
    monkeypatch.setattr(executor_module, "HAND_OFF_CONFIRM", 60.0)
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(tasks.worker_pid).result(GUARD)  # (a worker, and the node's inbox, ready)
    _freeze(a, enclave_dir)  # it takes all three in one step
    first = ex.submit(tasks.append_line, str(log), "first")  # alone: handed to the node
    assert first.job_id in ex._handed  # (the case this is about)
    # the send lock held by another thread, as the manager's send holds it (this thread
    # would take it again: it is reentrant): the second goes through the outbox, queued
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ex._send_lock:
            held.set()
            done.wait(GUARD)
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(GUARD)
    try:
        second = ex.submit(tasks.append_line, str(log), "second")
        assert [job.job_id for job, _ in ex._outbox] == [second.job_id]
    finally:
        done.set()
        holder.join(GUARD)
    wait_for(lambda: enclave.jobs.get_many([second.job_id]), what="the second to be queued")
    # alone again, but the second is queued still: through the queue, behind it (handed
    # to the node, it was adopted first, took the node's room, and ran before the second)
    third = ex.submit(tasks.append_line, str(log), "third")
    os.kill(a.pid, signal.SIGCONT)
    for f in (first, second, third):
        f.result(GUARD)
    assert log.read_text().split() == ["first", "second", "third"]


def test_a_draining_node_hands_back_piped_tasks_its_worker_never_began(start_node, make_executor,
                                                                      enclave, enclave_dir):
    """A worker asked to stop between tasks (the node drains) exits without beginning the
    next one: that one too goes back to the queue, and runs elsewhere, instead of failing
    as if the worker had died under it."""
    a = start_node("--prefetch", "3", workers=1)  # (as many held as before)
    ex = make_executor(1, start_node=False)
    worker = ex.submit(tasks.worker_pid).result(GUARD)
    _freeze(a, enclave_dir)  # so that it takes the tasks in one step, and pipes them together
    futures = [ex.submit(tasks.square, i) for i in range(8)]
    _all_sent(ex, futures)
    _stop_process(worker)  # it cannot begin them
    os.kill(a.pid, signal.SIGCONT)
    try:
        ids = [f.job_id for f in futures]

        def piped() -> list[str]:  # claimed: in the worker's pipe
            return [j.job_id for j in enclave.jobs.get_many(ids).values() if j.state == "processing"]

        wait_for(lambda: len(piped()) >= 2, what="node A to pipe tasks to its stopped worker")
        a.proc.send_signal(signal.SIGTERM)  # it asks the worker to stop after the head task
        wait_for(lambda: _signal_pending(worker, STOP_SIGNAL),
                 what="node A to ask its worker to stop")
    finally:
        os.kill(worker, signal.SIGCONT)  # it reads the request before it begins a task
    assert a.proc.wait(GUARD) == 0
    start_node(workers=1)
    assert [f.result(GUARD) for f in futures] == [i * i for i in range(8)]
    assert all(_finals(enclave, f.job_id) == ["completed"] for f in futures)


@pytest.mark.parametrize("stop", [
    pytest.param(signal.SIGTERM, id="sigterm"),
    pytest.param(signal.SIGUSR1, id="leave"),
])
def test_piped_tasks_a_stopping_node_never_began_are_pending_again_and_not_counted(
        start_node, make_executor, enclave, enclave_dir, stop):
    """The tasks behind the head in the pipe of a worker that stopped as asked never began:
    they go back pending and uncounted.  They were released counted, their jobs left in
    processing: with `--max-deliveries 1` the next node dead-lettered them all, failing
    them with DeliveryFailed ("delivered 1 times without completing") though they had
    never run."""
    _, futures, behind = _piped_then_stopped(start_node, make_executor, enclave_dir,
                                             "--max-deliveries", "1", stop=stop)
    records = enclave.jobs.get_many(behind)
    assert {r.state for r in records.values()} <= {JobState.PENDING, JobState.COMPLETED}
    back = [r for r in records.values() if r.state == JobState.PENDING]
    assert back  # (the worker finished the head at most)
    assert all((r.node, r.started, r.attempts) == (None, None, 0) for r in back)
    start_node("--max-deliveries", "1", workers=1)
    assert [f.result(GUARD) for f in futures] == [i * i for i in range(8)]
    assert all(_finals(enclave, f.job_id) == ["completed"] for f in futures)
    assert enclave.queue.dead_letters("test") == []
    # each ran once: `kotta status` says "attempts 1", not 2
    assert {r.attempts for r in enclave.jobs.get_many([r.job_id for r in back]).values()} == {1}


def _piped_then_stopped(start_node, make_executor, enclave_dir, *node_args,
                        stop=signal.SIGTERM):
    """A node (one worker) pipes 8 tiny tasks to its stopped worker, and is stopped
    (``stop``): the worker begins the head at most.  The executor, the futures, and the
    ids of the jobs that were piped (their futures seen running)."""
    a = start_node(*node_args, "--prefetch", "3", workers=1)  # (it pipes deep)
    ex = make_executor(1, start_node=False)
    worker = ex.submit(tasks.worker_pid).result(GUARD)  # a tiny average: the node pipes deep
    _freeze(a, enclave_dir)  # so that it takes the tasks in one step, and pipes them together
    futures = [ex.submit(tasks.square, i) for i in range(8)]
    _all_sent(ex, futures)
    _stop_process(worker)  # it cannot begin them
    os.kill(a.pid, signal.SIGCONT)
    try:
        wait_for(lambda: sum(f.status() == "processing" for f in futures) >= 2,
                 what="node A to pipe tasks to its stopped worker")  # (status(): running)
        behind = [f.job_id for f in futures if f.status() == "processing"]
        a.proc.send_signal(stop)  # it asks the worker to stop after the head task
        wait_for(lambda: _signal_pending(worker, STOP_SIGNAL),
                 what="node A to ask its worker to stop")
    finally:
        os.kill(worker, signal.SIGCONT)  # it reads the request before it begins a task
    assert a.proc.wait(GUARD) == 0, a.output()
    return ex, futures, behind


def _handed_back_seen_running(start_node, make_executor, enclave_dir):
    """:func:`_piped_then_stopped`, and the futures of the tasks sent back to pending."""
    ex, futures, _ = _piped_then_stopped(start_node, make_executor, enclave_dir)
    back = [f for f in futures if f.running() and f.status() == "pending"]
    assert back  # (the worker ran the head at most)
    return ex, futures, back


def test_a_future_seen_running_whose_job_a_stopping_node_handed_back_ends_when_cancelled(
        start_node, make_executor, enclave, enclave_dir):
    """A task piped to a worker that never began it goes back to pending as its node stops;
    its future, seen running while the task was in the pipe, stays running.  A
    ``shutdown(cancel_futures=True)`` then cancelled its job (pending: nobody had started
    it), took the future out of the executor's, and could not cancel it (running): its
    ``result()`` waited for ever.  Now it raises CancelledError, as the job was."""
    ex, futures, back = _handed_back_seen_running(start_node, make_executor, enclave_dir)
    ex.shutdown(wait=False, cancel_futures=True)
    for f in back:
        with pytest.raises(CancelledError):
            f.result(GUARD)
        assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED


@pytest.mark.parametrize("how", ["cancel", "kill", "kill request"])
def test_a_future_seen_running_whose_job_a_stopping_node_handed_back_is_cancelled(
        start_node, make_executor, enclave, enclave_dir, how):
    """A future seen running, whose task its stopping node handed back to pending (never
    begun), and then:

    - cancelled: cancel() said False, as the future was running, so it never asked,
      though the job was pending again;
    - killed: kill() said True and only flagged the job, and the next node, which looks
      for the kill requests of a first delivery only once it runs, ran it: the "killed"
      future returned its result;
    - kill request: kill() asks for a kill once its cancels found the job started, and
      the hand-back may come just before that ask (the step is called here as that race
      leaves it): the job, pending again, was flagged, and ran to its end.

    Now the job, no node's, is cancelled as any pending one, and never runs."""
    ex, futures, back = _handed_back_seen_running(start_node, make_executor, enclave_dir)
    if how == "cancel":
        assert [f.cancel() for f in back] == [True] * len(back)
    elif how == "kill":
        assert all(f.kill() for f in back)
    else:
        assert all(ex._kill_job(f.job_id) for f in back)
    assert all(f.cancelled() and not f.running() for f in back)
    start_node(workers=1)
    rest = [f for f in futures if f not in back]
    assert [f.result(GUARD) for f in rest] == [i * i for i, f in enumerate(futures)
                                                if f not in back]
    for f in back:
        with pytest.raises(CancelledError):
            f.result(GUARD)
        assert _finals(enclave, f.job_id) == ["cancelled"]
        assert "processing" not in [s for _, s, _ in enclave.jobs.history(f.job_id)][2:]
        if how == "kill request":
            assert enclave.jobs.get(f.job_id).reason == KILLED_PENDING


def test_a_task_that_began_and_ends_its_worker_during_the_drain_fails_and_runs_once(
        start_node, make_executor, enclave, enclave_dir, tmp_path):
    """The worker asked to stop exits 0 from inside a task it began (os._exit(0)): that is a
    worker that died under its task, not one that stopped as asked, and the task is not run
    again (found by review: keyed on status 0, the node handed it back).  The tasks piped
    behind it, which it never began (a worker runs one task after another), went back
    counted, their jobs left in processing: with `--max-deliveries 1` the next node
    dead-lettered them (DeliveryFailed, "delivered 1 times without completing") though
    they never ran.  Now they are pending again, uncounted, and run on the next node."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node("--max-deliveries", "1", "--prefetch", "3", workers=1)  # (as many held
    # as before)
    ex = make_executor(1, start_node=False)
    worker = ex.submit(tasks.worker_pid).result(GUARD)  # a tiny average: the node pipes deep
    _freeze(a, enclave_dir)  # so that it takes them in one step, and pipes them together
    head = ex.submit(tasks.log_pid_wait_and_exit_0, str(log), str(release))
    rest = [ex.submit(tasks.square, i) for i in range(7)]
    os.kill(a.pid, signal.SIGCONT)
    ids = [f.job_id for f in rest]
    try:
        wait_for(lambda: _pids(log), what="the head task to begin on node A")
        wait_for(lambda: any(j.state == "processing" for j in enclave.jobs.get_many(ids).values()),
                 what="node A to pipe tasks behind the head one")
        piped = [j.job_id for j in enclave.jobs.get_many(ids).values() if j.state == "processing"]
        _stop_process(worker)  # to see the request arrive while the head runs
        try:
            a.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _signal_pending(worker, STOP_SIGNAL),
                     what="node A to ask its worker to stop")
        finally:
            os.kill(worker, signal.SIGCONT)
    finally:
        tasks.release(release, "go")  # the head, well under way, now ends its worker with 0
    assert a.proc.wait(GUARD) == 0, a.output()
    records = enclave.jobs.get_many(piped)
    assert {(r.state, r.node, r.attempts) for r in records.values()} == {("pending", None, 0)}
    start_node("--max-deliveries", "1", workers=1)
    assert [f.result(GUARD) for f in rest] == [i * i for i in range(7)]
    with pytest.raises(WorkerDied, match="exited with code 0"):
        head.result(GUARD)
    assert len(_pids(log)) == 1  # it began once, on node A
    assert enclave.queue.dead_letters("test") == []


def test_a_node_stopping_with_busy_workers_ends_them_together_not_one_after_another(
        start_node, make_executor, enclave, tmp_path):
    """Past its drain timeout a node hands back the tasks still running, and ends its
    workers: it gives them together a short while to exit, then kills the rest.  (It
    waited 2 s for each busy worker in turn: a node with N of them took 2N s to stop, and
    the last one's task ran on that long after it had been handed back.)"""
    log, release = tmp_path / "pids", tmp_path / "release"
    n = 4
    a = start_node("--drain-timeout", "0.2", workers=n)
    ex = make_executor(1, start_node=False)
    futures = [ex.submit(tasks.log_pid_and_wait, str(log), str(release)) for _ in range(n)]
    try:
        wait_for(lambda: len(_pids(log)) == n, what=f"the {n} tasks to begin on node A")
        workers = _pids(log)  # (each task logs its worker's pid)
        began = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(GUARD) == 0
        took = time.monotonic() - began
        assert all(gone(pid) for pid in workers)
        assert all(_holder(enclave, f.job_id) is None for f in futures)  # handed back
    finally:
        tasks.release(release, "go")
    start_node(workers=n)
    assert sorted(f.result(GUARD) for f in futures) == sorted(_pids(log)[n:])
    # 0.2 s of drain, then about 2 s for all the workers; it was 2 s for each, so at
    # least 8 s (8.4 measured): the bound leaves a loaded machine 4 s to spare
    assert took < 6.0, f"node A took {took:.1f} s to stop {n} busy workers"


# ---------------------------------------------------------------------- workers


def test_a_node_whose_enclave_directory_is_removed_stops_and_says_why(start_node, enclave,
                                                                     enclave_dir):
    """``rm -rf`` of an enclave directory under its running node (``kotta up``'s, say):
    the node served on, for good, an enclave that no longer existed (SQLite goes on with
    an unlinked file), and `kotta down` could not stop it ("no enclave at ...").  It
    stops, as on SIGTERM, saying why, with exit status 1."""
    import shutil

    node = start_node(workers=1, visibility_timeout=0.6)
    shutil.rmtree(enclave_dir)
    wait_for(lambda: node.proc.poll() is not None, what="the node to stop")
    assert node.proc.returncode == 1, node.output()
    assert f"the enclave database {enclave_dir / 'kotta.db'} was removed" in node.output()


def test_an_executors_own_node_serves_it_on_after_its_enclave_directory_is_removed(
        make_executor, enclave_dir):
    """An executor's own node lives as its executor does: both go on with the removed
    database they have open.  Stopped, the node was started again by its executor, on a
    new empty enclave made in the removed one's place, and the executor's tasks waited
    for good."""
    import shutil

    ex = make_executor(1)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    nodes = ex._enclave.nodes  # (the removed database, open)
    shutil.rmtree(enclave_dir)
    beats: set[float] = set()

    def two_upkeeps() -> bool:  # (the look at the enclave follows each heartbeat)
        beats.update(n.heartbeat for n in nodes.all())
        return len(beats) >= 3
    wait_for(two_upkeeps, what="two upkeeps of the executor's node after the removal")
    assert ex.submit(tasks.square, 4).result(GUARD) == 16
    assert not enclave_dir.exists()


def test_workers_are_reused_and_replaced_after_a_crash(start_node, make_executor):
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    first = ex.submit(tasks.worker_pid).result(GUARD)
    assert ex.submit(tasks.worker_pid).result(GUARD) == first
    assert ex.submit(tasks.worker_pid).result(GUARD) == first
    assert node.worker_pids() == [first]

    with pytest.raises(WorkerDied):
        ex.submit(tasks.exit_hard, 7).result(GUARD)
    replacement = ex.submit(tasks.worker_pid).result(GUARD)
    assert replacement != first
    assert ex.submit(tasks.worker_pid).result(GUARD) == replacement
    assert node.worker_pids() == [replacement]
    assert ex.submit(tasks.square, 8).result(GUARD) == 64


def test_workers_are_never_shared_between_owners(start_node, make_executor, user_token):
    start_node(workers=1)
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    bob = make_executor(1, start_node=False, credentials=user_token("bob"))
    a1 = alice.submit(tasks.worker_pid).result(GUARD)
    b1 = bob.submit(tasks.worker_pid).result(GUARD)
    a2 = alice.submit(tasks.worker_pid).result(GUARD)
    assert a1 != b1
    assert a2 != b1
    assert alice.submit(tasks.environment, "KOTTA_OWNER").result(GUARD) == "alice"
    assert bob.submit(tasks.environment, "KOTTA_OWNER").result(GUARD) == "bob"


def test_the_node_never_unpickles(start_node, make_executor, tmp_path):
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    arg_marker = tmp_path / "argument-unpickled-by"
    worker = ex.submit(tasks.noop, tasks.MarkerOnLoad(arg_marker)).result(GUARD)
    assert _pids(arg_marker) == [worker]  # unpickled once, by the worker
    assert worker != node.pid
    assert worker in node.worker_pids()

    result_marker = tmp_path / "result-unpickled-by"
    assert ex.submit(tasks.return_marker_on_load, str(result_marker)).result(GUARD) == os.getpid()
    assert _pids(result_marker) == [os.getpid()]  # unpickled once, by the client


def test_worker_environment_has_no_node_credentials(start_node, make_executor, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-workers")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTFORWORKERS")
    monkeypatch.setenv("KOTTA_NODE_TOKEN", "not-for-workers")
    monkeypatch.setenv("KOTTA_TEST_PASSED_THROUGH", "yes")
    node = start_node(workers=1)
    assert psutil.Process(node.pid).environ()["AWS_SECRET_ACCESS_KEY"] == "not-for-workers"
    ex = make_executor(1, start_node=False)
    env = ex.submit(tasks.worker_environ).result(GUARD)
    assert [k for k in env if k.startswith(("AWS_", "KOTTA_NODE_"))] == []
    assert env["KOTTA_TEST_PASSED_THROUGH"] == "yes"
    [worker] = node.worker_pids()
    initial = psutil.Process(worker).environ()  # the environment the worker started with
    assert [k for k in initial if k.startswith("AWS_")] == []


# ---------------------------------------------------------------------- burst mode


def test_burst_node_exits_when_the_queue_is_empty(start_node, make_executor, enclave):
    ex = make_executor(1, start_node=False)
    fs = [ex.submit(tasks.square, i) for i in range(5)]
    wait_for(lambda: enclave.queue.depth("test") == 5, what="the tasks to be queued")
    node = start_node("--burst", workers=1, wait=False)
    assert node.proc.wait(GUARD) == 0
    assert [f.result(GUARD) for f in fs] == [0, 1, 4, 9, 16]
    assert enclave.queue.depth("test") == 0

    idle = start_node("--burst", workers=1, wait=False)  # nothing to do: exits at once
    assert idle.proc.wait(GUARD) == 0
    assert enclave.nodes.live() == []


def test_max_jobs_runs_that_many_and_leaves_the_rest_queued(start_node, make_executor,
                                                            enclave):
    """``--max-jobs N`` with more than N tasks queued: the node receives and runs N (not a
    whole batch, pipelined to its workers before it counts), and exits; the rest stay
    pending in the queue, never received, for the next node."""
    ex = make_executor(1, start_node=False)
    fs = [ex.submit(tasks.square, i) for i in range(8)]
    wait_for(lambda: enclave.queue.depth("test") == 8, what="the tasks to be queued")
    node = start_node("--max-jobs", "3", workers=2, wait=False)
    assert node.proc.wait(GUARD) == 0, node.output()
    jobs = [enclave.jobs.get(f.job_id) for f in fs]
    assert sorted(j.state for j in jobs) == ["completed"] * 3 + ["pending"] * 5
    assert all(j.attempts == 0 and j.node is None for j in jobs if j.state == "pending")
    assert enclave.queue.depth("test") == 5
    assert "stopped after 3 jobs" in node.output()

    start_node(workers=1)  # the rest run on the next node
    assert [f.result(GUARD) for f in fs] == [i * i for i in range(8)]


def test_two_copies_of_a_pending_jobs_task_run_it_once(start_node, make_executor, enclave,
                                                      tmp_path):
    """A create retried after its task was queued (the record is kept, the task queued
    again) leaves two messages for one pending job; one node receiving both in one batch
    claimed the job once and ran both copies."""
    ex = make_executor(1, start_node=False)
    out = tmp_path / "runs.txt"
    job = ex._new_job("ab" * 16, tasks.append_line, [((str(out), "ran"), {})], ex._options)
    enclave.jobs.create([job])
    enclave.jobs.create([job])  # the retry
    assert enclave.queue.depth("test") == 2
    start_node(workers=2)
    wait_for(lambda: enclave.jobs.get(job.job_id).state.final, what="the job to end")
    # both messages gone: the copy that did not run was acked, a copy that ran is acked
    # only after its run
    wait_for(lambda: enclave.queue.depth("test") == 0, what="both messages acked")
    r = enclave.jobs.get(job.job_id, with_result=True)
    assert (r.state, r.attempts) == (JobState.COMPLETED, 1)
    assert out.read_text().splitlines() == ["ran"]


def test_a_bad_message_naming_a_running_job_does_not_fail_it(start_node, make_executor, enclave,
                                                            tmp_path):
    """A first delivery that fails the checks (corrupt here; a copy refused for a token
    revoked since, or a forgery) is dead-lettered; it fails its job only while no node
    has started it.  It used to fail a job another node was running."""
    from kotta_executor.backends.base import Message

    ex = make_executor(1, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    job = ex._new_job("cd" * 16, tasks.touch_then_wait, [((str(started), str(release)), {})],
                      ex._options)
    enclave.jobs.create([job])
    start_node("--prefetch", "1", workers=1)  # (it takes the copy while busy)
    wait_for(started.exists, what="the node to start the job")
    enclave.queue.send("test", [Message(job.job_id, b"not a task at all")])
    wait_for(lambda: enclave.queue.dead_letters("test"), what="the bad message dead-lettered")
    [dead] = enclave.queue.dead_letters("test")
    assert dead["job_id"] == job.job_id and "corrupt task message" in dead["reason"]
    assert enclave.jobs.get(job.job_id).state == JobState.PROCESSING
    release.write_text("")
    wait_for(lambda: enclave.jobs.get(job.job_id).state.final, what="the job to end")
    assert enclave.jobs.get(job.job_id).state == JobState.COMPLETED


class _WaitingJob:
    """A job that appends a line to ``out`` each time it runs, then waits for ``stop``."""

    def __init__(self, ex, tmp_path, job_id: str, name: str = "ran"):
        self.out, self.stop = tmp_path / f"runs-{name}.txt", tmp_path / f"stop-{name}"
        self.job = ex._new_job(job_id, tasks.append_line_then_wait,
                               [((str(self.out), name, str(self.stop)), {})], ex._options)
        self.job_id, self.name = self.job.job_id, name

    def ran(self) -> bool:
        return self.out.exists()


@contextmanager
def _stepped_node(enclave, workers: int, *jobs: _WaitingJob, prefetch: int = 0):
    """A node in this process, stepped by the test, with ``jobs`` recorded and queued.  On
    leaving: the jobs are let go and run to their end, their messages are acked, and
    each has run once, and is completed."""
    from node.daemon import Node, NodeConfig

    enclave.jobs.create([j.job for j in jobs])
    node = Node(enclave, NodeConfig(queue="test", workers=workers, poll_interval=0.05,
                                       prefetch=prefetch))
    node._start()
    try:
        yield node
        for j in jobs:
            j.stop.touch()
        wait_for(lambda: (node.step(), enclave.queue.depth("test") == 0)[1],
                 what="the jobs to end and their messages to be acked")
    finally:
        for j in jobs:
            j.stop.touch()
        node._stop()
    for j in jobs:
        r = enclave.jobs.get(j.job_id)
        assert (r.state, r.attempts) == (JobState.COMPLETED, 1)
        assert j.out.read_text().splitlines() == [j.name]


def _held(node) -> list:
    return [t for w in node.workers for t in w.inflight]


def test_a_worker_of_long_tasks_gets_none_in_reserve(make_executor, enclave, tmp_path,
                                                    monkeypatch):
    """With a backlog, a worker of short tasks gets one more in its pipe, in reserve; one of
    long tasks (pool.SHORT_TASK) got one too, which waited behind its task for up to three
    times those tasks' usual length while another worker could have run it.  Now it gets
    only the task it runs: the rest stay in the node, pending and cancellable."""
    from node import pool

    monkeypatch.setattr(pool, "TINY_TASK", 0.0)  # every worker's tasks long, once measured
    monkeypatch.setattr(pool, "SHORT_TASK", 0.0)
    ex = make_executor(1, start_node=False)
    warm = [_WaitingJob(ex, tmp_path, f"{i:02x}" * 16, f"warm{i}") for i in range(2)]
    for j in warm:
        j.stop.touch()  # (they end at once: two workers, ready and measured)
    backlog = [_WaitingJob(ex, tmp_path, f"{0x10 + i:02x}" * 16, f"job{i}") for i in range(10)]
    with _stepped_node(enclave, 2, *warm, prefetch=3) as node:
        wait_for(lambda: (node.step(), all(
            enclave.jobs.get(j.job_id).state == JobState.COMPLETED for j in warm))[1],
                 what="two workers to run a task each")
        assert len(node.workers) == 2 and all(w.ran for w in node.workers)
        enclave.jobs.create([j.job for j in backlog])
        wait_for(lambda: (node.step(), sum(j.ran() for j in backlog) == 2)[1],
                 what="a task of the backlog to begin on each worker")
        assert node._backlogged  # (the case at hand: tasks piped deep if at all)
        assert [len(w.inflight) for w in node.workers] == [1, 1]
        assert len(node.pending) >= 2  # held in the node, for whichever worker is free first
        for j in backlog:
            j.stop.touch()


def test_a_message_the_node_still_holds_received_again_is_the_same_task(make_executor, enclave,
                                                                        tmp_path):
    """A node stalled past its visibility timeout (or SQS delivering a message twice)
    receives a message it still holds: the task it holds takes the new receipt, and the
    job does not run a second time; its message is acked with the receipt that is live."""
    j = _WaitingJob(make_executor(1, start_node=False), tmp_path, "ef" * 16)
    with _stepped_node(enclave, 2, j) as node:
        wait_for(lambda: (node.step(), j.ran())[1], what="the job to start")
        [held] = _held(node)
        # the message's visibility runs out while the node holds it (as after a stall)
        enclave.queue.release([held.delivery])
        wait_for(lambda: (node.step(), held.delivery.receive_count == 2)[1],
                 what="the message to come again")
        assert [t.job_id for t in _held(node)] == [j.job_id] and not node.pending


def _duplicate_counted_first(enclave, delivery) -> None:
    """Make the message of ``delivery`` come again as SQS's rare duplicate does: visible
    to the next receive, which counts it a first delivery (receive count 1)."""
    enclave.queue.release([delivery])
    with sqlite3.connect(enclave.home / "kotta.db", isolation_level=None) as db:
        db.execute("UPDATE messages SET receive_count=0 WHERE id=?", (int(delivery.message_id),))


def test_a_duplicate_counted_as_a_first_delivery_does_not_ack_the_running_task(
        make_executor, enclave, tmp_path):
    """SQS may deliver a message twice and count both first deliveries, the second
    arriving while the node runs the first, with another worker free for it.  The copy
    lost the claim and was dropped, and its ack deleted the message the running task
    still needed: had the node died then, nothing would have delivered the job again.
    Now the running task takes the new receipt; the message stays until the job ends,
    and the job runs once."""
    j = _WaitingJob(make_executor(1, start_node=False), tmp_path, "ab" * 16)
    with _stepped_node(enclave, 2, j) as node:
        wait_for(lambda: (node.step(), j.ran())[1], what="the job to start")
        [held] = _held(node)
        old = held.delivery
        _duplicate_counted_first(enclave, old)
        wait_for(lambda: (node.step(), held.delivery is not old
                          or enclave.queue.depth("test") == 0)[1],
                 what="the copy to lose its claim")
        assert enclave.queue.depth("test") == 1, "the running task's message was acked"
        assert (held.delivery.message_id, held.delivery.receive_count) == (old.message_id, 1)
        assert [t.job_id for t in _held(node)] == [j.job_id] and not node.pending


def test_a_copy_that_loses_its_claim_never_gives_the_held_task_an_older_receipt(
        make_executor, enclave, tmp_path):
    """A runs; B, an SQS duplicate of its message counted as a first delivery, waits for
    a worker; the message comes a third time (counted 2) and A takes that receipt.  When
    B is dispatched and loses its claim, A keeps the newest receipt: B's older one, which
    it used to take, no longer acks the message (nor extends it)."""
    ex = make_executor(1, start_node=False)
    blocker, j = _WaitingJob(ex, tmp_path, "12" * 16, "b"), _WaitingJob(ex, tmp_path, "ab" * 16)
    with _stepped_node(enclave, 2, blocker, j, prefetch=1) as node:  # (it holds the copy)
        wait_for(lambda: (node.step(), j.ran() and blocker.ran())[1], what="both to start")
        [a] = [t for t in _held(node) if t.job_id == j.job_id]
        _duplicate_counted_first(enclave, a.delivery)
        wait_for(lambda: (node.step(), node.pending)[1], what="the copy to wait for a worker")
        [b] = node.pending
        enclave.queue.release([b.delivery])  # it comes again, counted 2
        wait_for(lambda: (node.step(), a.delivery.receive_count == 2)[1],
                 what="the running task to take the newest delivery")
        newest = a.delivery
        blocker.stop.touch()  # a worker frees: B is dispatched, and loses its claim
        wait_for(lambda: (node.step(), not node.pending)[1], what="the copy to lose its claim")
        assert a.delivery is newest, "the running task took an older receipt"
        assert enclave.queue.depth("test") == 1


def test_a_stopping_node_keeps_a_delivery_of_a_message_it_runs(make_executor, enclave, tmp_path):
    """A stopping node hands back the deliveries waiting in its inbox (the AWS poller's).
    One of them may be another delivery of a message the node is running: handed back, it
    showed the message to other nodes while the task ran on (its ack, with the old receipt,
    then deleted nothing), so the job would run again.  The running task takes it."""
    j = _WaitingJob(make_executor(1, start_node=False), tmp_path, "cd" * 16)
    with _stepped_node(enclave, 1, j) as node:
        wait_for(lambda: (node.step(), j.ran())[1], what="the job to start")
        [held] = _held(node)
        # visible again, counted as a first delivery (SQS's rare duplicate)
        _duplicate_counted_first(enclave, held.delivery)
        [again] = enclave.queue.receive("test", 10, 30.0, node.node_id)
        assert again.receive_count == 1
        node._inbox.append(again)  # where the AWS poller puts what it receives
        j.stop.touch()
        node._drain()
        assert enclave.queue.depth("test") == 0, "the message was handed back, not acked"
        assert held.delivery is again


def _x_runs_a_job_y_refuses(enclave, make_executor, tmp_path, why: str, tag: str):
    """Two nodes in this process, stepped by the test: X has started a job (it appends
    "ran" to ``out``, then waits for ``stop``); Y, not started yet, refuses its task: the
    walltime is over Y's cap, or its requirements failed on Y.  (Requirements: a local
    wheel, ``offline_pip``; X builds its env in a directory of its own, and Y's env
    directory cannot be made, a file being in its place.)"""
    from node import envs
    from node.daemon import Node, NodeConfig
    from tests.test_requirements import BUILD_GUARD, PROBE

    ex = make_executor(1, start_node=False)
    opts = ex.with_options(requirements=PROBE)._options if why == "requirements" else ex._options
    out, stop = tmp_path / "runs.txt", tmp_path / "stop"
    job = ex._new_job(tag * 16, tasks.append_line_then_wait, [((str(out), "ran", str(stop)), {})],
                      opts)
    enclave.jobs.create([job])
    x = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    y = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                 max_walltime=60 if why == "walltime" else None))
    if why == "requirements":  # built on X, failed on Y
        x.envs = envs.EnvCache(tmp_path / "x-envs", x.request_wake)
        (tmp_path / "y-envs").write_text("not a directory")
        y.envs = envs.EnvCache(tmp_path / "y-envs", y.request_wake)
    x._start()
    try:
        wait_for(lambda: (x.step(), out.exists())[1], timeout=BUILD_GUARD,
                 what="the job to start on X")
    except BaseException:
        stop.touch()
        x._stop()
        raise
    return job, out, stop, x, y


@pytest.mark.parametrize("why", ["walltime", "requirements"])
def test_a_copy_another_node_refuses_does_not_fail_the_job_running_here(
        make_executor, enclave, tmp_path, why, offline_pip):
    """Node X runs a job; a copy of its task (a retried create queues it again) reaches
    node Y, which refuses it: the walltime is over Y's own cap, or its requirements
    failed to install on Y.  Y failed the job without claiming it, under X, which was
    running it (X's result was thrown away).  Now Y fails a job only once it has
    claimed it; the copy, which cannot claim a running job, is dropped."""
    job, out, stop, x, y = _x_runs_a_job_y_refuses(enclave, make_executor, tmp_path, why, "a1")
    try:
        enclave.jobs.create([job])  # a retried create: its task queued again
        y._start()
        try:
            wait_for(lambda: (y.step(), enclave.queue.depth("test") == 1)[1],
                     what="Y to take the copy and drop it")
        finally:
            y._stop()
        r = enclave.jobs.get(job.job_id)
        assert r.state == JobState.PROCESSING, r.reason
        stop.touch()
        wait_for(lambda: (x.step(), enclave.queue.depth("test") == 0)[1],
                 what="the job to end on X")
    finally:
        stop.touch()
        x._stop()
    r = enclave.jobs.get(job.job_id)
    assert (r.state, r.node) == (JobState.COMPLETED, x.node_id)


@pytest.mark.parametrize("why", ["walltime", "requirements"])
def test_a_redelivery_another_node_refuses_does_not_fail_the_job_a_live_node_runs(
        make_executor, enclave, tmp_path, why, offline_pip):
    """Node X runs a job and stalls past its visibility timeout: its message is
    delivered again (counted 2) to node Y, which refuses it (the walltime is over Y's
    cap, or its requirements failed on Y).  A redelivery may claim a started job, so Y
    claimed it and failed it, while X, alive, ran it on; X's result was then thrown
    away.  Now Y watches it, as for a redelivery of a job a live node runs on AWS: the
    job ends on X with X's result, and Y acks the message once it has."""
    job, out, stop, x, y = _x_runs_a_job_y_refuses(enclave, make_executor, tmp_path, why, "a2")
    try:
        [held] = _held(x)
        enclave.queue.release([held.delivery])  # X stalled: its visibility ran out
        y._start()
        try:
            wait_for(lambda: (y.step(), _holder(enclave, job.job_id) == y.node_id)[1],
                     what="Y to receive the redelivery")
            wait_for(lambda: (y.step(), not (y.pending or y.finished))[1],
                     what="Y to settle the redelivery")
            r = enclave.jobs.get(job.job_id)
            assert (r.state, r.node) == (JobState.PROCESSING, x.node_id), r.reason
            stop.touch()
            wait_for(lambda: (x.step(), enclave.jobs.get(job.job_id).state.final)[1],
                     what="the job to end on X")
            y._drain()  # (it looks at what it watches: the job has ended, it acks)
        finally:
            y._stop()
        assert enclave.queue.depth("test") == 0
    finally:
        stop.touch()
        x._stop()
    r = enclave.jobs.get(job.job_id, with_result=True)
    assert (r.state, r.node) == (JobState.COMPLETED, x.node_id), r.reason
    assert wire.outcomes(wire.decode(r.result)) == [(True, "ran")]
    assert out.read_text().splitlines() == ["ran"]


def test_a_task_over_the_nodes_walltime_cap_fails_while_its_workers_are_busy(
        make_executor, enclave, tmp_path):
    """A task over the node's cap waits in its queue to be claimed, then fails; it must
    not wait behind a task that finds no free worker (for as long as the worker is
    busy: hours, behind a long task)."""
    from dataclasses import replace

    ex = make_executor(1, start_node=False)
    j = _WaitingJob(ex, tmp_path, "a1" * 16)
    with _stepped_node(enclave, 1, j, prefetch=3) as node:  # (it holds both)
        node.max_walltime = 600.0
        wait_for(lambda: (node.step(), j.ran())[1], what="the long job to start")
        waits = ex._new_job("b2" * 16, tasks.square, [((2,), {})], ex._options)
        over = ex._new_job("c3" * 16, tasks.square, [((3,), {})],
                           replace(ex._options, walltime=1200.0))
        enclave.jobs.create([waits, over])
        wait_for(lambda: (node.step(), enclave.jobs.get(over.job_id).state.final)[1],
                 what="the task over the cap to fail")
        r = enclave.jobs.get(over.job_id)
        assert r.state == JobState.FAILED and "over the cap" in r.reason, r.reason
        assert enclave.jobs.get(waits.job_id).state == JobState.PENDING  # (behind j)
    assert enclave.jobs.get(waits.job_id).state == JobState.COMPLETED


def test_deliveries_waiting_in_the_pollers_inbox_are_kept_hidden(make_executor, enclave):
    """The AWS poller may fetch more than the node then has room for: what waits in its
    inbox is held, as what waits for a worker is, and its visibility is extended.  It was
    not: another node would take it meanwhile, and this one, taking it late, would ack
    that node's message with a stale receipt."""
    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    enclave.jobs.create([ex._new_job("ab" * 16, tasks.add, [((1, 2), {})], ex._options)])
    node = Node(enclave, NodeConfig(queue="test", workers=1, visibility_timeout=600.0))
    [d] = enclave.queue.receive("test", 10, 1.0, node.node_id)  # hidden for a second
    node._inbox.append(d)  # where the poller puts what it receives
    node._last_upkeep = float("-inf")  # its upkeep is due
    node._upkeep()
    with sqlite3.connect(enclave.home / "kotta.db") as db:
        [(visible_at,)] = db.execute("SELECT visible_at FROM messages").fetchall()
    assert visible_at > time.time() + 500  # extended to the node's visibility timeout


def test_two_deliveries_of_one_message_in_a_batch_are_one_task(make_executor, enclave):
    """A batch may hold two deliveries of one message (the AWS poller's inbox keeps a
    delivery unextended; SQS may deliver twice): the later stands for it, and the earlier
    is neither taken (both ran, or the copy dropped acked the live receipt) nor acked."""
    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    job = ex._new_job("ab" * 16, tasks.add, [((1, 2), {})], ex._options)
    other = ex._new_job("cd" * 16, tasks.add, [((3, 4), {})], ex._options)
    enclave.jobs.create([job, other])
    node = Node(enclave, NodeConfig(queue="test", workers=1))
    first, d_other = enclave.queue.receive("test", 10, 30.0, node.node_id)
    enclave.queue.release([first])
    [second] = enclave.queue.receive("test", 10, 30.0, node.node_id)
    assert (second.message_id, second.receive_count) == (first.message_id, 2)
    assert node._ours_again([first, d_other, second]) == [d_other, second]


def test_of_two_deliveries_of_a_message_counted_alike_the_later_stands(enclave):
    """SQS's receive count is approximate: two deliveries of one message in a batch may
    show the same count.  The later in the batch (the poller's newest) is the live one."""
    from kotta_executor.backends.base import Delivery
    from node.daemon import Node, NodeConfig

    node = Node(enclave, NodeConfig(queue="test", workers=1))
    old = Delivery("j1", b"task", "receipt-old", 2, None, "m1")
    new = Delivery("j1", b"task", "receipt-new", 2, None, "m1")
    assert node._ours_again([old, new]) == [new]


def test_a_task_a_stopping_node_hands_back_unstarted_is_not_counted_a_delivery(
        start_node, make_executor, enclave, tmp_path):
    """`kotta down` while a node holds tasks it has not started: they go back to the queue
    and run on the next node.  Handed back unstarted, a task was not delivered in vain:
    with `--max-deliveries 1` (a task that takes its node down runs once, never again) the
    next node ran it, instead of dead-lettering it and failing its job with
    DeliveryFailed ("delivered 1 times without completing") although it had never run."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node("--max-deliveries", "1", "--prefetch", "1", workers=1)
    ex = make_executor(1, start_node=False)
    running = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        wait_for(lambda: _pids(log), what="the task to start on node A")
        queued = ex.submit(tasks.square, 7)
        wait_for(lambda: _holder(enclave, queued.job_id) == a.node_id,
                 what="node A to take the queued task")
        assert enclave.jobs.get(queued.job_id).state == "pending"
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _holder(enclave, queued.job_id) is None,
                 what="node A to hand back the queued task")
    finally:
        tasks.release(release, "go")
    assert running.result(GUARD) == _pids(log)[0]  # (finished as A drained)
    assert a.proc.wait(GUARD) == 0
    start_node("--max-deliveries", "1", workers=1)
    assert queued.result(GUARD) == 49
    assert enclave.queue.dead_letters("test") == []


def test_a_task_handed_back_at_the_drain_timeout_never_runs_on_two_nodes_at_once(
        start_node, make_executor, enclave, tmp_path):
    """A task still running when its node's drain times out is handed back, and runs
    again on another node.  Its first run is ended before the message is visible again:
    the two never run side by side (they did, for the 2 s the stopping node gave its busy
    workers before killing them)."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node("--drain-timeout", "0", workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        [first] = wait_for(lambda: _pids(log), what="the task to start on node A")
        start_node(workers=1)
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: len(_pids(log)) == 2, what="the task to start again on node B")
        assert gone(first), "the task's first run still runs beside its second"
    finally:
        tasks.release(release, "go")
    assert f.result(GUARD) == _pids(log)[1]
    assert a.proc.wait(GUARD) == 0


_KILLED_WRITING_A_BLOB = r"""
import resource, signal, sys
from kotta_executor import KottaExecutor
ex = KottaExecutor(1, enclave=sys.argv[1], start_node=False)
# files of this process may grow to 1 MiB: writing the 2 MiB blob of the task's argument,
# it is killed (SIGXFSZ) in the middle, as a kernel restarted then would be
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
ex.submit(len, b"y" * (2 << 20))
"""


def test_a_blob_left_half_written_by_a_killed_client_is_deleted_once_old(start_node, enclave):
    """A client killed while it writes a task's big section to a blob leaves the blob's
    temporary file, a part of the pickled arguments: no key names it, and nodes' sweep
    of stray task blobs deletes it too once it is over STRAY_BLOB_AGE old."""
    import subprocess
    import sys

    from node.daemon import STRAY_BLOB_AGE
    from tests.conftest import ROOT, subprocess_env

    client = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITING_A_BLOB, str(enclave.home)], env=subprocess_env(),
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GUARD,
    )
    assert client.returncode == -signal.SIGXFSZ, client.stderr
    blobs = enclave.home / "blobs"
    (partial,) = [p for p in blobs.rglob(".args-*.tmp")]
    then = time.time() - STRAY_BLOB_AGE - 60
    os.utime(partial, (then, then))
    young = partial.with_name(".args-" + "0" * 32 + ".12345678.tmp")  # being written now
    young.write_bytes(b"pickled")
    start_node(visibility_timeout=3.0)  # (its upkeep, and first look, a second after start)
    wait_for(lambda: not partial.exists(), what="the node to delete the half-written blob")
    assert young.exists()


def _node_with_a_ready_worker(enclave, make_executor, monkeypatch, **config):
    """An in-process node of one worker, stepped by the test, and an executor of its queue
    with no node of its own: ``(node, executor, worker)``, the worker ready and with a tiny
    average, so that the node pipes tasks to it deep.  The test stops the node
    (``stopping``, ``_drain()``, ``_stop()``)."""
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05, **config))
    node._start()
    try:
        ex = make_executor(1, start_node=False)
        first = ex.submit(tasks.worker_pid)
        while not first.done():
            node.step()
        [w] = node.workers
    except BaseException:
        node.stopping = True
        node._stop()
        raise
    return node, ex, w


def test_tasks_back_from_a_retired_worker_are_pending_and_uncounted_when_the_node_stops(
        make_executor, enclave, monkeypatch):
    """Tasks piped to a worker that then stopped as asked (retired: max_tasks_per_child, or
    a task with restricted data) wait in the node, claimed; stopped then, the node hands
    them back as tasks never begun: pending, their receive not counted.  In-process node,
    stepped by the test."""
    node, ex, w = _node_with_a_ready_worker(enclave, make_executor, monkeypatch)
    try:
        _stop_process(w.pid)  # it cannot begin them
        jobs = [ex._new_job(os.urandom(16).hex(), tasks.square, [((i,), {})], ex._options)
                for i in range(8)]
        enclave.jobs.create(jobs)  # in one transaction: a backlog
        ids = [j.job_id for j in jobs]
        wait_for(lambda: node.step() or len(w.inflight) >= 2, what="tasks piped to the worker")
        w.retire()  # it stops before the next task it would begin
        os.kill(w.pid, signal.SIGCONT)
        wait_for(lambda: node._collect() or w not in node.workers, what="the worker to stop")
        back = [t.job_id for t in node.pending if t.claimed]
        assert back
        assert {enclave.jobs.get(j).state for j in back} == {JobState.PROCESSING}
    finally:
        node.stopping = True
        node._drain()
        node._stop()
    records = enclave.jobs.get_many(back)
    assert {(r.state, r.node, r.started) for r in records.values()} == {("pending", None, None)}
    counts = enclave._db.read(
        f"SELECT receive_count FROM messages WHERE job_id IN ({','.join('?' * len(back))})", back)
    assert [c for (c,) in counts] == [0] * len(back)  # (this node's receive taken back)
    assert set(back) <= set(ids)


# ---------------------------------------------------------------------- NodeConfig's values

_BAD_NODE_CONFIG = [
    ("workers", 0, ValueError), ("workers", -2, ValueError), ("workers", 2.0, TypeError),
    ("workers", True, TypeError), ("workers", "4", TypeError),
    ("visibility_timeout", 0, ValueError), ("visibility_timeout", -1.0, ValueError),
    ("visibility_timeout", float("nan"), ValueError),
    ("visibility_timeout", float("inf"), ValueError), ("visibility_timeout", "30", TypeError),
    ("max_deliveries", 0, ValueError), ("max_deliveries", 1.5, TypeError),
    ("poll_interval", -0.5, ValueError), ("poll_interval", float("nan"), ValueError),
    ("poll_interval", float("inf"), ValueError), ("poll_interval", None, TypeError),
    ("drain_timeout", -1, ValueError), ("drain_timeout", float("nan"), ValueError),
    ("drain_timeout", float("inf"), ValueError),
    ("burst", "no", TypeError),
    ("max_jobs", 0, ValueError), ("max_jobs", -1, ValueError), ("max_jobs", 2.5, TypeError),
    ("long_poll", 0, ValueError), ("long_poll", -1, ValueError),
    ("long_poll", float("nan"), ValueError), ("long_poll", float("inf"), ValueError),
    ("sample_interval", -1, ValueError), ("sample_interval", 0.5, ValueError),
    ("sample_interval", float("nan"), ValueError), ("sample_interval", float("inf"), ValueError),
    ("memory_limit", 0, ValueError), ("memory_limit", -100, ValueError),
    ("memory_limit", 1.5, TypeError), ("memory_limit", True, TypeError),
    ("max_walltime", 0, ValueError), ("max_walltime", -60, ValueError),
    ("max_walltime", float("nan"), ValueError), ("max_walltime", float("inf"), ValueError),
    ("stage_cache_mb", -1, ValueError), ("stage_cache_mb", 1.5, TypeError),
    ("prefetch", -1, ValueError), ("prefetch", 0.5, TypeError),
]


@pytest.mark.parametrize("name, value, error", _BAD_NODE_CONFIG,
                         ids=[f"{n}={v!r}" for n, v, _ in _BAD_NODE_CONFIG])
def test_a_node_config_with_a_value_out_of_its_range_is_refused_naming_it(name, value, error):
    """A NodeConfig made in Python took any value: memory_limit=0 (or max_walltime=0) was
    taken as "the queue's limit", a negative one killed every task, max_jobs=0 made a node
    that exited at once, a NaN poll_interval failed the node's first wait ("Invalid value
    NaN", naming nothing).  As `kotta node` checks its options, it is refused, naming the
    field and value."""
    from node.daemon import NodeConfig

    with pytest.raises(error) as info:
        NodeConfig(queue="test", **{name: value})
    assert f"NodeConfig.{name}" in str(info.value) and repr(value) in str(info.value)


def test_a_node_config_at_its_bounds_is_taken():
    from node.daemon import NodeConfig

    cfg = NodeConfig(queue="test", workers=1, visibility_timeout=0.5, max_deliveries=1,
                     poll_interval=0.05, drain_timeout=0, burst=True, max_jobs=1,
                     long_poll=0.1, sample_interval=0, memory_limit=1, max_walltime=0.5,
                     stage_cache_mb=0, prefetch=0)
    assert (cfg.workers, cfg.memory_limit, cfg.max_walltime, cfg.sample_interval) == (1, 1, 0.5, 0)
    NodeConfig(queue="test", sample_interval=1, max_jobs=None, memory_limit=None,
               max_walltime=None, drain_timeout=1e6, visibility_timeout=43200)


def test_a_node_config_names_its_queue_as_clients_do(make_executor, enclave):
    """NodeConfig(queue="prod") (or "Production"), as a client may name it, made a node of
    a queue "prod" that no client submits to (a client's "prod" is "production"): it
    served nothing, and a burst node ended at once with the task still queued."""
    from node.daemon import Node, NodeConfig

    assert NodeConfig(queue=" Production ").queue == "production"
    with pytest.raises(ValueError, match="unknown queue 'staging'"):
        NodeConfig(queue="staging")
    ex = make_executor(1, start_node=False, queue="prod")
    f = ex.submit(tasks.square, 4)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    node = Node(enclave, NodeConfig(queue="prod", workers=1, burst=True))
    node.run()
    assert node.queue == "production"
    assert f.result(GUARD) == 16


@pytest.mark.parametrize("asked", [0, 0.0, 0.001])
def test_a_poll_interval_under_the_minimum_is_taken_as_the_minimum(asked):
    """`--poll-interval 0` (documented as "0 or more") had an idle node look at its queue
    without pause: it kept a core busy (97% of one here) for nothing, as a doorbell rings
    for each task anyway.  Now an interval under MIN_POLL_INTERVAL is taken as that."""
    from node.daemon import NodeConfig

    taken = NodeConfig(queue="test", poll_interval=asked).poll_interval
    assert taken > 0, "an idle node would poll without pause"
    from node.daemon import MIN_POLL_INTERVAL

    assert taken == MIN_POLL_INTERVAL and 0 < MIN_POLL_INTERVAL <= 0.05
    assert NodeConfig(queue="test", poll_interval=0.05).poll_interval == 0.05


def test_a_task_back_from_a_retired_worker_that_then_runs_is_not_handed_back_as_never_begun(
        make_executor, enclave, monkeypatch, tmp_path):
    """A task back from a worker that never began it (retired, stopped as asked) is marked
    ``unbegun``; it kept the mark once it ran on the next worker, so that the drain's
    hand-back of what a stopping node never began (``_unstage``) moved its running job
    back to pending and handed it back uncounted: it ran again elsewhere, though it had
    run here.  Once it begins it is no longer taken for never begun.  In-process node,
    stepped by the test."""
    log, release = tmp_path / "pids", tmp_path / "release"
    node, ex, w = _node_with_a_ready_worker(enclave, make_executor, monkeypatch)
    try:
        _stop_process(w.pid)  # it cannot begin them
        jobs = [ex._new_job(os.urandom(16).hex(), tasks.log_pid_and_wait,
                            [((str(log), str(release)), {})], ex._options) for _ in range(8)]
        enclave.jobs.create(jobs)  # in one transaction: a backlog
        wait_for(lambda: node.step() or len(w.inflight) >= 2, what="tasks piped to the worker")
        w.retire()  # it stops before the next task it would begin
        os.kill(w.pid, signal.SIGCONT)
        wait_for(lambda: node._collect() or w not in node.workers, what="the worker to stop")
        assert node.pending and all(t.unbegun for t in node.pending if t.claimed)
        assert not _pids(log)  # (none of them began)
        wait_for(lambda: node.step() or _pids(log), what="a task to begin on a new worker")
        [w2] = node.workers
        head = w2.inflight[0]
        wait_for(lambda: node.step() or head.started is not None, what="the node to see it run")
        assert enclave.jobs.get(head.job_id).state == JobState.PROCESSING
        assert not head.unbegun
        node.stopping = True
        assert node._unstage([head]) == set()  # it ran: not moved back to pending
        r = enclave.jobs.get(head.job_id)
        assert (r.state, r.node) == (JobState.PROCESSING, node.node_id)
    finally:
        tasks.release(release, "go")
        node.stopping = True
        node._drain()
        node._stop()


def test_tasks_piped_behind_one_still_running_at_the_drain_deadline_are_pending_and_uncounted(
        make_executor, enclave, monkeypatch, tmp_path):
    """A stopping node's worker still runs its task at the drain's deadline: the node ends
    it and hands its task back (it began: counted).  The tasks piped behind it never began
    (the worker was asked to stop after the one it ran), but they were released counted,
    their jobs left in processing: with `--max-deliveries 1` the next node dead-lettered
    them (DeliveryFailed), though they never ran.  Now, as the guide says of a task queued
    in a worker's pipe behind the running one, they are pending again, uncounted.
    In-process node, stepped by the test."""
    log, release = tmp_path / "pids", tmp_path / "release"
    node, ex, w = _node_with_a_ready_worker(enclave, make_executor, monkeypatch, drain_timeout=0.2)
    try:
        head = ex._new_job(os.urandom(16).hex(), tasks.log_pid_and_wait,
                           [((str(log), str(release)), {})], ex._options)
        behind = [ex._new_job(os.urandom(16).hex(), tasks.square, [((i,), {})], ex._options)
                  for i in range(7)]
        enclave.jobs.create([head, *behind])  # in one transaction: a backlog
        wait_for(lambda: node.step() or (_pids(log) and len(w.inflight) >= 2),
                 what="the head task to run, tasks piped behind it")
        piped = [t.job_id for t in list(w.inflight)[1:]]
        assert piped and head.job_id == w.inflight[0].job_id
    finally:
        node.stopping = True
        node._drain()  # the head runs past the deadline
        node._stop()
        tasks.release(release, "go")
    records = enclave.jobs.get_many(piped)
    assert {(r.state, r.node, r.started) for r in records.values()} == {("pending", None, None)}
    counts = enclave._db.read(
        f"SELECT receive_count FROM messages WHERE job_id IN ({','.join('?' * len(piped))})",
        piped)
    assert [c for (c,) in counts] == [0] * len(piped)  # (this node's receive taken back)
    r = enclave.jobs.get(head.job_id)  # it began: released, counted
    assert (r.state, r.node) == (JobState.PROCESSING, node.node_id)




@pytest.mark.parametrize("how", ["kill", "kotta cancel"])
def test_a_running_job_its_node_kills_at_once_is_killed_not_cancelled(
        make_executor, enclave, enclave_dir, how):
    """A kill of a running job asks for it (request_kill), then reads the job to tell a
    pending one, which request_kill cancels, from a running one, which it flags.  Read by
    its state alone, a job its node killed in between (cancelled too: the node's kill) was
    taken for one cancelled before it started: kill() settled its future as cancelled (no
    TaskKilled, the node's reply dropped), and `kotta cancel` printed "cancelled before it
    started" and sent its client a cancel.  (A trigger on the job table is the node here,
    killing the job as its kill is asked for.)"""
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 3)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job's record")
    assert enclave.jobs.transition([f.job_id], JobState.PROCESSING, node="n1")
    wait_for(lambda: f.status() == "processing" and f.running(), what="the job to be running")
    with sqlite3.connect(Path(enclave_dir) / "kotta.db") as db:
        db.execute(
            "CREATE TRIGGER the_node_kills AFTER UPDATE OF kill_requested ON jobs"
            " WHEN NEW.kill_requested=1 BEGIN UPDATE jobs SET state='cancelled',"
            " reason='TaskKilled: killed on request', finished=NEW.updated"
            " WHERE job_id=NEW.job_id; END")
    if how == "kill":
        assert f.kill() is True
        assert not f.cancelled()  # it waits for the node's reply: TaskKilled
    else:
        from tests.test_cli import kotta

        r = kotta(enclave_dir, "cancel", f.job_id)
        assert r.returncode == 0, r.stderr
        assert "is being killed" in r.stdout, r.stdout
