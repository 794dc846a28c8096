"""``Message.user`` was appended with a default: encodings made before it still decode."""

from __future__ import annotations

import msgspec

from ipc.codec import Kind, Message, Priority, decode, encode, pack_payload


def test_a_message_encoded_without_the_user_field_decodes_with_an_empty_user() -> None:
    old = msgspec.msgpack.encode(
        [7, "r", "s", Kind.DIRECT, Priority.HIGH, pack_payload({"a": 1}), 1, 0, 0, 0, "",
         [], {}, "key"]
    )  # fmt: skip
    msg = decode(old)
    assert (msg.id, msg.dedup_key, msg.user) == (7, "key", "")
    assert decode(encode(Message(1, "r", user="alice"))).user == "alice"
