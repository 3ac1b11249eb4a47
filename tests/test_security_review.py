"""Holes found reviewing the security change against docs/security.md: each test shows one
closed, with real components (an embedded enclave, real node processes and workers); each
was a strict xfail until its hole was fixed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kotta_executor import errors, wire
from kotta_executor.backends.base import Message, NewJob
from kotta_executor.security import credentials
from kotta_executor.security.data import get_object
from kotta_executor.security.tokens import ACCESS_TTL, TokenService
from kotta_executor.states import JobState
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_staging import CORPUS, INPUT, NUMBERS, RESULTS, SUM  # noqa: F401
from tests.test_staging import data as data  # noqa: F401 - the fixture

NAME = "1m_shuffled.txt"


def _restrict(data, **rule) -> None:
    data.policies.add_dataset(CORPUS, by=data.admin.user, **rule)


# ------------------------------------------------------------ egress: the worker-death path


def test_a_task_that_kills_its_worker_cannot_print_restricted_data_out(
    data, make_executor, tmp_path
):
    _restrict(data, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.leak_and_die, NAME, str(tmp_path / "cwd"), inputs=[INPUT])
    try:
        f.result(GUARD)
    except errors.EgressDenied:
        pass
    except Exception as exc:  # noqa: BLE001 - what the client got
        assert "\n500\n" not in str(exc), "the restricted input is in the error"
    assert "\n500\n" not in (f.stdout or ""), "the restricted input reached the client"


def test_the_working_directory_of_a_task_whose_worker_died_is_removed(
    data, make_executor, tmp_path
):
    alice = make_executor(1, credentials=data.alice)
    marker = tmp_path / "cwd"
    f = alice.submit(tasks.leak_and_die, NAME, str(marker), inputs=[INPUT])
    with pytest.raises(errors.WorkerDied):
        f.result(GUARD)
    workdir = Path(marker.read_text())
    assert not workdir.exists(), f"{workdir} (with the staged input) is still on the node"


# ------------------------------------------------------------ egress: what is measured


@pytest.mark.parametrize("rule", [{"egress": "deny"}, {"egress_cap": 2000}], ids=["deny", "cap"])
def test_the_result_header_does_not_carry_restricted_data_out(data, make_executor, rule):
    _restrict(data, **rule)  # the input is 3893 bytes
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.leak_in_usage, NAME, inputs=[INPUT])
    try:
        f.result(GUARD)
    except errors.EgressDenied:
        pass
    job = alice.enclave.jobs.get(f.job_id)  # what `kotta status` reads for its owner
    for where, usage in (("the future", f.usage()), ("the job record", job.usage)):
        leaked = [k for k, v in (usage or {}).items() if "\n500\n" in str(v)]
        assert not leaked, f"{where} carries the data in usage[{leaked}]"


def test_a_held_result_is_not_readable_through_the_owners_client(data, make_executor):
    _restrict(data, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.EgressDenied) as info:
        f.result(GUARD)
    with pytest.raises((KeyError, ValueError, PermissionError)):  # not a key of the blobs
        alice.enclave.blobs.get(info.value.handle)
    with pytest.raises((KeyError, ValueError, PermissionError)):
        alice.enclave.blobs.get(info.value.handle.rsplit("/", 1)[-1])
    assert wire.outcomes(wire.decode(get_object(data.enclave, info.value.handle))) == [
        (True, SUM)
    ], "the result is kept, inside the enclave, for an admin's review"


# ------------------------------------------------------------ egress: data that stays around


def test_a_warm_worker_does_not_carry_restricted_data_into_a_later_task(data, make_executor):
    _restrict(data, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    with pytest.raises(errors.EgressDenied):
        alice.submit(tasks.carry, NAME, inputs=[INPUT]).result(GUARD)
    try:
        value = alice.submit(tasks.carry).result(GUARD)
    except errors.EgressDenied:
        value = None
    assert value != NUMBERS, "restricted data left the enclave through the next task"


def test_no_task_is_piped_to_a_worker_behind_one_with_restricted_data(data, make_executor):
    """In a burst of tiny tasks the node pipes many to a worker at once; none may follow a
    task that read restricted data into its worker, which serves nothing after it."""
    _restrict(data, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    alice.submit(tasks.carry).result(GUARD)  # a warm worker, with a tiny average: deep pipes
    before = [alice.submit(tasks.carry) for _ in range(300)]
    restricted = alice.submit(tasks.carry, NAME, inputs=[INPUT])
    after = [alice.submit(tasks.carry) for _ in range(300)]
    with pytest.raises(errors.EgressDenied):
        restricted.result(GUARD)
    leaked = [f.job_id for f in before + after if f.result(GUARD) == NUMBERS]
    assert leaked == [], "restricted data left the enclave through tasks piped behind it"


def test_restricted_data_cannot_be_laundered_through_an_output_dataset(data, make_executor):
    _restrict(data, egress_cap=2000)  # the input is 3893 bytes
    data.policies.grant("analyst", RESULTS, "read", by=data.admin.user)
    alice = make_executor(1, credentials=data.alice)
    with pytest.raises(errors.InvalidDataUri):  # same basename: refused at submit
        alice.submit(tasks.noop, inputs=[INPUT], outputs=["s3://klab-results/alice/" + NAME])
    copy = "s3://klab-results/alice/copy.txt"  # the task copies its input there
    try:
        alice.submit(tasks.copy_file, NAME, "copy.txt", inputs=[INPUT],
                     outputs=[copy]).result(GUARD)
    except (errors.EgressDenied, errors.StagingFailed, errors.DataAccessDenied):
        pass
    try:
        text = alice.submit(tasks.read_staged_and_env, "copy.txt", inputs=[copy]).result(GUARD)[0]
    except (errors.EgressDenied, errors.StagingFailed, errors.DataAccessDenied):
        text = None
    assert text != NUMBERS, "the whole capped input reached the client in two steps"


def test_a_deny_dataset_can_still_produce_outputs_inside_the_enclave(data, make_executor):
    _restrict(data, egress="deny")
    data.policies.add_dataset(RESULTS, by=data.admin.user, egress="deny")
    alice = make_executor(1, credentials=data.alice)
    out = "s3://klab-results/alice/summary.txt"
    f = alice.submit(tasks.write_file, "summary.txt", "derived\n", inputs=[INPUT],
                     outputs=[out])
    try:
        f.result(GUARD)
    except errors.EgressDenied:
        pass  # the value may stay in the enclave; the output file is not egress
    assert get_object(data.enclave, out) == b"derived\n"


# ------------------------------------------------------------ warm workers


def test_a_task_leaving_a_removed_cwd_does_not_fail_the_next_data_task(data, make_executor):
    alice = make_executor(1, credentials=data.alice)
    assert alice.submit(tasks.chdir_into_removed_dir).result(GUARD) == "left"
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM


# ------------------------------------------------------------ tokens


def test_an_expired_access_token_cannot_sign_a_backdated_task(
    start_node, make_executor, enclave, tmp_path
):
    ex = make_executor(1, start_node=False)
    creds = credentials.load(enclave)
    svc = TokenService(enclave)
    issued = time.time() - 2 * ACCESS_TTL  # kept from a token file; it expired an hour ago
    old = svc._access(svc.user(creds.user), creds.refresh_id, issued, issued + ACCESS_TTL)
    marker = tmp_path / "ran"
    header = wire.task_header(
        job_id=os.urandom(16).hex(), owner=old.user, client=ex.client_id, queue="test",
        walltime=60.0, created=old.issued + 60, fn=wire.fn_name(tasks.create_file), n=1,
    )
    body = old.sign(header, wire.dump_call(tasks.create_file, [((str(marker), "ran"), {})]))
    job_id = header["job_id"]
    enclave.jobs.create([NewJob(job_id, old.user, ex.client_id, "test", header["fn"], 60.0,
                                body)])
    start_node(workers=1)
    with pytest.raises(errors.TaskRejected, match="expired"):
        ex.attach(job_id).result(GUARD)
    assert not marker.exists()
    assert enclave.jobs.get(job_id).state == JobState.FAILED


def test_a_replayed_envelope_of_a_running_job_does_not_run_it_twice(
    start_node, make_executor, enclave, tmp_path
):
    ex = make_executor(1, start_node=False)
    runs, stop = tmp_path / "runs", tmp_path / "stop"
    f = ex.submit(tasks.append_line_then_wait, str(runs), "ran", str(stop))
    wait_for(lambda: enclave.queue.depth("test") == 1, what="the task message")
    [original] = enclave.queue.receive("test", 1, GUARD, "test-thief")
    enclave.queue.release([original])
    start_node(workers=2)
    wait_for(lambda: runs.exists(), what="the job to run")

    # a copy of the message (a queue reader's), put back while the job runs
    enclave.queue.send("test", [Message(f.job_id, original.body)])
    enclave.ring_nodes("test")
    wait_for(lambda: enclave.jobs.get(f.job_id).attempts >= 2
             or enclave.queue.depth("test") == 1, what="the node to take the copy")
    stop.touch()
    assert f.result(GUARD) == "ran"
    wait_for(lambda: enclave.queue.depth("test") == 0, what="the copy to be consumed")
    assert runs.read_text().splitlines() == ["ran"], "the replay ran the job a second time"


def test_a_task_cannot_poison_the_stage_cache_for_another_user(
    data, make_executor, user_token
):
    alice = make_executor(1, credentials=data.alice)
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM  # now cached
    assert alice.submit(tasks.poison_cache, "1\n", inputs=[INPUT]).result(GUARD) >= 1
    carol = make_executor(1, credentials=user_token("carol", role="analyst"), start_node=False)
    assert carol.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == SUM


# ---------------------------------------------------------------- from a second review (s9)

_SECRET = "SSN=078-05-1120;diagnosis=confidential"


def _steal(enclave, job_ids):
    """Receive (and so hold back) the messages of ``job_ids``: a queue reader's copy."""
    taken = {}

    def grab():
        for d in enclave.queue.receive("test", 10, GUARD, "test-thief"):
            taken[d.job_id] = d
        return set(job_ids) <= set(taken)

    wait_for(grab, what="the task messages")
    return taken


