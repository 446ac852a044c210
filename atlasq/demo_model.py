"""The demo network: a quarter-width InceptionV1 trained on ``sample_data/``.

It exists so that atlasq can be run and tested for *meaning* on a machine with no network
access and no ImageNet weights. It registers itself with the model registry as ``demo``
(:func:`atlasq.model.register_model`); :mod:`atlasq.model` only names this module, and imports
it the first time the name is asked for.

Training is seeded and runs in a child process whose arithmetic is pinned (see ``NUMERICS``),
so that CPUs of different kinds compute the same thing wherever torch lets them. The result is
cached on disk under a key made of the training data, the recipe, the pinned arithmetic and
torch's version, so changing any of them trains anew and every later use loads the file. The
weights for the repository's ``sample_data/`` ship with the package (:func:`shipped`), so a first
use copies them instead of training.

A fixed fifth of each class (every image whose number ends the class's list in steps of 5)
is held out of training; :func:`held_out_paths` names them so tests can use images the
network has never seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms._presets import ImageClassification

from . import sampledata
from .fileio import replaced
from .images import open_rgb, scan_images
from .model import (LoadedModel, Preprocess, TinyInceptionV1, _load_state_dict_file,
                    load_fitting, register_model, weights_digest)

INPUT_SIZE = 128
RESIZE_SIZE = 144
CATEGORIES: tuple[str, ...] = tuple(sampledata.CLASSES)
RECIPE = {"epochs": 30, "batch_size": 32, "lr": 3e-3, "weight_decay": 5e-4,
          "label_smoothing": 0.1, "min_crop_scale": 0.35, "seed": 0, "version": 2}
#: Recipes may also ask for CutMix (``bench/demo_recipe.py`` compares them): ``cutmix``, the chance
#: that a batch of the first ``cutmix_epochs`` has a box of each image replaced by the same box of
#: another, the labels mixed by area. The shipped recipe has none; the README's Building Blocks
#: section says what it changes.
#: How the training arithmetic is pinned. Floating-point sums give different bits in a different
#: order, and torch picks the order by the thread count and by the widest vector instructions the
#: CPU has (ATen's own kernels, oneDNN's convolutions, MKL's matrix products each choose). So the
#: child process that trains uses a fixed number of threads and caps all three at AVX2, which every
#: x86-64 CPU atlasq targets has; together with seeded data order and augmentation, deterministic
#: algorithms and full fp32 (no autocast, "highest" matmul precision), a retrain gives the same
#: weights on the same CPU and, as far as those libraries honour the caps, on another. What they
#: do not pin (kernel blocking tuned to cache sizes, other instruction sets) can still differ, which
#: is why the tests assert the network's quality in aggregate, with margins.
NUMERICS = {"threads": 2, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
HOLD_OUT_EVERY = 5
#: Trained weights shipped with the package, named as in the cache (see :func:`shipped`).
SHIPPED = Path(__file__).resolve().parent / "data"


def sample_data_dir() -> Path:
    """The sample collection: ``$ATLASQ_SAMPLE_DATA``, the repository's ``sample_data/``, or a
    freshly generated copy in the cache (generation is deterministic, so all three agree)."""
    if os.environ.get("ATLASQ_SAMPLE_DATA"):
        return Path(os.environ["ATLASQ_SAMPLE_DATA"])
    repo_copy = Path(__file__).resolve().parents[1] / "sample_data"
    if (repo_copy / CATEGORIES[0]).is_dir():
        return repo_copy
    generated = cache_dir() / "sample_data"
    if not (generated / CATEGORIES[0]).is_dir():
        sampledata.generate(generated)
    return generated


def cache_dir() -> Path:
    """Where trained demo weights live: ``$ATLASQ_CACHE`` or ``~/.cache/atlasq``."""
    root = os.environ.get("ATLASQ_CACHE") or Path.home() / ".cache" / "atlasq"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def labelled_files(root: Path) -> list[tuple[str, int]]:
    """``(relative path, class index)`` for every image in a class folder of ``root``."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    out = []
    for entry in scan_images(root):
        folder = entry.path.split("/", 1)[0]
        if folder in index:
            out.append((entry.path, index[folder]))
    if not out:
        raise FileNotFoundError(f"no images in class folders {', '.join(CATEGORIES)} under {root}")
    return out


