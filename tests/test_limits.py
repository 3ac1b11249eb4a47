"""Queues and limits: walltime caps refused at submit, the node's memory limit and caps."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor import ConfigurationError, MemoryLimitExceeded, config, kottajob
from kotta_executor.errors import JobFailed
from kotta_executor.states import JobState
from tests import tasks
from tests.conftest import GUARD, ROOT, gone, kill_pid_in, pump, wait_for


def test_limits_table_has_documented_defaults():
    assert config.QUEUE_LIMITS["test"].max_walltime == 60
    assert config.QUEUE_LIMITS["production"].max_walltime == 24 * 60
    assert config.queue_limits("Prod") == config.QUEUE_LIMITS["production"]
    assert issubclass(MemoryLimitExceeded, JobFailed)
    assert issubclass(MemoryLimitExceeded, MemoryError)


def test_submit_over_the_cap_is_refused_and_nothing_is_sent(make_executor, enclave):
    ex = make_executor(1, walltime=61, start_node=False)
    with pytest.raises(ConfigurationError, match=r"60 min.*test|test.*60 min") as info:
        ex.submit(tasks.square, 3)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigurationError, match="60 min"):
        list(ex.map(tasks.square, [1, 2]))
    assert ex._futures == {} and not ex._outbox
    assert enclave.jobs.list() == []


def test_with_options_and_kottajob_over_the_cap(make_executor, enclave):
    ex = make_executor(1, start_node=False)
    with pytest.raises(ConfigurationError, match=r"cap of the test queue \(60 min\)"):
        ex.with_options(walltime=120).submit(tasks.square, 3)
    with pytest.raises(ConfigurationError, match=r"production queue \(1440 min\)"):
        ex.with_options(queue="production", walltime=24 * 60 + 1).submit(tasks.square, 3)

    @kottajob(ex, "test", 90, block=False)
    def long_one(x):
        return x

    with pytest.raises(ConfigurationError, match="60 min"):
        long_one(1)
    assert enclave.jobs.list() == []


def test_within_the_cap_runs(executor):
    assert executor.with_options(queue="production", walltime=120).submit(
        tasks.square, 4).result(timeout=60) == 16


def test_queues_json_overrides_the_cap(make_executor, enclave, _private_kotta_home):
    ex = make_executor(1, start_node=False)
    _private_kotta_home.mkdir(parents=True, exist_ok=True)
    (_private_kotta_home / "queues.json").write_text(json.dumps({"test": {"max_walltime": 2}}))
    assert config.queue_limits("test").max_walltime == 2
    with pytest.raises(ConfigurationError, match=r"test queue \(2 min\)"):
        ex.with_options(walltime=3).submit(tasks.square, 3)
    (_private_kotta_home / "queues.json").write_text(json.dumps({"test": {"max_walltime": 180}}))
    f = ex.with_options(walltime=120)
    assert config.queue_limits("test").max_walltime == 180
    fut = f.submit(tasks.square, 3)  # accepted: sent (no node serves it in this test)
    wait_for(lambda: enclave.jobs.get(fut.job_id), what="the job to be recorded")


def test_bad_queues_json_is_a_configuration_error(make_executor, _private_kotta_home):
    ex = make_executor(1, start_node=False)
    _private_kotta_home.mkdir(parents=True, exist_ok=True)
    (_private_kotta_home / "queues.json").write_text(json.dumps({"test": {"max_walltime": -1}}))
    with pytest.raises(ConfigurationError, match="queues.json"):
        ex.submit(tasks.square, 3)


@pytest.mark.parametrize("field", ["workers", "memory_mb"])
def test_a_queues_json_limit_under_one_is_an_error_not_zero(field, start_node, make_executor,
                                                           _private_kotta_home):
    """A fraction under 1 in queues.json ("workers": 0.5, "memory_mb": 0.5) was taken as
    0: nodes ran no worker, and every task waited for good; or every task was killed for
    using more than "0 MB".  It is an error naming the field, for the node and the submit."""
    _private_kotta_home.mkdir(parents=True, exist_ok=True)
    (_private_kotta_home / "queues.json").write_text(json.dumps({"test": {field: 0.5}}))
    said = f"{field} of queue 'test' must be at least 1, not 0.5"
    node = start_node(workers=1, wait=False)
    assert node.proc.wait(GUARD) == 2, node.output()
    assert said in node.output()
    ex = make_executor(1, start_node=False)
    with pytest.raises(ConfigurationError, match=said):
        ex.submit(tasks.square, 3)


def test_an_unknown_queue_in_queues_json_names_the_file(make_executor, _private_kotta_home):
    """A misspelt queue in queues.json is the file's error, not the submit's: the submit's
    queue ("test") is right, and an error naming only 'tset' sent the user looking there."""
    ex = make_executor(1, start_node=False)
    _private_kotta_home.mkdir(parents=True, exist_ok=True)
    (_private_kotta_home / "queues.json").write_text(json.dumps({"tset": {"max_walltime": 2}}))
    with pytest.raises(ConfigurationError, match=r"queues\.json: unknown queue 'tset'"):
        ex.submit(tasks.square, 3)


@pytest.mark.parametrize("text, says", [
    ('{"production": {"workers": 4}, "prod": {"max_walltime": 60}}',
     "queue 'production' is given twice, as 'production' and as 'prod'"),
    ('{"test": {"workers": 4}, "Test": {"max_walltime": 2}}',
     "queue 'test' is given twice, as 'test' and as 'Test'"),
    ('{"test": {"workers": 4}, "test": {"max_walltime": 2}}', "'test' is given twice"),
    ('{"test": {"workers": 4, "workers": 2}}', "'workers' is given twice"),
], ids=["alias", "case", "same-key", "same-field"])
def test_a_queue_or_limit_given_twice_in_queues_json_is_an_error(tmp_path, text, says):
    """The last spelling of a queue (``prod`` after ``production``), or the last of a
    repeated key, replaced the first silently: the limits it set (``workers``: 4) were
    the built-in ones again, with no word of it."""
    path = tmp_path / "queues.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        config._read_limits(path)


def test_memory_limit_kills_the_task_and_the_node_goes_on(start_node, make_executor, enclave):
    node = start_node("--memory-limit", "100")
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.allocate_and_sleep, 300)
    with pytest.raises(MemoryLimitExceeded, match="100 MB") as info:
        f.result(timeout=60)
    assert isinstance(info.value, MemoryError)
    job = enclave.jobs.get(f.job_id)
    assert job.state == JobState.FAILED
    assert "memory limit of 100 MB" in job.reason
    assert ex.submit(tasks.square, 5).result(timeout=60) == 25
    assert node.proc.poll() is None


def test_a_task_killed_for_memory_reports_the_peak_it_was_killed_at(start_node, make_executor):
    """The usage of a task the node killed for memory names the memory it was killed for:
    it had its times only (the worker's own figures die with it, and the node samples a
    task's tree only every sample interval, 30 s by default), so `kotta status` showed
    no peak for the one task whose peak mattered."""
    start_node("--memory-limit", "100")
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.allocate_and_sleep, 300)
    with pytest.raises(MemoryLimitExceeded, match=r"used (\d+) MB") as info:
        f.result(timeout=GUARD)
    used_mb = int(re.search(r"used (\d+) MB", str(info.value)).group(1))
    u = f.usage()
    assert u["peak_rss_kb"] >= 100 * 1024, u
    assert u["peak_rss_kb"] // 1024 >= used_mb - 1, (u, used_mb)


def test_node_refuses_a_walltime_over_its_cap(start_node, make_executor, enclave):
    start_node("--max-walltime", "1")
    ex = make_executor(1, start_node=False)
    f = ex.with_options(walltime=2).submit(tasks.square, 3)
    with pytest.raises(JobFailed, match=r"walltime of 2 min, over the cap of 1 min"):
        f.result(timeout=60)
    wait_for(lambda: enclave.jobs.get(f.job_id).state == JobState.FAILED, what="job failed")
    assert ex.with_options(walltime=1).submit(tasks.square, 4).result(timeout=60) == 16


#: a process that writes its pid in a file, holds MB MiB (every page written: resident),
#: then sleeps
_HOG = """
import os, sys, time
open(sys.argv[2] + ".tmp", "w").write(f"{os.getpid()}\\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
held = bytearray(int(sys.argv[1]) * 1024 * 1024)
held[::4096] = b"\\x01" * len(held[::4096])
time.sleep(120)
"""


def start_a_hogging_daemon_and_sleep(pid_file, mb, seconds):
    """Start a daemon (fork, setsid, fork again, the middle one exits) that holds ``mb``
    MiB; once it has started, sleep ``seconds``."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", _HOG, str(mb), pid_file])
        os._exit(0)
    os.waitpid(middle, 0)
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    time.sleep(seconds)
    return "not killed"


