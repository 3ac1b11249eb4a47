"""KottaFuture: a ``concurrent.futures.Future`` with a job id, captured output and controls.

The stdlib state machine is used unchanged; the executor's manager thread is the one that
calls ``set_result`` / ``set_exception``.  Two departures, both for memory (a client may hold
100,000 pending futures): the ``threading.Condition`` every stdlib future allocates is created
on first use, and attributes that only exist once a future is done are class defaults until
then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any

from .errors import TaskKilled
from .states import JobState

if TYPE_CHECKING:
    from .executor import KottaExecutor

#: reentrant for its owner record (``_is_owned``): a collection while it is held (a
#: Condition's making allocates) may close an abandoned map's iterator, whose cancel then
#: waits for the manager rather than use futures here (KottaExecutor._cancel_left)
_CONDITION_LOCK = threading.RLock()
# A child forked while another thread held it (the manager, resolving a future) would
# find it held for ever, by a thread it does not have: its own executor's futures waited
# for it at their first use.  The child gets it afresh, as concurrent.futures' locks.
os.register_at_fork(after_in_child=_CONDITION_LOCK._at_fork_reinit)


@contextlib.contextmanager
def _interrupts_held():
    """Hold a Ctrl-C (SIGINT's handler: KeyboardInterrupt) that comes during a cancel or a
    kill until it has ended, then raise it.  Raised in its middle, it left the job recorded
    cancelled under a future still pending (for ever, once the executor had let it go), or
    a cancel asked for that the manager's next send recorded after the interrupt.  A second
    Ctrl-C meanwhile is raised at once (a cancel stuck on an enclave it cannot reach): then
    the future may learn its job's state only from the executor's reconcile.  SIGINT
    interrupts the main thread only, and only there may its handler be changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or getattr(handler, "_kotta_holds", False):
        yield  # (not Python's: nothing to hold; or held already, by a call around this one)
        return
    held: list = []

    def hold(signum, frame):
        if held:  # the second: the user insists
            held.clear()
            handler(signum, frame)
            return
        held.append((signum, frame))

    hold._kotta_holds = True
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:  # (unless the code held changed it)
            signal.signal(signal.SIGINT, handler)
        if held:
            handler(*held.pop())


class KottaFuture(Future):
    """The future of one Kotta job.

    ``job_id``: the job's id in the enclave (``kotta status JOB``).
    ``stdout`` / ``stderr``: everything the task wrote to file descriptors 1 and 2, once done.
    """

    stdout: str | None = None
    stderr: str | None = None
    _usage: dict[str, Any] | None = None
    _batch: bool | str = False  # True: a map task's outcomes; "values": attached map task
    _view: _MapJobView | None = None  # a map task's: what attach() gives for it

    def __init__(self, job_id: str, executor: KottaExecutor):  # noqa: D107
        # Future.__init__ is not called: it would allocate the Condition eagerly.
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []
        self.job_id = job_id
        self._owner: KottaExecutor | weakref.ref = executor  # weak once done (_invoke_callbacks)

    @property
    def _executor(self) -> KottaExecutor | None:
        """The executor of the job; None once the future is done and the executor was
        collected."""
        owner = self._owner
        return owner() if isinstance(owner, weakref.ref) else owner

    def _invoke_callbacks(self) -> None:
        # Done (the stdlib calls this as a future finishes or is cancelled): the executor
        # is held weakly from now on, as a ProcessPoolExecutor's future does not hold its
        # executor at all.  Else a list of results kept (a notebook's) kept a dropped
        # executor, and the node and workers it started, alive with it.
        owner = self._owner
        if not isinstance(owner, weakref.ref):
            self._owner = owner._weak_self
        super()._invoke_callbacks()
        # called once: let go of them (a task waiting for this future has its executor's
        # in its callback, which held the executor as the future did)
        self._done_callbacks = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self.__dict__.get("_cond")
        if cond is None:
            with _CONDITION_LOCK:
                cond = self.__dict__.get("_cond")
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def __reduce__(self):
        # (else pickling fails on the executor's locks, with "cannot pickle
        # '_thread._local' object": a future in a list looked like a bug of the executor)
        raise TypeError(
            f"a KottaFuture (job {self.job_id}) cannot be sent to a task, nor returned by "
            "one: only a future passed as an argument itself is waited for and replaced by "
            "its value, not one inside a list, dict or other object; pass each future as an "
            "argument (submit(fn, *futures)), or return its result()"
        )

    def __repr__(self) -> str:
        # the stdlib's ("<KottaFuture at 0x… state=finished returned int>"), with the job
        head, rest = Future.__repr__(self).split(" ", 1)
        exc = self._exception
        if self._state == FINISHED and exc is not None and not exc:
            # an exception that is false (a __len__ of 0): the stdlib's repr tests
            # ``if self._exception:`` and said "returned NoneType", as result() returned None
            rest = f"at {id(self):#x} state=finished raised {type(exc).__name__}>"
        return f"{head} job={self.job_id} {rest}"

    def result(self, timeout: float | None = None) -> Any:  # noqa: D102 - the stdlib's
        self._check_not_waiting_on_manager("result", timeout)
        value = super().result(timeout)
        if self._exception is not None:
            # an exception that is false (its __bool__, or a __len__ of 0): the stdlib's
            # result() before Python's fix of gh-132063 (2025; 3.11's, 3.12's) tests
            # ``if self._exception:``, and returned None for it, as if the task had returned
            try:
                raise self._exception
            finally:
                self = None  # (as the stdlib: no cycle through the traceback's frame)
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:  # noqa: D102
        self._check_not_waiting_on_manager("exception", timeout)
        return super().exception(timeout)

    def _check_not_waiting_on_manager(self, what: str, timeout: float | None) -> None:
        """Done-callbacks run on the executor's manager thread, the one that resolves its
        futures: there, a wait without a timeout for one not done (a callback that submits
        and waits, a blocking ``@kottajob`` call) would last for ever, and with it every
        future of the executor, its shutdown and the interpreter's exit.  It raises."""
        if timeout is not None or self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
            return
        ex = self._executor
        if ex is not None and ex._manager is threading.current_thread():
            raise RuntimeError(
                f"{what}() of job {self.job_id}, not done, was called on its executor's "
                "manager thread (which runs done-callbacks): that thread resolves the "
                "executor's futures, so it would wait for ever; submit from the callback "
                "without waiting (add a done-callback to the new future), or wait in "
                "another thread"
            )

    # ------------------------------------------------------------------ controls

    def cancel(self) -> bool:
        """Cancel a job no node has started; returns False if it already started."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state == FINISHED:
                return False
            # Running too: a future seen running whose job went back to pending (a stopping
            # node handed back its task, never begun: node.daemon's _unstage) is cancelled
            # as any pending one; the cancel of a job that runs changes nothing
            ex = self._executor  # (held, for the calls below: it is weak once done)
        with _interrupts_held():  # (recorded cancelled, and its future marked, or neither)
            if not ex._cancel_jobs_told([self.job_id]) and not self._cancelled_by_another(ex):
                # a node has started it: running() is True once cancel() said so, as for
                # the stdlib's futures (the manager might learn it only later)
                self._mark_running()
                return False
            self._cancel_and_notify()
            return True

    def _cancelled_by_another(self, ex: KottaExecutor) -> bool:
        """Whether the job is recorded cancelled, and never ran: another thread's cancel
        (``shutdown(cancel_futures=True)``, say) recorded it just before this one looked,
        and is about to mark this future."""
        job = ex._enclave.jobs.get(self.job_id)
        return job is not None and job.state == JobState.CANCELLED and job.started is None

    def _cancel_and_notify(self) -> bool:
        """Move to CANCELLED_AND_NOTIFIED, as ``wait()`` expects, once the enclave recorded
        the job cancelled.  Two threads may get here for one future (``cancel()`` and
        ``shutdown(cancel_futures=True)``): only the one that finds it CANCELLED notifies,
        since notifying twice raises.  False if it is done instead.

        Running too: a future seen running whose job went back to pending (a stopping
        node handed back its task, never begun: node.daemon's _unstage) and was then
        cancelled.  Its executor has let it go; left running, its result() waited for ever."""
        if not Future.cancel(self):
            with self._condition:
                if self._state != RUNNING:
                    return False
                self._state = CANCELLED  # (as Future.cancel does, which refuses a running one)
                self._condition.notify_all()
            self._invoke_callbacks()
        with self._condition:
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()
        return True

    def _mark_running(self) -> None:
        """The enclave says a node started the job: ``running()`` is True from now on.
        Whoever learns it first may call this (the manager, or ``status()``); a future
        that is already cancelled or done stays as it is."""
        with self._condition:
            if self._state == PENDING:
                self.set_running_or_notify_cancel()

    def kill(self) -> bool:
        """Stop the job whether or not it is running.

        A job not yet started is cancelled; a running one is stopped (its whole process tree
        is killed) within about a second and the future raises :class:`TaskKilled`.
        Returns False if the job had already finished, or has run and is uploading its
        outputs (``staging_outputs``): it completes.
        """
        ex = self._executor  # (held, for the call below: it is weak once done)
        if ex is None or self.done():
            return False
        with _interrupts_held():  # (as in cancel(): a kill is done whole, or not begun)
            if self.cancel():
                return True
            if ex._cancel_jobs_told([self.job_id]):
                # seen running, and back in pending (a stopping node handed back its task,
                # never begun): cancelled, as a job no node has.  Flagged, it ran on the
                # next node, which looks for the kill requests of a first delivery only
                # once it runs
                self._cancel_and_notify()
                return True
            return ex._kill_job(self.job_id)

    def status(self) -> str:
        """The job's state in the enclave: pending, staging_inputs, processing,
        staging_outputs, completed, failed or cancelled."""
        ex = self._executor
        if ex is None:  # done, and its executor collected: the future knows how it ended
            return self._ended()
        return ex._job_status(self)

    def _ended(self) -> str:
        """The final state of the job of this future, which is done, as the future tells."""
        if self.cancelled() or isinstance(self.exception(), TaskKilled):
            return str(JobState.CANCELLED)
        return str(JobState.FAILED if self.exception() is not None else JobState.COMPLETED)

    def usage(self) -> dict[str, Any] | None:
        """Resources the job used, once it is done: ``start`` and ``end`` (epoch seconds),
        ``wall`` and ``cpu`` seconds, ``peak_rss_kb``, and for tasks that ran longer than
        1.5 times the node's sample interval, ``samples`` (``t``, ``cpu_pct``, ``rss_kb``,
        ``procs``) measured over the task's whole process tree."""
        return self._usage


class _MapJobView(KottaFuture):
    """What ``attach()`` gives for a job this executor runs for a ``map``: the job's values
    (its one call's value, or the list of its calls' values; the first failed call's
    exception), as ``attach()`` by any other client gives them, where the map's own future
    holds each call's outcome.  Cancelling it, or killing it, acts on the map's future."""

    def __init__(self, source: KottaFuture):
        super().__init__(source.job_id, source._executor)
        self._source = source
        source.add_done_callback(self._copy)

    def _copy(self, source: KottaFuture) -> None:
        if source.cancelled():
            self._cancel_and_notify()
            return
        exc = source.exception()
        if exc is not None:
            self.set_exception(exc)
            return
        self.stdout, self.stderr, self._usage = source.stdout, source.stderr, source._usage
        outcomes = source.result()
        failed = [value for ok, value in outcomes if not ok]
        if failed:
            self.set_exception(failed[0])
        elif len(outcomes) == 1:
            self.set_result(outcomes[0][1])
        else:
            self.set_result([value for _, value in outcomes])

    def cancel(self) -> bool:
        self._source.cancel()  # (its done-callback cancels this one)
        return self.cancelled()

    def kill(self) -> bool:
        # The map's future's kill: KottaFuture.kill of this one cancelled a job handed back
        # to pending after the map's future refused its cancel (it ran) with this future
        # marked, and the map's, taken out of the executor's by that cancel, pending for ever
        return self._source.kill()  # (its done-callback settles this one)

    def running(self) -> bool:
        # The manager marks the map's own future running, never this view (it is not one
        # of the executor's futures): without this it said False all through the run,
        # and after a cancel() refused because the task runs.
        return super().running() or (not self.done() and self._source.running())
