"""Datasets end to end on the AWS backend (in-process moto): the issue's ``file_sum``
example with S3 data, STS AssumeRole into the owner's role, and the audit log in DynamoDB.

The node runs in a thread of this process (its workers are real processes), so that it
shares in-process moto with the test; nodes in other processes are covered by
tests/test_aws_backend.py's moto server tests.
"""

from __future__ import annotations

import fnmatch
import io
import json
import threading
import uuid

import pytest
from botocore.exceptions import ClientError

from kotta_executor import KottaExecutor, errors
from kotta_executor.aws_provision import bootstrap
from kotta_executor.backends.aws import AwsEnclave
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.data import get_object
from kotta_executor.security.policy import PolicyStore, role_policy
from node import datasteps
from node.daemon import Node, NodeConfig
from tests import aws_moto, tasks
from tests.conftest import GUARD, make_user, wait_for
from tests.test_aws_faults import lose_answer_once, throttle_once

NUMBERS = "\n".join(str(i) for i in range(1, 201)) + "\n"
DATA_BUCKET = "klab-jobs"
INPUT = f"s3://{DATA_BUCKET}/1m_shuffled.txt"
OUTPUT = f"s3://{DATA_BUCKET}/results/alice.txt"


@pytest.fixture
def aws(tmp_path):
    from moto import mock_aws

    name = f"t{uuid.uuid4().hex[:8]}"
    with aws_moto.fake_aws_env(), mock_aws(), aws_moto.atomic_moto():
        session = aws_moto.shared_session()
        bootstrap(name, iam=False, tls_only=False, session=session)
        enclave = AwsEnclave(name, session=session)
        admin = credentials.load(enclave)  # the bootstrapper holds the enclave key
        audit = AuditLog(enclave)
        policies = PolicyStore(enclave.records, audit)
        policies.add_dataset(f"s3://{DATA_BUCKET}/", by=admin.user)
        policies.grant("analyst", f"s3://{DATA_BUCKET}/", "read", by=admin.user)
        s3 = session.client("s3")
        s3.create_bucket(Bucket=DATA_BUCKET)
        s3.put_object(Bucket=DATA_BUCKET, Key="1m_shuffled.txt", Body=NUMBERS.encode())
        iam = session.client("iam")
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": "*"},
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
        }]}
        for role in ("analyst", "guest"):
            iam.create_role(RoleName=f"{enclave.names.user_role_prefix}{role}",
                            AssumeRolePolicyDocument=json.dumps(trust))
        doc = role_policy(policies.statements(role="analyst"))
        iam.put_role_policy(RoleName=f"{enclave.names.user_role_prefix}analyst",
                            PolicyName="datasets", PolicyDocument=json.dumps(doc))
        node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=0.5))
        runner = threading.Thread(target=node.run, name="node")
        runner.start()
        executors: list[KottaExecutor] = []

        def executor(user: str, role: str) -> KottaExecutor:
            token = make_user(enclave, user, tmp_path / "tokens", role=role)
            ex = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
            executors.append(ex)
            return ex

        executor.node = node  # (for the tests that tune it)
        try:
            yield enclave, audit, policies, admin, executor
        finally:
            for ex in executors:
                ex.shutdown(wait=True, cancel_futures=True)
            node.request_stop()
            runner.join(GUARD)
            enclave.close()


def test_file_sum_on_aws_runs_for_a_reader_and_is_denied_for_others(aws):
    enclave, audit, _, _, executor = aws
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    assert f.result(GUARD) == sum(range(1, 201))
    [rec] = audit.show(job_id=f.job_id, action="stage-in")
    assert (rec["user"], rec["dataset"]) == ("alice", INPUT)

    bob = executor("bob", "guest")
    g = bob.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.DataAccessDenied, match="guest"):
        g.result(GUARD)
    [denied] = audit.show(job_id=g.job_id, action="access-denied")
    assert (denied["user"], denied["dataset"], denied["allowed"]) == ("bob", INPUT, False)
    assert audit.verify().ok


def test_aws_task_gets_the_owners_assumed_role_not_the_nodes_keys(aws):
    enclave, _, _, _, executor = aws
    alice = executor("alice", "analyst")
    text, _, env = alice.with_options(inputs=[INPUT]).submit(
        tasks.read_staged_and_env, "1m_shuffled.txt", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
    ).result(GUARD)
    assert text == NUMBERS
    # the process's own (fake) keys are "testing"; the task holds an STS session's
    assert env["AWS_ACCESS_KEY_ID"] not in (None, "testing")
    assert env["AWS_SESSION_TOKEN"]


def _grant_analyst_results(enclave, policies, admin) -> None:
    """The analyst role may write results/ (the dataset added already): the grant, and
    the role's IAM policy made again from the grants."""
    policies.grant("analyst", f"s3://{DATA_BUCKET}/results/", "write", by=admin.user)
    enclave.session.client("iam").put_role_policy(
        RoleName=f"{enclave.names.user_role_prefix}analyst", PolicyName="datasets",
        PolicyDocument=json.dumps(role_policy(policies.statements(role="analyst"))),
    )


