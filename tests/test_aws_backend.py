"""The AWS backend (kotta_executor/backends/aws.py) and its provisioning, on moto only.

Never real AWS: fake credentials, no instance metadata, in-process ``mock_aws`` (see
tests/aws_moto.py).  The common semantics are the contract suite's
(tests/test_backend_contract.py, param "aws"); these are the AWS-specific edges.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import logging
import os
import re
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from kotta_executor import aws_provision
from kotta_executor.aws_cli import add_parsers
from kotta_executor.backends import open_enclave
from kotta_executor.backends.aws import (
    INDEX_ATTRS,
    SQS_LIMIT,
    AwsEnclave,
    DynamoJobs,
    EnclaveNotProvisioned,
    Names,
    SqsQueue,
    _wait,
    _whole_seconds,
)
from kotta_executor.backends.base import KILLED_PENDING, Finished, Message, NewJob, NodeInfo
from kotta_executor.errors import ConfigurationError
from kotta_executor.states import JobState
from tests import aws_moto
from tests.conftest import GUARD, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def moto_env():
    """Fake credentials and in-process moto, for the test's whole body."""
    from moto import mock_aws

    with aws_moto.fake_aws_env(), mock_aws(), aws_moto.atomic_moto():
        yield aws_moto.shared_session()


@pytest.fixture
def name():
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def enclave(moto_env, name):
    """A bootstrapped enclave without ``create_queues``: only test and production exist."""
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    e = AwsEnclave(name, session=moto_env)
    yield e
    e.close()


class Calls:
    """AWS API calls made through an enclave's clients, counted with botocore's
    ``before-call`` event (``ops``); ``done`` lists those that have returned (``after-call``):
    a test waiting for a background thread's call to take effect waits for ``done``."""

    def __init__(self, enclave: AwsEnclave):
        self.ops: list[str] = []
        self.done: list[str] = []
        for client in enclave.clients.values():
            client.meta.events.register("before-call", self._count)
            client.meta.events.register("after-call", self._returned)

    def _count(self, model, **_):
        self.ops.append(model.name)

    def _returned(self, model, **_):
        self.done.append(model.name)

    def counts(self) -> Counter:
        return Counter(self.ops)

    def reset(self) -> None:
        self.ops.clear()
        self.done.clear()


def new_job(queue="test", owner="alice", body=b"task") -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id, owner, "client-1", queue, "tests.tasks.add", 30.0, body)


def s3_keys(enclave: AwsEnclave) -> list[str]:
    resp = enclave.s3.list_objects_v2(Bucket=enclave.names.bucket)
    return [o["Key"] for o in resp.get("Contents", [])]


# ------------------------------------------------------------------- configuration


def test_open_enclave_selects_aws_with_region_and_endpoint(monkeypatch):
    with aws_moto.fake_aws_env():
        e = open_enclave("aws://lab-1?region=eu-west-1&endpoint_url=http://127.0.0.1:5000")
        try:
            assert isinstance(e, AwsEnclave)
            assert (e.name, e.region, e.endpoint_url) == (
                "lab-1",
                "eu-west-1",
                "http://127.0.0.1:5000",
            )
            assert e.sqs.meta.endpoint_url == "http://127.0.0.1:5000"
            assert e.sqs.meta.region_name == "eu-west-1"
            # the URL names the same enclave in another process (a node the executor starts)
            again = open_enclave(e.url)
            assert (again.name, again.region, again.endpoint_url) == (
                e.name,
                e.region,
                e.endpoint_url,
            )
            again.close()
            # throttling and 5xx: botocore's retries
            assert e.dynamodb.meta.config.retries == {"mode": "standard", "total_max_attempts": 10}
        finally:
            e.close()
        monkeypatch.setenv("KOTTA_AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
        monkeypatch.setenv("KOTTA_ENCLAVE", "aws://lab-2?retry_mode=adaptive&max_attempts=4")
        e = open_enclave(None)
        assert (e.name, e.region, e.endpoint_url) == ("lab-2", "us-east-1", "http://127.0.0.1:4566")
        assert e.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}
        e.close()


@pytest.mark.parametrize(
    "url",
    ["aws://Bad_Name", "aws://", "aws://-x", "aws://x?colour=red", "aws://x?retry_mode=sometimes",
     # botocore's own InvalidMaxRetryAttemptsError, a traceback from `kotta`
     "aws://x?max_attempts=0", "aws://x?max_attempts=-3",
     # read by int() as 10, 3 and 2: not what a URL's reader sees
     "aws://x?max_attempts=1_0", "aws://x?max_attempts=%D9%A3", "aws://x?max_attempts=2.5",
     # taken as off, silently: queues were not made, and the first send said to bootstrap
     "aws://x?create_queues=yes-please", "aws://x?create_queues=on",
     # the path was dropped, silently: this opened the enclave x
     "aws://x/prod", "aws://x/y?region=us-east-1",
     # and so was a fragment
     "aws://x#prod", "aws://x?region=us-east-1#eu-west-1",
     # the last one was taken, silently: which did the user mean?
     "aws://x?region=us-east-1&region=eu-west-1", "aws://x?bucket=a-b-c&bucket=d-e-f"],
)
def test_bad_enclave_urls_are_configuration_errors(url):
    with aws_moto.fake_aws_env(), pytest.raises(ConfigurationError):
        open_enclave(url)


@pytest.mark.parametrize("attempts", [2.5, True, "1_0", " 3"])
def test_max_attempts_that_is_not_a_whole_number_as_written_is_refused(attempts):
    """AwsEnclave(max_attempts=2.5) used 2, and "1_0" 10."""
    from kotta_executor.backends.aws import AwsEnclave

    with aws_moto.fake_aws_env(), pytest.raises(ConfigurationError, match="max_attempts"):
        AwsEnclave("lab", max_attempts=attempts)


@pytest.mark.parametrize(
    "url,part",
    [
        # botocore's InvalidRegionError, from the enclave's constructor
        ("aws://x?region=us_east_1!", "region='us_east_1!'"),
        # no AWS region at all: its endpoints are not there (after a minute of retries,
        # botocore's EndpointConnectionError from the first call)
        ("aws://x?region=mars-north-1", "region='mars-north-1'"),
        ("aws://x?region=us-east1", "region='us-east1'"),
        # shaped like an AWS region, but none: a minute of botocore's connect retries, then
        # EndpointUnreachable from the first call
        ("aws://x?region=us-east-9", "region='us-east-9'"),
        ("aws://x?region=eu-norht-1", "region='eu-norht-1'"),
        ("aws://x?region=aws-global", "region='aws-global'"),  # (botocore's pseudo-region)
        # botocore's ValueError "Invalid endpoint: 127.0.0.1:1", naming no parameter
        ("aws://x?endpoint_url=127.0.0.1:1", "endpoint_url='127.0.0.1:1'"),
        # botocore's HTTPClientError "Not supported URL scheme ftp", after 30 s of retries
        ("aws://x?endpoint_url=ftp://127.0.0.1:1", "endpoint_url='ftp://127.0.0.1:1'"),
        ("aws://x?endpoint_url=http://[::1", "endpoint_url='http://[::1'"),
    ],
)
def test_a_bad_region_or_endpoint_is_a_configuration_error_at_open_naming_it(url, part):
    with aws_moto.fake_aws_env(), pytest.raises(ConfigurationError) as info:
        open_enclave(url)
    assert part in str(info.value)
    if "endpoint_url" in url:  # connect() checks it at once, opening nothing
        from kotta_executor.backends import check_spec

        with pytest.raises(ConfigurationError, match=re.escape(part)):
            check_spec(url)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:1\n", " http://127.0.0.1:1",
                                      "http://127.0.0.1:1/\t", "http://127.0.0.1:1\r\n"])
def test_a_kotta_aws_endpoint_url_with_a_blank_is_refused_naming_it(endpoint, monkeypatch):
    """``export KOTTA_AWS_ENDPOINT_URL=$(cat file)`` can leave a newline: botocore's bare
    ValueError "Invalid endpoint" named no variable (and one beginning with a blank was
    taken).  Refused as any endpoint it would fail on, naming where it came from."""
    with aws_moto.fake_aws_env():
        monkeypatch.setenv("KOTTA_AWS_ENDPOINT_URL", endpoint)
        for make in (lambda: AwsEnclave("lab", max_attempts=1),
                     lambda: aws_provision.bootstrap("lab")):
            with pytest.raises(ConfigurationError, match=re.escape(
                    f"invalid endpoint_url={endpoint!r} (from KOTTA_AWS_ENDPOINT_URL)")):
                make()


@pytest.mark.parametrize(
    "url",
    ["aws://x?region=us-east-1", "aws://x?region=eu-west-2", "aws://x?region=us-gov-west-1",
     "aws://x?region=cn-north-1", "aws://x?region=ap-southeast-5",
     # an emulator or a private endpoint takes any region name
     "aws://x?region=us-east-9&endpoint_url=http://127.0.0.1:1",
     "aws://x?region=mars-north-1&endpoint_url=http://127.0.0.1:1"],
)
def test_a_known_region_or_any_region_with_an_endpoint_opens(url):
    with aws_moto.fake_aws_env():
        open_enclave(url).close()  # (opening makes no AWS call)


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"])
def test_any_region_opens_with_boto3s_own_endpoint_setting(monkeypatch, variable):
    """boto3 takes an emulator's endpoint from AWS_ENDPOINT_URL (or a service's own, and
    ~/.aws/config): its region need be no AWS region, as with ?endpoint_url=, but was
    refused as one.  Only what goes to AWS's own endpoints is checked."""
    with aws_moto.fake_aws_env():
        monkeypatch.setenv(variable, "http://127.0.0.1:1")
        if variable == "AWS_ENDPOINT_URL":
            open_enclave("aws://x?region=mars-north-1").close()  # (opening makes no call)
        else:  # S3 and DynamoDB would still go to AWS's endpoints of that region
            with pytest.raises(ConfigurationError, match="region='mars-north-1'"):
                open_enclave("aws://x?region=mars-north-1")


def test_a_bad_endpoint_from_the_environment_says_where_it_came_from(monkeypatch):
    with aws_moto.fake_aws_env():
        monkeypatch.setenv("KOTTA_AWS_ENDPOINT_URL", "localhost:4566")
        with pytest.raises(ConfigurationError, match="from KOTTA_AWS_ENDPOINT_URL"):
            open_enclave("aws://x")


def _closed_port():
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_an_endpoint_that_cannot_be_reached_is_a_configuration_error_naming_it(monkeypatch):
    """An endpoint nothing answers at (a closed port, a wrong host) raised botocore's
    EndpointConnectionError from deep inside the first call, and a first KottaExecutor
    on it said "no kotta token ...: ask an admin" (the enclave key, unreadable, taken for
    a key the caller may not read)."""
    from kotta_executor import KottaExecutor

    sock, port = _closed_port()
    url = f"aws://lab?endpoint_url=http://127.0.0.1:{port}&max_attempts=1"
    with sock, aws_moto.fake_aws_env():
        e = open_enclave(url)
        try:
            with pytest.raises(ConfigurationError, match=f"endpoint_url='http://127.0.0.1:{port}'"):
                e.queue.depth("test")
        finally:
            e.close()
        with pytest.raises(ConfigurationError, match=f"endpoint_url='http://127.0.0.1:{port}'"):
            KottaExecutor(enclave=url, start_node=False)


