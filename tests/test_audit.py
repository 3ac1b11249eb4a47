"""The audit log (kotta_executor/security/audit.py) on both backends: the chain, its
checkpoints, each way of tampering with it, concurrent writers, and ``kotta audit``."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import re
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from kotta_executor.backends.base import Enclave
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import AuditError, InvalidDataUri
from kotta_executor.security import audit
from kotta_executor.security.audit import (
    CHECKPOINT_EVERY,
    CHECKPOINT_KIND,
    GENESIS,
    KIND,
    AuditLog,
    record_hash,
    record_key,
)
from kotta_executor.security.keys import derived_key
from tests.conftest import BACKENDS, GUARD, ROOT, open_backend, subprocess_env


@pytest.fixture(params=BACKENDS)
def enclave(request, tmp_path) -> Iterator[Enclave]:
    """A fresh enclave of each backend (overrides conftest's embedded-only one)."""
    with open_backend(request.param, tmp_path) as e:
        yield e


class Clock:
    """An injected clock: 1000.0, 1001.0, ... one second a call."""

    def __init__(self, start: float = 1000.0):
        self.now = start - 1

    def __call__(self) -> float:
        self.now += 1
        return self.now


def fill(log: AuditLog, n: int, *, user: str = "alice") -> list[dict]:
    return [log.append(audit.STAGE_IN, user=user, dataset=f"s3://bkt/d/{i}", detail=f"#{i}")
            for i in range(n)]


def problems_of(enclave: Enclave) -> list[str]:
    report = AuditLog(enclave).verify()
    assert report.ok is (not report.problems)
    return report.problems


def assert_names(problems: list[str], *starts: str) -> None:
    """Each of ``starts`` begins one problem (so "record 3:" never matches "record 30:")."""
    for start in starts:
        assert any(p.startswith(start) for p in problems), (start, problems)


# ------------------------------------------------------------------ append and show


def test_append_builds_a_chain_of_records(enclave):
    log = AuditLog(enclave, clock=Clock())
    a = log.append(audit.STAGE_IN, user="alice", dataset="s3://bkt/census/", job_id="j1",
                   detail={"bytes": 10, "files": ("a", "b")})
    b = log(audit.ACCESS_DENIED, user="bob", allowed=False, dataset="s3://bkt/secret/x")
    assert a == {
        "seq": 1, "time": 1000.0, "user": "alice", "action": "stage-in",
        "dataset": "s3://bkt/census/", "allowed": True, "job_id": "j1",
        "detail": {"bytes": 10, "files": ["a", "b"]}, "prev": GENESIS, "hash": a["hash"],
    }
    assert a["hash"] == record_hash(a) and re.fullmatch(r"[0-9a-f]{64}", a["hash"])
    assert (b["seq"], b["prev"], b["allowed"], b["job_id"]) == (2, a["hash"], False, None)
    stored = enclave.records.scan(KIND)
    assert stored == [(record_key(1), a), (record_key(2), b)]
    assert record_key(1) == "000000000001"
    report = log.verify()
    assert (report.ok, report.records, report.checkpoints, report.problems) == (True, 2, 0, [])


def test_append_refuses_bad_fields(enclave):
    log = AuditLog(enclave)
    for kwargs in ({"user": ""}, {"user": None}, {"user": "a", "allowed": "yes"},
                   {"user": "a", "dataset": 3}, {"user": "a", "job_id": ["j"]}):
        with pytest.raises(ValueError):
            log.append(audit.STAGE_IN, **kwargs)
    with pytest.raises(ValueError):
        log.append("", user="alice")
    with pytest.raises(ValueError):
        log.append(audit.STAGE_IN, user="alice", detail=float("nan"))
    assert enclave.records.scan(KIND) == []


def test_show_filters_and_keeps_the_newest(enclave):
    log = AuditLog(enclave, clock=Clock())
    log.append(audit.STAGE_IN, user="alice", dataset="s3://bkt/census/2020/a.csv", job_id="j1")
    log.append(audit.STAGE_OUT, user="alice", dataset="s3://bkt/out/r.csv", job_id="j1")
    log.append(audit.ACCESS_DENIED, user="bob", allowed=False, dataset="s3://bkt/census/")
    log.append(audit.JOB_DENIED, user="bob", allowed=False, job_id="j1")
    log.append(audit.TOKEN_ISSUE, user="carol")

    def seqs(**kw):
        return [r["seq"] for r in log.show(**kw)]

    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs(user="bob") == [3, 4]
    assert seqs(dataset="s3://bkt/census/") == [1, 3]
    assert seqs(dataset="s3://bkt/census/2020/") == [1]
    assert seqs(job_id="j1") == [1, 2, 4]
    assert seqs(action=audit.JOB_DENIED) == [4]
    assert seqs(user="alice", job_id="j1", action=audit.STAGE_OUT) == [2]
    assert seqs(limit=2) == [4, 5]
    assert seqs(user="alice", limit=1) == [2]
    assert seqs(limit=0) == []
    assert seqs(user="nobody") == []
    with pytest.raises(ValueError):
        log.show(limit=-1)


def test_show_and_verify_read_in_pages(enclave, monkeypatch):
    log = AuditLog(enclave)
    log.page_size = 4  # many pages, and a page boundary at record 8
    fill(log, 10)
    calls = []
    scan = enclave.records.scan

    def counting(kind, **kw):
        calls.append((kind, kw.get("limit")))
        return scan(kind, **kw)

    monkeypatch.setattr(enclave.records, "scan", counting)
    assert [r["seq"] for r in log.show()] == list(range(1, 11))
    assert [r["seq"] for r in log.show(limit=6)] == list(range(5, 11))
    assert log.verify().ok
    enclave.records.delete(KIND, record_key(8))
    assert log.verify().problems == ["record 8: missing (deleted from the log)"]
    assert len(calls) > 3 * 3 and all(limit == 4 for _, limit in calls)


def test_an_empty_log_verifies_and_shows_nothing(enclave):
    log = AuditLog(enclave)
    report = log.verify()
    assert (report.ok, report.records, report.checkpoints) == (True, 0, 0)
    assert log.show() == []
    assert log.checkpoint() is None


# ------------------------------------------------------------------------- checkpoints


def test_checkpoints_every_64_records_and_on_demand(enclave):
    log = AuditLog(enclave, clock=Clock())
    records = fill(log, 2 * CHECKPOINT_EVERY + 3)
    cps = enclave.records.scan(CHECKPOINT_KIND)
    assert [k for k, _ in cps] == [record_key(64), record_key(128)]
    for key, cp in cps:
        seq = int(key)
        assert cp["seq"] == seq and cp["hash"] == records[seq - 1]["hash"]
        assert set(cp) == {"seq", "hash", "time", "mac"}
    # the chain runs on across checkpoints
    assert all(records[i]["prev"] == records[i - 1]["hash"] for i in range(1, len(records)))
    cp = log.checkpoint()
    assert (cp["seq"], cp["hash"]) == (131, records[-1]["hash"])
    assert log.checkpoint() == cp  # the same record: the first checkpoint is kept
    report = log.verify()
    assert (report.ok, report.records, report.checkpoints) == (True, 131, 3), report.problems


def test_the_checkpoint_mac_is_keyed_by_the_enclave(enclave):
    log = AuditLog(enclave)
    fill(log, 3)
    cp = log.checkpoint()
    expected = hmac.new(derived_key(enclave, "audit"),
                        f"{cp['seq']}|{cp['hash']}|{cp['time']!r}".encode(),
                        hashlib.sha256).hexdigest()
    assert cp["mac"] == expected


# ------------------------------------------------------------------------ tampering


def _get(enclave, seq: int) -> dict:
    return enclave.records.get(KIND, record_key(seq))


def _put(enclave, seq: int, value: dict) -> None:
    assert enclave.records.put(KIND, record_key(seq), value)


def test_a_modified_record_is_detected(enclave):
    fill(AuditLog(enclave), 6)
    rec = _get(enclave, 3)
    rec["allowed"] = False  # without recomputing the hash
    _put(enclave, 3, rec)
    assert problems_of(enclave) == [
        "record 3: modified (its hash does not match its contents)"]


def test_a_replaced_record_with_a_new_hash_is_detected_by_its_successor(enclave):
    fill(AuditLog(enclave), 6)
    rec = _get(enclave, 3)
    rec["user"] = "mallory"
    rec["hash"] = record_hash(rec)
    _put(enclave, 3, rec)
    problems = problems_of(enclave)
    assert len(problems) == 1
    assert_names(problems, "record 4: does not follow record 3")


def _put_text(enclave, kind: str, seq: int, text: str) -> None:
    """Store ``text`` as the value of a record, around the records API (which stores JSON)."""
    if isinstance(enclave, EmbeddedEnclave):
        db = sqlite3.connect(enclave.home / "kotta.db")
        with db:
            db.execute("UPDATE records SET value=? WHERE kind=? AND key=?",
                       (text, kind, record_key(seq)))
        db.close()
    else:
        enclave.records._t._call("put_item", TableName=enclave.records.table, Item={
            "kind": {"S": kind}, "key": {"S": record_key(seq)}, "value": {"S": text}})


def test_records_that_are_not_json_objects_are_reported_and_verify_reads_on(enclave):
    log = AuditLog(enclave)
    fill(log, 8)
    _put(enclave, 2, [1, 2])  # JSON, not an object
    _put_text(enclave, KIND, 4, "not json {")
    rec = _get(enclave, 6)
    rec["allowed"] = False
    _put(enclave, 6, rec)
    assert problems_of(enclave) == [
        "record 2: not a JSON object (damaged or replaced)",
        "record 4: not JSON (damaged or replaced)",
        "record 6: modified (its hash does not match its contents)",
    ]
    with pytest.raises(AuditError, match=r"the audit record \S+ of \S+ is damaged"):
        log.show()
    _put_text(enclave, KIND, 8, "42")  # the tail: the log is appended to, all the same
    log.append(audit.STAGE_IN, user="alice")
    report = AuditLog(enclave).verify()
    assert report.records == 9
    assert_names(report.problems, "record 2:", "record 4:", "record 6:",
                 "record 8: not a JSON object")


def test_a_checkpoint_that_is_not_json_is_reported(enclave):
    log = AuditLog(enclave)
    fill(log, 3)
    assert log.checkpoint()["seq"] == 3
    fill(log, 2)
    _put_text(enclave, CHECKPOINT_KIND, 3, "][")
    assert problems_of(enclave) == ["checkpoint 3: bad MAC (forged or modified)"]


def test_a_deleted_record_is_detected(enclave):
    fill(AuditLog(enclave), 6)
    assert enclave.records.delete(KIND, record_key(4))
    assert problems_of(enclave) == ["record 4: missing (deleted from the log)"]
    assert enclave.records.delete(KIND, record_key(1))
    assert enclave.records.delete(KIND, record_key(2))
    assert problems_of(enclave) == ["records 1-2: missing (deleted from the log)",
                                    "record 4: missing (deleted from the log)"]


@pytest.mark.parametrize("how", ["automatic", "on demand"])
def test_a_truncated_tail_is_detected_by_a_checkpoint(enclave, how):
    log = AuditLog(enclave)
    n = CHECKPOINT_EVERY if how == "automatic" else 10
    fill(log, n)
    if how == "on demand":
        assert log.checkpoint()["seq"] == 10
    assert problems_of(enclave) == []
    for seq in range(n - 4, n + 1):
        assert enclave.records.delete(KIND, record_key(seq))
    assert problems_of(enclave) == [
        f"records after {n - 5} were deleted: checkpoint {n} vouches for record {n}"]


def test_deleting_every_record_is_detected_only_through_a_checkpoint(enclave):
    log = AuditLog(enclave)
    fill(log, 3)
    for seq in (1, 2, 3):
        enclave.records.delete(KIND, record_key(seq))
    assert problems_of(enclave) == []  # as the module says: nothing left to vouch for it
    log = AuditLog(enclave)  # a fresh writer starts the log again at record 1
    fill(log, 3)
    assert log.checkpoint()["seq"] == 3
    for seq in (1, 2, 3):
        enclave.records.delete(KIND, record_key(seq))
    assert problems_of(enclave) == [
        "all records were deleted: checkpoint 3 vouches for record 3"]


def test_swapped_records_are_detected(enclave):
    fill(AuditLog(enclave), 6)
    three, five = _get(enclave, 3), _get(enclave, 5)
    _put(enclave, 3, five)
    _put(enclave, 5, three)
    problems = problems_of(enclave)
    assert_names(problems, "record 3: the record stored there says it is record 5",
                 "record 5: the record stored there says it is record 3",
                 "record 3: does not follow record 2", "record 6: does not follow record 5")
    assert not any("modified" in p for p in problems)  # each record itself is intact


def test_a_rewritten_last_record_is_caught_by_its_checkpoint(enclave):
    log = AuditLog(enclave)
    fill(log, 5)
    log.checkpoint()
    rec = _get(enclave, 5)
    rec["allowed"], rec["detail"] = False, "rewritten"
    rec["hash"] = record_hash(rec)  # a consistent record, and no successor to tell
    _put(enclave, 5, rec)
    assert_names(problems_of(enclave), "checkpoint 5: record 5 differs")
    assert len(problems_of(enclave)) == 1


def test_a_forged_checkpoint_is_detected(enclave):
    log = AuditLog(enclave)
    records = fill(log, 5)
    forged = {"seq": 3, "hash": records[2]["hash"], "time": 1.0, "mac": "0" * 64}
    assert enclave.records.put(CHECKPOINT_KIND, record_key(3), forged)
    assert problems_of(enclave) == ["checkpoint 3: bad MAC (forged or modified)"]
    # a real checkpoint whose hash is changed afterwards
    cp = log.checkpoint()
    enclave.records.put(CHECKPOINT_KIND, record_key(5), {**cp, "hash": records[3]["hash"]})
    assert_names(problems_of(enclave), "checkpoint 5: bad MAC")
    # a forged one beyond the tail proves no truncation
    enclave.records.put(CHECKPOINT_KIND, record_key(9), {**cp, "seq": 9})
    problems = problems_of(enclave)
    assert_names(problems, "checkpoint 9: bad MAC")
    assert not any("deleted" in p for p in problems)


def test_a_checkpoint_moved_to_another_key_is_detected(enclave):
    log = AuditLog(enclave)
    fill(log, 5)
    cp = log.checkpoint()
    enclave.records.put(CHECKPOINT_KIND, record_key(9), cp)  # a valid MAC, for record 5
    assert problems_of(enclave) == [
        "checkpoint 9: the checkpoint stored there is for record 5 (moved)"]


def test_foreign_keys_are_reported_and_stop_appends(enclave):
    log = AuditLog(enclave)
    fill(log, 2)
    enclave.records.put(KIND, "zz-junk", {"seq": 3})
    assert problems_of(enclave) == ["record key 'zz-junk': not a record number (a foreign record)"]
    with pytest.raises(AuditError, match="'zz-junk', not a record number"):
        AuditLog(enclave).append(audit.STAGE_IN, user="alice")


# ------------------------------------------------------------------------- concurrency


def test_a_stale_cached_tail_retries_on_the_next_number(enclave):
    first, second = AuditLog(enclave), AuditLog(enclave)
    first.append(audit.STAGE_IN, user="a")
    second.append(audit.STAGE_IN, user="b")  # first's cache still says record 1
    third = first.append(audit.STAGE_IN, user="a")
    assert third["seq"] == 3 and third["prev"] == _get(enclave, 2)["hash"]
    assert problems_of(enclave) == []


def test_append_gives_up_clearly_when_every_write_loses(enclave, monkeypatch):
    log = AuditLog(enclave)
    fill(log, 1)
    monkeypatch.setattr(enclave.records, "put", lambda *a, **kw: False)
    with pytest.raises(AuditError, match=f"{audit.MAX_ATTEMPTS} conditional writes lost"):
        log.append(audit.STAGE_IN, user="alice")


def test_an_append_inside_a_transaction_does_not_wait_for_a_thread_waiting_for_it(
        tmp_path, monkeypatch):
    """A node appends inside enclave.atomic() while its staging threads append too: the
    thread that waits for the node's transaction must hold nothing the node needs."""
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    log = AuditLog(enclave)
    put, entered = enclave.records.put, threading.Event()

    def put_noting_the_thread(*args, **kwargs):
        if threading.current_thread().name == "stager":
            entered.set()
        return put(*args, **kwargs)

    monkeypatch.setattr(enclave.records, "put", put_noting_the_thread)
    stager = threading.Thread(
        target=lambda: log.append(audit.STAGE_IN, user="stager"), name="stager")
    try:
        with enclave.atomic():
            log.append(audit.TASK_REJECTED, user="node", allowed=False)  # takes the lock
            stager.start()
            assert entered.wait(GUARD)  # the stager is writing: it waits for our commit
            log.append(audit.TASK_REJECTED, user="node", allowed=False)
        stager.join(GUARD)
        assert not stager.is_alive()
        assert [r["user"] for r in log.show()] == ["node", "node", "stager"]
        assert log.verify().ok
    finally:
        enclave.close()


THREADS, PER_THREAD = 4, 40


@pytest.mark.parametrize("shared", [False, True], ids=["a log each", "one shared log"])
def test_concurrent_appends_from_threads_make_one_chain(enclave, shared):
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    common = AuditLog(enclave)

    def writer(tag: int) -> None:
        try:
            log = common if shared else AuditLog(enclave)
            barrier.wait(GUARD)
            for i in range(PER_THREAD):
                log.append(audit.STAGE_IN, user=f"u{tag}", detail=str(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    assert not errors and not any(t.is_alive() for t in threads), errors
    _assert_one_chain(enclave, {f"u{t}": PER_THREAD for t in range(THREADS)})


def _assert_one_chain(enclave: Enclave, per_user: dict[str, int]) -> None:
    log = AuditLog(enclave)
    records = log.show()
    total = sum(per_user.values())
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    assert Counter((r["user"], r["detail"]) for r in records) == Counter(
        {(u, str(i)): 1 for u, n in per_user.items() for i in range(n)})
    for u in per_user:  # each writer's records in its own order
        assert [r["detail"] for r in records if r["user"] == u] == [
            str(i) for i in range(per_user[u])]
    report = log.verify()
    assert report.ok, report.problems
    assert (report.records, report.checkpoints) == (total, total // CHECKPOINT_EVERY)


PROCESSES, PER_PROCESS = 3, 50


def _process_writer(url: str, tag: int, barrier, out) -> None:
    from kotta_executor.backends import open_enclave

    try:
        enclave = open_enclave(url)
        log = AuditLog(enclave)
        barrier.wait(GUARD)
        for i in range(PER_PROCESS):
            log.append(audit.STAGE_OUT, user=f"p{tag}", detail=str(i))
        enclave.close()
        out.put((tag, None))
    except BaseException as exc:  # report to the parent instead of dying silently
        out.put((tag, repr(exc)))


def test_concurrent_appends_from_processes_make_one_chain(tmp_path):
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_process_writer, args=(enclave.url, t, barrier, out))
                 for t in range(PROCESSES)]
        for p in procs:
            p.start()
        try:
            results = dict(out.get(timeout=GUARD) for _ in procs)
        finally:
            for p in procs:
                p.join(GUARD)
        assert results == {t: None for t in range(PROCESSES)}
        _assert_one_chain(enclave, {f"p{t}": PER_PROCESS for t in range(PROCESSES)})
    finally:
        enclave.close()


# ------------------------------------------------------------------------------- CLI


def kotta(enclave_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kotta_executor.cli", "--enclave", str(enclave_dir), *args]
    return subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=GUARD, stdin=subprocess.DEVNULL)


@pytest.fixture
def logged(tmp_path):
    """An embedded enclave directory with a few audit records, the enclave closed."""
    enclave_dir = tmp_path / "enclave"
    enclave = EmbeddedEnclave(enclave_dir)
    log = AuditLog(enclave, clock=Clock(1_700_000_000.0))
    log.append(audit.STAGE_IN, user="alice", dataset="s3://bkt/census/a.csv", job_id="j1",
               detail="3 files")
    log.append(audit.EGRESS_DENIED, user="alice", allowed=False, dataset="s3://bkt/census/",
               job_id="j1", detail="result over 0 bytes")
    log.append(audit.JOB_DENIED, user="bob", allowed=False, job_id="j1",
               detail="cancel: \x1b[31mnot yours")
    log.append(audit.TOKEN_ISSUE, user="carol")
    enclave.close()
    return enclave_dir


def test_cli_verify_passes_then_fails_after_sqlite_tampering(logged):
    r = kotta(logged, "audit", "verify")
    assert (r.returncode, r.stdout) == (0, "audit log OK: 4 records, 0 checkpoints\n"), r.stderr

    db = sqlite3.connect(logged / "kotta.db")
    with db:
        [(text,)] = db.execute("SELECT value FROM records WHERE kind=? AND key=?",
                               (KIND, record_key(2))).fetchall()
        rec = json.loads(text)
        rec["allowed"] = True  # turn a denial into an allowed export
        db.execute("UPDATE records SET value=? WHERE kind=? AND key=?",
                   (json.dumps(rec), KIND, record_key(2)))
    db.close()
    r = kotta(logged, "audit", "verify")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        "record 2: modified (its hash does not match its contents)",
        "audit log BROKEN: 1 problem in 4 records, 0 checkpoints",
    ]


@pytest.mark.parametrize("text, what", [("[1, 2]", "not a JSON object"),
                                        ("not json {", "not JSON")])
def test_cli_verify_reports_a_record_that_is_not_a_json_object(logged, text, what):
    db = sqlite3.connect(logged / "kotta.db")
    with db:
        db.execute("UPDATE records SET value=? WHERE kind=? AND key=?",
                   (text, KIND, record_key(2)))
    db.close()
    r = kotta(logged, "audit", "verify")
    assert r.returncode == 1, r.stderr
    assert r.stderr == ""
    assert r.stdout.splitlines() == [
        f"record 2: {what} (damaged or replaced)",
        "audit log BROKEN: 1 problem in 4 records, 0 checkpoints",
    ]
    r = kotta(logged, "audit", "show")
    assert r.returncode == 2
    assert r.stderr == (f"kotta: error: the audit record {record_key(2)} of embedded://{logged}"
                        " is damaged (not a JSON object): run `kotta audit verify`\n")


def test_cli_show_prints_a_table_and_json(logged):
    r = kotta(logged, "audit", "show")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "USER", "ACTION", "ALLOWED", "DATASET", "JOB",
                                "DETAIL"]
    assert lines[1].split() == ["1", "2023-11-14T22:13:20Z", "alice", "stage-in", "allowed",
                                "s3://bkt/census/a.csv", "j1", "3", "files"]
    assert lines[2].split()[2:7] == ["alice", "egress-denied", "DENIED", "s3://bkt/census/",
                                     "j1"]
    assert "\x1b" not in r.stdout and "cancel: \\x1b[31mnot yours" in lines[3]
    assert lines[4].split()[2:] == ["carol", "token-issue", "allowed", "-", "-", "-"]
    assert len(lines) == 5

    r = kotta(logged, "audit", "show", "--dataset", "s3://bkt/census/", "--json")
    assert r.returncode == 0, r.stderr
    assert [(x["seq"], x["action"]) for x in json.loads(r.stdout)] == [
        (1, "stage-in"), (2, "egress-denied")]

    r = kotta(logged, "audit", "show", "--job", "j1", "--user", "alice", "--limit", "1",
              "--json")
    assert [x["seq"] for x in json.loads(r.stdout)] == [2]
    r = kotta(logged, "audit", "show", "--action", "job-denied", "--json")
    assert [x["user"] for x in json.loads(r.stdout)] == ["bob"]


