"""One's own collections: ``extraction`` (images embedded in resumable chunks), ``texts`` (text files embedded line
by line), ``search`` (exact and faiss search over extracted features)."""
