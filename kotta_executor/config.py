"""Settings a user passes in: where the enclave lives, queue names, walltimes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import json
import math
import numbers
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import ConfigurationError

QUEUES = ("test", "production")
#: a script job's working directory (kotta_executor.script.run_script), in its worker's
#: temporary directory: this, then (script_dir_prefix) the worker's pid and PID namespace;
#: the node removes those of a worker once it has gone (node.staging.remove_script_dirs)
SCRIPT_DIR_PREFIX = "kotta-script-"


#: in a worker's environment: its node's temporary directory, where its script jobs' working
#: directories go (script_tmpdir)
SCRIPT_TMPDIR_ENV = "KOTTA_SCRIPT_TMPDIR"
#: deliveries of a task a node allows before it fails the job (`kotta node --max-deliveries`)
MAX_DELIVERIES = 5


def interpreter_flags() -> list[str]:
    """The options of this interpreter (``-X utf8``, ``-X dev``, ``-W``, ``-O``, ``-s``,
    ``-B``...) for the Python processes that run its tasks, a node and its workers, as
    multiprocessing gives them to the workers it spawns: a task of a client run with
    ``-X utf8`` opened files in the locale's encoding, and one run with ``-W error`` had
    its warnings ignored.  Less ``-E`` and ``-I``, which would drop PYTHONPATH, by which
    they find the client's modules (the executor leaves the PYTHON* variables out
    instead), and ``-P``, which their callers give themselves."""
    flags = [f for f in subprocess._args_from_interpreter_flags() if f not in ("-E", "-I", "-P")]
    if sys.flags.isolated:
        flags.append("-s")  # (-I's other part: no user site directory)
    return flags


def script_tmpdir() -> str:
    """Where a worker makes its script jobs' working directories: its node's temporary
    directory, where the node looks for them (node.staging.remove_script_dirs).  Not the
    worker's own: a task or an initializer that sets ``TMPDIR`` (to a scratch disk) moved
    them there, out of the node's sight, and one killed with its script stayed for good."""
    return os.environ.get(SCRIPT_TMPDIR_ENV) or tempfile.gettempdir()


