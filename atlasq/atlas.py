"""The reference activation atlas: layout, multi-level grid, attribution labels, icons.

From an index built with attributions, :func:`build_atlas` takes the sampled activations of one
layer, lays them out in 2-D (:class:`atlasq.layout.Layout`), bins the layout at several grid sizes
(:class:`atlasq.layout.Grid`), summarises every kept cell (count, mean activation, mean
attribution → top classes, nearest real exemplars) and renders one feature-visualization icon per
cell (:mod:`atlasq.featurevis`). Each stage is one function with a typed result
(:func:`plan_build` → :class:`BuildPlan`, :func:`lay_out` → :class:`AtlasLayout`,
:func:`bin_cells` → :class:`AtlasCells`, :func:`write_exemplars` → :class:`CellTable`,
:func:`render_icons` → :class:`IconResult`, :func:`write_manifest`); :func:`build_atlas` runs
them in order. The files are written and read by :class:`atlasq.atlasdir.AtlasFolder`, which
also describes them.

Nothing is written until every option, the index and the network have been checked and every
grid level keeps at least one cell. Building is resumable: the layout and cells are saved before
the icons, each finished icon batch is written at once, and the manifest is written last. Running
the same build again picks up where it stopped; different parameters are refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from . import __version__
from .atlasdir import AtlasError, AtlasFolder, AtlasOptionError
from .errors import IncompatibleError, InvalidOptionError
from .home import atlas_folder
from .images import CropGeometry, ImageDecodeError, open_rgb, real_path
from .layout import Grid, Layout, unit_rows
from .progress import progress_bar, stderr
from .store import IndexStore, index_folder

if TYPE_CHECKING:
    from .model import LoadedModel

# torch, the networks and feature visualization load only when an atlas is built: reading one
# (`atlasq atlas info`, histograms, the app) stays torch-free and starts in well under a second.
# These thin wrappers are module attributes, so tests can still replace them (monkeypatch).


def load_model(*args, **kwargs):
    """:func:`atlasq.model.load_model`, imported on first use."""
    from .model import load_model as load
    return load(*args, **kwargs)


def layer_shapes(*args, **kwargs):
    """:func:`atlasq.model.layer_shapes`, imported on first use."""
    from .model import layer_shapes as shapes
    return shapes(*args, **kwargs)


def resolve_precision(*args, **kwargs):
    """:func:`atlasq.model.resolve_precision`, imported on first use."""
    from .model import resolve_precision as resolve
    return resolve(*args, **kwargs)


def render_directions(*args, **kwargs):
    """:func:`atlasq.featurevis.render_directions`, imported on first use."""
    from .featurevis import render_directions as render
    return render(*args, **kwargs)

__all__ = ["AtlasOptions", "AtlasError", "Atlas", "build_atlas", "load_atlas", "atlas_folder", "atlas_summary",
           "whitening_matrices", "cell_summaries", "default_icon_size", "layer_shapes", "option_default",
           "BuildPlan", "AtlasLayout", "AtlasCells", "CellTable", "IconResult", "AtlasSummary", "Selection"]

TOP_CLASSES = 5
#: What stands for the top label of a cell whose mean attribution is positive for no class.
NO_POSITIVE_CLASS = "(no positive class)"


@dataclass(frozen=True)
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
        :func:`atlasq.featurevis.render_directions`, which restarts Adam for it). With a quarter
        of 256 steps settling, icons are as close to their cells as with an eighth of 512 (README).
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

    Frozen: a build's options are recorded (and hashed) as given; :func:`dataclasses.replace`
    makes a changed copy. These field defaults are the only ones: the command line reads them
    (:func:`option_default`) instead of repeating them.
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
    steps: int = 256
    icon_size: int | None = None
    icon_batch: int = 32
    cossim_pow: float = 3.0
    lr: float = 0.05
    settle: float = 0.25
    attempts: int = 3
    whiten: bool = False
    objective: str = "cosine"
    whiten_shrinkage: float = 0.01
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.grids, tuple):  # a list from JSON or a caller: the same grids, hashable
            object.__setattr__(self, "grids", tuple(self.grids))

    def validate(self) -> None:
        """Raise :class:`AtlasError` (an :class:`InvalidOptionError` family member) naming the first
        option that cannot work; the command line's flag is the name with ``-`` for ``_``."""
        grids = self.grids
        if not grids or any(not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g < 1 for g in grids):
            raise AtlasOptionError(f"grids must be positive integers, not {self.grids!r}")
        if len(set(grids)) != len(grids):
            raise AtlasOptionError(f"grid sizes repeat: {self.grids!r}")
        if self.min_count < 1:
            raise AtlasOptionError("min_count must be at least 1")
        if self.max_activations is not None and self.max_activations < 4:
            raise AtlasOptionError("max_activations must be at least 4")
        try:  # n_neighbors, min_dist, fit_size, n_epochs: the layout's own rules
            self.layout().check_parameters()
        except InvalidOptionError as exc:
            raise AtlasOptionError(str(exc)) from None
        for name in ("steps", "icon_batch", "exemplars", "attempts"):
            if getattr(self, name) < 1:
                raise AtlasOptionError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.icon_size is not None and self.icon_size < 16:
            raise AtlasOptionError("icon_size must be at least 16 pixels")
        from .featurevis.objectives import OBJECTIVES  # torch: only a build validates its options

        if self.objective not in OBJECTIVES:
            raise AtlasOptionError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if not self.cossim_pow >= 0:
            raise AtlasOptionError("cossim_pow must be non-negative")
        if not self.lr > 0:
            raise AtlasOptionError("lr must be positive")
        if not 0 <= self.settle < 1:
            raise AtlasOptionError("settle must be a fraction of the steps in [0, 1)")
        if self.whiten_shrinkage < 0:
            raise AtlasOptionError("whiten_shrinkage must be non-negative")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise AtlasOptionError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")

    def to_dict(self) -> dict:
        """As recorded in the manifest (grids as a list)."""
        return {**asdict(self), "grids": list(self.grids)}

    def layout(self) -> Layout:
        return Layout(n_neighbors=self.n_neighbors, min_dist=self.min_dist, metric="cosine",
                      fit_size=self.fit_size, n_epochs=self.n_epochs, random_state=self.seed)


