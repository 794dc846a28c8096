"""Typed control-pipe messages between workers and their monitor.

The control pipe carries heartbeats, stats and commands. It is msgpack bytes
through one typed decoder, never pickle: a worker runs user code, and
unpickling whatever it writes would hand that code the monitor too. Every
message is a tagged array-like Struct, so the decoder picks the type from the
first array element and validates the rest.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from fractions import Fraction
from typing import Annotated, Final, Literal, Protocol

import msgspec

from ipc.codec import DECODE_ERRORS
from ipc.errors import CodecError

__all__ = [
    "MAX_BUCKETS",
    "MAX_CONTROL_BYTES",
    "MAX_TRACKABLE_NS",
    "SUB_BUCKETS",
    "Command",
    "EventLevel",
    "ControlConnection",
    "ControlMessage",
    "Heartbeat",
    "Histogram",
    "MonitorEvent",
    "MonitorReport",
    "StatsSnapshot",
    "WorkerFailed",
    "WorkerInfo",
    "WorkerReady",
    "WorkerRecycled",
    "bucket_bounds",
    "bucket_index",
    "decode_control",
    "encode_control",
    "recv_control",
    "send_control",
]

MAX_CONTROL_BYTES: Final = 1 << 20
"""Largest control message accepted (1 MiB): checked before decoding or allocating."""

# Histogram layout: log-linear buckets, HdrHistogram style. Values below
# SUB_BUCKETS get one bucket each; every power-of-two range above is split into
# SUB_BUCKETS equal buckets, so a bucket is at most 1/SUB_BUCKETS (6.25 %) of
# its lower bound wide. Pure integer math: no float log on the hot path.
_SUB_BITS: Final = 4
SUB_BUCKETS: Final = 1 << _SUB_BITS
MAX_TRACKABLE_NS: Final = (1 << 47) - 1
"""Larger latencies (over ~39 hours) are recorded as this value."""
_MAX_INDEX: Final = (MAX_TRACKABLE_NS.bit_length() - _SUB_BITS) * SUB_BUCKETS + SUB_BUCKETS - 1
MAX_BUCKETS: Final = _MAX_INDEX + 1

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


def bucket_index(ns: int) -> int:
    """Bucket of a latency in ns; negative values count as 0, huge ones as the cap."""
    if ns < SUB_BUCKETS:
        return max(ns, 0)
    ns = min(ns, MAX_TRACKABLE_NS)
    shift = ns.bit_length() - 1 - _SUB_BITS
    return ((shift + 1) << _SUB_BITS) + (ns >> shift) - SUB_BUCKETS


def bucket_bounds(index: int) -> tuple[int, int]:
    """[lower, upper) ns covered by a bucket, e.g. for Prometheus `le` labels."""
    if not 0 <= index < MAX_BUCKETS:
        raise ValueError(f"bucket index {index} outside 0..{MAX_BUCKETS - 1}")
    if index < SUB_BUCKETS:
        return index, index + 1
    shift = (index >> _SUB_BITS) - 1
    lower = (SUB_BUCKETS + (index & (SUB_BUCKETS - 1))) << shift
    return lower, lower + (1 << shift)


class Histogram(msgspec.Struct, array_like=True):
    """Mergeable latency histogram: fixed log-linear buckets, no per-message records.

    Workers record into their own histogram and ship it in a StatsSnapshot;
    the monitor merges them, which is exact because every histogram shares the
    same bucket boundaries. `buckets` holds counts up to the highest used
    bucket only, so an idle histogram is a few bytes on the wire.
    """

    buckets: Annotated[list[NonNegative], msgspec.Meta(max_length=MAX_BUCKETS)] = msgspec.field(
        default_factory=list
    )
    max_ns: NonNegative = 0
    sum_ns: NonNegative = 0
    """Sum of recorded values, for means and Prometheus `_sum`."""

    def record(self, ns: int) -> None:
        """Count one latency (ns); cheap enough to call twice per delivered message."""
        # Comparisons, not min()/max(): on CPython 3.11 those builtins cost ~100 ns each.
        if ns < 0:
            ns = 0
        elif ns > MAX_TRACKABLE_NS:
            ns = MAX_TRACKABLE_NS
        if ns < SUB_BUCKETS:
            i = ns
        else:  # bucket_index() inlined: this runs for every message
            shift = ns.bit_length() - 1 - _SUB_BITS
            i = ((shift + 1) << _SUB_BITS) + (ns >> shift) - SUB_BUCKETS
        buckets = self.buckets
        if i >= len(buckets):
            buckets.extend([0] * (i + 1 - len(buckets)))
        buckets[i] += 1
        self.sum_ns += ns
        if ns > self.max_ns:  # noqa: PLR1730 - see above
            self.max_ns = ns

    def record_many(self, values: list[int]) -> None:
        """Count many latencies (ns) at once: exactly what ``record`` of each would count.

        The worker's sync fast path feeds a whole frame's latencies here: one call
        per frame instead of two per message.  ``values`` is sorted in place (a
        frame's latencies nearly are already), then each bucket's share is
        counted with a bisection, so the Python work is per bucket touched (a
        handful per frame), not per value.
        """
        if not values:
            return
        values.sort()
        n = len(values)
        total = sum(values)
        i = bisect_left(values, 0)
        if i:  # negative values count as 0
            total -= sum(values[:i])
            self._add(0, i)
        top = bisect_right(values, MAX_TRACKABLE_NS, i)
        if top < n:  # huge values count as the cap
            total -= sum(values[top:]) - (n - top) * MAX_TRACKABLE_NS
            self._add(_MAX_INDEX, n - top)
        while i < top:
            ns = values[i]
            if ns < SUB_BUCKETS:
                b, upper = ns, ns + 1
            else:  # bucket_index() and bucket_bounds() inlined
                shift = ns.bit_length() - 1 - _SUB_BITS
                b = ((shift + 1) << _SUB_BITS) + (ns >> shift) - SUB_BUCKETS
                upper = ((ns >> shift) + 1) << shift
            j = bisect_left(values, upper, i, top)
            self._add(b, j - i)
            i = j
        self.sum_ns += total
        high = MAX_TRACKABLE_NS if top < n else values[top - 1] if top else 0
        if high > self.max_ns:  # noqa: PLR1730 - comparisons, as in record()
            self.max_ns = high

    def _add(self, index: int, count: int) -> None:
        buckets = self.buckets
        if index >= len(buckets):
            buckets.extend([0] * (index + 1 - len(buckets)))
        buckets[index] += count

    def merge(self, other: Histogram) -> None:
        """Add `other`'s counts into this histogram (in place, like set.update)."""
        mine, theirs = self.buckets, other.buckets
        if len(theirs) > len(mine):
            mine.extend([0] * (len(theirs) - len(mine)))
        for i, n in enumerate(theirs):
            if n:
                mine[i] += n
        self.sum_ns += other.sum_ns
        self.max_ns = max(self.max_ns, other.max_ns)

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return sum(self.buckets)

    def percentile_ns(self, q: float) -> int:
        """Latency at percentile `q` (0-100) in ns; 0 when empty.

        Returns the middle of the bucket holding the q-th value, capped at the
        exact maximum, so the error is under one bucket width (<= 1/16 of the
        true value) and percentile_ns(100) is exactly `max_ns`.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be within 0..100, got {q!r}")
        total = self.count
        if total == 0:
            return 0
        if q == 100:
            return self.max_ns
        rank = max(1, math.ceil(Fraction(q) * total / 100))  # exact: no float rounding
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                lower, upper = bucket_bounds(i)
                return min((lower + upper - 1) // 2, self.max_ns)
        return self.max_ns  # unreachable with consistent counts

    def percentile(self, q: float) -> float:
        """Latency at percentile `q` (0-100) in seconds, the unit stats are reported in."""
        return self.percentile_ns(q) / 1e9


class Heartbeat(msgspec.Struct, array_like=True, tag="hb"):
    """Sent by a worker on a timer; its age tells the monitor a worker has stalled."""

    worker: NonNegative
    pid: NonNegative
    beat: NonNegative
    sent_ns: int
    """CLOCK_MONOTONIC ns when sent (machine-wide on Linux)."""


class StatsSnapshot(msgspec.Struct, array_like=True, tag="stats"):
    """A worker's cumulative counters and latency histograms, merged by the monitor."""

    worker: NonNegative
    pid: NonNegative
    counters: dict[str, int]
    latency_start: Histogram
    """Submit (created_ns) to handler start."""
    latency_settle: Histogram
    """Submit to settle (delivered, dead-lettered or expired)."""
    sent_ns: int
    backlog: list[tuple[str, NonNegative]] = []
    """The recipients with the most messages fetched and not yet settled, largest first."""


class Command(msgspec.Struct, array_like=True, tag="cmd"):
    """An instruction from the monitor to a worker."""

    op: Literal["stop", "reload", "snapshot"]
    arg: str = ""


class WorkerReady(msgspec.Struct, array_like=True, tag="ready"):
    """Sent once a worker has attached its rings and can take messages."""

    worker: NonNegative
    pid: NonNegative


class WorkerFailed(msgspec.Struct, array_like=True, tag="failed"):
    """Sent when a worker cannot boot or must exit, so the monitor need not guess why."""

    worker: NonNegative
    pid: NonNegative
    error: str


class WorkerRecycled(msgspec.Struct, array_like=True, tag="recycled"):
    """Sent by the monitor when it asks a worker to exit gracefully and be replaced."""

    worker: NonNegative
    pid: NonNegative
    reason: str


EventLevel = Literal["debug", "info", "warning", "error"]


class MonitorEvent(msgspec.Struct, array_like=True, tag="event"):
    """Something the monitor saw (a death, a stall kill, a respawn, a quarantine).

    The dispatcher writes its log line and tells its listeners: one process logs
    every event, in the format the service chose.
    """

    event: str  # what happened, e.g. "worker_died"
    level: EventLevel
    message: str
    worker: int = -1
    detail: dict[str, str | int | float | bool] = {}


class WorkerInfo(msgspec.Struct, array_like=True):
    """One worker as the monitor sees it: process facts and its delivered count."""

    worker: NonNegative
    pid: NonNegative
    alive: bool
    restarts: NonNegative
    cpu_percent: float
    rss_bytes: NonNegative
    delivered: NonNegative
    beat_age_s: float
    recycled: NonNegative = 0  # graceful restarts: reload, RSS or message limit
    error: str = ""  # why the worker cannot boot, while it cannot


class MonitorReport(msgspec.Struct, array_like=True, tag="report"):
    """The monitor's merged view of all workers, sent to the dispatcher periodically."""

    monitor_pid: NonNegative
    workers: list[WorkerInfo]
    counters: dict[str, int]
    latency_start: Histogram
    latency_settle: Histogram
    sent_ns: int
    backlog: list[tuple[str, NonNegative]] = []
    """The recipients with the most messages held by the workers, largest first."""


ControlMessage = (
    Heartbeat
    | StatsSnapshot
    | Command
    | WorkerReady
    | WorkerFailed
    | WorkerRecycled
    | MonitorReport
    | MonitorEvent
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)


def encode_control(msg: ControlMessage) -> bytes:
    """Encode a control message; refuses ones the receiver would reject as oversize."""
    buf = _encoder.encode(msg)
    if len(buf) > MAX_CONTROL_BYTES:
        raise CodecError(
            f"{type(msg).__name__} encodes to {len(buf)} bytes, "
            f"over MAX_CONTROL_BYTES={MAX_CONTROL_BYTES}"
        )
    return buf


def decode_control(buf: bytes | bytearray | memoryview) -> ControlMessage:
    """Decode one control message, checking the size before msgspec allocates anything."""
    size = memoryview(buf).nbytes
    if size > MAX_CONTROL_BYTES:
        raise CodecError(
            f"control message of {size} bytes exceeds MAX_CONTROL_BYTES={MAX_CONTROL_BYTES}"
        )
    try:
        return _decoder.decode(buf)
    except DECODE_ERRORS as exc:
        raise CodecError(f"cannot decode control message of {size} bytes: {exc}") from exc


class ControlConnection(Protocol):
    """The part of a (multiprocess or multiprocessing) Connection the control pipe uses."""

    def send_bytes(self, buf: bytes, /) -> None:
        """Write one length-prefixed message."""

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Read one length-prefixed message."""


def send_control(conn: ControlConnection, msg: ControlMessage) -> None:
    """Send one control message as raw bytes (never Connection.send, which pickles)."""
    conn.send_bytes(encode_control(msg))


def recv_control(conn: ControlConnection) -> ControlMessage:
    """Receive and decode one control message; EOFError when the peer has gone.

    An oversize message raises CodecError, and the connection is then unusable:
    Connection.recv_bytes leaves the rejected body unread in the pipe.
    """
    try:
        buf = conn.recv_bytes(maxlength=MAX_CONTROL_BYTES)
    except OSError as exc:
        if exc.errno is not None:
            raise
        # Connection signals "bad message length" with an errno-less OSError.
        raise CodecError(
            f"control message over MAX_CONTROL_BYTES={MAX_CONTROL_BYTES}; "
            f"connection is out of sync and must be closed ({exc})"
        ) from exc
    return decode_control(buf)
