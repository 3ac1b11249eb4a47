"""The wire format: task and result envelopes, versioned.  cloudpickle and tblib are used
here and nowhere else.

An envelope is::

    b"KOTTA" | version (1 byte) | header length (4 bytes, big endian) | header (JSON) | sections

The header is plain JSON that anyone (the node daemon, ``kotta logs``) may read without
unpickling anything; it lists the sections that follow as ``[name, length]`` pairs.  Only a
worker process unpickles a task's ``fn`` and ``args`` sections, and only the client
unpickles a result's ``payload``.

Task header:   kind="task", job_id, owner, client, queue, walltime (seconds), created, fn,
               n (calls in the task), optional refs ({section: blob key} for sections too
               large to travel inline; the node fetches them before a worker sees the task).
               optional requirements (pip requirement lines, normalised and sorted, one per
               line; the node runs the task in a cached venv with them installed).
               auth: the access token id (security/tokens.py); the envelope ends with a
               ``mac`` section signing all of it.  digests: {section: sha256} of refs.
               optional inputs / outputs: dataset URIs to stage (security/staging).
               optional max_tasks_per_child (an integer >= 1): the worker that runs the
               task has run fewer tasks than that before it, and is replaced once it has.
               optional python ("3.12"): the Python version that pickled the sections;
               code pickled by value loads only in that version (see holds_code).
               sections: fn = cloudpickle(fn), args = cloudpickle([(args, kwargs), ...])
               (apart, so that a worker can reuse a function it has already unpickled)
Result header: kind="result", job_id, outcome, n, optional error, usage, python (as in
               a task header: the version that pickled the payload).
               outcome "ok":     payload = pickle([pickle(("ok", value) | ("raise", exc)),
                                 ...]), each call apart (the first nodes of version 1
                                 wrote pickle([("ok", value), ...]): still read)
               outcome "error":  payload = pickle(exc): the task failed as a whole before
                                 any call ran (its payload could not be unpickled, ...)
               outcome "failed": no payload; header["error"] = {"type", "message",
                                 "exitcode", "signal"}: the node reports what happened
                                 (worker died, walltime, killed, dead-lettered, corrupt).
               sections: payload, stdout, stderr
"""

from __future__ import annotations

import collections
import concurrent.futures
import copyreg
import functools
import hashlib
import hmac
import io
import json
import operator
import pickle
import pickletools
import re
import struct
import sys
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import cloudpickle
import orjson
from tblib import Traceback

from . import errors

MAGIC = b"KOTTA"
#: 2: task envelopes are signed (an ``auth`` header field and a trailing ``mac`` section)
#: and big sections travel with their SHA-256 (``digests``).  Version 1 envelopes still
#: parse (the layout is the same), but nodes refuse unsigned tasks.
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAC_SECTION = "mac"
MAC_BYTES = 32
_PREFIX = struct.Struct(">5sBI")
MAX_HEADER = 1 << 20
_JOB_ID = re.compile(r"[0-9a-f]{32}")
#: this interpreter's Python version, as headers carry it: what pickled what they hold
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
_PYTHON = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")

OK = "ok"
ERROR = "error"
FAILED = "failed"
OUTCOMES = (OK, ERROR, FAILED)

# Node-side failures travel by name; the client maps them back to classes.
FAILURE_TYPES: dict[str, type[errors.JobFailed]] = {
    cls.__name__: cls
    for cls in (
        errors.JobFailed,
        errors.WalltimeExceeded,
        errors.MemoryLimitExceeded,
        errors.WorkerDied,
        errors.TaskKilled,
        errors.DeliveryFailed,
        errors.CorruptTask,
        errors.RequirementsError,
        errors.TaskRejected,
        errors.DataAccessDenied,
        errors.StagingFailed,
        errors.EgressDenied,
    )
}

_TASK_FIELDS = {
    "job_id": str,
    "owner": str,
    "client": str,
    "queue": str,
    "walltime": float,  # or an int: see _NUMBER
    "created": float,
    "fn": str,
    "n": int,
}
_RESULT_FIELDS = {"job_id": str, "outcome": str, "n": int}
_FIELDS = {"task": _TASK_FIELDS, "result": _RESULT_FIELDS}
_NUMBER = (int, float)


def _finite(x: int | float) -> bool:
    try:  # a huge int would overflow float() later
        return abs(float(x)) < float("inf")
    except OverflowError:
        return False


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID.fullmatch(text))


class Envelope:
    """A decoded envelope: its header and its raw (still pickled) sections."""

    __slots__ = ("header", "sections")

    def __init__(self, header: dict[str, Any], sections: dict[str, bytes] | None = None):
        self.header = header
        self.sections = sections if sections is not None else {}

    def __repr__(self) -> str:
        return f"Envelope({self.header!r}, {sorted(self.sections)})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Envelope)
            and self.header == other.header
            and self.sections == other.sections
        )

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def job_id(self) -> str:
        return self.header["job_id"]

    def text(self, name: str) -> str:
        return self.sections.get(name, b"").decode("utf-8", "replace")


# --------------------------------------------------------------------------- framing


def encode(
    header: dict[str, Any], sections: dict[str, bytes] | None = None, *, mac_key: bytes | None = None
) -> bytes:
    """Frame an envelope; with ``mac_key``, end it with a ``mac`` section: HMAC-SHA256 of
    every byte before it (header, section table and sections alike)."""
    body = b"".join(encode_pieces(header, sections, signed=mac_key is not None))
    if mac_key is not None:
        body += _mac(mac_key, body)
    return body


def encode_pieces(
    header: dict[str, Any], sections: dict[str, bytes | list[bytes]] | None = None, *,
    signed: bool = False,
) -> list[bytes]:
    """An envelope as pieces whose concatenation is what :func:`encode` returns (without its
    MAC, which ``signed`` leaves room for in the section table).  A section may be a list
    of pieces itself: nothing is joined, so a worker writes a big result to its pipe with
    no copy of it (:func:`dump_outcome_pieces`).  Empty sections are left out."""
    sections = {
        k: v for k, v in (sections or {}).items() if (any(v) if type(v) is list else v)
    }
    if MAC_SECTION in sections:
        raise ValueError(f"{MAC_SECTION!r} is a reserved section name (pass mac_key to sign)")
    head = dict(header)
    head["sections"] = [
        [name, sum(map(len, data)) if type(data) is list else len(data)]
        for name, data in sections.items()
    ]
    if signed:
        head["sections"].append([MAC_SECTION, MAC_BYTES])
    raw = _dumps(head)
    pieces = [_PREFIX.pack(MAGIC, VERSION, len(raw)), raw]
    for data in sections.values():
        if type(data) is list:
            pieces += data
        else:
            pieces.append(data)
    return pieces


#: HMAC-SHA256 objects keyed already, by key: copying one costs less than keying anew
_KEYED: dict[bytes, Any] = {}


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of ``data``.  Not ``hmac.digest``: that one-shot call releases the GIL
    whatever the length, and a thread that gives the GIL up while another one runs Python
    gets it back only after the switch interval (5 ms): a submitting thread beside a busy
    manager thread waited up to that long a task.  An HMAC object releases it only for
    data of 2 KiB or more."""
    keyed = _KEYED.get(key)
    if keyed is None:
        if len(_KEYED) >= 64:
            _KEYED.clear()
        keyed = _KEYED[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = keyed.copy()
    h.update(data)
    return h.digest()


def _dumps(header: dict[str, Any]) -> bytes:
    """A header as compact JSON with sorted keys (orjson: the header is most of the cost
    of an envelope)."""
    try:
        return orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson does not write (an int over 64 bits, a lone surrogate)
        # the stdlib does, with any lone surrogate spelled out: "\udcff" as six characters
        # (escaped, it would be JSON that orjson.loads refuses, as it is not UTF-8)
        return json.dumps(_spelled(header), separators=(",", ":"), sort_keys=True).encode()


def _spelled(value: Any) -> Any:
    """``value`` with lone surrogates in its strings (a file name that is not UTF-8, read by
    ``os.listdir``) replaced by their ``\\udcff`` spelling."""
    if type(value) is str:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_spelled(k): _spelled(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_spelled(v) for v in value]
    return value


def is_signed(header: dict[str, Any]) -> bool:
    """Whether a decoded header lists a ``mac`` section (the last one)."""
    secs = header.get("sections") or []
    return bool(secs) and secs[-1] == [MAC_SECTION, MAC_BYTES]


def verify_mac(data: bytes, key: bytes, *, parsed: bool = False) -> bool:
    """Whether ``data`` is an envelope that ends in a valid ``mac`` under ``key``.

    ``parsed``: the caller already checked the framing (``peek_header``); then only the
    HMAC is computed: no one without the key can make the last 32 bytes the HMAC of all
    before them, whatever the header lists."""
    if not parsed:
        try:
            header, _ = _parse(data)
        except errors.EnvelopeError:
            return False
        if not is_signed(header):
            return False
    if len(data) <= MAC_BYTES:
        return False
    expected = _mac(key, memoryview(data)[:-MAC_BYTES])
    return hmac.compare_digest(expected, data[-MAC_BYTES:])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes | memoryview) -> Envelope:
    """Parse an envelope.  Anything that is not one raises :class:`EnvelopeError`."""
    data = data if isinstance(data, bytes) else bytes(data)
    header, pos = _parse(data)
    return _envelope(data, header, pos)


def _envelope(data: bytes, header: dict[str, Any], pos: int) -> Envelope:
    """The envelope whose sections, as ``header`` lists them, begin at ``pos``.  A result's
    ``payload`` is a view of ``data``: only unpickled (outcomes), a copy of it held a big
    result once more on the client as it was read."""
    sections: dict[str, bytes] = {}
    for name, length in header.pop("sections"):
        if name == "payload":
            sections[name] = memoryview(data)[pos : pos + length]
        else:
            sections[name] = data[pos : pos + length]
        pos += length
    return Envelope(header, sections)


def decode_checked(data: bytes) -> Envelope:
    """Parse an envelope its sender has checked already (:func:`peek_header`): a task the
    node hands a worker.  Only the framing is read; a malformed one still raises (any
    exception: for the worker, a broken node)."""
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise errors.EnvelopeError("not a kotta envelope: bad magic bytes")
    pos = _PREFIX.size + hlen
    header = orjson.loads(memoryview(data)[_PREFIX.size : pos])
    # The arguments, a view of ``data`` (which may be one too): a copy of them was held
    # with it for the whole call, in the worker, whose memory counts against the task's
    # limit.  The other sections are bytes: a worker keeps them (its cache of functions,
    # the initializers it has run), and a view would keep the whole task with them.
    view, sections = memoryview(data), {}
    for name, length in header.pop("sections"):
        part = view[pos : pos + length]
        sections[name] = part if name == "args" else bytes(part)
        pos += length
    return Envelope(header, sections)


def newer_version(data: bytes | memoryview) -> int | None:
    """The version of an envelope too new for this kotta-executor to read (None: not one)."""
    if len(data) < _PREFIX.size or bytes(data[: len(MAGIC)]) != MAGIC:
        return None
    version = data[len(MAGIC)]
    return version if version > VERSION else None


def header_size(data: bytes) -> int:
    """The length of a framed envelope's header, as its prefix says."""
    return _PREFIX.unpack_from(data)[2]


