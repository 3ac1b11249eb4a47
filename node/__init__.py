"""The node daemon of kotta-executor: receives tasks, runs them in worker processes,
reports results.  ``kotta node`` or ``python -m node`` starts one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .daemon import Node, NodeConfig
else:

    def __getattr__(name: str):
        # the daemon loads on first use: a worker process (``python -m node.worker``)
        # imports this package too, and needs none of it
        if name in ("Node", "NodeConfig"):
            from . import daemon

            return getattr(daemon, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Node", "NodeConfig"]
