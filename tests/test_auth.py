"""Attacks on who runs a task and whose jobs one may touch (tokens, signed envelopes,
ownership checks), each with what the user sees, the audit record it leaves, and no task
lost: every job ends completed, failed with a reason, or cancelled.

Forged and tampered messages go straight onto the queue of a real SQLite enclave, as an
attacker with access to the queue would put them; real node processes (``start_node``)
verify them.  Genuine envelopes come from a real client: an executor that starts no node
submits, and the test takes the message off the queue before any node runs
(:func:`_steal`).  Note that ``enclave.jobs.create`` enqueues a job's task itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import KottaExecutor, wire
from kotta_executor.backends.base import Delivery, Message, NewJob
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.config import current_user
from kotta_executor.errors import (
    AccessDenied,
    AuthenticationError,
    CorruptTask,
    EnvelopeError,
    SerializationError,
    TaskKilled,
    TaskRejected,
)
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.tokens import (
    ACCESS_TTL,
    CLOCK_SKEW,
    MAX_TASK_AGE,
    REVOCATION_CACHE,
    AccessToken,
    Identity,
    TokenService,
    Verifier,
)
from kotta_executor.states import FINAL, JobState
from tests import tasks
from tests.conftest import GUARD, node_outlives, queue_crafted_task, subprocess_env, wait_for
from tests.test_cli import kotta

BAD_SIGNATURE = "signature does not verify"

# ---------------------------------------------------------------------- helpers


def _steal(enclave, job_ids) -> dict[str, Delivery]:
    """Take the task messages of ``job_ids`` off the queue (no node may be running); the
    caller releases them (to let them run) or acks them (to replace them)."""
    taken: dict[str, Delivery] = {}

    def grab() -> bool:
        for d in enclave.queue.receive("test", 10, GUARD, "test-thief"):
            taken[d.job_id] = d
        return set(job_ids) <= set(taken)

    wait_for(grab, what="the task messages")
    return taken


def _reframe(body: bytes, **changes) -> bytes:
    """``body`` with header fields changed and its original mac kept: what an attacker
    without the signing key can make of a signed envelope."""
    env = wire.decode(body)
    mac = env.sections.pop(wire.MAC_SECTION)
    framed = wire.encode({**env.header, **changes}, env.sections, mac_key=b"placeholder")
    return framed[: -wire.MAC_BYTES] + mac


def _section(body: bytes, name: str) -> tuple[int, int]:
    """Where the section ``name`` of an envelope lies: ``(start, end)`` offsets."""
    sections = wire.decode(body).sections
    pos = len(body) - sum(len(v) for v in sections.values())
    for n, data in sections.items():
        if n == name:
            return pos, pos + len(data)
        pos += len(data)
    raise AssertionError(f"no section {name!r}")


def _flip(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]


def _signed_task(token: AccessToken, fn, *args, client: str = "c" * 16,
                 created: float | None = None, owner: str | None = None,
                 job_id: str | None = None) -> bytes:
    """A task envelope for ``fn(*args)`` signed with ``token``, as a client builds one."""
    header = wire.task_header(
        job_id=job_id or os.urandom(16).hex(), owner=owner or token.user, client=client,
        queue="test", walltime=60.0, created=time.time() if created is None else created,
        fn=wire.fn_name(fn), n=1,
    )
    return token.sign(header, wire.dump_call(fn, [(args, {})]))


def _inject(enclave, body: bytes) -> str:
    """A job record for the task ``body`` (which enqueues it); its job id."""
    h = wire.peek_header(body)
    enclave.jobs.create([
        NewJob(h["job_id"], h["owner"], h["client"], h["queue"], h["fn"], h["walltime"], body)
    ])
    enclave.ring_nodes("test")
    return h["job_id"]


def _finals(enclave, job_id: str) -> list[str]:
    return [state for _, state, _ in enclave.jobs.history(job_id) if state in FINAL]


def _rejected(enclave, job_id: str, owner: str, why: str) -> None:
    """The node's whole refusal: the job failed once with the reason, its message was
    dead-lettered, and a task-rejected record names the job."""
    job = enclave.jobs.get(job_id)
    assert job.state == JobState.FAILED
    assert "refused by the node" in job.reason and why in job.reason
    assert _finals(enclave, job_id) == ["failed"]
    dead = [d for d in enclave.queue.dead_letters("test") if d["job_id"] == job_id]
    assert len(dead) == 1 and why in dead[0]["reason"]
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=job_id)
    assert rec["allowed"] is False
    assert rec["user"] == owner
    assert why in rec["detail"]


def _token_of(enclave, path: Path | None = None) -> AccessToken:
    return credentials.load(enclave, path).access()


def _home_with(tmp_path: Path, name: str, token_file: Path | None = None) -> dict[str, str]:
    """The environment of a CLI run with its own ``$KOTTA_HOME`` holding ``token_file``."""
    home = tmp_path / f"{name}-home"
    home.mkdir()
    if token_file is not None:
        shutil.copyfile(token_file, home / "token")
        os.chmod(home / "token", 0o600)
    return {**subprocess_env(), "KOTTA_HOME": str(home)}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- 1. forged envelopes


def test_forged_envelopes_are_rejected_dead_lettered_and_audited(
    start_node, make_executor, user_token, enclave, tmp_path
):
    alice_file = user_token("alice")
    alice = make_executor(1, start_node=False, credentials=alice_file)
    marker = tmp_path / "forged-task-ran"
    victims = [alice.submit(tasks.create_file, str(marker), "ran") for _ in range(3)]
    ids = [f.job_id for f in victims]
    taken = _steal(enclave, ids)
    enclave.queue.ack(taken.values())  # replaced in transit by the forgeries below

    real = _token_of(enclave, alice_file)
    # a token as another enclave would mint it: alice's claims (made admin), its own key
    other = EmbeddedEnclave(tmp_path / "other-enclave")
    try:
        minted = TokenService(other)._access(
            Identity("alice", "admin", admin=True), real.refresh_id, time.time(),
            time.time() + ACCESS_TTL,
        )
    finally:
        other.close()
    forgeries = {}
    for job_id, how in zip(ids, ("random key", "other enclave", "unsigned"), strict=True):
        env = wire.decode(taken[job_id].body)
        env.sections.pop(wire.MAC_SECTION)
        if how == "random key":  # alice's real token id, a key that is not its key
            fake = AccessToken(real.id, os.urandom(32))
            forgeries[job_id] = fake.sign(env.header, env.sections)
        elif how == "other enclave":
            forgeries[job_id] = minted.sign(env.header, env.sections)
        else:  # no token and no mac at all
            head = {k: v for k, v in env.header.items() if k != "auth"}
            forgeries[job_id] = wire.encode(head, env.sections)
    enclave.queue.send("test", [Message(j, body) for j, body in forgeries.items()])

    node = start_node(workers=1)
    for f, why in zip(victims, (BAD_SIGNATURE, BAD_SIGNATURE, "not signed"), strict=True):
        with pytest.raises(TaskRejected, match=why) as info:
            f.result(GUARD)
        assert f"job {f.job_id} was refused by the node" in str(info.value)
        _rejected(enclave, f.job_id, "alice", why)
    assert not marker.exists()
    # the node still runs alice's genuine tasks
    assert alice.submit(tasks.square, 3).result(GUARD) == 9
    assert node.proc.poll() is None
    assert enclave.queue.depth("test") == 0


def test_a_task_of_an_earlier_client_unsigned_wire_format_1_is_refused_naming_the_version(
    start_node, make_executor, enclave
):
    """A client of a kotta-executor from before signed tasks writes envelopes of version 1,
    unsigned.  The node's refusal says so, and what to do: "not signed (no access token)"
    alone read as a forgery or a lost token, not as a client to upgrade."""
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 3)
    taken = _steal(enclave, [f.job_id])
    enclave.queue.ack(taken.values())
    env = wire.decode(taken[f.job_id].body)
    env.sections.pop(wire.MAC_SECTION)
    head = {k: v for k, v in env.header.items() if k not in ("auth", "python")}
    old = bytearray(wire.encode(head, env.sections))
    old[len(wire.MAGIC)] = 1  # the version byte: the layout of version 1 is the same
    enclave.queue.send("test", [Message(f.job_id, bytes(old))])
    start_node(workers=1)
    with pytest.raises(TaskRejected, match="not signed") as info:
        f.result(GUARD)
    assert "wire format version 1" in str(info.value)
    assert "upgrade the client" in str(info.value) and "submit it again" in str(info.value)
    _rejected(enclave, f.job_id, current_user(), "earlier kotta-executor")


def test_a_task_of_a_later_wire_format_is_refused_naming_a_newer_client(
    start_node, make_executor, enclave
):
    """A client upgraded before the nodes (a later wire format): its task failed as a
    "corrupt task message", which read as damage in transit, not as a node to upgrade."""
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.square, 3)
    taken = _steal(enclave, [f.job_id])
    enclave.queue.ack(taken.values())
    newer = bytearray(taken[f.job_id].body)
    newer[len(wire.MAGIC)] = wire.VERSION + 1
    enclave.queue.send("test", [Message(f.job_id, bytes(newer))])
    node = start_node(workers=1)
    with pytest.raises(TaskRejected, match="newer kotta-executor") as info:
        f.result(GUARD)
    assert f"version {wire.VERSION + 1}" in str(info.value)
    assert "corrupt" not in str(info.value)
    assert "upgrade the node" in str(info.value)
    assert node.proc.poll() is None
    [dead] = enclave.queue.dead_letters("test")
    assert dead["job_id"] == f.job_id and "newer kotta-executor" in dead["reason"]


def test_a_message_that_is_no_task_envelope_is_audited_as_it_fails_its_job(
    start_node, make_executor, enclave
):
    """Someone who can write to the queue puts there what no client writes: a task cut
    short, or the signed task of another job under a job's id (a replay).  The named jobs
    failed (CorruptTask) and their messages were dead-lettered, but the audit log said
    nothing of it: a forged signed task is audited (task-rejected), a message that cannot
    even be read was not."""
    ex = make_executor(1, start_node=False)
    cut, replayed, source = (ex.submit(tasks.square, i) for i in range(3))
    taken = _steal(enclave, [cut.job_id, replayed.job_id, source.job_id])
    enclave.queue.ack([taken[cut.job_id], taken[replayed.job_id]])
    enclave.queue.release([taken[source.job_id]])
    enclave.queue.send("test", [
        Message(cut.job_id, taken[cut.job_id].body[:-5]),
        Message(replayed.job_id, taken[source.job_id].body),  # another job's envelope
    ])
    node = start_node(workers=1)
    assert source.result(GUARD) == 4  # its own task runs, as if nothing happened
    for f, why in ((cut, "is cut short"), (replayed, "not the task of the job it names")):
        with pytest.raises(CorruptTask, match=why):
            f.result(GUARD)
        [rec] = AuditLog(enclave).show(action="task-rejected", job_id=f.job_id)
        assert rec["allowed"] is False
        assert why in rec["detail"] and "not verified" in rec["detail"]
    assert ex.submit(tasks.square, 5).result(GUARD) == 25
    assert node.proc.poll() is None


# ---------------------------------------------------------------------- 2. replays


def test_alice_envelope_replayed_as_bob_is_rejected_and_a_replay_runs_nothing_twice(
    start_node, make_executor, user_token, enclave, tmp_path
):
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    bob = make_executor(1, start_node=False, credentials=user_token("bob"))
    runs = tmp_path / "runs"
    f = alice.submit(tasks.append_line, str(runs), "alice ran")
    original = _steal(enclave, [f.job_id])[f.job_id]
    enclave.queue.release([original])  # alice's task goes ahead, untouched
    assert _reframe(original.body) == original.body  # re-framing alone changes nothing

    # bob's copy of alice's bytes, made his: his name, his job, his client; alice's mac
    stolen_id = os.urandom(16).hex()
    as_bob = _reframe(original.body, owner="bob", job_id=stolen_id, client=bob.client_id)
    _inject(enclave, as_bob)
    start_node(workers=1)

    assert f.result(GUARD) == "alice ran"
    with pytest.raises(TaskRejected, match=BAD_SIGNATURE):
        bob.attach(stolen_id).result(GUARD)
    _rejected(enclave, stolen_id, "bob", BAD_SIGNATURE)

    # the same envelope again, byte for byte, after its job completed: a valid signature,
    # but the job is final, so the node acks it and nothing runs
    before = enclave.jobs.get(f.job_id, with_result=True)
    enclave.queue.send("test", [Message(f.job_id, original.body)])
    enclave.ring_nodes("test")
    wait_for(lambda: enclave.queue.depth("test") == 0, what="the replay to be consumed")
    after = enclave.jobs.get(f.job_id, with_result=True)
    assert after.state == JobState.COMPLETED
    assert after.result == before.result
    assert _finals(enclave, f.job_id) == ["completed"]
    assert runs.read_text().splitlines() == ["alice ran"]
    assert f.job_id not in {d["job_id"] for d in enclave.queue.dead_letters("test")}


def test_a_client_cannot_claim_another_owner(make_executor, user_token):
    with pytest.raises(AuthenticationError, match="holds the token of 'alice'.*as 'bob'"):
        make_executor(1, start_node=False, credentials=user_token("alice"), owner="bob")


def test_a_task_cannot_submit_as_the_nodes_user(
    start_node, make_executor, user_token, enclave_dir, enclave
):
    """An executor that alice's task makes, with the default token, held the node's: the
    task's own tasks ran, and were recorded and audited, as the node's user (root, the
    admin), with that user's grants.  It is an AuthenticationError, as claiming another
    owner is; with alice's own token it submits as alice."""
    alice = user_token("alice")
    start_node(workers=2)
    ex = make_executor(1, start_node=False, credentials=alice)
    inner = ex.submit(tasks.nested_submit, str(enclave_dir))
    with pytest.raises(AuthenticationError, match="inside a task of 'alice'"):
        inner.result(GUARD)
    assert [j.owner for j in enclave.jobs.list()] == ["alice"]  # nothing was submitted

    ran_as, job_id = ex.submit(tasks.nested_submit, str(enclave_dir), str(alice)).result(GUARD)
    assert ran_as == "alice" and enclave.jobs.get(job_id).owner == "alice"


