"""The process environment a researcher's machine gives a client: a working directory
removed under it, odd variables, warnings made errors.  Each test runs a real client
program as a subprocess (its own environment and working directory), which starts its own
local node on the test's enclave ($KOTTA_HOME, tests/conftest.py) and stops it as it exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import GUARD, ROOT, subprocess_env

_HELPER = """
def square(x):
    return x * x
"""


def _client(tmp_path: Path, body: str, *, env: dict | None = None, cwd: Path | None = None,
            flags: tuple[str, ...] = (), preexec_fn=None) -> subprocess.CompletedProcess:
    """Run ``body`` as a script ``proj/client.py``, beside a module ``helper`` (its
    ``square`` goes by reference: the node must import it as the client does)."""
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    (proj / "helper.py").write_text(_HELPER)
    script = proj / "client.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, *flags, str(script)], env={**subprocess_env(), **(env or {})},
        cwd=cwd or tmp_path, capture_output=True, text=True, timeout=3 * GUARD,
        preexec_fn=preexec_fn,
    )


def test_a_client_whose_working_directory_was_removed_runs_its_tasks(tmp_path):
    """A notebook or script whose directory was removed under it (a scratch directory
    cleaned up): ProcessPoolExecutor's forked workers run on.  The node the executor
    started died at its start, six times (node.worker read ``os.getcwd()`` as it was
    imported), and the future raised ``BrokenEnclave: ... kotta: error: [Errno 2] No such
    file or directory``; with ``""`` on ``sys.path`` (a notebook's, ``python -c``'s) the
    manager thread itself failed for a minute on the same error, and broke the executor."""
    gone = tmp_path / "scratch"
    gone.mkdir()
    r = _client(tmp_path, f"""
        import os, sys
        from kotta_executor import KottaExecutor
        import helper

        def inc(x):
            return x + 1

        def where():
            try:
                return os.getcwd()
            except FileNotFoundError:
                return "gone"

        def elsewhere():
            os.chdir("/")

        os.chdir({str(gone)!r})
        sys.path.insert(0, "")  # as a notebook has it
        os.rmdir({str(gone)!r})
        with KottaExecutor(max_workers=1) as ex:
            print(ex.submit(inc, 1).result({GUARD}), ex.submit(helper.square, 3).result({GUARD}))
            ex.submit(elsewhere).result({GUARD})
            print(ex.submit(where).result({GUARD}))  # back where the worker started
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "9", "gone"], r.stdout + r.stderr


