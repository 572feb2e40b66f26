"""search.py --serve: one collection searched over HTTP (FastAPI, served by uvicorn).

``POST /search`` takes a JSON object with exactly one query, ``text`` (needs the model), ``image`` (a path inside
the collection's extracted folder: a stored image uses its stored features and is not its own neighbour),
``image_base64`` (an uploaded image file, needs the model) or ``embedding`` (d numbers), and optionally ``k``
(default 10), ``dedup`` (drop a result whose cosine with a higher-ranked one is at least this) and ``localize``
(text queries: where the text is in each found image, eq. 9). The same fields may come as a form (multipart or
URL-encoded), where ``image`` is either such a path or an uploaded file (``curl -F image=@cat.jpg``; ``embedding``
then a JSON list, ``localize`` true or false). It answers the results, each with its ``id`` (row),
``score`` (cosine) and what it is (``path``, or ``line`` and ``line_number``). A bad request (an upload that is
not an image, or declares too many pixels) is answered with one JSON line ``{"error": ...}`` (status 400; 413 for
a body over the limit), never a traceback; the server goes on. ``GET /`` describes the collection.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from misc.collections import queries
from misc.collections.search import Searcher, dedup, result_entry, stored_row
from misc.errors import UserError

if TYPE_CHECKING:
    import uvicorn

    from misc.inference import Inference

log = logging.getLogger(__name__)

MAX_BODY = 16 * 2**20  # bytes of one request (a base64 photo of 12 MB)
MAX_K = 1000
QUERY_KEYS = ("text", "image", "image_base64", "embedding")
KEYS = set(QUERY_KEYS) | {"k", "dedup", "localize"}
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")  # bodies read as forms, not JSON


class TooLarge(Exception):
    """A request body over :data:`MAX_BODY`."""


def make_app(searcher: Searcher, model: Inference | None, max_body: int = MAX_BODY) -> FastAPI:
    """The web application searching ``searcher``'s collection; ``model`` embeds texts and uploaded images (None:
    only ``image`` paths of stored images and ``embedding`` queries)."""
    app = FastAPI(title="DSVE-Loc search", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # faiss parameters and the model are shared: one search at a time
    collection = searcher.collection

    @app.get("/")
    def describe() -> dict[str, Any]:
        return {"collection": str(collection.path), "kind": collection.kind, "size": len(collection.features),
                "dim": int(collection.features.shape[1]), "model": model is not None}

    @app.post("/search")
    async def search(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, max_body)
            form = request.headers.get("content-type", "").startswith(FORMS)
            payload = await parse_form(request.headers, body) if form else parse(body)
            answer = await run_in_threadpool(locked, handle, searcher, model, payload)
            return JSONResponse(answer)
        except TooLarge:
            return error(413, f"the request is larger than {max_body} bytes")
        except UserError as problem:
            return error(400, str(problem))
        except Exception:  # a bug, not the client's mistake: logged here, one line there
            log.exception("search failed")
            return error(500, "internal error; see the server's log")

    def locked(*args: Any) -> Any:
        with lock:
            return args[0](*args[1:])

    return app


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (whatever Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge
    return bytes(body)


def parse(body: bytes) -> dict[str, Any]:
    """The request's JSON object, its keys and types checked."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as problem:
        raise UserError(f"the body is not JSON ({problem})") from problem
    return checked(payload)


async def parse_form(headers: Headers, body: bytes) -> dict[str, Any]:
    """A form (multipart, or URL-encoded without files) as the JSON object :func:`parse` takes: fields are text
    (``k`` a whole number, ``dedup`` a number, ``embedding`` a JSON list, ``localize`` true or false) and an
    uploaded ``image`` file its bytes."""
    async def replay() -> Any:
        yield body

    try:
        if headers.get("content-type", "").startswith("multipart/form-data"):
            form = await MultiPartParser(headers, replay(), max_files=1, max_fields=len(KEYS)).parse()
        else:
            form = await FormParser(headers, replay()).parse()
    except MultiPartException as problem:
        raise UserError(f"the multipart form cannot be read ({problem.message})") from problem
    payload: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if key in payload:
                raise UserError(f"the form gives {key} twice")
            if isinstance(value, UploadFile):
                if key != "image":
                    raise UserError(f"{key} must be text; only image may be an uploaded file")
                payload[key] = await value.read()
            else:
                payload[key] = form_value(key, value)
    finally:
        await form.close()
    return checked(payload)


