"""The patch test (Activation Atlas, "Testing dozens of patches on thousands of images").

A two-class atlas can show a concept that carries evidence for class B and that images of class A
rarely contain. Pasting a picture of it onto A's images tests whether the network really uses it:
each image whose top-1 class is A gets the patch at each of the four corners (top left, top right,
bottom left, bottom right) and at several sizes (a fraction of the side of the image the network
sees), and is classified again. Reported per size and corner: the share of images whose top-1
becomes B, and the mean drop of A's probability; per size, the share flipped by the best corner
for that image; overall, the share flipped by the best corner and size. A random-noise patch of
the same size at the same place is the control (does the patch add evidence, or only hide A's?).

The patch is pasted on the network's view of the image (the weights' resize and centre crop), so
a size means the same fraction of what the network sees for every image. Placement is fixed
(corners, flush with the edges); the seed draws the noise and, with ``images``, which images are
tried, so the same inputs and seed give the same report.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atlasdir import AtlasFolder
from .errors import AtlasqError, InvalidOptionError, NotFoundError
from .fileio import replaced
from .images import ImageDecodeError, open_rgb, real_path
from .model import LoadedModel, load_model
from .store import IndexStore, index_folder

__all__ = ["CORNERS", "DEFAULT_SIZES", "PATCH_KINDS", "PatchTestError", "patch_from_source", "network_view",
           "paste", "noise_patch", "PatchTest", "run_patch_test"]

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: Patch sides as fractions of the image side. The article tries "several sizes" and reports the
#: most effective without listing them; these span a small inset to a large one.
DEFAULT_SIZES = (0.2, 0.3, 0.4, 0.5)
PATCH_KINDS = ("icon", "exemplar")
CELL_SOURCE = re.compile(r"^(?P<atlas>[^:]+):(?P<level>\d+):(?P<i>\d+),(?P<j>\d+)$")


class PatchTestError(AtlasqError, ValueError):
    """The patch test cannot run as asked (the message says why)."""


# ----------------------------------------------------------------------------- the patch

def patch_from_source(source: str, *, kind: str = "icon", home: Path | None = None) -> Image.Image:
    """The patch named by ``source``: an image file, or ``ATLAS:LEVEL:I,J``, a cell of an atlas
    (its icon, or with ``kind="exemplar"`` the region of its best exemplar's image the cell's
    activation sees)."""
    if kind not in PATCH_KINDS:
        raise InvalidOptionError(f"--patch-kind must be one of {', '.join(PATCH_KINDS)}, not {kind!r}")
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return open_rgb(path)
        except (ImageDecodeError, OSError) as exc:
            raise PatchTestError(f"cannot read the patch image {source}: {exc}") from exc
    match = CELL_SOURCE.match(source)
    if not match:
        raise PatchTestError(f"--patch must be an image file or ATLAS:LEVEL:I,J (a cell of an atlas), not {source!r}")
    from .atlas import load_atlas

    atlas = load_atlas(match["atlas"], home)
    level, i, j = int(match["level"]), int(match["i"]), int(match["j"])
    if level not in atlas.levels:
        raise PatchTestError(f"atlas {atlas.name!r} has no level {level} (it has {atlas.levels})")
    row = atlas.cell_row(level, i, j)
    if row is None:
        raise NotFoundError(f"cell {i},{j} of level {level} of atlas {atlas.name!r} is not a kept cell")
    if kind == "icon":
        icon = atlas.icon_path(level, i, j)
        if not icon.is_file():
            raise PatchTestError(f"atlas {atlas.name!r} has no icons (built with --no-icons); "
                                 f"use --patch-kind exemplar")
        return Image.open(icon).convert("RGB")
    best = json.loads(atlas.cells_at(level)["exemplars"][row])[0]
    root = Path(atlas.manifest["index_root"])
    try:
        image = open_rgb(real_path(root, best["path"]))
    except (ImageDecodeError, OSError) as exc:
        raise PatchTestError(f"cannot read the exemplar image {best['path']}: {exc}") from exc
    return image.crop(tuple(int(round(v)) for v in best["box"]))


def noise_patch(side: int, rng: np.random.Generator) -> Image.Image:
    """Uniform random RGB pixels: the control patch."""
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- images and the network

def network_view(model: LoadedModel, image: Image.Image) -> np.ndarray:
    """(S, S, 3) uint8: the pixels the network sees of ``image`` (the weights' resize and crop)."""
    size = model.input_size
    if hasattr(model.transform, "source_box"):
        out_size, box = model.transform.source_box(*image.size)
        view = image.resize(out_size, Image.Resampling.BILINEAR, box=box)
    else:  # a registered model without the crop geometry: its input square
        view = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(view.convert("RGB"))


def paste(view: np.ndarray, patch: Image.Image, fraction: float, corner: str) -> np.ndarray:
    """``view`` with ``patch`` resized to ``fraction`` of its side, flush in ``corner``."""
    height, width = view.shape[:2]
    side = max(1, int(round(fraction * min(height, width))))
    tile = np.asarray(patch.resize((side, side), Image.Resampling.LANCZOS).convert("RGB"))
    top = 0 if corner.startswith("top") else height - side
    left = 0 if corner.endswith("left") else width - side
    out = view.copy()
    out[top:top + side, left:left + side] = tile
    return out


def _normaliser(model: LoadedModel):
    preset = getattr(model.transform, "preset", model.transform)
    mean = torch.tensor(getattr(preset, "mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255
    std = torch.tensor(getattr(preset, "std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def classify(model: LoadedModel, views: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """(N, classes) softmax probabilities of (N, S, S, 3) uint8 network views (fp32)."""
    normalise = _normaliser(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(views), batch):
            x = torch.from_numpy(np.ascontiguousarray(views[start:start + batch])).permute(0, 3, 1, 2).float()
            out.append(torch.softmax(model.network(normalise(x.to(model.device))).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.categories)), np.float32)


# ----------------------------------------------------------------------------- the test

@dataclass
class PatchTest:
    """The report: settings, one row per (patch or noise, size, corner), and the summaries."""

    index: str
    from_class: str
    to_class: str
    patch: str
    patch_kind: str
    sizes: list[float]
    seed: int
    images: int                      # images tried (top-1 is ``from_class``, fresh classification)
    candidates: int                  # images whose top-1 is ``from_class``, before --images
    rows: list[dict] = field(default_factory=list)   # patch, size, corner, flipped, flip_rate, mean_drop_from …
    by_size: list[dict] = field(default_factory=list)  # patch, size, mean_rate (over corners), best_corner_rate
    best: dict = field(default_factory=dict)          # patch/noise → share flipped at the best corner and size
    mean_rate: dict = field(default_factory=dict)     # patch/noise → share flipped, over every size and corner
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _candidates(store: IndexStore, c: int) -> list[dict]:
    return [r for r in store.images() if r["top5_class"] is not None and len(r["top5_class"])
            and int(r["top5_class"][0]) == c]


def run_patch_test(index: str, from_class: str, to_class: str, patch: str, *, out: Path,
                   sizes: tuple[float, ...] = DEFAULT_SIZES, images: int | None = None, seed: int = 0,
                   patch_kind: str = "icon", home: Path | None = None, device: str | None = None,
                   examples: int = 6) -> PatchTest:
    """Paste ``patch`` on the images of ``index`` whose top-1 is ``from_class``, at each corner and
    size, and report how often the top-1 becomes ``to_class``, against a noise patch; writes
    ``patch_test.json``, ``patch_test.csv`` and ``patch_test.png`` (examples) into ``out``."""
    from .class_atlas import class_index

    sizes = tuple(float(s) for s in sizes)
    if not sizes or any(not 0 < s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise InvalidOptionError(f"--sizes must be different fractions of the image side in (0, 1), not {sizes}")
    if images is not None and images < 1:
        raise InvalidOptionError(f"--images must be at least 1, not {images}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"--out {out} is a file, not a folder")
    picture = patch_from_source(patch, kind=patch_kind, home=home)
    with IndexStore(index_folder(index, home)) as store:
        meta = store.meta()
        model = load_model(meta["model"], meta["weights"], device=device, seed=meta.get("seed", 0))
        categories = list(meta.get("categories") or model.categories)
        a, b = class_index(categories, from_class), class_index(categories, to_class)
        if a == b:
            raise InvalidOptionError(f"--from and --to must differ, not {categories[a]!r} twice")
        rows = _candidates(store, a)
    root = Path(meta["root"])
    views, kept_rows = [], []
    for r in rows:
        try:
            views.append(network_view(model, open_rgb(real_path(root, r["path"]))))
            kept_rows.append(r)
        except (ImageDecodeError, OSError):
            continue  # moved or changed since indexing: not tried
    if not views:
        raise PatchTestError(f"no image of index {index!r} has top-1 class {categories[a]!r}")
    views = np.stack(views)
    base = classify(model, views)
    still = np.flatnonzero(base.argmax(1) == a)  # the index's top-1 was computed once; trust today's
    rng = np.random.default_rng([seed, 7])
    if images is not None and len(still) > images:
        still = np.sort(rng.choice(still, images, replace=False))
    views, base, kept_rows = views[still], base[still], [kept_rows[n] for n in still]
    if not len(views):
        raise PatchTestError(f"no readable image of index {index!r} is classified {categories[a]!r}")
    side = views.shape[1]
    noises = {s: noise_patch(max(1, int(round(s * side))), np.random.default_rng([seed, 11, n]))
              for n, s in enumerate(sizes)}
    report = PatchTest(index=index, from_class=categories[a], to_class=categories[b], patch=patch,
                       patch_kind=patch_kind if CELL_SOURCE.match(patch) and not Path(patch).is_file() else "image",
                       sizes=list(sizes), seed=seed, images=len(views), candidates=len(rows))
    probs = {}  # (which, size, corner) → (N, classes)
    for which in ("patch", "noise"):
        for s in sizes:
            for corner in CORNERS:
                source = picture if which == "patch" else noises[s]
                p = classify(model, np.stack([paste(v, source, s, corner) for v in views]))
                probs[(which, s, corner)] = p
                flipped = p.argmax(1) == b
                report.rows.append({"patch": which, "size": s, "corner": corner, "images": len(views),
                                    "flipped": int(flipped.sum()), "flip_rate": round(float(flipped.mean()), 4),
                                    "mean_drop_from": round(float((base[:, a] - p[:, a]).mean()), 4),
                                    "mean_prob_to": round(float(p[:, b].mean()), 4)})
    for which in ("patch", "noise"):
        anywhere = np.zeros(len(views), bool)
        for s in sizes:
            flips = np.stack([probs[(which, s, c)].argmax(1) == b for c in CORNERS])
            anywhere |= flips.any(0)
            report.by_size.append({"patch": which, "size": s, "mean_rate": round(float(flips.mean()), 4),
                                   "best_corner_rate": round(float(flips.any(0).mean()), 4)})
        report.best[which] = round(float(anywhere.mean()), 4)
        report.mean_rate[which] = round(float(np.mean([r["flip_rate"] for r in report.rows if r["patch"] == which])), 4)
    out.mkdir(parents=True, exist_ok=True)
    report.files = {"json": str(out / "patch_test.json"), "csv": str(out / "patch_test.csv"),
                    "picture": str(out / "patch_test.png")}
    _write_csv(Path(report.files["csv"]), report.rows)
    _examples_picture(Path(report.files["picture"]), views, base, probs, picture, noises, report, a, b, examples)
    with replaced(Path(report.files["json"])) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=1))
    return report


def _write_csv(path: Path, rows: list[dict]) -> None:
    with replaced(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def _examples_picture(path: Path, views, base, probs, picture, noises, report: PatchTest, a: int, b: int,
                      count: int) -> None:
    """Up to ``count`` images, one per row: before, with the patch, with the noise patch (at the
    size and corner that gave B the most probability for that image), each captioned with the
    probabilities of A and B. Images the patch flipped come first."""
    keys = [k for k in probs if k[0] == "patch"]
    to_b = np.stack([probs[k][:, b] for k in keys])            # (configs, N)
    best = to_b.argmax(0)
    flipped = np.array([probs[keys[best[n]]][n].argmax() == b for n in range(len(views))])
    order = np.lexsort((-to_b.max(0), ~flipped))[:count]
    tile, caption, pad = 192, 50, 8
    font, head_font = _font(13), _font(15)
    header = 30
    width = 3 * tile + 4 * pad
    canvas = Image.new("RGB", (width, header + len(order) * (tile + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(("before", "with the patch", "with noise (control)")):
        draw.text((pad + col * (tile + pad), 8), title, fill="black", font=head_font)
    for row, n in enumerate(order):
        _, s, corner = keys[best[n]]
        shown = [(views[n], base[n]),
                 (paste(views[n], picture, s, corner), probs[("patch", s, corner)][n]),
                 (paste(views[n], noises[s], s, corner), probs[("noise", s, corner)][n])]
        y = header + row * (tile + caption + pad)
        for col, (pixels, p) in enumerate(shown):
            x = pad + col * (tile + pad)
            canvas.paste(Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            top = int(p.argmax())
            colour = (0, 130, 0) if top == b else (0, 0, 0)  # green: the top-1 became B
            draw.text((x, y + tile + 2), f"{report.from_class} {p[a]:.2f}", fill=(0, 0, 0), font=font)
            draw.text((x, y + tile + 17), f"{report.to_class} {p[b]:.2f}", fill=colour, font=font)
            if col:
                draw.text((x, y + tile + 32), f"size {s:g}, {corner}", fill=(90, 90, 90), font=font)
    with replaced(path) as tmp:
        canvas.save(tmp, format="PNG")
