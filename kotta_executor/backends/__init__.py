"""Backends: where an enclave keeps its queues, blobs, job records and node registry.

``open_enclave(spec)`` picks one from a spec string:

* ``None`` or ``""``: ``$KOTTA_ENCLAVE`` if set, else the embedded enclave under
  ``$KOTTA_HOME`` (default ``~/.kotta``);
* ``embedded:///some/dir`` or a plain path: the embedded enclave in that directory;
* ``aws://NAME?region=...&endpoint_url=...``: the AWS enclave NAME (SQS, S3, DynamoDB; see
  :mod:`.aws` and docs/aws.md).  Region and credentials come from boto3's usual chain
  unless the URL names them; the endpoint from the URL or ``$KOTTA_AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os

from ..config import kotta_home
from ..errors import ConfigurationError
from .base import Enclave


def open_enclave(spec: str | os.PathLike | Enclave | None = None) -> Enclave:
    if isinstance(spec, Enclave):
        return spec
    spec = os.fspath(spec) if spec is not None else ""
    spec = spec or os.environ.get("KOTTA_ENCLAVE", "")
    from .embedded import EmbeddedEnclave

    if not spec:
        return EmbeddedEnclave(kotta_home())
    if spec.startswith("embedded://"):
        return EmbeddedEnclave(spec[len("embedded://") :] or kotta_home())
    if spec.startswith("aws://"):
        from .aws import AwsEnclave

        return AwsEnclave.from_url(spec)
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise ConfigurationError(
            f"unknown enclave {spec!r}: the scheme {scheme!r} is not supported "
            "(use embedded:///path, or a directory)"
        )
    return EmbeddedEnclave(spec)


__all__ = ["Enclave", "open_enclave"]
