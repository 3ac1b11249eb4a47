"""Functions that tests send to nodes, importable by worker processes as ``tests.tasks``."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import subprocess
import sys
import threading
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


def raise_once_file_exists(path, message):
    wait_for_file(path)
    raise ValueError(message)


def forge_a_result():
    """Writes a message of its own on the worker's result pipe (its descriptor is in the
    worker's argv), ahead of the result the worker sends."""
    os.write(int(sys.argv[2]), struct.pack("!i", 7) + b"\x00garbag")  # (begins as a head)
    return "the real result"


def garble_the_result_pipe():
    """Writes bytes on the worker's result pipe that cannot be a message (a negative
    length)."""
    os.write(int(sys.argv[2]), struct.pack("!i", -5) + b"junk")
    return "the real result"


def write_text_on_the_result_pipe():
    os.write(int(sys.argv[2]), b"oops, wrong descriptor\n")
    return "the real result"


def close_the_result_pipe_and_sleep(seconds):
    os.close(int(sys.argv[2]))  # as os.closerange(3, ...) in a library would
    time.sleep(seconds)
    return "done"


def forge_first(i, junk=b"\x00garbag"):
    """Call 0 writes a framed message of its own on the result pipe; all return i*i."""
    if i == 0:
        os.write(int(sys.argv[2]), struct.pack("!i", len(junk)) + junk)
    return i * i


def write_on_the_result_pipe(value, junk=b"abc\n"):
    """Write a few bytes on the worker's result pipe (a wrong descriptor), then return."""
    os.write(int(sys.argv[2]), junk)
    return value


def segfault():
    ctypes.string_at(0)


def release(path, text: str = "") -> None:
    """Create ``path`` holding ``text`` at once (a rename): a task in wait_for_file never
    reads it half written (``write_text`` makes the file empty first)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


_at_once = release  # (for tasks whose own parameter is called ``release``)


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
    _at_once(started, str(os.getpid()))  # the test reads the pid as soon as it appears
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


def log_pid_wait_and_exit_0(log, release, timeout=60.0):
    """``log_pid_and_wait``, then end the worker process itself, with status 0."""
    log_pid_and_wait(log, release, timeout)
    os._exit(0)


def write_marker(path):
    """Append this process's pid to ``path`` (a ``__reduce__`` callable: who unpickled?)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
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


# --- added for tests/test_executor.py and tests/test_decorator.py


def fail_on(x, bad):
    """``x * 10``, except for ``x == bad``, which raises ValueError."""
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


def create_file(path, text=""):
    """Create ``path`` (a marker that the task ran) and return ``text``."""
    Path(path).write_text(text)
    return text


def append_line(path, line):
    """Append ``line`` to ``path`` (counts how often a task ran) and return it."""
    with open(path, "a") as f:
        f.write(f"{line}\n")
    return line


def apply_fn(fn, x):
    """A task with a parameter named ``fn``: submit(task, fn=...) must pass it through."""
    return fn(x)


def complain_and_fail(message):
    """Write to stderr, then raise ValueError(message)."""
    print(f"about to fail: {message}", file=sys.stderr)
    sys.stderr.flush()
    raise ValueError(message)


def say(text):
    """Print ``text`` to stdout and stderr; return the worker's pid."""
    print(f"{text} out")
    print(f"{text} err", file=sys.stderr)
    return os.getpid()


def c_puts_unflushed(text):
    """Write ``text`` with libc ``puts`` and do NOT fflush; return the worker's pid."""
    ctypes.CDLL(None).puts(text.encode())
    return os.getpid()


def print_then(how, started=None, release=None):
    """Print two progress lines (no flush), then crash (a segfault), or, for ``"wait"``,
    signal ``started`` and wait for ``release`` (the test kills it meanwhile), or for
    ``"child"`` let a child process write a line, and print one more."""
    print("step 1")
    print("step 2")
    if how == "segfault":
        segfault()
    elif how == "wait":
        touch_then_wait(started, release)
    else:
        subprocess.run(["echo", "child"], check=True)
        print("step 3")
    return os.getpid()


