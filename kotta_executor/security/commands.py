"""The security commands of ``kotta``: register, whoami, user, token, dataset, policy.

``add_parsers(subparsers)`` adds them; each parsed command carries its handler as
``args.security_handler``.  Managing and listing users, and managing tokens, datasets
and policies takes an admin; anyone may ``register``, ask ``whoami``, list datasets, see
policies, and list and revoke their own tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..backends import is_new, open_enclave
from ..config import current_user
from ..errors import AccessDenied, ConfigurationError
from . import credentials
from .policy import canonical, check_role
from .tokens import MAX_REFRESH_DAYS


def add_parsers(sub) -> None:
    r = sub.add_parser("register", help="store a registration token from an enclave admin")
    r.add_argument("token", help="the registration (refresh) token, krt1.ID.SECRET")
    r.set_defaults(security_handler=cmd_register)

    w = sub.add_parser("whoami", help="the user and role of your token")
    w.set_defaults(security_handler=cmd_whoami)

    u = sub.add_parser("user", help="manage users (admins)")
    us = u.add_subparsers(dest="user_command", required=True)
    a = us.add_parser("add", help="add a user; prints their registration token")
    a.add_argument("name")
    a.add_argument("--role", required=True)
    a.add_argument("--admin", action="store_true")
    a.set_defaults(security_handler=cmd_user_add)
    ls = us.add_parser("list", help="list users (admins)")
    ls.set_defaults(security_handler=cmd_user_list)
    for verb, help_ in (
        ("disable", "disable a user: their tokens stop working at once"),
        ("enable", "enable a disabled user: their tokens that are not revoked work again"),
    ):
        p = us.add_parser(verb, help=help_)
        p.add_argument("name")
        p.set_defaults(security_handler=cmd_user_disable, disable=verb == "disable")

    t = sub.add_parser("token", help="registration tokens: issue, revoke, list")
    ts = t.add_subparsers(dest="token_command", required=True)
    i = ts.add_parser("issue", help="a new registration token for a user (admins)")
    i.add_argument("user")
    i.add_argument("--days", type=float, default=90.0,
                   help=f"valid this many days (default 90, at most {MAX_REFRESH_DAYS})")
    i.set_defaults(security_handler=cmd_token_issue)
    rv = ts.add_parser("revoke", help="revoke a registration token and its access tokens")
    rv.add_argument("token", help="the token's id, or the whole token")
    rv.set_defaults(security_handler=cmd_token_revoke)
    tl = ts.add_parser("list", help="registration tokens (yours; all for admins)")
    tl.add_argument("--user")
    tl.set_defaults(security_handler=cmd_token_list)

    d = sub.add_parser("dataset", help="protected datasets: add, list, put")
    ds = d.add_subparsers(dest="dataset_command", required=True)
    da = ds.add_parser("add", help="register a dataset by URI (admins)")
    da.add_argument("uri", help="s3://bucket/prefix/ or s3://bucket/object")
    da.add_argument("--description", default="")
    da.add_argument("--egress", choices=["allow", "deny"],
                    help="whether data read from it may leave the enclave (default allow; "
                         "a registered dataset keeps its own)")
    da.add_argument("--egress-cap", type=_cap, metavar="BYTES",
                    help="bytes a task that read it may return to its client ('none': no "
                         "cap; a registered dataset keeps its own)")
    da.set_defaults(security_handler=cmd_dataset_add)
    dr = ds.add_parser("remove", help="unregister a dataset and its policies (admins)")
    dr.add_argument("uri")
    dr.set_defaults(security_handler=cmd_dataset_remove)
    dl = ds.add_parser("list", help="registered datasets")
    dl.set_defaults(security_handler=cmd_dataset_list)
    dp = ds.add_parser("put", help="store a file as an object of a dataset (admins)")
    dp.add_argument("uri")
    dp.add_argument("file", type=Path)
    dp.set_defaults(security_handler=cmd_dataset_put)

    p = sub.add_parser("policy", help="per-role dataset policies: grant, revoke, show")
    ps = p.add_subparsers(dest="policy_command", required=True)
    for verb, help_ in (("grant", "allow (or --deny) a role an action"),
                        ("revoke", "remove a role's statement")):
        g = ps.add_parser(verb, help=f"{help_} on a dataset (admins)")
        g.add_argument("role")
        g.add_argument("dataset")
        g.add_argument("action", choices=["read", "write"])
        if verb == "grant":
            g.add_argument("--deny", action="store_true",
                           help="an explicit deny, which overrides any allow")
        g.set_defaults(security_handler=cmd_policy_grant if verb == "grant" else cmd_policy_revoke)
    sh = ps.add_parser("show", help="policy statements")
    sh.add_argument("--role")
    sh.add_argument("--dataset")
    sh.set_defaults(security_handler=cmd_policy_show)


#: ``--egress-cap none``: no cap (given, unlike the option left out)
NO_CAP = "none"


def _cap(text: str) -> int | str:
    if text.strip().lower() == NO_CAP:
        return NO_CAP
    try:
        return int(text)
    except ValueError:  # (argparse said "invalid _cap value", naming this function)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of bytes (0 or more) nor {NO_CAP!r}") from None


def _setup(args, *, admin: bool = False):
    # A new enclave named here is made (an admin sets one up with `kotta --enclave DIR
    # user add ...`), but said so: a mistyped path would get users and tokens of its own.
    new = is_new(args.enclave)
    enclave = open_enclave(args.enclave)
    if new:
        print(f"kotta: note: there was no enclave at {enclave.url}; made a new one",
              file=sys.stderr)
    # the enclave's word on the caller's token, not only its cached claims: a user
    # disabled or a token revoked since it was cached is refused here (and audited)
    creds = credentials.load(enclave).check(_doing(args))
    if admin and not creds.admin:  # audited, as any refusal: a try at one's own rights
        _audit_refusal(enclave, creds, f"{_doing(args)} (only admins may)")
        require_admin(enclave, creds)
    return enclave, creds


def _audit_refusal(enclave, creds, detail: str) -> None:
    from .audit import AuditLog

    AuditLog(enclave).append("job-denied", user=creds.user, allowed=False, detail=detail)


def require_admin(enclave, creds) -> None:
    """AccessDenied unless ``creds`` (checked: ``Credentials.check``) are an admin's."""
    if not creds.admin:
        raise AccessDenied(f"only an admin of {enclave.url} may do this ({creds.user} is not one)")


