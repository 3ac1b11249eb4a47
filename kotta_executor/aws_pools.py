"""Node pools on AWS: the EC2 Auto Scaling groups whose instances run the enclave's nodes.

``create_pools(NAME, ami=...)`` makes, for each Kotta queue, a launch template and an Auto
Scaling group; ``delete_pools(NAME)`` removes them.  Both are idempotent.  Size the groups
with :func:`kotta_executor.aws_autoscale.autoscale` (``kotta aws autoscale NAME``).

=====================  ================================  ==================================
queue                  ``test``                          ``production``
=====================  ================================  ==================================
launch template        ``kotta-NAME-test-node``          ``kotta-NAME-production-node``
Auto Scaling group     ``kotta-NAME-test-nodes``         ``kotta-NAME-production-nodes``
size                   min 1, max 4, desired 1           min 0, max 20, desired 0
capacity               on demand                         spot over every instance type
                                                         (``production_spot=False``: on
                                                         demand)
=====================  ================================  ==================================

Every instance runs one node for its group's queue, started by the launch template's user
data (:func:`user_data`) from an AMI that has kotta-executor installed, with the enclave's
instance profile ``kotta-NAME-node`` (made by ``kotta aws bootstrap``).  Instance metadata
is IMDSv2 only with a hop limit of 1, so code in a container on the instance cannot reach
it.  A termination lifecycle hook holds a leaving instance for :data:`HOOK_TIMEOUT`
seconds, and a watcher on the instance stops the node (which drains) as soon as the
instance is to be terminated or gets a spot interruption notice.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from .aws_provision import _Clients
from .backends.aws import Names, _client_error, _code
from .config import QUEUES
from .errors import ConfigurationError

TEMPLATE = "AWS::EC2::LaunchTemplate"
GROUP = "AWS::AutoScaling::AutoScalingGroup"
HOOK = "AWS::AutoScaling::LifecycleHook"

#: the lifecycle hook of every pool: leaving instances wait while their node drains
HOOK_NAME = "kotta-drain"
#: seconds a terminating instance waits (it then terminates: DefaultResult CONTINUE)
HOOK_TIMEOUT = 120
#: the nodes' --drain-timeout: under the two minutes of a spot interruption notice
DRAIN_TIMEOUT = 100
#: the spot pool's allocation strategy (price and capacity both count)
SPOT_ALLOCATION = "price-capacity-optimized"
#: (MinSize, DesiredCapacity) when a group is created; the test pool keeps one node
_START = {"test": (1, 1), "production": (0, 0)}


def template_name(name: str, queue: str) -> str:
    """The launch template of the nodes of ``queue``: ``kotta-NAME-QUEUE-node``."""
    return f"{Names(name).queue(queue)}-node"


def group_name(name: str, queue: str) -> str:
    """The Auto Scaling group of the nodes of ``queue``: ``kotta-NAME-QUEUE-nodes``."""
    return f"{Names(name).queue(queue)}-nodes"


def pool_groups(name: str) -> dict[str, str]:
    """Each queue's Auto Scaling group, as :func:`~kotta_executor.aws_autoscale.autoscale`
    takes them: ``{"test": "kotta-NAME-test-nodes", "production": ...}``."""
    return {q: group_name(name, q) for q in QUEUES}


def node_url(name: str, *, region: str, bucket: str | None = None) -> str:
    """The enclave URL the nodes use (no endpoint: nodes talk to AWS itself)."""
    params = {"region": region}
    if bucket:
        params["bucket"] = bucket
    return f"aws://{Names(name).name}?{urlencode(params)}"


def user_data(
    name: str, queue: str, *, region: str, workers: int = 2, bucket: str | None = None
) -> str:
    """The boot script of a pool's instances: one node for ``queue``, and its watcher.

    The node runs as the transient systemd unit ``kotta-node``; SIGTERM goes to the node
    alone (``KillMode=mixed``), which stops taking work and lets running tasks finish for
    :data:`DRAIN_TIMEOUT` seconds.  The unit ``kotta-node-watch`` polls the instance
    metadata (IMDSv2) every 5 s and stops the node when Auto Scaling is terminating the
    instance (``autoscaling/target-lifecycle-state``; the lifecycle hook holds it
    meanwhile) or a spot interruption notice has come (``spot/instance-action``).
    """
    url = node_url(name, region=region, bucket=bucket)
    node = shlex.join([
        "node", "--enclave", url, "--queue", queue, "--workers", str(workers),
        "--drain-timeout", str(DRAIN_TIMEOUT),
    ])  # fmt: skip
    description = shlex.quote(f"kotta node (queue {queue} of aws://{name})")
    return f"""#!/bin/sh