def option_default(name: str):
    """The default of :class:`AtlasOptions` field ``name`` (for help texts)."""
    return next(f.default for f in fields(AtlasOptions) if f.name == name)


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
    """A built atlas, read back from its folder (files through :attr:`files`)."""

    folder: Path
    manifest: dict
    cells: "pa.Table"
    reference: "pa.Table"
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cells: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def files(self) -> AtlasFolder:
        return AtlasFolder(self.folder)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def levels(self) -> list[int]:
        return list(self.manifest["options"]["grids"])

    def activations(self) -> np.ndarray:
        return self.files.activations()

    def positions(self) -> np.ndarray:
        return self.files.positions()

    def cells_at(self, level: int) -> dict[str, np.ndarray | list]:
        """The kept cells of ``level`` as columns. ``top_classes``/``top_labels``/``top_scores`` hold
        only classes with a positive mean attribution (a class the cell argues against is not one of
        its top classes), so a cell may have fewer than five, or none. Read once per level."""
        if level not in self._cells:
            table = self.cells.filter(pa.compute.equal(self.cells["level"], level)).to_pydict()
            for n, scores in enumerate(table.get("top_scores", [])):
                keep = [s > 0 for s in scores]
                for column in ("top_classes", "top_labels", "top_scores"):
                    table[column][n] = [v for v, k in zip(table[column][n], keep) if k]
            self._cells[level] = table
        return self._cells[level]

    def row_of_cell(self, level: int) -> np.ndarray:
        """(G·G,) flat cell id i·G + j → its row in :meth:`cells_at` order, -1 for a cell not kept.
        The one lookup from a cell to its row (vectorised, so it also serves many cells at once)."""
        if level not in self._rows:
            cells = self.cells_at(level)
            rows = np.full(level * level, -1, np.int64)
            rows[np.asarray(cells["i"], np.int64) * level + np.asarray(cells["j"], np.int64)] = \
                np.arange(len(cells["i"]))
            self._rows[level] = rows
        return self._rows[level]

    def cell_row(self, level: int, i: int, j: int) -> int | None:
        """Row of cell (i, j) in :meth:`cells_at` order (None: outside the grid or not kept)."""
        if not (0 <= i < level and 0 <= j < level):
            return None
        row = int(self.row_of_cell(level)[i * level + j])
        return row if row >= 0 else None

    def mean_attributions(self, level: int) -> np.ndarray | None:
        """(cells, classes) mean attribution of every kept cell of ``level``, rows in
        :meth:`cells_at` order (None for an atlas built before this file existed)."""
        return self.files.mean_attributions(level)

    def icon_path(self, level: int, i: int, j: int) -> Path:
        return self.files.icon_path(level, i, j)

    def tiles_path(self, level: int, tiles: str = "icons") -> Path:
        """The mosaic of ``level`` (icons, or exemplar crops for ``tiles="exemplars"`` or an atlas
        without icons)."""
        return self.files.tiles_path(level, tiles)