def _alice_writes_an_output(aws):
    """alice, an analyst granted write on results/, writes OUTPUT: her future, done."""
    enclave, _, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", "42\n", outputs=[OUTPUT])
    f.result(GUARD)
    return f


def test_aws_outputs_are_written_with_the_owners_credentials(aws):
    enclave, audit, *_ = aws
    f = _alice_writes_an_output(aws)
    assert get_object(enclave, OUTPUT) == b"42\n"
    [rec] = audit.show(job_id=f.job_id, action="stage-out")
    assert rec["user"] == "alice"


def test_aws_a_job_with_outputs_finishes_after_its_outputs_are_written(aws):
    """The job's finishing time (its record's, and its history's last event) comes after
    its stage-out began, not from when its worker's result was read."""
    enclave = aws[0]
    f = _alice_writes_an_output(aws)
    history = enclave.jobs.history(f.job_id)
    states = [s for _, s, _ in history]
    assert states[-2:] == ["staging_outputs", "completed"], history
    times = [t for t, _, _ in history]
    assert times == sorted(times), history
    job = enclave.jobs.get(f.job_id)
    assert job.finished == times[-1] and job.finished >= times[-2], (job, history)


def _node_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "node")


def _node_and_alice(enclave, request) -> tuple[threading.Thread, KottaExecutor]:
    """The node's thread (the fixture's), and an executor of the analyst alice, using it:
    for a test that sees whether a fault ends the job or the node."""
    token = make_user(enclave, "alice", request.getfixturevalue("tmp_path") / "tokens",
                      role="analyst")
    return _node_thread(), KottaExecutor(1, enclave=enclave, start_node=False,
                                         credentials=token)


def _to_staging_outputs(body: bytes) -> bool:
    """A transition's UpdateItem to staging_outputs (not a claim, which may come from it)."""
    values = json.loads(body or b"{}").get("ExpressionAttributeValues", {})
    return values.get(":new") == {"S": "staging_outputs"}


@pytest.mark.parametrize("fault", ["throttled", "applied, answer lost"])
def test_aws_a_failed_move_to_staging_outputs_is_retried_not_the_end_of_the_node(aws, tmp_path,
                                                                               fault):
    """The move of a finished task's job to staging_outputs (UpdateItem) failed past
    botocore's retries: the node died, the job stayed processing, and the task ran again
    after the visibility timeout.  It is made again later; the outputs are written, the
    job completes, once."""
    enclave, audit, policies, admin, _ = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)
    inject = throttle_once if fault == "throttled" else lose_answer_once
    fired = inject(enclave.dynamodb, "UpdateItem", _to_staging_outputs)
    runner = _node_thread()
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        f = alice.submit(tasks.write_file, "alice.txt", "42\n", outputs=[OUTPUT])
        wait_for(fired.is_set, what="the move to staging_outputs to fail")
        wait_for(lambda: f.done() or not runner.is_alive(), what="the job or the node to end")
        assert runner.is_alive(), "a transient fault killed the node"
        f.result(GUARD)
        assert get_object(enclave, OUTPUT) == b"42\n"
        states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
        assert states.count("processing") == 1 and states[-1] == "completed", states  # once
        assert states.count("completed") == 1, states
        assert len(audit.show(job_id=f.job_id, action="stage-out")) == 1
        assert alice.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=runner.is_alive(), cancel_futures=True)


@pytest.mark.parametrize("call", ["audit record", "audit record, answer lost", "held result"])
def test_aws_a_failed_egress_hold_is_retried_not_the_end_of_the_node(aws, tmp_path, call):
    """A task that read data which may not leave the enclave: its result is held (S3
    PutObject) and the hold audited (PutItem).  A fault past botocore's retries in either
    ended the node.  The hold is made again later: the future raises EgressDenied, the
    outputs are written, the job ran once."""
    enclave, audit, policies, admin, _ = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/", by=admin.user, egress="deny")
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user, egress="deny")
    _grant_analyst_results(enclave, policies, admin)
    if call.startswith("audit record"):  # (a lost answer: the record is written once)
        inject = throttle_once if call == "audit record" else lose_answer_once
        fired = inject(enclave.dynamodb, "PutItem", lambda body: b"egress-denied" in body)
    else:
        fired = throttle_once(enclave.s3, "PutObject")
    runner = _node_thread()
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        f = alice.submit(tasks.write_file, "alice.txt", "42\n", inputs=[INPUT], outputs=[OUTPUT])
        wait_for(fired.is_set, what=f"the hold's {call} to fail")
        wait_for(lambda: f.done() or not runner.is_alive(), what="the job or the node to end")
        assert runner.is_alive(), "a transient fault killed the node"
        with pytest.raises(errors.EgressDenied):
            f.result(GUARD)
        assert get_object(enclave, OUTPUT) == b"42\n"
        states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
        assert states.count("processing") == 1 and states[-1] == "failed", states
        assert len(audit.show(job_id=f.job_id, action="egress-denied")) == 1
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=runner.is_alive(), cancel_futures=True)


