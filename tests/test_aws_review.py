"""Bugs a review of the AWS backend found (kotta_executor/backends/aws.py, aws_records.py),
on moto only: retried conditional writes, DynamoDB's 400 KB item limit, batches left
unprocessed, ids DynamoDB cannot key, and listing dead letters.

Failures moto cannot produce are injected on the boto3 *client* only (botocore's event
system, or a wrapper around a client method); kotta's own code is never patched.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from kotta_executor import aws_provision
from kotta_executor.backends.aws import AwsEnclave, DynamoJobs
from kotta_executor.backends.base import Finished, Message, NewJob
from kotta_executor.states import JobState
from tests.test_aws_backend import enclave as enclave  # noqa: F401 - fixtures: moto in
from tests.test_aws_backend import moto_env as moto_env  # noqa: F401 - process, and a
from tests.test_aws_backend import name as name  # noqa: F401 - bootstrapped enclave


def new_job(queue="test", owner="alice", body=b"task") -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id, owner, "client-1", queue, "tests.tasks.add", 30.0, body)


def processing(enclave: AwsEnclave) -> NewJob:
    job = new_job()
    enclave.jobs.create([job])
    enclave.jobs.transition([job.job_id], JobState.PROCESSING, node="n1")
    return job


def s3_keys(enclave: AwsEnclave) -> list[str]:
    resp = enclave.s3.list_objects_v2(Bucket=enclave.names.bucket)
    return [o["Key"] for o in resp.get("Contents", [])]


def lose_first_response(enclave: AwsEnclave, operation: str) -> dict:
    """The first ``operation`` call reaches DynamoDB and is applied, but its response is
    lost (a 500 after commit, a read timeout): botocore's retry handler makes the call
    again.  botocore consults the ``needs-retry`` event after every attempt."""
    state = {"armed": True, "calls": 0}

    def handler(attempts=None, **_):
        state["calls"] += 1
        if state["armed"] and attempts == 1:
            state["armed"] = False
            return 0  # retry, after 0 s
        return None

    enclave.dynamodb.meta.events.register(f"needs-retry.dynamodb.{operation}", handler)
    return state


# ---------------------------------------------------------------- retried conditional writes


def test_claim_retried_after_its_response_was_lost_still_counts(enclave):
    job = new_job()
    enclave.jobs.create([job])
    lost = lose_first_response(enclave, "UpdateItem")
    # node/daemon.py claim(): a first delivery claims from pending only
    moved = enclave.jobs.transition(
        [job.job_id], JobState.PROCESSING, from_states={JobState.PENDING}, node="n1"
    )
    assert lost["calls"] == 2  # the write was made, then retried
    assert enclave.jobs.get(job.job_id).state == JobState.PROCESSING
    assert moved == [job.job_id]


def test_finish_retried_after_its_response_was_lost_keeps_a_large_result(enclave):
    job = processing(enclave)
    result = os.urandom(DynamoJobs.max_result + 1)  # spilled to S3
    lose_first_response(enclave, "UpdateItem")
    recorded = enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, result)])
    rec = enclave.jobs.get(job.job_id, with_result=True)
    assert rec.state == JobState.COMPLETED
    assert rec.result == result, "the recorded result's blob was deleted"
    assert recorded == [job.job_id]


def test_finish_retried_after_its_response_was_lost_reports_it_recorded(enclave):
    job = processing(enclave)
    lose_first_response(enclave, "UpdateItem")
    recorded = enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, b"small")])
    assert enclave.jobs.get(job.job_id, with_result=True).result == b"small"
    assert recorded == [job.job_id]


def test_a_losing_retried_finish_still_loses(enclave):
    job = processing(enclave)
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, b"one")])
    lose_first_response(enclave, "UpdateItem")
    big = os.urandom(DynamoJobs.max_result + 1)
    assert enclave.jobs.finish([Finished(job.job_id, JobState.FAILED, big, "dup")]) == []
    assert s3_keys(enclave) == []  # its blob is gone: the item never named it
    assert enclave.jobs.get(job.job_id, with_result=True).result == b"one"


def test_a_finish_that_raises_after_being_applied_keeps_its_result_blob(enclave):
    """The write is made, then the call fails (every retry's answer lost): the blob the
    item names must stay."""
    job = processing(enclave)
    from botocore.exceptions import ConnectionClosedError

    def fail(**_):
        raise ConnectionClosedError(endpoint_url="https://dynamodb")

    enclave.dynamodb.meta.events.register("after-call.dynamodb.UpdateItem", fail)
    result = os.urandom(DynamoJobs.max_result + 1)
    with pytest.raises(ConnectionClosedError):
        enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, result)])
    enclave.dynamodb.meta.events.unregister("after-call.dynamodb.UpdateItem", fail)
    assert enclave.jobs.get(job.job_id, with_result=True).result == result


def test_a_finish_that_raises_before_being_applied_leaves_no_blob(enclave):
    job = processing(enclave)
    from botocore.exceptions import ConnectionClosedError

    def fail(**_):
        raise ConnectionClosedError(endpoint_url="https://dynamodb")

    enclave.dynamodb.meta.events.register("before-call.dynamodb.UpdateItem", fail)
    with pytest.raises(ConnectionClosedError):
        enclave.jobs.finish(
            [Finished(job.job_id, JobState.COMPLETED, os.urandom(DynamoJobs.max_result + 1))]
        )
    enclave.dynamodb.meta.events.unregister("before-call.dynamodb.UpdateItem", fail)
    assert s3_keys(enclave) == []
    assert enclave.jobs.get(job.job_id).state == JobState.PROCESSING


# ---------------------------------------------------------------- DynamoDB's 400 KB item limit


def _long_task_usage(samples: int) -> dict:
    # node/monitor.py Monitor.usage(): one sample per --sample-interval, never trimmed
    return {
        "samples": [
            {"t": round(1_760_000_000.0 + 120 * i, 3), "cpu_pct": 99.9, "rss_kb": 1_234_567,
             "procs": 3}
            for i in range(samples)
        ],
        "peak_rss_kb": 1_234_567,
    }  # fmt: skip


def test_finish_with_a_long_usage_record_and_a_result_under_max_result(enclave):
    job = processing(enclave)
    usage = _long_task_usage(1500)  # ~50 h at the default 120 s interval; 25 min at 1 s
    result = os.urandom(DynamoJobs.max_result)  # would be kept inline, alone
    fin = Finished(job.job_id, JobState.COMPLETED, result, usage=usage)
    assert enclave.jobs.finish([fin]) == [job.job_id]
    assert enclave.jobs.get(job.job_id, with_result=True).result == result
    assert len(s3_keys(enclave)) == 1  # spilled, for the usage's sake


def test_finish_with_a_very_long_usage_record(enclave):
    job = processing(enclave)
    usage = _long_task_usage(6000)  # > 400 KB of JSON
    fin = Finished(job.job_id, JobState.COMPLETED, b"ok", usage=usage)
    assert enclave.jobs.finish([fin]) == [job.job_id]
    rec = enclave.jobs.get(job.job_id, with_result=True)
    assert rec.result == b"ok"
    kept = rec.usage["samples"]
    assert 2 < len(kept) < 6000 and rec.usage["samples_downsampled_from"] == 6000
    assert kept[0] == usage["samples"][0] and kept[-1] == usage["samples"][-1]
    assert rec.usage["peak_rss_kb"] == usage["peak_rss_kb"]
    assert len(json.dumps(rec.usage)) <= DynamoJobs.max_usage


def test_record_usage_of_a_very_long_usage_record(enclave):
    job = processing(enclave)
    assert enclave.jobs.record_usage(job.job_id, _long_task_usage(6000)) is True
    usage = enclave.jobs.get(job.job_id).usage
    assert usage["samples_downsampled_from"] == 6000
    small = {"samples": [{"t": 1.0}], "peak_rss_kb": 1}
    assert enclave.jobs.record_usage(job.job_id, small) is True
    assert enclave.jobs.get(job.job_id).usage == small  # short ones are kept as they are


def test_finish_with_a_long_reason_and_a_result_under_max_result(enclave):
    job = processing(enclave)
    result = os.urandom(DynamoJobs.max_result)
    fin = Finished(job.job_id, JobState.FAILED, result, reason="x" * 200_000)
    assert enclave.jobs.finish([fin]) == [job.job_id]
    rec = enclave.jobs.get(job.job_id, with_result=True)
    assert rec.result == result and rec.reason.startswith("x" * 1000)


# ---------------------------------------------------------------- unprocessed batches


def _never_process_deletes(enclave: AwsEnclave, monkeypatch) -> None:
    """BatchWriteItem: DynamoDB hands every DeleteRequest back as UnprocessedItems (as it
    does under throttling), on every round."""
    real = enclave.dynamodb.batch_write_item

    def throttled(RequestItems, **kw):
        table = enclave.names.jobs_table
        deletes = [r for r in RequestItems.get(table, []) if "DeleteRequest" in r]
        if not deletes:
            return real(RequestItems=RequestItems, **kw)
        return {"UnprocessedItems": {table: deletes}}

    monkeypatch.setattr(enclave.dynamodb, "batch_write_item", throttled)


def test_delete_that_dynamodb_never_processes_does_not_orphan_a_record(enclave, monkeypatch):
    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    job = processing(enclave)
    result = os.urandom(DynamoJobs.max_result + 1)  # spilled to S3
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, result)])
    _never_process_deletes(enclave, monkeypatch)
    with pytest.raises(RuntimeError, match="did not delete 1 job record"):
        enclave.jobs.delete([job.job_id])
    # the record was left whole: never a completed job whose result was deleted under it
    assert enclave.jobs.get(job.job_id, with_result=True).result == result


def test_delete_removes_the_blobs_of_processed_records_only(enclave, monkeypatch):
    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    kept, gone = processing(enclave), processing(enclave)
    big = os.urandom(DynamoJobs.max_result + 1)
    fins = [Finished(j.job_id, JobState.COMPLETED, big) for j in (kept, gone)]
    assert len(enclave.jobs.finish(fins)) == 2
    real = enclave.dynamodb.batch_write_item

    def partly(RequestItems, **kw):
        table = enclave.names.jobs_table
        stuck = [
            r for r in RequestItems[table]
            if r["DeleteRequest"]["Key"]["job_id"]["S"] == kept.job_id
        ]  # fmt: skip
        rest = [r for r in RequestItems[table] if r not in stuck]
        if rest:
            real(RequestItems={table: rest}, **kw)
        return {"UnprocessedItems": {table: stuck}}

    monkeypatch.setattr(enclave.dynamodb, "batch_write_item", partly)
    with pytest.raises(RuntimeError):
        enclave.jobs.delete([kept.job_id, gone.job_id])
    assert enclave.jobs.get(gone.job_id) is None
    assert enclave.jobs.get(kept.job_id, with_result=True).result == big
    [key] = s3_keys(enclave)
    assert key.startswith(f"blobs/result-{kept.job_id}-")


def test_prune_tries_unprocessed_deletes_again_and_removes_their_blobs(enclave, monkeypatch):
    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    jobs = [processing(enclave) for _ in range(30)]  # (two batches of at most 25)
    big = os.urandom(DynamoJobs.max_result + 1)  # spilled to S3
    fins = [Finished(j.job_id, JobState.COMPLETED, big) for j in jobs]
    assert len(enclave.jobs.finish(fins)) == 30
    real = enclave.dynamodb.batch_write_item
    rounds = []

    def half(RequestItems, **kw):  # each call: half its deletes handed back unprocessed
        table = enclave.names.jobs_table
        deletes = RequestItems[table]
        rounds.append(len(deletes))
        keep, rest = deletes[: len(deletes) // 2], deletes[len(deletes) // 2:]
        real(RequestItems={table: rest}, **kw)
        return {"UnprocessedItems": {table: keep}} if keep else {}

    monkeypatch.setattr(enclave.dynamodb, "batch_write_item", half)
    before = time.time() + 1  # (all of them finished before)
    assert sorted(enclave.jobs.prune(before).jobs) == sorted(j.job_id for j in jobs)
    assert len(rounds) > 2
    assert enclave.jobs.get_many([j.job_id for j in jobs]) == {}
    assert s3_keys(enclave) == []


def test_prune_removes_the_dead_letters_of_its_jobs_past_the_first_thousand(enclave):
    """kotta prune removed the dead letters of the jobs it pruned among the first 1,000 of
    a queue only (a listing's limit, max_dead_letters: 10 here, for speed): those after
    stayed for 14 days, their jobs gone.  It reads them all; the others stay, visible."""
    enclave.queue.max_dead_letters = 10
    jobs = [processing(enclave) for _ in range(25)]
    kept = processing(enclave)  # (not final: not pruned)
    got = enclave.queue.receive("test", 26, 30, "h")
    assert len(got) == 26
    enclave.queue.dead_letter(got, "poison")
    fins = [Finished(j.job_id, JobState.FAILED, b"", "poison") for j in jobs]
    assert len(enclave.jobs.finish(fins)) == 25
    before = time.time() + 1  # (all of them finished before)
    assert sorted(enclave.jobs.prune(before).jobs) == sorted(j.job_id for j in jobs)
    enclave.queue.max_dead_letters = 1000
    assert [d["job_id"] for d in enclave.queue.dead_letters("test")] == [kept.job_id]


def test_records_get_many_does_not_report_unprocessed_keys_as_absent(enclave, monkeypatch):
    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    assert enclave.records.put("refresh", "r1", {"user": "alice"})
    real = enclave.dynamodb.batch_get_item

    def throttled(RequestItems, **kw):
        if enclave.names.records_table in RequestItems:
            return {"Responses": {}, "UnprocessedKeys": RequestItems}
        return real(RequestItems=RequestItems, **kw)

    monkeypatch.setattr(enclave.dynamodb, "batch_get_item", throttled)
    with pytest.raises(RuntimeError, match="did not answer"):
        enclave.records.get("refresh", "r1")


# ---------------------------------------------------------------- ids DynamoDB cannot key


def _aws_key_validation(enclave: AwsEnclave) -> None:
    """What DynamoDB does and moto 5.2 does only for GetItem: a key attribute that is an
    empty string (or over 2048 bytes) is a ValidationException in every call.  Emulated
    with a before-call handler on the client that answers with DynamoDB's error."""
    from botocore.awsrequest import AWSResponse

    def keys_of(params):
        if "Key" in params:
            yield params["Key"]
        for req in (params.get("RequestItems") or {}).values():
            if isinstance(req, dict):  # BatchGetItem
                yield from req.get("Keys", [])
                continue
            for write in req:  # BatchWriteItem
                if "DeleteRequest" in write:
                    yield write["DeleteRequest"]["Key"]

    def validate(params, **_):
        body = params.get("body") or b"{}"
        for key in keys_of(json.loads(body)):
            if any(v.get("S") == "" or len(v.get("S", "").encode()) > 2048
                   for v in key.values()):  # fmt: skip
                return AWSResponse("https://dynamodb", 400, {}, None), {
                    "Error": {
                        "Code": "ValidationException",
                        "Message": "One or more parameter values are not valid.",
                    },
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                }
        return None

    enclave.dynamodb.meta.events.register("before-call.dynamodb", validate)


def test_history_of_an_empty_job_id_is_empty(enclave):
    assert enclave.jobs.history("") == []


def test_foreign_message_without_job_attribute(enclave):
    _aws_key_validation(enclave)
    url = enclave.sqs.get_queue_url(QueueName=enclave.names.queue("test"))["QueueUrl"]
    enclave.sqs.send_message(QueueUrl=url, MessageBody="hello from the console")
    [d] = enclave.queue.receive("test", 1, 30, "n1")
    assert d.job_id == ""
    enclave.queue.dead_letter([d], "corrupt")  # what node/daemon.py _reject does first
    assert enclave.jobs.get(d.job_id) is None  # ... and then this


@pytest.mark.parametrize("job_id", ["", "x" * 2049], ids=["empty", "too-long"])
def test_ids_dynamodb_cannot_key_are_unknown_jobs(enclave, job_id):
    _aws_key_validation(enclave)
    job = processing(enclave)
    jobs = enclave.jobs
    assert jobs.get(job_id) is None
    assert set(jobs.get_many([job_id, job.job_id])) == {job.job_id}
    assert jobs.history(job_id) == []
    assert jobs.request_kill(job_id) is False
    assert jobs.record_usage(job_id, {"peak_rss_kb": 1}) is False
    assert jobs.kill_requested([job_id]) == set()
    assert jobs.transition([job_id], JobState.FAILED, reason="x") == []
    assert jobs.finish([Finished(job_id, JobState.COMPLETED, b"r")]) == []
    big = os.urandom(DynamoJobs.max_result + 1)
    assert jobs.finish([Finished(job_id, JobState.COMPLETED, big)]) == []
    assert s3_keys(enclave) == []  # the spilled result of no job is not kept


# ---------------------------------------------------------------- dead-letter listing


def test_listing_redriven_dead_letters_does_not_change_them(moto_env, name):
    aws_provision.bootstrap(name, iam=False, tls_only=False, max_receive_count=2, session=moto_env)
    e = AwsEnclave(name, session=moto_env)
    try:
        e.queue.send("test", [Message("a" * 32, b"crashes its node")])
        for _ in range(2):
            [d] = e.queue.receive("test", 1, 30, "h")
            e.queue.release([d])
        assert e.queue.receive("test", 1, 30, "h") == []  # redriven
        counts = [[x["receive_count"] for x in e.queue.dead_letters("test")] for _ in range(3)]
        # delivered maxReceiveCount times before SQS moved it, however often it is listed
        assert counts == [[2], [2], [2]]
    finally:
        e.close()


# ---------------------------------------------------------------- batch calls on receipts


def _failing_on_aws_side(enclave: AwsEnclave, method: str, monkeypatch) -> list[int]:
    """SQS's ``method`` (a batch call on receipts) reports every entry failed on AWS's side
    (an InternalError, not the sender's fault), every time; the calls are counted."""
    calls: list[int] = []

    def failing(QueueUrl, Entries):
        calls.append(len(Entries))
        return {"Successful": [], "Failed": [
            {"Id": e["Id"], "SenderFault": False, "Code": "InternalError",
             "Message": "We encountered an internal error. Please try again."}
            for e in Entries]}

    monkeypatch.setattr(enclave.sqs, method, failing)
    return calls


def test_an_extend_or_ack_that_keeps_failing_on_aws_side_is_raised(enclave, monkeypatch):
    """docs/aws.md: an error that survives the retries is raised, never swallowed.  Extend
    and ack returned as if they had worked: the node took the message for held (or gone)
    and it was delivered again while its task ran."""
    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    enclave.jobs.create([new_job()])
    [d] = enclave.queue.receive("test", 1, 60, "n1")
    calls = _failing_on_aws_side(enclave, "change_message_visibility_batch", monkeypatch)
    with pytest.raises(RuntimeError, match=r"change_message_visibility_batch .* failed for 1 "
                                           r"entries after 10 tries \(InternalError\)"):
        enclave.queue.extend([d], 120)
    assert len(calls) == 10
    calls = _failing_on_aws_side(enclave, "delete_message_batch", monkeypatch)
    enclave.queue.ack([d])
    with pytest.raises(RuntimeError, match=r"delete_message_batch .* failed for 1 entries"):
        enclave.queue.flush()
    assert len(calls) == 10


def test_a_delivery_acked_twice_does_not_lose_the_acks_batched_with_it(enclave):
    """SQS refuses a whole DeleteMessageBatch that names one receipt twice
    (BatchEntryIdsNotDistinct): the other acks of that batch were lost, their messages
    delivered again."""
    enclave.jobs.create([new_job() for _ in range(3)])
    ds = enclave.queue.receive("test", 3, 60, "n1")
    assert len(ds) == 3
    enclave.queue.extend([ds[0], ds[0]], 120)  # (the same for extend and release)
    enclave.queue.ack(ds[:2])
    enclave.queue.ack([ds[2], ds[2]])
    enclave.queue.flush()
    assert enclave.queue.depth("test") == 0


def test_cancel_of_a_job_recorded_and_running_before_its_retry_returns_false(enclave, tmp_path):
    """A lone submit's send raised after SQS took its task (a lost response): the job is
    recorded, queued, and goes to the outbox to be sent again.  A node starts it.  A
    cancel() before the manager's retry recorded the outbox job cancelled from any
    state: True for a job that runs, and its result could never be recorded."""
    import threading

    from botocore.exceptions import EndpointConnectionError

    from kotta_executor import KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD, wait_for

    node, runner = _node_in_thread(enclave, workers=2)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    hold, held, lose, go = (threading.Event() for _ in range(4))

    def response_lost(model, **_):  # after SQS has taken the messages
        if model.name == "SendMessageBatch" and lose.is_set() and (
            threading.current_thread() is threading.main_thread()
        ):
            lose.clear()
            raise EndpointConnectionError(endpoint_url="https://sqs (the response was lost)")

    def manager_waits_for_go(model, **_):  # the manager is busy in a look at the job table
        if model.name == "BatchGetItem" and hold.is_set() and (
            threading.current_thread().name.startswith("kotta-manager")
        ):
            held.set()
            go.wait(GUARD)

    enclave.dynamodb.meta.events.register("before-call", manager_waits_for_go)
    enclave.sqs.meta.events.register("after-call", response_lost)
    release, started = tmp_path / "release", tmp_path / "started"
    try:
        assert ex.submit(tasks.add, 1, 2).result(GUARD) == 3  # the manager listens
        hold.set()
        first = ex.submit(tasks.wait_for_file, str(release))  # keeps the look busy
        held.wait(GUARD)
        assert held.is_set()
        lose.set()
        f = ex.submit(tasks.touch_then_wait, str(started), str(release))
        assert not lose.is_set()  # its send raised: the job waits in the outbox
        wait_for(started.exists, what="a node to start the job")
        assert f.cancel() is False
        assert enclave.jobs.get(f.job_id).state == JobState.PROCESSING
        go.set()
        (tmp_path / "text").write_text("done")
        os.replace(tmp_path / "text", release)  # whole, when the tasks see it
        assert f.result(GUARD) == "done" and first.result(GUARD) == "done"
    finally:
        go.set()
        release.touch()
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)
    r = enclave.jobs.get(f.job_id)
    assert (r.state, r.attempts) == (JobState.COMPLETED, 1)


def _manager_sends_fail(enclave, times: float):
    """The executor's next TransactWriteItems fail on the wire (as after botocore's own
    retries) until its manager thread has met ``times`` failures; those are counted.  In
    every thread: a submit made alone records its job from the caller's thread (on a
    loaded machine, every submit of a loop may be alone)."""
    import threading

    from botocore.exceptions import EndpointConnectionError

    failed = []

    def fail(model, **_):
        if model.name == "TransactWriteItems" and len(failed) < times:
            if threading.current_thread().name.startswith("kotta-manager"):
                failed.append(1)
            raise EndpointConnectionError(endpoint_url="https://dynamodb (unreachable)")

    enclave.dynamodb.meta.events.register("before-call", fail)
    return failed


def _node_in_thread(enclave, workers: int = 1):
    """A node of the queue ``test``, running in a thread (its workers are processes)."""
    import threading

    from node.daemon import Node, NodeConfig

    node = Node(enclave, NodeConfig(queue="test", workers=workers, long_poll=0.5))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    return node, runner


def test_tasks_whose_send_fails_for_a_while_are_sent_again(enclave, caplog):
    """A batch of the outbox that AWS refused broke the executor: every future failed
    with BrokenEnclave.  It is tried again (create() keeps what it wrote already)."""
    import logging

    from kotta_executor import KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD

    caplog.set_level(logging.WARNING, logger="kotta")
    node, runner = _node_in_thread(enclave)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        failed = _manager_sends_fail(enclave, 2)
        assert list(ex.map(tasks.square, range(10), timeout=GUARD)) == [x * x for x in range(10)]
        assert len(failed) == 2
        assert "sending 10 tasks failed (EndpointConnectionError" in caplog.text
        assert "sending tasks works again" in caplog.text
    finally:
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)
    assert enclave.queue.depth("test") == 0


