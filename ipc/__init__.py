"""Everything that crosses a process boundary: shm segments, rings, wake-ups, codecs.

This package never imports `engine`.
"""
