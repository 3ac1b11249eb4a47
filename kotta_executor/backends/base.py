"""The backend interface: a task queue, a blob store, a job table, and a node registry.

An :class:`Enclave` bundles one implementation of each.  The embedded backend (SQLite and a
directory) and the AWS backend (SQS, S3, DynamoDB) implement the same small interface and
are held to it by one contract suite (``tests/test_backend_contract.py``).

Semantics every implementation keeps:

* the queue delivers at least once: a received message is invisible for its visibility
  timeout, then visible again unless acknowledged; every receive counts;
* a receipt from an earlier delivery cannot acknowledge a later one;
* job state only moves as :mod:`kotta_executor.states` allows, as a *condition* of the
  write, so a result is recorded at most once however often a task is delivered.
"""

from __future__ import annotations

import abc
import contextlib
import json
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KottaError
from ..states import JobState


@dataclass(frozen=True, slots=True)
class Message:
    job_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    job_id: str
    body: bytes
    receipt: str
    receive_count: int
    #: when the queue took the message (the service's clock where there is one: SQS's
    #: SentTimestamp); a node checks the signing token was valid then
    sent: float | None = None
    #: the message's identity, the same in each of its deliveries ("" if unknown): a node
    #: that receives a message it still holds knows it for the same task
    message_id: str = ""
    #: why its body could not be read ("" if it was), its ``body`` empty then: kept
    #: elsewhere (AWS: a big message's body in S3), gone or refused
    fault: str = ""


@dataclass(slots=True)
class NewJob:
    job_id: str
    owner: str
    client: str
    queue: str
    fn: str
    walltime: float
    body: bytes
    n: int = 1


@dataclass(slots=True)
class Finished:
    job_id: str
    state: JobState
    result: bytes
    reason: str | None = None
    usage: dict[str, Any] | None = None
    #: when it finished, and an id of this outcome: the same in every try to record it, so
    #: that a backend whose finish can be made without its answer (a lost response) knows
    #: its own earlier write again (another's has another id)
    at: float = field(default_factory=time.time)
    attempt: str = field(default_factory=lambda: f"{random.getrandbits(32):08x}")
    #: the node that claims the job never began it (refused it, or killed it while it
    #: waited in a worker's pipe): its claim's attempt and its start are taken back, as a
    #: stopping node's hand-back takes them (a job it holds, staging_inputs or processing;
    #: from pending there is nothing to take back)
    unbegun: bool = False


@dataclass(slots=True)
class JobRecord:
    job_id: str
    owner: str
    client: str
    queue: str
    fn: str
    walltime: float
    state: JobState
    created: float
    updated: float
    n: int = 1
    node: str | None = None
    attempts: int = 0
    reason: str | None = None
    started: float | None = None
    finished: float | None = None
    kill_requested: bool = False
    usage: dict[str, Any] | None = None
    result: bytes | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "result"}
        d["state"] = str(self.state)
        return d


@dataclass(slots=True)
class Pruned:
    """What :meth:`JobTable.prune` removed (or, in a dry run, would remove)."""

    #: the ids of the jobs
    jobs: list[str] = field(default_factory=list)
    #: bytes their records, results, task blobs and dead letters held, roughly; None
    #: where the backend cannot tell cheaply (AWS: the size of an item or object is not
    #: known without reading it)
    bytes: int | None = 0


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    queue: str
    host: str
    pid: int
    workers: int
    started: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)
    managed_by: str | None = None
    #: the Python version (``"3.12"``) its workers run: code pickled by value in another
    #: one does not load there (wire.version_mismatch); None: a node that did not say
    python: str | None = None