def test_a_task_that_returns_a_future_of_its_own_is_told_to_return_its_result(
        start_node, make_executor, user_token, enclave_dir):
    """The refusal said "cannot be sent to a task" of a KottaFuture a task returned: the
    wrong way round (a plain Future's said so, test_dependencies)."""
    alice = user_token("alice")
    start_node(workers=2)
    ex = make_executor(1, start_node=False, credentials=alice)
    err = ex.submit(tasks.return_a_kotta_future, str(enclave_dir), str(alice)).exception(GUARD)
    assert isinstance(err, SerializationError)
    assert "nor returned by one" in str(err) and "return its result()" in str(err)


# ---------------------------------------------------------------------- 3. tampering


def test_a_tampered_payload_is_rejected_and_nothing_runs(
    start_node, make_executor, enclave, tmp_path
):
    ex = make_executor(1, start_node=False)
    where = {name: tmp_path / f"marker-{name}" for name in "ABZ"}
    redirected = ex.submit(tasks.create_file, str(where["A"]), "ran")
    flipped = ex.submit(tasks.create_file, str(where["B"]), "ran")
    taken = _steal(enclave, [redirected.job_id, flipped.job_id])
    enclave.queue.ack(taken.values())

    body = taken[redirected.job_id].body
    start, end = _section(body, "args")
    assert body.count(b"marker-A") == 1 and start <= body.index(b"marker-A") < end
    changed = body.replace(b"marker-A", b"marker-Z")  # the task now writes elsewhere
    body = taken[flipped.job_id].body
    start, end = _section(body, "args")
    bitflip = _flip(body, (start + end) // 2)
    for tampered in (changed, bitflip):
        wire.decode(tampered)  # still a well-formed envelope: only the mac gives it away
    enclave.queue.send("test", [Message(redirected.job_id, changed),
                                Message(flipped.job_id, bitflip)])

    start_node(workers=1)
    for f in (redirected, flipped):
        with pytest.raises(TaskRejected, match=BAD_SIGNATURE):
            f.result(GUARD)
        _rejected(enclave, f.job_id, ex.owner, BAD_SIGNATURE)
    assert not any(p.exists() for p in where.values())
    # the same task untampered runs and writes its marker
    assert ex.submit(tasks.create_file, str(where["A"]), "ran").result(GUARD) == "ran"
    assert where["A"].read_text() == "ran"


# ---------------------------------------------------------------------- 4. expiry


def test_a_task_signed_with_an_expired_token_is_rejected(
    start_node, make_executor, enclave, tmp_path
):
    ex = make_executor(1, start_node=False)
    creds = credentials.load(enclave)
    svc = TokenService(enclave)
    issued = time.time() - 2 * ACCESS_TTL
    expired = svc._access(svc.user(creds.user), creds.refresh_id, issued, issued + ACCESS_TTL)
    marker = tmp_path / "expired-task-ran"
    job_id = _inject(enclave, _signed_task(expired, tasks.create_file, str(marker), "ran",
                                           client=ex.client_id))
    fresh = _inject(enclave, _signed_task(creds.access(), tasks.create_file, str(marker), "ok",
                                          client=ex.client_id))
    start_node(workers=1)

    with pytest.raises(TaskRejected, match="expired token"):
        ex.attach(job_id).result(GUARD)
    _rejected(enclave, job_id, creds.user, "expired token")
    # the same task with a valid token runs (and is the only one that wrote the marker)
    assert ex.attach(fresh).result(GUARD) == "ok"
    assert marker.read_text() == "ok"


@pytest.fixture
def alice_token(enclave) -> tuple[AccessToken, TokenService]:
    svc = TokenService(enclave)
    svc.add_user("alice", "analyst", by="test")
    return svc.refresh(svc.issue_refresh("alice", by="test")), svc


def _check(enclave, body: bytes, now: float):
    return Verifier(enclave, clock=lambda: now).verify(body, wire.peek_header(body))


def test_verifier_accepts_a_fresh_task(enclave, alice_token):
    tok, _ = alice_token
    claims = _check(enclave, _signed_task(tok, tasks.square, 2), time.time())
    assert (claims.user, claims.role, claims.refresh_id) == ("alice", "analyst", tok.refresh_id)


@pytest.mark.parametrize(
    ("created", "now", "refused"),
    [
        # (task created at, node clock), as offsets: issued (i), expires (e); None = accepted
        (("i", -CLOCK_SKEW), ("i", 0), None),  # skew: created a little before issue
        (("i", -CLOCK_SKEW - 1), ("i", 0), "expired token"),  # before issue, beyond skew
        (("e", 0), ("e", 0), None),  # the last instant of validity
        (("e", 0.01), ("e", 0.01), "expired token"),  # after the token expired
        (("i", 10), ("i", 10 - CLOCK_SKEW + 1), None),  # a client clock a little ahead
        (("i", 10), ("i", 10 - CLOCK_SKEW - 1), "in the future"),
        (("i", 10), ("i", 10 + MAX_TASK_AGE - 1), None),  # old, but not too old
        (("i", 10), ("i", 10 + MAX_TASK_AGE + 1), "refused as a replay"),
    ],
    ids=["skew-ok", "before-issue", "at-expiry", "after-expiry", "ahead-ok", "future",
         "old-ok", "too-old"],
)
def test_verifier_time_boundaries(enclave, alice_token, created, now, refused):
    tok, _ = alice_token
    at = {"i": tok.issued, "e": tok.expires}
    body = _signed_task(tok, tasks.square, 2, created=at[created[0]] + created[1])
    clock = at[now[0]] + now[1]
    if refused is None:
        assert _check(enclave, body, clock).user == "alice"
    else:
        with pytest.raises(AuthenticationError, match=refused):
            _check(enclave, body, clock)


def test_verifier_refuses_an_owner_the_token_does_not_name(enclave, alice_token):
    tok, _ = alice_token
    body = _signed_task(tok, tasks.square, 2, owner="bob")  # alice signs a task for bob
    with pytest.raises(AuthenticationError, match="owner 'bob' but was signed by 'alice'"):
        _check(enclave, body, time.time())


def test_verifier_sees_a_revocation_within_its_cache_time(enclave, alice_token):
    tok, svc = alice_token
    body = _signed_task(tok, tasks.square, 2)
    now = [time.time()]
    verifier = Verifier(enclave, clock=lambda: now[0])
    assert verifier.verify(body, wire.peek_header(body)).user == "alice"
    assert svc.revoke(tok.refresh_id, by="test")
    now[0] += REVOCATION_CACHE  # a cached "not revoked" is trusted no longer than this
    with pytest.raises(AuthenticationError, match="token of alice was revoked"):
        verifier.verify(body, wire.peek_header(body))


def test_verifier_refuses_a_disabled_user(enclave, alice_token):
    tok, svc = alice_token
    svc.set_disabled("alice", True, by="test")
    with pytest.raises(AuthenticationError, match="the user alice is disabled"):
        _check(enclave, _signed_task(tok, tasks.square, 2), time.time())


def test_verifier_refuses_a_creation_time_beyond_float(enclave, alice_token):
    tok, _ = alice_token
    with pytest.raises(EnvelopeError, match="created must be a finite time"):
        _signed_task(tok, tasks.square, 2, created=10**400)
    body = _signed_task(tok, tasks.square, 2)
    with pytest.raises(AuthenticationError, match="absurd"):  # even past the wire's check
        Verifier(enclave).verify(body, {**wire.peek_header(body), "created": 10**400})


@pytest.mark.parametrize("field", ["created", "walltime"])
def test_a_signed_task_with_an_absurd_number_does_not_kill_the_node(
    start_node, make_executor, enclave, field
):
    ex = make_executor(1, start_node=False)
    # (in the signed header only; the job record is ordinary)
    job_id = queue_crafted_task(enclave, ex, lambda h: h.update({field: 10**400}))
    assert node_outlives(start_node(workers=1), enclave, job_id).state == JobState.FAILED


# ---------------------------------------------------------------------- 5. revocation


def test_a_revoked_token_stops_tasks_and_renewal(
    start_node, make_executor, user_token, enclave, enclave_dir, tmp_path
):
    bob_file = user_token("bob")
    bob = make_executor(1, start_node=False, credentials=bob_file)
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    first = start_node(workers=1)
    assert bob.submit(tasks.square, 2).result(GUARD) == 4  # his token works
    assert first.terminate() == 0  # a fresh node below: no cached revocation state

    rid = credentials.load(enclave, bob_file).refresh_id
    r = kotta(enclave_dir, "token", "revoke", rid)  # as the admin (the OS user)
    assert r.returncode == 0, r.stderr
    assert f"token {rid} revoked" in r.stdout
    start_node(workers=1)

    marker = tmp_path / "revoked-task-ran"
    f = bob.submit(tasks.create_file, str(marker), "ran")
    with pytest.raises(TaskRejected, match="token of bob was revoked"):
        f.result(GUARD)
    _rejected(enclave, f.job_id, "bob", "revoked")
    assert not marker.exists()
    assert alice.submit(tasks.square, 3).result(GUARD) == 9  # only bob is cut off

    # bob's client, when his access token runs out, cannot get another
    with pytest.raises(AuthenticationError, match=f"refresh token {rid} of bob was revoked"):
        credentials.load(enclave, bob_file).access(now=time.time() + ACCESS_TTL)
    log = AuditLog(enclave)
    [revoke] = log.show(action="token-revoke")
    assert revoke["user"] == current_user() and rid in revoke["detail"]
    assert "bob" in revoke["detail"]


def test_refused_renewals_and_registrations_are_audited(enclave, user_token, tmp_path):
    bob_file = user_token("bob")
    rid = credentials.load(enclave, bob_file).refresh_id
    TokenService(enclave).revoke(rid, by="test")
    with pytest.raises(AuthenticationError, match="revoked"):
        credentials.load(enclave, bob_file).access(now=time.time() + ACCESS_TTL)
    with pytest.raises(AuthenticationError, match="not known"):
        credentials.register(enclave, f"krt1.{'0' * 18}.{'A' * 43}", tmp_path / "guess")
    refused = AuditLog(enclave).show(action="token-refresh")
    assert [(r["user"], r["allowed"]) for r in refused] == [("bob", False), ("?", False)]


def test_a_refused_renewal_with_an_expired_registration_token_is_audited(enclave, user_token):
    """A former user's registration token, past its expiry, renews nothing; the refusal
    was the one kind of refused renewal left unaudited."""
    user_token("bob")
    svc = TokenService(enclave, AuditLog(enclave))
    token = svc.issue_refresh("bob", by="test", ttl=0.05)
    rid = token.split(".")[1]
    expires = enclave.records.get("refresh", rid)["expires"]
    wait_for(lambda: time.time() > expires, what="the registration token to expire")
    with pytest.raises(AuthenticationError, match=f"refresh token {rid} of bob expired"):
        svc.refresh(token)
    refused = AuditLog(enclave).show(action="token-refresh")
    assert [(r["user"], r["allowed"], r["detail"]) for r in refused] == [
        ("bob", False, f"expired token {rid}")]


def test_a_disabled_users_client_fails_saying_why(
    start_node, make_executor, user_token, enclave
):
    bob_file = user_token("bob")
    bob = make_executor(1, start_node=False, credentials=bob_file)
    first = start_node(workers=1)
    done = bob.submit(tasks.square, 2)
    assert done.result(GUARD) == 4
    assert first.terminate() == 0  # a fresh node below: no cached "not disabled"
    TokenService(enclave).set_disabled("bob", True, by="test")
    start_node(workers=1)

    # a client made before: its tasks fail at once with the node's reason, and it may not
    # attach to his jobs any more
    with pytest.raises(TaskRejected, match="the user bob is disabled"):
        bob.submit(tasks.square, 3).result(GUARD)
    with pytest.raises(AuthenticationError, match="the user bob is disabled: only an admin"):
        bob.attach(done.job_id)
    # a new one is refused when it is made, with the reason, before anything is sent
    with pytest.raises(AuthenticationError, match="the user bob is disabled: only an admin"):
        make_executor(1, start_node=False, credentials=bob_file)
    refused = [r["detail"] for r in AuditLog(enclave).show(user="bob", action="token-refresh")]
    assert [d.rsplit("refused ", 1)[1] for d in refused] == ["KottaExecutor.attach",
                                                             "KottaExecutor"]


@pytest.mark.parametrize("how", ["disable", "revoke"])
def test_a_task_a_node_holds_does_not_run_once_its_user_is_cut_off(
    start_node, make_executor, user_token, enclave, enclave_dir, tmp_path, how
):
    """A task the node received (and verified) before its owner was disabled, or the token
    revoked, waits there behind a long one; it must not run when a worker frees."""
    bob_file = user_token("bob")
    bob = make_executor(1, start_node=False, credentials=bob_file)
    node = start_node("--prefetch", "1", workers=1)  # (it holds one behind the first)
    started, release, marker = tmp_path / "started", tmp_path / "release", tmp_path / "ran"
    first = bob.submit(tasks.touch_then_wait, str(started), str(release))
    wait_for(started.exists, what="the first task to start")
    second = bob.submit(tasks.create_file, str(marker), "ran")

    def held() -> bool:
        with sqlite3.connect(enclave_dir / "kotta.db") as db:
            row = db.execute("SELECT holder FROM messages WHERE job_id=?",
                             (second.job_id,)).fetchone()
        return row is not None and row[0] == node.node_id

    wait_for(held, what="the node to hold the second task")
    svc = TokenService(enclave)
    if how == "disable":
        svc.set_disabled("bob", True, by="test")
    else:
        svc.revoke(credentials.load(enclave, bob_file).refresh_id, by="test")
    time.sleep(REVOCATION_CACHE)  # the node's cached "not revoked" (of the receipt) lapses
    release.write_text("go")
    first.result(GUARD)  # (it ran already: a task that runs keeps running)
    why = "the user bob is disabled" if how == "disable" else "token of bob was revoked"
    with pytest.raises(TaskRejected, match=why):
        second.result(GUARD)
    assert not marker.exists(), "the held task of a cut-off user ran"
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=second.job_id)
    assert rec["user"] == "bob" and rec["allowed"] is False and why in rec["detail"]


