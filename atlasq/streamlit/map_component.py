"""The zoomable atlas map: a Streamlit component that draws an atlas's icons and zooms across its levels.

    import atlasq.streamlit as aq

    state = aq.atlas_map(atlas, {20: overlay_20, 40: overlay_40})
    if state.clicked:
        level, i, j = state.clicked

Everything the eye follows (zoom, pan, hover, the level switch) happens in the browser. A click, a
selection change or Escape sends the view and the selection back to Python (one rerun); so does
the view alone once it has rested (``VIEW_REST_MS`` after the last wheel, drag, pinch or key), so
that a page can keep it (in the URL, say). Put the map in an ``st.fragment`` to keep those view
reports cheap: they then rerun the fragment only. Zooming in moves to finer grid levels as the
Distill viewer does: the finest level whose icons are still drawn at least ``MIN_ICON_PX`` wide
is shown.

What travels to the browser, and how often:

- one mosaic picture per level (the atlas's own, downscaled so a tile is at most ``TILE_PX``) and
  one JSON file per level (cells, counts, labels), both registered with Streamlit's media store
  under a name made from their content. The page's script loads each URL once and keeps it (a
  level's mosaic only when the zoom comes near that level), so a rerun that changes nothing
  re-sends only those URLs (about 1 kB), not pictures or cells (``bench/atlas_map.py``);
- the view to restore (``state``) and the drawing options.

Why a custom component rather than pydeck or a chart: the map needs per-cell drawing that depends
on the zoom (icon crop, count badges, labels only where there is room), a level switch without a
rerun, shift-click and box selection, and a fullscreen mode whose clicks land where the picture
is. A small canvas script does all of that in one place, without an npm build and without
downloading anything at run time; ``st.components.v2`` mounts it in the page (no iframe), so
fullscreen and keyboard focus behave like any element's.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from ..appdata import CellOverlay
    from ..atlas import Atlas

__all__ = ["MapState", "atlas_map", "OVERLAY_STYLES", "MIN_ICON_PX", "map_payload"]

FRONTEND = Path(__file__).with_name("frontend")
#: An icon is never drawn smaller than this on screen once the map can zoom to a finer level.
MIN_ICON_PX = 48
#: Tiles of the mosaics sent to the browser are at most this many pixels wide (the atlas's icons
#: are ~80 px; more would only cost bytes, since the map switches to a finer level long before).
TILE_PX = 96
#: How counts are drawn: a count badge and bar per cell, a heat layer over the icons, icons faded
#: by value (the class view), or icons alone.
OVERLAY_STYLES = ("badge", "heat", "fade", "off")
#: Top classes shown per cell (only those with positive attribution).
TOP_CLASSES = 3
#: The browser reports a new view (zoom, centre) this many milliseconds after the user's last zoom
#: or pan (the same figure is in frontend/atlas_map.js).
VIEW_REST_MS = 400


@dataclass(frozen=True)
class MapState:
    """The map's view and selection, as returned by :func:`atlas_map` (and given back to restore it).

    level : the grid size whose icons are drawn now (one of ``atlas.levels``).
    zoom : 1.0 shows the whole atlas; 2.0 shows a quarter of it.
    center : the view's centre in layout units, (x, y) in [0, 1], x to the right, y downwards
        (cell (i, j) of a G×G level spans x in [j/G, (j+1)/G] and y in [i/G, (i+1)/G]).
    selected : the selected cells as (level, i, j), i = row, j = column, as in ``atlas.cells_at``.
    clicked : the cell of the latest plain click (None before the first).
    """

    level: int
    zoom: float = 1.0
    center: tuple[float, float] = (0.5, 0.5)
    selected: tuple[tuple[int, int, int], ...] = ()
    clicked: tuple[int, int, int] | None = None

    def to_dict(self) -> dict:
        return {"level": self.level, "zoom": self.zoom, "center": list(self.center),
                "selected": [list(c) for c in self.selected], "clicked": list(self.clicked) if self.clicked else None}

    @classmethod
    def from_dict(cls, value: Mapping) -> "MapState":
        """The state ``to_dict`` wrote (or the browser sent); zoom and centre are brought into range
        (a link may carry anything). Raises ``InvalidOptionError`` for what is not a state at all."""
        try:
            clicked = value.get("clicked")
            zoom = float(value.get("zoom", 1.0))
            x, y = (float(c) for c in value.get("center", (0.5, 0.5)))
            selected = tuple(_cell(c) for c in value.get("selected") or ())
            return cls(level=int(value["level"]), zoom=max(zoom, 1.0) if math.isfinite(zoom) else 1.0,
                       center=tuple(min(max(c, 0.0), 1.0) if math.isfinite(c) else 0.5 for c in (x, y)),
                       selected=selected, clicked=_cell(clicked) if clicked else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidOptionError(f"not a map state: {value!r} ({exc})") from exc


def _cell(value) -> tuple[int, int, int]:
    level, i, j = (int(v) for v in value)
    return level, i, j


# ----------------------------------------------------------------------------- what the browser gets

@functools.lru_cache(maxsize=16)
def _mosaic_jpeg(path: str, stamp: int, level: int) -> tuple[bytes, int]:
    """The mosaic at ``path`` as JPEG bytes with tiles at most ``TILE_PX`` wide, and that tile width.
    Kept per file version: encoding the 80×80 level takes a good fraction of a second."""
    with Image.open(path) as image:
        picture = image.convert("RGB")
    tile = picture.width // level
    if tile > TILE_PX:
        tile = TILE_PX
        picture = picture.resize((tile * level, tile * level), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue(), tile


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _level_cells(atlas: "Atlas", level: int, overlay: "CellOverlay | None") -> dict:
    """One level's cells for the browser, column-wise: position, reference count, the overlay's
    count, distinct images and value, and the top classes with positive attribution."""
    cells = atlas.cells_at(level)
    rows = {(c["i"], c["j"]): c for c in overlay.cells} if overlay is not None else {}
    out = {"size": level, "i": [], "j": [], "ref": [], "n": [], "images": [], "value": [], "top": []}
    for i, j, ref, labels, scores in zip(cells["i"], cells["j"], cells["count"], cells["top_labels"],
                                         cells["top_scores"]):
        row = rows.get((i, j), {})
        out["i"].append(int(i))
        out["j"].append(int(j))
        out["ref"].append(int(ref))
        # a kept cell the overlay does not list holds none of the dataset's activations
        out["n"].append(int(row.get("count", 0)) if overlay is not None else None)
        out["images"].append(int(row["images"]) if row.get("images") is not None else None)
        out["value"].append(_finite(row.get("value")) if overlay is not None else None)
        # only classes the cell pushes up are "top classes" (attribution can be negative)
        out["top"].append([[str(label), round(float(score), 4)] for label, score in zip(labels, scores)
                           if score is not None and score > 0][:TOP_CLASSES])
    if overlay is not None:
        out["overlay"] = {"legend": overlay.legend, "diverging": bool(overlay.diverging), "log": bool(overlay.log),
                          "opacity_only": bool(overlay.opacity_only),
                          "total": int(sum(n for n in out["n"] if n))}
    return out


def _media_url(data: bytes, mimetype: str, coordinates: str) -> str:
    """A URL under which Streamlit serves ``data`` during this run and the next (named by content,
    so the same bytes keep the same URL and the browser fetches them once)."""
    from streamlit.runtime import Runtime

    if Runtime.exists():
        return Runtime.instance().media_file_mgr.add(data, mimetype, coordinates)
    # no server (a bare script): inline the bytes
    import base64

    return f"data:{mimetype};base64," + base64.b64encode(data).decode()


def map_payload(atlas: "Atlas", overlays: Mapping[int, "CellOverlay"] | None = None, *, tiles: str = "icons",
                key: str = "atlas_map", register=_media_url) -> list[dict]:
    """Per level (coarse to fine): its grid size, the URL of its mosaic and tile width, and the URL
    of its cells (see :func:`_level_cells`). ``register(bytes, mimetype, name) -> url``."""
    levels = []
    for level in sorted(atlas.levels):
        path = atlas.tiles_path(level, tiles)
        jpeg, tile = _mosaic_jpeg(str(path), path.stat().st_mtime_ns, level)
        overlay = (overlays or {}).get(level)
        cells = json.dumps(_level_cells(atlas, level, overlay), separators=(",", ":")).encode()
        levels.append({"size": level, "tile": tile,
                       "mosaic": register(jpeg, "image/jpeg", f"{key}.mosaic.{level}"),
                       "cells": register(cells, "application/json", f"{key}.cells.{level}"),
                       "overlay": overlay is not None})
    return levels


# ----------------------------------------------------------------------------- the component

@functools.cache
def _component():
    import streamlit as st

    return st.components.v2.component("atlasq_atlas_map", js=(FRONTEND / "atlas_map.js").read_text(),
                                      css=(FRONTEND / "atlas_map.css").read_text())


def atlas_map(atlas: "Atlas", overlays: Mapping[int, "CellOverlay"] | None = None, *, tiles: str = "icons",
              state: MapState | None = None, overlay_style: str = "badge", heat_opacity: float = 0.5,
              height: int = 640, key: str = "atlas_map", report_view: bool = True) -> MapState:
    """Draw ``atlas`` as a zoomable map and return the current view and selection.

    overlays : per level, the values to show on its cells (:mod:`atlasq.appdata`'s ``overlay_*``);
        a level without one shows its icons alone.
    tiles : ``"icons"`` (feature visualizations) or ``"exemplars"`` (real image crops).
    state : a view to restore (e.g. from the URL); given again unchanged, it does not move the map,
        given changed (another selection, another level), the map shows it.
    overlay_style : how counts are drawn (:data:`OVERLAY_STYLES`): ``"badge"`` a count badge and a
        bar per cell, ``"heat"`` a colour layer at ``heat_opacity``, ``"fade"`` icons fade by value
        (always so for an ``opacity_only`` overlay, the class view), ``"off"`` icons alone. Cells
        the dataset does not reach are greyed and marked 0 in every style but "off".
    height : of the map in pixels (its width follows its container); below ``MIN_ICON_PX`` × the
        coarsest grid size, that level's icons are smaller than 48 px until one zooms in.
    key : one per map, and best one per atlas: the view and selection are kept under it.
    report_view : send the view (level, zoom, centre) back once it rests after a zoom or pan (one
        rerun, of the fragment the map is in, if any); without it only clicks and selections do.
        ``st.session_state[key]["view"]["kind"]`` says which it was: ``"view"`` or ``"select"``.

    Mouse wheel, pinch or +/− zoom, drag or the arrow keys pan, 0 resets; a click selects a cell,
    shift-click adds or removes one, shift-drag selects the cells in a box, Escape clears.

    In Streamlit's AppTest (no browser), a click is what the browser would send: set
    ``at.session_state[key] = {"view": {**MapState(...).to_dict(), "seq": n}}`` (a new ``n`` per
    click) and run.
    """
    if overlay_style not in OVERLAY_STYLES:
        raise InvalidOptionError(f"overlay_style must be one of {', '.join(OVERLAY_STYLES)}, not {overlay_style!r}")
    if tiles not in ("icons", "exemplars"):
        raise InvalidOptionError(f"tiles must be 'icons' or 'exemplars', not {tiles!r}")
    levels = sorted(atlas.levels)
    given = state.to_dict() if state is not None else None
    data = {"levels": map_payload(atlas, overlays, tiles=tiles, key=key), "state": given,
            "overlay_style": overlay_style, "heat_opacity": float(min(max(heat_opacity, 0.0), 1.0)),
            "height": int(height), "min_icon_px": MIN_ICON_PX, "name": atlas.name,
            "report_view": bool(report_view)}
    result = _component()(key=key, data=data, default={"view": None}, height="content",
                          on_view_change=lambda: None)
    return _current_state(key, levels, given, result.get("view"))


def _current_state(key: str, levels: list[int], given: dict | None, sent: dict | None) -> MapState:
    """What :func:`atlas_map` returns: the browser's latest view when it sent a new one, else the
    ``state`` the caller gave when that changed, else what was returned last."""
    import streamlit as st

    memory = st.session_state.setdefault(f"_{key}_memory", {"seq": None, "given": None, "state": None})
    if sent and sent.get("seq") != memory["seq"]:
        current = sent
        memory["seq"] = sent.get("seq")
    elif given is not None and given != memory["given"]:
        current = given
    else:
        current = memory["state"] or given or {"level": levels[0]}
    memory["given"], memory["state"] = given, current
    state = MapState.from_dict(current)
    if state.level not in levels:
        state = MapState(levels[0], state.zoom, state.center, state.selected, state.clicked)
    return state
