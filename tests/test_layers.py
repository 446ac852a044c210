"""Every layer: one atlas per layer from one index, and one image's cells at every layer."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from atlasq.atlas import load_atlas
from atlasq.cli import app
from atlasq.layers import atlases_by_layer, image_layer_cells

LAYERS = ("mixed4c", "mixed5a")


@pytest.fixture(scope="module")
def sample_home(sample_home, copy_home):
    home = copy_home(sample_home)
    result = CliRunner().invoke(app, ["atlas", "build", "--index", "sample", "--name", "all", "--layers",
                                      ",".join(LAYERS), "--grids", "10", "--max-activations", "1200", "--no-icons",
                                      "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    return home


def test_one_atlas_per_layer_and_they_differ(sample_home):
    a, b = (load_atlas(f"all-{layer}", sample_home) for layer in LAYERS)
    assert (a.manifest["layer"], b.manifest["layer"]) == LAYERS
    assert a.activations().shape[1] != b.activations().shape[1] or \
        not np.array_equal(a.positions(), b.positions())
    assert list(atlases_by_layer("sample", sample_home)) == list(LAYERS)


def test_an_images_cells_are_found_at_every_layer(sample_home):
    atlases = atlases_by_layer("sample", sample_home)
    sources = set()
    for image_id in (1, 100, 300, 500):
        found = image_layer_cells("sample", image_id, home=sample_home, atlases=atlases)
        assert [f.layer for f in found] == list(LAYERS)
        for f in found:
            assert len(f.positions) == 4  # every sampled activation of the image
            assert f.cells, f"image {image_id} has no cell at {f.layer}"
            sources.add(f.source)
    # a subsampled reference: some activations are the atlas's own, the others are placed now
    assert {"reference", "placed now"} <= {part for s in sources for part in s.split(" + ")}


def test_placing_an_own_activation_finds_its_reference_cell(sample_home):
    from atlasq.histogram import ReferenceSearch, place_activations

    atlas = load_atlas("all-mixed5a", sample_home)
    kept = atlas.reference["kept_10"].to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(kept)[:50]
    placed = place_activations(ReferenceSearch(atlas), np.asarray(atlas.activations()[rows], np.float32))
    own = np.stack([atlas.reference["cell_10_i"].to_numpy()[rows], atlas.reference["cell_10_j"].to_numpy()[rows]], 1)
    assert (placed.cells[10] == own).mean() >= 0.9


def test_layers_view_runs_in_the_app(sample_home):
    def page(home):
        import atlasq.streamlit as aq

        drawn = aq.layers_view("sample", 100, home=home)
        import streamlit as st

        st.session_state["drawn"] = [(d.layer, sorted(d.cells)) for d in drawn]

    at = AppTest.from_function(page, kwargs={"home": sample_home}, default_timeout=120).run()
    assert not at.exception
    drawn = at.session_state["drawn"]
    assert [layer for layer, _ in drawn] == list(LAYERS) and all(cells for _, cells in drawn)
    text = " ".join(m.value for m in at.markdown)
    assert "mixed4c" in text and "mixed5a" in text and "cell " in text


def test_layers_must_exist_in_the_index(sample_home):
    result = CliRunner().invoke(app, ["atlas", "build", "--index", "sample", "--name", "x", "--layers", "mixed3a",
                                      "--home", str(sample_home), "--json"])
    assert result.exit_code != 0 and "mixed3a" in result.stdout
