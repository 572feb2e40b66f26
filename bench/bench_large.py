"""Benchmark: large inputs within bounded memory (issue 27): a 20000 x 20000 JPEG through image_features_extraction.py
and a pointing game over 100k phrases, each command's peak resident memory printed.

Run from the repository root:  python bench/bench_large.py [--quick]

Every measured command runs in a process of its own (python -c running the command's main, then printing its own
peak RSS from resource.getrusage), started by a small launcher process so that it does not inherit this process's
peak; the inputs are written by separate processes first. The model is the demo model (runs/demo/best.pth.tar when
`make demo` made it, else the demo preset's network with random weights: the same computation, see bench_app.py).
- A big JPEG (smooth gradients, quality 90): extracted at 400 x 400 (misc/data/images.py decodes a JPEG larger
  than needed at the smallest DCT scale still >= 400, here 1/8: 2500 x 2500), beside the same command on one
  640 x 640 JPEG (what the model and the libraries cost alone) and a full decode of the big file by PIL.
- A JSON-lines world of 96 x 96 images with 500 regions each, the pointing game over all its phrases with
  --per-phrase --json at two sizes, 4 images (2000 phrases) a batch: the rows go to the output file as they are
  made (misc/eval/tally.py counts them), so the peak holds one batch's work and the phrases read (their text and
  boxes), not the rows.
--quick: a 6000 x 6000 JPEG and 4k / 12k phrases.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_app import checkpoint  # noqa: E402
from bench.common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Runs one command's main in this process, then prints the process's peak RSS (ru_maxrss: KiB on Linux).
MEASURED = ("import importlib, resource, sys; sys.path.insert(0, {root!r}); "
            "importlib.import_module({module!r}).main({argv!r}); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
BIG = ("from PIL import Image; side = {side}; small = Image.linear_gradient('L').resize((side, side)); "
       "Image.merge('RGB', (small, small.transpose(Image.Transpose.ROTATE_90), "
       "Image.radial_gradient('L').resize((side, side)))).save({path!r}, quality=90)")
FULL_DECODE = ("import resource, warnings; from PIL import Image; warnings.simplefilter('ignore'); "
               "Image.MAX_IMAGE_PIXELS = None; image = Image.open({path!r}); image.load(); "
               "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
COLOURS = ("red", "green", "blue")
SHAPES = ("square", "disc", "triangle")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")


# A process's ru_maxrss starts at its parent's peak (Linux keeps the peak of the memory an exec replaces), so each
# measured process is started by a small Python of its own, not by this one (torch loaded).
LAUNCH = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"


def measured(code: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -c code``, which prints ``peak_rss_kib N`` last."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCH, code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"failed: {result.stderr.strip()[-800:]}")
    kib = next(int(line.split()[1]) for line in reversed(result.stdout.splitlines())
               if line.startswith("peak_rss_kib"))
    return seconds, kib * 1024


def command(module: str, *argv: object) -> str:
    return MEASURED.format(root=str(ROOT), module=module, argv=[str(arg) for arg in argv])


def regions_world(folder: Path, phrases: int, per_image: int = 500) -> Path:
    """A JSON-lines test split of 96 x 96 PNGs, ``per_image`` regions each (phrases of the demo words, boxes drawn
    from a seeded generator), ``phrases`` in all."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for number in range(-(-phrases // per_image)):
        pixels = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number}.png")
        count = min(per_image, phrases - number * per_image)
        regions = [{"phrase": f"a {COLOURS[i % 3]} {SHAPES[i // 3 % 3]} {PLACES[i % 5]}",
                    "box": [int(x) for x in (*rng.integers(0, 60, 2), *rng.integers(8, 36, 2))]} for i in range(count)]
        lines.append(json.dumps({"image": f"{number}.png", "split": "test", "captions": ["a red square"],
                                 "regions": regions}))
    path = folder / f"world_{phrases}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def mib(size: int) -> str:
    return f"{size / 2**20:8.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 6000 x 6000 JPEG, 4k and 12k phrases")
    args = parser.parse_args()
    side, sizes = (6000, (4000, 12000)) if args.quick else (20000, (25000, 100000))
    print(machine())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = checkpoint(folder)
        (folder / "big").mkdir()
        (folder / "small").mkdir()
        big = folder / "big" / "big.jpg"
        subprocess.run([sys.executable, "-c", BIG.format(side=side, path=str(big))], check=True)
        subprocess.run([sys.executable, "-c", BIG.format(side=640, path=str(folder / "small" / "small.jpg"))],
                       check=True)
        print(f"\nimage_features_extraction.py at 400 x 400 (one image, --workers 0, CPU); the big JPEG is "
              f"{side} x {side}, {big.stat().st_size / 2**20:.1f} MiB on disk, {side * side * 3 / 2**20:.0f} MiB "
              f"as RGB pixels")
        print(f"{'input':<44}{'seconds':>9}{'peak RSS':>14}")
        for name, where in (("one 640 x 640 JPEG (the model alone)", "small"), (f"the {side} x {side} JPEG", "big")):
            seconds, peak = measured(command("image_features_extraction", "-p", model, "-d", folder / where, "-o",
                                             folder / f"{where}.npz", "--size", "400", "--workers", "0",
                                             "--no-progress", "--device", "cpu"))
            print(f"{name:<44}{seconds:9.1f}{mib(peak):>14}")
        seconds, peak = measured(FULL_DECODE.format(path=str(big)))
        print(f"{'its full decode by PIL (no draft, no model)':<44}{seconds:9.1f}{mib(peak):>14}")

        print("\npointing_game.py --per-phrase --json, 500 regions per 96 x 96 image, --size 96, --batch-size 4 (CPU)")
        print(f"{'phrases':>9}{'seconds':>9}{'peak RSS':>14}{'json file':>14}")
        for phrases in sizes:
            world, out = regions_world(folder, phrases), folder / f"pointing_{phrases}.json"
            seconds, peak = measured(command("pointing_game", "-p", model, "--dataset", world, "--split", "test",
                                             "--size", "96", "--batch-size", "4", "--per-phrase", "--json", out,
                                             "--workers", "0", "--no-progress", "--device", "cpu"))
            rows = len(json.loads(out.read_text())["per_phrase"])
            assert rows == phrases, f"{rows} rows for {phrases} phrases"
            print(f"{phrases:>9}{seconds:9.1f}{mib(peak):>14}{mib(out.stat().st_size):>14}")


if __name__ == "__main__":
    main()
