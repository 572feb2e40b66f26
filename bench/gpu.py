"""Benchmark: the paper model on one CUDA GPU (make bench-gpu), written to bench/RESULTS-gpu.md.

Run from the repository root:  python bench/gpu.py [--quick]

Four rows, all on random inputs (no network, no data files), in about 5 minutes on a recent GPU:
- training step: the paper model (ResNet-152, D' = d = 2400, 4-layer SRU) at 256 x 256, batch 160, the costliest
  stage (trunk and SRU trained), bf16 autocast, channels-last, through misc.train.loop.train_one_epoch;
- extraction: image embeddings at 400 x 400 (the paper's test size), float32 and bf16, images/s;
- retrieval: misc.eval.retrieval.evaluate (1k folds and full 5k: 5000 images x 25000 captions, d = 2400) on embeddings
  made on the GPU (the ranking itself runs in numpy on the CPU), next to one 5000 x 25000 score product on the GPU;
- heatmaps: models.heatmaps.text_filters + apply_filters of 1000 maps (13 x 13) x 20 phrases, k = 180, on the GPU.
Without CUDA it stops at once with a one-line message. Every row's sizes are arguments of its function, so that
tests/test_bench_gpu.py runs them small on the CPU (the script itself never does).
"""
import argparse
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.common import machine  # noqa: E402
from misc.config import ModelConfig  # noqa: E402
from misc.presets import preset  # noqa: E402
from misc.devices import autocast  # noqa: E402
from misc.train.loop import train_one_epoch  # noqa: E402
from misc.store.files import atomic_path  # noqa: E402
from models.heatmaps import apply_filters, text_filters  # noqa: E402
from misc.train.losses import build_loss  # noqa: E402
from misc.eval.retrieval import evaluate  # noqa: E402
from misc.train.schedule import build_optimizer, enter_stage  # noqa: E402
from misc.data.words import Encoded  # noqa: E402
from models.joint import build_model  # noqa: E402

WORDS = 12  # tokens per random caption


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn, runs: int, device: torch.device) -> list[float]:
    """Wall seconds of ``runs`` calls after one warm-up call, each synchronised."""
    fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def training(device: torch.device, steps: int, batch: int, preset_name: str = "paper", size: int = 256) -> str:
    model_cfg, train_cfg = preset(preset_name)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    enter_stage(model, max(train_cfg.trunk_from_epoch, train_cfg.text_from_epoch), train_cfg)
    optimizer = build_optimizer(model, train_cfg)
    captions = Encoded(torch.randn(batch, WORDS, model_cfg.word_dim), torch.full((batch,), WORDS), 0, batch * WORDS)
    batches = [(torch.randn(batch, 3, size, size), captions, torch.arange(batch))] * (steps + 1)
    loss_fn = build_loss("hard", train_cfg.margin)
    train_one_epoch(model, batches[:1], optimizer, loss_fn, device, "bf16", memory_format=torch.channels_last,
                    progress=False)  # warm-up: cuDNN autotuning, allocations
    synchronize(device)
    stats = train_one_epoch(model, batches[1:], optimizer, loss_fn, device, "bf16",
                            memory_format=torch.channels_last, progress=False)
    synchronize(device)
    return (f"training step, {preset_name} model, batch {batch} at {size}x{size}, bf16 autocast, channels-last: "
            f"{stats['seconds'] / steps:.3f} s/step, {batch * steps / stats['seconds']:.0f} images/s "
            f"({steps} steps after one warm-up)")


def embed(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device, amp: str | None) -> torch.Tensor:
    with autocast(device, amp):
        return encoder(images).float()


@torch.no_grad()
def extraction(device: torch.device, batches: int, batch: int, model_cfg: ModelConfig | None = None,
               size: int = 400) -> list[str]:
    """The paper's image path (``model_cfg`` None) embedding random images, in float32 and in bf16."""
    torch.manual_seed(0)
    encoder = build_model(model_cfg or ModelConfig()).image.to(device).eval()
    images = torch.randn(batch, 3, size, size, device=device)
    rows = []
    for amp in (None, "bf16"):
        layout = torch.channels_last if amp else torch.contiguous_format
        encoder.to(memory_format=layout)
        call = functools.partial(embed, encoder, images.to(memory_format=layout), device, amp)
        median = statistics.median(device_seconds(call, batches, device))
        rows.append(f"extraction at {size}x{size}, batch {batch}, {amp or 'float32'}: {batch / median:.0f} images/s")
    return rows


def retrieval(device: torch.device, n_images: int = 5000, dim: int = 2400) -> list[str]:
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, device=device, generator=generator), dim=1)
    captions = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + 0.3 * torch.randn(
        5 * n_images, dim, device=device, generator=generator), dim=1)
    product = statistics.median(device_seconds(lambda: images @ captions.T, 3, device))
    cpu_images, cpu_captions = images.cpu().numpy(), captions.cpu().numpy()
    rows = [f"retrieval: one {n_images} x {5 * n_images} x {dim} score product on the {device.type}: "
            f"{product * 1e3:.1f} ms"]
    for protocol in ("1k", "full"):
        start = time.perf_counter()
        result = evaluate(cpu_images, cpu_captions, protocols=(protocol,))[protocol]
        rows.append(f"retrieval: misc.eval.retrieval.evaluate {protocol} (numpy, CPU): "
                    f"{time.perf_counter() - start:.2f} s, rsum {result['rsum']:.1f}")
    return rows


def heatmap_row(device: torch.device, n_maps: int = 1000, dim: int = 2400, k: int = 180) -> str:
    generator = torch.Generator(device=device).manual_seed(0)
    maps = torch.randn(n_maps, dim, 13, 13, device=device, generator=generator)
    weight = torch.randn(dim, dim, device=device, generator=generator) / dim ** 0.5
    texts = torch.nn.functional.normalize(torch.randn(n_maps, 20, dim, device=device, generator=generator), dim=-1)
    median = statistics.median(device_seconds(lambda: apply_filters(maps, text_filters(weight, texts, k)), 5,
                                                    device))
    return f"heatmaps: {n_maps} maps x 20 phrases (D'=d={dim}, 13x13, k={k}): {median * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and batches")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here")
    device = torch.device("cuda")
    started = datetime.datetime.now(datetime.UTC)
    rows = [training(device, 3 if args.quick else 10, 160)]
    print(rows[-1], flush=True)
    for row in [*extraction(device, 3 if args.quick else 10, 64), *retrieval(device), heatmap_row(device)]:
        print(row, flush=True)
        rows.append(row)
    text = (f"# GPU benchmark results\n\nWritten by `make bench-gpu` (`python bench/gpu.py`) on "
            f"{started:%Y-%m-%d %H:%M} UTC.\n\nMachine: {machine()}.\n\n```\n" + "\n".join(rows) + "\n```\n")
    with atomic_path(HERE / "RESULTS-gpu.md") as temporary:
        temporary.write_text(text, encoding="utf-8")
    print("wrote bench/RESULTS-gpu.md")


if __name__ == "__main__":
    main()
