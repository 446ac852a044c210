"""Benchmark: how far one machine's writer and the Ray engine scale, and what a compact atlas costs.

1. Writer alone (``--part writer``). The single writer of ``atlasq index`` (chunk building, shard
   arrays, DuckDB rows, and the FAISS file at the end) is fed precomputed records of
   ``--writer-images`` images as fast as it takes them: K = 4 samples at mixed4c (512 channels)
   with attributions to 1,000 classes, 1,024-d pooled vectors, committed every 256 images as
   ``atlasq index`` does. Baseline: the local pipeline indexing ``--local-images`` real 640×480
   JPEGs with the same settings (InceptionV1, random weights, attributions, K = 4) in the same run.
   ``writer_vs_local_ratio`` is how many such machines one writer keeps up with.
2. Ray against local (``--part ray``). ``--images`` JPEGs indexed (no attributions) by the local
   engine and by ``--engine ray`` with 2 single-threaded actors on a local Ray of 2 CPUs, same
   machine, same run. Starting Ray itself (``ray_startup_s``) is left out of the Ray run's time,
   since a cluster is started once for many runs; the actors' start-up (imports, loading the
   network) is in it.
3. Compact placement index (``--part compact``). bench/histogram.py's data: a 100,000-activation
   synthetic reference (512-d) and ``--queries`` activations to place. Cells come from a real
   layout of the reference (atlasq's UMAP layout, gridded at 20, 40 and 80). Each activation's
   cell is the similarity-weighted vote of its 10 nearest reference activations, as
   ``atlasq histogram`` does, once with the exact search and once with the compact index of
   ``atlas export --compact``; ``compact_cell_agreement`` is the share of equal cells (at the
   finest grid; all three are printed). ``compact_size_ratio`` = compact index bytes ÷ the raw
   float16 activations an atlas ships otherwise.

    python bench/scale.py [--part writer,ray,compact] [--images 320] [--local-images 48]

Last lines: writer_images_per_s=, local_attr_images_per_s=, writer_vs_local_ratio=,
ray_vs_local_ratio=, compact_size_ratio=, compact_cell_agreement=.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from index import make_photos
from synthetic import synthetic_activations

WORK = Path(__file__).resolve().parent / "_work"


# ----------------------------------------------------------------------------- 1. the writer alone

def synthetic_batches(images: int, batch: int, *, k: int = 4, channels: int = 512, classes: int = 1000,
                      pooled: int = 1024, seed: int = 0):
    """Records shaped as the per-batch step returns them, made up in advance (so only the writer is timed)."""
    from atlasq.embed import Decoded, Embedded
    from atlasq.images import FileEntry

    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, images, batch):
        n = min(batch, images - start)
        decoded = [Decoded(FileEntry(f"photos/{start + i:07d}.jpg", 80_000 + i, 1.7e9 + i), width=640, height=480,
                           hash=f"{start + i:016x}") for i in range(n)]
        embedded = Embedded(
            pooled=rng.random((n, pooled), np.float32), top5_class=rng.integers(classes, size=(n, 5)),
            top5_prob=rng.random((n, 5), np.float32),
            positions={"mixed4c": rng.integers(1, 13, size=(n, k, 2))},
            activations={"mixed4c": rng.random((n, k, channels), np.float32)},
            attributions={"mixed4c": rng.standard_normal((n, k, classes), np.float32)})
        out.append((decoded, embedded))
    return out


def writer_rate(images: int, commit_every: int = 256) -> float:
    """Images/s of the writer: the indexer's own chunk builder and commit, then the FAISS file."""
    from atlasq.indexer import IndexSummary, _ChunkBuilder, _commit
    from atlasq.search import sync_faiss
    from atlasq.store import IndexStore

    batches = synthetic_batches(images, 32)
    home = Path(tempfile.mkdtemp(prefix="atlasq-writer-"))
    try:
        folder = home / "w"
        folder.mkdir()
        with IndexStore.writer(folder), IndexStore.create(folder) as store:
            store.set_meta({"layers": ["mixed4c"], "attributions": True, "samples_per_image": 4,
                            "layer_dims": {"mixed4c": 512}})
            summary = IndexSummary(name="w", folder=str(folder), root="photos")
            builder = _ChunkBuilder(("mixed4c",), store.next_image_id())
            started = time.perf_counter()
            for decoded, embedded in batches:
                builder.add(decoded, embedded)
                if len(builder) >= commit_every:
                    _commit(store, builder, summary, set())
            _commit(store, builder, summary, set())
            sync_faiss(store)
            seconds = time.perf_counter() - started
            assert store.count("images") == images and store.count("samples") == 4 * images
        return images / seconds
    finally:
        shutil.rmtree(home, ignore_errors=True)


def local_rate(photos: Path, images: int, *, attributions: bool, engine=None) -> tuple[float, int]:
    """Images/s of ``atlasq index`` on ``photos`` (InceptionV1, random weights), and how many it indexed."""
    from atlasq.indexer import IndexOptions, build_index

    home = Path(tempfile.mkdtemp(prefix="atlasq-scale-"))
    try:
        started = time.perf_counter()
        summary = build_index(photos, "b", home=home, progress=False, engine=engine,
                              options=IndexOptions(model="inceptionv1", weights="random", attributions=attributions,
                                                   samples_per_image=4, layers=("mixed4c",)))
        return summary.indexed / (time.perf_counter() - started), summary.indexed
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------- 2. Ray against local

