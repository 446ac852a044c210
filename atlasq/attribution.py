"""Attribution of sampled activations to every class, by one forward-mode pass.

For an activation ``h`` at position (y, x) of a layer, its attribution to class c is
``h · ∂logit_c/∂h`` at that position, in its real image context (Building Blocks of
Interpretability; Activation Atlas). The directional derivative of all logits along the
tangent "h at (y, x), zero elsewhere" is exactly that sum over channels for every class at
once, so one ``torch.func.jvp`` through the rest of the network gives the whole vector.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .model import StagedClassifier

__all__ = ["attribute"]

# PyTorch's forward-mode AD levels are process-wide, not per thread: two jvp passes running at
# once in different threads corrupt each other ("invalid forward AD level"). Serialise them.
_FORWARD_AD = threading.Lock()


def attribute(network: StagedClassifier, layer: str, h: torch.Tensor, positions: np.ndarray,
              *, chunk: int = 64) -> torch.Tensor:
    """Attribution vectors of sampled activations.

    Parameters
    ----------
    network : the classifier (or its max-pool-relaxed copy, see :func:`atlasq.model.relax_maxpool`).
    layer : layer name of ``h``.
    h : (B, C, H, W) activations of ``layer`` for B images.
    positions : (B, K, 2) integer (y, x) positions to attribute.
    chunk : how many (image, position) pairs go through the network together.

    Returns
    -------
    (B, K, classes) tensor: ``h[b, :, y, x] · ∂logits/∂h[b, :, y, x]``.
    """
    batch, _, height, width = h.shape
    k = positions.shape[1]
    flat = torch.as_tensor(np.asarray(positions).reshape(-1, 2), device=h.device)
    owner = torch.arange(batch, device=h.device).repeat_interleave(k)
    rest = lambda a: network.forward_from(layer, a)
    out = []
    for start in range(0, len(flat), chunk):
        rows = slice(start, start + chunk)
        primal = h[owner[rows]].detach()
        mask = torch.zeros(primal.shape[0], 1, height, width, device=h.device, dtype=primal.dtype)
        mask[torch.arange(primal.shape[0]), 0, flat[rows, 0], flat[rows, 1]] = 1
        with _FORWARD_AD, torch.enable_grad():
            _, tangent_out = torch.func.jvp(rest, (primal,), (primal * mask,))
        out.append(tangent_out.detach())
    return torch.cat(out).reshape(batch, k, -1)
