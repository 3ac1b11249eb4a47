"""The node daemon of kotta-executor: receives tasks, runs them in worker processes,
reports results.  ``kotta node`` or ``python -m node`` starts one."""

from .daemon import Node, NodeConfig

__all__ = ["Node", "NodeConfig"]
