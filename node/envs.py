"""Virtual environments for tasks with ``requirements``, built once per machine and cached.

Layout: ``ROOT/<sha256 of the normalised requirement set>-<interpreter>/`` (``env_name``;
the interpreter as ``cpython-312``: nodes of two Python versions may share ROOT, and a
venv's packages are built for one) is a finished environment (a
venv made with ``--system-site-packages``, so the node's own packages — kotta_executor,
cloudpickle, tblib, psutil — stay importable, with the node's site-packages directories on
its workers' path for a node in a venv of its own: ``pool.spawn``; its ``.kotta-ready``
marker lists the set).
``ROOT/<name>.lock`` (``<name>``: ``env_name``'s) serialises builds between processes
(``flock``, for LOCK_WAIT at most; its holder writes its pid there): a build takes the lock, looks again (another node may have finished meanwhile),
builds into ``ROOT/.<name>.tmp-*`` and renames that to ``ROOT/<name>`` — a directory that exists under its final name is
complete.  ROOT is ``$KOTTA_ENVS`` if set, else ``$KOTTA_HOME/envs`` for an embedded
enclave, else the node's cache directory (``$XDG_CACHE_HOME/kotta/envs``,
``~/.cache/kotta/envs``).

pip runs as ``python -m pip --python ENV/bin/python install ...`` with the node's
environment (minus what workers never see), so pip's own variables apply: ``PIP_INDEX_URL``,
``PIP_NO_INDEX=1`` with ``PIP_FIND_LINKS=DIR`` for an offline wheel directory, and so on;
but not those that would install elsewhere, or nothing, or more (``PIP_SCRUBBED``).

Builds run in a background thread, one per requirement set; the node keeps the tasks that
wait for one pending and is woken when it is done.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kotta_executor import config
from kotta_executor.errors import ConfigurationError
from kotta_executor.requirements import env_key, normalize

from . import pool

log = logging.getLogger("kotta.node")
MARKER = ".kotta-ready"
#: characters of pip's output kept in a RequirementsError
PIP_TAIL = 4000
#: seconds a build may take before it is abandoned as failed
BUILD_TIMEOUT = 1800.0
#: seconds a build waits for another process's build of the same set (its lock) before it
#: fails, naming that process: one stopped (SIGSTOP) or hung held the set's tasks here for
#: ever.  Longer than any build that ends (two steps of BUILD_TIMEOUT).
LOCK_WAIT = 2 * BUILD_TIMEOUT + 60.0
#: seconds between two looks at a lock another process holds
LOCK_POLL = 0.25
#: seconds a failed build stays failed (for the tasks that waited for it); then it is retried
FAILURE_TTL = 60.0
#: builds of a set killed by a signal in a row (BuildKilled) after which the set fails
#: (RequirementsError), rather than wait for a fault that does not pass
BUILD_KILLS = 2
#: seconds before a build the node's own fault stopped (out of file descriptors, of
#: memory, of processes) is tried again; its tasks wait meanwhile
FAULT_RETRY = 1.0


def default_root(local: bool) -> Path:
    if os.environ.get("KOTTA_ENVS"):
        return _expanded("KOTTA_ENVS", os.environ["KOTTA_ENVS"])
    if local:
        return config.kotta_home() / "envs"
    if os.environ.get("XDG_CACHE_HOME"):
        return _expanded("XDG_CACHE_HOME", os.environ["XDG_CACHE_HOME"]) / "kotta" / "envs"
    return _expanded("HOME", "~") / ".cache" / "kotta" / "envs"


def _expanded(variable: str, value: str) -> Path:
    """``value`` (of ``$variable``) with its ``~`` expanded.  A home that cannot be found
    (``~alcie/envs``, a user this machine has not; no home at all) killed the node at its
    start with a bare RuntimeError, naming neither the variable nor its value."""
    # (one read from a file with its newline, or pasted with a blank, was taken as it was:
    # a new, empty directory of environments beside the one meant, each set built again)
    config.check_not_blank(f"${variable}", value, "set it to a directory, or unset it")
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:
        raise ConfigurationError(f"cannot use ${variable} {value}: {exc}") from exc


def env_name(requirements: str) -> str:
    """The name of the environment of a (normalised) requirement set, for this node's
    Python: the set's hash and the interpreter's tag (``cpython-312``)."""
    return f"{env_key(requirements)}-{sys.implementation.cache_tag}"


def site_packages(env: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return env / "lib" / version / "site-packages"


class Env:
    """A finished environment: where its python is, and what to put first on sys.path."""

    def __init__(self, key: str, path: Path):
        self.key = key
        self.path = path
        self.python = str(path / "bin" / "python")
        self.site = str(site_packages(path))
        self.marker = str(path / MARKER)

    def usable(self) -> bool:
        """Whether it is there to start workers in: built, and its python (a link to the
        interpreter that built it, another install of this Python version maybe) still
        leads to one.  One removed since (``pyenv uninstall``, an upgrade) left the env
        taken as built, and the node died at each spawn of a worker there.  Nor one that
        has lost its exec bit (a chmod, a copy that dropped modes): every task of its set
        failed, until someone deleted the env."""
        return os.path.exists(self.marker) and os.access(self.python, os.X_OK)


class EnvCache:
    """The environments of one node: ready ones, builds in progress, failed builds."""

    def __init__(self, root: Path, wake: Callable[[], None]):
        self.root = Path(root)
        self._wake = wake
        self._lock = threading.Lock()
        self._ready: dict[str, Env] = {}
        self._building: set[str] = set()
        self._failed: dict[str, tuple[str, float]] = {}
        self._faulted: dict[str, tuple[OSError, float]] = {}
        #: builds of a set killed by a signal in a row (BuildKilled), up to BUILD_KILLS
        self._kills: dict[str, int] = {}
        #: builds that came to an end (built, found built by another process, or failed
        #: for their set's own reason): one since a fault of the node's own says that it
        #: has passed (Node._env_fault)
        self.ended = 0
        self.builds = Builds()

    def building(self) -> bool:
        """Whether a build runs now (its venv and pip processes are the node's children)."""
        with self._lock:
            return bool(self._building)

    def get(self, requirements: str) -> tuple[str, Env | str | OSError | None]:
        """``("ready", Env)``, ``("building", None)`` (a build has started; the node is woken
        when it ends), ``("failed", message)`` (for FAILURE_TTL seconds; then a task that
        asks again starts a new build) or ``("fault", OSError)``: the node's own fault
        stopped the build, not the set (for FAULT_RETRY seconds; then it is tried again)."""
        try:  # the header is not trusted: normalise (and refuse pip options) again
            requirements = normalize(requirements)
        except ConfigurationError as exc:
            return "failed", str(exc)
        key = env_name(requirements)
        with self._lock:
            env = self._ready.get(key)
            if env is not None:
                if env.usable():
                    return "ready", env
                # deleted (to rebuild it, say), or its interpreter gone: a worker started
                # there would not start
                del self._ready[key]
            if key in self._failed:
                message, at = self._failed[key]
                if time.monotonic() - at < FAILURE_TTL:
                    return "failed", message
                del self._failed[key]
            if key in self._faulted:
                exc, at = self._faulted[key]
                if time.monotonic() - at < FAULT_RETRY:
                    return "fault", exc
                del self._faulted[key]
            if key in self._building:
                return "building", None
            env = Env(key, self.root / key)
            if env.usable():  # built earlier, by this node or another
                self._ready[key] = env
                # a build come to an end, if another process's: one this node's own fault
                # stopped has passed (else its clock stayed, and the node gave up at its
                # next fault, however much later)
                self.ended += 1
                return "ready", env
            self._building.add(key)
        try:
            threading.Thread(
                target=self._build, args=(key, requirements), name=f"kotta-env-{key[:8]}",
                daemon=True,
            ).start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or threads,
            # the node's own fault, as EMFILE starting pip is; raised, it ended the node
            fault = OSError(errno.EAGAIN, f"cannot start a thread to build the env: {exc}")
            with self._lock:
                self._building.discard(key)
                self._faulted[key] = (fault, time.monotonic())
            return "fault", fault
        return "building", None

    def close(self) -> None:
        """End the builds that run (the node stops: their tasks were handed back)."""
        self.builds.stop()

    def _build(self, key: str, requirements: str) -> None:
        try:
            env = build(self.root, key, requirements, self.builds)
        except Exception as exc:  # noqa: BLE001 - any failure fails the tasks that wait
            with self._lock:
                kills = self._kills.pop(key, 0) + 1 if isinstance(exc, BuildKilled) else 0
                if kills >= BUILD_KILLS:
                    # killed at each try: the OOM killer's SIGKILL, for a set whose build
                    # needs more memory than the node has, say.  Taken for a passing fault
                    # each time, its tasks waited for ever (or each node that took them
                    # gave up in turn): the set fails, saying so
                    self._failed[key] = (f"{exc}, {kills} times in a row (out of memory? "
                                         "the OOM killer sends SIGKILL)", time.monotonic())
                    self.ended += 1
                elif kills or (isinstance(exc, OSError) and exc.errno in pool.PASSING_ERRNOS):
                    # the node's (EMFILE starting pip, say), not the set's: failed, every
                    # task of the set failed for FAILURE_TTL; they wait, as for a worker
                    self._faulted[key] = (exc, time.monotonic())
                    if kills:
                        self._kills[key] = kills
                else:
                    self._failed[key] = (str(exc), time.monotonic())
                    # (a failed install ends the kills in a row: kept, the set's next
                    # build, killed once, failed it at once, "2 times in a row")
                    self._kills.pop(key, None)
                    self.ended += 1
        else:
            with self._lock:
                self._ready[key] = env
                self._kills.pop(key, None)
                self.ended += 1
        finally:
            with self._lock:
                self._building.discard(key)
            self._wake()


class BuildError(Exception):
    pass


class BuildKilled(OSError):
    """A build step killed by a signal (the OOM killer's SIGKILL, an admin's SIGTERM) while
    the node was not stopping: the node's own passing fault, not the set's, whose tasks
    wait and whose build is tried again (it was cached as a failed install, and every
    task of a set that was fine failed with RequirementsError for FAILURE_TTL)."""


def build(root: Path, key: str, requirements: str, builds: Builds | None = None) -> Env:
    """Build (or find, if another process built it) the environment ``root/key``
    (``builds``: where its processes are tracked, for a stopping node to end them)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with open(root / f"{key}.lock", "a+b") as lock:
        _lock(lock, key, builds)  # released when the file is closed
        if Env(key, final).usable():
            return Env(key, final)
        if final.exists():  # not ours to trust: no marker, so never finished (or its
            # interpreter is gone)
            shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f".{key}.tmp-*"):  # a builder that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(tmp)], "creating the virtual environment", builds)
            reqs = tmp / "requirements.txt"
            reqs.write_text(requirements + "\n")
            _run([sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"),
                  "install", "--disable-pip-version-check", "--no-input", "-r", str(reqs)],
                 "pip install", builds)
            (tmp / MARKER).write_text(requirements + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Env(key, final)


def _lock(lock, key: str, builds: Builds | None) -> None:
    """Take the build lock of env ``key`` (``lock``, its open file), then write our pid in
    it, for a process that waits for it to name.  A flock dies with its holder: one held
    is held by a live process, stopped or hung maybe; wait for it LOCK_WAIT at most."""
    def holder() -> str:
        # (read from the file, not through its buffer, which keeps what was read before)
        pid = os.pread(lock.fileno(), 32, 0).decode(errors="replace").strip()
        # (a node of an earlier version wrote nothing)
        return f"pid {pid}" if pid.isdigit() else "a process that did not say its pid"

    deadline = time.monotonic() + LOCK_WAIT
    first = True
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        if first:
            first = False
            log.info("the environment %s waits for its build by another process (%s)",
                     key, holder())
        if builds is not None and builds.stopping():
            raise BuildError("waiting for another process's build: the node is stopping")
        if time.monotonic() > deadline:
            # its pid read again: the first look may have come as the holder had taken the
            # lock, and not yet written its pid over the one before (a process gone since)
            raise BuildError(
                f"the environment's build lock {lock.name} was held for longer than "
                f"{LOCK_WAIT:g} s by another process ({holder()}), stopped or hung maybe")
        time.sleep(LOCK_POLL)
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    lock.flush()


#: what runs each build step (``python -c _WATCHED NODE_PID CMD...``), at the head of its
#: session: it runs the step and, once the node has gone (killed outright: SIGKILL, the OOM
#: killer, which ends no build), kills the session, as a worker ends itself and its tasks
#: (node.worker._watch_parent).  Else pip ran on, orphaned, as long as its index kept it.
#: It ends as the step did (exit code, or the same signal).  Standard library only: it
#: runs without the node's path.
_WATCHED = """
import os, signal, subprocess, sys, threading, time
node = int(sys.argv[1])
step = subprocess.Popen(sys.argv[2:])
def watch():
    while step.poll() is None:
        if os.getppid() != node:
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.25)
threading.Thread(target=watch, daemon=True).start()
code = step.wait()
if code < 0:
    if -code != signal.SIGKILL:  # (which has no handler to reset: that raised, and this
        signal.signal(-code, signal.SIG_DFL)  # ended with exit code 1, a failed install)
    # the session too: what the step started (the pip that ``pip --python`` runs) ran
    # on, orphaned, holding the output pipe the node reads until it ends
    os.killpg(0, -code)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


