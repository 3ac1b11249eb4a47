"""max_tasks_per_child on a node: which worker a limited task may go to, and what a task
that never runs leaves behind.  Real nodes and workers (the plain cases are in
test_stdlib_conformance.py)."""

from __future__ import annotations

import os

from tests import tasks
from tests.conftest import GUARD, wait_for


def test_a_limited_task_is_not_overtaken_forever_by_later_tasks(make_executor, start_node, enclave):
    """One worker, kept busy by tasks piped behind each other: a task whose limit its
    worker has reached waits for that worker to be idle, to be replaced.  Tasks that
    arrive after it must not keep filling the worker's pipe ahead of it (as they would
    not for a task of another owner, or one that must run alone): ProcessPoolExecutor
    runs work items in order.  Overtaken, it began only after every later task."""
    start_node(workers=1)
    busy = make_executor(1, start_node=False)
    limited = make_executor(1, start_node=False, max_tasks_per_child=1)
    assert busy.submit(os.getpid).result(GUARD)  # the worker has run a task
    head = [busy.submit(tasks.sleep_and_return, 0.1, i) for i in range(10)]
    wait_for(lambda: head[0].status() == "processing", what="the first task to run")
    f = limited.submit(os.getpid)
    # recorded (its message or hand-off) before the tasks after it are submitted: an
    # executor's sends are its own manager's, and another executor's could overtake it
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the limited task's job")
    tail = [busy.submit(tasks.sleep_and_return, 0.1, i) for i in range(40)]
    for t in head + tail:
        t.result(GUARD)
    f.result(GUARD)
    records = enclave.jobs.get_many([f.job_id, *(t.job_id for t in tail)])
    began = records.pop(f.job_id).started
    assert began <= min(r.started for r in records.values()), "later tasks went first"


def _copy_of_a_finished_limited_task(make_executor, start_node, enclave):
    """A node with one worker, warm for an executor without a limit, given a copy of a
    finished task of an executor with max_tasks_per_child=1 (a queue reader's copy, put
    back), which it drops, never runs: (that executor, the warm worker's pid)."""
    from kotta_executor.backends.base import Message

    unlimited = make_executor(1, start_node=False)
    limited = make_executor(1, start_node=False, max_tasks_per_child=1)
    f = limited.submit(os.getpid)
    wait_for(lambda: enclave.queue.depth("test") == 1, what="the task message")
    [original] = enclave.queue.receive("test", 1, GUARD, "test-thief")
    enclave.queue.release([original])
    start_node(workers=1)
    f.result(GUARD)
    warm = unlimited.submit(os.getpid).result(GUARD)
    enclave.queue.send("test", [Message(f.job_id, original.body)])  # the copy
    enclave.ring_nodes("test")
    # (its message is deleted once the node has dropped it)
    wait_for(lambda: enclave.queue.depth("test") == 0, what="the node to drop the copy")
    return unlimited, warm


def test_a_dropped_copy_of_a_limited_task_leaves_no_limit_on_a_worker(
        make_executor, start_node, enclave):
    """The copy's limit (1) must not stay on the worker it was planned for, which would
    then retire after one task of an executor that has no limit."""
    unlimited, _ = _copy_of_a_finished_limited_task(make_executor, start_node, enclave)
    pids = [unlimited.submit(os.getpid).result(GUARD) for _ in range(3)]
    assert len(set(pids)) == 1, pids


def test_a_dropped_copy_of_a_limited_task_replaces_no_warm_worker(
        make_executor, start_node, enclave):
    """The copy needs a fresh worker (the warm one has run a task, and its limit is 1):
    one is only planned until the copy's claim, which fails (its job is over), so the
    warm worker it would have replaced still serves (as for a copy of another owner's
    task, which would replace it too)."""
    unlimited, warm = _copy_of_a_finished_limited_task(make_executor, start_node, enclave)
    assert unlimited.submit(os.getpid).result(GUARD) == warm


def test_a_max_tasks_per_child_over_64_bits_is_accepted_as_process_pool_executor_does(
        make_executor):
    """ProcessPoolExecutor takes any integer of at least 1: so does the executor, and its
    tasks run (JSON readers take an integer over 64 bits for a float)."""
    ex = make_executor(1, max_tasks_per_child=2**64)
    pids = [ex.submit(os.getpid).result(GUARD) for _ in range(3)]
    assert len(set(pids)) == 1


def test_map_runs_no_more_items_in_a_worker_than_max_tasks_per_child(make_executor):
    """ProcessPoolExecutor.map with its default chunksize=1 makes each item a work item,
    which max_tasks_per_child counts: a worker runs at most that many items.  The items
    the executor packs into a task itself (chunksize=1) are not a chunk the caller asked
    for: they must not run more items in one process than the limit."""
    import collections

    ex = make_executor(1, max_tasks_per_child=4)
    pids = collections.Counter(ex.map(tasks.worker_pid, range(128)))  # (2 items a task)
    assert sum(pids.values()) == 128 and max(pids.values()) <= 4, pids.most_common(2)