def test_tasks_whose_send_keeps_failing_fail_with_the_error(enclave, monkeypatch):
    from kotta_executor import BrokenEnclave, KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD

    monkeypatch.setattr("kotta_executor.executor.SEND_RETRY_FOR", 0.5)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        failed = _manager_sends_fail(enclave, float("inf"))
        fs = []
        for i in range(4):  # (once broken, a submit raises, as ProcessPoolExecutor's does)
            try:
                fs.append(ex.submit(tasks.square, i))
            except BrokenEnclave as exc:
                assert "EndpointConnectionError" in str(exc)
                break
        for f in fs:
            with pytest.raises(BrokenEnclave, match="EndpointConnectionError"):
                f.result(GUARD)
        assert len(failed) >= 2  # tried again before giving up
    finally:
        ex.shutdown(wait=False)


def test_a_cancel_that_fails_during_a_send_outage_leaves_the_task_to_run(enclave):
    """cancel() of a task waiting in the outbox while the enclave refuses sends fails
    too (it must record the job cancelled); it used to mark the task skipped first, so
    the manager dropped it unsent: no record, its future pending for ever."""
    import threading

    from botocore.exceptions import EndpointConnectionError

    from kotta_executor import KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD

    down, manager_failed = threading.Event(), threading.Event()

    def unreachable(model, **_):
        if down.is_set() and model.name == "TransactWriteItems":
            if threading.current_thread().name.startswith("kotta-manager"):
                manager_failed.set()
            raise EndpointConnectionError(endpoint_url="https://dynamodb (unreachable)")

    enclave.dynamodb.meta.events.register("before-call", unreachable)
    node, runner = _node_in_thread(enclave)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        assert ex.submit(tasks.square, 2).result(GUARD) == 4
        down.set()
        f = ex.submit(tasks.square, 3)
        assert manager_failed.wait(GUARD)  # it waits in the outbox, to be sent again
        with pytest.raises(EndpointConnectionError):
            f.cancel()
        down.clear()
        assert f.result(GUARD) == 9  # the cancel failed, visibly: the task went on
    finally:
        down.clear()
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)


