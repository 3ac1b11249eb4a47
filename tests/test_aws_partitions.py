"""AWS partitions other than ``aws`` (China's ``aws-cn``, GovCloud's ``aws-us-gov``), on
moto only: every ARN kotta writes names the partition of the enclave's region."""

from __future__ import annotations

import json
import uuid

import pytest

from kotta_executor import aws_provision
from kotta_executor.backends.aws import AwsEnclave
from kotta_executor.security import data
from tests import aws_moto

PARTITIONS = [("cn-north-1", "aws-cn", "amazonaws.com.cn"),
              ("us-gov-west-1", "aws-us-gov", "amazonaws.com")]


@pytest.fixture(params=PARTITIONS, ids=[p for _, p, _ in PARTITIONS])
def regional(request):
    """(session, region, partition, url suffix) of a moto session in a region of another
    partition."""
    import boto3
    from moto import mock_aws

    region, partition, suffix = request.param
    with aws_moto.fake_aws_env(), mock_aws():
        session = boto3.session.Session(aws_access_key_id="testing",
                                        aws_secret_access_key="testing", region_name=region)
        yield session, region, partition, suffix


def _resources(doc) -> list[str]:
    out = []
    for s in doc["Statement"]:
        r = s.get("Resource", [])
        out += r if isinstance(r, list) else [r]
    return out


def test_bootstrap_writes_the_regions_partition_in_every_arn(regional):
    """In cn-north-1 (or us-gov-west-1) bootstrap wrote ``arn:aws:`` ARNs and the trust
    principal ``ec2.amazonaws.com``: IAM refuses or matches nothing with those there."""
    session, region, partition, suffix = regional
    name = f"t{uuid.uuid4().hex[:8]}"
    aws_provision.bootstrap(name, session=session)
    enclave = AwsEnclave(name, session=session)
    try:
        assert enclave.partition == partition
        iam, s3 = session.client("iam"), session.client("s3")
        n = enclave.names
        node = iam.get_role_policy(RoleName=n.node_role, PolicyName=n.node_role)
        doc = node["PolicyDocument"]
        doc = json.loads(doc) if isinstance(doc, str) else doc
        arns = _resources(doc)
        assert arns and all(a.startswith(f"arn:{partition}:") for a in arns), arns
        trust = iam.get_role(RoleName=n.node_role)["Role"]["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        assert [s["Principal"]["Service"] for s in trust["Statement"]] == [f"ec2.{suffix}"]
        tls = json.loads(s3.get_bucket_policy(Bucket=n.bucket)["Policy"])
        arns = _resources(tls)
        assert arns and all(a.startswith(f"arn:{partition}:s3:::") for a in arns), arns
    finally:
        enclave.close()


def test_staging_assumes_the_user_role_of_the_regions_partition(regional):
    """Staging's AssumeRole asked for ``arn:aws:iam::...`` in every region, and its session
    policy named ``arn:aws:s3:::`` objects."""
    session, region, partition, _ = regional
    name = f"t{uuid.uuid4().hex[:8]}"
    aws_provision.bootstrap(name, iam=False, tls_only=False, session=session)
    enclave = AwsEnclave(name, session=session)
    calls = []

    def record(params, **_):
        calls.append(dict(params))

    session.events.register("provide-client-params.sts.AssumeRole", record)
    try:
        role = enclave.names.user_role_prefix + "alice"
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": "*"},
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"]}]}
        session.client("iam").create_role(RoleName=role,
                                          AssumeRolePolicyDocument=json.dumps(trust))
        data.assume_owner_role(enclave, user="alice", role="alice", job_id="j1",
                               reads=["s3://corpus/in/a.txt"], writes=["s3://corpus/out/"])
    finally:
        session.events.unregister("provide-client-params.sts.AssumeRole", record)
        enclave.close()
    [call] = calls
    assert call["RoleArn"] == f"arn:{partition}:iam::123456789012:role/{role}"
    arns = _resources(json.loads(call["Policy"]))
    assert arns and all(a.startswith(f"arn:{partition}:s3:::corpus") for a in arns), arns


def test_cloudformation_names_no_fixed_partition():
    """The template is in step: its ARNs use ${AWS::Partition}, the EC2 principal
    ${AWS::URLSuffix} (it named ec2.amazonaws.com, which China's IAM does not know)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "deploy" / "cloudformation.yaml").read_text()
    assert "arn:aws:" not in text and "amazonaws.com" not in text
    assert '!Sub "ec2.${AWS::URLSuffix}"' in text


# --------------------------------------------------------------------------- legacy bucket


def test_an_enclave_on_a_pre_2018_bucket_name_keeps_its_own_areas():
    """bootstrap keeps an existing bucket named as us-east-1 allowed before 2018
    (``Legacy_Blobs``), but the data URI check took lower-case bucket names only: the
    enclave's own areas (``enclave_areas``) and held results (``held_uri``) failed with
    InvalidDataUri, so no PolicyStore (a node's data steps, every ``kotta`` security
    command) could be made for that enclave.  The enclave's own bucket is taken as it is
    named; another bucket of such a name is still refused as a dataset."""
    import boto3
    from moto import mock_aws

    from kotta_executor.errors import InvalidDataUri
    from kotta_executor.security.policy import PolicyStore

    name = f"t{uuid.uuid4().hex[:8]}"
    with aws_moto.fake_aws_env(), mock_aws():
        session = boto3.session.Session(aws_access_key_id="testing",
                                        aws_secret_access_key="testing",
                                        region_name="us-east-1")
        session.client("s3").create_bucket(Bucket="Legacy_Blobs")  # (moto makes it)
        aws_provision.bootstrap(name, bucket="Legacy_Blobs", iam=False, tls_only=False,
                                session=session)
        enclave = AwsEnclave(name, bucket="Legacy_Blobs", session=session)
        try:
            areas = data.enclave_areas(enclave)
            store = PolicyStore(enclave.records, reserved=areas)
            assert [r.bucket for r in store.reserved] == ["Legacy_Blobs"] * 3
            handle = data.held_uri(enclave, "job-1")
            data.put_object(enclave, handle, b"held result")
            assert data.get_object(enclave, handle) == b"held result"
            with pytest.raises(InvalidDataUri):  # (a dataset elsewhere: S3's rule still)
                store.add_dataset("s3://Other_Bucket/x/", by="admin")
        finally:
            enclave.close()
