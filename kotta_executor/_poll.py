"""Waiting on descriptors with ``poll``, for the client's manager and the node's loop.

``select.select`` takes no descriptor past FD_SETSIZE (1024): in a process holding a
thousand files (a notebook's), the executor's manager failed every turn with ValueError
(its futures all failed, BrokenEnclave), and a node of many workers (the production queue
allows 256, four descriptors each), or one started holding many files, died at its first
wait."""

from __future__ import annotations

import errno
import os
import select

#: the longest wait ``poll`` takes, in ms (a C int)
_POLL_MOST = 2**31 - 1


def ready(readers: list, writers: list, timeout: float) -> tuple[list, list]:
    """Those of ``readers`` ready to read and of ``writers`` ready to write (descriptors,
    or objects with a ``fileno()``) within ``timeout`` seconds, as ``select.select``
    answers.  A closed descriptor raises, as in select."""
    poller = select.poll()
    by_fd: dict[int, tuple[object, int]] = {}
    for objs, mask in ((readers, select.POLLIN), (writers, select.POLLOUT)):
        for f in objs:
            fd = f if isinstance(f, int) else f.fileno()
            if fd < 0:  # (a closed socket's)
                raise ValueError("file descriptor cannot be a negative integer (-1)")
            by_fd[fd] = (f, by_fd[fd][1] | mask) if fd in by_fd else (f, mask)
    for fd, (_, mask) in by_fd.items():
        poller.register(fd, mask)
    readable, writable = [], []
    for fd, events in poller.poll(min(timeout * 1000, _POLL_MOST)):
        if events & select.POLLNVAL:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        f, mask = by_fd[fd]
        # an end of file, or an error, is readable (and writable) to select too
        if mask & select.POLLIN and events & ~select.POLLOUT:
            readable.append(f)
        if mask & select.POLLOUT and events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            writable.append(f)
    return readable, writable
