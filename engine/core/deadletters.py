"""The dispatcher's bounded dead-letter store, optionally mirrored to a JSON-lines file.

The store counts and logs what it evicts; the mirror is written and fsynced off the event
loop, and read back at start (``ENGINE_DLQ_RESTORE``), so a restart keeps its letters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from engine.logs import LogLimiter
from ipc.codec import (
    DECODE_ERRORS,
    NO_PAYLOAD,
    Message,
    decode,
    encode,
    pack_payload,
    parse_kind,
    parse_priority,
)
from ipc.errors import CodecError
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


class MirrorLine(DeadLetterView, frozen=True):
    """One letter of the JSON-lines mirror: its view, plus the whole message (msgpack, base64
    in JSON) so a restore brings back exactly what was dead-lettered (tags, metadata, ...)."""

    message: bytes = b""


_LINE_ERRORS: tuple[type[Exception], ...] = (
    *DECODE_ERRORS,
    msgspec.ValidationError,
    CodecError,
    ValueError,
    TypeError,
)
"""What a mirror line that does not parse raises (a torn last line, a hand edit)."""

DROP_LOG_INTERVAL_S = 10.0
"""At most one WARNING line per this interval about letters evicted from a full store."""


class Mirror:
    """The JSON-lines file behind ENGINE_DLQ_PATH, written and fsynced by its own thread.

    ``write`` only appends a line to a list under a lock: the dispatcher never waits for
    the disk.  The thread writes whatever gathered since its last round, then fsyncs once:
    one fsync per batch of letters, never one per letter.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 (closed by close())
        self._lines: list[bytes] = []
        self._cond = threading.Condition()
        self._closing = False
        self.synced = 0  # lines written and fsynced
        self.errors = 0  # lines that could not be written
        self._thread = threading.Thread(target=self._run, name="engine-dlq-mirror", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        with self._cond:
            self._lines.append(line)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closing:
                    self._cond.wait()
                lines, self._lines = self._lines, []
                closing = self._closing
            if lines:
                try:
                    self._file.write(b"".join(lines))
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    self.synced += len(lines)
                except OSError:
                    # The letters stay in the store (and count); only the file misses them.
                    self.errors += len(lines)
                    log.exception("cannot write %d dead letters to %s", len(lines), self.path)
            elif closing:
                return

    def close(self) -> None:
        """Write and fsync what is pending, then stop the thread and close the file."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._file.close()


class DeadLetterStore:
    """Keeps the newest ``limit`` dead letters, one per message id (redeliveries repeat them).

    With a ``path`` every stored letter is mirrored to that JSON-lines file (see `Mirror`),
    and a replayed one gets a ``{"replayed": ID}`` line; with ``restore`` the file's letters
    (less the replayed ones, the newest ``limit``, one per message id) are loaded first.
    An eviction from the full store is counted (``dropped``) and logged, rate-limited.
    """

    def __init__(
        self,
        limit: int,
        path: str = "",
        restore: bool = False,
        drop_log_interval_s: float = DROP_LOG_INTERVAL_S,
    ) -> None:
        self.limit = limit
        self._items: OrderedDict[int, DeadLetter] = OrderedDict()
        # Store key -> when it was stored (a count that only grows): the order of
        # `_items`, and a position that stays meaningful after its letter is gone.
        self._stored: dict[int, int] = {}
        self._stored_count = 0
        # Positions are numbered afresh by each process: a cursor of an earlier run
        # names this number, and is refused rather than read against the new ones.
        self.run = time.time_ns()
        self._encoder = msgspec.json.Encoder()
        self.dropped = 0
        self.drop_log = LogLimiter(drop_log_interval_s)
        self.path = path
        self.closed = False
        self._anonymous = 0
        self.restored = 0
        self.max_id = 0  # the highest message id restored: new ids must start above it
        if path and restore:
            self._restore(path)
        self._mirror: Mirror | None = Mirror(path) if path else None
        # Cluster mode: every settled letter also goes to the DLQ stream (engine.broker),
        # a repeat too (the first may belong to an epoch that was never acknowledged).
        self.forward: Callable[[DeadLetter], None] | None = None

    @property
    def file_errors(self) -> int:
        return self._mirror.errors if self._mirror is not None else 0

    def add(self, dl: DeadLetter) -> bool:
        """Store ``dl``; False if this message id was already dead-lettered."""
        if self.forward is not None:
            self.forward(dl)
        if not self._keep(dl):
            return False
        if self._mirror is not None:
            try:
                line = self._encoder.encode(_mirror_line(dl)) + b"\n"
            except (TypeError, ValueError, msgspec.EncodeError):
                self._mirror.errors += 1
                log.exception("cannot encode dead letter %d for %s", dl.message.id, self.path)
            else:
                self._mirror.write(line)
        return True

    def _keep(self, dl: DeadLetter) -> bool:
        mid = dl.message.id
        if mid == 0:  # an undecodable message has no id: keep every one
            self._anonymous -= 1
            mid = self._anonymous
        elif mid in self._items:
            return False
        self._store(mid, dl)
        if len(self._items) > self.limit:
            old_key, old = self._items.popitem(last=False)
            del self._stored[old_key]
            self.dropped += 1
            held = self.drop_log.allow("evicted")
            if held is not None:
                log.warning(
                    "dead-letter store full (ENGINE_DLQ_MAX=%d): evicted the oldest letter "
                    "(message %d, %s); %d evicted in all",
                    self.limit,
                    old.message.id,
                    old.reason,
                    self.dropped,
                    extra={"dead_letters_dropped": self.dropped, "suppressed": held},
                )
        return True

    def _restore(self, path: str) -> None:
        """Load the mirror's letters (see the class); a line that does not parse is skipped
        and named in a WARNING, as a line torn by a crash would be.  Then the file is
        compacted to the letters loaded (written aside, fsynced, renamed over it), unless a
        line did not parse: that one is left for a person to read."""
        try:
            with open(path, "rb") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        letters: OrderedDict[int, tuple[DeadLetter, bytes]] = OrderedDict()
        bad: list[int] = []
        anonymous = 0
        top = 0
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                item = msgspec.json.decode(raw)
                if isinstance(item, dict) and set(item) == {"replayed"}:
                    letters.pop(int(item["replayed"]), None)
                    continue
                dl = _from_line(msgspec.convert(item, MirrorLine))
            except _LINE_ERRORS:
                bad.append(number)
                continue
            mid = dl.message.id
            top = max(top, mid)
            if mid == 0:
                anonymous -= 1
                mid = anonymous
            letters.pop(mid, None)  # one per message id: the latest line wins
            letters[mid] = (dl, raw.rstrip(b"\n") + b"\n")
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            log.warning(
                "skipped %d unreadable lines of the dead-letter file %s (line %s)",
                len(bad),
                path,
                shown,
                extra={"path": path, "bad_lines": len(bad)},
            )
        kept = list(letters.values())[-self.limit :] if self.limit else []
        for dl, _ in kept:
            self._keep(dl)
        self.restored = len(kept)
        self.max_id = top
        if letters:
            log.info(
                "restored %d dead letters from %s%s",
                self.restored,
                path,
                f" (the newest {self.limit:,}, ENGINE_DLQ_MAX)" if len(letters) > len(kept) else "",
                extra={"path": path, "restored": self.restored},
            )
        if not bad and len(kept) < sum(1 for raw in lines if raw.strip()):
            _compact(path, [raw for _, raw in kept])

    def _store(self, key: int, dl: DeadLetter) -> None:
        self._stored_count += 1
        self._items[key] = dl
        self._stored[key] = self._stored_count

    def items(self) -> list[DeadLetter]:
        return list(self._items.values())

    def positioned(self) -> list[tuple[tuple[int, int], DeadLetter]]:
        """((run, position), letter), oldest first.  Positions only grow within a run, so
        a page cursor that names one still says where to go on after its letter was
        evicted or replayed; ``run`` (see __init__) tells a cursor of another run."""
        stored, run = self._stored, self.run
        return [((run, stored[key]), dl) for key, dl in self._items.items()]

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
        self._stored.pop(key, None)
        return self._items.pop(key, None)

    def replayed(self, dl: DeadLetter) -> None:
        """``dl`` was resubmitted (and `pop`-ped): the mirror must not restore it."""
        if self._mirror is not None and dl.message.id:
            self._mirror.write(b'{"replayed":%d}\n' % dl.message.id)

    def put_back(self, key: int, dl: DeadLetter) -> None:
        """Store again a letter `pop` took (a replay that could not queue it), as the newest."""
        self._store(key, dl)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Close the mirror (its pending letters fsynced first); without one, say how many
        letters die with the process."""
        if self.closed:
            return
        self.closed = True
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        elif self._items and not self.path:
            log.warning(
                "discarding %d dead letters kept in memory: set ENGINE_DLQ_PATH to keep "
                "them in a file, or read them (dead_letters(), GET /v1/dead-letters) "
                "before stopping",
                len(self._items),
                extra={"dead_letters": len(self._items)},
            )


def _compact(path: str, lines: list[bytes]) -> None:
    """Replace the file at ``path`` by ``lines``, durably; on failure it stays as it was."""
    tmp = f"{path}.compact"
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        log.exception("cannot compact the dead-letter file %s; it is kept as it was", path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _mirror_line(dl: DeadLetter) -> MirrorLine:
    v = view(dl)
    fields = {f: getattr(v, f) for f in v.__struct_fields__}
    fields["replay_error"] = ""
    return MirrorLine(**fields, message=encode(dl.message))


def _from_line(line: MirrorLine) -> DeadLetter:
    """A mirrored letter back as a DeadLetter (from its whole message when the line has it)."""
    if line.message:
        msg = decode(line.message)
    else:  # a line written before the message was mirrored whole
        msg = Message(
            id=line.id,
            recipient=line.recipient,
            kind=parse_kind(line.kind),
            priority=parse_priority(line.priority),
            payload=NO_PAYLOAD if line.payload_dropped else pack_payload(line.payload),
        )
    return DeadLetter(
        msg,
        line.reason,
        line.attempts,
        line.error,
        traceback=line.traceback,
        payload_dropped=line.payload_dropped,
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