def split(files: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic split: within each class (files sorted), every 5th file is held out."""
    train, held = [], []
    seen: dict[int, int] = {}
    for path, label in sorted(files):
        n = seen.get(label, 0)
        seen[label] = n + 1
        (held if n % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else train).append((path, label))
    return train, held


def held_out_paths(root: Path | None = None) -> list[tuple[str, int]]:
    """The held-out ``(relative path, class index)`` pairs of the sample collection."""
    return split(labelled_files(root or sample_data_dir()))[1]


def _cache_key(root: Path, files: list[tuple[str, int]], recipe: dict = RECIPE) -> str:
    digest = hashlib.sha256(json.dumps([recipe, NUMERICS, torch.__version__], sort_keys=True).encode())
    digest.update(json.dumps([INPUT_SIZE, RESIZE_SIZE, CATEGORIES]).encode())
    for path, label in sorted(files):
        digest.update(f"{path}\0{label}\0".encode())
        digest.update((root / path).read_bytes())
    return digest.hexdigest()[:16]


def transform() -> Preprocess:
    """The demo network's preprocessing: torchvision's ImageNet classification preset (its mean and
    std included) at the demo's sizes. Training normalises with the same preset."""
    return Preprocess(ImageClassification(crop_size=INPUT_SIZE, resize_size=RESIZE_SIZE))


def _load_resized(root: Path, files: list[tuple[str, int]]) -> list[torch.Tensor]:
    """Decode each image once, shorter side resized to ``RESIZE_SIZE`` (uint8, C×H×W)."""
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(RESIZE_SIZE, antialias=True)])
    return [resize(open_rgb(root / path)) for path, _ in files]


def _batches(images, labels, batch_size, generator, augment, recipe=RECIPE):
    order = torch.randperm(len(images), generator=generator) if augment else torch.arange(len(images))
    preset = transform().preset
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(preset.mean, preset.std)])
    crop = (v2.Compose([v2.RandomResizedCrop(INPUT_SIZE, scale=(recipe["min_crop_scale"], 1.0),
                                             antialias=True), v2.RandomHorizontalFlip()])
            if augment else v2.CenterCrop(INPUT_SIZE))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].tolist()
        x = torch.stack([normalise(crop(images[i])) for i in idx])
        yield x, torch.tensor([labels[i] for i in idx])


