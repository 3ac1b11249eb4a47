"""``kotta aws bootstrap NAME``, ``kotta aws teardown NAME``, ``kotta aws pools NAME`` and
``kotta aws autoscale NAME``.

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
        help="create or delete the AWS resources of an enclave (SQS, S3, DynamoDB, IAM, EC2)",
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
    a.add_argument("--group", action="append", metavar="QUEUE=ASG",
                   help="a queue and the Auto Scaling group of its nodes (repeatable; "
                        "default: the groups of `kotta aws pools`, kotta-NAME-QUEUE-nodes)")
    a.add_argument("--per-node", type=int, default=2,
                   help="messages per node before a pool grows (default 2: 2 x workers)")
    a.add_argument("--interval", type=float, default=60.0,
                   help="seconds between checks (default 60)")
    a.add_argument("--once", action="store_true", help="check once and exit")

    p = sub.add_parser("pools", help="create (or --delete) the Auto Scaling groups of the nodes")
    common(p)
    p.add_argument("--ami", help="an AMI with kotta-executor installed (required unless --delete)")
    p.add_argument("--instance-type", action="append", dest="instance_types", metavar="TYPE",
                   help="an instance type (repeatable; the first is the launch template's, "
                        "production's spot capacity may use each; default t3.large)")
    p.add_argument("--no-spot", action="store_true",
                   help="production on demand too (default: spot only)")
    p.add_argument("--test-max", type=int, default=4,
                   help="the test pool's maximum number of nodes (default 4; minimum 1)")
    p.add_argument("--production-max", type=int, default=20,
                   help="the production pool's maximum number of nodes (default 20; minimum 0)")
    p.add_argument("--subnet", action="append", dest="subnets", metavar="SUBNET",
                   help="a subnet of the groups (repeatable; default: the default VPC's)")
    p.add_argument("--workers", type=int, default=2, help="workers per node (default 2)")
    p.add_argument("--delete", action="store_true",
                   help="delete the groups (terminating their instances) and launch templates")
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
    if args.aws_command == "pools":
        return _pools(args)
    if args.aws_command == "teardown":
        if not args.yes:
            if not sys.stdin.isatty():
                print("kotta: teardown deletes every job, result and blob of the enclave; "
                      "pass --yes to confirm", file=sys.stderr)  # fmt: skip
                return 2
            try:
                answer = input(f"delete the AWS enclave {args.name} and all its data? "
                               f"type its name: ")
            except EOFError:  # (Ctrl-D: a "no", not a traceback)
                print(file=sys.stderr)
                answer = ""
            if answer.strip() != args.name:
                print("not deleted", file=sys.stderr)
                return 1
        report = aws_provision.teardown(args.name, **kw)
        if not report.deleted and not report.kept:
            print(f"nothing of the enclave {args.name} was found")
        return 0
    raise ValueError(f"unknown aws command {args.aws_command!r}")


def _autoscale(args) -> int:
    import threading
    import time

    from .aws_autoscale import autoscale
    from .backends.aws import AwsEnclave
    from .config import normalize_queue

    if args.per_node < 1:
        raise ValueError(f"--per-node must be at least 1, not {args.per_node}")
    # (at most what a sleep takes: 1e10 sized the groups, then raised OverflowError.  Half
    # of it: sleep adds the monotonic clock, the machine's uptime, and 9223372036 sized
    # them, then raised OSError "Invalid argument")
    longest = threading.TIMEOUT_MAX / 2
    if not args.once and not 0 < args.interval <= longest:
        raise ValueError(f"--interval must be a positive number of seconds, at most "
                         f"{longest:.0f}, not {args.interval:g}")
    specs = args.group
    if not specs:  # the groups of `kotta aws pools`
        from .aws_pools import pool_groups

        specs = [f"{q}={g}" for q, g in pool_groups(args.name).items()]
    groups = {}
    for spec in specs:
        queue, sep, group = spec.partition("=")
        if not sep or not queue or not group:
            raise ValueError(f"--group takes QUEUE=ASG, not {spec!r}")
        named = normalize_queue(queue)
        if named in {normalize_queue(q) for q in groups}:  # (the last one given was
            # sized, the first not, with no word of it)
            raise ValueError(f"--group names the {named} queue twice ({spec!r})")
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


def _pools(args) -> int:
    from . import aws_pools

    kw = dict(region=args.region, endpoint_url=args.endpoint_url, profile=args.profile, out=print)
    if args.delete:
        if not aws_pools.delete_pools(args.name, **kw):
            print(f"no node pools of the enclave {args.name} were found")
        return 0
    if not args.ami:
        raise ValueError("--ami is required (an AMI with kotta-executor installed)")
    aws_pools.create_pools(
        args.name,
        ami=args.ami,
        instance_types=args.instance_types or ("t3.large",),
        bucket=args.bucket,
        test_max=args.test_max,
        production_max=args.production_max,
        production_spot=not args.no_spot,
        subnets=args.subnets,
        workers=args.workers,
        **kw,
    )
    return 0
