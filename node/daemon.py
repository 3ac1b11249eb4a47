"""The node daemon: a loop over small steps.

::

    ┌────────────────────────────── Node.run() ───────────────────────────────┐
    │ wait      doorbell, worker pipes, signals (select, with a poll timeout) │
    │ collect   result envelopes from workers; notice dead workers            │
    │ report    record results (at most once), reply to clients, ack          │
    │ police    walltime, kill requests, SIGKILL after the grace period       │
    │ receive   take deliveries while there is room; dead-letter bad ones     │
    │ dispatch  pending -> processing (conditional), hand tasks to workers    │
    │ upkeep    resource samples of long tasks, heartbeat, extend visibility  │
    └─────────────────────────────────────────────────────────────────────────┘

The daemon reads only envelope *headers* (JSON).  It never unpickles a payload or a result:
worker processes do.  ``burst`` (exit when the queue is empty) and ``max_jobs`` make it
testable without sleeps.  On SIGTERM it stops taking work, hands back what it has not
started, lets running tasks finish for up to ``drain_timeout`` seconds, then hands those
back too, and exits 0.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from kotta_executor import config as kconfig
from kotta_executor import wire
from kotta_executor._poll import ready as _ready
from kotta_executor.backends.base import (
    Delivery,
    Enclave,
    Finished,
    Message,
    NewJob,
    NodeInfo,
    reply_queue,
)
from kotta_executor.errors import (
    AuthenticationError,
    ConfigurationError,
    EnvelopeError,
    InvalidDataUri,
    KottaError,
)
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.staging import declared
from kotta_executor.security.tokens import Verifier
from kotta_executor.states import JobState

from . import envs, pool, staging
from .datasteps import DataSteps, declares_data
from .monitor import Monitor, children_map, read_tree, tree_pss
from .pool import Leftovers, Task, Worker
from .worker import READY, STOP_SIGNAL, unpack_result

log = logging.getLogger("kotta.node")

#: seconds the node lets results of tiny tasks accumulate before reporting them
LINGER = 0.0005
#: replies up to this size carry the result; larger ones make the client read the job table
REPLY_INLINE_LIMIT = 64 * 1024
#: seconds between memory checks of running tasks; tasks younger than MEMORY_MIN_AGE are
#: never measured (no psutil call per tiny task)
MEMORY_CHECK_INTERVAL = 0.5
MEMORY_MIN_AGE = 0.2
#: a task's PSS (read when its tree's RSS sum is over the limit) is read again no sooner
#: than this many times what the reading cost: the kernel walks every page table for it
#: (~30 ms a GB a process holds), and a task whose children share its memory stays over
#: the RSS test: read every check, four children sharing 2 GB held the node's loop for
#: 0.6 s of every 0.5 s.  (At most 1/MEMORY_PSS_SPACING of the node's time.)  Sooner,
#: after MEMORY_PSS_SPACING_GREW times, once the RSS sum has grown by more than the room
#: the last PSS left under the limit: a page the task newly fills adds as much to both (a
#: task that shares, then allocates ten times the limit, is not left to do so for 20 s).
MEMORY_PSS_SPACING = 20
MEMORY_PSS_SPACING_GREW = 2
#: seconds between a busy node's looks for kill requests
KILL_LOOK = 0.25
#: seconds a node keeps replies a client's full inbox did not take (the client is busy,
#: often writing its next batch of tasks) before they go on its reply queue, which takes
#: a write transaction and a wait for the lock that client holds; and how soon it retries
HOLD_REPLIES = 0.05
#: seconds before results whose recording a transient fault failed are tried again,
#: doubled at each failure up to REPORT_RETRY_MAX
REPORT_RETRY = 0.1
REPORT_RETRY_MAX = 5.0
#: seconds recording results may keep failing with faults the enclave does not call
#: lasting before the node gives up (raises, and stops, as for a lasting fault): one that
#: does not pass (a bad record, say) must not hold every later result back for ever (the
#: delete of ended tasks' blobs gives up alone, leaving them to the sweep).  The heartbeat and the extension of held messages get a third
#: of the time after which other nodes take the node for gone, or its messages for free
PATIENCE = 60.0
#: seconds after its last heartbeat that other nodes take a node for gone (the backends'
#: NODE_STALE_AFTER)
NODE_STALE = 30.0
#: seconds a stopping node waits for the enclave's write lock to remove its row (another
#: process holding it): no longer, for its executor waits for it to exit (it waited the
#: whole LOCK_TIMEOUT, a minute, then the node exited with an error); the row of a node
#: whose process has ended is not taken for a live node, and is reaped (reap_dead_nodes)
DEREGISTER_WAIT = 1.0
HOLD_RETRY = 0.002
#: the sections of a task that go to blobs named ``<section>-<job id>`` when too big for
#: its message (KottaExecutor._new_job)
TASK_SECTIONS = ("fn", "args")
#: task blobs (TASK_SECTIONS) whose job has no record, last written longer ago than this,
#: are deleted: a client died between writing them and recording its job (a kernel restarted
#: during a burst of big submits), and nothing else would ever remove them, nor the data in
#: them.  Far longer than a running client takes from one to the other (it gives up after
#: executor.SEND_RETRY_FOR); a day, because a client process stopped in between (a laptop
#: asleep while its sends failed) records the job once it wakes, and its task then fails
#: for want of its blob (CorruptTask) if a sweep came first
STRAY_BLOB_AGE = 86400.0
#: message bodies spilled to the blob store (AWS: ``msg-<random>``, SqsQueue._encode) last
#: written longer ago than this are deleted: a client killed between spilling a body and
#: sending its message left one that no message names, with the task in it, for good.  No
#: message can name one this old: 14 days on its queue (SQS keeps a message that long at
#: most), 14 more as a dead letter (sent anew, naming the same blob), and a day for clocks
MSG_BLOB_AGE = 29 * 86400.0
#: seconds between a node's looks for them (a page of keys a section each look, going on
#: from where the last look stopped); the first look is at the node's first upkeep
STRAY_BLOB_LOOK = 600.0
#: reply messages older than this are deleted (TaskQueue.expire_replies): no client took
#: them, as one looks at its reply queue every second while its executor is open.  Replies
#: to an executor that had shut down (tasks it cancelled, dropped by a node later) and to a
#: dead client's queue would otherwise stay in the enclave for good; the job table holds
#: what they said.  A day, as SQS keeps a reply queue's messages
REPLY_AGE = 86400.0
#: seconds between looks at the size of the enclave's log (Enclave.checkpoint_due)
LOG_LOOK = 1.0
#: seconds between looks at the output that running tasks hold on the node's disk
CAPTURE_TRIM = 1.0
#: seconds between looks for processes dead workers left (pool.Orphans); soon after a death
ORPHAN_LOOK = 2.0
ORPHAN_LOOK_SOON = 0.1
#: how many clients' processes (task headers' ``client_process``) a node remembers
CLIENTS_KEPT = 1024
#: the shortest poll interval a node takes (a shorter one, 0 too, is taken as this): at 0
#: an idle node looked at its queue without pause, and kept a core busy (97% of one); at
#: this, 5% of one, and a task that no doorbell announced waits at most this long
MIN_POLL_INTERVAL = 0.01


#: a node id given (NodeConfig.node_id, `kotta node --node-id`): the ids nodes make are hex
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class NodeConfig:
    queue: str = "test"
    workers: int = field(default_factory=kconfig.cpu_count)
    visibility_timeout: float = 30.0
    max_deliveries: int = kconfig.MAX_DELIVERIES
    poll_interval: float = 0.5
    drain_timeout: float = 30.0
    burst: bool = False
    max_jobs: int | None = None
    parent_pid: int | None = None
    managed_by: str | None = None
    node_id: str | None = None
    prespawn_owner: str | None = None
    #: long-poll wait of the receiver thread used when the backend has no doorbells
    long_poll: float = 5.0
    #: seconds between resource samples of a running task (CPU%, RSS over its process tree);
    #: tasks shorter than half of it are never sampled; 0 turns sampling off
    sample_interval: float = 120.0
    #: MB a task's process tree may use (PSS: see _check_memory); None: the queue's limit
    #: (config.queue_limits)
    memory_limit: int | None = None
    #: the longest walltime (seconds) the node accepts; None: the queue's cap
    max_walltime: float | None = None
    #: MB of staged inputs the node keeps in its cache between tasks
    stage_cache_mb: int = 2048
    #: tasks per worker the node holds beyond those its workers can start soon (Node._room)
    prefetch: int = 0
    #: an executor's own node (``parent_pid``): the write end of a pipe its executor reads,
    #: closed when the node stops or leaves (:meth:`Node._leave`)
    leave_fd: int | None = None

    def __post_init__(self) -> None:
        """Each value checked as `kotta node` checks its options, naming the field and the
        value: made in Python, a NodeConfig took any (memory_limit=0 or max_walltime=0
        was taken for the queue's limit, a negative one killed every task, max_jobs=0 made
        a node that exited at once, a NaN poll_interval failed the node's first wait)."""
        def whole(name: str, low: int, *, none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"NodeConfig.{name} must be an integer"
                                f"{' or None' if none else ''}, not {value!r}")
            if value < low:
                raise ValueError(f"NodeConfig.{name} must be at least {low}, not {value!r}")

        def seconds(name: str, low: float, *, above: bool = False, none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"NodeConfig.{name} must be a number of seconds"
                                f"{' or None' if none else ''}, not {value!r}")
            if not (low < value if above else low <= value) or not math.isfinite(value):
                bound = f"more than {low:g}" if above else f"{low:g} or more"
                raise ValueError(f"NodeConfig.{name} must be a number of seconds, {bound}, "
                                 f"not {value!r}")

        # as clients name it ("prod", "Production"): a node of a queue "prod" served nothing
        try:
            self.queue = kconfig.normalize_queue(self.queue)
        except ConfigurationError as exc:
            raise ConfigurationError(f"NodeConfig.queue: {exc}") from None
        whole("workers", 1)
        seconds("visibility_timeout", 0, above=True)
        whole("max_deliveries", 1)
        seconds("poll_interval", 0)
        self.poll_interval = max(self.poll_interval, MIN_POLL_INTERVAL)
        seconds("drain_timeout", 0)
        if not isinstance(self.burst, bool):  # ("no" would be true)
            raise TypeError(f"NodeConfig.burst must be True or False, not {self.burst!r}")
        whole("max_jobs", 1, none=True)
        # (0 would have the receiver thread of a backend without doorbells call it without
        # pause)
        seconds("long_poll", 0, above=True)
        seconds("sample_interval", 0)
        if 0 < self.sample_interval < 1:  # (as `kotta node --sample-interval`)
            raise ValueError("NodeConfig.sample_interval must be at least 1 second (or 0: no "
                             f"samples), not {self.sample_interval!r}")
        whole("memory_limit", 1, none=True)  # MB
        seconds("max_walltime", 0, above=True, none=True)
        whole("stage_cache_mb", 0)
        whole("prefetch", 0)
        # a file name's part (its staging area, its inbox) and a record's key: "../x" put
        # its staging area, made, swept beside and removed, out of the stage directory
        if self.node_id is not None and self.node_id != "" and not (
                isinstance(self.node_id, str) and _NODE_ID.fullmatch(self.node_id)):
            raise ValueError(f"NodeConfig.node_id must be 1-64 letters, digits, '.', '_' or "
                             f"'-', beginning with a letter or digit, not {self.node_id!r}")


class Node:
    def __init__(self, enclave: Enclave, config: NodeConfig):
        if config.workers < 1:
            raise ValueError("a node needs at least one worker")
        self.enclave = enclave
        self.config = config
        self.node_id = config.node_id or uuid.uuid4().hex[:12]
        self.queue = config.queue
        self.workers: list[Worker] = []
        self.pending: deque[Task] = deque()
        #: redeliveries of jobs that a live node still runs, by job (see _watch_running)
        self.watched: dict[str, Delivery] = {}
        self.finished: list[tuple[Task | None, Delivery, Finished, str]] = []
        #: a report that a transient fault failed is tried again from then (_report)
        self._report_after = 0.0
        self._report_tries = 0
        #: since when each step of PATIENCE has failed, while it fails
        self._failing: dict[str, float] = {}
        #: envs.ended at the last fault building an env (_env_fault)
        self._env_ended = 0
        self.jobs_done = 0
        #: what gone workers may have left running (tasks' children), SIGKILLed on time
        self._leftovers: list[Leftovers] = []
        #: whether this process is a subreaper (``kotta node`` makes it one): then what dead
        #: workers left in sessions of their own is re-parented to it, and ended
        self.adopts_orphans = False
        self.orphans = pool.Orphans()
        self._next_orphan_look = 0.0
        self._next_stray_look = 0.0
        #: where each section's listing of task blobs goes on at the next look
        self._stray_after = dict.fromkeys((*TASK_SECTIONS, "result", "msg"), "")
        self.stopping = False
        #: the signal that asked the node to stop (SIGTERM, SIGINT, SIGHUP), for its log
        self._stop_signal: int | None = None
        #: what run() returns: 0, unless the node stopped for a fault (its enclave removed)
        self.exit_status = 0
        self._parent_stop = False  # stopped by its executor, or for want of it (request_leave)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._bell: socket.socket | None = None
        self._task_inbox: socket.socket | None = None  # clients hand it lone tasks
        #: tasks read from the task inbox that a step could not record (it did not begin)
        self._unadopted: list[tuple[NewJob, dict]] = []
        self._last_upkeep = time.monotonic()
        self._next_log_look = 0.0
        self._next_capture_trim = 0.0
        self._next_sample_check = 0.0
        self._last_kill_check = 0.0
        self._last_parent_check = 0.0
        #: started by its parent directly (an executor's own node): its death reparents us
        self._child_of_parent = config.parent_pid is not None and os.getppid() == config.parent_pid
        self._next_memory_check = 0.0
        #: job id -> (when, RSS sum, PSS, seconds the reading took) of its last PSS
        #: reading, of running tasks whose last PSS was under the memory limit (see
        #: MEMORY_PSS_SPACING)
        self._pss_read: dict[str, tuple[float, int, int, float]] = {}
        limits = kconfig.queue_limits(config.queue)
        #: bytes a task's process tree may use (see _check_memory), and the longest
        #: walltime (seconds)
        self.memory_limit = (config.memory_limit or limits.memory_mb) * 1024 * 1024
        self.max_walltime = config.max_walltime or limits.max_walltime_seconds
        if config.workers > limits.workers:
            log.warning("queue %s allows %d workers per node; using %d, not %d",
                        config.queue, limits.workers, limits.workers, config.workers)
            config.workers = limits.workers
        self._ring_later: set[str] = set()
        self._ring_queue = False  # tasks this step queued: ring the queue's nodes
        # the step's replies, sent once its transaction committed (_wake_clients)
        self._replies_later: dict[str, list[tuple[str, bytes]]] = {}
        #: replies a full inbox did not take, by client: (since when, messages)
        self._held: dict[str, tuple[float, list[Message]]] = {}
        #: the process of each client whose tasks came lately, by client (its tasks say)
        self._client_process: dict[str, str] = {}
        self._backlogged = False  # the last receive took all it asked for
        self._rang = True  # the doorbell rang since the node last looked at the queue
        self._last_look = 0.0
        self._delete_later: list[str] = []  # blobs of recorded tasks, once committed
        self._refusals = False  # a task refused as received waits in pending (_dispatch)
        # Without doorbells (AWS), a thread long-polls the queue and fills the inbox.
        self._inbox: deque[Delivery] = deque()
        self._room_hint = 0
        self._poller: threading.Thread | None = None
        # venvs for tasks with requirements, built in background threads (node/envs.py)
        self.envs = envs.EnvCache(envs.default_root(enclave.local), self.request_wake)
        self.verifier = Verifier(enclave)
        self.audit = AuditLog(enclave)
        self._audit_later: list[dict] = []
        stage_root = envs.default_root(enclave.local).parent / "stage" / self.node_id
        self.data = DataSteps(self, stage_root, config.stage_cache_mb * 1024 * 1024)

    # ------------------------------------------------------------------ life cycle

    def request_stop(self, signum: int | None = None, *_: object) -> None:
        if signum is not None and self._stop_signal is None:  # (logged by _drain)
            self._stop_signal = signum
        self.stopping = True
        self.request_wake()

    def request_leave(self, signum: int | None = None, *_: object) -> None:
        """The stop its executor asks of its own node as it shuts down (SIGUSR1; SIGTERM
        is `kotta down`'s, a supervisor's): the running tasks of other clients that used
        it finish, outside the queue (_leave), not only up to the drain's deadline."""
        self._parent_stop = True
        self.request_stop(signum)

    def request_wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def run(self) -> int:
        self._start()
        try:
            while not self._done():
                self.step()
            self._drain()
        finally:
            self._stop()
        return self.exit_status

    def step(self) -> None:
        self._wait()
        self._collect()
        self.data.collect()
        self._police()
        handed = self._unadopted + self._handed_tasks()
        self._unadopted = []
        receive = not self.stopping and self._should_receive()
        if self.finished or receive or self.pending or handed:
            began = False
            try:
                with self.enclave.atomic():  # one transaction a step
                    began = True
                    self._report()
                    if handed:
                        self._adopt(handed)
                    if receive:
                        self._receive()
                    # Workers get their tasks once claimed, before the commit, so that the
                    # commit overlaps the task.  Should the commit fail, the node dies, and
                    # the tasks run again elsewhere (at least once, recorded at most once).
                    # Jobs recorded in this very transaction (handed-off tasks) are claimed
                    # after, as nobody else can have moved them meanwhile.
                    frames, adopted = self._dispatch()
                    self._hand_out(frames)
                    self._claim_adopted(adopted)
            except Exception as exc:
                if began:
                    raise
                # Not begun: the write lock was not had within the backend's lock timeout
                # (another process holds it: a client stopped, ^Z, inside its transaction).
                # Nothing of the step was done, so it is a transient fault, as any other
                # (_transient): tried again at the next step, not the end of the node and
                # of every task it runs.  The tasks handed to it wait for that step.
                self._transient("beginning a step", exc)
                log.warning("beginning a step failed (%s: %s); trying again",
                            type(exc).__name__, exc)
                self._unadopted = handed
            else:
                self._failing.pop("beginning a step", None)
        self._upkeep()
        self._wake_clients()  # inboxes and bells: only what is committed

    def _should_receive(self) -> bool:
        """Look at the queue when rung, when the last look left work there, and every
        poll interval (for redeliveries, and a ring that was missed)."""
        now = time.monotonic()
        if self._poller is not None or self._inbox:
            return True
        if self._room() <= 0:  # a ring now is for when room frees: keep it
            return False
        if self._rang or self._backlogged or now - self._last_look >= self.config.poll_interval:
            self._rang = False
            self._last_look = now
            return True
        return False

    def _wake_clients(self, final: bool = False) -> None:
        """Hand the step's replies to their clients' inboxes (or their reply queues, and
        ring them), last: by then this node holds no database lock and wants no CPU, so a
        client's read of its replies does not wait for it.  The step's audit records are
        written first, outside its transaction (a client told of a refusal finds it
        audited); the blobs of the tasks it recorded are deleted after."""
        while self._audit_later:
            record = dict(self._audit_later[0])
            # kept, and written at a later step if that fails: a refusal is never left
            # unaudited
            if not self._tolerant("writing an audit record",
                                  lambda r: self.audit.append(r.pop("action"), **r), record,
                                  then="trying again at the next step")[0]:
                break
            self._audit_later.pop(0)
        now = time.monotonic()
        for client in dict.fromkeys([*self._replies_later, *self._held]):  # each once
            since, messages = self._held.pop(client, (now, []))
            if client in self._replies_later:
                messages += _pack_replies(self._replies_later[client])
            rest, full = self.enclave.reply_direct(client, messages)
            if rest and full and not final and now - since < HOLD_REPLIES:
                self._held[client] = (since, rest)  # a busy client: again at the next step
            elif rest and self._client_gone(client):
                # killed (its inbox is gone or unread): nobody would ever take its reply
                # queue.  The job table holds the results, for attach()
                log.debug("dropped %d replies to client %s: its process is gone", len(rest), client)
            elif rest:  # no inbox (AWS; an older client), or full for too long: the queue
                # a reply is a hint: one not sent is dropped, as the results are
                # recorded, and the client finds them in the job table
                self._tolerant("replying", self.enclave.queue.send, reply_queue(client), rest,
                               then="its client finds them in the job table")
                self._ring_later.add(client)
        self._replies_later.clear()
        for client in self._ring_later:
            self.enclave.ring_client(client)
        self._ring_later.clear()
        if self._ring_queue:
            self._ring_queue = False
            self.enclave.ring_nodes(self.queue)
        if self._delete_later:
            what = f"deleting {len(self._delete_later)} blobs of ended tasks"
            try:
                done = self._tolerant(what, self.enclave.blobs.delete, self._delete_later,
                                      key="delete", then="trying again at the next step")[0]
            except Exception as exc:  # noqa: BLE001 - refused for good, or for too long
                # Not a reason to end the node and every task it runs, as a result it
                # cannot record is: nothing waits for these deletes, and the nodes' sweep
                # of old task blobs of ended jobs deletes them later (or says why not)
                log.error("%s failed for good (%s: %s); they are left for the nodes' sweep "
                          "of old task blobs", what, type(exc).__name__, exc)
                self._failing.pop("delete", None)
                done = True
            if done:
                self._delete_later = []

    def _client_gone(self, client: str) -> bool:
        process = self._client_process.get(client)
        return process is not None and self.enclave.process_gone(process)

    def _note_client(self, header: dict) -> None:
        """Remember the process of a task's client (see _client_gone): the latest few."""
        process, known = header.get("client_process"), self._client_process
        if isinstance(process, str) and known.get(header["client"]) != process:
            known.pop(header["client"], None)
            known[header["client"]] = process
            if len(known) > CLIENTS_KEPT:
                del known[next(iter(known))]

    def _start(self) -> None:
        self._bell = self.enclave.doorbell(f"node-{self.node_id}")
        if self._bell is not None:  # bound before the node registers, where clients find it
            self._task_inbox = self.enclave.task_inbox(self.node_id)
        if self._bell is None:
            self._room_hint = self._room()  # (the poller's first fetch, as a receive's)
            self._poller = threading.Thread(target=self._poll_queue, name="kotta-node-poller", daemon=True)
            self._poller.start()
        staging.sweep_dead_script_dirs()  # (a node killed before it removed them)
        me = psutil.Process()
        self.enclave.nodes.register(
            NodeInfo(
                node_id=self.node_id,
                queue=self.queue,
                host=socket.gethostname(),
                pid=os.getpid(),
                workers=self.config.workers,
                started=me.create_time(),
                managed_by=self.config.managed_by,
                python=wire.PYTHON,
            )
        )
        if self.config.prespawn_owner:
            for _ in range(self.config.workers):
                try:
                    self.workers.append(pool.spawn(self.config.prespawn_owner))
                except (OSError, subprocess.SubprocessError) as exc:
                    # a head start only: a fault of the node's own (EMFILE...) ended the
                    # node at its start; the workers start at the first tasks instead,
                    # as any (_start_planned, _not_started: once it has passed)
                    log.warning("the workers for %s could not be started ahead of their "
                                "tasks: %s; they start with them", self.config.prespawn_owner,
                                _unstartable(exc))
                    break
        log.info("node %s serving queue %s with %d workers", self.node_id, self.queue, self.config.workers)

    def _parent_gone(self, pid: int) -> bool:
        """Whether the process that started this node has ended: killed outright, it is a
        zombie until its own parent reaps it (which may be never), and its pid may be
        taken by another process after that."""
        if self._child_of_parent:
            return os.getppid() != pid  # (a child is reparented as its parent dies)
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def _done(self) -> bool:
        if self.stopping:
            return True
        now = time.monotonic()
        if self.config.parent_pid and now - self._last_parent_check > 1.0:
            self._last_parent_check = now
            if self._parent_gone(self.config.parent_pid):
                log.info("parent %s is gone; stopping", self.config.parent_pid)
                self._parent_stop = True  # (as its executor's shutdown: request_leave)
                self.stopping = True
                return True
        if self.config.max_jobs is not None and self.jobs_done >= self.config.max_jobs:
            return True
        if self.config.burst and not self._holding() and self.enclave.queue.depth(self.queue) == 0:
            return True
        return False

    def _holding(self) -> bool:
        return bool(
            self.pending or self.finished or self._inbox or self.data.active or self.watched
            or any(w.inflight for w in self.workers)
        )

    def _drain(self) -> None:
        """Hand back what has not started; let running tasks finish for a while."""
        self.stopping = True
        if self._stop_signal is not None:
            # (else its log said only "stopped after N jobs": not why, nor what became of
            # the tasks it held)
            busy = [w for w in self.workers if w.inflight]
            waiting = (len(self.pending) + len(self._inbox)
                       + sum(len(w.inflight) - 1 for w in busy))
            why = signal.Signals(self._stop_signal).name
            if self._stop_signal == signal.SIGUSR1:
                why += " (its executor shut down)"
            log.info("stopping on %s: taking no more tasks, letting %d running finish (for "
                     "up to %g s), handing back %d not started",
                     why, len(busy), self.config.drain_timeout, waiting)
        if others := self._others_running():
            self._leave(others)
        self._close_task_inbox()
        if self._poller is not None:  # it hands back what a last long poll brings
            self._poller.join(1.0)
        # (a delivery of a message a task here holds is that task's: not handed back,
        # which would show the message to other nodes while the task runs on here)
        inbox = self._ours_again(list(self._inbox), every=True)
        self._inbox.clear()
        self._check_watched()  # (what has ended is acked, not handed back)
        watched = list(self.watched.values())
        self.watched.clear()
        self._hand_back_pending(inbox)
        self.enclave.queue.release(watched)
        for w in self.workers:
            # Tasks piped behind the one it runs: it must not begin them.  It reports
            # what it ran, then exits, and the node hands back the rest (_bury).  (Which
            # of them it has begun by now, only its results tell.)  Those behind a task
            # still running at the next read of its results are handed back then
            # (_take_back), not once it ends: they waited, hidden from other nodes, for
            # as long as it ran, up to the drain's deadline
            if len(w.inflight) > 1:
                if w.taking_back is None and w.heeds_stop():  # (Worker.heeds_stop)
                    w.taking_back = w.inflight[0]
                w.stop_after_current()
        deadline = time.monotonic() + self.config.drain_timeout
        while (self.data.active or any(w.inflight for w in self.workers)) and (
            time.monotonic() < deadline or self._others_running()
        ):
            self._wait()
            self._collect()
            self.data.collect()
            self._report()
            self._police()
            self._upkeep()
            self._wake_clients()
        # Still running: ended (the tree, as _stop ends a busy worker's) before their tasks
        # are visible again, so that a task never runs here and on another node at once
        late = [w for w in self.workers if w.inflight]
        self.data.past_deadline = True  # (a result read below begins no upload)
        killing = {id(w) for w in late if w.kill_reason is not None}  # (before the kill below)
        for w in late:
            if id(w) not in killing:
                log.warning("drain timeout: handing back %s", [t.job_id for t in w.inflight])
            _kill_tree_now(w)
        for w in late:
            if id(w) in killing:
                # Its kill (on request, for its walltime or memory) was under way: it ends
                # as that kill would have ended it, and what is behind goes back (_bury).
                # Handed back as a task still running, the job was left in processing, and
                # a killed task's future waited for another node to end it.
                self._bury(w)
                continue
            w.proc.wait()
            # What it sent before it ended (that it was ready, a result) counts, and says
            # which task it ran last: a worker runs its tasks one after another, each
            # result sent as the task ends, so it never began those behind the first
            # without a result.  As those behind a worker that stopped as asked, they go
            # back pending and uncounted.  (Released counted, their jobs left in
            # processing, a few node restarts dead-lettered tasks that never ran.)
            try:
                messages, _ = w.read_results()
            except OSError:
                messages = []
            in_step = not w.garbled
            for data in messages:
                if data == READY:  # (unless it said so just now)
                    w.started_up()
                elif w.inflight and not self._finish_from_worker(w, w.task_done(), data):
                    in_step = False  # (garbled: which task it ran, it does not say)
                    break
            if not w.ready:
                # still starting up (a slow venv, sitecustomize): it never began its task,
                # which goes back pending and uncounted, not dead-lettered after a restart
                self._put_back(w.inflight, unbegun=True)
                continue
            if w.inflight and in_step:  # the one it ran, or may have begun: counted
                self.enclave.queue.release([w.inflight.popleft().delivery])
                self._put_back(w.inflight, unbegun=True)
            else:
                self.enclave.queue.release([t.delivery for t in w.inflight])
                w.inflight.clear()
        # staged meanwhile, not started, or still staging: hand back (their work
        # directories go with _stop; a staging thread still running is abandoned)
        self._hand_back_pending()
        if self.data.active:
            log.warning("drain timeout: handing back %s, still staging", list(self.data.active))
            active = list(self.data.active.values())
            unstaged = self._unstage(active)  # (never ran: not counted as a delivery)
            self.enclave.queue.hand_back([t.delivery for t in active if id(t) in unstaged])
            self.enclave.queue.release([t.delivery for t in active if id(t) not in unstaged])
            self.data.active.clear()
            self.data.abandoned = True
        self._report_after = 0.0  # a last try, whatever failed before
        self._report()
        if self.finished:  # not recorded: their messages come back, and the tasks run again
            log.warning("handing back %d tasks whose results could not be recorded",
                        len(self.finished))
            self.enclave.queue.release([d for _, d, _, _ in self.finished])
            self.finished.clear()
        self._wake_clients(final=True)

    def _others_running(self) -> list[Worker]:
        """An executor's own node: its workers running a task of another client (one
        that found this node serving the queue, and used it) still alive.  Its stop by its
        executor (shut down, or gone) lets them finish, and does not end them at the
        drain's deadline: they were killed then, to run again from the start on a node
        their own client had to start (a second notebook's hour-long task, for one
        notebook closing its executor).  Their walltime still holds."""
        parent = self.config.managed_by
        if self.config.parent_pid is None or parent is None or not self._parent_stop:
            return []  # (`kotta down`, SIGTERM: the drain as documented, its deadline kept)
        out = []
        for w in self.workers:
            if w.inflight and w.kill_deadline is None:
                client = w.inflight[0].header.get("client")
                if client != parent and not self._client_gone(client):
                    out.append(w)
        return out

    def _leave(self, busy: list[Worker]) -> None:
        """Stop serving the queue while the tasks of other clients finish here (``busy``:
        the workers running them): out of the registry (their clients start a node of
        their own for what they have queued), and the executor that started the node told
        (it stops waiting for it)."""
        log.info("leaving the queue: finishing %d running tasks of other clients (%s) first",
                 len(busy), ", ".join(w.inflight[0].job_id for w in busy))
        try:
            self.enclave.nodes.deregister(self.node_id)
        except Exception as exc:  # noqa: BLE001 - it deregisters again as it stops
            log.warning("leaving the registry failed (%s: %s)", type(exc).__name__, exc)
        self._close_leave_fd()

    def _close_leave_fd(self) -> None:
        fd, self.config.leave_fd = self.config.leave_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _hand_back_pending(self, inbox: Iterable[Delivery] = ()) -> None:
        """Hand back the tasks waiting here (and ``inbox``'s deliveries), as the node stops.
        Those not claimed yet never started: their receive does not count as a delivery
        (``queue.hand_back``), else stopping a node now and then dead-lettered tasks
        that never ran.  A claimed one (put back from a worker) is counted: its next
        delivery must be a redelivery, to claim the job this node moved; but not one only
        staged here, or back from a worker that never began it, whose job goes back to
        pending (:meth:`_unstage`)."""
        claimed = [t for t in self.pending if t.claimed]
        unstaged = self._unstage(claimed)
        fresh = [*inbox, *(t.delivery for t in self.pending if not t.claimed or id(t) in unstaged)]
        self.enclave.queue.hand_back(fresh)
        self.enclave.queue.release([t.delivery for t in claimed if id(t) not in unstaged])
        self.pending.clear()

    def _unstage(self, tasks: list[Task]) -> set[int]:
        """Of ``tasks`` (claimed, handed back as the node stops), those whose job this node
        only staged, never ran: moved back to pending (staging_inputs -> pending), to hand
        back uncounted, as a task never claimed.  Else each node stopped while it held a
        staged task counted a delivery, its job left in staging_inputs, and after a few
        node restarts a task that never ran was dead-lettered.  The same for a task back
        from a worker that certainly never began it (``unbegun``: processing -> pending).
        Returns their ``id()``s.  A job another node has begun meanwhile (its message seen
        again), or one asked to be killed (its next node ends it), is left as it is:
        released, counted.  That is the write's own condition (``held_by``): read first,
        then written, a claim or a kill landing in between was undone (another node's
        running job moved back to pending; a killed job handed back as a first delivery,
        which the next node ran)."""
        unbegun = [t.job_id for t in tasks if t.claimed and t.unbegun]
        staged = [t.job_id for t in tasks
                  if t.claimed and not t.unbegun and declares_data(t.header)]
        if not unbegun and not staged:
            return set()
        moved: set[str] = set()
        try:
            for ids, held in ((unbegun, {JobState.STAGING_INPUTS, JobState.PROCESSING}),
                              (staged, {JobState.STAGING_INPUTS})):
                if ids:
                    moved.update(self.enclave.jobs.transition(
                        ids, JobState.PENDING, from_states=held, node=self.node_id,
                        held_by=self.node_id))
        except Exception as exc:  # noqa: BLE001 - stopping: handed back counted, as before
            log.warning("moving jobs it never ran back to pending failed (%s: %s); handing them "
                        "back as delivered", type(exc).__name__, exc)  # (but those moved)
        return {id(t) for t in tasks if t.job_id in moved}

    def _stop(self) -> None:
        # (also when the loop died of an exception: its poller thread, which polls while
        # the node is not stopping, polled on for the life of the process, a node run in
        # a thread of it, after the enclave was closed)
        self.stopping = True
        self.data.close()
        self.envs.close()  # (their tasks were handed back)
        for w in self.workers:
            w.tasks.close()  # EOF: an idle worker exits by itself
        deadline = time.monotonic() + 2  # (for all of them together, not 2 s each)
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still busy: kill the tree
                _kill_tree_now(w)
                w.proc.wait()
            self._leftovers.append(w.leftovers())
            w.close()
        self.workers.clear()
        for left in sorted(self._leftovers, key=lambda x: x.deadline):
            if left.any_left():  # (a stop waits only for what there is to kill)
                time.sleep(max(0.0, left.deadline - time.monotonic()))
                left.kill()
            else:
                left.remove_dirs()
        self._leftovers.clear()
        if self.adopts_orphans:  # (what they started that the kernel gave to this node)
            self.orphans.end_all(building=self.envs.building())
        try:
            self.enclave.nodes.deregister(self.node_id, wait=DEREGISTER_WAIT)
        except Exception as exc:  # noqa: BLE001 - its row is reaped as a dead node's
            log.warning("leaving the registry failed (%s: %s); its row goes once another "
                        "node finds this one gone", type(exc).__name__, exc)
        finally:
            self._close_leave_fd()
            if self._bell is not None:
                self._bell.close()
            if self._task_inbox is not None:  # what is left in it, its clients send again
                self.enclave.close_inbox(self._task_inbox)
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("node %s stopped after %d jobs", self.node_id, self.jobs_done)

    # ------------------------------------------------------------------ steps

    def _wait(self) -> None:
        now = time.monotonic()
        if self.finished and now >= self._report_after:
            for w in self.workers:
                if w.outbox:
                    self._flush(w)
            return
        # at most until the next upkeep: a node idle for a long --poll-interval (120 s,
        # on AWS, where no doorbell wakes it) sent no heartbeat, nor extended the
        # messages it held, meanwhile, and dropped out of the live nodes after 30 s
        timeout = min(self.config.poll_interval,
                      max(0.0, self._last_upkeep + self._upkeep_period() - now))
        if self._bell is None and (self.data.active or any(
                w.inflight and w.kill_deadline is None for w in self.workers)):
            # no doorbell rings for a kill request: wake to look for one (_police), else a
            # long task ran on for a whole poll interval after its kill()
            timeout = min(timeout, KILL_LOOK)
        if self.finished:  # results to record once a transient fault has passed
            timeout = min(timeout, max(0.0, self._report_after - now))
        for left in self._leftovers:
            timeout = min(timeout, max(0.0, left.deadline - now))
        if self.adopts_orphans and (self.orphans or self._leftovers):  # their next look
            timeout = min(timeout, max(0.0, self._next_orphan_look - now))
        for w in self.workers:
            if w.kill_deadline is not None:
                timeout = min(timeout, max(0.0, w.kill_deadline - now))
            elif w.inflight and w.inflight[0].started is not None:
                due = w.inflight[0].started + w.inflight[0].header["walltime"] - now
                # and its next memory check: with a long --poll-interval (the doorbell
                # rings for tasks), a task far over the memory limit ran on until the loop
                # woke for something else (the upkeep, every 10 s)
                due = min(due, self._next_memory_check - now)
                # and when the tasks piped behind it are to be taken back (_police; not
                # once past: they wait for a worker that could take them, whose result
                # wakes the node)
                back = w.take_back_at()
                if back is not None and back > now:
                    due = min(due, back - now)
                timeout = min(timeout, max(0.0, due))
        if any(w.taking_back is not None for w in self.workers):
            timeout = min(timeout, KILL_LOOK)  # (until its worker hears it: _take_back)
        if self.config.burst and not self._holding():
            timeout = 0.0
        if self._held:
            timeout = min(timeout, HOLD_RETRY)
        fds: list = [self._wake_r, *(w for w in self.workers if not w.closed)]
        if self._bell is not None:
            fds.append(self._bell)
        if self._task_inbox is not None:
            fds.append(self._task_inbox)
        writing = {w.tasks.fileno(): w for w in self.workers if w.outbox}
        try:
            ready, writable = _ready(fds, list(writing), timeout)
        except InterruptedError:
            return
        for fd in writable:
            self._flush(writing[fd])
        if self._bell is not None and self._bell in ready:
            _drain_socket(self._bell)
            self._rang = True
            self._last_kill_check = 0.0  # a ring may be a kill request: look now
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        elif ready and not self.stopping and self._streaming():
            # Tiny tasks in flight: let a few more results land before one report, instead
            # of a transaction and a client wake-up per result.
            time.sleep(LINGER)

    @staticmethod
    def _flush(w: Worker) -> None:
        try:
            w.flush()
        except OSError:  # the worker is gone: _collect buries it
            w.outbox.clear()

    def _streaming(self) -> bool:
        inflight = sum(len(w.inflight) for w in self.workers)
        return inflight >= 4 and all(w.depth > 2 for w in self.workers if w.inflight)

    def _collect(self) -> None:
        # one select for all workers, idle ones too: whatever a worker writes is read as it
        # comes (a new one's READY, or a message for no task), or _wait's select spins on it
        # (not a pipe closed already: it is always readable, and a select would spin)
        open_ = [w for w in self.workers if not w.closed]
        ready = set(_ready(open_, [], 0)[0]) if open_ else set()
        for w in list(self.workers):
            if w in ready:
                try:
                    messages, _ = w.read_results()
                except OSError:
                    messages, w.closed = [], True
                for data in messages:  # (all of them before anything garbled)
                    if data == READY:
                        w.started_up()
                    elif w.inflight:
                        if not self._finish_from_worker(w, w.task_done(), data):
                            break  # an invalid result: what follows is out of step
                    elif w.kill_deadline is None:  # not ours: a worker that does this is broken
                        log.error("worker %s sent a result for no task: ending it", w.pid)
                        w.kill("WorkerDied", "it sent a result for no task")
                if w.spent and not w.retiring and w.kill_deadline is None:
                    # it has run as many tasks as one of them allowed (max_tasks_per_child):
                    # it exits, and a fresh worker takes its place when one is needed
                    w.retire()
                if w.garbled and w.kill_deadline is None:
                    log.error("worker %s wrote garbage on its result pipe: ending it", w.pid)
                    w.kill("WorkerDied", "the worker wrote something on its result pipe that "
                                         "is not a message (a task that writes on it?)")
                if w.closed and not self._exits(w) and w.kill_deadline is None:
                    # alive with its result pipe closed (a task closed descriptors it did not
                    # open): it can report nothing more
                    log.error("worker %s closed its result pipe: ending it", w.pid)
                    w.kill("WorkerDied", "the worker's result pipe was closed (a task that "
                                         "closes file descriptors it did not open?)")
            if w.taking_back is not None:
                self._take_back(w)
            if w.dead():
                self._bury(w)

    def _could_start_now(self, busy: Worker) -> bool:
        """Whether a task taken back from ``busy`` could start at once: the pool has a
        place with no worker, or an idle worker (of its owner, or one to replace)."""
        return len(self.workers) < self.config.workers or any(
            w is not busy and not w.inflight and w.kill_deadline is None and not w.retiring
            and not w.stop_asked for w in self.workers)

    @staticmethod
    def _heeds_stop(w: Worker, now: float) -> bool:
        """Whether the tasks behind the one ``w`` runs may be taken back (Worker.heeds_stop);
        said once a task, if not."""
        if w.heeds_stop():
            return True
        w.unheeding = w.inflight[0]
        log.info("worker %s has run job %s for %.3g s, but does not catch the node's stop "
                 "request (its task ignores it or leaves it to end the worker, or a request "
                 "was heard already): %s wait for it", w.pid, w.inflight[0].job_id,
                 now - w.inflight[0].started,
                 [t.job_id for t in itertools.islice(w.inflight, 1, None)])
        return False

    def _take_back(self, w: Worker) -> None:
        """The tasks piped behind a long one (_police asked its worker to stop after it):
        pending again, to run on another worker, if this step's read of the worker's
        results, made after the request, has not had that task's result.  The worker
        looks at the request after it sends each result, before it begins the next task:
        it had not ended its task when asked, so it begins none of them (it exits after
        it, and what it runs is recorded once).  Else, it may have begun the next: they
        stay, and its results tell which it ran (the rest come back as it exits, _bury)."""
        head = w.taking_back
        if not (w.inflight and w.inflight[0] is head and len(w.inflight) > 1 and not w.closed
                and not w.garbled and w.kill_deadline is None):
            w.taking_back = None
            return
        # And only once the worker itself has heard the request (pool.Worker.stop_heard):
        # one a handler of the task's own took, the worker never heard, and it would run
        # them too.  Looked at again at each step until then, or until that task ends.
        if w.stop_heard():
            w.taking_back = None
            behind = deque(itertools.islice(w.inflight, 1, None))
            for _ in behind:
                w.inflight.pop()
            self._put_back(behind, unbegun=True)

    @staticmethod
    def _exits(w: Worker) -> bool:
        """Whether a worker whose result pipe closed is exiting (a pipe closes as its
        process ends: wait a moment for that, not for a task that closed it)."""
        try:
            w.proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _finish_from_worker(self, w: Worker, task: Task, data: bytes) -> bool:
        """Record what a worker sent for ``task``; False if it was not a valid result (the
        task failed, the worker is being ended: nothing more it sent is read)."""
        valid = True
        try:
            failed, usage, reason, data = unpack_result(data, task.job_id)
            if task.monitor is not None or task.killed_at_kb:  # a long task: add the
                # node's samples to its usage; one killed for memory, what it was killed at
                usage = _measured(task, usage)
                data = _with_usage(data, usage)  # (the one parse of a result by the node)
            else:
                data = bytes(data)  # (a view of what the worker sent: the one copy of it)
        except ValueError as exc:  # a worker that writes garbage is broken (EnvelopeError too)
            reason = f"the worker sent an invalid result: {exc}"
            data = wire.failure(task.job_id, task.header["n"], "WorkerDied", reason)
            failed, usage = True, None
            if task.monitor is not None:
                usage = task.monitor.merge(None)
                data = _with_usage(data, usage)
            # What it sends next may be this task's own result, out of step: nothing more
            # it sends is read, and it is ended.  The tasks behind this one run again (a
            # kill for a task that has ended: see _bury).
            w.garbled, valid = True, False
            if w.kill_deadline is None:
                w.kill("WorkerDied", reason)
                w.kill_job = task.job_id
            reason = wire.failure_reason("WorkerDied", reason)
        if valid and failed and task.job_id == w.kill_job and w.kill_reason is not None and \
                w.kill_reason[0] in _ENDED_BY_NODE:
            # The node stopped this task (SIGTERM), and it failed within the grace period:
            # what it raised is the signal's doing (a handler, maybe an earlier task's left
            # on the worker, that calls sys.exit(0) or raises KeyboardInterrupt), and the
            # user is told why the task ended, not sent a SystemExit that result() re-raises
            data, reason = _ended_by_node(task, data, reason, usage, w.kill_reason)
            state = JobState.CANCELLED if w.kill_reason[0] == "TaskKilled" else JobState.FAILED
        else:
            state = JobState.FAILED if failed else JobState.COMPLETED
        fin = Finished(task.job_id, state, data, reason, usage)
        if task.staged is not None and self.data.finish_from_worker(task, data, fin):
            if _restricted(task):
                # a worker that held restricted data serves nothing else: what the task left
                # in its memory or files must not leave with a later task's result
                w.retire()
            return valid  # egress checks, then outputs, in node/datasteps.py
        self._queue_finish(task, task.delivery, fin, task.header["client"])
        return valid

    def _queue_finish(self, task: Task | None, delivery: Delivery, fin: Finished, client: str) -> None:
        if task is not None:
            if task.ended:
                # ended already: killed in a worker's pipe (_kill_piped), and begun by the
                # worker all the same, which reports it too.  Its job stays as first
                # recorded, and it is one job done, not two (--max-jobs)
                return
            task.ended = True
        self.finished.append((task, delivery, fin, client))

    def _bury(self, w: Worker) -> None:
        """A worker is gone: fail the task it was running, re-queue the ones it had not begun."""
        # results it managed to write before dying still count
        try:
            messages, _ = w.read_results()
        except OSError:
            messages = []
        for data in messages:
            if data == READY:  # (it started up, and died before _collect heard so)
                w.started_up()
            elif w.inflight and not self._finish_from_worker(w, w.task_done(), data):
                break
        code = w.proc.wait()
        self._leftovers.append(w.leftovers())
        self._look_for_orphans_soon()
        if w.inflight and w.stopped_as_asked(code):
            # none of these began: they run again, on this node or, when it is stopping,
            # on another
            log.info("worker %s stopped before %s began", w.pid, [t.job_id for t in w.inflight])
            self._put_back(w.inflight, unbegun=True)
        if w.inflight and w.kill_reason is not None and w.inflight[0].job_id != w.kill_job:
            # killed for a task that ended meanwhile (its result is recorded; the kill went
            # on, to end its whole process tree): the head began after it and died for
            # nothing; it runs again (as after a node's death), with the tasks behind it.
            # Those it never began (as below: one task after another, its results up to
            # the head read), as never begun: released counted by a stopping node, their
            # jobs left in processing, `--max-deliveries 1` dead-lettered them
            log.info("worker %s was killed for job %s, after it ended: running %s again",
                     w.pid, w.kill_job, [t.job_id for t in w.inflight])
            head = deque([w.inflight.popleft()])
            self._put_back(w.inflight, unbegun=not w.ready or not w.garbled)
            self._put_back(head)  # (after: first again in pending, before those behind it)
        runs = None
        if w.inflight:
            try:
                runs = self._running_elsewhere([w.inflight[0].job_id])[0].get(
                    w.inflight[0].job_id)
            except Exception:  # noqa: BLE001 - a read that failed (throttled) must not end
                # the node: the copy's end is recorded, as before
                log.debug("could not look whether another node runs job %s",
                          w.inflight[0].job_id, exc_info=True)
        if runs and runs != self.node_id:
            # Another live node runs the job now: it took the message over while this
            # node stalled past the visibility timeout (stopped, a laptop asleep).  How
            # this copy ended (its worker killed, its walltime or memory) is not the job's
            # end, which that node's copy makes: recorded, it failed the job under that
            # copy (WorkerDied for a task that then succeeded there, its result dropped).
            # (Not acked: its receipt is out of date, the message taken over, and SQS may
            # delete a message by an old receipt, the one that node holds: should it die
            # then, nothing would deliver the job again.  A second message of the job,
            # this copy's own, comes back, and is taken for the duplicate it is.)
            head = w.inflight.popleft()
            log.warning("worker %s for job %s ended; not recorded: node %s runs the job now",
                        w.pid, head.job_id, runs)
            if head.staged is not None:
                self.data.discard(head)
            self._put_back(w.inflight, unbegun=not w.ready or not w.garbled)
        if w.inflight:
            head = w.inflight.popleft()
            stdout, stderr = w.output()
            if w.kill_reason:
                etype, message = w.kill_reason
            else:
                etype = "WorkerDied"
                message = _death_message(code, started=w.ready)
            sig = -code if code < 0 else None
            data = wire.failure(
                head.job_id, head.header["n"], etype, message,
                stdout=stdout, stderr=stderr, exitcode=code, signal=sig,
            )
            state = JobState.CANCELLED if etype == "TaskKilled" else JobState.FAILED
            usage = _unreported_usage(head)
            if usage is not None:
                data = _with_usage(data, usage)
            fin = Finished(head.job_id, state, data, wire.failure_reason(etype, message), usage)
            # a task with data: its output too is checked for egress, its directory removed
            if head.staged is None or not self.data.finish_from_worker(head, data, fin):
                self._queue_finish(head, head.delivery, fin, head.header["client"])
            # Behind the head: a worker that never started up began none of them, nor did
            # one that died under its head (it runs one task after another, and its results
            # up to the head are read), unless what it sent was garbled (out of step).  A
            # stopping node hands them back uncounted: released counted, their jobs left
            # in processing, `--max-deliveries 1` dead-lettered tasks that never ran.
            self._put_back(w.inflight, unbegun=not w.ready or not w.garbled)
            log.warning("worker %s for job %s ended: %s", w.pid, head.job_id, message)
        w.close()
        self.workers.remove(w)

    def _look_for_orphans_soon(self) -> None:
        """A worker went: what its tasks left with the node is looked for now, not at the
        next regular look (pool.Orphans)."""
        self._next_orphan_look = min(self._next_orphan_look, time.monotonic() + ORPHAN_LOOK_SOON)

    def _put_back(self, inflight: deque[Task], *, unbegun: bool = False) -> None:
        """The tasks a dead worker held, which run again: on this node, or, if it is
        stopping, on another (released now); but not those killed meanwhile (finished
        already).  ``inflight`` is emptied.  ``unbegun``: the worker certainly began none
        of them; a stopping node moves their jobs back to pending and hands them back
        uncounted (:meth:`_unstage`), else a few node restarts dead-lettered tiny tasks
        that never ran, released counted from a worker's pipe at each."""
        tasks = [t for t in inflight if not t.kill_requested]
        inflight.clear()
        for t in tasks:
            t.started, t.monitor, t.unbegun, t.put_back = None, None, unbegun, True
        if self.stopping:
            unstaged = self._unstage(tasks)
            self.enclave.queue.hand_back([t.delivery for t in tasks if id(t) in unstaged])
            self.enclave.queue.release([t.delivery for t in tasks if id(t) not in unstaged])
        else:
            self.pending.extendleft(reversed(tasks))

    def _report(self) -> None:
        if not self.finished or time.monotonic() < self._report_after:
            return
        batch, self.finished = self.finished, []
        replies: list[tuple[str, str, bytes]] = []
        try:
            with self.enclave.atomic():
                recorded = set(self.enclave.jobs.finish([fin for _, _, fin, _ in batch]))
                unanswered = set(recorded)  # (a job twice in a batch: its first is recorded)
                for _, _, fin, client in batch:
                    if fin.job_id in unanswered:
                        unanswered.discard(fin.job_id)
                        body = fin.result if len(fin.result) <= REPLY_INLINE_LIMIT else b""
                        replies.append((client, fin.job_id, body))
                self.enclave.queue.ack([d for _, d, _, _ in batch])
        except Exception as exc:
            self._transient("report", exc)
            # A transient fault (throttling past the backend's retries, a 5xx, a timeout):
            # nothing is acked, the results are kept and recorded at a later try (a
            # finish that was made counts once: the job table's conditions), and their
            # messages are extended meanwhile (_upkeep).  The node does not die of it.
            self.finished[:0] = batch
            self._report_tries += 1
            delay = min(REPORT_RETRY_MAX, REPORT_RETRY * 2 ** (self._report_tries - 1))
            self._report_after = time.monotonic() + delay
            log.warning("recording %d results failed (%s: %s); trying again in %.2g s",
                        len(batch), type(exc).__name__, exc, delay)
            return
        self._report_tries = 0
        self._failing.pop("report", None)
        for client, job_id, body in replies:
            self._reply(client, [(job_id, body)])
        self._delete_later += [key for t, _, fin, _ in batch
                               if t is not None and fin.job_id in recorded
                               for key in t.header.get("refs", {}).values()]
        self.jobs_done += len(batch)

    def _reply(self, client: str, items: list[tuple[str, bytes]]) -> None:
        """Reply to a client at the end of the step (see _wake_clients)."""
        self._replies_later.setdefault(client, []).extend(items)

    def _police(self) -> None:
        now = time.monotonic()
        running = {w.inflight[0].job_id: w for w in self.workers if w.inflight and w.kill_deadline is None}
        if now - self._last_kill_check >= min(KILL_LOOK, self.config.poll_interval):
            self._last_kill_check = now
            # claimed, not running: staged (or staging), or back from a worker that died
            staging = {t.job_id: t for t in self.pending if t.claimed}
            staging.update(self.data.active)
            # piped to a worker behind the task it runs (processing, so cancel() fails)
            piped = {t.job_id: (w, t) for w in self.workers if w.kill_deadline is None
                     for t in itertools.islice(w.inflight, 1, None) if not t.kill_requested}
            ids = [*running, *staging, *piped]
            # (one that failed is made again at the next look, a quarter of a second later)
            _, kills = self._tolerant("looking for kill requests",
                                      lambda: self.enclave.jobs.kill_requested(ids) if ids else ())
            for job_id in kills or ():
                if job_id in running:
                    running[job_id].kill("TaskKilled", f"job {job_id} was killed on request")
                elif job_id in piped:
                    self._kill_piped(*piped[job_id])
                else:
                    self._kill_staging(staging[job_id])
        if self._leftovers:
            for left in [x for x in self._leftovers if now >= x.deadline]:
                left.kill()
                self._leftovers.remove(left)
        if self.adopts_orphans and now >= self._next_orphan_look:
            self.orphans.sweep(self.workers, now, building=self.envs.building())
            soon = self._leftovers or self.orphans  # a worker went: its orphans come now
            self._next_orphan_look = now + (ORPHAN_LOOK_SOON if soon else ORPHAN_LOOK)
        for w in self.workers:
            if w.kill_deadline is not None:
                w.escalate()
                continue
            if w.slow_to_start(now):  # (an idle one too: it would fail the task it gets)
                what = f" for job {w.inflight[0].job_id}" if w.inflight else ""
                w.kill(
                    "WorkerDied",
                    f"the worker process{what} did not start within "
                    f"{_minutes(pool.STARTUP_LIMIT)}",
                )
                continue
            if w.stop_asked and not w.inflight and not w.tasks.closed:
                # It has reported every task it had and should be exiting.  One that did
                # not hear the request (a task's own handler took the signal) would wait
                # for tasks it is never sent, and hold its place: the end of its pipe
                # tells it too.
                w.tasks.close()
            if w.inflight and w.inflight[0].started is not None:
                head = w.inflight[0]
                limit = head.header["walltime"]
                if now - head.started > limit:
                    w.kill(
                        "WalltimeExceeded",
                        f"job {head.job_id} exceeded its walltime of {_minutes(limit)}",
                    )
            if not self.stopping and (due := w.take_back_at()) is not None and now >= due and (
                    self._could_start_now(w)) and self._heeds_stop(w, now):
                # Tasks piped behind a long one, while another worker could run them: the
                # worker is asked to stop after its task, so that it begins none of them,
                # and they are taken back once a read of its results shows that it had not
                # ended its task when asked (_take_back, at the next step's _collect)
                log.info("worker %s has run job %s for %.3g s: taking back %s", w.pid,
                         w.inflight[0].job_id, now - w.inflight[0].started,
                         [t.job_id for t in itertools.islice(w.inflight, 1, None)])
                w.stop_after_current()
                w.taking_back = w.inflight[0]
                self.request_wake()
        if now >= self._next_memory_check:
            self._check_memory(now)

    def _kill_piped(self, w: Worker, task: Task) -> None:
        """A kill request for a task waiting in a worker's pipe: it is cancelled now, and
        the worker, asked to stop after the task it runs, never begins it (the others
        behind it run again, see _bury).  Should the worker have begun it meanwhile, the
        job stays cancelled: its result is not recorded."""
        # (claimed by this node, never begun: no attempt, no start in its record)
        self._end_killed(task, "while queued for a worker; it never ran", unbegun=True)
        if w.taking_back is None and len(w.inflight) > 2 and w.heeds_stop():
            # The others behind go back as the worker hears this request (_take_back), as at
            # a take-back: heard, it showed as one a task keeps from it (Worker.heeds_stop),
            # and they waited for the task it runs, however long, another worker free
            w.taking_back = w.inflight[0]
        w.stop_after_current()

    def _end_killed(self, task: Task, when: str, *, unbegun: bool = False) -> None:
        """Record a task killed before a worker began it (and never put it back);
        ``unbegun``: this node's claim of it was no attempt (Finished.unbegun)."""
        task.kill_requested = True
        self.data.kill(task, when, unbegun=unbegun)

    def _kill_staging(self, task: Task) -> None:
        """A kill request for a task that has not reached a worker: it never runs (one in
        a staging thread ends when the thread does, in DataSteps.collect)."""
        if task.job_id in self.data.active:
            task.kill_requested = True
            return
        self.pending.remove(task)
        # (staged, never given a worker, or back from one that never began it: this node's
        # claim was no attempt, and it showed one, with a start, for a task that never ran)
        self.data.kill(task, unbegun=task.claimed and (task.unbegun or not task.put_back))

    def _check_memory(self, now: float) -> None:
        """Kill the tasks whose process tree uses more than the memory limit (only tasks
        that have run for MEMORY_MIN_AGE; at most every MEMORY_CHECK_INTERVAL): the RSS
        summed over the tree first (cheap), and only if that is over, the PSS (see
        monitor.tree_pss), which must be over too."""
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        daemons: dict[str, list[int]] | None = None
        pss_read, self._pss_read = self._pss_read, {}  # (only running tasks' stay)
        kids: dict[int, list[int]] | None = None  # (one scan of the process table for all)
        for w in self.workers:
            if not w.inflight or w.kill_deadline is not None:
                continue
            head = w.inflight[0]
            if head.started is None or now - head.started < MEMORY_MIN_AGE:
                continue
            if kids is None:
                kids = children_map()
            got = read_tree(w.pid, kids)
            if got is None:
                continue
            rss = got[1]
            roots = [w.pid]
            if self.adopts_orphans:
                # what its tasks started out of its tree (a daemon: re-parented to the
                # node, a subreaper) is theirs too, as a kill ends it (Worker.kill)
                if daemons is None:
                    daemons = pool.adopted_by_worker()
                for pid in daemons.get(w.mark, ()):
                    if pid == w.pid:  # (the worker has its own mark: counted above)
                        continue
                    more = read_tree(pid, kids)
                    rss += more[1] if more is not None else 0
                    roots.append(pid)
            if rss <= self.memory_limit:
                continue
            last = pss_read.get(head.job_id)
            if last is not None:
                when, rss_then, used_then, cost = last
                grew = rss - rss_then > self.memory_limit - used_then
                spacing = MEMORY_PSS_SPACING_GREW if grew else MEMORY_PSS_SPACING
                if now < when + spacing * cost:
                    self._pss_read[head.job_id] = last
                    continue
            # The RSS sum counts a page shared by k processes of the tree k times (a
            # task's children forked after it filled an array, a multiprocessing pool):
            # a task well under the limit seemed over it.  PSS shares each page out.
            began = time.monotonic()
            used, exact = tree_pss(roots, kids)
            if used <= self.memory_limit:
                self._pss_read[head.job_id] = (now, rss, used, time.monotonic() - began)
                continue
            what = ("proportional set size (PSS) of its anonymous and shared memory" if exact
                    else "PSS of its anonymous and shared memory, RSS where PSS could not "
                         "be read")
            limit_mb = self.memory_limit // (1024 * 1024)
            head.killed_at_kb = used // 1024  # (its usage's peak: see _unreported_usage)
            w.kill(
                "MemoryLimitExceeded",
                f"job {head.job_id} used {used / (1024 * 1024):.0f} MB ({what}, summed "
                f"over its process tree), over the memory limit of {limit_mb} MB per "
                f"task on queue {self.queue}",
            )

    def _room(self) -> int:
        """How many more tasks the node takes: enough to keep its workers' pipes full while
        tasks are tiny, else only what its workers can start soon (_holds), so that a task
        does not wait here behind a long one while another node of the queue is idle; and
        with ``max_jobs``, no more than it has left to run (what it holds and what it has
        run count), so that it never receives a task it would not start."""
        held = sum(len(w.inflight) for w in self.workers) + len(self.data.active) + len(
            self.pending)
        if self.workers and all(w.depth > 2 for w in self.workers):
            cap = self.config.workers * 160  # 64 in each pipe, and as many waiting
        else:  # (a place with no worker yet: one task, of a length not known)
            cap = sum(map(_holds, self.workers)) + max(0, self.config.workers - len(self.workers))
            cap += self.config.prefetch * self.config.workers
        # (not the tasks that ran and upload their outputs: they hold no worker, and a
        # node of long tasks took no other for as long as an upload lasted, its workers idle)
        room = cap - (held - self.data.ran())
        if self.config.max_jobs is not None:
            left = self.config.max_jobs - self.jobs_done - len(self.finished) - held
            room = min(room, left)
        return room

    def _receive(self) -> None:
        room = self._room()
        if self._poller is not None:
            self._room_hint = room
            self._backlogged = len(self._inbox) > room
            first = len(self.pending)
            batch = []
            while self._inbox and room > 0:
                batch.append(self._inbox.popleft())
                room -= 1
            for d in self._watch_running(self._ours_again(batch)):
                self._accept(d)
            self._refuse_foreign(first)
            return
        if room <= 0:
            return
        ask = min(room, 500)
        deliveries = self.enclave.queue.receive(
            self.queue, ask, self.config.visibility_timeout, self.node_id
        )
        self._backlogged = len(deliveries) == ask  # the queue has more than we took
        first = len(self.pending)
        for d in self._watch_running(self._ours_again(deliveries)):
            self._accept(d)
        self._refuse_foreign(first)

    def _ours_again(self, deliveries: list[Delivery], *, every: bool = False) -> list[Delivery]:
        """A message this node still holds, received again (it stayed hidden no longer
        than its visibility timeout: the node was stalled, or SQS delivered it twice), is
        not a second task: the task held takes the new delivery, whose receipt is the one
        that now extends and acks the message, and the delivery is not taken again.
        (Taken, it ran the job twice; or, dropped as a copy, its ack deleted the message
        the running task still needed.)  ``every``: look for the held task of every
        delivery, not only of those counted as redeliveries."""
        if not deliveries:
            return deliveries
        # one delivery a message, the latest: a batch may hold two (an SQS duplicate, or
        # the poller's fetch of a message whose earlier delivery waited in its inbox).
        # The later in the batch, unless its count is lower (SQS's is approximate)
        latest: dict[tuple[str, str], Delivery] = {}
        for d in deliveries:
            key = (d.message_id, d.job_id)
            if d.message_id and (key not in latest or d.receive_count >= latest[key].receive_count):
                latest[key] = d
        # a message received again shows it (held tasks are many on a big node: looked
        # at only then; an SQS duplicate counted 1 is a copy to claim(), see its notes)
        held = {}
        if every or any(d.receive_count > 1 for d in deliveries):
            held = {(t.delivery.message_id, t.job_id): t for t in self._held_tasks()
                    if t.delivery.message_id}
        out = []
        for d in deliveries:
            key = (d.message_id, d.job_id)
            if not d.message_id:
                out.append(d)
            elif latest[key] is not d:  # its later delivery stands for it (and acks it)
                log.warning("job %s: its message came twice in one batch", d.job_id)
            elif (t := held.get(key)) is None:
                out.append(d)
            else:
                log.warning("job %s: its message came again while this node holds it "
                            "(delivery %d); the task held takes the new receipt",
                            d.job_id, d.receive_count)
                t.delivery = d
        return out

    def _held_tasks(self) -> list[Task]:
        """The tasks this node holds: waiting, staging, or in a worker's pipe."""
        return [*self.pending, *(t for w in self.workers for t in w.inflight),
                *self.data.active.values()]

    def _refuse_foreign(self, first: int) -> None:
        """The tasks just accepted (``pending[first:]``) whose job is another owner's are
        dead-lettered and audited, neither run nor failed: a user with a valid token of
        their own, and the id (or a copy of the message) of someone else's job, signed a
        task for it, to have their result recorded as the job's, or their code run on its
        arguments.  The job's own task runs as if nothing happened."""
        fresh = [t for t in itertools.islice(self.pending, first, None) if not t.adopted]
        if not fresh:  # (an adopted task's record was written from its own envelope)
            return
        owners = self.enclave.jobs.owners([t.job_id for t in fresh])
        for t in fresh:
            owner = owners.get(t.job_id)
            if owner is None or owner == t.owner:  # (no record: the claim finds none)
                continue
            self.pending.remove(t)
            reason = (f"job {t.job_id} is {owner}'s: a task for it signed by {t.owner} "
                      f"does not run")
            log.warning("dead-lettering: %s", reason)
            self.enclave.queue.dead_letter([t.delivery], reason)
            self._audit_later.append(dict(
                action="task-rejected", user=str(t.owner), allowed=False, job_id=t.job_id,
                detail=f"node {self.node_id}: {reason}",
            ))

    def _poll_queue(self) -> None:
        """Long-poll the queue for backends without doorbells; hand deliveries to the loop."""
        idle = threading.Event()
        while not self.stopping:
            room = self._room_hint - len(self._inbox)
            if room <= 0:
                idle.wait(0.05)
                continue
            try:  # ten at a time (one call's worth); the loop keeps what it cannot run yet
                got = self.enclave.queue.receive(
                    self.queue, min(10, room), self.config.visibility_timeout, self.node_id,
                    wait_seconds=self.config.long_poll,
                )
            except Exception:  # noqa: BLE001 - keep polling; the backend retries itself
                log.exception("receiving from queue %s failed", self.queue)
                idle.wait(1.0)
                continue
            if self.stopping:
                self.enclave.queue.release(got)
                return
            if got:
                self._inbox.extend(got)
                self._room_hint -= len(got)
                self.request_wake()

    def _close_task_inbox(self) -> None:
        """Take no more hand-offs (the node is stopping): later ones find no inbox, and
        their clients queue them; the tasks already in it are recorded and queued for any
        node, so that none waits for its client to notice."""
        sock, self._task_inbox = self._task_inbox, None
        if sock is None:
            return
        jobs = self._unadopted + self._parse_handed(self.enclave.close_inbox(sock, drain=True))
        self._unadopted = []
        if jobs:
            with self.enclave.atomic():
                self._adopt(jobs)
            self.enclave.ring_nodes(self.queue)

    def _handed_tasks(self) -> list[tuple[NewJob, dict]]:
        """The tasks clients handed this node directly.  One whose envelope does not parse
        names no job that can be trusted: it is dropped (its client, finding no record of
        its job, queues it, and the queue path dead-letters it)."""
        if self._task_inbox is None:
            return []
        return self._parse_handed(self.enclave.read_inbox(self._task_inbox))

    def _parse_handed(self, bodies: list[bytes]) -> list[tuple[NewJob, dict]]:
        jobs = []
        for body in bodies:
            try:
                header = wire.peek_header(body)
                if header["kind"] != "task" or header["queue"] != self.queue:
                    raise EnvelopeError(f"it is not a task of queue {self.queue}")
            except EnvelopeError as exc:
                log.warning("dropping a task handed to this node: %s", exc)
                continue
            job = NewJob(
                header["job_id"], header["owner"], header["client"], header["queue"],
                header["fn"], header["walltime"], body, header["n"],
            )
            jobs.append((job, header))
        return jobs

    def _adopt(self, jobs: list[tuple[NewJob, dict]]) -> None:
        """Record handed-off jobs, held by this node while it has room (else queued for
        any node), and accept them as a queued task is accepted: one whose signature or
        token fails is refused, its job failed in this same transaction."""
        for job, header in jobs:
            hold = not self.stopping and self._room() > 0
            try:
                d = self.enclave.adopt(
                    job, self.config.visibility_timeout, self.node_id if hold else None
                )
            except (OverflowError, ValueError, TypeError) as exc:  # a number SQLite cannot hold
                log.warning("dropping a task handed to this node (job %s): %s", job.job_id, exc)
                continue
            if d is not None:
                self._accept(d, header)
            elif not hold:  # queued now: for any node of the queue, this one included
                self._ring_queue = True
            else:
                log.info("not taking handed-off job %s: it is recorded already", job.job_id)
                if header.get("refs"):  # cancelled before this node read it: it never
                    r = self.enclave.jobs.get(job.job_id)  # runs, its blobs go
                    if r is not None and r.state.final:
                        self._delete_later += [f"{s}-{job.job_id}" for s in TASK_SECTIONS]

    def _accept(self, d: Delivery, header: dict | None = None) -> None:
        """Take one delivery; one that breaks our checks in an unforeseen way is
        dead-lettered as corrupt, so that it cannot stop the node (or every node)."""
        try:
            self._accept_one(d, header)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            log.exception("cannot accept job %s", d.job_id)
            self._reject(d, "CorruptTask", f"job {d.job_id} has a corrupt task message: "
                                           f"{type(exc).__name__}: {exc}")

    def _accept_one(self, d: Delivery, header: dict | None = None) -> None:
        """``header``: of a handed-off task, parsed already."""
        adopted = header is not None
        if d.receive_count > self.config.max_deliveries:
            # counted as `kotta dead-letters` counts them (DELIVERIES): this one too
            most = self.config.max_deliveries
            reason = (f"job {d.job_id} was delivered {d.receive_count} times without "
                      f"completing (over this node's --max-deliveries of {most})")
            self._reject(d, "DeliveryFailed", reason, started_too=True)
            return
        if d.fault:  # (its body kept elsewhere, gone or refused: nothing to read)
            self._reject(d, "CorruptTask", f"job {d.job_id} has a task message that cannot be "
                                           f"read: {d.fault}")
            return
        if header is None:
            try:
                header = wire.peek_header(d.body)
                if header["kind"] != "task" or header["job_id"] != d.job_id:
                    raise EnvelopeError("the message is not the task of the job it names")
            except (EnvelopeError, KeyError, ValueError) as exc:
                # nothing in it can be verified, yet it fails the job it names: audited,
                # as a forged signed task is (_refuse), for whoever looks into that job
                self._audit_later.append(dict(
                    action="task-rejected", user="?", allowed=False, job_id=d.job_id or None,
                    detail=f"node {self.node_id}, not verified: a message that is not a "
                           f"task envelope of its job: {exc}",
                ))
                if (version := wire.newer_version(d.body)) is not None:
                    # a client upgraded before this node: not damage in transit, as
                    # "corrupt" said, but a node to upgrade
                    self._reject(d, "TaskRejected", (
                        f"job {d.job_id} was refused by the node {self.node_id}: its task is"
                        f" of wire format version {version}, from a newer kotta-executor"
                        f" than the node's (which reads {', '.join(map(str, wire.READABLE_VERSIONS))});"
                        f" upgrade the node's kotta-executor to the client's version"))
                    return
                self._reject(d, "CorruptTask", f"job {d.job_id} has a corrupt task message: {exc}")
                return
        try:  # who sent it: the signature over the whole envelope, the token behind it
            claims = self.verifier.verify(d.body, header, d.sent)
        except AuthenticationError as exc:  # (signer: who signed it, if that verified)
            self._refuse(d, header, str(exc), getattr(exc, "signer", None))
            return
        self._note_client(header)
        try:
            if declares_data(header):
                declared(header.get("inputs") or (), header.get("outputs") or ())
        except InvalidDataUri as exc:
            self._reject(d, "CorruptTask", f"job {d.job_id} declares bad data: {exc}",
                         owner=header["owner"])
            return
        try:
            data = d.body
            refs = header.get("refs")
            if refs:  # sections too big for a message: fetch them (as bytes)
                data = self._fetch_refs(d, header, refs)
        except (EnvelopeError, KeyError, ValueError) as exc:
            if isinstance(exc, KeyError) and self._dropped_as_ended(d, header):
                return
            self._reject(d, "CorruptTask", f"job {d.job_id} has a corrupt task message: {exc}",
                         owner=header["owner"])
            return
        except OSError as exc:
            # a blob there but unreadable (another user's file, a directory in its place,
            # a disk error): raised, it ended the node, and every node after it that
            # received the task, until the executor gave up on them all
            self._reject(d, "CorruptTask", f"job {d.job_id} has a task section that cannot be "
                                           f"read from the enclave's blobs: {exc}",
                         owner=header["owner"])
            return
        asked, each = header["walltime"], header.get("walltime_each")
        if each is not None and (type(each) not in (int, float) or not 0 < each <= asked):
            self._reject(d, "CorruptTask", f"job {d.job_id} has a corrupt task message: "
                                           f"walltime_each {each!r} is not a walltime",
                         owner=header["owner"])
            return
        if asked > self.max_walltime and each is not None and each <= self.max_walltime:
            # map items the executor packed, each within this node's cap, their sum not:
            # the task runs, as long as the cap allows
            log.info("job %s: %s packed items, the task's walltime held to this node's "
                     "cap of %s", d.job_id, header["n"], _minutes(self.max_walltime))
            header["walltime"] = asked = self.max_walltime
        if asked > self.max_walltime:  # a client that skipped the check: refused (its
            # job fails once claimed, in _dispatch, after the owner check)
            reason = (
                f"job {d.job_id} asks for a walltime of {_minutes(asked)}, over "
                f"the cap of {_minutes(self.max_walltime)} of this node (queue {self.queue})"
            )
            log.warning("refusing: %s", reason)
            self.pending.append(Task(d, header, b"", claims=claims, adopted=adopted,
                                     refusal=("JobFailed", reason)))
            self._refusals = True
            return
        self.pending.append(Task(d, header, data, claims=claims, adopted=adopted))

    def _dropped_as_ended(self, d: Delivery, header: dict) -> bool:
        """Drop (as :meth:`drop` does) a task whose blob is gone if its job has ended: one
        cancelled while its queue had no node, whose blobs the nodes' sweep deleted a day
        on, or a second copy of a task whose first a node dropped, deleting them.  It was
        dead-lettered as a corrupt task ("no blob"), and listed so by `kotta dead-letters`
        though its user had cancelled it.  (Read only as a fetch fails: not per task.)"""
        try:
            job = self.enclave.jobs.get(d.job_id)
        except Exception:  # noqa: BLE001 - a transient fault: rejected as before
            return False
        if job is None or not job.state.final or job.owner != header["owner"]:
            return False  # (another owner's: rejected, and audited, as before)
        log.info("job %s is %s, and its task's blobs are gone: dropped", d.job_id, job.state)
        self.enclave.queue.ack([d])
        self._reply(header["client"], [(d.job_id, b"")])
        return True

    def _fetch_refs(self, d: Delivery, header: dict, refs) -> bytes:
        """The task with its big sections fetched from blobs, each checked against the
        SHA-256 the (signed) header carries."""
        digests = header.get("digests") or {}
        if not isinstance(refs, dict) or not isinstance(digests, dict):
            raise EnvelopeError("the task's refs are malformed")
        sections = dict(wire.decode(d.body).sections)
        for name, key in refs.items():
            if key != f"{name}-{d.job_id}":  # a task fetches its own sections, nothing else
                raise EnvelopeError(f"the section {name!r} refers to a blob not of this job")
            try:
                blob = self.enclave.blobs.get(key)
            except Exception as exc:
                if self.enclave.lasting(exc) and not isinstance(exc, KottaError):
                    # refused for this object (AWS: AccessDenied, a bucket policy or a KMS
                    # key the node's role may not use): raised, it ended the node, and each
                    # node after it that received the task.  As an unreadable file's
                    # OSError, it fails this task alone (CorruptTask, in _accept_one)
                    raise PermissionError(f"the blob {key}: {exc}") from exc
                raise
            if digests.get(name) != wire.digest(blob):
                raise EnvelopeError(f"the section {name!r} in blob {key} was altered")
            sections[name] = blob
        sections.pop(wire.MAC_SECTION, None)
        head = {k: v for k, v in header.items() if k not in ("refs", "digests")}
        return wire.encode(head, sections)

    def _refuse(self, d: Delivery, header: dict, why: str, signer: str | None = None) -> None:
        """A task whose sender could not be verified: dead-lettered, audited, and its job
        (if it has one, not yet final) failed with TaskRejected; but not a job of another
        user's than ``signer``, whose valid signature it bears (a token revoked or expired
        since, an owner named falsely)."""
        owner = header.get("owner")
        # audited after the step's transaction: a record written inside it and rolled back
        # would leave a gap in the audit chain (a false "deleted record")
        self._audit_later.append(dict(
            action="task-rejected", user=str(owner), allowed=False, job_id=d.job_id,
            detail=f"node {self.node_id}, claimed owner not verified: {why}",
        ))
        self._reject(d, "TaskRejected", f"job {d.job_id} was refused by the node: {why}",
                     owner=signer, audited=True)

    def _reject(self, d: Delivery, etype: str, reason: str, *, started_too: bool = False,
                owner: str | None = None, audited: bool = False) -> None:
        """Dead-letter a delivery, and fail its job with ``reason``.  A first delivery
        fails only a job still pending, unless ``started_too``: one that fails the checks
        and names a job a node has started (a copy of its task queued again, refused for
        a token revoked meanwhile; or a forgery naming it) must not end that job under
        the node that runs it.  A redelivery does (its node died or let it go: nothing
        else would end it), and so does a delivery count gone over the limit.
        ``owner``: who verifiably sent it; a job of another owner's is not failed (a task
        signed by one user must not end another's job, as in _refuse_foreign), and the
        refusal is audited, unless the caller has (``audited``).

        The job is failed before its message goes: a transient fault in either (throttling
        past the backend's retries) leaves the message to come again, and the node on."""
        log.warning("dead-lettering: %s", reason)
        try:
            self._fail_rejected(d, etype, reason, started_too, owner, audited)
            self.enclave.queue.dead_letter([d], reason)
        except Exception as exc:
            self._transient("reject", exc)
            log.warning("rejecting job %s's message failed (%s: %s); it comes again",
                        d.job_id, type(exc).__name__, exc)
            return
        self._failing.pop("reject", None)

    def _fail_rejected(self, d: Delivery, etype: str, reason: str, started_too: bool,
                       owner: str | None, audited: bool) -> None:
        job = self.enclave.jobs.get(d.job_id)
        if job is None:
            return
        if owner is not None and job.owner != owner:
            log.warning("job %s is %s's, not %s's: the rejected message does not fail it",
                        d.job_id, job.owner, owner)
            if audited:
                return
            self._audit_later.append(dict(
                action="task-rejected", user=str(owner), allowed=False, job_id=d.job_id,
                detail=f"node {self.node_id}: a task for {job.owner}'s job, rejected: {reason}",
            ))
            return
        if not started_too and d.receive_count <= 1 and job.state != JobState.PENDING:
            log.warning("job %s is %s: the rejected message does not fail it", d.job_id, job.state)
            return
        data = wire.failure(d.job_id, job.n, etype, reason)
        fin = Finished(d.job_id, JobState.FAILED, data, wire.failure_reason(etype, reason))
        if self.enclave.jobs.finish([fin]):
            self._reply(job.client, [(d.job_id, data)])
            # it never runs now: its big sections go (named by the job: the header of
            # a rejected task may not parse)
            self._delete_later += [f"{section}-{d.job_id}" for section in TASK_SECTIONS]

    def _dispatch(self) -> tuple[dict[Worker, list[Task]], list[Task]]:
        """Pick a worker for each pending task and claim the jobs (pending -> processing);
        jobs this transaction recorded are returned to claim once handed out."""
        frames: dict[Worker, list[Task]] = {}
        if not self.pending:
            return frames, []
        plan: list[tuple[Task, Worker]] = []
        load = {  # not a worker on its way out: what it is sent would only come back
            w: len(w.inflight) for w in self.workers
            if w.kill_deadline is None and not w.retiring and not w.stop_asked
        }
        # Several tasks per worker pipe only with a real backlog: a few tasks that arrive
        # together may include long ones, and must not wait behind them (nor stop being
        # cancellable) while another worker could take them.
        deep = self._backlogged or len(self.pending) >= 4 * self.config.workers
        caps = {w: w.depth if deep else 1 for w in load}
        skipped: deque[Task] = deque()
        to_stage: list[Task] = []
        refused: list[Task] = []  # failed once claimed (below), with the tasks to run
        #: each worker's max_tasks before this plan gave it a limit (restored for a task
        #: that is not sent after all: lost, or killed, below)
        limited: dict[Worker, int | None] = {}
        if self._refusals:  # refused as received: from all of pending, not only the part
            self._refusals = False  # read before the loop finds no worker free
            refused = [t for t in self.pending if t.refusal is not None]
            self.pending = deque(t for t in self.pending if t.refusal is None)
        while self.pending:
            task = self.pending.popleft()
            if task.staged is None and declares_data(task.header):
                to_stage.append(task)  # its data first (node/datasteps.py)
                continue
            problem = None if task.staged is not None else self.verifier.standing(task.claims)
            if problem:  # held here since before a revocation: it never runs (a staged
                # task's standing is checked by still_allowed, with its data's)
                task.refusal = ("TaskRejected", f"job {task.job_id} was refused by the node: "
                                                f"{problem}; it never ran")
                self._audit_later.append(dict(
                    action="task-rejected", user=task.owner, allowed=False, job_id=task.job_id,
                    detail=f"node {self.node_id}, held since before: {problem}",
                ))
                refused.append(task)
                continue
            env = None
            if task.header.get("requirements"):
                status, env = self.envs.get(task.header["requirements"])
                if status == "building":  # stays pending (cancellable); the build wakes us
                    skipped.append(task)
                    continue
                if status == "fault":  # the node's own, building it: the task waits
                    self._env_fault(env)
                    skipped.append(task)
                    continue
                if self.envs.ended != self._env_ended:  # a build has ended since: passed
                    # (not a set's env ready long before: the fault's clock was set back,
                    # its warning logged again, by each task of another set)
                    self._env_fault(None)
                if status == "failed":
                    task.refusal = ("RequirementsError", f"job {task.job_id}: installing "
                                                         f"its requirements failed: {env}")
                    refused.append(task)
                    continue
            alone = _restricted(task)  # with nothing before it in the pipe, or after it
            limit = task.header.get("max_tasks_per_child")
            w = self._worker_for(task.owner, load, caps, env, alone=alone, limit=limit)
            if w is not None and task.staged is not None:
                allowed = self.data.still_allowed(task)
                if allowed is None:  # not checked (a passing fault): at a later step
                    skipped.append(task)
                    continue
                if not allowed:
                    continue  # a grant revoked since its stage-in: it failed, never ran
                if not alone and _restricted(task):  # its data made stricter meanwhile
                    alone = True
                    w = self._worker_for(task.owner, load, caps, env, alone=True, limit=limit)
            if alone and w is not None:
                caps[w] = 0
            if w is None:
                skipped.append(task)
                key = None if env is None else env.key
                if alone or not any(x.owner == task.owner and x.env == key and
                                    x.takes(n, limit) for x, n in load.items()):
                    # it waits for an idle worker (to have alone, or to replace: none of
                    # its owner's, or none that will not have run too many tasks for it,
                    # max_tasks_per_child): pipe nothing more until one is, so that one
                    # soon is, and it goes first
                    break
                if len(load) >= self.config.workers and all(
                    n >= caps[w_] for w_, n in load.items()
                ):
                    break
                continue
            load[w] += 1
            if limit is not None:
                limited.setdefault(w, w.max_tasks)
                w.given(limit)
            plan.append((task, w))
        skipped.extend(self.pending)
        self.pending = skipped
        for t in (*skipped, *to_stage):  # claimed in a later transaction, the usual way
            t.adopted = False
        if not plan and not refused:
            if to_stage:
                self.data.start_in(to_stage)
            return frames, []
        # a job that ran before (a redelivery, or back from a worker that died) may have
        # been killed meanwhile: it does not begin again
        planned = len(plan)
        again = [t.job_id for t, _ in plan if t.claimed or t.delivery.receive_count > 1]
        killed = self.enclave.jobs.kill_requested(again) if again else set()
        if killed:
            for task, _ in plan:
                if task.job_id in killed:
                    # (one back from a worker that never began it: this node's claim
                    # was no attempt; a redelivery's earlier node's may have been)
                    self._end_killed(task, "before it could run again",
                                     unbegun=task.claimed and task.unbegun)
            plan = [(t, w) for t, w in plan if t.job_id not in killed]
        adopted = [t for t, _ in plan if t.adopted]
        if refused:  # (a redelivery of a job a live node runs: watched, not failed)
            refused = self._watch_refused(refused)
        # (a refused task recorded in this transaction, by this node: nobody else has it)
        claimed = self.claim([*(t for t, _ in plan if not t.adopted),
                              *(t for t in refused if not t.adopted)], JobState.PROCESSING)
        started = {id(t) for t in (*claimed, *adopted, *(t for t in refused if t.adopted))}
        going = [t for t, _ in plan if id(t) in started]  # (held, though in no pipe yet)
        lost = [t for t in (*(t for t, _ in plan), *refused) if id(t) not in started]
        if lost:  # cancelled meanwhile, finished, or a second copy
            self.drop_lost(lost, going)
            if self.pending or self._backlogged:  # skipped for the worker a lost task was
                # planned to, which is free: no result of it will wake us for them, and a
                # backlog of cancelled tasks went a few a poll interval (as did the tasks
                # behind it); or left in the queue, the node taking only what it can start
                self.request_wake()
        for t in refused:
            if id(t) in started:
                self._fail_refused(t)
        if to_stage:  # after the claim: a copy of a task going to a worker sees it held
            self.data.start_in(to_stage, going)
        if limited and len(going) < planned:  # the limits of the tasks that go only
            for w, most in limited.items():
                w.max_tasks = most
            for task, w in plan:
                if id(task) in started:
                    w.given(task.header.get("max_tasks_per_child"))
        new: dict[pool.Planned, Worker | None] = {}  # started now: a task of theirs is claimed
        for task, w in plan:
            if id(task) in started:
                if isinstance(w, pool.Planned):
                    if w not in new:
                        new[w] = self._start_planned(w)
                    if new[w] is None:  # it could not be started
                        self._not_started(task, w)
                        continue
                    w = new[w]
                frames.setdefault(w, []).append(task)
                if _restricted(task):  # it serves nothing after it: it retires
                    w.retiring = True
        return frames, adopted

    def _env_fault(self, exc: OSError | None) -> None:
        """A fault of the node's own (``exc``: out of file descriptors, of memory, of
        processes) kept it from building an env: its tasks wait for it to pass, as they do
        for a worker the same fault keeps from starting (:meth:`_not_started`), until it
        has lasted PATIENCE.  Logged as it starts and as it passes (None: a build that
        came to an end), not at each try."""
        what = "building an environment"
        # (a build killed by a signal is tried again BUILD_KILLS times at most, then fails
        # its set: it never ends the node, which one killed at each try ended, and each
        # node that took the set's tasks after it.  Timed apart: on the same clock, a kill
        # whose set's next build ran for minutes had another set's first fault (EMFILE)
        # "last" since it, and the node gave up at once)
        killed = f"{what} (killed)"
        if exc is None:
            self._failing.pop(killed, None)
            since = self._failing.pop(what, None)
            if since is not None:
                log.info("%s works again, after %.0f s", what, time.monotonic() - since)
            return
        key = killed if isinstance(exc, envs.BuildKilled) else what
        first = key not in self._failing
        self._env_ended = self.envs.ended
        self._transient(key, exc, math.inf if key == killed else None)
        (log.warning if first else log.debug)(
            "%s failed (%s: %s): the node's own fault; its tasks wait for it to pass",
            what, type(exc).__name__, exc)

    def _start_planned(self, p: pool.Planned) -> Worker | None:
        """Start a planned worker, ending the idle one it replaces; None if it could not
        be started (``p.failure`` says why: :meth:`_not_started` deals with its tasks).
        That killed the node (a venv's python not executable, EMFILE...), and every task it
        held ran again elsewhere, where the same fault killed the next node."""
        try:
            w = pool.spawn(p.owner, env=p.venv)
        except (OSError, subprocess.SubprocessError) as exc:
            p.failure = exc
            # a fault of the node's own is tried again at each step until it passes: a
            # warning as it starts, the tries after it at debug (not hundreds a minute)
            (log.debug if "starting a worker" in self._failing else log.warning)(
                "a worker for %s could not be started: %s", p.owner, _unstartable(exc))
            return None
        since = self._failing.pop("starting a worker", None)
        if since is not None:
            log.info("a worker can be started again, after %.0f s", time.monotonic() - since)
        if p.victim is not None:  # never share a worker between owners: replace it
            # (only now: a worker that could not be started costs no warm one)
            p.victim.close_idle()
            self._leftovers.append(p.victim.leftovers())  # (its owner's processes go too)
            self._look_for_orphans_soon()
            self.workers.remove(p.victim)
        w.max_tasks = p.max_tasks
        self.workers.append(w)
        return w

    def _not_started(self, task: Task, p: pool.Planned) -> None:
        """A claimed task whose worker could not be started (``p.failure``).  A fault of
        the node's own (out of file descriptors, of memory, of processes; its temporary
        directory gone; its own python) or its env gone, to be built again: the task goes
        back to pending, unbegun, and so until the fault has lasted PATIENCE (then the
        node gives up, as on any lasting fault of its own, and its tasks run elsewhere;
        failed, every task the node took failed at once).  The env's python that cannot
        be run would meet every task of its set: the task fails, naming it."""
        exc = p.failure
        envs_own = p.venv is not None and getattr(exc, "filename", None) == p.venv.python
        passing = getattr(exc, "errno", None) in _PASSING_ERRNOS
        if passing or not envs_own or not p.venv.usable():
            self._transient("starting a worker", exc)
            task.adopted = False  # (claimed by _claim_adopted if it was, as the others)
            self._put_back(deque([task]), unbegun=True)
            return
        task.refusal = ("WorkerDied", f"the worker process for job {task.job_id} could not "
                                      f"be started: {_unstartable(exc)}; it never ran")
        self._fail_refused(task)

    def _claim_adopted(self, tasks: list[Task]) -> None:
        for t in tasks:
            t.adopted = False  # claimed from now on, or back in pending to be
        moved = {id(t) for t in self.claim(tasks, JobState.PROCESSING)} if tasks else set()
        for t in tasks:
            if id(t) not in moved:  # cannot be: recorded pending in this transaction
                log.error("job %s, recorded by this node, could not be claimed", t.job_id)

    def claim(self, tasks: list[Task], new: JobState) -> list[Task]:
        """Move the tasks' jobs to ``new`` (staging_inputs or processing); the tasks
        claimed, one a job moved: any other copy of its task is not, and is to be dropped.

        A first delivery only claims a job nobody started (pending; staging_inputs once
        this node staged it): a copy of a running job's message — a replay, or SQS
        delivering a message twice — finds it started and is dropped, instead of running
        it again.  A redelivery (the holder died, or let the message go) may restart it,
        and so may this node a task it claimed before (its worker died with the task
        still queued in its pipe).  (A redelivery of a job a live node still runs never
        gets here on AWS: :meth:`_watch_running`.)"""
        # One task a job: two copies of a job's task in one claim (a create retried after
        # its task was queued: two messages, both waiting here) must not both run.  The
        # copy already ours goes on; the others are not claimed, so they are dropped, and
        # acked; but a copy that is a second delivery of the message a task held here has
        # is not acked (drop_lost).
        one: dict[str, Task] = {}
        for t in tasks:
            if t.job_id not in one or (t.claimed and not one[t.job_id].claimed):
                one[t.job_id] = t
        groups: dict[frozenset | None, list[str]] = {}
        kept: set[str] = set()
        taken: set[str] = set()
        unbegun = [t.job_id for t in one.values()
                   if t.claimed and t.unbegun and new is JobState.PROCESSING]
        if unbegun:
            # Back from a worker that never began it (taken back from behind a long task,
            # or behind a dead worker's head): its job is processing here already.  Moved
            # again, it counted a second attempt for one begun once.  Kept only while the
            # record says so: one that ended meanwhile (taken over by another node while
            # this one stalled, and finished there) ran again, unseen; it goes the usual
            # way (not moved: dropped).  Nor is one that another node has claimed since (it
            # took the message over): moved back here, it ran on both; it is dropped too
            records = self.enclave.jobs.get_many(unbegun)
            kept = {j for j in unbegun if (r := records.get(j)) is not None
                    and r.state == JobState.PROCESSING and r.node == self.node_id}
            taken = {j for j in unbegun if (r := records.get(j)) is not None and r.node
                     not in (None, self.node_id) and r.state in (
                         JobState.STAGING_INPUTS, JobState.PROCESSING)}
        for t in one.values():
            if t.job_id in kept or t.job_id in taken:
                continue
            if t.claimed or t.delivery.receive_count > 1:  # ours already, or a redelivery
                sources = None
            elif t.staged is not None:
                sources = frozenset({JobState.STAGING_INPUTS})
            else:
                sources = frozenset({JobState.PENDING})
            groups.setdefault(sources, []).append(t.job_id)
        moved: set[str] = kept
        for sources, ids in groups.items():
            moved.update(self.enclave.jobs.transition(ids, new, from_states=sources, node=self.node_id))
        claimed = [t for t in one.values() if t.job_id in moved]
        for t in claimed:
            t.claimed = True
        return claimed

    def _watch_running(self, deliveries: list[Delivery]) -> list[Delivery]:
        """SQS hides a received message at most 12 hours from its receipt
        (``queue.max_hidden``), however often its holder extends it: a job running longer
        (production walltimes go to 24 h) is delivered again while its node still runs it.
        Of these deliveries, the redeliveries of jobs that a live node still runs (another
        node, or this one) are not taken: this node watches them instead
        (:meth:`_check_watched`), extending them with its own messages.  Before any check
        of the task: a check that fails a job (too many deliveries, a walltime over this
        node's cap, a token revoked since) must not fail one that runs elsewhere.  The
        deliveries to take are returned; a redelivery of a job whose node is gone, or that
        no node runs, is one of them, as before."""
        if self.enclave.queue.max_hidden is None:
            return deliveries
        again = [d for d in deliveries if d.receive_count > 1]
        if not again:
            return deliveries
        # (a transient fault reading their records, throttling, ended the node: they are
        # left for a later look instead, back once their visibility timeout has passed)
        ok, looked = self._tolerant("looking at jobs delivered again", self._running_elsewhere,
                                    [d.job_id for d in again], then="looking again later")
        if not ok:
            left = set(map(id, again))
            return [d for d in deliveries if id(d) not in left]
        running, _ = looked
        if not running:
            return deliveries
        watch = [d for d in again if d.job_id in running]
        for d in watch:
            old = self.watched.get(d.job_id)  # its earlier delivery: a stale receipt now
            self.watched[d.job_id] = d
            if old is None:
                log.warning(
                    "job %s was delivered again while node %s still runs it (SQS hides "
                    "a message at most %s): watching it, not running it again",
                    d.job_id, running[d.job_id], _minutes(self.enclave.queue.max_hidden),
                )
        watching = set(map(id, watch))
        return [d for d in deliveries if id(d) not in watching]

    def _watch_refused(self, refused: list[Task]) -> list[Task]:
        """Of the tasks this node refuses (``task.refusal``), the redeliveries of jobs a
        live node runs are watched (:meth:`_check_watched`), not claimed and failed: a
        redelivery may claim a started job, and so failed one that its node, stalled past
        the visibility timeout but alive, ran on (its result was then dropped).  On AWS
        :meth:`_watch_running` took them already; on the embedded enclave a redelivery
        this node would run still runs (at least once), but one it refuses must not end
        the job under the node that runs it.  The others are returned."""
        again = [t for t in refused
                 if not t.claimed and not t.adopted and t.delivery.receive_count > 1]
        if not again:
            return refused
        running, _ = self._running_elsewhere([t.job_id for t in again])
        watch = {id(t) for t in again if t.job_id in running}
        for t in again:
            if id(t) in watch:
                log.warning("job %s was delivered again while node %s still runs it: "
                            "watching it, not refusing it (%s)",
                            t.job_id, running[t.job_id], t.refusal[1])
                self.watched[t.job_id] = t.delivery
        return [t for t in refused if id(t) not in watch]

    def _running_elsewhere(self, job_ids: list[str]) -> tuple[dict[str, str], dict]:
        """Of these jobs, those a live node runs (job id -> node id); and their records."""
        records = self.enclave.jobs.get_many(job_ids)
        live: set[str] | None = None
        out = {}
        for job_id, r in records.items():
            if r.state.final or r.state == JobState.PENDING or r.node is None:
                continue
            if r.node == self.node_id:
                if self._runs(job_id):
                    out[job_id] = r.node
                continue
            if live is None:
                live = {n.node_id for n in self.enclave.nodes.live()}
            if r.node in live:
                out[job_id] = r.node
        return out, records

    def _check_watched(self) -> None:
        """Watched redeliveries (see :meth:`_watch_running`): acked once their job has
        ended; handed back, to run again, once the node that ran it is gone (or handed it
        back itself: it no longer runs it); else kept, and extended with the rest."""
        if not self.watched:
            return
        running, records = self._running_elsewhere(list(self.watched))
        done, back = [], []
        for job_id in [j for j in self.watched if j not in running]:
            d = self.watched.pop(job_id)
            r = records.get(job_id)
            (done if r is None or r.state.final else back).append(d)
        if done:
            self.enclave.queue.ack(done)
        if back:
            log.info("handing back %d watched tasks: their node no longer runs them", len(back))
            self.enclave.queue.release(back)

    def _runs(self, job_id: str) -> bool:
        """Whether this node runs that job: a worker runs it or has it in its pipe, it
        stages it, or claimed it and holds it for a worker."""
        return job_id in self.data.active or any(
            t.job_id == job_id for w in self.workers for t in w.inflight
        ) or any(t.job_id == job_id and t.claimed for t in self.pending)

    def drop_lost(self, lost: list[Task], claimed: Iterable[Task] = ()) -> None:
        """Drop the tasks that did not claim their job (:meth:`claim`; ``claimed``: those
        that did, in the same claim).  Most are acked (:meth:`drop`).  But a lost task
        that is another delivery of the message of a task this node holds (the same
        message and job) is that task: SQS delivered the message twice and counted the
        second a first delivery, so :meth:`_ours_again` did not look for it.  The held
        task takes its delivery if it is the later one (by receive count, as in
        :meth:`_ours_again`), whose receipt acks and extends the message; it is not acked
        now, which would delete the message the held task still needs (and should this
        node die before the task ends, nothing would deliver it again)."""
        self._delete_blobs_of_ended([t for t in lost if t.header.get("refs")])
        held: dict[tuple[str, str], Task] = {}
        if any(t.delivery.message_id for t in lost):  # (drops are few: looked at only then)
            out = set(map(id, lost))
            held = {(t.delivery.message_id, t.job_id): t
                    for t in (*self._held_tasks(), *claimed)
                    if t.delivery.message_id and id(t) not in out}
        for t in lost:
            same = held.get((t.delivery.message_id, t.job_id))
            if same is None:
                self.drop(t)
                continue
            log.warning("job %s: its message came again while this node holds it, counted "
                        "as a first delivery; not a task of its own", t.job_id)
            if t.delivery.receive_count >= same.delivery.receive_count:
                same.delivery = t.delivery  # (an older receipt no longer acks the message)
            if t.staged is not None:
                self.data.discard(t)

    def _delete_blobs_of_ended(self, tasks: list[Task]) -> None:
        """The blobs of these tasks' big sections, deleted once the step commits if their
        job has ended (cancelled before it ran, say): no delivery of it runs again.  (A
        copy of a task whose job runs elsewhere leaves them: a redelivery needs them.)"""
        if not tasks:
            return
        records = self.enclave.jobs.get_many([t.job_id for t in tasks])
        self._delete_later += [  # by the names the job's own blobs have: a header (signed
            # by its sender, and checked) still names no other blob to delete
            f"{section}-{t.job_id}" for t in tasks
            if (r := records.get(t.job_id)) is not None and r.state.final
            for section in TASK_SECTIONS if section in t.header["refs"]
        ]

    def drop(self, task: Task) -> None:
        """A task whose job was cancelled or finished meanwhile: tell its client, ack it."""
        self.enclave.queue.ack([task.delivery])
        self._reply(task.header["client"], [(task.job_id, b"")])
        if task.staged is not None:
            self.data.discard(task)

    def _hand_out(self, frames: dict[Worker, list[Task]]) -> None:
        """Write each worker its tasks, in one write."""
        for w, tasks in frames.items():
            try:
                w.send(tasks)
            except OSError:  # the worker is gone; collect() buries it and these run elsewhere
                for _ in tasks:
                    w.inflight.pop()
                self.pending.extendleft(reversed(tasks))

    def _fail_refused(self, task: Task) -> None:
        """A task this node refuses (``task.refusal``: its walltime is over the node's cap,
        its requirements could not be installed), claimed: its job fails, never run."""
        etype, reason = task.refusal
        if task.staged is not None:  # its inputs were staged before its requirements failed:
            self.data.discard(task)  # their copies go now, not when the node stops
        data = wire.failure(task.job_id, task.header["n"], etype, reason)
        # (its claim, if it was claimed, was no attempt: it never ran)
        fin = Finished(task.job_id, JobState.FAILED, data, wire.failure_reason(etype, reason),
                       unbegun=True)
        self._queue_finish(task, task.delivery, fin, task.header["client"])

    def _worker_for(
        self, owner: str, load: dict[Worker, int], caps: dict[Worker, int],
        env: envs.Env | None = None, *, alone: bool = False, limit: int | None = None,
    ) -> Worker | pool.Planned | None:
        """A worker of ``owner`` in the environment ``env`` (workers are keyed by both);
        ``alone``: an idle one; ``limit``: the task's ``max_tasks_per_child``, which the
        worker's count of tasks must stay under (:meth:`Worker.takes`).  A new one is
        only planned (``pool.Planned``: _dispatch starts it once a task of its is claimed),
        taking a place the pool has, or that of an idle worker it is to replace."""
        key = None if env is None else env.key
        best = None
        for w, n in load.items():
            if w.owner == owner and w.env == key and n < caps[w] and (not alone or n == 0) and (
                best is None or n < load[best]
            ) and (limit is None and w.max_tasks is None or w.takes(n, limit)):
                best = w
        if best is not None:
            return best
        victim = None
        places = len(self.workers) + sum(  # (a victim's place is its replacement's)
            isinstance(w, pool.Planned) and w.victim is None for w in load)
        if places >= self.config.workers:
            # replaced: an idle worker of another owner or env, or one that has run too
            # many tasks for this one
            idle = [w for w, n in load.items() if n == 0 and not isinstance(w, pool.Planned)
                    and ((w.owner, w.env) != (owner, key) or not w.takes(0, limit))]
            if not idle:
                return None
            victim = idle[0]
            del load[victim]  # (nothing more is planned for it)
        w = pool.Planned(owner, env, victim)
        load[w], caps[w] = 0, 1
        return w

    def _upkeep_period(self) -> float:
        """Seconds between upkeeps: a third of the visibility timeout (within 0.2 to 10 s),
        as the heartbeat, every NODE_STALE / 3, fits into."""
        return max(0.2, min(10.0, self.config.visibility_timeout / 3))

    def _upkeep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample_check and self.config.sample_interval > 0:
            self._sample(now)
        if now >= self._next_capture_trim:  # a long task's output: only its tail is kept
            self._next_capture_trim = now + CAPTURE_TRIM
            for w in self.workers:
                if w.inflight:
                    w.trim_output()
        if now - self._last_upkeep < self._upkeep_period():
            # A burst of tiny tasks writes some 5 KB a task to the embedded enclave's log:
            # checkpointed only every period, it grew to 300 MB in 10 s, and more on a
            # faster machine.  Once it is over its size limit, it is checkpointed now.
            if now >= self._next_log_look:
                self._next_log_look = now + LOG_LOOK
                if self.enclave.checkpoint_due():
                    self.enclave.checkpoint()
            return
        self._last_upkeep = now
        # (looked at again at the next upkeep if that fails; meanwhile the watched
        # messages are extended with the rest, below)
        self._tolerant("looking at watched jobs", self._check_watched,
                       then="trying again at the next upkeep")
        held = [t.delivery for t in self.pending]
        held += [t.delivery for w in self.workers for t in w.inflight]
        held += self.data.held()
        held += self.watched.values()
        held += [d for _, d, _, _ in self.finished]  # results not recorded yet (_report)
        held += list(self._inbox)  # the poller's, not taken yet (no room): ours too, else
        # their visibility runs out, another node runs them, and a late take here acks
        # that node's message with a stale receipt
        # Each is made again at the next upkeep (a third of the visibility timeout, and of
        # a node's time to live, later): a transient fault (throttling past the backend's
        # retries, a 5xx, a lost answer) does not end the node.
        for what, patience, call in (  # (a third of what other nodes wait)
            ("extending the visibility of held messages", self.config.visibility_timeout / 3,
             lambda: self.enclave.queue.extend(held, self.config.visibility_timeout)
             if held else None),
            ("the heartbeat", NODE_STALE / 3, lambda: self.enclave.nodes.heartbeat(self.node_id)),
        ):
            self._tolerant(what, call, patience=patience, then="trying again at the next upkeep")
        if not self.stopping and self.config.parent_pid is None and (
                why := self.enclave.removed()):
            # (`rm -rf` of its directory: it served on, for good, what no client, nor
            # `kotta down`, could reach any more.  Not an executor's own node: it ends
            # with its executor, which goes on with the removed database it has open, and
            # would start a node again, on a new empty enclave made in its place)
            log.error("%s while this node ran; stopping", why)
            self.stopping = True
            self.exit_status = 1
        if now >= self._next_stray_look:
            self._next_stray_look = now + STRAY_BLOB_LOOK
            self._sweep_stray_blobs()
            self._sweep_stray_bodies()
            self._expire_replies()
        self.enclave.checkpoint()

    def _sweep_stray_blobs(self) -> None:
        """Delete the task blobs that no job record names, or whose job has ended, written
        over STRAY_BLOB_AGE ago (a page of keys a section), and the result blobs no job
        record names (_sweep_stray_results).  Housekeeping: a failure waits for the next look."""
        before = time.time() - STRAY_BLOB_AGE
        try:
            for section in TASK_SECTIONS:
                keys, self._stray_after[section] = self.enclave.blobs.older(
                    f"{section}-", before, after=self._stray_after[section])
                by_job = {k[len(section) + 1:]: k for k in keys}
                by_job = {j: k for j, k in by_job.items() if wire.is_job_id(j)}
                if not by_job:
                    continue
                # and those of jobs that have ended, which no delivery runs again: their
                # node was killed between recording the job and deleting them
                records = self.enclave.jobs.get_many(list(by_job))
                stray = [k for j, k in by_job.items()
                         if j not in records or records[j].state.final]
                if stray:
                    log.info("deleting %d task blobs (%s-...) written over %.0f s ago that "
                             "no job records (their clients died before recording them), "
                             "or whose job has ended (their node died before deleting them)",
                             len(stray), section, STRAY_BLOB_AGE)
                    self.enclave.blobs.delete(stray)
            self._sweep_stray_results(before)
        except Exception as exc:  # noqa: BLE001 - housekeeping: never the node's end
            log.warning("looking for stray task blobs failed (%s: %s); trying again in "
                        "%.0f s", type(exc).__name__, exc, STRAY_BLOB_LOOK)

    def _sweep_stray_bodies(self) -> None:
        """Delete the message bodies spilled to the blob store over MSG_BLOB_AGE ago (a page
        of keys a look), which no message can name any more.  Housekeeping: a failure (a
        node role from before it could list them) waits for the next look."""
        try:
            keys, self._stray_after["msg"] = self.enclave.blobs.older(
                "msg-", time.time() - MSG_BLOB_AGE, after=self._stray_after["msg"])
            if keys:
                log.info("deleting %d message bodies spilled over %.0f s ago, which no "
                         "message names (their clients died before sending them)",
                         len(keys), MSG_BLOB_AGE)
                self.enclave.blobs.delete(keys)
        except Exception as exc:  # noqa: BLE001 - housekeeping: never the node's end
            log.warning("looking for stray message bodies failed (%s: %s); trying again in "
                        "%.0f s", type(exc).__name__, exc, STRAY_BLOB_LOOK)

    def _sweep_stray_results(self, before: float) -> None:
        """Delete the result blobs (``result-<job id>-<suffix>``: JobTable.finish) that no
        job record names, written before ``before``: the node that wrote one was killed
        before its transaction recorded it (the task ran again elsewhere, its result in a
        blob of another name), or while writing it (a temporary file, which ``older``
        removes), and nothing else would ever remove them, nor the data in them.  Only
        where the job table says which blob holds a job's result (not on AWS, whose node
        role may list task blobs only)."""
        try:
            self.enclave.jobs.result_refs([])
        except NotImplementedError:
            return
        keys, self._stray_after["result"] = self.enclave.blobs.older(
            "result-", before, after=self._stray_after["result"])
        by_job: dict[str, list[str]] = {}
        for k in keys:
            job_id = k[len("result-"):].rpartition("-")[0]
            if wire.is_job_id(job_id):
                by_job.setdefault(job_id, []).append(k)
        if not by_job:
            return
        refs = self.enclave.jobs.result_refs(list(by_job))
        stray = [k for j, ks in by_job.items() for k in ks if refs.get(j) != k]
        if stray:
            log.info("deleting %d result blobs that no job records, written over %.0f s "
                     "ago: their nodes died before recording them", len(stray),
                     STRAY_BLOB_AGE)
            self.enclave.blobs.delete(stray)

    def _expire_replies(self) -> None:
        """Delete the reply messages no client took within REPLY_AGE.  Housekeeping: a
        failure waits for the next look."""
        try:
            n = self.enclave.queue.expire_replies(time.time() - REPLY_AGE)
        except Exception as exc:  # noqa: BLE001 - housekeeping: never the node's end
            log.warning("deleting old reply messages failed (%s: %s); trying again in %.0f s",
                        type(exc).__name__, exc, STRAY_BLOB_LOOK)
            return
        if n:
            log.info("deleted %d reply messages that no client took within %.0f s", n,
                     REPLY_AGE)

    def _tolerant(self, what: str, call, *args, patience: float | None = None,
                  key: str | None = None, then: str = "trying again") -> tuple[bool, object]:
        """``call(*args)``, a step a transient fault (throttling past the backend's retries, a
        5xx, a lost answer) may fail: that is logged, and ``(False, None)`` returned, for the
        caller to try again later, rather than end the node and every task it runs.  A
        lasting fault, or one that has lasted past ``patience``, raises (:meth:`_transient`,
        which counts under ``key``, by default ``what``)."""
        key = key or what
        try:
            value = call(*args)
        except Exception as exc:
            self._transient(key, exc, patience)
            log.warning("%s failed (%s: %s); %s", what, type(exc).__name__, exc, then)
            return False, None
        self._failing.pop(key, None)
        return True, value

    def _transient(self, what: str, exc: Exception, patience: float | None = None) -> None:
        """A step failed (``what``): raise ``exc`` if the enclave calls it lasting, or if
        that step has failed for longer than ``patience`` seconds (PATIENCE, as it is
        now); else it is tried again later."""
        if self.enclave.lasting(exc):
            raise exc
        if patience is None:
            patience = PATIENCE
        now = time.monotonic()
        since = self._failing.setdefault(what, now)
        if now - since > patience:
            log.error("%s has failed for %.0f s: giving up", what, now - since)
            raise exc


    def _sample(self, now: float) -> None:
        """Resource samples of the tasks that have run for a while (never of tiny ones):
        a glance at each worker's head task, a psutil reading only when one is due."""
        interval = self.config.sample_interval
        self._next_sample_check = now + min(interval / 4, 1.0)
        daemons: dict[str, list[int]] | None = None
        # (one scan of the process table for all the workers, as in _check_memory)
        kids: dict[int, list[int]] | None = None
        for w in self.workers:
            if not w.inflight or w.kill_deadline is not None:
                continue
            head = w.inflight[0]
            if head.started is None or now - head.started < interval / 2:
                continue
            if head.monitor is None:
                head.monitor = Monitor(head.started, interval)
            if now < head.monitor.due:
                continue
            if self.adopts_orphans and daemons is None:
                # what its tasks started out of its tree counts, as in _check_memory
                daemons = pool.adopted_by_worker()
            also = [p for p in (daemons or {}).get(w.mark, ()) if p != w.pid]
            if kids is None:
                kids = children_map()
            if not head.monitor.read(w.pid, now, also, kids):
                continue
            try:
                self.enclave.jobs.record_usage(head.job_id, head.monitor.usage())
            except Exception:  # noqa: BLE001 - a missed sample must not stop the node
                log.exception("recording the usage of job %s failed", head.job_id)


def _kill_tree_now(w: Worker) -> None:
    """SIGKILL a busy worker's process tree, with no grace: the node is stopping."""
    w.kill("WorkerDied", "node stopping")
    w.kill_deadline = 0
    w.escalate()


def _holds(w: Worker) -> int:
    """How many tasks the node holds for ``w`` (when not every worker runs tiny tasks): 4
    for tiny tasks; for short ones (pool.SHORT_TASK) the one it runs and one in reserve,
    so that it does not wait for the node between them; else only the one it runs (a
    worker starting up, or whose tasks are long or not measured yet).  The node held 4
    for every worker: 3 tasks waited behind each long one, while another node of the
    queue may have been idle."""
    depth = w.depth
    if depth > 2:
        return 4
    return 2 if depth == 2 and w.ran and w.avg < pool.SHORT_TASK else 1


def _restricted(task: Task) -> bool:
    """Whether a task reads data whose egress is restricted (its worker retires after it)."""
    return task.staged is not None and task.staged.egress != (True, None)


def _pack_replies(items: list[tuple[str, bytes]]) -> list[Message]:
    """Reply messages: as few as can be, each up to about 256 KiB."""
    chunk: list[tuple[str, bytes]] = []
    size = 0
    messages = []
    for item in items:
        if chunk and size + len(item[1]) > REPLY_INLINE_LIMIT * 4:
            messages.append(Message(chunk[0][0], wire.pack_replies(chunk)))
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1]) + 36
    if chunk:
        messages.append(Message(chunk[0][0], wire.pack_replies(chunk)))
    return messages


