"""Dataset objects, scoped data credentials and staging (kotta_executor/security/data.py,
node/staging.py): real files under tmp_path, AWS on in-process moto only."""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError

from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import (
    AccessDenied,
    AuthenticationError,
    ConfigurationError,
    InvalidDataUri,
    StagingFailed,
)
from kotta_executor.security import data
from kotta_executor.security.data import (
    EmbeddedObjects,
    ObjectInfo,
    S3Objects,
    get_object,
    issue_credential,
    objects_for,
    open_objects,
    put_object,
    verify_credential,
)
from kotta_executor.security.policy import session_policy
from node.staging import StageCache, cache_key, stage_inputs, stage_outputs
from tests import aws_moto


def store_for(enclave, read=(), write=(), user="alice", job_id="job-1") -> EmbeddedObjects:
    return EmbeddedObjects(
        enclave, issue_credential(enclave, user=user, job_id=job_id, read=read, write=write)
    )


def _flip(text: str) -> str:
    """``text`` with its first base64 character changed (the first one always carries
    eight whole bits of the first byte, so the decoded bytes change)."""
    return ("B" if text[0] == "A" else "A") + text[1:]


# --------------------------------------------------------------------------- credentials


def test_credential_round_trip(enclave):
    token = issue_credential(
        enclave,
        user="alice",
        job_id="j1",
        read=["s3://bucket/in/", "s3://bucket/x.csv", "s3://bucket/in/"],
        write=("s3://bucket/out/",),
        ttl=60,
    )
    assert token.startswith("kd1.") and token.count(".") == 2
    cred = verify_credential(enclave, token)
    assert cred.user == "alice" and cred.job_id == "j1"
    assert cred.read == ("s3://bucket/in/", "s3://bucket/x.csv")  # canonical, no duplicates
    assert cred.write == ("s3://bucket/out/",)
    assert verify_credential(enclave, token, now=cred.expires - 1) == cred
    assert cred.expires - 60 <= verify_credential(enclave, token).expires


