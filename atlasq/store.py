"""One folder per index: a DuckDB file (the source of truth) and memory-mappable arrays.

Layout of ``<home>/<name>/``::

    index.duckdb        meta, images, samples, errors, shards tables
    shards/000007/      arrays of one committed chunk of images
        pooled.npy          (n, D) float32   pooled mixed5b vectors, row = images.row
        mixed4c.act.npy     (n*K, C) float16 sampled activations, row = samples.row
        mixed4c.attr.npy    (n*K, classes) float16 attributions (indexes built with them)
    pooled.faiss        FAISS index of the pooled vectors, ids = images.id
    pooled.faiss.json   which ids that file holds and its size (so it is rebuilt when it disagrees)
    writer.lock         held (flock) by the one process writing the index, see :meth:`IndexStore.writer`
    writer.json         who holds it: pid and start time, for the message of a second writer

A chunk is made durable in two steps: its shard folder is written under a temporary name and
renamed, then its rows are inserted in one DuckDB transaction. A crash between the two leaves
a shard no row points to; :meth:`IndexStore.remove_orphans` deletes it on the next run. So a
row never points to a missing array, and an interrupted run loses at most one chunk of work.
Arrays damaged or deleted afterwards (by hand, a disk error) are found by
:meth:`IndexStore.verify_shards`; ``atlasq index`` forgets their rows so it embeds those images
again, and readers report them as :class:`DamagedError`.

No other module writes SQL against an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from .errors import BusyError, DamagedError, IncompatibleError, NotFoundError
from .fileio import replaced
from .home import default_home, index_folder

__all__ = ["IndexStore", "IndexNotFoundError", "Chunk", "index_folder", "default_home"]

DB_FILE = "index.duckdb"
LOCK_FILE = "writer.lock"
OWNER_FILE = "writer.json"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS images (
    id BIGINT PRIMARY KEY,
    path VARCHAR NOT NULL,
    bytes BIGINT, mtime DOUBLE, width INTEGER, height INTEGER, hash VARCHAR,
    top5_class INTEGER[], top5_prob FLOAT[],
    shard INTEGER NOT NULL, row INTEGER NOT NULL,
    indexed_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS samples (
    image_id BIGINT NOT NULL, layer VARCHAR NOT NULL, k SMALLINT NOT NULL,
    y SMALLINT NOT NULL, x SMALLINT NOT NULL, shard INTEGER NOT NULL, row INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    path VARCHAR NOT NULL, bytes BIGINT, mtime DOUBLE, reason VARCHAR,
    recorded_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, images INTEGER,
    created TIMESTAMP DEFAULT current_timestamp);
CREATE INDEX IF NOT EXISTS images_path ON images (path);
CREATE INDEX IF NOT EXISTS samples_image ON samples (image_id);
"""
# Where each sampled activation falls on a reference atlas (one row per activation and grid
# level); written by `atlasq histogram`. Rows are inserted sorted by (atlas, level, i, j), so
# DuckDB's zone maps make "the activations in cell (i, j)" a narrow scan.
PLACEMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS placements (
    atlas VARCHAR NOT NULL, level SMALLINT NOT NULL, image_id BIGINT NOT NULL, k SMALLINT NOT NULL,
    y SMALLINT NOT NULL, x SMALLINT NOT NULL, i SMALLINT, j SMALLINT,
    distance FLOAT NOT NULL, cell_distance FLOAT, off_atlas BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS placements_cell ON placements (atlas, level, i, j);
CREATE TABLE IF NOT EXISTS cell_counts (
    atlas VARCHAR NOT NULL, level SMALLINT NOT NULL, i SMALLINT NOT NULL, j SMALLINT NOT NULL,
    activations BIGINT NOT NULL, images BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS placement_totals (
    atlas VARCHAR NOT NULL, level SMALLINT NOT NULL, activations BIGINT NOT NULL, off_atlas BIGINT NOT NULL,
    outside_kept_cells BIGINT NOT NULL, images BIGINT NOT NULL
);
"""
# cell_counts and placement_totals summarise placements per atlas and level. They are rebuilt in the
# same transaction as every write, so the app's most frequent read (counts for all cells) reads a
# table of one row per cell instead of counting distinct images over every placement
# (bench/histogram.py times both).
REFRESH_SUMMARIES = """
DELETE FROM cell_counts WHERE atlas = $atlas;
INSERT INTO cell_counts SELECT atlas, level, i, j, count(*), count(DISTINCT image_id) FROM placements
    WHERE atlas = $atlas AND NOT off_atlas AND i IS NOT NULL GROUP BY atlas, level, i, j;
DELETE FROM placement_totals WHERE atlas = $atlas;
INSERT INTO placement_totals SELECT atlas, level, count(*), count(*) FILTER (WHERE off_atlas),
    count(*) FILTER (WHERE NOT off_atlas AND i IS NULL), count(DISTINCT image_id) FROM placements
    WHERE atlas = $atlas GROUP BY atlas, level;
"""


class IndexNotFoundError(NotFoundError):
    """No index of that name under the home folder."""


@dataclass
class Chunk:
    """The rows and arrays of a batch of images, ready to be committed.

    ``images`` columns: id, path, bytes, mtime, width, height, hash, top5_class, top5_prob.
    ``samples`` columns: image_id, layer, k, y, x. Arrays are in the same row order.
    """

    images: dict[str, list]
    pooled: np.ndarray                      # (n, D) float32
    samples: dict[str, list]
    activations: dict[str, np.ndarray]      # layer → (n*K, C)
    attributions: dict[str, np.ndarray]     # layer → (n*K, classes); empty without attributions
    errors: list[tuple[str, int, float, str]]  # (path, bytes, mtime, reason)


#: How long a reader opened with ``hold=True`` keeps the database open after its first connection.
HOLD_S = 1.0
# DuckDB shares one database instance between a process's connections to a file while any of them
# is open: a connect then costs under 1 ms instead of the 15-30 ms of reading the file's catalog
# again. The app opens an index five or more times per run, so its readers (hold=True) keep one
# extra read-only connection per file for HOLD_S seconds from its first use, then let the file go
# (a writer in another process waits for readers, trying every 50 ms). A writer in this process
# closes such a connection before it opens the file.
_HELD: dict[str, duckdb.DuckDBPyConnection] = {}
_HELD_LOCK = threading.Lock()


def _release_held(path: str) -> None:
    with _HELD_LOCK:
        con = _HELD.pop(path, None)
    if con is not None:
        con.close()


def _hold(path: str) -> None:
    """Keep ``path``'s database open (read-only) for :data:`HOLD_S` seconds, unless already held."""
    with _HELD_LOCK:
        if path in _HELD:
            return
        try:
            _HELD[path] = duckdb.connect(path, read_only=True)  # the instance is open: this is quick
        except duckdb.Error:
            return
    timer = threading.Timer(HOLD_S, _release_held, args=(path,))
    timer.daemon = True
    timer.start()


class IndexStore:
    """An index folder: DuckDB connection, shard arrays and the FAISS file."""

    def __init__(self, folder: Path, *, read_only: bool = True, lock_wait: float = 20.0, hold: bool = False):
        """``hold``: a reader that keeps the database open a moment after it closes (see :data:`HOLD_S`),
        for callers that open the same index many times in quick succession (the app)."""
        self.folder = self.require(folder)
        self.read_only = read_only
        self.lock_wait = lock_wait
        self.hold = hold and read_only
        self._con = None
        self.con  # open now, so a missing, locked or damaged database is reported here

    @staticmethod
    def require(folder: Path) -> Path:
        """``folder`` if it holds an index, else :class:`IndexNotFoundError` saying how to build one."""
        folder = Path(folder)
        if not (folder / DB_FILE).is_file():
            raise IndexNotFoundError(f"no index at {folder} (missing {DB_FILE}); build one with `atlasq index DIR "
                                     f"--name {folder.name}`")
        return folder

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection, reopened after :meth:`release`.

        DuckDB lets one process write a database file or several processes read it, never both
        at once. So a writer that releases the file between its commits lets readers (the app)
        in, and both sides wait up to ``lock_wait`` seconds for the other to let go. Only a lock
        is waited for: a file DuckDB cannot read is reported at once as :class:`DamagedError`.
        """
        if self._con is None:
            db = self.folder / DB_FILE
            if not self.read_only:
                _release_held(str(db))  # this process's own held reader would keep a writer out
            deadline = time.monotonic() + self.lock_wait
            while True:
                try:
                    self._con = duckdb.connect(str(db), read_only=self.read_only)
                    break
                except duckdb.IOException as exc:
                    if "permission denied" in str(exc).lower():
                        raise NotFoundError(f"cannot open {db}: permission denied") from exc
                    if not _is_lock_conflict(exc):
                        raise _damaged_database(db, exc) from exc
                    if time.monotonic() >= deadline:
                        raise BusyError(f"cannot open {db}: another process has held it for over "
                                        f"{self.lock_wait:.0f} s ({_holder(exc)}); try again when it is done") from exc
                    time.sleep(0.05)
                except duckdb.ConnectionException:
                    raise  # this process already has the file open otherwise: a bug, not the file's fault
                except duckdb.Error as exc:  # a valid header over damaged content, and the like
                    raise _damaged_database(db, exc) from exc
                except PermissionError as exc:
                    raise NotFoundError(f"cannot open {db}: {exc.strerror}") from exc
            if self.hold:
                _hold(str(db))
        return self._con

    def release(self) -> None:
        """Close the connection until the next use, so other processes can open the file."""
        if self._con is not None:
            self._con.close()
            self._con = None

    @classmethod
    def create(cls, folder: Path, *, lock_wait: float = 20.0) -> "IndexStore":
        """Open the index in ``folder`` for writing, creating it when new (the caller holds
        :meth:`writer`, so nobody else creates or writes it meanwhile)."""
        folder = Path(folder)
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        store = cls.__new__(cls)
        store.folder, store.read_only, store.lock_wait, store._con = folder, False, lock_wait, None
        store.hold = False
        try:
            store.con.execute(SCHEMA)  # waits for readers like every later open
        except duckdb.Error as exc:
            store.release()
            raise _damaged_database(folder / DB_FILE, exc) from exc
        return store

    @staticmethod
    @contextmanager
    def writer(folder: Path, *, wait: float = 20.0):
        """Hold the index's writer lock for the block: one writer per index at a time.

        The DuckDB file alone cannot guard a whole run, since the writer releases it between
        commits so readers get in; two runs would then interleave their plans and commits. This
        lock (``writer.lock``, an flock the kernel releases when its process dies, even by
        ``kill -9``; through the ``filelock`` library) is held from before the run plans its work
        (it reads the index's settings again once it holds the lock) until it is done. A second writer waits up to ``wait`` seconds, then gets a
        :class:`BusyError` naming the holder's pid from ``writer.json``.
        """
        from filelock import FileLock, Timeout

        folder = Path(folder)
        lock = FileLock(str(folder / LOCK_FILE), timeout=wait)
        try:
            lock.acquire()
        except Timeout:
            raise BusyError(f"index {folder.name!r} is being written by another run ({_owner(folder)}); "
                            f"waited {wait:.0f} s. Run again when it has finished.") from None
        try:
            with replaced(folder / OWNER_FILE) as tmp:
                tmp.write_text(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            yield
        finally:
            lock.release()

    def close(self) -> None:
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ meta
    def meta(self) -> dict:
        try:
            rows = self.con.execute("SELECT key, value FROM meta").fetchall()
        except duckdb.CatalogException as exc:
            raise DamagedError(f"{self.folder / DB_FILE} has no meta table, so it is not an atlasq index (or "
                               f"its first run was stopped early); run `atlasq index` again to build it") from exc
        return {k: json.loads(v) for k, v in rows}

    def set_meta(self, values: dict) -> None:
        for key, value in values.items():
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    # ------------------------------------------------------------------ writing
    def file_states(self) -> dict[str, tuple[int, int, float]]:
        """path → (id, bytes, mtime) of every indexed image."""
        rows = self.con.execute("SELECT path, id, bytes, mtime FROM images").fetchall()
        return {p: (i, b, m) for p, i, b, m in rows}

    def error_states(self) -> dict[str, tuple[int, float]]:
        """path → (bytes, mtime) of every file recorded as unreadable."""
        return {p: (b, m) for p, b, m in self.con.execute("SELECT path, bytes, mtime FROM errors").fetchall()}

    def remove_paths(self, paths: list[str]) -> None:
        """Forget images and error records for ``paths`` (deleted or changed files), in one transaction."""
        if not paths:
            return
        table = pa.table({"path": pa.array(paths, pa.string())})
        self.con.register("gone", table)
        try:
            with self._transaction():
                self.con.execute("DELETE FROM samples WHERE image_id IN "
                                 "(SELECT id FROM images WHERE path IN (SELECT path FROM gone))")
                self.con.execute("DELETE FROM images WHERE path IN (SELECT path FROM gone)")
                self.con.execute("DELETE FROM errors WHERE path IN (SELECT path FROM gone)")
        finally:
            self.con.unregister("gone")

    def remove_orphans(self) -> int:
        """Delete shard folders that no committed row refers to (left by a crash); return how many."""
        known = {r[0] for r in self.con.execute("SELECT id FROM shards").fetchall()}
        removed = 0
        for path in (self.folder / "shards").iterdir():
            stem = path.name.split(".")[0]
            if not stem.isdigit() or int(stem) not in known or path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def next_image_id(self) -> int:
        value = self.meta().get("next_image_id", 1)
        top = self.con.execute("SELECT max(id) FROM images").fetchone()[0]
        return max(value, (top or 0) + 1)

    def commit(self, chunk: Chunk) -> None:
        """Write ``chunk``'s arrays, then its rows and errors in one transaction."""
        n = len(chunk.images["id"])
        shard = None
        if n:
            shard = (self.con.execute("SELECT max(id) FROM shards").fetchone()[0] or 0) + 1
            self._write_shard(shard, chunk)
        with self._transaction():
            if n:
                images = dict(chunk.images, shard=[shard] * n, row=list(range(n)))
                samples = dict(chunk.samples, shard=[shard] * len(chunk.samples["image_id"]),
                               row=_sample_rows(chunk.samples))
                self._insert("images", images)
                self._insert("samples", samples)
                self.con.execute("INSERT INTO shards (id, images) VALUES (?, ?)", [shard, n])
                self.con.execute("INSERT OR REPLACE INTO meta VALUES ('next_image_id', ?)",
                                 [json.dumps(max(chunk.images["id"]) + 1)])
            if chunk.errors:
                paths, sizes, mtimes, reasons = map(list, zip(*chunk.errors))
                self.con.execute("DELETE FROM errors WHERE path IN (SELECT unnest(?))", [paths])
                self._insert("errors", {"path": paths, "bytes": sizes, "mtime": mtimes, "reason": reasons})

    @contextmanager
    def _transaction(self):
        """BEGIN … COMMIT, rolled back on any error or interruption (Ctrl-C included)."""
        self.con.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # ------------------------------------------------------------------ placements on an atlas
    def _placements_exist(self) -> bool:
        # asked once per opened store (information_schema took 15 ms a time, several times per app run)
        if not getattr(self, "_has_placements", False):
            self._has_placements = bool(self.con.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'placements'").fetchone()[0])
        return self._has_placements

    def placed_atlases(self) -> dict[str, str]:
        """atlas name → the build key of the atlas its placements were made on."""
        return {k[len("placed:"):]: v for k, v in self.meta().items() if k.startswith("placed:")}

    def placed_keys(self, atlas: str) -> set[tuple[int, int]]:
        """(image_id, k) of the activations already placed on ``atlas``."""
        if not self._placements_exist():
            return set()
        rows = self.con.execute("SELECT DISTINCT image_id, k FROM placements WHERE atlas = ?", [atlas]).fetchall()
        return {(int(i), int(k)) for i, k in rows}

    def write_placements(self, atlas: str, atlas_key: str, rows: "pa.Table", *, replace: bool,
                         gone: list[int]) -> None:
        """In one transaction: forget ``atlas``'s placements when ``replace`` (the atlas was rebuilt)
        or those of images no longer indexed (``gone``), add ``rows``, and record ``atlas_key``."""
        self.con.execute(PLACEMENTS_SCHEMA)
        with self._transaction():
            if replace:
                self.con.execute("DELETE FROM placements WHERE atlas = ?", [atlas])
            elif gone:
                self.con.execute("DELETE FROM placements WHERE atlas = ? AND image_id IN (SELECT unnest(?))",
                                 [atlas, list(map(int, gone))])
            self._insert("placements", rows.sort_by([("level", "ascending"), ("i", "ascending"), ("j", "ascending")]))
            for statement in filter(str.strip, REFRESH_SUMMARIES.split(";")):
                self.con.execute(statement, {"atlas": atlas})
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [f"placed:{atlas}", json.dumps(atlas_key)])

    def cell_counts(self, atlas: str, level: int) -> dict[str, np.ndarray]:
        """Per cell (i, j) of ``level``: on-atlas activations and distinct images."""
        if not self._placements_exist():
            return {"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "activations": np.zeros(0, np.int64),
                    "images": np.zeros(0, np.int64)}
        return self.con.execute("SELECT i, j, activations, images FROM cell_counts WHERE atlas = ? AND level = ? "
                                "ORDER BY i, j", [atlas, level]).fetchnumpy()

    def placement_totals(self, atlas: str, level: int) -> dict[str, int]:
        """Activations placed at ``level``: all, off-atlas, and on-atlas but outside every kept cell."""
        keys = ("activations", "off_atlas", "outside_kept_cells", "images")
        row = None
        if self._placements_exist():
            row = self.con.execute(f"SELECT {', '.join(keys)} FROM placement_totals WHERE atlas = ? AND level = ?",
                                   [atlas, level]).fetchone()
        return dict(zip(keys, map(int, row or (0, 0, 0, 0))))

    def cell_members(self, atlas: str, level: int, i: int, j: int, limit: int | None = None,
                     offset: int = 0) -> list[dict]:
        """Images with on-atlas activations in cell (i, j), most typical first (smallest cosine
        distance of their best activation to the cell's mean), each with all its positions there.

        With ``limit``, only the cell's ``(limit + offset) × K`` most typical activations are
        ranked (K = samples per image): they hold every image of the page, since an image's first
        activation in that order is its best. DuckDB does that as a top-N, not a full sort.
        """
        if not self._placements_exist():
            return []
        per_image = int(self.meta().get("samples_per_image") or 1)
        cell = ("SELECT image_id, k, y, x, cell_distance FROM placements "
                "WHERE atlas = $atlas AND level = $level AND i = $i AND j = $j AND NOT off_atlas")
        ranked = ("SELECT image_id, min(cell_distance) AS cell_distance FROM {source} GROUP BY image_id "
                  "ORDER BY cell_distance, image_id")
        params = {"atlas": atlas, "level": level, "i": i, "j": j}
        if limit is None:
            best = ranked.format(source="cell")
        else:
            best = ranked.format(source="(SELECT * FROM cell ORDER BY cell_distance, image_id LIMIT $rows)")
            best += " LIMIT $limit OFFSET $offset"
            params.update(rows=(int(limit) + int(offset)) * per_image, limit=int(limit), offset=int(offset))
        query = f"""
            WITH cell AS ({cell}), best AS ({best})
            SELECT b.image_id, b.cell_distance, count(*) AS activations,
                   list(struct_pack(k := c.k, y := c.y, x := c.x, cell_distance := c.cell_distance)
                        ORDER BY c.cell_distance, c.k) AS positions, any_value(im.path) AS path
            FROM best b JOIN cell c ON c.image_id = b.image_id JOIN images im ON im.id = b.image_id
            GROUP BY b.image_id, b.cell_distance ORDER BY b.cell_distance, b.image_id"""
        return _dicts(self.con.execute(query, params))

    def image_placements(self, atlas: str, image_id: int) -> list[dict]:
        """Where one image's activations fall on ``atlas``, at every level."""
        if not self._placements_exist():
            return []
        return _dicts(self.con.execute("SELECT level, k, y, x, i, j, distance, off_atlas FROM placements "
                                       "WHERE atlas = ? AND image_id = ? ORDER BY level, k", [atlas, int(image_id)]))

    def cells_of_images(self, atlas: str, image_ids: list[int]) -> dict[int, dict[tuple[int, int], int]]:
        """Per level: cell (i, j) → how many activations of these images are placed there."""
        if not self._placements_exist() or not image_ids:
            return {}
        rows = self.con.execute(
            "SELECT level, i, j, count(*) FROM placements WHERE atlas = ? AND image_id IN (SELECT unnest(?)) "
            "AND i IS NOT NULL AND NOT off_atlas GROUP BY level, i, j", [atlas, list(map(int, image_ids))]).fetchall()
        out: dict[int, dict[tuple[int, int], int]] = {}
        for level, i, j, n in rows:
            out.setdefault(int(level), {})[(int(i), int(j))] = int(n)
        return out

    # --- the app's views of placements, narrowed by an image filter (see ImageFilter)

    def filtered_cell_counts(self, atlas: str, level: int, where: "ImageFilter") -> dict[str, np.ndarray]:
        """Like :meth:`cell_counts`, counting only the images ``where`` keeps (the stored table
        when it keeps every image)."""
        if where.everything or not self._placements_exist():
            return self.cell_counts(atlas, level)
        sql, params = where.sql()
        return self.con.execute(
            f"SELECT i, j, count(*) AS activations, count(DISTINCT image_id) AS images FROM placements "
            f"WHERE atlas = $atlas AND level = $level AND i IS NOT NULL AND NOT off_atlas "
            f"AND image_id IN (SELECT id FROM images WHERE {sql}) GROUP BY i, j ORDER BY i, j",
            {"atlas": atlas, "level": level, **params}).fetchnumpy()

    def filtered_totals(self, atlas: str, level: int, where: "ImageFilter") -> dict[str, int]:
        """Like :meth:`placement_totals` (without ``outside_kept_cells``, which needs the atlas),
        for the images ``where`` keeps."""
        if where.everything or not self._placements_exist():
            return self.placement_totals(atlas, level)
        sql, params = where.sql()
        row = self.con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE off_atlas), count(DISTINCT image_id) FROM placements "
            f"WHERE atlas = $atlas AND level = $level AND image_id IN (SELECT id FROM images WHERE {sql})",
            {"atlas": atlas, "level": level, **params}).fetchone()
        return {"activations": int(row[0]), "off_atlas": int(row[1]), "outside_kept_cells": 0, "images": int(row[2])}

    def _selection(self, atlas: str, level: int, cells: list[tuple[int, int]], where: "ImageFilter") -> tuple[str, dict]:
        """The placements (on-atlas, of images ``where`` keeps) in any of ``cells``, as SQL and parameters."""
        sql, params = where.sql()
        # one equality lookup per cell (each can use the placements_cell index), not one scan
        # testing every placement against the list
        cells = sorted({(int(i), int(j)) for i, j in cells})
        chosen = " UNION ALL ".join(
            f"SELECT image_id, k, y, x, i, j, cell_distance FROM placements WHERE atlas = $atlas AND level = $level "
            f"AND i = {i} AND j = {j} AND NOT off_atlas" for i, j in cells)
        if not where.everything:
            chosen = f"SELECT * FROM ({chosen}) WHERE image_id IN (SELECT id FROM images WHERE {sql})"
        return chosen, {"atlas": atlas, "level": level, **params}

    def selection_members(self, atlas: str, level: int, cells: list[tuple[int, int]], where: "ImageFilter", *,
                          limit: int, offset: int = 0) -> list[dict]:
        """One page of the images (kept by ``where``) with on-atlas activations in any of ``cells``,
        most typical first (smallest cosine distance of an activation to its cell's mean), each
        with its positions in those cells. As in :meth:`cell_members`, only the ``(limit +
        offset) × K`` most typical activations are ranked: they hold every image of the page."""
        if not self._placements_exist() or not cells:
            return []
        chosen, values = self._selection(atlas, level, cells, where)
        per_image = int(self.meta().get("samples_per_image") or 1)
        values.update(rows=(int(limit) + int(offset)) * per_image, limit=int(limit), offset=int(offset))
        query = f"""
            WITH chosen AS ({chosen}),
                 best AS (SELECT image_id, min(cell_distance) AS cell_distance
                          FROM (SELECT * FROM chosen ORDER BY cell_distance, image_id LIMIT $rows)
                          GROUP BY image_id ORDER BY cell_distance, image_id LIMIT $limit OFFSET $offset)
            SELECT b.image_id, b.cell_distance, count(*) AS activations,
                   list(struct_pack(k := c.k, y := c.y, x := c.x, i := c.i, j := c.j,
                                    cell_distance := c.cell_distance) ORDER BY c.cell_distance, c.k) AS positions,
                   any_value(im.path) AS path
            FROM best b JOIN chosen c ON c.image_id = b.image_id JOIN images im ON im.id = b.image_id
            GROUP BY b.image_id, b.cell_distance ORDER BY b.cell_distance, b.image_id"""
        return _dicts(self.con.execute(query, values))

    def selection_totals(self, atlas: str, level: int, cells: list[tuple[int, int]],
                         where: "ImageFilter") -> tuple[int, int]:
        """How many images (kept by ``where``) have on-atlas activations in any of ``cells``, and
        their files' bytes together."""
        if not self._placements_exist() or not cells:
            return 0, 0
        chosen, values = self._selection(atlas, level, cells, where)
        images, size = self.con.execute(
            f"SELECT count(*), coalesce(sum(im.bytes), 0) FROM (SELECT DISTINCT image_id FROM ({chosen})) s "
            f"JOIN images im ON im.id = s.image_id", values).fetchone()
        return int(images), int(size)

    def cell_totals(self, atlas: str, level: int) -> dict[tuple[int, int], tuple[int, int]]:
        """Per cell (i, j) of ``level``: what :meth:`selection_totals` gives for that cell alone
        (distinct images with an on-atlas activation there, their files' bytes), all cells in one query."""
        if not self._placements_exist():
            return {}
        rows = self.con.execute(
            "SELECT s.i, s.j, count(*), coalesce(sum(im.bytes), 0) FROM (SELECT DISTINCT i, j, image_id "
            "FROM placements WHERE atlas = ? AND level = ? AND NOT off_atlas AND i IS NOT NULL) s "
            "JOIN images im ON im.id = s.image_id GROUP BY s.i, s.j", [atlas, level]).fetchall()
        return {(int(i), int(j)): (int(n), int(b)) for i, j, n, b in rows}

    def selection_files(self, atlas: str, level: int, cells: list[tuple[int, int]],
                        where: "ImageFilter") -> list[dict]:
        """Every image (kept by ``where``) with an on-atlas activation in any of ``cells``:
        ``image_id, path, bytes``, most typical first (as :meth:`selection_members`, without positions)."""
        if not self._placements_exist() or not cells:
            return []
        chosen, values = self._selection(atlas, level, cells, where)
        return _dicts(self.con.execute(
            f"SELECT s.image_id, im.path, im.bytes FROM (SELECT image_id, min(cell_distance) AS d FROM ({chosen}) "
            f"GROUP BY image_id) s JOIN images im ON im.id = s.image_id ORDER BY s.d, s.image_id", values))

    def top_predictions(self, where: "ImageFilter", n: int = 10) -> list[tuple[int, int]]:
        """The ``n`` most frequent top-1 predicted classes among the images ``where`` keeps, with counts."""
        sql, params = where.sql()
        return [(int(c), int(k)) for c, k in self.con.execute(
            f"SELECT top5_class[1] AS c, count(*) AS n FROM images WHERE {sql} AND top5_class[1] IS NOT NULL "
            f"GROUP BY c ORDER BY n DESC, c LIMIT {int(n)}", params).fetchall()]

    def off_atlas_images(self, atlas: str, level: int, where: "ImageFilter", limit: int = 12) -> list[dict]:
        """Images (kept by ``where``) with off-atlas activations, those with the largest share first."""
        if not self._placements_exist():
            return []
        sql, params = where.sql()
        return _dicts(self.con.execute(
            f"SELECT image_id, path, off AS off_atlas, n AS activations FROM ("
            f"SELECT p.image_id, any_value(im.path) AS path, count(*) FILTER (WHERE p.off_atlas) AS off, "
            f"count(*) AS n FROM placements p JOIN images im ON im.id = p.image_id "
            f"WHERE p.atlas = $atlas AND p.level = $level AND p.image_id IN (SELECT id FROM images WHERE {sql}) "
            f"GROUP BY p.image_id) WHERE off > 0 ORDER BY off / n DESC, off DESC, image_id LIMIT {int(limit)}",
            {"atlas": atlas, "level": level, **params}))

    def _insert(self, table: str, columns: "dict[str, list] | pa.Table") -> None:
        frame = columns if isinstance(columns, pa.Table) else pa.table(columns)
        self.con.register("incoming", frame)
        try:
            names = ", ".join(frame.column_names)
            self.con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming")
        finally:
            self.con.unregister("incoming")

    def _write_shard(self, shard: int, chunk: Chunk) -> None:
        final = self.folder / "shards" / f"{shard:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "pooled.npy", np.ascontiguousarray(chunk.pooled, dtype=np.float32))
        for layer, acts in chunk.activations.items():
            np.save(tmp / f"{layer}.act.npy", np.ascontiguousarray(acts, dtype=np.float16))
        for layer, attrs in chunk.attributions.items():
            np.save(tmp / f"{layer}.attr.npy", np.ascontiguousarray(attrs, dtype=np.float16))
        tmp.rename(final)

    # ------------------------------------------------------------------ reading
    def count(self, table: str = "images") -> int:
        if table not in ("images", "samples", "errors"):
            raise ValueError(table)
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def count_samples(self, layer: str) -> int:
        return self.con.execute("SELECT count(*) FROM samples WHERE layer = ?", [layer]).fetchone()[0]

    def image_ids(self) -> np.ndarray:
        return self.con.execute("SELECT id FROM images ORDER BY id").fetchnumpy()["id"].astype(np.int64)

    def images(self, ids: list[int] | None = None) -> list[dict]:
        """Image rows (all, or the given ids in that order)."""
        query = ("SELECT id, path, bytes, mtime, width, height, hash, top5_class, top5_prob "
                 "FROM images")
        if ids is None:
            cur = self.con.execute(query + " ORDER BY id")
        else:
            cur = self.con.execute(query + " WHERE id IN (SELECT unnest(?))", [list(map(int, ids))])
        rows = {r["id"]: r for r in _dicts(cur)}
        return list(rows.values()) if ids is None else [rows[i] for i in map(int, ids) if i in rows]

    def find_path(self, path: str) -> int | None:
        row = self.con.execute("SELECT id FROM images WHERE path = ?", [path]).fetchone()
        return row[0] if row else None

    def errors(self) -> list[tuple[str, str]]:
        return self.con.execute("SELECT path, reason FROM errors ORDER BY path").fetchall()

    def pooled(self, ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every indexed image (or of ``ids``), in id order."""
        query = "SELECT id, shard, row FROM images"
        if ids is None:
            rows = self.con.execute(query + " ORDER BY id").fetchnumpy()
        else:
            rows = self.con.execute(query + " WHERE id IN (SELECT unnest(?)) ORDER BY id",
                                    [list(map(int, ids))]).fetchnumpy()
        vectors = self._gather(rows["shard"], rows["row"], "pooled.npy", np.float32)
        return rows["id"].astype(np.int64), vectors

    def samples(self, layer: str, *, attributions: bool = False) -> dict[str, np.ndarray]:
        """All sampled activations of ``layer``: image_id, k, y, x, activations (and attributions)."""
        rows = self.con.execute(
            "SELECT image_id, k, y, x, shard, row FROM samples WHERE layer = ? ORDER BY image_id, k",
            [layer]).fetchnumpy()
        out = {key: rows[key] for key in ("image_id", "k", "y", "x")}
        out["activations"] = self._gather(rows["shard"], rows["row"], f"{layer}.act.npy", np.float16)
        if attributions:
            out["attributions"] = self._gather(rows["shard"], rows["row"], f"{layer}.attr.npy", np.float16)
        return out

    def _gather(self, shards: np.ndarray, rows: np.ndarray, filename: str, dtype) -> np.ndarray:
        """Rows of per-shard arrays, memory-mapped, concatenated in the order given."""
        shards = np.asarray(shards)
        rows = np.asarray(rows)
        if len(shards) == 0:
            return np.zeros((0, 0), dtype)
        out = None
        for shard in np.unique(shards):
            path = self.folder / "shards" / f"{int(shard):06d}" / filename
            if not path.is_file() and filename.endswith(".attr.npy") and not self.meta().get("attributions"):
                raise IncompatibleError(f"index {self.folder.name!r} was built without attributions; "
                                        f"build another with --attributions")
            where = np.flatnonzero(shards == shard)
            array = self._open_array(path, int(rows[where].max()) + 1)
            if out is None:
                out = np.empty((len(rows), array.shape[1]), dtype)
            out[where] = array[rows[where]]
        return out

    def _open_array(self, path: Path, rows: int) -> np.ndarray:
        """A shard array memory-mapped, or :class:`DamagedError` when it is missing, unreadable or
        shorter than the rows the database points to."""
        try:
            array = np.load(path, mmap_mode="r")
            problem = None if array.ndim == 2 and len(array) >= rows else f"holds {array.shape}, needs {rows} rows"
        except FileNotFoundError:
            problem = "is missing"
        except (OSError, ValueError, EOFError) as exc:
            problem = f"cannot be read ({exc})"
        if problem:
            raise DamagedError(f"{path} {problem}: index {self.folder.name!r} is damaged; run `atlasq index "
                               f"{self.meta().get('root') or 'DIR'} --name {self.folder.name}` to repair it")
        return array

    # ------------------------------------------------------------------ verification and repair
    def verify_shards(self) -> dict[int, str]:
        """shard id → what is wrong with it, for every committed shard whose arrays do not match
        the database (folder or file missing, unreadable, too few rows, another width).

        Only array headers are read (memory-mapped), so this is cheap enough for every run and
        every ``info``.
        """
        meta = self.meta()
        dims = meta.get("layer_dims") or {}
        files = {"pooled.npy": None}
        for layer in meta.get("layers") or ():
            files[f"{layer}.act.npy"] = layer
            if meta.get("attributions"):
                files[f"{layer}.attr.npy"] = layer
        needed = {}  # (shard, file) → rows the database points to
        for shard, rows in self.con.execute("SELECT shard, max(row) + 1 FROM images GROUP BY shard").fetchall():
            needed[(int(shard), "pooled.npy")] = int(rows)
        for shard, layer, rows in self.con.execute(
                "SELECT shard, layer, max(row) + 1 FROM samples GROUP BY shard, layer").fetchall():
            for name, of in files.items():
                if of == layer:
                    needed[(int(shard), name)] = int(rows)
        recorded = dict(self.con.execute("SELECT id, images FROM shards").fetchall())
        problems: dict[int, str] = {}
        for (shard, name), rows in sorted(needed.items()):
            if shard in problems:
                continue
            folder = self.folder / "shards" / f"{shard:06d}"
            if not folder.is_dir():
                problems[shard] = "shard folder missing"
                continue
            try:
                array = np.load(folder / name, mmap_mode="r")
            except FileNotFoundError:
                problems[shard] = f"{name} missing"
                continue
            except (OSError, ValueError, EOFError):
                problems[shard] = f"{name} unreadable"
                continue
            width = dims.get(files[name]) if name.endswith(".act.npy") else None
            if array.ndim != 2 or len(array) < rows or (name == "pooled.npy" and len(array) != recorded.get(shard)):
                problems[shard] = f"{name} holds {array.shape[0] if array.ndim else 0} rows, the database {rows}"
            elif width is not None and array.shape[1] != width:
                problems[shard] = f"{name} is {array.shape[1]} wide, the layer {width}"
        return problems

    def forget_shards(self, shards: list[int]) -> int:
        """Forget every image (with its samples) stored in ``shards`` and delete their folders, so
        the next plan sees those files as new and embeds them again; return how many images."""
        if not shards:
            return 0
        shards = list(map(int, shards))
        n = self.con.execute("SELECT count(*) FROM images WHERE shard IN (SELECT unnest(?))", [shards]).fetchone()[0]
        with self._transaction():
            self.con.execute("DELETE FROM samples WHERE image_id IN "
                             "(SELECT id FROM images WHERE shard IN (SELECT unnest($s)))", {"s": shards})
            self.con.execute("DELETE FROM images WHERE shard IN (SELECT unnest(?))", [shards])
            self.con.execute("DELETE FROM shards WHERE id IN (SELECT unnest(?))", [shards])
        for shard in shards:
            shutil.rmtree(self.folder / "shards" / f"{shard:06d}", ignore_errors=True)
        return int(n)

    # ------------------------------------------------------------------ FAISS
    def ids_digest(self, ids: np.ndarray | None = None) -> str:
        ids = self.image_ids() if ids is None else np.sort(np.asarray(ids, np.int64))
        return hashlib.sha1(ids.tobytes()).hexdigest()

    def faiss_path(self, kind: str) -> Path:
        return self.folder / ("pooled.faiss" if kind == "exact" else f"pooled.{kind}.faiss")

    def faiss_is_current(self, kind: str) -> bool:
        return self.faiss_state(kind) == "current"

    def faiss_state(self, kind: str) -> str:
        """``current``, ``missing`` (file or record), ``stale`` (its ids are not DuckDB's: a run
        stopped before rewriting it) or ``damaged`` (torn record, or not the size recorded).

        Cheap (no FAISS load), so ``info`` can ask; a file of the right size but garbage content
        is caught by :meth:`load_faiss`, which every user of the file goes through.
        """
        path = self.faiss_path(kind)
        info = path.with_suffix(".faiss.json")
        if not path.is_file() or not info.is_file():
            return "missing"
        try:
            record = json.loads(info.read_text())
            recorded, size = record.get("ids_sha1"), record.get("bytes")
        except (ValueError, AttributeError):  # torn or foreign record: rebuild
            return "damaged"
        if recorded != self.ids_digest() or size is None:  # no size: a record from before sizes were kept
            return "stale"
        return "current" if size == path.stat().st_size else "damaged"

    def save_faiss(self, index, kind: str, ids: np.ndarray, extra: dict | None = None) -> Path:
        """Write a FAISS index atomically, with a record of which ids it holds."""
        import faiss

        path = self.faiss_path(kind)
        with replaced(path) as tmp:
            faiss.write_index(index, str(tmp))
        info = {"ids_sha1": self.ids_digest(ids), "count": int(len(ids)), "bytes": path.stat().st_size,
                "kind": kind, **(extra or {})}
        with replaced(path.with_suffix(".faiss.json")) as tmp:
            tmp.write_text(json.dumps(info))
        return path

    def load_faiss(self, kind: str):
        """The FAISS index on disk, or :class:`DamagedError` when it cannot be read or does not
        hold as many vectors as its record says (callers rebuild it from the shards)."""
        import faiss

        path = self.faiss_path(kind)
        try:
            index = faiss.read_index(str(path))
            count = json.loads(path.with_suffix(".faiss.json").read_text()).get("count")
        except (RuntimeError, OSError, ValueError, AttributeError) as exc:
            raise DamagedError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
        if index.ntotal != count:
            raise DamagedError(f"{path} holds {index.ntotal} vectors, its record {count}")
        return index


def _is_lock_conflict(exc: Exception) -> bool:
    """Whether DuckDB refused a file because another process holds it (as opposed to damage)."""
    text = str(exc).lower()  # DuckDB: 'Could not set lock on file "…": Conflicting lock is held in … (PID n)'
    return "could not set lock" in text or "conflicting lock" in text


def _holder(exc: Exception) -> str:
    """The holder as DuckDB names it ("Conflicting lock is held in … (PID n)"), else a plain phrase."""
    text = str(exc)
    at = text.find("PID ")
    return f"pid {text[at + 4:].split(')')[0]}" if at >= 0 else "another process"


def _owner(folder: Path) -> str:
    """Who holds an index's writer lock, from the record it wrote."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        return f"pid {owner['pid']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def _damaged_database(db: Path, exc: Exception) -> DamagedError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DamagedError(f"{db} cannot be read as an index database ({first}). Move the index folder "
                        f"aside and build it again with `atlasq index DIR --name {db.parent.name}`")


@dataclass(frozen=True)
class ImageFilter:
    """Which images of an index a view counts and shows: those whose top-1 predicted class is one
    of ``classes`` (all when empty) and whose path matches ``pattern`` (a glob such as
    ``*/cat_*.jpg`` when it holds ``*``, ``?`` or ``[``, else a case-insensitive substring)."""

    classes: tuple[int, ...] = ()
    pattern: str = ""

    @property
    def everything(self) -> bool:
        return not self.classes and not self.pattern

    def sql(self) -> tuple[str, dict]:
        """A condition on table ``images`` and its parameters."""
        parts, params = ["TRUE"], {}
        if self.classes:
            parts.append("top5_class[1] IN (SELECT unnest($classes))")
            params["classes"] = [int(c) for c in self.classes]
        if self.pattern:
            glob = any(ch in self.pattern for ch in "*?[")
            parts.append("path GLOB $pattern" if glob else "contains(lower(path), lower($pattern))")
            params["pattern"] = self.pattern
        return " AND ".join(parts), params


def _dicts(cursor) -> list[dict]:
    """A DuckDB result as one dict per row, keyed by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _sample_rows(samples: dict[str, list]) -> list[int]:
    """Row of each sample in its layer's array: samples of a layer are stored in commit order."""
    counters: dict[str, int] = {}
    rows = []
    for layer in samples["layer"]:
        rows.append(counters.get(layer, 0))
        counters[layer] = rows[-1] + 1
    return rows