def test_a_disabled_users_attach_is_refused_whatever_the_id(make_executor, user_token, enclave):
    """attach() asks about the caller's token first, as the kotta commands do: a disabled
    user's attach to an id no job has is refused too (it was UnknownJob: the enclave told
    a refused token which ids it knows)."""
    bob = make_executor(1, start_node=False, credentials=user_token("bob"))
    TokenService(enclave).set_disabled("bob", True, by="test")
    with pytest.raises(AuthenticationError, match="the user bob is disabled: only an admin"):
        bob.attach("0" * 32)


# ---------------------------------------------------------------------- 6. other users' jobs


def test_other_users_jobs_are_out_of_reach_except_for_admins(
    start_node, make_executor, user_token, enclave, enclave_dir, tmp_path
):
    bob_file = user_token("bob")
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    bob = make_executor(1, start_node=False, credentials=bob_file)
    start_node(workers=1)
    done = alice.submit(tasks.say, "alice's secret")
    done.result(GUARD)
    started, release = tmp_path / "started", tmp_path / "release"
    running = alice.submit(tasks.touch_then_wait, str(started), str(release))
    wait_for(started.exists, what="alice's task to start")

    with pytest.raises(AccessDenied, match=f"job {done.job_id} belongs to alice; bob may not"):
        bob.attach(done.job_id)
    as_bob = _home_with(tmp_path, "bob", bob_file)
    for args in (("status", done.job_id), ("logs", done.job_id), ("cancel", running.job_id)):
        r = kotta(enclave_dir, *args, env=as_bob)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "belongs to alice; bob may not" in r.stderr
        assert "secret" not in r.stdout + r.stderr
    r = kotta(enclave_dir, "jobs", "--all-users", env=as_bob)
    assert r.returncode == 2
    assert "only admins may list the jobs of all users (bob is not one)" in r.stderr
    r = kotta(enclave_dir, "jobs", env=as_bob)
    assert r.returncode == 0 and done.job_id not in r.stdout
    job = enclave.jobs.get(running.job_id)  # bob's cancel did nothing
    assert job.state == JobState.PROCESSING and not job.kill_requested

    denied = AuditLog(enclave).show(action="job-denied", user="bob")
    assert [(d["job_id"], d["detail"]) for d in denied] == [
        (done.job_id, "attach to a job of alice"),
        (done.job_id, "see a job of alice"),
        (done.job_id, "see a job of alice"),
        (running.job_id, "cancel or kill a job of alice"),
        (None, "list the jobs of all users"),
    ]
    assert all(d["allowed"] is False for d in denied)

    # the admin (the OS user, who bootstrapped the enclave) may do all of it
    r = kotta(enclave_dir, "status", done.job_id)
    assert r.returncode == 0 and "owner     alice" in r.stdout
    r = kotta(enclave_dir, "logs", done.job_id)
    assert r.returncode == 0 and "alice's secret out" in r.stdout
    r = kotta(enclave_dir, "jobs", "--all-users")
    assert r.returncode == 0 and done.job_id in r.stdout and running.job_id in r.stdout
    assert r.stdout.splitlines()[0].split() == ["JOB", "STATE", "QUEUE", "CREATED", "OWNER",
                                                "FUNCTION"]
    line = next(x for x in r.stdout.splitlines() if x.startswith(done.job_id))
    assert line.split()[5] == "alice"  # whose each job is (CREATED is two words)
    r = kotta(enclave_dir, "jobs")  # one's own: no owner column
    assert "OWNER" not in r.stdout.splitlines()[0]
    r = kotta(enclave_dir, "cancel", running.job_id)
    assert r.returncode == 0 and "is being killed" in r.stdout
    with pytest.raises(TaskKilled):
        running.result(GUARD)
    assert enclave.jobs.get(running.job_id).state in FINAL
    assert enclave.jobs.get(running.job_id).reason
    assert AuditLog(enclave).show(action="job-denied", user=current_user()) == []


