"""Hand-off on the embedded enclave: a lone task goes straight to a node's inbox, and the node
records its job; the client writes nothing to the database.  A task its node never records
(the node stopped or died with it unread) is recorded and queued by the client, and runs once;
a cancel that comes before the node records the task holds; a forged hand-off fails its job as
a forged queued task does, and a garbled one is dropped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from kotta_executor import wire
from kotta_executor.backends.base import NewJob, NodeInfo
from kotta_executor.backends.embedded import _PASSCRED, HAND_OFF_LIMIT
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.states import JobState

from . import tasks
from .conftest import GUARD, ROOT, subprocess_env, wait_for
from .test_node import _freeze

pytestmark = pytest.mark.skipif(not _PASSCRED, reason="inboxes need SO_PASSCRED (Linux)")


def client_writes(ex) -> int:
    """Rows the calling thread's connection has changed: where a lone submit that is not
    handed off records its job."""
    return ex.enclave._db.conn().total_changes


def states_of(enclave, job_id: str) -> list[str]:
    return [state for _, state, _ in enclave.jobs.history(job_id)]


def a_job(job_id: str | None = None, body: bytes = b"task") -> NewJob:
    return NewJob(job_id or os.urandom(16).hex(), "alice", "c" * 16, "test", "f", 60.0, body)


@pytest.fixture
def stopped(enclave_dir):
    """``stopped(node)``: SIGSTOP a node process (never inside a write transaction, which
    would stall every writer), continued again at the end of the test."""
    pids: list[int] = []

    def stop(node) -> None:
        _freeze(node, enclave_dir)
        pids.append(node.pid)

    yield stop
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


# -- the backend's part ----------------------------------------------------------------


def test_adopt_records_a_job_once_held_by_its_node(enclave):
    job = a_job()
    d = enclave.adopt(job, 30.0, "node-a")
    assert (d.job_id, d.body, d.receive_count) == (job.job_id, b"task", 1)
    rec = enclave.jobs.get(job.job_id)
    assert (rec.state, rec.owner, rec.client, rec.walltime) == (JobState.PENDING, "alice", "c" * 16, 60.0)
    assert enclave.queue.receive("test", 10, 30.0, "node-b") == []  # held by node-a
    assert enclave.adopt(job, 30.0, "node-a") is None  # a second hand-off: recorded once
    enclave.queue.ack([d])  # its receipt is a real one
    assert enclave.queue.depth("test") == 0


def test_adopt_never_gives_a_message_the_id_of_a_deleted_one(enclave):
    """The id was max(id) + 1: once the newest message was deleted, the next adopted one
    got its id, and a node still holding a delivery of the old message (stalled, its
    message run and acked by another node) took the new one's redelivery for its own."""
    from kotta_executor.backends.base import Message

    enclave.queue.send("test", [Message("j1", b"one")])
    [old] = enclave.queue.receive("test", 1, 30.0, "node-b")
    enclave.queue.ack([old])
    d = enclave.adopt(a_job(), 30.0, "node-a")
    assert d.message_id and d.message_id != old.message_id
    assert d.receipt.split(":")[0] == d.message_id
    enclave.queue.release([d])
    [again] = enclave.queue.receive("test", 1, 30.0, "node-a")
    assert (again.message_id, again.receive_count) == (d.message_id, 2)


def test_adopt_without_a_holder_queues_the_task_for_any_node(enclave):
    job = a_job()
    assert enclave.adopt(job, 30.0, None) is None
    [d] = enclave.queue.receive("test", 10, 30.0, "node-b")
    assert (d.job_id, d.receive_count) == (job.job_id, 1)
    assert enclave.jobs.get(job.job_id).state == JobState.PENDING


def test_adopt_takes_nothing_for_a_job_the_client_recorded(enclave):
    job = a_job()
    enclave.jobs.create([job])  # the client gave up on its node, and queued it
    assert enclave.adopt(job, 30.0, "node-a") is None
    assert enclave.queue.depth("test") == 1  # the client's message only


