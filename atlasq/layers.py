"""Every layer: one atlas per sampled layer of an index, and one image's cells at each layer.

An index samples activations at several layers (``atlasq index --layers mixed4c,mixed5a``);
:func:`build_layer_atlases` builds one atlas per layer in one call, named ``NAME-LAYER``.
:func:`image_layer_cells` follows one image through the network, as the article's view does: for
every layer that has an atlas, the cells its sampled activations fall in, found from the atlas's
own reference table when the image helped build it, else from the placements `atlasq histogram`
stored, else placed on the spot (nearest reference activations, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atlas import Atlas, AtlasOptions, AtlasSummary, build_atlas, load_atlas
from .atlasdir import AtlasOptionError, list_atlases
from .errors import NotFoundError
from .store import IndexStore, index_folder

__all__ = ["layer_atlas_name", "build_layer_atlases", "atlases_by_layer", "LayerCells", "image_layer_cells"]


def layer_atlas_name(name: str, layer: str) -> str:
    """The name of ``name``'s atlas of ``layer`` in a multi-layer build: ``NAME-LAYER``."""
    return f"{name}-{layer}"


def build_layer_atlases(index: str, name: str, layers: tuple[str, ...] | list[str], *, home: Path | None = None,
                        options: AtlasOptions | None = None, device: str | None = None, overwrite: bool = False,
                        progress: bool = True) -> list[AtlasSummary]:
    """One atlas per layer (``NAME-LAYER``), each with ``options`` at that layer, in the order given.
    Every layer is checked against the index before the first build starts."""
    layers = tuple(layers)
    if not layers or len(set(layers)) != len(layers):
        raise AtlasOptionError(f"--layers must name one or more different layers, not {', '.join(layers) or 'none'}")
    with IndexStore(index_folder(index, home)) as store:
        have = store.meta().get("layers") or []
    missing = [layer for layer in layers if layer not in have]
    if missing:
        raise AtlasOptionError(f"index {index!r} has no sampled activations of {', '.join(missing)} (it has "
                               f"{', '.join(have) or 'none'}); index with `--layers {','.join(layers)}`")
    options = options or AtlasOptions()
    return [build_atlas(index, layer_atlas_name(name, layer), home=home, options=replace(options, layer=layer),
                        device=device, overwrite=overwrite, progress=progress) for layer in layers]


def atlases_by_layer(index: str, home: Path | None = None) -> dict[str, Atlas]:
    """Per layer of ``index``: the general atlas to show it on. One built from this index comes
    first, then any other of the same model and weights; among equals, the newest."""
    from .histogram import IncompatibleIndexError, check_compatible

    with IndexStore(index_folder(index, home)) as store:
        meta = store.meta()
    best: dict[str, tuple[tuple, Atlas]] = {}
    for name in list_atlases(home):
        try:
            atlas = load_atlas(name, home)
            check_compatible(atlas, meta, index)
        except (IncompatibleIndexError, NotFoundError):
            continue
        m = atlas.manifest
        if m.get("kind", "general") != "general":
            continue
        rank = (m.get("index") == index, m.get("created", ""))
        if m["layer"] not in best or rank > best[m["layer"]][0]:
            best[m["layer"]] = (rank, atlas)
    order = list(meta.get("layers") or [])
    return {layer: best[layer][1] for layer in order if layer in best}


@dataclass
class LayerCells:
    """Where one image's sampled activations fall on one layer's atlas."""

    layer: str
    atlas: str
    level: int
    source: str                       # where the cells came from: "reference", "placements", "placed now" (joined by +)
    positions: list[dict] = field(default_factory=list)  # per activation: k, y, x, i, j (-1: no kept cell)
    cells: dict = field(default_factory=dict)            # (i, j) → how many of its activations

    def to_dict(self) -> dict:
        return {"layer": self.layer, "atlas": self.atlas, "level": self.level, "source": self.source,
                "positions": self.positions, "cells": [{"i": i, "j": j, "activations": n}
                                                       for (i, j), n in sorted(self.cells.items())]}


def _from_reference(atlas: Atlas, image_id: int, level: int) -> list[dict]:
    ref = atlas.reference
    ids = ref["image_id"].to_numpy()
    rows = np.flatnonzero(ids == image_id)
    kept = ref[f"kept_{level}"].to_numpy(zero_copy_only=False)
    out = []
    for r in rows:
        ok = bool(kept[r])
        out.append({"k": int(ref["k"][r].as_py()), "y": int(ref["y"][r].as_py()), "x": int(ref["x"][r].as_py()),
                    "i": int(ref[f"cell_{level}_i"][r].as_py()) if ok else -1,
                    "j": int(ref[f"cell_{level}_j"][r].as_py()) if ok else -1})
    return out


def image_layer_cells(index: str, image_id: int, *, home: Path | None = None, level: int | None = None,
                      atlases: dict[str, Atlas] | None = None) -> list[LayerCells]:
    """The cells of image ``image_id`` of ``index`` at every layer that has an atlas (see
    :func:`atlases_by_layer`), at ``level`` (default: each atlas's coarsest). Each sampled
    activation's cell comes from the atlas's reference table when it is one of the atlas's own
    activations, else from the placements stored by `atlasq histogram`, else it is placed now."""
    from .histogram import ReferenceSearch, place_activations

    atlases = atlases if atlases is not None else atlases_by_layer(index, home)
    out = []
    with IndexStore(index_folder(index, home)) as store:
        if not store.images([image_id]):
            raise NotFoundError(f"index {index!r} has no image {image_id}")
        for layer, atlas in atlases.items():
            g = level if level in atlas.levels else atlas.levels[0]
            samples = store.samples(layer)
            mine = np.flatnonzero(samples["image_id"] == image_id)
            found = {}                    # k → (i, j, source)
            if atlas.manifest.get("index") == index:
                for p in _from_reference(atlas, image_id, g):
                    found[p["k"]] = (p["i"], p["j"], "reference")
            for p in store.image_placements(atlas.name, image_id):
                if p["level"] == g and p["k"] not in found:
                    off = p["i"] is None or p["off_atlas"]
                    found[p["k"]] = (-1 if off else int(p["i"]), -1 if off else int(p["j"]), "placements")
            missing = [r for r in mine if int(samples["k"][r]) not in found]
            if missing:
                placement = place_activations(ReferenceSearch(atlas), np.asarray(samples["activations"][missing]))
                for n, r in enumerate(missing):
                    found[int(samples["k"][r])] = (int(placement.cells[g][n, 0]), int(placement.cells[g][n, 1]),
                                                   "placed now")
            positions, cells = [], {}
            for r in mine:
                i, j, source = found[int(samples["k"][r])]
                positions.append({"k": int(samples["k"][r]), "y": int(samples["y"][r]), "x": int(samples["x"][r]),
                                  "i": i, "j": j, "source": source})
                if i >= 0:
                    cells[(i, j)] = cells.get((i, j), 0) + 1
            sources = sorted({p["source"] for p in positions})
            out.append(LayerCells(layer=layer, atlas=atlas.name, level=g, source=" + ".join(sources) or "none",
                                  positions=positions, cells=cells))
    return out
