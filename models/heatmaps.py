"""Text-conditioned heatmaps (paper §3.3, eq. 8-9), the one place both are written.

The image path pools the maps G (D', h, w) and projects them with A (d, D') (eq. 1). Applying A at every position
instead gives d maps (eq. 8, a 1x1 convolution without the bias b)

    G' = A · G.

For a text embedding v (d,), K(v) holds the indices of its k largest entries, and the heatmap of the text is (eq. 9)

    H = sum_{u in K(v)} |v_u| G'_u.

:func:`heatmaps` computes exactly that. Every command computes the same sums in another order: since G'_u = A_u · G,

    H = sum_{u in K(v)} |v_u| (A_u · G) = (sum_{u in K(v)} |v_u| A_u) · G = f · G,

one "filter" f (D',) per text (:func:`text_filters`) and one D'-long dot product per position
(:func:`apply_filters`): P (k + hw) D' multiply-adds for P phrases of an image instead of the d hw D' of forming
every G'_u. The matchmap system (models/matchmap.py) has filters too (a phrase's mean word vector), so both systems
share :func:`apply_filters`. The tests compare the two orders (tests/test_localization.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PANEL_BYTES = 512 * 1024  # a column panel of A read by every text in text_filters: fits one core's L2 cache
KEY_ROWS = 128  # texts whose integer keys top_k makes at a time: 1.2 MB at d = 2400, half per thread (L2 1 MB)


def heatmaps(maps: torch.Tensor, weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 8-9 as written: maps G (B, D', h, w), A (d, D'), texts v (T, d) for every image or (B, T, d) one set
    per image -> H (B, T, h, w). All d maps G' = A·G are formed (the original release's order), then the
    |v_u|-weighted sum of the k of them in K(v)."""
    b, channels, h, w = maps.shape
    projected = torch.matmul(weight.float(), maps.float().reshape(b, channels, h * w)).reshape(b, -1, h, w)  # G'
    values, indices = texts.float().topk(k, dim=-1, sorted=False)  # K(v): (T, k) or (B, T, k)
    if texts.dim() == 2:
        picked = projected[:, indices]  # (B, T, k, h, w)
    else:
        picked = projected[torch.arange(b, device=maps.device)[:, None, None], indices]  # (B, T, k, h, w)
    return (values.abs()[..., None, None] * picked).sum(dim=-3)


def text_filters(weight: torch.Tensor, texts: torch.Tensor, k: int) -> torch.Tensor:
    """The fast order of eq. 9: f = sum_{u in K(v)} |v_u| A_u for each text, weight A (d, D'), texts (..., d) ->
    (..., D'); :func:`apply_filters` then gives H = f · G.

    Only the k selected rows of A are read (``F.embedding_bag``); no (..., k, D') tensor is formed. On the CPU the
    columns of A are taken in panels of :data:`PANEL_BYTES`, each read by every text while it sits in the core's
    L2 cache (about 2x faster at d = D' = 2400 than gathering whole rows from memory, bench/bench_heatmaps.py);
    every output element is the same sum in the same order either way.
    """
    weights, indices = top_k(texts.float(), k)
    weights, indices = weights.reshape(-1, k), indices.reshape(-1, k)
    table = weight.float()
    rows, columns = table.shape
    fit = PANEL_BYTES // (rows * table.element_size()) // 16 * 16  # whole 64-byte lines: no row straddles two
    width = columns if table.device.type != "cpu" else max(16, fit)
    panels = [F.embedding_bag(indices, table[:, first:first + width], per_sample_weights=weights, mode="sum")
              for first in range(0, columns, width)]  # (T, width) each
    flat = panels[0] if len(panels) == 1 else torch.cat(panels, dim=1)
    return flat.reshape(*texts.shape[:-1], columns)


def apply_filters(maps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """H = f · G at every position: maps (B, C, h, w) with filters (T, C) shared by all images or (B, T, C) per
    image -> heatmaps (B, T, h, w)."""
    b, channels, h, w = maps.shape
    flat = maps.float().reshape(b, channels, h * w)  # (B, C, hw)
    if filters.dim() == 2:
        out = torch.matmul(filters, flat)  # (T, C) @ (B, C, hw) -> (B, T, hw)
    elif filters.dim() == 3 and filters.shape[0] == b:
        out = torch.bmm(filters, flat)
    else:
        raise ValueError(f"filters {tuple(filters.shape)} must be (T, C) or ({b}, T, C) for maps {tuple(maps.shape)}")
    return out.reshape(b, -1, h, w)


def top_k(texts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K(v) of eq. 9 and the weights |v_u| for :func:`text_filters`: texts (..., d) -> (weights (..., k), indices
    (..., k)); the same set as ``texts.topk(k)`` (up to the order of ties).

    The k largest entries, not the largest |v_u|. On the CPU, float32 entries are selected through integer keys in
    the same order (the IEEE 754 bits with the magnitude bits of negatives flipped): ``topk`` compares int32 about
    1.4x faster than float32 there, keys included. The keys are made :data:`KEY_ROWS` texts at a time in one reused
    buffer, which ``topk`` reads back from the cache, instead of a fresh (..., d) tensor whose pages the kernel may
    have to supply again on each call (at 2000 texts of d = 2400: 20 -> 17 ms).
    """
    if texts.device.type != "cpu" or texts.dtype != torch.float32:
        values, indices = texts.topk(k, dim=-1, sorted=False)
        return values.abs(), indices
    flat = texts.reshape(-1, texts.shape[-1]).contiguous()
    indices = torch.empty(len(flat), k, dtype=torch.long)
    selected = torch.empty(len(flat), k, dtype=torch.int32)  # the keys topk returns; the weights come from texts
    keys = torch.empty(min(KEY_ROWS, len(flat)), flat.shape[1], dtype=torch.int32)
    for first in range(0, len(flat), KEY_ROWS):
        rows = slice(first, first + KEY_ROWS)
        bits = flat[rows].view(torch.int32)
        block = keys[:len(bits)]
        torch.bitwise_right_shift(bits, 31, out=block)
        block.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # order-preserving: -0.0 just below +0.0
        torch.topk(block, k, dim=-1, sorted=False, out=(selected[rows], indices[rows]))
    weights = flat.gather(-1, indices).abs_()
    return weights.reshape(*texts.shape[:-1], k), indices.reshape(*texts.shape[:-1], k)