def test_parallel_calls_all_end_before_a_failure_is_raised(enclave):
    """The AWS backend's calls in flight together (a transition of many jobs: one
    UpdateItem each): one that failed was raised at once, while the others went on, and
    landed after the caller had the error.  shutdown(cancel_futures=True), told the
    enclave could not be reached, nothing cancelled, had a job cancelled a moment later
    all the same.  Now the failure is raised once every call has ended."""
    import threading

    from tests.conftest import GUARD

    other_began, failing, go = threading.Event(), threading.Event(), threading.Event()
    ended: list[str] = []

    def call(i):
        if i == 0:
            other_began.wait(GUARD)
            failing.set()
            raise ConnectionError("unreachable")
        other_began.set()
        go.wait(GUARD)
        ended.append("the other call")

    def caller():
        try:
            enclave.parallel(call, [0, 1])
        except ConnectionError:
            ended.append("the caller's error")

    t = threading.Thread(target=caller)
    t.start()
    try:
        assert failing.wait(GUARD)
        t.join(0.5)  # (raised at once, it was done by now: the other call is held)
        assert t.is_alive(), "the failure was raised while another call was under way"
    finally:
        go.set()
        t.join(GUARD)
    assert ended == ["the other call", "the caller's error"]


def test_a_shutdown_that_cannot_cancel_raises_and_leaves_the_tasks_to_run(enclave, tmp_path):
    """shutdown(cancel_futures=True) while the enclave cannot record cancellations raises
    its error, as cancel() does: nothing was cancelled, and the tasks still run.  The
    executor is shut down all the same (no new submits), and a later shutdown waits."""
    import threading

    from botocore.exceptions import EndpointConnectionError

    from kotta_executor import KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD, wait_for

    down = threading.Event()

    def unreachable(params, **_):  # to the cancel only (the node and manager go on)
        if down.is_set() and params["ExpressionAttributeValues"][":new"] == {"S": "cancelled"}:
            raise EndpointConnectionError(endpoint_url="https://dynamodb (unreachable)")

    enclave.dynamodb.meta.events.register("before-parameter-build.dynamodb.UpdateItem",
                                          unreachable)
    node, runner = _node_in_thread(enclave)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        first = ex.submit(tasks.touch_then_wait, str(started), str(release))
        wait_for(started.exists, what="the node's one worker to be busy")
        f = ex.submit(tasks.square, 3)
        wait_for(lambda: enclave.jobs.get(f.job_id) is not None, what="the task to be sent")
        down.set()
        with pytest.raises(EndpointConnectionError):
            ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(tasks.square, 4)
        down.clear()
        assert enclave.jobs.get(f.job_id).state == JobState.PENDING
        tasks.release(release, "")
        assert not f.cancelled() and f.result(GUARD) == 9
        first.result(GUARD)
    finally:
        down.clear()
        tasks.release(release, "")
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)


