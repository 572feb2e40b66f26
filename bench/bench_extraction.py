"""Benchmark: image feature extraction speed on the CPU, and whether the data loader keeps up with the model.

Run from the repository root:  python bench/bench_extraction.py [--quick]

Synthetic 640x480 JPEGs (COCO's usual size; smooth shapes plus noise, so they decode like photos) are written to a
temporary folder and embedded through misc.collections.extraction's own loop (ImageFiles, collate_images,
embed_image_batches: what image_features_extraction.py runs) with random weights:
- demo:  the demo preset's image path (resnet18 trunk, D' = d = 256) at 128 x 128;
- paper: the paper's image path (resnet152 trunk, D' = d = 2400) at 400 x 400.
Per batch it records the model's compute time and the time spent waiting for the loader; the table shows their
medians (the first batch, warm-up, excluded) and images/s = batch / (compute + wait). "loader alone" iterates the
same DataLoader with no model: if its images/s is well above the model's, the loader is not the bottleneck.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from misc.config import ModelConfig  # noqa: E402
from misc.presets import preset  # noqa: E402
from misc.collections.extraction import ImageFiles, Timing, collate_images, embed_image_batches  # noqa: E402
from models.visual import ImageEncoder  # noqa: E402


def write_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` 640x480 JPEGs of random ellipses and rectangles on a gradient, with mild noise."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 1, 640)[None, :, None] * np.linspace(0.3, 1, 480)[:, None, None]
    names = []
    for number in range(count):
        base = (gradient * rng.integers(60, 255, 3)).astype(np.uint8)
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            box = [int(x), int(y), int(x + rng.integers(30, 200)), int(y + rng.integers(30, 200))]
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3)), 0, 255)
        name = f"image_{number:05d}.jpg"
        Image.fromarray(noisy.astype(np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def image_path(config: ModelConfig) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(config.trunk, config.maps_dim, config.embed_dim, config.pooling, config.weldon_k,
                        config.image_dropout).eval()


def measure(encoder: ImageEncoder, folder: Path, names: list[str], size: int, batch_size: int,
            workers: int) -> dict[str, float]:
    """Median per-batch compute and loader-wait seconds of one pass (first batch excluded), and images/s."""
    loader = DataLoader(ImageFiles(folder, names, size), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images)
    timing = Timing()
    for _ in embed_image_batches(encoder, loader, torch.device("cpu"), timing=timing, progress=False):
        pass
    compute, wait = statistics.median(timing.compute[1:]), statistics.median(timing.wait[1:])
    return {"compute": compute, "wait": wait, "images_per_s": batch_size / (compute + wait)}


def loader_alone(folder: Path, names: list[str], size: int, batch_size: int, workers: int) -> float:
    """Images/s of the DataLoader by itself (decode, resize, normalise, collate): median batch, first excluded."""
    loader = DataLoader(ImageFiles(folder, names, size), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images)
    times, tick = [], time.perf_counter()
    for _ in loader:
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    return batch_size / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (a few small batches)")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_model, demo_train = preset("demo")
    # (name, model config, size, batch size, batches incl. warm-up, loader workers)
    settings = [("demo", demo_model, demo_train.test_size, 32, 3 if args.quick else 9, 1),
                ("demo", demo_model, demo_train.test_size, 32, 3 if args.quick else 9, 2),
                ("paper", ModelConfig(), 400, 2 if args.quick else 4, 3 if args.quick else 4, 1)]
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        names = write_images(folder, max(batch * batches for _, _, _, batch, batches, _ in settings))
        for name, config, size, batch, batches, workers in settings:
            encoder = image_path(config)
            subset = names[:batch * batches]
            result = measure(encoder, folder, subset, size, batch, workers)
            alone = loader_alone(folder, subset, size, batch, workers)
            rows.append((f"{name} ({config.trunk}, D'=d={config.embed_dim})", size, batch, len(subset), workers,
                         result["images_per_s"], result["compute"], result["wait"], alone))
            del encoder
    print(f"\n{'model':<34} {'size':>5} {'batch':>5} {'images':>6} {'workers':>7} {'img/s':>8} "
          f"{'compute s/batch':>15} {'wait s/batch':>12} {'loader alone img/s':>18}")
    for model, size, batch, images, workers, rate, compute, wait, alone in rows:
        print(f"{model:<34} {size:>5} {batch:>5} {images:>6} {workers:>7} {rate:>8.2f} {compute:>15.3f} "
              f"{wait:>12.3f} {alone:>18.1f}")
    print(f"\nmedians over batches (first excluded); load average now {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
          " (the machine is shared: other processes slow every row)")


if __name__ == "__main__":
    main()
