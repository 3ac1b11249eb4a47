"""Script jobs, as in the Cloud Kotta paper: run a script in any language on a node.

::

    job = KottaJob(jobtype="script", jobname="hello", executable="/bin/bash hello.sh",
                   script_name="hello.sh", script="echo hello", queue="test", walltime=5)
    job.submit(konn)               # konn: kotta_executor.connect(...) or a KottaExecutor
    job.wait()                     # the exit code; job.stdout, job.stderr

A script job travels as an ordinary Python task whose function is :func:`run_script`, a
module-level function that workers import by reference: the node still never unpickles
anything, and walltime and ``kill`` cover the script as they cover any child process of a
worker.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .config import script_dir_prefix, script_tmpdir
from .decorator import Connection
from .errors import ScriptFailed
from .executor import KottaExecutor, Options, OptionsView
from .future import KottaFuture
from .security.staging import declared

JOBTYPES = ("script",)


def run_script(executable: str, script_name: str, script: str, in_place: bool = False) -> int:
    """Write ``script`` to ``script_name`` in a fresh working directory and run
    ``executable`` (split as a shell would, not run by one) there.  ``in_place``: in the
    task's working directory instead, where the node staged its inputs and collects its
    outputs.

    The script inherits file descriptors 1 and 2, so its output is the task's captured
    stdout and stderr.  Returns 0; a non-zero exit raises :class:`ScriptFailed`, so that
    the job is recorded failed with the reason ``exit code N``.
    """
    argv = shlex.split(executable)
    for stream in (sys.stdout, sys.stderr):  # what Python printed first comes first
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    with contextlib.ExitStack() as stack:
        # named after this worker: a worker killed with its script (walltime, kill(),
        # memory) cannot remove it, and its node does, once the worker has gone
        # (node.pool.Leftovers.remove_dirs)
        workdir = os.getcwd() if in_place else stack.enter_context(
            tempfile.TemporaryDirectory(prefix=script_dir_prefix(os.getpid()),
                                        dir=script_tmpdir())
        )
        path = os.path.join(workdir, script_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        os.chmod(path, 0o700)  # so that executable="./run.sh" works too
        stack.callback(_heed_sigchld())
        try:
            # In a process group of its own: a script that signals its group (``trap
            # 'kill 0' EXIT``, to end its background jobs) signalled its worker too, which
            # died of it (WorkerDied, not the script's outcome).  The node signals every
            # group of its worker's session, so walltime, kill() and the worker's
            # last-resort kill still end all the script started.
            proc = subprocess.run(argv, cwd=workdir, stdin=subprocess.DEVNULL, check=False,
                                  process_group=0)
        except OSError as exc:
            itself = os.path.realpath(os.path.join(workdir, argv[0])) == os.path.realpath(path)
            if exc.errno == errno.ENOENT and itself and "/" not in argv[0]:
                # a bare name is looked up on PATH, as a shell would, not in the directory
                fixed = shlex.join([f"./{argv[0]}", *argv[1:]])
                named = shlex.join(["sh", *argv])
                # (the message ends "not on PATH", before the ": 'NAME'" OSError adds)
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"cannot run {argv[0]!r}: a command without a '/' is looked up on PATH,"
                    f" not in the working directory where {script_name} is saved; run the"
                    f" script as executable={fixed!r} (with a '#!' line), or name its"
                    f" interpreter (executable={named!r}); not on PATH",
                    argv[0],
                ) from exc
            # the script itself, with no interpreter named (it is not run by a shell)
            if exc.errno == errno.ENOEXEC and not script.startswith("#!") and itself:
                fixed = shlex.join(["sh", script_name, *argv[1:]])
                late = script.lstrip("\ufeff \t\r\n").startswith("#!")
                raise OSError(
                    errno.ENOEXEC,
                    f"cannot run {argv[0]!r}: {script_name} does not begin with a '#!' line "
                    "naming its interpreter"
                    + (" (it has one, but not as its very first bytes: a blank line or a"
                       " byte-order mark comes first)" if late else "")
                    + f"; scripts are not run by a shell: begin it with, say, '#!/bin/sh', or"
                    f" name the interpreter: executable={fixed!r}",
                ) from exc
            if exc.errno == errno.ENOENT and script.startswith("#!") and itself:
                # the script is there: it is the interpreter its '#!' line names that is not
                line = script[2:].split("\n", 1)[0]
                interp = line.strip(" \t").split(" ", 1)[0]
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"cannot run {argv[0]!r}: the interpreter its '#!' line names, "
                    f"{interp!r}, is not on this node"
                    + (" (the line ends in a carriage return: the script has Windows line"
                       " endings; save it with '\\n' ones)" if line.endswith("\r") else ""),
                    interp,
                ) from exc
            raise
    if proc.returncode != 0:
        raise ScriptFailed(proc.returncode)
    return 0


def _heed_sigchld() -> Callable[[], None]:
    """SIGCHLD as by default while the script runs; returns what puts it back.  An earlier
    task on the worker may have left it ignored (the worker is reused, and keeps what tasks
    do to its signals): the kernel then reaps the script itself, its exit status is lost
    (``subprocess`` reads 0: a failed script recorded completed), and the script inherits
    the ignored signal, as its own children's statuses are lost."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
        return lambda: None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def _check_script_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or os.path.basename(name) != name
        or "\0" in name
    ):
        raise ValueError(
            f"script_name must be a plain file name (no directories), not {name!r}"
        )
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError as exc:  # a lone surrogate: the bare codec error named nothing
        raise ValueError(
            f"script_name {name!r} holds {name[exc.start]!r}, which the file system encoding "
            "cannot encode (a lone surrogate): no file can have that name"
        ) from None
    if size > 255:  # NAME_MAX: else the job failed on the node, "File name too long"
        raise ValueError(
            f"script_name {name[:40]!r}... takes {size} bytes as a file name; a file name "
            "takes at most 255"
        )
    return name