def test_tampered_payload_does_not_verify(enclave):
    token = issue_credential(enclave, user="alice", job_id="j1", read=["s3://bucket/a"])
    prefix, payload, sig = token.split(".")
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verify_credential(enclave, f"{prefix}.{_flip(payload)}.{sig}")
    # a well-formed payload granting more, with the old signature
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["write"] = ["s3://bucket/"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verify_credential(enclave, f"{prefix}.{forged}.{sig}")


def test_tampered_signature_does_not_verify(enclave):
    token = issue_credential(enclave, user="alice", job_id="j1", read=["s3://bucket/a"])
    prefix, payload, sig = token.split(".")
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verify_credential(enclave, f"{prefix}.{payload}.{_flip(sig)}")
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verify_credential(enclave, f"{prefix}.{payload}.{sig[:-4]}")


def test_expired_credential(enclave):
    token = issue_credential(enclave, user="alice", job_id="j1", ttl=10)
    cred = verify_credential(enclave, token)
    with pytest.raises(AuthenticationError, match=r"job j1 \(alice\) expired at \d{4}-"):
        verify_credential(enclave, token, now=cred.expires)
    with pytest.raises(ConfigurationError, match="ttl must be positive"):
        issue_credential(enclave, user="alice", job_id="j1", ttl=0)


def test_every_store_call_checks_expiry(enclave, monkeypatch):
    put_object(enclave, "s3://bucket/a", b"x")
    store = store_for(enclave, read=["s3://bucket/a"])
    assert store.head("s3://bucket/a").size == 1
    later = store.credential.expires + 1
    monkeypatch.setattr(data, "time", SimpleNamespace(time=lambda: later))
    with pytest.raises(AuthenticationError, match="expired"):
        store.head("s3://bucket/a")


def test_another_enclaves_credential_does_not_verify(enclave, tmp_path):
    other = EmbeddedEnclave(tmp_path / "other")
    try:
        token = issue_credential(other, user="alice", job_id="j1", read=["s3://bucket/a"])
        with pytest.raises(AuthenticationError, match="signature does not verify"):
            verify_credential(enclave, token)
        put_object(enclave, "s3://bucket/a", b"x")
        with pytest.raises(AuthenticationError):
            EmbeddedObjects(enclave, token).head("s3://bucket/a")
    finally:
        other.close()


@pytest.mark.parametrize(
    "text", ["", "garbage", "kd1.abc", "kd2.abc.def", "kd1.abc.def.ghi", "kd1.abc.!!!*", None]
)
def test_malformed_credential(enclave, text):
    with pytest.raises(AuthenticationError, match="malformed|signature does not verify"):
        verify_credential(enclave, text)


# --------------------------------------------------------------------------- coverage

COVERAGE = [
    # grant, uri, covered
    ("s3://bucket/a/", "s3://bucket/a/x", True),
    ("s3://bucket/a/", "s3://bucket/a/deep/er/x", True),
    ("s3://bucket/a/", "s3://bucket/ab", False),  # a sibling of the prefix
    ("s3://bucket/a/", "s3://bucket/ab/x", False),
    ("s3://bucket/a/", "s3://bucket/a", False),
    ("s3://bucket/a/x", "s3://bucket/a/x", True),
    ("s3://bucket/a/x", "s3://bucket/a/xy", False),  # an object is not a prefix
    ("s3://bucket/a/x", "s3://bucket/a/x/y", False),
    ("s3://bucket/", "s3://bucket/anything", True),
    ("s3://bucket/a/", "s3://other/a/x", False),
]


@pytest.mark.parametrize("grant, uri, covered", COVERAGE)
def test_read_coverage(enclave, grant, uri, covered):
    put_object(enclave, uri, b"data")
    store = store_for(enclave, read=[grant])
    if covered:
        assert store.head(uri).size == 4
    else:
        with pytest.raises(AccessDenied, match=f"alice may not read {uri}: job job-1"):
            store.head(uri)
        with pytest.raises(AccessDenied):
            store.download(uri, enclave.home / "copy")
        assert not (enclave.home / "copy").exists()


@pytest.mark.parametrize("grant, uri, covered", COVERAGE)
def test_write_coverage(enclave, tmp_path, grant, uri, covered):
    src = tmp_path / "src"
    src.write_bytes(b"new")
    store = store_for(enclave, write=[grant])
    if covered:
        store.upload(src, uri)
        assert get_object(enclave, uri) == b"new"
    else:
        with pytest.raises(AccessDenied, match=f"alice may not write {uri}"):
            store.upload(src, uri)
        with pytest.raises(FileNotFoundError):
            get_object(enclave, uri)


def test_read_grant_is_not_a_write_grant(enclave, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"new")
    put_object(enclave, "s3://bucket/in/a", b"old")
    reader = store_for(enclave, read=["s3://bucket/in/"])
    with pytest.raises(AccessDenied, match="may not write"):
        reader.upload(src, "s3://bucket/in/a")
    assert get_object(enclave, "s3://bucket/in/a") == b"old"
    writer = store_for(enclave, write=["s3://bucket/in/"])
    with pytest.raises(AccessDenied, match="may not read"):
        writer.head("s3://bucket/in/a")


# --------------------------------------------------------------------------- traversal


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/../x", "s3://bucket/a/%2e%2e/x", "s3://bucket/a/%252e%252e/x", "s3://b\\x/a"],
)
def test_traversal_uris_are_refused(enclave, tmp_path, uri):
    store = store_for(enclave, read=["s3://bucket/"], write=["s3://bucket/"])
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(InvalidDataUri):
        store.head(uri)
    with pytest.raises(InvalidDataUri):
        store.upload(src, uri)
    with pytest.raises(InvalidDataUri):
        put_object(enclave, uri, b"x")


