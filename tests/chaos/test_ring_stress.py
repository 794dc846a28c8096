"""Scenario 11: index publications through the ring's 8-byte stores, read back by another
process with no torn or backward-moving value.

The writer stores into a real ring segment's ``write`` index through ``Ring.idx``
(``memoryview.cast("Q")``, exactly as ``RingProducer.offer`` publishes).  Value ``i``
is stored as ``i * (2**32 + 1)``: its high and low 32-bit halves are equal, so a torn
read (halves of two different stores) shows as ``v % (2**32 + 1) != 0``, and values
only grow.  Tight loops with no sleeps on purpose: the stores must race the reads.
``CHAOS_SCALE=full`` does the issue's 100,000,000 publications.

A control run publishes with ``struct.pack_into`` (which writes the bytes piecewise, so
a reader can see a half-written value) to show the reader does catch bad publication.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import multiprocess as mp
import pytest

from ipc.ring import _WRITE, Ring
from tests.chaos.harness import size

CTX = mp.get_context("spawn")
K = (1 << 32) + 1  # value of publication i: i * K (equal 32-bit halves)
_Q = struct.Struct("<Q")


def _writer(name: str, n: int, mode: str, go: Any) -> None:
    ring = Ring.attach(name)
    idx = ring.idx
    go.wait(30)
    try:
        if mode == "memoryview":
            for v in range(K, (n + 1) * K, K):
                idx[_WRITE] = v
        else:  # control: the store the design forbids
            buf, off = ring.buf, _WRITE * 8
            for v in range(K, (n + 1) * K, K):
                _Q.pack_into(buf, off, v)
    finally:
        del idx
        ring.close()


def _reader(name: str, n: int, timeout: float, out: Any, go: Any) -> None:
    """Read the index until the last value shows; count torn and backward values."""
    ring = Ring.attach(name)
    idx = ring.idx
    final = n * K
    prev = reads = changes = torn = backward = 0
    examples: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + timeout
    go.set()
    while prev != final:
        for _ in range(100_000):
            v = idx[_WRITE]
            if v != prev:
                changes += 1
                if v % K:
                    torn += 1
                    if len(examples) < 5:
                        examples.append(("torn", prev, v))
                elif v < prev:
                    backward += 1
                    if len(examples) < 5:
                        examples.append(("backward", prev, v))
                prev = v
                if v == final:
                    break
        reads += 100_000
        if time.monotonic() > deadline:
            break
    out.send(
        {
            "reads": reads,
            "changes_seen": changes,
            "torn": torn,
            "backward": backward,
            "reached_final": prev == final,
            "examples": examples,
        }
    )
    del idx
    ring.close()


def run_pair(name: str, n: int, mode: str, timeout: float) -> dict[str, Any]:
    here, there = CTX.Pipe(duplex=False)
    go = CTX.Event()
    reader = CTX.Process(target=_reader, args=(name, n, timeout, there, go))
    writer = CTX.Process(target=_writer, args=(name, n, mode, go))
    t0 = time.monotonic()
    try:
        reader.start()
        writer.start()
        assert here.poll(timeout + 30), "the reader never reported"
        result: dict[str, Any] = here.recv()
        writer.join(timeout + 30)
        reader.join(30)
        result["writer_exit"] = writer.exitcode
        result["seconds"] = round(time.monotonic() - t0, 2)
        return result
    finally:
        for p in (reader, writer):
            if p.is_alive():
                p.kill()
                p.join(10)


@pytest.mark.timeout(600)
def test_index_publications_never_torn_or_backward(shm_prefix: str, report: dict[str, Any]) -> None:
    n = size("ring_publications")
    runs: dict[str, dict[str, Any]] = {}
    for mode, count, timeout in (("memoryview", n, 540), ("pack_into", 2_000_000, 60)):
        ring = Ring.create(f"{shm_prefix}stress-{mode}", 4096)  # a fresh index at 0
        try:
            runs[mode] = run_pair(ring.segment.name, count, mode, timeout)
        finally:
            ring.close()
    result, control = runs["memoryview"], runs["pack_into"]
    report.update(
        publications=n,
        full_scale_publications=100_000_000,
        memoryview_stores=result,
        control_struct_pack_into=control,
    )
    assert result["writer_exit"] == 0 and result["reached_final"], result
    assert result["torn"] == 0 and result["backward"] == 0, result["examples"]
    assert result["changes_seen"] >= 1000, "the reader never raced the writer"
    # The control proves the reader catches bad publication (zeroed or half-written).
    assert control["torn"] + control["backward"] > 0, control
