"""Transient AWS faults in the middle of a node's step: throttling that outlasts botocore's
own retries (its retry quota spent, say) reaches the node.  The node must keep running and
try again; no job that could succeed fails, none is run twice, no message is acked before
its result is recorded.

Faults are injected on the node's own boto3 clients only (botocore's ``before-call``
event): kotta's code is never patched.  The node has an enclave object of its own, so the
executor's calls are not affected.
"""

from __future__ import annotations

import threading

import pytest
from botocore.exceptions import ClientError

from kotta_executor import KottaExecutor
from kotta_executor.backends.aws import AwsEnclave
from kotta_executor.backends.base import Message
from node.daemon import Node, NodeConfig
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_aws_backend import enclave as enclave  # noqa: F401 - fixtures: moto in
from tests.test_aws_backend import moto_env as moto_env  # noqa: F401 - process, and a
from tests.test_aws_backend import name as name  # noqa: F401 - bootstrapped enclave


def throttle_once(client, operation: str, when=lambda body: True, code="ThrottlingException"):
    """The next ``operation`` call whose request body ``when`` accepts fails with ``code``,
    as a call does once botocore stops retrying; the returned event is set then."""
    fired = threading.Event()

    def handler(params=None, **_):
        if fired.is_set() or not when(params.get("body") or b""):
            return None
        fired.set()
        raise ClientError({"Error": {"Code": code, "Message": "Rate exceeded"}}, operation)

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"before-call.{service}.{operation}", handler)
    return fired


def lose_answer_once(client, operation: str, when=lambda body: True):
    """The next ``operation`` call whose request body ``when`` accepts is made, then its
    answer is lost (a read timeout once botocore stops retrying); the event is set then."""
    from botocore.exceptions import ReadTimeoutError

    fired = threading.Event()
    service = client.meta.service_model.service_id.hyphenize()

    def mark(params=None, context=None, **_):
        if not fired.is_set() and when(params.get("body") or b""):
            context["kotta_test_lose"] = True

    def lose(context=None, **_):
        if context.get("kotta_test_lose") and not fired.is_set():
            fired.set()
            raise ReadTimeoutError(endpoint_url=f"https://{service}")

    client.meta.events.register(f"before-call.{service}.{operation}", mark)
    client.meta.events.register(f"after-call.{service}.{operation}", lose)
    return fired


def _run(node: Node) -> threading.Thread:
    runner = threading.Thread(target=node.run, name=f"node-{node.node_id}", daemon=True)
    runner.start()
    return runner


def _outcome(runner: threading.Thread, future) -> None:
    wait_for(lambda: future.done() or not runner.is_alive(), what="the job or the node to end")
    assert runner.is_alive(), "a transient fault killed the node"


def _node_and_executor(enclave, moto_env, name):  # noqa: F811 - fixtures
    node_enclave = AwsEnclave(name, session=moto_env)
    node = Node(node_enclave, NodeConfig(queue="test", workers=1, long_poll=0.5))
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    return node_enclave, node, ex


def _stop(ex, node, runner, node_enclave) -> None:
    ex.shutdown(wait=runner.is_alive(), cancel_futures=True)
    node.request_stop()
    runner.join(GUARD)
    node_enclave.close()


def _completes_once_through(enclave, ex, node, node_enclave, fired, tmp_path,
                            what: str) -> None:
    """A task that waits on a file runs on ``node`` until the fault ``fired`` has struck:
    the node lives on, and the job is completed, once, at its first attempt."""
    runner = _run(node)
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(fired.is_set, what=what)
        release.touch()
        _outcome(runner, f)
        f.result(GUARD)
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.attempts) == ("completed", 1)
    finally:
        release.touch()
        _stop(ex, node, runner, node_enclave)


def _is_finish(body: bytes) -> bool:
    return b'":st"' in body  # (DynamoJobs.finish's UpdateItem; transition's has ":new")


@pytest.mark.parametrize("fault", ["throttled", "applied, answer lost"])
def test_a_failed_finish_is_retried_not_the_end_of_the_node(enclave, moto_env, name, fault):
    """A fault that outlasts botocore's retries, recording a result, ended the node (and
    every task it ran).  The result is recorded again later, once (a finish that was made
    counts once)."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    inject = throttle_once if fault == "throttled" else lose_answer_once
    fired = inject(node_enclave.dynamodb, "UpdateItem", _is_finish)
    runner = _run(node)
    try:
        f = ex.submit(tasks.square, 7)
        wait_for(fired.is_set, what="the finish to fail")
        _outcome(runner, f)
        assert f.result(GUARD) == 49
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.attempts) == ("completed", 1)  # recorded, not run again
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


@pytest.mark.parametrize("call", ["heartbeat", "extend"])
def test_a_failed_upkeep_call_is_not_the_end_of_the_node(enclave, moto_env, name, tmp_path,
                                                         call):
    """The heartbeat (UpdateItem on the nodes table) and the visibility extension of the
    held messages (ChangeMessageVisibilityBatch), every visibility timeout / 3."""
    node_enclave = AwsEnclave(name, session=moto_env)
    node = Node(node_enclave, NodeConfig(queue="test", workers=1, long_poll=0.5,
                                         visibility_timeout=3))
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    if call == "heartbeat":
        table = node_enclave.names.nodes_table.encode()
        fired = throttle_once(node_enclave.dynamodb, "UpdateItem", lambda body: table in body)
    else:
        fired = throttle_once(node_enclave.sqs, "ChangeMessageVisibilityBatch")
    _completes_once_through(enclave, ex, node, node_enclave, fired, tmp_path,
                            f"the {call} to fail")


def test_a_failed_delete_of_task_blobs_is_not_the_end_of_the_node(enclave, moto_env, name):
    """A task whose arguments are too big for its message has them in a blob, which the
    node deletes (S3 DeleteObjects) once the job's result is recorded."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    fired = throttle_once(node_enclave.s3, "DeleteObjects", code="SlowDown")
    runner = _run(node)
    try:
        big = b"x" * (enclave.inline_limit + 1)
        f = ex.submit(len, big)
        wait_for(fired.is_set, what="the delete to be throttled")
        _outcome(runner, f)
        assert f.result(GUARD) == len(big)
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
        wait_for(lambda: not [k for k in _keys(enclave) if k.startswith("blobs/args-")],
                 what="the task blob to be deleted after all")
    finally:
        _stop(ex, node, runner, node_enclave)


