"""The node pools on AWS (launch templates, Auto Scaling groups, lifecycle hooks), on moto."""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid

import pytest

pytest.importorskip("moto")

from kotta_executor import aws_pools  # noqa: E402
from kotta_executor.aws_autoscale import autoscale  # noqa: E402
from kotta_executor.aws_provision import bootstrap  # noqa: E402
from kotta_executor.backends.base import Message  # noqa: E402
from kotta_executor.errors import ConfigurationError  # noqa: E402
from tests.aws_moto import atomic_moto, fake_aws_env, shared_session  # noqa: E402

AMI = "ami-12c6146b"  # one of moto's


@pytest.fixture
def aws():
    """A bootstrapped enclave (with its node role and instance profile) on moto:
    ``(name, session)``."""
    from moto import mock_aws

    name = f"p{uuid.uuid4().hex[:8]}"
    with fake_aws_env(), mock_aws(), atomic_moto():
        session = shared_session()
        bootstrap(name, iam=True, tls_only=False, session=session)
        yield name, session


def _groups(session, name) -> dict[str, dict]:
    resp = session.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=list(aws_pools.pool_groups(name).values())
    )
    return {g["AutoScalingGroupName"]: g for g in resp["AutoScalingGroups"]}


def _template(session, name, queue) -> dict:
    return session.client("ec2").describe_launch_template_versions(
        LaunchTemplateName=aws_pools.template_name(name, queue), Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]


def _script(session, name, queue) -> str:
    data = _template(session, name, queue)["LaunchTemplateData"]
    return base64.b64decode(data["UserData"]).decode()


def _hooks(session, group) -> list[dict]:
    return session.client("autoscaling").describe_lifecycle_hooks(AutoScalingGroupName=group)[
        "LifecycleHooks"
    ]


def _default_subnets(session) -> list[str]:
    subnets = session.client("ec2").describe_subnets(
        Filters=[{"Name": "default-for-az", "Values": ["true"]}]
    )["Subnets"]
    assert subnets  # moto has a default VPC
    return [s["SubnetId"] for s in sorted(subnets, key=lambda s: s["AvailabilityZone"])]


def test_create_pools_makes_a_test_pool_and_a_spot_production_pool(aws):
    name, session = aws
    lines: list[str] = []
    groups = aws_pools.create_pools(
        name, ami=AMI, instance_types=("t3.large", "m5.large"), session=session, out=lines.append
    )
    test, prod = f"kotta-{name}-test-nodes", f"kotta-{name}-production-nodes"
    assert groups == {"test": test, "production": prod}
    created = [line.split()[-1] for line in lines if line.startswith("created")]
    assert sorted(created) == sorted([
        f"kotta-{name}-test-node", f"kotta-{name}-production-node", test, prod,
        f"{test}/kotta-drain", f"{prod}/kotta-drain",
    ])  # fmt: skip
    assert f"--group test={test} --group production={prod}" in lines[-1]

    found = _groups(session, name)
    t, p = found[test], found[prod]
    # the test pool: on demand, keeps one node
    assert (t["MinSize"], t["MaxSize"], t["DesiredCapacity"]) == (1, 4, 1)
    assert t["LaunchTemplate"]["LaunchTemplateName"] == f"kotta-{name}-test-node"
    assert "MixedInstancesPolicy" not in t
    assert t["CapacityRebalance"] is False
    # production: from nothing, spot only, over every instance type
    assert (p["MinSize"], p["MaxSize"], p["DesiredCapacity"]) == (0, 20, 0)
    assert "LaunchTemplate" not in p
    policy = p["MixedInstancesPolicy"]
    spec = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert (spec["LaunchTemplateName"], spec["Version"]) == (
        f"kotta-{name}-production-node", "$Latest",
    )  # fmt: skip
    assert policy["LaunchTemplate"]["Overrides"] == [
        {"InstanceType": "t3.large"}, {"InstanceType": "m5.large"},
    ]  # fmt: skip
    assert policy["InstancesDistribution"] == {
        "OnDemandBaseCapacity": 0,
        "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": "price-capacity-optimized",
    }
    assert p["CapacityRebalance"] is True

    for queue, group in groups.items():
        g = found[group]
        assert g["VPCZoneIdentifier"].split(",") == _default_subnets(session)
        tags = {(x["Key"], x["Value"], x["PropagateAtLaunch"]) for x in g["Tags"]}
        assert {("kotta-enclave", name, True), ("kotta-queue", queue, True)} <= tags
        [hook] = _hooks(session, group)
        assert hook["LifecycleHookName"] == "kotta-drain"
        assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
        assert (hook["HeartbeatTimeout"], hook["DefaultResult"]) == (120, "CONTINUE")

        data = _template(session, name, queue)["LaunchTemplateData"]
        assert (data["ImageId"], data["InstanceType"]) == (AMI, "t3.large")
        assert data["IamInstanceProfile"] == {"Name": f"kotta-{name}-node"}
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1


