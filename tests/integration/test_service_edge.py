"""The service's edge against unauthenticated and browser-borne clients (real service).

Pre-auth limits of the binary ingress (a small frame cap derived from the longest
token, a time to Hello that a dribbling client cannot stretch), the HTTP connection
cap and the ``?settled=1`` timeout, what a web page could send (a foreign Host, a
foreign Origin, a POST that is not JSON), the paged ``GET /v1/dead-letters``, and
the token read from ENGINE_AUTH_TOKEN_FILE by the service and by the CLI.

One service serves the module: a mock sink that fails every message (one attempt:
each message becomes a dead letter, after 0.5 s), a 6,000-character token in a
file, a 1 s time to Hello, 3 HTTP connections, a 0.2 s settled wait.
"""

from __future__ import annotations

import json
import select
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.client import Client
from engine.protocol import HEADER, Error, Hello, Welcome
from tests.integration.service_proc import ServiceProc, running_service
from tests.integration.test_service_cli import engine
from tests.integration.test_service_ingress import RawConn, http

TOKEN = "f" * 6000  # longer than the 4 KiB overhead alone: the limit must grow with it
LETTERS = 1200  # more than one page of `engine dlq list` (1,000)
ALLOWED = "ringway.test"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")  # the trailing newline is stripped
    return path


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[ServiceProc]:
    with running_service(
        tmp_path_factory.mktemp("edge"),
        ENGINE_SINK="mock",
        ENGINE_MOCK_SUCCESS_RATE="0",
        ENGINE_MOCK_DELAY_S="0.5",
        ENGINE_RETRY_MAX_ATTEMPTS="1",
        ENGINE_WORKERS="1",
        ENGINE_AUTH_TOKEN_FILE=str(token_file),
        ENGINE_HELLO_TIMEOUT_S="1",
        ENGINE_HTTP_MAX_CONNECTIONS="3",
        ENGINE_HTTP_SETTLED_TIMEOUT_S="0.2",
        ENGINE_ALLOWED_HOSTS=ALLOWED,
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()


def stats(svc: ServiceProc) -> dict[str, Any]:
    status, body = http(svc, "GET", "/stats", token=TOKEN)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def wait_stats(svc: ServiceProc, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /stats until ``done``; a 503 of the connection cap is waited out too."""
    deadline = time.monotonic() + timeout
    current: dict[str, Any] = {}
    while True:
        status, body = http(svc, "GET", "/stats", token=TOKEN)
        if status == 200 and done(current := json.loads(body)):
            return current
        assert status in (200, 503) and time.monotonic() < deadline, (status, body, current)
        time.sleep(0.05)


def port(svc: ServiceProc) -> int:
    return int(svc.http_url.rpartition(":")[2])


# -- pre-auth limits (binary ingress) ------------------------------------------------------
def test_a_huge_frame_before_hello_is_refused_by_the_pre_auth_limit(svc: ServiceProc) -> None:
    """16 MiB is within ENGINE_MAX_FRAME_BYTES, not within what a Hello can need."""
    with RawConn(svc.url) as conn:
        conn.send(HEADER.pack(16 << 20))  # the header alone: no body is waited for
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert answers[0].code == "bad_frame"
    limit = len(TOKEN) + 4096
    assert f"16,777,216 bytes before Hello exceeds the pre-auth limit of {limit:,}" in (
        answers[0].reason
    )


def test_undecodable_frames_before_hello_close_the_connection_at_once(svc: ServiceProc) -> None:
    """An unauthenticated peer gets no stream of answers to pile up, nor time to stay."""
    with RawConn(svc.url) as conn:
        conn.send((HEADER.pack(3) + b"\xc1\xc1\xc1") * 50)
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert answers[0].code == "bad_frame"
    assert answers[0].reason.startswith("undecodable frame before Hello"), answers[0].reason


def test_a_hello_with_the_longest_token_still_fits(svc: ServiceProc) -> None:
    with RawConn(svc.url) as conn:
        assert isinstance(conn.hello(TOKEN), Welcome)
    with Client(svc.url, token=TOKEN) as client:
        assert len(client.submit_many([("fits", 1)])) == 1


def test_a_hello_dribbled_byte_by_byte_is_cut_off_at_the_hello_timeout(svc: ServiceProc) -> None:
    """Each byte comes well within any read timeout; the whole Hello never does."""
    hello = msgspec.msgpack.encode(Hello(token=TOKEN, client="slow"))
    with RawConn(svc.url) as conn:
        conn.send(HEADER.pack(len(hello)))
        for byte in hello:
            readable, _, _ = select.select([conn.sock], [], [], 0.2)
            if readable:
                break  # the service answered (and closes)
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
        answers = conn.read_to_eof()
    assert len(answers) == 1 and isinstance(answers[0], Error), answers
    assert answers[0].reason == "no Hello within 1s (ENGINE_HELLO_TIMEOUT_S)"


# -- the HTTP connection cap and the settled timeout ----------------------------------------
def _keep_alive_request(sock: socket.socket, svc: ServiceProc) -> bytes:
    sock.sendall(f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port(svc)}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_an_idle_http_connection_is_closed_and_gives_its_slot_back(svc: ServiceProc) -> None:
    """One that never sends a request too (else idle connects could hold every slot)."""
    with socket.create_connection(("127.0.0.1", port(svc)), timeout=120) as sock:
        wait_stats(svc, lambda s: s["service"]["http_connections_active"] >= 2)
        assert sock.recv(4096) == b""  # closed by the service, nothing sent (aiohttp: ~1 h)
    wait_stats(svc, lambda s: s["service"]["http_connections_active"] == 1)  # only /stats'


def test_http_connections_over_the_cap_get_503_and_a_freed_slot_serves_again(
    svc: ServiceProc,
) -> None:
    wait_stats(svc, lambda s: s["service"]["http_connections_active"] == 1)  # only this one
    before = stats(svc)["service"]["http_connections_rejected_total"]
    held = [socket.create_connection(("127.0.0.1", port(svc)), timeout=20) for _ in range(3)]
    try:
        for sock in held:  # answered and kept open (HTTP/1.1 keep-alive)
            assert _keep_alive_request(sock, svc).startswith(b"HTTP/1.1 200"), sock
        status, body = http(svc, "GET", "/livez", token=None)
        assert status == 503, body
        problem = json.loads(body)
        assert problem["error"] == "busy"
        assert "3 HTTP connections open (ENGINE_HTTP_MAX_CONNECTIONS)" in problem["reason"]
    finally:
        held.pop().close()
    try:
        deadline = time.monotonic() + 30
        while (status := http(svc, "GET", "/livez", token=None)[0]) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
    # Closed connections give their slots back (as soon as the service sees them end).
    after = wait_stats(svc, lambda s: s["service"]["http_connections_active"] == 1)
    assert after["service"]["http_connections_rejected_total"] >= before + 1


def test_a_settled_wait_answers_504_with_the_ids_which_are_not_lost(svc: ServiceProc) -> None:
    before = stats(svc)
    body = msgspec.json.encode([{"recipient": f"slow-{i}", "payload": i} for i in range(3)])
    status, out = http(svc, "POST", "/v1/messages?settled=1", body, token=TOKEN)
    assert status == 504, out
    problem = json.loads(out)
    assert problem["error"] == "settle_timeout"
    assert "0.2s (ENGINE_HTTP_SETTLED_TIMEOUT_S)" in problem["reason"]
    assert len(problem["ids"]) == 3
    # Queued all the same: each settles (the failing mock sink dead-letters it).
    after = wait_stats(svc, lambda s: s["dead_lettered"] >= before["dead_lettered"] + 3)
    assert after["submitted"] == before["submitted"] + 3
    assert after["service"]["http_settled_timeouts_total"] >= 1


# -- what a web page could send --------------------------------------------------------------
def test_a_cross_origin_simple_post_is_refused_and_nothing_is_queued(svc: ServiceProc) -> None:
    """A form or ``fetch(..., {mode: "no-cors"})`` post: text/plain, maybe an Origin."""
    before = stats(svc)["submitted"]
    body = b'{"recipient": "csrf", "payload": 1}'
    plain = {"Content-Type": "text/plain"}
    for path in ("/v1/messages", "/v1/batch", "/v1/dead-letters/replay"):
        status, out = http(svc, "POST", path, body, token=TOKEN, headers=plain)
        assert status == 415, (path, out)
        assert json.loads(out)["reason"] == (
            f"POST {path} needs Content-Type: application/json, got 'text/plain'"
        )
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    status, out = http(svc, "POST", "/v1/messages", body, token=TOKEN, headers=evil)
    assert status == 403, out
    assert "Origin 'http://evil.example'" in json.loads(out)["reason"]
    status, out = http(svc, "POST", "/v1/messages", body, token=None, headers=plain | evil)
    assert status == 403, out  # refused before the token is even asked for
    assert stats(svc)["submitted"] == before  # nothing got in
    # The same origin (the dashboard's page) and a listed one are served.
    own = {"Origin": svc.http_url}
    status, out = http(svc, "POST", "/v1/messages", body, token=TOKEN, headers=own)
    assert status == 202, out
    listed = {"Origin": f"https://{ALLOWED}"}
    status, out = http(svc, "GET", "/stats", token=TOKEN, headers=listed)
    assert status == 200, out


def test_a_foreign_host_is_refused_as_dns_rebinding(svc: ServiceProc) -> None:
    p = port(svc)
    for host in (f"evil.example:{p}", f"10.1.2.3:{p}", "evil.example"):
        status, out = http(svc, "GET", "/v1/dead-letters", token=TOKEN, headers={"Host": host})
        assert status == 421, (host, out)
        reason = json.loads(out)["reason"]
        assert reason.startswith(f"Host {host!r} is not this service (localhost, 127.0.0.1")
        assert reason.endswith("nor in ENGINE_ALLOWED_HOSTS")
    # Any port of this service's own names: a forwarded port (port-forward, docker -p).
    local = (f"localhost:{p}", "localhost:1", f"127.0.0.1:{p}", f"[::1]:{p}")
    for host in (*local, ALLOWED, f"{ALLOWED}:8443"):
        status, out = http(svc, "GET", "/stats", token=TOKEN, headers={"Host": host})
        assert status == 200, (host, out)
    # The probes answer whatever the Host (a kubelet names the pod's IP).
    status, out = http(svc, "GET", "/livez", token=None, headers={"Host": "10.1.2.3:80"})
    assert status == 200, out
    # The live WebSocket of a foreign page is refused at its handshake.
    evil = {"Origin": "http://evil.example", "Host": f"127.0.0.1:{p}"}
    assert http(svc, "GET", "/v1/live", token=None, headers=evil)[0] == 403


# -- GET /v1/dead-letters pages ---------------------------------------------------------------
def _get(svc: ServiceProc, path: str) -> tuple[int, dict[str, str], Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(svc.http_url + path)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_dead_letters_are_walked_page_by_page_exactly_once(svc: ServiceProc) -> None:
    before = wait_stats(svc, lambda s: not s["in_flight"])["dead_letters_stored"]
    with Client(svc.url, token=TOKEN) as client:
        client.submit_many([(f"page-{i}", i) for i in range(LETTERS)])
    wait_stats(svc, lambda s: s["dead_letters_stored"] >= before + LETTERS and not s["in_flight"])
    status, headers, first = _get(svc, "/v1/dead-letters?recipient=page-0")
    assert status == 200 and [dl["recipient"] for dl in first] == ["page-0"]
    assert "X-Next-Cursor" not in headers and headers["X-Total-Count"] == "1"
    seen: list[int] = []
    pages = 0
    path = "/v1/dead-letters?limit=500"
    while True:
        status, headers, page = _get(svc, path)
        assert status == 200, page
        assert isinstance(page, list) and len(page) <= 500
        seen += [dl["id"] for dl in page]
        pages += 1
        if "X-Next-Cursor" not in headers:
            assert "Link" not in headers
            break
        link = headers["Link"]
        assert link.endswith('>; rel="next"') and link.startswith("</v1/dead-letters?")
        path = link[1 : -len('>; rel="next"')]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert query == {"limit": ["500"], "cursor": [headers["X-Next-Cursor"]]}
    total = before + LETTERS
    assert pages == -(-total // 500)
    assert len(seen) == len(set(seen)) == total  # each letter once
    assert int(headers["X-Total-Count"]) == total
    # Without a limit: the default page (100) and a cursor to the rest.
    status, headers, page = _get(svc, "/v1/dead-letters")
    assert status == 200 and len(page) == 100 and "X-Next-Cursor" in headers
    # The CLI walks every page (1,000 a page).
    out = engine("dlq", "list", "--json", "--url", svc.http_url, "--token", TOKEN)
    assert out.returncode == 0, out.stderr
    assert sorted(dl["id"] for dl in json.loads(out.stdout)) == sorted(seen)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=0", "limit must be an integer in [1, 1000], got '0'"),
        ("limit=1001", "limit must be an integer in [1, 1000], got '1001'"),
        ("limit=x", "limit must be an integer in [1, 1000], got 'x'"),
        ("cursor=!!", "cursor is not a cursor this service gave"),
        ("cursor=WzEsMl0&offset=1", "give cursor or offset, not both"),
    ],
)
def test_bad_page_parameters_get_400_naming_them(svc: ServiceProc, query: str, reason: str) -> None:
    status, _, problem = _get(svc, f"/v1/dead-letters?{query}")
    assert status == 400, problem
    assert problem["reason"].startswith(reason), problem


def _ids(page: list[Any]) -> list[int]:
    return [dl["id"] for dl in page]


def test_a_cursor_whose_letter_is_gone_goes_on_after_it(svc: ServiceProc) -> None:
    """A walk whose cursor names a letter replayed (or evicted) since loses and repeats none."""
    before = wait_stats(svc, lambda s: not s["in_flight"])["dead_letters_stored"]
    with Client(svc.url, token=TOKEN) as client:
        client.submit_many([(f"gone-{i}", i) for i in range(20)])
    wait_stats(svc, lambda s: s["dead_letters_stored"] >= before + 20 and not s["in_flight"])
    _, _, newest = _get(svc, "/v1/dead-letters?newest_first=1&limit=20")
    assert [dl["recipient"] for dl in newest] == [f"gone-{i}" for i in reversed(range(20))]
    replayed: list[str] = []
    for query in ("newest_first=1&limit=5", "limit=5"):
        status, headers, page = _get(svc, f"/v1/dead-letters?{query}")
        assert status == 200 and len(page) == 5, (query, page)
        cursor, last = headers["X-Next-Cursor"], page[-1]["id"]
        status, _, rest = _get(svc, f"/v1/dead-letters?{query}&cursor={cursor}")
        assert status == 200 and len(rest) == 5, (query, rest)
        status, body = http(svc, "POST", f"/v1/dead-letters/replay?id={last}", token=TOKEN)
        assert status == 200 and json.loads(body)["replayed"] == 1, body
        replayed.append(page[-1]["recipient"])
        status, _, again = _get(svc, f"/v1/dead-letters?{query}&cursor={cursor}")
        assert status == 200 and _ids(again) == _ids(rest), (query, again, rest)
    # The replayed messages (new ids) fail again and are stored once more, as the newest.
    deadline = time.monotonic() + 30
    while {
        dl["recipient"] for dl in _get(svc, "/v1/dead-letters?newest_first=1&limit=2")[2]
    } != set(replayed):
        assert time.monotonic() < deadline, replayed
        time.sleep(0.05)
    assert newest[4]["recipient"] == replayed[0] == "gone-15"


# -- the token file -------------------------------------------------------------------------
def test_the_token_from_the_file_is_accepted_and_others_refused(svc: ServiceProc) -> None:
    assert http(svc, "GET", "/stats", token=TOKEN)[0] == 200
    assert http(svc, "GET", "/stats", token=TOKEN + "x")[0] == 401
    assert http(svc, "GET", "/stats", token=None)[0] == 401
    with RawConn(svc.url) as conn:
        answer = conn.hello("wrong")
    assert isinstance(answer, Error) and answer.code == "auth", answer


def test_the_cli_reads_the_token_file(svc: ServiceProc, token_file: Path) -> None:
    env = {"ENGINE_AUTH_TOKEN_FILE": str(token_file)}
    out = engine("stats", "--json", "--url", svc.http_url, **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["service"]["addresses"]["tcp"] == svc.start_line["tcp"]
    sent = engine("send", "cli-file", "1", "--url", svc.url, **env)
    assert sent.returncode == 0, sent.stderr
    refused = engine("stats", "--json", "--url", svc.http_url)  # no token at all
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty: it must hold the token"),
        ("one\ntwo\n", "must hold the token alone on one line"),
        (None, "cannot read ENGINE_AUTH_TOKEN_FILE="),
    ],
)
def test_a_bad_token_file_stops_the_start_naming_the_path(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    out = engine("serve", "--sink", "null", "--port", "0", "--http-port", "0",
                 ENGINE_AUTH_TOKEN_FILE=str(path))  # fmt: skip
    assert out.returncode == 78, out.stderr  # EX_CONFIG
    assert str(path) in out.stderr and problem in out.stderr


def test_a_token_and_a_token_file_together_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    out = engine("config", ENGINE_AUTH_TOKEN="inline", ENGINE_AUTH_TOKEN_FILE=str(path))
    assert out.returncode == 78, out.stderr
    assert "ENGINE_AUTH_TOKEN and ENGINE_AUTH_TOKEN_FILE are both set" in out.stderr
