"""What is kept: ``checkpoint`` (the one checkpoint format), ``original`` (the original release's files),
``export`` (export folders), ``source`` (what ``-p`` takes, a checkpoint file or an export folder, and its
provenance digest), ``word_refs`` (how a checkpoint names its word vectors and finds them again), ``arrays``
(``.npz`` files), ``files`` (atomic writes, digests), ``results`` (the results record of docs/results.md)."""
