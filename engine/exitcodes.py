"""Named exit codes of the ``engine`` command, following BSD sysexits.h where one fits."""

from enum import IntEnum


class ExitCode(IntEnum):
    """What the process exit status means, so scripts and supervisors can react to it."""

    OK = 0
    FAILURE = 1  # a runtime failure with no more specific code
    USAGE = 64  # EX_USAGE: bad command line
    DATAERR = 65  # EX_DATAERR: bad input data
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a needed service or resource is missing
    SOFTWARE = 70  # EX_SOFTWARE: internal error, a bug
    CONFIG = 78  # EX_CONFIG: bad configuration, fix it and start again
    INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class ChildExit(IntEnum):
    """Exit statuses of the engine's own processes (monitor, workers), read by their parents."""

    ORPHANED = 1  # the parent was gone before the child could arrange to die with it
    BOOT_FAILED = 3  # a worker could not build its sink, or the monitor's workers never booted
    CRASHED = 70  # EX_SOFTWARE: the monitor itself failed
