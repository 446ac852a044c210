"""Benchmark: how far one machine's writer and the Ray engine scale, and what a compact atlas costs.

1. Writer alone (``--part writer``). The single writer of ``atlasq index`` (chunk building, shard
   arrays, DuckDB rows, and the FAISS file at the end) is fed precomputed records of
   ``--writer-images`` images as fast as it takes them: K = 4 samples at mixed4c (512 channels)
   with attributions to 1,000 classes, 1,024-d pooled vectors, committed every 256 images as
   ``atlasq index`` does. Baseline: the local pipeline indexing ``--local-images`` real 640×480
   JPEGs with the same settings (InceptionV1, random weights, attributions, K = 4) in the same run.
   ``writer_vs_local_ratio`` is how many such machines one writer keeps up with.
2. Ray against local (``--part ray``). ``--images`` JPEGs indexed (no attributions, K = 4 at
   mixed4c, batches of ``--batch-size``) by the local engine, then by ``--engine ray`` with 2
   single-threaded actors on a local Ray of 2 CPUs, then by the local engine again, in one process;
   ``ray_vs_local_ratio`` = the Ray run's images/s ÷ the mean of the two local runs, each timed
   over its whole ``build_index`` (loading the network, scanning, writing, FAISS). The local engine
   runs its usual two one-thread network streams and one decoding thread; each actor decodes and
   embeds its own batches on one thread. Not counted: starting Ray and the three helper actors Ray
   Data creates on its first use in a cluster (``ray_startup_s``), since a cluster is started
   once for many runs. Counted: the pool's start-up (each actor's process importing Ray Data and
   torch and loading the network), which every run pays once; ``ray_first_batch_s`` shows it, and
   ``*_steady_images_per_s`` the rates over the second half of the batches. Also
   printed: CPU seconds during the Ray run of the actors, Ray Data's helper actors, Ray's daemons
   and the driver. The default of 2,400 images makes a run of about 45 s on 2 cores, so that the
   pool's start-up (about 9 s) weighs in it less than in shorter runs, though still far more than
   in a reference build of hours.
3. Compact placement index (``--part compact``). bench/histogram.py's data: a 100,000-activation
   synthetic reference (512-d) and ``--queries`` activations to place. Cells come from a real
   layout of the reference (atlasq's UMAP layout, gridded at 20, 40 and 80). Each activation's
   cell is the similarity-weighted vote of its 10 nearest reference activations, as
   ``atlasq histogram`` does, once with the exact search and once with the compact index of
   ``atlas export --compact``; ``compact_cell_agreement`` is the share of equal cells (at the
   finest grid; all three are printed). ``compact_size_ratio`` = compact index bytes ÷ the raw
   float16 activations an atlas ships otherwise.

    python bench/scale.py [--part writer,ray,compact] [--images 2400] [--batch-size 32] [--local-images 48]

Last lines: writer_images_per_s=, local_attr_images_per_s=, writer_vs_local_ratio=,
ray_vs_local_ratio= (with its breakdown above it), compact_size_ratio=, compact_cell_agreement=.
"""

from __future__ import annotations

import argparse
import math
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


def local_rate(photos: Path, images: int, *, attributions: bool) -> tuple[float, int]:
    """Images/s of ``atlasq index`` on ``photos`` (InceptionV1, random weights), and how many it indexed."""
    from atlasq.indexer import IndexOptions, build_index

    home = Path(tempfile.mkdtemp(prefix="atlasq-scale-"))
    try:
        started = time.perf_counter()
        summary = build_index(photos, "b", home=home, progress=False,
                              options=IndexOptions(model="inceptionv1", weights="random", attributions=attributions,
                                                   samples_per_image=4, layers=("mixed4c",)))
        return summary.indexed / (time.perf_counter() - started), summary.indexed
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------- 2. Ray against local

