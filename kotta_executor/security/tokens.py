"""Identities and tokens: who submits a task, and proof of it on every envelope.

* An **identity** is a user name with a role (and an admin flag), a record of kind
  ``user``.
* A **refresh token** (``krt1.ID.SECRET``) comes from a one-time registration: an admin
  issues it (``kotta user add`` / ``kotta token issue``), the user stores it with
  ``kotta register``.  The enclave keeps only its SHA-256 (record kind ``refresh``).  It
  renews access tokens until it expires or is revoked (``kotta token revoke``).
* An **access token** lives one hour.  Its id (``kat1.CLAIMS``) carries the user, role,
  refresh-token id and validity; its key is ``HMAC(tokens key, id)``, so the enclave
  stores nothing of it at all and a node re-derives the key from the id.  The client
  signs each task envelope with that key (``wire.sign``): changing a byte of the
  envelope, its owner, or the token id breaks the signature.

A node checks, per task (:class:`Verifier`): the signature over the whole envelope; that
the envelope's owner is the token's user; that the task was created while the token was
valid (and not in the future); that the task is not older than ``MAX_TASK_AGE``; and that
the refresh token behind it has not been revoked nor its user disabled (read through a
cache of ``REVOCATION_CACHE`` seconds, the most a revocation can take to bite on a
node).  That last check is :func:`standing`; the client makes it too, uncached, before a
``kotta`` command acts with its token and when an executor is made
(``credentials.Credentials.check``): a cached access token's claims are not enough.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..errors import AuthenticationError, ConfigurationError
from .keys import derived_key
from .policy import check_role

ACCESS_TTL = 3600.0
REFRESH_TTL = 90 * 86400.0
#: the longest a registration token may be issued for (`kotta token issue --days`): ten years
MAX_REFRESH_DAYS = 3650
#: seconds of clock difference tolerated between a client and a node
CLOCK_SKEW = 300.0
#: a task older than this (since its creation) is refused even with a valid signature
MAX_TASK_AGE = 7 * 86400.0
#: seconds a node trusts its last reading of a refresh token's revocation state
REVOCATION_CACHE = 2.0
#: reads-and-checks of a revoke or a disable whose write found the records it counted on
#: changed (another admin's at the same time), before it gives up
_CHECKED_WRITE_TRIES = 10

_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")


def check_user(name: str) -> str:
    if not isinstance(name, str) or not _USER.fullmatch(name):
        raise ConfigurationError(
            f"{name!r} is not a valid user name (letters, digits, _ . @ -; at most 64)"
        )
    return name


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    role: str
    admin: bool = False
    disabled: bool = False
    created: float = 0.0
    created_by: str = ""

    @classmethod
    def from_record(cls, user: str, rec: dict[str, Any]) -> Identity:
        return cls(user, rec["role"], bool(rec.get("admin")), bool(rec.get("disabled")),
                   rec.get("created", 0.0), rec.get("created_by", ""))

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role, "admin": self.admin, "disabled": self.disabled,
            "created": self.created, "created_by": self.created_by,
        }


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    role: str
    admin: bool
    refresh_id: str
    issued: float
    expires: float


@dataclass(frozen=True)
class AccessToken:
    """A signed claim (``id``, parsed into ``claims``) and the key derived from it."""

    id: str
    key: bytes
    claims: Claims = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", parse_access_id(self.id))

    user = property(lambda self: self.claims.user)
    role = property(lambda self: self.claims.role)
    admin = property(lambda self: self.claims.admin)
    refresh_id = property(lambda self: self.claims.refresh_id)
    issued = property(lambda self: self.claims.issued)
    expires = property(lambda self: self.claims.expires)

    def sign(self, header: dict[str, Any], sections: dict[str, bytes]) -> bytes:
        """A task envelope signed with this token."""
        return wire.encode({**header, "auth": self.id}, sections, mac_key=self.key)


def parse_access_id(token_id: str) -> Claims:
    """The claims of an access token id; AuthenticationError if it is not one."""
    if not isinstance(token_id, str) or not token_id.startswith("kat1.") or len(token_id) > 2048:
        raise AuthenticationError("not a kotta access token")
    try:
        c = json.loads(_unb64(token_id[5:]))
        claims = Claims(c["u"], c["r"], bool(c["a"]), c["rid"], float(c["iat"]), float(c["exp"]))
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
        # (RecursionError: claims nested too deep for the JSON parser, which fit in the
        # 2,048 characters; raised, it killed the node that read the task's token.
        # OverflowError: a time of 400 digits, not a float: the task failed as corrupt)
        raise AuthenticationError(f"malformed kotta access token ({exc})") from None
    if not all(isinstance(x, str) for x in (claims.user, claims.role, claims.refresh_id)):
        raise AuthenticationError("malformed kotta access token")
    return claims


def _check_flag(name: str, value: object) -> None:
    """A yes-or-no argument: True or False.  Any other value was taken by its truth:
    ``add_user(..., admin="no")`` (a setting read as text) made the user an admin."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")


