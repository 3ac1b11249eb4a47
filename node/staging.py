"""Staging a task's data: inputs into its working directory before it runs, outputs back
to the enclave after, always through the store made from the *owner's* credentials
(:func:`kotta_executor.security.data.objects_for`), never the node's own.

::

    stage_inputs    for each input:  store.head (the owner's permission, even on a hit)
                                     cache hit  -> copy into workdir
                                     cache miss -> store.download -> copy into workdir
                                                                  -> StageCache.add
    stage_outputs   for each output: workdir/<basename>, a regular file, no symlink
                                     -> each (its audit record) -> store.upload

The node-local :class:`StageCache` keeps inputs between tasks, keyed by the object's URI
and etag, so a changed object (a new etag) is fetched again.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kotta_executor.config import SCRIPT_DIR_PREFIX, script_dir_prefix, script_tmpdir
from kotta_executor.errors import InvalidDataUri, StagingFailed
from kotta_executor.security.data import temp_prefix
from kotta_executor.security.uris import DataUri, check_output_name, parse_uri

_KEY_LEN = 64  # sha256 hex
#: a staging area whose lock is free and at least this old (seconds) is a dead node's: one
#: younger may be a node's that has made its lock file and is about to take it
DEAD_AREA_AGE = 60.0

log = logging.getLogger("kotta.node")


def hold_area(root: Path) -> int:
    """Make a node's staging area (its working directories and cache) and lock it for the
    node's life: the returned descriptor, to close once the area is removed.  Then remove
    the areas of dead nodes beside it (:func:`sweep_dead_areas`)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a node id is new: nobody has it)
        sweep_dead_areas(root.parent, keep=root.name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_dead_areas(parent: Path, keep: str) -> list[str]:
    """Remove the staging areas under ``parent`` whose node is gone: killed (SIGKILL, the
    OOM killer) or lost with the machine, it never removed its own, which held copies of
    the datasets it staged, protected ones too, and would have stayed for good (a node's
    id, and so its area, is new at each start).  A node holds its area's lock while it
    lives; an area without a lock file (an older version's node: maybe alive) is left
    alone.  Returns the names removed."""
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name != keep]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(os.path.join(entry.path, ".lock"), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # not an area with a lock file
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its node is alive
                continue
            if time.time() - os.fstat(fd).st_mtime < DEAD_AREA_AGE:
                continue
            remove_tree(entry.path)
            removed.append(entry.name)
        finally:
            os.close(fd)
    if removed:
        log.info("removed the staging areas of %d dead nodes: %s", len(removed), ", ".join(removed))
    return removed


def remove_script_dirs(pid: int) -> None:
    """Remove the working directories of the script jobs (kotta_executor.script) of the
    worker ``pid``: one killed with its script (walltime, kill(), memory), or whose node
    died, never removed its own, and it stayed in the node's temporary directory for good,
    with all the script wrote there.  Its node calls this once the worker has gone
    (node.pool.Leftovers), and a worker whose node died, as it ends its tasks."""
    name = f"{script_dir_prefix(pid)}*"
    for path in glob.glob(os.path.join(glob.escape(script_tmpdir()), name)):
        remove_tree(path)


def sweep_dead_script_dirs() -> list[str]:
    """Remove the script jobs' working directories (:func:`remove_script_dirs`) of workers
    of this PID namespace and OS user that no longer run.  A node removes its killed
    worker's only once what the worker started has gone (up to KILL_GRACE later): a node
    itself killed (SIGKILL, the OOM killer) in between never did, and the directory, with
    all the script wrote there, stayed for good.  A node sweeps them as it starts.  A pid
    alive again (another process took it) keeps its directory: it may be a worker's."""
    ours = script_dir_prefix(0).removeprefix(f"{SCRIPT_DIR_PREFIX}0-")  # "NS-"
    removed = []
    try:
        entries = list(os.scandir(script_tmpdir()))
    except OSError:
        return removed
    for entry in entries:  # kotta-script-PID-NS-random
        pid, _, rest = entry.name.removeprefix(SCRIPT_DIR_PREFIX).partition("-")
        # (isascii: str.isdigit takes "²", which int() refuses: a directory so named, which
        # any user can make in /tmp, raised out of every node's start)
        if (not entry.name.startswith(SCRIPT_DIR_PREFIX) or not pid.isascii()
                or not pid.isdigit() or int(pid) <= 0 or not rest.startswith(ours)):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(
                    follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its worker is gone
            remove_tree(entry.path)
            removed.append(entry.name)
        except (OSError, OverflowError):  # alive (another user's process), or the entry
            # went meanwhile; or a pid no process can have (past a C long: a task of ours
            # may make such a directory), which raised out of the node's start
            continue
    if removed:
        log.info("removed the working directories of %d script jobs whose workers were "
                 "killed with them: %s", len(removed), ", ".join(removed))
    return removed


def remove_tree(path) -> None:
    """Remove a working directory or staging area, and all in it, as far as possible.

    A task runs as the node's OS user and may leave directories it made read-only (a
    ``chmod -R a-w`` of its results, an archive or a tree copied with its modes): a plain
    ``rmtree`` cannot empty those, and the copies of the task's inputs, protected data
    included, would stay on the node for good.  So what is left after a first try is made
    writable, and removed again."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.isdir(path) or os.path.islink(path):
        return
    todo = [os.fspath(path)]
    while todo:  # (no symlink followed: only directories in the tree are changed)
        top = todo.pop()
        with contextlib.suppress(OSError):
            os.chmod(top, 0o700)
            with os.scandir(top) as entries:
                todo.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    shutil.rmtree(path, ignore_errors=True)


def cache_key(uri: str, etag: str) -> str:
    return hashlib.sha256(f"{uri}\0{etag}".encode()).hexdigest()


class StageCache:
    """Staged inputs kept on the node, at most ``max_bytes`` of them, least recently used
    evicted first.  Files are ``root/objects/<sha256(uri NUL etag)>``, read-only (0444);
    ``root/tmp`` holds downloads in progress.  The LRU index is in memory and rebuilt from
    the directory (by mtime: a hit touches its file) when the cache is opened.

    One node process per ``root``: opening the cache clears ``tmp`` of what a previous
    process left behind.  Thread-safe: the node stages in background threads.
    """

    def __init__(self, root: Path, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes!r}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        #: SHA-256 of each cached file when it was added: a hit is checked against it, so a
        #: file changed on disk (user code runs as the node's OS user) is never served
        self._digests: dict[str, str] = {}
        self._total = 0
        self._rebuild()

    def _rebuild(self) -> None:
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        found = []
        for entry in os.scandir(self.objects):
            if len(entry.name) != _KEY_LEN or not entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):  # a temp name of an interrupted add
                    os.unlink(entry.path)
                continue
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_mtime_ns, entry.name, st.st_size))
        with self._lock:
            for _, key, size in sorted(found):
                self._index[key] = size
                self._digests[key] = _sha256(self.objects / key)
                self._total += size
            self._evict()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def path(self, uri: str, etag: str) -> Path:
        return self.objects / cache_key(uri, etag)

    def scratch(self) -> Path:
        """A fresh path in the cache's temporary area (on the cache's filesystem, so that
        :meth:`add` can hard-link it)."""
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def get(self, uri: str, etag: str) -> Path | None:
        """The cached file of ``uri`` at ``etag``, or None; a hit becomes most recent."""
        key = cache_key(uri, etag)
        path = self.objects / key
        with self._lock:
            if key not in self._index:
                return None
            try:
                os.utime(path)  # the order survives a restart
            except FileNotFoundError:  # removed behind our back
                self._total -= self._index.pop(key)
                return None
            self._index.move_to_end(key)
        return path

    def add(self, uri: str, etag: str, src: Path) -> Path:
        """Put a copy of ``src`` in the cache (a hard link when it is on the same
        filesystem) and return the cached path; evicts the least recently used files until
        the total is at most ``max_bytes``.  A file larger than ``max_bytes`` is not cached:
        ``src`` itself is returned."""
        src = Path(src)
        size = src.stat().st_size
        if size > self.max_bytes:
            return src
        key = cache_key(uri, etag)
        path = self.objects / key
        tmp = self.objects / f".{key}.{uuid.uuid4().hex[:8]}"
        digest = _sha256(src)
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            with self._lock:
                os.replace(tmp, path)
                if key in self._index:
                    self._total -= self._index[key]
                self._index[key] = size
                self._digests[key] = digest
                self._index.move_to_end(key)
                self._total += size
                self._evict()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path

    def place(self, uri: str, etag: str, hit: Path, dest: Path) -> bool:
        """Copy a cached file to ``dest`` if its content is still what was added; if not
        (changed on disk), drop it from the cache and return False: fetch it again."""
        key = cache_key(uri, etag)
        with self._lock:
            digest = self._digests.get(key)
        if digest is not None and _place(hit, dest, digest):
            return True
        with self._lock:
            if key in self._index:
                self._total -= self._index.pop(key)
            self._digests.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hit)
        return False

    def _evict(self) -> None:
        while self._total > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._digests.pop(key, None)
            self._total -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.objects / key)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _place(src: Path, dest: Path, digest: str | None = None) -> bool:
    """Copy ``src`` to ``dest`` through a temporary name and a rename.

    A copy, never a hard link: a link would share the cache file's inode with the task, and
    a task that chmods its input (it owns it when it runs as the node's user) could then
    write through it and poison the cache for every later task, other owners' included.
    The cache's 0444 alone does not prevent that.  The copy costs one read and write
    (``copyfile`` uses sendfile/copy_file_range on Linux)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=temp_prefix(dest.name), suffix=".part")
    try:
        if digest is None:
            os.close(fd)
            shutil.copyfile(src, tmp)
        else:  # copy and hash in one pass; refuse a copy whose content changed
            h = hashlib.sha256()
            with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != digest:
                os.unlink(tmp)
                return False
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _names(uris, what: str) -> list[tuple[DataUri, str]]:
    """Each URI parsed, with the file name it has in the working directory; two with the
    same name are refused before anything is staged."""
    seen: dict[str, str] = {}
    out = []
    for text in uris:
        d = parse_uri(text)
        name = check_output_name(d.basename)
        if name in seen:
            raise StagingFailed(
                f"the {what} {seen[name]} and {d.uri} would both be {name!r} in the working "
                "directory"
            )
        seen[name] = d.uri
        out.append((d, name))
    return out


def stage_inputs(store, cache: StageCache | None, uris, workdir: Path,
                 each: Callable[[dict], object] = lambda item: None) -> list[dict]:
    """Place each input object in ``workdir`` under its basename.  ``store.head`` comes
    first, for every input: it is the check that the owner may read it, and a cache hit
    does not skip it.  Returns ``[{"uri", "bytes", "cached"}]``; ``each`` is called with
    each as soon as it is placed (to audit it: a later input may fail)."""
    workdir = Path(workdir)
    staged: list[dict] = []
    for d, name in _names(uris, "inputs"):
        dest = workdir / name
        try:
            info = store.head(d.uri)
        except FileNotFoundError as exc:
            raise StagingFailed(f"{exc} (a declared input)") from exc
        hit = cache.get(d.uri, info.etag) if cache is not None else None
        if hit is not None:
            try:
                placed = cache.place(d.uri, info.etag, hit, dest)
            except FileNotFoundError:  # evicted meanwhile: fetch it
                placed = False
            if placed:
                staged.append({"uri": d.uri, "bytes": info.size, "cached": True})
                each(staged[-1])
                continue
        scratch = cache.scratch() if cache is not None else dest
        try:
            try:
                got = store.download(d.uri, scratch)
            except FileNotFoundError as exc:
                raise StagingFailed(f"{exc} (a declared input)") from exc
            if cache is not None:
                _place(scratch, dest)
                # keyed by what was downloaded: the object may have changed since head
                cache.add(d.uri, got.etag, scratch)
        finally:
            if cache is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(scratch)
        staged.append({"uri": d.uri, "bytes": got.size, "cached": False})
        each(staged[-1])
    return staged


def _output_file(workdir: Path, name: str, uri: str) -> Path:
    path = workdir / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise StagingFailed(f"the task did not write {name} (declared output {uri})") from None
    # (The messages never say where a link points: the task chose that, after reading data
    # that may not leave the enclave, and the message does leave it.)
    if stat.S_ISLNK(st.st_mode):
        raise InvalidDataUri(
            f"output {name} is a symlink; outputs must be regular files in the working "
            "directory"
        )
    if path.resolve().parent != workdir.resolve():  # only a symlink can cause it; be sure
        raise InvalidDataUri(f"output {name} resolves out of the working directory")
    if not stat.S_ISREG(st.st_mode):
        raise StagingFailed(f"output {name} (declared output {uri}) is not a regular file")
    return path


def stage_outputs(store, workdir: Path, uris,
                  each: Callable[[dict], object] = lambda item: None) -> list[dict]:
    """Upload each declared output, ``workdir/<basename of its URI>``, through the owner's
    store.  Every output is checked before any is uploaded.  Returns ``[{"uri", "bytes"}]``;
    ``each`` is called with each just before it is uploaded (to audit it: no output is
    written unaudited, and a later one may fail).
    """
    workdir = Path(workdir)
    files = [(d, _output_file(workdir, name, d.uri)) for d, name in _names(uris, "outputs")]
    check = getattr(store, "check_write", None)  # (an embedded enclave: an object in the
    for d, _ in files if check is not None else ():  # way, another output too) before
        check(d.uri, [o.uri for o, _ in files])      # any is written
    uploaded: list[dict] = []
    for d, path in files:
        # audited first: an output whose record could not be written after its upload
        # was in its dataset unaudited.  (An upload that then fails leaves the record of
        # its attempt.)
        each({"uri": d.uri, "bytes": path.stat().st_size})
        info = store.upload(path, d.uri)  # opens with O_NOFOLLOW: no symlink swapped in
        uploaded.append({"uri": d.uri, "bytes": info.size})
    return uploaded
