"""atlasq's Streamlit app: the atlas as a concept histogram; click a cell to see its images.

    atlasq app --index photos --atlas imagenet-4c
    streamlit run app.py -- --home indexes --index photos --atlas imagenet-4c   (from a checkout)

This file is the page script Streamlit runs (it lives in the package so that an installed atlasq
has it; the root ``app.py`` runs it from a checkout). UI only: everything it shows is computed in
atlasq.appdata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import altair as alt
import duckdb
import pandas as pd
import streamlit as st

from atlasq import appdata
from atlasq.atlas import load_atlas
from atlasq.atlasdir import AtlasFolder
from atlasq.errors import AtlasqError
from atlasq.histogram import place_index

st.set_page_config(page_title="atlasq", layout="wide")


def _arguments() -> argparse.Namespace:
    """Command-line choices (after `--`); ``?index=…&atlas=…`` in the URL overrides them, so a
    view can be shared as a link."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--home", default=os.environ.get("ATLASQ_HOME") or "indexes")
    parser.add_argument("--index")
    parser.add_argument("--atlas")
    args = parser.parse_known_args(sys.argv[1:])[0]
    args.index = st.query_params.get("index", args.index)
    args.atlas = st.query_params.get("atlas", args.atlas)
    return args


ARGS = _arguments()
HOME = Path(ARGS.home)
PER_PAGE = 12


@st.cache_resource(show_spinner=False)
def cached_atlas(name: str, stamp: float):
    return load_atlas(name, HOME)


@st.cache_resource(show_spinner="loading the network…")
def cached_model(network: str):
    """One loaded network per description (JSON of :func:`appdata.index_source`'s ``network``)."""
    from atlasq.api import model_for_index

    return model_for_index(json.loads(network), device="cpu")


@st.cache_data(show_spinner=False)
def cached_scan(home: str, stamp: tuple) -> tuple[list[str], dict[str, str]]:
    return appdata.scan_indexes(Path(home))


@st.cache_data(show_spinner=False)
def cached_source(index: str, home: str, stamp: int) -> dict:
    return appdata.index_source(index, Path(home))


def index_source(index: str) -> dict:
    """Where the index's images are and which network made it, read again whenever its database
    changes: an index rebuilt under the same name is never shown with the old one's folder or network."""
    return cached_source(index, str(HOME), appdata.index_stamp(index, HOME))


def model_of(index: str):
    return cached_model(json.dumps(index_source(index)["network"], sort_keys=True))


def atlas_by_name(name: str):
    return cached_atlas(name, AtlasFolder.named(name, HOME).modified())


def _choose(label: str, options: list[str], wanted: str | None, key: str) -> str | None:
    if not options:
        return None
    index = options.index(wanted) if wanted in options else 0
    return st.sidebar.selectbox(label, options, index=index, key=key, on_change=reset_selection)


def _unavailable(tile: appdata.ImageTile) -> str:
    """What a caption adds for an image that cannot be shown (moved, unreadable, linked elsewhere)."""
    return f" · unavailable: {tile.unavailable}" if tile.unavailable else ""


def reset_selection() -> None:
    for key in ("cell", "image", "search", "last_chart", "last_picker"):
        st.session_state.pop(key, None)
    st.session_state["page"] = 0


# ----------------------------------------------------------------------------- sidebar
st.sidebar.title("atlasq")
(indexes, unreadable), atlases = cached_scan(str(HOME), appdata.scan_stamp(HOME)), appdata.list_atlases(HOME)
if not atlases:
    st.info(f"No finished atlas under {HOME}. Build one with `atlasq atlas build --index NAME --name ATLAS` "
            f"(or run `atlasq demo`), then reload.")
    st.stop()
atlas_name = _choose("Atlas", atlases, ARGS.atlas, "atlas_name")
index_name = _choose("Dataset (index)", indexes, ARGS.index, "index_name")
if ARGS.index in unreadable:
    st.warning(f"Dataset {ARGS.index!r} cannot be shown: {unreadable[ARGS.index]}")
