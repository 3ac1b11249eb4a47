"""The embedded backend's own failure modes, beyond the contract suite: processes opening
a new enclave together, the reaper and nodes it cannot see into or whose clock stepped,
visibility after a wait for the lock, and result blobs no row names."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from kotta_executor.backends.base import Finished, Message, NewJob, NodeInfo
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import ConfigurationError
from kotta_executor.states import JobState
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
GUARD = 60.0
LARGE = (1 << 20) + 17  # over RESULT_INLINE_LIMIT: the result goes to a blob


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _new_job(queue: str = "work") -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id=job_id, owner="alice", client="client-1", queue=queue,
                  fn="tests.tasks:add", walltime=30.0, body=f"task:{job_id}".encode())


def _blob_files(enclave: EmbeddedEnclave) -> set[str]:
    root = enclave.home / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _referenced_blobs(enclave: EmbeddedEnclave) -> set[str]:
    import sqlite3

    c = sqlite3.connect(enclave.home / "kotta.db")
    try:
        return {r[0] for r in c.execute("SELECT result_ref FROM jobs WHERE result_ref IS NOT NULL")}
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# 1. Processes opening a new enclave together (nodes of a batch array on first use): each
#    waits for the lock to make the tables, none gets "database is locked"


def _open_fresh(home: str, barrier, out) -> None:
    try:
        barrier.wait(GUARD)
        EmbeddedEnclave(home).close()
        out.put(None)
    except BaseException:  # noqa: BLE001 - report to the parent
        out.put(traceback.format_exc())


def test_processes_opening_a_fresh_enclave_together_all_succeed(tmp_path):
    """(Before the fix, all but one of four failed, every time.)"""
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_fresh, args=(str(tmp_path / "enclave"), barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        errors = [e for e in (out.get(timeout=GUARD) for _ in procs) if e]
    finally:
        for p in procs:
            p.join(GUARD)
    assert errors == [], errors[0]


# --------------------------------------------------------------------------------------
# 2. The reaper leaves alone a live node it cannot see into (another PID namespace: a
#    container sharing $KOTTA_HOME): its messages stay hidden, its registration stays

_REAPER = r"""
import json, sys
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import ConfigurationError
e = EmbeddedEnclave(sys.argv[1])
got = e.queue.receive("work", 10, 60.0, "node-in-container")
print(json.dumps({"got": [d.job_id for d in got],
                  "nodes": [n.node_id for n in e.nodes.all()]}))
