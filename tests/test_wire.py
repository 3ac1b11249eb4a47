"""The wire format (kotta_executor.wire): envelope framing, tasks, results and errors."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import operator
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kotta_executor import errors, wire
from kotta_executor.wire import Envelope

FAST = settings(
    max_examples=200,
    deadline=None,
    # the autouse $KOTTA_HOME fixture is function scoped; these tests never touch it
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
#: for properties over whole generated envelopes, which are slower to draw
ENVELOPES = settings(FAST, max_examples=100)

JOB_ID = "0123456789abcdef0123456789abcdef"
OTHER_JOB_ID = "fedcba9876543210fedcba9876543210"
PREFIX = struct.Struct(">5sBI")


def frame(
    raw_header: bytes, rest: bytes = b"", *, magic: bytes = b"KOTTA", version: int = 1
) -> bytes:
    """An envelope built by hand around raw header bytes (no validation at all)."""
    return PREFIX.pack(magic, version, len(raw_header)) + raw_header + rest


def frame_json(header: Any, rest: bytes = b"") -> bytes:
    return frame(json.dumps(header).encode(), rest)


def task_fields(**overrides: Any) -> dict[str, Any]:
    fields = {
        "kind": "task",
        "job_id": JOB_ID,
        "owner": "alice",
        "client": "c0ffee00c0ffee00",
        "queue": "test",
        "walltime": 300.0,
        "created": 1700000000.5,
        "fn": "tests.tasks.square",
        "n": 1,
    }
    fields.update(overrides)
    return fields


def result_fields(**overrides: Any) -> dict[str, Any]:
    fields = {"kind": "result", "job_id": JOB_ID, "outcome": "ok", "n": 1}
    fields.update(overrides)
    return fields


def result_envelope(
    payload: bytes, *, n: int, outcome: str = "ok", job_id: str = JOB_ID
) -> Envelope:
    """What the client sees: a result envelope that went through the wire."""
    return wire.decode(wire.encode(wire.result_header(job_id, outcome, n), {"payload": payload}))


# =========================================================================== strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)
job_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
numbers = st.integers(min_value=-(2**53), max_value=2**53) | st.floats(
    allow_nan=False, allow_infinity=False
)
counts = st.integers(min_value=1, max_value=10**9)
walltimes = st.integers(min_value=1, max_value=2**53) | st.floats(
    min_value=1e-9, allow_nan=False, allow_infinity=False
)
# (and the optional fields decode checks: an extra "python": None, drawn now and then,
# failed the round trip with "field 'python' must be a Python version")
RESERVED = {"kind", "sections", *wire._TASK_FIELDS, *wire._RESULT_FIELDS,
            "python", "requirements", "max_tasks_per_child"}
extra_fields = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in RESERVED), json_values, max_size=2
)

task_headers = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {
            "kind": st.just("task"),
            "job_id": job_ids,
            "owner": st.text(max_size=8),
            "client": st.text(max_size=8),
            "queue": st.text(max_size=8),
            "walltime": walltimes,
            "created": numbers,
            "fn": st.text(max_size=16),
            "n": counts,
        }
    ),
    extra_fields,
)
result_headers = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {
            "kind": st.just("result"),
            "job_id": job_ids,
            "outcome": st.sampled_from(wire.OUTCOMES),
            "n": counts,
        }
    ),
    extra_fields,
)
headers = task_headers | result_headers
sections_st = st.dictionaries(
    st.text(max_size=10).filter(lambda name: name != wire.MAC_SECTION),  # "mac" is reserved
    st.binary(max_size=64),
    max_size=4,
)


@st.composite
def valid_envelopes(draw: st.DrawFn) -> bytes:
    return wire.encode(draw(headers), draw(sections_st))


def decode_or_envelope_error(data: bytes) -> Envelope | None:
    """decode(), allowing only an Envelope or EnvelopeError as its outcome."""
    try:
        env = wire.decode(data)
    except errors.EnvelopeError as exc:
        assert str(exc)
        return None
    assert isinstance(env, Envelope)
    assert env.kind in ("task", "result")
    return env


# =========================================================================== framing


@ENVELOPES
@given(headers, sections_st)
def test_encode_decode_round_trip(header: dict[str, Any], sections: dict[str, bytes]) -> None:
    header_copy, sections_copy = json.loads(json.dumps(header)), dict(sections)
    data = wire.encode(header, sections)
    assert header == header_copy, "encode() modified the header"
    assert sections == sections_copy, "encode() modified the sections"

    # framing: magic, version, header length, then the header and the sections back to back
    magic, version, hlen = PREFIX.unpack_from(data)
    assert (magic, version) == (b"KOTTA", 2)
    raw = json.loads(data[PREFIX.size : PREFIX.size + hlen])
    assert raw["sections"] == [[name, len(body)] for name, body in sections.items() if body]
    assert len(data) == PREFIX.size + hlen + sum(len(body) for body in sections.values())

    env = wire.decode(data)
    assert env.header == header
    # empty sections are not sent; the others keep their order
    expected = {name: body for name, body in sections.items() if body}
    assert env.sections == expected
    assert list(env.sections) == list(expected)
    assert env.kind == header["kind"]
    assert env.job_id == header["job_id"]
    # the encoding is canonical: re-encoding what was decoded gives the same bytes
    assert wire.encode(env.header, env.sections) == data


def test_decode_accepts_bytes_like() -> None:
    data = wire.encode(result_fields(), {"stdout": b"out"})
    for buf in (data, bytearray(data), memoryview(data)):
        env = wire.decode(buf)
        assert env.sections == {"stdout": b"out"}
        assert isinstance(env.sections["stdout"], bytes)


def test_envelope_text() -> None:
    env = wire.decode(
        wire.encode(result_fields(), {"stdout": "h\u00e9llo\n".encode(), "stderr": b"\xff"})
    )
    assert env.text("stdout") == "h\u00e9llo\n"
    assert env.text("stderr") == "\ufffd"
    assert env.text("payload") == ""


@FAST
@given(st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_raises_only_envelope_error(data: bytes) -> None:
    decode_or_envelope_error(data)


@FAST
@given(st.binary(max_size=200))
def test_decode_after_a_valid_prefix_raises_only_envelope_error(rest: bytes) -> None:
    decode_or_envelope_error(b"KOTTA\x01" + rest)


@FAST
@given(st.binary(max_size=200), st.binary(max_size=50))
def test_decode_of_arbitrary_header_bytes_raises_only_envelope_error(
    raw: bytes, rest: bytes
) -> None:
    decode_or_envelope_error(frame(raw, rest))


@ENVELOPES
@given(
    headers,
    st.sampled_from(sorted(RESERVED)),
    st.data(),
)
def test_decode_of_a_header_with_a_garbled_field_raises_only_envelope_error(
    header: dict[str, Any], name: str, data: st.DataObject
) -> None:
    value = data.draw(json_values, label="value")
    garbled = {**header, name: value}
    if name != "sections":
        garbled["sections"] = []
    env = decode_or_envelope_error(frame_json(garbled))
    if env is not None:
        assert env.header == {k: v for k, v in garbled.items() if k != "sections"}


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """A valid envelope and a copy of it with one byte replaced, dropped, or added."""
    data = draw(valid_envelopes())
    op = draw(st.sampled_from(["replace", "delete", "insert"]))
    pos = draw(st.integers(min_value=0, max_value=len(data) - 1))
    if op == "replace":
        byte = draw(st.integers(0, 255).filter(lambda b: b != data[pos]))
        mutated = data[:pos] + bytes([byte]) + data[pos + 1 :]
    elif op == "delete":
        mutated = data[:pos] + data[pos + 1 :]
    else:
        mutated = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos:]
    return data, mutated, op


@ENVELOPES
@given(mutations())
def test_decode_of_a_mutated_envelope_raises_only_envelope_error(
    case: tuple[bytes, bytes, str],
) -> None:
    _, mutated, _ = case
    decode_or_envelope_error(mutated)


@ENVELOPES
@given(valid_envelopes(), st.data())
def test_decode_of_a_truncated_or_extended_envelope_raises_envelope_error(
    data: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(min_value=0, max_value=len(data) - 1), label="cut")
    with pytest.raises(errors.EnvelopeError):
        wire.decode(data[:cut])
    extra = draw.draw(st.binary(min_size=1, max_size=50), label="extra")
    with pytest.raises(errors.EnvelopeError, match=rf"{len(extra)} trailing bytes"):
        wire.decode(data + extra)


def _valid_result(**overrides: Any) -> bytes:
    return wire.encode(result_fields(**overrides), {"payload": b"0123456789"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", r"not a kotta envelope: only 0 bytes", id="empty"),
        pytest.param(
            b"KOTTA\x01\x00\x00", r"not a kotta envelope: only 8 bytes", id="short-prefix"
        ),
        pytest.param(b"KOTTB" + _valid_result()[5:], r"bad magic bytes", id="wrong-magic"),
        pytest.param(b"\x00" * 64, r"bad magic bytes", id="zeros"),
        pytest.param(
            b"KOTTA\x03" + _valid_result()[6:], r"unsupported envelope version 3", id="version-3"
        ),
        pytest.param(
            b"KOTTA\x00" + _valid_result()[6:], r"unsupported envelope version 0", id="version-0"
        ),
        pytest.param(
            _valid_result()[:20],
            r"truncated kotta envelope: header runs past the end",
            id="truncated-header",
        ),
        pytest.param(
            PREFIX.pack(b"KOTTA", 1, wire.MAX_HEADER + 1) + b"{}",
            rf"header of {wire.MAX_HEADER + 1} bytes is over the limit of {wire.MAX_HEADER}",
            id="oversized-header-length",
        ),
        pytest.param(
            _valid_result()[:-1], r"section 'payload' is cut short", id="truncated-section"
        ),
        pytest.param(_valid_result() + b"xyz", r"3 trailing bytes", id="trailing-bytes"),
        pytest.param(frame(b"{not json"), r"header is not JSON", id="header-not-json"),
        pytest.param(frame(b"\xff\xfe\x00"), r"header is not JSON", id="header-not-utf8"),
        pytest.param(frame(b"[1, 2]"), r"header is not an object", id="header-a-list"),
        pytest.param(frame(b"null"), r"header is not an object", id="header-null"),
        pytest.param(frame_json({"sections": []}), r"unknown envelope kind None", id="no-kind"),
        pytest.param(
            frame_json({"kind": "bogus", "sections": []}),
            r"unknown envelope kind 'bogus'",
            id="unknown-kind",
        ),
        pytest.param(
            frame_json({"kind": "Task", "sections": []}),
            r"unknown envelope kind 'Task'",
            id="kind-case",
        ),
        pytest.param(
            frame_json({**result_fields(job_id="xyz"), "sections": []}),
            r"result envelope has a malformed job id",
            id="short-job-id",
        ),
        pytest.param(
            frame_json({**task_fields(job_id=JOB_ID.upper()), "sections": []}),
            r"task envelope has a malformed job id",
            id="upper-case-job-id",
        ),
        pytest.param(
            frame_json({**result_fields(job_id=JOB_ID + "0"), "sections": []}),
            r"malformed job id",
            id="long-job-id",
        ),
        pytest.param(
            frame_json({**result_fields(job_id=17), "sections": []}),
            r"field 'job_id' is missing or malformed",
            id="numeric-job-id",
        ),
        pytest.param(
            frame_json({**result_fields(outcome="maybe"), "sections": []}),
            r"unknown result outcome 'maybe'",
            id="unknown-outcome",
        ),
        pytest.param(
            frame_json({**result_fields(n=True), "sections": []}),
            r"result envelope field 'n' is missing or malformed",
            id="bool-n",
        ),
        pytest.param(
            frame_json({**result_fields(n=1.0), "sections": []}),
            r"field 'n' is missing or malformed",
            id="float-n",
        ),
        pytest.param(
            frame_json({k: v for k, v in task_fields().items() if k != "owner"} | {"sections": []}),
            r"task envelope field 'owner' is missing or malformed",
            id="missing-owner",
        ),
        pytest.param(
            frame_json({**task_fields(walltime="5"), "sections": []}),
            r"field 'walltime' is missing or malformed",
            id="string-walltime",
        ),
        pytest.param(
            frame_json({**task_fields(walltime=False), "sections": []}),
            r"field 'walltime' is missing or malformed",
            id="bool-walltime",
        ),
        pytest.param(
            frame_json({**task_fields(walltime=-1.0), "sections": []}),
            r"walltime must be positive and finite",
            id="negative-walltime",
        ),
        pytest.param(
            frame_json({**task_fields(n=0), "sections": []}),
            r"at least one call",
            id="no-calls",
        ),
        pytest.param(
            frame_json(result_fields()), r"section table is malformed", id="no-section-table"
        ),
        pytest.param(
            frame_json({**result_fields(), "sections": [["payload", -1]]}),
            r"section table is malformed",
            id="negative-section-length",
        ),
        pytest.param(
            frame_json({**result_fields(), "sections": [["payload", True]]}),
            r"section table is malformed",
            id="bool-section-length",
        ),
        pytest.param(
            frame_json({**result_fields(), "sections": [["payload"]]}),
            r"section table is malformed",
            id="short-section-entry",
        ),
        pytest.param(
            frame_json({**result_fields(), "sections": {"payload": 1}}),
            r"section table is malformed",
            id="section-table-a-dict",
        ),
        pytest.param(
            frame_json({**result_fields(), "sections": [[1, 1]]}, b"x"),
            r"section table is malformed",
            id="numeric-section-name",
        ),
    ],
)
def test_decode_rejects_with_a_message_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(errors.EnvelopeError, match=message) as info:
        wire.decode(data)
    assert isinstance(info.value, ValueError)


def test_unknown_version_says_which_version_is_read() -> None:
    with pytest.raises(errors.EnvelopeError, match=r"this kotta-executor reads 1"):
        wire.decode(b"KOTTA\x07" + _valid_result()[6:])


def test_a_section_cut_short_is_named() -> None:
    data = wire.encode(
        result_fields(), {"payload": b"p" * 5, "stdout": b"o" * 5, "stderr": b"e" * 5}
    )
    with pytest.raises(errors.EnvelopeError, match=r"section 'stderr' is cut short"):
        wire.decode(data[:-1])
    with pytest.raises(errors.EnvelopeError, match=r"section 'stdout' is cut short"):
        wire.decode(data[:-6])


# Regression tests: each of these once escaped decode() as another exception type (or, for
# the job id, was accepted).


@pytest.mark.parametrize("kind", [[], {}, ["task"], {"task": 1}, 1, None, True], ids=repr)
def test_decode_rejects_a_kind_that_is_not_a_string(kind: Any) -> None:
    """An unhashable kind used to be looked up in a dict: TypeError."""
    with pytest.raises(errors.EnvelopeError, match="unknown envelope kind"):
        wire.decode(frame_json({**task_fields(kind=kind), "sections": []}))


def test_decode_rejects_a_deeply_nested_header() -> None:
    """Nesting within MAX_HEADER used to raise RecursionError from the JSON parser."""
    depth = 100_000
    with pytest.raises(errors.EnvelopeError, match="header is not JSON"):
        wire.decode(frame(b"[" * depth + b"]" * depth))


def test_decode_rejects_a_header_with_a_huge_integer() -> None:
    """An integer over sys.get_int_max_str_digits() digits used to raise a plain ValueError."""
    raw = json.dumps({**result_fields(), "sections": []}).replace('"n": 1', '"n": ' + "1" * 5000)
    with pytest.raises(errors.EnvelopeError, match="header is not JSON"):
        wire.decode(frame(raw.encode()))


@pytest.mark.parametrize("suffix", ["\n", "\r", " ", "\x00"], ids=repr)
def test_decode_rejects_a_job_id_with_a_trailing_character(suffix: str) -> None:
    """A '$'-anchored pattern used to accept '<32 hex digits>\\n' as a job id."""
    with pytest.raises(errors.EnvelopeError, match="malformed job id"):
        wire.decode(frame_json({**result_fields(job_id=JOB_ID + suffix), "sections": []}))


def test_is_job_id() -> None:
    assert wire.is_job_id(JOB_ID)
    for bad in ("", JOB_ID + "\n", JOB_ID.upper(), JOB_ID[:-1], " " + JOB_ID, JOB_ID + "0"):
        assert not wire.is_job_id(bad), repr(bad)


def test_task_header_validates_its_fields() -> None:
    fields = {k: v for k, v in task_fields().items() if k != "kind"}
    assert wire.task_header(**fields) == task_fields()
    refs = {"args": "args-" + JOB_ID}
    assert wire.task_header(**fields, refs=refs)["refs"] == refs
    with pytest.raises(errors.EnvelopeError, match="malformed job id"):
        wire.task_header(**{**fields, "job_id": "nope"})
    with pytest.raises(errors.EnvelopeError, match="'n' is missing or malformed"):
        wire.task_header(**{k: v for k, v in fields.items() if k != "n"})


# =========================================================================== pinned envelopes
#
# These bytes were produced once by wire.encode / wire.failure (envelope version 1) and pasted
# here.  Version 2 (signed tasks) kept the layout: it still reads them, and writes the same
# bytes but for the version byte (``as_v2``).  If one of these tests fails, the wire format changed: nodes and clients of different
# versions may no longer understand each other.  Changing it must be a conscious decision
# (bump wire.VERSION, keep reading the old version or document the break), never a side effect.

PINNED_TASK = (
    b'KOTTA\x01\x00\x00\x00\xdc{"client":"c0ffee00c0ffee00","created":1700000000.5,'
    b'"fn":"_operator.add","job_id":"0123456789abcdef0123456789abcdef","kind":"task","n":2,'
    b'"owner":"alice","queue":"test","sections":[["fn",32],["args",36]],"walltime":300.0}'
    b"\x80\x05\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\t_operator\x94\x8c\x03add\x94\x93\x94."
    b"\x80\x05\x95\x19\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02\x86\x94}\x94\x86\x94K\x03K"
    b"\x04\x86\x94}\x94\x86\x94e."
)
PINNED_TASK_HEADER = {
    "client": "c0ffee00c0ffee00",
    "created": 1700000000.5,
    "fn": "_operator.add",
    "job_id": "0123456789abcdef0123456789abcdef",
    "kind": "task",
    "n": 2,
    "owner": "alice",
    "queue": "test",
    "walltime": 300.0,
}
# pickle.dumps(operator.add, protocol=5)
PINNED_TASK_FN = (
    b"\x80\x05\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\t_operator\x94\x8c\x03add\x94\x93\x94."
)
# pickle.dumps([((1, 2), {}), ((3, 4), {})], protocol=5)
PINNED_TASK_ARGS = (
    b"\x80\x05\x95\x19\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02\x86\x94}\x94\x86\x94K\x03K"
    b"\x04\x86\x94}\x94\x86\x94e."
)

# A task whose args section was too large to travel inline: it went to a blob ("refs").
PINNED_TASK_WITH_REFS = (
    b'KOTTA\x01\x00\x00\x01\x08{"client":"c0ffee00c0ffee00","created":1700000000.5,'
    b'"fn":"_operator.add","job_id":"00112233445566778899aabbccddeeff","kind":"task","n":1,'
    b'"owner":"alice","queue":"test","refs":{"args":"args-00112233445566778899aabbccddeeff"},'
    b'"sections":[["fn",32]],"walltime":300.0}'
    b"\x80\x05\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\t_operator\x94\x8c\x03add\x94\x93\x94."
)
PINNED_TASK_WITH_REFS_HEADER = {
    **PINNED_TASK_HEADER,
    "job_id": "00112233445566778899aabbccddeeff",
    "n": 1,
    "refs": {"args": "args-00112233445566778899aabbccddeeff"},
}

PINNED_RESULT_OK = (
    b'KOTTA\x01\x00\x00\x00\xb3{"failed":0,"job_id":"fedcba9876543210fedcba9876543210","kind":'
    b'"result","n":2,"outcome":"ok","sections":[["payload",64],["stdout",6],["stderr",5]],"usa'
    b'ge":{"cpu":0.25,"wall":0.5}}\x80\x05\x955\x00\x00\x00\x00\x00\x00\x00]\x94(C\x15\x80\x05'
    b'\x95\n\x00\x00\x00\x00\x00\x00\x00\x8c\x02ok\x94K\x03\x86\x94.\x94C\x15\x80\x05\x95\n'
    b'\x00\x00\x00\x00\x00\x00\x00\x8c\x02ok\x94K\x07\x86\x94.\x94e.hello\nwarn\n'
)
PINNED_RESULT_OK_HEADER = {
    "failed": 0,
    "job_id": "fedcba9876543210fedcba9876543210",
    "kind": "result",
    "n": 2,
    "outcome": "ok",
    "usage": {"cpu": 0.25, "wall": 0.5},
}
# pickle.dumps([pickle.dumps(("ok", 3)), pickle.dumps(("ok", 7))]), protocol 5: each call apart
PINNED_RESULT_OK_PAYLOAD = (
    b'\x80\x05\x955\x00\x00\x00\x00\x00\x00\x00]\x94(C\x15\x80\x05\x95\n\x00\x00\x00\x00\x00'
    b'\x00\x00\x8c\x02ok\x94K\x03\x86\x94.\x94C\x15\x80\x05\x95\n\x00\x00\x00\x00\x00\x00\x00'
    b'\x8c\x02ok\x94K\x07\x86\x94.\x94e.'
)

PINNED_RESULT_FAILED = (
    b'KOTTA\x01\x00\x00\x00\xd5{"error":{"exitcode":-9,"message":"the worker was killed by '
    b'signal 9","signal":9,"type":"WorkerDied"},"job_id":"fedcba9876543210fedcba9876543210",'
    b'"kind":"result","n":1,"outcome":"failed","sections":[["stderr",5]]}oops\n'
)
PINNED_RESULT_FAILED_HEADER = {
    "error": {
        "exitcode": -9,
        "message": "the worker was killed by signal 9",
        "signal": 9,
        "type": "WorkerDied",
    },
    "job_id": "fedcba9876543210fedcba9876543210",
    "kind": "result",
    "n": 1,
    "outcome": "failed",
}

PINNED = [
    pytest.param(
        PINNED_TASK, PINNED_TASK_HEADER, {"fn": PINNED_TASK_FN, "args": PINNED_TASK_ARGS}, id="task"
    ),
    pytest.param(
        PINNED_TASK_WITH_REFS, PINNED_TASK_WITH_REFS_HEADER, {"fn": PINNED_TASK_FN}, id="task-refs"
    ),
    pytest.param(
        PINNED_RESULT_OK,
        PINNED_RESULT_OK_HEADER,
        {"payload": PINNED_RESULT_OK_PAYLOAD, "stdout": b"hello\n", "stderr": b"warn\n"},
        id="result-ok",
    ),
    pytest.param(
        PINNED_RESULT_FAILED, PINNED_RESULT_FAILED_HEADER, {"stderr": b"oops\n"}, id="result-failed"
    ),
]


@pytest.mark.parametrize(("data", "header", "sections"), PINNED)
def test_pinned_envelope_decodes(data: bytes, header: dict, sections: dict[str, bytes]) -> None:
    env = wire.decode(data)
    assert env.header == header
    assert env.sections == sections
    assert list(env.sections) == list(sections)


@pytest.mark.parametrize(("data", "header", "sections"), PINNED)
def test_pinned_envelope_encodes_to_the_same_bytes(
    data: bytes, header: dict, sections: dict[str, bytes]
) -> None:
    assert wire.encode(header, sections) == as_v2(data)


def as_v2(v1: bytes) -> bytes:
    return v1[:5] + b"\x02" + v1[6:]


def test_pinned_constants() -> None:
    assert wire.MAGIC == b"KOTTA"
    assert wire.VERSION == 2
    assert wire.READABLE_VERSIONS == (1, 2)
    assert (wire.MAC_SECTION, wire.MAC_BYTES) == ("mac", 32)
    assert wire.OUTCOMES == ("ok", "error", "failed")


def test_pinned_task_sections_are_a_loadable_call() -> None:
    fn, calls = wire.load_call(wire.decode(PINNED_TASK).sections)
    assert fn is operator.add
    assert [fn(*args, **kwargs) for args, kwargs in calls] == [3, 7]


def test_pinned_results_give_their_outcomes() -> None:
    env = wire.decode(PINNED_RESULT_OK)
    assert wire.outcomes(env) == [(True, 3), (True, 7)]
    assert env.text("stdout") == "hello\n"

    ((ok, exc),) = wire.outcomes(wire.decode(PINNED_RESULT_FAILED))
    assert not ok
    assert type(exc) is errors.WorkerDied
    assert (exc.exitcode, exc.signal, exc.job_id) == (-9, 9, OTHER_JOB_ID)


def test_failure_reproduces_the_pinned_failed_envelope() -> None:
    data = wire.failure(
        OTHER_JOB_ID,
        1,
        "WorkerDied",
        "the worker was killed by signal 9",
        stderr=b"oops\n",
        exitcode=-9,
        signal=9,
    )
    assert data == as_v2(PINNED_RESULT_FAILED)


# =========================================================================== replies
# A node's reply message to a client: many (job id, result envelope) items in one frame.

replies_st = st.lists(st.tuples(job_ids, st.binary(max_size=40)), max_size=5)

PINNED_REPLIES = (
    b"KRPL\x01\x00\x00\x00\x02"
    b"0123456789abcdef0123456789abcdef\x00\x00\x00\tenv-bytes"
    b"fedcba9876543210fedcba9876543210\x00\x00\x00\x00"
)


def test_pinned_replies() -> None:
    items = [(JOB_ID, b"env-bytes"), (OTHER_JOB_ID, b"")]
    assert wire.pack_replies(items) == PINNED_REPLIES
    assert wire.unpack_replies(PINNED_REPLIES) == items


@FAST
@given(replies_st)
def test_replies_round_trip(items: list[tuple[str, bytes]]) -> None:
    assert wire.unpack_replies(wire.pack_replies(items)) == items


@FAST
@given(
    st.binary(max_size=120)
    | replies_st.map(wire.pack_replies).flatmap(
        lambda data: st.integers(0, len(data)).map(lambda cut: data[:cut] + data[cut + 1 :])
    )
)
def test_unpack_replies_raises_only_envelope_error(data: bytes) -> None:
    try:
        items = wire.unpack_replies(data)
    except errors.EnvelopeError:
        return
    assert all(isinstance(job_id, str) and isinstance(body, bytes) for job_id, body in items)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"KRPL", "too short", id="short"),
        pytest.param(b"KOTTA\x01\x00\x00\x00", "version this client reads", id="magic"),
        pytest.param(b"KRPL\x02\x00\x00\x00\x00", "version this client reads", id="version"),
        pytest.param(PINNED_REPLIES[:30], "truncated kotta reply", id="truncated-item"),
        pytest.param(PINNED_REPLIES[:-1], "truncated kotta reply", id="truncated-last-item"),
        pytest.param(PINNED_REPLIES[:50], "malformed kotta reply item", id="cut-body"),
        pytest.param(PINNED_REPLIES + b"x", "trailing bytes", id="trailing"),
        pytest.param(
            PINNED_REPLIES.replace(JOB_ID.encode(), JOB_ID.upper().encode()),
            "malformed kotta reply item",
            id="bad-job-id",
        ),
    ],
)
def test_unpack_replies_rejects(data: bytes, message: str) -> None:
    with pytest.raises(errors.EnvelopeError, match=message):
        wire.unpack_replies(data)


# =========================================================================== dump_call

GLOBAL_OFFSET = 1000


def module_level_function(x: int, *, scale: int = 1) -> int:
    return (x + GLOBAL_OFFSET) * scale


def run_calls(sections: dict[str, bytes]) -> list[Any]:
    """What a worker does with a task's sections."""
    fn, calls = wire.load_call(sections)
    return [fn(*args, **kwargs) for args, kwargs in calls]


