"""A node whose descriptors are numbered past FD_SETSIZE (1024): a node of many workers
(the production queue allows 256, four descriptors each), or one started by a process
that holds many files and lets the node inherit them.  ``select.select`` takes no such
descriptor (ValueError), and the node's loop used it."""

from __future__ import annotations

import os
import sys

from tests import tasks
from tests.conftest import GUARD


def test_a_node_with_descriptors_past_1024_runs_tasks(start_node, make_executor, tmp_path):
    # the node's interpreter, started holding 1100 open descriptors (inherited across exec)
    python = tmp_path / "python-with-many-files"
    python.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "for _ in range(1100):\n"
        "    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    python.chmod(0o755)
    node = start_node(workers=2, python=str(python))
    ex = make_executor(1, start_node=False)
    # the bug: the node died at its first wait ("filedescriptor out of range in select()"),
    # and the tasks waited for a node that never came
    assert [f.result(GUARD) for f in [ex.submit(tasks.square, i) for i in range(4)]] == [
        0, 1, 4, 9]
    assert node.proc.poll() is None, node.output()[-2000:]
    assert len(os.listdir(f"/proc/{node.pid}/fd")) > 1100  # (it did hold them)
