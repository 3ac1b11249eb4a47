"""kotta-executor: notebook-style Python on the nodes of a secure data enclave.

>>> from kotta_executor import KottaExecutor
>>> with KottaExecutor(queue="test", walltime=5) as ex:        # walltime in minutes
...     totals = list(ex.map(count_citations, years))
"""

from .decorator import Connection, connect, kottajob
from .errors import (
    AccessDenied,
    BrokenEnclave,
    ConfigurationError,
    CorruptTask,
    DeliveryFailed,
    DependencyError,
    JobFailed,
    KottaError,
    MemoryLimitExceeded,
    RemoteError,
    RequirementsError,
    ScriptFailed,
    SerializationError,
    TaskKilled,
    UnknownJob,
    WalltimeExceeded,
    WorkerDied,
)
from .executor import KottaExecutor
from .future import KottaFuture
from .script import KottaJob
from .states import JobState

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "BrokenEnclave",
    "ConfigurationError",
    "Connection",
    "CorruptTask",
    "DeliveryFailed",
    "DependencyError",
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
    "SerializationError",
    "TaskKilled",
    "UnknownJob",
    "WalltimeExceeded",
    "WorkerDied",
    "connect",
    "kottajob",
]
