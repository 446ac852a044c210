"""Semantic histograms: any indexed dataset placed on a fixed reference atlas, cell by cell.

Placing never re-runs UMAP. Each of the dataset's sampled activations (same model, weights and
layer as the atlas) is compared with the atlas's reference activations in the original activation
space, by cosine, with FAISS. Its cell at each grid level is the similarity-weighted vote of its
``k`` nearest reference activations, counting only those in kept cells. An activation farther from
its nearest reference activation than the reference's own spacing is **off-atlas**: something the
reference never showed. The spacing threshold is the 99th percentile of the reference's
leave-one-image-out nearest-neighbour distance. It is learned once per atlas and kept in the atlas
folder (:meth:`atlasq.atlasdir.AtlasFolder.save_placement`). Off-atlas activations get no cell.

Placements are stored in the dataset's DuckDB (table ``placements``), so "the images in cell
(i, j)" is one query. Running again after the index changed places only the new activations and
forgets those of images no longer indexed. Whether placements are current is judged by content:
the digest of the index's image ids when it was last placed (a changed file gets a new id), not
by counts, which stay equal when one image's content is replaced.

Results are dataclasses (:class:`Histogram`, :class:`CellImages`, :class:`Comparison`) whose
``to_dict()`` is what ``--json`` prints; the command line, the API and the app read the same fields.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .atlas import NO_POSITIVE_CLASS, Atlas, load_atlas
from .atlasdir import AtlasOptionError
from .errors import AtlasqError, IncompatibleError, InvalidOptionError
from .home import comparison_folder
from .layout import unit_rows
from .progress import stderr
from .store import IndexStore, index_folder

__all__ = ["PlacementError", "IncompatibleIndexError", "ReferenceSearch", "reference_index", "nearest",
           "place_activations", "place_index", "placement_state", "record_placed", "histogram", "cell_images", "compare",
           "Histogram", "HistogramCell", "Totals", "CellImages", "CellImage", "Comparison", "ComparedCell",
           "PlaceSummary", "OFF_ATLAS_QUANTILE", "compact_reference_index"]

PLACE_K = 10
OFF_ATLAS_QUANTILE = 0.99
EXACT_LIMIT = 20_000      # up to this many reference activations, the search is exact
THRESHOLD_SAMPLE = 20_000  # reference activations used to learn the off-atlas threshold


class PlacementError(AtlasqError, ValueError):
    """A dataset cannot be placed on this atlas (the message says why)."""


class IncompatibleIndexError(PlacementError, IncompatibleError):
    """The dataset's activations are not comparable with the atlas's (other model, weights or layer)."""


class ReferenceSearch:
    """Cosine k-NN over an atlas's reference activations, and the off-atlas threshold.

    Up to :data:`EXACT_LIMIT` reference activations the search is exact (``IndexFlatIP``);
    above it, an inverted-file index (``IVF``, 4·√N lists, 8 probed; ``bench/histogram.py``
    checks its neighbours against an exact search). Both the FAISS file and the threshold are
    written to the atlas folder the first time and reused.
    """

    def __init__(self, atlas: Atlas, index=None, threshold: float | None = None):
        """Search ``atlas``'s reference activations with ``index`` (built here when None) and the
        off-atlas ``threshold`` (learned here when None). Writes nothing: :meth:`for_atlas` keeps
        both in the atlas folder."""
        self.atlas = atlas
        self.image_ids = np.asarray(atlas.reference["image_id"].to_numpy(), np.int64)
        self.index = index if index is not None else reference_index(unit_rows(atlas.activations()))
        self.threshold = float(threshold) if threshold is not None else self._learn_threshold()

    @classmethod
    def for_atlas(cls, atlas: Atlas) -> "ReferenceSearch":
        """The search the atlas folder keeps (made and saved the first time, and again after the
        atlas was rebuilt)."""
        files = atlas.files
        record = files.placement_record()
        if record.get("params_hash") == atlas.manifest.get("params_hash") and "threshold" in record:
            index = files.load_placement_index()
            if index is not None:
                return cls(atlas, index, record["threshold"])
        search = cls(atlas)
        files.save_placement(search.index, {"params_hash": atlas.manifest.get("params_hash"), "kind": search.kind,
                                            "quantile": OFF_ATLAS_QUANTILE, "threshold": search.threshold})
        return search

    @property
    def kind(self) -> str:
        name = self.index.__class__.__name__
        return ("exact" if name == "IndexFlatIP" else
                "compact" if name in ("IndexIVFPQ", "IndexScalarQuantizer") else "ivf")

    def _learn_threshold(self) -> float:
        """99th percentile of each reference activation's cosine distance to its nearest reference
        activation from another image (an image's own samples are left out, as they would be for
        a new image)."""
        n = len(self.image_ids)
        rows = np.sort(np.random.default_rng(1).choice(n, min(n, THRESHOLD_SAMPLE), replace=False))
        sims, _ = self.search(self.atlas.activations()[rows], 1, exclude_images=self.image_ids[rows])
        return float(np.quantile(1.0 - sims[:, 0], OFF_ATLAS_QUANTILE))

    def search(self, activations: np.ndarray, k: int, *, exclude_images: np.ndarray | None = None,
               batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, reference rows) of the ``k`` nearest reference activations, best first.
        With ``exclude_images``, neighbours from the query's own image (same id) are skipped."""
        extra = 0
        if exclude_images is not None:
            _, per_image = np.unique(self.image_ids, return_counts=True)
            extra = int(per_image.max())
        sims, rows = nearest(self.index, activations, min(k + extra, self.index.ntotal), batch=batch)
        if exclude_images is not None:
            same = (rows >= 0) & (self.image_ids[np.maximum(rows, 0)] == np.asarray(exclude_images)[:, None])
            sims = np.where(same, -np.inf, sims)
            order = np.argsort(-sims, axis=1, kind="stable")
            sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
            rows = np.where(np.isfinite(sims), rows, -1)
            sims = np.where(np.isfinite(sims), sims, -1.0)
        out_sims = np.full((len(activations), k), -1.0, np.float32)
        out_rows = np.full((len(activations), k), -1, np.int64)
        out_sims[:, :min(k, sims.shape[1])] = sims[:, :k]
        out_rows[:, :min(k, rows.shape[1])] = rows[:, :k]
        return out_sims, out_rows


