"""Datasets and policies (:mod:`kotta_executor.security.policy`).

* :func:`evaluate` and :func:`egress_rule`, by example and by property (Hypothesis);
* :class:`PolicyStore` on every backend's records (embedded SQLite, AWS on moto);
* the IAM compilation, checked against moto's own IAM enforcement for S3.

What moto enforces (5.x, read in ``moto/iam/access_control.py`` and checked below): the
role's inline and attached policies, with ``Resource`` wildcards and deny-over-allow.  What
it does not: the session policy of ``AssumeRole(Policy=...)`` (kept, never consulted; see
``test_moto_ignores_the_session_policy``), and ``StringLike`` conditions such as
``s3:prefix`` (ignored, so a statement with one applies to every prefix).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotta_executor.backends.base import Records
from kotta_executor.backends.embedded import EmbeddedEnclave
from kotta_executor.errors import AccessDenied, ConfigurationError, InvalidDataUri
from kotta_executor.security.policy import (
    SESSION_POLICY_LIMIT,
    Dataset,
    Decision,
    PolicyStore,
    Statement,
    check_role,
    egress_rule,
    evaluate,
    role_policy,
    session_policy,
)
from kotta_executor.security.uris import parse_uri

FAST = settings(
    max_examples=300,
    deadline=None,
    # the autouse $KOTTA_HOME fixture is function scoped; these tests never touch it
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def ds(uri: str, **kwargs) -> Dataset:
    kwargs.setdefault("created", 0.0)
    kwargs.setdefault("created_by", "admin")
    return Dataset(uri, **kwargs)


def allow(role: str, dataset: str, action: str = "read") -> Statement:
    return Statement(role, dataset, action, "allow")


def deny(role: str, dataset: str, action: str = "read") -> Statement:
    return Statement(role, dataset, action, "deny")


CORPUS = "s3://data-a/corpus/"
SECRET = "s3://data-a/corpus/secret.txt"

# ----------------------------------------------------------------- names and values


@pytest.mark.parametrize("role", ["a", "alice", "lab-1", "x_y", "a" + "b" * 62])
def test_valid_roles(role):
    assert check_role(role) == role


@pytest.mark.parametrize(
    "role", ["", "Alice", "1lab", "-a", "_a", "a b", "a|b", "a/b", "a" + "b" * 63, None, 7]
)
def test_invalid_roles_are_refused_by_name(role):
    with pytest.raises(ConfigurationError, match="invalid role name"):
        check_role(role)
    with pytest.raises(ConfigurationError, match="invalid role name"):
        Statement(role, CORPUS, "read")


def test_datasets_and_statements_keep_canonical_uris():
    assert ds("s3://data-a").uri == "s3://data-a/"
    assert Statement("alice", "s3://data-a", "read").dataset == "s3://data-a/"
    with pytest.raises(InvalidDataUri):
        ds("s3://data-a/x/../y")
    with pytest.raises(InvalidDataUri):
        Statement("alice", "/etc/passwd", "read")


@pytest.mark.parametrize(
    "kwargs", [{"egress": "maybe"}, {"egress_cap": -1}, {"egress_cap": True}, {"egress_cap": 1.5}]
)
def test_invalid_egress_is_refused(kwargs):
    with pytest.raises(ConfigurationError, match="s3://data-a/corpus/"):
        ds(CORPUS, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"action": "delete"}, {"effect": "permit"}, {"action": "Read"}]
)
def test_invalid_actions_and_effects_are_refused(kwargs):
    fields = {"role": "alice", "dataset": CORPUS, "action": "read", "effect": "allow", **kwargs}
    with pytest.raises(ConfigurationError):
        Statement(**fields)


# ------------------------------------------------------------------------ evaluate


def test_an_object_outside_every_dataset_is_denied():
    d = evaluate([allow("alice", CORPUS)], [ds(CORPUS)], "alice", "read", "s3://data-a/other/x")
    assert d == Decision(
        False,
        "role alice may not read s3://data-a/other/x: it is not part of any registered dataset",
        (),
    )


def test_a_grant_on_a_prefix_allows_its_objects_and_names_them_all():
    d = evaluate([allow("alice", CORPUS)], [ds(CORPUS)], "alice", "read", "s3://data-a/corpus/a/b")
    assert d.allowed
    assert d.datasets == (CORPUS,)
    for word in ("alice", "read", "s3://data-a/corpus/a/b", CORPUS):
        assert word in d.reason


def test_a_deny_on_an_object_overrides_an_allow_on_its_prefix():
    statements = [allow("alice", CORPUS), deny("alice", SECRET)]
    datasets = [ds(CORPUS), ds(SECRET)]
    d = evaluate(statements, datasets, "alice", "read", SECRET)
    assert not d.allowed
    assert d.datasets == (CORPUS, SECRET)
    assert d.reason == (
        f"role alice may not read {SECRET}: explicitly denied by the policy on dataset {SECRET}"
    )
    assert evaluate(statements, datasets, "alice", "read", "s3://data-a/corpus/ok.txt").allowed


def test_no_grant_is_a_denial_naming_the_dataset():
    d = evaluate([allow("bob", CORPUS)], [ds(CORPUS)], "alice", "read", "s3://data-a/corpus/x")
    assert not d.allowed
    assert d.reason == (
        f"role alice has no read grant on s3://data-a/corpus/x (in dataset {CORPUS})"
    )


def test_a_write_grant_does_not_allow_reading_and_vice_versa():
    obj = "s3://data-a/corpus/x"
    assert not evaluate([allow("alice", CORPUS, "write")], [ds(CORPUS)], "alice", "read", obj).allowed
    assert not evaluate([allow("alice", CORPUS, "read")], [ds(CORPUS)], "alice", "write", obj).allowed
    assert evaluate([allow("alice", CORPUS, "write")], [ds(CORPUS)], "alice", "write", obj).allowed


def test_admin_is_not_special():
    d = evaluate([], [ds(CORPUS)], "admin", "read", "s3://data-a/corpus/x")
    assert not d.allowed and "no read grant" in d.reason


def test_statements_on_unregistered_datasets_do_not_apply():
    # a grant on a prefix that is not (or no longer) a dataset is dead
    d = evaluate([allow("alice", CORPUS)], [ds("s3://data-a/")], "alice", "read", SECRET)
    assert not d.allowed and d.datasets == ("s3://data-a/",)


def test_a_bucket_wide_dataset_and_another_bucket():
    whole = ds("s3://data-a")
    statements = [allow("alice", "s3://data-a/")]
    assert evaluate(statements, [whole], "alice", "read", "s3://data-a/any/thing").allowed
    d = evaluate(statements, [whole], "alice", "read", "s3://data-b/any/thing")
    assert not d.allowed and "not part of any registered dataset" in d.reason


def test_evaluate_refuses_bad_input():
    with pytest.raises(InvalidDataUri):
        evaluate([], [ds(CORPUS)], "alice", "read", "s3://data-a/corpus/../../etc")
    with pytest.raises(ConfigurationError):
        evaluate([], [ds(CORPUS)], "alice", "delete", "s3://data-a/corpus/x")
    with pytest.raises(ConfigurationError):
        evaluate([], [ds(CORPUS)], "Alice", "read", "s3://data-a/corpus/x")


# ----------------------------------------------------------------------- egress_rule


def test_egress_rule_is_the_strictest():
    assert egress_rule([]) == (True, None)
    assert egress_rule([ds(CORPUS)]) == (True, None)
    capped = [ds(CORPUS, egress_cap=1000), ds(SECRET, egress_cap=10), ds("s3://data-b/")]
    assert egress_rule(capped) == (True, 10)
    assert egress_rule([ds(CORPUS, egress_cap=0)]) == (True, 0)
    assert egress_rule([*capped, ds("s3://data-c/", egress="deny")]) == (False, 0)
    assert egress_rule(iter([ds("s3://data-c/", egress="deny", egress_cap=5)])) == (False, 0)


# ------------------------------------------------------------ evaluate: properties

ROLES = ["alice", "bob", "admin"]
ACTIONS = ["read", "write"]
segments = st.lists(st.sampled_from(["x", "y", "z"]), min_size=0, max_size=3)


@st.composite
def uris(draw, *, objects_only: bool = False) -> str:
    bucket = draw(st.sampled_from(["data-a", "data-b"]))
    path = "/".join(draw(segments))
    if objects_only or (path and draw(st.booleans())):
        path = path + ("/" if path else "") + draw(st.sampled_from(["f", "g"]))
    elif path:
        path += "/"
    return f"s3://{bucket}/{path}"


statements_st = st.lists(
    st.builds(
        Statement,
        role=st.sampled_from(ROLES),
        dataset=uris(),
        action=st.sampled_from(ACTIONS),
        effect=st.sampled_from(["allow", "deny"]),
    ),
    max_size=12,
)
datasets_st = st.lists(uris().map(ds), max_size=8)
requests_st = st.tuples(st.sampled_from(ROLES), st.sampled_from(ACTIONS), uris(objects_only=True))


def applies(s: Statement, datasets: list[Dataset], role: str, action: str, uri: str) -> bool:
    """The rule, stated independently: the statement's role and action, on a registered
    dataset containing the object."""
    registered = {d.uri for d in datasets}
    return (
        s.role == role
        and s.action == action
        and s.dataset in registered
        and parse_uri(s.dataset).contains(parse_uri(uri))
    )


@FAST
@given(statements_st, datasets_st, requests_st)
def test_without_an_applicable_allow_access_is_denied(statements, datasets, request_):
    role, action, uri = request_
    statements = [
        s for s in statements if not (s.effect == "allow" and applies(s, datasets, *request_))
    ]
    assert not evaluate(statements, datasets, role, action, uri).allowed


@FAST
@given(statements_st, datasets_st, requests_st, st.data())
def test_any_applicable_deny_denies_whatever_allows_exist(statements, datasets, request_, data):
    role, action, uri = request_
    dataset = data.draw(st.sampled_from(_containing(uri)))
    datasets = [*datasets, ds(dataset)]
    statements = [*statements, allow(role, dataset, action), deny(role, dataset, action)]
    statements = data.draw(st.permutations(statements))
    d = evaluate(statements, datasets, role, action, uri)
    assert not d.allowed
    assert "explicitly denied" in d.reason


@FAST
@given(statements_st, datasets_st, requests_st, st.data())
def test_an_applicable_allow_without_a_deny_allows(statements, datasets, request_, data):
    role, action, uri = request_
    dataset = data.draw(st.sampled_from(_containing(uri)))
    datasets = [*datasets, ds(dataset)]
    statements = [
        s for s in statements if not (s.effect == "deny" and applies(s, datasets, *request_))
    ]
    statements.insert(data.draw(st.integers(0, len(statements))), allow(role, dataset, action))
    d = evaluate(statements, datasets, role, action, uri)
    assert d.allowed
    assert dataset in d.datasets


@FAST
@given(statements_st, datasets_st, requests_st, statements_st)
def test_statements_that_do_not_apply_never_change_the_decision(
    statements, datasets, request_, noise
):
    noise = [s for s in noise if not applies(s, datasets, *request_)]
    before = evaluate(statements, datasets, *request_)
    assert evaluate([*noise, *statements], datasets, *request_) == before
    assert evaluate([*statements, *noise], datasets, *request_) == before


@FAST
@given(statements_st, datasets_st, requests_st)
def test_the_decision_follows_the_rule(statements, datasets, request_):
    """The three cases at once, against the independent statement of the rule."""
    effects = {s.effect for s in statements if applies(s, datasets, *request_)}
    d = evaluate(statements, datasets, *request_)
    assert d.allowed == (effects == {"allow"})
    assert set(d.datasets) == {
        x.uri for x in datasets if x.location.contains(parse_uri(request_[2]))
    }


def _containing(uri: str) -> list[str]:
    """Every dataset URI containing the object ``uri``: its bucket, its prefixes, itself."""
    parts = uri[len("s3://"):].split("/")
    return ["s3://" + "/".join(parts[:n]) + "/" for n in range(1, len(parts))] + [uri]


def test_containing_helper():
    assert _containing("s3://data-a/x/f") == ["s3://data-a/", "s3://data-a/x/", "s3://data-a/x/f"]
    obj = parse_uri("s3://data-a/x/f")
    assert all(parse_uri(c).contains(obj) for c in _containing(obj.uri))


# --------------------------------------------------------------------- PolicyStore


@contextlib.contextmanager
def _embedded_records(tmp_path) -> Iterator[Records]:
    enclave = EmbeddedEnclave(tmp_path / "enclave")
    try:
        yield enclave.records
    finally:
        enclave.close()


@contextlib.contextmanager
def _aws_records(tmp_path) -> Iterator[Records]:
    from tests.aws_moto import aws_on_moto

    with aws_on_moto(tmp_path, create_queues=False) as enclave:
        yield enclave.records


RECORDS = {"embedded": _embedded_records, "aws": _aws_records}


@pytest.fixture(params=sorted(RECORDS))
def records(request, tmp_path) -> Iterator[Records]:
    """A fresh enclave's records, on each backend."""
    with RECORDS[request.param](tmp_path) as r:
        yield r


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def audited() -> list[tuple[str, dict]]:
    return []


