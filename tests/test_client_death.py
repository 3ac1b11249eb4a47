"""A client process killed outright (SIGKILL, a notebook kernel restarted) with work
outstanding, on the embedded enclave with a node started apart from it: its jobs still end
and attach from a new client, and what the node would have told the dead client does not
pile up in the enclave."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kotta_executor import KottaExecutor
from kotta_executor.backends import embedded
from kotta_executor.backends.base import reply_queue

from . import tasks
from .conftest import GUARD, ROOT, subprocess_env, wait_for

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not embedded._PASSCRED, reason="inboxes need SO_PASSCRED (Linux)"),
]

# Submits tasks that wait for a file the test writes once this client is dead, waits
# until the enclave has recorded all of them, says which they are, and kills itself.
CLIENT = '''
import json, os, signal, sys
from kotta_executor import KottaExecutor
from tests import tasks
enclave, release, out = sys.argv[1:4]
ex = KottaExecutor(1, enclave=enclave, start_node=False)
assert ex.submit(tasks.square, 2).result(60) == 4  # the inbox is bound: replies reach it
fs = [ex.submit(tasks.wait_for_file, release), ex.submit(tasks.say, "hello"),
      ex.submit(tasks.raise_value_error, "boom")]
ids = [f.job_id for f in fs]
while len(ex.enclave.jobs.get_many(ids)) < len(ids):  # (a handed-off task: once recorded)
    pass
tasks.release(out, json.dumps({"client": ex.client_id, "jobs": ids}))
os.kill(os.getpid(), signal.SIGKILL)
'''


def _reply_messages(enclave_dir: Path, client: str) -> int:
    with sqlite3.connect(enclave_dir / "kotta.db") as db:
        return db.execute(
            "SELECT count(*) FROM messages WHERE queue=?", (reply_queue(client),)
        ).fetchone()[0]


@pytest.mark.parametrize("swept", [False, True], ids=["inbox-left", "inbox-swept"])
def test_a_killed_clients_jobs_end_and_their_replies_do_not_pile_up(
    start_node, enclave, enclave_dir, tmp_path, swept
):
    start_node(workers=1)
    script, release, out = tmp_path / "client.py", tmp_path / "release", tmp_path / "jobs.json"
    script.write_text(CLIENT)
    client = subprocess.run(
        [sys.executable, str(script), str(enclave_dir), str(release), str(out)],
        env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=GUARD,
    )
    assert client.returncode == -9, client.stderr
    info = json.loads(out.read_text())
    inbox = enclave._inbox_path(info["client"])
    assert inbox is not None and os.path.exists(inbox)  # a SIGKILLed client's inbox file
    if swept:  # the next client or node to bind an inbox removes it
        embedded.sweep_inboxes(os.path.dirname(inbox))
        assert not os.path.exists(inbox)
    tasks.release(release, "released")

    ex = KottaExecutor(1, enclave=enclave_dir, start_node=False)
    try:
        waiting, said, failed = (ex.attach(job_id) for job_id in info["jobs"])
        assert waiting.result(GUARD) == "released"
        assert said.result(GUARD) > 0
        assert (said.stdout, said.stderr) == ("hello out\n", "hello err\n")
        with pytest.raises(ValueError, match="boom"):
            failed.result(GUARD)
        # the node's replies for those jobs left in the step that recorded them; this
        # task's reply comes in a later step
        assert ex.submit(tasks.square, 3).result(GUARD) == 9
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    wait_for(lambda: all(r.state.final for r in enclave.jobs.get_many(info["jobs"]).values()))
    # Nobody will ever take the dead client's reply queue: a message left there for
    # each of its jobs, result and all, is there for good (results stay in the job table)
    assert _reply_messages(enclave_dir, info["client"]) == 0


def test_replies_no_client_will_take_are_removed_once_a_day_old(start_node, make_executor,
                                                                 enclave, enclave_dir):
    """An executor shut down with its tasks cancelled while queued: a node that receives
    them later drops them and tells the client, whose inbox is closed by then, so each
    reply goes on its reply queue.  Its process lives on (a notebook kernel that makes
    executor after executor), so the node queues them; nobody takes that queue any more,
    and the rows stayed in kotta.db for good, the dead clients' as much.  Nodes remove
    reply messages over a day old (SQS keeps a reply queue's that long too); younger ones
    stay, for a client that is slow to look."""
    ex = make_executor(1, start_node=False)
    fs = [ex.submit(tasks.square, i) for i in range(6)]
    wait_for(lambda: len(enclave.jobs.get_many([f.job_id for f in fs])) == len(fs),
             what="the jobs to be recorded")
    ex.shutdown(wait=True, cancel_futures=True)  # (its inbox and reply queue closed)
    assert all(f.cancelled() for f in fs)
    first = start_node(workers=1)
    wait_for(lambda: enclave.queue.depth("test") == 0 and _reply_messages(
        enclave_dir, ex.client_id) == len(fs), what="the node to drop the cancelled tasks")
    first.terminate()
    with sqlite3.connect(enclave_dir / "kotta.db") as db:  # three of them a day old
        db.execute("UPDATE messages SET sent=sent-86400-60, visible_at=visible_at-86400-60"
                   " WHERE id IN (SELECT id FROM messages WHERE queue=? ORDER BY id LIMIT 3)",
                   (reply_queue(ex.client_id),))
    start_node(workers=1)  # (its first look is at its first upkeep)
    wait_for(lambda: _reply_messages(enclave_dir, ex.client_id) == len(fs) - 3,
             what="the node to remove the old replies")


def test_a_node_outlives_a_client_stopped_inside_its_transaction(make_executor, enclave,
                                                                 enclave_dir, monkeypatch,
                                                                 caplog):
    """A client stopped (^Z, SIGSTOP) while it holds the enclave's write lock, inside the
    transaction that records a batch of its tasks: every other process waits for the lock
    until it goes on.  A node whose step could not begin its transaction within the lock
    timeout died of it, traceback and all: its running tasks killed, a `kotta up` node
    gone for good, and the client's tasks waited, once it went on, for a node that no
    longer was.  Nothing of the step was done then: a transient fault, which the node now
    rides out as it rides out others (its patience), and it serves on once the lock is
    free.  (A node in this process, stepped by the test; the lock timeout made short.)"""
    from node.daemon import Node, NodeConfig

    monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 0.2)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 7)
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    stopped = sqlite3.connect(enclave_dir / "kotta.db", isolation_level=None)
    try:
        stopped.execute("BEGIN IMMEDIATE")  # the stopped client's transaction
        with caplog.at_level(logging.WARNING, logger="kotta.node"):
            node.step()  # its look at the queue: a transaction it cannot begin
        assert ("beginning a step failed (OperationalError: the enclave database "
                f"{enclave_dir.resolve() / 'kotta.db'} is locked (database is locked)"
                in caplog.text)
        stopped.execute("ROLLBACK")  # the client goes on
        wait_for(lambda: (node.step(), f.done())[1], what="the task to run")
        assert f.result() == 49
    finally:
        if stopped.in_transaction:
            stopped.execute("ROLLBACK")
        stopped.close()
        node._stop()