def test_a_send_refused_for_lack_of_rights_fails_the_futures_at_once(enclave):
    """Not every refusal is worth a minute of retries: AWS's AccessDenied is not cured
    by trying again, and the futures fail with it at once (BrokenEnclave)."""
    import threading

    from botocore.exceptions import ClientError

    from kotta_executor import BrokenEnclave, KottaExecutor
    from tests import tasks
    from tests.conftest import GUARD

    refused = []

    def denied(model, **_):
        # every thread: a submit made alone records its job from the caller's thread (on a
        # loaded machine, all three were, and no refusal ever reached the manager); counted
        # in the manager, which must not retry it
        if model.name == "TransactWriteItems":
            if threading.current_thread().name.startswith("kotta-manager"):
                refused.append(1)
            raise ClientError({"Error": {"Code": "AccessDeniedException",
                                         "Message": "not authorized to TransactWriteItems"}},
                              "TransactWriteItems")

    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    enclave.dynamodb.meta.events.register("before-call", denied)
    try:
        fs = [ex.submit(tasks.square, 0)]
        for i in (1, 2):  # (the manager may have sent the first and broken already: a
            try:          # submit then raises, as ProcessPoolExecutor's once it is broken)
                fs.append(ex.submit(tasks.square, i))
            except BrokenEnclave as exc:
                assert "AccessDeniedException" in str(exc)
                break
        for f in fs:
            with pytest.raises(BrokenEnclave, match="AccessDeniedException"):
                f.result(GUARD)
        assert len(refused) == 1
    finally:
        ex.shutdown(wait=False)


