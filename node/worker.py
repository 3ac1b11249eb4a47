"""A worker process: the only place a task payload is unpickled and user code runs.

The node starts it as ``python -m node.worker TASK_FD RESULT_FD`` with file descriptors 1 and 2
pointing at two unlinked files the node also holds.  Once started it writes an empty
message to ``RESULT_FD`` (``READY``: the walltime of its first task counts from there).
For each task it:

1. reads one task envelope (the payload inlined by the node) from ``TASK_FD``;
2. empties the capture files, so fds 1 and 2 catch everything this task writes — Python
   prints, C extensions and child processes alike;
3. unpickles and runs the calls, catching every exception per call;
4. writes one result envelope (outcomes, stdout, stderr, usage) to ``RESULT_FD``, behind
   a fixed-size head (``result_head``) with what the node records: failed or not, usage,
   the reason; so the node reads a result without parsing it.

If it dies mid-task, the node still holds the capture files and reads what the task wrote.
"""

from __future__ import annotations

import _signal
import ctypes
import json
import os
import resource
import signal
import site
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import NoReturn

from kotta_executor import wire
from kotta_executor.errors import SerializationError

#: output kept per stream and task; beyond it the earliest output is dropped, and said so
CAPTURE_LIMIT = 4 * 1024 * 1024


def read_capture(fd: int, limit: int = CAPTURE_LIMIT) -> bytes:
    """What a task wrote to ``fd`` since it was emptied (the tail, if over ``limit``)."""
    size = os.fstat(fd).st_size
    if not size:  # most tasks write nothing: no read
        return b""
    if size <= limit:
        return os.pread(fd, size, 0)
    tail = os.pread(fd, limit, size - limit)
    # from the next whole UTF-8 character (output is read as UTF-8): cut inside one, the
    # tail began with a "\ufffd" the task never printed
    skip = 0
    while skip < 3 and skip < len(tail) and 0x80 <= tail[skip] <= 0xBF:
        skip += 1
    return b"[kotta: %d earlier bytes of output were dropped]\n" % (size - limit + skip) + tail[skip:]


def trim_capture(fd: int, limit: int = CAPTURE_LIMIT) -> None:
    """Free the disk blocks of a capture file before its last ``limit`` bytes, once it
    holds more than twice that: a task that logs for hours kept all of it on the node's
    disk while it ran (gigabytes, on a disk the enclave may share), though a result
    carries the tail only.  The freed range becomes a hole: the file's size, the task's
    write offset and the tail :func:`read_capture` reads stay as they were.  Linux only;
    elsewhere, or on a file system without holes, the file stays whole."""
    st = os.fstat(fd)
    if _FALLOCATE is None or st.st_blocks * 512 <= 2 * limit:
        return
    block = st.st_blksize or 4096
    end = (st.st_size - limit) // block * block
    if end > 0:
        _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, 0, end)  # (-1: kept)


#: fallocate(2)'s modes (<linux/falloc.h>)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


#: the capture files, on descriptors of the worker's own: a task may close fds 1 and 2, or
#: point them elsewhere (a file of the user's, which must not be read back as output, nor
#: emptied before the next task), and leave them so
_CAPTURE = (1, 2)


def _keep_capture() -> None:
    """At start-up: hold the capture files (fds 1 and 2) on descriptors of our own, and
    make ``sys.stdout`` line-buffered, as on a terminal (``sys.stderr`` is already); both
    write UTF-8."""
    global _CAPTURE
    _CAPTURE = (os.dup(1), os.dup(2))  # (not inherited by a task's children)
    # Block-buffered (a file), a task's last 8 KiB of prints were still in the worker when
    # its walltime, kill() or a crash ended it, and lost: the node read nothing of a
    # training loop's progress lines; and they came after what its children had written
    # since, whose output lands on fd 1 at once.
    # In UTF-8, as the client reads them back (``Envelope.text``), whatever the locale:
    # under a Latin-1 one a task's "é" came back as "\ufffd", and under LANG=C with
    # PYTHONUTF8=0, or PYTHONIOENCODING=ascii, printing it raised UnicodeEncodeError
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        _SETTINGS[name] = (stream.encoding, stream.errors, stream.line_buffering,
                           stream.write_through)
    _line_buffer_c_stdout()


