"""Benchmark: placing a big dataset on a reference atlas, and the cell queries the app makes.

1. Placement. 1,000,000 synthetic 512-d activations are placed on a 100,000-activation
   reference with atlasq's search (:func:`atlasq.histogram.reference_index` and
   :func:`atlasq.histogram.nearest`, k = 10). The baseline is a plain numpy brute force (a matrix
   product per block and ``argpartition``). It is timed on the first ``--baseline-queries``
   activations and extrapolated linearly, since its cost is linear in the queries; the output
   says so. Both find the same neighbours for most queries; the top-1 agreement is printed.
2. Queries. A DuckDB index of 1,000,000 images with 4 placed activations each is written through
   :class:`atlasq.store.IndexStore`'s public ``commit`` and ``write_placements``. Then the median latencies of "the images in one cell"
   (first page of 20) and "counts for all cells" are measured over random cells.

    python bench/histogram.py [--reference 100000] [--queries 1000000] [--images 1000000]

Last lines: placement_speedup=, placement_seconds_1m=, cell_query_ms=, counts_query_ms=.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlasq.histogram import _weighted_vote, nearest, reference_index
from atlasq.layout import unit_rows
from atlasq.store import Chunk, IndexStore
from synthetic import synthetic_activations

WORK = Path(__file__).resolve().parent / "_work"
K = 10


def numpy_brute_force(reference: np.ndarray, queries: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """The k nearest rows by cosine, the plain way."""
    ref = unit_rows(reference)
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        sims = unit_rows(queries[start:start + block]) @ ref.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1)
        out[start:start + block] = np.take_along_axis(top, order, 1)
    return out


def bench_placement(n_reference: int, n_queries: int, baseline_queries: int) -> dict:
    reference = synthetic_activations(n_reference, 512, seed=0)
    queries = synthetic_activations(n_queries, 512, seed=0)  # same clusters, other draws
    print(f"placement: {n_queries:,} activations on a {n_reference:,}-activation reference (512-d, k={K})", flush=True)

    clock = time.perf_counter()
    exact = numpy_brute_force(reference, queries[:baseline_queries], K)
    baseline_s = (time.perf_counter() - clock) * n_queries / baseline_queries
    print(f"  numpy brute force: {baseline_s:.1f} s for {n_queries:,} (extrapolated from {baseline_queries:,})",
          flush=True)

    clock = time.perf_counter()
    index = reference_index(unit_rows(reference))
    build_s = time.perf_counter() - clock
    clock = time.perf_counter()
    sims, rows = nearest(index, queries, K)
    # the vote for a cell at three grid levels, as place_activations does (reference cells made up)
    for g in (20, 40, 80):
        cells = np.random.default_rng(g).integers(g * g, size=n_reference)
        _weighted_vote(cells[np.maximum(rows, 0)], np.maximum(sims, 0) + 1e-6)
    search_s = time.perf_counter() - clock
    ours_s = build_s + search_s
    agree = float((rows[:baseline_queries, 0] == exact[:, 0]).mean())
    print(f"  atlasq: {ours_s:.1f} s ({build_s:.1f} s building the reference index once, {search_s:.1f} s "
          f"searching and voting at 3 levels); nearest neighbour equal to the exact one for {agree:.3f}", flush=True)
    return {"placement_speedup": baseline_s / ours_s, "placement_seconds_1m": ours_s * 1_000_000 / n_queries,
            "placement_top1_agreement": agree}


def bench_queries(n_images: int, grid: int, repeats: int) -> dict:
    folder = WORK / f"placements_{n_images}"
    shutil.rmtree(folder, ignore_errors=True)
    store = IndexStore.create(folder)
    store.set_meta({"samples_per_image": 4})
    rng = np.random.default_rng(0)
    print(f"queries: DuckDB with {n_images:,} images × 4 placed activations on a {grid}×{grid} grid", flush=True)
    clock = time.perf_counter()
    step = 250_000
    for start in range(0, n_images, step):
        ids = np.arange(start + 1, min(n_images, start + step) + 1, dtype=np.int64)
        m = len(ids)  # image rows only: the queries never read vectors (one-wide placeholders)
        store.commit(Chunk(
            images={"id": ids.tolist(), "path": [f"folder/{i:07d}.jpg" for i in ids], "bytes": [0] * m,
                    "mtime": [0.0] * m, "width": [0] * m, "height": [0] * m, "hash": [""] * m,
                    "top5_class": [[0] * 5] * m, "top5_prob": [[0.0] * 5] * m},
            pooled=np.zeros((m, 1), np.float32), samples={"image_id": [], "layer": [], "k": [], "y": [], "x": []},
            activations={}, attributions={}, errors=[]))
    n = n_images * 4
    # cells drawn unevenly, as real datasets fill an atlas: a few cells hold many activations
    weights = rng.pareto(1.2, grid * grid) + 0.05
    cell = rng.choice(grid * grid, n, p=weights / weights.sum())
    table = pa.table({
        "atlas": pa.array(["bench"] * n), "level": np.full(n, grid, np.int16),
        "image_id": np.repeat(np.arange(1, n_images + 1, dtype=np.int64), 4), "k": np.tile(np.arange(4, dtype=np.int16), n_images),
        "y": rng.integers(1, 13, n).astype(np.int16), "x": rng.integers(1, 13, n).astype(np.int16),
        "i": (cell // grid).astype(np.int16), "j": (cell % grid).astype(np.int16),
        "distance": rng.random(n, dtype=np.float32) * 0.3, "cell_distance": rng.random(n, dtype=np.float32),
        "off_atlas": np.zeros(n, bool)})
    store.write_placements("bench", "bench-key", table, replace=True, gone=[])
    print(f"  written in {time.perf_counter() - clock:.1f} s", flush=True)

    cell_ms, counts_ms = [], []
    for r in range(repeats):
        i, j = divmod(int(rng.choice(grid * grid, p=weights / weights.sum())), grid)
        clock = time.perf_counter()
        members = store.cell_members("bench", grid, i, j, limit=20)
        cell_ms.append((time.perf_counter() - clock) * 1000)
        clock = time.perf_counter()
        counts = store.cell_counts("bench", grid)
        counts_ms.append((time.perf_counter() - clock) * 1000)
        assert len(members) == 20 and counts["activations"].sum() == n
    store.close()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  images in a cell (first 20): median {statistics.median(cell_ms):.1f} ms; counts for all cells: "
          f"median {statistics.median(counts_ms):.1f} ms ({repeats} repeats)", flush=True)
    return {"cell_query_ms": statistics.median(cell_ms), "counts_query_ms": statistics.median(counts_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--baseline-queries", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--grid", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--skip-placement", action="store_true")
    parser.add_argument("--skip-queries", action="store_true")
    args = parser.parse_args()

    results = {}
    if not args.skip_placement:
        results.update(bench_placement(args.reference, args.queries, min(args.baseline_queries, args.queries)))
    if not args.skip_queries:
        results.update(bench_queries(args.images, args.grid, args.repeats))
    for key in ("placement_top1_agreement", "placement_speedup", "placement_seconds_1m", "cell_query_ms",
                "counts_query_ms"):
        if key in results:
            print(f"{key}={results[key]:.3f}")


if __name__ == "__main__":
    main()
