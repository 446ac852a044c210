"""Synthetic activations for the benchmarks: shaped like a layer's post-ReLU activations."""

from __future__ import annotations

import math

import numpy as np


def synthetic_activations(n: int, dims: int, seed: int = 0, clusters: int = 200) -> np.ndarray:
    """Clusters on a curved low-dimensional manifold, lifted to ``dims`` and passed through a ReLU
    (non-negative and sparse, as real activations are). The same seed gives the same clusters, so
    two calls with different ``n`` draw from one distribution when their seeds match."""
    rng = np.random.default_rng(seed)
    latent_dims = 24
    centres = rng.normal(size=(clusters, latent_dims)) * 2.0
    spread = rng.uniform(0.3, 1.2, size=clusters)
    lift = rng.normal(size=(latent_dims, dims)) / math.sqrt(latent_dims)
    bend = rng.normal(size=(8, dims)) / math.sqrt(8)
    draws = np.random.default_rng([seed, n])
    out = np.empty((n, dims), np.float32)
    for start in range(0, n, 100_000):  # in blocks, so a million rows never need float64 copies
        m = min(100_000, n - start)
        which = draws.integers(clusters, size=m)
        latent = centres[which] + draws.normal(size=(m, latent_dims)) * spread[which, None]
        curved = latent @ lift + np.sin(latent[:, :8]) @ bend
        out[start:start + m] = np.maximum(curved + draws.normal(size=(m, dims)) * 0.3 - 0.5, 0)
    return out
