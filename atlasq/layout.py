"""2-D layout of activations (UMAP, cosine) and the grid that turns it into atlas cells.

Both are estimators in the scikit-learn manner: ``__init__`` stores arguments, ``fit`` learns
state whose names end in ``_``, ``transform`` handles new points.

:class:`Layout` runs UMAP on a seeded subsample (``fit_size`` points) and places every other
point at the similarity-weighted mean position of its nearest fitted neighbours in the original
(cosine) space. The UMAP optimisation is the cost that grows with the data; placing by FAISS
k-NN is cheap, and the same placing puts a later dataset's activations on a finished atlas.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import InvalidOptionError

__all__ = ["Layout", "Grid", "normalise_layout", "unit_rows"]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous: ready for FAISS); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def normalise_layout(points: np.ndarray, *, low: float = 1.0, high: float = 99.0, margin: float = 0.1):
    """Percentile clip per axis, widened by ``margin`` of the range, then scale into [0, 1].

    Returns ``(normalised, lo, hi)`` so the same map can be applied to later points.
    """
    p_lo, p_hi = np.percentile(points, [low, high], axis=0)
    span = np.maximum(p_hi - p_lo, 1e-12)
    lo, hi = p_lo - margin * span, p_hi + margin * span
    return np.clip((points - lo) / (hi - lo), 0.0, 1.0), lo, hi


class Layout:
    """UMAP layout of activation vectors into [0, 1]².

    Parameters
    ----------
    n_neighbors : int, default 50
        UMAP neighbourhood size (the article's value for mixed4a–5b).
    min_dist : float, default 0.05
        UMAP minimum distance (the article's value).
    metric : str, default "cosine"
        ``"cosine"`` or ``"euclidean"``: UMAP's metric, and the one points UMAP did not see are placed by.
    fit_size : int, default 20000
        Points UMAP optimises; the rest are placed by k-NN. ``0`` fits every point.
    n_epochs : int or None
        UMAP epochs (None: UMAP's own default, 200 for large inputs).
    place_k : int, default 10
        Neighbours used to place a point that UMAP did not see.
    random_state : int, default 0
        Seeds the subsample and UMAP (a seeded UMAP is deterministic).
    """

    def __init__(self, n_neighbors: int = 50, min_dist: float = 0.05, metric: str = "cosine",
                 fit_size: int = 20000, n_epochs: int | None = None, place_k: int = 10,
                 random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.fit_size = fit_size
        self.n_epochs = n_epochs
        self.place_k = place_k
        self.random_state = random_state

    def _validate(self, n: int) -> None:
        """Refuse parameters UMAP would fail on late or silently misread, and too few points."""
        self.check_parameters()
        if n < 4:
            raise InvalidOptionError(f"a layout needs at least 4 points, got {n}")

    def check_parameters(self) -> None:
        """Refuse values UMAP would fail on late or silently misread, naming the parameter."""
        def whole(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        if not whole(self.n_neighbors) or self.n_neighbors < 2:
            raise InvalidOptionError(f"n_neighbors must be a whole number of at least 2, not {self.n_neighbors!r}")
        if not isinstance(self.min_dist, (int, float, np.floating)) or not 0.0 <= self.min_dist <= 1.0:
            raise InvalidOptionError(f"min_dist must be between 0 and 1, not {self.min_dist!r}")
        if self.metric not in ("cosine", "euclidean"):
            raise InvalidOptionError(f"metric must be cosine or euclidean, not {self.metric!r}")
        if not whole(self.fit_size) or self.fit_size < 0:
            raise InvalidOptionError(f"fit_size must be 0 (all points) or a positive whole number, not {self.fit_size!r}")
        if self.n_epochs is not None and (not whole(self.n_epochs) or self.n_epochs < 1):
            raise InvalidOptionError(f"n_epochs must be None or a positive whole number, not {self.n_epochs!r}")
        if not whole(self.place_k) or self.place_k < 1:
            raise InvalidOptionError(f"place_k must be a whole number of at least 1, not {self.place_k!r}")

    def fit(self, X: np.ndarray) -> "Layout":
        import umap

        X = np.asarray(X, dtype=np.float32)
        self._validate(len(X))
        rng = np.random.default_rng(self.random_state)
        if self.fit_size and len(X) > self.fit_size:
            fitted = np.sort(rng.choice(len(X), self.fit_size, replace=False))
        else:
            fitted = np.arange(len(X))
        n_neighbors = min(self.n_neighbors, len(fitted) - 1)
        # Under UMAP_EXACT_BELOW points UMAP measures every pair itself (exactly) and its layouts are
        # left as they were; above, up to FAISS_EXACT_UP_TO, its approximate search (and its compile
        # time) is replaced by FAISS's exact one, whose cost grows with the square of the points.
        knn = ((*exact_neighbours(X[fitted], n_neighbors, self.metric), None)
               if UMAP_EXACT_BELOW <= len(fitted) <= FAISS_EXACT_UP_TO else (None, None, None))
        reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors,
                            min_dist=self.min_dist, metric=self.metric, n_epochs=self.n_epochs,
                            random_state=self.random_state, init="spectral" if len(fitted) > 10 else "random",
                            precomputed_knn=knn)
        with warnings.catch_warnings():  # a seeded UMAP runs single-threaded and says so each time
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            # we place new points ourselves (transform below), so UMAP's own transform is not needed
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
            raw_fitted = reducer.fit_transform(X[fitted]).astype(np.float32)
        self.fit_indices_ = fitted
        self.anchors_ = unit_rows(X[fitted]) if self.metric == "cosine" else X[fitted]
        self.anchor_positions_ = raw_fitted
        raw = np.empty((len(X), 2), np.float32)
        raw[fitted] = raw_fitted
        rest = np.setdiff1d(np.arange(len(X)), fitted)
        if len(rest):
            raw[rest] = self._place_raw(X[rest])
        self.embedding_, self.lo_, self.hi_ = normalise_layout(raw)
        return self

    def _place_raw(self, X: np.ndarray) -> np.ndarray:
        import faiss

        k = min(self.place_k, len(self.anchors_))
        if self.metric == "cosine":
            index = faiss.IndexFlatIP(self.anchors_.shape[1])
            index.add(self.anchors_)
            sims, nn = index.search(unit_rows(X), k)
            weights = np.maximum(sims, 0) ** 4 + 1e-6  # sharpen: the closest neighbours dominate
        else:
            index = faiss.IndexFlatL2(self.anchors_.shape[1])
            index.add(np.ascontiguousarray(self.anchors_, np.float32))
            dist, nn = index.search(np.ascontiguousarray(X, np.float32), k)
            weights = 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6)
        weights /= weights.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", weights, self.anchor_positions_[nn]).astype(np.float32)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Positions in [0, 1]² for new points, by the same k-NN placing."""
        raw = self._place_raw(np.asarray(X, np.float32))
        return np.clip((raw - self.lo_) / (self.hi_ - self.lo_), 0.0, 1.0)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


#: UMAP's own threshold: with fewer points it computes exact neighbours from all pairwise distances.
UMAP_EXACT_BELOW = 4096
#: Above this many fitted points (the default --fit-size is 20,000) UMAP's approximate search is
#: kept: an exact search of every point against every other grows with their square.
FAISS_EXACT_UP_TO = 50_000


def exact_neighbours(X: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows of ``X`` (itself first, at distance 0) and their distances,
    exact, by FAISS, for UMAP's ``precomputed_knn``: exact where UMAP's own search on many points
    is approximate, and without that search's compile time."""
    import faiss

    X = np.ascontiguousarray(X, np.float32)
    if metric == "cosine":
        index = faiss.IndexFlatIP(X.shape[1])
        index.add(unit_rows(X))
        sims, nn = index.search(unit_rows(X), k)
        dist = np.maximum(1.0 - sims, 0.0)
    else:
        index = faiss.IndexFlatL2(X.shape[1])
        index.add(X)
        squared, nn = index.search(X, k)
        dist = np.sqrt(np.maximum(squared, 0.0))
    rows = np.arange(len(X))
    # UMAP takes column 0 as the point itself; duplicates can tie with it in any order
    is_self = nn == rows[:, None]
    order = np.argsort(~is_self, axis=1, kind="stable")
    nn, dist = np.take_along_axis(nn, order, 1), np.take_along_axis(dist, order, 1)
    missing = ~is_self.any(axis=1)
    nn[missing, 1:], dist[missing, 1:] = nn[missing, :-1], dist[missing, :-1]
    nn[:, 0], dist[:, 0] = rows, 0.0
    return nn.astype(np.int64), dist.astype(np.float32)


class Grid:
    """Bin [0, 1]² positions into a G×G grid; each point lands in exactly one cell.

    Cell (i, j) is row i (from y, top to bottom) and column j (from x). Cells are half-open
    ``[j/G, (j+1)/G)`` except the last, which includes 1.0, so points on inner borders go to the
    higher cell and the [0, 1] edges are covered.

    Parameters
    ----------
    size : int
        G, cells per side.
    min_count : int, default 1
        Cells with fewer points are dropped from ``cells_``.
    """

    def __init__(self, size: int, min_count: int = 1):
        self.size = size
        self.min_count = min_count

    def _validate(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise InvalidOptionError(f"size must be a positive integer, not {self.size!r}")
        if self.min_count < 1:
            raise InvalidOptionError(f"min_count must be at least 1, not {self.min_count!r}")

    def transform(self, positions: np.ndarray) -> np.ndarray:
        """(N, 2) cell (i, j) of each (x, y) position in [0, 1]²."""
        self._validate()
        p = np.asarray(positions, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError("positions must have shape (N, 2)")
        if len(p) and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
            raise ValueError("positions must lie in [0, 1]")
        cells = np.minimum(np.floor(p * self.size).astype(np.int64), self.size - 1)
        return cells[:, ::-1]  # (x, y) → (row i from y, column j from x)

    def fit(self, positions: np.ndarray) -> "Grid":
        """Learn ``cell_of_`` (N, 2), ``cells_`` (M, 2) kept cells and ``counts_`` (M,)."""
        self.cell_of_ = self.transform(positions)
        flat = self.cell_of_[:, 0] * self.size + self.cell_of_[:, 1]
        ids, counts = np.unique(flat, return_counts=True)
        keep = counts >= self.min_count
        self.cells_ = np.stack([ids[keep] // self.size, ids[keep] % self.size], axis=1)
        self.counts_ = counts[keep]
        return self

    def bounds(self, i: int, j: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of cell (i, j)."""
        g = self.size
        return j / g, i / g, (j + 1) / g, (i + 1) / g
