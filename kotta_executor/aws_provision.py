"""Provisioning of an AWS enclave: ``bootstrap(NAME)`` creates what ``aws://NAME`` needs,
``teardown(NAME)`` removes it.  Both are idempotent.

``deploy/cloudformation.yaml`` declares the same resources (a test checks that the two
agree); use either, not both, for one enclave.

What ``bootstrap`` makes (names from :class:`kotta_executor.backends.aws.Names`):

* SQS: ``kotta-NAME-test`` and ``kotta-NAME-production``, each with a dead-letter queue
  (``...-dlq``) and a redrive policy (``maxReceiveCount`` 10, above the node's own limit of
  5 deliveries, so that nodes normally dead-letter a task themselves and record why);
  server-side encryption (SQS-managed keys), 14-day retention.
* S3: the bucket ``kotta-NAME-blobs`` (or ``bucket=``; one it makes is tagged
  ``kotta-enclave=NAME``) with default encryption (SSE-S3;
  an existing bucket's SSE-KMS is kept, the node role allowed its key through S3),
  every public access blocked, and a policy refusing requests not made over TLS.
* DynamoDB (on-demand): ``kotta-NAME-jobs`` (key ``job_id``, GSI ``owner-created``) and
  ``kotta-NAME-nodes`` (key ``node_id``, TTL on ``expires``).
* IAM: the role ``kotta-NAME-node`` for EC2 nodes (and its instance profile) with one
  inline policy: consume the enclave's queues (and send replies and dead letters), read
  and write job and node records, read and write the bucket's ``blobs/`` prefix, and
  ``sts:AssumeRole`` on the enclave's user roles ``kotta-NAME-user-*``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .backends.aws import (
    INDEX_ATTRS,
    MAX_RECEIVE_COUNT,
    OWNER_INDEX,
    Names,
    _client_error,
    _code,
    _from_region,
    arn_partition,
    botocore_validation_error,
    check_endpoint_url,
    check_name,
    check_region,
    client_config,
    ensure_work_queue,
    make_session,
    new_bucket_name_error,
)
from .backends.aws_records import records_table_spec
from .config import MAX_DELIVERIES, QUEUES, normalize_queue
from .errors import ConfigurationError

log = logging.getLogger("kotta.aws")

QUEUE = "AWS::SQS::Queue"
BUCKET = "AWS::S3::Bucket"
BUCKET_POLICY = "AWS::S3::BucketPolicy"
TABLE = "AWS::DynamoDB::Table"
ROLE = "AWS::IAM::Role"
PROFILE = "AWS::IAM::InstanceProfile"

#: the tag of the enclave's queues, tables, role and of a bucket bootstrap made
ENCLAVE_TAG = "kotta-enclave"
#: the prefixes kotta writes in the enclave's bucket (the blobs, the enclave key, held
#: results: ``security.data.enclave_areas``): all teardown deletes of a bucket it keeps
OWN_PREFIXES = ("blobs/", "keys/", "held/")


@dataclass
class Report:
    """What bootstrap created or found, or what teardown deleted: ``(type, name)`` pairs,
    types spelled as CloudFormation spells them."""

    enclave: str
    created: list[tuple[str, str]] = field(default_factory=list)
    existing: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    #: what teardown kept (a bucket bootstrap did not make: only kotta's objects went)
    kept: list[tuple[str, str]] = field(default_factory=list)
    url: str | None = None

    @property
    def resources(self) -> set[tuple[str, str]]:
        return set(self.created) | set(self.existing)

    def text(self) -> str:
        lines = []
        for verb, items in (("created", self.created), ("exists ", self.existing),
                            ("deleted", self.deleted), ("kept   ", self.kept)):  # fmt: skip
            lines += [f"{verb}  {kind:26} {name}" for kind, name in items]
        if self.url:
            lines.append(f"enclave URL: {self.url}")
        return "\n".join(lines)


def planned(
    name: str,
    *,
    bucket: str | None = None,
    queues: Iterable[str] = QUEUES,
    iam: bool = True,
    tls_only: bool = True,
) -> set[tuple[str, str]]:
    """The ``(type, name)`` of every resource bootstrap makes, without calling AWS."""
    n = Names(name, bucket)
    out = set()
    for q in _queue_list(queues):
        out |= {(QUEUE, n.queue(q)), (QUEUE, n.dlq(n.queue(q)))}
    out.add((BUCKET, n.bucket))
    if tls_only:
        out.add((BUCKET_POLICY, n.bucket))
    out |= {(TABLE, n.jobs_table), (TABLE, n.nodes_table), (TABLE, n.records_table)}
    if iam:
        out |= {(ROLE, n.node_role), (PROFILE, n.node_role)}
    return out


def _queue_list(queues: Iterable[str] | str) -> list[str]:
    """``queues="production"`` is that one queue: list() made it the queues p, r, o, ...
    A spelling executors and nodes take (``prod``, ``Production``) is the queue they use:
    kotta-NAME-prod was made, which none uses.  Other names are kept as they are."""
    out = []
    for q in [queues] if isinstance(queues, str) else list(queues):
        try:
            q = normalize_queue(q)
        except ConfigurationError:
            pass
        if q not in out:
            out.append(q)
    return out


class _Clients:
    def __init__(self, region, endpoint_url, profile, session):
        import os

        self.session = session or make_session(
            region=region, profile=profile, what="AWS provisioning"
        )
        self.region = self.session.region_name
        self.partition, self.url_suffix = arn_partition(self.session, self.region)
        given = endpoint_url
        endpoint_url = endpoint_url or os.environ.get("KOTTA_AWS_ENDPOINT_URL") or None
        # (as AwsEnclave: botocore's bare "Invalid endpoint" named no option)
        check_endpoint_url(endpoint_url, "" if endpoint_url == given else
                           " (from KOTTA_AWS_ENDPOINT_URL)")
        self.endpoint_url = endpoint_url
        cfg = client_config(path_style=bool(endpoint_url))
        self._make = lambda svc: self.session.client(svc, endpoint_url=endpoint_url, config=cfg)
        self._cache: dict[str, Any] = {}
        if not endpoint_url and self.region:  # (as AwsEnclave: a minute of retries, else)
            try:
                aws = _from_region([self.sqs], self.region)
            except botocore_validation_error():  # (InvalidRegionError: named below)
                aws = True
            if aws:
                check_region(self.session, self.region, in_url=bool(region), option="--region")

    def __getattr__(self, service: str):
        if service.startswith("_"):
            raise AttributeError(service)
        if service not in self._cache:
            self._cache[service] = self._make(service)
        return self._cache[service]


def bootstrap(
    name: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    bucket: str | None = None,
    queues: Iterable[str] = QUEUES,
    max_receive_count: int = MAX_RECEIVE_COUNT,
    iam: bool = True,
    tls_only: bool | None = None,
    session=None,
    out=None,
) -> Report:
    """Create (or bring in line) every resource of the enclave ``aws://NAME``.

    Safe to run again: what exists is kept (queue attributes and policies are re-applied).
    ``iam=False`` skips the node role (for accounts where you may not create roles).
    ``tls_only``: the bucket policy refusing requests without TLS; on by default, off
    when ``endpoint_url`` is a plain ``http://`` emulator.
    ``out``: a callable (``print``) told about each resource as it goes.
    """
    names = Names(name, bucket)
    queues = _queue_list(queues)
    for q in queues:  # (a name SQS refuses, before anything is made)
        if q.startswith("reply."):  # (Names.queue takes it, as a client's reply channel:
            # a work queue with a dead-letter queue was made under a reply queue's name)
            raise ConfigurationError(f"invalid queue name {q!r}")
        names.queue(q)
    if not 1 <= max_receive_count <= 1000:  # SQS's bounds; checked before anything is made
        raise ValueError(f"--max-receive-count must be 1 to 1000 (SQS's bounds), "
                         f"not {max_receive_count}")
    if max_receive_count <= MAX_DELIVERIES:
        # SQS then redrives a task whose node keeps dying before a node fails its job,
        # which stays `processing`, and its future waits for good
        log.warning(
            "%s", f"--max-receive-count {max_receive_count} is not over the nodes' own delivery "
            f"limit (`kotta node --max-deliveries`, {MAX_DELIVERIES} by default): SQS will move "
            f"a task whose node keeps dying to the dead-letter queue before a node can fail "
            f"its job, and the job stays processing, its future waiting; choose a count over "
            f"the nodes' limit (default {MAX_RECEIVE_COUNT})")
    c = _Clients(region, endpoint_url, profile, session)
    report = Report(name)
    # a --bucket S3 would not make, before anything is made (S3 refused it at CreateBucket,
    # the queues made already; an emulator took it); one that exists is kept as it is
    why = new_bucket_name_error(names.bucket) if bucket else None
    if why is not None:
        from botocore.exceptions import EndpointResolutionError, ParamValidationError

        try:
            c.s3.head_bucket(Bucket=names.bucket)
        except (ParamValidationError, EndpointResolutionError):  # (the latter: NAME--x-s3)
            raise ConfigurationError(why) from None
        except _client_error() as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound", "400", "InvalidBucketName"):
                raise ConfigurationError(why) from None
            # (403: another account's, said below; a fault that passes: met again below)

    # an existing bucket of another region, before anything is made: botocore's redirect
    # let HeadBucket pass and the bucket was kept, every later call then paying a redirect
    # (or failing where redirects are not followed).  (Not on an emulator: its buckets'
    # region need not be the one asked for.)
    if not c.endpoint_url and c.region:
        elsewhere = _bucket_region(c, names.bucket)
        if elsewhere and elsewhere != c.region:
            raise ConfigurationError(
                f"the bucket {names.bucket} is in the region {elsewhere}, not in the "
                f"enclave's region {c.region}: bootstrap the enclave in {elsewhere} "
                f"(--region {elsewhere}), or choose a bucket of {c.region} with --bucket "
                f"(and aws://{name}?bucket=...)")

    # another enclave's bucket (tagged so), before anything is made: the two enclaves
    # shared blobs/, keys/ and held/, and each one's nodes deleted, as strays, the other's
    # task blobs and message bodies its own job table does not know
    try:
        owner = _bucket_enclave(c, names)
    except _client_error() as exc:
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound", "403", "AccessDenied",
                              "Forbidden"):
            raise
        owner = None  # (none yet; or not ours to read: said below)
    if owner not in (None, name):
        raise ConfigurationError(
            f"the bucket {names.bucket} is the enclave {owner}'s ({_whose(names, owner)}): "
            f"two enclaves cannot share a bucket (each one's nodes delete the "
            f"other's blobs).  Choose another bucket with --bucket (and "
            f"aws://{name}?bucket=...)")

    def note(created: bool, kind: str, what: str) -> None:
        (report.created if created else report.existing).append((kind, what))
        if out is not None:
            out(f"{'created' if created else 'exists '}  {kind:26} {what}")

    # -- queues
    for q in queues:
        sqs_name = names.queue(q)
        _, made = ensure_work_queue(c.sqs, names, sqs_name, max_receive_count)
        for what in (names.dlq(sqs_name), sqs_name):
            note(what in made, QUEUE, what)

    # -- bucket
    # (HeadBucket first: in us-east-1, CreateBucket on a bucket you own just succeeds)
    try:
        c.s3.head_bucket(Bucket=names.bucket)
        exists = True
    except _client_error() as exc:
        if _code(exc) in ("403", "AccessDenied", "Forbidden"):
            raise ConfigurationError(
                f"the bucket {names.bucket} exists but is not yours (or you may not read "
                f"it): choose another name with --bucket (and aws://{name}?bucket=...)"
            ) from None
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise
        exists = False
    if not exists:
        kw: dict[str, Any] = {"Bucket": names.bucket}
        if c.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": c.region}
        try:
            c.s3.create_bucket(**kw)
        except _client_error() as exc:
            if _code(exc) == "BucketAlreadyExists":
                raise ConfigurationError(
                    f"the bucket name {names.bucket} is taken by another AWS account: choose "
                    f"another with --bucket (and aws://{name}?bucket=...)"
                ) from None
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise
            exists = True
    if not exists:
        # marked as the enclave's, so that teardown deletes it whole; a bucket that existed
        # is never tagged (PutBucketTagging replaces its owner's tags) and is kept by
        # teardown, which deletes only kotta's objects in it
        try:
            c.s3.put_bucket_tagging(Bucket=names.bucket, Tagging={"TagSet": [
                {"Key": ENCLAVE_TAG, "Value": name}]})
        except _client_error() as exc:
            if _code(exc) not in ("AccessDenied", "AccessDeniedException", "NotImplemented",
                                  "MethodNotAllowed"):  # (the last two: an emulator's)
                raise
            if names.bucket != Names(name).bucket:  # (the default name goes whole anyway)
                _warn(out, f"the bucket {names.bucket} could not be tagged {ENCLAVE_TAG}="
                           f"{name} ({_code(exc)}): teardown will keep it, deleting only "
                           f"kotta's objects in it")
    note(not exists, BUCKET, names.bucket)
    c.s3.put_public_access_block(
        Bucket=names.bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    # an existing bucket encrypted with SSE-KMS keeps it: PutBucketEncryption replaced its
    # owner's choice (their key) with SSE-S3 without a word.  The node role may then use
    # that one key, through S3 only (it could not read or write a blob otherwise)
    kms = _bucket_kms(c, names.bucket) if exists else None
    kms_key = None
    if kms is None:
        c.s3.put_bucket_encryption(
            Bucket=names.bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                        "BucketKeyEnabled": True,
                    }
                ]
            },
        )
    else:
        algorithm, key_id = kms
        if key_id and iam:
            kms_key = _key_arn(c, key_id, names.bucket)
        said = (f"the bucket {names.bucket} keeps its default encryption {algorithm} "
                f"(key {kms_key or key_id or 'aws/s3, AWS managed'}), not replaced by SSE-S3")
        if kms_key:
            said += "; the node role may use that key through S3"
        log.warning("%s", said)
        if out is not None:
            out(f"kept     {said}")
    if tls_only is None:
        tls_only = not (c.endpoint_url or "").startswith("http://")
    if tls_only:
        had_policy = True
        policy = tls_only_policy(names.bucket, c.partition)
        try:
            old = json.loads(c.s3.get_bucket_policy(Bucket=names.bucket)["Policy"])
        except _client_error() as exc:
            if _code(exc) != "NoSuchBucketPolicy":
                raise
            had_policy = False
        else:  # an existing bucket's own statements (another account's grant) are kept:
            # they were replaced, without a word; ours replaces only itself
            ours = {st["Sid"] for st in policy["Statement"]}
            kept = old.get("Statement", [])
            kept = [st for st in (kept if isinstance(kept, list) else [kept])
                    if st.get("Sid") not in ours]
            policy["Statement"] = kept + policy["Statement"]
        c.s3.put_bucket_policy(Bucket=names.bucket, Policy=json.dumps(policy))
        note(not had_policy, BUCKET_POLICY, names.bucket)

    # -- tables
    note(_create_table(c.dynamodb, jobs_table_spec(names)), TABLE, names.jobs_table)
    note(_create_table(c.dynamodb, nodes_table_spec(names)), TABLE, names.nodes_table)
    note(_create_table(c.dynamodb, records_table_spec(names)), TABLE, names.records_table)
    c.dynamodb.get_waiter("table_exists").wait(
        TableName=names.jobs_table, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
    )
    for table in (names.nodes_table, names.records_table):
        c.dynamodb.get_waiter("table_exists").wait(
            TableName=table, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
        )
    # a jobs table an earlier version made: its index (which cannot be changed in place)
    # lacks the attributes added since, which a job listing by owner asks for, or is
    # missing; bootstrap again, the repair, said only "exists".  A missing one is made
    lacks = _index_lacks(c.dynamodb, names.jobs_table)
    if lacks == ["*"]:
        spec = jobs_table_spec(names)
        c.dynamodb.update_table(
            TableName=names.jobs_table, AttributeDefinitions=spec["AttributeDefinitions"],
            GlobalSecondaryIndexUpdates=[{"Create": spec["GlobalSecondaryIndexes"][0]}])
        if out is not None:
            out(f"created  {'index':26} {names.jobs_table} {OWNER_INDEX}")
    elif lacks == ["(being deleted)"]:
        said = (f"the index {OWNER_INDEX} of the jobs table {names.jobs_table} is being "
                f"deleted: run bootstrap again once it is gone, to make it anew")
        _warn(out, said)
    elif lacks:
        said = (f"the index {OWNER_INDEX} of the jobs table {names.jobs_table} lacks the "
                f"attributes {', '.join(lacks)} (made by an earlier version; an index cannot "
                f"be changed): a job listing by owner (`kotta list`) fails or misses them.  "
                f"Delete the index (aws dynamodb update-table --table-name "
                f"{names.jobs_table} --global-secondary-index-updates "
                f"'[{{\"Delete\": {{\"IndexName\": \"{OWNER_INDEX}\"}}}}]'), wait until "
                f"it is gone, and run bootstrap again: it makes the index anew")
        _warn(out, said)
    ttl = c.dynamodb.describe_time_to_live(TableName=names.nodes_table)
    ttl = ttl.get("TimeToLiveDescription", {})
    if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING") and ttl.get(
            "AttributeName", "expires") != "expires":
        # (one attribute per table, changed only once disabled, which takes up to an hour:
        # said, as the records of dead nodes never went, without a word)
        said = (f"the time to live of the nodes table {names.nodes_table} is on the "
                f"attribute {ttl['AttributeName']!r}, not {'expires'!r}: the records of "
                f"dead nodes are never deleted.  Disable it (aws dynamodb update-time-to-live "
                f"--table-name {names.nodes_table} --time-to-live-specification "
                f"Enabled=false,AttributeName={ttl['AttributeName']}), wait until it is "
                f"disabled, and run bootstrap again")
        _warn(out, said)
    elif ttl.get("TimeToLiveStatus") == "DISABLING":  # (UpdateTimeToLive refuses it now)
        said = (f"the time to live of the nodes table {names.nodes_table} is being "
                f"disabled: run bootstrap again once it is, to turn it on for 'expires'")
        _warn(out, said)
    elif ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        c.dynamodb.update_time_to_live(
            TableName=names.nodes_table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"},
        )

    # -- the node role
    if iam:
        account = c.sts.get_caller_identity()["Account"]
        trust = json.dumps(ec2_trust_policy(c.url_suffix))
        try:
            c.iam.create_role(
                RoleName=names.node_role,
                AssumeRolePolicyDocument=trust,
                Description=f"kotta enclave {name}: nodes",
                Tags=[{"Key": "kotta-enclave", "Value": name}],
            )
            note(True, ROLE, names.node_role)
        except _client_error() as exc:
            if _code(exc) != "EntityAlreadyExists":
                raise
            c.iam.update_assume_role_policy(RoleName=names.node_role, PolicyDocument=trust)
            note(False, ROLE, names.node_role)
        c.iam.put_role_policy(
            RoleName=names.node_role,
            PolicyName=names.node_role,
            # (the queues made above: with only the default ones, nodes of a queue of
            # bootstrap(queues=[...]) were refused by IAM)
            PolicyDocument=json.dumps(node_policy(names, c.region, account, c.partition,
                                                  queues=queues, kms_key=kms_key,
                                                  url_suffix=c.url_suffix)),
        )
        try:
            c.iam.create_instance_profile(InstanceProfileName=names.node_role)
            note(True, PROFILE, names.node_role)
        except _client_error() as exc:
            if _code(exc) != "EntityAlreadyExists":
                raise
            note(False, PROFILE, names.node_role)
        roles = c.iam.get_instance_profile(InstanceProfileName=names.node_role)
        if not any(r["RoleName"] == names.node_role for r in roles["InstanceProfile"]["Roles"]):
            c.iam.add_role_to_instance_profile(
                InstanceProfileName=names.node_role, RoleName=names.node_role
            )

    params = {"region": c.region}
    if c.endpoint_url:
        params["endpoint_url"] = c.endpoint_url
    if bucket:
        params["bucket"] = bucket
    from urllib.parse import urlencode

    report.url = f"aws://{name}?{urlencode(params)}"
    if out is not None:
        out(f"enclave URL: {report.url}")
    return report


def teardown(
    name: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    bucket: str | None = None,
    session=None,
    out=None,
) -> Report:
    """Delete every resource of the enclave ``aws://NAME``: its queues (work, dead-letter
    and the reply queues of clients), the bucket and everything in it, both tables and the
    node role.  Whatever is already gone is skipped.  A bucket bootstrap did not make (an
    existing ``bucket=``) is kept, only kotta's objects in it deleted (``report.kept``)."""
    names = Names(name, bucket)
    c = _Clients(region, endpoint_url, profile, session)
    report = Report(name)
    _refuse_running_pools(c, name)

    def gone(kind: str, what: str) -> None:
        report.deleted.append((kind, what))
        if out is not None:
            out(f"deleted  {kind:26} {what}")

    # -- queues: every queue tagged as this enclave's, by name prefix
    urls = []
    for page in c.sqs.get_paginator("list_queues").paginate(QueueNamePrefix=names.prefix + "-"):
        urls += page.get("QueueUrls", [])
    for url in urls:
        qname = url.rstrip("/").rsplit("/", 1)[-1]
        try:
            tags = c.sqs.list_queue_tags(QueueUrl=url).get("Tags", {})
            if tags.get("kotta-enclave") != name:
                continue  # another enclave's whose name starts with this one's
            c.sqs.delete_queue(QueueUrl=url)
        except _client_error() as exc:
            if _code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                continue
            raise
        gone(QUEUE, qname)

    # -- bucket
    try:
        failed: list[dict] = []
        # a versioned bucket (an existing --bucket, or versioning turned on) keeps each
        # deleted object as a noncurrent version under a delete marker: DeleteBucket then
        # failed with BucketNotEmpty.  Its every version and marker goes, by VersionId
        try:
            versioned = bool(c.s3.get_bucket_versioning(Bucket=names.bucket).get("Status"))
        except _client_error() as exc:
            if _code(exc) not in ("AccessDenied", "AccessDeniedException"):
                raise
            versioned = False  # (may not ask: taken as never versioned, as before)
        # a bucket bootstrap did not make (an existing --bucket: "exists") is the user's,
        # and may hold their other data: it lost every object and was deleted.  It is kept
        # now, and only kotta's own prefixes in it emptied; another enclave's bucket (a
        # slip of --bucket) is not touched at all
        owner = _bucket_enclave(c, names)
        whole = owner == name
        prefixes = [None] if whole else OWN_PREFIXES if owner is None else []
        listing = "list_object_versions" if versioned else "list_objects_v2"
        for prefix in prefixes:
            kw = {"Bucket": names.bucket} if prefix is None else {
                "Bucket": names.bucket, "Prefix": prefix}
            for page in c.s3.get_paginator(listing).paginate(**kw):
                if versioned:
                    keys = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                            for o in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                else:
                    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    resp = c.s3.delete_objects(Bucket=names.bucket,
                                               Delete={"Objects": keys, "Quiet": True})
                    # (a 200 with the objects S3 kept: a bucket policy's Deny, object lock;
                    # ignored, DeleteBucket then failed with a bare BucketNotEmpty)
                    failed += resp.get("Errors", [])
            if prefix is not None:  # a kept bucket: kotta's unfinished uploads in parts (a
                # held result's, its node killed) stayed for good, unlisted and billed.
                # (DeleteBucket takes a bucket's with it)
                for page in c.s3.get_paginator("list_multipart_uploads").paginate(**kw):
                    for u in page.get("Uploads", []):
                        try:
                            c.s3.abort_multipart_upload(Bucket=names.bucket, Key=u["Key"],
                                                        UploadId=u["UploadId"])
                        except _client_error() as exc:
                            if _code(exc) != "NoSuchUpload":
                                raise
        if failed:
            shown = "; ".join(f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})"
                              for e in failed[:10])
            more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
            raise ConfigurationError(
                f"S3 did not delete {len(failed)} object(s) of the bucket {names.bucket}, "
                f"which is kept: {shown}{more}.  Remove what keeps them (a bucket policy, "
                f"object lock) or delete them yourself, then run teardown again"
            )
        if whole:
            c.s3.delete_bucket(Bucket=names.bucket)
            gone(BUCKET, names.bucket)
        elif owner is not None:
            report.kept.append((BUCKET, names.bucket))
            if out is not None:
                out(f"kept     {BUCKET:26} {names.bucket}: the enclave {owner}'s "
                    f"({_whose(names, owner)}), not {name}'s: nothing in it was deleted")
        else:
            report.kept.append((BUCKET, names.bucket))
            if out is not None:
                out(f"kept     {BUCKET:26} {names.bucket}: not made by bootstrap (no tag "
                    f"{ENCLAVE_TAG}={name}), so only kotta's objects in it "
                    f"({', '.join(OWN_PREFIXES)}) were deleted; its other objects, tags, "
                    f"policy and settings are kept")
    except _client_error() as exc:
        if _code(exc) != "NoSuchBucket":
            raise
        no_bucket = True
    else:
        no_bucket = False

    # -- tables
    for table in (names.jobs_table, names.nodes_table, names.records_table):
        try:
            c.dynamodb.delete_table(TableName=table)
            gone(TABLE, table)
        except _client_error() as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise

    # -- IAM
    def quietly(fn, **kw) -> bool:
        try:
            fn(**kw)
            return True
        except _client_error() as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            return False

    quietly(
        c.iam.remove_role_from_instance_profile,
        InstanceProfileName=names.node_role,
        RoleName=names.node_role,
    )
    if quietly(c.iam.delete_instance_profile, InstanceProfileName=names.node_role):
        gone(PROFILE, names.node_role)
    quietly(c.iam.delete_role_policy, RoleName=names.node_role, PolicyName=names.node_role)
    # policies an admin added to the node role (SSM, the CloudWatch agent): DeleteRole
    # refused a role that has any (DeleteConflict, again at every teardown).  Managed ones
    # are detached, not deleted: they are not the enclave's
    try:
        for page in c.iam.get_paginator("list_attached_role_policies").paginate(
                RoleName=names.node_role):
            for p in page.get("AttachedPolicies", []):
                quietly(c.iam.detach_role_policy, RoleName=names.node_role,
                        PolicyArn=p["PolicyArn"])
        for page in c.iam.get_paginator("list_role_policies").paginate(RoleName=names.node_role):
            for policy in page.get("PolicyNames", []):
                quietly(c.iam.delete_role_policy, RoleName=names.node_role, PolicyName=policy)
    except _client_error() as exc:
        if _code(exc) != "NoSuchEntity":
            raise
    if quietly(c.iam.delete_role, RoleName=names.node_role):
        gone(ROLE, names.node_role)
    if no_bucket and not bucket and report.deleted:
        # (an enclave bootstrapped with --bucket, torn down without it: its bucket, with
        # every blob, the enclave key and held results, stayed without a word)
        _warn(out, f"no bucket {names.bucket} was found: if the enclave {name} used another "
                   f"(bootstrap --bucket, aws://{name}?bucket=...), run teardown again with "
                   f"--bucket to delete it")
    return report