# The kotta node of this instance (made by `kotta aws pools {name}`): queue {queue}.
# The AMI must have kotta-executor installed (the `kotta` command).
set -eu
kotta=$(command -v kotta) || {{ echo "kotta-executor is not installed on this AMI" >&2; exit 1; }}
systemd-run --unit=kotta-node --description={description} \\
    --property=Wants=network-online.target --property=After=network-online.target \\
    --property=Restart=on-failure --property=RestartSec=5 \\
    --property=KillMode=mixed --property=TimeoutStopSec={DRAIN_TIMEOUT + 10} \\
    "$kotta" {node}
# Drain the node as soon as the instance is to go: terminated by Auto Scaling (the
# lifecycle hook holds it {HOOK_TIMEOUT} s meanwhile) or interrupted (spot: 2 minutes' notice).
cat >/usr/local/sbin/kotta-node-watch <<'EOF'
#!/bin/sh
md=http://169.254.169.254/latest
while sleep 5; do
    t=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' $md/api/token) || continue
    h="X-aws-ec2-metadata-token: $t"
    state=$(curl -sf -H "$h" $md/meta-data/autoscaling/target-lifecycle-state) || state=
    if [ "$state" = Terminated ] ||
        curl -sf -o /dev/null -H "$h" $md/meta-data/spot/instance-action; then
        exec systemctl stop kotta-node
    fi
done
EOF
chmod 755 /usr/local/sbin/kotta-node-watch
systemd-run --unit=kotta-node-watch --description='drain the kotta node before the instance goes' \\
    /usr/local/sbin/kotta-node-watch