def test_a_body_spilled_by_a_client_that_died_before_sending_it_is_deleted_once_old(
        enclave, moto_env, name, monkeypatch):
    """A message body over SQS's limit is spilled to S3 (``blobs/msg-<random>``) before the
    message is sent; a client killed in between left the blob, which no message names,
    with the task in it, for good: the nodes' sweep listed fn-* and args-* only (and the
    node role might list nothing else).  The sweep deletes msg-* blobs older than any
    message naming one can be (node.daemon.MSG_BLOB_AGE: here 0, as moto cannot date a
    blob back), within the node role's grants, and the node serves on."""
    import fnmatch
    import uuid

    from kotta_executor import aws_provision
    from node import daemon

    monkeypatch.setattr(daemon, "MSG_BLOB_AGE", 0.0, raising=False)
    orphan = f"{enclave.names.blob_prefix}msg-{uuid.uuid4().hex}"
    enclave.s3.put_object(Bucket=enclave.names.bucket, Key=orphan, Body=b"a spilled task")
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    runner = _run(node)
    try:
        wait_for(lambda: orphan not in _keys(enclave), what="the orphaned body's deletion")
        assert runner.is_alive()
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)
    policy = aws_provision.node_policy(enclave.names, enclave.region, "123456789012")
    [listing] = [s for s in policy["Statement"] if s["Sid"] == "ListTaskBlobs"]
    prefixes = listing["Condition"]["StringLike"]["s3:prefix"]
    assert [p for p in prefixes if fnmatch.fnmatchcase(f"{enclave.names.blob_prefix}msg-", p)]


