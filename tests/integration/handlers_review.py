"""Handlers for the regression tests in test_engine_regressions.py."""

from __future__ import annotations

import asyncio
from typing import Any

from ipc.codec import Message


async def echo(msg: Message) -> Any:
    """Returns the payload: a large payload makes a large reply."""
    return msg.body()


async def _later(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


def sync_returning_coroutine(msg: Message) -> Any:
    """A plain function that returns an awaitable (as decorator wrappers do)."""
    return _later({"n": msg.body()})


async def cancelled_once(msg: Message) -> Any:
    """Raises CancelledError on the first attempt: a failure, not a shutdown."""
    if msg.attempt == 0:
        raise asyncio.CancelledError
    return msg.attempt


def slow(msg: Message) -> None:
    """50 ms per message: keeps a small ring full."""
    import time

    time.sleep(0.05)


def slow_or_reject(msg: Message) -> None:
    """Rejects recipients named "dead-..." (dead letters at once); 300 ms for the others."""
    import time

    from engine import Reject

    if msg.recipient.startswith("dead-"):
        raise Reject("rejected on purpose")
    time.sleep(0.3)


def slow_or_echo(msg: Message) -> Any:
    """Sleeps 50 ms for the payload "slow"; answers anything else at once."""
    import time

    body = msg.body()
    if body == "slow":
        time.sleep(0.05)
        return None
    return body


async def record_order(msg: Message) -> None:
    """Appends the recipient to the file named by RINGWAY_ORDER_FILE (after 1 ms)."""
    import os

    await asyncio.sleep(0.001)
    with open(os.environ["RINGWAY_ORDER_FILE"], "a") as f:
        f.write(msg.recipient + "\n")


def retry_bad_once(msg: Message) -> None:
    """Recipient "bad" asks for a retry in 3 s on its first attempt; every delivery that
    succeeds appends the recipient to RINGWAY_ORDER_FILE."""
    import os

    from engine.errors import Retry

    if msg.recipient == "bad" and msg.attempt == 0:
        raise Retry(after=3.0)
    with open(os.environ["RINGWAY_ORDER_FILE"], "a") as f:
        f.write(msg.recipient + "\n")


async def held_until_marker(msg: Message) -> None:
    """Recipient "held" waits until the marker file named by its payload exists."""
    if msg.recipient == "held":
        import os

        path = msg.body()
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
