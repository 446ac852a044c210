"""Benchmark: the atlas's two costly stages, each against a plain baseline measured in the same run.

1. Layout. 100,000 × 512 synthetic activations (clustered, non-negative and sparse like post-ReLU
   activations). The baseline is ``umap.UMAP(n_neighbors=50, min_dist=0.05, metric="cosine")`` on
   all of them. atlasq's :class:`~atlasq.layout.Layout` runs the same UMAP on a seeded subset of
   ``--fit-size`` points and places the rest by FAISS k-NN. Quality is trustworthiness (k = 15,
   cosine) on a fixed subsample, for both layouts.
2. Icons. A batch of InceptionV1 icons at ``mixed4c`` (80 px) is rendered by
   :func:`atlasq.featurevis.render_directions`, which runs the network only up to the layer, with
   its BatchNorms folded into the convolutions, in bf16 where the CPU supports it (``--precision
   fp32`` stands in for a CPU without bf16). The baseline is a plain loop with the same parameterisation,
   transforms, objective, size and batch, which runs the full network in fp32. ``icon_step_speedup``
   compares one step of each; ``icon_speedup`` compares one icon: the plain loop's 512 steps (the
   articles') against atlasq's default steps, which end with a settle phase on the untransformed
   image. Whether atlasq's icons are as faithful is checked on the trained demo network at mixed5a,
   with real activations as directions (random weights cannot tell): ``icon_fidelity_ratio`` is the
   share of atlasq's icons whose centre activation is closest to their own direction, ÷ the plain
   loop's. The time of a 20×20 grid at the default steps is extrapolated from the timed batch.
   bf16's result is checked on the demo network too: icons rendered in bf16 and in fp32 are both
   scored in fp32.

InceptionV1 runs with seeded random weights: the ImageNet weights cannot be downloaded here, and
the speed does not depend on the weights.

    python bench/atlas.py [--points 100000] [--fit-size 20000] [--icon-steps 16] [--skip-layout]
                          [--precision auto|fp32|bf16] [--device cpu|cuda] [--cpu-time]
    python bench/atlas.py --cold-layout [--fit-size 20000]   (prints cold_layout_speedup=)

Last lines: layout_speedup=, trustworthiness_ratio=, icon_fidelity_ratio=, icon_step_speedup=,
icon_speedup=, icons_20x20_minutes=.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch

from atlasq.featurevis import direction_objective, fft_image, render_directions, robustness_transform
from atlasq.featurevis.render import IMAGENET_MEAN, IMAGENET_STD
from atlasq.layout import Layout
from atlasq.model import load_model, resolve_precision
from synthetic import synthetic_activations


#: The benchmark's clock: wall time, or with --cpu-time this process's CPU time (steadier when
#: other work shares the cores; both loops use the same torch thread count).
CLOCK = time.perf_counter
#: Steps of the plain loop an icon is compared with: the articles' 512.
BASELINE_STEPS = 512


def trustworthiness_on(X: np.ndarray, Y: np.ndarray, sample: np.ndarray) -> float:
    from sklearn.manifold import trustworthiness

    return float(trustworthiness(X[sample], Y[sample], n_neighbors=15, metric="cosine"))


def bench_layout(points: int, dims: int, fit_size: int) -> dict:
    import umap

    X = synthetic_activations(points, dims)
    sample = np.sort(np.random.default_rng(7).choice(points, min(points, 5000), replace=False))
    print(f"layout: {points:,} × {dims} activations; trustworthiness on {len(sample):,} of them", flush=True)

    clock = CLOCK()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        baseline = umap.UMAP(n_neighbors=50, min_dist=0.05, metric="cosine").fit_transform(X)
    baseline_s = CLOCK() - clock
    print(f"  baseline umap.UMAP on all points: {baseline_s:.1f} s", flush=True)

    clock = CLOCK()
    ours = Layout(n_neighbors=50, min_dist=0.05, metric="cosine", fit_size=fit_size).fit_transform(X)
    ours_s = CLOCK() - clock
    print(f"  atlasq Layout (UMAP on {fit_size:,}, k-NN placing for the rest): {ours_s:.1f} s", flush=True)

    t_base, t_ours = trustworthiness_on(X, baseline, sample), trustworthiness_on(X, ours, sample)
    print(f"  trustworthiness k=15: baseline {t_base:.4f}, atlasq {t_ours:.4f}", flush=True)
    return {"layout_speedup": baseline_s / ours_s, "trustworthiness_ratio": t_ours / t_base}


def cold_fit(search: str, points: int, dims: int) -> float:
    """Seconds to fit atlasq's layout of ``points`` synthetic activations in this fresh process,
    with UMAP's neighbours from FAISS (atlasq's way from 4,096 points) or from UMAP's own
    approximate search (``search="umap"``), compile time included, as a first atlas build pays it."""
    import umap  # noqa: F401  (imported before the clock starts, in both cases)

    import atlasq.layout as layout_module

    if search == "umap":
        layout_module.UMAP_EXACT_BELOW = 1 << 62
    X = synthetic_activations(points, dims)
    clock = time.perf_counter()
    layout_module.Layout(n_neighbors=50, min_dist=0.05, fit_size=points).fit(X)
    return time.perf_counter() - clock


def bench_cold_layout(points: int, dims: int) -> dict:
    """Both ways of finding UMAP's neighbours, each in its own fresh process."""
    import subprocess
    import sys

    seconds = {}
    for search in ("umap", "faiss"):
        done = subprocess.run([sys.executable, __file__, "--cold-fit", search, "--points", str(points),
                               "--dims", str(dims)], capture_output=True, text=True, check=True)
        seconds[search] = float(done.stdout.split("cold_fit_s=")[1].split()[0])
        print(f"  cold layout fit of {points:,} × {dims}, neighbours from {search}: {seconds[search]:.1f} s", flush=True)
    return {"cold_layout_speedup": seconds["umap"] / seconds["faiss"]}


