"""A call's arguments, checked and encoded before anything is queued.

Options become a shared `Spec` (the key that batches equal options together),
payloads are encoded once at the edge, recipients are checked: so a bad call
fails in its caller and never breaks a frame that carries other calls' messages.
Apart from the client classes because both `AsyncClient` and the blocking
`Client` check calls the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import msgspec

from engine.errors import ServiceError
from engine.protocol import SendOptions
from ipc.codec import check_raw, pack_payload

__all__ = [
    "DEFAULT_SPEC",
    "FRAME_OVERHEAD",
    "Spec",
    "Specs",
    "bad_recipient",
    "encode_payload",
    "partly_sent",
]

FRAME_OVERHEAD: Final = 256  # Submit header, seq, settled flag: generous
MAX_CACHED_SPECS: Final = 1024

_encode = msgspec.msgpack.Encoder().encode
_Raw = msgspec.Raw
_NIL: Final = msgspec.Raw(_encode(None))
_OPTION_NAMES = frozenset(
    ("priority", "ttl", "kind", "sender", "reply_to", "tags", "metadata", "dedup_key")
)


def encode_payload(payload: Any) -> msgspec.Raw:
    """Encode once at the edge; a Raw passes as is but must be one whole msgpack value,
    since a broken one would corrupt the frame that carries other callers' messages."""
    if type(payload) is _Raw:
        return check_raw(payload)
    if payload is None:
        return _NIL
    return pack_payload(payload)


def bad_recipient(recipient: object) -> ValueError:
    return ValueError(f"recipient must be a non-empty string, got {recipient!r}")


def partly_sent(exc: Exception, sent: int) -> Exception:
    """The same error, saying how much of a submit_many went out before it."""
    note = f" (item {sent} or later; the {sent} items before were sent, none after)"
    if isinstance(exc, ServiceError):
        return type(exc)(exc.code, exc.reason + note)
    return type(exc)(f"{exc}{note}")


class Spec:
    """Validated options of a submit call; equal options share one instance (a batch key)."""

    __slots__ = ("options", "settled", "size")

    def __init__(self, options: SendOptions, settled: bool) -> None:
        self.options = options
        self.settled = settled
        self.size = len(_encode(options)) + FRAME_OVERHEAD


DEFAULT_SPEC: Final = Spec(SendOptions(), False)


class Specs:
    """The validated, shared `Spec` of each options seen (cached: a hot loop pays a lookup)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[Any, Spec] = {}

    def get(self, options: dict[str, Any], settled: bool) -> Spec:
        try:
            key: Any = (bool(settled), *sorted((k, _freeze(v)) for k, v in options.items()))
            spec = self._cache.get(key)
        except TypeError:  # unhashable option value: validate without caching
            key, spec = None, None
        if spec is None:
            spec = Spec(_build_options(options), bool(settled))
            if key is not None:
                if len(self._cache) >= MAX_CACHED_SPECS:
                    self._cache.clear()
                self._cache[key] = spec
        return spec


def _build_options(options: dict[str, Any]) -> SendOptions:
    """Check option names and types here, so a bad one fails before anything is sent
    (value ranges, e.g. an unknown priority name, are the service's to judge)."""
    for name in options:
        if name not in _OPTION_NAMES:
            raise TypeError(
                f"unknown option {name!r}; expected one of {', '.join(sorted(_OPTION_NAMES))}"
            )
    kw: dict[str, Any] = {}
    for name, value in options.items():
        if name in ("priority", "kind"):
            if type(value) is bool or not isinstance(value, str | int):
                raise TypeError(f"option {name} must be a name or an integer, got {value!r}")
            kw[name] = value  # an IntEnum (Priority, Kind) travels as its number
        elif name == "ttl":
            if value is not None and (type(value) is bool or not isinstance(value, int | float)):
                raise TypeError(f"option ttl must be seconds (a number) or None, got {value!r}")
            kw["ttl_s"] = None if value is None else float(value)
        elif name in ("sender", "reply_to", "dedup_key"):
            if not isinstance(value, str):
                raise TypeError(f"option {name} must be a string, got {value!r}")
            kw[name] = str(value)
        elif name == "tags":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise TypeError(f"option tags must be an iterable of strings, got {value!r}")
            tags = tuple(value)
            if not all(isinstance(t, str) for t in tags):
                raise TypeError(f"option tags must be strings, got {tags!r}")
            kw["tags"] = tags
        else:  # metadata
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TypeError(f"option metadata must map strings to strings, got {value!r}")
            kw["metadata"] = dict(value)
    return SendOptions(**kw)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("\0dict", tuple(sorted(value.items())))
    if isinstance(value, list | set | frozenset):
        return ("\0seq", tuple(value))
    return (type(value), value)  # "1" and 1 (and 1.0 and True) stay apart