@pytest.fixture
def store(records, audited) -> PolicyStore:
    def audit(action: str, **fields) -> None:
        audited.append((action, fields))

    return PolicyStore(records, audit, clock=Clock())


def test_add_and_read_datasets(store, audited):
    added = store.add_dataset("s3://data-a", by="root", description="everything")
    assert added == ds("s3://data-a/", description="everything", created=1000.0,
                       created_by="root")
    store.add_dataset(SECRET, by="root", egress="deny")
    store.add_dataset("s3://data-a/corpus", by="root")  # an object, not the prefix
    assert store.dataset("s3://data-a") == added
    assert store.dataset("s3://data-a/nothing/") is None
    assert store.dataset(SECRET).egress == "deny"
    assert [d.uri for d in store.datasets()] == ["s3://data-a/", "s3://data-a/corpus", SECRET]
    assert [d.uri for d in store.datasets_for(SECRET)] == ["s3://data-a/", SECRET]
    assert store.datasets_for("s3://data-b/x") == []
    assert [a for a, _ in audited] == ["dataset-add"] * 3
    assert audited[1][1] == {
        "user": "root", "allowed": True, "dataset": SECRET, "job_id": None,
        "detail": "added: egress deny, no cap",
    }


def test_re_adding_a_dataset_updates_it_but_keeps_its_creation(store, audited):
    store.add_dataset(CORPUS, by="root")
    store._clock.now = 2000.0
    updated = store.add_dataset(CORPUS, by="other-admin", description="v2", egress_cap=100)
    assert updated == ds(CORPUS, description="v2", egress_cap=100, created=1000.0,
                         created_by="root")
    assert store.dataset(CORPUS) == updated
    assert len(store.datasets()) == 1
    assert audited[-1][1]["user"] == "other-admin"
    assert audited[-1][1]["detail"] == "updated: egress allow, a cap of 100 bytes"


