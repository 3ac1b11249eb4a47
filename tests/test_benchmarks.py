"""The benchmark harness (benchmarks/run.py): its medians and spreads, and one quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.run import make_rows, median_result, spread_lines

ROOT = Path(__file__).resolve().parent.parent


def test_the_median_of_several_runs_is_taken_figure_by_figure():
    runs = [{"tasks_per_s": 10.0, "seconds": 3.0}, {"tasks_per_s": 30.0, "seconds": 1.0},
            {"tasks_per_s": 20.0, "seconds": 2.0}]
    assert median_result(runs) == {"tasks_per_s": 20.0, "seconds": 2.0}
    assert median_result([runs[0], "RuntimeError: broken"]) == "RuntimeError: broken"


def test_the_spread_pairs_runs_in_order_for_the_ratio():
    runs = {"submit": {"kotta": [{"tasks_per_s": 4000.0}, {"tasks_per_s": 6000.0}],
                       "ppe": [{"tasks_per_s": 5000.0}, {"tasks_per_s": 4000.0}]}}
    [line] = spread_lines(runs)
    assert line == ("submit() + wait (tasks/s): kotta 4,000 to 6,000, ppe 4,000 to 5,000, "
                    "ratio 0.8 to 1.5")
    # the table shows the medians, and their ratio
    [row] = make_rows({"submit": {k: median_result(v) for k, v in runs["submit"].items()}})
    assert (row.kotta, row.ppe, row.ratio, row.met) == (5000.0, 4500.0, 5000.0 / 4500.0, False)


def test_a_quick_repeated_run_prints_the_table_and_the_spread(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "roundtrip",
         "--repeat", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "no-op round trip median (ms)" in done.stdout
    assert "spread over 2 runs" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["repeat"] == 2
    assert [len(doc["runs"]["roundtrip"][k]) for k in ("kotta", "ppe")] == [2, 2]
    medians = sorted(r["median_ms"] for r in doc["runs"]["roundtrip"]["kotta"])
    assert doc["results"]["roundtrip"]["kotta"]["median_ms"] == sum(medians) / 2


def test_repeat_must_be_positive():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--repeat", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 2
    assert "--repeat must be at least 1" in done.stderr


def test_the_floor_model_carries_every_task_to_its_result_and_prints_its_ratio(tmp_path):
    # benchmarks/floor_model.py: the stripped model of the task path; it checks every
    # result itself (a no-op returns its argument) and exits non-zero if one is wrong
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "floor_model.py"), "--tasks", "300",
         "--repeat", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    runs = [line for line in done.stdout.splitlines() if line.startswith("run ")]
    assert len(runs) == 2
    assert all("model CPU us a task: client" in line and "worker 2" in line for line in runs)
    assert "median ratio" in done.stdout


def test_the_submit_rows_show_cpu_a_task_beside_the_rate_when_measured():
    kotta = {"tasks_per_s": 4000.0, "cpu_us_per_task": 350.0, "client_cpu_us_per_task": 100.0,
             "node_cpu_us_per_task": 180.0}
    ppe = {"tasks_per_s": 6000.0, "cpu_us_per_task": 200.0, "client_cpu_us_per_task": 160.0}
    rows = make_rows({"submit": {"kotta": kotta, "ppe": ppe}})
    assert [(r.metric.strip(), r.kotta, r.ppe, r.target) for r in rows] == [
        ("submit() + wait (tasks/s)", 4000.0, 6000.0, "ratio >= 1.5x"),
        ("its CPU a task, all processes (us)", 350.0, 200.0, ""),
        ("of which the client's (us)", 100.0, 160.0, ""),
        ("of which the node's (us)", 180.0, None, ""),  # (ProcessPoolExecutor has none)
    ]
    assert rows[1].ratio == 1.75 and rows[1].met is None
    assert rows[3].ratio is None and rows[3].met is None
    # a run that did not measure them (an older JSON, say) shows the rate alone
    [row] = make_rows({"submit": {"kotta": {"tasks_per_s": 1.0}, "ppe": {"tasks_per_s": 2.0}}})
    assert row.metric == "submit() + wait (tasks/s)"


def test_the_aws_call_count_runs_a_map_on_moto(tmp_path):
    # benchmarks/aws_calls.py: a map against moto's server on 127.0.0.1, every call counted
    # (it checks the map's results itself); a smoke run, so that it does not rot unseen
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aws_calls.py"), "--items", "10", "--idle", "0",
         "--workers", "1", "--long-poll", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "map of 10 items" in done.stdout
    assert "calls per map item:" in done.stdout and "node    UpdateItem" in done.stdout
