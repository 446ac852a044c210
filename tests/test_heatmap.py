"""atlasq.heatmap on its own: every coloured cell carries the colour of its value (blended as
documented over the faded mosaic), NaN cells and a histogram's empty cells stay uncoloured, and
the title and the colour bar's limits are drawn inside the picture, whole, in dark ink."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from atlasq.atlas import load_atlas
from atlasq.heatmap import DIVERGING, SEQUENTIAL, colour_ramp, draw_heatmap
from atlasq.histogram import Histogram, HistogramCell, Totals, histogram_picture

GREY = 200
OPACITY = 0.62  # draw_heatmap's default


def _mosaic(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), (GREY, GREY, GREY))


def _faded(value: float) -> float:
    return value * 0.55 + 255 * 0.45  # how draw_heatmap fades the mosaic under the colours


def _cell(picture: Image.Image, size: int, side: int, i: int, j: int) -> np.ndarray:
    """The pixels of cell (i, j), less a one-pixel rim (rounding of the cell borders)."""
    tile = side // size
    return np.asarray(picture, np.float32)[i * tile + 1:(i + 1) * tile - 1, j * tile + 1:(j + 1) * tile - 1]


def _expected(colour) -> np.ndarray:
    return _faded(GREY) * (1 - OPACITY) + np.asarray(colour, np.float32) * OPACITY


def test_cells_carry_the_colours_of_their_values_and_nan_cells_stay_uncoloured():
    size, side = 4, 160
    cells = [(0, 0), (1, 2), (3, 3), (2, 1)]
    values = np.array([0.0, 5.0, 10.0, np.nan])
    picture = draw_heatmap(_mosaic(side), size, cells, values, title="counts")
    assert picture.size[0] == side and picture.size[1] > side
    # Linear scale from 0 to the largest value: 0 → first anchor, 10 → last, 5 → the middle one.
    for (i, j), anchor in zip(cells[:3], (SEQUENTIAL[0], SEQUENTIAL[2], SEQUENTIAL[-1])):
        np.testing.assert_allclose(_cell(picture, size, side, i, j), np.broadcast_to(_expected(anchor), (38, 38, 3)),
                                   atol=1.01)
    # The NaN cell and every cell not listed show the faded mosaic only.
    for i, j in [(2, 1), (0, 1), (3, 0)]:
        np.testing.assert_allclose(_cell(picture, size, side, i, j), round(_faded(GREY)), atol=1.01)


def test_diverging_scale_is_symmetric_around_zero():
    size, side = 2, 100
    cells = [(0, 0), (0, 1), (1, 0)]
    picture = draw_heatmap(_mosaic(side), size, cells, np.array([-2.0, 0.0, 1.0]), diverging=True)
    # Limits ±2: -2 → the blue end, 0 → the white middle, 1 → three quarters of the way to red.
    np.testing.assert_allclose(_cell(picture, size, side, 0, 0).mean((0, 1)), _expected(DIVERGING[0]), atol=1.01)
    np.testing.assert_allclose(_cell(picture, size, side, 0, 1).mean((0, 1)), _expected(DIVERGING[2]), atol=1.01)
    np.testing.assert_allclose(_cell(picture, size, side, 1, 0).mean((0, 1)), _expected(DIVERGING[3]), atol=1.01)


def test_colour_ramp_interpolates_between_anchors():
    np.testing.assert_array_equal(colour_ramp(np.array([0.0, 1.0]), SEQUENTIAL), SEQUENTIAL[[0, -1]].astype(np.uint8))
    middle = colour_ramp(np.array([0.125]), SEQUENTIAL)[0]  # halfway between anchors 0 and 1
    np.testing.assert_allclose(middle, (SEQUENTIAL[0] + SEQUENTIAL[1]) / 2, atol=0.51)


def _ink_columns(region: np.ndarray) -> np.ndarray:
    return np.flatnonzero((region.min(axis=2) < 100).any(axis=0))


@pytest.mark.parametrize("side", [160, 480])
def test_title_and_limits_are_drawn_whole_inside_the_picture(side):
    title = "two on ref: activations per cell (12.5% off-atlas)"
    picture = draw_heatmap(_mosaic(side), 4, [(0, 0), (1, 1)], np.array([3.0, 1200.0]), log=True, title=title)
    below = np.asarray(picture, np.float32)[side + 6 + 18:]  # under the gap and the colour bar
    font = ImageFont.load_default()
    text = title + " (log scale)"
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)
    ink = (below.min(axis=2) < 100)
    rows = np.flatnonzero(ink.any(axis=1))
    # Dark ink, clear of the picture's bottom and right edges (nothing clipped) …
    assert len(rows) and rows.max() < below.shape[0] - 1
    assert not ink[:, -1].any() and not ink[-1].any()
    # … and as much of it as the whole title and the limits need: the title's text, however the
    # picture's width makes it wrap, covers its measured width in ink columns summed over its lines.
    lines = _ink_lines(ink)
    assert sum(len(_ink_columns(below[a:b])) for a, b in lines) >= 0.8 * width
    # The limits are printed: "1" at the left end and "1.2e+03" at the right end of the colour bar.
    limits = lines[0]
    cols = _ink_columns(below[limits[0]:limits[1]])
    assert cols.min() < side * 0.1 and cols.max() > side * 0.9


def _ink_lines(ink: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges of consecutive inked rows (text lines)."""
    rows = ink.any(axis=1)
    lines, start = [], None
    for y, inked in enumerate(np.append(rows, False)):
        if inked and start is None:
            start = y
        elif not inked and start is not None:
            lines.append((start, y))
            start = None
    return lines


def test_histogram_picture_leaves_empty_cells_uncoloured(atlas_home, tmp_path):
    atlas = load_atlas("app", atlas_home)
    level = min(atlas.levels)
    kept = atlas.cells_at(level)
    cells = [HistogramCell(i=int(i), j=int(j), activations=n, images=n, share=0.0, top_label="", top_labels=[],
                           top_scores=[]) for i, j, n in zip(kept["i"][:3], kept["j"][:3], (0, 4, 40))]
    result = Histogram(atlas="app", index="x", level=level, totals=Totals(), cells=cells)
    out = histogram_picture(result, atlas, tmp_path / "h.png")
    picture = Image.open(out).convert("RGB")
    mosaic = Image.open(atlas.folder / f"mosaic_{level}.png").convert("RGB")
    side = mosaic.size[0]
    faded = np.round(np.asarray(mosaic, np.float32) * 0.55 + 255 * 0.45)
    drawn = np.asarray(picture, np.float32)[:side]
    tile = side // level
    for cell, coloured in zip(cells, (False, True, True)):
        box = np.s_[cell.i * tile + 1:(cell.i + 1) * tile - 1, cell.j * tile + 1:(cell.j + 1) * tile - 1]
        same = np.abs(drawn[box] - faded[box]).max() <= 1
        assert same != coloured, cell
    # The fullest cell carries the top of the ramp (log scale, its value is the largest).
    fullest = cells[2]
    box = np.s_[fullest.i * tile + 1:(fullest.i + 1) * tile - 1, fullest.j * tile + 1:(fullest.j + 1) * tile - 1]
    np.testing.assert_allclose(drawn[box], faded[box] * (1 - OPACITY) + SEQUENTIAL[-1] * OPACITY, atol=1.01)
