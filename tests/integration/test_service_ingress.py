"""The binary ingress of the real service (`engine serve` subprocess, raw sockets).

Handshake and auth, pipelining, named kinds of bad frames, a hypothesis fuzz run
of thousands of malformed frames (each gets an ``Error`` with a reason or a closed
connection, each is counted, and a well-behaved client keeps working meanwhile),
frames above ENGINE_MAX_FRAME_BYTES refused before their body is read, and the
ENGINE_MAX_CONNECTIONS bound.  The raw-protocol and HTTP helpers here are shared
by the other service test modules.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from engine.client import Client
from engine.protocol import (
    HEADER,
    HEADER_BYTES,
    Ack,
    Broadcast,
    ClientFrame,
    Error,
    Hello,
    Publish,
    Register,
    Request,
    ServerFrame,
    Submit,
    Subscribe,
    Welcome,
    client_decoder,
    encode_frame,
    frame_length,
    server_decoder,
)
from tests.integration.service_proc import ServiceProc, running_service

TOKEN = "ingress-secret"
MAX_FRAME = 65536
MAX_CONNECTIONS = 6
_encode = msgspec.msgpack.encode


# -- helpers shared by the service test modules -------------------------------------------
class RawConn:
    """One raw protocol connection: write bytes, read the server's frames until EOF."""

    def __init__(self, url: str, timeout: float = 20.0) -> None:
        if url.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(url.removeprefix("unix://"))
        else:
            host, _, port = url.removeprefix("tcp://").rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: ClientFrame) -> None:
        self.send(encode_frame(frame))

    def end_writing(self) -> None:
        """Half-close: the server sees the end of the stream."""
        self.sock.shutdown(socket.SHUT_WR)

    def hello(self, token: str = TOKEN) -> ServerFrame:
        self.send_frame(Hello(token=token, client="raw-test"))
        [answer] = self.read(1)
        return answer

    def read(self, n: int) -> list[ServerFrame]:
        """The next ``n`` frames; fewer only when the server closed the connection."""
        out: list[ServerFrame] = []
        while len(out) < n:
            frame = self._next()
            if frame is None:
                break
            out.append(frame)
        return out

    def read_to_eof(self) -> list[ServerFrame]:
        """Every frame until the server closes (a socket timeout fails the test)."""
        out: list[ServerFrame] = []
        while (frame := self._next()) is not None:
            out.append(frame)
        return out

    def _next(self) -> ServerFrame | None:
        while True:
            if len(self.buf) >= HEADER_BYTES:
                n = frame_length(bytes(self.buf[:HEADER_BYTES]))
                if len(self.buf) >= HEADER_BYTES + n:
                    body = bytes(self.buf[HEADER_BYTES : HEADER_BYTES + n])
                    del self.buf[: HEADER_BYTES + n]
                    frame: ServerFrame = server_decoder.decode(body)
                    return frame
            if self.eof:
                assert not self.buf, f"the server closed mid-frame: {bytes(self.buf)!r}"
                return None
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk


def framed(body: bytes) -> bytes:
    """``body`` behind its 4-byte length header."""
    return HEADER.pack(len(body)) + body