#: how the worker's ``sys.stdout`` and ``sys.stderr`` write (encoding, errors, line
#: buffering, write-through), as _keep_capture set them, put back before each task
_SETTINGS: dict[str, tuple[str, str, bool, bool]] = {}


def _line_buffer_c_stdout() -> None:
    """C's ``stdout`` line-buffered too, as on a terminal: fully buffered (a file), what C
    code printed (a solver's progress) was lost when it crashed the worker or was killed,
    and came after the task's Python prints that followed it."""
    if _LIBC is None:
        return
    try:
        stream = ctypes.c_void_p.in_dll(_LIBC, "stdout")  # (glibc's and musl's name)
    except ValueError:  # named otherwise (macOS): left as it is
        return
    _LIBC.setvbuf(stream, None, ctypes.c_int(_IOLBF), ctypes.c_size_t(0))


#: setvbuf's mode for line buffering (<stdio.h>)
_IOLBF = 1


def _reset_capture() -> None:
    """Before each task: fds 1 and 2 (and ``sys.stdout``, ``sys.stderr``) are the capture
    files again, whatever the task before did with them, and the files are empty."""
    _restore_streams()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or replaced stream must not stop us
            pass
    for cap, fd in zip(_CAPTURE, (1, 2), strict=True):
        if cap != fd:
            os.dup2(cap, fd)
        _empty(cap)  # (what a thread the task left printed since it was released)


def _empty(cap: int) -> None:
    # At its start also when it is empty: another open of it emptied it (a child told to
    # write to /dev/stdout, which wrote nothing), and our offset stayed where the task's
    # output ended; the next task's output began with that many NUL bytes.  A seek to
    # its end says its size and, for an empty file (most tasks print nothing), is that
    # seek: one system call, not an fstat and a seek (truncating an empty file still
    # costs a journal write)
    if os.lseek(cap, 0, os.SEEK_END):
        os.ftruncate(cap, 0)
        os.lseek(cap, 0, os.SEEK_SET)


def _release_capture() -> None:
    """Once a task's result is sent, its capture files emptied, as the next task would
    find them (_reset_capture).  A task that printed much (the files keep up to twice
    CAPTURE_LIMIT on the node's disk, trimmed by the node: trim_capture) held that
    space for as long as its worker then idled: on a disk the enclave shares (``/tmp``
    beside ``~/.kotta``), the node's next write failed, "database or disk is full", and
    it died."""
    for cap in _CAPTURE:
        try:
            _empty(cap)
        except OSError:  # (not ours to fail the worker for)
            pass


#: the worker's own ``sys.stdout`` and ``sys.stderr``, as it started (not read back from
#: ``sys.__stdout__``: a task may rebind that too, to a file of its own, which later tasks
#: would then print into)
_STREAMS = {"stdout": sys.__stdout__, "stderr": sys.__stderr__}


def _restore_streams() -> None:
    """``sys.stdout`` and ``sys.stderr`` (and ``sys.__stdout__``, ``sys.__stderr__``) as
    the worker started with them (a task may have replaced them, or closed them)."""
    for name in ("stdout", "stderr"):
        original = _STREAMS[name]
        if getattr(sys, name) is not original:
            # First, and only then look whether ours is closed: the task's stream may go
            # now, and closing, close the buffer it shared with ours (a task that wrapped
            # it, ``sys.stdout = io.TextIOWrapper(sys.stdout.buffer, ...)``)
            setattr(sys, name, original)
        if getattr(sys, f"__{name}__") is not original:
            setattr(sys, f"__{name}__", original)
        if _unusable(original):  # closed or detached by a task: a new one on its fd
            fd = 1 if name == "stdout" else 2
            original = open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                            closefd=False)  # (line-buffered, as the worker's own: _keep_capture)
            _STREAMS[name] = original
            setattr(sys, f"__{name}__", original)
            setattr(sys, name, original)
        elif name in _SETTINGS and (original.encoding, original.errors, original.line_buffering,
                                    original.write_through) != _SETTINGS[name]:
            # reconfigured by a task (``sys.stdout.reconfigure(encoding="utf-8")``, which
            # also makes errors strict): the next task's print of a file name that is not
            # UTF-8 raised UnicodeEncodeError, a Latin-1 one's "é" came back as "\ufffd",
            # and block-buffered its last prints were lost at a crash or kill
            encoding, errors, line_buffering, write_through = _SETTINGS[name]
            original.reconfigure(encoding=encoding, errors=errors,
                                 line_buffering=line_buffering, write_through=write_through)


