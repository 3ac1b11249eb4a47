"""KottaExecutor against what CPython's own executor tests check of ProcessPoolExecutor
(Lib/test/test_concurrent_futures, 3.11's file and 3.12+'s package), for what
tests/test_stdlib_conformance.py does not already cover.

Real components only: the executor starts its own node on a fresh embedded enclave.
Each test names the CPython test it follows.
"""

from __future__ import annotations

import pytest

from tests import tasks
from tests.conftest import GUARD


@pytest.mark.parametrize("kind, error", [("bool", tasks.FalseyBoolError),
                                         ("len", tasks.FalseyLenError)])
def test_an_exception_that_is_false_is_raised_by_result(make_executor, kind, error):
    # ExecutorTest.test_swallows_falsey_exceptions (gh-132063): result() on Python 3.11
    # tested ``if self._exception:``, so such an exception was lost and result() gave None
    ex = make_executor(1)
    with pytest.raises(error, match="falsey"):
        ex.submit(tasks.raise_falsey, kind, "falsey").result(GUARD)
    future = ex.submit(tasks.raise_falsey, kind, "falsey too")
    assert isinstance(future.exception(GUARD), error)
    with pytest.raises(error, match="falsey too"):
        future.result(0)
    with pytest.raises(error, match="in map"):
        list(ex.map(tasks.raise_falsey, [kind], ["in map"]))