def _index_lacks(ddb, table: str) -> list[str]:
    """The attributes the jobs table's owner index lacks (``["*"]``: it has no such index;
    ``["(being deleted)"]``: it is going)."""
    desc = ddb.describe_table(TableName=table)["Table"]
    for gsi in desc.get("GlobalSecondaryIndexes") or []:
        if gsi["IndexName"] != OWNER_INDEX:
            continue
        if gsi.get("IndexStatus") == "DELETING":
            return ["(being deleted)"]
        projection = gsi.get("Projection") or {}
        if projection.get("ProjectionType") == "ALL":
            return []
        have = set(projection.get("NonKeyAttributes") or [])
        return [a for a in INDEX_ATTRS if a not in have]
    return ["*"]


def _bucket_enclave(c: _Clients, names: Names) -> str | None:
    """The enclave whose own the enclave's bucket is, to be deleted whole by its teardown:
    the one bootstrap made it for (its tag ``kotta-enclave``; the CloudFormation
    template's has it too), or, untagged, ``OTHER`` for a bucket of the default name
    ``kotta-OTHER-blobs`` (enclaves bootstrapped before buckets were tagged; tags that may
    not be read).  None: no enclave's (an existing bucket given with ``bucket=``)."""
    try:
        tags = c.s3.get_bucket_tagging(Bucket=names.bucket).get("TagSet", [])
    except _client_error() as exc:
        if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise
        tags = []  # (none, or may not read them, or an emulator without tags: as untagged)
    tagged = [t.get("Value") for t in tags if t.get("Key") == ENCLAVE_TAG]
    if tagged:
        return tagged[0]
    # (any enclave's default name, not only this one's: `teardown lab --bucket
    # kotta-other-blobs` of an untagged one emptied other's blobs/, keys/ and held/)
    default = _DEFAULT_BUCKET.match(names.bucket)
    try:
        return check_name(default.group(1)) if default else None
    except ConfigurationError:  # (no enclave's name: kotta-My_Data-blobs)
        return None