"""


def test_reaper_in_another_pid_namespace_does_not_steal_a_live_nodes_message(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here")
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        me = psutil.Process()
        node = NodeInfo(node_id="live-node", queue="work", host=socket.gethostname(),
                        pid=os.getpid(), workers=1, started=me.create_time())
        enclave.nodes.register(node)
        job = _new_job()
        enclave.jobs.create([job])
        [held] = enclave.queue.receive("work", 1, 60.0, node.node_id)  # held for 60 s
        assert held.job_id == job.job_id

        # another process on the same machine and the same enclave, in its own PID
        # namespace (a container sharing the volume)
        run = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _REAPER,
             str(enclave.home)],
            capture_output=True, text=True, env=_env(), timeout=GUARD,
        )
        assert run.returncode == 0, run.stderr
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        # the live node's message is still invisible, and the node still registered
        assert seen["got"] == [], (
            f"job {job.job_id} delivered to a second holder while the live node "
            f"{node.node_id} holds it (reaped: registration gone = "
            f"{node.node_id not in [n.node_id for n in enclave.nodes.all()]})")
        assert node.node_id in [n.node_id for n in enclave.nodes.all()]
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# 3. A message received after a wait for the write lock is hidden for its whole
#    visibility timeout from then, not from when receive() was called


def test_message_stays_invisible_for_its_timeout_after_a_lock_wait(tmp_path):
    import sqlite3

    vt = 0.5
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        enclave.queue.send("q", [Message("m1", b"body")])
        blocker = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process's long write transaction
        entered = threading.Event()
        first: list = []

        def receiver():
            entered.set()
            first.extend(enclave.queue.receive("q", 1, vt, "holder-A"))

        t = threading.Thread(target=receiver)
        t.start()
        assert entered.wait(GUARD)
        time.sleep(3 * vt)  # the other writer holds the lock a while (the point of the test)
        blocker.execute("COMMIT")
        t.join(GUARD)
        got_at = time.time()
        assert [d.job_id for d in first] == ["m1"]
        second = enclave.queue.receive("q", 1, vt, "holder-B")
        elapsed = time.time() - got_at
        assert second == [] or elapsed >= vt, (
            f"m1 went to holder-B {elapsed:.3f} s after holder-A received it with a "
            f"visibility timeout of {vt} s")
        blocker.close()
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# 4. finish() leaves no result blob that no row names: not when the transaction around
#    it rolls back, not when one call holds two results of one job


def test_rolled_back_finish_leaves_no_result_blob(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        job = _new_job()
        enclave.jobs.create([job])
        assert enclave.jobs.transition([job.job_id], JobState.PROCESSING) == [job.job_id]

        class Crash(Exception):
            pass

        with pytest.raises(Crash), enclave.atomic():  # e.g. a node step that fails
            assert enclave.jobs.finish(
                [Finished(job.job_id, JobState.COMPLETED, b"R" * LARGE)]) == [job.job_id]
            raise Crash
        assert enclave.jobs.get(job.job_id).state == JobState.PROCESSING
        orphans = _blob_files(enclave) - _referenced_blobs(enclave)
        assert orphans == set(), f"result blobs no job names: {orphans}"
    finally:
        enclave.close()


def test_prune_deletes_in_short_transactions_and_blobs_after_their_commit(tmp_path, monkeypatch):
    from kotta_executor.backends import embedded

    monkeypatch.setattr(embedded, "PRUNE_CHUNK", 2)
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    other = EmbeddedEnclave(tmp_path / "enclave")  # (a node: another connection)
    try:
        jobs = [_new_job() for _ in range(5)]
        enclave.jobs.create(jobs)
        ids = [j.job_id for j in jobs]
        assert enclave.jobs.transition(ids, JobState.PROCESSING) == ids
        assert sorted(enclave.jobs.finish(
            [Finished(j, JobState.COMPLETED, b"R" * LARGE) for j in ids])) == sorted(ids)
        seen = []
        delete = enclave.blobs.delete

        def spy(keys):  # between two chunks: the lock is free, the rows gone for others
            keys = list(keys)
            other.jobs.create([_new_job()])  # (a write: it would wait for a held lock)
            seen.append((len(keys), set(other.jobs.get_many(ids))))
            delete(keys)

        monkeypatch.setattr(enclave.blobs, "delete", spy)
        before = wait_for(lambda: (t := time.time()) > max(
            r.finished for r in enclave.jobs.get_many(ids).values()) and t)
        assert sorted(enclave.jobs.prune(before).jobs) == sorted(ids)
        assert [n for n, _ in seen] == [6, 6, 3]  # result, fn and args of each job
        assert [len(left) for _, left in seen] == [3, 1, 0]
        assert _blob_files(enclave) == set()
    finally:
        other.close()
        enclave.close()


def test_a_prune_of_one_users_jobs_reads_the_table_once(tmp_path):
    """A prune of one owner's jobs went by the owner index and sorted all their jobs by
    rowid again for each page of 300: 20,000 jobs took a second, a million most of an
    hour.  No page of it sorts (each goes on in rowid order from where the last ended)."""
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        conn = enclave._db.conn()
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        enclave.jobs.prune(time.time(), owner="alice", dry_run=True)
        conn.set_trace_callback(None)
        [page] = [q for q in statements if q.startswith("SELECT rowid")]
        plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + page))
        assert "TEMP B-TREE" not in plan, plan
    finally:
        enclave.close()


def test_duplicate_large_results_in_one_finish_leave_no_orphan_blob(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        job = _new_job()
        enclave.jobs.create([job])
        enclave.jobs.transition([job.job_id], JobState.PROCESSING)
        got = enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, b"A" * LARGE),
                                   Finished(job.job_id, JobState.COMPLETED, b"B" * LARGE)])
        assert got == [job.job_id]
        orphans = _blob_files(enclave) - _referenced_blobs(enclave)
        assert orphans == set(), f"result blobs no job names: {orphans}"
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# 2b. A forward step of the wall clock (NTP, a VM resumed) does not make live nodes look
#     dead: psutil's create_time moves with it (boot time from /proc/stat "btime", read
#     afresh, plus the start in ticks since boot); the start in ticks does not

_REAPER_AFTER_CLOCK_STEP = r"""
import json, os, sys
from pathlib import Path
import psutil
fake = Path(sys.argv[2])
# /proc as it reads after the wall clock was stepped forward by 5 s: btime = realtime -
# uptime moves by the step; a process's start in ticks since boot does not
fake.mkdir()
lines = []
for line in Path("/proc/stat").read_text().splitlines():
    if line.startswith("btime "):
        line = f"btime {int(line.split()[1]) + 5}"
    lines.append(line)
(fake / "stat").write_text("\n".join(lines) + "\n")
for pid in psutil.pids():
    os.symlink(f"/proc/{pid}", fake / str(pid))
(fake / "self").symlink_to(f"/proc/{os.getpid()}")
psutil.PROCFS_PATH = str(fake)
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import ConfigurationError
e = EmbeddedEnclave(sys.argv[1])
got = e.queue.receive("work", 10, 60.0, "another-node")
print(json.dumps({"got": [d.job_id for d in got],
                  "nodes": [n.node_id for n in e.nodes.all()]}))
