"""How fast can this architecture carry no-op tasks at best?  A stripped model of the task path.

Issue 2 asks for ``submit()`` throughput of at least 1.5x ProcessPoolExecutor.  This file
asks what the *architecture* allows, apart from kotta's code: it runs the same three kinds of
process doing the same durable steps a task needs, with nothing else:

* a **client**: the calling thread makes a job id, a sorted JSON header, the cloudpickled
  call and its HMAC, and a ``Future``; a sender thread records jobs and queue messages in
  SQLite (WAL, ``synchronous=NORMAL``; one transaction a batch) and rings the node; a
  receiver thread reads result datagrams and resolves the futures;
* a **node**: receives a batch of messages (``UPDATE ... RETURNING``, with a visibility
  timeout and a receipt), moves their jobs to ``processing``, checks each HMAC and header,
  writes the tasks to two workers' pipes in one frame each, reads results, records them
  (``completed``, history, result) and acks the messages in one transaction, and sends the
  client one datagram;
* two **workers**: unpickle and run each call, pickle the outcome, one write a frame.

Left out, and all paid for in kotta: access tokens and their revocation, owners, output
capture, walltime and kill, usage, worker start-up and death, hand-offs, retries on a
locked database, dependencies, cancellation, replay protection, node liveness, audit.  So
its figure is a ceiling: kotta's task path does all of this model's work and more.

    python benchmarks/floor_model.py                 # 10,000 tasks, 3 runs each, alternating
    python benchmarks/floor_model.py --tasks 2000 --repeat 1

It prints, for each run, the model's and ProcessPoolExecutor's rate (tasks/s from the first
``submit()`` to the last result) and the model's CPU per task in each process.
"""

from __future__ import annotations

import argparse
import hmac
import os
import pickle
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor, wait
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path

import cloudpickle
import orjson
import psutil

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)  # python benchmarks/floor_model.py
from benchmarks.tasks import noop  # noqa: E402  (by reference, as in benchmarks/run.py)
from node.worker import pack_frame, unpack_frame  # noqa: E402  (the pipe framing: kotta's)