def _timed_ray_engine():
    from atlasq.ray_engine import RayEngine

    class Timed(RayEngine):
        """The Ray engine, noting when it was asked for batches and when the first came back."""

        def embedded_batches(self, *args, **kwargs):
            object.__setattr__(self, "started_at", time.perf_counter())
            for i, (decoded, embedded) in enumerate(super().embedded_batches(*args, **kwargs)):
                if i == 0:
                    object.__setattr__(self, "first_batch_at", time.perf_counter())
                yield decoded, embedded

    return Timed


def TimedRayEngine(**kwargs):
    return _timed_ray_engine()(**kwargs)


# ----------------------------------------------------------------------------- 3. the compact index

def compact_agreement(n_reference: int, n_queries: int, grids=(20, 40, 80)) -> dict:
    import faiss

    from atlasq.histogram import _weighted_vote, compact_reference_index, nearest
    from atlasq.layout import Grid, Layout, unit_rows

    reference = unit_rows(synthetic_activations(n_reference, 512, seed=0))
    queries = synthetic_activations(n_queries, 512, seed=0)  # same clusters, other draws (as bench/histogram.py)
    clock = time.perf_counter()
    positions = Layout(fit_size=5000, n_epochs=200, random_state=0).fit_transform(reference)
    layout_s = time.perf_counter() - clock
    cells = {g: Grid(g).fit(positions).transform(positions) for g in grids}
    flat = {g: c[:, 0] * g + c[:, 1] for g, c in cells.items()}

    exact = faiss.IndexFlatIP(reference.shape[1])
    exact.add(reference)
    clock = time.perf_counter()
    e_sims, e_rows = nearest(exact, queries, 10)
    exact_s = time.perf_counter() - clock
    clock = time.perf_counter()
    compact = compact_reference_index(reference)
    build_s = time.perf_counter() - clock
    clock = time.perf_counter()
    c_sims, c_rows = nearest(compact, queries, 10)
    compact_s = time.perf_counter() - clock

    def vote(sims, rows, g):
        return _weighted_vote(flat[g][np.maximum(rows, 0)], np.maximum(sims, 0) + 1e-6)

    agreement = {g: float(np.mean(vote(e_sims, e_rows, g) == vote(c_sims, c_rows, g))) for g in grids}
    index_bytes = faiss.serialize_index(compact).nbytes
    raw_bytes = n_reference * reference.shape[1] * 2  # float16, as an atlas stores them
    print(f"compact: {n_queries:,} activations on a {n_reference:,}-activation reference; layout {layout_s:.0f} s, "
          f"exact search {exact_s:.1f} s, compact index built in {build_s:.1f} s and searched in {compact_s:.1f} s; "
          f"{index_bytes:,} bytes against {raw_bytes:,}; nearest neighbour equal for "
          f"{np.mean(c_rows[:, 0] == e_rows[:, 0]):.3f}", flush=True)
    for g in grids:
        print(f"  cell agreement at {g}×{g}: {agreement[g]:.4f}")
    return {"compact_size_ratio": index_bytes / raw_bytes, "compact_cell_agreement": agreement[max(grids)],
            "compact_cell_agreement_coarsest": agreement[min(grids)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="writer,ray,compact")
    parser.add_argument("--images", type=int, default=320, help="JPEGs for the Ray-against-local run")
    parser.add_argument("--local-images", type=int, default=48, help="JPEGs for the local baseline with attributions")
    parser.add_argument("--writer-images", type=int, default=4096)
    parser.add_argument("--reference", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20_000)
    args = parser.parse_args()
    parts = set(args.part.split(","))
    figures: dict[str, float] = {}

    if "writer" in parts:
        photos = make_photos(WORK / f"photos_{args.local_images}", args.local_images)
        local, n = local_rate(photos, args.local_images, attributions=True)
        print(f"local pipeline, attributions, K=4 at mixed4c: {local:.2f} img/s on {n} JPEGs", flush=True)
        writer = writer_rate(args.writer_images)
        print(f"writer alone on {args.writer_images:,} precomputed records: {writer:.0f} img/s", flush=True)
        figures.update(writer_images_per_s=writer, local_attr_images_per_s=local, writer_vs_local_ratio=writer / local)

    if "ray" in parts:
        import ray

        photos = make_photos(WORK / f"photos_{args.images}", args.images)
        clock = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - clock
        engine = TimedRayEngine(num_workers=2)
        try:
            local, n = local_rate(photos, args.images, attributions=False)
            clock = time.perf_counter()
            on_ray, m = local_rate(photos, args.images, attributions=False, engine=engine)
            local_after, _ = local_rate(photos, args.images, attributions=False)
        finally:
            ray.shutdown()
        baseline = (local + local_after) / 2  # bracket the Ray run against drift in machine load
        first = engine.first_batch_at - engine.started_at
        print(f"local engine {local:.2f} then {local_after:.2f} img/s; Ray engine (2 actors × 1 thread) "
              f"{on_ray:.2f} img/s on {m} JPEGs; starting Ray took {startup:.1f} s (not counted); the first "
              f"batch came back {first:.1f} s after the pool was asked for (actors starting and loading the network; "
              f"in file order, so that batch waits for the first actor)", flush=True)
        figures.update(ray_startup_s=startup, ray_first_batch_s=first, ray_images_per_s=on_ray,
                       ray_vs_local_ratio=on_ray / baseline)

    if "compact" in parts:
        figures.update(compact_agreement(args.reference, args.queries))

    print(f"cpu_threads={os.cpu_count()}")
    for key, value in figures.items():
        print(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")


if __name__ == "__main__":
    main()
