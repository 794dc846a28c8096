"""Handlers for the operating tests (logs, probes, CLI), run by ``engine serve`` workers.

``route`` picks by the recipient: ``bad*`` raises ValueError on every attempt,
``poison*`` kills its worker (``os._exit``) on every attempt, anything else is
delivered.
"""

from __future__ import annotations

import os

from ipc.codec import Message


def route(msg: Message) -> None:
    if msg.recipient.startswith("bad"):
        raise ValueError(f"no luck with message {msg.id}")
    if msg.recipient.startswith("poison"):
        os._exit(1)


def always_fail(msg: Message) -> None:
    raise ValueError(f"no luck with message {msg.id}")


async def slow(msg: Message) -> None:
    """Take half a second per message: a backlog builds up per recipient."""
    import asyncio

    await asyncio.sleep(0.5)


async def slowish(msg: Message) -> None:
    """Take about a millisecond; ``bad*`` recipients fail (the dashboard's screenshot)."""
    import asyncio

    if msg.recipient.startswith("bad"):
        raise ValueError(f"no luck with message {msg.id}")
    await asyncio.sleep(0.001)
