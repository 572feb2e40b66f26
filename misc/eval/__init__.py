"""Evaluation: ``retrieval`` (ranks and recall), ``encode`` (a split's vectors or score matrix), ``features``
(precomputed feature files to evaluate), ``localization`` (where a heatmap points, the pointing rules, the paper's k
and image size; the heatmaps themselves are models/heatmaps.py), ``segmentation`` (masks, IoU, AP), ``pointing``
(the pointing game's phrases and loop), ``tally`` (its accuracies, counted as its rows stream past) and ``segment``
(the segmentation loop and its per-category AP table)."""