def load_atlas(name_or_folder: str | Path, home: Path | None = None) -> Atlas:
    """Open an atlas by name (under the home's atlas folder) or by folder.

    Raises :class:`~atlasq.errors.NotFoundError` when there is none, :class:`AtlasError` for an
    unfinished build (with how to finish it) or one that keeps no cell at some level (made by an
    older atlasq), :class:`~atlasq.errors.IncompatibleError` for a newer format."""
    files = AtlasFolder.find(name_or_folder, home)
    manifest = files.read_manifest()
    empty = [g for g, facts in (manifest.get("levels") or {}).items() if not facts.get("cells")]
    if empty:
        raise AtlasError(f"atlas {files.name!r} keeps no cell at level {', '.join(empty)}; rebuild it with "
                         f"`atlasq atlas build ... --overwrite` and a lower --min-count or without that grid")
    return Atlas(files.folder, manifest, files.read_cells(), files.read_reference())


def atlas_summary(name: str | Path, home: Path | None = None) -> dict:
    """What ``atlasq atlas info`` prints: the manifest's key facts and, per level, the cell count
    and the most common top labels."""
    atlas = load_atlas(name, home)
    m = atlas.manifest
    levels = []
    for g in atlas.levels:
        cells = atlas.cells_at(g)
        labels, counts = np.unique([t[0] if t else NO_POSITIVE_CLASS for t in cells["top_labels"]],
                                   return_counts=True)
        order = np.argsort(-counts, kind="stable")
        levels.append({"size": g, "cells": len(cells["i"]), "activations": int(sum(cells["count"])),
                       "top_labels": [(str(labels[o]), int(counts[o])) for o in order],
                       "mosaic": str(atlas.files.mosaic_path(g)) if m["options"]["icons"] else None,
                       "exemplars": str(atlas.files.exemplars_path(g))})
    keys = ("index", "model", "weights", "random_weights", "layer", "activations", "index_activations",
            "icon_size", "icon_precision", "atlasq_version", "created", "options", "seconds", "format",
            "kind", "analysis")
    return {"name": m["name"], "folder": str(atlas.folder), **{k: m.get(k, 1 if k == "format" else None) for k in keys},
            "levels": levels}


# ----------------------------------------------------------------------------- building

def _read_index(store: IndexStore, options: AtlasOptions) -> tuple[dict, dict]:
    meta = store.meta()
    layers = meta.get("layers") or []
    if options.layer not in layers:
        raise IncompatibleError(f"index {store.folder.name!r} has no sampled activations of {options.layer!r} "
                                f"(it has {', '.join(layers) or 'none'}); choose --layer {' or '.join(layers) or '…'}, "
                                f"or index with `--layers {options.layer}`")
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


