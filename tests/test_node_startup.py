"""A worker's start-up: the walltime of its first task counts from the worker being ready
(it says so with an empty message on its result pipe), a worker that never gets there
fails its task, and a ready, idle worker costs its node nothing.

Slow start-up is made real with a ``sitecustomize`` module on the workers' path that
sleeps while the interpreter starts, in worker processes only (they alone have
``KOTTA_OWNER``)."""

from __future__ import annotations

import datetime as _dt
import os
import time

import psutil
import pytest

from kotta_executor import WorkerDied
from kotta_executor.config import current_user
from tests import tasks
from tests.conftest import GUARD, ROOT, wait_for

_SLOW_START = """
import os, time
if os.environ.get("KOTTA_OWNER") and os.environ.get("KOTTA_TEST_SLOW_START"):
    time.sleep(float(os.environ["KOTTA_TEST_SLOW_START"]))
"""


@pytest.fixture
def slow_start(tmp_path, monkeypatch):
    """Workers started from now on take ``seconds`` to start (set by the test)."""
    site = tmp_path / "slow-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_START)
    monkeypatch.setenv("PYTHONPATH", str(site))

    def set_delay(seconds: float) -> None:
        monkeypatch.setenv("KOTTA_TEST_SLOW_START", str(seconds))

    return set_delay


def test_the_walltime_of_a_first_task_does_not_count_the_worker_start_up(
        slow_start, start_node, make_executor):
    slow_start(3.0)  # longer than the walltime
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    short = ex.with_options(walltime=_dt.timedelta(seconds=1.5))
    f = short.submit(tasks.sleep_and_return, 0.2, "done")
    # before: WalltimeExceeded ("exceeded its walltime of 1.5 s") while the worker started up
    assert f.result(GUARD) == "done"
    assert f.status() == "completed"


def test_a_walltime_still_ends_a_first_task_that_runs_too_long(
        slow_start, start_node, make_executor):
    from kotta_executor import WalltimeExceeded

    slow_start(1.0)
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    short = ex.with_options(walltime=_dt.timedelta(seconds=1))
    f = short.submit(tasks.sleep_and_return, 60, "never")
    with pytest.raises(WalltimeExceeded, match="exceeded its walltime of 1 s"):
        f.result(GUARD)


def test_a_worker_that_never_starts_fails_its_task_and_the_node_goes_on(
        slow_start, make_executor, enclave, monkeypatch):
    """A worker stuck in its start-up (here: asleep in sitecustomize) is killed after
    pool.STARTUP_LIMIT; its task fails with WorkerDied naming the limit, and the next task
    gets a new worker.  The node runs in this process, stepped by the test, so that the
    limit can be made short."""
    from node import pool
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)  # workers import tests.* (python -m node.worker, cwd on sys.path)
    monkeypatch.setattr(pool, "STARTUP_LIMIT", 1.0)
    slow_start(GUARD)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    ex = make_executor(1, start_node=False)

    def pump(predicate, what, timeout=GUARD):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            node.step()

    try:
        stuck = ex.submit(tasks.square, 3)
        pump(stuck.done, "the task of the stuck worker to end")
        with pytest.raises(WorkerDied, match=r"did not start within 1 s"):
            stuck.result(0)
        assert enclave.jobs.get_many([stuck.job_id])[stuck.job_id].state == "failed"
        monkeypatch.setenv("KOTTA_TEST_SLOW_START", "0")  # the next worker starts normally
        after = ex.submit(tasks.square, 4)
        pump(after.done, "the next task")
        assert after.result(0) == 16
    finally:
        node.stopping = True
        node._drain()
        node._stop()


def test_an_idle_node_with_ready_workers_does_not_spin(start_node, make_executor):
    """Ready workers that were never given a task (started at once with --prespawn) have
    said so on their result pipes; the node reads that, rather than waking for it at
    every select.  (A first version read it only from busy workers: an idle node used a
    whole core.)"""
    node = start_node("--prespawn", current_user(), workers=2)
    proc = psutil.Process(node.pid)
    wait_for(lambda: len(proc.children()) == 2, what="the two workers to start")
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4  # one worker ready and used
    before = proc.cpu_times()
    time.sleep(2.0)  # a window to measure CPU over, not a synchronisation
    after = proc.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    # idle: about 0.02 s of CPU in 2 s; spinning on the unread message: about 2 s
    assert used < 0.5, f"an idle node used {used:.2f} s of CPU in 2 s"


def test_a_worker_asked_to_stop_while_it_starts_up_is_not_ended_by_the_request(
        slow_start, start_node, make_executor, enclave):
    """The node asks a worker to stop after its current task with SIGUSR1, for which the
    worker installs a handler once started: asked before that, it died of the signal, and
    its first task failed with WorkerDied ("killed by SIGUSR1").  Here the request is the
    kill of a task piped behind the first one, made while the worker still starts up."""
    from kotta_executor import TaskKilled

    slow_start(3.0)
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    # recorded in one transaction: a backlog, so the node pipes two to the new worker
    jobs = [ex._new_job(os.urandom(16).hex(), fn, [(args, {})], ex._options) for fn, args in [
        (tasks.sleep_and_return, (0.2, "head")), *((tasks.square, (i,)) for i in range(1, 5))]]
    enclave.jobs.create(jobs)  # (no ring: the node polls every 0.1 s)
    head, behind, *rest = [ex.attach(job.job_id) for job in jobs]
    wait_for(lambda: enclave.jobs.get(behind.job_id).state == "processing",
             what="the second task to be piped to the starting worker")
    assert behind.kill()
    assert head.result(GUARD) == "head"
    with pytest.raises(TaskKilled, match="it never ran"):
        behind.result(GUARD)
    assert [f.result(GUARD) for f in rest] == [4, 9, 16]
