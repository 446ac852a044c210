"""The reference activation atlas: layout, multi-level grid, attribution labels, icons.

From an index built with attributions, :func:`build_atlas` takes the sampled activations of one
layer, lays them out in 2-D (:class:`atlasq.layout.Layout`), bins the layout at several grid sizes
(:class:`atlasq.layout.Grid`), summarises every kept cell (count, mean activation, mean
attribution → top classes, nearest real exemplars) and renders one feature-visualization icon per
cell (:mod:`atlasq.featurevis`). The result is a self-describing folder::

    <home>/atlases/<name>/
        manifest.json        model, weights, layer, every parameter, seed, counts, versions
        cells.parquet        one row per kept cell and level (columns: see the README)
        reference.parquet    one row per reference activation: image, k, y, x, position, cell per level
        activations.npy      (N, C) float16 reference activations, rows as in reference.parquet
        positions.npy        (N, 2) float32 positions in [0, 1]² (x, y)
        whitening.npy        (C, C) float32, when icons were rendered with --whiten
        icons/<G>/<i>_<j>.png  one icon per kept cell
        mosaic_<G>.png       icons on the grid (empty cells blank)
        exemplars_<G>.png    the best exemplar's image crop on the grid
        attributions_<G>.npy (cells, classes) float16 mean attribution per kept cell
        placement.json/.faiss  written later by `atlasq histogram`: the reference search index and
                             the off-atlas threshold (see atlasq.histogram)

Building is resumable: the layout and cells are saved before the icons, each finished icon
batch is written at once, and ``manifest.json`` (``"complete": true``) is written last. Running
the same build again picks up where it stopped; different parameters are refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from . import __version__
from .featurevis import render_directions
from .featurevis.objectives import OBJECTIVES
from .errors import AtlasqError
from .fileio import replaced
from .home import atlas_folder
from .images import ImageDecodeError, open_rgb
from .layout import Grid, Layout, unit_rows
from .model import LoadedModel, load_model, resolve_precision
from .progress import progress_bar, stderr
from .store import IndexStore, index_folder

__all__ = ["AtlasOptions", "AtlasError", "Atlas", "build_atlas", "load_atlas", "atlas_folder", "atlas_summary",
           "whitening_matrices", "cell_summaries", "default_icon_size"]

TOP_CLASSES = 5


class AtlasError(AtlasqError, ValueError):
    """An atlas cannot be built from these inputs (the message says what to do)."""


@dataclass
class AtlasOptions:
    """Every parameter of an atlas build (all recorded in the manifest).

    layer : the index's sampled layer to lay out (``mixed4c`` as in the article's main atlas).
    grids : grid sizes G (G×G cells) binned from the one layout, coarse to fine.
    min_count : cells with fewer activations are dropped (Lucid keeps cells with more than 5 of
        100k–1M; small collections need a lower bar).
    max_activations : seeded subsample of the index's activations (None: all of them).
    n_neighbors, min_dist : UMAP's, with the article's defaults for mixed4a–5b (50, 0.05).
    fit_size : activations UMAP optimises; the rest are placed by k-NN (see :class:`Layout`).
    n_epochs : UMAP epochs (None: UMAP's default).
    exemplars : real activations kept per cell, ranked by cosine to the cell's mean.
    icons : render feature-visualization icons (off: cells and exemplars only).
    steps, icon_size, icon_batch : optimisation steps, icon side in pixels (None: see
        :func:`default_icon_size`), cells optimised together.
    cossim_pow : n in the ``dot-cosine`` and ``article`` objectives, (h·v)^(n+1) / (|h||v|)^n.
    lr : Adam's learning rate for the icons (0.05, as in the articles).
    settle : fraction of the steps, at the end, that optimise the untransformed icon (see
        :func:`atlasq.featurevis.render_directions`, which restarts Adam for it).
    attempts : icons whose objective did not rise are rendered again from another start, up to
        this many times in all; the best is kept.
    whiten : compare in the layer's whitened activation space (decorrelates channels, so icons
        show what distinguishes a direction rather than what all activations share).
    objective : what an icon maximises (see :mod:`atlasq.featurevis.objectives`): ``"cosine"``
        (the default: the cosine between the icon's centre activation and the cell's mean, in
        whitened space with --whiten), ``"dot-cosine"`` (the articles' dot × cosine^n, which
        trades direction for strength) or ``"article"`` (Lucid's code: dot with v·S, S = inverse
        covariance, and a scaled cosine).
    whiten_shrinkage : regularisation of the covariance before inverting, as a fraction of its
        mean eigenvalue added to the diagonal (the article's plain inverse is ill-conditioned).
    precision : icons in ``fp32``/``bf16``; ``auto`` is bf16 where the CPU supports it natively.
    seed : seeds the subsample, UMAP and the icons.
    """

    layer: str = "mixed4c"
    grids: tuple[int, ...] = (20, 40, 80)
    min_count: int = 3
    max_activations: int | None = 100_000
    n_neighbors: int = 50
    min_dist: float = 0.05
    fit_size: int = 20_000
    n_epochs: int | None = None
    exemplars: int = 8
    icons: bool = True
    steps: int = 512
    icon_size: int | None = None
    icon_batch: int = 32
    cossim_pow: float = 3.0
    lr: float = 0.05
    settle: float = 0.125
    attempts: int = 3
    whiten: bool = False
    objective: str = "cosine"
    whiten_shrinkage: float = 0.01
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        grids = tuple(self.grids)
        if not grids or any(int(g) != g or g < 1 for g in grids):
            raise AtlasError(f"grids must be positive integers, not {self.grids!r}")
        if len(set(grids)) != len(grids):
            raise AtlasError(f"grid sizes repeat: {self.grids!r}")
        if self.min_count < 1:
            raise AtlasError("min_count must be at least 1")
        if self.max_activations is not None and self.max_activations < 4:
            raise AtlasError("max_activations must be at least 4")
        if self.steps < 1 or self.icon_batch < 1 or self.exemplars < 1 or self.attempts < 1:
            raise AtlasError("steps, icon_batch, exemplars and attempts must be at least 1")
        if self.icon_size is not None and self.icon_size < 16:
            raise AtlasError("icon_size must be at least 16 pixels")
        if self.objective not in OBJECTIVES:
            raise AtlasError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if not self.lr > 0:
            raise AtlasError("lr must be positive")
        if not 0 <= self.settle < 1:
            raise AtlasError("settle must be a fraction of the steps in [0, 1)")
        if self.whiten_shrinkage < 0:
            raise AtlasError("whiten_shrinkage must be non-negative")

    def layout(self) -> Layout:
        return Layout(n_neighbors=self.n_neighbors, min_dist=self.min_dist, metric="cosine",
                      fit_size=self.fit_size, n_epochs=self.n_epochs, random_state=self.seed)


# ----------------------------------------------------------------------------- the science

def whitening_matrices(activations: np.ndarray, shrinkage: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """``(zca, inverse)`` of the uncentred second-moment matrix C = AᵀA/N, regularised.

    ``inverse`` = (C + λI)⁻¹ is the article's S (applied to the direction only: v·S);
    ``zca`` = (C + λI)^(-1/2) whitens both sides for a true cosine in whitened space.
    λ = ``shrinkage`` × mean eigenvalue of C.
    """
    a = np.asarray(activations, np.float64)
    second = a.T @ a / max(len(a), 1)
    eigenvalues, vectors = np.linalg.eigh(second)
    floor = shrinkage * max(float(eigenvalues.mean()), 1e-12)
    eigenvalues = np.maximum(eigenvalues, 0) + floor
    zca = (vectors / np.sqrt(eigenvalues)) @ vectors.T
    inverse = (vectors / eigenvalues) @ vectors.T
    return zca.astype(np.float32), inverse.astype(np.float32)


@dataclass
class CellSummary:
    """Everything about the kept cells of one grid level (arrays aligned by cell)."""

    size: int
    cells: np.ndarray            # (M, 2) i (row, from y), j (column, from x)
    counts: np.ndarray           # (M,)
    mean_activation: np.ndarray  # (M, C) float32
    mean_attribution: np.ndarray  # (M, classes) float32
    top_classes: np.ndarray      # (M, TOP_CLASSES) int
    top_scores: np.ndarray       # (M, TOP_CLASSES) float32
    exemplars: list[np.ndarray]  # per cell: indices into the reference activations, best first
    exemplar_cosines: list[np.ndarray]
    cell_of: np.ndarray          # (N, 2) cell (i, j) of every reference activation
    kept: np.ndarray             # (N,) bool: its cell was kept


def cell_summaries(positions: np.ndarray, activations: np.ndarray, attributions: np.ndarray,
                   size: int, *, min_count: int = 1, exemplars: int = 8) -> CellSummary:
    """Bin ``positions`` on a ``size``×``size`` grid and summarise each kept cell.

    A cell's attribution is the mean of its members' attribution vectors (not the attribution
    of the mean activation); its exemplars are its members ranked by cosine to its mean activation.
    """
    grid = Grid(size, min_count=min_count).fit(positions)
    flat = grid.cell_of_[:, 0] * size + grid.cell_of_[:, 1]
    kept_flat = grid.cells_[:, 0] * size + grid.cells_[:, 1]
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], kept_flat)
    acts = np.asarray(activations, np.float32)
    attrs = attributions
    mean_act = np.empty((len(kept_flat), acts.shape[1]), np.float32)
    mean_attr = np.empty((len(kept_flat), attrs.shape[1]), np.float32)
    best, best_cos = [], []
    for c, (start, count) in enumerate(zip(starts, grid.counts_)):
        members = order[start:start + count]
        mean_act[c] = acts[members].mean(axis=0)
        mean_attr[c] = attrs[members].mean(axis=0, dtype=np.float32)
        cos = unit_rows(acts[members]) @ (mean_act[c] / max(np.linalg.norm(mean_act[c]), 1e-12))
        rank = np.argsort(-cos, kind="stable")[:exemplars]
        best.append(members[rank])
        best_cos.append(cos[rank].astype(np.float32))
    top = np.argsort(-mean_attr, axis=1, kind="stable")[:, :TOP_CLASSES]
    return CellSummary(size=size, cells=grid.cells_, counts=grid.counts_, mean_activation=mean_act,
                       mean_attribution=mean_attr, top_classes=top,
                       top_scores=np.take_along_axis(mean_attr, top, axis=1), exemplars=best,
                       exemplar_cosines=best_cos, cell_of=grid.cell_of_, kept=np.isin(flat, kept_flat))


# ----------------------------------------------------------------------------- loading an atlas

@dataclass
class Atlas:
    """A built atlas, read back from its folder."""

    folder: Path
    manifest: dict
    cells: "pa.Table"
    reference: "pa.Table"

    @property
    def levels(self) -> list[int]:
        return list(self.manifest["options"]["grids"])

    def activations(self) -> np.ndarray:
        return np.load(self.folder / "activations.npy", mmap_mode="r")

    def positions(self) -> np.ndarray:
        return np.load(self.folder / "positions.npy")

    def cells_at(self, level: int) -> dict[str, np.ndarray | list]:
        table = self.cells.filter(pa.compute.equal(self.cells["level"], level))
        return table.to_pydict()

    def mean_attributions(self, level: int) -> np.ndarray | None:
        """(cells, classes) mean attribution of every kept cell of ``level``, rows in
        :meth:`cells_at` order (None for an atlas built before this file existed)."""
        path = self.folder / f"attributions_{level}.npy"
        return np.load(path).astype(np.float32) if path.is_file() else None

    def icon_path(self, level: int, i: int, j: int) -> Path:
        return self.folder / "icons" / str(level) / f"{i}_{j}.png"


def load_atlas(name_or_folder: str | Path, home: Path | None = None) -> Atlas:
    """Open an atlas by name (under ``home/atlases``) or by folder."""
    folder = Path(name_or_folder)
    if not (folder / "manifest.json").is_file():
        folder = atlas_folder(str(name_or_folder), home)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        if (folder / "build.json").is_file():
            raise AtlasError(f"the atlas at {folder} is unfinished; run the same `atlasq atlas build` again to "
                             f"finish it")
        raise FileNotFoundError(f"no atlas at {folder}; build one with `atlasq atlas build --index NAME "
                                f"--name {folder.name}`")
    manifest = json.loads(manifest_path.read_text())
    return Atlas(folder, manifest, pq.read_table(folder / "cells.parquet"),
                 pq.read_table(folder / "reference.parquet"))


def atlas_summary(name: str | Path, home: Path | None = None) -> dict:
    """What ``atlasq atlas info`` prints: the manifest's key facts and, per level, the cell count
    and the most common top labels."""
    atlas = load_atlas(name, home)
    m = atlas.manifest
    levels = []
    for g in atlas.levels:
        cells = atlas.cells_at(g)
        labels, counts = np.unique([t[0] for t in cells["top_labels"]], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        levels.append({"size": g, "cells": len(cells["i"]), "activations": int(sum(cells["count"])),
                       "top_labels": [(str(labels[o]), int(counts[o])) for o in order],
                       "mosaic": str(atlas.folder / f"mosaic_{g}.png") if m["options"]["icons"] else None,
                       "exemplars": str(atlas.folder / f"exemplars_{g}.png")})
    keys = ("index", "model", "weights", "random_weights", "layer", "activations", "index_activations",
            "icon_size", "icon_precision", "atlasq_version", "created", "options", "seconds")
    return {"name": m["name"], "folder": str(atlas.folder), **{k: m.get(k) for k in keys}, "levels": levels}


# ----------------------------------------------------------------------------- building

def _read_index(store: IndexStore, options: AtlasOptions) -> tuple[dict, dict]:
    meta = store.meta()
    layers = meta.get("layers") or []
    if options.layer not in layers:
        raise AtlasError(f"index {store.folder.name!r} has no sampled activations of {options.layer!r} "
                         f"(it has {', '.join(layers) or 'none'}); index with `--layers {options.layer}`")
    if not meta.get("attributions"):
        raise AtlasError(
            f"index {store.folder.name!r} was built without attributions, which the atlas needs to label "
            f"its cells; index the folder again under a new name with attributions: `atlasq index "
            f"{meta.get('root', 'DIR')} --name {store.folder.name}-attr --attributions`")
    samples = store.samples(options.layer, attributions=True)
    if len(samples["activations"]) < 4:
        raise AtlasError(f"index {store.folder.name!r} holds {len(samples['activations'])} activations; "
                         f"an atlas needs at least 4")
    return meta, samples


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, limit, replace=False))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with replaced(path) as tmp:
        tmp.write_bytes(data)


def _save_png(image: np.ndarray | Image.Image, path: Path) -> None:
    with replaced(path) as tmp:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp, format="PNG")


def _save_npy(array: np.ndarray, path: Path) -> None:
    with replaced(path) as tmp, open(tmp, "wb") as file:
        np.save(file, array)


def _write_parquet(table: pa.Table, path: Path) -> None:
    with replaced(path) as tmp:
        pq.write_table(table, tmp)


@dataclass
class AtlasSummary:
    name: str
    folder: str
    index: str
    layer: str
    activations: int
    levels: dict[str, dict] = field(default_factory=dict)
    icons_rendered: int = 0
    icons_reused: int = 0
    resumed: bool = False
    icon_fidelity: dict[str, float] = field(default_factory=dict)
    random_weights: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def position_box(model: LoadedModel, width: int, height: int, y: int, x: int, layer_hw: tuple[int, int],
              side: float) -> tuple[float, float, float, float]:
    """The region of the original image (pixels) that layer position (y, x) sees: a square of
    ``side`` network-input pixels centred on the position, mapped back through the preprocessing."""
    (crop_w, crop_h), (bx0, by0, bx1, by1) = model.transform.source_box(width, height)
    sx, sy = (bx1 - bx0) / crop_w, (by1 - by0) / crop_h
    cy = (y + 0.5) * crop_h / layer_hw[0]
    cx = (x + 0.5) * crop_w / layer_hw[1]
    half = side / 2
    return (bx0 + (cx - half) * sx, by0 + (cy - half) * sy, bx0 + (cx + half) * sx, by0 + (cy + half) * sy)


def _exemplar_crop(root: Path, path: str, box, size: int) -> np.ndarray | None:
    try:
        image = open_rgb(root / path)
    except (ImageDecodeError, OSError):
        return None  # the file moved or changed since indexing; the cell keeps a blank tile
    # crop() fills the part of a box that lies outside the image (a position near the border
    # sees past it) with black, where resize(box=...) would refuse
    region = image.crop(tuple(int(round(v)) for v in box))
    return np.asarray(region.resize((size, size), Image.Resampling.BILINEAR))


MOSAIC_MAX_SIDE = 4096


def _mosaic(tiles: dict[tuple[int, int], np.ndarray], size: int, icon: int) -> Image.Image:
    """Tiles on a size×size grid, row i from the top; empty cells white. Tiles shrink so the
    mosaic stays within MOSAIC_MAX_SIDE pixels (an 80×80 grid of 80-px icons would be 6400)."""
    tile = max(1, min(icon, MOSAIC_MAX_SIDE // size))
    if tile != icon:
        tiles = {key: np.asarray(Image.fromarray(t).resize((tile, tile), Image.Resampling.LANCZOS))
                 for key, t in tiles.items()}
    canvas = np.full((size * tile, size * tile, 3), 255, np.uint8)
    for (i, j), image in tiles.items():
        canvas[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = image
    return Image.fromarray(canvas)


def build_atlas(index: str, name: str, *, home: Path | None = None, options: AtlasOptions | None = None,
                device: str | None = None, overwrite: bool = False, progress: bool = True) -> AtlasSummary:
    """Build atlas ``name`` from index ``index`` (see the module docstring for what is written)."""
    options = options or AtlasOptions()
    options.validate()
    options.grids = tuple(int(g) for g in options.grids)
    folder = atlas_folder(name, home)
    clock = time.perf_counter()
    with IndexStore(index_folder(index, home)) as store:
        meta, samples = _read_index(store, options)
        images = {r["id"]: r for r in store.images()}
    root = Path(meta["root"])
    model = load_model(meta["model"], meta["weights"], device=device, seed=meta.get("seed", 0))
    if meta.get("weights_sha256") and model.weights_sha256 != meta["weights_sha256"]:
        raise AtlasError(f"the weights of index {index!r} have changed since it was built")
    layer_hw = _layer_hw(model, options.layer)
    icon_size = options.icon_size or default_icon_size(model.input_size, layer_hw)
    precision = resolve_precision(options.precision, model.device)
    params = {"index": index, "options": {**asdict(options), "grids": list(options.grids)},
              "icon_size": icon_size, "precision": precision}
    params_hash = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]

    resumed = _prepare_folder(folder, params_hash, overwrite)
    summary = AtlasSummary(name=name, folder=str(folder), index=index, layer=options.layer,
                           activations=0, resumed=resumed, random_weights=bool(meta.get("random_weights")))

    chosen = _subsample(len(samples["activations"]), options.max_activations, options.seed)
    activations = np.asarray(samples["activations"][chosen], np.float32)
    attributions = samples["attributions"][chosen]  # float16: (N, classes) is the big one
    summary.activations = len(chosen)

    # 1. layout (saved, so a resumed build does not redo it)
    positions_file = folder / "positions.npy"
    if resumed and positions_file.is_file():
        positions = np.load(positions_file)
    else:
        with stderr.status(f"laying out {len(chosen):,} activations (UMAP, cosine)…") if progress else nullcontext():
            positions = options.layout().fit_transform(activations)
        _save_npy(activations.astype(np.float16), folder / "activations.npy")
        _save_npy(positions.astype(np.float32), positions_file)
    summary.seconds["layout"] = round(time.perf_counter() - clock, 2)

    # 2. cells per level
    clock = time.perf_counter()
    levels = {g: cell_summaries(positions, activations, attributions, g, min_count=options.min_count,
                                exemplars=options.exemplars) for g in options.grids}
    reference = {"image_id": samples["image_id"][chosen].astype(np.int64), "k": samples["k"][chosen].astype(np.int16),
                 "y": samples["y"][chosen].astype(np.int16), "x": samples["x"][chosen].astype(np.int16),
                 "px": positions[:, 0].astype(np.float32), "py": positions[:, 1].astype(np.float32)}
    for g, level in levels.items():
        reference[f"cell_{g}_i"] = level.cell_of[:, 0].astype(np.int16)
        reference[f"cell_{g}_j"] = level.cell_of[:, 1].astype(np.int16)
        reference[f"kept_{g}"] = level.kept
    _write_parquet(pa.table(reference), folder / "reference.parquet")

    whitening = None
    if options.icons and options.whiten:
        zca, inverse = whitening_matrices(activations, options.whiten_shrinkage)
        whitening = inverse if options.objective == "article" else zca
        _save_npy(whitening, folder / "whitening.npy")

    # 3. exemplar crops (the best exemplar of each cell) and the cells table
    categories = list(meta.get("categories") or model.categories)
    rows = []
    for g, level in levels.items():
        crops = {}
        with progress_bar(len(level.cells), f"exemplars {g}×{g}", unit="cell", enabled=progress) as bar:
            for c, (i, j) in enumerate(level.cells):
                ex = []
                for rank, (ref, cos) in enumerate(zip(level.exemplars[c], level.exemplar_cosines[c])):
                    image = images[int(reference["image_id"][ref])]
                    box = position_box(model, image["width"], image["height"], int(reference["y"][ref]),
                                    int(reference["x"][ref]), layer_hw, icon_size)
                    ex.append({"image_id": int(reference["image_id"][ref]), "path": image["path"],
                               "y": int(reference["y"][ref]), "x": int(reference["x"][ref]),
                               "cosine": float(cos), "box": [round(v, 1) for v in box]})
                    if rank == 0:
                        crop = _exemplar_crop(root, image["path"], box, icon_size)
                        if crop is not None:
                            crops[(int(i), int(j))] = crop
                x0, y0, x1, y1 = Grid(g).bounds(int(i), int(j))
                rows.append({
                    "level": g, "i": int(i), "j": int(j), "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                    "count": int(level.counts[c]),
                    "top_classes": level.top_classes[c].tolist(),
                    "top_labels": [categories[k] if k < len(categories) else str(k) for k in level.top_classes[c]],
                    "top_scores": level.top_scores[c].astype(float).tolist(),
                    "icon": f"icons/{g}/{int(i)}_{int(j)}.png" if options.icons else None,
                    "exemplars": json.dumps(ex),
                })
                bar.advance()
        _save_png(_mosaic(crops, g, icon_size), folder / f"exemplars_{g}.png")
        summary.files[f"exemplars_{g}"] = str(folder / f"exemplars_{g}.png")
    cells_table = pa.Table.from_pylist(rows)
    mean_acts = np.concatenate([levels[g].mean_activation for g in options.grids])
    cells_table = cells_table.append_column(
        "mean_activation", pa.array(mean_acts.astype(np.float32).tolist(), type=pa.list_(pa.float32())))
    _write_parquet(cells_table, folder / "cells.parquet")
    for g in options.grids:  # every class's mean attribution, for the class view (the table keeps the top 5)
        _save_npy(levels[g].mean_attribution.astype(np.float16), folder / f"attributions_{g}.npy")
    summary.seconds["cells"] = round(time.perf_counter() - clock, 2)

    # 4. icons, batch by batch, skipping those already on disk
    clock = time.perf_counter()
    if options.icons:
        _render_icons(model, options, levels, folder, icon_size, precision, whitening, summary, progress)
        for g in options.grids:
            tiles = {}
            for i, j in levels[g].cells:
                tiles[(int(i), int(j))] = np.asarray(Image.open(folder / "icons" / str(g) / f"{i}_{j}.png").convert("RGB"))
            _save_png(_mosaic(tiles, g, icon_size), folder / f"mosaic_{g}.png")
            summary.files[f"mosaic_{g}"] = str(folder / f"mosaic_{g}.png")
    summary.seconds["icons"] = round(time.perf_counter() - clock, 2)
    if options.icons:
        record = _load_icon_record(folder)
        keys = [f"{row['level']}/{row['i']}_{row['j']}" for row in rows]
        cells_table = cells_table.append_column(
            "objective_start", pa.array([record[k]["objective_start"] for k in keys], pa.float32()))
        cells_table = cells_table.append_column(
            "objective_end", pa.array([record[k]["objective_end"] for k in keys], pa.float32()))
        _write_parquet(cells_table, folder / "cells.parquet")
        summary.icon_fidelity = {str(g): round(v, 4) for g, v in icon_fidelity(levels, record).items()}

    for g, level in levels.items():
        summary.levels[str(g)] = {"cells": int(len(level.cells)), "activations_in_kept_cells": int(level.kept.sum()),
                                  "dropped_cells": int(len(np.unique(level.cell_of[:, 0] * g + level.cell_of[:, 1]))
                                                       - len(level.cells))}
    manifest = {
        "complete": True, "atlasq_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "name": name, "index": index, "index_folder": str(index_folder(index, home)),
        "index_root": str(root), "model": meta["model"], "weights": meta["weights"],
        "weights_sha256": meta.get("weights_sha256"), "random_weights": bool(meta.get("random_weights")),
        "categories": categories, "input_size": model.input_size, "layer": options.layer,
        "layer_shape": list(layer_hw), "channels": int(activations.shape[1]),
        "options": {**asdict(options), "grids": list(options.grids)}, "icon_size": icon_size,
        "icon_precision": precision, "activations": summary.activations,
        "index_activations": int(len(samples["activations"])), "levels": summary.levels,
        "params_hash": params_hash, "seconds": summary.seconds, "icon_fidelity": summary.icon_fidelity,
    }
    _atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    (folder / "build.json").unlink(missing_ok=True)
    summary.files.update({"manifest": str(folder / "manifest.json"), "cells": str(folder / "cells.parquet"),
                          "reference": str(folder / "reference.parquet")})
    return summary


def _prepare_folder(folder: Path, params_hash: str, overwrite: bool) -> bool:
    """Create the atlas folder, or find an unfinished build of the same parameters to resume."""
    build_record = folder / "build.json"
    if folder.exists():
        finished = (folder / "manifest.json").is_file()
        same = build_record.is_file() and json.loads(build_record.read_text()).get("params_hash") == params_hash
        if overwrite:
            shutil.rmtree(folder)
        elif finished:
            raise AtlasError(f"atlas {folder.name!r} already exists at {folder}; pass --overwrite to rebuild it")
        elif same:
            return True
        elif any(folder.iterdir()):
            raise AtlasError(f"{folder} holds an unfinished atlas built with other parameters; pass "
                             f"--overwrite to start again")
    (folder / "icons").mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(build_record, json.dumps({"params_hash": params_hash}).encode())
    return False


ICON_RECORD = "icons/record.npz"


def _load_icon_record(folder: Path) -> dict:
    """Per icon: objective before and after optimisation, and the icon's centre activation."""
    path = folder / ICON_RECORD
    if not path.is_file():
        return {}
    with np.load(path) as data:
        keys = [str(k) for k in data["keys"]]
        return {k: {"objective_start": float(a), "objective_end": float(b), "centre": c}
                for k, a, b, c in zip(keys, data["start"], data["end"], data["centre"])}


def _save_icon_record(folder: Path, record: dict) -> None:
    keys = sorted(record)
    with replaced(folder / ICON_RECORD) as tmp, open(tmp, "wb") as file:
        np.savez(file, keys=np.array(keys), start=np.array([record[k]["objective_start"] for k in keys], np.float32),
                 end=np.array([record[k]["objective_end"] for k in keys], np.float32),
                 centre=np.stack([record[k]["centre"] for k in keys]))


def icon_fidelity(levels: dict[int, "CellSummary"], record: dict) -> dict[int, float]:
    """Per level: the fraction of icons whose centre activation is closer (cosine) to their own
    cell's mean activation than to any other cell's of that level."""
    out = {}
    for g, level in levels.items():
        keys = [f"{g}/{i}_{j}" for i, j in level.cells]
        if not keys or not all(k in record for k in keys):
            continue
        centres = unit_rows(np.stack([record[k]["centre"] for k in keys]).astype(np.float32))
        means = unit_rows(level.mean_activation)
        out[g] = float((np.argmax(centres @ means.T, axis=1) == np.arange(len(keys))).mean())
    return out


def default_icon_size(input_size: int, layer_hw: tuple[int, int]) -> int:
    """80 px at 224-px input (the article's icons), scaled to the network's input size, but at
    least three of the layer's strides, so the centre position has a neighbour on every side
    (96 px at InceptionV1's mixed5a/5b, as in Lucid's atlas recipe; on the demo network at
    mixed5a, with the dot-cosine objective, this took the icon's centre activation from cosine
    0.62 to 0.92 with its cell's mean)."""
    stride = -(-input_size // min(layer_hw))
    return max(16, round(80 * input_size / 224), 3 * stride)


def _layer_hw(model: LoadedModel, layer: str) -> tuple[int, int]:
    probe = torch.zeros(1, 3, model.input_size, model.input_size, device=model.device)
    with torch.no_grad():
        h = model.network.forward_layers(probe, [layer])[layer]
    return int(h.shape[2]), int(h.shape[3])


def _render_icons(model: LoadedModel, options: AtlasOptions, levels: dict[int, CellSummary], folder: Path,
                  icon_size: int, precision: str, whitening: np.ndarray | None, summary: AtlasSummary,
                  progress: bool) -> None:
    """Render every kept cell's icon, ``icon_batch`` cells at a time, in a fixed order.

    Batches are cut from the full list of cells (not from what is left to do) and seeded by
    their number, so a resumed build renders exactly the icons an uninterrupted one would.
    """
    cells = [(g, c, int(i), int(j)) for g in options.grids for c, (i, j) in enumerate(levels[g].cells)]
    for g in options.grids:
        (folder / "icons" / str(g)).mkdir(parents=True, exist_ok=True)
    icon = lambda g, i, j: folder / "icons" / str(g) / f"{i}_{j}.png"
    batches = [cells[s:s + options.icon_batch] for s in range(0, len(cells), options.icon_batch)]
    todo = []
    for number, batch in enumerate(batches):
        if all(icon(g, i, j).is_file() for g, _, i, j in batch):
            summary.icons_reused += len(batch)
        else:
            todo.append((number, batch))
    record = _load_icon_record(folder)
    if precision == "bf16" and model.device.type == "cpu":
        model.network.to(memory_format=torch.channels_last)
    white = torch.from_numpy(whitening).to(model.device) if whitening is not None else None
    with progress_bar(sum(len(b) for _, b in todo), "icons", unit="icon", enabled=progress) as bar:
        for number, batch in todo:
            directions = torch.from_numpy(np.stack([levels[g].mean_activation[c] for g, c, _, _ in batch]))
            render = lambda d, attempt: render_directions(
                model.network, options.layer, d, size=icon_size, steps=options.steps, lr=options.lr,
                cossim_pow=options.cossim_pow, whitening=white, variant=options.objective, precision=precision,
                seed=(options.seed * 1_000_003 + number) * 16 + attempt, init_sd=0.01 * 8 ** attempt,
                settle_steps=round(options.settle * options.steps))
            rendered = render(directions, 0)
            # A near-grey start whose centre activation has no active path to the direction gets
            # no gradient and stays put; Lucid renders every icon several times, we retry only
            # those, from livelier (higher-variance) starts.
            for attempt in range(1, options.attempts):
                weak = np.flatnonzero(rendered.final_objective <= rendered.initial_objective * 1.05 + 1e-6)
                if not len(weak):
                    break
                retry = render(directions[weak], attempt)
                for n, w in enumerate(weak):
                    if retry.final_objective[n] > rendered.final_objective[w]:
                        for name in ("images", "initial_objective", "final_objective", "final_activation"):
                            getattr(rendered, name)[w] = getattr(retry, name)[n]
            for (g, c, i, j), image, start, end, centre in zip(
                    batch, rendered.images, rendered.initial_objective, rendered.final_objective, rendered.final_activation):
                _save_png(image, icon(g, i, j))
                record[f"{g}/{i}_{j}"] = {"objective_start": float(start), "objective_end": float(end),
                                          "centre": centre.astype(np.float32)}
            _save_icon_record(folder, record)
            summary.icons_rendered += len(batch)
            bar.advance(len(batch))