def _parse_refresh(token: str) -> tuple[str, str]:
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != "krt1" or not parts[1] or not parts[2]:
        raise AuthenticationError("not a kotta refresh token (they look like krt1.ID.SECRET)")
    return parts[1], parts[2]


class TokenService:
    """Issues, renews and revokes tokens; manages identities.  Runs where the enclave key
    is readable: on the embedded enclave, any process of its OS user; on AWS, an admin or
    the enclave's login host (docs/security.md)."""

    def __init__(self, enclave, audit: Callable[..., Any] | None = None):
        self.enclave = enclave
        self.records = enclave.records
        self._key = derived_key(enclave, "tokens")
        self._audit = audit

    def _log(self, action: str, **kw: Any) -> None:
        if self._audit is not None:
            self._audit(action, **kw)

    # -- identities

    def add_user(self, user: str, role: str, *, by: str, admin: bool = False,
                 if_absent: bool = False) -> Identity:
        _check_flag("admin", admin)
        ident = Identity(check_user(user), check_role(role), admin, False, time.time(), by)
        names = getattr(self.enclave, "names", None)  # (AWS: the role is an IAM role's name)
        if names is not None:
            names.check_user_role(role)
        if if_absent and self.records.get("user", user) is not None:
            return self.user(user)  # type: ignore[return-value]
        # audited first: a user whose record could not be written after it was added
        # unaudited, the admin told it failed (and, trying again, that it exists).  (A
        # write that then fails, or one that finds the user added meanwhile, leaves the
        # record of its attempt.)
        self._log("user-add", user=by, allowed=True,
                  detail=f"{user} role={role}{' admin' if admin else ''}")
        written = self.records.put("user", user, ident.as_dict(), if_absent=if_absent)
        return ident if written else self.user(user)  # type: ignore[return-value]

    def user(self, user: str) -> Identity | None:
        # no user has a name check_user refuses (add_user checks it): an empty or
        # over-long one, asked for, reached DynamoDB, and the admin got its
        # ValidationException, naming nothing
        if not isinstance(user, str) or not _USER.fullmatch(user):
            return None
        rec = self.records.get("user", user)
        if rec is None:
            return None
        return Identity.from_record(user, rec)

    def users(self) -> list[Identity]:
        return [
            Identity.from_record(k, v) for k, v in self.records.scan("user")
        ]

    def set_disabled(self, user: str, disabled: bool, *, by: str) -> None:
        _check_flag("disabled", disabled)
        check_user(user)  # (not a name a user may have: say so, before any look-up)
        audited = False
        for _ in range(_CHECKED_WRITE_TRIES):
            rec = self.records.get("user", user)
            if rec is None:
                raise ConfigurationError(f"no user {user!r} in the enclave")
            ident = Identity.from_record(user, rec)
            witness: dict[tuple[str, str], dict[str, Any]] = {}
            # Only an admin enables a user: with its last active admin disabled, no one
            # could (that admin neither), nor add users, datasets or grants, for good.  Nor
            # with every other active admin's tokens revoked or expired: none of them can act
            if disabled and ident.admin and not ident.disabled:
                witness = self._witness(self._admin_tokens(but_user=user))
                if not witness:
                    others = sorted(u.user for u in self.users()
                                    if u.admin and not u.disabled and u.user != user)
                    # audited, as every refusal: a try at locking the admins out
                    self._log("token-revoke", user=by, allowed=False,
                              detail=f"refused to disable {user}: the last active admin"
                                     f"{' with a valid token' if others else ''}")
                    raise ConfigurationError(
                        f"{user} is the enclave's last active admin"
                        f"{' with a valid token' if others else ''}: disabled, no one could "
                        f"enable a user again, nor add one; add another admin first (`kotta "
                        f"user add NAME --role ROLE --admin`)" + (
                            f", or issue one of {', '.join(others)} a token (`kotta token "
                            f"issue NAME`)" if others else ""))
            # audited first (once): a change whose record could not be written after it
            # was in force unaudited (a user enabled, the admin told it failed).  (A write
            # that then fails leaves the record of its attempt.)
            if not audited:
                self._log("token-revoke" if disabled else "user-add", user=by, allowed=True,
                          detail=f"{'disabled' if disabled else 'enabled'} {user}")
                audited = True
            # written only if the admin the check counted on still can act (and this user's
            # record is as read): another admin disabling this one, or revoking their
            # token, at the same time would else leave no admin
            if self.records.put_if_unchanged(
                    "user", user, {**ident.as_dict(), "disabled": disabled},
                    {("user", user): rec, **witness}):
                break
        else:
            raise _contended(f"{'disable' if disabled else 'enable'} {user}")

    # -- refresh tokens

    def issue_refresh(self, user: str, *, by: str, ttl: float = REFRESH_TTL) -> str:
        if not 0 < ttl <= MAX_REFRESH_DAYS * 86400:  # (not NaN either)
            raise ValueError(f"a registration token lasts more than 0 seconds and at most "
                             f"{MAX_REFRESH_DAYS} days, not {ttl!r} seconds")
        if self.user(user) is None:
            raise ConfigurationError(f"no user {user!r} in the enclave: add it first")
        rid, secret = os.urandom(9).hex(), _b64(os.urandom(32))
        now = time.time()
        # audited first, as add_user: a token whose record could not be written after it
        # was valid unaudited (never printed, but listed, and counted as an admin's)
        self._log("token-issue", user=by, allowed=True, detail=f"refresh token {rid} for {user}")
        self.records.put("refresh", rid, {
            "user": user, "sha256": _sha256(secret), "created": now, "expires": now + ttl,
            "revoked": None, "by": by,
        }, if_absent=True)
        return f"krt1.{rid}.{secret}"

    def refresh(self, refresh_token: str, ttl: float = ACCESS_TTL) -> AccessToken:
        """A new access token for the holder of a valid refresh token."""
        rid, secret = _parse_refresh(refresh_token)
        rec = self.records.get("refresh", rid)
        if rec is None or not hmac.compare_digest(rec["sha256"], _sha256(secret)):
            self._log("token-refresh", user="?", allowed=False, detail=f"unknown token {rid}")
            # named, with the enclave: the token of another enclave (`kotta register`
            # without --enclave, to a default one) read as a bad token
            raise AuthenticationError(f"the refresh token {rid} is not known to the enclave "
                                      f"{self.enclave.url} (issued by another enclave?)")
        if rec.get("revoked"):
            self._log("token-refresh", user=rec["user"], allowed=False,
                      detail=f"revoked token {rid}")
            raise AuthenticationError(
                f"the refresh token {rid} of {rec['user']} was revoked at "
                f"{_when(rec['revoked'])}: ask an admin for a new registration token"
            )
        now = time.time()
        if not now <= rec["expires"]:  # (an expiry of NaN, stored by an older version, too)
            self._log("token-refresh", user=rec["user"], allowed=False,
                      detail=f"expired token {rid}")
            raise AuthenticationError(  # (what to do, as for a revoked one: a new one)
                f"the refresh token {rid} of {rec['user']} expired at {_when(rec['expires'])}"
                ": ask an admin of the enclave for a new registration token, then run "
                "`kotta register TOKEN`"
            )
        user_rec = self.records.get("user", rec["user"])
        problem = _user_problem(rec["user"], user_rec)
        if problem:
            self._log("token-refresh", user=rec["user"], allowed=False,
                      detail=f"token {rid}: {problem}")
            # what to do too, as `kotta` and a new executor say it: a long-lived client
            # learns it here, at its hourly renewal
            raise AuthenticationError(f"{problem}: {what_to_do(problem)}")
        ident = Identity.from_record(rec["user"], user_rec)
        return self._access(ident, rid, now, min(now + ttl, rec["expires"]))

    def _access(self, ident: Identity, rid: str, iat: float, exp: float) -> AccessToken:
        claims = {"u": ident.user, "r": ident.role, "a": ident.admin, "rid": rid,
                  "iat": round(iat, 3), "exp": round(exp, 3)}
        token_id = "kat1." + _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        key = hmac.new(self._key, token_id.encode(), hashlib.sha256).digest()
        return AccessToken(token_id, key)

    def revoke(self, token_or_id: str, *, by: str) -> bool:
        """Revoke a refresh token (given whole, or by its id): its access tokens stop
        working within ``REVOCATION_CACHE`` seconds, on every node."""
        rid = _parse_refresh(token_or_id)[0] if token_or_id.startswith("krt1.") else token_or_id
        audited = False
        for _ in range(_CHECKED_WRITE_TRIES):
            rec = self.records.get("refresh", rid)
            if rec is None:
                raise ConfigurationError(f"no refresh token {rid!r} in the enclave")
            if rec.get("revoked"):
                return False
            try:
                witness = self._check_not_last_admin_token(rid, rec)
            except ConfigurationError:  # audited, as every refusal
                self._log("token-revoke", user=by, allowed=False,
                          detail=f"refused to revoke refresh token {rid} of {rec['user']}: "
                                 "the last valid token of an active admin")
                raise
            if not audited:  # first (once), as in set_disabled
                self._log("token-revoke", user=by, allowed=True,
                          detail=f"refresh token {rid} of {rec['user']}")
                audited = True
            # written only if the admin token the check counted on is still valid (see
            # set_disabled): two admins revoking each other's last token at once
            if self.records.put_if_unchanged(
                    "refresh", rid, {**rec, "revoked": time.time(), "revoked_by": by},
                    {("refresh", rid): rec, **witness}):
                break
        else:
            raise _contended(f"revoke the token {rid}")
        return True

    def _admins_with_tokens(self, but: str | None = None) -> set[str]:
        """The active admins who hold a valid (not revoked, not expired) refresh token
        other than ``but``: those who can still administer the enclave."""
        return {user for user, _, _, _ in self._admin_tokens(but).values()}

    def _admin_tokens(self, but: str | None = None, *, but_user: str | None = None
                      ) -> dict[str, tuple[str, dict[str, Any], dict[str, Any], float]]:
        """``{refresh id: (user, user record, refresh record, expiry)}`` of the valid
        refresh tokens of active admins, but the token ``but`` and the user ``but_user``."""
        now = time.time()
        admins = {k: v for k, v in self.records.scan("user")
                  if v.get("admin") and not v.get("disabled") and k != but_user}
        return {rid: (r["user"], admins[r["user"]], r, r["expires"])
                for rid, r in self.records.scan("refresh")
                if rid != but and r["user"] in admins and not r.get("revoked")
                and now <= r["expires"]}

    @staticmethod
    def _witness(tokens: dict[str, tuple[str, dict[str, Any], dict[str, Any], float]]
                 ) -> dict[tuple[str, str], dict[str, Any]]:
        """The records of one admin token of ``tokens`` (the longest valid) and of its
        user, as read: a check that counted on that admin holds while they are unchanged
        (``Records.put_if_unchanged``).  Empty if there is none."""
        if not tokens:
            return {}
        rid, (user, user_rec, rec, _) = max(tokens.items(), key=lambda kv: kv[1][3])
        return {("user", user): user_rec, ("refresh", rid): rec}

    def _check_not_last_admin_token(self, rid: str, rec: dict[str, Any]
                                    ) -> dict[tuple[str, str], dict[str, Any]]:
        """ConfigurationError if revoking the refresh token ``rid`` leaves no active admin
        a valid token: as with the last active admin disabled (set_disabled), no one
        could issue a token, add a user or enable one again, that admin neither.  Else the
        records the check counted on (:meth:`_witness`; none when it counted on none)."""
        tokens = self._admin_tokens()
        if rid not in tokens:
            return {}  # not an admin's valid token: revoked, it takes no admin away
        witness = self._witness({k: v for k, v in tokens.items() if k != rid})
        if witness:
            return witness  # others can administer still
        user = rec["user"]
        raise ConfigurationError(
            f"the token {rid} of {user} is the last valid token of an active admin of the "
            f"enclave: revoked, no one could administer it again (issue a token, add or "
            f"enable a user).  First give {user} a new one (`kotta token issue {user}`, "
            f"then `kotta register TOKEN`), or add another admin (`kotta user add NAME --role "
            f"ROLE --admin`); then revoke this one")

    def tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        out = []
        for rid, rec in self.records.scan("refresh"):
            if user is None or rec["user"] == user:
                out.append({"id": rid, **{k: v for k, v in rec.items() if k != "sha256"}})
        return out


