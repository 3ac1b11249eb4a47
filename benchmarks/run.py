"""Benchmarks: KottaExecutor (embedded enclave) against ProcessPoolExecutor, same workers.

Run ``python benchmarks/run.py`` or ``python -m benchmarks.run``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

# The work lives in benchmarks/tasks.py, an importable module, so that both executors send
# functions by reference (from __main__ kotta pickles them by value, as it does notebook
# functions, while ProcessPoolExecutor's forked workers find them by reference).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # python benchmarks/run.py
from benchmarks.tasks import busy, noop, sleeper  # noqa: E402

KINDS = ("kotta", "ppe")
Result = dict[str, float]
Bench = Callable[[Executor, str, int, int], Result]

# -- executors -------------------------------------------------------------------------------


@contextmanager
def open_executor(kind: str, workers: int) -> Iterator[Executor]:
    """A fresh executor (Kotta: in a fresh temporary enclave), warmed up before use."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    ex: Executor
    if kind == "ppe":
        ex = ProcessPoolExecutor(max_workers=workers)
    else:
        from kotta_executor import KottaExecutor

        tmp = tempfile.TemporaryDirectory(prefix="kotta-bench-", ignore_cleanup_errors=True)
        ex = KottaExecutor(max_workers=workers, enclave=tmp.name)
    try:
        for f in [ex.submit(noop, i) for i in range(4 * workers)]:
            f.result(timeout=120)
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        if tmp is not None:
            tmp.cleanup()


# -- benchmarks: each gets a warmed-up executor and a size divisor (10 with --quick) ---------


def bench_roundtrip(ex: Executor, kind: str, workers: int, scale: int) -> Result:
    n = 500 // scale
    for _ in range(50):
        ex.submit(noop).result()
    times: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        ex.submit(noop).result()
        times.append((time.perf_counter() - start) * 1e3)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[8]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "calls": n}


def _cpu_seconds(procs: list[psutil.Process]) -> list[float]:
    """User plus system CPU of each process so far (0 for one that has gone)."""
    out = []
    for p in procs:
        try:
            t = p.cpu_times()
            out.append(t.user + t.system)
        except psutil.Error:
            out.append(0.0)
    return out


def bench_submit(ex: Executor, kind: str, workers: int, scale: int) -> Result:
    n = 10_000 // scale
    # CPU a task, per process: this one (the client), and its children (kotta: the node
    # and its workers; ProcessPoolExecutor: its workers), started by the warm-up
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    # kotta's node: the client's own child (its workers are the node's); one process, so
    # its CPU a task bounds the rate on any number of cores (1e6 / us tasks a second)
    nodes = me.children() if kind == "kotta" else []
    before = _cpu_seconds(procs)
    start = time.perf_counter()
    futures = [ex.submit(noop, i) for i in range(n)]
    wait(futures)
    elapsed = time.perf_counter() - start
    used = [b - a for a, b in zip(before, _cpu_seconds(procs), strict=True)]
    if [f.result() for f in futures] != list(range(n)):
        raise AssertionError("submit: wrong results")
    out = {
        "tasks_per_s": n / elapsed, "seconds": elapsed, "tasks": n,
        "cpu_us_per_task": sum(used) / n * 1e6,
        "client_cpu_us_per_task": used[0] / n * 1e6,
        "others_cpu_us_per_task": sum(used[1:]) / n * 1e6,
    }
    if nodes:
        out["node_cpu_us_per_task"] = sum(
            u for p, u in zip(procs, used, strict=True) if p in nodes) / n * 1e6
    return out


def bench_map(ex: Executor, kind: str, workers: int, scale: int) -> Result:
    n = 20_000 // scale
    start = time.perf_counter()
    out = list(ex.map(noop, range(n), chunksize=1))
    elapsed = time.perf_counter() - start
    if out != list(range(n)):
        raise AssertionError("map: wrong results")
    return {"items_per_s": n / elapsed, "seconds": elapsed, "items": n}


def bench_cpu(ex: Executor, kind: str, workers: int, scale: int) -> Result:
    n, task = 200 // scale, 0.020
    start = time.perf_counter()
    for f in [ex.submit(busy, task) for _ in range(n)]:
        f.result()
    wall = time.perf_counter() - start
    ideal = n * task / workers
    return {"wall_s": wall, "ideal_s": ideal, "efficiency": ideal / wall, "tasks": n}