def _unusable(stream) -> bool:
    try:
        return stream is None or stream.closed
    except ValueError:  # its buffer was detached (``sys.stdout.detach()``, to wrap it anew)
        return True


try:
    _LIBC = ctypes.CDLL(None)
except OSError:  # no C library to flush
    _LIBC = None
_FALLOCATE = None  # fallocate(2), with a 64-bit offset (Linux: trim_capture)
if _LIBC is not None and sys.platform.startswith("linux"):
    _FALLOCATE = getattr(_LIBC, "fallocate64", None) or getattr(_LIBC, "fallocate", None)
    if _FALLOCATE is not None:
        _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _FALLOCATE.restype = ctypes.c_int


def _stderr_size() -> int:
    """How much the task has written to stderr so far (its buffers flushed)."""
    _flush_streams()
    return os.fstat(_CAPTURE[1]).st_size


def _flush_streams() -> None:
    """Flush Python's and C's buffered output, so it lands in this task's capture."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if _LIBC is not None:
        _LIBC.fflush(None)


class _LRU(OrderedDict):
    """A small least-recently-used map."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


#: functions already unpickled, by their pickled bytes: a warm worker reuses them
_FUNCTIONS = _LRU(64)


def run_task(data: bytes) -> tuple[bytes, bytes]:
    """Run one task: the head of its result (``result_head``) and its result envelope; in its working directory, with its scoped credentials in the
    environment, when the node staged data for it (``workdir``, ``env`` in the header
    the node wrote)."""
    env = wire.decode_checked(data)  # the node checked it
    workdir, task_env = env.header.get("workdir"), env.header.get("env") or {}
    if not workdir and not task_env:
        try:
            return _run_task(env)
        finally:
            _back_home()
    saved = {k: os.environ.get(k) for k in task_env}
    os.environ.update(task_env)
    try:
        if workdir:
            os.chdir(workdir)
        return _run_task(env)
    finally:
        os.chdir(_HOME)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_dir() -> str | int:
    """The directory the worker started in: its path, or, when that directory was removed
    before the worker started (a client's working directory deleted under it, which the
    node it starts and its workers inherit), a descriptor of it (``os.chdir`` takes either):
    no path leads back there.  ``os.getcwd()`` raised, and the node, which imports this
    module, died at its start, again and again."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return os.open(os.curdir, os.O_RDONLY)


#: the worker's own working directory: every task starts there, wherever the last one went
_HOME = _start_dir()


def _back_home() -> None:
    try:
        here = os.getcwd()
    except FileNotFoundError:  # the task chdir'd into a directory since removed
        here = None
    if here != _HOME:
        os.chdir(_HOME)


def _run_task(env: wire.Envelope) -> tuple[bytes, bytes]:
    h = env.header
    job_id = h["job_id"]
    os.environ["KOTTA_JOB_ID"] = job_id
    _reset_capture()
    start, t0 = time.time(), time.perf_counter()
    _reap_dropped_children()
    # (read now, not kept from the end of the last task: what the worker used in between,
    # sending that task's big result or running a thread it left, is not this task's)
    r0s, r0c = _usage_now()
    fs0 = _forkserver_cpu()
    outcome, failed, reason = wire.OK, 0, None
    mismatch = None if h.get("python", wire.PYTHON) == wire.PYTHON else wire.version_mismatch(
        h["python"], [env.sections.get(s, b"") for s in ("init", "fn", "args")],
        f"the task {h['fn']}", "on the node")
    try:
        if mismatch is not None:  # (nothing unpickled: no initializer, no call runs)
            raise mismatch
        _initialize(env.sections.get("init"), job_id)
    except BaseException as exc:  # noqa: BLE001 - the initializer's own exception, for every call
        if os.getpid() != _PID:
            _leave_forked(exc)
        outcome, failed, reason = wire.ERROR, h["n"], wire.summary(exc)
        payload = wire.dump_exception(exc)
        calls = None
    else:
        if os.getpid() != _PID:  # a child the initializer forked, come back: it ends
            _leave_forked(None)
        try:
            fn, calls = wire.load_call(env.sections, _FUNCTIONS)
        except BaseException as exc:  # noqa: BLE001 - report any unpickling failure to the user
            err = SerializationError(
                f"the task {h['fn']} could not be unpickled on the node: "
                f"{type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            outcome, failed, reason = wire.ERROR, h["n"], wire.summary(err)
            payload = wire.dump_exception(err)
            calls = None
    failed_at: list[list[int]] = []  # [call, stderr's size as it failed], in a task of several
    if calls is not None:
        items = []
        for args, kwargs in calls:
            try:
                items.append((wire.OK, fn(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001 - SystemExit from user code is a failure too
                if os.getpid() != _PID:
                    _leave_forked(exc)
                if h["n"] > 1:  # (a failure only: no cost to the calls that return)
                    failed_at.append([len(items), _stderr_size()])
                items.append(("raise", wire.prepare_exception(exc)))
            else:
                if os.getpid() != _PID:
                    _leave_forked(None)
        del calls, args, kwargs  # (the task's arguments: not held while the result is sent)
        payload, failed, reason = wire.dump_outcome_pieces(items)
        del items  # the values: pickled now (what counts against the task's memory limit)
    _flush_streams()
    r1s, r1c = _usage_now()
    cpu = (r1s.ru_utime + r1s.ru_stime - r0s.ru_utime - r0s.ru_stime) + (
        r1c.ru_utime + r1c.ru_stime - r0c.ru_utime - r0c.ru_stime
    ) + max(0.0, _forkserver_cpu() - fs0)
    # Peak RSS: ru_maxrss is a lifetime maximum, so it speaks of this task only where it rose
    # during the task (this process, or a child it reaped); otherwise the lifetime maximum
    # bounds it.  The node raises it to the tree's sampled RSS for long tasks.
    rose = [r1.ru_maxrss for r0, r1 in ((r0s, r1s), (r0c, r1c)) if r1.ru_maxrss > r0.ru_maxrss]
    usage = {
        "start": start,
        "end": time.time(),
        "wall": time.perf_counter() - t0,
        "cpu": round(cpu, 6),
        "maxrss_kb": max(r1s.ru_maxrss, r1c.ru_maxrss),
        "peak_rss_kb": max(rose) if rose else r1s.ru_maxrss,
    }
    header = wire.result_header(job_id, outcome, h["n"], failed=failed, usage=usage,
                                python=wire.PYTHON)
    if reason:
        header["reason"] = reason
    if failed_at:  # how much stderr the calls after each failed one wrote: the client
        # shows a call's exception with the stderr up to its failure, not the later calls'
        end = _stderr_size()
        header["stderr_after"] = [[i, max(0, end - size)] for i, size in failed_at]
    global _PRINTED
    out, err = read_capture(_CAPTURE[0]), read_capture(_CAPTURE[1])
    _PRINTED = bool(out or err)
    result = wire.encode_pieces(header, {"payload": payload, "stdout": out, "stderr": err})
    return result_head(job_id, outcome != wire.OK or failed > 0, usage, reason), result


#: whether the last task printed anything (its capture files hold what to free)
_PRINTED = False


def _initialize(init: bytes | None, job_id: str) -> None:
    """Run the executor's initializer (a task's ``init`` section), if this worker has not
    run it yet; what it raises fails the task, and says where it came from."""
    if init:
        wire.run_initializer(init, job_id)


#: this worker's pid: a process that finds another pid on its return from a call is a child
#: the task forked (``os.fork()``) that returned, or raised, into the worker's code
_PID = os.getpid()


def _leave_forked(exc: BaseException | None) -> NoReturn:
    """End a child the task forked, which came back into the worker's code: it exits, with
    the status its return or exception means (as a forked ``multiprocessing`` child
    does), instead of sending a result for the task, on the worker's own pipes, and then
    reading the worker's next tasks as a second worker."""
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    elif exc is not None:
        code = 1
        traceback.print_exception(exc)
    _flush_streams()
    os._exit(code)


