"""Benchmark: the paper model on one CUDA GPU (make bench-gpu), written to bench/RESULTS-gpu.md.

Run from the repository root:  python bench/gpu.py [--quick]

Four rows, all on random inputs (no network, no data files), in about 5 minutes on a recent GPU:
- training step: the paper model (ResNet-152, D' = d = 2400, 4-layer SRU) at 256 x 256, batch 160, the costliest
  stage (trunk and SRU trained), bf16 autocast, channels-last, through misc.engine.train_one_epoch;
- extraction: image embeddings at 400 x 400 (the paper's test size), float32 and bf16, images/s;
- retrieval: misc.retrieval.evaluate (1k folds and full 5k: 5000 images x 25000 captions, d = 2400) on embeddings
  made on the GPU (the ranking itself runs in numpy on the CPU), next to one 5000 x 25000 score product on the GPU;
- heatmaps: misc.localization.heatmaps of 1000 maps (13 x 13) x 20 phrases, k = 180, on the GPU.
Without CUDA it stops at once with a one-line message.
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
from misc.config import ModelConfig, preset  # noqa: E402
from misc.engine import autocast, train_one_epoch  # noqa: E402
from misc.files import atomic_path  # noqa: E402
from misc.localization import heatmaps  # noqa: E402
from misc.loss import build_loss  # noqa: E402
from misc.retrieval import evaluate  # noqa: E402
from misc.schedule import build_optimizer, enter_stage  # noqa: E402
from misc.words import Encoded  # noqa: E402
from models.joint import build_model  # noqa: E402

WORDS = 12  # tokens per random caption


def cuda_seconds(fn, runs: int) -> list[float]:
    """Wall seconds of ``runs`` calls after one warm-up call, each synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def training(device: torch.device, steps: int, batch: int) -> str:
    model_cfg, train_cfg = preset("paper")
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    enter_stage(model, max(train_cfg.trunk_from_epoch, train_cfg.text_from_epoch), train_cfg)
    optimizer = build_optimizer(model, train_cfg)
    captions = Encoded(torch.randn(batch, WORDS, model_cfg.word_dim), torch.full((batch,), WORDS), 0, batch * WORDS)
    batches = [(torch.randn(batch, 3, 256, 256), captions, torch.arange(batch))] * (steps + 1)
    loss_fn = build_loss("hard", train_cfg.margin)
    train_one_epoch(model, batches[:1], optimizer, loss_fn, device, "bf16", memory_format=torch.channels_last,
                    progress=False)  # warm-up: cuDNN autotuning, allocations
    torch.cuda.synchronize()
    stats = train_one_epoch(model, batches[1:], optimizer, loss_fn, device, "bf16",
                            memory_format=torch.channels_last, progress=False)
    torch.cuda.synchronize()
    return (f"training step, paper model, batch {batch} at 256x256, bf16 autocast, channels-last: "
            f"{stats['seconds'] / steps:.3f} s/step, {batch * steps / stats['seconds']:.0f} images/s "
            f"({steps} steps after one warm-up)")


def embed(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device, amp: str | None) -> torch.Tensor:
    with autocast(device, amp):
        return encoder(images).float()


@torch.no_grad()
def extraction(device: torch.device, batches: int, batch: int) -> list[str]:
    model_cfg = ModelConfig()
    torch.manual_seed(0)
    encoder = build_model(model_cfg).image.to(device).eval()
    images = torch.randn(batch, 3, 400, 400, device=device)
    rows = []
    for amp in (None, "bf16"):
        layout = torch.channels_last if amp else torch.contiguous_format
        encoder.to(memory_format=layout)
        median = statistics.median(cuda_seconds(functools.partial(embed, encoder, images.to(memory_format=layout),
                                                                  device, amp), batches))
        rows.append(f"extraction at 400x400, batch {batch}, {amp or 'float32'}: {batch / median:.0f} images/s")
    return rows


def retrieval(device: torch.device) -> list[str]:
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5000, 2400, device=device, generator=generator), dim=1)
    captions = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + 0.3 * torch.randn(
        25000, 2400, device=device, generator=generator), dim=1)
    product = statistics.median(cuda_seconds(lambda: images @ captions.T, 3))
    cpu_images, cpu_captions = images.cpu().numpy(), captions.cpu().numpy()
    rows = [f"retrieval: one 5000 x 25000 x 2400 score product on the GPU: {product * 1e3:.1f} ms"]
    for protocol in ("1k", "full"):
        start = time.perf_counter()
        result = evaluate(cpu_images, cpu_captions, protocols=(protocol,))[protocol]
        rows.append(f"retrieval: misc.retrieval.evaluate {protocol} (numpy, CPU): {time.perf_counter() - start:.2f} s"
                    f", rsum {result['rsum']:.1f}")
    return rows


def heatmap_row(device: torch.device) -> str:
    generator = torch.Generator(device=device).manual_seed(0)
    maps = torch.randn(1000, 2400, 13, 13, device=device, generator=generator)
    weight = torch.randn(2400, 2400, device=device, generator=generator) / 49
    texts = torch.nn.functional.normalize(torch.randn(1000, 20, 2400, device=device, generator=generator), dim=-1)
    median = statistics.median(cuda_seconds(lambda: heatmaps(maps, weight, texts, 180), 5))
    return f"heatmaps: 1000 maps x 20 phrases (D'=d=2400, 13x13, k=180): {median * 1e3:.1f} ms"


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
