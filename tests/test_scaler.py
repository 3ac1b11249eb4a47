"""Elastic pools: the scaling rule, and ``kotta up --min/--max`` with real node processes."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.scaler import desired, pid_file
from tests import tasks
from tests.conftest import GUARD, gone, wait_for
from tests.test_cli import _kill_background_nodes, kotta

# ---------------------------------------------------------------------- the rule

bounds = st.integers(0, 20).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(max(lo, 1), 40)))


@given(st.integers(0, 10_000), st.integers(0, 50), bounds, st.integers(1, 64))
def test_desired_stays_within_min_and_max(depth, live, mm, per_node):
    lo, hi = mm
    assert lo <= desired(depth, live, lo, hi, per_node) <= hi


@given(st.integers(0, 50), bounds, st.integers(1, 64), st.integers(0, 10_000))
def test_desired_never_drops_below_live_with_a_backlog(live, mm, per_node, extra):
    lo, hi = mm
    depth = live * per_node + extra + 1  # more than per_node messages per live node
    assert desired(depth, live, lo, hi, per_node) >= min(live, hi)


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 50), bounds,
       st.integers(1, 64))
def test_desired_is_monotone_in_depth(d1, d2, live, mm, per_node):
    lo, hi = mm
    a, b = sorted((d1, d2))
    assert desired(a, live, lo, hi, per_node) <= desired(b, live, lo, hi, per_node)


def test_desired_examples():
    assert desired(0, 3, 1, 4, 2) == 1  # empty: towards min
    assert desired(12, 1, 1, 3, 2) == 3  # 6 wanted, capped at max
    assert desired(5, 2, 1, 4, 2) == 3  # 2.5 per node > 2
    assert desired(4, 2, 1, 4, 2) == 2  # 2 per node: enough
    assert desired(1, 4, 1, 4, 2) == 4  # a backlog never shrinks the pool
    with pytest.raises(ValueError):
        desired(0, 0, 3, 2, 2)


# ---------------------------------------------------------------------- kotta up --min --max


def _kill_everything(enclave) -> None:
    """Never leave a background scaler or node behind."""
    pid = None
    try:
        pid = int(pid_file(enclave.home, "test").read_text().splitlines()[0])
    except (OSError, ValueError):
        pass
    if pid:
        try:
            if "node.scaler" in psutil.Process(pid).cmdline():
                os.kill(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass
    _kill_background_nodes(enclave)


def test_up_with_min_and_max_scales_with_the_backlog(enclave, make_executor, tmp_path):
    release = tmp_path / "release"
    try:
        r = kotta(enclave.home, "up", "--queue", "test", "--min", "1", "--max", "3",
                  "--workers", "1", "--cooldown", "1", "--poll-interval", "0.1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "scaler up: pid " in r.stdout
        scaler_pid = int(pid_file(enclave.home, "test").read_text().splitlines()[0])
        assert psutil.Process(scaler_pid).is_running()
        assert len(enclave.nodes.live("test")) == 1  # min

        ex = make_executor(1, start_node=False)
        futures = [ex.submit(tasks.wait_for_file, str(release)) for _ in range(12)]
        wait_for(lambda: len(enclave.nodes.live("test")) == 3, what="the pool to grow to 3")
        assert len(enclave.nodes.live("test")) == 3  # never beyond max

        tasks.release(release, "go")
        assert [f.result(GUARD) for f in futures] == ["go"] * 12
        wait_for(lambda: len(enclave.nodes.live("test")) == 1,
                 what="the pool to shrink back to 1")

        r = kotta(enclave.home, "down")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"scaler of queue test (pid {scaler_pid}) stopped" in r.stdout
        assert enclave.nodes.live() == []
        wait_for(lambda: gone(scaler_pid), what="the scaler to exit")
        assert not pid_file(enclave.home, "test").exists()
    finally:
        _kill_everything(enclave)


def test_up_refuses_a_second_scaler_and_bad_bounds(enclave):
    try:
        r = kotta(enclave.home, "up", "--min", "3", "--max", "2")
        assert r.returncode == 2 and "--min" in r.stderr
        r = kotta(enclave.home, "up", "--min", "1", "--max", "2", "--workers", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        r = kotta(enclave.home, "up", "--min", "1", "--max", "2", "--workers", "1")
        assert r.returncode == 2 and "already running" in r.stderr
        r = kotta(enclave.home, "down")
        assert r.returncode == 0, r.stdout + r.stderr
        assert enclave.nodes.live() == []
    finally:
        _kill_everything(enclave)


def test_a_scaler_whose_enclave_directory_is_removed_stops_and_makes_no_new_one(enclave):
    """``rm -rf`` of the enclave directory under an elastic pool: its nodes stop (they
    serve what nobody can reach), and the scaler, finding fewer than --min, started new
    ones, which made a new empty enclave in the removed one's place, and served it on.
    The scaler stops too, and the directory stays removed."""
    import shutil

    pids = []
    try:
        r = kotta(enclave.home, "up", "--min", "1", "--max", "1", "--workers", "1",
                  "--visibility-timeout", "0.6", "--cooldown", "0.4")
        assert r.returncode == 0, r.stdout + r.stderr
        scaler = int(pid_file(enclave.home, "test").read_text().splitlines()[0])
        [node] = enclave.nodes.live("test")
        pids = [scaler, node.pid]
        shutil.rmtree(enclave.home)
        wait_for(lambda: gone(scaler) and gone(node.pid), what="the scaler and its node to stop")
        assert not enclave.home.exists()
    finally:
        for pid in pids:
            try:
                for p in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
                    p.kill()
            except psutil.Error:
                pass
        _kill_everything(enclave)
