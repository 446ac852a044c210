"""Seeded generator of atlasq's synthetic labelled image collection.

Every class is a visually distinct kind of image, but no single cue
(colour, shape or texture) separates all of them: ``red_discs``,
``red_squares`` and ``polka_dots`` share a colour, ``blue_rings`` and
``concentric_rings`` share a shape family, ``stripes`` and ``waves`` share
a colour and an oriented texture, ``checkerboard`` and ``grid_lines`` share
colours and a lattice.

Images are drawn at twice their final size and reduced, which antialiases
edges.  Every image's random generator is seeded from ``(seed, class index,
image index)`` so the collection is byte-for-byte reproducible and does not
depend on generation order.

Regenerate the committed collection with::

    python -m atlasq.sampledata --out sample_data

Each image's foreground mask (where its shapes, or its texture's foreground, are) is redrawn
from the same seed by :func:`shape_mask` and written by ``--masks DIR``, without changing any image.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = (
    "red_discs",
    "red_squares",
    "blue_triangles",
    "blue_rings",
    "green_stars",
    "yellow_crosses",
    "polka_dots",
    "concentric_rings",
    "stripes",
    "waves",
    "checkerboard",
    "grid_lines",
)

#: Foreground colour of each class, before per-image jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red_discs": (205, 35, 40),
    "red_squares": (205, 35, 40),
    "blue_triangles": (35, 75, 200),
    "blue_rings": (35, 75, 200),
    "green_stars": (40, 150, 55),
    "yellow_crosses": (235, 195, 30),
    "polka_dots": (205, 35, 40),
    "concentric_rings": (40, 150, 55),
    "stripes": (235, 120, 25),
    "waves": (235, 120, 25),
    "checkerboard": (25, 25, 30),
    "grid_lines": (25, 25, 30),
}

#: Output formats cycled over ``image index + class index``: ~50/25/25.
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "JPEG", "WEBP")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PNG_MAX_SIDE = 224  # lossless files of smooth backgrounds are large: keep them small
_SUPERSAMPLE = 2


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int) -> tuple[int, ...]:
    """Return ``rgb`` with every channel shifted by up to ``amount``."""
    shifted = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(shifted, 0, 255))


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int,
                  channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.integers(0, 256, size=(cells, cells, channels), dtype=np.uint8)
    coarse = Image.fromarray(grid.squeeze(axis=2) if channels == 1 else grid)
    up = coarse.resize((w, h), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32).reshape(h, w, channels) / 255.0


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A light, low-saturation backdrop: tinted linear gradient plus blotches."""
    tone = rng.uniform(0.55, 0.95)
    ends = tone + rng.uniform(-0.12, 0.12, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x / w * np.cos(angle) + y / h * np.sin(angle)
    t = ((t - t.min()) / max(np.ptp(t), 1e-6))[..., None]
    img = ends[0] * (1 - t) + ends[1] * t
    img += (_smooth_noise(rng, w, h, int(rng.integers(3, 7)), 1) - 0.5) * 0.15
    return np.clip(img * 255, 0, 255)


def _rotated_coords(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle and shifted by a random offset."""
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x - rng.uniform(0, w), y - rng.uniform(0, h)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _texture_mask(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Boolean foreground mask of a full-frame texture ``kind`` at size (w, h)."""
    u, v = _rotated_coords(rng, w, h)
    period = min(w, h) / rng.uniform(4, 10)
    if kind == "stripes":
        return (u / period) % 1.0 < rng.uniform(0.35, 0.6)
    if kind == "waves":
        amp, wavelength = period * rng.uniform(0.2, 0.45), period * rng.uniform(1.5, 3.0)
        bent = v + amp * np.sin(2 * np.pi * u / wavelength)
        return (bent / period) % 1.0 < rng.uniform(0.15, 0.25)
    if kind == "checkerboard":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if kind == "grid_lines":
        width = rng.uniform(0.08, 0.15)
        return ((u / period) % 1.0 < width) | ((v / period) % 1.0 < width)
    if kind == "polka_dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return np.hypot(du, dv) < rng.uniform(0.2, 0.33)
    if kind == "concentric_rings":
        radius = np.hypot(u + rng.uniform(-0.3, 0.3) * w, v + rng.uniform(-0.3, 0.3) * h)
        return (radius / (period * 0.8)) % 1.0 < rng.uniform(0.35, 0.55)
    raise ValueError(f"not a texture class: {kind!r}")


def _star(n_points: int, inner: float) -> np.ndarray:
    """Unit star outline with ``n_points`` tips; inner radius ``inner``."""
    angles = np.arange(2 * n_points) * np.pi / n_points
    radii = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)


_CROSS = np.array([(-1, -0.3), (-0.3, -0.3), (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3),
                   (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3)])
_OUTLINES = {
    "red_squares": _star(2, 1.0),  # 4 corners at radius 1
    "blue_triangles": _star(3, 1.0)[::2],
    "green_stars": _star(5, 0.42),
    "yellow_crosses": _CROSS,
}
_SHAPE_CLASSES = frozenset(_OUTLINES) | {"red_discs", "blue_rings"}


def _draw_shape(canvas: ImageDraw.ImageDraw, kind: str, centre, radius: float,
                angle: float, fill: tuple[int, ...]) -> None:
    """Draw one object of shape class ``kind`` on ``canvas``."""
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "red_discs":
        canvas.ellipse(box, fill=fill)
    elif kind == "blue_rings":
        canvas.ellipse(box, outline=fill, width=max(2, int(radius * 0.22)))
    else:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = _OUTLINES[kind] @ rot.T * radius + (cx, cy)
        canvas.polygon([tuple(p) for p in points], fill=fill)


def _draw_objects(img: Image.Image, kind: str, rng: np.random.Generator, colour,
                  mask: Image.Image | None = None) -> None:
    """Scatter a random number of ``kind`` objects of jittered ``colour`` on ``img`` (and, in
    white, on ``mask`` when given: the same shapes, drawn without drawing any more randomness)."""
    w, h = img.size
    canvas = ImageDraw.Draw(img)
    mask_canvas = ImageDraw.Draw(mask) if mask is not None else None
    for _ in range(int(rng.integers(1, 6))):
        radius = min(w, h) * rng.uniform(0.1, 0.22)
        centre = rng.uniform(0.1, 0.9, size=2) * (w, h)
        angle = rng.uniform(0, 2 * np.pi)
        _draw_shape(canvas, kind, centre, radius, angle, _jitter(rng, colour, 12))
        if mask_canvas is not None:
            _draw_shape(mask_canvas, kind, centre, radius, angle, 255)


def draw(class_name: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw one random image of ``class_name``.

    Parameters
    ----------
    class_name : str
        One of :data:`CLASSES`.
    rng : numpy.random.Generator
        Source of all randomness; the image is a pure function of its state.
    size : tuple of int
        ``(width, height)`` of the returned image.

    Returns
    -------
    PIL.Image.Image
        An RGB image of the requested size.
    """
    return draw_with_mask(class_name, rng, size)[0]


def draw_with_mask(class_name: str, rng: np.random.Generator, size: tuple[int, int]
                   ) -> tuple[Image.Image, np.ndarray]:
    """:func:`draw`'s image and where its class's foreground is.

    The image is exactly :func:`draw`'s (the mask is drawn alongside without drawing any more
    randomness from ``rng``). The mask is an (height, width) float32 array in [0, 1]: the share of
    each pixel covered by the shapes (or by a texture's foreground), reduced from the
    supersampled drawing as the image is.
    """
    if class_name not in COLOURS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    w, h = size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE
    pixels = _background(rng, w, h)
    colour = _jitter(rng, COLOURS[class_name], 25)
    mask = Image.new("L", (w, h), 0)
    if class_name not in _SHAPE_CLASSES:
        foreground = _texture_mask(class_name, rng, w, h)
        pixels = np.where(foreground[..., None], np.asarray(colour, dtype=np.float32), pixels)
        mask = Image.fromarray(foreground.astype(np.uint8) * 255)
    img = Image.fromarray(pixels.astype(np.uint8))
    if class_name in _SHAPE_CLASSES:
        _draw_objects(img, class_name, rng, colour, mask)
    return img.reduce(_SUPERSAMPLE), np.asarray(mask.reduce(_SUPERSAMPLE), np.float32) / 255.0


def draw_novel(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw an "off-atlas" image that resembles no class: saturated plasma clouds.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness.
    size : tuple of int
        ``(width, height)`` of the returned image.

    Returns
    -------
    PIL.Image.Image
        An RGB image of smooth, strongly coloured, multi-scale noise.
    """
    w, h = size
    octaves = [(_smooth_noise(rng, w, h, cells, 3), 0.5 ** i) for i, cells in enumerate((3, 6, 12))]
    plasma = sum(noise * weight for noise, weight in octaves)
    low, high = plasma.min(axis=(0, 1)), plasma.max(axis=(0, 1))
    plasma = (plasma - low) / np.maximum(high - low, 1e-6)
    return Image.fromarray((plasma * 255).astype(np.uint8))


def _random_size(rng: np.random.Generator, max_side: int = 320) -> tuple[int, int]:
    """Random (width, height): log-uniform sides in 64..max_side, aspect in 1:2..2:1."""
    while True:
        w, h = (int(s) for s in np.exp(rng.uniform(np.log(64), np.log(max_side + 1), size=2)))
        if 0.5 <= w / h <= 2.0:
            return w, h


def _save(img: Image.Image, path: Path, fmt: str, rng: np.random.Generator) -> None:
    """Save ``img`` to ``path`` in ``fmt`` with deterministic encoder settings."""
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=int(rng.integers(85, 93)), optimize=True)
    elif fmt == "WEBP":
        img.save(path, "WEBP", quality=int(rng.integers(80, 91)), method=4)
    else:
        img.save(path, "PNG", optimize=True)


def generate(out_dir: Path, *, per_class: int = 48, seed: int = 0,
             classes: Sequence[str] = CLASSES) -> list[Path]:
    """Write the synthetic collection as ``out_dir/<class>/<class>_<NNN>.<ext>``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Root folder; created if missing. Existing files are overwritten.
    per_class : int, default 48
        Number of images per class.
    seed : int, default 0
        Collection seed. Image ``i`` of class ``c`` is drawn from a generator
        seeded with ``(seed, CLASSES.index(c), i)``.
    classes : sequence of str, default CLASSES
        Classes to generate (a subset of :data:`CLASSES`).

    Returns
    -------
    list of pathlib.Path
        The written files, sorted.
    """
    out_dir = Path(out_dir)
    written = []
    for name in classes:
        class_index = CLASSES.index(name)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng, fmt, size = _image_start(name, i, seed)
            path = out_dir / name / file_name(name, i)
            _save(draw(name, rng, size), path, fmt, rng)
            written.append(path)
    return sorted(written)


def _image_start(name: str, index: int, seed: int) -> tuple[np.random.Generator, str, tuple[int, int]]:
    """Image ``index`` of class ``name``: its generator (after drawing its size), format and size."""
    class_index = CLASSES.index(name)
    rng = np.random.default_rng([seed, class_index, index])
    fmt = FORMATS[(index + class_index) % len(FORMATS)]
    return rng, fmt, _random_size(rng, _PNG_MAX_SIDE if fmt == "PNG" else 320)


def file_name(name: str, index: int) -> str:
    """The file name :func:`generate` gives image ``index`` of class ``name``."""
    class_index = CLASSES.index(name)
    return f"{name}_{index:03d}.{_EXTENSIONS[FORMATS[(index + class_index) % len(FORMATS)]]}"


_FILE_NAME = re.compile(r"^(?P<cls>[a-z_]+)_(?P<idx>\d{3})\.(?:jpg|png|webp)$")


def parse_name(path: str | Path) -> tuple[str, int]:
    """``(class, index)`` of a generated file's name (``red_discs_007.jpg`` → ``("red_discs", 7)``);
    ``ValueError`` for a name :func:`generate` does not write."""
    match = _FILE_NAME.match(Path(path).name)
    if not match or match["cls"] not in CLASSES or file_name(match["cls"], int(match["idx"])) != Path(path).name:
        raise ValueError(f"{Path(path).name!r} is not a file name of the sample generator")
    return match["cls"], int(match["idx"])


def shape_mask(name: str, index: int, *, seed: int = 0) -> np.ndarray:
    """Where the class's foreground is in image ``index`` of class ``name`` (as :func:`generate`
    writes it with ``seed``): (height, width) float32 in [0, 1], the image's own size. The image
    is redrawn from its seed, so no mask needs storing."""
    rng, _, size = _image_start(name, index, seed)
    return draw_with_mask(name, rng, size)[1]


def write_masks(out_dir: Path, *, per_class: int = 48, seed: int = 0,
                classes: Sequence[str] = CLASSES) -> list[Path]:
    """Write every image's mask as ``out_dir/<class>/<class>_<NNN>.png`` (8-bit grey, 255 = all
    foreground), for the collection :func:`generate` writes with the same arguments. Kept apart
    from the images so that indexing the collection never sees them."""
    out_dir = Path(out_dir)
    written = []
    for name in classes:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = out_dir / name / f"{name}_{i:03d}.png"
            mask = shape_mask(name, i, seed=seed)
            Image.fromarray((mask * 255).round().astype(np.uint8)).save(path, "PNG", optimize=True)
            written.append(path)
    return sorted(written)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python -m atlasq.sampledata --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data"), help="output folder")
    parser.add_argument("--per-class", type=int, default=48, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="collection seed")
    parser.add_argument("--masks", type=Path, default=None,
                        help="also write each image's foreground mask under this folder")
    args = parser.parse_args(argv)
    paths = generate(args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out}")
    if args.masks:
        masks = write_masks(args.masks, per_class=args.per_class, seed=args.seed)
        print(f"wrote {len(masks)} masks to {args.masks}")


if __name__ == "__main__":
    main()
