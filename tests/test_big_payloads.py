"""Big arguments and results (hundreds of MB) end to end, on the embedded enclave with a
real node and real workers: what arrives, and how much memory each process holds for it.

Memory is read as each process's peak RSS (``VmHWM``, which no sampling can miss), and
asserted on with wide margins only: a payload held three or four times, where once or
twice will do, is what these tests are about, not a few megabytes.
"""

from __future__ import annotations

import os
import tracemalloc

import psutil
import pytest

from tests import tasks
from tests.conftest import GUARD, wait_for

MB = 1 << 20
#: the size of the payloads: big enough that the copies of it stand out from the
#: interpreter's own memory, small enough for a shared machine
SIZE = 256 * MB


def _peak_rss(pid: int) -> int:
    """A live process's peak resident set size, in bytes (Linux: VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _base_rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_the_node_holds_a_big_argument_no_more_than_twice(start_node, make_executor):
    """A task's big argument (a blob the node fetches, then writes down its worker's pipe)
    was held three times by the node as it handed the task over: the task's bytes, a
    frame joined from them, and a copy of the frame waiting for the pipe; 256 MB made the
    node's RSS 800 MB.  Now the pipe is written from the task's own bytes."""
    node = start_node()
    ex = make_executor(1, start_node=False)
    base = _base_rss(node.pid)
    data = os.urandom(SIZE)
    assert ex.submit(len, data).result(GUARD) == SIZE
    del data
    # fetching the blob holds it and the task rebuilt around it a moment: twice
    assert _peak_rss(node.pid) - base < 2.5 * SIZE, node.output()


def test_a_worker_holds_a_big_argument_no_more_than_twice(start_node, make_executor):
    """A worker held a task's big argument four times while the call ran: the frame the
    node wrote, a copy of each task in it, a copy of the task's ``args`` section, and the
    argument unpickled; 256 MB made its RSS over 1 GB, all of it counted against the
    task's memory limit.  Now the frame and the argument: the sections are views of the
    frame."""
    node = start_node()
    ex = make_executor(1, start_node=False)
    data = os.urandom(SIZE)
    assert ex.submit(len, data).result(GUARD) == SIZE
    del data
    (worker,) = node.worker_pids()  # (warm: it waits for the next task)
    assert _peak_rss(worker) < 2.5 * SIZE


def test_big_arguments_of_many_kinds_arrive_intact(start_node, make_executor):
    """Bytes, a bytearray, a dict of many arrays, and keyword arguments, each big enough
    to travel as a blob, arrive as they were sent (the worker reads them from views of
    what the node wrote)."""
    np = pytest.importorskip("numpy")
    start_node()
    ex = make_executor(1, start_node=False)
    rng = np.random.default_rng(7)
    arrays = {f"a{i}": rng.random(200_000) for i in range(20)}  # 32 MB in all
    blob = os.urandom(8 * MB)
    got = ex.submit(tasks.echo_args, arrays, bytearray(blob), key=blob).result(GUARD)
    (arrays2, blob2), kwargs = got
    assert arrays2.keys() == arrays.keys()
    assert all(np.array_equal(arrays2[k], arrays[k]) for k in arrays)
    assert type(blob2) is bytearray and blob2 == blob
    assert kwargs == {"key": blob}


def test_a_big_exception_is_summarised_without_copies_of_its_text(start_node, make_executor):
    """A task that raised an exception holding 64 MB (its message their repr, some 230 MB
    of text) had its worker reach 1 GB: the job's reason, 500 characters of that text, was
    cut from copies of all of it (encoded, and decoded again).  Now from its first 500
    characters; the client gets the exception whole."""
    node = start_node()
    ex = make_executor(1, start_node=False)
    n = 64 * MB
    f = ex.submit(tasks.raise_big_value_error, n)
    exc = f.exception(GUARD)
    assert type(exc) is ValueError and len(exc.args[0]) == n
    (worker,) = node.worker_pids()
    # the bytes, their pickle and their repr (3.5 characters a byte) are what it needs
    assert _peak_rss(worker) < 9 * n
    reason = ex._enclave.jobs.get(f.job_id).reason
    assert reason.startswith("ValueError: b'") and len(reason) == 500


def test_the_node_holds_a_big_result_of_a_long_task_no_more_than_twice(
        start_node, make_executor, enclave, tmp_path):
    """The result of a task the node sampled (one that ran a while) gets the samples in
    its header: the node decoded it (a copy of the payload) and framed it anew (another),
    the result as the worker sent it still held: with the copy read from the pipe, a
    result of 256 MB took the node to over 1 GB.  Now only the header is rewritten."""
    node = start_node("--sample-interval", "1")
    ex = make_executor(1, start_node=False)
    release = tmp_path / "release"
    f = ex.submit(tasks.random_bytes_once_released, str(release), SIZE)
    wait_for(lambda: ((r := enclave.jobs.get(f.job_id)) and r.usage or {}).get("samples"),
             what="the task to be sampled")
    base = _base_rss(node.pid)
    release.touch()
    assert len(f.result(GUARD)) == SIZE
    assert f.usage()["samples"]
    # what the worker wrote is read into a buffer, and copied out of it: twice
    assert _peak_rss(node.pid) - base < 2.5 * SIZE, node.output()


def test_the_client_reads_a_big_result_holding_it_no_more_than_twice(start_node,
                                                                     make_executor):
    """A big result was held four times by the client as it was read: the blob, a copy
    of its payload section, a copy of the call's pickle out of the payload (a list of
    pickles), and the value; 128 MB took 512 MB.  Now the blob and the value: the
    payload and the pickles in it are read through views of the blob."""
    start_node()
    ex = make_executor(1, start_node=False)
    assert ex.submit(len, b"").result(GUARD) == 0  # (the executor's own start, not traced)
    size = SIZE // 2
    tracemalloc.start()
    try:
        value = ex.submit(os.urandom, size).result(GUARD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(value) == size
    assert peak < 2.5 * size


def test_a_batch_of_big_results_arrives_intact(start_node, make_executor):
    """map() items packed in one task, whose results are big, each come back whole and in
    order, and an item that raised raises in its place (the task's payload, a pickle of
    each call's outcome, read through views)."""
    start_node()
    ex = make_executor(1, start_node=False)
    sizes = [3 * MB, 0, 2 * MB + 1, -1, 5 * MB]
    results = ex.map(tasks.bytes_or_raise, sizes, chunksize=len(sizes), timeout=GUARD)
    assert [len(next(results)) for _ in range(3)] == sizes[:3]
    with pytest.raises(ValueError, match="no bytes for -1"):
        next(results)


def _counting(data: bytes):
    """A closure over ``data``: pickled by value, ``data`` with it (the task's ``fn``)."""
    return lambda: len(data)


def test_a_worker_keeps_no_big_function_after_its_task(start_node, make_executor):
    """A warm worker keeps the functions it unpickled (by their pickled bytes) for the next
    task of the same function; a closure over a big value (a lambda over an array, in a
    loop) was kept with it, its pickle too, up to 64 of them: three closures over 64 MB
    each left the worker holding 400 MB between tasks, counted against the memory limit of
    every task after.  A big function is no longer kept."""
    node = start_node()
    ex = make_executor(1, start_node=False)
    n = SIZE // 4
    for _ in range(3):
        assert ex.submit(_counting(os.urandom(n))).result(GUARD) == n
    (worker,) = node.worker_pids()
    assert _base_rss(worker) < 2 * n


def test_the_client_keeps_no_pickle_of_a_big_function(start_node, make_executor):
    """The client reuses the pickled bytes of a function sent by value while nothing it
    captured could have changed; a closure over a big value (bytes) had its pickle kept
    for as long as the function lived (a notebook's function: for good), a copy of the
    value the client no longer needed.  A big pickle is no longer kept."""
    start_node()
    ex = make_executor(1, start_node=False)
    n = SIZE // 4
    fn = _counting(os.urandom(n))
    tracemalloc.start()
    try:
        for _ in range(2):  # (the second pickle confirms the first: then it was kept)
            assert ex.submit(fn).result(GUARD) == n
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < n // 2


def test_a_client_reading_many_big_results_at_once_holds_each_until_it_is_settled(
        start_node, make_executor):
    """Results read together (a client attaching to a finished sweep, replies that came
    together) were all held, as read, until the last of them was settled: with their
    values, every result twice (four of 32 MB: 256 MB).  Each read result now goes as
    its future is settled."""
    start_node()
    ex = make_executor(1, start_node=False)
    n = 32 * MB
    fs = [ex.submit(os.urandom, n) for _ in range(4)]
    ids = [f.job_id for f in fs]
    assert all(len(f.result(GUARD)) == n for f in fs)
    del fs
    other = make_executor(1, start_node=False)
    assert other.submit(len, b"").result(GUARD) == 0  # (its manager runs: not traced)
    tracemalloc.start()
    try:
        # (read by the manager in one batch, or two: the first may be read alone)
        attached = [other.attach(job_id) for job_id in ids]
        values = [f.result(GUARD) for f in attached]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [len(v) for v in values] == [n] * 4
    # read in one batch: 5 n now, 8 n before (7 n, the first read alone)
    assert peak < 6 * n
