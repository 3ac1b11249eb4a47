"""The security commands of ``kotta``: datasets, policies, tokens, users — as an admin and
as a user who is not one.  Real subprocesses on a real enclave directory."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kotta_executor import config
from kotta_executor.backends.base import NewJob
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.data import get_object
from kotta_executor.security.policy import PolicyStore
from kotta_executor.security.tokens import ACCESS_TTL, TokenService
from tests.conftest import GUARD, subprocess_env, thread_frame
from tests.test_cli import kotta


def _as(tmp_path, name, token_file):
    home = tmp_path / f"{name}-home"
    home.mkdir()
    shutil.copyfile(token_file, home / "token")
    os.chmod(home / "token", 0o600)
    return {**subprocess_env(), "KOTTA_HOME": str(home)}


def test_datasets_and_policies_from_the_shell(enclave, enclave_dir, tmp_path, user_token):
    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    r = kotta(enclave_dir, "dataset", "add", "s3://klab-jobs/", "--description", "corpus",
              "--egress-cap", "1000")
    assert r.returncode == 0, r.stderr
    assert "s3://klab-jobs/ registered (egress allow, cap 1000 bytes)" in r.stdout
    r = kotta(enclave_dir, "dataset", "put", "s3://klab-jobs/n.txt", str(data))
    assert r.returncode == 0, r.stderr
    assert get_object(enclave, "s3://klab-jobs/n.txt") == b"1\n2\n3\n"
    r = kotta(enclave_dir, "dataset", "list")
    assert "s3://klab-jobs/" in r.stdout and "1000" in r.stdout and "corpus" in r.stdout

    assert kotta(enclave_dir, "policy", "grant", "analyst", "s3://klab-jobs/", "read").returncode == 0
    r = kotta(enclave_dir, "policy", "grant", "analyst", "s3://klab-jobs/", "write", "--deny")
    assert r.returncode == 0 and "deny write" in r.stdout
    r = kotta(enclave_dir, "policy", "show", "--role", "analyst")
    lines = [line.split() for line in r.stdout.splitlines()[1:]]
    assert sorted(lines) == [["analyst", "read", "allow", "s3://klab-jobs/"],
                             ["analyst", "write", "deny", "s3://klab-jobs/"]]
    policies = PolicyStore(enclave.records)
    assert policies.check("analyst", "read", "s3://klab-jobs/n.txt").allowed
    assert not policies.check("analyst", "write", "s3://klab-jobs/n.txt").allowed

    assert kotta(enclave_dir, "policy", "revoke", "analyst", "s3://klab-jobs/", "read").returncode == 0
    assert not policies.check("analyst", "read", "s3://klab-jobs/n.txt").allowed
    r = kotta(enclave_dir, "policy", "revoke", "analyst", "s3://klab-jobs/", "read")
    assert r.returncode == 1 and "there was no read statement" in r.stdout

    r = kotta(enclave_dir, "policy", "grant", "analyst", "s3://unregistered/", "read")
    assert r.returncode == 2 and "not a registered dataset" in r.stderr
    r = kotta(enclave_dir, "dataset", "add", "s3://klab-jobs/../etc/")
    assert r.returncode == 2 and "steps out of its place" in r.stderr

    actions = [rec["action"] for rec in AuditLog(enclave).show(dataset="s3://klab-jobs/")]
    assert actions == ["dataset-add", "stage-out", "policy-grant", "policy-grant", "policy-revoke"]
    assert AuditLog(enclave).verify().ok


def test_a_user_who_is_not_an_admin_manages_nothing(enclave, enclave_dir, tmp_path, user_token):
    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    for args in (
        ["dataset", "add", "s3://klab-jobs/"],
        ["policy", "grant", "guest", "s3://klab-jobs/", "read"],
        ["user", "add", "mallory", "--role", "admin", "--admin"],
        ["token", "issue", "bob"],
    ):
        r = kotta(enclave_dir, *args, env=bob)
        assert r.returncode == 2, args
        assert "only an admin" in r.stderr and "bob is not one" in r.stderr
    assert PolicyStore(enclave.records).datasets() == []
    # but may look, and revoke their own token
    assert kotta(enclave_dir, "dataset", "list", env=bob).returncode == 0
    assert kotta(enclave_dir, "whoami", env=bob).stdout.startswith("bob (role guest)")
    r = kotta(enclave_dir, "token", "list", env=bob)
    [line] = r.stdout.splitlines()[1:]
    rid = line.split()[0]
    r = kotta(enclave_dir, "token", "revoke", rid, env=bob)
    assert r.returncode == 0 and "revoked" in r.stdout
    # its access token, cached for up to an hour, dies with it
    r = kotta(enclave_dir, "whoami", env=bob)
    assert r.returncode == 2 and "the token of bob was revoked" in r.stderr


def test_a_user_who_is_not_an_admin_trying_admin_commands_is_audited(
        enclave, enclave_dir, tmp_path, user_token):
    """Every refusal is audited (docs/security.md): a user who tries to grant their role
    data, add an admin or revoke another's token left no record of it."""
    alice_rid = credentials.load(enclave, user_token("alice")).refresh_id
    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    tries = (
        ["policy", "grant", "guest", "s3://klab-jobs/", "read"],
        ["user", "add", "mallory", "--role", "admin", "--admin"],
        ["token", "revoke", alice_rid],
    )
    for args in tries:
        r = kotta(enclave_dir, *args, env=bob)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
    denied = AuditLog(enclave).show(action="job-denied")
    assert [(rec["user"], rec["allowed"]) for rec in denied] == [("bob", False)] * 3
    assert "kotta policy grant" in denied[0]["detail"]
    assert "kotta user add" in denied[1]["detail"]
    assert alice_rid in denied[2]["detail"] and "alice" in denied[2]["detail"]
    assert TokenService(enclave).user("mallory") is None


def test_a_user_who_is_not_an_admin_is_not_told_who_owns_a_token_id(
        enclave, enclave_dir, tmp_path, user_token):
    """`kotta token revoke ID` by a user who is not an admin, of another user's token id,
    answered "the token ID belongs to alice; ...": it told anyone who owns a token id, and
    (an unknown id answering "no refresh token") which ids exist.  Now another user's id
    and an unknown one get the same refusal, naming no one; the audit keeps the detail,
    and an admin is still told that an id is unknown."""
    alice_rid = credentials.load(enclave, user_token("alice")).refresh_id
    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    unknown = "0" * len(alice_rid)
    theirs = kotta(enclave_dir, "token", "revoke", alice_rid, env=bob)
    none = kotta(enclave_dir, "token", "revoke", unknown, env=bob)
    assert (theirs.returncode, none.returncode) == (2, 2), (theirs.stderr, none.stderr)
    assert "alice" not in theirs.stderr, theirs.stderr
    assert theirs.stderr.replace(alice_rid, unknown) == none.stderr, (theirs.stderr, none.stderr)
    assert not enclave.records.get("refresh", alice_rid).get("revoked")
    denied = [rec["detail"] for rec in AuditLog(enclave).show(action="job-denied")]
    assert alice_rid in denied[-2] and "alice" in denied[-2], denied
    assert unknown in denied[-1] and "no such token" in denied[-1], denied
    r = kotta(enclave_dir, "token", "revoke", unknown)  # an admin
    assert r.returncode == 2 and f"no refresh token {unknown!r} in the enclave" in r.stderr


