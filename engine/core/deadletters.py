"""The dispatcher's bounded dead-letter store, optionally mirrored to a JSON-lines file."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import IO, Any

import msgspec

from ipc.records import DeadLetter

log = logging.getLogger("engine.deadletters")


class DeadLetterView(msgspec.Struct, frozen=True):
    """A dead letter as users see it (``Engine.dead_letters()``, the JSON-lines file)."""

    id: int
    recipient: str
    reason: str
    attempts: int
    error: str
    kind: str
    priority: str
    payload: Any
    traceback: str = ""
    payload_dropped: bool = False
    """The worker dropped the payload (the letter was too large for its return ring):
    ``payload`` is null and the letter cannot be replayed."""
    replay_error: str = ""
    """Why the last replay kept this letter; empty if none did."""


class ReplayReport(msgspec.Struct, frozen=True):
    """What a replay did: letters resubmitted, letters kept in the store, and why.

    ``kept_reasons`` counts the kept letters per reason: ``malformed`` (no recipient to
    send to), ``payload_dropped`` (the payload was dropped for size), ``rebuild_failed``
    (the message could not be built again; the letter's ``replay_error`` says why).
    """

    replayed: int = 0
    kept: int = 0
    kept_reasons: dict[str, int] = msgspec.field(default_factory=dict)


def unreplayable(dl: DeadLetter) -> str:
    """The ``kept_reasons`` key of a letter that cannot be replayed as it is, else ""."""
    if not dl.message.recipient:
        return "malformed"
    if dl.payload_dropped:
        return "payload_dropped"
    return ""


REPLAY_ERRORS = {
    "malformed": "no recipient: the message could not be decoded",
    "payload_dropped": "the payload was dropped for size: nothing to resend",
}


class DeadLetterStore:
    """Keeps the newest ``limit`` dead letters, one per message id (redeliveries repeat them)."""

    def __init__(self, limit: int, path: str = "") -> None:
        self.limit = limit
        self._items: OrderedDict[int, DeadLetter] = OrderedDict()
        self._file: IO[bytes] | None = open(path, "ab") if path else None  # noqa: SIM115
        self._encoder = msgspec.json.Encoder()
        self.dropped = 0
        self.file_errors = 0
        self.path = path
        self.closed = False
        self._anonymous = 0
        # Cluster mode: every settled letter also goes to the DLQ stream (engine.broker),
        # a repeat too (the first may belong to an epoch that was never acknowledged).
        self.forward: Callable[[DeadLetter], None] | None = None

    def add(self, dl: DeadLetter) -> bool:
        """Store ``dl``; False if this message id was already dead-lettered."""
        if self.forward is not None:
            self.forward(dl)
        mid = dl.message.id
        if mid == 0:  # an undecodable message has no id: keep every one
            self._anonymous -= 1
            mid = self._anonymous
        elif mid in self._items:
            return False
        self._items[mid] = dl
        if len(self._items) > self.limit:
            self._items.popitem(last=False)
            self.dropped += 1
        if self._file is not None:
            try:
                self._file.write(self._encoder.encode(view(dl)) + b"\n")
                self._file.flush()
            except (OSError, TypeError, ValueError, msgspec.EncodeError):
                # The mirror is best effort: the letter stays in the store and counts.
                self.file_errors += 1
                log.exception("cannot append dead letter %d to %s", dl.message.id, self.path)
        return True

    def items(self) -> list[DeadLetter]:
        return list(self._items.values())

    def get(self, message_id: int) -> DeadLetter | None:
        return self._items.get(message_id)

    def entries(self, ids: Iterable[int] | None = None) -> list[tuple[int, DeadLetter]]:
        """(store key, letter) of every letter, or of message ``ids`` (unknown ids skipped).

        The key is the message id, or a negative number for a letter without one.
        """
        if ids is None:
            return list(self._items.items())
        items = self._items
        return [(mid, items[mid]) for mid in dict.fromkeys(ids) if mid in items]

    def pop(self, key: int) -> DeadLetter | None:
        """Remove the letter stored under ``key`` (see `entries`); None if it is gone."""
        return self._items.pop(key, None)

    def replayed(self, dl: DeadLetter) -> None:
        """``dl`` was resubmitted (and `pop`-ped): the mirror must not restore it."""

    def put_back(self, key: int, dl: DeadLetter) -> None:
        """Store again a letter `pop` took (a replay that could not queue it)."""
        self._items[key] = dl

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Close the mirror; without one, say how many letters die with the process."""
        if self.closed:
            return
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._items and not self.path:
            log.warning(
                "discarding %d dead letters kept in memory: set ENGINE_DLQ_PATH to keep "
                "them in a file, or read them (dead_letters(), GET /v1/dead-letters) "
                "before stopping",
                len(self._items),
                extra={"dead_letters": len(self._items)},
            )


def view(dl: DeadLetter) -> DeadLetterView:
    msg = dl.message
    try:
        payload = msg.body()
    except Exception:  # an undecodable payload is still listed, as raw bytes
        payload = bytes(msg.payload)
    return DeadLetterView(
        id=msg.id,
        recipient=msg.recipient,
        reason=dl.reason,
        attempts=dl.attempts,
        error=dl.error,
        kind=msg.kind.name.lower(),
        priority=msg.priority.name.lower(),
        payload=payload,
        traceback=dl.traceback,
        payload_dropped=dl.payload_dropped,
        replay_error=dl.replay_error,
    )
