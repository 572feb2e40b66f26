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
from misc.words import MAX_TOKENS, Encoded, WordVectors
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
    """Mixed precision: ``amp`` is None, 'bf16' (CUDA or CPU) or 'fp16' (CUDA only: a clear error on the CPU)."""
    if amp is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and amp != "bf16":
        raise UserError(f"--amp {amp} needs CUDA; on the CPU use --amp bf16 or no --amp")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    device: torch.device, amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format, grad_clip: float | None = None,
                    progress: bool = True, description: str = "train", totals: dict[str, float] | None = None,
                    after_step: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` of (images, Encoded captions, image id of each caption); the model must already be
    in its stage. With n captions per image (consecutive), each image embedding is the positive of its n captions.
    ``grad_clip`` caps the global gradient norm of each step.

    ``totals`` are the running sums (loss, steps, pairs, oov, tokens) of the steps an epoch resumed mid-way has
    already done (a checkpoint's ``partial``); ``after_step(totals)`` is called after every step (mid-epoch
    checkpoints, stop signals). Returns the epoch's mean loss and out-of-vocabulary rate, and this pass's wall and
    data-wait seconds and pairs per second.
    """
    totals = dict(totals or {"loss": 0.0, "steps": 0, "pairs": 0, "oov": 0, "tokens": 0})
    pairs_before, waited = totals["pairs"], 0.0
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
        for key, value in (("loss", loss.item()), ("steps", 1), ("pairs", len(ids)), ("oov", captions.oov),
                           ("tokens", captions.tokens)):
            totals[key] += value
        bar.set_postfix(loss=f"{totals['loss'] / totals['steps']:.3f}")
        if after_step is not None:
            after_step(totals)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": totals["loss"] / max(totals["steps"], 1), "seconds": seconds, "data_seconds": waited,
            "pairs_per_s": (totals["pairs"] - pairs_before) / max(seconds, 1e-9),
            "oov_rate": totals["oov"] / max(totals["tokens"], 1)}


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


def caption_batches(captions: list[str], words: WordVectors, batch_size: int,
                    max_tokens: int = MAX_TOKENS) -> Iterator[tuple[list[int], Encoded]]:
    """Padded batches of ``captions`` for the text path, each with the positions of its captions in ``captions``.

    Captions are tokenised 64 batches' worth at a time and sorted by token count, so that a batch is padded to its
    own longest caption, not to the longest of all. A batch holds at most ``batch_size`` captions and
    ``max_tokens`` padded tokens (captions x longest); a caption longer than that is a batch of its own. Memory is
    bounded by the batch: one long line among short ones costs its own length once, not once per caption.
    """
    window = 64 * batch_size
    for start in range(0, len(captions), window):
        tokenized = words.tokenized(captions[start:start + window], first=start)
        order = sorted(range(len(tokenized)), key=lambda row: len(tokenized[row]))
        begin = 0
        while begin < len(order):
            end = begin + 1  # order is by length: the caption at end - 1 is the batch's longest
            while (end < len(order) and end - begin < batch_size
                   and (end - begin + 1) * len(tokenized[order[end]]) <= max_tokens):
                end += 1
            rows = order[begin:end]
            yield [start + row for row in rows], words.encode_tokens([tokenized[row] for row in rows])
            begin = end


@torch.no_grad()
def encode_captions(model: JointEmbedding, captions: list[str], words: WordVectors, device: torch.device,
                    batch_size: int = 256, amp: str | None = None, progress: bool = True,
                    max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(M, d) float32 unit caption embeddings (eq. 4) on the CPU, in input order, encoded by length-sorted batches
    of at most ``batch_size`` captions and ``max_tokens`` padded tokens (see :func:`caption_batches`). A caption's
    embedding does not depend on its batch: the SRU reads its real tokens only (the padding comes after them)."""
    model.eval()
    embeddings = torch.empty(len(captions), model.config.embed_dim)
    with tqdm(total=len(captions), desc="captions", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for positions, encoded in caption_batches(captions, words, batch_size, max_tokens):
            with autocast(device, amp):
                embeddings[positions] = model.text(encoded.words.to(device), encoded.lengths).float().cpu()
            bar.update(len(positions))
    return embeddings


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
