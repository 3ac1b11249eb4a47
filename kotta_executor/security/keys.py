"""The enclave's secret key, from which every signing key is derived.

One 32-byte master key per enclave.  Keys for a purpose are derived from it with HMAC
(``derived_key(enclave, "tokens")``), so that a key used to sign audit checkpoints can
never verify a task, and so on.

Where it lives:

* embedded: ``$KOTTA_HOME/enclave.key``, created on first use with mode 0600 (the enclave
  directory is the trust boundary of an embedded enclave: see docs/security.md);
* AWS: the S3 object ``keys/enclave.key`` in the enclave's bucket, outside the ``blobs/``
  prefix that clients write.  Nodes and the token service (an admin, or the enclave's
  login host) read it; user roles are never granted it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from pathlib import Path

from ..errors import ConfigurationError

KEY_BYTES = 32
_cache: dict[tuple, bytes] = {}
_lock = threading.Lock()
os.register_at_fork(after_in_child=_lock._at_fork_reinit)  # (a child forked as it loads)


def master_key(enclave) -> bytes:
    ident = _identity(enclave)
    key = _cache.get(ident)
    if key is None:
        with _lock:
            key = _cache.get(ident)
            if key is None:
                key = _load(enclave)
                _cache[_identity(enclave)] = key  # the file exists now
    return key


def _identity(enclave) -> tuple:
    """What a cached key is valid for: the enclave's URL, and on an embedded enclave the
    key file itself (an enclave deleted and made anew at the same path has a new key)."""
    home = getattr(enclave, "home", None)
    if home is None:
        return (enclave.url,)
    try:
        st = os.stat(Path(home) / "enclave.key")
    except OSError:
        return (enclave.url, None)
    return (enclave.url, st.st_dev, st.st_ino, st.st_ctime_ns)  # inodes are reused


def derived_key(enclave, purpose: str) -> bytes:
    return hmac.new(master_key(enclave), b"kotta-key|" + purpose.encode(), hashlib.sha256).digest()


def _load(enclave) -> bytes:
    home = getattr(enclave, "home", None)
    if home is not None:
        return _local_key(Path(home) / "enclave.key")
    return _s3_key(enclave)


def _local_key(path: Path) -> bytes:
    if not path.exists():
        # Written whole, then linked into place (the first link wins): made with O_EXCL
        # and written after, another process's first use read it empty in between, and
        # failed ("damaged (0 bytes)")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a crash keeps its mode: never reuse it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: made as before
                _create_key(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    data = path.read_bytes()
    if len(data) != KEY_BYTES:  # a writer that has not finished yet, or a damaged file
        raise ConfigurationError(f"the enclave key {path} is damaged ({len(data)} bytes)")
    return data


def _create_key(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(KEY_BYTES))


S3_KEY = "keys/enclave.key"


def _s3_key(enclave) -> bytes:
    from ..backends.aws import _S3_MISSING_BUCKET, _client_error, _code

    s3, bucket = enclave.s3, enclave.names.bucket
    try:
        return s3.get_object(Bucket=bucket, Key=S3_KEY)["Body"].read()
    except _client_error() as exc:
        if _code(exc) in _S3_MISSING_BUCKET:  # no enclave there at all
            raise enclave.not_provisioned(f"the bucket {bucket}") from None
        if _code(exc) not in ("NoSuchKey", "404"):
            raise
    try:  # first use: create it, unless someone else just did
        s3.put_object(Bucket=bucket, Key=S3_KEY, Body=os.urandom(KEY_BYTES), IfNoneMatch="*")
    except _client_error() as exc:
        if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
    return s3.get_object(Bucket=bucket, Key=S3_KEY)["Body"].read()
