"""``kotta aws bootstrap NAME`` and ``kotta aws teardown NAME``.

``add_parsers(subparsers)`` adds the ``aws`` command to the ``kotta`` parser; the parsed
arguments carry their handler as ``args.aws_handler`` (also reachable as
:func:`cmd_aws`), which returns the exit status.
"""

from __future__ import annotations

import argparse
import sys

from .backends.aws import MAX_RECEIVE_COUNT


def add_parsers(subparsers) -> argparse.ArgumentParser:
    aws = subparsers.add_parser(
        "aws",
        help="create or delete the AWS resources of an enclave (SQS, S3, DynamoDB, IAM)",
        description="Provision the AWS enclave aws://NAME (see docs/aws.md).",
    )
    sub = aws.add_subparsers(dest="aws_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="the enclave name: kotta-NAME-* resources, aws://NAME")
        p.add_argument("--region", help="AWS region (default: boto3's: AWS_REGION, ~/.aws/config)")
        p.add_argument("--profile", help="AWS profile (default: boto3's)")
        p.add_argument(
            "--endpoint-url",
            help="another endpoint (an emulator); default $KOTTA_AWS_ENDPOINT_URL",
        )
        p.add_argument("--bucket", help="bucket name (default kotta-NAME-blobs)")

    b = sub.add_parser("bootstrap", help="create the enclave's queues, bucket, tables, node role")
    common(b)
    b.add_argument(
        "--max-receive-count",
        type=int,
        default=MAX_RECEIVE_COUNT,
        help=f"deliveries before SQS redrives a task to its DLQ (default {MAX_RECEIVE_COUNT})",
    )
    b.add_argument("--no-iam", action="store_true", help="do not create the node role")
    b.add_argument(
        "--no-tls-only",
        action="store_true",
        help="no bucket policy refusing plain-HTTP requests (for emulators)",
    )

    t = sub.add_parser("teardown", help="delete the enclave's resources, with every job and blob")
    common(t)
    t.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    a = sub.add_parser("autoscale",
                       help="size each queue's Auto Scaling group by the queue's depth")
    common(a)
    a.add_argument("--group", action="append", required=True, metavar="QUEUE=ASG",
                   help="a queue and the Auto Scaling group of its nodes (repeatable)")
    a.add_argument("--per-node", type=int, default=2,
                   help="messages per node before a pool grows (default 2: 2 x workers)")
    a.add_argument("--interval", type=float, default=60.0,
                   help="seconds between checks (default 60)")
    a.add_argument("--once", action="store_true", help="check once and exit")
    aws.set_defaults(aws_handler=cmd_aws)
    return aws


def cmd_aws(args) -> int:
    from . import aws_provision

    kw = dict(
        region=args.region,
        endpoint_url=args.endpoint_url,
        profile=args.profile,
        bucket=args.bucket,
        out=print,
    )
    if args.aws_command == "bootstrap":
        aws_provision.bootstrap(
            args.name,
            max_receive_count=args.max_receive_count,
            iam=not args.no_iam,
            tls_only=False if args.no_tls_only else None,
            **kw,
        )
        return 0
    if args.aws_command == "autoscale":
        return _autoscale(args)
    if args.aws_command == "teardown":
        if not args.yes:
            if not sys.stdin.isatty():
                print("kotta: teardown deletes every job, result and blob of the enclave; "
                      "pass --yes to confirm", file=sys.stderr)  # fmt: skip
                return 2
            answer = input(f"delete the AWS enclave {args.name} and all its data? type its name: ")
            if answer.strip() != args.name:
                print("not deleted", file=sys.stderr)
                return 1
        report = aws_provision.teardown(args.name, **kw)
        if not report.deleted:
            print(f"nothing of the enclave {args.name} was found")
        return 0
    raise ValueError(f"unknown aws command {args.aws_command!r}")


def _autoscale(args) -> int:
    import time

    from .aws_autoscale import autoscale
    from .backends.aws import AwsEnclave

    groups = {}
    for spec in args.group:
        queue, sep, group = spec.partition("=")
        if not sep or not queue or not group:
            raise ValueError(f"--group takes QUEUE=ASG, not {spec!r}")
        groups[queue] = group
    enclave = AwsEnclave(args.name, region=args.region, endpoint_url=args.endpoint_url,
                         profile=args.profile, bucket=args.bucket)
    try:
        while True:
            for d in autoscale(enclave, groups, per_node=args.per_node):
                print(f"queue {d.queue}: depth {d.depth}, group {d.group} "
                      f"{d.before} -> {d.after} (min {d.min}, max {d.max})", flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    finally:
        enclave.close()