def http(
    svc: ServiceProc,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request to the service: (status, body); errors are answers too.

    A POST says ``Content-Type: application/json`` unless ``headers`` name another.
    """
    req = urllib.request.Request(svc.http_url + path, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        req.add_header("Content-Type", "application/json")  # headers below may replace it
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(svc: ServiceProc, path: str, token: str | None = TOKEN) -> Any:
    status, body = http(svc, "GET", path, token=token)
    assert status == 200, (status, body)
    return msgspec.json.decode(body)


def wait_for(
    svc: ServiceProc,
    done: Callable[[dict[str, Any]], bool],
    token: str | None = TOKEN,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Poll /stats (with the token) until ``done(stats)``; AssertionError with the last."""
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = get_json(svc, "/stats", token)
    while not done(stats):
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never matched within {timeout}s: {stats}")
        time.sleep(0.05)
        stats = get_json(svc, "/stats", token)
    return stats


def scrape(svc: ServiceProc, token: str | None = TOKEN) -> dict[tuple[str, Any], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    status, body = http(svc, "GET", "/metrics", token=token)
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def metric(samples: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- the service under test ----------------------------------------------------------------
@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    """One service for the module: null sink, a token, small frames, few connections."""
    tmp = tmp_path_factory.mktemp("ingress")
    with running_service(
        tmp,
        ENGINE_SOCKET=str(tmp / "ingress.sock"),
        ENGINE_SINK="null",
        ENGINE_WORKERS="2",
        ENGINE_AUTH_TOKEN=TOKEN,
        ENGINE_MAX_FRAME_BYTES=str(MAX_FRAME),
        ENGINE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()
    assert not (tmp / "ingress.sock").exists()  # removed at exit


def no_connections(svc: ServiceProc) -> dict[str, Any]:
    """Wait until the service has seen every earlier connection close."""
    return wait_for(svc, lambda s: s["service"]["connections_active"] == 0)


@pytest.fixture(autouse=True)
def _fresh_slots(svc: ServiceProc) -> None:
    """Every test starts with the earlier tests' connections closed on the server side
    too (closing is asynchronous there), so the connection limit never trips by chance."""
    no_connections(svc)


R1 = msgspec.Raw(_encode(1))


def test_hello_welcome_and_pipelined_submits(svc: ServiceProc) -> None:
    with RawConn(svc.url) as conn:
        assert conn.hello() == Welcome(1, "ringway", MAX_FRAME)
        conn.send(
            b"".join(encode_frame(Submit(seq, [(f"r{seq % 3}", R1)])) for seq in range(1, 51))
        )
        acks = conn.read(50)
    assert [type(a) for a in acks] == [Ack] * 50
    assert [a.seq for a in acks if isinstance(a, Ack)] == list(range(1, 51))  # in order
    ids = [i for a in acks if isinstance(a, Ack) for i in a.ids]
    assert len(set(ids)) == 50


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (Hello(token=""), "auth: a token is required"),
        (Hello(token="guess"), "auth: the token is wrong"),
        (Hello(version=99, token=TOKEN), "bad_frame: protocol version 99 is not supported"),
        (Submit(1, [("r", R1)]), "bad_frame: the first frame must be Hello"),
    ],
)
def test_a_bad_handshake_gets_an_error_and_the_connection_closes(
    svc: ServiceProc, hello: ClientFrame, reason: str
) -> None:
    before = scrape(svc)
    with RawConn(svc.url) as conn:
        conn.send_frame(hello)
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert f"{answers[0].code}: {answers[0].reason}".startswith(reason)
    after = scrape(svc)
    auth = reason.startswith("auth")
    delta = metric(after, "engine_auth_failures_total") - metric(
        before, "engine_auth_failures_total"
    )
    assert delta == (1 if auth else 0)
    bad = metric(after, "engine_bad_frames_total") - metric(before, "engine_bad_frames_total")
    assert bad == (0 if auth else 1)


def test_metrics_and_stats_show_the_messages_held_for_a_retry(svc: ServiceProc) -> None:
    """``engine_deferred_messages``: held out of the rings for a long retry (none here)."""
    samples = scrape(svc)
    stats = get_json(svc, "/stats", TOKEN)
    assert metric(samples, "engine_deferred_messages") == stats["deferred"] == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc1 not msgpack", "invalid opcode"),
        (b"", "truncated"),
        (_encode({"seq": 1}), "Expected `array`, got `object`"),
        (_encode([99, 1]), "Invalid value 99"),  # unknown tag
        (_encode(["submit", 1]), "Expected `int`, got `str`"),  # a tag of the wrong type
        (_encode([1, "one", []]), "Expected `int`, got `str`"),  # wrong field type
        (_encode([1, 2, [["r", 1]], [], "yes"]), "Expected `bool`, got `str`"),
        (_encode([1, 2]), "at least length 3"),
        (b"\x91" * 50_000 + b"\xc0", "Expected `int`, got `array`"),  # deep nesting
        (_encode([1, 2, [["r", msgspec.Raw(b"\x91" * 50_000 + b"\xc0")]]]), "recursion"),
        (b"\x94\x01\x02\xdd\xff\xff\xff\xff", "truncated"),  # an array claiming 4 G items
        (b"\x93\x01\x02\xdb\xff\xff\xff\xff", "truncated"),  # a 4 GB string in 8 bytes
        (b"\x93\x05\x01\xa2\x80z", "undecodable frame"),  # a recipient that is not UTF-8
        (b"\x93\x00\x01\xa1\xff", "undecodable frame"),  # a Hello token, ditto
        (encode_frame(Hello(token=TOKEN))[HEADER_BYTES:], "Hello may only be the first"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_frame_gets_an_error_with_the_reason_and_the_connection_goes_on(
    svc: ServiceProc, body: bytes, reason: str
) -> None:
    with RawConn(svc.url) as conn:
        assert isinstance(conn.hello(), Welcome)
        conn.send(framed(body) + encode_frame(Submit(7, [("r", R1)])))
        error, ack = conn.read(2)
    assert isinstance(error, Error) and error.code == "bad_frame", error
    assert reason in error.reason
    assert isinstance(ack, Ack) and ack.seq == 7 and len(ack.ids) == 1


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 1 << 31, (1 << 32) - 1])
def test_a_frame_above_the_limit_is_refused_before_its_body_is_read(
    svc: ServiceProc, length: int
) -> None:
    """Only the header is sent: the answer comes without the server waiting for a body."""
    with RawConn(svc.url) as conn:
        assert isinstance(conn.hello(), Welcome)
        conn.send(HEADER.pack(length))
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert answers[0].code == "too_large"
    assert f"{length:,} bytes exceeds ENGINE_MAX_FRAME_BYTES={MAX_FRAME:,}" in answers[0].reason


@pytest.mark.parametrize(
    ("tail", "reason"),
    [(b"\x00\x00", "truncated frame header"), (HEADER.pack(500) + b"x" * 10, "header said 500")],
)
def test_a_truncated_stream_gets_an_error_and_a_close(
    svc: ServiceProc, tail: bytes, reason: str
) -> None:
    with RawConn(svc.url) as conn:
        assert isinstance(conn.hello(), Welcome)
        conn.send(tail)
        conn.end_writing()
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert reason in answers[0].reason


def test_a_stalled_half_frame_does_not_hold_up_other_clients(svc: ServiceProc) -> None:
    with RawConn(svc.url) as stuck, Client(svc.url, token=TOKEN) as client:
        assert isinstance(stuck.hello(), Welcome)
        stuck.send(HEADER.pack(MAX_FRAME) + b"only the start")
        assert len(client.submit_many([(f"other-{i}", i) for i in range(100)])) == 100
        assert client.request("other-x", 1, timeout=30) is None  # the null sink answers None


# -- fuzzing -------------------------------------------------------------------------------
VALID_BODIES = [
    encode_frame(f)[HEADER_BYTES:]
    for f in (
        Submit(1, [("fz", R1)]),
        Request(2, "fz", R1, 5.0),
        Publish(3, "fz-topic", R1),
        Subscribe(4, "fz-topic", "fz"),
        Register(5, "fz"),
        Broadcast(6, R1),
    )
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(VALID_BODIES)))
    for _ in range(draw(st.integers(1, 3))):
        body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return bytes(body)


