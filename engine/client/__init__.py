"""The Python client of ``engine serve``: `AsyncClient` (asyncio) and the blocking `Client`."""

from engine.client.aio import AsyncClient, error_from_code, parse_url
from engine.client.sync import Client, MessageFuture

__all__ = ["AsyncClient", "Client", "MessageFuture", "error_from_code", "parse_url"]
