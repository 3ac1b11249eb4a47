"""Resource monitoring: the node samples CPU% and RSS over a task's process tree.

A task's child burns CPU and holds ~50 MB until the test lets it go (a file), on a node that
samples every second; the test reads the samples from the job record while it runs."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests import tasks
from tests.conftest import GUARD, kill_pid_in, wait_for
from tests.test_cli import kotta

SVG = "{http://www.w3.org/2000/svg}"


def test_long_task_is_sampled_over_its_process_tree(start_node, make_executor, enclave,
                                                    enclave_dir, tmp_path):
    start_node("--sample-interval", "1", workers=1)
    ex = make_executor(1, start_node=False)
    stop = tmp_path / "stop"
    f = ex.submit(tasks.child_hog, 60, 3, stop)

    def running_samples():
        job = enclave.jobs.get(f.job_id)
        if job is None:  # not submitted yet
            return None
        assert not job.state.final, "the task ended before the test let it"
        return len((job.usage or {}).get("samples", [])) >= 2 and job.usage

    usage = wait_for(running_samples, what="samples in the record of the running job")
    assert usage["samples"][-1]["rss_kb"] >= 50 * 1024  # the child's memory counts
    r = kotta(enclave_dir, "status", f.job_id)
    assert r.returncode == 0, r.stderr
    assert "processing" in r.stdout and "samples" in r.stdout
    stop.touch()

    assert f.result(GUARD) == "hogged"
    u = f.usage()
    assert u["cpu"] > 0.5, u  # the child's CPU (a busy loop), not only the idle worker's
    assert u["peak_rss_kb"] >= 50 * 1024, u
    assert u["start"] <= u["end"] and u["wall"] >= 3
    times = [s["t"] for s in u["samples"]]
    assert len(times) >= 2 and times == sorted(set(times))
    assert all(u["start"] <= t <= u["end"] + 1 for t in times)
    # (a busy loop: about 98% on an idle machine, 65% beside three other busy loops)
    assert any(s["cpu_pct"] > 25 for s in u["samples"]), u["samples"]
    assert enclave.jobs.get(f.job_id).usage == u  # the record keeps the final usage

    r = kotta(enclave_dir, "status", f.job_id)
    assert r.returncode == 0, r.stderr
    assert "peak rss" in r.stdout and "CPU %" in r.stdout
    assert sum(line.startswith("  20") for line in r.stdout.splitlines()) >= len(times)

    out = tmp_path / "out.svg"
    r = kotta(enclave_dir, "status", f.job_id, "--plot", str(out))
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    lines = root.findall(f"{SVG}polyline")
    assert [p.get("id") for p in lines] == ["cpu", "memory"]
    assert all(len(p.get("points").split()) == len(times) for p in lines)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "CPU %" in texts and "MiB" in texts and "time" in texts


def test_tiny_tasks_are_not_sampled(start_node, make_executor):
    start_node("--sample-interval", "1", workers=1)
    ex = make_executor(1, start_node=False)
    futures = [ex.submit(tasks.noop, i) for i in range(20)]
    assert [f.result(GUARD) for f in futures] == list(range(20))
    for f in futures:
        u = f.usage()
        assert "samples" not in u and u["peak_rss_kb"] > 0 and u["cpu"] >= 0


def test_a_task_its_worker_did_not_report_still_has_its_times(start_node, make_executor):
    """Killed for its walltime, or its worker died: the worker's own figures are gone, but
    the node saw when the task began and ended."""
    import datetime as dt

    from kotta_executor import WalltimeExceeded, WorkerDied

    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    over = ex.with_options(walltime=dt.timedelta(seconds=1)).submit(tasks.sleep_and_return, 60)
    died = ex.submit(tasks.exit_hard, 3)
    for f, error in ((over, WalltimeExceeded), (died, WorkerDied)):
        with pytest.raises(error):
            f.result(GUARD)
        u = f.usage()
        assert u is not None and u["start"] <= u["end"], u
        assert u["end"] - u["start"] == pytest.approx(u["wall"], abs=0.01)
    assert over.usage()["wall"] >= 1.0


def test_a_long_task_keeps_a_bounded_thinned_history_of_samples():
    """A day of 1-second samples is not kept whole (nor written whole at each sample): at
    most MAX_SAMPLES, evenly spaced, the first and the latest always among them."""
    import os

    from node.monitor import MAX_SAMPLES, Monitor

    clock = [0.0]
    m = Monitor(0.0, 1.0, wall=lambda: clock[0])  # a real reading of this process's tree
    assert not m.read(os.getpid(), 0.5)  # the baseline
    longest = 0
    for i in range(1, 10_001):
        clock[0] = float(i)
        if i <= 3:
            assert m.read(os.getpid(), 0.5 + i)
        else:  # (a psutil reading takes a millisecond: the samples it would add)
            m._keep({"t": float(i), "cpu_pct": 0.0, "rss_kb": 1, "procs": 1})
        kept = m.samples
        longest = max(longest, len(kept))
        assert kept[0]["t"] == 1.0 and kept[-1]["t"] == float(i)  # the first and the latest
        if i in (MAX_SAMPLES - 2, 5000, 7777, 10_000):
            times = [s["t"] for s in m.usage()["samples"]]
            grid = times[:-1] if (times[-1] - 1) % m.stride else times
            assert {b - a for a, b in zip(grid, grid[1:], strict=False)} == {float(m.stride)}, (i, m.stride)
    assert longest <= MAX_SAMPLES
    assert m.stride == 8  # 10,000 taken: every 8th kept (1,250 of them, with the latest)
    u = m.merge({"cpu": 0.0, "wall": 10_000.5})
    assert u["samples_downsampled_from"] == 10_000 and len(u["samples"]) == 1251
    assert u["samples"] == m.usage()["samples"]


def test_a_long_task_that_prints_much_holds_only_the_tail_of_its_output_on_disk(
        start_node, make_executor, tmp_path):
    """Only the last 4 MiB of a stream come back: a task that logs for hours must not fill
    the node's disk with the rest while it runs."""
    import os

    from node.worker import CAPTURE_LIMIT

    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    marker, stop = tmp_path / "pid", tmp_path / "stop"
    f = ex.with_options(walltime=GUARD).submit(tasks.print_much_then_wait, 40, marker, stop)
    wait_for(lambda: marker.exists() and marker.read_text(), what="the task's output")
    capture = f"/proc/{int(marker.read_text())}/fd/1"
    wait_for(lambda: os.stat(capture).st_blocks * 512 <= 2 * CAPTURE_LIMIT,
             what="the capture file of the running task trimmed to about its tail")
    assert os.stat(capture).st_size == 40 * 1024 * 1024  # (the task writes on, at its end)
    stop.touch()
    assert f.result(GUARD) == "printed"
    head, _, rest = f.stdout.partition("\n")
    assert head == f"[kotta: {36 * 1024 * 1024} earlier bytes of output were dropped]"
    lines = rest.splitlines()
    assert len(lines) == 4 * 1024 and lines[0].startswith(f"{36 * 1024:08d}")
    assert lines[-1].startswith(f"{40 * 1024 - 1:08d}")


