"""Chaos scenarios 9 and 10 against the real service (``engine serve`` subprocess).

9. SIGTERM under load: binary and HTTP producers keep submitting while the
   service drains; it exits 0 (a drain that timed out would exit 1), every acked
   message was delivered, in order, once, and /dev/shm holds nothing of its pid.
   A second SIGTERM during the drain stops at once (exit 130), also cleanly.
10. Bad input: over 10,000 malformed frames on many connections and 1,000 bad HTTP
   bodies, interleaved with a well-behaved client.  No process crashes or is
   replaced, the service's memory stays bounded, every bad frame gets an error or a
   close and is counted, and the good client loses nothing.

The verdict on deliveries comes from what the handler/inbox recorded (the chaos
checker), never from the engine's own counters.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import psutil

from engine.client import Client
from engine.protocol import HEADER, HEADER_BYTES, Error, Register, Request, Submit, Welcome
from engine.service.http import HttpMessage
from engine.service.server import SAME_STOP_WINDOW_S
from tests.chaos.checker import check, read_inbox
from tests.integration.service_proc import ServiceProc, start_service
from tests.integration.test_service_ingress import (
    RawConn,
    expect_error,
    framed,
    metric,
    scrape,
)
from tests.integration.test_service_lifecycle import (
    FAST_RETRY,
    STOP_WAIT_S,
    Producer,
    engine_pids,
    recording_env,
    segments_of,
    wait_gone,
)

MiB = 1 << 20
_encode = msgspec.msgpack.encode
_http_decoder = msgspec.json.Decoder(HttpMessage | list[HttpMessage])


class HttpProducer(threading.Thread):
    """POSTs arrays of ``[uid, seq]`` messages until stopped or the service goes away;
    a 202 acks the whole array."""

    def __init__(self, svc: ServiceProc, uid_base: int, recipients: int = 4) -> None:
        super().__init__(name="http-producer", daemon=True)
        self.host, _, port = svc.http_url.removeprefix("http://").rpartition(":")
        self.port = int(port)
        self.names = [f"web-{i}" for i in range(recipients)]
        self.uid = uid_base
        self.seqs = [0] * recipients
        self.stop = threading.Event()
        self.sent: dict[int, tuple[str, int]] = {}
        self.acked: dict[int, tuple[str, int]] = {}
        self.statuses: Counter[int | str] = Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = []
            for _ in range(50):
                r = self.uid % len(self.names)
                batch.append((self.uid, self.names[r], self.seqs[r]))
                self.sent[self.uid] = (self.names[r], self.seqs[r])
                self.seqs[r] += 1
                self.uid += 1
            body = json.dumps(
                [{"recipient": name, "payload": [uid, seq]} for uid, name, seq in batch]
            )
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=STOP_WAIT_S)
                conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
                status = conn.getresponse().status
                conn.close()
            except OSError as exc:
                self.statuses[type(exc).__name__] += 1
                return  # the service closed its HTTP port: it is stopping
            self.statuses[status] += 1
            if status != 202:
                return
            self.acked.update((uid, (name, seq)) for uid, name, seq in batch)
            self.stop.wait(0.005)


def verdict(
    inbox: Path, acked: dict[int, tuple[str, int]], sent: dict[int, tuple[str, int]]
) -> dict[str, Any]:
    """The checker's report over acked messages, plus deliveries of messages never sent."""
    deliveries = read_inbox(inbox)
    result = check(acked, [d for d in deliveries if d.uid in acked]).to_dict()
    result["never_sent"] = sum(1 for d in deliveries if sent.get(d.uid) != (d.recipient, d.seq))
    result["delivered_unacked"] = len({d.uid for d in deliveries} - set(acked))
    return result


