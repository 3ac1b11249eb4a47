"""Task ``requirements``: installed by the node into a cached venv, used only by their tasks.

No network: the test writes a tiny wheel (``kotta_probe_pkg``) into a directory and points
the node's pip at it with pip's own environment variables (``PIP_NO_INDEX``,
``PIP_FIND_LINKS``), which the node passes on to pip.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotta_executor import RequirementsError, WorkerDied, config, kottajob, requirements, wire
from kotta_executor.errors import ConfigurationError
from kotta_executor.requirements import env_key, normalize
from node import envs
from tests import tasks
from tests.conftest import GUARD, ROOT, wait_for

#: a venv build (venv + pip install) is slow compared to a task: a larger deadlock guard
BUILD_GUARD = 4 * GUARD
PROBE = "kotta-probe-pkg==1.0"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(wheel_dir: Path, version: str = "1.0", name: str = "kotta_probe_pkg",
               requires: tuple[str, ...] = (), requires_python: str | None = None) -> Path:
    """A minimal pure-Python wheel of ``kotta_probe_pkg`` (written directly: no build
    backend); or of another package ``name``, which needs ``requires`` (and a Python
    ``requires_python``)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    if requires_python:
        needs += f"Requires-Python: {requires_python}\n"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n'.encode(),
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
            f"{needs}"
        ).encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: kotta-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        f"{dist}/top_level.txt": f"{name}\n".encode(),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    record += f"{dist}/RECORD,,\n"
    path = wheel_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/RECORD", record)
    return path


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> Path:
    """pip on the node (and in this process) finds packages only in a local wheel directory."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("KOTTA_ENVS", raising=False)
    return wheels


def _env_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_requirements_are_normalised_and_travel_in_the_header(make_executor):
    assert normalize("Pandas == 2.2\nnumpy  # fast arrays\n\n# comment\nnumpy\n") == (
        "numpy\npandas==2.2"
    )
    assert normalize(["numpy", "Kotta_Probe.Pkg==1"]) == "kotta-probe-pkg==1\nnumpy"
    assert env_key("numpy\npandas==2.2") == env_key("pandas==2.2\nnumpy\n")
    assert env_key("numpy") == hashlib.sha256(b"numpy").hexdigest()
    with pytest.raises(ConfigurationError):
        normalize("--index-url http://elsewhere\nnumpy")
    with pytest.raises(ConfigurationError):
        normalize(42)

    ex = make_executor(1, requirements="numpy\nPandas==2.2", start_node=False)
    job = ex._new_job("0" * 32, len, [(([],), {})], ex._options)
    assert wire.peek_header(job.body)["requirements"] == "numpy\npandas==2.2"
    view = ex.with_options(requirements="")  # drops the executor's requirements
    job = view._parent._new_job("1" * 32, len, [(([],), {})], view._options)
    assert "requirements" not in wire.peek_header(job.body)
    with pytest.raises(ConfigurationError):
        ex.with_options(requirements=["numpy", 3])


def test_markers_and_extras_keep_their_meaning():
    assert normalize('foo; sys_platform == "linux"  and python_version>="3"') == (
        'foo; sys_platform == "linux" and python_version >= "3"'
    )
    assert normalize('Foo[b, a] >=1.0, <2; python_version not in "2.7"') == (
        'foo[a,b]<2,>=1.0; python_version not in "2.7"'
    )


def test_extras_spelled_differently_are_one_set():
    """Extras are names as a project's are (PEP 685: pip compares them normalised): in
    other spellings the same set had another env key, and was built again, beside."""
    assert normalize("Foo[B, a]") == normalize("foo[a,b]") == "foo[a,b]"
    assert normalize(["foo[Dev_Tools]", "foo[dev-tools]", "foo[dev.tools]"]) == (
        "foo[dev-tools]")
    assert env_key("Foo[SOCKS]==1.0") == env_key("foo[socks] == 1.0")


@pytest.mark.parametrize("line", [
    "pkg @ https://example.com/pkg-1.0-py3-none-any.whl#sha256=abc",
    "pkg @ git+https://example.com/pkg.git@v1",
    "pkg @ file:///tmp/wheels/pkg-1.0-py3-none-any.whl",
    'pkg[x] @ https://example.com/pkg.tar.gz ; python_version >= "3"',
])
def test_a_requirement_naming_where_it_comes_from_is_refused(line):
    """The node decides where packages come from (its index, a mirror, a wheel directory):
    a direct reference would have pip fetch a URL of the client's choosing, past
    PIP_NO_INDEX and PIP_INDEX_URL."""
    with pytest.raises(ConfigurationError, match="may not name where a package comes from") as info:
        normalize(["numpy", line])
    assert repr(line.split(" #", 1)[0].strip()) in str(info.value)


@pytest.mark.parametrize("line", ["numpy --hash=sha256:abc", "numpy==", "a b c", "-e ."])
def test_what_is_not_a_requirement_is_refused_naming_it(line):
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))):
        normalize(["numpy", line])


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,6}([-_.][A-Za-z0-9]{1,4})?", fullmatch=True)
_specs = st.lists(
    st.tuples(st.sampled_from(["==", ">=", "<=", "<", ">", "~=", "!="]),
              st.from_regex(r"[0-9]{1,2}(\.[0-9]{1,2}){1,2}", fullmatch=True)),
    max_size=2, unique_by=lambda t: t[0],
)


@given(st.lists(st.tuples(_names, _specs, st.sampled_from(["", " ", "  "])), max_size=5))
def test_normalising_is_stable_and_blind_to_spacing(reqs):
    lines = [f"{name}{pad}{','.join(op + pad + v for op, v in spec)}" for name, spec, pad in reqs]
    once = normalize(lines)
    assert normalize(once) == once  # what a client sends, normalised again, is the same set
    assert normalize(" \n".join(reversed(lines))) == once  # order and spacing do not matter
    assert env_key(once) == env_key("\n".join(lines))


@given(st.lists(st.tuples(_names, _specs), max_size=5),
       st.sampled_from([" ", "\t", "  \t", "\t "]), st.text(max_size=20))
def test_a_comment_after_any_whitespace_is_a_comment(reqs, space, comment):
    """As pip reads requirement files: ``#`` after a tab begins a comment as after a space
    (``numpy<TAB># fast arrays`` used to be refused as not a requirement)."""
    comment = comment.replace("\n", " ").replace("\r", " ")
    lines = [f"{name}{','.join(op + v for op, v in spec)}" for name, spec in reqs]
    commented = [f"{line}{space}#{comment}" for line in lines]
    assert normalize(commented + [f"#{comment}", f"{space}#{comment}"]) == normalize(lines)


def test_a_set_too_long_for_a_task_header_is_refused_when_given(make_executor):
    """The set travels in the task header, which a node reads up to wire.MAX_HEADER bytes
    of: a longer one was accepted, and its tasks failed as a "corrupt task message" whose
    "header runs past the end", naming neither the requirements nor their length."""
    lines = [f"kotta-a-rather-long-package-name-number-{i}==1.0" for i in range(25000)]
    ex = make_executor(1, start_node=False)
    with pytest.raises(ConfigurationError, match="requirements .* bytes") as info:
        ex.with_options(requirements=lines)
    assert f"{requirements.MAX_BYTES:,}" in str(info.value)
    view = ex.with_options(requirements=lines[:2000])  # a long set that fits still travels
    job = view._parent._new_job("1" * 32, len, [(([],), {})], view._options)
    assert wire.peek_header(job.body)["requirements"] == normalize(lines[:2000])


def test_a_hash_inside_a_requirement_is_not_a_comment():
    with pytest.raises(ConfigurationError, match="not a requirement"):
        normalize("numpy#fast")


def test_tasks_with_requirements_run_in_a_cached_env(make_executor, offline_pip, capsys):
    home = Path(os.environ["KOTTA_HOME"])
    root = home / "envs"

    def probe():
        import kotta_probe_pkg

        return kotta_probe_pkg.__version__, kotta_probe_pkg.__file__, os.getpid()

    ex = make_executor(2)
    view = ex.with_options(requirements=PROBE)

    t0 = time.monotonic()
    version, where, pid = view.submit(probe).result(timeout=BUILD_GUARD)
    first = time.monotonic() - t0
    assert version == "1.0"
    key = envs.env_name(PROBE)
    env = root / key
    assert Path(where).is_relative_to(env)  # installed in the env, not in the node's python
    assert _env_dirs(root) == [key]  # built once, renamed into place (no temp dirs left)
    marker = env / envs.MARKER
    built_at = marker.stat().st_mtime_ns
    assert marker.read_text() == "kotta-probe-pkg==1.0\n"

    # a task without requirements, on the same node, cannot import it: ImportError as itself
    with pytest.raises(ModuleNotFoundError, match="kotta_probe_pkg"):
        ex.submit(probe).result(timeout=GUARD)

    # the same set (spelled differently, through the decorator): the env is reused
    @kottajob(ex, "test", 5, requirements="Kotta_Probe_Pkg == 1.0\n# the probe\n")
    def probe_again():
        return probe()

    t0 = time.monotonic()
    version2, where2, pid2 = probe_again()
    warm = time.monotonic() - t0
    assert (version2, where2) == (version, where)
    assert pid2 == pid  # the same worker: keyed by (owner, requirement set)
    assert marker.stat().st_mtime_ns == built_at
    assert _env_dirs(root) == [key]

    # a new executor and node: the env on disk is found, not rebuilt
    ex.shutdown(wait=True)
    ex2 = make_executor(1, requirements=PROBE)
    t0 = time.monotonic()
    version3, where3, pid3 = ex2.submit(probe).result(timeout=GUARD)
    new_node = time.monotonic() - t0
    assert (version3, where3) == (version, where) and pid3 != pid
    assert marker.stat().st_mtime_ns == built_at
    assert _env_dirs(root) == [key]
    with capsys.disabled():
        print(
            f"\nrequirements: first task (env build) {first:.2f} s; task with the env built, "
            f"warm worker {warm * 1000:.1f} ms; new node and worker {new_node:.2f} s"
        )


def test_a_failed_install_fails_the_task_with_requirements_error(make_executor, offline_pip):
    ex = make_executor(1)
    f = ex.with_options(requirements="no-such-package-kotta==9").submit(os.getpid)
    with pytest.raises(RequirementsError) as info:
        f.result(timeout=BUILD_GUARD)
    message = str(info.value)
    assert "installing its requirements failed" in message
    assert "no-such-package-kotta==9" in message  # pip's own output (tail)
    assert "No matching distribution" in message or "Could not find a version" in message
    assert info.value.job_id == f.job_id
    assert f.status() == "failed"
    assert _env_dirs(Path(os.environ["KOTTA_HOME"]) / "envs") == []  # nothing half-built
    # the node goes on: a task without requirements still runs
    assert ex.submit(os.getpid).result(timeout=GUARD) != os.getpid()


def test_concurrent_builds_build_once(tmp_path, offline_pip):
    """Two builders (as two nodes on one machine would be) of one set: one builds, the other
    waits on the lock and finds the finished env."""
    root = tmp_path / "envs"
    key = envs.env_name(PROBE)
    results: list = []
    go = threading.Barrier(2)

    def builder():
        go.wait()
        results.append(envs.build(root, key, PROBE))

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: not any(t.is_alive() for t in threads), timeout=BUILD_GUARD,
             what="both builds")
    assert [r.path for r in results] == [root / key, root / key]
    assert _env_dirs(root) == [key]
    assert Path(results[0].python).exists()


