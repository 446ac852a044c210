"""atlasq.heatmap on its own: a cell's value is a frame of its colour around an icon left as it
is; a zero count fades the icon (never mistaken for a few); NaN and unlisted cells are the mosaic
itself; the title, the row and column numbers and the legend's numbers are drawn in the picture
at a readable size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atlasq.atlas import load_atlas
from atlasq.heatmap import DIVERGING, SEQUENTIAL, ZERO_FADE, colour_ramp, draw_heatmap
from atlasq.histogram import Histogram, HistogramCell, Totals, histogram_picture


def _mosaic(side: int, seed: int = 0) -> Image.Image:
    """A textured mosaic (like icons): every pixel differs, so any tint shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(30, 225, (side, side, 3), dtype=np.uint8))


def _tile(picture: Image.Image, size: int, side: int, i: int, j: int) -> np.ndarray:
    origin = picture.info["grid_origin"]  # (x, y), or "x,y" as a written PNG records it
    left, top = (int(v) for v in origin.split(",")) if isinstance(origin, str) else origin
    tile = side // size
    return np.asarray(picture, np.float32)[top + i * tile:top + (i + 1) * tile, left + j * tile:left + (j + 1) * tile]


def _frame(tile: np.ndarray) -> np.ndarray:
    """The frame's pixels on the tile's top and left edges (the badge sits at the bottom right)."""
    return np.concatenate([tile[0, 1:-1], tile[1:-1, 0]])


