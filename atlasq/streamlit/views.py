"""The app's views, as functions for any Streamlit page: the concept histogram, the gallery of a
selection of cells, and the dataset summary.

Each draws into the current container and returns what the user chose there::

    import streamlit as st
    import atlasq.streamlit as aq
    from atlasq.atlas import load_atlas

    atlas = load_atlas("imagenet-4c")
    cells = aq.concept_histogram(atlas, "photos", level=20)          # [(i, j), ...] the bars clicked
    choice = aq.cell_gallery(atlas, "photos", [(20, i, j) for i, j in cells])
    if choice.opened is not None:
        st.write("opened image", choice.opened)

The data behind them comes from :mod:`atlasq.appdata` (no Streamlit there), so the same numbers
are available to scripts and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd
import streamlit as st

from .. import appdata
from ..appdata import SCORE_HELP, ImageFilter
from ..atlas import Atlas

__all__ = ["concept_histogram", "cell_gallery", "dataset_summary", "GalleryChoice", "cell_label",
           "comparison_rows"]


def cell_label(i: int, j: int) -> str:
    """How a cell is named everywhere in the app: row, column."""
    return f"{i},{j}"


def _first_label(row: dict) -> str:
    if not row["top_labels"]:
        return appdata.NO_POSITIVE_CLASS
    return f"{row['top_labels'][0]} ({row['top_scores'][0]:+.2g})"


def _labels(row: dict) -> str:
    if not row["top_labels"]:
        return appdata.NO_POSITIVE_CLASS
    return ", ".join(f"{label} ({score:+.2g})" for label, score in zip(row["top_labels"], row["top_scores"]))


def comparison_rows(rows: list[dict], rows_b: list[dict], comparison) -> list[dict]:
    """Dataset A's ``rows`` (:func:`atlasq.appdata.cell_rows`) with B's share (from ``rows_b``),
    whether the cell differs significantly and the direction in words, from a
    :class:`atlasq.histogram.Comparison` of A and B."""
    cells = {(c.i, c.j): c for c in comparison.over_represented_in_b + comparison.under_represented_in_b}
    share_b = {(r["i"], r["j"]): r["share"] for r in rows_b}
    out = []
    for row in rows:
        hit = cells.get((row["i"], row["j"]))
        out.append({**row, "share_b": share_b.get((row["i"], row["j"]), 0.0), "significant": hit is not None,
                    "log2_ratio": hit.log2_ratio if hit is not None else None,
                    "q": hit.q if hit is not None else None,
                    "direction": ("" if hit is None else
                                  f"more in {comparison.b}" if hit.log2_ratio > 0 else f"less in {comparison.b}")})
    return out


def concept_histogram(atlas: Atlas, index: str | None = None, *, level: int | None = None,
                      rows: list[dict] | None = None, compare_with: str | None = None, comparison=None,
                      where: ImageFilter = ImageFilter(), home: Path | None = None, limit: int = 60,
                      selected: Iterable[tuple[int, int]] = (), key: str = "concept_histogram",
                      height: int = 560, on_select=None) -> list[tuple[int, int]]:
    """The dataset's cells as a ranked bar chart (fullest first): each cell's icon, top label
    (positive attribution only, with its score), activations, distinct images and share of all
    the dataset's placed activations, the share drawn as a bar. Empty cells are left out.

    With ``compare_with`` (or a ready ``comparison``), the two datasets' shares side by side,
    significant cells first and marked ★, the direction in words ("more in B").

    Clicking rows selects their cells: returns the selected cells [(i, j), …] (empty: none), and
    calls ``on_select(cells)`` (before the rerun the click causes) when given. ``rows`` may be
    passed when already computed (:func:`atlasq.appdata.cell_rows`)."""
    level = level if level is not None else min(atlas.levels)
    if rows is None:
        rows, _ = appdata.cell_rows(atlas, index, level, where, home=home)
    if compare_with is not None and comparison is None and index is not None:
        _, comparison = appdata.overlay_compare(atlas, index, compare_with, level, home=home)
    if comparison is not None:  # shares of all images: filters do not apply to the comparison's test
        rows = comparison_rows(appdata.cell_rows(atlas, comparison.a, level, home=home)[0],
                               appdata.cell_rows(atlas, comparison.b, level, home=home)[0], comparison)
        ranked = sorted((r for r in rows if r["activations"] or r["share_b"]),
                        key=lambda r: (not r["significant"], -abs(r["log2_ratio"] or 0), -r["activations"]))
    else:
        ranked = sorted((r for r in rows if r["activations"]), key=lambda r: -r["activations"])
    ranked = ranked[:limit]
    if not ranked:
        st.caption("No images of this dataset fall in any cell at this level (with the filters applied).")
        return []
    chosen = set(map(tuple, selected))
    frame = pd.DataFrame({
        "icon": [appdata.icon_uri(atlas, level, r["i"], r["j"]) for r in ranked],
        "cell": [("● " if (r["i"], r["j"]) in chosen else "") + cell_label(r["i"], r["j"]) for r in ranked],
        "share": [r["share"] for r in ranked],
        "top class": [_first_label(r) for r in ranked],
        "activations": [r["activations"] for r in ranked],
        "images": [r["images"] for r in ranked],
        "other classes": [_labels({**r, "top_labels": r["top_labels"][1:], "top_scores": r["top_scores"][1:]})
                          if len(r["top_labels"]) > 1 else "" for r in ranked],
    })
    top_share = max(max(frame["share"]), 1e-9)
    config = {
        "icon": st.column_config.ImageColumn("icon", width=44, help="the cell's feature visualization"),
        "cell": st.column_config.TextColumn("cell", help="row,column on the atlas grid (● selected)", width=56),
        "share": st.column_config.ProgressColumn("share", min_value=0.0, max_value=top_share, format="percent",
                                                 width=120, help="share of all the dataset's placed activations"),
        "top class": st.column_config.TextColumn("top class (score)", help=SCORE_HELP, width="medium"),
        "activations": st.column_config.NumberColumn("activations", format="localized", width=84,
                                                     help="the dataset's activations placed in the cell"),
        "images": st.column_config.NumberColumn("images", format="localized", width=64,
                                                help="distinct images with an activation in the cell"),
        "other classes": st.column_config.TextColumn("other classes (score)", help=SCORE_HELP, width="medium"),
    }
    if comparison is not None:
        frame = frame.rename(columns={"share": f"share {comparison.a}"})
        frame.insert(3, f"share {comparison.b}", [r["share_b"] for r in ranked])
        frame.insert(4, "difference", [("★ " + r["direction"]) if r["significant"] else "" for r in ranked])
        top_share = max(top_share, max(frame[f"share {comparison.b}"]), 1e-9)
        config.pop("share")
        for name in (comparison.a, comparison.b):
            config[f"share {name}"] = st.column_config.ProgressColumn(
                f"share {name}", min_value=0.0, max_value=top_share, format="percent", width=110,
                help=f"share of {name}'s placed activations")
        config["difference"] = st.column_config.TextColumn(
            "difference", help=f"★: the shares differ (Fisher's exact test, FDR q < {comparison.alpha})")
    order = [(r["i"], r["j"]) for r in ranked]
    st.session_state[f"_{key}_cells"] = order  # what the rows are, for the callback of the next click

    def changed() -> None:
        on_select(_picked(st.session_state.get(key), st.session_state.get(f"_{key}_cells") or []))

    event = st.dataframe(frame, column_config=config, hide_index=True,
                         on_select=changed if on_select is not None else "rerun", selection_mode="multi-row",
                         key=key, height=height, row_height=44, width="stretch")
    return _picked(event, order)


def _picked(event, order: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The cells of the rows selected in a dataframe selection ``event``."""
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    rows = selection.get("rows", []) if isinstance(selection, dict) else getattr(selection, "rows", [])
    return [order[n] for n in rows or [] if n < len(order)]