def test_registering_another_users_token_over_ones_own_says_so(enclave, enclave_dir):
    """The quick start's admin runs `kotta register` with the token just printed for
    alice, in their own shell (the guide's lines one after the other): their own admin
    token was replaced by alice's without a word, and their next `kotta user add` said
    only that alice is no admin.  It is said, with how to get one's own back."""
    me = config.current_user()
    assert kotta(enclave_dir, "whoami").returncode == 0
    token = kotta(enclave_dir, "user", "add", "alice", "--role", "analyst").stdout.split()[-1]
    r = kotta(enclave_dir, "register", token)
    assert r.returncode == 0, r.stderr
    path = credentials.token_path()
    assert r.stderr == (
        f"kotta: note: {path} held the token of {me} for {enclave.url}; it holds alice's "
        f"now, and kotta and executors act as alice (keep each user's token in a "
        f"$KOTTA_HOME of their own).  To be {me} again: `kotta register` a token of "
        f"{me}'s (`kotta token issue {me}`, by an admin), or remove the enclave's entry "
        f"from {path} and run kotta: the enclave's OS user gets a new token, as on first "
        f"use\n"), r.stderr
    assert kotta(enclave_dir, "whoami").stdout.startswith("alice (role analyst)")
    path.unlink()
    assert kotta(enclave_dir, "whoami").stdout.startswith(f"{me} (role admin, admin)")
    r = kotta(enclave_dir, "register", kotta(enclave_dir, "token", "issue", me).stdout.strip())
    assert r.returncode == 0 and r.stderr == "", r.stderr  # (one's own: nothing to say)


def test_users_and_tokens_from_the_shell(enclave, enclave_dir):
    r = kotta(enclave_dir, "user", "add", "carol", "--role", "analyst")
    assert r.returncode == 0, r.stderr
    token = r.stdout.split()[-1]
    assert token.startswith("krt1.")
    r = kotta(enclave_dir, "user", "list")
    assert any(line.split()[:4] == ["carol", "analyst", "no", "active"] for line in r.stdout.splitlines())
    assert kotta(enclave_dir, "user", "disable", "carol").returncode == 0
    r = kotta(enclave_dir, "user", "list")
    assert any(line.split()[:4] == ["carol", "analyst", "no", "disabled"] for line in r.stdout.splitlines())
    r = kotta(enclave_dir, "user", "add", "carol", "--role", "analyst")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = kotta(enclave_dir, "token", "issue", "nobody")
    assert r.returncode == 2 and "no user 'nobody'" in r.stderr
    issued = [rec["detail"] for rec in AuditLog(enclave).show(action="token-issue")]
    assert any("for carol" in d for d in issued)


def test_the_last_admins_last_token_cannot_be_revoked_and_a_lockout_is_recoverable(
        enclave, enclave_dir, tmp_path):
    """`kotta token revoke` of the only valid token of the enclave's only active admin was
    done: then no one could administer the enclave, as with that admin disabled.  It is
    refused, saying how to do it safely (a new token first); done that way, it works.  An
    enclave locked out anyway (an older version revoked it) is recovered as documented
    (docs/security.md §1): its OS user removes its token file and runs `kotta` again."""
    me = config.current_user()  # (the first use's admin, holder of the enclave key)
    assert kotta(enclave_dir, "whoami").returncode == 0
    old = credentials.load(enclave).refresh_id
    r = kotta(enclave_dir, "token", "revoke", old)
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(f"kotta: error: the token {old} of {me} is the last valid "
                               "token of an active admin of the enclave"), r.stderr
    assert f"kotta token issue {me}" in r.stderr and "kotta register" in r.stderr
    assert kotta(enclave_dir, "whoami").returncode == 0  # nothing was revoked
    assert not enclave.records.get("refresh", old).get("revoked")

    # the safe way: a new token first, registered; then the old one goes
    r = kotta(enclave_dir, "token", "issue", me)
    assert r.returncode == 0, r.stderr
    assert kotta(enclave_dir, "register", r.stdout.strip()).returncode == 0
    r = kotta(enclave_dir, "token", "revoke", old)
    assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
    assert kotta(enclave_dir, "whoami").returncode == 0

    # locked out all the same (revoked by an older version): the recovery
    rid = credentials.load(enclave).refresh_id
    rec = enclave.records.get("refresh", rid)
    enclave.records.put("refresh", rid, {**rec, "revoked": time.time(), "revoked_by": me})
    r = kotta(enclave_dir, "user", "list")
    assert r.returncode == 2 and "the token of " + me + " was revoked" in r.stderr, r.stderr
    credentials.token_path().unlink()  # `rm $KOTTA_HOME/token`
    r = kotta(enclave_dir, "user", "add", "bob", "--role", "ops")
    assert r.returncode == 0, r.stderr
    assert credentials.load(enclave).refresh_id not in (rid, old)


def test_an_enclave_whose_admins_tokens_ran_out_with_its_key_holder_disabled_is_recoverable(
        enclave, enclave_dir, tmp_path):
    """The other way to lose every admin, which no command can refuse: bob, an admin,
    disabled the OS user's identity (the first-use admin), and bob's token ran out.  Bob
    is told to ask an admin; the OS user, holder of the enclave key, is told that only an
    admin can enable them, even with its token file removed.  The documented recovery
    (docs/security.md §1): the key holder enables itself from Python, and runs kotta."""
    me = config.current_user()
    r = kotta(enclave_dir, "user", "add", "bob", "--role", "ops", "--admin")
    assert r.returncode == 0, r.stderr
    bob = _home(tmp_path, "bob")
    assert kotta(enclave_dir, "register", r.stdout.split()[-1], env=bob).returncode == 0
    assert kotta(enclave_dir, "user", "disable", me, env=bob).returncode == 0
    svc = TokenService(enclave)
    for t in svc.tokens("bob"):  # 90 days later
        rec = enclave.records.get("refresh", t["id"])
        enclave.records.put("refresh", t["id"], {**rec, "expires": time.time() - 1})
    held = credentials.load(enclave, Path(bob["KOTTA_HOME"]) / "token")
    t0 = time.time() - 2 * ACCESS_TTL  # (and the access token cached with it)
    credentials.save(enclave, held._refresh, svc._access(
        svc.user("bob"), held.refresh_id, t0, t0 + ACCESS_TTL), held.path)
    r = kotta(enclave_dir, "user", "enable", me, env=bob)
    assert r.returncode == 2 and "expired" in r.stderr, r.stderr
    credentials.token_path().unlink()
    r = kotta(enclave_dir, "user", "enable", me)
    assert r.returncode == 2 and f"the user {me} is disabled" in r.stderr, r.stderr

    r = subprocess.run([sys.executable, "-c", (
        "import sys; from kotta_executor.backends import open_enclave; "
        "from kotta_executor.security.tokens import TokenService; "
        "TokenService(open_enclave(sys.argv[1])).set_disabled(sys.argv[2], False, by=sys.argv[2])"
    ), str(enclave_dir), me], env=subprocess_env(), capture_output=True, text=True, timeout=GUARD)
    assert r.returncode == 0, r.stderr
    r = kotta(enclave_dir, "token", "issue", "bob")
    assert r.returncode == 0, r.stderr


