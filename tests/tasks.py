"""Functions that tests send to nodes, importable by worker processes as ``tests.tasks``."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path


def noop(x=None):
    return x


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_value_error(message="bad value"):
    raise ValueError(message)


def chained():
    try:
        {}["missing"]
    except KeyError as exc:
        raise RuntimeError("outer failure") from exc


def write_everywhere():
    """Output from Python, C (libc puts) and a child process, on both streams."""
    print("python stdout")
    print("python stderr", file=sys.stderr)
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.puts(b"c stdout")
    libc.fflush(None)
    subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
    return "done"


def exit_hard(code=7):
    os._exit(code)


def segfault():
    ctypes.string_at(0)


def wait_for_file(path, timeout=60.0):
    """Block until ``path`` exists (tests create it to release the task)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return Path(path).read_text()


def touch_then_wait(started, release, timeout=60.0):
    """Signal that the task started (create ``started``), then wait for ``release``."""
    Path(started).write_text(str(os.getpid()))
    return wait_for_file(release, timeout)


def spawn_child_and_sleep(pid_file, seconds=300):
    """Start a grandchild that would outlive a careless kill, record its pid, sleep."""
    child = subprocess.Popen(["sleep", str(seconds)])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(seconds)


def worker_pid(_=None):
    return os.getpid()


def environment(name):
    return os.environ.get(name)


# --------------------------------------------------------------------------- failure injection


def fail_on_load(message="refusing to be unpickled"):
    """Used as a ``__reduce__`` callable: unpickling the object runs this, and it raises."""
    raise RuntimeError(message)


class LoadsBadly:
    """Pickles fine; unpickling it raises (wherever that happens)."""

    def __init__(self, message="refusing to be unpickled"):
        self.message = message

    def __reduce__(self):
        return (fail_on_load, (self.message,))


def return_unloadable(message="refusing to be unpickled"):
    return LoadsBadly(message)


class UnpicklableError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def raise_unpicklable(message="holds a lock"):
    raise UnpicklableError(message)


def return_lock():
    import threading

    return threading.Lock()


def raise_system_exit(code=3):
    raise SystemExit(code)


def log_pid_and_wait(log, release, timeout=60.0):
    """Append this process's pid to ``log``, wait for ``release`` to exist, return the pid."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    wait_for_file(release, timeout)
    return os.getpid()


def write_marker(path):
    """Record which process ran this (used as a ``__reduce__`` callable: who unpickled?)."""
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


class MarkerOnLoad:
    """Unpickling this writes the unpickling process's pid to ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (write_marker, (self.path,))


def return_marker_on_load(path):
    return MarkerOnLoad(path)


def kill_own_node():
    """SIGKILL the node running this worker (the worker's parent process)."""
    import signal

    os.kill(os.getppid(), signal.SIGKILL)
    return os.getpid()