def through_an_envelope(sections: dict[str, bytes]) -> dict[str, bytes]:
    header = wire.task_header(**{k: v for k, v in task_fields().items() if k != "kind"})
    return wire.decode(wire.encode(header, sections)).sections


def test_dump_call_gives_fn_and_args_sections() -> None:
    sections = wire.dump_call(operator.add, [((1, 2), {})])
    assert set(sections) == {"fn", "args"}
    assert all(isinstance(data, bytes) and data for data in sections.values())
    assert run_calls(through_an_envelope(sections)) == [3]


def test_dump_call_lambda() -> None:
    sections = wire.dump_call(lambda x, y=1: x * 10 + y, [((2,), {}), ((3,), {"y": 4})])
    assert run_calls(through_an_envelope(sections)) == [21, 34]


def test_dump_call_closure() -> None:
    def make_adder(n: int) -> Callable[[int], int]:
        table = {"base": n}

        def add(x: int) -> int:
            return table["base"] + x

        return add

    assert run_calls(through_an_envelope(wire.dump_call(make_adder(40), [((2,), {})]))) == [42]


def test_dump_call_function_defined_in_a_test() -> None:
    def describe(name: str, *, excited: bool = False, **rest: Any) -> str:
        return f"{name}{'!' if excited else ''}{sorted(rest)}"

    sections = wire.dump_call(describe, [(("a",), {}), (("b",), {"excited": True, "z": 1})])
    assert run_calls(through_an_envelope(sections)) == ["a[]", "b!['z']"]