KEY = b"floor-model-key-".ljust(32, b".")
MAC = 32
ROOM = 320  # tasks a node holds at once (kotta: 160 a worker when pipes are deep)
SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    body BLOB NOT NULL, visible_at REAL NOT NULL, receipt TEXT, holder TEXT);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, history TEXT NOT NULL, result BLOB);
"""
_LEN = struct.Struct(">I")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _envelope(header: dict, payload: bytes) -> bytes:
    head = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    return _LEN.pack(len(head)) + head + payload


def _open(envelope: bytes) -> tuple[dict, bytes]:
    (n,) = _LEN.unpack_from(envelope)
    return orjson.loads(envelope[4 : 4 + n]), envelope[4 + n :]


# ------------------------------------------------------------------------------ worker


def worker(task_fd: int, result_fd: int) -> None:
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    while True:
        try:
            frame = tasks.recv_bytes()
        except EOFError:
            return
        out = []
        for item in unpack_frame(frame):
            header, payload = _open(item)
            fn, args = pickle.loads(payload)
            try:
                outcome = ("ok", fn(*args))
            except BaseException as exc:  # noqa: BLE001 - a model of a worker: report it
                outcome = ("raise", exc)
            out.append(_envelope({"job_id": header["job_id"]}, pickle.dumps(outcome)))
        results.send_bytes(pack_frame(out))


# ------------------------------------------------------------------------------ node


def node(db_path: str, bell_path: str, client_path: str) -> None:
    db = _connect(db_path)
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bell.bind(bell_path)
    reply = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    workers: list[tuple[subprocess.Popen, Connection, Connection]] = []
    load = [0, 0]
    for _ in range(2):
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, __file__, "worker", str(task_r), str(result_w)],
            pass_fds=(task_r, result_w), env=_env(),
        )
        os.close(task_r)
        os.close(result_w)
        workers.append((proc, Connection(task_w, readable=False), Connection(result_r, writable=False)))
    inflight: dict[str, tuple[int, str]] = {}
    while True:
        ready = wait_any([bell, *(w[2] for w in workers)], timeout=0.05)
        if bell in ready:
            try:
                while True:
                    if bell.recv(64, socket.MSG_DONTWAIT) == b"stop":
                        for proc, pipe, _ in workers:
                            pipe.close()
                            proc.wait()
                        return
            except BlockingIOError:
                pass
        done = []
        for i, (_, _, pipe) in enumerate(workers):
            if pipe in ready:
                for item in unpack_frame(pipe.recv_bytes()):
                    job_id = _open(item)[0]["job_id"]
                    done.append((job_id, item, inflight.pop(job_id)))
                    load[i] -= 1
        now = time.time()
        if done:
            event = orjson.dumps([now, "completed", None]).decode() + "\n"
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "UPDATE jobs SET state='completed', updated=?, history=history||?, result=?"
                " WHERE job_id=? AND state='processing'",
                [(now, event, item, job_id) for job_id, item, _ in done],
            )
            db.executemany(
                "DELETE FROM messages WHERE id=? AND receipt=?", [d[2] for d in done]
            )
            db.execute("COMMIT")
            reply.sendto(pack_frame([item for _, item, _ in done]), client_path)
        room = ROOM - len(inflight)
        if room <= 0:
            continue
        token = uuid.uuid4().hex[:12]
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute(
            "UPDATE messages SET visible_at=?, receipt=id||':'||?, holder='node' WHERE id IN"
            " (SELECT id FROM messages WHERE visible_at<=? ORDER BY id LIMIT ?)"
            " RETURNING id, job_id, body, receipt",
            (now + 30, token, now, room),
        ).fetchall()
        if rows:
            event = orjson.dumps([now, "processing", "node"]).decode() + "\n"
            ids = [r[1] for r in rows]
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                db.execute(
                    "UPDATE jobs SET state='processing', updated=?, history=history||?"
                    f" WHERE job_id IN ({','.join('?' * len(part))}) AND state='pending'",
                    [now, event, *part],
                )
        db.execute("COMMIT")
        frames: list[list[bytes]] = [[], []]
        for msg_id, job_id, body, receipt in sorted(rows):
            if not hmac.compare_digest(hmac.digest(KEY, body[:-MAC], "sha256"), body[-MAC:]):
                raise SystemExit(f"job {job_id}: bad signature")
            if _open(body[:-MAC])[0]["job_id"] != job_id:
                raise SystemExit(f"job {job_id}: the message is not its task")
            inflight[job_id] = (msg_id, receipt)
            i = 0 if load[0] <= load[1] else 1
            load[i] += 1
            frames[i].append(body[:-MAC])
        for (_, pipe, _), items in zip(workers, frames, strict=True):
            if items:
                pipe.send_bytes(pack_frame(items))


# ------------------------------------------------------------------------------ client


class ModelClient:
    def __init__(self, directory: str):
        self.db_path = os.path.join(directory, "enclave.db")
        self.bell_path = os.path.join(directory, "node.bell")
        self.inbox_path = os.path.join(directory, "client.inbox")
        self.db = _connect(self.db_path)
        self.db.executescript(SCHEMA)
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.inbox_path)
        self.inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.futures: dict[str, Future] = {}
        self.outbox: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.kick = threading.Event()
        self.node = subprocess.Popen(
            [sys.executable, __file__, "node", self.db_path, self.bell_path, self.inbox_path],
            env=_env(),
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(self.bell_path):
            if self.node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the model's node did not start")
            time.sleep(0.01)
        threading.Thread(target=self._sender, daemon=True).start()
        threading.Thread(target=self._receiver, daemon=True).start()

    def submit(self, fn, *args) -> Future:
        job_id = uuid.uuid4().hex
        header = {"job_id": job_id, "owner": "me", "fn": fn.__qualname__, "walltime": 300.0,
                  "n": 1, "client": "model", "kind": "task", "queue": "test"}
        body = _envelope(header, cloudpickle.dumps((fn, args)))
        body += hmac.digest(KEY, body, "sha256")
        future: Future = Future()
        self.futures[job_id] = future
        with self.lock:
            first = not self.outbox
            self.outbox.append((job_id, body))
        if first:
            self.kick.set()
        return future

    def _sender(self) -> None:
        while True:
            self.kick.wait()
            time.sleep(0.002)  # let a burst gather: one transaction for many jobs
            self.kick.clear()
            with self.lock:
                batch, self.outbox = self.outbox, []
            if not batch:
                continue
            now = time.time()
            event = orjson.dumps([now, "pending", None]).decode() + "\n"
            self.db.execute("BEGIN IMMEDIATE")
            # multi-row statements, as kotta's _insert_rows: executemany releases the GIL
            # at every row, and the submitting thread then keeps this one waiting
            for i in range(0, len(batch), 500):
                part = batch[i : i + 500]
                self.db.execute(
                    "INSERT INTO jobs(job_id, owner, state, created, updated, history) VALUES "
                    + ",".join(["(?,'me','pending',?,?,?)"] * len(part)),
                    [v for job_id, _ in part for v in (job_id, now, now, event)],
                )
                self.db.execute(
                    "INSERT INTO messages(job_id, body, visible_at) VALUES "
                    + ",".join(["(?,?,?)"] * len(part)),
                    [v for job_id, body in part for v in (job_id, body, now)],
                )
            self.db.execute("COMMIT")
            self.bell.sendto(b"ring", self.bell_path)

    def _receiver(self) -> None:
        while True:
            for item in unpack_frame(self.inbox.recv(8 << 20)):
                header, payload = _open(item)
                kind, value = pickle.loads(payload)
                future = self.futures.pop(header["job_id"])
                if kind == "ok":
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def close(self) -> None:
        self.bell.sendto(b"stop", self.bell_path)
        self.node.wait(timeout=60)
        self.inbox.close()
        self.db.close()


# ------------------------------------------------------------------------------ harness


def _burst(submit, n: int) -> float:
    """Tasks a second from the first submit to the last result (after a warm-up)."""
    wait([submit(noop, i) for i in range(200)])
    start = time.perf_counter()
    futures = [submit(noop, i) for i in range(n)]
    wait(futures)
    elapsed = time.perf_counter() - start
    if [f.result() for f in futures] != list(range(n)):
        raise AssertionError("wrong results")
    return n / elapsed


def run_model(n: int) -> tuple[float, dict[str, float]]:
    """The model's rate, and its CPU per task (us) by process."""
    with tempfile.TemporaryDirectory() as directory:
        client = ModelClient(directory)
        try:
            wait([client.submit(noop, i) for i in range(50)])
            me = psutil.Process()
            procs = {"client": me, "node": psutil.Process(client.node.pid)}
            for i, child in enumerate(procs["node"].children()):
                procs[f"worker {i + 1}"] = child
            before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
            rate = _burst(client.submit, n)
            cpu = {k: (sum(p.cpu_times()[:2]) - before[k]) / (n + 200) * 1e6
                   for k, p in procs.items()}
        finally:
            client.close()
    return rate, cpu


def run_ppe(n: int) -> float:
    with ProcessPoolExecutor(2) as ex:
        wait([ex.submit(noop, i) for i in range(50)])
        return _burst(ex.submit, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.tasks:,} no-op tasks, 2 workers")
    ratios = []
    for i in range(args.repeat):
        if i % 2:  # take turns to go first
            model, cpu = run_model(args.tasks)
            ppe = run_ppe(args.tasks)
        else:
            ppe = run_ppe(args.tasks)
            model, cpu = run_model(args.tasks)
        ratios.append(model / ppe)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
        print(f"run {i + 1}: model {model:,.0f}/s, ppe {ppe:,.0f}/s, ratio {model / ppe:.2f}"
              f"  (model CPU us a task: {parts})")
    print(f"median ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "node":
        node(*sys.argv[2:5])
    else:
        sys.exit(main())
