"""Text files embedded line by line (``text_features_extraction.py``): reading the usable lines, counting
unknown words, and the text path (eq. 4) over them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from misc.errors import UserError
from misc.eval.encode import encode_captions
from misc.data.words import MAX_TOKENS, WordVectors
from models.joint import JointEmbedding


@dataclass
class TextLines:
    """The usable lines of a text file and the ones skipped."""

    lines: list[str]
    numbers: list[int]  # 1-based line number of each kept line
    skipped: list[tuple[int, str]]  # (line number, reason)


def read_text_lines(path: Path) -> TextLines:
    """Lines of a file, one caption each, kept verbatim (NUL and any other character included) but for their line
    end (``\n`` or ``\r\n``). Lines that are not valid UTF-8 or blank are skipped with a reason; a UTF-8
    byte-order mark on the first line is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} not found")
    result = TextLines([], [], [])
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n"):  # one line end only: b"a\r\r\n" is the line "a\r"
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                result.skipped.append((number, f"invalid UTF-8 at byte {error.start}"))
                continue
            if not line.strip():
                result.skipped.append((number, "empty line"))
            else:
                result.lines.append(line)
                result.numbers.append(number)
    return result


def embed_lines(model: JointEmbedding, words: WordVectors, text: TextLines, device: torch.device,
                batch_size: int = 256, amp: str | None = None, progress: bool = True,
                max_tokens: int = MAX_TOKENS) -> tuple[TextLines, np.ndarray, np.ndarray, np.ndarray]:
    """Embed the lines of ``text`` (eq. 4): returns the lines kept, their unit embeddings (M, d) float32, their
    out-of-vocabulary token counts (M,) and token counts (M,). Batches hold at most ``batch_size`` lines and
    ``max_tokens`` padded tokens (:func:`misc.eval.encode.caption_batches`), so a very long line costs its own length.

    Lines that give no token as ``words`` tokenises them are skipped. So is a line whose words are all unknown to
    a vocabulary without an UNK vector: it embeds to zero (the SRU of a zero sequence stays zero), not to a unit
    vector.
    """
    oov, tokens = count_oov(words, text.lines)
    skipped = text.skipped + [(text.numbers[row], "no words") for row in np.flatnonzero(tokens == 0)]
    text = _keep(text, tokens > 0)
    oov, tokens = oov[tokens > 0], tokens[tokens > 0]
    features = encode_captions(model, text.lines, words, device, batch_size, amp, progress, max_tokens).numpy()
    keep = np.linalg.norm(features, axis=1) > 0.5
    skipped += [(text.numbers[row], "no word in the vocabulary (zero embedding)") for row in np.flatnonzero(~keep)]
    text = _keep(text, keep)
    return TextLines(text.lines, text.numbers, sorted(skipped)), features[keep], oov[keep], tokens[keep]


def _keep(text: TextLines, mask: np.ndarray) -> TextLines:
    return TextLines([line for line, k in zip(text.lines, mask) if k],
                     [number for number, k in zip(text.numbers, mask) if k], text.skipped)


def count_oov(words: WordVectors, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-vocabulary tokens (M,) and tokens (M,) of every line, tokenised as ``words`` embeds them."""
    oov, tokens = np.zeros(len(lines), dtype=np.int64), np.zeros(len(lines), dtype=np.int64)
    for row, line in enumerate(lines):
        found = words.tokens(line)
        oov[row] = sum(words.index(token) is None for token in found)
        tokens[row] = len(found)
    return oov, tokens
