"""One's own collections: ``extraction`` (images embedded in resumable chunks into one .npz), ``sources`` (image
folders, list files and webdataset tar shards cut into shards), ``shards`` (the sharded output folder: manifest,
vectors, metadata, done records, locks, and reading it back memory-mapped), ``shard_run`` (a rank's shards embedded
and stored, for images and texts; images by DataLoader workers; torchrun), ``texts`` (text files embedded line by
line, or cut into shards), ``search`` (loading feature files, exact search, dedup, result entries), ``index``
(faiss indexes chosen from a memory budget, with their recall report), ``queries`` (query embedding, uploads,
caption queries, localization of results) and ``server`` (search over HTTP, JSON or forms with uploads)."""