def test_cli_show_of_an_action_the_log_does_not_have_is_an_error(logged):
    """Not an empty table, which reads as "nothing happened": the actions there are."""
    r = kotta(logged, "audit", "show", "--action", "job-deny")
    assert r.returncode == 2, r.stdout
    assert r.stdout == ""
    assert r.stderr == ("kotta: error: --action job-deny is not an action of the audit log; "
                        f"they are: {', '.join(sorted(audit.ACTIONS))}\n")
    assert "job-denied" in r.stderr and "token-issue" in r.stderr
    r = kotta(logged, "audit", "show", "--action", "job-denied")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2


def test_show_by_dataset_is_by_uri_not_by_string_prefix(enclave):
    """`kotta audit show --dataset s3://corpus` (the bucket, which every other command
    reads as s3://corpus/) also listed the records of s3://corpus-secret/; a record naming
    several URIs (the node writes a task's inputs joined by commas in egress-denied and
    access-denied records) was missed when the URI asked for was not its first; and a
    --dataset that is no URI at all selected nothing, silently."""
    log = AuditLog(enclave, clock=Clock())
    log.append(audit.STAGE_IN, user="alice", dataset="s3://corpus/a.txt", job_id="j1")
    log.append(audit.STAGE_IN, user="alice", dataset="s3://corpus-secret/b.txt", job_id="j2")
    log.append(audit.EGRESS_DENIED, user="alice", allowed=False, job_id="j3",
               dataset="s3://corpus/a.txt,s3://corpus-secret/b.txt")

    def seqs(dataset):
        return [r["seq"] for r in log.show(dataset=dataset)]

    assert seqs("s3://corpus") == [1, 3]
    assert seqs("s3://corpus/") == [1, 3]
    assert seqs("s3://corpus-secret/b.txt") == [2, 3]
    assert seqs("s3://corpus-secret/") == [2, 3]
    with pytest.raises(InvalidDataUri, match="not a dataset URI"):
        log.show(dataset="corpus")