@dataclass(frozen=True)
class Selection:
    """What makes a derived atlas (a class or two-class atlas, :mod:`atlasq.class_atlas`) differ
    from the general one, in the same folder format: which of the index's activations it keeps,
    how it lays them out, what extra columns its cells table gets, and what its manifest says.

    choose : the index's samples (image_id, k, y, x, activations, attributions) → the rows kept
        (it replaces the seeded ``max_activations`` subsample; raise an :class:`AtlasqError` when
        too few are left).
    lay_out : the plan → (N, 2) positions in [0, 1]² of the kept activations.
    describe : manifest fields (``kind`` and ``analysis``); part of the build's parameter hash.
    cell_columns : the plan and its cells → extra columns of the cells table, in its row order
        (levels in ``options.grids`` order, cells as binned).
    """

    choose: Callable[[dict], np.ndarray]
    lay_out: Callable[["BuildPlan"], np.ndarray]
    describe: dict
    cell_columns: Callable[["BuildPlan", "AtlasCells"], dict] | None = None


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs, checked before anything is written: the options (grids as
    ints), the index's chosen samples, the network, and whether an unfinished build of the same
    parameters is there to resume."""

    index: str
    name: str
    home: Path | None
    options: AtlasOptions
    files: AtlasFolder
    meta: dict
    samples: dict               # the chosen samples: image_id, k, y, x, activations, attributions
    index_activations: int      # all of the index's activations of the layer
    images: dict                # image id → its row (path, width, height …)
    root: Path
    model: LoadedModel
    layer_hw: tuple[int, int]
    icon_size: int
    precision: str
    params_hash: str
    resume: bool
    categories: list
    selection: Selection | None = None   # a derived atlas's choice and layout (None: the general atlas)


def plan_build(index: str, name: str, *, home: Path | None = None, options: AtlasOptions | None = None,
               device: str | None = None, overwrite: bool = False, selection: Selection | None = None) -> BuildPlan:
    """Check every option, the index, the network and the atlas folder; write nothing."""
    options = options or AtlasOptions()
    options.validate()
    options = replace(options, grids=tuple(int(g) for g in options.grids))
    files = AtlasFolder.named(name, home)
    with IndexStore(index_folder(index, home)) as store:
        meta, samples = _read_index(store, options)
        images = {r["id"]: r for r in store.images()}
    chosen = _subsample(len(samples["activations"]), options.max_activations, options.seed)
    if selection is not None:
        chosen = np.asarray(selection.choose(samples), np.int64)
    try:
        options.layout()._validate(len(chosen))
    except ValueError as exc:
        raise AtlasOptionError(f"layout: {exc}") from exc
    model = load_model(meta["model"], meta["weights"], device=device, seed=meta.get("seed", 0))
    if meta.get("weights_sha256") and model.weights_sha256 != meta["weights_sha256"]:
        raise IncompatibleError(f"the weights of index {index!r} have changed since it was built")
    _, *layer_hw = layer_shapes(model, [options.layer])[options.layer]
    layer_hw = tuple(layer_hw)
    icon_size = options.icon_size or default_icon_size(model.input_size, layer_hw)
    precision = resolve_precision(options.precision, model.device)
    params = {"index": index, "options": options.to_dict(), "icon_size": icon_size, "precision": precision}
    if selection is not None:
        params["selection"] = selection.describe
    params_hash = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    resume = files.check_start(params_hash, overwrite=overwrite)
    chosen_samples = {key: samples[key][chosen] for key in ("image_id", "k", "y", "x", "attributions")}
    chosen_samples["activations"] = np.asarray(samples["activations"][chosen], np.float32)
    return BuildPlan(index=index, name=name, home=home, options=options, files=files, meta=meta,
                     samples=chosen_samples, index_activations=int(len(samples["activations"])), images=images,
                     root=Path(meta["root"]), model=model, layer_hw=layer_hw, icon_size=icon_size,
                     precision=precision, params_hash=params_hash, resume=resume,
                     categories=list(meta.get("categories") or model.categories), selection=selection)


@dataclass(frozen=True)
class AtlasLayout:
    """Positions in [0, 1]² of the chosen activations (from UMAP, or from the unfinished build)."""

    positions: np.ndarray   # (N, 2) float32
    from_disk: bool


def lay_out(plan: BuildPlan, *, progress: bool = False) -> AtlasLayout:
    """The 2-D layout of the plan's activations; a resumed build reads the one it saved."""
    if plan.resume and plan.files.has_layout():
        return AtlasLayout(plan.files.positions(), from_disk=True)
    activations = plan.samples["activations"]
    if plan.selection is not None:
        return AtlasLayout(np.asarray(plan.selection.lay_out(plan), np.float32), from_disk=False)
    with stderr.status(f"laying out {len(activations):,} activations (UMAP, cosine)…") if progress else nullcontext():
        positions = plan.options.layout().fit_transform(activations)
    return AtlasLayout(np.asarray(positions), from_disk=False)


@dataclass(frozen=True)
class AtlasCells:
    """Every grid level's kept cells, and the reference table's columns (one row per activation)."""

    levels: dict            # grid size → CellSummary
    reference: dict         # column → array


