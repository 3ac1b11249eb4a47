"""AWS API calls per task of a ``map`` on the AWS backend, client and node together.

Runs moto's ThreadedMotoServer on 127.0.0.1 (never real AWS: fake credentials), bootstraps
an enclave on it, runs a node (``node.daemon.Node``, in a thread; its workers are real
processes) and a ``KottaExecutor`` with ``start_node=False``, each with an
``AwsEnclave`` of its own as if they were on two machines, and counts every API call their
boto3 clients make with botocore's ``before-call`` event (one per API call, whatever
retries it needed; HTTP attempts are counted apart with ``before-send``).

::

    python benchmarks/aws_calls.py                  # map of 1,000 items, chunks as map picks
    python benchmarks/aws_calls.py --chunksize 50   # map with 50 items a task
    python benchmarks/aws_calls.py --submit         # 1,000 submits: one task per item
    python benchmarks/aws_calls.py --items 200 --json calls.json

It prints the calls by side and API, calls per map item and per task (one task is one
message and one job record; ``map`` packs items into tasks), and whether the target
(<= 0.6 calls per map item, i.e. per call of the function) is met.  Per task (job) it
cannot be: recording that a job started and that it finished are two conditional
UpdateItems, one per job.  Counting starts after a warm-up call and stops when the
last result is in; the idle cost of long polling is measured separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 0.6


def noop(x: Any = None) -> Any:
    return x


class Counting:
    """API calls (``before-call``) and HTTP attempts (``before-send``) per side and API."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.attempts: Counter[str] = Counter()
        self.on = False
        self._lock = threading.Lock()

    def attach(self, side: str, enclave) -> None:
        for client in enclave.clients.values():
            client.meta.events.register("before-call", self._call(side))
            client.meta.events.register("before-send", self._send(side))

    def _call(self, side: str):
        def hook(model, **_):
            if self.on:
                with self._lock:
                    self.calls[(side, model.name)] += 1

        return hook

    def _send(self, side: str):
        def hook(**_):
            if self.on:
                with self._lock:
                    self.attempts[side] += 1

        return hook

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.attempts.clear()

    def total(self, side: str | None = None) -> int:
        return sum(n for (s, _), n in self.calls.items() if side is None or s == side)


def run(
    items: int, chunksize: int, workers: int, idle: float, long_poll: float, submit: bool = False
) -> dict:
    from moto.server import ThreadedMotoServer

    from kotta_executor import KottaExecutor
    from kotta_executor.aws_provision import bootstrap
    from kotta_executor.backends.aws import AwsEnclave
    from node.daemon import Node, NodeConfig
    from tests.aws_moto import atomic_moto, fake_aws_env

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with fake_aws_env(), atomic_moto():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        name = f"bench{uuid.uuid4().hex[:6]}"
        counting = Counting()
        try:
            bootstrap(name, endpoint_url=endpoint, iam=False, tls_only=False)
            client_side = AwsEnclave(name, endpoint_url=endpoint)
            node_side = AwsEnclave(name, endpoint_url=endpoint)
            counting.attach("client", client_side)
            counting.attach("node", node_side)
            node = Node(node_side, NodeConfig(queue="test", workers=workers, long_poll=long_poll))
            runner = threading.Thread(target=node.run, name="node", daemon=True)
            runner.start()
            ex = KottaExecutor(workers, enclave=client_side, start_node=False)
            try:
                assert ex.submit(noop, 1).result(120) == 1  # warm-up: workers, queue URLs
                counting.reset()
                counting.on = True
                t0 = time.perf_counter()
                if submit:
                    fs = [ex.submit(noop, i) for i in range(items)]
                    out = [f.result(600) for f in fs]
                    tasks = 1
                else:
                    out = list(ex.map(noop, range(items), chunksize=chunksize, timeout=600))
                    tasks = ex._auto_chunk(items, ex._options) if chunksize == 1 else chunksize
                elapsed = time.perf_counter() - t0
                counting.on = False
                assert out == list(range(items))
                n_tasks = -(-items // tasks)
                busy = {
                    "calls": dict(
                        sorted((f"{s} {op}", n) for (s, op), n in counting.calls.items())
                    ),
                    "client_calls": counting.total("client"),
                    "node_calls": counting.total("node"),
                    "http_attempts": dict(counting.attempts),
                }
                total = counting.total()
                # idle: what long polling costs with nothing to do
                counting.reset()
                counting.on = True
                time.sleep(idle)
                counting.on = False
                idle_calls = dict(sorted((f"{s} {op}", n) for (s, op), n in counting.calls.items()))
                idle_total = counting.total()
            finally:
                ex.shutdown(wait=True)
                node.request_stop()
                runner.join(120)
                client_side.close()
                node_side.close()
        finally:
            server.stop()
    return {
        "how": "submit" if submit else "map",
        "items": items,
        "tasks": n_tasks,
        "items_per_task": tasks,
        "workers": workers,
        "seconds": elapsed,
        "total_calls": total,
        "calls_per_item": total / items,
        "calls_per_task": total / n_tasks,
        **busy,
        "idle_seconds": idle,
        "idle_calls": idle_calls,
        "idle_calls_per_second": idle_total / idle if idle else None,
    }


def report(r: dict) -> str:
    lines = [
        f"{r['how']} of {r['items']} items in {r['tasks']} tasks"
        f" ({r['items_per_task']} items a task), {r['workers']} workers, {r['seconds']:.1f} s on moto (127.0.0.1)",
        "",
        f"{'side':7} {'API':32} calls",
    ]
    for key, n in r["calls"].items():
        side, op = key.split(" ", 1)
        lines.append(f"{side:7} {op:32} {n:6d}")
    lines += [
        f"{'':7} {'total':32} {r['total_calls']:6d}"
        f"   (client {r['client_calls']}, node {r['node_calls']};"
        f" HTTP attempts {sum(r['http_attempts'].values())})",
        "",
        f"calls per map item: {r['calls_per_item']:.3f}   target <= {TARGET}: "
        f"{'met' if r['calls_per_item'] <= TARGET else 'NOT met'}",
        f"calls per task:     {r['calls_per_task']:.3f}   (a task, i.e. a job, needs at least 2"
        " conditional UpdateItems: started, finished)",
    ]
    if r["idle_seconds"]:
        lines.append(
            f"idle (long polling, nothing to do): {r['idle_calls_per_second']:.2f} calls/s "
            f"{r['idle_calls']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument(
        "--chunksize",
        type=int,
        default=1,
        help="as for Executor.map (1: let KottaExecutor pack small items)",
    )
    p.add_argument("--submit", action="store_true", help="submit() each item: a task each")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle polling to count")
    p.add_argument("--long-poll", type=float, default=5.0, help="the node's long-poll wait")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        os.environ["KOTTA_HOME"] = home  # nothing of ~/.kotta is used or touched
        r = run(args.items, args.chunksize, args.workers, args.idle, args.long_poll, args.submit)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