def test_listing_all_users_jobs_refused_is_audited(enclave, user_token, enclave_dir, tmp_path):
    as_bob = _home_with(tmp_path, "bob", user_token("bob"))
    r = kotta(enclave_dir, "jobs", "--all-users", env=as_bob)
    assert r.returncode == 2
    assert AuditLog(enclave).show(action="job-denied", user="bob")


# ---------------------------------------------------------------------- 7. token file mode


def test_a_token_file_others_can_read_or_write_is_refused(make_executor, enclave_dir,
                                                            user_token):
    make_executor(1, start_node=False)  # writes $KOTTA_HOME/token on first use
    path = credentials.token_path()
    assert _mode(path) == 0o600
    alice_file = user_token("alice")
    for token_file in (path, alice_file):
        for mode in (0o644, 0o620, 0o640, 0o604, 0o602):
            os.chmod(token_file, mode)
            with pytest.raises(AuthenticationError, match="chmod 600") as info:
                KottaExecutor(1, enclave=enclave_dir, start_node=False,
                              credentials=None if token_file == path else token_file)
            assert f"the token file {token_file} is accessible by group or others" in str(
                info.value)
            assert f"(mode {mode:04o})" in str(info.value)
        os.chmod(token_file, 0o600)
    assert make_executor(1, start_node=False).owner == current_user()
    assert make_executor(1, start_node=False, credentials=alice_file).owner == "alice"


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: p.write_text("[]"), "is damaged: it does not map enclave URLs to tokens"),
        (lambda p: p.write_text('"krt1.x.y"'), "is damaged: it does not map enclave URLs"),
        (lambda p: p.write_text('{"embedded:///x": []}'), "is damaged: it does not map"),
        (lambda p: p.write_text("{"), "is damaged: Expecting property name"),
        (lambda p: p.mkdir(mode=0o700), "is not a regular file (a directory?)"),
        (lambda p: os.mkfifo(p, 0o600), "is not a regular file"),
    ],
    ids=["a-list", "a-string", "an-entry-not-an-object", "broken-json", "a-directory",
         "a-fifo"],
)
def test_a_token_file_of_the_wrong_shape_is_a_clear_error(enclave, enclave_dir, tmp_path,
                                                          make, why):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    make(home / "token")
    if (home / "token").is_file():
        os.chmod(home / "token", 0o600)
    r = kotta(enclave_dir, "whoami", env={**subprocess_env(), "KOTTA_HOME": str(home)})
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(f"kotta: error: the token file {home / 'token'} {why}"), r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(AuthenticationError, match=re.escape(why)):
        KottaExecutor(1, enclave=enclave_dir, start_node=False, credentials=home / "token")


