"""A long session with one executor (a notebook open for days): its access token is renewed
as it runs out, and what happens to the token file meanwhile (``kotta register`` run
again, the file damaged) does not cost the user their registration or a task."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest

from kotta_executor import wire
from kotta_executor.errors import AuthenticationError, TaskRejected
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.tokens import ACCESS_TTL, TokenService
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_auth import _steal
from tests.test_cli import kotta


def test_a_renewal_keeps_a_registration_token_registered_meanwhile(
    start_node, make_executor, user_token, enclave
):
    """A notebook's executor holds bob's first registration token; bob registers a new
    one (the old one expires soon).  The executor's next renewal must not write the old
    one back over it: the new token, printed once, would be lost from the file."""
    bob_file = user_token("bob")
    ex = make_executor(1, start_node=False, credentials=bob_file)
    old = credentials.load(enclave, bob_file).refresh_id
    new_token = TokenService(enclave, AuditLog(enclave)).issue_refresh("bob", by="test")
    credentials.register(enclave, new_token, bob_file)  # `kotta register TOKEN`

    ex._creds.access(now=time.time() + ACCESS_TTL)  # an hour later: the executor renews
    start_node(workers=1)
    assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the executor works on

    held = credentials.load(enclave, bob_file)
    assert held.refresh_id == new_token.split(".")[1] != old
    assert held.user == "bob"


@pytest.mark.parametrize("damage", ["truncated", "loose mode", "a directory"])
def test_a_renewal_with_the_token_file_damaged_meanwhile_fails_no_task(
    start_node, make_executor, user_token, enclave, damage, caplog
):
    """The token file is only where a renewed access token is kept for the next client:
    the executor holds its registration token.  One damaged while the executor runs (an
    editor truncated it, made it 0644, moved it away) fails no submit at the renewal, as
    it failed the one submit that happened to renew (and no other of that hour)."""
    bob_file = user_token("bob")
    ex = make_executor(1, start_node=False, credentials=bob_file)
    if damage == "truncated":
        bob_file.write_text("")
    elif damage == "loose mode":
        bob_file.chmod(0o644)
    else:
        bob_file.unlink()
        bob_file.mkdir()

    with caplog.at_level(logging.WARNING, logger="kotta.credentials"):
        tok = ex._creds.access(now=time.time() + ACCESS_TTL)  # an hour later: it renews
    assert tok.user == "bob" and tok.expires > time.time() + ACCESS_TTL / 2
    assert str(bob_file) in caplog.text  # said, with the file's problem
    start_node(workers=1)
    assert ex.submit(tasks.square, 4).result(GUARD) == 16


@pytest.mark.parametrize("removed", ["the file", "the enclave's entry"])
def test_a_renewal_does_not_write_back_a_token_removed_meanwhile(
    start_node, make_executor, user_token, enclave, removed, caplog
):
    """Bob removes his token from a shared login host (the file, or its entry for the
    enclave), as docs/security.md says a client leaves a token file moved away alone: a
    notebook kernel he forgot there wrote his registration token back into it at its next
    hourly renewal, for anyone who may read that file later.  It is left removed, said,
    and the executor works on with the token it holds."""
    bob_file = user_token("bob")
    ex = make_executor(1, start_node=False, credentials=bob_file)
    if removed == "the file":
        bob_file.unlink()
    else:  # (another enclave's entry stays)
        data = json.loads(bob_file.read_text())
        data["embedded:///elsewhere"] = data.pop(enclave.url)
        bob_file.write_text(json.dumps(data))
    before = bob_file.read_text() if bob_file.exists() else None

    with caplog.at_level(logging.WARNING, logger="kotta.credentials"):
        tok = ex._creds.access(now=time.time() + ACCESS_TTL)  # an hour later: it renews
    assert tok.user == "bob"
    assert (bob_file.read_text() if bob_file.exists() else None) == before
    assert str(bob_file) in caplog.text
    start_node(workers=1)
    assert ex.submit(tasks.square, 4).result(GUARD) == 16


def test_a_registration_token_expiring_mid_session_says_what_to_do_and_loses_no_task(
    start_node, make_executor, user_token, enclave, tmp_path
):
    """Bob's registration token runs out while his notebook is open.  A task he submitted
    just before runs, though a node receives it only after the expiry (it was queued
    before); a submit after it raises AuthenticationError naming the token and what to do
    (`kotta register` a new one), not only that it expired."""
    user_token("bob")
    svc = TokenService(enclave, AuditLog(enclave))
    token = svc.issue_refresh("bob", by="test", ttl=3)
    rid = token.split(".")[1]
    bob_file = tmp_path / "bob-short.token"
    credentials.register(enclave, token, bob_file)
    ex = make_executor(1, start_node=False, credentials=bob_file)
    before = ex.submit(tasks.square, 5)  # queued before the expiry, received after it

    expires = enclave.records.get("refresh", rid)["expires"]
    wait_for(lambda: time.time() > expires, what="the registration token to expire")
    with pytest.raises(AuthenticationError, match=(
            rf"refresh token {rid} of bob expired at .*: ask an admin of the enclave for a "
            r"new registration token, then run `kotta register TOKEN`")):
        ex.submit(tasks.square, 6)
    start_node(workers=1)
    assert before.result(GUARD) == 25


def test_the_last_minutes_of_a_registration_token_renew_nothing_per_submit(
    start_node, make_executor, user_token, enclave, tmp_path
):
    """In the last 5 minutes of a registration token, its access token (cut to the same
    expiry) is due for renewal, and a renewal gives the same expiry again: each submit
    renewed it (two reads of the enclave's records, a token file rewritten), a map of
    thousands thousands of times.  The token serves until it runs out."""
    user_token("bob")
    token = TokenService(enclave, AuditLog(enclave)).issue_refresh("bob", by="test", ttl=120)
    bob_file = tmp_path / "bob-short.token"
    credentials.register(enclave, token, bob_file)
    ex = make_executor(1, start_node=False, credentials=bob_file)
    stored = json.loads(bob_file.read_text())

    fs = [ex.submit(tasks.square, i) for i in range(20)]
    taken = _steal(enclave, [f.job_id for f in fs])
    assert len({wire.peek_header(d.body)["auth"] for d in taken.values()}) == 1  # one token
    assert json.loads(bob_file.read_text()) == stored  # not rewritten
    enclave.queue.release(list(taken.values()))
    start_node(workers=1)
    assert [f.result(GUARD) for f in fs] == [i * i for i in range(20)]


def test_a_user_disabled_mid_session_is_told_at_the_next_renewal_what_to_do(
    make_executor, user_token, enclave
):
    """Bob is disabled while his notebook idles; an hour later its executor renews his
    access token, and his submit raises what `kotta` and a new executor say (who may
    enable him again), not only that he is disabled."""
    ex = make_executor(1, start_node=False, credentials=user_token("bob"))
    TokenService(enclave, AuditLog(enclave)).set_disabled("bob", True, by="test")
    with pytest.raises(AuthenticationError, match=(
            "^the user bob is disabled: only an admin of the enclave can enable you again$")):
        ex._creds.access(now=time.time() + ACCESS_TTL)  # an hour later: it renews


def test_a_cached_access_token_whose_key_was_edited_is_renewed_not_sent_as_a_forgery(
    start_node, make_executor, user_token, enclave
):
    """The token file caches an access token and its key.  A key that is not the token's
    (the file edited by hand, or the enclave key replaced since) made every task of the
    next hour fail at the node as 'forged or altered', audited as a forgery, though the
    registration token in the file is good: the client can tell, and renews instead."""
    bob_file = user_token("bob")
    data = json.loads(bob_file.read_text())
    data[enclave.url]["access"]["key"] = base64.b64encode(b"x" * 32).decode()
    bob_file.write_text(json.dumps(data))
    ex = make_executor(1, start_node=False, credentials=bob_file)
    start_node(workers=1)
    assert ex.submit(tasks.square, 7).result(GUARD) == 49
    assert AuditLog(enclave).show(action="task-rejected") == []


def test_the_enclave_users_own_token_running_out_after_90_days_locks_no_one_out(
    make_executor, user_token, enclave, enclave_dir, caplog
):
    """On the quick start the OS user, who holds the enclave key, got its token on first
    use: a registration token of 90 days.  Once it ran out, every `kotta` command and
    executor told them to ask an admin for a new one: they are the admin, and `kotta token
    issue` refused them too.  The key holder gets a new one, as on first use (an enclave
    made anew does the same); another user's expired token is not replaced."""
    first = credentials.load(enclave)  # first use: the OS user, the enclave's admin
    bob_file = user_token("bob")
    svc = TokenService(enclave)
    for creds in (first, credentials.load(enclave, bob_file)):  # 90 days later
        rec = enclave.records.get("refresh", creds.refresh_id)
        enclave.records.put("refresh", creds.refresh_id, {**rec, "expires": time.time() - 1})
        t0 = time.time() - 2 * ACCESS_TTL  # (and the access token cached with it)
        credentials.save(enclave, creds._refresh, svc._access(
            svc.user(creds.user), creds.refresh_id, t0, t0 + ACCESS_TTL), creds.path)

    r = kotta(enclave_dir, "whoami")
    assert r.returncode == 0, r.stderr
    ex = make_executor(1)
    assert ex.owner == first.user
    assert ex.submit(tasks.square, 8).result(GUARD) == 64
    assert credentials.load(enclave, bootstrap=False).refresh_id != first.refresh_id
    with pytest.raises(AuthenticationError, match="of bob expired at .*kotta register"):
        make_executor(1, start_node=False, credentials=bob_file)


def test_an_executor_takes_up_a_token_registered_after_its_own_was_revoked(
    start_node, make_executor, user_token, enclave
):
    """Bob's token is revoked while his notebook's executor holds it; an admin gives him a
    new one, and he runs `kotta register TOKEN` in a terminal.  Every submit of that
    executor failed all the same (TaskRejected: the token was revoked), until he made the
    executor anew; it takes up the new token from the token file, and runs on."""
    bob_file = user_token("bob")
    ex = make_executor(1, start_node=False, credentials=bob_file)
    svc = TokenService(enclave, AuditLog(enclave))
    old = ex._creds.refresh_id
    svc.revoke(old, by="test")
    start_node(workers=1)
    with pytest.raises(TaskRejected, match="the token of bob was revoked"):
        ex.submit(tasks.square, 3).result(GUARD)

    new_token = svc.issue_refresh("bob", by="test")
    credentials.register(enclave, new_token, bob_file)  # `kotta register TOKEN`
    assert ex.submit(tasks.square, 4).result(GUARD) == 16
    assert ex._creds.refresh_id == new_token.split(".")[1] != old
    # and an hour later it renews with the new one
    assert ex._creds.access(now=time.time() + ACCESS_TTL).refresh_id == ex._creds.refresh_id
    assert ex.submit(tasks.square, 5).result(GUARD) == 25

    # a token registered while the executor's was good is left; revoked after, that one's
    # refusal by a node makes the executor take it up
    third = svc.issue_refresh("bob", by="test")
    credentials.register(enclave, third, bob_file)
    ex._creds.look_again()
    assert ex.submit(tasks.square, 6).result(GUARD) == 36
    assert ex._creds.refresh_id == new_token.split(".")[1]
    svc.revoke(new_token, by="test")
    wait_for(lambda: not _runs(ex), what="the node's 2 s revocation cache to pass")
    assert ex._creds.refresh_id == new_token.split(".")[1]
    assert ex.submit(tasks.square, 8).result(GUARD) == 64
    assert ex._creds.refresh_id == third.split(".")[1]


def _runs(ex) -> bool:
    """Whether a task of ``ex`` runs (False: a node refused it)."""
    try:
        ex.submit(tasks.square, 1).result(GUARD)
    except TaskRejected:
        return False
    return True


def test_a_renewal_refused_for_a_revoked_token_takes_up_one_registered_since(
    make_executor, user_token, enclave
):
    """The same, found by the hourly renewal rather than by a node; but a token of another
    user in the file is not taken up (the executor's tasks are bob's): the renewal says
    why it was refused."""
    bob_file = user_token("bob")
    ex = make_executor(1, start_node=False, credentials=bob_file)
    svc = TokenService(enclave, AuditLog(enclave))
    svc.revoke(ex._creds.refresh_id, by="test")
    alice_token = credentials.load(enclave, user_token("alice"))._refresh
    credentials.register(enclave, alice_token, bob_file)
    with pytest.raises(AuthenticationError, match="the refresh token .* of bob was revoked"):
        ex._creds.access(now=time.time() + ACCESS_TTL)

    new_token = svc.issue_refresh("bob", by="test")
    credentials.register(enclave, new_token, bob_file)
    tok = ex._creds.access(now=time.time() + ACCESS_TTL)
    assert tok.user == "bob" and tok.refresh_id == new_token.split(".")[1]