def _contended(doing: str) -> ConfigurationError:
    return ConfigurationError(
        f"could not {doing}: the enclave's users and tokens kept changing under the check "
        f"that it leaves an admin who can act ({_CHECKED_WRITE_TRIES} tries); try again")


def _when(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):  # stored by an older version: not a time
        return f"{ts!r} (not a time)"


def standing(records, claims: Claims) -> str | None:
    """Why the enclave no longer honours the access token of ``claims`` (its registration
    token unknown or revoked, its user disabled or removed), or None while it does.

    The one check of a token's standing: a node's :class:`Verifier` makes it for every
    task (through its cache), and the ``kotta`` commands for the caller's own token
    before they act (``Credentials.check``), so that an access token cached for up to an
    hour carries no rights its user has lost.  Read afresh from the enclave each call."""
    rec = records.get("refresh", claims.refresh_id)
    if rec is None or rec.get("user") != claims.user:
        return f"the token of {claims.user} is not known to this enclave"
    if rec.get("revoked"):
        return f"the token of {claims.user} was revoked at {_when(rec['revoked'])}"
    return _user_problem(claims.user, records.get("user", claims.user))


def what_to_do(problem: str) -> str:
    """What the holder of a token refused for ``problem`` (of :func:`standing`) can do."""
    if problem.endswith(" is disabled"):  # the user, not this token
        return "only an admin of the enclave can enable you again"
    return ("ask an admin of the enclave for a new registration token, then run "
            "`kotta register TOKEN`")


