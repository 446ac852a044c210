"""Everything the Streamlit app shows, computed here so that the page (:mod:`atlasq.webapp`) stays UI only.

The app never sends anything per activation to the browser. The atlas goes out as one picture
(the mosaic with the chosen overlay drawn in) plus one row per kept cell (position, count, top
classes) for hovering and clicking. Images are read only from under their index's own root folder.
"""

from __future__ import annotations

import base64
import functools
import gc
import io
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb

import numpy as np
from PIL import Image, ImageDraw

from .atlas import NO_POSITIVE_CLASS, Atlas, position_box
from .atlasdir import list_atlases
from .errors import AtlasqError
from .heatmap import colour_bar, paint_cells, scale
from .histogram import CellImages, Comparison, cell_images, compare, histogram, placement_state
from .home import RESERVED, check_name
from .images import CropGeometry, ImageDecodeError, open_rgb, real_path
from .store import DB_FILE, ImageFilter, IndexStore, default_home, index_folder

__all__ = ["AppError", "list_indexes", "index_problems", "scan_indexes", "scan_stamp", "ImageTile", "image_tile",
           "outline_geometry", "list_atlases", "CellOverlay", "overlay_counts", "overlay_class", "overlay_compare",
           "overlay_search", "atlas_picture", "cell_page", "safe_image_path", "index_root", "index_source",
           "index_stamp", "thumbnail",
           "image_details", "search_upload", "search_indexed", "placement_state", "overlay_legend",
           "ImageFilter", "SCORE_HELP", "ZIP_CAP_BYTES", "compatibility", "index_layers", "atlas_layers", "cell_rows",
           "overlay_of_rows", "SelectionPage", "selection_page", "selection_files", "selection_csv", "zip_refusal",
           "selection_zip", "dataset_facts", "icon_uri", "class_number", "index_network", "network_loaded",
           "warm_up"]

VIEW_SIDE = 520  # pixels of the atlas picture sent to the browser (fits the wide layout's left column)


class AppError(AtlasqError, ValueError):
    """Something the app shows as a message instead of a traceback."""


def list_indexes(home: Path | None = None) -> list[str]:
    """Names of the indexes under ``home`` that open and are complete (see :func:`scan_indexes`)."""
    return scan_indexes(home)[0]


def index_problems(home: Path | None = None) -> dict[str, str]:
    """The folders :func:`list_indexes` leaves out, each with the reason (see :func:`scan_indexes`)."""
    return scan_indexes(home)[1]