def test_the_user_data_starts_a_node_for_its_own_queue(aws):
    name, session = aws
    aws_pools.create_pools(name, ami=AMI, workers=3, session=session)
    for queue, other in (("test", "production"), ("production", "test")):
        script = _script(session, name, queue)
        assert script.startswith("#!/bin/sh\n")
        [node] = [line for line in script.splitlines() if line.lstrip().startswith('"$kotta"')]
        assert node.split() == [
            '"$kotta"', "node", "--enclave", f"'aws://{name}?region=us-east-1'",
            "--queue", queue, "--workers", "3", "--drain-timeout", "100",
        ]  # fmt: skip
        assert f"--queue {other}" not in script
        assert "systemd-run --unit=kotta-node " in script
        assert "KillMode=mixed" in script  # SIGTERM to the node alone: it drains
        assert "TimeoutStopSec=110" in script  # longer than the drain
        assert "autoscaling/target-lifecycle-state" in script
        assert "spot/instance-action" in script
        sh = shutil.which("sh")
        if sh:
            check = subprocess.run([sh, "-n"], input=script, text=True, capture_output=True)
            assert check.returncode == 0, check.stderr


def test_create_pools_again_updates_and_keeps_the_current_size(aws):
    name, session = aws
    groups = aws_pools.create_pools(name, ami=AMI, session=session)
    asg = session.client("autoscaling")
    asg.set_desired_capacity(AutoScalingGroupName=groups["production"], DesiredCapacity=3)

    lines: list[str] = []
    assert aws_pools.create_pools(name, ami=AMI, session=session, out=lines.append) == groups
    assert not [line for line in lines if line.startswith(("created", "updated"))]
    assert len([line for line in lines if line.startswith("exists")]) == 6
    assert _template(session, name, "test")["VersionNumber"] == 1

    lines.clear()
    aws_pools.create_pools(
        name, ami=AMI, session=session, workers=4, production_max=10, production_spot=False,
        out=lines.append,
    )  # fmt: skip
    assert not [line for line in lines if line.startswith("created")]
    updated = sorted(line.split()[-1] for line in lines if line.startswith("updated"))
    assert updated == [f"kotta-{name}-production-node", f"kotta-{name}-test-node"]
    assert _template(session, name, "production")["VersionNumber"] == 2
    assert "--workers 4" in _script(session, name, "production")
    p = _groups(session, name)[groups["production"]]
    assert (p["MinSize"], p["MaxSize"], p["DesiredCapacity"]) == (0, 10, 3)
    assert "MixedInstancesPolicy" not in p  # --no-spot: a plain launch template
    assert p["LaunchTemplate"]["LaunchTemplateName"] == f"kotta-{name}-production-node"
    assert len(_hooks(session, groups["production"])) == 1


def test_the_autoscaler_sizes_the_pools(aws):
    from kotta_executor.backends.aws import AwsEnclave

    name, session = aws
    groups = aws_pools.create_pools(name, ami=AMI, session=session)
    enclave = AwsEnclave(name, session=session)
    try:
        [t, p] = autoscale(enclave, groups, per_node=2)
        assert (t.depth, t.after, p.depth, p.after) == (0, 1, 0, 0)

        enclave.queue.send("production", [Message(f"job{i}", b"x") for i in range(7)])
        [t, p] = autoscale(enclave, groups, per_node=2)
        assert (p.depth, p.before, p.after, p.max) == (7, 0, 4, 20)
        assert (t.depth, t.after) == (0, 1)  # the test pool keeps its node
    finally:
        enclave.close()
    found = _groups(session, name)
    assert found[groups["production"]]["DesiredCapacity"] == 4
    assert found[groups["test"]]["DesiredCapacity"] == 1


