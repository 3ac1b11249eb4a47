"""Where protected dataset objects live, and the scoped credentials a task reads and writes
them with.

A task declares its data (``inputs`` and ``outputs``, ``s3://`` URIs).  The node gives it,
and stages through, an object store made for that one task from credentials that cover
exactly what was declared, on behalf of the task's owner, never the node's own rights::

    objects_for(enclave, user=, job_id=, reads=, writes=)
        embedded: issue_credential  -> EmbeddedObjects   (HMAC token "kd1.<claims>.<mac>")
        AWS:      assume_owner_role -> S3Objects         (STS credentials + session policy)
    -> (store, env)     store: the node stages inputs/outputs with it (node/staging.py)
                        env:   what the task's worker gets; open_objects() rebuilds the store

Both stores have one interface: ``head(uri) -> ObjectInfo``, ``download(uri, dest)`` and
``upload(src, uri)`` (each returning the :class:`ObjectInfo` of what it read or wrote).
Embedded objects live at ``enclave.home / "data" / bucket / key``; every call re-verifies
the credential and its coverage.  ``put_object`` / ``get_object`` are admin helpers with
the enclave's own rights (``kotta dataset put``, tests), never for tasks.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from ..errors import (
    AccessDenied,
    AuthenticationError,
    ConfigurationError,
    InvalidDataUri,
    StagingFailed,
)
from .keys import derived_key
from .policy import session_policy
from .uris import DataUri, parse_uri

TOKEN_PREFIX = "kd1"
CREDENTIAL_ENV = "KOTTA_DATA_CREDENTIAL"
ENCLAVE_ENV = "KOTTA_ENCLAVE"
#: AWS's limit on a session policy's plain text
_ROLE_NAME = re.compile(r"^[\w+=,.@-]{1,64}\Z")
_COPY_CHUNK = 1 << 20
#: bytes in one file name (Linux, macOS): the longest key segment an embedded enclave keeps
_NAME_MAX = 255
#: an S3 object at least this large is written in parts (a multipart upload, through boto3's
#: managed transfer): one PutObject takes at most 5 GB, and a task's bigger output failed to
#: stage out.  Read at each upload (tests lower it to see small files go in parts).
MULTIPART_THRESHOLD = 64 << 20


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credential:
    """What one task may do with data: read and write grants, as canonical ``s3://`` URIs
    (objects, or prefixes ending in ``/``), on behalf of ``user``, until ``expires``."""

    user: str
    job_id: str
    read: tuple[str, ...]
    write: tuple[str, ...]
    expires: float

    def may_read(self, uri: str | DataUri) -> bool:
        return _covered(self.read, uri)

    def may_write(self, uri: str | DataUri) -> bool:
        return _covered(self.write, uri)


def _covered(grants: Iterable[str], uri: str | DataUri) -> bool:
    target = uri if isinstance(uri, DataUri) else parse_uri(uri)
    return any(parse_uri(g).contains(target) for g in grants)


def _canonical(uris: Iterable[str]) -> tuple[str, ...]:
    if isinstance(uris, str):  # a lone string would be taken for its characters
        uris = (uris,)
    return tuple(dict.fromkeys(parse_uri(u).uri for u in uris))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(enclave, signed: str) -> bytes:
    return hmac.new(derived_key(enclave, "data"), signed.encode("ascii"), hashlib.sha256).digest()


def issue_credential(
    enclave,
    *,
    user: str,
    job_id: str,
    read: Iterable[str] = (),
    write: Iterable[str] = (),
    ttl: float = 3600.0,
) -> str:
    """A token ``kd1.<claims>.<mac>`` granting ``user``'s task ``job_id`` exactly these
    reads and writes for ``ttl`` seconds, signed with the enclave's ``data`` key."""
    if not (isinstance(user, str) and user and isinstance(job_id, str) and job_id):
        raise ConfigurationError("a data credential needs a user and a job id")
    if not ttl > 0:
        raise ConfigurationError(f"a data credential's ttl must be positive, not {ttl!r}")
    claims = {
        "user": user,
        "job_id": job_id,
        "read": list(_canonical(read)),
        "write": list(_canonical(write)),
        "expires": time.time() + float(ttl),
    }
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{TOKEN_PREFIX}.{payload}"
    return f"{signed}.{_b64(_mac(enclave, signed))}"


