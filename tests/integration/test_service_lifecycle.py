"""The service's lifecycle under load: refusing an open bind, SIGTERM, a second SIGTERM, SIGHUP.

Each test runs its own ``engine serve`` subprocess and counts what really arrived
(the inbox sink, or a handler module that records every delivery), not what the
engine says it did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.client import Client
from engine.errors import EngineError
from engine.service.server import SAME_STOP_WINDOW_S
from ipc.shm import list_segments
from tests.integration.service_proc import REPO, start_service
from tests.integration.test_service_ingress import RawConn, http

STOP_WAIT_S = 60.0  # a bound for a stop to finish on a loaded machine, not a speed target
FAST_RETRY: dict[str, Any] = {
    "reconnect_attempts": 2,
    "reconnect_backoff_s": 0.01,
    "reconnect_max_s": 0.05,
}


class Producer(threading.Thread):
    """Submits ``[uid, seq]`` payloads round-robin to ``recipients`` until stopped.

    ``seq`` counts per recipient, so order can be checked; ``acked()`` maps the uid
    of every message the service acknowledged to its (recipient, seq).
    """

    def __init__(
        self,
        client: Client,
        recipients: int = 8,
        chunk: int = 200,
        pause_s: float = 0.002,
        *,
        prefix: str = "agent",
        uid_base: int = 0,
    ) -> None:
        super().__init__(name=f"producer-{prefix}", daemon=True)
        self.client = client
        self.names = [f"{prefix}-{i}" for i in range(recipients)]
        self.chunk = chunk
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.sent: dict[int, tuple[str, int]] = {}
        self.futures: list[tuple[int, Future[int]]] = []
        self._seqs = [0] * recipients
        self._uid = uid_base

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.burst(self.chunk)
            except EngineError:
                return  # the client is closed
            self.stop.wait(self.pause_s)

    def burst(self, n: int) -> list[Future[int]]:
        out: list[Future[int]] = []
        for _ in range(n):
            uid = self._uid
            self._uid += 1
            r = uid % len(self.names)  # the same rotation from any uid_base
            seq = self._seqs[r]
            self._seqs[r] += 1
            self.sent[uid] = (self.names[r], seq)
            fut = self.client.submit(self.names[r], [uid, seq])
            self.futures.append((uid, fut))
            out.append(fut)
        return out

    def finish(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(STOP_WAIT_S)

    def acked(self) -> dict[int, tuple[str, int]]:
        return {
            uid: self.sent[uid]
            for uid, fut in self.futures
            if fut.done() and fut.exception(timeout=0) is None
        }


def recording_env(inbox: Path, workers: int = 2) -> dict[str, str]:
    """Service settings for the recording handler (a backlog builds: 1 ms a message)."""
    return {
        "ENGINE_HANDLER": "tests.integration.handlers_lifecycle:slow_inbox",
        "ENGINE_WORKERS": str(workers),
        "LIFECYCLE_INBOX": str(inbox),
    }


def read_inbox(directory: Path) -> dict[str, list[tuple[int, int]]]:
    """recipient -> the (uid, seq) payloads of its inbox file, in delivery order
    (the inbox sink's format, which the recording handler writes too)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for path in directory.glob("*.jsonl"):
        lines = path.read_text().splitlines()
        out[path.stem] = [(rec["payload"][0], rec["payload"][1]) for rec in map(json.loads, lines)]
    return out


def check_delivered(
    acked: dict[int, tuple[str, int]], seen: dict[str, list[tuple[int, int]]]
) -> Counter[int]:
    """Assert every acked message was delivered, in order per recipient; the uid counts."""
    counts: Counter[int] = Counter()
    for recipient, payloads in seen.items():
        firsts = list(dict(payloads).values())  # seq of each uid's first delivery
        assert firsts == sorted(firsts), f"{recipient} delivered out of order"
        counts.update(uid for uid, _ in payloads)
    lost = [uid for uid in acked if uid not in counts]
    assert not lost, f"{len(lost)} acked messages never delivered, e.g. {lost[:5]}"
    return counts


def segments_of(pid: int) -> list[str]:
    return list_segments(f"ringway-{pid}-")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still running (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def engine_pids(stats: dict[str, Any]) -> list[int]:
    return [stats["monitor"]["pid"], *(w["pid"] for w in stats["workers"])]


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_non_loopback_bind_without_a_token_refuses_to_start(host: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env |= {"ENGINE_HOST": host, "ENGINE_PORT": "0", "ENGINE_HTTP_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--sink", "null"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert f"ENGINE_HOST={host!r} is not a loopback address" in proc.stderr
    assert "set ENGINE_AUTH_TOKEN" in proc.stderr


def test_sigterm_under_load_exits_0_and_delivers_every_acked_message(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    svc = start_service(tmp_path, **recording_env(inbox))
    client = Client(svc.url, max_pending=20_000, **FAST_RETRY)
    producer = Producer(client)
    try:
        producer.start()
        before = svc.wait_stats(lambda s: s["delivered"] >= 2000 and len(s["workers"]) == 2)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(STOP_WAIT_S) == 0, svc.log_text()
    finally:
        producer.finish()
        client.close(timeout=5)
        svc.stop()
    assert before["in_flight"] > 0  # a backlog was queued when the signal came
    acked = producer.acked()
    assert len(acked) >= 2000
    counts = check_delivered(acked, read_inbox(inbox))
    assert max(counts.values()) == 1  # one service run, no crash: nothing twice
    assert set(counts) <= set(producer.sent)
    [stopped] = svc.logs("stopped")
    assert stopped["submitted"] == stopped["delivered"] == sum(counts.values())
    assert segments_of(svc.pid) == []
    assert wait_gone(engine_pids(before)) == []


def test_a_second_sigterm_stops_at_once_and_still_cleans_up(tmp_path: Path) -> None:
    """The mock sink delivers 4 recipients x 5 messages/s: 2000 queued messages would take
    far longer than the test to drain; the second signal abandons them and exits 130."""
    svc = start_service(
        tmp_path,
        ENGINE_SINK="mock",
        ENGINE_MOCK_DELAY_S="0.2",
        ENGINE_WORKERS="2",
        ENGINE_SHUTDOWN_TIMEOUT_S="600",
    )
    try:
        with Client(svc.url) as client:
            ids = client.submit_many([(f"slow-{i % 4}", i) for i in range(2000)])
        assert len(ids) == 2000
        before = svc.wait_stats(lambda s: len(s["workers"]) == 2)
        svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while not svc.logs("SIGTERM: draining, then stopping") and time.monotonic() < deadline:
            time.sleep(0.02)
        # While it drains: no new messages by HTTP or TCP, and readiness says why;
        # liveness stays ok (a probe must not kill a draining service).
        status, body = http(svc, "POST", "/v1/messages", b'{"recipient": "late"}', token=None)
        assert status == 503 and json.loads(body).get("error") == "closed", body
        status, body = http(svc, "GET", "/readyz", token=None)
        assert status == 503 and "shutting down" in json.loads(body)["reasons"], body
        for probe in ("/livez", "/healthz"):
            status, body = http(svc, "GET", probe, token=None)
            assert (status, json.loads(body)) == (200, {"status": "ok"}), (probe, body)
        with pytest.raises(ConnectionRefusedError):
            RawConn(svc.url)
        time.sleep(SAME_STOP_WINDOW_S)  # sooner, it would count as the first one repeated
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(STOP_WAIT_S) == 130, svc.log_text()
    finally:
        svc.stop()
    assert svc.logs("second SIGTERM: fast stop")
    [stopped] = svc.logs("stopped with unsettled messages (fast stop)")
    assert stopped["abandoned"] > 0 and stopped["submitted"] == 2000
    assert segments_of(svc.pid) == []
    assert wait_gone(engine_pids(before)) == []


HANDLER_SOURCE = '''"""Written by test_service_lifecycle: one JSON line per delivery."""
import json
import os
import time

VERSION = {version}{padding}
_fds = {{}}


def handle(msg):
    pid = os.getpid()
    fd = _fds.get(pid)
    if fd is None:
        path = os.path.join(os.environ["HUP_RECORD_DIR"], f"{{pid}}.jsonl")
        fd = _fds[pid] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    uid, seq = msg.body()
    line = json.dumps([VERSION, time.monotonic_ns(), msg.recipient, uid, seq, pid])
    os.write(fd, line.encode() + b"\\n")
'''


def write_handler(directory: Path, version: int) -> None:
    # A different size too: an import never trusts a stale cache of the old file.
    source = HANDLER_SOURCE.format(version=version, padding="  # reloaded" * (version - 1))
    (directory / "hup_handler.py").write_text(source)


def test_sighup_under_load_restarts_workers_one_by_one_with_the_new_handler(
    tmp_path: Path,
) -> None:
    code, records = tmp_path / "code", tmp_path / "records"
    code.mkdir()
    records.mkdir()
    write_handler(code, 1)
    svc = start_service(
        tmp_path,
        ENGINE_HANDLER="hup_handler:handle",
        ENGINE_WORKERS="2",
        ENGINE_STATS_INTERVAL_S="0.2",
        HUP_RECORD_DIR=str(records),
        PYTHONPATH=os.pathsep.join((str(code), str(REPO))),
        PYTHONDONTWRITEBYTECODE="1",
    )
    client = Client(svc.url, max_pending=20_000)
    producer = Producer(client, recipients=6, chunk=100, pause_s=0.005)
    try:
        producer.start()
        before = svc.wait_stats(lambda s: s["delivered"] >= 2000 and len(s["workers"]) == 2)
        write_handler(code, 2)
        svc.proc.send_signal(signal.SIGHUP)
        old_pids = {w["pid"] for w in before["workers"]}
        after = svc.wait_stats(  # both replaced, and both successors ready
            lambda s: all(
                w["recycled"] == 1 and w["alive"] and w["pid"] not in old_pids for w in s["workers"]
            )
        )
        producer.finish()
        last = producer.burst(600)  # after the reload: all of these meet version 2
        client.flush()
        assert all(f.result(timeout=0) > 0 for f in last)
        final = svc.wait_stats(lambda s: s["in_flight"] == 0)
        assert svc.stop() == 0, svc.log_text()
    finally:
        producer.finish()
        client.close(timeout=5)
        svc.stop()
    assert final["service"]["reloads_total"] == 1
    # Each worker was respawned once, and that respawn was the graceful one (no crash).
    assert [(w["restarts"], w["recycled"]) for w in final["workers"]] == [(1, 1), (1, 1)]
    rows = [
        json.loads(line) for p in records.glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    rows.sort(key=lambda r: r[1])  # by handler start time (CLOCK_MONOTONIC is machine-wide)
    uids = Counter(r[3] for r in rows)
    acked = producer.acked()
    assert set(acked) <= set(uids) and max(uids.values()) == 1  # nothing lost, nothing twice
    assert len(acked) == final["submitted"] == len(rows)
    by_recipient: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        by_recipient[r[2]].append(r[4])
    assert all(seqs == sorted(seqs) for seqs in by_recipient.values())
    version_of = {r[3]: r[0] for r in rows}
    new_pids = {w["pid"] for w in after["workers"]}
    assert {version_of[r[3]] for r in rows if r[5] in old_pids} == {1}
    assert {version_of[r[3]] for r in rows if r[5] in new_pids} == {2}  # re-imported
    assert all(version_of[producer.futures[-1 - i][0]] == 2 for i in range(len(last)))
    assert len({r[5] for r in rows}) == 4  # two workers, each replaced once