def test_grant_check_and_revoke(store, audited):
    store.add_dataset(CORPUS, by="root")
    obj = "s3://data-a/corpus/a.txt"
    assert not store.check("alice", "read", obj).allowed
    assert store.grant("alice", CORPUS, "read", by="root") == allow("alice", CORPUS)
    assert store.check("alice", "read", obj).allowed
    assert not store.check("alice", "write", obj).allowed
    assert not store.check("bob", "read", obj).allowed
    assert store.statements() == [allow("alice", CORPUS)]
    assert store.revoke("alice", CORPUS, "read", by="root") is True
    assert store.revoke("alice", CORPUS, "read", by="root") is False
    assert not store.check("alice", "read", obj).allowed
    assert [(a, f["dataset"], f["detail"]) for a, f in audited] == [
        ("dataset-add", CORPUS, "added: egress allow, no cap"),
        ("policy-grant", CORPUS, "allow read to role alice"),
        ("policy-revoke", CORPUS, "read of role alice"),
    ]


def test_a_deny_replaces_an_allow_of_the_same_role_action_and_dataset(store):
    store.add_dataset(CORPUS, by="root")
    store.grant("alice", CORPUS, "read", by="root")
    store.grant("alice", CORPUS, "read", by="root", effect="deny")
    assert store.statements() == [deny("alice", CORPUS)]
    d = store.check("alice", "read", "s3://data-a/corpus/a.txt")
    assert not d.allowed and "explicitly denied" in d.reason