def test_the_memory_of_a_daemon_the_task_started_counts(start_node, make_executor, tmp_path):
    """The guide: the node checks the RSS of each task's "whole process tree (the worker
    and every process it started)".  A daemon is re-parented to the node (a subreaper),
    out of the worker's tree: its memory was not counted, and it held 400 MB under a
    200 MB limit for as long as it liked."""
    daemon = tmp_path / "daemon"
    start_node("--memory-limit", "200")
    ex = make_executor(1, start_node=False)
    f = ex.submit(start_a_hogging_daemon_and_sleep, str(daemon), 400, 15)
    try:
        with pytest.raises(MemoryLimitExceeded, match="over the memory limit of 200 MB"):
            f.result(timeout=GUARD)
        pid = int(daemon.read_text())
        wait_for(lambda: gone(pid), timeout=10.0, what="the daemon to die with its task")
    finally:
        kill_pid_in(daemon)


def test_a_task_under_the_memory_limit_is_not_charged_its_worker_twice(
        start_node, make_executor, tmp_path):
    """The worker itself carries the mark that finds what its tasks started out of its
    tree: it was counted a second time, so a task whose tree held a little over half the
    limit was killed for memory."""
    release = tmp_path / "release"
    start_node("--memory-limit", "200")
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.hold_memory_until, 110, str(release))  # (the worker's own: ~30 MB)
    wait_for(lambda: f.status() == "processing", what="the task to run")
    mark = time.monotonic()  # past a few memory checks (MEMORY_CHECK_INTERVAL)
    wait_for(lambda: f.done() or time.monotonic() > mark + 2.0, timeout=GUARD,
             what="a few memory checks")
    tasks.release(release, "go")
    assert f.result(GUARD) == 110


