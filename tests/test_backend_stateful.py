"""The backend contract, by stateful testing: jobs and their task messages together.

One :class:`BackendMachine` drives the embedded backend and the AWS one (on moto) in
lockstep through random creates, receives, acks, releases, hand-backs, extends,
dead-letters, transitions, finishes, kills and deletes, and checks both against one small
model after every step: so both give the same answers where the contract says they must
(``kotta_executor/backends/base.py``).  What SQS cannot promise is left out on AWS only:
stale receipts (tests/aws_moto.py), and the receive a hand-back takes back.

Time is left out: messages are received with a timeout no test outlives, or with 0 (visible
again at once, its receipt current until the next delivery).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kotta_executor.backends.base import KILLED_PENDING, Delivery, Enclave, Finished, NewJob
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import InvalidTransition
from kotta_executor.states import ACTIVE, FINAL, KILLABLE, JobState, allowed, sources

#: a visibility timeout no test outlives
LONG = 600.0
#: more than the largest result a backend keeps inline
LARGE = (1 << 20) + 17
STATES = list(JobState)


@dataclass
class JobModel:
    owner: str
    queue: str
    seq: int
    state: JobState = JobState.PENDING
    history: list = field(default_factory=lambda: [("pending", None)])
    node: str | None = None
    attempts: int = 0
    reason: str | None = None
    result: bytes | None = None
    usage: dict | None = None
    kill: bool = False
    started: bool = False
    finished: bool = False


@dataclass
class MsgModel:
    mid: int
    job_id: str
    body: bytes
    counts: dict  # backend name -> receive count
    #: backend name -> the Delivery whose receipt is current (None: never received)
    current: dict
    visible: bool = True
    #: held by a receiver (received, and neither released nor handed back since)
    holding: bool = False
    gone: str | None = None  # "acked" / "dead"


class BackendMachine(RuleBasedStateMachine):
    def __init__(self, enclaves: dict[str, Enclave]):
        super().__init__()
        self.enclaves = enclaves
        self.tag = uuid.uuid4().hex[:8]
        self.queue = f"st-{self.tag}"
        self.owners = [f"{self.tag}-alice", f"{self.tag}-bob"]
        self.jobs: dict[str, JobModel] = {}
        self.deleted: set[str] = set()
        self.msgs: list[MsgModel] = []
        self.stale: list[tuple[str, Delivery]] = []
        self.dead: dict[str, list] = {name: [] for name in enclaves}
        self.seq = 0

    # -- helpers

    def each(self):
        return self.enclaves.items()

    def live_msgs(self) -> list[MsgModel]:
        return [m for m in self.msgs if m.gone is None]

    def held(self) -> list[MsgModel]:
        """Messages with a current receipt (invisible, or visible but not delivered since)."""
        return [m for m in self.live_msgs() if any(m.current.values())]

    def pick_job(self, i: int) -> str:
        ids = sorted(self.jobs)
        return ids[i % len(ids)]

    # -- jobs

    @rule(k=st.integers(1, 3), enqueue=st.booleans(), owner=st.integers(0, 1),
          again=st.none() | st.integers(0, 99))
    def create(self, k, enqueue, owner, again):
        new = []
        for _ in range(k):
            job_id = uuid.uuid4().hex
            new.append(NewJob(job_id=job_id, owner=self.owners[owner], client="c1",
                              queue=self.queue, fn="tests.tasks:add", walltime=30.0,
                              body=b""))
        if again is not None:  # an id recorded already, or named earlier in this batch:
            # its record stays as it is (a create retried), its task is queued again
            pool = [*sorted(self.jobs), *(j.job_id for j in new)]
            old = pool[again % len(pool)]
            new.append(NewJob(job_id=old, owner="mallory", client="c2", queue=self.queue,
                              fn="x:y", walltime=1.0, body=b""))
        for j in new:
            j.body = f"{j.job_id}:{len(self.msgs)}:{self.seq}".encode()
            if enqueue:
                self.msgs.append(MsgModel(len(self.msgs), j.job_id, j.body,
                                          dict.fromkeys(self.enclaves, 0),
                                          dict.fromkeys(self.enclaves)))
            if j.job_id not in self.jobs:
                self.jobs[j.job_id] = JobModel(j.owner, j.queue, self.seq)
                self.seq += 1
        for _, e in self.each():
            e.jobs.create([NewJob(j.job_id, j.owner, j.client, j.queue, j.fn, j.walltime,
                                  j.body) for j in new], enqueue=enqueue)

    @precondition(lambda self: self.jobs)
    @rule(picks=st.lists(st.integers(0, 99), min_size=1, max_size=4),
          new=st.sampled_from(STATES),
          from_states=st.none() | st.frozensets(st.sampled_from(STATES), max_size=3),
          node=st.sampled_from([None, "", "n1", "n2"]),
          reason=st.sampled_from([None, "", "why", "node lost"]),
          unknown=st.booleans(),
          held_by=st.sampled_from([None, None, "n1", "n2"]))
    def transition(self, picks, new, from_states, node, reason, unknown, held_by):
        ids = [self.pick_job(i) for i in picks]
        if unknown:
            ids.append(uuid.uuid4().hex)
        if from_states is not None and not all(allowed(s, new) for s in from_states):
            for _, e in self.each():
                with pytest.raises(InvalidTransition):
                    e.jobs.transition(ids, new, from_states=from_states, node=node,
                                      reason=reason, held_by=held_by)
            return
        src = sources(new) if from_states is None else from_states
        moved = [j for j in dict.fromkeys(ids) if j in self.jobs and self.jobs[j].state in src
                 and (held_by is None or (self.jobs[j].node == held_by
                                          and not self.jobs[j].kill))]
        for name, e in self.each():
            got = e.jobs.transition(ids, new, from_states=from_states, node=node,
                                    reason=reason, held_by=held_by)
            assert sorted(got) == sorted(moved), name
        for j in moved:
            m = self.jobs[j]
            if new in (JobState.STAGING_INPUTS, JobState.PROCESSING):
                if not (new is JobState.PROCESSING and m.state is JobState.STAGING_INPUTS):
                    m.attempts += 1
                m.node = node
                m.started = True
            if new is JobState.PENDING:  # back, never begun: no node holds it, no attempt
                m.node, m.started = None, False
                m.attempts -= 1
            if new.final:
                m.finished = True
            if reason is not None:
                m.reason = reason
            m.state = new
            m.history.append((str(new), reason or node))

    @precondition(lambda self: self.jobs)
    @rule(batch=st.lists(st.tuples(st.integers(0, 99) | st.none(), st.sampled_from(sorted(FINAL)),
                                   st.sampled_from([None, "", "boom"]),
                                   st.sampled_from([None, {}, {"cpu": 1.5}])),
                         min_size=1, max_size=4))
    def finish(self, batch):
        results = []
        for i, (pick, state, reason, usage) in enumerate(batch):
            job_id = uuid.uuid4().hex if pick is None else self.pick_job(pick)
            result = f"r{self.seq}.{i}".encode() if i else b""
            if i == 3:  # more than a backend keeps in its record: a blob of its own
                result = result.ljust(LARGE, b".")
            results.append((job_id, state, reason, result, usage))
        self.seq += 1
        recorded = []
        seen = set()
        for job_id, state, reason, result, usage in results:
            if job_id in seen:
                continue
            seen.add(job_id)
            m = self.jobs.get(job_id)
            if m is not None and m.state in sources(state):
                recorded.append(job_id)
                m.state, m.reason, m.result = state, reason, result
                m.usage = usage or None
                m.finished = True
                m.history.append((str(state), reason))
        for name, e in self.each():
            got = e.jobs.finish([Finished(j, s, r, reason=why, usage=u)
                                 for j, s, why, r, u in results])
            assert sorted(got) == sorted(recorded), name

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 99))
    def request_kill(self, i):
        job_id = self.pick_job(i)
        m = self.jobs[job_id]
        ok = m.state in KILLABLE
        if m.state is JobState.PENDING:  # not started: cancelled, not flagged
            m.state, m.reason, m.finished = JobState.CANCELLED, KILLED_PENDING, True
            m.history.append((str(JobState.CANCELLED), KILLED_PENDING))
        elif ok:
            m.kill = True
        for name, e in self.each():
            assert e.jobs.request_kill(job_id) is ok, name

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 99), usage=st.sampled_from([{}, {"samples": [1, 2]}]))
    def record_usage(self, i, usage):
        job_id = self.pick_job(i)
        m = self.jobs[job_id]
        ok = m.state in ACTIVE
        if ok:
            m.usage = usage
        for name, e in self.each():
            assert e.jobs.record_usage(job_id, usage) is ok, name

    @precondition(lambda self: self.jobs)
    @rule(picks=st.lists(st.integers(0, 99), min_size=1, max_size=3))
    def delete(self, picks):
        # only jobs none of whose tasks is still queued: the embedded backend removes those
        # messages too, SQS cannot (base.py promises neither)
        busy = {m.job_id for m in self.live_msgs()}
        ids = [j for j in (self.pick_job(i) for i in picks) if j not in busy]
        if not ids:
            return
        for _, e in self.each():
            e.jobs.delete(ids)
        for j in ids:
            self.jobs.pop(j, None)
            self.deleted.add(j)

    @precondition(lambda self: set(self.enclaves) == {"embedded"})
    @rule(held=st.booleans(), again=st.none() | st.integers(0, 99))
    def adopt(self, held, again):
        """A handed-off task (the embedded enclave only): its job recorded, and its message
        queued or held by the node that took it, unless the job is recorded already."""
        job_id = uuid.uuid4().hex if again is None or not self.jobs else self.pick_job(again)
        body = f"{job_id}:{len(self.msgs)}:adopted".encode()
        e = self.enclaves["embedded"]
        d = e.adopt(NewJob(job_id, self.owners[0], "c1", self.queue, "tests.tasks:add", 30.0,
                           body), LONG, "node-1" if held else None)
        if job_id in self.jobs:
            assert d is None
            return
        self.jobs[job_id] = JobModel(self.owners[0], self.queue, self.seq)
        self.seq += 1
        m = MsgModel(len(self.msgs), job_id, body, {"embedded": 0}, {"embedded": None})
        self.msgs.append(m)
        if held:
            assert (d.job_id, d.body, d.receive_count) == (job_id, body, 1)
            m.counts["embedded"], m.current["embedded"], m.visible = 1, d, False
            m.holding = True
        else:
            assert d is None

    @precondition(lambda self: set(self.enclaves) == {"embedded"} and self.jobs)
    @rule(picks=st.lists(st.integers(0, 99), min_size=1, max_size=3), new=st.sampled_from(STATES),
          k=st.integers(0, 2))
    def atomic_rolled_back(self, picks, new, k):
        """What a failed ``atomic()`` block did is undone, all of it (the embedded enclave:
        the other groups nothing)."""
        e = self.enclaves["embedded"]
        ids = [self.pick_job(i) for i in picks]

        class Boom(Exception):
            pass

        with pytest.raises(Boom), e.atomic():
            e.jobs.create([NewJob(uuid.uuid4().hex, self.owners[0], "c1", self.queue, "f:g",
                                  1.0, b"rolled back")])
            e.jobs.transition(ids, new, node="n9", reason="rolled back")
            e.jobs.finish([Finished(j, JobState.COMPLETED, b"R" * LARGE) for j in ids])
            e.jobs.request_kill(ids[0])
            e.queue.receive(self.queue, k, LONG, "rolled back")
            # (not jobs.delete: it removes the blobs at once, which a rollback cannot bring
            # back; nothing deletes jobs inside atomic())
            raise Boom

    # -- the queue

    @rule(k=st.integers(1, 4), vt=st.sampled_from([LONG, 0.0]))
    def receive(self, k, vt):
        visible = [m for m in self.live_msgs() if m.visible][:k]
        # SQS redrives a message received 10 times (docs/aws.md): not modelled
        if any(c >= 8 for m in visible for c in m.counts.values()):
            return
        for name, e in self.each():
            got = e.queue.receive(self.queue, k, vt, "holder")
            assert [(d.job_id, d.body) for d in got] == [(m.job_id, m.body) for m in visible], (
                name)
            for m, d in zip(visible, got, strict=True):
                m.counts[name] += 1
                assert d.receive_count == m.counts[name], name
                if m.current[name] is not None:
                    self.stale.append((name, m.current[name]))
                m.current[name] = d
        for m in visible:
            m.visible, m.holding = vt == 0, True

    @precondition(lambda self: self.held())
    @rule(i=st.integers(0, 99),
          op=st.sampled_from(["ack", "release", "hand_back", "extend", "extend0", "dead"]))
    def settle(self, i, op):
        held = self.held()
        m = held[i % len(held)]
        for name, e in self.each():
            d = m.current[name]
            if op == "ack":
                e.queue.ack([d])
            elif op == "release":
                e.queue.release([d])
            elif op == "hand_back":
                e.queue.hand_back([d])
                if isinstance(e, EmbeddedEnclave) and m.holding:  # SQS cannot take a
                    m.counts[name] = max(0, m.counts[name] - 1)  # receive back
            elif op == "extend":
                e.queue.extend([d], LONG)
            elif op == "extend0":
                e.queue.extend([d], 0.0)
            else:
                e.queue.dead_letter([d], f"dead {m.mid}")
                self.dead[name].append((m.job_id, m.counts[name], f"dead {m.mid}"))
        if op in ("release", "hand_back"):
            m.holding = False
        if op == "ack":
            m.gone = "acked"
        elif op == "dead":
            m.gone = "dead"
        else:
            m.visible = op != "extend"

    @precondition(lambda self: any(name == "embedded" for name, _ in self.stale))
    @rule(i=st.integers(0, 99),
          op=st.sampled_from(["ack", "release", "hand_back", "extend", "dead"]))
    def stale_receipt(self, i, op):
        """A receipt of an earlier delivery changes nothing (not on SQS: aws_moto.py)."""
        stale = [d for name, d in self.stale if name == "embedded"]
        d = stale[i % len(stale)]
        q = self.enclaves["embedded"].queue
        if op == "ack":
            q.ack([d])
        elif op == "release":
            q.release([d])
        elif op == "hand_back":
            q.hand_back([d])
        elif op == "extend":
            q.extend([d], LONG)
        else:
            q.dead_letter([d], "stale")

    # -- invariants

    @invariant()
    def depth(self):
        for name, e in self.each():
            assert e.queue.depth(self.queue) == len(self.live_msgs()), name

    @invariant()
    def records(self):
        ids = sorted(self.jobs)
        unknown = [*sorted(self.deleted), uuid.uuid4().hex]
        for name, e in self.each():
            got = e.jobs.get_many([*ids, *unknown], with_result=True)
            assert sorted(got) == ids, name
            for j in ids:
                m, r = self.jobs[j], got[j]
                want = (m.owner, m.state, m.node, m.attempts, m.reason, m.result, m.usage,
                        m.kill, m.started, m.finished)
                have = (r.owner, r.state, r.node, r.attempts, r.reason, r.result, r.usage,
                        r.kill_requested, r.started is not None, r.finished is not None)
                assert have == want, (name, j)
                history = e.jobs.history(j)
                assert [(s, d) for _, s, d in history] == m.history, (name, j)
                stamps = [t for t, _, _ in history]
                assert stamps == sorted(stamps), (name, j)
            for j in unknown:
                assert e.jobs.history(j) == [], name
                assert e.jobs.get(j) is None, name
            # (AWS answers kill_requested from a read up to a second old: a deleted job's
            # kill may linger that long, which stops nothing, the job being gone)
            asked = [*ids, *unknown] if name == "embedded" else [*ids, unknown[-1]]
            assert e.jobs.kill_requested(asked) == {j for j in ids if self.jobs[j].kill}, name

    @invariant()
    def result_blobs(self):
        """A large result's blob exists while its job records it, and only then."""
        ours = {*self.jobs, *self.deleted}
        want = {j for j, m in self.jobs.items() if m.result is not None and len(m.result) >= LARGE}
        for name, e in self.each():
            keys, _ = e.blobs.older("result-", float("inf"), scan=100000)
            have = [k.split("-")[1] for k in keys]
            assert sorted(j for j in have if j in ours) == sorted(want), name

    @invariant()
    def listing(self):
        newest = sorted(self.jobs, key=lambda j: -self.jobs[j].seq)
        for name, e in self.each():
            for owner in self.owners:
                for state in (None, JobState.PENDING, JobState.PROCESSING):
                    want = [j for j in newest if self.jobs[j].owner == owner
                            and (state is None or self.jobs[j].state == state)]
                    got = [r.job_id for r in e.jobs.list(owner=owner, state=state, limit=3)]
                    assert got == want[:3], (name, owner, state)

    def teardown(self):
        for name, e in self.each():
            if not self.dead[name] and name != "embedded":  # (a listing costs a 1 s poll)
                continue
            dead = [(d["job_id"], d["receive_count"], d["reason"])
                    for d in e.queue.dead_letters(self.queue)]
            assert dead == self.dead[name], name
            # what the queue holds is what the model says
            held = [m.current[name] for m in self.live_msgs() if m.current[name] is not None]
            e.queue.release(held)
            rest = e.queue.receive(self.queue, 1000, LONG, "drain")
            assert sorted(d.body for d in rest) == sorted(m.body for m in self.live_msgs()), name
            e.queue.ack(rest)
            assert e.queue.depth(self.queue) == 0, name


