"""Benchmark: `--help` of every command, whole command (target under 1 s), against importing torch.

Run from the repository root:  python bench/bench_help.py [--quick]

Each row runs `python SCRIPT --help` as a user does (interpreter start-up, imports, argument parsing, output) in
interleaved rounds with the reference `python -c "import torch"` (what every command paid before it parsed its
arguments first), after a warm-up; the median of the rounds and its min-max are printed. tests/test_help.py checks,
untimed, that no `--help` imports torch, torchvision, gensim or sru.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import command, interleaved, load, machine, verdict  # noqa: E402

SCRIPTS = ["train.py", "eval_retrieval.py", "pointing_game.py", "semantic_seg.py", "localize.py", "search.py",
           "image_features_extraction.py", "text_features_extraction.py", "export.py", "app.py"]
TARGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    print(f"machine: {machine()}")
    procedures = {script: command(script, "--help") for script in SCRIPTS}
    procedures["import torch"] = command("-c", "import torch")
    times = interleaved(procedures, rounds)
    worst = 0.0
    for name, values in times.items():
        median = statistics.median(values)
        line = f"  {name:<30} {median:5.2f} s (rounds {min(values):.2f}-{max(values):.2f} s)"
        if name in SCRIPTS:
            worst = max(worst, median)
        else:
            line += "  <- reference: what a command paid before parsing when it imported torch first"
        print(line)
    print(f"slowest --help {worst:.2f} s ({verdict(worst, TARGET_S, ' s', at_least=False)}); {load()}")


if __name__ == "__main__":
    main()