@dataclass
class GalleryChoice:
    """What the user did in :func:`cell_gallery`: an image opened (⤢) or searched from (≈)."""

    opened: int | None = None
    similar: int | None = None
    total_images: int = 0


def _tile_caption(path: str, tile: appdata.ImageTile) -> str:
    return path + (f" · unavailable: {tile.unavailable}" if tile.unavailable else "")


def _square(image, side: int):
    """``image`` scaled to fit and centred on a ``side``-pixel white square, so a gallery's rows line
    up whatever the images' shapes and sizes."""
    from PIL import Image

    scale = side / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _stamp(root: Path, path: str) -> int:
    try:
        return (Path(root) / path).lstat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(max_entries=4096, show_spinner=False)
def _tile(_atlas: Atlas, atlas_folder: str, root: str, path: str, stamp: int, positions: tuple, _model,
          model_key: int, side: int = 224) -> tuple[bytes, str | None]:
    """A gallery tile (JPEG bytes: the image with its sampled positions outlined, on a square) and
    why it is unavailable, if it is; kept per file version, so paging back or rerunning is quick."""
    import io

    tile = appdata.image_tile(_atlas, Path(root), path, [{"y": y, "x": x} for y, x in positions], model=_model,
                              side=side)
    buffer = io.BytesIO()
    _square(tile.image, side).save(buffer, format="JPEG", quality=88)
    return buffer.getvalue(), tile.unavailable