def _shutdown_killing(ex: Executor, futures: list[Future[Any]], limit: float = 180.0) -> float:
    """``shutdown(wait=True, cancel_futures=True)`` in a thread; once the cancelling has
    settled, ``kill()`` whatever is still not done (tasks already running), if it can."""
    start = time.perf_counter()
    failed: list[BaseException] = []

    def close() -> None:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
        except BaseException as exc:  # re-raised below, in the caller's thread
            failed.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    killed: set[int] = set()
    left, settled = len(futures) + 1, False
    while closer.is_alive():
        if time.perf_counter() - start > limit:
            raise TimeoutError(f"shutdown did not finish within {limit:.0f} s")
        time.sleep(0.25)
        not_done = [f for f in futures if not f.done()]
        settled = settled or len(not_done) >= left
        left = len(not_done)
        for f in not_done if settled else ():
            kill = getattr(f, "kill", None)
            if kill is not None and id(f) not in killed:
                killed.add(id(f))
                kill()
    closer.join()
    if failed:
        raise failed[0]
    return time.perf_counter() - start


def bench_memory(ex: Executor, kind: str, workers: int, scale: int) -> Result:
    n = 100_000 // scale
    hold = 60.0 if kind == "kotta" else 1.0  # PPE cannot kill a running task: keep it short
    tracemalloc.start()
    try:
        base, start = tracemalloc.get_traced_memory()[0], time.perf_counter()
        futures = [ex.submit(sleeper, hold) for _ in range(n)]
        submit_s = time.perf_counter() - start  # slowed down by tracemalloc
        submitted = tracemalloc.get_traced_memory()[0] - base
        time.sleep(1.5)  # let a background thread flush its outbox
        flushed = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    pending = sum(not f.done() for f in futures)
    shutdown_s = _shutdown_killing(ex, futures)
    return {
        "kib_per_future": flushed / n / 1024,
        "kib_per_future_before_flush": submitted / n / 1024,
        "pending": pending,
        "submit_s": submit_s,
        "futures": n,
        "shutdown_s": shutdown_s,
    }


BENCHES: dict[str, Bench] = {
    "roundtrip": bench_roundtrip,
    "submit": bench_submit,
    "map": bench_map,
    "cpu": bench_cpu,
    "memory": bench_memory,
}


# -- report ----------------------------------------------------------------------------------


Check = tuple[str, str, float, str]  # ("kotta" | "ratio", "<=" | ">=", limit, unit)


@dataclass(frozen=True)
class Spec:
    bench: str
    key: str
    label: str
    check: Check | None = None

    @property
    def target(self) -> str:
        if self.check is None:
            return ""
        on, op, limit, unit = self.check
        return f"{on} {op} {limit:g}{unit}"

    def met(self, kotta: float, ratio: float | None) -> bool | None:
        if self.check is None:
            return None
        on, op, limit, _ = self.check
        value = kotta if on == "kotta" else ratio
        if value is None:
            return None
        return value <= limit if op == "<=" else value >= limit


SPECS = [
    Spec("roundtrip", "median_ms", "no-op round trip median (ms)", ("kotta", "<=", 1.5, " ms")),
    Spec("roundtrip", "p90_ms", "no-op round trip p90 (ms)"),
    Spec("submit", "tasks_per_s", "submit() + wait (tasks/s)", ("ratio", ">=", 1.5, "x")),
    Spec("submit", "cpu_us_per_task", "  its CPU a task, all processes (us)"),
    Spec("submit", "client_cpu_us_per_task", "  of which the client's (us)"),
    Spec("submit", "node_cpu_us_per_task", "  of which the node's (us)"),
    Spec("map", "items_per_s", "map(chunksize=1) (items/s)", ("ratio", ">=", 2, "x")),
    Spec("cpu", "wall_s", "CPU-bound 20 ms tasks, wall (s)", ("ratio", "<=", 1.05, "")),
    Spec("memory", "kib_per_future", "client KiB per pending future", ("kotta", "<=", 2, " KiB")),
]


@dataclass
class Row:
    metric: str
    kotta: float | str | None
    ppe: float | str | None
    ratio: float | None
    target: str
    met: bool | None