def _reap_dropped_children() -> None:
    """Reap the children earlier tasks started and dropped (a ``subprocess.Popen`` never
    waited for) that have ended: subprocess reaps them at its next Popen, which, in a
    later task, counted their CPU as that task's (``RUSAGE_CHILDREN``)."""
    sp = sys.modules.get("subprocess")  # (not imported: no task started a child with it)
    if sp is not None and getattr(sp, "_active", None):
        sp._cleanup()


def _forkserver_cpu() -> float:
    """CPU seconds of this worker's multiprocessing fork server, with the processes it
    reaped: a task's pool of the "forkserver" start method (the default on Linux from
    Python 3.14) runs in children of that server, not of the worker, and the CPU of its
    processes, waited for all the same, was missing from the task's (``RUSAGE_CHILDREN``
    counts only the worker's own children).  0 when there is none."""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # after the command's ")": utime, stime, cutime, cstime are the 12th to 15th
            fields = f.read().rpartition(b")")[2].split()
        return sum(int(t) for t in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):  # (gone, or not Linux)
        return 0.0


def _usage_now() -> tuple:
    return resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)


_LEN = struct.Struct(">I")


def pack_frame(items: list[bytes]) -> bytes:
    """Node to worker: task envelopes, each behind its 4-byte length, in one write."""
    return b"".join(_LEN.pack(len(item)) + item for item in items)