def test_hand_off_needs_a_node_with_an_inbox_and_a_small_task(enclave):
    assert enclave.hand_off("test", b"task") is False  # no node serves the queue
    me = NodeInfo("n" * 12, "test", socket.gethostname(), os.getpid(), 1,
                  psutil.Process().create_time())  # this process stands in for a node
    enclave.nodes.register(me)
    enclave._node_cache = (0.0, {})  # the registration is seen at once, not within a second
    assert enclave.hand_off("test", b"task") is False  # the node has no inbox
    inbox = enclave.task_inbox(me.node_id)
    try:
        assert enclave.hand_off("test", b"task") is True
        assert enclave.hand_off("test", b"x" * (HAND_OFF_LIMIT + 1)) is False  # the queue's
        assert enclave.hand_off("production", b"task") is False  # nobody serves it
        assert enclave.read_inbox(inbox) == [b"task"]
    finally:
        enclave.close_inbox(inbox)


# -- executor and node -----------------------------------------------------------------


def test_a_lone_task_goes_to_the_node_which_records_its_job(start_node, make_executor, enclave,
                                                           caplog):
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4  # the manager is listening now
    before = client_writes(ex)
    for i in range(5):
        f = ex.submit(tasks.square, i)
        assert f.result(GUARD) == i * i
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.node, job.attempts) == (JobState.COMPLETED, node.node_id, 1)
        assert states_of(enclave, f.job_id) == ["pending", "processing", "completed"]
    assert client_writes(ex) == before  # the node recorded the jobs, not the client
    assert "not taken by their node" not in caplog.text  # nor did the client's fallback
    assert "not taking handed-off job" not in node.output()


def test_a_task_its_node_never_took_is_queued_by_the_client_and_runs_once(
    start_node, make_executor, enclave, stopped, tmp_path
):
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    stopped(a)  # its inbox takes the task, and nobody reads it
    ran = tmp_path / "ran"
    before = client_writes(ex)
    f = ex.submit(tasks.append_line, str(ran), "ran")
    assert client_writes(ex) == before  # handed off
    b = start_node(workers=1)
    assert f.result(GUARD) == "ran"
    job = enclave.jobs.get(f.job_id)
    assert (job.state, job.node) == (JobState.COMPLETED, b.node_id)
    os.kill(a.pid, signal.SIGCONT)  # a reads the task now, finds its job recorded
    wait_for(lambda: f"handed-off job {f.job_id}: it is recorded already" in a.output(),
             what="the first node to see the task")
    assert ran.read_text().splitlines() == ["ran"]  # once
    assert states_of(enclave, f.job_id) == ["pending", "processing", "completed"]


def test_cancelling_a_task_its_node_has_not_recorded_holds(
    start_node, make_executor, enclave, stopped, tmp_path
):
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    stopped(a)
    ran = tmp_path / "ran"
    f = ex.submit(tasks.append_line, str(ran), "ran")
    assert f.cancel() is True
    assert f.cancelled() and f.status() == "cancelled"
    os.kill(a.pid, signal.SIGCONT)
    wait_for(lambda: f"handed-off job {f.job_id}: it is recorded already" in a.output(),
             what="the node to see the task")
    assert ex.submit(tasks.square, 4).result(GUARD) == 16  # it serves on
    assert not ran.exists()  # never ran
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED


def _big_task_handed_to_a_stopped_node(start_node, make_executor, enclave, stopped):
    """A node, stopped, and a lone task with a big argument handed off to it (its section
    in a blob, ``args-<job id>``): (the node, the executor, the task's future)."""
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    stopped(a)
    before = client_writes(ex)
    f = ex.submit(tasks.noop, b"x" * (enclave.inline_limit + 1))
    assert client_writes(ex) == before  # handed off
    return a, ex, f


