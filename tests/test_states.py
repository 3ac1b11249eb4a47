"""The job state machine (kotta_executor.states) against the table in its docstring."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import states
from kotta_executor.errors import InvalidTransition, KottaError
from kotta_executor.states import JobState

FAST = settings(
    max_examples=200,
    deadline=None,
    # the autouse $KOTTA_HOME fixture is function scoped; these tests never touch it
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

P = JobState.PENDING
SI = JobState.STAGING_INPUTS
PR = JobState.PROCESSING
SO = JobState.STAGING_OUTPUTS
C = JobState.COMPLETED
F = JobState.FAILED
X = JobState.CANCELLED

# The table in the module docstring, copied by hand (x = allowed):
#
#   from \ to        pending  staging_in  processing  staging_out  completed  failed  cancelled
#   pending            .        x           x           .            .          x       x
#   staging_inputs     x        x           x           .            .          x       x
#   processing         x        x           x           x            x          x       x
#   staging_outputs    .        x           x           x            x          x       x
#   completed/failed/cancelled: final, nothing leaves them
EXPECTED: dict[JobState, frozenset[JobState]] = {
    P: frozenset({SI, PR, F, X}),
    SI: frozenset({P, SI, PR, F, X}),
    PR: frozenset({P, SI, PR, SO, C, F, X}),
    SO: frozenset({SI, PR, SO, C, F, X}),
    C: frozenset(),
    F: frozenset(),
    X: frozenset(),
}

ALL_PAIRS = [
    pytest.param(old, new, id=f"{old}->{new}") for old, new in itertools.product(JobState, JobState)
]


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS)
def test_allowed_matches_the_docstring_table(old: JobState, new: JobState) -> None:
    assert states.allowed(old, new) is (new in EXPECTED[old])


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS)
def test_check_agrees_with_the_table(old: JobState, new: JobState) -> None:
    if new in EXPECTED[old]:
        assert states.check(old, new) is None
    else:
        with pytest.raises(InvalidTransition) as info:
            states.check(old, new)
        assert str(info.value) == f"a job cannot go from {old} to {new}"


def test_expected_table_covers_every_state() -> None:
    assert set(EXPECTED) == set(JobState)


def _docstring_table() -> dict[JobState, frozenset[JobState]]:
    """The x/. grid of the module docstring, parsed."""
    lines = (states.__doc__ or "").splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("from \\ to"))
    table: dict[JobState, frozenset[JobState]] = {}
    for line in lines[head + 1 :]:
        words = line.split()
        if not words or words[0] not in {s.value for s in JobState}:
            break
        marks = words[1:]
        assert len(marks) == len(JobState), line
        assert set(marks) <= {"x", "."}, line
        table[JobState(words[0])] = frozenset(
            new for new, mark in zip(JobState, marks, strict=True) if mark == "x"
        )
    return table


def test_the_hand_copied_table_is_the_docstring_table() -> None:
    """If the docstring's table changes, EXPECTED above must be reviewed by hand."""
    assert _docstring_table() == {s: t for s, t in EXPECTED.items() if s in states.ACTIVE}
    assert "completed/failed/cancelled: final, nothing leaves them" in (states.__doc__ or "")


@pytest.mark.parametrize("final", sorted(states.FINAL))
@pytest.mark.parametrize("new", list(JobState))
def test_final_states_have_no_way_out(final: JobState, new: JobState) -> None:
    assert final.final
    assert not states.allowed(final, new)
    with pytest.raises(InvalidTransition):
        states.check(final, new)


def test_final_and_active_partition_the_states() -> None:
    assert states.FINAL == {C, F, X}
    assert states.FINAL | states.ACTIVE == set(JobState)
    assert not states.FINAL & states.ACTIVE
    assert all(not s.final for s in states.ACTIVE)


@pytest.mark.parametrize("old", sorted(states.ACTIVE))
def test_any_active_state_can_be_cancelled_or_failed(old: JobState) -> None:
    states.check(old, X)
    states.check(old, F)


@pytest.mark.parametrize(
    ("old", "new"), [(PR, PR), (SI, SI), (SO, SO), (PR, SI), (SO, SI), (SO, PR)]
)
def test_redelivery_may_restart_a_started_job(old: JobState, new: JobState) -> None:
    """The docstring: another node starts a redelivered task again from the beginning."""
    states.check(old, new)


def test_nothing_completes_without_processing() -> None:
    assert states.sources(C) == {PR, SO}
    assert states.sources(SO) == {PR, SO}


def test_only_a_job_a_node_staged_or_piped_and_never_began_goes_back_to_pending() -> None:
    """A stopping node hands back a task it staged, or piped to a worker that never began
    it: pending again.  Nothing goes back to pending once it has run."""
    assert states.sources(P) == {SI, PR}


def test_only_pending_jobs_are_cancellable() -> None:
    assert states.CANCELLABLE == {P}
    assert all(states.allowed(s, X) for s in states.CANCELLABLE)


@FAST
@given(st.sampled_from(list(JobState)), st.sampled_from(list(JobState)))
def test_check_agrees_with_allowed_and_names_both_states(old: JobState, new: JobState) -> None:
    if states.allowed(old, new):
        assert states.check(old, new) is None
    else:
        with pytest.raises(InvalidTransition) as info:
            states.check(old, new)
        message = str(info.value)
        assert str(old) in message
        assert str(new) in message
        assert message.index(str(old)) < message.rindex(str(new))


@FAST
@given(st.sampled_from(list(JobState)), st.sampled_from(list(JobState)))
def test_string_names_work_like_enum_members(old: JobState, new: JobState) -> None:
    assert states.allowed(str(old), str(new)) is states.allowed(old, new)
    assert states.sources(str(new)) == states.sources(new)


@FAST
@given(st.sampled_from(list(JobState)))
def test_sources_is_exactly_the_states_that_allow_new(new: JobState) -> None:
    got = states.sources(new)
    assert isinstance(got, frozenset)
    assert got == {old for old in JobState if states.allowed(old, new)}
    assert got == {old for old, targets in EXPECTED.items() if new in targets}


def test_invalid_transition_is_a_kotta_error() -> None:
    assert issubclass(InvalidTransition, KottaError)


@pytest.mark.parametrize("bad", ["running", "PENDING", "", "done"])
def test_unknown_state_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        states.allowed(bad, "processing")
    with pytest.raises(ValueError):
        states.allowed("pending", bad)
    with pytest.raises(ValueError):
        states.sources(bad)
