"""A job that runs past SQS's limit on hiding a message (12 hours from its receipt,
however often its node extends it) is delivered again while its node still runs it.  It
must not run a second time; it is left to that node (node/daemon.py, Node._park_overdue).

moto does not enforce the limit: the test lowers ``SqsQueue.max_hidden`` (as SQS has it,
a parameter) and does what SQS does when it is reached, with SQS's own call: the
message becomes visible again, with its node's receipt, while the task runs."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kotta_executor import KottaExecutor
from kotta_executor.backends.aws import SqsQueue
from node.daemon import Node, NodeConfig
from tests import tasks
from tests.conftest import GUARD, wait_for
from tests.test_aws_backend import enclave as enclave  # noqa: F401 - fixtures: moto in
from tests.test_aws_backend import moto_env as moto_env  # noqa: F401 - process, and a
from tests.test_aws_backend import name as name  # noqa: F401 - bootstrapped enclave

LIMIT = 3.0  # seconds, for SQS's 12 hours


def _start(node: Node) -> threading.Thread:
    runner = threading.Thread(target=node.run, name=f"node-{node.node_id}")
    runner.start()
    return runner


def _reveal(enclave, node: Node, job_id: str) -> None:
    """What SQS does once the limit is reached: the message is visible again."""
    task = min((t for w in node.workers for t in list(w.inflight) if t.job_id == job_id),
               key=lambda t: t.delivery.receive_count)  # its first delivery's
    sqs_name, handle = task.delivery.receipt.split(" ")[:2]
    url = enclave.sqs.get_queue_url(QueueName=sqs_name)["QueueUrl"]
    enclave.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)


@pytest.mark.parametrize("where", ["another node", "its own node"])
def test_a_job_past_the_hiding_limit_is_not_run_again_while_its_node_runs_it(
    enclave, tmp_path, monkeypatch, caplog, where
):
    monkeypatch.setattr(SqsQueue, "max_hidden", LIMIT)
    caplog.set_level(logging.WARNING, logger="kotta.node")
    runs, stop = tmp_path / "runs", tmp_path / "stop"
    # workers=2: the node running the job has a free worker to run it again with
    first = Node(enclave, NodeConfig(queue="test", workers=2, long_poll=0.5,
                                     visibility_timeout=300))
    nodes = [first]
    runners = [_start(first)]
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        f = ex.submit(tasks.append_line_then_wait, str(runs), "ran", str(stop))
        wait_for(lambda: runs.exists(), what="the task to start")
        wait_for(lambda: time.time() - enclave.jobs.get(f.job_id).started >= 0.95 * LIMIT,
                 what="the job to run past the limit")
        if where == "another node":
            second = Node(enclave, NodeConfig(queue="test", workers=2, long_poll=0.5))
            nodes.append(second)
            runners.append(_start(second))
            wait_for(lambda: second.node_id in {n.node_id for n in enclave.nodes.live()},
                     what="the second node to register")
        # The node's periodic extend may hide it again before a receive sees it: then
        # once more (a deadlock guard bounds the attempts, not a timing expectation).
        def seen() -> bool:
            return "delivered again while node" in caplog.text or runs.read_text() != "ran\n"

        for _ in range(20):
            _reveal(enclave, first, f.job_id)
            try:
                wait_for(seen, timeout=1.0)
                break
            except AssertionError:
                continue
        assert runs.read_text() == "ran\n"  # not run again beside the first run
        assert f"job {f.job_id} was delivered again while node {first.node_id} still runs it" \
            in caplog.text
        assert not f.done()
        stop.touch()
        assert f.result(GUARD) == "ran"
        assert runs.read_text() == "ran\n"
        job = enclave.jobs.get(f.job_id)
        assert (job.state, job.node, job.attempts) == ("completed", first.node_id, 1)
    finally:
        stop.touch()
        ex.shutdown(wait=True)
        for node in nodes:
            node.request_stop()
        for runner in runners:
            runner.join(GUARD)


def test_a_redelivery_of_a_job_whose_node_is_gone_still_runs_it(enclave, tmp_path, monkeypatch):
    """The other side: past the limit too, but the node that ran it is not live any more
    (it died): the job runs again, as any job of a dead node does."""
    from kotta_executor.states import JobState

    monkeypatch.setattr(SqsQueue, "max_hidden", LIMIT)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        f = ex.submit(tasks.square, 7)
        # a node that took it and died long ago: received, claimed, never extended again
        [_] = enclave.queue.receive("test", 1, 0, "dead-node")
        assert enclave.jobs.transition([f.job_id], JobState.PROCESSING, node="dead-node")
        wait_for(lambda: time.time() - enclave.jobs.get(f.job_id).started >= LIMIT,
                 what="the job to be older than the limit")
        node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=0.5))
        runner = _start(node)
        try:
            assert f.result(GUARD) == 49
            job = enclave.jobs.get(f.job_id)
            assert (job.node, job.attempts) == (node.node_id, 2)
        finally:
            node.request_stop()
            runner.join(GUARD)
    finally:
        ex.shutdown(wait=True)