def verify_credential(enclave, text: str, *, now: float | None = None) -> Credential:
    """The :class:`Credential` in ``text``, if its signature verifies with this enclave's
    key and it has not expired (at ``now``, default the current time); else
    :class:`AuthenticationError` saying which."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthenticationError(
            f"malformed data credential: expected {TOKEN_PREFIX}.<claims>.<signature>"
        )
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise AuthenticationError(
            "malformed data credential: the signature is not base64"
        ) from None
    if not hmac.compare_digest(mac, _mac(enclave, f"{parts[0]}.{parts[1]}")):
        raise AuthenticationError(
            "the data credential's signature does not verify (tampered with, or issued by "
            "another enclave)"
        )
    try:
        claims = json.loads(_unb64(parts[1]))
        cred = Credential(
            user=claims["user"],
            job_id=claims["job_id"],
            read=tuple(claims["read"]),
            write=tuple(claims["write"]),
            expires=float(claims["expires"]),
        )
        ok = (
            isinstance(cred.user, str)
            and isinstance(cred.job_id, str)
            and all(isinstance(u, str) for u in cred.read + cred.write)
        )
    except (binascii.Error, ValueError, KeyError, TypeError):
        ok = False
    if not ok:  # signed by us, so only a bug could get here; still never trust it
        raise AuthenticationError("malformed data credential: its claims are not valid")
    now = time.time() if now is None else now
    if now >= cred.expires:
        when = datetime.fromtimestamp(cred.expires, UTC).isoformat(timespec="seconds")
        raise AuthenticationError(
            f"the data credential of job {cred.job_id} ({cred.user}) expired at {when}"
        )
    return cred


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str


def _object(uri: str, own_bucket: str | None = None) -> DataUri:
    d = parse_uri(uri, own_bucket=own_bucket)
    if d.is_prefix:
        raise InvalidDataUri(f"{d.uri} is a prefix, not an object")
    return d


def _open_regular(src: Path) -> IO[bytes]:
    """``src`` opened for reading, refusing a symlink as its last component (O_NOFOLLOW)
    and anything but a regular file (a FIFO is opened non-blocking, then refused)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(src):
            raise InvalidDataUri(f"{src} is a symlink; only regular files are uploaded") from exc
        raise
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise InvalidDataUri(f"{src} is not a regular file")
    os.set_blocking(fd, True)
    return f


def temp_prefix(name: str) -> str:
    """The prefix of a temporary name for the file ``name``: its first 80 *bytes* (whole
    characters).  Its first 80 characters were up to 320 bytes, and a name that fits (of
    four-byte characters, up to 255 bytes) made a temporary name too long to create."""
    return "." + name.encode("utf-8", "surrogateescape")[:80].decode("utf-8", "ignore") + "."


