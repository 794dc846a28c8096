"""Issue 11 items 1, 2, 4, 5: return records that cannot crash a worker, corrupt frame
headers skipped, per-letter replay, dead-letter evictions counted and the mirror read back."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine import Config, Engine, Priority
from engine.core.deadletters import ReplayReport
from ipc.codec import Message
from ipc.records import DeadLetter
from ipc.ring import HEADER_BYTES
from ipc.shard import SLOT_PID
from tests.integration.service_proc import ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape

H = "tests.integration.handlers_data"


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {"workers": 1, "stats_interval_s": 0.1, "retry_max_attempts": 1}
    return Config.from_env(env={}, **(base | overrides))


def test_a_10_mb_exception_message_is_a_truncated_dead_letter_not_a_worker_crash() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[list[Any], dict[str, Any], list[int]]:
        async with Engine(f"{H}:oversize", cfg) as eng:
            ids = [await eng.submit("a", {"i": i}) for i in range(5)]
            huge = await eng.submit("a", {"huge": True})
            odd = await eng.submit("a", {"unprintable": True})
            ids += [await eng.submit("a", {"i": i}) for i in range(5, 10)]
            assert await eng.drain(60)
            await asyncio.sleep(0.3)  # a stats interval: the worker's counters arrive
            return eng.dead_letters(), eng.stats(), [huge, odd]

    letters, s, (huge, odd) = asyncio.run(go())
    assert s["delivered"] == 10 and s["dead_lettered"] == 2 and s["in_flight"] == 0
    assert s["workers"][0]["restarts"] == 0
    by_id = {dl.message.id: dl for dl in letters}
    big = by_id[huge]
    assert big.error.startswith("ValueError: xxx")
    assert big.error.endswith("[truncated, 10,485,772 chars]")
    assert len(big.error) <= 4096
    assert big.message.body() == {"huge": True} and not big.payload_dropped
    assert len(big.traceback) <= 8192 and "Traceback (most recent call last)" in big.traceback
    assert by_id[odd].error == "Unprintable: <str() of Unprintable raised RuntimeError>"


def test_replay_is_per_letter_and_keeps_what_cannot_be_replayed_with_the_reason() -> None:
    cfg = _config(return_ring_bytes=65536)

    async def go() -> tuple[ReplayReport, list[DeadLetter], list[DeadLetter], list[int], int]:
        async with Engine(f"{H}:reject", cfg) as eng:
            good = [await eng.submit("a", {"i": i}) for i in range(3)]
            big = await eng.submit("a", "x" * 40_000)  # too large for the return ring
            assert await eng.drain(60)
            assert eng.dispatcher is not None
            store = eng.dispatcher.dead
            store.add(DeadLetter(Message(id=0, recipient=""), "malformed", 1, "undecodable"))
            bad_raw = Message(id=10**9, recipient="a", payload=msgspec.Raw(b"\xc1"))
            store.add(DeadLetter(bad_raw, "rejected", 1, "no"))
            dropped = [dl.payload_dropped for dl in eng.dead_letters()]
            assert dropped == [False, False, False, True, False, False]
            report = await eng.replay_dead_letters()
            letters = eng.dead_letters()
            assert await eng.drain(60)  # the replayed ones are rejected again, as new messages
            s = eng.stats()
            assert s["submitted"] == 7 and s["dead_lettered"] == 7 and s["in_flight"] == 0
            return report, letters, eng.dead_letters(), good, big

    report, kept, after, good, big = asyncio.run(go())
    assert report == ReplayReport(3, 3, {"payload_dropped": 1, "malformed": 1, "rebuild_failed": 1})
    assert [dl.message.id for dl in kept] == [big, 0, 10**9]
    assert "dropped for size" in kept[0].replay_error
    assert "no recipient" in kept[1].replay_error
    assert kept[2].replay_error.startswith("CodecError: payload given as msgspec.Raw")
    again = [dl for dl in after if dl not in kept]  # the good ones, rejected again
    assert sorted(dl.message.body()["i"] for dl in again) == [0, 1, 2]
    assert not {dl.message.id for dl in again} & set(good)


def test_evictions_from_the_full_store_are_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _config(dlq_max=2)

    async def go() -> tuple[list[DeadLetter], dict[str, Any]]:
        async with Engine(f"{H}:reject", cfg) as eng:
            await eng.submit_many(("a", i) for i in range(5))
            assert await eng.drain(60)
            return eng.dead_letters(), eng.stats()

    with caplog.at_level(logging.WARNING, logger="engine.deadletters"):
        letters, s = asyncio.run(go())
    assert [dl.message.body() for dl in letters] == [3, 4]
    assert s["dead_lettered"] == 5 and s["dead_letters_stored"] == 2
    assert s["dead_letters_dropped"] == 3
    lines = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert lines == [
        "dead-letter store full (ENGINE_DLQ_MAX=2): evicted the oldest letter "
        "(message 1, rejected); 1 evicted in all"
    ]  # one line per 10 s interval, not one per eviction


def _post(svc: ServiceProc, path: str, body: Any = None) -> tuple[int, Any]:
    data = msgspec.json.encode(body) if body is not None else b""
    status, out = http(
        svc, "POST", path, data, token=None, headers={"Content-Type": "application/json"}
    )
    return status, msgspec.json.decode(out)


def _letters(svc: ServiceProc) -> dict[int, dict[str, Any]]:
    return {dl["id"]: dl for dl in svc.get_json("/v1/dead-letters")}


def test_a_restarted_service_keeps_its_mirrored_letters_and_replay_keeps_the_bad_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dlq.jsonl"
    env = {"ENGINE_HANDLER": f"{H}:reject", "ENGINE_WORKERS": "1", "ENGINE_DLQ_PATH": str(path)}
    with running_service(tmp_path, **env, ENGINE_DLQ_MAX="3") as svc:
        for i in range(4):
            assert _post(svc, "/v1/messages", {"recipient": "a", "payload": {"i": i}})[0] == 202
        s = svc.wait_stats(lambda s: s["dead_lettered"] == 4 and s["in_flight"] == 0)
        assert s["dead_letters_dropped"] == 1 and s["dead_letters_stored"] == 3
        assert metric(scrape(svc, token=None), "engine_dead_letters_dropped_total") == 1
        first = set(_letters(svc))
        svc.stop()
        assert svc.returncode == 0
        assert any("evicted" in str(line.get("msg")) for line in svc.lines)
    assert len(path.read_bytes().splitlines()) == 4  # every letter was mirrored (and fsynced)
    with path.open("ab") as f:  # two letters that cannot be replayed
        f.write(b'{"id":0,"recipient":"","reason":"malformed","attempts":1,"error":"bad",')
        f.write(b'"kind":"direct","priority":"normal","payload":null}\n')
        f.write(b'{"id":777,"recipient":"a","reason":"rejected","attempts":1,"error":"no",')
        f.write(b'"kind":"direct","priority":"normal","payload":null,"payload_dropped":true}\n')

    with running_service(tmp_path, **env) as svc:
        letters = _letters(svc)
        assert set(letters) == first | {0, 777, min(first) - 1}  # all 4 mirrored, and 2 more
        assert letters[777]["payload_dropped"] is True
        status, report = _post(svc, "/v1/dead-letters/replay")
        assert status == 200
        assert report == {
            "replayed": 4,
            "kept": 2,
            "kept_reasons": {"malformed": 1, "payload_dropped": 1},
        }
        letters = _letters(svc)
        # Only the two kept of the restored ones (the replayed may be rejected anew already).
        assert {i for i in letters if i <= 777} == {0, 777}
        assert "dropped for size" in letters[777]["replay_error"]
        # Rejected again, as new messages numbered above every restored id.
        svc.wait_stats(lambda s: s["dead_lettered"] == 4 and s["in_flight"] == 0)
        again = set(_letters(svc)) - {0, 777}
        assert len(again) == 4 and min(again) > 777
        svc.stop()
        assert svc.returncode == 0

    with running_service(tmp_path, **env) as svc:  # the replayed letters do not come back
        assert set(_letters(svc)) == again | {0, 777}
        # ... and the file was compacted to the letters restored (no replayed ones).
        assert len(path.read_bytes().splitlines()) == 6


def test_a_corrupt_frame_header_is_skipped_after_the_poison_limit() -> None:
    """The length of a queued frame is overwritten in the live ring (real shared memory):
    the worker dies on it up to ENGINE_POISON_MAX_CRASHES times, then the frame is
    skipped, its message dead-lettered as malformed, and the frames after it delivered."""
    cfg = _config(poison_max_crashes=2)

    async def go() -> tuple[int, int, list[DeadLetter], dict[str, Any]]:
        async with Engine(f"{H}:oversize", cfg) as eng:
            await eng.submit("a", {"i": -1})
            assert await eng.drain(60)  # the worker is up and idle
            assert eng.dispatcher is not None
            shard = eng.dispatcher.shards[0]
            ring = shard.lanes[Priority.NORMAL]
            pid = int(shard.slot_idx[SLOT_PID])
            os.kill(pid, signal.SIGSTOP)  # it must not fetch the frame before it is spoiled
            try:
                pos = ring.write_pos
                first = await eng.submit("a", {"i": 0})
                while ring.write_pos == pos:
                    await asyncio.sleep(0.01)
                assert ring.read_pos == pos
                ring.idx[(HEADER_BYTES + (pos & ring.mask)) >> 3] = 0xDEAD_BEEF_0000
                for i in range(1, 5):
                    await eng.submit("a", {"i": i})
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await eng.drain(60)
            await asyncio.sleep(0.3)  # a stats interval: the workers' counters arrive
            return first, pos, eng.dead_letters(), eng.stats()

    first, pos, letters, s = asyncio.run(go())
    assert s["delivered"] == 5 and s["dead_lettered"] == 1 and s["in_flight"] == 0
    assert s["workers"][0]["restarts"] == 2 and s["frames_skipped"] == 1
    [letter] = letters
    assert letter.reason == "malformed" and letter.message.id == first
    assert letter.message.body() == {"i": 0}  # only the length was hit: the message is whole
    assert letter.error.startswith(
        f"corrupt frame header 0xdeadbeef0000 at position {pos} of lane 2: skipped "
    )
    assert letter.error.endswith("(its 1 messages decoded)")


def test_a_page_cursor_of_an_earlier_run_is_refused_with_410(tmp_path: Path) -> None:
    """Restored letters are numbered afresh by the new run: an old cursor cannot say
    where to go on (read against the new numbers it would skip or repeat letters)."""
    path = tmp_path / "dlq.jsonl"
    env = {"ENGINE_HANDLER": f"{H}:reject", "ENGINE_WORKERS": "1", "ENGINE_DLQ_PATH": str(path)}
    with running_service(tmp_path, **env) as svc:
        for i in range(6):
            assert _post(svc, "/v1/messages", {"recipient": "a", "payload": {"i": i}})[0] == 202
        svc.wait_stats(lambda s: s["dead_lettered"] == 6 and s["in_flight"] == 0)
        status, headers, page = _get_page(svc, "/v1/dead-letters?limit=2")
        assert status == 200 and len(page) == 2
        cursor = headers["X-Next-Cursor"]
        status, _, rest = _get_page(svc, f"/v1/dead-letters?limit=2&cursor={cursor}")
        assert status == 200 and len(rest) == 2  # in this run the cursor works
        svc.stop()
    with running_service(tmp_path, **env) as svc:
        status, _, problem = _get_page(svc, f"/v1/dead-letters?limit=2&cursor={cursor}")
        assert status == 410 and problem["error"] == "cursor_gone", problem
        assert "restarted" in problem["reason"]
        status, headers, again = _get_page(svc, "/v1/dead-letters?limit=2")
        assert status == 200 and [dl["id"] for dl in again] == [dl["id"] for dl in page]


def _get_page(svc: ServiceProc, path: str) -> tuple[int, dict[str, str], Any]:
    """GET ``path``: (status, headers, decoded body), error answers included."""
    try:
        with urllib.request.urlopen(svc.http_url + path, timeout=30) as resp:
            return resp.status, dict(resp.headers), msgspec.json.decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), msgspec.json.decode(exc.read())
