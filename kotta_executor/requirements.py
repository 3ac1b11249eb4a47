"""Task requirements: pip requirement lines a task needs, installed by the node into a
cached virtual environment (see ``node/envs.py`` and docs/guide.md, "Requirements").

The client normalises them once (:func:`normalize`) and sends the result in the task header
(``requirements``, a string); the node keys its environments by :func:`env_key` of it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable

from .errors import ConfigurationError
from .wire import MAX_HEADER

#: bytes a normalised set may take: it travels in the task header, which a node reads only
#: up to MAX_HEADER bytes of (the rest leaves room for the header's other fields)
MAX_BYTES = MAX_HEADER // 2

#: a comment, as pip reads requirement files: ``#`` at the start or after any whitespace
#: (a tab too), to the end of the line; a ``#`` inside a word (a URL's fragment) is not one
_COMMENT = re.compile(r"(^|\s)#.*$")
#: an environment variable, as pip expands it in a requirements file (``${NAME}``)
_VARIABLE = re.compile(r"\$\{[A-Z0-9_]+\}")
#: a project's or an extra's name, as PEP 508 writes it
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def _line(line: str) -> str:
    """One requirement in its canonical spelling (``packaging``'s: the project name and
    extras PEP 503-normalised, extras and version specifiers sorted, markers spaced as PEP 508
    writes them), without comments; ``""`` for a blank or comment line.  Refused unless
    the node can take it as it is sent: read again, and by pip."""
    canonical = _canonical(line)
    if not canonical:
        return ""
    # What the node does with it: pip reads it from a requirements file, where a line ends
    # at its first blank followed by "-" (what follows is pip's options: "Could not split
    # options"), which only a marker's string can hold here.  (Checked here, which the node
    # runs too, so that client and node agree: refused where it is given, not on the node.)
    if " -" in canonical:
        raise ConfigurationError(
            f"{line!r} cannot be installed: pip would read what follows its ' -' as pip "
            "options (in a marker's string); write the marker without a blank before '-'"
        )
    # And the node reads it again (its header is not trusted).  packaging reads a marker's
    # strings as Python's, escapes and all, and writes them back as they then are: "x\\"
    # as "x\" (a SyntaxError), "a\t#b" with a tab before "#" (pip's comment), "a\nb" as
    # two lines; and 'a"b' as "a"b": sent so, it was no requirement, or another, on the node
    try:
        again = _canonical(canonical) if canonical.splitlines() == [canonical] else None
    except ConfigurationError:
        again = None
    if again != canonical:
        raise ConfigurationError(
            f"{line!r} cannot be sent as it is: written canonically, {canonical!r}, it does "
            "not read back the same; write a marker's strings without backslash escapes "
            "(and without quotes in them)"
        )
    return canonical


def _canonical(line: str) -> str:
    """``line`` parsed and written canonically (_line), or ``""``."""
    line = _COMMENT.sub("", line).strip()
    if not line:
        return ""
    if line.startswith("-"):  # options (-r, -e, --index-url ...) belong to the node
        raise ConfigurationError(f"requirements may not carry pip options: {line!r}")
    if _VARIABLE.search(line):  # pip would put the node's value there: what the set installs
        # would depend on the node that built it, cached under the hash of this text
        raise ConfigurationError(
            f"requirements may not name environment variables ({line!r}): pip would expand "
            "them from the node's environment; write the value itself"
        )
    # (imported here: most tasks have no requirements, and every client, node and CLI
    # command would pay ~40 ms at start-up for it)
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        req = Requirement(line)
    except (ValueError, SyntaxError) as exc:  # InvalidRequirement, and the InvalidSpecifier
        # it lets through ("numpy===,numpy"), which escaped unexplained and killed the node
        # that read it; and the SyntaxError of a marker's string that is no Python string
        # ("x\"), which packaging reads with ast.literal_eval: the same
        why = str(exc).splitlines()[0] if str(exc) else "invalid"
        raise ConfigurationError(
            f"{line!r} is not a requirement ({why}); a task's requirements are PEP 508 lines, "
            "without pip options such as --hash: the node decides where packages come from"
        ) from None
    if req.url:  # pip would fetch it from there, whatever index the node is set to use
        raise ConfigurationError(
            f"requirements may not name where a package comes from ({line!r}): the node "
            "decides that (its index or mirror); name the package and a version instead"
        )
    # A name (of the project, or an extra) that PEP 508 refuses, ending in "_" or ".",
    # which packaging 26 reads all the same: canonical, "foo_" was "foo-", which it
    # refuses, and the node failed the task naming a line the user never wrote
    for name in (req.name, *req.extras):
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"{line!r} is not a requirement ({name!r} is not a valid name: PEP 508 names "
                "begin and end with a letter or digit)"
            )
    req.name = canonicalize_name(req.name)
    # extras are names too (PEP 685, as pip compares them): ``[Socks]`` is ``[socks]``
    req.extras = {canonicalize_name(e) for e in req.extras}
    return str(req)


def normalize(requirements: str | Iterable[str] | None) -> str:
    """The requirement set as a string: one requirement per line, sorted, without duplicates,
    blank lines or comments.  ``""`` means no requirements."""
    if requirements is None:
        return ""
    if isinstance(requirements, str):
        return _normalize_text(requirements)
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
    return _joined(lines)


@functools.lru_cache(maxsize=256)
def _normalize_text(text: str) -> str:
    """(A node normalises each task's requirements again, and parsing them costs some
    70 us a line: the sets a node sees are few, so each is parsed once.)"""
    return _joined(text.splitlines())


def _joined(lines: Iterable[str]) -> str:
    joined = "\n".join(sorted({r for r in map(_line, lines) if r}))
    size = len(joined.encode())
    if size > MAX_BYTES:  # else its tasks failed on the node, as corrupt task messages
        raise ConfigurationError(
            f"requirements take {size:,} bytes once normalised, over the {MAX_BYTES:,} a "
            "task header carries: install large sets on the node instead"
        )
    return joined


def env_key(requirements: str) -> str:
    """The sha256 of a normalised requirement set: the name of its environment."""
    return hashlib.sha256(normalize(requirements).encode()).hexdigest()