def test_dump_call_module_level_function_and_builtin() -> None:
    assert run_calls(wire.dump_call(module_level_function, [((1,), {"scale": 2})])) == [2002]
    assert run_calls(wire.dump_call(max, [((1, 5, 3), {})])) == [5]


def test_dump_call_round_trips_the_arguments() -> None:
    args = (1, "two", [3.0], {"four": (4,)}, None, b"\x00")
    fn, calls = wire.load_call(wire.dump_call(operator.add, [(args, {"k": {1, 2}})]))
    assert fn is operator.add
    assert calls == [(args, {"k": {1, 2}})]


def test_dump_call_with_no_calls() -> None:
    fn, calls = wire.load_call(wire.dump_call(operator.neg, []))
    assert fn is operator.neg
    assert calls == []


def test_same_function_gives_the_same_fn_section() -> None:
    """What the worker's function cache relies on: fn bytes do not depend on the calls."""
    first = wire.dump_call(module_level_function, [((1,), {})])
    second = wire.dump_call(module_level_function, [((2,), {"scale": 3})])
    assert first["fn"] == second["fn"]
    assert first["args"] != second["args"]


def test_load_call_reuses_a_cached_function() -> None:
    def increment(x: int) -> int:
        return x + 1

    cache: dict[bytes, Callable] = {}
    sections = wire.dump_call(increment, [((1,), {})])
    fn1, _ = wire.load_call(sections, cache)
    fn2, calls = wire.load_call(wire.dump_call(increment, [((5,), {})]), cache)
    assert list(cache) == [sections["fn"]]
    assert fn2 is fn1
    assert [fn2(*a, **k) for a, k in calls] == [6]


