"""The embedded enclave: one SQLite file in WAL mode plus a blob directory, under
``$KOTTA_HOME``.  Safe for many processes on one machine.

It keeps the semantics the AWS backend has (visibility timeouts, receive counts, a
dead-letter table, conditional job writes) so that code and tests written against it hold
on AWS too.  Two things only a single machine allows are added as speed-ups, never as the
only path: doorbells (abstract Unix datagram sockets that wake a sleeping node or client)
and reaping the messages held by a node process that no longer exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import sqlite3
import stat
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil

from .. import states
from ..errors import ConfigurationError
from ..states import JobState
from .base import (
    KILLED_PENDING,
    BlobStore,
    Delivery,
    Enclave,
    Finished,
    JobRecord,
    JobTable,
    Message,
    NewJob,
    NodeInfo,
    NodeRegistry,
    Pruned,
    Records,
    TaskQueue,
    check_record_name,
    decode_record,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    body BLOB NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    holder TEXT,
    sent REAL
);
-- A queue's messages in order, with when each is visible: a receive skips the messages
-- held (received, not yet acked) in the index alone.  On (queue, id) it read each one's
-- row to see it was held: a node holds up to 160 a worker of tiny tasks, so a receive
-- read thousands of rows on a big node, or on several (35 us a task received with 3000
-- held, against 15).  Not (queue, visible_at, id), which reads none of them: a task
-- whose node died would then wait, once visible again, behind every task queued since.
-- An enclave made before it gets it as it is opened.
CREATE INDEX IF NOT EXISTS messages_ready ON messages(queue, id, visible_at);
DROP INDEX IF EXISTS messages_queue;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    body BLOB NOT NULL,
    receive_count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    client TEXT NOT NULL,
    queue TEXT NOT NULL,
    fn TEXT NOT NULL,
    walltime REAL NOT NULL,
    n INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    reason TEXT,
    node TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    kill_requested INTEGER NOT NULL DEFAULT 0,
    usage TEXT,
    history TEXT NOT NULL DEFAULT '',
    result BLOB,
    result_ref TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
-- `kotta jobs` of one owner (EmbeddedJobs.list), newest first: without it a listing read
-- the whole table, newest first, to find the few that match (seconds, from disk, in an
-- enclave of a few hundred thousand finished jobs).  An enclave made before it gets it as
-- it is opened (some seconds for a million jobs, once).  Not one on the state: every
-- move of a job would write it, and SQLite took it, not the primary key, to find the
-- jobs a node claims (every job in the states a claim moves from read at each claim:
-- five times the cost, and more as the queue grew); --state alone reads the table
-- newest first.
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    workers INTEGER NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    managed_by TEXT,
    ident TEXT,
    python TEXT
);
"""

_ADDED_COLUMNS = (("messages", "sent", "REAL"), ("nodes", "ident", "TEXT"),
                  ("nodes", "python", "TEXT"))
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")
_JOB_COLS = (
    "job_id, owner, client, queue, fn, walltime, state, created, updated, n, node, attempts,"
    " reason, started, finished, kill_requested, usage"
)
#: the bytes a job's row holds, roughly: its result, history, usage and the rest
_ROW_BYTES = ("coalesce(length(result), 0) + length(history) + coalesce(length(usage), 0)"
              " + coalesce(length(reason), 0) + length(fn) + 200")
# A node that has not sent a heartbeat for this long is taken for dead.
NODE_STALE_AFTER = 30.0
_REAP_EVERY = 1.0
RESULT_INLINE_LIMIT = 1 << 20
#: jobs a prune removes a transaction: the nodes wait for the write lock no longer than
#: the delete of this many rows takes (milliseconds), between two of its transactions
PRUNE_CHUNK = 300
#: the write-ahead log shrinks back to this size once the database holds all of it (without
#: a limit it keeps the largest size it ever had: gigabytes after a long-held read)
WAL_SIZE_LIMIT = 64 << 20
#: seconds a checkpoint of a log over that size waits for the write lock and the log's readers
RESTART_WAIT = 0.05
#: a write-ahead log this large that a checkpoint cannot copy whole is warned about
WAL_WARN_SIZE = 256 << 20
#: seconds between two such warnings
WAL_WARN_EVERY = 600.0
#: the largest reply datagram; a larger reply message travels on the reply queue
INBOX_DATAGRAM = 512 * 1024
#: the largest task a client hands to a node directly (bigger ones go by the queue)
HAND_OFF_LIMIT = 64 * 1024
#: sender sockets kept, one a destination inbox: the datagrams an inbox has not read yet
#: count against the send buffer of the socket that sent them, so one socket for all let a
#: client stopped (^Z) with a few big replies unread make every other inbox look full
SENDERS_KEPT = 64
#: Linux passes a datagram's sender (pid, uid, gid) to a receiver that asks
_PASSCRED = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")
_CRED = struct.Struct("3i")
log = logging.getLogger("kotta.embedded")
#: enclave directories open to other OS users, warned of in this process
_WARNED_OPEN: set[Path] = set()


