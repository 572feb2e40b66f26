"""Every command block of README.md runs as written, in README order, in a scratch folder that holds the files the
README's examples name (a small trained model as ``model.pth.tar`` and ``runs/demo/best.pth.tar``, ``image.jpg``,
a ``photos/`` folder, ``captions.txt``, ``mine.jsonl``), on the small demo world.

A block is a fenced ``sh`` or ``python`` block; ``sh`` lines run in bash with ``python`` being this environment's,
``python`` blocks run as a script. The blocks that cannot run here are listed in :data:`NOT_RUN` by their first line,
each with its reason (a GPU, a full dataset or the released model, a server that runs until stopped); a listed block
that no longer exists, or an unlisted block of another language, fails the test.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from misc.data import photos
from tests.conftest import ROOT, TINY_MODEL, run_cli

README = ROOT / "README.md"
NOT_RUN = {
    "make demo": "the demo itself (14 minutes; CI runs `make test`, which runs this file): its commands are the "
                 "CLIs run below on the small world",
    "python train.py --preset paper --init pretrained_classif_152_2400.pth.tar":
        "full dataset: COCO and the released initialisation",
    "torchrun --nproc_per_node=4 train.py --preset paper": "several GPUs and COCO",
    "python train.py --preset das2019 --weights IMAGENET1K_V1 --dataset flickr30k_entities --split train":
        "full dataset: Flickr30K Entities",
    "python train.py --preset das2019 --weights IMAGENET1K_V1 --dataset coco --dataset flickr30k --split train --out "
    "runs/mix": "full datasets: COCO and Flickr30K; tests/test_mix.py trains on two small datasets the same way",
    "python eval_retrieval.py -p model.pth.tar --dataset coco --protocols 1k full --words data/words/utable.npy":
        "full dataset: COCO and the released model",
    "python pointing_game.py -p model.pth.tar --size 416 --words data/words/utable.npy":
        "full dataset: Visual Genome and the released model",
    "python semantic_seg.py -p model.pth.tar --words data/words/utable.npy":
        "full dataset: COCO and the released model",
    "python train.py --preset paper --init pretrained_classif_152_2400.pth.tar --words data/words/utable.npy":
        "full dataset: COCO and the released initialisation",
    "python checkpoint.py convert model.pth.tar runs/paper/model.pth.tar":
        "the released model: convert reads the original release's file only",
    "python photo_world.py data/photos --train 1200 --val 50 --test 500":
        "a 4-minute run: tests/test_real_content.py runs the same steps and asserts their results",
    "make app": "serves until stopped; tests/test_app.py drives the page in Chromium",
    "python image_features_extraction.py -p model.pth.tar -d 'shards/{000000..000099}.tar' -o shards_features/":
        "a hundred tar shards of one's own: tests/test_shards.py writes small ones and extracts them with one process, "
        "two ranks and a rank killed and run again",
    "python search.py --images photos.npz -p model.pth.tar --serve --port 8000":
        "serves until stopped; tests/test_server.py queries the same server over HTTP",
    "pip install .": "installs into the environment; tests/test_hub.py checks what the wheel holds and "
                     "tests/test_installed.py installs it in a fresh one and runs its commands",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the README, in order."""
    return [(match[1], match[2]) for match in FENCE.finditer(README.read_text(encoding="utf-8"))]


def first_line(body: str) -> str:
    return next(line for line in body.splitlines() if line.strip()).split("  #")[0].strip()


def test_every_block_is_runnable_or_listed() -> None:
    found = {first_line(body): language for language, body in blocks()}
    assert set(NOT_RUN) <= set(found), f"listed but gone from the README: {sorted(set(NOT_RUN) - set(found))}"
    for line, language in found.items():
        assert language in ("sh", "python") or line in NOT_RUN, f"block {line!r} is ```{language}, not sh or python"


@pytest.fixture(scope="module")
def scratch(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the README's commands run in, with the files their examples name."""
    folder = tmp_path_factory.mktemp("readme")
    run_cli("train.py", "--preset", "demo", "--epochs", "1", "--out", folder / "trained", *TINY_MODEL,
            world=tiny_world)
    (folder / "runs" / "demo").mkdir(parents=True)
    for target in (folder / "model.pth.tar", folder / "runs" / "demo" / "best.pth.tar"):
        shutil.copy(folder / "trained" / "best.pth.tar", target)
    shutil.rmtree(folder / "trained")
    images = sorted((tiny_world / "images" / "val2014").glob("*.jpg"))
    shutil.copy(images[0], folder / "image.jpg")
    (folder / "photos").mkdir()
    for index, image in enumerate(images[:6]):
        shutil.copy(image, folder / "photos" / ("cat.jpg" if index == 0 else image.name))
    (folder / "captions.txt").write_text("a red circle\na small blue square\na big green diamond\n", encoding="utf-8")
    (folder / "sel.jsonl").write_text("".join(json.dumps({"path": image.name, "caption": "a red circle"}) + "\n"
                                              for image in images[1:4]), encoding="utf-8")
    (folder / "captions.tsv").write_text("".join(f"{image.name if index else 'cat.jpg'}\ta red circle on grass\n"
                                                 for index, image in enumerate(images[:6])), encoding="utf-8")
    lines = photos.generate(folder / "mine", seed=0, counts={"train": 40, "val": 8, "test": 8}, size=96)
    records = [json.loads(line) for line in lines.read_text(encoding="utf-8").splitlines()]
    (folder / "mine.jsonl").write_text("".join(json.dumps({**record, "image": f"mine/{record['image']}"}) + "\n"
                                               for record in records), encoding="utf-8")
    return folder


def run_block(language: str, body: str, folder: Path, world: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DSVE_DEMO_DIR": str(world), "PYTHONPATH": str(ROOT),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "DSVE_README_TEST": "1"}
    for script in ROOT.glob("*.py"):
        if not (folder / script.name).exists():
            (folder / script.name).symlink_to(script)
    command = [sys.executable, "-c", body] if language == "python" else ["bash", "-euo", "pipefail", "-c", body]
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_readme_blocks_run(scratch: Path, tiny_world: Path) -> None:
    ran = []
    for language, body in blocks():
        line = first_line(body)
        if line in NOT_RUN:
            continue
        result = run_block(language, body, scratch, tiny_world)
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"README block {line!r} failed:\n{output}"
        ran.append(line)
    assert len(ran) >= 8, ran
    assert json.loads((scratch / "out.json").read_text())["metrics"]["full"]