def _write_atomic(dest: Path, source: IO[bytes] | bytes) -> int:
    """Write ``source`` to a temporary name next to ``dest``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=temp_prefix(dest.name), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, bytes | bytearray | memoryview):
                out.write(source)
            else:
                shutil.copyfileobj(source, out, _COPY_CHUNK)
            size = out.tell()
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _data_root(enclave) -> Path:
    home = getattr(enclave, "home", None)
    if home is None:
        raise ConfigurationError(f"{enclave.url} is not an embedded enclave")
    return Path(home) / "data"


def _object_path(root: Path, d: DataUri) -> Path:
    """Where object ``d`` lives under ``root``; parse_uri has refused ``..`` already, and
    the resolved path (following any symlink planted in the data directory) must still
    lie inside the data root.  A segment longer than a file name may be (S3 takes it) is
    refused, naming it, rather than failing deep in the file system."""
    for seg in d.key.split("/"):
        if len(seg.encode("utf-8")) > _NAME_MAX:
            raise InvalidDataUri(
                f"{d.uri}: the segment {seg[:40]!r}... is longer than {_NAME_MAX} bytes, the "
                "longest file name the embedded enclave can keep an object under"
            )
    path = root / d.bucket / d.key
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise InvalidDataUri(f"{d.uri} resolves to a path outside the enclave's data directory")
    return path


class EmbeddedObjects:
    """The embedded enclave's object store, as seen through one data credential."""

    def __init__(self, enclave, credential: str):
        self._enclave = enclave
        self._token = credential
        self.root = _data_root(enclave)

    @property
    def credential(self) -> Credential:
        return verify_credential(self._enclave, self._token)

    def _check(self, action: str, uri: str) -> tuple[DataUri, Path]:
        d = _object(uri)
        cred = self.credential  # signature and expiry, on every call
        grants = cred.read if action == "read" else cred.write
        if not _covered(grants, d):
            raise AccessDenied(
                f"{cred.user} may not {action} {d.uri}: job {cred.job_id}'s data credential "
                f"does not cover it"
            )
        return d, _object_path(self.root, d)

    def head(self, uri: str) -> ObjectInfo:
        d, path = self._check("read", uri)
        return ObjectInfo(d.uri, *_stat_object(d, path))

    def download(self, uri: str, dest: Path) -> ObjectInfo:
        d, path = self._check("read", uri)
        dest = Path(dest)
        try:
            src = _open_regular(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, InvalidDataUri):
            raise FileNotFoundError(f"no object {d.uri} in the enclave") from None
        with src:
            st = os.fstat(src.fileno())
            _write_atomic(dest, src)
        return ObjectInfo(d.uri, st.st_size, _etag(st))

    def check_write(self, uri: str, others: Iterable[str] = ()) -> None:
        """InvalidDataUri if object ``uri`` could not be kept (another object in the way,
        as :func:`_room_for` says), so that a task's outputs are checked before any of
        them is written: a later one refused left the earlier ones in their datasets.
        ``others``: the objects written with it (the task's other outputs), in its way
        once written, though none is there yet."""
        d, path = self._check("write", uri)
        for other in map(parse_uri, others):
            if other.bucket == d.bucket and d.key.startswith(other.key + "/"):
                raise InvalidDataUri(
                    f"{d.uri} cannot be written with {other.uri}: s3://{d.bucket}/{other.key} "
                    "is an object too, and the embedded enclave cannot keep objects under the "
                    "key of another"
                )
        segments = d.key.split("/")[:-1]
        for i in range(1, len(segments) + 1):
            above = "/".join(segments[:i])
            if (self.root / d.bucket / above).exists() and not (
                    self.root / d.bucket / above).is_dir():
                raise InvalidDataUri(
                    f"{d.uri} cannot be written: s3://{d.bucket}/{above} is an object, and the "
                    "embedded enclave cannot keep objects under the key of another"
                )
        if path.is_dir() and not path.is_symlink():
            raise InvalidDataUri(
                f"{d.uri} cannot be written: other objects lie under {d.uri}/, and the embedded "
                "enclave cannot keep an object whose key is a prefix of theirs"
            )

    def upload(self, src: Path, uri: str) -> ObjectInfo:
        d, path = self._check("write", uri)
        with _open_regular(Path(src)) as f:
            _room_for(self.root, d, path)
            _object_path(self.root, d)  # again: a symlink may have appeared meanwhile
            _write_atomic(path, f)
        return ObjectInfo(d.uri, *_stat_object(d, path))


