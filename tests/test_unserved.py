"""Jobs on a queue that no live node serves: the client says so, instead of waiting silently.

``result()``, ``shutdown(wait=True)`` and interpreter exit wait for every job, as long as it
takes (the jobs are queued, durably, for whichever node comes).  With ``start_node=False``
and no node, or every node of a queue dead, that wait used to be silent.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from kotta_executor import executor as executor_module
from tests import tasks
from tests.conftest import GUARD


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
    make_executor, start_node, executor_log
):
    ex = make_executor(1, start_node=False)
    futures = [ex.submit(tasks.add, i, 1) for i in range(3)]
    assert executor_log.event.wait(GUARD), executor_log.messages
    [warning] = [m for m in executor_log.messages if "no live node serves" in m]
    assert warning.startswith("kotta: 3 jobs of queue 'test' have waited ")
    assert "`kotta up --queue test`" in warning
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
        release.write_text("go")
    assert blocker.result(timeout=GUARD) == "go"
    assert [f.result(timeout=GUARD) for f in behind] == [10, 11, 12]
    assert prod.cancel()  # no node for production: it never ran, and now never will
