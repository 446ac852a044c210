"""The demo network: a quarter-width InceptionV1 trained on ``sample_data/``.

It exists so that atlasq can be run and tested for *meaning* on a machine with no network
access and no ImageNet weights. Training is seeded, takes about a minute on two CPU cores,
and its result is cached on disk under a key made of the training data, the recipe and this
module's version, so every later use loads the file.

A fixed fifth of each class (every image whose number ends the class's list in steps of 5)
is held out of training; :func:`held_out_paths` names them so tests can use images the
network has never seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from . import sampledata
from .images import open_rgb, scan_images

INPUT_SIZE = 128
RESIZE_SIZE = 144
CATEGORIES: tuple[str, ...] = tuple(sampledata.CLASSES)
RECIPE = {"epochs": 30, "batch_size": 32, "lr": 3e-3, "weight_decay": 5e-4,
          "label_smoothing": 0.1, "min_crop_scale": 0.35, "seed": 0, "version": 1}
HOLD_OUT_EVERY = 5


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


def _cache_key(root: Path, files: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(json.dumps([INPUT_SIZE, RESIZE_SIZE, CATEGORIES]).encode())
    for path, label in sorted(files):
        digest.update(f"{path}\0{label}\0".encode())
        digest.update((root / path).read_bytes())
    return digest.hexdigest()[:16]


def _load_resized(root: Path, files: list[tuple[str, int]]) -> list[torch.Tensor]:
    """Decode each image once, shorter side resized to ``RESIZE_SIZE`` (uint8, C×H×W)."""
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(RESIZE_SIZE, antialias=True)])
    return [resize(open_rgb(root / path)) for path, _ in files]


def _batches(images, labels, batch_size, generator, augment):
    order = torch.randperm(len(images), generator=generator) if augment else torch.arange(len(images))
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    crop = (v2.Compose([v2.RandomResizedCrop(INPUT_SIZE, scale=(RECIPE["min_crop_scale"], 1.0),
                                             antialias=True), v2.RandomHorizontalFlip()])
            if augment else v2.CenterCrop(INPUT_SIZE))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].tolist()
        x = torch.stack([normalise(crop(images[i])) for i in idx])
        yield x, torch.tensor([labels[i] for i in idx])


def train(root: Path, out: Path, *, progress: bool = True) -> dict:
    """Train the demo network on ``root`` and save ``out`` (state dict) and ``out.json`` (report)."""
    from .model import TinyInceptionV1

    started = time.perf_counter()
    files = labelled_files(root)
    train_files, held_files = split(files)
    torch.manual_seed(RECIPE["seed"])
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    train_images = _load_resized(root, train_files)
    held_images = _load_resized(root, held_files)
    train_labels = [label for _, label in train_files]
    held_labels = [label for _, label in held_files]

    net = TinyInceptionV1(len(CATEGORIES))
    optimiser = torch.optim.AdamW(net.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps_per_epoch = -(-len(train_images) // RECIPE["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=RECIPE["lr"], total_steps=RECIPE["epochs"] * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=RECIPE["label_smoothing"])
    for epoch in range(RECIPE["epochs"]):
        net.train()
        total = 0.0
        for x, y in _batches(train_images, train_labels, RECIPE["batch_size"], generator, True):
            optimiser.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss) * len(y)
        if progress:
            print(f"demo network: epoch {epoch + 1}/{RECIPE['epochs']} "
                  f"loss {total / len(train_images):.3f}", file=sys.stderr, flush=True)

    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in _batches(held_images, held_labels, 64, None, False):
            correct += int((net(x).argmax(1) == y).sum())
    report = {
        "held_out_accuracy": correct / len(held_images),
        "train_images": len(train_images),
        "held_out_images": len(held_images),
        "categories": list(CATEGORIES),
        "recipe": RECIPE,
        "seconds": round(time.perf_counter() - started, 1),
        "held_out": [path for path, _ in held_files],
    }
    tmp = out.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


def ensure_trained(root: Path | None = None, *, force: bool = False) -> Path:
    """Path to the cached demo weights for ``root``, training them first if needed."""
    root = root or sample_data_dir()
    files = labelled_files(root)
    out = cache_dir() / f"demo-{_cache_key(root, files)}.pt"
    if force or not out.is_file():
        print(f"training the demo network on {root} (once; cached at {out}) …",
              file=sys.stderr, flush=True)
        report = train(root, out)
        print(f"demo network: held-out accuracy {report['held_out_accuracy']:.3f} "
              f"in {report['seconds']} s", file=sys.stderr, flush=True)
    return out


def report(weights: Path) -> dict:
    """The training report saved beside ``weights``."""
    return json.loads(weights.with_suffix(".json").read_text())
