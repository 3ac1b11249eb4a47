"""Lifecycle bugs found in review: node/scaler.py, kotta down, the executor's own node."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

from kotta_executor import executor as executor_module
from node.scaler import pid_file
from tests import tasks
from tests.conftest import GUARD, ROOT, subprocess_env, wait_for

pytestmark = pytest.mark.timeout(240)


def _cmdline(p: psutil.Process) -> list[str]:
    """A child's command line; none for one that ended as the test listed it (a zombie
    raises): not a node still running."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_everything(enclave, extra: list[int] = ()) -> None:
    pids = list(extra)
    try:
        pids.append(int(pid_file(enclave.home, "test").read_text().splitlines()[0]))
    except (OSError, ValueError):
        pass
    for n in enclave.nodes.all():
        pids.append(n.pid)
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if "node" in p.cmdline() or "node.scaler" in p.cmdline():
                for c in p.children(recursive=True):
                    _kill(c.pid)
                _kill(pid)
        except psutil.Error:
            pass


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------
# 1. the scaler replaces nodes that registered and ran, however many die over its life


def test_scaler_keeps_replacing_nodes_that_ran_fine_before_dying(enclave, tmp_path):
    cmd = [sys.executable, "-m", "node.scaler", "--enclave", str(enclave.home), "--queue", "test",
           "--min", "1", "--max", "1", "--cooldown", "60", "--interval", "0.1",
           "--logs", str(tmp_path / "logs"), "--",
           "--enclave", str(enclave.home), "--queue", "test", "--workers", "1",
           "--poll-interval", "0.1"]
    log = open(tmp_path / "scaler.log", "wb")  # noqa: SIM115
    scaler = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL)
    log.close()
    seen: set[str] = set()
    try:
        for _ in range(6):
            # a node registers (a healthy start), then dies later (OOM killer, a crash...)
            nodes = wait_for(
                lambda: scaler.poll() is not None
                or [n for n in enclave.nodes.live("test") if n.node_id not in seen],
                what="a new node of the pool to register")
            assert scaler.poll() is None, (
                f"the scaler exited ({scaler.returncode}) after {len(seen)} nodes that had "
                f"registered and run died:\n{(tmp_path / 'scaler.log').read_text()}")
            [node] = nodes
            seen.add(node.node_id)
            os.kill(node.pid, signal.SIGKILL)
            wait_for(lambda gone=node.node_id: all(n.node_id != gone for n in enclave.nodes.live()),
                     what="the killed node to be seen dead")
    finally:
        # the nodes it started, registered or not yet (one started just now would be in no
        # table, and would run on, its parent gone): the scaler stopped first, so that it
        # starts none between this look and its end
        try:
            os.kill(scaler.pid, signal.SIGSTOP)
            started = [c.pid for c in psutil.Process(scaler.pid).children(recursive=True)]
        except (OSError, psutil.Error):
            started = []
        if scaler.poll() is None:
            scaler.kill()
        scaler.wait(GUARD)
        _kill_everything(enclave, started)


# --------------------------------------------------------------------------------------
# 2. the executor restarts its node, stopped now and then, as often as it takes


def test_executor_survives_its_node_being_stopped_now_and_then(make_executor, enclave, monkeypatch):
    # one stop more than the executor restarts a node that keeps dying (a lower limit
    # than the real one, for a shorter test: the count is what is under test)
    monkeypatch.setattr(executor_module, "MAX_NODE_RESTARTS", 2)
    ex = make_executor(1)  # starts its own node
    try:
        seen: set[str] = set()
        for i in range(executor_module.MAX_NODE_RESTARTS + 2):
            assert ex.submit(tasks.square, i).result(GUARD) == i * i
            if i == 0:
                pipes = _pipes()
            else:  # (each node's pipe to the executor: closed once it has ended)
                assert _pipes() == pipes
            [node] = [n for n in enclave.nodes.live("test") if n.managed_by == ex.client_id]
            assert node.node_id not in seen
            seen.add(node.node_id)
            # e.g. `kotta down`, or an admin stopping stray nodes: a clean drain, exit 0
            os.kill(node.pid, signal.SIGTERM)
            wait_for(lambda pid=node.pid: not _running(pid), what="the node to drain and exit")
    finally:
        for n in enclave.nodes.all():
            if n.managed_by == ex.client_id and _running(n.pid):
                _kill(n.pid)


