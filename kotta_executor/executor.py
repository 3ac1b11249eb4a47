"""KottaExecutor: a ``concurrent.futures.Executor`` whose workers live in an enclave.

Data flow::

  caller thread                manager thread (one per executor)        node daemon (process)
  ─────────────                ─────────────────────────────────        ─────────────────────
  submit(fn, *a)
    pickle call (wire) ──┐
    KottaFuture(job_id)  │
    outbox.append ───────┴──> _send: jobs.create()  ══ job row "pending" ══╗
                                     + task message on queue "test" ──────>║ receive
                                     ring node doorbell                    ║ dispatch: job row
                                                                           ║  -> "processing"
                                                                           ║ worker process:
                                                                           ║  unpickle, run,
                                                                           ║  capture fd 1/2
                                                                           ║ report: job row
                               _receive: take replies <── reply message ───╝  -> completed/failed
                                 (result inline, or read from the job row)     (at most once),
  future.result() <───────────   decode, unpickle, set_result/_exception       reply, ack
                               _reconcile: job rows of attached futures and of
                                 futures whose reply is overdue

  submit(fn, fut, ...)         a future among the arguments (dependencies.py): no job row
    KottaFuture(job_id)        yet; its callbacks count the futures done, then
    deps.add: callbacks ─────> deps.ready ─> _start_dependents: replace the futures by their
                                 results, pickle, outbox.append (then as above); or fail
                                 the future with DependencyError / SerializationError

The job table is the truth; replies are a fast path.  One manager thread owns all queue
I/O and all future state transitions (``set_result``, ``set_exception``), except
cancellation, which the cancelling thread does once the job is recorded cancelled, and the
move to running, which whoever reads the started job's record first makes (the manager's
reconcile, or ``status()``).

A future is registered under ``_shutdown_lock``, the lock ``shutdown()`` sets its flag
under and the manager decides to exit under: so a submit racing a shutdown is either
refused or sent, and the manager stays until its future is done.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import fcntl
import importlib.machinery
import itertools
import json
import logging
import operator
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures._base import PENDING
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import config, dependencies, wire
from . import requirements as _requirements
from ._poll import ready
from .backends import default_url, env_spec, open_enclave
from .backends.base import (
    KILLED_PENDING,
    Enclave,
    Finished,
    JobRecord,
    Message,
    NewJob,
    reply_queue,
)
from .errors import (
    AuthenticationError,
    BrokenEnclave,
    ConfigurationError,
    EnvelopeError,
    InvalidDataUri,
    SerializationError,
    TaskRejected,
    UnknownJob,
)
from .future import _CONDITION_LOCK, KottaFuture, _interrupts_held, _MapJobView
from .security import credentials as _credentials
from .security import staging
from .security import tokens as _tokens
from .security.access import check_job_access
from .security.credentials import Credentials
from .states import ACTIVE, CANCELLABLE, JobState

log = logging.getLogger("kotta.executor")

#: every this many seconds, the job table is consulted for a window of outstanding futures
RECONCILE_AFTER = 5.0
RECONCILE_WINDOW = 2000
#: seconds between job-table checks of attached futures, and how many are looked at each
#: time (a rolling window: a session attached to a whole earlier sweep reads a bounded
#: batch each time, not every job, five times a second)
ATTACH_POLL = 0.2
ATTACH_WINDOW = 500
#: every this many seconds, the oldest RUNNING_WINDOW futures not known to run (among the
#: oldest RUNNING_SCAN outstanding) are looked up in the job table, for running()
RUNNING_LOOK = 0.5
RUNNING_WINDOW = 100  # one BatchGetItem on AWS
RUNNING_SCAN = 4096
#: a submit this long after the previous one returned records its job itself (see _send_now)
SEND_NOW_GAP = 0.0003
#: seconds a lone submit's own send (_send_now) waits for another process's write lock
#: on the embedded enclave (a client stopped by ^Z inside a transaction, a long `kotta
#: prune`) before it leaves the job to the outbox: it waited the whole lock timeout, 60 s.
#: So too the cancel of an abandoned map's tasks, before it leaves them to the manager
SEND_NOW_LOCK_WAIT = 0.05
#: seconds a caller's cancel() or kill() waits for the locks in silence: then it warns that
#: it waits, and what for, and waits on (_cancel_jobs_told)
CANCEL_QUIET_WAIT = 1.0
#: seconds the deletion of its replies left over waits for another process's write lock
#: as an executor ends (_Leftovers.close)
CLOSE_LOCK_WAIT = 1.0
#: seconds between the manager's looks at the size of the enclave's log (checkpoint_due)
LOG_LOOK = 1.0
#: a job id's first 48 bits: the time in milliseconds (see _new_job_id)
_MS_MASK = (1 << 48) - 1
#: a batch of the outbox that the enclave refused (an AWS call failing beyond botocore's
#: own retries, a database locked too long) is tried again, backing off up to
#: SEND_BACKOFF_MAX seconds, for this long before the executor gives up (BrokenEnclave).
#: create() keeps a record already written, so a batch partly sent is safe to send again
SEND_RETRY_FOR = 60.0
SEND_BACKOFF_MAX = 5.0
#: a fault of the manager's turns is over once no turn has raised for this long (a turn
#: that reads nothing can succeed while the reads still fail: they come every few seconds)
STEP_CLEAR = 2 * RECONCILE_AFTER
#: seconds between looks at the reply queue when replies come to an inbox (a node that
#: cannot reach the inbox rings; this is in case the ring was lost)
QUEUE_LOOK = 1.0
#: long-poll wait for replies when the backend has no doorbells
REPLY_LONG_POLL = 2.0
#: a local node may be restarted this many times before the executor is declared broken
MAX_NODE_RESTARTS = 5
#: a local node that ran this long before it died served: its death starts the count again
NODE_SERVED = 60.0
#: seconds between looks at whether the local nodes this client started still run
NODE_LOOK = 0.1
#: a task handed to a node directly (see _send_now) that it has not recorded within this
#: many seconds is recorded and queued by the client
HAND_OFF_CONFIRM = 1.0
#: jobs pending this long on a queue that no live node serves get a warning (once, until
#: a node serves it again): a wait for them would otherwise be silent, and last forever
UNSERVED_WARN = 60.0
#: job states in which a node has started a job and not finished it: its future is running
STARTED = ACTIVE - {JobState.PENDING}


@dataclass(frozen=True)
class Options:
    queue: str = "test"
    walltime: float = 300.0  # seconds
    requirements: str = ""  # normalised pip requirement lines; "" = none
    inputs: tuple[str, ...] = ()  # dataset URIs staged into the working directory
    outputs: tuple[str, ...] = ()  # dataset URIs the task's files are uploaded to
    #: map items packed into one task by the executor: each one's walltime (``walltime``
    #: is their sum), so that a node whose cap is lower than the sum may still run it
    walltime_each: float | None = None

    @classmethod
    def make(cls, queue: str, walltime: float | _dt.timedelta, requirements=None) -> Options:
        return cls(
            config.normalize_queue(queue), config.walltime_seconds(walltime),
            _requirements.normalize(requirements),
        )

    def updated(
        self, queue: str | None, walltime: float | _dt.timedelta | None, requirements=None,
        inputs=None, outputs=None,
    ) -> Options:
        opts = self
        if requirements is not None:
            opts = replace(opts, requirements=_requirements.normalize(requirements))
        if queue is not None:
            opts = replace(opts, queue=config.normalize_queue(queue))
        if walltime is not None:
            opts = replace(opts, walltime=config.walltime_seconds(walltime))
        if inputs is not None or outputs is not None:
            ins, outs = staging.declared(
                opts.inputs if inputs is None else inputs,
                opts.outputs if outputs is None else outputs,
            )
            opts = replace(opts, inputs=ins, outputs=outs)
        return opts


def _pool_sizes(max_workers: Any, max_tasks_per_child: Any) -> tuple[int, int | None]:
    """A KottaExecutor's ``max_workers`` (None: the CPU count) and ``max_tasks_per_child``,
    checked as ProcessPoolExecutor checks them (also by ``connect()``, at once)."""
    if max_workers is None:
        max_workers = config.cpu_count()
    else:
        # an int, or what stands for one (numpy's); a float (os.cpu_count() / 2, say)
        # is a TypeError here, as for ProcessPoolExecutor, not a node that cannot start
        # (--workers 2.0) and an executor broken after six tries
        max_workers = operator.index(max_workers)
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
    if max_tasks_per_child is not None:  # (ProcessPoolExecutor's checks and messages)
        if not isinstance(max_tasks_per_child, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
        # (True: 1, as JSON; and at most 2**63 - 1, as JSON readers take a longer
        # integer for a float: a limit never reached all the same)
        max_tasks_per_child = min(int(max_tasks_per_child), 2**63 - 1)
    return max_workers, max_tasks_per_child


def _check_credentials(credentials: Any) -> None:
    """A KottaExecutor's ``credentials``: a type it can use (also by ``connect()``, at once)."""
    if credentials is not None and not isinstance(credentials, (Credentials, str, os.PathLike)):
        # (Path's own error, "expected str, bytes or os.PathLike object", named nothing)
        raise TypeError(f"credentials must be a token file's path or Credentials, not "
                        f"{type(credentials).__name__} {credentials!r}")


def _check_owner(owner: Any) -> None:
    """A KottaExecutor's ``owner``: None, or a user name (also by ``connect()``, at once).
    Whether it is the token's user is known only once the credentials are loaded; a value
    no user can have (42, "") was refused there as "cannot submit as 42", a check of the
    token rather than of the value, and at connect() not at all (at the first call)."""
    if owner is None:
        return
    if not isinstance(owner, str):
        raise TypeError(f"owner must be a user name (a string), not "
                        f"{type(owner).__name__} {owner!r}")
    try:
        _tokens.check_user(owner)
    except ConfigurationError as exc:
        raise ConfigurationError(f"owner {exc}") from None


def _check_init_size(init: bytes, limit: int) -> None:
    """A KottaExecutor's pickled initializer and initargs: within what a task message
    carries (``limit``, the enclave's inline_limit; also by ``connect()``, at once)."""
    if len(init) > limit:
        raise ValueError(
            f"the initializer and its initargs pickle to {len(init):,} bytes, over "
            f"the {limit:,} a task message carries: load big data "
            "inside the initializer instead (say, from a dataset)"
        )


def _start_node_mode(start_node: Any) -> str | bool:
    """A KottaExecutor's ``start_node``: ``"auto"``, True, or False (``"never"`` and None
    too).  Anything else was taken as True: "no", "false" (a setting read as a string) or
    "Never" started a local node, on a remote enclave too, the opposite of what was asked."""
    if isinstance(start_node, str):
        if start_node in ("auto", "never"):
            return start_node if start_node == "auto" else False
    elif start_node is None:
        return False
    else:
        try:  # True, False, 1, 0, numpy's bools
            if start_node in (True, False):
                return bool(start_node)
        except Exception:  # noqa: BLE001 - an object whose == raises (an array) is none
            pass
    raise ConfigurationError(
        f'start_node must be "auto", True or False ("never" and None: False), not {start_node!r}'
    )


