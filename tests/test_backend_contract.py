"""The backend contract: one suite that every enclave backend must pass.

Tests here use only the abstract interface of :mod:`kotta_executor.backends.base`
(``enclave.queue`` / ``.blobs`` / ``.jobs`` / ``.nodes`` / ``.atomic()``), never SQL or
another backend's internals.  Backends are bound through the parametrized ``backend``
fixture; :data:`BACKENDS` says how to open each one and what it promises beyond the
common contract (a few tests only apply to backends with a capability, and are skipped
elsewhere).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kotta_executor.backends import open_enclave
from kotta_executor.backends.base import (
    KILLED_PENDING,
    Delivery,
    Enclave,
    Finished,
    Message,
    NewJob,
    NodeInfo,
)
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import InvalidTransition
from kotta_executor.states import CANCELLABLE, FINAL, JobState, allowed, sources
from tests.conftest import GUARD, wait_for

# ---------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendSpec:
    """How to open one backend, and what it promises beyond the common contract."""

    #: ``open(tmp_path)`` is a context manager yielding a fresh, empty enclave
    open: Callable[[Path], AbstractContextManager[Enclave]]
    #: ``enclave.atomic()`` groups the calls made inside it into one transaction
    transactional: bool
    #: another process reaches the same enclave with ``open_enclave(enclave.url)``
    multiprocess: bool
    #: node liveness also checks the node's pid on this machine, not only heartbeats
    checks_pids: bool
    #: ``queue.hand_back`` takes the receive back (SQS cannot: it counts, as a release)
    uncounts: bool = False


@contextlib.contextmanager
def _embedded(tmp_path: Path) -> Iterator[Enclave]:
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        yield enclave
    finally:
        enclave.close()


BACKENDS: dict[str, BackendSpec] = {
    "embedded": BackendSpec(
        open=_embedded, transactional=True, multiprocess=True, checks_pids=True,
        uncounts=True,
    ),
    # The AWS backend on in-process moto (tests/aws_moto.py): mock_aws cannot be reached
    # from another process, and nodes are judged by heartbeats only.
    "aws": BackendSpec(
        open=lambda tmp_path: _aws_moto().aws_on_moto(tmp_path), transactional=False,
        multiprocess=False, checks_pids=False,
    ),
}


def _aws_moto():
    from tests import aws_moto

    return aws_moto


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path) -> Iterator[Enclave]:
    """A fresh, empty enclave of each backend in :data:`BACKENDS`."""
    if request.param == "aws":  # what SQS cannot promise: see tests/aws_moto.py
        _aws_moto().expect_on_aws(request)
    with BACKENDS[request.param].open(tmp_path) as enclave:
        yield enclave


@pytest.fixture
def spec(backend, request) -> BackendSpec:
    """The :class:`BackendSpec` of the ``backend`` this test runs on."""
    return BACKENDS[request.node.callspec.params["backend"]]


# ----------------------------------------------------------------------------- helpers

#: a short visibility timeout, for tests that wait for a message to come back
VT = 0.3
#: a visibility timeout no test outlives
LONG = 60.0
#: more than the largest result a backend keeps inline
LARGE = (1 << 20) + 17


def new_job(owner: str = "alice", queue: str = "work", client: str = "client-1",
            n: int = 1) -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id=job_id, owner=owner, client=client, queue=queue,
                  fn="tests.tasks:add", walltime=30.0, body=f"task:{job_id}".encode(), n=n)


def create(enclave: Enclave, count: int = 1, **kwargs) -> list[str]:
    jobs = [new_job(**kwargs) for _ in range(count)]
    enclave.jobs.create(jobs)
    return [j.job_id for j in jobs]


def messages(*names: str) -> list[Message]:
    return [Message(name, f"body:{name}".encode()) for name in names]


def received(enclave: Enclave, queue: str, max_messages: int = 100,
             visibility_timeout: float = LONG, holder: str = "holder") -> list[Delivery]:
    return enclave.queue.receive(queue, max_messages, visibility_timeout, holder)


def redelivery(enclave: Enclave, queue: str, visibility_timeout: float = LONG,
               ) -> list[Delivery]:
    """Poll until something on ``queue`` is visible again, and receive it."""
    return wait_for(lambda: received(enclave, queue, visibility_timeout=visibility_timeout),
                    what=f"a redelivery on {queue}")


def stays_invisible(enclave: Enclave, queue: str, until: float) -> None:
    """Poll ``queue`` until wall-clock time ``until``, failing if anything is received."""

    def check() -> bool:
        got = received(enclave, queue, holder="spy")
        assert got == [], f"delivered while it should be invisible: {got}"
        return time.time() >= until

    wait_for(check, what="the visibility window to pass")


def path_to(target: JobState) -> list[JobState]:
    """The shortest sequence of allowed moves from pending to ``target`` (per states)."""
    paths = {JobState.PENDING: []}
    frontier = [JobState.PENDING]
    while frontier:
        nxt = []
        for s in frontier:
            for t in JobState:
                if t not in paths and allowed(s, t):
                    paths[t] = [*paths[s], t]
                    nxt.append(t)
        frontier = nxt
    return paths[target]


def drive(enclave: Enclave, job_id: str, target: JobState) -> None:
    """Bring a fresh (pending) job to ``target`` along a shortest allowed path."""
    for step in path_to(target):
        assert enclave.jobs.transition([job_id], step) == [job_id]
    assert enclave.jobs.get(job_id).state == target


def state_of(enclave: Enclave, job_id: str) -> JobState:
    return enclave.jobs.get(job_id).state


def jobs_in_every_state(enclave: Enclave) -> dict[JobState, str]:
    by_state = {}
    for s in JobState:
        [job_id] = create(enclave)
        drive(enclave, job_id, s)
        by_state[s] = job_id
    return by_state


# ------------------------------------------------------------------------------- queue


def test_receive_is_fifo_within_a_batch(backend):
    backend.queue.send("q", messages("a", "b", "c", "d", "e"))
    got = received(backend, "q", 10)
    assert [d.job_id for d in got] == ["a", "b", "c", "d", "e"]
    assert [d.body for d in got] == [f"body:{x}".encode() for x in "abcde"]
    assert all(d.receive_count == 1 for d in got)
    assert len({d.receipt for d in got}) == 5


def test_receive_respects_max_messages(backend):
    backend.queue.send("q", messages("a", "b", "c", "d", "e"))
    assert [d.job_id for d in received(backend, "q", 2)] == ["a", "b"]
    assert [d.job_id for d in received(backend, "q", 1)] == ["c"]
    assert [d.job_id for d in received(backend, "q", 10)] == ["d", "e"]
    assert received(backend, "q", 10) == []


def test_received_message_is_invisible_until_its_timeout_then_redelivered(backend):
    backend.queue.send("q", messages("a"))
    t0 = time.time()
    [first] = received(backend, "q", visibility_timeout=VT)
    assert first.receive_count == 1
    again = received(backend, "q")
    assert again == [] or time.time() >= t0 + VT, "redelivered before its timeout"
    assert backend.queue.depth("q") == 1  # in flight still counts

    [second] = redelivery(backend, "q")
    assert time.time() >= t0 + VT
    assert (second.job_id, second.body) == (first.job_id, first.body)
    assert second.receive_count == 2
    assert second.receipt != first.receipt


def test_ack_removes_the_message(backend):
    backend.queue.send("q", messages("a", "b"))
    a, b = received(backend, "q", visibility_timeout=VT)
    backend.queue.ack([a])
    assert backend.queue.depth("q") == 1
    [again] = redelivery(backend, "q")
    assert again.job_id == "b"
    backend.queue.ack([again])
    assert backend.queue.depth("q") == 0
    assert received(backend, "q") == []


def test_stale_receipt_cannot_ack_a_later_delivery_after_timeout(backend):
    backend.queue.send("q", messages("a"))
    [old] = received(backend, "q", visibility_timeout=VT)
    [new] = redelivery(backend, "q")  # held for LONG now
    assert new.receive_count == 2

    backend.queue.ack([old])
    assert backend.queue.depth("q") == 1
    backend.queue.release([old])
    backend.queue.dead_letter([old], "stale")
    assert backend.queue.depth("q") == 1
    assert backend.queue.dead_letters("q") == []
    assert received(backend, "q") == [], "a stale release made the later delivery visible"

    backend.queue.ack([new])
    assert backend.queue.depth("q") == 0


def test_stale_receipt_cannot_ack_a_later_delivery_after_release(backend):
    backend.queue.send("q", messages("a"))
    [old] = received(backend, "q")
    backend.queue.release([old])
    [new] = received(backend, "q")
    backend.queue.ack([old])
    assert backend.queue.depth("q") == 1
    backend.queue.ack([new])
    assert backend.queue.depth("q") == 0


def test_extend_keeps_a_message_invisible_beyond_its_original_timeout(backend):
    backend.queue.send("q", messages("a"))
    t0 = time.time()
    [d] = received(backend, "q", visibility_timeout=VT)
    backend.queue.extend([d], LONG)
    stays_invisible(backend, "q", until=t0 + 2 * VT)

    # extending again with a short timeout lets it come back after that one
    backend.queue.extend([d], VT)
    [again] = redelivery(backend, "q")
    assert again.job_id == "a" and again.receive_count == 2


def test_stale_receipt_cannot_extend_a_later_delivery(backend):
    backend.queue.send("q", messages("a"))
    [old] = received(backend, "q")
    backend.queue.release([old])
    t0 = time.time()
    [new] = received(backend, "q", visibility_timeout=VT)
    backend.queue.extend([old], LONG)
    [again] = redelivery(backend, "q")
    assert time.time() >= t0 + VT
    assert again.receive_count == 3 and new.receive_count == 2


def test_release_makes_a_message_visible_at_once(backend):
    backend.queue.send("q", messages("a", "b"))
    a, b = received(backend, "q", visibility_timeout=LONG)
    backend.queue.release([b])
    [again] = received(backend, "q")
    assert again.job_id == "b" and again.receive_count == 2
    assert received(backend, "q") == []
    assert backend.queue.depth("q") == 2


def test_hand_back_makes_a_message_visible_at_once_taking_the_receive_back_where_it_can(
        backend, spec):
    """A stopping node's unclaimed tasks: visible again at once, as ``release``; where the
    backend can (not SQS), that receive does not count toward the delivery limit."""
    backend.queue.send("q", messages("a"))
    [a] = received(backend, "q", visibility_timeout=LONG)
    backend.queue.hand_back([a])
    [again] = received(backend, "q", visibility_timeout=LONG)
    count = 1 if spec.uncounts else 2
    assert again.job_id == "a" and again.receive_count == count
    backend.queue.hand_back([again])
    assert [m.receive_count for m in received(backend, "q")] == [count + (not spec.uncounts)]


def test_a_delivery_handed_back_twice_takes_back_one_receive(backend, spec):
    """hand_back takes back the receive of the delivery handed back, once: handed back
    again (or once released), it took back another, an earlier one, and a message
    delivered twice counted none (``--max-deliveries`` never reached)."""
    backend.queue.send("q", messages("a"))
    [first] = received(backend, "q")
    backend.queue.release([first])
    [second] = received(backend, "q")
    assert second.receive_count == 2
    backend.queue.hand_back([second])
    backend.queue.hand_back([second])
    backend.queue.hand_back([second, second])
    [third] = received(backend, "q")
    assert third.receive_count == (2 if spec.uncounts else 3)
    backend.queue.release([third])
    backend.queue.hand_back([third])  # a released delivery's receive stays counted
    assert [d.receive_count for d in received(backend, "q")] == [
        3 if spec.uncounts else 4]


def test_each_delivery_of_a_message_names_the_message(backend):
    """``message_id``: the same in every delivery of one message, another for another
    message, even of the same job (a node tells a message it holds, come again, from a
    copy of its task)."""
    backend.queue.send("q", [Message("j", b"one"), Message("j", b"two")])
    one, two = received(backend, "q")
    assert one.message_id and two.message_id and one.message_id != two.message_id
    backend.queue.release([one])
    [again] = received(backend, "q")
    assert (again.body, again.message_id) == (b"one", one.message_id)
    assert again.receipt != one.receipt


def test_dead_letter_moves_a_message_out(backend):
    backend.queue.send("q", messages("a", "b"))
    a, b = received(backend, "q")
    backend.queue.release([a])
    [a2] = received(backend, "q")
    assert a2.receive_count == 2
    backend.queue.dead_letter([a2], "delivered too often")
    assert backend.queue.depth("q") == 1
    backend.queue.release([b])
    assert [d.job_id for d in received(backend, "q")] == ["b"]

    [dead] = backend.queue.dead_letters("q")
    assert dead["job_id"] == "a"
    assert dead["reason"] == "delivered too often"
    assert dead["receive_count"] == 2
    assert backend.queue.dead_letters("other") == []


def test_take_receives_and_deletes(backend):
    backend.queue.send("reply.c", messages("a", "b", "c"))
    got = backend.queue.take("reply.c", 2)
    assert got == messages("a", "b")
    assert backend.queue.depth("reply.c") == 1
    assert backend.queue.take("reply.c", 10) == messages("c")
    assert backend.queue.take("reply.c", 10) == []
    assert backend.queue.depth("reply.c") == 0


def test_take_leaves_in_flight_messages_alone(backend):
    backend.queue.send("q", messages("a", "b"))
    [held] = received(backend, "q", 1)
    assert held.job_id == "a"
    assert backend.queue.take("q", 1) == messages("b")
    assert backend.queue.depth("q") == 1
    backend.queue.ack([held])
    assert backend.queue.depth("q") == 0


def test_queues_are_isolated_by_name(backend):
    backend.queue.send("one", messages("a", "b"))
    backend.queue.send("two", messages("x"))
    assert backend.queue.depth("one") == 2
    assert backend.queue.depth("two") == 1
    assert backend.queue.depth("three") == 0
    assert received(backend, "three") == []
    assert [d.job_id for d in received(backend, "two")] == ["x"]
    [a, b] = received(backend, "one")
    backend.queue.dead_letter([a], "why not")
    assert backend.queue.dead_letters("two") == []
    assert [d["job_id"] for d in backend.queue.dead_letters("one")] == ["a"]
    assert backend.queue.take("two", 10) == []
    assert backend.queue.depth("one") == 1 and backend.queue.depth("two") == 1


def test_depth_counts_waiting_and_in_flight(backend):
    assert backend.queue.depth("q") == 0
    backend.queue.send("q", messages("a", "b", "c"))
    assert backend.queue.depth("q") == 3
    a, b = received(backend, "q", 2)
    assert backend.queue.depth("q") == 3
    backend.queue.ack([a])
    assert backend.queue.depth("q") == 2
    backend.queue.dead_letter([b], "x")
    assert backend.queue.depth("q") == 1
    backend.queue.send("q", [])
    assert backend.queue.depth("q") == 1


class QueueMachine(RuleBasedStateMachine):
    """Random send / receive / ack / release / extend / dead-letter / take, with stale
    receipts mixed in, against a model: nothing sent is lost or duplicated."""

    def __init__(self, enclave: Enclave):
        super().__init__()
        self.q = enclave.queue
        self.name = f"prop-{uuid.uuid4().hex[:12]}"
        self.seq = 0
        self.sent: list[str] = []
        self.waiting: list[str] = []  # visible, oldest first
        self.held: dict[str, Delivery] = {}  # in flight, with the current receipt
        self.released: dict[str, Delivery] = {}  # visible again; receipt not yet replaced
        self.stale: list[Delivery] = []  # receipts replaced by a later delivery
        self.counts: Counter[str] = Counter()
        self.acked: list[str] = []
        self.taken: list[str] = []
        self.dead: dict[str, tuple[int, str]] = {}

    def _order(self) -> None:
        self.waiting.sort(key=lambda job_id: int(job_id[1:]))

    @rule(n=st.integers(1, 3))
    def send(self, n):
        names = [f"m{self.seq + i}" for i in range(n)]
        self.seq += n
        self.q.send(self.name, messages(*names))
        self.sent += names
        self.waiting += names

    @rule(k=st.integers(1, 4))
    def receive(self, k):
        got = self.q.receive(self.name, k, LONG, "prop")
        assert [d.job_id for d in got] == self.waiting[:k]
        for d in got:
            self.waiting.remove(d.job_id)
            self.counts[d.job_id] += 1
            assert d.receive_count == self.counts[d.job_id]
            assert d.body == f"body:{d.job_id}".encode()
            if d.job_id in self.released:
                self.stale.append(self.released.pop(d.job_id))
            self.held[d.job_id] = d

    def _pick(self, i: int) -> Delivery:
        return self.held[sorted(self.held)[i % len(self.held)]]

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def ack(self, i):
        d = self._pick(i)
        self.q.ack([d])
        del self.held[d.job_id]
        self.acked.append(d.job_id)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def release(self, i):
        d = self._pick(i)
        self.q.release([d])
        del self.held[d.job_id]
        self.released[d.job_id] = d
        self.waiting.append(d.job_id)
        self._order()

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def extend(self, i):
        self.q.extend([self._pick(i)], LONG)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99), reason=st.sampled_from(["poison", "too many deliveries"]))
    def dead_letter(self, i, reason):
        d = self._pick(i)
        self.q.dead_letter([d], reason)
        del self.held[d.job_id]
        self.dead[d.job_id] = (self.counts[d.job_id], reason)

    @precondition(lambda self: self.stale)
    @rule(i=st.integers(0, 99), op=st.sampled_from(["ack", "release", "extend", "dead"]))
    def use_stale_receipt(self, i, op):
        d = self.stale[i % len(self.stale)]
        if op == "ack":
            self.q.ack([d])
        elif op == "release":
            self.q.release([d])
        elif op == "extend":
            self.q.extend([d], 0.0)
        else:
            self.q.dead_letter([d], "stale")

    # take() only while nothing is in flight: see test_take_leaves_in_flight_messages_alone
    @precondition(lambda self: not self.held)
    @rule(k=st.integers(1, 4))
    def take(self, k):
        got = self.q.take(self.name, k)
        assert [m.job_id for m in got] == self.waiting[:k]
        for m in got:
            self.waiting.remove(m.job_id)
            self.released.pop(m.job_id, None)
            self.taken.append(m.job_id)

    @invariant()
    def depth_matches(self):
        assert self.q.depth(self.name) == len(self.waiting) + len(self.held)

    @invariant()
    def dead_letters_match(self):
        dead = {d["job_id"]: (d["receive_count"], d["reason"])
                for d in self.q.dead_letters(self.name)}
        assert dead == self.dead

    @invariant()
    def nothing_lost_or_duplicated(self):
        places = [*self.acked, *self.taken, *self.waiting, *self.held, *self.dead]
        assert sorted(places) == sorted(self.sent)

    def teardown(self):
        # what the queue really holds is exactly what the model says is still there
        self.q.release(self.held.values())
        rest = self.q.receive(self.name, 1000, LONG, "drain")
        assert sorted(d.job_id for d in rest) == sorted([*self.waiting, *self.held])
        self.q.ack(rest)
        assert self.q.depth(self.name) == 0


def test_queue_state_machine(backend):
    run_state_machine_as_test(
        lambda: QueueMachine(backend),
        settings=settings(max_examples=50, stateful_step_count=25, deadline=None,
                          database=None, suppress_health_check=list(HealthCheck)),
    )


# -------------------------------------------------------------------------------- jobs


def test_create_makes_pending_records_and_enqueues_their_tasks(backend):
    jobs = [new_job(queue="work", n=3), new_job(queue="work"), new_job(queue="other")]
    before = time.time()
    backend.jobs.create(jobs)
    records = backend.jobs.get_many([j.job_id for j in jobs])
    assert set(records) == {j.job_id for j in jobs}
    for j in jobs:
        r = records[j.job_id]
        assert r.state == JobState.PENDING
        assert (r.owner, r.client, r.queue, r.fn, r.walltime, r.n) == (
            j.owner, j.client, j.queue, j.fn, j.walltime, j.n)
        assert r.attempts == 0 and not r.kill_requested
        assert r.node is None and r.reason is None and r.result is None
        assert r.started is None and r.finished is None
        assert before - 1 <= r.created <= r.updated <= time.time() + 1
    assert backend.queue.depth("work") == 2 and backend.queue.depth("other") == 1
    got = received(backend, "work")
    assert [(d.job_id, d.body) for d in got] == [(j.job_id, j.body) for j in jobs[:2]]
    [other] = received(backend, "other")
    assert (other.job_id, other.body) == (jobs[2].job_id, jobs[2].body)


def test_create_without_enqueue_records_jobs_only(backend):
    """``enqueue=False``: pending records and no task message (tasks a client never sent,
    which it records cancelled or failed at once)."""
    jobs = [new_job(queue="work"), new_job(queue="work", n=2)]
    backend.jobs.create(jobs, enqueue=False)
    records = backend.jobs.get_many([j.job_id for j in jobs])
    assert {j: r.state for j, r in records.items()} == {j.job_id: JobState.PENDING for j in jobs}
    assert records[jobs[1].job_id].n == 2
    assert backend.queue.depth("work") == 0
    assert received(backend, "work") == []
    assert backend.jobs.transition([j.job_id for j in jobs], JobState.CANCELLED) == [
        j.job_id for j in jobs
    ]


def test_create_is_atomic(backend, spec):
    if not spec.transactional:
        pytest.skip("create() is only atomic on transactional backends")
    first = new_job()
    backend.jobs.create([first])
    bad = new_job()
    bad.owner = None  # a record the backend cannot write
    fresh = new_job()
    with pytest.raises(Exception):  # noqa: B017 - the backend's own constraint error
        backend.jobs.create([fresh, bad])
    assert backend.jobs.get(fresh.job_id) is None
    assert backend.jobs.get(bad.job_id) is None
    assert [d.job_id for d in received(backend, "work")] == [first.job_id]


def test_create_again_keeps_the_record_and_queues_the_task_again(backend):
    """A create retried after a failure that came once its records were written (the
    executor's retry of a lone submit whose send failed) must not put a pending record
    back over a job that has run: that job would run again and get a second result."""
    job = new_job()
    backend.jobs.create([job])
    [first] = received(backend, "work")
    assert backend.jobs.transition([job.job_id], JobState.PROCESSING, node="n1") == [job.job_id]
    assert backend.jobs.finish([Finished(job.job_id, JobState.COMPLETED, b"one")]) == [job.job_id]
    backend.queue.ack([first])
    again = new_job()
    again.job_id, again.owner, again.body = job.job_id, "mallory", b"task:other"
    fresh = new_job()
    backend.jobs.create([again, fresh])
    r = backend.jobs.get(job.job_id, with_result=True)
    assert (r.state, r.result, r.owner, r.attempts) == (JobState.COMPLETED, b"one", "alice", 1)
    assert [state for _, state, _ in backend.jobs.history(job.job_id)] == [
        "pending", "processing", "completed"]
    assert backend.jobs.get(fresh.job_id).state == JobState.PENDING
    # the task is queued again; a node's first-delivery claim (from pending) drops it
    got = {d.job_id: d.body for d in received(backend, "work")}
    assert got == {job.job_id: b"task:other", fresh.job_id: fresh.body}
    assert backend.jobs.transition([job.job_id], JobState.PROCESSING,
                                   from_states=[JobState.PENDING]) == []


def test_create_naming_a_job_twice_records_the_first(backend):
    """One create() naming a job id twice: the first is recorded, and the second kept out,
    as a create naming an id recorded already is (the AWS backend recorded the last)."""
    first, second = new_job(owner="alice"), new_job(owner="mallory")
    second.job_id, second.body = first.job_id, b"task:second"
    backend.jobs.create([first, second])
    r = backend.jobs.get(first.job_id)
    assert (r.owner, r.state) == ("alice", JobState.PENDING)
    assert [state for _, state, _ in backend.jobs.history(first.job_id)] == ["pending"]
    # both tasks are queued, as a create of an id recorded already queues its task again
    assert [d.body for d in received(backend, "work")] == [first.body, b"task:second"]


def test_failed_call_inside_atomic_leaves_nothing_behind(backend, spec):
    if not spec.transactional:
        pytest.skip("atomic() groups nothing on this backend")
    a, b = create(backend, 2)
    backend.jobs.transition([a, b], JobState.PROCESSING)
    with backend.atomic():
        with pytest.raises((InvalidTransition, ValueError)):
            backend.jobs.finish([Finished(a, JobState.COMPLETED, b"done"),
                                 Finished(b, JobState.STAGING_OUTPUTS, b"not final")])
        backend.queue.send("side", messages("x"))
    # the finish() call failed as a whole: it recorded nothing
    r = backend.jobs.get(a, with_result=True)
    assert (r.state, r.result) == (JobState.PROCESSING, None)
    assert backend.queue.depth("side") == 1


def test_atomic_groups_calls_into_one_transaction(backend, spec):
    if not spec.transactional:
        pytest.skip("atomic() groups nothing on this backend")
    job = new_job()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), backend.atomic():
        backend.jobs.create([job])
        backend.queue.send("side", messages("x"))
        raise Boom
    assert backend.jobs.get(job.job_id) is None
    assert backend.queue.depth("work") == 0 and backend.queue.depth("side") == 0

    with backend.atomic():
        backend.jobs.create([job])
        assert backend.jobs.transition([job.job_id], JobState.PROCESSING) == [job.job_id]
    assert state_of(backend, job.job_id) == JobState.PROCESSING


@pytest.mark.parametrize("new", list(JobState), ids=str)
def test_transition_moves_only_from_allowed_states(backend, new):
    by_state = jobs_in_every_state(backend)
    unknown = uuid.uuid4().hex
    moved = backend.jobs.transition([*by_state.values(), unknown], new)
    expected = {job_id for s, job_id in by_state.items() if allowed(s, new)}
    assert sorted(moved) == sorted(expected)
    assert {by_state[s] for s in sources(new)} == expected
    records = backend.jobs.get_many(list(by_state.values()))
    for s, job_id in by_state.items():
        assert records[job_id].state == (new if job_id in expected else s)


@pytest.mark.parametrize("new", [s for s in JobState if sources(s)], ids=str)
def test_transition_respects_from_states(backend, new):
    for source in sorted(sources(new)):
        by_state = jobs_in_every_state(backend)
        moved = backend.jobs.transition(list(by_state.values()), new, from_states=[source])
        assert moved == [by_state[source]]
        for s, job_id in by_state.items():
            assert state_of(backend, job_id) == (new if s == source else s)
    by_state = jobs_in_every_state(backend)
    assert backend.jobs.transition(list(by_state.values()), new, from_states=[]) == []


@pytest.mark.parametrize("new", list(JobState), ids=str)
def test_transition_rejects_from_states_that_are_not_sources(backend, new):
    [job_id] = create(backend)
    bad = [s for s in JobState if s not in sources(new)]
    for s in bad:
        with pytest.raises(InvalidTransition):
            backend.jobs.transition([job_id], new, from_states=[s])
        with pytest.raises(InvalidTransition):
            backend.jobs.transition([job_id], new, from_states=[*sources(new), s])
    assert state_of(backend, job_id) == JobState.PENDING
    assert [state for _, state, _ in backend.jobs.history(job_id)] == ["pending"]


def test_transition_returns_exactly_the_ids_moved(backend):
    a, b, c = create(backend, 3)
    drive(backend, c, JobState.COMPLETED)
    moved = backend.jobs.transition([a, b, c, "nope", a], JobState.PROCESSING, node="n1")
    assert sorted(moved) == sorted([a, b])
    assert backend.jobs.transition([], JobState.PROCESSING) == []


def test_transition_naming_a_job_twice_in_a_long_list_moves_it_once(backend):
    """A job named twice in one transition() moves once, however long the list: on the
    embedded backend, one 500 ids apart (in two of its statements) moved twice, a second
    "processing" in its history, a second attempt, and its id returned twice."""
    ids = [new_job().job_id for _ in range(500)]
    backend.jobs.create([
        NewJob(job_id=j, owner="alice", client="client-1", queue="work", fn="tests.tasks:add",
               walltime=30.0, body=b"") for j in ids], enqueue=False)
    moved = backend.jobs.transition([*ids, ids[0]], JobState.PROCESSING, node="n1")
    assert sorted(moved) == sorted(ids)
    r = backend.jobs.get(ids[0])
    assert (r.state, r.attempts) == (JobState.PROCESSING, 1)
    assert [s for _, s, _ in backend.jobs.history(ids[0])] == ["pending", "processing"]


def test_transition_records_node_attempts_and_reason(backend):
    [job_id] = create(backend)
    assert backend.jobs.transition([job_id], JobState.PROCESSING, node="n1") == [job_id]
    r = backend.jobs.get(job_id)
    assert r.node == "n1" and r.attempts == 1 and r.started is not None
    assert r.finished is None
    # a redelivery after a node died
    assert backend.jobs.transition([job_id], JobState.PROCESSING, node="n2") == [job_id]
    r = backend.jobs.get(job_id)
    assert r.node == "n2" and r.attempts == 2
    assert backend.jobs.transition([job_id], JobState.FAILED, reason="node lost") == [job_id]
    r = backend.jobs.get(job_id)
    assert r.state == JobState.FAILED and r.reason == "node lost"
    assert r.finished is not None and r.finished >= r.started


def test_a_data_tasks_move_from_staging_to_running_is_the_same_attempt(backend):
    """``kotta status`` said "attempts 2" for a data task that ran once: its move from
    staging_inputs to processing counted as a second start."""
    [job_id] = create(backend)
    for node, attempts in (("n1", 1), ("n2", 2)):  # the second: a redelivery after n1 died
        assert backend.jobs.transition([job_id], JobState.STAGING_INPUTS, node=node) == [job_id]
        assert backend.jobs.get(job_id).attempts == attempts
        assert backend.jobs.transition([job_id], JobState.PROCESSING, node=node) == [job_id]
        r = backend.jobs.get(job_id)
        assert (r.state, r.node, r.attempts) == (JobState.PROCESSING, node, attempts)
    # the same when the caller names the state it moves from
    [other] = create(backend)
    backend.jobs.transition([other], JobState.STAGING_INPUTS, node="n1")
    assert backend.jobs.transition([other], JobState.PROCESSING, node="n1",
                                   from_states={JobState.STAGING_INPUTS}) == [other]
    assert backend.jobs.get(other).attempts == 1
    # and a move that does not hold still moves nothing
    assert backend.jobs.transition([other], JobState.PROCESSING, node="n1",
                                   from_states={JobState.STAGING_INPUTS}) == []
    assert backend.jobs.get(other).attempts == 1


@pytest.mark.parametrize("held", [JobState.STAGING_INPUTS, JobState.PROCESSING])
def test_a_job_a_stopping_node_never_began_goes_back_to_pending(backend, held):
    """A stopping node hands back a task it staged, or piped to a worker that never began
    it: its job is pending again, cancellable, and a first delivery claims it again.  A
    job past running (its outputs staging, or ended) never goes back."""
    [job_id] = create(backend)
    assert backend.jobs.transition([job_id], held, node="n1") == [job_id]
    assert backend.jobs.transition([job_id], JobState.PENDING, node="n1",
                                   from_states={JobState.STAGING_INPUTS,
                                                JobState.PROCESSING}) == [job_id]
    assert state_of(backend, job_id) == JobState.PENDING
    assert backend.jobs.transition([job_id], JobState.PROCESSING, node="n2",
                                   from_states={JobState.PENDING}) == [job_id]
    assert backend.jobs.get(job_id).node == "n2"
    [other] = create(backend)
    assert backend.jobs.transition([other], held, node="n1") == [other]
    assert backend.jobs.transition([other], JobState.PENDING) == [other]
    assert backend.jobs.transition([other], JobState.CANCELLED,
                                   from_states=CANCELLABLE) == [other]
    for later in (JobState.STAGING_OUTPUTS, JobState.COMPLETED):
        [past] = create(backend)
        drive(backend, past, later)
        assert backend.jobs.transition([past], JobState.PENDING) == []
        assert state_of(backend, past) == later


@pytest.mark.parametrize("held", [JobState.STAGING_INPUTS, JobState.PROCESSING])
def test_a_job_back_in_pending_is_held_by_no_node_and_not_started(backend, held):
    """A job a stopping node handed back, never begun, read as begun: its record kept the
    node and the start of the node that had held it, and a future cancelled by another
    thread (``shutdown(cancel_futures=True)``) took it for one that had run
    (``started is None`` means never ran), its cancel() False; `kotta status` named a node
    for a pending job.  Now it reads as a job no node has: no node, not started, and not
    attempted (see the next test)."""
    [job_id] = create(backend)
    assert backend.jobs.transition([job_id], held, node="n1") == [job_id]
    assert backend.jobs.transition([job_id], JobState.PENDING, node="n1") == [job_id]
    r = backend.jobs.get(job_id)
    assert (r.state, r.node, r.started, r.attempts) == (JobState.PENDING, None, None, 0)
    assert [(s, d) for _, s, d in backend.jobs.history(job_id)][-1] == ("pending", "n1")
    assert backend.jobs.transition([job_id], JobState.CANCELLED,
                                   from_states=CANCELLABLE) == [job_id]
    assert backend.jobs.get(job_id).started is None


@pytest.mark.parametrize("held", [JobState.STAGING_INPUTS, JobState.PROCESSING])
def test_a_hand_back_moves_only_jobs_the_node_still_holds_and_no_one_killed(backend, held):
    """A stopping node moves a job it never began back to pending in one conditional write
    (``held_by``): the job's node must still be this one, and no kill requested.  It read
    the job, then wrote on the state alone: a redelivery claimed by another node in
    between had its running job moved back to pending (and run twice), and a kill()
    landing in between (True: the job was running) was lost, the job handed back
    uncounted, and the next node, for which it was a first delivery, ran it."""
    mine, theirs, killed, done = create(backend, 4)
    for j in (mine, theirs, killed, done):
        assert backend.jobs.transition([j], held, node="n1") == [j]
    assert backend.jobs.transition([theirs], JobState.PROCESSING, node="n2") == [theirs]
    assert backend.jobs.request_kill(killed)
    assert backend.jobs.transition([done], JobState.PROCESSING, node="n1") == [done]
    backend.jobs.finish([Finished(done, JobState.COMPLETED, b"ran")])
    back = {JobState.STAGING_INPUTS, JobState.PROCESSING}
    assert backend.jobs.transition([mine, theirs, killed, done], JobState.PENDING,
                                   from_states=back, node="n1", held_by="n1") == [mine]
    assert (state_of(backend, mine), backend.jobs.get(mine).node) == (JobState.PENDING, None)
    r = backend.jobs.get(theirs)
    assert (r.state, r.node) == (JobState.PROCESSING, "n2")
    r = backend.jobs.get(killed)
    assert (r.state, r.node, r.kill_requested) == (held, "n1", True)
    assert state_of(backend, done) == JobState.COMPLETED
    # a job no node holds (pending already) is not held by this one either
    assert backend.jobs.transition([mine], JobState.PENDING, from_states=back,
                                   held_by="n1") == []


@pytest.mark.parametrize("held", [JobState.STAGING_INPUTS, JobState.PROCESSING])
def test_a_hand_back_of_a_job_never_begun_is_not_an_attempt(backend, held):
    """``kotta status`` said "attempts 2" for a job that ran once, on the second node, after
    the first, stopping, had handed it back never begun (its inputs staged, or piped to a
    worker that stopped before it): the hand-back takes its claim's attempt back, as it
    takes back the delivery (``--max-deliveries``).  A redelivery after a node died still
    counts: that node may have begun it."""
    [job_id] = create(backend)
    assert backend.jobs.transition([job_id], held, node="n1") == [job_id]
    assert backend.jobs.get(job_id).attempts == 1
    assert backend.jobs.transition([job_id], JobState.PENDING, node="n1",
                                   held_by="n1") == [job_id]
    assert backend.jobs.get(job_id).attempts == 0
    steps = [JobState.PROCESSING] if held is JobState.PROCESSING else [held, JobState.PROCESSING]
    for step in steps:  # the second node runs it
        assert backend.jobs.transition([job_id], step, node="n2") == [job_id]
    assert backend.jobs.finish([Finished(job_id, JobState.COMPLETED, b"ran")]) == [job_id]
    r = backend.jobs.get(job_id)
    assert (r.state, r.node, r.attempts) == (JobState.COMPLETED, "n2", 1)
    [other] = create(backend)
    for node in ("n1", "n2"):  # n1 died: n2's is a second attempt
        assert backend.jobs.transition([other], JobState.PROCESSING, node=node) == [other]
    assert backend.jobs.get(other).attempts == 2


@pytest.mark.parametrize("final", [JobState.CANCELLED, JobState.FAILED])
@pytest.mark.parametrize("held", [JobState.STAGING_INPUTS, JobState.PROCESSING])
def test_a_finish_of_a_job_its_node_never_began_is_not_an_attempt(backend, held, final):
    """A job a node claimed and never began, then ended (killed while it waited in a
    worker's pipe; refused: over the node's walltime cap, its requirements failed) showed
    one attempt and a start time in its record (`kotta status`), as a job that had run.
    Finished.unbegun takes that claim's attempt and start back, as a stopping node's
    hand-back does; from pending there is nothing to take back, and a redelivery keeps the
    attempt of the node that died (it may have begun it)."""
    mine, pending, again, ran = create(backend, 4)
    assert backend.jobs.transition([mine], held, node="n1") == [mine]
    for node in ("n1", "n2"):
        assert backend.jobs.transition([again], JobState.PROCESSING, node=node) == [again]
    assert backend.jobs.transition([ran], JobState.PROCESSING, node="n1") == [ran]
    done = backend.jobs.finish([Finished(j, final, b"never ran", "why", unbegun=True)
                                for j in (mine, pending, again)]
                               + [Finished(ran, final, b"ran", "why")])
    assert sorted(done) == sorted([mine, pending, again, ran])
    for job_id, attempts, started in ((mine, 0, False), (pending, 0, False),
                                      (again, 1, False), (ran, 1, True)):
        r = backend.jobs.get(job_id, with_result=True)
        assert (r.state, r.reason, r.attempts, r.started is not None) == (
            final, "why", attempts, started), job_id
    assert backend.jobs.get(mine, with_result=True).result == b"never ran"


def test_cancelled_job_cannot_be_started_or_finished(backend):
    [job_id] = create(backend)
    moved = backend.jobs.transition([job_id], JobState.CANCELLED, from_states=CANCELLABLE,
                                    reason="cancelled by alice")
    assert moved == [job_id]
    for new in (JobState.STAGING_INPUTS, JobState.PROCESSING, JobState.STAGING_OUTPUTS,
                JobState.COMPLETED):
        assert backend.jobs.transition([job_id], new, node="n1") == []
    assert backend.jobs.finish([Finished(job_id, JobState.COMPLETED, b"late")]) == []
    r = backend.jobs.get(job_id, with_result=True)
    assert r.state == JobState.CANCELLED and r.reason == "cancelled by alice"
    assert r.result is None and r.node is None and r.attempts == 0
    # a started job is no longer cancellable
    [other] = create(backend)
    drive(backend, other, JobState.PROCESSING)
    assert backend.jobs.transition([other], JobState.CANCELLED, from_states=CANCELLABLE) == []


def test_finish_records_a_result_at_most_once(backend):
    a, b, c = create(backend, 3)
    backend.jobs.transition([a, b, c], JobState.PROCESSING, node="n1")
    recorded = backend.jobs.finish([
        Finished(a, JobState.COMPLETED, b"result-a", usage={"cpu": 1.5}),
        Finished(b, JobState.FAILED, b"error-b", reason="ValueError: bad"),
    ])
    assert sorted(recorded) == sorted([a, b])
    # the same task delivered again, with another outcome: nothing is recorded
    again = backend.jobs.finish([
        Finished(a, JobState.FAILED, b"second-a", reason="duplicate"),
        Finished(b, JobState.COMPLETED, b"second-b"),
        Finished(c, JobState.COMPLETED, b"result-c"),
        Finished("unknown", JobState.COMPLETED, b"?"),
    ])
    assert again == [c]
    records = backend.jobs.get_many([a, b, c], with_result=True)
    assert (records[a].state, records[a].reason, records[a].result) == (
        JobState.COMPLETED, None, b"result-a")
    assert records[a].usage == {"cpu": 1.5}
    assert (records[b].state, records[b].reason, records[b].result) == (
        JobState.FAILED, "ValueError: bad", b"error-b")
    assert records[c].result == b"result-c"
    assert all(r.finished is not None for r in records.values())
    assert [s for _, s, _ in backend.jobs.history(a)] == ["pending", "processing", "completed"]
    assert [s for _, s, _ in backend.jobs.history(b)] == ["pending", "processing", "failed"]


def test_finish_of_a_mixed_batch_records_each_job_its_own_outcome(backend):
    """One finish() call with several final states, reasons shared and not, a large result
    among small ones: each job gets its own state, reason, result, usage and history line."""
    ids = create(backend, 6)
    backend.jobs.transition(ids, JobState.PROCESSING, node="n1")
    big = os.urandom(LARGE)
    batch = [
        Finished(ids[0], JobState.COMPLETED, b"r0", usage={"cpu": 0.5}),
        Finished(ids[1], JobState.FAILED, b"r1", reason="ValueError: a"),
        Finished(ids[2], JobState.COMPLETED, big),
        Finished(ids[3], JobState.FAILED, b"r3", reason="ValueError: a"),
        Finished(ids[4], JobState.FAILED, b"r4", reason="KeyError: b"),
        Finished(ids[5], JobState.CANCELLED, b"r5", reason="ValueError: a"),  # as ids[1]
    ]
    assert sorted(backend.jobs.finish(batch)) == sorted(ids)
    records = backend.jobs.get_many(ids, with_result=True)
    for f in batch:
        r = records[f.job_id]
        assert (r.state, r.reason, r.result, r.usage) == (f.state, f.reason, f.result, f.usage)
        *_, (ts, state, detail) = backend.jobs.history(f.job_id)
        assert (state, detail) == (f.state, f.reason)
        assert ts == r.finished


def test_record_usage_updates_only_active_jobs(backend):
    running, done = create(backend, 2)
    backend.jobs.transition([running, done], JobState.PROCESSING, node="n1")
    samples = {"samples": [{"t": 1.0, "cpu_pct": 99.5, "rss_kb": 2048}], "peak_rss_kb": 2048}
    assert backend.jobs.record_usage(running, samples) is True
    assert backend.jobs.get(running).usage == samples
    more = {"samples": [*samples["samples"], {"t": 2.0, "cpu_pct": 50.0, "rss_kb": 4096}]}
    assert backend.jobs.record_usage(running, more) is True
    assert backend.jobs.get(running).usage == more
    assert backend.jobs.get(running).state == JobState.PROCESSING
    # a final job keeps its final usage; an unknown one is not created
    assert backend.jobs.finish([Finished(done, JobState.COMPLETED, b"r", usage={"cpu": 1.0})])
    assert backend.jobs.record_usage(done, samples) is False
    assert backend.jobs.get(done).usage == {"cpu": 1.0}
    assert backend.jobs.record_usage("unknown", samples) is False
    assert backend.jobs.get("unknown") is None


def test_finish_in_one_batch_twice_records_the_first(backend):
    [job_id] = create(backend)
    drive(backend, job_id, JobState.PROCESSING)
    got = backend.jobs.finish([Finished(job_id, JobState.COMPLETED, b"one"),
                               Finished(job_id, JobState.FAILED, b"two", reason="dup")])
    assert got == [job_id]
    r = backend.jobs.get(job_id, with_result=True)
    assert (r.state, r.reason, r.result) == (JobState.COMPLETED, None, b"one")


def test_finish_refuses_non_final_states(backend):
    [job_id] = create(backend)
    drive(backend, job_id, JobState.PROCESSING)
    try:
        recorded = backend.jobs.finish([Finished(job_id, JobState.STAGING_OUTPUTS, b"first")])
    except (InvalidTransition, ValueError):
        recorded = []
    assert recorded == []
    r = backend.jobs.get(job_id, with_result=True)
    assert r.state == JobState.PROCESSING and r.result is None and r.finished is None


def test_large_result_round_trips(backend):
    [job_id] = create(backend)
    drive(backend, job_id, JobState.PROCESSING)
    data = os.urandom(LARGE)
    assert backend.jobs.finish([Finished(job_id, JobState.COMPLETED, data)]) == [job_id]
    assert backend.jobs.get(job_id, with_result=True).result == data
    assert backend.jobs.get(job_id).result is None
    assert backend.jobs.get_many([job_id], with_result=True)[job_id].result == data


def test_duplicate_finish_does_not_overwrite_a_large_result(backend):
    [job_id] = create(backend)
    drive(backend, job_id, JobState.PROCESSING)
    first, second = b"A" * LARGE, b"B" * LARGE
    assert backend.jobs.finish([Finished(job_id, JobState.COMPLETED, first)]) == [job_id]
    assert backend.jobs.finish([Finished(job_id, JobState.FAILED, second, "dup")]) == []
    r = backend.jobs.get(job_id, with_result=True)
    assert (r.state, r.reason) == (JobState.COMPLETED, None)
    assert r.result == first


def test_history_lists_states_in_order_with_timestamps(backend):
    [job_id] = create(backend)
    before = time.time()
    backend.jobs.transition([job_id], JobState.STAGING_INPUTS, node="n1")
    backend.jobs.transition([job_id], JobState.PROCESSING, node="n1")
    backend.jobs.transition([job_id], JobState.STAGING_OUTPUTS)
    backend.jobs.transition([job_id], JobState.PENDING)  # not allowed: no event
    backend.jobs.finish([Finished(job_id, JobState.FAILED, b"x", reason="boom")])
    backend.jobs.finish([Finished(job_id, JobState.COMPLETED, b"y")])  # duplicate: no event
    history = backend.jobs.history(job_id)
    assert [s for _, s, _ in history] == [
        "pending", "staging_inputs", "processing", "staging_outputs", "failed"]
    stamps = [ts for ts, _, _ in history]
    assert stamps == sorted(stamps)
    assert all(isinstance(ts, float) for ts in stamps)
    assert before - 1 <= stamps[1] and stamps[-1] <= time.time() + 1
    assert history[1][2] == "n1" and history[-1][2] == "boom"
    assert backend.jobs.history("unknown") == []


def test_list_filters_by_owner_and_state_newest_first(backend):
    alice = [create(backend, owner="alice")[0] for _ in range(4)]
    bob = [create(backend, owner="bob")[0] for _ in range(2)]
    backend.jobs.transition([alice[1], alice[3], bob[0]], JobState.PROCESSING)

    def ids(**kw):
        return [r.job_id for r in backend.jobs.list(**kw)]

    assert ids() == [*reversed(bob), *reversed(alice)]
    assert ids(owner="alice") == list(reversed(alice))
    assert ids(owner="bob", limit=1) == [bob[1]]
    assert ids(state="processing") == [bob[0], alice[3], alice[1]]
    assert ids(state=JobState.PROCESSING, owner="alice", limit=1) == [alice[3]]
    assert ids(owner="alice", state="pending") == [alice[2], alice[0]]
    assert ids(owner="carol") == []
    assert ids(limit=3) == [bob[1], bob[0], alice[3]]
    assert all(r.result is None for r in backend.jobs.list())


def test_request_kill_only_for_active_jobs(backend):
    pending, processing, done, cancelled, uploading = create(backend, 5)
    drive(backend, processing, JobState.PROCESSING)
    drive(backend, done, JobState.COMPLETED)
    drive(backend, cancelled, JobState.CANCELLED)
    drive(backend, uploading, JobState.STAGING_OUTPUTS)
    # not started: cancelled (a node looks for the kill requests of a first delivery only
    # once it runs: flagged, a short task ran to its end on the next node)
    assert backend.jobs.request_kill(pending) is True
    assert backend.jobs.get(pending).state == JobState.CANCELLED
    assert backend.jobs.get(pending).reason == KILLED_PENDING
    assert backend.jobs.request_kill(processing) is True
    # its task has run: a kill would stop nothing now, and must not end a redelivery
    assert backend.jobs.request_kill(uploading) is False
    assert backend.jobs.request_kill(done) is False
    assert backend.jobs.request_kill(cancelled) is False
    assert backend.jobs.request_kill("unknown") is False
    assert backend.jobs.request_kill(pending) is False  # (cancelled now: final)
    everything = [pending, processing, done, cancelled, uploading, "unknown"]
    assert backend.jobs.kill_requested(everything) == {processing}
    assert backend.jobs.kill_requested([]) == set()
    records = backend.jobs.get_many(everything)
    assert {j for j, r in records.items() if r.kill_requested} == {processing}


def test_get_many_omits_unknown_ids(backend):
    a, b = create(backend, 2)
    got = backend.jobs.get_many([a, "nope", b, uuid.uuid4().hex])
    assert set(got) == {a, b}
    assert got[a].job_id == a
    assert backend.jobs.get_many([]) == {}
    assert backend.jobs.get("nope") is None


def test_owners_names_the_owner_of_each_recorded_job(backend):
    """What a node checks of each task it receives: as get_many's records say, unknown
    ids left out."""
    a, b = create(backend, 2, owner="alice")
    (c,) = create(backend, 1, owner="bob")
    got = backend.jobs.owners([a, "nope", c, b, uuid.uuid4().hex, a])
    assert got == {a: "alice", b: "alice", c: "bob"}
    assert got == {i: r.owner for i, r in backend.jobs.get_many([a, b, c]).items()}
    assert backend.jobs.owners([]) == {}


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("transition"),
            st.sampled_from(list(JobState)),
            st.none() | st.frozensets(st.sampled_from(list(JobState)), max_size=2),
            st.frozensets(st.integers(0, 3), min_size=1),
        ),
        st.tuples(
            st.just("finish"),
            st.sampled_from(sorted(FINAL)),
            st.none(),
            st.frozensets(st.integers(0, 3), min_size=1),
        ),
    ),
    max_size=12,
)


def test_job_states_follow_the_state_machine(backend):
    """Random transitions and finishes against a model built from :mod:`states`."""

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=_ops)
    def run(ops):
        job_ids = create(backend, 4)
        state = dict.fromkeys(job_ids, JobState.PENDING)
        history = {j: ["pending"] for j in job_ids}
        result: dict[str, bytes] = {}
        for step, (op, new, from_states, picks) in enumerate(ops):
            ids = [job_ids[i] for i in sorted(picks)]
            if op == "finish":
                active = {j for j in ids if state[j] in sources(new)}
                got = backend.jobs.finish(
                    [Finished(j, new, f"{step}:{j}".encode()) for j in ids])
                for j in active:
                    result[j] = f"{step}:{j}".encode()
            elif from_states is not None and not all(allowed(s, new) for s in from_states):
                with pytest.raises(InvalidTransition):
                    backend.jobs.transition(ids, new, from_states=from_states)
                continue
            else:
                src = sources(new) if from_states is None else from_states
                active = {j for j in ids if state[j] in src}
                got = backend.jobs.transition(ids, new, from_states=from_states)
            assert sorted(got) == sorted(active)
            for j in active:
                state[j] = new
                history[j].append(str(new))
        records = backend.jobs.get_many(job_ids, with_result=True)
        for j in job_ids:
            assert records[j].state == state[j]
            assert records[j].result == result.get(j)
            assert [s for _, s, _ in backend.jobs.history(j)] == history[j]

    run()


# ------------------------------------------------------------------------- concurrency

RACERS = 3


def _race_step(enclave: Enclave, op: str, arg, tag: int) -> list:
    got: list = []
    if op == "receive":
        while batch := enclave.queue.receive(arg, 1 + len(got) % 3, LONG, f"holder-{tag}"):
            got += [(d.job_id, d.receive_count) for d in batch]
        return got
    ids = list(arg)
    random.Random(tag).shuffle(ids)
    for i in range(0, len(ids), 4):
        chunk = ids[i : i + 4]
        if op == "claim":
            got += enclave.jobs.transition(chunk, JobState.PROCESSING,
                                           from_states=[JobState.PENDING], node=f"node-{tag}")
        elif op == "finish":
            got += enclave.jobs.finish(
                [Finished(j, JobState.COMPLETED, f"{tag}:{j}".encode()) for j in chunk])
        else:
            raise ValueError(op)
    return got


def _race_worker(target, steps: list[tuple[str, object]], tag: int, barrier, out) -> None:
    """One racer: ``target`` is an enclave (a thread) or its url (a spawned process).
    All racers start each step together."""
    try:
        enclave = open_enclave(target) if isinstance(target, str) else target
        try:
            got = []
            for op, arg in steps:
                barrier.wait(GUARD)
                got.append(_race_step(enclave, op, arg, tag))
        finally:
            if enclave is not target:
                enclave.close()
        out.put((tag, got))
    except BaseException as exc:  # report to the parent instead of dying silently
        # and at once: the others would wait GUARD for this racer at the next step's
        # barrier, and the parent's wait for them end first (a "hang", the error unseen)
        barrier.abort()
        out.put((tag, f"racer {tag} failed: {exc!r}\n{traceback.format_exc()}"))


def race(backend: Enclave, spec: BackendSpec, mode: str,
         steps: list[tuple[str, object]]) -> list[dict[int, list]]:
    """Run :data:`RACERS` racers at once, as threads or as spawned processes each opening
    its own enclave; returns, for each step, what each racer got."""
    if mode == "processes":
        if not spec.multiprocess:
            pytest.skip("this backend cannot be opened from another process")
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(RACERS), ctx.Queue()
        racers = [ctx.Process(target=_race_worker,
                              args=(backend.url, steps, tag, barrier, out))
                  for tag in range(RACERS)]
    else:
        barrier, out = threading.Barrier(RACERS), queue_module.Queue()
        racers = [threading.Thread(target=_race_worker,
                                   args=(backend, steps, tag, barrier, out))
                  for tag in range(RACERS)]
    for r in racers:
        r.start()
    try:
        results = dict(out.get(timeout=GUARD) for _ in racers)
    finally:
        for r in racers:
            r.join(GUARD)
    failed = [got for got in results.values() if isinstance(got, str)]
    # the racer that failed first; the others only saw the barrier it broke
    failed.sort(key=lambda got: "BrokenBarrierError" in got)
    assert not failed, "\n".join(failed)
    return [{tag: got[i] for tag, got in results.items()} for i in range(len(steps))]


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_racing_claims_and_finishes_move_each_job_once(backend, spec, mode):
    job_ids = create(backend, 40)
    claims, finishes = race(backend, spec, mode, [("claim", job_ids), ("finish", job_ids)])

    # every job claimed by exactly one racer, from pending
    assert Counter(j for got in claims.values() for j in got) == Counter(job_ids)
    claimed_by = {j: tag for tag, got in claims.items() for j in got}

    # every job finished (result recorded) by exactly one racer
    counts = Counter(j for got in finishes.values() for j in got)
    assert counts == Counter(job_ids), "some job was recorded more or less than once"
    winners = {j: tag for tag, got in finishes.items() for j in got}
    records = backend.jobs.get_many(job_ids, with_result=True)
    for j in job_ids:
        r = records[j]
        assert r.state == JobState.COMPLETED and r.attempts == 1
        assert r.node == f"node-{claimed_by[j]}"
        assert r.result == f"{winners[j]}:{j}".encode()
        assert [s for _, s, _ in backend.jobs.history(j)] == [
            "pending", "processing", "completed"]


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_racing_receivers_never_share_an_invisible_message(backend, spec, mode):
    names = [f"m{i}" for i in range(120)]
    backend.queue.send("race", messages(*names))
    [results] = race(backend, spec, mode, [("receive", "race")])
    got = [job_id for batch in results.values() for job_id, _ in batch]
    duplicates = [j for j, n in Counter(got).items() if n > 1]
    assert duplicates == [], "a message was received twice while invisible"
    assert sorted(got) == sorted(names)
    assert {count for batch in results.values() for _, count in batch} == {1}
    assert backend.queue.depth("race") == len(names)
    assert received(backend, "race") == []


# ------------------------------------------------------------------------------- blobs


def test_blob_round_trip(backend):
    backend.blobs.put("abc-1.bin", b"hello")
    assert backend.blobs.get("abc-1.bin") == b"hello"
    backend.blobs.put("abc-1.bin", b"again")
    assert backend.blobs.get("abc-1.bin") == b"again"
    big = os.urandom(LARGE)
    backend.blobs.put("big", big)
    assert backend.blobs.get("big") == big
    backend.blobs.put("empty", b"")
    assert backend.blobs.get("empty") == b""
    backend.blobs.delete(["abc-1.bin", "never-there"])
    with pytest.raises(KeyError):
        backend.blobs.get("abc-1.bin")
    assert backend.blobs.get("big") == big


def test_older_lists_the_keys_of_a_prefix_written_before_a_time_a_page_at_a_time(backend):
    """What a node's sweep for stray task blobs reads: keys of one prefix, in order, those
    written before the time given, a page of ``scan`` keys a call."""
    keys = [f"args-{i:02d}" for i in range(7)]
    for key in keys:
        backend.blobs.put(key, b"x")
    backend.blobs.put("argv-0", b"x")  # another prefix, the same first letters
    backend.blobs.put("fn-01", b"x")
    future, past = time.time() + 3600, time.time() - 3600
    assert backend.blobs.older("args-", future) == (keys, "")
    assert backend.blobs.older("args-", past) == ([], "")  # none written that long ago
    pages, after = [], ""
    while True:
        page, after = backend.blobs.older("args-", future, after=after, scan=3)
        pages.append(page)
        if not after:
            break
    assert pages == [keys[:3], keys[3:6], keys[6:]]
    assert backend.blobs.older("args-", future, after="args-05") == (keys[6:], "")
    assert backend.blobs.older("nothing-", future) == ([], "")
    backend.blobs.delete(keys[:2])
    assert backend.blobs.older("args-", future)[0] == keys[2:]


def test_older_lists_keys_of_one_or_two_characters_as_any_other(backend):
    """A key shorter than the directory names of the embedded store (one character: it
    lives in a directory of one) begins with the prefixes ``""`` and its own letter, as
    on S3."""
    for key in ("a", "a.x", "ab", "b"):
        backend.blobs.put(key, b"x")
    future = time.time() + 3600
    assert backend.blobs.older("a", future) == (["a", "a.x", "ab"], "")
    assert backend.blobs.older("", future) == (["a", "a.x", "ab", "b"], "")
    assert backend.blobs.older("", future, after="a", scan=2) == (["a.x", "ab"], "ab")


def test_missing_blob_raises_key_error(backend):
    with pytest.raises(KeyError):
        backend.blobs.get("missing")


@pytest.mark.parametrize("key", ["../x", "a/b", "", "..", "/etc/passwd", "x/../../y",
                                 "result-x\n"])  # (`$` matched before a final newline)
def test_blob_keys_cannot_traverse_paths(backend, key):
    with pytest.raises(ValueError):
        backend.blobs.put(key, b"x")
    with pytest.raises(ValueError):
        backend.blobs.get(key)
    with pytest.raises(ValueError):
        backend.blobs.delete([key])


# ----------------------------------------------------------------------------- records


def test_records_put_get_scan_delete(backend):
    r = backend.records
    assert r.get("user", "alice") is None
    assert r.put("user", "alice", {"role": "analyst", "n": 1})
    assert r.get("user", "alice") == {"role": "analyst", "n": 1}
    assert r.put("user", "alice", {"role": "admin"})  # plain put replaces
    assert r.get("user", "alice") == {"role": "admin"}
    r.put("user", "bob", {"role": "analyst"})
    r.put("other", "carol", {"x": 1})
    assert r.get_many("user", ["alice", "bob", "nobody"]) == {
        "alice": {"role": "admin"}, "bob": {"role": "analyst"}
    }
    assert [k for k, _ in r.scan("user")] == ["alice", "bob"]
    assert [k for k, _ in r.scan("user", reverse=True)] == ["bob", "alice"]
    assert [k for k, _ in r.scan("user", after="alice")] == ["bob"]
    assert [k for k, _ in r.scan("user", after="bob", reverse=True)] == ["alice"]
    assert r.delete("user", "alice") is True
    assert r.delete("user", "alice") is False
    assert [k for k, _ in r.scan("user")] == ["bob"]


def test_records_scan_pages_in_key_order(backend):
    r = backend.records
    for i in range(25):
        r.put("seq", f"{i:06d}", {"i": i})
    assert [v["i"] for _, v in r.scan("seq")] == list(range(25))
    assert [v["i"] for _, v in r.scan("seq", limit=3, reverse=True)] == [24, 23, 22]
    assert [v["i"] for _, v in r.scan("seq", after="000020", limit=2)] == [21, 22]


def test_records_put_if_absent_of_the_very_value_there_is_a_success(backend):
    """A conditional put that finds the very value it writes (on AWS: its own first try,
    whose response was lost, and which botocore retried) says it is written; another
    value there is a lost race."""
    r = backend.records
    assert r.put("log", "000001", {"writer": 1, "time": 2.5}, if_absent=True)
    assert r.put("log", "000001", {"time": 2.5, "writer": 1}, if_absent=True)
    assert not r.put("log", "000001", {"writer": 2, "time": 2.5}, if_absent=True)
    assert r.get("log", "000001") == {"writer": 1, "time": 2.5}


def test_records_put_if_absent_has_one_winner(backend):
    r = backend.records
    wins = []

    def writer(i: int) -> None:
        wins.append(r.put("log", "000001", {"writer": i}, if_absent=True))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    assert sorted(wins) == [False] * 5 + [True]
    assert r.get("log", "000001")["writer"] in range(6)


def test_records_put_if_unchanged_writes_only_over_what_was_read(backend):
    """The compare-and-set the last-admin checks rest on: written only if every record
    named holds the value given, itself included; a record gone, or changed, stops it."""
    r = backend.records
    r.put("user", "alice", {"admin": True})
    r.put("refresh", "t1", {"user": "alice", "revoked": None})
    r.put("refresh", "t2", {"user": "bob", "revoked": None})
    expect = {("refresh", "t2"): {"user": "bob", "revoked": None},
              ("user", "alice"): {"admin": True}, ("refresh", "t1"): r.get("refresh", "t1")}
    assert r.put_if_unchanged("refresh", "t2", {"user": "bob", "revoked": 1.5}, expect)
    assert r.get("refresh", "t2") == {"user": "bob", "revoked": 1.5}
    # the record itself changed since (the write above): not written
    assert not r.put_if_unchanged("refresh", "t2", {"user": "bob", "revoked": 9.0}, expect)
    r.put("user", "alice", {"admin": True, "disabled": True})
    expect = {("refresh", "t1"): r.get("refresh", "t1"), ("user", "alice"): {"admin": True}}
    assert not r.put_if_unchanged("refresh", "t1", {"user": "alice", "revoked": 2.0}, expect)
    assert r.get("refresh", "t1") == {"user": "alice", "revoked": None}
    expect[("user", "alice")] = {"admin": True, "disabled": True}
    assert not r.put_if_unchanged("refresh", "t1", {"user": "alice", "revoked": 2.0},
                                  {**expect, ("user", "nobody"): {}})  # one that is not there
    assert r.put_if_unchanged("refresh", "t1", {"user": "alice", "revoked": 2.0}, expect)
    assert r.get("refresh", "t1") == {"user": "alice", "revoked": 2.0}


# ------------------------------------------------------------------------------- nodes


def node_info(queue: str = "work", pid: int | None = None, **kw) -> NodeInfo:
    return NodeInfo(node_id=uuid.uuid4().hex[:12], queue=queue, host=socket.gethostname(),
                    pid=os.getpid() if pid is None else pid, workers=2, **kw)


def live_ids(backend: Enclave, queue: str | None = None) -> set[str]:
    return {n.node_id for n in backend.nodes.live(queue)}


def test_register_and_deregister_nodes(backend):
    a, b = node_info("work", managed_by="slurm", python="3.12"), node_info("gpu")
    backend.nodes.register(a)
    backend.nodes.register(b)
    assert live_ids(backend) == {a.node_id, b.node_id}
    assert live_ids(backend, "work") == {a.node_id}
    assert live_ids(backend, "gpu") == {b.node_id}
    assert live_ids(backend, "none") == set()
    [got] = [n for n in backend.nodes.live() if n.node_id == a.node_id]
    assert (got.queue, got.host, got.pid, got.workers, got.managed_by, got.python) == (
        "work", a.host, a.pid, 2, "slurm", "3.12")
    [other] = [n for n in backend.nodes.live() if n.node_id == b.node_id]
    assert other.python is None  # a node that did not say (one of an earlier version)
    backend.nodes.deregister(a.node_id)
    assert live_ids(backend) == {b.node_id}
    backend.nodes.deregister("unknown")
    assert live_ids(backend) == {b.node_id}


def test_heartbeat_keeps_a_node_live(backend):
    stale = node_info(heartbeat=time.time() - 3600)
    backend.nodes.register(stale)
    assert stale.node_id not in live_ids(backend)
    before = time.time()
    backend.nodes.heartbeat(stale.node_id)
    assert stale.node_id in live_ids(backend)
    [n] = backend.nodes.live()
    assert n.heartbeat >= before - 1
    backend.nodes.heartbeat("unknown")


def test_node_whose_process_is_gone_is_not_live(backend, spec):
    if not spec.checks_pids:
        pytest.skip("this backend only judges nodes by their heartbeats")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(GUARD) == 0
    dead, alive = node_info(pid=proc.pid), node_info()
    backend.nodes.register(dead)
    backend.nodes.register(alive)
    assert live_ids(backend) == {alive.node_id}
    backend.nodes.heartbeat(dead.node_id)
    assert live_ids(backend, "work") == {alive.node_id}


def test_delete_removes_records_messages_and_blobs(backend):
    keep, gone, big = create(backend, 3)
    drive(backend, big, JobState.PROCESSING)
    assert backend.jobs.finish([Finished(big, JobState.COMPLETED, b"R" * LARGE)]) == [big]
    backend.blobs.put(f"args-{gone}", b"a task section that was too large for its message")
    backend.jobs.delete([gone, big, "f" * 32])  # an unknown id is no error
    assert set(backend.jobs.get_many([keep, gone, big])) == {keep}
    assert backend.jobs.get(big, with_result=True) is None
    with pytest.raises(KeyError):
        backend.blobs.get(f"args-{gone}")
    assert backend.jobs.get(keep).state == JobState.PENDING


def _finished_apart(backend: Enclave) -> tuple[str, float, str]:
    """An old final job, a time after it finished, and a job that finished after that."""
    old, new = create(backend, 2)
    drive(backend, old, JobState.COMPLETED)
    cut = wait_for(lambda: (t := time.time()) > backend.jobs.get(old).finished and t,
                   what="the clock to pass the old job's finish")
    wait_for(lambda: time.time() > cut, what="the clock to pass the cut")
    drive(backend, new, JobState.FAILED)
    return old, cut, new


def test_prune_removes_final_jobs_finished_before_and_nothing_else(backend):
    by_state = jobs_in_every_state(backend)
    [big, dead] = create(backend, 2)
    drive(backend, big, JobState.PROCESSING)
    assert backend.jobs.finish([Finished(big, JobState.COMPLETED, b"R" * LARGE)]) == [big]
    backend.blobs.put(f"args-{big}", b"a task section that was too large for its message")
    [d] = received(backend, "work", 100)[-1:]
    assert d.job_id == dead
    backend.queue.dead_letter([d], "delivered too often")
    drive(backend, dead, JobState.FAILED)
    assert dead in {x["job_id"] for x in backend.queue.dead_letters("work")}
    final = {by_state[s] for s in FINAL} | {big, dead}
    active = {by_state[s] for s in JobState if not s.final}
    before = wait_for(lambda: (t := time.time()) > max(
        r.finished for r in backend.jobs.get_many(final).values()) and t)

    pruned = backend.jobs.prune(before)
    assert sorted(pruned.jobs) == sorted(final)
    assert pruned.bytes is None or pruned.bytes > LARGE
    assert set(backend.jobs.get_many(final | active)) == active
    for s in JobState:
        if not s.final:  # untouched, whatever its age
            assert state_of(backend, by_state[s]) == s
            assert backend.jobs.history(by_state[s])
    assert backend.jobs.history(big) == []
    with pytest.raises(KeyError):
        backend.blobs.get(f"args-{big}")
    assert result_blobs(backend, big) == []
    assert dead not in {x["job_id"] for x in backend.queue.dead_letters("work")}
    assert backend.jobs.prune(before).jobs == []  # (nothing left to remove)


def result_blobs(backend: Enclave, job_id: str) -> list[str]:
    return backend.blobs.older(f"result-{job_id}", time.time() + 3600)[0]


def test_prune_takes_the_finish_time_and_the_owner(backend):
    old, cut, new = _finished_apart(backend)
    [bobs] = create(backend, owner="bob")
    drive(backend, bobs, JobState.CANCELLED)
    wait_for(lambda: time.time() > backend.jobs.get(bobs).finished)
    assert backend.jobs.prune(cut, owner="alice").jobs == [old]
    assert set(backend.jobs.get_many([old, new, bobs])) == {new, bobs}
    assert backend.jobs.prune(time.time(), owner="carol").jobs == []
    assert sorted(backend.jobs.prune(time.time()).jobs) == sorted([new, bobs])


def test_prune_dry_run_removes_nothing(backend):
    old, cut, new = _finished_apart(backend)
    assert backend.jobs.finish([]) == []
    pruned = backend.jobs.prune(cut, dry_run=True)
    assert pruned.jobs == [old]
    assert set(backend.jobs.get_many([old, new])) == {old, new}
    assert backend.jobs.history(old)


def test_prune_removes_its_jobs_spilled_results(backend):
    [big] = create(backend)
    drive(backend, big, JobState.PROCESSING)
    assert backend.jobs.finish([Finished(big, JobState.COMPLETED, b"R" * LARGE)]) == [big]
    [ref] = result_blobs(backend, big)
    assert backend.blobs.get(ref) == b"R" * LARGE
    wait_for(lambda: time.time() > backend.jobs.get(big).finished)
    assert backend.jobs.prune(time.time(), dry_run=True).jobs == [big]
    assert backend.blobs.get(ref) == b"R" * LARGE
    assert backend.jobs.prune(time.time()).jobs == [big]
    assert result_blobs(backend, big) == []
