"""Shared-memory segment lifecycle: create, attach, unlink, sweep stale segments.

Segments are plain files in /dev/shm opened with ``os.open`` and mapped with
``mmap``.  We deliberately bypass ``multiprocessing.shared_memory``: on Python
3.11 its resource tracker unlinks a segment when an *attaching* process that
started its own tracker exits (cpython#82300), which would destroy a ring the
moment a respawned worker dies.  Only the creating engine ever unlinks.

Names are ``ringway-<pid>-<token>-<ring>``: the pid lets a new engine recognise
and remove the segments of an engine that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field

import psutil

from ipc.errors import ShmError, ShmSpaceError

SHM_DIR = "/dev/shm"
PREFIX = "ringway-"
_NAME_RE = re.compile(r"^ringway-(\d+)-([0-9a-f]+)-[A-Za-z0-9_.-]+$")


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


def _engine_alive(pid: int, seg_path: str) -> bool:
    """True if the process that named this segment may still be using it."""
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell (permissions): assume alive, never delete blindly
    try:
        made = os.stat(seg_path).st_mtime
    except FileNotFoundError:
        return True
    # A recycled pid belongs to a process started after the segment was made.
    return bool(started <= made + 1.0)


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink segments left by engines that died; returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if m is None:
            continue
        path = os.path.join(shm_dir, name)
        if _engine_alive(int(m.group(1)), path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(name)
    return removed


def list_segments(prefix: str = PREFIX, shm_dir: str = SHM_DIR) -> list[str]:
    """Names in the shm directory that start with ``prefix`` (for tests and checks)."""
    try:
        return sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return []