def _home(tmp_path, name):
    home = tmp_path / f"{name}-home"
    home.mkdir()
    return {**subprocess_env(), "KOTTA_HOME": str(home)}


def _refusals(enclave, user):
    return [r["detail"] for r in AuditLog(enclave).show(user=user, action="token-refresh")
            if r["allowed"] is False]


def test_the_last_active_admin_cannot_be_disabled(enclave_dir):
    """`kotta user disable ME` by the enclave's only admin was done: then no one could
    enable a user, add one, register a dataset or grant a role, that admin included (not
    even with the token file removed), and the enclave had no admin for good.  It is
    refused, naming what to do; with another active admin it is done."""
    me = config.current_user()  # (the first use's admin)
    assert kotta(enclave_dir, "whoami").returncode == 0
    r = kotta(enclave_dir, "user", "disable", me)
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(f"kotta: error: {me} is the enclave's last active admin"), r.stderr
    assert kotta(enclave_dir, "whoami").returncode == 0
    assert kotta(enclave_dir, "user", "add", "bob", "--role", "ops", "--admin").returncode == 0
    assert kotta(enclave_dir, "user", "disable", "bob").returncode == 0
    r = kotta(enclave_dir, "user", "disable", me)  # (bob, disabled, is no admin to count)
    assert r.returncode == 2 and "last active admin" in r.stderr, r.stderr
    assert kotta(enclave_dir, "user", "enable", "bob").returncode == 0
    r = kotta(enclave_dir, "user", "disable", me)
    assert r.returncode == 0, r.stderr


def test_the_last_admin_with_a_valid_token_cannot_be_disabled(enclave, enclave_dir):
    """Another admin whose tokens are all revoked cannot administer the enclave: the
    first admin disabling themselves on the strength of that one was done, and then no one
    could (that admin neither: their identity is disabled, so a new token of theirs, even
    the enclave key holder's as on first use, is refused).  It is refused, as disabling
    the last active admin is; with the other admin given a token again, it is done."""
    me = config.current_user()
    assert kotta(enclave_dir, "user", "add", "bob", "--role", "ops", "--admin").returncode == 0
    svc = TokenService(enclave)
    [bob_rid] = [t["id"] for t in svc.tokens("bob")]
    assert kotta(enclave_dir, "token", "revoke", bob_rid).returncode == 0
    r = kotta(enclave_dir, "user", "disable", me)
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(f"kotta: error: {me} is the enclave's last active admin with "
                               "a valid token: disabled, no one could enable a user"), r.stderr
    assert "or issue one of bob a token (`kotta token issue NAME`)" in r.stderr
    assert kotta(enclave_dir, "whoami").returncode == 0
    assert kotta(enclave_dir, "token", "issue", "bob").returncode == 0
    r = kotta(enclave_dir, "user", "disable", me)
    assert r.returncode == 0, r.stderr


def test_a_disabled_or_revoked_admin_keeps_none_of_their_rights(enclave, enclave_dir, tmp_path):
    """The review's reproduction: bob, an admin with an access token cached in his own
    home, is disabled, then his token revoked; each time his next command is refused,
    whatever his token's claims say, and the refusal is audited."""
    r = kotta(enclave_dir, "user", "add", "bob", "--role", "ops", "--admin")
    assert r.returncode == 0, r.stderr
    bob = _home(tmp_path, "bob")
    r = kotta(enclave_dir, "register", r.stdout.split()[-1], env=bob)
    assert r.returncode == 0, r.stderr
    assert kotta(enclave_dir, "whoami", env=bob).stdout.startswith("bob (role ops, admin)")

    assert kotta(enclave_dir, "user", "disable", "bob").returncode == 0
    for args in (["user", "enable", "bob"], ["user", "add", "mallory", "--role", "admin", "--admin"],
                 ["whoami"], ["audit", "show"], ["jobs", "--all-users"]):
        r = kotta(enclave_dir, *args, env=bob)
        assert r.returncode == 2, (args, r.stdout)
        assert r.stderr.startswith("kotta: error: the user bob is disabled: only an admin "
                                   "of the enclave can enable you again"), (args, r.stderr)
        assert "Traceback" not in r.stderr
    users = {line.split()[0]: line.split()[3]
             for line in kotta(enclave_dir, "user", "list").stdout.splitlines()[1:]}
    assert "mallory" not in users and users["bob"] == "disabled"
    refused = _refusals(enclave, "bob")
    assert len(refused) == 5 and all("the user bob is disabled" in d for d in refused)
    assert "refused kotta user enable" in refused[0] and "refused kotta user add" in refused[1]
    assert not [r for r in AuditLog(enclave).show(user="bob") if r["allowed"]]

    # enabled again by an admin, his token works again: then revoked, it does not
    assert kotta(enclave_dir, "user", "enable", "bob").returncode == 0
    assert kotta(enclave_dir, "whoami", env=bob).returncode == 0
    rid = kotta(enclave_dir, "token", "list", "--user", "bob").stdout.splitlines()[1].split()[0]
    assert kotta(enclave_dir, "token", "revoke", rid).returncode == 0
    kotta(enclave_dir, "dataset", "add", "s3://klab-jobs/")
    r = kotta(enclave_dir, "policy", "grant", "ops", "s3://klab-jobs/", "write", env=bob)
    assert r.returncode == 2
    assert r.stderr.startswith("kotta: error: the token of bob was revoked at "), r.stderr
    assert "ask an admin of the enclave for a new registration token" in r.stderr
    assert PolicyStore(enclave.records).statements(role="ops") == []
    assert f"token {rid}: the token of bob was revoked" in _refusals(enclave, "bob")[-1]
    assert _refusals(enclave, "bob")[-1].endswith("refused kotta policy grant")

    # a new registration token from an admin makes him whole again
    r = kotta(enclave_dir, "register", kotta(enclave_dir, "token", "issue", "bob").stdout.strip(),
              env=bob)
    assert r.returncode == 0, r.stderr
    r = kotta(enclave_dir, "policy", "grant", "ops", "s3://klab-jobs/", "write", env=bob)
    assert r.returncode == 0, r.stderr
    assert AuditLog(enclave).verify().ok