def _probe_version():
    import kotta_probe_pkg

    return kotta_probe_pkg.__version__


def _die():
    os._exit(3)


def test_an_env_deleted_to_rebuild_it_is_rebuilt_not_a_node_crash(
        start_node, make_executor, offline_pip):
    """The guide: "Delete the directory to rebuild it."  The node remembered the env as
    ready and started its next worker there: the missing python crashed the node
    (FileNotFoundError), every task it ran with it."""
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    view = ex.with_options(requirements=PROBE)
    assert view.submit(_probe_version).result(timeout=BUILD_GUARD) == "1.0"
    env = root / envs.env_name(PROBE)
    shutil.rmtree(env)
    with pytest.raises(WorkerDied):  # its worker goes: the next task needs a new one
        view.submit(_die).result(timeout=GUARD)
    f = view.submit(_probe_version)
    wait_for(lambda: f.done() or node.proc.poll() is not None, what="the task, or the node's end")
    assert node.proc.poll() is None, node.output()[-2000:]
    assert f.result(timeout=GUARD) == "1.0"
    assert (env / envs.MARKER).exists()  # built again


def test_a_node_in_a_venv_gives_requirement_workers_its_editable_installs(
    tmp_path, offline_pip, make_executor, start_node
):
    """A node running in a virtual environment of its own, where a package is installed in
    editable mode (a ``.pth`` file naming its source directory, as pip's editable installs
    write): its tasks with requirements, in a venv made from the base interpreter, import
    it too (the node's site-packages reach them on PYTHONPATH, which reads no ``.pth``)."""
    node_venv = tmp_path / "node-venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(node_venv)], check=True, timeout=BUILD_GUARD)
    python = str(node_venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=GUARD,
    ).stdout.strip()
    source = tmp_path / "editable-source"
    source.mkdir()
    (source / "kotta_editable_probe.py").write_text("WHERE = 'editable'\n")
    (Path(purelib) / "kotta_editable_probe.pth").write_text(f"{source}\n")
    # kotta and its dependencies as the suite has them (whether its python is a venv's or not)
    start_node(python=python, workers=1, env={
        "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])})
    ex = make_executor(1, start_node=False)
    assert ex.submit(tasks.module_attr, "kotta_editable_probe", "WHERE").result(GUARD) == (
        "editable")
    view = ex.with_options(requirements=PROBE)
    assert view.submit(tasks.module_attr, "kotta_probe_pkg", "__version__").result(
        BUILD_GUARD) == "1.0"  # in the requirements venv
    assert view.submit(tasks.module_attr, "kotta_editable_probe", "WHERE").result(GUARD) == (
        "editable")
    # and so do the Python processes such a task starts
    assert view.submit(tasks.child_python, "import kotta_editable_probe as m; print(m.WHERE)"
                       ).result(GUARD) == "editable"


def _cmdline(p: psutil.Process) -> list[str]:
    """A process's command line; none for one that has ended since it was listed (a
    zombie, a short-lived step of the build: its cmdline() raised, failing the look)."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_a_node_stopped_while_it_installs_requirements_leaves_no_pip_running(
        start_node, make_executor, tmp_path, monkeypatch):
    """`kotta down` while a node builds a task's requirements: the node hands the task
    back and exits, and its pip goes with it (it ran on, orphaned, as long as pip would
    wait for its index, in a directory the next build deletes)."""
    index = _silent_index(monkeypatch)
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.with_options(requirements=PROBE).submit(_probe_version)

    def pip() -> list[psutil.Process]:
        try:
            kids = psutil.Process(node.pid).children(recursive=True)
        except psutil.Error:
            return []
        # (pip itself, not what runs it: ``python -c WATCHER NODE_PID python -m pip ...``)
        return [p for p in kids if {"pip", "install"} <= set(_cmdline(p))
                and "-c" not in _cmdline(p)[:3]]

    builders: list[psutil.Process] = []
    try:
        [builder] = builders[:] = wait_for(pip, what="the node to run pip")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(GUARD) == 0
        assert not builder.is_running() or builder.status() == psutil.STATUS_ZOMBIE, (
            "pip outlived its node")
        assert not f.done()  # handed back: it waits for a node
    finally:
        for p in builders:
            with contextlib.suppress(psutil.Error):
                p.kill()
        index.close()


def _silent_index(monkeypatch) -> socket.socket:
    """A package index on 127.0.0.1 that takes connections and never answers, which pip
    is set to use, and to wait 600 s for: a build that stays in pip."""
    index = socket.socket()
    index.bind(("127.0.0.1", 0))
    index.listen(16)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{index.getsockname()[1]}/simple")
    monkeypatch.setenv("PIP_TIMEOUT", "600")
    return index


def test_a_node_killed_while_it_installs_requirements_leaves_no_pip_running(
        start_node, make_executor, monkeypatch):
    """A node killed outright (SIGKILL, the OOM killer) while it builds a task's
    requirements: its pip, in a session of its own, ran on, orphaned, for as long as pip
    would wait for its index (workers end with their node: so does a build now)."""
    index = _silent_index(monkeypatch)
    index.settimeout(GUARD)
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.with_options(requirements=PROBE).submit(_probe_version)
    with contextlib.ExitStack() as stack:
        stack.callback(index.close)
        # pip has asked the index (so has written what it writes first): it waits now
        stack.enter_context(index.accept()[0])
        # pip (pip's --python runs a second pip in the venv's python) and what runs them
        builders = [p for p in psutil.Process(node.pid).children(recursive=True)
                    if "install" in _cmdline(p) and any("pip" in a for a in _cmdline(p))]
        assert builders
        for p in builders:
            stack.callback(_kill, p)
        node.kill()
        wait_for(lambda: not any(map(_alive, builders)), what="pip to end with its node")


def _kill(p: psutil.Process) -> None:
    with contextlib.suppress(psutil.Error):
        p.kill()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_req_parts = st.sampled_from([
    "numpy", "Numpy[Extra]", "[x", ">=1.0", "==1.*", "===", "===,", "~=", "!=", "1.0", ",", " ",
    "; python_version < '3.9'", " and ", " or ", "(", ")", "extra == 'x'", "@ https://x/y.whl",
    "--hash=x", "#c", "\t#c", "\\", "\n", "platform_machine", "'", '"', "<", ">", "=",
])


@settings(max_examples=300)
@given(st.lists(_req_parts | st.text(max_size=3), max_size=12).map("".join) | st.text())
def test_any_text_is_a_normalised_set_or_a_configuration_error(text):
    """Whatever a user (or a task header, on the node) gives, normalising it gives a set
    that normalises to itself, or a ConfigurationError: never packaging's own errors."""
    try:
        once = normalize(text)
    except ConfigurationError:
        return
    assert normalize(once) == once


@pytest.mark.parametrize("line", ["numpy===,numpy", "pkg===1.0,beta"])
def test_a_specifier_list_that_is_no_specifier_is_refused_naming_it(line):
    """packaging parses ``numpy===,numpy`` as a requirement whose specifiers it then
    refuses with its own InvalidSpecifier ("Invalid specifier: 'numpy'"), which escaped
    the executor's options (and the node's check of a task's header) unexplained."""
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))):
        normalize(["numpy", line])


