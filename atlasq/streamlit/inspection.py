"""The "Inspect" view: the Building Blocks interface for one image (see :mod:`atlasq.blocks`).

``inspect_view(index, image)`` draws, in the current Streamlit container, a few controls (neuron
groups, classes), the interface picture and its numbers, and returns the inspection's summary
(what ``atlasq inspect --json`` prints). Icons already in the home's cache are shown at once;
those missing are drawn blank until the user asks for them to be rendered (once; then cached).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

__all__ = ["inspect_view"]


@st.cache_resource(show_spinner=False, max_entries=8)
def _inspection(index: str, image: str, atlas: str | None, home: str | None, layer: str | None,
                groups: int, classes: tuple[str, ...], render: bool):
    from ..blocks import inspect_indexed

    result = inspect_indexed(image, index, home=Path(home) if home else None, atlas=atlas, layer=layer,
                             groups=groups, classes=classes or None, render=render)
    return result, result.picture()


def inspect_view(index: str, image: str | int, *, atlas: str | None = None, home: Path | None = None,
                 layer: str | None = None, key: str = "inspect") -> dict | None:
    """Draw the interface for ``image`` (an id or path of index ``index``, or an image file) with the
    index's network, on ``atlas`` when given, at ``layer``. Returns the summary, or None when the
    image cannot be inspected (the reason is shown)."""
    from ..errors import AtlasqError

    left, right, third = st.columns([1, 2, 1])
    groups = left.slider("Neuron groups", 2, 10, 6, key=f"{key}-groups")
    names = right.text_input("Classes (comma-separated; empty: the top 3)", "", key=f"{key}-classes")
    classes = tuple(c.strip() for c in names.split(",") if c.strip())
    render = third.toggle("Render missing icons", False, key=f"{key}-render",
                          help="Feature visualizations not yet in the cache take a while to render, once.")
    try:
        with st.spinner("Inspecting…"):
            result, picture = _inspection(index, str(image), atlas, str(home) if home else None, layer,
                                          groups, classes, render)
    except AtlasqError as exc:
        st.error(str(exc))
        return None
    summary = result.to_dict()
    st.image(picture,
             caption=f"{summary['layer']}: activation grid, spatial attribution, channel attribution, neuron groups")
    if summary["icons"]["rendered"] == 0 and not render and _missing(result):
        st.caption("Some icons are not cached yet and are drawn blank: switch on “Render missing icons”.")
    with st.expander("Numbers"):
        st.dataframe([{"class": c["class"], "probability": c["probability"], "attribution": c["attribution_total"],
                       "top channels": ", ".join(str(t["channel"]) for t in c["top_channels"])}
                      for c in summary["classes"]], hide_index=True)
        st.dataframe([{"group": g["group"], "share of activation": g["activation_share"], **g["attribution"]}
                      for g in summary["groups"]], hide_index=True)
        if "activation_grid" in summary:
            st.write(summary["activation_grid"])
    return summary


def _missing(result) -> bool:
    icons = list(result.group_icons or []) + [i for row in (result.channel_icons or []) for i in row]
    if result.atlas is None:
        icons += list(result.grid_icons or [])
    return any(icon is None for icon in icons)
