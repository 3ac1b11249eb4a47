"""The worker's result frame: what a node records of a task, ahead of the result envelope
the client reads (node.worker.result_head / unpack_result), so that a node parses no JSON
per task.  Any bytes a broken worker might send are refused with ValueError, never taken."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import wire
from node.worker import result_head, unpack_result

FAST = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
JOB_ID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"

finite = st.floats(allow_nan=False, allow_infinity=False)
usages = st.fixed_dictionaries({
    "start": finite, "end": finite, "wall": finite, "cpu": finite,
    "maxrss_kb": st.integers(0, 2**62), "peak_rss_kb": st.integers(0, 2**62),
})
reasons = st.none() | st.text(min_size=1, max_size=600)


def envelope(stdout: bytes = b"") -> bytes:
    return wire.encode(wire.result_header(JOB_ID, wire.OK, 1), {"stdout": stdout})


@FAST
@given(st.booleans(), usages, reasons, st.binary(max_size=64))
def test_round_trip(failed: bool, usage: dict, reason: str | None, stdout: bytes) -> None:
    env = envelope(stdout)
    got = unpack_result(result_head(JOB_ID, failed, usage, reason) + env, JOB_ID)
    assert got == (failed, usage, reason, env)
    assert all(type(got[1][k]) is type(usage[k]) for k in usage)


def test_a_reason_that_is_not_utf8_clean_arrives_replaced() -> None:
    usage = dict.fromkeys(("start", "end", "wall", "cpu"), 0.0) | {"maxrss_kb": 1, "peak_rss_kb": 1}
    _, _, reason, _ = unpack_result(
        result_head(JOB_ID, True, usage, "bad \udcff byte") + envelope(), JOB_ID)
    assert reason == "bad ? byte"


@FAST
@given(st.binary(max_size=200))
def test_garbage_raises_value_error_only(data: bytes) -> None:
    try:
        failed, usage, reason, env = unpack_result(data, JOB_ID)
    except ValueError as exc:
        assert str(exc)
    else:  # only what carries an envelope after a well-formed head is taken
        assert env.startswith(wire.MAGIC)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "0 bytes is too short"),
     (result_head(JOB_ID, False, dict.fromkeys(("start", "end", "wall", "cpu"), 0.0)
                  | {"maxrss_kb": 0, "peak_rss_kb": 0}, None) + b"junk", "no result envelope"),
     (bytes(100), "the result of job '\\\\x00")],
)
def test_what_a_node_is_told(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_result(data, JOB_ID)


# ------------------------------------------------------------------ the node's read of a pipe


def _pipe_worker():
    """A node-side Worker around a real pipe, written to as a worker writes (Connection)."""
    import os
    from multiprocessing.connection import Connection

    from node.pool import Worker

    r, w = os.pipe()
    os.set_blocking(r, False)
    worker = Worker("alice", None, None, Connection(r, writable=False), None, None)
    return worker, Connection(w, readable=False)


def test_read_results_takes_every_whole_message_and_keeps_the_rest():
    import threading

    worker, conn = _pipe_worker()
    try:
        assert worker.read_results() == ([], False)
        conn.send_bytes(b"")  # READY
        conn.send_bytes(b"\x00one")  # (a message begins as a head does)
        conn.send_bytes(b"\x01two")
        assert worker.read_results() == ([b"", b"\x00one", b"\x01two"], False)
        # a message bigger than the pipe arrives in parts: nothing until it is whole
        big = bytes(range(256)) * 40_000  # 10 MB, beginning with 0
        writer = threading.Thread(target=conn.send_bytes, args=(big,))
        writer.start()
        got: list[bytes] = []
        while not got:
            got, eof = worker.read_results()
            assert not eof
        writer.join()
        assert got == [big] and not worker.inbox
        conn.send_bytes(b"KOTTA, last")
        conn.close()
        assert worker.read_results() == ([b"KOTTA, last"], True)
    finally:
        worker.results.close()


def test_read_results_of_a_message_cut_short_by_the_worker_dying():
    import os
    import struct

    worker, conn = _pipe_worker()
    try:
        os.write(conn.fileno(), struct.pack("!i", 100) + b"only part")
        conn.close()
        assert worker.read_results() == ([], True)
    finally:
        worker.results.close()


def test_read_results_stops_at_what_cannot_be_a_message():
    import os
    import struct

    worker, conn = _pipe_worker()
    try:
        conn.send_bytes(b"\x01whole")
        os.write(conn.fileno(), struct.pack("!i", -5) + b"junk")
        conn.send_bytes(b"\x01after")
        assert worker.read_results() == ([b"\x01whole"], False)
        assert worker.garbled and not worker.inbox
        conn.send_bytes(b"\x01more")  # nothing more is kept: the node ends such a worker
        assert worker.read_results() == ([], False) and not worker.inbox
    finally:
        conn.close()
        worker.results.close()


# ------------------------------------------------------------------ what a user sees


#: a file name that is not UTF-8, as os.listdir gives it: neither JSON nor UTF-8 holds it
NOT_UTF8 = "no such file: caf\udce9.csv"


def _executor(enclave_dir):
    from kotta_executor import KottaExecutor

    return KottaExecutor(1, enclave=enclave_dir, start_node=False)


def _close(ex):
    for f in list(ex._futures.values()):
        if not f.done():
            f.kill()
    ex.shutdown(wait=False, cancel_futures=True)


def test_an_exception_whose_message_is_not_utf8_comes_back_as_itself(start_node, enclave_dir):
    """Its summary heads the result envelope: written as JSON that parses, the exception
    arrives (it was WorkerDied, "the worker sent an invalid result", before)."""
    from tests import tasks
    from tests.conftest import GUARD

    start_node(workers=1)
    ex = _executor(enclave_dir)
    try:
        f = ex.submit(tasks.raise_value_error, NOT_UTF8)
        exc = f.exception(GUARD)
        assert type(exc) is ValueError and exc.args == (NOT_UTF8,)
        job = ex.enclave.jobs.get(f.job_id)
        assert job.state == "failed"
        assert job.reason == "ValueError: no such file: caf\\udce9.csv"  # spelled out
    finally:
        _close(ex)


def test_a_long_task_whose_message_is_not_utf8_leaves_the_node_running(
    start_node, enclave_dir, tmp_path
):
    """A long task's result is the one the node parses (to add its usage samples)."""
    from tests import tasks
    from tests.conftest import GUARD, wait_for

    node = start_node("--sample-interval", "1", workers=1)
    ex = _executor(enclave_dir)
    try:
        go = tmp_path / "go"
        f = ex.submit(tasks.raise_once_file_exists, str(go), NOT_UTF8)
        def sampled() -> bool:
            job = ex.enclave.jobs.get(f.job_id)  # (None until recorded)
            return bool(job is not None and (job.usage or {}).get("samples"))

        wait_for(sampled, what="the node to sample the task")
        go.touch()
        exc = f.exception(GUARD)
        assert type(exc) is ValueError and exc.args == (NOT_UTF8,)
        assert f.usage()["samples"]  # the node parsed the result, and added them
        assert ex.submit(tasks.square, 4).result(GUARD) == 16
        assert node.proc.poll() is None
    finally:
        _close(ex)