def test_granting_on_an_unregistered_dataset_is_refused_by_name(store, audited):
    with pytest.raises(ConfigurationError, match="s3://data-a/corpus/ is not a registered"):
        store.grant("alice", "s3://data-a/corpus/", "read", by="root")
    store.add_dataset(CORPUS, by="root")
    with pytest.raises(ConfigurationError, match="'delete'"):
        store.grant("alice", CORPUS, "delete", by="root")
    with pytest.raises(ConfigurationError, match="'Alice'"):
        store.grant("Alice", CORPUS, "read", by="root")
    with pytest.raises(ConfigurationError, match="'permit'"):
        store.grant("alice", CORPUS, "read", by="root", effect="permit")
    assert store.statements() == []
    assert [a for a, _ in audited] == ["dataset-add"]


def test_removing_a_dataset_removes_its_statements(store, audited):
    for uri in (CORPUS, SECRET, "s3://data-b/"):
        store.add_dataset(uri, by="root")
    store.grant("alice", CORPUS, "read", by="root")
    store.grant("bob", CORPUS, "write", by="root")
    store.grant("alice", SECRET, "read", by="root", effect="deny")
    store.grant("alice", "s3://data-b/", "read", by="root")
    assert store.remove_dataset(CORPUS, by="root") is True
    assert store.remove_dataset(CORPUS, by="root") is False
    assert store.dataset(CORPUS) is None
    assert store.statements(dataset=CORPUS) == []
    assert store.statements() == [deny("alice", SECRET), allow("alice", "s3://data-b/")]
    d = store.check("alice", "read", "s3://data-a/corpus/a.txt")
    assert not d.allowed and "not part of any registered dataset" in d.reason
    assert [a for a, _ in audited].count("dataset-remove") == 1
    assert audited[-1] == ("dataset-remove", {
        "user": "root", "allowed": True, "dataset": CORPUS, "job_id": None,
        "detail": "removed with 2 statement(s)",
    })