def test_a_token_file_named_by_the_caller_that_holds_no_token_is_an_error(
    enclave, enclave_dir, user_token, tmp_path, monkeypatch
):
    """``credentials=`` names whose tasks these are: alice's token file, mistyped ("~" is
    not expanded), or her registration token given in place of its file.  The executor
    made the OS user (the enclave's admin) a new token there and ran her tasks as that
    admin, with the admin's grants, saying nothing."""
    user_token("alice")
    monkeypatch.chdir(tmp_path)
    before = TokenService(enclave).tokens()
    for named in ("~/tokens/alice.token", tmp_path / "tokens" / "alice.tokn", "krt1.ab.cd"):
        with pytest.raises(AuthenticationError, match=re.escape(f"no kotta token for the "
                                                                f"enclave {enclave.url} in")):
            KottaExecutor(1, enclave=enclave_dir, start_node=False, credentials=named)
        assert not Path(os.path.expanduser(str(named))).exists()
        assert not Path(str(named)).exists()
    assert TokenService(enclave).tokens() == before  # no token issued


# ---------------------------------------------------------------------- 8. registration


def test_registration_through_the_cli(enclave_dir, tmp_path):
    r = kotta(enclave_dir, "user", "add", "carol", "--role", "analyst")  # the admin
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("krt1.")

    as_carol = _home_with(tmp_path, "carol")
    r = kotta(enclave_dir, "register", token, env=as_carol)
    assert r.returncode == 0, r.stderr
    assert "registered as carol (role analyst)" in r.stdout
    token_file = Path(as_carol["KOTTA_HOME"]) / "token"
    assert _mode(token_file) == 0o600
    [entry] = json.loads(token_file.read_text()).values()
    assert (entry["user"], entry["refresh"]) == ("carol", token)
    r = kotta(enclave_dir, "whoami", env=as_carol)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("carol (role analyst) on ")
    r = kotta(enclave_dir, "user", "add", "eve", "--role", "analyst", env=as_carol)
    assert r.returncode == 2 and "only an admin" in r.stderr

    rid = token.split(".")[1]
    as_dave = _home_with(tmp_path, "dave")
    for bad, why in [
        (f"krt1.{rid}.{'A' * 43}", f"the refresh token {rid} is not known to the enclave"),
        (f"krt1.{'0' * 18}.{'A' * 43}", f"the refresh token {'0' * 18} is not known to the"),
        ("krt1.half", "not a kotta refresh token"),
        ("hello", "not a kotta refresh token"),
    ]:
        r = kotta(enclave_dir, "register", bad, env=as_dave)
        assert r.returncode == 2, (bad, r.stdout)
        assert r.stderr.startswith(f"kotta: error: {why}"), (bad, r.stderr)
    assert not (Path(as_dave["KOTTA_HOME"]) / "token").exists()

    # an OS user the enclave does not know: no silent admin, a pointer to `kotta register`
    as_mallory = {**_home_with(tmp_path, "mallory"), "USER": "mallory", "LOGNAME": "mallory"}
    r = kotta(enclave_dir, "whoami", env=as_mallory)
    assert r.returncode == 2
    assert "you (mallory) are not registered with the enclave" in r.stderr
    assert "`kotta register TOKEN`" in r.stderr