def test_a_bare_result_envelope_from_an_earlier_worker_is_still_read():
    """Workers of the kotta-executor before this head existed (a requirements venv that
    installs another kotta-executor runs those) send the envelope alone."""
    usage = {"start": 1.0, "end": 2.0, "wall": 1.0, "cpu": 0.5, "maxrss_kb": 10, "peak_rss_kb": 10}
    for failed, reason in ((0, None), (1, "ValueError: x")):
        header = wire.result_header(JOB_ID, wire.OK, 1, failed=failed, usage=usage)
        if reason:
            header["reason"] = reason
        bare = wire.encode(header, {"payload": b"p", "stdout": b"", "stderr": b""})
        assert unpack_result(bare, JOB_ID) == (bool(failed), usage, reason, bare)
        with pytest.raises(ValueError, match=f"not of the task the worker was running \\({OTHER}"):
            unpack_result(bare, OTHER)
    with pytest.raises(ValueError, match="not JSON"):
        unpack_result(wire.MAGIC + b"\x02" + bytes([0, 0, 0, 2]) + b"{!", JOB_ID)


def test_a_result_bigger_than_the_pipe_arrives_whole(start_node, enclave_dir):
    """Written in two parts (head, then the envelope), read in many: 24 MB and the small
    results after it, in order."""
    from tests import tasks
    from tests.conftest import GUARD

    start_node(workers=1)
    ex = _executor(enclave_dir)
    try:
        fs = [ex.submit(bytes, 24_000_000), ex.submit(tasks.square, 3), ex.submit(bytes, 70_000)]
        assert fs[0].result(GUARD) == bytes(24_000_000)
        assert fs[1].result(GUARD) == 9
        assert fs[2].result(GUARD) == bytes(70_000)  # just over the size written joined
    finally:
        _close(ex)