def test_statements_filter_by_role_and_dataset(store):
    odd = "s3://data-a/we|ird/"  # "|" in a key: the record key splits at the first two
    for uri in (CORPUS, odd):
        store.add_dataset(uri, by="root")
    store.grant("alice", CORPUS, "read", by="root")
    store.grant("alice", odd, "write", by="root")
    store.grant("bob", odd, "read", by="root")
    assert store.statements(role="alice") == [
        allow("alice", CORPUS), allow("alice", odd, "write")
    ]
    assert store.statements(dataset=odd) == [allow("alice", odd, "write"), allow("bob", odd)]
    assert store.statements(role="bob", dataset=CORPUS) == []
    assert store.check("bob", "read", "s3://data-a/we|ird/x").allowed


def test_require_audits_denials_only(store, audited):
    store.add_dataset(CORPUS, by="root")
    store.add_dataset(SECRET, by="root")
    store.grant("alice", CORPUS, "read", by="root")
    store.grant("alice", SECRET, "read", by="root", effect="deny")
    del audited[:]

    d = store.require("alice", "read", "s3://data-a/corpus/a.txt", user="alice@lab", job_id="j1")
    assert d.allowed
    assert audited == []

    with pytest.raises(AccessDenied, match="explicitly denied") as denied:
        store.require("alice", "read", SECRET, user="alice@lab", job_id="j2")
    assert audited == [("access-denied", {
        "user": "alice@lab", "allowed": False, "dataset": SECRET, "job_id": "j2",
        "detail": str(denied.value),
    })]

    with pytest.raises(AccessDenied, match="not part of any registered dataset"):
        store.require("alice", "write", "s3://data-b/x", user="alice@lab")
    assert audited[-1][1]["dataset"] == "s3://data-b/x" and audited[-1][1]["job_id"] is None

    with pytest.raises(InvalidDataUri):
        store.require("alice", "read", "s3://data-a/corpus/%2e%2e/x", user="alice@lab")
    assert audited[-1][0] == "access-denied" and "steps out" in audited[-1][1]["detail"]
    assert len(audited) == 3


