"""The client's side of staging: which dataset URIs a task declares.

``submit(fn, ..., inputs=[...], outputs=[...])`` follows Cloud Kotta's keywords: the URIs
are staged by the node (inputs fetched into the task's working directory under their
basename before it runs; outputs uploaded from there after it succeeds), and the keywords
are also passed on to ``fn`` when its signature accepts them (``def file_sum(inputs=[])``).
``with_options(inputs=..., outputs=...)`` declares them without passing anything to ``fn``.
Every URI is checked here, at submit, so a malformed or traversing one fails at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..errors import InvalidDataUri
from .uris import check_output_name, parse_uri


def _uris(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidDataUri(f"{what} must be a list of s3:// URIs, not {value!r}")
    out = []
    for item in value:
        uri = parse_uri(item)
        if uri.is_prefix:
            raise InvalidDataUri(f"{what}: {item!r} is a prefix; name objects to stage")
        check_output_name(uri.basename)
        out.append(uri.uri)
    return tuple(out)


def declared(inputs: Iterable[str], outputs: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Checked, canonical input and output URIs, each once (one declared by the executor's
    options and again by the call, say); two files (two inputs, two outputs, or an input
    and an output) may not share a basename in one working directory, unless an input and
    an output are one object (updated in place)."""
    ins = tuple(dict.fromkeys(_uris(inputs, "inputs")))
    outs = tuple(dict.fromkeys(_uris(outputs, "outputs")))
    for what, uris in (("inputs", ins), ("outputs", outs)):
        seen: dict[str, str] = {}
        for u in uris:
            name = u.rsplit("/", 1)[-1]
            if name in seen and seen[name] != u:
                raise InvalidDataUri(
                    f"{what} {seen[name]} and {u} would both be {name!r} in the working directory"
                )
            seen[name] = u
    # nor an input and an output: one file, a task that wrote no output had its input
    # uploaded as the output (a copy of it in another dataset), and one that wrote it
    # replaced the input it was reading.  Unless they are one object: a task that updates
    # it in place, read, changed and written back (unchanged, it is written back as it was)
    staged = {u.rsplit("/", 1)[-1]: u for u in ins}
    for u in outs:
        name = u.rsplit("/", 1)[-1]
        if name in staged and staged[name] != u:
            raise InvalidDataUri(
                f"the input {staged[name]} and the output {u} would both be {name!r} in the "
                "working directory (the task's output would be its input): give the output "
                "another name"
            )
    return ins, outs


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    # (a positional-only parameter so named takes no keyword: **kwargs gets it, or no one)
    return any(
        (p.name == name and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
        for p in params
    )


def split_kwargs(fn: Callable, opts, kwargs: dict[str, Any], decorated: bool = False):
    """Take ``inputs`` / ``outputs`` out of a call's keywords into its options; leave them
    in the call where ``fn`` takes them.  ``decorated``: ``fn`` is a ``@kottajob``
    function's, called so (not given to submit), for the note of a keyword not URIs."""
    kwargs = dict(kwargs)
    found = {k: kwargs[k] for k in ("inputs", "outputs") if k in kwargs}
    try:
        given = {k: _uris(v, k) for k, v in found.items()}
    except InvalidDataUri as exc:
        # Code written for ProcessPoolExecutor passes its function's own argument of that
        # name (a model's inputs, say): say why it was read as URIs, and how to pass it
        name = getattr(fn, "__qualname__", None) or repr(fn)
        keys = " and ".join(k + "=" for k in found)
        if not decorated:
            exc.add_note(
                f"submit() takes {keys} as the dataset URIs the task stages (s3://...); to "
                f"pass {name} an argument so named, give it by position or with functools.partial"
            )
        else:  # (a partial of the decorated function is called with the keyword all the same)
            exc.add_note(
                f"a call of the @kottajob function {name} takes {keys} as the dataset URIs the "
                "task stages (s3://...); to pass it an argument so named, give it by position, "
                f"or submit functools.partial({name}.kotta_function, {next(iter(found))}=...)"
            )
        raise
    # (URIs that clash, two of one file name, are no argument so named: said without the note)
    ins, outs = declared(list(opts.inputs) + list(given.get("inputs", ())),
                         list(opts.outputs) + list(given.get("outputs", ())))
    for k in found:
        if not _accepts(fn, k):
            del kwargs[k]
    return replace(opts, inputs=ins, outputs=outs), kwargs