class _Db:
    """One SQLite connection per thread and process, and write transactions."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        # Processes opening a new enclave together race to make its tables: whoever waits
        # for the lock tries again (every statement is "IF NOT EXISTS").
        _retry(self.conn().executescript, SCHEMA)
        # columns an enclave made by an earlier version lacks: messages' send time, nodes'
        # process identity and Python version
        for table, column, kind in _ADDED_COLUMNS:
            self._add_column(table, column, kind)

    def _add_column(self, table: str, column: str, kind: str) -> None:
        def has() -> bool:
            return column in {row[1] for row in self.read(f"PRAGMA table_info({table})")}

        if has():
            return
        try:
            _retry(self.conn().execute, f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError:
            if not has():  # not another process's adding it first: locked for too long
                raise

    def conn(self) -> sqlite3.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            _retry(conn.execute, "PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (which fsync) run from the node's upkeep, off the task path.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # No busy handler: SQLite's sleeps for at least a millisecond when the lock is
            # taken; _retry backs off from 20 microseconds instead.
            conn.execute("PRAGMA busy_timeout=0")
            local.conn, local.pid, local.depth = conn, os.getpid(), 0
            local.closer = _Closer(conn)
        return conn

    def close(self) -> None:
        """Close this thread's connection, which it opens again if it uses the database
        afterwards.  Another thread's is closed as that thread ends: closed from here as
        that thread used it, it crashed the interpreter (a segmentation fault)."""
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid() or local.depth:
            return  # (none, its parent's, or inside a transaction)
        closer, local.conn, local.closer = local.closer, None, None
        closer.close()

    def named(self, exc: sqlite3.Error, wait: float | None = None) -> sqlite3.Error | None:
        """``exc`` (of the same type) saying which file is at fault, and what to do, when
        the fault is the database file's own (damaged, not SQLite, its disk full or
        failing) or it has been locked too long by another process; else None.  SQLite's messages name no file: a node died with a
        traceback ending in "database disk image is malformed", every `kotta` command
        printed one, and an executor broke saying only that."""
        code = getattr(exc, "sqlite_errorcode", None)
        what = _FILE_FAULTS.get(code & 0xFF) if isinstance(code, int) else None
        if what is None or str(exc).startswith("the enclave database "):
            return None
        timeout = LOCK_TIMEOUT if wait is None else wait  # (what was waited: tx(wait))
        named = type(exc)(f"the enclave database {self.path} {what.format(exc=exc, path=self.path, timeout=timeout)}")
        named.sqlite_errorcode, named.sqlite_errorname = code, getattr(exc, "sqlite_errorname", None)
        return named

    @contextmanager
    def naming(self):
        """Errors of the database file raised inside, named (:meth:`named`)."""
        try:
            yield
        except sqlite3.Error as exc:
            named = self.named(exc)
            if named is None:
                raise
            raise named from exc

    @contextmanager
    def tx(self, wait: float | None = None):
        """A write transaction; nested calls on one thread join the outer one.  ``wait``:
        the seconds to wait for another's write lock, if not LOCK_TIMEOUT."""
        conn = self.conn()
        local = self._local
        if local.depth:  # nested: a savepoint, so a failed inner call leaves nothing behind
            local.depth += 1
            depth = local.depth
            name = f"kotta_{depth}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                self._undo(depth)
                raise
            else:
                conn.execute(f"RELEASE {name}")
                # its hooks now belong to the enclosing savepoint or transaction
                local.undo = [(min(d, depth - 1), fn) for d, fn in local.undo]
            finally:
                local.depth -= 1
            return
        local.depth, local.undo = 1, []
        try:
            # in the try: an exception that comes as BEGIN returns (a KeyboardInterrupt,
            # Ctrl-C in the caller's thread) must roll back, or the transaction stays
            # open on this thread's connection, holding the enclave's write lock for good
            _retry(conn.execute, "BEGIN IMMEDIATE", wait=wait)
            yield conn
            local.depth = 0
            _retry(conn.execute, "COMMIT")
        except BaseException as exc:
            local.depth = 0
            if conn.in_transaction:  # (a COMMIT that failed leaves it open)
                conn.execute("ROLLBACK")
            self._undo(1)
            named = self.named(exc, wait) if isinstance(exc, sqlite3.Error) else None
            if named is not None:
                raise named from exc
            raise
        local.undo = []

    def on_rollback(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` if what this thread's transaction has written so far is rolled back
        (by its savepoint or the whole transaction); forget it once that is committed.  For
        what lives outside the database: a blob that only a row written here names."""
        self._local.undo.append((self._local.depth, fn))

    def _undo(self, depth: int) -> None:
        local = self._local
        run = [fn for d, fn in local.undo if d >= depth]
        local.undo = [(d, fn) for d, fn in local.undo if d < depth]
        for fn in reversed(run):
            try:
                fn()
            except Exception:  # noqa: BLE001 - the rollback's own error is the one to raise
                log.warning("cleaning up after a rolled-back transaction failed", exc_info=True)

    def in_tx(self) -> bool:
        """Whether this thread is inside a write transaction."""
        return bool(getattr(self._local, "depth", 0)) and self._local.pid == os.getpid()

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        conn = self.conn()
        try:
            return _retry(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:  # (no naming(): reads are the hot path)
            named = self.named(exc)
            if named is None:
                raise
            raise named from exc


class _Closer:
    """Closes a thread's connection once nothing holds it: as its thread ends (or its
    enclave goes).  A sqlite3 connection is in a reference cycle with its own statement
    cache, so a dead thread's was closed only when the garbage collector ran, which in a
    long-lived process with many objects may be rare: each thread that had used the
    enclave (the manager of every executor shut down, a caller's short-lived thread)
    kept its database and log descriptors and its page cache open until then.  Never in
    a child forked since: the connection is its parent's."""

    __slots__ = ("conn", "pid")

    def __init__(self, conn: sqlite3.Connection):
        self.conn, self.pid = conn, os.getpid()

    def close(self) -> None:
        try:
            if self.pid == os.getpid():
                self.conn.close()
        except Exception:  # noqa: BLE001 - at interpreter exit, or a connection in use
            pass

    __del__ = close


#: faults of the database file itself, by SQLite's primary result code, and what to do
_FILE_FAULTS = {
    11: "is damaged ({exc}): stop its nodes and clients, then restore it from a backup "
        "(docs/operations.md), or keep what SQLite can still read of it (`sqlite3 {path} "
        ".recover | sqlite3 NEW.db`, and NEW.db in its place)",  # SQLITE_CORRUPT
    26: "is not an SQLite database ({exc}): it was overwritten; restore it from a backup "
        "(docs/operations.md)",  # SQLITE_NOTADB
    13: "cannot grow ({exc}): free space on its file system",  # SQLITE_FULL
    10: "cannot be read or written ({exc}; is its disk failing, or was its kotta.db-wal "
        "deleted while in use?)",  # SQLITE_IOERR
    # not the file's fault, but as nameless: `kotta cancel` printed a traceback ending in
    # "database is locked", and nodes and executors said only that (raised by _retry
    # once the lock has been waited for LOCK_TIMEOUT)
    5: "is locked ({exc}): another process has held its write lock for over {timeout:g} s "
       "(a sqlite3 shell inside a transaction, a client stopped by ^Z inside one?): end "
       "that transaction, or continue or kill that process",  # SQLITE_BUSY
}


LOCK_TIMEOUT = 60.0
#: the longest database path SQLite opens: its 512 bytes (SQLITE_MAX_PATHNAME), less the
#: "-journal" it adds for a file of its own.  A longer $KOTTA_HOME (a deep project tree)
#: was "unable to open database file", with no word of why
SQLITE_MAX_PATH = 504


def _retry(fn, *args, wait: float | None = None):
    """Run ``fn`` until the database is not locked, backing off from 20 us to 0.3 ms, for
    up to ``wait`` seconds (LOCK_TIMEOUT if None)."""
    delay, deadline = 2e-5, None
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            now = time.monotonic()
            deadline = deadline or now + (LOCK_TIMEOUT if wait is None else wait)
            if now > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 1.5, 3e-4)


def _msg_id(receipt: str) -> int:
    """The message row id a receipt (``"<id>:<token>"``) names; 0 for a foreign receipt."""
    head = receipt.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def _event(ts: float, state: JobState, detail: str | None) -> str:
    """One line of a job's history: ``[ts, state, detail]``."""
    return orjson.dumps([ts, str(state), detail]).decode() + "\n"


def _usage_text(usage: dict | None) -> str | None:
    if not usage:
        return None
    try:
        return orjson.dumps(usage).decode()
    except TypeError:  # an int over 64 bits
        return json.dumps(usage)


