"""A private ``redis-server`` for one test or session: free port, tmp dir, AOF on.

Never the shared server on 6379: fault tests kill and restart theirs.  The
server runs in its own process group and is killed at the end, whatever the
test did to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``restart()`` keeps its port and data directory."""

    def __init__(self, directory: Path, appendfsync: str = "everysec") -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (.ci/run installs it)")
        self.exe = exe
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.log),
            "--protected-mode", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{text[-2000:]}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


@contextlib.contextmanager
def running_redis(directory: Path, appendfsync: str = "everysec") -> Iterator[RedisServer]:
    server = RedisServer(directory, appendfsync)
    server.start()
    try:
        yield server
    finally:
        server.kill()
