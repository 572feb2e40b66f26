"""A training run: ``run`` (a run from its configuration to its checkpoints), ``state`` (where a run stands, what
it resumes from, its random state), ``loop`` (one epoch), ``schedule`` (lr, trained parts and loss of every epoch),
``losses`` (eq. 5, eq. 7, N-pair, sampled triplet, and the registry of losses), ``distributed`` (torchrun, the
global batch, stop signals), ``tblog`` (TensorBoard)."""
