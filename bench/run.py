"""Run every benchmark in turn and write bench/RESULTS.md: the machine, then each benchmark's printed tables.

    python bench/run.py            # what `make bench` runs (about 10 minutes on 2 shared CPU cores)
    python bench/run.py --quick    # smoke sizes, written to bench/RESULTS-quick.md

Each benchmark runs in its own process, its output shown as it comes and kept verbatim in the results file, which
is written only once every benchmark has run (a failed one is recorded as failed and makes the exit status 1).
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.common import machine  # noqa: E402
from misc.files import atomic_path  # noqa: E402

BENCHMARKS = ["bench_help.py", "bench_retrieval.py", "bench_heatmaps.py", "bench_amp.py", "bench_train.py",
              "bench_extraction.py", "bench_search.py"]


def title(script: Path) -> str:
    """The first line of a benchmark's docstring, without its 'Benchmark: ' prefix."""
    source = script.read_text(encoding="utf-8")
    first = source.split('"""', 2)[1].strip().splitlines()[0]
    return first.removeprefix("Benchmark: ")


def run(script: Path, flags: list[str]) -> tuple[int, float, str]:
    """Run one benchmark, echoing its output; returns its exit status, wall seconds and output."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(script), *flags], cwd=HERE.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return process.wait(), time.perf_counter() - start, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (each benchmark's --quick)")
    args = parser.parse_args()
    flags = ["--quick"] if args.quick else []
    out = HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    started = datetime.datetime.now(datetime.UTC)
    sections, failed, total = [], [], 0.0
    for name in BENCHMARKS:
        script = HERE / name
        command = " ".join(["python", f"bench/{name}", *flags])
        print(f"==> {command}", flush=True)
        status, seconds, output = run(script, flags)
        total += seconds
        outcome = f"{seconds:.0f} s" if status == 0 else f"FAILED with exit status {status} after {seconds:.0f} s"
        if status:
            failed.append(name)
        sections.append(f"## {title(script)}\n\n`{command}` ({outcome})\n\n```\n{output.rstrip()}\n```\n")
    runner = " ".join(["python", "bench/run.py", *flags])
    header = (f"# Benchmark results\n\nWritten by `make bench` (`{runner}`) on {started:%Y-%m-%d %H:%M} UTC; all "
              f"benchmarks took {total / 60:.1f} min.\n\n"
              f"Machine: {machine()}.\n\nEach section is the benchmark's own output. Compared procedures run on the "
              f"same seeded inputs in interleaved rounds (A B A B ..., after a warm-up), as whole commands and in "
              f"process where stated; a ratio is of the medians, with the min-max of the rounds' ratios; the load "
              f"average is printed because the machine may be shared; every target line says whether it is met. "
              f"`bench/README.md` explains what each benchmark measures.\n")
    with atomic_path(out) as temporary:
        temporary.write_text("\n".join([header, *sections]), encoding="utf-8")
    print(f"wrote {out.relative_to(HERE.parent)} ({total / 60:.1f} min)" + (f"; failed: {', '.join(failed)}"
                                                                             if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