@pytest.mark.parametrize("line, name", [("foo_", "foo_"), ("numpy[extra_]>=1", "extra_")])
def test_a_name_that_ends_in_punctuation_is_refused_naming_it(line, name):
    """packaging (26) reads ``foo_`` as a project, or ``extra_`` as an extra, though PEP
    508 names end in a letter or digit; written canonically that is ``foo-``, which it
    refuses: the executor sent ``foo-`` and the node failed the task, naming a line the
    user never wrote.  Now ``submit`` refuses the user's own line, naming it."""
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))) as info:
        normalize(["numpy", line])
    assert repr(name) in str(info.value)


def test_a_task_whose_requirements_packaging_refuses_does_not_kill_the_node(
        start_node, make_executor, enclave):
    """A signed task whose header names requirements the node's packaging refuses (one
    a client with another packaging version accepted): the node died of packaging's
    InvalidSpecifier as it dispatched the task, and every node after it that got it."""
    from kotta_executor.states import JobState
    from tests.conftest import node_outlives, queue_crafted_task

    ex = make_executor(1, start_node=False)
    job_id = queue_crafted_task(enclave, ex, lambda h: h.update(requirements="numpy===,numpy"))
    job = node_outlives(start_node(workers=1), enclave, job_id)
    assert job.state == JobState.FAILED and "numpy===,numpy" in job.reason
    assert ex.submit(tasks.square, 5).result(GUARD) == 25


def test_an_envs_directory_under_an_unknown_users_home_is_a_clean_node_error(
        enclave, monkeypatch):
    """``KOTTA_ENVS=~alcie/envs`` (a user this machine has not, mistyped): the node died
    at its start with a traceback ending in a bare RuntimeError ("Could not determine home
    directory."), naming neither the variable nor its value, as $KOTTA_HOME is named.  So
    did a remote enclave's node given such an ``XDG_CACHE_HOME``."""
    from tests.conftest import subprocess_env

    env = {**subprocess_env(), "KOTTA_ENVS": "~no-such-user-kotta/envs"}
    r = subprocess.run(
        [sys.executable, "-m", "node", "--enclave", str(enclave.home), "--workers", "1",
         "--burst"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=GUARD,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "$KOTTA_ENVS ~no-such-user-kotta/envs" in r.stderr, r.stderr

    monkeypatch.delenv("KOTTA_ENVS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "~no-such-user-kotta/cache")
    with pytest.raises(ConfigurationError, match=re.escape("$XDG_CACHE_HOME ~no-such-user")):
        envs.default_root(local=False)


@pytest.mark.parametrize("line", [
    "kotta-probe-pkg===${KOTTA_PROBE_VERSION}",
    'numpy; platform_release == "${HOME}"',
])
def test_a_requirement_naming_an_environment_variable_is_refused(line):
    """pip expands ``${VAR}`` in a requirements file from its own environment, the
    node's: the set was cached under the hash of the text the user wrote, while what it
    installed depended on the node that built it (another node with another value reused
    that build), and the variable's value came back in pip's output."""
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))):
        normalize(["numpy", line])