def _unreported_usage(task: Task) -> dict | None:
    """The usage of a task whose worker ended without reporting it (killed, died): when it
    began on its worker and ended, as the node saw it, and what the node measured of a long
    task (samples, CPU and peak memory of its tree).  The worker's own figures died with it."""
    usage: dict | None = None
    if task.started is not None:
        now, wall = time.time(), max(0.0, time.monotonic() - task.started)
        usage = {"start": now - wall, "end": now, "wall": round(wall, 6)}
    if task.monitor is not None or task.killed_at_kb:
        usage = _measured(task, usage)
    return usage


def _measured(task: Task, usage: dict | None) -> dict:
    """``usage`` with what the node measured of the task: the samples, CPU and peak of a
    long task (its Monitor), and the memory a task killed for memory was killed at (the
    worker's figures die with it, and a sample may not have come yet: a task killed for
    using 400 MB reported no peak at all)."""
    if task.monitor is not None:
        usage = task.monitor.merge(usage)
    usage = dict(usage or {})
    if task.killed_at_kb:
        usage["peak_rss_kb"] = max(usage.get("peak_rss_kb", 0), task.killed_at_kb)
    return usage


def _with_usage(data: bytes, usage: dict) -> bytes:
    """A result envelope with ``usage`` in its header (long tasks only: it copies)."""
    return wire.with_fields(data, usage=usage)


