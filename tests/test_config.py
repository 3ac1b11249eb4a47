"""Settings a user passes in: queue names, walltimes, and KottaExecutor's argument checks."""

from __future__ import annotations

import datetime as dt
import math
import threading
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import KottaExecutor, config
from kotta_executor.errors import ConfigurationError

FAST = settings(
    max_examples=200,
    deadline=None,
    # the autouse $KOTTA_HOME fixture is function scoped; these tests never touch it
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

ACCEPTED_WORDS = {"test": "test", "production": "production", "prod": "production"}


def _case_variants(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(word, upper, strict=True))
    )


# --------------------------------------------------------------------------- queues


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("test", "test"),
        ("Test", "test"),
        ("TEST", "test"),
        ("production", "production"),
        ("Production", "production"),
        ("PRODUCTION", "production"),
        ("prod", "production"),
        ("Prod", "production"),
        ("PROD", "production"),
    ],
)
def test_normalize_queue_accepts_known_names(given_name: str, expected: str) -> None:
    assert config.normalize_queue(given_name) == expected


@FAST
@given(
    st.sampled_from(sorted(ACCEPTED_WORDS)).flatmap(
        lambda w: st.tuples(st.just(w), _case_variants(w))
    )
)
def test_normalize_queue_is_case_insensitive(pair: tuple[str, str]) -> None:
    word, spelled = pair
    assert config.normalize_queue(spelled) == ACCEPTED_WORDS[word]


def test_normalized_names_are_the_valid_queues() -> None:
    assert set(ACCEPTED_WORDS.values()) == set(config.QUEUES)
    for queue in config.QUEUES:
        assert config.normalize_queue(queue) == queue


def _assert_lists_valid_queues(exc: ConfigurationError) -> None:
    message = str(exc)
    for queue in config.QUEUES:
        assert queue in message
    assert "valid queues" in message


@pytest.mark.parametrize(
    "bad", ["", "bogus", "tests", "testing", "product", "pro", "p", "staging", "prod uction"]
)
def test_normalize_queue_rejects_other_names(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        config.normalize_queue(bad)
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value)
    _assert_lists_valid_queues(info.value)


