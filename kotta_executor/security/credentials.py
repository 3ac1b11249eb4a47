"""A user's tokens on the client: the token file ``$KOTTA_HOME/token``.

The file maps enclave URLs to ``{"user", "refresh", "access": {"id", "key"}}``.  It must be
private to its owner (mode 0600): like ssh with a loose key, a token file that group or
others can read is refused, with the ``chmod`` that fixes it.

On an embedded enclave, the first use by its OS user makes that user an admin and writes
the token, so the quick start needs no set-up.  (More generally: whoever can read the
enclave key administers the enclave, and gets a token without registering; on AWS that
is whoever bootstraps it.)  Anyone else gets a registration token from
an admin (``kotta user add NAME --role ROLE`` prints one) and runs ``kotta register TOKEN``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from ..config import current_user, kotta_home
from ..errors import AuthenticationError, ConfigurationError
from .tokens import ACCESS_TTL, AccessToken, TokenService

log = logging.getLogger("kotta.credentials")

#: an access token is renewed when it has less than this many seconds left
RENEW_BEFORE = 300.0
#: seconds between a client's looks at its token file for a token registered since
#: (``Credentials._take_up``): a stat of the file, once a second at most
FILE_LOOK = 1.0


def token_path() -> Path:
    return kotta_home() / "token"


def check_private(path: Path) -> None:
    """Refuse a token file that group or others can read or write, or another user owns."""
    _check_stat(path, path.stat())


def _check_stat(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.getuid():
        raise AuthenticationError(
            f"the token file {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
        )
    if st.st_mode & 0o077:
        raise AuthenticationError(
            f"the token file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it holds your credentials, so kotta refuses "
            f"to use it.  Run: chmod 600 {path}"
        )


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, Any]:
    """The token file's entries; checked on the descriptor that is read (no symlink is
    followed, and nothing can swap the file between the check and the read)."""
    try:
        # (O_NONBLOCK: a FIFO put there is refused below, not waited on)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as exc:  # ELOOP: a symlink
        raise AuthenticationError(f"the token file {path} cannot be used: {exc}") from None
    st = os.fstat(fd)
    # before the mode check (which would tell a directory to `chmod 600`), and before
    # fdopen (which refuses a directory with IsADirectoryError)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AuthenticationError(
            f"the token file {path} is not a regular file (a directory?): move it away, "
            "then run `kotta register TOKEN` again"
        )
    try:
        with os.fdopen(fd, "r") as f:
            _check_stat(path, st)
            data = json.loads(f.read())
    except (ValueError, RecursionError) as exc:  # (nested deeper than json goes)
        raise AuthenticationError(f"the token file {path} is damaged: {exc}") from None
    # valid JSON of another shape (`[]`, a string) is as damaged as broken JSON
    if not isinstance(data, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("refresh"), str) for e in data.values()
    ):
        raise AuthenticationError(
            f"the token file {path} is damaged: it does not map enclave URLs to tokens"
        )
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash keeps its mode: never reuse it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class Credentials:
    """One user's tokens for one enclave; ``access()`` renews the access token as needed."""

    def __init__(self, enclave, refresh: str, access: AccessToken | None = None,
                 path: Path | None = None):
        self.enclave = enclave
        self.path = path
        self._refresh = refresh
        self._access = access
        self._lock = threading.Lock()
        #: when the token file is looked at next (monotonic), and how it was then
        self._look_at = time.monotonic() + FILE_LOOK
        self._file_seen: tuple[int, ...] | None = _file_state(path)
        if access is None:
            self._renew()

    @property
    def user(self) -> str:
        return self.access().user

    @property
    def role(self) -> str:
        return self.access().role

    @property
    def admin(self) -> bool:
        return self.access().admin

    @property
    def refresh_id(self) -> str:
        return self._refresh.split(".")[1]

    def access(self, now: float | None = None) -> AccessToken:
        tok = self._access
        if tok is not None and (now or time.time()) < _renew_at(tok) and (
                time.monotonic() < self._look_at):
            return tok
        with self._lock:
            if time.monotonic() >= self._look_at:
                self._look_at = time.monotonic() + FILE_LOOK
                self._take_up()
            tok = self._access
            if tok is None or (now or time.time()) >= _renew_at(tok):
                tok = self._renew()
        return tok

    def _take_up(self, *, renewal_refused: bool = False) -> bool:
        """Take up a registration token stored in the token file since (``kotta
        register``, in a terminal while a notebook's executor runs) once the enclave no
        longer honours this one (revoked, expired): every task signed with it would be
        refused by the nodes, and its renewal too, until the executor was made anew.
        Only a token of the same user (the executor's tasks are that user's), and not
        while this one is good: a client goes on with the token it was made with.  Looked
        for when the file changed (a stat, once every ``FILE_LOOK`` seconds), or when a
        renewal was refused (``renewal_refused``).  True: taken up."""
        if self.path is None:
            return False
        seen = _file_state(self.path)
        if seen == self._file_seen and not renewal_refused:
            return False
        self._file_seen = seen
        try:
            entry = _read(self.path).get(self.enclave.url)
            if not entry or entry["refresh"] == self._refresh or (
                    entry.get("user") not in (None, self._user())):
                return False
            rec = self.enclave.records.get("refresh", self.refresh_id)
            if rec is not None and not rec.get("revoked") and time.time() <= rec["expires"]:
                return False  # this one is good still
            new = _from_entry(self.enclave, entry, self.path)  # (renews if it must)
        except Exception as exc:  # noqa: BLE001 - damaged, another user's: this one as it was
            log.warning("the token in %s was not taken up: %s", self.path, exc)
            return False
        if new.user != self._user() or (new._access is None):
            return False
        log.warning("the registration token of %s in %s was revoked or expired: taking up "
                    "the one registered since", new.user, self.path)
        self._refresh, self._access = new._refresh, new._access
        return True

    def look_again(self) -> None:
        """Look at the token file at the next ``access()`` (a node refused a task of
        these credentials: their token may have been revoked, and one registered since),
        read even if it did not change since it was last read: the one registered then
        may have been left while this one was good."""
        self._file_seen = ()
        self._look_at = 0.0

    def _user(self) -> str | None:
        """The user of these credentials, without renewing anything."""
        return self._access.user if self._access is not None else None

    def check(self, doing: str) -> Credentials:
        """These credentials, if the enclave still honours them; else AuthenticationError
        naming why (the user disabled, the registration token revoked), audited as a
        refused ``token-refresh`` with ``doing`` (what was refused, e.g. ``kotta user
        add``).

        An access token is trusted until it expires, up to an hour: without this check a
        user disabled or revoked meanwhile would keep every right its claims name (admin
        included) for that long.  Every command that acts with the caller's identity
        calls it first.  It is the node's check of every task (``tokens.standing``), read
        afresh from the enclave."""
        from .audit import AuditLog
        from .tokens import standing, what_to_do

        tok = self.access()  # a renewal refuses a revoked token or disabled user itself
        problem = standing(self.enclave.records, tok.claims)
        if problem is None:
            return self
        AuditLog(self.enclave).append("token-refresh", user=tok.user, allowed=False,
                                      detail=f"token {tok.refresh_id}: {problem}; "
                                             f"refused {doing}")
        raise AuthenticationError(f"{problem}: {what_to_do(problem)}")

    def _renew(self) -> AccessToken:
        try:
            tok = _service(self.enclave).refresh(self._refresh)
        except AuthenticationError:
            # revoked or expired: a token registered since is taken up (which renewed it)
            if self._access is None or not self._take_up(renewal_refused=True):
                raise
            tok = self._access
            if time.time() < _renew_at(tok):
                return tok
            tok = _service(self.enclave).refresh(self._refresh)
        self._access = tok
        if self.path is not None:
            # the file only keeps the renewed token for the next client: one damaged (or
            # made loose, or moved away) while this one runs fails none of its submits,
            # which the renewal happened to fall on (those of the next hour did not fail)
            try:
                save(self.enclave, self._refresh, tok, self.path, renewal=True)
            except (AuthenticationError, OSError) as exc:
                log.warning("the renewed access token was not stored in %s: %s",
                            self.path, exc)
        return tok


