"""Script jobs (``KottaJob``), as in the Cloud Kotta paper: real nodes, real workers."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import signal
import subprocess
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kotta_executor
from kotta_executor import KottaJob, ScriptFailed, WalltimeExceeded
from kotta_executor.errors import JobFailed
from tests import tasks
from tests.conftest import GUARD, _finish, gone, wait_for
from tests.test_node import _pids


@pytest.fixture
def konn(enclave_dir):
    c = kotta_executor.connect(enclave_dir)
    yield c
    if c._executor is not None:
        _finish(c._executor)
    c.close()


def _bash(script: str, **kwargs) -> KottaJob:
    return KottaJob(
        jobtype="script", jobname="test", executable="/bin/bash myscript.sh",
        script_name="myscript.sh", script=script, inputs=[], outputs=[], queue="test",
        walltime=kwargs.pop("walltime", 5), **kwargs,
    )


def test_bash_script_output_is_captured(konn, enclave):
    job = _bash("echo hello from bash\necho to stderr >&2\npwd\nls\n")
    assert job.job_id is None and job.stdout is None and job.exit_code is None
    job_id = job.submit(konn)
    assert job_id == job.job_id and len(job_id) == 32
    assert job.wait(GUARD) == 0
    assert job.exit_code == 0
    lines = job.stdout.splitlines()
    assert lines[0] == "hello from bash"
    assert "kotta-script-" in lines[1]  # a fresh working directory...
    assert lines[2:] == ["myscript.sh"]  # ...holding the script alone
    assert job.stderr == "to stderr\n"
    assert job.status() == "completed"
    assert job.status(konn) == "completed"
    assert enclave.jobs.get(job_id).state == "completed"


def test_python_script(make_executor):
    ex = make_executor(1)
    job = KottaJob(
        jobtype="script", jobname="hello", executable="python3 hello.py",
        script_name="hello.py", script="import sys\nprint('hello', sys.argv[0])\n",
        inputs=[], outputs=[], queue="test", walltime=dt.timedelta(minutes=1),
    )
    job.submit(ex)  # a KottaExecutor works as well as a connection
    assert job.wait(GUARD) == 0
    assert job.stdout == "hello hello.py\n"
    assert job.stderr == ""


def test_a_script_job_is_submitted_through_an_executors_options_view(make_executor, enclave):
    """``job.submit(ex.with_options(...))`` was a TypeError ("needs a connection or a
    KottaExecutor"), as ``@kottajob`` of a view was: a view is taken, the job's own queue
    and walltime overriding the view's."""
    ex = make_executor(1)
    job = _bash("echo viewed", walltime=1)
    job.submit(ex.with_options(walltime=30))
    assert job.wait(GUARD) == 0 and job.stdout == "viewed\n"
    assert enclave.jobs.get(job.job_id).walltime == 60.0


def test_nonzero_exit_is_returned_and_recorded_failed(konn, enclave):
    job = _bash("echo before failing\nexit 3\n")
    job.submit(konn)
    assert job.wait(GUARD) == 3  # does not raise
    assert job.exit_code == 3
    assert job.stdout == "before failing\n"
    assert job.status() == "failed"
    record = enclave.jobs.get(job.job_id)
    assert record.state == "failed"
    assert "exit code 3" in record.reason
    exc = job.future.exception()  # the future itself carries the ScriptFailed
    assert isinstance(exc, ScriptFailed) and isinstance(exc, JobFailed)
    assert exc.exit_code == 3


def ignore_sigchld():
    """A task that leaves SIGCHLD ignored in its worker (to be rid of zombies, say)."""
    import os
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    return os.getpid()


def test_a_failed_script_fails_after_a_task_left_sigchld_ignored_on_its_worker(
        start_node, make_executor, enclave):
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(ignore_sigchld).result(GUARD)
    job = _bash("echo before failing\nexit 3\n")
    job.submit(ex)
    # the bug: 0, and the job recorded completed (the kernel reaped the script)
    assert job.wait(GUARD) == 3
    assert enclave.jobs.get(job.job_id).state == "failed"
    assert ex.submit(ignore_sigchld).result(GUARD) == pid  # the same worker throughout


def test_a_script_that_kills_its_process_group_on_exit_keeps_its_outcome_and_worker(
        start_node, make_executor, enclave, tmp_path):
    """``trap 'kill 0' EXIT``, a common way for a script to end its background jobs, sends
    SIGTERM to its whole process group: the worker's too."""
    child = tmp_path / "child"
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    pid = ex.submit(tasks.worker_pid).result(GUARD)
    # (the script waits for its background job to have become ``sleep``: bash, with an
    # EXIT trap, catches SIGTERM in a child it has forked and not yet exec'd, which then
    # execs on with the signal lost; kill 0 spared about 1 sleeper in 100 so, in any
    # process group, on any machine: bash's race, not the node's)
    exec_d = 'until read -r c < /proc/$!/comm && [ "$c" = sleep ]; do :; done\n'
    job = _bash(f"trap 'kill 0' EXIT\nsleep 300 &\n{exec_d}echo $! > {child}\necho started\n")
    job.submit(ex)
    # the bug: WorkerDied ("... killed by signal SIGTERM"), the script's outcome lost
    assert job.wait(GUARD) == -signal.SIGTERM  # as bash ends so (its trap signals it too)
    assert job.stdout == "started\n"
    assert enclave.jobs.get(job.job_id).state == "failed"
    [sleeper] = _pids(child)
    wait_for(lambda: gone(sleeper), what="the script's background job to end by its trap")
    # a script that ends its background jobs and exits 0 is completed
    job = _bash(f"trap 'trap \"\" TERM; kill 0' EXIT\nsleep 300 &\n{exec_d}echo done\n")
    job.submit(ex)
    assert job.wait(GUARD) == 0
    assert job.stdout == "done\n"
    assert ex.submit(tasks.worker_pid).result(GUARD) == pid  # the same worker throughout


@pytest.mark.parametrize("stubborn", [False, True])
@pytest.mark.parametrize("end", ["walltime", "kill", "node death"])
def test_what_a_script_started_ends_with_its_walltime_kill_or_node(
        start_node, make_executor, tmp_path, end, stubborn):
    """The script runs in a process group of its own (so that its ``kill 0`` spares its
    worker): a walltime, a kill() and the worker's last-resort kill when its node dies
    end it and what it started all the same (``stubborn``: both ignore SIGTERM)."""
    pids = tmp_path / "pids"
    node = start_node(workers=1, visibility_timeout=3.0)  # (the next node's, after a death)
    ex = make_executor(1, start_node=False)
    job = _bash(("trap '' TERM\n" if stubborn else "")
                + f"sleep 300 &\necho $$ >> {pids}\necho $! >> {pids}\nwait\n",
                walltime=dt.timedelta(seconds=2) if end == "walltime" else 5)
    job.submit(ex)
    wait_for(lambda: len(_pids(pids)) == 2, what="the script and its child to start")
    try:
        if end == "kill":
            assert job.kill()
        elif end == "node death":
            node.kill()
        if end != "node death":
            with pytest.raises(kotta_executor.TaskKilled if end == "kill" else WalltimeExceeded):
                job.wait(GUARD)
        for pid in _pids(pids):
            wait_for(lambda pid=pid: gone(pid), timeout=GUARD,
                     what=f"the script's process {pid} to end with its job's {end}")
        if end == "node death":  # the job is cancelled by the next node, not run again
            assert job.kill()
            start_node(workers=1)
            with pytest.raises(kotta_executor.TaskKilled):
                job.wait(GUARD)
    finally:
        for pid in _pids(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_script_over_its_walltime_is_killed(konn):
    job = _bash("echo started\nexec sleep 300\n", walltime=dt.timedelta(seconds=1))
    job.submit(konn)
    with pytest.raises(WalltimeExceeded):
        job.wait(GUARD)
    assert job.exit_code is None
    assert job.status() == "failed"


def test_status_moves_from_processing_to_completed(konn, tmp_path):
    release = tmp_path / "release"
    started = tmp_path / "started"
    job = _bash(
        f"touch {started}\n"
        f"while [ ! -e {release} ]; do sleep 0.05; done\n"
        "echo released\n"
    )
    job.submit(konn)
    assert job.status() in ("pending", "processing")
    wait_for(started.exists, what="the script to start")
    wait_for(lambda: job.status() == "processing", what="the job to be processing")
    assert not job.done() and job.exit_code is None
    release.touch()
    assert job.wait(GUARD) == 0
    assert job.status() == "completed"
    assert job.stdout == "released\n"


def test_kill_stops_a_running_script(konn, tmp_path):
    started = tmp_path / "started"
    job = _bash(f"touch {started}\nexec sleep 300\n")
    job.submit(konn)
    wait_for(started.exists, what="the script to start")
    assert job.kill()
    with pytest.raises(kotta_executor.TaskKilled):
        job.wait(GUARD)
    wait_for(lambda: job.status() == "cancelled", what="the job to be recorded cancelled")


@pytest.mark.parametrize("how", ["walltime", "kill"])
def test_a_script_killed_with_its_worker_leaves_no_working_directory(konn, tmp_path, how):
    """Its worker, killed, cannot remove the script's directory (kotta-script-*, in the
    node's temporary directory): it stayed there for good, with all the script wrote."""
    where = tmp_path / "where"
    walltime = dt.timedelta(seconds=1) if how == "walltime" else 5
    job = _bash(f"head -c 100000 /dev/zero > scratch.bin\npwd > {where}.tmp\n"
                f"mv {where}.tmp {where}\nexec sleep 300\n", walltime=walltime)
    job.submit(konn)
    wait_for(where.exists, what="the script to start")
    workdir = where.read_text().strip()
    assert os.path.basename(workdir).startswith("kotta-script-")
    if how == "kill":
        assert job.kill()
    with pytest.raises((WalltimeExceeded, kotta_executor.TaskKilled)):
        job.wait(GUARD)
    wait_for(lambda: not os.path.exists(workdir), what=f"{workdir} to be removed")


def test_a_script_whose_node_died_leaves_no_working_directory(start_node, make_executor,
                                                                tmp_path):
    """Its node, killed (SIGKILL), removes nothing: the worker, ending its script and
    itself as it finds the node gone, removes the script's directory first."""
    where = tmp_path / "where"
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    job = _bash(f"pwd > {where}.tmp\nmv {where}.tmp {where}\nexec sleep 300\n")
    job.submit(ex)
    wait_for(where.exists, what="the script to start")
    workdir = where.read_text().strip()
    assert os.path.basename(workdir).startswith("kotta-script-")
    node.kill()
    wait_for(lambda: not os.path.exists(workdir), what=f"{workdir} to be removed")
    assert job.kill()  # cancelled by the next node, not run again
    start_node(workers=1)
    with pytest.raises(kotta_executor.TaskKilled):
        job.wait(GUARD)


def test_a_node_removes_no_working_directory_of_another_pid_namespaces_worker(
        start_node, make_executor, tmp_path):
    """Nodes in containers (PID namespaces of their own) may share the temporary directory
    (as they share /tmp/kotta-UID for the inboxes): a worker of another node may have the
    pid of one of this node's.  A node removing the directories of a worker killed with its
    script removed, by its pid alone, that other worker's live script's directory too."""
    where = tmp_path / "where"
    node = start_node(workers=1)
    ex = make_executor(1, start_node=False)
    job = _bash(f"pwd > {where}.tmp\nmv {where}.tmp {where}\nexec sleep 300\n",
                walltime=dt.timedelta(seconds=1))
    job.submit(ex)
    wait_for(where.exists, what="the script to start")
    workdir = where.read_text().strip()
    pid = os.path.basename(workdir).split("-")[2]  # (kotta-script-PID-...)
    elsewhere = os.stat("/proc/self/ns/pid").st_ino + 1  # (the node's is the test's)
    with contextlib.ExitStack() as stack:  # the live script of another namespace's worker
        other = os.path.join(os.path.dirname(workdir), f"kotta-script-{pid}-{elsewhere}-x")
        os.mkdir(other)
        stack.callback(lambda: os.path.isdir(other) and __import__("shutil").rmtree(other))
        open(os.path.join(other, "results.csv"), "w").close()
        with pytest.raises(WalltimeExceeded):
            job.wait(GUARD)
        wait_for(lambda: not os.path.exists(workdir), what=f"{workdir} to be removed")
        assert node.terminate() == 0  # (all it had to remove: removed)
        assert os.path.exists(os.path.join(other, "results.csv"))


def _set_tmpdir(path: str) -> None:
    os.environ["TMPDIR"] = path


def test_a_script_killed_with_its_worker_after_a_task_set_tmpdir_leaves_no_directory(
        start_node, make_executor, tmp_path):
    """A task or an initializer that points ``TMPDIR`` at a scratch disk (as on a cluster)
    moved the worker's later script jobs' working directories there, where its node, which
    looks in its own temporary directory, never found one killed with its script: it stayed
    for good.  They go to the node's temporary directory, as the guide says."""
    where, scratch = tmp_path / "where", tmp_path / "scratch"
    scratch.mkdir()
    start_node(workers=1)
    ex = make_executor(1, start_node=False)
    ex.submit(_set_tmpdir, str(scratch)).result(timeout=GUARD)
    job = _bash(f"pwd > {where}.tmp\nmv {where}.tmp {where}\nexec sleep 300\n",
                walltime=dt.timedelta(seconds=1))
    job.submit(ex)
    wait_for(where.exists, what="the script to start")
    workdir = where.read_text().strip()
    with pytest.raises(WalltimeExceeded):
        job.wait(GUARD)
    wait_for(lambda: not os.path.exists(workdir), what=f"{workdir} to be removed")
    assert os.listdir(scratch) == []


def test_missing_executable_fails_the_job(konn):
    job = KottaJob(
        jobtype="script", jobname="nope", executable="/no/such/interpreter run.sh",
        script_name="run.sh", script="true\n",
    )
    job.submit(konn)
    with pytest.raises(FileNotFoundError):
        job.wait(GUARD)
    assert job.status() == "failed"



def test_a_script_run_as_itself_without_a_shebang_says_so(konn):
    job = KottaJob(
        jobtype="script", jobname="no-shebang", executable="./run.sh",
        script_name="run.sh", script="echo hello\n",
    )
    job.submit(konn)
    with pytest.raises(OSError, match=r"run\.sh does not begin with a '#!' line") as info:
        job.wait(GUARD)
    assert "executable='sh run.sh'" in str(info.value)
    assert job.status() == "failed"
    # with one, the same job runs
    job = KottaJob(
        jobtype="script", jobname="shebang", executable="./run.sh",
        script_name="run.sh", script="#!/bin/sh\necho hello\n",
    )
    job.submit(konn)
    assert job.wait(GUARD) == 0
    assert job.stdout == "hello\n"

@pytest.mark.parametrize(
    ("script", "says"),
    [("echo hi\n", "executable='sh run.sh in.csv out.csv'"),
     ("\n#!/bin/sh\necho hi\n", "not as its very first bytes"),
     ("\ufeff#!/bin/sh\necho hi\n", "not as its very first bytes")],
    ids=["no line", "blank line first", "byte-order mark first"],
)
def test_the_missing_shebang_error_keeps_the_arguments_and_names_a_late_one(script, says):
    from kotta_executor.script import run_script  # (what a node's worker runs)

    with pytest.raises(OSError, match="does not begin with a '#!' line") as info:
        run_script("./run.sh in.csv out.csv", "run.sh", script)
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("script", "says"),
    [("#!/no/such/interp\necho hi\n", "'/no/such/interp', is not on this node"),
     ("#!/bin/sh\r\necho hi\r\n", "Windows line endings")],
    ids=["missing interpreter", "CRLF line"],
)
def test_a_missing_interpreter_is_named_not_the_script(script, says):
    """It said 'No such file or directory: ./run.sh', of a script that is there."""
    from kotta_executor.script import run_script

    with pytest.raises(FileNotFoundError, match="the interpreter its '#!' line names") as info:
        run_script("./run.sh", "run.sh", script)
    assert says in str(info.value)


@pytest.mark.parametrize("script", ["#!/bin/sh\necho hi\n", "echo hi\n"],
                         ids=["shebang", "no shebang"])
def test_a_script_named_bare_is_looked_up_on_path_and_the_error_says_so(konn, script):
    """executable="run.sh" (no ./) is looked up on PATH, not in the working directory: the
    error said '/bin/sh' was not on the node, or 'No such file or directory: run.sh'."""
    job = KottaJob(executable="run.sh", script_name="run.sh", script=script)
    job.submit(konn)
    with pytest.raises(FileNotFoundError, match="looked up on PATH") as info:
        job.wait(GUARD)
    assert "is not on this node" not in str(info.value)
    assert "executable='./run.sh'" in str(info.value)
    # (it read "... or name its interpreter: 'run.sh'", OSError's filename taken for one)
    assert str(info.value).endswith("or name its interpreter (executable='sh run.sh'); "
                                    "not on PATH: 'run.sh'")
    assert job.status() == "failed"


def test_a_script_name_that_is_an_input_or_output_name_is_refused():
    """The script is saved in the working directory, where it replaced a staged input of
    that name, or was uploaded as the output of that name."""
    for kw in ({"inputs": ["s3://klab-jobs/in.txt"]}, {"outputs": ["s3://klab-results/in.txt"]}):
        with pytest.raises(ValueError, match=r"script_name 'in.txt' is the name s3://klab-.*/in\.txt"):
            KottaJob(executable="/bin/sh in.txt", script_name="in.txt", script="true", **kw)
    KottaJob(executable="/bin/sh run.sh", script_name="run.sh", script="true",
             inputs=["s3://klab-jobs/in.txt"], outputs=["s3://klab-results/out.txt"])


def test_bad_data_and_arguments_are_refused(konn):
    with pytest.raises(kotta_executor.errors.InvalidDataUri, match="steps out"):
        KottaJob(
            jobtype="script", executable="/bin/bash a.sh", script_name="a.sh", script="true",
            inputs=["s3://bucket/../data.csv"],
        )
    with pytest.raises(kotta_executor.errors.InvalidDataUri, match="s3://"):
        KottaJob(
            jobtype="script", executable="/bin/bash a.sh", script_name="a.sh", script="true",
            outputs=["result.csv"],
        )
    with pytest.raises(ValueError, match="jobtype"):
        KottaJob(jobtype="doc_to_vec", executable="x", script_name="a", script="")
    with pytest.raises(ValueError, match="script_name"):
        KottaJob(executable="/bin/bash ../a.sh", script_name="../a.sh", script="")
    with pytest.raises(ValueError, match="executable"):
        KottaJob(executable="  ", script_name="a.sh", script="")
    with pytest.raises(kotta_executor.ConfigurationError):
        KottaJob(executable="/bin/bash a.sh", script_name="a.sh", script="", queue="nope")
    with pytest.raises(kotta_executor.ConfigurationError):
        KottaJob(executable="/bin/bash a.sh", script_name="a.sh", script="", walltime=0)
    job = _bash("true")
    with pytest.raises(RuntimeError, match="not been submitted"):
        job.status()
    with pytest.raises(TypeError, match="connection"):
        job.submit("not a connection")
    job.submit(konn)
    with pytest.raises(RuntimeError, match="already submitted"):
        job.submit(konn)
    assert job.wait(GUARD) == 0


def test_an_executable_that_cannot_be_split_or_run_is_refused_naming_it():
    """An unclosed quote said only 'No closing quotation'; a NUL byte was accepted and
    failed the job on the node with 'embedded null byte'."""
    with pytest.raises(ValueError, match=r"executable .*\"/bin/sh 'run.sh\".*no closing quotation"):
        KottaJob(executable="/bin/sh 'run.sh", script_name="run.sh", script="true")
    with pytest.raises(ValueError, match=r"executable .*NUL"):
        KottaJob(executable="/bin/sh\0 run.sh", script_name="run.sh", script="true")


def test_a_script_name_too_long_for_a_file_is_refused_when_the_job_is_made():
    """It was accepted and failed the job on the node, once it ran, with "File name too
    long" (a file name is at most 255 bytes: NAME_MAX)."""
    name = "é" * 127 + ".sh"  # 257 bytes in UTF-8, 130 characters
    with pytest.raises(ValueError, match=r"script_name .* 257 bytes .* at most 255"):
        KottaJob(executable=f"/bin/sh {name}", script_name=name, script="true")
    name = "é" * 126 + ".sh"  # 255 bytes: a file may have that name
    assert KottaJob(executable=f"/bin/sh {name}", script_name=name, script="true")


def test_a_script_utf8_cannot_hold_is_refused_when_the_job_is_made():
    """It was accepted and failed the job on the node with a UnicodeEncodeError."""
    with pytest.raises(ValueError, match=r"script holds .* at position 5, which UTF-8 cannot encode"):
        KottaJob(executable="/bin/sh run.sh", script_name="run.sh", script="echo \udce9")


def test_script_text_in_any_language(konn):
    job = KottaJob(
        jobtype="script", jobname="sh", executable="./run.sh", script_name="run.sh",
        script=textwrap.dedent(
            """\
            #!/bin/sh
            echo "argv0=$0"
            exit 0
            """
        ),
    )
    job.submit(konn)
    assert job.wait(GUARD) == 0
    assert job.stdout == "argv0=./run.sh\n"


def test_a_node_starting_removes_the_script_directories_of_workers_gone(start_node, tmp_path):
    """A node removes its killed worker's script directories only once what the worker
    started has gone: a node itself killed (SIGKILL) in between never did, and they stayed
    for good, with what the scripts wrote.  The next node to start removes them; not those
    of a live pid, nor of another PID namespace's workers."""
    from kotta_executor.config import script_dir_prefix, script_tmpdir

    gone_pid = _dead_pid()
    ns = os.stat("/proc/self/ns/pid").st_ino
    dead = os.path.join(script_tmpdir(), f"{script_dir_prefix(gone_pid)}x1")
    alive = os.path.join(script_tmpdir(), f"{script_dir_prefix(os.getpid())}x2")
    other = os.path.join(script_tmpdir(), f"kotta-script-{gone_pid}-{ns + 1}-x3")
    with contextlib.ExitStack() as stack:
        for path in (dead, alive, other):
            os.mkdir(path)
            stack.callback(lambda p=path: os.path.isdir(p) and __import__("shutil").rmtree(p))
        os.mkdir(os.path.join(dead, "results"))
        with open(os.path.join(dead, "results", "derived.csv"), "w") as f:
            f.write("what the script wrote\n")
        os.chmod(os.path.join(dead, "results"), 0o500)  # (made read-only by the script)
        start_node(workers=1)  # (it sweeps before it registers, which start_node waits for)
        assert not os.path.exists(dead)
        assert os.path.isdir(alive) and os.path.isdir(other)


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12) | st.sampled_from(["/bin/sh run.sh", "sh \ud800", "sh 'a", " "]),
       st.text(max_size=8) | st.sampled_from(["run.sh", "\ud800.sh", "a/b", "..", "\udce9"]))
