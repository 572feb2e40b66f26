"""The notebook API (torch.hub entry, misc.inference.Inference), the photo decoding it shares with every command,
localize.py, and the installable package (pyproject.toml)."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from misc import commands
from misc.errors import UserError
from misc.data.images import read_image
from misc.inference import Inference
from misc.visualize import figure_size
from tests.conftest import ROOT, run_in_process
from tests.test_localization import tiny_checkpoint  # noqa: F401 - the session fixture, a random tiny DSVE model

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # the stored pixels are shown turned 90 degrees clockwise


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Inference:  # noqa: F811 - the imported fixture
    """The tiny checkpoint through torch.hub, as a notebook loads it."""
    return torch.hub.load(str(ROOT), "dsve", source="local", checkpoint=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def photos(tiny_world: Path) -> list[Path]:
    return sorted((tiny_world / "images" / "val2014").glob("*.jpg"))[:5]


@pytest.fixture
def rotated_jpeg(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A JPEG stored 40 wide and 80 high whose EXIF says to show it turned clockwise (80 x 40), and the pixels a
    viewer shows."""
    stored = np.zeros((80, 40, 3), dtype=np.uint8)
    stored[:20, :, 0] = 255  # the stored top is red: once turned clockwise it is the right side
    stored[20:, :, 2] = 200
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    return path, np.rot90(stored, k=-1)


def test_hub_lists_and_loads_the_entry(model):
    hubconf = importlib.import_module("hubconf")
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert entries == ["dsve"]  # torch.hub.list's rule
    assert isinstance(model, Inference) and model.device.type == "cpu" and model.model.config.arch == "dsve"


def test_embed_images_from_paths_and_pil_equal_the_tensor_path(model, photos):
    batch = torch.stack([model.transform()(read_image(path, model.test_size)) for path in photos])
    expected = model.embed_images(batch)
    from_paths = model.embed_images(photos, batch_size=2)  # three batches
    pils = [Image.open(path) for path in photos]
    from_pils = model.embed_images(pils)
    assert from_paths.shape == (len(photos), model.dim) and from_paths.device.type == "cpu"
    torch.testing.assert_close(from_paths, expected)
    torch.testing.assert_close(from_pils, expected)
    torch.testing.assert_close(from_paths.norm(dim=1), torch.ones(len(photos)))
    larger = model.embed_images(photos[:2], size=96)
    assert not torch.allclose(larger, expected[:2])  # size is used


def test_heatmaps_peaks_are_in_the_image_pixels(model, photos):
    wide = Image.open(photos[0]).resize((120, 48))
    found = model.heatmaps(wide, ["a red circle", "the big square"], size=96)
    assert found.maps.shape == (2, 3, 3) and found.size == 96 and found.image.size == (120, 48)
    flat = found.maps.flatten(1).argmax(dim=1)
    rows, cols = flat // 3, flat % 3
    expected = torch.stack([(cols + 0.5) * 120 / 3, (rows + 0.5) * 48 / 3], dim=1).float()
    torch.testing.assert_close(found.peaks, expected)
    assert found.k == model.choose_k(None, 180)
    default = model.heatmaps(wide, "a red circle")  # one text, at the checkpoint's test size 64: a 2 x 2 map
    assert default.maps.shape == (1, 2, 2) and default.size == 64 and default.texts == ["a red circle"]


def test_heatmap_scores_are_the_retrieval_cosines(model, photos):
    texts = ["a red circle", "a small blue square on the left"]
    found = model.heatmaps(photos[1], texts, size=64)
    cosines = model.embed_images(photos[1:2]) @ model.embed_texts(texts).t()
    torch.testing.assert_close(found.scores, cosines[0])


def test_unknown_words_are_reported_and_wordless_texts_refused(model, photos):
    found = model.heatmaps(photos[0], ["a red circle", "a qzxv circle near wvvq"], size=64)
    assert found.unknown == [[], ["qzxv", "wvvq"]]
    with pytest.raises(UserError, match="has no words"):
        model.heatmaps(photos[0], ["a red circle", " ?! "])
    with pytest.raises(UserError, match="at least one"):
        model.heatmaps(photos[0], [])