def make_rows(results: dict[str, dict[str, Result | str]]) -> list[Row]:
    rows = []
    for spec in (s for s in SPECS if s.bench in results):
        k, p = (results[spec.bench].get(kind) for kind in KINDS)
        kv = k.get(spec.key) if isinstance(k, dict) else k
        pv = p.get(spec.key) if isinstance(p, dict) else p
        if kv is None and pv is None:  # a figure this run did not measure
            continue
        ratio = kv / pv if isinstance(kv, float) and isinstance(pv, float) and pv else None
        met = spec.met(kv, ratio) if isinstance(kv, float) else None
        rows.append(Row(spec.label, kv, pv, ratio, spec.target, met))
    return rows


def median_result(runs: list[Result | str]) -> Result | str:
    """The median of each figure over several runs; a run's error, if one failed."""
    for r in runs:
        if isinstance(r, str):
            return r
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}  # type: ignore[index]


def spread_lines(runs: dict[str, dict[str, list[Result | str]]]) -> list[str]:
    """For each row of the table, the lowest and highest figure of each side, and of the
    ratio of the runs taken in pairs (the i-th kotta run against the i-th ppe run)."""
    lines = []
    for spec in (s for s in SPECS if s.bench in runs):
        sides = runs[spec.bench]
        values = {
            kind: [r[spec.key] for r in sides.get(kind, []) if isinstance(r, dict) and spec.key in r]
            for kind in KINDS
        }
        parts = [f"{kind} {fmt(min(v))} to {fmt(max(v))}" for kind, v in values.items() if v]
        pairs = [k / p for k, p in zip(values["kotta"], values["ppe"], strict=False) if p]
        if pairs:
            parts.append(f"ratio {fmt(min(pairs))} to {fmt(max(pairs))}")
        if parts:
            lines.append(f"{spec.label}: " + ", ".join(parts))
    return lines


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, str):
        return "error"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def print_table(rows: list[Row]) -> None:
    cells = [["metric", "kotta", "ppe", "ratio", "target", "met?"]]
    for r in rows:
        cells.append([r.metric, *map(fmt, (r.kotta, r.ppe, r.ratio)), r.target, fmt(r.met)])
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    cells.insert(1, ["-" * w for w in widths])
    for line in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2, help="workers for both executors")
    ap.add_argument("--only", choices=sorted(BENCHES), help="run just this benchmark")
    ap.add_argument("--quick", action="store_true", help="sizes divided by 10 (smoke test)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--executors", default=",".join(KINDS), help="subset of: kotta,ppe")
    ap.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run each benchmark N times, alternating which executor goes first; the table "
             "shows medians, and the spread follows it",
    )
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    kinds = [k for k in KINDS if k in args.executors.split(",")]
    root = str(Path(__file__).resolve().parent.parent)  # for `python benchmarks/run.py`
    if root not in sys.path:
        sys.path.insert(0, root)
    scale = 10 if args.quick else 1
    runs: dict[str, dict[str, list[Result | str]]] = {}
    for name in [args.only] if args.only else list(BENCHES):
        runs[name] = {kind: [] for kind in kinds}
        for i in range(args.repeat):
            # alternate the order, so that neither side always runs on a machine that the
            # other has just warmed (or left busy)
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                print(f"# {name} / {kind} ({i + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                try:
                    with open_executor(kind, args.workers) as ex:
                        got: Result | str = BENCHES[name](ex, kind, args.workers, scale)
                except Exception as exc:  # report it, carry on with the rest
                    traceback.print_exc()
                    got = f"{type(exc).__name__}: {exc}"
                runs[name][kind].append(got)
    results = {name: {kind: median_result(got) for kind, got in r.items()} for name, r in runs.items()}
    rows = make_rows(results)
    load = os.getloadavg()[0]  # other work on the machine skews every figure
    print(f"\nworkers={args.workers} quick={args.quick} repeat={args.repeat} load(1 min)={load:.1f}")
    print_table(rows)
    if args.repeat > 1:
        print(f"\nspread over {args.repeat} runs (min to max; ratio: each run's kotta / ppe, "
              "runs paired in order)")
        for line in spread_lines(runs):
            print(line)
    errors = [
        f"{b}/{k}: {v}" for b, r in results.items() for k, v in r.items() if isinstance(v, str)
    ]
    for line in errors:
        print("error:", line)
    if args.json:
        doc = {
            "workers": args.workers,
            "quick": args.quick,
            "loadavg_1min": load,
            "python": sys.version.split()[0],
            "repeat": args.repeat,
            "results": results,
            "runs": runs,
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