def _make_counter() -> Callable[[], int]:
    seen: list[int] = []

    def count() -> int:
        seen.append(1)
        return len(seen)

    return count


def run_calls_cached(sections: dict[str, bytes], cache: dict[bytes, Callable]) -> list[Any]:
    """What a warm worker does: load_call with its function cache."""
    fn, calls = wire.load_call(sections, cache)
    return [fn(*args, **kwargs) for args, kwargs in calls]


def test_load_call_cache_reuses_the_function_a_warm_worker_already_unpickled() -> None:
    """Documented behaviour (docs/architecture.md, Workers): like module globals in any warm
    process pool (and Dask's function cache), state a task leaves in its function's closure
    persists for later tasks of the same function on that worker; a fresh unpickle starts
    from the state as pickled."""
    counter = _make_counter()
    first = wire.dump_call(counter, [((), {})])
    second = wire.dump_call(counter, [((), {})])
    assert first == second  # nothing ran on the client: the same bytes twice
    assert run_calls(second) == [1]  # a cold worker
    cache: dict[bytes, Callable] = {}
    assert run_calls_cached(first, cache) == [1]
    assert run_calls_cached(second, cache) == [2]  # the warm worker's function
    assert len(cache) == 1


def _takes_anything(*args: Any, **kwargs: Any) -> None:
    return None


def _generator():
    yield 1


def _assert_serialization_error(exc: BaseException, *fragments: str) -> None:
    assert isinstance(exc, errors.SerializationError)
    assert isinstance(exc, pickle.PicklingError)
    assert isinstance(exc, errors.KottaError)
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_dump_call_names_an_unpicklable_positional_argument() -> None:
    lock = threading.Lock()
    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((1, lock, 3), {})])
    _assert_serialization_error(info.value, "_takes_anything", "argument 1", "_thread.lock")
    assert isinstance(info.value.__cause__, TypeError)


