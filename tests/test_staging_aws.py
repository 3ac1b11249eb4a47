"""Datasets end to end on the AWS backend (in-process moto): the issue's ``file_sum``
example with S3 data, STS AssumeRole into the owner's role, and the audit log in DynamoDB.

The node runs in a thread of this process (its workers are real processes), so that it
shares in-process moto with the test; nodes in other processes are covered by
tests/test_aws_backend.py's moto server tests.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from kotta_executor import KottaExecutor, errors
from kotta_executor.aws_provision import bootstrap
from kotta_executor.backends.aws import AwsEnclave
from kotta_executor.security import credentials
from kotta_executor.security.audit import AuditLog
from kotta_executor.security.data import get_object
from kotta_executor.security.policy import PolicyStore, role_policy
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


def _alice_writes_an_output(aws):
    """alice, an analyst granted write on results/, writes OUTPUT: her future, done."""
    enclave, _, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    policies.grant("analyst", f"s3://{DATA_BUCKET}/results/", "write", by=admin.user)
    enclave.session.client("iam").put_role_policy(
        RoleName=f"{enclave.names.user_role_prefix}analyst", PolicyName="datasets",
        PolicyDocument=json.dumps(role_policy(policies.statements(role="analyst"))),
    )
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
    policies.grant("analyst", f"s3://{DATA_BUCKET}/results/", "write", by=admin.user)
    enclave.session.client("iam").put_role_policy(
        RoleName=f"{enclave.names.user_role_prefix}analyst", PolicyName="datasets",
        PolicyDocument=json.dumps(role_policy(policies.statements(role="analyst"))),
    )
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


@pytest.mark.parametrize("call", ["audit record", "held result"])
def test_aws_a_failed_egress_hold_is_retried_not_the_end_of_the_node(aws, tmp_path, call):
    """A task that read data which may not leave the enclave: its result is held (S3
    PutObject) and the hold audited (PutItem).  A fault past botocore's retries in either
    ended the node.  The hold is made again later: the future raises EgressDenied, the
    outputs are written, the job ran once."""
    enclave, audit, policies, admin, _ = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/", by=admin.user, egress="deny")
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user, egress="deny")
    policies.grant("analyst", f"s3://{DATA_BUCKET}/results/", "write", by=admin.user)
    enclave.session.client("iam").put_role_policy(
        RoleName=f"{enclave.names.user_role_prefix}analyst", PolicyName="datasets",
        PolicyDocument=json.dumps(role_policy(policies.statements(role="analyst"))),
    )
    if call == "audit record":
        fired = throttle_once(enclave.dynamodb, "PutItem", lambda body: b"egress-denied" in body)
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


def test_aws_an_output_is_never_in_its_dataset_without_its_audit_record(aws, tmp_path):
    """The stage-out record (PutItem) was written after the output's upload: when it
    failed past botocore's retries, the job failed with StagingFailed, but the output,
    written from data the task read, was in its dataset with no record of it.  The record
    comes first: it failing, nothing is written."""
    enclave, audit, policies, admin, executor = aws
    policies.add_dataset(f"s3://{DATA_BUCKET}/results/", by=admin.user)
    policies.grant("analyst", f"s3://{DATA_BUCKET}/results/", "write", by=admin.user)
    enclave.session.client("iam").put_role_policy(
        RoleName=f"{enclave.names.user_role_prefix}analyst", PolicyName="datasets",
        PolicyDocument=json.dumps(role_policy(policies.statements(role="analyst"))),
    )
    fired = throttle_once(enclave.dynamodb, "PutItem", lambda body: b"stage-out" in body)
    alice = executor("alice", "analyst")
    f = alice.submit(tasks.write_file, "alice.txt", "42\n", inputs=[INPUT], outputs=[OUTPUT])
    with pytest.raises(errors.StagingFailed, match="ThrottlingException"):
        f.result(GUARD)
    assert fired.is_set()
    assert audit.show(job_id=f.job_id, action="stage-out") == []
    with pytest.raises(FileNotFoundError):
        get_object(enclave, OUTPUT)