def test_a_store_without_audit_works(records):
    store = PolicyStore(records)
    store.add_dataset(CORPUS, by="root")
    with pytest.raises(AccessDenied):
        store.require("alice", "read", "s3://data-a/corpus/x", user="alice")


# ------------------------------------------------------------------- IAM documents

READS = ["s3:GetObject", "s3:GetObjectVersion"]


def test_role_policy_of_an_allowed_prefix_with_a_denied_object():
    statements = [allow("alice", CORPUS), deny("alice", SECRET), allow("alice", CORPUS, "write")]
    doc = role_policy(statements)
    assert doc == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AllowRead", "Effect": "Allow", "Action": READS,
             "Resource": ["arn:aws:s3:::data-a/corpus/*"]},
            {"Sid": "AllowReadList0", "Effect": "Allow", "Action": "s3:ListBucket",
             "Resource": "arn:aws:s3:::data-a",
             "Condition": {"StringLike": {"s3:prefix": ["corpus/*"]}}},
            {"Sid": "AllowWrite", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
             "Resource": ["arn:aws:s3:::data-a/corpus/*"]},
            {"Sid": "DenyRead", "Effect": "Deny", "Action": READS,
             "Resource": ["arn:aws:s3:::data-a/corpus/secret.txt"]},
            {"Sid": "DenyReadList0", "Effect": "Deny", "Action": "s3:ListBucket",
             "Resource": "arn:aws:s3:::data-a",
             "Condition": {"StringLike": {"s3:prefix": ["corpus/secret.txt"]}}},
        ],
    }


def test_role_policy_edge_cases():
    assert role_policy([]) == {"Version": "2012-10-17", "Statement": []}
    with pytest.raises(ValueError, match="one role"):
        role_policy([allow("alice", CORPUS), allow("bob", CORPUS)])
    # IAM wildcards in a key are literal characters, never patterns
    doc = role_policy([allow("alice", "s3://data-a/a*b?c$d"), allow("alice", "s3://data-b")])
    assert doc["Statement"][0]["Resource"] == [
        "arn:aws:s3:::data-a/a${*}b${?}c${$}d", "arn:aws:s3:::data-b/*"
    ]
    lists = [s for s in doc["Statement"] if s["Action"] == "s3:ListBucket"]
    assert [(s["Resource"], s["Condition"]["StringLike"]["s3:prefix"]) for s in lists] == [
        ("arn:aws:s3:::data-a", ["a${*}b${?}c${$}d"]), ("arn:aws:s3:::data-b", ["*"])
    ]


def test_session_policy_grants_exactly_the_declared_objects():
    doc = session_policy(["s3://data-a/corpus/a.txt", "s3://data-a/corpus/a.txt"],
                         ["s3://data-a/out/r.csv"])
    assert doc == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AllowRead", "Effect": "Allow", "Action": READS,
             "Resource": ["arn:aws:s3:::data-a/corpus/a.txt"]},
            {"Sid": "AllowReadList0", "Effect": "Allow", "Action": "s3:ListBucket",
             "Resource": "arn:aws:s3:::data-a",
             "Condition": {"StringLike": {"s3:prefix": ["corpus/a.txt"]}}},
            {"Sid": "AllowWrite", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
             "Resource": ["arn:aws:s3:::data-a/out/r.csv"]},
        ],
    }
    nothing = session_policy([], [])
    assert [s["Effect"] for s in nothing["Statement"]] == ["Deny"]
    with pytest.raises(InvalidDataUri):
        session_policy(["s3://data-a/../x"], [])