def _file_state(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a token file rewritten (``kotta register`` replaces it: a new inode)."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def _renew_at(tok: AccessToken) -> float:
    """When ``tok`` is renewed: ``RENEW_BEFORE`` seconds before it expires; but one cut
    short to its registration token's expiry is renewed only once it has expired (when
    the renewal says why): renewed before, it comes back with that same expiry, and every
    submit of those last minutes renewed it again."""
    if tok.expires - tok.issued < ACCESS_TTL - 1:
        return tok.expires
    return tok.expires - RENEW_BEFORE


def _service(enclave) -> TokenService:
    """The token service, auditing refused renewals and registrations."""
    from .audit import AuditLog

    return TokenService(enclave, AuditLog(enclave))


def save(enclave, refresh: str, access: AccessToken | None, path: Path | None = None, *,
         renewal: bool = False) -> None:
    """Store ``refresh`` (and ``access``) as the token for ``enclave`` in the token file.
    ``renewal``: a client's renewed access token, stored only while the file still holds
    ``refresh`` for that enclave: a registration token stored since (``kotta register``,
    run while a notebook's executor holds the old one) is never overwritten by it, and
    one removed since (the file, or its entry: a user leaving a shared host) is not
    written back (AuthenticationError, which the renewal logs)."""
    path = path or token_path()
    with _locked(path):
        data = _read(path) if path.exists() else {}
        held = data.get(enclave.url, {}).get("refresh")
        if renewal and held is None:
            raise AuthenticationError(f"{path} holds no token for {enclave.url} any more "
                                      "(removed): not written back")
        if renewal and held != refresh:
            return
        entry: dict[str, Any] = {"refresh": refresh}
        if access is not None:
            entry["user"] = access.user
            entry["access"] = {"id": access.id, "key": base64.b64encode(access.key).decode()}
        data[enclave.url] = entry
        _write(path, data)


def _from_entry(enclave, entry: dict[str, Any], path: Path) -> Credentials:
    access = None
    acc = entry.get("access")
    if acc:
        try:
            access = AccessToken(acc["id"], base64.b64decode(acc["key"]))
        except (AuthenticationError, KeyError, ValueError, TypeError):  # (TypeError: an
            # "access" of another shape, a list or a number key, which came out of every
            # executor and `kotta` command as a traceback)
            access = None  # renewed from the refresh token below
    if access is not None and not _key_fits(enclave, access):
        # (the file edited, the enclave key replaced since): every task signed with it
        # would be refused by the nodes as forged, for the rest of its hour
        log.warning("the access token cached in %s does not match its key: renewing it", path)
        access = None
    return Credentials(enclave, entry["refresh"], access, path)


def _key_fits(enclave, access: AccessToken) -> bool:
    """Whether ``access``'s key is the one the enclave derives for its id (True when this
    process cannot read the enclave key to tell: the node then decides)."""
    from .keys import derived_key

    try:
        key = derived_key(enclave, "tokens")
    except Exception:  # noqa: BLE001 - unreadable for whatever reason: cannot tell
        return True
    return hmac.compare_digest(hmac.new(key, access.id.encode(), hashlib.sha256).digest(),
                               access.key)


def load(enclave, path: str | os.PathLike | None = None, *, bootstrap: bool = True) -> Credentials:
    """The caller's credentials for ``enclave``, from the token file."""
    explicit = path is not None
    path = Path(path) if explicit else token_path()
    stale = None
    if path.exists():
        entry = _read(path).get(enclave.url)
        if entry and _issued_here(enclave, entry):
            # but the key holder's own token (of its first use), run out after 90 days:
            # told to ask an admin, that is itself, and refused `kotta token issue` too,
            # it was locked out.  It gets a new one, as on first use
            if not (not explicit and bootstrap and entry.get("user") == current_user()
                    and _expired(enclave, entry) and _holds_enclave_key(enclave)):
                return _from_entry(enclave, entry, path)
            stale = entry.get("refresh")
            log.warning("the registration token in %s for %s expired: replacing it", path,
                        enclave.url)
        elif entry:  # an enclave made anew where an older one was, since the token was issued
            stale = entry.get("refresh")
            # a token file named by the caller is someone's identity: never swapped for
            # the OS user's
            if explicit or not (bootstrap and _holds_enclave_key(enclave)):
                raise AuthenticationError(
                    f"the token in {path} for the enclave {enclave.url} was not issued by "
                    "it (was the enclave created anew?): ask an admin of the enclave for a "
                    "registration token, then run `kotta register TOKEN`"
                )
            log.warning("the token in %s for %s was issued by an earlier enclave there: "
                        "replacing it", path, enclave.url)
    # a file the caller named (credentials=) is whose tasks these are: one without a token
    # (a typo, "~" unexpanded, a registration token given for its file) is not the OS
    # user's first use, to be made that admin's token in silence
    if bootstrap and not (explicit and path != token_path()) and _holds_enclave_key(enclave):
        return _bootstrap(enclave, path, stale)
    raise AuthenticationError(
        f"no kotta token for the enclave {enclave.url} in {path}: ask an admin of the enclave "
        "for a registration token, then run `kotta register TOKEN`"
    )


def _holds_enclave_key(enclave) -> bool:
    """Whether this process can read the enclave key: then it administers the enclave
    anyway (it could mint any token), so it may make itself a token.  On an embedded
    enclave that is its OS user; on AWS, whoever IAM lets read ``keys/enclave.key``
    (admins; never user roles)."""
    from .keys import master_key

    try:
        master_key(enclave)
    except ConfigurationError:  # no enclave there at all (not provisioned, or an endpoint
        # that never answers): no token would help; or a key read but damaged (cut
        # short): said, not taken for a key this user may not read ("ask an admin", told
        # to the admin)
        raise
    except Exception:  # noqa: BLE001 - unreadable for whatever reason: not an admin here
        return False
    return True


def _issued_here(enclave, entry: dict[str, Any]) -> bool:
    """Whether the enclave knows the entry's refresh token (True when it cannot tell:
    the node then decides)."""
    try:
        rid = str(entry["refresh"]).split(".")[1]
        return enclave.records.get("refresh", rid) is not None
    except Exception:  # noqa: BLE001 - malformed, or records this caller may not read
        return True


def _expired(enclave, entry: dict[str, Any]) -> bool:
    """Whether the entry's refresh token is past its expiry (False when it cannot tell)."""
    try:
        rec = enclave.records.get("refresh", str(entry["refresh"]).split(".")[1])
        return not time.time() <= rec["expires"]
    except Exception:  # noqa: BLE001 - malformed, or records this caller may not read
        return False


def _bootstrap(enclave, path: Path, stale: str | None = None) -> Credentials:
    """First use by a holder of the enclave key (on an embedded enclave, its OS user): an
    admin identity if the enclave has none yet, and a token.  ``stale``: the refresh
    token of the entry being replaced (another process may have replaced it already)."""
    from .audit import AuditLog

    user = current_user()
    svc = TokenService(enclave, AuditLog(enclave))
    with _locked(path):
        entry = _read(path).get(enclave.url) if path.exists() else None
        if entry and entry.get("refresh") != stale:
            return _from_entry(enclave, entry, path)
        ident = svc.user(user)
        if ident is None:
            if svc.users():
                raise AuthenticationError(
                    f"you ({user}) are not registered with the enclave {enclave.url}: ask "
                    "its admin for a registration token, then run `kotta register TOKEN`"
                )
            svc.add_user(user, "admin", admin=True, by=user, if_absent=True)
        refresh = svc.issue_refresh(user, by=user)
        access = svc.refresh(refresh)
        data = _read(path) if path.exists() else {}
        data[enclave.url] = {
            "refresh": refresh, "user": user,
            "access": {"id": access.id, "key": base64.b64encode(access.key).decode()},
        }
        _write(path, data)
    return Credentials(enclave, refresh, access, path)


def stored_user(enclave, path: str | os.PathLike | None = None) -> str | None:
    """The user whose token the token file holds for ``enclave`` (None: none, or a file
    that cannot be read)."""
    try:
        entry = _read(Path(path) if path is not None else token_path()).get(enclave.url)
    except AuthenticationError:
        return None
    return entry.get("user") if entry else None


def register(enclave, refresh_token: str, path: str | os.PathLike | None = None) -> Credentials:
    """Store a registration (refresh) token, after checking it with the enclave."""
    path = Path(path) if path is not None else token_path()
    access = _service(enclave).refresh(refresh_token.strip())
    save(enclave, refresh_token.strip(), access, path)
    return Credentials(enclave, refresh_token.strip(), access, path)