def unpack_frame(data: bytes) -> list[memoryview]:
    """The task envelopes of a frame, as views of it: copies held a big task's arguments
    once more for as long as it ran (wire.decode_checked takes views)."""
    items, pos, view = [], 0, memoryview(data)
    while pos < len(data):
        (n,) = _LEN.unpack_from(data, pos)
        items.append(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return items


#: worker to node, ahead of each result envelope: what the node records of the task, so
#: that it parses no JSON a task (failed or not; the job id, which the node checks is its
#: task's; the usage; the reason's length)
_RESULT = struct.Struct(">?32sddddqqI")


def result_head(job_id: str, failed: bool, usage: dict, reason: str | None) -> bytes:
    """What goes ahead of a result envelope: the fixed-size head and the reason."""
    why = reason.encode("utf-8", "replace") if reason else b""
    return _RESULT.pack(
        failed, job_id.encode("ascii"), usage["start"], usage["end"], usage["wall"],
        usage["cpu"], usage["maxrss_kb"], usage["peak_rss_kb"], len(why),
    ) + why


#: how every message on the result pipe begins: READY is empty, a head's first byte is 0
#: or 1, a bare envelope's (an earlier worker's) is the magic's
MESSAGE_STARTS = frozenset({0, 1, wire.MAGIC[0]})


def send_result(fd: int, head: bytes, envelope: list[bytes]) -> None:
    """One message on the result pipe, framed as ``Connection.send_bytes`` frames it: the
    head, then the envelope's pieces (``wire.encode_pieces``).  A big envelope is written
    piece by piece, never joined (a copy of the whole result in the worker, whose memory
    counts against the task's limit)."""
    size = sum(map(len, envelope))
    n = len(head) + size
    frame = CONN_LEN.pack(n) if n < 0x7FFFFFFF else CONN_LEN.pack(-1) + CONN_BIG.pack(n)
    if size <= 1 << 16:
        _write_all(fd, b"".join((frame, head, *envelope)))
        return
    _write_all(fd, frame + head)
    small: list[bytes] = []  # (small pieces together: one write, not one each)
    for piece in envelope:
        if len(piece) < 1 << 16:
            small.append(piece)
            continue
        if small:
            _write_all(fd, b"".join(small))
            small = []
        _write_all(fd, piece)
    if small:
        _write_all(fd, b"".join(small))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a write interrupted by a signal may be partial
        view = view[os.write(fd, view):]


#: multiprocessing.Connection's framing of a message, on both pipes: its length, or -1
#: and then a 64-bit length
CONN_LEN = struct.Struct("!i")
CONN_BIG = struct.Struct("!Q")


def unpack_result(data: bytes, job_id: str) -> tuple[bool, dict | None, str | None, bytes | memoryview]:
    """``(failed, usage, reason, result envelope)`` from a worker's result for the task of
    ``job_id`` (the envelope a view of ``data``); ValueError if it is not one, or is
    another job's."""
    if data[:5] == wire.MAGIC:  # (a head begins with 0 or 1) no head: an earlier worker's
        return _bare_result(data, job_id)
    if len(data) < _RESULT.size:
        raise ValueError(f"a result of {len(data)} bytes is too short")
    failed, of, start, end, wall, cpu, maxrss, peak, n = _RESULT.unpack_from(data)
    if of != job_id.encode("ascii"):
        raise _another_jobs(repr(of.decode("ascii", "replace")), job_id)
    pos = _RESULT.size + n
    # a view: the node copies it once, with the samples of a long task in its header or
    # as it is (a copy made here too held a big result three times in the node)
    envelope = memoryview(data)[pos:]
    if envelope[: len(wire.MAGIC)] != wire.MAGIC:
        raise ValueError("it holds no result envelope")
    reason = data[_RESULT.size : pos].decode("utf-8", "replace") if n else None
    usage = {"start": start, "end": end, "wall": wall, "cpu": cpu,
             "maxrss_kb": maxrss, "peak_rss_kb": peak}
    return failed, usage, reason, envelope


def _bare_result(envelope: bytes, job_id: str) -> tuple[bool, dict | None, str | None, bytes]:
    """A result envelope with no head, as workers of kotta-executor 0.1.0 before this one
    sent them: a requirements venv that installs another kotta-executor runs those (its
    site-packages come first)."""
    h = wire.peek_header(envelope)  # EnvelopeError is a ValueError
    failed, usage, reason = h.get("failed", 0), h.get("usage"), h.get("reason")
    if h["kind"] != "result" or type(failed) is not int or not isinstance(usage, dict | None) \
            or not isinstance(reason, str | None):
        raise ValueError("it is not a result")
    if h["job_id"] != job_id:
        raise _another_jobs(h["job_id"], job_id)
    return h["outcome"] != wire.OK or failed > 0, usage, reason, envelope


def _another_jobs(of: str, job_id: str) -> ValueError:
    return ValueError(f"it is the result of job {of}, not of the task the worker was "
                      f"running ({job_id})")


def _watch_parent(parent: int, period: float = 0.25, sleep=time.sleep, mark: str = "") -> None:
    """If the node dies (SIGKILL), take this worker's process group with it: a task must
    not run on unsupervised, without walltime or kill, while its redelivery runs elsewhere.
    (A thread: it needs the GIL, which C code that holds it for long can delay.)

    ``sleep`` is bound here, not looked up each time: a task that replaces ``time.sleep``
    (``time.sleep = lambda s: None``, to hurry a library's retries) and leaves it so must
    not turn this loop into one that spins, slowing every later task of the worker.

    ``mark``: this worker's (WORKER_MARK), whose holders it ends too (:func:`_kill_marked`)."""
    while True:
        sleep(period)
        if os.getppid() != parent:
            _end_orphaned(mark)


def _end_orphaned(mark: str) -> None:
    """Its node gone: SIGKILL what this worker's tasks started (``mark``: see
    :func:`_watch_parent`), remove its script jobs' directories, and SIGKILL the worker."""
    _kill_marked(mark)
    # (its session's other groups first, a script job's: when it leads one, as the
    # node starts it; not a test's session, whose groups are not its tasks')
    if os.getsid(0) == os.getpid():
        for pgid in session_groups(os.getpid()) - {os.getpgid(0)}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
    _remove_script_dirs()
    os.killpg(0, signal.SIGKILL)


def _node_gone(parent: int | None) -> bool:
    """Whether the worker's node ``parent`` has died, or is dying.  A node killed closes
    its pipes (which ends the worker's loop) before the kernel hands its workers to another
    parent: the worker may still see it as its parent then, exiting (PF_EXITING, in its
    /proc stat's flags: Linux; elsewhere only a new parent tells)."""
    if parent is None:
        return False
    if os.getppid() != parent:
        return True
    try:
        with open(f"/proc/{parent}/stat", "rb") as f:
            # after the command's ")": state, ppid, pgrp, session, tty_nr, tpgid, flags
            flags = int(f.read().rpartition(b")")[2].split()[6])
    except (OSError, ValueError, IndexError):
        return False
    return bool(flags & _PF_EXITING)


#: the flag of a process that is exiting (<linux/sched.h>)
_PF_EXITING = 0x4
#: the worker's node (its parent as it started) and its mark (WORKER_MARK), set by main
_PARENT: int | None = None
_MARK = ""


def _kill_marked(mark: str, rounds: int = 10) -> None:
    """SIGKILL every process that holds this worker's ``mark`` in its environment: what
    its tasks started outside its session (a daemon: fork, setsid, fork), which the node,
    a subreaper, ends when the worker goes (pool.adopted); with the node dead, those went
    to init, and ran on for good, beside the task's redelivery.  (Read from /proc: Linux.
    A few rounds: what a killed one started carries the mark too.)"""
    if not mark:
        return
    entry, me = f"{WORKER_MARK}={mark}".encode(), os.getpid()
    for _ in range(rounds):
        try:
            pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            return
        found = False
        for pid in pids:
            if pid == me:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if entry not in f.read().split(b"\0"):
                        continue
                os.kill(pid, signal.SIGKILL)
                found = True
            except OSError:  # gone, or another user's
                pass
        if not found:
            return


def _remove_script_dirs() -> None:
    """Remove the working directories of this worker's script jobs: its node removes those
    of a worker that has gone (node.pool.Leftovers.remove_dirs), but a dead node removes
    nothing, and they stayed in the temporary directory for good."""
    from .staging import remove_script_dirs

    remove_script_dirs(os.getpid())


def session_groups(sid: int) -> set[int]:
    """The process groups of the session ``sid`` leads (a worker leads one of its own):
    its own, and those its tasks' processes made, such as a script job's (which runs in
    a group of its own, kotta_executor.script), orphans of theirs included, which a
    signal to the worker's group alone would miss.  (Read from /proc: Linux; elsewhere
    ``sid``'s group alone.)  A process that left the session (``setsid``, a daemon) is
    not in it: the node finds those by their mark (pool.adopted)."""
    groups = {sid}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return groups
    for pid in pids:
        try:
            if os.getsid(pid) == sid:
                groups.add(os.getpgid(pid))
        except OSError:  # gone meanwhile
            pass
    return groups


#: for a worker in a requirements venv: the node's site-packages directories, whose
#: ``.pth`` files it reads (pool.spawn puts the directories themselves on PYTHONPATH,
#: which reads none: packages installed in editable mode there could not be imported)
NODE_SITE = "KOTTA_NODE_SITE"


def _add_node_sites(dirs: str) -> None:
    """Read the ``.pth`` files of the node's site-packages ``dirs``; the directories they
    add go on PYTHONPATH too, for the Python processes a task starts (a ``.pth`` line that
    imports, an import hook, applies in this worker only)."""
    before = set(sys.path)
    for d in filter(None, dirs.split(os.pathsep)):
        site.addsitedir(d)  # (its .pth entries after the venv's own packages)
    added = [p for p in sys.path if p not in before]
    if added:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [*filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), *added])