def test_dump_call_names_an_unpicklable_keyword_argument() -> None:
    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((1,), {"ok": 2, "lock": threading.Lock()})])
    _assert_serialization_error(info.value, "keyword argument 'lock'", "_thread.lock")
    assert "argument 0" not in str(info.value)


def test_dump_call_names_an_unpicklable_generator_argument() -> None:
    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((_generator(),), {})])
    _assert_serialization_error(info.value, "argument 0", "generator")


def test_dump_call_names_an_unpicklable_socket_argument() -> None:
    with socket.socket() as sock, pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((), {"sock": sock})])
    _assert_serialization_error(info.value, "keyword argument 'sock'", "socket")


def test_dump_call_names_the_argument_of_a_later_call() -> None:
    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((1,), {}), ((2,), {}), (("x", _generator()), {})])
    _assert_serialization_error(info.value, "argument 1", "generator")


def test_dump_call_names_an_unpicklable_function() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        with lock:
            return True

    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(uses_lock, [((), {})])
    _assert_serialization_error(info.value, "uses_lock", "the function itself")


def test_dump_call_names_an_unpicklable_lambda() -> None:
    lock = threading.Lock()
    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(lambda: lock.locked(), [((), {})])
    _assert_serialization_error(info.value, "<lambda>", "the function itself")


def test_dump_call_reports_a_huge_repr_briefly() -> None:
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("no")

        def __repr__(self) -> str:
            return "U" * 10_000

    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((Unpicklable(),), {})])
    assert "argument 0" in str(info.value)
    assert len(str(info.value)) < 300


def test_dump_call_survives_a_broken_repr() -> None:
    class Hostile:
        def __reduce__(self):
            raise TypeError("cannot pickle Hostile")

        def __repr__(self) -> str:
            raise RuntimeError("repr exploded")

    with pytest.raises(errors.SerializationError) as info:
        wire.dump_call(_takes_anything, [((), {"h": Hostile()})])
    _assert_serialization_error(info.value, "keyword argument 'h'", "Hostile")


def test_fn_name() -> None:
    assert wire.fn_name(module_level_function) == f"{__name__}.module_level_function"
    assert wire.fn_name(operator.add) == "_operator.add"
    assert wire.fn_name(lambda: None).endswith("test_fn_name.<locals>.<lambda>")


# =========================================================================== exceptions


def remote_divide(a: float, b: float) -> float:
    return a / b


def remote_lookup_then_fail() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise RuntimeError("outer failure") from exc


def remote_fail_while_handling_plain() -> None:
    try:
        remote_divide(1, 0)
    except ZeroDivisionError:
        raise ValueError("while handling")  # noqa: B904 - an implicit __context__ is the point


class TwoRequiredArgs(Exception):
    """A custom __init__ whose arguments are not passed on to Exception.__init__."""

    def __init__(self, path: str, code: int):
        super().__init__()
        self.path = path
        self.code = code


class BadReduce(Exception):
    """Pickles fine, but its __reduce__ leaves out an argument: it cannot be unpickled."""

    def __init__(self, path: str, code: int):
        super().__init__(f"{path} failed with {code}")
        self.path = path
        self.code = code

    def __reduce__(self):
        return (type(self), (self.path,))