@pytest.mark.parametrize("call", ["audit record", "held result"])
def test_aws_an_egress_hold_refused_for_good_fails_the_job_not_the_node(aws, request, call):
    """The hold of a result that may not leave the enclave (S3 PutObject), or its
    egress-denied record (PutItem), refused for good (AccessDenied): the node died, the
    job stayed processing, to run again on another node and end it too.  The job fails
    with StagingFailed naming the refusal; nothing of its result leaves; the node serves
    on."""
    enclave, audit, policies, admin, _ = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/", by=admin.user, egress="deny")
    if call == "audit record":
        fail_calls(enclave.dynamodb.meta.events, "dynamodb.PutItem", None,
                   lambda p: b"egress-denied" in (p.get("body") or b""),
                   "AccessDeniedException", request=request)
    else:
        fail_calls(enclave.s3.meta.events, "s3.PutObject", None, code="AccessDenied",
                   request=request)
    runner, alice = _node_and_alice(enclave, request)
    try:
        f = alice.submit(tasks.file_sum, inputs=[INPUT])
        wait_for(lambda: f.done() or not runner.is_alive(), what="the job or the node to end")
        assert runner.is_alive(), "a refused hold killed the node"
        with pytest.raises(errors.StagingFailed, match="AccessDenied") as info:
            f.result(GUARD)
        assert "egress" in str(info.value) and "20100" not in str(info.value)
        states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
        assert states.count("processing") == 1 and states[-1] == "failed", states
        assert alice.submit(tasks.square, 3).result(GUARD) == 9
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=runner.is_alive(), cancel_futures=True)


def test_aws_an_output_is_never_in_its_dataset_without_its_audit_record(aws, request,
                                                                        monkeypatch):
    """The stage-out record (PutItem) was written after the output's upload: when it
    failed past botocore's retries, the job failed with StagingFailed, but the output,
    written from data the task read, was in its dataset with no record of it.  The record
    comes first: it failing (for good), nothing is written."""
    monkeypatch.setattr(datasteps, "STAGING_PATIENCE", 1.0)
    enclave, audit, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)
    failed = fail_calls(enclave.dynamodb.meta.events, "dynamodb.PutItem", None,
                        lambda p: b"stage-out" in (p.get("body") or b""), request=request)
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", "42\n", inputs=[INPUT], outputs=[OUTPUT])
    with pytest.raises(errors.StagingFailed, match="ThrottlingException"):
        f.result(GUARD)
    assert failed
    assert audit.show(job_id=f.job_id, action="stage-out") == []
    with pytest.raises(FileNotFoundError):
        get_object(enclave, OUTPUT)


def fail_calls(events, operation: str, times: int | None, when=lambda params: True,
               code: str = "ThrottlingException", *, request):
    """The next ``times`` (None: every) ``operation`` calls whose request ``when`` accepts
    fail with ``code``, as calls do once botocore stops retrying, until the test ends.
    ``events``: an event system (``register``, ``unregister``).  Returns a list that
    counts the failures."""
    failed: list[int] = []
    lock = threading.Lock()

    def handler(params=None, **_):
        with lock:
            if (times is not None and len(failed) >= times) or not when(params or {}):
                return None
            failed.append(1)
        raise ClientError({"Error": {"Code": code, "Message": "Rate exceeded"}}, operation)

    events.register(f"before-call.{operation}", handler)
    request.addfinalizer(lambda: events.unregister(f"before-call.{operation}", handler))
    return failed


