"""The one error a user can fix, and the value checks every configuration makes with it (models/config.py,
misc/config.py, checkpoints): plain Python, so that both packages use them and models/ imports nothing from misc/
(misc/errors.py hands them on to the rest of the project)."""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import fields
from typing import Any


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad value, a wrong choice); its message is one line saying
    what is wrong and what to do, and CLIs print it as ``error: ...`` with exit status 2."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices``; the error names ``what`` and suggests the closest choice."""
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{what} = {value!r}: unknown{did_you_mean(value, choices)}; choose one of "
                        f"{', '.join(choices)}")


def check_number(what: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, whole: bool = False) -> None:
    """``value`` must be a number (a whole one with ``whole``) in the range from ``low`` to ``high``, each end
    included unless ``*_open``; the error names ``what`` and the range."""
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or math.isnan(value):
        raise UserError(f"{what} = {value!r}: expected {'a whole number' if whole else 'a number'}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise UserError(f"{what} = {value!r}: must lie in {left}{low:g}, {high:g}{right}")


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from plain data (a checkpoint's), rejecting unknown keys with a clear message."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{cls.__name__}: unknown keys {unknown}{did_you_mean(unknown[0], known)}")
    return cls(**values)
