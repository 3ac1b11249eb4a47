"""Datasets end to end on the embedded enclave: policies, staging, delegated credentials,
egress, audit — with real nodes, workers and files.

The issue's "done when": Cloud Kotta's ``file_sum(inputs=['s3://.../1m_shuffled.txt'])``
runs for a user with read access, and fails with an access-denied error and an audit
record for one without.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from kotta_executor import errors
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.data import get_object, put_object, verify_credential
from kotta_executor.security.policy import PolicyStore
from tests import tasks
from tests.conftest import GUARD, wait_for

NUMBERS = "\n".join(str(i) for i in range(1, 1001)) + "\n"
SUM = 1000 * 1001 // 2
CORPUS = "s3://klab-jobs/"
INPUT = "s3://klab-jobs/1m_shuffled.txt"
RESULTS = "s3://klab-results/"


@pytest.fixture
def data(enclave, user_token):
    """An enclave with two datasets; analysts read klab-jobs and write klab-results,
    guests have no grant."""
    admin = credentials.load(enclave)
    audit = AuditLog(enclave)
    policies = PolicyStore(enclave.records, audit)
    policies.add_dataset(CORPUS, by=admin.user, description="licensed corpus")
    policies.add_dataset(RESULTS, by=admin.user)
    policies.grant("analyst", CORPUS, "read", by=admin.user)
    policies.grant("analyst", RESULTS, "write", by=admin.user)
    put_object(enclave, INPUT, NUMBERS.encode())

    class Data:
        pass

    d = Data()
    d.enclave, d.audit, d.policies, d.admin = enclave, audit, policies, admin
    d.alice = user_token("alice", role="analyst")
    d.bob = user_token("bob", role="guest")
    return d


def test_file_sum_runs_for_a_reader_and_is_denied_and_audited_for_others(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    assert f.result(GUARD) == SUM
    stage_in = data.audit.show(job_id=f.job_id, action="stage-in")
    assert [(r["user"], r["dataset"], r["allowed"]) for r in stage_in] == [("alice", INPUT, True)]

    bob = make_executor(1, credentials=data.bob, start_node=False)
    g = bob.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.DataAccessDenied) as info:
        g.result(GUARD)
    assert isinstance(info.value, PermissionError)
    assert "guest" in str(info.value) and INPUT in str(info.value)
    assert "nothing ran" in str(info.value)
    denied = data.audit.show(job_id=g.job_id, action="access-denied")
    assert [(r["user"], r["dataset"], r["allowed"]) for r in denied] == [("bob", INPUT, False)]
    assert g.status() == "failed"
    assert data.audit.verify().ok


def test_an_explicit_deny_overrides_the_role_grant(data, make_executor):
    data.policies.add_dataset("s3://klab-jobs/restricted/", by=data.admin.user)
    data.policies.grant("analyst", "s3://klab-jobs/restricted/", "read", by=data.admin.user,
                        effect="deny")
    put_object(data.enclave, "s3://klab-jobs/restricted/x.txt", b"1\n")
    alice = make_executor(1, credentials=data.alice)
    with pytest.raises(errors.DataAccessDenied, match="explicitly denied"):
        alice.submit(tasks.file_sum, inputs=["s3://klab-jobs/restricted/x.txt"]).result(GUARD)


def test_inputs_are_staged_into_a_private_working_directory_with_scoped_credentials(
    data, make_executor
):
    alice = make_executor(1, credentials=data.alice)
    ex = alice.with_options(inputs=[INPUT])
    f = ex.submit(
        tasks.read_staged_and_env, "1m_shuffled.txt", "KOTTA_DATA_CREDENTIAL", "KOTTA_OWNER"
    )
    text, cwd, env = f.result(GUARD)
    assert text == NUMBERS
    # named after its whole job id (the first digits are the submit time: a burst's alike)
    assert Path(cwd).name.startswith(f"{f.job_id}-")
    assert env["KOTTA_OWNER"] == "alice"
    cred = verify_credential(data.enclave, env["KOTTA_DATA_CREDENTIAL"])
    assert (cred.user, cred.read, cred.write) == ("alice", (INPUT,), ())
    assert not Path(cwd).exists(), "the working directory is removed after the task"
    # a task without data runs where workers always run, without a data credential
    _, _, env2 = alice.submit(tasks.read_staged_and_env, os.devnull, "KOTTA_DATA_CREDENTIAL").result(GUARD)
    assert env2 == {"KOTTA_DATA_CREDENTIAL": None}


def test_a_working_directory_the_task_made_read_only_is_removed_all_the_same(
    data, make_executor
):
    """A task runs as the node's user and may leave read-only directories behind; the
    node's rmtree could not empty them, and the copies of its inputs (protected data) stayed
    on the node for good.  (As root, which may write anything, this always passed.)"""
    alice = make_executor(1, credentials=data.alice)
    cwd = alice.submit(tasks.keep_read_only, "1m_shuffled.txt", inputs=[INPUT]).result(GUARD)
    assert not Path(cwd).exists(), "the working directory, with a copy of the input, was left"


def test_outputs_are_uploaded_with_the_owners_rights_and_audited(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    out = "s3://klab-results/alice/summary.txt"
    f = alice.submit(tasks.write_file, "summary.txt", "total 500500\n", outputs=[out])
    f.result(GUARD)
    assert get_object(data.enclave, out) == b"total 500500\n"
    (rec,) = data.audit.show(job_id=f.job_id, action="stage-out")
    assert (rec["user"], rec["dataset"], rec["allowed"]) == ("alice", out, True)


def test_an_output_under_the_key_of_another_object_is_named_on_the_embedded_enclave(
    data, make_executor
):
    """The embedded enclave keeps objects as files, so s3://.../run1 and .../run1/x.txt
    cannot both be objects (S3 can keep both).  The task writing the second failed, after
    it ran, with `FileExistsError: [Errno 17] File exists: '<enclave>/data/...'`."""
    alice = make_executor(1, credentials=data.alice)
    run1 = "s3://klab-results/alice/run1"
    alice.submit(tasks.write_file, "run1", "first\n", outputs=[run1]).result(GUARD)
    f = alice.submit(tasks.write_file, "x.txt", "second\n", outputs=[f"{run1}/x.txt"])
    with pytest.raises(errors.StagingFailed) as info:
        f.result(GUARD)
    assert f"{run1} is an object" in str(info.value)
    assert str(data.enclave.home) not in str(info.value)
    assert get_object(data.enclave, run1) == b"first\n"


def test_an_output_that_cannot_be_written_fails_the_job_before_any_output_is_written(
    data, make_executor
):
    """The second of two outputs lies under the key of an object (the embedded enclave
    cannot keep it): the job failed with StagingFailed, yet the first output had been
    written to its dataset, by a job that failed."""
    alice = make_executor(1, credentials=data.alice)
    run1 = "s3://klab-results/alice/run1"
    alice.submit(tasks.write_file, "run1", "first\n", outputs=[run1]).result(GUARD)
    first = "s3://klab-results/alice/a.txt"
    f = alice.submit(tasks.write_files, ["a.txt", "x.txt"], outputs=[first, f"{run1}/x.txt"])
    with pytest.raises(errors.StagingFailed, match=f"{run1} is an object"):
        f.result(GUARD)
    with pytest.raises(FileNotFoundError):
        get_object(data.enclave, first)
    assert data.audit.show(job_id=f.job_id, action="stage-out") == []


def test_two_outputs_of_one_task_one_under_the_other_fail_before_either_is_written(
    data, make_executor
):
    """s3://.../run2 and s3://.../run2/x.txt, outputs of one task: the embedded enclave
    cannot keep both, and neither was there when the task's outputs were checked, so the
    first was written (and audited) and the job then failed on the second."""
    alice = make_executor(1, credentials=data.alice)
    for run in ("run2", "run3"):  # in either order
        uri = f"s3://klab-results/alice/{run}"
        outputs = [uri, f"{uri}/x.txt"] if run == "run2" else [f"{uri}/x.txt", uri]
        f = alice.submit(tasks.write_files, [run, "x.txt"], outputs=outputs)
        with pytest.raises(errors.StagingFailed, match=f"{uri} is an object too"):
            f.result(GUARD)
        for out in outputs:
            with pytest.raises(FileNotFoundError):
                get_object(data.enclave, out)
        assert data.audit.show(job_id=f.job_id, action="stage-out") == []


def test_the_enclaves_held_results_are_never_a_dataset(data, make_executor):
    """`kotta dataset add s3://kotta-held/` (where the embedded enclave keeps the results
    egress control held back) was taken, and with a read grant a task staged a held result
    as its input and returned it: out of the enclave.  Such a dataset is refused, and one
    registered before is no grant: DataAccessDenied, audited."""
    held = "s3://kotta-held/"
    with pytest.raises(errors.ConfigurationError, match="enclave's own storage"):
        PolicyStore(data.enclave.records, reserved=[held]).add_dataset(held, by="root")
    data.policies.add_dataset(held, by=data.admin.user)  # (as an older version did)
    data.policies.grant("analyst", held, "read", by=data.admin.user)
    put_object(data.enclave, held + "j1", b"1\n2\n")  # a result held for review
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[held + "j1"])
    with pytest.raises(errors.DataAccessDenied, match="enclave's own storage"):
        f.result(GUARD)
    [denied] = data.audit.show(job_id=f.job_id, action="access-denied")
    assert (denied["user"], denied["dataset"]) == ("alice", held + "j1")


def test_an_output_without_a_write_grant_fails_before_anything_runs(data, make_executor, tmp_path):
    alice = make_executor(1, credentials=data.alice)
    marker = tmp_path / "ran"
    with pytest.raises(errors.DataAccessDenied, match="write"):
        alice.submit(tasks.write_file, str(marker), "x", outputs=["s3://klab-jobs/mine.txt"]).result(GUARD)
    assert not marker.exists()


def test_a_symlink_output_pointing_out_of_the_working_directory_is_refused(
    data, make_executor, tmp_path
):
    secret = tmp_path / "node-secret.txt"
    secret.write_text("node only")
    alice = make_executor(1, credentials=data.alice)
    out = "s3://klab-results/alice/leak.txt"
    f = alice.submit(tasks.symlink_out, "leak.txt", str(secret), outputs=[out])
    with pytest.raises(errors.StagingFailed, match="symlink"):
        f.result(GUARD)
    with pytest.raises(FileNotFoundError):
        get_object(data.enclave, out)


def test_a_missing_output_fails_the_job_with_its_name(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.noop, outputs=["s3://klab-results/alice/never.txt"])
    with pytest.raises(errors.StagingFailed, match="never.txt"):
        f.result(GUARD)


def test_an_output_with_the_file_name_of_an_input_is_refused_at_submit(data, make_executor):
    """An input and an output of one basename are one file in the working directory: a
    task that wrote no output had its staged input uploaded as the output (no "did not
    write", a copy of the input in the output's dataset), and one that wrote it replaced
    the input it was reading.  Refused at submit (with_options, submit, a script job),
    naming the file, as two inputs (or two outputs) of one basename are; nothing runs.
    (One object as an input and an output is a task that updates it in place: below.)"""
    from kotta_executor import KottaJob

    alice = make_executor(1, credentials=data.alice, start_node=False)
    out = "s3://klab-results/alice/1m_shuffled.txt"
    said = "input s3://klab-jobs/1m_shuffled.txt and the output " + out
    with pytest.raises(errors.InvalidDataUri, match=f"{said} would both be '1m_shuffled.txt'"):
        alice.submit(tasks.noop, inputs=[INPUT], outputs=[out])
    with pytest.raises(ValueError, match="'1m_shuffled.txt'"):
        alice.with_options(inputs=[INPUT], outputs=[out])
    with pytest.raises(ValueError, match="'1m_shuffled.txt'"):  # declared in two steps
        alice.with_options(inputs=[INPUT]).with_options(outputs=[out])
    with pytest.raises(ValueError, match="'1m_shuffled.txt'"):
        alice.with_options(outputs=[out]).submit(tasks.noop, inputs=[INPUT])
    with pytest.raises(ValueError, match="'1m_shuffled.txt'"):
        KottaJob(jobtype="script", jobname="x", executable="/bin/sh x.sh", script_name="x.sh",
                 script="true\n", inputs=[INPUT], outputs=[out], queue="test", walltime=1)


def test_a_task_updates_an_object_given_as_its_input_and_its_output_in_place(data,
                                                                              make_executor):
    """One object as an input and an output: read, changed and written back, as a
    researcher updates a file of results."""
    log = "s3://klab-results/alice/log.txt"
    data.policies.grant("analyst", RESULTS, "read", by=data.admin.user)
    put_object(data.enclave, log, b"first\n")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.append_to_inputs, "second\n", inputs=[log], outputs=[log])
    assert f.result(GUARD) == 1
    assert get_object(data.enclave, log) == b"first\nsecond\n"


def test_a_hand_built_task_whose_output_has_the_file_name_of_an_input_is_refused_by_the_node(
        data, make_executor, start_node):
    """A task header declaring an input and an output of one file name (from an older
    client, or built by hand and signed with a valid token), which clients refuse at submit:
    the node refuses it too (it checks what a header declares as clients do), so the input
    is never uploaded as the output; nothing runs."""
    import time as _time

    from kotta_executor import wire
    from kotta_executor.backends.base import NewJob

    ex = make_executor(1, credentials=data.alice, start_node=False)
    alice = credentials.load(data.enclave, data.alice).access()
    out = "s3://klab-results/alice/1m_shuffled.txt"
    header = wire.task_header(
        job_id=os.urandom(16).hex(), owner=alice.user, client=ex.client_id, queue="test",
        walltime=60.0, created=_time.time(), fn=wire.fn_name(tasks.noop), n=1,
    )
    header.update(inputs=[INPUT], outputs=[out])
    body = alice.sign(header, wire.dump_call(tasks.noop, [((), {})]))
    job_id = header["job_id"]
    data.enclave.jobs.create([NewJob(job_id, alice.user, ex.client_id, "test", header["fn"],
                                     60.0, body)])
    start_node(workers=1)
    with pytest.raises(errors.CorruptTask, match="would both be '1m_shuffled.txt'"):
        ex.attach(job_id).result(GUARD)
    with pytest.raises(Exception):  # noqa: B017 - not written: no such object
        get_object(data.enclave, out)


def test_uris_that_share_a_file_name_get_no_note_on_passing_an_argument_so_named(
        data, make_executor):
    """Two inputs (or an input and an output) of one file name, given to submit, were
    refused with a note meant for code passing its function an argument named inputs
    ("to pass noop an argument so named, give it by position or with functools.partial"):
    the URIs were URIs, and the hint sent the user the wrong way.  Only the clash is said;
    a value that is no list of URIs keeps the note."""
    alice = make_executor(1, credentials=data.alice, start_node=False)
    other = "s3://klab-results/alice/1m_shuffled.txt"
    for kw in ({"inputs": [INPUT, other]}, {"inputs": [INPUT], "outputs": [other]}):
        with pytest.raises(errors.InvalidDataUri, match="would both be") as info:
            alice.submit(tasks.noop, **kw)
        assert not getattr(info.value, "__notes__", None), info.value.__notes__
    with pytest.raises(errors.InvalidDataUri, match="would both be") as info:
        alice.with_options(inputs=[INPUT]).submit(tasks.noop, inputs=[other])
    assert not getattr(info.value, "__notes__", None), info.value.__notes__
    with pytest.raises(errors.InvalidDataUri) as info:
        alice.submit(tasks.noop, inputs=[1, 2])
    assert any("argument so named" in n for n in info.value.__notes__)


def test_a_task_whose_outputs_fail_keeps_its_stdout_stderr_and_usage(data, make_executor):
    """The task ran, printed why it wrote no file, and its stage-out failed: the
    StagingFailed came with empty stdout and stderr and no usage, the very output that
    says what went wrong (and the time the task used) lost."""
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.say, "no summary today", outputs=["s3://klab-results/alice/never.txt"])
    with pytest.raises(errors.StagingFailed, match="never.txt"):
        f.result(GUARD)
    assert f.stdout == "no summary today out\n"
    assert f.stderr == "no summary today err\n"
    assert f.usage() is not None and f.usage()["wall"] >= 0


def test_a_staged_task_whose_requirements_fail_leaves_no_copy_of_its_inputs(
        data, make_executor, monkeypatch, tmp_path):
    """A task's inputs are staged before its requirements are installed; when the install
    failed, the job failed with RequirementsError but its working directory, with a copy
    of each input (protected data), stayed on the node until the node stopped."""
    from kotta_executor import config

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # (pip finds nothing, and asks no one)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.delenv("KOTTA_ENVS", raising=False)
    alice = make_executor(1, credentials=data.alice)
    f = alice.with_options(requirements="no-such-package-kotta==9").submit(
        tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.RequirementsError):
        f.result(GUARD)
    assert data.audit.show(job_id=f.job_id, action="stage-in"), "its input was staged"
    left = list((config.kotta_home() / "stage").glob(f"*/work/{f.job_id}-*"))
    assert left == [], "the working directory, with a copy of the input, was left"


def test_a_missing_input_fails_the_job_with_its_uri(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    with pytest.raises(errors.StagingFailed, match="no object s3://klab-jobs/absent.txt"):
        alice.submit(tasks.file_sum, inputs=["s3://klab-jobs/absent.txt"]).result(GUARD)


@pytest.mark.parametrize(
    "uri",
    ["s3://klab-jobs/../klab-results/x", "s3://klab-jobs/a/%2e%2e/b.txt", "s3://klab-jobs/",
     "file:///etc/passwd", "s3://klab-jobs/a\\..\\b"],
)
def test_traversal_and_malformed_uris_are_refused_at_submit(data, make_executor, uri):
    alice = make_executor(1, credentials=data.alice, start_node=False)
    with pytest.raises(errors.InvalidDataUri):
        alice.submit(tasks.file_sum, inputs=[uri])
    with pytest.raises(errors.InvalidDataUri):
        alice.with_options(outputs=[uri])


def test_a_file_name_no_working_directory_can_hold_is_refused_at_submit(
    data, make_executor, tmp_path
):
    """S3 takes a key segment of 300 bytes; a working directory cannot hold a file of that
    name: the task ran to its end, then its stage-out failed with an OSError naming the
    node's staging area."""
    alice = make_executor(1, credentials=data.alice)
    marker = tmp_path / "ran"
    name = "r" * 300 + ".txt"
    with pytest.raises(errors.InvalidDataUri, match="longer than 255 bytes"):
        alice.submit(tasks.create_file, str(marker), outputs=[RESULTS + "alice/" + name])
    with pytest.raises(errors.InvalidDataUri, match="longer than 255 bytes"):
        alice.with_options(inputs=["s3://klab-jobs/" + name])
    longest = "r" * 251 + ".txt"  # 255 bytes: it fits
    alice.submit(tasks.write_file, longest, "kept",
                 outputs=[RESULTS + "alice/" + longest]).result(GUARD)
    assert get_object(data.enclave, RESULTS + "alice/" + longest) == b"kept"
    assert not marker.exists()


def test_a_file_name_of_wide_characters_that_fits_is_staged_in_and_out(data, make_executor):
    """A name of 61 four-byte characters (244 bytes) is a valid file name, and was taken at
    submit; but the temporary names it was written through kept its first 80 characters,
    over 255 bytes: `kotta dataset put` failed, and a task's stage-in and stage-out with
    an OSError (File name too long) naming the node's staging area."""
    name = "\U0001F600" * 60 + "é.txt"  # 240 + 2 + 4 = 246 bytes
    assert len(name.encode()) <= 255
    put_object(data.enclave, CORPUS + name, NUMBERS.encode())
    assert get_object(data.enclave, CORPUS + name) == NUMBERS.encode()
    alice = make_executor(1, credentials=data.alice)
    assert alice.submit(tasks.file_sum, inputs=[CORPUS + name]).result(GUARD) == SUM
    alice.submit(tasks.write_file, name, "kept",
                 outputs=[RESULTS + "alice/" + name]).result(GUARD)
    assert get_object(data.enclave, RESULTS + "alice/" + name) == b"kept"


def test_a_task_declaring_more_data_than_a_node_reads_is_refused_at_submit(data, make_executor):
    """5,000 inputs of some 200 bytes each make a task header over the 1 MiB a node reads.
    The submit took it, and the node failed it as "a corrupt task message: truncated kotta
    envelope: header runs past the end": nothing was cut short, and nothing said why."""
    alice = make_executor(1, credentials=data.alice, start_node=False)
    inputs = [f"s3://klab-jobs/{'x' * 200}-{i:05d}.txt" for i in range(5000)]
    with pytest.raises(errors.InvalidDataUri, match=r"5000 inputs.*over the 1048576 bytes"):
        alice.submit(tasks.file_sum, inputs=inputs)
    with pytest.raises(errors.InvalidDataUri, match=r"5000 outputs"):
        alice.with_options(outputs=[u.replace("klab-jobs", "klab-results") for u in inputs]
                           ).submit(tasks.square, 2)
    assert data.enclave.jobs.list(owner="alice", limit=10) == []
    assert alice.submit(tasks.file_sum, inputs=inputs[:3000]).job_id  # under it: taken


def test_a_changed_input_is_fetched_again(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM  # a cache hit
    put_object(data.enclave, INPUT, b"1\n2\n")
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == 3
    cached = [r for r in data.audit.show(action="stage-in") if "cache" in (r["detail"] or "")]
    assert len(cached) == 1


def test_a_cache_hit_still_checks_permission(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM
    data.policies.revoke("analyst", CORPUS, "read", by=data.admin.user)
    with pytest.raises(errors.DataAccessDenied):
        alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD)


def test_egress_denied_keeps_the_result_in_the_enclave(data, make_executor):
    data.policies.add_dataset(CORPUS, by=data.admin.user, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.EgressDenied) as info:
        f.result(GUARD)
    assert info.value.handle == f"s3://kotta-held/{f.job_id}"
    assert str(SUM) not in str(info.value)
    held = get_object(data.enclave, info.value.handle)  # with the enclave's own rights
    from kotta_executor import wire

    assert wire.outcomes(wire.decode(held)) == [(True, SUM)]
    (rec,) = data.audit.show(job_id=f.job_id, action="egress-denied")
    assert rec["allowed"] is False and rec["user"] == "alice"


def test_a_held_result_whose_audit_record_fails_for_good_fails_the_job_not_the_node(
        data, make_executor, enclave_dir):
    """A task read data that may not leave the enclave: its result was held, then the
    egress-denied record could not be written (the audit store refusing it for good).
    The node died ("the audit store is full"), the job stayed processing, and the next
    node ran it again and died again.  The job fails with a reason naming the record;
    nothing of the result leaves; the node serves on."""
    import sqlite3

    data.policies.add_dataset(CORPUS, by=data.admin.user, egress="deny")
    with sqlite3.connect(Path(enclave_dir) / "kotta.db") as db:
        db.execute(
            "CREATE TRIGGER the_audit_fails BEFORE INSERT ON records"
            " WHEN NEW.kind='audit' AND NEW.value LIKE '%egress-denied%'"
            " BEGIN SELECT RAISE(ABORT, 'the audit store is full'); END")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.StagingFailed, match="the audit store is full") as info:
        f.result(GUARD)
    assert "egress" in str(info.value) and str(SUM) not in str(info.value)
    assert f.status() == "failed" and not f.stdout
    states = [s for _, s, _ in data.enclave.jobs.history(f.job_id)]
    assert states.count("processing") == 1, states
    assert alice.submit(tasks.square, 3).result(GUARD) == 9  # (the same node serves on)
    assert "kotta: error" not in alice._node_log("test").read_text()  # (the node lived)


def test_a_held_result_whose_outputs_fail_still_says_where_it_is_kept(data, make_executor):
    """A task read data that may not leave the enclave (its result held), then its output
    was missing: the StagingFailed said nothing of the held result, and had no handle,
    though the result was kept in the enclave for an admin's review."""
    data.policies.add_dataset(CORPUS, by=data.admin.user, egress="deny")
    data.policies.add_dataset(RESULTS, by=data.admin.user, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT], outputs=["s3://klab-results/alice/never.txt"])
    with pytest.raises(errors.StagingFailed, match="never.txt") as info:
        f.result(GUARD)
    handle = f"s3://kotta-held/{f.job_id}"
    assert info.value.handle == handle and handle in str(info.value)
    assert str(SUM) not in str(info.value) and f.stdout == ""
    get_object(data.enclave, handle)  # (kept, with the enclave's own rights)


