"""A large synthetic index placed on an existing atlas, built through IndexStore's public API only.

It holds what the app reads for cells: image rows, sample rows and their placements on the atlas.
Rows are committed with :meth:`IndexStore.commit` in chunks, as the indexer does, and placed with
:meth:`IndexStore.write_placements`, as ``atlasq histogram`` does. The images cycle through a real
folder's files, so thumbnails load. The vectors in the shards are one-wide placeholders (zeros),
because nothing that reads cells reads them; such an index cannot be searched or built into an
atlas, and its meta says ``"synthetic": true``. Cells are drawn unevenly, the way real datasets
fill an atlas. Everything is drawn from ``seed``: the same arguments give the same index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlasq.atlas import load_atlas
from atlasq.histogram import atlas_key, record_placed
from atlasq.images import scan_images
from atlasq.store import Chunk, IndexStore, index_folder

SAMPLES_PER_IMAGE = 4
CHUNK_IMAGES = 20_000


def make_placed_index(home: Path, name: str, atlas_name: str, root: Path, images: int, seed: int = 0) -> Path:
    """Index ``name`` of ``images`` rows whose files cycle through ``root``, placed on ``atlas_name``."""
    atlas = load_atlas(atlas_name, home)
    manifest = atlas.manifest
    layer = manifest["layer"]
    files = [entry.path for entry in scan_images(root)]
    rng = np.random.default_rng(seed)
    top5 = [list(map(int, rng.choice(len(manifest["categories"]), 5, replace=False))) for _ in range(64)]
    h, w = manifest["layer_shape"]
    folder = index_folder(name, home)
    store = IndexStore.create(folder)
    try:
        store.set_meta({"root": str(Path(root).resolve()), "model": manifest["model"], "weights": manifest["weights"],
                        "weights_sha256": manifest.get("weights_sha256"), "random_weights": manifest["random_weights"],
                        "layers": [layer], "samples_per_image": SAMPLES_PER_IMAGE,
                        "categories": manifest["categories"], "synthetic": True})
        positions = []
        for start in range(1, images + 1, CHUNK_IMAGES):
            ids = list(range(start, min(images, start + CHUNK_IMAGES - 1) + 1))
            n, m = len(ids), len(ids) * SAMPLES_PER_IMAGE
            paths = [files[(i - 1) % len(files)] for i in ids]
            y = rng.integers(1, max(2, h - 1), m)
            x = rng.integers(1, max(2, w - 1), m)
            store.commit(Chunk(
                images={"id": ids, "path": paths, "bytes": [0] * n, "mtime": [0.0] * n, "width": [256] * n,
                        "height": [256] * n, "hash": [f"synthetic-{i}" for i in ids],
                        "top5_class": [top5[i % 64] for i in ids], "top5_prob": [[0.5, 0.2, 0.1, 0.1, 0.1]] * n},
                pooled=np.zeros((n, 1), np.float32),
                samples={"image_id": np.repeat(ids, SAMPLES_PER_IMAGE).tolist(), "layer": [layer] * m,
                         "k": list(range(SAMPLES_PER_IMAGE)) * n, "y": y.tolist(), "x": x.tolist()},
                activations={layer: np.zeros((m, 1), np.float16)}, attributions={}, errors=[]))
            positions.append((np.repeat(ids, SAMPLES_PER_IMAGE), np.tile(np.arange(SAMPLES_PER_IMAGE), n), y, x))
        image_of, k, y, x = (np.concatenate(column) for column in zip(*positions))
        n = len(image_of)
        parts = []
        for level in atlas.levels:
            cells = atlas.cells_at(level)
            weights = rng.pareto(1.2, len(cells["i"])) + 0.05
            which = rng.choice(len(cells["i"]), n, p=weights / weights.sum())
            parts.append(pa.table({
                "atlas": pa.array([manifest["name"]] * n), "level": np.full(n, level, np.int16),
                "image_id": image_of.astype(np.int64), "k": k.astype(np.int16), "y": y.astype(np.int16),
                "x": x.astype(np.int16), "i": np.asarray(cells["i"], np.int16)[which],
                "j": np.asarray(cells["j"], np.int16)[which],
                "distance": rng.random(n, dtype=np.float32) * 0.2, "cell_distance": rng.random(n, dtype=np.float32),
                "off_atlas": np.zeros(n, bool)}))
        store.write_placements(manifest["name"], atlas_key(atlas), pa.concat_tables(parts), replace=True, gone=[])
        record_placed(store, manifest["name"])
    finally:
        store.close()
    (folder / "SYNTHETIC.json").write_text(json.dumps({"images": images, "atlas": atlas_name, "seed": seed}))
    return folder
