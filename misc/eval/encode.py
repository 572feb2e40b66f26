"""Encoding a split's images and captions for retrieval, for both systems (models/system.py): DSVE's unit
embeddings and the matchmap's region and word vectors; the score matrix where no single vector gives the score.

An image that fails to decode here (misc/data/decoded.py) is left out of the ranking with its captions: the metrics
are those of the split without it, the 1k folds cut from the images that remain."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

from misc.eval import retrieval
from misc.data.datasets import Record, eval_captions, eval_transform
from misc.data.decoded import EvalImages, ImageBatch, Undecodable
from misc.devices import autocast
from misc.errors import UserError
from misc.data.words import MAX_TOKENS, Encoded, WordVectors
from models.joint import Model


def check_embeddable(model: Model) -> None:
    if not model.embeddable:
        raise UserError(f"model.score = {model.config.score!r}: the matchmap pools its matchmaps with a max, so an "
                        f"image or a caption has no vector of its own; retrieval needs the score matrix "
                        f"(misc.eval.encode.evaluate_records), and only model.score=avg_both has features")


@torch.no_grad()
def encode_images(model: Model, batches: Iterable[ImageBatch], device: torch.device,
                  amp: str | None = None) -> torch.Tensor:
    """(N, d) float32 image vectors (``model.image_vectors``) on the CPU of the batches' images, in their order."""
    check_embeddable(model)
    model.eval()
    chunks = []
    for batch in batches:
        with autocast(device, amp):
            chunks.append(model.image_vectors(batch.images.to(device, non_blocking=True)).float().cpu())
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
        steps = [words.steps(caption, tokens) for caption, tokens in zip(captions[start:start + window], tokenized)]
        order = sorted(range(len(tokenized)), key=lambda row: len(steps[row]))
        begin = 0
        while begin < len(order):
            end = begin + 1  # order is by length: the caption at end - 1 is the batch's longest
            while (end < len(order) and end - begin < batch_size
                   and (end - begin + 1) * len(steps[order[end]]) <= max_tokens):
                end += 1
            rows = order[begin:end]
            yield [start + row for row in rows], words.encode_tokens([tokenized[row] for row in rows],
                                                                     [steps[row] for row in rows])
            begin = end


@torch.no_grad()
def encode_captions(model: Model, captions: list[str], words: WordVectors, device: torch.device,
                    batch_size: int = 256, amp: str | None = None, progress: bool = True,
                    max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(M, d) float32 caption vectors (``model.text_vectors``; DSVE: eq. 4) on the CPU, in input order, encoded by
    length-sorted batches of at most ``batch_size`` captions and ``max_tokens`` padded tokens (see
    :func:`caption_batches`). A caption's vector does not depend on its batch: the SRU and the LSTM read its real
    tokens first (the padding comes after them)."""
    check_embeddable(model)
    model.eval()
    embeddings = torch.empty(len(captions), model.vector_dim)
    with tqdm(total=len(captions), desc="captions", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for positions, encoded in caption_batches(captions, words, batch_size, max_tokens):
            with autocast(device, amp):
                embeddings[positions] = model.text_vectors(encoded.words.to(device),
                                                     encoded.lengths.to(device)).float().cpu()
            bar.update(len(positions))
    return embeddings


def split_images(records: list[Record], image_size: int, protocol: str, batch_size: int, workers: int,
                 device: torch.device, progress: bool, undecodable: Undecodable | None) -> EvalImages:
    return EvalImages([r.image for r in records], eval_transform(image_size, protocol), batch_size, workers,
                      device.type == "cuda", progress, undecodable)


LEFT_OUT = "each left out of the ranking with its captions (the 1k folds are cut from the images that remain)"


def encode_records(model: Model, records: list[Record], words: WordVectors, device: torch.device,
                   image_size: int, batch_size: int = 64, workers: int = 2, amp: str | None = None,
                   progress: bool = True, protocol: str = "resize",
                   undecodable: Undecodable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectors of a split's images and their first five captions whose dot products are the model's scores
    (``model.embeddable``): (images (N, d), captions (M, d), owner (M,)), what
    :func:`misc.eval.retrieval.evaluate` takes. ``protocol`` is the image preprocessing of
    :func:`misc.data.datasets.eval_transform`. An image that does not decode is left out with its captions (as if
    the split did not hold it) and added to ``undecodable``."""
    check_embeddable(model)
    loader = split_images(records, image_size, protocol, batch_size, workers, device, progress, undecodable)
    images = encode_images(model, loader, device, amp)
    loader.finish(LEFT_OUT)
    texts, owner = eval_captions(loader.kept(records))
    captions = encode_captions(model, texts, words, device, batch_size=4 * batch_size, amp=amp, progress=progress)
    return images, captions, owner


@torch.no_grad()
def score_records(model: Model, records: list[Record], words: WordVectors, device: torch.device, image_size: int,
                  batch_size: int = 64, workers: int = 2, amp: str | None = None, progress: bool = True,
                  protocol: str = "resize",
                  undecodable: Undecodable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's score of each of a split's images with each of their first five captions, (N, M) float32 on
    the CPU, and the owner image of each caption (M,): for scores no single vector gives (the matchmap's
    ``max_img`` / ``max_text``). Every caption's word vectors are kept (on the CPU, by length-sorted batch); each
    batch of images is then scored against all of them, so memory holds one image batch's regions. An image that
    does not decode is left out with its captions, as in :func:`encode_records`."""
    model.eval()
    texts, owner = eval_captions(records)
    encoded = []
    for positions, batch in caption_batches(texts, words, 4 * batch_size):
        lengths = batch.lengths.to(device)
        with autocast(device, amp):
            encoded.append((positions, model.text(batch.words.to(device), lengths).float().cpu(), lengths))
    scores = torch.empty(len(records), len(texts))
    row = 0
    loader = split_images(records, image_size, protocol, batch_size, workers, device, progress, undecodable)
    for batch in loader:
        with autocast(device, amp):
            regions = model.image(batch.images.to(device, non_blocking=True)).float()
        for positions, text_out, lengths in encoded:
            scores[row:row + len(regions), positions] = model.score(regions, text_out.to(device), lengths).cpu()
        row += len(regions)
    loader.finish(LEFT_OUT)
    kept = torch.tensor(loader.kept(range(len(records))), dtype=torch.long)
    columns = torch.isin(owner, kept)  # the captions of the images that remain, in eval_captions' order
    return scores[:row, columns], torch.searchsorted(kept, owner[columns])


def evaluate_records(model: Model, records: list[Record], words: WordVectors, device: torch.device,
                     image_size: int, protocols: tuple[str, ...] = ("1k", "full"), **encode_options) -> dict:
    """Cross-modal retrieval metrics of a split (see :func:`misc.eval.retrieval.evaluate`) by the model's own score.

    Embeddable models are ranked from their vectors (:func:`encode_records`). Otherwise the whole score matrix S
    (N, M) is computed (:func:`score_records`) and ranked as the products of one-hot image vectors with the
    captions' score columns: e_i . S[:, j] = S[i, j] exactly, folds included."""
    if model.embeddable:
        images, captions, owner = encode_records(model, records, words, device, image_size, **encode_options)
        return retrieval.evaluate(images, captions, owner, protocols=protocols)
    scores, owner = score_records(model, records, words, device, image_size, **encode_options)
    return retrieval.evaluate(torch.eye(len(scores)), scores.t().contiguous(), owner, protocols=protocols)
