"""``kotta_executor.connect()`` and ``@kottajob``: the decorator of the Cloud Kotta paper.

Real components only: each connection's executor starts a real node process on the test's
embedded enclave.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import os
import pickle
import re
import signal
import threading
import traceback

import cloudpickle
import pytest

import kotta_executor
from kotta_executor import KottaExecutor, KottaFuture, kottajob
from kotta_executor.backends.embedded import EmbeddedEnclave
from tests import tasks
from tests.conftest import GUARD, _finish, wait_for


def _close(konn: kotta_executor.Connection) -> None:
    """Close a connection; stop whatever a failed test left running first."""
    if konn._executor is not None:
        _finish(konn._executor)
    konn.close()


@pytest.fixture
def konn(enclave_dir):
    c = kotta_executor.connect(enclave_dir)
    yield c
    _close(c)


@pytest.fixture
def module_connection():
    """``tests.tasks.module_connection``: made at import time, on this test's $KOTTA_HOME."""
    yield tasks.module_connection
    _close(tasks.module_connection)


def test_blocking_call_returns_the_value_or_raises(konn, enclave):
    @kottajob(konn, "test", 5)
    def where(x):
        return os.getpid(), x * 3

    @kottajob(konn, "test", 5)
    def fails(message):
        raise KeyError(message)

    pid, value = where(14)
    assert value == 42
    assert pid != os.getpid()  # it ran on a worker, not here
    assert where.__name__ == "where"
    assert where.kotta_function(2) == (os.getpid(), 6)  # the undecorated function

    with pytest.raises(KeyError, match="remote key") as info:
        fails("remote key")
    assert "fails" in "".join(traceback.format_exception(info.value))
    assert any("kotta job " in note for note in info.value.__notes__)

    jobs = enclave.jobs.list()
    assert len(jobs) == 2
    assert {(j.queue, j.walltime) for j in jobs} == {("test", 300.0)}
    assert {str(j.state) for j in jobs} == {"completed", "failed"}


def test_a_decorated_function_that_calls_itself_or_another_runs_their_bodies_in_its_task(
    konn, enclave
):
    """What travels is the undecorated function: a decorated function the task calls (itself,
    recursively, or another one) is its undecorated body there.  The wrapper holds the
    connection, which cannot be pickled: the call failed with SerializationError."""

    @kottajob(konn, "test", 5)
    def factorial(n):
        return 1 if n <= 1 else n * factorial(n - 1)

    @kottajob(konn, "test", 5)
    def inc(n):
        return n + 1

    @kottajob(konn, "test", 5, block=False)
    def inc_twice(n):
        return os.getpid(), inc(inc(n))

    assert factorial(5) == 120
    pid, value = inc_twice(1).result(timeout=GUARD)
    assert value == 3 and pid != os.getpid()
    assert len(enclave.jobs.list()) == 2  # one job a call made here, none from the node


def test_queue_and_walltime_of_the_decorator(konn, enclave):
    offset = 100

    @kottajob(konn, "TEST", dt.timedelta(seconds=90))
    def shifted(x, *, by=0):
        return x + offset + by

    assert shifted(1) == 101
    assert shifted(1, by=5) == 106
    job = enclave.jobs.list(limit=1)[0]
    assert (job.queue, job.walltime) == ("test", 90.0)

    @kottajob(konn, "test", dt.timedelta(seconds=1))
    def blocked(path):
        return tasks.wait_for_file(path)

    with pytest.raises(kotta_executor.WalltimeExceeded):
        blocked(str(enclave.home / "never-created"))


