"""Reply inboxes on the embedded enclave: a node hands a client its replies in a datagram,
skipping the reply queue; the queue remains the path when there is no inbox, or a full one;
and a datagram from another user is never taken for a reply."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import tempfile

import pytest

from kotta_executor import wire
from kotta_executor.backends import embedded
from kotta_executor.backends.base import Message, reply_queue
from kotta_executor.backends.embedded import _PASSCRED, EmbeddedEnclave

from . import tasks

pytestmark = pytest.mark.skipif(not _PASSCRED, reason="inboxes need SO_PASSCRED (Linux)")


def messages_ever_sent(enclave_dir) -> int:
    """How many messages the enclave's queues have ever held (tasks and replies)."""
    with sqlite3.connect(enclave_dir / "kotta.db") as db:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchone()
    return row[0] if row else 0


def a_reply(job_id: str = "a" * 32, value=41) -> bytes:
    result = wire.encode(
        wire.result_header(job_id, wire.OK, 1), {"payload": wire.dump_outcomes([(wire.OK, value)])[0]}
    )
    return wire.pack_replies([(job_id, result)])


class EnclaveWithoutInboxes(EmbeddedEnclave):
    """A client on a platform without SO_PASSCRED (an older client behaves the same)."""

    def reply_inbox(self, client_id):
        return None


def test_replies_reach_the_client_without_the_reply_queue(start_node, make_executor, enclave_dir):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    assert [f.result(timeout=60) for f in [ex.submit(tasks.square, i) for i in range(20)]] == [
        i * i for i in range(20)
    ]
    assert messages_ever_sent(enclave_dir) == 20  # the tasks; no reply went on a queue


def test_a_client_without_an_inbox_gets_its_replies_from_the_queue(start_node, make_executor,
                                                                   enclave_dir):
    start_node(workers=1)
    ex = make_executor(1, start_node=False, enclave=EnclaveWithoutInboxes(enclave_dir))
    assert [f.result(timeout=60) for f in [ex.submit(tasks.square, i) for i in range(20)]] == [
        i * i for i in range(20)
    ]
    assert messages_ever_sent(enclave_dir) > 20  # the node fell back to the reply queue


def test_reply_direct_hands_back_what_no_inbox_took(enclave):
    msgs = [Message("a" * 32, a_reply(value=i)) for i in range(3)]
    assert enclave.reply_direct("nobody", msgs) == (msgs, False)  # no inbox: all for the queue
    inbox = enclave.reply_inbox("c1")
    assert inbox is not None
    try:
        sent, rest = 0, []
        while not rest and sent < 100_000:  # until the inbox is full (its queue length)
            rest, full = enclave.reply_direct("c1", [Message("a" * 32, a_reply(value=sent))])
            sent += not rest
        assert rest and full, "an inbox nobody reads never filled up"
        got = enclave.read_inbox(inbox)
        values = [wire.outcomes(wire.decode(wire.unpack_replies(b)[0][1]))[0][1] for b in got]
        assert values == list(range(sent))  # all of them, in order, none twice
        assert enclave.reply_direct("c1", rest) == ([], False)  # room again
    finally:
        inbox.close()


def test_too_big_a_reply_goes_to_the_queue(enclave):
    inbox = enclave.reply_inbox("c2")
    try:
        big = Message("a" * 32, b"x" * (1 << 20))
        assert enclave.reply_direct("c2", [big]) == ([big], False)
        assert enclave.read_inbox(inbox) == []
    finally:
        inbox.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="sending as another user needs root")
def test_a_datagram_from_another_user_is_dropped(enclave, monkeypatch):
    # an inbox directory of this test's own, under a directory others may enter: the
    # shared /tmp/kotta-UID, opened up here, would make every other process of this user
    # (pytest-xdist's other worker, its nodes and clients) drop their inboxes meanwhile
    own = tempfile.mkdtemp(prefix="kotta-inbox-test-", dir="/tmp")
    os.chmod(own, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", own)
    monkeypatch.setattr(embedded, "_private", (float("-inf"), None))  # look again
    inbox = enclave.reply_inbox("c3")
    address = inbox.getsockname()
    assert address.startswith(own)
    os.chmod(os.path.dirname(address), 0o755)  # let the other user reach the socket...
    os.chmod(address, 0o777)  # ...as an inbox made by a careless umask could be
    try:
        pid = os.fork()
        if pid == 0:  # another user, forging a reply
            try:
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(a_reply(value="forged"), address)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # this user
            s.sendto(a_reply(value="genuine"), address)
        got = enclave.read_inbox(inbox)
        assert [wire.outcomes(wire.decode(wire.unpack_replies(b)[0][1]))[0][1] for b in got] == [
            "genuine"
        ]
    finally:
        os.chmod(os.path.dirname(address), 0o700)
        enclave.close_inbox(inbox)
        shutil.rmtree(own, ignore_errors=True)


def test_an_inbox_lives_in_a_directory_only_its_user_enters(enclave):
    inbox = enclave.reply_inbox("c4")
    try:
        path = inbox.getsockname()
        st = os.lstat(os.path.dirname(path))
        assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), 0o700)
    finally:
        enclave.close_inbox(inbox)
    assert not os.path.exists(path)  # closed: removed, so no one finds a stale name


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_can_neither_take_over_nor_write_to_an_inbox(enclave):
    """Once a client is gone (SIGKILL leaves its socket file), another user can neither
    remove its inbox to bind the name (and receive the results of its jobs still running)
    nor write to it: the directory keeps them out, whatever the file's own mode."""
    inbox = enclave.reply_inbox("c6")
    path = inbox.getsockname()
    inbox.close()  # gone without removing its file, as a killed client
    os.chmod(path, 0o777)  # as a careless umask would leave it
    try:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setuid(65534)
                code = 0
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    try:
                        s.sendto(b"x", path)
                        code |= 1  # wrote to it
                    except PermissionError:
                        pass
                try:
                    os.unlink(path)
                    code |= 2  # could take its name over
                except PermissionError:
                    pass
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_a_node_keeps_a_busy_clients_replies_until_its_inbox_has_room(enclave):
    """A full inbox means a busy client (writing its next batch of tasks, say): the node
    keeps the replies a while and tries again at its next steps, rather than writing them
    to the reply queue (a write transaction, waiting for the lock that client may hold).
    Only when its inbox stays full, or the node stops, do they go on the queue."""
    from node.daemon import Node, NodeConfig

    node = Node(enclave, NodeConfig(queue="test", workers=1))
    inbox = enclave.reply_inbox("c7")
    try:
        filler = [Message("a" * 32, a_reply(value="filler"))]
        while not enclave.reply_direct("c7", filler)[1]:  # until the inbox is full
            pass
        node._reply("c7", [("b" * 32, wire.unpack_replies(a_reply("b" * 32, 1))[0][1])])
        node._wake_clients()
        assert enclave.queue.depth(reply_queue("c7")) == 0  # kept, not queued
        assert enclave.read_inbox(inbox)  # the client reads: room again
        node._reply("c7", [("c" * 32, wire.unpack_replies(a_reply("c" * 32, 2))[0][1])])
        node._wake_clients()
        got = [item for b in enclave.read_inbox(inbox) for item in wire.unpack_replies(b)]
        assert [job_id for job_id, _ in got] == ["b" * 32, "c" * 32]  # in order, none lost
        assert enclave.queue.depth(reply_queue("c7")) == 0

        while not enclave.reply_direct("c7", filler)[1]:  # full again, and the node stops
            pass
        node._reply("c7", [("d" * 32, wire.unpack_replies(a_reply("d" * 32, 3))[0][1])])
        node._wake_clients(final=True)
        [msg] = enclave.queue.take(reply_queue("c7"), 10)
        assert [job_id for job_id, _ in wire.unpack_replies(msg.body)] == ["d" * 32]
    finally:
        enclave.close_inbox(inbox)
        node.enclave.close()