def bin_cells(plan: BuildPlan, layout: AtlasLayout) -> AtlasCells:
    """Bin the layout at every grid size and summarise the kept cells. A level that keeps no cell
    would leave an atlas nothing can be placed on: refused, naming the level and what to change."""
    options, s = plan.options, plan.samples
    positions = layout.positions
    levels = {g: cell_summaries(positions, s["activations"], s["attributions"], g, min_count=options.min_count,
                                exemplars=options.exemplars) for g in options.grids}
    empty = [g for g, level in levels.items() if not len(level.cells)]
    if empty:
        g = empty[0]
        fullest = int(np.bincount(levels[g].cell_of[:, 0] * g + levels[g].cell_of[:, 1]).max())
        others = [str(k) for k in options.grids if k not in empty]
        raise AtlasOptionError(
            f"no cell of the {g}×{g} grid holds --min-count {options.min_count} of the {len(positions):,} "
            f"activations (the fullest holds {fullest}), so that level would be empty"
            + (f" while grids {', '.join(others)} keep cells" if others else "")
            + f"; lower --min-count to at most {fullest}, or leave grid {g} out of --grids"
            + ("" if others else " (or index more images)"))
    reference = {"image_id": s["image_id"].astype(np.int64), "k": s["k"].astype(np.int16),
                 "y": s["y"].astype(np.int16), "x": s["x"].astype(np.int16),
                 "px": positions[:, 0].astype(np.float32), "py": positions[:, 1].astype(np.float32)}
    for g, level in levels.items():
        reference[f"cell_{g}_i"] = level.cell_of[:, 0].astype(np.int16)
        reference[f"cell_{g}_j"] = level.cell_of[:, 1].astype(np.int16)
        reference[f"kept_{g}"] = level.kept
    return AtlasCells(levels=levels, reference=reference)


@dataclass(frozen=True)
class CellTable:
    """The cells table (one row per kept cell and level) as written, and its rows' keys."""

    table: "pa.Table"
    keys: list              # "<G>/<i>_<j>" per row, in table order


def write_exemplars(plan: BuildPlan, cells: AtlasCells, *, progress: bool = False) -> CellTable:
    """Per kept cell: its exemplars (with the region of their image each one sees) and labels;
    the best exemplar's crops as one mosaic per level; the cells table and every class's mean
    attribution (the table keeps the top 5)."""
    options, files, reference = plan.options, plan.files, cells.reference
    rows = []
    for g, level in cells.levels.items():
        crops = {}
        with progress_bar(len(level.cells), f"exemplars {g}×{g}", unit="cell", enabled=progress) as bar:
            for c, (i, j) in enumerate(level.cells):
                ex = []
                for rank, (ref, cos) in enumerate(zip(level.exemplars[c], level.exemplar_cosines[c])):
                    image = plan.images[int(reference["image_id"][ref])]
                    box = position_box(plan.model.transform, image["width"], image["height"],
                                       int(reference["y"][ref]), int(reference["x"][ref]), plan.layer_hw,
                                       plan.icon_size)
                    ex.append({"image_id": int(reference["image_id"][ref]), "path": image["path"],
                               "y": int(reference["y"][ref]), "x": int(reference["x"][ref]),
                               "cosine": float(cos), "box": [round(v, 1) for v in box]})
                    if rank == 0:
                        crop = _exemplar_crop(plan.root, image["path"], box, plan.icon_size)
                        if crop is not None:
                            crops[(int(i), int(j))] = crop
                x0, y0, x1, y1 = Grid(g).bounds(int(i), int(j))
                rows.append({
                    "level": g, "i": int(i), "j": int(j), "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                    "count": int(level.counts[c]),
                    "top_classes": level.top_classes[c].tolist(),
                    "top_labels": [plan.categories[k] if k < len(plan.categories) else str(k)
                                   for k in level.top_classes[c]],
                    "top_scores": level.top_scores[c].astype(float).tolist(),
                    "icon": files.icon_name(g, i, j) if options.icons else None,
                    "exemplars": json.dumps(ex),
                })
                bar.advance()
        files.save_exemplars(g, _mosaic(crops, g, plan.icon_size))
    table = pa.Table.from_pylist(rows)
    if plan.selection is not None and plan.selection.cell_columns is not None:
        for column, values in plan.selection.cell_columns(plan, cells).items():
            table = table.append_column(column, pa.array(values))
    mean_acts = np.concatenate([cells.levels[g].mean_activation for g in options.grids])
    table = table.append_column(
        "mean_activation", pa.array(mean_acts.astype(np.float32).tolist(), type=pa.list_(pa.float32())))
    files.write_cells(table)
    for g in options.grids:
        files.save_attributions(g, cells.levels[g].mean_attribution)
    return CellTable(table, [f"{row['level']}/{row['i']}_{row['j']}" for row in rows])


