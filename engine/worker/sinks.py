"""Delivery protocols behind the worker: the user's handler, a mock core, an inbox, null.

A sink's ``deliver`` returns the handler's result or an awaitable of it; the
worker awaits only when it must, so a plain function costs no coroutine.
Adding a sink means adding a class here and a name in ``Config.sink``; the
worker never changes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol

import msgspec

from engine.config import Config
from engine.errors import EngineError, EngineStartError
from ipc.codec import Message

Handler = Callable[[Message], Any]
_ID = struct.Struct("<Q")  # one delivered id in the mock sink's record files


class MockDeliveryError(EngineError):
    """Raised by the mock sink for the share of deliveries ENGINE_MOCK_SUCCESS_RATE fails."""


class Sink(Protocol):
    is_async: bool
    """True if ``deliver`` returns awaitables: the worker then runs its coroutine pool."""

    def deliver(self, msg: Message) -> Any | Awaitable[Any]: ...

    def close(self) -> None: ...


def load_handler(spec: str | Handler) -> Handler:
    """Resolve ``module:function`` (or pass a callable through), with a clear error."""
    if callable(spec):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EngineStartError(f"handler must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise EngineStartError(
            f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise EngineStartError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise EngineStartError(f"handler {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


class PythonSink:
    """The user's handler, sync or async."""

    def __init__(self, handler: Handler) -> None:
        self.deliver = handler
        self.is_async = is_async_callable(handler)

    def close(self) -> None:
        return None


class MockSink:
    """The original design's mock messaging core: simulated delay and success rate.

    With ``record_dir`` every delivery it accepts appends the message id (8 bytes,
    little-endian) to ``<record_dir>/<pid>.ids`` with one ``os.write`` before it
    returns: what the stress report counts as delivered is what happened here,
    also when the worker is killed right after (``engine.stress.report``).
    """

    def __init__(
        self, delay_s: float, success_rate: float, seed: int | None = None, record_dir: str = ""
    ) -> None:
        self.delay_s = delay_s
        self.is_async = delay_s > 0
        self.success_rate = success_rate
        self._random = random.Random(seed).random
        self._record = -1
        if record_dir:
            path = os.path.join(record_dir, f"{os.getpid()}.ids")
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            try:
                self._record = os.open(path, flags, 0o600)
            except OSError as exc:
                raise EngineStartError(
                    f"cannot open {path} (ENGINE_MOCK_RECORD_DIR) for the mock sink: {exc}"
                ) from exc

    def deliver(self, msg: Message) -> Any:
        if self.delay_s > 0:
            return self._deliver_later(msg)
        self._outcome(msg)
        return None

    async def _deliver_later(self, msg: Message) -> None:
        import asyncio

        await asyncio.sleep(self.delay_s)
        self._outcome(msg)

    def _outcome(self, msg: Message) -> None:
        if self.success_rate < 1.0 and self._random() >= self.success_rate:
            raise MockDeliveryError(
                f"mock delivery of message {msg.id} failed "
                f"(ENGINE_MOCK_SUCCESS_RATE={self.success_rate})"
            )
        if self._record >= 0:
            os.write(self._record, _ID.pack(msg.id))

    def close(self) -> None:
        if self._record >= 0:
            os.close(self._record)
            self._record = -1


class InboxRecord(msgspec.Struct):
    """One delivered message as a line of an inbox file."""

    id: int
    recipient: str
    sender: str
    kind: str
    priority: str
    attempt: int
    created_ns: int
    payload: Any


class NullSink:
    """Accepts everything and does nothing: measures the engine alone."""

    is_async = False

    def deliver(self, msg: Message) -> None:
        return None

    def close(self) -> None:
        return None


class InboxSink:
    """Appends each delivered message as a JSON line to ``<dir>/<recipient>.jsonl``."""

    MAX_OPEN = 256
    is_async = False

    def __init__(self, directory: str) -> None:
        if not directory:
            raise EngineStartError("the inbox sink needs ENGINE_INBOX_DIR (a directory path)")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._files: dict[str, IO[bytes]] = {}
        self._encoder = msgspec.json.Encoder()

    def path_for(self, recipient: str) -> str:
        return os.path.join(self.directory, urllib.parse.quote(recipient, safe="") + ".jsonl")

    def deliver(self, msg: Message) -> None:
        f = self._files.get(msg.recipient)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[msg.recipient] = open(self.path_for(msg.recipient), "ab")  # noqa: SIM115
        record = InboxRecord(
            id=msg.id,
            recipient=msg.recipient,
            sender=msg.sender,
            kind=msg.kind.name.lower(),
            priority=msg.priority.name.lower(),
            attempt=msg.attempt,
            created_ns=msg.created_ns,
            payload=msg.body(),
        )
        f.write(self._encoder.encode(record) + b"\n")
        f.flush()  # delivered means written: a crash after settle must not lose it

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and objects with an ``async def __call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def make_sink(config: Config, handler: str | Handler | None) -> Sink:
    """Build the sink the configuration names; the python sink needs a handler."""
    if config.sink == "mock":
        return MockSink(
            config.mock_delay_s, config.mock_success_rate, record_dir=config.mock_record_dir
        )
    if config.sink == "inbox":
        return InboxSink(config.inbox_dir)
    if config.sink == "null":
        return NullSink()
    spec = handler if handler is not None else config.handler
    if not spec:
        raise EngineStartError(
            "no handler: pass one to Engine(...), set ENGINE_HANDLER=module:function, "
            "or choose ENGINE_SINK=mock|inbox|null"
        )
    return PythonSink(load_handler(spec))