def test_egress_cap_counts_the_value_and_its_output(data, make_executor):
    data.policies.add_dataset(CORPUS, by=data.admin.user, egress_cap=2000)
    alice = make_executor(1, credentials=data.alice).with_options(inputs=[INPUT])
    assert alice.submit(tasks.chatty, 100).result(GUARD) == "done"  # within the cap
    f = alice.submit(tasks.chatty, 5000)  # its stdout alone is over the cap
    with pytest.raises(errors.EgressDenied, match="caps egress at 2000 bytes"):
        f.result(GUARD)
    assert "x" * 100 not in (f.stdout or "")


def test_stdout_flood_is_capped_and_truncation_noted(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    from node.worker import CAPTURE_LIMIT

    f = alice.submit(tasks.chatty, CAPTURE_LIMIT + 1000)
    assert f.result(GUARD) == "done"
    assert len(f.stdout) < CAPTURE_LIMIT + 200
    assert "1000 earlier bytes of output were dropped" in f.stdout


def test_a_script_job_stages_its_inputs_and_outputs(data, make_executor):
    from kotta_executor import KottaJob

    alice = make_executor(1, credentials=data.alice)
    out = "s3://klab-results/alice/lines.txt"
    job = KottaJob(
        jobtype="script", jobname="count", executable="/bin/sh count.sh", script_name="count.sh",
        script="wc -l < 1m_shuffled.txt > lines.txt\n", inputs=[INPUT], outputs=[out],
        queue="test", walltime=1,
    )
    job.submit(alice)
    assert job.wait(GUARD) == 0
    assert get_object(data.enclave, out).strip() == b"1000"
    assert [r["action"] for r in data.audit.show(job_id=job.job_id)] == ["stage-in", "stage-out"]


def _staged_behind_a_blocker(data, make_executor, tmp_path):
    """Alice's executor with one worker, held by a blocker (released by touching
    ``release``), and a task with an input queued behind it (it creates ``marker`` if it
    runs): (blocker, task, release, marker)."""
    alice = make_executor(1, credentials=data.alice)
    release, began = tmp_path / "release", tmp_path / "began"
    blocker = alice.submit(tasks.log_pid_and_wait, str(began), str(release))  # holds the
    # only worker.  Begun on it, not only claimed (`processing`): claimed, it may wait for
    # its new worker to start up, and a task staged just as the worker began it was piped
    # behind it, one in reserve while the worker's tasks are not known to be long
    # (pool.Worker.depth): `processing`, where the tests expect `staging_inputs` (fresh
    # clones' CI runs saw it, under load)
    wait_for(lambda: began.exists() and began.read_text(), what="the blocker to begin")
    marker = tmp_path / "ran"
    f = alice.with_options(inputs=[INPUT]).submit(tasks.create_file, str(marker), "ran")
    return blocker, f, release, marker


def test_a_task_killed_while_staged_never_runs(data, make_executor, tmp_path):
    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    wait_for(lambda: f.status() == "staging_inputs", what="the task to be staged")
    assert f.kill() is True
    with pytest.raises(errors.TaskKilled, match="while staging; it never ran"):
        f.result(GUARD)
    assert f.status() == "cancelled"
    release.touch()
    blocker.result(GUARD)
    assert not marker.exists()


def test_a_task_killed_while_staged_shows_no_attempt_and_no_start(data, make_executor, tmp_path):
    """A task killed while staged (its inputs fetched, waiting for a worker): it never ran,
    yet its job record showed 1 attempt (and a start), as if begun; now 0, and none, as for
    a task killed in a worker's pipe (``attempts``: the times a node began the job)."""
    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    wait_for(lambda: f.status() == "staging_inputs", what="the task to be staged")
    assert f.kill() is True
    with pytest.raises(errors.TaskKilled, match="while staging; it never ran"):
        f.result(GUARD)
    record = data.enclave.jobs.get(f.job_id)
    assert (record.state.value, record.attempts, record.started) == ("cancelled", 0, None)
    release.touch()
    blocker.result(GUARD)
    assert not marker.exists()


def test_a_read_grant_revoked_while_a_staged_task_waits_stops_it(data, make_executor, tmp_path):
    """Staged, it waited for the only worker; its grant was revoked meanwhile.  It ran
    anyway, on the data staged before (the policy was read at stage-in only)."""
    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    wait_for(lambda: data.audit.show(job_id=f.job_id, action="stage-in"),
             what="the task's inputs to be staged")
    assert data.policies.revoke("analyst", CORPUS, "read", by=data.admin.user)
    release.touch()
    with pytest.raises(errors.DataAccessDenied, match="nothing ran"):
        f.result(GUARD)
    blocker.result(GUARD)
    assert not marker.exists()
    denied = data.audit.show(job_id=f.job_id, action="access-denied")
    assert [(r["user"], r["dataset"], r["allowed"]) for r in denied] == [("alice", INPUT, False)]


def test_a_staged_task_that_waited_for_a_worker_gets_credentials_for_its_whole_run(
        data, make_executor, tmp_path, monkeypatch):
    """A staged task may wait for a worker behind long tasks (a node stages every task it
    holds at once).  Its data credential, in its environment for ``open_objects()``,
    was issued at its stage-in, for walltime + CREDENTIAL_MARGIN from then: after a wait
    longer than the margin, the task started with less than its walltime to use it, or an
    expired one (AWS: a role session of at most an hour, gone before the task began).  The
    node runs in this process, its reissue threshold (half the margin) set to 1 s."""
    from node.daemon import Node, NodeConfig
    from node.datasteps import CREDENTIAL_MARGIN
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)  # workers import tests.* (cwd on sys.path)
    alice = make_executor(1, credentials=data.alice, start_node=False)
    release = tmp_path / "release"
    node = Node(data.enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                          prefetch=3))  # (it stages what it holds)
    node.data.reissue_after = 1.0
    node._start()
    try:
        blocker = alice.submit(tasks.wait_for_file, str(release))  # holds the only worker
        wait_for(lambda: (node.step(), blocker.status() == "processing")[1],
                 what="the blocker to run")
        f = alice.with_options(inputs=[INPUT]).submit(tasks.data_credential_left, INPUT)
        wait_for(lambda: (node.step(), data.audit.show(job_id=f.job_id, action="stage-in"))[1],
                 what="the task's inputs to be staged")
        staged_at = time.time()
        waited = 2.5  # it waits for the worker, longer than the threshold
        wait_for(lambda: (node.step(), time.time() > staged_at + waited)[1],
                 timeout=waited + GUARD, what="the staged task to wait for the worker")
        release.touch()
        wait_for(lambda: (node.step(), f.done())[1], what="the task to run")
    finally:
        node.stopping = True
        node._drain()
        node._stop()
    assert blocker.result(0) == ""  # (what the release file holds)
    walltime = alice._options.walltime
    assert f.result(0) > walltime + CREDENTIAL_MARGIN - 2.0