def test_symlink_planted_in_the_data_dir_is_refused(enclave, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (enclave.home / "data" / "bucket").mkdir(parents=True)
    os.symlink(outside, enclave.home / "data" / "bucket" / "link")
    src = tmp_path / "src"
    src.write_bytes(b"x")
    store = store_for(enclave, read=["s3://bucket/"], write=["s3://bucket/"])
    with pytest.raises(InvalidDataUri, match="outside the enclave's data directory"):
        store.head("s3://bucket/link/secret")
    with pytest.raises(InvalidDataUri):
        store.download("s3://bucket/link/secret", tmp_path / "got")
    with pytest.raises(InvalidDataUri):
        store.upload(src, "s3://bucket/link/new")
    with pytest.raises(InvalidDataUri):
        store.upload(src, "s3://bucket/link/sub/new")
    with pytest.raises(InvalidDataUri):
        get_object(enclave, "s3://bucket/link/secret")
    with pytest.raises(InvalidDataUri):
        put_object(enclave, "s3://bucket/link/new", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (tmp_path / "got").exists()


def test_a_symlink_object_is_not_an_object(enclave):
    put_object(enclave, "s3://bucket/real", b"x")
    os.symlink("real", enclave.home / "data" / "bucket" / "alias")
    store = store_for(enclave, read=["s3://bucket/"])
    with pytest.raises(FileNotFoundError, match="no object s3://bucket/alias"):
        store.head("s3://bucket/alias")
    with pytest.raises(FileNotFoundError):
        store.download("s3://bucket/alias", enclave.home / "got")


def test_upload_refuses_a_symlink_source(enclave, tmp_path):
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", tmp_path / "link")
    store = store_for(enclave, write=["s3://bucket/"])
    with pytest.raises(InvalidDataUri, match="symlink"):
        store.upload(tmp_path / "link", "s3://bucket/x")


# --------------------------------------------------------------------------- embedded store


def test_embedded_store_round_trip(enclave, tmp_path):
    put_object(enclave, "s3://bucket/in/a.csv", b"1,2,3\n")
    assert (enclave.home / "data" / "bucket" / "in" / "a.csv").read_bytes() == b"1,2,3\n"
    store = store_for(enclave, read=["s3://bucket/in/"], write=["s3://bucket/out/"])
    info = store.head("s3://bucket/in/a.csv")
    assert info.uri == "s3://bucket/in/a.csv" and info.size == 6
    got = store.download("s3://bucket/in/a.csv", tmp_path / "a.csv")
    assert got == info
    assert (tmp_path / "a.csv").read_bytes() == b"1,2,3\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    (tmp_path / "result").write_bytes(b"42")
    up = store.upload(tmp_path / "result", "s3://bucket/out/deep/result")
    assert up.size == 2
    assert get_object(enclave, "s3://bucket/out/deep/result") == b"42"


def test_etag_changes_when_an_object_is_overwritten(enclave, tmp_path):
    store = store_for(enclave, read=["s3://bucket/"], write=["s3://bucket/"])
    src = tmp_path / "src"
    src.write_bytes(b"aaaa")
    first = store.upload(src, "s3://bucket/x")
    assert store.head("s3://bucket/x") == first
    src.write_bytes(b"bbbb")  # same size; the rename makes a new inode
    second = store.upload(src, "s3://bucket/x")
    assert second.etag != first.etag and store.head("s3://bucket/x") == second
    put_object(enclave, "s3://bucket/x", b"cccc")
    assert store.head("s3://bucket/x").etag not in (first.etag, second.etag)


def test_an_object_under_the_key_of_another_is_refused_naming_it(enclave, tmp_path):
    """Objects are files on the embedded enclave: ``x`` and ``x/y`` cannot both be.  Writing
    the second raised FileExistsError or IsADirectoryError naming the enclave's files."""
    store = store_for(enclave, read=["s3://bucket/"], write=["s3://bucket/"])
    src = tmp_path / "src"
    src.write_bytes(b"y")
    put_object(enclave, "s3://bucket/x", b"x")
    for write in (lambda uri: store.upload(src, uri), lambda uri: put_object(enclave, uri, b"y")):
        for uri in ("s3://bucket/x/y", "s3://bucket/x/deeper/y"):
            with pytest.raises(InvalidDataUri, match="s3://bucket/x is an object") as info:
                write(uri)
            assert str(enclave.home) not in str(info.value)
    put_object(enclave, "s3://bucket/d/y", b"y")
    with pytest.raises(InvalidDataUri, match="other objects lie under s3://bucket/d/"):
        store.upload(src, "s3://bucket/d")
    assert get_object(enclave, "s3://bucket/x") == b"x"
    assert get_object(enclave, "s3://bucket/d/y") == b"y"


def test_missing_objects(enclave, tmp_path):
    put_object(enclave, "s3://bucket/dir/x", b"x")
    store = store_for(enclave, read=["s3://bucket/"])
    for uri in ("s3://bucket/nope", "s3://bucket/dir", "s3://bucket/dir/x/y"):
        with pytest.raises(FileNotFoundError, match=f"no object {uri} in the enclave"):
            store.head(uri)
        with pytest.raises(FileNotFoundError, match=f"no object {uri} in the enclave"):
            store.download(uri, tmp_path / "got")
    with pytest.raises(InvalidDataUri, match="is a prefix"):
        store.head("s3://bucket/dir/")


def test_objects_for_and_open_objects_on_embedded(enclave, monkeypatch, tmp_path):
    put_object(enclave, "s3://bucket/in/a", b"A")
    put_object(enclave, "s3://bucket/other", b"B")
    store, env = objects_for(
        enclave, user="alice", job_id="j9", reads=["s3://bucket/in/"], writes=[], ttl=60
    )
    assert set(env) == {"KOTTA_DATA_CREDENTIAL", "KOTTA_ENCLAVE"}
    assert env["KOTTA_ENCLAVE"] == enclave.url
    assert verify_credential(enclave, env["KOTTA_DATA_CREDENTIAL"]).read == ("s3://bucket/in/",)
    assert store.head("s3://bucket/in/a").size == 1
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    inside = open_objects()
    inside.download("s3://bucket/in/a", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b"A"
    with pytest.raises(AccessDenied, match="alice may not read s3://bucket/other"):
        inside.head("s3://bucket/other")


def test_open_objects_without_credentials(monkeypatch):
    for key in ("KOTTA_DATA_CREDENTIAL", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(AuthenticationError, match="no data credentials"):
        open_objects()


# --------------------------------------------------------------------------- AWS on moto


@pytest.fixture
def aws():
    """A bootstrapped enclave on moto, a dataset bucket and the user role of alice, whose
    own policy lets her read ``in/`` and write ``out/`` (moto enforces role policies when
    asked to; it ignores session policies)."""
    with aws_moto.aws_on_moto() as enclave:
        bucket = f"kotta-data-{enclave.name}"
        enclave.s3.create_bucket(Bucket=bucket)
        iam = enclave.session.client("iam")
        role = enclave.names.user_role_prefix + "alice"
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": "*"},
                    "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
                }
            ],
        }
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/in/*",
                },
                {
                    "Effect": "Allow",
                    "Action": "s3:PutObject",
                    "Resource": f"arn:aws:s3:::{bucket}/out/*",
                },
            ],
        }
        iam.put_role_policy(RoleName=role, PolicyName="data", PolicyDocument=json.dumps(policy))
        yield SimpleNamespace(enclave=enclave, bucket=bucket, role=role)


@pytest.fixture
def enforce_iam(monkeypatch):
    """From now on moto checks every request's credentials and policies."""
    from moto import settings

    def enforce():
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)

    return enforce


def test_assume_owner_role_on_moto(aws):
    e, bucket = aws.enclave, aws.bucket
    calls = []

    def record(params, **_):
        calls.append(dict(params))

    e.session.events.register("provide-client-params.sts.AssumeRole", record)
    try:
        creds = data.assume_owner_role(
            e,
            user="alice",
            role="alice",
            job_id="0123456789abcdef0123",
            reads=[f"s3://{bucket}/in/"],
            writes=[f"s3://{bucket}/out/r.txt"],
            ttl=60,
        )
    finally:
        e.session.events.unregister("provide-client-params.sts.AssumeRole", record)
    assert {"AccessKeyId", "SecretAccessKey", "SessionToken"} <= set(creds)
    [call] = calls
    assert call["RoleArn"] == f"arn:aws:iam::123456789012:role/{aws.role}"
    assert call["RoleSessionName"] == "kotta-0123456789abcdef0123"
    assert call["SourceIdentity"] == "alice"
    assert call["DurationSeconds"] == 900
    assert json.loads(call["Policy"]) == session_policy(
        [f"s3://{bucket}/in/"], [f"s3://{bucket}/out/r.txt"]
    )
    with pytest.raises(ConfigurationError, match="invalid role name"):
        data.assume_owner_role(e, user="alice", role="../admin", job_id="j", reads=[], writes=[])


def test_a_role_too_long_for_iam_is_refused_when_its_user_is_added_naming_the_limit(aws):
    """A role fits the role rule up to 63 characters, but its IAM role is named
    kotta-NAME-user-ROLE, which IAM takes up to 64: such a user was added, and each task of
    theirs that declared data failed at staging with a bare "invalid role name".  Adding
    the user is refused, naming IAM's limit and the longest role the enclave takes; a task
    of a user added before is failed naming it too."""
    from kotta_executor.security.tokens import TokenService

    e = aws.enclave
    longest = 64 - len(e.names.user_role_prefix)
    service = TokenService(e)
    assert service.add_user("bob", "r" * longest, by="admin").role == "r" * longest
    with pytest.raises(ConfigurationError, match="64") as info:
        service.add_user("carol", "r" * (longest + 1), by="admin")
    assert f"at most {longest} characters" in str(info.value), info.value
    assert service.user("carol") is None
    with pytest.raises(ConfigurationError, match=f"at most {longest} characters"):
        data.assume_owner_role(e, user="carol", role="r" * (longest + 1), job_id="j")


def test_a_role_of_63_characters_is_taken_on_an_embedded_enclave(tmp_path):
    """(No IAM role there: the role rule's own limit is the only one.)"""
    from kotta_executor.security.tokens import TokenService

    e = EmbeddedEnclave(tmp_path / "enclave")
    try:
        assert TokenService(e).add_user("bob", "r" * 63, by="admin").role == "r" * 63
    finally:
        e.close()


def test_assume_owner_role_names_the_session_after_the_whole_job_id(aws):
    """The session (what CloudTrail records the task's reads under) was named after the
    job id's first 16 digits: random, they told jobs apart, but a job id now begins with
    its submit time in milliseconds (12 digits), so two jobs of one burst had one session
    name in 65536, and every job of a millisecond nearly the same."""
    e, bucket = aws.enclave, aws.bucket
    names = []

    def record(params, **_):
        names.append(params["RoleSessionName"])

    ids = ["01a21ee42c8b0000" + "a" * 16, "01a21ee42c8b0000" + "b" * 16]
    e.session.events.register("provide-client-params.sts.AssumeRole", record)
    try:
        for job_id in ids:
            data.assume_owner_role(e, user="alice", role="alice", job_id=job_id,
                                   reads=[f"s3://{bucket}/in/"], ttl=60)
    finally:
        e.session.events.unregister("provide-client-params.sts.AssumeRole", record)
    assert names == [f"kotta-{job_id}" for job_id in ids]


def test_s3_objects_round_trip_on_moto(aws, tmp_path, enforce_iam):
    e, bucket = aws.enclave, aws.bucket
    put_object(e, f"s3://{bucket}/in/a.txt", b"hello")
    store, env = objects_for(
        e,
        user="alice",
        job_id=uuid.uuid4().hex,
        reads=[f"s3://{bucket}/in/"],
        writes=[f"s3://{bucket}/out/"],
    )
    assert isinstance(store, S3Objects)
    assert set(env) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
    }
    assert env["AWS_ACCESS_KEY_ID"] != os.environ["AWS_ACCESS_KEY_ID"]
    enforce_iam()  # the process's own "testing" keys would now be refused
    info = store.head(f"s3://{bucket}/in/a.txt")
    assert info.size == 5 and info.etag
    got = store.download(f"s3://{bucket}/in/a.txt", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"hello" and got.etag == info.etag
    (tmp_path / "r.txt").write_bytes(b"result")
    up = store.upload(tmp_path / "r.txt", f"s3://{bucket}/out/r.txt")
    assert up.size == 6
    assert store.download(f"s3://{bucket}/in/a.txt", tmp_path / "b.txt").size == 5
    with pytest.raises(AccessDenied, match=f"may not read s3://{bucket}/secret/x"):
        store.head(f"s3://{bucket}/secret/x")
    with pytest.raises(AccessDenied, match=f"may not write s3://{bucket}/in/a.txt"):
        store.upload(tmp_path / "r.txt", f"s3://{bucket}/in/a.txt")


def test_s3_objects_admin_reads_and_missing_objects(aws, tmp_path):
    e, bucket = aws.enclave, aws.bucket
    store, _ = objects_for(
        e, user="alice", job_id="j", reads=[f"s3://{bucket}/in/"], writes=[f"s3://{bucket}/out/"]
    )
    (tmp_path / "r").write_bytes(b"R")
    store.upload(tmp_path / "r", f"s3://{bucket}/out/r")
    assert get_object(e, f"s3://{bucket}/out/r") == b"R"
    with pytest.raises(FileNotFoundError, match=f"no object s3://{bucket}/in/nope"):
        store.head(f"s3://{bucket}/in/nope")
    with pytest.raises(FileNotFoundError, match=f"no object s3://{bucket}/in/nope"):
        store.download(f"s3://{bucket}/in/nope", tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        get_object(e, f"s3://{bucket}/in/nope")
    assert not (tmp_path / "nope").exists()


def test_s3_etag_is_the_version_id_on_a_versioned_bucket(aws, tmp_path):
    e, bucket = aws.enclave, aws.bucket
    e.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put_object(e, f"s3://{bucket}/in/v", b"same")
    store, _ = objects_for(e, user="alice", job_id="j", reads=[f"s3://{bucket}/in/"])
    first = store.head(f"s3://{bucket}/in/v")
    put_object(e, f"s3://{bucket}/in/v", b"same")  # same bytes, same MD5 ETag
    second = store.head(f"s3://{bucket}/in/v")
    versions = e.s3.list_object_versions(Bucket=bucket, Prefix="in/v")["Versions"]
    assert {first.etag, second.etag} == {v["VersionId"] for v in versions}
    assert first.etag != second.etag


def test_stage_through_s3_on_moto(aws, tmp_path, enforce_iam):
    e, bucket = aws.enclave, aws.bucket
    put_object(e, f"s3://{bucket}/in/a.txt", b"hello")
    store, _ = objects_for(
        e, user="alice", job_id="j", reads=[f"s3://{bucket}/in/"], writes=[f"s3://{bucket}/out/"]
    )
    enforce_iam()
    cache = StageCache(tmp_path / "cache", 1 << 20)
    work = tmp_path / "work"
    work.mkdir()
    assert stage_inputs(store, cache, [f"s3://{bucket}/in/a.txt"], work)[0]["cached"] is False
    assert stage_inputs(store, cache, [f"s3://{bucket}/in/a.txt"], work)[0]["cached"] is True
    (work / "r.txt").write_bytes(b"out")
    assert stage_outputs(store, work, [f"s3://{bucket}/out/r.txt"]) == [
        {"uri": f"s3://{bucket}/out/r.txt", "bytes": 3}
    ]


# --------------------------------------------------------------------------- StageCache


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_cache_evicts_least_recently_used(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=10)
    a = cache.add("s3://b/a", "e1", _file(tmp_path, "a", b"aaaa"))
    b = cache.add("s3://b/b", "e1", _file(tmp_path, "b", b"bbbb"))
    assert cache.get("s3://b/a", "e1") == a  # a becomes the most recent
    cache.add("s3://b/c", "e1", _file(tmp_path, "c", b"cccc"))
    assert cache.get("s3://b/b", "e1") is None and not b.exists()
    assert cache.get("s3://b/a", "e1").read_bytes() == b"aaaa"
    assert cache.get("s3://b/c", "e1").read_bytes() == b"cccc"
    assert cache.total_bytes == 8 and len(cache) == 2
    assert sum(p.stat().st_size for p in cache.objects.iterdir()) == 8


def test_cache_does_not_keep_an_object_larger_than_its_cap(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=4)
    kept = cache.add("s3://b/a", "e", _file(tmp_path, "a", b"aaaa"))
    big = _file(tmp_path, "big", b"12345")
    assert cache.add("s3://b/big", "e", big) == big
    assert cache.get("s3://b/big", "e") is None
    assert cache.get("s3://b/a", "e") == kept and cache.total_bytes == 4


def test_cache_files_are_read_only_and_keyed_by_uri_and_etag(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=100)
    path = cache.add("s3://b/a", "etag-1", _file(tmp_path, "a", b"v1"))
    assert path.name == cache_key("s3://b/a", "etag-1")
    assert path.stat().st_mode & 0o777 == 0o444
    assert cache.get("s3://b/a", "etag-2") is None
    assert cache.get("s3://b/other", "etag-1") is None
    assert cache_key("s3://b/a", "x") != cache_key("s3://b/a\0x", "")


def test_cache_is_rebuilt_from_disk_in_lru_order(tmp_path):
    root = tmp_path / "cache"
    cache = StageCache(root, max_bytes=100)
    paths = [cache.add(f"s3://b/{n}", "e", _file(tmp_path, n, n.encode() * 4)) for n in "xyz"]
    for i, p in enumerate([paths[1], paths[2], paths[0]]):  # y oldest, then z, then x
        os.utime(p, ns=(10**18 + i, 10**18 + i))
    (root / "tmp" / "leftover.part").write_bytes(b"half a download")
    (root / "objects" / ".deadbeef.tmp").write_bytes(b"an interrupted add")
    again = StageCache(root, max_bytes=100)
    assert len(again) == 3 and again.total_bytes == 12
    assert list((root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (root / "objects").iterdir()) == sorted(p.name for p in paths)
    smaller = StageCache(root, max_bytes=8)  # evicts the oldest: y
    assert smaller.get("s3://b/y", "e") is None and not paths[1].exists()
    assert smaller.get("s3://b/z", "e") == paths[2]
    assert smaller.get("s3://b/x", "e") == paths[0]


def test_cache_is_thread_safe(tmp_path):
    cache = StageCache(tmp_path / "cache", max_bytes=50)
    sources = [_file(tmp_path, f"s{i}", b"%d" % i * 5) for i in range(8)]
    errors = []

    def work(t):
        try:
            for i in range(40):
                k = (t * 7 + i) % 8
                cache.add(f"s3://b/{k}", "e", sources[k])
                cache.get(f"s3://b/{(k + 3) % 8}", "e")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    on_disk = sum(p.stat().st_size for p in cache.objects.iterdir())
    assert cache.total_bytes == on_disk <= 50


# --------------------------------------------------------------------------- staging


class Counting:
    """A store that counts the calls made to the store it wraps."""

    def __init__(self, store):
        self.store = store
        self.calls: list[tuple[str, str]] = []

    def head(self, uri) -> ObjectInfo:
        self.calls.append(("head", uri))
        return self.store.head(uri)

    def download(self, uri, dest) -> ObjectInfo:
        self.calls.append(("download", uri))
        return self.store.download(uri, dest)

    def upload(self, src, uri) -> ObjectInfo:
        self.calls.append(("upload", uri))
        return self.store.upload(src, uri)


@pytest.fixture
def workdir(tmp_path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_stage_inputs_uses_the_cache_and_refetches_a_changed_object(enclave, tmp_path, workdir):
    put_object(enclave, "s3://bucket/in/a.csv", b"version 1")
    put_object(enclave, "s3://bucket/in/b.csv", b"bbb")
    store = Counting(store_for(enclave, read=["s3://bucket/in/"]))
    cache = StageCache(tmp_path / "cache", max_bytes=1000)
    uris = ["s3://bucket/in/a.csv", "s3://bucket/in/b.csv"]
    assert stage_inputs(store, cache, uris, workdir) == [
        {"uri": "s3://bucket/in/a.csv", "bytes": 9, "cached": False},
        {"uri": "s3://bucket/in/b.csv", "bytes": 3, "cached": False},
    ]
    assert (workdir / "a.csv").read_bytes() == b"version 1"
    assert list(cache.tmp.iterdir()) == []
    store.calls.clear()
    second = tmp_path / "work2"
    second.mkdir()
    assert [s["cached"] for s in stage_inputs(store, cache, uris, second)] == [True, True]
    assert store.calls == [("head", uris[0]), ("head", uris[1])]
    put_object(enclave, "s3://bucket/in/a.csv", b"version 2")  # a new etag
    third = tmp_path / "work3"
    third.mkdir()
    staged = stage_inputs(store, cache, uris, third)
    assert [s["cached"] for s in staged] == [False, True]
    assert (third / "a.csv").read_bytes() == b"version 2"


def test_staged_inputs_are_copies_the_task_cannot_poison(enclave, tmp_path, workdir):
    put_object(enclave, "s3://bucket/a", b"clean")
    store = store_for(enclave, read=["s3://bucket/a"])
    cache = StageCache(tmp_path / "cache", max_bytes=1000)
    stage_inputs(store, cache, ["s3://bucket/a"], workdir)
    staged = workdir / "a"
    cached = cache.get("s3://bucket/a", store.head("s3://bucket/a").etag)
    assert staged.stat().st_ino != cached.stat().st_ino
    staged.write_bytes(b"poison")  # the task may change its own copy
    assert cached.read_bytes() == b"clean"
    other = tmp_path / "other"
    other.mkdir()
    assert stage_inputs(store, cache, ["s3://bucket/a"], other)[0]["cached"] is True
    assert (other / "a").read_bytes() == b"clean"


def test_a_cache_hit_still_checks_the_owners_permission(enclave, tmp_path, workdir):
    put_object(enclave, "s3://bucket/secret.csv", b"secret")
    cache = StageCache(tmp_path / "cache", max_bytes=1000)
    alice = store_for(enclave, read=["s3://bucket/secret.csv"])
    stage_inputs(alice, cache, ["s3://bucket/secret.csv"], workdir)
    mallory = Counting(store_for(enclave, read=["s3://bucket/public/"], user="mallory"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with pytest.raises(AccessDenied, match="mallory may not read s3://bucket/secret.csv"):
        stage_inputs(mallory, cache, ["s3://bucket/secret.csv"], theirs)
    assert mallory.calls == [("head", "s3://bucket/secret.csv")]
    assert list(theirs.iterdir()) == []


def test_stage_inputs_without_a_cache(enclave, workdir):
    put_object(enclave, "s3://bucket/x/data.bin", b"\0\1\2")
    store = store_for(enclave, read=["s3://bucket/x/"])
    assert stage_inputs(store, None, ["s3://bucket/x/data.bin"], workdir) == [
        {"uri": "s3://bucket/x/data.bin", "bytes": 3, "cached": False}
    ]
    assert (workdir / "data.bin").read_bytes() == b"\0\1\2"


def test_missing_input(enclave, tmp_path, workdir):
    store = store_for(enclave, read=["s3://bucket/"])
    cache = StageCache(tmp_path / "cache", max_bytes=1000)
    with pytest.raises(
        StagingFailed, match=r"no object s3://bucket/nope in the enclave \(a declared input\)"
    ):
        stage_inputs(store, cache, ["s3://bucket/nope"], workdir)


def test_duplicate_input_basenames(enclave, tmp_path, workdir):
    put_object(enclave, "s3://bucket/x/data.csv", b"x")
    put_object(enclave, "s3://bucket/y/data.csv", b"y")
    store = Counting(store_for(enclave, read=["s3://bucket/"]))
    with pytest.raises(
        StagingFailed, match=r"s3://bucket/x/data.csv and s3://bucket/y/data.csv .*'data.csv'"
    ):
        stage_inputs(store, None, ["s3://bucket/x/data.csv", "s3://bucket/y/data.csv"], workdir)
    assert store.calls == [] and list(workdir.iterdir()) == []


def test_a_prefix_is_not_an_input_file(enclave, workdir):
    store = store_for(enclave, read=["s3://bucket/"])
    with pytest.raises(InvalidDataUri, match="is a prefix"):
        stage_inputs(store, None, ["s3://bucket/dir/"], workdir)


def test_stage_outputs(enclave, workdir):
    store = store_for(enclave, write=["s3://bucket/out/"])
    (workdir / "model.bin").write_bytes(b"weights")
    (workdir / "log.txt").write_bytes(b"ok")
    assert stage_outputs(
        store, workdir, ["s3://bucket/out/model.bin", "s3://bucket/out/log.txt"]
    ) == [
        {"uri": "s3://bucket/out/model.bin", "bytes": 7},
        {"uri": "s3://bucket/out/log.txt", "bytes": 2},
    ]
    assert get_object(enclave, "s3://bucket/out/model.bin") == b"weights"


def test_missing_output(enclave, workdir):
    store = store_for(enclave, write=["s3://bucket/out/"])
    with pytest.raises(
        StagingFailed, match=r"did not write r.txt \(declared output s3://bucket/out/r.txt\)"
    ):
        stage_outputs(store, workdir, ["s3://bucket/out/r.txt"])


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlink_output_is_refused(enclave, tmp_path, workdir, target):
    secret = _file(tmp_path, "secret", b"the node's secret")
    (workdir / "real").write_bytes(b"x")
    os.symlink(secret if target == "outside" else workdir / "real", workdir / "r.txt")
    (workdir / "ok.txt").write_bytes(b"fine")
    store = Counting(store_for(enclave, write=["s3://bucket/out/"]))
    with pytest.raises(InvalidDataUri, match="output r.txt is a symlink"):
        stage_outputs(store, workdir, ["s3://bucket/out/ok.txt", "s3://bucket/out/r.txt"])
    assert store.calls == []  # every output is checked before any is uploaded
    with pytest.raises(FileNotFoundError):
        get_object(enclave, "s3://bucket/out/r.txt")


def test_output_that_is_not_a_regular_file(enclave, workdir):
    store = store_for(enclave, write=["s3://bucket/out/"])
    (workdir / "dir").mkdir()
    os.mkfifo(workdir / "fifo")
    for name in ("dir", "fifo"):
        with pytest.raises(StagingFailed, match=f"output {name} .* is not a regular file"):
            stage_outputs(store, workdir, [f"s3://bucket/out/{name}"])


def test_duplicate_output_basenames(enclave, workdir):
    (workdir / "r.txt").write_bytes(b"x")
    store = Counting(store_for(enclave, write=["s3://bucket/"]))
    with pytest.raises(StagingFailed, match="s3://bucket/a/r.txt and s3://bucket/b/r.txt"):
        stage_outputs(store, workdir, ["s3://bucket/a/r.txt", "s3://bucket/b/r.txt"])
    assert store.calls == []


def test_an_output_the_owner_may_not_write(enclave, workdir):
    (workdir / "r.txt").write_bytes(b"x")
    store = store_for(enclave, write=["s3://bucket/out/"])
    with pytest.raises(AccessDenied, match="alice may not write s3://bucket/elsewhere/r.txt"):
        stage_outputs(store, workdir, ["s3://bucket/elsewhere/r.txt"])


def test_s3_a_failed_upload_in_parts_leaves_no_parts_behind(aws, tmp_path, enforce_iam,
                                                            monkeypatch):
    """An output written in parts whose upload fails is aborted (its parts deleted), as the
    owner: the role's policy (role_policy, as kotta compiles a write grant) allowed
    PutObject only, the abort was refused, and the parts stayed in the bucket, unseen and
    billed, for good."""
    from kotta_executor.security.policy import Statement, role_policy

    e, bucket = aws.enclave, aws.bucket
    doc = role_policy([Statement("alice", f"s3://{bucket}/out/", "write")])
    e.session.client("iam").put_role_policy(RoleName=aws.role, PolicyName="data",
                                            PolicyDocument=json.dumps(doc))
    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", 1 << 20)
    store, _ = objects_for(e, user="alice", job_id="j", writes=[f"s3://{bucket}/out/big"])
    (tmp_path / "big").write_bytes(os.urandom(6 << 20))  # two parts
    parts = []

    def fail_the_second(**_):
        parts.append(1)
        if len(parts) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "x"}}, "UploadPart")

    store.s3.meta.events.register("before-call.s3.UploadPart", fail_the_second)
    enforce_iam()
    with pytest.raises(ClientError, match="InternalError"):
        store.upload(tmp_path / "big", f"s3://{bucket}/out/big")
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # (to look)
    assert e.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
