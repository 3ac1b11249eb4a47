"""A worker's start-up: the walltime of its first task counts from the worker being ready
(it says so with an empty message on its result pipe), a worker that never gets there
fails its task, and a ready, idle worker costs its node nothing.

Slow start-up is made real with a ``sitecustomize`` module on the workers' path that
sleeps while the interpreter starts, in worker processes only (they alone have
``KOTTA_OWNER``)."""

from __future__ import annotations

import datetime as _dt
import os
import signal
import time

import psutil
import pytest

from kotta_executor import WorkerDied
from kotta_executor.config import current_user
from tests import tasks
from tests.conftest import GUARD, ROOT, pump, wait_for

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

    try:
        stuck = ex.submit(tasks.square, 3)
        pump(node, stuck.done, "the task of the stuck worker to end")
        with pytest.raises(WorkerDied, match=r"did not start within 1 s"):
            stuck.result(0)
        assert enclave.jobs.get_many([stuck.job_id])[stuck.job_id].state == "failed"
        monkeypatch.setenv("KOTTA_TEST_SLOW_START", "0")  # the next worker starts normally
        monkeypatch.setattr(pool, "STARTUP_LIMIT", 120.0)  # (however busy the machine)
        after = ex.submit(tasks.square, 4)
        pump(node, after.done, "the next task")
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


def test_a_worker_asked_to_stop_while_it_starts_up_stops_before_its_first_task(slow_start):
    """The node asks a worker to stop after its current task with a signal (STOP_SIGNAL,
    SIGUSR1 then); a worker gets its handler only once started.  Asked earlier, it used to
    die of the signal (and its first task failed with WorkerDied "killed by SIGUSR1");
    now the node spawns it with
    the signal blocked, the worker unblocks it once it has the handler, and it stops as
    asked, before its first task: the node puts that task back."""
    from node import pool
    from node.worker import STOPPED

    slow_start(2.0)
    w = pool.spawn(current_user())
    try:
        w.send([_task(tasks.square, 3)])
        assert not w.ready
        w.stop_after_current()
        code = w.proc.wait(GUARD)
        assert code == STOPPED, f"the worker ended with {code}"
        assert w.stopped_as_asked(code)  # none of its tasks began: they all go back
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
        w.close()


def test_nothing_is_piped_behind_the_first_task_of_a_starting_worker(
        slow_start, make_executor, enclave, monkeypatch):
    """A worker's start-up may be long: tasks wait in the node meanwhile (cancellable,
    free for another worker), not in its pipe.  In-process node, stepped by the test."""
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)
    slow_start(2.0)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    ex = make_executor(1, start_node=False)
    # recorded in one transaction: a backlog, which pipes deep to ready workers
    jobs = [ex._new_job(os.urandom(16).hex(), tasks.square, [((i,), {})], ex._options)
            for i in range(8)]
    enclave.jobs.create(jobs)
    futures = [ex.attach(j.job_id) for j in jobs]
    try:
        deadline = time.monotonic() + GUARD
        piped = 0  # the most tasks a worker held before it was ready
        while not all(f.done() for f in futures):
            assert time.monotonic() < deadline, "timed out waiting for the tasks"
            piped = max([piped, *(len(w.inflight) for w in node.workers if not w.ready)])
            node.step()
        assert [f.result(0) for f in futures] == [i * i for i in range(8)]
        assert piped == 1, f"{piped} tasks given to a worker still starting up"
    finally:
        node.stopping = True
        node._drain()
        node._stop()


def test_a_task_back_from_a_failed_write_does_not_charge_the_next_worker_start_up(
        slow_start, make_executor, enclave, monkeypatch):
    """The node writes a task to a ready, idle worker that died after the step's collect:
    the write fails and the task goes back to pending; a new worker, slow to start, gets
    it.  Its walltime counts from that worker being ready, not from the failed write.
    (Found by review: the failed write's clock stayed on the task, and the new worker's
    start-up was charged to it: WalltimeExceeded for a 0.2 s task.)"""
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)  # workers import tests.* (python -m node.worker, cwd on sys.path)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                    prespawn_owner=current_user()))
    node._start()
    ex = make_executor(1, start_node=False)

    try:
        first = node.workers[0]
        pump(node, lambda: first.ready, "the prespawned worker to be ready")
        slow_start(3.0)  # workers spawned from now on take 3 s to start
        real = node._hand_out

        def die_then_hand_out(frames):
            # the ready, idle worker dies after this step's _collect, before the write
            if first in frames and first.proc.poll() is None:
                first.proc.kill()
                first.proc.wait()
            real(frames)

        monkeypatch.setattr(node, "_hand_out", die_then_hand_out)
        short = ex.with_options(walltime=_dt.timedelta(seconds=1.5))
        f = short.submit(tasks.sleep_and_return, 0.2, "done")
        pump(node, f.done, "the task to end")
        assert first not in node.workers  # it went the way the race goes
        assert f.result(0) == "done"
    finally:
        node.stopping = True
        node._drain()
        node._stop()


def _task(fn, *args):
    """A task as the node holds it (no delivery: it goes no further than the worker)."""
    from kotta_executor import wire
    from node.pool import Task

    header = {"kind": "task", "job_id": os.urandom(16).hex(), "owner": current_user(),
              "client": "c" * 16, "queue": "test", "walltime": 60.0, "fn": "f", "n": 1}
    return Task(None, header, wire.encode(header, wire.dump_call(fn, [(args, {})])))


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="no /proc here")
def test_a_node_the_executor_starts_gets_its_path_without_the_standard_library(
        make_executor):
    """A node the executor starts gets the client's sys.path (its modules, those of the
    functions it pickles by reference), but not the client's standard library: another
    interpreter a task starts (a script job's python3, of another version: a notebook's
    kernel from a venv, with the system's python3 on PATH) crashed on it ("SRE module
    mismatch")."""
    import sysconfig

    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    (node,) = ex._nodes.values()
    environ = dict(line.split("=", 1) for line in
                   open(f"/proc/{node.pid}/environ").read().split("\0") if "=" in line)
    path = environ["PYTHONPATH"].split(os.pathsep)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    assert not [p for p in path if os.path.realpath(p) == stdlib
                or os.path.realpath(p).startswith(os.path.join(stdlib, "lib-dynload"))], path
    assert str(ROOT) in path  # (the tests' own modules: tests.tasks, by reference)


def test_a_task_of_a_worker_still_starting_at_the_drain_deadline_goes_back_uncounted(
        slow_start, start_node, make_executor, enclave):
    """A node stopped while its worker started up (a slow venv, a heavy sitecustomize)
    killed it at the drain deadline and handed its task back counted, its job left in
    processing: with `--max-deliveries 1` the next node dead-lettered it (DeliveryFailed)
    though no worker had begun it.  It never began (the worker never said it was ready):
    pending again, and not counted."""
    slow_start(GUARD)  # it stays in its start-up for the whole test
    a = start_node("--max-deliveries", "1", "--drain-timeout", "0.5", workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 7)
    wait_for(lambda: f.status() == "processing", what="node A to give the task to its worker")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(GUARD) == 0, a.output()
    job = enclave.jobs.get(f.job_id)
    assert (job.state, job.node, job.started) == ("pending", None, None)
    slow_start(0)
    start_node("--max-deliveries", "1", workers=1)
    assert f.result(GUARD) == 49
    assert enclave.queue.dead_letters("test") == []
