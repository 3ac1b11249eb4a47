"""The security commands of ``kotta``: datasets, policies, tokens, users — as an admin and
as a user who is not one.  Real subprocesses on a real enclave directory."""

from __future__ import annotations

import math
import os
import shutil
import time

import pytest

from kotta_executor.security.audit import AuditLog
from kotta_executor.security.data import get_object
from kotta_executor.security.policy import PolicyStore
from kotta_executor.security.tokens import TokenService
from tests.conftest import subprocess_env
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
    r = kotta(enclave_dir, "whoami", env=bob)  # its access token lives on for up to an hour
    assert r.returncode == 0


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