def test_a_disabled_user_can_no_longer_see_or_cancel_her_jobs(
    enclave, enclave_dir, tmp_path, user_token
):
    alice = _as(tmp_path, "alice", user_token("alice", role="analyst"))
    job_id = os.urandom(16).hex()
    enclave.jobs.create([NewJob(job_id, "alice", "c" * 16, "test", "tests.tasks.square", 60.0,
                                b"", 1)], enqueue=False)
    assert kotta(enclave_dir, "status", job_id, env=alice).returncode == 0
    assert job_id in kotta(enclave_dir, "jobs", env=alice).stdout

    assert kotta(enclave_dir, "user", "disable", "alice").returncode == 0
    for args in (["jobs"], ["status", job_id], ["logs", job_id], ["cancel", job_id],
                 ["dead-letters"]):
        r = kotta(enclave_dir, *args, env=alice)
        assert r.returncode == 2, (args, r.stdout)
        assert r.stderr.startswith("kotta: error: the user alice is disabled"), (args, r.stderr)
        assert job_id not in r.stdout
    assert enclave.jobs.get(job_id).state == "pending"  # not cancelled
    refused = _refusals(enclave, "alice")
    assert [d.rsplit("refused ", 1)[1] for d in refused] == [
        "kotta jobs", "kotta status", "kotta logs", "kotta cancel", "kotta dead-letters"]


@pytest.mark.parametrize(
    "command",
    [["user", "list"], ["token", "list"], ["dataset", "list"], ["policy", "show"],
     ["audit", "verify"], ["audit", "show", "--limit", "2"]],
    ids=" ".join,
)
def test_enclave_after_a_nested_command(command, enclave, tmp_path):
    """``--enclave`` after a nested command (``kotta user list --enclave E``), as every
    other command takes it after its name; and the enclave it names is the one used."""
    r = kotta(None, *command, "--enclave", str(enclave.home))
    assert r.returncode == 0, r.stderr
    assert "unrecognized arguments" not in r.stderr
    assert "made a new one" not in r.stderr  # not $KOTTA_HOME: the enclave named
    other = tmp_path / "other"  # (an error, or a new enclave said so: there, by name)
    r = kotta(None, *command, "--enclave", str(other))
    assert "unrecognized arguments" not in r.stderr
    assert str(other) in r.stderr


@pytest.mark.parametrize("days", ["nan", "inf", "-inf", "1e308", "0", "-1", "3650.5"])
def test_token_issue_refuses_days_that_are_no_lifetime(days, enclave, enclave_dir):
    """A token lasts more than 0 days and at most MAX_REFRESH_DAYS (ten years): NaN,
    infinity or 1e308 made `kotta token list` fail, 0 or less a token born expired."""
    assert kotta(enclave_dir, "user", "add", "carol", "--role", "analyst").returncode == 0
    r = kotta(enclave_dir, "token", "issue", "carol", f"--days={days}")
    assert r.returncode == 2, r.stdout
    assert r.stderr == ("kotta: error: --days must be more than 0 and at most 3650, "
                        f"not {float(days):g}\n")
    assert r.stdout == ""
    assert len(TokenService(enclave).tokens("carol")) == 1  # user add's own, no other


def test_token_issue_for_the_longest_time_allowed(enclave, enclave_dir):
    assert kotta(enclave_dir, "user", "add", "carol", "--role", "analyst").returncode == 0
    r = kotta(enclave_dir, "token", "issue", "carol", "--days", "3650")
    assert r.returncode == 0, r.stderr
    rid = r.stdout.split(".")[1]
    r = kotta(enclave_dir, "token", "list", "--user", "carol")
    assert r.returncode == 0, r.stderr
    assert _token_row(r.stdout, rid)[-1] == "valid"


def _token_row(listing: str, rid: str) -> list[str]:
    [row] = [line.split() for line in listing.splitlines() if line.startswith(rid)]
    return row


def test_token_list_shows_expired_tokens_and_any_stored_expiry(enclave, enclave_dir):
    """An expired token is listed as such, not as valid; an expiry no time can show (1e308,
    NaN, from before --days was checked) is listed, not a traceback."""
    assert kotta(enclave_dir, "user", "add", "carol", "--role", "analyst").returncode == 0
    [first] = TokenService(enclave).tokens("carol")
    rec = enclave.records.get("refresh", first["id"])
    for rid, expires in (("e" * 18, time.time() - 1), ("b" * 18, 1e308), ("n" * 18, math.nan)):
        enclave.records.put("refresh", rid, {**rec, "expires": expires})
    r = kotta(enclave_dir, "token", "list", "--user", "carol")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert _token_row(r.stdout, first["id"])[-1] == "valid"
    assert _token_row(r.stdout, "e" * 18)[-1] == "expired"
    assert "1e+308 (not a time)" in r.stdout
    assert _token_row(r.stdout, "b" * 18)[-1] == "valid"
    assert _token_row(r.stdout, "n" * 18)[-1] == "expired"  # NaN: no time at which it is valid
    assert "nan (not a time)" in r.stdout


def test_dataset_put_of_a_file_it_cannot_read_is_a_clean_error(enclave, enclave_dir, tmp_path):
    assert kotta(enclave_dir, "dataset", "add", "s3://klab-jobs/").returncode == 0
    missing = tmp_path / "no-such-file"
    for path, why in ((missing, "No such file or directory"), (tmp_path, "Is a directory")):
        r = kotta(enclave_dir, "dataset", "put", "s3://klab-jobs/x", str(path))
        assert r.returncode == 2, r.stdout
        assert r.stderr == f"kotta: error: cannot read {path}: {why}\n"
    r = kotta(tmp_path / "enclvae", "dataset", "put", "s3://klab-jobs/x", str(missing))
    assert r.returncode == 2 and not (tmp_path / "enclvae").exists()  # no enclave made


def test_removing_a_dataset_that_is_not_registered_says_so(enclave, enclave_dir):
    """`kotta dataset remove s3://corpuss/` (a typo) printed "removed" and exited 0, while
    the dataset meant stayed registered with its grants."""
    assert kotta(enclave_dir, "dataset", "add", "s3://corpus/").returncode == 0
    r = kotta(enclave_dir, "dataset", "remove", "s3://corpuss/")
    assert r.returncode == 2, r.stdout
    assert "s3://corpuss/ is not a registered dataset" in r.stderr and "removed" not in r.stdout
    assert [d.uri for d in PolicyStore(enclave.records).datasets()] == ["s3://corpus/"]
    r = kotta(enclave_dir, "dataset", "remove", "s3://corpus")  # the bucket: s3://corpus/
    assert r.returncode == 0 and "dataset s3://corpus/ removed" in r.stdout, r.stderr
    assert PolicyStore(enclave.records).datasets() == []


def test_updating_a_dataset_keeps_its_egress_rule_unless_told(enclave, enclave_dir):
    """`kotta dataset add URI --description ...` on a dataset registered with `--egress
    deny` (or a cap) silently made it `egress allow` with no cap: the update to a
    description let its data leave the enclave."""
    r = kotta(enclave_dir, "dataset", "add", "s3://corpus/", "--egress", "deny")
    assert r.returncode == 0, r.stderr
    r = kotta(enclave_dir, "dataset", "add", "s3://capped/", "--egress-cap", "100")
    assert r.returncode == 0, r.stderr
    r = kotta(enclave_dir, "dataset", "add", "s3://corpus/", "--description", "words")
    assert r.returncode == 0 and "(egress deny)" in r.stdout, r.stdout + r.stderr
    r = kotta(enclave_dir, "dataset", "add", "s3://capped/", "--description", "numbers")
    assert r.returncode == 0 and "cap 100 bytes" in r.stdout, r.stdout + r.stderr
    policies = PolicyStore(enclave.records)
    corpus, capped = policies.dataset("s3://corpus/"), policies.dataset("s3://capped/")
    assert (corpus.egress, corpus.egress_cap, corpus.description) == ("deny", None, "words")
    assert (capped.egress, capped.egress_cap, capped.description) == ("allow", 100, "numbers")
    # said explicitly, it changes
    r = kotta(enclave_dir, "dataset", "add", "s3://corpus/", "--egress", "allow")
    assert r.returncode == 0 and "(egress allow)" in r.stdout, r.stdout + r.stderr
    assert PolicyStore(enclave.records).dataset("s3://corpus/").egress == "allow"
    r = kotta(enclave_dir, "dataset", "add", "s3://capped/", "--egress-cap", "none")
    assert r.returncode == 0 and "(egress allow)" in r.stdout, r.stdout + r.stderr
    assert PolicyStore(enclave.records).dataset("s3://capped/").egress_cap is None