def scan_indexes(home: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The names of the indexes under ``home`` that open and are complete, and every other folder
    that could be one, with why it cannot be shown.

    A failed first ``atlasq index`` run, a damaged ``index.duckdb`` or a stray folder must not
    become a choice that crashes the app when picked, nor vanish without a word. The home's own
    folders (atlases, comparisons) and hidden ones are not candidates.
    """
    found = _index_folders(home)
    return (sorted(name for name, problem in found.items() if problem is None),
            {name: problem for name, problem in found.items() if problem is not None})


def scan_stamp(home: Path | None = None) -> tuple:
    """Changes whenever a folder of ``home`` appears or goes or its index database changes: the
    key under which the app may keep what :func:`scan_indexes` found (opening every index on every
    click would cost a database open each, and a damaged one may take the lock wait)."""
    stamps = []
    for folder in _visible_folders(home):
        try:
            stamps.append((folder.name, (folder / DB_FILE).stat().st_mtime_ns))
        except OSError:
            stamps.append((folder.name, 0))
    return tuple(stamps)


def _visible_folders(home: Path | None) -> list[Path]:
    """The folders of ``home`` that are not hidden, sorted (none when it cannot be listed)."""
    try:
        return sorted(p for p in Path(home or default_home()).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


# What a first `atlasq index` run writes before it embeds anything; without these the app can
# neither find the images nor load the network.
_COMPLETE_META = ("root", "model", "weights")


def _index_folders(home: Path | None) -> dict[str, str | None]:
    """Every candidate index folder of ``home`` (not hidden, not one of the home's own folders),
    with None when it opens as a complete index, else why not."""
    found: dict[str, str | None] = {}
    for folder in _visible_folders(home):
        if folder.name.lower() in RESERVED:
            continue
        try:
            check_name(folder.name)
        except AtlasqError as exc:
            found[folder.name] = str(exc)
            continue
        found[folder.name] = _index_problem(folder)
    return found


def _index_problem(folder: Path) -> str | None:
    if not (folder / DB_FILE).is_file():
        return (f"not an index (no {DB_FILE}): left by an `atlasq index` run that failed, or not atlasq's; "
                f"run `atlasq index DIR --name {folder.name}` again or remove the folder")
    try:
        # a short wait: the indexer holds the file only while it commits
        with IndexStore(folder, lock_wait=2.0) as store:
            meta = store.meta()
    except (AtlasqError, duckdb.Error, OSError) as exc:
        return f"cannot be opened: {exc}"
    missing = [key for key in _COMPLETE_META if key not in meta]
    if missing:
        return (f"unfinished: its first `atlasq index` run stopped before recording {', '.join(missing)}; "
                f"run `atlasq index DIR --name {folder.name}` again")
    return None


@dataclass
class CellOverlay:
    """One value per kept cell of a level, and how to colour it."""

    cells: list[dict]          # i, j, value, label (tooltip text), count, top_labels
    diverging: bool = False
    log: bool = False
    legend: str = ""
    opacity_only: bool = False  # class view: cells fade by value instead of taking colours


def _cells(atlas: Atlas, level: int) -> dict:
    if level not in atlas.levels:
        raise AppError(f"atlas {atlas.manifest['name']!r} has no level {level} (it has {atlas.levels})")
    return atlas.cells_at(level)


def overlay_counts(atlas: Atlas, index: str | None, level: int, *, home: Path | None = None,
                   log: bool = True) -> CellOverlay:
    """Per-cell activation counts of ``index`` (placing new activations first); without an
    index, the atlas's own reference counts."""
    if index is None:
        cells = _cells(atlas, level)
        rows = [{"i": i, "j": j, "value": float(n), "count": int(n), "top_labels": list(t[:3])}
                for i, j, n, t in zip(cells["i"], cells["j"], cells["count"], cells["top_labels"])]
        return CellOverlay(rows, log=log, legend="reference activations per cell")
    result = histogram(atlas, index, level=level, home=home, place=False)
    rows = [{"i": c.i, "j": c.j, "value": float(c.activations), "count": c.activations,
             "images": c.images, "top_labels": c.top_labels} for c in result.cells]
    t = result.totals
    return CellOverlay(rows, log=log, legend=f"{index}: activations per cell; {t.off_atlas_share:.1%} of "
                                              f"{t.activations:,} off-atlas")


def overlay_class(atlas: Atlas, level: int, class_name: str) -> CellOverlay:
    """The article's class view: each cell's mean attribution to ``class_name``; cells fade with it."""
    categories = atlas.manifest["categories"]
    if class_name not in categories:
        raise AppError(f"unknown class {class_name!r}")
    c = categories.index(class_name)
    cells = _cells(atlas, level)
    every_class = atlas.mean_attributions(level)
    rows = []
    for n, (i, j, count, classes, scores, labels) in enumerate(zip(
            cells["i"], cells["j"], cells["count"], cells["top_classes"], cells["top_scores"], cells["top_labels"])):
        # an older atlas stores only each cell's top 5 classes; the others count as 0 there
        score = every_class[n, c] if every_class is not None else dict(zip(classes, scores)).get(c, 0.0)
        rows.append({"i": i, "j": j, "value": float(max(score, 0.0)), "count": int(count),
                     "top_labels": list(labels[:3])})
    return CellOverlay(rows, legend=f"attribution to {class_name} (opacity)", opacity_only=True)


def overlay_compare(atlas: Atlas, index_a: str, index_b: str, level: int, *, home: Path | None = None,
                    alpha: float = 0.05) -> tuple[CellOverlay, Comparison]:
    """Diverging log2 share ratio of B over A (significant cells only) and the comparison itself."""
    result = compare(atlas, index_a, index_b, level=level, home=home, alpha=alpha, top=10_000,
                     place=False, write=False)
    rows = []
    table = histogram(atlas, index_b, level=level, home=home, place=False).cells
    significant = {(c.i, c.j): c for c in result.over_represented_in_b + result.under_represented_in_b}
    for c in table:
        hit = significant.get((c.i, c.j))
        rows.append({"i": c.i, "j": c.j, "value": hit.log2_ratio if hit else float("nan"),
                     "count": c.activations, "top_labels": c.top_labels})
    return CellOverlay(rows, diverging=True, legend=f"log2 share ratio {index_b} / {index_a} (q < {alpha})"), result


def overlay_search(atlas: Atlas, level: int, cells_hit: dict[tuple[int, int], int]) -> CellOverlay:
    """Cells occupied by search results light up, by how many of the results' activations fall there."""
    cells = _cells(atlas, level)
    rows = [{"i": i, "j": j, "value": float(cells_hit.get((i, j), 0)) or float("nan"), "count": int(n),
             "top_labels": list(t[:3])} for i, j, n, t in zip(cells["i"], cells["j"], cells["count"], cells["top_labels"])]
    return CellOverlay(rows, legend="activations of the search results")


def atlas_picture(atlas: Atlas, level: int, overlay: CellOverlay | None, *, tiles: str = "icons",
                  selected: tuple[int, int] | None = None, side: int = VIEW_SIDE) -> Image.Image:
    """The mosaic (icons or exemplar crops) at ``side`` pixels with the overlay drawn in and the
    selected cell outlined."""
    path = atlas.tiles_path(level, tiles)  # exemplar crops for an atlas built with --no-icons
    mosaic = np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.Resampling.LANCZOS), np.float32)
    canvas = mosaic.copy()
    if overlay is not None and overlay.cells:
        cells = [(c["i"], c["j"]) for c in overlay.cells]
        values = np.array([c["value"] for c in overlay.cells], np.float64)
        if overlay.opacity_only:  # everything faded; each cell comes back with its value
            faded = canvas * 0.12 + 255 * 0.88
            weight = np.zeros(canvas.shape[:2] + (1,), np.float32)
            top = np.nanmax(values) if np.isfinite(values).any() and np.nanmax(values) > 0 else 1.0
            tile = side / level
            for (i, j), value in zip(cells, values):
                if np.isfinite(value):
                    weight[round(i * tile):round((i + 1) * tile), round(j * tile):round((j + 1) * tile)] = max(value, 0) / top
            canvas = mosaic * weight + faded * (1 - weight)
        else:
            paint_cells(canvas, level, cells, values, diverging=overlay.diverging, log=overlay.log, opacity=0.55)
    picture = Image.fromarray(np.round(canvas).clip(0, 255).astype(np.uint8))
    if selected is not None:
        i, j = selected
        tile = side / level
        ImageDraw.Draw(picture).rectangle([j * tile, i * tile, (j + 1) * tile - 1, (i + 1) * tile - 1],
                                          outline=(255, 0, 80), width=3)
    return picture