def _doing(args) -> str:
    """The command being run, as the audit names a refused one: ``kotta user add``."""
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join(["kotta", args.command, *([sub] if sub else [])])


def _services(enclave):
    from .audit import AuditLog
    from .data import enclave_areas
    from .policy import PolicyStore
    from .tokens import TokenService

    audit = AuditLog(enclave)
    return TokenService(enclave, audit), PolicyStore(enclave.records, audit,
                                                     reserved=enclave_areas(enclave))


def cmd_register(args) -> int:
    # (a token can only be for an enclave that exists: a mistyped path is an error)
    enclave = open_enclave(args.enclave, must_exist=True)
    held = credentials.stored_user(enclave)
    creds = credentials.register(enclave, args.token)
    print(f"registered as {creds.user} (role {creds.role}) with {enclave.url}; "
          f"token stored in {creds.path}")
    if held not in (None, creds.user):
        # another user's token replaced (an admin who registered the token just printed
        # for a user, in their own shell): their commands act as that user from now on
        back = f"`kotta register` a token of {held}'s (`kotta token issue {held}`, by an admin)"
        if held == current_user():  # (the first use's admin, if the enclave key is theirs)
            back += (f", or remove the enclave's entry from {creds.path} and run kotta: the "
                     "enclave's OS user gets a new token, as on first use")
        print(f"kotta: note: {creds.path} held the token of {held} for {enclave.url}; it "
              f"holds {creds.user}'s now, and kotta and executors act as {creds.user} (keep "
              f"each user's token in a $KOTTA_HOME of their own).  To be {held} again: "
              f"{back}", file=sys.stderr)
    return 0


def cmd_whoami(args) -> int:
    enclave, creds = _setup(args)
    tok = creds.access()
    print(f"{creds.user} (role {creds.role}{', admin' if creds.admin else ''}) on {enclave.url};"
          f" access token valid until {_when(tok.expires)}")
    return 0