def test_a_delete_of_task_blobs_refused_for_good_leaves_them_and_the_node_serves_on(
        enclave, moto_env, name, caplog):
    """DeleteObjects refused (AccessDenied: a bucket policy) is a lasting fault: the node
    gave up at once, and stopped, ending every task it ran, for blobs it only wanted gone
    (after 60 s of a fault that passes slowly, the same).  It says so and leaves them to
    the nodes' sweep of old task blobs."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    refused = threading.Event()

    def refuse(**_):
        refused.set()
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                          "DeleteObjects")

    node_enclave.s3.meta.events.register("before-call.s3.DeleteObjects", refuse)
    runner = _run(node)
    try:
        big = b"x" * (enclave.inline_limit + 1)
        f = ex.submit(len, big)
        assert f.result(GUARD) == len(big)
        wait_for(refused.is_set, what="the delete to be refused")
        assert ex.submit(len, big).result(GUARD) == len(big)  # the node serves on
        _outcome(runner, f)
        assert [k for k in _keys(enclave) if k.startswith("blobs/args-")]  # (the sweep's)
        assert "blobs of ended tasks failed for good (ClientError" in caplog.text
    finally:
        _stop(ex, node, runner, node_enclave)


@pytest.mark.parametrize("spilled", [False, True], ids=["inline result", "result in a blob"])
def test_a_finish_made_but_unanswered_is_known_as_made_when_tried_again(
        enclave, moto_env, name, spilled):
    """A finish DynamoDB applied whose answer was lost: the node's later try of the same
    result finds the job final.  It must know that write for its own (the same result,
    not another node's): else the client got no reply from it, and the task's argument
    blob was never deleted (nor would the nodes' sweep take it: its job has a record)."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    if spilled:  # a result over the item's limit is a blob of its own, the item names it
        node_enclave.jobs.max_result = 16
    fired = lose_answer_once(node_enclave.dynamodb, "UpdateItem", _is_finish)
    runner = _run(node)
    try:
        big = b"x" * (enclave.inline_limit + 1)
        f = ex.submit(bytes.upper, big)
        wait_for(fired.is_set, what="the finish's answer to be lost")
        _outcome(runner, f)
        assert f.result(GUARD) == big.upper()
        wait_for(lambda: not [k for k in _keys(enclave) if k.startswith("blobs/args-")],
                 what="the task's argument blob to be deleted")
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.attempts) == ("completed", 1)
        assert [s for _, s, _ in enclave.jobs.history(f.job_id)].count("completed") == 1
        results = [k for k in _keys(enclave) if k.startswith("blobs/result-")]
        assert len(results) == (1 if spilled else 0), results  # the one the item names
    finally:
        _stop(ex, node, runner, node_enclave)


@pytest.mark.parametrize("operation", ["BatchGetItem", "ReceiveMessage"])
def test_a_transient_fault_in_the_clients_looks_is_not_the_end_of_the_executor(
        enclave, moto_env, name, tmp_path, operation):
    """The executor's manager reads the job table now and then (which of its jobs run,
    which ended without a reply), and its reply queue: a fault there that outlasts
    botocore's retries broke the executor, failing every future of the session with
    BrokenEnclave while its tasks ran on.  It is tried again at the next turn."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    client = enclave.dynamodb if operation == "BatchGetItem" else enclave.sqs
    fired = throttle_once(client, operation)
    runner = _run(node)
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(fired.is_set, what=f"the client's {operation} to be throttled")
        tasks.release(release, "released")
        assert f.result(GUARD) == "released"
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the executor serves on
    finally:
        release.touch()
        _stop(ex, node, runner, node_enclave)


def test_a_task_failed_by_its_dependency_is_recorded_through_a_transient_fault(
        enclave, moto_env, name):
    """A task whose dependency failed never runs: its client records it failed (a job
    record and its result, for attach).  A fault recording it broke the executor; it is
    recorded at a later turn, and the future fails with the DependencyError."""
    from kotta_executor import DependencyError

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    runner = _run(node)
    try:
        bad = ex.submit(tasks.raise_value_error, "no input")
        with pytest.raises(ValueError):
            bad.result(GUARD)
        fired = throttle_once(enclave.dynamodb, "UpdateItem", _is_finish)
        dependent = ex.submit(tasks.add, bad, 1)
        with pytest.raises(DependencyError, match="no input"):
            dependent.result(GUARD)
        assert fired.is_set()
        job = enclave.jobs.get(dependent.job_id)
        assert job.state == "failed" and job.reason.startswith("DependencyError")
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the executor serves on
    finally:
        _stop(ex, node, runner, node_enclave)


def test_a_lasting_fault_in_the_clients_looks_breaks_the_executor_naming_it(
        enclave, moto_env, name, tmp_path, monkeypatch):
    """Tried again for SEND_RETRY_FOR seconds (here less), then given up: the futures fail
    with BrokenEnclave naming the fault, rather than wait for ever."""
    from kotta_executor import BrokenEnclave
    from kotta_executor import executor as executor_module

    monkeypatch.setattr(executor_module, "SEND_RETRY_FOR", 1.0)
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    failing = threading.Event()

    def always(params=None, **_):
        failing.set()
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                          "BatchGetItem")

    runner = _run(node)
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(started.exists, what="the task to start")
        enclave.dynamodb.meta.events.register("before-call.dynamodb.BatchGetItem", always)
        with pytest.raises(BrokenEnclave, match="ThrottlingException"):
            f.result(GUARD)
        assert failing.is_set()
    finally:
        enclave.dynamodb.meta.events.unregister("before-call.dynamodb.BatchGetItem", always)
        tasks.release(release, "released")
        _stop(ex, node, runner, node_enclave)


def _keys(enclave) -> list[str]:
    resp = enclave.s3.list_objects_v2(Bucket=enclave.names.bucket)
    return [o["Key"] for o in resp.get("Contents", [])]


# ------------------------------------------------- failed batch entries, until they give up


def _answer(client, operation: str, parsed_for):
    """Every ``operation`` call is answered with ``parsed_for(request params)`` (HTTP
    ``status``), without reaching the service: AWS failing the call's entries each time."""
    import json

    from botocore.awsrequest import AWSResponse

    service = client.meta.service_model.service_id.hyphenize()

    def handler(params=None, **_):
        status, parsed = parsed_for(json.loads(params["body"]))
        parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status})
        return AWSResponse("https://aws", status, {}, None), parsed

    client.meta.events.register(f"before-call.{service}.{operation}", handler)


def test_a_send_whose_entries_keep_failing_names_the_fault(enclave):
    from kotta_executor.backends.base import Message

    _answer(enclave.sqs, "SendMessageBatch", lambda body: (200, {"Successful": [], "Failed": [
        {"Id": e["Id"], "SenderFault": False, "Code": "KmsThrottled", "Message": "slow down"}
        for e in body["Entries"]
    ]}))
    with pytest.raises(RuntimeError, match="KmsThrottled"):
        enclave.queue.send("test", [Message("j1", b"task")])


def test_job_records_that_keep_being_cancelled_name_the_fault(enclave):
    from kotta_executor.backends.base import NewJob

    _answer(enclave.dynamodb, "TransactWriteItems", lambda body: (400, {
        "Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
        "CancellationReasons": [{"Code": "ThrottlingError", "Message": "Throughput exceeds"}
                                for _ in body["TransactItems"]],
    }))
    job = NewJob("j1", "alice", "client-1", "test", "tests.tasks.add", 30.0, b"task")
    with pytest.raises(RuntimeError, match="ThrottlingError"):
        enclave.jobs.create([job])


def test_an_extension_that_keeps_failing_stops_the_node_before_its_messages_are_free(
        enclave, moto_env, name, tmp_path, caplog):
    """A node waits out a failing visibility extension only so long (a third of the
    visibility timeout): past that another node could receive what it holds, and run it
    again while it still runs.  It stops, naming the fault; the task it held runs
    elsewhere, once its message is visible again."""
    node_enclave = AwsEnclave(name, session=moto_env)
    node = Node(node_enclave, NodeConfig(queue="test", workers=1, long_poll=0.5,
                                         visibility_timeout=3))
    failing = threading.Event()

    def always(params=None, **_):
        failing.set()
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                          "ChangeMessageVisibilityBatch")

    node_enclave.sqs.meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", always)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    errors: list[BaseException] = []

    def run():
        try:
            node.run()
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    other = None
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(failing.is_set, what="the extension to fail")
        runner.join(GUARD)
        assert not runner.is_alive()
        [exc] = errors
        assert isinstance(exc, ClientError) and "ThrottlingException" in str(exc)
        # its poller ends with it (it polled on, in this process, for as long as it lived)
        wait_for(lambda: not node._poller.is_alive(), what="the dead node's poller to end")
        assert "extending the visibility of held messages has failed for" in caplog.text
        release.touch()
        other = Node(AwsEnclave(name, session=moto_env),
                     NodeConfig(queue="test", workers=1, long_poll=0.5, visibility_timeout=3))
        other_runner = _run(other)
        assert f.result(GUARD) == ""  # (what the release file holds)
        other.request_stop()
        other_runner.join(GUARD)
    finally:
        release.touch()
        ex.shutdown(wait=False, cancel_futures=True)
        node_enclave.close()


