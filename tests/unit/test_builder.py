"""The builder's output: what the dispatcher's buffers hold for every queued message."""

from __future__ import annotations

import gc

import msgspec

from engine.config import Config
from engine.core.builder import MessageBuilder
from ipc.codec import Priority, decode_batch, pack_payload


def test_queued_messages_are_plain_tuples_the_gc_lets_go_of() -> None:
    """(id, recipient, lane, bytes) of atomic values only: the cyclic GC untracks such a
    tuple at its first collection.  A Priority member in it kept every buffered message
    tracked, scanned again by each collection while it waited (~0.4 µs a message)."""
    builder = MessageBuilder(Config.from_env(env={}), 1 << 20)
    opts = builder.options(priority="high")
    raw = pack_payload({"n": 1})
    outs = builder.build_many([("a", raw), ("b", raw), ("c", {"n": 2})], opts)
    gc.collect()
    assert [type(out[2]) for out in outs] == [int] * 3
    assert [out[2] for out in outs] == [Priority.HIGH] * 3
    assert [gc.is_tracked(out) for out in outs] == [False, False, False]
    frame = msgspec.msgpack.encode([msgspec.Raw(out[3]) for out in outs])
    msgs = decode_batch(frame)
    assert [m.priority for m in msgs] == [Priority.HIGH] * 3
    assert [m.created_ns for m in msgs] == [msgs[0].created_ns] * 3  # one clock read per call
    assert [m.body() for m in msgs] == [{"n": 1}, {"n": 1}, {"n": 2}]
