"""Dataset URIs (``s3://bucket/key``) and output names, checked before anything uses them.

A dataset is a prefix (``s3://bucket/corpus/``, ending in ``/``) or one object.  Every URI
is parsed here first; what cannot be parsed, or would step out of its place (a ``..``
segment in any spelling, a backslash, a control character), raises
:class:`~kotta_executor.errors.InvalidDataUri` naming the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import InvalidDataUri

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: a bucket name us-east-1 took before 2018 (upper case, underscores, up to 255): only the
#: enclave's own bucket may be named so (bootstrap keeps such a bucket), see ``own_bucket``
_LEGACY_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,255}")
MAX_KEY_BYTES = 1024
#: bytes in one file name (Linux, macOS): an input's or output's name in a working directory
MAX_NAME_BYTES = 255


@dataclass(frozen=True, slots=True)
class DataUri:
    bucket: str
    key: str  # "" (the whole bucket) or a key; ending in "/" makes it a prefix

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def basename(self) -> str:
        if self.is_prefix:
            raise InvalidDataUri(f"{self.uri} is a prefix, not an object")
        return self.key.rsplit("/", 1)[-1]

    def contains(self, other: DataUri) -> bool:
        """Whether ``other`` is this object, or lies under this prefix."""
        if self.bucket != other.bucket:
            return False
        return other.key.startswith(self.key) if self.is_prefix else other.key == self.key

    def __str__(self) -> str:
        return self.uri


def parse_uri(text: str, *, own_bucket: str | None = None) -> DataUri:
    """``own_bucket``: the enclave's own bucket, taken as it is named even where S3 would
    not make that name now (a pre-2018 us-east-1 bucket bootstrap kept); any other bucket
    must follow S3's rule."""
    if not isinstance(text, str):
        raise InvalidDataUri(f"a dataset URI must be a string, not {type(text).__name__}")
    if not text.startswith("s3://"):
        raise InvalidDataUri(f"{text!r} is not a dataset URI: it must start with s3://")
    rest = text[5:]
    bucket, _, key = rest.partition("/")
    legacy = bucket == own_bucket and _LEGACY_BUCKET.fullmatch(bucket) is not None
    if not legacy and (not _BUCKET.fullmatch(bucket) or ".." in bucket):
        raise InvalidDataUri(f"{text!r}: {bucket!r} is not a valid bucket name")
    if any(ord(ch) < 32 or 127 <= ord(ch) <= 159 for ch in key):  # C0, DEL and C1
        raise InvalidDataUri(f"{text!r}: control characters are not allowed in a key")
    if "\\" in key:
        raise InvalidDataUri(f"{text!r}: backslashes are not allowed in a key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a file name that is not UTF-8
        raise InvalidDataUri(f"{text!r}: the key is not valid UTF-8, as S3 keys are") from None
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidDataUri(f"{text!r}: the key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidDataUri(f"{text!r}: the key must not start with '/'")
    segments = key.split("/")
    if segments and segments[-1] == "":
        segments = segments[:-1]  # a trailing "/" marks a prefix
    for seg in segments:
        if seg == "":
            raise InvalidDataUri(f"{text!r}: empty path segment ('//')")
        decoded = seg
        for _ in range(3):  # %2e%2e, and %252e%252e decoded twice
            decoded = unquote(decoded)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\0" in decoded:
            raise InvalidDataUri(f"{text!r}: the segment {seg!r} steps out of its place")
    return DataUri(bucket, key)


def parse_own_uri(text: str) -> DataUri:
    """A URI of the enclave's own storage, as the enclave names it (``data.enclave_areas``,
    ``data.held_uri``): its bucket is the enclave's, whatever S3's rule says of its name."""
    bucket = text[5:].partition("/")[0] if isinstance(text, str) else None
    return parse_uri(text, own_bucket=bucket)


def check_output_name(name: str) -> str:
    """A file name inside a task's working directory: one plain path component."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise InvalidDataUri(f"{name!r} is not a valid output name")
    if "/" in name or "\\" in name or any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in name):
        raise InvalidDataUri(f"output name {name!r} must be a plain file name, not a path")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        # (S3 takes such a key; a task's working directory cannot hold it: refused at
        # submit, not after the task has run, at its stage-out)
        raise InvalidDataUri(
            f"the file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes, the "
            "longest a task's working directory can hold"
        )
    return name