def c_puts_then(how):
    """Print lines from C (libc ``puts``, no flush) and Python, in turn; then crash (a
    segfault) or return."""
    libc = ctypes.CDLL(None)
    libc.puts(b"C 1")
    print("py 2")
    libc.puts(b"C 3")
    if how == "segfault":
        segfault()
    print("py 4")
    return os.getpid()


def c_puts_flushed(text):
    """Write ``text`` with libc ``puts`` and fflush; return the worker's pid."""
    libc = ctypes.CDLL(None)
    libc.puts(text.encode())
    libc.fflush(None)
    return os.getpid()


# A connection made at import time, as a user module would: lazy, so importing this module
# on a worker creates no executor.  It uses $KOTTA_HOME, which each test sets to its own.
from kotta_executor import connect, kottajob  # noqa: E402

module_connection = connect()


@kottajob(module_connection, "test", 5)
def decorated_record(path, x):
    """A decorated module-level function: on the node the undecorated body must run, once."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return x * 2


def ends_cleanly_on_sigterm(started, seconds=60.0):
    """Write this pid to ``started``, then run until SIGTERM, which it handles by cleaning
    up and returning at once: what the node's grace period between SIGTERM and SIGKILL is
    for."""
    stop: list[int] = []
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    Path(started).write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + seconds  # deadlock guard of a test that went wrong
    while not stop and time.monotonic() < deadline:
        time.sleep(0.01)
    return "cleaned up"


_LOCK = threading.Lock()  # a module global that no pickle takes


@kottajob(module_connection, "test", 5)
def decorated_with_lock(x):
    """Uses a module global that cannot be pickled: the call must travel by reference."""
    with _LOCK:
        return os.getpid(), x + 1


@kottajob(module_connection, "test", 5, block=False)
def decorated_later(x):
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * 2


def fan_out(n):
    """Driver code as in the client, in a plain function: a non-blocking decorated
    function gives futures."""
    futures = [decorated_later(i) for i in range(n)]
    failed = decorated_later(-1)
    return [f.result() for f in futures], repr(failed.exception()), type(failed).__name__


def calls_decorated(path, x):
    """A plain function that calls a decorated one: (its pid, the decorated one's value)."""
    return os.getpid(), decorated_record(path, x)


class Offset:
    """A callable object (one a decorator may wrap, as it wraps a function)."""

    def __init__(self, by):
        self.by = by

    def __call__(self, x):
        return x + self.by


def nested_submit(enclave, credentials=None):
    """A task that submits a task itself: (the owner the inner one ran as, its job id)."""
    from kotta_executor import KottaExecutor

    with KottaExecutor(1, enclave=enclave, start_node=False, credentials=credentials) as ex:
        f = ex.submit(os.getenv, "KOTTA_OWNER")
        return f.result(60), f.job_id


def return_a_kotta_future(enclave, credentials):
    """A task that returns the future of a task it submitted, not its value."""
    from kotta_executor import KottaExecutor

    with KottaExecutor(1, enclave=enclave, start_node=False, credentials=credentials) as ex:
        f = ex.submit(abs, -3)
        f.result(60)
        return f


def worker_environ():
    return dict(os.environ)


def total(*values, start=0):
    """The sum of ``values`` plus ``start`` (a task with many arguments, for fan-in)."""
    return sum(values, start)


_HOG = """
import os, sys, time
hog = bytearray(int(sys.argv[1]) * 1024 * 1024)
for i in range(0, len(hog), 4096):
    hog[i] = 1  # touch every page: resident, not just reserved
start, stop = time.monotonic(), sys.argv[3]
while time.monotonic() - start < float(sys.argv[2]) or not os.path.exists(stop):
    sum(range(10000))
    if time.monotonic() - start > 120:  # deadlock guard of a test that went wrong
        break
"""


def child_hog(mb, seconds, stop_file):
    """A child process that holds ``mb`` MiB and burns CPU for at least ``seconds``, until
    ``stop_file`` exists; the task waits for it."""
    subprocess.run([sys.executable, "-c", _HOG, str(mb), str(seconds), str(stop_file)], check=True)
    return "hogged"


def allocate_and_sleep(mb, seconds=60.0, step_mb=10):
    """Allocate ``mb`` MiB, ``step_mb`` at a time (each page written: resident), then sleep."""
    held = []
    for _ in range(0, mb, step_mb):
        held.append(b"\x01" * (step_mb * 1024 * 1024))
        time.sleep(0.01)
    time.sleep(seconds)
    return len(held)


# ----------------------------------------------------------------------------- data tasks


def file_sum(inputs=()):
    """Cloud Kotta's example: the sum of the integers, one per line, of the first input
    (staged into the working directory under its basename)."""
    total = 0
    with open(os.path.basename(inputs[0])) as f:
        for line in f:
            total += int(line)
    return total


def scaled_sum(inputs, /, scale=1):
    """The sum of ``inputs`` (numbers: its own positional-only argument, not submit()'s
    staging keyword) and of the lines of the staged ``1m_shuffled.txt``, times ``scale``."""
    with open("1m_shuffled.txt") as f:
        return scale * (sum(inputs) + sum(int(line) for line in f))


def write_file(name, text):
    """Write ``text`` to ``name`` in the task's working directory; return the directory."""
    with open(name, "w") as f:
        f.write(text)
    return os.getcwd()


def copy_file(src, dst):
    """Copy ``src`` to ``dst`` in the task's working directory; return the directory."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    return os.getcwd()


def symlink_out(name, target):
    """Make ``name`` in the working directory a symlink to ``target`` (an escape attempt)."""
    os.symlink(target, name)
    return os.getcwd()


def keep_read_only(name):
    """Copy the staged input ``name`` into a directory made read-only (as ``chmod -R a-w``
    of a task's results leaves it); return the working directory."""
    os.mkdir("kept")
    with open(name, "rb") as src, open(os.path.join("kept", name), "wb") as dst:
        dst.write(src.read())
    os.chmod("kept", 0o555)
    os.chmod(".", 0o500)
    return os.getcwd()


def read_staged_and_env(name, *keys):
    """What a staged input holds, where the task runs, and some of its environment."""
    with open(name) as f:
        text = f.read()
    return text, os.getcwd(), {k: os.environ.get(k) for k in keys}


def chatty(nbytes):
    """Print ``nbytes`` bytes and return a small value."""
    sys.stdout.write("x" * nbytes)
    return "done"


def write_out(text):
    """Write ``text`` to stdout, as it is (no newline added), and return its size in UTF-8."""
    sys.stdout.write(text)
    return len(text.encode())


# ----------------------------------------------------------------- security review tasks


def leak_and_die(name, marker):
    """Write where the task runs to ``marker``, print the staged input ``name``, then let
    the worker die (as a crash, a walltime or a memory kill would)."""
    Path(marker).write_text(os.getcwd())
    with open(name) as f:
        sys.stdout.write(f.read())
    sys.stdout.flush()
    os._exit(3)


def chdir_into_removed_dir():
    """Leave the worker in a directory that no longer exists (a TemporaryDirectory the
    task chdir'd into, say)."""
    import tempfile

    d = tempfile.mkdtemp(prefix="kotta-gone-")
    os.chdir(d)
    os.rmdir(d)
    return "left"


_CARRIED = None


def carry(name=None):
    """With ``name``: keep the staged input in this (warm) worker's memory and return
    nothing.  Without: return what an earlier task kept."""
    global _CARRIED
    if name is None:
        return _CARRIED
    with open(name) as f:
        _CARRIED = f.read()
    return None


def leak_in_usage(name):
    """Return a small value, but put the staged input ``name`` into the result header's
    ``usage`` (user code runs in the worker process and can change what it sends)."""
    from kotta_executor import wire

    with open(name) as f:
        secret = f.read()
    original = wire.result_header

    def patched(*args, **fields):
        wire.result_header = original  # this result only
        fields["usage"] = {**(fields.get("usage") or {}), "leak": secret}
        return original(*args, **fields)

    wire.result_header = patched
    return "small"


def append_line_then_wait(path, line, stop_file):
    """Append ``line`` to ``path`` (counts the runs), then wait until ``stop_file`` exists."""
    with open(path, "a") as f:
        f.write(f"{line}\n")
    deadline = time.monotonic() + 60  # deadlock guard of a test that went wrong
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    return line


def poison_cache(text):
    """From a task's working directory, overwrite every file of the node's staging cache
    (the task runs as the node's OS user, which owns it)."""
    objects = Path(os.getcwd()).parent.parent / "cache" / "objects"
    n = 0
    for p in objects.iterdir():
        os.chmod(p, 0o644)
        p.write_text(text)
        n += 1
    return n


def first_arg(*args):
    """Someone else's function, run on another's arguments, would return them."""
    return args[0]


class Bulky:
    """An argument a test holds only by a weak reference (big data, in real life)."""

    def __init__(self, n=1000):
        self.data = list(range(n))


def constant_forged():
    return "a forged result"


def hide_input_in_a_symlink(inputs=()):
    """A task that read restricted data and hides it in its output's symlink target."""
    with open(os.path.basename(inputs[0])) as f:
        secret = f.read().strip()
    os.symlink(secret, "out.txt")  # dangling: its *target* is the payload


class ExitsWhenLoaded:
    """Pickles fine; unpickling it calls sys.exit() (as a module that exits on import)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (sys.exit, (self.code,))


def return_exits_when_loaded(code="no loading here"):
    return ExitsWhenLoaded(code)


class ExitsWhenPickled:
    def __reduce__(self):
        raise SystemExit(5)


def return_exits_when_pickled():
    return ExitsWhenPickled()


class ErrorExitsWhenLoaded(Exception):
    def __reduce__(self):
        return (sys.exit, (4,))


def raise_error_exits_when_loaded(message="exits when loaded"):
    raise ErrorExitsWhenLoaded(message)


def fork_and_wait(how):
    """Fork; the child returns, exits or raises (back into the worker's code), and the
    parent reports the child's exit status."""
    pid = os.fork()
    if pid == 0:
        if how == "return":
            return "child"
        if how == "exit":
            sys.exit(5)
        raise ValueError("raised in the forked child")
    _, status = os.waitpid(pid, 0)
    return "parent", os.waitstatus_to_exitcode(status)


def fork_child_returns_later(pid_file, release):
    """Fork a child that returns (into the worker's code) once ``release`` exists; the
    parent returns at once, without waiting for it."""
    pid = os.fork()
    if pid == 0:
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)  # (whole, when it is there)
        wait_for_file(release)
        return "child"
    return "parent"


def recurse_forever(n=0):
    return recurse_forever(n + 1)


def raise_deep(depth, message="raised deep down"):
    if depth == 0:
        raise ValueError(message)
    return raise_deep(depth - 1, message)


def write_files(names, text="x"):
    """Write ``text`` to each of ``names`` in the working directory."""
    for name in names:
        write_file(name, text)
    return os.getcwd()


def create_file_and_sum(path, inputs=()):
    """Create ``path`` (a marker that the task ran), then sum the first input (file_sum)."""
    Path(path).write_text("ran")
    return file_sum(inputs)


def upload_when_released(release, uri, text):
    """Once ``release`` exists, write ``uri`` with the task's own data credentials
    (``open_objects``), not through the node's stage-out."""
    from kotta_executor.security.data import open_objects

    wait_for_file(release)
    Path("direct.bin").write_text(text)
    open_objects().upload(Path("direct.bin"), uri)
    return "wrote"


def write_file_when_released(name, text, release):
    """Write ``text`` to ``name`` in the working directory once ``release`` exists."""
    wait_for_file(release)
    return write_file(name, text)


class StrExitsOnTheNode(Exception):
    """Its __str__ raises SystemExit where a task runs (a worker), not on the client."""

    def __str__(self):
        if os.environ.get("KOTTA_JOB_ID"):
            raise SystemExit(9)
        return "fine on the client"


def raise_str_exits_on_the_node():
    raise StrExitsOnTheNode()


def data_credential_left(uri):
    """At the task's start: how many seconds its data credential has left, once it read
    ``uri`` (a declared input) through it, as user code does (``open_objects()``)."""
    from kotta_executor.security.data import open_objects

    store = open_objects()
    store.head(uri)
    return store.credential.expires - time.time()


#: set by an executor's initializer (set_init_status), in the worker
INIT_STATUS = "uninitialized"
INIT_RUNS = 0


def set_init_status(status):
    global INIT_STATUS, INIT_RUNS
    INIT_STATUS = status
    INIT_RUNS += 1


def get_init_status(*_):
    return INIT_STATUS, INIT_RUNS, os.getpid()


def init_failing_once(marker, status):
    """An initializer that raises the first time (it leaves ``marker``), then works."""
    if not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise ConnectionError("the database is not up yet")
    set_init_status(status)


def hold_memory_until(mb, release):
    """Hold ``mb`` MiB (every page written: resident) until ``release`` exists."""
    held = bytearray(int(mb) * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])
    wait_for_file(release)
    return len(held) // (1024 * 1024)


def map_file_until(path, mb, mapped, release):
    """Write ``mb`` MiB to ``path``, map it, read every page (resident: the file's page
    cache, in this process's RSS), say so in ``mapped``, and hold the mapping until
    ``release`` exists.  Returns the sum of a byte from each page."""
    import mmap

    with open(path, "wb") as f:
        for _ in range(int(mb)):
            f.write(b"\x01" * (1024 * 1024))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        total = sum(m[i] for i in range(0, len(m), 4096))
        _at_once(mapped, "mapped")
        wait_for_file(release)
    return total


def share_memory_with_children(mb, children, started_dir, release):
    """Fill ``mb`` MiB, then fork ``children`` that only read nothing and wait for
    ``release`` (so the filled pages stay shared with the parent, copy-on-write); each
    child writes a file in ``started_dir`` once running.  Returns how many children
    exited 0."""
    held = _filled(mb)  # noqa: F841 - held (shared) while the children run
    pids = _fork_children(children, started_dir, lambda i: wait_for_file(release))
    wait_for_file(release)
    return sum(os.waitpid(pid, 0)[1] == 0 for pid in pids)


def share_then_grow(mb, children, started_dir, grow, grow_mb):
    """As share_memory_with_children; once ``grow`` exists, the first child fills
    ``grow_mb`` MiB of its own and waits a minute more (the others and the task wait)."""

    def child(i):
        wait_for_file(grow)
        if i == 0:
            mine = _filled(grow_mb)  # noqa: F841 - held while it waits
        time.sleep(60)

    held = _filled(mb)  # noqa: F841 - held (shared) while the children run
    pids = _fork_children(children, started_dir, child)
    return sum(os.waitpid(pid, 0)[1] == 0 for pid in pids)


def _filled(mb) -> bytearray:
    """``mb`` MiB, every page written (resident)."""
    held = bytearray(int(mb) * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])
    return held