# -- scenario 9 ------------------------------------------------------------------------
def test_sigterm_under_load_service_drains_loses_nothing_and_cleans_up(
    tmp_path: Path, report: dict[str, Any]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    timeout_s = 30.0
    svc = start_service(tmp_path, ENGINE_SHUTDOWN_TIMEOUT_S=str(timeout_s), **recording_env(inbox))
    clients = [Client(svc.url, max_pending=20_000, **FAST_RETRY) for _ in range(2)]
    producers = [
        Producer(c, recipients=6, prefix=f"tcp{i}", uid_base=i * 10**8)
        for i, c in enumerate(clients)
    ]
    web = HttpProducer(svc, uid_base=9 * 10**8)
    try:
        for p in (*producers, web):
            p.start()
        before = svc.wait_stats(lambda s: s["delivered"] >= 3000 and len(s["workers"]) == 2)
        signalled = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(timeout_s + STOP_WAIT_S)
        drain_s = time.monotonic() - signalled
    finally:
        for p in producers:
            p.finish()
        web.stop.set()
        web.join(STOP_WAIT_S)
        for c in clients:
            c.close(timeout=5)
        svc.stop()
    acked = web.acked.copy()
    sent = web.sent.copy()
    for p in producers:
        acked |= p.acked()
        sent |= p.sent
    result = verdict(inbox, acked, sent)
    stopped = svc.logs("stopped")
    report.update(
        exit_code=code,
        drain_s=round(drain_s, 2),
        shutdown_timeout_s=timeout_s,
        in_flight_at_signal=before["in_flight"],
        submitted_at_signal=before["submitted"],
        acked=len(acked),
        acked_http=len(web.acked),
        http_statuses={str(k): v for k, v in web.statuses.items()},
        stopped=stopped,
        check=result,
        service_segments_left=segments_of(svc.pid),
        engine_processes_left=wait_gone(engine_pids(before)),
    )
    assert code == 0, svc.log_text()
    assert before["in_flight"] > 0 and len(web.acked) > 0
    assert set(web.statuses) - {202}, "the HTTP producer was never refused"  # 503 or closed
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["out_of_order"] == 0
    assert result["never_sent"] == 0 and result["unexpected"] == 0
    assert stopped and stopped[0]["submitted"] == stopped[0]["delivered"]
    assert report["service_segments_left"] == [] and report["engine_processes_left"] == []


def test_second_sigterm_during_the_drain_stops_at_once_and_cleans_up(
    tmp_path: Path, report: dict[str, Any]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    svc = start_service(
        tmp_path,
        ENGINE_SHUTDOWN_TIMEOUT_S="600",
        HANDLER_DELAY_S="0.05",  # 6 recipients x 20/s: the backlog would take minutes
        **recording_env(inbox),
    )
    try:
        with Client(svc.url) as client:
            producer = Producer(client, recipients=6)
            futures = producer.burst(5000)
            client.flush()
        before = svc.wait_stats(lambda s: len(s["workers"]) == 2 and s["delivered"] > 0)
        svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while not svc.logs("SIGTERM: draining, then stopping") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(SAME_STOP_WINDOW_S)  # sooner, it would count as the first one repeated
        signalled = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(STOP_WAIT_S)
        stop_s = time.monotonic() - signalled
    finally:
        svc.stop()
    result = verdict(inbox, {}, producer.sent)
    [stopped] = svc.logs("stopped with unsettled messages (fast stop)")
    report.update(
        exit_code=code,
        fast_stop_s=round(stop_s, 2),
        acked=sum(1 for f in futures if f.result(timeout=0)),
        stopped=stopped,
        delivered_before_stop=result["delivered_unacked"],
        never_sent=result["never_sent"],
        service_segments_left=segments_of(svc.pid),
        engine_processes_left=wait_gone(engine_pids(before)),
    )
    assert code == 130, svc.log_text()
    assert stopped["abandoned"] > 0 and stopped["submitted"] == 5000
    assert result["never_sent"] == 0
    assert report["service_segments_left"] == [] and report["engine_processes_left"] == []


# -- scenario 10 -----------------------------------------------------------------------
N_FRAMES = 10_000
N_HTTP = 1_000
FUZZERS = 4
MAX_FRAME = 1 * MiB
R1 = msgspec.Raw(_encode(1))
VALID = [
    _encode(frame)
    for frame in (Submit(1, [("fz", R1)]), Request(2, "fz", R1, 5.0), Register(5, "fz"))
]


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.randrange(-(1 << 63), 1 << 64)
    if kind == 2:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.randbytes(rng.randrange(12))
    if kind in (5, 6):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {str(rng.randrange(100)): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _bad_body_candidate(rng: random.Random) -> bytes:
    kind = rng.randrange(11)
    if kind == 0:
        return rng.randbytes(rng.randrange(300))
    if kind == 1:
        return _encode(_junk(rng))
    if kind == 2:  # an unknown tag
        return _encode([rng.randrange(7, 1 << 16), rng.randrange(1 << 40), _junk(rng)])
    if kind == 3:  # a known tag with fields of the wrong types
        return _encode([rng.randrange(7), *(_junk(rng) for _ in range(rng.randrange(6)))])
    if kind == 4:  # a valid frame cut short
        body = rng.choice(VALID)
        return body[: rng.randrange(len(body))]
    if kind == 5:  # a valid frame with bytes flipped
        mutated = bytearray(rng.choice(VALID))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return bytes(mutated)
    if kind == 6:  # deep nesting, as the frame or as a payload (never near the limit: see
        # test_payloads_nested_near_the_decoder_limit_do_not_crash_workers, a known bug)
        depth = rng.randrange(2000, 60_000)
        if rng.random() < 0.5:
            return _nested(depth)
        return _encode([1, 3, [["fz", msgspec.Raw(_nested(depth))]]])
    if kind == 7:  # container headers announcing 4 G items or bytes
        head = rng.choice([b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xda", b"\xdb", b"\xc6", b"\xc9"])
        return b"\x94\x01\x09" + head + b"\xff\xff\xff\xff" + rng.randbytes(rng.randrange(8))
    if kind == 8:  # a recipient that is not UTF-8
        return b"\x93\x05\x01\xa2" + bytes([0x80 | rng.randrange(64), rng.randrange(256)])
    if kind == 9:  # large garbage, below the frame limit: read and refused whole
        return b"\xc1" + rng.randbytes(rng.randrange(64 * 1024, 512 * 1024))
    return _encode([0, rng.randrange(1 << 30), "t"])  # a second Hello


def bad_body(rng: random.Random) -> bytes:
    """A body the protocol decoder refuses (checked here, so none of them delivers)."""
    while True:
        body = _bad_body_candidate(rng)
        if expect_error(body):
            return body


def terminal(rng: random.Random) -> bytes:
    """A stream ending the service must close on: too large a header, or a truncation."""
    kind = rng.randrange(3)
    if kind == 0:
        return HEADER.pack(rng.randrange(MAX_FRAME + 1, 1 << 32))
    if kind == 1:
        n = rng.randrange(1, 5000)
        return HEADER.pack(n) + rng.randbytes(rng.randrange(n))
    return rng.randbytes(rng.randrange(1, HEADER_BYTES))


def binary_fuzzer(url: str, seed: int, frames: int, tally: Counter[str]) -> None:
    """Send ``frames`` bad frames in pipelined chunks over a series of connections, each
    ended by a terminal violation; tally every answer."""
    rng = random.Random(seed)
    sent = 0
    while sent < frames:
        with RawConn(url) as conn:
            if not isinstance(conn.hello(token=""), Welcome):
                tally["no_welcome"] += 1
                return
            for _ in range(rng.randrange(1, 6)):
                chunk = [bad_body(rng) for _ in range(min(40, frames - sent))]
                conn.send(b"".join(framed(b) for b in chunk))
                answers = conn.read(len(chunk))
                sent += len(chunk)
                tally["frames"] += len(chunk)
                tally["bad_frame_errors"] += sum(
                    isinstance(a, Error) and a.code == "bad_frame" and bool(a.reason)
                    for a in answers
                )
                if sent >= frames:
                    break
            if sent >= frames:
                return
            conn.send(terminal(rng))
            conn.end_writing()
            answers = conn.read_to_eof()
            sent += 1
            tally["frames"] += 1
            tally["terminal"] += 1
            tally["terminal_errors"] += sum(isinstance(a, Error) for a in answers)
            tally["terminal_extra_answers"] += max(0, len(answers) - 1)


def bad_http_body(rng: random.Random) -> tuple[bytes, bool]:
    """A POST /v1/messages body the service must refuse with 400, or 413 when the flag
    (oversized) is set."""
    while True:
        kind = rng.randrange(10)
        if kind == 0:
            body = rng.randbytes(rng.randrange(300))
        elif kind == 1:
            body = json.dumps(_junk(rng), default=repr).encode()
        elif kind == 2:
            body = json.dumps({"recipient": "web", f"x{rng.randrange(99)}": 1}).encode()
        elif kind == 3:
            field = rng.choice(["recipient", "ttl", "tags", "metadata", "sender", "kind"])
            body = json.dumps({"recipient": "web", field: [rng.random()]}).encode()
        elif kind == 4:
            prio = rng.choice(["urgent", 99, -1, "", 4.5])
            return json.dumps({"recipient": "web", "priority": prio}).encode(), False
        elif kind == 5:
            depth = rng.randrange(2000, 50_000)
            body = b'{"recipient": "web", "payload": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind == 6:
            body = b'{"recipient": "w' + bytes([0x80 | rng.randrange(64)]) + b'"}'
        elif kind == 7:
            whole = json.dumps([{"recipient": "web", "payload": list(range(20))}]).encode()
            body = whole[: rng.randrange(len(whole))]
        elif kind == 8:
            return rng.choice([b'{"recipient": ""}', b'{"recipient": "web", "ttl": -3}']), False
        else:
            return b'{"recipient": "web", "payload": "' + b"x" * (MAX_FRAME + 10) + b'"}', True
        try:
            _http_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
            return body, False


def http_fuzzer(svc: ServiceProc, seed: int, n: int, tally: Counter[str]) -> None:
    rng = random.Random(seed)
    host, _, port = svc.http_url.removeprefix("http://").rpartition(":")
    for _ in range(n):
        body, oversized = bad_http_body(rng)
        tally["http_oversized"] += oversized
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            tally[f"http_{resp.status}"] += 1
        except OSError:  # a 413 may come, and the connection close, mid-body
            tally["http_closed_oversized" if oversized else "http_closed"] += 1
        finally:
            conn.close()


def test_bad_input_fuzz_crashes_nothing_and_a_good_client_loses_nothing(
    tmp_path: Path, report: dict[str, Any]
) -> None:
    inbox = tmp_path / "inbox"
    svc = start_service(
        tmp_path,
        ENGINE_SINK="inbox",
        ENGINE_INBOX_DIR=str(inbox),
        ENGINE_WORKERS="2",
        ENGINE_MAX_FRAME_BYTES=str(MAX_FRAME),
    )
    tally: Counter[str] = Counter()
    try:
        before = svc.wait_stats(lambda s: len(s["workers"]) == 2)
        service = psutil.Process(svc.pid)
        metrics_before = scrape(svc, token=None)
        rss_before = service.memory_info().rss
        rss_peak = rss_before
        with Client(svc.url, max_pending=20_000) as client:
            good = Producer(client, recipients=8, chunk=100, pause_s=0.01, prefix="good")
            good.start()
            share = N_FRAMES // FUZZERS
            workers = [
                threading.Thread(target=binary_fuzzer, args=(svc.url, seed, share, tally))
                for seed in range(FUZZERS)
            ]
            workers.append(threading.Thread(target=http_fuzzer, args=(svc, 99, N_HTTP, tally)))
            started = time.monotonic()
            for t in workers:
                t.start()
            while any(t.is_alive() for t in workers):
                rss_peak = max(rss_peak, service.memory_info().rss)
                time.sleep(0.1)
            fuzz_s = time.monotonic() - started
            good.finish()
        after = svc.wait_stats(lambda s: s["in_flight"] == 0)
        rss_after = service.memory_info().rss
        metrics_after = scrape(svc, token=None)
        alive = svc.proc.poll() is None
        code = svc.stop()
    finally:
        svc.stop()
    result = verdict(inbox, good.acked(), good.sent)
    bad_delta = metric(metrics_after, "engine_bad_frames_total") - metric(
        metrics_before, "engine_bad_frames_total"
    )
    http_bad = (
        after["service"]["http_bad_requests_total"] - before["service"]["http_bad_requests_total"]
    )
    report.update(
        fuzz_s=round(fuzz_s, 2),
        tally=dict(tally),
        engine_bad_frames_total_delta=bad_delta,
        http_bad_requests_delta=http_bad,
        rss_mib={
            "before": round(rss_before / MiB, 1),
            "peak": round(rss_peak / MiB, 1),
            "after": round(rss_after / MiB, 1),
        },
        pids_before=engine_pids(before),
        pids_after=engine_pids(after),
        restarts=[w["restarts"] for w in after["workers"]],
        monitor_restarts=after["monitor"]["restarts"],
        good_acked=len(good.acked()),
        check=result,
        exit_code=code,
    )
    answered = ("http_400", "http_413", "http_closed_oversized", "http_closed")
    assert tally["frames"] >= N_FRAMES and sum(tally[k] for k in answered) == N_HTTP
    assert tally["bad_frame_errors"] == tally["frames"] - tally["terminal"], tally
    assert tally["terminal_extra_answers"] == 0 and tally["no_welcome"] == 0
    assert bad_delta == tally["frames"]  # each malformed frame counted once
    assert (
        not set(k for k in tally if k.startswith("http_")) - set(answered[:3]) - {"http_oversized"}
    ), tally  # no 5xx, no 202, no connection cut on a small body
    assert tally["http_413"] + tally["http_closed_oversized"] == tally["http_oversized"] > 0
    assert http_bad == N_HTTP
    assert alive and code == 0, svc.log_text()
    assert engine_pids(after) == engine_pids(before)
    assert report["restarts"] == [0, 0] and after["monitor"]["restarts"] == 0
    assert rss_after - rss_before < 100 * MiB and rss_peak - rss_before < 200 * MiB
    assert len(good.acked()) > 0
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["out_of_order"] == 0
    assert result["never_sent"] == 0 and result["delivered_unacked"] == 0