def plain_full_network_loop(network, layer_module: torch.nn.Module, directions: torch.Tensor, *, size: int,
                            steps: int, seed: int = 0, images: list | None = None) -> float:
    """The straightforward loop: every step runs the whole network in fp32 and reads the layer
    from a forward hook. Same parameterisation, transforms and objective as atlasq's. Returns
    seconds per step; the final images are appended to ``images`` when it is given."""
    generator = torch.Generator().manual_seed(seed)
    device = next(network.parameters()).device
    params, image_fn = fft_image(len(directions), size, generator=generator, device=device)
    transform = robustness_transform(shift_px=12.0 * size / 80, generator=generator)
    objective = direction_objective(directions.to(device))
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    captured = {}
    hook = layer_module.register_forward_hook(lambda module, args, out: captured.update(acts=out))
    optimiser = torch.optim.Adam(params, lr=0.05)
    try:
        for step in range(steps + 2):
            if step == 2:  # the first steps warm up allocators and kernels
                clock = CLOCK()
            optimiser.zero_grad(set_to_none=True)
            network((transform(image_fn()) - mean) / std)
            (-objective(captured["acts"]).sum()).backward()
            optimiser.step()
    finally:
        hook.remove()
    if images is not None:
        images.append(image_fn().detach())
    return (CLOCK() - clock) / steps


def atlasq_loop(network, layer: str, directions: torch.Tensor, *, size: int, steps: int,
                precision: str) -> float:
    """Seconds per step of atlasq's renderer (after two warm-up steps)."""
    marks = {}

    def on_step(step: int) -> None:
        if step == 1:
            marks["start"] = CLOCK()
        marks["end"] = CLOCK()

    render_directions(network, layer, directions, size=size, steps=steps + 2, precision=precision,
                      on_step=on_step)
    return (marks["end"] - marks["start"]) / steps


