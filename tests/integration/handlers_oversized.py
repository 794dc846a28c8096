"""Handlers for tests/integration/test_oversized_fields.py; workers import them by name.

``awkward`` raises, for recipients with these prefixes, an exception that is hard
to report: ``bad-str`` one whose ``__str__`` raises, ``huge-str`` one whose text is
10 MB (more than a return ring holds), ``os-`` an OSError with a long filename (as
the inbox sink raises), ``reject-`` a Reject with a 10 MB reason.  Every other
message is delivered.
"""

from __future__ import annotations

import errno
from typing import Any

from engine.errors import Reject
from ipc.codec import Message

HUGE = 10 * (1 << 20)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


class HugeError(Exception):
    def __str__(self) -> str:
        return "x" * HUGE


def awkward(msg: Message) -> Any:
    r = msg.recipient
    if r.startswith("bad-str"):
        raise UnprintableError()
    if r.startswith("huge-str"):
        raise HugeError()
    if r.startswith("os-"):
        raise OSError(errno.ENAMETOOLONG, "File name too long", "f" * 100_000)
    if r.startswith("reject-"):
        raise Reject("r" * HUGE)
    return None
