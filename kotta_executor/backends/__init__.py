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
import re
from pathlib import Path

from ..config import check_not_blank, kotta_home
from ..errors import ConfigurationError
from .base import Enclave


def _embedded_home(spec: str) -> str | None:
    """The directory of the embedded enclave ``spec`` names (``""``: the default); None
    for another backend's."""
    if not spec:
        return str(kotta_home())
    if spec.startswith("embedded://"):
        return _directory(spec, spec[len("embedded://") :]) or str(kotta_home())
    if "://" in spec:
        return None
    mistyped = _MISTYPED_URL.match(spec)
    if mistyped:  # a URL with its slashes wrong, not a directory to make an enclave in
        scheme, rest = mistyped.group(1).lower(), spec[len(mistyped.group(1)) + 1 :]
        meant = f"aws://{rest.lstrip('/')}" if scheme == "aws" else f"embedded://{rest}"
        raise ConfigurationError(
            f"enclave {spec!r} looks like a URL missing its '//': did you mean {meant}? "
            f"(a directory of that name: ./{spec})"
        )
    return _directory(spec, spec)


def _directory(spec: str, path: str) -> str:
    """``path``, if the OS can take it as a directory's; else a ConfigurationError naming
    ``spec`` (the OS's own error, at the enclave's first use, named no enclave)."""
    if "\0" in path:
        raise ConfigurationError(f"enclave {spec!r}: a NUL byte cannot be in a path")
    check_not_blank(f"enclave {spec!r}" if path != spec else "enclave", path,  # (the
                    "name a directory, or give none for the default enclave")  # value once)
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"enclave {spec!r}: a lone surrogate cannot be in a path (it is no file name "
            "the file system encoding can write)"
        ) from None
    return path


#: a spec that begins as a URL without its "//" ("aws:/lab", "embedded:/data/enclave",
#: "aws:lab"), which would otherwise be a relative directory, made into a new enclave
_MISTYPED_URL = re.compile(r"(?i)(aws|embedded):")


def _spec(spec: str | os.PathLike | None) -> str:
    spec = os.fspath(spec) if spec is not None else ""
    return spec or env_spec()


def env_spec() -> str:
    """``$KOTTA_ENCLAVE`` ("" if unset or empty; a blank one is a ConfigurationError).  A relative directory in it (``KOTTA_ENCLAVE=lab``,
    or ``embedded://lab``) is taken against the working directory where it is first read,
    as $KOTTA_HOME is (config.kotta_home): it was taken anew at each use, so an executor
    made after an ``os.chdir``, or a task (which inherits it from its node), opened
    another enclave there, a new one.  (Nodes get it absolute.)"""
    value = os.environ.get("KOTTA_ENCLAVE", "")
    path = value[len("embedded://"):] if value.startswith("embedded://") else value
    if value and (not value.strip() or (
            "://" not in path and not _MISTYPED_URL.match(path)
            and (path[:1].isspace() or path[-1:].isspace()))
            # (an aws:// URL too: urlsplit dropped its newline, and "aws://lab\n" opened lab)
            or ("://" in path and value[-1:].isspace())):
        # (named as the variable, not as an enclave the user never passed: one read from a
        # file with its newline is the usual case)
        # (a blank at its end: the whole value said, and meant, its scheme kept; one
        # after embedded://: the path it names)
        whole = path == value or value[-1:].isspace()
        check_not_blank("$KOTTA_ENCLAVE" if whole else f"$KOTTA_ENCLAVE {value!r}",
                        value if whole else path, "set it to a directory, an embedded:// or "
                        "aws:// URL, or unset it (or set it empty) for the default enclave")
    spec = _env_specs.get(value)
    if spec is None:
        spec = absolute(value)
        if spec is not value:
            _env_specs[value] = spec
    return spec


def absolute(spec: str) -> str:
    """``spec`` with its relative directory (``lab``, ``embedded://lab``) made absolute
    against the working directory; ``spec`` itself if it names none, or cannot be made
    so (a working directory since removed, ``~alcie``: said as it is opened)."""
    path = spec[len("embedded://"):] if spec.startswith("embedded://") else spec
    if path.strip() and "://" not in path and not _MISTYPED_URL.match(path) \
            and not path[:1].isspace() and not path[-1:].isspace():  # (refused as
        # it is opened, as given: _directory)
        try:
            # (Path's expanduser: os.path's leaves "~alcie/lab" as it is, which was
            # made absolute, and an enclave made in ./~alcie/lab)
            made = os.path.abspath(Path(path).expanduser())
        except (FileNotFoundError, RuntimeError):
            pass
        else:
            return spec[: len(spec) - len(path)] + made
    return spec