def _room_for(root: Path, d: DataUri, path: Path) -> None:
    """Make the directories object ``d`` is kept in.  The embedded enclave keeps an object
    as a file under its key, so, unlike S3, it cannot keep one under another (``a`` and
    ``a/b``): said, naming the object in the way, rather than an OSError naming files
    of the enclave (a task's outputs failed so, after it ran)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        segments = d.key.split("/")[:-1]
        above = next((k for k in ("/".join(segments[:i]) for i in range(1, len(segments) + 1))
                      if not (root / d.bucket / k).is_dir()), None)
        if above is None:  # (made a directory meanwhile): let a second try say what it is
            raise
        raise InvalidDataUri(
            f"{d.uri} cannot be written: s3://{d.bucket}/{above} is an object, and the "
            "embedded enclave cannot keep objects under the key of another"
        ) from None
    if path.is_dir() and not path.is_symlink():
        raise InvalidDataUri(
            f"{d.uri} cannot be written: other objects lie under {d.uri}/, and the embedded "
            "enclave cannot keep an object whose key is a prefix of theirs"
        )


def _stat_object(d: DataUri, path: Path) -> tuple[int, str]:
    try:
        st = path.lstat()  # a symlink is not an object
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"no object {d.uri} in the enclave")
    return st.st_size, _etag(st)


_DENIED = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")
_UNAUTHENTICATED = ("ExpiredToken", "InvalidToken", "InvalidAccessKeyId", "SignatureDoesNotMatch")
_MISSING = ("NoSuchKey", "404", "NotFound", "NoSuchBucket")
#: an object in an archive storage class (GLACIER, DEEP_ARCHIVE), not restored
_ARCHIVED = ("InvalidObjectState",)


class S3Objects:
    """Dataset objects on S3, through a client made only from the given temporary
    credentials (``AccessKeyId``, ``SecretAccessKey``, ``SessionToken``): never the
    process's own, so a task's data moves with its owner's rights."""

    def __init__(self, credentials: dict, *, region: str, endpoint_url: str | None = None):
        import boto3

        from ..backends.aws import client_config

        missing = [
            k for k in ("AccessKeyId", "SecretAccessKey", "SessionToken") if not credentials.get(k)
        ]
        if missing:
            raise AuthenticationError(f"S3 credentials without {', '.join(missing)}")
        #: the answer to each multipart upload's CompleteMultipartUpload, by (bucket, key):
        #: the managed transfer returns nothing, and upload() returns what it wrote
        self._completed: dict[tuple[str, str], dict] = {}
        session = boto3.session.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
            region_name=region,
        )
        self.s3 = session.client(
            "s3", endpoint_url=endpoint_url, config=client_config(path_style=bool(endpoint_url))
        )
        self.s3.meta.events.register("after-call.s3.CompleteMultipartUpload", self._complete)

    def _complete(self, parsed=None, **_) -> None:
        if parsed and parsed.get("Bucket") and parsed.get("Key"):
            self._completed[(parsed["Bucket"], parsed["Key"])] = parsed

    @contextlib.contextmanager
    def _errors(self, action: str, uri: str):
        """Botocore's errors as ours: 403 -> AccessDenied, 404 -> FileNotFoundError, a
        refused token -> AuthenticationError; anything else as it came."""
        from ..backends.aws import _client_error

        try:
            yield
        except _client_error() as exc:
            mapped = self._map(exc, action, uri)
            if mapped is None:
                raise
            raise mapped from exc

    @staticmethod
    def _map(exc: Exception, action: str, uri: str) -> Exception | None:
        from ..backends.aws import _code

        code = _code(exc)
        if code == "NoSuchBucket":  # (an upload too: "no object" said it was read)
            return FileNotFoundError(f"no bucket {parse_uri(uri).bucket} in the enclave, for "
                                     f"{uri}")
        if code in _MISSING:
            return FileNotFoundError(f"no object {uri} in the enclave")
        if code in _DENIED:
            return AccessDenied(f"the task's credentials may not {action} {uri} ({code})")
        if code in _UNAUTHENTICATED:
            return AuthenticationError(f"the task's S3 credentials were refused ({code}) for {uri}")
        if code in _ARCHIVED:  # no passing fault: tried again, it failed for a minute
            kind = (getattr(exc, "response", None) or {}).get("Error", {}).get("StorageClass")
            return StagingFailed(
                f"{uri} is archived{f' ({kind})' if kind else ''}: it must be restored "
                f"before it can be read ({code})"
            )
        return None

    @staticmethod
    def _info(uri: str, resp: dict, size: int) -> ObjectInfo:
        etag = resp.get("VersionId") or str(resp.get("ETag", "")).strip('"')
        return ObjectInfo(uri, size, etag)

    def head(self, uri: str) -> ObjectInfo:
        d = _object(uri)
        with self._errors("read", d.uri):
            resp = self.s3.head_object(Bucket=d.bucket, Key=d.key)
        return self._info(d.uri, resp, int(resp["ContentLength"]))

    def download(self, uri: str, dest: Path) -> ObjectInfo:
        d = _object(uri)
        with self._errors("read", d.uri):
            resp = self.s3.get_object(Bucket=d.bucket, Key=d.key)
            with contextlib.closing(resp["Body"]) as body:
                size = _write_atomic(Path(dest), body)
        return self._info(d.uri, resp, size)

    def upload(self, src: Path, uri: str) -> ObjectInfo:
        d = _object(uri)
        with _open_regular(Path(src)) as f:
            size = os.fstat(f.fileno()).st_size
            with self._errors("write", d.uri):
                resp = _write_s3(self.s3, d, f, size)
            if resp is None:  # written in parts: CompleteMultipartUpload's answer
                resp = self._completed.pop((d.bucket, d.key), {})
        return self._info(d.uri, resp, size)


