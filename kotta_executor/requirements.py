"""Task requirements: pip requirement lines a task needs, installed by the node into a
cached virtual environment (see ``node/envs.py`` and docs/guide.md, "Requirements").

The client normalises them once (:func:`normalize`) and sends the result in the task header
(``requirements``, a string); the node keys its environments by :func:`env_key` of it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .errors import ConfigurationError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _line(line: str) -> str:
    """One requirement, without comments or whitespace, its project name PEP 503-normalised."""
    line = line.split(" #", 1)[0].strip()
    if line.startswith("#"):
        return ""
    line = "".join(line.split())
    m = _NAME.match(line)
    if m is None:
        return line
    return re.sub(r"[-_.]+", "-", m.group(0)).lower() + line[m.end():]


def normalize(requirements: str | Iterable[str] | None) -> str:
    """The requirement set as a string: one requirement per line, sorted, without duplicates,
    blank lines or comments.  ``""`` means no requirements."""
    if requirements is None:
        return ""
    if isinstance(requirements, str):
        lines = requirements.splitlines()
    else:
        try:
            lines = list(requirements)
        except TypeError:
            lines = None
        if lines is None or not all(isinstance(x, str) for x in lines):
            raise ConfigurationError(
                f"requirements must be a string (one requirement per line) or a list of "
                f"strings, not {requirements!r}"
            )
    reqs = sorted({r for r in map(_line, lines) if r})
    for r in reqs:
        if r.startswith("-"):  # options (-r, -e, --index-url ...) belong to the node
            raise ConfigurationError(f"requirements may not carry pip options: {r!r}")
    return "\n".join(reqs)


def env_key(requirements: str) -> str:
    """The sha256 of a normalised requirement set: the name of its environment."""
    return hashlib.sha256(normalize(requirements).encode()).hexdigest()
