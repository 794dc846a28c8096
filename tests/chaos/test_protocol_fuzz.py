"""Issue 16 item 4: a seeded, structure-aware fuzz of the binary protocol and the HTTP API.

Beside `test_service_faults.py`'s bad-input scenario (malformed bodies, each
refused), this one starts from valid frames of every client kind and mutates them
(`tests.chaos.fuzz_frames`): wrong types, absurd sizes, counts, numbers and
nesting, non-UTF-8 strings, extra and missing fields, unknown tags, cut bodies;
sessions end cleanly, hang up without reading, reset, truncate or overrun the
frame limit; some never get past the Hello (no token, a wrong one, a frame before
it); connection floods go beyond ENGINE_MAX_CONNECTIONS; the HTTP endpoints get
the same treatment.  A legitimate binary client and a legitimate HTTP client keep
sending all along.  After each run:

- every message the legitimate clients had acked is in the inbox (lost 0);
- nothing is in flight, /healthz answers 200, SIGTERM exits 0;
- no session got a wrong number of answers or an ``internal`` error, no HTTP
  request got a 5xx, and the log has no traceback and no unhandled exception.

The default run is several seeds at a small size (a few seconds each).
``FUZZ_SCALE=long`` runs the long version (about 1,000,000 legitimate messages)
and ``FUZZ_SEEDS=7,8`` picks the seeds; the report fixture prints the figures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import Client
from engine.protocol import ERR_INTERNAL, Error, Hello, Welcome, encode_frame, server_decoder
from tests.chaos import fuzz_frames as fz
from tests.chaos.checker import check
from tests.chaos.recorder import DELIVERED, Delivery
from tests.integration.service_proc import ServiceProc, start_service
from tests.integration.test_service_ingress import TOKEN, wait_for
from tests.integration.test_service_ingress import http as call
from tests.integration.test_service_lifecycle import Producer

SCALE = os.environ.get("FUZZ_SCALE", "small")
if SCALE not in ("small", "long"):
    raise ValueError(f"FUZZ_SCALE must be small or long, got {SCALE!r}")
_SIZES = {
    # binary sessions per fuzzer thread, HTTP requests, floods, legit messages (at least),
    # the legitimate client's pause between chunks of 200 (it sends all along the fuzz)
    "small": {"sessions": 40, "http": 120, "floods": 2, "legit": 3000, "pause_s": 0.005},
    "long": {"sessions": 6000, "http": 20_000, "floods": 40, "legit": 1_000_000, "pause_s": 0.03},
}
SIZE = _SIZES[SCALE]
SEEDS = [int(s) for s in os.environ.get("FUZZ_SEEDS", "1,2,3").split(",") if s.strip()]
FUZZERS = 2
MAX_FRAME = 1 << 20
MAX_CONNECTIONS = 48
UNHANDLED = ("Traceback", "Unhandled exception", "Task exception was never retrieved")
_decode = msgspec.json.decode


class Session:
    """One raw connection: send bytes, read framed answers until EOF or a count."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes) -> bool:
        """False if the service had closed the connection already (it may, on a violation)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def end_writing(self) -> None:
        with contextlib.suppress(OSError):  # already closed by the service: EOF is next
            self.sock.shutdown(socket.SHUT_WR)

    def answers(self, n: int | None = None) -> list[Any]:
        """The next ``n`` answers (fewer at EOF); all of them up to EOF when ``n`` is None."""
        out: list[Any] = []
        while n is None or len(out) < n:
            if len(self.buf) >= 4:
                size = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + size:
                    out.append(server_decoder.decode(bytes(self.buf[4 : 4 + size])))
                    del self.buf[: 4 + size]
                    continue
            if self.eof:
                break
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
        return out

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _tally_answers(answers: list[Any], tally: Counter[str]) -> None:
    for a in answers:
        tally[f"answer_{type(a).__name__}"] += 1
        if isinstance(a, Error):
            tally[f"error_{a.code}"] += 1


def guarded(target: Any, tally: Counter[str]) -> Any:
    """``target`` for a thread: an exception of the fuzzer itself is tallied, not lost."""

    def run(*args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:
            tally[f"fuzzer_error {type(exc).__name__}: {exc}"[:200]] += 1

    return run


def binary_fuzzer(url: str, seed: int, sessions: int, tally: Counter[str]) -> None:
    """``sessions`` hostile connections, one after the other."""
    rng = random.Random(seed)
    done = attempts = 0
    while done < sessions and attempts < 20 * sessions:
        attempts += 1
        try:
            s = Session(url)
        except OSError:  # the listen backlog full during a flood
            tally["connect_failed"] += 1
            time.sleep(0.05)
            continue
        try:
            if rng.random() < 0.12:  # pre-auth traffic: the service must close on it
                kind, data = fz.pre_auth(rng, TOKEN)
                tally[f"pre_auth_{kind}"] += 1
                s.send(data)
                s.end_writing()
                answers = s.answers()
                _tally_answers(answers, tally)
                welcomed = any(isinstance(a, Welcome) for a in answers)
                if kind != "frame_before_hello" and welcomed:
                    tally["bad_pre_auth_welcomed"] += 1
                done += 1
                continue
            s.send(encode_frame(Hello(token=TOKEN, client="fuzz")))  # a refusal: no Welcome
            first = s.answers(1)
            if not first or not isinstance(first[0], Welcome):
                _tally_answers(first, tally)  # busy during a flood: refused, that is all
                tally["no_welcome"] += 1
                time.sleep(0.05)  # and try again: the session still owes its frames
                continue
            done += 1
            bodies = []
            for _ in range(rng.randrange(1, 40)):
                kind, body = fz.frame_body(rng, TOKEN)
                if len(body) > MAX_FRAME:
                    continue
                tally[f"kind_{kind.split('+')[0]}"] += 1
                tally["mutated" if "+" in kind else "valid_shape"] += 1
                bodies.append(body)
            end = fz.ending(rng, MAX_FRAME)
            tally[f"end_{end}"] += 1
            tally["frames"] += len(bodies)
            data = b"".join(fz.framed(b) for b in bodies) + fz.terminal_bytes(end, rng, MAX_FRAME)
            if not s.send(data):
                tally["closed_by_service_while_sending"] += 1  # checked by the count below
            if end in ("hang_up", "reset"):
                continue  # `finally` hangs up without reading a thing
            s.end_writing()
            answers = s.answers()
            _tally_answers(answers, tally)
            owed = len(bodies) + (end != "close")  # a terminal violation gets one error
            if len(answers) != owed:
                tally["wrong_answer_count"] += 1
                tally[f"wrong_answer_count_seed{seed}"] += 1
        finally:
            s.close(reset=rng.random() < 0.5)


def flood(url: str, n: int, tally: Counter[str]) -> None:
    """``n`` connections at once (beyond the limit), half of them saying Hello, then gone."""
    socks = []
    for i in range(n):
        try:
            s = Session(url)
        except OSError:
            tally["flood_connect_failed"] += 1
            continue
        if i % 2:
            s.send(encode_frame(Hello(token=TOKEN, client="flood")))
        socks.append(s)
    tally["flood_connections"] += len(socks)
    time.sleep(0.2)
    for i, s in enumerate(socks):
        s.close(reset=i % 3 == 0)


def http_fuzzer(svc: ServiceProc, seed: int, n: int, tally: Counter[str]) -> None:
    rng = random.Random(seed)
    host, _, port = svc.http_url.removeprefix("http://").rpartition(":")
    for _ in range(n):
        method, path, body, headers = fz.http_request(rng, TOKEN)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(method, path, body or None, headers)
            resp = conn.getresponse()
            resp.read()
            tally[f"http_{resp.status}"] += 1
            if resp.status >= 500:
                tally["http_5xx"] += 1
        except OSError:
            tally["http_closed_large" if len(body) > MAX_FRAME else "http_closed"] += 1
        finally:
            conn.close()


class HttpLegit(threading.Thread):
    """Posts arrays of ``[uid, seq]`` messages with the token; a 202 acks the array."""

    def __init__(self, svc: ServiceProc, uid_base: int) -> None:
        super().__init__(name="http-legit", daemon=True)
        self.svc = svc
        self.uid = uid_base
        self.names = [f"legith-{i}" for i in range(4)]
        self.seqs = [0] * 4
        self.stop = threading.Event()
        self.sent: dict[int, tuple[str, int]] = {}
        self.acked: dict[int, tuple[str, int]] = {}
        self.statuses: Counter[int] = Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = []
            for _ in range(20):
                r = self.uid % 4
                batch.append((self.uid, self.names[r], self.seqs[r]))
                self.sent[self.uid] = (self.names[r], self.seqs[r])
                self.seqs[r] += 1
                self.uid += 1
            body = json.dumps([{"recipient": n, "payload": [u, q]} for u, n, q in batch])
            status, _ = call(self.svc, "POST", "/v1/messages", body.encode())
            self.statuses[status] += 1
            if status == 202:
                self.acked.update((u, (n, q)) for u, n, q in batch)
            self.stop.wait(0.02)


def log_problem(line: dict[str, Any]) -> bool:
    """An unhandled exception, a traceback of ours, or an error from asyncio or aiohttp.

    A dead letter's ERROR line carries the handler's traceback by design (``event``
    dead_letter): that is the handler's failure, reported, not one of the service.
    """
    if line.get("event") == "dead_letter":
        return False
    text = json.dumps(line)
    if any(u in text for u in UNHANDLED) or "exc" in line:
        return True
    return line.get("level") in ("error", "critical") and not str(
        line.get("logger", "")
    ).startswith("engine.")


def legit_deliveries(inbox: Path) -> list[Delivery]:
    """What the inbox holds for the legitimate recipients (payload ``[uid, seq]``)."""
    out = []
    for path in sorted(inbox.glob("legit*.jsonl")):
        recipient = path.name.removesuffix(".jsonl")
        for line_no, line in enumerate(path.read_bytes().splitlines()):
            rec = _decode(line)
            uid, seq = rec["payload"][:2]
            attempt = rec["attempt"]
            out.append(Delivery(uid, rec["id"], seq, 0, line_no, 0, attempt, DELIVERED, recipient))
    return out


def run_fuzz(tmp_path: Path, seed: int) -> dict[str, Any]:
    inbox = tmp_path / "inbox"
    svc = start_service(
        tmp_path,
        ENGINE_SINK="inbox",
        ENGINE_INBOX_DIR=str(inbox),
        ENGINE_WORKERS="2",
        ENGINE_AUTH_TOKEN=TOKEN,
        ENGINE_MAX_FRAME_BYTES=str(MAX_FRAME),
        ENGINE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        ENGINE_RETRY_MAX_ATTEMPTS="2",
        ENGINE_RETRY_BACKOFF_BASE_S="0.01",
        ENGINE_STATS_INTERVAL_S="0.2",
    )
    tally: Counter[str] = Counter()
    started = time.monotonic()
    code: int | None = None
    try:
        with Client(svc.url, TOKEN, max_pending=20_000) as client:
            legit = Producer(
                client, recipients=8, chunk=200, pause_s=SIZE["pause_s"], prefix="legit"
            )
            web = HttpLegit(svc, uid_base=1 << 40)
            legit.start()
            web.start()
            rng = random.Random(seed)
            threads = [
                threading.Thread(
                    target=guarded(binary_fuzzer, tally),
                    args=(svc.url, rng.randrange(1 << 30), SIZE["sessions"], tally),
                )
                for _ in range(FUZZERS)
            ]
            threads.append(
                threading.Thread(
                    target=guarded(http_fuzzer, tally),
                    args=(svc, rng.randrange(1 << 30), SIZE["http"], tally),
                )
            )
            for t in threads:
                t.start()
            floods = 0
            while any(t.is_alive() for t in threads) or floods < SIZE["floods"]:
                if floods < SIZE["floods"]:
                    flood(svc.url, MAX_CONNECTIONS + 16, tally)
                    floods += 1
                time.sleep(0.2)
            while len(legit.sent) < SIZE["legit"] and legit.is_alive():
                time.sleep(0.1)  # the legitimate load keeps its size whatever the fuzz took
            legit.finish()
            web.stop.set()
            web.join(60)
            client.flush()
        after = wait_for(svc, lambda s: s["in_flight"] == 0, timeout=120)
        health, health_body = call(svc, "GET", "/healthz", token=None)
    finally:
        code = svc.stop()
    acked = legit.acked() | web.acked
    result = check(acked, [d for d in legit_deliveries(inbox) if d.uid in acked]).to_dict()
    log_problems = [json.dumps(x)[:2000] for x in svc.lines if log_problem(x)]
    return {
        "seed": seed,
        "scale": SCALE,
        "seconds": round(time.monotonic() - started, 1),
        "fuzz_frames": tally["frames"],
        "legit_acked": len(acked),
        "legit_http_statuses": dict(web.statuses),
        "lost": result["lost"],
        "duplicated": result["duplicated"],
        "out_of_order": result["out_of_order"],
        "in_flight": after["in_flight"],
        "service": {k: v for k, v in after["service"].items() if k.endswith("_total")},
        "dead_lettered": after["dead_lettered"],
        "restarts": [w["restarts"] for w in after["workers"]],
        "healthz": health,
        "healthz_body": health_body[:300].decode("utf-8", "replace"),
        "exit_code": code,
        "log_problems": log_problems[:5],
        "tally": dict(sorted(tally.items())),
    }


@pytest.mark.timeout(3600 if SCALE == "long" else 300)
@pytest.mark.parametrize("seed", SEEDS)
def test_protocol_fuzz_loses_no_legitimate_message(
    tmp_path: Path, seed: int, report: dict[str, Any]
) -> None:
    r = run_fuzz(tmp_path, seed)
    report.update(r)
    print(json.dumps({k: v for k, v in r.items() if k != "tally"}))
    t = r["tally"]
    assert r["legit_acked"] >= SIZE["legit"] and r["lost"] == 0, r
    assert r["in_flight"] == 0 and r["healthz"] == 200, r
    assert r["exit_code"] == 0 and r["log_problems"] == [], r
    assert t.get("wrong_answer_count", 0) == 0, t
    assert t.get(f"error_{ERR_INTERNAL}", 0) == 0 and t.get("http_5xx", 0) == 0, t
    assert t.get("bad_pre_auth_welcomed", 0) == 0 and t.get("http_closed", 0) == 0, t
    assert r["restarts"] == [0, 0], r
    assert not [k for k in t if k.startswith("fuzzer_error")], t
    assert t["frames"] > 0 and t.get("mutated", 0) > 0 and t.get("flood_connections", 0) > 0, t