def test_a_connection_failure_after_the_endpoint_answered_is_a_passing_fault(moto_env, name):
    """Once the endpoint has answered, a failed connection is the network's passing fault
    (tried again by the executor and the node), not a wrong setting."""
    from botocore.exceptions import EndpointConnectionError

    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)

    def unreachable(request=None, **_):
        raise EndpointConnectionError(endpoint_url=request.url)

    e = AwsEnclave(name, session=moto_env, max_attempts=1)
    try:
        e.sqs.meta.events.register_first("before-send.sqs", unreachable)
        with pytest.raises(ConfigurationError, match="region='us-east-1'"):
            e.queue.depth("test")  # never answered: the region is named
        e.sqs.meta.events.unregister("before-send.sqs", unreachable)
        assert e.queue.depth("test") == 0
        e.sqs.meta.events.register_first("before-send.sqs", unreachable)
        with pytest.raises(EndpointConnectionError):
            e.queue.depth("production")
    finally:
        e.sqs.meta.events.unregister("before-send.sqs", unreachable)
        e.close()


def _no_aws_config(monkeypatch, *, region: bool, credentials: bool):
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    if region:
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.mark.parametrize(
    "region,credentials,named",
    [
        (False, True, ["region"]),
        (True, False, ["credentials"]),
        (False, False, ["region", "credentials"]),
    ],
)
def test_missing_region_or_credentials_is_one_clear_error_at_open(
    monkeypatch, region, credentials, named
):
    _no_aws_config(monkeypatch, region=region, credentials=credentials)
    with pytest.raises(ConfigurationError) as info:
        open_enclave("aws://lab")
    message = str(info.value)
    for what in named:  # (it read "AWS a region (...) and credentials (...) missing")
        assert f"no AWS {what} (" in message
    for what in {"region", "credentials"} - set(named):
        assert f"{what} (" not in message
    assert "'lab'" in message
    # the executor opens its enclave in its constructor: nothing is ever sent
    from kotta_executor import KottaExecutor

    with pytest.raises(ConfigurationError):
        KottaExecutor(1, enclave="aws://lab")


def test_a_region_in_the_url_is_enough(monkeypatch):
    _no_aws_config(monkeypatch, region=False, credentials=True)
    e = open_enclave("aws://lab?region=ap-south-1")
    assert e.region == "ap-south-1"
    e.close()


def test_missing_resources_say_to_run_bootstrap(moto_env, name):
    e = AwsEnclave(name, session=moto_env)  # opening calls nothing
    for call in (
        lambda: e.queue.send("test", [Message("a" * 32, b"x")]),
        lambda: e.queue.receive("test", 1, 30, "h"),
        lambda: e.queue.depth("production"),
        lambda: e.jobs.create([new_job()]),
        lambda: e.jobs.get("a" * 32),
        lambda: e.nodes.live(),
        lambda: e.blobs.put("k", b"x"),
    ):
        with pytest.raises(EnclaveNotProvisioned, match=f"kotta aws bootstrap {name}"):
            call()
    # a reply channel not opened (or closed already) is empty, not an error
    assert e.queue.take("reply.c0ffee", 10) == []
    e.close()


def test_an_executor_on_an_enclave_never_bootstrapped_says_to_run_bootstrap(moto_env, name):
    """A first KottaExecutor on an enclave that is not there (never bootstrapped, or a
    misspelt name) said "no kotta token ...: ask an admin of the enclave for a registration
    token": looking for the enclave key, it took the missing bucket for a key it may not
    read.  It is EnclaveNotProvisioned, as docs/aws.md says, naming the command."""
    from kotta_executor import KottaExecutor

    e = AwsEnclave(name, session=moto_env)
    with pytest.raises(EnclaveNotProvisioned, match=f"kotta aws bootstrap {name}"):
        KottaExecutor(enclave=e, start_node=False)
    e.close()


def test_only_the_provisioned_queues_exist_without_create_queues(enclave):
    assert enclave.queue.depth("test") == 0 and enclave.queue.depth("production") == 0
    with pytest.raises(EnclaveNotProvisioned, match="kotta-.*-gpu"):
        enclave.queue.depth("gpu")


def test_whole_seconds_round_up():
    assert [_whole_seconds(x) for x in (0, 0.01, 0.3, 1, 1.2, 30, 1e9)] == [
        0,
        1,
        1,
        1,
        2,
        30,
        43_200,
    ]
    assert [_wait(x) for x in (0, 0.2, 2, 5.5, 60)] == [0, 1, 2, 6, 20]


# --------------------------------------------------------------------------- queue


def test_receive_uses_batches_of_ten_with_receive_counts(enclave):
    names = [uuid.uuid4().hex for _ in range(25)]
    enclave.queue.depth("test")  # looks the queue's URL up once
    calls = Calls(enclave)
    enclave.queue.send("test", [Message(n, n.encode()) for n in names])
    assert calls.counts() == {"SendMessageBatch": 3}
    calls.reset()
    got = enclave.queue.receive("test", 25, 5, "h")  # (held across three calls)
    assert sorted(d.job_id for d in got) == sorted(names)
    assert all(d.body == d.job_id.encode() and d.receive_count == 1 for d in got)
    assert calls.counts() == {"ReceiveMessage": 3}
    # receipts are self-contained: queue, SQS receipt handle
    sqs_name, handle = got[0].receipt.split(" ")
    assert sqs_name == enclave.names.queue("test") and handle
    calls.reset()
    enclave.queue.extend(got, 60)
    enclave.queue.ack(got[:12])  # ten at once, two wait for company (delete_linger)
    assert calls.counts() == {"ChangeMessageVisibilityBatch": 3, "DeleteMessageBatch": 1}
    enclave.queue.flush()
    assert calls.counts() == {"ChangeMessageVisibilityBatch": 3, "DeleteMessageBatch": 2}
    assert enclave.queue.depth("test") == 13


def test_empty_long_poll_returns_nothing(enclave):
    enclave.queue.depth("test")
    calls = Calls(enclave)
    assert enclave.queue.receive("test", 10, 30, "h", wait_seconds=0.2) == []
    assert calls.counts() == {"ReceiveMessage": 1}


def test_long_poll_returns_when_a_message_arrives(enclave):
    got: list = []
    poller = threading.Thread(
        target=lambda: got.extend(enclave.queue.receive("test", 10, 30, "h", wait_seconds=20))
    )
    poller.start()
    enclave.queue.send("test", [Message("a" * 32, b"hello")])
    poller.join(GUARD)
    assert not poller.is_alive()
    assert [(d.job_id, d.body) for d in got] == [("a" * 32, b"hello")]


def test_large_bodies_travel_through_s3(enclave, monkeypatch):
    monkeypatch.setattr(SqsQueue, "max_body", 1000)
    small, large, larger = b"s" * 100, os.urandom(5000), os.urandom(9000)
    enclave.queue.send(
        "test", [Message("a" * 32, small), Message("b" * 32, large), Message("c" * 32, larger)]
    )
    assert len(s3_keys(enclave)) == 2
    got = {d.job_id: d for d in enclave.queue.receive("test", 10, 30, "h")}
    assert [got[j * 32].body for j in "abc"] == [small, large, larger]
    # dead-lettered: the blob stays for the dead letter; acknowledged: it goes
    enclave.queue.dead_letter([got["c" * 32]], "poison")
    enclave.queue.ack([got["a" * 32], got["b" * 32]])
    enclave.queue.flush()
    [key] = s3_keys(enclave)
    assert key.startswith("blobs/msg-")
    [dead] = enclave.queue.dead_letters("test")
    assert (dead["job_id"], dead["reason"]) == ("c" * 32, "poison")
    # replies too, and take() deletes their blobs
    enclave.queue.open_reply("cafe")
    enclave.queue.send("reply.cafe", [Message("d" * 32, large)])
    assert enclave.queue.take("reply.cafe", 10) == [Message("d" * 32, large)]
    enclave.queue.flush()
    assert s3_keys(enclave) == [key]


def test_listing_dead_letters_does_not_download_their_bodies(enclave, monkeypatch):
    """`kotta dead-letters` (and `kotta prune`, reading a queue's dead letters) fetched
    the body in S3 of every dead letter that had one, up to 1,000 of about 1 MiB or more
    each, to show a job id and a reason.  Only the messages are read; prune still deletes
    a pruned dead letter's body."""
    monkeypatch.setattr(SqsQueue, "max_body", 1000)
    jobs = [f"{i:032x}" for i in range(3)]
    enclave.queue.send("test", [Message(j, os.urandom(5000)) for j in jobs])
    enclave.queue.dead_letter(enclave.queue.receive("test", 3, 30, "h"), "poison")
    assert len(s3_keys(enclave)) == 3
    calls = Calls(enclave)
    assert sorted(d["job_id"] for d in enclave.queue.dead_letters("test")) == jobs
    assert enclave.queue.drop_dead_letters("test", {jobs[0]}) == 1
    assert calls.counts()["GetObject"] == 0, calls.counts()
    assert len(s3_keys(enclave)) == 2


def test_acks_wait_briefly_to_share_a_delete_call(enclave):
    enclave.queue.send("test", [Message(f"{i:032x}", b"x") for i in range(3)])
    got = enclave.queue.receive("test", 3, 30, "h")
    calls = Calls(enclave)
    enclave.queue.ack(got[:1])
    enclave.queue.ack(got[1:])
    assert calls.ops == []  # nothing yet: acknowledged messages stay invisible meanwhile
    assert enclave.queue.receive("test", 3, 30, "h") == []
    # (done, not begun: CI once read the depth while the delete was still on its way)
    wait_for(lambda: "DeleteMessageBatch" in calls.done, what="the deferred DeleteMessageBatch")
    assert calls.counts() == {"ReceiveMessage": 1, "DeleteMessageBatch": 1}
    assert enclave.queue.depth("test") == 0


def test_replies_wait_briefly_to_share_a_send_call(enclave):
    enclave.queue.open_reply("abcd")
    calls = Calls(enclave)
    enclave.queue.send("reply.abcd", [Message("a" * 32, b"1")])
    enclave.queue.send("reply.abcd", [Message("b" * 32, b"2")])
    assert calls.ops == []
    wait_for(lambda: calls.done, what="the deferred SendMessageBatch")
    assert calls.ops == ["SendMessageBatch"]
    # in the sending process, a read of the queue sends what waits first
    enclave.queue.send("reply.abcd", [Message("c" * 32, b"3")])
    assert [m.job_id for m in enclave.queue.take("reply.abcd", 10)] == [
        "a" * 32,
        "b" * 32,
        "c" * 32,
    ]
    # and closing the enclave sends and deletes what waits
    enclave.queue.send("reply.abcd", [Message("d" * 32, b"4")])
    enclave.close()
    other = AwsEnclave(enclave.name, session=enclave.session)
    assert other.queue.take("reply.abcd", 10) == [Message("d" * 32, b"4")]
    other.queue.close()
    assert other.queue.depth("reply.abcd") == 0


def test_sqs_redrive_moves_a_task_to_its_dead_letter_queue(moto_env, name):
    aws_provision.bootstrap(name, iam=False, tls_only=False, max_receive_count=2, session=moto_env)
    e = AwsEnclave(name, session=moto_env)
    e.queue.send("test", [Message("a" * 32, b"crashes its node")])
    for count in (1, 2):
        [d] = e.queue.receive("test", 1, 30, "h")
        assert d.receive_count == count
        e.queue.release([d])
    assert e.queue.receive("test", 1, 30, "h") == []  # the third receive redrives it
    assert e.queue.depth("test") == 0
    [dead] = e.queue.dead_letters("test")
    assert dead["job_id"] == "a" * 32 and "redriven by SQS" in dead["reason"]
    assert e.queue.dead_letters("production") == []
    e.close()


