"""``kotta audit verify`` and ``kotta audit show``.

``add_parsers(subparsers)`` adds the ``audit`` command to the ``kotta`` parser; the parsed
arguments carry their handler as ``args.audit_handler`` (also reachable as
:func:`cmd_audit`), which returns the exit status.

``show`` is for admins: the log names every user's jobs, datasets and activity, and job
ids are what other users must not learn (docs/security.md).  It is not filtered to the
caller's own records instead: a record's ``user`` is sometimes the one acting, sometimes
the one a forged task claimed to be, so "records naming me" can carry another user's job
id.  ``verify`` is for whoever can read the enclave key (it checks the checkpoints' MACs):
it prints counts and record numbers, nothing of what the records say.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from typing import Any

from .audit import ACTIONS, AuditLog


def add_parsers(subparsers) -> argparse.ArgumentParser:
    audit = subparsers.add_parser(
        "audit",
        help="check or read the enclave's tamper-evident audit log",
        description="The enclave's audit log: a hash chain with signed checkpoints.",
    )
    sub = audit.add_subparsers(dest="audit_command", required=True)
    sub.add_parser("verify", help="check the hash chain and the checkpoints (exit 1 if broken)")
    s = sub.add_parser("show", help="list audit records, oldest first")
    s.add_argument("--user", help="only records of this user")
    s.add_argument("--dataset", metavar="URI", help="only records of datasets under this URI")
    s.add_argument("--job", metavar="ID", help="only records of this job")
    s.add_argument("--action", metavar="A",
                   help=f"only this action ({', '.join(sorted(ACTIONS))})")
    s.add_argument("--limit", type=int, metavar="N", help="only the newest N records")
    s.add_argument("--json", action="store_true", help="the records as a JSON array")
    audit.set_defaults(audit_handler=cmd_audit)
    return audit


def cmd_audit(args) -> int:
    from ..backends import open_enclave

    if args.audit_command == "show":
        _check_show_args(args)
    enclave = open_enclave(args.enclave, must_exist=True)  # a mistyped path: an error
    try:
        log = AuditLog(enclave)
        if args.audit_command == "verify":
            return _verify(log)
        if args.audit_command == "show":
            _require_admin(enclave)
            return _show(log, args)
        raise ValueError(f"unknown audit command {args.audit_command!r}")
    finally:
        enclave.close()


def _require_admin(enclave) -> None:
    """Refuse (AccessDenied, audited as ``job-denied``) a caller whose token is not an
    admin's, as ``kotta jobs --all-users`` does.

    A caller without a token who can read the enclave key administers the enclave anyway
    (credentials.py): it is let in without the first-use bootstrap, which would write
    ``user-add`` and ``token-issue`` records into the log it is about to read."""
    from ..errors import AuthenticationError
    from .access import deny
    from .credentials import _holds_enclave_key, load

    try:
        creds = load(enclave, bootstrap=False)
    except AuthenticationError:
        if _holds_enclave_key(enclave):
            return
        raise
    # A token there is who the caller is, key or not: a disabled user's or a revoked
    # token is refused (outside the try: not let in as a holder of the key instead)
    creds.check("kotta audit show")
    if not creds.admin:
        deny(enclave, creds, None, "read the audit log")


def _verify(log: AuditLog) -> int:
    report = log.verify()
    counts = f"{report.records} records, {report.checkpoints} checkpoints"
    if report.ok:
        print(f"audit log OK: {counts}")
        return 0
    for problem in report.problems:
        print(_cell(problem))
    n = len(report.problems)
    print(f"audit log BROKEN: {n} problem{'s' if n != 1 else ''} in {counts}")
    return 1


def _check_show_args(args) -> None:
    """Refuse what would select nothing by mistake (before the enclave is opened)."""
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must not be negative")
    if args.action is not None and args.action not in ACTIONS:
        raise ValueError(f"--action {_cell(args.action)} is not an action of the audit log; "
                         f"they are: {', '.join(sorted(ACTIONS))}")


def _show(log: AuditLog, args) -> int:
    rows = log.show(user=args.user, dataset=args.dataset, job_id=args.job,
                    action=args.action, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [["SEQ", "TIME", "USER", "ACTION", "ALLOWED", "DATASET", "JOB", "DETAIL"]]
    for r in rows:
        table.append([
            str(r.get("seq")), _iso(r.get("time")), _cell(r.get("user")),
            _cell(r.get("action")), "allowed" if r.get("allowed") is True else "DENIED",
            _cell(r.get("dataset")), _cell(r.get("job_id")), _cell(r.get("detail")),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
              .rstrip())
    return 0


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: Any) -> str:
    """Printable text: the log holds what users sent, so no control characters reach the
    terminal of whoever reads it."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