class BatchClock:
    """When an engine's batches were asked for and when each came back. Its start-up is the wait
    for the first batch; its steady rate is that of the second half of the batches, by when every
    network stream or actor has long been running and batches finished during the start-up (which
    the Ray engine hands over all at once, in file order, behind the first) have been handed over."""

    def __init__(self):
        self.asked, self.arrivals = None, []

    def wrap(self, batches):
        self.asked = time.perf_counter()
        for decoded, embedded in batches:
            self.arrivals.append((time.perf_counter(), len(decoded)))
            yield decoded, embedded

    @property
    def startup_s(self) -> float:
        return self.arrivals[0][0] - self.asked

    @property
    def steady_rate(self) -> float:
        half = self.arrivals[max(0, len(self.arrivals) // 2 - 1):]
        seconds = half[-1][0] - half[0][0]
        return sum(n for _, n in half[1:]) / seconds if len(half) > 1 and seconds > 0 else float("nan")


def clocked_local_engine(clock: BatchClock):
    """Patch the local engine's batch stream so that ``clock`` times it (the bench's process only)."""
    from atlasq import indexer

    plain = indexer._embedded_batches
    indexer._embedded_batches = lambda *args, **kwargs: clock.wrap(plain(*args, **kwargs))
    return lambda: setattr(indexer, "_embedded_batches", plain)


def clocked_ray_engine(clock: BatchClock, **kwargs):
    from atlasq.ray_engine import RayEngine

    class Clocked(RayEngine):
        def embedded_batches(self, *args, **kw):
            return clock.wrap(super().embedded_batches(*args, **kw))

    return Clocked(**kwargs)


def warm_ray_data(ray) -> None:
    """One tiny Ray Data job on a one-actor pool. On its first use in a cluster, Ray Data creates
    three detached helper actors (its stats, its autoscaling coordinator, the actor-location
    tracker) that then live as long as the cluster; a cluster that has served a run already has
    them, so they belong to starting the cluster, not to the timed run."""

    class Echo:
        def __call__(self, batch):
            return batch

    ray.data.range(2, override_num_blocks=1).map_batches(
        Echo, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()


class ProcessCpu:
    """CPU seconds of this process's descendants (a local Ray's daemons and workers), sampled from
    /proc every ``every`` s so that processes which end before the last sample still count."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.seen, self._stop = every, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> dict[int, tuple[int, str, float]]:
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            out[int(stat.parent.name)] = (int(fields[1]), command.strip(), (int(fields[11]) + int(fields[12])) / ticks)
        return out

    def _sample(self) -> None:
        table = self._read()
        mine = {os.getpid()}
        grew = True
        while grew:  # the process tree under this one
            found = {pid for pid, (parent, _, _) in table.items() if parent in mine} - mine
            mine |= found
            grew = bool(found)
        for pid in mine - {os.getpid()}:
            _, command, cpu = table[pid]
            self.seen[pid] = (command, cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self.before = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_kind(self) -> dict[str, float]:
        """CPU seconds spent during the run by the pool's actors, Ray Data's helper actors and
        Ray's daemons (GCS, raylet, agents, idle workers)."""
        out = {"actors": 0.0, "helpers": 0.0, "daemons": 0.0}
        for pid, (command, cpu) in self.seen.items():
            used = cpu - self.before.get(pid, (command, 0.0))[1]
            if command.startswith("ray::MapWorker"):
                out["actors"] += used
            elif command.startswith("ray::") and not command.startswith("ray::IDLE"):
                out["helpers"] += used
            else:
                out["daemons"] += used
        return out


def ray_against_local(photos: Path, images: int, batch_size: int) -> dict:
    """The local engine, the Ray engine (2 single-threaded actors), then the local engine again, on
    the same folder in one process; Ray (and Ray Data's helpers) started before, not counted."""
    import ray

    from atlasq.indexer import IndexOptions, build_index

    def run(engine=None) -> tuple[float, float]:
        """Images/s of one whole ``build_index`` (start-up included), and its CPU seconds in this process."""
        home = Path(tempfile.mkdtemp(prefix="atlasq-scale-"))
        try:
            started, cpu = time.perf_counter(), time.process_time()
            summary = build_index(photos, "b", home=home, progress=False, engine=engine, batch_size=batch_size,
                                  options=IndexOptions(model="inceptionv1", weights="random", samples_per_image=4,
                                                       layers=("mixed4c",)))
            assert summary.indexed == images, summary
            return images / (time.perf_counter() - started), time.process_time() - cpu
        finally:
            shutil.rmtree(home, ignore_errors=True)

    clock = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started_s = time.perf_counter() - clock
    warm_ray_data(ray)
    startup = time.perf_counter() - clock
    try:
        local_clocks, local_rates, local_cpu = [], [], []
        ray_clock = BatchClock()
        for which in ("local", "ray", "local"):
            if which == "local":
                local_clocks.append(BatchClock())
                restore = clocked_local_engine(local_clocks[-1])
                try:
                    rate, cpu = run()
                finally:
                    restore()
                local_rates.append(rate)
                local_cpu.append(cpu)
            else:
                with ProcessCpu() as ray_cpu:
                    on_ray, driver_cpu = run(clocked_ray_engine(ray_clock, num_workers=2))
    finally:
        ray.shutdown()
    baseline = sum(local_rates) / 2  # bracket the Ray run against drift in machine load
    local_steady = sum(c.steady_rate for c in local_clocks) / 2
    kinds = ray_cpu.by_kind()
    batches = math.ceil(images / batch_size)
    print(f"local engine {local_rates[0]:.2f} then {local_rates[1]:.2f} img/s (whole runs; steady "
          f"{local_clocks[0].steady_rate:.2f} and {local_clocks[1].steady_rate:.2f} img/s over the second half of the "
          f"batches; the first came {local_clocks[0].startup_s:.1f} and {local_clocks[1].startup_s:.1f} s after the "
          f"pipeline started; "
          f"CPU of the process {local_cpu[0]:.1f} and {local_cpu[1]:.1f} s)", flush=True)
    print(f"Ray engine (2 actors × 1 thread) {on_ray:.2f} img/s on {images} JPEGs (whole run; steady "
          f"{ray_clock.steady_rate:.2f} img/s over the second half of the batches; the first came "
          f"{ray_clock.startup_s:.1f} s after the pool was asked for: actors starting, importing Ray Data and torch, "
          f"loading the network); "
          f"starting Ray took {startup:.1f} s ({started_s:.1f} s ray.init, then Ray Data's helper actors), not counted",
          flush=True)
    print(f"CPU during the Ray run: actors {kinds['actors']:.1f} s, Ray Data's helper actors {kinds['helpers']:.1f} s, "
          f"Ray's daemons {kinds['daemons']:.1f} s, the driver (planning, Ray Data's scheduling, the writer) "
          f"{driver_cpu:.1f} s = {1000 * driver_cpu / batches:.0f} ms per batch of {batch_size}", flush=True)
    return dict(ray_startup_s=startup, ray_first_batch_s=ray_clock.startup_s, ray_images_per_s=on_ray,
                local_images_per_s=baseline, ray_steady_images_per_s=ray_clock.steady_rate,
                local_steady_images_per_s=local_steady, ray_actors_cpu_s=kinds["actors"],
                ray_helpers_cpu_s=kinds["helpers"], ray_daemons_cpu_s=kinds["daemons"],
                ray_driver_cpu_s=driver_cpu, ray_steady_vs_local_ratio=ray_clock.steady_rate / local_steady,
                ray_vs_local_ratio=on_ray / baseline)


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
    parser.add_argument("--images", type=int, default=2400, help="JPEGs for the Ray-against-local run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (per actor call) in that run")
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
        photos = make_photos(WORK / f"photos_{args.images}", args.images)
        figures.update(ray_against_local(photos, args.images, args.batch_size))

    if "compact" in parts:
        figures.update(compact_agreement(args.reference, args.queries))

    print(f"cpu_threads={os.cpu_count()}")
    for key, value in figures.items():
        print(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")


if __name__ == "__main__":
    main()