def test_session_policy_over_the_sts_limit_is_refused():
    reads = [f"s3://data-a/corpus/file-{n:04d}.txt" for n in range(60)]
    with pytest.raises(ValueError, match=f"STS limit of {SESSION_POLICY_LIMIT}"):
        session_policy(reads, [])
    fits = session_policy(reads[:10], [])
    assert len(json.dumps(fits, separators=(",", ":"))) <= SESSION_POLICY_LIMIT


def test_a_session_policy_over_the_limit_for_one_long_key_says_what_to_do():
    """One input of a key of 900 bytes (S3 and submit take up to 1,024) is over the limit
    on its own: the error told the user to declare fewer objects, with one declared."""
    with pytest.raises(ValueError, match="STS limit") as info:
        session_policy(["s3://data-a/" + "k" * 900], [])
    assert "declare fewer" not in str(info.value)
    assert "shorter key" in str(info.value)


# ------------------------------------------------------------- IAM, enforced by moto

BUCKET = "data-a"
OBJECTS = ["corpus/a.txt", "corpus/b.txt", "corpus/secret.txt", "other/c.txt"]
TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
}


@pytest.fixture
def iam_moto():
    """In-process moto with a bucket of :data:`OBJECTS`; ``make_role(doc)`` creates a role
    with ``doc`` as its inline policy and returns its ARN.  Set-up runs unauthenticated;
    tests switch moto's IAM enforcement on with :func:`enforced`."""
    from moto import mock_aws

    from tests.aws_moto import fake_aws_env, shared_session

    with fake_aws_env(), mock_aws():
        session = shared_session()
        s3 = session.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for key in OBJECTS:
            s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
        iam = session.client("iam")

        def make_role(name: str, doc: dict) -> str:
            arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))
            iam.put_role_policy(RoleName=name, PolicyName="kotta", PolicyDocument=json.dumps(doc))
            return arn["Role"]["Arn"]

        def s3_as(role_arn: str, policy: dict | None = None):
            kw = {"Policy": json.dumps(policy)} if policy is not None else {}
            creds = session.client("sts").assume_role(
                RoleArn=role_arn, RoleSessionName="kotta-task", **kw
            )["Credentials"]
            return session.client(
                "s3",
                aws_access_key_id=creds["AccessKeyId"],
                aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds["SessionToken"],
            )

        yield make_role, s3_as


@contextlib.contextmanager
def enforced():
    from moto.core import enable_iam_authentication

    with enable_iam_authentication():
        yield


def reachable(s3, keys=OBJECTS) -> dict[str, bool]:
    """Which objects ``s3`` may GetObject (True) or is refused with AccessDenied (False)."""
    from botocore.exceptions import ClientError

    out = {}
    for key in keys:
        try:
            assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == key.encode()
            out[key] = True
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "AccessDenied", exc.response
            out[key] = False
    return out


def can_put(s3, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"new")
        return True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "AccessDenied", exc.response
        return False


def test_role_policy_is_enforced_by_iam(iam_moto):
    make_role, s3_as = iam_moto
    doc = role_policy([allow("alice", f"s3://{BUCKET}/corpus/"),
                       deny("alice", f"s3://{BUCKET}/corpus/secret.txt")])
    s3 = s3_as(make_role("kotta-user-alice", doc))
    with enforced():
        assert reachable(s3) == {
            "corpus/a.txt": True,
            "corpus/b.txt": True,
            "corpus/secret.txt": False,  # the deny on the object beats the prefix's allow
            "other/c.txt": False,  # outside the prefix
        }
        assert not can_put(s3, "corpus/new.txt")  # a read grant is not a write grant


def test_an_empty_role_policy_reaches_nothing(iam_moto):
    make_role, s3_as = iam_moto
    s3 = s3_as(make_role("kotta-user-nobody", {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "sqs:GetQueueUrl", "Resource": "*"}],
    }))
    assert role_policy([])["Statement"] == []  # nothing to attach: the role has no grants
    with enforced():
        assert reachable(s3) == dict.fromkeys(OBJECTS, False)