@pytest.mark.parametrize("node", ["reads it later", "dies first"])
def test_a_big_task_cancelled_before_its_node_recorded_it_leaves_no_blob(
    start_node, make_executor, enclave, stopped, node
):
    """A lone task with a big argument is handed off with its section in a blob
    (``args-<job id>``).  Cancelled before its node read it, it is recorded cancelled by
    the client; the node, finding it recorded, did not take it, and its blob stayed for
    ever.  The client deletes it as it cancels: also when the node dies without reading
    its inbox (the nodes' sweep spares the blobs of a recorded job)."""
    a, ex, f = _big_task_handed_to_a_stopped_node(start_node, make_executor, enclave, stopped)
    assert f.cancel() is True
    assert [p for p in (enclave.home / "blobs").rglob("*") if p.is_file()] == []
    if node == "dies first":
        a.proc.kill()
        a.proc.wait(GUARD)
        start_node(workers=1)
    else:
        os.kill(a.pid, signal.SIGCONT)
        wait_for(lambda: f"handed-off job {f.job_id}: it is recorded already" in a.output(),
                 what="the node to see the task")
    assert ex.submit(tasks.square, 4).result(GUARD) == 16  # (a step after that one)
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
    assert [p for p in (enclave.home / "blobs").rglob("*") if p.is_file()] == []


def test_a_forged_hand_off_fails_its_job_and_a_garbled_one_is_dropped(
    start_node, make_executor, enclave
):
    a = start_node(workers=1)
    token = credentials.load(enclave).access()
    header = wire.task_header(
        job_id=os.urandom(16).hex(), owner=token.user, client="c" * 16, queue="test",
        walltime=60.0, created=time.time(), fn=wire.fn_name(tasks.square), n=1,
    )
    body = token.sign(header, wire.dump_call(tasks.square, [((5,), {})]))
    forged = body[:-40] + bytes([body[-40] ^ 1]) + body[-39:]  # in the args, not the mac
    address = enclave._inbox_path(f"node-{a.node_id}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"not a kotta envelope", address)
        s.sendto(forged, address)
    job_id = header["job_id"]
    wait_for(lambda: (j := enclave.jobs.get(job_id)) is not None and j.state.final,
             what="the forged task's job to fail")
    job = enclave.jobs.get(job_id)
    assert job.state == JobState.FAILED and "refused by the node" in job.reason
    assert "forged or altered" in job.reason
    assert [d["job_id"] for d in enclave.queue.dead_letters("test")] == [job_id]
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=job_id)
    assert rec["allowed"] is False
    assert "dropping a task handed to this node: not a kotta envelope" in a.output()
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 6).result(GUARD) == 36  # the node serves on


_CLIENT = """
import sys, time
from kotta_executor import KottaExecutor
from tests import tasks
ex = KottaExecutor(1, enclave=sys.argv[1], start_node=False)
first = ex.submit(tasks.square, 2)  # starts the manager thread; once it listens (and has
while not ex._listening or ex.enclave.jobs.get(first.job_id) is None:  # sent this one),
    time.sleep(0.001)  # a lone submit is handed to a node, if one takes it
f = ex.submit(tasks.append_line, sys.argv[2], "ran")
print(f.job_id, ex.enclave.jobs.get(f.job_id) is not None, flush=True)
sys.stdin.readline()  # killed here
"""


def held_by(enclave, job_id: str) -> str | None:
    rows = enclave._db.read("SELECT holder FROM messages WHERE job_id=?", (job_id,))
    return rows[0][0] if rows else None