@pytest.mark.parametrize("cap", ["abc", "1.5", "1e3", ""])
def test_an_egress_cap_that_is_no_number_says_what_it_takes(enclave_dir, cap):
    """`--egress-cap abc` said `argument --egress-cap: invalid _cap value: 'abc'`, naming a
    function of the code; it says what the option takes: bytes, or none."""
    r = kotta(enclave_dir, "dataset", "add", "s3://capped/", "--egress-cap", cap)
    assert r.returncode == 2, r.stdout
    last = r.stderr.splitlines()[-1]
    assert "_cap" not in last, last
    assert last.endswith(f"argument --egress-cap: {cap!r} is not a number of bytes (0 or "
                         "more) nor 'none'"), last


def test_a_key_segment_too_long_for_the_embedded_enclave_is_named(enclave, enclave_dir, tmp_path):
    """S3 takes a 300-byte segment in a 1024-byte key; the embedded enclave keeps objects as
    files, whose names hold 255 bytes.  `kotta dataset put` of such a key died with an
    OSError traceback (exit 1) naming the enclave's temporary file."""
    data = tmp_path / "f.txt"
    data.write_text("hi\n")
    long = "a" * 256
    r = kotta(enclave_dir, "dataset", "put", f"s3://corpus/x/{long}", str(data))
    assert r.returncode == 2, r.stderr
    assert "kotta: error:" in r.stderr and "Traceback" not in r.stderr
    assert "longer than 255 bytes" in r.stderr and f"{long[:20]}" in r.stderr
    r = kotta(enclave_dir, "dataset", "put", f"s3://corpus/x/{'a' * 255}", str(data))
    assert r.returncode == 0, r.stderr
    assert get_object(enclave, f"s3://corpus/x/{'a' * 255}") == b"hi\n"


def test_token_list_of_another_user_is_refused_not_answered_with_ones_own(
        enclave, enclave_dir, tmp_path, user_token):
    """`kotta token list --user alice` run by bob (no admin) printed bob's own tokens, as
    if they were alice's; an admin's `--user nosuchuser` printed an empty table."""
    user_token("alice")
    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    r = kotta(enclave_dir, "token", "list", "--user", "alice", env=bob)
    assert r.returncode == 2, r.stdout
    assert "only admins may list the tokens of other users" in r.stderr
    assert "bob" not in r.stdout
    assert [rec["detail"] for rec in AuditLog(enclave).show(action="job-denied")] == [
        "list the tokens of other users"]
    r = kotta(enclave_dir, "token", "list", "--user", "bob", env=bob)  # one's own: fine
    assert r.returncode == 0 and "bob" in r.stdout, r.stderr
    r = kotta(enclave_dir, "token", "list", "--user", "nosuchuser")
    assert r.returncode == 2 and "no user 'nosuchuser'" in r.stderr, r.stdout


def test_policy_show_names_a_role_that_cannot_exist(enclave, enclave_dir):
    """`kotta policy show --role Analyst` (roles are lowercase: grant refuses it) printed an
    empty table, as for a role with no statements, instead of saying the name is wrong."""
    assert kotta(enclave_dir, "dataset", "add", "s3://corpus/").returncode == 0
    assert kotta(enclave_dir, "policy", "grant", "analyst", "s3://corpus/", "read").returncode == 0
    r = kotta(enclave_dir, "policy", "show", "--role", "Analyst")
    assert r.returncode == 2 and "invalid role name 'Analyst'" in r.stderr, r.stdout
    r = kotta(enclave_dir, "policy", "show", "--role", "analyst")
    assert r.returncode == 0 and "s3://corpus/" in r.stdout, r.stderr


def test_dataset_put_of_a_large_file_does_not_read_it_into_memory(enclave, enclave_dir, tmp_path):
    """`kotta dataset put` read the whole file into memory first: a dataset of 256 MiB took
    as much more of it, and one larger than the machine's memory could not be put at all."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    assert kotta(enclave_dir, "dataset", "add", "s3://corpus/").returncode == 0
    big, mib = tmp_path / "big.bin", 1 << 20
    with open(big, "wb") as f:
        for i in range(256):
            f.write(bytes([i]) * mib)
    # The peak memory of the command's process alone: VmHWM, which starts again at exec
    # (ru_maxrss does not: a child forked from a big test process counts it too)
    run = ("import re, sys; from kotta_executor.cli import main; rc = main(sys.argv[1:]); "
           "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]; "
           "print(peak, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run(
        [sys.executable, "-c", run, "--enclave", str(enclave_dir), "dataset", "put",
         "s3://corpus/big.bin", str(big)],
        env=subprocess_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, timeout=GUARD,
    )
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stderr.split()[-1])
    assert peak_kib < 128 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    path = enclave_dir / "data" / "corpus" / "big.bin"
    assert path.stat().st_size == 256 * mib
    with open(path, "rb") as f:
        f.seek(255 * mib)
        assert f.read(4) == bytes([255]) * 4


def test_user_list_is_for_admins_and_a_refusal_is_audited(enclave, enclave_dir, tmp_path,
                                                          user_token):
    """`kotta user list` run by a user who is not an admin printed every user of the
    enclave and their roles (which data each may read): on an enclave of sensitive data,
    an information leak.  It is refused, naming the role it takes and what shows one's
    own, and audited; an admin sees every user."""
    user_token("alice", role="secret-project")
    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    r = kotta(enclave_dir, "user", "list", env=bob)
    assert r.returncode == 2, r.stdout
    assert "alice" not in r.stdout and "secret-project" not in r.stdout
    assert r.stderr.startswith("kotta: error: only an admin of "), r.stderr
    assert "may list its users (bob is not one)" in r.stderr and "kotta whoami" in r.stderr
    [denied] = AuditLog(enclave).show(action="job-denied")
    assert (denied["user"], denied["allowed"]) == ("bob", False)
    assert denied["detail"] == "kotta user list (only admins may)"
    r = kotta(enclave_dir, "user", "list")  # the admin
    assert r.returncode == 0, r.stderr
    assert {line.split()[0] for line in r.stdout.splitlines()[1:]} >= {"alice", "bob"}


def test_user_list_is_for_admins_on_aws_too(tmp_path, monkeypatch):
    """As above, on the AWS backend (moto): the command is the same code, but its records
    and audit log are DynamoDB's."""
    import argparse

    from kotta_executor.errors import AccessDenied
    from kotta_executor.security.commands import cmd_user_list
    from tests.aws_moto import aws_on_moto
    from tests.conftest import make_user

    with aws_on_moto(tmp_path) as enclave:
        make_user(enclave, "alice", tmp_path / "tokens", role="secret-project")
        bob = make_user(enclave, "bob", tmp_path / "tokens", role="guest")
        args = argparse.Namespace(enclave=enclave.url, command="user", user_command="list")
        credentials.token_path().rename(tmp_path / "admin.token")
        os.replace(bob, credentials.token_path())  # bob's shell
        with pytest.raises(AccessDenied, match=r"may list its users \(bob is not one\)"):
            cmd_user_list(args)
        [denied] = AuditLog(enclave).show(action="job-denied")
        assert (denied["user"], denied["allowed"]) == ("bob", False)
        assert denied["detail"] == "kotta user list (only admins may)"
        os.replace(tmp_path / "admin.token", credentials.token_path())  # the admin's
        assert cmd_user_list(args) == 0