class HoldsALock(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()


def remote_raise(cls: type[BaseException], *args: Any) -> None:
    raise cls(*args)


def capture(fn: Callable[..., Any], *args: Any) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError(f"{fn.__name__} did not raise")


def through_the_wire_as_call(exc: BaseException) -> BaseException:
    """Worker: prepare_exception + dump_outcomes; client: decode + outcomes."""
    payload, _, _ = wire.dump_outcomes([("raise", wire.prepare_exception(exc))])
    ((ok, value),) = wire.outcomes(result_envelope(payload, n=1))
    assert ok is False
    return value


def through_the_wire_as_task_error(exc: BaseException, n: int = 1) -> BaseException:
    """Worker: dump_exception into an outcome "error" envelope; client: outcomes."""
    results = wire.outcomes(result_envelope(wire.dump_exception(exc), n=n, outcome="error"))
    assert len(results) == n
    assert all(ok is False for ok, _ in results)
    return results[0][1]


ROUND_TRIPS = [
    pytest.param(through_the_wire_as_call, id="per-call"),
    pytest.param(through_the_wire_as_task_error, id="task-error"),
]


def formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_keeps_type_message_and_frames(
    send: Callable[[BaseException], BaseException],
) -> None:
    original = capture(remote_divide, 1, 0)
    loaded = send(original)
    assert loaded is not original
    assert type(loaded) is ZeroDivisionError
    assert str(loaded) == str(original)
    text = formatted(loaded)
    assert "remote_divide" in text
    assert "return a / b" in text
    assert loaded.__traceback__ is not None
    names = [frame.name for frame in traceback.extract_tb(loaded.__traceback__)]
    assert names[-1] == "remote_divide"


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_keeps_its_cause(send: Callable[[BaseException], BaseException]) -> None:
    loaded = send(capture(remote_lookup_then_fail))
    assert type(loaded) is RuntimeError
    assert str(loaded) == "outer failure"
    assert type(loaded.__cause__) is KeyError
    assert loaded.__cause__.args == ("missing",)
    assert loaded.__suppress_context__ is True
    text = formatted(loaded)
    assert "direct cause of the following exception" in text
    assert text.count("remote_lookup_then_fail") >= 2  # frames of both exceptions
    assert "KeyError: 'missing'" in text


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_keeps_its_context(send: Callable[[BaseException], BaseException]) -> None:
    loaded = send(capture(remote_fail_while_handling_plain))
    assert type(loaded) is ValueError
    assert str(loaded) == "while handling"
    assert loaded.__cause__ is None
    assert loaded.__suppress_context__ is False
    assert type(loaded.__context__) is ZeroDivisionError
    text = formatted(loaded)
    assert "During handling of the above exception, another exception occurred" in text
    assert "remote_divide" in text
    assert "remote_fail_while_handling_plain" in text


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_with_required_init_args_comes_back(
    send: Callable[[BaseException], BaseException],
) -> None:
    """A custom __init__ that does not pass its arguments on: plain pickle cannot rebuild it.

    The wire promises the original exception or, failing that, a RemoteError; with the
    tblib this project uses (>= 3.1) it is the original, attributes included.
    """
    loaded = send(capture(remote_raise, TwoRequiredArgs, "/data/x", 3))
    if isinstance(loaded, errors.RemoteError):
        assert loaded.type_name == f"{__name__}.TwoRequiredArgs"
        assert "remote_raise" in loaded.remote_traceback
    else:
        assert type(loaded) is TwoRequiredArgs
        assert (loaded.path, loaded.code) == ("/data/x", 3)
        assert "remote_raise" in formatted(loaded)


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_that_cannot_be_unpickled_becomes_remote_error(
    send: Callable[[BaseException], BaseException],
) -> None:
    original = capture(remote_raise, BadReduce, "/data/x", 3)
    loaded = send(original)
    assert type(loaded) is errors.RemoteError
    assert loaded.type_name == f"{__name__}.BadReduce"
    assert loaded.message == "/data/x failed with 3"
    assert f"{__name__}.BadReduce: /data/x failed with 3" in str(loaded)
    assert "remote_raise" in loaded.remote_traceback
    assert "raise cls(*args)" in loaded.remote_traceback
    assert "BadReduce: /data/x failed with 3" in loaded.remote_traceback


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_that_cannot_be_pickled_becomes_remote_error(
    send: Callable[[BaseException], BaseException],
) -> None:
    loaded = send(capture(remote_raise, HoldsALock, "locked up"))
    assert type(loaded) is errors.RemoteError
    assert loaded.type_name == f"{__name__}.HoldsALock"
    assert loaded.message == "locked up"
    assert "remote_raise" in loaded.remote_traceback


def test_remote_error_keeps_a_chained_traceback() -> None:
    def fail() -> None:
        try:
            remote_divide(1, 0)
        except ZeroDivisionError as exc:
            raise BadReduce("/p", 1) from exc

    loaded = through_the_wire_as_call(capture(fail))
    assert isinstance(loaded, errors.RemoteError)
    assert "ZeroDivisionError" in loaded.remote_traceback
    assert "remote_divide" in loaded.remote_traceback
    assert "direct cause" in loaded.remote_traceback


class _EarlierBox:
    """wire.ExceptionBox as a client of an earlier version has it: no "dropped" slot (a
    traceback cut short, 5e94cb8) and no "members" (a group's, 758dfa4); it sets every
    key of the state it is given."""

    __slots__ = ("exc", "tb", "cause", "context", "suppress")

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


class _EarlierClient(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("kotta_executor.wire", "ExceptionBox"):
            return _EarlierBox
        return super().find_class(module, name)


def test_an_exception_with_a_short_traceback_is_read_by_a_client_of_an_earlier_version() -> None:
    """A node of this version replying to a client from before "dropped": every exception
    the client's task raised came back as SerializationError "'ExceptionBox' object has no
    attribute 'dropped'" (rolling upgrades: nodes first, clients later)."""
    def fail() -> None:
        try:
            remote_divide(1, 0)
        except ZeroDivisionError:
            raise KeyError("k") from None

    box = wire.prepare_exception(capture(fail))
    earlier = _EarlierClient(io.BytesIO(pickle.dumps(box))).load()
    assert earlier.exc.exc.args == ("k",) and earlier.suppress is True
    assert earlier.context is not None and earlier.tb is not None
    # a traceback cut short still says so, to a client that can read it
    deep = wire.prepare_exception(capture(_recurse, wire.TRACEBACK_FRAMES + 50))
    assert pickle.loads(pickle.dumps(deep)).dropped > 0


def _recurse(n: int) -> None:
    if n:
        _recurse(n - 1)
    raise ValueError("deep")


def test_prepare_exception_returns_the_exception_when_it_can_travel() -> None:
    exc = capture(remote_divide, 1, 0)
    assert wire.prepare_exception(exc).original is exc


def test_prepare_exception_replaces_what_cannot_travel() -> None:
    exc = capture(remote_raise, BadReduce, "/p", 2)
    prepared = wire.prepare_exception(exc).original
    assert isinstance(prepared, errors.RemoteError)
    assert prepared.type_name == f"{__name__}.BadReduce"
    again = pickle.loads(pickle.dumps(prepared))
    assert (again.type_name, again.message, again.remote_traceback) == (
        prepared.type_name,
        prepared.message,
        prepared.remote_traceback,
    )


def test_remote_error_survives_an_unprintable_message() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __reduce__(self):
            raise TypeError("no pickle")

    loaded = through_the_wire_as_call(capture(remote_raise, Unprintable))
    assert isinstance(loaded, errors.RemoteError)
    assert "Unprintable" in loaded.type_name
    assert "could not be formatted" in loaded.message


def _make_local_exception() -> BaseException:
    class LocalProblem(Exception):
        def __init__(self, detail: str):
            super().__init__(f"local problem: {detail}")
            self.detail = detail

    def raise_local() -> None:
        raise LocalProblem("disk full")

    return capture(raise_local)


@pytest.mark.parametrize("send", ROUND_TRIPS)
def test_exception_class_defined_in_a_function(
    send: Callable[[BaseException], BaseException],
) -> None:
    loaded = send(_make_local_exception())
    assert type(loaded).__qualname__ == "_make_local_exception.<locals>.LocalProblem"
    assert str(loaded) == "local problem: disk full"
    assert loaded.detail == "disk full"
    assert "raise_local" in formatted(loaded)


def test_exception_class_defined_in_a_function_loads_in_a_fresh_interpreter(
    tmp_path: Path,
) -> None:
    """By-value pickling: the client need not import the module that defined the class."""
    payload, _, _ = wire.dump_outcomes(
        [("raise", wire.prepare_exception(_make_local_exception()))]
    )
    script = (
        "import pickle, sys, traceback\n"
        "[part] = pickle.loads(sys.stdin.buffer.read())\n"
        "tag, box = pickle.loads(part)\n"
        "exc = box.unbox()\n"
        "print(tag, type(exc).__name__, exc.detail, str(exc), sep='|')\n"
        f"print({__name__!r} in sys.modules)\n"
        "print(''.join(traceback.format_exception(exc)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=payload,
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "raise|LocalProblem|disk full|local problem: disk full"
    assert lines[1] == "False"
    assert any("raise_local" in line for line in lines[2:])


# =========================================================================== results


def _explode_on_load() -> None:
    raise RuntimeError("cannot rebuild this value here")


class LoadsBadly:
    def __reduce__(self):
        return (_explode_on_load, ())


def test_dump_outcomes_round_trip() -> None:
    items = [("ok", 1), ("ok", {"a": [1, 2]}), ("ok", None), ("raise", ValueError("v"))]
    results = wire.outcomes(result_envelope(wire.dump_outcomes(items)[0], n=4))
    assert results[:3] == [(True, 1), (True, {"a": [1, 2]}), (True, None)]
    ok, exc = results[3]
    assert ok is False
    assert type(exc) is ValueError
    assert exc.args == ("v",)


def test_dump_outcomes_of_a_lambda_and_a_closure() -> None:
    base = 5
    items = [("ok", lambda x: x + base)]
    ((ok, fn),) = wire.outcomes(result_envelope(wire.dump_outcomes(items)[0], n=1))
    assert ok
    assert fn(1) == 6


def test_an_unpicklable_result_fails_only_its_own_call() -> None:
    items = [
        ("ok", 1),
        ("ok", threading.Lock()),
        ("ok", "three"),
        ("ok", _generator()),
        ("raise", wire.prepare_exception(capture(remote_divide, 1, 0))),
        ("ok", [6]),
    ]
    results = wire.outcomes(result_envelope(wire.dump_outcomes(items)[0], n=len(items)))
    assert len(results) == len(items)
    assert results[0] == (True, 1)
    assert results[2] == (True, "three")
    assert results[5] == (True, [6])
    for index, type_name in ((1, "_thread.lock"), (3, "builtins.generator")):
        ok, err = results[index]
        assert ok is False
        _assert_serialization_error(err, "result of the call", type_name, "could not be pickled")
    ok, err = results[4]
    assert ok is False
    assert type(err) is ZeroDivisionError
    assert "remote_divide" in formatted(err)


def test_an_unpicklable_raised_exception_fails_only_its_own_call() -> None:
    """An exception that skipped prepare_exception is still contained to its call."""
    results = wire.outcomes(
        result_envelope(wire.dump_outcomes([("raise", HoldsALock("x")), ("ok", 2)])[0], n=2)
    )
    ok, err = results[0]
    assert ok is False
    _assert_serialization_error(err, "exception of the call", "HoldsALock")
    assert results[1] == (True, 2)


@given(
    st.dictionaries(st.sampled_from(["a", "b", "payload"]), st.text(max_size=10), max_size=3),
    st.dictionaries(
        st.sampled_from(["payload", "stdout", "stderr"]),
        st.one_of(st.binary(max_size=40), st.lists(st.binary(max_size=20), max_size=4)),
        max_size=3,
    ),
)
def test_encode_pieces_join_to_what_encode_frames(extra, sections) -> None:
    header = {**wire.result_header("a" * 32, wire.OK, 1), **extra}
    joined = {k: b"".join(v) if isinstance(v, list) else v for k, v in sections.items()}
    data = b"".join(wire.encode_pieces(header, sections))
    assert data == wire.encode(header, joined)
    assert wire.decode(data).sections == {k: v for k, v in joined.items() if v}


@given(st.lists(st.one_of(st.none(), st.integers(), st.binary(max_size=300), st.text(max_size=20)),
                min_size=1, max_size=5))
def test_outcome_pieces_are_a_pickle_of_the_per_call_pickles(values) -> None:
    items = [(wire.OK, v) for v in values]
    pieces, failed, reason = wire.dump_outcome_pieces(items)
    payload = b"".join(pieces)
    assert (failed, reason) == (0, None)
    assert [pickle.loads(p) for p in pickle.loads(payload)] == items
    assert wire.outcomes(result_envelope(payload, n=len(items))) == [(True, v) for v in values]


def test_dump_outcomes_accepts_an_iterator() -> None:
    payload, _, _ = wire.dump_outcomes(("ok", i) for i in range(3))
    assert wire.outcomes(result_envelope(payload, n=3)) == [(True, 0), (True, 1), (True, 2)]


def test_error_outcome_fails_every_call() -> None:
    exc = errors.SerializationError("the task could not be unpickled on the node")
    results = wire.outcomes(result_envelope(wire.dump_exception(exc), n=3, outcome="error"))
    assert len(results) == 3
    for ok, err in results:
        assert ok is False
        assert type(err) is errors.SerializationError
        assert str(err) == "the task could not be unpickled on the node"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pickle.dumps([("ok", LoadsBadly())]), id="raises-on-load"),
        pytest.param(b"this is not a pickle", id="garbage"),
        pytest.param(b"", id="missing"),
        pytest.param(b"cno_such_module\nobj\n.", id="no-such-module"),
    ],
)
@pytest.mark.parametrize("outcome", ["ok", "error"])
def test_result_that_cannot_be_unpickled_on_the_client(payload: bytes, outcome: str) -> None:
    env = result_envelope(payload, n=2, outcome=outcome)
    results = wire.outcomes(env)
    assert len(results) == 2
    for ok, err in results:
        assert ok is False
        _assert_serialization_error(err, JOB_ID, "could not be unpickled on the client")
        assert err.__cause__ is not None


