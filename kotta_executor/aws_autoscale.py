"""Elastic pools on AWS: size each queue's EC2 Auto Scaling group by the queue's depth.

:func:`autoscale` reads the depth of each Kotta queue (its SQS queue: messages waiting or in
flight) and sets the DesiredCapacity of the queue's Auto Scaling group by the same rule as
the local scaler (:func:`node.scaler.desired`), within the group's MinSize and MaxSize.  The
``test`` pool always keeps one node.  Run it periodically (``kotta aws autoscale NAME
--group test=ASG``, a cron job, or a scheduled Lambda); it keeps no state between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .backends.aws import AwsEnclave, client_config
from .config import normalize_queue

log = logging.getLogger("kotta.autoscale")

#: messages per node before a pool grows (2 x the workers of a node; nodes default to 1 vCPU)
DEFAULT_PER_NODE = 2
#: queues whose pool never goes below one node
ALWAYS_ONE = frozenset({"test"})


@dataclass(frozen=True)
class Decision:
    queue: str
    group: str
    depth: int
    before: int
    after: int
    min: int
    max: int


def autoscaling_client(enclave: AwsEnclave):
    return enclave.session.client(
        "autoscaling", endpoint_url=enclave.endpoint_url,
        config=client_config(path_style=bool(enclave.endpoint_url)),
    )


def autoscale(
    enclave: AwsEnclave,
    groups: Mapping[str, str],
    *,
    per_node: int = DEFAULT_PER_NODE,
    client=None,
) -> list[Decision]:
    """Set each group's DesiredCapacity from its queue's depth; ``groups`` maps a Kotta
    queue (``test``) to an Auto Scaling group name.  Returns what it decided, per queue.

    Scaling in is left to the group: an empty queue sets the capacity to the group's
    minimum (at least 1 for ``test``), and nodes on instances being terminated get SIGTERM
    and hand their work back (see docs/aws.md)."""
    from node.scaler import desired

    asg = client or autoscaling_client(enclave)
    queues = {normalize_queue(q): name for q, name in groups.items()}
    found = {}
    names = list(queues.values())
    for i in range(0, len(names), 50):
        resp = asg.describe_auto_scaling_groups(AutoScalingGroupNames=names[i:i + 50])
        found.update({g["AutoScalingGroupName"]: g for g in resp["AutoScalingGroups"]})
    decisions = []
    for queue, name in queues.items():
        group = found.get(name)
        if group is None:
            raise ValueError(f"no Auto Scaling group {name!r} (for queue {queue})")
        hi = int(group["MaxSize"])
        lo = int(group["MinSize"])
        if queue in ALWAYS_ONE:
            lo = min(max(lo, 1), hi)
        before = int(group["DesiredCapacity"])
        depth = enclave.queue.depth(queue)
        after = desired(depth, before, lo, hi, per_node)
        if after != before:
            asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=after,
                                     HonorCooldown=False)
            log.info("queue %s: depth %d, group %s %d -> %d", queue, depth, name, before, after)
        decisions.append(Decision(queue, name, depth, before, after, lo, hi))
    return decisions