def test_a_task_too_big_for_an_old_queue_fails_at_once_saying_to_bootstrap(enclave):
    """A queue made before SQS took 1 MiB messages (or set lower) takes 256 KiB, and
    refuses a task message over that.  The refusal (InvalidParameterValue) was taken for a
    passing fault: every send was tried again for a minute, then every turn of the
    executor for another, the other futures held back with it, before all of them failed
    naming a parameter AWS found invalid.  It is lasting: the futures fail at once, saying
    to run bootstrap again, which raises the queue's MaximumMessageSize."""
    from kotta_executor import BrokenEnclave, KottaExecutor
    from tests.conftest import GUARD

    url = enclave.sqs.get_queue_url(QueueName=enclave.names.queue("test"))["QueueUrl"]
    enclave.sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "262144"})
    import threading

    sends = []  # the manager's (a lone submit may be tried once from the caller's thread)
    enclave.sqs.meta.events.register(
        "before-call.sqs.SendMessageBatch",
        lambda **_: sends.append(threading.current_thread().name.startswith("kotta-manager")),
    )
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        # arguments under the executor's inline limit (256 KiB), base64 in the message over
        # the queue's
        f = ex.submit(len, b"x" * (200 * 1024))
        with pytest.raises(BrokenEnclave, match=f"kotta aws bootstrap {enclave.name}"):
            f.result(GUARD)
        assert sends.count(True) == 1  # (not tried again)
    finally:
        ex.shutdown(wait=False)