def _pipes() -> int:
    """How many pipes this process has open."""
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            out += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:  # (the directory's own descriptor, closed as it is listed)
            pass
    return out


def test_a_node_that_keeps_dying_breaks_the_executor_naming_its_log(make_executor, enclave,
                                                                    monkeypatch):
    """The reason a node died is in its log (a traceback, a damaged database): the error
    said only how often and with which exit code, not where to look."""
    from kotta_executor import BrokenEnclave

    monkeypatch.setattr(executor_module, "MAX_NODE_RESTARTS", 1)
    ex = make_executor(1)  # starts its own node
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    for i in range(2):
        [node] = [n for n in enclave.nodes.live("test") if n.managed_by == ex.client_id]
        _kill(node.pid)  # not a clean stop: a death, counted
        wait_for(lambda pid=node.pid: not _running(pid), what="the node to die")
        f = ex.submit(tasks.square, 3)
        if i == 0:
            assert f.result(GUARD) == 9  # started again, once
            continue
        with pytest.raises(BrokenEnclave) as info:
            f.result(GUARD)
    log = enclave.home / "logs" / f"node-{ex.client_id}-test.log"
    last = log.read_text().strip().splitlines()[-1].strip()
    assert str(info.value) == (f"the local node for queue 'test' died 2 times (last exit code "
                               f"-9); its log, {log}, ends: {last}")


# --------------------------------------------------------------------------------------
# 3. the executor's node stops when the executor is SIGKILLed, reaped or not

CLIENT = '''
import sys
from kotta_executor import KottaExecutor
from tests import tasks
ex = KottaExecutor(1, enclave=sys.argv[1])
print(ex.submit(tasks.square, 3).result(60), flush=True)
sys.stdin.read()  # until killed
'''