def test_a_stage_out_error_does_not_carry_where_a_task_pointed_a_symlink(
    enclave, user_token, make_executor
):
    """A task that read data which may not leave the enclave, and made its output a
    symlink whose target is that data: the error that reaches the client names the
    problem, not the target."""
    from kotta_executor.security.audit import AuditLog
    from kotta_executor.security.data import put_object
    from kotta_executor.security.policy import PolicyStore

    admin = credentials.load(enclave)
    policies = PolicyStore(enclave.records, AuditLog(enclave))
    policies.add_dataset("s3://patients/", by=admin.user, egress="deny")
    policies.add_dataset("s3://patients-derived/", by=admin.user, egress="deny")
    policies.grant("analyst", "s3://patients/", "read", by=admin.user)
    policies.grant("analyst", "s3://patients-derived/", "write", by=admin.user)
    put_object(enclave, "s3://patients/records.txt", _SECRET.encode())
    alice = make_executor(1, credentials=user_token("alice", role="analyst"))
    f = alice.submit(tasks.hide_input_in_a_symlink, inputs=["s3://patients/records.txt"],
                     outputs=["s3://patients-derived/out.txt"])
    with pytest.raises(errors.JobFailed, match="output out.txt is a symlink") as info:
        f.result(GUARD)
    seen = str(info.value) + str(enclave.jobs.get(f.job_id).reason)
    assert _SECRET not in seen, f"restricted data reached the client: {info.value!r}"