#: the default bucket name of an enclave (Names.bucket)
_DEFAULT_BUCKET = re.compile(r"kotta-(.+)-blobs\Z")


def _whose(names: Names, owner: str) -> str:
    """Why the enclave's bucket is ``owner``'s (:func:`_bucket_enclave`), for a message."""
    if names.bucket == f"kotta-{owner}-blobs":  # (Names.bucket's default; a tag's value
        # need not be a valid enclave name, which Names(owner) refused)
        return f"tag {ENCLAVE_TAG}={owner}, or its default name"
    return f"tag {ENCLAVE_TAG}={owner}"


def _bucket_region(c: _Clients, bucket: str) -> str | None:
    """The region of an existing bucket (S3 names it in HeadBucket's answer, redirected or
    not); None if there is no such bucket, or it is not ours to ask (said later)."""
    try:
        resp = c.s3.head_bucket(Bucket=bucket)
    except _client_error():
        return None  # (403: another account's, said below; a fault: met again below)
    return resp.get("BucketRegion") or resp.get("ResponseMetadata", {}).get(
        "HTTPHeaders", {}).get("x-amz-bucket-region")


def _bucket_kms(c: _Clients, bucket: str) -> tuple[str, str | None] | None:
    """``(algorithm, key id or None)`` of a bucket's default SSE-KMS (or DSSE-KMS)
    encryption; None for SSE-S3 or none."""
    try:
        rules = c.s3.get_bucket_encryption(Bucket=bucket)[
            "ServerSideEncryptionConfiguration"]["Rules"]
    except _client_error() as exc:
        if _code(exc) != "ServerSideEncryptionConfigurationNotFoundError":
            raise
        return None
    for rule in rules:
        default = rule.get("ApplyServerSideEncryptionByDefault") or {}
        if default.get("SSEAlgorithm", "").startswith("aws:kms"):
            return default["SSEAlgorithm"], default.get("KMSMasterKeyID") or None
    return None


