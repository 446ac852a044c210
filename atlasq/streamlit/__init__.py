"""Streamlit views of atlasq, for the bundled app and for people's own dashboards.

Each view is a function that draws into the current Streamlit container and returns what the
user chose (a selection, a cell), so a dashboard can combine them with its own widgets::

    import atlasq.streamlit as aq

    state = aq.atlas_map(atlas, overlays)
    aq.cell_gallery(atlas, "photos", state.selected)

Names are loaded on first use, so importing this package costs nothing until a view is drawn.
"""

from __future__ import annotations

import importlib

# public name -> module (inside this package) that defines it; a module never shares a public
# name (importing atlasq.streamlit.X makes X the package's attribute, hiding the function X)
_VIEWS = {
    "MapState": "map_component",
    "atlas_map": "map_component",
    "concept_histogram": "views",
    "cell_gallery": "views",
    "dataset_summary": "views",
    "inspect_view": "inspection",
    "layers_view": "analysis_views",
    "two_class_caption": "analysis_views",
}

__all__ = sorted(_VIEWS)


def __getattr__(name: str):
    module = _VIEWS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # loaded once; later uses find it without this function
    return value
