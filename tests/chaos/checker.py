"""The chaos checker: what the handlers saw, against what was accepted.

Input is what was accepted (``uid -> (recipient, seq)``) and the deliveries in the
order they happened (``recorder.read_all`` or ``read_inbox``).  Output is a plain dict
report -- lost, duplicated, out-of-order, unexpected, per-process duplicate counts,
latency percentiles, recovery times -- that the tests assert on and write as JSON.
It judges only observations, never the engine's own counters, so an engine that
miscounts cannot hide a loss.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.recorder import ANSWERED, DELIVERED, Delivery

SAMPLE = 10  # examples kept per problem in a report
Expected = Mapping[int, tuple[str, int]]  # uid -> (recipient, seq)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (sorted or not); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(deliveries: Iterable[Delivery]) -> dict[str, float | int | None]:
    """Submit -> handler start, over first deliveries only (redeliveries wait by design)."""
    seen: set[int] = set()
    lat: list[float] = []
    for d in deliveries:
        if d.uid not in seen and d.created_ns:
            seen.add(d.uid)
            lat.append(d.latency_ns / 1e6)
    lat.sort()
    return {
        "count": len(lat),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "max": lat[-1] if lat else None,
    }


@dataclass
class DeliveryCheck:
    """The verdict on one run; every count is of observations by the handlers."""

    expected: int = 0
    deliveries: int = 0
    delivered_unique: int = 0
    lost: int = 0
    duplicated: int = 0  # deliveries beyond the first of a message
    out_of_order: int = 0  # first deliveries that came after a later seq of their recipient
    unexpected: int = 0  # never accepted, or seen with another recipient/seq than accepted
    same_process_duplicates: int = 0  # one process delivered one message twice
    max_duplicates_per_process: int = 0  # redeliveries by one (respawned) process
    duplicates_by_process: dict[int, int] = field(default_factory=dict)
    latency_ms: dict[str, float | int | None] = field(default_factory=dict)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["duplicates_by_process"] = {str(k): v for k, v in self.duplicates_by_process.items()}
        return out


def check(expected: Expected, deliveries: Sequence[Delivery]) -> DeliveryCheck:
    """Compare deliveries (in the order they happened) with what was accepted.

    Order rule: per recipient, the *first* deliveries of messages must come in
    increasing ``seq``; a repeated message (a redelivery after a crash) may come
    again out of place, and is counted as a duplicate instead.
    """
    res = DeliveryCheck(expected=len(expected))
    ex: dict[str, list[Any]] = defaultdict(list)
    seen: set[int] = set()
    by_pid: set[tuple[int, int]] = set()
    top: dict[str, int] = {}
    dup_pids: Counter[int] = Counter()
    for d in deliveries:
        if d.kind not in (DELIVERED, ANSWERED):
            continue
        res.deliveries += 1
        want = expected.get(d.uid)
        if want is None or want != (d.recipient, d.seq):
            res.unexpected += 1
            _keep(ex, "unexpected", (d.uid, d.recipient, d.seq, want))
            continue
        if d.pid and (d.uid, d.pid) in by_pid:  # pid 0: the inbox sink does not say
            res.same_process_duplicates += 1
            _keep(ex, "same_process_duplicates", (d.uid, d.recipient, d.seq, d.pid))
        by_pid.add((d.uid, d.pid))
        if d.uid in seen:
            res.duplicated += 1
            dup_pids[d.pid] += 1
            continue
        seen.add(d.uid)
        last = top.get(d.recipient, -1)
        if d.seq < last:
            res.out_of_order += 1
            _keep(ex, "out_of_order", (d.recipient, d.seq, "after", last))
        else:
            top[d.recipient] = d.seq
    res.delivered_unique = len(seen)
    lost = [uid for uid in expected if uid not in seen]
    res.lost = len(lost)
    for uid in lost[:SAMPLE]:
        _keep(ex, "lost", (uid, *expected[uid]))
    res.duplicates_by_process = dict(dup_pids)
    res.max_duplicates_per_process = max(dup_pids.values(), default=0)
    res.latency_ms = latency_ms(d for d in deliveries if d.kind in (DELIVERED, ANSWERED))
    res.examples = dict(ex)
    return res


def _keep(ex: dict[str, list[Any]], key: str, item: Any) -> None:
    if len(ex[key]) < SAMPLE:
        ex[key].append(item)


def recovery(
    deliveries: Sequence[Delivery],
    kills: Sequence[tuple[int, int]],
    shard_of: Mapping[str, int],
    window_s: float = 0.1,
    prior_s: float = 1.0,
) -> list[dict[str, Any]]:
    """Per kill ``(t_ns, shard)``: time to the shard's first delivery and to 90% throughput.

    Prior throughput is the shard's delivery rate over ``prior_s`` before the kill;
    recovery to 90% is the end of the first ``window_s`` window after the kill whose
    rate reaches 90% of it (None if the stream ended first or there was no prior rate).
    """
    times: dict[int, list[int]] = defaultdict(list)
    for d in deliveries:
        if d.kind in (DELIVERED, ANSWERED):
            times[shard_of[d.recipient]].append(d.t_ns)
    for ts in times.values():
        ts.sort()
    out = []
    w_ns, prior_ns = int(window_s * 1e9), int(prior_s * 1e9)
    for t_kill, shard in kills:
        ts = times.get(shard, [])
        i = bisect.bisect_right(ts, t_kill)
        first_ms = (ts[i] - t_kill) / 1e6 if i < len(ts) else None
        prior = i - bisect.bisect_left(ts, t_kill - prior_ns)
        need = 0.9 * prior * window_s / prior_s
        to90 = None
        if prior and i < len(ts):
            # Slide a window start over the deliveries after the kill.
            for j in range(i, len(ts)):
                start = max(t_kill, ts[j] - w_ns)
                k = bisect.bisect_left(ts, start + w_ns, lo=j)
                if k - bisect.bisect_left(ts, start, lo=i) >= need:
                    to90 = (start + w_ns - t_kill) / 1e6
                    break
        out.append(
            {
                "shard": shard,
                "first_delivery_ms": first_ms,
                "to_90pct_throughput_ms": to90,
                "prior_rate_per_s": prior / prior_s,
            }
        )
    return out


def redelivery_per_kill(
    deliveries: Sequence[Delivery],
    kills: Sequence[tuple[int, int, int]],
    shard_of: Mapping[str, int],
) -> list[dict[str, Any]]:
    """Per kill ``(t_ns, shard, pid)``: what the killed process and its successor did.

    ``successor_duplicates`` are the successor's deliveries of messages delivered before;
    ``of_them_last_by_victim`` those whose previous delivery was the killed process's own
    (the rest it inherited from earlier processes of the shard, killed before they
    committed what they had redelivered).
    """
    last_by: dict[int, int] = {}
    first_t: dict[int, int] = {}
    new: Counter[int] = Counter()
    dups: Counter[int] = Counter()
    dups_from: Counter[tuple[int, int]] = Counter()
    pid_shard: dict[int, int] = {}
    for d in deliveries:
        if d.kind not in (DELIVERED, ANSWERED):
            continue
        pid_shard.setdefault(d.pid, shard_of[d.recipient])
        first_t.setdefault(d.pid, d.t_ns)
        prev = last_by.get(d.uid)
        if prev is None:
            new[d.pid] += 1
        else:
            dups[d.pid] += 1
            dups_from[(d.pid, prev)] += 1
        last_by[d.uid] = d.pid
    out = []
    for t_kill, shard, pid in kills:
        after = [p for p, t in first_t.items() if pid_shard[p] == shard and t > t_kill]
        succ = min(after, key=first_t.__getitem__) if after else None
        out.append(
            {
                "shard": shard,
                "victim": pid,
                "victim_lived_s": round((t_kill - first_t[pid]) / 1e9, 3)
                if pid in first_t
                else None,
                "victim_new_deliveries": new[pid],
                "victim_duplicates": dups[pid],
                "successor": succ,
                "successor_duplicates": dups[succ] if succ else 0,
                "of_them_last_by_victim": dups_from[(succ, pid)] if succ else 0,
            }
        )
    return out


def summarize_recovery(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    firsts = [x["first_delivery_ms"] for x in items if x["first_delivery_ms"] is not None]
    to90 = [x["to_90pct_throughput_ms"] for x in items if x["to_90pct_throughput_ms"] is not None]
    return {
        "kills": len(items),
        "first_delivery_ms": {"median": percentile(firsts, 50), "max": max(firsts, default=None)},
        "to_90pct_throughput_ms": {
            "median": percentile(to90, 50),
            "max": max(to90, default=None),
            "measured": len(to90),
        },
    }


def read_inbox(directory: Path) -> list[Delivery]:
    """Deliveries from the engine's ``inbox`` sink (``ENGINE_SINK=inbox``), payload ``[uid, seq]``.

    The inbox keeps no process or time, so each recipient's file order stands for the
    delivery order (``t_ns`` is the line number, ``pid`` 0): good for lost, duplicated,
    unexpected and per-recipient order, not for latency or recovery times.
    """
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        recipient = urllib.parse.unquote(path.name.removesuffix(".jsonl"))
        for line_no, line in enumerate(path.read_bytes().splitlines()):
            rec = json.loads(line)
            uid, seq = rec["payload"][:2]
            out.append(
                Delivery(uid, rec["id"], seq, 0, line_no, 0, rec["attempt"], DELIVERED, recipient)
            )
    return out


def pairwise_gaps_s(attempts: Sequence[Delivery]) -> list[float]:
    """Seconds between consecutive attempts (same message, in order)."""
    return [(b.t_ns - a.t_ns) / 1e9 for a, b in itertools.pairwise(attempts)]