def cmd_user_add(args) -> int:
    enclave, creds = _setup(args, admin=True)
    tokens, _ = _services(enclave)
    if tokens.user(args.name) is not None:
        raise ValueError(f"the user {args.name} already exists (`kotta token issue` for a token)")
    # if absent still: another admin adding the same name since the check above was
    # replaced by this one, and the token printed to them registered this identity
    ident = tokens.add_user(args.name, args.role, admin=args.admin, by=creds.user,
                            if_absent=True)
    if ident is None or (ident.role, ident.admin, ident.created_by) != (
            args.role, args.admin, creds.user):
        by = f", added by {ident.created_by} a moment ago" if ident else ""
        raise ValueError(f"the user {args.name} already exists{by} (`kotta token issue` for "
                         "a token)")
    token = tokens.issue_refresh(args.name, by=creds.user)
    print(f"added {args.name} (role {args.role}{', admin' if args.admin else ''}).  "
          "Give them this registration token, once; they run `kotta register TOKEN`:")
    print(token)
    return 0


def cmd_user_list(args) -> int:
    # admins only: the list names every user of the enclave and their roles (which data
    # each may read), itself not for every user of an enclave of sensitive data; one's own
    # user and role is `kotta whoami`.  A refusal is audited, as any
    enclave, creds = _setup(args)
    if not creds.admin:
        _audit_refusal(enclave, creds, "kotta user list (only admins may)")
        raise AccessDenied(f"only an admin of {enclave.url} may list its users ({creds.user} "
                           "is not one); `kotta whoami` shows your own user and role")
    tokens, _ = _services(enclave)
    print(f"{'USER':24}  {'ROLE':16}  {'ADMIN':5}  STATE")
    for u in tokens.users():
        print(f"{u.user:24}  {u.role:16}  {'yes' if u.admin else 'no':5}  "
              f"{'disabled' if u.disabled else 'active'}")
    return 0


def cmd_user_disable(args) -> int:
    enclave, creds = _setup(args, admin=True)
    tokens, _ = _services(enclave)
    tokens.set_disabled(args.name, args.disable, by=creds.user)
    print(f"{args.name} {'disabled' if args.disable else 'enabled'}")
    return 0


def cmd_token_issue(args) -> int:
    if not 0 < args.days <= MAX_REFRESH_DAYS:  # (not NaN either)
        raise ValueError(f"--days must be more than 0 and at most {MAX_REFRESH_DAYS}, "
                         f"not {args.days:g}")
    enclave, creds = _setup(args, admin=True)
    tokens, _ = _services(enclave)
    print(tokens.issue_refresh(args.user, by=creds.user, ttl=args.days * 86400))
    return 0


def cmd_token_revoke(args) -> int:
    enclave, creds = _setup(args)
    tokens, _ = _services(enclave)
    rid = args.token.split(".")[1] if args.token.startswith("krt1.") else args.token
    rec = enclave.records.get("refresh", rid)
    if (rec is None or rec["user"] != creds.user) and not creds.admin:
        # one refusal for another user's id and an unknown one, naming no owner: it must
        # not tell a user who holds a token id, nor which ids exist (the audit says)
        whose = "no such token" if rec is None else f"a token of {rec['user']}"
        _audit_refusal(enclave, creds, f"kotta token revoke {rid}: {whose}")
        raise AccessDenied(f"{creds.user} holds no token {rid}; only an admin may revoke "
                           "another user's token (`kotta token list` shows yours)")
    done = tokens.revoke(args.token, by=creds.user)
    print(f"token {rid} {'revoked' if done else 'was already revoked'}")
    return 0


def cmd_token_list(args) -> int:
    enclave, creds = _setup(args)
    tokens, _ = _services(enclave)
    if args.user not in (None, creds.user) and not creds.admin:
        from .access import deny

        deny(enclave, creds, None, "list the tokens of other users")
    if args.user is not None and tokens.user(args.user) is None:
        raise ConfigurationError(f"no user {args.user!r} in the enclave")
    user = args.user if creds.admin else creds.user
    print(f"{'TOKEN':18}  {'USER':20}  {'CREATED':20}  {'EXPIRES':20}  STATE")
    now = time.time()
    for t in tokens.tokens(user):
        if t.get("revoked"):
            state = f"revoked {_when(t['revoked'])}"
        elif not now <= t["expires"]:  # (NaN, which an older version stored, too)
            state = "expired"
        else:
            state = "valid"
        print(f"{t['id']:18}  {t['user']:20}  {_when(t['created']):20}  "
              f"{_when(t['expires']):20}  {state}")
    return 0


