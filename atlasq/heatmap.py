"""Per-cell values drawn over an atlas mosaic, with a colour bar: histograms and comparisons.

The colour ramps are written out here as a few anchor colours and interpolated linearly. That
avoids a plotting library (matplotlib alone is larger than the rest of this package's pictures
need), and the anchors follow well-known perceptual maps: a viridis-like ramp for counts and a
blue–white–red one for signed differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import replaced

__all__ = ["SEQUENTIAL", "DIVERGING", "colour_ramp", "scale", "paint_cells", "colour_bar", "draw_heatmap"]

SEQUENTIAL = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], np.float32)


def colour_ramp(values: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """RGB (uint8) for ``values`` in [0, 1], interpolated between evenly spaced ``anchors``."""
    t = np.nan_to_num(np.clip(np.asarray(values, np.float32), 0, 1)) * (len(anchors) - 1)  # NaN: not drawn
    low = np.minimum(np.floor(t).astype(int), len(anchors) - 2)
    frac = (t - low)[..., None]
    return np.round(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def scale(values: np.ndarray, *, diverging: bool = False, log: bool = False) -> tuple[np.ndarray, float, float]:
    """``(shown, low, high)``: the values as coloured (log10(1 + v) on a log scale) and the limits
    of the colour scale. A diverging scale is symmetric around 0; a log scale starts at the
    smallest value shown, so the colours spread over the counts."""
    values = np.asarray(values, np.float64)
    shown = np.log10(1 + np.maximum(values, 0)) if log else values
    finite = shown[np.isfinite(shown)]
    limit = float(np.abs(finite).max()) if len(finite) and np.abs(finite).max() > 0 else 1.0
    if diverging:
        return shown, -limit, limit
    low = float(finite.min()) if log and len(finite) and finite.min() < limit else 0.0
    return shown, low, limit


def paint_cells(canvas: np.ndarray, size: int, cells: list[tuple[int, int]], values: np.ndarray, *,
                diverging: bool = False, log: bool = False, opacity: float = 0.6) -> tuple[float, float]:
    """Blend each listed cell of a ``size``×``size`` grid drawn on ``canvas`` (H, W, 3 float) with
    its value's colour; NaN cells stay as they are. Returns the scale's limits (as coloured)."""
    shown, low, high = scale(values, diverging=diverging, log=log)
    colours = colour_ramp((shown - low) / (high - low), DIVERGING if diverging else SEQUENTIAL)
    tile = canvas.shape[0] / size
    for (i, j), colour, value in zip(cells, colours, shown):
        if np.isfinite(value):
            y0, y1, x0, x1 = round(i * tile), round((i + 1) * tile), round(j * tile), round((j + 1) * tile)
            canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - opacity) + colour * opacity
    return low, high


def _wrap(text: str, width: float, measure) -> list[str]:
    """``text`` in lines no wider than ``width`` (by ``measure``), broken between words; a word
    wider than a line is broken between characters, so nothing is drawn past the picture's edge."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and measure(candidate) <= width:
            lines[-1] = candidate
            continue
        while measure(word) > width and len(word) > 1:
            cut = max(1, next(n for n in range(len(word), 0, -1) if measure(word[:n]) <= width or n == 1))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def colour_bar(width: int, low: float, high: float, *, diverging: bool = False, log: bool = False,
               title: str = "") -> Image.Image:
    """A horizontal colour bar labelled with its limits (and 0 in the middle of a diverging one),
    and the title below, wrapped to the bar's width so a narrow picture shows all of it."""
    bar_h, line_h = 18, 14
    font = ImageFont.load_default()
    measure = lambda text: ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)
    lines = _wrap(title + (" (log scale)" if log else ""), width - 8, measure) if title else []
    bar = Image.new("RGB", (width, bar_h + 22 + line_h * len(lines)), "white")
    ramp = colour_ramp(np.linspace(0, 1, width)[None, :].repeat(bar_h, 0), DIVERGING if diverging else SEQUENTIAL)
    bar.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(bar)
    unlog = (lambda v: 10 ** v - 1) if log else (lambda v: v)
    for x, value in [(0, unlog(low)), (width - 1, unlog(high))] + ([(width // 2, 0.0)] if diverging else []):
        text = f"{value:.3g}"
        text_width = draw.textlength(text, font=font)
        draw.text((min(max(0, x - text_width / 2), width - text_width), bar_h + 2), text, fill="black", font=font)
    for n, line in enumerate(lines):
        draw.text((4, bar_h + 16 + n * line_h), line, fill="black", font=font)
    return bar


def draw_heatmap(base: Path | Image.Image, size: int, cells: list[tuple[int, int]], values: np.ndarray, *,
                 diverging: bool = False, log: bool = False, title: str = "", out: Path | None = None,
                 opacity: float = 0.62) -> Image.Image:
    """Colour each listed cell of a ``size``×``size`` mosaic by its value and add a colour bar.

    ``diverging`` centres the scale on 0 (symmetric limits); ``log`` colours by log10(1 + value)
    for counts. The mosaic is faded so the colours read first and the icons still show through.
    """
    mosaic = (Image.open(base) if not isinstance(base, Image.Image) else base).convert("RGB")
    side = mosaic.size[0]
    canvas = np.asarray(mosaic, np.float32) * 0.55 + 255 * 0.45
    low, high = paint_cells(canvas, size, cells, values, diverging=diverging, log=log, opacity=opacity)
    bar = colour_bar(side, low, high, diverging=diverging, log=log, title=title)
    framed = Image.new("RGB", (side, side + 6 + bar.size[1]), "white")
    framed.paste(Image.fromarray(np.round(canvas).astype(np.uint8)), (0, 0))
    framed.paste(bar, (0, side + 6))
    if out is not None:
        with replaced(out) as tmp:
            framed.save(tmp, format="PNG")
    return framed