class _NewSessions:
    """The events of the clients of boto3 sessions made from now on (the staging stores':
    S3Objects makes one from the owner's credentials), through botocore's own list of the
    handlers each new session starts with (as moto hooks in)."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def register(self, event: str, handler) -> None:
        import botocore.handlers

        self.monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS",
                                 [*botocore.handlers.BUILTIN_HANDLERS, (event, handler)])

    def unregister(self, event: str, handler) -> None:
        pass  # (monkeypatch restores the list)


def _data_path(params: dict) -> bool:
    return DATA_BUCKET in str(params.get("url_path", "")) or DATA_BUCKET in str(
        params.get("url", ""))


def _fault_at(step: str, enclave, request, times: int | None) -> list[int]:
    """A fault in one of the calls the node's staging threads make for a job that reads
    INPUT and writes OUTPUT."""
    ddb = enclave.dynamodb.meta.events
    new_sessions = _NewSessions(request.getfixturevalue("monkeypatch"))
    kw = {"request": request}
    if step == "AssumeRole":  # (a new STS client each time, from the enclave's session)
        return fail_calls(enclave.session.events, "sts.AssumeRole", times, **kw)
    if step == "dataset records":
        return fail_calls(ddb, "dynamodb.Query", times,
                          lambda p: b'"dataset"' in (p.get("body") or b""), **kw)
    if step == "GetObject":
        return fail_calls(new_sessions, "s3.GetObject", times, _data_path, "SlowDown", **kw)
    if step == "PutObject":
        return fail_calls(new_sessions, "s3.PutObject", times, _data_path, "InternalError", **kw)
    action = step.split()[0]  # "stage-in record", "stage-out record"
    return fail_calls(ddb, "dynamodb.PutItem", times,
                      lambda p: action.encode() in (p.get("body") or b""),
                      "ProvisionedThroughputExceededException", **kw)


def _grant_results(aws) -> None:
    enclave, _, policies, admin, _ = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)


STAGING_STEPS = ["AssumeRole", "dataset records", "GetObject", "PutObject",
                 "stage-in record", "stage-out record"]


@pytest.mark.parametrize("step", STAGING_STEPS)
def test_aws_a_passing_fault_while_staging_is_tried_again(aws, request, step):
    """A throttle or a 5xx past botocore's retries in a staging thread (the owner's role
    assumed, the dataset records read, the input read, the output written, either audit
    record) failed the job with StagingFailed, though the task could have run.  The call is
    tried again, with a backoff: the job completes, ran once, each access audited once."""
    enclave, audit, *_ = aws
    _grant_results(aws)
    failed = _fault_at(step, enclave, request, times=2)
    alice = aws[4]("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", "42\n", inputs=[INPUT], outputs=[OUTPUT])
    f.result(GUARD)
    assert len(failed) == 2, f"the fault at {step} never struck"
    assert get_object(enclave, OUTPUT) == b"42\n"
    states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
    assert states.count("processing") == 1 and states[-1] == "completed", states
    assert [r["dataset"] for r in audit.show(job_id=f.job_id, action="stage-in")] == [INPUT]
    assert [r["dataset"] for r in audit.show(job_id=f.job_id, action="stage-out")] == [OUTPUT]
    assert audit.verify().ok


@pytest.mark.parametrize("step", STAGING_STEPS)
def test_aws_a_lasting_fault_while_staging_fails_the_job_naming_it(aws, request, monkeypatch,
                                                                 step):
    """A fault that does not pass fails the job with StagingFailed naming the step and
    AWS's error, once the staging patience is spent; an output is never left in its
    dataset without its audit record (its stage-out record failing kept it unwritten)."""
    monkeypatch.setattr(datasteps, "STAGING_PATIENCE", 1.0, raising=False)
    enclave, audit, *_ = aws
    _grant_results(aws)
    failed = _fault_at(step, enclave, request, times=None)
    alice = aws[4]("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", "42\n", inputs=[INPUT], outputs=[OUTPUT])
    with pytest.raises(errors.StagingFailed) as info:
        f.result(GUARD)
    assert len(failed) >= 2, f"{step}: not tried again"
    said, code = {
        "AssumeRole": ("getting alice's data credentials", "ThrottlingException"),
        "dataset records": ("reading the policies", "ThrottlingException"),  # (and standing)
        "GetObject": (f"reading {INPUT}", "SlowDown"),
        "PutObject": (f"writing {OUTPUT}", "InternalError"),
        "stage-in record": (f"the audit record of reading {INPUT}",
                            "ProvisionedThroughputExceededException"),
        "stage-out record": (f"the audit record of writing {OUTPUT}",
                             "ProvisionedThroughputExceededException"),
    }[step]
    assert said in str(info.value) and code in str(info.value), info.value
    written = audit.show(job_id=f.job_id, action="stage-out")
    try:
        get_object(enclave, OUTPUT)
    except FileNotFoundError:
        pass
    else:
        assert [r["dataset"] for r in written] == [OUTPUT], "an output written unaudited"
    assert _node_thread().is_alive()


@pytest.mark.parametrize("step", ["dataset records", "AssumeRole"])
def test_aws_a_passing_fault_when_a_staged_task_is_about_to_run_is_tried_again(
        aws, request, tmp_path, step):
    """When a worker takes a staged task, its data access is checked again (the policies
    read) and, after a long wait, its credentials issued anew (AssumeRole), in the node's
    own loop.  A throttle there, past botocore's retries, ended the node, and every task it
    ran (the policies), or failed the job (the credentials).  The task waits for a later
    step: it runs, once."""
    enclave, audit, *_ = aws
    node = next(t for t in threading.enumerate() if t.name == "node")
    from_the_node = threading.current_thread
    if step == "AssumeRole":
        aws[4].node.data.reissue_after = 0.0  # (every staged task: its credentials anew)
        failed = fail_calls(enclave.session.events, "sts.AssumeRole", 2,
                            lambda p: from_the_node() is node, request=request)
    else:
        failed = fail_calls(enclave.dynamodb.meta.events, "dynamodb.Query", 2,
                            lambda p: from_the_node() is node and b'"policy"' in (
                                p.get("body") or b""), request=request)
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        f = alice.submit(tasks.file_sum, inputs=[INPUT])
        wait_for(lambda: f.done() or not node.is_alive(), what="the job or the node to end")
        assert node.is_alive(), "a transient fault killed the node"
        assert f.result(GUARD) == sum(range(1, 201))
        assert len(failed) == 2
        states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
        assert states.count("processing") == 1 and states[-1] == "completed", states
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=node.is_alive(), cancel_futures=True)


def test_aws_a_lasting_fault_when_a_staged_task_is_about_to_run_fails_it_not_the_node(
        aws, request, tmp_path):
    """The same fault, lasting (the node may not read the policies): the job fails with
    StagingFailed, never having run, and the node lives on (it ended, with every task it
    ran)."""
    enclave, *_ = aws
    node = next(t for t in threading.enumerate() if t.name == "node")
    fail_calls(enclave.dynamodb.meta.events, "dynamodb.Query", None,
               lambda p: threading.current_thread() is node and b'"policy"' in (
                   p.get("body") or b""), "AccessDeniedException", request=request)
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        f = alice.submit(tasks.create_file_and_sum, str(tmp_path / "ran"), inputs=[INPUT])
        wait_for(lambda: f.done() or not node.is_alive(), what="the job or the node to end")
        assert node.is_alive(), "a lasting fault in one task's check killed the node"
        with pytest.raises(errors.StagingFailed, match="AccessDeniedException"):
            f.result(GUARD)
        assert not (tmp_path / "ran").exists()
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=node.is_alive(), cancel_futures=True)


def test_aws_a_passing_fault_in_an_audit_checkpoint_leaves_no_checkpoint_missing(
        aws, request, tmp_path):
    """Every 64th audit record is followed by its checkpoint (a second PutItem).  When that
    failed past botocore's retries, the record was written but the append raised: the
    stage-in was tried again and audited twice, and the checkpoint was never written, so
    `kotta audit verify` reported it missing for good, as it does a deleted one.  The
    checkpoint is written again; the record is not."""
    from kotta_executor.security.audit import CHECKPOINT_EVERY, CHECKPOINT_KIND, record_key

    enclave, audit, *_ = aws
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        while audit.append("dataset-add", user="admin")["seq"] % CHECKPOINT_EVERY != 63:
            pass
        failed = fail_calls(enclave.dynamodb.meta.events, "dynamodb.PutItem", 1,
                            lambda p: CHECKPOINT_KIND.encode() in (p.get("body") or b""),
                            request=request)
        f = alice.submit(tasks.file_sum, inputs=[INPUT])
        assert f.result(GUARD) == sum(range(1, 201))
        assert failed
        [rec] = audit.show(job_id=f.job_id, action="stage-in")
        assert rec["seq"] % CHECKPOINT_EVERY == 0
        assert enclave.records.get(CHECKPOINT_KIND, record_key(rec["seq"])) is not None
    finally:
        alice.shutdown(wait=True, cancel_futures=True)


def test_aws_a_stage_in_record_whose_answer_was_lost_is_written_once(aws):
    """The stage-in record's PutItem was applied, but its answer lost past botocore's
    retries (a read timeout): the staging thread tried the append again, which stamped a
    new time (so a new hash) and, finding its record number taken by "another" record,
    appended a second stage-in record for the one read.  The retry finds its first try."""
    enclave, audit, *_ , executor = aws
    fired = lose_answer_once(enclave.dynamodb, "PutItem", lambda body: b"stage-in" in body)
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    assert f.result(GUARD) == sum(range(1, 201))
    assert fired.is_set()
    [rec] = audit.show(job_id=f.job_id, action="stage-in")
    assert (rec["user"], rec["dataset"]) == ("alice", INPUT)
    assert audit.verify().ok


def test_aws_a_task_still_staging_when_its_node_stops_is_pending_again(aws, monkeypatch):
    """A node stopped (its drain's deadline passed) while it staged a task's inputs: the
    job stayed in staging_inputs, though the task was handed back and never ran."""
    from kotta_executor.states import JobState
    from tests.conftest import ROOT
    from tests.test_staging import stopped_while_staging

    enclave, _, _, _, executor = aws
    executor.node.request_stop()  # (the fixture's node: this test steps its own)
    wait_for(lambda: not any(n.node_id == executor.node.node_id
                             for n in enclave.nodes.live()), what="the fixture's node to stop")
    monkeypatch.chdir(ROOT)
    alice = executor("alice", "analyst")
    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=0.1, drain_timeout=0.0))
    f = stopped_while_staging(node, lambda: alice.submit(tasks.file_sum, inputs=[INPUT]))
    assert enclave.jobs.get(f.job_id).state == JobState.PENDING
    assert f.kill() is True  # a job no node holds: cancelled at once


def test_aws_a_node_takes_the_next_task_while_one_uploads_its_outputs(aws, request,
                                                                      monkeypatch):
    """A task uploading its outputs has run: it holds no worker.  Counted among the tasks
    the node holds for its workers (Node._room), it kept a node of long tasks (one held a
    worker) from taking any other for as long as the upload lasted, its worker idle."""
    from node import pool

    # every worker a worker of long tasks, whatever the test's tasks take
    monkeypatch.setattr(pool, "TINY_TASK", 0.0)
    monkeypatch.setattr(pool, "SHORT_TASK", 0.0)
    enclave = aws[0]
    _grant_results(aws)
    uploading, go = threading.Event(), threading.Event()

    def hold(params=None, **_):  # the stage-out's audit record, just before the upload
        if b"stage-out" in ((params or {}).get("body") or b""):
            uploading.set()
            go.wait(GUARD)

    events = enclave.dynamodb.meta.events
    events.register("before-call.dynamodb.PutItem", hold)
    request.addfinalizer(lambda: events.unregister("before-call.dynamodb.PutItem", hold))
    alice = aws[4]("alice", "analyst")
    try:
        f = alice.submit(tasks.write_file, "alice.txt", "42\n", outputs=[OUTPUT])
        wait_for(uploading.is_set, what="its outputs' upload to begin")
        g = alice.submit(tasks.square, 3)
        wait_for(g.done, what="the next task to run while the upload lasts")
        assert g.result() == 9
    finally:
        go.set()
    f.result(GUARD)
    assert get_object(enclave, OUTPUT) == b"42\n"


@pytest.mark.parametrize("operation", ["s3.HeadObject", "s3.GetObject"])
def test_aws_an_input_s3_refuses_at_stage_in_is_audited(aws, request, operation):
    """The policy grants the read, but S3 refuses it (the owner's IAM role not brought up
    to date with the grant, a bucket policy): the job failed with DataAccessDenied, nothing
    ran, and no `access-denied` record said so (a refusal at stage-out had one)."""
    enclave, audit, *_ = aws
    refused = fail_calls(_NewSessions(request.getfixturevalue("monkeypatch")), operation,
                         None, _data_path, "AccessDenied", request=request)
    alice = aws[4]("alice", "analyst")
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.DataAccessDenied, match="nothing ran"):
        f.result(GUARD)
    assert refused
    [denied] = audit.show(job_id=f.job_id, action="access-denied")
    assert (denied["user"], denied["allowed"]) == ("alice", False)
    assert audit.show(dataset=INPUT, job_id=f.job_id, action="access-denied") == [denied]
    assert audit.verify().ok


def test_aws_an_s3_refusal_whose_audit_record_is_refused_fails_the_job_not_the_node(
        aws, request):
    """S3 refused a granted input at stage-in, and the audit table refused its
    `access-denied` record (AccessDeniedException): the node's loop raised, and the node
    died, the job left staging_inputs.  The job fails with DataAccessDenied, its reason
    saying the record could not be written; the node serves on."""
    enclave, audit, *_ = aws
    fail_calls(_NewSessions(request.getfixturevalue("monkeypatch")), "s3.GetObject",
               None, _data_path, "AccessDenied", request=request)
    fail_calls(enclave.dynamodb.meta.events, "dynamodb.PutItem", None,
               lambda p: b"access-denied" in (p.get("body") or b""),
               "AccessDeniedException", request=request)
    runner, alice = _node_and_alice(enclave, request)
    try:
        f = alice.submit(tasks.file_sum, inputs=[INPUT])
        wait_for(lambda: f.done() or not runner.is_alive(), what="the job or the node to end")
        assert runner.is_alive(), "a refused audit record killed the node"
        with pytest.raises(errors.DataAccessDenied, match="nothing ran") as info:
            f.result(GUARD)
        assert "audit record" in str(info.value) and "AccessDeniedException" in str(info.value)
        assert alice.submit(tasks.square, 3).result(GUARD) == 9
    finally:  # (not waiting for a task that a dead node would never end)
        alice.shutdown(wait=runner.is_alive(), cancel_futures=True)


def test_aws_an_archived_input_fails_its_job_at_once_saying_so(aws, request, monkeypatch):
    """An input in an archive storage class (GLACIER) cannot be read until it is restored:
    S3 refuses the read with InvalidObjectState.  The node took it for a passing fault,
    tried again for its whole staging patience (a minute), then failed the job with
    `StagingFailed: reading ... failed (for 60.0 s): ClientError: ... InvalidObjectState`.
    It fails at once, saying the object is archived."""
    monkeypatch.setattr(datasteps, "STAGING_PATIENCE", 3.0, raising=False)
    enclave, audit, *_ = aws
    enclave.session.client("s3").put_object(
        Bucket=DATA_BUCKET, Key="archived.txt", Body=b"1\n", StorageClass="GLACIER")
    reads: list[int] = []
    fail_calls(_NewSessions(monkeypatch), "s3.GetObject", None,
               lambda p: _data_path(p) and reads.append(1) and False, request=request)
    alice = aws[4]("alice", "analyst")
    f = alice.submit(tasks.file_sum, inputs=[f"s3://{DATA_BUCKET}/archived.txt"])
    with pytest.raises(errors.StagingFailed, match="archived") as info:
        f.result(GUARD)
    assert "restore" in str(info.value) and "(for " not in str(info.value), info.value
    assert len(reads) == 1, "an archived object was read again and again"
    assert audit.show(job_id=f.job_id, action="stage-in") == []


def test_aws_a_task_declaring_more_objects_than_a_session_policy_holds_says_what_to_do(aws):
    """Some 25 inputs make a session policy over STS's 2,048 characters: the job failed
    with StagingFailed telling the user to "declare a dataset prefix instead of many
    objects", which submit refuses (a prefix is not staged).  It says to declare fewer."""
    alice = aws[4]("alice", "analyst")
    inputs = [f"s3://{DATA_BUCKET}/corpus/part-{n:04d}.txt" for n in range(40)]
    f = alice.submit(tasks.file_sum, inputs=inputs)
    with pytest.raises(errors.StagingFailed, match="STS limit") as info:
        f.result(GUARD)
    assert "declare a dataset prefix" not in str(info.value), info.value
    assert "declare fewer" in str(info.value) and "40 read(s)" in str(info.value)


def test_aws_the_enclaves_own_storage_is_never_a_dataset(aws):
    """The enclave's bucket holds its key (whoever reads it administers the enclave), every
    task's arguments and results, and held results: registered as a dataset (the whole
    bucket, say) with a read grant, a task could stage the key as its input."""
    from kotta_executor.security.data import enclave_areas

    enclave, *_ = aws
    policies = PolicyStore(enclave.records, reserved=enclave_areas(enclave))
    bucket = enclave.names.bucket
    for uri in (f"s3://{bucket}/", f"s3://{bucket}/keys/enclave.key", f"s3://{bucket}/held/",
                f"s3://{bucket}/{enclave.names.blob_prefix}"):
        with pytest.raises(errors.ConfigurationError, match="enclave's own storage"):
            policies.add_dataset(uri, by="root")
    policies.add_dataset(f"s3://{bucket}/datasets/", by="root")  # the rest of it may be
    decision = policies.check("analyst", "read", f"s3://{bucket}/keys/enclave.key")
    assert not decision.allowed and "enclave's own storage" in decision.reason


def test_aws_an_output_to_a_bucket_that_does_not_exist_says_so(aws):
    """A dataset registered in a bucket not (or no longer) there: writing an output to it
    failed with `StagingFailed: ... no object s3://.../out.txt in the enclave`, as if the
    task had asked to read it.  It names the bucket missing."""
    enclave, _, policies, admin, executor = aws
    gone = "s3://klab-gone/"
    policies.add_dataset(gone, by=admin.user)
    policies.grant("analyst", gone, "write", by=admin.user)
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_file, "out.txt", "42\n", outputs=[gone + "out.txt"])
    with pytest.raises(errors.StagingFailed) as info:
        f.result(GUARD)
    assert "no bucket klab-gone" in str(info.value), info.value
    assert "no object" not in str(info.value), info.value