class KottaJob:
    """A script job: ``executable`` runs in a fresh working directory holding ``script``
    saved as ``script_name``.

    ``walltime``: minutes (or a ``timedelta``); ``queue``: ``test`` or ``production``.
    ``inputs`` / ``outputs``: dataset URIs (``s3://...``) staged into the working
    directory under their basenames before the script runs, and uploaded from there after
    it exits 0 (docs/security.md).
    """

    def __init__(
        self,
        jobtype: str = "script",
        jobname: str | None = None,
        *,
        executable: str,
        script_name: str,
        script: str,
        inputs: Sequence[Any] | None = None,
        outputs: Sequence[Any] | None = None,
        queue: str = "test",
        walltime: float | _dt.timedelta = 5,
    ):
        if jobtype not in JOBTYPES:
            raise ValueError(f"unknown jobtype {jobtype!r}: only {', '.join(JOBTYPES)} jobs exist")
        ins, outs = declared(inputs or (), outputs or ())  # InvalidDataUri now, not at submit
        if not isinstance(executable, str):
            raise ValueError(f"executable must be a non-empty command line, not {executable!r}")
        try:
            argv = shlex.split(executable)
        except ValueError as exc:  # an unclosed quote: "No closing quotation"
            raise ValueError(
                f"executable {executable!r} cannot be split into a command line: "
                f"{str(exc)[:1].lower()}{str(exc)[1:]}"
            ) from None
        if not argv:
            raise ValueError(f"executable must be a non-empty command line, not {executable!r}")
        if "\0" in executable:
            raise ValueError(f"executable {executable!r} holds a NUL byte, which no command can")
        for arg in argv:
            try:
                os.fsencode(arg)  # as the node hands it to the OS
            except UnicodeEncodeError as exc:  # a lone surrogate: the job failed on the node
                raise ValueError(
                    f"executable {executable!r} holds {arg[exc.start]!r}, which the file "
                    "system encoding cannot encode (a lone surrogate): no command can take it"
                ) from None
        if not isinstance(script, str):
            raise TypeError(f"script must be a str (the script's text), not {type(script).__name__}")
        try:
            script.encode("utf-8")  # as the node saves it
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"script holds {script[exc.start]!r} at position {exc.start}, which UTF-8 "
                "cannot encode (a lone surrogate): the node saves the script as UTF-8"
            ) from None
        self.jobtype = jobtype
        self.jobname = jobname
        self.executable = executable
        self.script_name = _check_script_name(script_name)
        # the script is saved in the working directory, beside the staged inputs and the
        # outputs: under one of their names it would replace an input, or be uploaded
        for uri in (*ins, *outs):
            if uri.rsplit("/", 1)[-1] == script_name:
                raise ValueError(
                    f"script_name {script_name!r} is the name {uri} has in the job's working "
                    "directory, where the script is saved too: choose another name"
                )
        self.script = script
        self.inputs = list(ins)
        self.outputs = list(outs)
        Options.make(queue, walltime)  # refuse a bad queue or walltime now, not at submit
        self.queue = queue
        self.walltime = walltime
        self.future: KottaFuture | None = None
        self._exit_code: int | None = None
        # held from submit's check to its future: two threads that called it together
        # both got past the check, and the job was submitted twice
        self._submit_lock = threading.Lock()

    def __repr__(self) -> str:
        state = "unsubmitted" if self.future is None else f"job={self.job_id}"
        return f"<KottaJob {self.jobname or self.script_name!r} {state}>"

    # (a lock cannot be pickled: copy.deepcopy and pickle of a job refused it; a copy has
    # its own)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_submit_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._submit_lock = threading.Lock()

    # ------------------------------------------------------------------ submission

    def submit(self, konn) -> str:
        """Send the job through a connection (``kotta_executor.connect()``), a
        :class:`KottaExecutor` or its ``with_options()`` view (whose requirements, say,
        apply; the job's queue, walltime, inputs and outputs are its own); returns its job
        id.  A job is submitted once."""
        with self._submit_lock:
            return self._submit(konn)

    def _submit(self, konn) -> str:
        if self.future is not None:
            raise RuntimeError(f"this job was already submitted as {self.job_id}")
        if isinstance(konn, Connection):
            ex = konn.executor
        elif isinstance(konn, (KottaExecutor, OptionsView)):
            ex = konn  # (a view: its options, the job's own queue and walltime over them)
        else:
            raise TypeError(
                f"submit needs a connection (kotta_executor.connect()), a KottaExecutor or "
                f"its with_options() view, not {konn!r}"
            )
        view = ex.with_options(queue=self.queue, walltime=self.walltime,
                               inputs=self.inputs, outputs=self.outputs)
        staged = bool(self.inputs or self.outputs)
        self.future = view.submit(run_script, self.executable, self.script_name, self.script,
                                  staged)
        return self.future.job_id

    def _submitted(self) -> KottaFuture:
        if self.future is None:
            raise RuntimeError("this job has not been submitted: call job.submit(konn) first")
        return self.future

    # ------------------------------------------------------------------ state

    @property
    def job_id(self) -> str | None:
        return None if self.future is None else self.future.job_id

    def status(self, konn=None) -> str:
        """The job's state in the enclave (``pending``, ``processing``, ``completed``,
        ``failed``, ``cancelled``...).  ``konn`` is accepted for the paper's
        ``job.status(konn)``; the job's own connection is used."""
        return self._submitted().status()

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the script to end and return its exit code (non-zero codes too: they
        do not raise).  Raises ``TimeoutError`` if ``timeout`` seconds pass first, and what
        the enclave reports if the script did not run to an exit: ``WalltimeExceeded``,
        ``TaskKilled``, ``WorkerDied``, or the error that stopped it from starting (a
        ``FileNotFoundError`` for an executable that does not exist)."""
        f = self._submitted()
        try:
            f.result(timeout)
        except ScriptFailed as exc:
            self._exit_code = exc.exit_code
        else:
            self._exit_code = 0
        return self._exit_code

    @property
    def exit_code(self) -> int | None:
        """The script's exit status once it ended (minus the signal number if a signal
        ended it); ``None`` while it runs, or if it never exited on its own."""
        if self._exit_code is None and self.done():
            try:
                self.wait(0)
            except Exception:  # noqa: BLE001 - walltime, kill...: no exit code
                return None
        return self._exit_code

    @property
    def stdout(self) -> str | None:
        """What the script wrote to standard output, once it ended."""
        return None if self.future is None else self.future.stdout

    @property
    def stderr(self) -> str | None:
        """What the script wrote to standard error, once it ended."""
        return None if self.future is None else self.future.stderr

    def cancel(self) -> bool:
        return self._submitted().cancel()

    def kill(self) -> bool:
        """Stop the job, running or not (its script's process tree is killed)."""
        return self._submitted().kill()


__all__ = ["KottaJob", "ScriptFailed", "run_script"]
