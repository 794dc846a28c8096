"""The ``engine`` command and its subcommands (config, demo, serve, stats, send, dlq, cache,
stress, bench-batch)."""

from engine.cli.commands import main

__all__ = ["main"]
