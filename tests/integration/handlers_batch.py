"""Handlers for the batch, cache, user and rate-limit tests (service workers import them).

``route`` dispatches on the recipient's prefix; payloads are dicts:

- ``echo*``: return ``{"echo": payload, "user": msg.user}``;
- ``whoami*``: return ``msg.user`` (who the service says sent it);
- ``count*``: append one line to ``payload["path"]`` (the test counts executions),
  sleep ``payload.get("s", 0)`` seconds, return ``payload["v"]``;
- ``order*``: append the recipient to ``payload["path"]`` (the test reads the order);
- ``span*``: sleep ``payload["s"]``, then append "start end" (monotonic seconds) to
  ``payload["path"]`` (the test computes how many ran at once);
- ``reject*``: raise ``Reject`` (a dead letter: the item's error is ``rejected``);
- ``fail*``: raise ``RuntimeError`` every time (``max_attempts`` once retries run out);
- ``retry*``: raise ``Retry(after=0.05)`` on the first attempt, then answer ``"retried"``;
- ``slowfirst*``: the first delivery (no file at ``payload["path"]`` yet) creates the
  file and sleeps ``payload["s"]`` (past the request's timeout); later ones answer at once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from engine import Reject, Retry
from ipc.codec import Message


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def route(msg: Message) -> Any:
    """Pick the behaviour by the recipient's prefix (see the module docstring)."""
    name = msg.recipient
    body = msg.body()
    if name.startswith("whoami"):
        return msg.user
    if name.startswith("count"):
        _append(body["path"], name)
        await asyncio.sleep(float(body.get("s", 0)))
        return body["v"]
    if name.startswith("order"):
        _append(body["path"], name)
        await asyncio.sleep(float(body.get("s", 0)))
        return name
    if name.startswith("span"):
        start = time.monotonic()
        await asyncio.sleep(float(body["s"]))
        _append(body["path"], f"{start} {time.monotonic()}")
        return name
    if name.startswith("reject"):
        raise Reject(f"no thanks: {body!r}")
    if name.startswith("fail"):
        raise RuntimeError("always fails")
    if name.startswith("retry"):
        if msg.attempt == 0:
            raise Retry(after=0.05)
        return "retried"
    if name.startswith("slowfirst"):
        path = Path(body["path"])
        if not path.exists():
            path.touch()
            await asyncio.sleep(float(body["s"]))
            return "late"
        return "second try"
    return {"echo": body, "user": msg.user}