def _key_arn(c: _Clients, key_id: str, bucket: str) -> str:
    """The ARN of a bucket's KMS key (its configuration may name it by id or alias: an
    IAM policy needs the key's ARN)."""
    if key_id.startswith("arn:") and ":key/" in key_id:
        return key_id
    try:
        return c.kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    except _client_error() as exc:
        raise ConfigurationError(
            f"the bucket {bucket} is encrypted with the KMS key {key_id}, which is kept, but "
            f"KMS did not describe it ({_code(exc)}): the node role needs its ARN to be "
            f"allowed kms:Decrypt and kms:GenerateDataKey.  Set the bucket's encryption to "
            f"the key's ARN, or run bootstrap with --no-iam and grant the node role yourself"
        ) from None


def _refuse_running_pools(c: _Clients, name: str) -> None:
    """Teardown leaves the node pools (``kotta aws pools``): refuse, before deleting
    anything, while they exist, or their instances would run on without an enclave."""
    from .aws_pools import pool_groups

    try:
        resp = c.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=list(pool_groups(name).values())
        )
    except _client_error() as exc:
        if _code(exc) in ("AccessDenied", "AccessDeniedException"):
            return  # may not read Auto Scaling: cannot have made the pools either
        raise
    groups = [g["AutoScalingGroupName"] for g in resp["AutoScalingGroups"]]
    if groups:
        raise ConfigurationError(
            f"the node pools of aws://{name} exist ({', '.join(groups)}): delete them first "
            f"with `kotta aws pools {name} --delete` (it terminates their instances)"
        )


