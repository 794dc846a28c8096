"""Segment lifecycle: exclusive create, attach, unlink, stale sweep, space checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ipc.errors import ShmError, ShmSpaceError
from ipc.shm import (
    PREFIX,
    Segment,
    check_shm_space,
    list_segments,
    new_engine_prefix,
    shm_free_bytes,
    sweep_stale_segments,
)


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


def test_sweep_removes_dead_engines_segments_only(shm_prefix: str) -> None:
    dead = f"{PREFIX}{_dead_pid()}-deadbeef-"
    stale = Segment.create(dead + "lane0", 4096)
    stale.owner = False  # simulate the dead engine: nobody will unlink it
    stale.close()
    live = Segment.create(shm_prefix + "lane0", 4096)
    try:
        removed = sweep_stale_segments()
        assert dead + "lane0" in removed
        assert list_segments(dead) == []
        assert list_segments(shm_prefix) == [shm_prefix + "lane0"]
    finally:
        live.close()


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


@pytest.fixture
def tiny_tmpfs(tmp_path: os.PathLike[str]) -> object:
    """A 1 MiB tmpfs standing in for a cramped /dev/shm (Docker's default is 64 MB)."""
    mnt = os.path.join(tmp_path, "shm")
    os.mkdir(mnt)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", mnt], check=True)


def test_full_shm_fails_with_clear_message_and_leaves_nothing(tiny_tmpfs: str) -> None:
    with pytest.raises(ShmSpaceError, match=r"no space left in .* for a 4,194,304-byte segment"):
        Segment.create("ringway-1-ab-big", 4 << 20, shm_dir=tiny_tmpfs)
    assert os.listdir(tiny_tmpfs) == []
    with pytest.raises(ShmSpaceError, match="need 4,194,304 bytes"):
        check_shm_space(4 << 20, shm_dir=tiny_tmpfs)