def test_aws_a_task_with_more_outputs_than_a_session_policy_holds_fails_before_it_runs(aws):
    """The outputs' session policy is made at stage-out: a task declaring more outputs than
    one holds (some 45) ran to its end, hours maybe, then failed with StagingFailed, its
    work lost.  It fails before it runs, saying why."""
    enclave, _, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)
    names = [f"part-{n:04d}.txt" for n in range(60)]
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_files, names,
                     outputs=[f"s3://{DATA_BUCKET}/results/{n}" for n in names])
    with pytest.raises(errors.StagingFailed, match="STS limit") as info:
        f.result(GUARD)
    assert "60 write(s)" in str(info.value), info.value
    states = [s for _, s, _ in enclave.jobs.history(f.job_id)]
    assert "processing" not in states, f"it ran, its outputs never to be written: {states}"


def test_aws_an_output_over_the_multipart_threshold_is_uploaded_in_parts_whole(aws, monkeypatch):
    """An output was written with one PutObject, which S3 refuses above 5 GB: a task's
    big output failed to stage out, its work lost.  One at least MULTIPART_THRESHOLD
    goes in parts (boto3's managed transfer), as the owner, audited, and arrives whole."""
    from kotta_executor.security import data

    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", 1 << 20)
    enclave, audit, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    _grant_analyst_results(enclave, policies, admin)
    text = "".join(f"{i:08d}\n" for i in range(700_000))  # 6.3 MB: two parts of 5 MiB min
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", text, outputs=[OUTPUT])
    f.result(GUARD)
    assert get_object(enclave, OUTPUT) == text.encode()
    head = enclave.s3.head_object(Bucket=DATA_BUCKET, Key="results/alice.txt")
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # (a multipart object's)
    [rec] = audit.show(job_id=f.job_id, action="stage-out")
    assert rec["user"] == "alice"