def test_memory_a_task_shares_with_its_children_is_counted_once(
        start_node, make_executor, tmp_path):
    """A task that fills 60 MB, then forks four children sharing it (copy-on-write, as a
    multiprocessing pool forked after loading an array) really uses about 90 MB with its
    worker; the RSS summed over its tree counts the 60 MB five times (~400 MB), and the
    task was killed with MemoryLimitExceeded under a 200 MB limit."""
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    start_node("--memory-limit", "200")
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.share_memory_with_children, 60, 4, str(started), str(release))
    wait_for(lambda: f.done() or len(list(started.iterdir())) == 4, timeout=GUARD,
             what="the four children to run")
    mark = time.monotonic()  # past a few memory checks (MEMORY_CHECK_INTERVAL)
    wait_for(lambda: f.done() or time.monotonic() > mark + 2.0, timeout=GUARD,
             what="a few memory checks")
    tasks.release(release, "go")
    assert f.result(GUARD) == 4


def test_a_task_that_shares_then_allocates_is_killed_before_its_pss_is_due(
        make_executor, enclave, monkeypatch, tmp_path):
    """A task whose RSS sum is over the limit but its PSS under has its PSS read again only
    after MEMORY_PSS_SPACING times what the reading cost (made endless here); one that
    then fills memory of its own, its RSS sum growing past the room the PSS left, is read
    (and killed) at once.  The node runs in this process, stepped by the test."""
    from node import daemon
    from node.daemon import Node, NodeConfig

    monkeypatch.chdir(ROOT)  # workers import tests.* (python -m node.worker, cwd on sys.path)
    monkeypatch.setattr(daemon, "MEMORY_PSS_SPACING", 1e9)
    started, grow = tmp_path / "started", tmp_path / "grow"
    started.mkdir()
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                    memory_limit=200))
    node._start()
    ex = make_executor(1, start_node=False)
    try:
        f = ex.submit(tasks.share_then_grow, 60, 4, str(started), str(grow), 300)
        pump(node, lambda: f.done() or f.job_id in node._pss_read,
              "the PSS of the sharing task to be read, under the limit")
        assert not f.done()
        tasks.release(grow, "go")
        pump(node, f.done, "the task to end")
        with pytest.raises(MemoryLimitExceeded, match="over the memory limit of 200 MB"):
            f.result(0)
    finally:
        node.stopping = True
        node._drain()
        node._stop()


