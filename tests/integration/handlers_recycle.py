"""Handlers for the recycling tests: a memory leak that only a worker restart cures."""

from __future__ import annotations

from ipc.codec import Message
from tests.integration.handlers_faults import record

LEAK_BYTES = 1 << 20  # per message: a few dozen messages push RSS past a small limit
_leaked: list[bytearray] = []


def leak(msg: Message) -> None:
    """Record the delivery, then keep 1 MiB alive forever (touched, so it is resident)."""
    record(msg)
    _leaked.append(bytearray(b"x" * LEAK_BYTES))