def test_sending_a_big_result_costs_its_worker_one_copy_of_it(start_node, enclave_dir):
    """The value, and its pickle: nothing more (the list pickle and the envelope are
    written around it, piece by piece).  It used to need two more copies, which count
    against the task's memory limit."""
    import operator

    from tests import tasks
    from tests.conftest import GUARD

    size = 200 * 1024 * 1024
    start_node(workers=1)
    ex = _executor(enclave_dir)
    try:
        base = ex.submit(tasks.square, 3)
        assert base.result(GUARD) == 9
        f = ex.submit(operator.mul, b"x", size)  # (not bytes(size): calloc'd pages, unread)
        assert f.result(GUARD) == b"x" * size
        # the worker's own peak (ru_maxrss), over what it had before: 2 copies, not 4
        grew_kb = f.usage()["peak_rss_kb"] - base.usage()["maxrss_kb"]
        assert grew_kb < 2.5 * size / 1024, f"{grew_kb / 1024:.0f} MB for a {size >> 20} MB result"
    finally:
        _close(ex)


def test_read_results_takes_text_for_garbage():
    """Text reads as a plausible length (b"oops" is 1.8 GB): the byte after it, which
    would begin the message, tells it is not one."""
    worker, conn = _pipe_worker()
    try:
        import os

        os.write(conn.fileno(), b"oops, wrong descriptor\n")
        conn.send_bytes(b"after")
        assert worker.read_results() == ([], False)
        assert worker.garbled and not worker.inbox
    finally:
        conn.close()
        worker.results.close()


@pytest.mark.parametrize("junk", [b"abc\n", b"\x00\x00\x01", b"x"])
def test_read_results_takes_a_few_bytes_before_a_result_for_garbage(junk):
    """A few bytes a task wrote on the pipe read as a length, and the first byte of the
    worker's own frame (its length's high byte, 0) as a head's: the node waited for a
    message of gigabytes that never came, and the task, done, ran on to its walltime.  A
    head carries its task's job id: it is not there, and the worker is garbled."""
    import os

    from node.pool import Task
    from node.worker import result_head

    worker, conn = _pipe_worker()
    worker.inflight.append(Task(None, {"job_id": JOB_ID, "owner": "alice"}, b""))
    usage = {"start": 0.0, "end": 0.0, "wall": 0.0, "cpu": 0.0, "maxrss_kb": 0, "peak_rss_kb": 0}
    try:
        os.write(conn.fileno(), junk)
        conn.send_bytes(result_head(JOB_ID, False, usage, None) + envelope())
        assert worker.read_results() == ([], False)
        assert worker.garbled and not worker.inbox
    finally:
        conn.close()
        worker.results.close()