if unreadable:
    with st.sidebar.expander(f"{len(unreadable)} folder{'s' * (len(unreadable) > 1)} under {HOME} not shown"):
        for name, problem in unreadable.items():
            st.caption(f"**{name}**: {problem}")
try:
    atlas = atlas_by_name(atlas_name)
except (AtlasqError, OSError) as exc:
    st.error(f"Cannot open atlas {atlas_name!r}: {exc}")
    st.stop()
level = st.sidebar.selectbox("Grid level", atlas.levels, key="level", on_change=reset_selection,
                             format_func=lambda g: f"{g} × {g}")
tiles = st.sidebar.radio("Tiles", ["icons", "exemplars"], horizontal=True, key="tiles",
                         format_func=lambda t: "feature visualizations" if t == "icons" else "real exemplars")
view = st.sidebar.radio("Overlay", ["counts", "class", "compare"], key="view",
                        format_func={"counts": "dataset counts", "class": "class attribution",
                                     "compare": "compare two datasets"}.get)
scale = st.sidebar.radio("Colour scale", ["log", "linear"], horizontal=True, key="scale")

if atlas.manifest.get("random_weights"):
    st.warning("This atlas was built with RANDOM weights: for tests and smoke runs only; its cells mean nothing.")

# ----------------------------------------------------------------------------- overlay
overlay, comparison, state, root = None, None, None, None
try:
    if index_name is not None:
        root = Path(index_source(index_name)["root"])
        state = appdata.placement_state(atlas, index_name, HOME)
    if state in ("missing", "stale"):
        st.info(f"Dataset {index_name!r} is {'not placed' if state == 'missing' else 'not fully placed'} on atlas "
                f"{atlas_name!r} yet; its counts below are {'empty' if state == 'missing' else 'partial'}.")
        if st.button("Place it now", key="place"):
            with st.spinner("placing…"):
                place_index(atlas_name, index_name, home=HOME)
            st.rerun()
    if st.session_state.get("search"):
        hits = st.session_state["search"]
        overlay = appdata.overlay_search(atlas, level, hits["cells"].get(level, {}))
    elif view == "class":
        categories = atlas.manifest["categories"]
        class_name = st.sidebar.selectbox("Class", categories, key="class_name")
        overlay = appdata.overlay_class(atlas, level, class_name)
    elif view == "compare" and index_name is not None:
        others = [i for i in indexes if i != index_name]
        other = st.sidebar.selectbox("Compare with", others, key="other") if others else None
        if other is None:
            st.sidebar.warning("Comparing needs a second index.")
        else:
            overlay, comparison = appdata.overlay_compare(atlas, index_name, other, level, home=HOME)
    if overlay is None:
        overlay = appdata.overlay_counts(atlas, index_name, level, home=HOME, log=scale == "log")
    elif view != "class":
        overlay.log = scale == "log" and not overlay.diverging
except (appdata.AppError, ValueError, FileNotFoundError, RuntimeError, duckdb.Error) as exc:
    # e.g. an index damaged or emptied since it was listed, or one another process is writing for too long
    st.error(f"Cannot show dataset {index_name!r}: {exc}" if index_name is not None else str(exc))
    st.stop()


def sync_selection() -> None:
    """Take a click on the atlas or a choice in the cell picker into ``cell`` before anything is
    drawn, so the page shows the new cell in this run (no second run per click)."""
    chart = st.session_state.get(f"atlas_{level}")
    chart_cells = (chart or {}).get("selection", {}).get("cell") or []
    clicked = (int(chart_cells[0]["i"]), int(chart_cells[0]["j"])) if chart_cells else None
    picked = st.session_state.get(f"cell_picker_{level}")
    picked = tuple(map(int, picked.split(","))) if picked and picked != "—" else None
    for source, value in (("chart", clicked), ("picker", picked)):
        if value is not None and st.session_state.get(f"last_{source}") != value:
            st.session_state[f"last_{source}"] = value
            st.session_state["cell"], st.session_state["page"], st.session_state["image"] = value, 0, None


