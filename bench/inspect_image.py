"""Benchmark: inspecting one image (atlasq inspect) once its icons are cached.

For each network (the demo network at 128 px; InceptionV1 at 224 px, with random weights unless
its ImageNet weights are cached, which costs the same arithmetic), at mixed4d: one inspection
renders the icons it needs into a temporary cache (one step each: what is timed is the rest), then
``--repeats`` inspections of the same image are timed end to end (activations, attribution to
the top 3 classes, channel attribution, NMF into 6 groups, layer-to-layer attribution, icons
read from the cache, the picture, inspect.json and inspect.npz written). The model is loaded
once, as the app and the API keep it; its loading time is printed apart.

Baseline, in the same run: the spatial attribution map computed position by position with the
forward-mode formulation of :mod:`atlasq.attribution` (one tangent per position), against the
reverse-mode maps :func:`atlasq.blocks.attribution_maps` computes (one backward pass per class).

    python bench/inspect_image.py [--repeats 3] [--models demo,inceptionv1]

Last lines: inspect_seconds= (demo network, median), inspect_seconds_inceptionv1=,
spatial_speedup_vs_jvp=.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atlasq.attribution import attribute
from atlasq.blocks import attribution_maps, input_image, inspect_image
from atlasq.images import open_rgb
from atlasq.model import WeightsUnavailableError, load_model

IMAGE = Path(__file__).resolve().parents[1] / "sample_data" / "green_stars" / "green_stars_000.jpg"


def _model(name: str):
    if name == "inceptionv1":
        try:
            return load_model("inceptionv1", "imagenet"), "imagenet"
        except WeightsUnavailableError:
            return load_model("inceptionv1", "random"), "random (ImageNet weights not cached; same cost)"
    return load_model(name), "demo"


def bench(name: str, repeats: int, cache: Path, out: Path) -> tuple[float, float]:
    clock = time.perf_counter()
    model, weights = _model(name)
    load_s = time.perf_counter() - clock
    image = open_rgb(IMAGE)
    options = dict(layer="mixed4d", from_layer="mixed3b", icon_folder=cache, groups=6, relaxed_maxpool=True)
    clock = time.perf_counter()
    first = inspect_image(model, image, icon_steps=1, **options)
    print(f"{name} ({weights}): model loaded in {load_s:.2f} s; first inspection rendered {first.icons['rendered']} "
          f"icons (1 step: only their cost is left out of the timing) in {time.perf_counter() - clock:.1f} s", flush=True)
    times = []
    for n in range(repeats):
        clock = time.perf_counter()
        result = inspect_image(model, image, icon_steps=1, **options)
        result.save(out / f"{name}-{n}")
        times.append(time.perf_counter() - clock)
        assert result.icons["rendered"] == 0, result.icons
    print(f"  cached inspections: {', '.join(f'{t:.2f}' for t in times)} s "
          f"(layer {result.activations.shape}, {result.icons['reused']} icons from the cache)", flush=True)

    x, _ = input_image(model, image)
    with torch.no_grad():
        h = model.network.forward_layers(x, ["mixed4d"])["mixed4d"]
    classes = result.classes
    clock = time.perf_counter()
    spatial, _, _ = attribution_maps(model.network, "mixed4d", h, classes)
    reverse_s = time.perf_counter() - clock
    _, _, height, width = h.shape
    positions = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(1, -1, 2)
    clock = time.perf_counter()
    forward = attribute(model.network, "mixed4d", h, positions)[0].numpy()
    forward_s = time.perf_counter() - clock
    agree = np.abs(forward[:, classes].T.reshape(spatial.shape) - spatial).max()
    print(f"  spatial maps for {len(classes)} classes: reverse mode {reverse_s:.3f} s, per-position forward mode "
          f"{forward_s:.3f} s ({height * width} tangents); largest difference {agree:.2e}", flush=True)
    return statistics.median(times), forward_s / reverse_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="demo,inceptionv1")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            results[name] = bench(name, args.repeats, Path(work) / "cache", Path(work) / "out")
    if "demo" in results:
        print(f"inspect_seconds={results['demo'][0]:.2f}")
    if "inceptionv1" in results:
        print(f"inspect_seconds_inceptionv1={results['inceptionv1'][0]:.2f}")
    first = next(iter(results.values()))
    print(f"spatial_speedup_vs_jvp={first[1]:.1f}")


if __name__ == "__main__":
    main()
