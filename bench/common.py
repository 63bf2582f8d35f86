"""Small timing and memory helpers shared by the benchmark scripts.

Benchmarks print ratios against a reference measured in the same process, so a
slow or busy machine moves both sides alike; the absolute numbers are only context.
"""

from __future__ import annotations

import time

import torch


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


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's single-precision matrix-multiply rate in GFLOP/s (``n x n`` by ``n x n``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = best_seconds({"matmul": lambda: a @ b}, repeats=repeats, warmup=2)["matmul"]
    return 2 * n**3 / seconds / 1e9


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
