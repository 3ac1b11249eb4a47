"""Resource samples of long tasks, taken by the node over a worker's whole process tree.

Tiny tasks never meet this module: a task is first read ``sample_interval / 2`` after it
started (a baseline of the tree's CPU counters, not recorded), then sampled once per
``sample_interval``: CPU% since the previous reading and RSS summed over the tree.

A task keeps at most :data:`MAX_SAMPLES` samples, written whole to its job record at each
one: a day-long task sampled every second would otherwise hold 86,400 of them, and the
node would serialise and write megabytes a second, ever more as the task runs.  Once the
evenly spaced samples kept number ``MAX_SAMPLES - 1``, every other one is dropped (the
first is kept) and from then on one sample in two is kept, so their spacing doubles each
time; the latest sample is always kept too, at the end of the list.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

#: the most samples a task keeps (see the module's docstring); odd when thinned, so the
#: newest of the evenly spaced ones survives a thinning
MAX_SAMPLES = 2000


def children_map() -> dict[int, list[int]]:
    """Each process's children, by pid: one scan of the process table, for the trees of
    all the node's workers (``Process.children`` scans it at each call: a memory check of
    256 busy workers, one scan each, took 1.8 s)."""
    try:
        parents = psutil._ppid_map()  # (what Process.children reads; the cheapest)
    except AttributeError:  # (a psutil without it)
        parents = {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"])}
    out: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        out.setdefault(ppid, []).append(pid)
    return out


def _tree(pid: int, kids: dict[int, list[int]] | None) -> list[psutil.Process]:
    """``pid`` and its descendants (found in ``kids``, from :func:`children_map`, or by a
    scan of their own); psutil.Error if ``pid`` is gone."""
    root = psutil.Process(pid)
    if kids is None:
        return [root, *root.children(recursive=True)]
    born, out, stack, seen = root.create_time(), [root], [pid], {pid}
    while stack:
        for child in kids.get(stack.pop(), ()):
            if child in seen:  # (a pid reused while the table was scanned: a cycle)
                continue
            seen.add(child)
            try:
                p = psutil.Process(child)
                if p.create_time() >= born:  # (else a reused pid, not a descendant)
                    out.append(p)
                    stack.append(child)
            except psutil.Error:
                pass
    return out


def read_tree(pid: int, kids: dict[int, list[int]] | None = None
              ) -> tuple[float, int, int] | None:
    """(CPU seconds, RSS bytes, processes) of ``pid`` and its descendants, or None if gone
    (``kids``: see :func:`_tree`).

    CPU counts each process's own time plus the time of the children it reaped, so a child
    that exits between two readings moves from one term to the other, not out of the sum."""
    try:
        procs = _tree(pid, kids)
    except psutil.Error:
        return None
    cpu, rss, n = 0.0, 0, 0
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                m = p.memory_info()
        except psutil.Error:  # ended meanwhile
            continue
        cpu += t.user + t.system + t.children_user + t.children_system
        rss += m.rss
        n += 1
    return cpu, rss, n


def tree_pss(pids: Iterable[int], kids: dict[int, list[int]] | None = None
             ) -> tuple[int, bool]:
    """(bytes, all PSS) of the trees of ``pids``: the proportional set size summed over
    them, in which a page shared by k processes counts 1/k in each (a fork's copy-on-write
    pages), so the sum is the memory the trees really use; of their anonymous and shared
    memory only (:func:`_held_pss`), not the pages of the files they map.  A process
    whose PSS cannot be read (no smaps, not ours) counts its RSS; the flag says whether
    none did.  A process that ended meanwhile counts nothing (``kids``: see :func:`_tree`).
    Dearer than read_tree (the kernel walks each process's page tables): for confirming an
    RSS sum over a limit."""
    total, exact, seen = 0, True, set()
    for pid in pids:
        try:
            procs = _tree(pid, kids)
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += _held_pss(p)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError,
                    ProcessLookupError):
                continue
            except (psutil.Error, AttributeError, OSError):
                # (AttributeError: no ``pss`` off Linux)
                try:
                    total += p.memory_info().rss
                    exact = False
                except psutil.Error:
                    continue
    return total, exact


@dataclass
class Monitor:
    """What the node has measured of one running task."""

    started: float  # monotonic, when the task began on its worker
    interval: float
    due: float = 0.0  # monotonic, the next reading
    last_cpu: float | None = None
    last_t: float = 0.0
    first_cpu: float | None = None
    peak_rss: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    taken: int = 0  # samples taken, kept or not
    stride: int = 1  # one sample in ``stride`` is kept (plus the latest)
    tail: bool = False  # whether samples[-1] is the latest, kept off the stride
    wall: Callable[[], float] = time.time  # the clock of the samples' ``t``

    def __post_init__(self) -> None:
        self.due = self.started + self.interval / 2

    def read(self, pid: int, now: float, also: Iterable[int] = (),
             kids: dict[int, list[int]] | None = None) -> bool:
        """Take a reading; True when it added a sample (to be written to the job record).
        ``also``: more processes whose trees are the task's (daemons it started, which
        the node adopted: the memory check counts them too); ``kids``: see _tree."""
        got = read_tree(pid, kids)
        for other in also if got is not None else ():
            more = read_tree(other, kids)
            if more is not None:
                got = (got[0] + more[0], got[1] + more[1], got[2] + more[2])
        # On the schedule: the node looks a little late (every quarter interval, up to a
        # second), and each look pushed the next back (every 1.2 s at an interval of 1).
        # After a stall of an interval or more, one reading, and the next an interval on.
        late = now >= self.due + self.interval
        self.due = (now if late else self.due) + self.interval
        if got is None:
            return False
        cpu, rss, nprocs = got
        self.peak_rss = max(self.peak_rss, rss)
        if self.last_cpu is None:  # the baseline
            self.first_cpu, self.last_cpu, self.last_t = cpu, cpu, now
            return False
        elapsed = max(now - self.last_t, 1e-9)
        pct = max(0.0, (cpu - self.last_cpu) / elapsed * 100)
        self.last_cpu, self.last_t = cpu, now
        self._keep({"t": round(self.wall(), 3), "cpu_pct": round(pct, 1),
                    "rss_kb": rss // 1024, "procs": nprocs})
        return True

    def _keep(self, sample: dict[str, Any]) -> None:
        """Add the latest sample, thinning the list to keep it under MAX_SAMPLES."""
        if self.tail:  # the previous latest was kept only for being the latest
            self.samples.pop()
        self.tail = self.taken % self.stride != 0
        self.taken += 1
        self.samples.append(sample)
        if not self.tail and len(self.samples) >= MAX_SAMPLES - 1:
            # an odd count, the first and this one at the stride: both stay
            self.samples = self.samples[::2]
            self.stride *= 2

    def _samples(self, out: dict[str, Any]) -> dict[str, Any]:
        if not self.samples:  # (the baseline only: the task ended before its first sample)
            return out
        out["samples"] = list(self.samples)
        if self.stride > 1:  # thinned: how many were taken (the AWS backend's key)
            out["samples_downsampled_from"] = self.taken
        return out

    def usage(self) -> dict[str, Any]:
        """Usage while the task runs (what the job record shows until the task ends)."""
        return self._samples({"peak_rss_kb": self.peak_rss // 1024})

    def merge(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The final usage: the worker's report, with samples, the tree's peak RSS and CPU."""
        out = self._samples(dict(usage or {}))
        out["peak_rss_kb"] = max(out.get("peak_rss_kb", 0), self.peak_rss // 1024)
        if self.taken and self.first_cpu is not None and self.last_cpu is not None:
            # (not with the baseline alone: its difference with itself measures nothing)
            # CPU the tree used between baseline and last sample: a lower bound that also
            # counts children the task left running or never waited for
            out["cpu"] = round(max(out.get("cpu", 0.0), self.last_cpu - self.first_cpu), 6)
        return out


def _held_pss(p: psutil.Process) -> int:
    """The PSS of ``p``'s anonymous and shared memory (bytes; Linux's smaps_rollup,
    ``Pss_Anon`` and ``Pss_Shmem``): what it holds.  Not the pages of the files it maps
    (``Pss_File``: a dataset read with ``mmap`` or ``numpy.memmap``, its libraries' code),
    the files' cache, which the kernel drops and reads again as it needs: counted, a task
    that mapped and read a 200 MB file was killed for using 217 MB under a 100 MB limit.
    Where those fields are missing (a kernel before 5.8), the whole PSS; off Linux, or
    without smaps_rollup (before 4.14), psutil's (AttributeError where it has none)."""
    try:
        with open(f"/proc/{p.pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        # no /proc (not Linux), or no smaps_rollup of a process that is there (a kernel
        # before 4.14, RHEL 7's: taken for an ended process, it counted nothing, and no
        # task was killed for its memory): psutil's, which sums smaps there.  (Ended: its
        # FileNotFoundError, or psutil's NoSuchProcess)
        if not os.path.isdir("/proc/self") or os.path.isdir(f"/proc/{p.pid}"):
            return p.memory_full_info().pss
        raise
    fields = {}
    for line in text.splitlines()[1:]:  # (after the [rollup] line: "Name:  123 kB")
        name, _, value = line.partition(b":")
        parts = value.split()
        if parts:
            fields[name] = int(parts[0]) * 1024
    if b"Pss_Anon" in fields:
        return fields[b"Pss_Anon"] + fields.get(b"Pss_Shmem", 0)
    if b"Pss" not in fields:  # (a zombie's is empty): its RSS, as for one not readable
        raise OSError(f"no PSS in /proc/{p.pid}/smaps_rollup")
    return fields[b"Pss"]
