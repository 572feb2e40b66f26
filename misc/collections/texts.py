"""Text files embedded line by line (``text_features_extraction.py``): reading the usable lines (plain, IMAGE<TAB>
CAPTION or JSON-lines), counting unknown words, the text path (eq. 4) over them, and the lines cut into shards
for the sharded layout (:mod:`misc.collections.shards`), run by :func:`misc.collections.shard_run.run_shards`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from misc.collections.shard_run import ShardRun, run_shards
from misc.collections.shards import ShardFolder, ShardRows
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


def split_tsv(text: TextLines) -> tuple[TextLines, dict[int, str]]:
    """``--tsv``: the captions of IMAGE<TAB>CAPTION lines and the image of each, by line number; lines without a
    tab, or with an empty image or caption, are skipped with the reason."""
    captions, numbers, images, skipped = [], [], {}, list(text.skipped)
    for line, number in zip(text.lines, text.numbers):
        image, tab, caption = line.partition("\t")
        if not tab or not image or not caption.strip():
            skipped.append((number, "not IMAGE<TAB>CAPTION" if not tab else "no image" if not image else "no caption"))
            continue
        captions.append(caption)
        numbers.append(number)
        images[number] = image
    return dataclasses.replace(text, lines=captions, numbers=numbers, skipped=sorted(skipped)), images


def split_jsonl(text: TextLines) -> tuple[TextLines, dict[int, str]]:
    """A ``.jsonl`` file: every line an object with a ``caption`` (text) and optionally the ``path`` of the image it
    describes, as image_features_extraction.py --list takes them; the captions, and the image of each that has
    one, by line number. Other lines are skipped with the reason."""
    captions, numbers, images, skipped = [], [], {}, list(text.skipped)
    for line, number in zip(text.lines, text.numbers):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str) \
                or not isinstance(record.get("path", ""), str):
            skipped.append((number, "not a JSON object with a 'caption' (text) and an optional 'path' (text)"))
        elif not record["caption"].strip():
            skipped.append((number, "no caption"))
        elif not _encodable(record["caption"] + record.get("path", "")):
            skipped.append((number, "a \\u escape of a lone surrogate: not text that UTF-8 can store"))
        else:
            captions.append(record["caption"])
            numbers.append(number)
            if record.get("path"):
                images[number] = record["path"]
    return dataclasses.replace(text, lines=captions, numbers=numbers, skipped=sorted(skipped)), images


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TextShard:
    """One unit of work of a sharded text extraction: the lines ``first`` to ``last`` of the file (1-based), the
    usable ones among them and the key of each (the image it describes, else its line number)."""

    number: int
    first: int
    last: int
    text: TextLines
    keys: tuple[str, ...]

    def describe(self) -> dict[str, object]:
        """What the manifest records of this shard: a change in its lines refuses a rerun."""
        listed = json.dumps([self.text.lines, self.text.numbers, self.text.skipped, self.keys], ensure_ascii=False)
        return {"lines": [self.first, self.last], "sha256": hashlib.sha256(listed.encode("utf-8")).hexdigest()}


def text_shards(text: TextLines, images: dict[int, str], per_shard: int) -> list[TextShard]:
    """Runs of ``per_shard`` lines of the file, kept or skipped alike, so that shard ``n`` always holds the lines
    ``n * per_shard + 1`` to ``(n + 1) * per_shard`` of the same file."""
    total = max(text.numbers + [number for number, _ in text.skipped], default=0)
    shards = []
    for number, first in enumerate(range(1, total + 1, per_shard)):
        last = min(first + per_shard - 1, total)
        kept = [row for row, line in enumerate(text.numbers) if first <= line <= last]
        part = TextLines([text.lines[row] for row in kept], [text.numbers[row] for row in kept],
                         [skip for skip in text.skipped if first <= skip[0] <= last])
        keys = tuple(images.get(line, str(line)) for line in part.numbers)
        shards.append(TextShard(number, first, last, part, keys))
    return shards


@dataclass
class WordCounts:
    """Unknown words of the lines embedded: out-of-vocabulary tokens, tokens, lines with any."""

    oov: int = 0
    tokens: int = 0
    lines_with_oov: int = 0


def extract_text_shards(model: JointEmbedding, words: WordVectors, shards: list[TextShard], source: str,
                        store: ShardFolder, *, dtype: str, device: torch.device, batch_size: int = 256,
                        amp: str | None = None, max_tokens: int = MAX_TOKENS, rank: int = 0, world: int = 1,
                        progress: bool = True) -> tuple[ShardRun, WordCounts]:
    """Embed this rank's text shards that are not done yet into ``store`` (opened by the caller); ``source`` names
    the file in each row's ``source`` (``FILE:LINE``). A shard's lines are batched within the shard only, so its
    vectors do not depend on the ranks."""
    counts = WordCounts()

    def embed(todo: list[TextShard]) -> Iterator[tuple[int, ShardRows]]:
        for shard in todo:
            kept, features, oov, tokens = embed_lines(model, words, shard.text, device, batch_size, amp, progress,
                                                      max_tokens)
            counts.oov, counts.tokens = counts.oov + int(oov.sum()), counts.tokens + int(tokens.sum())
            counts.lines_with_oov += int((oov > 0).sum())
            key_of = dict(zip(shard.text.numbers, shard.keys))
            yield shard.number, ShardRows(
                features, [key_of[line] for line in kept.numbers], [f"{source}:{line}" for line in kept.numbers],
                [hashlib.sha1(line.encode("utf-8")).hexdigest() for line in kept.lines], list(kept.lines),
                [(f"{source}:{line}", reason) for line, reason in kept.skipped], list(kept.numbers))

    return run_shards(shards, store, embed, dtype, rank, world), counts