def test_non_blocking_returns_a_future(konn, tmp_path):
    release = tmp_path / "release"

    @kottajob(konn, "test", 5, block=False)
    def waits(path):
        return tasks.wait_for_file(path)

    @kottajob(konn, "test", 5, block=False)
    def broken():
        raise ArithmeticError("remote")

    f = waits(str(release))
    assert isinstance(f, KottaFuture)
    assert not f.done()
    wait_for(lambda: f.status() == "processing", what="the task to start")
    attached = konn.attach(f.job_id)
    assert attached is f
    release.write_text("")  # an empty file: nothing to read half written
    assert f.result(timeout=GUARD) == ""
    assert f.status() == "completed"

    g = broken()
    assert isinstance(g, KottaFuture)
    with pytest.raises(ArithmeticError, match="remote"):
        g.result(timeout=GUARD)


def test_decorating_with_an_executor(executor, enclave):
    @kottajob(executor)
    def double(x):
        return x * 2

    @kottajob(executor, walltime=2, block=False)
    def triple(x):
        return x * 3

    assert double(21) == 42
    f = triple(5)
    assert isinstance(f, KottaFuture)
    assert f.result(timeout=GUARD) == 15
    assert enclave.jobs.get(f.job_id).walltime == 120.0
    walltimes = sorted(j.walltime for j in enclave.jobs.list())
    assert walltimes == [120.0, 300.0]  # the executor's own default for ``double``


def test_decorating_with_an_executors_options_view(executor, enclave):
    """``@kottajob(ex.with_options(walltime=30))`` was a TypeError ("needs a connection or
    a KottaExecutor"), though ``@kottajob(ex)`` worked: the view's options are the
    defaults, which kottajob's own queue, walltime and requirements override."""
    view = executor.with_options(walltime=30)

    @kottajob(view)
    def double(x):
        return x * 2

    @kottajob(view, walltime=2, block=False)
    def triple(x):
        return x * 3

    @kottajob(view, "production", block=False)
    def quadruple(x):
        return x * 4

    assert double(21) == 42
    f, g = triple(5), quadruple(5)
    assert isinstance(f, KottaFuture) and isinstance(g, KottaFuture)
    assert (f.result(timeout=GUARD), g.result(timeout=GUARD)) == (15, 20)
    jobs = {j.job_id: j for j in enclave.jobs.list()}
    assert (jobs[f.job_id].queue, jobs[f.job_id].walltime) == ("test", 120.0)
    assert (jobs[g.job_id].queue, jobs[g.job_id].walltime) == ("production", 1800.0)
    [(queue, walltime)] = [(j.queue, j.walltime) for i, j in jobs.items()
                           if i not in (f.job_id, g.job_id)]
    assert (queue, walltime) == ("test", 1800.0)  # the view's own, for ``double``
    with pytest.raises(ValueError):  # checked at decoration, as for an executor
        kottajob(view, "prod2")


def test_decorated_module_function_runs_once_on_the_node(
    module_connection, tmp_path, _private_kotta_home
):
    record = tmp_path / "runs"
    assert tasks.decorated_record(str(record), 21) == 42
    lines = record.read_text().splitlines()
    assert len(lines) == 1, f"the task ran {len(lines)} times"
    assert int(lines[0]) != os.getpid()  # on a worker, not here
    # one job, not one per level of recursion through the wrapper
    enclave = EmbeddedEnclave(_private_kotta_home)
    try:
        jobs = enclave.jobs.list()
        assert len(jobs) == 1
        assert str(jobs[0].state) == "completed"
    finally:
        enclave.close()
    # what travels is the undecorated function
    assert tasks.decorated_record.kotta_function(str(record), 1) == 2


def _jobs(home) -> list:
    enclave = EmbeddedEnclave(home)
    try:
        return enclave.jobs.list()
    finally:
        enclave.close()


def test_a_module_level_decorated_function_travels_by_reference(
    module_connection, _private_kotta_home
):
    """Its module's attribute of its name is the decorated function, not the function:
    cloudpickle sent the function by value, with the globals it uses (a lock: the call
    failed with SerializationError; a large table: sent at every call)."""
    pid, value = tasks.decorated_with_lock(41)
    assert value == 42 and pid != os.getpid()
    assert len(cloudpickle.dumps(tasks.decorated_with_lock)) < 200  # a name, not code
    assert [str(j.state) for j in _jobs(_private_kotta_home)] == ["completed"]