@pytest.mark.parametrize("step", ["finish", "dead-letter"])
def test_a_failed_finish_of_a_rejected_task_is_not_the_end_of_the_node(enclave, moto_env, name,
                                                                       step):
    """A task message that does not parse fails its (pending) job with CorruptTask: a
    throttled finish there must not end the node, nor leave the job pending (its message
    is dead-lettered: nothing would deliver it again); nor a throttled dead-letter."""
    import uuid

    from kotta_executor.backends.base import NewJob

    node_enclave = AwsEnclave(name, session=moto_env)
    node = Node(node_enclave, NodeConfig(queue="test", workers=1, long_poll=0.5,
                                         visibility_timeout=3))
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    if step == "finish":
        fired = throttle_once(node_enclave.dynamodb, "UpdateItem", _is_finish)
    else:
        fired = throttle_once(node_enclave.sqs, "SendMessageBatch", lambda b: b"-dlq" in b)
    runner = _run(node)
    try:
        job_id = uuid.uuid4().hex
        enclave.jobs.create([NewJob(job_id, "someone", "a-client", "test", "fn", 60.0,
                                    b"not a task")])
        wait_for(fired.is_set, what="the rejected task's finish to fail")
        wait_for(lambda: enclave.jobs.get(job_id).state.final or not runner.is_alive(),
                 what="the job or the node to end")
        assert runner.is_alive(), "a transient fault killed the node"
        assert enclave.jobs.get(job_id).state == "failed"
        wait_for(lambda: [x["job_id"] for x in enclave.queue.dead_letters("test")] == [job_id]
                 or not runner.is_alive(), what="the message to be dead-lettered")
        assert runner.is_alive(), "a transient fault killed the node"
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