def test_an_env_whose_interpreter_is_gone_is_rebuilt(make_executor, offline_pip):
    """An env's python is a link to the interpreter that built it (another install of
    this Python version on the machine: the envs are keyed by version only): once that
    one was removed (``pyenv uninstall``, an upgrade), the env was still taken as built,
    and every task of its set failed with WorkerDied, its worker unable to start, until
    the user found the directory and deleted it."""
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    key = envs.env_name(PROBE)
    env = envs.build(root, key, PROBE)
    python = Path(env.python)
    assert python.is_symlink()
    python.unlink()
    python.symlink_to("/nonexistent-kotta-python/bin/python3")  # the interpreter removed
    ex = make_executor(1, requirements=PROBE)
    assert ex.submit(_probe_version).result(timeout=BUILD_GUARD) == "1.0"
    assert Path(env.python).exists()  # built again
    assert _env_dirs(root) == [key]


def test_a_worker_that_cannot_be_started_fails_its_task_not_the_node(
        start_node, make_executor, offline_pip):
    """An env whose python is there but cannot be run (a binary for another machine, a
    half-copied one): ``pool.spawn`` raised OSError (ENOEXEC) inside the node's
    step, which killed the node; every task it held ran again elsewhere, where the same
    fault killed the next node.  Now the task planned for that worker fails, naming what
    could not be started, and the node goes on serving other tasks."""
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    env = envs.build(root, envs.env_name(PROBE), PROBE)
    python = Path(env.python)
    python.unlink()
    # there and executable (the env is taken as usable), but no program: a binary for
    # another machine, a half-copied one (ENOEXEC)
    python.write_bytes(b"\0garbage\n")
    python.chmod(0o755)
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    f = ex.with_options(requirements=PROBE).submit(_probe_version)
    wait_for(lambda: f.done() or node.proc.poll() is not None, what="the task, or the node's end")
    assert node.proc.poll() is None, node.output()[-2000:]
    with pytest.raises(WorkerDied, match=re.escape(f"could not be started: {python}: Exec")):
        f.result(timeout=GUARD)
    assert ex.submit(_probe_version.__code__.co_name.upper).result(timeout=GUARD) == (
        "_PROBE_VERSION")  # the node serves other tasks
    assert node.proc.poll() is None


def test_a_worker_that_cannot_be_started_leaves_nothing_open_in_the_node(
        start_node, make_executor, offline_pip):
    """``pool.spawn`` left its pipes and capture files open when the worker could not be
    started: four descriptors a task, until the node ran out of them (EMFILE) and could
    start no worker at all."""
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    env = envs.build(root, envs.env_name(PROBE), PROBE)
    python = Path(env.python)
    python.unlink()
    python.write_bytes(b"\0garbage\n")  # (not a program: ENOEXEC)
    python.chmod(0o755)
    node = start_node(workers=1)
    view = make_executor(1, start_node=False).with_options(requirements=PROBE)

    def fail_one() -> int:
        with pytest.raises(WorkerDied, match="could not be started"):
            view.submit(_probe_version).result(timeout=GUARD)
        return len(os.listdir(f"/proc/{node.pid}/fd"))

    before = fail_one()
    after = [fail_one() for _ in range(5)]
    assert max(after) <= before, (before, after)


def _probe_file():
    import kotta_probe_pkg

    return kotta_probe_pkg.__file__


@pytest.mark.parametrize("variable, value", [
    ("PIP_TARGET", "{tmp}/target"), ("PIP_PREFIX", "{tmp}/prefix"), ("PIP_USER", "1"),
    ("PIP_DRY_RUN", "1"),
])
def test_pip_settings_of_the_node_do_not_send_an_env_build_elsewhere(
        make_executor, offline_pip, tmp_path, monkeypatch, variable, value):
    """pip ran with the node's environment: a ``PIP_TARGET``/``PIP_PREFIX``/``PIP_USER``
    there (set for the user's own installs) put the packages outside the env, and
    ``PIP_DRY_RUN`` installed nothing, yet the env was marked ready and cached so: its
    tasks failed with ModuleNotFoundError (or, with PIP_USER, imported the user's copy)
    until someone deleted it.  They are not pip's settings for an env build."""
    monkeypatch.setenv("PYTHONUSERBASE", str(tmp_path / "userbase"))  # (PIP_USER: not ~)
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    ex = make_executor(1, requirements=PROBE)
    where = ex.submit(_probe_file).result(timeout=BUILD_GUARD)
    assert Path(where).is_relative_to(root / envs.env_name(PROBE)), where


def _probe_top_and_dependency():
    import kotta_probe_pkg
    import kotta_probe_top

    return kotta_probe_top.__file__, kotta_probe_pkg.__file__


@pytest.mark.parametrize("variable", ["PIP_NO_DEPS", "PIP_NO_DEPENDENCIES", "PIP_no_deps"])
def test_pip_settings_of_the_node_do_not_build_an_env_without_what_its_set_needs(
        make_executor, offline_pip, monkeypatch, variable):
    """A ``PIP_NO_DEPS`` in the node's environment (in any spelling pip reads: its
    alias, lower case after ``PIP_``) installed the set's packages without their
    dependencies, and the env was marked ready and cached so: every task of the set
    failed with ModuleNotFoundError until someone deleted it.  Settings of where packages
    come from (index, mirror, wheel directory) still apply: the build here runs offline."""
    make_wheel(offline_pip, name="kotta_probe_top", requires=(PROBE,))
    monkeypatch.setenv(variable, "1")
    env = Path(os.environ["KOTTA_HOME"]) / "envs" / envs.env_name("kotta-probe-top==1.0")
    ex = make_executor(1, requirements="kotta-probe-top==1.0")
    top, dependency = ex.submit(_probe_top_and_dependency).result(timeout=BUILD_GUARD)
    assert Path(top).is_relative_to(env) and Path(dependency).is_relative_to(env)


def test_pip_settings_of_the_node_do_not_build_an_env_for_another_python(
        make_executor, offline_pip, monkeypatch):
    """``PIP_IGNORE_REQUIRES_PYTHON`` in the node's environment had pip choose a release
    made for another Python (here the newest, for Python 4), and the env was cached with
    it; pip chooses one for the node's Python."""
    make_wheel(offline_pip, version="2.0", requires_python=">=4")
    monkeypatch.setenv("PIP_IGNORE_REQUIRES_PYTHON", "1")
    ex = make_executor(1, requirements="kotta-probe-pkg")
    assert ex.submit(_probe_version).result(timeout=BUILD_GUARD) == "1.0"