def test_refusals_to_leave_the_enclave_without_an_admin_are_audited(enclave, enclave_dir):
    """An admin's `kotta token revoke` of the last valid admin token, or `kotta user
    disable` of the last active admin, was refused without a trace in the audit log,
    unlike every other refused command: a try at locking the enclave's admins out (a
    stolen admin token's) is what an auditor looks for.  Each is a refused
    `token-revoke` record naming what was refused."""
    me = config.current_user()
    assert kotta(enclave_dir, "whoami").returncode == 0
    rid = credentials.load(enclave).refresh_id
    assert kotta(enclave_dir, "token", "revoke", rid).returncode == 2
    assert kotta(enclave_dir, "user", "disable", me).returncode == 2
    refused = [(r["user"], r["detail"]) for r in AuditLog(enclave).show(action="token-revoke")
               if r["allowed"] is False]
    assert len(refused) == 2, refused
    assert refused[0][0] == me and f"refresh token {rid} of {me}" in refused[0][1]
    assert "last valid token of an active admin" in refused[0][1]
    assert refused[1][0] == me and f"disable {me}" in refused[1][1]
    assert "last active admin" in refused[1][1]
    assert AuditLog(enclave).verify().ok


def test_two_admins_adding_one_user_name_at_once_do_not_overwrite_each_other(
        enclave, enclave_dir, capsys):
    """`kotta user add bob --role guest` by one admin and `kotta user add bob --role ops
    --admin` by another at the same moment: each checked that bob did not exist, and the
    second write replaced the first identity, so the registration token the first admin
    printed (for a guest) registered an admin.  The second is refused: bob exists."""
    import argparse
    import sqlite3
    import threading

    from kotta_executor.security.commands import cmd_user_add
    from tests.conftest import wait_for

    credentials.load(enclave)  # the admin's token (first use) before the race
    lock = sqlite3.connect(enclave_dir / "kotta.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the other admin's write, begun: ours waits for it
    args = argparse.Namespace(enclave=str(enclave_dir), command="user", user_command="add",
                              name="bob", role="ops", admin=True)
    out: list[object] = []

    def add():
        try:
            out.append(cmd_user_add(args))
        except BaseException as exc:  # noqa: BLE001 - looked at below
            out.append(exc)

    t = threading.Thread(target=add)
    t.start()
    try:
        # past its check (bob unknown), at its write, which waits for the lock
        wait_for(lambda: any(f.f_code.co_name == "add_user" for f in _stack(t.ident)) or out,
                 what="the user add at its write")
        lock.execute("INSERT INTO records (kind, key, value) VALUES ('user', 'bob', ?)",
                     ('{"admin":false,"created":1.0,"created_by":"carol","disabled":false,'
                      '"role":"guest"}',))
    finally:
        lock.execute("COMMIT")
        t.join(GUARD)
        lock.close()
    [result] = out
    assert isinstance(result, ValueError) and "already exists" in str(result), result
    bob = TokenService(enclave).user("bob")
    assert (bob.role, bob.admin, bob.created_by) == ("guest", False, "carol")
    assert TokenService(enclave).tokens("bob") == []
    assert "krt1." not in capsys.readouterr().out


def _stack(ident):

    frame = thread_frame(ident)
    while frame is not None:
        yield frame
        frame = frame.f_back


@pytest.mark.parametrize("uri", ["s3://kotta-held/", "s3://kotta-held/j1", "s3://kotta-held"])
def test_the_enclaves_own_storage_cannot_be_made_a_dataset(enclave, enclave_dir, uri):
    """`kotta dataset add s3://kotta-held/` was taken: a read grant on it handed the results
    egress control held back to any task that named one as its input."""
    r = kotta(enclave_dir, "dataset", "add", uri)
    assert r.returncode != 0 and "the enclave's own storage" in r.stderr, r.stdout + r.stderr
    assert PolicyStore(enclave.records).datasets() == []


def _dynamodb_key_rules(monkeypatch):
    """DynamoDB's own rule on key values, which moto does not apply to every call: a key
    attribute may not be an empty string, nor a range key over 1024 bytes (a
    ValidationException).  On the clients made from now on (a command opens the enclave
    anew), through botocore's list of the handlers each new session starts with."""
    import json

    import botocore.handlers
    from botocore.exceptions import ClientError

    def walk(node):
        if isinstance(node, dict):
            for name in ("Key", "Keys", "Item"):
                keys = node.get(name)
                for key in keys if isinstance(keys, list) else [keys] if keys else []:
                    for attr in ("kind", "key"):
                        value = (key.get(attr) or {}).get("S")
                        if value is not None and (not value or len(value.encode()) > 1024):
                            raise ClientError({"Error": {
                                "Code": "ValidationException",
                                "Message": "One or more parameter values are not valid"}},
                                "DynamoDB")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    def check(params=None, **_):
        body = (params or {}).get("body") or b"{}"
        walk(json.loads(body))

    monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS",
                        [*botocore.handlers.BUILTIN_HANDLERS, ("before-call.dynamodb.*", check)])


@pytest.mark.parametrize("name", ["", "x" * 1100])
def test_an_empty_or_too_long_user_name_is_named_on_aws_not_sent_to_dynamodb(tmp_path, name,
                                                                           monkeypatch):
    """`kotta user add ""` (or disable, enable, token issue, token list --user) on AWS sent
    the name to DynamoDB as a record key, and the admin got botocore's ValidationException
    ("One or more parameter values are not valid"), naming nothing.  The name is checked
    first, by the same rule on both backends."""
    import argparse

    from kotta_executor.errors import ConfigurationError
    from kotta_executor.security import commands
    from tests.aws_moto import aws_on_moto

    with aws_on_moto(tmp_path) as enclave:
        credentials.load(enclave)  # the bootstrapper, the first admin
        _dynamodb_key_rules(monkeypatch)
        base = {"enclave": enclave.url, "command": "user"}
        calls = [
            (commands.cmd_user_add, {"name": name, "role": "guest", "admin": False}, "is not a "
             "valid user name"),
            (commands.cmd_user_disable, {"name": name, "disable": True}, "is not a valid user "
             "name"),
            (commands.cmd_user_disable, {"name": name, "disable": False}, "is not a valid user "
             "name"),
            (commands.cmd_token_issue, {"user": name, "days": 1.0}, "no user"),
            (commands.cmd_token_list, {"user": name}, "no user"),
        ]
        for cmd, kw, says in calls:
            with pytest.raises(ConfigurationError, match=says) as info:
                cmd(argparse.Namespace(**base, **kw))
            assert repr(name) in str(info.value), (cmd.__name__, info.value)


