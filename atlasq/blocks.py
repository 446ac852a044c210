"""The Building Blocks of Interpretability for one image: what the network sees, where, and why.

One image at one layer (Building Blocks of Interpretability, Distill 2018):

1. **Activation grid** (the semantic dictionary): the activation vector at every spatial position,
   placed on a reference atlas with the same nearest-neighbour vote as a dataset
   (:func:`atlasq.histogram.place_activations`), drawn with its cell's icon at an opacity that
   grows with the activation's magnitude. Without an atlas, each position's own feature
   visualization (rendered in one batch, cached).
2. **Spatial attribution**: for a class c, ``h(y, x) · ∂logit_c/∂h(y, x)`` at every position: the
   same quantity :mod:`atlasq.attribution` computes for sampled positions, here for all
   positions at once by one reverse-mode gradient per class (the gradient at every position
   comes out of one backward pass; the dot product with h at each position is the attribution
   of that position). Also layer to layer: how each position of an earlier layer contributes to
   the activation at one position of the later layer (``h_E · ∂s/∂h_E`` with
   ``s = h_L(p) · û`` and û the unit direction of ``h_L(p)`` held fixed, so ``s = |h_L(p)|``).
3. **Channel attribution**: ``Σ_{y,x} h_c(y, x) · ∂logit/∂h_c(y, x)`` per channel c, so the
   channels of a class sum to its spatial map's total; the top channels are shown with their
   feature visualization (channel objective), cached on disk.
4. **Neuron groups**: a seeded non-negative matrix factorization (scikit-learn) of the
   positions × channels activations, ``A ≈ W D``: each group's spatial map (a column of W), its
   direction (a row of D, drawn as an icon) and its attribution to each class,
   ``Σ_p W[p, g] · D[g] · ∂logit/∂h(p)`` (the attribution of the part of the activations the
   group explains, so the groups' attributions sum to the class's, up to the factorization's
   reconstruction error).

:func:`inspect_image` computes all of it as an :class:`Inspection` (numbers; no files), whose
:meth:`Inspection.picture` draws the interface and :meth:`Inspection.save` writes it with the
numbers. :func:`inspect_indexed` does the same for an image named the way ``atlasq search``
names one, with the network of an index.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import IncompatibleError, InvalidOptionError
from .fileio import replaced
from .model import LoadedModel, StagedClassifier, relax_maxpool

__all__ = ["Inspection", "IconCache", "attribution_maps", "forward_between", "layer_to_layer",
           "neuron_groups", "group_attribution", "render_channels", "inspect_image", "inspect_indexed",
           "default_layer"]

#: The article's layer; networks without it use their deepest ``mixed4*`` layer.
DEFAULT_LAYER = "mixed4d"
TOP_CLASSES = 3
TOP_CHANNELS = 4
GROUPS = 6
ICON_STEPS = 256


def default_layer(network: StagedClassifier) -> str:
    """``mixed4d`` (the article's layer) where the network has it, else its deepest mixed4 layer."""
    names = network.layer_names
    if DEFAULT_LAYER in names:
        return DEFAULT_LAYER
    fours = [n for n in names if n.startswith("mixed4")]
    return (fours or list(names))[-1]


# ----------------------------------------------------------------------------- the exact quantities


def attribution_maps(network: StagedClassifier, layer: str, h: torch.Tensor, classes: Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatial and channel attribution of one image's activations ``h`` (1, C, H, W) at ``layer``.

    Returns ``(spatial, channel, gradients)``: (K, H, W) ``Σ_channels h · ∂logit_k/∂h`` at every
    position, (K, C) ``Σ_positions h · ∂logit_k/∂h`` per channel, and the (K, C, H, W) gradients
    themselves (for :func:`group_attribution`). Exact: both are sums of the same products.
    """
    h = h.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = network.forward_from(layer, h)[0]
        grads = [torch.autograd.grad(logits[int(c)], h, retain_graph=n + 1 < len(classes))[0][0]
                 for n, c in enumerate(classes)]
    g = torch.stack(grads).detach()                         # (K, C, H, W)
    products = g * h.detach()[0]
    return (products.sum(1).cpu().numpy(), products.sum((2, 3)).cpu().numpy(), g.cpu().numpy())


def forward_between(network: StagedClassifier, start: str, end: str, h: torch.Tensor) -> torch.Tensor:
    """``end``'s activations computed from ``start``'s (``start`` strictly before ``end``)."""
    names = [name for name, _ in network.stages()]
    network.check_layers([start, end])
    if names.index(start) >= names.index(end):
        raise InvalidOptionError(f"--from-layer {start} must come before the layer {end}")
    running = False
    for name, stage in network.stages():
        if running:
            h = stage(h)
            if name == end:
                return h
        running = running or name == start
    raise AssertionError("unreachable: end follows start")


def layer_to_layer(network: StagedClassifier, h_e: torch.Tensor, from_layer: str, layer: str,
                   position: tuple[int, int]) -> tuple[np.ndarray, float]:
    """How each position of ``from_layer`` (whose activations are ``h_e``, (1, C_E, H_E, W_E))
    contributes to the activation at ``position`` of ``layer``.

    The target is ``s = h_L(p) · û`` with û the unit direction of ``h_L(p)`` (held fixed), i.e. the
    activation's magnitude; the map is ``Σ_channels h_E · ∂s/∂h_E`` at every position of the
    earlier layer. Returns ``(map (H_E, W_E), s)``.
    """
    y, x_ = position
    h_e = h_e.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        target = forward_between(network, from_layer, layer, h_e)[0, :, y, x_]
        unit = (target / target.norm().clamp_min(1e-12)).detach()
        s = (target * unit).sum()
        grad = torch.autograd.grad(s, h_e)[0]
    return (grad * h_e.detach()).sum(1)[0].cpu().numpy(), float(s.detach())


def neuron_groups(activations: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 500
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Non-negative factorization of (positions, channels) ``activations`` into ``k`` groups.

    Returns ``(spatial (positions, k), directions (k, channels), relative error)`` with
    ``activations ≈ spatial @ directions``, groups ordered by how much activation they explain
    (largest first). scikit-learn's NMF, initialised by NNDSVD with its zeros filled from ``seed``
    (``nndsvdar``), so the result is a function of the activations and the seed.
    """
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    a = np.maximum(np.asarray(activations, np.float64), 0.0)  # post-ReLU: only rounding can go below 0
    k = int(k)
    if not 1 <= k <= min(a.shape):
        raise InvalidOptionError(f"--groups must be between 1 and {min(a.shape)} (positions and channels), not {k}")
    model = NMF(n_components=k, init="nndsvdar", random_state=seed, max_iter=max_iter, tol=1e-5)
    with warnings.catch_warnings():
        # stopping at max_iter still gives a valid factorization; its error is returned and reported
        warnings.simplefilter("ignore", ConvergenceWarning)
        spatial = model.fit_transform(a)
    directions = model.components_
    weight = spatial.sum(0) * np.linalg.norm(directions, axis=1)
    order = np.argsort(-weight, kind="stable")
    error = float(np.linalg.norm(a - spatial @ directions) / max(np.linalg.norm(a), 1e-12))
    return spatial[:, order].astype(np.float32), directions[order].astype(np.float32), error


def group_attribution(spatial: np.ndarray, directions: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """(groups, K) attribution of each group to each class: ``Σ_p W[p, g] · D[g] · ∂logit_k/∂h(p)``,
    for ``gradients`` (K, C, H, W) and W over the H·W positions in row-major order."""
    g = gradients.reshape(gradients.shape[0], gradients.shape[1], -1)  # (K, C, P)
    return np.einsum("pg,gc,kcp->gk", spatial, directions, g).astype(np.float32)


# ----------------------------------------------------------------------------- icons


def render_channels(network: StagedClassifier, layer: str, channels: Sequence[int], *, size: int,
                    steps: int = ICON_STEPS, lr: float = 0.05, seed: int = 0, attempts: int = 3) -> np.ndarray:
    """Feature visualizations of channels (the channel objective: the channel's mean over all
    positions of ``layer``), one image per channel optimised together: (N, size, size, 3) uint8.

    The same parameterisation and transforms as the atlas icons (:mod:`atlasq.featurevis`); a loop
    of its own because :func:`~atlasq.featurevis.render_directions` maximises a direction at the
    centre position, not a channel everywhere. A channel still silent at a near-grey start gets no
    gradient; as the atlas does, such icons are rendered again from livelier starts (up to
    ``attempts`` in all), keeping the best.
    """
    channels = list(channels)
    images, start, end = _render_channels_once(network, layer, channels, size, steps, lr, seed, 0.01)
    for attempt in range(1, attempts):
        weak = np.flatnonzero(end <= start * 1.05 + 1e-6)
        if not len(weak):
            break
        retry, _, retry_end = _render_channels_once(network, layer, [channels[w] for w in weak], size, steps, lr,
                                                    seed * 16 + attempt, 0.01 * 8 ** attempt)
        better = retry_end > end[weak]
        images[weak[better]], end[weak[better]] = retry[better], retry_end[better]
    return images


def _render_channels_once(network, layer, channels, size, steps, lr, seed, sd):
    """One optimisation of :func:`render_channels`: (images, objective at the start, at the end)."""
    from .featurevis import fft_image, robustness_transform
    from .featurevis.render import IMAGENET_MEAN, IMAGENET_STD

    device = next(network.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    params, image_fn = fft_image(len(channels), size, sd=sd, generator=generator, device=device)
    transform = robustness_transform(shift_px=12.0 * size / 80, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    index = torch.as_tensor(channels, device=device)
    rows = torch.arange(len(channels), device=device)
    objective = lambda images: network.forward_layers((images - mean) / std, [layer])[layer][rows, index].mean((1, 2))
    with torch.no_grad():
        start = objective(image_fn()).float().cpu().numpy()
    optimiser = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            value = objective(transform(image_fn())).sum()
            optimiser.zero_grad(set_to_none=True)
            params[0].grad = torch.autograd.grad(-value, params)[0]  # only the image's gradient
            optimiser.step()
    with torch.no_grad():
        final = image_fn()
        end = objective(final).float().cpu().numpy()
    images = (final.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return images, start, end


class IconCache:
    """Feature-visualization icons on disk, keyed by network, weights, layer and what they show.

    ``folder/<model>-<weights digest>/<layer>/channel-<c>-<size>px-<steps>s.png`` for channels and
    ``direction-<digest of the direction>-…png`` for directions (NMF groups, positions without an
    atlas). An icon in the cache is never rendered again. ``folder=None`` keeps nothing.
    """

    def __init__(self, folder: Path | None, model: LoadedModel, layer: str, *, size: int,
                 steps: int = ICON_STEPS, seed: int = 0):
        self.model, self.layer, self.size, self.steps, self.seed = model, layer, int(size), int(steps), int(seed)
        self.folder = (Path(folder) / f"{model.name}-{model.weights_sha256[:16]}" / layer) if folder else None
        self.rendered = 0
        self.reused = 0

    def _suffix(self) -> str:
        return f"{self.size}px-{self.steps}s-seed{self.seed}.png"

    def channel_path(self, channel: int) -> Path | None:
        return self.folder / f"channel-{int(channel):04d}-{self._suffix()}" if self.folder else None

    def direction_path(self, direction: np.ndarray) -> Path | None:
        if not self.folder:
            return None
        digest = hashlib.sha256(np.ascontiguousarray(direction, np.float32).tobytes()).hexdigest()[:20]
        return self.folder / f"direction-{digest}-{self._suffix()}"

    def _get(self, paths: list[Path | None], render, allowed: bool) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(paths)
        todo = []
        for n, path in enumerate(paths):
            if path is not None and path.is_file():
                out[n] = np.asarray(Image.open(path).convert("RGB"))
                self.reused += 1
            else:
                todo.append(n)
        if todo and allowed:
            images = render(todo)
            for n, image in zip(todo, images):
                out[n] = image
                if paths[n] is not None:
                    paths[n].parent.mkdir(parents=True, exist_ok=True)
                    with replaced(paths[n]) as tmp:
                        Image.fromarray(image).save(tmp, format="PNG")
            self.rendered += len(todo)
        return out

    def channels(self, channels: Sequence[int], *, render: bool = True) -> list[np.ndarray | None]:
        """Icons of ``channels`` (None for one not cached when ``render`` is False)."""
        network = self.model.network
        return self._get([self.channel_path(c) for c in channels],
                         lambda todo: render_channels(network, self.layer, [channels[n] for n in todo],
                                                      size=self.size, steps=self.steps, seed=self.seed), render)

    def directions(self, directions: np.ndarray, *, render: bool = True) -> list[np.ndarray | None]:
        """Icons of ``directions`` (N, C) at the centre position (cosine objective, as atlas icons)."""
        from .featurevis import render_directions

        directions = np.asarray(directions, np.float32)
        return self._get([self.direction_path(d) for d in directions],
                         lambda todo: render_directions(
                             self.model.network, self.layer, torch.from_numpy(directions[todo]), size=self.size,
                             steps=self.steps, seed=self.seed, settle_steps=self.steps // 8).images, render)


# ----------------------------------------------------------------------------- the inspection


@dataclass
class Inspection:
    """Everything the interface shows for one image at one layer (plain arrays and values)."""

    source: str                   # what was inspected (id, path or file), as given
    model: dict                   # LoadedModel.describe()
    layer: str
    image: np.ndarray             # (S, S, 3) uint8: the network's input (after preprocessing)
    activations: np.ndarray       # (H, W, C) at the layer
    categories: list[str]
    logits: np.ndarray            # (classes,)
    classes: list[int]            # the classes attributed to, in order
    spatial: np.ndarray           # (K, H, W)
    channel: np.ndarray           # (K, C)
    top_channels: np.ndarray      # (K, TOP_CHANNELS) channel indices, by attribution
    groups_spatial: np.ndarray    # (G, H, W)
    groups_direction: np.ndarray  # (G, C)
    groups_attribution: np.ndarray  # (G, K)
    groups_error: float
    seed: int
    relaxed_maxpool: bool
    grid_cells: np.ndarray | None = None      # (H, W, 2) atlas cell (i, j) per position, -1 off-atlas
    grid_labels: list[list[str | None]] | None = None  # (H, W) top label of each position's cell
    atlas: dict | None = None                 # name, level, layer
    from_layer: str | None = None
    position: tuple[int, int] | None = None
    layer_to_layer: np.ndarray | None = None  # (H_E, W_E)
    grid_icons: list | None = field(default=None, repr=False)     # (H·W) icons, None where no cell
    channel_icons: list | None = field(default=None, repr=False)  # (K, TOP_CHANNELS)
    group_icons: list | None = field(default=None, repr=False)    # (G,)
    icons: dict = field(default_factory=dict)  # rendered / reused counts

    @property
    def magnitude(self) -> np.ndarray:
        """(H, W) norm of the activation at each position."""
        return np.linalg.norm(self.activations, axis=2)

    def class_names(self) -> list[str]:
        return [self.categories[c] if c < len(self.categories) else str(c) for c in self.classes]

    def to_dict(self) -> dict:
        """The small values (``inspect.json``)."""
        probs = np.exp(self.logits - self.logits.max())
        probs /= probs.sum()
        names = self.class_names()
        out = {
            "source": self.source, **self.model, "layer": self.layer, "layer_shape": list(self.activations.shape),
            "seed": self.seed, "relaxed_maxpool": self.relaxed_maxpool,
            "classes": [{"class": n, "index": int(c), "logit": round(float(self.logits[c]), 5),
                         "probability": round(float(probs[c]), 5),
                         "attribution_total": round(float(self.spatial[k].sum()), 5),
                         "top_channels": [{"channel": int(ch), "attribution": round(float(self.channel[k, ch]), 5)}
                                          for ch in self.top_channels[k]]}
                        for k, (c, n) in enumerate(zip(self.classes, names))],
            "groups": [{"group": g, "activation_share": round(float(self.groups_spatial[g].sum()
                                                                    * np.linalg.norm(self.groups_direction[g])), 5),
                        "attribution": {n: round(float(self.groups_attribution[g, k]), 5) for k, n in enumerate(names)}}
                       for g in range(len(self.groups_direction))],
            "groups_relative_error": round(self.groups_error, 5),
            "icons": self.icons,
        }
        total = sum(g["activation_share"] for g in out["groups"]) or 1.0
        for g in out["groups"]:
            g["activation_share"] = round(g["activation_share"] / total, 5)
        if self.atlas is not None:
            placed = self.grid_cells[..., 0] >= 0
            labels = [lab for row in self.grid_labels for lab in row if lab]
            values, counts = np.unique(labels, return_counts=True) if labels else ([], [])
            out["activation_grid"] = {**self.atlas, "placed_share": round(float(placed.mean()), 5),
                                      "labels": {str(v): int(c) for v, c in sorted(zip(values, counts),
                                                                                   key=lambda t: -t[1])}}
        if self.layer_to_layer is not None:
            out["layer_to_layer"] = {"from_layer": self.from_layer, "position": list(self.position),
                                     "shape": list(self.layer_to_layer.shape)}
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays (``inspect.npz``)."""
        out = {"image": self.image, "activations": self.activations, "logits": self.logits,
               "classes": np.asarray(self.classes), "spatial_attribution": self.spatial,
               "channel_attribution": self.channel, "top_channels": self.top_channels,
               "groups_spatial": self.groups_spatial, "groups_direction": self.groups_direction,
               "groups_attribution": self.groups_attribution}
        if self.grid_cells is not None:
            out["grid_cells"] = self.grid_cells
        if self.layer_to_layer is not None:
            out["layer_to_layer"] = self.layer_to_layer
        return out

    def picture(self) -> Image.Image:
        """The interface as one picture (see :func:`draw_interface`)."""
        return draw_interface(self)

    def save(self, out: Path) -> dict[str, str]:
        """Write ``interface.png``, ``inspect.json`` and ``inspect.npz`` into ``out``; their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"picture": out / "interface.png", "json": out / "inspect.json", "arrays": out / "inspect.npz"}
        with replaced(files["picture"]) as tmp:
            # mostly icons and photo crops, which deflate barely shrinks: its fastest level costs a
            # fifth of the default's time for a slightly larger file
            self.picture().save(tmp, format="PNG", compress_level=1)
        with replaced(files["arrays"]) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, **self.arrays())
        summary = {**self.to_dict(), "files": {k: str(v) for k, v in files.items()}}
        with replaced(files["json"]) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        return summary["files"]


def _resolve_classes(classes: Sequence[str | int] | None, categories: list[str], logits: np.ndarray,
                     top: int) -> list[int]:
    if not classes:
        return [int(c) for c in np.argsort(-logits, kind="stable")[:max(1, top)]]
    out = []
    for c in classes:
        if isinstance(c, (int, np.integer)) or str(c).isdigit():
            index = int(c)
            if not 0 <= index < len(logits):
                raise InvalidOptionError(f"--classes: class {index} is out of range 0..{len(logits) - 1}")
        elif c in categories:
            index = categories.index(c)
        else:
            raise InvalidOptionError(f"--classes: unknown class {c!r}; e.g. {', '.join(categories[:5])}")
        out.append(index)
    return out


_RELAXED: "weakref.WeakKeyDictionary[StagedClassifier, StagedClassifier]" = weakref.WeakKeyDictionary()


def _relaxed(network: StagedClassifier) -> StagedClassifier:
    """``network``'s max-pool-relaxed copy, made once per network (copying it took a second of an
    InceptionV1 inspection)."""
    if network not in _RELAXED:
        _RELAXED[network] = relax_maxpool(network)
    return _RELAXED[network]


def input_image(model: LoadedModel, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
    """The network's input for ``image`` (1, 3, S, S) and the same crop as RGB (S, S, 3) uint8."""
    x = model.transform(image)
    mean, std = model.transform.mean255, model.transform.std255
    rgb = (x * std + mean).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return x[None].to(model.device), rgb


def inspect_image(model: LoadedModel, image: Image.Image, *, layer: str | None = None, atlas=None,
                  level: int | None = None, classes: Sequence[str | int] | None = None, top: int = TOP_CLASSES,
                  groups: int = GROUPS, seed: int = 0, from_layer: str | None = None,
                  position: tuple[int, int] | None = None, relaxed_maxpool: bool = False,
                  icon_folder: Path | None = None, icon_steps: int = ICON_STEPS, render: bool = True,
                  source: str = "") -> Inspection:
    """Inspect ``image`` (RGB) with ``model`` at ``layer`` (default: the atlas's layer, else
    :func:`default_layer`).

    atlas : an :class:`atlasq.atlas.Atlas` of this model and weights, whose layer is the layer;
        its cells (at ``level``, default its coarsest) and icons draw the activation grid.
    classes : class names or indices to attribute to (default: the ``top`` classes by logit).
    groups : k of the factorization; seed seeds it and the icons.
    from_layer, position : layer-to-layer attribution from ``from_layer`` to ``position`` (y, x) of
        the layer (default position: the largest activation).
    relaxed_maxpool : attribute through max-pools with the average-pool gradient.
    icon_folder : where icons are cached (None: render without keeping them).
    render : render icons that are not cached (False: draw those blank).
    """
    from .atlas import default_icon_size

    network = model.network
    if atlas is not None:
        m = atlas.manifest
        if m.get("model") != model.name or (m.get("weights_sha256") and m["weights_sha256"] != model.weights_sha256):
            raise IncompatibleError(f"atlas {m['name']!r} was built with {m.get('model')} weights "
                                    f"{(m.get('weights_sha256') or '?')[:12]}…, not this network's "
                                    f"({model.name}, {model.weights_sha256[:12]}…)")
        if layer not in (None, m["layer"]):
            raise InvalidOptionError(f"--layer {layer}: atlas {m['name']!r} is of layer {m['layer']}; "
                                     f"leave --layer out or inspect without --atlas")
        layer = m["layer"]
        level = level or min(atlas.levels)
        if level not in atlas.levels:
            raise InvalidOptionError(f"--level {level}: atlas {m['name']!r} has levels "
                                     f"{', '.join(map(str, atlas.levels))}")
    layer = layer or default_layer(network)
    network.check_layers([layer] + ([from_layer] if from_layer else []))
    attribution_network = _relaxed(network) if relaxed_maxpool else network

    x, rgb = input_image(model, image)
    with torch.no_grad():  # one pass for both layers (the relaxed copy computes the same values)
        computed = network.forward_layers(x, [layer] + ([from_layer] if from_layer else []))
        h = computed[layer].float()
        logits = network.forward_from(layer, h)[0].float().cpu().numpy()
    classes = _resolve_classes(classes, model.categories, logits, top)
    spatial, channel, gradients = attribution_maps(attribution_network, layer, h, classes)
    acts = h[0].permute(1, 2, 0).cpu().numpy()                    # (H, W, C)
    height, width, channels = acts.shape
    top_channels = np.argsort(-channel, axis=1, kind="stable")[:, :TOP_CHANNELS]
    w, d, error = neuron_groups(acts.reshape(-1, channels), min(groups, height * width, channels), seed=seed)
    result = Inspection(
        source=source, model=model.describe(), layer=layer, image=rgb, activations=acts,
        categories=list(model.categories), logits=logits, classes=classes, spatial=spatial, channel=channel,
        top_channels=top_channels, groups_spatial=w.T.reshape(-1, height, width), groups_direction=d,
        groups_attribution=group_attribution(w, d, gradients), groups_error=error, seed=seed,
        relaxed_maxpool=relaxed_maxpool)

    if from_layer:
        if position is None:
            position = tuple(int(v) for v in np.unravel_index(np.argmax(result.magnitude), (height, width)))
        if not (0 <= position[0] < height and 0 <= position[1] < width):
            raise InvalidOptionError(f"--position {position[0]},{position[1]} is outside the layer's "
                                     f"{height}×{width} positions")
        result.from_layer, result.position = from_layer, (int(position[0]), int(position[1]))
        result.layer_to_layer, _ = layer_to_layer(attribution_network, computed[from_layer], from_layer, layer,
                                                   result.position)

    size = default_icon_size(model.input_size, (height, width))
    cache = IconCache(icon_folder, model, layer, size=size, steps=icon_steps, seed=seed)
    if atlas is not None:
        _place_grid(result, atlas, level)
    else:
        result.grid_icons = cache.directions(acts.reshape(-1, channels), render=render)
    result.channel_icons = [cache.channels(row.tolist(), render=render) for row in top_channels]
    result.group_icons = cache.directions(d, render=render)
    result.icons = {"size": size, "steps": icon_steps, "rendered": cache.rendered, "reused": cache.reused,
                    "folder": str(cache.folder) if cache.folder else None}
    return result


def _place_grid(result: Inspection, atlas, level: int) -> None:
    """Place every position's activation on ``atlas`` (the datasets' k-NN vote) and pick the icons."""
    from .histogram import ReferenceSearch, place_activations

    height, width, channels = result.activations.shape
    search = ReferenceSearch.for_atlas(atlas)
    placement = place_activations(search, result.activations.reshape(-1, channels))
    cells = placement.cells[level]
    table = atlas.cells_at(level)
    rows = atlas.row_of_cell(level)
    labels, icons = [], []
    has_icons = bool(atlas.manifest["options"].get("icons"))
    for i, j in cells:
        row = int(rows[i * level + j]) if i >= 0 else -1
        labels.append(table["top_labels"][row][0] if row >= 0 else None)
        icon = None
        if row >= 0 and has_icons and atlas.icon_path(level, int(i), int(j)).is_file():
            icon = np.asarray(Image.open(atlas.icon_path(level, int(i), int(j))).convert("RGB"))
        icons.append(icon)
    result.grid_cells = cells.reshape(height, width, 2)
    result.grid_labels = [labels[r * width:(r + 1) * width] for r in range(height)]
    result.grid_icons = icons
    result.atlas = {"atlas": atlas.name, "level": int(level), "layer": atlas.manifest["layer"]}


def inspect_indexed(image: str, index: str, *, home: Path | None = None, atlas: str | None = None,
                    device: str | None = None, relaxed_maxpool: bool | None = None, **options) -> Inspection:
    """:func:`inspect_image` for ``image`` (an indexed id or path, or any image file) with the network
    of index ``index``; ``atlas`` names an atlas of the home. Icons are cached under the home's
    cache folder. ``relaxed_maxpool`` defaults to the index's setting."""
    from .api import model_for_index, open_index
    from .atlas import load_atlas
    from .home import default_home
    from .images import ImageDecodeError, open_rgb, real_path
    from .search import resolve_query

    with open_index(index, home) as store:
        meta = store.meta()
        image_id, file = resolve_query(store, image)
        if image_id is not None:
            file = real_path(meta["root"], store.images([image_id])[0]["path"])
    model = model_for_index(meta, device)
    try:
        picture = open_rgb(Path(file), min_side=model.decode_min_side)
    except (ImageDecodeError, OSError) as exc:
        raise InvalidOptionError(f"cannot read {file}: {getattr(exc, 'reason', exc)}") from exc
    loaded_atlas = load_atlas(atlas, home) if atlas else None
    relaxed = bool(meta.get("relaxed_maxpool")) if relaxed_maxpool is None else relaxed_maxpool
    icon_folder = Path(home or default_home()) / "cache" / "icons"
    return inspect_image(model, picture, atlas=loaded_atlas, relaxed_maxpool=relaxed, icon_folder=icon_folder,
                         source=image, **options)


# ----------------------------------------------------------------------------- the picture

PANEL = 176
GROUP_COLOURS = np.array([[228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163], [255, 127, 0],
                          [166, 86, 40], [247, 129, 191], [153, 153, 153], [23, 190, 207], [188, 189, 34]],
                         np.float32)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _resize(array: np.ndarray, side: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((side, side), resample))


def _over_image(image: np.ndarray, values: np.ndarray, side: int, limit: float | None = None) -> Image.Image:
    """``values`` (H, W) on a diverging scale (±``limit``, default their largest size) over the greyed image."""
    from .heatmap import DIVERGING, colour_ramp

    limit = limit or float(np.abs(values).max()) or 1.0
    up = np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR))
    colour = colour_ramp(up / (2 * limit) + 0.5, DIVERGING).astype(np.float32)
    grey = _resize(image, side).astype(np.float32).mean(axis=2, keepdims=True) * np.ones(3)
    strength = np.clip(np.abs(up) / limit, 0, 1)[..., None] * 0.85 + 0.15
    return Image.fromarray((grey * (1 - strength) + colour * strength).round().astype(np.uint8))


def _icon_grid(icons: list, magnitude: np.ndarray, side: int, labels=None) -> Image.Image:
    """Icons on the layer's grid, each blended with white by its position's activation magnitude."""
    height, width = magnitude.shape
    tile = side // max(height, width)
    canvas = np.full((tile * height, tile * width, 3), 255.0, np.float32)
    alpha = magnitude / (magnitude.max() or 1.0)
    for n, icon in enumerate(icons):
        r, c = divmod(n, width)
        if icon is None:
            canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = 235.0
            continue
        canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = (
            255.0 * (1 - alpha[r, c]) + _resize(icon, tile).astype(np.float32) * alpha[r, c])
    return Image.fromarray(canvas.round().astype(np.uint8))


def draw_interface(result: Inspection) -> Image.Image:
    """The interface: the image, its activation grid, the spatial attribution to each class, each
    class's top channels, the neuron groups (spatial map, icon, attribution to each class) and,
    when asked for, the layer-to-layer attribution."""
    title, body, small = _font(16), _font(13), _font(11)
    pad, side = 12, PANEL
    names = result.class_names()
    k, n_groups = len(result.classes), len(result.groups_direction)
    top_width = (2 + k + (1 if result.layer_to_layer is not None else 0)) * (side + pad) + pad
    icon = (side - pad) // 2
    group_width = n_groups * (side + pad) + pad
    channel_width = 170 + TOP_CHANNELS * (icon + pad) + pad
    width = max(top_width, group_width, channel_width, 720)
    row1 = 26 + side + 22
    row2 = 26 + k * (icon + 26)
    row3 = 26 + side + icon + pad + k * 18 + 10
    height = pad + 14 + row1 + pad + row2 + pad + row3 + pad + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    m = result.model
    draw.text((pad, 4), f"{result.source}  |  {m['model']} ({m['weights']})  |  {result.layer} "
                        f"{result.activations.shape[0]}x{result.activations.shape[1]}x{result.activations.shape[2]}",
              fill="black", font=small)

    # row 1: image, activation grid, spatial attribution per class, layer to layer
    y = pad + 14
    x = pad
    draw.text((x, y), "input", fill="black", font=title)
    canvas.paste(Image.fromarray(_resize(result.image, side)), (x, y + 22))
    x += side + pad
    grid_title = (f"activation grid: atlas {result.atlas['atlas']} ({result.atlas['level']}x{result.atlas['level']})"
                  if result.atlas else "activation grid (per-position icons)")
    draw.text((x, y), "activation grid", fill="black", font=title)
    canvas.paste(_icon_grid(result.grid_icons or [None] * result.magnitude.size, result.magnitude, side), (x, y + 22))
    draw.text((x, y + 24 + side), grid_title[17:] if result.atlas else "no atlas: per-position icons",
              fill="dimgray", font=small)
    x += side + pad
    limit = float(np.abs(result.spatial).max()) or 1.0
    for c in range(k):
        draw.text((x, y), f"{names[c]}", fill="black", font=title)
        panel = _over_image(result.image, result.spatial[c], side, limit)  # one scale for all classes
        canvas.paste(panel, (x, y + 22))
        draw.text((x, y + 24 + side), f"total attribution {result.spatial[c].sum():+.3g}", fill="dimgray", font=small)
        x += side + pad
    if result.layer_to_layer is not None:
        draw.text((x, y), f"from {result.from_layer}", fill="black", font=title)
        canvas.paste(_over_image(result.image, result.layer_to_layer, side), (x, y + 22))
        py, px = result.position
        hl, wl = result.activations.shape[:2]
        cy, cx = y + 22 + (py + 0.5) * side / hl, x + (px + 0.5) * side / wl
        draw.rectangle((cx - side / hl / 2, cy - side / wl / 2, cx + side / hl / 2, cy + side / wl / 2),
                       outline="black", width=2)
        draw.text((x, y + 24 + side), f"to {result.layer} at {result.position[0]},{result.position[1]} (square)",
                  fill="dimgray", font=small)

    # row 2: channel attribution
    y += row1 + pad
    draw.text((pad, y), "channel attribution: top channels per class (channel objective icons)",
              fill="black", font=title)
    y += 24
    for c in range(k):
        draw.text((pad, y + icon // 2 - 8), names[c], fill="black", font=body)
        x = pad + 170
        for n, ch in enumerate(result.top_channels[c]):
            tile = (result.channel_icons or [[None] * TOP_CHANNELS] * k)[c][n]
            if tile is not None:
                canvas.paste(Image.fromarray(_resize(tile, icon)), (x, y))
            else:
                draw.rectangle((x, y, x + icon, y + icon), fill=(235, 235, 235))
            draw.text((x, y + icon + 1), f"ch {int(ch)}  {result.channel[c, ch]:+.3g}", fill="dimgray", font=small)
            x += icon + pad
        y += icon + 26

    # row 3: neuron groups
    y += pad
    draw.text((pad, y), f"neuron groups (NMF, k={n_groups}, seed {result.seed}): where, what, and for which class",
              fill="black", font=title)
    y += 24
    grey = _resize(result.image, side).astype(np.float32).mean(axis=2, keepdims=True) * np.ones(3)
    attribution_limit = float(np.abs(result.groups_attribution).max()) or 1.0
    for g in range(n_groups):
        x = pad + g * (side + pad)
        colour = GROUP_COLOURS[g % len(GROUP_COLOURS)]
        tile = (result.group_icons or [None] * n_groups)[g]
        if tile is not None:
            canvas.paste(Image.fromarray(_resize(tile, icon)), (x + (side - icon) // 2, y))
        draw.rectangle((x + (side - icon) // 2 - 2, y - 2, x + (side + icon) // 2 + 1, y + icon + 1),
                       outline=tuple(int(v) for v in colour), width=3)
        spatial = result.groups_spatial[g]
        up = np.asarray(Image.fromarray(spatial.astype(np.float32), mode="F").resize((side, side),
                                                                                       Image.Resampling.BILINEAR))
        alpha = np.clip(up / (spatial.max() or 1.0), 0, 1)[..., None] * 0.85
        canvas.paste(Image.fromarray((grey * (1 - alpha) + colour * alpha).round().astype(np.uint8)),
                     (x, y + icon + pad))
        yy = y + icon + pad + side + 4
        for c in range(k):
            value = float(result.groups_attribution[g, c])
            length = int(abs(value) / attribution_limit * (side - 90))
            bar_colour = (178, 24, 43) if value > 0 else (33, 102, 172)
            draw.text((x, yy), names[c][:12], fill="black", font=small)
            draw.rectangle((x + 86, yy + 3, x + 86 + max(length, 1), yy + 12), fill=bar_colour)
            yy += 18
    y += row3
    draw.text((pad, y), "attribution = h * dlogit/dh: red adds to the class, blue takes from it; icon opacity in the "
                        "grid = activation magnitude", fill="dimgray", font=small)
    return canvas
