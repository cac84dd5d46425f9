"""Process figures for inference metrics: when this process started, and its resident memory."""

from __future__ import annotations

import os
import resource
import time

_IMPORTED_AT_MONOTONIC = time.monotonic()


def _start_ticks() -> int:
    """This process's start time in clock ticks since boot (field 22 of /proc/self/stat)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[19])  # field 22 of stat(5), counted after the command name


def process_age_s() -> float:
    """Seconds since this process started (Linux); elsewhere, since this module was imported.

    The start time is in clock ticks since boot (10 ms at the usual 100 Hz), measured by the
    kernel on the boot-time clock, so it is compared with CLOCK_BOOTTIME, never with the wall
    clock through /proc/stat's btime (whole seconds, which made a 0.3 s cold start read 0-1 s).
    """
    try:
        started = _start_ticks() / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc or no CLOCK_BOOTTIME
        return time.monotonic() - _IMPORTED_AT_MONOTONIC


def process_start_unix() -> float:
    """Wall-clock start of this process (see process_age_s for its precision)."""
    return time.time() - process_age_s()


def resident_memory_mb() -> float:
    """Current resident set size; peak RSS where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