@pytest.mark.parametrize("cmd, kw, says", [
    ("cmd_token_revoke", {"token": ""}, "no refresh token '' in the enclave"),
    ("cmd_token_revoke", {"token": "\u00e9" * 600}, "no refresh token '\u00e9"),
    ("cmd_dataset_remove", {"uri": "s3://klab-data/" + "k" * 1020}, "is not a registered dataset"),
])
def test_a_name_no_record_can_have_is_looked_up_on_aws_as_on_the_embedded_enclave(
        tmp_path, monkeypatch, cmd, kw, says):
    """`kotta token revoke ""` (or an id of 1,200 bytes; or `kotta dataset remove` of a
    URI over 1,024 bytes) asked DynamoDB for a record whose key it refuses, and the user
    got botocore's ValidationException naming nothing; the embedded enclave says there is
    no such token (dataset).  A key no record can have has no record, on both backends."""
    import argparse

    from kotta_executor.errors import ConfigurationError
    from kotta_executor.security import commands
    from tests.aws_moto import aws_on_moto

    with aws_on_moto(tmp_path) as enclave:
        credentials.load(enclave)
        _dynamodb_key_rules(monkeypatch)
        with pytest.raises(ConfigurationError, match=re.escape(says)):
            getattr(commands, cmd)(argparse.Namespace(enclave=enclave.url, command="x", **kw))


@pytest.mark.parametrize("size", [3, 6 << 20])
def test_dataset_put_to_a_bucket_that_does_not_exist_names_it_on_aws(tmp_path, monkeypatch,
                                                                    size):
    """`kotta dataset put FILE s3://no-such-bucket/x` said only botocore's "An error
    occurred (NoSuchBucket) when calling the PutObject operation: The specified bucket does
    not exist", naming no bucket (nor, for a file uploaded in parts, the operation the
    user ran).  It names the bucket."""
    import argparse

    from kotta_executor.security import commands, data
    from tests.aws_moto import aws_on_moto

    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", 5 << 20)
    src = tmp_path / "f.txt"
    src.write_bytes(b"x" * size)
    with aws_on_moto(tmp_path) as enclave:
        credentials.load(enclave)
        with pytest.raises(FileNotFoundError, match="no bucket kotta-no-such-bucket"):
            commands.cmd_dataset_put(argparse.Namespace(
                enclave=enclave.url, command="dataset", uri="s3://kotta-no-such-bucket/in/x",
                file=str(src)))


def test_dataset_put_never_writes_the_enclaves_own_storage_on_aws(tmp_path):
    """`kotta dataset put FILE s3://<the enclave's bucket>/keys/enclave.key` replaced the
    enclave key with the file (every token, the admins' too, stopped verifying: the
    enclave locked out), and one under blobs/ or held/ the enclave's own objects.  It is
    refused, as such a URI is as a dataset, and the key is left whole."""
    import argparse

    from kotta_executor.errors import ConfigurationError
    from kotta_executor.security import commands
    from tests.aws_moto import aws_on_moto

    src = tmp_path / "f.txt"
    src.write_bytes(b"not a key")
    with aws_on_moto(tmp_path) as enclave:
        credentials.load(enclave)
        bucket = enclave.names.bucket
        key = enclave.s3.get_object(Bucket=bucket, Key="keys/enclave.key")["Body"].read()
        for uri in (f"s3://{bucket}/keys/enclave.key", f"s3://{bucket}/held/x",
                    f"s3://{bucket}/{enclave.names.blob_prefix}msg-x"):
            with pytest.raises(ConfigurationError, match="enclave's own storage"):
                commands.cmd_dataset_put(argparse.Namespace(
                    enclave=enclave.url, command="dataset", uri=uri, file=str(src)))
        assert enclave.s3.get_object(Bucket=bucket, Key="keys/enclave.key")["Body"].read() == key
        assert [o["Key"] for o in enclave.s3.list_objects_v2(Bucket=bucket)["Contents"]] == [
            "keys/enclave.key"]


def _audit_fails(enclave_dir, like: str | None) -> None:
    """Make the embedded enclave's audit store fail (a trigger refusing the audit records
    whose value is LIKE ``like``), or work again (None)."""
    import sqlite3

    with sqlite3.connect(Path(enclave_dir) / "kotta.db") as db:
        if like is None:
            db.execute("DROP TRIGGER the_audit_fails")
        else:
            db.execute(
                "CREATE TRIGGER the_audit_fails BEFORE INSERT ON records"
                f" WHEN NEW.kind='audit' AND NEW.value LIKE '{like}'"
                " BEGIN SELECT RAISE(ABORT, 'the audit store is full'); END")


def test_dataset_put_whose_audit_record_fails_writes_nothing(enclave, enclave_dir, tmp_path):
    """`kotta dataset put` wrote the object, then its audit record: when the record could
    not be written, the data was in its dataset unaudited.  It is audited first, as a
    node's stage-out is: a failed record means no write.  (A trigger refusing stage-out
    records is the audit store failing.)"""

    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    assert kotta(enclave_dir, "whoami").returncode == 0  # (the admin's token, audited)
    _audit_fails(enclave_dir, "%stage-out%")
    r = kotta(enclave_dir, "dataset", "put", "s3://klab-jobs/n.txt", str(data))
    assert r.returncode != 0, (r.stdout, r.stderr)
    with pytest.raises(FileNotFoundError):
        get_object(enclave, "s3://klab-jobs/n.txt")
    assert AuditLog(enclave).show(action="stage-out") == []


def test_dataset_put_whose_audit_record_fails_writes_nothing_on_aws(tmp_path, monkeypatch):
    """On AWS too: the audit record of `kotta dataset put` (a DynamoDB put) failing leaves
    no object in S3."""
    import argparse

    import botocore.handlers
    from botocore.exceptions import ClientError

    from kotta_executor.security import commands
    from tests.aws_moto import aws_on_moto

    def audit_fails(params=None, **_):
        if b"stage-out" in ((params or {}).get("body") or b""):
            raise ClientError({"Error": {"Code": "AccessDeniedException",
                                         "Message": "not authorized"}}, "PutItem")

    src = tmp_path / "f.txt"
    src.write_bytes(b"1\n2\n")
    with aws_on_moto(tmp_path) as enclave:
        credentials.load(enclave)
        enclave.s3.create_bucket(Bucket="kotta-h3-data")
        monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS", [
            *botocore.handlers.BUILTIN_HANDLERS, ("before-call.dynamodb.PutItem", audit_fails)])
        with pytest.raises(Exception, match="AccessDeniedException|not authorized"):
            commands.cmd_dataset_put(argparse.Namespace(
                enclave=enclave.url, command="dataset", uri="s3://kotta-h3-data/in/x",
                file=str(src)))
        listed = enclave.s3.list_objects_v2(Bucket="kotta-h3-data").get("Contents", [])
        assert [o["Key"] for o in listed] == []


