"""A batch cancelled at once (its client hung up) leaves no error unretrieved.

`BatchRun` takes its request function as a parameter; here it is a stand-in that
fails the way a real request can when cancelled on Python 3.11:
``asyncio.wait_for`` returns (raises) the inner result that landed together
with the cancellation instead of ``CancelledError``.  The batch is cancelled
before its collectors ever run; what the request then raises must not be
logged by asyncio as "Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import msgspec
import pytest

from engine import Config, Priority, RequestFailed
from engine.core.batch import BatchRun, Prepared
from engine.core.cache import ResponseCache


async def fails_when_cancelled(*_: Any, **__: Any) -> msgspec.Raw:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RequestFailed("max_attempts: the reply landed with the cancellation") from None
    raise AssertionError("not cancelled")


def item(n: int) -> Prepared:
    return Prepared(f"R{n}", msgspec.Raw(b"\xc0"), Priority.NORMAL, 5.0, False, None)


def test_a_batch_cancelled_before_its_collectors_ran_leaves_no_error_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        run = BatchRun(
            fails_when_cancelled,
            ResponseCache(16, 60.0),
            Config.from_env(env={}),
            [item(n) for n in range(4)],
            concurrency=4,
            retries=0,
            user="",
        )
        task = asyncio.ensure_future(run.run())
        await asyncio.sleep(0)  # the batch starts every request and waits on them...
        task.cancel()  # ... and is cancelled before any collector ran
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            await asyncio.sleep(0)  # the requests end (raising) after the cancel

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()  # an unretrieved task error is logged when the task is collected
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
