"""Control-pipe messages: real cross-process round trips, the histogram, bad input."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc.control import (
    MAX_BUCKETS,
    MAX_CONTROL_BYTES,
    MAX_TRACKABLE_NS,
    SUB_BUCKETS,
    Command,
    ControlConnection,
    ControlMessage,
    Heartbeat,
    Histogram,
    StatsSnapshot,
    WorkerFailed,
    WorkerReady,
    bucket_bounds,
    bucket_index,
    decode_control,
    encode_control,
    recv_control,
    send_control,
)
from ipc.errors import CodecError

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
ECHO_TIMEOUT_S = 30

# ---------------------------------------------------------------- strategies

ids = st.integers(min_value=0, max_value=UINT64_MAX)
stamps = st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
latencies = st.integers(min_value=0, max_value=MAX_TRACKABLE_NS)
latency_lists = st.lists(latencies, max_size=60)


def histogram_of(values: list[int]) -> Histogram:
    hist = Histogram()
    for ns in values:
        hist.record(ns)
    return hist


histograms = latency_lists.map(histogram_of)

control_messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(Heartbeat, worker=ids, pid=ids, beat=ids, sent_ns=stamps),
    st.builds(
        StatsSnapshot,
        worker=ids,
        pid=ids,
        counters=st.dictionaries(st.text(), st.integers(INT64_MIN, UINT64_MAX), max_size=8),
        latency_start=histograms,
        latency_settle=histograms,
        sent_ns=stamps,
    ),
    st.builds(Command, op=st.sampled_from(["stop", "reload", "snapshot"]), arg=st.text()),
    st.builds(WorkerReady, worker=ids, pid=ids),
    st.builds(WorkerFailed, worker=ids, pid=ids, error=st.text()),
)

# ------------------------------------------------------- the echo process


def _echo(conn: ControlConnection) -> None:
    """Child: decode each message and send it back re-encoded; report bad input as WorkerFailed.

    Stops on Command("stop", "echo-exit") or when the parent closes its end.
    """
    while True:
        try:
            msg = recv_control(conn)
        except EOFError:
            return
        except CodecError as exc:
            send_control(conn, WorkerFailed(worker=0, pid=os.getpid(), error=str(exc)))
            continue
        send_control(conn, msg)
        if msg == Command("stop", "echo-exit"):
            return


class Echo:
    """Parent side of a pipe to an echo child in another process."""

    def __init__(self, conn: Any, proc: Any) -> None:
        self.conn = conn
        self.proc = proc

    def round_trip(self, msg: ControlMessage) -> ControlMessage:
        send_control(self.conn, msg)
        return self.receive()

    def receive(self) -> ControlMessage:
        assert self.conn.poll(ECHO_TIMEOUT_S), "echo child did not answer"
        return recv_control(self.conn)


def _context(library: str) -> Any:
    if library == "multiprocess":
        mp = pytest.importorskip("multiprocess")
        return mp.get_context("spawn")
    return multiprocessing.get_context("spawn")


@pytest.fixture(scope="module", params=["multiprocessing", "multiprocess"])
def echo(request: pytest.FixtureRequest) -> Iterator[Echo]:
    """One spawned child per module and library: spawning per example would be slow."""
    ctx = _context(request.param)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    child.close()
    yield Echo(parent, proc)
    send_control(parent, Command("stop", "echo-exit"))
    assert recv_control(parent) == Command("stop", "echo-exit")
    proc.join(ECHO_TIMEOUT_S)
    parent.close()
    assert proc.exitcode == 0


# ------------------------------------------------------------- round trips


def test_echo_runs_in_another_process(echo: Echo) -> None:
    assert echo.proc.pid != os.getpid()
    assert echo.proc.is_alive()


@pytest.mark.parametrize(
    "msg",
    [
        Heartbeat(worker=3, pid=4242, beat=17, sent_ns=123_456_789),
        StatsSnapshot(
            worker=1,
            pid=99,
            counters={"delivered": 10, "expired": 0, "redelivered": 2},
            latency_start=histogram_of([1, 15, 16, 1_000, 2_500_000]),
            latency_settle=Histogram(),
            sent_ns=5,
        ),
        Command("stop"),
        Command("reload", arg="30"),
        Command("reload", arg="handlers:deliver"),
        Command("snapshot"),
        WorkerReady(worker=0, pid=1),
        WorkerFailed(worker=2, pid=77, error="ImportError: no module named 'handlers' ✗"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_each_control_message_round_trips_through_a_process(
    echo: Echo, msg: ControlMessage
) -> None:
    back = echo.round_trip(msg)
    assert type(back) is type(msg)
    assert back == msg


@given(msg=control_messages)
def test_any_control_message_round_trips_through_a_process(echo: Echo, msg: ControlMessage) -> None:
    assert echo.round_trip(msg) == msg


def test_child_rejects_garbage_with_codec_error_and_keeps_serving(echo: Echo) -> None:
    echo.conn.send_bytes(b"\x93\xa4nope\x01\x02")  # an unknown tag
    failed = echo.receive()
    assert isinstance(failed, WorkerFailed)
    assert "cannot decode control message" in failed.error
    assert failed.pid == echo.proc.pid
    assert echo.round_trip(WorkerReady(worker=5, pid=6)) == WorkerReady(worker=5, pid=6)


def test_control_messages_are_tagged_arrays_not_pickles() -> None:
    assert encode_control(Command("stop")) == msgspec.msgpack.encode(["cmd", "stop", ""])
    assert encode_control(WorkerReady(1, 2)) == msgspec.msgpack.encode(["ready", 1, 2])


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",
        b"\x92",
        msgspec.msgpack.encode(["nope", 1]),  # unknown tag
        msgspec.msgpack.encode(["cmd", "explode"]),  # op outside the Literal
        msgspec.msgpack.encode(["hb", -1, 1, 1, 1]),  # negative worker
        msgspec.msgpack.encode(["hb", 1, 1, 1]),  # missing sent_ns
        msgspec.msgpack.encode(["stats", 0, 1, {}, [[-1]], [], 0]),  # negative bucket count
        msgspec.msgpack.encode(["stats", 0, 1, {}, [[0] * (MAX_BUCKETS + 1)], [], 0]),
        msgspec.msgpack.encode(["ready", 1, 2]) + b"\x00",  # trailing bytes
        b"\x91\xa2\x00\x80",  # invalid UTF-8 in the tag (msgspec: UnicodeDecodeError)
        msgspec.msgpack.encode(["failed", 1, 2, "ok"])[:-3] + b"\xa2\xff\xfe",  # and in a str
        b"\x91" * 100_000 + b"\xc0",  # nesting deep enough for RecursionError
    ],
)
def test_garbage_raises_codec_error(garbage: bytes) -> None:
    with pytest.raises(CodecError, match="cannot decode control message") as info:
        decode_control(garbage)
    assert isinstance(info.value.__cause__, (msgspec.DecodeError, ValueError, RecursionError))


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_codec_error(garbage: bytes) -> None:
    try:
        decode_control(garbage)
    except CodecError:
        return
    # The rare random buffer that is a valid message must re-encode to itself.
    assert encode_control(decode_control(garbage)) == garbage


def test_oversize_buffer_is_rejected_before_decoding() -> None:
    # A *valid* message just over the cap: only the size check can reject it.
    big = msgspec.msgpack.encode(["failed", 1, 2, "x" * MAX_CONTROL_BYTES])
    assert msgspec.msgpack.decode(big, type=ControlMessage) == WorkerFailed(
        1, 2, "x" * MAX_CONTROL_BYTES
    )
    for buf in (big, bytearray(big), memoryview(big)):
        with pytest.raises(CodecError, match="exceeds MAX_CONTROL_BYTES"):
            decode_control(buf)


def test_encode_refuses_what_the_receiver_would_reject() -> None:
    with pytest.raises(CodecError, match="over MAX_CONTROL_BYTES"):
        encode_control(WorkerFailed(1, 2, "x" * MAX_CONTROL_BYTES))


def test_send_of_oversize_message_writes_nothing() -> None:
    left, right = multiprocessing.Pipe()
    with left, right:
        with pytest.raises(CodecError):
            send_control(left, WorkerFailed(1, 2, "x" * MAX_CONTROL_BYTES))
        send_control(left, Command("reload"))
        assert recv_control(right) == Command("reload")  # the stream is still in sync


def test_recv_of_oversize_frame_raises_codec_error() -> None:
    """A peer that bypasses send_control cannot make the receiver allocate past the cap."""
    left, right = multiprocessing.Pipe()

    def flood() -> None:
        with contextlib.suppress(OSError):  # the reader gives up and closes its end
            left.send_bytes(b"\x00" * (MAX_CONTROL_BYTES + 1))

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    with pytest.raises(CodecError, match="out of sync"):
        recv_control(right)
    right.close()
    sender.join(ECHO_TIMEOUT_S)
    left.close()
    assert not sender.is_alive()


def test_recv_raises_eof_when_the_peer_is_gone() -> None:
    left, right = multiprocessing.Pipe()
    left.close()
    with right, pytest.raises(EOFError):
        recv_control(right)


# --------------------------------------------------------------- histogram


def test_bucket_bounds_tile_the_whole_range_without_gaps() -> None:
    assert bucket_bounds(0) == (0, 1)
    for i in range(MAX_BUCKETS - 1):
        lower, upper = bucket_bounds(i)
        assert upper == bucket_bounds(i + 1)[0]
        assert bucket_index(lower) == i
        assert bucket_index(upper - 1) == i
        # Log scale: a bucket is at most 1/SUB_BUCKETS of its lower bound wide.
        assert (upper - lower) * SUB_BUCKETS <= max(lower, SUB_BUCKETS)
    assert bucket_index(MAX_TRACKABLE_NS) == MAX_BUCKETS - 1
    assert bucket_bounds(MAX_BUCKETS - 1)[1] == MAX_TRACKABLE_NS + 1
    with pytest.raises(ValueError, match="bucket index"):
        bucket_bounds(MAX_BUCKETS)


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_every_value_lands_in_the_bucket_that_covers_it(ns: int) -> None:
    clamped = min(max(ns, 0), MAX_TRACKABLE_NS)
    lower, upper = bucket_bounds(bucket_index(ns))
    assert lower <= clamped < upper


@given(latency_lists)
def test_count_sum_and_max_are_exact(values: list[int]) -> None:
    hist = histogram_of(values)
    assert hist.count == len(values)
    assert hist.sum_ns == sum(values)
    assert hist.max_ns == max(values, default=0)


@given(latency_lists, st.lists(st.integers(min_value=INT64_MIN, max_value=UINT64_MAX), max_size=20))
def test_record_many_counts_exactly_what_record_does(before: list[int], values: list[int]) -> None:
    """The fast path's per-frame call: same buckets, sum and max as one record() each,
    out-of-range values clamped alike, into a histogram that already holds values."""
    one_by_one, at_once = histogram_of(before), histogram_of(before)
    for ns in values:
        one_by_one.record(ns)
    at_once.record_many(values)
    assert at_once == one_by_one
    assert at_once.count == len(before) + len(values)


def test_out_of_range_values_are_clamped() -> None:
    hist = histogram_of([-5, MAX_TRACKABLE_NS * 4])
    assert hist.count == 2
    assert hist.buckets[0] == 1
    assert hist.max_ns == MAX_TRACKABLE_NS
    assert len(hist.buckets) == MAX_BUCKETS


@given(latency_lists, latency_lists)
def test_merge_is_commutative_and_equals_recording_everything(a: list[int], b: list[int]) -> None:
    ab, ba = histogram_of(a), histogram_of(b)
    ab.merge(histogram_of(b))
    ba.merge(histogram_of(a))
    assert ab == ba
    assert ab == histogram_of(a + b)


@given(latency_lists, latency_lists, latency_lists)
def test_merge_is_associative(a: list[int], b: list[int], c: list[int]) -> None:
    left = histogram_of(a)
    left.merge(histogram_of(b))
    left.merge(histogram_of(c))
    bc = histogram_of(b)
    bc.merge(histogram_of(c))
    right = histogram_of(a)
    right.merge(bc)
    assert left == right


def test_merge_with_itself_doubles_the_counts() -> None:
    hist = histogram_of([1, 100, 100])
    hist.merge(hist)
    assert hist == histogram_of([1, 1, 100, 100, 100, 100])


@given(
    st.lists(latencies, min_size=1, max_size=200),
    st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=10),
)
def test_percentiles_are_monotone_and_within_one_bucket(values: list[int], qs: list[float]) -> None:
    hist = histogram_of(values)
    ordered = sorted(values)
    estimates = []
    for q in sorted([*qs, 0.0, 50.0, 100.0]):
        estimate = hist.percentile_ns(q)
        exact = ordered[max(1, math.ceil(q * len(values) / 100)) - 1]
        # Same bucket as the exact order statistic, so off by less than its width.
        assert bucket_index(estimate) == bucket_index(exact)
        assert abs(estimate - exact) * SUB_BUCKETS <= max(exact, SUB_BUCKETS)
        assert hist.percentile(q) == estimate / 1e9
        estimates.append(estimate)
    assert estimates == sorted(estimates)
    assert hist.percentile_ns(100) == max(values)


def test_small_values_are_exact() -> None:
    hist = histogram_of([3, 7, 7, 9])
    assert hist.percentile_ns(50) == 7
    assert hist.percentile_ns(25) == 3
    assert hist.percentile_ns(0) == 3


def test_percentile_of_empty_histogram_is_zero_and_q_is_checked() -> None:
    assert Histogram().percentile(99) == 0.0
    assert Histogram().count == 0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        histogram_of([1]).percentile(100.5)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        histogram_of([1]).percentile(-1)


def test_idle_histogram_is_tiny_on_the_wire() -> None:
    snapshot = StatsSnapshot(1, 2, {}, Histogram(), Histogram(), 0)
    assert len(encode_control(snapshot)) <= 20  # 19, plus 1 for the empty backlog list