@pytest.mark.parametrize("command, action", [
    (["policy", "grant", "analyst", "s3://klab-jobs/", "read"], "policy-grant"),
    (["dataset", "add", "s3://klab-jobs/", "--egress", "allow"], "dataset-add"),
])
def test_a_policy_change_whose_audit_record_fails_does_not_take_effect(
        enclave, enclave_dir, command, action):
    """`kotta policy grant` (or `kotta dataset add`, which sets a dataset's egress rule)
    wrote the change, then its audit record: when the record could not be written the
    admin got an error, yet the grant was in force (the role read the data), unaudited.
    The record is written first: a failed record means no change.  (A trigger refusing
    those records is the audit store failing.)"""

    policies = PolicyStore(enclave.records)
    policies.add_dataset("s3://klab-jobs/", by="root", egress="deny")
    assert kotta(enclave_dir, "whoami").returncode == 0  # (the admin's token, audited)
    _audit_fails(enclave_dir, f"%{action}%")
    r = kotta(enclave_dir, *command)
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert not policies.check("analyst", "read", "s3://klab-jobs/x").allowed
    assert policies.dataset("s3://klab-jobs/").egress == "deny"


def test_a_user_enabled_whose_audit_record_fails_stays_disabled(
        enclave, enclave_dir, tmp_path, user_token):
    """`kotta user enable bob` wrote bob's record, then its audit record: when the record
    could not be written the admin got an error, yet bob's tokens worked again, his
    return to the enclave unaudited.  The record is written first: a failed record means
    no change.  (A trigger refusing that record is the audit store failing.)"""

    bob = _as(tmp_path, "bob", user_token("bob", role="guest"))
    assert kotta(enclave_dir, "user", "disable", "bob").returncode == 0
    _audit_fails(enclave_dir, "%enabled bob%")
    r = kotta(enclave_dir, "user", "enable", "bob")
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert TokenService(enclave).user("bob").disabled
    assert kotta(enclave_dir, "whoami", env=bob).returncode == 2


def test_a_token_revoke_whose_audit_record_fails_revokes_nothing(
        enclave, enclave_dir, tmp_path, user_token):
    """`kotta token revoke ID` wrote the revocation, then its audit record: when the
    record could not be written the admin got an error, yet the token was revoked, and
    a second try said "was already revoked": the revocation was never in the log.  The
    record is written first: a failed record means no change."""

    rid = credentials.load(enclave, user_token("bob", role="guest")).refresh_id
    _audit_fails(enclave_dir, f"%token-revoke%{rid}%")
    r = kotta(enclave_dir, "token", "revoke", rid)
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert not enclave.records.get("refresh", rid).get("revoked")


@pytest.mark.parametrize("command, action", [
    (["policy", "revoke", "analyst", "s3://klab-jobs/", "read"], "policy-revoke"),
    (["dataset", "remove", "s3://klab-jobs/"], "dataset-remove"),
])
def test_a_policy_removal_whose_audit_record_fails_removes_nothing(
        enclave, enclave_dir, command, action):
    """`kotta policy revoke` (`kotta dataset remove`) removed the statement (the dataset),
    then wrote its audit record: when the record could not be written the admin got an
    error, yet it was gone, and a second try said there was none: the change never
    reached the log.  The record is written first: a failed record means no change."""

    policies = PolicyStore(enclave.records)
    policies.add_dataset("s3://klab-jobs/", by="root")
    policies.grant("analyst", "s3://klab-jobs/", "read", by="root")
    assert kotta(enclave_dir, "whoami").returncode == 0  # (the admin's token, audited)
    _audit_fails(enclave_dir, f"%{action}%")
    r = kotta(enclave_dir, *command)
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert policies.check("analyst", "read", "s3://klab-jobs/x").allowed
    assert policies.dataset("s3://klab-jobs/") is not None


def test_a_user_add_whose_audit_record_fails_adds_no_one(enclave, enclave_dir):
    """`kotta user add alice` wrote alice, then the audit record: when the record could
    not be written the admin got an error and no token, yet alice was a user, never in
    the log, and a second try said "the user alice already exists".  The record is
    written first: a failed record means no user; the second try adds her."""

    assert kotta(enclave_dir, "whoami").returncode == 0  # (the admin's token, audited)
    _audit_fails(enclave_dir, "%user-add%alice%")
    r = kotta(enclave_dir, "user", "add", "alice", "--role", "analyst")
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert TokenService(enclave).user("alice") is None
    _audit_fails(enclave_dir, None)
    r = kotta(enclave_dir, "user", "add", "alice", "--role", "analyst")
    assert r.returncode == 0 and r.stdout.split()[-1].startswith("krt1."), (r.stdout, r.stderr)
    assert [rec["detail"] for rec in AuditLog(enclave).show(action="user-add")][-1] == (
        "alice role=analyst")


def test_a_token_issue_whose_audit_record_fails_issues_no_token(
        enclave, enclave_dir, user_token):
    """`kotta token issue bob` stored the token, then the audit record: when the record
    could not be written the admin got an error and no token, yet a valid token of bob's
    was in the enclave (`kotta token list`: valid; an admin's counts as one that can
    still act), never in the log.  The record is written first: a failed record means
    no token."""

    user_token("bob", role="guest")
    before = [t["id"] for t in TokenService(enclave).tokens("bob")]
    _audit_fails(enclave_dir, "%token-issue%for bob%")
    r = kotta(enclave_dir, "token", "issue", "bob")
    assert r.returncode != 0 and "the audit store is full" in r.stderr, (r.stdout, r.stderr)
    assert [t["id"] for t in TokenService(enclave).tokens("bob")] == before


@pytest.mark.parametrize("uri", [
    "s3://klab-jobs/dir/",  # a prefix, not an object
    "s3://klab-jobs/" + "x" * 300,  # a segment over a file name's 255 bytes
    "s3://klab-jobs/n.txt/below",  # under the key of an object there
])
def test_dataset_put_refused_for_its_uri_leaves_no_allowed_audit_record(
        enclave, enclave_dir, tmp_path, uri):
    """Audited first (commit 7e6fd8d), `kotta dataset put` of a URI put_object then
    refused (a prefix, a segment too long for the embedded enclave, a key under another
    object's) left a stage-out record saying it was allowed: kotta audit show listed a
    write never made.  Those are known before the record."""
    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    assert kotta(enclave_dir, "dataset", "put", "s3://klab-jobs/n.txt",
                 str(data)).returncode == 0
    r = kotta(enclave_dir, "dataset", "put", uri, str(data))
    assert r.returncode != 0, (r.stdout, r.stderr)
    said = [(x["dataset"], x["allowed"]) for x in AuditLog(enclave).show(action="stage-out")]
    assert said == [("s3://klab-jobs/n.txt", True)], said