def with_fields(data: bytes | memoryview, **fields: Any) -> bytes:
    """The envelope ``data`` with ``fields`` set in its header, its sections as they are:
    framed from views of them, not from copies (a node adds its samples to the result of
    a long task, which may be of gigabytes)."""
    data = data if isinstance(data, bytes) else memoryview(data)
    header, pos = _parse(data)
    raw = _dumps({**header, **fields})
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(raw)), raw, memoryview(data)[pos:]))


def peek_header(data: bytes | memoryview) -> dict[str, Any]:
    """The validated header of an envelope, without copying its sections out (nodes)."""
    header, _ = _parse(data if isinstance(data, bytes) else bytes(data))
    del header["sections"]
    return header


def _parse(data: bytes) -> tuple[dict[str, Any], int]:
    """Check the framing and header; return the header and where the sections start."""
    if len(data) < _PREFIX.size:
        raise errors.EnvelopeError(f"not a kotta envelope: only {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise errors.EnvelopeError("not a kotta envelope: bad magic bytes")
    if version not in READABLE_VERSIONS:
        raise errors.EnvelopeError(
            f"unsupported envelope version {version}"
            f"{', from a newer kotta-executor' if version > VERSION else ''} (this "
            f"kotta-executor reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if hlen > MAX_HEADER:  # (nothing may be cut short: a client's, over the limit)
        raise errors.EnvelopeError(
            f"kotta envelope header of {hlen} bytes is over the limit of {MAX_HEADER}")
    if _PREFIX.size + hlen > len(data):
        raise errors.EnvelopeError("truncated kotta envelope: header runs past the end")
    try:
        header = orjson.loads(memoryview(data)[_PREFIX.size : _PREFIX.size + hlen])
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, too long, too deep
        raise errors.EnvelopeError(f"kotta envelope header is not JSON: {exc}") from None
    _check_header(header)
    start = pos = _PREFIX.size + hlen
    for name, length in header["sections"]:
        if pos + length > len(data):
            raise errors.EnvelopeError(f"truncated kotta envelope: section {name!r} is cut short")
        pos += length
    if pos != len(data):
        raise errors.EnvelopeError(f"kotta envelope has {len(data) - pos} trailing bytes")
    return header, start


_task_values = operator.itemgetter(*_TASK_FIELDS)
#: the types of _TASK_FIELDS' values in a task header as clients write it
_TASK_TYPES = (str, str, str, str, float, float, str, int)
_INF = float("inf")


def _usual_task(header: dict[str, Any]) -> bool:
    """Whether ``header`` is a task header of the usual shape, and valid: a node checks
    one a task, so this is the quick way (C does most of it).  False does not mean
    invalid: _check_header then looks the long way, and says what is wrong."""
    try:
        values = _task_values(header)
    except KeyError:
        return False
    if tuple(map(type, values)) != _TASK_TYPES:
        return False
    job_id, _, _, _, walltime, created, _, n = values
    if not (n >= 1 and 0 < walltime < _INF and -_INF < created < _INF):  # (NaN fails too)
        return False
    if type(header.get("requirements", "")) is not str or not _JOB_ID.fullmatch(job_id):
        return False
    most = header.get("max_tasks_per_child", 1)
    if type(most) is not int or most < 1:
        return False
    py = header.get("python", PYTHON)
    if py != PYTHON and (type(py) is not str or not _PYTHON.fullmatch(py)):
        return False
    secs = header.get("sections")
    if type(secs) is not list:
        return False
    last = len(secs) - 1
    for i, sec in enumerate(secs):
        if type(sec) is not list or len(sec) != 2:
            return False
        name, length = sec
        if type(name) is not str or type(length) is not int or length < 0 or (
            name == MAC_SECTION and (i != last or length != MAC_BYTES)
        ):
            return False
    return True


def _check_header(header: Any) -> None:
    if type(header) is dict and header.get("kind") == "task" and _usual_task(header):
        return
    _check_fields(header)


def _check_fields(header: Any) -> None:
    """Every check of a header, one by one; EnvelopeError names the first that fails."""
    if type(header) is not dict:
        raise errors.EnvelopeError("kotta envelope header is not an object")
    kind = header.get("kind")
    required = _FIELDS.get(kind) if type(kind) is str else None
    if required is None:
        raise errors.EnvelopeError(f"unknown envelope kind {kind!r}")
    get = header.get
    for name, typ in required.items():
        value = get(name)
        if type(value) is not typ and (  # the exact type, as JSON gives it, is the fast path
            not isinstance(value, _NUMBER if typ is float else typ) or isinstance(value, bool)
        ):
            raise errors.EnvelopeError(f"{kind} envelope field {name!r} is missing or malformed")
    if not _JOB_ID.fullmatch(header["job_id"]):
        raise errors.EnvelopeError(f"{kind} envelope has a malformed job id")
    if header["n"] < 1:
        raise errors.EnvelopeError(f"{kind} envelope must carry at least one call")
    py = get("python", PYTHON)
    if type(py) is not str or not _PYTHON.fullmatch(py):
        raise errors.EnvelopeError(
            f"{kind} envelope field 'python' must be a Python version such as '3.12'")
    if kind == "task":
        walltime = header["walltime"]
        if not _finite(walltime) or walltime <= 0:
            raise errors.EnvelopeError("task envelope walltime must be positive and finite")
        if not _finite(header["created"]):
            raise errors.EnvelopeError("task envelope created must be a finite time")
        if type(get("requirements", "")) is not str:
            raise errors.EnvelopeError("task envelope field 'requirements' must be a string")
        most = get("max_tasks_per_child", 1)
        if type(most) is not int or most < 1:
            raise errors.EnvelopeError(
                "task envelope field 'max_tasks_per_child' must be an integer of at least 1")
    elif header["outcome"] not in OUTCOMES:
        raise errors.EnvelopeError(f"unknown result outcome {header['outcome']!r}")
    secs = get("sections")
    if type(secs) is not list:
        raise errors.EnvelopeError("kotta envelope section table is malformed")
    last = len(secs) - 1
    for i, sec in enumerate(secs):
        if type(sec) is not list or len(sec) != 2 or type(sec[0]) is not str or \
                type(sec[1]) is not int or sec[1] < 0:
            raise errors.EnvelopeError("kotta envelope section table is malformed")
        if sec[0] == MAC_SECTION and (i != last or sec[1] != MAC_BYTES):
            raise errors.EnvelopeError("kotta envelope's mac must be its last section, of 32 bytes")


# --------------------------------------------------------------------------- replies
#
# A node replies to a client with one message per report, carrying many results:
#     b"KRPL" | version (1 byte) | count (4 bytes) | count x (job id (32 ASCII) | length
#     (4 bytes) | result envelope, or nothing: "read the result from the job table")

REPLY_MAGIC = b"KRPL"
REPLY_VERSION = 1
_REPLY_PREFIX = struct.Struct(">4sBI")
_REPLY_ITEM = struct.Struct(">32sI")


def pack_replies(items: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [_REPLY_PREFIX.pack(REPLY_MAGIC, REPLY_VERSION, len(items))]
    for job_id, body in items:
        parts.append(_REPLY_ITEM.pack(job_id.encode("ascii"), len(body)))
        parts.append(body)
    return b"".join(parts)


def unpack_replies(data: bytes) -> list[tuple[str, bytes]]:
    """``[(job_id, result envelope or b"")]``; anything malformed raises EnvelopeError."""
    if len(data) < _REPLY_PREFIX.size:
        raise errors.EnvelopeError("not a kotta reply: too short")
    magic, version, count = _REPLY_PREFIX.unpack_from(data)
    if magic != REPLY_MAGIC or version != REPLY_VERSION:
        raise errors.EnvelopeError("not a kotta reply of a version this client reads")
    pos, out = _REPLY_PREFIX.size, []
    for _ in range(count):
        if pos + _REPLY_ITEM.size > len(data):
            raise errors.EnvelopeError("truncated kotta reply")
        raw_id, length = _REPLY_ITEM.unpack_from(data, pos)
        pos += _REPLY_ITEM.size
        job_id = raw_id.decode("ascii", "replace")
        if not _JOB_ID.fullmatch(job_id) or pos + length > len(data):
            raise errors.EnvelopeError("malformed kotta reply item")
        out.append((job_id, data[pos : pos + length]))
        pos += length
    if pos != len(data):
        raise errors.EnvelopeError("kotta reply has trailing bytes")
    return out


# --------------------------------------------------------------------------- tasks


def dump_initializer(initializer: Callable, initargs: Sequence) -> bytes:
    """Pickle an executor's ``initializer`` and ``initargs`` once, for the ``init`` section
    of each of its tasks (the worker runs it once per process: :func:`run_initializer`)."""
    if not callable(initializer):
        raise TypeError(f"initializer {initializer!r} is not callable")
    try:
        return cloudpickle_dumps((initializer, tuple(initargs)))
    except Exception as exc:
        raise errors.SerializationError(
            "the initializer: " + _explain_unpicklable(initializer, [(tuple(initargs), {})], exc)
        ) from exc


#: in a worker: the initializers (their ``init`` sections) that have run in it
_INITIALIZED: set[bytes] = set()


def run_initializer(data: bytes, job_id: str) -> None:
    """In a worker, before a task's calls (of job ``job_id``): run the initializer its
    executor gave (an ``init`` section), unless this process has run that one, with those
    arguments, already.  Only worker processes call this.  An initializer that raises has
    not run: the next task tries it again.  What it raises says where it came from; one
    that cannot be unpickled here is a SerializationError saying so (it never ran: that
    error, raised as its own, had been noted as raised by it)."""
    if data in _INITIALIZED:
        return
    try:
        initializer, initargs = cloudpickle.loads(data)
    except BaseException as exc:  # noqa: BLE001 - any unpickling failure (as load_call's)
        raise errors.SerializationError(
            f"the executor's initializer could not be unpickled on the node: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    own = _globals_by_value(initializer)
    before = dict(own) if own is not None else None
    try:
        initializer(*initargs)
    except BaseException as exc:
        add_note(exc, f"raised by the executor's initializer, in the worker that was to run "
                      f"job {job_id}")
        raise
    _INITIALIZED.add(data)
    if own is not None:
        # The globals it set (``global _model; _model = load()``), for the tasks of its
        # executor sent by value too, from the same module (see _with_initialized)
        made = {k: v for k, v in own.items() if k not in before or before[k] is not v}
        if made:
            _INIT_SET[data] = (own.get("__name__"), made)


#: in a worker: the globals that initializers sent by value (of a notebook, ``__main__``)
#: have set, by their ``init`` section (an executor's initializer and its arguments), with
#: the name of their module
_INIT_SET: dict[bytes, tuple[Any, dict[str, Any]]] = {}
#: the functions sent by value that have those globals: of which ``init`` sections
_INIT_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _globals_by_value(fn: Any) -> dict[str, Any] | None:
    """The globals of a function cloudpickle sent by value (a dict of its own, holding what
    it uses of its module's), or None: a function of an importable module has that
    module's, which every function of it shares already.  Of a bound method, a class or
    a callable object of ``__main__`` (``submit(predictor.predict, x)``), that of its
    function, ``__init__`` or ``__call__``: the methods of a class sent by value share one."""
    fn = _function_of(fn)
    g = getattr(fn, "__globals__", None) if fn is not None else None
    if g is None:
        return None
    module = sys.modules.get(g.get("__name__"))
    return None if module is not None and vars(module) is g else g


def _function_of(fn: Any) -> types.FunctionType | None:
    """The function whose globals ``fn`` runs with (see _globals_by_value), or None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if type(fn) is _LRU_WRAPPER or (type(fn) is types.FunctionType
                                    and fn.__code__ is _DISPATCH_CODE):
        # a functools.cache or singledispatch wrapper (made anew by _Pickler, of functools'
        # module): the globals are those of the function of __main__ it wraps (the default)
        fn = getattr(fn, "__wrapped__", None)
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    elif isinstance(fn, type):
        fn = getattr(fn, "__init__", None)
    elif not isinstance(fn, types.FunctionType):
        fn = getattr(type(fn), "__call__", None)  # noqa: B004 - its function, not a test
    return fn if isinstance(fn, types.FunctionType) else None


def _with_initialized(fn: Callable, init: bytes) -> Callable:
    """``fn`` seeing the globals its executor's initializer (``init``) set, when both come
    from the same module by value (run_initializer), as a task of ``__main__`` sees them in
    a ProcessPoolExecutor's worker, where they share the module.  Here each function of
    ``__main__`` comes with a copy of the globals it uses, as they were at submit: the
    initializer's work was lost to it (``_model`` still None).  Given once: what a task
    sets then stays, as in a pool's worker.  Only its own executor's initializer's: a
    worker serves every executor of its owner, and another notebook's tasks must keep
    their own values of globals of the same names."""
    name, made = _INIT_SET[init]
    # (by the function whose globals they are, which a weak reference can be made to: a
    # callable object of a class with __slots__ cannot have one, and was given none)
    target = _function_of(fn)
    if target is None:
        return fn
    seen = _INIT_SEEN.get(target, ())
    if init in seen:
        return fn
    own = _globals_by_value(target)
    if own is not None and own.get("__name__") == name:
        own.update(made)
    _INIT_SEEN[target] = (*seen, init)
    return fn


def dump_call(fn: Callable, calls: Sequence[tuple[tuple, dict]]) -> dict[str, bytes]:
    """Pickle a function and its calls into the ``fn`` and ``args`` sections of a task;
    name the offending object when that fails."""
    try:
        calls = list(calls)
        args = pickle.dumps(calls, 5) if _plain(calls) else cloudpickle_dumps(calls)
        return {"fn": _FUNCTIONS.dumps(fn), "args": args}
    except Exception as exc:
        raise errors.SerializationError(_explain_unpicklable(fn, calls, exc)) from exc


_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})


def _plain(calls: list[tuple[tuple, dict]]) -> bool:
    """Calls whose arguments are all numbers and strings, which plain pickle writes as
    cloudpickle would, only faster."""
    plain = _PLAIN
    for args, kwargs in calls:
        for a in args:
            if type(a) not in plain:
                return False
        if kwargs:
            for a in kwargs.values():
                if type(a) not in plain:
                    return False
    return True


class _Unknown(Exception):
    """A value whose pickle could change without the value changing identity."""


_SCALARS = (type(None), bool, int, str, bytes)


_LRU_WRAPPER = type(functools.lru_cache(maxsize=None)(len))


def _code_reduce(code: types.CodeType):
    """cloudpickle's reduction of a code object sent by value, with its file name kept.
    cloudpickle names every such file ``<dynamic-code>`` (for the same bytes wherever a
    notebook cell runs): a remote traceback of a script's function then said ``File
    "<dynamic-code>", line 3``, with no source line, where the client, which has the file
    (or a notebook its cell, in linecache), shows it."""
    make, args = _CLOUDPICKLE_CODE_REDUCE(code)
    for i in range(len(args) - 1):  # (its place differs between Python versions)
        if args[i] == "<dynamic-code>" and args[i + 1] == code.co_name:
            return make, (*args[:i], code.co_filename, *args[i + 1:])
    return make, args


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, which also sends by value a function of ``__main__`` (a
    script, a notebook) wrapped in ``functools.lru_cache`` or ``functools.cache``, or made
    generic by ``functools.singledispatch`` (:func:`_dispatching`), and, before Python
    3.12, a class of ``__main__`` with a ``functools.cached_property``; a class of
    ``__main__`` keeps its ``__slots__`` (:func:`_with_slots`).
    cloudpickle sends such a wrapper by reference (cloudpipe/cloudpickle#178), as
    ``__main__.fib``, which a worker cannot find, while it sends the function itself by
    value.  The wrapper is made anew around it, with its ``maxsize`` and ``typed`` (not
    its cached values): the function is set after (:func:`_cached_calls`), as a
    recursive one refers to the wrapper through its globals.  Code keeps its file name
    (:func:`_code_reduce`)."""

    dispatch_table = collections.ChainMap({types.CodeType: _code_reduce},
                                          cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj):
        if type(obj) is _LRU_WRAPPER and _by_value(obj):
            params = obj.cache_parameters()
            # with what was set on the wrapper (``fib.note = ...``), which update_wrapper
            # does not make again from the function
            own = {k: v for k, v in vars(obj).items() if k != "__wrapped__"}
            return (_lru_cache_of, (params["maxsize"], params["typed"]),
                    (obj.__wrapped__, own), None, None, _cached_calls)
        if type(obj) is types.FunctionType and obj.__code__ is _DISPATCH_CODE and _by_value(obj):
            # cloudpickle would send singledispatch's closure, a WeakKeyDictionary among
            # it, which cannot be pickled: the wrapper is made anew, with what was
            # registered to it (the default, as ``object``'s), after it (_dispatching)
            own = {k: v for k, v in vars(obj).items() if k not in _DISPATCH_OWN}
            return (_singledispatch_of, (), (dict(obj.registry), own), None, None,
                    _dispatching)
        if isinstance(obj, type) and "__slots__" in vars(obj):
            return _with_slots(obj, super().reducer_override(obj))
        if isinstance(obj, concurrent.futures.Future) and _default_pickling(type(obj)):
            # pickle would say "cannot pickle '_thread.RLock' object", of the future's
            # condition: a lock the user never made (a KottaFuture says why itself)
            raise TypeError(
                f"a Future ({obj!r}) cannot be pickled: only a future passed as an argument "
                "itself is waited for and replaced by its value, not one inside a list, "
                "dict or other object, nor one a task returns; pass each future as an "
                "argument (submit(fn, *futures)), or its result()"
            )
        if type(obj) is functools.cached_property and "lock" in vars(obj):
            # (before Python 3.12) in a class sent by value: its RLock cannot be pickled,
            # and the cached_property made anew where it is unpickled has its own
            return (functools.cached_property, (obj.func,),
                    {k: v for k, v in vars(obj).items() if k != "lock"})
        return super().reducer_override(obj)


def _default_pickling(cls: type) -> bool:
    """Whether ``cls`` pickles as ``object`` does: a Future subclass that says how it is
    pickled is left to do so."""
    return (cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is object.__getstate__)


def _by_value(wrapper) -> bool:
    """Whether cloudpickle would send ``wrapper.__wrapped__`` by value (not importable
    where it is unpickled), as it does a plain function."""
    cp = cloudpickle.cloudpickle
    if not isinstance(getattr(wrapper, "__wrapped__", None), types.FunctionType) or not all(
            hasattr(cp, h) for h in ("_lookup_module_and_qualname",
                                     "_is_registered_pickle_by_value")):
        return False  # (cloudpickle internals: without them, as cloudpickle does)
    found = cp._lookup_module_and_qualname(wrapper)
    return found is None or cp._is_registered_pickle_by_value(found[0])


def _lru_cache_of(maxsize: int | None, typed: bool) -> Callable:
    """A worker's ``functools.lru_cache`` wrapper of a function set later (_cached_calls)."""

    def calls(*args, **kwargs):
        return calls.fn(*args, **kwargs)

    return functools.lru_cache(maxsize=maxsize, typed=typed)(calls)


def _cached_calls(wrapper, state: tuple[Callable, dict[str, Any]]) -> None:
    fn, own = state
    wrapper.__wrapped__.fn = fn
    functools.update_wrapper(wrapper, fn)  # (its name, doc, __wrapped__: the function)
    vars(wrapper).update(own)


def _with_slots(cls: type, reduced: Any) -> Any:
    """cloudpickle's reduction of a class with ``__slots__``, made again with them.
    cloudpickle sends a class by value (of ``__main__``) with its ``__slots__`` only as an
    attribute set after the class is made: where it is unpickled, its instances had a
    ``__dict__``, and those sent back could not be unpickled on the client, whose class
    has none ("'Pair' object has no attribute '__dict__'")."""
    make = getattr(cloudpickle.cloudpickle, "_make_skeleton_class", None)
    if type(reduced) is not tuple or make is None or reduced[0] is not make:
        return reduced  # (by reference; or cloudpickle internals changed: as it does)
    meta, name, bases, kwargs, *rest = reduced[1]
    if any(b is NamedTuple for b in bases):  # (its __orig_bases__) typing makes it a
        return reduced  # named tuple, slots and all, and refuses __slots__ given to it
    return (make, (meta, name, bases, {**kwargs, "__slots__": cls.__slots__}, *rest),
            *reduced[2:])


def _undispatched(*args, **kwargs):
    raise TypeError("singledispatch function not set up yet")


#: the code of every ``functools.singledispatch`` wrapper, and what singledispatch sets on it
_DISPATCH_CODE = functools.singledispatch(_undispatched).__code__
_DISPATCH_OWN = frozenset({"register", "dispatch", "registry", "_clear_cache", "__wrapped__"})


def _singledispatch_of() -> Callable:
    """A worker's ``functools.singledispatch`` wrapper, its functions set later
    (_dispatching)."""
    return functools.singledispatch(_undispatched)


def _dispatching(wrapper, state: tuple[dict, dict[str, Any]]) -> None:
    registry, own = state
    for cls, fn in registry.items():  # (object's first: the default)
        wrapper.register(cls, fn)
    functools.update_wrapper(wrapper, registry[object])  # (its name, doc, __wrapped__)
    vars(wrapper).update(own)


def cloudpickle_dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps``, with :class:`_Pickler`."""
    with io.BytesIO() as f:
        _Pickler(f, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return f.getvalue()


#: the largest pickled function kept for the next call of the same function: by the
#: client (PickledFunctions), by a worker (load_call)
CACHED_FUNCTION_MAX = 1 << 20


class PickledFunctions:
    """cloudpickle's bytes of functions, reused while they would come out the same.

    A function defined in ``__main__`` or a notebook is pickled by value: its code, and the
    globals, defaults and closure values it uses.  That costs tens of microseconds, at every
    submit.  The bytes are reused only while a *fingerprint* of all that is unchanged, and a
    fingerprint exists only when every value in it is immutable (numbers, strings, tuples of
    them), or pickled by reference (modules, importable functions and classes), or another
    such function.  A function that uses a list, a dict, an instance or a class of
    ``__main__`` has no fingerprint and is pickled every time, so a change to any of those
    is always sent.  (Dask caches pickled functions by identity alone; this is stricter.)
    """

    def __init__(self, size: int = 64):
        self._size = size
        #: id(fn) -> (weak reference to fn, fingerprint, bytes, confirmed by a second
        #: pickle).  Weak: the cache keeps no function alive, nor what it captured (an
        #: executor drops what it was given once it is sent, as ProcessPoolExecutor does);
        #: an entry goes with its function
        self._entries: dict[int, tuple[weakref.ref, tuple, bytes, bool]] = {}
        self._names: dict[types.CodeType, tuple[str, ...]] = {}  # globals a code reads
        self._lock = threading.Lock()
        helpers = ("_should_pickle_by_reference", "_extract_code_globals")
        # both are cloudpickle internals: without them, nothing is cached
        self._cp = cloudpickle.cloudpickle if all(
            hasattr(cloudpickle.cloudpickle, h) for h in helpers) else None

    def dumps(self, fn: Callable) -> bytes:
        """cloudpickle's bytes of ``fn``.  Bytes are reused only once a second pickle
        under the same fingerprint came out the same: another thread may change a value
        and change it back while a pickle is made (A, B, A), and the bytes of B must not
        then stand for A."""
        try:
            key = self.fingerprint(fn)
            with self._lock:
                hit = self._entries.get(id(fn))
            if hit is not None and hit[0]() is fn and hit[1] == key and hit[3]:
                return hit[2]
        except Exception:  # noqa: BLE001 - _Unknown, or a value that cannot be compared
            return cloudpickle_dumps(fn)
        data = cloudpickle_dumps(fn)
        if len(data) > CACHED_FUNCTION_MAX:
            # a closure over a big value: kept, its pickle was held as long as the function
            # lived (a notebook's: for good), a copy of that value long after it was sent
            return data
        try:  # kept only if nothing changed while it was pickled
            if self.fingerprint(fn) != key:
                return data
        except Exception:  # noqa: BLE001 - it became unknowable meanwhile
            return data
        confirmed = hit is not None and hit[0]() is fn and hit[1] == key and hit[2] == data
        ref = hit[0] if hit is not None and hit[0]() is fn else weakref.ref(
            fn, self._forget(id(fn)))
        with self._lock:
            if id(fn) not in self._entries and len(self._entries) >= self._size:
                # (list(): a dying function's callback may drop an entry, from another
                # thread, between the iterator's creation and its first step)
                self._entries.pop(next(iter(list(self._entries))), None)
            self._entries[id(fn)] = (ref, key, data, confirmed)
        return data

    def _forget(self, ident: int) -> Callable[[weakref.ref], None]:
        """The callback that drops a function's entry as the function dies.  It may run on
        any thread, one holding the lock among them (a collection during dumps), so it
        takes none: the entry is its function's as long as the function is not freed, and
        its id cannot be reused before that."""
        entries = self._entries  # (not self: the callback keeps nothing else alive)

        def forget(ref: weakref.ref) -> None:
            entry = entries.get(ident)
            if entry is not None and entry[0] is ref:
                entries.pop(ident, None)

        return forget

    def fingerprint(self, fn: Callable) -> tuple:
        """What cloudpickle's bytes of ``fn`` depend on; _Unknown if that is not knowable
        cheaply."""
        if self._cp is None or type(fn) is not types.FunctionType:
            raise _Unknown
        return self._function(fn, 0)

    def _function(self, fn: types.FunctionType, depth: int) -> tuple:
        cp = self._cp
        if cp._should_pickle_by_reference(fn):
            return ("ref", fn)
        if depth > 3 or fn.__dict__:
            raise _Unknown
        g = fn.__globals__
        code = fn.__code__
        names = self._names.get(code)
        if names is None:  # code objects are immutable: what they read never changes
            if len(self._names) > 4 * self._size:
                self._names.clear()
            names = self._names[code] = tuple(cp._extract_code_globals(code))
        modules = [False]
        value = self._value
        used = [value(g[k], depth, modules) if k in g else _MISSING for k in names]
        defaults, kwdefaults, cells = fn.__defaults__, fn.__kwdefaults__, fn.__closure__
        notes = fn.__annotations__
        return (
            code, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__,
            g.get("__package__"), g.get("__name__"), g.get("__file__"), *used,
            None if defaults is None else value(defaults, depth, modules),
            None if not kwdefaults else value(tuple(kwdefaults.items()), depth, modules),
            None if not notes else value(tuple(notes.items()), depth, modules),
            None if cells is None else tuple([self._cell(c, depth, modules) for c in cells]),
            # a module among the values: cloudpickle also sends which of its submodules
            # are imported, which grows with sys.modules
            len(sys.modules) if modules[0] else 0,
        )

    def _cell(self, cell, depth: int, modules: list) -> tuple:
        try:
            return ("cell", self._value(cell.cell_contents, depth, modules))
        except ValueError:  # an empty cell
            return ("empty",)

    def _value(self, v: Any, depth: int, modules: list) -> Any:
        t = type(v)
        if t in _SCALARS:
            return (t, v)
        if t is float:  # by their bits: 0.0 == -0.0, and NaNs differ in sign and payload
            return (t, _DOUBLE.pack(v))
        if t is complex:
            return (t, _DOUBLE.pack(v.real), _DOUBLE.pack(v.imag))
        if t is tuple or t is frozenset:
            return (t, tuple([self._value(x, depth, modules) for x in v]))
        if t is types.FunctionType:
            return self._function(v, depth + 1)
        if t is types.ModuleType:
            if not self._cp._should_pickle_by_reference(v):
                raise _Unknown
            modules[0] = True
            return ("module", v)
        if t is types.BuiltinFunctionType or isinstance(v, type):
            try:
                if self._cp._should_pickle_by_reference(v):
                    return ("ref", v)
            except TypeError:
                pass
        raise _Unknown


_MISSING = ("missing",)
_DOUBLE = struct.Struct("<d")
_FUNCTIONS = PickledFunctions()


def _explain_unpicklable(fn, calls, exc: BaseException) -> str:
    def fails(obj) -> BaseException | None:
        try:
            cloudpickle_dumps(obj)
        except Exception as e:  # noqa: BLE001 - we report whatever pickling raised
            return e
        return None

    name = getattr(fn, "__qualname__", repr(fn))
    if (e := fails(fn)) is not None:
        # which of the values it uses, as a function sent by value (a module-level lock, a
        # socket, a dict holding one), since a function uses many and pickle's message
        # names only a type
        part = _unpicklable_part(fn, fails, set())
        return (f"cannot send {name}: the function itself cannot be pickled"
                f"{': ' + part if part else ''} ({e})")
    for args, kwargs in calls:
        for i, arg in enumerate(args):
            if (e := fails(arg)) is not None:
                return (
                    f"cannot send {name}: argument {i} ({_short_repr(arg)}) "
                    f"cannot be pickled ({e})"
                )
        for key, value in kwargs.items():
            if (e := fails(value)) is not None:
                return (
                    f"cannot send {name}: keyword argument {key!r} ({_short_repr(value)}) "
                    f"cannot be pickled ({e})"
                )
    return f"cannot send {name}: the call cannot be pickled ({exc})"


def _unpicklable_part(fn: Any, fails: Callable[[Any], BaseException | None],
                      seen: set[int]) -> str | None:
    """The global, closure variable or default of ``fn``, a function sent by value (or a
    partial of one), that cannot be pickled, named with the functions sent by value
    through which ``fn`` uses it; None when none is found.  Only when ``fn`` cannot be
    pickled."""
    if isinstance(fn, functools.partial):
        for i, v in enumerate(fn.args):
            if fails(v) is not None:
                return f"argument {i} of the partial ({_short_repr(v)})"
        for k, v in fn.keywords.items():
            if fails(v) is not None:
                return f"keyword argument {k!r} of the partial ({_short_repr(v)})"
        return _unpicklable_part(fn.func, fails, seen)
    if type(fn) is not types.FunctionType or id(fn) in seen or len(seen) > 32:
        return None
    try:
        if cloudpickle.cloudpickle._should_pickle_by_reference(fn):
            return None
        names = cloudpickle.cloudpickle._extract_code_globals(fn.__code__)
    except Exception:  # noqa: BLE001 - cloudpickle internals: code's own names then
        names = fn.__code__.co_names
    seen.add(id(fn))
    code, g = fn.__code__, fn.__globals__
    used = [(f"global {k!r}", g[k]) for k in names if k in g]
    for k, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            used.append((f"closure variable {k!r}", cell.cell_contents))
        except ValueError:  # (an empty cell)
            pass
    positional = code.co_varnames[: code.co_argcount]
    defaults = fn.__defaults__ or ()
    used += [(f"default {k!r}", v) for k, v in zip(positional[len(positional) - len(defaults):],
                                                   defaults, strict=False)]
    used += [(f"default {k!r}", v) for k, v in (fn.__kwdefaults__ or {}).items()]
    first = None
    for what, v in used:
        if fails(v) is None:
            continue
        deeper = _unpicklable_part(v, fails, seen)
        if deeper:
            return f"{deeper}, used by {fn.__qualname__}"
        if first is None:  # (a function through which no value is found: look further)
            first = f"{what} of {fn.__qualname__} ({_short_repr(v)})"
    return first


def _short_repr(obj: Any, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_call(
    sections: dict[str, bytes], cache: dict[bytes, Callable] | None = None
) -> tuple[Callable, list[tuple[tuple, dict]]]:
    """Unpickle a task's function and calls.  Only worker processes call this.

    ``cache`` maps pickled functions to functions already unpickled: the same bytes make
    the same function, so a warm worker skips rebuilding it.
    """
    data = sections.get("fn", b"")
    # not a big one (a closure over an array): kept, it held its pickle and what it
    # captured in the worker, up to 64 of them, after its task, against every later
    # task's memory limit; unpickling it again costs little beside fetching it
    if cache is not None and len(data) > CACHED_FUNCTION_MAX:
        cache = None
    init = sections.get("init")
    given = _INIT_SET.get(init) if init else None
    initialized = given is not None
    # One made for each executor's initializer that gives it globals (_with_initialized),
    # and one for none: two executors of one notebook, with the initializer given other
    # arguments (two models), send the same bytes, and shared one function, which ran
    # the tasks of each with the globals the last initializer set, and those of an
    # executor with none with another executor's.  (By its entry, kept for the worker's
    # life: each task brings its own copy of the init section, up to 256 KiB, which the
    # cache's keys would each have held.)
    key = (id(given), data) if initialized else data
    fn = cache.get(key) if cache is not None else None
    if fn is None:
        fn = pickle.loads(data)
        # Not one that brings a class by value (a callable object or method of a class of
        # ``__main__``, a function that makes one): there is one such class in the worker,
        # as on the client, and each pickle of it sets its own methods on it, with the
        # globals of their submit.  Reused, the function ran with those of whichever
        # pickle came last: SCALE 1, 2, then 1 again, the third (the first's bytes) ran
        # with SCALE 2.  Unpickled anew each task, as ProcessPoolExecutor does.
        if cache is not None and _SKELETONS.search(data) is None:
            cache[key] = fn
    if initialized:
        fn = _with_initialized(fn, init)
    return fn, pickle.loads(sections.get("args", b""))


def holds_code(data: bytes) -> bool:
    """Whether a pickle holds code pickled by value (a function defined in a notebook or
    ``__main__``, a lambda, a closure, a class with methods), without unpickling it.

    cloudpickle rebuilds a code object's type by ``_builtin_type("CodeType")`` (cloudpickle
    3) or from a reference to ``types.CodeType``: looked for opcode by opcode, not as bytes
    in the pickle, since plain data (a ``bytes`` value) may hold those bytes too; and with
    the strings the memo gives, since pickle writes a string once and takes it from its
    memo after (a "CodeType" pickled earlier, a key or an argument, is the one the type is
    rebuilt from).  Every pickle of code holds the name, so only those are looked at."""
    data = bytes(data)  # (a worker's arguments are a view: ``in`` would compare ints)
    return b"CodeType" in data and _code_from_memo(data)


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_BYTES = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"})


def _code_from_memo(data: bytes) -> bool:
    """cloudpickle's calls that rebuild a code object's type, in a whole pickle (to its
    STOP: bytes that only begin like one are data), or in a pickle held in it as bytes (the
    outcomes of a map's items are pickled one by one) that starts as pickles do now."""
    memo: dict[int, Any] = {}
    last: list[Any] = [None, None]  # what the last two opcodes pushed (a string or None)
    found = False
    try:
        for op, arg, _ in pickletools.genops(data):  # (raises if it ends before a STOP)
            name = op.name
            if name == "FRAME" or found:
                continue
            if name == "MEMOIZE" or name in _PUTS:
                memo[len(memo) if name == "MEMOIZE" else arg] = last[-1]
                continue
            if name in _STRINGS:
                value = arg
            elif name in _BYTES and arg[:1] == b"\x80" and b"CodeType" in arg:
                found = _code_from_memo(arg)  # a pickle in a pickle (PROTO first)
                value = None
            elif name in _GETS:
                value = memo.get(arg)
            elif name == "TUPLE1" and last[-1] == "CodeType":
                value = ("CodeType",)
            elif (name == "REDUCE" and last[-1] == ("CodeType",)) or (
                name == "STACK_GLOBAL" and last == ["types", "CodeType"]
            ):
                found = True
                value = None
            else:
                value = None
            last = [last[-1], value]
    except Exception:  # noqa: BLE001 - not a pickle: unpickling it says so
        return False
    return found


def version_mismatch(
    pickled_by: str | None, pickles: Iterable[bytes], what: str, where: str
) -> errors.PythonVersionMismatch | None:
    """The error to give instead of unpickling ``pickles`` (``what``, unpickled
    ``where``) when another Python version pickled them and they hold code: loaded, it
    would be bytecode of another version.  None when they may be unpickled here (the same
    version; an unknown one, an earlier client's; or no code in them)."""
    if pickled_by is None or pickled_by == PYTHON or not any(map(holds_code, pickles)):
        return None
    err = errors.PythonVersionMismatch(
        f"{what} was pickled by Python {pickled_by} and would be unpickled by Python "
        f"{PYTHON} {where}, but it holds code pickled by value (a function or class defined "
        "in a notebook or __main__, a lambda, a closure), which loads only in the Python "
        "version that pickled it. Use the same Python version (major.minor) for the client "
        "and the nodes, or define the code in a module both can import"
    )
    err.pickled_by, err.running = pickled_by, PYTHON
    return err


#: a function's name is recorded with its job cut to this many characters
MAX_FN_NAME = 1024


def fn_name(fn: Callable) -> str:
    """The name a job is recorded and listed with (a label, never looked up)."""
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    full = f"{module}.{name}" if module else name
    if full.isascii() and len(full) <= MAX_FN_NAME:  # (every submit: most names are)
        return full
    # spelled out (as \udce9), as reasons are: a lone surrogate (a class made with type()
    # from a name os.listdir returned) could not be written to the job table
    full = full.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(full) > MAX_FN_NAME:
        # a job's record is one DynamoDB item, 400 KB at most: a generated name of
        # hundreds of KB was refused, and that broke the executor (every future with it)
        full = full[: MAX_FN_NAME - 10] + " ... (cut)"
    return full


def task_header(**fields: Any) -> dict[str, Any]:
    header = {"kind": "task", **fields}
    _check_header({**header, "sections": []})
    return header


# --------------------------------------------------------------------------- results


class ExceptionBox:
    """An exception on its way back to the client: itself (its ``args`` and ``__dict__``,
    as pickle keeps them), its traceback as tblib data, and its chained exceptions.

    The stdlib pickles neither tracebacks nor ``__cause__``/``__context__``; this carries
    them without patching the exception classes (tblib's ``pickling_support.install`` does,
    and loses ``SystemExit.code`` and ``StopIteration.value`` on the way)."""

    __slots__ = ("exc", "tb", "cause", "context", "suppress", "dropped", "members")

    def __init__(self, exc: BaseException, _seen: set[int] | None = None):
        seen = _seen if _seen is not None else set()
        seen.add(id(exc))
        # (a group first member by member: one that survives pickling whole may still
        # have members pickle makes anew wrongly, see _mended_group)
        # (one pickled by a builtin's __reduce__, OSError's, first as _BuiltInReduced: made
        # again by calling its class, an __init__ that writes its message from its
        # argument wrote it twice)
        self.exc = _mended_group(exc) or _as_built_in_reduces(exc) or (
            _Travelling(exc) if _round_trips(exc) else remote_error(exc))
        tb = exc.__traceback__
        self.tb, self.dropped = _traceback_data(tb) if tb is not None else (None, 0)
        cause, context = exc.__cause__, exc.__context__
        self.cause = ExceptionBox(cause, seen) if _chainable(cause, seen) else None
        self.context = (
            "cause" if context is not None and context is cause
            else ExceptionBox(context, seen) if _chainable(context, seen) else None
        )
        self.suppress = exc.__suppress_context__
        linked = ((cause, self.cause), (context, self.context))  # (before _keep_root's)
        if self.cause is None and self.context in (None, "cause") and len(seen) >= _CHAIN_LIMIT:
            self._keep_root(cause, context, seen)
        self.members = None
        if isinstance(exc, BaseExceptionGroup) and isinstance(self.exc, _Travelling):
            # A member that is also the group's cause or context (an asyncio.TaskGroup's
            # body raised: the group is raised while it is handled) is boxed there, and
            # has no box of its own below.  That box holds the member itself, pickled as
            # in the group's args, so that pickle's memo makes it the group's member on
            # the client, frames and chain set on it (a _Travelling made a copy, and the
            # member came back bare).
            sent = getattr(self.exc, "members", exc.exceptions)  # (_mended_group's)
            for original, link in linked:
                if isinstance(link, ExceptionBox):  # (a RemoteError's too: the member's)
                    for member, as_sent in zip(exc.exceptions, sent, strict=True):
                        if original is member:
                            link.exc = as_sent
            # Its members travel in its args, as pickle keeps them: without their
            # tracebacks and chains (an asyncio.TaskGroup's failures came back without a
            # frame).  Boxes with no exception of their own carry those, up to the limit.
            self.members = [_member_box(m, seen) for m in exc.exceptions]

    def _keep_root(self, cause, context, seen: set[int]) -> None:
        """Past _CHAIN_LIMIT: box the chain's root (its first exception, the one that
        began it all, which a parser wrapping an error at each level of a deep input had
        lost) in place of the links between, with a note saying how many were left out."""
        link = cause if cause is not None else context
        left_out = 0
        while link is not None and id(link) not in seen:
            after = link.__cause__ if link.__cause__ is not None else link.__context__
            if after is None or id(after) in seen:
                break
            seen.add(id(link))
            left_out += 1
            link = after
        if link is None or id(link) in seen:
            return
        root = ExceptionBox(link, seen)
        if left_out:
            try:
                add_note(root.original, f"kotta: {left_out} chained exception(s) between "
                                        f"this one and the next are left out")
            except Exception:  # noqa: BLE001 - __notes__ that are not a list: no note
                pass
        if cause is not None:
            self.cause = root
            self.context = "cause" if context is cause else None
        else:
            self.context = root

    def __getstate__(self):
        # (no "members" but for a group, no "dropped" but for a traceback cut short: a
        # client of an earlier version, which has no such slot, still reads every other
        # exception; one from before "dropped" failed every exception's result with
        # SerializationError "'ExceptionBox' object has no attribute 'dropped'")
        state = {k: getattr(self, k) for k in self.__slots__}
        if state["members"] is None:
            del state["members"]
        if not state["dropped"]:
            del state["dropped"]
        return state

    def __setstate__(self, state):
        self.dropped, self.members = 0, None
        for k, v in state.items():
            if k in ExceptionBox.__slots__:  # (what a later version adds is left out)
                setattr(self, k, v)

    @property
    def original(self) -> BaseException:
        return self.exc.exc if isinstance(self.exc, _Travelling) else self.exc

    def unbox(self) -> BaseException:
        return self._onto(self.original)

    def _onto(self, exc: BaseException) -> BaseException:
        """``exc`` with this box's traceback, chain and members' (the box's own exception,
        or, for a member of a group, the group's)."""
        if self.tb is not None:
            try:
                exc = exc.with_traceback(_rebuilt_traceback(self.tb)
                                         if _COLUMNS_KNOWN else
                                         Traceback.from_dict(self.tb).as_traceback())
            except Exception:  # noqa: BLE001 - a traceback we cannot rebuild is not fatal
                pass
        if self.dropped:
            add_note(
                exc,
                f"kotta: {self.dropped} frames in the middle of the remote traceback are left "
                f"out (of {self.dropped + TRACEBACK_FRAMES})"
            )
        # (object.__setattr__: BaseException's own slots, set past a __setattr__ that
        # refuses, a frozen dataclass's, as the interpreter sets them when it raises)
        if self.cause is not None:
            object.__setattr__(exc, "__cause__", self.cause.unbox())
        if self.context == "cause":
            object.__setattr__(exc, "__context__", exc.__cause__)
        elif self.context is not None:
            object.__setattr__(exc, "__context__", self.context.unbox())
        object.__setattr__(exc, "__suppress_context__", self.suppress)
        if self.members is not None and isinstance(exc, BaseExceptionGroup):
            for box, member in zip(self.members, exc.exceptions, strict=False):
                if box is not None:
                    box._onto(member)
        return exc


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on an exception whose ``__setattr__`` refuses (a frozen
    dataclass's: add_note sets ``__notes__`` through it, and raised FrozenInstanceError in
    place of the task's exception)."""
    if getattr(exc, "__notes__", None) is None:
        object.__setattr__(exc, "__notes__", [])
    exc.add_note(note)


def _member_box(exc: BaseException, seen: set[int]) -> ExceptionBox | None:
    """The traceback and chain of a member of a group (the member itself travels in the
    group's args); None past the chain limit, which members count toward."""
    if id(exc) in seen or len(seen) >= _CHAIN_LIMIT:
        return None
    box = ExceptionBox(exc, seen)
    box.exc = None
    return box


_CHAIN_LIMIT = 32

#: frames of a remote traceback that travel: the outermost 20 (where the task began) and
#: the innermost (where it failed); a deeper one (a RecursionError's 1,000) loses the middle.
#: tblib nests a dict a frame, which pickle (and tblib) recurse into: about 500 went over
#: the recursion limit, which made the worker die of a RecursionError, or the exception a
#: SerializationError
TRACEBACK_FRAMES = 100
_OUTER_FRAMES = 20


def _traceback_data(tb: types.TracebackType) -> tuple[dict, int]:
    """tblib's dict of a traceback of at most TRACEBACK_FRAMES frames, and how many of its
    frames were left out."""
    head = Traceback(tb)  # (built in a loop: any depth)
    frames = [head]
    while frames[-1].tb_next is not None:
        frames.append(frames[-1].tb_next)
    dropped = max(0, len(frames) - TRACEBACK_FRAMES)
    if dropped:
        frames[_OUTER_FRAMES - 1].tb_next = frames[_OUTER_FRAMES + dropped]
    return head.to_dict(), dropped


def _without_columns(code: types.CodeType) -> types.CodeType:
    """``code`` with its line only, no columns: location entries of kind 13 ("no
    columns", line delta 0), each for up to 8 code units (the format of Python 3.11 on)."""
    units = len(code.co_code) // 2
    return code.replace(co_linetable=bytes(
        b for start in range(0, units, 8)
        for b in (0x80 | 13 << 3 | min(8, units - start) - 1, 0)
    ))


#: the Pythons whose location table _without_columns writes (3.11 to 3.14); on a later
#: one tblib's own stub is used, carets and all, rather than a table it may read otherwise
_COLUMNS_KNOWN = (3, 11) <= sys.version_info[:2] <= (3, 14)
_TRACEBACK_STUB = (_without_columns(compile("raise __traceback_maker", "<string>", "exec"))
                   if _COLUMNS_KNOWN else None)


def _rebuilt_traceback(data: dict) -> types.TracebackType | None:
    """A remote traceback from tblib's dict, as tblib's ``as_traceback`` rebuilds it (each
    frame runs a stub ``raise`` under the remote frame's file, line and name), but with a
    stub that has no columns: Python 3.11+ took the stub's for the remote line's, and drew
    carets (^^^) under the wrong part of it (tblib issue #76).  Without, it draws none."""
    top = tb = None
    current = Traceback.from_dict(data)
    while current is not None:
        f_code = current.tb_frame.f_code
        code = _TRACEBACK_STUB.replace(co_firstlineno=current.tb_lineno,
                                       co_filename=f_code.co_filename, co_name=f_code.co_name)
        next_tb = next(_stub_frame(code, current.tb_frame.f_globals), None)
        if next_tb is not None:
            if top is None:
                top = next_tb
            if tb is not None:
                tb.tb_next = next_tb
            tb = next_tb
        current = current.tb_next
    return top


def _stub_frame(code: types.CodeType, f_globals: dict):
    """The traceback entry of the remote frame ``code`` stands for.  Run in a generator:
    a frame's ``f_back`` is its caller's, and a stub run here by a plain call had, up the
    chain, the manager thread's frames and their locals (the executor, the reply bodies of
    its turn), which whoever kept the exception kept too.  A suspended generator's frame
    has no caller: the chain ends there."""
    try:
        exec(code, dict(f_globals), {})  # noqa: S102 - our stub
    except NameError:  # (__traceback_maker: the frame is made)
        yield sys.exc_info()[2].tb_next


def _chainable(exc: BaseException | None, seen: set[int]) -> bool:
    return exc is not None and id(exc) not in seen and len(seen) < _CHAIN_LIMIT


class _Travelling:
    """Pickles an exception as its class, ``args`` and ``__dict__``, and rebuilds it without
    running a Python ``__init__`` again (one that reformats its message would do it twice),
    while the C-level ``__init__`` of its builtin base still sets ``SystemExit.code``,
    ``StopIteration.value``, ``OSError.errno`` and the like.  Classes with a ``__reduce__``
    of their own are pickled their own way."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __reduce__(self):
        exc = self.exc
        cls = type(exc)
        if cls.__reduce__ is not BaseException.__reduce__ or (
            cls.__reduce_ex__ is not BaseException.__reduce_ex__
        ):
            return (_Travelling, (exc,))
        return (_rebuild_exception, (cls, exc.args, _exception_state(exc)))


class _BuiltInReduced(_Travelling):
    """An exception whose class pickles it by a builtin's ``__reduce__`` (OSError's, which
    every OSError subclass inherits: ConnectionError, TimeoutError, FileNotFoundError;
    ImportError's), rebuilt from what that gives (OSError's errno, strerror and filename)
    without a Python ``__init__`` run: made again by calling its class, one whose
    ``__init__`` takes other arguments (``MissingInput(path, *, stage)``) failed, and came
    back a RemoteError, and one that writes its message from its argument wrote it twice,
    where an Exception subclass so written comes back as raised."""

    __slots__ = ()

    def __reduce__(self):
        exc = self.exc
        reduced = exc.__reduce__()
        state = _exception_state(exc)
        if len(reduced) > 2 and isinstance(reduced[2], dict):  # (ImportError's name, path)
            state.update(reduced[2])
        if isinstance(exc, OSError):  # (its fields, which its reduce leaves out of args
            # that are not OSError's own: urllib's HTTPError, whose filename is its url)
            for name in ("errno", "strerror", "filename", "filename2"):
                if getattr(exc, name) is not None:
                    state[name] = getattr(exc, name)
        return (_rebuild_exception, (type(exc), tuple(reduced[1]), state))


def _as_built_in_reduces(exc: BaseException) -> _BuiltInReduced | None:
    """``exc`` as a _BuiltInReduced, if its class pickles it by a builtin's ``__reduce__``
    (that makes it by calling the class) and so it survives pickling; else None."""
    cls = type(exc)
    for name in ("__reduce__", "__reduce_ex__"):
        owner = next((c for c in cls.__mro__ if name in c.__dict__), object)
        if owner.__module__ != "builtins":
            return None
    try:
        reduced = exc.__reduce__()
        if not (isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is cls
                and isinstance(reduced[1], tuple)):
            return None
        boxed = _BuiltInReduced(exc)
        pickle.loads(cloudpickle_dumps(boxed))
    except BaseException:  # noqa: BLE001 - as in _round_trips
        return None
    return boxed


def _exception_state(exc: BaseException) -> dict[str, Any]:
    """An exception's ``__dict__``, with the values of its class's ``__slots__`` (a
    ``@dataclass(slots=True)``'s fields), which come back without an ``__init__`` run:
    without them, ``exc.row`` raised AttributeError on the client, and so did its repr."""
    state = dict(getattr(exc, "__dict__", {}))
    for name in copyreg._slotnames(type(exc)):
        try:
            state[name] = object.__getattribute__(exc, name)
        except AttributeError:  # (a slot never set)
            pass
    # An AttributeError's or NameError's name: a field of the builtin, set apart from its
    # args (by keyword, or by Python as it raises it), came back None.  (Not an
    # AttributeError's obj: the object that lacked it, which need not pickle.)
    if isinstance(exc, AttributeError | NameError) and isinstance(
            getattr(type(exc), "name", None), _C_FIELDS) and isinstance(exc.name, str):
        state["name"] = exc.name
    return state


class _TravellingGroup(_Travelling):
    """A group pickled with ``members`` in place of its own (see _mended_group)."""

    __slots__ = ("members",)

    def __init__(self, exc: BaseExceptionGroup, members: list):
        super().__init__(exc)
        self.members = members

    def __reduce__(self):
        exc = self.exc
        return (_rebuild_exception, (type(exc), (exc.message, self.members),
                                     _exception_state(exc)))


class _AsMember:
    """A member of a group that pickle cannot make again by calling its class (an
    ``__init__`` with a keyword, or arguments its ``args`` do not hold): pickled as a
    JobFailed is, its class, ``args`` and ``__dict__``, with no ``__init__`` run."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __reduce__(self):
        exc = self.exc
        return (errors._rebuild, (type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))


def _mended_group(exc: BaseException, depth: int = 0) -> _TravellingGroup | None:
    """A group that does not survive pickling for want of some of its members, each of
    those sent as itself (_AsMember) where it can be, else as a RemoteError; a member that
    would come back as itself if raised alone had made the whole group a RemoteError.
    Also a group that does: a member pickle makes anew with another message is sent as
    itself (_same_message).  None for anything else, or a group that still does not
    survive.  A group among its members is mended so too (_InGroup)."""
    if not isinstance(exc, BaseExceptionGroup) or depth > _CHAIN_LIMIT:
        return None
    cls = type(exc)
    own_reduce = (cls.__reduce__ is not BaseException.__reduce__
                  or cls.__reduce_ex__ is not BaseException.__reduce_ex__)
    args = exc.args
    if own_reduce or len(args) != 2 or not isinstance(args[1], Sequence) or (
            tuple(args[1]) != exc.exceptions):
        return None  # (a group made with other arguments: pickled its own way)
    members: list = []
    for member in exc.exceptions:
        chosen = None
        inner = _mended_group(member, depth + 1)
        # (one pickled by OSError's __reduce__, whose __init__ takes other arguments: as
        # _BuiltInReduced makes it, not _AsMember, which left out its errno and filename)
        built_in = _as_built_in_reduces(member) if inner is None else None
        for candidate in ((_InGroup(inner),) if inner is not None else ()) + (member,) + (
                (_InGroup(built_in),) if built_in is not None else ()) + (_AsMember(member),):
            try:
                loaded = pickle.loads(cloudpickle_dumps(candidate))
            except BaseException:  # noqa: BLE001 - as in _round_trips
                continue
            if chosen is None:
                chosen = candidate
            if _same_message(member, loaded):
                chosen = candidate
                break
        members.append(chosen if chosen is not None else remote_error(member))
    group = _TravellingGroup(exc, members)
    try:
        pickle.loads(cloudpickle_dumps(group))
    except BaseException:  # noqa: BLE001
        return None
    return group


class _InGroup:
    """A group among a group's members, its own members mended (_mended_group): as pickle
    makes it, it was made by calling its class with them, each as pickle makes it.  Made
    as _rebuild_exception makes it, then taken out of its _Travelling.  (So too a member
    that is a _BuiltInReduced.)"""

    __slots__ = ("group",)

    def __init__(self, group: _Travelling):
        self.group = group

    def __reduce__(self):
        return (getattr, (self.group, "exc"))


def _same_message(exc: BaseException, loaded: BaseException) -> bool:
    """Whether ``loaded``, ``exc`` pickled and unpickled, says what it said.  Pickle makes
    an exception again by calling its class with its ``args``: one whose ``__init__``
    writes its message from its argument (``HTTP {status}``) wrote it twice, "HTTP HTTP
    404", as a member of a group (alone, it travels without its ``__init__``: _Travelling).
    A message that cannot be written: as pickle makes it."""
    try:
        return str(loaded) == str(exc)
    except BaseException:  # noqa: BLE001 - a __str__ that raises
        return True


def _rebuild_exception(cls: type[BaseException], args: tuple, state: dict) -> _Travelling:
    exc = cls.__new__(cls, *args)
    base = next(c for c in cls.__mro__ if c.__module__ == "builtins")
    try:
        base.__init__(exc, *args)
    except TypeError:
        exc.args = args
    slots = copyreg._slotnames(cls) if state else ()
    for name, value in state.items():
        if name in slots or isinstance(getattr(cls, name, None), _C_FIELDS):
            # (object's: past a frozen dataclass's __setattr__; a builtin's field, as
            # ImportError's name, held by the object, not its __dict__)
            object.__setattr__(exc, name, value)
        else:
            exc.__dict__[name] = value
    return _Travelling(exc)


#: the kinds of a builtin exception's own fields (ImportError.name, OSError.filename)
_C_FIELDS = (types.MemberDescriptorType, types.GetSetDescriptorType)


def _round_trips(exc: BaseException) -> bool:
    """Does the exception survive pickling (some pickle, then fail to unpickle)?"""
    try:  # (with the pickler that sends it: a class of __main__ with a cached_property)
        pickle.loads(cloudpickle_dumps(_Travelling(exc)))
        return True
    except BaseException:  # noqa: BLE001 - a __reduce__ that calls sys.exit() included
        return False


def prepare_exception(exc: BaseException) -> ExceptionBox:
    """Make an exception raised by user code safe to put in :func:`dump_outcomes`.  One
    that breaks even this (its inspection raises) travels as a :class:`RemoteError`."""
    try:
        return ExceptionBox(exc)
    except BaseException:  # noqa: BLE001 - the worker must live on, and say what happened
        try:
            return ExceptionBox(remote_error(exc))
        except BaseException:  # noqa: BLE001
            return ExceptionBox(errors.RemoteError(
                f"{type(exc).__module__}.{type(exc).__qualname__}",
                "<the exception could not be described>", "",
            ))


def dump_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its remote traceback and chained causes.

    An exception that cannot make the round trip is replaced by a :class:`RemoteError`
    carrying its type name, message and formatted traceback.
    """
    return cloudpickle_dumps(ExceptionBox(exc))


def remote_error(exc: BaseException) -> errors.RemoteError:
    tb = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001
        message = "<exception message could not be formatted>"
    err = errors.RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", message, tb)
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):  # (the task's, or a library's: shown as the exception's were)
        for note in notes:
            if isinstance(note, str):
                err.add_note(note)
    return err


def _unbox(value: Any) -> Any:
    return value.unbox() if isinstance(value, ExceptionBox) else value


def dump_outcomes(items: Iterable[tuple[str, Any]]) -> tuple[bytes, int, str | None]:
    """Pickle per-call outcomes, each on its own: a value that cannot be pickled here, or
    unpickled on the client, fails only its own call.

    Returns the payload, how many calls failed, and a summary of the first failure.
    """
    pieces, failed, reason = dump_outcome_pieces(items)
    return b"".join(pieces), failed, reason


#: a pickle of a list of bytes objects, written around them (protocol 4: PROTO, EMPTY_LIST,
#: MARK; each a BINBYTES8; APPENDS, STOP), so that no outcome is copied into the payload
_LIST_OPEN = b"\x80\x04]("
_BYTES8 = struct.Struct("<BQ")
_LIST_CLOSE = b"e."


def dump_outcome_pieces(items: Iterable[tuple[str, Any]]) -> tuple[list[bytes], int, str | None]:
    """As :func:`dump_outcomes`, the payload as pieces (see :func:`encode_pieces`): the
    pickle of the list of per-call pickles, built around them rather than copying them.
    (A task returning 1 GB needed 3 GB more in its worker to send it; now 1 GB more.)"""
    parts, failed, reason = _pickle_outcomes(items)
    pieces = [_LIST_OPEN]
    for part in parts:
        pieces += (_BYTES8.pack(0x8E, len(part)), part)
    pieces.append(_LIST_CLOSE)
    return pieces, failed, reason


def _pickle_outcomes(items: Iterable[tuple[str, Any]]) -> tuple[list[bytes], int, str | None]:
    parts: list[bytes] = []
    failed, reason = 0, None
    plain = _PLAIN
    for tag, value in items:
        try:
            if tag == OK and type(value) in plain:  # None, a number, a string: as cloudpickle, faster
                parts.append(pickle.dumps((tag, value), 5))
                continue
            parts.append(cloudpickle_dumps((tag, value)))
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a __reduce__ too: the
            # worker must not die of a value it was only asked to send
            what = "result" if tag == OK else "exception"
            err = errors.SerializationError(
                f"the {what} of the call ({type(value).__module__}."
                f"{type(value).__qualname__}) could not be pickled to send back: {exc}"
            )
            tag, value = "raise", ExceptionBox(err)
            parts.append(cloudpickle.dumps((tag, value)))
        if tag != OK:
            failed += 1
            if reason is None:
                reason = summary(value.original if isinstance(value, ExceptionBox) else value)
    return parts, failed, reason


def summary(exc: BaseException) -> str:
    """``Type: message``, for job records (at most 500 characters; a lone surrogate,
    which neither UTF-8 nor a job table holds, is spelled out as ``\\udcff``)."""
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001 - a __str__ that raises SystemExit, too
        text = ""
    name = type(exc).__qualname__
    # cut before it is spelled out (which only lengthens it): the message of an exception
    # holding a big value (its repr: hundreds of MB) was copied twice to keep 500 of it
    line = f"{name}: {text[:500]}" if text else name
    return line.encode("utf-8", "backslashreplace").decode("utf-8")[:500]


def result_header(job_id: str, outcome: str, n: int, **fields: Any) -> dict[str, Any]:
    return {"kind": "result", "job_id": job_id, "outcome": outcome, "n": n, **fields}


def failure_reason(error_type: str, message: str) -> str:
    """A node-written failure as its job record's reason: ``Type: message``, as
    :func:`summary` writes the reason of an exception a task raised (a lone surrogate
    spelled out too: a file name that is not UTF-8, say)."""
    line = f"{error_type}: {message}"
    return line.encode("utf-8", "backslashreplace").decode("utf-8")[:500]


def failure(
    job_id: str,
    n: int,
    error_type: str,
    message: str,
    *,
    stdout: bytes = b"",
    stderr: bytes = b"",
    **details: Any,
) -> bytes:
    """A result envelope written by the node (which never pickles user objects)."""
    if error_type not in FAILURE_TYPES:
        raise ValueError(f"unknown failure type {error_type!r}")
    header = result_header(job_id, FAILED, n, error={"type": error_type, "message": message, **details})
    return encode(header, {"stdout": stdout, "stderr": stderr})


def outcomes(env: Envelope) -> list[tuple[bool, Any]]:
    """Turn a result envelope into ``[(ok, value_or_exception), ...]``, one per call.

    Runs on the client: this is where results are unpickled.
    """
    h = env.header
    n = h["n"]
    job_id = h["job_id"]
    if h["outcome"] == FAILED:
        err = h.get("error")
        err = err if isinstance(err, dict) else {}
        cls = FAILURE_TYPES.get(err.get("type"), errors.JobFailed)
        exc = cls(err.get("message", "the task failed"), job_id=job_id)
        for key in ("exitcode", "signal", "handle"):
            if key in err:
                setattr(exc, key, err[key])
        return [(False, exc)] * n
    payload = env.sections.get("payload", b"")
    python = h.get("python", PYTHON)  # (another one: a worker of another Python version)
    what = f"the result of job {job_id}" if python != PYTHON else ""
    # BaseException: unpickling runs the remote objects' own code (a ``__reduce__`` that
    # calls sys.exit(), a module that raises SystemExit on import); this runs on the
    # executor's manager thread, which no KeyboardInterrupt of the user's reaches
    if h["outcome"] == ERROR:
        if python != PYTHON and (err := version_mismatch(python, (payload,), what, "on the client")):
            return [(False, err)] * n
        try:
            return [(False, _unbox(_load_result(payload)))] * n
        except BaseException as exc:  # noqa: BLE001 - cannot unpickle here: say so, keep the cause
            return [(False, _unpickle_error(job_id, exc, payload, raised=True))] * n
    try:
        parts = _outcome_parts(payload)
    except BaseException as exc:  # noqa: BLE001
        return [(False, _unpickle_error(job_id, exc))] * n
    out: list[tuple[bool, Any]] = []
    for part in parts:
        if type(part) is tuple:  # the first layout of version 1 (the results of an enclave's
            # earliest nodes): the payload was one pickle of the (tag, value) list
            tag, value = part
            out.append((tag == OK, _unbox(value)))
            continue
        if python != PYTHON and (err := version_mismatch(python, (part,), what, "on the client")):
            out.append((False, err))  # fails its own call only
            continue
        try:
            tag, value = _load_result(part)
            out.append((tag == OK, _unbox(value)))
        except BaseException as exc:  # noqa: BLE001 - fails its own call only
            out.append((False, _unpickle_error(job_id, exc, part)))
    return out


def _outcome_parts(payload: bytes | memoryview) -> list[Any]:
    """The per-call pickles of an "ok" payload: views of it, where it is laid out as
    :func:`dump_outcome_pieces` writes it (unpickled, each was copied out of it, and a big
    result was held once more); else as pickle reads it (a list of bytes: plain pickle,
    in any version; or the first layout, of tuples)."""
    view = memoryview(payload)
    parts: list[Any] = []
    pos, end = len(_LIST_OPEN), len(view) - len(_LIST_CLOSE)
    if view[:pos] == _LIST_OPEN and view[end:] == _LIST_CLOSE:
        while pos < end and view[pos] == 0x8E and pos + _BYTES8.size <= end:
            (n,) = struct.unpack_from("<Q", view, pos + 1)
            pos += _BYTES8.size
            parts.append(view[pos : pos + n])
            pos += n
        if pos == end:
            return parts
    return pickle.loads(payload)


def _unpickle_error(job_id: str, exc: BaseException, data: bytes = b"",
                    raised: bool = False) -> BaseException:
    """What a call whose outcome ``data`` (a ``(tag, value)``; ``raised``: a bare
    exception box) could not be unpickled raises: a :class:`RemoteError` for an exception
    the task raised whose class the client cannot import (a package installed on the node
    only, by ``requirements``), which had hidden its message and traceback; else a
    SerializationError."""
    stand_in = _salvage(data, raised, exc)
    if stand_in is not None:
        return stand_in
    err = errors.SerializationError(
        f"the result of job {job_id} could not be unpickled on the client: "
        f"{type(exc).__name__}: {exc}"
    )
    err.__cause__ = exc
    return err


#: in a pickle, cloudpickle's calls that make a class sent by value (see _KeepingClasses)
_SKELETONS = re.compile(rb"_make_skeleton_(?:class|enum)")
_CP = cloudpickle.cloudpickle
#: those calls, each with where its class's tracker id is among its arguments
_SKELETON_CALLS = tuple(
    (f, f.__code__.co_varnames.index("class_tracker_id"))
    for f in (getattr(_CP, "_make_skeleton_class", None), getattr(_CP, "_make_skeleton_enum", None))
    if isinstance(f, types.FunctionType) and "class_tracker_id" in f.__code__.co_varnames
)


def _load_result(data: bytes | memoryview) -> Any:
    """``pickle.loads`` of an outcome a worker sent, on the client: with _KeepingClasses
    when it holds a class sent by value that this process may have already (cloudpickle
    tracks those: of ``__main__``, sent to the node and back)."""
    tracked = getattr(_CP, "_DYNAMIC_CLASS_TRACKER_BY_ID", None)
    if not tracked or _SKELETONS.search(data) is None:  # (no class sent by value: most)
        return pickle.loads(data)
    return _KeepingClasses(data).load()


class _KeepingClasses(pickle.Unpickler):
    """Unpickles leaving this process's own classes as they are.  A class of ``__main__``
    comes back by value as the client's own (cloudpickle finds it by its tracker id), but
    cloudpickle then set on it the worker's copies of its attributes: its methods, with a
    copy of the globals they use as they were at submit (the client's own ``Model()``
    then read a stale ``SCALE``), and what a task set on the class (a class attribute)
    replaced the client's.  A class it makes anew (one a task defined) is set up whole."""

    def __init__(self, data: bytes | memoryview):
        super().__init__(io.BytesIO(data))
        self._kept: set[int] = set()  # ids of the classes found here already

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        for make, arg in _SKELETON_CALLS:  # (by identity: what is found may be unhashable)
            if found is make:
                return self._skeleton(make, arg)
        if found is getattr(_CP, "_class_setstate", None):
            return self._setstate(found)
        return found

    def _skeleton(self, make: Callable, arg: int) -> Callable:
        def skeleton(*args):
            tracked = _CP._DYNAMIC_CLASS_TRACKER_BY_ID
            known = tracked.get(args[arg]) if arg < len(args) and args[arg] is not None else None
            cls = make(*args)
            if known is not None and cls is known:
                self._kept.add(id(cls))
            return cls

        return skeleton

    def _setstate(self, setstate: Callable) -> Callable:
        def keep(obj, state):
            return obj if id(obj) in self._kept else setstate(obj, state)

        return keep


class _Missing(Exception):
    """The base of the stand-ins for classes the client cannot import (see _salvage)."""

    def __repr__(self) -> str:  # (held by an exception: in its message, as object's;
        # one made with arguments, an exception's, as an exception's)
        if self.args:
            return super().__repr__()
        return f"<{type(self).__module__}.{type(self).__qualname__} object>"

    def __setstate__(self, state) -> None:
        # whatever state the original pickled (an object of a class with __slots__, a
        # @dataclass(slots=True)'s: (None, {slot: value}), which an exception's
        # __setstate__ refused, "state is not a dictionary": a SerializationError again)
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update(part)


class _Lenient(_KeepingClasses):
    """Unpickles with a stand-in (a subclass of _Missing, named as the original) for any
    class or function that cannot be imported here; ``made`` holds them."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.made: set[type] = set()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            stand_in = type(name, (_Missing,), {"__module__": module, "__qualname__": name})
            self.made.add(stand_in)
            return stand_in


def _salvage(data: bytes, raised: bool, why: BaseException) -> BaseException | None:
    """The exception an outcome holds, loaded with stand-ins for the exception classes that
    cannot be imported here (it, or ones in its chain), each one made a RemoteError with
    its type name, message and remote traceback.  None when the outcome is not a raised
    exception, or a stand-in is anything else (an argument of an exception, a value: no
    use as one)."""
    if not isinstance(why, ImportError | AttributeError):
        return None
    try:
        lenient = _Lenient(data)
        loaded = lenient.load()
        box = loaded if raised else loaded[1] if loaded[0] != OK else None
        if not isinstance(box, ExceptionBox):
            return None
        replaced: set[type] = set()
        exc = _without_stand_ins(box.unbox(), {}, replaced, why, lenient.made)
    except BaseException:  # noqa: BLE001 - no better than the SerializationError, then
        return None
    return exc if lenient.made and lenient.made <= replaced else None


def _without_stand_ins(exc: BaseException, done: dict[int, BaseException],
                       replaced: set[type], why: BaseException,
                       made: set[type] = frozenset()) -> BaseException:
    """``exc``, its chain and its members (a group's), with a RemoteError in place of each
    stand-in (its class added to ``replaced``), and of each exception that holds one of
    ``made`` (the stand-ins) in its args or attributes (those classes added too).
    ``done``: what each exception met is made, so that one met twice (a cause that is the
    context too, a TaskGroup's member that is its context) is one exception there too, not
    a stand-in left in the second place."""
    if id(exc) in done:
        return done[id(exc)]
    done[id(exc)] = original = exc  # (a cycle back to it meets it as it is)
    for attr in ("__cause__", "__context__"):
        link = getattr(exc, attr)
        if link is not None:
            object.__setattr__(exc, attr, _without_stand_ins(link, done, replaced, why, made))
    if isinstance(exc, BaseExceptionGroup) and not isinstance(exc, _Missing):
        members = [_without_stand_ins(m, done, replaced, why, made) for m in exc.exceptions]
        if any(new is not old for new, old in zip(members, exc.exceptions, strict=True)):
            exc = done[id(original)] = _regrouped(exc, members)
    if isinstance(exc, _Missing):
        replaced.add(type(exc))
        note = f"kotta: its class {type(exc).__module__}.{type(exc).__qualname__} cannot be imported on the client"
    else:
        # An exception of a class the client has, holding an object of one it has not
        # (``ValueError(msg, row)``, a row of a package only the node has): the whole
        # outcome was a SerializationError, which named nothing the task raised
        held = _held_stand_ins(exc, made)
        if not held:
            return exc
        replaced.update(held)
        names = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in held))
        note = f"kotta: it holds an object of {names}, whose class cannot be imported on the client"
    err = remote_error(exc).with_traceback(exc.__traceback__)
    err.__cause__, err.__context__ = exc.__cause__, exc.__context__
    err.__suppress_context__ = exc.__suppress_context__
    err.add_note(f"{note} ({type(why).__name__}: {why})")
    done[id(original)] = err
    return err


def _held_stand_ins(exc: BaseException, made: set[type], limit: int = 10_000) -> set[type]:
    """The stand-ins among ``made`` that ``exc`` holds, in its args (a group's message
    only: its members are looked at as such) or attributes, in containers or objects'
    attributes there (at most ``limit`` objects looked at); not in an exception it holds,
    which, a stand-in itself or not, has an args of its own."""
    if not made:
        return set()
    args = exc.args[:1] if isinstance(exc, BaseExceptionGroup) else exc.args
    todo = [*args, *getattr(exc, "__dict__", {}).values()]
    held: set[type] = set()
    seen: set[int] = set()
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        cls = obj if isinstance(obj, type) else type(obj)
        if cls in made:
            held.add(cls)
        elif isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            todo += obj
        elif not isinstance(obj, type | BaseException) and isinstance(
                getattr(obj, "__dict__", None), dict):
            todo += obj.__dict__.values()
    return held


def _regrouped(group: BaseExceptionGroup, members: list) -> BaseExceptionGroup:
    """``group`` with ``members`` (RemoteErrors in place of stand-ins: a TaskGroup's
    failures of a package the node only has had made its result a SerializationError),
    its traceback, chain and notes kept (``derive`` keeps none of them)."""
    new = _rebuild_exception(type(group), (group.message, members),
                             dict(getattr(group, "__dict__", {}))).exc
    new.__traceback__ = group.__traceback__
    new.__cause__, new.__context__ = group.__cause__, group.__context__
    new.__suppress_context__ = group.__suppress_context__
    return new