def test_dead_letters_are_listed_without_being_consumed(enclave):
    enclave.queue.send("test", [Message(f"{i:032x}", b"x") for i in range(12)])
    got = enclave.queue.receive("test", 12, 30, "h")
    enclave.queue.dead_letter(got, "a reason\nover two lines")
    dlq = enclave.names.dlq(enclave.names.queue("test"))
    for _ in range(2):
        listed = enclave.queue.dead_letters("test")
        assert sorted(d["job_id"] for d in listed) == sorted(d.job_id for d in got)
        assert {d["reason"] for d in listed} == {"a reason\nover two lines"}
        assert {d["receive_count"] for d in listed} == {1}
        url = enclave.sqs.get_queue_url(QueueName=dlq)["QueueUrl"]
        attrs = enclave.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "12"  # visible again at once


def _sqs_size(entries: list[dict]) -> int:
    """A SendMessageBatch's size as SQS counts it against its limit: the UTF-8 bytes of
    the bodies and of the attributes' names, types and values."""
    return sum(
        len(e["MessageBody"].encode())
        + sum(len(k.encode()) + len(v["DataType"].encode()) + len(v["StringValue"].encode())
              for k, v in (e.get("MessageAttributes") or {}).items())
        for e in entries
    )


def test_dead_letters_with_a_long_non_ascii_reason_fit_sqs_batch_limit(enclave):
    """moto counts a batch's bodies in characters (and not the attributes): SQS counts
    bytes, bodies and attributes.  Two large tasks dead-lettered with a reason of 4,000
    four-byte characters came to 1,042,000 characters but 1,066,000 bytes in one call,
    which SQS refuses (BatchRequestTooLong, taken for a queue too small for kotta)."""
    batches: list[list[dict]] = []
    enclave.sqs.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch",
        lambda params, **_: batches.append(params["Entries"]),
    )
    jobs = [f"{i:032x}" for i in range(2)]
    enclave.queue.send("test", [Message(j, bytes(388_000)) for j in jobs])
    got = enclave.queue.receive("test", 2, 30, "h")
    assert len(got) == 2
    reason = "\U0001f525" * 4000
    batches.clear()
    enclave.queue.dead_letter(got, reason)
    assert batches and all(_sqs_size(b) <= SQS_LIMIT for b in batches), [
        _sqs_size(b) for b in batches]
    listed = enclave.queue.dead_letters("test")
    assert sorted(d["job_id"] for d in listed) == jobs
    assert {d["reason"] for d in listed} == {reason}


def test_an_empty_short_poll_does_not_end_the_dead_letter_listing(enclave, monkeypatch):
    """A short poll asks only some of SQS's servers: it may answer empty while messages
    are there (moto always asks all of them; the filter below answers as SQS may)."""
    enclave.queue.send("test", [Message(f"{i:032x}", b"x") for i in range(12)])
    got = enclave.queue.receive("test", 12, 30, "h")
    enclave.queue.dead_letter(got, "dead")
    real = enclave.sqs.receive_message
    short_polls = []

    def sampled(**kw):
        if not kw.get("WaitTimeSeconds"):
            short_polls.append(kw)
            if len(short_polls) > 1:  # the first answers; those after it find nothing
                return {}
        return real(**kw)

    monkeypatch.setattr(enclave.sqs, "receive_message", sampled)
    listed = enclave.queue.dead_letters("test")
    assert len(short_polls) >= 2
    assert sorted(d["job_id"] for d in listed) == sorted(d.job_id for d in got)


def test_failed_batch_entries_are_retried_not_lost(enclave, monkeypatch):
    real = enclave.sqs.send_message_batch
    failures = {"left": 2}

    def flaky(**kw):
        if failures["left"]:
            failures["left"] -= 1
            entries = kw["Entries"]
            kept = real(**{**kw, "Entries": entries[1:]}) if len(entries) > 1 else {}
            kept.setdefault("Failed", []).append(
                {"Id": entries[0]["Id"], "SenderFault": False, "Code": "InternalError"}
            )
            return kept
        return real(**kw)

    monkeypatch.setattr(enclave.sqs, "send_message_batch", flaky)
    names = [uuid.uuid4().hex for _ in range(5)]
    enclave.queue.send("test", [Message(n, b"x") for n in names])
    assert sorted(d.job_id for d in enclave.queue.receive("test", 10, 30, "h")) == sorted(names)


def test_refused_messages_raise(enclave, monkeypatch):
    def refused(**kw):
        return {
            "Failed": [
                {
                    "Id": e["Id"],
                    "SenderFault": True,
                    "Code": "InvalidParameterValue",
                    "Message": "no",
                }
                for e in kw["Entries"]
            ]
        }

    monkeypatch.setattr(enclave.sqs, "send_message_batch", refused)
    with pytest.raises(RuntimeError, match="refused"):
        enclave.queue.send("test", [Message("a" * 32, b"x")])


def test_reply_channels_are_made_and_removed_per_client(enclave):
    sqs_name = enclave.names.queue("reply.f00d")
    assert sqs_name == f"kotta-{enclave.name}-reply-f00d"
    # a reply for a client that is gone (or never opened its channel) is dropped
    enclave.queue.send("reply.f00d", [Message("a" * 32, b"r")])
    assert enclave.queue.depth("reply.f00d") == 0
    assert enclave.queue.open_reply("f00d") == "reply.f00d"
    enclave.queue.send("reply.f00d", [Message("a" * 32, b"r"), Message("b" * 32, b"")])
    assert enclave.queue.take("reply.f00d", 10) == [Message("a" * 32, b"r"), Message("b" * 32, b"")]
    enclave.queue.close_reply("f00d")
    enclave.queue.close_reply("f00d")
    urls = enclave.sqs.list_queues(QueueNamePrefix=sqs_name).get("QueueUrls", [])
    assert urls == []
    enclave.queue.send("reply.f00d", [Message("a" * 32, b"r")])  # dropped, no error


# ---------------------------------------------------------------------------- jobs


def test_create_writes_records_before_messages_in_batches(enclave):
    jobs = [new_job() for _ in range(30)] + [new_job("production")]
    calls = Calls(enclave)
    enclave.jobs.create(jobs)
    assert calls.ops == ["TransactWriteItems"] + ["GetQueueUrl"] + ["SendMessageBatch"] * 3 + [
        "GetQueueUrl",
        "SendMessageBatch",
    ]
    assert enclave.queue.depth("test") == 30 and enclave.queue.depth("production") == 1


def test_create_puts_100_records_a_call(enclave):
    jobs = [new_job() for _ in range(201)]
    calls = Calls(enclave)
    enclave.jobs.create(jobs, enqueue=False)
    assert calls.ops == ["TransactWriteItems"] * 3
    assert len(enclave.jobs.get_many([j.job_id for j in jobs])) == 201


def _cancel_first_rounds(enclave, monkeypatch, rounds: int, code: str = "TransactionConflict"):
    """TransactWriteItems: DynamoDB cancels the first ``rounds`` calls whole, each put
    with ``code`` (as it does when another write to an item is under way)."""
    from botocore.exceptions import ClientError

    real = enclave.dynamodb.transact_write_items
    seen = []

    def cancelled(TransactItems, **kw):
        seen.append(len(TransactItems))
        if len(seen) <= rounds:
            raise ClientError({
                "Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
                "CancellationReasons": [{"Code": code}] * len(TransactItems),
            }, "TransactWriteItems")
        return real(TransactItems=TransactItems, **kw)

    monkeypatch.setattr("kotta_executor.backends.aws._backoff", lambda attempt: None)
    monkeypatch.setattr(enclave.dynamodb, "transact_write_items", cancelled)
    return seen


def test_create_cancelled_by_a_conflict_is_tried_again(enclave, monkeypatch):
    seen = _cancel_first_rounds(enclave, monkeypatch, 2)
    jobs = [new_job(), new_job()]
    enclave.jobs.create(jobs)
    assert seen == [2, 2, 2]
    assert {r.state for r in enclave.jobs.get_many([j.job_id for j in jobs]).values()} == {
        JobState.PENDING}
    assert enclave.queue.depth("test") == 2


def test_create_that_dynamodb_keeps_cancelling_raises_and_sends_nothing(enclave, monkeypatch):
    _cancel_first_rounds(enclave, monkeypatch, 1000, code="ThrottlingError")
    job = new_job()
    with pytest.raises(RuntimeError, match="DynamoDB did not accept 1 job records"):
        enclave.jobs.create([job])
    assert enclave.jobs.get(job.job_id) is None
    assert enclave.queue.depth("test") == 0  # never a task without its record


def test_create_that_dynamodb_refuses_for_good_raises_at_once_naming_why(enclave, monkeypatch):
    seen = _cancel_first_rounds(enclave, monkeypatch, 1000, code="ValidationError")
    job = new_job()
    with pytest.raises(RuntimeError, match="DynamoDB refused job records: ValidationError"):
        enclave.jobs.create([job])
    assert seen == [1]  # not tried again
    assert enclave.queue.depth("test") == 0


def test_transition_is_one_conditional_update_per_job(enclave):
    jobs = [new_job() for _ in range(5)]
    enclave.jobs.create(jobs)
    ids = [j.job_id for j in jobs]
    enclave.jobs.transition(ids[:1], JobState.CANCELLED)
    calls = Calls(enclave)
    moved = enclave.jobs.transition(ids, JobState.PROCESSING, node="n1")
    assert moved == ids[1:]
    assert calls.counts() == {"UpdateItem": 5}
    rec = enclave.jobs.get(ids[1])
    assert (rec.node, rec.attempts, rec.state) == ("n1", 1, JobState.PROCESSING)


def test_second_finish_is_rejected_by_the_condition(enclave):
    job = new_job()
    enclave.jobs.create([job])
    enclave.jobs.transition([job.job_id], JobState.PROCESSING, node="n1")
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, b"one")]) == [job.job_id]
    calls = Calls(enclave)
    assert enclave.jobs.finish([Finished(job.job_id, JobState.FAILED, b"two", "dup")]) == []
    assert calls.counts() == {"UpdateItem": 1}
    rec = enclave.jobs.get(job.job_id, with_result=True)
    assert (rec.state, rec.result, rec.reason) == (JobState.COMPLETED, b"one", None)


def test_large_results_go_to_s3_and_a_losing_finish_leaves_nothing(enclave, monkeypatch):
    monkeypatch.setattr(DynamoJobs, "max_result", 1000)
    job = new_job()
    enclave.jobs.create([job])
    enclave.jobs.transition([job.job_id], JobState.PROCESSING, node="n1")
    first, second = os.urandom(3000), os.urandom(3000)
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, first)]) == [job.job_id]
    assert enclave.jobs.finish([Finished(job.job_id, JobState.COMPLETED, second)]) == []
    [key] = s3_keys(enclave)
    assert key.startswith(f"blobs/result-{job.job_id}-")
    assert enclave.jobs.get(job.job_id, with_result=True).result == first
    item = enclave.dynamodb.get_item(
        TableName=enclave.names.jobs_table, Key={"job_id": {"S": job.job_id}}
    )["Item"]
    assert "result" not in item and item["result_ref"]["S"] == key[len("blobs/") :]