class TaskQueue(abc.ABC):
    """At-least-once message queues, named by Kotta queue (``test``) or reply channel."""

    #: the longest a received message can be kept hidden, counted from when it was received,
    #: however often its holder extends it (SQS: 12 hours); None: as long as it is extended
    max_hidden: float | None = None

    @abc.abstractmethod
    def send(self, queue: str, messages: Sequence[Message]) -> None: ...

    @abc.abstractmethod
    def receive(
        self,
        queue: str,
        max_messages: int,
        visibility_timeout: float,
        holder: str,
        wait_seconds: float = 0.0,
    ) -> list[Delivery]:
        """Take up to ``max_messages`` visible messages, waiting up to ``wait_seconds`` for
        the first one (long polling)."""

    @abc.abstractmethod
    def take(self, queue: str, max_messages: int, wait_seconds: float = 0.0) -> list[Message]:
        """Receive and delete at once (reply channels, where the job table is the truth)."""

    @abc.abstractmethod
    def extend(self, deliveries: Iterable[Delivery], visibility_timeout: float) -> None: ...

    @abc.abstractmethod
    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Hand messages back: visible again now."""

    def hand_back(self, deliveries: Iterable[Delivery]) -> None:
        """Hand back messages whose tasks the holder never claimed (a stopping node's
        waiting tasks): visible again now, and, where the backend can, the receive does
        not count toward ``--max-deliveries``.  (SQS cannot take a receive back: there it
        is ``release``.)"""
        self.release(deliveries)

    @abc.abstractmethod
    def ack(self, deliveries: Iterable[Delivery]) -> None: ...

    @abc.abstractmethod
    def dead_letter(self, deliveries: Iterable[Delivery], reason: str) -> None: ...

    @abc.abstractmethod
    def dead_letters(self, queue: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def depth(self, queue: str) -> int:
        """Messages waiting or in flight on ``queue``."""

    def open_reply(self, client_id: str) -> str:
        return reply_queue(client_id)

    def close_reply(self, client_id: str) -> None:  # noqa: B027 - optional hook
        """Remove a reply channel's leftovers."""

    def expire_replies(self, before: float) -> int:
        """Delete the messages of reply channels sent before ``before`` (epoch seconds),
        which no client took: its executor had shut down, or its process was gone.  The
        number deleted.  (SQS expires them itself: a reply queue keeps them a day.)"""
        return 0


class BlobStore(abc.ABC):
    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abc.abstractmethod
    def older(self, prefix: str, before: float, *, after: str = "",
              scan: int = 1000) -> tuple[list[str], str]:
        """A page of the keys that begin with ``prefix``, in key order: of the first
        ``scan`` of them after ``after``, those last written before ``before`` (a
        ``time.time()``); and where the next page begins (``after`` for the next call), or
        ``""`` once the listing has ended."""


#: the reason of a job cancelled by a kill request that found it pending (request_kill)
KILLED_PENDING = "killed before a node started it"