@pytest.mark.parametrize("lost", ["grant", "user"])
def test_rights_lost_while_the_task_runs_stop_its_upload(data, make_executor, tmp_path, lost):
    """Its output was uploaded, and audited as allowed, with a write grant revoked since;
    and a user disabled since had fresh credentials issued for the stage-out."""
    from kotta_executor.security.tokens import TokenService

    alice = make_executor(1, credentials=data.alice)
    out, release = "s3://klab-results/alice/late.txt", tmp_path / "release"
    f = alice.submit(tasks.write_file_when_released, "late.txt", "x", str(release), outputs=[out])
    wait_for(lambda: f.status() == "processing", what="the task to run")
    if lost == "grant":
        assert data.policies.revoke("analyst", RESULTS, "write", by=data.admin.user)
    else:
        TokenService(data.enclave, data.audit).set_disabled("alice", True, by=data.admin.user)
    release.touch()
    with pytest.raises(errors.DataAccessDenied, match="write" if lost == "grant" else "disabled"):
        f.result(GUARD)
    with pytest.raises(FileNotFoundError):
        get_object(data.enclave, out)
    assert data.audit.show(job_id=f.job_id, action="stage-out") == []
    [denied] = data.audit.show(job_id=f.job_id, action="access-denied")
    assert (denied["user"], denied["dataset"], denied["allowed"]) == ("alice", out, False)