def image_grid(atlas: Atlas, root: Path, images: list[dict], *, key: str, columns: int = 4, model=None,
               caption=None) -> GalleryChoice:
    """A grid of images (dicts with ``image_id``, ``path``, optional ``positions``), each with ⤢
    (open) and ≈ (similar images) buttons."""
    choice = GalleryChoice()
    for n, member in enumerate(images):
        if n % columns == 0:  # one row of columns per ``columns`` images, so rows line up and read in order
            row = st.columns(columns)
        with row[n % columns]:
            picture, unavailable = _tile(atlas, str(atlas.folder), str(root), member["path"], _stamp(root, member["path"]),
                                         tuple((int(q["y"]), int(q["x"])) for q in member.get("positions") or []),
                                         model, id(model))
            tile = appdata.ImageTile(None, unavailable)
            st.image(picture, caption=caption(member, tile) if caption else _tile_caption(member["path"], tile),
                     width="stretch")
            opened, similar = st.columns(2)
            if opened.button("⤢", key=f"{key}_open_{member['image_id']}", help="open: predictions and cells",
                             width="stretch"):
                choice.opened = int(member["image_id"])
            if similar.button("≈", key=f"{key}_similar_{member['image_id']}", help="similar images",
                              width="stretch"):
                choice.similar = int(member["image_id"])
    return choice


