"""The home folder: where indexes, atlases and comparisons live, and the names they may take.

Layout of a home (``--home``, ``$ATLASQ_HOME`` or ``./indexes``)::

    .atlasq-home            marker: this folder is an atlasq home (the scanner never indexes it)
    <index>/                one folder per index (see :mod:`atlasq.store`)
    atlases/<atlas>/        one folder per atlas (see :mod:`atlasq.atlasdir`)
    comparisons/<atlas>/<a>__<b>/   what ``atlasq compare`` writes by default

Indexes sit directly under the home, so the names of the home's own folders (:data:`RESERVED`)
are refused as index names: an index called ``atlases`` would otherwise share its folder with
every atlas. Every folder name here is a plain name checked by :func:`check_name`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .errors import InvalidOptionError

__all__ = ["HOME_MARKER", "RESERVED", "default_home", "check_name", "index_folder", "atlas_folder",
           "comparison_folder", "scratch_folder", "mark_home", "is_home"]

HOME_MARKER = ".atlasq-home"
ATLASES = "atlases"
COMPARISONS = "comparisons"
SCRATCH = "tmp"
# Folders a home keeps for itself, and names kept free for later ones.
RESERVED = frozenset({ATLASES, COMPARISONS, SCRATCH, "cache", "exports", "indexes"})
_MAX_NAME = 128


def default_home() -> Path:
    """``$ATLASQ_HOME`` or ``./indexes``."""
    return Path(os.environ.get("ATLASQ_HOME") or "indexes")


def check_name(name: str, what: str = "index") -> str:
    """Return ``name`` if it can name a folder of the home, else raise :class:`InvalidOptionError`.

    A name is plain (no slash, not hidden, no control characters, at most 128 characters) so it
    stays inside its namespace; index names may not be one of :data:`RESERVED`.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidOptionError(f"{what} name must not be empty")
    if ("/" in name or "\\" in name or name.startswith(".") or len(name) > _MAX_NAME
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)):
        raise InvalidOptionError(f"{what} name {name!r} must be a plain name: no slashes, not hidden, no control "
                                 f"characters, at most {_MAX_NAME} characters")
    if what == "index" and name.lower() in RESERVED:
        raise InvalidOptionError(f"{name!r} is reserved for atlasq's own folders in the home "
                                 f"({', '.join(sorted(RESERVED))}); choose another index name")
    return name


def index_folder(name: str, home: Path | None = None) -> Path:
    """The folder of index ``name``."""
    return Path(home or default_home()) / check_name(name, "index")


def atlas_folder(name: str, home: Path | None = None) -> Path:
    """The folder of atlas ``name``."""
    return Path(home or default_home()) / ATLASES / check_name(name, "atlas")


def scratch_folder(home: Path | None = None) -> Path:
    """Where work in progress lives until it is complete and renamed into place (an atlas being
    imported), on the home's filesystem so the rename is atomic."""
    return Path(home or default_home()) / SCRATCH


def comparison_folder(atlas: str, index_a: str, index_b: str, home: Path | None = None) -> Path:
    """Where ``atlasq compare`` writes the comparison of two indexes on an atlas by default."""
    return (Path(home or default_home()) / COMPARISONS / check_name(atlas, "atlas")
            / f"{check_name(index_a)}__{check_name(index_b)}")


def mark_home(home: Path) -> None:
    """Create ``home`` if needed and leave the marker that tells the scanner to skip it."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    marker = home / HOME_MARKER
    if not marker.exists():
        marker.write_text("This folder is an atlasq home: indexes, atlases and comparisons. "
                          "`atlasq index` never indexes it.\n")


# A home written before homes carried the marker is recognised by an atlas in it: that layout
# (atlases/<name>/manifest.json) is fixed for such homes, whatever later formats call their files.
_UNMARKED_HOME_ATLASES = os.path.join(ATLASES, "*", "manifest.json")


def is_home(folder: Path | str) -> bool:
    """Whether ``folder`` is an atlasq home: it holds the marker, or (a home from before the
    marker) an atlas."""
    folder = os.fspath(folder)
    return (os.path.isfile(os.path.join(folder, HOME_MARKER))
            or bool(glob.glob(os.path.join(glob.escape(folder), _UNMARKED_HOME_ATLASES))))