def _fork_children(children, started_dir, then) -> list[int]:
    """Fork ``children`` that each write a file in ``started_dir`` once running, then run
    ``then(i)`` and exit; their pids."""
    pids = []
    for i in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                _at_once(os.path.join(started_dir, str(i)), str(os.getpid()))
                then(i)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def init_forking(child_pid_file):
    """An initializer that forks, the child returning from it too (as the parent does); the
    parent writes the child's pid to ``child_pid_file``."""
    child = os.fork()
    if child:
        _at_once(child_pid_file, str(child))


def append_pid_line(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def make_adder(n):
    """A closure, which cloudpickle pickles by value (its code with it)."""
    return lambda x: x + n


def module_attr(module, attr):
    """``module.attr``, importing the module on the node."""
    import importlib

    return getattr(importlib.import_module(module), attr)


def child_python(code):
    """What a child Python process (this interpreter) running ``code`` prints."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def raise_from_a_node_only_module(directory, message, wrapped=False):
    """Raise an exception of a class only the worker can import: that of a module it writes
    to ``directory`` and imports (as one of a package that ``requirements`` installed on the
    node only); ``wrapped``: from a RuntimeError of the task's own."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "node_only_errors.py"), "w") as f:
        f.write("class ParseError(ValueError):\n    pass\n\n\n"
                "def parse(message):\n    raise ParseError(message)\n")
    sys.path.insert(0, directory)
    try:
        import node_only_errors
    finally:
        sys.path.remove(directory)
    if not wrapped:
        node_only_errors.parse(message)
    try:
        node_only_errors.parse(message)
    except ValueError as e:
        raise RuntimeError("the task could not go on") from e


def raise_holding_a_node_only_object(directory, message, wrapped=False, slots=False):
    """Raise a ValueError (a class the client has) holding, in its args, an object of a
    class only the worker can import (as raise_from_a_node_only_module's);
    ``wrapped``: as the cause of a RuntimeError of the task's own; ``slots``: the class a
    ``@dataclass(slots=True)``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "node_only_rows.py"), "w") as f:
        if slots:
            f.write("import dataclasses\n\n\n@dataclasses.dataclass(slots=True)\n"
                    "class Row:\n    n: int\n")
        else:
            f.write("class Row:\n    def __init__(self, n):\n        self.n = n\n")
    sys.path.insert(0, directory)
    try:
        import node_only_rows
    finally:
        sys.path.remove(directory)
    if not wrapped:
        raise ValueError(message, node_only_rows.Row(17))
    try:
        raise ValueError(message, node_only_rows.Row(17))
    except ValueError as e:
        raise RuntimeError("the task could not go on") from e


class MissingInput(FileNotFoundError):
    """An OSError of the task's own whose ``__init__`` takes other arguments than its
    ``args``: pickle makes it again by calling it with OSError's (errno, strerror,
    filename), which it refuses."""

    def __init__(self, path, *, stage):
        super().__init__(2, f"no input for stage {stage}", path)
        self.stage = stage


def use_a_missing_name(kind):
    """Raise, as Python does, an AttributeError (``kind`` "attribute": its name and obj
    set) or a NameError ("name": its name set)."""
    if kind == "attribute":
        return object().rows_read
    return rows_read  # noqa: F821 - the NameError is the point


class FetchFailed(ConnectionError):
    """An OSError whose ``__init__`` writes its message from its argument."""

    def __init__(self, code, reason, url=None):
        super().__init__(code, f"fetch failed: {reason}", url)


def raise_fetch_failed(code, reason, url):
    raise FetchFailed(code, reason, url)


def raise_http_error(url, code):
    """urllib's HTTPError, as urlopen raises it (but with a body that can be pickled)."""
    import urllib.error

    raise urllib.error.HTTPError(url, code, "Not Found", {}, None)


