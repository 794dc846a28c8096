"""`BrowserGuard`: which Host and Origin headers name the service (DNS rebinding, CSRF)."""

from __future__ import annotations

import pytest

from engine.service.http import BrowserGuard, decode_cursor, encode_cursor


@pytest.mark.parametrize(
    ("bound", "allowed", "host", "ok"),
    [
        ("127.0.0.1:7000", "", "127.0.0.1:7000", True),
        ("127.0.0.1:7000", "", "LOCALHOST:7000", True),
        ("127.0.0.1:7000", "", "[::1]:7000", True),
        ("127.0.0.1:7000", "", "localhost:9000", True),  # a forwarded port: the same service
        ("127.0.0.1:7000", "", "localhost", True),
        ("127.0.0.1:7000", "", "rebind.example:7000", False),
        ("127.0.0.1:7000", "", "10.0.0.5:7000", False),  # not the bound address
        ("127.0.0.1:80", "", "localhost", True),
        ("0.0.0.0:7000", "", "10.0.0.5:7000", True),  # a wildcard bind: any IP literal
        ("0.0.0.0:7000", "", "[fe80::1]:7000", True),
        ("0.0.0.0:7000", "", "rebind.example:7000", False),  # a name needs the list
        ("::1:7000", "", "[::1]:7000", True),
        ("127.0.0.1:7000", "ringway.internal", "ringway.internal:443", True),
        ("127.0.0.1:7000", "ringway.internal:8443", "ringway.internal:443", False),
        ("127.0.0.1:7000", " a.example , ringway.internal:8443", "ringway.internal:8443", True),
        ("127.0.0.1:7000", "*", "anything.example:1", True),
        ("127.0.0.1:7000", "", "bad:port:x", False),
        ("127.0.0.1:7000", "", "[::1", False),
    ],
)
def test_host(bound: str, allowed: str, host: str, ok: bool) -> None:
    assert BrowserGuard(allowed, bound).host_ok(host) is ok


@pytest.mark.parametrize(
    ("allowed", "origin", "host", "ok"),
    [
        ("", "http://127.0.0.1:7000", "127.0.0.1:7000", True),  # same origin
        ("", "http://localhost:7000", "127.0.0.1:7000", False),  # another origin
        ("", "null", "127.0.0.1:7000", False),
        ("", "http://evil.example", "127.0.0.1:7000", False),
        ("app.example", "https://app.example", "127.0.0.1:7000", True),
        ("*", "https://anyone.example", "127.0.0.1:7000", True),
    ],
)
def test_origin(allowed: str, origin: str, host: str, ok: bool) -> None:
    assert BrowserGuard(allowed, "127.0.0.1:7000").origin_ok(origin, host) is ok


def test_a_cursor_round_trips_and_garbage_is_none() -> None:
    assert decode_cursor(encode_cursor((12, 34_000_000_000))) == (12, 34_000_000_000)
    # Nothing, not base64, another object, [1], and the (id, time) pair of earlier builds.
    for text in ("", "!!", "eyJhIjoxfQ", "WzFd", "WzEsMl0"):
        assert decode_cursor(text) is None
