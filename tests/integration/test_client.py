"""The service client (`engine.client`): against a scripted protocol peer and the real service.

The first half runs the client against `FakeService`, a small asyncio server in
a thread that speaks `engine.protocol` and can be told to drop a connection,
refuse a frame or hold its answers: the edges (reconnect, re-send, give-up,
typed errors, batching, bounds) are checked exactly.  The second half starts
the real ``engine serve`` as a subprocess (`service_proc`) and checks the
behaviour end to end: 100,000 messages delivered, request/response, typed
errors with the service's reasons, auth, ``settled`` acks and a service
restart under load without losing an acked message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import AsyncClient, Client, error_from_code, parse_url
from engine.errors import (
    AuthenticationError,
    ConnectionLost,
    EngineClosed,
    RequestFailed,
    RequestTimeout,
    ServiceError,
)
from engine.protocol import (
    Ack,
    Broadcast,
    ClientFrame,
    Error,
    Hello,
    Publish,
    Register,
    Request,
    Response,
    ServerFrame,
    Submit,
    Subscribe,
    Welcome,
    client_decoder,
    encode_frame,
    frame_length,
)
from tests.integration.service_proc import ServiceProc, free_port, running_service, start_service

HANDLER = "tests.integration.handlers_service:route"
FAST_RETRY: dict[str, Any] = {"reconnect_backoff_s": 0.01, "reconnect_max_s": 0.05}

# A policy sees (connection number from 0, frame) and returns None (answer normally),
# "drop" (cut the connection without answering) or the frame to answer with.
Policy = Callable[[int, ClientFrame], "ServerFrame | str | None"]


class FakeService:
    """A protocol peer on its own loop thread: records frames, answers, drops on cue."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        token: str = "",
        delay_s: float = 0.0,
        unix_path: str = "",
        max_frame: int = 16 << 20,
    ) -> None:
        self.policy = policy or (lambda conn, frame: None)
        self.token = token
        self.delay_s = delay_s
        self.unix_path = unix_path
        self.max_frame = max_frame
        self.sizes: list[int] = []  # body bytes of every frame
        self.frames: list[tuple[int, ClientFrame]] = []  # (connection, frame), Hello included
        self.items: list[tuple[str, Any]] = []  # every submitted (recipient, payload)
        self.connections = 0
        self.unanswered = 0
        self.max_unanswered = 0
        self.next_id = 1
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.url = ""
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> FakeService:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    async def _listen(self) -> None:
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self._conn, self.unix_path)
            self.url = f"unix://{self.unix_path}"
        else:
            self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            self.url = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        async def shut() -> None:
            assert self.server is not None
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def submits(self) -> list[Submit]:
        return [f for _, f in self.frames if isinstance(f, Submit)]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = self.connections
        self.connections += 1
        answers: asyncio.Queue[tuple[float, ServerFrame]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(writer, answers))
        try:
            while True:
                header = await reader.readexactly(4)
                self.sizes.append(frame_length(header))
                frame = client_decoder.decode(await reader.readexactly(frame_length(header)))
                self.frames.append((conn, frame))
                if isinstance(frame, Hello):
                    if self.token and frame.token != self.token:
                        writer.write(encode_frame(Error(0, "auth", "the token is wrong")))
                        await writer.drain()
                        return
                    writer.write(encode_frame(Welcome(1, "fake", self.max_frame)))
                    continue
                decision = self.policy(conn, frame)
                if decision == "drop":
                    return
                answer = decision if not isinstance(decision, str) else None
                self.unanswered += 1
                self.max_unanswered = max(self.max_unanswered, self.unanswered)
                due = self.loop.time() + self.delay_s
                await answers.put((due, answer or self._answer(frame)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sender.cancel()
            writer.close()
            self.tasks.discard(task)

    async def _send(
        self, writer: asyncio.StreamWriter, answers: asyncio.Queue[tuple[float, ServerFrame]]
    ) -> None:
        while True:
            due, answer = await answers.get()
            await asyncio.sleep(max(0.0, due - self.loop.time()))
            self.unanswered -= 1
            writer.write(encode_frame(answer))
            await writer.drain()

    def _ids(self, n: int) -> list[int]:
        first, self.next_id = self.next_id, self.next_id + n
        return list(range(first, first + n))

    def _answer(self, frame: ClientFrame) -> ServerFrame:
        if isinstance(frame, Submit):
            if frame.options.priority not in ("normal", "high", "low", "critical", 0, 1, 2, 3):
                return Error(
                    frame.seq, "bad_request", f"invalid priority {frame.options.priority!r}"
                )
            self.items += [(r, msgspec.msgpack.decode(p)) for r, p in frame.items]
            return Ack(frame.seq, self._ids(len(frame.items)))
        if isinstance(frame, Request):
            if frame.recipient == "reject":
                return Error(frame.seq, "handler_error", "rejected: no thanks")
            if frame.recipient == "slow":
                return Error(frame.seq, "timeout", f"no reply within {frame.timeout_s}s")
            return Response(frame.seq, frame.payload)
        if isinstance(frame, Publish | Broadcast):
            return Ack(frame.seq, self._ids(2))
        if isinstance(frame, Subscribe | Register):
            return Ack(frame.seq)
        raise AssertionError(f"unexpected frame {frame!r}")


@contextmanager
def fake_service(policy: Policy | None = None, **kw: Any) -> Iterator[FakeService]:
    fake = FakeService(policy, **kw).start()
    try:
        yield fake
    finally:
        fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- parsing and mapping ---------------------------------------------------------------------
def test_urls_parse_and_a_bad_one_is_named() -> None:
    assert parse_url("tcp://127.0.0.1:7878") == ("tcp", "127.0.0.1", 7878)
    assert parse_url("tcp://localhost") == ("tcp", "localhost", 7878)
    assert parse_url("tcp://[::1]:9") == ("tcp", "::1", 9)
    assert parse_url("unix:///run/ringway.sock") == ("unix", "/run/ringway.sock", 0)
    for bad in ("127.0.0.1:7878", "http://x:1", "tcp://x:99999", "unix://relative", "tcp://"):
        with pytest.raises(ValueError, match=f"bad service URL {bad!r}"):
            AsyncClient(bad)


def test_error_codes_map_to_typed_exceptions_keeping_the_reason() -> None:
    cases = {
        "auth": AuthenticationError,
        "timeout": RequestTimeout,
        "handler_error": RequestFailed,
        "closed": EngineClosed,
        "bad_request": ServiceError,
        "something_new": ServiceError,
    }
    for code, cls in cases.items():
        exc = error_from_code(code, f"because {code}")
        assert type(exc) is cls and f"because {code}" in str(exc)
    err = error_from_code("bad_request", "why")
    assert isinstance(err, ServiceError) and (err.code, err.reason) == ("bad_request", "why")


# -- against the scripted peer ---------------------------------------------------------------
def test_concurrent_submits_are_coalesced_into_few_frames_with_ids_in_order() -> None:
    async def go(url: str) -> list[int]:
        async with AsyncClient(url, batch_size=500) as c:
            return list(await asyncio.gather(*(c.submit(f"r{i % 7}", i) for i in range(2000))))

    with fake_service() as fake:
        ids = run(go(fake.url))
        assert ids == list(range(1, 2001))
        assert [p for _, p in fake.items] == list(range(2000))
        assert len(fake.submits()) == 4  # 2000 submits made in one loop turn: 4 full frames


def test_options_are_checked_before_anything_is_sent() -> None:
    async def go(url: str) -> None:
        async with AsyncClient(url) as c:
            with pytest.raises(TypeError, match="unknown option 'prio'"):
                await c.submit("a", 1, prio="high")
            with pytest.raises(TypeError, match="unknown option 'colour'"):
                c.send("a", 1, colour="red")
            with pytest.raises(TypeError, match="option tags"):
                await c.submit_many([("a", 1)], tags="urgent")
            with pytest.raises(TypeError, match="option ttl"):
                await c.publish("t", 1, ttl="5")
            with pytest.raises(TypeError, match="option metadata"):
                await c.request("a", 1, metadata={"k": 1})
            with pytest.raises(ValueError, match="recipient must be a non-empty string"):
                await c.submit("", 1)
            with pytest.raises(ValueError, match="timeout must be"):
                await c.request("a", 1, timeout=0)
            with pytest.raises(ValueError, match="not valid msgpack"):
                await c.submit("a", msgspec.Raw(b"\xc1"))

    with fake_service() as fake:
        run(go(fake.url))
        assert [type(f) for _, f in fake.frames] == [Hello]


def test_options_travel_in_the_frame_and_equal_options_share_a_batch() -> None:
    async def go(url: str) -> None:
        async with AsyncClient(url) as c:
            futs = [c.send("a", i, priority="high", ttl=5, tags=["x"]) for i in range(3)]
            futs += [c.send("a", 9, metadata={"k": "v"}, settled=True)]
            await c.flush()
            assert [f.result() for f in futs] == [1, 2, 3, 4]

    with fake_service() as fake:
        run(go(fake.url))
        first, second = fake.submits()
        assert (first.options.priority, first.options.ttl_s, first.options.tags) == (
            "high",
            5.0,
            ("x",),
        )
        assert len(first.items) == 3 and not first.settled
        assert second.options.metadata == {"k": "v"} and second.settled


def test_frames_respect_the_services_max_frame_bytes() -> None:
    async def go(url: str) -> None:
        async with AsyncClient(url) as c:
            ids = await c.submit_many((f"r{i}", "x" * 200) for i in range(100))
            assert ids == list(range(1, 101))
            futs = [c.send(f"s{i}", "y" * 300) for i in range(50)]
            await c.flush()
            assert [f.result() for f in futs] == list(range(101, 151))
            with pytest.raises(ServiceError, match="too_large: a message of about"):
                await c.submit("big", "z" * 5000)
            with pytest.raises(ServiceError, match=r"too_large: .* the 1 items before were sent"):
                await c.submit_many([("ok", 1), ("big", "z" * 5000)])

    with fake_service(max_frame=4096) as fake:
        run(go(fake.url))
        assert max(fake.sizes) <= 4096 and len(fake.submits()) >= 10
        assert not any(r == "big" for r, _ in fake.items)


def test_service_errors_raise_typed_exceptions_with_the_reason() -> None:
    async def go(url: str) -> None:
        async with AsyncClient(url) as c:
            with pytest.raises(RequestFailed, match="rejected: no thanks"):
                await c.request("reject", 1)
            with pytest.raises(RequestTimeout, match=r"no reply within 0\.5s"):
                await c.request("slow", 1, timeout=0.5)
            with pytest.raises(ServiceError, match="bad_request: invalid priority 'urgent'") as ei:
                await c.submit("a", 1, priority="urgent")
            assert ei.value.code == "bad_request"
            assert await c.request("echo", {"x": [1, 2]}) == {"x": [1, 2]}
            assert await c.publish("t", 1) == [1, 2]  # the fake gives every fan-out 2 ids
            assert await c.broadcast(2) == [3, 4]
            await c.subscribe("t", "a")
            await c.register("a")

    with fake_service() as fake:
        run(go(fake.url))


def test_flush_raises_the_first_error_of_fire_and_forget_sends_once() -> None:
    def policy(conn: int, frame: ClientFrame) -> ServerFrame | None:
        if isinstance(frame, Submit) and frame.items[0][0] == "bad":
            return Error(frame.seq, "bad_request", "bad recipient")
        return None

    async def go(url: str) -> None:
        async with AsyncClient(url) as c:
            ok = c.send("good", 1)
            await c.flush()
            bad = c.send("bad", 2)
            with pytest.raises(ServiceError, match="bad recipient"):
                await c.flush()
            await c.flush()  # reported once
            assert ok.result() == 1 and isinstance(bad.exception(), ServiceError)
            with pytest.raises(ServiceError, match="bad recipient"):
                await c.submit("bad", 3)  # an awaited call raises to its caller ...
            await c.flush()  # ... and not again here

    with fake_service(policy) as fake:
        run(go(fake.url))


def test_submit_many_pipelines_frames_within_the_in_flight_bound() -> None:
    async def go(url: str) -> list[int]:
        async with AsyncClient(url, batch_size=10, max_inflight_frames=3) as c:
            return await c.submit_many((f"r{i}", i) for i in range(200))

    with fake_service(delay_s=0.02) as fake:
        assert run(go(fake.url)) == list(range(1, 201))
        assert len(fake.submits()) == 20
        assert 2 <= fake.max_unanswered <= 3  # pipelined, never more than the bound


def test_dropped_connection_re_sends_unanswered_frames_and_fails_requests() -> None:
    """The first connection is cut when its 3rd frame arrives: frames 3.. are re-sent on
    the next connection (at least once), the request in flight fails ConnectionLost."""
    seen = {"n": 0}

    def policy(conn: int, frame: ClientFrame) -> str | None:
        if conn == 0:
            seen["n"] += 1
            if seen["n"] == 3:
                return "drop"
        return None

    async def go(url: str) -> None:
        async with AsyncClient(url, batch_size=100, **FAST_RETRY) as c:
            # Every frame goes out before any answer comes back (delay), so all are in
            # flight at the drop; the request frame is the first of them.
            req = asyncio.ensure_future(c.request("echo", "hi"))
            await asyncio.sleep(0)  # the request frame is sealed first
            futs = [c.send(f"r{i % 5}", i) for i in range(1500)]
            await c.flush()
            assert all(not f.exception() for f in futs)
            with pytest.raises(ConnectionLost, match="may have been delivered"):
                await req

    with fake_service(policy, delay_s=0.05) as fake:
        run(go(fake.url))
        assert fake.connections == 2
        delivered = sorted(p for _, p in fake.items)
        assert sorted(set(delivered)) == list(range(1500))  # nothing lost
        # The re-sent frames keep their seq numbers, and order.
        resent = [f.seq for c, f in fake.frames if c == 1 and isinstance(f, Submit)]
        assert resent == sorted(resent)


def test_a_closing_service_answer_makes_the_frame_go_to_the_next_connection() -> None:
    def policy(conn: int, frame: ClientFrame) -> ServerFrame | None:
        if conn == 0 and isinstance(frame, Submit):
            return Error(frame.seq, "closed", "the service is shutting down")
        return None

    async def go(url: str) -> int:
        async with AsyncClient(url, **FAST_RETRY) as c:
            return await c.submit("a", 1)

    with fake_service(policy) as fake:
        assert run(go(fake.url)) == 1
        assert fake.connections == 2 and fake.items == [("a", 1)]


def test_a_dead_service_fails_pending_calls_with_connection_lost_after_the_attempts() -> None:
    with fake_service(lambda conn, frame: "drop") as fake:
        url = fake.url

        async def go() -> None:
            async with AsyncClient(url, reconnect_attempts=3, **FAST_RETRY) as c:
                start = time.monotonic()
                with pytest.raises(ConnectionLost, match="after 3 attempts"):
                    await c.submit("a", 1)
                assert time.monotonic() - start < 5
                with pytest.raises(ConnectionLost):  # the next call tries again, then fails
                    await c.submit_many([("a", 2)])

        run(go())
        assert fake.connections == 6
    with pytest.raises(ConnectionLost, match="cannot reach the service"):
        Client(url, reconnect_attempts=2, **FAST_RETRY)  # nobody listens any more


def test_after_giving_up_the_next_call_or_connect_tries_again() -> None:
    def policy(conn: int, frame: ClientFrame) -> str | None:
        poison = isinstance(frame, Submit) and bytes(frame.items[0][1]) in (b"\x01", b"\x03")
        return "drop" if poison else None  # payloads 1 and 3 kill every connection

    async def go(url: str) -> None:
        c = AsyncClient(url, reconnect_attempts=3, **FAST_RETRY)
        assert c.send("a", 0).done() is False  # connects on first use
        await c.flush()  # connection 0
        with pytest.raises(ConnectionLost):
            await c.submit("a", 1)  # connections 0, 1, 2 drop it
        await c.connect()  # connection 3
        assert await c.submit("a", 2) == 2
        with pytest.raises(ConnectionLost):
            await c.submit("a", 3)  # 3, 4, 5
        assert await c.submit("a", 4) == 3  # a new call starts new attempts: 6
        await c.close()

    with fake_service(policy) as fake:
        run(go(fake.url))
        assert fake.connections == 7


def test_authentication_failure_is_typed_and_not_retried() -> None:
    with fake_service(token="s3cret") as fake:
        with pytest.raises(AuthenticationError, match="auth: the token is wrong"):
            Client(fake.url, token="nope")
        assert fake.connections == 1

        async def go() -> None:
            async with AsyncClient(fake.url, token="s3cret") as c:
                assert await c.submit("a", 1) == 1

        run(go())


def test_unix_socket_url(tmp_path: Path) -> None:
    with fake_service(unix_path=str(tmp_path / "s.sock")) as fake, Client(fake.url) as c:
        assert c.submit_many([("a", 1), ("b", 2)]) == [1, 2]
        assert c.request("echo", [1]) == [1]


def test_sync_submit_futures_are_batched_and_behave_like_futures() -> None:
    with fake_service(delay_s=0.3) as fake, Client(fake.url) as c:
        futs = [c.submit(f"r{i % 3}", i) for i in range(5000)]
        first = futs[0]
        assert first.running() and not first.cancel()  # queued: cannot be called back
        with pytest.raises(cf.TimeoutError):
            first.result(timeout=0.01)
        called: list[int] = []
        first.add_done_callback(lambda f: called.append(f.result()))
        done, _ = cf.wait(futs[:10], timeout=30)
        assert len(done) == 10
        assert sorted(f.result() for f in cf.as_completed(futs[10:20], timeout=30)) == list(
            range(11, 21)
        )
        c.flush()
        assert [f.result() for f in futs] == list(range(1, 5001))
        assert called == [1]
        assert len(fake.submits()) <= 50  # handed over in chunks, not a frame per message


def test_sync_submit_blocks_at_max_pending_until_acks_come() -> None:
    with fake_service(delay_s=0.2) as fake, Client(fake.url, max_pending=100) as c:
        start = time.monotonic()
        futs = [c.submit("a", i) for i in range(300)]
        assert time.monotonic() - start >= 0.2  # waited for at least one round of acks
        c.flush()
        assert sorted(f.result() for f in futs) == list(range(1, 301))


def test_closed_client_refuses_calls() -> None:
    with fake_service() as fake:
        c = Client(fake.url)
        c.close()
        with pytest.raises(EngineClosed):
            c.submit("a", 1)
        with pytest.raises(EngineClosed):
            c.request("a", 1)

        async def go() -> None:
            ac = AsyncClient(fake.url)
            await ac.connect()
            fut = ac.send("a", 1)
            await ac.close()
            assert fut.result() == 1  # close waited for the answer
            with pytest.raises(EngineClosed):
                await ac.submit("a", 2)

        run(go())


# -- against the real service ----------------------------------------------------------------
@pytest.fixture(scope="module")
def route_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    """One service with the routing handler, TCP and a unix socket, for the request tests."""
    tmp = tmp_path_factory.mktemp("svc")
    with running_service(
        tmp, ENGINE_HANDLER=HANDLER, ENGINE_WORKERS="2", ENGINE_SOCKET=str(tmp / "r.sock")
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()


def inbox_payloads(directory: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for path in directory.glob("*.jsonl"):
        lines = path.read_text().splitlines()
        out[path.stem] = [json.loads(line)["payload"] for line in lines]
    return out


def test_100k_messages_through_the_sync_client_are_all_delivered_in_order(
    tmp_path: Path,
) -> None:
    n, recipients = 100_000, 20
    inbox = tmp_path / "inbox"
    with running_service(
        tmp_path, ENGINE_SINK="inbox", ENGINE_INBOX_DIR=str(inbox), ENGINE_WORKERS="2"
    ) as svc:
        with Client(svc.url) as c:
            futs = [c.submit(f"agent-{i % recipients}", i) for i in range(n)]
            c.flush()
        ids = [f.result() for f in futs]
        assert len(set(ids)) == n
        stats = svc.wait_stats(lambda s: s["delivered"] >= n and s["in_flight"] == 0)
        assert stats["delivered"] == stats["submitted"] == n
        assert svc.stop() == 0
    got = inbox_payloads(inbox)
    assert sum(map(len, got.values())) == n
    for r in range(recipients):
        assert got[f"agent-{r}"] == list(range(r, n, recipients))  # in submission order


def test_async_client_submit_many_and_natural_batching_against_the_service(
    tmp_path: Path,
) -> None:
    async def go(url: str) -> tuple[list[int], list[int]]:
        async with AsyncClient(url) as c:
            many = await c.submit_many((f"a{i % 10}", {"i": i}) for i in range(20_000))
            one = list(await asyncio.gather(*(c.submit("b", i) for i in range(2000))))
            return many, one

    with running_service(tmp_path, ENGINE_SINK="null", ENGINE_WORKERS="2") as svc:
        many, one = run(go(svc.url))
        assert len(set(many + one)) == 22_000
        stats = svc.wait_stats(lambda s: s["delivered"] == 22_000)
        assert stats["service"]["frames_total"] < 200  # batched, not a frame per message
        assert svc.stop() == 0


def test_request_response_and_typed_errors_over_tcp(route_service: ServiceProc) -> None:
    async def go() -> None:
        async with AsyncClient(route_service.url) as c:
            assert await c.request("echo", {"q": [1, "two"]}) == {"q": [1, "two"]}
            replies = await asyncio.gather(*(c.request(f"echo-{i}", i) for i in range(50)))
            assert replies == list(range(50))
            with pytest.raises(RequestFailed, match="rejected payload 7"):
                await c.request("reject", 7)
            with pytest.raises(RequestTimeout):
                await c.request("sleep", {"s": 5}, timeout=0.3)
            with pytest.raises(ServiceError, match=r"bad_request: .*priority.*bogus") as ei:
                await c.submit("echo", 1, priority="bogus")
            assert ei.value.code == "bad_request" and "bogus" in ei.value.reason
            with pytest.raises(TypeError, match="unknown option 'color'"):
                await c.submit("echo", 1, color="red")
            await c.register("echo-r1")
            await c.subscribe("news", "echo-s1")
            await c.subscribe("news", "echo-s2")
            assert len(await c.publish("news", {"n": 1})) == 2
            assert len(await c.broadcast("hello")) >= 1

    run(go())


def test_sync_client_requests_over_the_unix_socket(route_service: ServiceProc) -> None:
    assert route_service.socket
    with Client(f"unix://{route_service.socket}") as c:
        assert c.request("echo", "ping") == "ping"
        with pytest.raises(RequestFailed, match="rejected payload"):
            c.request("reject", 1)
        assert len(c.submit_many([("echo-x", i) for i in range(10)])) == 10


def test_settled_submits_are_acked_only_after_delivery(
    route_service: ServiceProc, tmp_path: Path
) -> None:
    early, late = tmp_path / "early", tmp_path / "late"

    async def go() -> None:
        async with AsyncClient(route_service.url) as c:
            await c.submit("mark-1", {"s": 1.0, "path": str(early)})
            assert not early.exists()  # acked once queued, delivered a second later
            await c.submit("mark-2", {"s": 0.5, "path": str(late)}, settled=True)
            assert late.exists()  # acked only after the handler ran
            ids = await c.submit_many(
                [("mark-3", {"s": 0.2, "path": str(tmp_path / f"m{i}")}) for i in range(3)],
                settled=True,
            )
            assert len(ids) == 3 and all((tmp_path / f"m{i}").exists() for i in range(3))

    run(go())


def test_auth_token_is_required_when_the_service_has_one(tmp_path: Path) -> None:
    with running_service(tmp_path, ENGINE_SINK="null", ENGINE_AUTH_TOKEN="tok-123") as svc:
        with pytest.raises(AuthenticationError, match="token is required"):
            Client(svc.url)
        with pytest.raises(AuthenticationError, match="token is wrong"):
            Client(svc.url, token="tok-999")

        async def go() -> None:
            with pytest.raises(AuthenticationError, match="token is wrong"):
                await AsyncClient(svc.url, token="x").connect()
            async with AsyncClient(svc.url, token="tok-123") as c:
                assert len(await c.submit_many([("a", 1), ("b", 2)])) == 2

        run(go())
        with Client(svc.url, token="tok-123") as c:
            assert c.submit("a", 1).result(timeout=30) > 0
        assert svc.stop() == 0


def test_restarting_the_service_loses_no_acked_message(tmp_path: Path) -> None:
    """SIGTERM the service while a producer keeps submitting, start a new one on the same
    port: the client reconnects, re-sends what was not answered, and every acked
    message is in the inbox (at least once)."""
    port = free_port()
    inbox = tmp_path / "inbox"
    env = {
        "ENGINE_SINK": "inbox",
        "ENGINE_INBOX_DIR": str(inbox),
        "ENGINE_WORKERS": "2",
        "ENGINE_PORT": str(port),
    }
    svc = start_service(tmp_path, **env)
    futs: list[cf.Future[int]] = []
    stop = threading.Event()
    # Enough attempts to outlast a slow start of the new service on a loaded machine.
    client = Client(svc.url, reconnect_attempts=1000, reconnect_max_s=0.25)

    def produce() -> None:
        i = 0
        while not stop.is_set():
            futs.extend(client.submit(f"agent-{j % 7}", j) for j in range(i, i + 50))
            i += 50
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    svc2: ServiceProc | None = None
    try:
        producer.start()
        time.sleep(0.5)
        assert svc.stop() == 0, svc.log_text()
        before = len(futs)
        svc2 = start_service(tmp_path, **env)
        time.sleep(0.5)
        stop.set()
        producer.join()
        client.flush()  # raises if any message failed
        assert len(futs) > before  # the producer kept going through the restart
        stats = svc2.wait_stats(lambda s: s["in_flight"] == 0)
        assert stats["service"]["connections_total"] >= 1
        assert svc2.stop() == 0, svc2.log_text()
    finally:
        stop.set()
        if producer.is_alive():
            producer.join()
        client.close(timeout=5)
        svc.stop()
        if svc2 is not None:
            svc2.stop()
    for fut in futs:
        assert fut.result(timeout=0) > 0
    got = inbox_payloads(inbox)
    delivered = [p for payloads in got.values() for p in payloads]
    assert set(delivered) == set(range(len(futs)))  # every acked message, maybe twice
    for payloads in got.values():  # re-sent frames may repeat messages; first copies in order
        assert list(dict.fromkeys(payloads)) == sorted(set(payloads))