def test_node_stops_when_its_executor_is_killed_even_before_it_is_reaped(enclave, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    client = subprocess.Popen([sys.executable, str(script), str(enclave.home)],
                              env=subprocess_env(), cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    node_pid = None
    try:
        assert client.stdout.readline().strip() == "9"
        [node] = [n for n in enclave.nodes.live("test") if n.managed_by]
        node_pid = node.pid
        os.kill(client.pid, signal.SIGKILL)  # not reaped yet: a zombie for a while
        wait_for(lambda: psutil.Process(client.pid).status() == psutil.STATUS_ZOMBIE,
                 what="the client to die")
        # the node checks its parent every second; give it ample time
        try:
            wait_for(lambda: not _running(node_pid), timeout=15, what="the node to stop")
        except AssertionError:
            pytest.fail(f"node {node_pid} still serves 15 s after its executor was SIGKILLed")
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(GUARD)
        if node_pid is not None and _running(node_pid):
            wait_for(lambda: not _running(node_pid), timeout=15, what="the node to stop "
                     "once its parent is reaped")


# --------------------------------------------------------------------------------------
# 4. two executors that find no node at the same moment start one between them


def test_two_executors_starting_together_start_one_node(make_executor, enclave):
    a = make_executor(1)
    b = make_executor(1)
    fa = a.submit(tasks.square, 2)  # both managers look at the nodes before either registers
    fb = b.submit(tasks.square, 3)
    assert (fa.result(GUARD), fb.result(GUARD)) == (4, 9)
    live = enclave.nodes.live("test")
    assert len(live) == 1, f"{len(live)} local nodes serve queue test: {live}"


# --------------------------------------------------------------------------------------
# 5. an executor that closes leaves its node to another executor of the process using it


def test_an_executor_shut_down_leaves_its_node_to_another_that_runs_tasks_there(
        make_executor, enclave, tmp_path):
    """Executor A started the local node; B, made later in the same process, found it and
    ran its task there.  A's shutdown stopped the node: it waited out the node's drain
    (30 s), and B's task, killed at its end, ran again from the start.  The node goes to B
    now, and stops with B."""
    log, release = tmp_path / "pids", tmp_path / "release"
    a = make_executor(1)
    assert a.submit(tasks.square, 2).result(GUARD) == 4
    [node] = enclave.nodes.live("test")
    b = make_executor(1)
    f = b.submit(tasks.log_pid_and_wait, str(log), str(release))
    try:
        wait_for(lambda: log.exists() and log.read_text(), what="B's task to start")
        a.shutdown()
        assert _running(node.pid), "A's shutdown stopped the node B's task runs on"
    finally:
        tasks.release(release, "go")
    assert f.result(GUARD) == int(log.read_text().split()[0])
    assert len(log.read_text().split()) == 1  # it ran once
    b.shutdown()
    assert not _running(node.pid)


_CLIENT_A = """
import sys
from kotta_executor import KottaExecutor
from tests import tasks
enclave, ready, go = sys.argv[1:4]
ex = KottaExecutor(1, enclave=enclave)
assert ex.submit(tasks.square, 2).result(60) == 4
open(ready, "w").close()
tasks.wait_for_file(go, 120)
ex.shutdown()
print("A shut down")
"""


@contextlib.contextmanager
def _client_a(enclave, tmp_path):
    """Another process's executor (A), its own node serving queue test: yields the process,
    the node, and the file that, made, shuts A's executor down; A is ended at the end."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    a = subprocess.Popen([sys.executable, "-c", _CLIENT_A, str(enclave.home), str(ready),
                          str(go)], env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready.exists() or a.poll() is not None, what="A's node to serve")
        assert a.poll() is None, a.communicate()
        [node] = enclave.nodes.live("test")
        yield a, node, go
    finally:
        tasks.release(go, "go")
        if a.poll() is None:
            a.kill()
            a.wait()


def test_an_executor_shut_down_lets_another_process_task_on_its_node_finish(
        make_executor, enclave, tmp_path):
    """As above, with B in another process (a second notebook on the machine), where no
    hand-over reaches: A's shutdown waited out its node's drain (30 s), and B's running
    task, killed at its end, ran again from the start on a node B then started.  Now the
    node leaves the queue (B starts a node of its own for what it queues), finishes B's
    task, and ends; A's shutdown does not wait for that."""
    log, release = tmp_path / "pids", tmp_path / "release"
    with _client_a(enclave, tmp_path) as (a, node, go):
        try:
            b = make_executor(1)  # (it finds A's node serving, and starts none)
            f = b.submit(tasks.log_pid_and_wait, str(log), str(release))
            wait_for(lambda: log.exists() and log.read_text(), what="B's task to start")
            g = b.submit(tasks.square, 5)  # (queued behind it)
            tasks.release(go, "go")
            out, err = a.communicate(timeout=GUARD)
            assert (a.returncode, out) == (0, "A shut down\n"), err
            assert _running(node.pid), "A's shutdown ended the node B's task runs on"
            assert node.node_id not in {n.node_id for n in enclave.nodes.all()}  # it left
        finally:
            tasks.release(release, "go")
    assert f.result(GUARD) == int(log.read_text().split()[0])
    assert len(log.read_text().split()) == 1  # it ran once
    assert g.result(GUARD) == 25
    wait_for(lambda: not _running(node.pid), what="the node to end once B's task ended")


_CLIENT_MANY_FDS = """
import os, sys
from kotta_executor import KottaExecutor
from tests import tasks
ex = KottaExecutor(1, enclave=sys.argv[1])
assert ex.submit(tasks.square, 2).result(60) == 4
[first] = ex._nodes.values()
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # (a notebook's files)
first.kill()
first.wait()
assert ex.submit(tasks.square, 3).result(60) == 9  # (its node started again)
[node] = ex._nodes.values()
print(node.pid, flush=True)
ex.shutdown()
print("shut down")
"""


def test_an_executor_shut_down_in_a_process_with_many_files_open_stops_its_node(enclave):
    """The pipe of a node started once the process held over a thousand files (a fd over
    select()'s FD_SETSIZE): the shutdown's wait for the node failed with 'ValueError:
    filedescriptor out of range in select()' in the manager thread, which closed nothing
    more after it (its claims, its reply queue, its enclave)."""
    a = subprocess.run([sys.executable, "-c", _CLIENT_MANY_FDS, str(enclave.home)],
                       env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=GUARD)
    assert a.returncode == 0, a.stderr
    pid, done = a.stdout.split("\n")[:2]
    assert done == "shut down", a.stderr
    assert "Traceback" not in a.stderr, a.stderr
    wait_for(lambda: not _running(int(pid)), what="the node to end")


def test_kotta_down_of_an_executors_node_keeps_its_drain_for_another_process_task(
        make_executor, enclave, tmp_path):
    """`kotta down` (SIGTERM) is not the executor's own stop (SIGUSR1): the node keeps its
    documented drain, in the registry, rather than leave the queue to finish the other
    process's task for as long as it takes, out of reach of the next `kotta down`."""
    log, release = tmp_path / "pids", tmp_path / "release"
    with _client_a(enclave, tmp_path) as (a, node, go):
        try:
            b = make_executor(1, start_node=False)
            f = b.submit(tasks.log_pid_and_wait, str(log), str(release))
            wait_for(lambda: log.exists() and log.read_text(), what="B's task to start")
            down = subprocess.run(
                [sys.executable, "-m", "kotta_executor.cli", "--enclave", str(enclave.home),
                 "down", "--timeout", "1"], env=subprocess_env(), cwd=ROOT,
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=GUARD)
            assert (f"node {node.node_id} (pid {node.pid}, queue test) still stopping"
                    in down.stdout)
            assert node.node_id in {n.node_id for n in enclave.nodes.all()}  # (not left)
        finally:
            tasks.release(release, "go")  # it finishes within its drain, and stops
        assert f.result(GUARD) == int(log.read_text().split()[0])
        wait_for(lambda: not _running(node.pid), what="the node to stop")
        tasks.release(go, "go")
        out, err = a.communicate(timeout=GUARD)
        assert (a.returncode, out) == (0, "A shut down\n"), err


# --------------------------------------------------------------------------------------
# 6. kotta down stops an idle executor's node for good; work starts one again


def test_kotta_down_stops_an_idle_executors_node_until_it_has_work_again(make_executor,
                                                                         enclave):
    """The guide: an executor that still has work, or gets more, starts its node again.
    An idle one started it again at once, so `kotta down` could not stop it."""
    ex = make_executor(1)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    [node] = enclave.nodes.live("test")
    down = subprocess.run([sys.executable, "-m", "kotta_executor.cli", "--enclave",
                           str(enclave.home), "down"], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=GUARD)
    assert down.returncode == 0, down.stdout + down.stderr
    # the executor's manager has seen it end once it has reaped it (it is our child)
    wait_for(lambda: not psutil.pid_exists(node.pid), what="the executor to reap its node")
    assert enclave.nodes.live() == []
    assert not [p for p in psutil.Process().children() if "node" in _cmdline(p)]
    assert ex.submit(tasks.square, 4).result(GUARD) == 16  # work: a node again
    assert len(enclave.nodes.live("test")) == 1


# --------------------------------------------------------------------------------------
# 4. the logs of the executor's own nodes: removed after a clean stop with nothing to say


def _node_logs(enclave, ex) -> list:
    logs = enclave.home / "logs"
    return sorted(logs.glob(f"node-{ex.client_id}-*.log")) if logs.exists() else []


def test_a_clean_executors_node_log_is_removed_at_shutdown(make_executor, enclave):
    """Every executor that started a node left a log of its own in $KOTTA_HOME/logs,
    for ever: a notebook's day of executors piled up hundreds of them."""
    ex = make_executor(1)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    [log] = _node_logs(enclave, ex)  # (it logs as it serves)
    assert "serving queue test" in log.read_text()
    ex.shutdown()
    assert _node_logs(enclave, ex) == []


def test_a_node_log_with_a_warning_is_kept(make_executor, enclave):
    ex = make_executor(1)
    f = ex.submit(tasks.exit_hard, 7)  # its worker dies: the node says so, a warning
    with pytest.raises(Exception, match="exit"):
        f.result(GUARD)
    ex.shutdown()
    [log] = _node_logs(enclave, ex)
    assert f"for job {f.job_id} ended" in log.read_text()


def test_the_log_of_a_node_that_died_and_was_started_again_is_kept_and_says_so(
        make_executor, enclave):
    ex = make_executor(1)
    assert ex.submit(tasks.square, 2).result(GUARD) == 4
    [node] = [n for n in enclave.nodes.live("test") if n.managed_by == ex.client_id]
    _kill(node.pid)
    wait_for(lambda: not _running(node.pid), what="the node to die")
    assert ex.submit(tasks.square, 3).result(GUARD) == 9  # on the node started again
    ex.shutdown()
    [log] = _node_logs(enclave, ex)
    text = log.read_text()
    assert f"the node (pid {node.pid}) exited with -9; starting another" in text
    assert text.count("serving queue test") == 2