def _bobs_task_for(enclave, bob_file, job_id, fn, sections=None, **header_extra):
    bob = credentials.load(enclave, bob_file).access()
    header = wire.task_header(
        job_id=job_id, owner="bob", client="b" * 16, queue="test", walltime=60.0,
        created=time.time(), fn=wire.fn_name(fn), n=1,
    )
    header.update(header_extra)
    body = bob.sign(header, sections or wire.dump_call(fn, [((), {})]))
    enclave.queue.send("test", [Message(job_id, body)])


def _refused_as_foreign(enclave, job_id) -> bool:
    return any(d["job_id"] == job_id and "signed by bob does not run" in d["reason"]
               for d in enclave.queue.dead_letters("test"))


def test_another_users_task_for_my_job_neither_runs_nor_fails_it(
    enclave, user_token, make_executor, start_node
):
    """Bob, with a valid token of his own and the id of Alice's job, signs a task for it:
    it is dead-lettered and audited; Alice's own task runs, and her result is hers."""
    from kotta_executor.security.audit import AuditLog

    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    f = alice.submit(tasks.square, 3)
    held = _steal(enclave, [f.job_id])[f.job_id]  # Alice's message, delayed
    _bobs_task_for(enclave, user_token("bob"), f.job_id, tasks.constant_forged)
    enclave.ring_nodes("test")
    start_node(workers=1)
    wait_for(lambda: _refused_as_foreign(enclave, f.job_id), what="bob's task dead-lettered")
    assert enclave.jobs.get(f.job_id).state == JobState.PENDING  # not failed, not run
    enclave.queue.release([held])
    assert f.result(GUARD) == 9
    assert enclave.jobs.get(f.job_id).owner == "alice"
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=f.job_id)
    assert rec["user"] == "bob" and not rec["allowed"], rec


