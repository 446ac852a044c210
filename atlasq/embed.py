"""Images → vectors: the pure per-batch work of indexing.

``decode_file`` turns one file into a network input (or an error reason), ``embed_decoded``
turns a batch of decoded files into per-image records (through ``embed_batch``), and
``process_files`` chains the two for one batch: file paths in, records out. None of these touch
the index on disk, so the same step can run inside any parallel engine; writing is
:mod:`atlasq.store`'s job and orchestration :mod:`atlasq.indexer`'s, which runs ``decode_file``
in a thread pool ahead of ``embed_decoded`` so that the network never waits for images.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attribution import attribute
from .devices import decoder_for
from .errors import InvalidOptionError
from .images import FileEntry, ImageDecodeError, content_hash, open_rgb, real_path
from .model import LoadedModel, autocast, relax_maxpool

__all__ = ["EmbedConfig", "Decoded", "Embedded", "decode_file", "decode_on_gpu", "embed_batch", "embed_decoded",
           "process_files", "read_for_gpu", "sample_positions"]


@dataclass(frozen=True)
class EmbedConfig:
    """What to keep per image.

    layers : atlas layers whose activations are sampled.
    samples_per_image : K, random interior positions per image and layer.
    attributions : also store each sampled activation's attribution to every class.
    relaxed_maxpool : attribution through max-pools with the average-pool gradient.
    precision : ``"fp32"`` or ``"bf16"`` (already resolved, see :func:`atlasq.model.resolve_precision`).
    seed : positions are a function of (seed, layer, image path) only.
    """

    layers: tuple[str, ...] = ("mixed4c",)
    samples_per_image: int = 4
    attributions: bool = False
    relaxed_maxpool: bool = False
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.samples_per_image < 1:
            raise InvalidOptionError(f"--samples-per-image must be at least 1, not {self.samples_per_image}")
        if not self.layers:
            raise InvalidOptionError("--layers needs at least one atlas layer")


@dataclass
class Decoded:
    """One file read and preprocessed, or the reason it could not be."""

    entry: FileEntry
    tensor: torch.Tensor | None = None
    width: int = 0
    height: int = 0
    hash: str = ""
    error: str | None = None
    raw: bytes | None = None   # a JPEG's bytes waiting for :func:`decode_on_gpu`


@dataclass
class Embedded:
    """Network outputs for a batch of B images (numpy, CPU)."""

    pooled: np.ndarray                     # (B, D) float32: global average of the pooled layer
    top5_class: np.ndarray                 # (B, 5) int
    top5_prob: np.ndarray                  # (B, 5) float32, softmax probabilities
    positions: dict[str, np.ndarray] = field(default_factory=dict)     # layer → (B, K, 2) (y, x)
    activations: dict[str, np.ndarray] = field(default_factory=dict)   # layer → (B, K, C) float32
    attributions: dict[str, np.ndarray] = field(default_factory=dict)  # layer → (B, K, classes)


def decode_file(root: Path, entry: FileEntry, model: LoadedModel) -> Decoded:
    """Read the file ``entry.path`` (a stored path) stands for under ``root`` and apply the
    model's own preprocessing."""
    path = real_path(root, entry.path)
    try:
        image = open_rgb(path, min_side=model.decode_min_side)
        width, height = image.info.get("original_size", image.size)
        tensor = model.transform(image)
        return Decoded(entry, tensor, width, height, content_hash(path))
    except ImageDecodeError as exc:
        return Decoded(entry, error=exc.reason)
    except Exception as exc:  # a transform failing on an odd image must not stop the run
        return Decoded(entry, error=f"preprocessing failed: {type(exc).__name__}: {exc}")


def read_for_gpu(root: Path, entry: FileEntry, model: LoadedModel) -> Decoded:
    """The decode threads' half of GPU decoding: read the file and its header. A file the GPU
    takes (see :func:`atlasq.devices.decoder_for`) keeps its bytes for :func:`decode_on_gpu`; any
    other, or one whose header cannot be read, is decoded here by :func:`decode_file`."""
    from PIL import Image

    try:
        data = real_path(root, entry.path).read_bytes()
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            image_format, mode, (width, height) = header.format, header.mode, header.size
    except Exception:
        return decode_file(root, entry, model)
    if decoder_for(image_format, mode, width * height, model.device) != "gpu":
        return decode_file(root, entry, model)
    # the same digest as images.content_hash, from the bytes already read
    return Decoded(entry, raw=data, hash=hashlib.blake2b(data, digest_size=16).hexdigest())


