"""The one root error class and the errors raised by the IPC layer.

`ipc` never imports `engine`, so the root lives here and `engine` re-exports it.
"""

from __future__ import annotations


class EngineError(Exception):
    """Raised for every Ringway-specific failure; catch this to catch them all."""


class UnsupportedPlatformError(EngineError):
    """Raised when the ring's memory-ordering assumptions do not hold on this machine."""


class ShmError(EngineError):
    """Raised when a shared-memory segment cannot be created, attached or removed."""


class ShmSpaceError(ShmError):
    """Raised when /dev/shm has too little free space for the requested segments."""


class RingError(EngineError):
    """Raised when a ring is misused or its shared state is not a valid ring."""


class CorruptFrameError(RingError):
    """Raised by a ring's reader at a frame header that cannot be valid (see `ipc.ring`).

    ``position`` is the ring position of the header, ``header`` the value read there.
    """

    def __init__(self, message: str, position: int, header: int) -> None:
        super().__init__(message)
        self.position = position
        self.header = header


class FrameTooLargeError(RingError, ValueError):
    """Raised when a frame can never fit in the ring, however long one waits."""


class QueueFull(EngineError):
    """Raised by non-blocking writes when the ring has no room for the whole batch."""


class CodecError(EngineError, ValueError):
    """Raised when bytes from a ring or pipe do not decode as the expected type."""