def test_a_module_level_decorated_function_pickles_as_itself():
    """pickle refused it ("not the same object as tests.tasks.decorated_record"): a
    ProcessPoolExecutor or multiprocessing could not take it."""
    f = tasks.decorated_record
    assert pickle.loads(pickle.dumps(f)) is f
    assert cloudpickle.loads(cloudpickle.dumps(f)) is f


def test_a_decorated_function_that_a_plain_one_calls_runs_in_its_task(
    module_connection, _private_kotta_home, tmp_path
):
    """The node imports the plain function's module, whose attribute is the decorated
    function: its call submitted a job from the node (a node of one worker: the task
    waited for it until its walltime)."""
    record = tmp_path / "runs"
    pid, value = module_connection.executor.submit(
        tasks.calls_decorated, str(record), 4).result(timeout=GUARD)
    assert value == 8 and pid != os.getpid()
    assert record.read_text().splitlines() == [str(pid)]  # in the task's own process
    assert len(_jobs(_private_kotta_home)) == 1  # one job: none from the node


def test_a_non_blocking_decorated_function_returns_a_done_future_in_a_task(
    module_connection, _private_kotta_home
):
    """It gave its value there, not a future: driver code written for the client
    (``[f.result() for f in fs]``) failed in a task with AttributeError."""
    values, failed, kind = module_connection.executor.submit(tasks.fan_out, 3).result(
        timeout=GUARD)
    assert values == [0, 2, 4]
    assert failed == "ValueError('negative: -1')" and kind == "Future"
    assert len(_jobs(_private_kotta_home)) == 1


def test_a_non_blocking_decorated_function_returns_a_future_in_a_task_too(konn, enclave):
    """As in the client, for functions pickled by value (``__main__``, a notebook): a
    driver written for the client runs in a task unchanged."""

    @kottajob(konn, "test", 5, block=False)
    def leaf(x):
        return x * 2

    @kottajob(konn, "test", 5)
    def driver(n):
        futures = [leaf(i) for i in range(n)]
        return [f.result() for f in futures]

    assert driver(3) == [0, 2, 4]
    assert len(enclave.jobs.list()) == 1


def test_a_decorated_function_submitted_or_mapped_runs_its_body(konn, enclave):
    """``ex.submit(f, x)`` of a ``block=False`` decorated ``f``: in the task, ``f`` itself
    would return a future, which cannot be sent back; the executor sends its body, by
    reference or by value, as a call of ``f`` does."""

    @kottajob(konn, "test", 5, block=False)
    def local(x):
        return x * 3

    ex = konn.executor
    assert ex.submit(tasks.decorated_later, 4).result(GUARD) == 8  # by reference
    assert ex.submit(local, 4).result(GUARD) == 12  # by value
    assert list(ex.map(tasks.decorated_later, [1, 2], timeout=GUARD)) == [2, 4]
    assert ex.submit(tasks.decorated_with_lock, 1).result(GUARD)[1] == 2  # (block=True)
    assert len(enclave.jobs.list()) == 5  # one an item: no job submitted from a task


@pytest.mark.parametrize(
    "args",
    [
        ("nope", 5),
        ("nope", None),
        ("test", 0),
        ("test", -3),
        ("test", "5"),
        ("test", float("inf")),
        ("test", dt.timedelta(0)),
    ],
)
def test_invalid_options_fail_at_decoration(enclave_dir, args):
    konn = kotta_executor.connect(enclave_dir)
    ex = KottaExecutor(1, enclave=enclave_dir, start_node=False)
    try:
        with pytest.raises(ValueError):
            kottajob(konn, *args)
        with pytest.raises(ValueError):
            kottajob(ex, *args)
        assert konn._executor is None  # nothing was started
    finally:
        ex.shutdown()
        konn.close()