class KottaExecutor(Executor):
    """Run calls on enclave nodes; a drop-in replacement for ``ProcessPoolExecutor``.

    ``max_workers``: worker processes of the local node this executor starts when no node
    serves its queue (default: the CPU count).  ``queue``: ``test`` or ``production``.
    ``walltime``: minutes (or a ``timedelta``) a task may run before it is killed.
    ``enclave``: where to run (a directory, ``embedded:///dir`` or ``aws://NAME``; default
    ``$KOTTA_ENCLAVE`` or ``$KOTTA_HOME``).  ``start_node``: ``"auto"`` starts a local node
    when none serves the queue of an embedded enclave, ``True`` does so for any enclave,
    ``False`` never does.  ``requirements``: pip requirement lines (a string, one per line,
    or a list) the node installs into a cached virtual environment for these tasks.
    ``credentials``: whose tasks these are: a token file (default ``$KOTTA_HOME/token``;
    see ``kotta register``) or a :class:`~kotta_executor.security.credentials.Credentials`.
    Every task is signed with its access token; ``owner``, if given, must be its user.
    ``initializer(*initargs)``, as for ``ProcessPoolExecutor``, runs in each worker process
    before the first of these tasks it runs there (once per process; again in the next
    task if it raised, that task failing with its exception).  ``mp_context`` is accepted
    and means nothing here: workers are always processes of their own.
    ``max_tasks_per_child``, as for ``ProcessPoolExecutor``: a worker process runs at most
    that many tasks (counting every task it ran, for any executor of the same owner)
    before the node replaces it with a fresh one.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        # positional, in ProcessPoolExecutor's order: code written for it passes them so
        mp_context: object = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        queue: str = "test",
        walltime: float | _dt.timedelta = 5,
        enclave: str | os.PathLike | Enclave | None = None,
        start_node: str | bool = "auto",
        owner: str | None = None,
        requirements: str | Iterable[str] | None = None,
        credentials: Credentials | str | os.PathLike | None = None,
        max_tasks_per_child: int | None = None,
    ):
        max_workers, max_tasks_per_child = _pool_sizes(max_workers, max_tasks_per_child)
        start_node = _start_node_mode(start_node)
        _check_credentials(credentials)
        _check_owner(owner)
        self._max_workers = max_workers
        self._options = Options.make(queue, walltime, requirements)
        del mp_context  # (ProcessPoolExecutor's: a node's workers are always processes of
        # their own, started afresh, as with "spawn")
        #: at most this many tasks run in a worker process that runs one of ours (the
        #: node retires it after its last, and starts another): the tasks' header says so
        self._max_tasks_per_child = max_tasks_per_child
        self._enclave = open_enclave(enclave)
        #: made here, not given: the executor closes it as it ends (_Leftovers.close)
        self._own_enclave = not isinstance(enclave, Enclave)
        try:
            #: the initializer and its arguments, pickled once: each task carries them (the
            #: ``init`` section), and a worker runs them once, before the first task it runs
            self._init = None if initializer is None else wire.dump_initializer(initializer, initargs)
            if self._init is not None:
                _check_init_size(self._init, self._enclave.inline_limit)
            self._start_node = start_node
            if isinstance(credentials, Credentials) and credentials.enclave.url != self._enclave.url:
                # signed with the other enclave's key, every task would fail at the nodes as
                # forged (and be audited as a forgery)
                raise AuthenticationError(
                    f"the credentials given are for the enclave {credentials.enclave.url}, not "
                    f"{self._enclave.url}: load those of this one "
                    f"(credentials.load(enclave), or pass its token file)")
            self._creds = (
                credentials if isinstance(credentials, Credentials)
                else _credentials.load(self._enclave, credentials)
            )
            # A disabled user's or a revoked token's client fails here, saying why, rather
            # than at each task (a node refuses those with TaskRejected, as it does the tasks
            # of a client whose user is disabled while it runs)
            self._creds.check("KottaExecutor")
            self.owner = self._creds.user
            if owner is not None and owner != self.owner:
                raise AuthenticationError(
                    f"this client holds the token of {self.owner!r}, so it cannot submit as "
                    f"{owner!r}: tasks run with their owner's rights (use that user's token)"
                )
            # Made inside a task (config.task_owner), the default token is the node's
            # ($KOTTA_HOME/token, or its OS user's): another user's task would submit jobs,
            # read data and be audited as the node's user, not as itself
            inside = config.task_owner()
            if inside and inside != self.owner:
                raise AuthenticationError(
                    f"this executor is made inside a task of {inside!r} but holds the token of "
                    f"{self.owner!r}: its tasks would run as {self.owner!r}, with that user's "
                    f"rights. Pass credentials= with {inside!r}'s own token"
                )
        except BaseException:
            # (an enclave it opened: its database connection and sockets were left to the
            # collector, which frees them only in a full collection, and each refused
            # executor, a wrong owner, a revoked token, held 2 or 3 descriptors meanwhile)
            if self._own_enclave:
                self._enclave.close()
            raise
        self.client_id = os.urandom(8).hex()
        # Job ids (_new_job_id): random bits without a syscall per submit (os.urandom
        # releases the GIL, and getting it back from a busy manager thread can take
        # milliseconds).
        self._ids = random.Random(os.urandom(32))
        #: the process that made it.  A child forked from it inherits its futures, its
        #: client id and the state of ``_ids`` (it would make the ids the parent makes
        #: next), but not its manager thread: there it takes no work (_check_open), and
        #: its shutdown and map iterators leave the parent's jobs alone
        self._pid = os.getpid()
        self._reply_queue = reply_queue(self.client_id)
        #: who this process is (the embedded enclave): a node drops replies to it once it
        #: is gone, rather than leave them on its reply queue for ever
        self._process = self._enclave.process_ident()

        self._futures: dict[str, KottaFuture] = {}
        self._attached: set[str] = set()
        self._outbox: deque[tuple[NewJob, KottaFuture]] = deque()
        self._skip: set[str] = set()  # outbox entries cancelled before they were sent
        #: ids a cancel waits (for the send lock) to cancel, and those of them the manager
        #: recorded cancelled in the transaction that sent them (see _send)
        self._cancel_wanted: set[str] = set()
        self._cancelled_in_send: set[str] = set()
        #: jobs handed to a node directly that no reply or record has confirmed yet
        self._handed: dict[str, tuple[NewJob, float]] = {}
        self._last_handed_look = 0.0
        #: the job last sent through the queue: while its future is unfinished, a lone
        #: submit goes through the queue too, behind it (see _send_now)
        self._last_queued: str | None = None
        self._kicked = False
        self._send_failed = _Retries()  # batches refused in a row (see _send_trouble)
        self._step_failed = _Retries()  # manager turns that raised (see _step_trouble)
        #: reentrant for its owner record (``_is_owned``), which it sets in the same C call
        #: that takes it: code that may run on a thread holding it, as a finalizer may,
        #: asks first and never takes it twice (_cancel_left)
        self._send_lock = threading.RLock()
        #: the tasks of map iterators closed on a thread that held the send lock, for the
        #: manager to cancel (_cancel_left)
        self._cancel_later: deque[list[KottaFuture]] = deque()
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        #: shutdown(cancel_futures=True) has begun: a submit accepted before it, whose job
        #: was not yet where the cancel looks, cancels its future itself (_submit)
        self._cancelling_all = False
        self._broken: BrokenEnclave | None = None
        self._wake = _Wake()  # the manager's wake-up pipe
        # tasks waiting for futures.  Woken through the pipe, not self._kick: the futures'
        # done-callbacks hold it, and a plain Future (a process pool's) keeps its
        # callbacks for ever, which kept a dropped executor, its manager and nodes, alive
        self._deps = dependencies.Dependencies(self._wake.kick)
        self._weak_self = weakref.ref(self)  # what its done futures hold (one for them all)
        self._manager: threading.Thread | None = None
        self._manager_done = threading.Event()  # set as its manager thread ends
        self._nodes: dict[str, subprocess.Popen] = {}
        self._left: _Leftovers | None = None  # what its manager closes, once it runs
        self._node_restarts = 0  # deaths in a row of the nodes it started
        self._node_started: dict[str, float] = {}  # queue -> when its node was started
        self._start_claims: dict[str, int] = {}  # queue -> lock fd, while its node starts
        self._queues_used: set[str] = set()
        self._last_reply = time.monotonic()
        self._last_reconcile = time.monotonic()
        self._reconcile_at = 0
        self._last_attach_poll = 0.0
        self._attach_at = 0  # where the next window of attached futures begins
        self._last_running_look = 0.0
        self._next_log_look = 0.0
        self._replies: deque | None = None  # filled by the reply poller, without doorbells
        self._inbox = None  # a socket on which nodes hand over replies (embedded)
        self._rang = False  # a node rang: replies wait on the reply queue
        self._last_queue_look = 0.0
        self._last_node_look = 0.0
        self._queues_looked = 0
        self._last_submit = 0.0
        self._unserved: dict[str, float] = {}  # queue -> when it was first seen unserved
        self._sweep_pending: dict[str, int] = {}  # pending jobs by queue, this sweep so far
        self._warned_unserved: set[str] = set()
        self._warned_python: set[str] = set()  # queues whose nodes run another Python
        self._listening = False  # the manager has bound its doorbell and inbox
        _live_executors.add(self)
        _wait_at_child_exit()

    # ------------------------------------------------------------------ Executor API

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> KottaFuture:
        """``fn(*args, **kwargs)`` on a node.  ``inputs=[...]`` and ``outputs=[...]`` of
        ``s3://`` URIs are staged (docs/security.md) and also passed on to ``fn`` when its
        signature takes them, as in Cloud Kotta's ``file_sum(inputs=[...])``."""
        return self._submit_call(fn, args, kwargs, self._options)

    def _submit_call(self, fn: Callable, args: tuple, kwargs: dict, opts: Options, *,
                     decorated: bool = False) -> KottaFuture:
        """One call's submit, its ``inputs=`` / ``outputs=`` taken into its options
        (``decorated``: a ``@kottajob`` function's call, for the note of a bad one)."""
        if "inputs" in kwargs or "outputs" in kwargs:
            opts, kwargs = staging.split_kwargs(fn, opts, kwargs, decorated=decorated)
        return self._submit(fn, [(args, kwargs)], opts)

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator:
        """As ``Executor.map``, with Python 3.14's ``buffersize`` on every version: the
        iterables are read lazily, and at most ``buffersize`` tasks (of ``chunksize`` items)
        are submitted ahead of the values taken."""
        return self._map(fn, iterables, timeout, chunksize, self._options, buffersize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut_down(wait, cancel_futures)

    def _shut_down(self, wait: bool, cancel_futures: bool, attached: bool = True) -> None:
        """``shutdown``; ``attached=False``: the cancel spares the jobs attached to."""
        if os.getpid() != self._pid:  # a forked child's copy (at its exit, say): what it
            return  # would stop or cancel is the parent's
        with self._shutdown_lock:
            self._shutdown = True
            # under the lock: a submit that got in first has started the manager already
            manager = self._manager
        if cancel_futures:
            self._cancelling_all = True
            self._cancel_all(attached)
        self._kick(force=True)
        if manager is None:
            self._close()
        elif wait and manager is not threading.current_thread():
            # its own signal first: on Python 3.11, a join() interrupted (Ctrl-C) marks
            # the thread stopped while it runs (bpo-45274), and a later join() returns at
            # once, the jobs still running
            self._manager_done.wait()
            manager.join()
            if self._own_enclave and self._enclave.local:
                # this thread's connection to it (its manager closed its own as it ended,
                # and the enclave's sockets), or its descriptors stayed open for as long
                # as the executor was referenced after its `with` block
                self._enclave.close()

    def terminate_workers(self) -> None:
        """As ``ProcessPoolExecutor.terminate_workers`` (Python 3.14): stop now.  The
        executor shuts down without waiting and cancels what no node has started, and each
        of its tasks that runs is killed (its process tree, as by ``future.kill()``: its
        future raises :class:`TaskKilled`).  A node's workers serve every executor of
        their owner: only those running this executor's tasks are ended, and the node
        replaces them.  Jobs this executor attached to (``attach``) run on."""
        self._shut_down(False, True, attached=False)
        if os.getpid() != self._pid:  # a forked child's copy: the tasks are the parent's
            return
        # after it, when no submit is taken any more: one accepted as it began is here
        with self._shutdown_lock:
            own = self._futures_now(attached=False)
        for f in own:
            try:
                f.kill()
            except Exception:
                if not f.done():  # (done meanwhile, and the manager closed the enclave: fine)
                    raise

    def kill_workers(self) -> None:
        """As ``ProcessPoolExecutor.kill_workers`` (Python 3.14): here the same as
        :meth:`terminate_workers`.  A kill sends the task's process tree SIGTERM and, to
        what outlives half a second of grace, SIGKILL."""
        self.terminate_workers()

    def __reduce__(self):
        raise _not_sent("a KottaExecutor")

    def with_options(
        self, *, queue: str | None = None, walltime: float | _dt.timedelta | None = None,
        requirements: str | Iterable[str] | None = None,
        inputs: Iterable[str] | None = None, outputs: Iterable[str] | None = None,
    ) -> OptionsView:
        """The same executor with other per-call options: ``ex.with_options(walltime=30).submit(...)``.
        ``requirements=""`` drops the executor's requirements; ``inputs`` / ``outputs`` are
        dataset URIs staged for every task submitted through the view."""
        return OptionsView(
            self, self._options.updated(queue, walltime, requirements, inputs, outputs)
        )

    def attach(self, job_id: str) -> KottaFuture:
        """A future for a job submitted earlier, by this or any other client (a restarted
        kernel, another machine sharing the enclave)."""
        if not isinstance(job_id, str):  # (a programming error, not an unknown job)
            raise TypeError(f"a job id is a string, not {type(job_id).__name__} {job_id!r}")
        if not wire.is_job_id(job_id):
            raise UnknownJob(f"{job_id!r} is not a job id")
        while True:
            self._check_open()
            # read, and checked, before the lock, which is held for no I/O (other threads'
            # submits wait on it)
            job = None if job_id in self._futures else self._attachable(job_id)
            with self._shutdown_lock:
                self._check_open()
                f = self._futures.get(job_id)
                if f is not None:  # (a map's holds its calls' outcomes: a view gives values)
                    if f._batch is not True:
                        return f
                    if f._view is None:  # one a job, as for any job attached to (each
                        f._view = _MapJobView(f)  # made another, held by f till it ended)
                    return f._view
                if job is None:  # ours when looked, ended since: look again
                    continue
                f = KottaFuture(job_id, self)
                if job.n != 1:  # a task of a map: the values of its calls, in order
                    f._batch = "values"
                self._futures[job_id] = f
                self._attached.add(job_id)
                if not job.state.final:  # a node is to run it: with start_node, one is
                    self._queues_used.add(job.queue)  # started if none serves its queue
                if job.state in STARTED:  # running() says what the record just said
                    f._mark_running()
                self._ensure_manager()  # under the lock, as in _submit
            self._kick(force=True)
            return f

    def _attachable(self, job_id: str) -> JobRecord:
        """The record of a job this client may attach to (UnknownJob, AccessDenied)."""
        self._creds.check("KottaExecutor.attach")  # first: a refused token learns nothing
        job = self._enclave.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id} in the enclave {self._enclave.url} (never"
                             " recorded there, or removed by kotta prune)")
        check_job_access(self._enclave, self._creds, job, "attach to")
        return job

    @property
    def enclave(self) -> Enclave:
        return self._enclave

    # ------------------------------------------------------------------ submission

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"this KottaExecutor was made by process {self._pid}, which forked this "
                "one: it cannot be used here (make a new KottaExecutor in the child)"
            )
        if self._broken is not None:
            raise BrokenEnclave(str(self._broken)) from self._broken.__cause__
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _submit(self, fn: Callable, calls: list, opts: Options, *, batch: bool = False) -> KottaFuture:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        decorator = sys.modules.get("kotta_executor.decorator")  # (imported if fn is one)
        if decorator is not None and isinstance(fn, decorator._Decorated):
            fn = fn.kotta_task()  # its body: the decorated function would submit, or in a
            # task (block=False) return a future, which cannot be sent back
        self._check_open()  # early, to spare the pickling; it counts only under the lock
        config.check_walltime(opts.queue, opts.walltime)  # before anything is sent
        deps = dependencies.find(calls)
        job_id = self._new_job_id()
        if deps:  # pickled once its dependencies are done; what can be now, is: a call
            # that cannot be pickled fails here, whatever it waits for
            wire.dump_call(fn, dependencies.without_futures(calls))
        job = None if deps else self._new_job(job_id, fn, calls, opts)
        f = KottaFuture(job_id, self)
        if batch:
            f._batch = True
        # Pickled first, registered under the lock after: a shutdown that came meanwhile
        # refuses this submit; one that comes later finds the future, and the manager
        # running, and waits for it (see _run_manager).  The lock is held for no I/O.
        try:
            with self._shutdown_lock:
                accepted = self._broken is None and not self._shutdown
                if accepted:
                    self._futures[job_id] = f
                    if self._manager is None:  # (the first submit: Thread.start waits for
                        self._ensure_manager()  # the thread, and Ctrl-C may stop it there)
        except BaseException:
            if self._futures.get(job_id) is f:  # registered: as an interrupted send below
                self._interrupted(f, job)
            raise
        if not accepted:
            if job is not None:
                self._drop_blobs(job)
            self._check_open()  # raises: neither flag is ever reset
        try:
            if deps:  # sent by the manager once they are done (no job row until then)
                self._deps.add(f, fn, calls, opts, deps)
            elif batch or not self._send_now(job):  # a map's tasks go together, in batches
                self._outbox.append((job, f))
                self._kick()
        except BaseException:
            self._interrupted(f, job)
            raise
        if self._cancelling_all:  # accepted just before it: it was not there to cancel
            self._cancel_late(f)
        return f

    def _new_job_id(self) -> str:
        """32 hex digits: the time in milliseconds (48 bits), then 80 random bits.  Ids in
        the order they were made go into the job table's index at its end: random ones
        went anywhere in it, each submit's insert writing a page of its own, so that
        recording a job cost twice as much in a new enclave and more as the table grew
        (5 us a job, against 11 us in an empty table and 20 to 34 us once it held
        tens of thousands of jobs: the enclave keeps every job's record).  Eighty random
        bits keep ids unguessable and unique, even made in the same millisecond, by
        clients whose clocks disagree."""
        return f"{time.time_ns() // 1_000_000 & _MS_MASK:012x}{self._ids.getrandbits(80):020x}"

    def _interrupted(self, f: KottaFuture, job: NewJob | None) -> None:
        """A submit interrupted (a KeyboardInterrupt: Ctrl-C in a notebook) between the
        registration of its future and the send of its job: unsent, the future would stay
        pending for ever, no cancel finding its job, and ``shutdown(wait=True)`` would wait
        for it for ever.  Its job goes to the outbox, for the manager to send, unless it
        is there: a second send of one that went out already is harmless (its record is
        kept, and a node runs it once).  One that waits for futures (``job`` None) may be
        half set up (callbacks on some of them only): it is cancelled, unless the manager
        has sent it already and it runs."""
        if job is None:
            if self._cancel_jobs([f.job_id]) or self._enclave.jobs.get(f.job_id) is None:
                self._futures.pop(f.job_id, None)  # (never waiting: no cancel found it)
                f._cancel_and_notify()
        elif not any(queued is job for queued, _ in list(self._outbox)):
            self._outbox.append((job, f))
            with self._shutdown_lock:  # (interrupted before the first submit's manager
                if self._manager is None and not self._shutdown:  # was made: none sends it)
                    self._ensure_manager()
            self._kick(force=True)

    def _cancel_late(self, f: KottaFuture) -> None:
        try:
            f.cancel()
        except Exception:  # noqa: BLE001 - the shutdown's own cancel has said so, loudly
            log.warning("job %s, submitted as the executor shut down, could not be "
                        "cancelled: it runs", f.job_id, exc_info=True)

    def _drop_blobs(self, job: NewJob, what: str = "job") -> None:
        """Remove the blobs of a job that was pickled but never sent (refused as the
        executor shut down, or cancelled: in the outbox, being pickled, handed off)."""
        refs = wire.peek_header(job.body).get("refs")
        if refs:
            self._delete_blobs(list(refs.values()), f"{what} {job.job_id}")

    def _delete_blobs(self, keys: list[str], of: str) -> None:
        """Delete a never-sent job's blobs, saying so if that fails (what the caller
        reports matters more: the job's own error, its cancel; and the nodes' sweep spares
        the blobs of a job that has a record)."""
        try:
            self._enclave.blobs.delete(keys)
        except Exception:  # noqa: BLE001 - logged; never instead of the caller's outcome
            log.warning("deleting the blobs of %s failed", of, exc_info=True)

    def _send_now(self, job: NewJob) -> bool:
        """Record a lone submit's job from the caller's thread, sparing it a hand-over to
        the manager thread; submits that come close together go through the outbox, in
        batches.  False: the outbox takes it.  "Close together" counts from the end of
        the previous send: on AWS a send takes milliseconds, and a loop of submits each
        sent alone would make two calls a task."""
        now = time.monotonic()
        last, self._last_submit = self._last_submit, now
        if now - last < SEND_NOW_GAP or self._outbox or not self._listening or (
            not self._send_lock.acquire(False)
        ):
            return False
        try:
            if self._outbox:
                return False
            try:
                # A cancel of it from another thread (shutdown(cancel_futures=True) as this
                # submit registered it) waits for the send lock meanwhile, and then raced
                # the node for the job: it is recorded cancelled in this send's own
                # transaction, as the manager's sends do (_send); not handed off then
                # Not handed off while a task this client sent through the queue is
                # unfinished (it may be there still, not received): recorded here, behind
                # it.  Handed to a node, which adopts its inbox before it receives from the
                # queue, a lone submit took the node's room and ran before the task
                # submitted just before it (the queue is first in, first out; the inbox
                # went past it)
                behind = self._last_queued is not None and self._last_queued in self._futures
                handed = not behind and not (
                    self._cancel_wanted and job.job_id in self._cancel_wanted) and (
                    self._enclave.hand_off(job.queue, job.body))  # the node records it
                if handed:
                    self._handed[job.job_id] = (job, now)
                else:
                    with self._enclave.atomic(wait=SEND_NOW_LOCK_WAIT):
                        self._enclave.jobs.create([job])
                        if self._cancel_wanted and job.job_id in self._cancel_wanted:
                            self._cancelled_in_send.update(self._enclave.jobs.transition(
                                [job.job_id], JobState.CANCELLED, from_states=CANCELLABLE,
                                reason="cancelled by the client",
                            ))
                    self._last_queued = job.job_id
            except Exception:  # noqa: BLE001 - the manager retries it, and fails loudly
                log.debug("sending job %s from the caller's thread failed", job.job_id,
                          exc_info=True)
                return False
        finally:
            self._last_submit = time.monotonic()
            self._send_lock.release()
        if not handed:
            self._enclave.ring_nodes(job.queue)
        if job.queue not in self._queues_used:  # the manager may need to start a node
            self._queues_used.add(job.queue)
            self._kick(force=True)
        return True

    def _task_header(self, job_id: str, fn: Callable, n: int, opts: Options) -> dict[str, Any]:
        header = {
            "kind": "task",
            "job_id": job_id,
            "owner": self.owner,
            "client": self.client_id,
            "queue": opts.queue,
            "walltime": opts.walltime,
            "created": time.time(),
            "fn": wire.fn_name(fn),
            "n": n,
            "python": wire.PYTHON,  # what pickled it (code pickled by value loads only there)
        }
        if self._process is not None:
            header["client_process"] = self._process
        if self._max_tasks_per_child is not None:
            header["max_tasks_per_child"] = self._max_tasks_per_child
        if opts.walltime_each is not None:
            header["walltime_each"] = opts.walltime_each
        if opts.requirements:  # read by the node, without unpickling anything
            header["requirements"] = opts.requirements
        if opts.inputs:
            header["inputs"] = list(opts.inputs)
        if opts.outputs:
            header["outputs"] = list(opts.outputs)
        return header

    def _new_job(self, job_id: str, fn: Callable, calls: list, opts: Options) -> NewJob:
        """Pickle a call into a job (raises SerializationError); big sections go to blobs."""
        sections = wire.dump_call(fn, calls)
        header = self._task_header(job_id, fn, len(calls), opts)
        written: list[str] = []
        try:
            for section, data in sections.items():
                if len(data) > self._enclave.inline_limit:  # too big for a message: a blob
                    key = f"{section}-{job_id}"
                    self._enclave.blobs.put(key, data)
                    written.append(key)
                    header.setdefault("refs", {})[section] = key
                    header.setdefault("digests", {})[section] = wire.digest(data)
                    sections[section] = b""
            if self._init is not None:  # (small: checked when the executor was made)
                sections["init"] = self._init
            body = self._creds.access().sign(header, sections)
            if wire.header_size(body) > wire.MAX_HEADER:
                raise _header_too_big(header, wire.header_size(body))
        except BaseException:
            # (a dependent task's job is then recorded failed, and the nodes' sweep
            # leaves the blobs of a recorded job alone)
            if written:
                self._delete_blobs(written, f"job {job_id}")
            raise
        return NewJob(
            job_id, self.owner, self.client_id, opts.queue, header["fn"], opts.walltime, body,
            len(calls),
        )

    def _unsent_record(self, w: dependencies.Waiting) -> NewJob:
        """The job of a waiting task, to record it cancelled or failed: without a task
        body, since its call was never pickled, and it is recorded with
        ``create(enqueue=False)``: a task message for it would only make a node refuse
        an unsigned task (and audit it as forged)."""
        return NewJob(
            w.job_id, self.owner, self.client_id, w.opts.queue, wire.fn_name(w.fn),
            w.opts.walltime, b"", len(w.calls),
        )

    def _map(self, fn, iterables, timeout, chunksize, opts, buffersize=None) -> Iterator:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        try:  # a count of items, as ProcessPoolExecutor's islice takes it (numpy's too): a
            chunksize = operator.index(chunksize)  # float is its ValueError, 1.0 as well
        except TypeError:
            raise ValueError(f"chunksize must be an integer, not {chunksize!r}") from None
        end_time = None if timeout is None else timeout + time.monotonic()
        if buffersize is not None:  # (Executor.map's checks and messages, Python 3.14)
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
            return self._map_buffered(fn, iterables, end_time, chunksize, opts, buffersize)
        items = list(zip(*iterables, strict=False))
        size = chunksize
        # packed by us: together, a task's items get the walltime each would have had
        # alone.  Not items that wait for futures: a failed one would fail its task's
        # other items with it
        # Nor with max_tasks_per_child: ProcessPoolExecutor counts each item (chunksize=1)
        if chunksize == 1 and self._max_tasks_per_child is None and not any(
            isinstance(a, Future) for args in items for a in args
        ):
            size = self._auto_chunk(len(items), opts)
            if size > 1:
                opts = replace(opts, walltime=size * opts.walltime, walltime_each=opts.walltime)
        fs: list[KottaFuture] = []
        i = 0
        try:
            for i in range(0, len(items), size):
                if opts.walltime_each is not None and len(items) - i < size:
                    # the last task, of fewer items: their walltimes only (with the
                    # others', an item ran on past its own walltime, up to size times it)
                    opts = replace(opts, walltime=(len(items) - i) * opts.walltime_each)
                fs.append(self._submit(fn, [(args, {}) for args in items[i : i + size]], opts,
                                       batch=True))
        except BaseException as exc:  # an item that cannot be pickled (SerializationError),
            self._cancel_futures(fs)  # say: map() raises; the tasks of earlier items do not run
            if isinstance(exc, SerializationError):
                _name_item(exc, items[i : i + size], i)
            raise

        fs.reverse()
        return self._map_values(deque(fs), end_time)

    def _map_buffered(self, fn, iterables, end_time, chunksize, opts, buffersize) -> Iterator:
        """map with a ``buffersize``: tasks of exactly ``chunksize`` items (none packed by
        us: how many items there are is not known), read from the iterables as they are
        submitted; ``buffersize`` of them at first, then one more as each one's values are
        taken, as Executor.map does (Python 3.14)."""
        rows = zip(*iterables, strict=False)

        taken = 0  # items read so far

        def next_task() -> KottaFuture | None:
            nonlocal taken
            chunk = list(itertools.islice(rows, chunksize))
            start, taken = taken, taken + len(chunk)
            try:
                return self._submit(fn, [(args, {}) for args in chunk], opts, batch=True) \
                    if chunk else None
            except SerializationError as exc:
                _name_item(exc, chunk, start)
                raise

        fs: deque[KottaFuture] = deque()
        try:
            while len(fs) < buffersize and (f := next_task()) is not None:
                fs.appendleft(f)
        except BaseException:  # an item that cannot be pickled: map() raises, and the
            self._cancel_futures(fs)  # tasks of earlier items do not run
            raise
        return self._map_values(fs, end_time, next_task)

    def _map_values(self, fs: deque[KottaFuture], end_time: float | None,
                    refill: Callable[[], KottaFuture | None] | None = None) -> Iterator:
        """The values of a map's tasks ``fs`` (the oldest last), in order; ``refill``: a
        buffered map's next task, submitted before each task's values are waited for."""
        try:
            while fs:
                if refill is not None and (f := refill()) is not None:
                    fs.appendleft(f)
                if end_time is None:
                    outcomes = fs[-1].result()
                else:
                    outcomes = fs[-1].result(end_time - time.monotonic())
                fs.pop()  # (and with it the future, which holds its task's values)
                # No reference to a value once it is yielded, as ProcessPoolExecutor
                # (bpo-14406): popped from a copy, whose future is gone
                outcomes = outcomes[::-1]
                while outcomes:
                    if not outcomes[-1][0]:
                        raise outcomes.pop()[1]
                    yield outcomes.pop()[1]
        finally:  # (the items not yet yielded: their tasks, in one cancel)
            self._cancel_left(list(fs))

    def _cancel_left(self, fs: list[KottaFuture]) -> None:
        """Cancel the tasks of the items a map's iterator did not yield, as it is closed.
        The garbage collector closes an iterator abandoned in a reference cycle on
        whichever thread it runs, which may hold the send lock (the manager sending a
        batch; a caller in submit or cancel): taking it again there would deadlock that
        thread.  Then the manager cancels them, at its next turn.  So too on a thread that
        makes a future's condition (its first use), under a lock the cancel would take again
        (the futures' done(), for those of them not used yet).  And so when the cancel
        cannot be made at once: another process holds the enclave's write lock (a client
        stopped by ^Z inside a transaction), or a send waits for it; the caller's close()
        or break waited for it, up to the lock timeout (60 s)."""
        if not fs or os.getpid() != self._pid:  # (in a forked child: the parent's tasks)
            return
        if not (self._send_lock._is_owned() or _CONDITION_LOCK._is_owned()):
            try:
                self._cancel_futures(fs, wait=SEND_NOW_LOCK_WAIT)
                return
            except Exception:  # noqa: BLE001 - nothing cancelled: the manager does it
                log.debug("cancelling the tasks of an abandoned map: left to the manager",
                          exc_info=True)
        self._cancel_later.append(list(fs))
        self._kick(force=True)

    def _cancel_left_later(self) -> None:
        """The manager's part of _cancel_left."""
        while self._cancel_later:
            fs = self._cancel_later.popleft()
            try:
                self._cancel_futures(fs)
            except Exception as exc:  # noqa: BLE001 - as for the iterator's close: best effort
                if not self._enclave.lasting(exc):
                    # a lock held past its timeout (a client stopped inside a transaction),
                    # a throttled call: made at a later turn (let go, the items ran, though
                    # their iterator had been closed)
                    self._cancel_later.appendleft(fs)
                    log.warning("cancelling the tasks of an abandoned map failed (%s: %s); "
                                "trying again", type(exc).__name__, exc)
                    return
                log.warning("cancelling the tasks of an abandoned map failed", exc_info=True)

    def _auto_chunk(self, n: int, opts: Options) -> int:
        """Pack tiny map items into tasks, keeping ~64 tasks per worker for balance, and
        no more than the walltimes of a task's items together fit under the queue's cap."""
        fit = int(config.walltime_cap(opts.queue) // opts.walltime)
        return max(1, min(256, n // (self._max_workers * 64), fit))

    def _kick(self, force: bool = False) -> None:
        if force or not self._kicked:
            self._kicked = True
            self._wake.kick()

    # ------------------------------------------------------------------ controls used by futures

    def _cancel_jobs(self, job_ids: list[str], wait: float | None = None) -> list[str]:
        """Cancel jobs no node has started; returns the ids that were cancelled.  ``wait``:
        the longest to wait for the send lock (a send under way, which may wait for the
        enclave itself) and for another process's write lock on the enclave, if not as
        long as they take; past it, TimeoutError or the enclave's locked error, and
        nothing is cancelled."""
        if os.getpid() != self._pid:
            # a forked child's copy: its send lock may be held for ever (forked as another
            # thread held it), and the jobs are the parent's, which submit there leaves alone
            raise RuntimeError(
                f"this KottaExecutor was made by process {self._pid}, which forked this "
                "one: its jobs cannot be cancelled or killed here (cancel them in the "
                "parent, or with `kotta cancel JOB`)"
            )
        wanted = set(job_ids)
        # said before the wait for the lock: a send under way records them cancelled (_send)
        self._cancel_wanted |= wanted
        # (not taken within ``wait``: not cancelled, and no send is to record them so)
        send_lock = self._send_lock if wait is None else _Within(
            self._send_lock, wait, lambda: self._cancel_wanted.difference_update(wanted))
        with send_lock:  # the manager takes from the outbox only under this lock
            self._cancel_wanted -= wanted  # (and sends under it: none is under way now)
            sent = wanted & self._cancelled_in_send
            self._cancelled_in_send -= sent
            # list() copies the deque in one step under the GIL, while submit() may append
            unsent = [(job, f) for job, f in list(self._outbox) if job.job_id in wanted]
            records = [job for job, _ in unsent]
            taken = [w for w in map(self._deps.take, job_ids) if w]
            records += [self._unsent_record(w) for w in taken]
            handed = [h[0] for h in map(self._handed.get, job_ids) if h is not None]
            try:
                done = self._record_cancelled(job_ids, records, handed, wait) + list(sent)
            except BaseException:  # the enclave failed: nothing is cancelled, all goes on
                for w in taken:
                    self._deps.put_back(w)
                raise
            for w in taken:  # (recorded cancelled: its future is, just below)
                w.forget()
            # the manager takes from the outbox only under the send lock, held here
            self._skip.update(job.job_id for job, _ in unsent)
            for job in handed:  # recorded now, by its node or just above
                self._handed.pop(job.job_id, None)
        for job_id in done:
            self._futures.pop(job_id, None)
        # never sent, now never to be: no node will delete their blobs; nor those of a
        # handed-off task, if its node dies before it reads its inbox (a node that reads it
        # finds its job cancelled, and deletes them too)
        ended = set(done)
        for job in [job for job, _ in unsent] + handed:
            if job.job_id in ended:  # (quietly: the job is cancelled, so is its future)
                self._drop_blobs(job, "cancelled job")
        return done

    def _cancel_jobs_told(self, job_ids: list[str]) -> list[str]:
        """_cancel_jobs for a caller's cancel() or kill(), which must say whether the job
        is cancelled, and so waits for the locks as long as they take (the lock timeout,
        60 s, at most); but not in silence, as it did: once it has waited CANCEL_QUIET_WAIT,
        a warning says what for (another process holding the enclave's write lock, named:
        a client stopped by ^Z inside a transaction...)."""
        try:
            return self._cancel_jobs(job_ids, CANCEL_QUIET_WAIT)
        except Exception as exc:  # nothing cancelled: tried again below, waiting
            if not (isinstance(exc, TimeoutError) or self._enclave.locked(exc)):
                raise
            log.warning("kotta: the cancel of job %s is waiting: %s", job_ids[0], exc)
        return self._cancel_jobs(job_ids)

    def _record_cancelled(self, job_ids: list[str], records: list[NewJob],
                          handed: list[NewJob], wait: float | None = None) -> list[str]:
        """Record the jobs cancelled, in one transaction (for _cancel_jobs, under the
        send lock); the ids cancelled."""
        with self._enclave.atomic(wait):
            if handed:  # one its node has not recorded yet never will: it finds it here
                known = self._enclave.jobs.get_many([job.job_id for job in handed])
                records = records + [job for job in handed if job.job_id not in known]
            record_ids = [job.job_id for job in records]
            done: list[str] = []
            if records:  # never sent: record them, already cancelled, so the table tells
                # without task messages: no node is to run them, and a waiting task's
                # record has no signed body a node would accept.  From pending only: a
                # job in the outbox may be recorded already, and running (its first send
                # raised after its record and task were written; create() keeps such a
                # record)
                self._enclave.jobs.create(records, enqueue=False)
                done = self._enclave.jobs.transition(
                    record_ids, JobState.CANCELLED, from_states=CANCELLABLE,
                    reason="cancelled by the client",
                )
            recorded = set(record_ids)  # once: thousands of waiting tasks may be cancelled
            rest = [j for j in job_ids if j not in recorded]
            if rest:
                done += self._enclave.jobs.transition(
                    rest, JobState.CANCELLED, from_states=CANCELLABLE,
                    reason="cancelled by the client",
                )
        return done

    def _cancel_all(self, attached: bool = True) -> None:
        self._cancel_futures(self._futures_now(attached))

    def _futures_now(self, attached: bool = True) -> list[KottaFuture]:
        """The executor's futures (``attached=False``: less those of jobs it attached to).
        (copy(): one step, as the manager drops done ones and other threads submit.  Not
        list(items()): the tuples it makes may start a garbage collection, whose finalizers
        run Python code, where another thread may change the dict: a shutdown(cancel_
        futures=True) beside threads that submitted raised "dictionary changed size during
        iteration".  A dict's copy makes no object an item.)"""
        futures = self._futures.copy()
        return [f for job_id, f in futures.items() if attached or job_id not in self._attached]

    def _cancel_futures(self, fs: Iterable[KottaFuture], wait: float | None = None) -> None:
        """Cancel the jobs of these futures that no node has started, together (``wait``:
        as for _cancel_jobs)."""
        pending = {f.job_id: f for f in fs if not f.done()}
        if pending:
            with _interrupts_held():  # (Ctrl-C: raised once the futures agree with the jobs)
                for jid in self._cancel_jobs(list(pending), wait):
                    # (one seen running too, its job back in pending: _cancel_and_notify)
                    pending[jid]._cancel_and_notify()

    def _kill_job(self, job_id: str) -> bool:
        ok = self._enclave.jobs.request_kill(job_id)  # (not once its task has run)
        job = self._enclave.jobs.get(job_id) if ok else None
        if job is not None and job.state == JobState.CANCELLED and job.reason == KILLED_PENDING:
            # pending again (its task handed back, never begun), so cancelled, not flagged
            # (JobTable.request_kill): its future is now, as a cancel's.  (By its reason:
            # cancelled too is a running job its node killed as soon as it was flagged,
            # whose future raises TaskKilled, from the node's reply)
            self._settle_cancelled(job_id)
        elif job is not None:
            self._enclave.ring_nodes(job.queue)
        return ok

    def _job_status(self, f: KottaFuture) -> str:
        job = self._enclave.jobs.get(f.job_id)
        if job is None:
            if f.done():  # failed before it was sent (a dependency failed), or its record
                return f._ended()  # was removed since (kotta prune): as the future ended
            return str(JobState.PENDING)
        if job.state in STARTED:  # so that running() agrees with what it just said
            f._mark_running()
        return str(job.state)

    # ------------------------------------------------------------------ the manager thread

    def _ensure_manager(self) -> None:
        with self._send_lock:
            if self._manager is None:
                wake = self._wake  # (the callback must not hold the executor)
                ref = weakref.ref(self, lambda _: wake.kick())  # collected: it shuts down
                self._manager = threading.Thread(
                    target=_run_manager, args=(ref, self._manager_done),
                    name=f"kotta-manager-{self.client_id}", daemon=True,
                )
                self._manager.start()

    def _start_manager(self, left: _Leftovers) -> None:
        """The manager's start: bind the channels replies come by (``left`` closes them at
        its end, whether or not the executor is still there then)."""
        self._left = left  # (a closing executor may leave it its node: _Leftovers.close)
        self._reply_queue = self._enclave.queue.open_reply(self.client_id)
        left.bell = self._enclave.doorbell(f"client-{self.client_id}")
        left.inbox = self._inbox = self._enclave.reply_inbox(self.client_id)
        self._listening = True  # rings and replies reach us from now on
        if left.bell is None:
            self._replies = deque()
            threading.Thread(
                target=_poll_replies, args=(weakref.ref(self), threading.current_thread()),
                name=f"kotta-replies-{self.client_id}", daemon=True,
            ).start()

    def _step(self, ready: list, bell) -> bool:
        """One turn of the manager, after a wait; False once it is done (shut down, and
        nothing left to do)."""
        self._woken(ready, bell)
        self._receive()  # first: a waiting caller's result is often what woke us
        self._start_dependents()
        self._send()
        self._checkpoint()
        self._cancel_left_later()
        self._ensure_nodes()
        self._confirm_handed()
        self._reconcile()
        # tasks waiting for dependencies are in _futures: shutdown waits for them
        if self._shutdown and self._idle():
            with self._shutdown_lock:  # _submit registers futures under it
                if self._idle():
                    return False
        return True

    def _checkpoint(self) -> None:
        """The enclave's log checkpointed once over its size limit, as nodes do: only they
        did, and a client whose queue no node served (none started yet, or failing) grew
        the embedded enclave's kotta.db-wal with every task, without bound.  Housekeeping:
        a failure waits for the next look."""
        now = time.monotonic()
        if now < self._next_log_look:
            return
        self._next_log_look = now + LOG_LOOK
        try:
            if self._enclave.checkpoint_due():  # (truncate: this client may write no more)
                self._enclave.checkpoint(truncate=True)
        except Exception:  # noqa: BLE001 - the writes that need it fail loudly enough
            log.debug("checkpointing the enclave's log failed", exc_info=True)

    def _step_trouble(self, exc: Exception) -> None:
        """A manager turn that raised (a throttled read of the job table, a timeout): the
        next turn, after a pause, does what this one did not (each step starts from what is
        recorded); but a fault that lasts, or has lasted SEND_RETRY_FOR seconds, breaks
        the executor (raised)."""
        if self._enclave.lasting(exc):
            raise exc
        if not self._step_failed.count:
            log.warning("kotta: the enclave failed (%s: %s); trying again",
                        type(exc).__name__, exc)
        self._step_failed.failed(exc)

    def _step_works(self) -> None:
        if self._step_failed.count and time.monotonic() - self._step_failed.last >= STEP_CLEAR:
            self._step_failed.count = 0
            log.warning("kotta: the enclave works again")

    def _idle(self) -> bool:
        return not self._futures and not self._outbox and not self._deps.ready

    def _wait_for(self, bell) -> tuple[list, float]:
        """What the manager waits on next, and for how long at most."""
        # idle too, no longer than a look: a lone submit is sent from the caller's thread
        # (_send_now) without waking us, and its running() waited for the end of a
        # longer sleep (up to 2 s after the job started)
        timeout = RUNNING_LOOK
        if self._attached:
            timeout = min(timeout, max(0.0, self._last_attach_poll + ATTACH_POLL
                                       - time.monotonic()))
        if self._outbox or self._deps.ready:
            timeout = 0
        if self._outbox and not self._deps.ready and self._send_failed.count:
            timeout = min(0.5, self._send_failed.pause_left())
        if self._step_failed.pause_left():  # (a turn raised: a pause first)
            timeout = self._step_failed.pause_left()
        fds = [self._wake.r] if bell is None else [self._wake.r, bell]
        if self._inbox is not None:
            fds.append(self._inbox)
        return fds, timeout

    def _woken(self, ready: list, bell) -> None:
        if self._wake.r in ready:
            self._wake.drain()
        if bell is not None and bell in ready:
            self._rang = True
            try:
                while bell.recv(64):
                    pass
            except BlockingIOError:
                pass

    def _send(self) -> None:
        self._kicked = False
        if self._send_failed.pause_left():
            return
        # Replies taken, and the nodes looked at, every thousand tasks or so: threads that
        # kept submitting kept the manager here, and no future resolved, no callback ran
        # and no node started until every one of them stopped.  (Not a turn ended there:
        # the rest of a turn, with a hundred thousand futures outstanding, slowed the
        # sending of a burst down, and its payloads waited in memory meanwhile.)
        left = SEND_BETWEEN_REPLIES
        while self._outbox:
            if left <= 0:
                left = SEND_BETWEEN_REPLIES
                self._receive()
                self._ensure_nodes()
            left -= 250
            with self._send_lock:
                batch = []
                # a few hundred at a time: a longer transaction keeps the node waiting
                # for the lock (in a burst of submits, that node is the busiest process)
                while self._outbox and len(batch) < 250:
                    item = self._outbox.popleft()
                    if self._skip and item[0].job_id in self._skip:  # cancelled, recorded
                        self._skip.discard(item[0].job_id)
                        continue
                    batch.append(item)
                if not batch:  # every one cancelled meanwhile
                    continue
                try:
                    # A cancel that came as this batch was taken waits for the send lock
                    # meanwhile, and then raced the nodes for a job it asked for before any
                    # could start it: it is recorded cancelled in the send's transaction
                    # (on AWS, just after it)
                    with self._enclave.atomic():
                        self._enclave.jobs.create([job for job, _ in batch])
                        # (lists of their own: not `self._cancel_wanted and ...`, which was
                        # that very set when empty, and a cancel that added to it meanwhile
                        # had all its jobs, running ones too, taken for cancelled here)
                        wanted = [job.job_id for job, _ in batch
                                  if job.job_id in self._cancel_wanted] if self._cancel_wanted else []
                        cancelled = self._enclave.jobs.transition(
                            wanted, JobState.CANCELLED, from_states=CANCELLABLE,
                            reason="cancelled by the client",
                        ) if wanted else []
                except Exception as exc:  # noqa: BLE001 - tried again, then it breaks us
                    if self._enclave.lasting(exc):
                        raise
                    self._outbox.extendleft(reversed(batch))  # first again, in order
                    self._send_trouble(exc)
                    return
                self._last_queued = batch[-1][0].job_id
                if cancelled:  # (for the waiting cancel: its futures, _cancel_jobs)
                    self._cancelled_in_send.update(cancelled)
                if self._send_failed.count:
                    log.warning("kotta: sending tasks works again")
                    self._send_failed.count = 0
            for q in {job.queue for job, _ in batch}:
                self._queues_used.add(q)
                self._enclave.ring_nodes(q)
            self._checkpoint()  # (threads that keep submitting keep the manager here)

    def _send_trouble(self, exc: Exception) -> None:
        """A batch the enclave refused: try again after a pause, or give up (raise) once
        sends have failed for SEND_RETRY_FOR seconds."""
        pause = self._send_failed.failed(exc)
        log.warning("kotta: sending %d tasks failed (%s: %s); trying again in %.1f s",
                    len(self._outbox), type(exc).__name__, exc, pause)

    def _confirm_handed(self) -> None:
        """Jobs handed to a node that has not recorded them within HAND_OFF_CONFIRM (it
        died, or stopped, with them unread): record and queue them from here.  In one
        transaction with the look, so that a node recording one meanwhile cannot make
        it two."""
        now = time.monotonic()
        if not self._handed or now - self._last_handed_look < HAND_OFF_CONFIRM / 2:
            return
        self._last_handed_look = now
        with self._send_lock:
            old = [job for job, at in list(self._handed.values()) if now - at >= HAND_OFF_CONFIRM]
            if not old:
                return
            with self._enclave.atomic():
                known = self._enclave.jobs.get_many([job.job_id for job in old])
                lost = [job for job in old if job.job_id not in known]
                self._enclave.jobs.create(lost)
            for job in old:
                self._handed.pop(job.job_id, None)
        if lost:
            log.warning("%d handed-off tasks were not taken by their node; queued them", len(lost))
        for q in {job.queue for job in lost}:
            self._enclave.ring_nodes(q)

    def _start_dependents(self) -> None:
        """Send the waiting tasks whose dependencies all succeeded, with their values; fail
        those with a failed dependency."""
        while self._deps.ready:
            w = self._deps.ready.popleft()
            if w.job_id not in self._deps.waiting:
                continue  # cancelled meanwhile, or already failed
            # (cancelled from now on, it is forgotten: fn, calls, opts, future None; what
            # fails for that is sent nowhere, as _fail_waiting and take() find it gone)
            f = w.future
            if w.failed is not None:
                self._fail_waiting(w, dependencies.failure(w.job_id, w.failed))
                continue
            try:
                job = self._new_job(w.job_id, w.fn, dependencies.resolve(w.calls), w.opts)
            except Exception as exc:  # noqa: BLE001 - SerializationError, a blob that could
                # not be written: fails this task only, as submit() raises it for a call
                self._fail_waiting(w, exc)  # sent at once
                continue
            with self._send_lock:  # atomically with respect to _cancel_jobs
                taken = self._deps.take(w.job_id) is not None
                if taken:
                    self._outbox.append((job, f))
                    w.forget()
            if not taken:  # cancelled as it was pickled: recorded cancelled (_cancel_jobs),
                # never sent, so no node deletes its blobs, nor the sweep (it is recorded)
                self._drop_blobs(job, "cancelled job")

    def _fail_waiting(self, w: dependencies.Waiting, exc: BaseException) -> None:
        with self._send_lock:
            if self._deps.take(w.job_id) is None:
                return  # cancelled meanwhile
            f = w.future
            # Never sent: recorded failed, with a result that says why, so that attach()
            # to it raises what this future raises (a final job needs a result for that).
            record = self._unsent_record(w)
            failed = Finished(
                record.job_id, JobState.FAILED, _failure_result(record.job_id, record.n, exc),
                wire.summary(exc),
            )
            try:
                with self._enclave.atomic():
                    self._enclave.jobs.create([record], enqueue=False)
                    self._enclave.jobs.finish([failed])
            except BaseException:  # waits again, to be failed at a later turn (a fault
                self._deps.put_back(w)  # that passes: _step_trouble), or by a shutdown
                raise
            w.forget()
        self._futures.pop(f.job_id, None)
        _fail_if_pending(f, exc)

    def _take_replies(self) -> list:
        if self._replies is None:
            out = []
            if self._inbox is not None:  # handed over by nodes directly
                out = [Message("", body) for body in self._enclave.read_inbox(self._inbox)]
            now = time.monotonic()
            # the reply queue when a node rang (it could not reach the inbox), and now
            # and then in case a ring was missed
            if self._inbox is None or self._rang or now - self._last_queue_look >= QUEUE_LOOK:
                self._last_queue_look = now
                got = self._enclave.queue.take(self._reply_queue, 1000)
                self._rang = len(got) == 1000  # more are waiting
                out += got
            return out
        out = []
        while self._replies and len(out) < 1000:
            out.append(self._replies.popleft())
        return out

    def _receive(self) -> None:
        while True:
            msgs = self._take_replies()
            if not msgs:
                return
            self._last_reply = time.monotonic()
            items: list[tuple[str, bytes]] = []
            for m in msgs:
                try:
                    items += wire.unpack_replies(m.body)
                except EnvelopeError:
                    log.warning("ignoring a malformed reply message for job %s", m.job_id)
            missing = [job_id for job_id, body in items if not body]
            records = self._enclave.jobs.get_many(missing, with_result=True) if missing else {}
            taken: set[str] = set()  # (a job twice in the replies: its record read once)
            for job_id, body in items:
                if body:
                    self._resolve(job_id, body)
                # (taken from the records: a result read goes as its future is settled, not
                # with the last of them, each big one held twice meanwhile, with its value)
                elif (job := records.pop(job_id, None)) is not None:
                    taken.add(job_id)
                    if job.state.final:
                        self._settle(job_id, job)
                elif job_id not in taken:
                    # a reply says the job was recorded and ended; with no record now, it
                    # was removed (kotta prune) while this client did not read (stopped,
                    # asleep): the reconcile would never find it
                    self._record_gone(job_id)
                # else: the reconcile step finds it in the job table later

    def _record_gone(self, job_id: str) -> None:
        """Fail the future of a job whose record, there once, is gone (``kotta prune``
        removed it): it waited for ever for a record to settle it."""
        self._handed.pop(job_id, None)
        self._attached.discard(job_id)
        f = self._futures.pop(job_id, None)
        if f is not None and not f.done():
            f.set_exception(UnknownJob(
                f"job {job_id} ended, but its record was removed from the enclave"
                f" {self._enclave.url} (kotta prune) before this client read its result"))

    def _reconcile(self) -> None:
        now = time.monotonic()
        ids: list[str] = []
        looks: list[str] = []
        if self._attached and now - self._last_attach_poll >= ATTACH_POLL:
            self._last_attach_poll = now
            if self._attach_at >= len(self._attached):
                self._attach_at = 0
            # (a set, read in one step under the GIL, as attach() may add to it)
            ids += itertools.islice(self._attached, self._attach_at,
                                    self._attach_at + ATTACH_WINDOW)
            self._attach_at += ATTACH_WINDOW
        attach_window = set(ids)
        if self._futures and now - self._last_running_look >= RUNNING_LOOK:
            # the oldest futures not known to run (nodes take jobs in order): running()
            # turns True within RUNNING_LOOK of a node's start of the job, as a process
            # pool's does when it hands the call to a worker.  Without results: a job
            # found ended is read again with its result, below
            self._last_running_look = now
            looks = self._oldest_not_running()
        window: list[str] = []
        sweep_done = False
        if self._futures and now - self._last_reconcile >= RECONCILE_AFTER:
            # A rolling window over the outstanding futures: catches a reply a node never
            # sent (it died after recording) and jobs cancelled or killed by someone else.
            self._last_reconcile = now
            if self._reconcile_at >= len(self._futures):
                self._reconcile_at = 0
            start = self._reconcile_at
            try:
                window = list(itertools.islice(self._futures, start, start + RECONCILE_WINDOW))
            except RuntimeError:  # another thread's submit() or cancel() changed the dict
                window = []  # meanwhile: this window is looked at next time
            else:
                self._reconcile_at = start + RECONCILE_WINDOW
                sweep_done = self._reconcile_at >= len(self._futures)
            ids += window
        if not self._futures:
            self._sweep_pending.clear()
            self._watch_unserved({}, now)
        if looks:
            taken = set(ids)
            for job_id, job in self._enclave.jobs.get_many(
                [j for j in looks if j not in taken]
            ).items():
                if job.state.final:
                    ids.append(job_id)
                elif job.state != JobState.PENDING and (f := self._futures.get(job_id)):
                    f._mark_running()
        if not ids:
            return
        in_window = set(window)
        settled = 0  # of the attached window
        records = self._enclave.jobs.get_many(ids, with_result=True)
        for job_id in attach_window - records.keys():  # (attach() saw its record)
            self._record_gone(job_id)
            settled += 1
        gone = [j for j in in_window - records.keys()  # (rare: a job not recorded yet)
                if (f := self._futures.get(j)) is not None and f.running()]
        if gone:
            # one seen running had a record: ended without a reply (its node died after
            # recording it, its reply expired while this client slept), then pruned.  (Not
            # one still to send: a cancel() while its send failed marks it running too)
            unsent = {job.job_id for job, _ in list(self._outbox)} | self._handed.copy().keys()
            for job_id in gone:
                if job_id not in unsent:
                    self._record_gone(job_id)
        for job_id in list(records):
            job = records.pop(job_id)  # (its result goes once settled: see _receive)
            if job.state.final:
                self._settle(job_id, job)
                settled += job_id in attach_window
            elif job.state == JobState.PENDING:
                if job_id in in_window:
                    self._sweep_pending[job.queue] = self._sweep_pending.get(job.queue, 0) + 1
            elif (f := self._futures.get(job_id)) is not None:
                f._mark_running()
        if settled:
            # Those settled left the set, and the ones after them moved up (a set keeps
            # the order of what stays): the next window begins that much earlier.
            self._attach_at = max(0, self._attach_at - settled)
            if 2 * settled >= len(attach_window):
                # Mostly ended (a session attaching to a finished sweep): the next window
                # is looked at once, not ATTACH_POLL later (20,000 jobs took 7 s to
                # settle).  Each such look settles half a window at least.
                self._last_attach_poll = now - ATTACH_POLL
        if sweep_done:  # every outstanding future looked at once since the last sweep
            pending, self._sweep_pending = self._sweep_pending, {}
            self._watch_unserved(pending, now)

    def _oldest_not_running(self) -> list[str]:
        """The ids of the oldest RUNNING_WINDOW futures not known to run, among the oldest
        RUNNING_SCAN (more than that many running at once: the later ones learn it from the
        reconcile), leaving out those still waiting for their dependencies; none this time
        if another thread's submit() or cancel() changed the futures meanwhile."""
        out: list[str] = []
        try:
            for job_id, f in itertools.islice(self._futures.items(), RUNNING_SCAN):
                if f._state == PENDING and job_id not in self._attached and (
                    job_id not in self._deps.waiting  # not sent yet: nothing to look at
                ):
                    out.append(job_id)
                    if len(out) >= RUNNING_WINDOW:
                        break
        except RuntimeError:  # dictionary changed size during iteration
            return []
        return out

    def _watch_unserved(self, pending: dict[str, int], now: float) -> None:
        """Warn when jobs of ours (``pending``: how many, by queue, over a sweep of the
        outstanding futures) have waited UNSERVED_WARN seconds on a queue with no live
        node: ``result()``, ``shutdown(wait=True)`` and interpreter exit wait for them,
        as long as it takes; and, once, when the nodes serving a queue all run another
        Python version than this client (its calls that hold code pickled by value fail
        there).  A diagnostic: a failed look at the nodes skips a round."""
        for q in [q for q in self._unserved if q not in pending]:
            del self._unserved[q]
            if q in self._warned_unserved:
                self._warned_unserved.discard(q)
                log.warning("kotta: no job of queue %r waits for a node any more", q)
        if not pending:
            return
        try:
            live = self._enclave.nodes.live()
        except Exception:  # noqa: BLE001 - never break the executor for a warning
            log.debug("could not look at the live nodes", exc_info=True)
            return
        served = {n.queue for n in live}
        for q, count in pending.items():
            if q in served:
                self._check_pythons(q, {n.python for n in live if n.queue == q})
                if q in self._warned_unserved:
                    log.warning("kotta: a node serves queue %r now; its jobs run", q)
                self._unserved.pop(q, None)
                self._warned_unserved.discard(q)
                continue
            since = self._unserved.setdefault(q, now)
            if now - since >= UNSERVED_WARN and q not in self._warned_unserved:
                self._warned_unserved.add(q)
                log.warning(
                    "kotta: %d job%s of queue %r %s waited %.0f s and no live node serves "
                    "that queue; they stay queued until one does (start one with "
                    "`%s`, or cancel them; results and shutdown(wait=True) "
                    "wait for them)",
                    count, "" if count == 1 else "s", q, "has" if count == 1 else "have",
                    now - since, self._node_command(q),
                )

    def _node_command(self, queue: str) -> str:
        """The command that starts a node of ``queue`` on this executor's enclave.  `kotta`
        alone opens the default one: another is named.  A remote enclave's nodes run where
        its admin puts them, and `kotta up` manages local processes only (docs/aws.md)."""
        url = shlex.quote(self._enclave.url)
        if not self._enclave.local:
            return f"kotta node --enclave {url} --queue {queue}"
        if default_url() == self._enclave.url:
            return f"kotta up --queue {queue}"
        return f"kotta up --enclave {url} --queue {queue}"

    def _check_pythons(self, queue: str, pythons: set[str | None]) -> None:
        """Warn, once a queue, when every node serving it runs another Python version."""
        if queue in self._warned_python or wire.PYTHON in pythons or None in pythons:
            return
        self._warned_python.add(queue)
        log.warning(
            "kotta: the nodes serving queue %r run Python %s, and this client runs Python %s: "
            "calls that hold code pickled by value (a function defined in a notebook or "
            "__main__, a lambda) fail there with PythonVersionMismatch; use the same Python "
            "version on both sides", queue, " and ".join(sorted(pythons)), wire.PYTHON,
        )

    def _cli_enclave(self) -> str:
        """`` --enclave URL`` for the commands a failed task's note shows, unless they find
        its job without it (the enclave they open by default): shown bare, they looked in
        that one, and said "no job"."""
        where = self.__dict__.get("_where")
        if where is None:
            url = self._enclave.url
            where = self._where = "" if url == default_url() else f" --enclave {shlex.quote(url)}"
        return where

    def _settle(self, job_id: str, job: JobRecord) -> None:
        """Settle the future of a final job from its record.  One without a result (a
        record written before results were kept for every failure, or by hand) fails
        with its recorded reason, rather than leaving its future pending forever."""
        if job.result:
            self._resolve(job_id, job.result)
        elif job.state == JobState.CANCELLED:
            self._settle_cancelled(job_id)
        else:
            reason = job.reason or f"the job {job.state} without recording a result"
            self._resolve(job_id, wire.failure(job_id, job.n, "JobFailed", reason))

    def _settle_cancelled(self, job_id: str) -> None:
        """A job someone else cancelled (``kotta cancel``, another client) before it ran."""
        self._handed.pop(job_id, None)
        f = self._futures.pop(job_id, None)
        self._attached.discard(job_id)
        if f is not None:  # (the enclave cancelled its job; seen running too: its job
            f._cancel_and_notify()  # was back in pending, KottaFuture._cancel_and_notify)

    def _resolve(self, job_id: str, body: bytes) -> None:
        self._handed.pop(job_id, None)
        f = self._futures.pop(job_id, None)
        self._attached.discard(job_id)
        if f is None or f.done():
            return
        try:
            self._fill(f, job_id, body)
        except BaseException as exc:  # noqa: BLE001 - a bad result fails its own future only,
            # not the manager thread (which no KeyboardInterrupt of the user's reaches)
            if not f.done():
                f.set_exception(exc)

    def _fill(self, f: KottaFuture, job_id: str, body: bytes) -> None:
        try:
            env = wire.decode(body)
        except EnvelopeError:
            if (version := wire.newer_version(body)) is None:
                raise
            # a node upgraded before this client: say whose result, and what to do
            raise EnvelopeError(
                f"the result of job {job_id} is of wire format version {version}, from a node"
                f" of a newer kotta-executor (this one reads"
                f" {', '.join(map(str, wire.READABLE_VERSIONS))}): upgrade this client's"
                f" kotta-executor to the nodes' version; `kotta status {job_id}"
                f"{self._cli_enclave()}` shows how the job ended") from None  # (the enclave
                # too, as in a failed task's note: shown bare, it looked in the default one)
        outcomes = wire.outcomes(env)
        f.stdout = env.text("stdout")
        f.stderr = env.text("stderr")
        f._usage = env.header.get("usage")
        after = _stderr_after(env)
        for i, (ok, value) in enumerate(outcomes):
            if not ok and isinstance(value, BaseException):
                _annotate(value, job_id, _stderr_until(env, after[i]) if i in after else f.stderr,
                          self._cli_enclave())
                if isinstance(value, TaskRejected):  # (a token revoked: the next submit
                    self._creds.look_again()  # takes up one registered since, if any)
        if f._batch == "values":
            failed = [value for ok, value in outcomes if not ok]
            if failed:
                f.set_exception(failed[0])
            else:
                f.set_result([value for _, value in outcomes])
        elif f._batch:
            f.set_result(outcomes)
        else:
            ok, value = outcomes[0]
            if ok:
                f.set_result(value)
            else:
                f.set_exception(value)

    def _ensure_nodes(self) -> None:
        if self._start_node in (False, "never", None):
            return
        if self._start_node == "auto" and not self._enclave.local:
            return  # a remote enclave has nodes of its own; start_node=True forces one here
        now = time.monotonic()  # a queue not looked at yet: now; else now and then
        if len(self._queues_used) == self._queues_looked and now - self._last_node_look < NODE_LOOK:
            return
        self._last_node_look, self._queues_looked = now, len(self._queues_used)
        for q in list(self._queues_used):
            proc = self._nodes.get(q)
            if proc is not None and proc.poll() is None:
                if q in self._start_claims and any(
                    n.managed_by == self.client_id for n in self._enclave.nodes.live(q)
                ):
                    self._release_start(q)  # it serves the queue: others see it now
                continue
            if self._idle():  # a node stopped (kotta down) starts again for work only
                self._release_start(q)  # (one that died starting: others may start one)
                continue
            if proc is not None:  # the node we started died
                # Deaths in a row count: one that served a while (or was stopped, exit 0:
                # kotta down, an admin) starts the count again.  A client that ignores
                # SIGCHLD (inherited: exec keeps it) reads 0 for every exit, a crash's
                # too: there an exit counts as a death, else a node that kept crashing
                # was started again for ever.
                served = time.monotonic() - self._node_started.get(q, 0.0) >= NODE_SERVED
                lost = _exit_statuses_lost()
                if (proc.returncode == 0 and not lost) or served:
                    self._node_restarts = 0
                self._node_restarts += 1
                log_path = self._node_log(q)
                code = ("unknown: this process ignores SIGCHLD" if lost
                        else proc.returncode)
                if self._node_restarts > MAX_NODE_RESTARTS:  # (why is in its log)
                    raise BrokenEnclave(
                        f"the local node for queue {q!r} died {self._node_restarts} times "
                        f"(last exit code {code}); its log, {log_path}, ends: "
                        f"{_last_line(log_path)}"
                    )
                log.warning("local node for queue %s exited with %s; restarting (its log: %s)",
                            q, code, log_path)
                _note_in_log(log_path, f"kotta client {self.client_id}: the node (pid "
                             f"{proc.pid}) exited with {code}; starting another")
                _forget_node(self._nodes.pop(q))
            elif self._enclave.nodes.live(q):
                continue
            if not self._claim_start(q):
                continue  # another client is starting a node for the queue
            if self._enclave.nodes.live(q):  # (one registered while we looked)
                self._release_start(q)
                continue
            self._nodes[q] = self._spawn_node(q)
            self._node_started[q] = time.monotonic()

    def _claim_start(self, queue: str) -> bool:
        """Whether this client may start a node for ``queue``: it holds the enclave's lock
        on starting one (a file lock, released when its node has registered, or when this
        process ends).  Two clients that found no node at once would otherwise each start
        one: twice the workers, and each node draining the other's tasks as it stops."""
        if queue in self._start_claims:
            return True
        home = getattr(self._enclave, "home", None)
        if home is None:  # no directory of the enclave's here: nothing to share a lock in
            return True
        try:
            fd = os.open(Path(home) / f"node-start-{queue}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._start_claims[queue] = fd
        _claim_fds.add(fd)
        return True

    def _release_start(self, queue: str) -> None:
        _release_claim(self._start_claims, queue)

    def _node_log(self, queue: str) -> Path:
        """Where the node this executor starts for ``queue`` writes its output."""
        home = Path(getattr(self._enclave, "home", config.kotta_home()))
        return home / "logs" / f"node-{self.client_id}-{queue}.log"

    def _spawn_node(self, queue: str) -> subprocess.Popen:
        path = _node_path()
        _check_no_other_node(path)
        env = dict(os.environ)
        if sys.flags.ignore_environment:
            # The client (python -E, -I) ignores the PYTHON* variables, and so does its
            # node: a PYTHONHOME of another Python (an HPC module's, left set) killed
            # it at its start, six times (ProcessPoolExecutor's spawned workers get -E)
            env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        if "KOTTA_HOME" in env:  # (relative, it is the client's first working directory's)
            env["KOTTA_HOME"] = str(config.kotta_home())
        if env.get("KOTTA_ENCLAVE"):  # (so is a relative one: its tasks inherit it)
            env["KOTTA_ENCLAVE"] = env_spec()
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if os.pathsep not in p)
        # A directory whose name holds os.pathsep (a run's time, runs/12:00:00) would be
        # split in two there, and its modules not found: its workers add such directories
        # from this variable (node.worker.EXTRA_PATH)
        if split := [p for p in path if os.pathsep in p]:
            env["KOTTA_EXTRA_PATH"] = json.dumps(split)
        # -P: the client's path, without its working directory put first, as -m would
        # (the node's workers are started so too, node.pool.spawn).  A script run from a
        # directory holding a queue.py or select.py of the user's (not on the client's
        # path) had its node import them in place of the standard library's, and die.
        # (and the client's interpreter options, -X utf8, -W error: its tasks run with them)
        cmd = [
            sys.executable, *config.interpreter_flags(), "-P", "-m", "node",
            "--enclave", self._enclave.url,
            "--queue", queue,
            "--workers", str(self._max_workers),
            "--parent-pid", str(os.getpid()),
            "--managed-by", self.client_id,
            "--prespawn", self.owner,
            # its client's local pool holds 4 tasks a worker, as nodes did: it stages the
            # inputs of those waiting behind running ones; the nodes of a shared pool
            # (kotta node, kotta up) hold only what they can start soon, for other nodes
            "--prefetch", "3",
        ]
        log_path = self._node_log(queue)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting a local node for queue %s (log: %s): %s", queue, log_path, " ".join(cmd))
        # Under _spawning, which a fork of this process waits for (os.register_at_fork): a
        # child forked meanwhile (a fork-based multiprocessing pool made as the executor
        # starts its node) inherited the write ends of Popen's exec-error pipe and of the
        # node's leave pipe, and for as long as it lived Popen waited for its pipe to
        # close, the manager thread with it: no future resolved
        with _spawning:
            # a pipe the node closes as it stops, or leaves the queue to finish the tasks of
            # other clients that used it (_Leftovers.close waits for that, not for its end)
            left, leave = os.pipe()
            cmd += ["--leave-fd", str(leave)]
            try:
                with open(log_path, "ab") as out:
                    try:
                        proc = subprocess.Popen(
                            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True, pass_fds=(leave,),
                        )
                    except OSError as exc:  # (the same environment again: it would fail again)
                        if exc.errno != errno.E2BIG:
                            raise
                        raise ConfigurationError(_environment_too_big(queue, env, exc)) from exc
            except BaseException:
                os.close(left)
                raise
            finally:
                os.close(leave)
        proc.left_fd = left  # (read by _Leftovers.close; a Popen takes attributes)
        proc.log_path = log_path  # (removed after a clean stop with nothing to say)
        return proc

    def _terminate_broken(self, exc: BaseException) -> None:
        broken = exc if isinstance(exc, BrokenEnclave) else BrokenEnclave(
            f"the enclave became unusable: {type(exc).__name__}: {exc}"
        )
        if broken is not exc:
            broken.__cause__ = exc
        with self._shutdown_lock:  # as shutdown(): a submit is refused, or its future failed
            self._broken = broken
            futures, self._futures = self._futures, {}
        with self._send_lock:
            self._outbox.clear()
            self._deps.clear()
        for f in futures.values():
            if not f.done():
                err = BrokenEnclave(str(broken))
                err.__cause__ = broken.__cause__ or exc
                _fail_if_pending(f, err)

    def _close(self) -> None:
        """Close what the executor holds (shutdown() of one whose manager never ran)."""
        _Leftovers(self._enclave, self.client_id, self._nodes, self._start_claims,
                   self._wake, self._own_enclave).close()
        _live_executors.discard(self)


class _Retries:
    """A fault met again and again (sends refused, manager turns that raised): how many
    times since it began, when it began and was last met, and the pause before the next
    try (0.1 s, doubling to SEND_BACKOFF_MAX)."""

    __slots__ = ("count", "since", "last", "retry_at")

    def __init__(self) -> None:
        self.count = 0  # 0: no fault now
        self.since = self.last = self.retry_at = 0.0

    def failed(self, exc: Exception) -> float:
        """Count one more failure; raise ``exc`` once the fault has lasted SEND_RETRY_FOR
        seconds, else return the pause before the next try."""
        now = time.monotonic()
        if not self.count:
            self.since = now
        self.count += 1
        self.last = now
        if now - self.since >= SEND_RETRY_FOR:
            raise exc
        pause = min(SEND_BACKOFF_MAX, 0.1 * 2 ** (self.count - 1))
        self.retry_at = now + pause
        return pause

    def pause_left(self) -> float:
        """Seconds still to wait before the next try (0: none, or no fault)."""
        return max(0.0, self.retry_at - time.monotonic()) if self.count else 0.0


class _Wake:
    """The manager's wake-up pipe.  ``kick()`` may come from any thread, and after the
    manager has ended: once closed, the pipe's numbers may be another file's, which a late
    kick must not write to."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        #: reentrant: a collection during close() may run the executor's weakref callback,
        #: a kick(), on the thread that holds it
        self._lock = threading.RLock()

    def kick(self) -> None:
        with self._lock:
            if self.w < 0:
                return  # closed: nothing is waiting to be woken
            try:
                os.write(self.w, b"!")
            except OSError:  # (BlockingIOError: full, a wake-up is pending anyway)
                pass

    def drain(self) -> None:
        os.read(self.r, 65536)

    def close(self) -> None:
        with self._lock:
            fds = (self.r, self.w)
            self.r = self.w = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:  # an executor dropped before its manager ever ran
        self.close()


class _Leftovers:
    """What a manager thread closes as it ends: the executor's reply channels, the nodes
    it started, its claims to start one, its wake-up pipe.  Held apart from the executor,
    so that the manager can close them after the executor is collected."""

    def __init__(self, enclave: Enclave, client_id: str, nodes: dict, start_claims: dict,
                 wake: _Wake, own_enclave: bool = False) -> None:
        self.enclave, self.client_id, self.wake = enclave, client_id, wake
        self.own_enclave = own_enclave  # (the executor opened it: not one given to it)
        self.nodes, self.start_claims = nodes, start_claims  # (the executor's, kept up to date)
        self.bell = None
        self.inbox = None
        self.closed = False  # (no node is handed to it from then: _hand_over)

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
        if self.inbox is not None:
            self.enclave.close_inbox(self.inbox)
        with _hand_over_lock:
            self.closed = True
            nodes = [p for q, p in self.nodes.items() if not self._hand_over(q, p)]
            self.nodes.clear()
        for proc in nodes:
            if proc.poll() is None:  # (SIGUSR1: an executor's stop, not `kotta down`'s
                # SIGTERM: other processes' tasks on the node finish, node.daemon._leave)
                proc.send_signal(signal.SIGUSR1 if getattr(proc, "left_fd", None) is not None
                                 else signal.SIGTERM)
        for proc in nodes:
            try:
                _wait_node(proc, timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in nodes:
            _drop_quiet_log(proc)
        for q in list(self.start_claims):
            _release_claim(self.start_claims, q)
        try:
            # (a moment's wait for the write lock at most: held by another process (a
            # client stopped by ^Z inside a transaction), shutdown() waited the whole lock
            # timeout for this; the nodes delete replies left over a day old anyway)
            with self.enclave.atomic(wait=CLOSE_LOCK_WAIT):
                self.enclave.queue.close_reply(self.client_id)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        if self.own_enclave and self.enclave.local:
            # The embedded enclave's doorbell and hand-off sockets: left open, they were a
            # ResourceWarning when the executor was collected, which fails a user's tests
            # run with `-W error`.  (A future's kill() afterwards makes one again; an AWS
            # enclave's close() would end the clients its futures still use.)
            self.enclave.close()
        self.wake.close()


    def _hand_over(self, queue: str, proc: subprocess.Popen) -> bool:
        """Leave the node of ``queue`` to another open executor of this process that uses
        the queue and has no node of its own there (it found this one serving, and its
        tasks may run on it now); it stops the node as it closes.  Stopped now, their
        running tasks were killed at the end of the node's drain, to run again
        elsewhere.  (Under _hand_over_lock.)"""
        if proc.poll() is not None:
            return False
        for other in list(_live_executors):
            left = other._left
            # (not a copy a forked child inherited: no manager runs it there, to stop it)
            if (other.client_id != self.client_id and left is not None and not left.closed
                    and other._pid == os.getpid() and other._enclave.url == self.enclave.url
                    and queue in other._queues_used and queue not in other._nodes):
                other._nodes[queue] = proc
                log.info("kotta client %s: its local node for queue %s goes on, for client %s",
                         self.client_id, queue, other.client_id)
                return True
        return False


#: held while a closing executor hands its node to another (_Leftovers.close)
_hand_over_lock = threading.Lock()


def _readable(fds: list, timeout: float) -> list:
    """Those of ``fds`` ready to read within ``timeout`` seconds (see _poll.ready)."""
    return ready(fds, [], timeout)[0]


def _wait_node(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for a node this process started, and was asked to stop, to end, or to leave
    its queue to finish the tasks other clients (other processes) run on it: those were
    killed at the end of its drain, to run again from the start on a node of their own
    (node.daemon.Node._leave), and a shutdown waited for them.  A node that left is
    reaped when it ends, by a thread of its own.  TimeoutExpired: neither came."""
    fd = getattr(proc, "left_fd", None)
    if fd is None:  # (a node started otherwise, or waited for already)
        proc.wait(timeout=timeout)
        return
    try:
        deadline = time.monotonic() + timeout
        while not _readable([fd], max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        proc.left_fd = None
        os.close(fd)
    try:  # the pipe closes as the node exits too: a moment before it can be reaped
        proc.wait(timeout=LEFT_GRACE)
    except subprocess.TimeoutExpired:  # it left: others' tasks run on there
        threading.Thread(target=proc.wait, name="kotta-node-reaper", daemon=True).start()


#: tasks the manager sends between two looks at replies (_send)
SEND_BETWEEN_REPLIES = 1000
#: seconds a node whose pipe closed is waited for before it is taken to have left
LEFT_GRACE = 2.0


#: a node log line that says nothing worth keeping (node.daemon's logging format)
_QUIET_LINE = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ \S+ (?:DEBUG|INFO) ")
#: a node log larger than this is kept, whatever it holds
QUIET_LOG_MAX = 64 * 1024


def _drop_quiet_log(proc: subprocess.Popen) -> None:
    """Remove the log of a node this executor started, once it has stopped cleanly (exit
    0) with nothing in it above INFO: every executor that starts a node has a log of its
    own (its client id in the name), and a notebook's day of them piled up in
    ``$KOTTA_HOME/logs`` for ever, a few hundred bytes each.  A log with a warning, an
    error or any other output (a traceback), or of a node that died and was started again
    (_note_in_log), is kept; so is one whose exit status this process cannot know."""
    path = getattr(proc, "log_path", None)
    if path is None or proc.returncode != 0 or _exit_statuses_lost():
        return
    try:
        if path.stat().st_size > QUIET_LOG_MAX:
            return
        lines = path.read_text(errors="replace").splitlines()
        if all(_QUIET_LINE.match(line) for line in lines):
            path.unlink()
    except OSError:  # gone already, or unreadable: left as it is
        pass


def _note_in_log(path: Path, text: str) -> None:
    """Add a warning of the client's to a node's log (best effort): the log then says why
    a node started again, and is kept (_drop_quiet_log)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{stamp},000 kotta.client WARNING {text}\n")
    except OSError:
        pass


def _forget_node(proc: subprocess.Popen) -> None:
    """Close what this process holds of a node that has ended (its pipe: _wait_node)."""
    fd, proc.left_fd = getattr(proc, "left_fd", None), None
    if fd is not None:
        os.close(fd)
os.register_at_fork(after_in_child=_hand_over_lock._at_fork_reinit)  # (as _CONDITION_LOCK)


def _node_path() -> list[str]:
    """The client's ``sys.path`` for a node it starts (its ``PYTHONPATH``): where the
    client's modules are, and those of functions pickled by reference.  Less the standard
    library: the node's interpreter has its own, and another interpreter that a task
    starts (a script job's ``python3``, of another version) crashed on this one's."""
    paths = sysconfig.get_paths()
    stdlib = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    # (and its zip, lib/python311.zip beside lib/python3.11, where there is one)
    zipped = f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    stdlib |= {os.path.join(os.path.dirname(d), zipped) for d in stdlib}
    packages = {os.path.realpath(paths[k]) for k in ("purelib", "platlib")}

    def under(path: str, roots: set[str]) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    out = []
    for p in [*sys.path, *(_module_roots() if "" in sys.path else ())]:
        try:
            path = os.path.abspath(p or os.curdir)
        except FileNotFoundError:  # "" (a notebook's, python -c's) in a directory since
            continue  # removed: nothing is imported from there, and the node inherits it
        real = os.path.realpath(path)
        # a zip archive too (a .zip, .egg or .pyz the client imports from): the modules in
        # it were "not found" on the node, as it was left off
        if (os.path.isdir(path) or os.path.isfile(path)) and (
                not under(real, stdlib) or under(real, packages)):
            out.append(path)
    return list(dict.fromkeys(out))


def _module_roots() -> list[str]:
    """The directories the client's imported top-level modules came from.  ``""`` on
    ``sys.path`` (a notebook's) is the working directory of each import: a notebook that
    imported ``mylib`` there, then changed to ``data/``, still has it, and its node,
    started in ``data/``, found "No module named 'mylib'".  (Last on the node's path:
    they only add modules that are found nowhere before.)"""
    out = []
    for name, module in list(sys.modules.items()):
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        if "." in name or name == "__main__" or not isinstance(origin, str) \
                or not os.path.isabs(origin):
            continue  # (built-in, frozen, a namespace package: nothing to find)
        root = os.path.dirname(origin)
        if os.path.basename(origin).startswith("__init__."):
            root = os.path.dirname(root)  # (a package: the directory that holds it)
        out.append(root)
    return out


def _environment_too_big(queue: str, env: dict[str, str], exc: OSError) -> str:
    """Why a node could not be started with ``env`` (E2BIG): the size of the environment,
    and its largest variables.  Tried again, it failed for a minute, then broke the
    executor with only "[Errno 7] Argument list too long"."""
    sizes = {k: len(os.fsencode(k)) + len(os.fsencode(v)) + 2 for k, v in env.items()}
    largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
    return (
        f"the local node for queue {queue!r} cannot be started: its environment (the "
        f"client's os.environ, and PYTHONPATH made of its sys.path) is "
        f"{sum(sizes.values()) / 1024:.1f} KiB, more than the system lets a new process have "
        f"({exc.strerror}: about 2 MiB in all, and 128 KiB a variable on Linux); its "
        f"largest variables: {', '.join(f'{k} ({sizes[k] / 1024:.1f} KiB)' for k in largest)}"
    )


def _exit_statuses_lost() -> bool:
    """Whether this process ignores SIGCHLD (a process that started it may leave it so, and
    exec keeps it): the kernel then reaps its children itself, and Popen reads 0 for each
    one's exit.  (The executor leaves the disposition as it is: it is the process's.)"""
    return signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN


def _check_no_other_node(path: list[str]) -> None:
    """Raise a ConfigurationError when ``path`` (a node's) finds a module ``node`` other
    than kotta's own package, the node's and its workers' code: a ``node.py`` of the
    user's beside the script (a graph's nodes).  ``python -m node`` ran that module in its
    place, which exited 0, and the executor started it again and again, for ever."""
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "node")
    spec = importlib.machinery.PathFinder.find_spec("node", path)
    if spec is None or spec.origin is None:
        return  # (none, or only directories of that name: kotta's is found elsewhere)
    if os.path.realpath(spec.origin) != os.path.realpath(os.path.join(ours, "__init__.py")):
        raise ConfigurationError(
            f"{spec.origin} has the name of kotta's own package, node, which a node and "
            "its workers run: rename it (or take its directory off sys.path), for it stands "
            "in for kotta's there"
        )


def _release_claim(claims: dict[str, int], queue: str) -> None:
    """Release a client's claim to start the node of ``queue`` (KottaExecutor._claim_start)."""
    fd = claims.pop(queue, None)
    if fd is not None:
        _claim_fds.discard(fd)
        os.close(fd)  # (closing releases the lock)


#: the descriptors of this process's claims to start a node (KottaExecutor._claim_start)
_claim_fds: set[int] = set()


#: held while this process starts a node, which a fork waits for (_spawn_node)
_spawning = threading.RLock()
#: a Ctrl-C that came as a fork waited for _spawning (_before_fork)
_fork_wait = threading.local()


def _before_fork() -> None:
    """Wait for the start of a node, if one is under way (_spawning).  A Ctrl-C meanwhile
    is raised once the fork is done (_after_fork_in_parent): raised here, Python ignored
    it, printing it, and the fork went on without the lock, whose release then failed in
    both processes."""
    interrupted = False
    while True:
        try:
            _spawning.acquire()
            break
        except KeyboardInterrupt:
            interrupted = True
    _fork_wait.interrupted = interrupted


def _after_fork_in_parent() -> None:
    _spawning.release()
    if getattr(_fork_wait, "interrupted", False):
        _fork_wait.interrupted = False
        # the Ctrl-C again, a SIGINT to the main thread (which a wait there hears), a moment
        # later, from another thread: sent at once, it came in this hook still, and was
        # ignored again
        later = threading.Timer(0.05, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGINT))
        later.daemon = True
        later.start()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_spawning.release)


def _drop_claims_in_child() -> None:
    """In a child forked from the client: close its copies of the claims' descriptors.  A
    flock belongs to the open file, which the child shares: a child forked while a node
    was starting (a multiprocessing pool made just after a submit) held the claim for as
    long as it lived, and no client of the enclave, its parent included, could start a
    node for that queue meanwhile: their tasks waited for ever."""
    for fd in list(_claim_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _claim_fds.clear()
    for ex in list(_live_executors):  # (the parent's: it releases them, not the child)
        ex._start_claims.clear()


os.register_at_fork(after_in_child=_drop_claims_in_child)


class _Within:
    """``with _Within(lock, wait, giving_up)``: ``with lock``, waiting at most ``wait``
    seconds for it; past that, ``giving_up()`` is called and TimeoutError raised."""

    __slots__ = ("lock", "wait", "giving_up")

    def __init__(self, lock, wait: float, giving_up: Callable[[], object]) -> None:
        self.lock, self.wait, self.giving_up = lock, wait, giving_up

    def __enter__(self):
        if not self.lock.acquire(timeout=self.wait):
            self.giving_up()
            raise TimeoutError(f"the executor's send lock was held for over {self.wait:g} s "
                               "(a send waiting for the enclave)")
        return self.lock

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _run_manager(ref: weakref.ref, done: threading.Event) -> None:
    """The manager thread (:func:`_manage`); ``done`` is set as it ends."""
    try:
        _manage(ref)
    finally:
        done.set()


def _manage(ref: weakref.ref) -> None:
    """The manager thread.  It holds its executor only for a turn, never while it waits:
    an executor nobody references any more is collected (ProcessPoolExecutor's is), which
    wakes this thread, and it closes what the executor held (:class:`_Leftovers`).  The
    tasks it sent stay in the enclave, where ``attach()`` finds them."""
    ex = ref()
    if ex is None:
        return
    left = _Leftovers(ex._enclave, ex.client_id, ex._nodes, ex._start_claims, ex._wake,
                      ex._own_enclave)
    try:
        ex._start_manager(left)
        while True:
            fds, timeout = ex._wait_for(left.bell)
            # Held while it has work outstanding (futures not done, tasks not sent yet), as
            # ProcessPoolExecutor's workers run what was submitted to a dropped executor;
            # not held once idle, so that nothing keeps it alive then
            busy = None if ex._idle() else ex
            del ex
            ready = _readable(fds, timeout)
            ex = ref()
            del busy
            if ex is None:
                log.info("kotta client %s: its executor was dropped without shutdown(); "
                         "closing what it held", left.client_id)
                break
            try:
                going = ex._step(ready, left.bell)
            except Exception as exc:  # noqa: BLE001 - raises again unless it may pass
                ex._step_trouble(exc)
                continue
            ex._step_works()
            if not going:
                break
    except BaseException as exc:  # noqa: BLE001 - anything here makes the enclave unusable
        log.exception("kotta manager thread failed")
        ex = ref()
        if ex is not None:
            ex._terminate_broken(exc)
    finally:
        ex = None
        left.close()
        if (ex := ref()) is not None:
            _live_executors.discard(ex)


def _poll_replies(ref: weakref.ref, manager: threading.Thread) -> None:
    """Long-poll the reply channel for backends without doorbells (AWS), while the
    manager runs; holding the executor weakly, as the manager does."""
    while manager.is_alive():
        ex = ref()
        if ex is None:
            return
        take, reply_queue, replies = ex._enclave.queue.take, ex._reply_queue, ex._replies
        del ex
        try:
            msgs = take(reply_queue, 10, wait_seconds=REPLY_LONG_POLL)
        except Exception:  # noqa: BLE001 - the manager's reconcile covers lost replies
            log.exception("polling replies failed")
            time.sleep(1.0)
            continue
        if msgs:
            replies.extend(msgs)
            if (ex := ref()) is not None:
                ex._kick(force=True)
            del ex



def _name_item(exc: SerializationError, chunk: list[tuple], start: int) -> None:
    """Say which item of a map could not be pickled (its message says "argument 0": the
    place in the call, the same for every item): the first of ``chunk``, items ``start``
    on, that fails alone."""
    for k, args in enumerate(chunk):
        try:
            wire.cloudpickle_dumps(args)
        except Exception:  # noqa: BLE001 - whatever pickling raises: this is the one
            exc.add_note(f"it is item {start + k} of the map's iterables (counting from 0)")
            return


def _failure_result(job_id: str, n: int, exc: BaseException) -> bytes:
    """A result envelope for a task that failed on the client before it was sent: its
    exception, pickled as a node pickles one, so that any client attaching to the job
    gets the same type and message (a DependencyError, a SerializationError)."""
    header = wire.result_header(job_id, wire.ERROR, n, failed=n, reason=wire.summary(exc),
                                python=wire.PYTHON)  # (a worker's says so too)
    try:
        payload = wire.dump_exception(exc)
    except Exception:  # noqa: BLE001 - then at least the reason, as a JobFailed
        return wire.failure(job_id, n, "JobFailed", wire.summary(exc))
    return wire.encode(header, {"payload": payload})


class OptionsView(Executor):
    """An executor with other per-call options, sharing its parent's manager and nodes.

    Shutting down a view does nothing: the parent executor owns the resources.
    """

    def __init__(self, parent: KottaExecutor, options: Options):
        self._parent = parent
        self._options = options

    def __reduce__(self):
        raise _not_sent("an executor's with_options() view")

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> KottaFuture:
        return self._parent._submit_call(fn, args, kwargs, self._options)

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        return self._parent._map(fn, iterables, timeout, chunksize, self._options, buffersize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass

    def attach(self, job_id: str) -> KottaFuture:
        # a job runs with the options it was submitted with: the view's do not apply, and
        # the future is the executor's (a view passed around as "the executor" raised
        # AttributeError here)
        return self._parent.attach(job_id)

    def with_options(
        self, *, queue=None, walltime=None, requirements=None, inputs=None, outputs=None
    ) -> OptionsView:
        return OptionsView(
            self._parent,
            self._options.updated(queue, walltime, requirements, inputs, outputs),
        )


def _last_line(path: Path) -> str:
    """The last line of a log (its last 4 KiB read), or why there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError as exc:
        return f"(unreadable: {exc})"
    return lines[-1].strip() if lines else "(empty)"


def _header_too_big(header: dict[str, Any], size: int) -> ConfigurationError | InvalidDataUri:
    """Why a task whose header is over what a node reads (``wire.MAX_HEADER``) is refused at
    submit: a node failed it as a "truncated", corrupt message, naming no cause."""
    ins, outs = len(header.get("inputs", ())), len(header.get("outputs", ()))
    reqs = len(header.get("requirements", "").splitlines())
    cls = InvalidDataUri if ins or outs else ConfigurationError
    return cls(
        f"the task declares {ins} inputs, {outs} outputs and {reqs} requirements: its header "
        f"of {size} bytes is over the {wire.MAX_HEADER} bytes a node reads; declare fewer "
        "(an archive of the files, or the work split among several tasks)"
    )


def _not_sent(what: str) -> TypeError:
    """Why a task cannot take a client's executor (in a closure, a global of a notebook's
    function, an argument): said instead of pickle's "cannot pickle '_thread.lock'"."""
    return TypeError(
        f"{what} cannot be sent to a task: it is the client's; a task that submits tasks "
        "makes its own executor, with its owner's credentials="
    )


def _fail_if_pending(f: Future, exc: BaseException) -> None:
    """Fail ``f`` unless it is done: a user's ``cancel()`` in another thread may have
    ended it since it was looked at (and ``set_exception`` would raise, stopping the loop
    that was failing the others)."""
    try:
        if not f.done():
            f.set_exception(exc)
    except InvalidStateError:
        pass


def _stderr_after(env: wire.Envelope) -> dict[int, int]:
    """Of a task of several calls: how much stderr the calls after each failed one wrote
    (the node says so; an older node does not, and malformed it is ignored)."""
    after = env.header.get("stderr_after")
    try:
        return {i: n for i, n in after if type(i) is int and type(n) is int and n >= 0}
    except (TypeError, ValueError):  # (None: a task of one call, or an older node)
        return {}


def _stderr_until(env: wire.Envelope, after: int) -> str:
    """The stderr of a task as one of its calls failed: without what later calls wrote
    (a packed map item's exception showed the other items' output as its own)."""
    data = env.sections.get("stderr", b"")
    return data[:max(0, len(data) - after)].decode("utf-8", "replace")


def _annotate(exc: BaseException, job_id: str, stderr: str | None, where: str = "") -> None:
    """``where``: what the commands need to find the job (``--enclave URL``, or nothing)."""
    notes = getattr(exc, "__notes__", [])
    if not isinstance(notes, list):  # set so by the task: add_note would raise TypeError,
        return  # in place of the task's own exception
    note = f"kotta job {job_id} (kotta status {job_id}{where}; kotta logs {job_id}{where})"
    # once per job (one exception may stand for all the calls of a task); a note of another
    # job (an exception the task got from a job of its own, and let out) is no reason to skip
    if any(isinstance(n, str) and n.startswith(note) for n in notes):
        return
    if stderr:
        tail = stderr[-2000:].rstrip()
        note += "\n--- remote stderr (tail) ---\n" + tail
    wire.add_note(exc, note)


_live_executors: weakref.WeakSet[KottaExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    for ex in list(_live_executors):
        try:
            ex.shutdown(wait=True)
        except Exception:  # noqa: BLE001
            pass


#: the process that made _shutdown_at_exit a multiprocessing finalizer (_wait_at_child_exit)
_finalizer_pid: int | None = None


def _wait_at_child_exit() -> None:
    """In a ``multiprocessing`` child, have its exit wait for its executors, as the
    interpreter's does: one started by fork ends with ``os._exit``, which runs no atexit
    handler, and an executor left open there lost its tasks.  (A ProcessPoolExecutor's
    wait runs there too: multiprocessing runs threading's exit hooks before that exit,
    and its own finalizers, as this one.)"""
    global _finalizer_pid
    mp = sys.modules.get("multiprocessing")
    if mp is None or _finalizer_pid == os.getpid() or mp.parent_process() is None:
        return
    from multiprocessing import util

    _finalizer_pid = os.getpid()
    util.Finalize(None, _shutdown_at_exit, exitpriority=0)


__all__ = ["KottaExecutor", "KottaFuture", "OptionsView", "FuturesTimeout", "ConfigurationError"]