def test_registering_with_the_wrong_enclave_names_the_enclave(enclave_dir, tmp_path):
    """A user of two enclaves (their own quick-start one, and the lab's) runs `kotta
    register TOKEN` with the lab's token but without `--enclave`: it was refused with 'the
    refresh token is not known to this enclave', naming neither the enclave nor the token,
    so that nothing said the token was good and the enclave the wrong one."""
    r = kotta(enclave_dir, "user", "add", "carol", "--role", "analyst")
    assert r.returncode == 0, r.stderr
    token = r.stdout.split()[-1]
    other = tmp_path / "own-enclave"
    assert kotta(other, "whoami").returncode == 0  # (made, with its own admin)
    r = kotta(other, "register", token, env=_home_with(tmp_path, "carol"))
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(
        f"kotta: error: the refresh token {token.split('.')[1]} is not known to the enclave "
        f"embedded://{other} (issued by another enclave?)"), r.stderr


def test_an_unregistered_user_cannot_make_an_executor(make_executor, enclave_dir, tmp_path,
                                                      monkeypatch):
    make_executor(1, start_node=False)  # the enclave has its admin
    monkeypatch.setenv("KOTTA_HOME", str(tmp_path / "mallory-home"))
    monkeypatch.setenv("LOGNAME", "mallory")
    monkeypatch.setenv("USER", "mallory")
    with pytest.raises(AuthenticationError, match="mallory.*not registered.*kotta register"):
        KottaExecutor(1, enclave=enclave_dir, start_node=False)