def raise_missing_input(path, stage, grouped=False):
    """``grouped``: as the member of an ExceptionGroup (a TaskGroup's), with a plain
    FileNotFoundError."""
    if not grouped:
        raise MissingInput(path, stage=stage)
    raise ExceptionGroup("inputs", [MissingInput(path, stage=stage),
                                    FileNotFoundError(2, "gone", path + ".bak")])


def raise_with_notes(notes):
    """Raise a ValueError whose ``__notes__`` the task set itself (to anything)."""
    exc = ValueError("with notes of its own")
    exc.__notes__ = notes
    raise exc


def raise_unpicklable_with_note(message, note):
    exc = UnpicklableError(message)
    exc.add_note(note)
    raise exc


def raise_wrapped(depth, message="missing field 'date'"):
    """As a recursive parser does: the error (a KeyError at the bottom) wrapped in a
    ValueError at each of ``depth`` levels, each ``from`` the one below."""
    if depth == 0:
        raise KeyError(message)
    try:
        raise_wrapped(depth - 1, message)
    except Exception as exc:
        raise ValueError(f"in the node at depth {depth}") from exc


def _read_rows(path):
    raise FileNotFoundError(2, "No such file or directory", path)


def _parse_rows(path):
    try:
        _read_rows(path)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot parse {path}") from exc


