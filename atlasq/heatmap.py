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

__all__ = ["SEQUENTIAL", "DIVERGING", "colour_ramp", "draw_heatmap"]

SEQUENTIAL = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], np.float32)


def colour_ramp(values: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """RGB (uint8) for ``values`` in [0, 1], interpolated between evenly spaced ``anchors``."""
    t = np.nan_to_num(np.clip(np.asarray(values, np.float32), 0, 1)) * (len(anchors) - 1)  # NaN: not drawn
    low = np.minimum(np.floor(t).astype(int), len(anchors) - 2)
    frac = (t - low)[..., None]
    return np.round(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def draw_heatmap(base: Path | Image.Image, size: int, cells: list[tuple[int, int]], values: np.ndarray, *,
                 diverging: bool = False, log: bool = False, title: str = "", out: Path | None = None,
                 opacity: float = 0.62) -> Image.Image:
    """Colour each listed cell of a ``size``×``size`` mosaic by its value and add a colour bar.

    ``diverging`` centres the scale on 0 (symmetric limits); ``log`` colours by log10(1 + value)
    for counts. The mosaic is faded so the colours read first and the icons still show through.
    """
    mosaic = (Image.open(base) if not isinstance(base, Image.Image) else base).convert("RGB")
    side = mosaic.size[0]
    tile = side / size
    faded = np.asarray(mosaic, np.float32) * 0.55 + 255 * 0.45
    canvas = faded.copy()
    values = np.asarray(values, np.float64)
    shown = np.log10(1 + np.maximum(values, 0)) if log else values
    finite = shown[np.isfinite(shown)]
    limit = float(np.abs(finite).max()) if len(finite) and np.abs(finite).max() > 0 else 1.0
    if diverging:
        low, high = -limit, limit
    else:  # a log scale starts at the smallest count shown, so the colours spread over the counts
        low = float(finite.min()) if log and len(finite) and finite.min() < limit else 0.0
        high = limit
    colours = colour_ramp((shown - low) / (high - low), DIVERGING if diverging else SEQUENTIAL)
    for (i, j), colour, value in zip(cells, colours, values):
        if not np.isfinite(value):
            continue
        y0, y1, x0, x1 = round(i * tile), round((i + 1) * tile), round(j * tile), round((j + 1) * tile)
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - opacity) + colour * opacity
    picture = Image.fromarray(np.round(canvas).astype(np.uint8))

    # colour bar with its limits (and the middle, for a diverging scale) under the mosaic
    bar_h, pad = 18, 36
    framed = Image.new("RGB", (side, side + bar_h + pad + 14), "white")
    framed.paste(picture, (0, 0))
    ramp = colour_ramp(np.linspace(0, 1, side)[None, :].repeat(bar_h, 0), DIVERGING if diverging else SEQUENTIAL)
    framed.paste(Image.fromarray(ramp), (0, side + 6))
    draw = ImageDraw.Draw(framed)
    font = ImageFont.load_default()
    unlog = (lambda v: 10 ** v - 1) if log else (lambda v: v)
    labels = [(0, unlog(low)), (side - 1, unlog(high))] + ([(side // 2, 0.0)] if diverging else [])
    for x, value in labels:
        text = f"{value:.3g}"
        width = draw.textlength(text, font=font)
        draw.text((min(max(0, x - width / 2), side - width), side + bar_h + 8), text, fill="black", font=font)
    if title:
        draw.text((4, side + bar_h + 22), title + (" (log scale)" if log else ""), fill="black", font=font)
    if out is not None:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        framed.save(tmp, format="PNG")
        tmp.replace(out)
    return framed