def test_delete_pools_removes_everything(aws):
    name, session = aws
    groups = aws_pools.create_pools(name, ami=AMI, session=session)
    deleted = aws_pools.delete_pools(name, session=session)
    assert sorted(deleted) == sorted([
        (aws_pools.TEMPLATE, f"kotta-{name}-test-node"),
        (aws_pools.TEMPLATE, f"kotta-{name}-production-node"),
        (aws_pools.GROUP, groups["test"]),
        (aws_pools.GROUP, groups["production"]),
        (aws_pools.HOOK, f"{groups['test']}/kotta-drain"),
        (aws_pools.HOOK, f"{groups['production']}/kotta-drain"),
    ])  # fmt: skip
    assert _groups(session, name) == {}
    templates = session.client("ec2").describe_launch_templates()["LaunchTemplates"]
    assert not [t for t in templates if t["LaunchTemplateName"].startswith(f"kotta-{name}-")]
    assert _hooks(session, groups["test"]) == []
    assert aws_pools.delete_pools(name, session=session) == []  # nothing left: no error


def test_create_pools_in_named_subnets(aws):
    name, session = aws
    ec2 = session.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=az)["Subnet"][
            "SubnetId"
        ]
        for i, az in enumerate(("us-east-1a", "us-east-1b"))
    ]
    groups = aws_pools.create_pools(name, ami=AMI, subnets=subnets, session=session)
    for g in _groups(session, name).values():
        assert g["VPCZoneIdentifier"] == ",".join(subnets)
    assert set(_groups(session, name)) == set(groups.values())


def test_create_pools_needs_the_instance_profile():
    from moto import mock_aws

    name = f"p{uuid.uuid4().hex[:8]}"
    with fake_aws_env(), mock_aws():
        session = shared_session()
        bootstrap(name, iam=False, tls_only=False, session=session)
        with pytest.raises(ConfigurationError, match=f"kotta aws bootstrap {name}"):
            aws_pools.create_pools(name, ami=AMI, session=session)
        assert _groups(session, name) == {}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"ami": ""}, "AMI"),
        ({"instance_types": ()}, "instance type"),
        ({"test_max": 0}, "test pool"),
        ({"workers": 0}, "worker"),
    ],
)
def test_create_pools_refuses_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        aws_pools.create_pools("lab", **{"ami": AMI, **kw})


def test_kotta_aws_pools_then_autoscale_with_the_default_groups(aws, capsys):
    from kotta_executor.backends.aws import AwsEnclave
    from kotta_executor.cli import main

    name, session = aws
    test, prod = f"kotta-{name}-test-nodes", f"kotta-{name}-production-nodes"
    argv = ["aws", "pools", name, "--ami", AMI, "--instance-type", "m5.large",
            "--instance-type", "m5a.large", "--production-max", "5", "--workers", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"created  {aws_pools.GROUP:34} {prod}" in out
    assert f"queue production: Auto Scaling group {prod}" in out
    assert f"--group test={test} --group production={prod}" in out
    p = _groups(session, name)[prod]
    assert p["MaxSize"] == 5
    assert [o["InstanceType"] for o in p["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]] == [
        "m5.large", "m5a.large",
    ]  # fmt: skip
    assert "--workers 3" in _script(session, name, "test")

    enclave = AwsEnclave(name, session=session)
    try:
        enclave.queue.send("test", [Message(f"job{i}", b"x") for i in range(6)])
    finally:
        enclave.close()
    assert main(["aws", "autoscale", name, "--once"]) == 0  # no --group: the pools' groups
    out = capsys.readouterr().out
    assert f"queue test: depth 6, group {test} 1 -> 3 (min 1, max 4)" in out
    assert f"queue production: depth 0, group {prod} 0 -> 0 (min 0, max 5)" in out

    assert main(["aws", "pools", name]) == 2  # no --ami
    assert "--ami" in capsys.readouterr().err
    assert main(["aws", "pools", name, "--delete"]) == 0
    assert f"deleted  {aws_pools.GROUP:34} {test}" in capsys.readouterr().out
    assert _groups(session, name) == {}
    assert main(["aws", "pools", name, "--delete"]) == 0
    assert "no node pools" in capsys.readouterr().out


def test_teardown_refuses_while_the_pools_run(aws):
    # teardown used to delete the queues, tables and instance profile and leave the groups,
    # whose instances (the test pool keeps one) ran on, unbilled for by no one's intent
    from kotta_executor.aws_provision import teardown

    name, session = aws
    aws_pools.create_pools(name, ami=AMI, session=session)
    with pytest.raises(ConfigurationError, match=f"kotta aws pools {name} --delete"):
        teardown(name, session=session)
    sqs = session.client("sqs")
    assert sqs.get_queue_url(QueueName=f"kotta-{name}-test")  # nothing was deleted
    aws_pools.delete_pools(name, session=session)
    assert ("AWS::SQS::Queue", f"kotta-{name}-test") in teardown(name, session=session).deleted
