"""search.py's HTTP server, queried with a real HTTP client on 127.0.0.1 (a uvicorn server on a free port, run in
a thread of this process): results against a search done here, bad requests answered in one JSON line while the
server goes on, paths outside the collection's folder, oversized bodies and decompression bombs refused, in JSON
and as multipart uploads; and localized search (eq. 9 peak and box) through the server and the CLI."""
from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import search as search_cli
from misc.collections.queries import box_around_peak
from misc.collections.search import Searcher, load_collection
from misc.collections.server import make_app, make_server
from misc.inference import Inference
from misc.store.arrays import write_npz
from models.config import ModelConfig
from tests.conftest import ROOT, random_checkpoint
from tests.test_extraction import png_header_only

TEXT = "a red square"


@pytest.fixture(scope="module")
def model_and_collection(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weight tiny checkpoint, and the features of a copy of the world's val2014 images it made."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("served")
    model_config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    checkpoint = random_checkpoint(root / "tiny.pth.tar", model_config, tiny_world, 64)
    folder = shutil.copytree(tiny_world / "images" / "val2014", root / "photos")
    names = sorted(p.name for p in folder.iterdir())
    features = Inference.load(checkpoint, device="cpu").embed_images([folder / n for n in names], 64).numpy()
    config = {"folder": str(folder.resolve()), "size": 64}
    write_npz(root / "photos.npz", {"features": features, "paths": np.array(names),
                                     "config": np.array(json.dumps(config))})
    (root / "secret.jpg").write_bytes((folder / names[0]).read_bytes())
    (folder / "link.jpg").symlink_to(root / "secret.jpg")  # inside by name, outside once resolved
    return checkpoint, root / "photos.npz"


@pytest.fixture(scope="module")
def served(model_and_collection) -> Iterator[tuple[httpx.Client, Inference, np.ndarray, Path]]:
    checkpoint, features_path = model_and_collection
    model = Inference.load(checkpoint, device="cpu")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = make_server(make_app(Searcher(load_collection(features_path)), model, max_body=200_000),
                         "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with np.load(features_path) as data:
        features = data["features"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, model, features, features_path
    server.should_exit = True
    thread.join(timeout=10)


def best_rows(features: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    scores = features @ query
    if exclude is not None:
        scores[exclude] = -np.inf
    return np.argsort(-scores, kind="stable")[:k].tolist()


def one_line_error(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status and response.text.count("\n") == 0 and "Traceback" not in response.text
    return response.json()["error"]


def test_text_embedding_and_stored_image_queries_match_an_exact_search(served):
    client, model, features, path = served
    assert client.get("/").json() == {"collection": str(path), "kind": "image", "size": len(features),
                                      "dim": 32, "model": True}
    query = model.embed_texts([TEXT]).numpy()[0]
    answer = client.post("/search", json={"text": TEXT, "k": 5}).json()
    assert [r["id"] for r in answer["results"]] == best_rows(features, query, 5)
    np.testing.assert_allclose([r["score"] for r in answer["results"]], np.sort(features @ query)[::-1][:5],
                               atol=1e-4)
    names = sorted(p.name for p in Path(load_collection(path).config["folder"]).iterdir() if p.name != "link.jpg")
    assert [r["path"] for r in answer["results"]] == [names[i] for i in best_rows(features, query, 5)]
    answer = client.post("/search", json={"embedding": (2 * features[3]).tolist(), "k": 3}).json()
    assert [r["id"] for r in answer["results"]] == best_rows(features, features[3], 3)
    answer = client.post("/search", json={"image": names[3], "k": 3}).json()  # stored: not its own neighbour
    assert [r["id"] for r in answer["results"]] == best_rows(features, features[3], 3, exclude=3)


def test_dedup_keeps_no_pair_at_or_above_the_threshold(served):
    client, _, features, _ = served
    order = best_rows(features, features[0], len(features))
    threshold = float(np.median((features @ features.T)[np.triu_indices(len(features), 1)]))
    kept = []
    for row in order:  # greedy, best first
        if all(features[row] @ features[other] < threshold for other in kept):
            kept.append(row)
    answer = client.post("/search", json={"embedding": features[0].tolist(), "k": 4, "dedup": threshold}).json()
    assert len(kept) >= 2 and kept[:4] != order[:4]
    assert [r["id"] for r in answer["results"]] == kept[:4]


def test_an_uploaded_image_is_embedded_and_bad_uploads_are_refused(served):
    client, model, features, _ = served
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    data = io.BytesIO()
    picture.save(data, "PNG")
    answer = client.post("/search", json={"image_base64": base64.b64encode(data.getvalue()).decode(), "k": 4})
    query = model.embed_images([picture], 64).numpy()[0]
    assert [r["id"] for r in answer.json()["results"]] == best_rows(features, query, 4)
    bomb = base64.b64encode(png_header_only(8000, 8000)).decode()  # 64 Mpx: over our 40, under PIL's 89
    assert "declares 8000 x 8000 pixels" in one_line_error(client.post("/search", json={"image_base64": bomb}))
    bomb = base64.b64encode(png_header_only(30_000, 30_000)).decode()  # PIL itself refuses it on opening
    assert "DecompressionBombError" in one_line_error(client.post("/search", json={"image_base64": bomb}))
    assert "not a readable image" in one_line_error(client.post("/search", json={"image_base64": "aGVsbG8="}))
    assert "not base64" in one_line_error(client.post("/search", json={"image_base64": "%%%"}))
    huge = {"image_base64": "A" * 300_000}
    assert "larger than 200000 bytes" in one_line_error(client.post("/search", json=huge), 413)
    assert client.get("/").status_code == 200  # still serving


def test_a_multipart_upload_is_embedded_and_bad_uploads_are_refused(served):
    client, model, features, path = served
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    data = io.BytesIO()
    picture.save(data, "JPEG", quality=95)
    query = model.embed_images([Image.open(io.BytesIO(data.getvalue())).convert("RGB")], 64).numpy()[0]
    answer = client.post("/search", files={"image": ("x.jpg", data.getvalue(), "image/jpeg")}, data={"k": "4"})
    assert answer.status_code == 200 and [r["id"] for r in answer.json()["results"]] == best_rows(features, query, 4)
    names = sorted(p.name for p in Path(load_collection(path).config["folder"]).iterdir() if p.name != "link.jpg")
    answer = client.post("/search", data={"image": names[2], "k": "3", "dedup": "1"})  # a path, as a form field
    assert [r["id"] for r in answer.json()["results"]] == best_rows(features, features[2], 3, exclude=2)

    def upload(content: bytes, **fields: str) -> httpx.Response:
        return client.post("/search", files={"image": ("u.png", content, "image/png")}, data=fields)

    assert "declares 8000 x 8000 pixels" in one_line_error(upload(png_header_only(8000, 8000)))
    assert "DecompressionBombError" in one_line_error(upload(png_header_only(30_000, 30_000)))
    assert "not a readable image" in one_line_error(upload(b"hello"))
    assert "larger than 200000 bytes" in one_line_error(upload(bytes(300_000)), 413)
    assert "k '4x' is not a number" in one_line_error(upload(data.getvalue(), k="4x"))
    assert "localize must be true or false" in one_line_error(upload(data.getvalue(), localize="yes"))
    assert "give exactly one query" in one_line_error(upload(data.getvalue(), text=TEXT))
    two = client.post("/search", files=[("image", ("a.png", b"a", "image/png")),
                                        ("image", ("b.png", b"b", "image/png"))])
    assert "multipart form cannot be read" in one_line_error(two)
    text_file = client.post("/search", files={"text": ("t.txt", b"a red square", "text/plain")})
    assert "only image may be an uploaded file" in one_line_error(text_file)
    assert client.post("/search", json={"text": TEXT, "k": 1}).status_code == 200  # still serving


@pytest.mark.parametrize("payload, message", [
    ({"image": "../secret.jpg"}, "not a file inside the collection's folder"),
    ({"image": "/etc/hostname"}, "not a file inside the collection's folder"),
    ({"image": "link.jpg"}, "not a file inside the collection's folder"),
    ({"text": TEXT, "k": 0}, "k must be an integer from 1 to 1000"),
    ({"text": TEXT, "k": True}, "k must be an integer"),
    ({"text": TEXT, "embedding": [1.0]}, "give exactly one query"),
    ({}, "give exactly one query"),
    ({"text": TEXT, "colour": "red"}, "unknown keys ['colour']"),
    ({"embedding": [1.0, 2.0]}, "embedding must be 32 finite numbers"),
    ({"embedding": ["x"] * 32}, "embedding must be a list of numbers"),
    ({"text": TEXT, "dedup": 2}, "dedup must be a cosine"),
    ({"text": "qwxz zzkq"}, "none of its words is in the vocabulary"),
    ({"embedding": [0.1] * 32, "localize": True}, "localize needs a text query"),
    ([1, 2], "the body must be a JSON object"),
])
def test_bad_requests_get_one_json_line_and_the_server_goes_on(served, payload, message):
    client = served[0]
    assert message in one_line_error(client.post("/search", json=payload))
    assert client.post("/search", json={"text": TEXT, "k": 1}).status_code == 200


def test_a_body_that_is_not_json_is_a_bad_request(served):
    assert "not JSON" in one_line_error(served[0].post("/search", content=b"{nope"))


def test_box_around_the_peak_of_a_thresholded_map():
    heat = np.array([[0, 0, 0, 0], [0, 6, 9, 0], [0, 5, 0, 8], [1, 0, 0, 0]], dtype=np.float32)
    # cells >= 4.5 (half way from 0 to 9) connected to the peak (1, 2), diagonals included: (1,1) (1,2) (2,1)
    # (2,3); rows 1-2, columns 1-3 of a 4 x 4 grid over a 40 x 80 (w x h) image
    assert box_around_peak(heat, 40, 80) == [10.0, 20.0, 40.0, 60.0]
    assert box_around_peak(np.ones((2, 2), np.float32), 10, 10) == [0.0, 0.0, 10.0, 10.0]


def test_localized_results_carry_the_heatmap_peak_and_a_box_around_it(served, model_and_collection, tmp_path):
    client, model, features, path = served
    folder = Path(load_collection(path).config["folder"])
    answer = client.post("/search", json={"text": TEXT, "k": 2, "localize": True}).json()["results"]
    for entry in answer:
        maps = model.heatmaps(folder / entry["path"], TEXT)
        assert entry["localization"]["peak"] == pytest.approx(maps.peaks[0].tolist(), abs=0.01)
        x0, y0, x1, y1 = entry["localization"]["box"]
        x, y = entry["localization"]["peak"]
        assert x0 <= x <= x1 and y0 <= y <= y1 and (x1 - x0) * (y1 - y0) > 0
    out = tmp_path / "found.json"
    search_cli.main(["--images", str(path), "-p", str(model_and_collection[0]), "-q", TEXT, "-k", "2",
                     "--localize", "--device", "cpu", "--json", str(out)])
    found = json.loads(out.read_text())["queries"][0]["results"]
    assert [e["localization"] for e in found] == [e["localization"] for e in answer]


@pytest.mark.slow
def test_the_cli_serves_a_faiss_index_on_127_0_0_1_without_a_model(model_and_collection):
    features_path = model_and_collection[1]
    with np.load(features_path) as data:
        features = data["features"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "search.py"), "--images", str(features_path), "--serve",
                               "--port", str(port), "--index", "faiss"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert client.get("/").json()["model"] is False
                    break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
                    time.sleep(0.2)
            answer = client.post("/search", json={"embedding": features[5].tolist(), "k": 3}).json()
            assert [r["id"] for r in answer["results"]] == best_rows(features, features[5], 3)
            assert answer["index"] == {"type": "faiss IndexFlat", "built": True}  # built before listening
            assert Path(f"{features_path}.index_report.json").is_file()
            assert "start it with -p CHECKPOINT" in one_line_error(client.post("/search", json={"text": TEXT}))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_failure_inside_the_server_is_one_line_without_a_traceback(model_and_collection, caplog):
    from fastapi.testclient import TestClient

    searcher = Searcher(load_collection(model_and_collection[1]))

    def broken(queries: np.ndarray, k: int) -> None:
        raise RuntimeError("faiss exploded\nwith a second line")

    searcher.search = broken
    with TestClient(make_app(searcher, None)) as client:
        response = client.post("/search", json={"embedding": [1.0] * 32})
        assert one_line_error(response, 500) == "internal error; see the server's log"
        assert "faiss exploded" not in response.text and "faiss exploded" in caplog.text  # logged here
        assert client.get("/").status_code == 200
