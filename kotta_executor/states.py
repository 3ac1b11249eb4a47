"""The one place that decides job state transitions.

Backends never write a state on their own judgement: they ask :func:`sources` which
states a change may start from and make that a condition of the write (an SQL ``WHERE
state IN (...)`` or a DynamoDB ``ConditionExpression``), so that a task delivered twice can
never overwrite a finished result.

::

    pending ─┬─> staging_inputs ─> processing ─> staging_outputs ─┬─> completed
             │                        ^   │                         │
             └────────────────────────┘   └─────────────────────────┼─> failed
       (any state that is not final) ───────────────────────────────┴─> cancelled

``processing -> processing`` is allowed: it is a redelivery after a node died.
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

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.STAGING_INPUTS, JobState.PROCESSING} | FINAL
    ),
    JobState.STAGING_INPUTS: frozenset(
        {JobState.STAGING_INPUTS, JobState.PROCESSING} | FINAL
    ),
    JobState.PROCESSING: frozenset(
        {JobState.STAGING_INPUTS, JobState.PROCESSING, JobState.STAGING_OUTPUTS} | FINAL
    ),
    JobState.STAGING_OUTPUTS: frozenset(
        {JobState.STAGING_INPUTS, JobState.PROCESSING, JobState.STAGING_OUTPUTS} | FINAL
    ),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Cancelling (as opposed to killing) only applies to work no node has started.
CANCELLABLE = frozenset({JobState.PENDING})


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