def test_a_user_disabled_while_a_staged_task_waits_stops_it(data, make_executor, tmp_path):
    """Only the policies were read again when a worker was free for a staged task: its
    owner, disabled meanwhile, had it run all the same, on the data staged for it."""
    from kotta_executor.security.tokens import TokenService

    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    wait_for(lambda: data.audit.show(job_id=f.job_id, action="stage-in"),
             what="the task's inputs to be staged")
    TokenService(data.enclave, data.audit).set_disabled("alice", True, by=data.admin.user)
    release.touch()
    with pytest.raises(errors.DataAccessDenied, match="alice is disabled.*nothing ran"):
        f.result(GUARD)
    assert not marker.exists()
    [denied] = data.audit.show(job_id=f.job_id, action="access-denied")
    assert denied["user"] == "alice" and not denied["allowed"] and INPUT in denied["dataset"]


def test_egress_made_stricter_while_a_staged_task_waits_holds_its_result(data, make_executor,
                                                                         tmp_path):
    """The grants were read again when a worker was free for a staged task, its data's
    egress rule was not: set to deny meanwhile, the task's result still left the enclave."""
    alice = make_executor(1, credentials=data.alice)
    release, marker = tmp_path / "release", tmp_path / "ran"
    blocker = alice.submit(tasks.wait_for_file, str(release))  # holds the only worker
    wait_for(lambda: blocker.status() == "processing", what="the blocker to run")
    f = alice.submit(tasks.create_file_and_sum, str(marker), inputs=[INPUT])
    wait_for(lambda: data.audit.show(job_id=f.job_id, action="stage-in"),
             what="the task's inputs to be staged")
    data.policies.add_dataset(CORPUS, by=data.admin.user, egress="deny")
    release.touch()
    blocker.result(GUARD)
    with pytest.raises(errors.EgressDenied):
        f.result(GUARD)
    assert marker.exists()  # it ran; its result stays in the enclave