"""


def test_clock_step_does_not_make_a_live_node_look_dead(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        node = NodeInfo(node_id="live-node", queue="work", host=socket.gethostname(),
                        pid=os.getpid(), workers=1,
                        started=psutil.Process().create_time())  # as node/daemon.py:266
        enclave.nodes.register(node)
        job = _new_job()
        enclave.jobs.create([job])
        [held] = enclave.queue.receive("work", 1, 60.0, node.node_id)
        run = subprocess.run(
            [sys.executable, "-c", _REAPER_AFTER_CLOCK_STEP, str(enclave.home),
             str(tmp_path / "fakeproc")],
            capture_output=True, text=True, env=_env(), timeout=GUARD,
        )
        assert run.returncode == 0, run.stderr
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen["got"] == [], (
            f"job {held.job_id} delivered to a second holder while the live node holds it")
        assert node.node_id in [n.node_id for n in enclave.nodes.all()]
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# 5. ...while a node that has surely ended is reaped at once


def _register_self(enclave: EmbeddedEnclave, node_id: str = "n1") -> NodeInfo:
    node = NodeInfo(node_id=node_id, queue="work", host=socket.gethostname(),
                    pid=os.getpid(), workers=1, started=psutil.Process().create_time())
    enclave.nodes.register(node)
    return node


def _set_ident(enclave: EmbeddedEnclave, node_id: str, ident: str | None) -> None:
    import sqlite3

    c = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None)
    try:
        c.execute("UPDATE nodes SET ident=? WHERE node_id=?", (ident, node_id))
    finally:
        c.close()


def _ident_of(enclave: EmbeddedEnclave, node_id: str) -> str:
    import sqlite3

    c = sqlite3.connect(enclave.home / "kotta.db")
    try:
        return c.execute("SELECT ident FROM nodes WHERE node_id=?", (node_id,)).fetchone()[0]
    finally:
        c.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
@pytest.mark.parametrize("change", ["pid reused", "machine restarted"])
def test_a_node_whose_process_is_gone_is_reaped_and_its_message_released(tmp_path, change):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        node = _register_self(enclave)
        job = _new_job()
        enclave.jobs.create([job])
        [held] = enclave.queue.receive("work", 1, 60.0, node.node_id)
        assert enclave.reap_dead_nodes() == []  # alive: this very process
        boot, namespace, ticks = _ident_of(enclave, node.node_id).split(" ")
        if change == "pid reused":  # another process has its pid now
            _set_ident(enclave, node.node_id, f"{boot} {namespace} {int(ticks) + 1}")
        else:  # registered before the machine last started
            _set_ident(enclave, node.node_id, f"{uuid.uuid4()} {namespace} {ticks}")
        assert enclave.reap_dead_nodes() == [node.node_id]
        assert node.node_id not in [n.node_id for n in enclave.nodes.all()]
        [again] = enclave.queue.receive("work", 1, 60.0, "another-node")
        assert again.job_id == job.job_id and again.receive_count == 2
    finally:
        enclave.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
def test_the_reaper_runs_on_after_the_wall_clock_steps_back(tmp_path, monkeypatch):
    """The receive's look for dead nodes (once a second) is paced by a monotonic clock:
    paced by the wall clock, a step back of an hour (NTP, a VM resumed) stopped it for that
    hour, and the message of a node killed meanwhile stayed hidden as long."""
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        node = _register_self(enclave)
        enclave.jobs.create([_new_job()])
        [held] = enclave.queue.receive("work", 1, 60.0, node.node_id)  # (a reap now)
        boot, namespace, ticks = _ident_of(enclave, node.node_id).split(" ")
        _set_ident(enclave, node.node_id, f"{boot} {namespace} {int(ticks) + 1}")  # gone
        stepped = time.time() - 3600
        monkeypatch.setattr(time, "time", lambda: stepped)  # the clock steps back an hour
        deadline = time.monotonic() + GUARD
        got = []
        while not got and time.monotonic() < deadline:
            got = enclave.queue.receive("work", 1, 60.0, "another-node", wait_seconds=0.5)
        assert [d.job_id for d in got] == [held.job_id], "the dead node's task stayed hidden"
    finally:
        monkeypatch.undo()
        enclave.close()


def test_a_node_registered_without_an_ident_is_judged_by_its_process(tmp_path):
    """Rows of earlier versions, or not on Linux: the process's start time, as before."""
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        alive = _register_self(enclave, "alive")
        _set_ident(enclave, "alive", None)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        gone = NodeInfo(node_id="gone", queue="work", host=socket.gethostname(),
                        pid=child.pid, workers=1, started=time.time())
        enclave.nodes.register(gone)  # (no such process now: no ident either)
        assert _ident_of(enclave, "gone") is None
        assert enclave.reap_dead_nodes() == ["gone"]
        assert [n.node_id for n in enclave.nodes.all()] == [alive.node_id]
    finally:
        enclave.close()


