"""Similarity search on pooled vectors (cosine), exact or approximate, with FAISS.

Vectors are L2-normalised, so inner product is cosine similarity. Up to ``APPROX_THRESHOLD``
images the exact index (``IndexFlatIP``) answers; above it an HNSW graph is built as well and
used by default (recall@10 against exact is checked by the tests). Both files are derived data:
whenever their recorded id set differs from DuckDB's, they are rebuilt from the shard arrays,
so FAISS and DuckDB never disagree about which images are indexed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DamagedError, InvalidOptionError, NotFoundError
from .images import path_key
from .index_options import APPROX_THRESHOLD
from .layout import unit_rows
from .store import IndexStore

__all__ = ["APPROX_THRESHOLD", "Hit", "build_faiss_index", "search_vectors", "sync_faiss",
           "search", "check_k"]

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def _to_gpu(index):
    """Move a FAISS index to the GPU when faiss-gpu and a GPU are present (else return it)."""
    from .devices import faiss_to_gpu

    return faiss_to_gpu(index)


def build_faiss_index(ids: np.ndarray, vectors: np.ndarray, kind: str = "exact"):
    """A FAISS index over normalised ``vectors`` (N, D) with ``ids`` as its labels.

    ``kind`` is ``"exact"`` (flat inner product) or ``"approx"`` (HNSW, inner product).
    """
    import faiss

    vectors = unit_rows(vectors)
    dim = vectors.shape[1]
    if kind == "exact":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "approx":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise InvalidOptionError(f"kind must be 'exact' or 'approx', not {kind!r}")
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    return index


def search_vectors(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k); missing neighbours have id -1."""
    k = max(1, min(k, index.ntotal))
    return index.search(unit_rows(queries), k)


def sync_faiss(store: IndexStore, *, approx_threshold: int | None = None) -> dict:
    """Rebuild whichever FAISS files disagree with DuckDB or do not load with the recorded count;
    return what is there now (``damaged``: the files found unreadable, then rebuilt)."""
    threshold = _threshold(store) if approx_threshold is None else approx_threshold
    count = store.count("images")
    kinds = ["exact"] + (["approx"] if count > threshold else [])
    out = {"count": count, "rebuilt": [], "damaged": [], "files": {}}
    vectors = None
    for kind in kinds:
        state = store.faiss_state(kind)
        if state == "current":
            try:
                store.load_faiss(kind)  # a file of the right size may still be garbage
            except DamagedError:
                state = "damaged"
        current = state == "current"
        if state == "damaged":
            out["damaged"].append(kind)
        if not current:
            if vectors is None:
                ids, vectors = store.pooled()
            store.save_faiss(build_faiss_index(ids, vectors, kind), kind, ids, {"threshold": threshold})
            out["rebuilt"].append(kind)
        out["files"][kind] = str(store.faiss_path(kind))
    return out


def _threshold(store: IndexStore) -> int:
    """The index's own approx threshold (``build_index(approx_threshold=...)``), else the default."""
    value = store.meta().get("approx_threshold")
    return APPROX_THRESHOLD if value is None else int(value)


@dataclass
class Hit:
    id: int
    path: str
    score: float
    top5_class: list


def _load_for_search(store: IndexStore, mode: str):
    """The FAISS index to use for ``mode`` (auto, exact, approx), rebuilt in memory if stale."""
    count = store.count("images")
    threshold = _threshold(store)
    kind = ("approx" if count > threshold else "exact") if mode == "auto" else mode
    if kind not in ("exact", "approx"):
        raise InvalidOptionError(f"--mode must be auto, exact or approx, not {mode!r}")
    if store.faiss_is_current(kind):
        try:
            return store.load_faiss(kind), kind
        except DamagedError:
            pass  # unreadable on disk: rebuilt below, and on disk by the next `atlasq index`
    ids, vectors = store.pooled()  # stale or missing on disk (e.g. a run was killed): rebuild
    return build_faiss_index(ids, vectors, kind), kind


def search(store: IndexStore, query_vector: np.ndarray, k: int = 10, *, mode: str = "auto",
           exclude: int | None = None) -> tuple[list[Hit], str]:
    """The ``k`` images most similar (cosine) to ``query_vector``; ``exclude`` drops one id."""
    check_k(k)
    index, kind = _load_for_search(store, mode)
    index = _to_gpu(index)
    scores, ids = search_vectors(index, query_vector[None, :], k + (exclude is not None))
    pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != exclude][:k]
    rows = {r["id"]: r for r in store.images([i for i, _ in pairs])}
    return [Hit(i, rows[i]["path"], s, list(rows[i]["top5_class"])) for i, s in pairs if i in rows], kind


def resolve_query(store: IndexStore, query: str) -> tuple[int | None, Path | None]:
    """An indexed image's id (from an id or a path relative to the root), or a file to embed.

    A path is matched as the file's real name (whatever bytes it holds) or as its stored,
    escaped form (:func:`atlasq.images.path_key`), which is what atlasq prints.
    """
    if query.isdigit() and store.images([int(query)]):
        return int(query), None
    for key in dict.fromkeys([path_key(query), *([query] if _is_utf8(query) else [])]):
        image_id = store.find_path(key)
        if image_id is not None:
            return image_id, None
    root = store.meta().get("root")
    if root:
        relative = Path(query).resolve()
        try:
            image_id = store.find_path(path_key(relative.relative_to(root).as_posix()))
        except ValueError:
            image_id = None
        if image_id is not None:
            return image_id, None
    path = Path(query)
    if path.is_file():
        return None, path
    raise NotFoundError(f"{query!r} is neither an image id, an indexed path, nor an image file")


def _is_utf8(text: str) -> bool:
    """Whether ``text`` holds no undecodable bytes (``surrogateescape``), as stored text must."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_k(k: int) -> int:
    """``k`` if it is a usable number of neighbours, else :class:`InvalidOptionError` naming ``-k``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidOptionError(f"-k must be a whole number of at least 1, not {k!r}")
    return int(k)