def test_credentials_of_another_enclave_are_refused_by_the_executor(
        make_executor, start_node, enclave, tmp_path):
    """A notebook with two enclaves passes the Credentials loaded for one to an executor
    of the other: every task failed at the node with 'TaskRejected: the task's signature
    does not verify: the envelope was forged or altered', and was audited as a forgery.
    The executor refuses them when it is made, naming both enclaves."""
    other = EmbeddedEnclave(tmp_path / "other")
    try:
        creds = credentials.load(other)  # (the same OS user's: its first-use admin too)
        with pytest.raises(AuthenticationError, match=(
                f"the credentials given are for the enclave {re.escape(other.url)}, not "
                f"{re.escape(enclave.url)}")):
            make_executor(1, start_node=False, credentials=creds)
    finally:
        other.close()
    ex = make_executor(1, start_node=False, credentials=credentials.load(enclave))
    start_node(workers=1)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9
    assert AuditLog(enclave).show(action="task-rejected") == []


# ---------------------------------------------------------------------- 9. first use


def test_first_use_of_an_embedded_enclave_needs_no_setup(make_executor, enclave):
    ex = make_executor(1)  # a fresh enclave, a fresh $KOTTA_HOME, a local node
    assert ex.submit(tasks.square, 7).result(GUARD) == 49
    creds = credentials.load(enclave, bootstrap=False)
    assert (creds.user, creds.admin) == (current_user(), True)
    assert _mode(credentials.token_path()) == 0o600
    [added] = AuditLog(enclave).show(action="user-add")
    assert added["user"] == current_user() and "admin" in added["detail"]


