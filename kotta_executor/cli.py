"""The ``kotta`` command: nodes (``node``, ``up``, ``down``), jobs (``jobs``, ``status``,
``logs``, ``cancel``, ``dead-letters``, ``prune``) and ``demo``."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from . import config, wire
from .backends import env_spec, is_new, open_enclave
from .backends.base import KILLED_PENDING, Enclave, Message, reply_queue
from .errors import KottaError, UnknownJob
from .states import CANCELLABLE, JobState


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kotta", description="kotta-executor: run Python in a data enclave")
    help_ = ("enclave to use (a directory, embedded:///dir or aws://NAME; default $KOTTA_ENCLAVE,"
             " else $KOTTA_HOME)")
    p.add_argument("--enclave", help=help_)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--enclave", default=argparse.SUPPRESS, help=help_)
    sub = _taking(common, p.add_subparsers(dest="command", required=True))

    n = sub.add_parser("node", help="run a node daemon in the foreground")
    _node_args(n)
    n.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    n.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    n.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    n.add_argument("--managed-by", help=argparse.SUPPRESS)
    n.add_argument("--leave-fd", type=int, help=argparse.SUPPRESS)
    n.add_argument("--prespawn", metavar="OWNER", help="start the workers for OWNER at once")
    n.add_argument("--node-id", help=argparse.SUPPRESS)
    n.add_argument("--log-level", default="INFO")

    u = sub.add_parser("up", help="start local nodes in the background")
    _node_args(u)
    u.add_argument("--nodes", type=int, default=1, help="how many node processes (default 1)")
    u.add_argument("--min", type=int, dest="min_nodes", metavar="N",
                   help="elastic pool: keep at least this many nodes (a background scaler)")
    u.add_argument("--max", type=int, dest="max_nodes", metavar="N",
                   help="elastic pool: grow with the backlog up to this many nodes")
    u.add_argument("--cooldown", type=float, default=30.0, metavar="SECONDS",
                   help="elastic pool: seconds the queue stays empty before one node stops"
                        " (default 30)")

    d = sub.add_parser("down", help="stop the local nodes (they finish or hand back their work)")
    d.add_argument("--queue", help="only the nodes of this queue")
    d.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the scalers and nodes to stop (default 60)")

    j = sub.add_parser("jobs", help="list jobs")
    j.add_argument("--state", choices=[str(s) for s in JobState])
    j.add_argument("--limit", type=int, default=20,
                   help=f"at most this many, the newest (default 20, at most {JOBS_LIMIT_MAX})")
    j.add_argument("--all-users", action="store_true")

    dl = sub.add_parser("dead-letters", help="tasks a queue gave up on, and why")
    dl.add_argument("--queue", default="test")
    dl.add_argument("--all-users", action="store_true")

    s = sub.add_parser("status", help="a job's record and history")
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", metavar="FILE",
                   help="write the job's CPU%% and memory samples as an SVG image to FILE")

    lg = sub.add_parser("logs", help="what a job wrote to stdout and stderr")
    lg.add_argument("--raw", action="store_true",
                    help="write the output's bytes as they are, escape sequences too (on a "
                         "terminal, control characters are shown escaped)")
    lg.add_argument("job_id")

    c = sub.add_parser("cancel", help="cancel a pending job, or kill a running one")
    c.add_argument("job_id")

    pr = sub.add_parser("prune", help="remove finished jobs older than an age: their records,"
                                      " results, output, history and dead letters")
    pr.add_argument("--older-than", required=True, metavar="AGE",
                    help="jobs that finished (completed, failed or cancelled) more than AGE ago:"
                         " a number and s, m, h, d or w (30d, 12h, 90m)")
    pr.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    pr.add_argument("--all-users", action="store_true",
                    help="everyone's jobs, not only the caller's (admins)")

    sub.add_parser("demo", help="a short end-to-end demonstration on the embedded enclave")
    from .aws_cli import add_parsers as add_aws_parsers

    add_aws_parsers(sub)
    from .security.audit_cli import add_parsers as add_audit_parsers

    add_audit_parsers(sub)
    from .security.commands import add_parsers as add_security_parsers

    add_security_parsers(sub)
    return p


def _taking(common: argparse.ArgumentParser, sub):
    """``sub`` (the subparsers of a command), whose commands take the options of ``common``
    (``--enclave``) after their name, and so do the commands nested in them: ``kotta user
    list --enclave E`` as well as ``kotta jobs --enclave E``."""
    add = sub.add_parser

    def add_parser(name, **kw):
        parser = add(name, parents=[common], **kw)
        add_subparsers = parser.add_subparsers
        parser.add_subparsers = lambda **kw2: _taking(common, add_subparsers(**kw2))
        return parser

    sub.add_parser = add_parser
    return sub


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", default="test", help="test or production (default test)")
    p.add_argument("--workers", type=int, default=config.cpu_count(),
                   help="worker processes (at least 1; default: the CPUs it may run on)")
    p.add_argument("--visibility-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a received task stays invisible (0.5 or more; default 30);"
                        " extended while it runs")
    p.add_argument("--max-deliveries", type=int, default=config.MAX_DELIVERIES, metavar="N",
                   help="deliveries after which a task is dead-lettered (at least 1; default 5)")
    p.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS",
                   help="seconds between polls when no doorbell rings (0 or more: under 0.01,"
                        " 0.01; default 0.5)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds running tasks get to finish after SIGTERM (0 or more;"
                        " default 30)")
    p.add_argument("--sample-interval", type=float, default=120.0, metavar="SECONDS",
                   help="seconds between CPU/memory samples of a running task (at least 1;"
                        " 0: none; default 120)")
    p.add_argument("--memory-limit", type=int, metavar="MB",
                   help="kill a task whose process tree uses more memory (PSS) than this"
                        " (default: the queue's limit from $KOTTA_HOME/queues.json or the"
                        " built-in table)")
    p.add_argument("--max-walltime", type=float, metavar="MINUTES",
                   help="refuse tasks asking for a longer walltime (default: the queue's cap)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="tasks per worker the node holds beyond those its workers can start"
                        " soon, whatever their length (0 or more; default 0: the rest wait in"
                        " the queue for any node's free worker)")


def _escape_what_the_terminal_cannot_show() -> None:
    """Characters that stdout's encoding cannot show (a task's output or a reason, under
    ``LANG=C`` with ``PYTHONUTF8=0``, a Latin-1 locale, ``PYTHONIOENCODING=ascii``) come
    out escaped (``\\xe9``), as Python's stderr shows them.  They made the command fail,
    ``kotta logs`` half-way: ``kotta: error: 'ascii' codec can't encode character``."""
    stream = sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    with contextlib.suppress(AttributeError, LookupError, ValueError):
        if codecs.lookup(encoding).name != "utf-8":
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _escape_what_the_terminal_cannot_show()
    try:
        return COMMANDS[args.command](args)
    except (KottaError, ValueError) as exc:
        print(f"kotta: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kotta jobs | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a full disk under `kotta jobs > FILE`, say: named, not a traceback
        with contextlib.suppress(OSError, ValueError):  # (and no second one as Python exits,
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # flushing it)
        print(f"kotta: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:  # a damaged, full or long-locked kotta.db, named
        print(f"kotta: error: {exc}", file=sys.stderr)  # by the backend
        return 1
    except Exception as exc:  # an AWS error botocore's retries did not cure (an endpoint
        # that cannot be reached, AccessDenied): named in one line, not a traceback.
        # (botocore is imported by then if the error is one of its own)
        aws = sys.modules.get("botocore.exceptions")
        if aws is None or not isinstance(exc, (aws.BotoCoreError, aws.ClientError)):
            raise
        print(f"kotta: error: {exc}", file=sys.stderr)
        return 1


def _enclave(args, *, existing: bool = False) -> Enclave:
    """The enclave of ``--enclave`` (else $KOTTA_ENCLAVE, else $KOTTA_HOME).  ``existing``:
    for commands that look at what is there, a named enclave that does not exist is an
    error (a mistyped path), not a new empty one (``open_enclave(must_exist=)``)."""
    return open_enclave(args.enclave, must_exist=existing)


# --------------------------------------------------------------------------- nodes


def _check_node_options(args) -> None:
    """The options of a node, for `kotta node` and for the nodes `kotta up` starts (its
    --nodes and --cooldown too), checked before anything is opened or started: a node
    that `kotta up` started with a bad option would die in the background, or worse, run
    (--max-deliveries 0 fails every task it receives).  Each error names its option."""
    def number(name: str, low: float, *, above: bool = False, what: str = "seconds") -> None:
        value = getattr(args, name)
        if not (low < value if above else low <= value) or not math.isfinite(value):
            option = "--" + name.replace("_", "-")
            bound = f"more than {low:g}" if above else f"{low:g} or more"
            raise ValueError(f"{option} must be a number of {what}, {bound}")

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.max_deliveries < 1:
        raise ValueError("--max-deliveries must be at least 1")
    if args.prefetch < 0:
        raise ValueError("--prefetch must be 0 or more")
    if getattr(args, "max_jobs", None) is not None and args.max_jobs < 1:
        raise ValueError("--max-jobs must be at least 1")
    if getattr(args, "nodes", 1) < 1:
        raise ValueError("--nodes must be at least 1")
    # A node extends the visibility of what it holds every third of it, but no more often
    # than every 0.2 s (its upkeep): under that, a held task's visibility ran out before
    # its first extension, and another node of the queue ran it again, while the first
    # still ran it (--visibility-timeout 0.1: 15 runs of 12 tasks on two nodes)
    number("visibility_timeout", VISIBILITY_TIMEOUT_MIN)
    number("poll_interval", 0)
    number("drain_timeout", 0)
    if hasattr(args, "cooldown"):
        number("cooldown", 0)
    if not (args.sample_interval == 0 or 1 <= args.sample_interval < math.inf):
        raise ValueError("--sample-interval must be at least 1 second (or 0: no samples)")
    if args.memory_limit is not None and args.memory_limit < 1:
        raise ValueError("--memory-limit must be at least 1 MB")
    # (in seconds too: 1e307 minutes are an infinite number of seconds)
    if args.max_walltime is not None and not 0 < args.max_walltime * 60.0 < math.inf:
        raise ValueError("--max-walltime must be a positive number of minutes")
    level = getattr(args, "log_level", None)  # (logging's own error named no option)
    if level is not None and not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError("--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                         f"not {level!r}")


#: the shortest --visibility-timeout of `kotta node` and `kotta up`, in seconds
VISIBILITY_TIMEOUT_MIN = 0.5


#: the signals that stop a node, blocked while it starts (node/__main__.py)
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


def cmd_node(args) -> int:
    from node.daemon import Node, NodeConfig
    from node.pool import become_subreaper

    _check_node_options(args)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    cfg = NodeConfig(
        queue=config.normalize_queue(args.queue),
        workers=args.workers,
        visibility_timeout=args.visibility_timeout,
        max_deliveries=args.max_deliveries,
        poll_interval=args.poll_interval,
        drain_timeout=args.drain_timeout,
        burst=args.burst,
        max_jobs=args.max_jobs,
        parent_pid=args.parent_pid,
        managed_by=args.managed_by,
        leave_fd=args.leave_fd,
        node_id=args.node_id,
        prespawn_owner=args.prespawn,
        sample_interval=args.sample_interval,
        memory_limit=args.memory_limit,
        max_walltime=None if args.max_walltime is None else args.max_walltime * 60.0,
        prefetch=args.prefetch,
    )
    fresh = is_new(args.enclave)  # (a named one: ~/.kotta is made on a fresh machine)
    enclave = _enclave(args)
    if fresh:  # a mistyped --enclave served, for good, an enclave no client used
        logging.getLogger("kotta.node").warning(
            "there was no enclave at %s: this node made a new, empty one there, and serves "
            "it (a mistyped --enclave or $KOTTA_ENCLAVE?)", enclave.url)
    node = Node(enclave, cfg)
    # the processes dead workers' tasks left in sessions of their own come to the node,
    # which ends them (node.pool.Orphans)
    node.adopts_orphans = become_subreaper()
    if not node.adopts_orphans:
        logging.getLogger("kotta.node").warning(
            "this node cannot be a subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux only): a "
            "daemon a task starts, or its child in a session of its own, may outlive the "
            "task's walltime, kill() or worker"
        )
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    # A hang-up (the terminal or ssh session of a `kotta node` in the foreground closed)
    # stops it as SIGTERM does: it finishes what runs and hands back the rest.  By default
    # it died at once, its running tasks with it, to run again elsewhere only once their
    # visibility ran out.  Unless SIGHUP is ignored (nohup): then it goes on.
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, node.request_stop)
    # its executor's stop (at shutdown): as SIGTERM, but the running tasks of other
    # clients that used the node finish (Node.request_leave)
    signal.signal(signal.SIGUSR1, node.request_leave)
    # SIGCHLD ignored, as a process that started the client or this command may leave it
    # (exec keeps it so): the kernel then reaps the workers itself, and the node read 0 for
    # every exit status: a worker's death said "exit code 0", a stopped worker's 75 was
    # lost, and its tasks' subprocesses all exited 0
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # stop requests that came while Python imported the node waited (node/__main__.py)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        return node.run()
    finally:
        enclave.close()  # sends what a backend batches (AWS deletes and replies)


def cmd_up(args) -> int:
    _check_node_options(args)  # (of the nodes it starts itself, or its scaler does)
    # (the queue and pool size too, before the enclave is opened: a mistyped path got a new
    # empty enclave, and a logs directory, for an option then refused)
    queue = config.normalize_queue(args.queue)
    if args.min_nodes is not None or args.max_nodes is not None:
        _pool_bounds(args)
    enclave = _enclave(args)
    logs = Path(getattr(enclave, "home", config.kotta_home())) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.min_nodes is not None or args.max_nodes is not None:
        return _up_elastic(args, enclave, queue, logs)
    before = {n.node_id for n in enclave.nodes.live()}
    procs = []
    for _i in range(args.nodes):
        node_id = os.urandom(6).hex()
        log = open(logs / f"node-{node_id}.log", "ab")
        cmd = [sys.executable, "-m", "node", *_up_node_args(args, enclave, queue),
               "--node-id", node_id]
        procs.append((node_id, subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env=_node_env(),
        )))
        log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = {n.node_id for n in enclave.nodes.live()} - before
        if all(nid in live for nid, _ in procs):
            break
        if any(p.poll() is not None for _, p in procs):
            break
        time.sleep(0.05)
    ok = True
    registered = {n.node_id: n for n in enclave.nodes.live()}
    for node_id, p in procs:
        if p.poll() is None:
            # as registered: a queue's limit may have lowered the workers asked for
            n = registered.get(node_id)
            workers = n.workers if n is not None else args.workers
            print(f"node {node_id} up: pid {p.pid}, queue {queue}, {workers} workers "
                  f"(log: {logs / f'node-{node_id}.log'})")
        else:
            ok = False
            print(f"node {node_id} failed to start (exit {p.returncode}); see {logs / f'node-{node_id}.log'}",
                  file=sys.stderr)
    return 0 if ok else 1


def _node_env() -> dict[str, str]:
    """The environment of the nodes (and scaler) ``kotta up`` starts: this one, with a
    relative $KOTTA_HOME made absolute, as an executor's own node gets it.  Relative, a
    task that changed directory (a data task runs in its staging directory) and used
    kotta there took it against that directory: another enclave."""
    env = dict(os.environ)
    if env.get("KOTTA_HOME"):
        env["KOTTA_HOME"] = str(config.kotta_home())
    if env.get("KOTTA_ENCLAVE"):  # (the same for a relative one)
        env["KOTTA_ENCLAVE"] = env_spec()
    return env


def _up_node_args(args, enclave: Enclave, queue: str) -> list[str]:
    """The arguments of ``python -m node`` for the nodes of ``kotta up`` (but --node-id)."""
    return [
        "--enclave", enclave.url, "--queue", queue, "--workers", str(args.workers),
        "--visibility-timeout", str(args.visibility_timeout),
        "--max-deliveries", str(args.max_deliveries),
        "--poll-interval", str(args.poll_interval),
        "--drain-timeout", str(args.drain_timeout),
        "--sample-interval", str(args.sample_interval),
        "--prefetch", str(args.prefetch),
        *(["--memory-limit", str(args.memory_limit)] if args.memory_limit is not None else []),
        *(["--max-walltime", str(args.max_walltime)] if args.max_walltime is not None else []),
        "--prespawn", config.current_user(),
    ]


def _pool_bounds(args) -> tuple[int, int]:
    """The nodes ``kotta up --min N --max M`` keeps, at least and at most."""
    lo = args.min_nodes if args.min_nodes is not None else min(1, args.max_nodes)
    hi = args.max_nodes if args.max_nodes is not None else lo
    if lo < 0 or hi < 1 or hi < lo:
        raise ValueError("need 0 <= --min <= --max and --max >= 1")
    return lo, hi


def _up_elastic(args, enclave: Enclave, queue: str, logs: Path) -> int:
    """``kotta up --min N --max M``: start the scaler of ``queue`` (node/scaler.py) detached;
    it keeps N..M nodes.  Its pid goes to ``scaler-QUEUE.pid`` for ``kotta down``."""
    from node.scaler import NODES_FAILED, pid_file, read_pid, write_pid

    lo, hi = _pool_bounds(args)
    # the workers its nodes run: no more than the queue allows (they cap --workers so, with
    # a warning), for the tasks a node takes before the pool grows, and for what is said
    try:
        workers = min(args.workers, config.queue_limits(queue).workers)
    except KottaError:  # an invalid queues.json: the nodes, which read it too, fail to
        workers = args.workers  # start, and that is said (NODES_FAILED)
    home = Path(getattr(enclave, "home", config.kotta_home()))
    pidf = pid_file(home, queue)
    # Held from the look at the pid file to its write: two `kotta up` at once would both
    # find no scaler, and the pid file keep only one, which `kotta down` then stops.
    with open(home / f"scaler-{queue}.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = read_pid(pidf)
        if running is not None:
            raise ValueError(f"a scaler for queue {queue} is already running (pid {running});"
                             " `kotta down` stops it")
        before = {n.node_id for n in enclave.nodes.live(queue)}
        log_path = logs / f"scaler-{queue}.log"
        cmd = [sys.executable, "-m", "node.scaler", "--enclave", enclave.url, "--queue", queue,
               "--min", str(lo), "--max", str(hi), "--per-node", str(2 * workers),
               "--cooldown", str(args.cooldown), "--logs", str(logs),
               "--", *_up_node_args(args, enclave, queue)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, env=_node_env())
        write_pid(pidf, proc.pid, enclave.url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if len({n.node_id for n in enclave.nodes.live(queue)} - before) >= lo:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pidf.unlink(missing_ok=True)
        if proc.returncode == NODES_FAILED:  # the scaler ran; its nodes could not start
            print(f"the nodes the scaler started failed to start; see their logs, "
                  f"{logs}/node-*.log (the scaler gave up: {log_path})", file=sys.stderr)
        else:
            print(f"the scaler failed to start (exit {proc.returncode}); see {log_path}",
                  file=sys.stderr)
        return 1
    print(f"scaler up: pid {proc.pid}, queue {queue}, {lo} to {hi} nodes of {workers}"
          f" workers, cooldown {args.cooldown:g} s (log: {log_path})")
    for n in enclave.nodes.live(queue):
        if n.node_id not in before:
            print(f"node {n.node_id} up: pid {n.pid}, queue {queue}, {n.workers} workers "
                  f"(log: {logs / f'node-{n.node_id}.log'})")
    return 0


#: seconds kotta down gives nodes to stop, at least, after the scalers' wait (within
#: --timeout): a wedged scaler may use all of that
NODES_GRACE = 2.0


def cmd_down(args) -> int:
    if not args.timeout >= 0:  # (NaN too: no deadline would ever pass, -1 none could)
        raise ValueError("--timeout must be a number of seconds, 0 or more")
    enclave = _enclave(args, existing=True)
    queue = config.normalize_queue(args.queue) if args.queue else None
    # one deadline for the whole stop: the scalers' wait and the nodes' share --timeout
    deadline = time.monotonic() + args.timeout
    from node.scaler import stop_scalers  # first, so that no scaler starts nodes meanwhile

    home = getattr(enclave, "home", config.kotta_home())
    for q, pid, stopped in stop_scalers(home, queue, args.timeout):
        print(f"scaler of queue {q} (pid {pid}) {'stopped' if stopped else 'still stopping'}")
    host = socket.gethostname()
    nodes, elsewhere = enclave.nodes.here(queue)  # pids are per machine and namespace
    for n in elsewhere:  # (its pid here is another process: never signalled)
        print(f"node {n.node_id} (queue {n.queue}) runs on {host} in another PID namespace "
              "(a container?): stop it there")
    refused = []
    for n in nodes:
        try:
            os.kill(n.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:  # another OS user's (a service's): said, and the nodes
            # after it are stopped still (it ended the command, naming no node)
            refused.append(n)
    for n in refused:
        import pwd

        try:
            user = pwd.getpwuid(os.stat(f"/proc/{n.pid}").st_uid).pw_name
            who, as_who = user, user
        except (OSError, KeyError):  # (not Linux, a /proc hidden from us, a uid unnamed)
            who, as_who = "another user", "that user"
        print(f"node {n.node_id} (pid {n.pid}, queue {n.queue}) runs as {who}: this user "
              f"may not signal it; stop it as {as_who}")
    signalled = [n for n in nodes if n not in refused]
    remaining = {n.node_id for n in signalled}
    # the nodes get a little time whatever the scalers took (a wedged one takes it all),
    # and are looked at at least once: else one that stopped at once is "still stopping"
    deadline = max(deadline, time.monotonic() + min(args.timeout, NODES_GRACE))
    while remaining:
        remaining &= {n.node_id for n in enclave.nodes.here(queue)[0]}
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for n in signalled:
        state = "still stopping" if n.node_id in remaining else "stopped"
        print(f"node {n.node_id} (pid {n.pid}, queue {n.queue}) {state}")
    if not nodes and not elsewhere:
        of = f"of the {queue} queue " if queue else ""  # (another queue's may be running)
        # (which enclave: with its --enclave forgotten, another's nodes run on)
        print(f"no nodes {of}of this enclave are running on {host} (the enclave {enclave.url})")
    return 1 if remaining or refused else 0


# --------------------------------------------------------------------------- jobs


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _creds(enclave: Enclave, doing: str):
    """The caller's credentials, if the enclave still honours them (``Credentials.check``:
    not a disabled user's, nor a revoked token's, whatever their cached claims say)."""
    from .security import credentials

    return credentials.load(enclave).check(doing)


#: the most jobs `kotta jobs --limit` lists
JOBS_LIMIT_MAX = 100_000


def cmd_jobs(args) -> int:
    if not 0 <= args.limit <= JOBS_LIMIT_MAX:
        raise ValueError(f"--limit must be between 0 and {JOBS_LIMIT_MAX}, not {args.limit}")
    enclave = _enclave(args, existing=True)
    creds = _creds(enclave, "kotta jobs")
    if args.all_users and not creds.admin:
        from .security.access import deny

        deny(enclave, creds, None, "list the jobs of all users")
    owner = None if args.all_users else creds.user
    rows = enclave.jobs.list(owner=owner, state=args.state, limit=args.limit)
    # everyone's jobs say whose each is (one's own need not)
    def owner_col(name: str) -> str:
        return f"{name:16}  " if args.all_users else ""

    print(f"{'JOB':32}  {'STATE':15}  {'QUEUE':10}  {'CREATED':19}  {owner_col('OWNER')}FUNCTION")
    for j in rows:
        print(f"{j.job_id:32}  {j.state:15}  {j.queue:10}  {_fmt_time(j.created):19}  "
              f"{owner_col(_printable(j.owner))}{_printable(j.fn)}")
    return 0


def cmd_dead_letters(args) -> int:
    """The dead letters of a queue (listed, not consumed): the caller's own jobs, or with
    ``--all-users`` (admins) everyone's, and a dead letter whose job is unknown."""
    enclave = _enclave(args, existing=True)
    creds = _creds(enclave, "kotta dead-letters")
    if args.all_users and not creds.admin:
        from .security.access import deny

        deny(enclave, creds, None, "list the dead letters of all users")
    queue = config.normalize_queue(args.queue)
    letters = enclave.queue.dead_letters(queue)
    owners = {j: r.owner for j, r in enclave.jobs.get_many(
        list({d["job_id"] for d in letters if d["job_id"]})).items()}
    if not args.all_users:
        letters = [d for d in letters if owners.get(d["job_id"]) == creds.user]
    print(f"{'JOB':32}  {'DELIVERIES':10}  {'DEAD SINCE':19}  REASON")
    for d in letters:
        job = _printable(d["job_id"]) if d["job_id"] not in ("", "-") else "(no job)"
        reason = _printable(d["reason"])
        if len(reason) > DEAD_REASON_CHARS:
            reason = reason[: DEAD_REASON_CHARS - 1] + "…"
        print(f"{job:32}  {d['receive_count']:<10}  {_fmt_time(d['dead_at']):19}  {reason}")
    return 0


#: a dead letter's reason is cut to this many characters in the listing (`kotta status`
#: of its job has it whole)
DEAD_REASON_CHARS = 300


def _printable(text: object) -> str:
    """Text other users wrote (a job's function name, why it failed, its history, a dead
    letter's reason), safe for a terminal on one line: runs of white space (line breaks
    too) become one space, other control characters (escape sequences) show as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(str(text).split()))


def _own_job(enclave: Enclave, job_id: str, doing: str, *, with_result: bool = False,
             verb: str = "see"):
    if not wire.is_job_id(job_id):  # (as attach(): no job has such an id, and a backend
        # may fail on it: SQLite on a non-UTF-8 argument, DynamoDB on an empty key)
        raise UnknownJob(f"{job_id!r} is not a job id (32 lowercase hex digits, as "
                         "`kotta jobs` lists them)")
    creds = _creds(enclave, doing)  # first: a refused token learns nothing of the job
    job = enclave.jobs.get(job_id, with_result=with_result)
    if job is None:
        raise UnknownJob(f"no job {job_id} in {enclave.url} (never recorded there, or "
                         "removed by kotta prune)")
    from .security.access import check_job_access

    check_job_access(enclave, creds, job, verb)
    return job


def cmd_status(args) -> int:
    enclave = _enclave(args, existing=True)
    job = _own_job(enclave, args.job_id, "kotta status")
    history = enclave.jobs.history(job.job_id)
    if args.plot:
        from .usage_plot import svg

        samples = (job.usage or {}).get("samples") or []
        try:
            Path(args.plot).write_text(svg(samples, f"job {job.job_id} ({_printable(job.fn)})"))
        except OSError as exc:
            message = f"cannot write the plot to {args.plot}: {exc.strerror}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
                raise OSError(message) from None  # the system's fault, not the path's: exit 1
            raise ValueError(message) from None
        print(f"wrote {len(samples)} sample{'s' if len(samples) != 1 else ''} to {args.plot}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({**job.as_dict(), "history": history}, indent=2))
        return 0
    print(f"job       {job.job_id}")
    print(f"function  {_printable(job.fn)} ({job.n} call{'s' if job.n != 1 else ''})")
    print(f"state     {job.state}" + (f"  ({_printable(job.reason)})" if job.reason else ""))
    print(f"owner     {job.owner}   queue {job.queue}   walltime {job.walltime / 60:g} min")
    print(f"node      {job.node or '-'}   attempts {job.attempts}")
    if job.usage:
        _print_usage(job.usage)
    print("history")
    for ts, state, detail in history:
        print(f"  {_fmt_time(ts)}  {state:15} {_printable(detail or '')}")
    return 0


def _print_usage(u: dict) -> None:
    peak = u.get("peak_rss_kb", u.get("maxrss_kb"))
    parts = []
    if "wall" in u:
        parts.append(f"wall {u['wall']:.3f} s")
    if "cpu" in u:
        parts.append(f"cpu {u['cpu']:.3f} s")
    if peak is not None:
        parts.append(f"peak rss {peak / 1024:.1f} MiB")
    if "start" in u:
        parts.append(f"start {_fmt_time(u['start'])}   end {_fmt_time(u.get('end'))}")
    print("usage     " + ("   ".join(parts) or "(running)"))
    samples = u.get("samples") or []
    if samples:
        print(f"samples   {len(samples)}")
        print(f"  {'TIME':19}  {'CPU %':>7}  {'RSS MiB':>9}  PROCS")
        for s in samples:
            print(f"  {_fmt_time(s.get('t')):19}  {s.get('cpu_pct', 0):7.1f}  "
                  f"{s.get('rss_kb', 0) / 1024:9.1f}  {s.get('procs', '')}")


def cmd_logs(args) -> int:
    enclave = _enclave(args, existing=True)
    job = _own_job(enclave, args.job_id, "kotta logs", with_result=True)
    env = None if job.result is None else wire.decode(job.result)
    # (a result without output of a job no node started: its client failed it, as for a
    # dependency that failed; or of one a node started but failed before its task ran,
    # refused its inputs, say: it never got to processing; or one a node claimed, to
    # processing, and refused at once (over its walltime cap, its requirements failed):
    # it has no usage, as every job that ran has.  It never ran)
    if env is None or (not {"stdout", "stderr"} & set(env.sections) and (
            job.started is None or job.usage is None or JobState.PROCESSING not in
            {state for _, state, _ in enclave.jobs.history(job.job_id)})):
        if job.state.final:  # (cancelled before it ran, or failed before it could)
            why = f" ({_printable(job.reason)})" if job.reason else ""
            print(f"job {job.job_id} ended {job.state}{why} without output", file=sys.stderr)
        else:
            print(f"job {job.job_id} is {job.state}: no output yet", file=sys.stderr)
        return 1
    if args.raw:  # the bytes the task wrote, whatever they do to a terminal
        for name in ("stdout", "stderr"):
            data = env.sections.get(name, b"")
            print(f"--- {name} ---", flush=True)
            sys.stdout.buffer.write(data if data.endswith(b"\n") or not data else data + b"\n")
            sys.stdout.buffer.flush()
        return 0
    out, err = env.text("stdout"), env.text("stderr")
    if sys.stdout.isatty():
        out, err = _for_terminal(out), _for_terminal(err)
    print("--- stdout ---")
    sys.stdout.write(out if out.endswith("\n") or not out else out + "\n")
    print("--- stderr ---")
    sys.stdout.write(err if err.endswith("\n") or not err else err + "\n")
    return 0


#: a control character, C0 (but newline and tab), DEL or C1; or an SGR sequence (colours,
#: bold), which is kept: it changes how text looks, nothing else of the terminal
_CONTROL_OR_SGR = re.compile(r"(\x1b\[[0-9;:]*m)|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _for_terminal(text: str) -> str:
    """A task's output, safe to show on the viewer's terminal: what it printed is the
    task's choice (another user's, in a shared enclave), and its escape sequences would
    act on the terminal (retitle it, clear it, move the cursor to hide lines, answer a
    query as if typed).  Control characters show escaped (``\\x1b``), colours are kept."""
    return _CONTROL_OR_SGR.sub(lambda m: m.group(1) or f"\\x{ord(m.group()):02x}", text)


def cmd_cancel(args) -> int:
    enclave = _enclave(args, existing=True)
    job = _own_job(enclave, args.job_id, "kotta cancel", verb="cancel or kill")
    def cancelled() -> int:
        # tell the client that submitted it, so its future settles now
        enclave.queue.send(reply_queue(job.client),
                           [Message(job.job_id, wire.pack_replies([(job.job_id, b"")]))])
        enclave.ring_client(job.client)
        print(f"job {job.job_id} cancelled before it started")
        return 0

    if job.state.final:  # said at once, with no write: while another process held the
        # write lock, that waited in silence for a minute and then failed "locked"
        print(f"job {job.job_id} already {job.state}", file=sys.stderr)
        return 1

    def cancel() -> list[str]:
        return enclave.jobs.transition([job.job_id], JobState.CANCELLED,
                                       from_states=CANCELLABLE,
                                       reason="cancelled with kotta cancel")

    from .executor import CANCEL_QUIET_WAIT

    try:  # (waiting in silence a second at most, as a future's cancel() does)
        with enclave.atomic(CANCEL_QUIET_WAIT):
            moved = cancel()
    except Exception as exc:  # noqa: BLE001 - not the lock: raised again
        if not enclave.locked(exc):
            raise
        print(f"kotta: waiting for the enclave's write lock: {exc}", file=sys.stderr,
              flush=True)
        moved = cancel()
    if moved:
        return cancelled()
    if enclave.jobs.request_kill(job.job_id):  # (not once its task has run)
        now = enclave.jobs.get(job.job_id)
        if now.state == JobState.CANCELLED and now.reason == KILLED_PENDING:  # pending again
            return cancelled()  # (a stopping node handed its task back: JobTable.request_kill)
        # (not one its node killed as soon as it was flagged: that node tells its client)
        enclave.ring_nodes(job.queue)
        print(f"job {job.job_id} is being killed")
        return 0
    # a refusal, exit 1: on stderr, as `kotta logs` says a job has no output yet
    now = enclave.jobs.get(job.job_id).state
    if now == JobState.STAGING_OUTPUTS:  # the node uploads its outputs and records it
        print(f"job {job.job_id} has run and is uploading its outputs: too late to kill it",
              file=sys.stderr)
    else:
        print(f"job {job.job_id} already {now}", file=sys.stderr)
    return 1


#: the units of `kotta prune --older-than`, in seconds
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """Seconds of an age such as ``30d``, ``12h`` or ``90m`` (more than 0)."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        seconds = float(number) * AGE_UNITS[unit]
    except (KeyError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf or number.strip() != number or not number[:1].isdigit():
        raise ValueError(f"--older-than must be an age more than 0, a number and s, m, h, d or w"
                         f" (30d, 12h, 90m), not {text!r}")
    return seconds


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_prune(args) -> int:
    age = _age(args.older_than)  # (checked before anything is opened)
    enclave = _enclave(args, existing=True)
    creds = _creds(enclave, "kotta prune")
    if args.all_users and not creds.admin:
        from .security.access import deny

        deny(enclave, creds, None, "prune the jobs of all users")
    from .security.audit import PRUNE, AuditLog

    whose = "all users'" if args.all_users else f"{creds.user}'s"
    what = f"{whose} final jobs that finished more than {args.older_than.strip()} ago"
    before = time.time() - age
    owner = None if args.all_users else creds.user
    try:
        pruned = enclave.jobs.prune(before, owner=owner, dry_run=args.dry_run)
    except BaseException as exc:  # (the jobs removed before it stay removed: audited,
        if not args.dry_run:  # and the error it met is the one said)
            with contextlib.suppress(Exception):
                AuditLog(enclave).append(PRUNE, user=creds.user, detail={
                    "older_than": args.older_than.strip(), "all_users": args.all_users,
                    "before": before, "failed": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    n = len(pruned.jobs)
    size = "" if pruned.bytes is None else f", {_size(pruned.bytes)}"
    if args.dry_run:
        print(f"would remove {n} job{'s' if n != 1 else ''}{size}: {what} (dry run: nothing"
              " removed)")
        return 0
    AuditLog(enclave).append(PRUNE, user=creds.user, detail={
        "older_than": args.older_than.strip(), "all_users": args.all_users, "before": before,
        "jobs": n, "bytes": pruned.bytes})
    print(f"removed {n} job{'s' if n != 1 else ''}{size}: {what}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.enclave)


COMMANDS = {
    "node": cmd_node,
    "up": cmd_up,
    "down": cmd_down,
    "jobs": cmd_jobs,
    "dead-letters": cmd_dead_letters,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "prune": cmd_prune,
    "demo": cmd_demo,
    "aws": lambda args: args.aws_handler(args),
    "audit": lambda args: args.audit_handler(args),
    **{
        name: (lambda args: args.security_handler(args))
        for name in ("register", "whoami", "user", "token", "dataset", "policy")
    },
}

if __name__ == "__main__":
    sys.exit(main())
