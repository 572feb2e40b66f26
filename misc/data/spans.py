"""Where a phrase's words are among its caption's tokens, for phrase maps read in the caption's context (the
matchmap's ``phrase_filters``, models/matchmap.py).

Flickr30K Entities names a phrase by its first whitespace word and its length in whitespace words
(misc/data/flickr_entities.py); the text path sees the tokeniser's tokens (misc/data/words.py), which split
punctuation off a word ("dog's" -> "dog", "'s"), keep hyphenated words whole ("t-shirt") and write a double quote
as `` or ''. :func:`char_offsets` finds each token's characters in the caption, and a phrase's tokens are those that
start inside its words' characters (:func:`word_span_tokens`). A phrase given as text (localize.py --caption) is
found as a run of the caption's tokens (:func:`find_tokens`).
"""
from __future__ import annotations

QUOTES = ("``", "''")  # the tokeniser's opening and closing forms of a double quote


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
