"""Tests for the synthetic sample-collection generator, atlasq.sampledata."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlasq import sampledata
from atlasq.sampledata import CLASSES, draw, draw_novel, generate

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"
NAME_RE = re.compile(r"^(?P<cls>[a-z_]+)_(?P<idx>\d{3})\.(?P<ext>jpg|png|webp)$")
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_collection(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("sample")
    return out, generate(out, per_class=4, seed=0)


def test_classes_are_many_unique_snake_case():
    assert len(CLASSES) >= 10
    assert len(set(CLASSES)) == len(CLASSES)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in CLASSES)


@pytest.mark.parametrize("name", CLASSES)
def test_every_class_draws_a_varied_rgb_image(name):
    img = draw(name, np.random.default_rng(1), (150, 90))
    assert img.mode == "RGB" and img.size == (150, 90)
    pixels = np.asarray(img, dtype=np.float32)
    assert pixels.std() > 10, "image should not be (nearly) constant"


def test_draw_is_a_function_of_the_rng_state():
    a = draw("green_stars", np.random.default_rng(7), (120, 200))
    b = draw("green_stars", np.random.default_rng(7), (120, 200))
    c = draw("green_stars", np.random.default_rng(8), (120, 200))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_draw_rejects_unknown_class():
    with pytest.raises(ValueError):
        draw("purple_unicorns", np.random.default_rng(0), (64, 64))


def test_draw_novel_is_rgb_and_colourful():
    img = draw_novel(np.random.default_rng(3), (96, 64))
    assert img.mode == "RGB" and img.size == (96, 64)
    assert np.asarray(img, dtype=np.float32).std(axis=(0, 1)).min() > 20


def test_generate_is_byte_for_byte_deterministic(tmp_path, small_collection):
    _, first = small_collection
    second = generate(tmp_path, per_class=4, seed=0)
    assert [p.name for p in first] == [p.name for p in second]
    assert [_sha256(p) for p in first] == [_sha256(p) for p in second]


def test_images_do_not_depend_on_generation_order(tmp_path, small_collection):
    out, _ = small_collection
    subset = ("grid_lines", "red_discs")
    for path in generate(tmp_path, per_class=2, seed=0, classes=subset):
        assert _sha256(path) == _sha256(out / path.parent.name / path.name)


def test_other_seed_gives_other_images(tmp_path, small_collection):
    out, _ = small_collection
    other = generate(tmp_path, per_class=1, seed=1, classes=("stripes",))[0]
    assert _sha256(other) != _sha256(out / "stripes" / other.name)


def test_layout_formats_and_sizes(small_collection):
    out, paths = small_collection
    assert paths == sorted(paths) and len(paths) == 4 * len(CLASSES)
    formats, sizes = Counter(), set()
    for path in paths:
        match = NAME_RE.match(path.name)
        assert match and match["cls"] == path.parent.name and path.parent.parent == out
        with Image.open(path) as img:
            assert img.format == PIL_FORMAT[match["ext"]]
            assert img.mode == "RGB"
            w, h = img.size
        assert 64 <= min(w, h) and max(w, h) <= 320 and 0.5 <= w / h <= 2.0
        formats[match["ext"]] += 1
        sizes.add((w, h))
    assert formats == {"jpg": len(paths) // 2, "png": len(paths) // 4, "webp": len(paths) // 4}
    assert len(sizes) > len(paths) // 2


def test_main_writes_collection(tmp_path, capsys):
    sampledata.main(["--out", str(tmp_path), "--per-class", "1", "--seed", "0"])
    assert len(list(tmp_path.rglob("*_000.*"))) == len(CLASSES)
    assert "wrote" in capsys.readouterr().out


def test_committed_sample_data_matches_generator(small_collection):
    """The committed folder is what `python -m atlasq.sampledata --out sample_data` writes.

    Compares decoded pixels (within a small tolerance), not bytes, so another build of the
    JPEG/WebP/PNG encoders does not count as drift while a change to the drawing code does.
    """
    out, paths = small_collection
    for name in CLASSES:
        assert len(list((SAMPLE_DIR / name).iterdir())) >= 48, name
    for path in paths:
        committed = SAMPLE_DIR / path.parent.name / path.name
        assert committed.is_file(), committed
        with Image.open(committed) as a, Image.open(path) as b:
            pixels_a = np.asarray(a.convert("RGB"), dtype=np.float32)
            pixels_b = np.asarray(b.convert("RGB"), dtype=np.float32)
        assert pixels_a.shape == pixels_b.shape, f"{committed} drifted from generate()"
        assert np.abs(pixels_a - pixels_b).mean() < 2.0, f"{committed} drifted from generate()"
