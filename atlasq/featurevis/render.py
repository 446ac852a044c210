"""The optimisation loop: parameterisation + transforms + objective → images."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.googlenet import BasicConv2d
from torchvision.transforms._presets import ImageClassification

from ..model import StagedClassifier, autocast
from .objectives import direction_objective
from .param import fft_image
from .transform import robustness_transform

# The normalisation of torchvision's ImageNet classification preset: the one InceptionV1's weights
# and the demo network (atlasq.demo_model.transform) are used with. A network normalised otherwise
# passes its own ``mean`` and ``std``.
_PRESET = ImageClassification(crop_size=224)
IMAGENET_MEAN: tuple[float, ...] = tuple(_PRESET.mean)
IMAGENET_STD: tuple[float, ...] = tuple(_PRESET.std)


@dataclass
class Rendered:
    images: np.ndarray          # (B, size, size, 3) uint8
    history: np.ndarray         # (steps, B) objective per step (under the random transforms)
    initial_objective: np.ndarray  # (B,) objective of the starting image, untransformed
    final_objective: np.ndarray  # (B,) objective of the final image, untransformed
    final_activation: np.ndarray  # (B, C) the layer's centre activation for the final image


@contextmanager
def _frozen(network: torch.nn.Module):
    """Parameters need no gradient while rendering: only the image is optimised."""
    flags = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(network.parameters(), flags):
            p.requires_grad_(flag)


def folded_copy(network: StagedClassifier) -> StagedClassifier:
    """A copy of an eval-mode ``network`` with each BatchNorm folded into the convolution before it
    (torch's ``fuse_conv_bn_eval``): the same function up to rounding, without the BatchNorm's
    forward and backward passes, which are a large share of an fp32 icon step on a CPU (measured:
    ``bench/atlas.py --precision fp32``, README). A network in training mode is returned as is."""
    if network.training:
        return network
    folded = copy.deepcopy(network)
    for module in folded.modules():
        if isinstance(module, BasicConv2d) and isinstance(module.bn, torch.nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = torch.nn.Identity()
    return folded


def render_directions(network: StagedClassifier, layer: str, directions: torch.Tensor, *,
                      size: int = 80, steps: int = 512, lr: float = 0.05, cossim_pow: float = 3.0,
                      whitening: torch.Tensor | None = None, variant: str = "cosine",
                      shared_transforms: bool = False, precision: str = "fp32", seed: int = 0,
                      init_sd: float = 0.01, settle_steps: int = 0, channels_last: bool | None = None,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      on_step: Callable[[int], None] | None = None) -> Rendered:
    """Optimise one image per direction so ``layer``'s centre activation follows it.

    All directions of the batch are optimised together (their objectives are summed; the
    images do not interact). The network runs only as far as ``layer``, with its BatchNorms
    folded into its convolutions (:func:`folded_copy`). Seeded: the same arguments give the same
    images. ``channels_last`` (default: on CPUs and for bf16) runs the convolutions in that memory format.

    The random transforms make the image robust, but they also blur what it is optimised for:
    the centre of a jittered image is rarely the centre of the image itself. The last
    ``settle_steps`` steps therefore optimise the untransformed image, which is the one the icon
    is judged by (its final objective and centre activation), with a freshly started Adam.
    """
    network = folded_copy(network)
    device = next(network.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    params, image_fn = fft_image(len(directions), size, sd=init_sd, generator=generator, device=device)
    transform = robustness_transform(shift_px=12.0 * size / 80, shared=shared_transforms, generator=generator)
    objective = direction_objective(directions.to(device), cossim_pow=cossim_pow, whitening=whitening,
                                    variant=variant)
    mean_t = torch.tensor(mean, device=device)[None, :, None, None]
    std_t = torch.tensor(std, device=device)[None, :, None, None]
    if channels_last is None:  # measured faster on CPUs in fp32 too (README, bench/atlas.py)
        channels_last = precision == "bf16" or device.type == "cpu"
    if channels_last:
        network = network.to(memory_format=torch.channels_last)  # the folded copy's own weights

    def centre_and_objective(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - mean_t) / std_t
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            acts = network.forward_layers(x, [layer])[layer]
        _, _, height, width = acts.shape
        return acts[:, :, height // 2, width // 2].float(), objective(acts)

    run = lambda images: centre_and_objective(images)[1]

    optimiser = torch.optim.Adam(params, lr=lr)
    history = np.zeros((steps, len(directions)), np.float32)
    with _frozen(network):
        with torch.no_grad():
            initial_objective = run(image_fn()).float().cpu().numpy()
        settle_from = steps - settle_steps
        for step in range(steps):
            if step == settle_from and step > 0:
                # Adam's moment estimates come from the noisy transformed gradients and would
                # damp the settle phase's steady ones, so a fresh optimiser starts it (its effect
                # on the demo atlases is measured in the README's atlas section).
                optimiser = torch.optim.Adam(params, lr=lr)
            optimiser.zero_grad(set_to_none=True)
            images = image_fn()
            values = run(transform(images) if step < settle_from else images)
            (-values.sum()).backward()
            optimiser.step()
            history[step] = values.detach().float().cpu().numpy()
            if on_step:
                on_step(step)
        with torch.no_grad():
            final = image_fn()
            centre, final_objective = centre_and_objective(final)
    images = (final.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Rendered(images=images, history=history, initial_objective=initial_objective,
                    final_objective=final_objective.float().cpu().numpy(), final_activation=centre.cpu().numpy())