def _insert_rows(
    conn: sqlite3.Connection, head: str, row: str, rows: list[tuple], tail: str = ""
) -> None:
    """Insert many rows with a few multi-row statements rather than one step per row: each
    step releases the GIL, and a client's submitting thread makes getting it back slow."""
    per = max(1, _max_variables(conn, 30000) // max(1, row.count("?")))
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        conn.execute(head + ",".join([row] * len(part)) + tail, [v for r in part for v in r])


def _max_variables(conn: sqlite3.Connection, most: int) -> int:
    """How many ``?`` one statement may hold, at most ``most``: an SQLite older than 3.32
    (Ubuntu 20.04's, RHEL 8's, which a Python built there uses) allows 999, later ones
    32766; a statement with more fails with "too many SQL variables"."""
    return min(most, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


#: the states of a job a node holds, as SQL: a finish of one it never began takes its
#: claim's attempt back only from these (Finished.unbegun)
_CLAIMED = ",".join(f"'{s}'" for s in (JobState.STAGING_INPUTS, JobState.PROCESSING))


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(seq: Sequence, size: int = 500):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class EmbeddedQueue(TaskQueue):
    def __init__(self, db: _Db, enclave: EmbeddedEnclave):
        self._db = db
        self._enclave = enclave
        self._last_reap = -_REAP_EVERY  # (monotonic: a wall clock stepped back must not stop it)

    def send(self, queue: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        now = time.time()
        with self._db.tx() as c:
            _insert_rows(
                c,
                "INSERT INTO messages(queue, job_id, body, visible_at, sent) VALUES ",
                "(?,?,?,?,?)",
                [(queue, m.job_id, m.body, now, now) for m in messages],
            )

    def _any_ready(self, queue: str, now: float) -> bool:
        """A read (no write lock) to skip write transactions on an empty queue."""
        return bool(
            self._db.read(
                "SELECT 1 FROM messages WHERE queue=? AND visible_at<=? LIMIT 1", (queue, now)
            )
        )

    def receive(self, queue, max_messages, visibility_timeout, holder, wait_seconds=0.0):
        deadline = time.monotonic() + wait_seconds
        while True:
            got = self._receive(queue, max_messages, visibility_timeout, holder)
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)

    def _receive(self, queue, max_messages, visibility_timeout, holder):
        if time.monotonic() - self._last_reap > _REAP_EVERY:
            self._last_reap = time.monotonic()
            self._enclave.reap_dead_nodes()
        now = time.time()
        # outside a transaction, a read first spares an empty queue a write lock
        if not self._db.in_tx() and not self._any_ready(queue, now):
            return []
        token = uuid.uuid4().hex[:12]
        with self._db.tx() as c:
            now = time.time()  # after any wait for the lock: hidden for the whole timeout
            rows = c.execute(
                "UPDATE messages SET visible_at=?, receive_count=receive_count+1,"
                " receipt=id||':'||?, holder=? WHERE id IN (SELECT id FROM messages"
                " WHERE queue=? AND visible_at<=? ORDER BY id LIMIT ?)"
                " RETURNING job_id, body, receipt, receive_count, sent",
                (now + visibility_timeout, token, holder, queue, now, max_messages),
            ).fetchall()
        rows.sort(key=lambda r: _msg_id(r[2]))
        return [Delivery(*r, str(_msg_id(r[2]))) for r in rows]

    def take(self, queue, max_messages, wait_seconds=0.0):
        deadline = time.monotonic() + wait_seconds
        while not self._any_ready(queue, time.time()):
            if time.monotonic() >= deadline:
                return []
            time.sleep(0.01)
        with self._db.tx() as c:
            rows = c.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE queue=?"
                " AND visible_at<=? ORDER BY id LIMIT ?) RETURNING job_id, body",
                (queue, time.time(), max_messages),
            ).fetchall()
        return [Message(*r) for r in rows]

    def _by_receipt(self, sql: str, deliveries: Iterable[Delivery], extra=lambda: ()):
        """Run ``sql`` (ending ``WHERE id=? AND receipt=?``) for each delivery: the id finds
        the row, the receipt makes sure it is still this delivery's.  ``extra()``: the
        leading parameters, taken once the write lock is held."""
        rows = [(_msg_id(d.receipt), d.receipt) for d in deliveries]
        if rows:
            with self._db.tx() as c:
                first = extra()
                c.executemany(sql, [(*first, *row) for row in rows] if first else rows)

    def extend(self, deliveries, visibility_timeout):
        self._by_receipt(
            "UPDATE messages SET visible_at=? WHERE id=? AND receipt=?",
            deliveries,
            lambda: (time.time() + visibility_timeout,),  # from when the lock is held
        )

    def release(self, deliveries):
        self._by_receipt(
            "UPDATE messages SET visible_at=0, holder=NULL WHERE id=? AND receipt=?", deliveries
        )

    def hand_back(self, deliveries):
        # only while held (a holder): a delivery handed back again, or released, must not
        # take back the receive of an earlier delivery too
        self._by_receipt(
            "UPDATE messages SET visible_at=0, holder=NULL,"
            " receive_count=max(receive_count-1, 0) WHERE id=? AND receipt=?"
            " AND holder IS NOT NULL", deliveries
        )

    def ack(self, deliveries):
        self._by_receipt("DELETE FROM messages WHERE id=? AND receipt=?", deliveries)

    def dead_letter(self, deliveries, reason):
        deliveries = list(deliveries)
        if not deliveries:
            return
        now = time.time()
        with self._db.tx() as c:
            for d in deliveries:
                c.execute(
                    "INSERT INTO dead_letters(queue, job_id, body, receive_count, reason, dead_at)"
                    " SELECT queue, job_id, body, receive_count, ?, ? FROM messages"
                    " WHERE id=? AND receipt=?",
                    (reason, now, _msg_id(d.receipt), d.receipt),
                )
                c.execute(
                    "DELETE FROM messages WHERE id=? AND receipt=?", (_msg_id(d.receipt), d.receipt)
                )

    def dead_letters(self, queue):
        rows = self._db.read(
            "SELECT job_id, receive_count, reason, dead_at FROM dead_letters WHERE queue=?"
            " ORDER BY id",
            (queue,),
        )
        return [dict(zip(("job_id", "receive_count", "reason", "dead_at"), r, strict=False)) for r in rows]

    def depth(self, queue):
        return self._db.read("SELECT count(*) FROM messages WHERE queue=?", (queue,))[0][0]

    def close_reply(self, client_id):
        with self._db.tx() as c:
            c.execute("DELETE FROM messages WHERE queue=?", (f"reply.{client_id}",))

    def expire_replies(self, before):
        # every "reply.<client>" queue: a range of the queue index ("/" follows ".")
        with self._db.tx() as c:
            return c.execute(
                "DELETE FROM messages WHERE queue>='reply.' AND queue<'reply/'"
                " AND coalesce(sent, visible_at)<?", (before,)
            ).rowcount


class EmbeddedBlobs(BlobStore):
    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key[:2] / key

    def put(self, key, data):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            # a write cut short (a full disk) leaves no partial file behind: nothing
            # else would ever remove it, and it would keep the disk full for the enclave
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and exc.filename is None:
                # a failed write names no file ("[Errno 28] No space left on device", from
                # a submit): the blob's path says which disk is full, the enclave's
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"no blob {key!r} in the enclave") from None

    def delete(self, keys):
        """Every key's file, even past one that cannot be deleted (the first such error
        raised at the end): the others would be left with it, and tried again with it."""
        failed: OSError | None = None
        for key in keys:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def older(self, prefix, before, *, after="", scan=1000):
        # a key lives in the directory of its first two characters (_path): one
        # character for a key of one
        dirs = sorted(
            d for d in os.listdir(self.root) if 0 < len(d) <= 2 and (
                d.startswith(prefix[:2]) if len(prefix) >= 2 else d.startswith(prefix))
        ) if os.path.isdir(self.root) else []
        names: list[tuple[str, Path]] = []
        for d in dirs:
            try:
                listed = os.listdir(self.root / d)
            except FileNotFoundError:
                continue
            names += [(n, self.root / d / n) for n in listed
                      if n.startswith(prefix) and n > after and not n.startswith(".")]
            # A write's temporary file (put) whose writer was killed before renaming it
            # (a client killed during a burst of big submits): no key names it, so it is
            # removed here, once as old (a live write keeps its file's time recent)
            for n in listed:
                if n.startswith("." + prefix) and n.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if (self.root / d / n).stat().st_mtime < before:
                            (self.root / d / n).unlink()
        names.sort()
        page, more = names[:scan], len(names) > scan
        old = []
        for name, path in page:
            try:
                if path.stat().st_mtime < before:
                    old.append(name)
            except FileNotFoundError:  # deleted meanwhile
                continue
        return old, (page[-1][0] if more else "")