def _write_s3(s3, d: DataUri, body: IO[bytes] | bytes, size: int | None) -> dict | None:
    """Write ``body`` (``size`` bytes; None: not known) as the object ``d`` with the client
    ``s3``: one PutObject, whose answer is returned, below MULTIPART_THRESHOLD; in parts
    above it (boto3's managed transfer, which aborts the upload if a part fails), returning
    None.  Its errors are the client's own (ClientError), as PutObject's."""
    if size is not None and size < MULTIPART_THRESHOLD:
        return s3.put_object(Bucket=d.bucket, Key=d.key, Body=body)
    from boto3.s3.transfer import TransferConfig

    if isinstance(body, bytes | bytearray | memoryview):
        body = io.BytesIO(body)
    # Parts of 16 MiB (the transfer makes them at least S3's 5 MiB, and larger for an
    # object of more than S3's 10,000 parts), four at a time: read from a file object,
    # each part is held in memory, and the defaults (ten of the threshold's size) held
    # 640 MiB in the node's memory beside its tasks.
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                            multipart_chunksize=min(MULTIPART_THRESHOLD, 16 << 20),
                            max_concurrency=4)
    config.max_in_memory_upload_chunks = 4  # (s3transfer's, which boto3's does not take)
    s3.upload_fileobj(body, d.bucket, d.key, Config=config)
    return None


# --------------------------------------------------------------------------- AWS roles


def session_policy_json(reads: Iterable[str], writes: Iterable[str],
                        partition: str = "aws") -> str:
    """The packed session policy (``policy.session_policy``) of a task's declared data."""
    try:
        doc = session_policy(list(_canonical(reads)), list(_canonical(writes)), partition)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return json.dumps(doc, separators=(",", ":"))


def check_writes(enclave, writes: Iterable[str]) -> None:
    """ConfigurationError if the credentials to write ``writes`` could not be made (AWS: a
    session policy over STS's limit).  A task's outputs get theirs at stage-out, once it
    has run: checked at its stage-in, it fails before it runs, not after."""
    if not _is_embedded(enclave):
        session_policy_json((), writes, enclave.partition)


#: seconds: the longest session AWS grants a role assumed by a role (role chaining)
MAX_CHAINED_SESSION = 3600