@pytest.mark.parametrize("bad", [None, 1, 0, b"test", ["test"], True])
def test_normalize_queue_rejects_non_strings(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        config.normalize_queue(bad)  # type: ignore[arg-type]
    _assert_lists_valid_queues(info.value)


# normalize_queue strips surrounding whitespace before comparing, so " test " is accepted;
# the property below leaves those spellings out.
@FAST
@given(st.text(max_size=20).filter(lambda s: s.strip().lower() not in ACCEPTED_WORDS))
def test_normalize_queue_rejects_arbitrary_text(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        config.normalize_queue(bad)
    _assert_lists_valid_queues(info.value)


# --------------------------------------------------------------------------- walltimes


@pytest.mark.parametrize(
    ("minutes", "seconds"), [(1, 60.0), (5, 300.0), (0.5, 30.0), (1.5, 90.0), (1440, 86400.0)]
)
def test_walltime_numbers_are_minutes(minutes: float, seconds: float) -> None:
    got = config.walltime_seconds(minutes)
    assert got == seconds
    assert isinstance(got, float)


@FAST
@given(st.integers(min_value=1, max_value=10**12))
def test_walltime_positive_ints_are_minutes(minutes: int) -> None:
    assert config.walltime_seconds(minutes) == float(minutes) * 60.0


@FAST
@given(st.floats(min_value=0.0, exclude_min=True, max_value=1e300, allow_nan=False))
def test_walltime_positive_floats_are_minutes(minutes: float) -> None:
    assert config.walltime_seconds(minutes) == minutes * 60.0


@FAST
@given(st.timedeltas(min_value=dt.timedelta(microseconds=1)))
def test_walltime_positive_timedeltas_are_taken_as_is(walltime: dt.timedelta) -> None:
    assert config.walltime_seconds(walltime) == walltime.total_seconds()


def test_walltime_timedelta_examples() -> None:
    assert config.walltime_seconds(dt.timedelta(minutes=2)) == 120.0
    assert config.walltime_seconds(dt.timedelta(hours=1, seconds=1)) == 3601.0


def test_walltime_takes_numpy_numbers_and_fractions() -> None:
    """A walltime computed with numpy (``np.int64``, ``np.float32``: not int or float
    subclasses) was refused as not a number; max_workers takes numpy's ints."""
    import fractions

    np = pytest.importorskip("numpy")
    assert config.walltime_seconds(np.int64(2)) == 120.0
    assert config.walltime_seconds(np.uint8(3)) == 180.0
    assert config.walltime_seconds(np.float32(0.5)) == 30.0
    assert config.walltime_seconds(fractions.Fraction(1, 2)) == 30.0
    assert isinstance(config.walltime_seconds(np.int64(2)), float)
    with pytest.raises(ConfigurationError, match="positive and finite"):
        config.walltime_seconds(np.int64(-1))
    with pytest.raises(ConfigurationError, match="number of minutes"):
        config.walltime_seconds(np.bool_(True))


@pytest.mark.parametrize(
    "bad",
    [
        0,
        0.0,
        -0.0,
        -1,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        1e308,  # finite minutes, but infinitely many seconds
        dt.timedelta(0),
        dt.timedelta(seconds=-1),
    ],
    ids=repr,
)
def test_walltime_rejects_non_positive_or_non_finite(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="positive and finite"):
        config.walltime_seconds(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, False, "5", "5m", None, b"5", [5], 5j], ids=repr)
def test_walltime_rejects_other_types(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="number of minutes or a datetime.timedelta"):
        config.walltime_seconds(bad)  # type: ignore[arg-type]


@FAST
@given(st.floats(max_value=0.0) | st.integers(max_value=0))
def test_walltime_rejects_any_non_positive_number(bad: float) -> None:
    with pytest.raises(ConfigurationError):
        config.walltime_seconds(bad)


def test_walltime_rejects_an_int_too_large_for_a_float() -> None:
    """float(10**400) raises OverflowError; that used to escape instead of ConfigurationError."""
    with pytest.raises(ConfigurationError, match="positive and finite"):
        config.walltime_seconds(10**400)


@pytest.mark.parametrize("walltime", [60.0000001, dt.timedelta(hours=1, microseconds=1)],
                         ids=repr)
def test_a_walltime_just_over_the_cap_is_not_named_as_the_cap_itself(walltime) -> None:
    """Refused at submit with "a walltime of 60 min is over the cap of the test queue
    (60 min)": six digits rounded the walltime to the cap it was said to exceed."""
    with pytest.raises(ConfigurationError) as info:
        config.check_walltime("test", config.walltime_seconds(walltime))
    message = str(info.value)
    assert "(60 min)" in message
    assert "a walltime of 60 min" not in message
    assert f"a walltime of {config.walltime_seconds(walltime) / 60!r} min" in message


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


# --------------------------------------------------------------------------- KottaExecutor


@pytest.mark.parametrize("max_workers", [0, -1, -100])
def test_executor_rejects_non_positive_max_workers(enclave_dir: Path, max_workers: int) -> None:
    with pytest.raises(ValueError) as info:
        KottaExecutor(max_workers=max_workers, enclave=enclave_dir)
    assert str(info.value) == "max_workers must be greater than 0"


def test_executor_rejects_unknown_queue(enclave_dir: Path) -> None:
    with pytest.raises(ValueError) as info:
        KottaExecutor(queue="bogus", enclave=enclave_dir)
    assert isinstance(info.value, ConfigurationError)
    assert "'bogus'" in str(info.value)
    _assert_lists_valid_queues(info.value)


@pytest.mark.parametrize("walltime", [0, -5, math.nan, dt.timedelta(0), "5"], ids=repr)
def test_executor_rejects_bad_walltime(enclave_dir: Path, walltime: object) -> None:
    with pytest.raises(ConfigurationError, match="walltime"):
        KottaExecutor(walltime=walltime, enclave=enclave_dir)  # type: ignore[arg-type]


def test_executor_construction_starts_nothing_until_submit(enclave_dir: Path) -> None:
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    threads_before = set(threading.enumerate())

    ex = KottaExecutor(2, queue="Prod", walltime=dt.timedelta(minutes=2), enclave=enclave_dir)
    try:
        assert {p.pid for p in me.children(recursive=True)} == children_before
        assert set(threading.enumerate()) == threads_before
        with pytest.raises(ValueError, match="walltime"):
            ex.with_options(walltime=0)
        with pytest.raises(ValueError, match="valid queues"):
            ex.with_options(queue="nope")
    finally:
        ex.shutdown()

    assert {p.pid for p in me.children(recursive=True)} == children_before
    assert set(threading.enumerate()) == threads_before
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(print)


def test_executor_accepts_queue_aliases_and_timedelta(enclave_dir: Path) -> None:
    ex = KottaExecutor(1, queue="PROD", walltime=1.5, enclave=enclave_dir)
    try:
        assert ex._options.queue == "production"
        assert ex._options.walltime == 90.0
    finally:
        ex.shutdown()


@pytest.mark.parametrize("start_node", ["no", "false", "Never", "always", "yes", "", 2, 0.5],
                         ids=repr)
def test_executor_rejects_a_start_node_it_does_not_know(enclave_dir: Path, start_node) -> None:
    """Any start_node but "auto", False, "never" and None was taken as True: "no", "false"
    (read from a setting) or "Never" started a local node, on a remote enclave too, the
    opposite of what was asked.  Now it is refused, naming the value, as connect() does."""
    from kotta_executor import connect

    with pytest.raises(ConfigurationError) as info:
        KottaExecutor(start_node=start_node, enclave=enclave_dir)
    assert "start_node" in str(info.value) and repr(start_node) in str(info.value)
    with pytest.raises(ConfigurationError, match="start_node"):
        connect(enclave_dir, start_node=start_node)


@pytest.mark.parametrize("what, value, named", [
    ("enclave", 5, "an enclave is a directory"), ("enclave", b"x", "an enclave is"),
    ("credentials", 5, "credentials must be"), ("credentials", ["t"], "credentials must be"),
], ids=repr)
def test_an_enclave_or_credentials_of_the_wrong_type_is_refused_naming_it(
        what: str, value, named: str) -> None:
    """``KottaExecutor(enclave=5)`` or ``credentials=5`` raised Python's own "expected str,
    bytes or os.PathLike object, not int", which names neither the parameter nor what it
    takes."""
    with pytest.raises(TypeError, match=named) as info:
        KottaExecutor(start_node=False, **{what: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("start_node", ["auto", True, False, "never", None, 1, 0], ids=repr)
def test_executor_takes_the_start_nodes_it_knows(enclave_dir: Path, start_node) -> None:
    KottaExecutor(start_node=start_node, enclave=enclave_dir).shutdown()
