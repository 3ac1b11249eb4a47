"""Every exception kotta-executor raises of its own, in one place.

Where a caller would expect a stdlib type we subclass it, so ``except TimeoutError``
catches a walltime, ``except BrokenExecutor`` an unusable enclave, and ``except
BrokenProcessPool`` (``ProcessPoolExecutor``'s, when a worker process dies) a worker that died
under its task.
Exceptions raised by *user code* on a node are not wrapped: they come back as themselves
(see :mod:`kotta_executor.wire`); these classes are for what the enclave itself reports.
"""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool


class KottaError(Exception):
    """Base class of the errors kotta-executor raises itself."""


class ConfigurationError(KottaError, ValueError):
    """A setting (queue, walltime, enclave, max_workers) is not valid."""


class SerializationError(KottaError, pickle.PicklingError):
    """A call, its arguments or its result could not be pickled.

    Raised by ``submit`` (nothing is sent) or set on the future when the *result* of a
    task could not be pickled on the node.
    """


class PythonVersionMismatch(SerializationError):
    """A task or result holds code pickled by value (a function or class defined in a
    notebook or ``__main__``, a lambda, a closure) by another Python version than the one
    that was to unpickle it: cloudpickle's code objects load only in the version that made
    them (elsewhere they fail, crash the interpreter or run wrongly), so it is refused
    unread.  ``pickled_by`` and ``running`` are the two versions (``"3.12"``)."""

    pickled_by: str = ""
    running: str = ""


class RemoteError(KottaError):
    """An exception raised on a node that could not itself be sent back.

    Carries what could be salvaged: the remote type name, its message and the formatted
    remote traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        args = (self.type_name, self.message, self.remote_traceback)
        notes = self.__dict__.get("__notes__")  # the remote exception's, which travel too
        return (type(self), args) if notes is None else (type(self), args, {"__notes__": notes})


class JobFailed(KottaError):
    """A task ended without running to a result, for a reason the enclave names."""

    def __init__(self, message: str, *, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class WalltimeExceeded(JobFailed, TimeoutError):
    """The task ran longer than its walltime; its whole process tree was killed."""


class MemoryLimitExceeded(JobFailed, MemoryError):
    """The task's process tree used more memory (RSS) than its node allows; the whole tree
    was killed.  The node goes on, with a fresh worker."""

    # MemoryError's own __new__ (a free list) refuses subclasses when unpickling (_rebuild)
    __new__ = Exception.__new__


class WorkerDied(JobFailed, BrokenProcessPool):
    """The worker process running the task died (crash, ``os._exit``, killed for memory).
    A ``BrokenProcessPool``, as ``ProcessPoolExecutor`` raises then, for code written for
    it; but nothing else breaks: the node replaces the worker, and other tasks go on.

    ``exitcode`` is the process exit status, ``signal`` the number of the signal that
    killed it (or ``None``).
    """

    exitcode: int | None = None
    signal: int | None = None


class TaskKilled(JobFailed, CancelledError):
    """The task was stopped while running, by ``future.kill()`` or ``kotta cancel``."""


class DeliveryFailed(JobFailed):
    """The task was delivered too many times without completing and was dead-lettered."""


class CorruptTask(JobFailed):
    """The message on the queue was not a valid task envelope; it was dead-lettered."""


class DependencyError(JobFailed):
    """A future passed as an argument failed or was cancelled, so the task never ran.

    ``__cause__`` is the dependency's exception (a ``CancelledError`` if it was cancelled);
    ``dependency`` is the failed dependency's job id, when it was a Kotta job.
    """

    dependency: str | None = None


class RequirementsError(JobFailed):
    """The node could not install the task's ``requirements``; the task never ran.

    The message ends with the tail of pip's output.
    """


class ScriptFailed(JobFailed):
    """A script job's executable exited with a non-zero status (``exit_code``; minus the
    signal number if a signal ended it).  The job is recorded ``failed`` with the reason
    ``exit code N``; :meth:`KottaJob.wait` returns the code instead of raising this."""

    def __init__(self, exit_code: int, *, job_id: str | None = None):
        super().__init__(f"exit code {exit_code}", job_id=job_id)
        self.exit_code = exit_code


class EnvelopeError(KottaError, ValueError):
    """Bytes that are not a valid kotta envelope (wrong magic, version, or layout)."""


class InvalidTransition(KottaError):
    """A job state change that the state machine does not allow."""


class UnknownJob(KottaError, LookupError):
    """No job with that id exists in the enclave."""


class BrokenEnclave(KottaError, BrokenExecutor):
    """The executor cannot reach a usable enclave any more; every pending future fails."""


class AccessDenied(KottaError, PermissionError):
    """The caller may not do this (another user's job, a dataset without a grant)."""


class AuthenticationError(AccessDenied):
    """Who is asking could not be established: no token, a token file others can read, an
    expired or revoked token, or a task whose signature does not verify."""


class TaskRejected(JobFailed, PermissionError):
    """The node refused the task before it ran: its signature, token or owner did not
    verify (a forged, tampered or replayed task), or the token had been revoked."""


class DataAccessDenied(JobFailed, PermissionError):
    """A task declared a dataset its owner may not read (``inputs``) or write
    (``outputs``); nothing ran and nothing was written.  The denial is audited."""


class StagingFailed(JobFailed):
    """Staging a task's inputs or outputs failed (a missing object, an output the task did
    not write, or one that escapes its working directory)."""


class EgressDenied(JobFailed, PermissionError):
    """The task read a dataset whose policy forbids its data leaving the enclave (or caps
    the bytes), and its result or output was over the limit.  The result stays inside
    the enclave: ``handle`` names where (``s3://kotta-held/JOB`` on the embedded enclave,
    ``s3://BUCKET/held/JOB`` on AWS), granted to no role: what a reviewer does with it is an
    operations decision (docs/security.md, §7)."""

    handle: str | None = None


class InvalidDataUri(KottaError, ValueError):
    """A dataset URI or output name that is malformed or tries to leave its place
    (``..``, an absolute path, a symlink out of the working directory)."""


class AuditError(KottaError, RuntimeError):
    """The audit log cannot be appended to (its tail is not a record, or every attempt to
    write the next record lost), or a record to show is damaged."""