def raise_group_of_task_failures():
    """As asyncio.TaskGroup does: each failure raised (with frames, and a cause) in a task
    of its own, then all of them in one ExceptionGroup, one of them a group of its own."""
    import asyncio

    async def read(path):
        _read_rows(path)

    async def parse(path):
        _parse_rows(path)

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(read("a.csv"))
            tg.create_task(parse("b.csv"))
            tg.create_task(nested())

    async def nested():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(read("c.csv"))

    asyncio.run(main())


def count_inputs(inputs, outputs=None):
    """A function whose arguments are named as submit()'s staging keywords."""
    return len(inputs)


def print_much_then_wait(mib, marker, stop_file):
    """Write ``mib`` MiB to fd 1 in numbered 1 KiB lines (the logs of a long task), then
    write this process's pid to ``marker`` and wait for ``stop_file``."""
    for i in range(mib * 1024):
        os.write(1, b"%08d" % i + b"x" * 1015 + b"\n")
    Path(marker).write_text(str(os.getpid()))
    while not os.path.exists(stop_file):
        time.sleep(0.05)
    return "printed"


def return_a_future(x):
    """What a task returns when it hands back the futures of its own ``block=False`` calls
    rather than their values."""
    import concurrent.futures

    done = concurrent.futures.Future()
    done.set_result(x)
    return [done]


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception class written as a frozen dataclass: its ``__setattr__`` refuses every
    attribute, ``__cause__`` and ``__notes__`` too."""

    code: int


def raise_frozen(code, from_cause=False):
    try:
        raise KeyError("the cause")
    except KeyError as key:
        if from_cause:
            raise FrozenError(code) from key
        raise FrozenError(code)  # noqa: B904 - a context, not a cause


@dataclasses.dataclass(slots=True)
class RowError(Exception):
    """An exception class written as a dataclass with slots: its fields are slots, not in
    its ``__dict__``."""

    row: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenRowError(Exception):
    row: int


def raise_row_error(row, reason, frozen=False):
    if frozen:
        raise FrozenRowError(row)
    raise RowError(row, reason)


def raise_from_a_task_group_body(path):
    """An asyncio.TaskGroup whose body itself raises: that exception is both a member of
    the group and the group's ``__context__`` (the group is raised while it is handled)."""
    import asyncio

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(60))
            _parse_rows(path)

    asyncio.run(main())


