"""User mistakes: one exception that every CLI prints as one line, and the checks that raise it. The exception and
the value checks live in models/checks.py (the networks' configuration uses them too); the helpers for writing such
a line are here."""
from __future__ import annotations

from collections.abc import Iterable

from models.checks import UserError, check_choice, check_number, did_you_mean

__all__ = ["UserError", "check_choice", "check_number", "did_you_mean", "few", "first_line"]


def few(keys: Iterable[str], count: int = 3) -> str:
    """A few of ``keys`` for a one-line message."""
    names = sorted(map(str, keys))
    shown = ", ".join(names[:count])
    return f"{shown} (+{len(names) - count} more)" if len(names) > count else shown


def first_line(error: BaseException) -> str:
    """The error's type and first sentence, for a one-line message."""
    text = str(error).strip()
    sentence = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__
