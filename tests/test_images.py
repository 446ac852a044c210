"""Tests for atlasq.images: scanning, robust decoding and hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from atlasq import images
from atlasq.errors import InvalidOptionError, NotFoundError
from atlasq.home import mark_home
from atlasq.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    FileEntry,
    ImageDecodeError,
    content_hash,
    display_path,
    key_to_name,
    open_rgb,
    path_key,
    real_path,
    scan_folder,
    scan_images,
)
from badimages import (
    BOMB_SIDE,
    HIDDEN_FILE,
    KINDS,
    NON_IMAGE_FILE,
    damage_source,
    damaged_image,
    jpeg_with_marker_in_scan,
    path_of,
    without_root_privileges,
    write_bad_images,
    write_png_bomb,
)

GOOD_KINDS = [kind for kind, (_, ok) in KINDS.items() if ok]
BAD_KINDS = [kind for kind, (_, ok) in KINDS.items() if not ok]
WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    write_bad_images(root)
    return root


def pixel(im: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(im)[xy[1], xy[0]].astype(int)


def assert_close(actual, expected, tol: int = 12) -> None:
    assert np.abs(np.asarray(actual, int) - np.asarray(expected, int)).max() <= tol, (actual, expected)


# --- fixtures really exercise the modes they claim ---------------------------------

SOURCE_MODES = {
    "rgb": "RGB", "upper_suffix": "RGB", "grey": "L", "la": "LA", "p": "P",
    "p_transparent": "P", "rgba": "RGBA", "cmyk": "CMYK", "grey16": "I;16",
    "exif_rotated": "RGB", "bmp": "RGB", "gif_animated": "P", "bilevel": "1",
}


@pytest.mark.parametrize("kind", sorted(SOURCE_MODES))
def test_fixture_source_mode(bad_dir, kind):
    with Image.open(path_of(bad_dir, kind)) as im:
        assert im.mode == SOURCE_MODES[kind]
        if kind == "p_transparent":
            assert "transparency" in im.info


@pytest.mark.parametrize("kind", ["gif_animated", "webp_animated", "tiff"])
def test_fixture_is_multi_frame(bad_dir, kind):
    with Image.open(path_of(bad_dir, kind)) as im:
        assert im.n_frames == 2


def test_write_bad_images_mapping(tmp_path):
    mapping = write_bad_images(tmp_path)
    assert mapping == {path: ok for path, ok in KINDS.values()}
    for relative in mapping:
        assert (tmp_path / relative).exists()
    assert (tmp_path / HIDDEN_FILE).is_file() and (tmp_path / NON_IMAGE_FILE).is_file()


# --- good files ---------------------------------------------------------------------

EXPECTED_SIZES = {
    "rgb": (64, 48), "upper_suffix": (32, 32), "unicode": (20, 10), "odd_chars": (10, 20),
    "grey": (32, 16), "la": (64, 48), "p": (32, 16), "p_transparent": (32, 16),
    "rgba": (64, 48), "cmyk": (32, 32), "grey16": (256, 4), "exif_rotated": (40, 60),
    "bmp": (24, 16), "gif_animated": (16, 16), "webp_animated": (16, 16), "tiff": (16, 16),
    "bilevel": (16, 16),
}


@pytest.mark.parametrize("kind", GOOD_KINDS)
def test_good_kinds_decode_to_loaded_rgb(bad_dir, kind):
    im = open_rgb(path_of(bad_dir, kind))
    assert im.mode == "RGB"
    assert im.size == EXPECTED_SIZES[kind]
    assert getattr(im, "fp", None) is None  # fully loaded, file released
    assert len(im.tobytes()) == im.width * im.height * 3


@pytest.mark.parametrize(
    ("kind", "left", "right"),
    [
        ("rgb", RED, BLUE),
        ("la", WHITE, (100, 100, 100)),  # transparent half composited on white
        ("p", GREEN, RED),
        ("p_transparent", WHITE, RED),
        ("rgba", WHITE, BLUE),
        ("bmp", RED, BLUE),
    ],
)
def test_left_and_right_halves(bad_dir, kind, left, right):
    im = open_rgb(path_of(bad_dir, kind))
    y = im.height // 2
    assert_close(pixel(im, (2, y)), left)
    assert_close(pixel(im, (im.width - 3, y)), right)


def test_partial_alpha_blends_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    assert_close(pixel(open_rgb(path), (1, 1)), (127, 127, 127), tol=1)


def test_rgb_with_colour_key_transparency(tmp_path):
    path = tmp_path / "key.png"
    im = Image.new("RGB", (8, 4), RED)
    im.paste(BLUE, (0, 0, 4, 4))
    im.save(path, transparency=BLUE)
    out = open_rgb(path)
    assert tuple(pixel(out, (1, 1))) == WHITE and tuple(pixel(out, (6, 1))) == RED


def test_cmyk_colour_roughly_right(bad_dir):
    assert_close(pixel(open_rgb(path_of(bad_dir, "cmyk")), (16, 16)), RED, tol=30)


def test_grey_l_is_replicated(bad_dir):
    path = path_of(bad_dir, "grey")
    out = np.asarray(open_rgb(path))
    source = np.asarray(Image.open(path))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], source)


def test_sixteen_bit_grey_is_scaled_not_clipped(bad_dir):
    out = np.asarray(open_rgb(path_of(bad_dir, "grey16")))
    expected = np.arange(256)[None, :].repeat(4, axis=0)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)


def _write_tiff(path: Path, values: np.ndarray, mode: str) -> None:
    # uint16 big-endian -> I;16B, int32 -> I, float32 -> F
    array = values.astype(">u2") if mode == "I;16B" else values
    Image.fromarray(array).save(path)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", np.array([[0, 257, 32896, 65535]], np.uint16), [0, 1, 128, 255]),
        ("I", np.array([[0, 257, 32896, 65535]], np.int32), [0, 1, 128, 255]),
        ("I", np.array([[-5, 70000, 514, 65535]], np.int32), [0, 255, 2, 255]),
        ("F", np.array([[0.0, 0.5, 1.0, 0.25]], np.float32), [0, 128, 255, 64]),
        ("F", np.array([[-3.0, 10.0, 300.0, np.nan]], np.float32), [0, 10, 255, 0]),
    ],
)
def test_wide_grey_modes(tmp_path, mode, values, expected):
    path = tmp_path / "wide.tif"
    _write_tiff(path, values, mode)
    with Image.open(path) as source:
        assert source.mode == mode
    out = np.asarray(open_rgb(path))
    np.testing.assert_array_equal(out[0, :, 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_exif_rotation_swaps_size_and_moves_marked_corner(bad_dir):
    im = open_rgb(path_of(bad_dir, "exif_rotated"))
    assert im.size == (40, 60)  # stored as 60x40 with orientation 6
    assert_close(pixel(im, (34, 5)), RED, tol=30)  # stored top-left -> top-right
    assert_close(pixel(im, (5, 5)), BLUE, tol=30)
    assert_close(pixel(im, (34, 54)), BLUE, tol=30)


@pytest.mark.parametrize("kind", ["gif_animated", "webp_animated", "tiff"])
def test_multi_frame_gives_first_frame(bad_dir, kind):
    assert_close(pixel(open_rgb(path_of(bad_dir, kind)), (8, 8)), RED, tol=8)


def test_bilevel_checkerboard(bad_dir):
    out = np.asarray(open_rgb(path_of(bad_dir, "bilevel")))[..., 0]
    expected = np.where((np.indices((16, 16)) // 4).sum(axis=0) % 2 == 1, 255, 0)
    np.testing.assert_array_equal(out, expected)


def test_ycbcr_mode(tmp_path):
    path = tmp_path / "ycc.jpg"
    Image.new("RGB", (16, 16), RED).convert("YCbCr").save(path, quality=95)
    assert_close(pixel(open_rgb(path), (8, 8)), RED, tol=8)


# --- bad files ----------------------------------------------------------------------

REASON_PREFIX = {
    "empty": "empty file",
    "text": "not an image",
    "truncated_jpeg": "truncated file",
    "truncated_png": "truncated file",
    "bomb": f"decompression bomb: {BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE ** 2} pixels > limit",
    "directory": "not a regular file",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_kinds_raise_with_reason(bad_dir, kind):
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(path_of(bad_dir, kind))
    assert info.value.reason.startswith(REASON_PREFIX[kind])
    assert str(info.value) == info.value.reason


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="unreadable: FileNotFoundError"):
        open_rgb(tmp_path / "truncated_but_missing.jpg")


@pytest.mark.parametrize("pil_limit", ["default", None])
def test_bomb_refused_from_header_without_warnings(bad_dir, monkeypatch, pil_limit):
    # 144M pixels: PIL's default only *warns* (> 89M); our own check must refuse it,
    # also when PIL's limit is switched off, and PIL's warning must not leak.
    if pil_limit is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with warnings.catch_warnings(record=True) as caught:
        images.quiet_pil_warnings()  # pytest drops filters installed while collecting
        with pytest.raises(ImageDecodeError) as info:
            open_rgb(path_of(bad_dir, "bomb"))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert info.value.reason == (
        f"decompression bomb: 12000x12000 = 144000000 pixels > limit {DEFAULT_MAX_PIXELS}"
    )
    with pytest.raises(ImageDecodeError, match="> limit 1000000$"):
        open_rgb(path_of(bad_dir, "bomb"), max_pixels=1_000_000)


def test_pil_bomb_error_is_wrapped(tmp_path):
    path = tmp_path / "huge.png"
    write_png_bomb(path, 20_000)  # 400M pixels: over PIL's own hard limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="^decompression bomb: "):
            open_rgb(path, max_pixels=10**9)


def test_max_pixels_boundary(bad_dir):
    assert open_rgb(path_of(bad_dir, "rgb"), max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageDecodeError, match="^decompression bomb: 64x48 = 3072"):
        open_rgb(path_of(bad_dir, "rgb"), max_pixels=64 * 48 - 1)


def test_pil_globals_untouched(bad_dir):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for kind in KINDS:
        try:
            open_rgb(path_of(bad_dir, kind))
        except ImageDecodeError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


# --- min_side / draft ---------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.linear_gradient("L").resize((2400, 1600)).convert("RGB").save(path, quality=80)
    return path


@pytest.mark.parametrize(
    ("min_side", "expected"),
    [
        (None, (2400, 1600)),
        (1, (300, 200)),
        (200, (300, 200)),
        (201, (600, 400)),
        (400, (600, 400)),
        (401, (1200, 800)),
        (800, (1200, 800)),
        (801, (2400, 1600)),
        (5000, (2400, 1600)),
    ],
)
def test_min_side_draft(big_jpeg, min_side, expected):
    im = open_rgb(big_jpeg, min_side=min_side)
    assert im.mode == "RGB" and im.size == expected
    if min_side is not None:
        assert min(im.size) >= min(min_side, 1600)


def test_min_side_keeps_exif_rotation(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (1200, 800), BLUE).save(path, exif=exif)
    assert open_rgb(path, min_side=100).size == (100, 150)


def test_min_side_ignored_for_non_jpeg(bad_dir):
    assert open_rgb(path_of(bad_dir, "rgba"), min_side=4).size == (64, 48)


def test_min_side_must_be_positive(bad_dir):
    with pytest.raises(ValueError):
        open_rgb(path_of(bad_dir, "rgb"), min_side=0)


# --- scan_images --------------------------------------------------------------------


def test_scan_lists_exactly_the_image_files_sorted(bad_dir):
    entries = scan_images(bad_dir)
    paths = [entry.path for entry in entries]
    assert paths == sorted(paths)
    expected = {path for path, _ in KINDS.values() if (bad_dir / path).is_file()}
    assert set(paths) == expected
    assert HIDDEN_FILE not in paths and NON_IMAGE_FILE not in paths and "folder.jpg" not in paths
    assert {"café_日本.png", "with space #1 100%.png", "UPPER.JPG", "sub/nested/grey_alpha_LA.png"} <= set(paths)


def test_scan_entry_fields(bad_dir):
    for entry in scan_images(bad_dir):
        info = os.stat(bad_dir / entry.path)
        assert isinstance(entry, FileEntry)
        assert (entry.size, entry.mtime) == (info.st_size, info.st_mtime)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.size = 0


def test_scan_filters_hidden_dirs_symlinks_and_case(tmp_path):
    for name in ["a.PNG", "b.Tiff", "c.jpeg", "d.txt", "e.jpg.bak", ".f.png",
                 ".cache/g.jpg", "dir.jpg/h.webp", "x/y/z/i.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "x" / "loop")  # directory symlink loop
    os.symlink(tmp_path / "a.PNG", tmp_path / "link.png")  # file symlink
    paths = [entry.path for entry in scan_images(tmp_path)]
    assert paths == ["a.PNG", "b.Tiff", "c.jpeg", "dir.jpg/h.webp", "link.png", "x/y/z/i.gif"]


def test_scan_bad_root_is_a_user_error(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        scan_images(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(InvalidOptionError, match="not a folder"):
        scan_images(tmp_path / "file.jpg")


def test_scan_skips_atlasq_homes_and_index_folders_and_says_so(tmp_path):
    """A home inside the scanned folder (marked, or written before the marker: an index folder
    or atlases/*/manifest.json) is atlasq's own output, never the user's images."""
    def image(relative):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), RED).save(tmp_path / relative)
    image("photos/a.png")
    mark_home(tmp_path / "photos/indexes")
    image("photos/indexes/p/histograms/sample/level_10.png")
    image("photos/indexes/atlases/p/icons/0001.png")
    image("old_home/atlases/x/mosaic.png")
    (tmp_path / "old_home/atlases/x/manifest.json").write_text("{}")
    image("old_home/holiday.jpg")
    image("old_index/histograms/heat.png")
    (tmp_path / "old_index/index.duckdb").write_bytes(b"")
    image("atlases/not_a_home.png")  # a folder merely named like one is scanned
    scan = scan_folder(tmp_path)
    assert [e.path for e in scan.entries] == ["atlases/not_a_home.png", "photos/a.png"]
    assert scan.skipped_homes == ["old_home", "old_index", "photos/indexes"]
    assert scan.problems == []


def test_scan_reports_dangling_and_looping_symlinks(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    os.symlink(tmp_path / "gone", tmp_path / "notes.txt")  # not an image name: not our business
    scan = scan_folder(tmp_path)
    assert [e.path for e in scan.entries] == ["a.png"]
    reasons = {p.path: p.reason for p in scan.problems}
    assert set(reasons) == {"dangling.png", "loop.jpg"}
    assert reasons["dangling.png"].startswith("dangling symlink")
    assert reasons["loop.jpg"].startswith("broken symlink")


def test_scan_reports_unreadable_folders(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    (tmp_path / "locked" / "inner").mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(tmp_path / "locked" / "b.png")
    (tmp_path / "locked").chmod(0)
    try:
        code = ("import json, sys; from atlasq.images import scan_folder; s = scan_folder(sys.argv[1]); "
                "print(json.dumps([[e.path for e in s.entries], [[p.path, p.reason] for p in s.problems]]))")
        out = subprocess.run([*without_root_privileges(), sys.executable, "-c", code, str(tmp_path)],
                             capture_output=True, text=True, check=True).stdout
    finally:
        (tmp_path / "locked").chmod(0o755)
    entries, problems = json.loads(out)
    assert entries == ["a.png"]
    assert problems == [["locked", "unreadable folder: Permission denied"]]


# --- stored paths -------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("plain/café_日本 100%.png", "plain/café_日本 100%.png"),     # stored as it is
    (os.fsdecode(b"latin1_\xe9t\xe9.jpg"), "latin1_\\xe9t\\xe9.jpg"),    # bytes that are not UTF-8
    ("two\nlines\t.png", "two\\x0alines\\x09.png"),                   # control characters
    ("back\\slash\\xe9.png", "back\\\\slash\\\\xe9.png"),                # the escape character itself
    ("nel\x85\u2028.png", "nel\\u0085\\u2028.png"),                 # C1 control, line separator
])
def test_path_key_is_lossless_one_line_text(tmp_path, name, key):
    assert path_key(name) == key
    assert key.encode("utf-8").decode("utf-8") == key and "\n" not in key
    assert key_to_name(key) == name
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"x")
    assert real_path(tmp_path, key).read_bytes() == b"x"
    assert display_path(key) == key  # a stored path prints as it is


def test_display_path_makes_any_path_one_printable_line():
    raw = os.fsdecode(b"dir/a\nb\r\xff\x1b[31m.png")
    shown = display_path(raw)
    assert shown == "dir/a\\x0ab\\x0d\\xff\\x1b[31m.png"
    assert shown.isprintable()
    assert display_path(os.fsencode(raw)) == shown
    assert display_path(Path("x") / "é\\y") == "x/é\\y"  # display only: backslashes stay


# --- damaged pixel data -----------------------------------------------------------
# Every format the scanner accepts, with DAMAGED_BYTES inverted in the middle of its pixel data.
# Decoders that check their stream report the damage, and the file must then be an error
# (before the fix, a damaged PNG decoded as a half image). Others conceal it: the README's
# `atlasq index` section says which, and the second test keeps that statement true.

REPORTED_DAMAGE = {
    "png": ("damaged.png", lambda: damaged_image("PNG")),
    "gif": ("damaged.gif", lambda: damaged_image("GIF")),
    "tif_lzw": ("damaged_lzw.tif", lambda: damaged_image("TIFF", compression="tiff_lzw")),
    "jpg_marker": ("stray_marker.jpg", jpeg_with_marker_in_scan),
}
CONCEALED_DAMAGE = {
    "jpg": ("damaged.jpg", "JPEG", {}),
    "webp": ("damaged.webp", "WEBP", {}),
    "webp_lossless": ("damaged_lossless.webp", "WEBP", {"lossless": True}),
    "bmp": ("damaged.bmp", "BMP", {}),
    "tif": ("damaged.tif", "TIFF", {}),
    "tif_deflate": ("damaged_deflate.tif", "TIFF", {"compression": "tiff_deflate"}),
}


def test_damage_covers_every_scanned_suffix():
    names = [n for n, _ in REPORTED_DAMAGE.values()] + [n for n, _, _ in CONCEALED_DAMAGE.values()]
    assert {os.path.splitext(n)[1] for n in names} == IMAGE_SUFFIXES - {".jpeg", ".tiff"}


@pytest.mark.parametrize("kind", sorted(REPORTED_DAMAGE))
def test_damage_the_decoder_reports_is_an_error(tmp_path, kind):
    name, make = REPORTED_DAMAGE[kind]
    (tmp_path / name).write_bytes(make())
    with pytest.raises(ImageDecodeError) as caught:
        open_rgb(tmp_path / name)
    assert caught.value.reason.startswith("unreadable: ")


@pytest.mark.parametrize("kind", sorted(CONCEALED_DAMAGE))
def test_damage_some_decoders_conceal_decodes_with_wrong_pixels(tmp_path, kind):
    """What the README says: these decoders report nothing, so the image is indexed as decoded."""
    name, fmt, options = CONCEALED_DAMAGE[kind]
    (tmp_path / name).write_bytes(damaged_image(fmt, **options))
    damaged = np.asarray(open_rgb(tmp_path / name), int)
    whole = tmp_path / ("whole" + os.path.splitext(name)[1])
    damage_source().save(whole, fmt, **options)
    intact = np.asarray(open_rgb(whole), int)
    assert damaged.shape == intact.shape == (200, 200, 3)
    assert np.abs(damaged - intact).max() > 0


def test_image_suffixes():
    assert IMAGE_SUFFIXES == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# --- content_hash -------------------------------------------------------------------


def test_content_hash(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 5 * (1 << 19) + 7, np.uint8).tobytes()
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(data)
    second.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    digest = content_hash(first)
    assert digest == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert len(digest) == 32 and digest == content_hash(first)
    assert content_hash(second) != digest
    (tmp_path / "empty").write_bytes(b"")
    assert content_hash(tmp_path / "empty") == hashlib.blake2b(b"", digest_size=16).hexdigest()