#: the failures the node ends a running task for, by its process tree's SIGTERM
_ENDED_BY_NODE = frozenset({"WalltimeExceeded", "TaskKilled", "MemoryLimitExceeded"})


def _ended_by_node(task: Task, data: bytes, reason: str | None, usage: dict | None,
                   kill_reason: tuple[str, str]) -> tuple[bytes, str]:
    """The result of a task the node stopped, which failed after the SIGTERM: the node's
    failure (``kill_reason``), naming what the task raised, with the task's output and
    usage; and its job record's reason."""
    etype, message = kill_reason
    if reason:
        message = f"{message} (the task then raised {reason})"
    sections = wire.decode(data).sections
    data = wire.failure(task.job_id, task.header["n"], etype, message,
                        stdout=sections.get("stdout", b""), stderr=sections.get("stderr", b""))
    if usage is not None:
        data = _with_usage(data, usage)
    return data, wire.failure_reason(etype, message)


def _drain_socket(sock: socket.socket) -> None:
    try:
        while sock.recv(64):
            pass
    except BlockingIOError:
        pass


#: errors starting a worker that are the node's own and pass (Node._not_started)
_PASSING_ERRNOS = pool.PASSING_ERRNOS


def _unstartable(exc: OSError | subprocess.SubprocessError) -> str:
    """What could not be started, and why: ``PATH: Permission denied``."""
    filename = getattr(exc, "filename", None)
    if filename is not None and getattr(exc, "strerror", None):
        return f"{filename}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _death_message(code: int, started: bool = True) -> str:
    """``started``: the worker had said it was ready.  One that died before (a broken
    venv, a sitecustomize or .pth that fails) never began the task it holds: "while
    running the task" sent the user looking in a task that never ran."""
    when = "while running the task" if started else "while starting up, before it began the task"
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            rt = getattr(signal, "SIGRTMIN", None)
            name = f"SIGRTMIN+{sig - rt}" if rt is not None and sig > rt else f"signal {sig}"
        if sig == STOP_SIGNAL:  # a task reset it to its default action, which is to die
            name += ", the node's stop request"
        message = f"the worker process was killed by {name} (signal {sig})"
        return message if started else f"{message} {when}"
    return f"the worker process exited with code {code} {when}"


def _minutes(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:g} min" if minutes >= 1 else f"{seconds:g} s"
