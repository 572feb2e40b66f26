"""Benchmark: misc.retrieval's chunked counting ranks vs the original release's full-sort ranking.

Run from the repository root:  python bench/bench_retrieval.py [--quick]
Both paths rank the same seeded random unit vectors (5000 images × 25000 captions, d=2400 by default; --quick:
1000 × 5000) on the CPU; the script checks they give identical R@k and identical ranks except where a positive
ties exactly with negatives, then prints wall times, the speed ratio and the peak memory of the project's 5k
("full") protocol measured in a fresh child process.
"""
import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, timed, verdict  # noqa: E402
from misc.retrieval import evaluate, rank_captions, rank_images, recall_metrics  # noqa: E402


def make_inputs(n_images: int, n_captions: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random unit vectors, normalised in place so that making them costs no temporary copy."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n_images, dim).normal_(generator=g)
    captions = torch.empty(n_captions, dim).normal_(generator=g)
    for x in (images, captions):
        x.div_(x.norm(dim=1, keepdim=True))
    return images, captions


def original_ranks(images: torch.Tensor, captions: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The original release's procedure: full score matrix, one full descending argsort per query.

    Caption j belongs to image j // 5. The scores come from the same float32 GEMM as misc.retrieval (torch),
    so the two paths differ only in how they rank; another BLAS rounds differently and flips near-ties.
    """
    return original_ranking((images @ captions.T).numpy())


def original_ranking(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original's ranking step on a score matrix (N, M): full descending argsort, first positive per row."""
    order = np.argsort(scores, axis=1)[:, ::-1]
    caption_ranks = np.array([np.flatnonzero(np.isin(row, np.arange(5 * i, 5 * i + 5)))[0]
                              for i, row in enumerate(order)]) + 1
    order = np.argsort(scores.T, axis=1)[:, ::-1]
    image_ranks = np.array([np.flatnonzero(row == j // 5)[0] for j, row in enumerate(order)]) + 1
    return caption_ranks, image_ranks


def counting_ranking(scores: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """misc.retrieval's ranking step on the same score matrix: count the candidates above the positive (the
    comparison rank_captions / rank_images run on each score block), no sort."""
    n_images, n_captions = scores.shape
    positives = torch.arange(n_captions).view(n_images, -1)  # caption j belongs to image j // 5
    best = scores.gather(1, positives).amax(1, keepdim=True)
    caption_ranks = 1 + (scores > best).sum(1)
    image_ranks = 1 + (scores > scores[owner, torch.arange(n_captions)]).sum(0)
    return caption_ranks, image_ranks


def check_agreement(images: torch.Tensor, captions: torch.Tensor, fast_cap: np.ndarray, slow_cap: np.ndarray,
                    fast_img: np.ndarray, slow_img: np.ndarray) -> int:
    """Asserts both paths agree on every rank but those lowered by exact score ties; returns how many those are.

    Where they differ, the original must rank the positive below misc.retrieval by at most the number of
    negatives whose score equals the positive's exactly, in the very score matrix the original sorted.
    """
    scores = images @ captions.T  # (N, M), bit for bit the matrix of original_ranks
    differing = 0
    for fast, slow, transposed in ((fast_cap, slow_cap, False), (fast_img, slow_img, True)):
        for q in np.flatnonzero(fast != slow):
            row, positives = (scores[:, q], [q // 5]) if transposed else (scores[q], list(range(5 * q, 5 * q + 5)))
            best = row[positives].max()
            ties = int((row == best).sum()) - int((row[positives] == best).sum())
            assert 0 < slow[q] - fast[q] <= ties, (transposed, q, fast[q], slow[q], ties)
            differing += 1
    return differing


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_memory(n_images: int, n_captions: int, dim: int, seed: int) -> dict[str, float]:
    """Run in a fresh process: resident MiB once the inputs exist, and the extra peak of evaluate(("full",)).

    The peak counter is reset after the inputs are made (Linux: writing 5 to /proc/self/clear_refs), so the
    extra peak is what the protocol itself adds, torch allocations included.
    """
    images, captions = make_inputs(n_images, n_captions, dim, seed)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_mib("VmRSS")
    evaluate(images, captions, protocols=("full",))
    return {"inputs": (images.nbytes + captions.nbytes) / 2**20, "baseline": baseline,
            "extra": _status_mib("VmHWM") - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1000 images × 5000 captions (smoke run)")
    parser.add_argument("--dim", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the project's path and of the GEMM")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs of the original procedure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_images = 1000 if args.quick else 5000
    n_captions = 5 * n_images

    print(f"machine: {machine()}; numpy {np.__version__}")
    print(f"inputs: {n_images} images × {n_captions} captions, d={args.dim}, float32 CPU, seed {args.seed}")
    images, captions = make_inputs(n_images, n_captions, args.dim, args.seed)
    owner = torch.arange(n_captions) // 5

    gemm_time, _ = timed(lambda: images @ captions.T, args.repeats)
    fast_time, fast = timed(lambda: evaluate(images, captions, protocols=("full",))["full"], args.repeats)
    slow_time, (slow_cap, slow_img) = timed(lambda: original_ranks(images, captions), args.slow_repeats)
    scores = images @ captions.T
    sort_time, sorted_ranks = timed(lambda: original_ranking(scores.numpy()), args.slow_repeats)
    count_time, counted_ranks = timed(lambda: counting_ranking(scores, owner), args.repeats)
    check_agreement(images, captions, counted_ranks[0].numpy(), sorted_ranks[0], counted_ranks[1].numpy(),
                    sorted_ranks[1])

    fast_cap = rank_captions(images, captions, owner).numpy()
    fast_img = rank_images(images, captions, owner).numpy()
    tied = check_agreement(images, captions, fast_cap, slow_cap, fast_img, slow_img)
    for direction, ranks in (("caption_retrieval", slow_cap), ("image_retrieval", slow_img)):
        original = recall_metrics(torch.from_numpy(ranks))
        assert all(fast[direction][f"R@{k}"] == original[f"R@{k}"] for k in (1, 5, 10)), direction
        recalls = "/".join(f"{fast[direction][f'R@{k}']:.3f}" for k in (1, 5, 10))
        print(f"{direction}: R@1/5/10 identical ({recalls}), "
              f"medr {fast[direction]['medr']} vs {original['medr']}, "
              f"meanr {fast[direction]['meanr']:.4f} vs {original['meanr']:.4f} (misc.retrieval vs original)")
    print(f"ranks identical except {tied} queries whose positive ties exactly (float32) with negatives: numpy's "
          f"quicksort orders ties arbitrarily, misc.retrieval keeps the positive first")

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        memory = pool.apply(peak_memory, (n_images, n_captions, args.dim, args.seed))

    print(f"{'path':<52}{'runs':>5}{'median s':>10}")
    print(f"{'original: score matrix + full argsort per query':<52}{args.slow_repeats:>5}{slow_time:>10.2f}")
    fast_name = 'misc.retrieval evaluate(protocols=("full",))'
    print(f"{fast_name:<52}{args.repeats:>5}{fast_time:>10.2f}")
    print(f"{'  reference: one N×M float32 GEMM (both paths need it)':<52}{args.repeats:>5}{gemm_time:>10.2f}")
    print(f"time beyond the GEMM: original {slow_time - gemm_time:.2f} s (one GEMM), "
          f"misc.retrieval {fast_time - 2 * gemm_time:.2f} s (two chunked GEMMs: one per direction)")
    ratio = slow_time / fast_time
    print(f"speed ratio original / misc.retrieval, scores included: {ratio:.1f}× ({verdict(ratio, 30)})")
    print(f"{'ranking step only, on one precomputed score matrix':<52}")
    print(f"{'  original: full argsort per row, first positive':<52}{args.slow_repeats:>5}{sort_time:>10.2f}")
    print(f"{'  misc.retrieval: count candidates above positive':<52}{args.repeats:>5}{count_time:>10.2f}")
    ranking_ratio = sort_time / count_time
    print(f"speed ratio of the ranking step: {ranking_ratio:.1f}× ({verdict(ranking_ratio, 30)})")
    if ratio < 30:
        print("why not 30× end to end here: both paths need the N×M score product, which on a CPU costs about as "
              "much as the original's sort; what the project changes (the ranking step) is the ratio above; on a "
              "GPU the product takes milliseconds and the end-to-end ratio approaches the ranking ratio")
    print(f"peak memory of the {n_images}-image full protocol (fresh process): inputs {memory['inputs']:.0f} MiB, "
          f"RSS after inputs {memory['baseline']:.0f} MiB, extra peak during evaluate {memory['extra']:.0f} MiB "
          f"({verdict(memory['extra'], 2048, ' MiB', at_least=False)})")


if __name__ == "__main__":
    main()
