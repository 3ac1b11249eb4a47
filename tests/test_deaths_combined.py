"""Deaths in combination, on the embedded enclave, with real node, worker and client
processes: a node killed with dozens of tasks piped into each worker, a node stopped past
its visibility timeout and then let go on, a client killed mid-burst, a worker's whole
process group killed (in a burst, and as its node drains), a node killed as it drains
and as it starts.  Every job ends completed, failed (with a reason) or cancelled, and a
result is recorded once (one final state in its history) whatever ran twice.

The single deaths are tested elsewhere (tests/test_node.py, test_node_kills.py,
test_node_pipelining.py, test_client_death.py, test_hand_off.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from kotta_executor import TaskKilled, WorkerDied
from kotta_executor.states import FINAL
from tests import tasks
from tests.conftest import GUARD, ROOT, gone, subprocess_env, wait_for
from tests.test_client_death import _reply_messages
from tests.test_hand_off import stopped as stopped  # noqa: F401 - a fixture
from tests.test_node import _finals, _pids, _stop_process
from tests.test_node_pipelining import _pipe_behind_a_long_task

pytestmark = pytest.mark.timeout(300)

#: the average task time (s) under which these tests' nodes pipe tasks deep (as in
#: tests/test_node_pipelining.py: the node's own 2 ms is exceeded on a loaded machine)
PIPE_TINY = 0.05
#: tasks in a burst: enough for a node warmed up by a tiny task to pipe dozens into
#: each of its two workers
BURST = 400


def _lines(path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _burst(ex, runs, n: int = BURST, tag: str = "") -> list:
    """``n`` tiny tasks, each appending its own line to ``runs`` (which says how often
    each ran) and returning it."""
    return [ex.submit(tasks.append_line, str(runs), f"{tag}{i}") for i in range(n)]


def _each_recorded_once(enclave, fs, state: str = "completed") -> None:
    records = enclave.jobs.get_many([f.job_id for f in fs])
    for f in fs:
        assert records[f.job_id].state == state, (f.job_id, records[f.job_id].state)
        assert _finals(enclave, f.job_id) == [state]


# ---------------------------------------------------------------------- nodes killed


def test_a_node_killed_with_tasks_piped_deep_into_its_workers_loses_none(
        start_node, make_executor, enclave, tmp_path):
    runs = tmp_path / "runs"
    a = start_node(workers=2, tiny_task=PIPE_TINY)
    ex = make_executor(2, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4  # a tiny average: it pipes deep
    fs = _burst(ex, runs)
    wait_for(lambda: len(_lines(runs)) >= 20, what="some of the burst to run on node A")
    workers = a.worker_pids()
    a.kill()
    for pid in workers:
        wait_for(lambda pid=pid: gone(pid), what="A's workers to die with it")
    start_node(workers=2, tiny_task=PIPE_TINY)
    assert [f.result(GUARD) for f in fs] == [str(i) for i in range(BURST)]
    assert set(_lines(runs)) == {str(i) for i in range(BURST)}  # each at least once
    _each_recorded_once(enclave, fs)
    records = enclave.jobs.get_many([f.job_id for f in fs])
    assert all(records[f.job_id].attempts >= 1 for f in fs)


def _draining_behind_a_long_task(start_node, make_executor, enclave, log, release, runs):
    """A one-worker node with tasks piped behind a long one (_pipe_behind_a_long_task),
    told to stop (SIGTERM) and draining: ``(node, worker pid, head, behind, rest)``."""
    a = start_node(workers=1, tiny_task=PIPE_TINY)
    ex = make_executor(1, start_node=False)
    worker, head, behind, rest = _pipe_behind_a_long_task(
        enclave, ex, tasks.log_pid_and_wait, log, release, runs)
    a.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping on SIGTERM" in a.output(), what="node A to stop")
    return a, worker, head, behind, rest


def test_a_node_killed_while_it_drains_loses_no_task(start_node, make_executor, enclave,
                                                      tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    try:
        a, worker, head, behind, rest = _draining_behind_a_long_task(
            start_node, make_executor, enclave, log, release, runs)
        a.kill()
        wait_for(lambda: gone(worker), what="A's worker to die with it")
        b = start_node(workers=1, tiny_task=PIPE_TINY)
        wait_for(lambda: len(_pids(log)) == 2, what="the long task to run again on B")
        tasks.release(release, "go")
        assert head.result(GUARD) == _pids(log)[1]
        assert behind.result(GUARD) == "ran" and [f.result(GUARD) for f in rest] == [0, 1]
    finally:
        tasks.release(release, "go")
    assert runs.read_text() == "ran\n"  # once
    _each_recorded_once(enclave, [head, behind, *rest])
    assert {enclave.jobs.get(f.job_id).node for f in (head, behind, *rest)} == {b.node_id}


@pytest.mark.parametrize("stage", ["spawned", "registered", "serving"])
def test_a_node_killed_as_it_starts_loses_no_task(stage, start_node, make_executor, enclave,
                                                  tmp_path):
    runs = tmp_path / "runs"
    ex = make_executor(2, start_node=False)
    fs = _burst(ex, runs, 40)
    wait_for(lambda: len(enclave.jobs.get_many([f.job_id for f in fs])) == len(fs),
             what="the jobs to be recorded")
    a = start_node(workers=2, wait=stage != "spawned")
    if stage == "serving":
        wait_for(lambda: _lines(runs), what="node A to begin the tasks")
    a.kill()
    start_node(workers=2)
    assert [f.result(GUARD) for f in fs] == [str(i) for i in range(40)]
    _each_recorded_once(enclave, fs)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_executors_own_node_ended_in_a_burst_is_started_again_and_loses_none(
        sig, make_executor, enclave, tmp_path):
    runs = tmp_path / "runs"
    ex = make_executor(2)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    (first,) = ex._nodes.values()
    fs = _burst(ex, runs)
    wait_for(lambda: len(_lines(runs)) >= 20, what="some of the burst to run")
    first.send_signal(sig)
    first.wait(GUARD)
    assert [f.result(GUARD) for f in fs] == [str(i) for i in range(BURST)]
    assert first not in ex._nodes.values()  # (a new one ran the rest)
    assert set(_lines(runs)) == {str(i) for i in range(BURST)}
    _each_recorded_once(enclave, fs)


# ---------------------------------------------------------------------- nodes stopped


def test_a_node_stopped_past_its_visibility_timeout_then_let_go_on_records_nothing_twice(
        start_node, make_executor, enclave, stopped, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    a = start_node(workers=2, visibility_timeout=1, tiny_task=PIPE_TINY)
    ex = make_executor(2, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    long = [ex.submit(tasks.log_pid_and_wait, str(log), str(release)) for _ in range(2)]
    wait_for(lambda: len(_pids(log)) == 2, what="both long tasks to begin on node A")
    stopped(a)  # A's workers run on; it extends nothing: B takes both over
    try:
        b = start_node(workers=2, visibility_timeout=1, tiny_task=PIPE_TINY)
        wait_for(lambda: len(_pids(log)) == 4, what="node B to run both again")
        tasks.release(release, "go")  # all four copies end; A cannot report its own
        assert {f.result(GUARD) for f in long} <= set(b.worker_pids())
        small = _burst(ex, runs, 50)
        assert [f.result(GUARD) for f in small] == [str(i) for i in range(50)]
    finally:
        tasks.release(release, "go")
        os.kill(a.pid, signal.SIGCONT)
    # A goes on: its late results change nothing, and it serves on alone
    b.terminate()
    more = _burst(ex, runs, 20, "more-")
    assert [f.result(GUARD) for f in more] == [f"more-{i}" for i in range(20)]
    assert a.proc.poll() is None, a.output()[-3000:]
    _each_recorded_once(enclave, long)
    assert {enclave.jobs.get(f.job_id).node for f in long} == {b.node_id}


def test_a_node_stopped_with_tasks_piped_deep_then_let_go_on_records_each_once(
        start_node, make_executor, enclave, stopped, tmp_path):
    runs = tmp_path / "runs"
    a = start_node(workers=2, visibility_timeout=1, tiny_task=PIPE_TINY)
    ex = make_executor(2, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    fs = _burst(ex, runs)
    wait_for(lambda: len(_lines(runs)) >= 20, what="some of the burst to run on node A")
    stopped(a)  # (its workers run what is in their pipes; the results wait there)
    try:
        b = start_node(workers=2, visibility_timeout=1, tiny_task=PIPE_TINY)
        wait_for(lambda: all(f.done() for f in fs), what="node B to end the burst")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert [f.result(0) for f in fs] == [str(i) for i in range(BURST)]
    b.terminate()
    more = _burst(ex, runs, 50, "more-")
    assert [f.result(GUARD) for f in more] == [f"more-{i}" for i in range(50)]
    assert a.proc.poll() is None, a.output()[-3000:]
    assert set(_lines(runs)) >= {str(i) for i in range(BURST)}
    _each_recorded_once(enclave, fs)


def test_a_node_let_go_on_while_its_task_runs_again_elsewhere_records_one_result(
        start_node, make_executor, enclave, stopped, tmp_path):
    log, release = tmp_path / "pids", tmp_path / "release"
    a = start_node(workers=1, visibility_timeout=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    calls: list = []
    f.add_done_callback(calls.append)
    wait_for(lambda: len(_pids(log)) == 1, what="the task to begin on node A")
    stopped(a)
    try:
        b = start_node(workers=1, visibility_timeout=1)
        wait_for(lambda: len(_pids(log)) == 2, what="node B to run it again")
        os.kill(a.pid, signal.SIGCONT)  # both copies run on, on live nodes
    finally:
        tasks.release(release, "go")
    assert f.result(GUARD) in _pids(log)  # whichever was recorded first
    assert [m.result(GUARD) for m in [ex.submit(tasks.square, i) for i in range(20)]] == [
        i * i for i in range(20)]  # (let any stray reply arrive)
    assert calls == [f]
    _each_recorded_once(enclave, [f])
    assert a.proc.poll() is None and b.proc.poll() is None


def _begun_on_a_stopped_node(start_node, make_executor, stopped, log, release, *,
                             visibility_timeout: float = 1, **options):
    """A long task (its worker's pid logged) begun on a one-worker node A, which is then
    stopped (``stopped``): ``(A, its future, the pid of A's copy)``."""
    a = start_node(workers=1, visibility_timeout=visibility_timeout)
    ex = make_executor(1, start_node=False, **options)
    f = ex.submit(tasks.log_pid_and_wait, str(log), str(release))
    wait_for(lambda: len(_pids(log)) == 1, what="the task to begin on node A")
    first = _pids(log)[0]
    stopped(a)
    return a, f, first


def test_a_task_killed_while_its_stopped_nodes_copy_ran_elsewhere_ends_on_both(
        start_node, make_executor, enclave, stopped, tmp_path):
    log, release = tmp_path / "pids", tmp_path / "release"
    a, f, first = _begun_on_a_stopped_node(start_node, make_executor, stopped, log, release)
    try:
        start_node(workers=1, visibility_timeout=1)
        wait_for(lambda: len(_pids(log)) == 2, what="node B to run it again")
        assert f.kill()
        with pytest.raises(TaskKilled):
            f.result(GUARD)
        wait_for(lambda: gone(_pids(log)[1]), what="B's copy to be killed")
        os.kill(a.pid, signal.SIGCONT)
        wait_for(lambda: gone(first), what="A's copy of the killed task to be killed")
    finally:
        tasks.release(release, "go")
    _each_recorded_once(enclave, [f], "cancelled")
    assert a.proc.poll() is None



def test_a_stopped_nodes_worker_killed_while_its_task_runs_elsewhere_does_not_fail_the_job(
        start_node, make_executor, enclave, stopped, tmp_path):
    """Node A stopped past its visibility timeout (SIGSTOP, a laptop asleep), node B runs
    the task again, and A's worker is killed meanwhile (the OOM killer, an admin).  Let go
    on, A failed the job with WorkerDied for its own copy, under the copy B ran on, and
    B's result was dropped: the future raised WorkerDied for a task that succeeded."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a, f, first = _begun_on_a_stopped_node(start_node, make_executor, stopped, log, release)
    try:
        b = start_node(workers=1, visibility_timeout=1)
        wait_for(lambda: len(_pids(log)) == 2, what="node B to run it again")
        os.killpg(first, signal.SIGKILL)
        os.kill(a.pid, signal.SIGCONT)
        wait_for(lambda: f"worker {first} for job {f.job_id} ended" in a.output(),
                 what="node A to see its worker gone")
        assert enclave.jobs.get(f.job_id).state == "processing"  # B's copy runs on
    finally:
        tasks.release(release, "go")
    assert f.result(GUARD) == _pids(log)[1]  # B's
    _each_recorded_once(enclave, [f])
    assert enclave.jobs.get(f.job_id).node == b.node_id
    assert a.proc.poll() is None



def test_a_stopped_nodes_copy_past_its_walltime_does_not_fail_the_job_run_elsewhere(
        start_node, make_executor, enclave, stopped, tmp_path):
    """As above, for a copy that A, let go on, ends for its walltime: B's copy began at
    least A's visibility timeout (3 s) later, and has that much of its walltime left."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a, f, _ = _begun_on_a_stopped_node(start_node, make_executor, stopped, log, release,
                                       visibility_timeout=3, walltime=0.1)  # (6 s)
    try:
        b = start_node(workers=1)
        wait_for(lambda: len(_pids(log)) == 2, what="node B to run it again")
        os.kill(a.pid, signal.SIGCONT)
        wait_for(lambda: f"for job {f.job_id} ended" in a.output(),
                 what="node A to end its copy for its walltime")
    finally:
        tasks.release(release, "go")
    assert f.result(GUARD) == _pids(log)[1]  # B's
    _each_recorded_once(enclave, [f])
    assert enclave.jobs.get(f.job_id).node == b.node_id


# ---------------------------------------------------------------------- workers killed


def test_a_workers_process_group_killed_in_a_burst_of_piped_tasks_loses_no_other(
        start_node, make_executor, enclave, tmp_path):
    runs = tmp_path / "runs"
    node = start_node(workers=2, tiny_task=PIPE_TINY)
    ex = make_executor(2, start_node=False)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    fs = _burst(ex, runs)
    wait_for(lambda: len(_lines(runs)) >= 20, what="some of the burst to run")
    os.killpg(node.worker_pids()[0], signal.SIGKILL)  # (a worker leads its own group)
    wait_for(lambda: all(f.done() for f in fs), what="every task to end")
    failed = [f for f in fs if f.exception() is not None]
    assert len(failed) <= 1  # the one that worker ran, if it ran one
    for f in failed:
        assert isinstance(f.exception(), WorkerDied)
        assert enclave.jobs.get(f.job_id).reason.startswith("WorkerDied: ")
    done = [f for f in fs if f.exception() is None]
    ran = _lines(runs)
    assert all(ran.count(f.result()) == 1 for f in done)  # those piped behind it: once
    _each_recorded_once(enclave, done)
    _each_recorded_once(enclave, failed, "failed")
    assert node.proc.poll() is None
    assert ex.submit(tasks.square, 3).result(GUARD) == 9


def test_a_workers_group_killed_as_its_node_drains_fails_its_task_and_loses_no_other(
        start_node, make_executor, enclave, tmp_path):
    log, release, runs = tmp_path / "pids", tmp_path / "release", tmp_path / "runs"
    try:
        a, worker, head, behind, rest = _draining_behind_a_long_task(
            start_node, make_executor, enclave, log, release, runs)
        os.killpg(worker, signal.SIGKILL)
        assert a.proc.wait(GUARD) == 0, a.output()
        b = start_node(workers=1, tiny_task=PIPE_TINY)
        with pytest.raises(WorkerDied):
            head.result(GUARD)
        assert behind.result(GUARD) == "ran" and [f.result(GUARD) for f in rest] == [0, 1]
    finally:
        tasks.release(release, "go")
    assert runs.read_text() == "ran\n"
    _each_recorded_once(enclave, [head], "failed")
    _each_recorded_once(enclave, [behind, *rest])
    for f in (behind, *rest):  # handed back never begun: B's attempt is the only one
        job = enclave.jobs.get(f.job_id)
        assert (job.node, job.attempts) == (b.node_id, 1)


# ---------------------------------------------------------------------- clients


# Submits a burst from two threads (tiny tasks, and every fiftieth one that waits for a
# file the test writes once this client is dead), and SIGKILLs itself mid-burst, once the
# enclave has recorded some of them.
BURST_CLIENT = '''
import os, signal, sys, threading
from kotta_executor import KottaExecutor
from tests import tasks
enclave, release, runs = sys.argv[1:4]
ex = KottaExecutor(2, enclave=enclave, start_node=False)
assert ex.submit(tasks.square, 2).result(60) == 4
def burst(k):
    for i in range(100000):
        if i % 50 == 0:
            ex.submit(tasks.wait_for_file, release)
        else:
            ex.submit(tasks.append_line, runs, f"{k}-{i}")
for k in range(2):
    threading.Thread(target=burst, args=(k,), daemon=True).start()
while len(ex.enclave.jobs.list(limit=10000)) < 400:
    pass
print(ex.client_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_client_killed_mid_burst_leaves_no_job_unended(start_node, enclave, enclave_dir,
                                                         tmp_path):
    node = start_node(workers=2, tiny_task=PIPE_TINY)
    release, runs = tmp_path / "release", tmp_path / "runs"
    client = subprocess.run(
        [sys.executable, "-c", BURST_CLIENT, str(enclave_dir), str(release), str(runs)],
        env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=GUARD,
    )
    assert client.returncode == -9, client.stderr
    client_id = client.stdout.strip()
    tasks.release(release, "released")
    ids = [j.job_id for j in enclave.jobs.list(limit=100000)]
    assert len(ids) >= 400
    wait_for(lambda: all(r.state in FINAL for r in enclave.jobs.get_many(ids).values()),
             what="every job of the dead client to end")
    records = enclave.jobs.get_many(ids)
    assert {r.client for r in records.values()} == {client_id}
    assert {str(r.state) for r in records.values()} == {"completed"}
    wait_for(lambda: _reply_messages(enclave_dir, client_id) == 0,
             what="the dead client's replies to go")
    assert node.proc.poll() is None
    ran = _lines(runs)
    assert len(ran) == len(set(ran))  # once each


# Submits a burst (squares, and tasks that print), says when the enclave has recorded all
# of it, then waits for every result and says how they came out.
STOPPED_CLIENT = '''
import json, sys, time
from kotta_executor import KottaExecutor
from tests import tasks
enclave, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ex = KottaExecutor(2, enclave=enclave, start_node=False)
assert ex.submit(tasks.square, 2).result(60) == 4
fs = [ex.submit(tasks.chatty, 2000) if i % 2 else ex.submit(tasks.square, i) for i in range(n)]
while len(ex.enclave.jobs.get_many([f.job_id for f in fs])) < n:
    time.sleep(0.01)
tasks.release(out, json.dumps([f.job_id for f in fs]))
print(json.dumps([f.result(120) for f in fs]), flush=True)
'''


def test_a_client_stopped_while_its_burst_ends_gets_every_result_when_let_go_on(
        start_node, enclave, enclave_dir, tmp_path):
    start_node(workers=2, tiny_task=PIPE_TINY)
    out, n = tmp_path / "out", 3000
    client = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLIENT, str(enclave_dir), str(out), str(n)],
        env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for(out.exists, what="the client to send its burst")
        _stop_process(client.pid)  # (its inbox fills up: replies go on its reply queue)
        ids = json.loads(out.read_text())
        wait_for(lambda: all(r.state in FINAL for r in enclave.jobs.get_many(ids).values()),
                 what="the burst to end")
        os.kill(client.pid, signal.SIGCONT)
        said, err = client.communicate(timeout=GUARD)
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGCONT)
            client.kill()
            client.wait()
    assert client.returncode == 0, err[-3000:]
    assert json.loads(said) == [("done" if i % 2 else i * i) for i in range(n)]