def test_empty_queue_name_fails_at_decoration(enclave_dir):
    konn = kotta_executor.connect(enclave_dir, start_node=False)
    ex = KottaExecutor(1, enclave=enclave_dir, start_node=False)
    try:
        with pytest.raises(ValueError):
            kottajob(ex, "")  # an executor target: rejected at decoration
        with pytest.raises(ValueError):
            kottajob(konn, "", 5)  # a connection target: rejected at decoration too
    finally:
        ex.shutdown()
        konn.close()


@pytest.mark.parametrize("block", ["no", "False", None, [], 2])
def test_a_block_that_is_not_true_or_false_fails_at_decoration(enclave_dir, block):
    """``block="no"`` (a string, so true) made every call block, with no word said."""
    konn = kotta_executor.connect(enclave_dir, start_node=False)
    try:
        with pytest.raises(TypeError, match=re.escape(f"block must be True or False, not {block!r}")):
            kottajob(konn, "test", 5, block=block)
        for fine in (True, False, 1, 0):
            kottajob(konn, "test", 5, block=fine)
        assert konn._executor is None  # nothing was started
    finally:
        konn.close()


def test_decorator_needs_a_connection_or_executor():
    with pytest.raises(TypeError):
        kottajob("test", 5)
    with pytest.raises(TypeError):
        kottajob(None)


def test_close_shuts_the_connection_down(enclave_dir, enclave):
    konn = kotta_executor.connect(enclave_dir, max_workers=1)
    try:

        @kottajob(konn, "test", 5)
        def square(x):
            return x * x

        assert square(9) == 81
        ex = konn.executor
        assert enclave.nodes.live("test")
        konn.close()
        assert enclave.nodes.live("test") == []  # the executor's node was stopped
        with pytest.raises(RuntimeError):
            ex.submit(tasks.noop)
        konn.close()  # closing twice is harmless
    finally:
        _close(konn)

    with kotta_executor.connect(enclave_dir, max_workers=1) as again:

        @kottajob(again, "test", 5)
        def cube(x):
            return x**3

        assert cube(3) == 27
        ex = again.executor
    with pytest.raises(RuntimeError):
        ex.submit(tasks.noop)


def test_a_done_callback_calling_a_decorated_function_while_close_waits(konn, tmp_path):
    """close() held the connection's lock while its executor's shutdown waited for the
    jobs; a done-callback (run by the executor's manager thread) that called a decorated
    function waited for that lock, and the manager for the callback: close() never
    returned.  Now the callback's call goes to a new executor, as any call after close()
    does, and close() returns once the old one's jobs are done."""
    started, release = tmp_path / "started", tmp_path / "release"
    step = kottajob(konn, "test", 5, block=False)(tasks.square)
    hold = kottajob(konn, "test", 5, block=False)(tasks.touch_then_wait)
    old = konn.executor
    got: list = []
    first = hold(str(started), str(release))
    first.add_done_callback(lambda f: got.append(step(3)))
    wait_for(started.exists, what="the first task to start")
    closer = threading.Thread(target=konn.close)
    closer.start()
    wait_for(lambda: old._shutdown, what="close() to shut the executor down")
    tasks.release(release, "released")
    closer.join(GUARD)
    assert not closer.is_alive(), "close() never returned"
    assert first.result(timeout=GUARD) == "released"
    assert got[0].result(timeout=GUARD) == 9
    assert konn._executor is not old


def test_a_misspelt_executor_option_fails_at_connect():
    with pytest.raises(TypeError, match="workers"):
        kotta_executor.connect(workers=2)
    with pytest.raises(TypeError, match="queu"):
        kotta_executor.connect(None, queu="test")


def test_a_connection_whose_executor_was_shut_down_makes_another(konn):
    """``with konn.executor as ex:`` shuts that executor down at the end of the block; the
    functions decorated with the connection keep working, on a new one."""

    @kottajob(konn, "test", 5)
    def square(x):
        return x * x

    with konn.executor as ex:
        assert ex.submit(tasks.square, 3).result(GUARD) == 9
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.noop)
    assert square(4) == 16
    assert konn.executor is not ex and not konn.executor._shutdown


