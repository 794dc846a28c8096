"""Handlers of the chaos suite; workers import them as ``tests.chaos.handlers:<name>``.

The payload is ``[uid, seq]`` or ``[uid, seq, opts]``; ``opts`` steers one message:

- ``"d": s`` -- take ``s`` seconds (``time.sleep`` in ``record``, ``asyncio.sleep`` in
  ``record_async`` and ``answer``) after recording the start;
- ``"f": 1`` -- fail every attempt (recorded as FAILED, then raise);
- ``"p": 1`` -- poison: record POISONED, then kill the worker process (``os._exit``);
- ``"r": s`` -- the first attempt (the first ``"rn"`` attempts) asks for a retry in ``s``
  seconds (recorded as FAILED, then ``raise Retry(after=s)``); the next one is delivered;
- anything else (e.g. ``"pad"``) is ignored.

Every call is recorded (see ``tests.chaos.recorder``) before the handler returns.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from engine.errors import Retry
from ipc.codec import Message
from tests.chaos import recorder

POISONED = 4  # recorder kind: a poison message is about to kill this worker


class ChaosFailure(RuntimeError):
    """Raised by a handler told to fail (``"f"``); the engine retries it."""


def _parse(msg: Message) -> tuple[int, int, dict[str, Any]]:
    body = msg.body()
    opts = body[2] if len(body) > 2 else {}
    return body[0], body[1], opts


def _record(msg: Message, uid: int, seq: int, kind: int) -> None:
    recorder.write(uid, msg.id, seq, msg.created_ns, msg.attempt, kind, msg.recipient)


def _steer(msg: Message, uid: int, seq: int, opts: dict[str, Any]) -> None:
    """Apply poison/fail steering; records what happened before acting on it."""
    if opts.get("p"):
        _record(msg, uid, seq, POISONED)
        os._exit(1)
    if opts.get("f"):
        _record(msg, uid, seq, recorder.FAILED)
        raise ChaosFailure(f"attempt {msg.attempt} of uid {uid} fails on purpose")
    if opts.get("r") and msg.attempt < opts.get("rn", 1):
        _record(msg, uid, seq, recorder.FAILED)
        raise Retry(after=opts["r"])


def record(msg: Message) -> None:
    """Sync handler: record the delivery (optionally poison, fail or block the worker)."""
    uid, seq, opts = _parse(msg)
    if opts:
        _steer(msg, uid, seq, opts)
    _record(msg, uid, seq, recorder.DELIVERED)
    if opts.get("d"):
        time.sleep(opts["d"])


async def record_async(msg: Message) -> None:
    """Async handler: like ``record``, but a delay holds only this delivery (its recipient)."""
    uid, seq, opts = _parse(msg)
    if opts:
        _steer(msg, uid, seq, opts)
    _record(msg, uid, seq, recorder.DELIVERED)
    if opts.get("d"):
        await asyncio.sleep(opts["d"])


async def answer(msg: Message) -> list[Any]:
    """Request handler: echo what identifies the request, so a caller can check it is its own."""
    uid, seq, opts = _parse(msg)
    if opts.get("d"):
        await asyncio.sleep(opts["d"])
    _record(msg, uid, seq, recorder.ANSWERED)
    return [uid, seq, msg.recipient, msg.correlation_id]