class NeedsCode(Exception):
    """An exception whose ``__init__`` takes a keyword its ``args`` do not hold: pickle
    cannot make it again by calling the class."""

    def __init__(self, message, *, code):
        super().__init__(message)
        self.code = code


def raise_group_with_members_pickle_cannot_remake(lock_message):
    """An asyncio.TaskGroup's failures: one that travels as pickle makes it, one pickle
    cannot make again (NeedsCode), one that cannot be pickled (it holds a lock)."""
    import asyncio

    async def fails(exc):
        raise exc

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fails(KeyError("plain")))
            tg.create_task(fails(NeedsCode("bad code", code=7)))
            tg.create_task(fails(UnpicklableError(lock_message)))

    asyncio.run(main())


class HTTPStatusError(Exception):
    """An exception whose ``__init__`` writes its message from its argument: pickle, which
    makes it again by calling the class with its ``args`` (the message), writes it twice."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


def raise_group_of_reformatting_members(statuses, nested=False):
    """An asyncio.TaskGroup's failures, each an HTTPStatusError; ``nested``: those of a
    TaskGroup in a task of another."""
    import asyncio

    async def fails(exc):
        raise exc

    async def inner():
        async with asyncio.TaskGroup() as tg:
            for status in statuses:
                tg.create_task(fails(HTTPStatusError(status)))

    async def outer():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(inner())

    asyncio.run(outer() if nested else inner())


def raise_group_from_a_node_only_module(directory, messages):
    """An asyncio.TaskGroup's failures, of a class only the worker can import (as
    raise_from_a_node_only_module's), and one of the builtins."""
    import asyncio

    async def parse(message):
        raise_from_a_node_only_module(directory, message)

    async def lookup():
        raise KeyError("no such row")

    async def main():
        async with asyncio.TaskGroup() as tg:
            for message in messages:
                tg.create_task(parse(message))
            tg.create_task(lookup())

    asyncio.run(main())