def _user_problem(user: str, rec: dict[str, Any] | None) -> str | None:
    """Why the identity record ``rec`` of ``user`` gives no rights (None: it does)."""
    if rec is None:
        return f"the user {user} is not known to this enclave (removed?)"
    if rec.get("disabled"):
        return f"the user {user} is disabled"
    return None


class Verifier:
    """A node's check of task envelopes (see the module docstring)."""

    def __init__(self, enclave, clock: Callable[[], float] = time.time):
        self.records = enclave.records
        self._key = derived_key(enclave, "tokens")
        self._clock = clock
        self._lock = threading.Lock()
        self._revocations: dict[str, tuple[float, str | None]] = {}
        #: claims and keys of the access tokens seen (a token signs many tasks)
        self._tokens: dict[str, tuple[Claims, bytes]] = {}

    def verify(self, data: bytes, header: dict[str, Any], sent: float | None = None) -> Claims:
        """The token claims of a task; AuthenticationError saying why it is refused.
        ``header`` is ``wire.peek_header(data)`` (which checked the framing); ``sent``
        when the queue took it (``Delivery.sent``): a token that had expired by then is
        refused however the task dates itself."""
        token_id = header.get("auth")
        if not isinstance(token_id, str):
            if data[len(wire.MAGIC)] < 2:  # the envelope's version byte (peek_header read it)
                # a client from before signed tasks: "not signed" alone read as a forgery
                # or a lost token, not as a client to upgrade
                raise AuthenticationError(
                    "the task is not signed (no access token): it is of wire format version 1,"
                    " from a client of an earlier kotta-executor, before signed tasks (or"
                    " queued before an upgrade); upgrade the client's kotta-executor to the"
                    " nodes' version and submit it again")
            raise AuthenticationError("the task is not signed (no access token)")
        known = self._tokens.get(token_id)
        if known is None:
            claims = parse_access_id(token_id)
            key = hmac.new(self._key, token_id.encode(), hashlib.sha256).digest()
            if len(self._tokens) > 4096:
                self._tokens.clear()
            self._tokens[token_id] = known = (claims, key)
        claims, key = known
        if not wire.verify_mac(data, key, parsed=True):
            raise AuthenticationError(
                "the task's signature does not verify: the envelope was forged or altered"
            )
        try:
            return self._check(claims, header, sent)
        except AuthenticationError as exc:  # signed, by whom is known: a node that refuses
            exc.signer = claims.user  # the task must not fail another user's job with it
            raise

    def _check(self, claims: Claims, header: dict[str, Any], sent: float | None) -> Claims:
        """The checks of a task whose signature verified (by ``claims``' token)."""
        if header.get("owner") != claims.user:
            raise AuthenticationError(
                f"the task names the owner {header.get('owner')!r} but was signed by "
                f"{claims.user!r}"
            )
        try:
            created, now = float(header["created"]), self._clock()
        except (KeyError, TypeError, ValueError, OverflowError):
            raise AuthenticationError("the task's creation time is missing or absurd") from None
        if not (claims.issued - CLOCK_SKEW <= created <= claims.expires):
            raise AuthenticationError(
                f"the task was created at {_when(created)}, outside its access token's "
                f"validity ({_when(claims.issued)} to {_when(claims.expires)}): expired token"
            )
        if sent is not None and sent > claims.expires + CLOCK_SKEW:
            raise AuthenticationError(
                f"the task was queued at {_when(sent)}, after its access token expired at "
                f"{_when(claims.expires)}: expired token"
            )
        if created > now + CLOCK_SKEW:
            raise AuthenticationError("the task claims to be created in the future")
        if now - created > MAX_TASK_AGE:
            raise AuthenticationError(
                f"the task is older than {MAX_TASK_AGE / 86400:.0f} days: refused as a replay"
            )
        problem = self._revoked(claims, now)
        if problem:
            raise AuthenticationError(problem)
        return claims

    def standing(self, claims: Claims) -> str | None:
        """Why the token of ``claims`` is no longer honoured (revoked, its user disabled),
        or None; through the same cache as :meth:`verify`.  For a task the node received
        before the revocation and still holds: it must not run either."""
        return self._revoked(claims, self._clock())

    def _revoked(self, claims: Claims, now: float) -> str | None:
        key = f"{claims.user}|{claims.refresh_id}"
        with self._lock:
            hit = self._revocations.get(key)
        if hit is not None and now - hit[0] < REVOCATION_CACHE:
            return hit[1]
        problem = standing(self.records, claims)
        with self._lock:
            self._revocations[key] = (now, problem)
        return problem