@pytest.mark.parametrize("bad", ["walltime", "inputs"])
def test_another_users_task_refused_for_its_own_faults_does_not_fail_my_job(
    enclave, user_token, make_executor, start_node, bad
):
    """Bob signs a task for Alice's pending job that the node refuses for a fault of the
    task itself: a walltime over the node's cap, or a dataset URI that steps out of its
    place.  Those refusals failed the job they named before anyone looked at whose it
    was: Bob could end Alice's job.  It is left as it is, and her own task runs."""
    from kotta_executor.security.audit import AuditLog

    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    f = alice.submit(tasks.square, 3)
    held = _steal(enclave, [f.job_id])[f.job_id]  # Alice's message, delayed
    extra = {"walltime": 1e9} if bad == "walltime" else {"inputs": ["s3://klab-jobs/../x"]}
    _bobs_task_for(enclave, user_token("bob"), f.job_id, tasks.constant_forged, **extra)
    enclave.ring_nodes("test")
    start_node(workers=1)
    wait_for(lambda: any(d["job_id"] == f.job_id for d in enclave.queue.dead_letters("test")),
             what="bob's task dead-lettered")
    assert enclave.jobs.get(f.job_id).state == JobState.PENDING  # not failed, not run
    wait_for(lambda: AuditLog(enclave).show(action="task-rejected", job_id=f.job_id),
             what="the refusal audited")
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=f.job_id)
    assert rec["user"] == "bob" and not rec["allowed"], rec
    enclave.queue.release([held])
    assert f.result(GUARD) == 9


def test_another_users_task_naming_me_its_owner_does_not_fail_my_job(
    enclave, user_token, make_executor, start_node
):
    """Bob signs, with his own valid token, a task that names Alice as its owner, for her
    pending job.  The node refuses it (its owner is not its signer), and that refusal
    failed her job: Bob's signature verified, so it is known to be his, and his refusal
    does not end her job.  It is dead-lettered and audited once; her own task runs."""
    from kotta_executor.security.audit import AuditLog

    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    f = alice.submit(tasks.square, 3)
    held = _steal(enclave, [f.job_id])[f.job_id]  # Alice's message, delayed
    _bobs_task_for(enclave, user_token("bob"), f.job_id, tasks.constant_forged, owner="alice")
    enclave.ring_nodes("test")
    start_node(workers=1)
    wait_for(lambda: AuditLog(enclave).show(action="task-rejected", job_id=f.job_id),
             what="bob's task refused and audited")
    [dead] = enclave.queue.dead_letters("test")
    assert "signed by 'bob'" in dead["reason"]
    assert enclave.jobs.get(f.job_id).state == JobState.PENDING  # not failed, not run
    [rec] = AuditLog(enclave).show(action="task-rejected", job_id=f.job_id)
    assert not rec["allowed"] and "signed by 'bob'" in rec["detail"], rec
    enclave.queue.release([held])
    assert f.result(GUARD) == 9


def test_another_users_task_over_the_walltime_cap_does_not_fail_my_running_job(
    enclave, user_token, make_executor, start_node, tmp_path
):
    """As above, for Alice's job while it runs."""
    out, stop = tmp_path / "runs.txt", tmp_path / "stop"
    start_node("--prefetch", "1", workers=1)  # (it takes the forged task while hers runs)
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    try:
        f = alice.submit(tasks.append_line_then_wait, str(out), "ran", str(stop))
        wait_for(out.exists, what="Alice's job to start")
        _bobs_task_for(enclave, user_token("bob"), f.job_id, tasks.constant_forged,
                       walltime=1e9)
        enclave.ring_nodes("test")
        wait_for(lambda: _refused_as_foreign(enclave, f.job_id)
                 or enclave.jobs.get(f.job_id).state.final, what="bob's task to be handled")
        job = enclave.jobs.get(f.job_id)
        assert job.state == JobState.PROCESSING, f"Alice's job is {job.state}: {job.reason}"
        stop.touch()
        assert f.result(GUARD) == "ran"
    finally:
        stop.touch()


def test_another_user_cannot_run_his_code_on_my_large_arguments(
    enclave, user_token, make_executor, start_node
):
    """Bob reuses the refs and digests of Alice's big arguments (a blob) in a task of his
    own for her job: it never runs, so his function never sees them."""
    secret = _SECRET.encode() * (enclave.inline_limit // len(_SECRET) + 10)  # a blob
    alice = make_executor(1, start_node=False, credentials=user_token("alice"))
    f = alice.submit(len, secret)
    held = _steal(enclave, [f.job_id])[f.job_id]
    refs = wire.peek_header(held.body)
    assert "args" in refs["refs"]
    fn_only = {"fn": wire.dump_call(tasks.first_arg, [((), {})])["fn"]}
    _bobs_task_for(
        enclave, user_token("bob"), f.job_id, tasks.first_arg, fn_only,
        refs={"args": refs["refs"]["args"]}, digests={"args": refs["digests"]["args"]},
    )
    enclave.ring_nodes("test")
    start_node(workers=1)
    wait_for(lambda: _refused_as_foreign(enclave, f.job_id), what="bob's task dead-lettered")
    enclave.queue.release([held])
    assert f.result(GUARD) == len(secret)  # not the secret, as Bob's function returns it