def test_a_failed_look_for_kill_requests_is_not_the_end_of_the_node(enclave, moto_env, name,
                                                                    tmp_path):
    """A busy node asks the job table every 0.25 s whether its jobs are to be killed
    (BatchGetItem): a throttled look ended the node, and every task it ran.  It is asked
    again at the next look."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    fired = throttle_once(node_enclave.dynamodb, "BatchGetItem",
                          lambda body: b"kill_requested" in body)
    _completes_once_through(enclave, ex, node, node_enclave, fired, tmp_path,
                            "a look for kill requests to fail")


def test_a_reply_that_cannot_be_sent_is_not_the_end_of_the_node(enclave, moto_env, name):
    """A reply goes out from the node's step when it need not wait for company (a full
    batch of ten, or ``reply_linger`` 0): a throttled send there ended the node, and every
    task it ran.  A reply is only a hint: the client finds the result in the job table."""
    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    node_enclave.queue.reply_linger = 0.0
    reply = node_enclave.names.reply_prefix.encode()
    fired = throttle_once(node_enclave.sqs, "SendMessageBatch", lambda body: reply in body)
    runner = _run(node)
    try:
        f = ex.submit(tasks.square, 7)
        wait_for(fired.is_set, what="the reply to fail")
        _outcome(runner, f)
        assert f.result(GUARD) == 49
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


def test_a_refusal_whose_audit_record_fails_is_audited_later(enclave, moto_env, name):
    """A task a node refuses (here: not signed) is audited after the step (a PutItem on
    the records table): a throttled put ended the node, and every task it ran, and the
    refusal was never audited.  The record is written at a later step."""
    import time
    import uuid

    from kotta_executor import wire
    from kotta_executor.backends.base import NewJob
    from kotta_executor.security.audit import AuditLog

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    table = node_enclave.names.records_table.encode()
    fired = throttle_once(node_enclave.dynamodb, "PutItem", lambda body: table in body)
    runner = _run(node)
    try:
        job_id = uuid.uuid4().hex
        header = wire.task_header(job_id=job_id, owner="alice", client="c" * 16, queue="test",
                                  walltime=60.0, created=time.time(), fn="tasks.square", n=1)
        body = wire.encode(header, wire.dump_call(tasks.square, [((3,), {})]))
        enclave.jobs.create([NewJob(job_id, "alice", "c" * 16, "test", "tasks.square", 60.0,
                                    body)])
        wait_for(fired.is_set, what="the audit record's put to fail")
        wait_for(lambda: AuditLog(enclave).show(action="task-rejected", job_id=job_id)
                 or not runner.is_alive(), what="the refusal to be audited")
        assert runner.is_alive(), "a transient fault killed the node"
        [rec] = AuditLog(enclave).show(action="task-rejected", job_id=job_id)
        assert "not signed" in rec["detail"]
        assert enclave.jobs.get(job_id).state == "failed"
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


def test_a_task_naming_a_huge_owner_is_refused_without_ending_the_node(enclave, moto_env,
                                                                       name):
    """A task signed by one user that names another, of 300,000 characters, as its owner
    is refused and audited.  The audit record, which names the claimed owner twice, was
    over DynamoDB's 400 KB item limit: its PutItem failed (ValidationException) and ended
    the node, and every task it ran; any user could stop every node so."""
    import time
    import uuid

    from kotta_executor import wire
    from kotta_executor.backends.base import Message
    from kotta_executor.security import credentials
    from kotta_executor.security.audit import AuditLog

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    token = credentials.load(enclave).access()
    runner = _run(node)
    try:
        job_id = uuid.uuid4().hex
        header = wire.task_header(job_id=job_id, owner="o" * 300_000, client="c" * 16,
                                  queue="test", walltime=60.0, created=time.time(),
                                  fn="tasks.square", n=1)
        body = token.sign(header, wire.dump_call(tasks.square, [((3,), {})]))
        enclave.queue.send("test", [Message(job_id, body)])
        wait_for(lambda: AuditLog(enclave).show(action="task-rejected", job_id=job_id)
                 or not runner.is_alive(), what="the refusal to be audited")
        assert runner.is_alive(), "a task naming a huge owner killed the node"
        [rec] = AuditLog(enclave).show(action="task-rejected", job_id=job_id)
        assert "names the owner" in rec["detail"]
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


@pytest.mark.parametrize("fault", ["deleted", "AccessDenied", "InvalidObjectState"])
def test_a_result_blob_that_cannot_be_read_fails_its_future_naming_the_blob(
        enclave, moto_env, name, fault):
    """A result over the item's limit is kept in S3.  Deleted (a lifecycle rule, a user
    cleaning up the bucket), its future failed with "the job completed without recording
    a result", with no word of the blob; refused (AccessDenied: a client role without
    s3:GetObject on it, a KMS key it may not use), it broke the executor, every future
    with it; archived (a lifecycle rule's move to Glacier: InvalidObjectState), it was
    tried again for a minute and then broke the executor.  The one future fails, naming
    the blob and the error."""
    from kotta_executor import JobFailed

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    node_enclave.jobs.max_result = 16  # (every result goes to a blob)
    runner = _run(node)
    later = None

    refused: list[str] = []  # (that blob only: the later task's result is a blob too)

    def refuse(params=None, **_):
        if refused and refused[0] in params.get("url_path", ""):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                              "GetObject")

    try:
        f = ex.submit(bytes.upper, b"x" * 100)
        assert f.result(GUARD) == b"X" * 100
        ex.shutdown()
        [ref] = [k[len("blobs/"):] for k in _keys(enclave) if k.startswith("blobs/result-")]
        bucket, key = enclave.names.bucket, f"blobs/{ref}"
        if fault == "deleted":
            enclave.s3.delete_object(Bucket=bucket, Key=key)
        elif fault == "InvalidObjectState":
            enclave.s3.copy_object(Bucket=bucket, Key=key, StorageClass="GLACIER",
                                   CopySource={"Bucket": bucket, "Key": key})
        else:
            refused.append(ref)
            enclave.s3.meta.events.register("before-call.s3.GetObject", refuse)
        later = KottaExecutor(1, enclave=enclave, start_node=False)
        with pytest.raises(JobFailed, match=f"its result, the blob {ref} .*, cannot be read: "
                                            f".*{'no blob' if fault == 'deleted' else fault}"):
            later.attach(f.job_id).result(GUARD)
        assert later.submit(tasks.square, 3).result(GUARD) == 9  # the executor serves on
    finally:
        enclave.s3.meta.events.unregister("before-call.s3.GetObject", refuse)
        if later is not None:
            later.shutdown(cancel_futures=True)
        _stop(ex, node, runner, node_enclave)


def _unreadable(key: str, fault: str, enclave, reader) -> None:
    """The blob ``key`` gone (``fault`` "deleted"), or refused to ``reader``'s GetObject
    (AccessDenied: a bucket policy, a KMS key its role may not use)."""
    if fault == "deleted":
        enclave.s3.delete_object(Bucket=enclave.names.bucket, Key=f"blobs/{key}")
        return

    def refuse(params=None, **_):
        if key in params.get("url_path", ""):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                              "GetObject")

    reader.s3.meta.events.register("before-call.s3.GetObject", refuse)


@pytest.mark.parametrize("fault", ["deleted", "AccessDenied"])
def test_a_task_whose_argument_blob_cannot_be_read_fails_and_its_node_serves_on(
        enclave, moto_env, name, fault):
    """A task's arguments too big for its message are in S3 (``args-<job id>``).  Refused
    to the node that receives the task (a bucket policy, a KMS key the node's role may
    not use: AccessDenied), that ended the node, and every task it ran, and then each
    node that received the task again.  Deleted, or refused, the task fails alone with
    CorruptTask naming the blob and the error, and the node serves on."""
    from kotta_executor import CorruptTask

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    f = ex.submit(len, b"x" * (enclave.inline_limit + 1))
    key = f"args-{f.job_id}"
    wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the job to be recorded")
    assert f"blobs/{key}" in _keys(enclave)
    _unreadable(key, fault, enclave, node_enclave)
    runner = _run(node)
    try:
        why = f"no blob '{key}'" if fault == "deleted" else f"{key}: .*AccessDenied"
        with pytest.raises(CorruptTask, match=why):
            f.result(GUARD)
        assert runner.is_alive(), "a task whose blob cannot be read ended the node"
        assert enclave.jobs.get(f.job_id).state == "failed"
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


@pytest.mark.parametrize("fault", ["deleted", "AccessDenied"])
def test_a_task_whose_message_body_in_s3_cannot_be_read_fails_and_its_node_serves_on(
        enclave, moto_env, name, fault):
    """A message too big for SQS has its body in S3 (``msg-…``).  Refused to the node
    (AccessDenied), every receive failed: the node's poller tried again for ever, the job
    never ended, and the other messages each receive took came back later, their
    deliveries counted (DeliveryFailed, in time, for tasks that never ran).  Deleted, the
    task failed as "not a kotta envelope: only 0 bytes", naming no blob.  It fails alone
    with CorruptTask naming the blob and the error, and the node serves on."""
    from kotta_executor import CorruptTask

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    enclave.queue.max_body = 1000  # (this client's sends: the task's body goes to S3)
    f = ex.submit(len, b"x" * 5000)
    # (the job is recorded first, then its message sent: the body put in S3 a moment after)
    [key] = wait_for(lambda: [k.removeprefix("blobs/") for k in _keys(enclave)
                              if k.startswith("blobs/msg-")], what="the message's body in S3")
    _unreadable(key, fault, enclave, node_enclave)
    runner = _run(node)
    try:
        with pytest.raises(CorruptTask, match=f"cannot be read: its body, the blob {key} in "
                                              f"s3://.*: .*{fault if fault != 'deleted' else ''}"):
            f.result(GUARD)
        assert runner.is_alive(), "a task whose message cannot be read ended the node"
        assert ex.submit(tasks.square, 3).result(GUARD) == 9  # the node serves on
    finally:
        _stop(ex, node, runner, node_enclave)


def test_the_unreadable_body_in_s3_of_a_dead_lettered_message_goes_with_its_dead_letter(
        enclave, moto_env, name):
    """A message whose body in S3 (``msg-…``) the node could not read was dead-lettered
    without it: the dead letter carried an empty body, and the object, named by no
    message, stayed in the enclave's bucket for good (``kotta prune`` of the job, which
    deletes a dead letter's body, never saw it).  It stays with its dead letter, as a
    readable one's does, and goes when the dead letter is pruned."""
    from kotta_executor import CorruptTask

    node_enclave, node, ex = _node_and_executor(enclave, moto_env, name)
    enclave.queue.max_body = 1000  # (this client's sends: the task's body goes to S3)
    f = ex.submit(len, b"x" * 5000)
    [key] = wait_for(lambda: [k.removeprefix("blobs/") for k in _keys(enclave)
                              if k.startswith("blobs/msg-")], what="the message's body in S3")
    _unreadable(key, "AccessDenied", enclave, node_enclave)
    runner = _run(node)
    try:
        with pytest.raises(CorruptTask, match=f"cannot be read: its body, the blob {key}"):
            f.result(GUARD)
    finally:
        _stop(ex, node, runner, node_enclave)
    [letter] = enclave.queue.dead_letters("test")
    assert letter["job_id"] == f.job_id
    assert enclave.queue.drop_dead_letters("test", {f.job_id}) == 1
    assert f"blobs/{key}" not in _keys(enclave), "the dead letter's body was left in S3"


def _to_the_dlq(body: bytes) -> bool:
    return b"-dlq" in body


def test_a_dead_letter_sent_twice_by_botocore_is_listed_once(enclave):
    """A SendMessageBatch to the dead-letter queue that SQS applied but whose answer was
    lost is sent again by botocore's retry: `kotta dead-letters` showed the job twice.
    One message dead-lettered is one dead letter in the listing."""
    enclave.queue.send("test", [Message("a" * 32, b"poison")])
    [d] = enclave.queue.receive("test", 1, 30, "h")
    resent = threading.Event()

    def resend(request_dict=None, response=None, **_):  # (answered, as if lost: again)
        if not resent.is_set() and response is not None and _to_the_dlq(
                request_dict.get("body") or b""):
            resent.set()
            return 0
        return None

    enclave.sqs.meta.events.register("needs-retry.sqs.SendMessageBatch", resend)
    enclave.queue.dead_letter([d], "poison")
    assert resent.is_set()
    listed = enclave.queue.dead_letters("test")
    assert [(x["job_id"], x["reason"]) for x in listed] == [("a" * 32, "poison")], listed
    assert enclave.queue.drop_dead_letters("test", {"a" * 32}) == 2  # (both go)


def test_a_dead_letter_whose_answer_was_lost_is_listed_once_when_sent_again(enclave):
    """A dead letter sent but its answer lost past botocore's retries: the message stays,
    comes again, and is dead-lettered again (a second dead letter): listed once, the
    first."""
    enclave.queue.send("test", [Message("a" * 32, b"poison")])
    [d] = enclave.queue.receive("test", 1, 30, "h")
    lose_answer_once(enclave.sqs, "SendMessageBatch", _to_the_dlq)
    with pytest.raises(Exception, match="timeout|Timeout"):
        enclave.queue.dead_letter([d], "poison, the first time")
    enclave.queue.release([d])
    [again] = enclave.queue.receive("test", 1, 30, "h")
    enclave.queue.dead_letter([again], "poison, the second time")
    listed = enclave.queue.dead_letters("test")
    assert [(x["job_id"], x["reason"]) for x in listed] == [
        ("a" * 32, "poison, the first time")], listed


# ------------------------------------------------- spilled bodies of messages not sent


def test_a_send_that_fails_deletes_the_bodies_it_spilled_for_messages_not_sent(enclave):
    """A body too large for SQS goes to S3 first (``blobs/msg-*``); when the send of its
    message then failed, the object stayed in the bucket for ever (no message names it,
    and every retry of the executor's spilled another).  Now what was spilled for the
    messages not sent is deleted, and the error says so; the bodies of the messages sent
    stay, for the nodes to read."""
    from kotta_executor.backends.base import Message

    enclave.queue.max_body = 1000  # (every body here goes to S3)
    bodies = {f"j{i:02d}": bytes([i]) * 2000 for i in range(12)}
    calls = []

    def second_call_throttled(params=None, **_):
        calls.append(1)
        if len(calls) == 2:  # the first ten are sent, the last two are not
            raise ClientError({"Error": {"Code": "ThrottlingException",
                                         "Message": "Rate exceeded"}}, "SendMessageBatch")

    enclave.sqs.meta.events.register("before-call.sqs.SendMessageBatch", second_call_throttled)
    with pytest.raises(ClientError, match="ThrottlingException") as info:
        enclave.queue.send("test", [Message(j, b) for j, b in bodies.items()])
    assert any("deleted the 2 bodies spilled to S3" in n for n in info.value.__notes__)
    assert len(_keys(enclave)) == 10  # those of the messages sent
    got = enclave.queue.receive("test", 12, 30, "h")
    assert sorted((d.job_id, d.body) for d in got) == sorted(bodies.items())[:10]
    enclave.queue.ack(got)
    enclave.queue.flush()
    assert _keys(enclave) == []

    # refused outright (a SenderFault): nothing was sent, and nothing is left
    _answer(enclave.sqs, "SendMessageBatch", lambda body: (200, {"Successful": [], "Failed": [
        {"Id": e["Id"], "SenderFault": True, "Code": "InvalidParameterValue", "Message": "no"}
        for e in body["Entries"]
    ]}))
    with pytest.raises(RuntimeError, match="InvalidParameterValue") as info:
        enclave.queue.send("test", [Message("j1", b"x" * 2000)])
    assert any("deleted the 1 body spilled to S3" in n for n in info.value.__notes__)
    assert _keys(enclave) == []


def test_an_ack_whose_other_entries_keep_failing_still_deletes_the_bodies_it_deleted(
        enclave):
    """DeleteMessageBatch deleted some messages of a batch while it kept failing others
    (an InternalError, every round): the ack raised, as it should, but the spilled bodies
    of the messages it *had* deleted stayed in S3 for ever (nothing names them any
    more).  They are deleted; those of the messages that failed stay with them."""
    from kotta_executor.backends.base import Message

    enclave.queue.max_body = 1000  # (both bodies go to S3)
    enclave.queue.send("test", [Message("j0", b"0" * 2000), Message("j1", b"1" * 2000)])
    got = sorted(enclave.queue.receive("test", 2, 30, "h"), key=lambda d: d.job_id)
    assert [d.job_id for d in got] == ["j0", "j1"] and len(_keys(enclave)) == 2
    failing = got[1].receipt.split(" ")[1]
    sent: dict[str, str] = {}  # the entry ids of the call, to their receipt handles

    def remember(params=None, **_):
        sent.clear()
        sent.update({e["Id"]: e["ReceiptHandle"] for e in params["Entries"]})

    def second_fails(parsed=None, **_):  # (SQS deleted it, and said it failed)
        for ok in list(parsed.get("Successful") or []):
            if sent[ok["Id"]] == failing:
                parsed["Successful"].remove(ok)
                parsed.setdefault("Failed", []).append(
                    {"Id": ok["Id"], "SenderFault": False, "Code": "InternalError",
                     "Message": "try again"})

    enclave.sqs.meta.events.register("before-parameter-build.sqs.DeleteMessageBatch", remember)
    enclave.sqs.meta.events.register("after-call.sqs.DeleteMessageBatch", second_fails)
    enclave.queue.ack(got)
    with pytest.raises(RuntimeError, match="InternalError"):
        enclave.queue.flush()
    [left] = _keys(enclave)
    assert left.endswith(got[1].receipt.split(" ")[2])  # the body of the one not deleted


def test_a_flush_that_fails_for_one_queue_still_makes_the_calls_of_the_others(enclave):
    """flush() (and close(), at exit too) takes every waiting batch, then makes the calls:
    the first that raised ended it, and the batches after it were dropped unmade, without
    a word (acknowledged messages of other queues delivered again, replies lost).  Every
    call is made; the first failure is raised."""
    from kotta_executor.backends.base import Message

    for queue in ("test", "production"):
        enclave.queue.send(queue, [Message(f"{queue}-1", b"x")])
    got = enclave.queue.receive("test", 1, 30, "h") + enclave.queue.receive(
        "production", 1, 30, "h")
    assert len(got) == 2
    refused = enclave.queue._url(enclave.names.queue("test"))

    def test_queue_refused(params=None, **_):
        if params["QueueUrl"] == refused:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}},
                              "DeleteMessageBatch")

    enclave.sqs.meta.events.register("before-parameter-build.sqs.DeleteMessageBatch",
                                     test_queue_refused)
    enclave.queue.ack(got)
    with pytest.raises(ClientError, match="AccessDenied"):
        enclave.queue.flush()
    enclave.sqs.meta.events.unregister("before-parameter-build.sqs.DeleteMessageBatch",
                                       test_queue_refused)
    enclave.queue.release(got)  # (the one still there comes back; the one deleted, not)
    assert enclave.queue.depth("production") == 0
    assert enclave.queue.depth("test") == 1


