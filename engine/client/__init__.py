"""The Python client of ``engine serve``: `AsyncClient` (asyncio) and the blocking `Client`."""

from engine.batches import BatchRequest, BatchResult, BatchResults
from engine.client.aio import AsyncClient
from engine.client.connection import DEFAULT_URL, parse_url
from engine.client.pipeline import error_from_code
from engine.client.sync import Client, MessageFuture

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "BatchRequest",
    "BatchResult",
    "BatchResults",
    "Client",
    "MessageFuture",
    "error_from_code",
    "parse_url",
]