def test_result_unpickling_error_names_the_cause() -> None:
    ((ok, err),) = wire.outcomes(result_envelope(pickle.dumps([("ok", LoadsBadly())]), n=1))
    assert ok is False
    assert "RuntimeError: cannot rebuild this value here" in str(err)
    assert type(err.__cause__) is RuntimeError


# --------------------------------------------------------------------------- node failures

FAILURE_CASES = {
    "JobFailed": (errors.JobFailed, ()),
    "WalltimeExceeded": (errors.WalltimeExceeded, (TimeoutError,)),
    "MemoryLimitExceeded": (errors.MemoryLimitExceeded, (MemoryError,)),
    "WorkerDied": (errors.WorkerDied, ()),
    "TaskKilled": (errors.TaskKilled, (CancelledError,)),
    "DeliveryFailed": (errors.DeliveryFailed, ()),
    "CorruptTask": (errors.CorruptTask, ()),
    "RequirementsError": (errors.RequirementsError, ()),
    "TaskRejected": (errors.TaskRejected, (PermissionError,)),
    "DataAccessDenied": (errors.DataAccessDenied, (PermissionError,)),
    "StagingFailed": (errors.StagingFailed, ()),
    "EgressDenied": (errors.EgressDenied, (PermissionError,)),
}


def test_failure_cases_cover_every_failure_type() -> None:
    assert set(FAILURE_CASES) == set(wire.FAILURE_TYPES)
    for name, cls in wire.FAILURE_TYPES.items():
        assert cls.__name__ == name
        assert issubclass(cls, errors.JobFailed)


@pytest.mark.parametrize("name", sorted(FAILURE_CASES))
def test_failure_outcomes_are_the_matching_error(name: str) -> None:
    cls, also = FAILURE_CASES[name]
    data = wire.failure(JOB_ID, 3, name, f"{name} happened", stdout=b"out", stderr=b"err")
    env = wire.decode(data)
    assert env.header["outcome"] == "failed"
    assert env.header["error"] == {"type": name, "message": f"{name} happened"}
    assert env.sections == {"stdout": b"out", "stderr": b"err"}
    results = wire.outcomes(env)
    assert len(results) == 3
    for ok, exc in results:
        assert ok is False
        assert type(exc) is cls
        assert isinstance(exc, errors.JobFailed)
        assert isinstance(exc, errors.KottaError)
        for base in also:
            assert isinstance(exc, base)
        assert str(exc) == f"{name} happened"
        assert exc.job_id == JOB_ID
        assert "exitcode" not in vars(exc)
        assert "signal" not in vars(exc)


def test_walltime_exceeded_is_a_timeout_error() -> None:
    ((_, exc),) = wire.outcomes(
        wire.decode(wire.failure(JOB_ID, 1, "WalltimeExceeded", "too slow"))
    )
    assert isinstance(exc, TimeoutError)
    with pytest.raises(TimeoutError):
        raise exc


def test_task_killed_is_a_cancelled_error() -> None:
    ((_, exc),) = wire.outcomes(wire.decode(wire.failure(JOB_ID, 1, "TaskKilled", "killed")))
    assert isinstance(exc, CancelledError)
    with pytest.raises(CancelledError):
        raise exc


@pytest.mark.parametrize("name", sorted(FAILURE_CASES))
def test_failure_carries_exitcode_and_signal(name: str) -> None:
    data = wire.failure(JOB_ID, 1, name, "died", exitcode=-9, signal=9)
    ((ok, exc),) = wire.outcomes(wire.decode(data))
    assert ok is False
    assert type(exc) is FAILURE_CASES[name][0]
    assert exc.exitcode == -9
    assert exc.signal == 9


def test_worker_died_without_details_has_none_exitcode_and_signal() -> None:
    ((_, exc),) = wire.outcomes(wire.decode(wire.failure(JOB_ID, 1, "WorkerDied", "gone")))
    assert exc.exitcode is None
    assert exc.signal is None


def test_failure_with_exit_status_but_no_signal() -> None:
    data = wire.failure(JOB_ID, 1, "WorkerDied", "exit 7", exitcode=7, signal=None)
    ((_, exc),) = wire.outcomes(wire.decode(data))
    assert (exc.exitcode, exc.signal) == (7, None)


def test_failure_rejects_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown failure type 'Exploded'"):
        wire.failure(JOB_ID, 1, "Exploded", "boom")


def test_failed_envelope_with_an_unknown_type_is_a_job_failed() -> None:
    header = wire.result_header(
        JOB_ID, "failed", 2, error={"type": "FromTheFuture", "message": "?"}
    )
    results = wire.outcomes(wire.decode(wire.encode(header)))
    assert [type(exc) for _, exc in results] == [errors.JobFailed, errors.JobFailed]
    assert str(results[0][1]) == "?"


def test_failed_envelope_without_error_details() -> None:
    ((ok, exc),) = wire.outcomes(wire.decode(wire.encode(wire.result_header(JOB_ID, "failed", 1))))
    assert ok is False
    assert type(exc) is errors.JobFailed
    assert str(exc) == "the task failed"
    assert exc.job_id == JOB_ID


@pytest.mark.parametrize("name", sorted(FAILURE_CASES))
def test_failure_errors_survive_pickling(name: str) -> None:
    """Users re-raise and re-pickle these (e.g. into another executor)."""
    ((_, exc),) = wire.outcomes(
        wire.decode(wire.failure(JOB_ID, 1, name, "m", exitcode=1, signal=None))
    )
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert str(again) == "m"
    assert (again.job_id, again.exitcode, again.signal) == (JOB_ID, 1, None)


# =========================================================================== signed tasks
# A task envelope ends with a ``mac`` section: HMAC-SHA256 over every byte before it.

MAC_KEY = bytes(range(32))


def _signed_task() -> bytes:
    return wire.encode(
        {**PINNED_TASK_HEADER, "auth": "kat1.e30"},
        {"fn": PINNED_TASK_FN, "args": PINNED_TASK_ARGS},
        mac_key=MAC_KEY,
    )


def test_signed_envelope_lists_its_mac_last_and_verifies() -> None:
    data = _signed_task()
    env = wire.decode(data)
    assert wire.is_signed({"sections": [[k, len(v)] for k, v in env.sections.items()]})
    assert list(env.sections) == ["fn", "args", "mac"]
    assert env.sections["mac"] == hmac.new(MAC_KEY, data[:-32], hashlib.sha256).digest()
    assert wire.verify_mac(data, MAC_KEY)
    assert not wire.verify_mac(data, bytes(32)), "another key must not verify it"
    assert not wire.verify_mac(wire.encode(PINNED_TASK_HEADER, {"fn": b"x"}), MAC_KEY)


@FAST
@given(st.data())
def test_any_changed_byte_breaks_the_signature(data) -> None:
    signed = bytearray(_signed_task())
    i = data.draw(st.integers(0, len(signed) - 1))
    signed[i] ^= data.draw(st.integers(1, 255))
    assert not wire.verify_mac(bytes(signed), MAC_KEY)


@FAST
@given(
    st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=4),
    st.lists(st.binary(max_size=5000), min_size=1, max_size=8),
)
def test_the_mac_is_hmac_sha256_under_each_key_of_several_in_turn(keys, payloads) -> None:
    # keyed HMAC objects are kept and copied (wire._mac): a key must never sign with another's
    for i, payload in enumerate(payloads):
        key = keys[i % len(keys)]
        data = wire.encode(PINNED_TASK_HEADER, {"fn": payload}, mac_key=key)
        assert data[-32:] == hmac.new(key, data[:-32], hashlib.sha256).digest()
        assert wire.verify_mac(data, key)
        assert all(not wire.verify_mac(data, other) for other in keys if other != key)