def test_what_was_staged_before_a_staging_step_failed_is_audited(data, make_executor):
    """Inputs and outputs were audited once all of them were staged: an input read, or
    an output written, before a later one failed, left no record.  (An output is audited
    just before its upload, so that none is ever written unaudited: one whose upload
    failed has the record of its attempt.)"""
    put_object(data.enclave, "s3://klab-results/alice/f", b"an object where a directory goes")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT, "s3://klab-jobs/absent.txt"])
    with pytest.raises(errors.StagingFailed):
        f.result(GUARD)
    assert [r["dataset"] for r in data.audit.show(job_id=f.job_id, action="stage-in")] == [INPUT]
    one, two = "s3://klab-results/alice/one.txt", "s3://klab-results/alice/f/two.txt"
    g = alice.submit(tasks.write_files, ["one.txt", "two.txt"], outputs=[one, two])
    with pytest.raises(errors.StagingFailed):
        g.result(GUARD)
    # (two, under the object f, is refused before any output is written: nothing to record)
    with pytest.raises(FileNotFoundError):
        get_object(data.enclave, one)
    assert data.audit.show(job_id=g.job_id, action="stage-out") == []


def test_a_task_cannot_write_its_outputs_itself(data, make_executor, tmp_path):
    """A task's data credentials let it write its declared outputs itself: after its
    write grant was revoked, unaudited, and whether it then succeeded or not.  They are
    for reading its inputs; its outputs are the node's to write, at stage-out."""
    alice = make_executor(1, credentials=data.alice)
    out, release = "s3://klab-results/alice/direct.txt", tmp_path / "release"
    f = alice.submit(tasks.upload_when_released, str(release), out, "secret", outputs=[out])
    wait_for(lambda: f.status() == "processing", what="the task to run")
    assert data.policies.revoke("analyst", RESULTS, "write", by=data.admin.user)
    release.touch()
    with pytest.raises(errors.AccessDenied):  # (the store refuses the task's write)
        f.result(GUARD)
    with pytest.raises(FileNotFoundError):
        get_object(data.enclave, out)


