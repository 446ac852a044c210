"""The atlas folder: the one place that knows its file names, writes them and reads them back.

:class:`AtlasFolder` is to an atlas what :class:`atlasq.store.IndexStore` is to an index. Every
file of an atlas is named here, written atomically (:func:`atlasq.fileio.replaced`: a reader or
a resumed build never sees half a file) and read back here. Layout::

    <home>/atlases/<name>/
        build.json           the parameters of a build in progress (gone once it is finished)
        manifest.json        written last: its presence means the atlas is complete; carries the
                             folder's format version (see FORMAT)
        cells.parquet        one row per kept cell and level
        reference.parquet    one row per reference activation: image, k, y, x, position, cell per level
        activations.npy      (N, C) float16 reference activations, rows as in reference.parquet
        positions.npy        (N, 2) float32 positions in [0, 1]² (x, y)
        whitening.npy        (C, C) float32, when icons were rendered with --whiten
        icons/<G>/<i>_<j>.png  one icon per kept cell; icons/record.npz: their objectives
        mosaic_<G>.png       icons on the grid (empty cells blank)
        exemplars_<G>.png    the best exemplar's image crop on the grid
        attributions_<G>.npy (cells, classes) float16 mean attribution per kept cell
        placement.json/.faiss  written by the first `atlasq histogram`: the reference search
                             index and the off-atlas threshold

Completeness: a folder with ``manifest.json`` is a finished atlas; one with only ``build.json``
is a build that stopped and resumes when run again with the same parameters. A folder holding
neither is not an atlas, and :meth:`AtlasFolder.remove` refuses to delete it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .errors import AtlasqError, DamagedError, IncompatibleError, InvalidOptionError, NotFoundError
from .fileio import replaced
from .home import ATLASES, atlas_folder, default_home

__all__ = ["FORMAT", "AtlasError", "AtlasOptionError", "AtlasFolder", "list_atlases"]

# Version of the folder's format, written in the manifest. Raise it when a reader of the old
# version would misread the new folder; an atlas without the field is format 1.
FORMAT = 1

MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
CELLS = "cells.parquet"
REFERENCE = "reference.parquet"
ACTIVATIONS = "activations.npy"
POSITIONS = "positions.npy"
WHITENING = "whitening.npy"
ICONS = "icons"
ICON_RECORD = "record.npz"
PLACEMENT_RECORD = "placement.json"
PLACEMENT_INDEX = "placement.faiss"


class AtlasError(AtlasqError, ValueError):
    """An atlas cannot be built or read as asked (the message says what to do)."""


class AtlasOptionError(AtlasError, InvalidOptionError):
    """An atlas option has a value that cannot work (the message names it)."""


class AtlasFolder:
    """One atlas folder (finished, unfinished or not yet created)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    @classmethod
    def named(cls, name: str, home: Path | None = None) -> "AtlasFolder":
        """The folder of atlas ``name`` under ``home`` (the name is checked by :mod:`atlasq.home`)."""
        return cls(atlas_folder(name, home))

    @classmethod
    def find(cls, name_or_folder: str | Path, home: Path | None = None) -> "AtlasFolder":
        """An atlas by folder (when ``name_or_folder`` is one holding an atlas) or by name."""
        given = cls(name_or_folder)
        if given.looks_like_atlas() or "/" in str(name_or_folder):
            return given
        return cls.named(str(name_or_folder), home)

    @property
    def name(self) -> str:
        return self.folder.name

    def _path(self, name: str) -> Path:
        return self.folder / name

    # ------------------------------------------------------------------ state
    def is_complete(self) -> bool:
        return self._path(MANIFEST).is_file()

    def is_unfinished(self) -> bool:
        return not self.is_complete() and self._path(BUILD_RECORD).is_file()

    def looks_like_atlas(self) -> bool:
        """Holds a manifest or a build record: something atlasq made as an atlas."""
        return self.is_complete() or self._path(BUILD_RECORD).is_file()

    def modified(self) -> float:
        """When the atlas was last finished (the manifest's mtime; 0 when there is none): a stamp
        that changes when the atlas is rebuilt, for caches of loaded atlases."""
        try:
            return self._path(MANIFEST).stat().st_mtime
        except OSError:
            return 0.0

    def check_complete(self) -> None:
        """Raise :class:`NotFoundError` for no atlas, an :class:`AtlasqError` with the resume hint for
        an unfinished one."""
        if self.is_complete():
            return
        if self.is_unfinished():
            raise AtlasError(f"the atlas at {self.folder} is unfinished; run the same `atlasq atlas build` again to "
                             f"finish it (or pass --overwrite to start again)")
        raise NotFoundError(f"no atlas at {self.folder}; build one with `atlasq atlas build --index NAME "
                            f"--name {self.name}`")

    # ------------------------------------------------------------------ building: start, resume, finish
    def build_params(self) -> str | None:
        """The parameter hash of the build in progress (None when none is recorded)."""
        path = self._path(BUILD_RECORD)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text()).get("params_hash")
        except (ValueError, AttributeError):
            return None  # a torn record: a build of unknown parameters

    def check_start(self, params_hash: str, *, overwrite: bool) -> bool:
        """Whether a build of ``params_hash`` may start here, and if it resumes an unfinished build
        of the same parameters (True); raises what stands in the way. Writes nothing."""
        if not self.folder.exists():
            return False
        if not self.folder.is_dir():
            raise AtlasError(f"{self.folder} is a file, not an atlas folder; move it away or choose another name")
        holds_something = any(self.folder.iterdir())
        if overwrite:
            if holds_something and not self.looks_like_atlas():
                raise AtlasError(f"{self.folder} is not an atlas folder (no {MANIFEST} or {BUILD_RECORD}); "
                                 f"--overwrite only replaces atlases, so it is left as it is")
            return False
        if self.is_complete():
            raise AtlasError(f"atlas {self.name!r} already exists at {self.folder}; pass --overwrite to rebuild it")
        if self.build_params() == params_hash:
            return True
        if self.is_unfinished():
            raise AtlasError(f"{self.folder} holds an unfinished atlas built with other parameters; run that "
                             f"build again to finish it, or pass --overwrite to start again")
        if holds_something:
            raise AtlasError(f"{self.folder} exists and is not an atlas folder; move it away or choose "
                             f"another atlas name")
        return False

    def start(self, params_hash: str, *, resume: bool) -> None:
        """Begin writing a build that :meth:`check_start` allowed: an old atlas here (only with
        ``--overwrite``) is removed, the build record written first."""
        if resume:
            return
        if self.looks_like_atlas():
            self.remove()
        (self.folder / ICONS).mkdir(parents=True, exist_ok=True)
        self._write_bytes(BUILD_RECORD, json.dumps({"params_hash": params_hash}).encode())

    def remove(self) -> None:
        """Delete this atlas's folder, only if it is one (a manifest or a build record in it)."""
        if not self.folder.exists():
            return
        if not self.folder.is_dir() or self.folder.is_symlink() or not self.looks_like_atlas():
            raise AtlasError(f"{self.folder} is not an atlas folder (no {MANIFEST} or {BUILD_RECORD}); "
                             f"refusing to delete it")
        shutil.rmtree(self.folder)

    def finish(self, manifest: dict) -> None:
        """Write the manifest (with the format version) last, then drop the build record."""
        self._write_bytes(MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1).encode())
        self._path(BUILD_RECORD).unlink(missing_ok=True)

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict:
        """The manifest of a complete atlas; an atlas of a newer format is refused with what to do."""
        self.check_complete()
        try:
            manifest = json.loads(self._path(MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedError(f"{self._path(MANIFEST)} is damaged ({exc}); rebuild the atlas with "
                               f"`atlasq atlas build ... --overwrite`") from exc
        version = manifest.get("format", 1) if isinstance(manifest, dict) else None
        if not isinstance(version, int):
            raise DamagedError(f"{self._path(MANIFEST)} is not an atlas manifest; rebuild the atlas with "
                               f"`atlasq atlas build ... --overwrite`")
        if version > FORMAT:
            raise IncompatibleError(f"atlas {self.name!r} has format {version}, written by a newer atlasq; this "
                                    f"one reads format {FORMAT} and older. Upgrade atlasq, or rebuild the atlas "
                                    f"with this version (`atlasq atlas build ... --overwrite`)")
        return manifest

    # ------------------------------------------------------------------ tables and arrays
    def _write_bytes(self, name: str, data: bytes) -> Path:
        path = self._path(name)
        with replaced(path) as tmp:
            tmp.write_bytes(data)
        return path

    def _save_npy(self, name: str, array: np.ndarray) -> Path:
        path = self._path(name)
        with replaced(path) as tmp, open(tmp, "wb") as file:
            np.save(file, array)
        return path

    def _save_png(self, path: Path, image: np.ndarray | Image.Image) -> Path:
        with replaced(path) as tmp:
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp, format="PNG")
        return path

    def _write_parquet(self, name: str, table: pa.Table) -> Path:
        path = self._path(name)
        with replaced(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def write_cells(self, table: pa.Table) -> Path:
        return self._write_parquet(CELLS, table)

    def read_cells(self) -> pa.Table:
        return pq.read_table(self._path(CELLS))

    def write_reference(self, table: pa.Table) -> Path:
        return self._write_parquet(REFERENCE, table)

    def read_reference(self) -> pa.Table:
        return pq.read_table(self._path(REFERENCE))

    def has_layout(self) -> bool:
        return self._path(POSITIONS).is_file() and self._path(ACTIVATIONS).is_file()

    def save_layout(self, activations: np.ndarray, positions: np.ndarray) -> None:
        """The reference activations (float16) and their positions (float32); positions last, so
        their presence means both are there."""
        self._save_npy(ACTIVATIONS, np.asarray(activations, np.float16))
        self._save_npy(POSITIONS, np.asarray(positions, np.float32))

    def activations(self) -> np.ndarray:
        """(N, C) float16 reference activations, memory-mapped. A compact atlas (imported from an
        ``atlas export --compact`` file) has none: what needs them says so (:class:`AtlasError`)."""
        path = self._path(ACTIVATIONS)
        if not path.is_file() and self.is_compact():
            raise AtlasError(f"atlas {self.name!r} is compact: it was exported with --compact, which ships a "
                             f"compressed placement index instead of the raw reference activations. Placing "
                             f"datasets and the app work; what needs the raw activations (a new placement index, "
                             f"rebuilding) needs the full export (`atlasq atlas export` without --compact)")
        return np.load(path, mmap_mode="r")

    def is_compact(self) -> bool:
        """Whether this atlas came from a compact export (no raw reference activations)."""
        try:
            return bool(json.loads(self._path(MANIFEST).read_text()).get("compact"))
        except (OSError, ValueError, AttributeError):
            return False

    def positions(self) -> np.ndarray:
        return np.load(self._path(POSITIONS))

    def save_whitening(self, matrix: np.ndarray) -> Path:
        return self._save_npy(WHITENING, matrix)

    def save_attributions(self, level: int, mean_attribution: np.ndarray) -> Path:
        return self._save_npy(f"attributions_{level}.npy", np.asarray(mean_attribution, np.float16))

    def mean_attributions(self, level: int) -> np.ndarray | None:
        """(cells, classes) mean attributions of ``level`` (None for an atlas built before the file existed)."""
        path = self._path(f"attributions_{level}.npy")
        return np.load(path).astype(np.float32) if path.is_file() else None

    # ------------------------------------------------------------------ pictures
    def icon_name(self, level: int, i: int, j: int) -> str:
        """An icon's path relative to the folder (as the cells table records it)."""
        return f"{ICONS}/{int(level)}/{int(i)}_{int(j)}.png"

    def icon_path(self, level: int, i: int, j: int) -> Path:
        return self._path(self.icon_name(level, i, j))

    def save_icon(self, level: int, i: int, j: int, image: np.ndarray) -> Path:
        path = self.icon_path(level, i, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._save_png(path, image)

    def read_icon(self, level: int, i: int, j: int) -> np.ndarray:
        return np.asarray(Image.open(self.icon_path(level, i, j)).convert("RGB"))

    def mosaic_path(self, level: int) -> Path:
        return self._path(f"mosaic_{level}.png")

    def exemplars_path(self, level: int) -> Path:
        return self._path(f"exemplars_{level}.png")

    def save_mosaic(self, level: int, image: Image.Image) -> Path:
        return self._save_png(self.mosaic_path(level), image)

    def save_exemplars(self, level: int, image: Image.Image) -> Path:
        return self._save_png(self.exemplars_path(level), image)

    def tiles_path(self, level: int, tiles: str = "icons") -> Path:
        """The picture of ``level``'s grid: the icon mosaic (``tiles="icons"``, when the atlas has
        icons) or the exemplar crops."""
        mosaic = self.mosaic_path(level)
        return mosaic if tiles == "icons" and mosaic.is_file() else self.exemplars_path(level)

    # ------------------------------------------------------------------ icon record
    def load_icon_record(self) -> dict:
        """Per icon key ``"<G>/<i>_<j>"``: objective before and after optimisation, and the icon's
        centre activation."""
        path = self._path(ICONS) / ICON_RECORD
        if not path.is_file():
            return {}
        with np.load(path) as data:
            keys = [str(k) for k in data["keys"]]
            return {k: {"objective_start": float(a), "objective_end": float(b), "centre": c}
                    for k, a, b, c in zip(keys, data["start"], data["end"], data["centre"])}

    def save_icon_record(self, record: dict) -> None:
        keys = sorted(record)
        with replaced(self._path(ICONS) / ICON_RECORD) as tmp, open(tmp, "wb") as file:
            np.savez(file, keys=np.array(keys),
                     start=np.array([record[k]["objective_start"] for k in keys], np.float32),
                     end=np.array([record[k]["objective_end"] for k in keys], np.float32),
                     centre=np.stack([record[k]["centre"] for k in keys]))

    # ------------------------------------------------------------------ placement (written by atlasq.histogram)
    def placement_record(self) -> dict:
        """What the reference search recorded (empty before the first placing, or when torn)."""
        path = self._path(PLACEMENT_RECORD)
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def load_placement_index(self):
        """The saved FAISS index of the reference activations (None when there is none)."""
        import faiss

        path = self._path(PLACEMENT_INDEX)
        return faiss.read_index(str(path)) if path.is_file() else None

    def save_placement(self, index, record: dict) -> None:
        """The FAISS index first, then the record that vouches for it."""
        import faiss

        with replaced(self._path(PLACEMENT_INDEX)) as tmp:
            faiss.write_index(index, str(tmp))
        self._write_bytes(PLACEMENT_RECORD, json.dumps(record, indent=1).encode())

    def placement_is_current(self, manifest: dict) -> bool:
        """Whether the saved reference search belongs to this build of the atlas (``manifest``'s)."""
        record = self.placement_record()
        return (record.get("params_hash") == manifest.get("params_hash") and "threshold" in record
                and self._path(PLACEMENT_INDEX).is_file())

    def packed_files(self, *, activations: bool = True, placement: bool = True) -> list[str]:
        """Every file of this finished atlas that an export carries, as POSIX paths relative to the
        folder, sorted: all but the build record and temporary files; without the raw reference
        activations when ``activations`` is false, without the saved reference search when
        ``placement`` is false (or when it belongs to an older build)."""
        manifest = self.read_manifest()
        skip = {BUILD_RECORD}
        if not activations:
            skip.add(ACTIVATIONS)
        if not placement or not self.placement_is_current(manifest):
            skip |= {PLACEMENT_INDEX, PLACEMENT_RECORD}
        out = []
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder).as_posix()
            if path.is_file() and not path.is_symlink() and not path.name.endswith(".tmp") and relative not in skip:
                out.append(relative)
        return out

    @staticmethod
    def placement_names() -> tuple[str, str]:
        """(index file, record file) of the saved reference search, relative to the folder."""
        return PLACEMENT_INDEX, PLACEMENT_RECORD

    @staticmethod
    def manifest_name() -> str:
        return MANIFEST

    def files(self, levels: list[int], icons: bool) -> dict[str, str]:
        """The main files of a finished atlas, by role (what ``atlas build`` reports)."""
        out = {"manifest": str(self._path(MANIFEST)), "cells": str(self._path(CELLS)),
               "reference": str(self._path(REFERENCE))}
        for g in levels:
            out[f"exemplars_{g}"] = str(self.exemplars_path(g))
            if icons:
                out[f"mosaic_{g}"] = str(self.mosaic_path(g))
        return out


def list_atlases(home: Path | None = None) -> list[str]:
    """Names of the complete atlases under ``home`` (unfinished builds are left out)."""
    folder = Path(home or default_home()) / ATLASES
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and AtlasFolder(p).is_complete())
