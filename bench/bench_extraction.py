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

Then whole commands (start-up, reading the 500 MB checkpoint, decoding, writing included) on N of those JPEGs
(default 160, --quick 8) with a checkpoint of the randomly initialised paper model, interleaved after a warm-up on
8 images: image_features_extraction.py in float32 (the default) against --amp bf16 (autocast + channels-last),
images/s and the cosine of the two outputs per image (target: >= 2x at cosine >= 0.999); then the sharded layout
(-o FOLDER, shards of 20 files) from 1 process against 2 (torchrun --nproc_per_node=2, one thread each as torchrun
sets), both in bf16, with each rank's share of time waiting for the loader from its last log line, and whether the
two layouts hold the same vectors.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, load, machine, ratio_line  # noqa: E402
from misc.config import ModelConfig, TrainConfig  # noqa: E402
from misc.presets import preset  # noqa: E402
from misc.store import checkpoint  # noqa: E402
from models.joint import build_model  # noqa: E402
from misc.collections.extraction import ImageFiles, Timing, embed_image_batches  # noqa: E402
from misc.data.decoded import collate_images  # noqa: E402
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


ROOT = Path(__file__).resolve().parents[1]
WAIT = re.compile(r"([\d.]+) images/s; ([\d.]+) s of ([\d.]+) s waiting for the loader")


def paper_checkpoint(path: Path) -> None:
    """A checkpoint of the randomly initialised paper model (seeded), as train.py writes them."""
    torch.manual_seed(0)
    config = ModelConfig()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                            "config": {"model": config.__dict__, "train": TrainConfig().__dict__},
                            "model": build_model(config).state_dict()}, path)


def extraction(*argv: str, processes: int = 1) -> tuple[float, list[str]]:
    """Run image_features_extraction.py (under torchrun with ``processes`` > 1); wall seconds and the final log
    line of every rank (its images/s and loader wait)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    started = time.perf_counter()
    result = subprocess.run([*launcher, "image_features_extraction.py", *argv, "--no-progress"], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"image_features_extraction.py {' '.join(argv)} failed: {result.stderr.strip()[-800:]}")
    return seconds, [line for line in result.stderr.splitlines() if WAIT.search(line)]


def waits(lines: list[str]) -> str:
    """'rank 0: 38% of 40.1 s, rank 1: ...' from the final log lines."""
    shares = [WAIT.search(line) for line in lines]
    return ", ".join(f"{100 * float(m[2]) / max(float(m[3]), 1e-9):.0f}% of {float(m[3]):.1f} s" for m in shares)


def sharded_vectors(folder: Path) -> np.ndarray:
    """The vectors of a sharded output in shard order, as float32."""
    shards = sorted((folder / "emb" / "img").glob("*.npy"))
    return np.concatenate([np.load(shard).astype(np.float32) for shard in shards])


def whole_commands(folder: Path, count: int, runs: int) -> None:
    """float32 against --amp bf16 as whole commands, then 1 against 2 processes in the sharded layout."""
    paper_checkpoint(folder / "paper.pth.tar")
    for sub in ("few", "all"):
        (folder / sub).mkdir()
    for number, name in enumerate(write_images(folder / "all", count, seed=1)):
        if number < 8:
            os.link(folder / "all" / name, folder / "few" / name)
    outputs = iter(range(10**6))
    logs: dict[str, list[str]] = {}

    def run(name: str, images: str, suffix: str, *extra: str, processes: int = 1) -> Callable[[], None]:
        def call() -> None:
            out = folder / f"{name}-{next(outputs)}{suffix}"  # a new output each time: a folder would resume
            logs[name] = extraction("-p", str(folder / "paper.pth.tar"), "--size", "400", "--batch-size", "8",
                                    "-d", str(folder / images), "-o", str(out), *extra, processes=processes)[1]
            logs[name + " output"] = [str(out)]
        return call
    warmup = {"float32": run("warm", "few", ".npz"), "bf16": run("warm", "few", ".npz", "--amp", "bf16")}
    times = interleaved({"float32": run("float32", "all", ".npz"),
                         "bf16": run("bf16", "all", ".npz", "--amp", "bf16")}, runs, warmup)
    exact, reduced = (np.load(logs[f"{name} output"][0])["features"] for name in ("float32", "bf16"))
    cosine = (exact * reduced).sum(1)
    print(f"\nimage_features_extraction.py, paper model, {count} JPEGs of 640x480 at 400x400, batch 8, whole "
          f"command: float32 {count / statistics.median(times['float32']):.2f} images/s, --amp bf16 "
          f"{count / statistics.median(times['bf16']):.2f} images/s")
    print("  " + ratio_line(f"float32 / --amp bf16, {load()}", times["float32"], times["bf16"], target=2))
    print(f"  cosine(bf16, float32) per image: min {cosine.min():.5f}, mean {cosine.mean():.5f} "
          f"(target >= 0.999: {'met' if cosine.min() >= 0.999 else 'NOT met'})")
    print(f"  loader wait: float32 {waits(logs['float32'])}; bf16 {waits(logs['bf16'])}")

    shards = ("--amp", "bf16", "--chunk-size", "20")
    times = interleaved({"1 process": run("one", "all", "", *shards),
                         "2 processes": run("two", "all", "", *shards, processes=2)}, runs,
                        {"1 process": run("warm", "few", "", *shards),
                         "2 processes": run("warm", "few", "", *shards, processes=2)})
    same = np.array_equal(sharded_vectors(Path(logs["one output"][0])), sharded_vectors(Path(logs["two output"][0])))
    print(f"\nsharded layout (-o FOLDER, {-(-count // 20)} shards of up to 20), --amp bf16, whole command, {load()}:")
    for name, key in (("1 process", "one"), ("2 processes", "two")):
        seconds = statistics.median(times[name])
        print(f"  {name:<12} {count / seconds:6.2f} images/s ({seconds:.1f} s); loader wait per rank: "
              f"{waits(logs[key])}")
    print(f"  same vectors from 1 and 2 processes: {'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (a few small batches)")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    parser.add_argument("--images", type=int, help="images of the whole-command runs (default: 160, --quick 8)")
    parser.add_argument("--runs", type=int, default=2, help="interleaved rounds of the whole commands")
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
    with tempfile.TemporaryDirectory() as temporary:
        whole_commands(Path(temporary), args.images or (8 if args.quick else 160), args.runs)


if __name__ == "__main__":
    main()