def cell_gallery(atlas: Atlas, index: str, selected: Iterable[tuple[int, int, int]], *,
                 where: ImageFilter = ImageFilter(), home: Path | None = None, per_page: int = 12,
                 columns: int = 4, key: str = "gallery", model=None, export: bool = True) -> GalleryChoice:
    """The images of ``index`` in the union of the ``selected`` cells ((level, i, j), of one
    level), most typical first, a page at a time (the page lives in ``st.session_state[key +
    "_page"]``), with CSV and zip export of the whole selection. The sampled positions are outlined
    on each image from the preprocessing the atlas recorded, or, for an atlas from before atlasq
    recorded it, with ``model`` (the index's network) when given. Returns the image opened (⤢) or
    searched from (≈), if any."""
    selected = list(selected)
    if not selected:
        st.caption("Select cells on the map or in the histogram to see their images.")
        return GalleryChoice()
    level = selected[0][0]
    cells = sorted({(i, j) for g, i, j in selected if g == level})
    page_key = f"{key}_page"
    page = int(st.session_state.get(page_key, 0))
    result = appdata.selection_page(atlas, index, level, cells, where=where, page=page, per_page=per_page, home=home)
    if page and not result.images and result.total_images:  # the selection shrank under the page
        st.session_state[page_key] = page = 0
        result = appdata.selection_page(atlas, index, level, cells, where=where, page=0, per_page=per_page, home=home)
    pages = max(1, -(-result.total_images // per_page))
    named = ", ".join(cell_label(i, j) for i, j in cells[:8]) + (f" and {len(cells) - 8} more" if len(cells) > 8 else "")
    st.markdown(f"**{result.total_images:,} images** of {index} in cell{'s' * (len(cells) > 1)} {named} "
                f"(level {level}; most typical first; red squares: the sampled positions)")
    bar = st.columns([0.8, 0.8, 2, 1.6, 1.6], vertical_alignment="center")
    bar[0].button("◀", key=f"{key}_prev", disabled=page == 0, width="stretch", on_click=_turn,
                  args=(page_key, -1), help="previous page")
    bar[1].button("▶", key=f"{key}_next", disabled=not result.has_more, width="stretch", on_click=_turn,
                  args=(page_key, 1), help="next page")
    bar[2].caption(f"page {page + 1} of {pages}")
    if export:
        _export_buttons(bar[3], bar[4], atlas, index, level, cells, where, home, key, result.total_images,
                        result.total_bytes)
    root = appdata.index_root(index, home)
    choice = image_grid(atlas, root, result.images, key=key, columns=columns, model=model)
    choice.total_images = result.total_images
    return choice


def _turn(page_key: str, step: int) -> None:
    """Paging, before the run it causes draws the gallery (so both buttons match the page shown)."""
    st.session_state[page_key] = max(0, int(st.session_state.get(page_key, 0)) + step)


def _export_buttons(csv_place, zip_place, atlas: Atlas, index: str, level: int, cells: list, where: ImageFilter,
                    home: Path | None, key: str, count: int, size: int) -> None:
    """CSV and zip of the whole selection, each built only when its button is pressed (listing a
    selection of tens of thousands of images costs a second; a rerun should not pay it)."""
    root = appdata.index_root(index, home)

    def paths() -> bytes:  # runs without the script's context: plain arguments only
        return appdata.selection_csv(appdata.selection_files(atlas, index, level, cells, where=where, home=home))

    def files() -> bytes:
        return appdata.selection_zip(root, appdata.selection_files(atlas, index, level, cells, where=where,
                                                                   home=home))

    csv_place.download_button("CSV of paths", paths, file_name=f"{index}_selection.csv", mime="text/csv",
                              key=f"{key}_csv", on_click="ignore", width="stretch",
                              help=f"image_id and path of all {count:,} selected images")
    refusal = appdata.zip_refusal((count, size))
    if refusal:
        zip_place.button("zip of files", key=f"{key}_zip_off", disabled=True, width="stretch", help=refusal)
        st.info(refusal)
        return
    zip_place.download_button("zip of files", files, file_name=f"{index}_selection.zip", mime="application/zip",
                              key=f"{key}_zip", on_click="ignore", width="stretch",
                              help=f"{count:,} files, {size / 2**20:,.1f} MB")


def dataset_summary(atlas: Atlas, index: str, *, level: int | None = None, where: ImageFilter = ImageFilter(),
                    home: Path | None = None, facts: dict | None = None, key: str = "summary") -> int | None:
    """The dataset at a glance: images, indexing errors, off-atlas share (with a look at the images
    with most off-atlas activations), its most frequent top-1 predictions, and the atlas's model,
    weights, layer and icon fidelity. Returns the image opened from the off-atlas look, if any."""
    level = level if level is not None else min(atlas.levels)
    facts = facts or appdata.dataset_facts(atlas, index, level, where, home=home)
    a = facts["atlas"]
    metrics = st.columns(4)
    metrics[0].metric("images", f"{facts['images']:,}",
                      help="images indexed" + ("" if where.everything else f"; {facts['kept_images']:,} pass the filters"))
    metrics[1].metric("indexing errors", f"{facts['errors']:,}", help="files that could not be read (`atlasq info`)")
    metrics[2].metric("off-atlas", f"{facts['off_atlas_share']:.1%}",
                      help=f"{facts['off_atlas']:,} of {facts['activations']:,} placed activations are farther "
                           f"from every reference activation than the atlas's threshold: concepts the atlas lacks")
    fidelity = a["icon_fidelity"]
    metrics[3].metric("icon fidelity", "—" if fidelity is None else f"{fidelity:.0%}",
                      help="share of this level's icons whose centre activation is closest to their own cell's "
                           "mean activation")
    weights = a["weights"] + (" (RANDOM)" if a["random_weights"] else "")
    st.caption(f"atlas **{a['name']}**: model {a['model']}, weights {weights}, layer {a['layer']}")
    if facts["top_predicted"]:
        st.caption("top predicted classes: " + ", ".join(f"{c} ({n:,})" for c, n in facts["top_predicted"]))
    opened = None
    if facts["off_atlas_images"]:
        with st.popover(f"look at off-atlas images ({len(facts['off_atlas_images'])})"):
            root = appdata.index_root(index, home)
            choice = image_grid(atlas, root, facts["off_atlas_images"], key=f"{key}_off", columns=4,
                                caption=lambda m, t: f"{_tile_caption(m['path'], t)} · {m['off_atlas']}/"
                                                     f"{m['activations']} off")
            opened = choice.opened
    return opened