# ----------------------------------------------------------------------------- atlas view
sync_selection()
left, right = st.columns([3, 2], gap="medium")
with left:
    st.caption(overlay.legend + ("" if overlay.opacity_only else f" · {scale} scale"))
    selected = st.session_state.get("cell")
    picture = appdata.atlas_picture(atlas, level, overlay, tiles=tiles, selected=selected)
    side = picture.size[0]
    cells = pd.DataFrame([{"i": c["i"], "j": c["j"], "i2": c["i"] + 1, "j2": c["j"] + 1, "count": c["count"],
                           "cell": f"{c['i']},{c['j']}", "classes": ", ".join(c["top_labels"]),
                           "value": c["value"] if pd.notna(c["value"]) else None} for c in overlay.cells])
    domain = alt.Scale(domain=[0, level], nice=False, zero=False)
    flipped = alt.Scale(domain=[0, level], nice=False, zero=False, reverse=True)
    background = alt.Chart(pd.DataFrame({"x": [level / 2], "y": [level / 2], "url": [appdata.data_uri(picture)]})) \
        .mark_image(width=side, height=side).encode(x=alt.X("x:Q", scale=domain, axis=None),
                                                    y=alt.Y("y:Q", scale=flipped, axis=None), url="url:N")
    pick = alt.selection_point(name="cell", fields=["i", "j"], on="click")
    boxes = alt.Chart(cells).mark_rect(fill="white", fillOpacity=0.01, stroke="black", strokeOpacity=0.08).encode(
        x=alt.X("j:Q", scale=domain, axis=None), x2="j2:Q", y=alt.Y("i:Q", scale=flipped, axis=None), y2="i2:Q",
        tooltip=[alt.Tooltip("cell:N"), alt.Tooltip("classes:N", title="top classes"),
                 alt.Tooltip("count:Q", title="activations"), alt.Tooltip("value:Q", format=".3g")],
    ).add_params(pick)
    # no autosizing and no padding: the plot is exactly side × side pixels, cell (i, j) at
    # (j, i) × side / level, so the picture and the clickable cells line up
    chart = alt.layer(background, boxes).properties(
        width=side, height=side, padding=0, autosize=alt.AutoSizeParams(type="none")).configure_view(stroke=None)
    st.altair_chart(chart, on_select="rerun", selection_mode="cell", key=f"atlas_{level}", theme=None,
                    width="content")
    legend = appdata.overlay_legend(overlay, width=side)
    if legend is not None:
        st.image(legend, output_format="PNG")
    # the same choice without a pointer: every kept cell, fullest first
    ranked = sorted(overlay.cells, key=lambda c: -c["count"])
    labels = {f"{c['i']},{c['j']}": f"cell {c['i']},{c['j']} · {', '.join(c['top_labels'][:2])} ({c['count']})"
              for c in ranked}
    st.selectbox("…or choose a cell", ["—"] + list(labels), format_func=lambda k: labels.get(k, k),
                 key=f"cell_picker_{level}")

    if comparison is not None:
        st.markdown(f"**{comparison.b} vs {comparison.a}**: Jensen–Shannon divergence "
                    f"{comparison.jensen_shannon_bits:.4f} bits; {comparison.significant_cells} of "
                    f"{comparison.cells} cells differ (q < {comparison.alpha}).")
        for title, rows in (("More in " + comparison.b, comparison.over_represented_in_b[:8]),
                            ("Less in " + comparison.b, comparison.under_represented_in_b[:8])):
            st.markdown(f"*{title}*")
            for c in rows:
                if st.button(f"cell {c.i},{c.j} · {c.top_label} · {c.share_a:.1%} → {c.share_b:.1%}",
                             key=f"cmp_{title}_{c.i}_{c.j}"):
                    st.session_state["cell"], st.session_state["page"] = (c.i, c.j), 0
                    st.rerun()

    with st.expander("Search by image (or press ≈ under any image)",
                     expanded=bool(st.session_state.get("search"))):
        upload = st.file_uploader("An image to find in the dataset", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"],
                                  key="upload")
        if upload is not None and index_name is not None:
            digest = (upload.name, upload.size)
            if st.session_state.get("search_for") != digest:
                try:
                    st.session_state["search"] = appdata.search_upload(atlas, index_name, upload.getvalue(),
                                                                       upload.name, home=HOME,
                                                                       model=model_of(index_name))
                    st.session_state["search_for"] = digest
                except (appdata.AppError, ValueError, RuntimeError) as exc:
                    st.error(str(exc))
                st.rerun()
        hits = st.session_state.get("search")
        if hits:
            if st.button("Clear search", key="clear_search"):
                st.session_state.pop("search", None)
                st.session_state["search_for"] = (upload.name, upload.size) if upload is not None else None
                st.rerun()
            st.markdown("**Nearest images** (their cells are lit on the atlas)")
            for n, hit in enumerate(hits["hits"]):
                if n % 4 == 0:
                    columns = st.columns(4)
                with columns[n % 4]:
                    tile = appdata.image_tile(atlas, root, hit["path"], [], side=160)
                    st.image(tile.image, output_format="JPEG",
                             caption=f"{hit['path']} ({hit['score']:.3f})" + _unavailable(tile))

