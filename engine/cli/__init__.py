"""The ``engine`` command and its subcommands (config, demo, serve, stats, send, dlq, stress)."""

from engine.cli.commands import main

__all__ = ["main"]