class EmbeddedJobs(JobTable):
    def __init__(self, db: _Db, blobs: EmbeddedBlobs):
        self._db = db
        self._blobs = blobs

    def create(self, jobs: Sequence[NewJob], *, enqueue: bool = True) -> None:
        """Create job records and enqueue their tasks in one transaction.  A job id that is
        recorded already keeps its record (a retried create must not reset a job a node
        has started or finished); its task is queued again, as on AWS."""
        if not jobs:
            return
        now = time.time()
        event = _event(now, JobState.PENDING, None)
        with self._db.tx() as c:
            _insert_rows(
                c,
                "INSERT INTO jobs(job_id, owner, client, queue, fn, walltime, n, state, created,"
                " updated, history) VALUES ",
                "(?,?,?,?,?,?,?,'pending',?,?,?)",
                [(j.job_id, j.owner, j.client, j.queue, j.fn, j.walltime, j.n, now, now, event)
                 for j in jobs],
                " ON CONFLICT(job_id) DO NOTHING",
            )
            if enqueue:
                _insert_rows(
                    c,
                    "INSERT INTO messages(queue, job_id, body, visible_at, sent) VALUES ",
                    "(?,?,?,?,?)",
                    [(j.queue, j.job_id, j.body, now, now) for j in jobs],
                )

    def transition(self, job_ids, new, *, from_states=None, node=None, reason=None,
                   held_by=None):
        new = JobState(new)
        allowed = states.sources(new)
        if from_states is not None:
            from_states = frozenset(JobState(s) for s in from_states)
            for s in from_states:
                states.check(s, new)
            allowed = from_states
        if not job_ids:
            return []
        now = time.time()
        moved: list[str] = []
        started = new in (JobState.STAGING_INPUTS, JobState.PROCESSING)
        back = new is JobState.PENDING
        # an attempt is a node beginning the job: a data task's move on from staging its
        # inputs to running is the same attempt
        attempt = "1" if new is JobState.STAGING_INPUTS else "(state<>'staging_inputs')"
        event = _event(now, new, reason or node)
        with self._db.tx() as c:
            # each id once: one named again in a later chunk would move again (a job in
            # processing, say, to processing: a second attempt, a second history line)
            for chunk in _chunks(list(dict.fromkeys(job_ids))):
                sql = (
                    f"UPDATE jobs SET state=?, updated=?, reason=coalesce(?, reason), history=history||?"
                    f"{f', node=?, attempts=attempts+{attempt}, started=?' if started else ''}"
                    # back to pending (a stopping node's, never begun): a job no node holds,
                    # not started (a cancel reads started as "it ran"), and the claim's
                    # attempt taken back (as its delivery is): it was not attempted
                    f"{', node=NULL, started=NULL, attempts=attempts-1' if back else ''}"
                    f"{', finished=?' if new.final else ''}"
                    f" WHERE job_id IN ({_marks(len(chunk))})"
                    f" AND state IN ({_marks(len(allowed))})"
                    f"{' AND node=? AND kill_requested=0' if held_by is not None else ''}"
                    " RETURNING job_id"
                )
                params: list[Any] = [str(new), now, reason, event]
                if started:
                    params += [node, now]
                if new.final:
                    params.append(now)
                params += [*chunk, *map(str, allowed)]
                if held_by is not None:
                    params.append(held_by)
                moved += [r[0] for r in c.execute(sql, params).fetchall()]
        return moved

    def finish(self, results: Sequence[Finished]) -> list[str]:
        if not results:
            return []
        # One result a job: a later one for the same job could not be recorded anyway.
        firsts: dict[str, Finished] = {}
        for r in results:
            firsts.setdefault(r.job_id, r)
        results = list(firsts.values())
        for r in results:
            if not JobState(r.state).final:
                raise ValueError(f"finish() records final states, not {r.state}")
        # Large results go to a blob of their own first; a row names it only once written,
        # and a blob whose row was not recorded (a duplicate), or is rolled back, is removed.
        spilled: dict[str, str] = {}
        for i, r in enumerate(results):
            if len(r.result) > RESULT_INLINE_LIMIT:
                key = f"result-{r.job_id}-{uuid.uuid4().hex[:12]}"
                try:
                    self._blobs.put(key, r.result)
                except OSError as exc:
                    # A full disk, say: the job fails, saying why.  Raised, it would fail
                    # the whole batch, each try again, until its node gave up and died,
                    # and its task ran again on the next, to the same end, until it was
                    # dead-lettered, with every other result of those batches lost too.
                    results[i] = Finished(
                        r.job_id, JobState.FAILED, b"",
                        f"its result of {len(r.result)} bytes could not be stored in the "
                        f"enclave's blob directory {self._blobs.root}: {exc}",
                        r.usage, r.at, r.attempt, r.unbegun)
                    log.warning("job %s failed: %s", r.job_id, results[i].reason)
                    continue
                spilled[r.job_id] = key
        by_state: dict[tuple[JobState, bool], list[Finished]] = {}
        for r in results:
            by_state.setdefault((JobState(r.state), r.unbegun), []).append(r)
        now = time.time()
        recorded: list[str] = []
        try:
            with self._db.tx() as c:
                if spilled:
                    self._db.on_rollback(
                        lambda: self._blobs.delete(spilled[j] for j in recorded if j in spilled)
                    )
                for (state, unbegun), group in by_state.items():  # (one statement per
                    # state and 300 jobs) a claim never begun: not an attempt, nor a start
                    # (Finished.unbegun); the SET reads the row as it was
                    take_back = (f", attempts=jobs.attempts-(jobs.state IN ({_CLAIMED})),"
                                 " started=NULL" if unbegun else "")
                    allowed = [str(x) for x in states.sources(state)]
                    events: dict[str | None, str] = {}  # most results share one reason: None
                    # (six values a job, and three and the allowed states a statement)
                    per = min(300, (_max_variables(c, 30000) - 3 - len(allowed)) // 6)
                    for part in _chunks(group, per):
                        params: list[Any] = []
                        for r in part:
                            ev = events.get(r.reason)
                            if ev is None:
                                ev = events[r.reason] = _event(now, state, r.reason)
                            ref = spilled.get(r.job_id)
                            params += (r.job_id, r.reason, None if ref else r.result, ref,
                                       _usage_text(r.usage), ev)
                        params += (str(state), now, now, *allowed)
                        recorded += [
                            row[0]
                            for row in c.execute(
                                "WITH v(job_id, reason, result, ref, usage, ev) AS (VALUES "
                                + ",".join(["(?,?,?,?,?,?)"] * len(part))
                                + ") UPDATE jobs SET state=?, reason=v.reason, result=v.result,"
                                " result_ref=v.ref, usage=v.usage, finished=?, updated=?,"
                                f" history=jobs.history||v.ev{take_back}"
                                " FROM v WHERE jobs.job_id=v.job_id"
                                f" AND jobs.state IN ({_marks(len(allowed))})"
                                " RETURNING jobs.job_id",
                                params,
                            ).fetchall()
                        ]
        finally:
            self._blobs.delete(ref for job_id, ref in spilled.items() if job_id not in recorded)
        return recorded

    def _record(self, row: tuple, result: bytes | None = None) -> JobRecord:
        (job_id, owner, client, queue, fn, walltime, state, created, updated, n, node,
         attempts, reason, started, finished, kill, usage) = row
        return JobRecord(
            job_id=job_id, owner=owner, client=client, queue=queue, fn=fn, walltime=walltime,
            state=JobState(state), created=created, updated=updated, n=n, node=node,
            attempts=attempts, reason=reason, started=started, finished=finished,
            kill_requested=bool(kill), usage=json.loads(usage) if usage else None, result=result,
        )

    def get_many(self, job_ids, *, with_result=False):
        out: dict[str, JobRecord] = {}
        cols = _JOB_COLS + (", result, result_ref" if with_result else "")
        for chunk in _chunks(list(job_ids)):
            for row in self._db.read(
                f"SELECT {cols} FROM jobs WHERE job_id IN ({_marks(len(chunk))})", chunk
            ):
                result, unread = None, None
                if with_result:
                    result, ref = row[-2], row[-1]
                    row = row[:-2]
                    if ref:
                        result, unread = self._read_spilled(ref)
                rec = self._record(row, result)
                if unread and not rec.reason:  # said, as the reason its future fails for
                    rec.reason = unread
                out[rec.job_id] = rec
        return out

    def owners(self, job_ids):
        out: dict[str, str] = {}
        for chunk in _chunks(list(job_ids)):  # (a fifth of get_many's time: no records built)
            out.update(self._db.read(
                f"SELECT job_id, owner FROM jobs WHERE job_id IN ({_marks(len(chunk))})", chunk))
        return out

    def result_refs(self, job_ids):
        out: dict[str, str | None] = {}
        for chunk in _chunks(list(job_ids)):
            out.update(self._db.read(
                f"SELECT job_id, result_ref FROM jobs WHERE job_id IN ({_marks(len(chunk))})",
                chunk))
        return out

    def _read_spilled(self, ref: str) -> tuple[bytes | None, str | None]:
        """A result kept in a blob, or None and why it cannot be read: deleted (a user
        cleaning up ``blobs/``), or there but unreadable (another OS user's file, a disk
        error).  Raised, that broke the executor reading it (BrokenEnclave for every
        future, after a minute of trying again); missing, its future said the job had
        recorded no result, with no word of the blob."""
        try:
            return self._blobs.get(ref), None
        except (KeyError, OSError) as exc:
            why = exc.args[0] if isinstance(exc, KeyError) else exc
            return None, (f"its result, the blob {ref} in {self._blobs.root}, cannot be "
                          f"read: {why}")

    def list(self, *, owner=None, state=None, limit=50):
        where, params = [], []
        if owner:
            where.append("owner=?")
            params.append(owner)
        if state:
            where.append("state=?")
            params.append(str(JobState(state)))
        sql = f"SELECT {_JOB_COLS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, rowid DESC LIMIT ?"
        return [self._record(r) for r in self._db.read(sql, [*params, limit])]

    def history(self, job_id):
        rows = self._db.read("SELECT history FROM jobs WHERE job_id=?", (job_id,))
        if not rows:
            return []
        return [tuple(json.loads(line)) for line in rows[0][0].splitlines()]

    def delete(self, job_ids):
        ids = list(dict.fromkeys(job_ids))
        refs: list[str] = []
        with self._db.tx() as c:
            for chunk in _chunks(ids):
                marks = _marks(len(chunk))
                refs += [r[0] for r in c.execute(
                    f"SELECT result_ref FROM jobs WHERE result_ref IS NOT NULL AND job_id IN ({marks})",
                    chunk,
                ).fetchall()]
                c.execute(f"DELETE FROM jobs WHERE job_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM messages WHERE job_id IN ({marks})", chunk)
        # a task's sections too large for its message: "<section>-<job id>" (executor)
        refs += [f"{section}-{j}" for j in ids for section in ("fn", "args")]
        self._blobs.delete(refs)

    def prune(self, before, *, owner=None, dry_run=False):
        final = [str(s) for s in states.FINAL]
        # final and finished before then (a job recorded final without a finish time, by
        # an older version, by its last change); the condition again in each delete,
        # though nothing leaves a final state
        cond = (f"state IN ({_marks(len(final))}) AND coalesce(finished, updated)<?"
                # (+owner: not by the owner index, which SQLite took, then sorted all the
                # owner's jobs by rowid again for every page: a prune of 20,000 jobs took
                # a second, of a million most of an hour)
                + (" AND +owner=?" if owner is not None else ""))
        cond_params = [*final, before, *([owner] if owner is not None else [])]
        # The task messages no node has taken of the jobs to go: cancelled before one did
        # (a queue no node served).  Left, each kept its pickled call in the enclave for
        # good, counted in the queue's depth, and the node that took it at last
        # dead-lettered it as corrupt (its blobs gone), in dead letters no prune removes.
        # Read once, the queues against the jobs' key (messages have no index by job);
        # not replies, which hold other jobs' too, and expire (TaskQueue.expire_replies)
        queued: dict[str, list[tuple[int, int]]] = {}
        for mid, job_id, size in self._db.read(
                "SELECT m.id, m.job_id, length(m.body) FROM messages m JOIN jobs"
                " ON jobs.job_id=m.job_id WHERE NOT (m.queue>='reply.' AND m.queue<'reply/')"
                f" AND {cond}", cond_params):
            queued.setdefault(job_id, []).append((mid, size))
        pruned, after = Pruned(), 0
        while True:
            # a page read outside the write lock, in rowid order from where the last one
            # ended: one pass over the table in all, whatever its size
            page = self._db.read(
                f"SELECT rowid, job_id FROM jobs WHERE rowid>? AND {cond} ORDER BY rowid"
                " LIMIT ?", [after, *cond_params, PRUNE_CHUNK])
            if not page:
                return pruned
            after = page[-1][0]
            ids = [r[1] for r in page]
            marks = _marks(len(ids))
            # dead letters have no index by job: their ids read here, deleted by key
            dead = self._db.read(
                f"SELECT id, length(body), job_id FROM dead_letters WHERE job_id IN ({marks})",
                ids)
            if dry_run:
                rows = self._db.read(
                    f"SELECT job_id, result_ref, {_ROW_BYTES} FROM jobs WHERE job_id IN"
                    f" ({marks}) AND {cond}", [*ids, *cond_params])
            else:
                with self._db.tx() as c:
                    rows = c.execute(
                        f"DELETE FROM jobs WHERE job_id IN ({marks}) AND {cond}"
                        f" RETURNING job_id, result_ref, {_ROW_BYTES}",
                        [*ids, *cond_params]).fetchall()
                    dead = [d for d in dead if d[2] in {r[0] for r in rows}]
                    if dead:
                        c.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(len(dead))})",
                                  [d[0] for d in dead])
                    msgs = [m for r in rows for m in queued.get(r[0], ())]
                    if msgs:
                        c.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(msgs))})",
                                  [m[0] for m in msgs])
            gone = [r[0] for r in rows]
            # the blobs once the rows that name them are gone for good (committed): a
            # rolled-back delete must not leave a record whose result is lost
            blobs = [r[1] for r in rows if r[1]]
            blobs += [f"{section}-{j}" for j in gone for section in ("fn", "args")]
            size = sum(r[2] for r in rows) + sum(d[1] for d in dead)
            size += sum(m[1] for r in rows for m in queued.get(r[0], ()))
            for key in blobs:
                with contextlib.suppress(OSError):
                    size += self._blobs._path(key).stat().st_size
            if not dry_run:
                self._blobs.delete(blobs)
            pruned.jobs += gone
            pruned.bytes += size

    def request_kill(self, job_id):
        active = [str(s) for s in states.KILLABLE]
        with self._db.tx() as c:
            if self.transition([job_id], JobState.CANCELLED, from_states={JobState.PENDING},
                               reason=KILLED_PENDING):  # (see JobTable.request_kill)
                return True
            row = c.execute(
                "UPDATE jobs SET kill_requested=1, updated=? WHERE job_id=? AND state IN"
                f" ({_marks(len(active))}) RETURNING job_id",
                (time.time(), job_id, *active),
            ).fetchone()
        return row is not None

    def record_usage(self, job_id, usage):
        active = [str(s) for s in states.ACTIVE]
        with self._db.tx() as c:
            row = c.execute(
                "UPDATE jobs SET usage=?, updated=? WHERE job_id=? AND state IN"
                f" ({_marks(len(active))}) RETURNING job_id",
                (json.dumps(usage), time.time(), job_id, *active),
            ).fetchone()
        return row is not None

    def kill_requested(self, job_ids):
        out: set[str] = set()
        for chunk in _chunks(list(job_ids)):
            out.update(
                r[0]
                for r in self._db.read(
                    f"SELECT job_id FROM jobs WHERE kill_requested=1 AND job_id IN ({_marks(len(chunk))})",
                    chunk,
                )
            )
        return out