def test_aws_an_input_written_in_parts_is_staged_in_whole(aws, monkeypatch):
    """A big input (an object written in parts) is read into the working directory whole."""
    from kotta_executor.security import data

    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", 1 << 20)
    enclave, _, _, _, executor = aws
    numbers = [i * 7 % 1_000_003 for i in range(800_000)]
    body = "".join(f"{n}\n" for n in numbers).encode()
    big = f"s3://{DATA_BUCKET}/big.txt"
    data.put_object(enclave, big, io.BytesIO(body))  # (kotta dataset put's way)
    head = enclave.s3.head_object(Bucket=DATA_BUCKET, Key="big.txt")
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]
    alice = executor("alice", "analyst")
    assert alice.submit(tasks.file_sum, inputs=[big]).result(GUARD) == sum(numbers)


def test_aws_a_user_of_a_one_character_name_stages_data(aws):
    """A user name may be one character (`kotta user add a`), and STS's SourceIdentity
    (the user, in CloudTrail) takes two at least: every task of hers that declared data
    failed at AssumeRole with botocore's ParamValidationError."""
    enclave, audit, _, _, executor = aws
    a = executor("a", "analyst")
    f = a.submit(tasks.file_sum, inputs=[INPUT])
    assert f.result(GUARD) == sum(range(1, 201))
    [rec] = audit.show(job_id=f.job_id, action="stage-in")
    assert (rec["user"], rec["dataset"]) == ("a", INPUT)


