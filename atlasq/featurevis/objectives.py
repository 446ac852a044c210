"""Objectives: what an icon maximises at its layer.

The atlas objective (Activation Atlas): for the activation h at the centre position and the
cell's direction v, maximise ``(h·v)^(n+1) / (|h|·|v|)^n``, i.e. the dot product times the
cosine to the power n, which rewards pointing the right way more than sheer magnitude.
Cosine is floored at 0.1 (as Lucid does) so a bad start still has a gradient.

``variant="article"`` reproduces Lucid's exact formula instead: ``dot = mean(h * v')`` and
``cos = max(0.1, dot / (1e-4 + |h|))`` (a scaled quantity, not a true cosine).
"""

from __future__ import annotations

from typing import Callable

import torch


def direction_objective(directions: torch.Tensor, *, cossim_pow: float = 3.0,
                        whitening: torch.Tensor | None = None,
                        variant: str = "cosine") -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image objective values for (B, C, H, W) activations and (B, C) directions.

    whitening : optional (C, C) matrix W. ``"cosine"`` compares W h with W v (both whitened);
        ``"article"`` uses v' = v S with S = W (Lucid applies S to the direction only).
    """
    if variant not in ("cosine", "article"):
        raise ValueError(f"variant must be 'cosine' or 'article', not {variant!r}")
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
        return dot * torch.clamp(cos, min=0.1) ** cossim_pow

    return objective
