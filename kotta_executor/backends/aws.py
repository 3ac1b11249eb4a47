"""The AWS enclave: SQS for the task queues, S3 for blobs, DynamoDB for jobs and nodes.

``open_enclave("aws://NAME?region=us-east-1")`` opens it.  Every resource is named after
NAME (see :class:`Names`) and is created by ``kotta aws bootstrap NAME``
(:mod:`kotta_executor.aws_provision`) or by ``deploy/cloudformation.yaml``.

How the interface maps onto AWS (one line per method; docs/aws.md has the whole story):

* ``queue.send``: SendMessageBatch (10 a call, 1 MiB a call).  A body travels base64 encoded
  (``b:...``); one larger than :attr:`SqsQueue.max_body` goes to S3 and the message carries
  ``s3:KEY``.  The job id is the message attribute ``kotta_job``.
* ``queue.receive``: ReceiveMessage (10 a call, long polling, ApproximateReceiveCount);
  a receipt is ``"<sqs queue name> <receipt handle> [<blob key>]"`` so that extend, release,
  ack and dead_letter need nothing but the receipt.
* ``queue.extend`` / ``release``: ChangeMessageVisibilityBatch (release = visibility 0).
* ``queue.ack``: DeleteMessageBatch (and DeleteObjects for spilled bodies), ten to a call:
  an ack waits up to :attr:`SqsQueue.delete_linger` for company, and replies to a client
  up to :attr:`SqsQueue.reply_linger` (a background thread makes the call; depth(),
  close() and exit make it at once).
* ``queue.dead_letter``: SendMessageBatch to the queue's DLQ with the reason as a message
  attribute, then DeleteMessageBatch.  SQS's own redrive (maxReceiveCount, see
  :mod:`kotta_executor.aws_provision`) is the safety net behind the node's own count.
* ``jobs.create``: TransactWriteItems of the records, each put only if its job id is new
  (a retried create never resets a job that a node started or finished), *then*
  SendMessageBatch of the tasks (two services: not atomic; a record without a message
  stays pending, never the reverse).
* ``jobs.transition`` / ``finish`` / ``request_kill``: one conditional UpdateItem per job,
  the condition being ``state IN states.sources(new)`` (for finish: of the result's final
  state, and finish takes final states only), so a result is recorded at most once.
  Each write also sets a token of its own (``write_token``), so that botocore's retry of a
  write DynamoDB applied, which fails its condition, still counts as made.
  Results that would make the item too large (:attr:`DynamoJobs.max_result`,
  :attr:`DynamoJobs.max_item`) go to S3 (``result_ref``).
* ``jobs.list``: Query on the ``owner-created`` GSI for one owner; a Scan for all owners.
* ``nodes``: a DynamoDB table; ``live()`` = a heartbeat in the last 30 s (no pid checks:
  nodes run on other machines).
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .. import states
from ..errors import ConfigurationError, KottaError
from ..states import JobState
from .base import (
    KILLED_PENDING,
    BlobStore,
    Delivery,
    Enclave,
    Finished,
    JobRecord,
    JobTable,
    Message,
    NewJob,
    NodeInfo,
    NodeRegistry,
    Pruned,
    TaskQueue,
)
from .embedded import _KEY

log = logging.getLogger("kotta.aws")

#: a node whose last heartbeat is older than this is taken for dead
NODE_STALE_AFTER = 30.0
#: enclave names: they become part of queue, table and bucket names (bucket rules are the
#: strictest: lower case, digits and hyphens)
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")
#: a name with one of these parts would fall under another enclave's wildcards (check_name)
_RESERVED_PART = re.compile(r"-(?:reply|user)(?:-|$)")
_QUEUE = re.compile(r"^[A-Za-z0-9_-]{1,40}\Z")
#: S3's rule for a new bucket's name (--bucket, ?bucket=): 3-63 characters
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
#: and the names it refuses all the same: an IP address, a reserved prefix or suffix
_S3_BUCKET_REFUSED = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+|(?:xn--|sthree-|amzn-s3-demo-).*"
                                r"|.*(?:-s3alias|--ol-s3|\.mrap|--x-s3|--table-s3))$")
#: what S3 ever took for a bucket's name (us-east-1 before 2018): an existing bucket's
_LEGACY_S3_BUCKET = re.compile(r"^[A-Za-z0-9._-]{3,255}\Z")
#: SQS's limit on a queue's name
MAX_SQS_NAME = 80
#: characters in an IAM role's name
MAX_IAM_ROLE_NAME = 64
#: SQS's largest visibility timeout and long-poll wait
MAX_VISIBILITY = 43_200
MAX_WAIT = 20
#: SQS's limit on one message and on one SendMessageBatch call (bodies plus attributes)
SQS_LIMIT = 1_048_576
#: a character SQS does not take in a message body, nor in a String attribute (SendMessage)
_NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_SQS_MISSING = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
_DDB_MISSING = ("ResourceNotFoundException",)
_S3_MISSING_BUCKET = ("NoSuchBucket",)
_S3_MISSING_KEY = ("NoSuchKey", "404", "NotFound")
#: a blob there that cannot be read until someone acts: archived by a lifecycle rule
_S3_UNREADABLE_KEY = frozenset({"InvalidObjectState"})

#: SQS moves a message to its DLQ when it is received more often than this; larger than
#: the node's own max_deliveries (5), so that the node normally dead-letters first and
#: records the job as failed (docs/aws.md)
MAX_RECEIVE_COUNT = 10
RETENTION = 1_209_600  # 14 days, SQS's longest

#: seconds the batches' thread waits for work before it looks whether its queue is gone
FLUSHER_IDLE = 1.0

JOB_ATTR = "kotta_job"
REASON_ATTR = "kotta_reason"
COUNT_ATTR = "kotta_receive_count"
DEAD_AT_ATTR = "kotta_dead_at"
#: a dead letter's: the SQS message id of the message it is the dead letter of
DEAD_OF_ATTR = "kotta_message"
OWNER_INDEX = "owner-created"
#: the sections of a task envelope the executor may put in a blob ``<section>-<job id>``
TASK_BLOB_SECTIONS = ("fn", "args", "payload")

_URL_PARAMS = (
    "region", "endpoint_url", "profile", "bucket", "retry_mode", "max_attempts", "create_queues",
)  # fmt: skip


class EnclaveNotProvisioned(ConfigurationError):
    """A queue, table or bucket of the enclave does not exist: run ``kotta aws bootstrap``."""


class EndpointUnreachable(ConfigurationError):
    """The enclave's endpoints have never answered: a region with no AWS there, or an
    ``endpoint_url`` nothing listens at.  (Once they have answered, a failed connection is
    botocore's own error: a passing fault of the network, tried again.)"""


class RecordsRefused(KottaError, RuntimeError):
    """DynamoDB cancelled job records for a reason trying again does not cure (a
    ``ValidationError``, an item too large): the executor gives up at once."""


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Names:
    """Every AWS resource name of enclave ``name``, in one place (bootstrap, CloudFormation
    and the backend all use these)."""

    name: str
    bucket_override: str | None = None

    def __post_init__(self):
        check_name(self.name)
        # a name no S3 region ever took, even us-east-1 before 2018: botocore's bare
        # ParamValidationError at the first call (teardown: once the queues were gone)
        b = self.bucket_override
        if b and not (isinstance(b, str) and _LEGACY_S3_BUCKET.match(b)):
            raise ConfigurationError(
                f"invalid bucket name {b!r}: S3 bucket names are 3-63 lower-case letters, "
                "digits, dots and hyphens (3-255 letters, digits, dots, hyphens and "
                "underscores for a us-east-1 bucket from before 2018)"
            )

    @property
    def prefix(self) -> str:
        return f"kotta-{self.name}"

    def queue(self, queue: str) -> str:
        """The SQS queue of a Kotta queue (``test``) or reply channel (``reply.CLIENT``)."""
        if queue.startswith("reply."):
            client = queue[len("reply.") :]
            if not _QUEUE.match(client):
                raise ConfigurationError(f"invalid reply channel {queue!r}")
            return f"{self.prefix}-reply-{client}"
        if not _QUEUE.match(queue) or queue.startswith("reply") or queue.endswith("-dlq"):
            raise ConfigurationError(f"invalid queue name {queue!r}")
        sqs_name = f"{self.prefix}-{queue}"
        if len(self.dlq(sqs_name)) > MAX_SQS_NAME:
            # (SQS refused to make it: bootstrap failed half-way with botocore's ClientError)
            longest = MAX_SQS_NAME - len(self.dlq(f"{self.prefix}-"))
            raise ConfigurationError(
                f"queue name {queue!r} is too long for the AWS enclave {self.name!r}: its "
                f"dead-letter queue's SQS name would be {len(self.dlq(sqs_name))} characters, "
                f"over SQS's {MAX_SQS_NAME} (at most {longest} characters for a queue here)"
            )
        return sqs_name

    def dlq(self, sqs_name: str) -> str:
        return f"{sqs_name}-dlq"

    @property
    def reply_prefix(self) -> str:
        return f"{self.prefix}-reply-"

    @property
    def jobs_table(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def records_table(self) -> str:
        return f"{self.prefix}-records"

    @property
    def nodes_table(self) -> str:
        return f"{self.prefix}-nodes"

    @property
    def bucket(self) -> str:
        return self.bucket_override or f"{self.prefix}-blobs"

    @property
    def blob_prefix(self) -> str:
        return "blobs/"

    @property
    def node_role(self) -> str:
        return f"{self.prefix}-node"

    @property
    def user_role_prefix(self) -> str:
        return f"{self.prefix}-user-"

    def check_user_role(self, role: str) -> str:
        """Refuse a user role whose IAM role (``user_role_prefix`` + ``role``) IAM would
        not take: the role rule allows 63 characters, the prefix takes up to 44 of IAM's
        64, and such a role failed only at staging, with a bare "invalid role name"."""
        longest = MAX_IAM_ROLE_NAME - len(self.user_role_prefix)
        if isinstance(role, str) and len(role) > longest:
            raise ConfigurationError(
                f"role name {role!r} is too long for the AWS enclave {self.name!r}: its IAM "
                f"role {self.user_role_prefix}{role} would be "
                f"{len(self.user_role_prefix + role)} characters, over IAM's "
                f"{MAX_IAM_ROLE_NAME} (at most {longest} characters for a role here)"
            )
        return role


def new_bucket_name_error(bucket: str) -> str | None:
    """Why S3 would not make a bucket named ``bucket`` (None: it would).  An existing one
    may have such a name (us-east-1's from before 2018): checked only for a bucket to make."""
    if isinstance(bucket, str) and _S3_BUCKET.match(bucket) and ".." not in bucket and (
            not _S3_BUCKET_REFUSED.match(bucket)):
        return None
    return (f"invalid bucket name {bucket!r}: use 3-63 lower-case letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit, not an IP address, not "
            "beginning xn--, sthree- or amzn-s3-demo-, nor ending -s3alias, --ol-s3, .mrap, "
            "--x-s3 or --table-s3 (S3's rule)")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"invalid AWS enclave name {name!r}: use 1-32 lower-case letters, digits and "
            "hyphens, starting and ending with a letter or digit (it becomes part of queue, "
            "table and bucket names)"
        )
    if _RESERVED_PART.search(name):
        raise ConfigurationError(
            f"invalid AWS enclave name {name!r}: a part 'reply' or 'user' after a hyphen "
            "would put its queues or roles under another enclave's reply-queue or user-role "
            "prefix (kotta-NAME-reply-*, kotta-NAME-user-*), which that enclave's nodes may use"
        )
    return name


# --------------------------------------------------------------------------- sessions


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """``aws://NAME?region=...&endpoint_url=...`` -> (NAME, params)."""
    # urlsplit drops a tab, CR or LF anywhere, and control characters and blanks at the
    # start, without a word: "aws://lab\n" (a line read from a file) and "aws://la\nb"
    # opened lab.  (Other blanks are kept, and refused with the part they are in.)
    bad = next((ch for ch in url if ch in "\t\r\n"), None)
    if bad is None and url[:1] and url[:1] <= " ":
        bad = url[0]
    if bad is not None:
        raise ConfigurationError(
            f"invalid AWS enclave URL {url!r}: it has a blank or control character "
            f"({bad!r}); an enclave URL has none (expected aws://NAME?PARAMETERS)"
        )
    try:
        parts = urlsplit(url)
    except ValueError:  # a '[' or ']' in the name, taken for an IPv6 address: the bare
        # "Invalid IPv6 URL" named neither the URL nor what is wrong with it
        raise ConfigurationError(
            f"invalid AWS enclave URL {url!r}: an enclave name is lower-case letters, digits "
            "and hyphens (expected aws://NAME?PARAMETERS)"
        ) from None
    if parts.scheme != "aws":
        raise ConfigurationError(f"not an AWS enclave URL: {url!r} (expected aws://NAME)")
    name = parts.netloc or parts.path.strip("/")
    if parts.netloc and parts.path.strip("/"):  # (it was dropped: aws://lab/prod opened lab)
        raise ConfigurationError(
            f"an AWS enclave URL has no path: {url!r} (expected aws://NAME?PARAMETERS)"
        )
    if "#" in url:  # (dropped too: aws://lab#prod opened lab)
        raise ConfigurationError(
            f"an AWS enclave URL has no fragment ('#'): {url!r} (expected aws://NAME?PARAMETERS)"
        )
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    empty = sorted({k for k, v in pairs if not v})
    if empty:  # (dropped, silently: ?endpoint_url=$EMULATOR, unset, opened the enclave on
        # AWS itself, and ?bucket= the default bucket)
        raise ConfigurationError(
            f"empty parameter(s) {', '.join(empty)} in {url!r}: give each a value, or leave "
            f"it out for its default"
        )
    params = dict(pairs)
    twice = sorted({k for k, v in pairs if v != params[k]})
    if twice:  # (the last was taken, silently)
        raise ConfigurationError(
            f"parameter(s) {', '.join(twice)} given twice, with different values, in {url!r}"
        )
    unknown = sorted(set(params) - set(_URL_PARAMS))
    if unknown:
        raise ConfigurationError(
            f"unknown parameter(s) {', '.join(unknown)} in {url!r} "
            f"(known: {', '.join(_URL_PARAMS)})"
        )
    # (for connect()'s check_spec too; naming the URL: one with no name named nothing)
    check_endpoint_url(params.get("endpoint_url"), f" in {url!r}")
    return check_name(name), params


def make_session(
    *,
    region: str | None = None,
    profile: str | None = None,
    what: str = "the AWS enclave",
):
    """A boto3 session from boto3's usual chain (environment, ~/.aws, instance role), with
    one :class:`ConfigurationError` naming everything that is missing."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session(region_name=region or None, profile_name=profile or None)
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigurationError(f"cannot open {what}: {exc}") from None
    missing = []
    if not session.region_name:
        missing.append(
            "no AWS region (set AWS_REGION or AWS_DEFAULT_REGION, a region in ~/.aws/config, "
            "or ?region= in the enclave URL)"
        )
    try:
        creds = session.get_credentials()
    except botocore.exceptions.BotoCoreError:
        creds = None
    if creds is None:
        missing.append(
            "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "run `aws configure` or `aws sso login`, or run on an instance with a role)"
        )
    if missing:
        raise ConfigurationError(f"cannot open {what}: " + "; and ".join(missing))
    return session


def check_endpoint_url(endpoint_url: str | None, source: str = "") -> None:
    """Refuse an ``endpoint_url`` botocore would take and fail on later (a ValueError
    naming no parameter; or, for a scheme other than http and https, an HTTPClientError
    after 30 seconds of retries of the first call)."""
    if not endpoint_url:
        return
    try:
        parts = urlsplit(endpoint_url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        # (a blank or control character anywhere: urlsplit drops a newline, and botocore
        # refused it with a bare "Invalid endpoint"; $(cat file) leaves one)
        ok = ok and not any(ch.isspace() or not ch.isprintable() for ch in endpoint_url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise ConfigurationError(
            f"invalid endpoint_url={endpoint_url!r}{source} for the AWS enclave: expected "
            "http://HOST[:PORT] or https://HOST[:PORT]"
        )


def check_region(session, region: str, *, in_url: bool, option: str = "") -> None:
    """Refuse a region that botocore does not know (``mars-north-1``, ``us-east1``, and
    ``us-east-9``, shaped like one of AWS's but none): its endpoints' names do not resolve,
    and the first call failed with EndpointUnreachable after a minute of botocore's retries.
    (A region newer than this botocore is refused too: upgrading botocore lets it in.)
    ``option``: the command's option that gives the region (``in_url``: it did), for the
    enclave URL's ?region=."""
    from_where = (option or "in the enclave URL") if in_url else (
        f"from AWS_REGION, AWS_DEFAULT_REGION or ~/.aws/config; "
        f"{option or '?region= in the enclave URL'} sets another")
    if not re.match(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\Z", region):
        # (botocore's own InvalidRegionError, from the enclave's constructor)
        raise ConfigurationError(f"invalid region={region!r} ({from_where}): not a region name")
    known: set[str] = set()
    shaped = False
    try:  # (endpoints.json: partitions.json names pseudo-regions too, aws-global)
        for p in session._session.get_data("endpoints")["partitions"]:
            known.update(p.get("regions") or ())
            shaped = shaped or bool(re.match(p.get("regionRegex") or "$^", region))
    except Exception:  # noqa: BLE001 - no botocore data to tell by: the first call tells
        return
    if region in known:
        return
    if shaped:
        import botocore

        raise ConfigurationError(
            f"unknown region={region!r} ({from_where}): botocore {botocore.__version__} "
            "knows no AWS region of that name (e.g. us-east-1, eu-west-2); if it is a "
            "region newer than that, upgrade boto3 and botocore"
        )
    raise ConfigurationError(
        f"unknown region={region!r} ({from_where}): AWS has no region of that name "
        "(e.g. us-east-1, eu-west-2)"
    )


def arn_partition(session, region: str | None) -> tuple[str, str]:
    """``(partition, URL suffix)`` of ``region``, from botocore's data (no network): the
    ``arn:PARTITION:`` of every ARN kotta writes (``aws``; ``aws-cn`` in China,
    ``aws-us-gov`` in GovCloud, where ``arn:aws:`` policies are refused or grant nothing)
    and the suffix of service principals (``ec2.amazonaws.com.cn`` in China).  A region
    botocore does not know (an emulator's) is in ``aws``."""
    try:
        partition = session.get_partition_for_region(region)
        for p in session._session.get_data("endpoints")["partitions"]:
            if p["partition"] == partition:
                return partition, p["dnsSuffix"]
    except Exception:  # noqa: BLE001 - an unknown region (UnknownRegionError), no data
        pass
    return "aws", "amazonaws.com"


def _from_region(clients: Iterable, region: str) -> bool:
    """Whether one of ``clients`` goes to an endpoint botocore made of the region (AWS's
    own, ``sqs.REGION.amazonaws.com``), not to one configured for boto3."""
    return any(region in (urlsplit(c.meta.endpoint_url).hostname or "").split(".")
               for c in clients)


def client_config(retry_mode: str = "standard", max_attempts: int = 10, *, path_style=False):
    """Retries for throttling and 5xx are botocore's (standard or adaptive mode)."""
    from botocore.config import Config

    if retry_mode not in ("standard", "adaptive", "legacy"):
        raise ConfigurationError(f"retry_mode must be standard or adaptive, not {retry_mode!r}")
    kw: dict[str, Any] = {}
    if path_style:
        kw["s3"] = {"addressing_style": "path"}
    return Config(
        retries={"mode": retry_mode, "total_max_attempts": int(max_attempts)},
        # long polls wait up to 20 s: the read timeout must be longer
        read_timeout=MAX_WAIT + 40,
        connect_timeout=10,
        max_pool_connections=32,
        **kw,
    )


def botocore_validation_error():
    from botocore.exceptions import ValidationError

    return ValidationError


class _FirstContact:
    """Until one of the enclave's calls has been answered, a call that cannot connect
    (after botocore's retries) raises :class:`EndpointUnreachable` naming the region or
    endpoint_url: it raised botocore's EndpointConnectionError from deep inside the
    first call, and a first KottaExecutor said there was no kotta token.  Afterwards the
    network's faults are botocore's own errors again, to be tried again.  (Holds no
    reference to the enclave: a dropped enclave is collected as before.)"""

    def __init__(self, enclave: AwsEnclave, endpoint_url: str | None, *, in_url: bool):
        self.answered = False
        if endpoint_url:
            self.where = f"endpoint_url={endpoint_url!r}: is the endpoint right, and its server up?"
        else:
            where = "in the enclave URL" if in_url else "from the environment or ~/.aws/config"
            self.where = f"region={enclave.region!r} ({where}): is the region right?"
        self.name = enclave.name

    def watch(self, clients: Iterable) -> None:
        for client in clients:
            client.meta.events.register("after-call", self._answered)
            client.meta.events.register("after-call-error", self._failed)

    def _answered(self, **_) -> None:  # (any answer, an error too: the endpoint is there)
        self.answered = True

    def _failed(self, exception=None, **_) -> None:
        from botocore.exceptions import ConnectionError as NoConnection

        if not self.answered and isinstance(exception, NoConnection):
            raise EndpointUnreachable(
                f"cannot reach the AWS enclave {self.name!r} at {self.where} ({exception})"
            ) from exception


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _too_long(exc: BaseException) -> bool:
    """Whether SQS refused a send for the size of its messages (a queue whose
    MaximumMessageSize is lower than what the backend sends)."""
    code = _code(exc)
    if code.endswith("BatchRequestTooLong") or code.endswith("MessageTooLong"):
        return True
    message = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Message", ""))
    return code == "InvalidParameterValue" and "shorter than" in message


def _client_error():
    from botocore.exceptions import ClientError

    return ClientError


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))


#: how many rounds unprocessed batch entries (throttled, 5xx) are retried before giving up
BATCH_ROUNDS = 10
#: AWS errors that trying again does not cure (permissions, a malformed request)
LASTING_ERRORS = frozenset({
    "AccessDenied", "AccessDeniedException", "ValidationException",
    "UnrecognizedClientException", "InvalidClientTokenId", "MissingAuthenticationToken",
    "InvalidSignatureException", "IncompleteSignature",
})
#: why DynamoDB cancels a transaction that may go through if tried again
_TRANSIENT_CANCELLATIONS = frozenset({
    "TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded",
    "RequestLimitExceeded", "InternalServerError",
})


# --------------------------------------------------------------------------- queues


def ensure_queue(sqs, sqs_name: str, attributes: dict[str, str], tags: dict[str, str]):
    """Create an SQS queue, or bring an existing one's attributes in line: (url, created)."""
    try:
        url = sqs.get_queue_url(QueueName=sqs_name)["QueueUrl"]
    except _client_error() as exc:
        if _code(exc) not in _SQS_MISSING:
            raise
    else:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
        return url, False
    url = sqs.create_queue(QueueName=sqs_name, Attributes=attributes, tags=tags)["QueueUrl"]
    return url, True


def ensure_work_queue(
    sqs, names: Names, sqs_name: str, max_receive_count: int = MAX_RECEIVE_COUNT
) -> tuple[str, list[str]]:
    """A Kotta queue with its dead-letter queue and redrive policy: (url, names created)."""
    tags = {"kotta-enclave": names.name}
    created = []
    dlq_url, new = ensure_queue(
        sqs,
        names.dlq(sqs_name),
        {"MessageRetentionPeriod": str(RETENTION), "SqsManagedSseEnabled": "true",
         "MaximumMessageSize": str(SQS_LIMIT)},
        {**tags, "kotta-role": "dead-letters"},
    )
    if new:
        created.append(names.dlq(sqs_name))
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    url, new = ensure_queue(
        sqs,
        sqs_name,
        {
            "RedrivePolicy": json.dumps(redrive),
            "MessageRetentionPeriod": str(RETENTION),
            "VisibilityTimeout": "30",
            "SqsManagedSseEnabled": "true",
            # what SqsQueue.max_body assumes: a queue made before SQS took 1 MiB (2025),
            # or set lower, takes 256 KiB, and refuses bigger task bodies
            "MaximumMessageSize": str(SQS_LIMIT),
        },
        {**tags, "kotta-role": "tasks"},
    )
    if new:
        created.append(sqs_name)
    return url, created


# --------------------------------------------------------------------------- enclave


class AwsEnclave(Enclave):
    """The enclave ``aws://NAME``: SQS queues, an S3 bucket and DynamoDB tables."""

    def __init__(
        self,
        name: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        bucket: str | None = None,
        retry_mode: str = "standard",
        max_attempts: int | str = 10,
        create_queues: bool | str = False,
        session=None,
    ):
        self.names = Names(name, bucket)
        self.name = name
        given = endpoint_url
        endpoint_url = endpoint_url or os.environ.get("KOTTA_AWS_ENDPOINT_URL") or None
        self.endpoint_url = endpoint_url
        self.session = session or make_session(
            region=region, profile=profile, what=f"the AWS enclave {name!r}"
        )
        self.region = self.session.region_name
        #: the ARN partition of the enclave's region (and its URL suffix): every ARN of it
        self.partition, self.url_suffix = arn_partition(self.session, self.region)
        check_endpoint_url(endpoint_url, "" if endpoint_url == given else
                           " (from KOTTA_AWS_ENDPOINT_URL)")
        # a whole number, as written: int() read "1_0" as 10, "\u0663" (an Arabic three) as
        # 3, and cut 2.5 to 2, none of which a reader of the URL or call would see
        if type(max_attempts) is int:
            attempts = max_attempts
        elif isinstance(max_attempts, str) and max_attempts.isascii() and (
                max_attempts.isdigit()):
            attempts = int(max_attempts)
        else:
            attempts = 0
        if attempts < 1:  # (botocore's own error for 0 came out of `kotta` as a traceback)
            raise ConfigurationError(
                f"max_attempts must be an integer of at least 1, not {max_attempts!r}"
            )
        cfg = client_config(retry_mode, attempts, path_style=bool(endpoint_url))
        try:
            self.sqs = self.session.client("sqs", endpoint_url=endpoint_url, config=cfg)
            self.s3 = self.session.client("s3", endpoint_url=endpoint_url, config=cfg)
            self.dynamodb = self.session.client("dynamodb", endpoint_url=endpoint_url,
                                                config=cfg)
        except botocore_validation_error() as exc:  # (InvalidRegionError, say)
            raise ConfigurationError(
                f"cannot open the AWS enclave {name!r} (region={self.region!r}, "
                f"endpoint_url={endpoint_url!r}): {exc}"
            ) from None
        if not endpoint_url and self.region and _from_region(self.clients.values(), self.region):
            # (an emulator's endpoint takes any region: ?endpoint_url=, or boto3's own
            # AWS_ENDPOINT_URL, which was refused)
            check_region(self.session, self.region, in_url=bool(region))
        _FirstContact(self, endpoint_url, in_url=bool(region)).watch(self.clients.values())
        params = {"region": self.region}
        if endpoint_url:
            params["endpoint_url"] = endpoint_url
        for key, value in (("profile", profile), ("bucket", bucket)):
            if value:
                params[key] = value
        if retry_mode != "standard":
            params["retry_mode"] = retry_mode
        if attempts != 10:
            params["max_attempts"] = str(attempts)
        if create_queues not in (True, False, "1", "true", "yes", "0", "false", "no"):
            # (any other value was taken as off, silently: no queue was made, and the
            # first send said to run bootstrap)
            raise ConfigurationError(
                f"create_queues must be 1 or 0, not {create_queues!r}"
            )
        self.create_queues = create_queues in (True, "1", "true", "yes")
        if self.create_queues:
            params["create_queues"] = "1"
        self.url = f"aws://{name}?{urlencode(params)}"
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.blobs = S3Blobs(self)
        self.queue = SqsQueue(self)
        self.jobs = DynamoJobs(self)
        self.nodes = DynamoNodes(self)
        from .aws_records import DynamoRecords

        self.records = DynamoRecords(self)

    @classmethod
    def from_url(cls, url: str) -> AwsEnclave:
        name, params = parse_url(url)
        return cls(name, **params)

    @property
    def clients(self) -> dict[str, Any]:
        """The boto3 clients, by service (to count calls with ``meta.events``)."""
        return {"sqs": self.sqs, "s3": self.s3, "dynamodb": self.dynamodb}

    def not_provisioned(self, what: str) -> EnclaveNotProvisioned:
        return EnclaveNotProvisioned(
            f"the AWS enclave {self.name!r} is not set up in {self.region}: {what} does not "
            f"exist.  Run `kotta aws bootstrap {self.name}` (or deploy "
            "deploy/cloudformation.yaml) first."
        )

    def parallel(self, fn: Callable, items: Sequence) -> list:
        """``[fn(x) for x in items]``, several calls in flight at once (one API call per
        item is latency-bound, not throughput-bound).  One that raises is raised once every
        call has ended: raised at once (``Executor.map``), the calls still under way went
        on, and landed after the caller had its error.  A shutdown(cancel_futures=True)
        that raised, as the enclave could not be reached, having cancelled nothing, had a
        job cancelled a moment later all the same (a fresh-clone suite's failure)."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(8, thread_name_prefix="kotta-aws")
        calls = [self._pool.submit(fn, x) for x in items]
        wait_futures(calls)
        return [c.result() for c in calls]

    def lasting(self, exc: BaseException) -> bool:
        """AWS's refusals of the caller or the request too, and no credentials at all."""
        return (
            super().lasting(exc)
            or _code(exc) in LASTING_ERRORS
            or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")
        )

    def close(self) -> None:
        self.queue.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for client in self.clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()


# --------------------------------------------------------------------------- S3


class S3Blobs(BlobStore):
    """Blobs under ``blobs/`` in the enclave's bucket; keys are checked as the embedded
    store checks them (no ``/``, no ``..``)."""

    def __init__(self, enclave: AwsEnclave):
        self._e = enclave
        self._s3 = enclave.s3

    def _key(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid blob key {key!r}")
        return self._e.names.blob_prefix + key

    def _missing_bucket(self, exc) -> Exception:
        if _code(exc) in _S3_MISSING_BUCKET:
            return self._e.not_provisioned(f"the bucket {self._e.names.bucket}")
        return exc

    def put(self, key, data):
        full = self._key(key)
        try:
            self._s3.put_object(Bucket=self._e.names.bucket, Key=full, Body=bytes(data))
        except _client_error() as exc:
            raise self._missing_bucket(exc) from None

    def get(self, key):
        full = self._key(key)
        try:
            resp = self._s3.get_object(Bucket=self._e.names.bucket, Key=full)
        except _client_error() as exc:
            if _code(exc) in _S3_MISSING_KEY:
                raise KeyError(f"no blob {key!r} in the enclave") from None
            raise self._missing_bucket(exc) from None
        return resp["Body"].read()

    def delete(self, keys):
        full = [self._key(k) for k in keys]
        for chunk in _chunks(full, 1000):
            self._delete_objects(chunk)

    def older(self, prefix, before, *, after="", scan=1000):
        base = self._e.names.blob_prefix
        kw: dict[str, Any] = {"Bucket": self._e.names.bucket, "Prefix": base + prefix,
                              "MaxKeys": scan}
        if after:
            kw["StartAfter"] = base + after
        try:
            resp = self._s3.list_objects_v2(**kw)
        except _client_error() as exc:
            raise self._missing_bucket(exc) from None
        listed = resp.get("Contents") or []
        old = [o["Key"][len(base):] for o in listed if o["LastModified"].timestamp() < before]
        more = bool(resp.get("IsTruncated")) and listed
        return old, (listed[-1]["Key"][len(base):] if more else "")

    def _delete_objects(self, keys: list[str]) -> None:
        """One DeleteObjects call's worth.  S3 answers 200 even when it deleted only some:
        the keys it names in ``Errors`` are tried again (an ``InternalError`` or
        ``SlowDown``), and what still fails after :data:`BATCH_ROUNDS` tries raises, as a
        failed call does: an object nothing names any more would stay for ever."""
        for attempt in range(BATCH_ROUNDS):
            try:
                resp = self._s3.delete_objects(
                    Bucket=self._e.names.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                )
            except _client_error() as exc:
                raise self._missing_bucket(exc) from None
            errors = resp.get("Errors") or []
            if not errors:
                return
            codes = sorted({e.get("Code", "?") for e in errors})
            if "AccessDenied" in codes:  # not cured by trying again
                break
            keys = [e["Key"] for e in errors]
            if attempt + 1 < BATCH_ROUNDS:
                _backoff(attempt)
        raise RuntimeError(
            f"S3 did not delete {len(errors)} objects of bucket {self._e.names.bucket} "
            f"({', '.join(codes)}), e.g. {errors[0].get('Key')}"
        )


# --------------------------------------------------------------------------- SQS


def _receipt(sqs_name: str, handle: str, blob: str | None) -> str:
    return f"{sqs_name} {handle} {blob}" if blob else f"{sqs_name} {handle}"


def _parse_receipt(receipt: str) -> tuple[str, str, str | None]:
    parts = receipt.split(" ")
    if len(parts) not in (2, 3):
        raise ValueError(f"not a receipt of the AWS backend: {receipt[:80]!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


class SqsQueue(TaskQueue):
    """One SQS queue per Kotta queue (``kotta-NAME-test``, with ``kotta-NAME-test-dlq``) and
    one per client for replies (``kotta-NAME-reply-CLIENT``, made by :meth:`open_reply`)."""

    #: the largest base64 body sent inline; larger bodies go to S3 (tests lower it)
    max_body = SQS_LIMIT - 16 * 1024
    #: visibility timeout of taken reply messages until their (deferred) deletion
    reply_visibility = 300
    #: SQS keeps a received message hidden at most 12 hours from its receipt: past that,
    #: ChangeMessageVisibility fails and the message is delivered again (Node._watch_running)
    max_hidden = float(MAX_VISIBILITY)
    #: acknowledged (and taken) messages are deleted ten to a DeleteMessageBatch; an ack
    #: waits at most this many seconds for others to share its call.  Until then the
    #: message stays invisible; depth(), close() and exit flush what is waiting.
    delete_linger = 0.5
    #: replies wait at most this many seconds for others to the same client to share a
    #: SendMessageBatch (0: send at once).  A lost reply costs latency only: the client
    #: finds the result in the job table.
    reply_linger = 0.05
    #: how many dead letters :meth:`dead_letters` lists at most
    max_dead_letters = 1000
    #: how many messages whose dead letters were sent, but whose deletes failed, are
    #: remembered (not dead-lettered again when they come again)
    max_dead_sent = 1000
    #: seconds the dead letters a listing or ``kotta prune`` has read stay hidden (at
    #: most; they are shown again when it is done): longer than its reading of them all
    read_visibility = 900

    def __init__(self, enclave: AwsEnclave):
        self._e = enclave
        self._sqs = enclave.sqs
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], list] = {}
        self._pending_since: dict[tuple[str, str], float] = {}
        self._dead_sent: dict[str, None] = {}  # message ids (dead_letter)
        self._cv = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._closed = False
        atexit.register(_flush_at_exit, weakref.ref(self))

    # -- queue URLs

    def _url(self, sqs_name: str, *, missing_ok: bool = False, create: bool = True) -> str | None:
        url = self._urls.get(sqs_name)
        if url is not None:
            return url
        try:
            url = self._sqs.get_queue_url(QueueName=sqs_name)["QueueUrl"]
        except _client_error() as exc:
            if _code(exc) not in _SQS_MISSING:
                raise
            # With create_queues a reply queue is only made by a send, never by the
            # client's own poll (which would bring back a channel close_reply removed).
            reply = sqs_name.startswith(self._e.names.reply_prefix)
            if self._e.create_queues and (create or not reply):
                url = self._create(sqs_name)
            elif missing_ok:
                return None
            else:
                raise self._e.not_provisioned(f"the SQS queue {sqs_name}") from None
        with self._lock:
            self._urls[sqs_name] = url
        return url

    def _create(self, sqs_name: str) -> str:
        """Make a missing queue (only with ``create_queues``: development and tests)."""
        names = self._e.names
        if sqs_name.startswith(names.reply_prefix):
            return self.open_reply_queue(sqs_name)
        if sqs_name.endswith("-dlq"):
            ensure_work_queue(self._sqs, names, sqs_name[: -len("-dlq")])
            return self._sqs.get_queue_url(QueueName=sqs_name)["QueueUrl"]
        return ensure_work_queue(self._sqs, names, sqs_name)[0]

    def _forget(self, sqs_name: str) -> None:
        with self._lock:
            self._urls.pop(sqs_name, None)

    def _call(
        self, sqs_name: str, method: str, *, missing_ok: bool = False, create: bool = False, **kw
    ):
        """Call an SQS API on a queue; a queue that vanished raises (or returns None)."""
        url = self._url(sqs_name, missing_ok=missing_ok, create=create)
        if url is None:
            return None
        try:
            return getattr(self._sqs, method)(QueueUrl=url, **kw)
        except _client_error() as exc:
            if _code(exc) in _SQS_MISSING:
                self._forget(sqs_name)
                if missing_ok:
                    return None
                raise self._e.not_provisioned(f"the SQS queue {sqs_name}") from None
            raise

    @staticmethod
    def _is_reply(sqs_name_or_queue: str) -> bool:
        return sqs_name_or_queue.startswith("reply.")

    # -- encoding

    def _encode(self, body: bytes) -> str:
        text = "b:" + base64.b64encode(body).decode("ascii")
        if len(text) <= self.max_body:
            return text
        key = f"msg-{uuid.uuid4().hex}"
        self._e.blobs.put(key, body)
        return "s3:" + key

    def _decode(self, text: str) -> tuple[bytes, str | None, str]:
        """A message body -> (bytes, blob key, why the body cannot be read).  Anything
        malformed comes back as bytes the node will find corrupt (and dead-letter); a body
        kept in a blob that is gone or refused for good, as empty bytes and why: raised,
        the refusal failed every receive (the node's poller retrying it for ever), and the
        other messages each took came back later, each delivery counted.  A blob there but
        refused (or archived) keeps its key: the dead letter carries it, as a readable
        one's, and its prune deletes it (left out, no message named it: it stayed for good)."""
        if text.startswith("b:"):
            try:
                return base64.b64decode(text[2:], validate=True), None, ""
            except ValueError:
                return text.encode(), None, ""
        if text.startswith("s3:"):
            key = text[3:]
            try:
                return self._e.blobs.get(key), key, ""
            except (KeyError, ValueError) as exc:  # gone, or no key a blob may have
                why: object = exc.args[0] if exc.args else exc
                there = None
            except _client_error() as exc:
                if _code(exc) not in LASTING_ERRORS | _S3_UNREADABLE_KEY:
                    raise
                why, there = exc, key
            return b"", there, (f"its body, the blob {key} in s3://{self._e.names.bucket}/"
                                f"{self._e.names.blob_prefix}, cannot be read: {why}")
        return text.encode(), None, ""

    def _entries(self, items: Sequence[tuple[str, str, dict[str, Any]]]):
        """Batches for SendMessageBatch: 10 entries and < 1 MiB (UTF-8) a call."""
        batch: list[dict[str, Any]] = []
        size = 0
        for job_id, text, attrs in items:
            attributes = {JOB_ATTR: {"DataType": "String", "StringValue": job_id or "-"}}
            attributes.update(attrs)
            # bytes, as SQS counts them: a reason in four-byte characters counted as one
            # each put 1,066,930 bytes in a call SQS refuses (isascii is O(1): no copy of
            # an inline body, always base64)
            n = _utf8_len(text) + sum(
                len(k) + len(v["DataType"]) + _utf8_len(v["StringValue"])
                for k, v in attributes.items()
            )
            if batch and (len(batch) == 10 or size + n > SQS_LIMIT - 4096):
                yield batch
                batch, size = [], 0
            batch.append(
                {"Id": str(len(batch)), "MessageBody": text, "MessageAttributes": attributes}
            )
            size += n
        if batch:
            yield batch

    def _send(
        self, sqs_name: str, items, *, missing_ok: bool = False, sent: set[int] | None = None
    ) -> bool:
        """SendMessageBatch, retrying entries that failed on AWS's side; False if the queue
        does not exist and ``missing_ok``.  ``sent`` gets the indexes of the items SQS
        took (so that a caller can tell, when this raises, which were not sent)."""
        first = 0  # the index in items of the batch's first entry
        for batch in self._entries(items):
            entries = batch
            for attempt in range(BATCH_ROUNDS):
                try:
                    resp = self._call(
                        sqs_name,
                        "send_message_batch",
                        missing_ok=missing_ok,
                        create=True,
                        Entries=entries,
                    )
                except _client_error() as exc:
                    if not _too_long(exc):
                        raise
                    # A queue made before SQS took 1 MiB (or set lower) keeps 256 KiB.
                    # Trying again does not cure it: taken for a passing fault, the
                    # executor tried for two minutes, holding every other task back.
                    raise ConfigurationError(
                        f"SQS refused a message for {sqs_name} as too long "
                        f"({_code(exc)}: {exc.response.get('Error', {}).get('Message')}): "
                        f"the queue takes smaller messages than kotta sends (up to 1 MiB). "
                        f"Run `kotta aws bootstrap {self._e.name}` again (or update its "
                        f"stack) to raise the queues' MaximumMessageSize."
                    ) from None
                if resp is None:
                    return False
                failed = resp.get("Failed") or []
                if sent is not None:
                    refused = {f["Id"] for f in failed}
                    sent.update(first + int(e["Id"]) for e in entries if e["Id"] not in refused)
                if not failed:
                    break
                fatal = [f for f in failed if f.get("SenderFault")]
                if fatal:
                    raise RuntimeError(
                        f"SQS refused {len(fatal)} message(s) for {sqs_name}: "
                        f"{fatal[0].get('Code')}: {fatal[0].get('Message')}"
                    )
                ids = {f["Id"] for f in failed}
                entries = [e for e in entries if e["Id"] in ids]
                _backoff(attempt)
            else:
                codes = sorted({str(f.get("Code", "?")) for f in failed})
                raise RuntimeError(
                    f"SQS did not accept {len(entries)} message(s) for {sqs_name} after "
                    f"{BATCH_ROUNDS} tries ({', '.join(codes)})"
                )
            first += len(batch)
        return True

    def _send_encoded(self, sqs_name: str, items, *, missing_ok: bool = False) -> bool:
        """:meth:`_send` of items :meth:`_encode` made: when it raises, the bodies spilled
        to S3 for the messages it did not send are deleted (no message names them, and a
        retry spills its own: they stayed in the bucket for ever), and the error says so.
        Those of the messages sent stay: a node is to read them."""
        sent: set[int] = set()
        try:
            return self._send(sqs_name, items, missing_ok=missing_ok, sent=sent)
        except Exception as exc:
            self._drop_spilled(exc, [t for i, (_, t, _) in enumerate(items) if i not in sent])
            raise

    def _drop_spilled(self, exc: Exception, texts: Iterable[str]) -> None:
        """Delete the bodies spilled to S3 (``s3:KEY``) among ``texts``, those of messages
        that a failure (``exc``) left unsent, and add to ``exc`` a note that says so."""
        blobs = [t[3:] for t in texts if t.startswith("s3:")]
        if not blobs:
            return
        what = f"{len(blobs)} {'body' if len(blobs) == 1 else 'bodies'} spilled to S3"
        try:
            self._e.blobs.delete(blobs)
        except Exception as left:  # noqa: BLE001 - the send's failure is the news
            exc.add_note(f"kotta: the {what} for the messages not sent could not be "
                         f"deleted ({type(left).__name__}: {left}): they are left "
                         f"in s3://{self._e.names.bucket}/{self._e.names.blob_prefix}"
                         f" (e.g. {blobs[0]})")
        else:
            exc.add_note(f"kotta: deleted the {what} for the messages not sent")

    # -- the interface

    def send(self, queue: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        sqs_name = self._e.names.queue(queue)
        items = []
        try:
            for m in messages:
                items.append((m.job_id, self._encode(m.body), {}))
        except Exception as exc:  # a spill to S3 failed: those before it are sent never
            self._drop_spilled(exc, [t for _, t, _ in items])
            raise
        if self._is_reply(queue):
            # A reply channel whose client is gone is not an error: the job table has
            # the result.  Replies are batched (reply_linger); tasks never are.
            if self.reply_linger > 0:
                self._defer("send", sqs_name, items)
            else:
                self._apply("send", sqs_name, items)
            return
        self._send_encoded(sqs_name, items)

    def _receive(self, sqs_name, max_messages, visibility, wait, *, missing_ok=False,
                 bodies=True):
        """``bodies`` False: a body kept in S3 is not fetched (its key is given, the body
        empty): the dead letters' listing and prune read ids and attributes only, and
        fetched up to 1,000 bodies of a MiB or more to show them."""
        out: list[tuple[dict, bytes, str | None, str]] = []
        while len(out) < max_messages:
            n = min(10, max_messages - len(out))
            resp = self._call(
                sqs_name,
                "receive_message",
                missing_ok=missing_ok,
                MaxNumberOfMessages=n,
                VisibilityTimeout=visibility,
                WaitTimeSeconds=0 if out else wait,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
            if resp is None:
                return None
            msgs = resp.get("Messages") or []
            for m in msgs:
                text = m.get("Body", "")
                if not bodies and text.startswith("s3:"):
                    key = text[3:]  # (one no blob may have, as _decode takes it: none)
                    out.append((m, b"", key if _KEY.match(key) and ".." not in key else None,
                                ""))
                    continue
                out.append((m, *self._decode(text)))
            if len(msgs) < n:
                break
        return out

    def receive(self, queue, max_messages, visibility_timeout, holder, wait_seconds=0.0):
        if max_messages <= 0:
            return []
        sqs_name = self._e.names.queue(queue)
        self._flush_sends(sqs_name)
        got = self._receive(
            sqs_name, max_messages, _whole_seconds(visibility_timeout), _wait(wait_seconds)
        )
        return [
            Delivery(
                _job_id(m),
                body,
                _receipt(sqs_name, m["ReceiptHandle"], blob),
                int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                _sent(m),
                str(m.get("MessageId") or ""),
                fault,
            )
            for m, body, blob, fault in got or []
        ]

    def take(self, queue, max_messages, wait_seconds=0.0):
        if max_messages <= 0:
            return []
        sqs_name = self._e.names.queue(queue)
        self._flush_sends(sqs_name)
        reply = self._is_reply(queue)
        got = self._receive(
            sqs_name, max_messages, self.reply_visibility, _wait(wait_seconds), missing_ok=reply
        )
        if got is None:  # a reply channel not opened yet, or closed
            return []
        if got:
            self._defer("delete", sqs_name, [(m["ReceiptHandle"], blob) for m, _, blob, _ in got])
        return [Message(_job_id(m), body) for m, body, _, _ in got]

    def _by_queue(
        self, deliveries: Iterable[Delivery]
    ) -> dict[str, list[tuple[str, str | None, Delivery]]]:
        out: dict[str, list[tuple[str, str | None, Delivery]]] = {}
        for d in deliveries:
            sqs_name, handle, blob = _parse_receipt(d.receipt)
            out.setdefault(sqs_name, []).append((handle, blob, d))
        return out

    def _visibility(self, deliveries, seconds: int) -> None:
        for sqs_name, held in self._by_queue(deliveries).items():
            held = list({h: (h, b, d) for h, b, d in held}.values())  # (see _delete)
            for chunk in _chunks(held, 10):
                entries = [
                    {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": seconds}
                    for i, (h, _, _) in enumerate(chunk)
                ]
                # Entries that fail name stale receipts (acknowledged, or delivered again
                # elsewhere): like the embedded queue, they change nothing.
                self._retry_batch(sqs_name, "change_message_visibility_batch", entries)

    def _retry_batch(
        self, sqs_name: str, method: str, entries: list[dict], ok: set[str] | None = None
    ) -> set[str]:
        """A batch call on receipts; returns the ids that succeeded (``ok``, which has them
        too when this raises).  Entries refused for the sender's fault (a stale receipt)
        are dropped; others are retried."""
        ok = set() if ok is None else ok
        for attempt in range(BATCH_ROUNDS):
            resp = self._call(sqs_name, method, missing_ok=True, Entries=entries)
            if resp is None:
                return ok
            ok.update(s["Id"] for s in resp.get("Successful") or [])
            retry = {f["Id"] for f in resp.get("Failed") or [] if not f.get("SenderFault")}
            if not retry:
                return ok
            entries = [e for e in entries if e["Id"] in retry]
            if attempt + 1 < BATCH_ROUNDS:
                _backoff(attempt)
        # what failed on AWS's side every time: raised, as _send does, never swallowed (a
        # node that took a message for extended, or deleted, would see it delivered again)
        codes = sorted({f.get("Code", "?") for f in resp.get("Failed") or []
                        if f["Id"] in retry})
        raise RuntimeError(
            f"SQS {method} on {sqs_name} failed for {len(entries)} entries after "
            f"{BATCH_ROUNDS} tries ({', '.join(codes)})"
        )

    def _delete(self, sqs_name: str, held: Sequence[tuple[str, str | None]]) -> None:
        blobs: list[str] = []
        # one receipt once: SQS refuses a whole batch that names one twice (a delivery
        # acked twice within the linger), and the others in it would be lost with it
        held = list({h: (h, b) for h, b in held}.values())
        try:
            for chunk in _chunks(held, 10):
                entries = [{"Id": str(i), "ReceiptHandle": h} for i, (h, _) in enumerate(chunk)]
                ok: set[str] = set()
                try:
                    self._retry_batch(sqs_name, "delete_message_batch", entries, ok)
                finally:
                    blobs += [b for i, (_, b) in enumerate(chunk) if b and str(i) in ok]
        finally:
            # the bodies of the messages deleted, even when others of the batch kept failing
            # (and this raises): no message names them any more (they stayed for ever)
            if blobs:
                self._e.blobs.delete(blobs)

    # -- deferred calls: deletes, and sends to reply channels, ten to a call

    def _linger(self, kind: str) -> float:
        return self.delete_linger if kind == "delete" else self.reply_linger

    def _defer(self, kind: str, sqs_name: str, items: Sequence) -> None:
        """Queue ``items`` for one batch call; full batches go at once, the rest when the
        oldest has waited its linger (or at the next flush)."""
        key = (kind, sqs_name)
        if self._closed:  # no flusher any more: at once
            self._apply(kind, sqs_name, list(items))
            return
        full = []
        with self._cv:
            waiting = self._pending.setdefault(key, [])
            if not waiting:
                self._pending_since[key] = time.monotonic()
            waiting.extend(items)
            while len(waiting) >= 10:
                full.append(waiting[:10])
                del waiting[:10]
            if waiting:
                if self._flusher is None:  # (holding the queue weakly: _run_flusher)
                    self._flusher = threading.Thread(
                        target=_run_flusher, args=(weakref.ref(self),),
                        name="kotta-sqs-batches", daemon=True,
                    )
                    self._flusher.start()
                self._cv.notify()
            else:
                del self._pending[key]
                self._pending_since.pop(key, None)
        if full:
            self._apply_each([(kind, sqs_name, chunk) for chunk in full])

    def _apply(self, kind: str, sqs_name: str, items: list) -> None:
        if kind == "delete":
            self._delete(sqs_name, items)
        elif not self._send_encoded(sqs_name, items, missing_ok=True):
            blobs = [t[3:] for _, t, _ in items if t.startswith("s3:")]
            if blobs:  # the client is gone: so are its replies
                self._e.blobs.delete(blobs)

    def _take_pending(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list]:
        with self._cv:
            out = {k: self._pending.pop(k) for k in list(keys) if k in self._pending}
            for k in out:
                self._pending_since.pop(k, None)
        return out

    def _flush_sends(self, sqs_name: str) -> None:
        if ("send", sqs_name) in self._pending:
            for (kind, name), items in self._take_pending([("send", sqs_name)]).items():
                self._apply(kind, name, items)

    def flush(self, sqs_name: str | None = None) -> None:
        """Make now the calls that acks, takes and replies left waiting (one queue, or all)."""
        with self._cv:
            keys = [k for k in self._pending if sqs_name is None or k[1] == sqs_name]
        # sends first: a reply sent and taken in this process is in the queue to take
        self._apply_each([(kind, name, items) for (kind, name), items
                          in sorted(self._take_pending(keys).items(), reverse=True)])

    def _apply_each(self, calls: Sequence[tuple[str, str, list]]) -> None:
        """Make each call ``(kind, sqs name, items)``, whatever became of the one before:
        they are no longer waiting (the first failure ended the loop, and the others were
        lost without a word).  The first failure is raised, after; the others are logged."""
        failure = None
        for kind, name, items in calls:
            try:
                self._apply(kind, name, items)
            except Exception as exc:  # noqa: BLE001 - raised below
                if failure is not None:
                    log.exception("%s of %d messages on %s failed", kind, len(items), name)
                else:
                    failure = exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()

    def extend(self, deliveries, visibility_timeout):
        self._visibility(deliveries, _whole_seconds(visibility_timeout))

    def release(self, deliveries):
        self._visibility(deliveries, 0)

    def ack(self, deliveries):
        for sqs_name, held in self._by_queue(deliveries).items():
            self._defer("delete", sqs_name, [(h, b) for h, b, _ in held])

    def dead_letter(self, deliveries, reason):
        now = repr(time.time())
        # spelled out, what SQS refuses in an attribute (as in a body): a control character,
        # a lone surrogate.  Sent as they were, the dead letter failed each time the message
        # came, until SQS's redrive moved it without its reason.
        reason = _NOT_SQS_TEXT.sub(lambda c: ascii(c[0])[1:-1], reason or "dead-lettered")
        reason = reason[:4000]
        for sqs_name, held in self._by_queue(deliveries).items():
            # a message whose dead letter was sent but whose delete failed comes again:
            # only its delete is made again (it was dead-lettered a second time)
            with self._lock:
                known = [x for x in held if x[2].message_id in self._dead_sent]
            fresh = [x for x in held if x not in known]
            items = []
            for _, blob, d in fresh:
                # a spilled body stays in S3 for the dead letter; an inline one is re-encoded
                text = "s3:" + blob if blob else self._encode(d.body)
                attrs = {
                    REASON_ATTR: {"DataType": "String", "StringValue": reason},
                    COUNT_ATTR: {"DataType": "Number", "StringValue": str(d.receive_count)},
                    DEAD_AT_ATTR: {"DataType": "Number", "StringValue": now},
                }
                if d.message_id:  # (dead_letters lists one dead letter a message)
                    attrs[DEAD_OF_ATTR] = {"DataType": "String", "StringValue": d.message_id}
                items.append((d.job_id, text, attrs))
            sent: set[int] = set()
            try:
                self._send(self._e.names.dlq(sqs_name), items, sent=sent)
            finally:
                # the originals of the dead letters sent, even when others failed (and this
                # raises): left, they came again and were dead-lettered a second time
                done = known + [x for i, x in enumerate(fresh) if i in sent]
                ids = [d.message_id for _, _, d in done if d.message_id]
                with self._lock:  # (until their delete is made)
                    self._dead_sent.update(dict.fromkeys(ids))
                    while len(self._dead_sent) > self.max_dead_sent:
                        del self._dead_sent[next(iter(self._dead_sent))]
                if done:
                    self._delete(sqs_name, [(h, None) for h, _, _ in done])
                with self._lock:
                    for i in ids:
                        self._dead_sent.pop(i, None)

    def dead_letters(self, queue):
        """The dead letters of ``queue``, oldest first, without consuming them: they are
        received, hidden for :attr:`read_visibility` (so that each is read once; hidden
        for 10 s, those of a listing that took longer came again, and a receive of only
        those ended it, part of the queue unlisted), then made visible again at once.

        The receive count of a message SQS redrove (no ``kotta_receive_count``) is the
        queue's ``maxReceiveCount``: SQS moves a message once it has been delivered that
        many times.  Its ApproximateReceiveCount would not do: every listing is itself a
        receive of the dead letter, so the count would grow with each listing.

        One message dead-lettered more than once (a send whose answer was lost: botocore
        sent it again, or the message came again and was dead-lettered again) is listed
        once, its first dead letter: `kotta dead-letters` showed its job twice."""
        sqs_name = self._e.names.queue(queue)
        dlq = self._e.names.dlq(sqs_name)
        seen: dict[str, dict[str, Any]] = {}
        handles: list[str] = []
        max_receives: list[int | None] = []  # read once, at the first redriven message
        confirming = False
        try:
            while len(seen) < self.max_dead_letters:
                # Short polls while they bring new messages; an empty one is confirmed by a
                # long poll of a second, which (unlike a short poll, which asks only some of
                # SQS's servers) answers empty only when the queue has nothing to show.
                got = self._receive(dlq, 10, self.read_visibility,
                                    1 if confirming else 0, bodies=False)
                new = [(m, b) for m, b, _, _ in got or [] if m["MessageId"] not in seen]
                if not new:
                    if confirming:
                        break
                    confirming = True
                    continue
                confirming = False
                for m, _ in new:
                    attrs = m.get("MessageAttributes") or {}
                    sys_attrs = m.get("Attributes") or {}
                    reason = attrs.get(REASON_ATTR, {}).get("StringValue")
                    if COUNT_ATTR in attrs:
                        count = int(attrs[COUNT_ATTR]["StringValue"])
                    else:  # moved by SQS's redrive policy
                        if not max_receives:
                            max_receives.append(self._max_receive_count(sqs_name))
                        count = max_receives[0]
                        if count is None:  # no redrive policy any more: this listing is one
                            count = max(0, int(sys_attrs.get("ApproximateReceiveCount", 1)) - 1)
                    if DEAD_AT_ATTR in attrs:
                        dead_at = float(attrs[DEAD_AT_ATTR]["StringValue"])
                    else:
                        dead_at = int(sys_attrs.get("SentTimestamp", 0)) / 1000
                    seen[m["MessageId"]] = {
                        "of": attrs.get(DEAD_OF_ATTR, {}).get("StringValue") or m["MessageId"],
                        "job_id": _job_id(m),
                        "receive_count": count,
                        "reason": reason
                        or "redriven by SQS: received more often than the queue's maxReceiveCount",
                        "dead_at": dead_at,
                    }
                    handles.append(m["ReceiptHandle"])
        finally:
            if handles:
                self._visibility(
                    [Delivery("", b"", _receipt(dlq, h, None), 0) for h in handles], 0)
        first: dict[str, dict[str, Any]] = {}
        for letter in sorted(seen.values(), key=lambda d: d["dead_at"]):
            first.setdefault(letter.pop("of"), letter)
        return list(first.values())

    def drop_dead_letters(self, queue: str, job_ids: set[str]) -> int:
        """Delete the dead letters of ``queue`` whose jobs are ``job_ids`` (``kotta
        prune``); the others are made visible again.  The number deleted.  Every dead
        letter is read, not the first :attr:`max_dead_letters` (a listing's limit): those
        of pruned jobs past it stayed for 14 days.  So that none is read twice, those
        read are hidden for :attr:`read_visibility` (until the end, then shown again)."""
        dlq = self._e.names.dlq(self._e.names.queue(queue))
        seen: set[str] = set()
        dropped = 0
        gone: list[tuple[str, str | None]] = []
        kept: list[str] = []
        confirming = False
        try:
            while True:
                got = self._receive(dlq, 10, self.read_visibility, 1 if confirming else 0,
                                    missing_ok=True, bodies=False)
                new = [(m, b) for m, _, b, _ in got or [] if m["MessageId"] not in seen]
                if not new:
                    if confirming or got is None:  # (None: no such queue)
                        break
                    confirming = True
                    continue
                confirming = False
                for m, blob in new:
                    seen.add(m["MessageId"])
                    if _job_id(m) in job_ids:
                        gone.append((m["ReceiptHandle"], blob))
                    else:
                        kept.append(m["ReceiptHandle"])
                if len(gone) >= 10:  # (as they come: a queue's all may be many)
                    self._delete(dlq, gone)
                    dropped, gone = dropped + len(gone), []
            if gone:
                self._delete(dlq, gone)
                dropped += len(gone)
        finally:
            if kept:
                self._visibility(
                    [Delivery("", b"", _receipt(dlq, h, None), 0) for h in kept], 0)
        return dropped

    def _max_receive_count(self, sqs_name: str) -> int | None:
        """The ``maxReceiveCount`` of the queue's redrive policy (None without one)."""
        resp = self._call(
            sqs_name, "get_queue_attributes", missing_ok=True, AttributeNames=["RedrivePolicy"]
        )
        policy = ((resp or {}).get("Attributes") or {}).get("RedrivePolicy")
        try:
            return int(json.loads(policy)["maxReceiveCount"]) if policy else None
        except (ValueError, KeyError, TypeError):
            return None

    def depth(self, queue):
        sqs_name = self._e.names.queue(queue)
        self.flush(sqs_name)
        resp = self._call(
            sqs_name,
            "get_queue_attributes",
            missing_ok=self._is_reply(queue),
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        if resp is None:
            return 0
        return sum(int(v) for v in (resp.get("Attributes") or {}).values())

    def open_reply_queue(self, sqs_name: str) -> str:
        url = self._sqs.create_queue(
            QueueName=sqs_name,
            Attributes={"MessageRetentionPeriod": "86400", "SqsManagedSseEnabled": "true",
                        "MaximumMessageSize": str(SQS_LIMIT)},
            tags={"kotta-enclave": self._e.name, "kotta-role": "reply"},
        )["QueueUrl"]
        with self._lock:
            self._urls[sqs_name] = url
        return url

    def open_reply(self, client_id: str) -> str:
        """Create the client's reply queue (``kotta-NAME-reply-CLIENT``)."""
        queue = f"reply.{client_id}"
        self.open_reply_queue(self._e.names.queue(queue))
        return queue

    def close_reply(self, client_id: str) -> None:
        sqs_name = self._e.names.queue(f"reply.{client_id}")
        self._take_pending([("delete", sqs_name), ("send", sqs_name)])  # gone with the queue
        url = self._url(sqs_name, missing_ok=True)
        self._forget(sqs_name)
        if url is None:
            return
        try:
            self._sqs.delete_queue(QueueUrl=url)
        except _client_error() as exc:
            if _code(exc) not in _SQS_MISSING:
                raise


def _run_flusher(ref: weakref.ref) -> None:
    """The thread of :meth:`SqsQueue._defer`'s batches.  It holds its queue weakly while
    nothing waits: a queue dropped without close() (the enclave of each executor made from
    an ``aws://`` URL) is collected, its boto3 clients with it, and the thread ends within
    FLUSHER_IDLE seconds.  (It held it for good: a thread and about 15 MB an executor.)"""
    while (q := ref()) is not None:
        with q._cv:
            while True:
                if q._closed:
                    return
                now = time.monotonic()
                due = [k for k, t in q._pending_since.items()
                       if now - t >= q._linger(k[0])]  # fmt: skip
                if due:
                    break
                if q._pending_since:
                    wait = min(t + q._linger(k[0]) - now
                               for k, t in q._pending_since.items())  # fmt: skip
                    q._cv.wait(max(wait, 0.001))
                else:
                    cv, q = q._cv, None
                    cv.wait(FLUSHER_IDLE)
                    if (q := ref()) is None:
                        return
        for (kind, name), items in q._take_pending(due).items():
            try:
                q._apply(kind, name, items)
            except Exception:  # noqa: BLE001 - an undeleted message is delivered again;
                # a lost reply is found in the job table by the client's reconcile
                log.exception("%s of %d messages on %s failed", kind, len(items), name)
        del q


def _flush_at_exit(ref) -> None:
    queue = ref()
    if queue is not None:
        try:
            queue.close()
        except Exception:  # noqa: BLE001 - at exit, an undeleted message is only redelivered
            pass


def _sent(m: dict) -> float | None:
    stamp = m.get("Attributes", {}).get("SentTimestamp")
    return int(stamp) / 1000 if stamp else None


def _job_id(m: dict) -> str:
    return (m.get("MessageAttributes") or {}).get(JOB_ATTR, {}).get("StringValue", "")


def _whole_seconds(seconds: float) -> int:
    """SQS visibility timeouts are whole seconds: round up, within SQS's limits."""
    return max(0, min(MAX_VISIBILITY, math.ceil(seconds)))


def _wait(seconds: float) -> int:
    return max(0, min(MAX_WAIT, math.ceil(seconds))) if seconds > 0 else 0


# --------------------------------------------------------------------------- DynamoDB values


def _n(value: float | int) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(int(value))}


def _s_or_null(value: str | None) -> dict[str, Any]:
    return {"NULL": True} if value is None else {"S": value}


def _event(ts: float, state: JobState, detail: str | None) -> dict[str, Any]:
    return {"M": {"t": _n(ts), "s": {"S": str(state)}, "d": _s_or_null(detail)}}


def _value(av: dict[str, Any]) -> Any:
    ((kind, v),) = av.items()
    if kind == "S" or kind == "BOOL" or kind == "B":
        return v
    if kind == "N":
        return float(v) if any(c in v for c in ".eE") else int(v)
    if kind == "NULL":
        return None
    if kind == "L":
        return [_value(x) for x in v]
    if kind == "M":
        return {k: _value(x) for k, x in v.items()}
    raise ValueError(f"unexpected DynamoDB type {kind}")


def _num(item: dict, name: str) -> float | None:
    av = item.get(name)
    if av is None or "NULL" in av:
        return None
    return float(av["N"])


def _str(item: dict, name: str) -> str | None:
    av = item.get(name)
    if av is None or "NULL" in av:
        return None
    return av["S"]


_RECORD_ATTRS = (
    "job_id", "owner", "client", "queue", "fn", "walltime", "state", "created", "updated", "n",
    "node", "attempts", "reason", "started", "finished", "kill_requested", "usage",
)  # fmt: skip
#: attributes the owner-created index carries besides its keys (never results or history)
INDEX_ATTRS = tuple(a for a in _RECORD_ATTRS if a not in ("job_id", "owner", "created"))


#: the attribute in which each conditional write of a job leaves its own token
#: (see :meth:`DynamoJobs._update`)
WRITE_TOKEN = "write_token"
#: DynamoDB's limit on a partition key value
MAX_KEY_BYTES = 2048


def _keyable(job_id: str) -> bool:
    """Whether DynamoDB accepts ``job_id`` as a key.  Ids it refuses (empty: a foreign
    message on a work queue has no ``kotta_job`` attribute; or longer than 2048 bytes)
    name no job, and are answered as unknown jobs, as the embedded backend answers them,
    instead of failing the call with a ValidationException."""
    return isinstance(job_id, str) and 0 < len(job_id.encode("utf-8", "replace")) <= MAX_KEY_BYTES


#: what a job's item holds besides result, usage and reason, approximately: its keys and
#: fields, and a history of a few dozen events
_ITEM_BASE = 16 * 1024


def _bounded_usage(usage: dict | None, limit: int) -> str | None:
    """``usage`` as JSON, at most ``limit`` bytes, to share a 400 KB DynamoDB item.

    A node's monitor keeps up to 2,000 samples of a task (node/monitor.py), more than the
    item has room for.  Over the limit, the samples are thinned evenly,
    the first and the last always kept, and ``samples_downsampled_from`` says how many
    there were; a usage that is still too large (no samples list, or other keys too
    large) is recorded as ``{"truncated": true}`` rather than failing the write."""
    if usage is None:
        return None
    text = json.dumps(usage)
    if len(text) <= limit:
        return text
    samples = usage.get("samples") if isinstance(usage, dict) else None
    if isinstance(samples, list) and len(samples) > 2:
        total = len(samples)
        taken = usage.get("samples_downsampled_from", total)  # the node thinned them first
        keep = max(2, min(total - 1, int(total * limit / len(text))))
        while True:
            step = (total - 1) / (keep - 1)
            thinned = [samples[round(i * step)] for i in range(keep)]
            text = json.dumps({**usage, "samples": thinned, "samples_downsampled_from": taken})
            if len(text) <= limit or keep == 2:
                break
            keep = max(2, int(keep * 0.9))
        if len(text) <= limit:
            return text
    log.warning("usage record of %d bytes not kept: over %d bytes", len(text), limit)
    return json.dumps({"truncated": True})


def _bounded_text(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + " ... (cut)"


def _projection(attrs: Iterable[str]) -> tuple[str, dict[str, str]]:
    names = {f"#{a}": a for a in attrs}
    return ", ".join(names), names


# --------------------------------------------------------------------------- jobs


class _DynamoTable:
    """What the job and node tables share: their enclave, client, table name, and calls
    that say to run ``kotta aws bootstrap`` when the table does not exist."""

    table: str

    def __init__(self, enclave: AwsEnclave, table: str):
        self._e = enclave
        self._ddb = enclave.dynamodb
        self.table = table

    def _call(self, method: str, **kw):
        try:
            return getattr(self._ddb, method)(**kw)
        except _client_error() as exc:
            if _code(exc) in _DDB_MISSING:
                raise self._e.not_provisioned(f"the DynamoDB table {self.table}") from None
            raise


class DynamoJobs(_DynamoTable, JobTable):
    """The table ``kotta-NAME-jobs`` (key ``job_id``; GSI ``owner-created``)."""

    #: results up to this size are kept in the item (DynamoDB items are limited to 400 KB,
    #: history and other attributes included); larger ones go to S3 (tests lower it)
    max_result = 300 * 1024
    #: a finish whose item would be larger than this (result, usage, reason and what the
    #: item already holds, approximately) spills its result to S3 whatever its size: a
    #: margin under DynamoDB's 400 KB for a history longer than :data:`_ITEM_BASE` allows
    max_item = 350 * 1024
    #: usage records are kept under this many bytes of JSON (see :func:`_bounded_usage`)
    max_usage = 100 * 1024
    #: reasons are cut to this many characters
    max_reason = 16 * 1024
    #: kill_requested() reads the table at most this often (a busy node asks every 0.25 s);
    #: in between it answers from its last read, so a kill is noticed within this time.
    #: request_kill() in this process forgets the last read.
    kill_poll_interval = 1.0

    def __init__(self, enclave: AwsEnclave):
        super().__init__(enclave, enclave.names.jobs_table)
        self._kills: tuple[float, set[str], set[str]] | None = None


    def _update(
        self,
        key: str,
        update: str,
        condition: str,
        values: dict,
        names: dict,
        applied: Callable[[dict], bool] | None = None,
    ) -> bool:
        """One conditional UpdateItem; False when the condition does not hold.

        botocore retries a call whose response was lost (a 5xx after the write, a read
        timeout), and the retry of a write DynamoDB had applied fails its own condition.
        So every write also sets a token of its own (``write_token``), and a failed
        condition returns the old item: if it carries our token, the write was ours and
        counts as made.  ``applied(old item)`` may recognise the write another way (a later
        write can have replaced the token)."""
        if not _keyable(key):
            return False
        if not update.startswith("SET "):
            raise ValueError(f"an update of a job sets something: {update!r}")
        token = uuid.uuid4().hex
        values = {**values, ":wtok": {"S": token}}
        names = {**names, "#wtok": WRITE_TOKEN}
        try:
            self._call(
                "update_item",
                TableName=self.table,
                Key={"job_id": {"S": key}},
                UpdateExpression="SET #wtok = :wtok, " + update[len("SET ") :],
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
                ExpressionAttributeNames=names,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return True
        except _client_error() as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise
            old = exc.response.get("Item") or {}
            if _str(old, WRITE_TOKEN) == token or (old and applied is not None and applied(old)):
                log.info("a retried write to job %s had been applied", key)
                return True
            return False

    @staticmethod
    def _state_in(allowed: Iterable[JobState], values: dict) -> str:
        marks = []
        for i, s in enumerate(sorted(str(x) for x in allowed)):
            values[f":s{i}"] = {"S": s}
            marks.append(f":s{i}")
        return f"#state IN ({', '.join(marks)})"

    def create(self, jobs: Sequence[NewJob], *, enqueue: bool = True) -> None:
        """Write the job records, then send the tasks (SendMessageBatch): a task is never
        on a queue without its record.

        A record is put only if its job id is not recorded yet (TransactWriteItems, 100 a
        call, each put conditional on ``attribute_not_exists``; BatchWriteItem has no
        conditions).  A create that raised after its records were written (SQS failed, or
        a response was lost) is retried by the executor: that retry must not put back a
        pending record over a job a node has meanwhile started or finished, which would
        run it again and record a second result.  Such a job keeps its record, and its
        task is queued again; a node's claim drops that extra delivery if the job has
        started (see ``Node.claim``)."""
        if not jobs:
            return
        now = time.time()
        items = []
        for i, j in enumerate(jobs):
            # a microsecond apart, so that list() orders a batch as the embedded one does
            created = now + i * 1e-6
            items.append({
                "job_id": {"S": j.job_id},
                "owner": {"S": j.owner},
                "client": {"S": j.client},
                "queue": {"S": j.queue},
                "fn": {"S": j.fn},
                "walltime": _n(float(j.walltime)),
                "n": _n(j.n),
                "state": {"S": str(JobState.PENDING)},
                "created": _n(created),
                "updated": _n(created),
                "attempts": _n(0),
                "kill_requested": {"BOOL": False},
                "history": {"L": [_event(created, JobState.PENDING, None)]},
            })
        # one put an id (a transaction may not name an item twice), of its first job: a
        # later one in the batch finds it recorded, as the embedded backend's does
        firsts: dict[str, dict] = {}
        for item in items:
            firsts.setdefault(item["job_id"]["S"], item)
        for chunk in _chunks(list(firsts.values()), 100):
            self._put_new(chunk)
        if not enqueue:
            return
        by_queue: dict[str, list[Message]] = {}
        for j in jobs:
            by_queue.setdefault(j.queue, []).append(Message(j.job_id, j.body))
        for queue, messages in by_queue.items():
            self._e.queue.send(queue, messages)

    def _put_new(self, items: list[dict]) -> None:
        """Put the records whose job ids are new, in one transaction per round.  DynamoDB
        cancels the whole transaction if any put fails its condition, and says which:
        those are recorded already and are left out of the next round.  Cancellations for
        any other reason (a conflicting write, throttling) are retried, at most
        :data:`BATCH_ROUNDS` rounds, then this raises."""
        ClientError = _client_error()
        why = "not said why"  # the last cancellation's reasons, for the error that lasts
        for attempt in range(BATCH_ROUNDS):
            if not items:
                return
            try:
                self._call("transact_write_items", TransactItems=[
                    {"Put": {"TableName": self.table, "Item": item,
                             "ConditionExpression": "attribute_not_exists(job_id)"}}
                    for item in items
                ])
                return
            except ClientError as exc:
                if _code(exc) != "TransactionCanceledException":
                    raise
                reasons = exc.response.get("CancellationReasons") or []
                why = ", ".join(sorted(
                    {str(r.get("Code")) for r in reasons} - {"None", "ConditionalCheckFailed"}
                )) or str(exc)
                if len(reasons) != len(items):  # not said which: try them all again
                    _backoff(attempt)
                    continue
                codes = {str(r.get("Code")) for r in reasons} - {"None", "ConditionalCheckFailed"}
                if codes - _TRANSIENT_CANCELLATIONS:  # a put DynamoDB will never take
                    said = "; ".join(sorted({
                        f"{r.get('Code')}: {r.get('Message', '')}" for r in reasons
                        if str(r.get("Code")) in codes
                    }))
                    raise RecordsRefused(f"DynamoDB refused job records: {said}") from exc
                left = [i for i, r in zip(items, reasons, strict=True)
                        if r.get("Code") != "ConditionalCheckFailed"]
                if len(left) < len(items):  # some are recorded: the rest go at once
                    items = left
                    continue
                _backoff(attempt)
        if items:
            raise RuntimeError(f"DynamoDB did not accept {len(items)} job records after "
                               f"{BATCH_ROUNDS} tries ({why})")

    def transition(self, job_ids, new, *, from_states=None, node=None, reason=None,
                   held_by=None):
        new = JobState(new)
        allowed = states.sources(new)
        if from_states is not None:
            from_states = frozenset(JobState(s) for s in from_states)
            for s in from_states:
                states.check(s, new)
            allowed = from_states
        if not job_ids or not allowed:
            return []
        now = time.time()
        values: dict[str, Any] = {
            ":new": {"S": str(new)},
            ":now": _n(now),
            ":ev": {"L": [_event(now, new, reason or node)]},
        }
        names = {"#state": "state"}
        sets = ["#state = :new", "updated = :now", "history = list_append(history, :ev)"]
        if reason is not None:
            sets.append("reason = :reason")
            values[":reason"] = {"S": reason}
        add = ""
        if new in (JobState.STAGING_INPUTS, JobState.PROCESSING):
            sets += ["#node = :node", "started = :now"]
            names["#node"] = "node"
            values[":node"] = _s_or_null(node)
            values[":one"] = _n(1)
            add = " ADD attempts :one"
        if new.final:
            sets.append("finished = :now")
        if new is JobState.PENDING:
            # back to pending (a stopping node's, never begun): a job no node holds, not
            # started (a cancel reads started as "it ran"), as a new record, and the
            # claim's attempt taken back (as its delivery is): it was not attempted
            add = " ADD attempts :minus REMOVE #node, started"
            names["#node"] = "node"
            values[":minus"] = _n(-1)
        update = "SET " + ", ".join(sets) + add
        # an attempt is a node beginning the job: a data task's move on from staging its
        # inputs to running is the same attempt, and adds none (a write of its own, made
        # when the first one's condition failed on that state: only data tasks come so)
        on = JobState.STAGING_INPUTS
        go_on = new is JobState.PROCESSING and on in allowed
        first = allowed - {on} if go_on else allowed
        condition = self._state_in(first, values)
        held = ""
        if held_by is not None:  # (the node's and the kill's condition in the same write)
            held = (" AND #node = :holder"
                    " AND (attribute_not_exists(kill_requested) OR kill_requested <> :t)")
            names["#node"] = "node"
            values[":holder"], values[":t"] = {"S": held_by}, {"BOOL": True}
            condition += held
        on_values = {k: v for k, v in values.items() if k != ":one" and not k.startswith(":s")}
        on_values[":on"] = {"S": str(on)}  # (DynamoDB refuses values an update does not use)
        same = "SET " + ", ".join(sets)

        def one(j: str) -> bool:
            was: list[str | None] = []  # the state that failed the condition, if one did

            def peek(old: dict) -> bool:
                was.append(_str(old, "state"))
                return False

            if first and self._update(j, update, condition, values, names, peek):
                return True
            if not go_on or (first and was != [str(on)]):
                return False
            return self._update(j, same, "#state = :on" + held, on_values, names)

        ids = list(dict.fromkeys(job_ids))
        moved = self._e.parallel(one, ids)
        return [j for j, ok in zip(ids, moved, strict=True) if ok]

    def finish(self, results: Sequence[Finished]) -> list[str]:
        if not results:
            return []
        for r in results:
            if not JobState(r.state).final:
                raise ValueError(f"finish() records final states, not {r.state}")
        # one attempt per job: a later duplicate in the batch could only lose to the first
        seen: set[str] = set()
        first = [r for r in results if not (r.job_id in seen or seen.add(r.job_id))]
        recorded = self._e.parallel(self._finish_one, first)
        return [r.job_id for r, ok in zip(first, recorded, strict=True) if ok]

    def _finish_one(self, r: Finished) -> bool:
        if not _keyable(r.job_id):  # no such job: nothing to spill a result for
            return False
        now = r.at  # (the same in each try of this result: see ours, below)
        usage = _bounded_usage(r.usage or None, self.max_usage)
        reason = _bounded_text(r.reason, self.max_reason)
        values: dict[str, Any] = {
            ":st": {"S": str(r.state)},
            ":reason": _s_or_null(reason),
            ":usage": _s_or_null(usage),
            ":now": _n(now),
            ":upd": _n(time.time()),  # (a try after another write must not set it back)
            ":ev": {"L": [_event(now, r.state, reason)]},
        }
        names = {"#state": "state"}
        sets = [
            "#state = :st", "reason = :reason", "#usage = :usage", "finished = :now",
            "updated = :upd", "history = list_append(history, :ev)",
        ]  # fmt: skip
        names["#usage"] = "usage"
        names["#result"] = "result"
        # The 400 KB item limit holds for everything the item holds, not for the result
        # alone: the usage, the reason (twice: in the item and in its history event) and
        # what the item already has share it.
        size = len(r.result) + len(usage or "") + 2 * len((reason or "").encode()) + _ITEM_BASE
        ref = None
        if len(r.result) > self.max_result or size > self.max_item:
            # a key of its own per outcome: another finish must not overwrite this one's
            # (a try of the same again writes the same blob)
            ref = f"result-{r.job_id}-{r.attempt}"
            self._e.blobs.put(ref, r.result)
            sets.append("result_ref = :ref")
            values[":ref"] = {"S": ref}
            remove = " REMOVE #result"
        else:
            sets.append("#result = :res")
            values[":res"] = {"B": bytes(r.result)}
            remove = " REMOVE result_ref"
        condition = self._state_in(states.sources(r.state), values)
        update = "SET " + ", ".join(sets) + remove

        def ours(old: dict) -> bool:
            # our result is recorded (by this call, or by an earlier try of the same
            # result whose answer was lost), whoever wrote the token since: our blob, or
            # our finishing time (a float of this result's own)
            if ref is not None:
                return _str(old, "result_ref") == ref
            return _str(old, "state") == str(r.state) and _num(old, "finished") == now

        try:
            ok = r.unbegun and self._finish_unbegun(r, update, values, names, ours)
            ok = ok or self._update(r.job_id, update, condition, values, names, ours)
        except Exception:
            if ref:
                self._drop_result_blob(r.job_id, ref)
            raise
        if not ok and ref:
            # the condition failed on an item that does not name ref (or on no item)
            self._e.blobs.delete([ref])
        return ok

    def _finish_unbegun(self, r: Finished, update: str, values: dict, names: dict,
                        ours: Callable[[dict], bool]) -> bool:
        """The finish of a job its node claimed and never began (Finished.unbegun): its
        claim's attempt and its start taken back, in the same write, from a state a node
        holds.  False if it is not in one (pending: nothing to take back; the usual write
        follows)."""
        values = {k: v for k, v in values.items()  # (not the other write's states)
                  if not (k.startswith(":s") and k[2:].isdigit())}
        values[":minus"] = _n(-1)
        held = {JobState.STAGING_INPUTS, JobState.PROCESSING} & states.sources(r.state)
        condition = self._state_in(held, values)
        # (update ends with its REMOVE clause)
        return self._update(r.job_id, update + ", started ADD attempts :minus", condition,
                            values, names, ours)

    def _drop_result_blob(self, job_id: str, ref: str) -> None:
        """Delete the spilled result ``ref`` of a finish that raised, unless the item names
        it: a write whose answer was lost may have been made.  When the item cannot be read,
        the blob stays (an orphan costs storage; a lost result costs the user's job)."""
        try:
            if _str(self._item(job_id, "result_ref"), "result_ref") != ref:
                self._e.blobs.delete([ref])
        except Exception:  # noqa: BLE001 - the caller reports its own failure
            log.warning("kept result blob %s of job %s: could not check the record", ref, job_id)

    def _record(self, item: dict, result: bytes | None = None) -> JobRecord:
        usage = _str(item, "usage")
        return JobRecord(
            job_id=item["job_id"]["S"],
            owner=item["owner"]["S"],
            client=item["client"]["S"],
            queue=item["queue"]["S"],
            fn=item["fn"]["S"],
            walltime=float(item["walltime"]["N"]),
            state=JobState(item["state"]["S"]),
            created=float(item["created"]["N"]),
            updated=float(item["updated"]["N"]),
            n=int(item.get("n", {"N": "1"})["N"]),
            node=_str(item, "node"),
            attempts=int(item.get("attempts", {"N": "0"})["N"]),
            reason=_str(item, "reason"),
            started=_num(item, "started"),
            finished=_num(item, "finished"),
            kill_requested=bool(item.get("kill_requested", {}).get("BOOL", False)),
            usage=json.loads(usage) if usage else None,
            result=result,
        )

    def _batch_get(self, job_ids: Sequence[str], attrs: Sequence[str]) -> list[dict]:
        projection, names = _projection(attrs)
        items: list[dict] = []
        ids = [j for j in dict.fromkeys(job_ids) if _keyable(j)]
        for chunk in _chunks(ids, 100):
            request = {
                self.table: {
                    "Keys": [{"job_id": {"S": j}} for j in chunk],
                    "ProjectionExpression": projection,
                    "ExpressionAttributeNames": names,
                    "ConsistentRead": True,
                }
            }
            for attempt in range(BATCH_ROUNDS):
                resp = self._call("batch_get_item", RequestItems=request)
                items += (resp.get("Responses") or {}).get(self.table, [])
                request = resp.get("UnprocessedKeys") or {}
                if not request:
                    break
                _backoff(attempt)
            else:
                raise RuntimeError("DynamoDB did not answer for some job records")
        return items

    def owners(self, job_ids):
        return {item["job_id"]["S"]: item["owner"]["S"]
                for item in self._batch_get(list(job_ids), ("job_id", "owner"))}

    def get_many(self, job_ids, *, with_result=False):
        attrs = list(_RECORD_ATTRS) + (["result", "result_ref"] if with_result else [])
        out: dict[str, JobRecord] = {}
        for item in self._batch_get(list(job_ids), attrs):
            result, unread = None, None
            if with_result:
                if "result" in item and "B" in item["result"]:
                    result = bytes(item["result"]["B"])
                elif _str(item, "result_ref"):
                    result, unread = self._read_spilled(item["result_ref"]["S"])
            rec = self._record(item, result)
            if unread and not rec.reason:  # said, as the reason its future fails for
                rec.reason = unread
            out[rec.job_id] = rec
        return out

    def _read_spilled(self, ref: str) -> tuple[bytes | None, str | None]:
        """A result kept in a blob, or None and why it cannot be read: deleted (a
        lifecycle rule, a user cleaning up the bucket), refused (a role without
        s3:GetObject on it, a KMS key it may not use) or archived (a lifecycle rule's move
        to Glacier).  Missing, its future said the job had recorded no result, with no
        word of the blob; refused, that broke the executor, every future with it.  A
        fault that may pass (throttling, a 5xx) or one of the whole enclave (no bucket,
        no credentials) is raised, as for any other call."""
        try:
            return self._e.blobs.get(ref), None
        except KeyError as exc:
            why: object = exc.args[0]
        except _client_error() as exc:
            if _code(exc) not in LASTING_ERRORS | _S3_UNREADABLE_KEY:
                raise
            why = exc
        return None, (f"its result, the blob {ref} in s3://{self._e.names.bucket}/"
                      f"{self._e.names.blob_prefix}, cannot be read: {why}")

    def list(self, *, owner=None, state=None, limit=50):
        """One owner: a Query on the ``owner-created`` index, newest first.  All owners: a
        Scan of the table (fine for small tables; it reads every record)."""
        if limit <= 0:
            return []
        projection, names = _projection(_RECORD_ATTRS)
        kw: dict[str, Any] = {"ProjectionExpression": projection, "ExpressionAttributeNames": names}
        values: dict[str, Any] = {}
        if state:
            kw["FilterExpression"] = "#state = :state"
            values[":state"] = {"S": str(JobState(state))}
        records: list[JobRecord] = []
        if owner:
            values[":owner"] = {"S": owner}
            kw.update(
                IndexName=OWNER_INDEX,
                KeyConditionExpression="#owner = :owner",
                ScanIndexForward=False,
                ExpressionAttributeValues=values,
            )
            while len(records) < limit:
                resp = self._call("query", TableName=self.table, **kw)
                records += [self._record(i) for i in resp.get("Items") or []]
                if "LastEvaluatedKey" not in resp:
                    break
                kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
            records.sort(key=lambda r: r.created, reverse=True)
            return records[:limit]
        if values:
            kw["ExpressionAttributeValues"] = values
        while True:
            resp = self._call("scan", TableName=self.table, **kw)
            records += [self._record(i) for i in resp.get("Items") or []]
            if "LastEvaluatedKey" not in resp:
                break
            kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        records.sort(key=lambda r: r.created, reverse=True)
        return records[:limit]

    def history(self, job_id):
        if not _keyable(job_id):
            return []
        item = self._item(job_id, "history")
        if "history" not in item:
            return []
        return [(float(ev["t"]), ev["s"], ev["d"]) for ev in _value(item["history"])]

    def _item(self, job_id: str, projection: str) -> dict:
        """Attributes of a job's item (a consistent read); {} for no such job."""
        resp = self._call(
            "get_item",
            TableName=self.table,
            Key={"job_id": {"S": job_id}},
            ProjectionExpression=projection,
            ConsistentRead=True,
        )
        return resp.get("Item") or {}

    def request_kill(self, job_id):
        self._kills = None
        # Two conditional writes, not one: the flag's is of a job some node has (not
        # pending), and one moved back to pending between them (a stopping node's hand-
        # back) is cancelled at a next try.  Flagged, pending, it ran on the next node,
        # which looks for the kill requests of a first delivery only as it runs it.
        values: dict[str, Any] = {":t": {"BOOL": True}, ":now": _n(time.time())}
        condition = self._state_in(states.KILLABLE - {JobState.PENDING}, values)
        for _ in range(3):  # (a job handed back three times as it is killed: not flagged)
            if self.transition([job_id], JobState.CANCELLED, from_states={JobState.PENDING},
                               reason=KILLED_PENDING):  # (see JobTable.request_kill)
                return True
            if self._update(
                job_id, "SET kill_requested = :t, updated = :now", condition, values,
                {"#state": "state"},
            ):  # fmt: skip
                return True
            job = self.get(job_id)  # (the refusals only: ended, or pending again)
            if job is None or job.state != JobState.PENDING:
                return False
        return False

    def record_usage(self, job_id, usage):
        values: dict[str, Any] = {
            ":u": _s_or_null(_bounded_usage(usage, self.max_usage)),
            ":now": _n(time.time()),
        }
        condition = self._state_in(states.ACTIVE, values)
        return self._update(
            job_id, "SET #usage = :u, updated = :now", condition, values,
            {"#state": "state", "#usage": "usage"},
        )  # fmt: skip

    def kill_requested(self, job_ids):
        job_ids = list(job_ids)
        if not job_ids:
            return set()
        wanted = set(job_ids)
        cached = self._kills  # (when, the ids read then, the kills among them)
        at = time.monotonic()
        if cached is None or at - cached[0] >= self.kill_poll_interval:
            cached = (at, set(), set())
        new = wanted - cached[1]  # ids the last look did not cover are read now: a kill
        if new:  # of a job redelivered here must be seen before it runs again
            items = self._batch_get(list(new), ["job_id", "kill_requested"])
            cached[1].update(new)
            cached[2].update(i["job_id"]["S"] for i in items
                             if i.get("kill_requested", {}).get("BOOL", False))
        self._kills = cached
        return cached[2] & wanted

    def prune(self, before, *, owner=None, dry_run=False):
        """One owner's: a Query of the ``owner-created`` index (of jobs created before
        ``before``: none finished before it was made); everyone's: a Scan of the table.
        Deleted a hundred at a time (:meth:`delete`: batches of 25, whose unprocessed
        items are tried again), with their blobs, then their dead letters."""
        values: dict[str, Any] = {":before": _n(before)}
        names = {"#state": "state", "#queue": "queue"}
        when = (f"{self._state_in(states.FINAL, values)} AND (finished < :before OR"
                " (attribute_not_exists(finished) AND updated < :before))")
        kw: dict[str, Any] = {
            "TableName": self.table, "ProjectionExpression": "job_id, #queue",
            "FilterExpression": when, "ExpressionAttributeNames": names,
        }
        if owner is not None:
            names["#owner"] = "owner"
            values[":owner"] = {"S": owner}
            kw.update(IndexName=OWNER_INDEX,
                      KeyConditionExpression="#owner = :owner AND created < :before")
            call = "query"
        else:
            kw["ConsistentRead"] = True  # (a final state read is final: it never leaves)
            call = "scan"
        kw["ExpressionAttributeValues"] = values
        pruned = Pruned(bytes=None)
        queues: dict[str, set[str]] = {}
        while True:
            resp = self._call(call, **kw)
            found = [(i["job_id"]["S"], _str(i, "queue")) for i in resp.get("Items") or []]
            for chunk in _chunks(found, 100):
                ids = [j for j, _ in chunk]
                if not dry_run:
                    self.delete(ids)
                pruned.jobs += ids
                for j, q in chunk:
                    queues.setdefault(q or "", set()).add(j)
            if "LastEvaluatedKey" not in resp:
                break
            kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        if not dry_run:
            for q, ids in queues.items():
                if q:
                    self._e.queue.drop_dead_letters(q, ids)
        return pruned

    def delete(self, job_ids: Sequence[str]) -> None:
        """Remove job records with their spilled results and task blobs.

        Blobs go only with records whose deletes DynamoDB processed; if some were still
        unprocessed after :data:`BATCH_ROUNDS` rounds, those records stay whole (results,
        task blobs and all) and this raises, as :meth:`create` does."""
        ids = [j for j in dict.fromkeys(job_ids) if _keyable(j)]
        items = self._batch_get(ids, ["job_id", "result_ref"])
        refs = {i["job_id"]["S"]: i["result_ref"]["S"] for i in items if _str(i, "result_ref")}
        left: list[str] = []
        for chunk in _chunks(ids, 25):
            pending = {
                self.table: [{"DeleteRequest": {"Key": {"job_id": {"S": j}}}} for j in chunk]
            }
            for attempt in range(BATCH_ROUNDS):
                resp = self._call("batch_write_item", RequestItems=pending)
                pending = resp.get("UnprocessedItems") or {}
                if not pending:
                    break
                _backoff(attempt)
            else:
                left += [r["DeleteRequest"]["Key"]["job_id"]["S"] for r in pending[self.table]]
        kept = set(left)
        gone = [j for j in ids if j not in kept]
        # the executor's blobs of a task too large for its message: "<section>-<job id>"
        blobs = [refs[j] for j in gone if j in refs]
        blobs += [f"{section}-{j}" for j in gone for section in TASK_BLOB_SECTIONS]
        self._e.blobs.delete(blobs)
        if left:
            raise RuntimeError(f"DynamoDB did not delete {len(left)} job records")


# --------------------------------------------------------------------------- nodes


class DynamoNodes(_DynamoTable, NodeRegistry):
    """The table ``kotta-NAME-nodes`` (key ``node_id``; items expire a day after their last
    heartbeat through DynamoDB's TTL on ``expires``)."""

    #: seconds a live() answer is reused (the executor asks on every loop); this process's
    #: own register/heartbeat/deregister always refresh it
    live_cache_seconds = 1.0
    expire_after = 86_400

    def __init__(self, enclave: AwsEnclave):
        super().__init__(enclave, enclave.names.nodes_table)
        self._cache: tuple[float, list[NodeInfo]] | None = None


    def register(self, node):
        self._cache = None
        self._call(
            "put_item",
            TableName=self.table,
            Item={
                "node_id": {"S": node.node_id},
                "queue": {"S": node.queue},
                "host": {"S": node.host},
                "pid": _n(node.pid),
                "workers": _n(node.workers),
                "started": _n(float(node.started)),
                "heartbeat": _n(float(node.heartbeat)),
                "managed_by": _s_or_null(node.managed_by),
                "python": _s_or_null(node.python),
                "expires": _n(int(node.heartbeat + self.expire_after)),
            },
        )

    def heartbeat(self, node_id):
        self._cache = None
        now = time.time()
        try:
            self._call(
                "update_item",
                TableName=self.table,
                Key={"node_id": {"S": node_id}},
                UpdateExpression="SET heartbeat = :now, expires = :exp",
                ConditionExpression="attribute_exists(node_id)",
                ExpressionAttributeValues={
                    ":now": _n(now), ":exp": _n(int(now + self.expire_after))
                },
            )  # fmt: skip
        except _client_error() as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise

    def deregister(self, node_id, *, wait=None):  # (no write lock to wait for)
        self._cache = None
        self._call("delete_item", TableName=self.table, Key={"node_id": {"S": node_id}})

    def all(self) -> list[NodeInfo]:
        nodes: list[NodeInfo] = []
        kw: dict[str, Any] = {"ConsistentRead": True}
        while True:
            resp = self._call("scan", TableName=self.table, **kw)
            for i in resp.get("Items") or []:
                nodes.append(
                    NodeInfo(
                        node_id=i["node_id"]["S"],
                        queue=i["queue"]["S"],
                        host=i["host"]["S"],
                        pid=int(i["pid"]["N"]),
                        workers=int(i["workers"]["N"]),
                        started=float(i["started"]["N"]),
                        heartbeat=float(i["heartbeat"]["N"]),
                        managed_by=_str(i, "managed_by"),
                        python=_str(i, "python"),
                    )
                )
            if "LastEvaluatedKey" not in resp:
                return nodes
            kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def live(self, queue=None):
        cached = self._cache
        now = time.monotonic()
        if cached is None or now - cached[0] > self.live_cache_seconds:
            cached = self._cache = (now, self.all())
        stale = time.time() - NODE_STALE_AFTER
        return [
            n for n in cached[1] if (queue is None or n.queue == queue) and n.heartbeat >= stale
        ]
