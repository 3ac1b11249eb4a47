"""Jobs on a queue that no live node serves: the client says so, instead of waiting silently.

``result()``, ``shutdown(wait=True)`` and interpreter exit wait for every job, as long as it
takes (the jobs are queued, durably, for whichever node comes).  With ``start_node=False``
and no node, or every node of a queue dead, that wait used to be silent.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

from kotta_executor import KottaExecutor
from kotta_executor import executor as executor_module
from tests import tasks
from tests.conftest import GUARD, wait_for


class _Log(logging.Handler):
    """The executor's log messages; ``event`` is set by the first that contains ``wanted``."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted = wanted
        self.messages: list[str] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.messages.append(msg)
        if self.wanted in msg:
            self.event.set()


@pytest.fixture
def executor_log(monkeypatch):
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 0.05)  # look often
    monkeypatch.setattr(executor_module, "UNSERVED_WARN", 0.3)
    handler = _Log("no live node serves")
    logger = logging.getLogger("kotta.executor")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_jobs_no_node_serves_are_named_in_a_warning_and_run_once_a_node_comes(
    make_executor, start_node, executor_log, enclave_dir
):
    ex = make_executor(1, start_node=False)
    futures = [ex.submit(tasks.add, i, 1) for i in range(3)]
    assert executor_log.event.wait(GUARD), executor_log.messages
    [warning] = [m for m in executor_log.messages if "no live node serves" in m]
    assert warning.startswith("kotta: 3 jobs of queue 'test' have waited ")
    # not the default enclave ($KOTTA_HOME): the command names it (`kotta up --queue test`
    # started a node of another enclave, and the jobs waited on)
    assert f"`kotta up --enclave embedded://{enclave_dir.resolve()} --queue test`" in warning
    assert not any(f.done() for f in futures)
    assert {f.status() for f in futures} == {"pending"}
    # warned once: later looks at the same jobs say nothing more
    looks = executor_module.KottaExecutor._watch_unserved
    seen = threading.Event()
    calls = []

    def counting(self, pending, now):
        calls.append(dict(pending))
        looks(self, pending, now)
        if len(calls) >= 3:
            seen.set()

    ex._watch_unserved = counting.__get__(ex)
    assert seen.wait(GUARD)
    assert len([m for m in executor_log.messages if "no live node serves" in m]) == 1
    # nothing was lost: a node that starts now runs them all
    start_node(workers=1)
    assert [f.result(timeout=GUARD) for f in futures] == [1, 2, 3]


def test_the_warning_of_the_default_enclave_names_none(executor_log):
    ex = KottaExecutor(1, start_node=False)  # $KOTTA_HOME's, as `kotta up` opens
    try:
        f = ex.submit(tasks.add, 1, 1)
        assert executor_log.event.wait(GUARD), executor_log.messages
        [warning] = [m for m in executor_log.messages if "no live node serves" in m]
        assert "(start one with `kotta up --queue test`," in warning
        assert f.cancel()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_a_busy_node_is_not_taken_for_a_missing_one(make_executor, start_node, executor_log,
                                                    tmp_path: Path):
    start_node(workers=1, queue="test")
    ex = make_executor(1, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    blocker = ex.submit(tasks.touch_then_wait, str(started), str(release))
    # pending behind the blocker (the node may pipe one of them behind it: "processing")
    behind = [ex.submit(tasks.add, i, 10) for i in range(3)]
    try:
        # jobs of a queue no node serves, submitted after: by the time they are warned
        # of, the ones behind the blocker have waited longer, in a served queue
        prod = ex.with_options(queue="production").submit(tasks.add, 1, 1)
        assert executor_log.event.wait(GUARD), executor_log.messages
        [warning] = [m for m in executor_log.messages if "no live node serves" in m]
        assert "1 job of queue 'production' has waited " in warning
        assert [f.status() for f in behind].count("pending") >= 2
        assert not any("'test'" in m for m in executor_log.messages)
    finally:
        tasks.release(release, "go")
    assert blocker.result(timeout=GUARD) == "go"
    assert [f.result(timeout=GUARD) for f in behind] == [10, 11, 12]
    assert prod.cancel()  # no node for production: it never ran, and now never will


def test_jobs_on_an_unserved_queue_are_warned_of_while_an_attached_future_is_outstanding(
        make_executor, start_node, executor_log, monkeypatch, tmp_path):
    """Found by review: the attached futures are looked at every ATTACH_POLL, between the
    rounds over all futures, and such a look used to restart every other queue's clock."""
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 0.5)
    monkeypatch.setattr(executor_module, "ATTACH_POLL", 0.05)
    monkeypatch.setattr(executor_module, "UNSERVED_WARN", 1.0)
    start_node(workers=1, queue="test")
    ex1 = make_executor(1, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    blocker = ex1.submit(tasks.touch_then_wait, str(started), str(release))
    try:
        wait_for(started.exists, what="the blocker to begin")
        ex2 = make_executor(1, start_node=False)
        attached = ex2.attach(blocker.job_id)  # a job of an earlier kernel, say
        prod = ex2.with_options(queue="production").submit(tasks.add, 1, 1)
        assert executor_log.event.wait(GUARD), executor_log.messages
        assert not attached.done()
        [warning] = [m for m in executor_log.messages if "no live node serves" in m]
        assert "1 job of queue 'production' has waited " in warning
    finally:
        tasks.release(release, "go")
    assert blocker.result(GUARD) == "go"
    assert attached.result(GUARD) == "go"
    assert prod.cancel()


def test_a_failing_look_at_the_nodes_does_not_break_the_executor(
        make_executor, start_node, executor_log, monkeypatch):
    """Found by review: the look is a diagnostic; on AWS it is a Scan of the nodes table,
    which a throttled or least-privilege client may be refused.  It used to escape the
    manager thread, and every future failed with BrokenEnclave."""
    ex = make_executor(1, start_node=False)
    real = ex._enclave.nodes.live
    failed = threading.Event()

    def flaky(queue=None):
        # only the warning's look (the embedded doorbell looks too, as before)
        if sys._getframe(1).f_code.co_name == "_watch_unserved" and not failed.is_set():
            failed.set()
            raise OSError("transient: the nodes table could not be read")
        return real(queue)

    monkeypatch.setattr(ex._enclave.nodes, "live", flaky)
    f = ex.submit(tasks.add, 1, 1)
    assert failed.wait(GUARD)
    assert executor_log.event.wait(GUARD), executor_log.messages  # a later look warns
    start_node(workers=1, queue="test")
    assert f.result(GUARD) == 2
    # and it says when the wait is over (a node seen, or no job of the queue pending)
    wait_for(lambda: any(m in executor_log.messages for m in (
        "kotta: a node serves queue 'test' now; its jobs run",
        "kotta: no job of queue 'test' waits for a node any more")),
        what="the all-clear")