#: more, for a longer hunt: KOTTA_STATEFUL_EXAMPLES=300 KOTTA_STATEFUL_STEPS=50 (and
#: KOTTA_STATEFUL_NOSHRINK=1: a failure as found, not minimised, which on moto takes long)
SETTINGS = settings(max_examples=int(os.environ.get("KOTTA_STATEFUL_EXAMPLES", 40)),
                    stateful_step_count=int(os.environ.get("KOTTA_STATEFUL_STEPS", 20)),
                    deadline=None, database=None, suppress_health_check=list(HealthCheck),
                    **({"phases": [Phase.generate]} if os.environ.get("KOTTA_STATEFUL_NOSHRINK") else {}))


@contextlib.contextmanager
def _enclaves(tmp_path, names):
    with contextlib.ExitStack() as stack:
        out: dict[str, Enclave] = {}
        for name in names:
            if name == "embedded":
                out[name] = EmbeddedEnclave(tmp_path / "enclave")
                stack.callback(out[name].close)
            else:
                from tests import aws_moto

                out[name] = stack.enter_context(aws_moto.aws_on_moto(tmp_path))
        yield out


def test_embedded_backend_state_machine(tmp_path):
    with _enclaves(tmp_path, ["embedded"]) as enclaves:
        run_state_machine_as_test(lambda: BackendMachine(enclaves), settings=SETTINGS)


#: moto answers a call in milliseconds, not microseconds: fewer examples
AWS_SETTINGS = settings(SETTINGS, max_examples=max(1, SETTINGS.max_examples // 4))


def test_backends_agree_state_machine(tmp_path):
    """Differential: the embedded backend and AWS (moto), step by step the same."""
    pytest.importorskip("moto")
    with _enclaves(tmp_path, ["embedded", "aws"]) as enclaves:
        run_state_machine_as_test(lambda: BackendMachine(enclaves), settings=AWS_SETTINGS)
