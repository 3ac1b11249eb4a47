"""Kills that land after their task ended, with real workers: the task behind is not failed
in the killed task's name, and the killed task's whole process tree still goes.  Found by
review of a first fix (which spared a worker whose killed task had ended), each a strict
xfail until fixed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest

from tests import tasks
from tests.conftest import GUARD, ROOT, wait_for
from tests.test_node import _pids

# ---------------------------------------------------------------------- task functions
# (importable by workers as tests.test_node_kills)


def touch_and_sleep(started, seconds, value):
    """Create ``started`` (this task began), sleep ``seconds``, return ``value``."""
    Path(started).write_text(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


_STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(f"{os.getpid()}\\n")
time.sleep(float(sys.argv[2]))
"""


def child_ignores_sigterm_parent_handles_it(child_pid_file, seconds=60.0):
    """Start a child (in the worker's process group) that ignores SIGTERM; then run until
    SIGTERM, which this task handles by returning at once (a graceful task whose helper
    process is stuck): only the SIGKILL after the grace period ends the child."""
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    subprocess.Popen([sys.executable, "-c", _STUBBORN, str(child_pid_file), str(seconds)])
    deadline = time.monotonic() + seconds
    while not Path(child_pid_file).exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the child is up (and ignores SIGTERM) before the task may end
    while not stop and time.monotonic() < deadline:
        time.sleep(0.01)
    return "cleaned up"


