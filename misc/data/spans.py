"""Where a phrase's words are among its caption's tokens, for phrase maps read in the caption's context (the
matchmap's ``phrase_filters``, models/matchmap.py).

Flickr30K Entities names a phrase by its first whitespace word and its length in whitespace words
(misc/data/flickr_entities.py); the text path sees the tokeniser's tokens (misc/data/words.py), which split
punctuation off a word ("dog's" -> "dog", "'s"), keep hyphenated words whole ("t-shirt") and write a double quote
as `` or ''. :func:`char_offsets` finds each token's characters in the caption, and a phrase's tokens are those that
start inside its words' characters (:func:`word_span_tokens`). A phrase given as text (localize.py --caption) is
found as a run of the caption's tokens (:func:`find_tokens`).

A caption whose phrases are annotated is a :class:`Caption`: the text, used as a string everywhere, with the
characters of each phrase. Under ``model.text_units: phrases`` :func:`phrase_steps` makes each phrase one step of
the text path (misc/data/words.py); a caption without phrases keeps one step per token.
"""
from __future__ import annotations

from typing import Any

QUOTES = ("``", "''")  # the tokeniser's opening and closing forms of a double quote


class Caption(str):
    """A caption's text with the (start, end) characters of its annotated phrases (Flickr30K Entities brackets,
    JSON-lines region phrases), in order and disjoint. It is the plain string to every other reader."""

    phrases: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, phrases: Any = ()) -> Caption:
        caption = super().__new__(cls, text)
        caption.phrases = tuple((int(start), int(end)) for start, end in phrases)
        return caption

    def __reduce__(self) -> tuple[Any, ...]:
        return Caption, (str(self), self.phrases)  # data loader workers receive the phrases too


def whole_phrase(text: str) -> Caption:
    """``text`` as one annotated phrase: a phrase read alone (the pointing game's ``--context phrase``)."""
    stripped = text.strip()
    start = text.find(stripped) if stripped else 0
    return Caption(text, [(start, start + len(stripped))] if stripped else [])


def phrase_steps(caption: str, tokens: list[str]) -> list[tuple[int, int]]:
    """The steps of the text path over ``tokens`` (the tokens of ``caption``): the tokens [start, end) each step
    averages. The tokens that start inside one of a :class:`Caption`'s phrases are one step; every other token is
    a step of its own, so a caption without phrases gives one step per token."""
    phrases = getattr(caption, "phrases", ())
    if not phrases:
        return [(index, index + 1) for index in range(len(tokens))]
    owner = [next((number for number, (low, high) in enumerate(phrases) if low <= start < high), None)
             for start in char_offsets(caption, tokens)]
    steps: list[tuple[int, int]] = []
    for index, phrase in enumerate(owner):
        if phrase is not None and steps and index > 0 and owner[index - 1] == phrase:
            steps[-1] = (steps[-1][0], index + 1)
        else:
            steps.append((index, index + 1))
    return steps


def step_span(steps: list[tuple[int, int]], first: int, end: int) -> tuple[int, int]:
    """The steps [start, end) that hold the tokens [first, end) of a caption read in ``steps``: a phrase's
    in-context span once its caption's phrases are single steps."""
    inside = [number for number, (low, high) in enumerate(steps) if low < end and first < high]
    if not inside:
        raise ValueError(f"tokens {first}..{end - 1} are not among the caption's {steps[-1][1] if steps else 0}")
    return inside[0], inside[-1] + 1


def char_offsets(caption: str, tokens: list[str]) -> list[int]:
    """The character at which each token starts in ``caption``; a token that is not the next text of the caption
    is a ValueError naming it."""
    starts, position = [], 0
    for token in tokens:
        while position < len(caption) and caption[position].isspace():
            position += 1
        starts.append(position)
        if caption.startswith(token, position):
            position += len(token)
        elif token in QUOTES and caption[position:position + 1] == '"':
            position += 1
        else:
            raise ValueError(f"token {token!r} is not at character {position} of {caption!r}")
    return starts


def word_offsets(caption: str) -> list[tuple[int, int]]:
    """(start, end) characters of each whitespace word of ``caption``."""
    offsets, position = [], 0
    for word in caption.split():
        start = caption.index(word, position)
        position = start + len(word)
        offsets.append((start, position))
    return offsets


def word_span_tokens(caption: str, tokens: list[str], first_word: int, length: int) -> tuple[int, int]:
    """The tokens [start, end) of the ``length`` whitespace words from ``first_word`` of ``caption`` whose
    tokens are ``tokens``; a span outside the caption, or one with no token (the words were not embedded, e.g. a
    later sentence under first-sentence text options), is a ValueError."""
    words = word_offsets(caption)
    if first_word < 0 or length < 1 or first_word + length > len(words):
        raise ValueError(f"words {first_word}..{first_word + length - 1} are not in the {len(words)} words of "
                         f"{caption!r}")
    low, high = words[first_word][0], words[first_word + length - 1][1]
    inside = [index for index, start in enumerate(char_offsets(caption, tokens)) if low <= start < high]
    if not inside:
        raise ValueError(f"no embedded token in words {first_word}..{first_word + length - 1} of {caption!r}")
    return inside[0], inside[-1] + 1


def find_tokens(caption: list[str], phrase: list[str]) -> tuple[int, int] | None:
    """The first run [start, end) of ``caption``'s tokens equal to ``phrase``'s (case-insensitive), or None."""
    wanted = [token.lower() for token in phrase]
    lowered = [token.lower() for token in caption]
    for start in range(len(caption) - len(phrase) + 1):
        if wanted and lowered[start:start + len(phrase)] == wanted:
            return start, start + len(phrase)
    return None