@dataclass(frozen=True)
class IconResult:
    """What the icon stage did: icons rendered and reused, the cells table with each icon's
    objective before and after, and per level the share of icons closest to their own cell."""

    rendered: int
    reused: int
    table: "pa.Table"
    fidelity: dict          # grid size → fraction


def render_icons(plan: BuildPlan, cells: AtlasCells, table: CellTable, *, progress: bool = False) -> IconResult:
    """Render every kept cell's icon (resuming batch by batch), the icon mosaics, and the
    objectives in the cells table."""
    options, files = plan.options, plan.files
    whitening = None
    if options.whiten:
        zca, inverse = whitening_matrices(plan.samples["activations"], options.whiten_shrinkage)
        whitening = inverse if options.objective == "article" else zca
        files.save_whitening(whitening)
    rendered, reused = _render_icon_batches(plan, cells.levels, whitening, progress)
    for g in options.grids:
        tiles = {(int(i), int(j)): files.read_icon(g, i, j) for i, j in cells.levels[g].cells}
        files.save_mosaic(g, _mosaic(tiles, g, plan.icon_size))
    record = files.load_icon_record()
    out = table.table.append_column(
        "objective_start", pa.array([record[k]["objective_start"] for k in table.keys], pa.float32()))
    out = out.append_column(
        "objective_end", pa.array([record[k]["objective_end"] for k in table.keys], pa.float32()))
    files.write_cells(out)
    return IconResult(rendered, reused, out, icon_fidelity(cells.levels, record))


def write_manifest(plan: BuildPlan, summary: AtlasSummary) -> dict:
    """The manifest, written last (its presence marks the atlas complete)."""
    m = plan.meta
    manifest = {
        "complete": True, "atlasq_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "name": plan.name, "index": plan.index, "index_folder": str(index_folder(plan.index, plan.home)),
        "index_root": str(plan.root), "model": m["model"], "weights": m["weights"],
        "weights_sha256": m.get("weights_sha256"), "random_weights": bool(m.get("random_weights")),
        "index_seed": m.get("seed", 0),
        "categories": plan.categories, "input_size": plan.model.input_size, "layer": plan.options.layer,
        "layer_shape": list(plan.layer_hw), "channels": int(plan.samples["activations"].shape[1]),
        "preprocess": plan.model.transform.geometry.to_dict(),
        "options": plan.options.to_dict(), "icon_size": plan.icon_size,
        "icon_precision": plan.precision, "activations": summary.activations,
        "index_activations": plan.index_activations, "levels": summary.levels,
        "params_hash": plan.params_hash, "seconds": summary.seconds, "icon_fidelity": summary.icon_fidelity,
    }
    if plan.selection is not None:
        manifest.update(plan.selection.describe)
    plan.files.finish(manifest)
    return manifest


