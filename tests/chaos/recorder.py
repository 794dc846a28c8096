"""Durable, fixed-size delivery records written by the chaos handlers inside the workers.

Each handler call appends one 64-byte record to ``$CHAOS_RECORD_DIR/<pid>.rec`` with a
single ``os.write`` on an ``O_APPEND`` descriptor *before* the handler returns: a
delivery the engine counts as settled is on disk even if the worker is SIGKILLed right
after it, and a record is never interleaved with another process's.  Fixed-size records
make a torn tail (a worker killed inside ``write``) detectable and cheap to skip.

Kept free of pytest and of the engine's heavy modules: workers import it.
"""

from __future__ import annotations

import os
import struct
import time
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

ENV_DIR = "CHAOS_RECORD_DIR"
RECORD = struct.Struct("<QQqQQIHH16s")  # 64 bytes, see Delivery
RECIPIENT_BYTES = 16

# What a record says happened (the ``kind`` field).
DELIVERED = 1  # the handler accepted the message (it returns normally)
FAILED = 2  # the handler raised on this attempt
ANSWERED = 3  # a request handler returned its reply

_fds: dict[int, int] = {}  # pid -> fd: a forked worker must open its own file


class Delivery(NamedTuple):
    """One handler call as the handler saw it (a tuple: a million of them stay cheap)."""

    uid: int  # the test's own message id (payload), unique per message
    engine_id: int  # Message.id as the engine assigned it
    seq: int  # per-recipient sequence number (payload)
    created_ns: int  # Message.created_ns: submit time, CLOCK_MONOTONIC
    t_ns: int  # handler start, CLOCK_MONOTONIC (machine-wide on Linux)
    pid: int
    attempt: int
    kind: int
    recipient: str

    @property
    def latency_ns(self) -> int:
        """Submit -> handler start."""
        return self.t_ns - self.created_ns


def _fd(directory: str | None = None) -> int:
    pid = os.getpid()
    fd = _fds.get(pid)
    if fd is None:
        path = os.path.join(directory or os.environ[ENV_DIR], f"{pid}.rec")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _fds[pid] = fd
    return fd


def write(
    uid: int,
    engine_id: int,
    seq: int,
    created_ns: int,
    attempt: int,
    kind: int,
    recipient: str,
    t_ns: int | None = None,
) -> None:
    """Append one record (one ``os.write``: all of it reaches the file, or none)."""
    rec = RECORD.pack(
        uid,
        engine_id,
        seq,
        created_ns,
        time.monotonic_ns() if t_ns is None else t_ns,
        os.getpid(),
        min(attempt, 0xFFFF),
        kind,
        recipient.encode()[:RECIPIENT_BYTES],
    )
    os.write(_fd(), rec)


def read_file(path: Path) -> list[Delivery]:
    """Every whole record of one file, in file (= that process's time) order."""
    data = path.read_bytes()
    whole = len(data) - len(data) % RECORD.size  # a torn tail never returned: ignore it
    names: dict[bytes, str] = {}
    out = []
    make = Delivery._make
    for rec in RECORD.iter_unpack(memoryview(data)[:whole]):
        raw = rec[8]
        name = names.get(raw)
        if name is None:
            name = names[raw] = raw.rstrip(b"\0").decode()
        out.append(make((*rec[:8], name)))
    return out


def read_all(directory: Path) -> list[Delivery]:
    """Every record of every process, ordered by handler start time (then file order)."""
    out: list[Delivery] = []
    for path in sorted(directory.glob("*.rec")):
        out.extend(read_file(path))
    out.sort(key=attrgetter("t_ns"))  # stable: equal times keep their file order
    return out


def count_all(directory: Path) -> int:
    """Whole records written so far (cheap: file sizes only)."""
    return sum(p.stat().st_size // RECORD.size for p in directory.glob("*.rec"))
