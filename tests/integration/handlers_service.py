"""Handlers for the service tests, imported by the workers of an ``engine serve`` subprocess.

Set with ``ENGINE_HANDLER=tests.integration.handlers_service:<name>``; the test
runs the service with the repository on its PYTHONPATH.  ``route`` dispatches
on the recipient, so one service can answer every request test:

- ``echo*``: return the payload;
- ``reject*``: raise ``Reject`` with a reason naming the payload;
- ``sleep*``: sleep ``payload["s"]`` seconds (without blocking the worker), return "slept";
- ``mark*``: sleep ``payload["s"]`` seconds, then create the file ``payload["path"]``
  (the test sees whether an ack came before or after the delivery).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from engine import Reject
from ipc.codec import Message


def echo(msg: Message) -> Any:
    """Answer a request with its own payload."""
    return msg.body()


def reject(msg: Message) -> Any:
    """Dead-letter at once; a request gets RequestFailed with this reason."""
    raise Reject(f"rejected payload {msg.body()!r}")


async def route(msg: Message) -> Any:
    """Pick the behaviour by the recipient's prefix (see the module docstring)."""
    name = msg.recipient
    if name.startswith("reject"):
        return reject(msg)
    if name.startswith(("sleep", "mark")):
        body = msg.body()
        await asyncio.sleep(float(body["s"]))
        if name.startswith("mark"):
            Path(body["path"]).touch()
        return "slept"
    return echo(msg)