def test_read_results_takes_the_result_of_the_task_it_waits_for():
    """The job-id check takes a head that is whole, and waits for one that is not yet."""
    import os

    from node.pool import Task
    from node.worker import CONN_LEN, result_head

    worker, conn = _pipe_worker()
    worker.inflight.append(Task(None, {"job_id": JOB_ID, "owner": "alice"}, b""))
    usage = {"start": 0.0, "end": 0.0, "wall": 0.0, "cpu": 0.0, "maxrss_kb": 0, "peak_rss_kb": 0}
    message = result_head(JOB_ID, False, usage, None) + envelope()
    try:
        os.write(conn.fileno(), CONN_LEN.pack(len(message)) + message[:10])  # a head in part
        assert worker.read_results() == ([], False) and not worker.garbled
        os.write(conn.fileno(), message[10:])
        assert worker.read_results() == ([message], False) and not worker.garbled
    finally:
        conn.close()
        worker.results.close()


def test_a_task_that_writes_a_few_bytes_on_the_result_pipe_fails_at_once(start_node,
                                                                         enclave_dir):
    """It used to run on to its walltime (WalltimeExceeded, the worker stuck meanwhile):
    the node waited for a message of 1.6 GB.  The worker is ended and the task fails as
    one whose worker wrote garbage; the next task runs on a new worker."""
    import datetime as _dt

    from kotta_executor import WorkerDied
    from tests import tasks
    from tests.conftest import GUARD

    start_node(workers=1)
    ex = _executor(enclave_dir)
    try:
        assert ex.submit(tasks.square, 2).result(GUARD) == 4
        f = ex.with_options(walltime=_dt.timedelta(seconds=GUARD)).submit(
            tasks.write_on_the_result_pipe, 7)
        exc = f.exception(GUARD / 2)
        assert type(exc) is WorkerDied and "result pipe" in str(exc), exc
        assert ex.submit(tasks.square, 3).result(GUARD) == 9
    finally:
        _close(ex)


@pytest.mark.parametrize("junk", [b"\x00garbag", b"garbage"], ids=["result-like", "garbled"])
def test_a_result_is_never_taken_for_another_tasks(start_node, enclave_dir, junk):
    """A task writes a framed message on its worker's result pipe while tasks wait in the
    pipe behind it: the message is refused (as an invalid result, or as not a message), and
    so is anything the worker sends after it; results before it count; the tasks behind it
    run again on a new worker.  None gets another's value."""
    from kotta_executor import WorkerDied
    from tests import tasks
    from tests.conftest import GUARD

    start_node(workers=1)
    ex = _executor(enclave_dir)
    try:
        assert ex.submit(tasks.square, 2).result(GUARD) == 4  # a warm worker, tiny tasks
        blocker = ex.submit(tasks.sleep_and_return, 1.0, "slept")  # a backlog behind it
        fs = [ex.submit(tasks.forge_first, i, junk) for i in range(12)]  # piped, in turn
        assert blocker.result(GUARD) == "slept"
        assert type(fs[0].exception(GUARD)) is WorkerDied
        assert [f.result(GUARD) for f in fs[1:]] == [i * i for i in range(1, 12)]
    finally:
        _close(ex)


def test_a_task_that_closes_the_result_pipe_does_not_hold_up_the_node(start_node, enclave_dir):
    from kotta_executor import WorkerDied
    from tests import tasks
    from tests.conftest import GUARD

    start_node(workers=2)
    ex = _executor(enclave_dir)
    try:
        assert ex.submit(tasks.square, 2).result(GUARD) == 4
        closer = ex.submit(tasks.close_the_result_pipe_and_sleep, 120)
        exc = closer.exception(GUARD)  # ended by the node, not at its end in 120 s
        assert type(exc) is WorkerDied and "result pipe was closed" in str(exc)
        assert ex.submit(tasks.square, 3).result(GUARD) == 9
    finally:
        _close(ex)