class Builds:
    """The build processes running now (venv, pip) of one node's builds, each in a session
    of its own, which the node ends as it stops (:meth:`stop`); from then on, no build
    starts one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopped = False

    def start(self, cmd: list[str], env: dict[str, str], what: str) -> subprocess.Popen:
        with self._lock:
            if self._stopped:
                raise BuildError(f"{what}: the node is stopping")
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WATCHED, str(os.getpid()), *cmd],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            self._procs.add(proc)
            return proc

    def stopping(self) -> bool:
        with self._lock:
            return self._stopped

    def done(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        """End the builds running now, with what they started (pip's build backends):
        SIGTERM to each one's session, SIGKILL to what is left of it after the grace
        period.  (Else pip ran on, orphaned, after its node had exited.)"""
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        for proc in procs:
            _signal_session(proc, signal.SIGTERM)
        deadline = time.monotonic() + pool.KILL_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_session(proc, signal.SIGKILL)  # (what it started, if it went itself)


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


#: pip's variables an env build runs without: where pip installs (the user's own
#: installs' settings: the packages went outside the env), whether it installs
#: (``--dry-run``), what else (an editable, another requirements file), whether it
#: installs what the set's packages need (``--no-deps``), for which Python
#: (``--ignore-requires-python``: releases made for another).  Those set, the env was
#: marked ready without its packages, or with broken ones, and cached so.  (Index, mirror,
#: proxy, certificate and wheel settings apply, and so do ``PIP_CONSTRAINT`` and
#: ``PIP_NO_BINARY``: an env built with them has what its set needs, or fails, saying so.)
PIP_SCRUBBED = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_DRY_RUN",
                "PIP_EDITABLE", "PIP_REQUIREMENT", "PIP_REQUIRE_VIRTUALENV",
                "PIP_REQUIRE_VENV", "PIP_NO_DEPS", "PIP_NO_DEPENDENCIES",
                "PIP_IGNORE_REQUIRES_PYTHON")


def _scrubbed(name: str) -> bool:
    """Whether ``name`` is one of PIP_SCRUBBED as pip reads it: ``PIP_`` then the option
    in any case, ``-`` or ``_`` (``PIP_no_deps`` is ``--no-deps`` too)."""
    return name.startswith("PIP_") and (
        "PIP_" + name[4:].upper().replace("-", "_") in PIP_SCRUBBED)


def _run(cmd: list[str], what: str, builds: Builds | None = None) -> None:
    env = pool.worker_env()
    env.pop("PYTHONPATH", None)  # pip must see the environment, not the node's path
    for name in [n for n in env if _scrubbed(n)]:
        del env[name]
    builds = builds or Builds()
    proc = builds.start(cmd, env, what)
    try:
        try:
            stdout, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            _signal_session(proc, signal.SIGKILL)
            proc.communicate()
            raise BuildError(f"{what} took longer than {BUILD_TIMEOUT:g} s") from exc
    finally:
        builds.done(proc)
    killed = _signal_of(proc.returncode)
    if killed is not None and not builds.stopping():
        raise BuildKilled(f"{what} was killed by signal {killed.name}")
    if proc.returncode != 0:
        out = stdout.decode(errors="replace").strip()
        if len(out) > PIP_TAIL:
            out = "...\n" + out[-PIP_TAIL:]
        raise BuildError(f"{what} failed (exit code {proc.returncode}):\n{out}")


#: the signals a process's own fault sends it (a crash), not a kill from outside
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                      signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP})


def _signal_of(code: int) -> signal.Signals | None:
    """The signal that ended a build step of exit code ``code``, if one did: ``-N`` (the
    step's own death, which _WATCHED repeats), or ``256 - N`` (the death of the pip that
    ``pip --python`` runs in the venv, which the outer pip passes on as ``sys.exit(-N)``;
    pip's own exit codes are all small; of those, only SIGKILL's and SIGTERM's: an exit
    code of 255, say, is a step's own failure, not SIGHUP's, and taken for the node's
    fault it was tried again and again, until the node gave up)."""
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return None
        # (not a crash, the step's own, as a broken extension it imports makes it each
        # time: taken for the node's fault, it was tried again until the node gave up)
        return None if sig in _CRASHES else sig
    if 256 - code in (signal.SIGKILL, signal.SIGTERM):
        return signal.Signals(256 - code)
    return None
