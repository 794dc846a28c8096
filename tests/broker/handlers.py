"""Handlers of the in-process cluster tests; workers import ``tests.broker.handlers:<name>``.

Each delivery appends ``[recipient, body, message id]`` as a JSON line to
``$BROKER_TEST_OUT/<pid>.jsonl``.  ``{"reject": 1}`` payloads are rejected
while ``$BROKER_TEST_OUT/reject_on`` exists; ``{"retry": s}`` asks for a retry in ``s``
seconds on its first attempt; requests get their body back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from engine import Reject, Retry
from ipc.codec import Message

OUT_ENV = "BROKER_TEST_OUT"
_files: dict[int, IO[str]] = {}


def _out() -> IO[str]:
    pid = os.getpid()
    f = _files.get(pid)
    if f is None:
        f = _files[pid] = (Path(os.environ[OUT_ENV]) / f"{pid}.jsonl").open("a")
    return f


def record(msg: Message) -> Any:
    body = msg.body()
    rejecting = (Path(os.environ[OUT_ENV]) / "reject_on").exists()
    if isinstance(body, dict) and body.get("reject") and rejecting:
        raise Reject("rejected on purpose")
    if isinstance(body, dict) and body.get("retry") and msg.attempt == 0:
        raise Retry(after=body["retry"])
    f = _out()
    f.write(json.dumps([msg.recipient, body, msg.id]) + "\n")
    f.flush()
    return body


def read(directory: Path) -> list[tuple[str, Any, int]]:
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            recipient, body, mid = json.loads(line)
            out.append((recipient, body, mid))
    return out
