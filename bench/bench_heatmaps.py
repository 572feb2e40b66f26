"""Benchmark: heatmaps of eq. 9 (models/heatmaps.py, the fast order) vs the original release's computation.

Run from the repository root:  python bench/bench_heatmaps.py [--quick]

Inputs are seeded random float32 arrays: 100 image maps G (D' = 2400, 13 x 13, a 416 x 416 input), d = 2400,
k = 180, at 5 and at 20 phrases per image (--quick: 40 images); text embeddings are given (neither side's time
includes the text encoder).

Baseline, the original release's computation (its misc/localization.py, one_img_process and generate_heat_map),
in numpy as it ran: per image the dense product A·G of every row of A (d, D') with the maps, then per phrase a full
argsort of the text embedding, the k largest entries, and the |v_u|-weighted sum of those rows of the product.

Project, what pointing_game.py, localize.py and semantic_seg.py run (the models' text_filters and
models.heatmaps.apply_filters, composed here as ``project``): per phrase the top-k of
the text embedding and the |v_u|-weighted sum of the k selected rows of A as one filter, then one batched product of all
filters with all maps (torch).

Both run interleaved (A B A B ..., after a warm-up call of each) twice: in one worker process per side (the row the
targets are judged on: a command runs one of them, never both; a pause of PAUSE_S, not timed, before each call lets
the other side's idle threads stop spinning on the 2 cores), and both in this process, with no pause, where each
library's idle thread pool (numpy's OpenBLAS, torch's OpenMP) still spins after its call and slows the other's next
call (the project's side about 2x here). Their error is measured against the original's computation in float64. The
load average is printed with each ratio: the 2 cores may be shared.
"""
import argparse
import functools
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, load, machine, ratio_line  # noqa: E402
from models.heatmaps import apply_filters, text_filters  # noqa: E402

TARGETS = {5: 30.0, 20: 20.0}
PAUSE_S = 0.5


def make_inputs(images: int, phrases: int, maps_dim: int, dim: int, side: int,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps G (N, D', h, w), A (d, D') at the scale of a trained projection, unit texts (N, P, d), float32."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((images, maps_dim, side, side), dtype=np.float32)
    weight = rng.standard_normal((dim, maps_dim), dtype=np.float32) * np.float32(maps_dim ** -0.5)
    texts = rng.standard_normal((images, phrases, dim), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
    return maps, weight, texts


def original(maps: np.ndarray, weight: np.ndarray, texts: np.ndarray, k: int) -> np.ndarray:
    """The original's order of work: A·G per image, then per phrase the |v_u|-weighted sum of k rows of it."""
    out = np.empty((*texts.shape[:2], *maps.shape[2:]), dtype=maps.dtype)
    for i, (grid, phrases) in enumerate(zip(maps, texts)):
        product = np.dot(weight, grid.reshape(grid.shape[0], -1))  # (d, hw)
        for j, text in enumerate(phrases):
            top = np.argsort(text)[::-1][:k]
            out[i, j] = np.dot(np.abs(text[top]), product[top]).reshape(grid.shape[1:])
    return out



def project(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """What the commands run for eq. 9: one filter per text, then the filters applied at every position."""
    return apply_filters(maps, text_filters(weight, texts, k))

def worker(side: str, inputs: tuple, k: int, connection) -> None:
    """One side in its own process: each message from the parent runs it once and answers its wall time."""
    maps, weight, texts = make_inputs(*inputs)
    if side == "original":
        procedure = functools.partial(original, maps, weight, texts, k)
    else:
        procedure = functools.partial(project, *(torch.from_numpy(x) for x in (maps, weight, texts)), k)
    while connection.recv():
        start = time.perf_counter()
        procedure()
        connection.send(time.perf_counter() - start)


def in_workers(inputs: tuple, k: int, runs: int) -> dict[str, list[float]]:
    """Interleaved rounds (a warm-up call first) with each side in its own process."""
    context = multiprocessing.get_context("spawn")
    pipes, processes = {}, []
    for side in ("original", "project"):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(side, inputs, k, child))
        process.start()
        pipes[side] = parent
        processes.append(process)

    def call(side: str) -> float:
        time.sleep(PAUSE_S)  # the other side's idle threads stop spinning before this one starts
        pipes[side].send(True)
        return pipes[side].recv()

    for side in pipes:
        call(side)
    times: dict[str, list[float]] = {side: [] for side in pipes}
    for _ in range(runs):
        for side in pipes:
            times[side].append(call(side))
    for side, process in zip(pipes, processes):
        pipes[side].send(False)
        process.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 images (smoke run)")
    parser.add_argument("--images", type=int, help="number of image maps (default 100, --quick 40)")
    parser.add_argument("--phrases", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--maps-dim", type=int, default=2400, help="D'")
    parser.add_argument("--dim", type=int, default=2400, help="d")
    parser.add_argument("--side", type=int, default=13, help="maps are side x side")
    parser.add_argument("--k", type=int, default=180)
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = args.images or (40 if args.quick else 100)

    print(f"machine: {machine()}")
    for phrases in args.phrases:
        maps, weight, texts = make_inputs(images, phrases, args.maps_dim, args.dim, args.side, args.seed)
        tensors = [torch.from_numpy(x) for x in (maps, weight, texts)]
        print(f"inputs: {images} maps of D'={args.maps_dim} x {args.side}x{args.side}, {phrases} phrases each, "
              f"d={args.dim}, k={args.k}, float32 CPU, seed {args.seed}")
        exact = original(maps.astype(np.float64), weight.astype(np.float64), texts.astype(np.float64), args.k)
        theirs = original(maps, weight, texts, args.k)
        ours = project(*tensors, args.k).numpy()
        scale = float(np.abs(exact).max())
        errors = [float(np.abs(x - exact).max()) for x in (theirs, ours)]
        assert errors[1] <= max(errors[0], 1e-6 * scale), errors
        print(f"  max |error| vs float64 (max |value| {scale:.2f}): original {errors[0]:.2e}, project "
              f"{errors[1]:.2e}")
        times = in_workers((images, phrases, args.maps_dim, args.dim, args.side, args.seed), args.k, args.runs)
        print("  " + ratio_line(f"original / project, one process each, {load()}", times["original"],
                                times["project"], TARGETS.get(phrases)))
        times = interleaved({"original": functools.partial(original, maps, weight, texts, args.k),
                             "project": functools.partial(project, *tensors, args.k)}, args.runs)
        print("  " + ratio_line(f"original / project, both in this process, {load()}", times["original"],
                                times["project"]))
        macs_original = images * (args.dim * args.maps_dim + phrases * args.k) * args.side ** 2
        macs_project = images * phrases * args.maps_dim * (args.k + args.side ** 2)
        print(f"  multiply-adds: original {macs_original / 1e9:.1f} G, project {macs_project / 1e9:.1f} G")


if __name__ == "__main__":
    main()
