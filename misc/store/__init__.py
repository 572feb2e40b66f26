"""What is kept: ``checkpoint`` (the one checkpoint format), ``original`` (the original release's files),
``export`` (export folders), ``arrays`` (``.npz`` files), ``files`` (atomic writes, digests), ``results`` (the
results record of docs/results.md)."""