def test_delete_removes_records_and_their_blobs(enclave, monkeypatch):
    monkeypatch.setattr(DynamoJobs, "max_result", 1000)
    jobs = [new_job() for _ in range(3)]
    enclave.jobs.create(jobs)
    ids = [j.job_id for j in jobs]
    enclave.blobs.put(f"args-{ids[0]}", b"big arguments")
    enclave.jobs.transition(ids[:1], JobState.PROCESSING, node="n1")
    enclave.jobs.finish([Finished(ids[0], JobState.COMPLETED, os.urandom(2000))])
    enclave.blobs.put("unrelated", b"x")
    assert len(s3_keys(enclave)) == 3
    enclave.jobs.delete(ids[:2])
    assert set(enclave.jobs.get_many(ids)) == {ids[2]}
    assert s3_keys(enclave) == ["blobs/unrelated"]


def test_list_queries_the_owner_index_and_scans_for_everyone(enclave):
    jobs = [new_job(owner="alice") for _ in range(3)] + [new_job(owner="bob")]
    for j in jobs:
        enclave.jobs.create([j])
    calls = Calls(enclave)
    assert [r.job_id for r in enclave.jobs.list(owner="alice", limit=2)] == [
        jobs[2].job_id,
        jobs[1].job_id,
    ]
    assert calls.counts() == {"Query": 1}
    calls.reset()
    assert [r.job_id for r in enclave.jobs.list()] == [j.job_id for j in reversed(jobs)]
    assert calls.counts() == {"Scan": 1}


def test_kill_requests(enclave):
    a, b = new_job(), new_job()
    enclave.jobs.create([a, b])
    enclave.jobs.transition([a.job_id, b.job_id], JobState.PROCESSING, node="n1")
    enclave.jobs.finish([Finished(b.job_id, JobState.COMPLETED, b"done")])
    assert enclave.jobs.request_kill(a.job_id) is True  # (a pending one is cancelled)
    assert enclave.jobs.request_kill(b.job_id) is False
    assert enclave.jobs.request_kill("f" * 32) is False
    assert enclave.jobs.kill_requested([a.job_id, b.job_id, "f" * 32]) == {a.job_id}



def test_a_kill_of_a_job_handed_back_between_its_two_writes_cancels_it(enclave):
    """request_kill cancels a pending job, and flags one a node has started: two writes
    (DynamoDB).  A stopping node that handed the job back (never begun: pending) between
    them had the second flag it, pending: the next node, which looks for the kill requests
    of a first delivery only as it runs it, ran it (a short one to its end) though kill()
    said True.  Now a pending job is never flagged: its cancel is tried again.  (The
    hand-back is made as the flag is about to be written, by botocore's event.)"""
    a = new_job()
    enclave.jobs.create([a])
    assert enclave.jobs.transition([a.job_id], JobState.PROCESSING, node="n1")
    handed: list[str] = []

    def hand_back(params, **_):
        if "kill_requested = :t" in params.get("UpdateExpression", "") and not handed:
            handed.extend(enclave.jobs.transition(
                [a.job_id], JobState.PENDING, from_states={JobState.PROCESSING}, node="n1",
                held_by="n1"))

    enclave.dynamodb.meta.events.register("provide-client-params.dynamodb.UpdateItem",
                                          hand_back)
    assert enclave.jobs.request_kill(a.job_id) is True
    assert handed == [a.job_id]
    job = enclave.jobs.get(a.job_id)
    assert (job.state, job.reason) == (JobState.CANCELLED, KILLED_PENDING)


# --------------------------------------------------------------------------- nodes


def test_nodes_are_live_by_heartbeat_only(enclave):
    import time

    dead_pid = NodeInfo("n-remote", "test", "elsewhere", pid=999_999, workers=4)
    stale = NodeInfo("n-stale", "test", "elsewhere", pid=1, workers=1, heartbeat=time.time() - 31)
    enclave.nodes.register(dead_pid)
    enclave.nodes.register(stale)
    # no pid checks: the node runs on another machine
    assert [n.node_id for n in enclave.nodes.live("test")] == ["n-remote"]
    enclave.nodes.heartbeat("n-stale")
    assert {n.node_id for n in enclave.nodes.live()} == {"n-remote", "n-stale"}
    enclave.nodes.deregister("n-remote")
    enclave.nodes.heartbeat("n-remote")  # does not bring it back
    assert [n.node_id for n in enclave.nodes.live()] == ["n-stale"]


def test_live_is_cached_briefly(enclave):
    enclave.nodes.register(NodeInfo("n1", "test", "h", 1, 1))
    calls = Calls(enclave)
    for _ in range(5):
        assert [n.node_id for n in enclave.nodes.live("test")] == ["n1"]
    assert calls.counts() == {"Scan": 1}


# ---------------------------------------------------------------------- provisioning


def test_bootstrap_is_idempotent_and_makes_what_it_plans(moto_env, name):
    lines: list[str] = []
    first = aws_provision.bootstrap(name, session=moto_env, out=lines.append)
    assert first.resources == aws_provision.planned(name)
    assert set(first.created) == first.resources and not first.existing
    assert lines[-1] == f"enclave URL: aws://{name}?region=us-east-1"
    again = aws_provision.bootstrap(name, session=moto_env)
    assert set(again.existing) == first.resources and not again.created

    n = Names(name)
    sqs, s3 = moto_env.client("sqs"), moto_env.client("s3")
    url = sqs.get_queue_url(QueueName=n.queue("test"))["QueueUrl"]
    redrive = json.loads(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"][
            "RedrivePolicy"
        ]
    )
    assert redrive["deadLetterTargetArn"].endswith(f":{n.queue('test')}-dlq")
    assert int(redrive["maxReceiveCount"]) == 10
    block = s3.get_public_access_block(Bucket=n.bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    rules = s3.get_bucket_encryption(Bucket=n.bucket)["ServerSideEncryptionConfiguration"]
    assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    policy = json.loads(s3.get_bucket_policy(Bucket=n.bucket)["Policy"])
    assert policy["Statement"][0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    iam = moto_env.client("iam")
    doc = iam.get_role_policy(RoleName=n.node_role, PolicyName=n.node_role)["PolicyDocument"]
    doc = doc if isinstance(doc, dict) else json.loads(doc)
    resources = json.dumps([s["Resource"] for s in doc["Statement"]])
    assert "*" not in resources.replace(f"{n.reply_prefix}*", "").replace("blobs/*", "").replace(
        f"{n.user_role_prefix}*", ""
    ).replace("/held/*", "")
    profile = iam.get_instance_profile(InstanceProfileName=n.node_role)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [n.node_role]
    ddb = moto_env.client("dynamodb")
    table = ddb.describe_table(TableName=n.jobs_table)["Table"]
    [gsi] = table["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == "owner-created"
    assert sorted(gsi["Projection"]["NonKeyAttributes"]) == sorted(INDEX_ATTRS)
    ttl = ddb.describe_time_to_live(TableName=n.nodes_table)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expires"


def test_bootstrap_raises_a_queues_message_size_to_what_the_backend_sends(moto_env, name):
    """The backend sends bodies up to about 1 MiB inline (SqsQueue.max_body), SQS's limit
    since 2025; a queue made before, or set lower, takes 256 KiB.  A task of 200 KB, its
    body about 270 KB in base64, was refused (InvalidParameterValue) and failed; running
    bootstrap again, which repairs an enclave, left the queue as it was."""
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    n = Names(name)
    sqs = moto_env.client("sqs")
    urls = [sqs.get_queue_url(QueueName=q)["QueueUrl"]
            for q in (n.queue("test"), n.dlq(n.queue("test")))]
    for url in urls:  # as a queue made before 2025 has it
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "262144"})
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    for url in urls:
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
        assert attrs["Attributes"]["MaximumMessageSize"] == "1048576"
    e = AwsEnclave(name, session=moto_env)
    try:
        e.queue.send("test", [Message("j1", os.urandom(200_000))])
        assert e.queue.depth("test") == 1
        # a reply queue, made by the client, takes as much
        reply = e.queue.open_reply("client-1")
        url = sqs.get_queue_url(QueueName=n.queue(reply))["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
        assert attrs["Attributes"]["MaximumMessageSize"] == "1048576"
    finally:
        e.close()


def test_teardown_removes_everything_and_only_that(moto_env, name):
    aws_provision.bootstrap(name, session=moto_env, tls_only=False)  # moto has no TLS
    neighbour = f"{name}-x"  # its names start with this enclave's
    aws_provision.bootstrap(neighbour, iam=False, session=moto_env)
    e = AwsEnclave(name, session=moto_env)
    e.queue.open_reply("beef")
    e.blobs.put("payload-x", b"x")
    e.jobs.create([new_job()])
    e.close()
    report = aws_provision.teardown(name, session=moto_env)
    assert set(report.deleted) == aws_provision.planned(name) - {
        (aws_provision.BUCKET_POLICY, Names(name).bucket)
    } | {(aws_provision.QUEUE, f"kotta-{name}-reply-beef")}
    assert aws_provision.teardown(name, session=moto_env).deleted == []
    with pytest.raises(EnclaveNotProvisioned):
        AwsEnclave(name, session=moto_env).queue.depth("test")
    other = AwsEnclave(neighbour, session=moto_env)
    assert other.queue.depth("test") == 0 and other.jobs.list() == []


def test_teardown_names_the_objects_s3_would_not_delete(moto_env, name):
    """DeleteObjects answers 200 with an ``Errors`` list for the objects it did not delete
    (a bucket policy's Deny, object lock): teardown ignored it and failed at DeleteBucket
    with a raw BucketNotEmpty.  It now names the bucket and the objects, with S3's reason."""
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    bucket = Names(name).bucket
    s3 = moto_env.client("s3")
    for key in ("blobs/a", "keep/x", "keep/y"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
                       "Resource": f"arn:aws:s3:::{bucket}/keep/*"}]}))
    with pytest.raises(ConfigurationError) as info:
        aws_provision.teardown(name, session=moto_env)
    text = str(info.value)
    assert bucket in text and "keep/x" in text and "keep/y" in text, text
    assert "AccessDenied" in text and "2 object" in text, text
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["keep/x", "keep/y"]  # (the others went)