def form_value(key: str, value: str) -> Any:
    """A form field's text as the JSON value it stands for."""
    try:
        if key == "k":
            return int(value)
        if key == "dedup":
            return float(value)
        if key == "embedding":
            return json.loads(value)
    except ValueError as problem:
        raise UserError(f"{key} {value[:40]!r} is not a {'JSON list' if key == 'embedding' else 'number'}") \
            from problem
    if key == "localize":
        if value.lower() not in ("true", "false"):
            raise UserError("localize must be true or false")
        return value.lower() == "true"
    return value


def checked(payload: Any) -> dict[str, Any]:
    """The request's keys and types checked (``image`` may be an uploaded file's bytes)."""
    if not isinstance(payload, dict):
        raise UserError("the body must be a JSON object")
    unknown = sorted(set(payload) - KEYS)
    if unknown:
        raise UserError(f"unknown keys {unknown}; expected some of {sorted(KEYS)}")
    given = [key for key in QUERY_KEYS if payload.get(key) is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one query of {list(QUERY_KEYS)}, got {given or 'none'}")
    k = payload.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise UserError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    threshold = payload.get("dedup")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not -1 <= threshold <= 1):
        raise UserError(f"dedup must be a cosine between -1 and 1, got {threshold!r}")
    if not isinstance(payload.get("localize", False), bool):
        raise UserError("localize must be true or false")
    key = given[0]
    if key != "embedding" and not isinstance(payload[key], str) and not (key == "image"
                                                                        and isinstance(payload[key], bytes)):
        raise UserError(f"{key} must be a string")
    return payload


def query_vector(searcher: Searcher, model: Inference | None, payload: dict[str, Any]) -> tuple[np.ndarray, int | None]:
    """The query's embedding (1, d), and the row it is in the collection when it is a stored image."""
    collection, dim = searcher.collection, searcher.collection.features.shape[1]
    if payload.get("embedding") is not None:
        try:
            vector = np.asarray(payload["embedding"], dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError) as problem:
            raise UserError("embedding must be a list of numbers") from problem
        norm = float(np.linalg.norm(vector))
        if vector.shape[1] != dim or not np.isfinite(norm) or norm == 0:
            raise UserError(f"embedding must be {dim} finite numbers, not all zero")
        return vector / norm, None
    if isinstance(payload.get("image"), str) and collection.kind == "image":
        path = queries.inside_folder(collection, payload["image"])
        row = stored_row(collection, path.relative_to(collection.config["folder"]).as_posix())
        if row is not None:
            return np.asarray(collection.features[row:row + 1], dtype=np.float32), row
    if model is None:
        raise UserError("this server has no model to embed the query: start it with -p CHECKPOINT")
    if payload.get("text") is not None:
        return queries.text_embeddings(model, [payload["text"]]), None
    if isinstance(payload.get("image"), bytes):
        picture = queries.decode_upload(payload["image"])
    elif payload.get("image") is not None:
        picture = queries.inside_folder(collection, payload["image"])
    else:
        try:
            data = base64.b64decode(payload["image_base64"], validate=True)
        except (binascii.Error, ValueError) as problem:
            raise UserError("image_base64 is not base64") from problem
        picture = queries.decode_upload(data)
    from misc.data.images import read_image

    size = collection.config.get("size") or model.test_size
    image = read_image(picture, size) if not hasattr(picture, "mode") else picture
    return queries.image_embedding(model, image, size), None


def handle(searcher: Searcher, model: Inference | None, payload: dict[str, Any]) -> dict[str, Any]:
    """Search one query; dedup and localization apply to the top results only."""
    collection, k = searcher.collection, payload.get("k", 10)
    vector, own = query_vector(searcher, model, payload)
    threshold = payload.get("dedup")
    wanted = min(len(collection.features), (4 * k + 10 if threshold is not None else k) + (own is not None))
    scores, rows, info = searcher.search(vector, wanted)
    score_of = {int(r): float(s) for r, s in zip(rows[0], scores[0]) if r >= 0 and r != own}
    ranked = np.array(list(score_of), dtype=np.int64)
    ranked = dedup(ranked, collection.features, threshold, k) if threshold is not None else ranked[:k]
    results = []
    for rank, row in enumerate(ranked.tolist(), 1):
        entry = result_entry(collection, rank, score_of[row], row)
        results.append({"id": row, **entry})
    if payload.get("localize"):
        if payload.get("text") is None or collection.kind != "image" or model is None:
            raise UserError("localize needs a text query, an image collection and the model")
        for entry, place in zip(results, queries.localize(model, collection, [e["id"] for e in results],
                                                           payload["text"])):
            entry["localization"] = place
    return {"index": info, "results": results}


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    """A uvicorn server of ``app`` on ``host``:``port`` (run it with ``.run()``)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