def test_an_input_declared_by_the_options_and_the_call_is_staged_once(data, make_executor):
    """The client let one URI through twice (the executor's options and the call's
    keyword), and the node refused the task: two files with one name."""
    alice = make_executor(1, credentials=data.alice).with_options(inputs=[INPUT])
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM


def test_a_duplicate_of_a_staged_task_going_to_a_worker_is_not_acked(data, make_executor,
                                                                    tmp_path):
    """A staged task goes back to the node's queue for a worker; an SQS duplicate of its
    message, counted as a first delivery, arrives in the same step and goes to stage in.
    It loses its claim, and was acked as a copy: the node did not count the task on its
    way to a worker as held, and the ack deleted the message that task still needed."""
    import sqlite3

    from kotta_executor.states import JobState
    from node.daemon import Node, NodeConfig

    enclave = data.enclave
    ex = make_executor(1, credentials=data.alice, start_node=False).with_options(inputs=[INPUT])
    out, stop = tmp_path / "runs.txt", tmp_path / "stop"
    job = ex._parent._new_job("ab" * 16, tasks.append_line_then_wait,
                              [((str(out), "ran", str(stop)), {})], ex._options)
    enclave.jobs.create([job])
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    try:
        wait_for(lambda: (node.step(), node.data.active)[1], what="staging to start")
        [staged] = node.data.active.values()
        wait_for(lambda: node.data._done, what="staging to end")  # (not collected yet)
        # SQS's rare duplicate: visible again, and counted as a first delivery
        enclave.queue.release([staged.delivery])
        with sqlite3.connect(enclave.home / "kotta.db", isolation_level=None) as db:
            db.execute("UPDATE messages SET receive_count=0 WHERE id=?",
                       (int(staged.delivery.message_id),))
        enclave.ring_nodes("test")  # the next step looks at the queue
        node.step()  # collects the staged task, receives its copy, dispatches both
        wait_for(lambda: (node.step(), out.exists())[1], what="the job to start")
        assert enclave.queue.depth("test") == 1, "the running task's message was acked"
        stop.touch()
        wait_for(lambda: (node.step(), enclave.queue.depth("test") == 0)[1],
                 what="the job to end and its message to be acked")
    finally:
        stop.touch()
        node._stop()
    assert enclave.jobs.get(job.job_id).state == JobState.COMPLETED
    assert out.read_text().splitlines() == ["ran"]


