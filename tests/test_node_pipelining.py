"""The node with several tasks in one worker's pipe (pipelining), and workers changing
hands: kills and walltimes reach the task they are for, a task waiting in a pipe can be
killed, a worker of another owner is replaced without waiting on it, and owners take turns.
Each test was a strict xfail found by review, until its bug was fixed.

Scenarios are built as in tests/test_node.py: a node warmed up by one tiny task pipes deep
(its worker's moving average is tiny); tasks recorded in one transaction reach it in one
receive, a backlog, and it writes them into one worker's pipe together.
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import time

import pytest

from kotta_executor import TaskKilled
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_node import _freeze, _pids, _signal_pending

# ---------------------------------------------------------------------- task functions
# (importable by workers as tests.test_node_pipelining; a task whose walltime is short is
# in tests.tasks, which the warm-up task has imported: importing this module, and with it
# tests.test_node and pytest, took over its walltime of 1 s on a busy machine)


def leave_a_thread(release, seconds=60.0):
    """Start a (non-daemon) thread that runs on after the task returns, until ``release``
    exists: a background flush, a server, a pool a library keeps; return this pid."""
    import threading

    def linger():
        deadline = time.monotonic() + seconds  # deadlock guard of a test that went wrong
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)

    threading.Thread(target=linger, name="lingering").start()
    return os.getpid()


# ---------------------------------------------------------------------- helpers


def _pipe_together(enclave, ex, calls):
    """Warm the node's (single) worker with a tiny task, then record ``calls`` ((options,
    fn, args) each) in one transaction, in order: the node takes them in one receive, a
    backlog of 4 tasks for 1 worker, and pipes them all to that worker (head first)."""
    worker = ex.submit(tasks.worker_pid).result(GUARD)  # a tiny average: the node pipes deep
    jobs = [ex._new_job(os.urandom(16).hex(), fn, [(args, {})], opts or ex._options)
            for opts, fn, args in calls]
    enclave.jobs.create(jobs)  # queued together (no ring: the node polls every 0.1 s)
    return worker, [ex.attach(job.job_id) for job in jobs]


def _states(enclave, futures) -> list[str]:
    jobs = enclave.jobs.get_many([f.job_id for f in futures])
    return [str(jobs[f.job_id].state) if f.job_id in jobs else "none" for f in futures]


def _pipe_behind_a_long_task(enclave, ex, head_fn, log, release, runs):
    """Pipe ``head_fn(log, release)``, a task that appends to ``runs``, and two squares to
    the node's only worker together (see _pipe_together), and wait until the head runs
    and the next one waits behind it in the pipe.  Returns the worker's pid and the four
    futures: head, behind, and the other two."""
    worker, (head, behind, *rest) = _pipe_together(enclave, ex, [
        (None, head_fn, (str(log), str(release))),
        (None, tasks.append_line, (str(runs), "ran")),
        (None, tasks.square, (0,)),
        (None, tasks.square, (1,)),
    ])
    wait_for(lambda: _pids(log), what="the head task to begin")
    wait_for(lambda: _states(enclave, [behind]) == ["processing"],
             what="the node to pipe the task behind the head")
    return worker, head, behind, rest


#: the average task time (s) under which the nodes of these tests pipe tasks deep (the
#: node's own TINY_TASK is 2 ms: on a loaded machine a warm-up of tiny tasks exceeded it,
#: the node piped no more than one task behind another, and a test waiting for two
#: there failed)
PIPE_TINY = 0.05


@pytest.fixture
def start_node(start_node):
    def start(*extra, **kwargs):
        kwargs.setdefault("tiny_task", PIPE_TINY)
        return start_node(*extra, **kwargs)

    return start


# ---------------------------------------------------------------------- tests


def test_a_piped_task_is_not_failed_with_the_walltime_of_the_task_before_it(
        start_node, make_executor, enclave, tmp_path):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    short = ex.with_options(walltime=_dt.timedelta(seconds=1))

    _, (head, behind, *rest) = _pipe_together(enclave, ex, [
        (short._options, tasks.ends_cleanly_on_sigterm, (str(started),)),
        (None, tasks.sleep_and_return, (3.0, "behind")),  # longer than the grace period
        (None, tasks.square, (0,)),
        (None, tasks.square, (1,)),
    ])
    wait_for(lambda: _pids(started), what="the head task to begin")
    assert head.result(GUARD) == "cleaned up"  # it handled SIGTERM (walltime) and returned
    assert [f.result(GUARD) for f in rest] == [0, 1]
    # the bug: WalltimeExceeded("job <head> exceeded its walltime of 1 s"), job failed
    assert behind.result(GUARD) == "behind"


def test_a_piped_task_is_not_cancelled_by_the_kill_of_the_task_before_it(
        start_node, make_executor, enclave, tmp_path):
    started = tmp_path / "started"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)

    _, (head, behind, *rest) = _pipe_together(enclave, ex, [
        (None, tasks.ends_cleanly_on_sigterm, (str(started),)),
        (None, tasks.sleep_and_return, (3.0, "behind")),  # longer than the grace period
        (None, tasks.square, (0,)),
        (None, tasks.square, (1,)),
    ])
    wait_for(lambda: _pids(started), what="the head task to begin")
    wait_for(lambda: _states(enclave, [behind]) == ["processing"],
             what="the node to pipe the task behind the head")
    assert head.kill()
    head.exception(GUARD)  # whatever it ends with (it returned within the grace period)
    assert [f.result(GUARD) for f in rest] == [0, 1]
    # the bug: TaskKilled("job <head> was killed on request"), job cancelled
    assert behind.result(GUARD) == "behind"


def test_kill_of_a_task_piped_behind_a_long_one_takes_effect_within_seconds(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)

    try:
        _, head, behind, rest = _pipe_behind_a_long_task(
            enclave, ex, tasks.log_pid_and_wait, log, release, runs)
        assert not behind.cancel()  # it counts as started
        assert behind.kill()  # the kill request is recorded
        # promised: stopped within about a second (here: five)
        wait_for(lambda: behind.done(), timeout=5.0, what="the killed piped task to end")
        assert isinstance(behind.exception(), TaskKilled)
        assert "it never ran" in str(behind.exception())
    finally:
        tasks.release(release, "go")
    # the head ends as it would have; the others run (on a new worker); the killed one never
    assert head.result(GUARD) == _pids(log)[0]
    assert [f.result(GUARD) for f in rest] == [0, 1]
    assert not runs.exists()
    assert enclave.jobs.get(behind.job_id).state == "cancelled"


def test_replacing_a_worker_of_another_owner_does_not_hang_the_node(
        start_node, make_executor, user_token, tmp_path):
    release = tmp_path / "release"
    node = start_node(workers=1)
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    bob = make_executor(1, start_node=False, credentials=user_token("bob"))
    try:
        worker = alice.submit(leave_a_thread, str(release)).result(GUARD)
        assert node.worker_pids() == [worker]  # idle, of alice: bob's task replaces it
        assert bob.submit(tasks.square, 3).result(timeout=10) == 9
    finally:
        tasks.release(release, "go")


def test_a_task_of_another_owner_does_not_wait_for_tasks_submitted_after_it(
        start_node, make_executor, user_token, enclave):
    """Across clients, a task is submitted when its job is recorded: each client records
    its own (from its own thread), so the test waits for bob's record before alice submits
    more.  Without that wait bob's job could be recorded after alice's 200 (CI once saw
    all 200 finish first), and they would be ahead of it in the queue by right."""
    start_node(workers=1)
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    bob = make_executor(1, start_node=False, credentials=user_token("bob"))
    first = [alice.submit(tasks.sleep_and_return, 0.02, i) for i in range(20)]
    first[0].result(GUARD)  # alice holds the worker, with a backlog
    b = bob.submit(tasks.square, 3)
    wait_for(lambda: enclave.jobs.get_many([b.job_id]), what="bob's job to be recorded")
    later = [alice.submit(tasks.sleep_and_return, 0.02, i) for i in range(200)]
    assert b.result(GUARD) == 9
    overtaken = sum(f.done() for f in later)
    assert [f.result(GUARD) for f in later] == list(range(200))
    # measured: 199 of the 200 (about 4 s of work) finished before bob's task
    assert overtaken < 100, f"{overtaken} of alice's later tasks overtook bob's"


def test_a_task_killed_while_its_node_was_dead_does_not_begin_again(
        start_node, make_executor, enclave, tmp_path):
    """kill() of a task whose node died under it (it is `processing`, so cancel() fails):
    the node that receives it again does not run it (found by review: nothing looked at
    kill requests when a task was claimed again)."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        wait_for(lambda: _pids(log), what="the task to begin on node A")
        a.kill()
        a.proc.wait(GUARD)
        assert not f.cancel()  # it counts as started
        assert f.kill()  # a request, for whichever node holds it next
        start_node(workers=1)
        wait_for(lambda: f.done(), what="the killed task to end")
        assert isinstance(f.exception(), TaskKilled)
        assert "before it could run again" in str(f.exception())
    finally:
        tasks.release(release, "go")
    assert len(_pids(log)) == 1  # it began once, on node A
    assert enclave.jobs.get(f.job_id).state == "cancelled"