# --------------------------------------------------------------------------- specs


def _create_table(ddb, spec: dict[str, Any]) -> bool:
    try:
        ddb.create_table(**spec)
        return True
    except _client_error() as exc:
        if _code(exc) != "ResourceInUseException":
            raise
        return False


def jobs_table_spec(names: Names) -> dict[str, Any]:
    return {
        "TableName": names.jobs_table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "job_id", "AttributeType": "S"},
            {"AttributeName": "owner", "AttributeType": "S"},
            {"AttributeName": "created", "AttributeType": "N"},
        ],
        "KeySchema": [{"AttributeName": "job_id", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": OWNER_INDEX,
                "KeySchema": [
                    {"AttributeName": "owner", "KeyType": "HASH"},
                    {"AttributeName": "created", "KeyType": "RANGE"},
                ],
                "Projection": {
                    "ProjectionType": "INCLUDE",
                    "NonKeyAttributes": list(INDEX_ATTRS),
                },
            }
        ],
        "Tags": [{"Key": "kotta-enclave", "Value": names.name}],
    }


def nodes_table_spec(names: Names) -> dict[str, Any]:
    return {
        "TableName": names.nodes_table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": "node_id", "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": "node_id", "KeyType": "HASH"}],
        "Tags": [{"Key": "kotta-enclave", "Value": names.name}],
    }