def _step_until_uploading(node, f) -> None:
    """Step a node in this process until ``f``'s job uploads its outputs: looked at right
    after the node reads the worker's result, which moves the job to staging_outputs, and
    before a step collects the upload, which for a small file may end within the step.
    Once the task is on a worker, the node is not stepped again, only made to read its
    result: a step that read it there (a busy machine: the result came as it stepped)
    collected the upload too, and the state was never seen (a CI failure, again)."""
    from kotta_executor.states import JobState

    def uploading() -> bool:
        node._wait()
        node._collect()
        if f.status() == JobState.STAGING_OUTPUTS:
            return True
        if not any(w.inflight for w in node.workers):  # (to receive and run it)
            node.step()
        return False

    wait_for(uploading, what="the job to stage its outputs")


@pytest.mark.parametrize("how", ["kotta cancel", "future.kill()"])
def test_a_kill_of_a_job_uploading_its_outputs_says_it_will_complete(
        data, make_executor, monkeypatch, how):
    """`kotta cancel` of a job in staging_outputs said it "is being killed" (exit 0), and
    ``future.kill()`` returned True: the task had run, the node uploaded its outputs all
    the same and the job completed.  The node runs in this process, stepped by the test,
    so that the job is certainly in staging_outputs when the kill is asked for."""
    from kotta_executor.states import JobState
    from node.daemon import Node, NodeConfig
    from tests.conftest import ROOT
    from tests.test_cli import kotta

    monkeypatch.chdir(ROOT)  # workers import tests.* (cwd on sys.path)
    enclave = data.enclave
    alice = make_executor(1, credentials=data.alice, start_node=False)
    out = "s3://klab-results/alice/kept.txt"
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    try:
        f = alice.submit(tasks.write_file, "kept.txt", "kept\n", outputs=[out])
        _step_until_uploading(node, f)
        if how == "kotta cancel":
            r = kotta(enclave.home, "cancel", f.job_id)
        else:
            killed = f.kill()
        wait_for(lambda: (node.step(), f.done())[1], what="the job to end")
    finally:
        node.stopping = True
        node._drain()
        node._stop()
    assert f.result(0)  # it completed, outputs uploaded: the message says so
    assert enclave.jobs.get(f.job_id).state == JobState.COMPLETED
    assert get_object(enclave, out) == b"kept\n"
    if how == "future.kill()":
        assert killed is False
        return
    assert r.returncode == 1, r.stdout + r.stderr
    assert "is being killed" not in r.stdout
    assert f"job {f.job_id} has run and is uploading its outputs" in r.stderr, r.stderr


def test_a_kill_too_late_is_not_recorded_for_a_redelivery_to_find(
        data, make_executor, monkeypatch):
    """kill() of a job in staging_outputs returns False (it completes), and flags nothing:
    it set the job's kill flag all the same, so when the node died during the upload the
    redelivery was killed before it could run again, and the job ended cancelled."""
    from kotta_executor.states import JobState
    from node.daemon import Node, NodeConfig
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    enclave = data.enclave
    alice = make_executor(1, credentials=data.alice, start_node=False)
    out = "s3://klab-results/alice/kept2.txt"
    a = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    a._start()
    b = None
    try:
        f = alice.submit(tasks.write_file, "kept2.txt", "kept\n", outputs=[out])
        _step_until_uploading(a, f)
        assert f.kill() is False  # "it completes"
        # node A dies while uploading: its message is visible again (the reaper would)
        enclave.queue.release(a.data.held())
        b = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
        b._start()
        wait_for(lambda: (b.step(), f.done())[1], what="the job to end")
        r = enclave.jobs.get(f.job_id)
        assert r.state == JobState.COMPLETED, (r.state, r.reason)
    finally:
        for n in (a, b):
            if n is not None:
                n.stopping = True
                n._drain()
                n._stop()


def test_the_staging_area_of_a_killed_node_is_removed_when_the_next_node_starts(
    start_node, data, make_executor
):
    """A node killed outright (SIGKILL, the OOM killer, the machine lost) never removes
    its staging area, which holds copies of the datasets it staged, protected ones too;
    a node's area is new at each start, so it stayed for good.  The next node to start
    removes the areas of dead nodes, and leaves a live node's alone."""
    import os as _os
    import signal

    from kotta_executor import config

    stage = config.kotta_home() / "stage"
    victim = start_node()
    alice = make_executor(1, credentials=data.alice, start_node=False)
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM
    cached = list((stage / victim.node_id / "cache" / "objects").iterdir())
    assert cached, "the input is in the victim's stage cache"
    alive = start_node()
    old = time.time() - 3600  # (an area is judged dead once its lock is this old and free)
    for node in (victim, alive):
        _os.utime(stage / node.node_id / ".lock", (old, old))
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(GUARD)
    assert (stage / victim.node_id).exists()  # nobody removed it: the node was killed
    start_node()
    assert not (stage / victim.node_id).exists(), "a dead node's staging area was left"
    assert (stage / alive.node_id / ".lock").exists(), "a live node's staging area went"


def test_a_positional_only_argument_named_inputs_is_not_given_the_staged_uris(data, make_executor):
    """``submit(fn, x, inputs=[URI])`` passes the URIs on to ``fn`` when it takes an
    ``inputs`` keyword.  One whose ``inputs`` is positional-only (``def f(inputs, /)``)
    takes no such keyword, but was given it all the same: the task staged its input, then
    failed on the node with "got some positional-only arguments passed as keyword
    arguments".  It is staged, and not passed, as for a function with no such argument."""
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.scaled_sum, [1, 2], inputs=[INPUT], scale=2)
    assert f.result(GUARD) == 2 * (3 + SUM)