def decode_on_gpu(root: Path, decoded: list[Decoded], model: LoadedModel, *, decode=None) -> list[Decoded]:
    """Decode the JPEG bytes :func:`read_for_gpu` kept, as one batch on the model's device, and
    apply the model's preprocessing there; every other entry passes through unchanged.

    When the batch call fails, each file is tried alone; a file that still fails (or whose
    preprocessing does) goes to :func:`decode_file` on the CPU, which decodes it or records why
    not, so errors land in the index's errors table as on the CPU path. ``decode`` defaults to
    ``torchvision.io.decode_jpeg`` (tests pass another to exercise the fallbacks).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    decode = decode or decode_jpeg
    waiting = [i for i, d in enumerate(decoded) if d.raw is not None]
    if not waiting:
        return decoded
    data = [torch.frombuffer(bytearray(decoded[i].raw), dtype=torch.uint8) for i in waiting]
    options = dict(mode=ImageReadMode.RGB, apply_exif_orientation=True, device=model.device)
    try:
        images = list(decode(data, **options))
    except Exception:
        images = []
        for one in data:
            try:
                images.append(decode(one, **options))
            except Exception:
                images.append(None)
    out = list(decoded)
    for i, image in zip(waiting, images):
        entry = decoded[i].entry
        try:
            if image is None:
                raise ValueError("GPU decoding failed")
            tensor = model.transform(image)  # a tensor goes through the weights' own preset
        except Exception:
            out[i] = decode_file(root, entry, model)
            continue
        out[i] = Decoded(entry, tensor, int(image.shape[-1]), int(image.shape[-2]), decoded[i].hash)
    return out


def sample_positions(key: str, layer: str, seed: int, height: int, width: int, k: int) -> np.ndarray:
    """K distinct (y, x) positions away from the border, a pure function of its arguments.

    Border rows and columns are skipped (their receptive fields are mostly padding); maps
    smaller than 3×3 have no interior and use every position. With fewer candidates than K,
    positions repeat.
    """
    ys = np.arange(1, height - 1) if height >= 3 else np.arange(height)
    xs = np.arange(1, width - 1) if width >= 3 else np.arange(width)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng([seed, zlib.crc32(layer.encode()), zlib.crc32(key.encode("utf-8",
                                                                                      "surrogateescape"))])
    choice = rng.choice(len(grid), size=k, replace=k > len(grid))
    return grid[choice]


@torch.no_grad()
def embed_batch(model: LoadedModel, inputs: torch.Tensor, keys: list[str], config: EmbedConfig,
                relaxed_network=None) -> Embedded:
    """Run the network once on ``inputs`` (B, 3, S, S) and keep what ``config`` asks for.

    ``keys`` (one per image, its path) seed the sampled positions. ``relaxed_network`` is a
    max-pool-relaxed copy of the network used for attributions when ``config.relaxed_maxpool``.
    """
    net = model.network
    device = model.device
    x = inputs.to(device)
    if config.precision == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    layers = list(dict.fromkeys([*config.layers, net.pooled_layer]))
    with autocast(device, config.precision):
        acts = net.forward_layers(x, layers)
        pooled = acts[net.pooled_layer].float().mean(dim=(2, 3))
        logits = net.head(pooled).float()
    probs = logits.softmax(dim=1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    out = Embedded(pooled=pooled.cpu().numpy(), top5_class=top.indices.cpu().numpy(),
                   top5_prob=top.values.cpu().numpy())
    batch = torch.arange(len(keys), device=device)[:, None]
    if config.attributions and config.relaxed_maxpool and relaxed_network is None:
        relaxed_network = relax_maxpool(net)
    for layer in config.layers:
        h = acts[layer]
        _, _, height, width = h.shape
        pos = np.stack([sample_positions(key, layer, config.seed, height, width, config.samples_per_image)
                        for key in keys])
        ys = torch.as_tensor(pos[..., 0], device=device)
        xs = torch.as_tensor(pos[..., 1], device=device)
        out.positions[layer] = pos
        out.activations[layer] = h.permute(0, 2, 3, 1)[batch, ys, xs].float().cpu().numpy()
        if config.attributions:
            # Always fp32: autocast does not propagate forward-mode tangents, and the small
            # per-class values need the precision.
            network = relaxed_network if config.relaxed_maxpool else net
            attr = attribute(network, layer, h.float().contiguous(), pos)
            out.attributions[layer] = attr.cpu().numpy()
    return out


def embed_decoded(model: LoadedModel, decoded: list[Decoded], config: EmbedConfig,
                  relaxed_network=None) -> Embedded | None:
    """Embed the files of ``decoded`` that were read (in order); ``None`` if none was."""
    ok = [d for d in decoded if d.error is None]
    if not ok:
        return None
    inputs = torch.stack([d.tensor for d in ok])
    return embed_batch(model, inputs, [d.entry.path for d in ok], config, relaxed_network)


def process_files(model: LoadedModel, root: Path, entries: list[FileEntry], config: EmbedConfig,
                  relaxed_network=None) -> tuple[list[Decoded], Embedded | None]:
    """Decode and embed ``entries``: file paths in, records out (no I/O beyond reading the files).

    The unit of work for an engine that distributes batches; the local indexer runs the same two
    steps, but decodes in a thread pool a few batches ahead of the network.
    """
    decoded = [decode_file(root, entry, model) for entry in entries]
    return decoded, embed_decoded(model, decoded, config, relaxed_network)
