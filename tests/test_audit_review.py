"""Two findings of the security review of the audit log, and the edges of their fixes: a
deleted checkpoint no longer unpins the records it vouched for, and ``kotta audit show``
is for admins only (kotta_executor/security/audit.py, audit_cli.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import time

from kotta_executor.security import credentials
from kotta_executor.security.audit import (
    CHECKPOINT_EVERY,
    CHECKPOINT_KIND,
    GENESIS,
    KIND,
    AuditLog,
    record_hash,
    record_key,
)
from kotta_executor.security.data import put_object
from kotta_executor.security.keys import derived_key
from kotta_executor.security.policy import PolicyStore
from tests import tasks
from tests.conftest import GUARD, subprocess_env
from tests.test_cli import kotta


def _fill(log: AuditLog, n: int) -> list[dict]:
    return [log.append("stage-in", user="alice", dataset=f"s3://b/d/{i}") for i in range(n)]


def _rehash_from(enclave, first: int, last: int, **change) -> None:
    """What someone who can write the records (not the key) does: change record ``first``
    and re-hash the chain from it to ``last``, so every record follows its predecessor."""
    prev = enclave.records.get(KIND, record_key(first - 1))["hash"] if first > 1 else GENESIS
    for seq in range(first, last + 1):
        rec = dict(enclave.records.get(KIND, record_key(seq)))
        if seq == first:
            rec.update(change)
        rec["prev"] = prev
        rec["hash"] = record_hash(rec)
        assert enclave.records.put(KIND, record_key(seq), rec)
        prev = rec["hash"]


def _missing(seq: int) -> str:
    return f"checkpoint {seq}: missing"


# ------------------------------------------------------------------ 1. deleted checkpoint


def test_a_rewritten_audit_record_verifies_once_its_checkpoint_is_deleted(enclave):
    log = AuditLog(enclave)
    for i in range(70):
        log.append("access-denied" if i == 2 else "stage-in", user="mallory",
                   allowed=i != 2, dataset="s3://patients/x", job_id=f"{i:032x}")
    assert enclave.records.get(CHECKPOINT_KIND, record_key(64)) is not None
    assert log.verify().ok

    # someone who can write the log (not the enclave key): turn record 3's denial into an
    # allowed stage-in by someone else, re-hash the chain from there, drop the checkpoint
    _rehash_from(enclave, 3, 70, action="stage-in", allowed=True, user="alice")
    enclave.records.delete(CHECKPOINT_KIND, record_key(64))

    report = _verify_later(enclave)
    assert not report.ok, "a rewritten record and a deleted checkpoint went unnoticed"
    assert len(report.problems) == 1 and report.problems[0].startswith(_missing(64)), (
        report.problems)


def _verify_later(enclave):
    """A verify once CHECKPOINT_GRACE has passed since the records were written (within
    it, a missing checkpoint may still be on its way: see the last test)."""
    from kotta_executor.security.audit import CHECKPOINT_GRACE

    return AuditLog(enclave, clock=lambda: time.time() + CHECKPOINT_GRACE + 1).verify()


def test_every_missing_checkpoint_before_the_last_record_is_named(enclave):
    log = AuditLog(enclave)
    _fill(log, 3 * CHECKPOINT_EVERY + 1)
    for seq in (64, 192):
        assert enclave.records.delete(CHECKPOINT_KIND, record_key(seq))
    problems = _verify_later(enclave).problems
    assert [p.split(":")[0] for p in problems] == ["checkpoint 64", "checkpoint 192"], problems
    assert all("missing" in p for p in problems)


def test_a_checkpoint_with_a_bad_mac_is_reported_once_not_also_as_missing(enclave):
    log = AuditLog(enclave)
    _fill(log, CHECKPOINT_EVERY + 1)
    cp = enclave.records.get(CHECKPOINT_KIND, record_key(64))
    enclave.records.put(CHECKPOINT_KIND, record_key(64), {**cp, "mac": "0" * 64})
    assert log.verify().problems == ["checkpoint 64: bad MAC (forged or modified)"]


# ------------------------------------------- the append-then-checkpoint window, and after


def _append_without_its_checkpoint(log: AuditLog, enclave) -> dict:
    """The record at the next multiple of CHECKPOINT_EVERY as a writer leaves it that has
    written the record and not yet its checkpoint (or died in between)."""
    rec = log.append("stage-in", user="alice")
    assert enclave.records.delete(CHECKPOINT_KIND, record_key(rec["seq"]))
    return rec


def test_the_last_record_may_still_await_its_checkpoint(enclave, monkeypatch):
    log = AuditLog(enclave)
    _fill(log, CHECKPOINT_EVERY - 1)
    rec = _append_without_its_checkpoint(log, enclave)
    assert rec["seq"] == 64 and enclave.records.get(CHECKPOINT_KIND, record_key(64)) is None
    report = log.verify()
    assert report.ok, report.problems  # its writer may be between its two writes

    # a later record exists: the writer of record 64 died before its checkpoint, or the
    # checkpoint was deleted; verify cannot tell which, and reports it
    log.append("stage-in", user="bob")
    problems = _verify_later(enclave).problems
    assert len(problems) == 1 and problems[0].startswith(_missing(64)), problems
    assert "record 64" in problems[0]


def test_a_checkpoint_written_while_verify_walks_the_records_is_read_again(
        enclave, monkeypatch):
    """The walk is no snapshot: the checkpoints' page can be read before the writer of
    record 64 writes its checkpoint, and the records after 64 afterwards."""
    log = AuditLog(enclave)
    _fill(log, CHECKPOINT_EVERY - 1)
    sixty_four = _append_without_its_checkpoint(log, enclave)
    _fill(log, 2)  # another writer appends 65 and 66 meanwhile
    scan = enclave.records.scan

    def writer_catches_up(kind, **kw):
        page = scan(kind, **kw)
        if kind == CHECKPOINT_KIND:
            log._write_checkpoint(sixty_four["seq"], sixty_four["hash"])
        return page

    monkeypatch.setattr(enclave.records, "scan", writer_catches_up)
    report = AuditLog(enclave).verify()
    assert report.ok, report.problems


def test_a_checkpoint_read_again_is_checked_like_the_others(enclave, monkeypatch):
    log = AuditLog(enclave)
    records = _fill(log, CHECKPOINT_EVERY - 1)
    _append_without_its_checkpoint(log, enclave)
    _fill(log, 1)
    scan = enclave.records.scan

    def late(kind, **kw):
        page = scan(kind, **kw)
        if kind == CHECKPOINT_KIND:  # a valid checkpoint, but of another record's hash
            log._write_checkpoint(64, records[10]["hash"])
        return page

    monkeypatch.setattr(enclave.records, "scan", late)
    problems = AuditLog(enclave).verify().problems
    assert problems == ["checkpoint 64: record 64 differs from the record the checkpoint "
                        "vouches for (replaced afterwards)"]


def test_the_tail_after_the_last_required_checkpoint_is_the_documented_window(enclave):
    """What the module docstring admits: the last record, at a multiple of 64, can be
    rewritten with its checkpoint deleted; the records before it stay pinned."""
    log = AuditLog(enclave)
    _fill(log, 2 * CHECKPOINT_EVERY)
    assert enclave.records.delete(CHECKPOINT_KIND, record_key(128))
    _rehash_from(enclave, 65, 128, user="mallory")
    assert log.verify().ok  # the window: nothing after checkpoint 64 is pinned
    _rehash_from(enclave, 64, 128, user="mallory")
    assert log.verify().problems == ["checkpoint 64: record 64 differs from the record the "
                                     "checkpoint vouches for (replaced afterwards)"]


# ------------------------------------------------------------------ an older, intact log


def _old_log(enclave, n: int, on_demand: tuple[int, ...] = ()) -> None:
    """A log as earlier versions wrote it, spelled out here rather than produced by the
    code under test: the record fields, the SHA-256 chain, a checkpoint after every
    multiple of 64 and on demand, and the checkpoint MAC over ``seq|hash|time``."""
    key = derived_key(enclave, "audit")
    prev = GENESIS
    for seq in range(1, n + 1):
        body = {"seq": seq, "time": 1_600_000_000.0 + seq, "user": "alice",
                "action": "stage-in", "dataset": f"s3://b/{seq}", "allowed": True,
                "job_id": None, "detail": None, "prev": prev}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                .encode()).hexdigest()
        assert enclave.records.put(KIND, record_key(seq), {**body, "hash": digest})
        if seq % 64 == 0 or seq in on_demand:
            t = 1_600_000_000.5 + seq
            mac = hmac.new(key, f"{seq}|{digest}|{t!r}".encode(), hashlib.sha256).hexdigest()
            assert enclave.records.put(CHECKPOINT_KIND, record_key(seq),
                                       {"seq": seq, "hash": digest, "time": t, "mac": mac})
        prev = digest


def test_an_intact_log_written_by_an_earlier_version_verifies(enclave):
    _old_log(enclave, 200, on_demand=(100, 200))
    report = AuditLog(enclave).verify()
    assert (report.ok, report.records, report.checkpoints) == (True, 200, 5), report.problems
    # and it is protected like a new one
    assert enclave.records.delete(CHECKPOINT_KIND, record_key(128))
    assert [p.split(":")[0] for p in AuditLog(enclave).verify().problems] == [
        "checkpoint 128"]


def test_a_log_grown_on_from_an_earlier_version_verifies(enclave):
    _old_log(enclave, 70)
    log = AuditLog(enclave)
    _fill(log, 60)  # to record 130, past the checkpoint at 128
    report = log.verify()
    assert (report.ok, report.records, report.checkpoints) == (True, 130, 2), report.problems


# ------------------------------------------------------------------ 2. kotta audit show


def _home_of(tmp_path, name: str, token_file) -> dict[str, str]:
    home = tmp_path / f"{name}-home"
    home.mkdir()
    shutil.copyfile(token_file, home / "token")
    os.chmod(home / "token", 0o600)
    return {**subprocess_env(), "KOTTA_HOME": str(home)}


def test_a_user_cannot_read_other_users_job_ids_from_the_audit_log(
    enclave, user_token, make_executor, tmp_path
):
    admin = credentials.load(enclave)
    policies = PolicyStore(enclave.records, AuditLog(enclave))
    policies.add_dataset("s3://patients/", by=admin.user)
    policies.grant("analyst", "s3://patients/", "read", by=admin.user)
    put_object(enclave, "s3://patients/n.txt", b"1\n2\n")
    alice = make_executor(1, credentials=user_token("alice", role="analyst"))
    f = alice.submit(tasks.file_sum, inputs=["s3://patients/n.txt"])
    assert f.result(GUARD) == 3

    env = _home_of(tmp_path, "bob", user_token("bob", role="guest"))
    # bob is not an admin: listing all users' jobs is refused ...
    r = kotta(enclave.home, "jobs", "--all-users", env=env)
    assert r.returncode != 0 and "only admins" in r.stderr
    # ... and so is the audit log, which would hand him alice's job id and what she read
    r = kotta(enclave.home, "audit", "show", "--json", env=env)
    leaked = r.returncode == 0 and f.job_id in r.stdout
    assert not leaked, "bob read alice's job id and datasets from `kotta audit show`"
    assert r.returncode != 0 and f.job_id not in r.stdout + r.stderr
    assert "only admins may read the audit log (bob is not one)" in r.stderr


def test_audit_show_is_for_admins_and_a_refusal_is_audited(enclave, user_token, tmp_path):
    log = AuditLog(enclave)
    log.append("stage-in", user="alice", dataset="s3://b/x", job_id="a" * 32)
    bob = _home_of(tmp_path, "bob", user_token("bob"))
    carol = _home_of(tmp_path, "carol", user_token("carol", admin=True))

    for args in (["show"], ["show", "--user", "bob"], ["show", "--json", "--limit", "1"]):
        r = kotta(enclave.home, "audit", *args, env=bob)
        assert r.returncode != 0 and r.stdout == "", (args, r.stdout)
        assert "AccessDenied" in r.stderr or "only admins" in r.stderr, r.stderr
    refusals = log.show(user="bob", action="job-denied")
    assert [x["detail"] for x in refusals] == ["read the audit log"] * 3
    assert all(x["allowed"] is False for x in refusals)

    for env in (carol, subprocess_env()):  # a registered admin, and the enclave's own user
        r = kotta(enclave.home, "audit", "show", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert "a" * 32 in r.stdout


def test_audit_verify_is_open_to_users_and_tells_no_contents(enclave, user_token, tmp_path):
    log = AuditLog(enclave)
    log.append("stage-in", user="alice", dataset="s3://b/secret", job_id="a" * 32)
    bob = _home_of(tmp_path, "bob", user_token("bob"))
    r = kotta(enclave.home, "audit", "verify", env=bob)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("audit log OK:")
    rec = enclave.records.get(KIND, record_key(1))
    enclave.records.put(KIND, record_key(1), {**rec, "allowed": False})
    r = kotta(enclave.home, "audit", "verify", env=bob)
    assert r.returncode == 1
    assert "a" * 32 not in r.stdout and "secret" not in r.stdout and "alice" not in r.stdout


def test_the_key_holder_without_a_token_reads_the_log_without_writing_to_it(
        enclave, tmp_path):
    """The enclave's OS user administers an embedded enclave; reading the log must not
    make it a token first (the bootstrap would append records to the log it reads)."""
    AuditLog(enclave).append("stage-in", user="alice", job_id="a" * 32)
    env = {**subprocess_env(), "KOTTA_HOME": str(tmp_path / "empty-home")}
    r = kotta(enclave.home, "audit", "show", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [x["seq"] for x in json.loads(r.stdout)] == [1]
    assert len(AuditLog(enclave).show()) == 1


def test_a_missing_checkpoint_of_a_record_just_written_is_not_yet_a_problem(enclave):
    """Writer A appends record 64 and, before it writes checkpoint 64, writer B appends
    record 65: a verify in between is ok.  Once CHECKPOINT_GRACE has passed, a checkpoint
    still missing is reported."""
    from kotta_executor.security.audit import CHECKPOINT_EVERY, CHECKPOINT_GRACE

    log = AuditLog(enclave)
    for i in range(CHECKPOINT_EVERY):
        log.append("stage-in", user="alice", dataset=f"s3://b/d/{i}")
    # as if A were still between its two writes: its checkpoint is not there yet
    enclave.records.delete(CHECKPOINT_KIND, record_key(CHECKPOINT_EVERY))
    AuditLog(enclave).append("stage-in", user="bob", dataset="s3://b/d/65")
    assert AuditLog(enclave).verify().ok
    later = AuditLog(enclave, clock=lambda: time.time() + CHECKPOINT_GRACE + 1).verify()
    assert not later.ok
    assert any(p.startswith(f"checkpoint {CHECKPOINT_EVERY}: missing") for p in later.problems)
