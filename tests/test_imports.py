"""What importing the packages loads: a worker process (started for every owner, and again
after every crash) loads the wire format, not the executor or the node daemon; the
package's names and submodules are still there on first use."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import GUARD, ROOT, subprocess_env


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=GUARD)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_worker_process_loads_neither_the_executor_nor_the_daemon():
    loaded = _python(
        "import sys, node.worker; print(' '.join(sorted(m for m in sys.modules"
        " if m in ('kotta_executor.executor', 'node.daemon', 'kotta_executor.wire'))))"
    )
    assert loaded == "kotta_executor.wire"


def test_names_and_submodules_load_on_first_use():
    out = _python(
        "import kotta_executor as k, node\n"
        "print(k.KottaExecutor.__module__, k.connect.__module__, k.KottaJob.__module__,"
        " node.Node.__module__, k.config.__name__, k.backends.__name__)\n"
        "try:\n    k.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
        "from kotta_executor import *\nprint(KottaFuture.__name__)"
    )
    assert out.splitlines() == [
        "kotta_executor.executor kotta_executor.decorator kotta_executor.script node.daemon"
        " kotta_executor.config kotta_executor.backends",
        "module 'kotta_executor' has no attribute 'no_such_name'",
        "KottaFuture",
    ]
