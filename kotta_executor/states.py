r"""The one place that decides job state transitions.

Backends never write a state on their own judgement: they ask :func:`sources` which
states a change may start from and make that a condition of the write (an SQL ``WHERE
state IN (...)`` or a DynamoDB ``ConditionExpression``), so that a task delivered twice can
never overwrite a finished result.

The forward path::

    pending -> staging_inputs -> processing -> staging_outputs -> completed
       │             (skipped without inputs)     (skipped without outputs)

and the table in full (``x`` = allowed; the staging states are skipped by jobs that have
no inputs or outputs)::

    from \ to        pending  staging_in  processing  staging_out  completed  failed  cancelled
    pending            .        x           x           .            .          x       x
    staging_inputs     x        x           x           .            .          x       x
    processing         x        x           x           x            x          x       x
    staging_outputs    .        x           x           x            x          x       x
    completed/failed/cancelled: final, nothing leaves them

* ``pending -> failed``: the node dead-letters a corrupt or too-often-delivered task.
* ``staging_inputs -> pending``: a stopping node hands back a task whose inputs it staged
  and never ran; it waits as a task no node has started (cancellable, its delivery not
  counted, nor its claim as an attempt), not as one begun that would be dead-lettered
  after a few node restarts.
* ``processing -> pending``: the same for a task a stopping node had piped to a worker
  that certainly never began it (it stopped as asked before it, never started up, or
  ended, or died, under a task before it).
* ``pending/... -> cancelled``: cancel (only from pending, see ``CANCELLABLE``) or kill.
* A move back to ``staging_inputs`` or ``processing`` from a later active state, or staying
  in the same staging/processing state, is a *redelivery*: the node that held the task
  died and another starts it again from the beginning.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import InvalidTransition


class JobState(StrEnum):
    PENDING = "pending"
    STAGING_INPUTS = "staging_inputs"
    PROCESSING = "processing"
    STAGING_OUTPUTS = "staging_outputs"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset(JobState) - FINAL

_REDELIVERABLE = frozenset({JobState.STAGING_INPUTS, JobState.PROCESSING})
_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: _REDELIVERABLE | {JobState.FAILED, JobState.CANCELLED},
    JobState.STAGING_INPUTS: _REDELIVERABLE | {JobState.PENDING, JobState.FAILED,
                                               JobState.CANCELLED},
    JobState.PROCESSING: _REDELIVERABLE | {JobState.PENDING, JobState.STAGING_OUTPUTS} | FINAL,
    JobState.STAGING_OUTPUTS: _REDELIVERABLE | {JobState.STAGING_OUTPUTS} | FINAL,
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Cancelling (as opposed to killing) only applies to work no node has started.
CANCELLABLE = frozenset({JobState.PENDING})
#: states in which a kill can still stop a job: in staging_outputs its task has run to its
#: end, and the node uploads its outputs and records it completed, kill or not
KILLABLE = ACTIVE - {JobState.STAGING_OUTPUTS}


def allowed(old: JobState | str, new: JobState | str) -> bool:
    return JobState(new) in _ALLOWED[JobState(old)]


def check(old: JobState | str, new: JobState | str) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is allowed."""
    if not allowed(old, new):
        raise InvalidTransition(f"a job cannot go from {JobState(old)} to {JobState(new)}")


def sources(new: JobState | str) -> frozenset[JobState]:
    """The states from which a job may move to ``new``: the condition of a write."""
    new = JobState(new)
    return frozenset(s for s, targets in _ALLOWED.items() if new in targets)
