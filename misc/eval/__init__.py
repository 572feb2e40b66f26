"""Evaluation: ``retrieval`` (ranks and recall), ``encode`` (a split's vectors or score matrix), ``localization``
(eq. 8-9 heatmaps, peaks, pointing rules), ``segmentation`` (masks, IoU, AP)."""
