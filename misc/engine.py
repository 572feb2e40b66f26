"""The loops every CLI shares: one training epoch, encoding images and captions, retrieval evaluation."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import retrieval
from misc.errors import UserError
from misc.datasets import ImageDataset, Record, eval_captions, eval_transform
from misc.words import WordVectors
from models.joint import JointEmbedding

log = logging.getLogger(__name__)
LossFn = Callable[..., torch.Tensor]  # loss_fn(image_emb, text_emb, ids=image_ids)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; ``amp`` is None, 'bf16' or 'fp16'."""
    if amp is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AMP_DTYPES[amp])


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    device: torch.device, amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format, grad_clip: float | None = None,
                    progress: bool = True, description: str = "train") -> dict[str, float]:
    """One pass over ``loader`` of (images, Encoded captions, image id of each caption); the model must already be
    in its stage. With n captions per image (consecutive), each image embedding is the positive of its n captions.
    ``grad_clip`` caps the global gradient norm of each step.

    Returns the mean loss, wall and data-wait seconds, pairs per second and the out-of-vocabulary rate.
    """
    total_loss, steps, pairs, oov, tokens, waited = 0.0, 0, 0, 0, 0, 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for images, captions, ids in bar:
        waited += time.perf_counter() - tick
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        words, lengths = captions.words.to(device, non_blocking=True), captions.lengths
        with autocast(device, amp):
            image_emb, text_emb = model(images, words, lengths)
        image_emb = image_emb.repeat_interleave(len(text_emb) // len(image_emb), dim=0)
        loss = loss_fn(image_emb.float(), text_emb.float(), ids=ids.to(device))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total_loss += loss.item()
        steps, pairs = steps + 1, pairs + len(ids)
        oov, tokens = oov + captions.oov, tokens + captions.tokens
        bar.set_postfix(loss=f"{total_loss / steps:.3f}")
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(steps, 1), "seconds": seconds, "data_seconds": waited,
            "pairs_per_s": pairs / max(seconds, 1e-9), "oov_rate": oov / max(tokens, 1)}


@torch.no_grad()
def encode_images(model: JointEmbedding, loader: DataLoader, device: torch.device, amp: str | None = None,
                  progress: bool = True) -> torch.Tensor:
    """(N, d) float32 unit image embeddings on the CPU, in loader order."""
    model.eval()
    chunks = []
    for images in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, amp):
            chunks.append(model.image(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(chunks)


def caption_batches(captions: list[str], words: WordVectors, batch_size: int) -> Iterator:
    for start in range(0, len(captions), batch_size):
        yield words.encode(captions[start:start + batch_size])


@torch.no_grad()
def encode_captions(model: JointEmbedding, captions: list[str], words: WordVectors, device: torch.device,
                    batch_size: int = 256, amp: str | None = None, progress: bool = True) -> torch.Tensor:
    """(M, d) float32 unit caption embeddings on the CPU, in input order."""
    model.eval()
    chunks = []
    total = (len(captions) + batch_size - 1) // batch_size
    for encoded in tqdm(caption_batches(captions, words, batch_size), total=total, desc="captions",
                        disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, amp):
            chunks.append(model.text(encoded.words.to(device), encoded.lengths).float().cpu())
    return torch.cat(chunks)


def encode_records(model: JointEmbedding, records: list[Record], words: WordVectors, device: torch.device,
                   image_size: int, batch_size: int = 64, workers: int = 2, amp: str | None = None,
                   progress: bool = True, protocol: str = "resize") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a split's images and their first five captions: (images (N, d), captions (M, d), owner (M,)).
    ``protocol`` is the image preprocessing of :func:`misc.datasets.eval_transform`."""
    loader = DataLoader(ImageDataset([r.image for r in records], eval_transform(image_size, protocol)),
                        batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    images = encode_images(model, loader, device, amp, progress)
    texts, owner = eval_captions(records)
    captions = encode_captions(model, texts, words, device, batch_size=4 * batch_size, amp=amp, progress=progress)
    return images, captions, owner


def evaluate_records(model: JointEmbedding, records: list[Record], words: WordVectors, device: torch.device,
                     image_size: int, protocols: tuple[str, ...] = ("1k", "full"), **encode_options) -> dict:
    """Cross-modal retrieval metrics of a split (see :func:`misc.retrieval.evaluate`)."""
    images, captions, owner = encode_records(model, records, words, device, image_size, **encode_options)
    return retrieval.evaluate(images, captions, owner, protocols=protocols)
