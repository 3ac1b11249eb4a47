"""Shared fixtures: a fresh embedded enclave per test, executors, and real node processes.

Nothing here replaces project code: nodes are ``python -m node`` processes, workers are real
subprocesses, the enclave is a real SQLite file under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from kotta_executor import KottaExecutor
from kotta_executor.backends.embedded import EmbeddedEnclave

#: the backends a test of both runs on (``open_backend``)
BACKENDS = ("aws", "embedded")


@contextlib.contextmanager
def open_backend(name: str, tmp_path: Path):
    """A fresh enclave of the backend ``name`` (``BACKENDS``): embedded, under
    ``tmp_path``; AWS, on moto in this process.  Closed after."""
    if name == "aws":
        from tests.aws_moto import aws_on_moto

        with aws_on_moto(tmp_path) as enclave:
            yield enclave
        return
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        yield enclave
    finally:
        enclave.close()


ROOT = Path(__file__).resolve().parent.parent
#: deadlock guard for waits in tests; never a performance expectation
GUARD = 60.0


def thread_frame(ident: int):
    """The frame a thread runs (``sys._current_frames()[ident]``; None if none), with the
    garbage collector held meanwhile.  On Python 3.11 a collection that comes as
    _current_frames allocates, while it holds the runtime's lock on the thread list, and
    frees a ``threading.local`` (an enclave's), which takes that lock again, deadlocks the
    process (CPython gh-106883, fixed in 3.12 only): a fresh clone's suite hung for good
    in test_executor_races on it."""
    import gc

    held = gc.isenabled()
    if held:
        gc.disable()
    try:
        return sys._current_frames().get(ident)
    finally:
        if held:
            gc.enable()


def wait_for(predicate, timeout: float = GUARD, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` (a deadlock guard)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pump(node, predicate, what: str) -> None:
    """Step an in-process node until ``predicate()`` (GUARD at most)."""
    deadline = time.monotonic() + GUARD
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        node.step()


def pytest_sessionstart(session) -> None:
    """Write the project's bytecode once.  The tests start many node and worker processes
    from this source tree; where ``PYTHONDONTWRITEBYTECODE`` is set (as on the CI machines)
    each would otherwise compile every module it imports again, about 0.2 s a process.
    ``compileall`` writes the standard ``__pycache__`` files (ignored by git) whatever that
    variable says, and Python reads them either way."""
    import compileall

    for package in ("kotta_executor", "node"):
        compileall.compile_dir(ROOT / package, quiet=2)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not reaped yet counts).  In one try:
    ``not pid_exists(pid) or Process(pid).status() == "zombie"`` raises NoSuchProcess when
    the process ends between the two."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one and a half test processes a core, not one.
    A test spends most of its time waiting for node and worker processes, which need the
    cores meanwhile: on 2 cores the suite used about 1.3 of them with two test processes
    (590 s), 1.5 with three (500 s).  ``--maxprocesses`` caps it."""
    return max(2, (3 * (os.cpu_count() or 1)) // 2)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(autouse=True)
def _private_kotta_home(tmp_path, monkeypatch):
    """No test touches ~/.kotta: $KOTTA_HOME is the test's own directory."""
    home = tmp_path / "kotta-home"
    monkeypatch.setenv("KOTTA_HOME", str(home))
    monkeypatch.delenv("KOTTA_ENCLAVE", raising=False)
    return home


@pytest.fixture
def enclave_dir(tmp_path) -> Path:
    return tmp_path / "enclave"


@pytest.fixture
def enclave(enclave_dir) -> EmbeddedEnclave:
    e = EmbeddedEnclave(enclave_dir)
    yield e
    e.close()


def _finish(ex: KottaExecutor) -> None:
    """Kill what is left, shut down; an executor whose jobs never end (a test that failed
    with its tasks held by a node it stopped) is an error after GUARD, not a hung run."""
    pending = [f for f in list(ex._futures.values()) if not f.done()]
    for f in pending:
        f.kill()
    ex.shutdown(wait=False, cancel_futures=True)
    manager = ex._manager
    if manager is not None and manager is not threading.current_thread():
        manager.join(GUARD)
        if manager.is_alive():
            from kotta_executor import executor as executor_module

            executor_module._live_executors.discard(ex)  # nor wait for it at exit
            stuck = [f.job_id for f in list(ex._futures.values()) if not f.done()]
            raise AssertionError(
                f"the executor did not shut down within {GUARD} s: jobs {stuck} never ended"
            )


@pytest.fixture
def executor(enclave_dir):
    """A KottaExecutor with 2 workers on a fresh enclave; it starts its own local node."""
    ex = KottaExecutor(2, enclave=enclave_dir)
    yield ex
    _finish(ex)


@pytest.fixture
def make_executor(enclave_dir):
    made: list[KottaExecutor] = []

    def make(*args, **kwargs) -> KottaExecutor:
        kwargs.setdefault("enclave", enclave_dir)
        ex = KottaExecutor(*args, **kwargs)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        _finish(ex)


def make_user(enclave: EmbeddedEnclave | object, name: str, token_dir: Path, *, role: str = "analyst",
              admin: bool = False) -> Path:
    """Register ``name`` with the enclave (the OS user, its first admin, adds them) and
    write their token file; the path goes to ``KottaExecutor(credentials=...)``."""
    from kotta_executor.security import credentials
    from kotta_executor.security.audit import AuditLog
    from kotta_executor.security.tokens import TokenService

    boss = credentials.load(enclave)
    svc = TokenService(enclave, AuditLog(enclave))
    if svc.user(name) is None:
        svc.add_user(name, role, admin=admin, by=boss.user)
    path = token_dir / f"{name}.token"
    credentials.register(enclave, svc.issue_refresh(name, by=boss.user), path)
    return path


@pytest.fixture
def user_token(enclave_dir, tmp_path):
    """``user_token("alice", role="analyst")``: a token file for a registered user."""
    enclaves: list[EmbeddedEnclave] = []

    def make(name: str, *, role: str = "analyst", admin: bool = False) -> Path:
        if not enclaves:
            enclaves.append(EmbeddedEnclave(enclave_dir))
        return make_user(enclaves[0], name, tmp_path / "tokens", role=role, admin=admin)

    yield make
    for e in enclaves:
        e.close()


class NodeProcess:
    """A ``python -m node`` process on the test's enclave."""

    def __init__(self, proc: subprocess.Popen, node_id: str, log: Path):
        self.proc = proc
        self.node_id = node_id
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = GUARD) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the node (its workers are left to die with their pipes)."""
        self.proc.kill()
        self.proc.wait(GUARD)

    def worker_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.Error:
            return []


#: ``python -m node`` with its pool's TINY_TASK set to argv[1] (start_node's tiny_task)
_NODE_WITH_TINY_TASK = (
    "import runpy, sys; import node.pool; node.pool.TINY_TASK = float(sys.argv.pop(1)); "
    "runpy.run_module('node', run_name='__main__')"
)


@pytest.fixture
def start_node(enclave_dir, tmp_path):
    """Start real node processes: ``start_node(workers=1, queue="test", *extra_args)``
    (``python=``: another interpreter's, ``env=``: more environment variables)."""
    started: list[NodeProcess] = []
    enclave = EmbeddedEnclave(enclave_dir)

    def start(*extra: str, workers: int = 1, queue: str = "test", wait: bool = True,
              visibility_timeout: float = 30.0, python: str = sys.executable,
              env: dict[str, str] | None = None, tiny_task: float | None = None) -> NodeProcess:
        node_id = os.urandom(6).hex()
        log = tmp_path / f"node-{node_id}.log"
        # (tiny_task: the node's pool.TINY_TASK, the average under which it pipes tasks
        # deep; a test of pipelining on a loaded machine saw its 2 ms exceeded)
        node = ["-m", "node"] if tiny_task is None else ["-c", _NODE_WITH_TINY_TASK, str(tiny_task)]
        cmd = [
            python, *node, "--enclave", str(enclave_dir), "--queue", queue,
            "--workers", str(workers), "--node-id", node_id,
            "--visibility-timeout", str(visibility_timeout), "--poll-interval", "0.1", *extra,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env={**subprocess_env(), **(env or {})}, stdout=out,
                                    stderr=out,
                                    stdin=subprocess.DEVNULL, cwd=str(ROOT))
        node = NodeProcess(proc, node_id, log)
        started.append(node)
        if wait:
            wait_for(
                lambda: proc.poll() is not None
                or any(n.node_id == node_id for n in enclave.nodes.live()),
                what=f"node {node_id} to register",
            )
            assert proc.poll() is None, f"node exited early:\n{node.output()}"
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(GUARD)
        for pid in node.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    enclave.close()


def queue_crafted_task(enclave, ex, edit, *, signed: bool = True) -> str:
    """Queue a task of ``tests.tasks.square(2)`` whose header ``edit(header)`` changes:
    signed by ``ex``'s owner (else with a MAC of a key no one has), its job recorded as
    an ordinary one.  Returns the job id."""
    from kotta_executor import wire
    from kotta_executor.backends.base import NewJob
    from kotta_executor.security import credentials
    from tests import tasks

    job_id = os.urandom(16).hex()
    header = wire.task_header(job_id=job_id, owner=ex.owner, client=ex.client_id, queue="test",
                              walltime=60.0, created=time.time(), fn="tests.tasks.square", n=1)
    edit(header)
    call = wire.dump_call(tasks.square, [((2,), {})])
    body = (credentials.load(enclave).access().sign(header, call) if signed
            else wire.encode(header, call, mac_key=b"k" * 32))
    enclave.jobs.create([NewJob(job_id, ex.owner, ex.client_id, "test", header["fn"], 60.0, body)])
    return job_id


def node_outlives(node, enclave, job_id: str):
    """Wait until ``node`` has ended the job ``job_id`` (or died), and say it did not die;
    the job's record."""
    from kotta_executor.states import FINAL

    wait_for(lambda: node.proc.poll() is not None or enclave.jobs.get(job_id).state in FINAL,
             what="the node to refuse the task (or die)")
    assert node.proc.poll() is None, f"the node died:\n{node.output()[-2000:]}"
    return enclave.jobs.get(job_id)


def kill_pid_in(path: Path) -> None:
    """SIGKILL the process whose pid the file ``path`` holds, if it exists (a daemon a
    test's task started), and is still there."""
    if path.exists():
        try:
            os.kill(int(path.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