"""


def launch_template_data(
    name: str,
    queue: str,
    *,
    ami: str,
    instance_type: str,
    region: str,
    workers: int = 2,
    bucket: str | None = None,
) -> dict[str, Any]:
    """The ``LaunchTemplateData`` of the nodes of ``queue``."""
    script = user_data(name, queue, region=region, workers=workers, bucket=bucket)
    return {
        "ImageId": ami,
        "InstanceType": instance_type,
        "IamInstanceProfile": {"Name": Names(name).node_role},
        "UserData": base64.b64encode(script.encode()).decode("ascii"),
        # IMDSv2 only, and one hop: a container's requests (one more hop) get no token
        "MetadataOptions": {
            "HttpEndpoint": "enabled",
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
        },
    }


def create_pools(
    name: str,
    *,
    ami: str,
    instance_types: Sequence[str] = ("t3.large",),
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    session=None,
    bucket: str | None = None,
    test_max: int = 4,
    production_max: int = 20,
    production_spot: bool = True,
    subnets: Iterable[str] | None = None,
    workers: int = 2,
    out=None,
) -> dict[str, str]:
    """Create (or bring in line) the node pools of the enclave ``aws://NAME``: for each
    queue a launch template, an Auto Scaling group and its termination lifecycle hook.
    Returns each queue's group (:func:`pool_groups`).

    ``instance_types``: the first is the launch template's; production's spot capacity
    may come from any of them.  ``subnets``: the groups' subnets (default: the default
    VPC's, one per Availability Zone).  ``workers``: the ``--workers`` of each node.
    ``bucket``: the enclave's bucket, if not ``kotta-NAME-blobs``.

    Run again, it updates what exists: a new launch template version when the template's
    data changed (new instances use it), and the groups' limits, subnets and capacity
    settings, but not their current DesiredCapacity.  ``out`` (``print``) is told about
    each resource: created, updated or exists.
    """
    names = Names(name, bucket)
    if isinstance(instance_types, str):
        instance_types = (instance_types,)
    instance_types = list(dict.fromkeys(instance_types))
    if not ami:
        raise ValueError("an AMI with kotta-executor installed is required")
    if not instance_types:
        raise ValueError("at least one instance type is required")
    if test_max < 1:
        raise ValueError("the test pool's maximum must be at least 1: it keeps one node")
    if production_max < 0:
        raise ValueError("the production pool's maximum must be at least 0")
    if workers < 1:
        raise ValueError("a node needs at least 1 worker")
    c = _Clients(region, endpoint_url, profile, session)

    def note(verb: str, kind: str, what: str) -> None:
        if out is not None:
            out(f"{verb:7}  {kind:34} {what}")

    _check_instance_profile(c.iam, names, name)
    subnet_ids = list(subnets) if subnets is not None else _default_subnets(c.ec2, c.region)
    if not subnet_ids:
        raise ValueError("no subnets given")

    groups = pool_groups(name)
    existing = _existing_groups(c.autoscaling, list(groups.values()))
    maxima = {"test": test_max, "production": production_max}
    for queue, group in groups.items():
        template = template_name(name, queue)
        data = launch_template_data(
            name, queue, ami=ami, instance_type=instance_types[0], region=c.region,
            workers=workers, bucket=bucket,
        )  # fmt: skip
        note(_ensure_template(c.ec2, template, data, name, queue), TEMPLATE, template)

        spot = queue == "production" and production_spot
        lo, start = _START[queue]
        spec: dict[str, Any] = {
            "AutoScalingGroupName": group,
            "MinSize": lo,
            "MaxSize": max(maxima[queue], lo),
            "VPCZoneIdentifier": ",".join(subnet_ids),
            "CapacityRebalance": spot,
        }
        launch = {"LaunchTemplateName": template, "Version": "$Latest"}
        if spot:
            spec["MixedInstancesPolicy"] = {
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": launch,
                    "Overrides": [{"InstanceType": t} for t in instance_types],
                },
                "InstancesDistribution": {
                    "OnDemandBaseCapacity": 0,
                    "OnDemandPercentageAboveBaseCapacity": 0,
                    "SpotAllocationStrategy": SPOT_ALLOCATION,
                },
            }
        else:
            spec["LaunchTemplate"] = launch
        tags = [
            {"ResourceId": group, "ResourceType": "auto-scaling-group", "Key": k,
             "Value": v, "PropagateAtLaunch": True}
            for k, v in (("kotta-enclave", name), ("kotta-queue", queue),
                         ("Name", f"{names.prefix}-{queue}-node"))
        ]  # fmt: skip
        if group in existing:
            c.autoscaling.update_auto_scaling_group(**spec)
            c.autoscaling.create_or_update_tags(Tags=tags)
            note("exists", GROUP, group)
        else:
            c.autoscaling.create_auto_scaling_group(**spec, DesiredCapacity=start, Tags=tags)
            note("created", GROUP, group)

        hooks = c.autoscaling.describe_lifecycle_hooks(
            AutoScalingGroupName=group, LifecycleHookNames=[HOOK_NAME]
        )["LifecycleHooks"]
        c.autoscaling.put_lifecycle_hook(
            AutoScalingGroupName=group,
            LifecycleHookName=HOOK_NAME,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=HOOK_TIMEOUT,
            DefaultResult="CONTINUE",
        )
        note("exists" if hooks else "created", HOOK, f"{group}/{HOOK_NAME}")

    if out is not None:
        for queue, group in groups.items():
            out(f"queue {queue}: Auto Scaling group {group}")
        where = f" --region {c.region}"
        if c.endpoint_url:
            where += f" --endpoint-url {c.endpoint_url}"
        groups_args = " ".join(f"--group {q}={g}" for q, g in groups.items())
        # --per-node: 2 x the workers of a node
        out(f"size them: kotta aws autoscale {name}{where} {groups_args} --per-node {2 * workers}")
    return groups


def delete_pools(
    name: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    session=None,
    out=None,
) -> list[tuple[str, str]]:
    """Delete the node pools of the enclave ``aws://NAME``: the groups (``ForceDelete``:
    their instances are terminated, and the tasks they held return to the queues) and the
    launch templates.  Whatever is already gone is skipped.  Returns what was deleted,
    as ``(type, name)`` pairs."""
    c = _Clients(region, endpoint_url, profile, session)
    deleted: list[tuple[str, str]] = []

    def gone(kind: str, what: str) -> None:
        deleted.append((kind, what))
        if out is not None:
            out(f"deleted  {kind:34} {what}")

    groups = pool_groups(name)
    existing = _existing_groups(c.autoscaling, list(groups.values()))
    for group in groups.values():
        if group not in existing:
            continue
        # (AWS deletes the hook with its group; deleting it first keeps emulators tidy)
        hooks = c.autoscaling.describe_lifecycle_hooks(
            AutoScalingGroupName=group, LifecycleHookNames=[HOOK_NAME]
        )["LifecycleHooks"]
        if hooks:
            c.autoscaling.delete_lifecycle_hook(
                AutoScalingGroupName=group, LifecycleHookName=HOOK_NAME
            )
            gone(HOOK, f"{group}/{HOOK_NAME}")
        try:
            c.autoscaling.delete_auto_scaling_group(AutoScalingGroupName=group, ForceDelete=True)
        except _client_error() as exc:
            if _code(exc) != "ValidationError" or "not found" not in str(exc):
                raise
            continue
        gone(GROUP, group)

    templates = [template_name(name, q) for q in QUEUES]
    found = c.ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": templates}]
    )["LaunchTemplates"]
    for t in found:
        try:
            c.ec2.delete_launch_template(LaunchTemplateId=t["LaunchTemplateId"])
        except _client_error() as exc:
            if _code(exc) != "InvalidLaunchTemplateId.NotFound":
                raise
            continue
        gone(TEMPLATE, t["LaunchTemplateName"])
    return deleted


# --------------------------------------------------------------------------- helpers


def _existing_groups(asg, names: list[str]) -> set[str]:
    resp = asg.describe_auto_scaling_groups(AutoScalingGroupNames=names)
    return {g["AutoScalingGroupName"] for g in resp["AutoScalingGroups"]}


def _check_instance_profile(iam, names: Names, name: str) -> None:
    """Fail now, not at the first launch, when the nodes' instance profile is missing."""
    try:
        iam.get_instance_profile(InstanceProfileName=names.node_role)
    except _client_error() as exc:
        if _code(exc) == "NoSuchEntity":
            raise ConfigurationError(
                f"no instance profile {names.node_role}: run `kotta aws bootstrap {name}` "
                "(without --no-iam) first"
            ) from None
        if _code(exc) not in ("AccessDenied", "AccessDeniedException"):
            raise  # may not read IAM: let the launch tell


