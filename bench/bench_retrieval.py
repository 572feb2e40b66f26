"""Benchmark: eval_retrieval.py --features vs the original release's evaluation of the same embeddings.

Run from the repository root:  python bench/bench_retrieval.py [--quick]

Seeded embeddings of 5000 images and 25000 captions (each caption its image plus noise, so that recalls are neither
0 nor 100) are written to an .npz at d = 2400 (the paper's) and d = 128. Two procedures rank them:
- original: bench/original_eval.py, the original release's rule in numpy (cosine scores, a full argsort of every
  row in both directions, first positive);
- project: eval_retrieval.py --features (misc.eval.retrieval: one score product for both directions, counting).
Whole command: ``python <script> features.npz`` for the 1k protocol (5 folds) and the full 5k protocol, start-up
and imports included, in interleaved rounds (A B A B ..., after one warm-up call of each). In process: the two
evaluate functions on arrays already in memory, interleaved the same way. The script first checks that both give
the same R@1/5/10 and medians (the original's medr is 0-based, the project's 1-based). The ceiling line bounds
what any exact float32 evaluation could reach: the project's time outside ``evaluate`` plus the score products
alone. --quick: 2000 images.
"""
import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import original_eval  # noqa: E402
from bench.common import command, interleaved, load, machine, ratio_line  # noqa: E402
from misc.eval.retrieval import evaluate  # noqa: E402

TARGETS = {"1k": 3.0, "full": 10.0}


def make_features(path: Path, n_images: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit image vectors and five noisy unit captions per image (caption j of image j // 5), saved to ``path``."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    noise = rng.standard_normal((5 * n_images, dim), dtype=np.float32) * np.float32(0.3)  # positive ~3.3 sd up
    captions = np.repeat(images, 5, axis=0) + noise
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    np.savez(path, images=images, captions=captions)
    return images, captions


def check_same(ours: dict, theirs: dict) -> str:
    """Both evaluations' R@k and medians (the project's ``evaluate(...)[protocol]``, the original's); asserts they
    agree."""
    parts = []
    for direction, values in theirs.items():
        mine = ours[direction]
        # the same counts; the percentages are computed in another order, so compare them to 1e-9
        assert np.allclose([mine["R@1"], mine["R@5"], mine["R@10"]], values[:3], rtol=0, atol=1e-9), (mine, values)
        assert mine["medr"] == values[3] + 1, (direction, mine["medr"], values[3])
        parts.append(f"{direction} R@1/5/10 {values[0]:.2f}/{values[1]:.2f}/{values[2]:.2f} medr {mine['medr']}")
    return "; ".join(parts)


def score_products(images: np.ndarray, captions: np.ndarray, protocol: str) -> None:
    """The float32 products images @ captions.T of the protocol (each 1000-image fold, or the whole set)."""
    step = 1000 if protocol == "1k" else len(images)
    for first in range(0, len(images) - step + 1, step):
        np.dot(images[first:first + step], captions[5 * first:5 * (first + step)].T)


def ceiling_line(whole: dict[str, list[float]], inside: list[float], floor: float, target: float) -> str:
    """The best whole-command ratio any exact float32 evaluation could reach here: the original's whole command
    over the project's time outside ``evaluate`` (start-up, imports, reading the .npz, printing) plus the score
    products alone, as if ranking cost nothing."""
    outside = statistics.median(whole["project"]) - statistics.median(inside)
    best = statistics.median(whole["original"]) / (outside + floor)
    return (f"ceiling: {statistics.median(whole['original']):.2f} s / ({outside:.2f} s outside evaluate + "
            f"{floor:.2f} s of products) = {best:.2f}x for any exact float32 ranking "
            f"(target {'within reach' if best >= target else 'out of reach'})")


def keep(results: dict, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``fn`` and keep its result as ``results[name]``."""
    results[name] = fn(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2000 images (smoke run)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2400, 128])
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds on the 1k protocol")
    parser.add_argument("--full-runs", type=int, default=2, help="interleaved rounds on the full protocol")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_images = 2000 if args.quick else 5000

    print(f"machine: {machine()}; numpy {np.__version__}")
    print(f"inputs: {n_images} images x {5 * n_images} captions, float32, seed {args.seed}; ratios are original / "
          f"project (medians over rounds, min-max of the rounds' ratios)")
    start_up = interleaved({"help": command("eval_retrieval.py", "--help")}, 3)["help"]
    print(f"python eval_retrieval.py --help: {statistics.median(start_up):.2f} s (median of 3 after a warm-up)")
    with tempfile.TemporaryDirectory() as folder:
        for dim in args.dims:
            path = Path(folder) / f"features_{dim}.npz"
            images, captions = make_features(path, n_images, dim, args.seed)
            for protocol in ("1k", "full"):
                runs = args.runs if protocol == "1k" else args.full_runs
                whole = {"original": command("bench/original_eval.py", str(path), "--protocol", protocol),
                         "project": command("eval_retrieval.py", "--features", str(path), "--protocols", protocol)}
                cheap = {"original": command("bench/original_eval.py", str(path), "--protocol", "1k"),
                         "project": command("eval_retrieval.py", "--features", str(path), "--protocols", "1k")}
                whole_times = interleaved(whole, runs, warmup=cheap if protocol == "full" else None)
                print(f"d={dim}, {protocol} protocol")
                print("  " + ratio_line(f"whole command, {load()}", whole_times["original"],
                                        whole_times["project"], TARGETS[protocol]))
                results = {}
                inside = {"original": functools.partial(keep, results, "original", original_eval.evaluate, images,
                                                        captions, protocol),
                          "project": functools.partial(keep, results, "project", evaluate, images, captions,
                                                       protocols=(protocol,))}
                # the whole commands warmed the caches: the slow full protocol runs one round in process
                times = interleaved(inside, runs if protocol == "1k" else 1, warmup=None if protocol == "1k" else {})
                print("  " + ratio_line("in process (arrays in memory)", times["original"], times["project"]))
                print(f"  same results: {check_same(results['project'][protocol], results['original'])}")
                floor = interleaved({"products": functools.partial(score_products, images, captions, protocol)}, 1)
                print(f"  floor: the score products alone (both procedures need them): {floor['products'][0]:.2f} s")
                print("  " + ceiling_line(whole_times, times["project"], floor["products"][0], TARGETS[protocol]))
    print(load())


if __name__ == "__main__":
    main()