def test_mac_is_a_reserved_section_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        wire.encode(PINNED_TASK_HEADER, {"mac": b"x" * 32})


def test_mac_must_be_the_last_section() -> None:
    head = {**PINNED_TASK_HEADER, "sections": [["mac", 32], ["fn", 1]]}
    raw = json.dumps(head).encode()
    data = PREFIX.pack(b"KOTTA", 2, len(raw)) + raw + bytes(32) + b"x"
    with pytest.raises(errors.EnvelopeError, match="mac must be its last section"):
        wire.decode(data)


# =========================================================================== checked envelopes


@ENVELOPES
@given(valid_envelopes(), st.booleans())
def test_decode_checked_reads_what_decode_reads(data: bytes, signed: bool) -> None:
    """A worker reads the node's (checked) envelopes with decode_checked: it must see
    exactly what decode sees, signed or not."""
    if signed:
        env = wire.decode(data)
        data = wire.encode(env.header, env.sections, mac_key=b"k" * 32)
    assert wire.decode_checked(data) == wire.decode(data)


def test_decode_checked_still_refuses_what_is_no_envelope() -> None:
    with pytest.raises(errors.EnvelopeError, match="bad magic"):
        wire.decode_checked(b"NOTIT" + bytes(20))


PLAIN_VALUES = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.complex_numbers() | st.text(max_size=20) | st.binary(max_size=20)
)


@FAST
@given(PLAIN_VALUES)
def test_plain_outcomes_are_pickled_as_cloudpickle_would(value: Any) -> None:
    """dump_outcomes skips cloudpickle's Pickler for plain values: same bytes, same value."""
    import cloudpickle

    payload, failed, reason = wire.dump_outcomes([("ok", value)])
    assert (failed, reason) == (0, None)
    (part,) = pickle.loads(payload)
    assert part == cloudpickle.dumps(("ok", value))
    ((ok, back),) = wire.outcomes(result_envelope(payload, n=1))
    assert ok and type(back) is type(value)
    assert back == value or value != value  # NaN


def test_a_plain_value_next_to_an_exception_is_counted_apart() -> None:
    payload, failed, reason = wire.dump_outcomes(
        [("ok", 1), ("raise", wire.prepare_exception(KeyError("k"))), ("ok", None)]
    )
    assert (failed, reason) == (1, "KeyError: 'k'")
    (a, b, c) = wire.outcomes(result_envelope(payload, n=3))
    assert a == (True, 1) and c == (True, None)
    assert not b[0] and isinstance(b[1], KeyError)


# =========================================================================== the quick check


def _fully_checked(header: Any) -> bool:
    try:
        wire._check_fields(header)
    except errors.EnvelopeError:
        return False
    return True


SECTION_TABLES = st.lists(
    st.lists(st.text(max_size=4) | st.just("mac") | st.integers(-2, 40) | st.none(),
             min_size=1, max_size=3)
    | st.tuples(st.just("mac"), st.sampled_from([32, 31, 0])).map(list)
    | st.tuples(st.text(max_size=4), st.integers(0, 99)).map(list),
    max_size=4,
)


@FAST
@given(
    task_headers,
    st.just({}) | st.dictionaries(
        st.sampled_from(sorted({*wire._TASK_FIELDS, "requirements", "max_tasks_per_child",
                                "python"})),
        json_values | st.floats() | st.booleans()
        | st.from_regex(r"[0-9]{1,4}\.[0-9]{1,4}\n?|3\.1[0-9]", fullmatch=True), max_size=2),
    st.just([]) | st.lists(st.sampled_from(sorted(wire._TASK_FIELDS)), max_size=2),
    st.lists(st.tuples(st.text(max_size=4), st.integers(0, 99)).map(list), max_size=3).map(
        lambda secs: [*secs, ["mac", 32]]) | SECTION_TABLES,
)
def test_the_quick_task_check_never_passes_what_the_full_check_refuses(
    header: dict[str, Any], garble: dict[str, Any], drop: list[str], sections: list
) -> None:
    """A node checks every task header; _usual_task is the quick way for the usual shape.
    Whatever it passes, the full check passes too (and the usual header does pass it)."""
    assert wire._usual_task({**header, "sections": [["fn", 3], ["mac", 32]]}) == (
        type(header["walltime"]) is float and type(header["created"]) is float
        and type(header.get("requirements", "")) is str
    )
    garbled = {**header, **garble, "sections": sections}
    for name in drop:
        garbled.pop(name, None)
    quick = wire._usual_task(garbled)
    event(f"quick check passed: {quick}")
    if quick:
        assert _fully_checked(garbled), garbled


def _usual_header(**changes: Any) -> dict[str, Any]:
    header = {**task_fields(), "sections": [["fn", 10], ["args", 4], ["mac", 32]]}
    for name, value in changes.items():
        if value is _DROP:
            del header[name]
        else:
            header[name] = value
    return header


class _Drop:
    def __repr__(self) -> str:  # a stable test id, the same in every process
        return "<dropped>"


_DROP = _Drop()
_NAN, _INF = float("nan"), float("inf")


def test_a_task_may_say_how_many_tasks_its_worker_runs() -> None:
    """``max_tasks_per_child``, optional: an integer of at least 1, both checks agree."""
    for most in (1, 3, 10**6):
        header = _usual_header(max_tasks_per_child=most)
        assert wire._usual_task(header) and _fully_checked(header)


@pytest.mark.parametrize("changes", [
    *({name: _DROP} for name in wire._TASK_FIELDS),
    {"n": 0}, {"n": -1}, {"n": True}, {"n": 1.0}, {"n": "1"},
    {"walltime": 0.0}, {"walltime": -1.0}, {"walltime": _NAN}, {"walltime": _INF},
    {"walltime": "300"}, {"walltime": None}, {"walltime": True},
    {"created": _NAN}, {"created": _INF}, {"created": -_INF}, {"created": "now"},
    {"job_id": "A" * 32}, {"job_id": "a" * 31}, {"job_id": "g" * 32}, {"job_id": 5},
    {"owner": 5}, {"client": None}, {"queue": []}, {"fn": {}},
    {"requirements": 5}, {"requirements": None}, {"requirements": ["numpy"]},
    {"max_tasks_per_child": 0}, {"max_tasks_per_child": -3}, {"max_tasks_per_child": True},
    {"max_tasks_per_child": 2.0}, {"max_tasks_per_child": "2"},
    {"max_tasks_per_child": None},
    {"python": 3.12}, {"python": "3.12.1"}, {"python": "3.12\n"}, {"python": None},
    {"python": ""}, {"python": ["3.12"]},
    {"sections": {}}, {"sections": "fn"}, {"sections": [["mac", 32], ["fn", 10]]},
    {"sections": [["fn", 10], ["mac", 31]]}, {"sections": [["fn", -1]]},
    {"sections": [["fn"]]}, {"sections": [["fn", 1.0]]}, {"sections": [["fn", True]]},
    {"sections": [[5, 1]]}, {"sections": [("fn", 1)]},
], ids=repr)
def test_the_quick_task_check_refuses_each_kind_of_bad_field(changes: dict[str, Any]) -> None:
    assert wire._usual_task(_usual_header())
    bad = _usual_header(**changes)
    assert not _fully_checked(bad), "not a bad header: the test is wrong"
    assert not wire._usual_task(bad)
    with pytest.raises(errors.EnvelopeError):
        wire._check_header(bad)


@given(st.sampled_from(sorted(wire.FAILURE_TYPES)), st.text())
def test_a_node_written_reason_names_its_type_and_fits_a_job_record(error_type, message):
    """``Type: message``, at most 500 characters, and always UTF-8 (a lone surrogate, as
    in a file name that is not UTF-8, spelled out), as ``summary`` writes a task's own."""
    reason = wire.failure_reason(error_type, message)
    assert reason.startswith(f"{error_type}: ") and len(reason) <= 500
    reason.encode("utf-8")  # (raises for a lone surrogate)
    if message.isascii():
        assert reason == f"{error_type}: {message}"[:500]