#: each $KOTTA_ENCLAVE seen, its relative directory made absolute (env_spec)
_env_specs: dict[str, str] = {}


def is_new(spec: str | os.PathLike | None = None, *, default: bool = False) -> bool:
    """Whether ``spec`` (or ``$KOTTA_ENCLAVE``) names an embedded enclave that has not been
    made yet (opening it would make it); never for the default one under $KOTTA_HOME,
    unless ``default`` (``kotta demo``: whether the enclave it uses is its own)."""
    from .embedded import EmbeddedEnclave

    spec = _spec(spec)
    home = _embedded_home(spec)
    return (bool(spec) or default) and home is not None and not EmbeddedEnclave.exists(home)


def default_url() -> str | None:
    """The URL of the embedded enclave that ``open_enclave(None)`` (``kotta`` without
    ``--enclave``) opens, without making it; None when ``$KOTTA_ENCLAVE`` names another
    backend's, or a directory that cannot be used."""
    try:
        home = _embedded_home(_spec(None))
        return None if home is None else f"embedded://{Path(home).expanduser().resolve()}"
    except (ConfigurationError, OSError, RuntimeError):  # a $KOTTA_HOME that cannot be
        return None  # used (a symlink loop, "~alcie"): no enclave is there to be the default


def open_enclave(spec: str | os.PathLike | Enclave | None = None, *, must_exist: bool = False) -> Enclave:
    """The enclave ``spec`` names.  An embedded enclave is created where none is yet, unless
    ``must_exist`` and it was named (``spec`` or ``$KOTTA_ENCLAVE``): for commands that
    only read or change what is there, a mistyped path is then a ConfigurationError, not a
    new empty enclave that has no jobs.  The default one under $KOTTA_HOME is always made."""
    if isinstance(spec, Enclave):
        return spec
    _check_type(spec)  # (os.fspath's own error named neither the enclave nor what it takes)
    spec = _spec(spec)
    from .embedded import EmbeddedEnclave

    home = _embedded_home(spec)
    if home is not None:
        if must_exist and is_new(spec):
            raise ConfigurationError(
                f"no enclave at {os.path.abspath(os.path.expanduser(home))} (it has no kotta.db): "
                "is the path right?  An enclave is made by its first executor, `kotta up` or "
                "`kotta demo`"
            )
        return EmbeddedEnclave(home)
    if spec.startswith("aws://"):
        from .aws import AwsEnclave

        return AwsEnclave.from_url(spec)
    raise _unknown_scheme(spec)


def check_spec(spec: object) -> None:
    """Raise what :func:`open_enclave` would for ``spec`` itself (its type, its scheme, an
    AWS URL's form), opening and making nothing: for ``connect()``, which opens its
    enclave at its first call only.  ``None``: ``$KOTTA_ENCLAVE``'s (it was not checked,
    and a wrong one refused at the first call only)."""
    if isinstance(spec, Enclave):
        return
    _check_type(spec)
    spec = _spec(spec)
    home = _embedded_home(spec)  # (raises for a URL missing its '//')
    if home is not None:
        if home.startswith("~"):  # "~alcie/lab" (no such user): EmbeddedEnclave's error,
            # which connect() let through, to be raised at the first call
            try:
                Path(home).expanduser()
            except RuntimeError as exc:
                raise ConfigurationError(
                    f"cannot use {home} as the enclave directory: {exc}") from exc
        return
    if not spec.startswith("aws://"):
        raise _unknown_scheme(spec)
    from .aws import parse_url

    parse_url(spec)


def _check_type(spec: object) -> None:
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"an enclave is a directory, an embedded:// or aws:// URL, or an "
                        f"Enclave, not {type(spec).__name__} {spec!r}")


def _unknown_scheme(spec: str) -> ConfigurationError:
    scheme = spec.split("://", 1)[0]
    return ConfigurationError(
        f"unknown enclave {spec!r}: the scheme {scheme!r} is not supported "
        "(use embedded:///path, or a directory)"
    )


__all__ = ["Enclave", "check_spec", "default_url", "env_spec", "is_new", "open_enclave"]
