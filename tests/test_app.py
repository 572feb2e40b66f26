"""The web page (app.py, misc/webapp.py): what it computes, tested directly, and the page itself driven in a real
Chromium by Playwright (slow: a server subprocess and a browser)."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect

from misc import webapp
from misc.store.checkpoint import atomic_save
from misc.config import TrainConfig
from misc.errors import UserError
from misc.store.files import file_sha256
from misc.data.images import list_images
from misc.inference import Inference
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import ROOT
from tests.test_app_inputs import png_bomb

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
SIZE = 64


@pytest.fixture(scope="module")
def model_file(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight DSVE checkpoint (resnet18, 32-d) reading the tiny world's word vectors."""
    torch.manual_seed(1)
    network = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    settings = {"model": asdict(network), "train": asdict(TrainConfig(dataset="demo", test_size=SIZE)),
                "word_vectors": str(tiny_world / "words" / "demo_word2vec.bin")}
    path = tmp_path_factory.mktemp("app") / "model.pth.tar"
    atomic_save({"format": "dsve-loc", "version": 1, "config": settings, "model": build_model(network).state_dict(),
                 "epoch": 0, "best_rsum": 0.0, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def model(model_file: Path) -> Inference:
    return Inference.load(model_file, device="cpu")


@pytest.fixture(scope="module")
def collection_file(model: Inference, model_file: Path, tiny_world: Path) -> Path:
    """Image features of the tiny world's val2014 images, in the format of image_features_extraction.py."""
    folder = tiny_world / "images" / "val2014"
    names = list_images(folder)
    path = model_file.with_name("images.npz")
    record = {"checkpoint": str(model_file), "checkpoint_sha256": file_sha256(model_file), "size": SIZE,
              "folder": str(folder)}
    np.savez(path, features=model.embed_images([folder / name for name in names]).numpy(), paths=np.array(names),
             config=np.array(json.dumps(record)))
    return path


@pytest.fixture(scope="module")
def searchable(collection_file: Path, model_file: Path) -> webapp.Searchable:
    return webapp.load_collections(collection_file.parent, model_file)


def test_phrases_are_the_non_blank_lines_and_none_or_too_many_are_refused():
    assert webapp.parse_phrases("  a red disc \n\n a blue square\n") == ["a red disc", "a blue square"]
    with pytest.raises(UserError, match="at least one phrase"):
        webapp.parse_phrases(" \n ")
    with pytest.raises(UserError, match="at most"):
        webapp.parse_phrases("\n".join(["a disc"] * (webapp.MAX_PHRASES + 1)))


def test_every_phrase_gets_a_panel_its_cosine_score_and_its_unknown_words(model, tiny_world):
    image = tiny_world / "images" / "val2014" / list_images(tiny_world / "images" / "val2014")[0]
    phrases = ["a red disc", "a blue frobnicated square"]
    panels, rows = webapp.localize(model, image, "\n".join(phrases), size=SIZE)
    assert [row[0] for row in rows] == phrases
    cosines = (model.embed_texts(phrases) @ model.embed_images([image])[0]).tolist()
    assert [row[1] for row in rows] == pytest.approx(cosines, abs=1e-3)
    assert [row[4] for row in rows] == ["", "frobnicated"]
    width, height = Image.open(image).size
    assert all(0 <= row[2] <= width and 0 <= row[3] <= height for row in rows)
    assert [caption for _, caption in panels] == [webapp.panel_caption(phrase, row[1], [row[4]] if row[4] else [])
                                                 for phrase, row in zip(phrases, rows)]
    assert all(isinstance(panel, Image.Image) and min(panel.size) > SIZE for panel, _ in panels)


def test_localizing_needs_an_image(model):
    with pytest.raises(UserError, match="upload an image"):
        webapp.localize(model, None, "a red disc")


def test_examples_come_from_the_demo_world_when_it_exists(tiny_world, tmp_path):
    examples = webapp.example_images(tiny_world / "images" / "val2014", count=4)
    files = {path for path in (tiny_world / "images" / "val2014").iterdir() if path.suffix == ".jpg"}
    assert len(files) >= 4 and len(examples) == 4 and set(examples) <= files  # 24 images: 4 of them
    assert len(set(examples)) == len(examples)
    assert webapp.example_images(tmp_path / "absent") == []


def test_an_image_of_the_collection_finds_itself_first_with_a_thumbnail(model, searchable, collection_file):
    collection = searchable.collections[collection_file.name]
    wanted = str(collection.labels[3])
    query = webapp.image_query(model, collection, Path(collection.config["folder"]) / wanted)
    gallery, table, note = webapp.search(searchable, collection_file.name, query, 5)
    assert table[0][2] == wanted and table[0][1] == pytest.approx(1.0, abs=1e-4)
    assert [row[0] for row in table] == [1, 2, 3, 4, 5]
    assert [row[1] for row in table] == sorted((row[1] for row in table), reverse=True)
    assert len(gallery) == 5 and max(gallery[0][0].size) <= webapp.THUMBNAIL and wanted in gallery[0][1]
    assert f"top 5 of {len(collection.features)} images" in note and "warning" not in note


def test_a_text_query_ranks_the_whole_collection_by_cosine(model, searchable, collection_file):
    collection = searchable.collections[collection_file.name]
    _, table, _ = webapp.search(searchable, collection_file.name, webapp.text_query(model, "a red disc"), 100)
    expected = np.asarray(collection.features) @ model.embed_texts(["a red disc"]).numpy()[0]
    assert len(table) == len(collection.features)
    assert [row[1] for row in table] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-4)
    with pytest.raises(UserError, match="vocabulary"):
        webapp.text_query(model, "qwxz zzkq")


def test_a_text_search_can_show_where_the_text_is_in_each_hit(model, searchable, collection_file):
    query = webapp.text_query(model, "a red disc")
    plain, table, _ = webapp.search(searchable, collection_file.name, query, 3)
    located, _, _ = webapp.search(searchable, collection_file.name, query, 3,
                                  lambda path: webapp.spot(model, path, "a red disc"))
    marked = [int((np.asarray(image) == webapp.SPOT_COLOUR).all(axis=2).sum()) for image, _ in located]
    assert all(count > 0 for count in marked) and all(
        not (np.asarray(image) == webapp.SPOT_COLOUR).all(axis=2).any() for image, _ in plain)
    collection = searchable.collections[collection_file.name]
    for (image, _), row in zip(located, table):
        path = webapp.hit_location(collection, int(np.flatnonzero(collection.labels == row[2])[0]))
        found = model.heatmaps(path, "a red disc")  # the peak, independently of the drawing
        x, y = (found.peaks[0] * image.width / found.image.width).round().int().tolist()
        assert tuple(np.asarray(image)[min(y, image.height - 1), min(x, image.width - 1)]) == webapp.SPOT_COLOUR


def test_a_collection_of_another_model_is_refused_or_flagged(model, searchable, collection_file, tmp_path):
    np.savez(tmp_path / "small.npz", features=np.eye(2, 16, dtype=np.float32), paths=np.array(["a", "b"]))
    other = webapp.load_collections(tmp_path / "small.npz", collection_file)
    with pytest.raises(UserError, match="16-d features"):
        webapp.search(other, "small.npz", webapp.text_query(model, "a red disc"), 1)
    flagged = webapp.Searchable(searchable.collections, "0" * 64)
    assert "another checkpoint" in webapp.search(flagged, collection_file.name, np.ones((1, 32), np.float32), 1)[2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .npz"):
        webapp.load_collections(tmp_path / "empty", collection_file)


def test_an_upload_reaches_the_page_unconverted_as_its_stored_path(tmp_path):
    stored = tmp_path / "notes.jpg"
    assert webapp.upload_path({"path": str(stored), "orig_name": "notes.jpg", "meta": {}}) == str(stored)
    assert webapp.upload_path(None) is None and webapp.upload_path(str(stored)) == str(stored)
    with pytest.raises(UserError, match="did not arrive as a file"):
        webapp.upload_path({"path": None, "url": "data:image/png;base64,AAAA"})


def test_a_missing_hit_image_is_a_grey_thumbnail(tmp_path):
    assert webapp.thumbnail(tmp_path / "gone.jpg").getpixel((0, 0)) == (128, 128, 128)


# --------------------------------------------------------------------------- the page in a real browser

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_file: Path, collection_file: Path, tiny_world: Path) -> Iterator[str]:
    """app.py serving the tiny model and collection; its URL once it answers. Stopped at the end."""
    port = free_port()
    log = model_file.with_name("app.log")
    env = {**os.environ, "DSVE_DEMO_DIR": str(tiny_world), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "-p", str(model_file), "--features",
                                    str(collection_file), "--port", str(port), "--size", "128", "--device", "cpu"],
                                   cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer at {url} within 240 s:\n{log.read_text()}")
            try:
                with opener.open(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's, never downloaded); missing, the test fails and says how to install it."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium; see `make browser`)")
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        except Error as error:
            pytest.fail(f"{CHROMIUM} does not start ({str(error).splitlines()[0]}): `make test` installs it")
        yield instance
        instance.close()


def open_page(browser, url: str):
    """A new page at ``url``, remembering every request that left this machine."""
    page = browser.new_page()
    page.outside = []
    page.on("request", lambda request: page.outside.append(request.url)
            if not request.url.startswith(url.rstrip("/")) and not request.url.startswith("data:") else None)
    page.goto(url, wait_until="domcontentloaded")
    return page


@pytest.mark.slow
def test_the_page_shows_a_heatmap_and_a_score_for_a_typed_phrase(server, browser, tiny_world):
    page = open_page(browser, server)
    image = tiny_world / "images" / "val2014" / list_images(tiny_world / "images" / "val2014")[0]
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.locator("#image img").first.wait_for(timeout=30_000)  # uploaded: the preview shows
    page.locator("#phrases textarea").fill("a red disc")
    page.locator("#localize").click()
    heatmap = page.locator("#heatmaps img").first
    heatmap.wait_for(timeout=60_000)
    assert heatmap.evaluate("element => element.complete && element.naturalWidth") > SIZE
    expect(page.locator("#heatmaps")).to_contain_text("a red disc:", timeout=10_000)
    caption = page.locator("#heatmaps").inner_text()
    assert re.search(r"a red disc: -?\d+\.\d{3}", caption), caption
    expect(page.locator("#scores")).to_contain_text("a red disc", timeout=10_000)
    assert re.search(r"-?\d+\.\d+", page.locator("#scores").inner_text().split("a red disc", 1)[1])
    assert page.outside == []
    page.close()


def searched(browser, url: str, query: str, where: bool = False):
    """A page of ``url`` whose Search tab has searched ``query`` (``where``: with the spots drawn), hits shown."""
    page = open_page(browser, url)
    page.get_by_role("tab", name="Search").click()
    page.locator("#query input, #query textarea").first.fill(query)
    if where:
        page.locator("#where input").check()
    page.locator("#search-text").click()
    page.locator("#hits img").first.wait_for(timeout=120_000)
    return page


@pytest.mark.slow
def test_the_page_searches_the_collection_by_text_with_thumbnails(server, browser):
    page = searched(browser, server, "a blue square")
    expect(page.locator("#search-note")).to_contain_text(re.compile(r"top 12 of \d+ images"), timeout=10_000)
    assert page.locator("#hits img").count() == 12
    assert re.search(r"-?\d\.\d{3} COCO_val2014_", page.locator("#hits").inner_text())
    assert page.outside == []
    page.close()


@pytest.mark.slow
def test_the_page_searches_by_an_uploaded_image_and_refuses_a_non_image_in_one_line(server, browser, tiny_world,
                                                                                    tmp_path):
    names = list_images(tiny_world / "images" / "val2014")
    page = open_page(browser, server)
    page.get_by_role("tab", name="Search").click()
    page.locator("#query-image input[type=file]").set_input_files(str(tiny_world / "images" / "val2014" / names[3]))
    page.locator("#query-image img").first.wait_for(timeout=30_000)
    page.locator("#search-image").click()
    page.locator("#hits img").first.wait_for(timeout=120_000)
    expect(page.locator("#search-note")).to_contain_text(f"top 12 of {len(names)} images", timeout=10_000)
    ranked = re.findall(r"COCO_val2014_\d+\.jpg", page.locator("#ranking").inner_text())
    assert ranked[0] == names[3]  # the image itself, first
    (tmp_path / "notes.jpg").write_text("not an image")
    page.locator("#query-image input[type=file]").set_input_files(str(tmp_path / "notes.jpg"))
    time.sleep(2)  # the upload reaches the server
    page.locator("#search-image").click()
    message = page.get_by_text(re.compile(r"notes\.jpg: cannot read it as an image \(UnidentifiedImageError: "))
    expect(message.first).to_be_visible(timeout=60_000)
    page.close()


def odd_uploads(folder: Path) -> dict[str, Path]:
    """Files a person may upload: not an image, a decompression bomb (a PNG of 20000 x 20000), a 6000 x 6000 photo,
    CMYK, 16-bit grey and an animated GIF."""
    files = {"text": folder / "notes.jpg", "bomb": folder / "bomb.png", "huge": folder / "huge.jpg",
             "cmyk": folder / "cmyk.jpg", "grey16": folder / "grey16.png", "gif": folder / "blink.gif"}
    files["text"].write_text("not an image")
    files["bomb"].write_bytes(png_bomb())
    Image.new("RGB", (6000, 6000), (200, 40, 40)).save(files["huge"], quality=60)
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(files["cmyk"])
    Image.fromarray(np.full((60, 80), 51400, dtype=np.uint16)).save(files["grey16"])
    frames = [Image.new("RGB", (80, 60), colour) for colour in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    return files


@pytest.mark.slow
def test_the_page_draws_where_a_searched_text_is_on_each_thumbnail(server, browser):
    page = searched(browser, server, "a red disc", where=True)
    shot = page.locator("#hits img").first.screenshot()  # what the page shows: the thumbnail with its spot
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    assert (np.abs(pixels - np.array(webapp.SPOT_COLOUR)).sum(axis=2) < 60).any()
    page.close()


@pytest.mark.slow
def test_odd_uploads_get_a_heatmap_or_a_message_and_the_page_keeps_serving(server, browser, tmp_path):
    files = odd_uploads(tmp_path)
    for name, path in files.items():
        page = open_page(browser, server)
        page.locator("#image input[type=file]").set_input_files(str(path))
        page.locator("#phrases textarea").fill("a red disc")
        time.sleep(2)  # the upload reaches the server
        page.locator("#localize").click()
        if name in ("text", "bomb"):  # refused: the project's one line (display_image), not gradio's conversion error
            reason = "UnidentifiedImageError" if name == "text" else "DecompressionBombError"
            message = page.get_by_text(re.compile(rf"{path.name}: cannot read it as an image \({reason}: "))
            expect(message.first).to_be_visible(timeout=60_000)
            assert "preprocess" not in page.locator("body").inner_text()  # gradio's own words name its stage
        else:
            page.locator("#heatmaps img").first.wait_for(timeout=120_000)
            expect(page.locator("#scores")).to_contain_text("a red disc", timeout=10_000)
        page.screenshot(path=str(tmp_path / f"{name}.png"))
        page.close()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server, timeout=10) as response:
        assert response.status == 200  # still serving