def score_fp32(network, layer: str, directions: torch.Tensor, images: np.ndarray) -> np.ndarray:
    """The objective of finished icons, scored in fp32 without transforms."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[None, :, None, None]) / torch.tensor(IMAGENET_STD)[None, :, None, None]
    with torch.no_grad():
        return direction_objective(directions)(network.forward_layers(x, [layer])[layer]).numpy()


def bf16_check(steps: int, batch: int) -> float:
    """Do bf16 icons reach what fp32 icons reach? Random weights cannot tell (their objectives stay
    near zero), so this uses the trained demo network at mixed5a, with real activations of
    sample_data/ images as directions, and scores both sets of final icons in fp32."""
    from atlasq.atlas import default_icon_size

    model, directions = _demo_directions(batch)
    network, layer = model.network, "mixed5a"
    size = default_icon_size(model.input_size, (4, 4))
    scores, cosines = {}, {}
    for p in ("fp32", "bf16"):
        rendered = render_directions(network, layer, directions, size=size, steps=steps, precision=p, seed=1)
        scores[p] = score_fp32(network, layer, directions, rendered.images)
        cosines[p] = torch.nn.functional.cosine_similarity(torch.from_numpy(rendered.final_activation),
                                                           directions).mean().item()
    ratio = float(scores["bf16"].mean() / scores["fp32"].mean())
    print(f"  bf16 check (demo network, {layer}, {len(directions)} real directions, {size} px, {steps} steps): "
          f"mean fp32-scored objective bf16/fp32 = {ratio:.3f}; centre cosine to the direction "
          f"fp32 {cosines['fp32']:.3f}, bf16 {cosines['bf16']:.3f}", flush=True)
    return ratio


def _demo_directions(batch: int, layer: str = "mixed5a"):
    """The trained demo network and the centre activations of ``batch`` sample_data/ images at
    ``layer``: real directions, which random weights cannot give."""
    from PIL import Image

    from atlasq.demo_model import sample_data_dir

    model = load_model("demo", device="cpu")
    for p in model.network.parameters():
        p.requires_grad_(False)
    files = sorted(sample_data_dir().rglob("*.png"))[::7][:batch]
    x = torch.stack([model.transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        acts = model.network.forward_layers(x, [layer])[layer]
    return model, acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2].clone()


def _centre_fidelity(network, layer: str, directions: torch.Tensor, images: torch.Tensor) -> tuple[float, float]:
    """Of icons ``images`` (B, 3, S, S in [0, 1]), untransformed: the share whose centre activation
    is closer (cosine) to its own direction than to any other of the batch (the atlas's
    ``icon_fidelity``, with directions for cells), and their mean cosine to their own direction."""
    x = (images - torch.tensor(IMAGENET_MEAN)[None, :, None, None]) / torch.tensor(IMAGENET_STD)[None, :, None, None]
    with torch.no_grad():
        acts = network.forward_layers(x, [layer])[layer]
    centre = torch.nn.functional.normalize(acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2], dim=1)
    cosines = centre @ torch.nn.functional.normalize(directions, dim=1).T
    own = (cosines.argmax(1) == torch.arange(len(directions))).float().mean().item()
    return own, cosines.diagonal().mean().item()


def fidelity_check(batch: int, baseline_steps: int = 512) -> tuple[float, int]:
    """Do atlasq's default steps give icons as faithful as the plain loop's ``baseline_steps``?
    On the trained demo network at mixed5a (fp32), with real directions. Returns atlasq's
    own-direction share ÷ the plain loop's, and atlasq's default number of steps."""
    from atlasq.atlas import AtlasOptions, default_icon_size

    options = AtlasOptions()
    model, directions = _demo_directions(batch)
    network, layer = model.network, "mixed5a"
    size = default_icon_size(model.input_size, (4, 4))
    plain = []
    plain_full_network_loop(network, network.mixed5a, directions, size=size, steps=baseline_steps, images=plain)
    ours = render_directions(network, layer, directions, size=size, steps=options.steps, lr=options.lr,
                             settle_steps=round(options.settle * options.steps), precision="fp32", seed=1)
    plain_own, plain_cos = _centre_fidelity(network, layer, directions, plain[0])
    ours_own, ours_cos = _centre_fidelity(network, layer, directions,
                                          torch.from_numpy(ours.images).permute(0, 3, 1, 2).float() / 255)
    print(f"  fidelity (demo network, {layer}, {len(directions)} real directions, {size} px, fp32): plain loop at "
          f"{baseline_steps} steps: {plain_own:.3f} closest to their own direction, mean cosine {plain_cos:.3f}; "
          f"atlasq at its default {options.steps} steps ({options.settle:g} of them settling): {ours_own:.3f}, "
          f"mean cosine {ours_cos:.3f}", flush=True)
    return ours_own / plain_own, options.steps


def bench_icons(steps: int, batch: int, size: int, check_steps: int, precision: str = "auto",
                device: str = "cpu") -> dict:
    model = load_model("inceptionv1", "random", device=device)
    network, layer = model.network, "mixed4c"
    for p in network.parameters():
        p.requires_grad_(False)
    precision = resolve_precision(precision, model.device)
    with torch.no_grad():
        acts = network.forward_layers(torch.rand(64, 3, 224, 224, device=model.device), [layer])[layer]
    pool = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
    directions = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:batch]].clone()
    print(f"icons: InceptionV1 (random weights) {layer}, batch {batch}, {size} px, {steps} timed steps; "
          f"atlasq precision {precision}", flush=True)

    baseline = plain_full_network_loop(network, network.net.inception4c, directions, size=size, steps=steps)
    print(f"  baseline (full network, fp32): {baseline:.3f} s/step", flush=True)
    if precision == "bf16" and model.device.type == "cpu":
        network.to(memory_format=torch.channels_last)
    ours = atlasq_loop(network, layer, directions, size=size, steps=steps, precision=precision)
    print(f"  atlasq (up to {layer}, {precision}): {ours:.3f} s/step", flush=True)
    from atlasq.atlas import AtlasOptions

    steps_per_icon = AtlasOptions().steps
    result = {"icon_step_speedup": baseline / ours}
    if check_steps and model.device.type == "cpu":
        result["icon_fidelity_ratio"], steps_per_icon = fidelity_check(batch, BASELINE_STEPS)
    # per icon: the plain loop's steps against atlasq's default steps, whose fidelity is checked above
    result["icon_speedup"] = baseline * BASELINE_STEPS / (ours * steps_per_icon)
    print(f"  per icon: plain loop {BASELINE_STEPS} steps × {baseline:.3f} s, atlasq {steps_per_icon} steps × "
          f"{ours:.3f} s", flush=True)
    if precision == "bf16" and check_steps and model.device.type == "cpu":
        result["bf16_objective_ratio"] = bf16_check(check_steps, batch)
    cells = 20 * 20
    minutes = math.ceil(cells / batch) * steps_per_icon * ours / 60
    print(f"  icons_20x20_minutes is extrapolated from the timed batch: ceil({cells}/{batch}) batches × "
          f"{steps_per_icon} steps × {ours:.3f} s/step, every cell kept, no retries", flush=True)
    result["icons_20x20_minutes"] = minutes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--fit-size", type=int, default=20_000)
    parser.add_argument("--icon-steps", type=int, default=16, help="timed steps per icon loop")
    parser.add_argument("--icon-batch", type=int, default=32)
    parser.add_argument("--icon-size", type=int, default=80)
    parser.add_argument("--check-steps", type=int, default=128, help="steps of the bf16-vs-fp32 check (0: skip it and the fidelity check)")
    parser.add_argument("--skip-layout", action="store_true")
    parser.add_argument("--cold-layout", action="store_true",
                        help="only time a first layout fit of --fit-size points (neighbours from UMAP vs FAISS), "
                             "each in a fresh process")
    parser.add_argument("--cold-fit", choices=("umap", "faiss"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-icons", action="store_true")
    parser.add_argument("--precision", default="auto",
                        help="atlasq's icons in auto, fp32, bf16 (fp16 on CUDA); fp32 stands in for a CPU without bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time, not wall time")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time

    if args.cold_fit:
        print(f"cold_fit_s={cold_fit(args.cold_fit, args.points, args.dims):.2f}")
        return
    if args.cold_layout:
        print(f"cold_layout_speedup={bench_cold_layout(args.fit_size, args.dims)['cold_layout_speedup']:.3f}")
        return
    results = {}
    if not args.skip_layout:
        results.update(bench_layout(args.points, args.dims, args.fit_size))
    if not args.skip_icons:
        results.update(bench_icons(args.icon_steps, args.icon_batch, args.icon_size, args.check_steps,
                                   args.precision, args.device))
    for key in ("bf16_objective_ratio", "layout_speedup", "trustworthiness_ratio", "icon_fidelity_ratio",
                "icon_step_speedup", "icon_speedup", "icons_20x20_minutes"):
        if key in results:
            print(f"{key}={results[key]:.3f}")


if __name__ == "__main__":
    main()