def assume_owner_role(
    enclave,
    *,
    user: str,
    role: str,
    job_id: str,
    reads: Iterable[str] = (),
    writes: Iterable[str] = (),
    ttl: float = 3600,
) -> dict:
    """Temporary credentials of the owner's role ``<user_role_prefix><role>``, narrowed by
    a session policy to the task's declared data; ``SourceIdentity`` records the user in
    CloudTrail.  Returns STS's ``Credentials`` dict."""
    if not isinstance(role, str) or not _ROLE_NAME.match(enclave.names.user_role_prefix + role):
        enclave.names.check_user_role(role)  # (too long: a user added before it was checked)
        raise ConfigurationError(f"invalid role name {role!r}")
    policy = session_policy_json(reads, writes, enclave.partition)
    sts = enclave.session.client("sts", endpoint_url=enclave.endpoint_url)
    account = sts.get_caller_identity()["Account"]
    resp = sts.assume_role(
        RoleArn=(f"arn:{enclave.partition}:iam::{account}:role/"
                 f"{enclave.names.user_role_prefix}{role}"),
        # the whole id (up to 64 characters are allowed): its first digits are its submit
        # time, the same for every job of a burst
        RoleSessionName=f"kotta-{job_id}",
        # STS takes two characters at least, and a user name may be one: every task of
        # user "a" that declared data failed here.  No user name holds "=": "a=" is a's
        SourceIdentity=user if len(user) >= 2 else f"{user}=",
        # a node assuming a user role is role chaining, which AWS caps at one hour
        DurationSeconds=min(MAX_CHAINED_SESSION, max(900, int(ttl))),
        Policy=policy,
    )
    return resp["Credentials"]


# --------------------------------------------------------------------------- admin helpers


def _is_embedded(enclave) -> bool:
    return getattr(enclave, "home", None) is not None


def _own_bucket(enclave) -> str | None:
    """The enclave's own bucket on AWS (``held_uri``'s), whose name may be one S3 no longer
    makes (a pre-2018 us-east-1 bucket that bootstrap kept): accepted as it is."""
    return None if _is_embedded(enclave) else enclave.names.bucket


#: the bucket that keeps held results on an embedded enclave (on AWS: the enclave's own)
HELD_BUCKET = "kotta-held"


def held_uri(enclave, job_id: str) -> str:
    """Where a result that may not leave the enclave is kept: an object no user role is
    granted and the clients' blob namespace does not include."""
    if _is_embedded(enclave):
        return f"s3://{HELD_BUCKET}/{job_id}"
    return f"s3://{enclave.names.bucket}/held/{job_id}"


def enclave_areas(enclave) -> tuple[str, ...]:
    """The prefixes of the enclave's own storage that the ``s3://`` namespace of datasets
    reaches: held results (both), and on AWS the enclave key and the blobs (every task's
    arguments and results).  No dataset may contain them or lie in them
    (``PolicyStore(reserved=...)``): a grant there handed them to tasks as inputs."""
    if _is_embedded(enclave):
        return (f"s3://{HELD_BUCKET}/",)
    bucket = enclave.names.bucket
    return (f"s3://{bucket}/keys/", f"s3://{bucket}/{enclave.names.blob_prefix}",
            f"s3://{bucket}/held/")


def put_object(enclave, uri: str, data: bytes | IO[bytes],
               before: Callable[[], object] | None = None) -> None:
    """Write a dataset object with the enclave's own rights (``kotta dataset put``, tests).
    ``data``: bytes, or a binary file, read from where it is to its end in chunks (a
    dataset file may be larger than memory).  ``before``: called once the URI is known to
    name an object that can be written (not a prefix, nor, on the embedded enclave, a key
    it cannot keep), just before the write: its audit record, which must not say
    "allowed" of a write refused for a reason known before it."""
    d = _object(uri, _own_bucket(enclave))
    body = data if hasattr(data, "read") else bytes(data)
    if _is_embedded(enclave):
        root = _data_root(enclave)
        path = _object_path(root, d)
        _room_for(root, d, path)
        _object_path(root, d)
        if before is not None:
            before()
        _write_atomic(path, body)
    else:
        from ..backends.aws import _client_error, _code

        if before is not None:
            before()
        try:
            _write_s3(enclave.s3, d, body, _size(body))
        except _client_error() as exc:  # (botocore's names no bucket)
            if _code(exc) == "NoSuchBucket":
                raise FileNotFoundError(f"no bucket {d.bucket}, for {d.uri}") from None
            raise


def _size(body: IO[bytes] | bytes) -> int | None:
    """The bytes left to read in ``body``, or None when it cannot say (a pipe)."""
    if isinstance(body, bytes):
        return len(body)
    try:
        here = body.tell()
        end = body.seek(0, os.SEEK_END)
        body.seek(here)
    except (OSError, AttributeError, ValueError):
        return None
    return end - here