def test_a_node_on_another_host_is_left_to_its_heartbeat(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        far = NodeInfo(node_id="far", queue="work", host="another-host.example",
                       pid=2 ** 22 + 1, workers=1, started=time.time())  # no such pid here
        enclave.nodes.register(far)
        assert enclave.reap_dead_nodes() == []
        assert [n.node_id for n in enclave.nodes.live("work")] == ["far"]
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# 6. Clean-up hooks run when what they clean up after is rolled back, and only then


def test_on_rollback_runs_for_the_rolled_back_savepoint_or_transaction_only(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    db = enclave._db
    ran: list[str] = []
    try:
        with db.tx():
            db.on_rollback(lambda: ran.append("outer, committed"))
        assert ran == []

        class Undo(Exception):
            pass

        with db.tx():
            with pytest.raises(Undo), db.tx():
                db.on_rollback(lambda: ran.append("inner, rolled back"))
                raise Undo
            with db.tx():
                db.on_rollback(lambda: ran.append("inner, released, outer committed"))
            assert ran == ["inner, rolled back"]
        assert ran == ["inner, rolled back"]

        with pytest.raises(Undo), db.tx():
            with db.tx():
                db.on_rollback(lambda: ran.append("released, then rolled back with the outer"))
            raise Undo
        assert ran == ["inner, rolled back", "released, then rolled back with the outer"]
    finally:
        enclave.close()


def test_an_enclave_made_by_an_earlier_version_gets_the_columns_it_lacks(tmp_path):
    """An enclave's database made before messages kept their send time and nodes their
    process and Python: opened now, it has them, and what uses them works."""
    import sqlite3

    from kotta_executor.backends import embedded
    from kotta_executor.backends.base import Message, NodeInfo

    old = embedded.SCHEMA.replace(",\n    sent REAL", "").replace(
        ",\n    ident TEXT,\n    python TEXT", "")
    assert old.count("ident") == old.count(" sent ") == old.count("python") == 0
    home = tmp_path / "old"
    home.mkdir()
    with sqlite3.connect(home / "kotta.db") as conn:
        conn.executescript(old)
    e = EmbeddedEnclave(home)
    try:
        for table, column, _ in embedded._ADDED_COLUMNS:
            assert column in {r[1] for r in e._db.read(f"PRAGMA table_info({table})")}
        e.nodes.register(NodeInfo("n1", "test", socket.gethostname(), os.getpid(), 1,
                                  python="3.12"))
        assert [(n.node_id, n.python) for n in e.nodes.live("test")] == [("n1", "3.12")]
        e.queue.send("test", [Message("a" * 32, b"body")])
        assert [m.body for m in e.queue.receive("test", 1, 30, "n1")] == [b"body"]
    finally:
        e.close()
    EmbeddedEnclave(home).close()  # opened again: nothing more to add


#: results as the first nodes wrote them (envelope version 1, kotta-executor 0.1.0 before
#: each call's outcome was pickled apart): the payload is one pickle of the list of
#: ``(tag, value)``.  Made by that version's ``wire.encode`` and pasted here.
_FIRST_LAYOUT_RESULTS = {
    "0123456789abcdef0123456789abcdef": (
        b'KOTTA\x01\x00\x00\x00{{"job_id":"0123456789abcdef0123456789abcdef","kind":"result",'
        b'"n":1,"outcome":"ok","sections":[["payload",31],["stdout",3]]}\x80\x05\x95\x14\x00\x00'
        b'\x00\x00\x00\x00\x00]\x94\x8c\x02ok\x94}\x94\x8c\x01a\x94K\x01s\x86\x94a.hi\n'),
    "fedcba9876543210fedcba9876543210": (
        b'KOTTA\x01\x00\x00\x00{{"job_id":"fedcba9876543210fedcba9876543210","kind":"result",'
        b'"n":1,"outcome":"ok","sections":[["payload",60],["stdout",3]]}\x80\x05\x951\x00\x00'
        b'\x00\x00\x00\x00\x00]\x94\x8c\x05raise\x94\x8c\x08builtins\x94\x8c\nValueError'
        b'\x94\x93\x94\x8c\x02no\x94\x85\x94R\x94\x86\x94a.hi\n'),
}


def test_a_result_an_earlier_version_recorded_is_attached_as_before(enclave, make_executor):
    """An enclave whose first nodes recorded results in the envelope layout they had then
    (version 1, which this version reads): ``attach`` to such a job raised
    SerializationError "could not be unpickled on the client: TypeError: a bytes-like
    object is required, not 'tuple'", for a value or an exception that unpickle here."""
    from kotta_executor.backends.base import Finished, NewJob
    from kotta_executor.states import JobState

    ex = make_executor(1, start_node=False)
    for job_id, result in _FIRST_LAYOUT_RESULTS.items():
        enclave.jobs.create([NewJob(job_id, ex.owner, "c0ffee00c0ffee00", "test",
                                    "__main__.f", 300.0, b"")], enqueue=False)
        enclave.jobs.transition([job_id], JobState.PROCESSING, node="an-old-node")
        assert enclave.jobs.finish([Finished(job_id, JobState.COMPLETED, result)]) == [job_id]
    assert ex.attach("0123456789abcdef0123456789abcdef").result(GUARD) == {"a": 1}
    with pytest.raises(ValueError, match="^no"):
        ex.attach("fedcba9876543210fedcba9876543210").result(GUARD)


# --------------------------------------------------------------------------------------
# A disk that fills up while a blob is written (a task's big argument): the write fails,
# and leaves no partial file that would keep the disk full for the whole enclave

_SUBMIT_ON_A_FULL_DISK = r"""
import resource, signal, sys
from kotta_executor import KottaExecutor
# files of this process may grow to 1 MiB, as if the disk held no more: a write past that
# fails with EFBIG (SIGXFSZ ignored), as one fails with ENOSPC on a full disk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ex = KottaExecutor(1, enclave=sys.argv[1], start_node=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    ex.submit(len, b"y" * (2 << 20))
except OSError as exc:
    print("refused:", exc)
ex.shutdown(wait=False, cancel_futures=True)
"""


def test_a_blob_write_cut_short_by_a_full_disk_leaves_no_partial_file(tmp_path):
    """And the error names the blob: a bare ``OSError: [Errno 28] No space left on
    device`` does not say whose disk is full (the enclave's may be another than the
    notebook's)."""
    home = tmp_path / "enclave"
    EmbeddedEnclave(home).close()
    out = subprocess.run(
        [sys.executable, "-c", _SUBMIT_ON_A_FULL_DISK, str(home)], env=_env(), cwd=ROOT,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GUARD,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: [Errno 27] File too large: "
                                 f"'{home.resolve()}/blobs/ar/args-"), out.stdout + out.stderr
    left = [p.name for p in (home / "blobs").rglob("*") if p.is_file()]
    assert left == [], f"a partial blob was left behind: {left}"


# --------------------------------------------------------------------------------------
# A connection that holds a read transaction open (a sqlite3 shell, a backup) keeps the
# nodes' checkpoints from copying the write-ahead log: it grows with every write.  The node
# says so, and once the reader is gone the log shrinks back instead of keeping its size


def test_a_write_ahead_log_held_by_a_reader_is_warned_about_and_shrinks_once_it_ends(
    tmp_path, monkeypatch, caplog
):
    import logging
    import sqlite3

    from kotta_executor.backends import embedded

    monkeypatch.setattr(embedded, "WAL_WARN_SIZE", 1 << 20)
    monkeypatch.setattr(embedded, "WAL_SIZE_LIMIT", 1 << 20)
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    wal = enclave.home / "kotta.db-wal"
    reader = sqlite3.connect(enclave.home / "kotta.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()

        def write(megabytes: int) -> None:
            for _ in range(megabytes * 4):
                enclave.queue.send("work", [Message("a" * 32, b"x" * (1 << 18))])
                enclave.queue.take("work", 1)

        write(4)
        with caplog.at_level(logging.WARNING, logger="kotta.embedded"):
            enclave.checkpoint()
        assert wal.stat().st_size > 4 << 20
        assert any("write-ahead log" in r.getMessage() and "read transaction" in r.getMessage()
                   for r in caplog.records), caplog.text
        reader.execute("COMMIT")
        enclave.checkpoint()  # all of it copied now: the next write starts the log over
        enclave.queue.send("work", [Message("a" * 32, b"x")])
        assert wal.stat().st_size <= 1 << 20
    finally:
        reader.close()
        enclave.close()


def test_a_result_the_disk_cannot_hold_fails_its_job_and_the_node_serves_on(
    start_node, make_executor, tmp_path
):
    """A result too big for the enclave's database goes to a blob; when the disk cannot
    hold it, the job fails saying so.  (Its node used to retry the whole batch of results
    for a minute, then die, the task ran again on the next node, to the same end, until
    it was dead-lettered minutes later as DeliveryFailed, with no word of the disk.)"""
    import shlex

    from kotta_executor import JobFailed

    # a node whose files may grow to 4 MiB, as on a disk that holds no more (a write
    # past that fails with EFBIG, as one fails with ENOSPC on a full disk)
    python = tmp_path / "python-on-a-small-disk"
    python.write_text(
        "#!/bin/sh\n"
        f'exec {shlex.quote(sys.executable)} -c "import os, resource, sys; '
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY)); "
        'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])" "$@"\n'
    )
    python.chmod(0o755)
    node = start_node(python=str(python))
    ex = make_executor(1, start_node=False)
    with pytest.raises(JobFailed, match="could not be stored in the enclave.s blob directory"):
        ex.submit(bytes, 5 << 20).result(GUARD)
    assert ex.submit(len, b"small").result(GUARD) == 5
    assert node.proc.poll() is None, node.output()


@pytest.mark.parametrize("fault", ["deleted", "unreadable"])
def test_a_result_blob_that_cannot_be_read_fails_its_future_naming_the_blob(
    start_node, make_executor, enclave, fault
):
    """A result over 1 MiB is kept in a blob.  Deleted (a user cleaning up ``blobs/``),
    its future failed with "the job completed without recording a result", with no word
    of the blob; there but unreadable (another OS user's file: EACCES; a disk error; here
    a symlink to itself: ELOOP), the executor's manager tried again for a minute and then
    broke the executor, every future with it.  The one future fails, naming the blob."""
    from kotta_executor import JobFailed

    start_node()
    ex = make_executor(1, start_node=False)
    job_id = ex.submit(bytes, 2 << 20).job_id
    assert len(ex.submit(bytes, 2 << 20).result(GUARD)) == 2 << 20
    wait_for(lambda: enclave.jobs.get(job_id).state == JobState.COMPLETED,
             what="the first job to complete")
    ex.shutdown()  # (before the blob goes: its futures are done, their results read)
    [ref] = enclave.jobs.result_refs([job_id]).values()
    blob = enclave.home / "blobs" / ref[:2] / ref
    blob.unlink()
    if fault == "unreadable":
        blob.symlink_to(blob)
    later = make_executor(1, start_node=False)
    with pytest.raises(JobFailed, match=f"its result, the blob {ref} in .*, cannot be read"):
        later.attach(job_id).result(GUARD)
    assert later.submit(len, b"abc").result(GUARD) == 3


def test_bursts_fit_an_sqlite_that_allows_999_variables_a_statement(tmp_path):
    """SQLite before 3.32 (Ubuntu 20.04's, RHEL 8's: a Python built there uses it) allows
    999 ``?`` a statement, not 32766.  A burst of submits recorded in one statement of
    thousands, or a node's step recording hundreds of results, failed there with "too many
    SQL variables", which breaks the executor (BrokenEnclave) or ends the node."""
    import sqlite3

    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        with enclave.atomic() as conn:  # this thread's connection, as on such an SQLite
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        jobs = [_new_job("test") for _ in range(1000)]
        enclave.jobs.create(jobs)
        ids = [j.job_id for j in jobs]
        assert sorted(enclave.jobs.transition(ids, JobState.PROCESSING)) == sorted(ids)
        assert sorted(enclave.jobs.finish(
            [Finished(j, JobState.COMPLETED, b"result") for j in ids])) == sorted(ids)
        records = enclave.jobs.get_many(ids, with_result=True)
        assert {r.state for r in records.values()} == {JobState.COMPLETED}
        assert enclave.queue.depth("test") == 1000
    finally:
        enclave.close()


# --------------------------------------------------------------------------------------
# An enclave is one OS user's (docs/security.md, trust roots)


def test_an_enclave_whose_path_is_not_utf8_works(make_executor, tmp_path):
    """A directory named in another encoding than UTF-8 (Latin-1's "café", made on an older
    system: ``os.listdir`` gives it as ``'caf\\udce9'``) holding the enclave, as
    ``$KOTTA_HOME`` or ``enclave=``: every executor and command failed to open it, with
    UnicodeEncodeError ("surrogates not allowed"), naming its doorbells after the path."""
    from tests import tasks

    home = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9 enclave"))
    ex = make_executor(1, enclave=home)
    assert ex.submit(tasks.square, 7).result(GUARD) == 49
    assert ex.submit(len, b"x" * (1 << 20)).result(GUARD) == 1 << 20  # (through a blob)
    assert (home / "kotta.db").exists()
    # $TMPDIR so named too, where the inboxes are (their path's length failed likewise)
    tmp = bytes(tmp_path) + b"/t\xe9mp"
    os.mkdir(tmp)
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from kotta_executor import KottaExecutor; "
         "ex = KottaExecutor(1, enclave=sys.argv[1]); print(ex.submit(abs, -3).result(60)); "
         "ex.shutdown()", str(home)],
        env={**_env(), "TMPDIR": os.fsdecode(tmp)}, cwd=ROOT, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, errors="replace", timeout=GUARD,
    )
    assert (out.returncode, out.stdout) == (0, "3\n"), out.stderr


