"""Per-cell values drawn over an atlas mosaic, with a colour bar: histograms and comparisons.

:func:`draw_heatmap` (the PNGs ``atlasq histogram`` and ``atlasq compare`` write) keeps every
icon as it is and encodes a cell's value in a frame of its colour and a badge with the number;
a cell whose count is zero is faded, so "none" never looks like "a few". A title, the cells'
row and column numbers and a legend with numbers frame the mosaic. :func:`paint_cells` and
:func:`colour_bar` are the plainer blend and bar the app uses.

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

__all__ = ["SEQUENTIAL", "DIVERGING", "colour_ramp", "scale", "paint_cells", "colour_bar", "draw_heatmap",
           "ZERO_FADE", "text_size"]

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


#: How much of a zero-count cell's icon is left (the rest is white): visibly "none", still legible.
ZERO_FADE = 0.3
INK = (20, 20, 20)
MUTED = (110, 110, 110)


def text_size(side: int) -> int:
    """Pixel size of the labels on a heat map whose mosaic is ``side`` pixels wide: at least 16
    (readable at the PNG's native size), growing with the picture so it stays readable scaled down."""
    return max(16, round(side / 60))


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled scalable font (FreeType), so every machine draws the same text at any size
    return ImageFont.load_default(size=size)


def _short(value: float, diverging: bool) -> str:
    """A badge's number: signed with two decimals for a log ratio, a compact count otherwise."""
    if diverging:
        return f"{value:+.1f}"
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            shown = value / limit
            return f"{shown:.1f}{unit}" if shown < 10 else f"{shown:.0f}{unit}"
    return f"{value:.0f}"


def _ticks(low: float, high: float, *, log: bool, diverging: bool) -> list[float]:
    """Round values (in the data's own units) to label the colour bar with, ends included."""
    if log:
        top = 10 ** high - 1
        bottom = 10 ** low - 1
        series = [m * 10 ** e for e in range(0, 10) for m in (1, 2, 5)]
        inner = [v for v in series if bottom < v < top]
        while len(inner) > 5:
            inner = inner[::2]
        return [bottom] + inner + [top]
    span = high - low
    if span <= 0:
        return [low]
    raw = span / 4
    step = min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s_: abs(s_ - raw))
    inner = list(np.arange(np.ceil(low / step) * step, high + step / 2, step))
    values = sorted({round(float(v), 10) for v in [low, high] + inner if low <= v <= high})
    if diverging and 0.0 not in values:
        values = sorted(values + [0.0])
    return values


