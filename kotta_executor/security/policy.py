"""Datasets and who may read or write them: the enclave's data-access policy.

A *dataset* is a registered ``s3://`` prefix (ending in ``/``) or one object, with an egress
rule: whether data read from it may leave the enclave, and how many bytes.  A *statement*
grants (``allow``) or forbids (``deny``) one role one action (``read`` / ``write``) on one
dataset.  :func:`evaluate` decides one access from them, purely:

* an object in no registered dataset is denied;
* otherwise, of the role's statements for that action on the datasets containing it, any
  ``deny`` wins, then any ``allow`` grants; nothing applicable is a denial (default deny).

There is no administrator exception: admins manage datasets and statements, and still need
a grant to touch data.  :class:`PolicyStore` keeps both in an enclave's
:class:`~kotta_executor.backends.base.Records`; :func:`role_policy` and
:func:`session_policy` compile them to IAM for the AWS backend.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, Protocol, cast

from ..backends.base import Records, check_record_name
from ..errors import AccessDenied, ConfigurationError, InvalidDataUri
from .uris import DataUri, parse_own_uri, parse_uri

Action = Literal["read", "write"]
Effect = Literal["allow", "deny"]

ACTIONS: tuple[str, ...] = ("read", "write")
EFFECTS: tuple[str, ...] = ("allow", "deny")
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,62}")

DATASET = "dataset"  # records kind; key: the dataset's canonical URI
POLICY = "policy"  # records kind; key: f"{role}|{action}|{dataset}"

#: the largest session policy STS accepts (AssumeRole ``Policy``, packed JSON)
SESSION_POLICY_LIMIT = 2048
IAM_VERSION = "2012-10-17"
#: (a write may be an upload in parts, security.data.MULTIPART_THRESHOLD: one that fails is
#: aborted, its parts deleted, or they stay in the bucket, unseen and billed)
_IAM_ACTIONS = {"read": ["s3:GetObject", "s3:GetObjectVersion"],
                "write": ["s3:PutObject", "s3:AbortMultipartUpload"]}


def check_role(role: str) -> str:
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise ConfigurationError(
            f"invalid role name {role!r}: a lowercase letter, then up to 62 of a-z 0-9 _ -"
        )
    return role


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise ConfigurationError(f"invalid action {action!r}: 'read' or 'write'")
    return action


def canonical(uri: str) -> str:
    """The canonical spelling of a dataset URI (``s3://bucket`` -> ``s3://bucket/``)."""
    return parse_uri(uri).uri


@dataclass(frozen=True, slots=True)
class Dataset:
    uri: str
    _: KW_ONLY
    description: str = ""
    egress: Literal["allow", "deny"] = "allow"
    #: bytes that may leave the enclave from a task that read it (None: no limit)
    egress_cap: int | None = None
    created: float
    created_by: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", canonical(self.uri))
        if not isinstance(self.description, str):  # (5 was kept as 5; an object was
            # audited as added, then refused by the records with a bare TypeError)
            raise ConfigurationError(f"dataset {self.uri}: description must be text, not "
                                     f"{type(self.description).__name__} {self.description!r}")
        if self.egress not in ("allow", "deny"):
            raise ConfigurationError(f"dataset {self.uri}: egress must be 'allow' or 'deny'")
        cap = self.egress_cap
        if cap is not None and (type(cap) is not int or cap < 0):
            raise ConfigurationError(
                f"dataset {self.uri}: egress_cap must be a number of bytes >= 0, not {cap!r}"
            )

    @property
    def location(self) -> DataUri:
        return parse_uri(self.uri)


@dataclass(frozen=True, slots=True)
class Statement:
    role: str
    dataset: str
    action: Action
    effect: Effect = "allow"

    def __post_init__(self) -> None:
        check_role(self.role)
        check_action(self.action)
        if self.effect not in EFFECTS:
            raise ConfigurationError(f"invalid effect {self.effect!r}: 'allow' or 'deny'")
        object.__setattr__(self, "dataset", canonical(self.dataset))

    @property
    def key(self) -> str:
        return f"{self.role}|{self.action}|{self.dataset}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: human readable: names the role, the action, the URI and the dataset
    reason: str
    #: the registered datasets containing the URI
    datasets: tuple[str, ...] = ()


def evaluate(
    statements: Iterable[Statement],
    datasets: Iterable[Dataset],
    role: str,
    action: str,
    uri: str,
) -> Decision:
    """Whether ``role`` may ``action`` the object ``uri``: a deny wins, default deny."""
    check_role(role)
    check_action(action)
    target = parse_uri(uri)
    containing = sorted({d.uri for d in datasets if d.location.contains(target)})
    what = f"role {role} may not {action} {target.uri}"
    if not containing:
        return Decision(False, f"{what}: it is not part of any registered dataset")
    applicable = [
        s for s in statements
        if s.role == role and s.action == action and s.dataset in containing
    ]
    denied = sorted(s.dataset for s in applicable if s.effect == "deny")
    if denied:
        return Decision(
            False,
            f"{what}: explicitly denied by the policy on dataset {denied[0]}",
            tuple(containing),
        )
    allowed = sorted(s.dataset for s in applicable if s.effect == "allow")
    if allowed:
        return Decision(
            True,
            f"role {role} may {action} {target.uri}: granted by the policy on dataset "
            f"{allowed[0]}",
            tuple(containing),
        )
    return Decision(
        False,
        f"role {role} has no {action} grant on {target.uri} "
        f"(in dataset {', '.join(containing)})",
        tuple(containing),
    )


def egress_rule(datasets_read: Iterable[Dataset]) -> tuple[bool, int | None]:
    """The strictest egress of the datasets a task read: ``(allowed, cap in bytes)``."""
    cap: int | None = None
    for d in datasets_read:
        if d.egress == "deny":
            return False, 0
        if d.egress_cap is not None:
            cap = d.egress_cap if cap is None else min(cap, d.egress_cap)
    return True, cap


class Audit(Protocol):
    def __call__(
        self,
        action: str,
        *,
        user: str,
        allowed: bool,
        dataset: str | None,
        job_id: str | None,
        detail: str | None,
    ) -> None: ...


class PolicyStore:
    """Datasets and statements in an enclave's records; every change is audited."""

    def __init__(
        self,
        records: Records,
        audit: Audit | None = None,
        *,
        clock: Callable[[], float] = time.time,
        reserved: Iterable[str] = (),
    ):
        self.records = records
        self._audit = audit
        self._clock = clock
        #: the enclave's own storage (``data.enclave_areas``): never a dataset, never read
        #: or written by a task, whatever the statements say
        #: (the enclave names them itself: its bucket may be a pre-2018 name, parse_own_uri)
        self.reserved = tuple(parse_own_uri(u) for u in reserved)

    def _reserved(self, uri: DataUri) -> DataUri | None:
        """The area of the enclave's own storage that ``uri`` contains or lies in."""
        return next((r for r in self.reserved if r.contains(uri) or uri.contains(r)), None)

    # ------------------------------------------------------------------ datasets

    def add_dataset(
        self,
        uri: str,
        *,
        by: str,
        description: str = "",
        egress: Literal["allow", "deny"] = "allow",
        egress_cap: int | None = None,
    ) -> Dataset:
        """Register a dataset, or update one (keeping when and by whom it was created)."""
        uri = canonical(uri)
        area = self._reserved(parse_uri(uri))
        if area is not None:
            raise ConfigurationError(
                f"{uri} cannot be a dataset: it overlaps {area.uri}, the enclave's own storage "
                "(its key, task payloads and results, held results)"
            )
        old = self.dataset(uri)
        dataset = Dataset(
            uri,
            description=description,
            egress=egress,
            egress_cap=egress_cap,
            created=old.created if old else self._clock(),
            created_by=old.created_by if old else by,
        )
        value = {
            "description": dataset.description,
            "egress": dataset.egress,
            "egress_cap": dataset.egress_cap,
            "created": dataset.created,
            "created_by": dataset.created_by,
        }
        cap = "no cap" if egress_cap is None else f"a cap of {egress_cap} bytes"
        verb = "updated" if old else "added"
        # audited first: a change whose record could not be written after it was in
        # force unaudited (the admin told it failed).  (A write that then fails leaves
        # the record of its attempt.)  A key the records refuse is known before: no
        # record of a change never made
        check_record_name("key", uri)
        self._record("dataset-add", by, uri, f"{verb}: egress {egress}, {cap}")
        self.records.put(DATASET, uri, value)
        return dataset

    def remove_dataset(self, uri: str, *, by: str) -> bool:
        """Unregister a dataset and remove its statements; returns whether it existed."""
        uri = canonical(uri)
        found = self.statements(dataset=uri)
        if found or self.records.get(DATASET, uri) is not None:
            # audited first, as add_dataset
            self._record("dataset-remove", by, uri, f"removed with {len(found)} statement(s)")
        for st in found:
            self.records.delete(POLICY, st.key)
        return self.records.delete(DATASET, uri)

    def datasets(self) -> list[Dataset]:
        return [_dataset(key, value) for key, value in self.records.scan(DATASET)]

    def dataset(self, uri: str) -> Dataset | None:
        uri = canonical(uri)
        value = self.records.get(DATASET, uri)
        return None if value is None else _dataset(uri, value)

    def datasets_for(self, uri: str) -> list[Dataset]:
        """The registered datasets containing ``uri``."""
        target = parse_uri(uri)
        return [d for d in self.datasets() if d.location.contains(target)]

    # ---------------------------------------------------------------- statements

    def grant(
        self, role: str, dataset: str, action: Action, *, by: str, effect: Effect = "allow"
    ) -> Statement:
        """Allow (or, with ``effect="deny"``, forbid) ``role`` to ``action`` a dataset;
        replaces an earlier statement of the same role, action and dataset."""
        statement = Statement(role, dataset, action, effect)
        if self.records.get(DATASET, statement.dataset) is None:
            raise ConfigurationError(f"{statement.dataset} is not a registered dataset")
        # audited first, as add_dataset (its key checked before)
        check_record_name("key", statement.key)
        self._record("policy-grant", by, statement.dataset, f"{effect} {action} to role {role}")
        self.records.put(POLICY, statement.key, {"effect": effect, "by": by, "time": self._clock()})
        return statement

    def revoke(self, role: str, dataset: str, action: Action, *, by: str) -> bool:
        """Remove the statement of ``role`` for ``action`` on a dataset; returns whether
        there was one."""
        statement = Statement(role, dataset, action)
        if self.records.get(POLICY, statement.key) is None:
            return False
        # audited first, as add_dataset
        self._record("policy-revoke", by, statement.dataset, f"{action} of role {role}")
        return self.records.delete(POLICY, statement.key)

    def statements(self, role: str | None = None, dataset: str | None = None) -> list[Statement]:
        if dataset is not None:
            dataset = canonical(dataset)
        out = []
        for key, value in self.records.scan(POLICY):
            r, action, ds = key.split("|", 2)
            if (role is None or r == role) and (dataset is None or ds == dataset):
                out.append(Statement(r, ds, cast(Action, action), value["effect"]))
        return out

    # ------------------------------------------------------------------- checks

    def check(self, role: str, action: str, uri: str) -> Decision:
        """Decide one access from the current records."""
        area = self._reserved(parse_uri(uri))
        if area is not None:  # (a dataset registered there before it was refused)
            return Decision(False, f"role {role} may not {action} {canonical(uri)}: it is in "
                                   f"{area.uri}, the enclave's own storage, never a dataset")
        return evaluate(self.statements(role=role), self.datasets(), role, action, uri)

    def require(
        self, role: str, action: str, uri: str, *, user: str, job_id: str | None = None
    ) -> Decision:
        """:meth:`check`, raising :class:`~kotta_executor.errors.AccessDenied` (audited)
        when denied.  A malformed URI is audited too, and raises ``InvalidDataUri``."""
        try:
            decision = self.check(role, action, uri)
        except InvalidDataUri as exc:
            self._record("access-denied", user, None, str(exc), allowed=False, job_id=job_id)
            raise
        if not decision.allowed:
            dataset = canonical(uri)  # the object asked for: `audit show --dataset` matches prefixes
            self._record(
                "access-denied", user, dataset, decision.reason, allowed=False, job_id=job_id
            )
            raise AccessDenied(decision.reason)
        return decision

    def _record(
        self,
        action: str,
        user: str,
        dataset: str | None,
        detail: str,
        *,
        allowed: bool = True,
        job_id: str | None = None,
    ) -> None:
        if self._audit is not None:
            self._audit(
                action, user=user, allowed=allowed, dataset=dataset, job_id=job_id, detail=detail
            )


def _dataset(uri: str, value: dict[str, Any]) -> Dataset:
    return Dataset(
        uri,
        # (str: one an earlier version kept as it was given, 5, must still be read)
        description=str(value.get("description") or ""),
        egress=value.get("egress", "allow"),
        egress_cap=value.get("egress_cap"),
        created=value["created"],
        created_by=value["created_by"],
    )


# --------------------------------------------------------------------------- IAM


def role_policy(statements: Iterable[Statement], partition: str = "aws") -> dict[str, Any]:
    """One role's statements as an IAM policy document.

    Reads are ``s3:GetObject`` (and ``GetObjectVersion``) on the objects, with
    ``s3:ListBucket`` limited by ``s3:prefix``; writes are ``s3:PutObject`` (and
    ``AbortMultipartUpload``, for a failed upload in parts); denies deny the
    same actions.  No statements give an empty ``Statement`` list: do not attach it.
    ``partition``: the enclave's (``AwsEnclave.partition``: ``aws-cn`` in China)."""
    statements = list(statements)
    roles = {s.role for s in statements}
    if len(roles) > 1:
        raise ValueError(f"role_policy compiles one role's statements, not {sorted(roles)}")
    out: list[dict[str, Any]] = []
    for effect in EFFECTS:
        for action in ACTIONS:
            uris = [s.dataset for s in statements if s.effect == effect and s.action == action]
            out += _s3_statements(effect.capitalize(), action, uris, partition)
    return {"Version": IAM_VERSION, "Statement": out}


def session_policy(reads: Sequence[str], writes: Sequence[str],
                   partition: str = "aws") -> dict[str, Any]:
    """The STS session policy (AssumeRole ``Policy``) of one task: exactly the objects (or
    prefixes) it declared.  Raises ``ValueError`` above STS's 2048 characters."""
    out = (_s3_statements("Allow", "read", reads, partition)
           + _s3_statements("Allow", "write", writes, partition))
    if not out:  # no data at all: say so, rather than send an empty policy
        out = [{"Sid": "NoData", "Effect": "Deny", "Action": "s3:*", "Resource": "*"}]
    doc = {"Version": IAM_VERSION, "Statement": out}
    size = len(json.dumps(doc, separators=(",", ":")))
    if size > SESSION_POLICY_LIMIT:
        # (one object of a long key is over it alone: "declare fewer" would be no help)
        what = ("declare fewer (an archive of the files, or the work split among several "
                "tasks)" if len(set(reads)) + len(set(writes)) > 1 else
                "give the object a shorter key (some 850 bytes at most)")
        raise ValueError(
            f"the session policy for {len(reads)} read(s) and {len(writes)} write(s) is {size} "
            f"characters packed, over the STS limit of {SESSION_POLICY_LIMIT} for an AssumeRole "
            "session policy, which names each object a task declares (a task stages objects, "
            f"not prefixes): {what}"
        )
    return doc


def _s3_statements(effect: str, action: str, uris: Iterable[str],
                   partition: str = "aws") -> list[dict[str, Any]]:
    locations = sorted({parse_uri(u) for u in uris}, key=lambda d: (d.bucket, d.key))
    if not locations:
        return []
    name = f"{effect}{action.capitalize()}"
    out: list[dict[str, Any]] = [
        {
            "Sid": name,
            "Effect": effect,
            "Action": _IAM_ACTIONS[action],
            "Resource": [f"arn:{partition}:s3:::{d.bucket}/{_pattern(d)}" for d in locations],
        }
    ]
    if action == "read":
        buckets = sorted({d.bucket for d in locations})
        for n, bucket in enumerate(buckets):
            prefixes = [_pattern(d) for d in locations if d.bucket == bucket]
            out.append({
                "Sid": f"{name}List{n}",
                "Effect": effect,
                "Action": "s3:ListBucket",
                "Resource": f"arn:{partition}:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": prefixes}},
            })
    return out


def _pattern(location: DataUri) -> str:
    """An IAM resource pattern: a prefix's ``key*``, or the object's key itself (the IAM
    wildcards ``*`` ``?`` and ``$`` in a key are written as the policy variables ``${*}``,
    ``${?}``, ``${$}``, so a key is never a wildcard)."""
    key = re.sub(r"[*?$]", lambda m: "${" + m.group() + "}", location.key)
    return key + "*" if location.is_prefix else key
