"""Hunt: max_tasks_per_child (commit 52917c1), with real nodes and workers."""

from __future__ import annotations

import os
import time

from tests import tasks
from tests.conftest import GUARD


def test_a_limited_task_is_not_overtaken_forever_by_later_tasks(make_executor, start_node):
    """One worker, kept busy by tasks piped behind each other: a task whose limit its
    worker has reached waits for that worker to be idle, to be replaced.  Tasks that
    arrive after it must not keep filling the worker's pipe ahead of it (as they would
    not for a task of another owner, or one that must run alone): ProcessPoolExecutor
    runs work items in order."""
    start_node(workers=1)
    busy = make_executor(1, start_node=False)
    limited = make_executor(1, start_node=False, max_tasks_per_child=1)
    assert busy.submit(os.getpid).result(GUARD)  # the worker has run a task
    done: dict[str, float] = {}
    head = [busy.submit(tasks.sleep_and_return, 0.1, i) for i in range(8)]
    time.sleep(0.3)  # (running, the rest piped or pending)
    f = limited.submit(os.getpid)
    f.add_done_callback(lambda _: done.setdefault("limited", time.monotonic()))
    tail = [busy.submit(tasks.sleep_and_return, 0.1, i) for i in range(40)]
    for t in head + tail:
        t.result(GUARD)
    f.result(GUARD)
    last = time.monotonic()
    # in order, it runs before the tail (4 s of it); overtaken, only after all of it
    assert last - done["limited"] > 2.0, "the limited task ran only after every later task"
