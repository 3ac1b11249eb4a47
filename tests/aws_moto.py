"""The AWS backend on moto, for tests: never real AWS (fake credentials, no instance
metadata, in-process ``mock_aws``).

``aws_on_moto(tmp_path)`` is the ``open`` of the contract suite's ``"aws"`` backend;
``expect_on_aws(request)`` marks the contract tests that cannot hold on SQS
(:data:`CANNOT_HOLD_ON_SQS`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_CLEARED = (
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "KOTTA_AWS_ENDPOINT_URL",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@contextlib.contextmanager
def fake_aws_env() -> Iterator[None]:
    """Fake credentials and a region in os.environ, restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*FAKE_ENV, *_CLEARED)}
    os.environ.update(FAKE_ENV)
    for k in _CLEARED:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_session = None


def shared_session():
    """One boto3 session for the tests (loading the service models anew for every test
    would cost more than the test)."""
    global _session
    if _session is None:
        import boto3

        _session = boto3.session.Session(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
    return _session


@contextlib.contextmanager
def atomic_moto() -> Iterator[None]:
    """What the real services do atomically, moto's in-process backends do not: DynamoDB
    checks a ConditionExpression and writes the item as one step, and SQS hands a message
    to one receiver at a time; under moto two threads can both pass the condition, or
    iterate a queue or table while another changes it.  So moto's DynamoDB requests and
    queue operations are serialized here (long polls wait outside the lock, as they do on SQS).

    DynamoDB is locked per request (the handler's ``call_action``), not per backend method:
    moto's handlers read the live items the backend hands them outside the backend's methods
    (UpdateItem deep-copies the item before the update, GetItem and PutItem serialise it
    after), and a copy made while another thread's UpdateItem adds an attribute to the same
    item fails with "dictionary changed size during iteration"."""
    from unittest import mock

    from moto.dynamodb.responses import DynamoHandler
    from moto.sqs.models import SQSBackend

    lock = threading.RLock()

    def locked(fn):
        def call(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)

        return call

    def polled(receive):
        def call(self, queue_name, count, wait_seconds, visibility, *args, **kwargs):
            deadline = time.monotonic() + (wait_seconds or 0)
            while True:
                with lock:
                    got = receive(self, queue_name, count, 0, visibility, *args, **kwargs)
                if got or time.monotonic() >= deadline:
                    return got
                time.sleep(0.02)  # the emulated server's long-poll interval

        return call

    with contextlib.ExitStack() as stack:
        for cls, names in (
            # every request, reads too: moto's Query walks a table's dict of items, and
            # fails ("dictionary changed size during iteration") when another thread's
            # PutItem adds one
            (DynamoHandler, ("call_action",)),
            (
                SQSBackend,
                (
                    "send_message",
                    "send_message_batch",
                    "delete_message",
                    "delete_message_batch",
                    "change_message_visibility",
                    "change_message_visibility_batch",
                    "get_queue_attributes",
                ),
            ),
        ):
            for name in names:
                original = getattr(cls, name)
                stack.enter_context(mock.patch.object(cls, name, locked(original)))
        original = SQSBackend.receive_message
        stack.enter_context(mock.patch.object(SQSBackend, "receive_message", polled(original)))
        yield


@contextlib.contextmanager
def aws_on_moto(tmp_path: Path | None = None, *, create_queues: bool = True):
    """A fresh AWS enclave on in-process moto: bootstrapped, and with ``create_queues``
    so that the contract suite's ad-hoc queue names ("q", "work", ...) exist on first use.
    """
    from moto import mock_aws

    from kotta_executor.aws_provision import bootstrap
    from kotta_executor.backends.aws import AwsEnclave

    name = f"t{uuid.uuid4().hex[:8]}"
    with fake_aws_env(), mock_aws(), atomic_moto():
        session = shared_session()
        bootstrap(name, iam=False, tls_only=False, session=session)
        enclave = AwsEnclave(name, create_queues=create_queues, session=session)
        try:
            yield enclave
        finally:
            enclave.close()


#: contract tests that cannot hold on SQS, and why (strict xfail on "aws")
CANNOT_HOLD_ON_SQS = {
    name: (
        "SQS: a stale receipt handle still acts on a later delivery of the same message "
        "(AWS documents that DeleteMessage with an old handle 'will succeed, but the message "
        "might not be deleted'; moto deletes it, and changes visibility with it, too). The "
        "AWS backend relies on the job table's conditional writes instead."
    )
    for name in (
        "test_stale_receipt_cannot_ack_a_later_delivery_after_timeout",
        "test_stale_receipt_cannot_ack_a_later_delivery_after_release",
        "test_stale_receipt_cannot_extend_a_later_delivery",
        "test_queue_state_machine",  # its use_stale_receipt rule
    )
}


def expect_on_aws(request) -> None:
    """Called by the contract suite's ``backend`` fixture for the "aws" param."""
    item = request.node
    name = getattr(item, "originalname", item.name)
    if name in CANNOT_HOLD_ON_SQS:
        # not run: on moto the stale extend keeps the message away for the whole LONG
        # timeout, so these would only wait (or pass by the timing of the wait).  A skip,
        # not xfail(run=False): pytest reports that as a failure, parsing the test's source
        # for its traceback, and that ast.parse once raised "SystemError: AST constructor
        # recursion depth mismatch" on Python 3.11.7 and ended a test process (a CPython
        # bug, it seems, met while another thread of the process compiled code)
        pytest.skip(f"[cannot hold on SQS] {CANNOT_HOLD_ON_SQS[name]}")
