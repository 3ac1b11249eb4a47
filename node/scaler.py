"""Elastic pools: a supervisor that keeps between ``min`` and ``max`` local node processes
for one queue, scaling with the backlog.

``kotta up --min 1 --max 4`` starts it detached (``python -m node.scaler``); ``kotta down``
stops it (SIGTERM) before it stops the nodes.  The rule itself is the pure function
:func:`desired`, shared with the AWS autoscaler (:mod:`kotta_executor.aws_autoscale`):

* the pool grows when the queue's depth (messages waiting or in flight) per live node
  exceeds ``per_node`` (``kotta up`` uses 2 x the workers of a node);
* it shrinks, one node at a time, once the queue has been empty for ``cooldown`` seconds
  (and again after another ``cooldown``); a surplus node gets SIGTERM, which makes it
  drain: finish or hand back its work, and exit 0.

Only the nodes the scaler started count as its pool; nodes of other ``kotta up`` or of
executors are left alone.
"""

from __future__ import annotations

import argparse
import builtins
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kotta.scaler")

#: seconds without any message on the queue before the pool shrinks by one node
DEFAULT_COOLDOWN = 30.0
#: node processes that exit before they register, in a row, before the scaler gives up
MAX_START_FAILURES = 5
#: the scaler's exit status when it gives up because its nodes fail to start (kotta up
#: tells the user to look at the nodes' logs, not the scaler's)
NODES_FAILED = 3


class NodesFailed(RuntimeError):
    """The scaler's node processes keep exiting before they register."""


def desired(depth: int, live: int, min: int, max: int, per_node: int) -> int:  # noqa: A002
    """How many nodes the pool should have, from the queue's ``depth`` and the ``live`` nodes.

    Within ``[min, max]`` always.  With a backlog, never fewer than ``live`` (the pool only
    shrinks when the queue is empty) and enough nodes that each has at most ``per_node``
    messages; with an empty queue, ``min`` (callers shrink towards it gradually).
    Monotone (non-decreasing) in ``depth``.
    """
    if min < 0 or max < min:
        raise ValueError(f"need 0 <= min <= max, not min={min}, max={max}")
    if per_node < 1:
        raise ValueError(f"per_node must be at least 1, not {per_node}")
    if depth <= 0:
        return min
    want = builtins.max(live, math.ceil(depth / per_node))
    return builtins.min(builtins.max(want, min), max)


def pid_file(home: str | os.PathLike, queue: str) -> Path:
    """Where ``kotta up`` records the scaler of ``queue`` (under the enclave's home)."""
    return Path(home) / f"scaler-{queue}.pid"


def write_pid(path: Path, pid: int, enclave_url: str) -> None:
    """Record the scaler ``pid`` of the enclave at ``enclave_url`` (read_pid checks both)."""
    path.write_text(f"{pid}\n{enclave_url}\n")


def read_pid(path: Path) -> int | None:
    """The pid in a scaler pid file, if that process is still a running scaler: of the
    enclave and queue the file is for.  A pid is reused once its process is gone: after
    a reboot, say, a stale file's pid may be another enclave's scaler (or another queue's),
    which `kotta down` then stopped instead.  (A file without the enclave, written by an
    earlier version, is taken on the process's being a scaler alone.)"""
    try:
        # by line: the enclave's path may hold spaces ("my projects")
        lines = path.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    queue = path.name[len("scaler-"):-len(".pid")]
    try:
        import psutil

        proc = psutil.Process(pid)
        argv = proc.cmdline()
        # (empty for a moment as a process execs: a scaler `kotta up` had just started,
        # looked at by a second `kotta up` at once, was taken for none, and a second one
        # started; a fresh clone's CI saw it.  A kernel thread's stays empty)
        deadline = time.monotonic() + 1.0
        while not argv and time.monotonic() < deadline and (
                proc.status() != psutil.STATUS_ZOMBIE):
            time.sleep(0.01)
            argv = proc.cmdline()
        if proc.status() == psutil.STATUS_ZOMBIE or "node.scaler" not in argv:
            return None
        if len(lines) > 1 and (_option(argv, "--enclave") != lines[1]
                               or _option(argv, "--queue") != queue):
            return None
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect
        return None
    return pid


