"""The cache of pickled functions (wire.PickledFunctions): reused bytes are always the bytes
cloudpickle would write now, so that no change a user makes between two submits is lost."""

from __future__ import annotations

import pickle
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotta_executor import wire
from kotta_executor.wire import PickledFunctions


def notebook(source: str) -> dict:
    """Run ``source`` as a notebook cell would: its functions are ``__main__``'s, which
    cloudpickle sends by value."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)  # noqa: S102 - test input
    return namespace


def run_remote(data: bytes, *args):
    """What a worker gets: the function unpickled from the bytes, called."""
    return pickle.loads(data)(*args)


def test_unchanged_function_reuses_its_bytes():
    cache = PickledFunctions()
    ns = notebook("SCALE = 3\ndef f(x):\n    return x * SCALE\n")
    first = cache.dumps(ns["f"])
    second = cache.dumps(ns["f"])  # pickled again, to confirm the first (see the next tests)
    assert second == first == wire.cloudpickle_dumps(ns["f"])
    assert cache.dumps(ns["f"]) is second  # from then on, reused


def test_rebinding_a_global_is_sent():
    cache = PickledFunctions()
    ns = notebook("SCALE = 3\ndef f(x):\n    return x * SCALE\n")
    assert run_remote(cache.dumps(ns["f"]), 2) == 6
    ns["SCALE"] = 10
    assert run_remote(cache.dumps(ns["f"]), 2) == 20
    del ns["SCALE"]
    with pytest.raises(NameError):
        run_remote(cache.dumps(ns["f"]), 2)


def test_a_mutable_global_is_pickled_every_time():
    cache = PickledFunctions()
    ns = notebook("PARAMS = {'alpha': 1}\ndef f():\n    return PARAMS['alpha']\n")
    assert run_remote(cache.dumps(ns["f"])) == 1
    ns["PARAMS"]["alpha"] = 2  # the same dict, changed in place
    assert run_remote(cache.dumps(ns["f"])) == 2
    with pytest.raises(wire._Unknown):
        cache.fingerprint(ns["f"])


def test_closures_defaults_and_helpers_are_followed():
    cache = PickledFunctions()
    ns = notebook(
        "def helper(x):\n    return x + 1\n"
        "def make(k):\n    def g(x, y=1):\n        return helper(x) * k + y\n    return g\n"
    )
    g = ns["make"](2)
    assert run_remote(cache.dumps(g), 1) == 5
    g.__defaults__ = (100,)
    assert run_remote(cache.dumps(g), 1) == 104
    g.__closure__[0].cell_contents = 3  # k
    assert run_remote(cache.dumps(g), 1) == 106
    notebook_helper = notebook("def helper(x):\n    return x + 50\n")["helper"]
    ns["helper"] = notebook_helper  # redefined in a later cell
    assert run_remote(cache.dumps(g), 1) == 253


def test_signed_zero_and_instances():
    cache = PickledFunctions()
    ns = notebook("import math\nZ = 0.0\ndef f():\n    return math.copysign(1, Z)\n")
    assert run_remote(cache.dumps(ns["f"])) == 1
    ns["Z"] = -0.0  # equal to 0.0, but not the same float on the other side
    assert run_remote(cache.dumps(ns["f"])) == -1
    cls = notebook("class Box:\n    v = 1\n")["Box"]
    ns["Z"] = cls  # a class of __main__: pickled by value, and mutable
    with pytest.raises(wire._Unknown):
        cache.fingerprint(ns["f"])


def test_a_global_rebound_while_a_submit_pickles_is_not_cached_stale():
    """Another thread rebinds a global between the fingerprint and the pickle: those bytes
    must not be kept under the old fingerprint, to be sent once the global is set back."""
    cache = PickledFunctions()
    ns = notebook("MODE = 'safe'\ndef f():\n    return MODE\n")
    pickling = wire.cloudpickle_dumps.__code__  # (cloudpickle.dumps, with its own pickler)

    def another_thread(frame, event, arg):  # that interleaving, made deterministic
        if event == "call" and frame.f_code is pickling:
            ns["MODE"] = "dangerous"

    sys.setprofile(another_thread)
    try:
        assert run_remote(cache.dumps(ns["f"])) == "dangerous"
    finally:
        sys.setprofile(None)
    ns["MODE"] = "safe"
    assert run_remote(cache.dumps(ns["f"])) == "safe"


def test_a_global_changed_and_restored_while_a_submit_pickles_is_not_sent_later():
    """A -> B -> A while one submit pickles: that submit sends B (what it saw), but the
    bytes of B must never be reused while the global is A."""
    cache = PickledFunctions()
    ns = notebook("MODE = 'safe'\ndef f():\n    return MODE\n")
    pickling = wire.cloudpickle_dumps.__code__  # (cloudpickle.dumps, with its own pickler)

    def another_thread(frame, event, arg):
        if frame.f_code is pickling:
            ns["MODE"] = "dangerous" if event == "call" else "safe" if event == "return" else ns["MODE"]

    sys.setprofile(another_thread)
    try:
        cache.dumps(ns["f"])
    finally:
        sys.setprofile(None)
    assert ns["MODE"] == "safe"
    for _ in range(3):  # later submits, with nothing changing: MODE as it is
        assert run_remote(cache.dumps(ns["f"])) == "safe"


def test_the_sign_of_a_nan_global_is_sent():
    cache = PickledFunctions()
    ns = notebook("import math\nZ = float('nan')\ndef f():\n    return math.copysign(1, Z)\n")
    assert run_remote(cache.dumps(ns["f"])) == 1
    ns["Z"] = -float("nan")  # repr() says 'nan' for both
    assert run_remote(cache.dumps(ns["f"])) == -1


def test_importable_functions_and_other_callables():
    cache = PickledFunctions()
    assert cache.fingerprint(wire.summary) == ("ref", wire.summary)
    assert pickle.loads(cache.dumps(wire.summary)) is wire.summary
    for fn in (print, len.__call__, (lambda: 1).__call__):
        with pytest.raises(wire._Unknown):
            cache.fingerprint(fn)
        assert cache.dumps(fn) == wire.cloudpickle_dumps(fn)


def test_the_cache_is_bounded():
    cache = PickledFunctions(size=4)
    fns = [notebook(f"def f():\n    return {i}\n")["f"] for i in range(10)]
    for i, fn in enumerate(fns):
        assert run_remote(cache.dumps(fn)) == i
    assert len(cache._entries) == 4


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
    st.binary(max_size=5), st.complex_numbers(allow_nan=False),
)
_values = st.one_of(
    _scalars, st.tuples(_scalars, _scalars), st.lists(_scalars, max_size=3),
    st.frozensets(st.integers(), max_size=3),
)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("global"), st.sampled_from(["A", "B"]), _values),
        st.tuples(st.just("unset"), st.sampled_from(["A", "B"]), st.none()),
        st.tuples(st.just("default"), st.just("y"), _values),
        st.tuples(st.just("cell"), st.just("k"), _values),
        st.tuples(st.just("annotate"), st.just("x"), _values),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_cached_bytes_are_what_cloudpickle_writes_now(ops):
    cache = PickledFunctions()
    ns = notebook(
        "A = 1\nB = (2, 'b')\n"
        "def make(k):\n    def f(x, y=0):\n        return (A, B, k, x, y)\n    return f\n"
    )
    f = ns["make"](0)
    for kind, name, value in ops:
        if kind == "global":
            ns[name] = value
        elif kind == "unset":
            ns.pop(name, None)
        elif kind == "default":
            f.__defaults__ = (value,)
        elif kind == "cell":
            f.__closure__[0].cell_contents = value
        else:
            f.__annotations__[name] = value
        assert cache.dumps(f) == wire.cloudpickle_dumps(f)