def _interior(tile: np.ndarray, margin: int) -> np.ndarray:
    """Inside the frame, less the bottom-right quarter where the badge may be."""
    n = len(tile)
    return tile[margin:n // 2, margin:n - margin]


def test_values_frame_the_icons_which_stay_as_they_are_and_zero_fades():
    size, side = 4, 200  # 50-px tiles
    mosaic = _mosaic(side)
    original = np.asarray(mosaic, np.float32)
    cells = [(0, 0), (1, 2), (3, 3), (2, 1)]
    picture = draw_heatmap(mosaic, size, cells, np.array([0.0, 5.0, 10.0, np.nan]), title="counts")
    tile = lambda i, j: _tile(picture, size, side, i, j)
    mosaic_tile = lambda i, j: original[i * 50:(i + 1) * 50, j * 50:(j + 1) * 50]
    # Linear scale 0 … 10: 10 is the ramp's top, 5 its middle; the icon inside the frame is untouched.
    for (i, j), anchor in (((3, 3), SEQUENTIAL[-1]), ((1, 2), SEQUENTIAL[2])):
        np.testing.assert_allclose(_frame(tile(i, j)), np.broadcast_to(anchor, _frame(tile(i, j)).shape), atol=1.01)
        np.testing.assert_array_equal(_interior(tile(i, j), 6), _interior(mosaic_tile(i, j), 6))
    # Zero: the whole tile faded towards white, no frame; a few (5) is drawn differently.
    np.testing.assert_allclose(tile(0, 0), np.round(mosaic_tile(0, 0) * ZERO_FADE + 255 * (1 - ZERO_FADE)), atol=1.01)
    assert np.abs(tile(0, 0) - tile(1, 2)).mean() > 30
    # NaN and unlisted cells: the mosaic as it is.
    for i, j in [(2, 1), (0, 1), (3, 0)]:
        np.testing.assert_array_equal(tile(i, j), mosaic_tile(i, j))


def test_diverging_scale_is_symmetric_around_zero():
    size, side = 2, 100
    picture = draw_heatmap(_mosaic(side), size, [(0, 0), (0, 1), (1, 0)], np.array([-2.0, 0.0, 1.0]),
                           diverging=True)
    # Limits ±2: -2 → the blue end, 0 → the white middle, 1 → three quarters of the way to red.
    for (i, j), anchor in (((0, 0), DIVERGING[0]), ((0, 1), DIVERGING[2]), ((1, 0), DIVERGING[3])):
        frame = _frame(_tile(picture, size, side, i, j))
        np.testing.assert_allclose(frame, np.broadcast_to(anchor, frame.shape), atol=1.01)


def test_colour_ramp_interpolates_between_anchors():
    np.testing.assert_array_equal(colour_ramp(np.array([0.0, 1.0]), SEQUENTIAL), SEQUENTIAL[[0, -1]].astype(np.uint8))
    middle = colour_ramp(np.array([0.125]), SEQUENTIAL)[0]  # halfway between anchors 0 and 1
    np.testing.assert_allclose(middle, (SEQUENTIAL[0] + SEQUENTIAL[1]) / 2, atol=0.51)


def _runs(flags: np.ndarray, gap: int = 1) -> list[tuple[int, int]]:
    """[start, end) of runs of True, runs closer than ``gap`` merged."""
    runs: list[list[int]] = []
    for n in np.flatnonzero(flags):
        if runs and n - runs[-1][1] < gap:
            runs[-1][1] = n + 1
        else:
            runs.append([n, n + 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("size,side", [(10, 480), (20, 1920)])
def test_title_coordinates_and_legend_are_readable(size, side):
    title = "two on ref, level 10x10: 1,200 activations of 300 images, 12.5% off-atlas"
    picture = draw_heatmap(Image.new("RGB", (side, side), "white"), size, [(0, 0), (1, 1), (2, 2)],
                           np.array([0.0, 3.0, 1200.0]), log=True, title=title, legend_title="activations per cell")
    left, top = picture.info["grid_origin"]
    ink = np.asarray(picture.convert("L")) < 100
    # The title: one or more lines above the mosaic, each at least 12 px tall (at native size).
    title_lines = _runs(ink[:top].any(axis=1))[:-1]  # the last run above the mosaic: column numbers
    assert title_lines and all(b - a >= 12 for a, b in title_lines[:1])
    # Column numbers over every column (j) and row numbers beside every row (i): one label per cell.
    column_band = _runs(ink[:top].any(axis=1))[-1]
    columns = _runs(ink[column_band[0]:column_band[1], left:left + side].any(axis=0), gap=side // size // 3)
    rows = _runs(ink[top:top + side, :left - 2].any(axis=1), gap=side // size // 3)
    assert len(columns) == size and len(rows) == size
    # The legend under the mosaic: its title and numbers at both ends of the colour bar (1 and 1,200).
    below = ink[top + side + 2:]
    lines = _runs(below.any(axis=1), gap=3)
    assert len(lines) >= 2 and not ink[-1].any() and not ink[:, -1].any()  # nothing cut at the edges
    numbers = below[lines[-1][0]:lines[-1][1]]
    cols = np.flatnonzero(numbers.any(axis=0))
    bar = int((picture.size[0]) * 0.55)
    assert cols.min() < bar * 0.1 and cols.max() > bar * 0.85


def test_histogram_picture_frames_counts_and_fades_empty_cells(atlas_home, tmp_path):
    atlas = load_atlas("app", atlas_home)
    level = min(atlas.levels)
    kept = atlas.cells_at(level)
    cells = [HistogramCell(i=int(i), j=int(j), activations=n, images=n, share=0.0, top_label="", top_labels=[],
                           top_scores=[]) for i, j, n in zip(kept["i"][:3], kept["j"][:3], (0, 4, 40))]
    result = Histogram(atlas="app", index="x", level=level, totals=Totals(), cells=cells)
    out = histogram_picture(result, atlas, tmp_path / "h.png")
    picture = Image.open(out)
    picture.load()
    assert picture.mode == "RGB" and "grid_origin" in picture.info
    mosaic = np.asarray(Image.open(atlas.folder / f"mosaic_{level}.png").convert("RGB"), np.float32)
    side = mosaic.shape[0]
    tile = side // level
    for cell in cells:
        drawn = _tile(picture, level, side, cell.i, cell.j)
        own = mosaic[cell.i * tile:(cell.i + 1) * tile, cell.j * tile:(cell.j + 1) * tile]
        if cell.activations == 0:
            np.testing.assert_allclose(drawn, np.round(own * ZERO_FADE + 255 * (1 - ZERO_FADE)), atol=1.01)
        else:
            np.testing.assert_array_equal(_interior(drawn, tile // 8), _interior(own, tile // 8))
    # The fullest cell's frame carries the top of the ramp (log scale, its value is the largest).
    frame = _frame(_tile(picture, level, side, cells[2].i, cells[2].j))
    np.testing.assert_allclose(frame, np.broadcast_to(SEQUENTIAL[-1], frame.shape), atol=1.01)
