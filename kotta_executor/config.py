"""Settings a user passes in: where the enclave lives, queue names, walltimes."""

from __future__ import annotations

import datetime as _dt
import getpass
import math
import os
from pathlib import Path

from .errors import ConfigurationError

QUEUES = ("test", "production")
_QUEUE_ALIASES = {"test": "test", "production": "production", "prod": "production"}


def kotta_home() -> Path:
    """``$KOTTA_HOME``, or ``~/.kotta``."""
    return Path(os.environ.get("KOTTA_HOME") or Path.home() / ".kotta").expanduser()


def normalize_queue(queue: str) -> str:
    """``test`` or ``production``; case-insensitive, the original ``Test``/``Prod`` accepted."""
    if isinstance(queue, str):
        name = _QUEUE_ALIASES.get(queue.strip().lower())
        if name:
            return name
    raise ConfigurationError(
        f"unknown queue {queue!r}: valid queues are {', '.join(QUEUES)} "
        "(case-insensitive; 'prod' means production)"
    )


def walltime_seconds(walltime: float | int | _dt.timedelta) -> float:
    """A walltime in minutes (or a timedelta), as seconds.  Must be positive and finite."""
    if isinstance(walltime, _dt.timedelta):
        seconds = walltime.total_seconds()
    elif isinstance(walltime, (int, float)) and not isinstance(walltime, bool):
        try:
            seconds = float(walltime) * 60.0
        except OverflowError:
            seconds = math.inf
    else:
        raise ConfigurationError(
            f"walltime must be a number of minutes or a datetime.timedelta, not {walltime!r}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"walltime must be positive and finite, not {walltime!r}")
    return seconds


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return f"uid{os.getuid()}"