def test_a_memory_check_scans_the_process_table_once(
        make_executor, enclave, monkeypatch, tmp_path):
    """Each worker's tree was found by a scan of every process of the machine: a memory
    check (every 0.5 s) of a node whose 256 workers all ran long tasks took 1.8 s, its loop
    never free (64 workers: 0.3 s of every 0.5 s).  Now one scan serves every worker."""
    import psutil

    from node.daemon import MEMORY_MIN_AGE, Node, NodeConfig

    monkeypatch.chdir(ROOT)  # workers import tests.* (python -m node.worker, cwd on sys.path)
    node = Node(enclave, NodeConfig(queue="test", workers=4, poll_interval=0.05))
    node._start()
    ex = make_executor(1, start_node=False)
    release = tmp_path / "release"
    try:
        fs = [ex.submit(tasks.touch_then_wait, str(tmp_path / f"started-{i}"), str(release))
              for i in range(4)]
        pump(node, lambda: all((tmp_path / f"started-{i}").exists() for i in range(4)),
              "the four tasks to run")
        mark = time.monotonic()
        pump(node, lambda: time.monotonic() > mark + MEMORY_MIN_AGE, "the tasks to age")
        scans = []
        real = psutil._ppid_map
        monkeypatch.setattr(psutil, "_ppid_map", lambda: scans.append(1) or real())
        node._check_memory(time.monotonic())
        assert len(scans) == 1, len(scans)
        monkeypatch.setattr(psutil, "_ppid_map", real)
        tasks.release(release, "go")
        pump(node, lambda: all(f.done() for f in fs), "the tasks to end")
    finally:
        tasks.release(release, "go")
        node.stopping = True
        node._drain()
        node._stop()


def _hog_in_children(children, mb, seconds):
    """Fork ``children`` that each fill ``mb`` MiB of their own, then sleep ``seconds``."""
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            held = bytearray(mb * 1024 * 1024)
            held[::4096] = b"\x01" * len(held[::4096])
            time.sleep(seconds)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return "not killed"


def test_the_pages_of_a_file_a_task_maps_do_not_count_against_its_memory(
        start_node, make_executor, tmp_path):
    """A task that maps a dataset file (``mmap``, ``numpy.memmap``) and reads it has the
    file's pages in its RSS and PSS: it was killed for "using" 200 MB under a 100 MB limit,
    though those pages are the file's cache, which the kernel drops and reads again as it
    needs (they are no memory the task holds).  Memory the task allocates still counts."""
    mapped, release = tmp_path / "mapped", tmp_path / "release"
    start_node("--memory-limit", "100")
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.map_file_until, str(tmp_path / "data"), 200, str(mapped), str(release))
    wait_for(lambda: mapped.exists() or f.done(), what="the task to map the file")
    mark = time.monotonic()  # past a few memory checks (MEMORY_CHECK_INTERVAL)
    wait_for(lambda: f.done() or time.monotonic() > mark + 2.0, timeout=GUARD,
             what="a few memory checks")
    tasks.release(release, "go")
    assert f.result(GUARD) == 200 * 256  # (a byte of each page, each 1)
    g = ex.submit(tasks.allocate_and_sleep, 300)
    with pytest.raises(MemoryLimitExceeded, match="over the memory limit of 100 MB"):
        g.result(GUARD)


def test_children_holding_memory_of_their_own_are_still_killed(start_node, make_executor):
    """Memory the children do not share (each its own 100 MB) still counts in full; the
    message names the figure judged."""
    start_node("--memory-limit", "200")
    ex = make_executor(1, start_node=False)
    f = ex.submit(_hog_in_children, 3, 100, 30)
    with pytest.raises(MemoryLimitExceeded, match=(
            r"used \d+ MB \(proportional set size \(PSS\) of its anonymous and shared memory, "
            r"summed over its process tree\), "
            r"over the memory limit of 200 MB")):
        f.result(timeout=GUARD)