def _default_subnets(ec2, region: str) -> list[str]:
    subnets = []
    for page in ec2.get_paginator("describe_subnets").paginate(
        Filters=[{"Name": "default-for-az", "Values": ["true"]}]
    ):
        subnets += page["Subnets"]
    if not subnets:
        raise ConfigurationError(f"no default VPC in {region}: name the pools' subnets (--subnet)")
    return [s["SubnetId"] for s in sorted(subnets, key=lambda s: s["AvailabilityZone"])]


def _ensure_template(ec2, template: str, data: dict[str, Any], name: str, queue: str) -> str:
    """Create the launch template, or add a version when its data changed; returns
    "created", "updated" or "exists"."""
    try:
        ec2.create_launch_template(
            LaunchTemplateName=template,
            VersionDescription=f"kotta nodes of queue {queue}",
            LaunchTemplateData=data,
            TagSpecifications=[{
                "ResourceType": "launch-template",
                "Tags": [{"Key": "kotta-enclave", "Value": name},
                         {"Key": "kotta-queue", "Value": queue}],
            }],
        )  # fmt: skip
        return "created"
    except _client_error() as exc:
        if _code(exc) != "InvalidLaunchTemplateName.AlreadyExistsException":
            raise
    latest = ec2.describe_launch_template_versions(
        LaunchTemplateName=template, Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    if all(latest.get(k) == v for k, v in data.items()):
        return "exists"
    ec2.create_launch_template_version(
        LaunchTemplateName=template,
        VersionDescription=f"kotta nodes of queue {queue}",
        LaunchTemplateData=data,
    )
    return "updated"
