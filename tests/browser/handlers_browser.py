"""Handlers for the browser tests, imported by the workers of an ``engine serve`` subprocess."""

from __future__ import annotations

import os

from ipc.codec import Message


def fail_while_flagged(msg: Message) -> None:
    """Raise while the file named by BROWSER_FAIL_FLAG exists; deliver once it is gone."""
    if os.path.exists(os.environ["BROWSER_FAIL_FLAG"]):
        raise ValueError(f"flagged: cannot deliver message {msg.id}")