def test_an_executable_and_script_name_are_runnable_or_refused_naming_them(exe, name):
    """Whatever text they are, a job is made whose command line and file name the node
    can hand the OS, or a ValueError (TypeError) naming which is wrong: never one that
    fails only on the node, nor an error that names neither."""
    try:
        job = KottaJob(executable=exe, script_name=name, script="#!/bin/sh\n")
    except (ValueError, TypeError) as exc:
        assert "executable" in str(exc) or "script_name" in str(exc), exc
        return
    for arg in [*shlex.split(job.executable), job.script_name]:
        os.fsencode(arg)  # (how subprocess and open() hand it to the OS)


def test_an_executable_no_file_name_encoding_can_hold_is_refused_when_the_job_is_made():
    """A lone surrogate in the command line was accepted, and the job failed on the node,
    once it ran, with a UnicodeEncodeError."""
    with pytest.raises(ValueError, match=r"executable .* cannot encode"):
        KottaJob(executable="/bin/sh run.sh \ud800", script_name="run.sh", script="true")
    # (an undecodable byte, as os.fsdecode spells it, is a valid argument)
    assert KottaJob(executable="/bin/sh run.sh \udce9", script_name="run.sh", script="true")


def test_a_script_name_no_file_name_encoding_can_hold_is_refused_naming_it():
    """It raised the codec's bare UnicodeEncodeError, naming neither script_name nor why."""
    with pytest.raises(ValueError, match=r"script_name .* cannot encode"):
        KottaJob(executable="/bin/sh run.sh", script_name="\ud800.sh", script="true")