# -- inboxes left behind -------------------------------------------------------------------


def test_sweep_removes_only_socket_files_nobody_is_bound_to(tmp_path):
    from kotta_executor.backends.embedded import sweep_inboxes

    def bound(name):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / name))
        return sock

    bound("kotta-dead").close()  # what a SIGKILL leaves: the file, no socket
    live = bound("kotta-live")
    (tmp_path / "kotta-plain").write_text("not a socket")
    bound("other-dead").close()  # not ours to judge
    try:
        assert sweep_inboxes(str(tmp_path)) == ["kotta-dead"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kotta-live", "kotta-plain", "other-dead"]
        # the live inbox still works
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"hi", str(tmp_path / "kotta-live"))
        assert live.recv(10) == b"hi"
    finally:
        live.close()


def test_a_node_killed_outright_leaves_an_inbox_the_next_node_removes(start_node, enclave):
    import signal

    a = start_node(workers=1)
    left = enclave._inbox_path(f"node-{a.node_id}")
    assert os.path.exists(left)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(60)
    assert os.path.exists(left)  # nobody removed it
    b = start_node(workers=1)  # a new process: it sweeps as it binds its first inbox
    assert not os.path.exists(left)
    assert os.path.exists(enclave._inbox_path(f"node-{b.node_id}"))


def test_a_stopped_clients_unread_replies_do_not_fill_other_clients_inboxes(enclave):
    """Datagrams an inbox has not read count against the buffer of the socket that sent
    them.  A node sent every reply from one socket: a client stopped (^Z) with a few big
    replies unread filled that buffer, and every other client's inbox looked full, so
    each of their replies waited HOLD_REPLIES and went by the reply queue for as long as
    that client stayed stopped.  Another client's replies still reach its inbox."""
    from node.daemon import Node, NodeConfig

    node = Node(enclave, NodeConfig(queue="test", workers=1))
    stopped = [enclave.reply_inbox(f"stopped{i}") for i in range(3)]
    inbox = enclave.reply_inbox("healthy")
    try:
        big = [Message("a" * 32, b"x" * 400_000)]
        for i in range(3):
            while not enclave.reply_direct(f"stopped{i}", big)[0]:  # until it takes no more
                pass
        node._reply("healthy", [("b" * 32, wire.unpack_replies(a_reply("b" * 32, 1))[0][1])])
        node._wake_clients()
        got = [item for b in enclave.read_inbox(inbox) for item in wire.unpack_replies(b)]
        assert [job_id for job_id, _ in got] == ["b" * 32]
        assert enclave.queue.depth(reply_queue("healthy")) == 0
    finally:
        for sock in [*stopped, inbox]:
            enclave.close_inbox(sock)
        node.enclave.close()


def test_a_directory_not_private_is_warned_about_once(tmp_path, monkeypatch, caplog):
    """/tmp/kotta-UID that is not this user's private directory (0755 here): replies go
    by queue, and the log says why.  It said so again at every look (each 10 s) for as
    long as a node or client ran: a notebook showed the warning every 10 s."""
    (tmp_path / f"kotta-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"kotta-{os.getuid()}", 0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for _ in range(3):
        monkeypatch.setattr(embedded, "_private", (-60.0, None))  # as if 10 s had passed
        with caplog.at_level("WARNING", logger="kotta.embedded"):
            assert embedded._private_dir() is None
    assert [r.getMessage() for r in caplog.records].count(
        f"{tmp_path / f'kotta-{os.getuid()}'} is not a directory private to this user: "
        f"replies go by queue") == 1
