"""Tasks whose arguments include futures: they wait for them, without a thread each.

A future among the direct arguments of a call (positional, or a keyword argument's value)
is a *dependency*: the task is sent only once every dependency succeeded, with each future
replaced by its result.  A dependency that fails or is cancelled fails the task with
:class:`~kotta_executor.errors.DependencyError`.

Waiting costs a done-callback per dependency.  Callbacks run in whatever thread completes
the dependency (a manager thread, a pool's thread, the caller's), so they only count and
hand the task to the executor's manager thread (:attr:`Dependencies.ready`), which pickles
and sends it, or fails it.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from .errors import DependencyError


class Waiting:
    """A task that waits for the futures among its arguments."""

    __slots__ = ("job_id", "future", "fn", "calls", "opts", "remaining", "failed")

    def __init__(self, future: Future, fn: Callable, calls: list, opts: Any, remaining: int):
        self.job_id: str = future.job_id
        self.future = future
        self.fn = fn
        self.calls = calls
        self.opts = opts
        self.remaining = remaining  # dependencies not yet succeeded
        self.failed: Future | None = None  # the first dependency that failed

    def forget(self) -> None:
        """Let go of the task once it is sent, failed or cancelled: the done-callbacks of
        its dependencies hold this object as long as those futures live (a future many
        tasks wait for is often kept), and its arguments may be big; so too the dependency
        that failed it (its result, its captured output)."""
        self.future = self.fn = self.calls = self.opts = self.failed = None


class Dependencies:
    """The waiting tasks of one executor.

    ``waiting``: job id -> :class:`Waiting`, until the task is sent, failed or cancelled;
    whoever :meth:`take` s it decides its fate (the executor does so under its send lock).
    ``ready``: tasks whose dependencies are all done, or one of which failed, for the
    manager thread; an entry whose task was already taken is skipped.
    """

    def __init__(self, wake: Callable[[], None]):
        self._wake = wake
        self._lock = threading.Lock()
        self.waiting: dict[str, Waiting] = {}
        self.ready: deque[Waiting] = deque()

    def add(self, future: Future, fn: Callable, calls: list, opts: Any, deps: list[Future]) -> None:
        """Make ``future``'s task wait for ``deps`` (callbacks of done ones run right away)."""
        w = Waiting(future, fn, calls, opts, len(deps))
        self.waiting[future.job_id] = w
        callback = functools.partial(self._dependency_done, w)
        for dep in deps:
            dep.add_done_callback(callback)

    def take(self, job_id: str) -> Waiting | None:
        return self.waiting.pop(job_id, None)

    def put_back(self, w: Waiting) -> None:
        """Undo a :meth:`take` whose decision failed.  If its dependencies are done (or one
        failed) it goes to ``ready`` again: the entry their callback put there may have
        been passed over meanwhile, as not waiting (a second entry is harmless: only one
        :meth:`take` gets it)."""
        with self._lock:
            self.waiting[w.job_id] = w
            due = w.remaining == 0 or w.failed is not None
        if due:
            self.ready.append(w)
            self._wake()

    def clear(self) -> None:
        for w in list(self.waiting.values()):
            w.forget()
        self.waiting.clear()
        self.ready.clear()

    def _dependency_done(self, w: Waiting, dep: Future) -> None:
        """Done-callback of a dependency: short and thread-safe; never raises."""
        ok = not dep.cancelled() and dep.exception() is None
        with self._lock:
            if w.future is None:
                return  # decided already (sent, failed or cancelled): nothing to keep
            if ok:
                w.remaining -= 1
                if w.remaining:
                    return
            elif w.failed is None:
                w.failed = dep
            else:
                return  # already failed by an earlier dependency
        self.ready.append(w)
        self._wake()


def find(calls: list[tuple[tuple, dict]]) -> list[Future]:
    """The distinct futures among the direct arguments of ``calls``."""
    found: dict[int, Future] = {}
    for args, kwargs in calls:
        for value in (*args, *kwargs.values()):
            if isinstance(value, Future):
                found.setdefault(id(value), value)
    return list(found.values())


def without_futures(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """``calls`` with each future among the direct arguments replaced by ``None``: what can
    be pickled before the futures are done."""

    def value(v: Any) -> Any:
        return None if isinstance(v, Future) else v

    return [
        (tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()})
        for args, kwargs in calls
    ]


def resolve(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """``calls`` with each future (done and successful) replaced by its result."""

    def value(v: Any) -> Any:
        return v.result() if isinstance(v, Future) else v

    return [
        (tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()})
        for args, kwargs in calls
    ]


def failure(job_id: str | None, dep: Future, *, call: str | None = None) -> DependencyError:
    """The error of task ``job_id`` whose dependency ``dep`` failed or was cancelled
    (``call``: what did not run, when it is no job: a decorated function's call in a
    task, which runs its body there)."""
    name = getattr(dep, "job_id", None)
    what = f"job {name}" if name else "a future"
    try:
        cause = dep.exception(timeout=0)
        message = f"its dependency ({what}) failed: {_described(cause)}"
    except CancelledError as exc:
        cause = exc
        message = f"its dependency ({what}) was cancelled"
    else:
        if _not_run(cause, name):
            # the dependency did not run either: name what failed at the head of the chain,
            # not the dependency's own message, which names its dependency's, and so on (a
            # chain of n tasks would make messages of n lines, n records of n^2 bytes)
            root, seen = cause, {id(cause)}
            while _not_run(root.__cause__, root.dependency) and id(root.__cause__) not in seen:
                root = root.__cause__  # (seen: a cycle, set by hand, must not hang us)
                seen.add(id(root))
            head = f"job {root.dependency}" if root.dependency else "a future"
            if isinstance(root.__cause__, CancelledError):
                why = "was cancelled"
            elif root.__cause__ is not None:
                why = f"failed: {_described(root.__cause__)}"
            else:  # (its cause was lost: its own message says what it knows)
                head, why = f"job {root.job_id}", f"did not run: {_text(root)}"
            message = f"its dependency ({what}) did not run, as {head} before it {why}"
    err = DependencyError(f"{call or f'job {job_id}'} did not run: {message}", job_id=job_id)
    err.dependency = name
    err.__cause__ = cause
    return err


def _not_run(exc: BaseException | None, name: str | None) -> bool:
    """Whether ``exc``, the exception of job ``name`` (None: a future), says it did not
    run as a dependency of its failed: the DependencyError made for it, of its own job
    id.  One a task raised (a decorated call in it given a failed future; its job id is
    another's, or None) is how that task, which ran, failed."""
    return isinstance(exc, DependencyError) and getattr(exc, "job_id", None) == name


def _described(exc: BaseException) -> str:
    """``Type: message`` of a dependency's exception."""
    return f"{type(exc).__name__}: {_text(exc)}"


def _text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder if its ``__str__`` raises: this runs on the manager
    thread, where an exception would leave the dependent waiting for ever."""
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - any, as wire.summary: the task must fail
        return "(its message could not be read: its __str__ raised)"