def test_plot_writes_a_png_with_a_colour_bar(model, photos, tmp_path):
    out = tmp_path / "figures" / "map.png"
    out.parent.mkdir()
    figure = model.plot(photos[0], ["a red circle", "a qzxv square"], out=out, size=64)
    assert isinstance(figure, Figure)
    labels = [axes.get_label() for axes in figure.axes]
    assert labels.count("colorbar") == 2
    titles = [axes.get_title() for axes in figure.axes if axes.get_label() != "colorbar"]
    assert re.search(r"score -?\d\.\d{3}", titles[0]) and "unknown: qzxv" in titles[1]
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == figure_size(64, 64, 2)
    assert [p.name for p in out.parent.iterdir()] == ["map.png"]  # written atomically, nothing left behind


def test_read_image_applies_exif_orientation(model, rotated_jpeg):
    path, shown = rotated_jpeg
    image = read_image(path)
    assert image.size == (80, 40)
    error = np.abs(np.asarray(image, dtype=float) - shown).mean()
    assert error < 4 < np.abs(np.asarray(image, dtype=float) - shown[::-1, ::-1]).mean()  # not turned the other way
    assert model.heatmaps(path, "a red circle", size=64).image.size == (80, 40)
    with Image.open(path) as opened:  # a PIL image a user opened is turned the same way
        torch.testing.assert_close(model.embed_images([opened]), model.embed_images([path]))


def test_read_image_scales_16_bit_grey_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # really a 16-bit file
    pixels = np.asarray(read_image(path))
    assert pixels.shape == (2, 4, 3) and (pixels == pixels[..., :1]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.rint(values / 257).astype(np.uint8))


def test_localize_cli_defaults_to_the_checkpoints_size_and_shares_a_scale(tiny_world, tiny_checkpoint, rotated_jpeg,  # noqa: F811
                                                         tmp_path, monkeypatch, capsys):
    path, _ = rotated_jpeg
    out = tmp_path / "map.png"
    status = run_in_process("localize.py", ["-p", tiny_checkpoint, "-i", path, "-t", "a red circle", "-t",
                                            "a qzxv square", "-o", out, "--shared-scale", "--device", "cpu"],
                            tiny_world, monkeypatch)
    printed = capsys.readouterr().out
    assert status == 0
    assert "2x2 (64x64 input" in printed and "one colour scale" in printed  # the checkpoint's test size 64
    peaks = re.findall(r"at x=(\d+), y=(\d+) of 80x40, score -?\d\.\d{3}", printed)
    assert len(peaks) == 2 and all(int(x) < 80 and int(y) < 40 for x, y in peaks)
    assert "unknown words: qzxv" in printed
    with Image.open(out) as png:
        assert png.size == figure_size(80, 40, 2) and png.mode == "RGB"


def test_localize_help_does_not_import_torch():
    code = "import sys, localize\ntry:\n    localize.main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]"


def requirement_lines() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_package_requirements_match_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert sorted(declared) == sorted(requirement_lines())


def test_every_top_level_command_has_a_console_script_that_runs_it(monkeypatch):
    """Each installed module but hubconf is a top-level script with its ``dsve-*`` command, and that command's
    function in misc.commands runs the script of its own name."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts, modules = pyproject["project"]["scripts"], pyproject["tool"]["setuptools"]["py-modules"]
    targets = [target.split(":") for target in scripts.values()]
    assert all(name.startswith("dsve-") for name in scripts) and {module for module, _ in targets} == {"misc.commands"}
    assert sorted(function for _, function in targets) == sorted(modules)
    assert sorted(modules) == sorted(path.stem for path in ROOT.glob("*.py") if path.stem != "hubconf")
    ran = []
    monkeypatch.setattr(commands, "run_script", ran.append)
    for _, function in targets:
        getattr(commands, function)()
    assert ran == [function for _, function in targets]


@pytest.mark.slow
def test_wheel_holds_the_packages_scripts_and_commands(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {"misc/inference.py", "misc/commands.py", "misc/data/words.py", "misc/store/source.py", "models/joint.py",
            "localize.py", "train.py", "checkpoint.py", "photo_world.py"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in ("dsve-train", "dsve-localize", "dsve-eval-retrieval", "dsve-pointing-game", "dsve-search",
                    "dsve-checkpoint", "dsve-photo-world"):
        assert f"{command} = misc.commands:" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch==2.14.1" in metadata