def test_aws_a_request_botocore_refuses_fails_the_job_at_once_naming_it(aws, request,
                                                                      monkeypatch):
    """A request botocore refuses before sending it (ParamValidationError: a parameter S3
    does not take) can never go through: the node took it for a passing fault and tried
    it again for its whole staging patience (a minute) before the job failed.  It fails at
    once, naming the error, and the node goes on."""
    monkeypatch.setattr(datasteps, "STAGING_PATIENCE", 10.0, raising=False)
    tries: list[int] = []

    def bad_parameter(params=None, **_):  # (botocore's own validation then refuses it)
        if DATA_BUCKET in str((params or {}).get("Bucket", "")):
            tries.append(1)
            params["NoSuchParameter"] = "x"

    _NewSessions(monkeypatch).register("provide-client-params.s3.GetObject", bad_parameter)
    alice = aws[4]("alice", "analyst")
    f = alice.submit(tasks.file_sum, inputs=[INPUT])
    with pytest.raises(errors.StagingFailed, match="ParamValidationError") as info:
        f.result(GUARD)
    assert "NoSuchParameter" in str(info.value) and "(for " not in str(info.value), info.value
    assert len(tries) == 1, "a request botocore refuses was sent again and again"
    assert _node_thread().is_alive()
    monkeypatch.undo()
    assert alice.submit(tasks.file_sum, inputs=[INPUT]).result(GUARD) == sum(range(1, 201))