def test_keyword_arguments_named_as_the_wrappers_own_go_to_the_function(konn):
    """``self``, ``fn`` and the decorator's options are the function's keywords when it
    takes them: a call with ``self=`` was a TypeError of the wrapper ("got multiple values
    for argument 'self'")."""

    @kottajob(konn, "test", 5)
    def fields(**kwargs):
        return sorted(kwargs.items())

    @kottajob(konn, "test", 5)
    def named(self, queue, walltime=1, *, block=None):
        return self, queue, walltime, block

    assert fields(self=1, fn=2, queue=3, walltime=4, block=5) == [
        ("block", 5), ("fn", 2), ("queue", 3), ("self", 1), ("walltime", 4)]
    assert named(self="s", queue="q", walltime=2, block=False) == ("s", "q", 2, False)


def test_a_copied_decorated_function_still_runs_as_a_job(konn, enclave):
    """copy and deepcopy keep a function as it is; they took __reduce__'s undecorated
    function, so a decorated one in a deep-copied structure ran in the client."""

    @kottajob(konn, "test", 5)
    def where(x):
        return os.getpid(), x

    settings = copy.deepcopy({"step": where, "steps": [where]})
    assert settings["step"] is where and settings["steps"][0] is where
    assert copy.copy(where) is where
    pid, value = settings["step"](7)
    assert value == 7 and pid != os.getpid()
    assert len(enclave.jobs.list()) == 1


@pytest.mark.parametrize(
    "options",
    [dict(queue="prod2"), dict(walltime=0), dict(walltime="5"), dict(walltime=-1),
     dict(requirements="numpy --hash=sha256:00")],
)
def test_wrong_option_values_fail_at_connect(enclave_dir, options):
    """As a misspelt option does: they were accepted, and failed the first call of a
    function decorated with the connection, at ``ex = KottaExecutor(...)``."""
    with pytest.raises(ValueError):
        kotta_executor.connect(enclave_dir, **options)
    with kotta_executor.connect(enclave_dir, start_node=False, queue="Prod", walltime=90):
        pass  # (valid ones, as the executor spells them, pass)


@pytest.mark.parametrize(("enclave", "error", "says"), [
    (42, TypeError, "not int 42"),
    ("aws:/lab", kotta_executor.ConfigurationError, "did you mean aws://lab"),
    ("s3://lab", kotta_executor.ConfigurationError, "the scheme 's3' is not supported"),
    ("aws://", kotta_executor.ConfigurationError, "invalid AWS enclave name ''"),
    ("aws://lab?regoin=x", kotta_executor.ConfigurationError, "unknown parameter"),
    # (no such user: accepted, and the first call raised it)
    ("~no-such-user-kotta/lab", kotta_executor.ConfigurationError,
     "cannot use ~no-such-user-kotta/lab as the enclave directory"),
])
def test_a_wrong_enclave_fails_at_connect(tmp_path, monkeypatch, enclave, error, says):
    """connect() opens its enclave at the first call: a wrong one was accepted, and failed
    there (after the notebook's decorated functions were defined with it)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=re.escape(says)):
        kotta_executor.connect(enclave)
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize(("value", "says"), [
    ("aws://a b", "invalid AWS enclave name 'a b'"),
    ("aws:/lab", "did you mean aws://lab"),
    ("s3://lab", "the scheme 's3' is not supported"),
    (" ", "$KOTTA_ENCLAVE is blank"),
    ("embedded://~no-such-user-kotta/lab",
     "cannot use ~no-such-user-kotta/lab as the enclave directory"),
])
def test_a_wrong_kotta_enclave_fails_at_connect(tmp_path, monkeypatch, value, says):
    """connect() without enclave= checked nothing: a wrong $KOTTA_ENCLAVE was accepted, and
    refused by the executor at the first call, as enclave= was (above)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOTTA_ENCLAVE", value)
    with pytest.raises(kotta_executor.ConfigurationError, match=re.escape(says)):
        kotta_executor.connect()
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_a_decorated_partial_or_callable_object_runs_and_has_a_repr(konn):
    """update_wrapper copies no __qualname__ from them: repr() of the decorated object raised
    AttributeError (in a traceback's locals, a debugger, a notebook's display)."""
    partial = kottajob(konn, "test", 5)(functools.partial(tasks.add, 40))
    offset = kottajob(konn, "test", 5)(tasks.Offset(100))
    assert repr(partial) == f"<kottajob {partial.kotta_function!r}>"
    assert repr(offset).startswith("<kottajob <tests.tasks.Offset")
    assert partial(2) == 42
    assert offset(1) == 101