class EmbeddedNodes(NodeRegistry):
    def __init__(self, db: _Db, bell: Callable[[str], bytes]):
        self._db = db
        self._bell = bell  # the doorbell address of a name, in this enclave

    def register(self, node):
        with self._db.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO nodes(node_id, queue, host, pid, workers, started,"
                " heartbeat, managed_by, python, ident) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (node.node_id, node.queue, node.host, node.pid, node.workers, node.started,
                 node.heartbeat, node.managed_by, node.python, _process_ident(node.pid)),
            )

    def heartbeat(self, node_id):
        with self._db.tx() as c:
            c.execute("UPDATE nodes SET heartbeat=? WHERE node_id=?", (time.time(), node_id))

    def deregister(self, node_id, *, wait=None):
        with self._db.tx(wait) as c:
            c.execute("DELETE FROM nodes WHERE node_id=?", (node_id,))

    def all(self) -> list[NodeInfo]:
        return [n for n, _ in self._rows()]

    def _rows(self) -> list[tuple[NodeInfo, str | None]]:
        rows = self._db.read(
            "SELECT node_id, queue, host, pid, workers, started, heartbeat, managed_by, python,"
            " ident FROM nodes"
        )
        return [(NodeInfo(*r[:-1]), r[-1]) for r in rows]

    def live(self, queue=None):
        return [n for n, _ in self._live_rows(queue)]

    def _live_rows(self, queue=None) -> list[tuple[NodeInfo, str | None]]:
        stale = time.time() - NODE_STALE_AFTER
        return [
            (n, ident) for n, ident in self._rows()
            if (queue is None or n.queue == queue) and n.heartbeat >= stale and _alive(n, ident)
            and self._serves(n, ident)
        ]

    def _serves(self, node: NodeInfo, ident: str | None) -> bool:
        """Whether a live node of this machine serves this enclave, not the enclave whose
        directory this one was copied from while the node ran (``cp -r``: the copy holds
        its row, the same pid and a fresh heartbeat, and ``kotta down`` of the copy
        stopped it).  A node binds its doorbell, named after its enclave's path, before it
        registers: one whose doorbell is bound under another enclave's name, and not
        under this one's, serves that other enclave.  (One without a doorbell, or where
        this cannot be seen, is taken to serve this one, as before.)"""
        if node.host != _HOST or not _same_namespace(ident):
            return True
        ours = self._bell(f"node-{node.node_id}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(ours)
            return True
        except OSError:
            pass
        finally:
            probe.close()
        try:  # the abstract sockets bound on this machine, as "@name"
            with open("/proc/net/unix") as f:
                bound = {line.split()[-1] for line in f if line.rstrip().endswith(
                    f"-node-{node.node_id}")}
        except OSError:
            return True
        theirs = {b for b in bound if b.startswith("@kotta-")}
        return not theirs or "@" + ours[1:].decode() in theirs

    def dead(self) -> list[NodeInfo]:
        """Registered nodes whose process has ended (see ``_alive``)."""
        return [n for n, ident in self._rows() if not _alive(n, ident)]

    def here(self, queue=None):
        ours, elsewhere = [], []
        for n, ident in self._live_rows(queue):
            if n.host == _HOST:
                (ours if _same_namespace(ident) else elsewhere).append(n)
        return ours, elsewhere


_private: tuple[float, str | None] = (-60.0, None)
#: the directories _private_dir warned of, not private (said once a process)
_warned_private: set[str] = set()


def _shared_by(path: Path, st: os.stat_result) -> str:
    """Why the directory ``path`` (``st``, its stat) is one other OS users share, or "":
    sticky or writable by all (/tmp), or holding files of other users (a group's project
    directory, /home as root)."""
    if st.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        return f"mode {stat.S_IMODE(st.st_mode):o}"
    uid = os.getuid()
    with os.scandir(path) as entries:
        for i, entry in enumerate(entries):
            if i >= 10_000:  # (a directory that large is no new enclave's: as it is)
                break
            try:
                owner = entry.stat(follow_symlinks=False).st_uid
            except OSError:  # gone meanwhile
                continue
            if owner != uid:
                return f"{entry.name} in it is another user's"
    return ""


def _private_dir() -> str | None:
    """``/tmp/kotta-UID``, made if need be, if it is a directory of this user's that no
    one else may enter (checked again every 10 s); else None."""
    global _private
    at, checked = _private
    if time.monotonic() - at < 10.0:
        return checked
    d = Path(tempfile.gettempdir()) / f"kotta-{os.getuid()}"
    result = None
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            result = str(d)
        elif str(d) not in _warned_private:  # (once: it is looked at every 10 s)
            _warned_private.add(str(d))
            log.warning("%s is not a directory private to this user: replies go by queue", d)
    _private = (time.monotonic(), result)
    return result


#: whether this process swept the inbox directory yet (it does once, as it binds its first)
_swept: list[str] = []


def sweep_inboxes(directory: str) -> list[str]:
    """Remove the inbox files in ``directory`` that no socket is bound to any more: those
    of clients and nodes killed outright (a process that closes an inbox removes its file).
    A socket file nobody is bound to refuses a connection; a live one accepts it."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith("kotta-")]
    except OSError:
        return removed
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISSOCK(st.st_mode):
                    continue
                probe.connect(path)
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_ino == st.st_ino:  # not bound anew meanwhile
                        os.unlink(path)
                        removed.append(name)
            except OSError:
                continue
            else:  # someone is bound to it: a fresh probe for the next (a datagram
                probe.close()  # socket stays connected to the last address)
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    finally:
        probe.close()
    if removed:
        log.info("removed %d inboxes left by processes that were killed", len(removed))
    return removed


def _same_namespace(ident: str | None) -> bool:
    """Whether a node's pid, as it registered it (``ident``, see ``_alive``), names a
    process of this machine's boot and PID namespace (an earlier version's, without
    ``ident``: taken to)."""
    if not ident:
        return True
    boot, namespace, _ = ident.split(" ", 2)
    here = _machine_ident()
    return here is not None and (boot, namespace) == (here[0], here[1])


def _alive(node: NodeInfo, ident: str | None) -> bool:
    """Is the node's process still the one that registered?  Only a node that has surely
    ended is taken for dead (its messages are released at once): one this machine cannot
    see into (another host, another PID namespace) is left to its heartbeat and the
    visibility timeout.

    ``ident`` (Linux): the machine's boot id, the PID namespace the pid is read in, and
    the process's start time in clock ticks since boot, which a step of the wall clock
    does not move (psutil's ``create_time`` does: it adds the boot time, which the kernel
    reports in wall-clock time)."""
    if node.host != _HOST:
        return True
    if ident:
        boot, namespace, ticks = ident.split(" ", 2)
        here = _machine_ident()
        if here is not None and boot != here[0]:
            return False  # registered before this machine last started
        if here is None or namespace != here[1]:
            return node.heartbeat >= time.time() - NODE_STALE_AFTER
        stat = _proc_stat(node.pid)
        return stat is not None and stat[1] == ticks and stat[0] != "Z"
    try:  # registered by an earlier version, or not on Linux
        proc = psutil.Process(node.pid)
        return proc.create_time() <= node.started + 1 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True  # someone's live process
    except psutil.Error:
        return False


_HOST = socket.gethostname()


def _machine_ident() -> tuple[str, str] | None:
    """This machine's boot id and this process's PID namespace (Linux), else None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return boot, os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """A process's state letter and its start time in ticks since boot (/proc/PID/stat
    fields 3 and 22); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # (the name may hold spaces and parentheses)
    return fields[0].decode(), fields[19].decode()


def _process_ident(pid: int) -> str | None:
    """What ``_alive`` recognises the process ``pid`` by, later (Linux), else None."""
    here, stat = _machine_ident(), _proc_stat(pid)
    if here is None or stat is None:
        return None
    return f"{here[0]} {here[1]} {stat[1]}"


class EmbeddedRecords(Records):
    def __init__(self, db: _Db):
        self._db = db

    def get_many(self, kind, keys):
        out: dict[str, dict] = {}
        for chunk in _chunks(list(keys)):
            rows = self._db.read(
                f"SELECT key, value FROM records WHERE kind=? AND key IN ({_marks(len(chunk))})",
                (kind, *chunk),
            )
            out.update((k, json.loads(v)) for k, v in rows)
        return out

    def put(self, kind, key, value, *, if_absent=False):
        check_record_name("kind", kind)
        check_record_name("key", key)
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        verb = "INSERT OR IGNORE" if if_absent else "INSERT OR REPLACE"
        with self._db.tx() as c:
            cur = c.execute(f"{verb} INTO records (kind, key, value) VALUES (?, ?, ?)", (kind, key, text))
            if cur.rowcount == 1:
                return True
            row = c.execute("SELECT value FROM records WHERE kind=? AND key=?", (kind, key)).fetchone()
            return row is not None and row[0] == text  # (the very value: as on AWS)

    def put_if_unchanged(self, kind, key, value, expect):
        # one write transaction (BEGIN IMMEDIATE): no other writer comes between the
        # comparisons and the write
        with self._db.tx() as c:
            for (k, name), old in expect.items():
                row = c.execute("SELECT value FROM records WHERE kind=? AND key=?",
                                (k, name)).fetchone()
                if row is None or json.loads(row[0]) != old:
                    return False
            return self.put(kind, key, value)

    def delete(self, kind, key):
        with self._db.tx() as c:
            return c.execute("DELETE FROM records WHERE kind=? AND key=?", (kind, key)).rowcount == 1

    def scan(self, kind, *, after="", limit=None, reverse=False, tolerant=False):
        if reverse:
            cond, order = ("AND key < ?" if after else "AND ? = ''"), "DESC"
        else:
            cond, order = "AND key > ?", "ASC"
        sql = f"SELECT key, value FROM records WHERE kind=? {cond} ORDER BY key {order}"
        params: tuple = (kind, after)
        if limit is not None:
            sql += " LIMIT ?"
            params += (int(limit),)
        return [(k, decode_record(v, tolerant=tolerant)) for k, v in self._db.read(sql, params)]


class EmbeddedEnclave(Enclave):
    """The enclave under ``home`` (``$KOTTA_HOME``): ``kotta.db`` and ``blobs/``."""

    @staticmethod
    def exists(home: str | os.PathLike) -> bool:
        """Whether an enclave was made under ``home`` (opening one makes it).  A path that
        cannot be looked at (another user's private directory, a name too long) is a
        ConfigurationError that says why."""
        try:
            return (Path(home).expanduser() / "kotta.db").is_file()
        except (OSError, RuntimeError) as exc:  # (RuntimeError: "~alcie", no such user)
            raise ConfigurationError(f"cannot look for an enclave at {home}: {exc}") from exc

    def __init__(self, home: str | os.PathLike):
        try:
            self.home = Path(home).expanduser().resolve()
        except (OSError, RuntimeError) as exc:
            # a symlink that leads back to itself, "~alcie/lab" (no such user): Python's
            # RuntimeError ("Symlink loop from ...") came out of every command as a traceback
            raise ConfigurationError(f"cannot use {home} as the enclave directory: {exc}") from exc
        db = self.home / "kotta.db"
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.home.stat()
            open_mode = None
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                if not db.exists():
                    # a new enclave in a directory made beforehand (`mkdir lab`: 0755): its
                    # database, blobs and logs are made readable by all (umask), and only
                    # the directory's mode keeps other OS users from every job, argument
                    # and result.  Not a directory others share: closed, /tmp (as root:
                    # enclave="/tmp") or a group's project directory shut them all out
                    shared = _shared_by(self.home, st)
                    if shared:
                        raise ConfigurationError(
                            f"cannot make an enclave in {self.home}: it is a directory other "
                            f"OS users share ({shared}), and an enclave closes its directory "
                            f"to everyone else (mode 700); make it in a directory of its own, "
                            f"say {self.home / 'kotta'}")
                    self.home.chmod(0o700)
                elif self.home not in _WARNED_OPEN:
                    # one made so by an earlier version, or opened since: not changed (an
                    # admin may mean it), but said, once a process, once it proves an enclave
                    open_mode = st.st_mode & 0o777
        except OSError as exc:
            if isinstance(exc, FileExistsError) and not self.home.is_dir():
                raise ConfigurationError(f"cannot use {self.home} as the enclave directory: "
                                         f"it is a file, not a directory") from exc
            raise ConfigurationError(f"cannot create the enclave directory {self.home}: {exc}") from exc
        self.url = f"embedded://{self.home}"
        self.local = True
        try:
            self._db = _Db(db)
        except sqlite3.Error as exc:
            # a kotta.db that is not SQLite, or a directory where SQLite cannot make one:
            # what is wrong with which file, for the command to say
            size = len(os.fsencode(db))
            why = (f" (its path is {size} bytes long, and SQLite opens none over "
                   f"{SQLITE_MAX_PATH}: choose a shorter directory)") if size > SQLITE_MAX_PATH else ""
            raise ConfigurationError(f"cannot open the enclave database {db}: {exc}{why}") from exc
        if open_mode is not None:
            _WARNED_OPEN.add(self.home)
            log.warning("the enclave directory %s is open to other OS users (mode %o): they "
                        "can read its jobs, arguments and results; close it with "
                        "`chmod 700 %s`", self.home, open_mode, self.home)
        self.blobs = EmbeddedBlobs(self.home / "blobs")
        self.queue = EmbeddedQueue(self._db, self)
        self.jobs = EmbeddedJobs(self._db, self.blobs)
        self._bell_prefix = "kotta-" + hashlib.sha1(os.fsencode(self.home)).hexdigest()[:16]
        self.nodes = EmbeddedNodes(self._db, self._bell_address)
        self.records = EmbeddedRecords(self._db)
        self._ring_sock: socket.socket | None = None
        self._senders: dict[str, socket.socket] = {}  # by inbox, the last used last
        self._senders_lock = threading.Lock()
        self._inbox_buf: memoryview | None = None
        self._inbox_lock = threading.Lock()
        self._node_cache: tuple[float, dict[str, list[str]]] = (0.0, {})
        self._hand_turn = 0
        self._ids = random.Random(os.urandom(32))  # receipt tokens, without a syscall each
        self._page_size = self._db.read("PRAGMA page_size")[0][0]
        st = os.stat(db)  # the file this enclave opened (removed(): still the one there?)
        self._db_file = (st.st_dev, st.st_ino)
        self._wal_warned = -WAL_WARN_EVERY

    # -- doorbells: abstract Unix datagram sockets; a missed ring only costs a poll interval

    def _bell_address(self, name: str) -> bytes:
        return b"\0" + f"{self._bell_prefix}-{name}".encode()

    def doorbell(self, name: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self._bell_address(name))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def _ring(self, name: str) -> None:
        sock = self._ring_sock
        if sock is None:
            sock = self._ring_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
        try:
            sock.sendto(b"!", self._bell_address(name))
        except OSError:
            pass  # nobody listening, or already rung and not yet read

    def _nodes_of(self, queue: str) -> list[str]:
        at, cache = self._node_cache
        # the list of nodes is cached for a second, but not while none serves the queue:
        # one may just be starting, and a missed ring costs it a poll interval
        if time.monotonic() - at > (1.0 if cache.get(queue) else 0.05):
            cache = {}
            for n in self.nodes.live():
                cache.setdefault(n.queue, []).append(n.node_id)
            self._node_cache = (time.monotonic(), cache)
        return cache.get(queue, [])

    def lasting(self, exc: BaseException) -> bool:
        """A damaged database too (not a locked or busy one)."""
        text = str(exc).lower()
        return super().lasting(exc) or (
            isinstance(exc, sqlite3.DatabaseError) and "locked" not in text and "busy" not in text
        )

    def locked(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)  # (SQLITE_BUSY, SQLITE_LOCKED)
        return isinstance(exc, sqlite3.OperationalError) and isinstance(code, int) and (
            code & 0xFF in (5, 6))

    def ring_nodes(self, queue: str) -> None:
        for node_id in self._nodes_of(queue):
            self._ring(f"node-{node_id}")

    def ring_client(self, client_id: str) -> None:
        self._ring(f"client-{client_id}")

    # -- reply inboxes: a node hands a client its replies in a datagram, skipping two write
    # transactions (the reply's insert, the client's take).  A reply holds a result, so an
    # inbox is a socket file in a directory only this user can enter (/tmp/kotta-UID, mode
    # 0700, like tmux's): no one else can bind its name once the client is gone, nor write
    # to it.  The client also takes only datagrams whose sender the kernel vouches is its
    # own user or root (SO_PASSCRED).

    def _inbox_path(self, client_id: str) -> str | None:
        """The inbox's path, in a private directory checked to be this user's (None if it
        is not, or the path is too long for a socket)."""
        if not _PASSCRED:
            return None
        d = _private_dir()
        if d is None:
            return None
        path = f"{d}/{self._bell_prefix}-{client_id}"
        return path if len(os.fsencode(path)) < 100 else None

    def reply_inbox(self, client_id: str) -> socket.socket | None:
        return self._bind_inbox(client_id)

    def task_inbox(self, node_id: str) -> socket.socket | None:
        return self._bind_inbox(f"node-{node_id}")

    def _bind_inbox(self, name: str) -> socket.socket | None:
        path = self._inbox_path(name)
        if path is None:
            return None
        if not _swept:
            _swept.append(path)
            sweep_inboxes(os.path.dirname(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by one that died (ids are random: not a live one)
            sock.bind(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def close_inbox(self, sock: socket.socket, *, drain: bool = False) -> list[bytes]:
        with contextlib.suppress(OSError):
            os.unlink(sock.getsockname())  # senders find no inbox from now on
        left = self.read_inbox(sock) if drain else []
        sock.close()
        return left

    def read_inbox(self, sock: socket.socket) -> list[bytes]:
        out = []
        with self._inbox_lock:
            if self._inbox_buf is None:
                self._inbox_buf = memoryview(bytearray(INBOX_DATAGRAM))
            buf = self._inbox_buf
            while True:
                try:
                    n, anc, flags, _ = sock.recvmsg_into([buf], socket.CMSG_SPACE(_CRED.size))
                except (BlockingIOError, InterruptedError):
                    return out
                uid = None
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        _, uid, _ = _CRED.unpack(payload[: _CRED.size])
                if uid not in (os.getuid(), 0):
                    log.warning("dropped a reply datagram from uid %s, not this user's", uid)
                elif flags & socket.MSG_TRUNC:
                    log.warning("dropped a reply datagram over %d bytes", INBOX_DATAGRAM)
                else:
                    out.append(bytes(buf[:n]))

    def _sender(self, address: str) -> socket.socket:
        """A socket to send to the inbox at ``address``: its own, so that what one inbox
        leaves unread (its process stopped) never fills the send buffer for the others
        (a socket closed meanwhile loses none of what it sent)."""
        with self._senders_lock:
            sock = self._senders.pop(address, None)
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                with contextlib.suppress(OSError):  # room for many unread replies in flight
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * INBOX_DATAGRAM)
                if len(self._senders) >= SENDERS_KEPT:
                    self._senders.pop(next(iter(self._senders))).close()
            self._senders[address] = sock
            return sock

    def reply_direct(self, client_id: str, messages: list[Message]) -> tuple[list[Message], bool]:
        address = self._inbox_path(client_id)
        if address is None:
            return messages, False
        try:
            sock = self._sender(address)
        except OSError:  # no socket to be had (out of file descriptors): the queue
            return messages, False
        for i, message in enumerate(messages):
            if len(message.body) > INBOX_DATAGRAM:
                return messages[i:], False
            try:
                sock.sendto(message.body, address)
            except BlockingIOError:  # a full inbox (its client is busy)
                return messages[i:], True
            except OSError:  # no inbox (an older client, or gone)
                return messages[i:], False
        return [], False

    # -- hand-off: a lone task goes to a node's inbox (a socket file beside the clients'),
    # and the node records the job and its message, already received, in its own
    # transaction.  The client then writes nothing to the database, and the node's page
    # cache stays warm: SQLite (in WAL mode) drops a connection's cache whenever another
    # connection has written.

    def hand_off(self, queue: str, body: bytes) -> bool:
        if len(body) > HAND_OFF_LIMIT:
            return False
        nodes = self._nodes_of(queue)
        if not nodes:
            return False
        self._hand_turn = turn = (self._hand_turn + 1) % len(nodes)
        for node_id in nodes[turn:] + nodes[:turn]:  # in turn, when several serve the queue
            address = self._inbox_path(f"node-{node_id}")
            if address is None:
                return False
            try:
                self._sender(address).sendto(body, address)
            except OSError:  # no inbox (another user's node, or gone), or a full one
                continue
            return True
        return False

    def adopt(self, job: NewJob, visibility_timeout: float, holder: str | None) -> Delivery | None:
        with self._db.tx() as c:
            now = time.time()  # after any wait for the lock: hidden for the whole timeout
            new = c.execute(
                "INSERT OR IGNORE INTO jobs(job_id, owner, client, queue, fn, walltime, n, state,"
                " created, updated, history) VALUES (?,?,?,?,?,?,?,'pending',?,?,?)",
                (job.job_id, job.owner, job.client, job.queue, job.fn, job.walltime, job.n,
                 now, now, _event(now, JobState.PENDING, None)),
            ).rowcount
            if new != 1:  # a replay, or the client gave up on us and recorded it itself
                return None
            if holder is None:
                c.execute(
                    "INSERT INTO messages(queue, job_id, body, visible_at, sent) VALUES (?,?,?,?,?)",
                    (job.queue, job.job_id, job.body, now, now),
                )
                return None
            # the receipt names the row: its id, given by AUTOINCREMENT (never one a deleted
            # message had, which a node may still hold a delivery of)
            (mid,) = c.execute(
                "INSERT INTO messages(queue, job_id, body, visible_at, receive_count, holder,"
                " sent) VALUES (?,?,?,?,1,?,?) RETURNING id",
                (job.queue, job.job_id, job.body, now + visibility_timeout, holder, now),
            ).fetchone()
            receipt = f"{mid}:{self._ids.getrandbits(48).to_bytes(6, 'big').hex()}"
            c.execute("UPDATE messages SET receipt=? WHERE id=?", (receipt, mid))
        return Delivery(job.job_id, job.body, receipt, 1, now, str(mid))

    def process_ident(self) -> str | None:
        ident = _process_ident(os.getpid())
        return None if ident is None else f"{os.getpid()} {ident}"

    def process_gone(self, ident: str) -> bool:
        """Surely ended: its pid is gone, a zombie, or another process's (its start time
        differs).  A process of another boot or PID namespace is not judged."""
        try:
            pid, boot, namespace, ticks = ident.split(" ")
            pid = int(pid)
        except (AttributeError, ValueError):
            return False
        if _machine_ident() != (boot, namespace):
            return False
        stat = _proc_stat(pid)
        return stat is None or stat[1] != ticks or stat[0] == "Z"

    def reap_dead_nodes(self) -> list[str]:
        """Release what dead node processes held, so it runs elsewhere without waiting out
        the visibility timeout."""
        dead = self.nodes.dead()
        for n in dead:
            with self._db.tx() as c:
                c.execute(
                    "UPDATE messages SET visible_at=0, holder=NULL WHERE holder=?", (n.node_id,)
                )
                c.execute("DELETE FROM nodes WHERE node_id=?", (n.node_id,))
        return [n.node_id for n in dead]

    def atomic(self, wait: float | None = None):
        return self._db.tx(wait)

    def checkpoint(self, *, truncate: bool = False) -> None:
        """Copy the write-ahead log into the database (this is where SQLite fsyncs).
        ``truncate``: a log over its limit is cut back at once, not by the next write (a
        client's, which may write nothing more for long: the file kept its largest size)."""
        with self._db.naming():
            conn = self._db.conn()
            if self.checkpoint_due():
                # A log over its limit: RESTART waits (briefly) for the write lock and for
                # the readers of the log to move on, so that the next write begins it anew
                # and cuts it back.  A PASSIVE one copied it all, but while a client
                # submitted a burst its writes came between that and the next write, which
                # then went on at the log's end: 275 MB in 8 s, without bound.
                conn.execute(f"PRAGMA busy_timeout={int(RESTART_WAIT * 1000)}")
                try:
                    mode = "TRUNCATE" if truncate else "RESTART"
                    _, frames, copied = _retry(
                        conn.execute, f"PRAGMA wal_checkpoint({mode})").fetchone()
                finally:
                    conn.execute("PRAGMA busy_timeout=0")
            else:
                _, frames, copied = _retry(conn.execute, "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        # A connection that holds a read transaction open keeps the log from being copied
        # past what it reads, and so from starting over: it grows with every write, for as
        # long as that lasts.  Nothing here can end it; whoever runs it can.
        size = frames * self._page_size
        if copied < frames and size >= WAL_WARN_SIZE and (
            time.monotonic() - self._wal_warned >= WAL_WARN_EVERY
        ):
            self._wal_warned = time.monotonic()
            log.warning(
                "the write-ahead log of %s has grown to %d MB, and a checkpoint could not "
                "copy all of it into the database: a connection that holds a read "
                "transaction open (a sqlite3 shell, a backup, a program reading it?) keeps "
                "it growing until that ends",
                self.home / "kotta.db", size >> 20,
            )

    def removed(self) -> str | None:
        """Its ``kotta.db`` removed (``rm -rf`` of the directory), or another in its place:
        SQLite goes on with the file it has open, unlinked, which no other process can
        open any more."""
        path = self._db.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"the enclave database {path} was removed"
        except OSError:  # cannot tell (a path that cannot be looked at for now)
            return None
        if (st.st_dev, st.st_ino) != self._db_file:
            return f"the enclave database {path} was removed, and another put in its place"
        return None

    def checkpoint_due(self) -> bool:
        """The log file over WAL_SIZE_LIMIT: a checkpoint that copied it all, and the
        next write that began it anew, cut it back to that size, so a larger one has grown
        past it since (or a reader keeps it from being copied: then each look, once a
        second, waits RESTART_WAIT for it in vain)."""
        try:
            return os.stat(self._db.path.with_name("kotta.db-wal")).st_size > WAL_SIZE_LIMIT
        except OSError:  # none: every connection closed
            return False

    def close(self) -> None:
        if self._ring_sock is not None:
            self._ring_sock.close()
            self._ring_sock = None
        with self._senders_lock:
            for sock in self._senders.values():
                sock.close()
            self._senders.clear()
        # the database connection of the calling thread (an executor's: of the thread that
        # shut it down, and of its manager); kept, kotta.db's descriptors stayed open for
        # as long as the enclave was referenced, and then until the garbage collector ran
        self._db.close()