def get_object(enclave, uri: str) -> bytes:
    """Read a dataset object with the enclave's own rights."""
    d = _object(uri, _own_bucket(enclave))
    if _is_embedded(enclave):
        path = _object_path(_data_root(enclave), d)
        try:
            with _open_regular(path) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, InvalidDataUri):
            raise FileNotFoundError(f"no object {d.uri} in the enclave") from None
    from ..backends.aws import _client_error, _code

    try:
        return enclave.s3.get_object(Bucket=d.bucket, Key=d.key)["Body"].read()
    except _client_error() as exc:
        if _code(exc) in _MISSING:
            raise FileNotFoundError(f"no object {d.uri} in the enclave") from None
        raise


# --------------------------------------------------------------------------- tasks


def objects_for(
    enclave,
    *,
    user: str,
    role: str | None = None,
    job_id: str,
    reads: Iterable[str] = (),
    writes: Iterable[str] = (),
    ttl: float = 3600.0,
) -> tuple[EmbeddedObjects | S3Objects, dict[str, str]]:
    """The store the node stages a task's data with, and the environment its worker gets:
    both scoped to the owner ``user`` and the task's declared ``reads`` and ``writes``.
    ``role`` (AWS: the suffix of the owner's IAM role) defaults to ``user``."""
    reads, writes = _canonical(reads), _canonical(writes)
    if _is_embedded(enclave):
        cred = issue_credential(
            enclave, user=user, job_id=job_id, read=reads, write=writes, ttl=ttl
        )
        return EmbeddedObjects(enclave, cred), {CREDENTIAL_ENV: cred, ENCLAVE_ENV: enclave.url}
    creds = assume_owner_role(
        enclave, user=user, role=role or user, job_id=job_id, reads=reads, writes=writes, ttl=ttl
    )
    store = S3Objects(creds, region=enclave.region, endpoint_url=enclave.endpoint_url)
    env = {
        "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
        "AWS_SESSION_TOKEN": creds["SessionToken"],
        "AWS_DEFAULT_REGION": enclave.region,
    }
    if enclave.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = enclave.endpoint_url
    return store, env


@dataclass(frozen=True)
class _EnclaveHome:
    """Just what verifying a credential needs of an embedded enclave (no database)."""

    home: Path
    url: str


def open_objects(uri: str | None = None) -> EmbeddedObjects | S3Objects:
    """Inside a task: the store its data credentials give, from the environment the node
    set (``KOTTA_DATA_CREDENTIAL`` and ``KOTTA_ENCLAVE`` on an embedded enclave, the
    ``AWS_*`` variables on AWS).  ``uri`` overrides the enclave URL (``KOTTA_ENCLAVE``)."""
    env = os.environ
    token = env.get(CREDENTIAL_ENV)
    if token:
        url = uri or env.get(ENCLAVE_ENV, "")
        if url.startswith("embedded://"):
            home = Path(url[len("embedded://") :])
        elif url and "://" not in url:
            home = Path(url)
        else:
            raise ConfigurationError(
                f"{CREDENTIAL_ENV} is set but {ENCLAVE_ENV} ({url!r}) is not an embedded enclave"
            )
        home = home.expanduser().resolve()
        return EmbeddedObjects(_EnclaveHome(home, f"embedded://{home}"), token)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SESSION_TOKEN"):
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if not region:
            raise ConfigurationError("AWS data credentials are set but no AWS_DEFAULT_REGION")
        creds = {
            "AccessKeyId": env["AWS_ACCESS_KEY_ID"],
            "SecretAccessKey": env.get("AWS_SECRET_ACCESS_KEY", ""),
            "SessionToken": env["AWS_SESSION_TOKEN"],
        }
        return S3Objects(creds, region=region, endpoint_url=env.get("AWS_ENDPOINT_URL_S3"))
    raise AuthenticationError(
        "no data credentials in the environment: open_objects() works inside a task that "
        "declared inputs or outputs"
    )
