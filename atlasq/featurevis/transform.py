"""Transformation robustness: random pad, jitter, scale and rotation, applied every step.

All four are one affine map per image, sampled with a single ``grid_sample`` (bilinear), with
the area outside the image filled with grey 0.5 (Lucid's pad value). By default each image of
the batch gets its own random transform; ``shared=True`` draws one for the whole batch as Lucid
does. Ranges follow Lucid's atlas recipe: pad 16 then jitter 8 (≈ ±12 px shift at 80 px), scale
0.92–1.0 (0.998^20…0.998^39), rotation in −20…19° with extra weight near 0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

ROTATIONS = torch.tensor(list(range(-20, 20)) + list(range(-10, 10)) + list(range(-5, 5)) + [0] * 5,
                         dtype=torch.float32)


def robustness_transform(*, shift_px: float = 12.0, scale_range: tuple[float, float] = (0.92, 1.0),
                         rotations: torch.Tensor = ROTATIONS, shared: bool = False,
                         generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping a (B, 3, S, S) image batch to a randomly transformed batch of the same size."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        batch, _, size, _ = images.shape
        n = 1 if shared else batch
        angle = rotations[torch.randint(len(rotations), (n,), generator=generator)] * math.pi / 180
        scale = torch.empty(n).uniform_(*scale_range, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * shift_px / size)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(images)
        theta = theta.expand(batch, 2, 3) if shared else theta
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved + 0.5

    return apply