#: the IAM action each S3 operation of a held result's upload needs
_S3_ACTION = {"PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
              "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
              "AbortMultipartUpload": "s3:AbortMultipartUpload"}


def test_aws_a_held_result_upload_in_parts_that_fails_is_aborted_within_the_node_role(
        aws, monkeypatch):
    """A held result of MULTIPART_THRESHOLD or more goes up in parts; a part that fails
    makes the transfer abort the upload (AbortMultipartUpload).  The node role's grant on
    held/* lacked that action: on AWS the abort was refused and the parts stayed in the
    bucket, billed, for good.  Every call the node makes on held/ is granted by its role."""
    from kotta_executor import aws_provision
    from kotta_executor.security import data

    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", 5 << 20)
    enclave, audit, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/", by=admin.user, egress="deny")
    calls: list[tuple[str, str]] = []

    def record(model=None, params=None, **_):
        key = str((params or {}).get("url_path", ""))
        if "/held/" in key:
            calls.append((model.name, key))

    enclave.s3.meta.events.register("before-call.s3", record)
    fired = throttle_once(enclave.s3, "UploadPart", code="InternalError")
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.sleep_and_return, 0, b"x" * (11 << 20), inputs=[INPUT])
    with pytest.raises(errors.EgressDenied):
        f.result(GUARD)
    enclave.s3.meta.events.unregister("before-call.s3", record)
    assert fired.is_set(), "no part of the held result failed"
    assert "AbortMultipartUpload" in [op for op, _ in calls], calls
    policy = aws_provision.node_policy(enclave.names, enclave.region, "123456789012")
    [held] = [s for s in policy["Statement"] if s["Sid"] == "HeldResults"]
    assert fnmatch.fnmatchcase(f"arn:aws:s3:::{enclave.names.bucket}/held/{f.job_id}",
                               held["Resource"])
    missing = {_S3_ACTION[op] for op, _ in calls} - set(held["Action"])
    assert not missing, f"the node role may not {missing} on held results"
    assert not enclave.s3.list_multipart_uploads(Bucket=enclave.names.bucket).get("Uploads")


def test_aws_a_request_botocore_refuses_when_a_staged_task_is_about_to_run_fails_it_at_once(
        aws, tmp_path):
    """The credentials of a staged task that waited are issued anew in the node's loop
    (AssumeRole): a request botocore refuses before sending it (ParamValidationError) was
    tried again at each step for the node's patience (a minute), then the job failed.  It
    fails at once, naming the error, never having run; the node goes on."""
    enclave, *_ = aws
    node = _node_thread()
    aws[4].node.data.reissue_after = 0.0  # (every staged task: its credentials anew)
    tries: list[int] = []

    def bad_parameter(params=None, **_):  # (botocore's own validation then refuses it)
        if threading.current_thread() is node:
            tries.append(1)
            params["NoSuchParameter"] = "x"

    enclave.session.events.register("provide-client-params.sts.AssumeRole", bad_parameter)
    token = make_user(enclave, "alice", tmp_path / "tokens", role="analyst")
    alice = KottaExecutor(1, enclave=enclave, start_node=False, credentials=token)
    try:
        f = alice.submit(tasks.create_file_and_sum, str(tmp_path / "ran"), inputs=[INPUT])
        wait_for(lambda: f.done() or not node.is_alive(), what="the job or the node to end")
        assert node.is_alive()
        with pytest.raises(errors.StagingFailed, match="ParamValidationError"):
            f.result(GUARD)
        assert not (tmp_path / "ran").exists()
        assert len(tries) == 1, "a request botocore refuses was sent again and again"
    finally:
        enclave.session.events.unregister("provide-client-params.sts.AssumeRole",
                                          bad_parameter)
        alice.shutdown(wait=node.is_alive(), cancel_futures=True)
