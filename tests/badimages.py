"""Write a folder of awkward image files, good and bad, for decoder tests.

``write_bad_images(dir)`` creates one file per kind listed in :data:`KINDS`
and returns ``{relative path: should_decode}``.  It also writes two files that
are deliberately left out of that mapping because :func:`scan_images` must not
list them: :data:`HIDDEN_FILE` and :data:`NON_IMAGE_FILE`.

Pixel contents are simple and documented here so tests can check them:

* ``rgb``: 64x48, left half red, right half blue.
* ``la``: grey 100, left half fully transparent.
* ``p_transparent``: left half transparent index, right half red.
* ``rgba``: left half transparent black, right half opaque blue.
* ``cmyk``: pure red ink mix (C=0, M=255, Y=255, K=0).
* ``grey16``: 256x4, column x holds x * 257 (0..65535).
* ``exif_rotated``: stored 60x40, red 12x12 block at the stored top-left,
  EXIF orientation 6, so displayed 40x60 with the block at the top-right.
* ``gif_animated`` / ``webp_animated`` / ``tiff``: frame 1 red, frame 2 green.
* ``bilevel``: 16x16 checkerboard of 4x4 cells, black at the top-left.

:func:`damaged_image` encodes :func:`damage_source` (200x200) in one format and flips
:data:`DAMAGED_BYTES` bytes in the middle of the file, inside the pixel data: the file is
whole, its header intact, only the pixel stream is wrong.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
BOMB_SIDE = 12_000  # 144M pixels: above atlasq's 128M default, a few KB on disk
EXIF_ORIENTATION = 0x0112
HIDDEN_FILE = ".hidden.jpg"
NON_IMAGE_FILE = "notes.txt"

# kind -> (relative path, should_decode)
KINDS: dict[str, tuple[str, bool]] = {
    "rgb": ("rgb.jpg", True),
    "upper_suffix": ("UPPER.JPG", True),
    "unicode": ("café_日本.png", True),
    "odd_chars": ("with space #1 100%.png", True),
    "grey": ("sub/grey_L.png", True),
    "la": ("sub/nested/grey_alpha_LA.png", True),
    "p": ("palette_P.png", True),
    "p_transparent": ("palette_transparent.png", True),
    "rgba": ("rgba.png", True),
    "cmyk": ("cmyk.jpg", True),
    "grey16": ("grey16.png", True),
    "exif_rotated": ("exif_rotated.jpg", True),
    "bmp": ("bitmap.bmp", True),
    "gif_animated": ("animated.gif", True),
    "webp_animated": ("animated.webp", True),
    "tiff": ("two_pages.tiff", True),
    "bilevel": ("bilevel_1.png", True),
    "empty": ("bad/empty.jpg", False),
    "text": ("bad/text.png", False),
    "truncated_jpeg": ("bad/truncated.jpg", False),
    "truncated_png": ("bad/truncated.png", False),
    "bomb": ("bad/bomb.png", False),
    "directory": ("folder.jpg", False),
}


def write_bad_images(dir: Path) -> dict[str, bool]:
    """Write every kind in :data:`KINDS` under ``dir``.

    Returns
    -------
    dict of str to bool
        Relative POSIX path -> whether :func:`atlasq.images.open_rgb` should
        decode it.
    """
    dir = Path(dir)
    for kind, (relative, _) in KINDS.items():
        target = dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _WRITERS[kind](target)
    (dir / HIDDEN_FILE).write_bytes(_encode(_halves(RED, BLUE), "JPEG"))
    (dir / NON_IMAGE_FILE).write_text("not an image\n", encoding="utf-8")
    return {relative: ok for relative, ok in KINDS.values()}


DAMAGED_BYTES = 64


def damage_source() -> Image.Image:
    """200x200 RGB: a colour gradient with a little seeded noise (so no encoder finds it trivial)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:200, 0:200]
    ramp = np.stack([xx, yy, (xx + yy) // 2], -1)
    return Image.fromarray((ramp + rng.integers(0, 30, ramp.shape)).astype(np.uint8))


def damaged_image(fmt: str, **options) -> bytes:
    """:func:`damage_source` encoded as ``fmt`` with DAMAGED_BYTES bytes inverted mid-file."""
    data = bytearray(_encode(damage_source(), fmt, **options))
    middle = len(data) // 2
    for i in range(middle, middle + DAMAGED_BYTES):
        data[i] ^= 0xFF
    return bytes(data)


def jpeg_with_marker_in_scan() -> bytes:
    """:func:`damage_source` as a JPEG whose entropy-coded data holds a stray start-of-image
    marker mid-file (two bytes overwritten)."""
    data = bytearray(_encode(damage_source(), "JPEG"))
    middle = len(data) // 2
    assert middle > data.index(b"\xff\xda"), "the middle must lie in the scan data"
    data[middle:middle + 2] = b"\xff\xd8"
    return bytes(data)


def without_root_privileges() -> list[str]:
    """A command prefix under which even root obeys file modes, so a ``chmod 0`` folder is really
    unreadable (root's CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped); empty when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        import pytest

        pytest.skip("running as root without setpriv (util-linux): cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def path_of(dir: Path, kind: str) -> Path:
    """Absolute path of ``kind`` inside a folder made by write_bad_images."""
    return Path(dir) / KINDS[kind][0]


def write_png_bomb(path: Path, side: int) -> None:
    """Write an all-black ``side`` x ``side`` 1-bit PNG without building it in memory."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grey
    raw_size = side * (1 + (side + 7) // 8)  # per row: filter byte + packed bits
    compressor = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    parts = []
    for start in range(0, raw_size, len(zeros)):
        parts.append(compressor.compress(zeros[: min(len(zeros), raw_size - start)]))
    parts.append(compressor.flush())
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b""))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _halves(left, right, size=(64, 48), mode="RGB") -> Image.Image:
    """Image whose left half is ``left`` and right half is ``right``."""
    im = Image.new(mode, size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    return im


def _noise(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _encode(im: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _palette_halves(transparent: bool) -> Image.Image:
    im = Image.new("P", (32, 16), 1)
    im.putpalette([0, 0, 0, *RED, *GREEN] + [0] * (256 - 3) * 3)
    im.paste(0 if transparent else 2, (0, 0, 16, 16))
    return im


def _exif_rotated(path: Path) -> None:
    im = Image.new("RGB", (60, 40), BLUE)
    im.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    im.save(path, "JPEG", quality=95, exif=exif)


def _two_frames(path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), GREEN)]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100)


def _checkerboard() -> Image.Image:
    cells = (np.indices((16, 16)) // 4).sum(axis=0) % 2 == 1
    return Image.fromarray(cells).convert("1")


def _grey16() -> Image.Image:
    ramp = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(4, axis=0)
    return Image.fromarray(ramp)


_WRITERS = {
    "rgb": lambda p: _halves(RED, BLUE).save(p, "JPEG", quality=95),
    "upper_suffix": lambda p: Image.new("RGB", (32, 32), GREEN).save(p, "JPEG"),
    "unicode": lambda p: Image.new("RGB", (20, 10), BLUE).save(p, "PNG"),
    "odd_chars": lambda p: Image.new("RGB", (10, 20), RED).save(p, "PNG"),
    "grey": lambda p: Image.linear_gradient("L").resize((32, 16)).save(p, "PNG"),
    "la": lambda p: _halves((100, 0), (100, 255), mode="LA").save(p, "PNG"),
    "p": lambda p: _palette_halves(transparent=False).save(p, "PNG"),
    "p_transparent": lambda p: _palette_halves(transparent=True).save(p, "PNG", transparency=0),
    "rgba": lambda p: _halves((0, 0, 0, 0), (*BLUE, 255), mode="RGBA").save(p, "PNG"),
    "cmyk": lambda p: Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, "JPEG", quality=95),
    "grey16": lambda p: _grey16().save(p, "PNG"),
    "exif_rotated": _exif_rotated,
    "bmp": lambda p: _halves(RED, BLUE, size=(24, 16)).save(p, "BMP"),
    "gif_animated": lambda p: _two_frames(p, "GIF"),
    "webp_animated": lambda p: _two_frames(p, "WEBP"),
    "tiff": lambda p: _two_frames(p, "TIFF"),
    "bilevel": lambda p: _checkerboard().save(p, "PNG"),
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("hello, I am not a PNG\n", encoding="utf-8"),
    "truncated_jpeg": lambda p: p.write_bytes(_first_half(_encode(_noise(), "JPEG"))),
    "truncated_png": lambda p: p.write_bytes(_first_half(_encode(_noise(), "PNG"))),
    "bomb": lambda p: write_png_bomb(p, BOMB_SIDE),
    "directory": lambda p: p.mkdir(),
}
