"""Views of the analyses on top of the atlas: one image through every layer, and the caption of
a two-class comparison atlas.

    import atlasq.streamlit as aq

    aq.two_class_caption(atlas)          # "← A · B →" above a two-class atlas; nothing otherwise
    aq.layers_view("photos", image_id)   # the image's cells on each layer's atlas
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from PIL import Image, ImageDraw

from ..atlas import Atlas
from ..layers import LayerCells, atlases_by_layer, image_layer_cells

__all__ = ["two_class_caption", "two_class_sides", "layers_view", "outlined_cells"]


def two_class_sides(atlas: Atlas) -> tuple[str, str] | None:
    """(A, B) of a two-class comparison atlas (A's evidence on the left), else None."""
    manifest = atlas.manifest
    if manifest.get("kind") != "two-class":
        return None
    a, b = (manifest.get("analysis") or {}).get("classes", [None, None])
    return (str(a), str(b)) if a is not None and b is not None else None


def two_class_caption(atlas: Atlas) -> str | None:
    """Draw "← A · B →" above the map of a two-class atlas and return that text; draw nothing and
    return None for any other atlas."""
    sides = two_class_sides(atlas)
    if sides is None:
        return None
    text = f"← {sides[0]} · {sides[1]} →"
    st.markdown(f"<div style='display:flex;justify-content:space-between;font-weight:600'>"
                f"<span>← {_escape(sides[0])}</span><span>·</span><span>{_escape(sides[1])} →</span></div>",
                unsafe_allow_html=True)
    st.caption(f"Left: more attribution to {sides[0]}; right: more to {sides[1]} "
               f"(x = attribution to {sides[1]} − attribution to {sides[0]}, scaled to ±1).")
    return text


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def outlined_cells(atlas: Atlas, level: int, cells: dict, *, colour=(230, 20, 20)) -> Image.Image:
    """The atlas's picture of ``level`` (icons, else exemplar crops) with ``cells`` ((i, j) → n)
    outlined."""
    picture = Image.open(atlas.tiles_path(level)).convert("RGB")
    tile = picture.width / level
    draw = ImageDraw.Draw(picture)
    line = max(2, int(round(tile / 12)))
    for (i, j) in cells:
        draw.rectangle([j * tile, i * tile, (j + 1) * tile - 1, (i + 1) * tile - 1], outline=colour, width=line)
    return picture


def layers_view(index: str, image_id: int, *, home: Path | None = None, level: int | None = None,
                atlases: dict[str, Atlas] | None = None) -> list[LayerCells]:
    """For one image of ``index``: at every layer that has an atlas, the cells its sampled
    activations fall in, outlined on that layer's atlas, with their top labels (the article's
    view of one image going through the network). Returns what it drew, one entry per layer."""
    atlases = atlases if atlases is not None else atlases_by_layer(index, home)
    if not atlases:
        st.info(f"No atlas of index {index!r}'s layers yet: build one per layer with "
                f"`atlasq atlas build --index {index} --name NAME --layers …`.")
        return []
    found = image_layer_cells(index, image_id, home=home, level=level, atlases=atlases)
    columns = st.columns(len(found))
    for column, layer in zip(columns, found):
        atlas = atlases[layer.layer]
        with column:
            st.markdown(f"**{layer.layer}**")
            st.image(outlined_cells(atlas, layer.level, layer.cells), width="stretch")
            cells = atlas.cells_at(layer.level)
            lines = []
            for (i, j), n in sorted(layer.cells.items(), key=lambda item: -item[1]):
                row = atlas.cell_row(layer.level, i, j)
                labels = ", ".join(cells["top_labels"][row][:2]) if row is not None else "?"
                lines.append(f"- cell {i},{j}: {n} of its activations; {labels}")
            if not lines:
                lines.append("- none of its activations fall in a kept cell")
            st.markdown("\n".join(lines))
            st.caption(f"atlas {layer.atlas}, {layer.level}×{layer.level}; {layer.source}")
    return found