def test_an_enclave_open_to_other_users_is_warned_of_once(tmp_path, caplog):
    """An enclave whose directory others may read (made by an earlier version, or opened
    since) is not changed, but said, with the command that closes it."""
    home = tmp_path / "old"
    EmbeddedEnclave(home).close()
    home.chmod(0o755)
    caplog.set_level(logging.WARNING, logger="kotta.embedded")
    for _ in range(2):
        EmbeddedEnclave(home).close()
    said = [r.message for r in caplog.records if "open to other OS users" in r.message]
    assert said == [f"the enclave directory {home.resolve()} is open to other OS users "
                    f"(mode 755): they can read its jobs, arguments and results; close it "
                    f"with `chmod 700 {home.resolve()}`"]
    assert home.stat().st_mode & 0o777 == 0o755


def test_a_new_enclave_in_a_directory_made_beforehand_is_closed_to_other_users(
    make_executor, tmp_path
):
    """`mkdir lab` makes a directory others may enter (0755); the enclave's database (every
    job, argument and result), blobs and logs are created readable by all (the umask),
    so the directory must be closed (0700) as it is when the enclave makes it."""
    from tests import tasks

    home = tmp_path / "lab"
    home.mkdir()
    home.chmod(0o755)
    ex = make_executor(1, enclave=home)
    assert ex.submit(tasks.square, 7).result(GUARD) == 49
    mode = home.stat().st_mode & 0o777
    assert mode & 0o077 == 0, f"the enclave directory is {oct(mode)}: other users can read it"


