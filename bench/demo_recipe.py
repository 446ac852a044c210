"""Benchmark: what a change to the demo network's training recipe does to its meaning.

The demo network serves two kinds of test at once. The Building Blocks tests want the top class's
positive attribution on the generator's shapes (issue bar: 0.6 of it at positions whose patch holds
any shape); the atlas tests want a single position's attribution to name its image's class (cells
labelled by their members' class). This trains each recipe given (the shipped recipe's weights are
the baseline, from the cache) and prints, per recipe, both sides:

- ``accuracy``: held-out accuracy;
- ``on_shapes_L``: share of the top class's positive attribution at positions on the shapes, over
  the held-out images of the shape classes (what ``tests/test_blocks.py`` measures);
- ``class_L``: share of held-out images whose 4 sampled positions' summed attribution names their
  class (what ``tests/test_attribution.py`` asserts: at least 0.30 at mixed4c, 0.90 at mixed5b);
- ``position_mixed5a``: share of single sampled positions at mixed5a (the demo atlas's layer) whose
  largest attribution is their image's class.

    python bench/demo_recipe.py '{"cutmix": 1.0, "cutmix_epochs": 17, "label_smoothing": 0.0}' ...

Each argument is a JSON object of changes to ``atlasq.demo_model.RECIPE``. Trained weights are kept
in ``bench/_work/recipes/`` under a name made of the changes, and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from atlasq import demo_model
from atlasq.attribution import attribute
from atlasq.embed import decode_file, sample_positions
from atlasq.images import scan_images
from atlasq.model import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_blocks import SHAPE_CLASSES, _shape_shares  # noqa: E402  (the test's own measure)

SAMPLE = ROOT / "sample_data"
WORK = ROOT / "bench" / "_work" / "recipes"


def _weights(changes: dict) -> tuple[Path, dict]:
    if not changes:
        path = demo_model.ensure_trained(SAMPLE)
        return path, demo_model.report(path)
    name = "-".join(f"{k}={v}" for k, v in sorted(changes.items()))
    path = WORK / f"{name}.pt"
    if path.is_file():
        return path, demo_model.report(path)
    WORK.mkdir(parents=True, exist_ok=True)
    return path, demo_model.train(SAMPLE, path, recipe={**demo_model.RECIPE, **changes}, progress=False)


def _class_agreement(net, held, x, labels) -> dict[str, float]:
    with torch.no_grad():
        acts = net.forward_layers(x, ["mixed4c", "mixed5a", "mixed5b"])
    out = {}
    for layer, h in acts.items():
        positions = np.stack([sample_positions(p, layer, 0, h.shape[2], h.shape[3], 4) for p, _ in held])
        attributions = attribute(net, layer, h, positions, chunk=256).numpy()  # (images, 4, classes)
        out[f"class_{layer}"] = float((attributions.sum(1).argmax(1) == labels).mean())
        if layer == "mixed5a":
            out["position_mixed5a"] = float((attributions.argmax(2) == labels[:, None]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("changes", nargs="*", help="JSON objects of changes to the recipe")
    args = parser.parse_args()
    model = load_model("demo")
    net = model.network.eval()
    held = demo_model.held_out_paths(SAMPLE)
    entries = {e.path: e for e in scan_images(SAMPLE)}
    x = torch.stack([decode_file(SAMPLE, entries[p], model).tensor for p, _ in held])
    labels = np.array([label for _, label in held])
    shape_held = [(p, label) for p, label in held if p.split("/")[0] in SHAPE_CLASSES]
    for changes in [{}] + [json.loads(c) for c in args.changes]:
        path, report = _weights(changes)
        net.load_state_dict(torch.load(path, map_location="cpu"))
        figures = {"accuracy": report["held_out_accuracy"]}
        for layer in ("mixed3a", "mixed4c", "mixed4d"):
            figures[f"on_shapes_{layer}"] = _shape_shares(model, shape_held, layer).on_shapes
        figures.update(_class_agreement(net, held, x, labels))
        print(f"recipe={json.dumps(changes or 'shipped', separators=(',', ':'))} "
              + " ".join(f"{k}={v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
