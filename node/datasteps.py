"""The node's data steps for tasks that declare ``inputs`` / ``outputs``.

::

    dispatch ─ task declares data ─> start_in: job -> staging_inputs ─┐ (a thread)
                                                                      │ authorise every URI
                                                                      │ (policy; denials audited)
                                                                      │ owner-scoped store + env
                                                                      │ stage_inputs -> workdir
    collect <─ ready: back to pending, with workdir + env for the worker ┘   (audited)
       ...      the worker runs the task in workdir, with the owner's credentials
    finish_from_worker ─ egress check (size of value + stdout + stderr against the
                         datasets read) ─ ok and outputs? ─> job -> staging_outputs ─┐
                                                                  stage_outputs       │
    collect <─ the result (or StagingFailed) is recorded ─────────────────────────────┘

Every step runs with the job owner's scoped credentials (``data.objects_for``), never the
node's.  A failure fails the job with a reason the user sees: ``DataAccessDenied``
(nothing ran), ``StagingFailed``, ``EgressDenied``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kotta_executor import wire
from kotta_executor.backends.base import Finished
from kotta_executor.errors import (
    AccessDenied,
    AuthenticationError,
    InvalidDataUri,
    KottaError,
    StagingFailed,
)
from kotta_executor.security.data import (
    check_writes,
    enclave_areas,
    held_uri,
    objects_for,
    put_object,
)
from kotta_executor.security.policy import PolicyStore, egress_rule
from kotta_executor.security.tokens import standing
from kotta_executor.states import JobState

from .staging import StageCache, hold_area, remove_tree, stage_inputs, stage_outputs

if TYPE_CHECKING:
    from .daemon import Node
    from .pool import Task

log = logging.getLogger("kotta.node.data")

#: seconds a task's data credential outlives its walltime
CREDENTIAL_MARGIN = 600.0
#: a staged task that waited longer than this for a worker gets its credentials anew
#: (those of its stage-in last walltime + CREDENTIAL_MARGIN from then, not from its start):
#: half the margin, so that a task starts with at least its walltime and 5 minutes, and
#: a backlog of staged tasks is not one role assumption each (AWS) in the node's loop
REISSUE_AFTER = CREDENTIAL_MARGIN / 2
#: seconds before a finished task whose take-over failed (a transient fault) is taken over
#: again; doubled at each failure up to TAKE_OVER_RETRY_MAX
TAKE_OVER_RETRY = 0.1
TAKE_OVER_RETRY_MAX = 5.0
#: seconds a staging thread tries a call to the enclave again (the owner's role assumed,
#: the policies read, an object read or written, an audit record written) through a fault
#: that may pass: throttling past botocore's retries, a 5xx, a lost answer.  As long as
#: the node's own steps wait (daemon.PATIENCE); from STAGING_RETRY, doubled at each try up
#: to STAGING_RETRY_MAX.  A lasting fault (``Enclave.lasting``) fails the job at once.
STAGING_PATIENCE = 60.0
STAGING_RETRY = 0.1
STAGING_RETRY_MAX = 5.0
#: the step of still_allowed (its patience counted by the node, as its own steps' are)
CHECK_AGAIN = "checking a staged task's data access again"


@dataclass
class Staged:
    """What stage-in made for a task."""

    workdir: Path
    env: dict[str, str]  # the owner's scoped credentials, for the worker
    egress: tuple[bool, int | None] = (True, None)
    issued: float = 0.0  # when ``env``'s credentials were issued (time.time())


def _looser(rule: tuple[bool, int | None], than: tuple[bool, int | None]) -> bool:
    allowed, cap = rule
    if not than[0]:
        return allowed
    return allowed and (cap is None or (than[1] is not None and cap > than[1]))


def _rule(rule: tuple[bool, int | None]) -> str:
    allowed, cap = rule
    return "deny" if not allowed else ("no cap" if cap is None else f"a cap of {cap} bytes")


def _refused_unsent(exc: BaseException) -> bool:
    """A request botocore refused before sending it (ParamValidationError: a parameter AWS
    does not take): sent again, it is refused again.  Lasting for the task being staged
    only, not for the node (``Enclave.lasting`` stops it), so it is not added there."""
    kind = type(exc)
    return kind.__name__ == "ParamValidationError" and kind.__module__.startswith("botocore")


def declares_data(header: dict) -> bool:
    return bool(header.get("inputs") or header.get("outputs"))


class DataSteps:
    def __init__(self, node: Node, root: Path, cache_bytes: int, threads: int = 4):
        self.node = node
        self.enclave = node.enclave
        self.policies = PolicyStore(node.enclave.records, node.audit,
                                    reserved=enclave_areas(node.enclave))
        self.root = Path(root)
        self._area_lock = hold_area(self.root)  # (and the areas of dead nodes go)
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cache = StageCache(self.root / "cache", cache_bytes)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kotta-stage")
        #: tasks with a staging step in a thread, by job id
        self.active: dict[str, Task] = {}
        self._done: deque[tuple[Task, str, Future]] = deque()
        #: finished tasks whose take-over failed, to try again (finish_from_worker)
        self._later: deque[tuple] = deque()
        self._later_tries, self._later_after = 0, 0.0
        self.abandoned = False  # the drain handed back tasks whose staging still ran
        self.past_deadline = False  # the drain's deadline came: no upload begins now
        #: what the worker sent for each task whose outputs are being uploaded, by job id:
        #: a failed upload keeps the task's stdout, stderr and usage (it ran)
        self._ran: dict[str, Finished] = {}
        self._closing = threading.Event()  # staging threads stop trying calls again
        self.reissue_after = REISSUE_AFTER

    # ------------------------------------------------------------------ stage-in

    def start_in(self, tasks: list[Task], going: Iterable[Task] = ()) -> None:
        """Claim the jobs (pending -> staging_inputs) and stage each in a thread.
        ``going``: the tasks the node is handing to workers in this step (held, though
        in no worker's pipe yet)."""
        claimed = self.node.claim(tasks, JobState.STAGING_INPUTS)
        moved = set(map(id, claimed))
        lost = [t for t in tasks if id(t) not in moved]
        if lost:  # cancelled meanwhile, finished elsewhere, or a second copy
            self.node.drop_lost(lost, [*claimed, *going])
        for t in claimed:
            self.active[t.job_id] = t
            self._submit(t, "in", self._stage_in, t)

    def _submit(self, task: Task, phase: str, fn, *args) -> None:
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(lambda f: (self._done.append((task, phase, f)), self.node.request_wake()))

    def _stage_in(self, task: Task) -> Staged:
        h, claims = task.header, task.claims
        user, job = claims.user, task.job_id
        inputs = list(h.get("inputs") or ())
        # everything authorised, before touching anything
        try:
            self._tried("reading the policies and the owner's standing", self._authorise, task)
            egress = self._tried("reading the datasets' egress rules", self._egress, task)
        except AccessDenied as exc:
            exc.audited = True  # (by the policy store, with the dataset)
            raise
        check_writes(self.enclave, h.get("outputs") or ())  # (made at stage-out: AWS's limit)
        # for the stage-in and the task: to read its inputs only.  Its outputs are written
        # by the node, at stage-out, once it has succeeded (grants and the owner's standing
        # checked again, each upload audited): never by the task itself
        issued = time.time()
        store, env = self._tried(f"getting {user}'s data credentials", self._task_credentials,
                                 task)
        workdir = Path(tempfile.mkdtemp(prefix=f"{job}-", dir=self.work))  # (the whole id: its
        # first digits are its submit time, the same for every job of a burst)

        def audit(item: dict) -> None:  # each as it is read: a later one may fail
            self._tried(
                f"writing the audit record of reading {item['uri']}", self.node.audit.append,
                "stage-in", user=user, dataset=item["uri"], job_id=job,
                detail=f"{item['bytes']} bytes{' from the node cache' if item['cached'] else ''}",
            )

        try:
            if inputs:
                stage_inputs(_Tried(self, store), self.cache, inputs, workdir, audit)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return Staged(workdir, env, egress, issued)

    def _task_credentials(self, task: Task):
        """The owner's store and worker environment to read the task's inputs, for its
        walltime and CREDENTIAL_MARGIN from now."""
        h, claims = task.header, task.claims
        return objects_for(
            self.enclave, user=claims.user, role=claims.role, job_id=task.job_id,
            reads=list(h.get("inputs") or ()), ttl=h["walltime"] + CREDENTIAL_MARGIN,
        )

    def _with_staged(self, task: Task) -> None:
        """The task's envelope for its worker: its working directory and credentials."""
        head = {k: v for k, v in task.header.items() if k not in ("auth",)}
        head["workdir"], head["env"] = str(task.staged.workdir), task.staged.env
        sections = dict(wire.decode(task.data).sections)
        sections.pop(wire.MAC_SECTION, None)
        task.data = wire.encode(head, sections)

    def _egress(self, task: Task) -> tuple[bool, int | None]:
        """The egress rule of the data the task reads, as the policies are now; AccessDenied
        if its outputs go to a dataset laxer than that (_no_laundering)."""
        h = task.header
        read = [d for uri in h.get("inputs") or () for d in self.policies.datasets_for(uri)]
        egress = egress_rule(read) if read else (True, None)
        if egress != (True, None):
            self._no_laundering(task, egress, list(h.get("outputs") or ()))
        return egress

    def _no_laundering(self, task: Task, egress: tuple[bool, int | None], outputs) -> None:
        """Outputs of a task that read restricted data must go to datasets at least as
        strict, or a second task could read the data back out of a laxer one."""
        for uri in outputs:
            rule = egress_rule(self.policies.datasets_for(uri))
            if _looser(rule, egress):
                reason = (
                    f"output {uri} is in a dataset whose egress rule ({_rule(rule)}) is looser "
                    f"than that of the data the task reads ({_rule(egress)})"
                )
                self.node.audit.append(
                    "access-denied", user=task.claims.user, allowed=False, job_id=task.job_id,
                    dataset=uri, detail=reason,
                )
                raise AccessDenied(reason)

    # ------------------------------------------------------------------ results

    def finish_from_worker(self, task: Task, data: bytes, fin: Finished) -> bool:
        """Take over a finished task that staged data; False if it did not.  Its result
        is checked for egress; its outputs, if it succeeded, are uploaded (even when its
        result is held: they stay inside the enclave, in datasets at least as strict)."""
        if task.staged is None:
            return False
        self._take_over(task, data, fin, fin.state is JobState.COMPLETED, checked=False)
        return True

    def _take_over(self, task: Task, data: bytes, fin: Finished, succeeded: bool,
                   checked: bool) -> None:
        if self.past_deadline and succeeded and task.header.get("outputs"):
            # It returned as the drain's deadline came (its result read once its worker
            # was killed): an upload begun now the stop abandoned, its job left in
            # staging_outputs, no node uploading, until one ran it again.  Handed back
            # begun, as the tasks still running then are, to run again.
            log.warning("drain timeout: handing back %s, which ended as its worker was "
                        "killed (its outputs not uploaded)", task.job_id)
            self.enclave.queue.release([task.delivery])
            self.discard(task)
            return
        try:
            if not checked:
                held = self._check_egress(task, task.staged, data)
                if held is not None:  # the job fails with EgressDenied; nothing of it leaves
                    fin = Finished(fin.job_id, JobState.FAILED, held, wire.failure_reason(
                        "EgressDenied",
                        "a dataset's policy keeps its result and output in the enclave"), None)
                checked = True
            moved = task.header.get("outputs") and succeeded and self.enclave.jobs.transition(
                [task.job_id], JobState.STAGING_OUTPUTS, node=self.node.node_id)
        except Exception as exc:
            # A transient fault (throttling past the backend's retries) must not end the
            # node and the tasks it runs, nor run this one again: it is kept (held, its
            # message extended) and taken over again at a later step.  (A move made whose
            # answer was lost is made again: staging_outputs may follow itself.)
            try:
                self.node._transient("taking over finished tasks with data", exc)
            except Exception:
                if checked:
                    raise
                # Its result could not be held, or the hold audited, for good (AccessDenied
                # on AWS, an audit store refusing the record): the job fails saying so,
                # nothing of it leaving, rather than end the node (the job left processing,
                # to run again and end the next node as well)
                self._unheld(task, exc)
                return
            self._later_tries += 1
            delay = min(TAKE_OVER_RETRY_MAX, TAKE_OVER_RETRY * 2 ** (self._later_tries - 1))
            self._later_after = time.monotonic() + delay
            log.warning("taking over finished job %s failed (%s: %s); trying again in %.2g s",
                        task.job_id, type(exc).__name__, exc, delay)
            self.active[task.job_id] = task
            self._later.append((task, data, fin, succeeded, checked))
            return
        self._later_tries = 0
        self.node._failing.pop("taking over finished tasks with data", None)
        if moved:
            self.active[task.job_id] = task
            self._ran[task.job_id] = fin
            self._submit(task, "out", self._stage_out, task, fin)
        else:  # no outputs to write (or a move refused: the job is final, fin not recorded)
            self.active.pop(task.job_id, None)
            self._finish(task, fin)

    def _unheld(self, task: Task, exc: Exception) -> None:
        """Fail a finished task whose result the egress check could not hold in the
        enclave, or whose hold it could not audit: none of its result (value, output)
        goes to the client, and its outputs are not written."""
        self.node._failing.pop("taking over finished tasks with data", None)
        log.error("holding the result of job %s for egress failed: %s: %s", task.job_id,
                  type(exc).__name__, exc)
        reason = (
            f"job {task.job_id} read a dataset whose policy keeps its result in the enclave, "
            f"and holding it there (kept for an admin, the egress denial audited) failed: "
            f"{type(exc).__name__}: {exc}; nothing of it left the enclave"
        )
        self.active.pop(task.job_id, None)
        self._finish(task, Finished(task.job_id, JobState.FAILED, wire.failure(
            task.job_id, task.header["n"], "StagingFailed", reason),
            wire.failure_reason("StagingFailed", reason), None))

    def _check_egress(self, task: Task, staged: Staged, data: bytes) -> bytes | None:
        """None if the result may go to the client; else the EgressDenied envelope that
        replaces it, the result being kept inside the enclave (``held_uri``)."""
        allowed, cap = staged.egress
        if allowed and cap is None:
            return None
        size = len(data)  # all of it: a worker writes the header too (usage, reason)
        if allowed and size <= cap:
            return None
        handle = held_uri(self.enclave, task.job_id)
        put_object(self.enclave, handle, data)  # not where clients read: for an admin's review
        why = "forbids data leaving the enclave" if not allowed else f"caps egress at {cap} bytes"
        reason = (
            f"job {task.job_id} read a dataset whose policy {why}; its result and output "
            f"({size} bytes) stay in the enclave as {handle}"
        )
        self.node.audit.append(
            "egress-denied", user=task.claims.user, allowed=False, job_id=task.job_id,
            dataset=",".join(task.header.get("inputs") or ()), detail=f"{size} bytes held as {handle}",
        )
        return wire.failure(task.job_id, task.header["n"], "EgressDenied", reason, handle=handle)

    def still_allowed(self, task: Task) -> bool | None:
        """Whether the policies still let a staged task read its inputs and write its
        outputs, now that a worker is free for it (it may have waited behind long tasks
        since its stage-in), and its owner still has rights; if not, it fails with
        DataAccessDenied, never having run.  The egress rule of what it reads is taken
        again too: a dataset made stricter meanwhile holds back the task's result.  A task
        that waited gets its data credentials anew, for its walltime from now.  None: a
        fault that may pass (throttling past the backend's retries, a 5xx) kept it from
        being checked; it waits for a later step rather than end the node or fail the job
        (a lasting fault, or one past the node's patience, fails it: it never ran)."""
        staged, now = task.staged, time.time()
        try:
            self._authorise(task)
            egress = self._egress(task)
            # it waited: its walltime starts now
            env = (self._task_credentials(task)[1] if now - staged.issued > self.reissue_after
                   else None)
        except AccessDenied as exc:
            exc.audited = True  # (by the policy store, with the dataset)
            self._fail(task, "in", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the node's and the job's end only if lasting
            try:
                if _refused_unsent(exc):  # never sent, never will be: the job's end, at once
                    raise exc
                self.node._transient(CHECK_AGAIN, exc)
            except Exception:  # noqa: BLE001 - as a failed stage-in: it never ran
                self._fail(task, "in", exc)
                return False
            log.warning("%s of job %s failed (%s: %s); trying again at a later step",
                        CHECK_AGAIN, task.job_id, type(exc).__name__, exc)
            return None
        self.node._failing.pop(CHECK_AGAIN, None)
        staged.egress = egress
        if env is not None:
            staged.env, staged.issued = env, now
            self._with_staged(task)
        return True

    def _authorise(self, task: Task, *, reads: bool = True) -> None:
        """The policies as they are now (audited when they deny), and the standing of the
        owner's token: a grant revoked, or a user disabled, since the stage-in stops what
        comes after it."""
        h, claims = task.header, task.claims
        problem = standing(self.enclave.records, claims)
        if problem:
            reason = f"{problem}: job {task.job_id} may no longer touch its data"
            self.node.audit.append(
                "access-denied", user=claims.user, allowed=False, job_id=task.job_id,
                dataset=",".join([*(h.get("inputs") or ()), *(h.get("outputs") or ())]),
                detail=reason,
            )
            exc = AccessDenied(reason)
            exc.audited = True
            raise exc
        for uri in (h.get("inputs") or ()) if reads else ():
            self.policies.require(claims.role, "read", uri, user=claims.user, job_id=task.job_id)
        for uri in h.get("outputs") or ():
            self.policies.require(claims.role, "write", uri, user=claims.user, job_id=task.job_id)

    def _stage_out(self, task: Task, fin: Finished) -> Finished:
        staged: Staged = task.staged
        user = task.claims.user
        try:  # a write grant revoked while the task ran
            self._tried("reading the policies and the owner's standing", self._authorise, task,
                        reads=False)
        except AccessDenied as exc:
            exc.audited = True  # (by the policy store, with the dataset)
            raise
        # fresh owner credentials for the writes: the stage-in ones may have expired
        # during a long task (on AWS a chained role session lasts one hour at most)
        store, _ = self._tried(
            f"getting {user}'s data credentials", objects_for,
            self.enclave, user=user, role=task.claims.role, job_id=task.job_id,
            writes=task.header["outputs"], ttl=CREDENTIAL_MARGIN,
        )
        stage_outputs(  # each audited before it is written: never in a dataset unaudited
            _Tried(self, store), staged.workdir, task.header["outputs"],
            lambda item: self._tried(
                f"writing the audit record of writing {item['uri']}", self.node.audit.append,
                "stage-out", user=user, dataset=item["uri"], job_id=task.job_id,
                detail=f"{item['bytes']} bytes",
            ),
        )
        return replace(fin, at=time.time())  # it finishes now, its outputs written

    def _tried(self, what: str, call, *args, **kw):
        """``call(*args, **kw)``, in a staging thread, tried again through a fault that may
        pass (one the enclave does not call lasting: throttling past botocore's retries, a
        5xx, a lost answer), with a backoff, for STAGING_PATIENCE: a passing storm must
        not fail a job that can run.  A lasting fault, or one that outlasts the patience,
        fails it with StagingFailed naming ``what`` and the fault.  Staging's own answers
        (kotta's errors: a denial, a bad output; no such object, or the node's files
        failing: an OSError not from botocore) are raised as they are, at once."""
        delay, since = STAGING_RETRY, time.monotonic()
        while True:
            try:
                return call(*args, **kw)
            except Exception as exc:
                if isinstance(exc, KottaError) or (
                    isinstance(exc, OSError) and not type(exc).__module__.startswith("botocore")
                ):
                    raise
                lasting = self.enclave.lasting(exc) or _refused_unsent(exc)
                waited = time.monotonic() - since
                if lasting or waited + delay > STAGING_PATIENCE or self._closing.is_set():
                    how = "" if lasting else f" (for {waited:.1f} s)"
                    log.warning("%s failed%s: %s: %s", what, how, type(exc).__name__, exc)
                    raise StagingFailed(
                        f"{what} failed{how}: {type(exc).__name__}: {exc}") from exc
                log.warning("%s failed (%s: %s); trying again in %.2g s", what,
                            type(exc).__name__, exc, delay)
                self._closing.wait(delay)
                delay = min(STAGING_RETRY_MAX, delay * 2)

    def _finish(self, task: Task, fin: Finished) -> None:
        staged = task.staged
        if staged is not None:
            remove_tree(staged.workdir)
        self.node._queue_finish(task, task.delivery, fin, task.header["client"])

    # ------------------------------------------------------------------ the loop's step

    def collect(self) -> None:
        """Move tasks whose staging step ended on: to the workers, or to their result."""
        if self._later and time.monotonic() >= self._later_after:
            later, self._later = self._later, deque()
            for args in later:
                self._take_over(*args)
        while self._done:
            task, phase, fut = self._done.popleft()
            self.active.pop(task.job_id, None)
            exc = fut.exception()
            if task.kill_requested and phase == "in":
                if exc is None:
                    task.staged = fut.result()
                self.kill(task, unbegun=task.claimed)  # (its claim was no attempt)
            elif exc is None and phase == "in":
                task.staged = fut.result()
                self._with_staged(task)
                self.node.pending.appendleft(task)
            elif exc is None:
                self._ran.pop(task.job_id, None)
                self._finish(task, fut.result())
            else:
                self._fail(task, phase, exc, self._ran.pop(task.job_id, None))

    def kill(self, task: Task, when: str = "while staging; it never ran", *,
             unbegun: bool = False) -> None:
        """End a task killed before a worker began it: cancelled, as a killed task is (its
        staged inputs, if any, removed now).  ``unbegun``: Finished.unbegun."""
        reason = f"job {task.job_id} was killed on request ({when})"
        data = wire.failure(task.job_id, task.header["n"], "TaskKilled", reason)
        self._finish(task, Finished(task.job_id, JobState.CANCELLED, data,
                                    wire.failure_reason("TaskKilled", reason),
                                    unbegun=unbegun))

    def _fail(self, task: Task, phase: str, exc: BaseException,
              ran: Finished | None = None) -> None:
        """Fail a task whose staging step failed; ``ran``: what its worker sent, when it
        ran (its outputs failed), whose stdout, stderr and usage the user still gets."""
        what = "its inputs" if phase == "in" else "its outputs"
        if isinstance(exc, AccessDenied) and not isinstance(exc, AuthenticationError):
            etype, reason = "DataAccessDenied", f"job {task.job_id}: {exc}"
            if phase == "in":
                reason += "; nothing ran"
        elif isinstance(exc, (StagingFailed, InvalidDataUri, FileNotFoundError, AuthenticationError)):
            etype, reason = "StagingFailed", f"job {task.job_id}: staging {what} failed: {exc}"
        else:
            log.exception("staging %s of job %s failed", what, task.job_id, exc_info=exc)
            etype = "StagingFailed"
            reason = f"job {task.job_id}: staging {what} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, (AccessDenied, PermissionError)) and not getattr(
            exc, "audited", False
        ):  # a refusal the policies did not make (S3's, at stage-in too): on record as well
            uris = task.header.get("inputs" if phase == "in" else "outputs") or ()
            try:
                self.node.audit.append(
                    "access-denied", user=task.claims.user, allowed=False, job_id=task.job_id,
                    dataset=",".join(uris) or None, detail=reason,
                )
            except Exception as exc2:  # noqa: BLE001 - the job fails all the same, saying
                # so: raised here (the node's loop), it ended the node, the job left staging
                log.error("the access-denied audit record of job %s failed: %s: %s",
                          task.job_id, type(exc2).__name__, exc2)
                reason += (f" (its access-denied audit record could not be written: "
                           f"{type(exc2).__name__}: {exc2})")
        usage, out = None, {}
        if ran is not None:  # (an envelope held for egress has no output: none leaves)
            env = wire.decode(ran.result)
            out = {k: env.sections.get(k, b"") for k in ("stdout", "stderr")}
            usage = env.header.get("usage", ran.usage)
            error = env.header.get("error")
            if isinstance(error, dict) and error.get("handle"):  # held for egress: the
                # user is told where it is kept, as EgressDenied would have
                out["handle"] = error["handle"]
                reason += f"; its result stays in the enclave as {error['handle']} (EgressDenied)"
        data = wire.failure(task.job_id, task.header["n"], etype, reason, **out)
        if usage is not None:
            env = wire.decode(data)
            data = wire.encode({**env.header, "usage": usage}, env.sections)
        self._finish(task, Finished(task.job_id, JobState.FAILED, data,
                                    wire.failure_reason(etype, reason), usage))

    def held(self) -> list:
        return [t.delivery for t in self.active.values()]

    def ran(self) -> int:
        """How many of the active tasks have run: their outputs are being uploaded, or
        their take-over is to be tried again.  They hold no worker (Node._room)."""
        return len(self._ran) + len(self._later) if self.active else 0

    def discard(self, task: Task) -> None:
        if task.staged is not None:
            remove_tree(task.staged.workdir)

    def close(self) -> None:
        """Stop the staging threads (waiting for them unless the drain gave up on some:
        their tasks were handed back), then remove the node's work directories and cache
        (the cache lives as long as its node)."""
        self._closing.set()
        self.pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        remove_tree(self.root)
        os.close(self._area_lock)


class _Tried:
    """A task's store whose calls (reading and writing the enclave's objects) a staging
    thread tries again through a passing fault (:meth:`DataSteps._tried`)."""

    def __init__(self, steps: DataSteps, store):
        self._steps, self._store = steps, store

    def head(self, uri: str):
        return self._steps._tried(f"reading {uri}", self._store.head, uri)

    def download(self, uri: str, dest: Path):
        return self._steps._tried(f"reading {uri}", self._store.download, uri, dest)

    def upload(self, src: Path, uri: str):
        return self._steps._tried(f"writing {uri}", self._store.upload, src, uri)

    def check_write(self, uri: str, others=()) -> None:
        check = getattr(self._store, "check_write", None)  # (an embedded enclave's only)
        if check is not None:
            self._steps._tried(f"checking {uri}", check, uri, others)