def build_atlas(index: str, name: str, *, home: Path | None = None, options: AtlasOptions | None = None,
                device: str | None = None, overwrite: bool = False, progress: bool = True,
                selection: Selection | None = None) -> AtlasSummary:
    """Build atlas ``name`` from index ``index``: plan (check everything), lay out, bin into cells
    (refusing a level without cells), and only then write: layout, reference, exemplars and
    cells, icons, manifest (see :mod:`atlasq.atlasdir` for the files). A ``selection`` makes a
    derived atlas (see :class:`Selection`)."""
    clock = time.perf_counter()
    plan = plan_build(index, name, home=home, options=options, device=device, overwrite=overwrite,
                      selection=selection)
    options, files = plan.options, plan.files
    layout = lay_out(plan, progress=progress)
    cells = bin_cells(plan, layout)
    files.start(plan.params_hash, resume=plan.resume)
    if not layout.from_disk:
        files.save_layout(plan.samples["activations"], layout.positions)
    summary = AtlasSummary(name=name, folder=str(files.folder), index=index, layer=options.layer,
                           activations=len(layout.positions), resumed=plan.resume,
                           random_weights=bool(plan.meta.get("random_weights")))
    files.write_reference(pa.table(cells.reference))
    summary.seconds["layout"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    table = write_exemplars(plan, cells, progress=progress)
    summary.seconds["cells"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    if options.icons:
        icons = render_icons(plan, cells, table, progress=progress)
        summary.icons_rendered, summary.icons_reused = icons.rendered, icons.reused
        summary.icon_fidelity = {str(g): round(v, 4) for g, v in icons.fidelity.items()}
    summary.seconds["icons"] = round(time.perf_counter() - clock, 2)

    for g, level in cells.levels.items():
        summary.levels[str(g)] = {"cells": int(len(level.cells)), "activations_in_kept_cells": int(level.kept.sum()),
                                  "dropped_cells": int(len(np.unique(level.cell_of[:, 0] * g + level.cell_of[:, 1]))
                                                       - len(level.cells))}
    write_manifest(plan, summary)
    summary.files = files.files(list(options.grids), options.icons)
    return summary


def position_box(geometry: CropGeometry, width: int, height: int, y: int, x: int, layer_hw: tuple[int, int],
                 side: float) -> tuple[float, float, float, float]:
    """The region of the original image (pixels) that layer position (y, x) sees: a square of
    ``side`` network-input pixels centred on the position, mapped back through the preprocessing
    (``geometry``: a :class:`~atlasq.images.CropGeometry` or a network's transform, anything with
    its ``source_box``)."""
    (crop_w, crop_h), (bx0, by0, bx1, by1) = geometry.source_box(width, height)
    sx, sy = (bx1 - bx0) / crop_w, (by1 - by0) / crop_h
    cy = (y + 0.5) * crop_h / layer_hw[0]
    cx = (x + 0.5) * crop_w / layer_hw[1]
    half = side / 2
    return (bx0 + (cx - half) * sx, by0 + (cy - half) * sy, bx0 + (cx + half) * sx, by0 + (cy + half) * sy)


def _exemplar_crop(root: Path, path: str, box, size: int) -> np.ndarray | None:
    try:
        image = open_rgb(real_path(root, path))
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


def _render_icon_batches(plan: BuildPlan, levels: dict[int, CellSummary], whitening: np.ndarray | None,
                         progress: bool) -> tuple[int, int]:
    """Render every kept cell's icon, ``icon_batch`` cells at a time, in a fixed order; returns
    (rendered, reused).

    Batches are cut from the full list of cells (not from what is left to do) and seeded by
    their number, so a resumed build renders exactly the icons an uninterrupted one would.
    """
    import torch

    options, files, model = plan.options, plan.files, plan.model
    cells = [(g, c, int(i), int(j)) for g in options.grids for c, (i, j) in enumerate(levels[g].cells)]
    batches = [cells[s:s + options.icon_batch] for s in range(0, len(cells), options.icon_batch)]
    todo, reused, rendered_count = [], 0, 0
    for number, batch in enumerate(batches):
        if all(files.icon_path(g, i, j).is_file() for g, _, i, j in batch):
            reused += len(batch)
        else:
            todo.append((number, batch))
    record = files.load_icon_record()
    if plan.precision == "bf16" and model.device.type == "cpu":
        model.network.to(memory_format=torch.channels_last)
    white = torch.from_numpy(whitening).to(model.device) if whitening is not None else None
    with progress_bar(sum(len(b) for _, b in todo), "icons", unit="icon", enabled=progress) as bar:
        for number, batch in todo:
            directions = torch.from_numpy(np.stack([levels[g].mean_activation[c] for g, c, _, _ in batch]))
            render = lambda d, attempt: render_directions(
                model.network, options.layer, d, size=plan.icon_size, steps=options.steps, lr=options.lr,
                cossim_pow=options.cossim_pow, whitening=white, variant=options.objective, precision=plan.precision,
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
                files.save_icon(g, i, j, image)
                record[f"{g}/{i}_{j}"] = {"objective_start": float(start), "objective_end": float(end),
                                          "centre": centre.astype(np.float32)}
            files.save_icon_record(record)
            rendered_count += len(batch)
            bar.advance(len(batch))
    return rendered_count, reused