def test_a_first_use_never_reads_the_enclave_key_half_written(tmp_path, monkeypatch):
    """Two processes using a new enclave for the first time at once (a job array's
    scripts): the one that made the key file had not written its bytes yet when the other
    read it, which failed with 'the enclave key ... is damaged (0 bytes)' (or, looking
    whether it may make itself a token, took its OS user for no admin of the enclave).  A
    key file appears whole or not at all, and both use the same key.  (The first one's
    write is held, by holding os.urandom, until the second has read the key.)"""
    from kotta_executor.security import keys

    path = tmp_path / "enclave.key"
    held, go = threading.Event(), threading.Event()
    urandom = os.urandom

    def held_random(n: int) -> bytes:
        if threading.current_thread().name == "first":
            held.set()
            go.wait(GUARD)
        return urandom(n)

    monkeypatch.setattr(os, "urandom", held_random)
    got: dict[str, bytes] = {}
    first = threading.Thread(target=lambda: got.update(first=keys._local_key(path)),
                             name="first")
    first.start()
    try:
        assert held.wait(GUARD)
        got["second"] = keys._local_key(path)
    finally:
        go.set()
        first.join(GUARD)
    assert len(got["second"]) == keys.KEY_BYTES
    assert got["first"] == got["second"] == path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["enclave.key"]  # no leftovers


def test_a_damaged_enclave_key_is_said_not_taken_for_another_users(enclave_dir):
    """The enclave key cut short (a full disk): its own OS user, without a token file
    (a new machine, a new $KOTTA_HOME), was told 'no kotta token ...: ask an admin of the
    enclave for a registration token', as a user who may not read the key is; the admin
    being that user, and the key the problem.  It is named."""
    first = EmbeddedEnclave(enclave_dir)
    try:
        credentials.load(first)  # first use: the key, the admin, its token
    finally:
        first.close()
    key = enclave_dir / "enclave.key"
    key.write_bytes(key.read_bytes()[:10])
    credentials.token_path().unlink()
    r = kotta(enclave_dir, "whoami")
    assert r.returncode == 2
    assert r.stderr.startswith(f"kotta: error: the enclave key {key} is damaged (10 bytes)"), (
        r.stderr)


def test_an_enclave_made_anew_in_the_same_place_replaces_the_stale_token(
        make_executor, enclave_dir, caplog):
    """The token file is keyed by the enclave's URL; an enclave deleted and made again at
    the same path does not know the old token (its tasks were refused as forged)."""
    first = EmbeddedEnclave(enclave_dir)
    old = credentials.load(first)
    first.close()
    shutil.rmtree(enclave_dir)
    again = EmbeddedEnclave(enclave_dir)
    try:
        with pytest.raises(AuthenticationError, match="not issued by it.*created anew"):
            credentials.load(again, bootstrap=False)  # someone who cannot make a token
        ex = make_executor(1)  # the enclave's own user: a new token, with a warning
        assert ex.submit(tasks.square, 6).result(GUARD) == 36
        assert "issued by an earlier enclave" in caplog.text
        assert credentials.load(again, bootstrap=False).refresh_id != old.refresh_id
    finally:
        again.close()


# ---------------------------------------------------------------------- 10. any byte flipped


@pytest.fixture(scope="module")
def signed_envelope(tmp_path_factory):
    enclave = EmbeddedEnclave(tmp_path_factory.mktemp("flip-enclave"))
    svc = TokenService(enclave)
    svc.add_user("alice", "analyst", by="test")
    tok = svc.refresh(svc.issue_refresh("alice", by="test"))
    body = _signed_task(tok, tasks.add, 2, 3)
    verifier = Verifier(enclave)
    assert verifier.verify(body, wire.peek_header(body)).user == "alice"
    yield verifier, body
    enclave.close()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)),
                      min_size=1, max_size=3))
def test_no_byte_of_a_signed_envelope_can_change(signed_envelope, flips):
    verifier, body = signed_envelope
    data = bytearray(body)
    for at, mask in flips:
        data[at % len(data)] ^= mask
    data = bytes(data)
    if data == body:  # two flips that cancel out
        return
    with pytest.raises((AuthenticationError, EnvelopeError)):
        verifier.verify(data, wire.peek_header(data))
