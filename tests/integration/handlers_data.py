"""Handlers for test_dead_letter_hardening.py: oversize and unprintable failures."""

from __future__ import annotations

from ipc.codec import Message

HUGE = 10 * 1024 * 1024  # characters of the oversize exception's message


class Unprintable(Exception):
    """An exception whose ``__str__`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def oversize(msg: Message) -> None:
    """Raises a 10 MB message for ``{"huge": true}``, an unprintable exception for
    ``{"unprintable": true}``; delivers the rest."""
    body = msg.body()
    if body.get("huge"):
        raise ValueError("x" * HUGE)
    if body.get("unprintable"):
        raise Unprintable()


def reject(msg: Message) -> None:
    """Rejects every message: each becomes a dead letter at once."""
    from engine import Reject

    raise Reject("no")
