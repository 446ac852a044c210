"""The patch test on the demo network: a patch cut from a class-B exemplar flips class-A images to
B where a random-noise patch of the same size does not."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from atlasq.atlas import load_atlas
from atlasq.errors import AtlasqError
from atlasq.patch_test import CORNERS, paste, run_patch_test

A, B = "blue_triangles", "blue_rings"
SIZES = (0.3, 0.5)


def _b_cell(atlas) -> str:
    """The fullest cell of atlas ``app`` at 10×10 whose top label is B, as ATLAS:LEVEL:I,J."""
    cells = atlas.cells_at(10)
    rows = [r for r, labels in enumerate(cells["top_labels"]) if labels[0] == B]
    row = max(rows, key=lambda r: cells["count"][r])
    return f"app:10:{cells['i'][row]},{cells['j'][row]}"


@pytest.fixture(scope="module")
def report(atlas_home, tmp_path_factory):
    source = _b_cell(load_atlas("app", atlas_home))
    out = tmp_path_factory.mktemp("patch")
    return run_patch_test("sample", A, B, source, patch_kind="exemplar", sizes=SIZES, images=16, seed=0,
                          out=out, home=atlas_home)


def test_exemplar_patch_flips_more_than_noise(report):
    by = {(r["patch"], r["size"]): r for r in report.by_size}
    for size in SIZES:
        p, n = by[("patch", size)], by[("noise", size)]
        print(f"size {size}: patch flips {p['mean_rate']:.1%} (best corner {p['best_corner_rate']:.1%}), "
              f"noise {n['mean_rate']:.1%} (best corner {n['best_corner_rate']:.1%})")
    print(f"best corner and size: patch {report.best['patch']:.1%}, noise {report.best['noise']:.1%} "
          f"of {report.images} images")
    assert report.images == 16
    assert report.best["patch"] > report.best["noise"]
    assert report.mean_rate["patch"] > report.mean_rate["noise"]
    largest = SIZES[-1]
    assert by[("patch", largest)]["best_corner_rate"] >= 0.5
    # the patch takes probability from A: its mean drop exceeds the noise's at the largest size
    rows = {(r["patch"], r["size"], r["corner"]): r for r in report.rows}
    assert np.mean([rows[("patch", largest, c)]["mean_drop_from"] for c in CORNERS]) > \
        np.mean([rows[("noise", largest, c)]["mean_drop_from"] for c in CORNERS])


def test_report_files(report):
    saved = json.loads(open(report.files["json"]).read())
    assert saved["best"] == report.best and saved["from_class"] == A and saved["to_class"] == B
    with open(report.files["csv"]) as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * len(SIZES) * len(CORNERS)
    assert {r["corner"] for r in rows} == set(CORNERS)
    picture = Image.open(report.files["picture"])
    assert picture.width >= 3 * 128 and picture.height > 128


def test_same_seed_same_report(report, atlas_home, tmp_path):
    again = run_patch_test("sample", A, B, report.patch, patch_kind="exemplar", sizes=SIZES, images=16, seed=0,
                           out=tmp_path, home=atlas_home)
    assert again.rows == report.rows and again.best == report.best


def test_paste_puts_the_patch_flush_in_each_corner():
    view = np.zeros((10, 10, 3), np.uint8)
    white = Image.new("RGB", (7, 7), "white")
    for corner, (top, left) in zip(CORNERS, ((0, 0), (0, 6), (6, 0), (6, 6))):
        out = paste(view, white, 0.4, corner)
        assert out[..., 0].sum() == 16 * 255
        assert (out[top:top + 4, left:left + 4] == 255).all()
    assert view.sum() == 0  # the original is left as it was


def test_bad_sources_are_user_errors(atlas_home, tmp_path):
    for source in ("nothing-here.png", "app:10:99,99", "app:7:1,1"):
        with pytest.raises(AtlasqError):
            run_patch_test("sample", A, B, source, out=tmp_path, home=atlas_home)
    with pytest.raises(AtlasqError):
        run_patch_test("sample", A, B, "app:10:0,0", sizes=(1.5,), out=tmp_path, home=atlas_home)
