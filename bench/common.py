"""Helpers the benchmarks share: timing, the machine's description and the target verdict."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
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


def interleaved(procedures: dict[str, Callable[[], Any]], runs: int,
                warmup: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Wall times of ``runs`` rounds A B A B ... (one call of every procedure per round, in turn), after one
    untimed call of each warm-up procedure (default: the procedures themselves), so that a change in the
    machine's load hits both sides alike."""
    for fn in (procedures if warmup is None else warmup).values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in procedures}
    for _ in range(runs):
        for name, fn in procedures.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def command(*argv: str) -> Callable[[], None]:
    """A procedure running ``python argv...`` from the repository root (a whole command: start-up, imports, work,
    output), failing loudly if it fails."""
    root = Path(__file__).resolve().parents[1]

    def call() -> None:
        result = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    return call


def ratio_line(label: str, slow: list[float], fast: list[float], target: float | None = None) -> str:
    """'label: A 12.3 s / B 1.1 s = 11.2x (runs 10.9-11.6x)': ratio of the medians, min-max of the per-round
    ratios, and the target verdict when there is one."""
    ratios = [s / f for s, f in zip(slow, fast)]
    ratio = statistics.median(slow) / statistics.median(fast)
    line = (f"{label}: {statistics.median(slow):.2f} s / {statistics.median(fast):.2f} s = {ratio:.1f}x "
            f"(per round {min(ratios):.1f}-{max(ratios):.1f}x, {len(ratios)} rounds)")
    return line + (f" ({verdict(ratio, target)})" if target else "")


def load() -> str:
    """The load average now (other processes on a shared machine slow every row)."""
    return "load average now " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
