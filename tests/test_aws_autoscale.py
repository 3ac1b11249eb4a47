"""Elastic pools on AWS: queue depth -> Auto Scaling group DesiredCapacity, on moto."""

from __future__ import annotations

import pytest

pytest.importorskip("moto")

from kotta_executor.aws_autoscale import autoscale, autoscaling_client  # noqa: E402
from kotta_executor.backends.base import Message  # noqa: E402
from tests.aws_moto import aws_on_moto  # noqa: E402


def _group(enclave, name: str, *, min_size: int, max_size: int, desired: int) -> None:
    ec2 = enclave.session.client("ec2")
    template = f"{name}-template"
    ec2.create_launch_template(
        LaunchTemplateName=template,
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    autoscaling_client(enclave).create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Latest"},
        MinSize=min_size, MaxSize=max_size, DesiredCapacity=desired,
        AvailabilityZones=["us-east-1a"],
    )


def _capacity(enclave, name: str) -> int:
    resp = autoscaling_client(enclave).describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])
    return resp["AutoScalingGroups"][0]["DesiredCapacity"]


def _drain(enclave, queue: str) -> None:
    while got := enclave.queue.receive(queue, 10, 30, "test"):
        enclave.queue.ack(got)


def test_autoscale_follows_the_queue_depth(tmp_path):
    with aws_on_moto(tmp_path) as enclave:
        _group(enclave, "kotta-test-pool", min_size=1, max_size=5, desired=1)
        _group(enclave, "kotta-prod-pool", min_size=0, max_size=3, desired=0)
        groups = {"test": "kotta-test-pool", "production": "kotta-prod-pool"}

        [t, p] = autoscale(enclave, groups)  # nothing queued: nothing changes
        assert (t.depth, t.before, t.after) == (0, 1, 1)
        assert (p.depth, p.before, p.after) == (0, 0, 0)

        enclave.queue.send("test", [Message(f"job{i}", b"x") for i in range(7)])
        enclave.queue.send("production", [Message("p0", b"x")])
        [t, p] = autoscale(enclave, groups, per_node=2)
        assert (t.depth, t.after) == (7, 4)  # 7 messages, 2 per node
        assert (p.depth, p.after) == (1, 1)
        assert _capacity(enclave, "kotta-test-pool") == 4
        assert _capacity(enclave, "kotta-prod-pool") == 1

        enclave.queue.send("test", [Message(f"more{i}", b"x") for i in range(20)])
        [t, _] = autoscale(enclave, groups, per_node=2)
        assert t.after == 5  # the group's MaxSize
        assert _capacity(enclave, "kotta-test-pool") == 5

        _drain(enclave, "test")
        _drain(enclave, "production")
        [t, p] = autoscale(enclave, groups)
        assert (t.depth, t.after) == (0, 1)  # the test pool keeps one node
        assert (p.depth, p.after) == (0, 0)
        assert _capacity(enclave, "kotta-test-pool") == 1
        assert _capacity(enclave, "kotta-prod-pool") == 0


def test_the_test_pool_keeps_one_node_even_with_min_size_zero(tmp_path):
    with aws_on_moto(tmp_path) as enclave:
        _group(enclave, "pool", min_size=0, max_size=2, desired=2)
        [t] = autoscale(enclave, {"Test": "pool"})
        assert (t.queue, t.min, t.after) == ("test", 1, 1)
        assert _capacity(enclave, "pool") == 1


def test_autoscale_names_a_missing_group(tmp_path):
    with aws_on_moto(tmp_path) as enclave, pytest.raises(ValueError, match="no-such-group"):
        autoscale(enclave, {"test": "no-such-group"})


def test_kotta_aws_autoscale_once(tmp_path, capsys):
    from kotta_executor.cli import main

    with aws_on_moto(tmp_path) as enclave:
        _group(enclave, "pool", min_size=1, max_size=5, desired=1)
        enclave.queue.send("test", [Message(f"job{i}", b"x") for i in range(6)])
        assert main(["aws", "autoscale", enclave.name, "--group", "test=pool", "--once"]) == 0
        assert "queue test: depth 6, group pool 1 -> 3 (min 1, max 5)" in capsys.readouterr().out
        assert _capacity(enclave, "pool") == 3
        assert main(["aws", "autoscale", enclave.name, "--group", "test", "--once"]) == 2


@pytest.mark.parametrize("argv, option", [
    (["--interval", "-1"], "--interval"),  # used to size the groups, then crash in sleep
    (["--interval", "0"], "--interval"),  # used to call AWS in a tight loop
    (["--per-node", "0"], "--per-node"),
    (["--interval", "1e10"], "--interval"),  # sized them, then OverflowError out of sleep
    # under threading.TIMEOUT_MAX, but past it once added to the monotonic clock that
    # sleep counts from: sized them, then OSError (Invalid argument) out of sleep
    (["--interval", "9223372036"], "--interval"),
    (["--group", "Test=other"], "--group"),  # test twice: the last one's group was sized
])
def test_kotta_aws_autoscale_refuses_bad_numbers_before_acting(tmp_path, capsys, argv, option):
    from kotta_executor.cli import main

    with aws_on_moto(tmp_path) as enclave:
        _group(enclave, "pool", min_size=1, max_size=5, desired=1)
        enclave.queue.send("test", [Message(f"job{i}", b"x") for i in range(6)])
        assert main(["aws", "autoscale", enclave.name, "--group", "test=pool", *argv]) == 2
        assert option in capsys.readouterr().err
        assert _capacity(enclave, "pool") == 1
