"""Tasks across several nodes of one queue: a node takes only the tasks its workers can
start soon, so that a task never waits behind a long one on a busy node while another
node of the queue sits idle (node/daemon.py, Node._room).

Two real nodes of one worker each serve the queue; the tasks block until the test creates
their release file (tests.tasks.touch_then_wait), which says when each began, and where.
"""

from __future__ import annotations

from pathlib import Path

from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_node import _holder


def _started(path: Path) -> int | None:
    """The pid of the worker that began the task (its ``started`` file), once it has."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _two_nodes(start_node):
    return [start_node(workers=1), start_node(workers=1)]


def test_two_long_tasks_run_at_once_on_two_idle_nodes(start_node, make_executor, tmp_path):
    nodes = _two_nodes(start_node)
    ex = make_executor(1, start_node=False)
    started = [tmp_path / f"started-{i}" for i in range(2)]
    release = tmp_path / "release"
    try:
        futures = [ex.submit(tasks.touch_then_wait, str(s), str(release)) for s in started]
        # the bug: the first node to look took both, and ran them one after the other
        # while the other node idled: the second never began before the release
        pids = wait_for(lambda: all(map(_started, started)) and [_started(s) for s in started],
                        what="both tasks to run at once")
        owners = [next(n for n in nodes if pid in n.worker_pids()) for pid in pids]
        assert owners[0] is not owners[1]
    finally:
        tasks.release(release, "go")
    assert [f.result(GUARD) for f in futures] == ["go", "go"]


def test_a_task_waits_in_the_queue_for_the_first_free_node_not_on_a_busy_one(
        start_node, make_executor, enclave, tmp_path):
    nodes = _two_nodes(start_node)
    ex = make_executor(1, start_node=False)
    started = [tmp_path / f"started-{i}" for i in range(3)]
    releases = [tmp_path / f"release-{i}" for i in range(3)]
    try:
        futures = [ex.submit(tasks.touch_then_wait, str(s), str(r))
                   for s, r in zip(started, releases, strict=True)]
        running = wait_for(lambda: [i for i, s in enumerate(started) if _started(s)][:2]
                           if sum(map(bool, map(_started, started))) >= 2 else None,
                           what="two tasks to run, one on each node")
        [waiting] = {0, 1, 2} - set(running)
        wait_for(lambda: enclave.jobs.get_many([futures[waiting].job_id]),
                 what="the third job's record")
        holder = _holder(enclave, futures[waiting].job_id)
        # the bug: a busy node held it (up to 4 tasks a worker), behind its long task
        assert holder is None, f"node {holder} holds a task it cannot start"
        # the task on the node that does not hold the third (either, now) ends: its node
        # is free, and runs the third, while the other task still runs
        by_node = {n.node_id: i for i in running for n in nodes
                   if _started(started[i]) in n.worker_pids()}
        first = next(i for node_id, i in by_node.items() if node_id != holder)
        other = next(i for i in running if i != first)
        tasks.release(releases[first], "first")
        assert futures[first].result(GUARD) == "first"
        wait_for(lambda: _started(started[waiting]), what="the third task to run")
        assert not futures[other].done()
    finally:
        for r in releases:
            tasks.release(r, "go")
    assert futures[waiting].result(GUARD) == futures[other].result(GUARD) == "go"
