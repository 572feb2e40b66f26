"""Every evaluator writes the one results record of docs/results.md, valid against docs/results.schema.json, rates in
percent; --results stores the same record; eval_retrieval.py pairs the extraction commands' outputs by image."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from misc.store import checkpoint, results
from misc.config import TrainConfig
from models.config import ModelConfig
from models.joint import build_model
from tests.conftest import run_in_process

FLAGS = ["--workers", "0", "--no-progress", "--device", "cpu"]
SCHEMA = json.loads(results.SCHEMA.read_text(encoding="utf-8"))


def validate(entry: dict) -> None:
    jsonschema.validate(entry, SCHEMA, cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="module")
def model_path(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model of the project's format, its word vectors the tiny world's."""
    torch.manual_seed(0)
    config = ModelConfig(trunk="resnet18", maps_dim=32, embed_dim=32, weldon_k=0.2, word_dim=64, sru_layers=1)
    configs = {"model": asdict(config), "train": asdict(TrainConfig(dataset="demo", test_size=64)),
               "word_vectors": str(tiny_world / "words" / "demo_word2vec.bin")}
    path = tmp_path_factory.mktemp("model") / "tiny.pth.tar"
    checkpoint.atomic_save({"format": "dsve-loc", "version": 1, "config": configs, "epoch": 0, "best_rsum": 0.0,
                            "metrics": {}, "model": build_model(config).state_dict()}, path)
    return path


