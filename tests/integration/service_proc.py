"""Run the real service (``python -m engine serve``) as a subprocess for integration tests.

``with running_service(tmp_path, ENGINE_SINK="null") as svc:`` starts the
service with JSON logs on any free ports, waits for its ``serving`` line and
yields a `ServiceProc` (``url``, ``http_url``, ``proc``, ``lines``, ``stats()``).
A thread drains stderr for the whole run, so the pipe never fills and every log
line is kept.  On exit the service gets SIGTERM and up to 60 s to stop; then it
(and its whole process group: monitor, workers) is killed.  ``returncode`` keeps
the exit code so a test can assert a clean stop (0).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # a loaded 2-core machine can take a while to spawn the workers
STOP_TIMEOUT_S = 60.0


class ServiceProc:
    """A started service: its addresses, process, collected log lines and exit code."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.lines: list[dict[str, Any]] = []  # every stderr line; non-JSON ones as {"text": ...}
        self.start_line: dict[str, Any] = {}
        self.url = ""
        self.http_url = ""
        self.socket = ""
        self.workers = 0
        self.pid = proc.pid
        self.returncode: int | None = None
        self._serving = threading.Event()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, name="service-stderr", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("a", encoding="utf-8") as out:
            for raw in self.proc.stderr:
                text = raw.decode("utf-8", "replace").rstrip("\n")
                out.write(text + "\n")
                out.flush()
                try:
                    line = json.loads(text)
                except ValueError:
                    line = None
                if not isinstance(line, dict):
                    line = {"text": text}
                with self._lock:
                    self.lines.append(line)
                if line.get("msg") == "serving" and not self._serving.is_set():
                    self.start_line = line
                    self.url = f"tcp://{line['tcp']}"
                    self.http_url = f"http://{line['http']}"
                    self.socket = line.get("socket") or ""
                    self.workers = int(line["workers"])
                    self.pid = int(line["pid"])
                    self._serving.set()
        self._serving.set()  # EOF: the process ended (wait_serving reports it)

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the ``serving`` line; RuntimeError with the log if it never comes."""
        if not self._serving.wait(timeout) or not self.url:
            code = self.proc.poll()
            self.stop(timeout=10)
            raise RuntimeError(
                f"the service did not start within {timeout}s (exit code {code}); log:\n"
                + self.log_text()
            )

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(json.dumps(line) for line in self.lines)

    def logs(self, msg: str | None = None) -> list[dict[str, Any]]:
        """The log lines so far (those whose "msg" is ``msg`` when given)."""
        with self._lock:
            return [line for line in self.lines if msg is None or line.get("msg") == msg]

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``{http_url}{path}`` and decode its JSON body (no token: tests bind loopback)."""
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.get_json("/stats")
        return stats

    def wait_stats(self, done: Any, timeout: float = 60.0, interval: float = 0.1) -> dict[str, Any]:
        """Poll /stats until ``done(stats)`` is true; AssertionError with the last stats."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while not done(stats):
            if time.monotonic() > deadline:
                raise AssertionError(f"stats never matched within {timeout}s: {stats}")
            time.sleep(interval)
            stats = self.stats()
        return stats

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout`` s, else SIGKILL the process group; the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait()
        self._reader.join(10)
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the service and every process it started (they share its session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def free_port() -> int:
    """A TCP port that was free a moment ago (to restart a service on the same port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(tmp_path: Path, *, wrapper: Sequence[str] = (), **env: str) -> ServiceProc:
    """Start the service and wait for it to serve; the caller must ``stop()`` it.

    ``wrapper`` runs it under another command (``["timeout", "600"]``): ``proc`` is
    then that command, ``pid`` still the service's own (from its start-up line).
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    pythonpath = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    full = base | {
        "PYTHONPATH": pythonpath,
        "ENGINE_LOG_FORMAT": "json",
        "ENGINE_PORT": "0",
        "ENGINE_HTTP_PORT": "0",
    }
    full |= {k: str(v) for k, v in env.items()}
    log_path = tmp_path / f"service-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "engine", "serve"],
        cwd=REPO,
        env=full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # one group: a kill on timeout reaches monitor and workers
    )
    svc = ServiceProc(proc, log_path)
    try:
        svc.wait_serving()
    except BaseException:
        svc.stop(timeout=10)
        raise
    return svc


@contextlib.contextmanager
def running_service(tmp_path: Path, **env: str) -> Iterator[ServiceProc]:
    """Start the service with the given ENGINE_* (or other) environment; stop it on exit.

    The exit code is in ``svc.returncode`` afterwards (or call ``svc.stop()`` inside
    the block to assert on it there).
    """
    svc = start_service(tmp_path, **env)
    try:
        yield svc
    finally:
        svc.stop()
