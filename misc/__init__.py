"""Everything around the networks of models/, grouped by role:

- ``data/``         what goes in: datasets, one's own JSON-lines data, the demo and photo worlds, images, words
- ``train/``        a training run: the loop, the schedule, the losses, torchrun, TensorBoard
- ``eval/``         retrieval, localization and segmentation maths, the pointing-game and segmentation loops
- ``store/``        what is kept: checkpoints, the original release's files, exports, arrays, atomic files, results
- ``collections/``  one's own image and text collections: extraction, text embedding, search

At the top: ``config`` (every path and default), ``presets`` (the named settings of train.py), ``cli`` (the
arguments every command shares), ``errors``, ``devices`` (device and precision), ``inference`` (a loaded model),
``visualize`` (figures), ``webapp`` (the web page) and ``commands`` (the installed console scripts).
"""