def overlay_legend(overlay: CellOverlay, width: int = VIEW_SIDE) -> Image.Image | None:
    """The colour bar of ``overlay`` (None for the class view, which fades instead of colouring)."""
    if overlay.opacity_only or not overlay.cells:
        return None
    _, low, high = scale(np.array([c["value"] for c in overlay.cells], np.float64), diverging=overlay.diverging,
                         log=overlay.log)
    return colour_bar(width, low, high, diverging=overlay.diverging, log=overlay.log)


def data_uri(picture: Image.Image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, quality=88)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def safe_image_path(root: Path, relative: str) -> Path:
    """The file of the stored path ``relative`` under ``root``, refused unless it stays inside
    ``root`` (no ``..``, absolute paths or links out)."""
    root = Path(root).resolve()
    try:
        path = real_path(root, relative).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise AppError(f"{relative!r} cannot be resolved: {exc}") from exc
    if not path.is_relative_to(root):
        raise AppError(f"{relative!r} is outside the index's folder")
    return path


def cell_page(atlas: Atlas, index: str, level: int, i: int, j: int, *, page: int = 0, per_page: int = 12,
              home: Path | None = None) -> CellImages:
    """One page of the images of ``index`` in cell (i, j), with the cell's labels and scores
    (``has_more``: there is a next page)."""
    return cell_images(atlas, index, i, j, level=level, k=per_page, offset=page * per_page, home=home)