def evaluate(script: str, args: list, rows: str | None, key: str, world: Path, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """Run an evaluator with --json and --results under a dotted key; its --json file and its stored record."""
    out, shared = tmp_path / f"{script}.json", tmp_path / "results.json"
    shared.write_text(json.dumps({"models": {"other": {"kept": True}}}))
    extra = [rows] if rows else []
    assert run_in_process(script, [*args, "--json", out, "--results", shared, "--results-key", key, *extra, *FLAGS],
                          world, monkeypatch) == 0
    stored = json.loads(shared.read_text())
    assert stored["models"]["other"] == {"kept": True}
    return json.loads(out.read_text()), stored["models"]["dsve"][key.rsplit(".", 1)[1]]


def check_record(report: dict, stored: dict, tool: str, model_path: Path, row_keys: tuple[str, ...]) -> None:
    """The --json file and the stored value are the same valid record, the rows only in the --json file."""
    validate(report)
    validate(stored)
    assert report["tool"] == tool and report["version"] == results.package_version()
    assert report["checkpoint"] == str(model_path)
    assert report["checkpoint_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert {key: value for key, value in report.items() if key not in row_keys} == stored
    assert all(key in report and key not in stored for key in row_keys)


@pytest.mark.slow
def test_retrieval_record(tiny_world, model_path, tmp_path, monkeypatch):
    report, stored = evaluate("eval_retrieval.py", ["-p", model_path, "--protocols", "full"], None,
                              "models.dsve.retrieval", tiny_world, tmp_path, monkeypatch)
    check_record(report, stored, "eval_retrieval", model_path, ())
    assert (report["dataset"], report["split"], report["size"], report["protocol"]) == ("demo", "test", 64, "resize")
    full = report["metrics"]["full"]
    assert report["metrics"]["images"] == 12 and report["metrics"]["captions"] == 60
    assert full["rsum"] == pytest.approx(sum(full[d][f"R@{k}"] for d in ("caption_retrieval", "image_retrieval")
                                             for k in (1, 5, 10)))
    assert full["caption_retrieval"]["R@10"] > 1  # percent: a fraction would be at most 1 (10 of 12 images ranked)


@pytest.mark.slow
def test_pointing_game_record_in_percent(tiny_world, model_path, tmp_path, monkeypatch):
    report, stored = evaluate("pointing_game.py", ["-p", model_path, "--size", "64", "--limit", "4"], "--per-phrase",
                              "models.dsve.pointing_game", tiny_world, tmp_path, monkeypatch)
    check_record(report, stored, "pointing_game", model_path, ("per_phrase", "skipped_phrases"))
    metrics, rows = report["metrics"], report["per_phrase"]
    assert (report["size"], report["protocol"]) == (64, "original")
    assert metrics["phrases"] == len(rows) and metrics["skipped"] == len(report["skipped_phrases"])
    assert metrics["accuracy"] == pytest.approx(100 * sum(r["hit"] for r in rows) / len(rows))
    assert metrics["center_baseline"] == pytest.approx(100 * sum(r["center_hit"] for r in rows) / len(rows))
    assert report["paper"] == {"accuracy": 33.8, "center_baseline": 19.5}


@pytest.mark.slow
def test_segmentation_record_in_percent(tiny_world, model_path, tmp_path, monkeypatch):
    report, stored = evaluate("semantic_seg.py", ["-p", model_path, "--limit", "4", "--protocol", "ranked"],
                              "--per-image", "models.dsve.semantic_segmentation", tiny_world, tmp_path, monkeypatch)
    check_record(report, stored, "semantic_seg", model_path, ("per_image",))
    assert (report["split"], report["protocol"]) == ("test", "ranked")
    categories = [entry for entry in report["per_category"].values() if entry["positives"]]
    assert report["metrics"]["categories"] == len(categories) > 0
    for t in (0.3, 0.4, 0.5):  # the mean of the per-category APs, both in percent
        assert report["metrics"][f"mAP@{t}"] == pytest.approx(np.mean([e[f"AP@{t}"] for e in categories]))
    assert report["paper"]["mAP@0.3"] == 34.0


def test_schema_refuses_what_the_documentation_excludes(model_path):
    entry = results.record("pointing_game", checkpoint=model_path, dataset="demo", split="test", size=416,
                           protocol="original", metrics={"accuracy": 33.8, "center_baseline": 19.5, "phrases": 10,
                                                         "images": 2, "skipped": 0, "per_type": {}})
    validate(entry)
    for broken in ({**entry, "metrics": {**entry["metrics"], "accuracy": 338.0}},  # not a percentage
                   {key: value for key, value in entry.items() if key != "checkpoint_sha256"},
                   {**entry, "protocol": "center"}, {**entry, "size": 0}, {**entry, "tool": "eval"},
                   {**entry, "checkpoint_sha256": "abc"}):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_version_names_the_package_or_the_clone():
    version = results.package_version()
    assert version and version != "unknown"  # the tests run in a clone (or an installed package)


@pytest.fixture(scope="module")
def extracted(tiny_world: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """IMAGES.npz of the test images and the lines IMAGE<TAB>CAPTION of their captions, in a shuffled order."""
    folder = tmp_path_factory.mktemp("extracted")
    karpathy = json.loads((tiny_world / "dataset_coco.json").read_text())
    test = [image for image in karpathy["images"] if image["split"] == "test"]
    (folder / "list.txt").write_text("".join(f"{image['filename']}\n" for image in test))
    lines = [f"{image['filename']}\t{sentence['raw']}\n" for image in test for sentence in image["sentences"]]
    random.Random(0).shuffle(lines)
    (folder / "captions.tsv").write_text("".join(lines))
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_in_process("image_features_extraction.py",
                              ["-p", model_path, "-d", tiny_world / "images" / "val2014", "--list",
                               folder / "list.txt", "-o", folder / "images.npz", *FLAGS], tiny_world, monkeypatch) == 0
    return folder / "images.npz", folder / "captions.tsv"


def extract_texts(model_path: Path, lines: list[str], folder: Path, world: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    (folder / "captions.tsv").write_text("".join(lines))
    assert run_in_process("text_features_extraction.py", ["-p", model_path, "-d", folder / "captions.tsv", "--tsv",
                                                          "-o", folder / "captions.npz", *FLAGS],
                          world, monkeypatch) == 0
    return folder / "captions.npz"


@pytest.mark.slow
def test_features_of_the_extraction_commands_pair_by_image(tiny_world, model_path, extracted, tmp_path,
                                                           monkeypatch, capsys):
    images, tsv = extracted
    lines = tsv.read_text().splitlines(keepends=True)
    reports = []
    for order, shuffled in enumerate((lines, sorted(lines))):  # the pairing follows the names, not the order
        folder = tmp_path / str(order)
        folder.mkdir()
        captions = extract_texts(model_path, shuffled, folder, tiny_world, monkeypatch)
        out = folder / "r.json"
        assert run_in_process("eval_retrieval.py", ["--features", images, "--text-features", captions,
                                                    "--protocols", "full", "--json", out], tiny_world,
                              monkeypatch) == 0
        reports.append(json.loads(out.read_text()))
    validate(reports[0])
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["metrics"]["images"] == 12 and reports[0]["metrics"]["captions"] == len(lines)
    assert reports[0]["checkpoint_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert reports[0]["size"] == 64 and reports[0]["protocol"] == "resize"
    capsys.readouterr()

    # Captions naming images that were not extracted, and images left without a caption: one line each.
    unknown = [line.replace(".jpg\t", "_x.jpg\t", 1) for line in lines[:3]] + lines[3:]
    captions = extract_texts(model_path, unknown, tmp_path, tiny_world, monkeypatch)
    assert run_in_process("eval_retrieval.py", ["--features", images, "--text-features", captions], tiny_world,
                          monkeypatch) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "3 captions name" in error and "_x.jpg" in error
    first = lines[0].split("\t")[0]
    captions = extract_texts(model_path, [line for line in lines if not line.startswith(first + "\t")], tmp_path,
                             tiny_world, monkeypatch)
    assert run_in_process("eval_retrieval.py", ["--features", images, "--text-features", captions], tiny_world,
                          monkeypatch) == 2
    error = capsys.readouterr().err.strip()
    assert "1 of the 12 images" in error and first in error and "\n" not in error


@pytest.mark.slow
def test_save_features_format_still_evaluates(tiny_world, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", images=rng.standard_normal((6, 8), dtype=np.float32),
             captions=rng.standard_normal((30, 8), dtype=np.float32))
    out = tmp_path / "r.json"
    assert run_in_process("eval_retrieval.py", ["--features", tmp_path / "f.npz", "--protocols", "full", "--json",
                                                out], tiny_world, monkeypatch) == 0
    report = json.loads(out.read_text())
    validate(report)
    assert report["checkpoint"] is None and report["dataset"] == str(tmp_path / "f.npz")


def test_documented_example_is_a_valid_record():
    text = (results.ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    validate(example)
    assert list(example)[:9] == list(SCHEMA["required"])  # documented in the order records are written


@pytest.mark.slow
def test_search_by_an_extracted_image_file_needs_no_model(tiny_world, extracted, monkeypatch, capsys):
    """README: ``search.py --images photos.npz --image photos/cat.jpg``, the file as a path from here."""
    images, tsv = extracted
    name = tsv.read_text().splitlines()[0].split("\t")[0]
    monkeypatch.chdir(tiny_world / "images")
    assert run_in_process("search.py", ["--images", images, "--image", f"val2014/{name}", "-k", "3", "--json", "-"],
                          tiny_world, monkeypatch) == 0
    (query,) = json.loads(capsys.readouterr().out)["queries"]
    assert query["query"] == name and len(query["results"]) == 3
    assert name not in [entry["path"] for entry in query["results"]]  # an image is not its own neighbour
