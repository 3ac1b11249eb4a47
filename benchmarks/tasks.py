"""The work the benchmarks send: module-level and importable (``benchmarks.tasks``)."""

from __future__ import annotations

import time
from typing import Any


def noop(x: Any = None) -> Any:
    return x


def busy(seconds: float) -> float:
    """Spin (not sleep) for ``seconds`` of wall time; return how long it spun."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass
    return time.perf_counter() - start


def sleeper(seconds: float) -> None:
    time.sleep(seconds)
