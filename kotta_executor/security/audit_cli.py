"""``kotta audit verify`` and ``kotta audit show``.

``add_parsers(subparsers)`` adds the ``audit`` command to the ``kotta`` parser; the parsed
arguments carry their handler as ``args.audit_handler`` (also reachable as
:func:`cmd_audit`), which returns the exit status.
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

    enclave = open_enclave(args.enclave)
    try:
        log = AuditLog(enclave)
        if args.audit_command == "verify":
            return _verify(log)
        if args.audit_command == "show":
            return _show(log, args)
        raise ValueError(f"unknown audit command {args.audit_command!r}")
    finally:
        enclave.close()


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


def _show(log: AuditLog, args) -> int:
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must not be negative")
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