def index_root(index: str, home: Path | None = None) -> Path:
    """The folder an index was built from: the only place the app reads images from."""
    return Path(index_source(index, home)["root"])


# what identifies the network an index was built with (see atlasq.api.model_for_index)
_NETWORK_META = ("model", "weights", "seed", "weights_sha256")


def index_source(index: str, home: Path | None = None) -> dict:
    """``root``: the folder an index was built from; ``network``: the part of its meta that
    identifies the network that embedded it (enough to load that network again). Read again
    whenever the index's database changes."""
    return dict(_index_source(index, str(index_folder(index, home)), index_stamp(index, home)))


@functools.lru_cache(maxsize=64)
def _index_source(index: str, folder: str, stamp: int) -> dict:
    with IndexStore(Path(folder), hold=True) as store:
        meta = store.meta()
    missing = [key for key in _COMPLETE_META if key not in meta]
    if missing:
        raise AppError(f"index {index!r} is unfinished (no {', '.join(missing)} recorded yet): "
                       f"run `atlasq index DIR --name {index}` again")
    return {"root": meta["root"], "network": {key: meta[key] for key in _NETWORK_META if key in meta}}


def index_stamp(index: str, home: Path | None = None) -> int:
    """Changes whenever the index's database is replaced or rewritten (0 while it is missing): the
    key under which the app may keep what it read from it."""
    try:
        return (index_folder(index, home) / DB_FILE).stat().st_mtime_ns
    except OSError:
        return 0


@dataclass
class ImageTile:
    """A picture to show for an image of the index; ``unavailable`` says why it is a grey stand-in."""

    image: Image.Image
    unavailable: str | None = None


def outline_geometry(atlas: Atlas, model=None):
    """How to find a layer position's patch in an image of ``atlas``'s index: the preprocessing the
    atlas recorded (no network needed), else ``model``'s own (atlases built before atlasq recorded
    it); None when neither is at hand."""
    recorded = CropGeometry.from_dict(atlas.manifest.get("preprocess"))
    if recorded is not None:
        return recorded
    return model.transform if model is not None else None