def _message(enclave, job_id: str):
    """(holder, receive_count) of a job's task message (white-box: the embedded queue)."""
    rows = enclave._db.read("SELECT holder, receive_count FROM messages WHERE job_id=?",
                            (job_id,))
    return tuple(rows[0]) if rows else None


def test_a_staged_task_handed_back_by_a_stopping_node_is_pending_and_not_counted(
        start_node, data, make_executor, tmp_path):
    """A node stopped (SIGTERM) while a task it had staged waited for a worker handed the
    task back counted as a delivery, its job left in staging_inputs: after a few node
    restarts a task that never ran was dead-lettered, "delivered N times without
    completing" (here at once: --max-deliveries 1)."""
    import signal

    a = start_node("--max-deliveries", "1", "--prefetch", "1")  # (it stages one behind)
    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    try:
        wait_for(lambda: data.audit.show(job_id=f.job_id, action="stage-in"),
                 what="the task's inputs to be staged")
        assert f.status() == "staging_inputs"
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _message(data.enclave, f.job_id)[0] is None,
                 what="node A to hand back the staged task")
        assert _message(data.enclave, f.job_id) == (None, 0)  # its receive taken back
        assert f.status() == "pending"  # (cancellable again: no node holds it)
    finally:
        release.touch()
    blocker.result(GUARD)
    assert a.proc.wait(GUARD) == 0, a.output()
    start_node("--max-deliveries", "1")
    assert f.result(GUARD) == "ran"
    assert marker.exists()


@pytest.mark.parametrize("by", ["another client", "shutdown"])
def test_a_handed_back_task_cancelled_by_another_client_ends_its_future(
        start_node, data, make_executor, tmp_path, by):
    """A task whose future had been seen running (staged: ``staging_inputs``), handed back
    pending by its stopping node, then cancelled by someone else (``kotta cancel``, another
    client's ``attach(...).cancel()``) or by its executor's ``shutdown(cancel_futures=True)``:
    its future, running, cannot become cancelled, and the client dropped it as settled, so
    that its ``result()`` waited for ever.  It ends cancelled, as its job, and the task
    never runs."""
    import signal

    a = start_node("--prefetch", "1")  # (it stages one behind the running one)
    blocker, f, release, marker = _staged_behind_a_blocker(data, make_executor, tmp_path)
    try:
        wait_for(lambda: data.audit.show(job_id=f.job_id, action="stage-in"),
                 what="the task's inputs to be staged")
        assert f.status() == "staging_inputs"
        assert f.running()
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _message(data.enclave, f.job_id)[0] is None,
                 what="node A to hand back the staged task")
        if by == "shutdown":
            f._executor.shutdown(wait=False, cancel_futures=True)
        else:
            other = make_executor(1, credentials=data.alice, start_node=False)
            assert other.attach(f.job_id).cancel() is True  # pending: no node holds it
        wait_for(f.done, what="the cancelled task's future to end")
        assert f.cancelled()
        with pytest.raises(CancelledError):
            f.result(GUARD)
        assert f.status() == "cancelled"
    finally:
        release.touch()
    blocker.result(GUARD)
    assert a.proc.wait(GUARD) == 0, a.output()
    assert not marker.exists()


def stopped_while_staging(node, submit):
    """Step ``node`` (made with ``drain_timeout=0``) until it stages the inputs of the task
    ``submit()`` sends, then stop it, its drain over at once: the future."""
    node._start()
    try:
        f = submit()
        wait_for(lambda: (node.step(), node.data.active)[1], what="staging to start")
    finally:
        node._drain()  # (no time to finish: whatever the staging thread does, abandoned)
        node._stop()
        node.data.pool.shutdown(wait=True)  # (the abandoned thread: not left running)
    return f


def test_a_task_still_staging_at_the_drain_deadline_is_handed_back_pending(
        data, make_executor, monkeypatch):
    """The drain's deadline passed while a task's inputs were still being staged: its
    message was released counted, and its job stayed in staging_inputs."""
    from kotta_executor.states import JobState
    from node.daemon import Node, NodeConfig
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    enclave = data.enclave
    alice = make_executor(1, credentials=data.alice, start_node=False)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                    drain_timeout=0.0))
    f = stopped_while_staging(node, lambda: alice.submit(tasks.file_sum, inputs=[INPUT]))
    assert enclave.jobs.get(f.job_id).state == JobState.PENDING
    assert _message(enclave, f.job_id) == (None, 0)
    assert f.kill() is True  # a job no node holds: cancelled at once
    assert enclave.jobs.get(f.job_id).state == JobState.CANCELLED


def test_a_data_task_whose_result_is_read_at_the_drain_deadline_is_handed_back_to_run_again(
        data, make_executor, monkeypatch, tmp_path):
    """A task with outputs that returned just as the drain's deadline came (its result
    read once its worker was killed, there) began the upload of its outputs, which the stop
    then abandoned: its job stayed in staging_outputs, no node uploading (kill() refused it
    as completing, `kotta status` said so), until a node ran it again.  Now it is handed
    back as the tasks still running at the deadline are, to run again: processing, its
    message visible at once."""
    import select

    from kotta_executor.states import JobState
    from node.daemon import Node, NodeConfig
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    enclave = data.enclave
    out = "s3://klab-results/alice/late.txt"
    alice = make_executor(1, credentials=data.alice, start_node=False)
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05,
                                    drain_timeout=0.0))
    release = tmp_path / "release"
    node._start()
    try:
        f = alice.submit(tasks.write_file_when_released, "late.txt", "late\n", str(release),
                         outputs=[out])
        wait_for(lambda: (node.step(), any(w.ready and w.inflight for w in node.workers))[1],
                 what="the task to begin on a worker")
        [w] = [w for w in node.workers if w.inflight]
        release.touch()
        wait_for(lambda: select.select([w.results], [], [], 0)[0],
                 what="the worker to send the task's result")  # (unread: no step since)
    finally:
        node._drain()  # its deadline at once: the worker killed, its result read there
        node._stop()
        node.data.pool.shutdown(wait=True)  # (an abandoned upload: not left running)
    job = enclave.jobs.get(f.job_id)
    assert job.state == JobState.PROCESSING, job.state
    assert _message(enclave, f.job_id)[0] is None  # visible again, for the next node
    node = Node(enclave, NodeConfig(queue="test", workers=1, poll_interval=0.05))
    node._start()
    try:
        wait_for(lambda: (node.step(), f.done())[1], what="the task to run again")
    finally:
        node._drain()
        node._stop()
    assert Path(f.result()).name.startswith(f.job_id)
    assert get_object(enclave, out) == b"late\n"