class JobTable(abc.ABC):
    @abc.abstractmethod
    def create(self, jobs: Sequence[NewJob], *, enqueue: bool = True) -> None:
        """Record ``jobs`` pending and queue their tasks.  ``enqueue=False`` records them
        without a task message: for tasks a client never sent (cancelled, or failed before
        they could be), which it records final at once and no node should ever see.

        A job id recorded already keeps its record as it is, and its task is queued again:
        a create retried after a failure that came after its records were written must not
        reset a job that a node has meanwhile started or finished.  A node's claim drops
        the extra delivery of a job that has started."""

    @abc.abstractmethod
    def transition(
        self,
        job_ids: Sequence[str],
        new: JobState,
        *,
        from_states: Iterable[JobState] | None = None,
        node: str | None = None,
        reason: str | None = None,
        held_by: str | None = None,
    ) -> list[str]:
        """Move jobs to ``new`` where allowed; returns the ids that moved.  ``held_by``:
        only jobs that node holds (their ``node``) and no one has asked to kill, in the
        same conditional write (a stopping node's hand-back of jobs it never began: a job
        claimed meanwhile by another node, or asked to be killed, must stay as it is)."""

    @abc.abstractmethod
    def finish(self, results: Sequence[Finished]) -> list[str]:
        """Record final states and results, at most once; returns the ids recorded."""

    @abc.abstractmethod
    def get_many(self, job_ids: Sequence[str], *, with_result: bool = False) -> dict[str, JobRecord]: ...

    def owners(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The owner of each of these jobs that has a record: what a node checks of every
        task it receives (a backend reads just that, where it can)."""
        return {job_id: rec.owner for job_id, rec in self.get_many(job_ids).items()}

    def result_refs(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        """The blob that holds the result of each of these jobs that has a record (None:
        none does), for the nodes' sweep of result blobs no record names (a node killed
        between writing one and recording it).  A backend that does not say raises
        NotImplementedError, and its result blobs are not swept."""
        raise NotImplementedError

    @abc.abstractmethod
    def list(
        self, *, owner: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobRecord]: ...

    @abc.abstractmethod
    def history(self, job_id: str) -> list[tuple[float, str, str | None]]: ...

    @abc.abstractmethod
    def delete(self, job_ids: Sequence[str]) -> None:
        """Remove job records with their result and task blobs (clean-up of old jobs)."""

    @abc.abstractmethod
    def prune(self, before: float, *, owner: str | None = None,
              dry_run: bool = False) -> Pruned:
        """Remove the jobs that are final (completed, failed, cancelled) and finished
        before ``before`` (a ``time.time()``), of ``owner`` (None: of every owner): their
        records (result, usage samples, history, captured output), result and task blobs
        and dead letters.  A job that is not final is never removed, whatever its age.
        ``dry_run``: remove nothing, say what would go.  Done in small steps, so that
        nodes never wait long for it; jobs removed before a failure stay removed."""

    @abc.abstractmethod
    def request_kill(self, job_id: str) -> bool:
        """Flag a job to be killed, if a kill can still stop it (``states.KILLABLE``: not
        once its task has run, in staging_outputs); whether it was flagged.  A job no node
        has started (pending) is cancelled instead (reason ``KILLED_PENDING``): a node
        looks for the kill requests of a first delivery only once it runs, so a flagged
        pending job ran on the next node (a short one to its end), though ``kill()`` of a
        job not started promises a cancel.  (A job is pending again after a stopping node
        handed its task back, never begun: a kill made as the client still saw it
        running.)"""

    @abc.abstractmethod
    def kill_requested(self, job_ids: Sequence[str]) -> set[str]: ...

    @abc.abstractmethod
    def record_usage(self, job_id: str, usage: dict[str, Any]) -> bool:
        """Replace the usage of an *active* job (resource samples of a running task);
        returns False, and writes nothing, once the job is final or unknown."""

    def get(self, job_id: str, *, with_result: bool = False) -> JobRecord | None:
        return self.get_many([job_id], with_result=with_result).get(job_id)


class NodeRegistry(abc.ABC):
    @abc.abstractmethod
    def register(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, node_id: str) -> None: ...

    @abc.abstractmethod
    def deregister(self, node_id: str, *, wait: float | None = None) -> None:
        """Remove a node's row.  ``wait``: the seconds to wait for the enclave's write lock,
        where it has one (the embedded backend's), if not its usual timeout."""

    @abc.abstractmethod
    def live(self, queue: str | None = None) -> list[NodeInfo]: ...

    def here(self, queue: str | None = None) -> tuple[list[NodeInfo], list[NodeInfo]]:
        """The live nodes on this machine: ``(ours, elsewhere)``, those whose pid this
        process may signal (``kotta down``), and those that run here but where their pid
        means another process (another PID namespace: a container sharing the host name).
        This default knows the host name only."""
        host = socket.gethostname()
        return [n for n in self.live(queue) if n.host == host], []


class Records(abc.ABC):
    """Small JSON documents by ``(kind, key)``: the enclave's identities, token records,
    datasets, policies and audit log (:mod:`kotta_executor.security`).

    ``put(..., if_absent=True)`` is a conditional write: of several writers of one key,
    exactly one succeeds (the audit log's hash chain relies on it).  ``scan`` returns a
    kind's records in key order."""

    @abc.abstractmethod
    def get_many(self, kind: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]: ...

    @abc.abstractmethod
    def put(self, kind: str, key: str, value: dict[str, Any], *, if_absent: bool = False) -> bool:
        """Store ``value``; with ``if_absent``, only if ``key`` is new.  Returns whether
        the record holds ``value`` now: with ``if_absent``, False if it holds another
        value; True if it holds this very value already (a write retried after its
        response was lost finds its own first try; audit records, which carry their time
        and hash, are never written alike by two writers)."""

    @abc.abstractmethod
    def put_if_unchanged(
        self, kind: str, key: str, value: dict[str, Any],
        expect: dict[tuple[str, str], dict[str, Any]],
    ) -> bool:
        """Store ``value`` only if each record of ``expect`` (``(kind, key)`` → the value
        the caller read) holds that value still, as one atomic step; returns whether it
        was written.  For a write whose check read other records (the last-admin checks
        of ``security/tokens.py``): two writers that each read the other's record before
        either wrote cannot both write."""

    @abc.abstractmethod
    def delete(self, kind: str, key: str) -> bool:
        """Remove a record; returns whether there was one."""

    @abc.abstractmethod
    def scan(
        self, kind: str, *, after: str = "", limit: int | None = None, reverse: bool = False,
        tolerant: bool = False,
    ) -> list[tuple[str, dict[str, Any]]]:
        """``[(key, value)]`` of ``kind`` in key order (descending with ``reverse``); keys
        greater than ``after`` (less than it, with ``reverse``, when it is given).

        A stored value that is not JSON (damaged, or written around this interface) is an
        error; with ``tolerant``, it comes back as an :class:`UnreadableRecord` instead,
        for a reader that reports it and reads on (the audit log's verification)."""

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return self.get_many(kind, [key]).get(key)


class UnreadableRecord(str):
    """The stored text of a record whose value is not JSON, in its place (``tolerant``
    scans)."""


def decode_record(text: str, *, tolerant: bool = False) -> Any:
    """A record's stored JSON text, decoded (see :meth:`Records.scan`)."""
    try:
        return json.loads(text)
    except ValueError:
        if not tolerant:
            raise
        return UnreadableRecord(text)


def check_record_name(what: str, text: str) -> str:
    if not is_record_name(text):
        raise ValueError(f"invalid record {what} {text!r}")
    return text


def is_record_name(text: str) -> bool:
    """Whether ``text`` may be a record's kind or key: not empty, no NUL, at most 1024
    UTF-8 bytes (DynamoDB's limit for a range key: 1024 characters of é were refused
    there, with a ValidationException naming nothing, and taken on the embedded enclave)."""
    return (isinstance(text, str) and bool(text) and "\0" not in text
            and len(text.encode("utf-8", "surrogatepass")) <= 1024)


class Enclave(abc.ABC):
    """One enclave: where tasks, results, job records and nodes meet."""

    queue: TaskQueue
    blobs: BlobStore
    jobs: JobTable
    nodes: NodeRegistry
    records: Records
    url: str
    #: largest body that travels inline in a message; larger ones go to the blob store
    inline_limit: int = 256 * 1024
    #: an enclave on this machine, where an executor may start a node of its own
    local: bool = False

    def lasting(self, exc: BaseException) -> bool:
        """Whether a call that raised ``exc`` would meet it again if tried later (the
        executor gives up at once on such a refused send, else it tries again): kotta's
        own errors here; a backend adds those of its service."""
        return isinstance(exc, KottaError)

    def locked(self, exc: BaseException) -> bool:
        """Whether ``exc`` says that another process held the enclave's write lock for
        longer than was waited (``atomic(wait)``; where there is one)."""
        return False

    def process_ident(self) -> str | None:
        """Who this process is, for ``process_gone`` in another process of the machine (a
        node, on the embedded enclave), or None where that cannot be told."""
        return None

    def process_gone(self, ident: str) -> bool:
        """Whether the process ``process_ident`` named has surely ended; False if unsure."""
        return False

    def ring_nodes(self, queue: str) -> None:  # noqa: B027 - optional: wake idle nodes
        """Tell nodes serving ``queue`` there is work (a hint; nodes also poll)."""

    def ring_client(self, client_id: str) -> None:  # noqa: B027 - optional
        """Tell a client a result is waiting (a hint; clients also poll)."""

    def doorbell(self, name: str):
        """A readable socket that rings for ``name`` (``node-ID`` / ``client-ID``), or None.

        Without a doorbell, nodes and clients long-poll (``wait_seconds``) in a thread of
        their own instead."""
        return None

    def reply_inbox(self, client_id: str):
        """A readable socket on which nodes hand this client its replies directly, or None:
        then replies travel on the reply queue only.  Either way the job table has them."""
        return None

    def close_inbox(self, sock, *, drain: bool = False) -> list[bytes]:
        """Close an inbox ``reply_inbox`` or ``task_inbox`` opened; with ``drain``, what
        was still in it (nothing more can arrive once it is closed to senders)."""
        return []

    # -- hand-off: a client hands a lone task to a node directly, instead of through the
    # queue; the node records the job (``adopt``), so the client writes nothing

    def task_inbox(self, node_id: str):
        """A readable socket on which clients hand this node tasks directly, or None:
        then tasks reach it through the queue only.  ``read_inbox`` reads it."""
        return None

    def hand_off(self, queue: str, body: bytes) -> bool:
        """Hand a task envelope to a node serving ``queue``.  False: no node could take it
        (the caller records the job and queues the task instead).  True does not mean
        the node recorded the job: it may die first, so the caller checks, in time, that
        the job exists (and records it itself if not)."""
        return False

    def adopt(self, job: NewJob, visibility_timeout: float, holder: str | None) -> Delivery | None:
        """Record a handed-off job and its task message (pending), unless a job of that id
        exists (None: a replay, or the client recorded it itself).  With a ``holder`` the
        message is already received by it (the Delivery); without, it is queued, visible."""
        raise NotImplementedError("this backend takes no handed-off tasks")

    def read_inbox(self, sock) -> list[bytes]:
        """The reply messages waiting on an inbox, from senders this enclave trusts."""
        return []

    def reply_direct(self, client_id: str, messages: list[Message]) -> tuple[list[Message], bool]:
        """Hand reply messages to a client's inbox; returns those it could not take (no
        inbox, or a full one), which the caller sends on the reply queue instead, and
        whether the inbox was full (its client busy: worth another try soon)."""
        return messages, False

    def atomic(self, wait: float | None = None):
        """Group the calls made inside it into one transaction where the backend can
        (the embedded one); elsewhere each call stands alone.  ``wait``: the longest its
        beginning waits for another process's transaction (where there are any), if
        shorter than the backend's own lock timeout; past it, a locked error."""
        return contextlib.nullcontext()

    def removed(self) -> str | None:
        """Why this enclave is no longer where it was opened (its files removed or put
        in place of others under it), or None: a node then stops, as it serves an
        enclave nobody can reach any more."""
        return None

    def checkpoint(self, *, truncate: bool = False) -> None:  # noqa: B027 - optional
        """Periodic housekeeping a node runs off the task path (the embedded one syncs
        its log to disk here; ``truncate``: and cuts a log over its limit back at once)."""

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint`` should run before its period is up: the embedded
        enclave's write-ahead log has grown past the size it is kept to."""
        return False

    def close(self) -> None:  # noqa: B027
        pass


def reply_queue(client_id: str) -> str:
    return f"reply.{client_id}"