def test_an_ack_whose_first_batch_fails_still_deletes_the_next_batches(enclave):
    """An ack of more than ten deliveries makes a DeleteMessageBatch call per ten at once:
    the first that raised ended the ack, and the tens after it were neither deleted nor
    left waiting for the next flush (delivered again, each, without a word)."""
    from kotta_executor.backends.base import Message

    enclave.queue.send("test", [Message(f"j{i:02d}", b"x") for i in range(25)])
    got = enclave.queue.receive("test", 25, 30, "h")
    assert len(got) == 25
    fired = throttle_once(enclave.sqs, "DeleteMessageBatch")
    with pytest.raises(ClientError, match="ThrottlingException"):
        enclave.queue.ack(got)
    assert fired.is_set()
    enclave.queue.flush()  # (the five that waited for company)
    enclave.queue.release(got)
    assert enclave.queue.depth("test") == 10  # those of the call that failed, only


def test_a_send_whose_spill_to_s3_fails_deletes_the_bodies_it_had_spilled(enclave):
    """The bodies of a send too large for SQS go to S3 one by one, before any message is
    sent: when one PutObject failed, those spilled before it stayed in the bucket for
    ever.  They are deleted, and the error says so."""
    from kotta_executor.backends.base import Message

    enclave.queue.max_body = 1000  # (every body here goes to S3)
    puts = []

    def third_put_refused(**_):
        puts.append(1)
        if len(puts) == 3:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"}},
                              "PutObject")

    enclave.s3.meta.events.register("before-call.s3.PutObject", third_put_refused)
    with pytest.raises(ClientError, match="SlowDown") as info:
        enclave.queue.send("test", [Message(f"j{i}", b"x" * 2000) for i in range(4)])
    assert any("deleted the 2 bodies spilled to S3" in n for n in info.value.__notes__)
    assert _keys(enclave) == []
    assert enclave.queue.depth("test") == 0