def tls_only_policy(bucket: str, partition: str = "aws") -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:{partition}:s3:::{bucket}",
                             f"arn:{partition}:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }


def ec2_trust_policy(url_suffix: str = "amazonaws.com") -> dict[str, Any]:
    """``url_suffix``: ``amazonaws.com.cn`` in China (``arn_partition``)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": f"ec2.{url_suffix}"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


#: what a node does, per service (the enclave's resources only)
NODE_SQS_ACTIONS = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:SendMessage",
    "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes",
]
NODE_JOBS_ACTIONS = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"]
NODE_NODES_ACTIONS = [
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Scan",
]
#: nodes read identities, tokens, datasets and policies, and append to the audit log only
NODE_RECORDS_READ_ACTIONS = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"]
NODE_S3_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]


def node_policy(names: Names, region: str, account: str,
                partition: str = "aws", queues: Iterable[str] = QUEUES,
                kms_key: str | None = None,
                url_suffix: str = "amazonaws.com") -> dict[str, Any]:
    """The node role's inline policy: nothing beyond the enclave's own resources.  Its
    queues by name, and its reply queues by their prefix: a pattern ``kotta-NAME-*``
    also named every queue of an enclave called ``NAME-something`` (check_name keeps the
    two prefixes left, ``-reply-`` and ``-user-``, from being another enclave's).
    ``queues``: the Kotta queues whose nodes take tasks (bootstrap's ``queues``).
    ``kms_key``: the ARN of the KMS key an existing bucket is encrypted with, if any."""
    arn = f"arn:{partition}:sqs:{region}:{account}:"
    sqs = [arn + q for name in queues for q in (names.queue(name), names.dlq(names.queue(name)))]
    sqs.append(arn + names.reply_prefix + "*")
    table = f"arn:{partition}:dynamodb:{region}:{account}:table/"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Queues", "Effect": "Allow", "Action": NODE_SQS_ACTIONS, "Resource": sqs},
            {
                "Sid": "JobRecords",
                "Effect": "Allow",
                "Action": NODE_JOBS_ACTIONS,
                "Resource": table + names.jobs_table,
            },
            {
                "Sid": "NodeRegistry",
                "Effect": "Allow",
                "Action": NODE_NODES_ACTIONS,
                "Resource": table + names.nodes_table,
            },
            {
                "Sid": "Blobs",
                "Effect": "Allow",
                "Action": NODE_S3_ACTIONS,
                "Resource": f"arn:{partition}:s3:::{names.bucket}/{names.blob_prefix}*",
            },
            {  # a node's sweep for task blobs no job records (node.daemon.STRAY_BLOB_AGE)
                # and message bodies no message names (MSG_BLOB_AGE)
                "Sid": "ListTaskBlobs",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": f"arn:{partition}:s3:::{names.bucket}",
                "Condition": {"StringLike": {"s3:prefix": [
                    f"{names.blob_prefix}fn-*", f"{names.blob_prefix}args-*",
                    f"{names.blob_prefix}msg-*"]}},
            },
            {
                "Sid": "ReadRecords",
                "Effect": "Allow",
                "Action": NODE_RECORDS_READ_ACTIONS,
                "Resource": table + names.records_table,
            },
            {
                "Sid": "AppendAudit",
                "Effect": "Allow",
                "Action": ["dynamodb:PutItem"],
                "Resource": table + names.records_table,
                "Condition": {
                    "ForAllValues:StringEquals": {
                        "dynamodb:LeadingKeys": ["audit", "audit-checkpoint"]
                    }
                },
            },
            {
                "Sid": "EnclaveKey",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": f"arn:{partition}:s3:::{names.bucket}/keys/enclave.key",
            },
            {
                "Sid": "HeldResults",
                "Effect": "Allow",
                # a result of MULTIPART_THRESHOLD or more goes up in parts: one that fails
                # aborts its upload, else its parts stay in the bucket (and are billed)
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": f"arn:{partition}:s3:::{names.bucket}/held/*",
            },
            {
                "Sid": "UserRoles",
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Resource": f"arn:{partition}:iam::{account}:role/{names.user_role_prefix}*",
            },
        ],
    }
    if kms_key:
        policy["Statement"].append({
            "Sid": "BlobsKey",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": kms_key,
            "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.{url_suffix}"}},
        })
    return policy


def _warn(out, said: str) -> None:
    """A warning of bootstrap's: logged, and printed through ``out`` (the CLI's) if any."""
    log.warning("%s", said)
    if out is not None:
        out(f"WARNING  {said}")