def reference_index(reference: np.ndarray):
    """A FAISS inner-product index of unit-length ``reference`` rows: exact up to
    :data:`EXACT_LIMIT` rows, else IVF with 4·√N lists trained on a seeded subsample."""
    import faiss

    n, d = reference.shape
    if n <= EXACT_LIMIT:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(reference[np.random.default_rng(0).choice(n, min(n, lists * 64), replace=False)])
    index.add(reference)
    return index


#: The compact placement index of ``atlas export --compact`` (a FAISS factory string): an inverted
#: file of about √N lists and residuals product-quantised to {m} bytes. ``bench/scale.py`` measures
#: its size against the raw float16 activations and its cell agreement with exact placement.
COMPACT_SPEC = "IVF{lists},PQ{m}np"  # np: no polysemous training (slow, and unused here)
COMPACT_BYTES = 64   # PQ code bytes per reference activation (plus FAISS's 8-byte id)
COMPACT_NPROBE = 16  # lists searched, kept in the index file


def compact_reference_index(reference: np.ndarray, *, code_bytes: int = COMPACT_BYTES, nprobe: int = COMPACT_NPROBE,
                            seed: int = 0):
    """A compressed FAISS inner-product index of unit-length ``reference`` rows, to ship an atlas
    without its raw activations: ``code_bytes`` + 8 bytes per row instead of 2 per channel.
    Trained on a seeded subsample. Product quantisation needs a few hundred rows per code word,
    so a reference under 2,048 rows is kept as 8-bit scalars (one byte per channel) instead."""
    import faiss

    n, d = reference.shape
    reference = np.ascontiguousarray(reference, np.float32)
    if n < 2048:
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(reference)
        index.add(reference)
        return index
    m = math.gcd(d, code_bytes)  # PQ splits the vector into m equal parts
    lists = max(1, min(int(math.sqrt(n)), n // 256))
    index = faiss.index_factory(d, COMPACT_SPEC.format(m=m, lists=lists), faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, min(n, max(64 * lists, 100 * 256)), replace=False)
    # A small atlas has fewer rows than FAISS asks per code word (it warns, then trains well enough).
    faiss.downcast_index(index).pq.cp.min_points_per_centroid = 1
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # training a subsample is small work: OpenMP's threads only wait on each other
    try:
        index.train(reference[np.sort(sample)])
    finally:
        faiss.omp_set_num_threads(threads)
    index.add(reference)
    faiss.extract_index_ivf(index).nprobe = min(nprobe, lists)
    return index


def nearest(index, activations: np.ndarray, k: int, *, batch: int = 65_536, nprobe: int = 8
            ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and rows of the ``k`` nearest reference rows, in batches (so a million
    queries never need a second copy of themselves in float32)."""
    from .devices import faiss_to_gpu

    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    index = faiss_to_gpu(index)  # searched on the GPU where faiss-gpu sees one (the `gpu` extra)
    if hasattr(index, "nprobe"):
        index.nprobe = max(nprobe, index.nprobe)  # a compact index keeps a larger nprobe of its own
    sims = np.empty((len(activations), k), np.float32)
    rows = np.empty((len(activations), k), np.int64)
    for start in range(0, len(activations), batch):
        sims[start:start + batch], rows[start:start + batch] = index.search(
            unit_rows(np.asarray(activations[start:start + batch], np.float32)), k)
    return sims, rows


@dataclass
class Placement:
    """Where activations fall on an atlas: per level, cell (i, j) or -1 when off-atlas or outside
    every kept cell; the cosine distance to the nearest reference activation."""

    distance: np.ndarray               # (N,)
    off_atlas: np.ndarray              # (N,) bool
    cells: dict[int, np.ndarray]       # level → (N, 2) int, -1 where no cell
    cell_distance: dict[int, np.ndarray]  # level → (N,) cosine distance to the cell's mean activation


def _weighted_vote(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, the label with the largest summed weight (ties: the nearer neighbour's label).
    Labels < 0 do not vote; a row with no voter gets -1. k is small, so the k×k comparison is cheap."""
    valid = labels >= 0
    w = np.where(valid, weights, 0.0)
    scores = np.zeros(labels.shape, np.float64)
    for a in range(labels.shape[1]):
        scores[:, a] = (w * (labels == labels[:, a:a + 1])).sum(axis=1)
    scores = np.where(valid, scores, -1.0)
    best = np.take_along_axis(labels, scores.argmax(axis=1)[:, None], 1)[:, 0]
    return np.where(valid.any(axis=1), best, -1)


def place_activations(search: ReferenceSearch, activations: np.ndarray, *, k: int = PLACE_K,
                      exclude_images: np.ndarray | None = None) -> Placement:
    """Place ``activations`` on ``search``'s atlas at every level (one k-NN search for all)."""
    atlas = search.atlas
    sims, rows = search.search(activations, k, exclude_images=exclude_images)
    distance = (1.0 - sims[:, 0]).astype(np.float32)
    off = distance > search.threshold
    weights = np.maximum(sims, 0.0) + 1e-6
    unit = unit_rows(activations) if len(activations) else np.zeros((0, 1), np.float32)
    cells, cell_distance = {}, {}
    reference = atlas.reference
    for g in atlas.levels:
        flat = (reference[f"cell_{g}_i"].to_numpy().astype(np.int64) * g + reference[f"cell_{g}_j"].to_numpy())
        kept = reference[f"kept_{g}"].to_numpy(zero_copy_only=False)
        labels = np.where((rows >= 0) & kept[np.maximum(rows, 0)], flat[np.maximum(rows, 0)], -1)
        best = _weighted_vote(labels, weights)
        best = np.where(off, -1, best)
        ij = np.where(best[:, None] >= 0, np.stack([best // g, best % g], axis=1), -1)
        cells[g] = ij
        means = unit_rows(np.array(atlas.cells_at(g)["mean_activation"], np.float32))
        which = np.where(best >= 0, atlas.row_of_cell(g)[np.maximum(best, 0)], -1)
        cd = np.full(len(ij), np.nan, np.float32)
        has = which >= 0
        cd[has] = 1.0 - np.einsum("nc,nc->n", unit[has], means[which[has]])
        cell_distance[g] = cd
    return Placement(distance=distance, off_atlas=off, cells=cells, cell_distance=cell_distance)


def _as_atlas(atlas: str | Atlas, home: Path | None) -> Atlas:
    """A loaded atlas as it is, or a name loaded (callers that already hold one pass it, so the
    reference table is not read again)."""
    return atlas if isinstance(atlas, Atlas) else load_atlas(atlas, home)


def atlas_key(atlas: Atlas) -> str:
    """Identifies one build of an atlas: placements made on another build are redone."""
    return f"{atlas.manifest.get('params_hash')}@{atlas.manifest.get('created')}"


def _ids_key(atlas_name: str) -> str:
    """The index's meta key holding the digest of its image ids when it was last placed on the atlas."""
    return f"placed_ids:{atlas_name}"


def record_placed(store: IndexStore, atlas_name: str) -> None:
    """Record that every image now in ``store`` is placed on ``atlas_name`` (what
    :func:`placement_state` compares with); for writers of placements other than :func:`place_index`."""
    store.set_meta({_ids_key(atlas_name): store.ids_digest()})


def _same_weights(meta: dict, m: dict) -> bool:
    """Whether an index (``meta``) and an atlas (manifest ``m``) were made with the same weights:
    by their SHA-256 when both record it; else (an older index or atlas) by the weights' name, the
    random flag and, for random weights, the seed they were drawn with."""
    if meta.get("weights_sha256") and m.get("weights_sha256"):
        return meta["weights_sha256"] == m["weights_sha256"]
    if meta.get("weights") != m.get("weights") or bool(meta.get("random_weights")) != bool(m.get("random_weights")):
        return False
    if m.get("random_weights") and "index_seed" in m:
        return int(meta.get("seed", 0)) == int(m["index_seed"])
    return True


def check_compatible(atlas: Atlas, meta: dict, index_name: str) -> None:
    """Refuse (:class:`IncompatibleIndexError`) a dataset whose activations are not comparable
    with the atlas's: another model, other weights (their identity, not only their kind) or
    without the atlas's layer."""
    m = atlas.manifest
    if meta.get("model") != m["model"]:
        raise IncompatibleIndexError(f"index {index_name!r} was built with model {meta.get('model')!r} but atlas "
                                     f"{m['name']!r} with {m['model']!r}; index the dataset with `--model {m['model']}`")
    if not _same_weights(meta, m):
        seed = (f", seed {meta.get('seed', 0)} against {m.get('index_seed')}"
                if m.get("random_weights") and meta.get("random_weights") else "")
        raise IncompatibleIndexError(
            f"index {index_name!r} was built with other weights ({meta.get('weights')!r}{seed}) than atlas "
            f"{m['name']!r} ({m.get('weights')!r}); activations of different weights are not comparable; "
            f"index the dataset with the atlas's weights")
    if m["layer"] not in (meta.get("layers") or []):
        raise IncompatibleIndexError(
            f"index {index_name!r} has no sampled activations of {m['layer']!r}, the layer of atlas "
            f"{m['name']!r} (it has {', '.join(meta.get('layers') or []) or 'none'}); index the "
            f"dataset with `--layers {m['layer']}`")


@dataclass
class PlaceSummary:
    atlas: str
    index: str
    placed: int = 0
    already_placed: int = 0
    dropped: int = 0
    replaced: bool = False
    threshold: float = 0.0
    search: str = ""  # exact or ivf; empty when nothing needed placing
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def place_index(atlas_name: str | Atlas, index_name: str, *, home: Path | None = None, k: int = PLACE_K,
                progress: bool = False) -> PlaceSummary:
    """Place every not-yet-placed activation of index ``index_name`` on atlas ``atlas_name``, forget
    those of images no longer indexed (a changed file is a new image), and store the placements in
    the index's DuckDB with the digest of the image ids they cover. Holds the index's writer lock,
    so an ``atlasq index`` run of the same index cannot change the samples while they are placed."""
    clock = time.perf_counter()
    atlas = _as_atlas(atlas_name, home)
    name = atlas.manifest["name"]
    folder = IndexStore.require(index_folder(index_name, home))  # before the lock, which would create it
    with IndexStore.writer(folder), IndexStore(folder, read_only=False) as store:
        meta = store.meta()
        check_compatible(atlas, meta, index_name)
        key = atlas_key(atlas)
        recorded = store.placed_atlases().get(name)
        digest = store.ids_digest()
        summary = PlaceSummary(atlas=name, index=index_name, replaced=recorded not in (None, key))
        if recorded == key and meta.get(_ids_key(name)) == digest:
            # nothing changed: leave the samples and the reference index (hundreds of MB) unread
            summary.already_placed = store.placement_totals(name, min(atlas.levels))["activations"]
            summary.threshold = atlas.files.placement_record().get("threshold", 0.0)
            summary.seconds = round(time.perf_counter() - clock, 2)
            return summary
        done = set() if summary.replaced else store.placed_keys(name)
        samples = store.samples(atlas.manifest["layer"])
        present = set(map(int, np.unique(samples["image_id"])))
        gone = sorted({i for i, _ in done} - present)
        todo = np.array([(int(i), int(kk)) not in done for i, kk in zip(samples["image_id"], samples["k"])], bool)
        summary.already_placed, summary.dropped = int((~todo).sum()), len(gone)
        if recorded == key and not todo.any() and not gone:
            store.set_meta({_ids_key(name): digest})  # placed by an older atlasq, or stopped before this
            summary.threshold = atlas.files.placement_record().get("threshold", 0.0)
            summary.seconds = round(time.perf_counter() - clock, 2)
            return summary
        search = ReferenceSearch.for_atlas(atlas)
        summary.threshold, summary.search = search.threshold, search.kind
        acts = samples["activations"][todo]
        status = (stderr.status(f"placing {len(acts):,} activations on atlas {name}…") if progress and len(acts)
                  else nullcontext())
        with status:
            placement = place_activations(search, acts, k=k)
        columns: dict[str, list] = {n: [] for n in ("level", "image_id", "k", "y", "x", "i", "j", "distance",
                                                    "cell_distance", "off_atlas")}
        for g in atlas.levels:
            ij = placement.cells[g]
            has = ij[:, 0] >= 0
            columns["level"].append(np.full(len(acts), g, np.int16))
            for col in ("image_id", "k", "y", "x"):
                columns[col].append(samples[col][todo])
            columns["i"].append(pa.array(ij[:, 0].astype(np.int16), mask=~has))
            columns["j"].append(pa.array(ij[:, 1].astype(np.int16), mask=~has))
            columns["distance"].append(placement.distance)
            columns["cell_distance"].append(pa.array(placement.cell_distance[g], mask=~has))
            columns["off_atlas"].append(placement.off_atlas)
        table = pa.table({"atlas": pa.array([name] * (len(acts) * len(atlas.levels)), pa.string()),
                          **{c: pa.concat_arrays([pa.array(v) if not isinstance(v, pa.Array) else v for v in vs])
                             for c, vs in columns.items()}})
        store.write_placements(name, key, table, replace=summary.replaced, gone=gone)
        store.set_meta({_ids_key(name): digest})
        summary.placed = len(acts)
    summary.seconds = round(time.perf_counter() - clock, 2)
    return summary


def placement_state(atlas: Atlas, index_name: str, home: Path | None = None) -> str:
    """``"current"``, ``"missing"`` (never placed on this atlas) or ``"stale"``: the atlas was
    rebuilt since, or the index's images changed (added, removed, or a file's content replaced,
    which gives it a new id) since it was last placed. Judged by content, read-only."""
    name = atlas.manifest["name"]
    with IndexStore(index_folder(index_name, home)) as store:
        placed = store.placed_atlases().get(name)
        if placed is None:
            return "missing"
        if placed != atlas_key(atlas) or store.meta().get(_ids_key(name)) != store.ids_digest():
            return "stale"
        return "current"


# ----------------------------------------------------------------------------- reading results

def _level(atlas: Atlas, level: int | None) -> int:
    if level is None:
        return min(atlas.levels)
    if level not in atlas.levels:
        raise AtlasOptionError(f"--level {level} is not a level of atlas {atlas.manifest['name']!r}; it has "
                               f"{', '.join(map(str, atlas.levels))}")
    return level


@dataclass(frozen=True)
class Totals:
    """An index's placed activations at one level: all of them, off-atlas, on the atlas but
    outside every kept cell, and the images they come from."""

    activations: int = 0
    off_atlas: int = 0
    outside_kept_cells: int = 0
    images: int = 0
    off_atlas_share: float = 0.0

    @classmethod
    def of(cls, counts: dict) -> "Totals":
        n = counts["activations"]
        return cls(activations=n, off_atlas=counts["off_atlas"], outside_kept_cells=counts["outside_kept_cells"],
                   images=counts["images"], off_atlas_share=counts["off_atlas"] / n if n else 0.0)


@dataclass(frozen=True)
class HistogramCell:
    """One kept cell of a histogram: the index's activations and images there, its share of all
    placed activations, and the cell's top labels (by attribution) and their scores."""

    i: int
    j: int
    activations: int
    images: int
    share: float
    top_label: str
    top_labels: list
    top_scores: list


@dataclass
class Histogram:
    """A semantic histogram: every kept cell of ``level`` (empty ones with zero) and the totals."""

    atlas: str
    index: str
    level: int
    totals: Totals
    cells: list                       # HistogramCell, in the atlas's cell order
    placed: PlaceSummary | None = None  # what placing did first (None with place=False)
    off_atlas_threshold: float | None = None
    picture: str | None = None        # the heat map, when one was written

    def to_dict(self) -> dict:
        return asdict(self)


def histogram(atlas_name: str | Atlas, index_name: str, *, level: int | None = None, home: Path | None = None,
              place: bool = True, progress: bool = False) -> Histogram:
    """Per-cell counts of ``index_name`` on ``atlas_name`` at ``level`` (coarsest by default),
    placing new activations first. Every kept cell is listed, empty ones with zero."""
    atlas = _as_atlas(atlas_name, home)
    g = _level(atlas, level)
    placed = place_index(atlas, index_name, home=home, progress=progress) if place else None
    name = atlas.manifest["name"]
    with IndexStore(index_folder(index_name, home)) as store:
        counts = store.cell_counts(name, g)
        totals = Totals.of(store.placement_totals(name, g))
    cells = atlas.cells_at(g)
    lookup = {(int(i), int(j)): (int(a), int(b)) for i, j, a, b in
              zip(counts["i"], counts["j"], counts["activations"], counts["images"])}
    rows = []
    for i, j, labels, scores in zip(cells["i"], cells["j"], cells["top_labels"], cells["top_scores"]):
        acts, images = lookup.get((i, j), (0, 0))
        rows.append(HistogramCell(i=i, j=j, activations=acts, images=images,
                                  share=acts / totals.activations if totals.activations else 0.0,
                                  top_label=labels[0] if labels else NO_POSITIVE_CLASS, top_labels=list(labels[:3]),
                                  top_scores=[round(float(s), 6) for s in scores[:3]]))
    return Histogram(atlas=name, index=index_name, level=g, totals=totals, cells=rows, placed=placed,
                     off_atlas_threshold=atlas.files.placement_record().get("threshold"))


@dataclass(frozen=True)
class CellImage:
    """An image with on-atlas activations in a cell: its best activation's cosine distance to the
    cell's mean, and every one of its positions there (k, y, x, cell_distance)."""

    image_id: int
    path: str
    cell_distance: float
    activations: int
    positions: list


@dataclass
class CellImages:
    """One page of the images of an index in one cell, most typical first, with the cell's labels."""

    atlas: str
    index: str
    level: int
    cell: tuple
    top_labels: list
    top_scores: list
    total_images: int                 # images of the index in the cell, all pages
    offset: int
    images: list                      # CellImage
    has_more: bool                    # images after this page

    def to_dict(self) -> dict:
        return {**asdict(self), "cell": list(self.cell)}


def cell_images(atlas_name: str | Atlas, index_name: str, i: int, j: int, *, level: int | None = None, k: int = 20,
                offset: int = 0, home: Path | None = None) -> CellImages:
    """The images of ``index_name`` in cell (i, j), most typical first, with their positions
    (``k`` of them after the first ``offset``). ``atlas_name`` may be an already loaded :class:`Atlas`."""
    if k < 1:
        raise InvalidOptionError(f"-k must be at least 1, not {k}")
    if offset < 0:
        raise InvalidOptionError(f"--offset must be 0 or more, not {offset}")
    atlas = _as_atlas(atlas_name, home)
    g = _level(atlas, level)
    if not (0 <= i < g and 0 <= j < g):
        raise AtlasOptionError(f"--cell {i},{j} is outside the {g}×{g} grid (rows and columns 0 to {g - 1})")
    name = atlas.manifest["name"]
    with IndexStore(index_folder(index_name, home)) as store:
        if name not in store.placed_atlases():
            raise PlacementError(f"index {index_name!r} has not been placed on atlas {name!r}; run "
                                 f"`atlasq histogram --atlas {name} --index {index_name}` first")
        members = store.cell_members(name, g, i, j, limit=k + 1, offset=offset)
        counts = store.cell_counts(name, g)
    total = next((int(n) for a, b, n in zip(counts["i"], counts["j"], counts["images"]) if (a, b) == (i, j)), 0)
    row = atlas.cell_row(g, i, j)
    cells = atlas.cells_at(g) if row is not None else None
    images = [CellImage(image_id=int(m["image_id"]), path=m["path"], cell_distance=round(float(m["cell_distance"]), 6),
                        activations=int(m["activations"]),
                        positions=[{**p, "cell_distance": round(float(p["cell_distance"]), 6)} for p in m["positions"]])
              for m in members[:k]]
    return CellImages(atlas=name, index=index_name, level=g, cell=(i, j),
                      top_labels=list(cells["top_labels"][row]) if cells else [],
                      top_scores=[round(float(s), 4) for s in cells["top_scores"][row]] if cells else [],
                      total_images=total, offset=offset, images=images, has_more=len(members) > k)


def histogram_picture(result: Histogram, atlas: Atlas, out: Path, *, log: bool = True) -> Path:
    """The counts of a :func:`histogram` result as a heat map over the atlas mosaic."""
    from .heatmap import draw_heatmap

    cells = [(c.i, c.j) for c in result.cells]
    values = np.array([c.activations for c in result.cells], np.float64)  # 0: a kept cell with none, faded
    out.parent.mkdir(parents=True, exist_ok=True)
    t = result.totals
    draw_heatmap(atlas.tiles_path(result.level), result.level, cells, values, log=log, out=out,
                 title=f"{result.index} on atlas {result.atlas}, level {result.level}×{result.level}: "
                       f"{t.activations:,} activations of {t.images:,} images, {t.off_atlas_share:.1%} off-atlas",
                 legend_title="activations per cell")
    return out


def histogram_with_picture(atlas_name: str, index_name: str, *, level: int | None = None,
                           home: Path | None = None, progress: bool = False) -> Histogram:
    """:func:`histogram`, and its heat map written to ``<index>/histograms/<atlas>/level_<G>.png``."""
    atlas = load_atlas(atlas_name, home)
    result = histogram(atlas, index_name, level=level, home=home, progress=progress)
    out = index_folder(index_name, home) / "histograms" / result.atlas / f"level_{result.level}.png"
    result.picture = str(histogram_picture(result, atlas, out))
    return result


# ----------------------------------------------------------------------------- comparing datasets

def _fisher_p_values(a: np.ndarray, n_a: int, b: np.ndarray, n_b: int) -> np.ndarray:
    """Two-sided Fisher exact test per cell on images: (a of n_a) against (b of n_b)."""
    from scipy.stats import fisher_exact

    p = np.ones(len(a))
    for c in np.flatnonzero((a + b) > 0):
        p[c] = fisher_exact([[a[c], n_a - a[c]], [b[c], n_b - b[c]]]).pvalue
    return p


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0: same distribution, 1: disjoint)."""
    from scipy.spatial.distance import jensenshannon

    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    return float(jensenshannon(p, q, base=2) ** 2)


@dataclass(frozen=True)
class ComparedCell:
    """One kept cell compared between datasets A and B."""

    i: int
    j: int
    top_label: str
    top_labels: list
    activations_a: int
    activations_b: int
    images_a: int
    images_b: int
    share_a: float
    share_b: float
    difference: float   # share_b - share_a
    log2_ratio: float   # B over A, with half a count added to both
    p: float            # Fisher's exact test on images
    q: float            # Benjamini–Hochberg adjusted
    significant: bool   # q < alpha


@dataclass
class Comparison:
    """Two datasets compared cell by cell on one atlas level (see :func:`compare`)."""

    atlas: str
    level: int
    a: str
    b: str
    totals: dict                      # "a", "b" → Totals
    off_atlas_share: dict             # "a", "b" → float
    jensen_shannon_bits: float
    significant_cells: int
    cells: int
    alpha: float
    over_represented_in_b: list       # ComparedCell, most over-represented first
    under_represented_in_b: list      # ComparedCell, most under-represented first
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_compare_options(index_a: str, index_b: str, alpha: float, top: int, out: Path | None) -> None:
    if index_a == index_b:
        raise PlacementError("compare needs two different indexes")
    if not 0 < alpha < 1:
        raise InvalidOptionError(f"--alpha is a false discovery rate, in (0, 1) (for example 0.05), not {alpha}")
    if top < 0:
        raise InvalidOptionError(f"--top must be 0 or more, not {top}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InvalidOptionError(f"--out {out} is a file; give a folder (it is created if needed)")


def compare(atlas_name: str | Atlas, index_a: str, index_b: str, *, level: int | None = None, home: Path | None = None,
            alpha: float = 0.05, top: int = 10, out: Path | None = None, place: bool = True,
            write: bool = True) -> Comparison:
    """Compare two datasets cell by cell on one atlas.

    Per kept cell: each dataset's share of its activations, the difference (B − A) and the
    log2 ratio (B over A, with half a count added to both). Significance is tested on images,
    which are independent where a dataset's K samples per image are not: the share of A's
    images with an activation in the cell against B's (Fisher's exact test), and the p-values
    are adjusted for testing every cell at once (Benjamini–Hochberg; ``q``). The divergence is
    the Jensen–Shannon divergence (bits) of the two activation distributions over the cells,
    with off-atlas activations and those outside every kept cell as two more bins.
    Written to ``out`` (default: :func:`atlasq.home.comparison_folder`) as parquet, CSV and a
    diverging heat map of the log ratio over the atlas mosaic (significant cells only), unless
    ``write`` is false. ``place=False`` uses the placements already stored (read-only).
    Every option is checked before anything is placed or written.
    """
    from scipy.stats import false_discovery_control

    from .heatmap import draw_heatmap

    _check_compare_options(index_a, index_b, alpha, top, out if write else None)
    atlas = _as_atlas(atlas_name, home)
    g = _level(atlas, level)
    if write and out is None:
        out = comparison_folder(atlas.manifest["name"], index_a, index_b, home)
    ha = histogram(atlas, index_a, level=g, home=home, place=place)
    hb = histogram(atlas, index_b, level=g, home=home, place=place)
    ta, tb = ha.totals, hb.totals
    if not ta.activations or not tb.activations:
        empty = index_a if not ta.activations else index_b
        raise PlacementError(f"index {empty!r} has no activations to compare")
    a = np.array([c.activations for c in ha.cells], np.float64)
    b = np.array([c.activations for c in hb.cells], np.float64)
    share_a, share_b = a / ta.activations, b / tb.activations
    m = len(a)
    log_ratio = np.log2(((b + 0.5) / (tb.activations + 0.5 * m)) / ((a + 0.5) / (ta.activations + 0.5 * m)))
    img_a = np.array([c.images for c in ha.cells])
    img_b = np.array([c.images for c in hb.cells])
    p = _fisher_p_values(img_a, ta.images, img_b, tb.images)
    q = false_discovery_control(p, method="bh") if m else p
    bins_a = np.concatenate([a, [ta.off_atlas, ta.outside_kept_cells]])
    bins_b = np.concatenate([b, [tb.off_atlas, tb.outside_kept_cells]])
    rows = [ComparedCell(i=c.i, j=c.j, top_label=c.top_label, top_labels=c.top_labels,
                         activations_a=int(a[n]), activations_b=int(b[n]), images_a=int(img_a[n]),
                         images_b=int(img_b[n]), share_a=float(share_a[n]), share_b=float(share_b[n]),
                         difference=float(share_b[n] - share_a[n]), log2_ratio=float(log_ratio[n]),
                         p=float(p[n]), q=float(q[n]), significant=bool(q[n] < alpha))
            for n, c in enumerate(ha.cells)]
    by_ratio = sorted(range(m), key=lambda n: (-log_ratio[n], q[n]))
    over = [rows[n] for n in by_ratio if log_ratio[n] > 0 and q[n] < alpha][:top]
    under = [rows[n] for n in reversed(by_ratio) if log_ratio[n] < 0 and q[n] < alpha][:top]

    files = {}
    if write:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([asdict(r) for r in rows])
        files = {"parquet": str(out / f"level_{g}.parquet"), "csv": str(out / f"level_{g}.csv"),
                 "picture": str(out / f"level_{g}.png")}
        pq.write_table(table, files["parquet"])
        pacsv.write_csv(table.drop(["top_labels"]), files["csv"])
        draw_heatmap(atlas.tiles_path(g), g, [(r.i, r.j) for r in rows],
                     np.where(q < alpha, log_ratio, np.nan), diverging=True, out=Path(files["picture"]),
                     title=f"{index_b} against {index_a} on atlas {atlas.manifest['name']}, level {g}×{g}: "
                           f"cells that differ (q < {alpha})",
                     legend_title=f"log2 share ratio, {index_b} over {index_a} (red: more in {index_b}, "
                                  f"blue: less)")
    return Comparison(atlas=atlas.manifest["name"], level=g, a=index_a, b=index_b, totals={"a": ta, "b": tb},
                      off_atlas_share={"a": ta.off_atlas_share, "b": tb.off_atlas_share},
                      jensen_shannon_bits=_jensen_shannon(bins_a, bins_b), significant_cells=int((q < alpha).sum()),
                      cells=m, alpha=alpha, over_represented_in_b=over, under_represented_in_b=under, files=files)