def test_a_worker_the_nodes_own_fault_keeps_from_starting_waits_for_it_to_pass(
        start_node, make_executor, tmp_path):
    """The node's temporary directory (where a worker's capture files go) removed under
    it: no worker could be started, and each task the node took failed at once, one
    after another, naming the node's directory; it is the node's fault, not the task's.
    The task now waits in the node until the fault has passed (or the node gives up on
    it after PATIENCE, as on any lasting fault of its own, and the task runs elsewhere)."""
    scratch = tmp_path / "node-tmp"
    scratch.mkdir()
    node = start_node(workers=1, env={"TMPDIR": str(scratch)})
    ex = make_executor(1, start_node=False)
    shutil.rmtree(scratch)
    f = ex.submit(_probe_version.__code__.co_name.upper)
    wait_for(lambda: "could not be started" in node.output() or f.done(),
             what="the node's try to start a worker")
    assert not f.done() and node.proc.poll() is None, node.output()[-2000:]
    scratch.mkdir()  # the fault passes
    assert f.result(timeout=GUARD) == "_PROBE_VERSION"
    assert node.proc.poll() is None


def test_a_node_out_of_file_descriptors_keeps_its_task_until_it_has_some(
        start_node, make_executor):
    """EMFILE as the node starts a worker (the node's own fault, which passes): the node
    died of it, and every task it held was redelivered; the task now waits in the node
    and runs once descriptors are free again."""
    node = start_node(workers=1)
    view = make_executor(1, start_node=False, max_tasks_per_child=1)  # (a new worker each)
    proc = psutil.Process(node.pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    assert view.submit(len, "ab").result(timeout=GUARD) == 2
    wait_for(lambda: len(node.worker_pids()) == 0, what="the retired worker's exit")
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 1, hard))
    try:
        f = view.submit(len, "abc")
        wait_for(lambda: "could not be started" in node.output() or f.done()
                 or node.proc.poll() is not None, what="the node's try to start a worker")
        assert not f.done() and node.proc.poll() is None, node.output()[-2000:]
        assert "Too many open files" in node.output()
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert f.result(timeout=GUARD) == 3
    assert node.proc.poll() is None


def test_a_worker_the_nodes_own_fault_keeps_from_starting_is_logged_as_it_starts_and_passes(
        start_node, make_executor):
    """The node tries to start the worker again at each step while EMFILE lasts: each try
    logged a warning, hundreds of lines a minute.  Now one as the fault starts, one as it
    passes (saying after how long), the tries in between at debug level."""
    node = start_node("--log-level", "DEBUG", workers=1)
    view = make_executor(1, start_node=False, max_tasks_per_child=1)  # (a new worker each)
    proc = psutil.Process(node.pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    assert view.submit(len, "ab").result(timeout=GUARD) == 2
    wait_for(lambda: len(node.worker_pids()) == 0, what="the retired worker's exit")
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 1, hard))

    def tries() -> list[str]:
        return [line for line in node.output().splitlines() if "could not be started" in line]

    try:
        f = view.submit(len, "abc")
        wait_for(lambda: len(tries()) >= 4 or f.done() or node.proc.poll() is not None,
                 what="the node's tries to start a worker")
        assert not f.done() and node.proc.poll() is None, node.output()[-2000:]
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert f.result(timeout=GUARD) == 3
    wait_for(lambda: "can be started again" in node.output(), what="the log of the fault's end")
    warned = [line for line in tries() if " WARNING " in line]
    assert len(warned) == 1 and "Too many open files" in warned[0], tries()
    passed = [line for line in node.output().splitlines() if "can be started again" in line]
    assert len(passed) == 1 and " INFO " in passed[0], passed


def test_a_node_out_of_file_descriptors_as_it_builds_an_env_keeps_its_task(
        start_node, make_executor, offline_pip):
    """EMFILE as the node builds a task's env (the node's own fault, which passes, not the
    set's): it was taken for a failed install, and the task, and every task of the set
    for a minute after, failed with RequirementsError.  The task now waits in the node,
    as one whose worker the same fault keeps from starting does, and its env is built
    once descriptors are free again."""
    node = start_node(workers=1)
    view = make_executor(1, start_node=False).with_options(requirements=PROBE)
    proc = psutil.Process(node.pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 1, hard))
    try:
        f = view.submit(_probe_version)
        wait_for(lambda: "Too many open files" in node.output() or f.done()
                 or node.proc.poll() is not None, what="the node's try to build the env")
        assert not f.done() and node.proc.poll() is None, node.output()[-2000:]
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert f.result(timeout=BUILD_GUARD) == "1.0"
    assert node.proc.poll() is None


