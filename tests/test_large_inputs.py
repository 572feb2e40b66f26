"""Large inputs within bounded memory (issue 27): a JPEG larger than needed decoded at a reduced DCT scale (close to
the full decode resized, in a fraction of the memory), and the pointing game's rows counted and written as they
pass (misc/eval/tally.py, misc/store/results.py) instead of held; bench/bench_large.py measures both at scale."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from misc.data.images import decode_image
from misc.eval.pointing import play
from misc.eval.tally import Tally
from misc.store.results import spooled, write_record
from tests.conftest import ROOT

# A 12000 x 12000 JPEG (432 MB as RGB pixels) and the peak RSS of a process that decodes it for a 400 x 400 input.
HUGE = ("from PIL import Image; side = 12000; small = Image.linear_gradient('L').resize((side, side)); "
        "Image.merge('RGB', (small, small.transpose(Image.Transpose.ROTATE_90), small)).save({path!r}, quality=85)")
DECODE = ("import resource, sys; sys.path.insert(0, {root!r}); from misc.data.images import decode_image; "
          "image = decode_image({path!r}, 400); print(image.size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
# A process's ru_maxrss starts at its parent's peak (Linux keeps the peak of the memory an exec replaces), so the
# decoding process is started by a small Python of its own, not by this test's (torch loaded) process.
LAUNCH = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"


def photo(path, width: int = 1600, height: int = 1200) -> None:
    """A photo-like JPEG: a colour gradient with a dozen filled ellipses (edges that a DCT scale could blur)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    image = Image.fromarray((ramp * np.array([200, 120, 60])).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width - 200), rng.integers(0, height - 200)
        draw.ellipse([int(x), int(y), int(x + rng.integers(60, 300)), int(y + rng.integers(60, 300))],
                     fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image.save(path, quality=90)


@pytest.mark.parametrize("size, scale", [(300, 4), (400, 2), (150, 8)])
def test_a_draft_decode_is_the_smallest_dct_scale_still_large_enough_and_close_to_the_full_decode(tmp_path, size,
                                                                                                   scale):
    photo(tmp_path / "photo.jpg")
    draft, full = decode_image(tmp_path / "photo.jpg", size), decode_image(tmp_path / "photo.jpg")
    # 1600 x 1200 at 1/2, 1/4, 1/8: the smallest scale whose sides are both >= size
    assert full.size == (1600, 1200) and draft.size == (1600 // scale, 1200 // scale)
    shown = [np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)).astype(int) for image in (draft, full)]
    difference = np.abs(shown[0] - shown[1])
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 8  # of 255 levels, at the network's input


@pytest.mark.slow
def test_decoding_a_huge_jpeg_for_a_small_input_takes_a_fraction_of_its_pixels(tmp_path):
    path = tmp_path / "huge.jpg"
    subprocess.run([sys.executable, "-c", HUGE.format(path=str(path))], check=True)
    result = subprocess.run([sys.executable, "-c", LAUNCH, DECODE.format(root=str(ROOT), path=str(path))],
                            check=True, capture_output=True, text=True)
    size, peak_kib = result.stdout.rsplit(" ", 1)
    assert size == "(1500, 1500)"  # 1/8 of 12000: the smallest DCT scale still >= 400
    assert int(peak_kib) < 300 * 1024  # < 300 MB at the peak, the interpreter included; the pixels alone are 432 MB


def rows(count: int, seed: int = 0) -> list[dict]:
    """Pointing rows with random hits, centre hits and Flickr30K Entities types."""
    draw = random.Random(seed)
    return [{"image_id": draw.randrange(5), "phrase": f"p{i}", "hit": draw.random() < 0.4,
             "center_hit": draw.random() < 0.2, "types": draw.sample(["people", "animals", "scene"], draw.randrange(3)),
             "boxes": [[1.0, 2.0, 3.0, 4.0]]} for i in range(count)]


def test_the_tally_counts_what_the_rows_say():
    scored = rows(500)
    tally = Tally()
    for row in scored:
        tally.add(row)
    result = tally.metrics(images=5, skipped=7)
    assert result["accuracy"] == pytest.approx(100 * sum(r["hit"] for r in scored) / 500)
    assert result["center_baseline"] == pytest.approx(100 * sum(r["center_hit"] for r in scored) / 500)
    assert (result["phrases"], result["images"], result["skipped"]) == (500, 5, 7)
    for kind in ("people", "animals", "scene"):
        mine = [r for r in scored if kind in r["types"]]
        assert result["per_type"][kind] == {"phrases": len(mine),
                                            "accuracy": pytest.approx(100 * sum(r["hit"] for r in mine) / len(mine)),
                                            "center_baseline": pytest.approx(
                                                100 * sum(r["center_hit"] for r in mine) / len(mine))}


def test_rows_pass_through_a_spool_to_the_record_file_and_only_the_first_are_kept(tmp_path):
    scored = rows(300, seed=1)
    entry = {"tool": "pointing_game", "metrics": {"accuracy": 12.5}, "settings": {"grid": [3, 3]}}
    with spooled() as spool:
        tally, first = play(iter(scored), "original", spool, keep=4)
        write_record(tmp_path / "out.json", entry, {"per_phrase": spool.rows(), "skipped_phrases": []})
    assert first == scored[:4] and tally.phrases == 300
    assert json.loads((tmp_path / "out.json").read_text()) == {**entry, "per_phrase": scored, "skipped_phrases": []}
