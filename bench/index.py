"""Benchmark: does decoding keep up with the network during `atlasq index`?

Builds (once, cached under bench/_work/photos_N/) a folder of realistic 640×480 JPEGs (quality 90),
then in one process measures
  1. the raw network throughput on pre-decoded tensors (same model, precision, batch size);
  2. the whole index pipeline on the folder (decode threads, network, sampling, DuckDB/FAISS writes);
and prints the ratio of the two. Machines here are noisy, so only the ratio is meaningful.

    python bench/index.py [--images 2000] [--batch-size 32] [--precision auto] [--model inceptionv1]
                          [--device cpu|cuda]
    python bench/index.py --attributions [--attribution-images 160] [--precision fp32]

Last lines: images_per_s=, ratio_to_model=, peak_rss_mb=; with --attributions:
attribution_positions_per_s=, attribution_overhead_k1=, attribution_overhead_k4= (wall time; the
same ratios by CPU time are printed above them).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from atlasq import sampledata
from atlasq.embed import EmbedConfig, decode_file, embed_batch
from atlasq.images import scan_images
from atlasq.indexer import IndexOptions, build_index, network_streams
from atlasq.model import load_model, resolve_precision

WORK = Path(__file__).resolve().parent / "_work"


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """640×480 JPEGs with photo-like content: a drawn scene, blur, grain (about 60–120 KB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    for i in range(existing, count):
        rng = np.random.default_rng([seed, i])
        name = sampledata.CLASSES[i % len(sampledata.CLASSES)]
        scene = sampledata.draw(name, rng, (640, 480)).filter(ImageFilter.GaussianBlur(1.2))
        grain = rng.normal(0, 9, (480, 640, 3))
        pixels = np.clip(np.asarray(scene, np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder


def raw_network_rate(model, config: EmbedConfig, inputs: torch.Tensor, batch_size: int, repeats: int,
                     streams: int) -> float:
    """Images/s of the network alone (same work as the pipeline's embed step) on pre-decoded
    tensors, with ``streams`` batches at once and the threads split between them, after a warm-up."""
    keys = [f"k{i}" for i in range(batch_size)]
    starts = [(r * batch_size) % (len(inputs) - batch_size + 1) for r in range(repeats)]
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // streams))
    try:
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda s: embed_batch(model, inputs[s:s + batch_size], keys, config), starts[:2 * streams]))
            started = time.perf_counter()
            list(pool.map(lambda s: embed_batch(model, inputs[s:s + batch_size], keys, config), starts))
            return repeats * batch_size / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


def best_raw_rate(model, config, inputs, batch_size, repeats) -> tuple[float, dict]:
    """The better of one stream with every thread and the pipeline's stream split."""
    rates = {n: raw_network_rate(model, config, inputs, batch_size, repeats, n)
             for n in sorted({1, network_streams(model.device)})}
    return max(rates.values()), rates


def timed_index(photos: Path, options: IndexOptions, precision: str, batch_size: int, workers, device: str
                ) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, images) of one fresh ``build_index`` run in a temporary home."""
    home = Path(tempfile.mkdtemp(prefix="atlasq-bench-"))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = build_index(photos, "bench", home=home, precision=precision, batch_size=batch_size,
                              workers=workers, progress=False, options=options, device=device)
        return time.perf_counter() - wall, time.process_time() - cpu, summary.indexed
    finally:
        shutil.rmtree(home, ignore_errors=True)


def bench_attributions(args, precision: str) -> None:
    """Index the same JPEGs without attributions, then with them at K = 1 and K = 4, in one process.

    Each time has the start-up (loading the network, creating the index, FAISS) subtracted: the
    time of indexing an empty folder with the same settings. The overheads are (index time with
    attributions) ÷ (index time without); ``attribution_positions_per_s`` is the attributed
    positions at K = 4 (images × 4) ÷ the time attributions added at K = 4.
    """
    photos = make_photos(WORK / f"photos_{args.attribution_images}", args.attribution_images)
    empty = WORK / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    layer = args.attribution_layer
    runs = {"none": dict(attributions=False, samples_per_image=4), "k1": dict(attributions=True, samples_per_image=1),
            "k4": dict(attributions=True, samples_per_image=4)}
    times, cpu = {}, {}
    for name, settings in runs.items():
        options = IndexOptions(model=args.model, weights="random", layers=(layer,), **settings)
        start_wall, start_cpu, _ = timed_index(empty, options, precision, args.batch_size, args.workers, args.device)
        wall, used, images = timed_index(photos, options, precision, args.batch_size, args.workers, args.device)
        times[name], cpu[name] = wall - start_wall, used - start_cpu
        print(f"  {name}: {images} images at {layer}, {times[name]:.1f} s wall, {cpu[name]:.1f} s CPU "
              f"(start-up {start_wall:.1f} s subtracted)", flush=True)
    extra = times["k4"] - times["none"]
    extra_cpu = cpu["k4"] - cpu["none"]
    print(f"attribution_positions_per_cpu_s={4 * images / extra_cpu if extra_cpu > 0 else float('inf'):.1f}")
    print(f"attribution_overhead_k1_cpu={cpu['k1'] / cpu['none']:.3f}")
    print(f"attribution_overhead_k4_cpu={cpu['k4'] / cpu['none']:.3f}")
    print(f"attribution_positions_per_s={4 * images / extra if extra > 0 else float('inf'):.1f}")
    print(f"attribution_overhead_k1={times['k1'] / times['none']:.3f}")
    print(f"attribution_overhead_k4={times['k4'] / times['none']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--model", default="inceptionv1")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attributions", action="store_true",
                        help="instead: the cost of attributions at K = 1 and K = 4 (see bench_attributions)")
    parser.add_argument("--attribution-images", type=int, default=160)
    parser.add_argument("--attribution-layer", default="mixed4c")
    args = parser.parse_args()
    if args.attributions:
        device = load_model(args.model, "random", device=args.device).device
        precision = resolve_precision(args.precision, device)
        print(f"model={args.model} precision={precision} device={device} batch_size={args.batch_size}", flush=True)
        bench_attributions(args, precision)
        return

    photos = make_photos(WORK / f"photos_{args.images}", args.images)
    model = load_model(args.model, "random", device=args.device)
    precision = resolve_precision(args.precision, model.device)
    if precision == "bf16":
        model.network.to(memory_format=torch.channels_last)
    config = EmbedConfig(precision=precision)
    entries = scan_images(photos)[: args.images]
    inputs = torch.stack([decode_file(photos, e, model).tensor for e in entries[: 4 * args.batch_size]])
    repeats = max(8, min(40, args.images // (2 * args.batch_size)))
    raw_before, rates_before = best_raw_rate(model, config, inputs, args.batch_size, repeats)

    home = Path(tempfile.mkdtemp(prefix="atlasq-bench-"))
    try:
        started = time.perf_counter()
        summary = build_index(photos, "bench", home=home, precision=precision, batch_size=args.batch_size,
                              workers=args.workers, progress=False, device=args.device,
                              options=IndexOptions(model=args.model, weights="random"))
        pipeline = summary.indexed / (time.perf_counter() - started)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    raw_after, rates_after = best_raw_rate(model, config, inputs, args.batch_size, repeats)
    raw = (raw_before + raw_after) / 2  # bracket the pipeline run against drift in machine load

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model={args.model} precision={precision} batch_size={args.batch_size} images={summary.indexed}")
    fmt = lambda rates: ", ".join(f"{n} stream(s) {r:.1f}" for n, r in rates.items())
    print(f"raw network img/s before the pipeline run: {fmt(rates_before)}; after: {fmt(rates_after)}")
    print(f"baseline = the best of those, averaged: {raw:.1f} img/s; against the one-stream network alone "
          f"the ratio would be {pipeline / ((rates_before[1] + rates_after[1]) / 2):.3f}")
    print(f"images_per_s={pipeline:.2f}")
    print(f"ratio_to_model={pipeline / raw:.3f}")
    print(f"peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
