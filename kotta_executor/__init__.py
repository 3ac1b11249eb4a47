"""kotta-executor: notebook-style Python on the nodes of a secure data enclave.

>>> from kotta_executor import KottaExecutor
>>> with KottaExecutor(queue="test", walltime=5) as ex:        # walltime in minutes
...     totals = list(ex.map(count_citations, years))
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .errors import (
    AccessDenied,
    AuthenticationError,
    BrokenEnclave,
    ConfigurationError,
    CorruptTask,
    DataAccessDenied,
    DeliveryFailed,
    DependencyError,
    EgressDenied,
    EnvelopeError,
    InvalidDataUri,
    JobFailed,
    KottaError,
    MemoryLimitExceeded,
    PythonVersionMismatch,
    RemoteError,
    RequirementsError,
    ScriptFailed,
    SerializationError,
    StagingFailed,
    TaskKilled,
    TaskRejected,
    UnknownJob,
    WalltimeExceeded,
    WorkerDied,
)
from .states import JobState

if TYPE_CHECKING:
    from .decorator import Connection, connect, kottajob
    from .executor import KottaExecutor
    from .future import KottaFuture
    from .script import KottaJob

# The client's heavier modules load on first use, so that a process that needs only the
# wire format (a node's worker, started for every owner) does not import the executor.
_LAZY = {
    "Connection": ".decorator",
    "connect": ".decorator",
    "kottajob": ".decorator",
    "KottaExecutor": ".executor",
    "KottaFuture": ".future",
    "KottaJob": ".script",
}


if not TYPE_CHECKING:  # (to a type checker, the names are imported above)

    def __getattr__(name: str):
        module = _LAZY.get(name)
        if module is None:
            # a submodule (``kotta_executor.config`` after ``import kotta_executor``), as
            # when this package imported the executor, and with it most of them, at once
            if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
                return importlib.import_module(f"{__name__}.{name}")
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AuthenticationError",
    "BrokenEnclave",
    "ConfigurationError",
    "Connection",
    "CorruptTask",
    "DataAccessDenied",
    "DeliveryFailed",
    "DependencyError",
    "EgressDenied",
    "EnvelopeError",
    "InvalidDataUri",
    "JobFailed",
    "JobState",
    "KottaError",
    "KottaExecutor",
    "KottaFuture",
    "KottaJob",
    "MemoryLimitExceeded",
    "RemoteError",
    "RequirementsError",
    "ScriptFailed",
    "PythonVersionMismatch",
    "SerializationError",
    "StagingFailed",
    "TaskKilled",
    "TaskRejected",
    "UnknownJob",
    "WalltimeExceeded",
    "WorkerDied",
    "connect",
    "kottajob",
]
