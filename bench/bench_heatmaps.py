"""Benchmark: heatmaps of eq. 9 by selecting k rows of A first (misc.localization.heatmaps) vs the direct product.

Run from the repository root:  python bench/bench_heatmaps.py [--quick]
Inputs are seeded random float32 tensors on the CPU: 1000 image maps G (D' = 2400, 13 x 13, a 416 x 416 input),
5 phrases per image, d = 2400, k = 180 (--quick: 50 images). The reference forms all d maps G' = A·G of each image
(misc.localization.heatmaps_full, a 1x1 convolution, one image at a time) and then sums the k selected maps weighted
by |v_u|; the project's path sums k rows of A per phrase and takes one dot product per position, batched over all
images. The script checks both give the same maps, then prints median wall times and the speed ratio (about
4 minutes on 2 shared CPU cores, nearly all of it the reference).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, timed, verdict  # noqa: E402
from misc.localization import heatmaps, heatmaps_full  # noqa: E402


def make_inputs(images: int, phrases: int, maps_dim: int, dim: int, side: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps G (N, D', h, w), A (d, D') at the scale of a trained projection, unit texts (N, P, d)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.empty(images, maps_dim, side, side).normal_(generator=g)
    weight = torch.empty(dim, maps_dim).normal_(std=maps_dim ** -0.5, generator=g)
    texts = torch.empty(images, phrases, dim).normal_(generator=g)
    texts /= texts.norm(dim=-1, keepdim=True)
    return maps, weight, texts


def reference(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """The direct product A·G per image, then the top-k weighted sum."""
    return torch.cat([heatmaps_full(maps[i:i + 1], weight, texts[i:i + 1], k) for i in range(len(maps))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 images (smoke run)")
    parser.add_argument("--images", type=int, help="number of image maps (default 1000, --quick 50)")
    parser.add_argument("--phrases", type=int, default=5)
    parser.add_argument("--maps-dim", type=int, default=2400, help="D'")
    parser.add_argument("--dim", type=int, default=2400, help="d")
    parser.add_argument("--side", type=int, default=13, help="maps are side x side")
    parser.add_argument("--k", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the project's path")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed runs of the reference (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = args.images or (50 if args.quick else 1000)

    print(f"machine: {machine()}")
    print(f"inputs: {images} maps of D'={args.maps_dim} x {args.side}x{args.side}, {args.phrases} phrases each, "
          f"d={args.dim}, k={args.k}, float32 CPU, seed {args.seed}")
    maps, weight, texts = make_inputs(images, args.phrases, args.maps_dim, args.dim, args.side, args.seed)

    fast_time, fast = timed(lambda: heatmaps(maps, weight, texts, args.k), args.repeats)
    slow_time, slow = timed(lambda: reference(maps, weight, texts, args.k), args.ref_repeats)
    scale = float(slow.abs().max())
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * scale)
    print(f"same maps: {tuple(fast.shape)}, max |difference| {float((fast - slow).abs().max()):.2e} "
          f"(max |value| {scale:.2f})")

    macs_slow = images * (args.dim * args.maps_dim + args.phrases * args.k) * args.side ** 2
    macs_fast = images * args.phrases * args.maps_dim * (args.k + args.side ** 2)
    print(f"{'path':<58}{'runs':>5}{'median s':>10}{'GMAC':>8}")
    print(f"{'reference: A·G per image (all d maps), then top-k sum':<58}{args.ref_repeats:>5}{slow_time:>10.3f}"
          f"{macs_slow / 1e9:>8.1f}")
    print(f"{'misc.localization.heatmaps: k rows of A, then f·G, batched':<58}{args.repeats:>5}{fast_time:>10.3f}"
          f"{macs_fast / 1e9:>8.1f}")
    ratio = slow_time / fast_time
    print(f"speed ratio reference / project: {ratio:.1f}x ({verdict(ratio, 20)})")


if __name__ == "__main__":
    main()
