"""Objectives: what an icon maximises at its layer.

For the activation h at the centre position and the cell's direction v:

``"cosine"`` (the default) maximises cos(h, v): the icon's activation points the way of the
    direction, however strong it is. This is the limit n → ∞ of the articles' family below.
``"dot-cosine"`` is the articles' formula ``(h·v)^(n+1) / (|h|·|v|)^n``: the dot product times the
    cosine to the power n, with a true cosine. The dot product rewards a strong activation, and
    the optimiser buys strength with direction: icons end further from their cell's direction,
    with larger activations. Neighbouring cells' means can be nearly parallel, so that difference
    decides whether an icon looks like its own cell or a neighbour (the README's atlas section
    gives the figures, measured by tests/test_atlas.py's atlas).
``"article"`` is Lucid's exact code: ``dot = mean(h * v')`` and
    ``cos = max(0.1, dot / (1e-4 + |h|))`` (a scaled quantity, not a true cosine).

Cosines in the last two are floored at 0.1 (as Lucid does) so a bad start still has a gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

OBJECTIVES = ("cosine", "dot-cosine", "article")


def direction_objective(directions: torch.Tensor, *, cossim_pow: float = 3.0,
                        whitening: torch.Tensor | None = None,
                        variant: str = "cosine") -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image objective values for (B, C, H, W) activations and (B, C) directions.

    cossim_pow : n, for ``"dot-cosine"`` and ``"article"``.
    whitening : optional (C, C) matrix W. ``"cosine"`` and ``"dot-cosine"`` compare W h with W v
        (both whitened); ``"article"`` uses v' = v S with S = W (Lucid applies S to the direction only).
    """
    if variant not in OBJECTIVES:
        raise ValueError(f"variant must be one of {', '.join(OBJECTIVES)}, not {variant!r}")
    v = directions.float()
    if whitening is not None:
        v = v @ whitening.float()

    def objective(acts: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = acts.shape
        h = acts[:, :, height // 2, width // 2].float()
        if variant == "article":
            dot = (h * v).mean(dim=1)
            cos = torch.clamp(dot / (1e-4 + h.norm(dim=1)), min=0.1)
            return dot * cos ** cossim_pow
        hw = h @ whitening.float() if whitening is not None else h
        dot = (hw * v).sum(dim=1)
        cos = dot / (hw.norm(dim=1) * v.norm(dim=1) + 1e-8)
        if variant == "cosine":
            return cos
        return dot * torch.clamp(cos, min=0.1) ** cossim_pow

    return objective