#: the client's directories whose names hold ``os.pathsep``, which PYTHONPATH cannot
#: carry (it splits them in two), as JSON, from an executor that starts its node
EXTRA_PATH = "KOTTA_EXTRA_PATH"


def _add_extra_path(value: str) -> None:
    """Put the directories of ``EXTRA_PATH`` on ``sys.path``: a script in
    ``runs/12:00:00/`` imports its ``helper.py`` there, and its tasks, which name their
    module-level functions by reference, must import it too."""
    if value:
        sys.path.extend(p for p in json.loads(value) if p not in sys.path)


def main(argv: list[str] | None = None) -> int:
    global _PID, _PARENT, _MARK
    _PID = os.getpid()
    argv = sys.argv[1:] if argv is None else argv
    _PARENT, _MARK = os.getppid(), os.environ.get(WORKER_MARK, "")
    threading.Thread(target=_watch_parent, args=(_PARENT,), kwargs={"mark": _MARK},
                     daemon=True).start()
    task_fd, result_fd = int(argv[0]), int(argv[1])
    _add_node_sites(os.environ.pop(NODE_SITE, ""))
    _add_extra_path(os.environ.pop(EXTRA_PATH, ""))
    for fd in (task_fd, result_fd):
        os.set_inheritable(fd, False)  # children of a task must not hold our pipes
    tasks = Connection(task_fd, writable=False)
    _keep_capture()
    # STOP_SIGNAL from the node: finish the task at hand, start no other, exit.  (It
    # was blocked by the node until now: a request made during start-up arrives here.)
    _keep_stop_signal()
    try:  # ready: the walltime of the first task counts from here, not from our start-up
        send_result(result_fd, READY, [])
    except OSError:  # the node is gone
        return 0
    while not _STOP.is_set():
        try:
            frame = tasks.recv_bytes()
        except (EOFError, OSError):
            return STOPPED if _STOP.is_set() else 0
        for data in unpack_frame(frame):  # one result per task, as soon as it is done
            if _STOP.is_set():
                break
            send_result(result_fd, *run_task(data))
            if _PRINTED:  # (nothing to free for a task that printed nothing)
                _release_capture()
            _keep_stop_signal()
    return STOPPED


