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


def test_every_exception_the_docs_name_is_importable_from_the_package():
    """The guide tells users what a future raises (`DataAccessDenied`, `EgressDenied`,
    `TaskRejected`...): each exception class of kotta_executor.errors that README.md or
    docs/ names in backticks is a name of the package itself, as `WorkerDied` is."""
    import inspect
    import re

    import kotta_executor
    from kotta_executor import errors

    named = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named |= set(re.findall(r"`([A-Z]\w+)", doc.read_text()))
    classes = {name for name, c in vars(errors).items()
               if inspect.isclass(c) and issubclass(c, BaseException)
               and c.__module__ == errors.__name__}
    assert named & classes >= {"DataAccessDenied", "WorkerDied"}  # (the scan finds them)
    for name in sorted(named & classes):
        assert name in kotta_executor.__all__, name
        assert getattr(kotta_executor, name) is getattr(errors, name), name
