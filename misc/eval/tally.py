"""The pointing game's scores (paper §4.3), counted as its per-phrase rows stream past: accuracy and centre baseline,
the per-entity-type table and Das et al.'s per-caption mean. No row is kept, so a game over millions of phrases
holds counts, not rows (pointing_game.py writes the rows to its --json file as they come).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from misc.data.flickr_entities import ENTITY_TYPES
from misc.eval.localization import DAS2019, caption_accuracy


class Tally:
    """Running counts of scored phrases: hits and centre hits overall and per Flickr30K Entities type (a phrase
    counts under each of its types), and under ``das2019`` every caption's box trials (the bools Das et al.'s
    per-caption fractions need), captions named by image and sentence."""

    def __init__(self, protocol: str = "original") -> None:
        self.protocol = protocol
        self.phrases = self.hits = self.center_hits = 0
        self.types: dict[str, list[int]] = {}  # type -> [phrases, hits, centre hits]
        self.box_hits: dict[tuple, list[bool]] = {}
        self.center_box_hits: dict[tuple, list[bool]] = {}

    def add(self, row: dict[str, Any]) -> None:
        """Count one per-phrase row of :func:`misc.eval.pointing.point`."""
        self.phrases += 1
        self.hits += bool(row["hit"])
        self.center_hits += bool(row["center_hit"])
        for kind in row.get("types", ()):
            counts = self.types.setdefault(kind, [0, 0, 0])
            counts[0] += 1
            counts[1] += bool(row["hit"])
            counts[2] += bool(row["center_hit"])
        if self.protocol == DAS2019:
            caption = (row["image_id"], row["sentence"])
            self.box_hits.setdefault(caption, []).extend(row["box_hits"])
            self.center_box_hits.setdefault(caption, []).extend(row["center_box_hits"])

    def per_type(self) -> dict[str, dict[str, float]]:
        """Accuracy and centre baseline (percent) per Flickr30K Entities type, in :data:`ENTITY_TYPES` order."""
        return {kind: {"phrases": self.types[kind][0], "accuracy": 100.0 * self.types[kind][1] / self.types[kind][0],
                       "center_baseline": 100.0 * self.types[kind][2] / self.types[kind][0]}
                for kind in ENTITY_TYPES if kind in self.types}

    def metrics(self, images: int, skipped: int) -> dict[str, Any]:
        """The metrics of the results record: accuracy and centre baseline in percent over the scored phrases, the
        counts, and :meth:`per_type` (any-box, per phrase). Under ``das2019`` accuracy and centre baseline are Das
        et al.'s mean over captions of the fraction of boxes hit; the any-box rule at the same point stays beside
        them (``any_box_accuracy``, ``any_box_center_baseline``)."""
        n = self.phrases
        metrics: dict[str, Any] = {"accuracy": 100.0 * self.hits / n, "center_baseline": 100.0 * self.center_hits / n}
        if self.protocol == DAS2019:
            metrics = {"accuracy": caption_accuracy(self.box_hits),
                       "center_baseline": caption_accuracy(self.center_box_hits),
                       "any_box_accuracy": metrics["accuracy"], "any_box_center_baseline": metrics["center_baseline"],
                       "captions": len(self.box_hits), "boxes": sum(len(h) for h in self.box_hits.values())}
        return {**metrics, "phrases": n, "images": images, "skipped": skipped, "per_type": self.per_type()}


def accuracies(per_phrase: Iterable[dict], images: int, skipped: int, protocol: str = "original") -> dict[str, Any]:
    """:meth:`Tally.metrics` of the rows ``per_phrase``."""
    tally = Tally(protocol)
    for row in per_phrase:
        tally.add(row)
    return tally.metrics(images, skipped)
