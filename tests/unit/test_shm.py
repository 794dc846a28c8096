"""Segment lifecycle: create, attach, unlink, the engine lock, stale sweep, space checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc.errors import ShmError, ShmSpaceError
from ipc.shm import (
    PREFIX,
    EngineLock,
    Segment,
    check_shm_space,
    list_segments,
    new_engine_prefix,
    shm_free_bytes,
    sweep_stale_segments,
)

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    """A pid that belonged to a process which has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_create_is_exclusive_and_close_unlinks(shm_prefix: str) -> None:
    seg = Segment.create(shm_prefix + "a", 8192)
    with pytest.raises(ShmError, match="already exists"):
        Segment.create(shm_prefix + "a", 8192)
    seg.buf[:5] = b"hello"
    other = Segment.attach(shm_prefix + "a")
    assert bytes(other.buf[:5]) == b"hello"
    assert other.size == 8192
    other.close()  # an attacher never unlinks
    assert list_segments(shm_prefix) == [shm_prefix + "a"]
    seg.close()
    seg.close()  # idempotent
    assert list_segments(shm_prefix) == []
    with pytest.raises(ShmError, match="does not exist"):
        Segment.attach(shm_prefix + "a")


HOLDER = """
import os, sys
from ipc.shm import EngineLock, Segment
prefix, end = sys.argv[1], sys.argv[2]
lock = EngineLock.acquire(prefix)
seg = Segment.create(prefix + "lane0", 4096)
print("ready", flush=True)
if end == "die":
    os._exit(9)  # no clean-up at all, like a SIGKILL
sys.stdin.read()  # alive, lock held, until the test closes our stdin
seg.close()
lock.release()
"""


@contextlib.contextmanager
def engine_holding(prefix: str, end: str) -> Iterator[subprocess.Popen[str]]:
    """A process that makes ``prefix``'s lock and a segment, then dies or stays alive."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, prefix, end],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        if end == "die":
            proc.wait(30)
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_sweep_removes_a_dead_engines_segments_and_its_lock() -> None:
    prefix = f"{PREFIX}{_dead_pid()}-deadbeef-"
    with engine_holding(prefix, "die"):
        assert list_segments(prefix) == [prefix + "lane0", prefix + "lock"]
        removed = sweep_stale_segments()
    assert sorted(n for n in removed if n.startswith(prefix)) == [prefix + "lane0", prefix + "lock"]
    assert list_segments(prefix) == []


def test_sweep_keeps_a_live_engine_whose_pid_is_not_ours() -> None:
    """A pid that does not exist here may be a live engine in another PID namespace:
    its lock is held, so its segments stay (the pid alone would say "dead")."""
    prefix = f"{PREFIX}{_dead_pid()}-feedface-"
    with engine_holding(prefix, "live"):
        removed = sweep_stale_segments()
        assert [n for n in removed if n.startswith(prefix)] == []
        assert list_segments(prefix) == [prefix + "lane0", prefix + "lock"]
    assert list_segments(prefix) == []  # it cleaned up itself


def test_sweep_leaves_segments_without_a_lock_file(shm_prefix: str) -> None:
    """Nothing proves their owner dead (an older version's engine, or no engine at all)."""
    seg = Segment.create(shm_prefix + "lane0", 4096)
    try:
        assert [n for n in sweep_stale_segments() if n.startswith(shm_prefix)] == []
        assert list_segments(shm_prefix) == [shm_prefix + "lane0"]
    finally:
        seg.close()


def test_engine_lock_is_exclusive_and_released(shm_prefix: str) -> None:
    lock = EngineLock.acquire(shm_prefix)
    with pytest.raises(ShmError, match="cannot create the engine lock file"):
        EngineLock.acquire(shm_prefix)  # the name is taken: never two engines on one prefix
    assert list_segments(shm_prefix) == [shm_prefix + "lock"]
    lock.release()
    lock.release()  # idempotent


def test_space_check_names_the_figures() -> None:
    free = shm_free_bytes()
    check_shm_space(1)
    with pytest.raises(ShmSpaceError, match=r"bytes of shared memory but /dev/shm has only"):
        check_shm_space(free * 2 + 1)


def test_prefix_is_unique_and_carries_our_pid() -> None:
    a, b = new_engine_prefix(), new_engine_prefix()
    assert a != b
    assert a.startswith(f"{PREFIX}{os.getpid()}-")


def test_create_rejects_nonpositive_size(shm_prefix: str) -> None:
    with pytest.raises(ShmError, match="size must be > 0"):
        Segment.create(shm_prefix + "z", 0)


def check_full_shm(shm_dir: str) -> None:
    """On a 1 MiB tmpfs: a 4 MiB segment fails with the figures and leaves no file behind."""
    with pytest.raises(ShmSpaceError, match=r"no space left in .* for a 4,194,304-byte segment"):
        Segment.create("ringway-1-ab-big", 4 << 20, shm_dir=shm_dir)
    assert os.listdir(shm_dir) == []
    with pytest.raises(ShmSpaceError, match="need 4,194,304 bytes"):
        check_shm_space(4 << 20, shm_dir=shm_dir)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[str]:
    """A 1 MiB tmpfs standing in for a cramped /dev/shm (Docker's default is 64 MB).

    As root (CI) the mount must work: a failure fails the test instead of skipping it.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs here needs root; the user-namespace route runs instead")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_shm_fails_with_clear_message_and_leaves_nothing(tiny_tmpfs: str) -> None:
    check_full_shm(tiny_tmpfs)


def test_full_shm_in_a_user_namespace(tmp_path: Path) -> None:
    """The same on a real full tmpfs, mounted in a user and mount namespace of our own:
    no root needed, only a kernel that allows user namespaces (the default on Linux)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is not installed")
    probe = subprocess.run([unshare, "-Urm", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"this kernel refuses user namespaces: {probe.stderr.strip()}")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} -c "
        f"'from tests.unit.test_shm import check_full_shm; check_full_shm(\"{mnt}\")'"
    )
    res = subprocess.run(
        [unshare, "-Urm", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
