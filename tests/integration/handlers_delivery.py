"""Handlers for tests/integration/test_engine_delivery.py, imported by worker processes.

Workers import these as ``tests.integration.handlers_delivery:<name>``.  Every
handler call appends one JSON line to ``$RINGWAY_DELIVERY_OUT/<pid>.jsonl``
(append mode, flushed per line), so the test can read what each worker saw and
in which order.  Payloads steer the handlers:

- ``{"gate": path}``: record a ``started`` line, then wait until ``path`` exists
  (blocking the worker for sync handlers, only this delivery for async ones);
- ``{"fail": k}``: raise on attempts ``< k``;
- ``{"retry_after": s}``: raise ``Retry(after=s)`` on attempt 0;
- ``{"reject": True}``: raise ``Reject("bad")`` while ``$RINGWAY_DELIVERY_OUT/reject_on`` exists.

``which_path`` records nothing in files: it counts which of the worker's
functions called it and answers a request with those counts.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import IO, Any

from engine import Reject, Retry
from ipc.codec import Message

OUT_ENV = "RINGWAY_DELIVERY_OUT"
GATE_TIMEOUT_S = 60.0
_files: dict[int, IO[str]] = {}


class HandlerError(RuntimeError):
    """Raised by the test handlers to fail an attempt."""


def out_dir() -> Path:
    return Path(os.environ[OUT_ENV])


def log(msg: Message, event: str = "call", **extra: Any) -> None:
    """Append one line describing this call of the handler (one file per process)."""
    pid = os.getpid()
    f = _files.get(pid)
    if f is None:
        f = _files[pid] = open(out_dir() / f"{pid}.jsonl", "a")  # noqa: SIM115
    body = msg.body()
    rec = {
        "event": event,
        "pid": pid,
        "id": msg.id,
        "recipient": msg.recipient,
        "attempt": msg.attempt,
        "kind": int(msg.kind),
        "priority": int(msg.priority),
        "tags": list(msg.tags),
        "expires_ns": msg.expires_ns,
        "t_ns": time.monotonic_ns(),
        "body": body,
        **extra,
    }
    f.write(json.dumps(rec) + "\n")
    f.flush()


def read_records(directory: Path, event: str | None = "call") -> list[dict[str, Any]]:
    """Every line of every worker file, each file in its own order, files by pid."""
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        with path.open() as f:
            for line in f:
                rec = json.loads(line)
                if event is None or rec["event"] == event:
                    records.append(rec)
    return records


def _body(msg: Message) -> dict[str, Any]:
    body = msg.body()
    return body if isinstance(body, dict) else {}


def _gate_sync(msg: Message, body: dict[str, Any]) -> None:
    log(msg, "started")
    deadline = time.monotonic() + GATE_TIMEOUT_S
    gate = Path(body["gate"])
    while not gate.exists():
        if time.monotonic() > deadline:
            raise HandlerError(f"gate {gate} never opened")
        time.sleep(0.005)


async def _gate_async(msg: Message, body: dict[str, Any]) -> None:
    log(msg, "started")
    deadline = time.monotonic() + GATE_TIMEOUT_S
    gate = Path(body["gate"])
    while not gate.exists():
        if time.monotonic() > deadline:
            raise HandlerError(f"gate {gate} never opened")
        await asyncio.sleep(0.005)


def _steer(msg: Message, body: dict[str, Any]) -> None:
    """Failures asked for by the payload; raise before the call is recorded as a success."""
    if body.get("reject") and (out_dir() / "reject_on").exists():
        log(msg, "rejected")
        raise Reject("bad")
    if "retry_after" in body and msg.attempt == 0:
        log(msg, "retry")
        raise Retry(after=body["retry_after"])
    if msg.attempt < body.get("fail", 0):
        log(msg, "failed")
        raise HandlerError(f"attempt {msg.attempt} of message {msg.id} fails on purpose")


def record(msg: Message) -> None:
    """Sync handler: gate / fail / reject as the payload says, else record the delivery."""
    body = _body(msg)
    if "gate" in body:
        _gate_sync(msg, body)
    _steer(msg, body)
    log(msg)


async def record_async(msg: Message) -> None:
    """Async twin of ``record``."""
    body = _body(msg)
    if "gate" in body:
        await _gate_async(msg, body)
    _steer(msg, body)
    # A random pause: deliveries that overlap (more than one in flight per recipient)
    # would then finish, and be recorded, out of order.
    await asyncio.sleep(random.random() * 0.05)
    log(msg)


async def answer(msg: Message) -> Any:
    """Request handler: sleeps ``sleep`` seconds, rejects on ``reject``, else echoes."""
    body = _body(msg)
    log(msg, "started")
    if body.get("sleep"):
        await asyncio.sleep(body["sleep"])
    if body.get("reject"):
        raise Reject("nope")
    if body.get("unencodable"):
        return object()
    log(msg)
    return {"echo": body, "recipient": msg.recipient, "attempt": msg.attempt}


def always_fail(msg: Message) -> None:
    """Fails every attempt, recording when and whether it was already past its expiry."""
    now = time.monotonic_ns()
    log(msg, "failed", late=bool(msg.expires_ns and now >= msg.expires_ns))
    raise HandlerError(f"attempt {msg.attempt} of message {msg.id} fails on purpose")


_CALLERS: collections.Counter[str] = collections.Counter()


def which_path(msg: Message) -> dict[str, int] | None:
    """Sync: counts its callers (the worker's fast path ``_deliver_now`` or its
    ``inline_runner``); ``{"sleep": s}`` sleeps s first; ``{"paths": True}`` answers
    with the counts so far (and is not counted)."""
    body = _body(msg)
    if body.get("paths"):
        return dict(_CALLERS)
    _CALLERS[sys._getframe(1).f_code.co_name] += 1
    if body.get("sleep"):
        time.sleep(body["sleep"])
    return None


def gc_settings(msg: Message) -> list[int]:
    """Answers with the worker's GC threshold of generation 0 and its frozen object count."""
    return [gc.get_threshold()[0], gc.get_freeze_count()]
