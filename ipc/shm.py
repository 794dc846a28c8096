"""Shared-memory segment lifecycle: create, attach, unlink, sweep stale segments.

Segments are plain files in /dev/shm opened with ``os.open`` and mapped with
``mmap``.  We deliberately bypass ``multiprocessing.shared_memory``: on Python
3.11 its resource tracker unlinks a segment when an *attaching* process that
started its own tracker exits (cpython#82300), which would destroy a ring the
moment a respawned worker dies.  Only the creating engine ever unlinks.

Names are ``ringway-<pid>-<token>-<ring>``.  Each engine also holds an ``flock``
on its ``<prefix>lock`` file for its whole life (`EngineLock`); the kernel drops
the lock when the last process holding it exits, however it exits.  A new engine
removes the segments of another only when it can take that lock: the proof that
nobody uses them, also for an engine in another PID namespace sharing this
/dev/shm, whose pid means nothing here.  Segments without a lock file (an older
version's, or no engine's) are never swept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field

from ipc.errors import ShmError, ShmSpaceError

SHM_DIR = "/dev/shm"
PREFIX = "ringway-"
LOCK_NAME = "lock"  # <prefix>lock: the engine's lock file
_NAME_RE = re.compile(r"^(ringway-\d+-[0-9a-f]+-)([A-Za-z0-9_.-]+)$")


def new_engine_prefix() -> str:
    """Return a per-engine name prefix: our pid plus a random token."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"


def shm_free_bytes(shm_dir: str = SHM_DIR) -> int:
    """Bytes an unprivileged process may still allocate in the shm filesystem."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def check_shm_space(required: int, shm_dir: str = SHM_DIR) -> None:
    """Fail early, with the figures, when the rings cannot fit in /dev/shm."""
    free = shm_free_bytes(shm_dir)
    if required > free:
        raise ShmSpaceError(
            f"the rings need {required:,} bytes of shared memory but {shm_dir} has only "
            f"{free:,} bytes free; lower ENGINE_RING_BYTES or ENGINE_WORKERS, or give the "
            f"container more shared memory (docker run --shm-size=...)"
        )


@dataclass(eq=False)
class Segment:
    """One mapped shared-memory file; ``owner`` segments are unlinked on close."""

    name: str
    size: int
    owner: bool
    shm_dir: str = SHM_DIR
    _fd: int = field(default=-1, repr=False)
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return os.path.join(self.shm_dir, self.name)

    @property
    def buf(self) -> mmap.mmap:
        if self._map is None:
            raise ShmError(f"segment {self.name!r} is closed")
        return self._map

    @classmethod
    def create(cls, name: str, size: int, shm_dir: str = SHM_DIR) -> Segment:
        """Create and fully allocate a new segment; never reuses an existing one."""
        if size <= 0:
            raise ShmError(f"segment size must be > 0, got {size}")
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ShmError(f"shared-memory segment {path} already exists") from None
        except OSError as exc:
            raise ShmError(f"cannot create shared-memory segment {path}: {exc}") from exc
        try:
            # posix_fallocate reserves the pages now: on a full tmpfs we get ENOSPC
            # here instead of a SIGBUS on first touch inside a worker.
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if exc.errno == errno.ENOSPC:
                raise ShmSpaceError(
                    f"no space left in {shm_dir} for a {size:,}-byte segment "
                    f"({shm_free_bytes(shm_dir):,} bytes free); lower ENGINE_RING_BYTES "
                    f"or give the container more shared memory (docker run --shm-size=...)"
                ) from exc
            raise ShmError(f"cannot allocate shared-memory segment {path}: {exc}") from exc
        return cls(name=name, size=size, owner=True, shm_dir=shm_dir, _fd=fd, _map=mapped)

    @classmethod
    def attach(cls, name: str, shm_dir: str = SHM_DIR) -> Segment:
        """Map an existing segment; closing it later never unlinks it."""
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShmError(f"shared-memory segment {path} does not exist") from None
        except OSError as exc:
            raise ShmError(f"cannot open shared-memory segment {path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise ShmError(f"cannot map shared-memory segment {path}: {exc}") from exc
        return cls(name=name, size=size, owner=False, shm_dir=shm_dir, _fd=fd, _map=mapped)

    def close(self) -> None:
        """Unmap; the owner also unlinks.  Safe to call twice."""
        if self._map is not None:
            # Views into the map may still be alive; then the GC unmaps it later,
            # and we still release the name below so nothing leaks in /dev/shm.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.owner = False

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineLock:
    """An exclusive ``flock`` on ``<prefix>lock``, held from before the first segment is
    made until after the last is unlinked: while it is held, the prefix's segments are live.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, prefix: str, shm_dir: str = SHM_DIR) -> EngineLock:
        """Create the lock file already locked: it never exists unlocked while we live.

        An unnamed file (O_TMPFILE) is locked first and then linked under its
        name, so a sweep can never find it free between creation and ``flock``.
        """
        path = os.path.join(shm_dir, prefix + LOCK_NAME)
        try:
            fd = os.open(shm_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ShmError(f"cannot create the engine lock file in {shm_dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: Python uses plain link()
            # unless a dir fd is given, and that would link the symlink itself.
            fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
            finally:
                os.close(fds)
        except OSError as exc:
            os.close(fd)
            raise ShmError(f"cannot create the engine lock file {path}: {exc}") from exc
        return cls(path, fd)

    def release(self) -> None:
        """Unlink the lock file, then let the lock go.  Safe to call twice."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def _take_free_lock(path: str) -> int | None:
    """A descriptor holding ``path``'s lock if no process held it; None if one does."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # released by its owner meanwhile: it is cleaning up itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the segments (and lock file) of engines whose lock is free; returns the names.

    Only a free lock proves an engine dead: a pid that does not exist here may
    be a live engine in another PID namespace sharing this /dev/shm.
    """
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    groups: dict[str, list[str]] = {}
    for name in names:
        m = _NAME_RE.match(name)
        if m is not None:
            groups.setdefault(m.group(1), []).append(name)
    for prefix, members in groups.items():
        lock = prefix + LOCK_NAME
        if lock not in members:
            continue  # no lock file: nothing proves its owner dead
        fd = _take_free_lock(os.path.join(shm_dir, lock))
        if fd is None:
            continue
        try:
            # The lock file last: until it is gone, a crash here leaves a set the
            # next sweep still recognises.
            for name in sorted(members, key=lambda n: n == lock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(shm_dir, name))
                    removed.append(name)
        finally:
            os.close(fd)
    return removed


def list_segments(prefix: str = PREFIX, shm_dir: str = SHM_DIR) -> list[str]:
    """Names in the shm directory that start with ``prefix`` (for tests and checks)."""
    try:
        return sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return []