def test_an_interrupted_blocking_call_kills_its_job(konn, enclave, tmp_path):
    """Ctrl-C at a blocking call: its job ran on (nothing held its future to kill it), and
    the end of the interpreter waited for it, up to its walltime."""

    @kottajob(konn, "test", 5)
    def waits(path):
        return tasks.wait_for_file(path)

    main = threading.main_thread().ident

    def interrupt():
        wait_for(lambda: [j for j in enclave.jobs.list() if str(j.state) == "processing"],
                 what="the task to start")
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            waits(str(tmp_path / "never-created"))
    finally:
        interrupter.join(GUARD)
    (job,) = enclave.jobs.list()
    wait_for(lambda: str(enclave.jobs.get(job.job_id).state) == "cancelled",
             what="the interrupted call's job to be killed")


def test_a_decorated_functions_argument_named_inputs_that_is_no_uri_says_how_to_pass_it(konn):
    """A ``@kottajob`` function's ``inputs=``/``outputs=`` are dataset URIs, as submit's.
    A call ``model(inputs=[1, 2])`` of one whose own argument is so named got submit's
    note: "submit() takes inputs= ...; give it by position or with functools.partial" --
    but the user called no submit(), and ``functools.partial(model, inputs=...)`` calls
    the decorated function with the keyword all the same, failing alike.  The note names
    the decorated call now, and a partial that works."""
    from kotta_executor.errors import InvalidDataUri

    @kottajob(konn, "test", 5)
    def model(inputs, scale=1):
        return [x * scale for x in inputs]

    for call in (lambda: model(inputs=[1, 2]), functools.partial(model, inputs=[1, 2])):
        with pytest.raises(InvalidDataUri) as info:
            call()
        assert ("a call of the @kottajob function "
                f"{model.__qualname__} takes inputs= as the dataset URIs the task stages "
                "(s3://...); to pass it an argument so named, give it by position, or submit "
                f"functools.partial({model.__qualname__}.kotta_function, inputs=...)"
                ) in info.value.__notes__, info.value.__notes__
    assert model([1, 2], scale=2) == [2, 4]
    bound = functools.partial(model.kotta_function, inputs=[1, 2], scale=3)
    assert konn.executor.submit(bound).result(timeout=GUARD) == [3, 6]


@pytest.mark.parametrize("thing", [42, "tasks.add", None], ids=["int", "str", "none"])
def test_decorating_what_is_not_callable_fails_at_decoration(enclave_dir, thing):
    """``kottajob(konn)(42)`` (a decorator applied to the wrong thing: a result, a name)
    was taken: the error came at the first call, "42 is not callable", naming no
    decorator."""
    konn = kotta_executor.connect(enclave_dir, start_node=False)
    try:
        with pytest.raises(TypeError, match=re.escape(
                f"kottajob decorates a function (or other callable), not {thing!r}")):
            kottajob(konn, "test", 5)(thing)
        assert konn._executor is None  # nothing was started
    finally:
        konn.close()


async def _coroutine_function(x):
    return x