# ----------------------------------------------------------------------------- the selected cell
with right:
    cell = st.session_state.get("cell")
    if cell is None:
        st.markdown("Click a cell of the atlas (or choose one below it) to see the dataset's images there.")
    elif index_name is None:
        st.info("Choose a dataset to see its images in this cell.")
    else:
        i, j = cell
        page = st.session_state.get("page", 0)
        try:
            result = appdata.cell_page(atlas, index_name, level, i, j, page=page, per_page=PER_PAGE, home=HOME)
            model = model_of(index_name)
        except (AtlasqError, ValueError, FileNotFoundError) as exc:
            st.error(str(exc))
            st.stop()
        st.subheader(f"Cell {i},{j}")
        st.markdown(" · ".join(f"{label} ({score:.3g})" for label, score in
                               zip(result.top_labels, result.top_scores)) or "no labels")
        st.caption(f"{result.total_images} images of {index_name} here; most typical first; "
                   f"red squares: the sampled positions")
        for n, member in enumerate(result.images):
            if n % 3 == 0:  # one row of columns per three images, so rows line up (and read in order)
                columns = st.columns(3)
            with columns[n % 3]:
                tile = appdata.image_tile(atlas, root, member.path, member.positions, model=model)
                st.image(tile.image, caption=member.path + _unavailable(tile), output_format="JPEG")
                opened, similar = st.columns(2)
                if opened.button("⤢", key=f"open_{member.image_id}", help="open: predictions and cells"):
                    st.session_state["image"] = member.image_id
                    st.rerun()
                if similar.button("≈", key=f"similar_{member.image_id}", help="similar images"):
                    st.session_state["search"] = appdata.search_indexed(atlas, index_name, member.image_id,
                                                                        home=HOME)
                    st.rerun()
        previous, _, following = st.columns([1, 2, 1])
        if page > 0 and previous.button("◀ previous", key="prev"):
            st.session_state["page"] = page - 1
            st.rerun()
        if result.has_more and following.button("next ▶", key="next"):
            st.session_state["page"] = page + 1
            st.rerun()

        image_id = st.session_state.get("image")
        if image_id is not None:
            details = appdata.image_details(atlas, index_name, image_id, home=HOME)
            st.divider()
            st.markdown(f"**{details['path']}** ({details['width']}×{details['height']})")
            positions = [p for p in details["placements"] if p["level"] == level]
            tile = appdata.image_tile(atlas, root, details["path"], positions, side=480, model=model)
            st.image(tile.image, caption=_unavailable(tile).strip(" ·") or None, output_format="JPEG")
            st.table(pd.DataFrame(details["top5"]))
            st.table(pd.DataFrame([{"position": f"({p['y']},{p['x']})", "cell": "off-atlas" if p["off_atlas"] else
                                    f"{p['i']},{p['j']}", "distance": round(p["distance"], 4)} for p in positions]))