def _legend(width: int, low: float, high: float, *, diverging: bool, log: bool, title: str,
            size: int) -> Image.Image:
    """The legend under the map: its title, a colour bar with round numbers, and what the other
    looks of a cell mean (a zero count; no frame)."""
    font, small = _font(size), _font(max(14, round(size * 0.85)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    pad = size // 2
    bar_w = min(width - 2 * pad, max(200, int(width * 0.55)))
    bar_h = size
    lines = _wrap(title, width - 2 * pad, lambda t: measure(t, font=font)) if title else []
    line_h = round(size * 1.3)
    note = "no frame: not significant" if diverging else "faded: none (0)"
    sample = size * 2
    beside = pad + bar_w + size * 2 + sample + size // 2 + measure(note, font=small) + pad <= width
    height = pad + line_h * len(lines) + bar_h + 4 + line_h + (0 if beside else line_h + 4) + pad
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    y = pad
    for line in lines:
        draw.text((pad, y), line, fill=INK, font=font)
        y += line_h
    ramp = colour_ramp(np.linspace(0, 1, bar_w)[None, :].repeat(bar_h, 0), DIVERGING if diverging else SEQUENTIAL)
    legend.paste(Image.fromarray(ramp), (pad, y))
    draw.rectangle([pad, y, pad + bar_w - 1, y + bar_h - 1], outline=MUTED)
    shown = (lambda v: np.log10(1 + v)) if log else (lambda v: v)
    placed: list[tuple[float, float]] = []
    ticks = _ticks(low, high, log=log, diverging=diverging)
    for value in ticks[:1] + ticks[-1:] + ticks[1:-1]:  # the ends first: they are never the ones left out
        x = pad + (shown(value) - low) / ((high - low) or 1) * (bar_w - 1)
        text = f"{value:,.3g}" if not log else f"{value:,.0f}" if value >= 1 else f"{value:.2g}"
        text_w = measure(text, font=small)
        left = min(max(pad, x - text_w / 2), pad + bar_w - text_w)
        if any(left < b + 6 and left + text_w > a - 6 for a, b in placed):
            continue  # would overlap a label already drawn
        placed.append((left, left + text_w))
        draw.line([(x, y + bar_h), (x, y + bar_h + 3)], fill=INK)
        draw.text((left, y + bar_h + 4), text, fill=INK, font=small)
    # What the other looks of a cell mean: beside the bar, or under its numbers in a narrow picture.
    x, y = (pad + bar_w + size * 2, y) if beside else (pad, y + bar_h + 4 + line_h + 4)
    draw.rectangle([x, y, x + sample - 1, y + bar_h - 1], fill=(235, 235, 235) if diverging else (200, 210, 220),
                   outline=MUTED if diverging else (190, 190, 190))
    draw.text((x + sample + size // 2, y + (bar_h - size) / 2), note, fill=INK, font=small)
    return legend


def draw_heatmap(base: Path | Image.Image, size: int, cells: list[tuple[int, int]], values: np.ndarray, *,
                 diverging: bool = False, log: bool = False, title: str = "", legend_title: str = "",
                 out: Path | None = None) -> Image.Image:
    """Draw each listed cell's value over a ``size``×``size`` mosaic, keeping the icons readable.

    A cell with a value gets a frame in the value's colour and, where the tile has room, a badge
    with the number; its icon is left untouched. ``diverging`` centres the scale on 0 (symmetric
    limits); ``log`` colours counts by log10(1 + value). On a sequential (count) scale a value of
    0 fades the cell's icon (:data:`ZERO_FADE`) and draws no frame. NaN cells and cells not listed
    stay as the mosaic has them. Above the mosaic: ``title``; along its edges: row numbers (i, left)
    and column numbers (j, top); below: the legend (``legend_title``, a colour bar with numbers).
    The mosaic's top-left corner in the picture is ``picture.info["grid_origin"]`` (x, y), and
    the PNG written to ``out`` records it as the text ``grid_origin`` ("x,y").
    """
    mosaic = (Image.open(base) if not isinstance(base, Image.Image) else base).convert("RGB")
    side = mosaic.size[0]
    tile = side / size
    # Pillow's bundled font has no "×" or "–": written the plain way
    title, legend_title = (t.replace("×", "x").replace("–", "-") for t in (title, legend_title))
    values = np.asarray(values, np.float64)
    shown, low, high = scale(np.where(values > 0, values, np.nan) if (log and not diverging) else values,
                             diverging=diverging, log=log)
    colours = colour_ramp((shown - low) / ((high - low) or 1), DIVERGING if diverging else SEQUENTIAL)

    canvas = np.asarray(mosaic, np.float32).copy()
    zero = [(i, j) for (i, j), v in zip(cells, values) if not diverging and v == 0]
    for i, j in zero:
        y0, y1, x0, x1 = round(i * tile), round((i + 1) * tile), round(j * tile), round((j + 1) * tile)
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * ZERO_FADE + 255 * (1 - ZERO_FADE)
    picture = Image.fromarray(np.round(canvas).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    frame = max(2, round(tile / 14))
    badge_font = _font(max(12, round(tile / 5.5)))
    for (i, j), value, colour in zip(cells, values, colours):
        if not np.isfinite(value) or (not diverging and value == 0):
            continue
        x0, y0, x1, y1 = round(j * tile), round(i * tile), round((j + 1) * tile) - 1, round((i + 1) * tile) - 1
        colour = tuple(int(c) for c in colour)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=frame)
        if tile >= 40:  # a badge with the number, in the frame's colour, at the bottom right
            text = _short(value, diverging)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=badge_font)
            w, h = right - left + 6, bottom - top + 4
            dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 140
            draw.rectangle([x1 - w + 1, y1 - h + 1, x1, y1], fill=colour)
            draw.text((x1 - w + 4 - left, y1 - h + 3 - top), text, fill="white" if dark else INK, font=badge_font)

    text = text_size(side)
    font, title_font = _font(text), _font(round(text * 1.25))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    label_w = measure(str(size - 1), font=font)
    left = int(label_w + text)
    title_lines = _wrap(title, side + left - text, lambda t: measure(t, font=title_font)) if title else []
    title_h = round(text * 1.25 * 1.3) * len(title_lines)
    top = int(text // 2 + title_h + text * 1.6)
    legend = _legend(side + left, low, high, diverging=diverging, log=log, size=text,
                     title=(legend_title or ("log2 ratio" if diverging else "value")) + (" (log scale)" if log else ""))
    framed = Image.new("RGB", (side + left + text, top + side + legend.size[1]), "white")
    framed.paste(picture, (left, top))
    out_draw = ImageDraw.Draw(framed)
    y = text // 2
    for line in title_lines:
        out_draw.text((text // 2, y), line, fill=INK, font=title_font)
        y += round(text * 1.25 * 1.3)
    step = next(n for n in (1, 2, 5, 10, 20, 50, 100) if n * tile >= label_w + text * 0.6 or n == 100)
    for n in range(0, size, step):  # cell coordinates: column j along the top, row i down the left
        centre = (n + 0.5) * tile
        label = str(n)
        w = measure(label, font=font)
        out_draw.text((left + centre - w / 2, top - text * 1.35), label, fill=INK, font=font)
        out_draw.text((left - text // 2 - w, top + centre - text * 0.6), label, fill=INK, font=font)
    out_draw.text((text // 2, top - text * 1.35), "i,j", fill=MUTED, font=font)  # the corner names the axes
    out_draw.rectangle([left - 1, top - 1, left + side, top + side], outline=(200, 200, 200))
    framed.paste(legend, (0, top + side))
    framed.info["grid_origin"] = (left, top)
    if out is not None:
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        meta.add_text("grid_origin", f"{left},{top}")  # where the cells are, for tools and tests
        with replaced(out) as tmp:
            framed.save(tmp, format="PNG", pnginfo=meta)
    return framed
