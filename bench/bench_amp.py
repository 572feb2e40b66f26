"""Benchmark: CPU inference in bfloat16 (--amp bf16: autocast + channels-last) vs float32.

Run from the repository root:  python bench/bench_amp.py [--quick]

The paper's image path (ResNet-152 trunk, D' = d = 2400, random weights) embeds a batch of 400 x 400 images in
float32 and in bf16, interleaved (A B A B ..., after a warm-up of each): the speed-up and the cosine between the
two embeddings of each image. The same as whole commands: image_features_extraction.py with and without --amp bf16
on a folder of random 400 x 400 JPEGs, from a checkpoint of the randomly initialised paper model (start-up, reading
the 500 MB checkpoint and building the model included). Then demo-sized retrieval (1000 images, 5000 captions;
--quick 200): the demo preset's image path (ResNet-18, 96 x 96) embeds seeded images both ways; captions are fixed
noisy copies of the float32 image embeddings, so the change in R@k is what bf16 image embeddings alone change.
bf16 is never the default: it changes reported numbers, as this shows.
"""
import argparse
import copy
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import command, interleaved, load, machine, ratio_line  # noqa: E402
from misc.store import checkpoint  # noqa: E402
from misc.config import ModelConfig, TrainConfig  # noqa: E402
from misc.presets import preset  # noqa: E402
from misc.devices import autocast  # noqa: E402
from misc.eval.retrieval import evaluate  # noqa: E402
from models.joint import build_model  # noqa: E402
from models.visual import ImageEncoder  # noqa: E402

CPU = torch.device("cpu")


def image_path(config: ModelConfig) -> tuple[ImageEncoder, ImageEncoder]:
    """The image path of ``config`` in eval mode, as float32 and as a channels-last copy with the same weights."""
    torch.manual_seed(0)
    encoder = ImageEncoder(config.trunk, config.maps_dim, config.embed_dim, config.pooling, config.weldon_k,
                           config.image_dropout).eval()
    return encoder, copy.deepcopy(encoder).to(memory_format=torch.channels_last)


@torch.no_grad()
def embed(encoder: ImageEncoder, images: torch.Tensor, amp: str | None, batch: int) -> torch.Tensor:
    """Unit embeddings (N, d) float32, batch by batch, as misc.inference runs them."""
    layout = torch.channels_last if amp else torch.contiguous_format
    with autocast(CPU, amp):
        return torch.cat([encoder(images[i:i + batch].to(memory_format=layout)).float()
                          for i in range(0, len(images), batch)])


def whole_commands(count: int, runs: int) -> None:
    """image_features_extraction.py on ``count`` random 400 x 400 JPEGs, float32 against --amp bf16, from a
    checkpoint of the randomly initialised paper model: the speed-up a user sees, and the cosine of the outputs."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        config = ModelConfig()
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                                "config": {"model": asdict(config), "train": asdict(TrainConfig())},
                                "model": build_model(config).state_dict()}, folder / "paper.pth.tar")
        rng = np.random.default_rng(4)
        (folder / "images").mkdir()
        for index in range(count):
            pixels = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / f"{index:03d}.jpg")
        base = ["image_features_extraction.py", "-p", str(folder / "paper.pth.tar"), "-d", str(folder / "images"),
                "--size", "400", "--batch-size", "4", "--no-progress"]
        times = interleaved({"float32": command(*base, "-o", str(folder / "float32.npz")),
                             "bf16": command(*base, "-o", str(folder / "bf16.npz"), "--amp", "bf16")}, runs)
        exact, reduced = (np.load(folder / f"{name}.npz")["features"] for name in ("float32", "bf16"))
    cosine = (exact * reduced).sum(1)
    print(f"image_features_extraction.py, paper model, {count} images at 400x400, batch 4, whole command: "
          f"{statistics.median(times['float32']):.2f} s in float32")
    print("  " + ratio_line(f"speed-up float32 / --amp bf16, {load()}", times["float32"], times["bf16"]))
    print(f"  cosine(bf16, float32) per image: min {cosine.min():.5f}, mean {cosine.mean():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and retrieval set (smoke run)")
    parser.add_argument("--runs", type=int, default=2, help="interleaved rounds")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    reference, fast = image_path(ModelConfig())
    batch = 1 if args.quick else 2
    images = torch.randn(batch, 3, 400, 400, generator=torch.Generator().manual_seed(1))
    times = interleaved({"float32": lambda: embed(reference, images, None, batch),
                         "bf16": lambda: embed(fast, images, "bf16", batch)}, args.runs)
    cosine = (embed(reference, images, None, batch) * embed(fast, images, "bf16", batch)).sum(1)
    print(f"paper image path (resnet152, D'=d=2400), batch {batch} at 400x400: "
          f"{statistics.median(times['float32']):.2f} s in float32")
    print("  " + ratio_line(f"speed-up float32 / bf16, {load()}", times["float32"], times["bf16"]))
    print(f"  cosine(bf16, float32) per image: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    whole_commands(4 if args.quick else 16, args.runs)

    demo_model, _ = preset("demo")
    reference, fast = image_path(demo_model)
    count = 200 if args.quick else 1000
    pixels = torch.randn(count, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    exact = embed(reference, pixels, None, 64)
    reduced = embed(fast, pixels, "bf16", 64)
    noise = torch.randn(5 * count, exact.shape[1], generator=torch.Generator().manual_seed(3))
    captions = exact.repeat_interleave(5, 0) + 0.6 * noise / exact.shape[1] ** 0.5
    captions /= captions.norm(dim=1, keepdim=True)
    cosine = (exact * reduced).sum(1)
    print(f"demo image path (resnet18, D'=d=256) at 96x96, {count} images, {5 * count} captions: cosine min "
          f"{cosine.min():.5f}, mean {cosine.mean():.5f}")
    both = {name: evaluate(x, captions, protocols=("full",))["full"] for name, x in (("float32", exact),
                                                                                     ("bf16", reduced))}
    for direction in ("caption_retrieval", "image_retrieval"):
        cells = ", ".join(f"{key} {both['float32'][direction][key]:.1f} -> {both['bf16'][direction][key]:.1f}"
                          for key in ("R@1", "R@5", "R@10", "medr"))
        print(f"  {direction} float32 -> bf16: {cells}")
    print(load())


if __name__ == "__main__":
    main()