def _errors():
    import sqlite3

    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from kotta_executor.backends.aws import EnclaveNotProvisioned, RecordsRefused

    def aws(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "TransactWriteItems")

    return [  # (error, the backend that meets it, lasting)
        (EndpointConnectionError(endpoint_url="https://x"), "aws", False),
        (aws("ThrottlingException"), "aws", False),
        (aws("InternalServerError"), "aws", False),
        (aws("ExpiredTokenException"), "aws", False),  # refreshed credentials may cure it
        (sqlite3.OperationalError("database is locked"), "embedded", False),
        (aws("AccessDeniedException"), "aws", True),
        (aws("ValidationException"), "aws", True),
        (aws("UnrecognizedClientException"), "aws", True),
        (NoCredentialsError(), "aws", True),
        (sqlite3.DatabaseError("database disk image is malformed"), "embedded", True),
        (EnclaveNotProvisioned("the SQS queue kotta-lab-test: run kotta aws bootstrap lab"),
         "aws", True),
        (RecordsRefused("DynamoDB refused job records: ValidationError: too large"), "aws", True),
    ]


@pytest.mark.parametrize(("exc", "backend", "lasting"), _errors(),
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_which_refused_sends_break_the_executor_at_once(exc, backend, lasting, enclave,
                                                        tmp_path):
    """Each backend says which of its errors trying again does not cure (the executor
    gives up on a refused send at once for those, else tries again for a minute)."""
    from kotta_executor.backends.embedded import EmbeddedEnclave

    if backend == "aws":
        assert enclave.lasting(exc) is lasting
    else:
        embedded = EmbeddedEnclave(tmp_path / "enclave")
        try:
            assert embedded.lasting(exc) is lasting
        finally:
            embedded.close()


class _S3Answer:
    """An HTTP 200 from S3 (for a ``before-call`` hook that answers in S3's place)."""

    status_code = 200
    headers: dict = {}


@pytest.mark.parametrize("code", ["InternalError", "AccessDenied"])
def test_objects_s3_did_not_delete_are_tried_again_or_said(enclave, code):
    """DeleteObjects answers 200 naming, in ``Errors``, keys it did not delete.  They were
    ignored: the record went, and its spilled result stayed in S3 for ever (nothing names
    it any more).  A passing error is tried again; a lasting one raises, naming it."""
    job = new_job()
    enclave.jobs.create([job], enqueue=False)
    enclave.jobs.transition([job.job_id], JobState.PROCESSING, node="n1")
    big = os.urandom(DynamoJobs.max_result + 1)
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, big)])
    [stored] = s3_keys(enclave)
    answered = []

    def partial(**_):
        if not answered or code == "AccessDenied":  # once, or every time
            answered.append(1)
            return _S3Answer(), {"Errors": [{"Key": stored, "Code": code, "Message": "no"}]}
        return None

    enclave.s3.meta.events.register("before-call.s3.DeleteObjects", partial)
    if code == "AccessDenied":
        with pytest.raises(RuntimeError, match="did not delete 1 objects.*AccessDenied"):
            enclave.jobs.delete([job.job_id])
        assert s3_keys(enclave) == [stored] and len(answered) == 1  # (not tried again)
    else:
        enclave.jobs.delete([job.job_id])
        assert s3_keys(enclave) == [] and answered == [1]
    assert enclave.jobs.get(job.job_id) is None