def _option(argv: list[str], name: str) -> str | None:
    """The value of option ``name`` in a scaler's command line (``kotta up`` writes each
    as two arguments, before the ``--`` that begins its nodes' arguments)."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    try:
        return head[head.index(name) + 1]
    except (ValueError, IndexError):
        return None


def stop_scalers(home: str | os.PathLike, queue: str | None = None,
                 timeout: float = 30.0) -> list[tuple[str, int, bool]]:
    """SIGTERM the scalers under ``home`` (of ``queue``, or all) and wait for them to exit,
    so that none starts a node while ``kotta down`` stops them.  Returns (queue, pid,
    stopped) for each scaler found; the pid files of stopped scalers are removed."""
    import psutil

    found = []
    for path in sorted(Path(home).glob("scaler-*.pid")):
        q = path.name[len("scaler-"):-len(".pid")]
        if queue is not None and q != queue:
            continue
        pid = read_pid(path)
        if pid is None:
            path.unlink(missing_ok=True)
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        found.append((q, pid, path))
    deadline = time.monotonic() + timeout
    result = []
    for q, pid, path in found:
        stopped = False
        while True:
            try:
                proc = psutil.Process(pid)
                stopped = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                stopped = True
            if stopped or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if stopped:
            path.unlink(missing_ok=True)
        result.append((q, pid, stopped))
    return result


@dataclass
class _Managed:
    node_id: str
    proc: subprocess.Popen
    started: float
    draining: bool = False
    registered: bool = False  # seen in the enclave's registry: it started up


@dataclass
class Scaler:
    """The pool of one queue.  ``node_command(node_id)`` is the argv of one node process;
    ``depth()`` reads the queue's depth (messages waiting or in flight)."""

    node_command: Callable[[str], Sequence[str]]
    depth: Callable[[], int]
    min: int = 1
    max: int = 1
    per_node: int = 2
    cooldown: float = DEFAULT_COOLDOWN
    logs: Path | None = None
    clock: Callable[[], float] = time.monotonic
    #: the ids of the nodes registered in the enclave (None: not known)
    registered: Callable[[], set[str]] | None = None
    #: why the enclave is no longer there (Enclave.removed), or None; None: not known
    removed: Callable[[], str | None] | None = None
    nodes: list[_Managed] = field(default_factory=list)
    _empty_since: float | None = None
    _last_down: float | None = None
    _failures: int = 0

    def __post_init__(self):
        desired(0, 0, self.min, self.max, self.per_node)  # validates the bounds

    def live(self) -> list[_Managed]:
        """Nodes started and not asked to stop (starting ones count: no double starts)."""
        return [n for n in self.nodes if not n.draining and n.proc.poll() is None]

    def _note_registered(self) -> None:
        """Mark the nodes that have started up (registered); any one that has ends a run
        of failed starts."""
        if self.registered is None:
            return
        pending = [n for n in self.nodes if not n.registered]
        if not pending:
            return
        known = self.registered()
        for n in pending:
            if n.node_id in known:
                n.registered = True
                self._failures = 0

    def _reap(self) -> None:
        self._note_registered()
        for n in list(self.nodes):
            code = n.proc.poll()
            if code is None:
                continue
            self.nodes.remove(n)
            if n.draining:
                log.info("node %s drained (exit %s)", n.node_id, code)
                continue
            log.warning("node %s exited unasked (exit %s)", n.node_id, code)
            if code != 0 and not n.registered:  # it never started up: a failed start
                self._failures += 1

    def start_node(self) -> _Managed:
        node_id = os.urandom(6).hex()
        out = subprocess.DEVNULL
        if self.logs is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            out = open(self.logs / f"node-{node_id}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(list(self.node_command(node_id)), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        node = _Managed(node_id, proc, self.clock())
        self.nodes.append(node)
        log.info("started node %s (pid %s)", node_id, proc.pid)
        return node

    def stop_node(self, node: _Managed) -> None:
        node.draining = True
        try:
            node.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        log.info("asked node %s (pid %s) to drain", node.node_id, node.proc.pid)

    def step(self) -> int:
        """One decision: start or stop nodes.  Returns the pool size it aims at now."""
        self._reap()
        if self._failures >= MAX_START_FAILURES:
            raise NodesFailed(f"{self._failures} node processes failed; see the node logs")
        now = self.clock()
        depth = self.depth()
        live = self.live()
        if depth > 0:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
        target = desired(depth, len(live), self.min, self.max, self.per_node)
        if target > len(live):
            log.info("depth %d, %d live nodes: scaling up to %d", depth, len(live), target)
            for _ in range(target - len(live)):
                self.start_node()
            return target
        if target < len(live) and self._cooled_down(now):
            newest = max(live, key=lambda n: n.started)
            log.info("queue empty for %.1f s: scaling down to %d", now - self._empty_since,
                     len(live) - 1)
            self.stop_node(newest)
            self._last_down = now
            return len(live) - 1
        return len(live)

    def _cooled_down(self, now: float) -> bool:
        if self._empty_since is None or now - self._empty_since < self.cooldown:
            return False
        return self._last_down is None or now - self._last_down >= self.cooldown

    def run(self, stop: threading.Event, interval: float = 1.0) -> int:
        """Step every ``interval`` seconds until ``stop`` is set.  The nodes keep running
        when the scaler stops (``kotta down`` stops them)."""
        status = 0
        while not stop.is_set():
            if self.removed is not None and (why := self.removed()):
                # (its nodes stop by themselves; new ones, short of --min, made a new empty
                # enclave where it was removed, and served that)
                log.error("%s; stopping the scaler", why)
                status = 1
                break
            try:
                self.step()
            except NodesFailed as exc:
                log.error("%s; stopping the scaler", exc)
                return NODES_FAILED
            except Exception:  # noqa: BLE001 - a flaky read must not end the pool
                log.exception("scaling step failed")
            stop.wait(interval)
        self._stop_unregistered()
        log.info("scaler stopped; %d nodes keep running", len(self.live()))
        return status

    def _stop_unregistered(self) -> None:
        """Stop the nodes started and not registered yet: ``kotta down`` stops the scaler,
        then the nodes registered by then, so it would never find these, and they would
        serve the queue on, unmanaged.  (One that registers meanwhile is stopped either
        way: here, or by ``kotta down``, which reads the registrations after this.)"""
        if self.registered is None:
            return
        known = self.registered()
        for node in self.live():
            if node.node_id not in known:
                log.info("stopping node %s: it has not registered yet", node.node_id)
                node.proc.send_signal(signal.SIGTERM)
                node.draining = True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.scaler --enclave URL --queue Q --min N --max M [...] -- NODE ARGS``:
    the node processes are ``python -m node NODE ARGS --node-id ID``."""
    p = argparse.ArgumentParser(prog="python -m node.scaler")
    p.add_argument("--enclave", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--min", type=int, required=True)
    p.add_argument("--max", type=int, required=True)
    p.add_argument("--per-node", type=int, default=2)
    p.add_argument("--cooldown", type=float, default=DEFAULT_COOLDOWN)
    p.add_argument("--interval", type=float, default=None)
    p.add_argument("--logs")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("node_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    node_args = list(args.node_args)
    if node_args[:1] == ["--"]:
        node_args = node_args[1:]
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from kotta_executor.backends import open_enclave

    enclave = open_enclave(args.enclave)
    queue = args.queue
    scaler = Scaler(
        node_command=lambda node_id: [sys.executable, "-m", "node", *node_args,
                                      "--node-id", node_id],
        depth=lambda: enclave.queue.depth(queue),
        min=args.min, max=args.max, per_node=args.per_node, cooldown=args.cooldown,
        logs=Path(args.logs) if args.logs else None,
        registered=lambda: {n.node_id for n in enclave.nodes.all()},
        removed=enclave.removed,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    interval = args.interval or min(2.0, max(0.1, args.cooldown / 4))
    log.info("scaling queue %s between %d and %d nodes (%d messages per node, cooldown %g s)",
             queue, args.min, args.max, args.per_node, args.cooldown)
    try:
        return scaler.run(stop, interval)
    finally:
        enclave.close()


if __name__ == "__main__":
    sys.exit(main())