def test_tasks_behind_one_killed_for_a_task_that_had_ended_go_back_uncounted(
        start_node, make_executor, enclave, enclave_dir, tmp_path):
    """A kill's SIGTERM that the task handles by returning (its result read) ends the worker
    all the same, SIGKILL at the grace period's end, while it runs the next task: that one
    runs again, and those piped behind it, which the worker never began (it runs one task
    after another), go back too.  On a stopping node they were released counted, their jobs
    left in processing (as begun: with `--max-deliveries 1` the next node dead-lettered
    them, though they never ran); now they go back pending and uncounted, as the tasks
    behind a worker's head do when it dies otherwise."""
    started, began, release = tmp_path / "started", tmp_path / "began", tmp_path / "release"
    a = start_node("--prefetch", "3", workers=1)  # (it takes the four, and pipes them)
    ex = make_executor(1, start_node=False)
    # a tiny average (tasks piped together, each timed from its predecessor's end): the
    # node pipes deep
    assert list(ex.map(tasks.square, range(64))) == [i * i for i in range(64)]
    _freeze(a, enclave_dir)  # so that it takes the four in one step, and pipes them together
    try:  # (as _pipe_together, the node warmed up already)
        jobs = [ex._new_job(os.urandom(16).hex(), fn, [(args, {})], ex._options)
                for fn, args in [(tasks.ends_cleanly_on_sigterm, (str(started),)),
                                 (tasks.touch_then_wait, (str(began), str(release))),
                                 (tasks.square, (0,)), (tasks.square, (1,))]]
        enclave.jobs.create(jobs)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    head, behind, *rest = [ex.attach(job.job_id) for job in jobs]
    try:
        wait_for(lambda: _pids(started), what="the head task to begin")
        wait_for(lambda: _states(enclave, rest) == ["processing"] * 2,
                 what="the node to pipe the tasks behind the head")
        assert head.kill()
        # the head returns at the SIGTERM, the worker begins the next; the node, held
        # before its SIGKILL (half a second on), is stopped meanwhile (SIGTERM)
        wait_for(began.exists, interval=0.005, what="the task behind the head to begin")
        _freeze(a, enclave_dir)
        os.kill(a.pid, signal.SIGTERM)
        wait_for(lambda: _signal_pending(a.pid, signal.SIGTERM), what="the SIGTERM to wait")
        os.kill(a.pid, signal.SIGCONT)
        assert a.proc.wait(GUARD) == 0, a.output()
    finally:
        tasks.release(release, "go")
    assert "after it ended" in a.output()  # (the case at hand)
    records = enclave.jobs.get_many([f.job_id for f in rest])
    assert [(str(r.state), r.node, r.started, r.attempts) for r in records.values()] == [
        ("pending", None, None, 0)] * 2
    start_node("--max-deliveries", "1", workers=1)
    assert [f.result(GUARD) for f in rest] == [0, 1]
    head.exception(GUARD)  # (whatever it ends with: it returned within the grace period)