def test_a_node_its_own_fault_keeps_from_prespawning_workers_starts_all_the_same(
        start_node, make_executor, tmp_path):
    """``--prespawn`` (an executor's own node, ``kotta up``'s) with the node short of file
    descriptors as it starts (EMFILE, the node's own fault, which passes): the node died
    at its start, with a traceback.  It goes on; the workers start at the first task,
    once the fault has passed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    python = tmp_path / "python-few-files"  # (the node uses ~11; a worker takes 6 more)
    python.write_text(f'#!/bin/bash\nulimit -Sn 14\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    node = start_node("--prespawn", config.current_user(), python=str(python), wait=False)
    wait_for(lambda: "could not be started" in node.output() or node.proc.poll() is not None,
             what="the node's try to start its workers")
    wait_for(lambda: "serving queue" in node.output() or node.proc.poll() is not None,
             what="the node's start")
    assert node.proc.poll() is None, node.output()[-2000:]
    assert "Too many open files" in node.output()
    psutil.Process(node.pid).rlimit(psutil.RLIMIT_NOFILE, (soft, hard))  # the fault passes
    ex = make_executor(1, start_node=False)
    assert ex.submit(len, "abc").result(timeout=GUARD) == 3
    assert node.proc.poll() is None


def test_an_env_whose_python_is_not_executable_is_rebuilt(make_executor, offline_pip):
    """An env's python that lost its exec bit (a chmod, a copy that dropped modes) was
    taken as usable: every task of its set failed ("could not be started: ...: Permission
    denied") until someone found the env and deleted it.  It is rebuilt, as one whose
    interpreter is gone is."""
    root = Path(os.environ["KOTTA_HOME"]) / "envs"
    env = envs.build(root, envs.env_name(PROBE), PROBE)
    python = Path(env.python)
    python.unlink()
    python.write_text("#!/bin/sh\n")
    python.chmod(0o644)
    ex = make_executor(1, requirements=PROBE)
    assert ex.submit(_probe_version).result(timeout=BUILD_GUARD) == "1.0"
    assert os.access(env.python, os.X_OK)  # built again


@pytest.mark.parametrize("line", [
    'kotta-probe-pkg==1.0; platform_machine != "x86 -64"',
    "kotta-probe-pkg==1.0; platform_release != '5.4 --generic'",
    'kotta-probe-pkg==1.0; "-x" not in platform_release and platform_machine != "a -b"',
])
def test_a_line_pip_would_cut_at_a_blank_and_a_dash_is_refused_when_given(
        line, make_executor):
    """pip reads a requirements file's line up to its first blank followed by "-", and what
    follows as its own options: the client accepted such a line (a marker's string with
    " -" in it, a valid PEP 508 requirement) and every task of it failed on the node, pip
    saying "Could not split options".  Now it is refused where it is given."""
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))) as info:
        normalize(["numpy", line])
    assert "pip would read" in str(info.value)
    ex = make_executor(1, start_node=False)
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))):
        ex.with_options(requirements=line)


def test_a_marker_with_a_dash_not_after_a_blank_is_built_by_the_node(tmp_path, offline_pip):
    """The other side of the check above: a "-" inside a marker's string (not after a
    blank) is taken by the client, and pip on the node builds the set."""
    reqs = normalize('kotta-probe-pkg==1.0; platform_machine != "x86-64 " and "-x" not in platform_release')
    root = tmp_path / "envs"
    env = envs.build(root, envs.env_name(reqs), reqs)
    assert (env.path / envs.MARKER).read_text() == reqs + "\n"


@pytest.mark.parametrize("line", [
    'foo; platform_machine != "x\\"',     # packaging: SyntaxError, not its own error
    'foo; platform_machine != "x\\\\"',   # written canonically "x\": the same, on the node
    'foo; platform_machine != "a\\t#b"',  # written with a tab before "#": pip's comment
    'foo; platform_machine != "a\\nb"',   # written with a newline: two lines
    "foo; platform_machine != 'a\"b'",   # written "a"b"
])
def test_a_marker_string_with_an_escape_that_does_not_survive_is_refused_naming_it(line):
    """packaging reads a marker's strings as Python's (escapes and all), and writes them
    back as they then are: one ending in a backslash, or holding a tab before "#" or a
    newline, was written as a line that is no requirement, or another one, or two; the
    client sent it, and the node refused it (or died of it, below) or pip misread it.
    One whose escape is not even Python's raised packaging's SyntaxError, naming nothing."""
    with pytest.raises(ConfigurationError, match=re.escape(repr(line))):
        normalize(["numpy", line])


def test_a_task_whose_requirements_packaging_cannot_read_again_does_not_kill_the_node(
        start_node, make_executor, enclave):
    """A task header whose requirements end in a backslash inside a marker's string
    (what a client accepted, written canonically): packaging raises a SyntaxError for it,
    which the node's check (of ConfigurationError) let through, and the node died."""
    from kotta_executor.states import JobState
    from tests.conftest import node_outlives, queue_crafted_task

    bad = 'foo; platform_machine != "x\\"'
    ex = make_executor(1, start_node=False)
    job_id = queue_crafted_task(enclave, ex, lambda h: h.update(requirements=bad))
    job = node_outlives(start_node(workers=1), enclave, job_id)
    assert job.state == JobState.FAILED and repr(bad) in job.reason
    assert ex.submit(tasks.square, 5).result(GUARD) == 25


def test_requirements_given_as_an_iterator_are_installed_for_every_call(
        make_executor, enclave_dir, offline_pip):
    """connect() and kottajob read their requirements to check them, which used up an
    iterator (a generator, ``map(str.strip, lines)``): the calls then ran with none (an
    empty set: kottajob's even dropped the executor's own), ImportError on the node."""
    import kotta_executor

    konn = kotta_executor.connect(enclave_dir, max_workers=1,
                                  requirements=(r for r in [PROBE]))
    ex = make_executor(1)
    try:
        @kottajob(konn)
        def by_connection():
            return _probe_version()

        @kottajob(ex, requirements=(r for r in [PROBE]))
        def by_decorator():
            return _probe_version()

        assert by_connection() == "1.0"
        assert by_decorator() == "1.0"
        assert by_decorator() == "1.0"  # (the second call too)
    finally:
        konn.close()


def test_a_build_thread_that_cannot_start_keeps_the_task_waiting(tmp_path, monkeypatch):
    """Out of memory or threads, starting an env's build thread raised RuntimeError
    ("can't start new thread") out of the node's dispatch, and the node died.  It is the
    node's own fault, as EMFILE starting pip is: the set is "fault" for a moment (its
    tasks wait), then built."""
    woken = threading.Event()
    cache = envs.EnvCache(tmp_path / "envs", woken.set)

    class NoThreads(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(envs.threading, "Thread", NoThreads)
    status, fault = cache.get("six")
    assert status == "fault"
    assert isinstance(fault, OSError) and "can't start new thread" in str(fault)
    assert not cache.building()
    monkeypatch.undo()
    monkeypatch.setattr(envs, "FAULT_RETRY", 0.0)
    assert cache.get("six") == ("building", None)  # (tried again: a thread this time)
    assert woken.wait(GUARD)  # (its end, built or failed: not left running)
    cache.close()


def test_an_env_build_fault_is_not_cleared_by_another_sets_ready_env(
        make_executor, enclave, offline_pip, monkeypatch, caplog):
    """A build the node's own fault stops keeps its tasks waiting until the fault has
    passed, or has lasted PATIENCE (commit 9e0edc2).  But a task of any other set whose env
    was ready (built long before) was taken for the fault's end: logged 'works again' and
    the fault's clock set back at each such step, its warning logged again at the next, the
    node never giving up while the set's tasks waited.  Only a build that comes to an end
    (or the set's own env) says it has passed."""
    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False)
    other = PROBE + "\nkotta-never-built==1.0"
    ready, faulty = ex.with_options(requirements=PROBE), ex.with_options(requirements=other)
    name = f"kotta-env-{envs.env_name(normalize(other))[:8]}"
    start = threading.Thread.start

    def out_of_threads(thread):  # (the node's own fault, for the second set's build only)
        if thread.name == name:
            raise RuntimeError("can't start new thread")
        return start(thread)

    node = Node(enclave, NodeConfig(queue="test", workers=2, poll_interval=0.05))
    node._start()
    try:
        first = ready.submit(_probe_version)
        wait_for(lambda: (node.step(), first.done())[1], timeout=BUILD_GUARD,
                 what="the first set's env to be built and its task to run")
        assert first.result() == "1.0"
        monkeypatch.setattr(threading.Thread, "start", out_of_threads)
        waiting = faulty.submit(_probe_version)
        what = "building an environment"
        wait_for(lambda: (node.step(), what in node._failing)[1], what="the build's fault")
        since = node._failing[what]
        for _ in range(3):
            f = ready.submit(_probe_version)
            wait_for(lambda f=f: (node.step(), f.done())[1], what="a task of the ready set")
            assert f.result() == "1.0"
            node.step()  # (the waiting task's set asked for again)
        assert not waiting.done()
        assert node._failing.get(what) == since, "the fault's clock was set back"
        assert not [r for r in caplog.records if "works again" in r.getMessage()]
    finally:
        monkeypatch.setattr(threading.Thread, "start", start)
        waiting.cancel()
        node._stop()


