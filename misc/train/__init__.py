"""A training run: ``run`` (a run from its configuration to its checkpoints), ``loop`` (one epoch), ``schedule``
(lr, trained parts and loss of every epoch), ``losses`` (eq. 5, eq. 7, N-pair, sampled triplet), ``distributed``
(torchrun, the global batch, stop signals), ``tblog`` (TensorBoard)."""
