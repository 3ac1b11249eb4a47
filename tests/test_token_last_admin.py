"""The last-admin checks (docs/security.md §1) against two admins acting at once, on both
backends: each revoking or disabling the other must not leave the enclave without an
admin who can act.  Real records (SQLite; DynamoDB on moto), two threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kotta_executor.backends.base import Enclave
from kotta_executor.errors import ConfigurationError
from kotta_executor.security.tokens import TokenService
from tests.conftest import BACKENDS, GUARD, open_backend


@pytest.fixture(params=BACKENDS)
def enclave(request, tmp_path) -> Iterator[Enclave]:
    with open_backend(request.param, tmp_path) as e:
        yield e


class _PausingRecords:
    """The enclave's records, but the first scan of the refresh tokens (the last of the
    last-admin check's reads) waits, once it has read, until ``go`` is set: the moment
    between the check and the write, held open for the other admin to act in."""

    def __init__(self, records):
        self._records = records
        self.checked, self.go = threading.Event(), threading.Event()

    def scan(self, kind, **kw):
        out = self._records.scan(kind, **kw)
        if kind == "refresh" and not self.checked.is_set():
            self.checked.set()
            assert self.go.wait(GUARD)
        return out

    def __getattr__(self, name):
        return getattr(self._records, name)


class _Pausing:
    """An enclave whose records are :class:`_PausingRecords`."""

    def __init__(self, enclave):
        self._enclave = enclave
        self.records = _PausingRecords(enclave.records)

    def __getattr__(self, name):
        return getattr(self._enclave, name)


def _two_admins(enclave) -> dict[str, str]:
    svc = TokenService(enclave)
    rids = {}
    for name in ("root", "bob"):
        svc.add_user(name, "admin", admin=True, by="test")
        rids[name] = svc.issue_refresh(name, by="test").split(".")[1]
    return rids


def _act(svc: TokenService, what: str, target: str, rids: dict[str, str], by: str) -> None:
    if what == "revoke":
        svc.revoke(rids[target], by=by)
    else:
        svc.set_disabled(target, True, by=by)


@pytest.mark.parametrize("first, second", [
    ("revoke", "revoke"), ("disable", "disable"), ("revoke", "disable"), ("disable", "revoke"),
])
def test_two_admins_acting_on_each_other_at_once_leave_one_admin(enclave, first, second):
    """root revokes bob's token (or disables bob) while bob does the same to root: each
    checked that the other could still administer the enclave, and both writes were done,
    leaving no active admin with a valid token, for good.  The check and the write are one
    step: the admin whose write comes second is refused, as if they had acted alone after
    the first."""
    rids = _two_admins(enclave)
    paused = _Pausing(enclave)
    errors: list[BaseException] = []

    def root_acts():
        try:
            _act(TokenService(paused), first, "bob", rids, by="root")
        except BaseException as exc:  # noqa: BLE001 - looked at below
            errors.append(exc)

    t = threading.Thread(target=root_acts)
    t.start()
    try:
        assert paused.records.checked.wait(GUARD)  # root checked bob can act, and waits
        _act(TokenService(enclave), second, "root", rids, by="bob")  # bob acts on root
    finally:
        paused.records.go.set()
        t.join(GUARD)
    assert not t.is_alive()
    [err] = errors  # root's write, second, is refused
    assert isinstance(err, ConfigurationError), err
    assert "last" in str(err) and "admin" in str(err)
    svc = TokenService(enclave)
    assert svc._admins_with_tokens() == {"bob"}
    bob = svc.user("bob")
    assert bob is not None and not bob.disabled
    assert not enclave.records.get("refresh", rids["bob"]).get("revoked")


def test_a_revoke_racing_an_unrelated_change_is_done(enclave):
    """A change the check did not depend on (a user's token issued meanwhile) does not
    refuse a revoke: only what could leave the enclave without an admin does."""
    rids = _two_admins(enclave)
    svc = TokenService(enclave)
    svc.add_user("carol", "analyst", by="root")
    paused = _Pausing(enclave)
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(
        TokenService(paused).revoke(rids["bob"], by="root")))
    t.start()
    try:
        assert paused.records.checked.wait(GUARD)
        svc.issue_refresh("carol", by="root")
    finally:
        paused.records.go.set()
        t.join(GUARD)
    assert done == [True]
    assert enclave.records.get("refresh", rids["bob"])["revoked"]


def test_a_token_with_an_expiry_of_nan_from_an_older_version_is_revoked(enclave):
    """A record an older version stored with an expiry of NaN (docs: `kotta token list`
    shows it) compares unequal to itself: the check that nothing changed since it was read
    must not take that for a change, and refuse its revoke for ever."""
    rids = _two_admins(enclave)
    svc = TokenService(enclave)
    svc.add_user("carol", "analyst", by="root")
    rid = svc.issue_refresh("carol", by="root").split(".")[1]
    rec = enclave.records.get("refresh", rid)
    enclave.records.put("refresh", rid, {**rec, "expires": float("nan")})
    assert svc.revoke(rid, by="root") is True
    assert enclave.records.get("refresh", rid)["revoked"]
    assert svc.revoke(rids["bob"], by="root") is True  # and an admin's, checked