def test_a_draining_node_takes_no_more_hand_offs(start_node, make_executor, enclave,
                                                 enclave_dir, tmp_path):
    """A node told to stop closes its task inbox (recording, queued for any node, what it
    held unread): a client then records a lone submit's job itself before submit()
    returns, so its task runs even if the client dies at once."""
    a = start_node("--prefetch", "1", workers=1)  # (it holds a task behind the long one)
    ex = make_executor(1, start_node=False)
    log, release, ran = tmp_path / "pids", tmp_path / "release", tmp_path / "ran"
    running = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    wait_for(log.exists, what="a long task to start")
    behind = ex.submit(tasks.square, 3)
    wait_for(lambda: held_by(enclave, behind.job_id) == a.node_id, what="a task to wait on A")
    a.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: held_by(enclave, behind.job_id) is None, what="A to hand back what waits")
    assert not os.path.exists(enclave._inbox_path(f"node-{a.node_id}"))
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(enclave_dir), str(ran)], env=subprocess_env(),
        cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        job_id, recorded = client.stdout.readline().split()
    finally:
        client.kill()
        client.wait(GUARD)
    assert recorded == "True"  # A, draining, took no hand-off: the client recorded the job
    assert enclave.jobs.get(job_id).state == JobState.PENDING
    tasks.release(release, "go")
    running.result(GUARD)
    assert a.proc.wait(GUARD) == 0
    b = start_node(workers=1)
    assert behind.result(GUARD) == 9
    wait_for(lambda: enclave.jobs.get(job_id).state.final, what="the dead client's task")
    assert (enclave.jobs.get(job_id).state, enclave.jobs.get(job_id).node) == (
        JobState.COMPLETED, b.node_id
    )
    assert ran.read_text() == "ran\n"


def test_a_handed_task_with_a_number_sqlite_cannot_hold_is_dropped(start_node, make_executor,
                                                                   enclave):
    a = start_node(workers=1)
    token = credentials.load(enclave).access()
    header = wire.task_header(
        job_id=os.urandom(16).hex(), owner=token.user, client="c" * 16, queue="test",
        walltime=60.0, created=time.time(), fn=wire.fn_name(tasks.square), n=2**63,
    )
    body = token.sign(header, wire.dump_call(tasks.square, [((5,), {})]))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(body, enclave._inbox_path(f"node-{a.node_id}"))
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 6).result(GUARD) == 36  # the node serves on
    assert a.proc.poll() is None
    assert f"dropping a task handed to this node (job {header['job_id']})" in a.output()
    assert enclave.jobs.get(header["job_id"]) is None


def test_a_task_the_client_queued_for_a_dead_node_gets_a_local_node(
    start_node, make_executor, enclave, stopped
):
    """start_node="auto": a queue no node serves any more gets a local node, also when its
    task was first handed to a node that died with it unread."""
    start_node(workers=1)  # serves "test": the executor starts no node of its own for it
    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    other = start_node(workers=1, queue="production")
    stopped(other)
    before = client_writes(ex)
    f = ex.with_options(queue="production").submit(tasks.square, 5)
    assert client_writes(ex) == before  # handed to the node of "production"
    other.kill()  # it dies with the task unread
    assert f.result(GUARD) == 25
    assert enclave.jobs.get(f.job_id).node not in (None, other.node_id)


def test_a_cancel_whose_blob_cannot_be_deleted_still_cancels(
    start_node, make_executor, enclave, stopped, caplog
):
    """The job is recorded cancelled before its blobs are deleted: a delete that fails
    (here the blob's name is taken by a directory) is logged, and the future is cancelled
    all the same.  It used to raise from cancel(), with the future dropped by the
    executor, so that its result() waited for ever."""
    import concurrent.futures as cf
    import shutil

    _, ex, f = _big_task_handed_to_a_stopped_node(start_node, make_executor, enclave, stopped)
    (blob,) = [p for p in (enclave.home / "blobs").rglob("*") if p.is_file()]
    blob.unlink()
    blob.mkdir()
    try:
        assert f.cancel() is True
        with pytest.raises(cf.CancelledError):
            f.result(GUARD)
        assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
        assert f"deleting the blobs of cancelled job {f.job_id} failed" in caplog.text
    finally:
        shutil.rmtree(blob)