async def _async_generator_function(n):
    yield n


def _generator_function(n):
    yield from range(n)


class _AsyncCallable:
    async def __call__(self, x):
        return x


class _GeneratorCallable:
    def __call__(self, n):
        yield from range(n)


@pytest.mark.parametrize("fn, returns", [
    (_coroutine_function, "a coroutine"),
    (_async_generator_function, "an async generator"),
    (_generator_function, "a generator"),
    (functools.partial(_generator_function, 3), "a generator"),
    # a callable object whose __call__ is one (decorated functions may be callable objects):
    # accepted, each call ran on a node to fail there with a SerializationError
    (_AsyncCallable(), "a coroutine"),
    (_GeneratorCallable(), "a generator"),
], ids=["async-def", "async-generator", "generator", "partial-of-generator",
        "async-callable-object", "generator-callable-object"])
def test_decorating_a_generator_or_async_function_fails_at_decoration(enclave_dir, fn, returns):
    """Its calls return what no node can send back: each call ran the function on a node,
    to fail there with "the result of the call (builtins.coroutine) could not be pickled
    to send back", a SerializationError that never said the decorated function was the
    matter (and an async def's body never ran at all)."""
    konn = kotta_executor.connect(enclave_dir, start_node=False)
    try:
        with pytest.raises(TypeError, match=re.escape(f"its calls return {returns}")):
            kottajob(konn, "test", 5)(fn)
        assert konn._executor is None  # nothing was started
    finally:
        konn.close()


@pytest.mark.parametrize(("options", "error", "says"), [
    (dict(max_workers=0), ValueError, "max_workers must be greater than 0"),
    (dict(max_workers=2.0), TypeError, "'float' object cannot be interpreted as an integer"),
    (dict(max_tasks_per_child=0), ValueError, "max_tasks_per_child must be >= 1"),
    (dict(max_tasks_per_child="1"), TypeError, "max_tasks_per_child must be an integer"),
    (dict(initializer=42), TypeError, "initializer 42 is not callable"),
    # (accepted, the first call of every decorated function raised it)
    (dict(credentials=42), TypeError, "credentials must be a token file's path or Credentials"),
    # (accepted, and the first call of every decorated function raised it)
    (dict(initializer=print, initargs=(b"x" * 300_000,)), ValueError,
     "over the 262,144 a task message carries"),
])
def test_wrong_pool_options_fail_at_connect(enclave_dir, options, error, says):
    """As a wrong queue or walltime does (the guide: connect() checks its options at
    once): they were accepted, and failed the first call of every function decorated
    with the connection, with the KottaExecutor's error."""
    with pytest.raises(error, match=re.escape(says)):
        kotta_executor.connect(enclave_dir, **options)
    with kotta_executor.connect(enclave_dir, start_node=False, max_workers=1,
                                max_tasks_per_child=1, initializer=print):
        pass  # (valid ones pass)


def test_a_connection_whose_executor_broke_makes_another_at_the_next_call(
        enclave_dir, tmp_path, monkeypatch):
    """A connection kept its broken executor: once the user had fixed what broke it (the
    guide's example, a node.py of theirs on the path: "rename it"), every call still
    raised the same BrokenEnclave, naming a file no longer there, until konn.close()."""
    import importlib

    project = tmp_path / "project"
    project.mkdir()
    (project / "node.py").write_text("class Node:\n    pass\n")
    monkeypatch.syspath_prepend(str(project))
    konn = kotta_executor.connect(enclave_dir, max_workers=1)
    try:
        @kottajob(konn, "test", 5)
        def inc(x):
            return x + 1

        with pytest.raises(kotta_executor.BrokenEnclave, match="node.py has the name"):
            inc(1)
        (project / "node.py").rename(project / "graph.py")  # as the error says
        importlib.invalidate_caches()
        assert inc(1) == 2
    finally:
        _close(konn)