def test_the_session_policy_document_grants_exactly_what_was_declared(iam_moto):
    """moto does not apply session policies (below), so the document is checked by moto's
    evaluator as a role's own policy: what it grants is then all the role may do."""
    make_role, s3_as = iam_moto
    doc = session_policy([f"s3://{BUCKET}/corpus/a.txt"], [f"s3://{BUCKET}/out/r.csv"])
    s3 = s3_as(make_role("kotta-task-doc", doc))
    with enforced():
        assert reachable(s3) == {
            "corpus/a.txt": True,
            "corpus/b.txt": False,
            "corpus/secret.txt": False,
            "other/c.txt": False,
        }
        assert can_put(s3, "out/r.csv")
        assert not can_put(s3, "out/other.csv")
        assert not can_put(s3, "corpus/a.txt")


@pytest.mark.xfail(
    strict=True,
    reason="moto (5.x) keeps AssumeRole's Policy but never consults it: an assumed role's "
    "credentials get the role's own policies only (moto/iam/access_control.py, "
    "AssumedRoleAccessKey.collect_policies). If this starts passing, moto enforces "
    "session policies: drop this mark.",
)
def test_moto_ignores_the_session_policy(iam_moto):
    make_role, s3_as = iam_moto
    arn = make_role("kotta-user-carol", role_policy([allow("carol", f"s3://{BUCKET}/corpus/")]))
    s3 = s3_as(arn, session_policy([f"s3://{BUCKET}/corpus/a.txt"], []))
    with enforced():
        got = reachable(s3, ["corpus/a.txt", "corpus/b.txt"])
    assert got == {"corpus/a.txt": True, "corpus/b.txt": False}


def test_a_key_that_is_not_utf8_is_refused():
    """A file name read with os.listdir on a non-UTF-8 name holds a lone surrogate; S3 keys
    are UTF-8, and a task header could not carry it as it is."""
    with pytest.raises(InvalidDataUri, match="not valid UTF-8"):
        parse_uri("s3://corpus/caf\udce9.csv")
    assert parse_uri("s3://corpus/café.csv").key == "café.csv"


@given(st.text(min_size=1, max_size=8).filter(lambda s: "/" not in s),
       st.characters(min_codepoint=0x80, max_codepoint=0x9F))
@settings(max_examples=60, suppress_health_check=[HealthCheck.filter_too_much])
def test_a_key_with_a_c1_control_character_is_refused(name, control):
    """U+0080-U+009F are control characters as much as those below U+0020: U+009B is a
    terminal's CSI, and `kotta dataset list` / `policy show` print dataset URIs as they
    are.  A key holding one was accepted, against "control characters are not allowed"."""
    with pytest.raises(InvalidDataUri, match="control characters"):
        parse_uri(f"s3://corpus/{name}{control}x")


def test_a_grant_or_dataset_refused_for_its_record_key_leaves_no_allowed_audit_record(
        tmp_path):
    """Audited first (commit a6ca085), a grant whose statement key was over a record
    key's 1024 bytes (a long dataset URI with the role and action before it), or a dataset
    whose URI was, left a record saying it was allowed, then was refused with the
    records' ValueError: kotta audit show listed a grant that was never made.  Now that
    is known before the record is written."""
    from kotta_executor.security.audit import AuditLog

    enclave = EmbeddedEnclave(tmp_path / "e")
    try:
        audit = AuditLog(enclave)
        policies = PolicyStore(enclave.records, audit)
        uri = "s3://corpus/" + "a" * 1009 + "/"  # 1022 bytes: a dataset key
        policies.add_dataset(uri, by="root")
        with pytest.raises(ValueError):
            policies.grant("analyst", uri, "read", by="root")
        with pytest.raises(ValueError):
            policies.add_dataset("s3://corpus/" + "b" * 1020 + "/", by="root")
        said = [(r["action"], r["detail"]) for r in audit.show()]
        assert [a for a, _ in said] == ["dataset-add"], said
        assert policies.statements() == []
    finally:
        enclave.close()