def test_an_executor_leaves_no_socket_open_for_a_resource_warning(tmp_path):
    """A user's tests run with ``-W error`` (or ``python -X dev``): ProcessPoolExecutor
    leaves nothing behind that warns.  The embedded enclave an executor opened kept its
    doorbell and hand-off sockets open after shutdown, and collected, each was a
    ``ResourceWarning: unclosed <socket.socket ...>`` (pytest: a
    PytestUnraisableExceptionWarning, an error under ``-W error``)."""
    r = _client(tmp_path, f"""
        import gc
        from kotta_executor import KottaExecutor

        def inc(x):
            return x + 1

        def run():
            with KottaExecutor(max_workers=1) as ex:
                assert ex.submit(inc, 1).result({GUARD}) == 2  # a lone task: handed off
                assert list(ex.map(inc, range(3), timeout={GUARD})) == [1, 2, 3]  # rung

        run()
        gc.collect()
        print("collected")
    """, flags=("-X", "dev", "-W", "error::ResourceWarning"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["collected"]
    assert "ResourceWarning" not in r.stderr, r.stderr


def test_a_script_run_from_a_directory_of_modules_that_shadow_the_standard_library(tmp_path):
    """``python ~/code/run.py`` from a directory that holds a ``queue.py``, ``select.py``
    or ``uuid.py`` of the user's: not on the client's path (a script's is its own
    directory), nor on a ProcessPoolExecutor worker's.  The node the executor started, a
    ``python -m node`` in that directory, had it first on its path, imported them in place
    of the standard library's, and died six times: ``BrokenEnclave``."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("queue", "select", "uuid", "platform", "token"):
        (data / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py')\n")
    _squares_with(tmp_path, "helper", cwd=data)


def test_a_client_run_with_python_E_starts_a_node_that_ignores_the_environment_too(tmp_path):
    """``python -E`` (or ``-I``) is how one runs Python where the environment holds a
    PYTHONHOME of another Python (an HPC module's, left set): ProcessPoolExecutor's
    spawned workers get ``-E`` too.  The node the executor started read that PYTHONHOME,
    could not find its standard library, and died at its start, six times:
    ``BrokenEnclave ... ends: <no Python frame>``."""
    _squares_with(tmp_path, "helper", env={"PYTHONHOME": str(tmp_path / "no-such-python")},
                  flags=("-E",), first=f"import sys; sys.path.insert(0, {str(ROOT)!r})"
                  "  # (PYTHONPATH is ignored too)")


def test_a_client_started_with_sigchld_ignored_gets_true_exit_statuses(tmp_path):
    """A client started by a process that ignores SIGCHLD (exec keeps it ignored, and so
    do the node and workers it starts): the kernel reaped the node's workers itself, and
    the node read 0 for every exit status.  A worker that died with ``os._exit(7)`` was
    ``WorkerDied`` with ``exitcode`` 0, and a task's ``subprocess.run(...)`` of a
    command that failed returned 0."""
    r = _client(tmp_path, f"""
        import signal, subprocess
        from kotta_executor import KottaExecutor, WorkerDied
        from tests import tasks

        def fails():
            return subprocess.run(["sh", "-c", "exit 3"]).returncode

        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN
        with KottaExecutor(max_workers=1) as ex:
            try:
                ex.submit(tasks.exit_hard, 7).result({GUARD})
            except WorkerDied as e:
                print(e.exitcode)
            print(ex.submit(fails).result({GUARD}))
    """, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7", "3"], r.stdout + r.stderr


def test_a_client_started_with_sigchld_ignored_counts_its_nodes_deaths(tmp_path):
    """A client started with SIGCHLD ignored: the kernel reaps the node it starts, and
    Popen read 0 (a clean stop's code) for a node killed by SIGKILL.  Such a node was
    started again for ever, its count of deaths begun anew each time; now a death counts
    though its status is lost, and the executor breaks once the node has died too often."""
    r = _client(tmp_path, f"""
        import os, signal, time
        from kotta_executor import KottaExecutor, BrokenEnclave
        from kotta_executor import executor as executor_module

        def inc(x):
            return x + 1

        executor_module.MAX_NODE_RESTARTS = 1  # (the count is what is under test)
        ex = KottaExecutor(max_workers=1)
        for i in range(3):
            try:
                print(ex.submit(inc, i).result({GUARD}))
            except BrokenEnclave as e:
                print("BrokenEnclave", e)
                break
            [node] = list(ex._nodes.values())
            os.kill(node.pid, signal.SIGKILL)  # not a clean stop: a death
            while True:  # (until the kernel has reaped it: it is then no process)
                try:
                    os.kill(node.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)
        os._exit(0)
    """, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["1", "2"], r.stdout + r.stderr
    assert lines[2].startswith("BrokenEnclave the local node for queue 'test' died 2 times "
                               "(last exit code unknown: this process ignores SIGCHLD)"), r.stdout



def test_what_a_task_prints_comes_back_whatever_the_locale_encoding(tmp_path):
    """A task's prints are read back as UTF-8: the worker wrote them in the locale's
    encoding, which the node and its workers inherit.  Under a Latin-1 one
    (``PYTHONIOENCODING=latin-1`` stands for it) ``future.stdout`` held "caf\\ufffd"
    for "café", and under an ASCII one (``LANG=C`` with ``PYTHONUTF8=0``) the task failed
    with UnicodeEncodeError."""
    for environ in ({"PYTHONIOENCODING": "latin-1"},
                    {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}):
        r = _client(tmp_path, f"""
            import sys
            from kotta_executor import KottaExecutor

            TEXT = "caf\\u00e9 \\u2713"

            def say(text):
                print(text)
                print(text, file=sys.stderr)

            with KottaExecutor(max_workers=1) as ex:
                f = ex.submit(say, TEXT)
                f.result({GUARD})
                print(f.stdout == f.stderr == TEXT + "\\n", ascii(f.stdout), ascii(f.stderr))
        """, env=environ)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "True", (environ, r.stdout)


def test_a_script_in_a_directory_whose_name_holds_a_colon_has_its_modules_imported(tmp_path):
    """A script in ``runs/12:00:00/`` (a run's time in its name) beside its ``helper.py``:
    ProcessPoolExecutor's workers import ``helper`` as the script does.  The node the
    executor started got the script's directory on PYTHONPATH, which split it at the
    colon, and every task that named ``helper.square`` failed: ``SerializationError: ...
    No module named 'helper'``."""
    run = tmp_path / "runs" / "12:00:00"
    run.mkdir(parents=True)
    _squares_with(run, "helper", cwd=tmp_path)


def test_a_module_the_client_imports_from_a_zip_archive_is_imported_by_the_tasks(tmp_path):
    """A zip archive on the client's path (``PYTHONPATH=libs.zip``, an egg, a zipapp):
    ProcessPoolExecutor's workers import from it.  The node the executor started got the
    client's path less everything that is not a directory, and a task naming a function of
    the archive failed: ``SerializationError: ... No module named 'zipped'``."""
    import zipfile

    archive = tmp_path / "libs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped.py", _HELPER)
    _squares_with(tmp_path, "zipped",
                  env={"PYTHONPATH": f"{subprocess_env()['PYTHONPATH']}{os.pathsep}{archive}"})


def test_a_module_imported_from_the_working_directory_before_a_chdir_is_found_by_the_tasks(
        tmp_path):
    """A notebook (``""`` on its path) that imports ``mylib`` from its directory, then
    changes to ``data/`` before its first submit: ``mylib`` stays imported in the client,
    and a forked pool's workers have it.  The node the executor started resolved ``""``
    against ``data/``, and ``mylib.square`` failed: ``SerializationError: ... No module
    named 'mylib'``."""
    lib = tmp_path / "lib"
    (lib / "data").mkdir(parents=True)
    (lib / "mylib.py").write_text(_HELPER)
    (lib / "mypkg").mkdir()
    (lib / "mypkg" / "__init__.py").write_text("")
    (lib / "mypkg" / "sub.py").write_text(_HELPER)
    r = _client(tmp_path, f"""
        import os, sys
        sys.path.insert(0, "")  # as a notebook has it
        from kotta_executor import KottaExecutor
        import mylib
        import mypkg.sub

        os.chdir("data")
        with KottaExecutor(max_workers=1) as ex:
            print(ex.submit(mylib.square, 3).result({GUARD}),
                  ex.submit(mypkg.sub.square, 4).result({GUARD}),
                  ex.submit(os.getcwd).result({GUARD}))
    """, cwd=lib)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["9", "16", str(lib / "data")], r.stdout + r.stderr


def test_a_relative_kotta_home_is_the_same_directory_after_a_chdir(tmp_path):
    """``KOTTA_HOME=.kotta`` (a project's own), and a script that changes to ``data/``
    after it made its executor: its enclave was ``proj/.kotta``, but the client read
    ``data/.kotta/queues.json`` at submit, and so did its node (its venv cache was under
    ``data/.kotta`` too): a walltime the project's queues.json allows was refused,
    ``ConfigurationError: ... over the cap of the test queue (60 min)``."""
    lib = tmp_path / "lib"
    (lib / "data").mkdir(parents=True)
    (lib / ".kotta").mkdir()
    (lib / ".kotta" / "queues.json").write_text('{"test": {"max_walltime": 120}}')
    r = _client(tmp_path, f"""
        import os
        from kotta_executor import KottaExecutor

        def home():
            return os.environ["KOTTA_HOME"]

        with KottaExecutor(max_workers=1, walltime=90) as ex:
            os.chdir("data")
            print(ex.enclave.home, ex.submit(home).result({GUARD}))
    """, cwd=lib, env={"KOTTA_HOME": ".kotta"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(lib / ".kotta")] * 2, r.stdout + r.stderr


def test_a_relative_kotta_enclave_is_the_same_enclave_after_a_chdir(tmp_path):
    """``KOTTA_ENCLAVE=lab`` (a project's enclave), as ``KOTTA_HOME=.kotta`` above: it
    was taken against the working directory anew at each use.  An executor made after
    ``os.chdir("data")`` opened a new, empty enclave, ``data/lab``, and so did a task
    (which had it, relative, from its node) that used kotta after changing directory."""
    lib = tmp_path / "lib"
    (lib / "data").mkdir(parents=True)
    r = _client(tmp_path, f"""
        import os
        from kotta_executor import KottaExecutor

        def enclave_here(d):
            os.chdir(d)
            from kotta_executor.backends import open_enclave
            return open_enclave().url

        with KottaExecutor(max_workers=1) as ex:
            print(ex.enclave.url, ex.submit(enclave_here, "data").result({GUARD}))
            os.chdir("data")
            with KottaExecutor(max_workers=1, start_node=False) as later:
                print(later.enclave.url)
    """, cwd=lib, env={"KOTTA_ENCLAVE": "lab"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"embedded://{lib / 'lab'}"] * 3, r.stdout + r.stderr
    assert not (lib / "data" / "lab").exists()


def test_an_environment_too_big_to_start_a_node_with_is_an_error_that_names_it(tmp_path):
    """A client that put a big value in its environment (a serialized config, 2 MB): the
    node it started could not be, ``[Errno 7] Argument list too long``, tried for a
    minute, and then the future raised a BrokenEnclave that said only that.  Now it
    fails at once, naming the environment's size and its largest variable."""
    r = _client(tmp_path, f"""
        import os
        from kotta_executor import KottaExecutor

        def inc(x):
            return x + 1

        os.environ["BIG_CONFIG"] = "x" * 3_000_000
        ex = KottaExecutor(max_workers=1)
        try:
            print(ex.submit(inc, 1).result({GUARD}))
        except Exception as e:
            print(type(e).__name__, e)
        os._exit(0)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("BrokenEnclave "), r.stdout + r.stderr
    assert "environment" in r.stdout and "its largest variables: BIG_CONFIG (2929.7 KiB)" in r.stdout, r.stdout


def test_the_interpreter_options_of_the_client_are_its_tasks_too(tmp_path):
    """``python -X utf8 -X dev -W error::UserWarning -O client.py``: ProcessPoolExecutor's
    spawned workers run with the same options (multiprocessing passes them on).  The
    node the executor started, and its workers, ran with none of them: a task's
    ``open()`` used the locale's encoding, not UTF-8, its warnings were not errors, and
    its asserts ran."""
    r = _client(tmp_path, f"""
        import sys, warnings
        from kotta_executor import KottaExecutor

        def flags():
            try:
                warnings.warn("strict", UserWarning)
                warned = "ignored"
            except UserWarning:
                warned = "raised"
            return [sys.flags.utf8_mode, sys.flags.dev_mode, sys.flags.optimize, warned]

        with KottaExecutor(max_workers=1) as ex:
            print(*ex.submit(flags).result({GUARD}), *flags())
    """, flags=("-X", "utf8", "-X", "dev", "-W", "error::UserWarning", "-O"),
        env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "1", "raised"] * 2, r.stdout + r.stderr


def _squares_with(where, module: str, first: str = "", **kwargs) -> None:
    """A client program in ``where`` (its first line ``first``) whose tasks are a function
    of its own, ``inc(1)``, and ``module.square(3)``: it prints 2 and 9."""
    r = _client(where, f"""
        {first}
        from kotta_executor import KottaExecutor
        import {module}

        def inc(x):
            return x + 1

        with KottaExecutor(max_workers=1) as ex:
            print(ex.submit(inc, 1).result({GUARD}), ex.submit({module}.square, 3).result({GUARD}))
    """, **kwargs)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "9"], r.stdout + r.stderr


def test_a_node_py_of_the_users_beside_the_script_is_an_error_that_names_it(tmp_path):
    """A project with a ``node.py`` of its own (a graph's nodes) beside the script: the
    node the executor started, ``python -m node`` on the client's path, ran that module
    in place of kotta's node package; it exited 0, and the executor started it again,
    for ever: a future that never ended, a warning a second.  Now the future fails at
    once, naming the module that stands in for kotta's."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "node.py").write_text("class Node:\n    pass\n")
    r = _client(tmp_path, f"""
        import os
        from kotta_executor import KottaExecutor
        import node

        def inc(x):
            return x + 1

        ex = KottaExecutor(max_workers=1)
        try:
            print(ex.submit(inc, 1).result({GUARD / 2}))
        except Exception as e:
            print(type(e).__name__, e)
        os._exit(0)
    """)
    assert r.returncode == 0, r.stderr
    node_py = tmp_path / "proj" / "node.py"
    assert r.stdout.startswith("BrokenEnclave "), r.stdout + r.stderr
    assert f"{node_py} has the name of kotta's own package, node" in r.stdout, r.stdout
