"""Networks, layer names, weights and preprocessing.

Every network atlasq uses is a :class:`StagedClassifier`: an ordered list of named stages
(the article's layer names ``mixed3a … mixed5b`` among them) followed by a pooling head.
That one idea gives the three passes the pipeline needs:

* ``forward_layers(x, layers)`` runs only as far as the deepest requested layer;
* ``forward_from(layer, h)`` runs the rest of the network from a layer's activations
  (used by attribution);
* ``forward(x)`` returns logits like any classifier.

Two networks are registered: ``inceptionv1`` (torchvision's GoogLeNet, whose ImageNet
weights come through torchvision's own download-and-cache) and ``demo`` (a quarter-width
InceptionV1 of the same layer structure trained on ``sample_data/``, which :mod:`atlasq.demo_model`
defines and registers itself; further networks register with :func:`register_model`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import GoogLeNet, GoogLeNet_Weights
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.transforms._presets import ImageClassification

from .errors import AtlasqError, InvalidOptionError
from .images import CropGeometry

__all__ = [
    "layer_shapes",
    "LAYERS",
    "LoadedModel",
    "StagedClassifier",
    "WeightsUnavailableError",
    "load_model",
    "model_names",
    "relax_maxpool",
    "resolve_device",
    "weights_digest",
]

#: Layer names as in the Activation Atlas and Building Blocks articles.
LAYERS: tuple[str, ...] = (
    "mixed3a", "mixed3b",
    "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e",
    "mixed5a", "mixed5b",
)
POOLED_LAYER = "mixed5b"


class WeightsUnavailableError(AtlasqError, RuntimeError):
    """The requested weights cannot be loaded (offline and not cached, or a bad file)."""


class StagedClassifier(nn.Module):
    """A classifier seen as named stages followed by global average pooling and a linear head.

    Subclasses implement :meth:`stages` (ordered ``(name, module)`` pairs, computed on each
    call so that swapped modules are picked up) and :meth:`head` (pooled vector → logits).
    """

    pooled_layer: str = POOLED_LAYER

    def stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        raise NotImplementedError

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages() if name in LAYERS)

    def check_layers(self, layers: Iterable[str]) -> list[str]:
        """Return ``layers`` as a list, raising :class:`InvalidOptionError` (a ``ValueError``) that
        lists valid names for an unknown one."""
        layers = list(layers)
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise InvalidOptionError(
                f"unknown layer {', '.join(unknown)}; valid layers: {', '.join(self.layer_names)}"
            )
        return layers

    def forward_layers(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run the network only as far as the deepest of ``layers``; return their activations."""
        wanted = set(self.check_layers(layers))
        out: dict[str, torch.Tensor] = {}
        for name, stage in self.stages():
            x = stage(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        """Logits computed from ``layer``'s activations ``h`` by the rest of the network."""
        self.check_layers([layer])
        started = False
        for name, stage in self.stages():
            if started:
                h = stage(h)
            started = started or name == layer
        return self.head(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


class InceptionV1(StagedClassifier):
    """torchvision's GoogLeNet with its blocks exposed under the articles' names."""

    def __init__(self, net: GoogLeNet):
        super().__init__()
        self.net = net

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._transform_input(x)
        return n.maxpool2(n.conv3(n.conv2(n.maxpool1(n.conv1(x)))))

    def stages(self):
        n = self.net
        return [
            ("stem", self._stem),
            ("mixed3a", n.inception3a), ("mixed3b", n.inception3b), ("pool3", n.maxpool3),
            ("mixed4a", n.inception4a), ("mixed4b", n.inception4b), ("mixed4c", n.inception4c),
            ("mixed4d", n.inception4d), ("mixed4e", n.inception4e), ("pool4", n.maxpool4),
            ("mixed5a", n.inception5a), ("mixed5b", n.inception5b),
        ]

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.net.dropout(pooled))


class TinyInceptionV1(StagedClassifier):
    """InceptionV1 at a quarter of the width, same stages and layer names, for small inputs.

    Built from torchvision's own ``Inception`` and ``BasicConv2d`` blocks; used as the demo
    and test network (trained on ``sample_data/`` by :mod:`atlasq.demo_model`).
    """

    # (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): GoogLeNet's table divided by 4.
    BLOCKS = {
        "mixed3a": (48, 16, 24, 32, 4, 8, 8),
        "mixed3b": (64, 32, 32, 48, 8, 24, 16),
        "mixed4a": (120, 48, 24, 52, 4, 12, 16),
        "mixed4b": (128, 40, 28, 56, 6, 16, 16),
        "mixed4c": (128, 32, 32, 64, 6, 16, 16),
        "mixed4d": (128, 28, 36, 72, 8, 16, 16),
        "mixed4e": (132, 64, 40, 80, 8, 32, 32),
        "mixed5a": (208, 64, 40, 80, 8, 32, 32),
        "mixed5b": (208, 96, 48, 96, 12, 32, 32),
    }

    def __init__(self, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(
            BasicConv2d(3, 16, kernel_size=7, stride=2, padding=3),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            BasicConv2d(16, 16, kernel_size=1),
            BasicConv2d(16, 48, kernel_size=3, padding=1),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        for name, widths in self.BLOCKS.items():
            setattr(self, name, Inception(*widths))
        self.pool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(256, num_classes)

    def stages(self):
        order = ["stem", "mixed3a", "mixed3b", "pool3", "mixed4a", "mixed4b", "mixed4c",
                 "mixed4d", "mixed4e", "pool4", "mixed5a", "mixed5b"]
        return [(name, getattr(self, name)) for name in order]

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(pooled))


class RelaxedMaxPool2d(nn.Module):
    """Max-pooling forward, average-pooling gradient (the articles' attribution relaxation).

    ``maxpool(x.detach()) + (avgpool(x) - avgpool(x.detach()))`` has the value of the max-pool
    and the derivative of the average pool, in forward and reverse mode alike.
    """

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        avg = lambda t: F.avg_pool2d(t, p.kernel_size, p.stride, p.padding, p.ceil_mode,
                                     count_include_pad=False)
        # avg(x) - avg(x.detach()) is exactly zero, so the value is the max-pool's bit for bit.
        return p(x.detach()) + (avg(x) - avg(x.detach()))


def relax_maxpool(model: StagedClassifier) -> StagedClassifier:
    """A copy of ``model`` whose max-pool layers pass gradients as average pools do."""
    relaxed = copy.deepcopy(model)
    for parent in list(relaxed.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, RelaxedMaxPool2d(child))
    return relaxed


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A network ready to use, with everything needed to describe and reproduce it."""

    name: str                    # registry name: "inceptionv1" or "demo"
    weights: str                 # "imagenet", "random", "demo", or "file:<name>"
    weights_sha256: str          # identity of the weights themselves: see :func:`weights_digest`
    network: StagedClassifier
    transform: Callable          # PIL image → normalised float tensor (3, S, S)
    categories: list[str]
    input_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def decode_min_side(self) -> int:
        """Shortest side a JPEG may be reduced to while decoding (its DCT "draft" scaling).

        The weights' transform resizes the shorter side to ``resize_size`` and then crops, so a
        draft never below that size only replaces part of the downscaling, never upsamples.
        """
        resize = getattr(self.transform, "resize_size", None)
        return int(resize[0]) if resize else self.input_size

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def describe(self) -> dict:
        return {
            "model": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "random_weights": self.random_weights,
            "input_size": self.input_size,
            "num_classes": len(self.categories),
        }


def resolve_device(device: str | None = None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; a device that torch does not know or
    this machine lacks is an :class:`InvalidOptionError` naming ``--device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidOptionError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise InvalidOptionError(f"--device {device}: this machine has {count} CUDA device(s); use auto or cpu")
    elif resolved.type not in ("cpu", "mps") or (resolved.type == "mps" and not torch.backends.mps.is_available()):
        raise InvalidOptionError(f"--device {device} is not available here: use auto, cpu or cuda")
    return resolved


def weights_digest(network: nn.Module) -> str:
    """sha256 of a network's state dict: every entry's name, dtype, shape and bytes, in name order.

    This is the weights' identity, the same for every way of getting them (seeded random
    initialisation, the demo network, ImageNet, a file) and across loads and machines, so two
    indexes or an index and an atlas can be compared by what their network computes rather than
    by how its weights were named. It is computed on the CPU copy, before moving to a device.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_fitting(network: nn.Module, state: dict, what: str, source: str) -> None:
    """Load ``state`` into ``network``, or raise :class:`WeightsUnavailableError` summarising in a
    few lines which keys are missing, unexpected or of another shape (torch lists every one)."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} (needs {tuple(v.shape)})" for k, v in expected.items()
                  if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        def first(names, n=3):
            return ", ".join(names[:n]) + (", …" if len(names) > n else "")
        lines = [f"weights {source} do not fit the {what}:"]
        for count, label, names in ((len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
                                    (len(mismatched), "of another shape", mismatched)):
            if count:
                lines.append(f"  {count} {label}: {first(names)}")
        raise WeightsUnavailableError("\n".join(lines))
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:  # dtype or other trouble the key check cannot see; keep it short
        raise WeightsUnavailableError(f"weights {source} do not fit the {what}: "
                                      f"{str(exc).splitlines()[0]}") from exc


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights {path}: no such file, and not a weights name this model knows "
                                      f"(imagenet for inceptionv1, demo for demo, random for either)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals …
        # torch's weights-only refusal is a page of advice around one line of reason; keep that line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        if reason.startswith("Weights only load failed"):
            detail = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
            reason = "not a plain state dict" + (f" ({detail[0][:120]})" if detail else "")
        raise WeightsUnavailableError(f"cannot read weights file {path}: {reason[:200]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    return state


def _imagenet_cache_path() -> Path:
    """Where torchvision's download-and-cache keeps the GoogLeNet ImageNet weights."""
    url = GoogLeNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _imagenet_state_dict() -> dict:
    """GoogLeNet ImageNet weights through torchvision's download-and-cache, or a clear error."""
    weights = GoogLeNet_Weights.IMAGENET1K_V1
    cached = _imagenet_cache_path()
    filename = cached.name
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        # torch.hub announces the download on stdout, which must hold nothing but --json's output
        with contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"the ImageNet weights for InceptionV1 are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}).\n"
            f"Put the file {filename} (from {weights.url}) at {cached} "
            f"(the folder is torch.hub's cache; TORCH_HOME moves it), "
            f"or pass --weights PATH to a local GoogLeNet state dict."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _googlenet(state: dict | None, seed: int, source: str = "") -> InceptionV1:
    torch.manual_seed(seed)
    net = GoogLeNet(num_classes=1000, aux_logits=False, transform_input=True,
                    init_weights=state is None)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        load_fitting(net, state, "GoogLeNet", source)
    return InceptionV1(net)


def _load_inceptionv1(weights: str, seed: int) -> LoadedModel:
    spec = GoogLeNet_Weights.IMAGENET1K_V1
    if weights == "imagenet":
        network = _googlenet(_imagenet_state_dict(), seed, source=str(_imagenet_cache_path()))
    elif weights == "random":
        network = _googlenet(None, seed)
    else:
        path = Path(weights)
        network = _googlenet(_load_state_dict_file(path), seed, source=str(path))
        weights = f"file:{path.name}"
    return LoadedModel(
        name="inceptionv1", weights=weights, weights_sha256=weights_digest(network), network=network,
        transform=Preprocess(spec.transforms()), categories=list(spec.meta["categories"]), input_size=224,
    )


class Preprocess:
    """A weights' ``ImageClassification`` preset (resize shorter side, centre crop, normalise),
    computed in one PIL resample of only the cropped region.

    Written by hand because the preset resizes the whole image and then throws most of it away:
    resampling just the crop box (PIL's ``resize(box=...)``) with the same scale and filter gives
    the same pixels up to rounding (at most 1/255 on a few pixels; tested against the preset) for
    about half the decoding thread's cost, which is what keeps decoding from starving the network
    on a small CPU. Anything but a PIL image (or a crop larger than the resize) goes to the preset.
    """

    _FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}

    def __init__(self, preset: ImageClassification):
        self.preset = preset
        self.resize_size = list(preset.resize_size)
        self.crop_size = list(preset.crop_size)
        #: The resize-then-crop alone (no torch), as an atlas records it.
        self.geometry = CropGeometry(tuple(self.resize_size), tuple(self.crop_size))
        self.filter = self._FILTERS.get(preset.interpolation.value)
        # On 0–255 values: (x/255 - mean)/std == (x - 255·mean)/(255·std), one pass fewer.
        self.mean255 = torch.tensor(preset.mean).view(3, 1, 1) * 255
        self.std255 = torch.tensor(preset.std).view(3, 1, 1) * 255

    def __repr__(self) -> str:
        return f"Preprocess({self.preset!r})"

    def source_box(self, width: int, height: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """Output size and the source box that the preset's resize-then-crop reads."""
        return self.geometry.source_box(width, height)

    def __call__(self, image) -> torch.Tensor:
        crop_h, crop_w = (self.crop_size * 2)[:2]
        if (not isinstance(image, Image.Image) or image.mode != "RGB" or self.filter is None
                or len(self.resize_size) != 1 or self.resize_size[0] < max(crop_h, crop_w)):
            return self.preset(image)
        size, box = self.source_box(*image.size)
        pixels = np.asarray(image.resize(size, self.filter, box=box))
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous().float()
        return x.sub_(self.mean255).div_(self.std255)


_REGISTRY: dict[str, tuple[Callable[[str, int], LoadedModel], str]] = {
    "inceptionv1": (_load_inceptionv1, "imagenet"),
}
#: Networks defined in modules of their own, which register themselves when imported; such a
#: module is imported the first time the registry is consulted, so this module imports none of them.
_PROVIDERS = {"demo": "atlasq.demo_model"}


def _registry() -> dict[str, tuple[Callable[[str, int], LoadedModel], str]]:
    for name, module in _PROVIDERS.items():
        if name not in _REGISTRY:
            importlib.import_module(module)
    return _REGISTRY


def model_names() -> list[str]:
    return sorted(_registry())


def register_model(name: str, loader: Callable[[str, int], LoadedModel], default_weights: str) -> None:
    """Make another staged classifier available by name (``loader(weights, seed)``)."""
    _REGISTRY[name] = (loader, default_weights)


def load_model(name: str = "inceptionv1", weights: str | None = None, *, device: str | None = None,
               seed: int = 0) -> LoadedModel:
    """Load a registered network in eval mode.

    Parameters
    ----------
    name : registry name (``"inceptionv1"`` or ``"demo"``).
    weights : ``None`` for the model's default (``"imagenet"`` / ``"demo"``), ``"random"``
        (seeded; for tests and smoke runs only), or a path to a local state dict.
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, …
    seed : seed for random weights.
    """
    if name not in _registry():
        raise InvalidOptionError(f"--model: unknown model {name!r}; available: {', '.join(model_names())}")
    loader, default = _REGISTRY[name]
    loaded = loader(weights or default, seed)
    loaded.device = resolve_device(device)
    loaded.network.eval().to(loaded.device)
    return loaded


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` where it is native (CUDA with bf16, CPUs with AVX512-BF16/AMX); on a
    CUDA card without bf16 ``"fp16"``; else ``"fp32"``. ``"fp16"`` is for CUDA only (CPUs have no
    fast fp16 convolutions)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InvalidOptionError(f"--precision must be auto, fp32, bf16 or fp16 (CUDA), not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise InvalidOptionError("--precision fp16 needs --device cuda; use bf16 or fp32 on a CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        from .devices import Availability

        return "bf16" if Availability.probe().cuda_bf16 else "fp16"
    if os.environ.get("ATLASQ_PRECISION") in ("fp32", "bf16"):
        return os.environ["ATLASQ_PRECISION"]
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def layer_shapes(model: LoadedModel, layers) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of each of ``layers`` at the network's input size, from one
    forward pass of a blank image (only as deep as the deepest layer asked for)."""
    probe = torch.zeros(1, 3, model.input_size, model.input_size, device=model.device)
    with torch.no_grad():
        acts = model.network.forward_layers(probe, list(layers))
    return {name: (int(a.shape[1]), int(a.shape[2]), int(a.shape[3])) for name, a in acts.items()}
