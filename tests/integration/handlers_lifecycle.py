"""A recording handler for the service lifecycle and fault tests (imported by the workers).

``ENGINE_HANDLER=tests.integration.handlers_lifecycle:slow_inbox`` waits
``HANDLER_DELAY_S`` seconds (default 0.001; without blocking the worker), then
appends the message to ``$LIFECYCLE_INBOX/<recipient>.jsonl`` in the inbox
sink's format with one ``os.write`` on an ``O_APPEND`` descriptor, before it
returns: a message the engine counts as delivered is on disk.  The delay keeps
a backlog in the rings, so a signal arrives while messages are in flight.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse

import msgspec

from ipc.codec import Message

_json = msgspec.json.Encoder()
_fds: dict[tuple[int, str], int] = {}


def _fd(recipient: str) -> int:
    key = (os.getpid(), recipient)
    fd = _fds.get(key)
    if fd is None:
        name = urllib.parse.quote(recipient, safe="") + ".jsonl"
        path = os.path.join(os.environ["LIFECYCLE_INBOX"], name)
        fd = _fds[key] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return fd


async def slow_inbox(msg: Message) -> None:
    """Wait a little, then record the delivery as one inbox line."""
    await asyncio.sleep(float(os.environ.get("HANDLER_DELAY_S", "0.001")))
    record = {
        "id": msg.id,
        "recipient": msg.recipient,
        "attempt": msg.attempt,
        "created_ns": msg.created_ns,
        "payload": msg.body(),
    }
    os.write(_fd(msg.recipient), _json.encode(record) + b"\n")
