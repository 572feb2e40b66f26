"""One's own collections: ``extraction`` (images embedded in resumable chunks), ``texts`` (text files embedded line
by line), ``search`` (loading feature files, exact search, dedup, result entries), ``index`` (faiss indexes chosen
from a memory budget, with their recall report), ``queries`` (query embedding, uploads, localization of results)
and ``server`` (search over HTTP)."""