@pytest.mark.parametrize(("spec", "meant"), [
    ("aws:/lab", "aws://lab"), ("AWS:lab", "aws://lab"),
    ("embedded:/srv/enclave", "embedded:///srv/enclave"),
])
def test_a_url_missing_its_slashes_is_an_error_not_a_new_enclave(tmp_path, monkeypatch, spec,
                                                                   meant):
    """``aws:/lab`` (one slash) was a relative path: the executor, and ``kotta up``, made a
    new, empty embedded enclave in ./aws:/lab, and its jobs waited there for nodes that
    serve the AWS enclave.  It is a ConfigurationError naming the URL meant; a directory
    so named is still reachable as ./aws:/lab."""
    from kotta_executor import ConfigurationError, KottaExecutor
    from tests.conftest import subprocess_env

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=f"did you mean {meant}\\?"):
        KottaExecutor(1, enclave=spec)
    r = subprocess.run([sys.executable, "-m", "kotta_executor.cli", "jobs", "--enclave", spec],
                       capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert r.returncode == 2 and f"did you mean {meant}?" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made
    assert EmbeddedEnclave.exists(EmbeddedEnclave(f"./{spec}").home)  # made on purpose


def test_a_blob_that_cannot_be_deleted_does_not_keep_the_others(tmp_path):
    """The delete stopped at the first blob it could not delete: the blobs of every task
    that ended after it, listed with it, stayed (and were tried again with it)."""
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    keys = ["args-a1", "args-b2", "args-c3"]
    for key in keys:
        enclave.blobs.put(key, b"pickled")
    stuck = enclave.home / "blobs" / "ar" / "args-b2"
    stuck.unlink()
    stuck.mkdir()  # (a directory with a file in it: no unlink takes it)
    (stuck / "x").touch()
    with pytest.raises(IsADirectoryError):
        enclave.blobs.delete(keys)
    assert [p.name for p in (enclave.home / "blobs" / "ar").iterdir()] == ["args-b2"]
    enclave.close()


# --------------------------------------------------------------------------------------
# `kotta jobs` in an enclave kept for months (hundreds of thousands of finished jobs):
# a listing by owner, by state, or both, reads only the rows it lists (an index), where
# it read the whole job table, newest first, to find the few that match


@contextmanager
def _statements_sent(e: EmbeddedEnclave):
    """The statements this thread's connection to ``e`` executes inside, with their
    parameters, as ``[(sql, params)]``: SQLite plans a statement by its parameters (how
    many ids it names), so its plan is asked of it as sent."""
    conn = e._db.conn()

    class Recording:
        def execute(self, sql, params=()):
            sent.append((sql, list(params)))
            return conn.execute(sql, params)

        def __getattr__(self, name):
            return getattr(conn, name)

    sent: list[tuple[str, list]] = []
    e._db._local.conn = Recording()
    try:
        yield sent
    finally:
        e._db._local.conn = conn


def _plan(e: EmbeddedEnclave, sql: str, params: list) -> str:
    return " / ".join(row[3] for row in e._db.conn().execute("EXPLAIN QUERY PLAN " + sql, params))


@pytest.mark.parametrize("filters", [{"owner": "bob"}, {"owner": "bob", "state": "failed"}])
def test_listing_a_users_jobs_searches_an_index(tmp_path, filters):
    e = EmbeddedEnclave(tmp_path / "enclave")
    try:
        jobs = [_new_job() for _ in range(30)]
        e.jobs.create(jobs, enqueue=False)
        e.jobs.finish([Finished(j.job_id, JobState.COMPLETED, b"r") for j in jobs[:20]])
        with _statements_sent(e) as sent:
            e.jobs.list(**filters, limit=5)
        ((select, params),) = [(q, p) for q, p in sent if q.startswith("SELECT")]
        plan = _plan(e, select, params)
        assert " / " not in plan and plan.startswith("SEARCH jobs USING INDEX jobs_owner"), plan
    finally:
        e.close()


def test_an_enclave_made_before_the_job_indexes_gets_them(tmp_path):
    """Opened by this version, an older enclave's job table gets the index `kotta jobs`
    searches (made as the tables are: "IF NOT EXISTS", on every open)."""
    import sqlite3

    home = tmp_path / "old"
    EmbeddedEnclave(home).close()
    with sqlite3.connect(home / "kotta.db") as conn:
        conn.execute("DROP INDEX IF EXISTS jobs_owner")
    e = EmbeddedEnclave(home)
    try:
        names = {r[0] for r in e._db.read("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "jobs_owner" in names
    finally:
        e.close()



def test_the_statements_of_a_tasks_path_find_jobs_by_their_id(tmp_path):
    """Every statement a task's way through the enclave sends (create, the owner check,
    claim, finish, a look at its record) finds its jobs by their id: an index that
    SQLite took instead (one on the state, say, with every pending job behind it) made
    each claim read the whole queue."""
    e = EmbeddedEnclave(tmp_path / "enclave")
    try:
        jobs = [_new_job() for _ in range(300)]
        e.jobs.create(jobs)
        # (a node's batch: SQLite's choice of index depends on how many ids a statement names)
        ids = [j.job_id for j in jobs[:100]]
        with _statements_sent(e) as sent:
            e.jobs.owners(ids)
            e.jobs.transition(ids, JobState.PROCESSING, node="n")
            e.jobs.finish([Finished(i, JobState.COMPLETED, b"r") for i in ids])
            e.jobs.get_many(ids)
            e.jobs.kill_requested(ids)
        looked = [(q, p) for q, p in sent if q.startswith(("SELECT", "UPDATE", "WITH"))]
        assert len(looked) >= 5, sent
        for q, params in looked:
            plan = _plan(e, q, params)
            assert "SCAN jobs" not in plan and "USING INDEX sqlite_autoindex_jobs_1" in plan, (
                q[:120], plan)
    finally:
        e.close()


# --------------------------------------------------------------------------------------
# A burst of tiny tasks writes some 5 KB a task to the log (kotta.db-wal): a node that
# checkpointed it only every upkeep period (10 s) let it grow to hundreds of MB; one over
# its size limit is checkpointed at once, and the next write cuts it back


def test_a_node_checkpoints_a_log_over_its_limit_before_its_upkeep_is_due(
    tmp_path, monkeypatch
):
    from kotta_executor.backends import embedded
    from node.daemon import Node, NodeConfig

    monkeypatch.setattr(embedded, "WAL_SIZE_LIMIT", 1 << 20)
    home = tmp_path / "enclave"
    ours, writer = EmbeddedEnclave(home), EmbeddedEnclave(home)  # (two connections)
    try:
        # upkeep every 10 s (a third of the visibility timeout), the first 10 s from now
        node = Node(ours, NodeConfig(queue="test", workers=1, visibility_timeout=30.0))
        wal = home / "kotta.db-wal"
        body = b"x" * (1 << 18)
        for _ in range(8):
            writer.queue.send("other", [Message("a" * 32, body)])
        assert wal.stat().st_size > embedded.WAL_SIZE_LIMIT
        node._upkeep()
        # a write after a checkpoint that copied the whole log begins it anew, cut back
        writer.queue.send("other", [Message("a" * 32, b"small")])
        assert wal.stat().st_size <= embedded.WAL_SIZE_LIMIT
    finally:
        writer.close()
        ours.close()


def test_a_receive_reads_only_visible_messages_however_many_are_held(tmp_path):
    """The receive (and the look before it, and a reply queue's take) finds a queue's
    visible messages in an index that says when each is visible: on (queue, id) it read
    the row of every message held by nodes (thousands on a big node of tiny tasks) at
    every receive.  The queue stays in order: a message handed back, or whose visibility
    ran out, goes before those sent after it."""
    e = EmbeddedEnclave(tmp_path / "enclave")
    try:
        e.queue.send("test", [Message(f"{i:032x}", b"t") for i in range(40)])
        held = e.queue.receive("test", 30, 300, "n1")
        assert len(held) == 30
        e.queue.send("test", [Message(f"{i:032x}", b"t") for i in range(40, 45)])
        e.queue.hand_back([held[-1]])
        e.queue.extend([held[-2]], 0)  # visible again (its node died, say)
        with _statements_sent(e) as sent:
            got = e.queue.receive("test", 3, 300, "n2")
            e.queue.send("reply.c", [Message(f"{i:032x}", b"r") for i in range(3)])
            assert len(e.queue.take("reply.c", 10)) == 3
        # in the order they were sent: those visible again first, then those never received
        assert [d.job_id for d in got] == [held[-2].job_id, held[-1].job_id, f"{30:032x}"]
        looks = [(q, p) for q, p in sent if "FROM messages WHERE queue=?" in q]
        assert len(looks) >= 3, sent
        for q, params in looks:
            plan = _plan(e, q, params)
            assert "USING COVERING INDEX messages_ready" in plan, (q[:100], plan)
            assert "TEMP B-TREE" not in plan, (q[:100], plan)
    finally:
        e.close()


def test_a_new_enclave_is_not_made_in_a_directory_other_users_share(tmp_path):
    """A new enclave closes its directory (mode 700): named a directory others share
    (``enclave="/tmp"``, as root; a group's project directory), that shut them all out of
    it.  It is refused, saying why and where to make it instead, and nothing is changed."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # (as /tmp is)
    with pytest.raises(ConfigurationError) as err:
        EmbeddedEnclave(shared)
    assert str(err.value) == (
        f"cannot make an enclave in {shared}: it is a directory other OS users share (mode "
        f"1777), and an enclave closes its directory to everyone else (mode 700); make it in "
        f"a directory of its own, say {shared / 'kotta'}")
    assert shared.stat().st_mode & 0o7777 == 0o1777 and not list(shared.iterdir())
    EmbeddedEnclave(shared / "kotta").close()  # as it says
    assert (shared / "kotta").stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_new_enclave_is_not_made_in_a_directory_holding_other_users_files(tmp_path):
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "theirs.csv").touch()
    os.chown(project / "theirs.csv", 12345, 12345)
    with pytest.raises(ConfigurationError, match="theirs.csv in it is another user's"):
        EmbeddedEnclave(project)
    assert project.stat().st_mode & 0o777 == 0o755


def test_an_enclave_path_that_is_a_file_says_so(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    with pytest.raises(ConfigurationError) as err:
        EmbeddedEnclave(path)
    # (it said "cannot create the enclave directory ...: [Errno 17] File exists")
    assert str(err.value) == f"cannot use {path} as the enclave directory: it is a file, not a directory"
    assert path.read_text() == "mine\n"


def test_a_database_locked_too_long_by_another_process_is_named_with_a_way_out(
        make_executor, enclave, enclave_dir, monkeypatch, capsys):
    """Another process holding the enclave's write lock (a `sqlite3` shell inside a
    transaction, a client stopped by ^Z inside one) past the lock timeout: `kotta cancel`
    printed a traceback ending in "sqlite3.OperationalError: database is locked", naming
    no file nor what to do (and nodes and executors said only that).  Now the error names
    the database and the way out, and a command prints it in one line, exit 1.  (The lock
    timeout made short; the holder is a real process.)"""
    from kotta_executor.backends import embedded
    from kotta_executor.cli import main

    ex = make_executor(1, start_node=False)
    f = ex.submit(abs, -3)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.read()",
         str(enclave_dir / "kotta.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 0.2)
        capsys.readouterr()
        assert main(["--enclave", str(enclave_dir), "cancel", f.job_id]) == 1
        err = capsys.readouterr().err
        db = (enclave_dir / "kotta.db").resolve()
        # (it says, after a second, that it waits for the lock; then what stopped it)
        waiting, said = err.splitlines()
        assert waiting.startswith("kotta: waiting for the enclave's write lock: "), err
        assert said.startswith(f"kotta: error: the enclave database {db} is locked "
                               "(database is locked): another process has held its write "
                               "lock for over 0.2 s"), err
        assert "sqlite3 shell" in said, err
    finally:
        holder.stdin.close()
        holder.wait(GUARD)
    assert enclave.jobs.get(f.job_id).state == "pending"  # nothing done meanwhile


def test_a_prune_removes_the_queued_task_messages_of_its_jobs(tmp_path, monkeypatch):
    """Jobs cancelled before any node took their tasks (a queue no node served), then
    pruned: their rows and blobs went, but their task messages stayed in kotta.db, each
    with its pickled call, for good, counted in the queue's depth (a scaler started a
    node for them); the node that took them later dead-lettered those whose blob had gone,
    "corrupt task message: no blob 'args-...'", in dead letters no prune could remove.
    Now a prune removes them with their jobs (and counts them); other jobs' stay."""
    from kotta_executor.backends import embedded

    monkeypatch.setattr(embedded, "PRUNE_CHUNK", 2)
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        jobs = [_new_job() for _ in range(3)]
        kept = _new_job()
        enclave.jobs.create([*jobs, kept])
        ids = [j.job_id for j in jobs]
        assert enclave.jobs.transition(ids, JobState.CANCELLED) == ids
        before = wait_for(lambda: (t := time.time()) > max(
            r.finished for r in enclave.jobs.get_many(ids).values()) and t)
        assert enclave.queue.depth("work") == 4
        dry = enclave.jobs.prune(before, dry_run=True)
        assert enclave.queue.depth("work") == 4  # (a dry run removes nothing)
        pruned = enclave.jobs.prune(before)
        assert sorted(pruned.jobs) == sorted(ids) and pruned.bytes == dry.bytes
        assert enclave.queue.depth("work") == 1
        assert [d.job_id for d in enclave.queue.receive("work", 10, 30.0, "n")] == [kept.job_id]
    finally:
        enclave.close()


def test_a_task_cancelled_before_any_node_took_it_is_not_called_corrupt_once_its_blob_is_swept(
        start_node, make_executor, enclave, enclave_dir):
    """A job cancelled while its queue had no node, its arguments in a blob: the nodes'
    sweep (of any queue) deletes the blob of an ended job a day on, and the node that
    took its task at last dead-lettered it, warning "corrupt task message: no blob
    'args-...'", and `kotta dead-letters` listed the job the user had cancelled as
    corrupt.  Now the node drops it, as it drops any task of an ended job."""
    ex = make_executor(1, start_node=False)
    f = ex.submit(len, b"a" * (400 << 10))  # (its arguments over the inline limit)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    assert f.cancel()
    ex.shutdown()
    blob = enclave_dir / "blobs" / "ar" / f"args-{f.job_id}"
    long_ago = time.time() - 2 * 86400  # (past STRAY_BLOB_AGE)
    os.utime(blob, (long_ago, long_ago))
    start_node(workers=1, queue="production")  # another queue's node sweeps it
    wait_for(lambda: not blob.exists(), what="the sweep to delete the blob")
    node = start_node(workers=1)  # (queue "test")
    wait_for(lambda: enclave.queue.depth("test") == 0, what="the node to take the task")
    assert enclave.queue.dead_letters("test") == []
    assert "corrupt" not in node.output(), node.output()
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED
