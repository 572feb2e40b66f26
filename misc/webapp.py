"""The web page of app.py (gradio): where is each phrase in an image, and which images of an extracted collection
match a text or an image.

- Localization: the heatmap of every phrase (eq. 9) over the image, side by side, each with the cosine score of the
  image and phrase embeddings (eq. 3 and 4) and the words the vocabulary lacks.
- Search: a text or an image query against a feature file of image_features_extraction.py (or
  text_features_extraction.py), exact top-k (misc.collections.search), the hits as thumbnails with their scores.

The functions that compute what the page shows take plain values and raise :class:`UserError`, so they are tested
without a browser; :func:`build_ui` only wires them to gradio, which is imported there, after :func:`go_offline`.
An uploaded image reaches them as gradio stored it, unconverted (:func:`upload_path`): the project's decoder reads
it, so a file that is not an image or a decompression bomb is the project's one-line message on the page.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from misc import config
from misc.store.source import model_sha256
from misc.errors import UserError
from misc.data.images import list_images, read_image, shown_size
from misc.inference import Inference
from misc.collections.queries import box_around_peak
from misc.collections.search import Collection, exact_search, load_collection
from misc.visualize import figure_image, overlays

MAX_PHRASES = 12
DISPLAY_SIDE = 1024  # an uploaded photo is decoded (JPEG: at a reduced scale) and shown at most this large
THUMBNAIL = 192  # longer side of a search hit's thumbnail, in pixels
SPOT_COLOUR = (255, 214, 0)  # where a text query is in a hit: its box and peak on the thumbnail
EXAMPLES = 6  # example images offered from the demo world
# gradio and huggingface_hub read these when imported or launched: no analytics, no version check, no hub calls.
OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "GRADIO_SSR_MODE": "False"}
LOCALIZE_COLUMNS = ["phrase", "score", "peak x", "peak y", "unknown words"]
SEARCH_COLUMNS = ["rank", "score", "item"]


def go_offline() -> None:
    """Make gradio work without a network: call before gradio is imported."""
    os.environ.update(OFFLINE)


def parse_phrases(text: str | None) -> list[str]:
    """The phrases of the text box, one a line (blank lines dropped)."""
    found = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not found:
        raise UserError("type at least one phrase, one a line")
    if len(found) > MAX_PHRASES:
        raise UserError(f"{len(found)} phrases: at most {MAX_PHRASES} at once")
    return found


def example_images(folder: Path | None = None, count: int = EXAMPLES) -> list[Path]:
    """Up to ``count`` images of the demo world's test images (``folder``, default its val2014), evenly spread;
    none when the demo world was not generated."""
    folder = Path(folder) if folder is not None else config.DEMO_DIR / "images" / "val2014"
    if not folder.is_dir():
        return []
    found = list_images(folder)
    step = max(1, len(found) // count)
    return [folder / name for name in found[::step][:count]]


def panel_caption(phrase: str, score: float, unknown: list[str]) -> str:
    """A heatmap's caption: the phrase, its score and the words the vocabulary lacks."""
    missing = f" (unknown: {', '.join(unknown)})" if unknown else ""
    return f"{phrase}: {score:.3f}{missing}"


def localize(model: Inference, image_path: str | Path | None, text: str | None, size: int | None = None,
             k: int | None = None) -> tuple[list[tuple[Image.Image, str]], list[list[Any]]]:
    """Heatmaps of every phrase of ``text`` on the image file: one panel per phrase (its eq. 9 map over the image,
    the peak dotted, a colour bar, the score and unknown words in the title) with a caption, and one table row
    per phrase (phrase, eq. 3/4 cosine score, peak in the image's pixels, unknown words). ``k``: eq. 9's k
    (default: the paper's, scaled to the model's d)."""
    if not image_path:
        raise UserError("upload an image or pick an example first")
    picture, scale = display_image(image_path)
    found = model.heatmaps(picture, parse_phrases(text), size=size, k=k)
    panels, rows = [], []
    for index, (phrase, title) in enumerate(zip(found.texts, found.titles())):
        score, peak, unknown = float(found.scores[index]), (found.peaks[index] * scale).tolist(), found.unknown[index]
        figure = overlays(found.image, found.maps[index:index + 1], found.peaks[index:index + 1], [title])
        panels.append((figure_image(figure), panel_caption(phrase, score, unknown)))
        rows.append([phrase, round(score, 4), round(peak[0]), round(peak[1]), ", ".join(unknown)])
    return panels, rows


def display_image(path: str | Path) -> tuple[Image.Image, float]:
    """An uploaded photo at most :data:`DISPLAY_SIDE` large (a 10000 x 10000 JPEG is decoded at 1/8 scale, not in
    full), EXIF-oriented and RGB whatever its mode (CMYK, 16-bit, palette, an animation's first frame), and the
    factor from its pixels to the file's (for peaks in the photo's own pixels); a file that is not an image is
    one line."""
    picture = read_image(path, DISPLAY_SIDE)
    picture.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return picture, shown_size(path)[0] / picture.width


def upload_path(payload: dict[str, Any] | str | None) -> str | None:
    """The file of an image upload as gradio hands it over when it converts nothing (``preprocess=False``): the
    upload's path in gradio's upload folder, None when nothing was uploaded. gradio's own conversion opens the file
    with PIL before our code runs, so that a text file or a decompression bomb ends in gradio's error, which names
    its component and repeats the whole payload; :func:`display_image` says it in one line instead."""
    if not payload:
        return None
    if isinstance(payload, str):
        return payload
    if not payload.get("path"):
        raise UserError("the image did not arrive as a file: upload it again")
    return payload["path"]


@dataclass
class Searchable:
    """The collections the page searches, by name, and the sha256 of the page's checkpoint (to warn when a
    collection was made by another model, whose space the queries do not share)."""

    collections: dict[str, Collection]
    checkpoint_sha256: str


def load_collections(path: Path, checkpoint: Path) -> Searchable:
    """A feature file, or every ``.npz`` feature file of a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"--features {path}: no .npz feature file in this folder; make one with "
                            f"image_features_extraction.py")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"--features {path}: no such file or folder")
    return Searchable({file.name: load_collection(file) for file in files}, model_sha256(checkpoint))


def text_query(model: Inference, query: str | None) -> np.ndarray:
    """The embedding (1, d) of a text query (eq. 4); a query none of whose words is known is refused."""
    query = (query or "").strip()
    if not any(character.isalnum() for character in query):
        raise UserError("type a text query")
    if model.known_words(query) == 0:
        raise UserError(f"none of the words of {query!r} is in the vocabulary: try other words")
    return model.embed_texts([query]).numpy()


def pick(searchable: Searchable, name: str) -> Collection:
    """The collection called ``name``."""
    if name not in searchable.collections:
        raise UserError(f"pick a collection among {', '.join(searchable.collections)}")
    return searchable.collections[name]


def image_query(model: Inference, collection: Collection, image_path: str | Path | None) -> np.ndarray:
    """The embedding (1, d) of an image file (eq. 1-3), at the size the collection was extracted at."""
    if not image_path:
        raise UserError("upload a query image first")
    return model.embed_images([image_path], size=collection.config.get("size") or model.test_size).numpy()


def hit_location(collection: Collection, row: int) -> Path:
    """The image file of a row: stored paths are relative to the extracted folder (recorded in the file)."""
    stored = Path(str(collection.labels[row]))
    return stored if stored.is_absolute() else Path(collection.config.get("folder", ".")) / stored


def thumbnail(path: Path, spot: Spot | None = None) -> Image.Image:
    """A small copy of a hit's image, with ``spot`` (where the text query is in it) drawn; a grey square when the
    file is gone or unreadable (named in the caption)."""
    try:
        image = read_image(path, THUMBNAIL)
    except (UserError, OSError):
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (128, 128, 128))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    if spot is not None:
        scale = image.width / shown_size(path)[0]
        draw = ImageDraw.Draw(image)
        draw.rectangle([round(value * scale) for value in spot.box], outline=SPOT_COLOUR, width=2)
        x, y = (value * scale for value in spot.peak)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SPOT_COLOUR)
    return image


@dataclass
class Spot:
    """Where a text is in an image (eq. 9), in the image's pixels: its heatmap's peak (x, y) and the box of the
    thresholded map around it (x0, y0, x1, y1; :func:`misc.collections.queries.box_around_peak`)."""

    peak: list[float]
    box: list[float]


def spot(model: Inference, path: Path, text: str) -> Spot:
    """Where ``text`` is in the image file ``path``."""
    found = model.heatmaps(path, text)
    width, height = found.image.size
    return Spot(found.peaks[0].tolist(), box_around_peak(found.maps[0].numpy(), width, height))


def search(searchable: Searchable, name: str, queries: np.ndarray, k: int,
           where: Callable[[Path], Spot] | None = None) -> tuple[list[tuple[Image.Image, str]], list[list[Any]], str]:
    """The top ``k`` rows of collection ``name`` for a query (1, d): thumbnails with captions (image collections),
    each with ``where`` the text query is in it when given (computed for these ``k`` only), table rows (rank, score,
    path or text line) and a note on how the result was made."""
    collection = pick(searchable, name)
    if queries.shape[1] != collection.features.shape[1]:
        raise UserError(f"{name} holds {collection.features.shape[1]}-d features but the model makes "
                        f"{queries.shape[1]}-d ones: extract it again with this checkpoint")
    scores, rows = exact_search(queries, collection.features, int(k))
    gallery, table = [], []
    for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
        label = str(collection.labels[row])
        table.append([rank, round(score, 4), label])
        if collection.kind == "image":
            path = hit_location(collection, row)
            found = where(path) if where is not None and path.is_file() else None
            gallery.append((thumbnail(path, found), f"{score:.3f} {label}"))
    note = f"top {len(table)} of {len(collection.features)} {collection.kind}s in {name} (exact cosine)"
    if collection.config.get("checkpoint_sha256", searchable.checkpoint_sha256) != searchable.checkpoint_sha256:
        note += "; warning: made by another checkpoint, the scores compare different spaces"
    return gallery, table, note


def build_ui(model: Inference, searchable: Searchable | None = None, size: int | None = None, k: int | None = None,
             examples: list[Path] | None = None, concurrency: int = 1) -> Any:
    """The page (a ``gr.Blocks``): a Localization tab and a Search tab (a hint when there is nothing to search);
    gradio's queue runs ``concurrency`` requests at once (more browsers wait their turn)."""
    go_offline()
    import gradio as gr

    def shown(function: Any) -> Any:
        """``function`` with a user mistake shown on the page as an error box, not a server traceback."""
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except UserError as error:
                raise gr.Error(str(error)) from error
        return call

    with gr.Blocks(title="DSVE-Loc") as page:
        gr.Markdown(f"# DSVE-Loc\n`{model.checkpoint.name}`: {model.model.config.arch}, "
                    f"{model.dim}-d joint space")
        with gr.Tab("Localization"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="image")
                    if examples:
                        gr.Examples([[str(path)] for path in examples], inputs=[image], label="demo images")
                with gr.Column():
                    phrases = gr.Textbox(lines=4, label="phrases, one a line", elem_id="phrases",
                                         placeholder="a big red disc\na small blue square")
                    side_input = gr.Slider(32, 1024, value=size or model.localization_size, step=32,
                                           label="network input side (px)")
                    run = gr.Button("Localize", variant="primary", elem_id="localize")
            heatmaps = gr.Gallery(label="heatmaps (eq. 9), peak dotted", columns=3, height="auto", object_fit="contain",
                                  elem_id="heatmaps")
            scores = gr.Dataframe(headers=LOCALIZE_COLUMNS, label="cosine scores", elem_id="scores",
                                  interactive=False)
            # preprocess=False: the upload reaches localize unconverted (upload_path), the other inputs as sent
            run.click(shown(lambda upload, text, side: localize(model, upload_path(upload), text, int(side), k)),
                      [image, phrases, side_input], [heatmaps, scores], preprocess=False)
        with gr.Tab("Search"):
            if searchable is None:
                gr.Markdown("Nothing to search: start the app with `--features FILE_OR_FOLDER`, the `.npz` of "
                            "`image_features_extraction.py`.")
            else:
                names = list(searchable.collections)
                with gr.Row():
                    collection = gr.Dropdown(names, value=names[0], label="collection", elem_id="collection")
                    top = gr.Slider(1, 50, value=12, step=1, label="results")
                with gr.Row():
                    with gr.Column():
                        query = gr.Textbox(label="text query", elem_id="query")
                        located = gr.Checkbox(label="show where the text is in each image (eq. 9)",
                                              elem_id="where")
                        by_text = gr.Button("Search by text", variant="primary", elem_id="search-text")
                    with gr.Column():
                        query_image = gr.Image(type="filepath", image_mode=None, label="image query",
                                               elem_id="query-image")
                        by_image = gr.Button("Search by image", elem_id="search-image")
                note = gr.Markdown(elem_id="search-note")
                hits = gr.Gallery(label="hits", columns=6, elem_id="hits")
                table = gr.Dataframe(headers=SEARCH_COLUMNS, label="ranking", elem_id="ranking", interactive=False)
                by_text.click(shown(lambda name, text, count, show: search(
                    searchable, name, text_query(model, text), count,
                    (lambda path: spot(model, path, text.strip())) if show else None)),
                    [collection, query, top, located], [hits, table, note])
                by_image.click(shown(lambda name, upload, count: search(
                    searchable, name, image_query(model, pick(searchable, name), upload_path(upload)), int(count))),
                    [collection, query_image, top], [hits, table, note], preprocess=False)
    page.queue(default_concurrency_limit=concurrency)
    return page


def serve(page: Any, host: str, port: int, examples: list[Path]) -> None:
    """Serve the page until interrupted; only the example images' folders are readable besides gradio's own."""
    try:
        page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True,
                    allowed_paths=sorted({str(path.parent) for path in examples}))
    except OSError as error:
        raise UserError(f"cannot serve on {host}:{port} ({error}); pick another --port or --host") from error