def test_teardown_empties_a_versioned_bucket(moto_env, name):
    """A bucket with versioning on (an existing --bucket, or turned on by an admin) kept
    every object as a noncurrent version under a delete marker: teardown failed at
    DeleteBucket with a raw BucketNotEmpty, the queues gone, the tables and role left."""
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    bucket = Names(name).bucket
    s3 = moto_env.client("s3")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"1", b"2"):
        s3.put_object(Bucket=bucket, Key="blobs/a", Body=body)
    s3.put_object(Bucket=bucket, Key="held/j", Body=b"x")
    s3.delete_object(Bucket=bucket, Key="held/j")  # (a delete marker over it)
    report = aws_provision.teardown(name, session=moto_env)
    assert (aws_provision.BUCKET, bucket) in report.deleted
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.mark.parametrize("versioned", [False, True])
def test_teardown_keeps_an_existing_bucket_and_its_other_objects(moto_env, name, versioned):
    """`kotta aws bootstrap NAME --bucket EXISTING` uses a bucket the user already had
    ("exists"); teardown then deleted every object in it (every version) and the bucket
    itself.  It now deletes only kotta's own objects there (blobs/, keys/, held/), keeps
    the bucket, the user's objects and tags, and says so.  A --bucket bootstrap made
    itself (tagged kotta-enclave=NAME) still goes with everything in it."""
    s3 = moto_env.client("s3")
    bucket = f"{name}-shared"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "team", "Value": "x"}]})
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for key in ("data/report.csv", "blobsy/x", "heldout"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"theirs")
    report = aws_provision.bootstrap(name, bucket=bucket, iam=False, tls_only=False,
                                     session=moto_env)
    assert (aws_provision.BUCKET, bucket) in report.existing
    for key in ("blobs/fn-1", "keys/enclave.key", "held/j1", "held/j1"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"ours")
    lines: list[str] = []
    report = aws_provision.teardown(name, bucket=bucket, session=moto_env, out=lines.append)
    assert (aws_provision.BUCKET, bucket) not in report.deleted
    assert (aws_provision.BUCKET, bucket) in report.kept
    said = "\n".join(lines)
    assert f"kept     {aws_provision.BUCKET}" in said and bucket in said, said
    assert "kotta-enclave" in said and "blobs/" in said, said
    left = s3.list_object_versions(Bucket=bucket)
    assert sorted({v["Key"] for v in left.get("Versions", [])} | {
        m["Key"] for m in left.get("DeleteMarkers", [])}) == [
        "blobsy/x", "data/report.csv", "heldout"]
    assert s3.get_bucket_tagging(Bucket=bucket)["TagSet"] == [{"Key": "team", "Value": "x"}]
    # (the rest of the enclave went)
    assert not moto_env.client("sqs").list_queues(QueueNamePrefix=f"kotta-{name}-").get(
        "QueueUrls")

    # a --bucket that bootstrap made: tagged, and deleted whole
    made = f"{name}-made"
    aws_provision.bootstrap(name, bucket=made, iam=False, tls_only=False, session=moto_env)
    assert {"Key": "kotta-enclave", "Value": name} in s3.get_bucket_tagging(
        Bucket=made)["TagSet"]
    s3.put_object(Bucket=made, Key="other/x", Body=b"x")
    report = aws_provision.teardown(name, bucket=made, session=moto_env)
    assert (aws_provision.BUCKET, made) in report.deleted and not report.kept
    assert made not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_teardown_aborts_kottas_unfinished_uploads_in_a_bucket_it_keeps(moto_env, name):
    """A held result's upload in parts left unfinished (its node killed mid-upload): in a
    bucket teardown keeps (an existing --bucket), its parts stayed for good, listed by no
    object listing and billed.  Teardown aborts kotta's own; the user's are left."""
    s3 = moto_env.client("s3")
    bucket = f"{name}-shared"
    s3.create_bucket(Bucket=bucket)
    aws_provision.bootstrap(name, bucket=bucket, iam=False, tls_only=False, session=moto_env)
    for key in ("held/j1", "data/big.csv"):
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x")
    aws_provision.teardown(name, bucket=bucket, session=moto_env)
    left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["data/big.csv"]


def test_teardown_leaves_a_bucket_of_another_enclave_untouched(moto_env, name):
    """`kotta aws teardown lab --bucket kotta-other-blobs` (a slip, or lab bootstrapped
    onto another enclave's bucket) deleted that enclave's bucket with everything in it
    (its blobs, its enclave key, its held results).  A bucket tagged as another enclave's
    is now left as it is, and teardown says so."""
    other = f"{name}-o"
    aws_provision.bootstrap(other, iam=False, tls_only=False, session=moto_env)
    theirs = Names(other).bucket
    s3 = moto_env.client("s3")
    for key in ("blobs/fn-1", "keys/enclave.key", "held/j1"):
        s3.put_object(Bucket=theirs, Key=key, Body=b"theirs")
    lines: list[str] = []
    report = aws_provision.teardown(name, bucket=theirs, session=moto_env, out=lines.append)
    assert (aws_provision.BUCKET, theirs) in report.kept
    assert (aws_provision.BUCKET, theirs) not in report.deleted
    said = "\n".join(lines)
    assert f"kotta-enclave={other}" in said and "nothing in it was deleted" in said, said
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=theirs)["Contents"])
    assert keys == ["blobs/fn-1", "held/j1", "keys/enclave.key"]


@pytest.mark.parametrize("untagged", ["before tags", "tags unreadable"])
def test_teardown_leaves_another_enclaves_untagged_default_bucket_untouched(
        moto_env, name, untagged):
    """`kotta aws teardown lab --bucket kotta-other-blobs`, where the enclave other was
    bootstrapped before buckets were tagged (or teardown may not read the tags:
    GetBucketTagging denied, an emulator without tags): the bucket, untagged as far as
    teardown could see, was taken for an existing one of the user's, and the other
    enclave's blobs/, keys/ and held/ (its enclave key, held results) were deleted.  A
    bucket of another enclave's default name is that enclave's: left untouched."""
    other = f"{name}-o"
    aws_provision.bootstrap(other, iam=False, tls_only=False, session=moto_env)
    theirs = Names(other).bucket
    s3 = moto_env.client("s3")
    if untagged == "before tags":
        s3.delete_bucket_tagging(Bucket=theirs)  # (as bootstrap left it then)
    else:
        from botocore.exceptions import ClientError

        def denied(**_):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}},
                              "GetBucketTagging")
        moto_env.events.register("before-call.s3.GetBucketTagging", denied)
    try:
        for key in ("blobs/fn-1", "keys/enclave.key", "held/j1"):
            s3.put_object(Bucket=theirs, Key=key, Body=b"theirs")
        lines: list[str] = []
        report = aws_provision.teardown(name, bucket=theirs, session=moto_env,
                                        out=lines.append)
        assert (aws_provision.BUCKET, theirs) in report.kept
        said = "\n".join(lines)
        assert other in said and "nothing in it was deleted" in said, said
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=theirs)["Contents"])
        assert keys == ["blobs/fn-1", "held/j1", "keys/enclave.key"]
        with pytest.raises(ConfigurationError) as info:  # (nor shared by bootstrap)
            aws_provision.bootstrap(name, bucket=theirs, iam=False, tls_only=False,
                                    session=moto_env)
        assert theirs in str(info.value) and other in str(info.value), info.value
    finally:  # (the session is the whole process's)
        if untagged != "before tags":
            moto_env.events.unregister("before-call.s3.GetBucketTagging", denied)


def test_bootstrap_refuses_another_enclaves_bucket_before_making_anything(moto_env, name):
    """`kotta aws bootstrap lab --bucket kotta-other-blobs` took the other enclave's bucket
    as lab's ("exists"): the two then shared blobs/, keys/ and held/, and lab's nodes
    deleted, as strays, the other's task blobs and message bodies its job table does not know."""
    other = f"{name}-o"
    aws_provision.bootstrap(other, iam=False, tls_only=False, session=moto_env)
    with pytest.raises(ConfigurationError) as info:
        aws_provision.bootstrap(name, bucket=Names(other).bucket, iam=False, tls_only=False,
                                session=moto_env)
    text = str(info.value)
    assert Names(other).bucket in text and f"kotta-enclave={other}" in text, text
    assert not moto_env.client("sqs").list_queues(
        QueueNamePrefix=Names(name).queue("test")).get("QueueUrls")


def test_teardown_without_the_bucket_an_enclave_used_says_so(moto_env, name):
    """An enclave bootstrapped with --bucket, torn down without it: its queues, tables and
    role went, its bucket (with every blob, the enclave key, held results) stayed, and
    teardown said nothing of it.  It now says it found no bucket and to give --bucket."""
    s3 = moto_env.client("s3")
    made = f"{name}-mine"
    aws_provision.bootstrap(name, bucket=made, iam=False, tls_only=False, session=moto_env)
    lines: list[str] = []
    report = aws_provision.teardown(name, session=moto_env, out=lines.append)
    assert (aws_provision.TABLE, Names(name).jobs_table) in report.deleted
    said = "\n".join(lines)
    assert f"no bucket {Names(name).bucket}" in said and "--bucket" in said, said
    assert made in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    report = aws_provision.teardown(name, bucket=made, session=moto_env)
    assert report.deleted == [(aws_provision.BUCKET, made)]


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4566", "ftp://127.0.0.1:1", "http://[::1"])
def test_bootstrap_and_teardown_refuse_an_endpoint_url_naming_it(endpoint, monkeypatch):
    """`kotta aws bootstrap lab --endpoint-url 127.0.0.1:4566` (no scheme) failed with
    botocore's bare ValueError "Invalid endpoint" (ftp://: EndpointResolutionError, or
    HTTPClientError after its retries), naming no option; opening the enclave so named it."""
    with aws_moto.fake_aws_env():
        for fn in (aws_provision.bootstrap, aws_provision.teardown):
            with pytest.raises(ConfigurationError,
                               match=re.escape(f"invalid endpoint_url={endpoint!r}")):
                fn("lab", endpoint_url=endpoint)
        monkeypatch.setenv("KOTTA_AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(ConfigurationError, match=re.escape(
                f"invalid endpoint_url={endpoint!r} (from KOTTA_AWS_ENDPOINT_URL)")):
            aws_provision.bootstrap("lab")


def test_teardown_deletes_a_node_role_with_policies_an_admin_added(moto_env, name):
    """An admin who attached a managed policy to the node role (SSM, CloudWatch agent) or
    added an inline one: teardown failed at DeleteRole with a raw DeleteConflict, every
    time it was run again, and the role stayed.  Its policies are now detached first."""
    aws_provision.bootstrap(name, tls_only=False, session=moto_env)
    iam, role = moto_env.client("iam"), Names(name).node_role
    doc = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "ssm:UpdateInstanceInformation", "Resource": "*"}]})
    arn = iam.create_policy(PolicyName=f"{name}-ssm", PolicyDocument=doc)["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=role, PolicyArn=arn)
    iam.put_role_policy(RoleName=role, PolicyName="logs", PolicyDocument=doc)
    report = aws_provision.teardown(name, session=moto_env)
    assert (aws_provision.ROLE, role) in report.deleted
    assert role not in [r["RoleName"] for r in iam.list_roles()["Roles"]]
    assert iam.get_policy(PolicyArn=arn)["Policy"]["AttachmentCount"] == 0  # (kept: not ours)


def test_cli_bootstrap_and_teardown(moto_env, name, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="kotta")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["aws", "bootstrap", name, "--region", "us-east-1", "--no-iam"])
    assert args.aws_handler(args) == 0
    out = capsys.readouterr().out
    assert "created  AWS::SQS::Queue" in out and f"aws://{name}?region=us-east-1" in out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    args = parser.parse_args(["aws", "teardown", name])
    assert args.aws_handler(args) == 2  # no --yes, no terminal: nothing deleted
    assert AwsEnclave(name, session=moto_env).queue.depth("test") == 0
    args = parser.parse_args(["aws", "teardown", name, "--yes"])
    assert args.aws_handler(args) == 0
    assert "deleted  AWS::DynamoDB::Table" in capsys.readouterr().out


def test_cli_teardown_on_a_terminal_at_end_of_input_deletes_nothing(moto_env, name, capsys,
                                                                    monkeypatch):
    """Ctrl-D at teardown's "type its name" prompt (or a terminal that closed) came out of
    `kotta aws teardown` as an EOFError traceback; it is a "no", as any other answer."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    parser = argparse.ArgumentParser(prog="kotta")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr("sys.stdin", Terminal(""))
    args = parser.parse_args(["aws", "teardown", name])
    assert args.aws_handler(args) == 1
    assert "not deleted" in capsys.readouterr().err
    assert AwsEnclave(name, session=moto_env).queue.depth("test") == 0  # (still there)


# ------------------------------------------------------------------ CloudFormation


class _CfnLoader(yaml.SafeLoader):
    """A safe loader that reads CloudFormation's short tags (!Ref, !Sub, !GetAtt...) as
    their long forms."""


def _cfn_tag(loader, suffix, node):
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def _template() -> dict:
    return yaml.load((ROOT / "deploy" / "cloudformation.yaml").read_text(), Loader=_CfnLoader)


def _render(value, params: dict, resources: dict):
    """Resolve the names in the template: !Sub and !Ref of parameters and resources."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        text = value["Fn::Sub"]
        for key, v in params.items():
            text = text.replace("${" + key + "}", v)
        return text
    if isinstance(value, dict) and "Ref" in value:
        ref = value["Ref"]
        return params.get(ref) or _physical_name(resources[ref], params, resources)
    return value


