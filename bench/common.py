"""Helpers the benchmarks share: timing, the machine's description and the target verdict."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn``, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine() -> str:
    """CPU model, usable cores, torch threads, Python, and the load average (the machine may be shared)."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu or platform.processor() or platform.machine()}; {usable} usable cores; {gpu}; torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads; Python {platform.python_version()}; "
            f"load average {load}")


def verdict(measured: float, target: float, unit: str = "x", at_least: bool = True) -> str:
    """'target >= 20x: met' / 'target <= 2048 MiB: NOT met', for the tables."""
    met = measured >= target if at_least else measured <= target
    return f"target {'>=' if at_least else '<='} {target:g}{unit}: {'met' if met else 'NOT met'}"