def pinned_environment(base: dict | None = None) -> dict:
    """The environment of the training child: ``base`` (default: this process's) with ``NUMERICS``."""
    env = dict(os.environ if base is None else base)
    threads = str(NUMERICS["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if platform.machine().lower() in ("x86_64", "amd64"):  # the caps name x86 instruction sets
        env.update({k: v for k, v in NUMERICS.items() if k != "threads"})
    return env


def train(root: Path, out: Path, *, recipe: dict = RECIPE, progress: bool = True, env: dict | None = None) -> dict:
    """Train the demo network on ``root`` and save ``out`` (state dict) and ``out.json`` (report).

    The training runs in a child process with the pinned arithmetic of ``NUMERICS`` (which can only
    be chosen before torch first computes anything); ``env`` is the environment it starts from.
    """
    command = [sys.executable, "-m", "atlasq.demo_model", "--root", str(root), "--out", str(out),
               "--recipe", json.dumps(recipe)] + ([] if progress else ["--quiet"])
    done = subprocess.run(command, env=pinned_environment(env), stdout=subprocess.DEVNULL)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"training the demo network failed (exit code {done.returncode}); its output is above")
    return report(out)


def _train_here(root: Path, out: Path, recipe: dict, progress: bool) -> dict:
    """The training itself, in the pinned child process."""
    torch.set_num_threads(NUMERICS["threads"])
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("highest")
    started = time.perf_counter()
    files = labelled_files(root)
    train_files, held_files = split(files)
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    train_images = _load_resized(root, train_files)
    held_images = _load_resized(root, held_files)
    train_labels = [label for _, label in train_files]
    held_labels = [label for _, label in held_files]

    net = TinyInceptionV1(len(CATEGORIES))
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = -(-len(train_images) // recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    cutmix = v2.CutMix(num_classes=len(CATEGORIES))
    for epoch in range(recipe["epochs"]):
        net.train()
        total = 0.0
        for x, y in _batches(train_images, train_labels, recipe["batch_size"], generator, True, recipe):
            # drawn only for recipes with CutMix, so that the shipped recipe's random stream is unchanged
            if (recipe.get("cutmix", 0) > 0 and float(torch.rand(1, generator=generator)) < recipe["cutmix"]
                    and epoch < recipe.get("cutmix_epochs", recipe["epochs"])):
                x, y = cutmix(x, y)  # y becomes class probabilities, which the loss accepts
            optimiser.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(y)
        if progress:
            print(f"demo network: epoch {epoch + 1}/{recipe['epochs']} "
                  f"loss {total / len(train_images):.3f}", file=sys.stderr, flush=True)

    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in _batches(held_images, held_labels, 64, None, False, recipe):
            correct += int((net(x).argmax(1) == y).sum())
    result = {
        "held_out_accuracy": correct / len(held_images),
        "train_images": len(train_images),
        "held_out_images": len(held_images),
        "categories": list(CATEGORIES),
        "recipe": recipe,
        "numerics": NUMERICS,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "held_out": [path for path, _ in held_files],
    }
    tmp = out.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


def shipped(key: str) -> Path | None:
    """The weights trained for cache key ``key`` that ship with atlasq, if any.

    ``atlasq demo-model`` trained them on ``sample_data/`` with this recipe, these pinned numerics
    and this torch version (all part of the key); they ship so that a first ``atlasq demo`` does
    not spend its first minute and a half training. ``tests/test_demo_model.py`` retrains them
    and checks that training still gives a network of the same quality, and that the shipped file
    is the one the current key names."""
    path = SHIPPED / f"demo-{key}.pt"
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def ship(weights: Path) -> Path:
    """Copy cached ``weights`` (and their report) into the package as the shipped weights,
    removing any shipped for another key. Returns the shipped path."""
    SHIPPED.mkdir(exist_ok=True)
    target = SHIPPED / weights.name
    for suffix in (".json", ".pt"):
        shutil.copyfile(weights.with_suffix(suffix), target.with_suffix(suffix))
    for old in SHIPPED.glob("demo-*"):
        if old.stem != target.stem:
            old.unlink()
    return target


def ensure_trained(root: Path | None = None, *, force: bool = False) -> Path:
    """Path to the cached demo weights for ``root``: copied from the weights atlasq ships when they
    were trained for the same key (:func:`shipped`), else trained first."""
    root = root or sample_data_dir()
    files = labelled_files(root)
    key = _cache_key(root, files)
    out = cache_dir() / f"demo-{key}.pt"
    if not force and not out.is_file() and (packaged := shipped(key)) is not None:
        for suffix in (".json", ".pt"):  # the weights last: their presence means both are there
            with replaced(out.with_suffix(suffix)) as tmp:
                shutil.copyfile(packaged.with_suffix(suffix), tmp)
        print(f"demo network: using the weights atlasq ships for sample_data/ (held-out accuracy "
              f"{report(out)['held_out_accuracy']:.3f}; `atlasq demo-model --force` retrains them)",
              file=sys.stderr, flush=True)
    if force or not out.is_file():
        print(f"training the demo network on {root} (once; cached at {out}) …",
              file=sys.stderr, flush=True)
        result = train(root, out)
        print(f"demo network: held-out accuracy {result['held_out_accuracy']:.3f} "
              f"in {result['seconds']} s", file=sys.stderr, flush=True)
    return out


def load(weights: str, seed: int) -> LoadedModel:
    """The registry's loader for ``demo``: ``"demo"`` (the cached trained weights, trained first if
    needed), ``"random"`` (seeded), or a path to a state dict."""
    categories = list(CATEGORIES)
    torch.manual_seed(seed)
    network = TinyInceptionV1(len(categories))
    if weights != "random":
        path = ensure_trained() if weights in ("demo", "default") else Path(weights)
        load_fitting(network, _load_state_dict_file(path), "demo network", str(path))
        weights = "demo" if weights in ("demo", "default") else f"file:{path.name}"
    return LoadedModel(name="demo", weights=weights, weights_sha256=weights_digest(network), network=network,
                       transform=transform(), categories=categories, input_size=INPUT_SIZE)


register_model("demo", load, "demo")


def report(weights: Path) -> dict:
    """The training report saved beside ``weights``."""
    return json.loads(weights.with_suffix(".json").read_text())


def main(argv: list[str] | None = None) -> None:
    """Entry of the training child process (see :func:`train`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default=json.dumps(RECIPE))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    _train_here(args.root, args.out, json.loads(args.recipe), progress=not args.quiet)


if __name__ == "__main__":
    main()
