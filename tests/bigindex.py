"""A large synthetic index placed on an existing atlas, for measuring the app at scale.

It writes only what the app reads: image rows, sample rows and placements. The images cycle
through a real folder's files, so thumbnails load; vectors and shards are left out, because the
app never reads them for cells. Cells are drawn unevenly, the way real datasets fill an atlas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlasq.atlas import load_atlas
from atlasq.histogram import atlas_key, record_placed
from atlasq.images import scan_images
from atlasq.store import IndexStore, index_folder

SAMPLES_PER_IMAGE = 4


def make_placed_index(home: Path, name: str, atlas_name: str, root: Path, images: int, seed: int = 0) -> Path:
    """Index ``name`` of ``images`` rows whose files cycle through ``root``, placed on ``atlas_name``."""
    atlas = load_atlas(atlas_name, home)
    folder = index_folder(name, home)
    store = IndexStore.create(folder)
    try:
        files = [entry.path for entry in scan_images(root)]
        manifest = atlas.manifest
        store.set_meta({"root": str(Path(root).resolve()), "model": manifest["model"], "weights": manifest["weights"],
                        "weights_sha256": manifest.get("weights_sha256"), "random_weights": manifest["random_weights"],
                        "layers": [manifest["layer"]], "samples_per_image": SAMPLES_PER_IMAGE,
                        "categories": manifest["categories"], "synthetic": True})
        rng = np.random.default_rng(seed)
        ids = np.arange(1, images + 1, dtype=np.int64)
        n = images * SAMPLES_PER_IMAGE
        top5 = [list(map(int, rng.choice(len(manifest["categories"]), 5, replace=False))) for _ in range(64)]
        store._insert("images", {
            "id": ids, "path": [files[i % len(files)] for i in range(images)], "width": np.full(images, 256, np.int32),
            "height": np.full(images, 256, np.int32), "top5_class": [top5[i % 64] for i in range(images)],
            "top5_prob": [[0.5, 0.2, 0.1, 0.1, 0.1]] * images, "shard": np.zeros(images, np.int32),
            "row": np.zeros(images, np.int32)})
        image_of = np.repeat(ids, SAMPLES_PER_IMAGE)
        k = np.tile(np.arange(SAMPLES_PER_IMAGE, dtype=np.int16), images)
        h, w = manifest["layer_shape"]
        y = rng.integers(1, max(2, h - 1), n).astype(np.int16)
        x = rng.integers(1, max(2, w - 1), n).astype(np.int16)
        store._insert("samples", {"image_id": image_of, "layer": [manifest["layer"]] * n, "k": k, "y": y, "x": x,
                                  "shard": np.zeros(n, np.int32), "row": np.zeros(n, np.int32)})
        parts = []
        for level in atlas.levels:
            cells = atlas.cells_at(level)
            weights = rng.pareto(1.2, len(cells["i"])) + 0.05
            which = rng.choice(len(cells["i"]), n, p=weights / weights.sum())
            parts.append(pa.table({
                "atlas": pa.array([manifest["name"]] * n), "level": np.full(n, level, np.int16),
                "image_id": image_of, "k": k, "y": y, "x": x,
                "i": np.asarray(cells["i"], np.int16)[which], "j": np.asarray(cells["j"], np.int16)[which],
                "distance": rng.random(n, dtype=np.float32) * 0.2, "cell_distance": rng.random(n, dtype=np.float32),
                "off_atlas": np.zeros(n, bool)}))
        store.write_placements(manifest["name"], atlas_key(atlas), pa.concat_tables(parts), replace=True, gone=[])
        record_placed(store, manifest["name"])
    finally:
        store.close()
    (folder / "SYNTHETIC.json").write_text(json.dumps({"images": images, "atlas": atlas_name}))
    return folder
