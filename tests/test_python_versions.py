"""A client and nodes of different Python versions.

cloudpickle pickles a function that cannot be imported by name (one defined in a notebook or
``__main__``, a lambda, a closure) by value: its code object, whose bytecode only the Python
version that made it runs.  Unpickled by another one, it fails with an error that says
nothing of versions (``SystemError: no locals found when setting up annotations``, 3.13's
pickle on 3.11), crashes the interpreter, or runs wrongly.  So the task and result headers
say which Python pickled them, a worker refuses a task holding code of another version
unread, the client a result, each with a ``PythonVersionMismatch`` naming both versions;
calls by reference (a module's function) and plain data still cross versions.

The client side of another version is this test process with ``wire.PYTHON`` set to a
version no interpreter has: every node and worker is a real process of the real version,
and a real cross-version pickle fails in them as the docstring says (checked by hand with
pyenv's 3.13 and 3.11).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle
import socket
import threading
import uuid
from pathlib import Path

import cloudpickle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kotta_executor import PythonVersionMismatch, SerializationError, errors, wire
from kotta_executor import executor as executor_module
from kotta_executor.backends.base import NodeInfo
from tests import tasks
from tests.conftest import GUARD

REAL = wire.PYTHON
OTHER = "3.99"  # no such Python


@pytest.fixture
def other_python_client(monkeypatch):
    """This process pickles as Python OTHER (its task headers say so, and it reads result
    headers against it); the nodes it starts are real Python REAL processes."""
    monkeypatch.setattr(wire, "PYTHON", OTHER)


# ------------------------------------------------------------------------- the wire


def test_holds_code_finds_functions_pickled_by_value_only():
    def local(x):
        return x + 1

    class Local:
        def method(self):
            return 1

    for by_value in (lambda: 0, local, tasks.make_adder(1), Local, [1, {"f": local}]):
        assert wire.holds_code(cloudpickle.dumps(by_value)), by_value
    for by_reference in (tasks.add, os.path.join, len, pickle.dumps, int, ValueError("x")):
        assert not wire.holds_code(cloudpickle.dumps(by_reference)), by_reference
    # the name of the type alone is data, not code
    assert not wire.holds_code(cloudpickle.dumps(["CodeType", b"CodeType", {"CodeType": 1}]))


def test_holds_code_finds_code_whose_type_name_was_pickled_before_it():
    """pickle writes a string once and takes it from its memo after: a ``"CodeType"``
    pickled before the code (a key, an argument) is the one its type is rebuilt from."""
    f = lambda: 0  # noqa: E731
    for value in (["CodeType", f], [((), {"CodeType": 1, "f": f})], ("types", "CodeType", f),
                  [b"x", cloudpickle.dumps(["CodeType", f])]):  # (a pickle in a pickle)
        assert wire.holds_code(cloudpickle.dumps(value)), value
    assert not wire.holds_code(cloudpickle.dumps(["CodeType", ("CodeType",), tasks.add]))


def test_bytes_that_look_like_code_in_a_pickle_are_data():
    """Plain ``bytes`` holding what cloudpickle writes for code (hypothesis found the
    first): data, not code; a whole pickle held as bytes is looked into."""
    mark = b"\x8c\x08CodeType\x94\x85\x94R"
    for value in (b"\x8c\x08CodeType\x85R", mark, [b"x", mark + b"."], {"k": b"\x8c\x05types\x94"
                  b"\x8c\x08CodeType\x94\x93"}, b"\x80\x05" + mark):  # (no STOP: not a pickle)
        for data in (cloudpickle.dumps(value), pickle.dumps(value, 5), pickle.dumps(value, 4)):
            assert not wire.holds_code(data), value
    assert wire.holds_code(cloudpickle.dumps([b"x", cloudpickle.dumps(lambda: 0)]))


_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary() | st.sampled_from(["CodeType", "types", "_builtin_type", "\x94\x85R"]),
    lambda children: st.lists(children) | st.tuples(children, children)
    | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(_DATA)
def test_plain_data_never_holds_code(value):
    for data in (cloudpickle.dumps(value), pickle.dumps(value, 5), pickle.dumps(value, 4)):
        assert not wire.holds_code(data)


def test_a_version_mismatch_is_only_for_code_of_another_version():
    code = cloudpickle.dumps(lambda: 0)
    plain = cloudpickle.dumps([1, "two"])
    assert wire.version_mismatch(REAL, [code], "the task f", "on the node") is None
    assert wire.version_mismatch(None, [code], "the task f", "on the node") is None  # unknown
    assert wire.version_mismatch(OTHER, [plain, b""], "the task f", "on the node") is None
    err = wire.version_mismatch(OTHER, [plain, code], "the task f", "on the node")
    assert isinstance(err, PythonVersionMismatch) and isinstance(err, SerializationError)
    assert (err.pickled_by, err.running) == (OTHER, REAL)
    assert str(err).startswith(
        f"the task f was pickled by Python {OTHER} and would be unpickled by Python {REAL} "
        "on the node, but it holds code pickled by value")
    assert "Use the same Python version (major.minor)" in str(err)
    assert pickle.loads(pickle.dumps(err)).pickled_by == OTHER  # it travels back as itself


@pytest.mark.parametrize("bad", [3.12, 3, "3", "3.12.1", "three", "", " 3.12", None, ["3.12"]])
def test_a_malformed_python_field_is_refused_by_name(bad):
    fields = dict(job_id="a" * 32, owner="o", client="c", queue="test", walltime=60.0,
                  created=1.0, fn="f", n=1)
    assert wire.task_header(**fields, python="3.12")["python"] == "3.12"
    with pytest.raises(errors.EnvelopeError, match="field 'python' must be a Python version"):
        wire.task_header(**fields, python=bad)
    with pytest.raises(errors.EnvelopeError, match="field 'python' must be a Python version"):
        wire.decode(wire.encode(wire.result_header("a" * 32, wire.OK, 1, python=bad), {}))


# ------------------------------------------------------------- a client of another Python


def test_a_call_holding_code_of_another_python_fails_unrun_naming_both_versions(
    make_executor, other_python_client, tmp_path: Path
):
    ex = make_executor(1)
    marker = tmp_path / "ran"
    f = ex.submit(lambda: marker.write_text("ran"))
    with pytest.raises(PythonVersionMismatch) as info:
        f.result(timeout=GUARD)
    err = info.value
    assert (err.pickled_by, err.running) == (OTHER, REAL)
    assert str(err).startswith("the task tests.test_python_versions.test_a_call_holding_")
    assert f"was pickled by Python {OTHER} and would be unpickled by Python {REAL} on the " \
           "node" in str(err)
    assert not marker.exists()  # nothing of it ran (nor was unpickled)
    job = ex.enclave.jobs.get(f.job_id)
    assert job.state == "failed" and job.reason.startswith("PythonVersionMismatch: ")
    # calls by reference, with plain data, cross versions; and the worker is still there
    assert ex.submit(tasks.add, 1, 2).result(timeout=GUARD) == 3
    assert list(ex.map(tasks.square, range(4))) == [0, 1, 4, 9]
    with pytest.raises(PythonVersionMismatch):  # a map's items all fail, none lost
        list(ex.map(lambda x: x, range(3)))


def test_a_call_holding_code_after_the_name_of_its_type_fails_unrun(
    make_executor, other_python_client, tmp_path: Path
):
    """The code of a keyword argument, after another whose value is ``"CodeType"``."""
    ex = make_executor(1)
    marker = tmp_path / "ran"
    f = ex.submit(tasks.apply_fn, x="CodeType", fn=lambda x: marker.write_text(x))
    with pytest.raises(PythonVersionMismatch):
        f.result(timeout=GUARD)
    assert not marker.exists()


def test_an_initializer_holding_code_of_another_python_fails_each_task(
    make_executor, other_python_client, tmp_path: Path
):
    marker = tmp_path / "initialized"
    ex = make_executor(1, initializer=lambda: marker.write_text("ran"))
    f = ex.submit(tasks.add, 1, 2)  # by reference, but its initializer is code
    with pytest.raises(PythonVersionMismatch, match=f"Python {OTHER}"):
        f.result(timeout=GUARD)
    assert not marker.exists()


def test_a_result_holding_code_of_another_python_fails_that_call_only(
    make_executor, other_python_client
):
    ex = make_executor(1)
    f = ex.submit(tasks.make_adder, 1)  # by reference; it returns a closure: code
    with pytest.raises(PythonVersionMismatch) as info:
        f.result(timeout=GUARD)
    assert str(info.value).startswith(
        f"the result of job {f.job_id} was pickled by Python {REAL} and would be unpickled "
        f"by Python {OTHER} on the client")
    assert (info.value.pickled_by, info.value.running) == (REAL, OTHER)
    # in a map, the call whose value is code fails; the items before it are yielded
    it = ex.map(tasks.apply_fn, [tasks.add, tasks.make_adder], [1, 2])
    assert next(it) == 1
    with pytest.raises(PythonVersionMismatch):
        next(it)


def test_a_failure_the_client_recorded_holding_code_is_refused_by_a_client_of_another_python(
    make_executor, monkeypatch
):
    """A task failed on its client before it was sent (a dependency failed) keeps its
    exception as a result, for clients that attach: one of another Python refuses it too."""

    class Local(Exception):
        def method(self):  # a class with code, pickled by value
            return 1

    monkeypatch.setattr(wire, "PYTHON", OTHER)
    dependency = cf.Future()
    dependency.set_exception(Local("failed"))
    f = make_executor(1, start_node=False).submit(tasks.add, dependency, 1)
    assert isinstance(f.exception(timeout=GUARD).__cause__, Local)  # same Python: read
    monkeypatch.setattr(wire, "PYTHON", REAL)
    with pytest.raises(PythonVersionMismatch, match=f"pickled by Python {OTHER}"):
        make_executor(1, start_node=False).attach(f.job_id).result(timeout=GUARD)


# ------------------------------------------------------------- nodes of another Python


def test_nodes_all_of_another_python_are_named_in_a_warning_once(
    make_executor, enclave, monkeypatch
):
    monkeypatch.setattr(executor_module, "RECONCILE_AFTER", 0.05)  # look often
    seen, messages = threading.Event(), []

    class Log(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
            if "run Python" in messages[-1]:
                seen.set()

    handler = Log()
    logging.getLogger("kotta.executor").addHandler(handler)
    # a node of another Python on the queue (this process stands for its process)
    other = NodeInfo(node_id=uuid.uuid4().hex[:12], queue="production",
                     host=socket.gethostname(), pid=os.getpid(), workers=1, python="2.7")
    enclave.nodes.register(other)
    try:
        ex = make_executor(1, start_node=False, queue="production")
        f = ex.submit(tasks.add, 1, 2)  # waits: that node is not a real one
        assert seen.wait(GUARD), messages
        [warning] = [m for m in messages if "run Python" in m]
        assert warning == (
            f"kotta: the nodes serving queue 'production' run Python 2.7, and this client runs "
            f"Python {REAL}: calls that hold code pickled by value (a function defined in a "
            "notebook or __main__, a lambda) fail there with PythonVersionMismatch; use the "
            "same Python version on both sides")
        assert f.cancel()
    finally:
        logging.getLogger("kotta.executor").removeHandler(handler)
        enclave.nodes.deregister(other.node_id)