def raise_unpicklable_from_a_task_group_body(message):
    """raise_from_a_task_group_body's, the body's exception one that cannot be pickled."""
    import asyncio

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(60))
            raise UnpicklableError(message)

    asyncio.run(main())


def burn_in_background(seconds, done_file):
    """Start a thread that burns ``seconds`` of its own CPU after the task has returned,
    then creates ``done_file``."""
    def burn():
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        Path(done_file).touch()

    threading.Thread(target=burn, daemon=True).start()
    return "started"


def burn_cpu(seconds):
    """A busy loop of ``seconds`` of this process's CPU."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return seconds


def drop_a_burning_child(seconds):
    """Start a child that burns ``seconds`` of CPU, and return its pid without waiting
    for it (the Popen object is dropped: subprocess reaps it at a later Popen)."""
    code = f"import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code]).pid


def run_true():
    subprocess.run(["true"], check=True)
    return "ran"


def burn_in_a_pool(method, n, seconds):
    """``n`` processes of a multiprocessing pool of start method ``method``, each burning
    ``seconds`` of CPU; the pool is waited for."""
    import multiprocessing

    with multiprocessing.get_context(method).Pool(n) as pool:
        return pool.map(burn_cpu, [seconds] * n)


def echo_args(*args, **kwargs):
    """Its arguments, as it received them."""
    return args, kwargs


def raise_big_value_error(n):
    """Raise a ValueError that holds ``n`` random bytes (its message their repr)."""
    raise ValueError(os.urandom(n))


def random_bytes_once_released(release, n):
    """Wait for ``release``, then return ``n`` random bytes."""
    wait_for_file(release)
    return os.urandom(n)


def bytes_or_raise(n):
    """``n`` random bytes; a ValueError for a negative ``n``."""
    if n < 0:
        raise ValueError(f"no bytes for {n}")
    return os.urandom(n)


def complain_on(x, bad):
    """Write ``item x err`` to stderr; raise ValueError for ``x == bad``, else return x."""
    print(f"item {x} err", file=sys.stderr)
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def fan_in_of_a_failed_call():
    """A task whose own decorated call (in the task: its body runs there) is given a
    failed future: the DependencyError of that call ends the task."""
    return decorated_later(decorated_later(-1)).result()


def append_to_inputs(text, inputs=()):
    """Append ``text`` to each staged input (a task that updates its data in place: the
    files are in its working directory, under their basenames)."""
    for uri in inputs:
        with open(os.path.basename(uri), "a") as f:
            f.write(text)
    return len(inputs)


class FalseyBoolError(Exception):
    """An exception that is false (CPython's FalseyBoolException, gh-132063)."""

    def __bool__(self):
        return False


class FalseyLenError(Exception):
    """An exception of length 0, so false (CPython's FalseyLenException)."""

    def __len__(self):
        return 0


def raise_falsey(kind, message):
    """Raise a FalseyBoolError (``kind == "bool"``) or FalseyLenError with ``message``."""
    raise (FalseyBoolError if kind == "bool" else FalseyLenError)(message)


def capture(*args, **kwargs):
    """What the call was given (CPython's test_submit_keyword)."""
    return args, kwargs


def crash_at_unpickle():
    """Segfault the process that unpickles it (CPython's CrashAtUnpickle)."""
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


class CrashesWhenLoaded:
    def __reduce__(self):
        return (crash_at_unpickle, ())


class RaisesWhenPickled:
    """Pickling it raises PicklingError (CPython's ErrorAtPickle)."""

    def __reduce__(self):
        import pickle

        raise pickle.PicklingError("Error in pickle")


def return_raises_when_pickled():
    return RaisesWhenPickled()


class Owner:
    """An object a test drops while the executor holds a bound method of it."""

    def method(self):
        pass


def sleep_then_segfault(seconds):
    time.sleep(seconds)
    segfault()


#: a process that ignores SIGTERM, SIGHUP and SIGINT, writes its pid to argv[1] and sleeps
_STUBBORN_SLEEPER = (
    "import os, signal, sys, time\n"
    "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT): signal.signal(s, signal.SIG_IGN)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()}\\n')\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(600)\n"
)


def start_an_env_less_daemon_and_sleep(pid_file, seconds=600.0):
    """Start a daemon (fork, setsid, fork, the middle one exits) that execs with an empty
    environment (so without the worker's KOTTA_WORKER_ID), ignores SIGTERM and SIGHUP and
    writes its pid to ``pid_file``; then sleep."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve(sys.executable, [sys.executable, "-c", _STUBBORN_SLEEPER, pid_file], {})
        os._exit(0)
    os.waitpid(middle, 0)
    wait_for_file(pid_file)
    time.sleep(seconds)


def leave_an_env_less_session_child(pid_file):
    """Leave a child in a session of its own, with an empty environment, running (it
    ignores SIGTERM and SIGHUP), and return."""
    subprocess.Popen([sys.executable, "-c", _STUBBORN_SLEEPER, pid_file],
                     start_new_session=True, env={})
    wait_for_file(pid_file)
    return "left"