# ---------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_all(pid_file: Path) -> None:
    """SIGKILL the processes whose pids a test's task wrote (what a failed test left)."""
    for pid in _pids(pid_file):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def _head_with_a_task_piped_behind(enclave, make_executor, tmp_path, monkeypatch,
                                   behind_sleeps: float):
    """A node in this process, with one worker, stepped by the test (``pump``): a head task
    runs (it logs its worker's pid, then waits for ``release``), a task is piped behind it
    (it touches ``began``, sleeps ``behind_sleeps`` and returns "behind"), and two squares
    wait behind that.  The node drains and stops at the end."""
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)  # workers import tests.* (python -m node.worker, cwd on sys.path)
    log, release, began = tmp_path / "pids", tmp_path / "release", tmp_path / "began"
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    ex = make_executor(1, start_node=False)

    def pump(predicate, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            node.step()

    try:
        warm = ex.submit(tasks.worker_pid)
        pump(warm.done, "the warm-up task")
        jobs = [ex._new_job(os.urandom(16).hex(), fn, [(args, {})], ex._options) for fn, args in [
            (tasks.log_pid_and_wait, (str(log), str(release))),
            (touch_and_sleep, (str(began), behind_sleeps, "behind")),
            (tasks.square, (0,)),
            (tasks.square, (1,)),
        ]]
        enclave.jobs.create(jobs)
        head, behind, *rest = [ex.attach(j.job_id) for j in jobs]
        pump(lambda: _pids(log) and any(len(w.inflight) >= 2 for w in node.workers),
             "the head to begin with the next task piped behind it")
        yield types.SimpleNamespace(node=node, pump=pump, head=head, behind=behind, rest=rest,
                                    release=release, began=began)
    finally:
        tasks.release(release, "go")
        node.stopping = True
        node._drain()
        node._stop()


# ---------------------------------------------------------------------- tests


def test_a_kill_that_lands_after_its_task_ended_does_not_fail_the_next_one(
        make_executor, enclave, tmp_path, monkeypatch):
    """The kill request of the head is read while the head runs; the head ends and the
    worker begins the next piped task before the node signals (the police's read of the
    kill requests took a while).  The SIGTERM, sent for the head, ends the worker under the
    next task.  The node runs in this process, stepped by the test, so that the race can be
    made certain: its read of the kill requests is the real one, only made to wait (for
    the head to end and the next task to begin) before it returns."""
    with _head_with_a_task_piped_behind(enclave, make_executor, tmp_path, monkeypatch,
                                        2.0) as t:
        real = t.node.enclave.jobs.kill_requested

        def slow_read(ids):  # the head ends, and the next task begins, during the read
            got = real(ids)
            if t.head.job_id in got and not t.began.exists():
                tasks.release(t.release, "go")
                wait_for(t.began.exists, what="the next piped task to begin")
            return got

        monkeypatch.setattr(t.node.enclave.jobs, "kill_requested", slow_read)
        assert t.head.kill()
        t.pump(lambda: t.behind.done() and all(f.done() for f in t.rest),
               "the piped tasks to end")
        assert [f.result(0) for f in t.rest] == [0, 1]
        # the hole: WorkerDied("the worker ... was killed by signal SIGTERM ..."), job failed
        assert t.behind.result(0) == "behind"


def test_a_walltime_kill_ends_the_whole_tree_even_when_the_task_handles_sigterm(
        start_node, make_executor, tmp_path):
    import datetime as _dt

    child = tmp_path / "child"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(tasks.worker_pid).result(GUARD)  # a warm worker
    # long enough for the child to start on a busy machine (CI once ran out at 1 s)
    short = ex.with_options(walltime=_dt.timedelta(seconds=4))
    f = short.submit(child_ignores_sigterm_parent_handles_it, str(child))
    try:
        f.exception(GUARD)  # whatever it ends with: it handled SIGTERM and returned
        [pid] = _pids(child)
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's child, which ignores SIGTERM, to die with its task's tree")
    finally:
        _kill_all(child)


def start_a_daemon_and_sleep(pid_file, seconds=120.0):
    """Start a daemon the usual way (fork, setsid, fork again, the middle process exits):
    it has left the worker's process group, and its parent is gone; then sleep."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            Path(pid_file + ".tmp").write_text(f"{os.getpid()}\n")
            os.replace(pid_file + ".tmp", pid_file)
            time.sleep(seconds)
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)
    time.sleep(seconds)


def _daemon_killed_with_its_task(start_node, make_executor, tmp_path, end, submit=None):
    daemon = tmp_path / "daemon"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = (submit or type(ex).submit)(ex, start_a_daemon_and_sleep, str(daemon))
    try:
        wait_for(daemon.exists, what="the task's daemon to start")
        [pid] = _pids(daemon)
        exc = end(f)
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's daemon to die with its task's tree")
        return exc
    finally:
        _kill_all(daemon)


def test_a_walltime_ends_a_daemon_the_task_started(start_node, make_executor, tmp_path):
    """A daemon (double fork, setsid) was re-parented to init, out of the worker's tree and
    process group: a walltime kill missed it.  The worker is a subreaper now."""
    import datetime as _dt

    from kotta_executor import WalltimeExceeded

    def submit(ex, *args):
        return ex.with_options(walltime=_dt.timedelta(seconds=3)).submit(*args)

    exc = _daemon_killed_with_its_task(start_node, make_executor, tmp_path,
                                       lambda f: f.exception(GUARD), submit=submit)
    assert isinstance(exc, WalltimeExceeded)


def test_kill_ends_a_daemon_the_task_started(start_node, make_executor, tmp_path):
    from kotta_executor import TaskKilled

    def end(f):
        assert f.kill()
        return f.exception(GUARD)

    assert isinstance(_daemon_killed_with_its_task(start_node, make_executor, tmp_path, end),
                      TaskKilled)


@pytest.mark.parametrize("how", ["kill", "walltime"])
def test_a_daemon_that_cleared_its_environment_does_not_outlive_its_task(
        how, start_node, make_executor, tmp_path):
    """A daemon that execs with an empty environment (``env={}``) carries no mark
    (KOTTA_WORKER_ID): re-parented to the node, it was never ended, and ran on for good
    after its task's kill() or walltime.  It is a gone worker's once no live worker is
    older than it: ended then (here at once, the node's one worker killed)."""
    import datetime as _dt

    from kotta_executor import TaskKilled, WalltimeExceeded

    daemon = tmp_path / "daemon"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    if how == "walltime":
        ex = ex.with_options(walltime=_dt.timedelta(seconds=3))
    f = ex.submit(tasks.start_an_env_less_daemon_and_sleep, str(daemon))
    try:
        wait_for(daemon.exists, what="the task's daemon to start")
        [pid] = _pids(daemon)
        if how == "kill":
            assert f.kill()
        assert isinstance(f.exception(GUARD), TaskKilled if how == "kill" else WalltimeExceeded)
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's daemon, with no mark, to die with its task's tree")
        assert ex.submit(tasks.square, 5).result(GUARD) == 25  # the node carries on
    finally:
        _kill_all(daemon)


def test_a_child_that_cleared_its_environment_does_not_outlive_its_exited_worker(
        start_node, make_executor, tmp_path):
    """A child in a session of its own with an empty environment, left running by a task
    of a worker that then exits (``max_tasks_per_child=1``): re-parented to the node
    without a mark, it ran on for good."""
    child = tmp_path / "child"
    start_node(workers=1)
    ex = make_executor(1, start_node=False, max_tasks_per_child=1)
    try:
        assert ex.submit(tasks.leave_an_env_less_session_child, str(child)).result(GUARD) == "left"
        [pid] = _pids(child)
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the exited worker's child, with no mark, to be ended")
        assert ex.submit(tasks.square, 5).result(GUARD) == 25
    finally:
        _kill_all(child)


def test_a_stopping_node_ends_a_child_that_cleared_its_environment(
        start_node, make_executor, tmp_path):
    """A child in a session of its own with an empty environment, left running by a task:
    handed to the node as its worker exits at the node's stop, it ran on for good."""
    child = tmp_path / "child"
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    try:
        assert ex.submit(tasks.leave_an_env_less_session_child, str(child)).result(GUARD) == "left"
        [pid] = _pids(child)
        assert node.terminate() == 0
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's child, with no mark, to be ended with the node")
    finally:
        _kill_all(child)


def test_a_daemon_of_a_running_task_does_not_outlive_its_killed_node(
        start_node, make_executor, tmp_path):
    """A node SIGKILLed while a task runs: the worker ends its process groups, but the
    task's daemon (fork, setsid, fork: re-parented to the node, a subreaper, and, with the
    node gone, to init) ran on for good, unsupervised, beside the task's redelivery on
    another node.  The worker ends what carries its mark too."""
    daemon = tmp_path / "daemon"
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(start_a_daemon_and_sleep, str(daemon))
    try:
        wait_for(daemon.exists, what="the task's daemon to start")
        [pid] = _pids(daemon)
        [worker] = [p for p in a.worker_pids() if p != pid]  # (the daemon is the node's too)
        a.kill()
        wait_for(lambda: not _alive(worker), timeout=10.0, what="the node's worker to end")
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the task's daemon to end with its node's worker")
        assert not f.done()  # (its redelivery waits for a node: none was started yet)
        assert f.kill()
        start_node(workers=1)  # (which ends it, killed before it could run again)
        f.exception(GUARD)
    finally:
        _kill_all(daemon)


def leave_a_child_and_a_daemon(pid_file):
    """Leave a child in the worker's process group and a daemon in a session of its own
    running (their pids in ``pid_file``), and return: the worker is idle."""
    child = subprocess.Popen(["sleep", "317"]).pid
    daemon = Path(pid_file + ".daemon")
    middle = os.fork()
    if middle == 0:  # (fork, setsid, fork: as start_a_daemon_and_sleep, but it stays)
        os.setsid()
        if os.fork() == 0:
            daemon.write_text(f"{os.getpid()}\n")
            os.execvp("sleep", ["sleep", "318"])
        os._exit(0)
    os.waitpid(middle, 0)
    while not daemon.exists() or not daemon.read_text().endswith("\n"):
        time.sleep(0.01)
    Path(pid_file).write_text(f"{child}\n{daemon.read_text()}")


def test_what_an_idle_workers_tasks_left_does_not_outlive_its_killed_node(
        start_node, make_executor, tmp_path):
    """A node SIGKILLed while its worker idles: the worker, whose task pipe closed, exited
    at once, before its watch of the node ended what its tasks had left running (a child
    in its group, a daemon), which ran on for good under init.  Now it ends them as it
    ends itself."""
    left = tmp_path / "left"
    a = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(leave_a_child_and_a_daemon, str(left)).result(GUARD)
    try:
        pids = _pids(left)
        assert len(pids) == 2 and all(map(_alive, pids))
        a.kill()
        for pid in pids:
            wait_for(lambda pid=pid: not _alive(pid), what=f"process {pid} of the idle "
                     "worker's earlier task to end with its node's death")
    finally:
        _kill_all(left)


_SESSION_CHILD = """
import os, sys, time
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()}\\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))
"""


def start_a_session_child_and_die(pid_file, seconds=120.0):
    """Start a child in a session of its own, then die: the process-group signal for the
    dead worker's leftovers cannot reach the child."""
    subprocess.Popen([sys.executable, "-c", _SESSION_CHILD, str(pid_file), str(seconds)],
                     start_new_session=True)
    deadline = time.monotonic() + seconds
    while not Path(pid_file).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(3)


def test_a_child_in_its_own_session_does_not_outlive_its_dead_worker(
        start_node, make_executor, tmp_path):
    """It was re-parented to init and ran on; now to the node (a subreaper), which ends it."""
    from kotta_executor import WorkerDied

    child = tmp_path / "child"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(start_a_session_child_and_die, str(child))
    try:
        exc = f.exception(GUARD)
        assert isinstance(exc, WorkerDied) and exc.exitcode == 3
        [pid] = _pids(child)
        wait_for(lambda: not _alive(pid), timeout=10.0,
                 what="the dead worker's child, in its own session, to be ended")
        assert ex.submit(tasks.square, 5).result(GUARD) == 25  # the node carries on
    finally:
        _kill_all(child)


def leave_orphans_then(n):
    """Leave ``n`` orphans (a shell's background sleep, its shell gone) that exit soon."""
    for _ in range(n):
        subprocess.run(["sh", "-c", "sleep 0.01 & exit 0"], check=True)
    return n


def fork_and_wait_any():
    """Fork a child that exits 7; ``os.wait()`` for any child: it must be that one."""
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    got, status = os.wait()
    return got == pid, os.waitstatus_to_exitcode(status)


def test_orphans_of_earlier_tasks_neither_pile_up_nor_answer_a_later_os_wait(
        start_node, make_executor):
    """A worker that was a subreaper kept every orphan of its tasks as a zombie, and a
    later task's os.wait() got one of them (status 0) instead of its own child."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    worker = ex.submit(tasks.worker_pid).result(GUARD)
    assert ex.submit(leave_orphans_then, 50).result(GUARD) == 50
    wait_for(lambda: not [c for c in psutil.Process(worker).children()
                          if c.status() == psutil.STATUS_ZOMBIE],
             what="no zombie children in the worker")
    assert ex.submit(fork_and_wait_any).result(GUARD) == (True, 7)
    assert ex.submit(tasks.worker_pid).result(GUARD) == worker


def start_a_session_shell(pid_file):
    """A shell in a session of its own, with a sleep of its own; both pids in the file."""
    subprocess.Popen(
        ["sh", "-c", f'sleep 317 & echo "$$ $!" > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; wait'],
        start_new_session=True,
    )
    tasks.wait_for_file(pid_file)
    return "started"


def test_a_stopping_node_ends_what_its_workers_tasks_left_and_what_that_started(
        start_node, make_executor, tmp_path):
    """At the stop, the shell (re-parented to the node when its worker exited) was killed
    and its sleep, handed to the node at that moment, was left to init."""
    pids = tmp_path / "pids"
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    try:
        assert ex.submit(start_a_session_shell, str(pids)).result(GUARD) == "started"
        shell, sleep = _pids(pids)
        assert node.terminate() == 0
        for pid in (shell, sleep):
            wait_for(lambda pid=pid: not _alive(pid), timeout=10.0,
                     what=f"process {pid} to be ended with the node")
    finally:
        _kill_all(pids)


def test_a_piped_task_killed_as_its_worker_begins_it_counts_as_one_job(
        make_executor, enclave, tmp_path, monkeypatch):
    """The kill request of a task piped behind the head is read (the node ends its job
    cancelled and asks the worker to stop after what it runs) just as the head ends and
    the worker begins that task: it reports the task's result too, and the node counted
    the job twice among the jobs it has done (what --max-jobs counts: such a node stopped
    after fewer jobs than asked, and "stopped after N jobs" said N).  The node runs in
    this process, stepped by the test: its police reads the kill requests before its next
    step reads the head's result (as when that result lands between a step's read of the
    results and its police)."""
    from kotta_executor import TaskKilled

    with _head_with_a_task_piped_behind(enclave, make_executor, tmp_path, monkeypatch,
                                        0.2) as t:
        node = t.node
        [worker] = node.workers
        assert worker.inflight[1].job_id == t.behind.job_id
        assert t.behind.kill()
        tasks.release(t.release, "go")
        wait_for(t.began.exists, what="the worker to begin the task behind the head")
        enclave.ring_nodes("test")  # (a kill request rings: the police looks at once)
        node._wait()
        node._police()  # the head's result is not read yet: the task behind is piped
        t.pump(lambda: worker not in node.workers and all(f.done() for f in [t.head, *t.rest])
               and t.behind.done() and not node.finished, "the jobs to end")
        assert t.head.result(0) == worker.pid
        with pytest.raises(TaskKilled):
            t.behind.result(0)
        assert [f.result(0) for f in t.rest] == [0, 1]
        assert enclave.jobs.get(t.behind.job_id).state == "cancelled"
        assert node.jobs_done == 5  # the warm-up, the head, the one behind, two squares


#: a process tree of 2**(depth+1) - 1 processes (each forks two, ``depth`` levels down),
#: each writing its pid in a directory, then sleeping; the root leads a session of its own
_FORK_TREE = """
import os, sys, time
os.setsid()
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        continue
    if os.fork() == 0:
        continue
    break
open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
time.sleep(120)
"""


def test_a_kill_of_a_big_process_tree_scans_the_process_table_a_few_times(
        tmp_path, monkeypatch):
    """To find what a killed task's processes had started, the node scanned every process
    of the machine once per process of the tree: a task that forked 255 processes held the
    node's loop (every task's walltime and kill, the heartbeat) for 3 s, and its walltime
    kill came that much late; 1,000 processes, about a minute."""
    from node import pool

    pids = tmp_path / "pids"
    pids.mkdir()
    root = subprocess.Popen([sys.executable, "-c", _FORK_TREE, "5", str(pids)])
    try:
        wait_for(lambda: len(list(pids.iterdir())) == 63, what="the 63 processes to start")
        tree = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
        scans = []
        real = psutil._ppid_map
        monkeypatch.setattr(psutil, "_ppid_map", lambda: scans.append(1) or real())
        found = pool._with_descendants(tree)
        assert {p.pid for p in found} == {int(p.name) for p in pids.iterdir()}
        assert len(scans) <= 2, len(scans)
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


def test_a_task_being_killed_when_the_drain_deadline_comes_ends_killed(
        make_executor, enclave, monkeypatch, tmp_path):
    """A kill() whose grace period (SIGTERM, then SIGKILL half a second later) was under way
    as the drain's deadline came: the node killed the tree there and handed the task back,
    as one still running, its job left in processing: the future, told its task would be
    stopped within about a second, waited for another node to come and end it.  Now it
    ends as the kill would have: TaskKilled, the job cancelled."""
    from kotta_executor import TaskKilled
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)
    started, release = tmp_path / "started", tmp_path / "release"
    ex = make_executor(1, start_node=False)
    node = Node(enclave, NodeConfig(queue=ex._options.queue, workers=1, poll_interval=0.05,
                                    drain_timeout=0.0))
    node._start()
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(lambda: (node.step(), started.exists())[1], what="the task to begin")
        assert f.kill()
        wait_for(lambda: (node.step(), any(w.kill_deadline for w in node.workers))[1],
                 what="the node to begin the kill")  # (SIGTERM sent; no step since)
    finally:
        node._drain()  # its deadline at once: the kill's grace period is not over
        node._stop()
        tasks.release(release, "go")
    assert enclave.jobs.get(f.job_id).state == "cancelled"
    assert isinstance(f.exception(GUARD), TaskKilled)


def _kill_the_head_s_worker(t) -> None:
    """Kill the worker of ``t``'s head (SIGKILL), and step the node (no dispatch) until the
    task piped behind it is pending in the node again."""
    [worker] = t.node.workers
    assert worker.inflight[1].job_id == t.behind.job_id
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + GUARD
    while not any(p.job_id == t.behind.job_id for p in t.node.pending):
        assert time.monotonic() < deadline, "the dead worker's tasks were not put back"
        t.node._wait()
        t.node._collect()  # (buries the worker)


def test_a_task_back_from_a_dead_worker_whose_job_ended_elsewhere_does_not_run_again(
        make_executor, enclave, tmp_path, monkeypatch):
    """A task piped behind a head whose worker died is pending in the node again, claimed
    and never begun (unbegun).  Should its job have ended meanwhile (another node took its
    message over while this one stalled, and finished it), the node, which kept the claim
    it had without a look at the job, ran it all the same: twice in all.  It is dropped,
    as it was before the claim was kept."""
    from kotta_executor.backends.base import Finished, JobState

    with _head_with_a_task_piped_behind(enclave, make_executor, tmp_path, monkeypatch,
                                        0.0) as t:
        _kill_the_head_s_worker(t)  # (no dispatch: the test ends the job first)
        [back] = [p for p in t.node.pending if p.job_id == t.behind.job_id]
        assert back.claimed and back.unbegun
        # another node, which took the message over, ran it and recorded it
        assert enclave.jobs.finish([Finished(t.behind.job_id, JobState.FAILED, b"",
                                             reason="ran on another node")])
        t.pump(lambda: all(f.done() for f in t.rest), "the squares to end")
        assert [f.result(0) for f in t.rest] == [0, 1]
        assert not t.began.exists()  # the bug: it ran here too
        assert enclave.jobs.get(t.behind.job_id).reason == "ran on another node"


def test_a_task_back_from_a_dead_worker_whose_job_another_node_took_does_not_run_here(
        make_executor, enclave, tmp_path, monkeypatch):
    """As above, but the job is not over: another node took its message over while this
    one stalled, and runs it (processing, its node named).  This node, finding the task
    claimed, moved the job back to itself and ran it too: twice in all.  It leaves it to
    that node."""
    from kotta_executor.backends.base import Finished, JobState

    with _head_with_a_task_piped_behind(enclave, make_executor, tmp_path, monkeypatch,
                                        0.0) as t:
        _kill_the_head_s_worker(t)  # (no dispatch: the test moves the job first)
        # another node, which took the message over, claimed the job (a redelivery)
        assert enclave.jobs.transition([t.behind.job_id], JobState.PROCESSING,
                                       node="other-node")
        t.pump(lambda: all(f.done() for f in t.rest), "the squares to end")
        assert [f.result(0) for f in t.rest] == [0, 1]
        assert not t.began.exists()  # the bug: it ran here too
        record = enclave.jobs.get(t.behind.job_id)
        assert (record.state, record.node) == (JobState.PROCESSING, "other-node")
        enclave.jobs.finish([Finished(t.behind.job_id, JobState.FAILED, b"", reason="end")])