def test_an_audit_record_whose_put_was_retried_is_recorded_once(enclave):
    """A conditional PutItem applied, its response lost, retried by botocore: the retry
    fails its own condition.  The put said False, and the audit log, taking that for
    another writer's record, appended the same event again after it."""
    from kotta_executor.security.audit import KIND, AuditLog

    log = AuditLog(enclave)
    log.append("first", user="alice")
    lost = lose_first_response(enclave, "PutItem")
    log.append("job-submit", user="alice", job_id="j1")
    assert lost["calls"] >= 2  # (the response was lost, and the put made again)
    assert [r["action"] for _, r in enclave.records.scan(KIND)] == ["first", "job-submit"]
    assert AuditLog(enclave).verify().ok


def test_a_kill_is_seen_for_a_job_the_last_look_did_not_cover(enclave, moto_env):
    """kill_requested() answers from its last read for a second (a busy node's _police
    asks every 0.25 s about the jobs it runs).  Asked about another job (a redelivery,
    whose node died: "it does not begin again"), it answered from a read that never
    looked at that job: a kill a client had requested was missed, and the job ran again."""
    running, redelivered = new_job(), new_job()
    enclave.jobs.create([running, redelivered], enqueue=False)
    enclave.jobs.transition([running.job_id, redelivered.job_id], JobState.PROCESSING,
                            node="n1")
    client = AwsEnclave(enclave.name, session=moto_env)  # another process's view
    try:
        assert client.jobs.request_kill(redelivered.job_id)
    finally:
        client.close()
    assert enclave.jobs.kill_requested([running.job_id]) == set()  # the node's look
    assert enclave.jobs.kill_requested([redelivered.job_id]) == {redelivered.job_id}


