"""Evaluation: ``retrieval`` (ranks and recall), ``encode`` (a split's vectors or score matrix), ``localization``
(eq. 8-9 heatmaps, peaks, pointing rules, the paper's k and image size), ``segmentation`` (masks, IoU, AP),
``pointing`` (the pointing game's phrases, loop and accuracies) and ``segment`` (the segmentation loop and its
per-category AP table)."""