def test_a_task_in_reserve_behind_a_long_one_runs_on_an_idle_worker(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    start_node(workers=2)
    ex = make_executor(1, start_node=False)
    try:
        # two warm workers whose tasks are short: two tasks that run at once, then released
        started = [tmp_path / f"started-{i}" for i in range(2)]
        releases = [tmp_path / f"go-{i}" for i in range(2)]
        warm = [ex.submit(tasks.touch_then_wait, str(s), str(r))
                for s, r in zip(started, releases, strict=True)]
        wait_for(lambda: all(s.exists() for s in started), what="both workers to run a task")
        for r in releases:
            tasks.release(r, "go")
        assert [f.result(GUARD) for f in warm] == ["go", "go"]
        # a long task and quick ones, received together (a backlog): the node pipes one of
        # the quick ones behind the long one, in reserve, and the others to the other worker
        jobs = [ex._new_job(os.urandom(16).hex(), tasks.log_pid_and_wait,
                            [((str(log), str(release)), {})], ex._options)]
        jobs += [ex._new_job(os.urandom(16).hex(), tasks.append_line,
                             [((str(runs), f"q{i}"), {})], ex._options) for i in range(9)]
        enclave.jobs.create(jobs)
        head, *quick = [ex.attach(job.job_id) for job in jobs]
        wait_for(lambda: _pids(log), what="the long task to begin")
        # the bug: the one in reserve waited for the long task, the other worker idle
        wait_for(lambda: all(f.done() for f in quick), timeout=20.0,
                 what="the quick tasks to end while the long one runs")
        assert not head.done()
    finally:
        tasks.release(release, "go")
    assert head.result(GUARD) == _pids(log)[0]
    assert [f.result(GUARD) for f in quick] == [f"q{i}" for i in range(9)]
    assert sorted(runs.read_text().split()) == [f"q{i}" for i in range(9)]  # each once
    assert _states(enclave, [head, *quick]) == ["completed"] * 10


def _stop_a_node_with_tasks_piped_behind(start_node, make_executor, enclave, long_task,
                                         log, release, runs):
    """Node A (one worker) with tasks piped behind ``long_task``, stopped (SIGTERM: it
    drains, its running task finishes), and node B started: (a, b, head, behind, rest)."""
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    _, head, behind, rest = _pipe_behind_a_long_task(enclave, ex, long_task, log, release, runs)
    a.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping on SIGTERM" in a.output(), what="node A to stop")
    return a, start_node(workers=1), head, behind, rest


def test_tasks_piped_behind_a_long_one_are_handed_back_at_once_when_the_node_stops(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    try:
        a, b, head, behind, rest = _stop_a_node_with_tasks_piped_behind(
            start_node, make_executor, enclave, tasks.log_pid_and_wait, log, release, runs)
        # the bug: they stayed in A's worker's pipe (hidden from other nodes) until the
        # long task ended, or the drain timed out
        wait_for(lambda: behind.done() and all(f.done() for f in rest), timeout=20.0,
                 what="the piped tasks to run on node B while the long one runs")
        assert {enclave.jobs.get(f.job_id).node for f in (behind, *rest)} == {b.node_id}
        assert not head.done()
    finally:
        tasks.release(release, "go")
    assert head.result(GUARD) == _pids(log)[0]
    assert behind.result(GUARD) == "ran" and [f.result(GUARD) for f in rest] == [0, 1]
    assert runs.read_text() == "ran\n"  # once
    assert a.proc.wait(GUARD) == 0, a.output()
    assert _states(enclave, [head, behind, *rest]) == ["completed"] * 4


def test_tasks_piped_behind_a_long_one_run_on_a_new_worker_in_a_free_place(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    node = start_node(workers=2)
    ex = make_executor(1, start_node=False)
    try:
        # one warm worker of tiny tasks, a place free: the node pipes a backlog to it
        worker, (head, *quick) = _pipe_together(enclave, ex, [
            (None, tasks.log_pid_and_wait, (str(log), str(release))),
            *((None, tasks.append_line, (str(runs), f"q{i}")) for i in range(8)),
        ])
        wait_for(lambda: _pids(log), what="the long task to begin")
        assert _pids(log) == [worker]
        wait_for(lambda: all(f.done() for f in quick), timeout=20.0,
                 what="the quick tasks to end while the long one runs")
        assert {f.result() for f in quick} == {f"q{i}" for i in range(8)}
        assert not head.done()
        assert len(node.worker_pids()) == 2
    finally:
        tasks.release(release, "go")
    assert "taking back" in node.output()  # (the case at hand)
    assert head.result(GUARD) == worker
    assert sorted(runs.read_text().split()) == [f"q{i}" for i in range(8)]  # each once
    # Taken back (never begun in the pipe), a task was claimed again as it went to another
    # worker: its job, processing already, moved to processing a second time, and `kotta
    # status` said two attempts for a task that began once.  The node keeps its claim.
    records = enclave.jobs.get_many([f.job_id for f in (head, *quick)])
    assert [records[f.job_id].attempts for f in (head, *quick)] == [1] * 9


def ignore_the_stop_request_then_wait(log, release):
    """Ignore the node's stop request (``SIG_IGN``: it is lost), then run until ``release``."""
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    return tasks.log_pid_and_wait(log, release)


def default_the_stop_request_then_wait(log, release):
    """Give the node's stop request its default action (to die), then run until ``release``."""
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, signal.SIG_DFL)
    return tasks.log_pid_and_wait(log, release)


def handle_the_stop_request_then_wait(log, release):
    """Take the node's stop request for a handler of its own (it swallows it), then run
    until ``release``."""
    from node.worker import STOP_SIGNAL

    signal.signal(STOP_SIGNAL, lambda *_: None)
    return tasks.log_pid_and_wait(log, release)


@pytest.mark.parametrize("head_fn", [ignore_the_stop_request_then_wait,
                                     default_the_stop_request_then_wait,
                                     handle_the_stop_request_then_wait])
def test_a_task_in_reserve_is_not_taken_back_from_a_worker_that_cannot_hear_the_request(
        head_fn, start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    node = start_node(workers=2)
    ex = make_executor(1, start_node=False)
    try:
        worker, (head, *quick) = _pipe_together(enclave, ex, [
            (None, head_fn, (str(log), str(release))),
            *((None, tasks.append_line, (str(runs), f"q{i}")) for i in range(8)),
        ])
        wait_for(lambda: _pids(log), what="the long task to begin")
        # once the long task has run a while, the node looks at what is behind it
        wait_for(lambda: f"has run job {head.job_id}" in node.output(),
                 what="the node to look at the tasks behind the long one")
    finally:
        tasks.release(release, "go")
    # the bug: taken back all the same, the request ignored: the one in reserve ran twice
    # (on the other worker, and after the long task); or, the request deadly, the long task
    # died with WorkerDied
    assert head.result(GUARD) == worker
    assert [f.result(GUARD) for f in quick] == [f"q{i}" for i in range(8)]
    assert sorted(runs.read_text().split()) == [f"q{i}" for i in range(8)]  # each once


def test_tasks_piped_behind_a_task_that_ignores_the_stop_request_run_once_when_the_node_stops(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    try:
        a, _, head, behind, rest = _stop_a_node_with_tasks_piped_behind(
            start_node, make_executor, enclave, ignore_the_stop_request_then_wait, log,
            release, runs)
    finally:
        tasks.release(release, "go")
    assert head.result(GUARD) == _pids(log)[0]
    assert behind.result(GUARD) == "ran" and [f.result(GUARD) for f in rest] == [0, 1]
    assert a.proc.wait(GUARD) == 0, a.output()
    # the bug: handed back at once, though its worker, deaf to the request, ran it after
    # the long task: it ran on both nodes
    assert runs.read_text() == "ran\n"


def test_tasks_behind_a_long_one_and_a_killed_piped_task_run_on_a_worker_that_frees(
        start_node, make_executor, enclave, tmp_path):
    """A kill of a task piped behind a long one asks its worker to stop after the long
    task; the worker hears it, and the node's later look at the tasks behind took that
    for a worker deaf to the request: they waited for the long task to end (or for the
    drain's deadline), though another worker was free.  Now they are taken back as the
    worker hears that request, and run on the worker that frees."""
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    started_b, release_b = tmp_path / "started-b", tmp_path / "release-b"
    start_node(workers=2)
    ex = make_executor(1, start_node=False)
    try:
        # one worker busy (the pool full: nothing is taken back while it runs), the other
        # warmed with tiny tasks (the node pipes deep to it)
        busy = ex.submit(tasks.touch_then_wait, str(started_b), str(release_b))
        wait_for(started_b.exists, what="the other worker's task to begin")
        assert list(ex.map(tasks.square, range(64))) == [i * i for i in range(64)]
        _, (head, *quick) = _pipe_together(enclave, ex, [
            (None, tasks.log_pid_and_wait, (str(log), str(release))),
            *((None, tasks.append_line, (str(runs), f"q{i}")) for i in range(8)),
        ])
        wait_for(lambda: _pids(log), what="the long task to begin")
        wait_for(lambda: _states(enclave, quick[:2]) == ["processing"] * 2,
                 what="the node to pipe quick tasks behind the long one")
        assert quick[0].kill()
        wait_for(quick[0].done, what="the killed task to end")
        tasks.release(release_b, "go")
        assert busy.result(GUARD) == "go"
        # the bug: they waited behind the long task, the other worker idle
        wait_for(lambda: all(f.done() for f in quick[1:]), timeout=20.0,
                 what="the quick tasks to end while the long one runs")
        assert not head.done()
    finally:
        tasks.release(release_b, "go")
        tasks.release(release, "go")
    assert head.result(GUARD) == _pids(log)[0]
    assert [f.result(GUARD) for f in quick[1:]] == [f"q{i}" for i in range(1, 8)]
    assert sorted(runs.read_text().split()) == [f"q{i}" for i in range(1, 8)]  # each once


def test_a_task_killed_in_a_pipe_is_recorded_never_attempted_nor_started(
        start_node, make_executor, enclave, tmp_path):
    """A task killed while it waited in a worker's pipe, never begun, showed in its job
    record (attach(), `kotta status`) one attempt and a start time, as a task that had
    run.  Its claim was not an attempt (as a stopping node's hand-back of such a task is
    not): 0 attempts, not started."""
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    try:
        _, head, behind, rest = _pipe_behind_a_long_task(
            enclave, ex, tasks.log_pid_and_wait, log, release, runs)
        assert behind.kill()
        assert "it never ran" in str(behind.exception(GUARD))
    finally:
        tasks.release(release, "go")
    assert [f.result(GUARD) for f in rest] == [0, 1]
    job = enclave.jobs.get(behind.job_id)
    assert (job.state, job.attempts, job.started) == ("cancelled", 0, None)
    ran = enclave.jobs.get(head.job_id)  # (the one that ran keeps its attempt)
    assert (ran.attempts, ran.started is not None) == (1, True)