def test_a_dead_letter_listing_slower_than_its_hiding_lists_them_all(enclave):
    """dead_letters hides the letters it has read (so as to read each once) for 10 s:
    a listing that took longer (a few hundred letters from across an ocean, 3 s a call
    here on a simulated clock) met its first letters again, visible, took a receive of
    nothing but letters it had read for the end, and listed part of the queue, silently.
    Each letter stays hidden until the listing is done."""
    enclave.queue.send("test", [Message(f"j{i:02d}", b"x") for i in range(60)])
    got = enclave.queue.receive("test", 60, 30, "h")
    enclave.queue.dead_letter(got, "poison")
    clock = [0.0]
    hidden: list[tuple[float, list[str]]] = []  # (until, receipt handles)
    asked: list[int] = []

    def before(params=None, **_):
        if not params["QueueUrl"].endswith("-dlq"):
            return
        clock[0] += 3  # (the call's round trip)
        due = [h for until, hs in hidden if until < clock[0] for h in hs]
        hidden[:] = [(until, hs) for until, hs in hidden if until >= clock[0]]
        for chunk in range(0, len(due), 10):  # their timeout ran out: visible again
            enclave.sqs.change_message_visibility_batch(
                QueueUrl=params["QueueUrl"], Entries=[
                    {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                    for i, h in enumerate(due[chunk:chunk + 10])])
        asked.append(params["VisibilityTimeout"])

    def after(parsed=None, **_):
        if asked and parsed.get("Messages"):
            hidden.append((clock[0] + asked.pop(),
                           [m["ReceiptHandle"] for m in parsed["Messages"]]))
        asked.clear()

    enclave.sqs.meta.events.register("provide-client-params.sqs.ReceiveMessage", before)
    enclave.sqs.meta.events.register("after-call.sqs.ReceiveMessage", after)
    listed = enclave.queue.dead_letters("test")
    assert sorted(d["job_id"] for d in listed) == [f"j{i:02d}" for i in range(60)]