def _ask_stop(*_: object) -> None:
    _STOP.set()
    # Heard: ignored from now until the worker puts its handler back after its task
    # (_keep_stop_signal).  That shows the node (in /proc/PID/status) that the worker took
    # the request, not a handler a task put on the signal: only then does it take back the
    # tasks queued behind the one running (node.pool.Worker.stop_heard)
    _signal.signal(STOP_SIGNAL, _signal.SIG_IGN)


def _keep_stop_signal() -> None:
    """After each task: whatever the task did with STOP_SIGNAL (a handler of its own,
    SIG_IGN, a blocked mask), the next request reaches this worker again; one the task
    kept blocked arrives now.  Installed every time: a handler set from C (a library's
    ``sigaction``, ``faulthandler.register``) does not show in ``signal.getsignal``.
    (A request made while a task's own handler was installed is lost.)

    Through ``_signal``, the C functions ``signal`` wraps: its wrappers turn handlers and
    masks into enum members, which for a function or a real-time signal means a raised
    and caught exception; that made these two calls cost 10 us, and a no-op task's
    worker about a third more CPU.  These cost about 1 us."""
    _signal.signal(STOP_SIGNAL, _ask_stop)
    _signal.pthread_sigmask(signal.SIG_UNBLOCK, (STOP_SIGNAL,))


