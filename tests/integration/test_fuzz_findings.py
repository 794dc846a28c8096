"""Regressions for what the protocol fuzz (tests/chaos/test_protocol_fuzz.py) found.

- Replaying a dead letter whose payload the handler could not decode (bad UTF-8
  inside a msgpack string, accepted by the ingress, which checks structure only)
  failed with CodecError: ``POST /v1/dead-letters/replay`` answered 500.
- A cached request with an option ``request`` refuses (``kind``) started the shared
  (single-flight) call before the check: an identical request joining it, such as a
  batch item, got the first caller's TypeError as its own, logged as internal.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from engine import Config, Engine

BAD_UTF8 = msgspec.Raw(b"\xa4\xff\xfe\x80\xc3")  # a msgpack str whose bytes are not UTF-8


def config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {"workers": 1, "stats_interval_s": 0.1}
    return Config.from_env(env={}, **(settings | overrides))


async def settled(eng: Engine, dead: int) -> None:
    async with asyncio.timeout(60):
        while not (eng.stats()["in_flight"] == 0 and eng.stats()["dead_lettered"] >= dead):
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_dead_letter_with_an_undecodable_payload_is_replayed(tmp_path: Any) -> None:
    async def main() -> None:
        cfg = config(sink="inbox", inbox_dir=str(tmp_path), retry_max_attempts=1)
        async with Engine(config=cfg) as eng:
            await eng.submit_many([("r", BAD_UTF8)], raw_checked=True)  # as the ingress does
            await settled(eng, 1)
            assert (await eng.replay_dead_letters()).replayed == 1
            await settled(eng, 2)  # dead-lettered again, as it was: nothing lost
            [letter] = eng.dead_letters()
            assert letter.message.payload == BAD_UTF8

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_refused_cached_request_is_not_shared_with_the_next(tmp_path: Any) -> None:
    async def main() -> None:
        async with Engine(config=config(sink="null")) as eng:
            bad = asyncio.ensure_future(eng.request("r", 1, cache=True, kind="event"))
            good = asyncio.ensure_future(eng.request("r", 1, cache=True))
            results = await asyncio.gather(bad, good, return_exceptions=True)
            assert isinstance(results[0], TypeError), results
            assert results[1] is None, results

    asyncio.run(main())
