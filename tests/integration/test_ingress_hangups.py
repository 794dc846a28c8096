"""Issue 16 items 2 and 3: clients that hang up, rate-limited warnings, log I/O off the loop.

- Clients that pipeline frames and hang up (a reset) without reading their answers:
  the service drops those answers quietly and counts them (``answers_dropped_total``,
  ``engine_answers_dropped_total``); its log has no traceback and no asyncio
  "Unhandled exception".
- Warnings about clients are rate-limited per peer and reason: every warning is a
  line, or counted in the ``suppressed`` of a later line, or in the line the ingress
  writes when it closes: the three add up to the number of bad connections exactly.
- A service whose stderr is a pipe nobody reads (filled) still serves a legitimate
  client: its messages are delivered and its flush is answered, while bad clients
  make warnings; once the pipe is read again, SIGTERM exits 0 and no line is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import Client
from engine.protocol import HEADER, Hello, Request, Submit, encode_frame
from tests.integration.service_proc import REPO, start_service
from tests.integration.test_service_ingress import metric, scrape

R1 = msgspec.Raw(msgspec.msgpack.encode(1))
UNHANDLED = ("Traceback", "Unhandled exception", "Task exception was never retrieved")


def _connect(url: str) -> socket.socket:
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return socket.create_connection((host, int(port)), timeout=20)


def hang_up(url: str, frames: int, violation: bool, reset: bool) -> None:
    """Hello and ``frames`` pipelined frames (ending with a frame header above the limit
    when ``violation``), then a close (a reset with ``reset``): nothing is ever read."""
    sock = _connect(url)
    data = [encode_frame(Hello(client="hang-up"))]
    for seq in range(1, frames + 1):
        recipient = f"hung-{seq % 64}"
        if seq % 2:
            data.append(encode_frame(Submit(seq, [(recipient, R1)])))
        else:
            data.append(encode_frame(Request(seq, recipient, R1, 30.0)))
    if violation:
        data.append(HEADER.pack(0xFFFFFFFF))
    try:
        sock.sendall(b"".join(data))
    finally:
        if reset:  # else a clean close: the answers the server writes then get a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def bad_connection(url: str) -> None:
    """A connection the service closes with a warning: a frame header above the limit."""
    with _connect(url) as sock:
        sock.sendall(encode_frame(Hello(client="bad")) + HEADER.pack(0xFFFFFFFF))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def unhandled(lines: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(x)[:500] for x in lines if any(u in json.dumps(x) for u in UNHANDLED)]


@pytest.mark.timeout(300)
def test_clients_hanging_up_unread_are_dropped_quietly_and_counted(tmp_path: Path) -> None:
    # Requests take a while (the mock sink's delay): answers are owed after the hang-up.
    svc = start_service(
        tmp_path, ENGINE_SINK="mock", ENGINE_MOCK_DELAY_S="0.002", ENGINE_WORKERS="1"
    )
    try:
        threads = [
            threading.Thread(
                target=lambda: [hang_up(svc.url, 600, i % 2 == 0, i % 4 < 2) for i in range(10)]
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with Client(svc.url) as client:  # the service still serves
            assert client.request("ok", 1) is None
        stats = svc.wait_stats(
            lambda s: s["service"]["connections_total"] == 41 and s["in_flight"] == 0
        )
        metrics = scrape(svc, token=None)
    finally:
        code = svc.stop()
    assert unhandled(svc.lines) == []
    dropped = stats["service"]["answers_dropped_total"]
    assert dropped > 0, stats["service"]
    assert metric(metrics, "engine_answers_dropped_total") == dropped
    assert code == 0


@pytest.mark.timeout(300)
def test_warnings_about_clients_are_rate_limited_with_the_suppressed_count(
    tmp_path: Path,
) -> None:
    n = 60
    svc = start_service(
        tmp_path, ENGINE_SINK="null", ENGINE_WORKERS="1", ENGINE_LOG_LIMIT_INTERVAL_S="0.05"
    )
    try:
        for _ in range(n):
            bad_connection(svc.url)
            time.sleep(0.005)  # spread over several intervals, so some lines carry a count
        svc.wait_stats(lambda s: s["service"]["connections_total"] == n)
    finally:
        code = svc.stop()
    closing = [x for x in svc.lines if str(x.get("msg", "")).startswith("closing connection")]
    held = [x for x in svc.lines if "held back by the rate limit" in str(x.get("msg", ""))]
    told = sum(x["suppressed"] for x in closing) + sum(x["suppressed"] for x in held)
    assert 0 < len(closing) < n, len(closing)
    assert len(closing) + told == n, (len(closing), told)
    counted = [x for x in closing if x["suppressed"] > 0]
    assert counted and all(
        x["msg"].endswith(f" ({x['suppressed']:,} similar suppressed)") for x in counted
    ), counted[:2]
    assert all(x["peer"] == "127.0.0.1" and x["reason"] == "too_large" for x in closing)
    assert unhandled(svc.lines) == [] and code == 0


@pytest.mark.timeout(300)
def test_a_full_stderr_pipe_stalls_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")} | {
        "PYTHONPATH": str(REPO),
        "ENGINE_LOG_FORMAT": "json",
        "ENGINE_PORT": "0",
        "ENGINE_HTTP_PORT": "0",
        "ENGINE_SINK": "null",
        "ENGINE_WORKERS": "1",
        "ENGINE_LOG_LIMIT_INTERVAL_S": "0",  # every bad connection writes a line
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)  # a small pipe fills fast
    lines: list[dict[str, Any]] = []
    try:
        while not any(x.get("msg") == "serving" for x in lines):  # then nobody reads
            raw = proc.stderr.readline()
            assert raw, f"the service ended: {lines}"
            lines.append(json.loads(raw))
        start = lines[-1]
        url, http_url = f"tcp://{start['tcp']}", f"http://{start['http']}"
        filled, line = unread(fd), size
        for _ in range(400):  # bad clients: a warning line each, until the pipe is full
            bad_connection(url)
            before, filled = filled, unread(fd)
            if filled > before:
                line = min(line, filled - before)  # the shortest line written so far
            if size - filled < line:  # no room for another line
                break
        assert size - filled < line, f"the pipe never filled ({filled} of {size} bytes)"
        for _ in range(20):  # more warnings while it is full: they queue, nothing waits
            bad_connection(url)
        with Client(url) as client:  # a legitimate client is served all the same
            for i in range(2000):
                client.submit(f"good-{i % 8}", i)
            client.flush()
            assert client.request("good-0", 1) is None
        with urllib_open(http_url + "/stats") as stats:
            s = json.loads(stats.read())
        assert s["submitted"] >= 2001 and s["service"]["bad_frames_total"] >= 20, s
        assert unread(fd) == filled  # the log writer was blocked all along
        reader = threading.Thread(target=lambda: lines.extend(_rest(proc)), daemon=True)
        reader.start()  # the pipe is read again: the queued lines come out
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        reader.join(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = [x for x in lines if x.get("msg") == "stopped"]
    assert code == 0 and len(stopped) == 1, lines[-5:]
    assert stopped[0]["delivered"] == stopped[0]["submitted"] >= 2001, stopped
    closing = [x for x in lines if str(x.get("msg", "")).startswith("closing connection")]
    assert len(closing) >= 20, len(closing)  # queued while the pipe was full, then written
    assert unhandled(lines) == []


def unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` reads from."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little")


def _rest(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    assert proc.stderr is not None
    return [json.loads(raw) for raw in proc.stderr]


def urllib_open(url: str) -> Any:
    import urllib.request

    return urllib.request.urlopen(url, timeout=30)