def cmd_dataset_add(args) -> int:
    enclave, creds = _setup(args, admin=True)
    _, policies = _services(enclave)
    # an update changes what it is told to, never the egress rule by default: re-adding a
    # dataset to change its description must not let its data leave the enclave
    old = policies.dataset(args.uri)
    egress = args.egress or (old.egress if old else "allow")
    cap = old.egress_cap if args.egress_cap is None and old else args.egress_cap
    ds = policies.add_dataset(args.uri, by=creds.user, description=args.description,
                              egress=egress, egress_cap=None if cap == NO_CAP else cap)
    print(f"dataset {ds.uri} registered (egress {ds.egress}"
          f"{'' if ds.egress_cap is None else f', cap {ds.egress_cap} bytes'})")
    return 0


def cmd_dataset_remove(args) -> int:
    enclave, creds = _setup(args, admin=True)
    _, policies = _services(enclave)
    uri = canonical(args.uri)
    if not policies.remove_dataset(uri, by=creds.user):
        raise ConfigurationError(f"{uri} is not a registered dataset (`kotta dataset list`)")
    print(f"dataset {uri} removed")
    return 0


def cmd_dataset_list(args) -> int:
    enclave, _ = _setup(args)
    _, policies = _services(enclave)
    print(f"{'DATASET':50}  {'EGRESS':6}  {'CAP':>12}  DESCRIPTION")
    for ds in policies.datasets():
        cap = "-" if ds.egress_cap is None else str(ds.egress_cap)
        print(f"{ds.uri:50}  {ds.egress:6}  {cap:>12}  {ds.description}")
    return 0


def cmd_dataset_put(args) -> int:
    from .data import enclave_areas, put_object
    from .uris import parse_own_uri, parse_uri

    try:  # (first: a mistyped file name makes no enclave)
        data = open(args.file, "rb")  # (closed below)
    except OSError as exc:  # missing, a directory, not readable
        raise ValueError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    with data:  # copied in chunks, never read whole: a dataset may be larger than memory
        enclave, creds = _setup(args, admin=True)
        uri = parse_uri(args.uri)
        # never the enclave's own objects (on AWS they share its bucket): a put of its
        # key replaced it, and every token, the admins' too, stopped verifying
        area = next((a for a in map(parse_own_uri, enclave_areas(enclave)) if a.contains(uri)),
                    None)
        if area is not None:
            raise ConfigurationError(f"{uri.uri} is in {area.uri}, the enclave's own storage "
                                     "(its key, task payloads and results, held results): "
                                     "not written")
        from .audit import AuditLog

        # audited first, as a node's stage-out: an object whose record could not be
        # written after it was in its dataset unaudited.  (A write that then fails
        # leaves the record of its attempt; a URI refused, a prefix say, leaves none)
        put_object(enclave, uri.uri, data, before=lambda: AuditLog(enclave).append(
            "stage-out", user=creds.user, dataset=uri.uri, allowed=True,
            detail=f"kotta dataset put {args.file}"))
    print(f"stored {args.file} as {uri.uri}")
    return 0


def cmd_policy_grant(args) -> int:
    enclave, creds = _setup(args, admin=True)
    _, policies = _services(enclave)
    effect = "deny" if args.deny else "allow"
    policies.grant(args.role, args.dataset, args.action, by=creds.user, effect=effect)
    print(f"{effect} {args.action} on {args.dataset} for role {args.role}")
    return 0


def cmd_policy_revoke(args) -> int:
    enclave, creds = _setup(args, admin=True)
    _, policies = _services(enclave)
    done = policies.revoke(args.role, args.dataset, args.action, by=creds.user)
    print(f"{'removed' if done else 'there was no'} {args.action} statement on {args.dataset} "
          f"for role {args.role}")
    return 0 if done else 1


def cmd_policy_show(args) -> int:
    if args.role is not None:
        check_role(args.role)  # a name no statement can have: said, not an empty table
    enclave, _ = _setup(args)
    _, policies = _services(enclave)
    print(f"{'ROLE':16}  {'ACTION':6}  {'EFFECT':6}  DATASET")
    for st in policies.statements(role=args.role, dataset=args.dataset):
        print(f"{st.role:16}  {st.action:6}  {st.effect:6}  {st.dataset}")
    return 0


def _when(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # stored by an older version: not a time
        return f"{ts!r} (not a time)"