_NAME_PROPS = ("QueueName", "BucketName", "TableName", "RoleName", "InstanceProfileName", "Bucket")


def _physical_name(resource: dict, params: dict, resources: dict) -> str:
    props = resource["Properties"]
    [prop] = [p for p in _NAME_PROPS if p in props]
    return _render(props[prop], params, resources)


def test_cloudformation_declares_what_bootstrap_creates(moto_env, name):
    template = _template()
    resources = template["Resources"]
    params = {"EnclaveName": name}
    declared = {(r["Type"], _physical_name(r, params, resources)) for r in resources.values()}
    report = aws_provision.bootstrap(name, session=moto_env)
    assert declared == report.resources == aws_provision.planned(name)

    # the same settings where they matter
    jobs = resources["JobsTable"]["Properties"]
    [gsi] = jobs["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == "owner-created"
    assert sorted(gsi["Projection"]["NonKeyAttributes"]) == sorted(INDEX_ATTRS)
    assert (
        resources["NodesTable"]["Properties"]["TimeToLiveSpecification"]["AttributeName"]
        == "expires"
    )
    assert template["Parameters"]["MaxReceiveCount"]["Default"] == 10
    [policy] = resources["NodeRole"]["Properties"]["Policies"]
    declared_actions = {s["Sid"]: s["Action"] for s in policy["PolicyDocument"]["Statement"]}
    doc = aws_provision.node_policy(Names(name), "us-east-1", "123456789012")
    assert declared_actions == {s["Sid"]: s["Action"] for s in doc["Statement"]}
    pattern = re.compile(template["Parameters"]["EnclaveName"]["AllowedPattern"])
    for candidate in ("lab", "a", "lab-2", "lab-reply", "lab-user-x", "lab-replyx", "users",
                      "-lab", "Lab", "x" * 33, "my-user1"):
        try:
            Names(candidate)
        except ConfigurationError:
            assert not pattern.match(candidate), candidate
        else:
            assert pattern.match(candidate), candidate
    [queues] = [s for s in policy["PolicyDocument"]["Statement"] if s["Sid"] == "Queues"]
    [ours] = [s for s in doc["Statement"] if s["Sid"] == "Queues"]
    assert [r["Fn::Sub"] for r in queues["Resource"]] == [
        r.replace("arn:aws:sqs:us-east-1:123456789012:kotta-" + name,
                  "arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:kotta-${EnclaveName}")
        for r in ours["Resource"]]


def _valid_name(name: str) -> bool:
    try:
        Names(name)
    except ConfigurationError:
        return False
    return True


#: enclave names built of parts a wildcard could run into (reply, user, queue names)
_NAMES = st.lists(st.sampled_from(["lab", "reply", "user", "test", "dlq", "x", "1", "a-b"]),
                  min_size=1, max_size=4).map("-".join)


@given(_NAMES, _NAMES)
def test_a_node_policy_names_no_queue_or_role_of_another_enclave(a, b):
    """The node role of enclave ``a`` may use its own queues and user roles only: no
    resource pattern of its policy names a queue or role of enclave ``b`` (``lab`` and
    ``lab-foo`` once shared ``kotta-lab-*``)."""
    assume(a != b and _valid_name(a) and _valid_name(b))
    region, account = "us-east-1", "123456789012"
    patterns = []
    for s in aws_provision.node_policy(Names(a), region, account)["Statement"]:
        if s["Sid"] in ("Queues", "UserRoles"):
            patterns += s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
    nb = Names(b)
    queues = [nb.queue(q) for q in ("test", "production", "reply.client1")]
    theirs = [f"arn:aws:sqs:{region}:{account}:{q}" for q in (*queues, *map(nb.dlq, queues))]
    theirs += [f"arn:aws:iam::{account}:role/{r}"
               for r in (nb.node_role, nb.user_role_prefix + "analyst")]
    assert not [(p, r) for p in patterns for r in theirs if fnmatch.fnmatchcase(r, p)]


@pytest.mark.parametrize("bucket", ["Lab_Blobs", "ab", "lab blobs", "lab..blobs", "-lab",
                                    # S3's other rules: no IP address, no reserved prefix
                                    # or suffix (these passed, the queues were made first)
                                    "192.168.5.4", "xn--lab", "sthree-lab",
                                    "amzn-s3-demo-lab", "lab-s3alias", "lab--ol-s3",
                                    "lab.mrap", "lab--x-s3", "lab--table-s3"])
def test_bootstrap_refuses_a_bucket_name_s3_refuses_before_making_anything(moto_env, name,
                                                                          bucket):
    """`kotta aws bootstrap NAME --bucket Lab_Blobs` made the enclave's queues, then failed
    at the bucket with S3's bare InvalidBucketName (or botocore's ParamValidationError, or,
    on an emulator that takes it, went on with a bucket no S3 region makes).  The name is
    refused first, named, with S3's rule; nothing is made."""
    with pytest.raises(ConfigurationError, match="invalid bucket name") as info:
        aws_provision.bootstrap(name, bucket=bucket, iam=False, tls_only=False,
                                session=moto_env)
    assert repr(bucket) in str(info.value), info.value
    assert not moto_env.client("sqs").list_queues(QueueNamePrefix=f"kotta-{name}").get(
        "QueueUrls")


def test_bootstrap_keeps_an_existing_bucket_whose_name_s3_no_longer_makes(moto_env, name):
    """(us-east-1's buckets from before 2018 may have upper-case letters and underscores:
    such a bucket, existing, is used as it is.)"""
    moto_env.client("s3").create_bucket(Bucket="Legacy_Blobs")  # (moto makes it)
    report = aws_provision.bootstrap(name, bucket="Legacy_Blobs", iam=False, tls_only=False,
                                     session=moto_env)
    assert ("AWS::S3::Bucket", "Legacy_Blobs") in report.existing


def test_bootstrap_keeps_the_statements_of_an_existing_buckets_policy(moto_env, name):
    """bootstrap --bucket on an existing bucket whose policy grants something of its own
    (another account's reads, a CloudFront origin): PutBucketPolicy replaced that policy
    with the TLS-only one, and the grant was gone without a word.  Its statements are kept
    and the TLS-only statement added (replaced, when bootstrap runs again)."""
    s3 = moto_env.client("s3")
    bucket = f"{name}-shared"
    s3.create_bucket(Bucket=bucket)
    theirs = {"Sid": "PartnerReads", "Effect": "Allow",
              "Principal": {"AWS": "arn:aws:iam::210987654321:root"},
              "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/exports/*"}
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(
        {"Version": "2012-10-17", "Statement": [theirs]}))
    for _ in range(2):
        aws_provision.bootstrap(name, bucket=bucket, iam=False, session=moto_env)
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        assert [st.get("Sid") for st in policy["Statement"]] == [
            "PartnerReads", "DenyInsecureTransport"]
        assert policy["Statement"][0]["Action"] == "s3:GetObject"


@pytest.mark.parametrize("bucket", ["Bad/Name", "ab", "a b", "x" * 256])
def test_a_bucket_no_s3_region_ever_named_is_refused_before_teardown_deletes_anything(
        moto_env, name, bucket):
    """`kotta aws teardown NAME --bucket Bad/Name` deleted the enclave's queues, then
    failed at the bucket with botocore's ParamValidationError (and opening the enclave
    with ?bucket=Bad/Name raised that same raw error).  A name S3 never took, even before
    2018, is refused first, named; nothing is deleted."""
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env)
    with pytest.raises(ConfigurationError, match="invalid bucket name") as info:
        aws_provision.teardown(name, bucket=bucket, session=moto_env)
    assert repr(bucket) in str(info.value), info.value
    with pytest.raises(ConfigurationError, match="invalid bucket name"):
        AwsEnclave(name, bucket=bucket, session=moto_env)
    assert AwsEnclave(name, session=moto_env).queue.depth("test") == 0  # (still there)


def test_an_enclave_name_under_another_enclaves_prefixes_is_refused():
    for name in ("lab-reply", "lab-reply-x", "lab-user", "lab-user-2"):
        with pytest.raises(ConfigurationError, match="'reply' or 'user'"):
            Names(name)
    for name in ("replay", "users", "lab-users", "reply-lab", "user"):
        assert Names(name).name == name


def test_names_ending_with_a_newline_are_refused(moto_env):
    """The name patterns ended in `$`, which also matches before a final newline: an
    enclave "lab\n" (read from a file with its line end), a queue "test\n", a bucket and
    a region so were taken, to fail later at AWS with its own error."""
    from kotta_executor.backends.aws import check_region, new_bucket_name_error

    def refused(what: str):
        return pytest.raises(ConfigurationError, match=re.escape(what))

    with refused("invalid AWS enclave name 'lab\\n'"):
        Names("lab\n")
    with refused("invalid queue name 'test\\n'"):
        Names("lab").queue("test\n")
    with refused("invalid reply channel 'reply.abc\\n'"):
        Names("lab").queue("reply.abc\n")
    assert "invalid bucket name 'lab-blobs\\n'" in new_bucket_name_error("lab-blobs\n")
    with refused("invalid bucket name 'Legacy_Blobs\\n'"):
        AwsEnclave("lab", bucket="Legacy_Blobs\n", session=moto_env)
    with refused("invalid region='us-east-1\\n'"):
        check_region(moto_env, "us-east-1\n", in_url=True)
    assert Names("lab").queue("test") == "kotta-lab-test"  # (the same without it)


def test_cloudformation_template_lints_clean():
    api = pytest.importorskip("cfnlint.api")
    text = (ROOT / "deploy" / "cloudformation.yaml").read_text()
    matches = api.lint(text, config=api.ManualArgs(regions=["us-east-1"]))
    assert [str(m) for m in matches] == []


# ---------------------------------------------------------------------- end to end


def test_executor_and_node_on_moto(enclave):
    """A client and a node (in a thread; its workers are real processes) meeting only
    through SQS, S3 and DynamoDB: no doorbells, so both long-poll."""
    from kotta_executor import KottaExecutor
    from node.daemon import Node, NodeConfig
    from tests import tasks

    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        assert ex.submit(tasks.add, 1, 2).result(GUARD) == 3
        assert list(ex.map(tasks.square, range(12), timeout=GUARD)) == [x * x for x in range(12)]
        with pytest.raises(ValueError, match="nope"):
            ex.submit(tasks.raise_value_error, "nope").result(GUARD)
        assert len(enclave.nodes.live("test")) == 1
    finally:
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()
    assert enclave.queue.depth("test") == 0
    assert enclave.nodes.live() == []
    # the client's reply queue went with it
    replies = enclave.sqs.list_queues(QueueNamePrefix=enclave.names.reply_prefix)
    assert replies.get("QueueUrls", []) == []


def _named(name: str):
    """tasks.add under another ``__qualname__`` (the name a job is recorded with)."""
    from tests import tasks

    def add(a, b=0):
        return tasks.add(a, b)

    add.__qualname__ = name
    return add


