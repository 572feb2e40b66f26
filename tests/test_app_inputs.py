"""What a person may upload to the web page (issue 27): huge photos decoded at a reduced size within bounded
memory, CMYK, 16-bit, animated and rotated images shown as they look, anything else one line; the page's tests in a
browser are in tests/test_app.py."""
from __future__ import annotations

import resource
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from misc.errors import UserError
from misc.webapp import DISPLAY_SIDE, display_image

HUGE = "from PIL import Image; Image.new('RGB', (10000, 10000), (200, 40, 40)).save({!r}, quality=60)"


def png_bomb(side: int = 20000) -> bytes:
    """A PNG that says it is side x side RGB pixels (1.2 GB decoded at 20000): a header, a little data and its end,
    which PIL opens, then refuses as a decompression bomb before decoding anything."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8 bits, RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def test_a_huge_jpeg_is_decoded_small_and_its_peaks_scale_back(tmp_path):
    path = tmp_path / "huge.jpg"
    subprocess.run([sys.executable, "-c", HUGE.format(str(path))], check=True)  # 300 MB, but not in this process
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes
    picture, scale = display_image(path)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert picture.size == (DISPLAY_SIDE, DISPLAY_SIDE) and scale == pytest.approx(10000 / DISPLAY_SIDE)
    assert grown < 100_000  # < 100 MB at the peak: 1/8 scale is 1250 x 1250 x 3 bytes, the full photo 300 MB
    assert picture.getpixel((500, 500)) == pytest.approx((200, 40, 40), abs=3)


def test_cmyk_sixteen_bit_animated_and_rotated_images_are_shown_as_they_look(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # full magenta and yellow: red
    cmyk, _ = display_image(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((20, 15)) == pytest.approx((255, 0, 0), abs=8)
    Image.fromarray(np.full((30, 40), 51400, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 51400 / 257 = 200
    grey, _ = display_image(tmp_path / "grey16.png")
    assert grey.getpixel((20, 15)) == (200, 200, 200)
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "blink.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first, _ = display_image(tmp_path / "blink.gif")
    assert first.getpixel((20, 15)) == (0, 0, 255)  # the first frame
    exif = Image.Exif()
    exif[274] = 6  # turned 90 degrees: shown 30 wide and 40 high, peaks scaled by the shown width
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "turned.jpg", exif=exif)
    turned, scale = display_image(tmp_path / "turned.jpg")
    assert turned.size == (30, 40) and scale == 1.0


def test_a_file_that_is_not_an_image_is_one_line(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(UserError) as error:
        display_image(tmp_path / "notes.jpg")
    assert str(error.value).startswith(f"{tmp_path / 'notes.jpg'}: cannot read it as an image (")
    assert "\n" not in str(error.value)


def test_a_decompression_bomb_is_one_line_before_anything_is_decoded(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes
    with pytest.raises(UserError) as error:
        display_image(tmp_path / "bomb.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # never the 1.2 GB of pixels
    assert str(error.value).startswith(f"{tmp_path / 'bomb.png'}: cannot read it as an image (DecompressionBombError: ")
    assert "\n" not in str(error.value)
