"""Seeded, structure-aware generators of hostile input for the service (issue 16 item 4).

A binary frame starts from a valid frame of one of the client kinds of
`engine.protocol` (built from its schema below, as a plain msgpack array) and
gets zero to three mutations: a field of the wrong type, an absurd string, count,
number or nesting depth, a string that is not UTF-8, extra or missing fields, an
unknown tag, or bytes cut off the end.  Every body is framed with its true length,
so a session of K bodies owes exactly K answers; what ends a session (a clean
close, a hang-up without reading, a reset, a truncated frame, a header above the
limit) and what comes before the Hello (pre-auth traffic) are chosen apart.
HTTP bodies are built the same way from the JSON endpoints' fields.

Every choice comes from one ``random.Random(seed)``: a seed replays its input.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import msgspec

from engine.protocol import HEADER, PROTOCOL_VERSION

_encode = msgspec.msgpack.encode
Gen = Callable[[random.Random], Any]

NAMES = ["fz-a", "fz-b", "fz-c", "fz-é", "fz-\u2603", "fz/../x", "fz\x00nul", "fz-" + "n" * 200]
TOPICS = ["fz-t1", "fz-t2", "fz-t\u00ff"]


def name(rng: random.Random) -> str:
    return rng.choice(NAMES)


def topic(rng: random.Random) -> str:
    return rng.choice(TOPICS)


def payload(rng: random.Random) -> msgspec.Raw:
    kind = rng.randrange(6)
    if kind == 0:
        return msgspec.Raw(_encode(rng.randrange(-(1 << 63), 1 << 63)))
    if kind == 1:
        return msgspec.Raw(_encode({"k": "v" * rng.randrange(50)}))
    if kind == 2:
        return msgspec.Raw(_encode(junk(rng)))
    if kind == 3:
        return msgspec.Raw(nested(rng.choice([10, 500, 900, 999, 1000, 1001, 5000])))
    if kind == 4:
        return msgspec.Raw(bad_utf8())  # decodes as a Raw; the handler's body() refuses it
    return msgspec.Raw(b"\xc0")


def options(rng: random.Random) -> list[Any]:
    """A SendOptions array (some of its trailing fields, as omit_defaults sends them)."""
    full = [
        rng.choice(["normal", "high", "low", "critical", 0, 1, 2, 3]),
        rng.choice([None, 0.0, 1.5, 60.0]),
        rng.choice(["direct", "event", "broadcast", "request", 0, 1]),
        rng.choice(["", "fz-sender"]),
        rng.choice(["", "fz-reply"]),
        rng.choice([[], ["t1", "t2"]]),
        rng.choice([{}, {"k": "v"}]),
        rng.choice(["", f"fz-key-{rng.randrange(100)}"]),
    ]
    return full[: rng.randrange(len(full) + 1)]


def batch_item(rng: random.Random) -> list[Any]:
    return [name(rng), payload(rng), "normal", rng.choice([0.5, 5.0]), rng.random() < 0.3, None]


# kind -> (tag, [(field, generator of a valid value)]); the first of each is required-only
# up to ``required`` fields (msgspec array_like: trailing fields may be left out).
SCHEMA: dict[str, tuple[int, int, list[tuple[str, Gen]]]] = {
    "hello": (0, 0, [("version", lambda r: PROTOCOL_VERSION), ("token", lambda r: ""),
                     ("client", lambda r: "fuzz")]),
    "submit": (1, 2, [("seq", lambda r: r.randrange(1 << 31)),
                      ("items", lambda r: [[name(r), payload(r)] for _ in range(r.randrange(8))]),
                      ("options", options), ("settled", lambda r: r.random() < 0.2),
                      ("keys", lambda r: [])]),
    "request": (2, 3, [("seq", lambda r: r.randrange(1 << 31)), ("recipient", name),
                       ("payload", payload), ("timeout_s", lambda r: r.choice([0.5, 5.0])),
                       ("options", options), ("cache", lambda r: r.random() < 0.3),
                       ("cache_ttl_s", lambda r: r.choice([None, 1.0]))]),
    "publish": (3, 3, [("seq", lambda r: r.randrange(1 << 31)), ("topic", topic),
                       ("payload", payload), ("options", options)]),
    "subscribe": (4, 3, [("seq", lambda r: r.randrange(1 << 31)), ("topic", topic),
                         ("recipient", name), ("unsubscribe", lambda r: r.random() < 0.3)]),
    "register": (5, 2, [("seq", lambda r: r.randrange(1 << 31)), ("recipient", name),
                        ("unregister", lambda r: r.random() < 0.3)]),
    "broadcast": (6, 2, [("seq", lambda r: r.randrange(1 << 31)), ("payload", payload),
                         ("options", options)]),
    "batch": (7, 2, [("seq", lambda r: r.randrange(1 << 31)),
                     ("items", lambda r: [batch_item(r) for _ in range(r.randrange(1, 5))]),
                     ("concurrency", lambda r: r.choice([0, 1, 4]))]),
}  # fmt: skip
KINDS = list(SCHEMA)


def nested(depth: int) -> bytes:
    """A msgpack value ``depth`` arrays deep."""
    return b"\x91" * depth + b"\xc0"


def bad_utf8() -> bytes:
    """A msgpack str whose bytes are not UTF-8."""
    return b"\xa4\xff\xfe\x80\xc3"


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value of any type."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([-1, 0, 1 << 63, (1 << 64) - 1, -(1 << 63), rng.randrange(1 << 40)])
    if kind == 2:
        return rng.choice([math.inf, -math.inf, math.nan, -0.0, 1e308, -1.5, 1e-300])
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.randbytes(rng.randrange(12))
    if kind == 5:
        return rng.random() < 0.5
    if kind in (6, 7):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(rng.randrange(100)): junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def absurd(rng: random.Random, value: Any) -> Any:
    """``value`` at an absurd size: a long string, a huge count, an extreme number, deep nesting."""
    if isinstance(value, str):
        return rng.choice(["", "\x00", "x" * 1025, "é" * 600, "y" * rng.choice([5000, 100_000])])
    if isinstance(value, list):
        n = rng.choice([0, 5000, 20_000])
        small = ["fz-a", msgspec.Raw(b"\x01")] if value and isinstance(value[0], list) else "k"
        return [small] * n
    if isinstance(value, bool):
        return 2
    if isinstance(value, int):
        return rng.choice([-1, 0, (1 << 64) - 1, -(1 << 63), 1 << 62])
    if isinstance(value, float) or value is None:
        return rng.choice([math.inf, -math.inf, math.nan, -1.0, 1e308, 1e-320])
    return msgspec.Raw(nested(rng.choice([1000, 1001, 5000, 60_000])))


MUTATIONS = (
    "wrong_type",
    "absurd",
    "non_utf8",
    "extra",
    "missing",
    "unknown_tag",
    "cut",
    "deep_payload",
)


def frame_body(rng: random.Random, token: str) -> tuple[str, bytes]:
    """One frame body (kind and bytes) after the Hello: valid or mutated."""
    kind = rng.choice(KINDS)
    tag, required, fields = SCHEMA[kind]
    values: list[Any] = [gen(rng) for _, gen in fields]
    if kind == "hello":
        values[1] = token
    keep = rng.randrange(required, len(values) + 1)
    arr: list[Any] = [tag, *values[:keep]]
    mutations = rng.sample(MUTATIONS, rng.choice([0, 0, 1, 1, 2, 3]))
    cut = False
    for m in mutations:
        i = rng.randrange(1, len(arr)) if len(arr) > 1 else 0
        if m == "wrong_type" and i:
            arr[i] = junk(rng)
        elif m == "absurd" and i:
            arr[i] = absurd(rng, arr[i])
        elif m == "non_utf8" and i:
            arr[i] = msgspec.Raw(bad_utf8())
        elif m == "extra":
            arr += [junk(rng) for _ in range(rng.randrange(1, 4))]
        elif m == "missing":
            arr = arr[: rng.randrange(1, max(2, required + 1))]
        elif m == "unknown_tag":
            arr[0] = rng.choice([8, 99, 100, 101, -1, 1 << 40, "submit", None])
        elif m == "deep_payload" and kind in ("submit", "request", "publish", "broadcast"):
            arr.append(msgspec.Raw(nested(rng.choice([999, 1000, 1001, 3000]))))
        elif m == "cut":
            cut = True
    body = _encode(arr)
    if cut:
        body = body[: rng.randrange(len(body))]
    return (f"{kind}+{'+'.join(sorted(mutations))}" if mutations else kind), body


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def pre_auth(rng: random.Random, token: str) -> tuple[str, bytes]:
    """What a client sends instead of a good Hello: the service must close on it."""
    kind = rng.randrange(7)
    if kind == 0:
        return "no_token", framed(_encode([0, PROTOCOL_VERSION, "", "fz"]))
    if kind == 1:
        return "wrong_token", framed(_encode([0, PROTOCOL_VERSION, token + "x", "fz"]))
    if kind == 2:
        return "wrong_version", framed(_encode([0, rng.choice([0, 2, -1, 1 << 40]), token]))
    if kind == 3:  # a request before any Hello
        return "frame_before_hello", framed(frame_body(rng, token)[1])
    if kind == 4:
        return "hello_wrong_types", framed(_encode([0, junk(rng), junk(rng), junk(rng)]))
    if kind == 5:
        return "garbage", framed(rng.randbytes(rng.randrange(1, 200)))
    return "hello_huge_token", framed(_encode([0, PROTOCOL_VERSION, "t" * 200_000, "fz"]))


def ending(rng: random.Random, max_frame: int) -> str:
    """How a session ends."""
    return rng.choice(["close", "close", "hang_up", "reset", "truncated", "too_large"])


def terminal_bytes(kind: str, rng: random.Random, max_frame: int) -> bytes:
    if kind == "truncated":
        n = rng.randrange(2, 5000)
        return HEADER.pack(n) + rng.randbytes(rng.randrange(1, n))
    if kind == "too_large":
        return HEADER.pack(rng.randrange(max_frame + 1, 1 << 32))
    return b""


# -- HTTP ---------------------------------------------------------------------------


def json_junk(rng: random.Random) -> Any:
    value = junk(rng)
    return json.loads(json.dumps(value, default=repr).replace("NaN", "null")
                      .replace("-Infinity", "null").replace("Infinity", "null"))  # fmt: skip


HTTP_FIELDS: dict[str, Gen] = {
    "recipient": name,
    "payload": json_junk,
    "priority": lambda r: r.choice(["normal", "high", 0, 3]),
    "ttl": lambda r: r.choice([None, 1.0, 60]),
    "kind": lambda r: r.choice(["direct", "event"]),
    "sender": lambda r: "fz-s",
    "reply_to": lambda r: "",
    "tags": lambda r: ["a"],
    "metadata": lambda r: {"k": "v"},
    "dedup_key": lambda r: "",
}


def http_message(rng: random.Random) -> dict[str, Any]:
    msg = {k: gen(rng) for k, gen in HTTP_FIELDS.items() if k == "recipient" or rng.random() < 0.4}
    for _ in range(rng.choice([0, 1, 1, 2])):
        field = rng.choice([*HTTP_FIELDS, "extra_field"])
        op = rng.randrange(4)
        if op == 0:
            msg[field] = json_junk(rng)
        elif op == 1:
            msg[field] = rng.choice(["x" * 1025, "y" * 100_000, "", [1] * 5000, 1e308, -1])
        elif op == 2:
            msg.pop(field, None)
        else:
            msg[field] = [[[[["deep"]]]]]
    return msg


def http_request(rng: random.Random, token: str) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) for one hostile HTTP request."""
    headers = {"Content-Type": "application/json"}
    auth = rng.random()
    if auth < 0.85:
        headers["Authorization"] = f"Bearer {token}"
    elif auth < 0.92:
        headers["Authorization"] = rng.choice(["Bearer wrong", "Basic eA==", "Bearer", "x" * 5000])
    kind = rng.randrange(12)
    if kind < 4:
        many = rng.random() < 0.4
        value: Any = [http_message(rng) for _ in range(rng.randrange(1, 30))] if many else (
            http_message(rng))  # fmt: skip
        body = json.dumps(value).encode()
        if rng.random() < 0.15:
            body = body[: rng.randrange(len(body))]
        return "POST", "/v1/messages", body, headers
    if kind == 4:
        depth = rng.choice([100, 999, 1001, 5000, 50_000])
        body = b'{"recipient": "fz-a", "payload": ' + b"[" * depth + b"]" * depth + b"}"
        return "POST", "/v1/messages", body, headers
    if kind == 5:
        return "POST", "/v1/messages", b'{"recipient": "fz-' + bad_utf8()[1:] + b'"}', headers
    if kind == 6:
        reqs = [
            {"recipient": name(rng), "payload": json_junk(rng), "timeout_s": rng.choice([1, -1])}
            for _ in range(rng.randrange(0, 6))
        ]
        body_obj: Any = {"requests": reqs, "concurrency": rng.choice([None, 0, 1, 10**9, -3])}
        if rng.random() < 0.3:
            body_obj = json_junk(rng)
        return "POST", "/v1/batch", json.dumps(body_obj).encode(), headers
    if kind == 7:
        q = rng.choice(["", "?limit=-1", "?limit=99999999999999999999", "?offset=x", "?limit=5"])
        return "GET", "/v1/dead-letters" + q, b"", headers
    if kind == 8:
        ident = rng.choice(["0", "-1", "abc", "9" * 40, "1", "%00"])
        return "GET", f"/v1/dead-letters/{ident}", b"", headers
    if kind == 9:
        body = json.dumps(rng.choice([{"ids": [1, 2]}, {"ids": "x"}, [], {"ids": [-1] * 100}, {}]))
        return "POST", "/v1/dead-letters/replay", body.encode(), headers
    if kind == 10:
        return rng.choice(["DELETE", "PUT", "PATCH"]), rng.choice(["/v1/cache", "/v1/messages"]), (
            b""), headers  # fmt: skip
    return "GET", rng.choice(["/stats", "/metrics", "/healthz", "/v1/nope", "/" + "a" * 5000]), (
        b""), headers  # fmt: skip