def test_the_memory_of_a_process_counts_on_a_kernel_without_smaps_rollup(monkeypatch):
    """On a kernel before 4.14 (RHEL/CentOS 7's 3.10) there is no /proc/PID/smaps_rollup:
    its FileNotFoundError was taken for the process having ended, which counted nothing,
    so a node there never killed a task for its memory, whatever it used (psutil, as
    before, sums /proc/PID/smaps there).  Simulated: opening smaps_rollup fails so."""
    import builtins

    from node import monitor

    def no_rollup(path, *args, **kwargs):
        if str(path).endswith("/smaps_rollup"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return builtins.open(path, *args, **kwargs)

    held = bytearray(64 * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])
    monkeypatch.setattr(monitor, "open", no_rollup, raising=False)
    used, _ = monitor.tree_pss([os.getpid()])
    assert used >= len(held)
    del held


# ---------------------------------------------------------------- queues.json, any content

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from([10**400, -(10**400), 0.5, 1, 10**18]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["test", "Prod", "production", "tset", "max_walltime", "memory_mb",
                         "workers", ""]) | st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


def _read_or_refuse(tmp_path, text: str) -> None:
    path = tmp_path / "queues.json"
    path.write_text(text)
    try:
        limits = config._read_limits(path)
    except ConfigurationError as exc:
        assert str(path) in str(exc)
        return
    for queue, lim in limits.items():
        assert queue in config.QUEUES
        assert type(lim.memory_mb) is int and lim.memory_mb >= 1
        assert type(lim.workers) is int and lim.workers >= 1
        assert 0 < lim.max_walltime < math.inf


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    _json_values.map(json.dumps), st.text(max_size=40),
    st.dictionaries(st.sampled_from(["test", "prod", "tset"]), st.dictionaries(
        st.sampled_from(["max_walltime", "memory_mb", "workers", "cpus"]), _json_values,
        max_size=3) | _json_values, max_size=2).map(json.dumps),
    st.dictionaries(st.sampled_from(["test", "prod"]), st.dictionaries(
        st.sampled_from(["max_walltime", "memory_mb", "workers"]),
        st.integers() | st.floats() | st.sampled_from([10**400, -(10**400), 0.5, 10**18]),
        min_size=1), min_size=1).map(json.dumps)))
def test_any_queues_json_is_limits_or_a_configuration_error_naming_it(tmp_path, text):
    _read_or_refuse(tmp_path, text)


@pytest.mark.parametrize("text", [
    '{"test": {"workers": 1%s}}' % ("0" * 400),
    '{"test": {"max_walltime": 1%s}}' % ("0" * 400),
    '{"test": {"memory_mb": -1%s}}' % ("0" * 400),
    "[" * 5000,
    '{"test": ' * 3000,
], ids=["workers", "max_walltime", "memory_mb", "array", "object"])
def test_a_queues_json_of_a_huge_number_or_deep_nesting_is_a_configuration_error(
        tmp_path, text):
    """A 400-digit integer (JSON has no limit) raised OverflowError out of every submit,
    and nesting deeper than the JSON parser goes a RecursionError, naming neither the
    file nor the problem.  (Not a Hypothesis test: it raises the recursion limit.)"""
    path = tmp_path / "queues.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="queues.json"):
        config._read_limits(path)


def test_the_memory_limit_is_checked_with_a_long_poll_interval(start_node, make_executor):
    """--poll-interval is the pause between polls "when no doorbell rings", and the
    embedded enclave's doorbell rings: a node given a long one checked its running tasks'
    memory only when its loop woke up for something else (its upkeep, every 10 s), not
    every 0.5 s, and a task four times over the limit ran on to its end."""
    start_node("--memory-limit", "100", "--poll-interval", "60", visibility_timeout=60.0)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.allocate_and_sleep, 400, 4.0)
    with pytest.raises(MemoryLimitExceeded, match="over the memory limit of 100 MB"):
        f.result(timeout=GUARD)