def test_a_function_with_a_huge_name_runs_and_breaks_nothing(enclave):
    """A job's function name is recorded in its item, which DynamoDB limits to 400 KB: a
    name of 500,000 characters (a callable made with a generated name) was refused,
    and that broke the executor, every other future with it (BrokenEnclave), where the
    embedded enclave ran it.  The name is a label: it is recorded cut."""
    from kotta_executor import KottaExecutor
    from node.daemon import Node, NodeConfig
    from tests import tasks

    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    try:
        with KottaExecutor(1, enclave=enclave, start_node=False) as ex:
            f = ex.submit(_named("q" * 500_000), 1, 2)
            assert f.result(GUARD) == 3
            assert ex.submit(tasks.add, 2, 2).result(GUARD) == 4
            fn = enclave.jobs.get_many([f.job_id])[f.job_id].fn
            assert fn.startswith(f"{__name__}.qqq") and fn.endswith("(cut)")
            assert len(fn) <= 1024
    finally:
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()


def test_a_function_whose_name_utf8_cannot_hold_runs_and_breaks_nothing(enclave):
    """A name with a lone surrogate (a class made with type() from a file name that is not
    UTF-8, as os.listdir returns it) could not be written to the job table (either
    backend's), and that broke the executor, every other future with it (BrokenEnclave).
    It is recorded spelled out, as reasons are."""
    from kotta_executor import KottaExecutor
    from node.daemon import Node, NodeConfig
    from tests import tasks

    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    try:
        with KottaExecutor(1, enclave=enclave, start_node=False) as ex:
            f = ex.submit(_named("caf\udce9"), 1, 2)
            assert f.result(GUARD) == 3
            assert ex.submit(tasks.add, 2, 2).result(GUARD) == 4
            fn = enclave.jobs.get_many([f.job_id])[f.job_id].fn
            assert fn == f"{__name__}.caf\\udce9"
    finally:
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()


def test_an_executor_made_from_a_url_leaves_nothing_running_once_dropped(enclave):
    """Each executor made from an ``aws://`` URL opens an enclave of its own.  Its thread of
    SQS batches held it for good: once used, every such executor left a thread and its
    boto3 clients (about 15 MB) behind, a notebook cell run again and again a growing pile."""
    import gc
    import weakref

    from kotta_executor import KottaExecutor
    from node.daemon import Node, NodeConfig
    from tests import tasks

    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    try:
        with KottaExecutor(1, enclave=enclave.url, start_node=False) as ex:
            assert ex.enclave is not enclave
            assert ex.submit(tasks.add, 1, 2).result(GUARD) == 3
            opened = weakref.ref(ex.enclave)
            batches = wait_for(lambda q=ex.enclave.queue: q._flusher, what="its batches' thread")
        del ex
        wait_for(lambda: gc.collect() >= 0 and opened() is None, what="the enclave collected")
        batches.join(GUARD)
        assert not batches.is_alive()
    finally:
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()


def test_a_busy_node_without_doorbells_sees_a_kill_whatever_its_poll_interval(enclave,
                                                                               tmp_path):
    """A busy node looks for kill requests every 0.25 s (docs/aws.md).  Without doorbells
    it looked only when its loop woke, which with a long task running and nothing arriving
    was once a --poll-interval: kill() took that long to end the task (here, longer than
    the guard), not about a second."""
    from kotta_executor import KottaExecutor, TaskKilled
    from node.daemon import Node, NodeConfig
    from tests import tasks

    # (nor does its held task message come back meanwhile, which woke it too)
    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0, poll_interval=120,
                                    visibility_timeout=600))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    started, release = tmp_path / "started", tmp_path / "release"
    try:
        f = ex.submit(tasks.touch_then_wait, str(started), str(release), 600)
        wait_for(started.exists, what="the task to begin")
        assert f.kill()
        with pytest.raises(TaskKilled):
            f.result(GUARD)
        assert ex.submit(tasks.add, 1, 2).result(GUARD) == 3  # the node goes on
    finally:
        tasks.release(release, "go")
        ex.shutdown(wait=False, cancel_futures=True)
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()


def test_jobs_no_node_serves_are_warned_of_with_a_command_for_this_enclave(enclave,
                                                                           monkeypatch):
    """The warning said to start a node with `kotta up --queue test`, which docs/aws.md says
    not to use with an AWS enclave, and which without --enclave starts a node of the
    embedded enclave under $KOTTA_HOME: the jobs waited on."""
    import logging
    import shlex

    from kotta_executor import KottaExecutor
    from kotta_executor import executor as executor_module
    from tests import tasks

    monkeypatch.setattr(executor_module, "UNSERVED_WARN", 0.3)
    warned = threading.Event()
    messages: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
            if "no live node serves" in messages[-1]:
                warned.set()

    handler = Seen()
    logging.getLogger("kotta.executor").addHandler(handler)
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    try:
        f = ex.submit(tasks.add, 1, 2)
        assert warned.wait(GUARD), messages
        [warning] = [m for m in messages if "no live node serves" in m]
        command = f"kotta node --enclave {shlex.quote(enclave.url)} --queue test"
        assert f"(start one with `{command}`," in warning
        assert "kotta up" not in warning
        assert f.cancel()
    finally:
        logging.getLogger("kotta.executor").removeHandler(handler)
        ex.shutdown(wait=False, cancel_futures=True)


def test_map_records_its_tasks_in_batches_from_the_manager(enclave, tmp_path):
    """A map's tasks all go through the executor's outbox, a few creates for all of them.
    (Each used to be sent alone from the caller's thread, each send taking longer than
    the gap that makes submits count as a burst: two calls a task, and a slow map.)  And
    running() turns True from a look that reads no results."""
    from kotta_executor import KottaExecutor
    from node.daemon import Node, NodeConfig
    from tests import tasks

    node = Node(enclave, NodeConfig(queue="test", workers=1, long_poll=1.0))
    runner = threading.Thread(target=node.run, name="node")
    runner.start()
    ex = KottaExecutor(1, enclave=enclave, start_node=False)
    callers: list[str] = []
    projections: list[str] = []

    def seen(model, params, **_):  # the API's own parameters
        if model.name in ("TransactWriteItems", "SendMessageBatch") and (
            threading.current_thread() is threading.main_thread()
        ):
            callers.append(model.name)
        if model.name == "BatchGetItem" and (
            threading.current_thread().name.startswith("kotta-manager")
        ):
            projections.extend(r.get("ProjectionExpression", "") for r in
                               params["RequestItems"].values())

    enclave.dynamodb.meta.events.register("before-parameter-build", seen)
    enclave.sqs.meta.events.register("before-parameter-build", seen)
    try:
        assert list(ex.map(tasks.square, range(20), timeout=GUARD)) == [x * x for x in range(20)]
        assert callers == []
        release = tmp_path / "release"
        f = ex.submit(tasks.wait_for_file, str(release))
        wait_for(f.running, what="running() of a started job")
        assert any("result" not in p for p in projections)  # the look's reads
        release.touch()
        f.result(GUARD)
    finally:
        ex.shutdown(wait=True)
        node.request_stop()
        runner.join(GUARD)
    assert not runner.is_alive()


@pytest.fixture(scope="module")
def moto_server():
    """moto's server on 127.0.0.1, for what crosses a process boundary."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with aws_moto.fake_aws_env(), aws_moto.atomic_moto():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def test_executor_starts_a_node_process_on_the_same_enclave(moto_server, name):
    """The enclave URL carries everything but credentials: the local node the executor
    starts (``python -m node --enclave aws://...``) reaches the same queues."""
    from kotta_executor import KottaExecutor
    from tests import tasks

    with aws_moto.fake_aws_env():
        report = aws_provision.bootstrap(name, endpoint_url=moto_server, iam=False)
        assert (aws_provision.BUCKET_POLICY, Names(name).bucket) not in report.resources
        url = f"aws://{name}?endpoint_url={moto_server}"
        with KottaExecutor(1, enclave=url, start_node=True) as ex:  # "auto": only local
            assert ex.submit(tasks.add, 2, 3).result(GUARD) == 5
            assert list(ex.map(tasks.square, range(5), timeout=GUARD)) == [0, 1, 4, 9, 16]
            # live() answers from a cache for up to a second: wait for the registration
            [node] = wait_for(lambda: ex.enclave.nodes.live("test"), what="the node to show")
            assert node.managed_by == ex.client_id


@pytest.mark.parametrize("count", [0, -1, 1001])
def test_bootstrap_refuses_a_max_receive_count_sqs_cannot_take(moto_env, name, count):
    # SQS takes 1 to 1000; 0 made every task a dead letter before any node ran it (moto),
    # or failed half-way, after the first dead-letter queue (AWS)
    with pytest.raises(ValueError, match="--max-receive-count"):
        aws_provision.bootstrap(name, max_receive_count=count, iam=False, tls_only=False,
                                session=moto_env)
    assert aws_provision.teardown(name, session=moto_env).deleted == []  # nothing made


@pytest.mark.parametrize("region", ["us-east-9", "mars-north-1"])
def test_bootstrap_refuses_a_region_aws_does_not_have_naming_it(moto_env, name, region):
    """As opening the enclave does: ``kotta aws bootstrap lab --region us-east-9`` spent
    botocore's minute of connect retries on the first call, then failed with its
    EndpointConnectionError (moto, here, takes any region: it made the enclave)."""
    with pytest.raises(ConfigurationError, match=f"region={region!r} \\(--region\\)"):
        aws_provision.bootstrap(name, region=region, iam=False, tls_only=False)
    assert aws_provision.teardown(name, session=moto_env).deleted == []  # nothing made


@pytest.mark.parametrize("count", [2, 5, 6])
def test_bootstrap_warns_of_a_max_receive_count_not_over_the_nodes_limit(moto_env, name,
                                                                          count, caplog):
    """SQS redrives a task whose node keeps dying once received maxReceiveCount times: at
    or under the nodes' own limit (5), before a node could fail its job, which stayed
    processing, its future waiting for good.  Said (the tests' count of 2 is on purpose)."""
    caplog.set_level(logging.WARNING, logger="kotta.aws")
    aws_provision.bootstrap(name, max_receive_count=count, iam=False, tls_only=False,
                            session=moto_env)
    said = [r.getMessage() for r in caplog.records if "--max-receive-count" in r.getMessage()]
    if count > 5:
        assert said == []
        return
    assert said == [
        f"--max-receive-count {count} is not over the nodes' own delivery limit (`kotta node "
        f"--max-deliveries`, 5 by default): SQS will move a task whose node keeps dying to "
        f"the dead-letter queue before a node can fail its job, and the job stays processing, "
        f"its future waiting; choose a count over the nodes' limit (default 10)"]


#: what SQS takes in a message body, and so in a String attribute's value (SendMessage)
_SQS_TEXT = re.compile("^[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*$")


def test_a_dead_letter_reason_with_characters_sqs_refuses_is_sent_spelled_out(enclave):
    """SQS refuses an attribute value with a character it does not take in a body (a
    control character but tab and newlines, a lone surrogate, U+FFFE): the dead letter of
    a task refused with such a reason (an exception's text, say) failed each time the
    message came, until SQS's redrive moved it, without the reason (moto takes most of
    them: the values sent are checked here as SQS does).  Such characters are spelled
    out."""
    reason = "bad \x1b[31mred\x1b[0m\x00 \udcff \ufffe, tab\there, ok é \U0001f525"
    enclave.queue.send("test", [Message("a" * 32, b"x")])
    got = enclave.queue.receive("test", 1, 30, "h")
    sent: list[str] = []
    enclave.sqs.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch",
        lambda params, **_: sent.extend(e["MessageAttributes"]["kotta_reason"]["StringValue"]
                                        for e in params["Entries"]),
    )
    enclave.queue.dead_letter(got, reason)
    [value] = sent
    assert _SQS_TEXT.match(value), ascii(value)
    spelled = "bad \\x1b[31mred\\x1b[0m\\x00 \\udcff \\ufffe, tab\there, ok é \U0001f525"
    assert value == spelled
    assert [d["reason"] for d in enclave.queue.dead_letters("test")] == [spelled]


