"""Small timing and memory helpers shared by the benchmark scripts.

Benchmarks print ratios against a reference measured in the same process, so a
slow or busy machine moves both sides alike; the absolute numbers are only context.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gptlora.infra.memory import PeakRSS, release_free_memory, rss_bytes  # noqa: F401 (the benchmarks' names for them)


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
    """Print a Markdown table (so it can be pasted into bench/README.md or docs/ as it is)."""
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


def verdict(met: bool) -> str:
    """How a table cell says whether a target is met."""
    return "met" if met else "NOT met"
