"""atlasq.layout's Layout on its own: bad parameters and too few points are refused with the
error family's InvalidOptionError naming the parameter, before UMAP runs; good ones give a seeded
layout in [0, 1]² that keeps clusters apart and places new points beside their cluster."""

from __future__ import annotations

import numpy as np
import pytest

from atlasq.errors import AtlasqError, InvalidOptionError
from atlasq.layout import UMAP_EXACT_BELOW, Grid, Layout, exact_neighbours, unit_rows


def _clusters(n_per: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated clusters of non-negative 16-d vectors (activations are post-ReLU)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 5 + 0.5
    labels = np.repeat(np.arange(3), n_per)
    return (centres[labels] + rng.normal(0, 0.2, (len(labels), 16))).clip(0).astype(np.float32), labels


@pytest.mark.parametrize("parameters, named", [
    ({"n_neighbors": 1}, "n_neighbors"), ({"n_neighbors": 0}, "n_neighbors"), ({"n_neighbors": -5}, "n_neighbors"),
    ({"n_neighbors": 2.5}, "n_neighbors"), ({"n_neighbors": True}, "n_neighbors"),
    ({"min_dist": -0.1}, "min_dist"), ({"min_dist": 1.5}, "min_dist"), ({"min_dist": float("nan")}, "min_dist"),
    ({"metric": "manhattan"}, "metric"), ({"fit_size": -1}, "fit_size"), ({"n_epochs": 0}, "n_epochs"),
    ({"place_k": 0}, "place_k"),
])
def test_bad_parameters_are_refused_naming_them(parameters, named):
    X, _ = _clusters()
    with pytest.raises(InvalidOptionError, match=named) as info:
        Layout(**parameters).fit(X)
    assert isinstance(info.value, AtlasqError) and isinstance(info.value, ValueError)
    assert not hasattr(Layout(**parameters), "embedding_")


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_points_are_refused(n):
    with pytest.raises(InvalidOptionError, match="at least 4 points"):
        Layout(n_neighbors=2).fit(np.random.default_rng(0).random((n, 8), np.float32))


@pytest.mark.parametrize("size, min_count", [(0, 1), (2.5, 1), (-3, 1), (4, 0)])
def test_bad_grid_parameters_are_refused(size, min_count):
    with pytest.raises(InvalidOptionError):
        Grid(size, min_count=min_count).fit(np.full((3, 2), 0.5))


@pytest.mark.parametrize("n_per", [40, UMAP_EXACT_BELOW // 3 + 1])
def test_layout_is_seeded_in_the_unit_square_and_keeps_clusters_apart(n_per):
    """Also above UMAP_EXACT_BELOW points, where the neighbours UMAP uses come from FAISS."""
    X, labels = _clusters(n_per)
    a = Layout(n_neighbors=10, n_epochs=50, random_state=1).fit(X)
    b = Layout(n_neighbors=10, n_epochs=50, random_state=1).fit(X)
    np.testing.assert_array_equal(a.embedding_, b.embedding_)
    p = a.embedding_
    assert p.shape == (len(X), 2) and p.min() >= 0 and p.max() <= 1
    centres = np.stack([p[labels == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(p[labels == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centres[c] - centres[d]) for c in range(3) for d in range(c + 1, 3)]
    assert min(gaps) > 2 * spread, (gaps, spread)
    # New points land beside their own cluster.
    new, new_labels = _clusters(n_per=5, seed=9)
    placed = a.transform(new)
    nearest = np.linalg.norm(placed[:, None] - centres[None], axis=2).argmin(1)
    np.testing.assert_array_equal(nearest, new_labels)


def test_points_beyond_fit_size_are_placed_next_to_their_cluster():
    X, labels = _clusters(n_per=60)
    layout = Layout(n_neighbors=10, n_epochs=50, fit_size=60).fit(X)
    assert len(layout.fit_indices_) == 60
    p = layout.embedding_
    unseen = np.setdiff1d(np.arange(len(X)), layout.fit_indices_)
    centres = np.stack([p[layout.fit_indices_][labels[layout.fit_indices_] == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(p[unseen][:, None] - centres[None], axis=2).argmin(1)
    np.testing.assert_array_equal(nearest, labels[unseen])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_neighbours_match_brute_force_with_each_point_first(metric):
    """The k-NN handed to UMAP: every row starts with itself at distance 0, even where duplicates
    tie with it, and the rest are the true nearest rows in order."""
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(300, 16))).astype(np.float32)
    X[10] = X[11] = X[12]  # three identical points
    nn, dist = exact_neighbours(X, 8, metric)
    assert (nn[:, 0] == np.arange(len(X))).all() and (dist[:, 0] == 0).all()
    if metric == "cosine":
        full = 1 - unit_rows(X) @ unit_rows(X).T
    else:
        full = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(full, -1)  # itself first
    expected = np.sort(full, axis=1)[:, 1:8]
    assert np.allclose(np.sort(dist[:, 1:], axis=1), np.maximum(expected, 0), atol=1e-4)
    assert set(nn[10, :3]) == {10, 11, 12} and set(nn[11, :3]) == {10, 11, 12}

