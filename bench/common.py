"""Small timing and memory helpers shared by the benchmark scripts.

Benchmarks print ratios against a reference measured in the same process, so a
slow or busy machine moves both sides alike; the absolute numbers are only context.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # bytes per page, the unit of /proc/self/statm


# What a user would have downloaded, beside the checkout (see ../shared/README.md).
SHARED = Path(__file__).resolve().parents[2] / "shared"


def best_seconds(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Fastest wall time of each ``fns[name]()`` over ``repeats`` rounds, after ``warmup`` untimed calls.

    The candidates run in turn within each round, so a burst of load from elsewhere on
    the machine slows all of them rather than one; the minimum is the run least
    disturbed by such load (the convention of Python's ``timeit``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def matmul_task(n: int = 2048, count: int = 8):
    """``(fn, flops)``: ``fn()`` multiplies two ``n x n`` float32 matrices ``count`` times.

    Timed as one more candidate of :func:`best_seconds`, it measures the matmul rate
    under the same load as the code it is compared with.
    """
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

    def fn():
        for _ in range(count):
            torch.mm(a, b, out=out)

    return fn, 2 * n**3 * count


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a Markdown table (so it can be pasted into the README as it is)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def machine_line() -> str:
    """One line naming what the numbers were measured on."""
    import platform

    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, python {platform.python_version()}")


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


def verdict(met: bool) -> str:
    """How a table cell says whether a target is met."""
    return "met" if met else "NOT met"
