"""Ringway: a multiprocess message delivery engine over shared-memory rings.

Kept import-light (no uvloop, no multiprocess) so ``engine --help`` and config checks start fast.
"""

from engine.config import Config, ConfigError
from ipc.errors import EngineError, QueueFull

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "EngineError", "QueueFull", "__version__"]