@st.composite
def _truncated(draw: st.DrawFn) -> bytes:
    body = draw(st.sampled_from(VALID_BODIES))
    return body[: draw(st.integers(0, len(body) - 1))]


_LYING = [b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xda", b"\xdb", b"\xc5", b"\xc6", b"\xc9", b"\xd9"]
bad_bodies = st.one_of(
    st.binary(max_size=200),  # random bytes
    _values.map(_encode),  # any msgpack value: wrong shapes and types
    st.tuples(st.integers(-3, 300), st.lists(_values, max_size=6)).map(
        lambda t: _encode([t[0], *t[1]])  # a tag (often unknown) and junk fields
    ),
    _mutated(),
    _truncated(),
    st.integers(1, 30_000).map(_nested),
    # Payload nesting at any depth, the decoder's limit (~900-1000) included.
    st.integers(1, 30_000).map(lambda d: _encode([1, 9, [["fz", msgspec.Raw(_nested(d))]]])),
    st.tuples(st.sampled_from(_LYING), st.binary(max_size=8)).map(
        lambda t: b"\x94\x01\x09" + t[0] + b"\xff\xff\xff\xff" + t[1]  # huge container headers
    ),
)
TERMINAL = [None, "too_large", "truncated_body", "truncated_header"]


def expect_error(body: bytes) -> bool:
    """Whether the server must answer ``body`` with a bad_frame Error (else any one answer)."""
    try:
        frame = client_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return True
    return isinstance(frame, Hello)


def fuzz_connection(
    url: str, bodies: list[bytes], terminal: str | None, length: int, tally: Counter[str]
) -> None:
    """Send ``bodies`` (in chunks, reading each chunk's answers), then a valid Submit,
    then the ``terminal`` violation; check every answer."""
    with RawConn(url) as conn:
        assert isinstance(conn.hello(), Welcome)
        for start in range(0, len(bodies), 64):
            chunk = bodies[start : start + 64]
            conn.send(b"".join(framed(b) for b in chunk))
            answers = conn.read(len(chunk))
            assert len(answers) == len(chunk), "the server closed on a complete frame"
            for body, answer in zip(chunk, answers, strict=True):
                assert isinstance(answer, ServerFrame), answer
                if expect_error(body):
                    assert isinstance(answer, Error) and answer.code == "bad_frame", answer
                # Nesting near the limit may decode here and not in the service (other
                # recursion limits): the service's answer decides what it counted.
                if isinstance(answer, Error) and answer.code == "bad_frame":
                    tally["bad"] += 1
                    assert answer.reason
                else:
                    tally["valid"] += 1
        conn.send_frame(Submit(1 << 40, [("fz", R1)]))
        [ack] = conn.read(1)
        assert isinstance(ack, Ack) and ack.seq == 1 << 40
        if terminal is None:
            return
        if terminal == "too_large":
            conn.send(HEADER.pack(MAX_FRAME + 1 + length % ((1 << 32) - MAX_FRAME - 1)))
        elif terminal == "truncated_body":
            conn.send(HEADER.pack(1 + length % 1000) + b"\x93" * (length % (1 + length % 1000)))
            conn.end_writing()
        else:
            conn.send(HEADER.pack(length)[: 1 + length % 3])
            conn.end_writing()
        answers = conn.read_to_eof()
        assert len(answers) <= 1, answers
        tally["bad"] += 1
        if answers:
            assert isinstance(answers[0], Error), answers
            assert answers[0].code == ("too_large" if terminal == "too_large" else "bad_frame")
            assert answers[0].reason


def test_fuzzed_frames_each_get_an_error_or_a_close_and_good_clients_keep_working(
    svc: ServiceProc,
) -> None:
    """Thousands of malformed frames on fresh connections, while a well-behaved client
    submits on its own connection the whole time; every bad frame is counted."""
    before = scrape(svc)
    tally: Counter[str] = Counter()
    stop = threading.Event()
    acked: list[Future[int]] = []

    def well_behaved(client: Client) -> None:
        i = 0
        while not stop.is_set():
            acked.extend(client.submit(f"good-{j % 5}", j) for j in range(i, i + 20))
            i += 20
            stop.wait(0.01)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(
        bodies=st.lists(bad_bodies, min_size=10, max_size=60),
        terminal=st.sampled_from(TERMINAL),
        length=st.integers(0, (1 << 32) - 1),
    )
    def fuzz(bodies: list[bytes], terminal: str | None, length: int) -> None:
        tally["connections"] += 1
        fuzz_connection(svc.url, bodies, terminal, length, tally)

    with Client(svc.url, token=TOKEN) as client:
        producer = threading.Thread(target=well_behaved, args=(client,))
        producer.start()
        try:
            fuzz()
        finally:
            stop.set()
            producer.join()
        client.flush()
        assert client.request("after-fuzz", {"ok": 1}, timeout=30) is None
    ids = [f.result(timeout=0) for f in acked]
    assert len(set(ids)) == len(ids) > 0
    assert tally["bad"] >= 2000, tally
    stats = wait_for(svc, lambda s: s["in_flight"] == 0)
    assert stats["submitted"] == stats["delivered"] + stats["dead_lettered"] + stats["expired"]
    assert all(w["alive"] and w["restarts"] == 0 for w in stats["workers"])
    after = scrape(svc)
    bad = metric(after, "engine_bad_frames_total") - metric(before, "engine_bad_frames_total")
    assert bad == tally["bad"]
    errors = metric(after, "engine_errors_total") - metric(before, "engine_errors_total")
    assert errors >= tally["bad"]


def test_payloads_nested_near_the_decoder_limit_do_not_crash_workers(tmp_path: Path) -> None:
    """Depths 900..1000 over TCP and HTTP: each is refused or delivered, and a message
    to another recipient of the same (only) worker is still delivered."""
    with running_service(
        tmp_path, ENGINE_SINK="null", ENGINE_WORKERS="1", ENGINE_SHUTDOWN_TIMEOUT_S="2"
    ) as victim:
        depths = range(900, 1001, 5)
        with RawConn(victim.url) as conn:
            assert isinstance(conn.hello(token=""), Welcome)
            conn.send(
                b"".join(
                    encode_frame(Submit(d, [("victim", msgspec.Raw(_nested(d)))])) for d in depths
                )
            )
            assert len(conn.read(len(depths))) == len(depths)
            conn.send_frame(Submit(1, [("bystander", R1)]))
            assert isinstance(conn.read(1)[0], Ack)
        for d in depths:
            body = b'{"recipient": "victim", "payload": ' + b"[" * d + b"]" * d + b"}"
            assert http(victim, "POST", "/v1/messages", body, token=None)[0] in (202, 400)
        stats = victim.wait_stats(
            lambda s: s["in_flight"] == 0 or any(w["restarts"] for w in s["workers"]), timeout=30
        )
        assert [w["restarts"] for w in stats["workers"]] == [0]
        assert stats["in_flight"] == 0


# -- connection bound ----------------------------------------------------------------------
def test_connection_beyond_the_limit_gets_busy_and_a_freed_slot_is_reused(
    svc: ServiceProc,
) -> None:
    before = scrape(svc)
    conns = [RawConn(svc.url) for _ in range(MAX_CONNECTIONS)]
    try:
        for conn in conns:
            assert isinstance(conn.hello(), Welcome)
        with RawConn(svc.url) as extra:
            answers = extra.read_to_eof()
        assert len(answers) == 1 and isinstance(answers[0], Error), answers
        assert answers[0].code == "busy"
        assert f"ENGINE_MAX_CONNECTIONS={MAX_CONNECTIONS}" in answers[0].reason
        conns.pop().close()
        wait_for(svc, lambda s: s["service"]["connections_active"] == MAX_CONNECTIONS - 1)
        with RawConn(svc.url) as again:
            assert isinstance(again.hello(), Welcome)
    finally:
        for conn in conns:
            conn.close()
    after = scrape(svc)
    rejected = metric(after, "engine_connections_rejected_total")
    assert rejected - metric(before, "engine_connections_rejected_total") == 1


def test_unix_socket_speaks_the_same_protocol(svc: ServiceProc) -> None:
    with RawConn(f"unix://{svc.socket}") as conn:
        assert isinstance(conn.hello(), Welcome)
        conn.send(framed(b"\xc1") + encode_frame(Submit(3, [("u", R1)])))
        error, ack = conn.read(2)
    assert isinstance(error, Error) and error.code == "bad_frame"
    assert isinstance(ack, Ack) and ack.seq == 3
