"""Worker processes of a node: start, feed, read, kill (the whole process tree), replace.

Workers belong to one owner for their whole life (warm reuse, never shared between owners).
Each has two pipes (tasks in, results out) and two unlinked capture files that are its
fds 1 and 2; the node keeps its own handles on those files so that a task's output survives
the worker's death.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psutil

from kotta_executor.config import SCRIPT_TMPDIR_ENV, interpreter_flags

from .worker import (
    _LEN,
    CONN_BIG,
    CONN_LEN,
    MESSAGE_STARTS,
    NODE_SITE,
    STOP_SIGNAL,
    STOPPED,
    WORKER_MARK,
    pack_frame,
    read_capture,
    session_groups,
    trim_capture,
)

log = logging.getLogger("kotta.node")

#: tasks shorter than this (moving average, seconds) are piped to a worker several at once
TINY_TASK = 0.002
#: a worker whose tasks take less than this (moving average, seconds, measured: it has run
#: one) has one more held for it by its node, in reserve; one of longer tasks, or of tasks
#: not measured yet, only the one it runs: the rest wait in the queue, for whichever
#: node's worker is free first (Node._room)
SHORT_TASK = 1.0
#: the tasks piped behind one that has run this long (seconds), and three times longer
#: than its worker's tasks usually do, are taken back to run on another worker, when one
#: could take them (Worker.take_back_at, Node._take_back).  Not sooner: the worker that
#: gives them back stops after its task, and a fresh one (an interpreter, the task's
#: imports) costs a tenth of a second or more
TAKE_BACK_AFTER = 1.0

#: seconds between the soft signal and SIGKILL when a task is stopped
KILL_GRACE = 0.5
#: errors starting a process (a worker, an env build's) that are the node's own and pass:
#: out of file descriptors, of memory, of processes (Node._not_started, envs.EnvCache)
PASSING_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})
#: seconds a new worker may take to start (to say it is ready) before it is killed; its
#: first task's walltime counts from then, not from the node's spawning it
STARTUP_LIMIT = 120.0

#: environment variables a worker never inherits: the node's own credentials
SCRUBBED_PREFIXES = ("AWS_", "KOTTA_NODE_")


@dataclass(slots=True)
class Task:
    """A task the node holds: its delivery, its decoded header, bytes for the worker."""

    delivery: Any
    header: dict[str, Any]
    data: bytes
    started: float | None = None  # when it began running on a worker (monotonic)
    monitor: Any = None  # a node.monitor.Monitor once the task has run for a while
    claims: Any = None  # who signed it (kotta_executor.security.tokens.Claims)
    staged: Any = None  # its working directory and credentials (node.datasteps.Staged)
    claimed: bool = False  # this node moved its job on (it may move it on again)
    #: back from a worker that certainly never began it (stopped as asked before it, never
    #: started up, or ended or died under a task before it): a stopping node moves its job
    #: back to pending (Node._unstage).  Cleared when it begins on a worker (its
    #: ``started`` set): once run, it is not that
    unbegun: bool = False
    kill_requested: bool = False  # killed while staging: it must not run
    #: handed to a worker and back (Node._put_back): else a claimed task the node holds is
    #: one it staged and never gave a worker, whose kill is no attempt (Node._kill_staging)
    put_back: bool = False
    #: the memory (KiB) its tree was killed for using (Node._check_memory): its peak, at least
    killed_at_kb: int = 0
    #: why the node will not run it, ``(error type, reason)``: its job fails once this
    #: node has claimed it (a copy of a job that runs elsewhere must not end it)
    refusal: tuple[str, str] | None = None
    adopted: bool = False  # its job recorded (pending) in this step's transaction
    #: its outcome is queued for the report (Node._queue_finish): once a task
    ended: bool = False
    job_id: str = field(init=False)  # from the header (read many times a task)
    owner: str = field(init=False)

    def __post_init__(self) -> None:
        self.job_id = self.header["job_id"]
        self.owner = self.header["owner"]


@dataclass(eq=False)
class Worker:
    owner: str
    proc: subprocess.Popen
    tasks: Connection
    results: Connection
    out: Any
    err: Any
    inflight: deque[Task] = field(default_factory=deque)
    avg: float = 0.002  # moving average of task run time, seconds
    kill_reason: tuple[str, str] | None = None
    kill_job: str | None = None  # the task a kill is for (the head when it was asked)
    kill_deadline: float | None = None
    kill_tree: list[psutil.Process] = field(default_factory=list)
    born: float = field(default_factory=time.monotonic)
    env: str | None = None  # key of the requirements venv it runs in (None: the node's python)
    retiring: bool = False  # takes no more tasks (it was given one with restricted data)
    ran: int = 0  # tasks it has reported (or that ended in it)
    #: the most tasks it may run in all: the least ``max_tasks_per_child`` of the tasks it
    #: was given (None: no limit); it is retired once it has run them
    max_tasks: int | None = None
    stop_asked: bool = False  # told to exit after its current task (it begins no other)
    ready: bool = False  # it has started up (said so with an empty message on its results)
    #: framed tasks the pipe has not taken yet: the node never blocks on a worker's pipe
    #: (a frame larger than the pipe, queued behind a long task, would wait for it).  In
    #: pieces: a big task's own bytes (a view of them), never a copy (see send)
    outbox: deque[bytes | memoryview] = field(default_factory=deque)
    #: what the worker wrote that does not make a whole message yet (see read_results)
    inbox: bytearray = field(default_factory=bytearray)
    garbled: bool = False  # it wrote something that is not a message: nothing more is read
    closed: bool = False  # its end of the result pipe is closed (a task may have closed it)
    mark: str = ""  # its id in its processes' environments (WORKER_MARK)
    #: the task it ran when the node asked it to stop after it, to take back the tasks
    #: piped behind it (Node._take_back): None when nothing is being taken back
    taking_back: Task | None = None
    #: the task it runs, found to have taken the node's stop request away (ignored, or left
    #: to kill the worker): nothing is taken back from behind it (Worker.heeds_stop)
    unheeding: Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        return self.results.fileno()

    @property
    def depth(self) -> int:
        """How many tasks may wait in this worker's pipe (when the node has a backlog): many
        while tasks are tiny, one in reserve while they are short (SHORT_TASK), so the
        worker never waits for the node between tasks; none while they are long (the
        moment's wait for the node is nothing beside them, and one in reserve waited up to
        three of its tasks' usual time, TAKE_BACK_AFTER, while another worker could run it:
        so _holds has it too); and none behind a task that has run unusually long, so work
        stays in the node, pending and cancellable, rather than queued behind it."""
        if not self.ready:  # its start-up may be long: nothing waits behind it meanwhile
            return 1
        if self.inflight and self.inflight[0].started is not None:
            running = time.monotonic() - self.inflight[0].started
            if running > max(2 * TINY_TASK, 3 * self.avg):
                return 1
        return 64 if self.avg < TINY_TASK else 2 if self.avg < SHORT_TASK else 1

    def take_back_at(self) -> float | None:
        """When the tasks piped behind the one it runs are to be taken back, to run on
        another worker (one already piped stayed behind a task of a minute while another
        worker idled): once that task has run TAKE_BACK_AFTER, and three times longer
        than its tasks usually do.  None: nothing to take back."""
        if len(self.inflight) < 2 or self.kill_deadline is not None or self.retiring or (
                self.taking_back is not None) or self.inflight[0] is self.unheeding:
            return None
        started = self.inflight[0].started
        if started is None:
            return None
        return started + max(TAKE_BACK_AFTER, 3 * self.avg)

    def heeds_stop(self) -> bool:
        """Whether the worker would act on a stop request (``stop_after_current``) now: its
        STOP_SIGNAL is caught, not ignored nor left to its default action (to die) by the
        task it runs.  Only then may the node take back the tasks behind that task: the
        request ignored, the worker ran them too, after it; deadly, it killed the task.
        (A handler of the task's own, which swallows it, cannot be told from the
        worker's until the request is sent: Worker.stop_heard.)  Read from /proc; False
        where there is none (_stop_signal_is)."""
        return self._stop_signal_is(b"SigCgt:")

    def stop_heard(self) -> bool:
        """Whether the worker itself has taken a stop request: its handler ignores the
        signal from then until it is done with its task (node.worker._ask_stop).  Not a
        request a handler of the task's own took: the worker never heard it, and would
        begin the next task.  Read from /proc; False where there is none."""
        return self._stop_signal_is(b"SigIgn:")

    def _stop_signal_is(self, mask: bytes) -> bool:
        """Whether STOP_SIGNAL is in that mask of /proc/PID/status (SigCgt: caught, SigIgn:
        ignored).  False where it cannot be read: the worker gone, or no /proc (macOS),
        where nothing is then taken back, as before there was a take-back: True there, a
        task's own handler that swallowed the request could not be told from the worker's,
        and the tasks behind its task ran twice (taken back, and then in that worker)."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(mask):
                        return bool(int(line.split()[1], 16) >> (STOP_SIGNAL - 1) & 1)
        except (OSError, ValueError):
            pass
        return False

    def send(self, tasks: list[Task]) -> None:
        """Hand tasks to the worker in one write (one wake-up for the worker).  The first
        task's walltime starts now if the worker is ready, else when it says it is."""
        if not self.inflight:  # (a task back from a failed write may carry an old clock)
            tasks[0].started = time.monotonic() if self.ready else None
            if self.ready:  # it begins: no longer one a worker never began (Node._unstage)
                tasks[0].unbegun = False
        self.inflight.extend(tasks)
        size = sum(4 + len(t.data) for t in tasks)
        # multiprocessing.Connection's framing, which the worker's recv_bytes reads
        if size < 0x7FFFFFFF:
            head = CONN_LEN.pack(size)
        else:
            head = CONN_LEN.pack(-1) + CONN_BIG.pack(size)
        if size < _BIG_FRAME:
            self.outbox.append(head + pack_frame([t.data for t in tasks]))
        else:
            # big arguments: written from the tasks' own bytes.  Joined into a frame, and
            # that copied into the outbox, a task of 256 MB was held three times by the
            # node (800 MB) until the worker had read it.  (Small tasks around them still
            # go joined: a write each would cost a system call a task.)
            small = [head]
            for t in tasks:
                small.append(_LEN.pack(len(t.data)))
                if len(t.data) < _BIG_FRAME:
                    small.append(t.data)
                    continue
                self.outbox += (b"".join(small), memoryview(t.data))
                small = []
            if small:
                self.outbox.append(b"".join(small))
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now (the node writes the rest when it is writable);
        OSError if the worker is gone."""
        outbox = self.outbox
        while outbox:
            try:
                n = os.write(self.tasks.fileno(), outbox[0])
            except BlockingIOError:
                return
            if n < len(outbox[0]):
                outbox[0] = memoryview(outbox[0])[n:]
            else:
                outbox.popleft()

    def read_results(self) -> tuple[list[bytes], bool]:
        """The messages the worker has written, whole, and whether it has closed its end.
        Reads take all the pipe holds until it would block: a burst of results costs two
        system calls, not two a result and a poll between them.  The part of a message
        still on its way waits in ``inbox``.  Bytes that cannot begin a message (a task
        that wrote on the pipe) make the worker ``garbled``: nothing more is kept."""
        fd, inbox, eof = self.results.fileno(), self.inbox, False
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                eof = self.closed = True
                break
            if not self.garbled:
                inbox += chunk
        messages: list[bytes] = []
        pos, end = 0, len(inbox)
        results = 0  # (the k-th result is the k-th task's in the pipe: its head names it)
        with memoryview(inbox) as view:  # one copy of each message, not two
            while end - pos >= 4:  # multiprocessing.Connection's framing, as the worker sends
                (n,) = CONN_LEN.unpack_from(inbox, pos)
                head = 4
                if n == -1:
                    if end - pos < 12:
                        break
                    (n,) = CONN_BIG.unpack_from(inbox, pos + 4)
                    head = 12
                    if n < 0x7FFFFFFF:  # (only longer ones are written this way)
                        n = -1
                if n < 0 or n > _MAX_MESSAGE:
                    self.garbled = True
                    break
                if n and end - pos > head and inbox[pos + head] not in MESSAGE_STARTS:
                    self.garbled = True
                    break
                if n and results < len(self.inflight) and end - pos > head and (
                    inbox[pos + head] in (0, 1)
                ):
                    # a result's head: the job id of the task it is for follows its first
                    # byte.  A few bytes a task wrote on the pipe read as a length, and
                    # the next as a head's first byte (a length's high byte is 0): the job
                    # id is not there, and the worker is garbled, not waited on for a
                    # message of gigabytes that never comes
                    if n < 1 + _JOB_ID_SIZE:  # (too short to be a head)
                        self.garbled = True
                        break
                    if end - pos - head < 1 + _JOB_ID_SIZE:
                        break
                    at = pos + head + 1
                    if view[at : at + _JOB_ID_SIZE] != self.inflight[results].job_id.encode():
                        self.garbled = True
                        break
                if end - pos - head < n:
                    break
                results += n > 0
                messages.append(bytes(view[pos + head : pos + head + n]))
                pos += head + n
        if self.garbled:
            inbox.clear()
        else:
            del inbox[:pos]
        return messages, eof

    def started_up(self) -> None:
        """The worker said it is ready: the task it holds begins now."""
        self.ready = True
        if self.inflight and self.inflight[0].started is None:
            self.inflight[0].started = time.monotonic()
            self.inflight[0].unbegun = False

    def slow_to_start(self, now: float) -> bool:
        return not self.ready and now - self.born > STARTUP_LIMIT

    def task_done(self) -> Task:
        task = self.inflight.popleft()
        self.ran += 1
        now = time.monotonic()
        if task.started is not None:
            self.avg = 0.8 * self.avg + 0.2 * (now - task.started)
        if self.inflight:
            self.inflight[0].started = now
            self.inflight[0].unbegun = False
        return task

    def output(self) -> tuple[bytes, bytes]:
        """What the current task wrote to stdout and stderr (read by the node after a death)."""
        try:
            return read_capture(self.out.fileno()), read_capture(self.err.fileno())
        except (OSError, ValueError):
            return b"", b""

    def trim_output(self) -> None:
        """Free the disk that the current task's output holds before the tail its result
        carries (a long task that logs much: :func:`trim_capture`)."""
        for f in (self.out, self.err):
            try:
                trim_capture(f.fileno())
            except (OSError, ValueError):  # (housekeeping: the file stays whole)
                pass

    def kill(self, error_type: str, message: str) -> None:
        """Soft signal to the whole process tree now; SIGKILL at ``kill_deadline``."""
        if self.kill_deadline is not None:
            return
        self.kill_reason = (error_type, message)
        self.kill_job = self.inflight[0].job_id if self.inflight else None
        try:
            self.kill_tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            self.kill_tree = []
        # and what its tasks left with the node (a daemon, re-parented there)
        self.kill_tree = _with_descendants(self.kill_tree + adopted(self.mark))
        # each process once: the groups, and the tree's processes outside them (a task's
        # SIGTERM handler ran twice, the second time inside the first's clean-up)
        groups = session_groups(self.pid)
        _signal_all([p for p in self.kill_tree if _group_of(p) not in groups], signal.SIGTERM)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        self.kill_deadline = time.monotonic() + KILL_GRACE

    def escalate(self) -> None:
        """SIGKILL whatever of the tree outlived the grace period: what was seen at the
        kill, and what its members still alive have started since (a child's SIGTERM
        handler may start a process to clean up, say)."""
        if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
            self.kill_tree = _with_descendants(self.kill_tree + adopted(self.mark))
            _signal_all(self.kill_tree, signal.SIGKILL)
            _signal_session(self.pid, signal.SIGKILL)

    def leftovers(self) -> Leftovers:
        """What may still run of it once it has exited (or is being killed): a task's
        children, in its process group or (for a kill) in the tree seen then.  Unless a
        kill signalled them already, they get SIGTERM now; ``Leftovers.kill`` sends SIGKILL
        at the kill's deadline, or after the grace period."""
        if self.kill_deadline is None:
            _signal_session(self.pid, signal.SIGTERM)
            return Leftovers(time.monotonic() + KILL_GRACE, self.pid, [])
        return Leftovers(self.kill_deadline, self.pid, self.kill_tree)

    def takes(self, n: int, limit: int | None) -> bool:
        """Whether, with ``n`` tasks before it in its pipe, it may be given a task whose
        header says ``max_tasks_per_child=limit``: it will have run fewer tasks than that
        before it, and fewer than the limit of any task given to it before."""
        k = self.ran + n
        return (self.max_tasks is None or k < self.max_tasks) and (limit is None or k < limit)

    def given(self, limit: int | None) -> None:
        """A task with ``max_tasks_per_child=limit`` is on its way to it."""
        if limit is not None and (self.max_tasks is None or limit < self.max_tasks):
            self.max_tasks = limit

    @property
    def spent(self) -> bool:
        """Whether it has run as many tasks as one of them allowed its worker."""
        return self.max_tasks is not None and self.ran >= self.max_tasks

    def retire(self) -> None:
        """Take no more tasks, and skip those already piped (the node re-queues them when
        the worker has exited): for a worker that must not serve anything further."""
        self.retiring = True
        self.stop_after_current()
        self.outbox.clear()
        self.tasks.close()

    def stop_after_current(self) -> None:
        """Ask the worker to finish the task it runs and exit without starting another.
        (A worker starts with STOP_SIGNAL blocked, until it has its handler: asked while it
        starts up, it stops before its first task.)"""
        self.stop_asked = True
        if self.proc.returncode is not None:  # waited for: its pid may be another's now
            return
        try:
            os.kill(self.pid, STOP_SIGNAL)
        except ProcessLookupError:
            pass

    def stopped_as_asked(self, code: int) -> bool:
        """Whether the worker exited because the node asked it to (``stop_after_current``),
        between tasks: then none of the tasks it holds began."""
        return code == STOPPED and self.stop_asked and self.kill_reason is None

    def close_idle(self) -> None:
        """End an idle worker (to replace it): close its pipe, which it exits on; its tree
        is killed if it has not exited within the grace period."""
        self.tasks.close()
        try:
            self.proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            self.kill("WorkerDied", "replaced")
            self.kill_deadline = 0
            self.escalate()
            self.proc.wait()
        self.close()

    def dead(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        for c in (self.tasks, self.results, self.out, self.err):
            try:
                c.close()
            except OSError:
                pass


@dataclass(eq=False)
class Leftovers:
    """The processes a gone worker may have left running, to SIGKILL at ``deadline``: a
    task must not run on unsupervised once its job is final."""

    deadline: float
    pgid: int
    tree: list[psutil.Process]

    def kill(self) -> None:
        self.tree = _with_descendants(self.tree)
        _signal_all(self.tree, signal.SIGKILL)  # (psutil checks each is still the same)
        _signal_session(self.pgid, signal.SIGKILL)
        self.remove_dirs()

    def remove_dirs(self) -> None:
        """Remove the working directories of the worker's script jobs (see
        node.staging.remove_script_dirs)."""
        from .staging import remove_script_dirs

        remove_script_dirs(self.pgid)  # (the worker's pid)

    def any_left(self) -> bool:
        """Whether anything of it still runs (most workers leave nothing: no waiting)."""
        for pgid in session_groups(self.pgid):
            try:
                os.killpg(pgid, 0)
                return True
            except ProcessLookupError:
                pass
            except PermissionError:  # (a member we may not signal: not one of ours)
                pass
        return any(p.is_running() for p in self.tree)


@dataclass(eq=False)
class Planned:
    """A worker a dispatch plans to start for ``owner`` (in the requirements venv
    ``venv``), in place of the idle ``victim`` if given: started, and the victim ended,
    only once a task planned for it is claimed (a task whose claim fails, a copy of a job
    that runs or ran, must not cost a warm worker).  Planned like a Worker: its ``env``
    key, its limits (:meth:`Worker.takes`, :meth:`Worker.given`)."""

    owner: str
    venv: Any
    victim: Worker | None
    env: str | None = field(init=False)
    ran: int = 0
    max_tasks: int | None = None
    retiring: bool = False
    #: why it could not be started (Node._start_planned), if it could not
    failure: Exception | None = None

    takes = Worker.takes
    given = Worker.given

    def __post_init__(self) -> None:
        self.env = None if self.venv is None else self.venv.key


#: in a worker's environment, and so in that of every process its tasks start (read from
#: ``/proc/PID/environ``, which shows the environment a process was started with: a forked
#: process's is its parent's): the pid of the node that started the worker, and an id of
#: the worker's own (its pid is not known before it starts: WORKER_MARK, node.worker's)
NODE_MARK = "KOTTA_WORKER_OF"

#: prctl(2) option: orphaned descendants are re-parented to this process, not to init
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process (a node) the one its workers' orphaned descendants are re-parented
    to (Linux): a task's daemon (fork, setsid, fork, the middle one exits), or its child in
    a session of its own whose parent died, stays where the node finds it (:func:`adopted`,
    :class:`Orphans`), not with init.  False where that is not possible.  (Not the workers:
    a subreaper must reap what it adopts, and a worker that did would take exit statuses
    from its tasks' own ``os.wait()``.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False


def _marked(children: list[psutil.Process]) -> list[tuple[psutil.Process, str]]:
    """Of this node's ``children``, those a task of one of its workers started (the node's
    mark in their environment), each with its worker's mark.  (A zombie's environment
    cannot be read: it is not among them.)"""
    mark, out = str(os.getpid()), []
    for p in children:
        try:
            env = p.environ()
        except psutil.Error:  # gone, a zombie, or another user's
            continue
        if env.get(NODE_MARK) == mark and env.get(WORKER_MARK) is not None:
            out.append((p, env[WORKER_MARK]))
    return out


def _unmarked(children: list[psutil.Process]) -> list[psutil.Process]:
    """Of this node's ``children`` that are not its workers, those running without the
    node's mark in their environment, outside the node's session: while no requirements
    build runs (whose processes lack it too, in sessions of their own), what a task
    started with an environment of its own (``env={}``) and the kernel re-parented to the
    node.  (Not a process the node started itself, in its session: a library's helper,
    such as botocore's ``credential_process``; no task's process can join that session.
    Nor a zombie, nor another user's.)"""
    mark, session, out = str(os.getpid()), os.getsid(0), []
    for p in children:
        try:
            if p.environ().get(NODE_MARK) != mark and os.getsid(p.pid) != session and (
                    p.status() != psutil.STATUS_ZOMBIE):
                out.append(p)
        except (psutil.Error, OSError):  # gone, a zombie, or another user's
            continue
    return out


def _may_end_unmarked() -> bool:
    """Whether the node may end its unmarked children (_unmarked): not as PID 1 of its PID
    namespace (a container's main process, no init before it), to which every orphan of
    the namespace goes, an operator's (``docker exec ... setsid cmd &``) too: those it
    ended, once its first workers were gone.  There the kernel ends the namespace's every
    process as the node exits; meanwhile a task's process that cleared its environment
    runs on, as it would with an init in front of the node."""
    return os.getpid() != 1


def _created(pid: int) -> float | None:
    """When the process ``pid`` was started (psutil's clock), None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def adopted(worker_mark: str | None = None) -> list[psutil.Process]:
    """This node's children that a task of one of its workers (the one of ``worker_mark``,
    if given) started and the kernel re-parented to the node: a daemon, or the child of a
    dead worker, say.  Empty unless the node is a subreaper (:func:`become_subreaper`)."""
    return [p for p, w in _marked(_children()) if worker_mark is None or w == worker_mark]


def adopted_by_worker() -> dict[str, list[int]]:
    """The pids of :func:`adopted` processes, by the mark of the worker whose task started
    them (one look at the node's children for all its workers)."""
    out: dict[str, list[int]] = {}
    for p, w in _marked(_children()):
        out.setdefault(w, []).append(p.pid)
    return out


class Orphans:
    """What workers of this node left running in sessions of their own after they went,
    re-parented to the node (a subreaper: :func:`become_subreaper`), to be ended: a task
    must not run on unsupervised once its worker is gone.  (What a live worker's tasks
    left, that worker's leftovers, run on while it does, and a walltime or kill on that
    worker ends them too: ``Worker.kill``.)  Each such process carries the node's and its
    worker's pids in its environment: SIGTERM when first seen, SIGKILL (with whatever it
    started) after the grace period, then reaped.

    The node's other children are its workers (``subprocess.Popen``, which reaps them) and
    the venv and pip processes of a requirements build (``node.envs._run``): those lack the
    marks, and a zombie without them is reaped only while no build runs, since the marks
    of a process that has exited can no longer be read."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[psutil.Process, float]] = {}

    def sweep(self, workers: list[Worker], now: float, *, building: bool) -> None:
        """``workers``: the node's live workers."""
        pids, live = {w.pid for w in workers}, {w.mark for w in workers}
        children = [p for p in _children() if p.pid not in pids and p.pid not in self.seen]
        if not building:  # orphans that exited before they were seen (see above)
            for p in children:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        _reap(p.pid)
                except psutil.Error:
                    pass
        for p, worker in _marked(children):
            if worker in live:  # a live worker's leftovers run on with it
                continue
            log.warning("ending process %d, left running by worker %s of this node, which "
                        "is gone", p.pid, worker)
            _signal_all([p], signal.SIGTERM)
            self.seen[p.pid] = (p, now + KILL_GRACE)
        if not building and _may_end_unmarked():  # (else it may be a build's: see above)
            for p in _unmarked(children):
                # A task's process that cleared its environment (``env={}``, ``os.execve``)
                # and was re-parented here carries no mark: whose worker it was cannot be
                # told.  It ran on for good after its task's walltime or kill().  It is a
                # gone worker's once no live worker is older than it: ended then
                try:
                    created = p.create_time()
                except psutil.Error:
                    continue
                if any(b is not None and b <= created for b in map(_created, pids)):
                    continue
                log.warning("ending process %d, left running by a task of a worker of this "
                            "node that is gone (it cleared its environment)", p.pid)
                _signal_all([p], signal.SIGTERM)
                self.seen[p.pid] = (p, now + KILL_GRACE)
        for pid, (p, deadline) in list(self.seen.items()):
            if _reap(pid):
                del self.seen[pid]
            elif now >= deadline:
                _signal_all(_with_descendants([p]), signal.SIGKILL)

    def end_all(self, *, building: bool = False) -> None:
        """At the node's stop: SIGKILL every process its workers' tasks left with it, and
        what those started (stopped first, so that none forks meanwhile), until none is
        left (a process killed hands its children to the node): a few rounds at most.
        ``building``: a requirements build still runs (its processes are unmarked too)."""
        unmarked = not building and _may_end_unmarked()
        for _ in range(10):
            # (at the stop the node's children are what its tasks left: those that cleared
            # their environment, unmarked, too; not a build's, whose thread, finding its
            # step reaped here, read exit code 0, and took a half-built env for ready)
            left = adopted() + (_unmarked(_children()) if unmarked else []) + [
                p for p, _ in self.seen.values()]
            tree = [p for p in _with_descendants(left) if _running(p)]
            if not tree:
                break
            _signal_all(tree, signal.SIGSTOP)
            tree = _with_descendants(tree)
            _signal_all(tree, signal.SIGKILL)
            for p in tree:
                try:
                    p.wait(0.2)  # (psutil reaps a child of ours)
                except psutil.Error:
                    pass
        for pid in list(self.seen):
            _reap(pid)
        self.seen.clear()

    def __bool__(self) -> bool:
        return bool(self.seen)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it has exited (or is not ours to wait for); whether it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and the descendants those of them still running have now."""
    out = {p.pid: p for p in procs}
    # Each look scans every process of the machine: one per process of a tree of hundreds
    # (a task that forks a pool, or a bomb) held the node's loop for seconds.  What was
    # found below one looked at already has had its descendants found with it.
    below: set[int] = set()
    for p in procs:
        if p.pid in below:
            continue
        try:
            for child in p.children(recursive=True):
                out.setdefault(child.pid, child)
                below.add(child.pid)
        except psutil.Error:  # gone (or not the same process any more: psutil checks)
            pass
    return list(out.values())


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _group_of(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:  # gone
        return None


def _signal_session(sid: int, sig: int) -> None:
    """``sig`` to a worker's process group (``sid``: the worker leads a session of its
    own) and the other groups of its session: a script job's, whose script runs in one
    of its own (kotta_executor.script), with what the script started."""
    for pgid in session_groups(sid):
        _signal_group(pgid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    env.update(extra or {})
    return env


#: the directory ``node`` and ``kotta_executor`` are imported from (for workers in a venv)
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the node's own site-packages directories, where kotta's dependencies (cloudpickle,
#: tblib, psutil) are, for workers in a requirements venv: that venv's
#: ``--system-site-packages`` are the *base* interpreter's, not those of a virtual
#: environment the node runs in (a source checkout of kotta beside a venv of its
#: dependencies: its workers died importing cloudpickle)
_SITE_DIRS = [d for d in (*site.getsitepackages(),
                          *([site.getusersitepackages()] if site.ENABLE_USER_SITE else []))
              if os.path.isdir(d)]


_READ_SIZE = 1 << 20
#: the length of a job id, as a result's head carries it (node.worker.result_head)
_JOB_ID_SIZE = 32
_MAX_MESSAGE = 1 << 40
#: a frame of tasks this big is written from the tasks' own bytes, not joined (Worker.send)
_BIG_FRAME = 1 << 20


def spawn(owner: str, scratch: str | None = None, env: Any = None) -> Worker:
    """Start a worker process for ``owner``; in the requirements venv ``env`` (a
    ``node.envs.Env``) if given.  Such a worker has the venv's site-packages first on its
    path, then the node's project directory and ``PYTHONPATH`` (the venv is made with
    ``--system-site-packages``, so the node's own dependencies stay importable)."""
    mark = os.urandom(8).hex()
    python = sys.executable
    extra = {"KOTTA_OWNER": owner, NODE_MARK: str(os.getpid()), WORKER_MARK: mark,
             SCRIPT_TMPDIR_ENV: tempfile.gettempdir()}
    if env is not None:
        python = env.python
        inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        path = [env.site, _PROJECT, *_SITE_DIRS, *filter(None, inherited)]
        extra["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        extra[NODE_SITE] = os.pathsep.join(_SITE_DIRS)  # (their .pth files: node.worker)
    task_r, task_w = os.pipe()
    try:
        result_r, result_w = os.pipe()
    except BaseException:
        os.close(task_r)
        os.close(task_w)
        raise
    out = err = None
    # STOP_SIGNAL (stop after the current task) blocked, inherited by the worker, which
    # unblocks it once it has its handler: sent earlier, it waits instead of ending it
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    try:
        out = tempfile.TemporaryFile(prefix="kotta-stdout-", dir=scratch)
        err = tempfile.TemporaryFile(prefix="kotta-stderr-", dir=scratch)
        proc = subprocess.Popen(
            # (-P as the node has it: one an executor started has no working directory
            # first on its path, nor do its workers; and its other options, the client's:
            # -X utf8, -W error, as a process pool's workers get them)
            [python, *interpreter_flags(), *(["-P"] if sys.flags.safe_path else []),
             "-m", "node.worker",
             str(task_r), str(result_w)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            pass_fds=(task_r, result_w),
            start_new_session=True,
            env=worker_env(extra),
        )
    except BaseException:
        # not started (its python not executable, EMFILE...): the node keeps nothing of it
        # open (it leaked four descriptors a try, until it could start no worker at all)
        for f in (out, err):
            if f is not None:
                f.close()
        os.close(task_w)
        os.close(result_r)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(task_r)
        os.close(result_w)
    os.set_blocking(task_w, False)  # Worker.send never waits for the worker
    os.set_blocking(result_r, False)  # nor Worker.read_results
    return Worker(
        owner=owner,
        proc=proc,
        tasks=Connection(task_w, readable=False),
        results=Connection(result_r, writable=False),
        out=out,
        err=err,
        env=None if env is None else env.key,
        mark=mark,
    )
