"""The synthetic big index (tests/bigindex.py, conftest's ``big_home``): built through the store's
public API, consistent with itself, seeded, and shown by the app like any index. The app's speed
on 100,000 such images is measured by bench/app.py; here the same behaviour at a smaller scale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from atlasq.histogram import cell_images, histogram
from atlasq.store import IndexStore
from bigindex import SAMPLES_PER_IMAGE, make_placed_index
from conftest import BIG_IMAGES, SAMPLE_DATA

REPO = Path(__file__).resolve().parents[1]


def test_builder_uses_only_the_stores_public_api():
    source = (Path(__file__).parent / "bigindex.py").read_text()
    assert not re.search(r"\b(store|IndexStore)\._[a-z]", source)
    assert "store.commit(" in source and "store.write_placements(" in source


def test_big_index_counts_agree_with_its_placements(big_home):
    with IndexStore(big_home / "big") as store:
        assert store.count("images") == BIG_IMAGES and store.count("samples") == BIG_IMAGES * SAMPLES_PER_IMAGE
        assert store.meta()["synthetic"] is True and "app" in store.placed_atlases()
        for level in (10, 20):
            counts = store.cell_counts("app", level)
            totals = store.placement_totals("app", level)
            assert totals["activations"] == counts["activations"].sum() == BIG_IMAGES * SAMPLES_PER_IMAGE
            assert totals["images"] == BIG_IMAGES and counts["images"].max() <= BIG_IMAGES
    # Unevenly filled, as real data fill an atlas: the fullest cell holds many pages of images.
    result = histogram("app", "big", home=big_home, level=10, place=False)
    fullest = max(result.cells, key=lambda c: c.images)
    assert fullest.images > 10 * 12 and fullest.images > 3 * np.median([c.images for c in result.cells])


def test_builder_is_seeded(atlas_home, copy_home):
    home = copy_home(atlas_home)
    built = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_placed_index(home, name, "app", SAMPLE_DATA, images=300, seed=seed)
        with IndexStore(home / name) as store:
            samples = store.samples("mixed5a")
            built.append({"cells": {level: store.cell_counts("app", level) for level in (10, 20)},
                          "positions": np.stack([samples["y"], samples["x"]]),
                          "members": store.cell_members("app", 10, 0, 0) + store.image_placements("app", 7)})
    same = lambda x, y: all(np.array_equal(x["cells"][g][k], y["cells"][g][k]) for g in (10, 20) for k in x["cells"][g]) \
        and np.array_equal(x["positions"], y["positions"]) and x["members"] == y["members"]
    assert same(built[0], built[1]) and not same(built[0], built[2])
    assert built[0]["positions"].shape == (2, 300 * SAMPLES_PER_IMAGE)


def test_app_pages_through_the_fullest_cell_of_the_big_index(big_home, monkeypatch):
    result = histogram("app", "big", home=big_home, level=10, place=False)
    cell = max(result.cells, key=lambda c: c.images)
    monkeypatch.setenv("ATLASQ_HOME", str(big_home))
    monkeypatch.setattr(sys, "argv", ["app.py", "--atlas", "app", "--index", "big"])
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    at.multiselect(key="sel_cells").set_value([f"{cell.i},{cell.j}"]).run()
    assert not at.exception, at.exception
    text = " ".join([m.value for m in at.markdown] + [c.value for c in at.caption])
    assert f"**{cell.images:,} images** of big in cell {cell.i},{cell.j}" in text
    expected = [m.path for m in cell_images("app", "big", cell.i, cell.j, home=big_home, k=24).images]
    captions = [image.proto.imgs[0].caption for image in at.get("image") if image.proto.imgs[0].caption]
    assert captions == expected[:12]
    at.button(key="gallery_next").click().run()
    captions = [image.proto.imgs[0].caption for image in at.get("image") if image.proto.imgs[0].caption]
    assert captions == expected[12:24]
