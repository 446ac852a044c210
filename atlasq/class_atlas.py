"""Class activation atlases and two-class comparison atlases (Activation Atlas, "Focusing on a
Single Classification" and "Further Isolating Classes").

Both are atlases in the ordinary folder format (:class:`atlasq.atlasdir.AtlasFolder`), built by
the general atlas's own steps (:func:`atlasq.atlas.build_atlas` with a
:class:`atlasq.atlas.Selection`): only which activations are kept and where they are laid out
differ. The manifest says what the atlas is: ``kind`` (``"class"`` or ``"two-class"``) and
``analysis`` (classes, filter, how many kept, the layout and its parameters), so ``atlas info``,
histograms, the app and export work on them unchanged.

**Class atlas** of class c, from an index with attributions:

- ``winning``: the activations whose largest attribution (over all classes) is to c;
- ``magnitude``: the ``top`` activations by attribution to c (3,000 in the article's notebook),
  kept only where that attribution is positive.

They are laid out on their own by t-SNE (the article: better than UMAP for these sparse sets;
cosine, perplexity 50, learning rate 10 as in the notebook) or UMAP (the notebook's 20
neighbours, min_dist 0.01, cosine), normalised as the general layout, and gridded 8×8 keeping
cells of more than 4 activations, as the notebook does.

**Two-class atlas** of A and B: the ``top`` activations by attribution to A and those to B (2,000
each in the notebook; positive only). An activation chosen for both is kept once (the notebook
concatenates the two sets and so counts it twice). Horizontal position: d = attribution to B −
attribution to A, divided by the 99th percentile of |d| and clipped to [−1, 1] (0 stays in the
middle: not re-centred), so A's evidence is on the left and B's on the right. Vertical position: a
1-D t-SNE of the activations (cosine, perplexity 50, learning rate 10). Gridded 10×10 over
x ∈ [−1, 1]; each cell also records its mean difference (``mean_difference``, raw attribution
units) and its mean normalised x (``mean_x``).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .atlas import AtlasCells, AtlasOptions, AtlasSummary, BuildPlan, Selection, build_atlas
from .atlasdir import AtlasError, AtlasOptionError
from .layout import Layout, normalise_layout

__all__ = ["FILTERS", "LAYOUTS", "CLASS_DEFAULTS", "TWO_CLASS_DEFAULTS", "class_rows", "two_class_rows",
           "tsne", "class_layout", "difference_axis", "build_class_atlas", "build_two_class_atlas",
           "class_index"]

FILTERS = ("winning", "magnitude")
LAYOUTS = ("tsne", "umap")
#: Top activations kept by the magnitude filter: one class, and each class of a comparison (the notebook's).
TOP_ONE_CLASS = 3000
TOP_PER_CLASS = 2000
#: The notebook's grids: 8×8 for a class, 10×10 for a comparison; both keep cells of more than 4.
CLASS_DEFAULTS = dict(grids=(8,), min_count=5, max_activations=None)
TWO_CLASS_DEFAULTS = dict(grids=(10,), min_count=5, max_activations=None)
#: The notebook's t-SNE and (class atlas) UMAP parameters.
TSNE_PARAMS = {"metric": "cosine", "perplexity": 50.0, "learning_rate": 10.0}
UMAP_PARAMS = {"n_neighbors": 20, "min_dist": 0.01, "metric": "cosine"}
MIN_KEPT = 8


def class_index(categories: list[str], label: str) -> int:
    """The class index of ``label`` (a class name, or its number), or an :class:`AtlasOptionError`
    naming a few classes."""
    if label in categories:
        return categories.index(label)
    if label.isdigit() and int(label) < len(categories):
        return int(label)
    close = [c for c in categories if label.lower() in c.lower()][:8] or list(categories[:8])
    raise AtlasOptionError(f"no class {label!r} in this index's network; e.g. {', '.join(close)}")


# ----------------------------------------------------------------------------- filters

def class_rows(attributions: np.ndarray, c: int, *, filter: str = "winning", top: int = TOP_ONE_CLASS) -> np.ndarray:
    """Rows (sorted) of the activations a class atlas of class ``c`` keeps.

    ``winning``: those whose largest attribution is to ``c``; ``magnitude``: the ``top`` largest
    attributions to ``c`` that are positive (ties broken by row, so the choice is deterministic).
    """
    if filter not in FILTERS:
        raise AtlasOptionError(f"filter must be one of {', '.join(FILTERS)}, not {filter!r}")
    attributions = np.asarray(attributions)
    if filter == "winning":
        return np.flatnonzero(np.argmax(attributions, axis=1) == c)
    if top < 1:
        raise AtlasOptionError(f"top must be at least 1, not {top}")
    score = attributions[:, c].astype(np.float32)
    order = np.argsort(-score, kind="stable")[:top]
    return np.sort(order[score[order] > 0])


def two_class_rows(attributions: np.ndarray, a: int, b: int, *, top: int = TOP_PER_CLASS) -> np.ndarray:
    """Rows (sorted, each once) of the top ``top`` positive attributions to ``a`` and those to ``b``."""
    return np.union1d(class_rows(attributions, a, filter="magnitude", top=top),
                      class_rows(attributions, b, filter="magnitude", top=top))


def difference_axis(attributions: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(x in [-1, 1], raw difference, scale): attribution to ``b`` minus attribution to ``a``,
    divided by the 99th percentile of its absolute value and clipped; zero is not moved."""
    diff = attributions[:, b].astype(np.float64) - attributions[:, a].astype(np.float64)
    scale = float(np.percentile(np.abs(diff), 99)) if len(diff) else 0.0
    x = np.clip(diff / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(diff)
    return x.astype(np.float32), diff.astype(np.float32), scale


# ----------------------------------------------------------------------------- layouts

def tsne(activations: np.ndarray, n_components: int, *, seed: int, perplexity: float = TSNE_PARAMS["perplexity"],
         learning_rate: float = TSNE_PARAMS["learning_rate"], metric: str = TSNE_PARAMS["metric"]) -> np.ndarray:
    """scikit-learn's t-SNE with the notebook's parameters; perplexity is capped below a third of
    the points (t-SNE needs perplexity < N; a third keeps each neighbourhood a minority)."""
    from sklearn.manifold import TSNE

    x = np.asarray(activations, np.float32)
    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    model = TSNE(n_components=n_components, perplexity=perplexity, learning_rate=learning_rate, metric=metric,
                 init="pca" if n_components <= x.shape[1] else "random", random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return model.fit_transform(x).astype(np.float32)


def class_layout(activations: np.ndarray, method: str, *, seed: int) -> np.ndarray:
    """2-D positions in [0, 1]² of a class atlas's activations, by t-SNE or UMAP."""
    if method == "tsne":
        return normalise_layout(tsne(activations, 2, seed=seed))[0].astype(np.float32)
    if method == "umap":
        layout = Layout(n_neighbors=UMAP_PARAMS["n_neighbors"], min_dist=UMAP_PARAMS["min_dist"],
                        metric=UMAP_PARAMS["metric"], fit_size=0, random_state=seed)
        return layout.fit_transform(activations).astype(np.float32)
    raise AtlasOptionError(f"layout must be one of {', '.join(LAYOUTS)}, not {method!r}")


# ----------------------------------------------------------------------------- building

def _options(options: AtlasOptions | None, defaults: dict) -> AtlasOptions:
    """The caller's options, with the analysis's grid and cell threshold where the caller left the
    general atlas's defaults; never a subsample (the filter decides what is kept)."""
    base, plain = options or AtlasOptions(), AtlasOptions()
    changes = {k: v for k, v in defaults.items() if getattr(base, k) == getattr(plain, k)}
    changes["max_activations"] = None
    return replace(base, **changes)


def _enough(rows: np.ndarray, what: str) -> np.ndarray:
    if len(rows) < MIN_KEPT:
        raise AtlasError(f"only {len(rows)} activations pass {what}; an atlas needs at least {MIN_KEPT} "
                         f"(index more images of the class, or use --filter magnitude)")
    return rows


def _categories(index: str, home: Path | None) -> list[str]:
    from .store import IndexStore, index_folder

    with IndexStore(index_folder(index, home)) as store:
        meta = store.meta()
    if meta.get("categories"):
        return list(meta["categories"])
    from .model import load_model

    return list(load_model(meta["model"], meta["weights"], device="cpu", seed=meta.get("seed", 0)).categories)


def build_class_atlas(index: str, name: str, label: str, *, filter: str = "winning", top: int = TOP_ONE_CLASS,
                      layout: str = "tsne", home: Path | None = None, options: AtlasOptions | None = None,
                      device: str | None = None, overwrite: bool = False, progress: bool = True) -> AtlasSummary:
    """Build class activation atlas ``name`` of class ``label`` from index ``index``.

    ``options`` are the general atlas's (layer, grids, icons …); grids and min_count default to
    the notebook's 8×8 and "more than 4" unless given."""
    if filter not in FILTERS:
        raise AtlasOptionError(f"filter must be one of {', '.join(FILTERS)}, not {filter!r}")
    if layout not in LAYOUTS:
        raise AtlasOptionError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if top < 1:
        raise AtlasOptionError(f"top must be at least 1, not {top}")
    options = _options(options, CLASS_DEFAULTS)
    categories = _categories(index, home)
    c = class_index(categories, label)
    def choose(samples: dict) -> np.ndarray:
        return _enough(class_rows(samples["attributions"], c, filter=filter, top=top),
                       f"the {filter} filter for class {categories[c]!r}")

    params = TSNE_PARAMS if layout == "tsne" else UMAP_PARAMS
    describe = {"kind": "class",
                "analysis": {"class": categories[c], "class_index": c, "filter": filter,
                             "top": top if filter == "magnitude" else None, "layout": layout, "layout_params": params}}
    selection = Selection(choose=choose, describe=describe,
                          lay_out=lambda plan: class_layout(plan.samples["activations"], layout, seed=plan.options.seed))
    return build_atlas(index, name, home=home, options=options, device=device, overwrite=overwrite,
                       progress=progress, selection=selection)


def build_two_class_atlas(index: str, name: str, class_a: str, class_b: str, *, top: int = TOP_PER_CLASS,
                          home: Path | None = None, options: AtlasOptions | None = None, device: str | None = None,
                          overwrite: bool = False, progress: bool = True) -> AtlasSummary:
    """Build two-class comparison atlas ``name``: A's evidence on the left, B's on the right.

    ``options`` are the general atlas's; grids and min_count default to the notebook's 10×10 and
    "more than 4" unless given."""
    if top < 1:
        raise AtlasOptionError(f"top must be at least 1, not {top}")
    options = _options(options, TWO_CLASS_DEFAULTS)
    categories = _categories(index, home)
    a, b = class_index(categories, class_a), class_index(categories, class_b)
    if a == b:
        raise AtlasOptionError(f"the two classes must differ, not {categories[a]!r} twice")

    def choose(samples: dict) -> np.ndarray:
        return _enough(two_class_rows(samples["attributions"], a, b, top=top),
                       f"the magnitude filter for {categories[a]!r} or {categories[b]!r}")

    def lay_out(plan: BuildPlan) -> np.ndarray:
        x, _, _ = difference_axis(plan.samples["attributions"], a, b)
        y = normalise_layout(tsne(plan.samples["activations"], 1, seed=plan.options.seed))[0][:, 0]
        return np.stack([(x + 1) / 2, y], axis=1).astype(np.float32)

    def cell_columns(plan: BuildPlan, cells: AtlasCells) -> dict:
        x, diff, _ = difference_axis(plan.samples["attributions"], a, b)
        mean_diff, mean_x = [], []
        for g in plan.options.grids:
            level = cells.levels[g]
            flat = level.cell_of[:, 0] * g + level.cell_of[:, 1]
            for i, j in level.cells:
                members = flat == i * g + j
                mean_diff.append(float(diff[members].mean()))
                mean_x.append(float(x[members].mean()))
        return {"mean_difference": mean_diff, "mean_x": mean_x}

    describe = {"kind": "two-class",
                "analysis": {"classes": [categories[a], categories[b]], "class_indices": [a, b], "filter": "magnitude",
                             "top": top, "x": "attribution to B - attribution to A, / 99th percentile of |.|, clipped to ±1",
                             "layout": "difference × tsne-1d", "layout_params": TSNE_PARAMS}}
    selection = Selection(choose=choose, lay_out=lay_out, describe=describe, cell_columns=cell_columns)
    return build_atlas(index, name, home=home, options=options, device=device, overwrite=overwrite,
                       progress=progress, selection=selection)
