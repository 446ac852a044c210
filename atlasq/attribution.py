"""Attribution of sampled activations to every class, by forward-mode passes sharing one primal.

For an activation ``h`` at position (y, x) of a layer, its attribution to class c is
``h · ∂logit_c/∂h`` at that position, in its real image context (Building Blocks of
Interpretability; Activation Atlas). The directional derivative of all logits along the
tangent "h at (y, x), zero elsewhere" is exactly that sum over channels for every class at
once, so one Jacobian-vector product through the rest of the network gives the whole vector.

The K positions of an image are K tangents at the same primal point. ``torch.func.vmap`` over
``torch.func.jvp`` with the primal left unbatched runs the rest of the network once on the
primal and only the tangent arithmetic K times (the way ``torch.func.jacfwd`` batches its basis
vectors), instead of repeating the primal pass for every position. The result is the same
directional derivative, exact to the last bit in the tests (``tests/test_attribution.py``).
``torch.func.linearize`` would share the primal too, but it traces the network on every call,
which measured several times slower here than the whole attribution.
"""

from __future__ import annotations

import threading
import warnings

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
    chunk : at most this many (image, position) tangents go through the network together (the
        tangents' memory); the images of a pass share one primal pass.

    Returns
    -------
    (B, K, classes) tensor: ``h[b, :, y, x] · ∂logits/∂h[b, :, y, x]``.
    """
    batch, _, height, width = h.shape
    k = positions.shape[1]
    pos = torch.as_tensor(np.asarray(positions).reshape(batch, k, 2), device=h.device)
    images_per_pass = max(1, chunk // k)
    tangents_per_pass = max(1, min(k, chunk))
    rest = lambda a: network.forward_from(layer, a)
    out = []
    for first in range(0, batch, images_per_pass):
        primal = h[first:first + images_per_pass].detach()
        count = primal.shape[0]
        owner = torch.arange(count, device=h.device)
        parts = []
        for start in range(0, k, tangents_per_pass):
            where = pos[first:first + count, start:start + tangents_per_pass]  # (count, T, 2)
            t = where.shape[1]
            # tangent j of image b: h[b] at where[b, j], zero elsewhere; shaped (T, count, C, H, W)
            mask = torch.zeros(t, count, 1, height, width, device=h.device, dtype=primal.dtype)
            mask[torch.arange(t, device=h.device)[None, :], owner[:, None], 0, where[..., 0], where[..., 1]] = 1
            tangents = primal.unsqueeze(0) * mask
            along = lambda tangent: torch.func.jvp(rest, (primal,), (tangent,))[1]
            with _FORWARD_AD, torch.enable_grad(), warnings.catch_warnings():
                # torch's first forward-mode pass scripts its own decompositions and warns that
                # scripting is deprecated: torch's business, not the user's
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
                parts.append(torch.func.vmap(along)(tangents).detach())  # (T, count, classes)
        out.append(torch.cat(parts).transpose(0, 1))
    return torch.cat(out)