_STOP = threading.Event()
#: the signal by which the node asks a worker to finish its task and start no other: a
#: real-time signal where there are some (Linux).  Not SIGUSR1, which tasks and the
#: libraries they load take for their own (``faulthandler.register``, MPI runtimes,
#: debuggers): a handler of theirs swallowed the request, and the worker ran on.
STOP_SIGNAL: int = signal.SIGRTMIN + 4 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR1
#: the message a worker sends once, when it has started up (a result is never empty)
READY = b""
#: the variable that names a worker in its processes' environments (its id, random: set
#: by node.pool, with the node's pid as KOTTA_WORKER_OF)
WORKER_MARK = "KOTTA_WORKER_ID"
#: the exit status of a worker that stopped as the node asked (STOP_SIGNAL): it sends each
#: result before it looks at the request, so it never began a task it did not report
STOPPED = 75


if __name__ == "__main__":
    try:
        status = main()
    finally:
        # Its node killed, the worker ended here at once (its task pipe closed, or the
        # pipe a result goes by): while it idled, before its watch of the node
        # (_watch_parent) had seen the node gone; while it ran a script job, once the
        # watch's first kills had ended the script, and before the rest.  What its tasks
        # had started (a child left running, a script's background jobs) then ran on for
        # good under init.  It ends them now, as its watch would have, and itself.  (Not
        # a child a task forked that came back here: its parent is the worker.)
        if os.getpid() == _PID and _node_gone(_PARENT):
            _end_orphaned(_MARK)
    _flush_streams()
    # Not sys.exit: that would wait for threads a task left running (a non-daemon thread of
    # some library), and a worker the node closed or asked to stop must exit now, as
    # multiprocessing's workers do.
    os._exit(status)