def _pips() -> list:
    """The env builds' pip processes of this test: ``python -m pip --python ENV/bin/python
    install`` (outer), and the ``ENV/bin/python .../__pip-runner__.py install`` it runs
    (inner)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "install" in _cmdline(p) and "-c" not in _cmdline(p)[:3]]


def _outer_pip():
    [outer] = [p for p in _pips() if _cmdline(p)[1:3] == ["-m", "pip"]]
    return outer


@contextlib.contextmanager
def _pip_builds(tmp_path, monkeypatch):
    """An EnvCache whose builds' pip waits on a silent index: yields the cache and
    ``build(signal, victim=_outer_pip)``, which starts a build of PROBE, sends the signal
    to its pip once it waits, and waits for the build to end."""
    index = _silent_index(monkeypatch)
    index.settimeout(GUARD)
    woken = threading.Event()
    cache = envs.EnvCache(tmp_path / "envs", woken.set)
    with contextlib.ExitStack() as stack:
        stack.callback(cache.close)
        stack.callback(index.close)

        def build(sig, victim=_outer_pip):
            woken.clear()
            assert cache.get(PROBE) == ("building", None)
            stack.enter_context(index.accept()[0])  # pip waits for its index now
            victim().send_signal(sig)
            assert woken.wait(GUARD)

        yield cache, build


@pytest.mark.parametrize("which, sig", [("outer", signal.SIGKILL), ("inner", signal.SIGTERM)])
def test_a_build_whose_pip_is_killed_by_a_signal_is_the_nodes_fault_not_the_sets(
        tmp_path, monkeypatch, which, sig):
    """pip killed by a signal as it builds an env (the OOM killer's SIGKILL, an admin's
    SIGTERM): the failure was cached as the set's, and every task of the set failed with
    RequirementsError for FAILURE_TTL, though the set was fine.  It is the node's own
    passing fault now: the set is "fault" (its tasks wait), then built again.  ("inner":
    the pip that ``pip --python`` runs in the venv, whose death the outer pip relays as
    exit code 256 - signal.)"""
    monkeypatch.setattr(envs, "FAULT_RETRY", 600.0)  # (still "fault" when we look)

    def victim():
        pips = _pips()
        outer = [p for p in pips if _cmdline(p)[1:3] == ["-m", "pip"]]
        inner = [p for p in pips if any(a.endswith("__pip-runner__.py") for a in _cmdline(p))]
        assert len(outer) == len(inner) == 1, [_cmdline(p) for p in pips]
        return (outer if which == "outer" else inner)[0]

    with _pip_builds(tmp_path, monkeypatch) as (cache, build):
        build(sig, victim)
        status, fault = cache.get(PROBE)
        assert status == "fault", fault
        assert isinstance(fault, OSError) and "signal" in str(fault), fault


def _build_in_a_thread(root, key):
    """``envs.build(root, key, PROBE)`` on a thread of its own: the thread, and a list that
    gets the env, or the exception, as it ends."""
    outcome: list = []

    def builder():
        try:
            outcome.append(envs.build(root, key, PROBE))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    t = threading.Thread(target=builder, daemon=True)
    t.start()
    return t, outcome


def test_a_build_lock_held_too_long_by_another_process_fails_the_set_naming_it(
        tmp_path, monkeypatch, caplog):
    """Another node holding an env's build lock (flock) and stopped (SIGSTOP) or hung:
    this node's build waited for the lock with no time limit, logging nothing, and the
    set's tasks waited for ever.  It now logs once that it waits, and for whom, and after
    LOCK_WAIT fails the build, saying the lock was held too long by that process."""
    monkeypatch.setattr(envs, "LOCK_WAIT", 1.0)
    root = tmp_path / "envs"
    root.mkdir()
    key = envs.env_name(PROBE)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "f = open(sys.argv[1], 'a+b'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.truncate(0); f.write(str(os.getpid()).encode()); f.flush()\n"
         "print('held', flush=True); os.kill(os.getpid(), 19)",  # (SIGSTOP)
         str(root / f"{key}.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        caplog.set_level("INFO", logger="kotta.node")
        t, outcome = _build_in_a_thread(root, key)
        t.join(GUARD)
        assert outcome, "the build waited for the lock with no end"
        [exc] = outcome
        assert isinstance(exc, envs.BuildError), exc
        assert "held" in str(exc) and str(holder.pid) in str(exc), exc
        waits = [r.getMessage() for r in caplog.records if "waits for" in r.getMessage()]
        assert len(waits) == 1 and str(holder.pid) in waits[0], waits
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("code", "signal_name"), [
    (-9, "SIGKILL"), (-15, "SIGTERM"), (-2, "SIGINT"),  # the step's own death
    (247, "SIGKILL"), (241, "SIGTERM"),  # the inner pip's, passed on by the outer pip
    (255, None), (254, None), (1, None), (2, None), (23, None), (0, None), (137, None),
])
def test_which_exit_codes_of_a_build_step_say_a_signal_killed_it(code, signal_name):
    """Only a death by signal is the node's fault (tried again); an exit code of 255 is
    a step's own failure, not SIGHUP's: taken for a fault it was tried again until the
    node gave up."""
    got = envs._signal_of(code)
    assert (got.name if got is not None else None) == signal_name


def test_an_env_build_fault_passes_when_another_process_built_the_env(
        make_executor, enclave, offline_pip, monkeypatch):
    """A build the node's own fault stopped (out of threads) whose env another process (a
    node sharing the envs directory) built meanwhile: its tasks run, found on disk.  That
    was no build "come to an end" (EnvCache.ended), so the fault's clock stayed: the node
    said nothing passed, and at its next fault, however much later, it had "lasted" since
    the first, and the node gave up at once (PATIENCE).  Now a set's env found built ends
    the fault as its own build would."""
    from node.daemon import Node, NodeConfig

    ex = make_executor(1, start_node=False).with_options(requirements=PROBE)
    key = envs.env_name(normalize(PROBE))
    start = threading.Thread.start
    refused = {f"kotta-env-{key[:8]}"}

    def out_of_threads(thread):  # (the node's own fault, for the set's build only)
        if thread.name in refused:
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", out_of_threads)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    what = "building an environment"
    try:
        f = ex.submit(_probe_version)
        wait_for(lambda: (node.step(), what in node._failing)[1], what="the build's fault")
        envs.build(node.envs.root, key, normalize(PROBE))  # (by another process, say)
        refused.clear()
        wait_for(lambda: (node.step(), f.done())[1], timeout=BUILD_GUARD,
                 what="the task to run in the env found built")
        assert f.result() == "1.0"
        assert what not in node._failing, "the fault's clock outlived the fault"
    finally:
        monkeypatch.setattr(threading.Thread, "start", start)
        node._stop()


def test_a_build_lock_held_too_long_names_the_holder_that_took_it_last(
        tmp_path, monkeypatch, caplog):
    """The holder of a build lock takes the flock, then writes its pid over the one in the
    file (the process that held the lock before, gone since).  A node that looked between
    the two read that earlier pid (or none, the file just emptied), and an hour later its
    RequirementsError named that process, not the one that held the lock all along.  Now
    the pid is read again when it fails."""
    class Clock:  # envs' clock, moved on by the test only: no waiting for LOCK_WAIT
        now = 0.0

        def monotonic(self):
            return self.now

        def sleep(self, seconds):
            time.sleep(0.01)

    clock = Clock()
    monkeypatch.setattr(envs, "time", clock)
    root = tmp_path / "envs"
    root.mkdir()
    key = envs.env_name(PROBE)
    (root / f"{key}.lock").write_bytes(b"999999")  # (the pid of the holder before)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "f = open(sys.argv[1], 'a+b'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); sys.stdin.readline()\n"
         "f.truncate(0); f.write(str(os.getpid()).encode()); f.flush()\n"
         "print('wrote', flush=True); sys.stdin.read()",
         str(root / f"{key}.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        caplog.set_level("INFO", logger="kotta.node")
        t, outcome = _build_in_a_thread(root, key)
        wait_for(lambda: any("waits for" in r.getMessage() for r in caplog.records),
                 what="the build to look at the lock's holder")
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == b"wrote\n"
        clock.now = envs.LOCK_WAIT + 1
        t.join(GUARD)
        assert outcome, "the build waited for the lock with no end"
        [exc] = outcome
        assert isinstance(exc, envs.BuildError), exc
        assert f"pid {holder.pid}" in str(exc), exc
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_a_build_whose_pip_crashes_is_the_sets_failure_not_the_nodes_fault(
        tmp_path, monkeypatch, sig):
    """pip crashing (SIGSEGV, SIGABRT: its own, as a broken extension it imports makes it
    each time) was taken for a kill from outside (the OOM killer's, an admin's): the
    node's passing fault, its tasks waiting and the build tried again each second, until
    after a minute the node gave up and stopped, and the next node that took the tasks
    did the same.  Only the signals that come from outside are the node's fault; a crash
    fails the set, as any failed install does (RequirementsError, saying so)."""
    with _pip_builds(tmp_path, monkeypatch) as (cache, build):
        build(sig)
        status, failure = cache.get(PROBE)
        assert status == "failed", failure
        assert f"exit code -{int(sig)}" in failure, failure


def test_a_build_killed_at_each_try_fails_its_set(tmp_path, monkeypatch):
    """A build whose pip is killed at each try (the OOM killer, for a set that needs more
    memory than the node has) was the node's passing fault each time: its tasks waited
    for ever, or each node that took them gave up in turn.  After BUILD_KILLS kills in a
    row the set fails, saying so."""
    monkeypatch.setattr(envs, "FAULT_RETRY", 0.0)  # (tried again at the next look)
    with _pip_builds(tmp_path, monkeypatch) as (cache, build):
        for attempt in range(1, envs.BUILD_KILLS + 1):
            build(signal.SIGKILL)
            if attempt < envs.BUILD_KILLS:
                monkeypatch.setattr(envs, "FAULT_RETRY", 600.0)
                assert cache.get(PROBE)[0] == "fault"
                monkeypatch.setattr(envs, "FAULT_RETRY", 0.0)
        status, message = cache.get(PROBE)
        assert status == "failed", message
        assert "SIGKILL" in message and f"{envs.BUILD_KILLS} times in a row" in message


def test_a_kill_count_does_not_carry_over_a_failed_install(tmp_path, monkeypatch):
    """A build killed once (kills: 1), then failed for its set's own reason (a crash, a
    bad requirement: RequirementsError for FAILURE_TTL), kept its kill: the set's next
    build, killed once (an admin's SIGTERM, the OOM killer once), failed the set at
    once, "killed 2 times in a row", though the kills were not in a row, rather than wait
    for the fault to pass as any first kill does.  Now a build that ends otherwise starts
    the count again."""
    monkeypatch.setattr(envs, "FAULT_RETRY", 0.0)  # (tried again at the next look)
    monkeypatch.setattr(envs, "FAILURE_TTL", 0.0)
    with _pip_builds(tmp_path, monkeypatch) as (cache, build_then):
        build_then(signal.SIGKILL)  # killed once: the node's fault
        build_then(signal.SIGSEGV)  # then the set's own failure (a crash)
        monkeypatch.setattr(envs, "FAULT_RETRY", 600.0)
        monkeypatch.setattr(envs, "FAILURE_TTL", 600.0)
        assert cache.get(PROBE)[0] == "failed"
        monkeypatch.setattr(envs, "FAILURE_TTL", 0.0)
        build_then(signal.SIGKILL)  # killed once more: once in a row
        monkeypatch.setattr(envs, "FAILURE_TTL", 600.0)
        status, message = cache.get(PROBE)
        assert status == "fault", message


def test_a_killed_build_does_not_start_the_clock_another_sets_fault_is_held_to(
        make_executor, enclave, monkeypatch, caplog):
    """A build killed once (the OOM killer) is tried again, and never ends the node (a
    second kill fails its set).  But its kill started the node's clock of env faults, and
    nothing stopped it while its set's next build ran (minutes, for a big set): another
    set's first fault (out of threads, of file descriptors) had then "lasted" since that
    kill, and the node gave up at once and stopped, with every task it held.  Now a kill
    leaves that clock alone."""
    import node.daemon as daemon
    from node.daemon import Node, NodeConfig

    index = _silent_index(monkeypatch)
    monkeypatch.setattr(daemon, "PATIENCE", 0.0)  # (a fault met before now has lasted)
    monkeypatch.setattr(envs, "FAULT_RETRY", 600.0)
    other = "kotta-probe-pkg==2.0"
    refused = {f"kotta-env-{envs.env_name(normalize(other))[:8]}"}
    met: list = []
    start = threading.Thread.start

    def out_of_threads(thread):  # (the node's own fault, for the other set's build only)
        if thread.name in refused:
            met.append(thread.name)
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", out_of_threads)
    caplog.set_level("WARNING", logger="kotta.node")
    ex = make_executor(1, start_node=False)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                    prefetch=3))  # (both sets' tasks held)
    node._start()
    try:
        def pips():
            return [p for p in _pips() if _cmdline(p)[1:3] == ["-m", "pip"]]

        killed = ex.with_options(requirements=PROBE).submit(_probe_version)
        [pip] = wait_for(lambda: (node.step(), pips())[1], what="the set's pip")
        pip.send_signal(signal.SIGKILL)
        wait_for(lambda: (node.step(), any("BuildKilled" in r.getMessage()
                                           for r in caplog.records))[1],
                 what="the node to see its build killed")
        monkeypatch.setattr(envs, "FAULT_RETRY", 0.0)  # tried again: pip waits once more
        wait_for(lambda: (node.step(), pips())[1], what="the set's build tried again")
        waits = ex.with_options(requirements=other).submit(_probe_version)
        wait_for(lambda: (node.step(), met)[1], what="the other set's first fault")
        assert not killed.done() and not waits.done()  # (both wait: nothing ended)
    finally:
        index.close()
        monkeypatch.setattr(threading.Thread, "start", start)
        node._stop()
