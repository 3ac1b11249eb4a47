"""``connect()`` and ``@kottajob``: the decorator of the original Cloud Kotta paper.

::

    konn = kotta_executor.connect()

    @kottajob(konn, "test", 5)              # queue, walltime in minutes: calls block
    def count(year): ...

    @kottajob(konn, "test", 5, block=False) # calls return KottaFutures
    def count_async(year): ...

    @kottajob(executor)                      # an existing KottaExecutor's options
    def other(x): ...

    @kottajob(executor.with_options(walltime=30))   # or those of its with_options() view
    def longer(x): ...

    @kottajob(konn, "test", 5, requirements="pandas==2.2\\nnumpy")  # installed on the node
    def frame(path): ...
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import functools
import inspect
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import dependencies, wire
from .backends import Enclave, absolute, check_spec
from .config import task_owner
from .executor import (
    KottaExecutor,
    Options,
    OptionsView,
    _check_credentials,
    _check_init_size,
    _check_owner,
    _not_sent,
    _pool_sizes,
    _start_node_mode,
)


class Connection:
    """A connection to an enclave, shared by the functions decorated with it.

    It creates its executor on first use (and again after the executor was shut down: by
    ``with konn.executor:``, say; or broke; or in a child process forked since, where the
    parent's cannot be used) and shuts it down at ``close()`` or interpreter exit.
    Keyword arguments are those of :class:`KottaExecutor`, checked now: a misspelt one is a
    TypeError here, and a wrong queue, walltime or requirements a ValueError (a wrong
    max_workers, max_tasks_per_child, initializer or type of credentials, an owner that
    is no user name, KottaExecutor's error), not at the first call.
    """

    def __init__(self, enclave: str | os.PathLike | None = None, **executor_kwargs: Any):
        inspect.signature(KottaExecutor).bind(enclave=enclave, **executor_kwargs)
        check_spec(enclave)  # (connect(42), "aws:/lab", "s3://x": here, not at the first call)
        # and the tasks' options, as kottajob checks its own: connect(queue="prod2") is a
        # ValueError here, not at the first call of a function decorated with it
        options = Options.make(
            executor_kwargs.get("queue", "test"), executor_kwargs.get("walltime", 5),
            executor_kwargs.get("requirements"),
        )
        if executor_kwargs.get("requirements") is not None:
            # kept as read: an iterator (a generator) read once here gave each executor
            # made since none, its tasks run without them
            executor_kwargs["requirements"] = options.requirements
        # and its workers' (connect(max_workers=0), an initializer that is not callable)
        _pool_sizes(executor_kwargs.get("max_workers"),
                    executor_kwargs.get("max_tasks_per_child"))
        _start_node_mode(executor_kwargs.get("start_node", "auto"))  # ("no" started nodes)
        _check_credentials(executor_kwargs.get("credentials"))  # (credentials=42)
        _check_owner(executor_kwargs.get("owner"))  # (owner=42, owner="")
        if executor_kwargs.get("initializer") is not None:
            # kept as a tuple: the check (and each executor made since) reads them, and an
            # iterator read once gave the executor none, its initializer called without them
            executor_kwargs["initargs"] = tuple(executor_kwargs.get("initargs", ()))
            init = wire.dump_initializer(executor_kwargs["initializer"],
                                         executor_kwargs["initargs"])
            # (each backend's task messages carry the same; the enclave is not open yet)
            _check_init_size(init, getattr(enclave, "inline_limit", Enclave.inline_limit))
        if isinstance(enclave, (str, os.PathLike)) and isinstance(os.fspath(enclave), str):
            # a relative directory, as now: the executor is made at the first call (and
            # again after close()), and an os.chdir since made it open another enclave there
            enclave = absolute(os.fspath(enclave)) or None
        self._enclave = enclave
        self._kwargs = executor_kwargs
        self._executor: KottaExecutor | None = None
        self._lock = threading.Lock()

    @property
    def executor(self) -> KottaExecutor:
        with self._lock:
            # (one a forked child inherited is its parent's: the child gets its own)
            if (self._executor is None or self._executor._shutdown
                    or self._executor._pid != os.getpid()):
                self._executor = KottaExecutor(enclave=self._enclave, **self._kwargs)
            elif self._executor._broken is not None:
                # a broken one refuses every call, for good: once the user fixed what
                # broke it (a node.py of theirs on the path, say), the call after tries
                # anew.  (Its pending futures have failed already: it has nothing to wait
                # for.)
                self._executor.shutdown(wait=False)
                self._executor = KottaExecutor(enclave=self._enclave, **self._kwargs)
            return self._executor

    def attach(self, job_id: str):
        return self.executor.attach(job_id)

    def close(self) -> None:
        with self._lock:
            ex = self._executor
        if ex is None:
            return
        # not under the lock: a done-callback (run by the executor's manager thread, which
        # this waits for) that calls a decorated function would wait for it, and close()
        # for ever; such a call makes a new executor, as any call after close() does
        ex.shutdown(wait=True)
        with self._lock:
            if self._executor is ex:
                self._executor = None

    def __reduce__(self):
        raise _not_sent("a connection (kotta_executor.connect())")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(enclave: str | os.PathLike | None = None, **executor_kwargs: Any) -> Connection:
    """Connect to an enclave (default: ``$KOTTA_ENCLAVE``, else the embedded one)."""
    return Connection(enclave, **executor_kwargs)


def kottajob(
    target: Connection | KottaExecutor | OptionsView,
    queue: str | None = None,
    walltime: float | _dt.timedelta | None = None,
    *,
    block: bool = True,
    requirements: str | None = None,
) -> Callable[[Callable], Callable]:
    """Make a function run as a Kotta job.  ``block=True`` returns the value (or raises the
    remote exception); ``block=False`` returns a :class:`KottaFuture`.  ``requirements``:
    pip requirement lines the node installs (in a cached venv) for this function's tasks.
    ``target``'s options (an executor's, or its ``with_options()`` view's) are the defaults
    that ``queue``, ``walltime`` and ``requirements`` override."""
    if not isinstance(target, (Connection, KottaExecutor, OptionsView)):
        raise TypeError(
            f"kottajob needs a connection (kotta_executor.connect()), a KottaExecutor or "
            f"its with_options() view, not {target!r}"
        )
    # validate now, at decoration time, rather than on the first call
    if not _is_bool(block):  # block="no" (any string is true) blocked every call
        raise TypeError(f"kottajob's block must be True or False, not {block!r}")
    if isinstance(target, (KottaExecutor, OptionsView)):
        checked = target.with_options(queue=queue, walltime=walltime,
                                      requirements=requirements)._options
    else:
        checked = Options.make(
            queue if queue is not None else "test", walltime if walltime is not None else 5,
            requirements,
        )
    if requirements is not None:  # kept as read: each call reads them again, and an
        # iterator (a generator) read once here gave the calls none
        requirements = checked.requirements

    def decorate(fn: Callable) -> Callable:
        if not callable(fn):  # (kottajob(konn)(42)): else taken, to fail at the first call
            raise TypeError(f"kottajob decorates a function (or other callable), not {fn!r}")
        returns = _unsendable_returns(fn)
        if returns:  # else each call ran on a node, to fail there with a SerializationError
            raise TypeError(
                f"kottajob cannot run {fn!r} as a job: its calls return {returns}, which a "
                "node cannot send back; decorate a function that returns its value (a list, "
                "or asyncio.run(...)'s) instead"
            )

        def call(task: Callable, /, *args: Any, **kwargs: Any):
            ex = target.executor if isinstance(target, Connection) else target
            view = ex.with_options(queue=queue, walltime=walltime, requirements=requirements)
            # (as submit does, with a note of its own for a bad inputs=: the user called
            # fn, and a partial of fn calls it so all the same.  The view's executor: ex
            # may be a view itself, whose options are the defaults here)
            future = view._parent._submit_call(task, args, kwargs, view._options,
                                               decorated=True)
            if not block:
                return future
            try:
                return future.result()
            except BaseException:
                # interrupted while it waits (Ctrl-C): no one holds this future to wait for
                # the job or kill it, and the end of the interpreter would wait for it, up
                # to its walltime
                if not future.done():
                    future.kill()
                raise

        return _Decorated(fn, call, block)

    return decorate


def _unsendable_returns(fn: Callable) -> str | None:
    """What ``fn``'s calls return that cannot be pickled back from a node, if they do:
    a generator or async function's (a partial of one too), or a callable object's whose
    ``__call__`` is one (which inspect's checks do not look at)."""
    for f in (fn, type(fn).__call__):  # (fn is callable)
        if inspect.iscoroutinefunction(f):
            return "a coroutine"
        if inspect.isasyncgenfunction(f):
            return "an async generator"
        if inspect.isgeneratorfunction(f):
            return "a generator"
    return None


def _is_bool(value: Any) -> bool:
    """True, False, or a number equal to one of them (1, 0, numpy's bools)."""
    try:
        return not isinstance(value, str) and value in (True, False)
    except Exception:  # noqa: BLE001 - an object whose == raises (an array) is not a bool
        return False


class _Decorated:
    """A function decorated with :func:`kottajob`: calling it submits ``kotta_function``,
    the undecorated function.  Pickled, it travels by reference when its module's attribute
    of its name is this very object (a module-level function: the node imports it, as it
    imports any module-level function, with the module's globals), else by value, with
    its undecorated function (one of ``__main__`` or a notebook, a closure).  Called in a task
    (or unpickled by value anywhere), it runs its body there, rather than failing to
    pickle the connection this holds, or submitting a job again from the node."""

    def __init__(self, fn: Callable, call: Callable | None, block: bool = True):
        functools.update_wrapper(self, fn)
        self.kotta_function = fn
        self._call = call  # (None: a copy unpickled by value, with no connection)
        self._block = block
        self._by_reference = _ByReference(self)

    def __call__(self, /, *args: Any, **kwargs: Any):  # (a keyword named self is fn's)
        # In a task: its worker's KOTTA_OWNER, which whatever the task starts inherits
        # (multiprocessing children of any start method, programs it runs).  A job
        # submitted from there would hold a worker while the task waits for it: with every
        # worker so held, neither ends before its walltime.
        if self._call is not None and not task_owner():
            return self._call(self.kotta_task(), *args, **kwargs)
        if self._block:
            return self.kotta_function(*self._values(args, kwargs), **kwargs)
        # block=False: a future, done, as the client's calls return, so that code that
        # calls it runs alike in the client and in a task
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            value = self.kotta_function(*self._values(args, kwargs), **kwargs)
        except Exception as exc:  # noqa: BLE001 - the future's, as a job's would be
            future.set_exception(exc)
        else:
            future.set_result(value)
        return future

    def _values(self, args: tuple, kwargs: dict) -> tuple:
        """``args`` (and ``kwargs``, in place) with each future among them replaced by its
        value, as a job gets its dependencies' (the ``block=False`` calls of a fan-in, in
        a task): the body got the futures themselves.  A failed one: DependencyError."""
        for dep in dependencies.find([(args, kwargs)]):
            if dep.cancelled() or dep.exception() is not None:  # (waits, as a job does)
                name = getattr(self, "__qualname__", None) or repr(self.kotta_function)
                raise dependencies.failure(None, dep, call=f"the call of {name}")
        [(args, values)] = dependencies.resolve([(args, kwargs)])
        kwargs.update(values)
        return args

    def kotta_task(self) -> Callable:
        """What a job of this function runs: its body, by reference when it can be (also
        what ``ex.submit(f, x)`` sends: in a task, a ``block=False`` ``f`` itself would
        return a future, which cannot be sent back)."""
        return self._by_reference if _importable(self) else self.kotta_function

    def __get__(self, obj: Any, objtype: type | None = None):  # a method, as a function is
        return self if obj is None else types.MethodType(self, obj)

    def __reduce__(self):
        if _importable(self):  # (a string: pickle's global, its module and name)
            return self.__qualname__
        # a stand-in without connection, whose calls run the body (block=False: return
        # futures), given the values of the futures they are passed, as in the client
        # (the undecorated function itself got the futures)
        return _Decorated, (self.kotta_function, None, self._block)

    # copy.copy and copy.deepcopy keep it, as they keep a function, rather than take
    # __reduce__'s undecorated function: the copy (in a deep-copied config, or an
    # estimator's clone) would run in the client, silently
    def __copy__(self):
        return self

    def __deepcopy__(self, memo: dict):
        return self

    def __repr__(self) -> str:
        name = getattr(self, "__qualname__", None)  # (a partial or callable object has none)
        if name is None:
            return f"<kottajob {self.kotta_function!r}>"
        return f"<kottajob {self.__module__}.{name}>"


class _ByReference:
    """What a call of an importable decorated function submits: its undecorated function,
    pickled as ``getattr(<the decorated function, by reference>, "kotta_function")``.
    cloudpickle would send the function itself by value, with the globals it uses (a
    lock: the call failed; a large table: sent at every call), since its module's
    attribute of its name is the decorated function.  It has the function's name and
    signature, for the task's header and ``inputs=``/``outputs=``."""

    def __init__(self, decorated: _Decorated):
        functools.update_wrapper(self, decorated.kotta_function)
        self._decorated = decorated

    def __call__(self, /, *args: Any, **kwargs: Any):
        return self._decorated.kotta_function(*args, **kwargs)

    def __reduce__(self):
        return getattr, (self._decorated, "kotta_function")


def _importable(obj: Any) -> bool:
    """Whether pickle finds ``obj`` by reference, as cloudpickle's rule for functions: under
    its ``__module__`` (imported, not ``__main__``, not registered to be pickled by value)
    and ``__qualname__``."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "__main__")
    name = getattr(obj, "__qualname__", None)
    if module is None or module.__name__ == "__main__" or name is None:
        return False
    registered = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value", None)
    if registered is not None and registered(module):
        return False
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is obj