def image_tile(atlas: Atlas, root: Path, path: str, positions: list[dict], *, side: int = 192,
               model=None) -> ImageTile:
    """The image at ``path`` under ``root`` (see :func:`index_root`) with the sampled positions
    outlined (where :func:`outline_geometry` knows how); a grey "unavailable" tile with the reason
    when the file is gone, unreadable, a symlink out of ``root`` or a symlink loop (files change
    after they are indexed)."""
    try:
        image = open_rgb(safe_image_path(root, path))
    except (AtlasqError, ImageDecodeError, OSError) as exc:
        reason = str(exc) if isinstance(exc, AtlasqError) else f"{type(exc).__name__}: {exc}"
        tile = Image.new("RGB", (side, side), (220, 220, 220))
        ImageDraw.Draw(tile).text((6, side // 2), "unavailable", fill="black")
        return ImageTile(tile, reason)
    geometry = outline_geometry(atlas, model)
    if geometry is not None and positions:
        layer_hw = tuple(atlas.manifest["layer_shape"])
        stride = atlas.manifest["input_size"] / layer_hw[1]  # the patch of input one position stands for
        draw = ImageDraw.Draw(image)
        width = max(2, round(max(image.size) / 160))
        for p in positions:
            box = position_box(geometry, image.width, image.height, int(p["y"]), int(p["x"]), layer_hw, stride)
            draw.rectangle(box, outline=(255, 0, 80), width=width)
    image.thumbnail((side, side))
    return ImageTile(image)


def thumbnail(atlas: Atlas, root: Path, path: str, positions: list[dict], *, side: int = 192,
              model=None) -> Image.Image:
    """The picture of :func:`image_tile` alone."""
    return image_tile(atlas, root, path, positions, side=side, model=model).image


def image_details(atlas: Atlas, index: str, image_id: int, *, home: Path | None = None) -> dict:
    """An image's path, size, top-5 predictions and where its activations fall on the atlas."""
    with IndexStore(index_folder(index, home), hold=True) as store:
        rows = store.images([image_id])
        if not rows:
            raise AppError(f"no image {image_id} in index {index!r}")
        placements = store.image_placements(atlas.manifest["name"], image_id)
    row = rows[0]
    categories = atlas.manifest["categories"]
    top5 = [{"class": categories[c] if c < len(categories) else str(c), "probability": round(float(p), 4)}
            for c, p in zip(row["top5_class"] or [], row["top5_prob"] or [])]
    return {"id": image_id, "path": row["path"], "width": row["width"], "height": row["height"], "top5": top5,
            "placements": placements}


def search_upload(atlas: Atlas, index: str, data: bytes, filename: str, *, k: int = 12, home: Path | None = None,
                  model=None) -> dict:
    """Nearest images of an uploaded image in ``index``, and the cells of the atlas their
    activations occupy at each level (from their stored placements)."""
    from .api import embed_image, model_for_index
    from .search import search

    suffix = Path(filename).suffix.lower() or ".png"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"query{suffix}"
        path.write_bytes(data)
        with IndexStore(index_folder(index, home), hold=True) as store:
            model = model or model_for_index(store.meta())
            try:
                vector = embed_image(path, model)
            except ValueError as exc:
                raise AppError(f"cannot read the uploaded file {filename!r}: {exc}") from exc
            return _search_result(store, atlas, *search(store, vector, k))


def search_indexed(atlas: Atlas, index: str, image_id: int, *, k: int = 12, home: Path | None = None) -> dict:
    """Like :func:`search_upload`, for an image already in ``index`` (the query itself left out)."""
    from .search import search

    with IndexStore(index_folder(index, home), hold=True) as store:
        _, vectors = store.pooled([image_id])
        if not len(vectors):
            raise AppError(f"no image {image_id} in index {index!r}")
        return _search_result(store, atlas, *search(store, vectors[0], k, exclude=image_id))


def _search_result(store: IndexStore, atlas: Atlas, hits: list, kind: str) -> dict:
    """Search hits, and the cells (per level) their activations occupy on ``atlas``."""
    return {"hits": [{"id": h.id, "path": h.path, "score": round(h.score, 4)} for h in hits], "search": kind,
            "cells": store.cells_of_images(atlas.manifest["name"], [h.id for h in hits])}


# ----------------------------------------------------------------------------- the app's views (issue 12)
#: Attribution scores, as the app's tooltips and help explain them.
SCORE_HELP = ("Score: the cell's mean attribution to the class, h·∂logit/∂h averaged over the reference "
              "activations in the cell (logit units; positive: the cell's activations raise that class's "
              "logit). Only classes with a positive score are called top classes.")
#: Above this many bytes of images, the app does not zip a selection (the CSV of paths still works).
ZIP_CAP_BYTES = 200 * 1024 * 1024


def compatibility(atlas: Atlas, index: str, home: Path | None = None) -> str | None:
    """Why ``index`` cannot be placed on ``atlas`` (another model, other weights, not its layer),
    or None when it can (see :func:`atlasq.histogram.check_compatible`)."""
    from .histogram import check_compatible

    try:
        with IndexStore(index_folder(index, home), hold=True) as store:
            check_compatible(atlas, store.meta(), index)
    except AtlasqError as exc:
        return str(exc)
    return None


def index_layers(index: str, home: Path | None = None) -> list[str]:
    """The layers whose activations ``index`` samples."""
    with IndexStore(index_folder(index, home), hold=True) as store:
        return list(store.meta().get("layers") or [])


def atlas_layers(names: list[str], home: Path | None = None) -> dict[str, str]:
    """Atlas name → its layer (atlases that cannot be read are left out)."""
    from .atlasdir import AtlasFolder

    out = {}
    for name in names:
        try:
            out[name] = AtlasFolder.named(name, home).read_manifest()["layer"]
        except (AtlasqError, OSError, KeyError, ValueError):
            continue
    return out


def cell_rows(atlas: Atlas, index: str | None, level: int, where: ImageFilter = ImageFilter(), *,
              home: Path | None = None) -> tuple[list[dict], dict]:
    """Every kept cell of ``level`` with the images of ``index`` (kept by ``where``) there:
    ``i, j, activations, images, share`` (of the index's placed activations), ``top_label``,
    ``top_labels``, ``top_scores`` (positive classes only), and the totals
    (``activations, off_atlas, images``). Without an index, the atlas's own reference counts."""
    cells = _cells(atlas, level)
    if index is None:
        counts = {(int(i), int(j)): (int(n), 0) for i, j, n in zip(cells["i"], cells["j"], cells["count"])}
        totals = {"activations": int(sum(cells["count"])), "off_atlas": 0, "images": 0}
    else:
        with IndexStore(index_folder(index, home), hold=True) as store:
            raw = store.filtered_cell_counts(atlas.name, level, where)
            totals = store.filtered_totals(atlas.name, level, where)
        counts = {(int(i), int(j)): (int(a), int(b))
                  for i, j, a, b in zip(raw["i"], raw["j"], raw["activations"], raw["images"])}
    total = totals["activations"] or 1
    rows = []
    for i, j, labels, scores in zip(cells["i"], cells["j"], cells["top_labels"], cells["top_scores"]):
        acts, images = counts.get((i, j), (0, 0))
        rows.append({"i": int(i), "j": int(j), "activations": acts, "images": images, "share": acts / total,
                     "top_label": labels[0] if labels else NO_POSITIVE_CLASS, "top_labels": list(labels[:3]),
                     "top_scores": [round(float(s), 4) for s in scores[:3]]})
    return rows, totals


def overlay_of_rows(rows: list[dict], *, legend: str, log: bool = True) -> CellOverlay:
    """A count overlay from :func:`cell_rows` (empty cells carry NaN: "none", not "few")."""
    return CellOverlay([{"i": r["i"], "j": r["j"], "value": float(r["activations"]) if r["activations"] else float("nan"),
                         "count": r["activations"], "images": r["images"], "top_labels": r["top_labels"]}
                        for r in rows], log=log, legend=legend)


@dataclass
class SelectionPage:
    """One page of the images of a selection of cells (their union), most typical first."""

    cells: list                 # (i, j)
    images: list                # dicts: image_id, path, cell_distance, activations, positions
    total_images: int
    total_bytes: int            # of all the selection's files
    page: int
    per_page: int

    @property
    def has_more(self) -> bool:
        return (self.page + 1) * self.per_page < self.total_images


def selection_page(atlas: Atlas, index: str, level: int, cells: list[tuple[int, int]], *,
                   where: ImageFilter = ImageFilter(), page: int = 0, per_page: int = 12,
                   home: Path | None = None) -> SelectionPage:
    """A page of the images of ``index`` (kept by ``where``) in any of ``cells``."""
    _cells(atlas, level)
    cells = sorted({(int(i), int(j)) for i, j in cells})
    folder = index_folder(index, home)
    stamp = index_stamp(index, home)
    if len(cells) == 1 and where.everything:  # one cell: every cell's totals come from one query
        total, size = _cell_totals(str(folder), stamp, atlas.name, level).get(cells[0], (0, 0))
    else:
        total, size = _selection_totals(str(folder), stamp, atlas.name, level, tuple(cells), where)
    with IndexStore(folder, hold=True) as store:
        if len(cells) == 1 and where.everything:  # one cell, no filter: the store's own cell query
            (i, j), = cells
            members = [{**m, "positions": [{**q, "i": i, "j": j} for q in m["positions"]]}
                       for m in store.cell_members(atlas.name, level, i, j, limit=per_page, offset=page * per_page)]
        else:
            members = store.selection_members(atlas.name, level, cells, where, limit=per_page,
                                              offset=page * per_page)
    return SelectionPage(cells, members, total, size, page, per_page)


@functools.lru_cache(maxsize=256)
def _selection_totals(folder: str, stamp: int, atlas: str, level: int, cells: tuple, where: ImageFilter):
    """Kept per index version: paging through a selection does not count it again."""
    with IndexStore(Path(folder), hold=True) as store:
        return store.selection_totals(atlas, level, list(cells), where)


@functools.lru_cache(maxsize=16)
def _cell_totals(folder: str, stamp: int, atlas: str, level: int) -> dict:
    """Every cell's image count and bytes at ``level``, kept per index version (a first click on a
    cell of 100,000 images then costs no count of its own)."""
    with IndexStore(Path(folder), hold=True) as store:
        return store.cell_totals(atlas, level)


def selection_files(atlas: Atlas, index: str, level: int, cells: list[tuple[int, int]], *,
                    where: ImageFilter = ImageFilter(), home: Path | None = None) -> list[dict]:
    """Every image of the selection (``image_id, path, bytes``), most typical first."""
    with IndexStore(index_folder(index, home), hold=True) as store:
        members = store.selection_files(atlas.name, level, list(cells), where)
    return [{"image_id": int(m["image_id"]), "path": m["path"], "bytes": int(m["bytes"] or 0)} for m in members]


def selection_csv(files: list[dict]) -> bytes:
    """The selection's image paths (relative to the index's folder) as CSV: ``image_id,path``."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "path"])
    writer.writerows((f["image_id"], f["path"]) for f in files)
    return buffer.getvalue().encode()


def zip_refusal(files: list[dict] | tuple[int, int], cap: int | None = None) -> str | None:
    """Why the selection (its files, or their count and total bytes) is not zipped: its files add
    up to more than ``cap`` bytes (default :data:`ZIP_CAP_BYTES`). None when it can be."""
    cap = ZIP_CAP_BYTES if cap is None else cap
    count, total = files if isinstance(files, tuple) else (len(files), sum(f["bytes"] for f in files))
    if total <= cap:
        return None
    return (f"The {count:,} selected images hold {total / 2**20:,.0f} MB, more than the "
            f"{cap / 2**20:,.0f} MB the app zips; download the CSV of paths instead, or select fewer cells.")


def selection_zip(root: Path, files: list[dict], cap: int | None = None) -> bytes:
    """The selection's files, under their stored paths, in one zip (stored, not recompressed: they
    are already compressed images). Files are copied in chunks by :mod:`zipfile`; one that cannot be
    read is left out and named in ``MISSING.txt``. Raises :class:`AppError` above ``cap``."""
    import zipfile

    problem = zip_refusal(files, cap)
    if problem:
        raise AppError(problem)
    buffer, missing = io.BytesIO(), []
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for f in files:
            try:
                archive.write(safe_image_path(root, f["path"]), arcname=f["path"])
            except (AppError, OSError) as exc:
                missing.append(f"{f['path']}: {exc}")
        if missing:
            archive.writestr("MISSING.txt", "\n".join(missing) + "\n")
    return buffer.getvalue()


def dataset_facts(atlas: Atlas, index: str, level: int, where: ImageFilter = ImageFilter(), *,
                  home: Path | None = None, top: int = 8) -> dict:
    """What the dataset summary shows: images and errors of the index, its off-atlas share (and
    the images with the most off-atlas activations), its most frequent top-1 predictions, and the
    atlas's model, weights, layer and icon fidelity."""
    categories = atlas.manifest["categories"]
    with IndexStore(index_folder(index, home), hold=True) as store:
        images, errors = store.count("images"), store.count("errors")
        totals = store.filtered_totals(atlas.name, level, where)
        predicted = store.top_predictions(where, top)
        off = store.off_atlas_images(atlas.name, level, where)
        kept = images if where.everything else totals["images"]
    m = atlas.manifest
    fidelity = (m.get("icon_fidelity") or {}).get(str(level))
    return {"images": images, "errors": errors, "kept_images": kept, "activations": totals["activations"],
            "off_atlas": totals["off_atlas"],
            "off_atlas_share": totals["off_atlas"] / totals["activations"] if totals["activations"] else 0.0,
            "top_predicted": [(categories[c] if c < len(categories) else str(c), n) for c, n in predicted],
            "off_atlas_images": off,
            "atlas": {"name": m["name"], "model": m["model"], "weights": m["weights"],
                      "random_weights": bool(m.get("random_weights")), "layer": m["layer"],
                      "icon_fidelity": fidelity, "icon_size": m.get("icon_size")}}


def icon_uri(atlas: Atlas, level: int, i: int, j: int, side: int = 40) -> str | None:
    """A small data URI of cell (i, j)'s icon (or its tile of the mosaic), for tables and tooltips;
    kept per atlas version, since a table shows the same icons on every rerun."""
    return _icon_uri(str(atlas.folder), atlas.files.modified(), level, i, j, side)


@functools.lru_cache(maxsize=20_000)
def _icon_uri(folder: str, stamp: float, level: int, i: int, j: int, side: int) -> str | None:
    from .atlasdir import AtlasFolder

    files = AtlasFolder(Path(folder))
    path = files.icon_path(level, i, j)
    try:
        if path.is_file():
            image = Image.open(path).convert("RGB")
        else:
            mosaic = Image.open(files.tiles_path(level))
            tile = mosaic.size[0] / level
            image = mosaic.crop((round(j * tile), round(i * tile), round((j + 1) * tile),
                                 round((i + 1) * tile))).convert("RGB")
    except OSError:
        return None
    image.thumbnail((side, side))
    return data_uri(image, "PNG")


def class_number(atlas: Atlas, name: str) -> int:
    categories = atlas.manifest["categories"]
    if name not in categories:
        raise AppError(f"unknown class {name!r}")
    return categories.index(name)


# ----------------------------------------------------------------------------- the network, and warming up
_NETWORKS: dict[str, object] = {}
_NETWORKS_LOCK = threading.Lock()
_WARMED: set = set()


def _network_key(index: str, home: Path | None) -> str:
    return json.dumps(index_source(index, home)["network"], sort_keys=True)


def network_loaded(index: str, home: Path | None = None) -> bool:
    """Whether :func:`index_network` has the index's network in memory already."""
    return _network_key(index, home) in _NETWORKS


def index_network(index: str, home: Path | None = None):
    """The network ``index`` was built with, loaded once per process (several indexes built with
    the same network share it). Safe from several threads: one loads, the others wait for it."""
    key = _network_key(index, home)
    with _NETWORKS_LOCK:
        if key not in _NETWORKS:
            from .api import model_for_index

            _NETWORKS[key] = model_for_index(json.loads(key), device="cpu")
        return _NETWORKS[key]


def warm_up(atlas: Atlas, index: str | None, home: Path | None = None, *,
            freeze: bool = True) -> threading.Thread | None:
    """Load, in a background thread, what the first interactions with ``index`` on ``atlas`` would
    otherwise wait for: the index's network (a search by an uploaded image, the image dialog's
    Inspect and Layers views, and outlining positions on an atlas that does not record its
    preprocessing) and every cell's image count at each level (a first click). Then,
    with ``freeze``, move everything loaded so far out of the garbage collector's way
    (``gc.freeze``): the full collection Streamlit runs after every run of a page took 0.2–0.3 s
    once the network was loaded, walking its objects, and delayed the next run by as much. Once per
    process for each atlas and index; returns the thread (None when already done)."""
    if index is None or (atlas.name, index, str(home)) in _WARMED:
        return None
    _WARMED.add((atlas.name, index, str(home)))

    def work() -> None:
        try:
            folder, stamp = str(index_folder(index, home)), index_stamp(index, home)
            for level in sorted(atlas.levels):
                _cell_totals(folder, stamp, atlas.name, level)
            index_network(index, home)
        except Exception:  # noqa: BLE001 - a failure shows when the page itself needs the thing
            pass
        finally:
            if freeze:
                gc.collect()
                gc.freeze()

    thread = threading.Thread(target=work, name=f"atlasq-warm-{index}", daemon=True)
    thread.start()
    return thread