def test_a_queue_whose_sqs_name_would_be_too_long_is_refused_naming_it(moto_env):
    """SQS names are at most 80 characters: with an enclave name of 32 and a queue name of
    40, both taken, the dead-letter queue's name (kotta-NAME-QUEUE-dlq) was 83, and
    bootstrap failed half-way with botocore's ClientError from CreateQueue, naming neither
    (and an executor, at its first send, with EnclaveNotProvisioned)."""
    name = "a" * 32
    with pytest.raises(ConfigurationError, match="'q{38}'") as info:
        aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env,
                                queues=["ok", "q" * 38])
    assert "over SQS's 80 (at most 37 characters" in str(info.value)
    sqs = moto_env.client("sqs")
    assert sqs.list_queues().get("QueueUrls") is None  # (nothing made)
    assert Names(name).queue("q" * 37) == f"kotta-{name}-{'q' * 37}"  # (-dlq: 80)


def test_bootstraps_node_policy_grants_the_queues_it_made(moto_env, name):
    """bootstrap(NAME, queues=["gpu"]) made kotta-NAME-gpu, but the node role's policy
    granted only test and production: a node of the gpu queue was refused by IAM.  The
    policy names the queues bootstrap made (and their dead-letter queues)."""
    report = aws_provision.bootstrap(name, queues=["gpu", "test"], tls_only=False,
                                     session=moto_env)
    iam = moto_env.client("iam")
    role = f"kotta-{name}-node"
    doc = iam.get_role_policy(RoleName=role, PolicyName=role)["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    [queues] = [s for s in doc["Statement"] if s["Sid"] == "Queues"]
    granted = {r.rsplit(":", 1)[-1] for r in queues["Resource"]}
    made = {n for kind, n in report.resources if kind == "AWS::SQS::Queue"}
    assert made == {f"kotta-{name}-gpu", f"kotta-{name}-gpu-dlq",
                    f"kotta-{name}-test", f"kotta-{name}-test-dlq"}
    assert granted == made | {f"kotta-{name}-reply-*"}


def test_bootstrap_keeps_an_existing_buckets_sse_kms_and_lets_the_nodes_use_its_key(
        moto_env, name):
    """bootstrap --bucket on an existing bucket encrypted with SSE-KMS (its owner's key)
    replaced that with SSE-S3 without a word: a silent downgrade.  The bucket's own
    encryption is kept, bootstrap says so, and the node role may use that one key through
    S3 only (it had no KMS permission, and could not have read or written a blob)."""
    s3, kms = moto_env.client("s3"), moto_env.client("kms")
    key = kms.create_key()["KeyMetadata"]
    kms.create_alias(AliasName=f"alias/{name}", TargetKeyId=key["KeyId"])
    bucket = f"{name}-owned"
    s3.create_bucket(Bucket=bucket)
    rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms",
                                                   "KMSMasterKeyID": f"alias/{name}"},
            "BucketKeyEnabled": True}
    s3.put_bucket_encryption(Bucket=bucket,
                             ServerSideEncryptionConfiguration={"Rules": [rule]})
    said = []
    aws_provision.bootstrap(name, bucket=bucket, tls_only=False, session=moto_env,
                            out=said.append)
    [kept] = s3.get_bucket_encryption(Bucket=bucket)[
        "ServerSideEncryptionConfiguration"]["Rules"]
    assert kept["ApplyServerSideEncryptionByDefault"] == rule[
        "ApplyServerSideEncryptionByDefault"]
    assert [m for m in said if "aws:kms" in m and bucket in m and "kept" in m], said
    role = f"kotta-{name}-node"
    doc = moto_env.client("iam").get_role_policy(RoleName=role, PolicyName=role)
    doc = doc["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    [grant] = [s for s in doc["Statement"] if s["Sid"] == "BlobsKey"]
    assert grant["Resource"] == key["Arn"]
    assert set(grant["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey"}
    assert grant["Condition"] == {"StringEquals": {"kms:ViaService":
                                                   "s3.us-east-1.amazonaws.com"}}


def test_bootstrap_gives_a_new_or_sse_s3_bucket_sse_s3_and_no_kms_grant(moto_env, name):
    aws_provision.bootstrap(name, tls_only=False, session=moto_env)
    s3 = moto_env.client("s3")
    [rule] = s3.get_bucket_encryption(Bucket=f"kotta-{name}-blobs")[
        "ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    role = f"kotta-{name}-node"
    doc = moto_env.client("iam").get_role_policy(RoleName=role, PolicyName=role)
    doc = doc["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    assert "BlobsKey" not in {s["Sid"] for s in doc["Statement"]}


def test_bootstrap_refuses_an_existing_bucket_of_another_region_naming_both(moto_env, name):
    """bootstrap --region us-east-1 --bucket B, B made in eu-west-1: botocore's redirect
    let the existence check pass and B was kept, so every later call paid a redirect (or
    failed where redirects are not followed).  It is refused, naming both regions, before
    anything is made."""
    bucket = f"{name}-eu"
    moto_env.client("s3", region_name="eu-west-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(ConfigurationError) as info:
        aws_provision.bootstrap(name, bucket=bucket, tls_only=False, session=moto_env)
    said = str(info.value)
    assert bucket in said and "eu-west-1" in said and "us-east-1" in said, said
    assert not moto_env.client("sqs").list_queues(QueueNamePrefix=f"kotta-{name}").get(
        "QueueUrls")
    # in its own region it is kept
    report = aws_provision.bootstrap(name, bucket=bucket, region="eu-west-1", iam=False,
                                     tls_only=False, session=moto_env.__class__(
                                         region_name="eu-west-1"))
    assert ("AWS::S3::Bucket", bucket) in report.existing


def test_bootstrap_takes_one_queue_name_as_one_queue(moto_env, name):
    """bootstrap(NAME, queues="production") iterated the string: it made the queues
    kotta-NAME-p, -r, -o, ... (and their dead-letter queues), and no production queue.
    A name alone is that one queue."""
    report = aws_provision.bootstrap(name, queues="production", iam=False, tls_only=False,
                                     session=moto_env)
    made = {n for kind, n in report.resources if kind == "AWS::SQS::Queue"}
    assert made == {f"kotta-{name}-production", f"kotta-{name}-production-dlq"}
    assert aws_provision.planned(name, queues="production", iam=False,
                                 tls_only=False) == report.resources


def test_bootstrap_refuses_a_reply_channel_as_a_queue_before_making_anything(moto_env, name):
    """bootstrap(NAME, queues=["reply.x"]) made a work queue kotta-NAME-reply-x, with a
    dead-letter queue and a redrive policy, under the name of a client's reply queue."""
    with pytest.raises(ConfigurationError, match=re.escape("invalid queue name 'reply.x'")):
        aws_provision.bootstrap(name, queues=["test", "reply.x"], iam=False, tls_only=False,
                                session=moto_env)
    assert not moto_env.client("sqs").list_queues(
        QueueNamePrefix=Names(name).queue("test")).get("QueueUrls")


@pytest.mark.parametrize("spelled", ["prod", "Production", "PROD"])
def test_bootstrap_makes_the_queue_nodes_use_for_its_other_spellings(moto_env, name, spelled):
    """Executors and nodes take `prod` and `Production` for the production queue (the
    original spellings), but bootstrap(queues=["prod"]) made kotta-NAME-prod, which none
    uses: a node of production then found no queue.  bootstrap makes kotta-NAME-production."""
    report = aws_provision.bootstrap(name, queues=[spelled], iam=False, tls_only=False,
                                     session=moto_env)
    made = {n for kind, n in report.resources if kind == "AWS::SQS::Queue"}
    assert made == {f"kotta-{name}-production", f"kotta-{name}-production-dlq"}
    AwsEnclave(name, session=moto_env).queue.depth("production")  # (exists)


def test_the_templates_max_receive_count_has_sqs_bounds_as_bootstrap_does(moto_env, name):
    """bootstrap refuses a --max-receive-count over 1000 before making anything; the
    template took MaxReceiveCount=5000, and the stack failed at its first queue (SQS's
    refusal), rolling back.  The parameter has SQS's bound."""
    param = _template()["Parameters"]["MaxReceiveCount"]
    assert param["MaxValue"] == 1000
    with pytest.raises(ValueError, match="1 to 1000"):
        aws_provision.bootstrap(name, max_receive_count=param["MaxValue"] + 1,
                                session=moto_env)


def test_bootstrap_names_a_jobs_index_made_without_todays_attributes(moto_env, name):
    """A jobs table made by an earlier version has an owner-created index without the
    attributes added since (usage): DynamoDB refuses a query of the index asking for them,
    and `kotta list` for an owner failed.  Running bootstrap again, the documented repair,
    said only "exists".  It names the index, what it lacks and what to do."""
    spec = aws_provision.jobs_table_spec(Names(name))
    [gsi] = spec["GlobalSecondaryIndexes"]
    gsi["Projection"]["NonKeyAttributes"].remove("usage")
    moto_env.client("dynamodb").create_table(**spec)
    said = []
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env,
                            out=said.append)
    [warned] = [m for m in said if "owner-created" in m]
    assert f"kotta-{name}-jobs" in warned and "usage" in warned, warned
    said.clear()
    aws_provision.bootstrap(f"{name}x", iam=False, tls_only=False, session=moto_env,
                            out=said.append)
    assert not [m for m in said if "owner-created" in m]


def test_bootstrap_makes_a_jobs_tables_missing_owner_index(moto_env, name):
    """(After the index was deleted, as bootstrap says to do for one lacking attributes,
    bootstrap again makes it anew.)"""
    spec = aws_provision.jobs_table_spec(Names(name))
    del spec["GlobalSecondaryIndexes"]
    spec["AttributeDefinitions"] = spec["AttributeDefinitions"][:1]
    ddb = moto_env.client("dynamodb")
    ddb.create_table(**spec)
    said = []
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env,
                            out=said.append)
    assert [m for m in said if m.startswith("created") and "owner-created" in m], said
    [gsi] = ddb.describe_table(TableName=f"kotta-{name}-jobs")["Table"][
        "GlobalSecondaryIndexes"]
    assert sorted(gsi["Projection"]["NonKeyAttributes"]) == sorted(INDEX_ATTRS)


def test_bootstrap_names_a_nodes_tables_ttl_on_another_attribute(moto_env, name):
    """A nodes table whose time to live is on another attribute (made by hand, or by
    another tool): bootstrap saw TTL enabled and said nothing, and the records of dead
    nodes, which carry `expires`, never went.  It says so, naming both attributes."""
    ddb = moto_env.client("dynamodb")
    ddb.create_table(**aws_provision.nodes_table_spec(Names(name)))
    ddb.update_time_to_live(TableName=f"kotta-{name}-nodes", TimeToLiveSpecification={
        "Enabled": True, "AttributeName": "ttl"})
    said = []
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=moto_env,
                            out=said.append)
    [warned] = [m for m in said if "time to live" in m]
    assert f"kotta-{name}-nodes" in warned and "'ttl'" in warned and "'expires'" in warned
