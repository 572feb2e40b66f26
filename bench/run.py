"""Run the benchmarks and write bench/RESULTS.md: each benchmark's printed tables, with when it ran.

    python bench/run.py                        # what `make bench` runs: every benchmark (about 10 minutes)
    python bench/run.py bench_retrieval.py     # only the named ones; the other sections are kept as they are
    python bench/run.py --quick                # smoke sizes, written to bench/RESULTS-quick.md

Each benchmark runs in its own process, its output shown as it comes and kept verbatim in its section of the
results file. The file is written only once every named benchmark has run (a failed one is recorded as failed and
makes the exit status 1). Commentary belongs in bench/README.md, which no run rewrites.
"""
from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from misc.store.files import atomic_path  # noqa: E402

BENCHMARKS = ["bench_help.py", "bench_retrieval.py", "bench_heatmaps.py", "bench_amp.py", "bench_train.py",
              "bench_extraction.py", "bench_search.py", "bench_index.py", "bench_app.py", "bench_large.py"]
HEADER = ("# Benchmark results\n\nWritten by `make bench` (`python bench/run.py`); `python bench/run.py NAME.py ...` "
          "reruns only the named benchmarks and keeps the other sections. Each section is the benchmark's own output, "
          "headed by the command, how long it took and when it ran; the output starts with the machine and its load. "
          "Compared procedures run on the same seeded inputs in interleaved rounds (A B A B ..., after a warm-up), "
          "as whole commands and in process where stated; a ratio is of the medians, with the min-max of the rounds' "
          "ratios; every target line says whether it is met. `bench/README.md` explains what each benchmark "
          "measures and how to read the numbers.\n")
SCRIPT_LINE = re.compile(r"^`python bench/(\S+\.py)")


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


def sections_of(text: str) -> dict[str, str]:
    """The sections of a results file by benchmark script name (read from the command line under each heading)."""
    found = {}
    for chunk in re.split(r"^(?=## )", text, flags=re.MULTILINE)[1:]:
        lines = chunk.splitlines()
        match = SCRIPT_LINE.match(lines[2]) if len(lines) > 2 else None
        if match:
            found[match.group(1)] = chunk.rstrip("\n") + "\n"
    return found


def results_text(previous: str, fresh: dict[str, str]) -> str:
    """The results file: the header, then one section per benchmark in BENCHMARKS order, the fresh ones replacing
    those of ``previous`` (the file's old text, '' if none) and the others kept verbatim."""
    sections = {**sections_of(previous), **fresh}
    return "\n".join([HEADER, *(sections[name] for name in BENCHMARKS if name in sections)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME.py",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smoke sizes (each benchmark's --quick)")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    flags = ["--quick"] if args.quick else []
    out = HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    names = args.names or BENCHMARKS
    fresh, failed, total = {}, [], 0.0
    for name in names:
        script = HERE / name
        command = " ".join(["python", f"bench/{name}", *flags])
        print(f"==> {command}", flush=True)
        started = datetime.datetime.now(datetime.UTC)
        status, seconds, output = run(script, flags)
        total += seconds
        outcome = f"{seconds:.0f} s" if status == 0 else f"FAILED with exit status {status} after {seconds:.0f} s"
        if status:
            failed.append(name)
        fresh[name] = (f"## {title(script)}\n\n`{command}` ({outcome}; started {started:%Y-%m-%d %H:%M} UTC)\n\n"
                       f"```\n{output.rstrip()}\n```\n")
    previous = out.read_text(encoding="utf-8") if out.exists() else ""
    with atomic_path(out) as temporary:
        temporary.write_text(results_text(previous, fresh), encoding="utf-8")
    print(f"wrote {out.relative_to(HERE.parent)} ({total / 60:.1f} min)" + (f"; failed: {', '.join(failed)}"
                                                                             if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
