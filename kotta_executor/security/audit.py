"""The enclave's audit log: who did what to which dataset, as a hash chain.

Every record names its predecessor::

    record 1            record 2            record 3
    prev = 0 * 64   <-  prev = hash(1)  <-  prev = hash(2)  ...
    hash(1)             hash(2)             hash(3)
                                            ^
                        checkpoint 3 = {seq 3, hash(3), time, mac}   (every 64 records,
                                                                      and on demand)

``hash`` is the SHA-256 of the record's other fields as canonical JSON (sorted keys, no
spaces).  Records are kind ``"audit"`` of the enclave's :class:`~..backends.base.Records`,
keyed ``f"{seq:012d}"`` from 1; checkpoints are kind ``"audit-checkpoint"`` with the same
keys.  A checkpoint, in the spirit of CloudTrail's digest files, signs the hash of one
record with HMAC-SHA256 under ``derived_key(enclave, "audit")``; it is never overwritten.

What :meth:`AuditLog.verify` detects, each problem naming the record:

* a record modified in place (its hash no longer matches its contents);
* a record deleted from the middle (a gap in the sequence);
* a record replaced with a consistent hash, or records reordered or swapped (the
  successor's ``prev``, or the record's own ``seq``, gives it away);
* a forged or modified checkpoint (its MAC does not verify), and a record rewritten after
  a checkpoint vouched for it (the checkpoint's hash differs);
* a missing automatic checkpoint: once a record after it exists, the checkpoint of every
  multiple of 64 must be there, so a checkpoint cannot be deleted to let the records it
  vouched for be rewritten with a re-hashed chain (only the last record is exempt, its
  writer may not have written its checkpoint yet; a writer that died in between, or
  could not read the key, leaves a missing checkpoint that is reported, truly, for ever);
* records deleted from the tail, when a checkpoint was written after them and is still
  there.

What it cannot detect, honestly.  The hash chain is plain SHA-256: anyone who can write
the records can compute it.  Only checkpoints need the key, so only what a required
checkpoint vouches for is safe from them:

* records after the last required checkpoint (the one at the greatest multiple of 64
  below the last record), at most 64 of them, can be rewritten with a re-hashed chain.
  On-demand checkpoints narrow this window only against someone who cannot delete them:
  they are not required, so deleting one goes unnoticed;
* the log cut back to any record, together with the checkpoints after it, and records
  appended again up to the next multiple of 64: what is left is a shorter, intact log.
  Deleting the whole log *and* its checkpoints is the extreme case: an empty log
  verifies as an empty log.  The first record of a log has ``prev = "0" * 64`` whoever
  writes it.  Only copies of checkpoints held outside the enclave's records (exported to
  another account, or printed in a report) can prove that records existed;
* anyone holding the enclave key can write valid checkpoints, so can rewrite the whole
  log consistently: the key, not the hash chain, is what the log's integrity rests on.

Records carry no MAC of their own (which would close the first window): appenders that
may not read the key write records too (a client refused another user's job writes
``job-denied``), and logs written without record MACs must still verify, so a rewriter
could strip them, as from an older log.

Several processes append at once (a node, clients, the token service).  Each append
writes the record for ``last + 1`` with a conditional put (``if_absent``); whoever loses
the race re-reads the tail and tries the next number, so the chain has no fork and no
lost record.  A write whose answer was lost (applied, its caller told it failed) is
remembered for UNSURE_FOR seconds: an append of the same fields, its caller's retry,
returns that record if it is stored, rather than append a second one for the event.
An audit record belongs to no transaction: do not append inside
``enclave.atomic()``, whose rollback would leave a gap that looks like a deletion.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import UnreadableRecord
from ..errors import AuditError, InvalidDataUri
from .keys import derived_key
from .uris import parse_uri

KIND = "audit"
CHECKPOINT_KIND = "audit-checkpoint"
GENESIS = "0" * 64
#: an automatic checkpoint follows every record whose seq is a multiple of this
CHECKPOINT_EVERY = 64
#: seconds for which a record at a multiple of CHECKPOINT_EVERY may lack its checkpoint
#: (its writer is between its two writes, while others append after it)
CHECKPOINT_GRACE = 60.0
#: conditional writes one append tries before it gives up (each lost one means another
#: writer appended in between)
MAX_ATTEMPTS = 200
#: times an automatic checkpoint is written through a fault that may pass (throttling past
#: the backend's retries), with a backoff doubling from 0.05 s up to 2 s (some 7 s in all)
CHECKPOINT_TRIES = 8
#: seconds for which a record whose write raised (its answer lost: it may be written) is
#: looked for by an append of the same fields, the caller's retry; longer than any
#: retrier's patience (a node's is 60 s)
UNSURE_FOR = 600.0

STAGE_IN = "stage-in"
STAGE_OUT = "stage-out"
ACCESS_DENIED = "access-denied"
TASK_REJECTED = "task-rejected"
TOKEN_ISSUE = "token-issue"
TOKEN_REFRESH = "token-refresh"
TOKEN_REVOKE = "token-revoke"
USER_ADD = "user-add"
POLICY_GRANT = "policy-grant"
POLICY_REVOKE = "policy-revoke"
DATASET_ADD = "dataset-add"
DATASET_REMOVE = "dataset-remove"
EGRESS_DENIED = "egress-denied"
#: someone tried to see, cancel or kill another user's job
JOB_DENIED = "job-denied"
#: `kotta prune` removed finished jobs (their records, results and output)
PRUNE = "prune"
ACTIONS = frozenset({
    STAGE_IN, STAGE_OUT, ACCESS_DENIED, TASK_REJECTED, TOKEN_ISSUE, TOKEN_REFRESH,
    TOKEN_REVOKE, USER_ADD, POLICY_GRANT, POLICY_REVOKE, DATASET_ADD, DATASET_REMOVE,
    EGRESS_DENIED, JOB_DENIED, PRUNE,
})

#: a longer string field (user, dataset, job id, a string detail) is cut to this many
#: characters: a record must fit its backend's item (DynamoDB's: 400 KB, where JSON spells
#: a character in up to 12 bytes), and a forged task's claimed owner or job id can be of
#: any length
MAX_FIELD = 4096

log = logging.getLogger("kotta.audit")
_KEY = re.compile(r"[0-9]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(slots=True)
class AuditReport:
    ok: bool
    records: int
    checkpoints: int
    problems: list[str] = field(default_factory=list)


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[: MAX_FIELD - 10] + " ... (cut)"
    return value


def canonical(value: Any) -> str:
    """The JSON text that is hashed: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_hash(record: dict[str, Any]) -> str:
    """Hex SHA-256 of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def record_key(seq: int) -> str:
    return f"{seq:012d}"


def _seq_of(key: str) -> int | None:
    return int(key) if _KEY.fullmatch(key) and int(key) >= 1 else None


def _checkpoint_mac(key: bytes, seq: Any, hash_: Any, time_: Any) -> str:
    return hmac.new(key, f"{seq}|{hash_}|{time_!r}".encode(), hashlib.sha256).hexdigest()


class AuditLog:
    """The audit log of one enclave.  Thread-safe; processes coordinate through the
    records' conditional writes.  Callable like :meth:`append`, to be passed as an
    ``audit`` callback."""

    #: records read per call by verify() and show()
    page_size = 256

    def __init__(self, enclave, *, clock: Callable[[], float] = time.time):
        self.enclave = enclave
        self._records = enclave.records
        self._clock = clock
        self._lock = threading.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last record we saw
        self._mac_key: bytes | None = None
        # canonical fields -> (monotonic time, record) of appends whose write raised
        self._unsure: dict[str, tuple[float, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ writing

    def append(
        self,
        action: str,
        *,
        user: str,
        allowed: bool = True,
        dataset: str | None = None,
        job_id: str | None = None,
        detail: Any = None,
    ) -> dict[str, Any]:
        """Add one record at the end of the chain and return it (with seq and hash).
        ``detail`` is any JSON value (usually a short string)."""
        for name, value in (("action", action), ("user", user)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"an audit record needs a {name}, not {value!r}")
        if not isinstance(allowed, bool):
            raise ValueError(f"allowed must be True or False, not {allowed!r}")
        for name, value in (("dataset", dataset), ("job_id", job_id)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, not {value!r}")
        # as it will read back from the store (tuples become lists, and so on)
        fields = json.loads(canonical({
            "user": _cut(user), "action": action, "dataset": _cut(dataset),
            "allowed": allowed, "job_id": _cut(job_id), "detail": _cut(detail),
        }))
        record = self._append(fields)
        if record["seq"] % CHECKPOINT_EVERY == 0:
            self._sign_written(record)
        return record

    def _sign_written(self, record: dict[str, Any]) -> None:
        """The automatic checkpoint of ``record``, which is written: a fault here must not
        reach the caller as the record's, or it appends the record again (a second one)
        and its checkpoint is missing for good (verify reports it as deleted).  A fault the
        enclave calls lasting raises; a passing one is tried again, CHECKPOINT_TRIES times,
        then logged (verify reports the checkpoint missing, truly)."""
        self._key()  # (a key this process may not read raises, as it did)
        for attempt in range(CHECKPOINT_TRIES):
            try:
                self._write_checkpoint(record["seq"], record["hash"])
                return
            except Exception as exc:
                if self.enclave.lasting(exc):
                    raise
                if attempt == CHECKPOINT_TRIES - 1:
                    log.error("the checkpoint of audit record %d of %s could not be written "
                              "(%s: %s): `kotta audit verify` will report it missing",
                              record["seq"], self.enclave.url, type(exc).__name__, exc)
                    return
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    __call__ = append

    def _append(self, fields: dict[str, Any]) -> dict[str, Any]:
        # No lock is held across the writes: threads of one process race through the
        # conditional put like processes do (a thread inside enclave.atomic() must not
        # wait for one that waits for its transaction).
        #
        # A write whose answer was lost (a read timeout past botocore's retries) may have
        # been applied; its caller appends the same fields again.  A second try stamps a
        # new time, so a new hash, and would append a second record for the one event:
        # the first try's record, if stored at its number, is returned instead.
        unsure = canonical(fields)
        with self._lock:
            now = time.monotonic()
            for k in [k for k, (at, _) in self._unsure.items() if now - at > UNSURE_FOR]:
                del self._unsure[k]
            earlier = self._unsure.get(unsure)
        if earlier is not None:
            record = earlier[1]
            written = self._records.get(KIND, record_key(record["seq"])) == record
            with self._lock:
                self._unsure.pop(unsure, None)
            if written:
                self._remember((record["seq"], record["hash"]))
                return record
            # not written: appended now, as a first try
        tail = self._tail or self._read_tail()
        for _attempt in range(MAX_ATTEMPTS):
            seq, prev = tail[0] + 1, tail[1]
            record = {"seq": seq, "time": self._clock(), **fields, "prev": prev}
            record["hash"] = record_hash(record)
            try:
                written = self._records.put(KIND, record_key(seq), record, if_absent=True)
            except Exception:
                with self._lock:
                    self._unsure[unsure] = (time.monotonic(), record)
                raise
            if written:
                self._remember((seq, record["hash"]))
                return record
            tail = self._read_tail()  # another writer took seq: chain on to theirs
            self._remember(tail)
        with self._lock:
            self._tail = None
        raise AuditError(
            f"could not append to the audit log of {self.enclave.url}: {MAX_ATTEMPTS} "
            f"conditional writes lost in a row (last tried record {seq}, the tail read "
            f"back as record {tail[0]}); is something rewriting the log? "
            "Run `kotta audit verify`."
        )

    def _remember(self, tail: tuple[int, str]) -> None:
        with self._lock:
            if self._tail is None or tail[0] > self._tail[0]:
                self._tail = tail

    def _read_tail(self) -> tuple[int, str]:
        rows = self._records.scan(KIND, reverse=True, limit=1, tolerant=True)
        if not rows:
            return 0, GENESIS
        key, record = rows[0]
        seq = _seq_of(key)
        if seq is None:
            raise AuditError(
                f"the last key of the audit log of {self.enclave.url} is {key!r}, not a "
                "record number: the log was tampered with (run `kotta audit verify`)"
            )
        if not isinstance(record, dict):  # not JSON, or not an object: chain on from its
            # text; verify() reports the damaged tail
            return seq, hashlib.sha256(str(record).encode()).hexdigest()
        stored = record.get("hash")
        if not (isinstance(stored, str) and _HEX64.fullmatch(stored)):
            stored = record_hash(record)  # chain on; verify() reports the damaged tail
        return seq, stored

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current last record now (None when the log is empty).  An existing
        checkpoint of that record is kept and returned, never overwritten."""
        seq, hash_ = self._read_tail()
        if seq == 0:
            return None
        return self._write_checkpoint(seq, hash_)

    def _write_checkpoint(self, seq: int, hash_: str) -> dict[str, Any]:
        now = self._clock()
        cp = {"seq": seq, "hash": hash_, "time": now,
              "mac": _checkpoint_mac(self._key(), seq, hash_, now)}
        if self._records.put(CHECKPOINT_KIND, record_key(seq), cp, if_absent=True):
            return cp
        return self._records.get(CHECKPOINT_KIND, record_key(seq)) or cp

    def _key(self) -> bytes:
        if self._mac_key is None:
            self._mac_key = derived_key(self.enclave, "audit")
        return self._mac_key

    # ------------------------------------------------------------------ reading

    def _pages(self, kind: str, *, reverse: bool = False, tolerant: bool = False
               ) -> Iterator[tuple[str, Any]]:
        """The stored ``(key, value)`` of ``kind``; with ``tolerant``, a value that is not
        JSON comes as an UnreadableRecord (and one that is JSON but no object, as it is)."""
        after = ""
        while True:
            page = self._records.scan(kind, after=after, limit=self.page_size, reverse=reverse,
                                      tolerant=tolerant)
            yield from page
            if len(page) < self.page_size:
                return
            after = page[-1][0]

    def show(
        self,
        *,
        user: str | None = None,
        dataset: str | None = None,
        job_id: str | None = None,
        action: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Records matching every filter given, oldest first; ``dataset`` (a URI, read as
        everywhere: ``s3://b`` is the bucket ``s3://b/``) matches the records naming a URI
        it contains (a record may name several, joined by commas); ``limit`` keeps the
        newest ``limit``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        within = None if dataset is None else parse_uri(dataset)

        def names(ds: Any) -> bool:
            for part in re.split(r",(?=s3://)", ds) if isinstance(ds, str) else ():
                try:
                    if within.contains(parse_uri(part)):
                        return True
                except InvalidDataUri:  # (the URI of a refused task, say)
                    continue
            return False

        def match(r: dict[str, Any]) -> bool:
            return ((user is None or r.get("user") == user)
                    and (action is None or r.get("action") == action)
                    and (job_id is None or r.get("job_id") == job_id)
                    and (within is None or names(r.get("dataset"))))

        def records(reverse: bool = False) -> Iterator[dict[str, Any]]:
            for key, r in self._pages(KIND, reverse=reverse, tolerant=True):
                if not isinstance(r, dict):
                    raise AuditError(f"the audit record {key} of {self.enclave.url} is damaged "
                                     "(not a JSON object): run `kotta audit verify`")
                yield r

        if limit is None:
            return [r for r in records() if match(r)]
        out: list[dict[str, Any]] = []
        if limit:
            for r in records(reverse=True):
                if match(r):
                    out.append(r)
                    if len(out) == limit:
                        break
        out.reverse()
        return out

    def verify(self) -> AuditReport:
        """Walk every record and checkpoint in key order, a page at a time."""
        problems: list[str] = []
        counts = {"checkpoints": 0}
        seen: set[int] = set()  # the keys of every checkpoint read, valid or not
        checkpoints = _Peekable(self._checkpoints(problems, counts, seen))
        # the hash of each record at a multiple of CHECKPOINT_EVERY, for the checkpoints
        # that must vouch for them (one entry per 64 records)
        pinned: dict[int, Any] = {}
        written: dict[int, Any] = {}  # and when each was written
        records, expected, prev, last = 0, 1, GENESIS, 0
        for key, rec in self._pages(KIND, tolerant=True):
            records += 1
            seq = _seq_of(key)
            if seq is None:
                problems.append(f"record key {key!r}: not a record number (a foreign record)")
                continue
            if seq > expected:
                span = f"record {expected}" if seq == expected + 1 else (
                    f"records {expected}-{seq - 1}")
                problems.append(f"{span}: missing (deleted from the log)")
            for cp_seq, _ in checkpoints.take_below(seq):
                problems.append(f"checkpoint {cp_seq}: vouches for record {cp_seq}, which is "
                                "missing (deleted)")
            if not isinstance(rec, dict):
                # nothing of it can be checked, nor whether the next record follows it
                what = "not JSON" if isinstance(rec, UnreadableRecord) else "not a JSON object"
                problems.append(f"record {seq}: {what} (damaged or replaced)")
                for cp_seq, _ in checkpoints.take_upto(seq):
                    problems.append(f"checkpoint {cp_seq}: record {seq} differs from the "
                                    "record the checkpoint vouches for (replaced afterwards)")
                if seq % CHECKPOINT_EVERY == 0:
                    pinned[seq] = written[seq] = None
                prev, expected, last = None, seq + 1, seq
                continue
            if rec.get("seq") != seq:
                problems.append(f"record {seq}: the record stored there says it is record "
                                f"{rec.get('seq')!r} (moved, swapped or replaced)")
            stored = rec.get("hash")
            if stored != record_hash(rec):
                problems.append(f"record {seq}: modified (its hash does not match its contents)")
            if seq == expected and prev is not None and rec.get("prev") != prev:
                what = "the start of the log" if seq == 1 else f"record {seq - 1}"
                problems.append(f"record {seq}: does not follow {what} (its prev is not the "
                                f"hash of {what}: a record was replaced or reordered)")
            for cp_seq, cp_hash in checkpoints.take_upto(seq):
                if cp_hash != stored:
                    problems.append(f"checkpoint {cp_seq}: record {seq} differs from the "
                                    "record the checkpoint vouches for (replaced afterwards)")
            if seq % CHECKPOINT_EVERY == 0:
                pinned[seq] = stored
                written[seq] = rec.get("time")
            prev, expected, last = stored, seq + 1, seq
        beyond = [cp_seq for cp_seq, _ in checkpoints.rest()]
        if beyond:
            start = f"records after {last}" if last else "all records"
            problems.append(f"{start} were deleted: checkpoint {beyond[-1]} vouches for "
                            f"record {beyond[-1]}")
        self._require_checkpoints(last, seen, pinned, written, problems)
        return AuditReport(not problems, records, counts["checkpoints"], problems)

    def _require_checkpoints(self, last: int, seen: set[int], pinned: dict[int, Any],
                             written: dict[int, Any], problems: list[str]) -> None:
        """Every append of a record at a multiple of CHECKPOINT_EVERY writes its checkpoint
        next, so once a later record exists the checkpoint must too.  Without this rule,
        whoever can write the records (not the key) deletes the checkpoint after a record,
        rewrites the record and re-hashes the chain from it, and the log verifies.

        The last record is exempt: its writer may be between its two writes.  A checkpoint
        missing from the walk is read once more before it is reported, since the walk is
        no snapshot: its page may have been read before the checkpoint was written, and
        the records after it later (the same window, seen from another writer).  Nor is
        a record written less than CHECKPOINT_GRACE seconds ago held to it: other writers
        may append after it while its own writer is between its two writes.  (A record
        rewritten to look recent is held to it again once that time has passed.)
        """
        now = self._clock()
        for seq in range(CHECKPOINT_EVERY, last, CHECKPOINT_EVERY):
            if seq in seen:
                continue  # valid, or already reported (bad MAC, moved)
            cp = self._records.get(CHECKPOINT_KIND, record_key(seq))
            at = written.get(seq)
            if cp is None and isinstance(at, int | float) and 0 <= now - at < CHECKPOINT_GRACE:
                continue  # its writer may still be writing it
            if cp is None:
                problems.append(
                    f"checkpoint {seq}: missing (deleted, or whoever wrote record {seq} "
                    f"stopped before writing its checkpoint): nothing vouches for record "
                    f"{seq} and those before it since the previous checkpoint")
                continue
            checked = self._check_checkpoint(self._key(), record_key(seq), cp, problems)
            if checked is not None and checked[1] != pinned.get(seq):
                problems.append(f"checkpoint {seq}: record {seq} differs from the record the "
                                "checkpoint vouches for (replaced afterwards)")

    def _checkpoints(self, problems: list[str], counts: dict[str, int], seen: set[int]
                     ) -> Iterator[tuple[int, str]]:
        """The checkpoints whose MAC verifies, as ``(seq, hash)``; problems for the rest."""
        key = self._key()
        for k, cp in self._pages(CHECKPOINT_KIND, tolerant=True):
            counts["checkpoints"] += 1
            seq = _seq_of(k)
            if seq is not None:
                seen.add(seq)
            checked = self._check_checkpoint(key, k, cp, problems)
            if checked is not None:
                yield checked

    @staticmethod
    def _check_checkpoint(key: bytes, k: str, cp: dict[str, Any], problems: list[str]
                          ) -> tuple[int, str] | None:
        """``(seq, hash)`` of the checkpoint stored at key ``k`` if its MAC verifies and it
        is stored under its own record number; else None and a problem."""
        seq = _seq_of(k)
        if seq is None:
            problems.append(f"checkpoint key {k!r}: not a record number (a foreign record)")
            return None
        if not isinstance(cp, dict):  # not JSON, or not an object
            cp = {}  # (a bad MAC)
        s, h, t, mac = cp.get("seq"), cp.get("hash"), cp.get("time"), cp.get("mac")
        well_formed = (type(s) is int and isinstance(h, str) and isinstance(mac, str)
                       and type(t) in (int, float))
        if not well_formed or not hmac.compare_digest(mac, _checkpoint_mac(key, s, h, t)):
            problems.append(f"checkpoint {seq}: bad MAC (forged or modified)")
            return None
        if s != seq:
            problems.append(f"checkpoint {seq}: the checkpoint stored there is for record "
                            f"{s} (moved)")
            return None
        return seq, h


class _Peekable:
    """Checkpoints consumed in step with the records they vouch for."""

    def __init__(self, it: Iterator[tuple[int, str]]):
        self._it = it
        self._head: tuple[int, str] | None = next(it, None)

    def _take(self, stop: Callable[[int], bool]) -> Iterator[tuple[int, str]]:
        while self._head is not None and not stop(self._head[0]):
            yield self._head
            self._head = next(self._it, None)

    def take_below(self, seq: int) -> list[tuple[int, str]]:
        return list(self._take(lambda s: s >= seq))

    def take_upto(self, seq: int) -> list[tuple[int, str]]:
        return list(self._take(lambda s: s > seq))

    def rest(self) -> list[tuple[int, str]]:
        return list(self._take(lambda s: False))