def test_the_tail_of_a_long_output_begins_with_a_whole_character(start_node, make_executor):
    """The tail of an output over 4 MiB was cut at a byte count, often inside a character
    of text that is not ASCII: what came back began with a "\ufffd" that the task never
    printed.  It begins at the next character, and the count of dropped bytes says so."""
    from node.worker import CAPTURE_LIMIT

    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    text = "\u00e9" * (CAPTURE_LIMIT // 2 + 1000) + "!"  # (odd: the cut falls inside an "é")
    f = ex.submit(tasks.write_out, text)
    size = f.result(GUARD)
    head, _, tail = f.stdout.partition("\n")
    assert "\ufffd" not in tail and text.endswith(tail)
    assert head == f"[kotta: {size - len(tail.encode())} earlier bytes of output were dropped]"


def test_the_result_of_a_task_sampled_for_hours_can_still_be_read():
    """The node puts a long task's usage in its result's header, which is read up to
    wire.MAX_HEADER (1 MiB): 20,000 samples (5.5 hours at --sample-interval 1) made the
    result unreadable ("truncated kotta envelope"), the task's value lost."""
    import os

    from kotta_executor import wire
    from node.daemon import _with_usage
    from node.monitor import Monitor

    m = Monitor(0.0, 1.0)
    m.read(os.getpid(), 0.5)
    assert m.read(os.getpid(), 1.5)
    sample = m.samples[0]
    for i in range(2, 20_001):  # (a psutil reading takes a millisecond: what it would add)
        m._keep({**sample, "t": sample["t"] + i})
    result = wire.failure("0" * 32, 1, "WorkerDied", "the worker died")  # (a real result)
    env = wire.decode(_with_usage(result, m.merge({"cpu": 1.0, "wall": 20_000.5})))
    assert env.header["usage"]["samples_downsampled_from"] == 20_000
    [(ok, error)] = wire.outcomes(env)
    assert not ok and type(error).__name__ == "WorkerDied" and "the worker died" in str(error)


def test_samples_keep_their_interval_though_the_node_looks_late():
    """The node looks for due samples every quarter interval: each reading, a little late,
    pushed the next one back, and `--sample-interval 1` sampled every 1.2 s or so."""
    import os

    from node.monitor import Monitor

    m = Monitor(0.0, 1.0)
    assert m.due == 0.5
    for _ in range(100):
        now = m.due + 0.24  # the node's look, up to a quarter interval after it was due
        m.read(os.getpid(), now)
    assert m.due == pytest.approx(100.5)  # on the schedule, not 24 s behind
    assert len(m.samples) == 99
    m.read(os.getpid(), 500.0)  # a node stalled for minutes: one reading, then the next
    assert m.due == 500.0 + 1.0  # a whole interval later, not a burst of catching up


def test_cpu_a_worker_used_between_tasks_is_not_the_next_tasks(start_node, make_executor,
                                                               tmp_path):
    """The worker took a task's starting CPU counters from the end of the task before: what
    its process used in between (a thread an earlier task left running, the sending of a
    big result) was charged to the next task, a no-op of microseconds that used "1 s"."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    done = tmp_path / "burnt"
    assert ex.submit(tasks.burn_in_background, 1.0, str(done)).result(GUARD) == "started"
    wait_for(done.exists, what="the left thread to burn its second of CPU")
    f = ex.submit(tasks.noop, 1)  # (the same worker: the node has one)
    assert f.result(GUARD) == 1
    assert f.usage()["cpu"] < 0.5, f.usage()


def test_the_samples_of_a_task_count_the_daemon_it_started(start_node, make_executor,
                                                          tmp_path):
    """A daemon a task starts is re-parented to the node, out of its worker's tree: the
    memory check counted it, but the samples and the peak did not (a task killed for "430
    MB" showed samples of 30 MB)."""

    from tests.test_limits import start_a_hogging_daemon_and_sleep

    daemon = tmp_path / "daemon"
    start_node("--sample-interval", "1", workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(start_a_hogging_daemon_and_sleep, str(daemon), 150, 4)
    try:
        assert f.result(GUARD) == "not killed"
        u = f.usage()
        assert u["samples"], u
        assert u["samples"][-1]["rss_kb"] >= 150 * 1024, u["samples"]
        assert u["samples"][-1]["procs"] >= 2, u["samples"]
        assert u["peak_rss_kb"] >= 150 * 1024, u
    finally:
        kill_pid_in(daemon)


def test_a_task_killed_before_its_first_sample_reports_no_cpu_it_did_not_measure(
        start_node, make_executor):
    """The node reads a task's tree once as a baseline, half an interval in, and samples
    it an interval later: a task killed in between (here at its walltime) had its CPU
    given as the difference of that one reading with itself, "cpu 0.000 s" for a busy
    loop that ran the whole time.  The guide: such a task has its times, and what the
    node sampled."""
    import datetime as dt

    from kotta_executor import WalltimeExceeded

    start_node("--sample-interval", "3", workers=1)  # a baseline at 1.5 s, a sample at 4.5
    ex = make_executor(1, start_node=False)
    f = ex.with_options(walltime=dt.timedelta(seconds=3)).submit(tasks.burn_cpu, 60)
    with pytest.raises(WalltimeExceeded):
        f.result(GUARD)
    u = f.usage()
    assert "samples" not in u, u  # (a baseline, and no sample)
    assert "cpu" not in u, u
    assert u["wall"] >= 3


def test_a_child_an_earlier_task_left_is_not_charged_to_the_next_one(start_node,
                                                                     make_executor):
    """A child a task started and never waited for was reaped by the next Popen of the
    worker (subprocess keeps such children, and reaps them at each Popen), in a later
    task, whose CPU then held the child's: "cpu 1.06 s" for running `true`."""
    import psutil

    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.drop_a_burning_child, 1.0).result(GUARD)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             what="the dropped child to end")
    f = ex.submit(tasks.run_true)  # (the same worker: the node has one)
    assert f.result(GUARD) == "ran"
    assert f.usage()["cpu"] < 0.5, f.usage()


def test_the_plot_of_a_job_with_one_sample_shows_it():
    """A polyline of one point draws nothing: the plot of a job sampled once (one that ran
    between 1.5 and 2.5 intervals) was empty axes, though `kotta status` said it wrote
    "1 sample"."""
    from kotta_executor.usage_plot import svg

    root = ET.fromstring(svg([{"t": 10.0, "cpu_pct": 97.5, "rss_kb": 51200, "procs": 2}]))
    marks = {m.get("id"): m for m in root.iter() if m.get("id") in ("cpu", "memory")}
    assert set(marks) == {"cpu", "memory"}
    for mark in marks.values():
        if mark.tag == f"{SVG}polyline":
            assert len(mark.get("points").split()) > 1, ET.tostring(mark)  # (a line)
        else:  # a dot
            assert mark.tag == f"{SVG}circle" and float(mark.get("r")) > 0, ET.tostring(mark)


def test_a_task_that_ended_before_its_first_sample_has_no_samples_key(start_node,
                                                                      make_executor):
    """The guide: ``samples`` is there for a task that ran longer than 1.5 intervals.  One
    that ended between the node's baseline reading (half an interval in) and its first
    sample had ``"samples": []``."""
    start_node("--sample-interval", "3", workers=1)  # a baseline at 1.5 s, a sample at 4.5
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.sleep_and_return, 2.5, "slept")
    assert f.result(GUARD) == "slept"
    u = f.usage()
    assert "samples" not in u, u
    assert u["peak_rss_kb"] > 0 and u["cpu"] >= 0


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_the_cpu_of_a_pool_the_task_waited_for_counts_whatever_its_start_method(
        start_node, make_executor, method):
    """The processes of a "forkserver" pool (the default start method on Linux from
    Python 3.14) are children of the fork server, not of the worker: a task whose pool
    burnt a CPU second reported 0.01 s."""
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.submit(tasks.burn_in_a_pool, method, 2, 0.5)
    assert f.result(GUARD) == [0.5, 0.5]
    assert f.usage()["cpu"] >= 0.9, f.usage()