# ------------------------------------------------------------------ dead letters, once each


def _refuse_entry_once(client, job_id: str) -> None:
    """The next SendMessageBatch with ``job_id``'s message sends the others, and refuses
    that one (a SenderFault: SQS did not take it)."""
    refused: list[str] = []
    answered: list[str] = []

    def drop(params=None, **_):
        for e in params["Entries"]:
            if not refused and e["MessageAttributes"]["kotta_job"]["StringValue"] == job_id:
                params["Entries"].remove(e)
                refused.append(e["Id"])

    def fail(parsed=None, **_):
        if refused and not answered:
            answered.append(refused[0])
            parsed.setdefault("Failed", []).append(
                {"Id": refused[0], "SenderFault": True, "Code": "InvalidParameterValue",
                 "Message": "refused"})

    client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", drop)
    client.meta.events.register("after-call.sqs.SendMessageBatch", fail)


def _refuse_second_call(client) -> None:
    """The second SendMessageBatch call fails as a whole (throttled past botocore's retries)."""
    calls: list[int] = []

    def handler(**_):
        calls.append(1)
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}},
                              "SendMessageBatch")

    client.meta.events.register("before-call.sqs.SendMessageBatch", handler)


@pytest.mark.parametrize("fault", ["an entry refused", "a later call failed"])
def test_a_dead_letter_send_that_fails_in_part_sends_each_dead_letter_once(enclave, fault):
    """dead_letter sends the dead letters, then deletes the originals.  When the send
    failed in part (one entry of a call refused; the second call of ten failing), none of
    the originals was deleted: the messages came again, and those whose dead letters had
    been sent were dead-lettered a second time.  The originals of the dead letters sent
    are deleted; the others come again, and are dead-lettered once."""
    from kotta_executor.backends.base import Message

    jobs = [f"j{i:02d}" for i in range(12)]
    enclave.queue.send("test", [Message(j, b"x") for j in jobs])
    got = enclave.queue.receive("test", 12, 30, "h")
    assert len(got) == 12
    if fault == "an entry refused":
        _refuse_entry_once(enclave.sqs, sorted(d.job_id for d in got)[0])
    else:
        _refuse_second_call(enclave.sqs)
    with pytest.raises((RuntimeError, ClientError)):
        enclave.queue.dead_letter(got, "poison")
    enclave.queue.release(got)  # what is left comes again (as for a node, later)
    again = enclave.queue.receive("test", 12, 30, "h")
    assert 0 < len(again) < 12
    enclave.queue.dead_letter(again, "poison")
    assert enclave.queue.depth("test") == 0
    assert sorted(d["job_id"] for d in enclave.queue.dead_letters("test")) == jobs


def test_a_dead_letter_whose_original_could_not_be_deleted_is_not_sent_again(enclave):
    """The dead letter was sent, then the delete of the original failed (throttled past
    botocore's retries): the message came again to the node, which dead-lettered it
    again: two dead letters of one task.  Its dead letter is known as sent: the original
    is deleted, and nothing sent again."""
    from kotta_executor.backends.base import Message

    enclave.queue.send("test", [Message("j1", b"x")])
    [d] = enclave.queue.receive("test", 1, 30, "h")
    fired = throttle_once(enclave.sqs, "DeleteMessageBatch")
    with pytest.raises(ClientError, match="ThrottlingException"):
        enclave.queue.dead_letter([d], "poison")
    assert fired.is_set()
    enclave.queue.release([d])  # it comes again (as to a node, later)
    [again] = enclave.queue.receive("test", 1, 30, "h")
    assert again.message_id == d.message_id
    enclave.queue.dead_letter([again], "poison")
    assert enclave.queue.depth("test") == 0
    assert [x["job_id"] for x in enclave.queue.dead_letters("test")] == ["j1"]
