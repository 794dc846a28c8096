"""Handlers for the fault-injection tests; workers import them as ``module:function``.

Every delivery is appended as one JSON line ``{"id", "r", "seq", "pid", "t"}`` to
``$RINGWAY_FAULTS_DIR/<pid>.jsonl`` with one unbuffered ``os.write`` before the
handler returns, so a delivery the engine counts is on disk even if the worker is
SIGKILLed right after it.  ``t`` is CLOCK_MONOTONIC ns (machine-wide on Linux): it
orders the deliveries of a recipient across the worker processes of one shard.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from ipc.codec import Message

ENV_DIR = "RINGWAY_FAULTS_DIR"

_encode = msgspec.json.Encoder().encode
_fds: dict[int, int] = {}  # pid -> fd: a forked worker opens its own file


def _out() -> int:
    pid = os.getpid()
    fd = _fds.get(pid)
    if fd is None:
        path = os.path.join(os.environ[ENV_DIR], f"{pid}.jsonl")
        fd = _fds[pid] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    return fd


def _write(msg: Message, body: Any) -> None:
    seq = body.get("seq", -1) if isinstance(body, dict) else -1
    line = _encode(
        {"id": msg.id, "r": msg.recipient, "seq": seq, "pid": os.getpid(), "t": time.monotonic_ns()}
    )
    os.write(_out(), line + b"\n")


def record(msg: Message) -> None:
    """Fast sync handler: record the delivery and return."""
    _write(msg, msg.body())


def record_slow(msg: Message) -> None:
    """Record, then hold the worker ~0.2 ms so a stream lasts long enough to interrupt."""
    _write(msg, msg.body())
    time.sleep(0.0002)


def poison(msg: Message) -> None:
    """Kill the worker process on ``{"poison": true}``; record every other message."""
    body = msg.body()
    if isinstance(body, dict) and body.get("poison"):
        os._exit(1)
    _write(msg, body)