def test_futures_passed_to_a_decorated_function_in_a_task_are_its_dependencies_too(
        konn, enclave):
    """In the client a future passed to a decorated function is a dependency: the call
    gets its value (a failed one: DependencyError).  In a task, where the call runs its
    body, the body got the future itself: a fan-in written for the client,
    ``combine(*[count(y) for y in years])``, failed there with "unsupported operand
    type(s) for +: 'int' and 'Future'"."""
    from kotta_executor import DependencyError

    @kottajob(konn, "test", 5, block=False)
    def count(y):
        if y < 0:
            raise ValueError(f"negative: {y}")
        return y * 2

    @kottajob(konn, "test", 5)
    def combine(*parts, extra=0):
        return sum(parts) + extra

    @kottajob(konn, "test", 5)
    def pipeline(years):
        total = combine(*[count(y) for y in years], extra=count(10))
        try:
            combine(count(1), count(-1))
        except DependencyError as exc:
            return total, type(exc.__cause__).__name__, str(exc.__cause__)
        return total, None, None

    assert combine(*[count(y) for y in (1, 2, 3)], extra=count(10)) == 32  # the client's
    assert pipeline([1, 2, 3]) == (32, "ValueError", "negative: -1")


@pytest.mark.parametrize("spec", ["lab", "embedded://lab"])
def test_a_connection_to_a_relative_directory_keeps_its_enclave_after_a_chdir(
        tmp_path, monkeypatch, spec):
    """connect("lab") opens its enclave at the first call: after an os.chdir("data")
    between the two (a notebook's cell), that call made a new, empty enclave in data/lab
    and its jobs went there, as did the executor it made again after ``close()``."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    konn = kotta_executor.connect(spec, start_node=False)
    monkeypatch.chdir(tmp_path / "data")
    try:
        assert konn.executor.enclave.url == f"embedded://{tmp_path / 'lab'}"
        konn.close()
        assert konn.executor.enclave.url == f"embedded://{tmp_path / 'lab'}"
    finally:
        konn.close()
    assert not (tmp_path / "data" / "lab").exists()


@pytest.mark.parametrize(("owner", "error", "says"), [
    (42, TypeError, "owner must be a user name (a string), not int 42"),
    (b"alice", TypeError, "owner must be a user name (a string), not bytes b'alice'"),
    ("", kotta_executor.ConfigurationError, "owner '' is not a valid user name"),
    ("al ice", kotta_executor.ConfigurationError, "owner 'al ice' is not a valid user name"),
])
def test_a_wrong_owner_fails_at_connect(enclave_dir, owner, error, says):
    """connect() checked every other option at once, not owner=: it was accepted, and the
    first call of each function decorated with the connection raised the executor's
    AuthenticationError "cannot submit as 42" (a check of the token, not of the value)."""
    with pytest.raises(error, match=re.escape(says)):
        kotta_executor.connect(enclave_dir, owner=owner)
    with pytest.raises(error, match=re.escape(says)):  # (the executor's own check, the same)
        KottaExecutor(enclave=enclave_dir, owner=owner, start_node=False)
    with kotta_executor.connect(enclave_dir, start_node=False, owner="alice"):
        pass  # (a valid name passes: whether it is the token's user is the executor's check)


def test_a_connections_initargs_given_as_an_iterator_reach_its_initializer(enclave_dir):
    """connect() pickled the initializer with its initargs to check them, which used up
    an iterator (a generator, ``map(...)``): the connection's executor then ran the
    initializer with no arguments, and every call failed with its TypeError."""
    konn = kotta_executor.connect(enclave_dir, max_workers=1,
                                  initializer=tasks.set_init_status,
                                  initargs=(s for s in ["ready"]))
    try:
        @kottajob(konn, "test", 5)
        def status():
            return tasks.get_init_status()

        assert status()[0] == "ready"
        konn.executor.shutdown()  # and the executor made anew after it: the same
        assert status()[0] == "ready"
    finally:
        _close(konn)