def script_dir_prefix(pid: int) -> str:
    """How the working directories of the script jobs of the worker ``pid`` (of this
    process's PID namespace) are named.  With the namespace: nodes in containers of their
    own may share the temporary directory (as they share /tmp/kotta-UID for the inboxes),
    and a worker of another may have the same pid; by the pid alone, a node removing the
    directories of its worker killed with its script removed that one's live script's."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # (not Linux: no namespaces)
        ns = 0
    return f"{SCRIPT_DIR_PREFIX}{pid}-{ns}-"


_QUEUE_ALIASES = {"test": "test", "production": "production", "prod": "production"}


def task_owner() -> str | None:
    """The owner of the task this process runs in, or None outside tasks: a node's worker
    has ``KOTTA_OWNER`` (node/pool.py), and whatever a task starts inherits it."""
    return os.environ.get("KOTTA_OWNER") or None


def check_not_blank(name: str, value: str, instead: str) -> None:
    """Refuse a directory setting (``name``: ``$KOTTA_HOME``, ``$KOTTA_ENCLAVE``, an
    enclave) that is blank, or begins with a blank (one pasted with the path): taken as it
    is, it made an enclave in (a tree under) ./" ".  Or one that ends with a blank (pasted
    so, or read from a file with its newline): it made a new, empty enclave next to the one
    meant.  (No spelling of a directory whose name ends with a blank gets past this: made
    absolute, as nodes get it, "lab /" is "/.../lab " again.)  ``instead``: what to give.
    "" passes: it means the default."""
    if value and not value.strip():
        raise ConfigurationError(f"{name} is blank ({value!r}): {instead}")
    if value[:1].isspace():
        raise ConfigurationError(
            f"{name} {value!r} begins with a blank: did you mean {value.strip()!r}? "
            f"(a directory so named: ./{value})"
        )
    if value[-1:].isspace():
        raise ConfigurationError(
            f"{name} {value!r} ends with a blank: did you mean {value.rstrip()!r}?"
        )


def kotta_home() -> Path:
    """``$KOTTA_HOME``, or ``~/.kotta``.  A relative one (``KOTTA_HOME=.kotta``) is taken
    against the working directory where it is first read: a script that made its
    executor, then changed directory, read queues.json elsewhere than its enclave's
    directory, and so did its node (started in the new one).  (Nodes get it absolute.)"""
    value = os.environ.get("KOTTA_HOME") or ""
    home = _homes.get(value)
    if home is None:
        check_not_blank("$KOTTA_HOME", value, "set it to a directory, or unset it (or set "
                        "it empty) for ~/.kotta")
        try:
            home = Path(value or Path.home() / ".kotta").expanduser()
        except RuntimeError as exc:  # "~alcie/lab" (no such user), or no home to be found
            raise ConfigurationError(
                f"cannot use $KOTTA_HOME {value or '(unset: ~/.kotta)'}: {exc}") from exc
        try:
            home = _homes[value] = home.absolute()
        except FileNotFoundError:  # (a working directory since removed: taken as it is)
            pass
    return home


#: each $KOTTA_HOME seen, absolute (kotta_home)
_homes: dict[str, Path] = {}


@dataclasses.dataclass(frozen=True)
class QueueLimits:
    """What a queue accepts: the longest walltime (minutes), the memory one task's process
    tree may use (RSS, MB), and the workers a node of the queue runs at most."""

    max_walltime: float  # minutes
    memory_mb: int
    workers: int

    @property
    def max_walltime_seconds(self) -> float:
        return self.max_walltime * 60.0


#: built-in limits; ``$KOTTA_HOME/queues.json`` overrides them per enclave, and
#: ``kotta node --max-walltime/--memory-limit`` per node
QUEUE_LIMITS: dict[str, QueueLimits] = {
    "test": QueueLimits(max_walltime=60, memory_mb=4096, workers=64),
    "production": QueueLimits(max_walltime=24 * 60, memory_mb=32768, workers=256),
}

_LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(QueueLimits)}
_limits_cache: tuple[tuple, dict[str, QueueLimits]] | None = None
#: how long submit trusts the limits it last read before looking at queues.json again
LIMITS_RECHECK = 1.0
_checked: tuple[float, str | None, dict[str, QueueLimits]] = (-LIMITS_RECHECK, None, {})


def queues_file() -> Path:
    return kotta_home() / "queues.json"


def queue_limits(queue: str) -> QueueLimits:
    """The limits of ``queue``: :data:`QUEUE_LIMITS`, overridden by ``$KOTTA_HOME/queues.json``
    (``{"test": {"max_walltime": 120, "memory_mb": 2048, "workers": 4}}``; any subset)."""
    return _all_limits()[normalize_queue(queue)]


_queues_paths: dict[str | None, str] = {}


def _all_limits() -> dict[str, QueueLimits]:
    """The limits of every queue; the file is read again only when it changed (one stat per
    call: this runs at every submit)."""
    global _limits_cache
    home = os.environ.get("KOTTA_HOME")
    path = _queues_paths.get(home)
    if path is None:
        path = _queues_paths[home] = str(queues_file())
    try:
        st = os.stat(path)
        key: tuple = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    except FileNotFoundError:
        key = (path,)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the queue limits in {path}: {exc}") from exc
    cached = _limits_cache
    if cached is not None and cached[0] == key:
        limits = cached[1]
    else:
        limits = dict(QUEUE_LIMITS)
        if len(key) > 1:
            limits.update(_read_limits(Path(path)))
        _limits_cache = (key, limits)
    global _checked
    _checked = (time.monotonic(), home, limits)  # what check_walltime uses next
    return limits


def _read_limits(path: Path) -> dict[str, QueueLimits]:
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_no_repeated_keys)
    except (OSError, ValueError, RecursionError) as exc:  # (nested deeper than json goes)
        raise ConfigurationError(f"cannot read the queue limits in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold an object of queues, not {data!r}")
    out = {}
    spelt: dict[str, str] = {}
    for name, fields in data.items():
        try:
            queue = normalize_queue(name)
        except ConfigurationError as exc:  # the file's mistake, not the caller's queue
            raise ConfigurationError(f"{path}: {exc}") from None
        if queue in spelt:  # ("prod" after "production"): the last replaced the first's
            # limits with no word of it
            raise ConfigurationError(
                f"{path}: queue {queue!r} is given twice, as {spelt[queue]!r} and as {name!r}"
            )
        spelt[queue] = name
        if not isinstance(fields, dict) or not set(fields) <= set(_LIMIT_FIELDS):
            raise ConfigurationError(
                f"{path}: the limits of queue {name!r} must be an object with some of "
                f"{', '.join(_LIMIT_FIELDS)}, not {fields!r}"
            )
        for field_name, value in fields.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                finite = ok and math.isfinite(value)
            except OverflowError:  # an int past a float's range (JSON has no limit): it
                finite = False  # was raised out of every submit, naming neither file nor field
            if not finite or value <= 0:
                raise ConfigurationError(
                    f"{path}: {field_name} of queue {name!r} must be a positive number, "
                    f"not {value!r}"
                )
            if field_name != "max_walltime" and value < 1:  # (whole workers and MB: 0.5
                # was taken as 0, a node of no worker, or a memory limit of 0 MB)
                raise ConfigurationError(
                    f"{path}: {field_name} of queue {name!r} must be at least 1, not {value!r}"
                )
            if field_name != "max_walltime" and value != int(value):  # (2.5 workers was
                # taken as 2, with no word of it)
                raise ConfigurationError(
                    f"{path}: {field_name} of queue {name!r} must be a whole number, "
                    f"not {value!r}"
                )
        out[queue] = dataclasses.replace(
            QUEUE_LIMITS[queue],
            **{k: (v if k == "max_walltime" else int(v)) for k, v in fields.items()},
        )
    return out


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refused (ValueError) if a key comes twice: json keeps the last one,
    the first's value dropped with no word of it."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        out[key] = value
    return out


def check_walltime(queue: str, walltime: float) -> None:
    """Refuse a walltime (seconds) over ``queue``'s cap, naming the cap and the queue.

    This runs at every submit, so it reuses the limits it read for up to
    :data:`LIMITS_RECHECK` seconds (the file's stat costs more than the rest of the check
    on a busy machine); :func:`queue_limits` always looks at the file."""
    cap = walltime_cap(queue) / 60.0
    if walltime > cap * 60.0:
        asked = f"{walltime / 60:g}"
        if asked == f"{cap:g}":  # just over it: six digits would name the cap itself
            asked = repr(walltime / 60)
        raise ConfigurationError(
            f"a walltime of {asked} min is over the cap of the {queue} queue "
            f"({cap:g} min)" + ("; use a shorter walltime or the production queue"
                                if queue == "test" else "")
        )


def walltime_cap(queue: str) -> float:
    """The longest walltime ``queue`` accepts, in seconds (the limits as check_walltime
    last read them)."""
    now = time.monotonic()
    at, home, limits = _checked
    if now - at >= LIMITS_RECHECK or home != os.environ.get("KOTTA_HOME"):
        limits = _all_limits()  # which records what it read in _checked
    return limits[queue].max_walltime * 60.0


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
    # numbers.Real: numpy's ints and floats too (a walltime computed from an array), as
    # max_workers takes numpy's ints
    elif isinstance(walltime, numbers.Real) and not isinstance(walltime, bool):
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


def cpu_count() -> int:
    """The CPUs this process may run on: ``ProcessPoolExecutor``'s default ``max_workers``
    since Python 3.13 (``os.process_cpu_count``, which heeds the CPU affinity a batch
    system or ``taskset`` gives a job), else the machine's count."""
    counted = getattr(os, "process_cpu_count", None)
    if counted is not None:
        return counted() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # (no affinity on this platform)
        return os.cpu_count() or 1
