"""The worker's result frame: what a node records of a task, ahead of the result envelope
the client reads (node.worker.pack_result / unpack_result), so that a node parses no JSON
per task.  Any bytes a broken worker might send are refused with ValueError, never taken."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import wire
from node.worker import pack_result, unpack_result

FAST = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
JOB_ID = "0123456789abcdef0123456789abcdef"

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
    got = unpack_result(pack_result(failed, usage, reason, env))
    assert got == (failed, usage, reason, env)
    assert all(type(got[1][k]) is type(usage[k]) for k in usage)


def test_a_reason_that_is_not_utf8_clean_arrives_replaced() -> None:
    usage = dict.fromkeys(("start", "end", "wall", "cpu"), 0.0) | {"maxrss_kb": 1, "peak_rss_kb": 1}
    _, _, reason, _ = unpack_result(pack_result(True, usage, "bad \udcff byte", envelope()))
    assert reason == "bad ? byte"


@FAST
@given(st.binary(max_size=200))
def test_garbage_raises_value_error_only(data: bytes) -> None:
    try:
        failed, usage, reason, env = unpack_result(data)
    except ValueError as exc:
        assert str(exc)
    else:  # only what carries an envelope after a well-formed head is taken
        assert env.startswith(wire.MAGIC)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "0 bytes is too short"), (bytes(100), "no result envelope")],
)
def test_what_a_node_is_told(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_result(data)


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
        conn.send_bytes(b"one")
        conn.send_bytes(b"two")
        assert worker.read_results() == ([b"", b"one", b"two"], False)
        # a message bigger than the pipe arrives in parts: nothing until it is whole
        big = bytes(range(256)) * 40_000  # 10 MB
        writer = threading.Thread(target=conn.send_bytes, args=(big,))
        writer.start()
        got: list[bytes] = []
        while not got:
            got, eof = worker.read_results()
            assert not eof
        writer.join()
        assert got == [big] and not worker.inbox
        conn.send_bytes(b"last")
        conn.close()
        assert worker.read_results() == ([b"last"], True)
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
