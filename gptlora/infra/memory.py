"""Memory of this process: the resident size now, and the highest rise while a block of code runs.

On a CPU PyTorch has no allocator statistics, so memory is read from Linux's
``/proc/self/statm``; the benchmarks and ``method_comparison`` use this one sampler.
"""

from __future__ import annotations

import os
import threading
import time

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # bytes per page, the unit of /proc/self/statm


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def release_free_memory() -> None:
    """Hand memory that is freed but kept by C's allocator back to the system (glibc ``malloc_trim``).

    Otherwise memory freed by an earlier measurement is reused without raising the
    resident size, and a later measurement's rise reads too low.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: rises may read low after earlier work
        pass


class PeakRSS:
    """Context manager: the highest rise of resident memory over its start while inside, in bytes.

    A thread samples ``/proc/self/statm`` every ``interval`` seconds (PyTorch releases the
    GIL in its kernels, so the sampler runs while they do). ``ru_maxrss`` cannot be used
    for this: it only ever grows over the whole process.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.rise = interval, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.rise = max(self.rise, rss_bytes() - self.start)
            time.sleep(self.interval)

    def __enter__(self):
        release_free_memory()
        self.start = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rise = max(self.rise, rss_bytes() - self.start)
        return False