def test_two_threads_submitting_one_job_together_submit_it_once(enclave_dir, enclave):
    """submit checked, then submitted, with no lock: two threads that called it together
    (the first making the connection's executor, the second waiting for it) both got past
    the check, and the enclave had the one job twice."""
    import threading

    konn = kotta_executor.connect(enclave_dir, start_node=False)  # (the jobs stay pending)
    job = _bash("true")
    barrier = threading.Barrier(2)
    ids, errors = [], []

    def submit():
        barrier.wait(GUARD)
        try:
            ids.append(job.submit(konn))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD)
        assert len(ids) == 1 and ids[0] == job.job_id
        assert len(errors) == 1 and "already submitted" in str(errors[0])
        wait_for(lambda: enclave.jobs.get(ids[0]), what="the job's record")  # (sent in the
        # background)
        assert [r.job_id for r in enclave.jobs.list()] == ids
    finally:
        if konn._executor is not None:
            _finish(konn._executor)
        konn.close()


def test_an_unsubmitted_job_can_be_copied_and_pickled_as_before_its_submit_lock():
    """submit's lock made every KottaJob refuse copy.deepcopy and pickle ("cannot pickle
    '_thread.lock' object"): a job made once as a template and copied for each input, or
    handed to another process, worked before.  A copy has a lock of its own."""
    import copy
    import pickle

    job = _bash("echo $1", walltime=3)
    for twin in (copy.deepcopy(job), pickle.loads(pickle.dumps(job))):
        assert (twin.executable, twin.script, twin.walltime, twin.future) == (
            job.executable, job.script, job.walltime, None)
        assert twin._submit_lock is not job._submit_lock
        with twin._submit_lock:  # (a working lock of its own)
            pass
