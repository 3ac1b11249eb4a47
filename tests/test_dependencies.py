"""Futures as arguments: a task waits for them (without a thread) and receives their values.

Real components: the executor starts a real node; tasks run in worker subprocesses.  Tests
synchronise on files (``Gate``), on plain ``concurrent.futures.Future`` objects the test
completes itself, and on ``wait_for``; the only timeouts are deadlock guards.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import weakref

import pytest

from kotta_executor import (
    DependencyError,
    JobFailed,
    KottaFuture,
    SerializationError,
    kottajob,
)
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_executor import JOB_ID, Gate, job_state, wait_started


@pytest.fixture
def gate(tmp_path) -> Gate:
    return Gate(tmp_path)


def test_chain_of_dependencies(executor, enclave):
    a = executor.submit(tasks.square, 3)
    b = executor.submit(tasks.add, a, 1)
    c = executor.submit(tasks.square, b)
    for f in (a, b, c):
        assert isinstance(f, KottaFuture) and JOB_ID.match(f.job_id)
    assert c.result(timeout=GUARD) == 100
    assert b.result(timeout=GUARD) == 10
    assert b.status() == c.status() == "completed"
    assert job_state(enclave, c.job_id) == "completed"


def test_failed_dependency_gives_dependency_error_with_the_cause(executor):
    a = executor.submit(tasks.raise_value_error, "broken input")
    b = executor.submit(tasks.add, a, 1)
    c = executor.submit(tasks.add, b, 1)  # a chain: the failure propagates
    with pytest.raises(DependencyError) as info:
        b.result(timeout=GUARD)
    err = info.value
    assert isinstance(err, JobFailed)
    assert type(err.__cause__) is ValueError
    assert str(err.__cause__) == "broken input"
    assert "ValueError: broken input" in str(err)
    assert err.job_id == b.job_id and err.dependency == a.job_id
    assert b.status() == "failed"
    with pytest.raises(DependencyError) as info:
        c.result(timeout=GUARD)
    assert isinstance(info.value.__cause__, DependencyError)
    assert type(info.value.__cause__.__cause__) is ValueError
    # a dependency that already failed fails a new dependent at once
    d = executor.submit(tasks.add, 1, b=a)
    assert isinstance(d.exception(timeout=GUARD), DependencyError)


def test_cancelled_dependency(executor, gate, enclave):
    plain = cf.Future()
    waiting = executor.submit(tasks.add, plain, 1)
    assert plain.cancel()
    with pytest.raises(DependencyError) as info:
        waiting.result(timeout=GUARD)
    assert type(info.value.__cause__) is cf.CancelledError

    # a Kotta job cancelled while queued: dependents submitted before and after
    a, sa = gate.submit_blocking(executor)
    b, sb = gate.submit_blocking(executor)
    wait_started(sa, sb)
    queued = executor.submit(tasks.noop, 1)
    wait_for(lambda: job_state(enclave, queued.job_id) == "pending", what="queued job record")
    before = executor.submit(tasks.add, queued, 1)
    assert queued.cancel() is True
    after = executor.submit(tasks.add, queued, 1)
    for f in (before, after):
        err = f.exception(timeout=GUARD)
        assert isinstance(err, DependencyError)
        assert isinstance(err.__cause__, cf.CancelledError)
        assert "was cancelled" in str(err)
    gate.open()
    assert a.result(timeout=GUARD) == b.result(timeout=GUARD) == "released"


def test_dependency_from_a_process_pool(executor):
    with cf.ProcessPoolExecutor(1) as pool:
        p = pool.submit(tasks.square, 5)
        f = executor.submit(tasks.add, p, 1)
        assert f.result(timeout=GUARD) == 26
        bad = pool.submit(tasks.raise_value_error, "pool failure")
        g = executor.submit(tasks.add, bad, 1)
        err = g.exception(timeout=GUARD)
        assert isinstance(err, DependencyError)
        assert type(err.__cause__) is ValueError and "pool failure" in str(err.__cause__)


def test_fan_in(executor):
    parts = [executor.submit(tasks.square, i) for i in range(20)]
    total = executor.submit(tasks.total, *parts, start=parts[3])
    assert total.result(timeout=GUARD) == sum(i * i for i in range(20)) + 9


def test_keyword_dependency_and_with_options(executor, enclave):
    a = executor.submit(tasks.square, 4)
    f = executor.submit(tasks.add, 1, b=a)
    assert f.result(timeout=GUARD) == 17
    g = executor.with_options(walltime=2).submit(tasks.add, a=f, b=a)
    assert g.result(timeout=GUARD) == 33
    assert enclave.jobs.get(g.job_id).walltime == 120


def test_decorated_call_takes_a_future(executor):
    add_later = kottajob(executor, block=False)(tasks.add)
    add_now = kottajob(executor)(tasks.add)
    a = add_later(2, 3)
    b = add_later(a, b=a)
    assert isinstance(b, KottaFuture)
    assert b.result(timeout=GUARD) == 10
    assert add_now(b, 1) == 11


def test_cancel_a_dependent_before_its_dependency_finishes(executor, gate, tmp_path, enclave):
    a, sa = gate.submit_blocking(executor)
    marker = tmp_path / "must-not-exist"
    dependent = executor.submit(tasks.create_file, str(marker), a)
    killed = executor.submit(tasks.create_file, str(marker), text=a)
    assert JOB_ID.match(dependent.job_id)
    wait_started(sa)
    assert dependent.status() == "pending"
    assert job_state(enclave, dependent.job_id) is None  # not sent: no job row yet

    assert dependent.cancel() is True
    assert dependent.cancelled() and dependent.done()
    assert dependent.cancel() is True
    assert dependent.status() == "cancelled"
    assert job_state(enclave, dependent.job_id) == "cancelled"  # recorded, never sent
    assert killed.kill() is True
    assert killed.cancelled() and job_state(enclave, killed.job_id) == "cancelled"

    gate.open()
    assert a.result(timeout=GUARD) == "released"
    later = executor.submit(tasks.noop, "later")
    assert later.result(timeout=GUARD) == "later"
    assert not marker.exists()
    assert job_state(enclave, dependent.job_id) == "cancelled"


def test_many_dependents_use_no_thread_each(executor, enclave):
    assert executor.submit(tasks.noop, 0).result(timeout=GUARD) == 0  # manager running
    threads = threading.active_count()
    blocker = cf.Future()
    fs = [executor.submit(tasks.add, blocker, i) for i in range(1000)]
    assert threading.active_count() <= threads + 2
    assert fs[0].status() == fs[-1].status() == "pending"
    assert job_state(enclave, fs[500].job_id) is None
    blocker.set_result(1000)
    assert [f.result(timeout=GUARD) for f in fs] == list(range(1000, 2000))
    assert threading.active_count() <= threads + 2


def test_unpicklable_dependency_value_fails_the_dependent(executor):
    dep = cf.Future()
    f = executor.submit(tasks.noop, dep)
    dep.set_result(threading.Lock())
    err = f.exception(timeout=GUARD)
    assert isinstance(err, SerializationError)
    assert "argument 0" in str(err)
    assert executor.submit(tasks.noop, 2).result(timeout=GUARD) == 2


def test_shutdown_waits_for_dependents(make_executor, gate):
    ex = make_executor(1)
    a, sa = gate.submit_blocking(ex)
    b = ex.submit(tasks.noop, a)
    wait_started(sa)
    stopper = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_for(lambda: ex._shutdown, what="shutdown to begin")
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.noop, a)
    gate.open()
    stopper.join(GUARD)
    assert not stopper.is_alive()
    assert b.done() and b.result(timeout=0) == "released"


def test_a_task_failed_by_its_dependency_is_recorded_failed(executor, enclave):
    bad = executor.submit(tasks.raise_value_error, "no data for 1999")
    dependent = executor.submit(tasks.square, bad)
    with pytest.raises(DependencyError):
        dependent.result(timeout=GUARD)
    job = enclave.jobs.get(dependent.job_id)
    assert job is not None and job.state == "failed"
    assert "DependencyError" in job.reason and bad.job_id in job.reason


def test_a_waiting_task_put_back_after_its_dependency_ended_is_ready_again():
    """A cancel() takes a waiting task, its dependency ends meanwhile (the manager finds
    the ready entry not waiting, and passes over it), and the cancel fails (the enclave
    is down): put back, the task must be ready again, or it is never sent."""
    from concurrent.futures import Future

    from kotta_executor.dependencies import Dependencies

    class Job(Future):
        job_id = "ab" * 16

    woken = []
    deps = Dependencies(wake=lambda: woken.append(1))
    dep, job = Future(), Job()
    deps.add(job, tasks.square, [((dep,), {})], None, [dep])
    w = deps.take(job.job_id)
    dep.set_result(5)
    assert deps.ready.popleft() is w and job.job_id not in deps.waiting  # passed over
    woken.clear()
    deps.put_back(w)
    assert deps.waiting[job.job_id] is w
    assert list(deps.ready) == [w] and woken
    # one not yet due goes back to waiting only
    other, pending_dep = Job(), Future()
    other.job_id = "cd" * 16
    deps.add(other, tasks.square, [((pending_dep,), {})], None, [pending_dep])
    deps.ready.clear()
    deps.put_back(deps.take(other.job_id))
    assert other.job_id in deps.waiting and not deps.ready


def test_a_call_waiting_for_a_future_with_an_unpicklable_argument_fails_in_submit(
        make_executor):
    """The guide: a call that cannot be pickled fails in submit, and nothing is sent.  With
    a future among its arguments nothing was pickled at submit: it returned a future,
    which failed later, on the manager thread.  What can be pickled now is."""
    ex = make_executor(2, start_node=False)
    dep: cf.Future = cf.Future()
    with pytest.raises(SerializationError, match="lock"):
        ex.submit(tasks.add, dep, b=threading.Lock())
    with pytest.raises(SerializationError, match="lock"):  # in map, the map() call
        ex.map(tasks.add, [dep], [threading.Lock()])
    assert not ex._futures and not ex._deps.waiting  # nothing sent, nothing waits
    dep.set_result(1)


def test_a_dependent_task_lets_go_of_its_arguments_once_it_is_decided(executor):
    """A future many tasks depend on is often kept (data a session loads once): its done
    callbacks must not keep each dependent's other arguments (big data) alive once the
    dependent is sent, failed or cancelled."""
    kept = cf.Future()  # held by the test throughout, as a session holds its data
    sent, failed, cancelled = tasks.Bulky(), tasks.Bulky(), tasks.Bulky()
    refs = [weakref.ref(x) for x in (sent, failed, cancelled)]
    a = executor.submit(tasks.first_arg, kept, sent)
    fails = cf.Future()
    b = executor.submit(tasks.first_arg, kept, fails, failed)
    c = executor.submit(tasks.first_arg, kept, cancelled)
    del sent, failed, cancelled
    assert c.cancel() is True
    fails.set_exception(KeyError("no"))
    assert isinstance(b.exception(timeout=GUARD), DependencyError)
    kept.set_result("value")
    assert a.result(timeout=GUARD) == "value"
    gc.collect()
    assert [r() for r in refs] == [None, None, None]



def test_a_failed_dependent_lets_go_of_the_dependency_that_failed_it(executor):
    """A dependent failed by one of its dependencies kept that dependency's future (its
    result or exception, a Kotta job's captured stdout and stderr) as long as another of
    its dependencies lived, in that one's done-callbacks: a future many tasks wait for
    (data a session loads once) kept every failed dependency of theirs."""
    kept = cf.Future()  # never done, held throughout, as a session holds its data
    fails = cf.Future()
    b = executor.submit(tasks.add, kept, fails)
    fails.set_exception(KeyError("no data"))
    assert isinstance(b.exception(timeout=GUARD), DependencyError)
    ref = weakref.ref(fails)
    del fails
    gc.collect()
    assert ref() is None


def test_a_long_chain_of_failed_dependents_names_the_head_of_the_chain(make_executor, enclave):
    """Each DependencyError's message held its dependency's whole message: the 50th task of
    a failed chain said "did not run" 50 times over, and a chain of 1000 wrote some 2 GB of
    records to the enclave.  Each names its dependency and what failed at the head."""
    ex = make_executor(1, start_node=False)  # nothing here runs: no node needed
    head = cf.Future()
    chain = [ex.submit(tasks.add, head, 1)]
    for _ in range(49):
        chain.append(ex.submit(tasks.add, chain[-1], 1))
    head.set_exception(ValueError("no data for 1999"))
    first, second, last = (chain[i].exception(timeout=GUARD) for i in (0, 1, -1))
    assert str(first) == (f"job {chain[0].job_id} did not run: its dependency (a future) "
                          "failed: ValueError: no data for 1999")
    assert str(second) == (f"job {chain[1].job_id} did not run: its dependency (job "
                           f"{chain[0].job_id}) did not run, as a future before it failed: "
                           "ValueError: no data for 1999")
    assert str(last) == (f"job {chain[-1].job_id} did not run: its dependency (job "
                         f"{chain[-2].job_id}) did not run, as a future before it failed: "
                         "ValueError: no data for 1999")
    assert last.dependency == chain[-2].job_id
    assert isinstance(last.__cause__, DependencyError) and last.__cause__ is chain[-2].exception()
    assert str(ex.attach(chain[-1].job_id).exception(timeout=GUARD)) == str(last)

    # a Kotta job at the head, cancelled: named by its id
    queued = cf.Future()
    waits = ex.submit(tasks.add, queued, 1)
    after = ex.submit(tasks.add, ex.submit(tasks.add, waits, 1), 1)
    assert waits.cancel()
    err = after.exception(timeout=GUARD)
    assert str(err).endswith(f"did not run, as job {waits.job_id} before it was cancelled")



def test_a_dependency_that_ran_and_raised_a_dependency_error_is_not_said_not_to_have_run(executor):
    """A task that ran and let out a DependencyError of its own (a decorated call in it was
    given a failed future) was taken, by its dependents, for one failed before it ran: they
    said "its dependency (job B) did not run, as a future before it failed", though B ran.
    Now B is said to have failed with its DependencyError; a chain after it names B."""
    b = executor.submit(tasks.fan_in_of_a_failed_call)
    c = executor.submit(tasks.add, b, 1)
    d = executor.submit(tasks.add, c, 1)
    raised = b.exception(timeout=GUARD)
    assert isinstance(raised, DependencyError) and raised.job_id is None  # (the call's, in b)
    assert str(c.exception(timeout=GUARD)) == (
        f"job {c.job_id} did not run: its dependency (job {b.job_id}) failed: "
        f"DependencyError: {raised}")
    assert str(d.exception(timeout=GUARD)) == (
        f"job {d.job_id} did not run: its dependency (job {c.job_id}) did not run, as job "
        f"{b.job_id} before it failed: DependencyError: {raised}")

class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot say what it is")


def test_a_dependency_whose_exception_cannot_be_printed_still_fails_its_dependent(make_executor):
    """Building the DependencyError's message called str() of the dependency's exception on
    the manager thread: one whose __str__ raised was taken for an enclave fault, and the
    dependent waited for ever (shutdown(wait=True) too)."""
    ex = make_executor(1, start_node=False)
    dep = cf.Future()
    f = ex.submit(tasks.add, dep, 1)
    after = ex.submit(tasks.add, f, 1)
    dep.set_exception(_Unprintable())
    err = f.exception(timeout=GUARD)
    assert isinstance(err, DependencyError) and type(err.__cause__) is _Unprintable
    assert "_Unprintable: (its message could not be read" in str(err)
    assert isinstance(after.exception(timeout=GUARD), DependencyError)
    assert f.status() == "failed"


def test_a_future_inside_a_list_is_refused_saying_why(make_executor):
    """Futures inside containers are not waited for (the guide): submit(fn, [f1, f2]) failed
    with "cannot pickle '_thread._local' object", which says nothing of futures."""
    ex = make_executor(1, start_node=False)
    dep = ex.submit(tasks.square, 2)
    for call in (lambda: ex.submit(tasks.total, [dep]),
                 lambda: ex.submit(tasks.noop, x={"part": dep}),
                 lambda: ex.map(tasks.noop, [[dep]])):
        with pytest.raises(SerializationError) as info:
            call()
        message = str(info.value)
        assert f"a KottaFuture (job {dep.job_id}) cannot be sent to a task, nor returned" in message
        assert "not one inside a list" in message
    assert list(ex._futures) == [dep.job_id]  # nothing else was sent


def test_a_plain_future_inside_a_list_is_refused_saying_why(make_executor):
    """Only a KottaFuture said why: a plain concurrent.futures.Future (a process pool's, or
    a block=False decorated call's) inside a list failed with "cannot pickle
    '_thread.RLock' object", naming a lock the user never made; so did a task returning
    such futures."""
    ex = make_executor(1)
    pending, done = cf.Future(), cf.Future()
    done.set_result(2)
    for dep in (pending, done):
        for call in (lambda dep=dep: ex.submit(tasks.total, [dep]),
                     lambda dep=dep: ex.submit(tasks.noop, x={"part": dep}),
                     lambda dep=dep: ex.map(tasks.noop, [[dep]])):
            with pytest.raises(SerializationError) as info:
                call()
            message = str(info.value)
            assert "a Future (<Future at" in message and "not one inside a list" in message
            assert "_thread.RLock" not in message
    assert not ex._futures  # nothing was sent
    err = ex.submit(tasks.return_a_future, 3).exception(timeout=GUARD)
    assert isinstance(err, SerializationError)
    assert "a Future (<Future at" in str(err) and "its result()" in str(err)
    assert "_thread.RLock" not in str(err)
