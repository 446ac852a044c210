"""atlasq's Streamlit app: the atlas map with a dataset's concept histogram beside it; select cells
to see (and export) their images.

    atlasq app --index photos --atlas imagenet-4c
    streamlit run app.py -- --home indexes --index photos --atlas imagenet-4c   (from a checkout)

This file is the page script Streamlit runs (it lives in the package so that an installed atlasq
has it; the root ``app.py`` runs it from a checkout). UI only: the numbers come from
:mod:`atlasq.appdata`, the views from :mod:`atlasq.streamlit`.

The view lives in the URL (``?index=…&atlas=…&level=…&zoom=…&center=…&sel=3.4_3.5&page=…``): it is
read once when a session starts and written on every run, so a reload or a shared link shows the
same view. The map reports its zoom and centre once they rest after a zoom or pan; that reruns
only the map's fragment, which writes them into the URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st

from atlasq import appdata
from atlasq.appdata import ImageFilter
from atlasq.atlas import load_atlas
from atlasq.atlasdir import AtlasFolder
from atlasq.errors import AtlasqError
from atlasq.histogram import place_index
from atlasq.streamlit import views
from atlasq.streamlit.analysis_views import two_class_caption
from atlasq.streamlit.map_component import MapState, atlas_map

st.set_page_config(page_title="atlasq", layout="wide")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--home", default=os.environ.get("ATLASQ_HOME") or "indexes")
    parser.add_argument("--index")
    parser.add_argument("--atlas")
    return parser.parse_known_args(sys.argv[1:])[0]


ARGS = _arguments()
HOME = Path(ARGS.home)
PER_PAGE = 12
OVERLAYS = {"counts": "dataset counts", "class": "class attribution", "compare": "compare two datasets"}
STYLES = {"badge": "count badges (icons untouched)", "heat": "heat layer", "off": "off"}


# ----------------------------------------------------------------------------- the URL
def _restore_from_url() -> None:
    """Once per session, before any widget is drawn: the view the URL names (a reload or a shared
    link), else the command line's choices."""
    if st.session_state.get("_restored"):
        return
    st.session_state["_restored"] = True
    q = st.query_params
    st.session_state["atlas_name"] = q.get("atlas", ARGS.atlas)
    st.session_state["index_name"] = q.get("index", ARGS.index)
    st.session_state["_wanted_atlas"] = st.session_state["atlas_name"]
    st.session_state["_wanted_index"] = st.session_state["index_name"]
    for key, name, kind in (("level", "level", int), ("gallery_page", "page", int), ("view", "overlay", str),
                            ("class_name", "class", str), ("other", "compare", str), ("path_pattern", "path", str),
                            ("zoom", "zoom", float), ("tiles", "tiles", str), ("map_level", "maplevel", int)):
        if name in q:
            try:
                st.session_state[key] = kind(q[name])
            except ValueError:
                pass
    if "predicted" in q:
        st.session_state["predicted"] = [c for c in q.get_all("predicted") if c]
    if "center" in q:
        try:
            x, y = map(float, q["center"].split(","))
            st.session_state["center"] = (x, y)
        except ValueError:
            pass
    if "sel" in q:
        st.session_state["sel_cells"] = [c.replace(".", ",") for c in q["sel"].split("_") if c.count(".") == 1]


def _write_url() -> None:
    s = st.session_state
    # the map's level is the one its zoom shows; "level" is the histogram's and the gallery's
    map_level = s.get("map_level") if s.get("map_level") != s.get("level") else None
    params = {"atlas": s.get("atlas_name"), "index": s.get("index_name"), "level": s.get("level"),
              "maplevel": map_level, "overlay": s.get("view"), "zoom": f"{s.get('zoom', 1.0):g}",
              "center": "{:.5f},{:.5f}".format(*s.get("center", (0.5, 0.5))),
              "sel": "_".join(c.replace(",", ".") for c in s.get("sel_cells") or []) or None,
              "page": s.get("gallery_page") or None, "tiles": s.get("tiles"),
              "class": s.get("class_name") if s.get("view") == "class" else None,
              "compare": s.get("other") if s.get("view") == "compare" else None,
              "predicted": s.get("predicted") or None, "path": s.get("path_pattern") or None}
    wanted = {k: ([str(x) for x in v] if isinstance(v, list) else str(v)) for k, v in params.items() if v is not None}
    current = {k: (st.query_params.get_all(k) if isinstance(v, list) else st.query_params.get(k))
               for k, v in wanted.items()}
    if current != wanted or set(st.query_params) - set(wanted):
        st.query_params.from_dict(wanted)


# ----------------------------------------------------------------------------- cached reads
@st.cache_resource(show_spinner=False)
def cached_atlas(name: str, stamp: float):
    return load_atlas(name, HOME)


def atlas_by_name(name: str):
    return cached_atlas(name, AtlasFolder.named(name, HOME).modified())


@st.cache_data(show_spinner=False)
def cached_scan(home: str, stamp: tuple) -> tuple[list[str], dict[str, str]]:
    return appdata.scan_indexes(Path(home))


@st.cache_data(show_spinner=False)
def cached_source(index: str, stamp: int) -> dict:
    return appdata.index_source(index, HOME)


def index_source(index: str) -> dict:
    return cached_source(index, appdata.index_stamp(index, HOME))


def model_of(index: str):
    """The index's network, loaded once per process (usually already, by appdata.warm_up's thread)."""
    if appdata.network_loaded(index, HOME):
        return appdata.index_network(index, HOME)
    with st.spinner("loading the network…"):
        return appdata.index_network(index, HOME)


def outline_model(index: str):
    """What the gallery and the dialog outline positions with: nothing when the atlas recorded its
    network's preprocessing (the usual case: no wait for the network), else the network."""
    return None if appdata.outline_geometry(atlas) is not None else model_of(index)


@st.cache_data(show_spinner=False)
def cached_compatibility(atlas_name: str, atlas_stamp: float, index: str, stamp: int) -> str | None:
    return appdata.compatibility(atlas_by_name(atlas_name), index, HOME)


def compatibility(atlas, index: str) -> str | None:
    return cached_compatibility(atlas.name, atlas.files.modified(), index, appdata.index_stamp(index, HOME))


@st.cache_data(show_spinner=False)
def cached_layers(index: str, stamp: int) -> list[str]:
    return appdata.index_layers(index, HOME)


@st.cache_data(show_spinner=False)
def cached_atlas_layers(names: tuple[str, ...], stamps: tuple) -> dict[str, str]:
    return appdata.atlas_layers(list(names), HOME)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_rows(atlas_name: str, atlas_stamp: float, index: str | None, stamp: int, level: int,
                where: ImageFilter) -> tuple[list[dict], dict]:
    return appdata.cell_rows(atlas_by_name(atlas_name), index, level, where, home=HOME)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_compare(atlas_name: str, atlas_stamp: float, a: str, b: str, stamps: tuple, level: int):
    return appdata.overlay_compare(atlas_by_name(atlas_name), a, b, level, home=HOME)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_facts(atlas_name: str, atlas_stamp: float, index: str, stamp: int, level: int, where: ImageFilter):
    return appdata.dataset_facts(atlas_by_name(atlas_name), index, level, where, home=HOME)


@st.cache_data(show_spinner=False)
def cached_placement(atlas_name: str, atlas_stamp: float, index: str, stamp: int) -> str:
    return appdata.placement_state(atlas_by_name(atlas_name), index, HOME)


def _stamp(index: str | None) -> int:
    return appdata.index_stamp(index, HOME) if index else 0


def _selection_changed_elsewhere() -> None:
    """The histogram's own row checkboxes start afresh (a new key) when the selection changes elsewhere."""
    st.session_state["_hist_gen"] = st.session_state.get("_hist_gen", 0) + 1
    st.session_state["gallery_page"] = 0


def clear_selection() -> None:
    for key in ("sel_cells", "search"):
        st.session_state.pop(key, None)
    _selection_changed_elsewhere()


def _level_chosen() -> None:
    """Another level for the histogram and the gallery: the map zooms to it too."""
    clear_selection()
    st.session_state.pop("map_level", None)


# ----------------------------------------------------------------------------- sidebar: what to show
_restore_from_url()
st.sidebar.title("atlasq")
(indexes, unreadable), atlases = cached_scan(str(HOME), appdata.scan_stamp(HOME)), appdata.list_atlases(HOME)
if not atlases:
    st.info(f"No finished atlas under {HOME}. Build one with `atlasq atlas build --index NAME --name ATLAS` "
            f"(or run `atlasq demo`), then reload.")
    st.stop()
if st.session_state.get("atlas_name") not in atlases:
    st.session_state["atlas_name"] = atlases[0]
atlas_name = st.sidebar.selectbox("Atlas", atlases, key="atlas_name", on_change=clear_selection)
try:
    atlas = atlas_by_name(atlas_name)
except (AtlasqError, OSError) as exc:
    st.error(f"Cannot open atlas {atlas_name!r}: {exc}")
    st.stop()

problems = {name: compatibility(atlas, name) for name in indexes}
wanted_index = st.session_state.get("_wanted_index")
if wanted_index in unreadable:
    st.warning(f"Dataset {wanted_index!r} cannot be shown: {unreadable[wanted_index]}")
if st.session_state.get("index_name") not in indexes:
    usable = [name for name in indexes if problems[name] is None]
    st.session_state["index_name"] = (usable or indexes or [None])[0]
index_name = st.sidebar.selectbox(
    "Dataset (index)", indexes, key="index_name", on_change=clear_selection,
    format_func=lambda n: n if problems.get(n) is None else f"⚠ {n} (cannot be placed on this atlas)") \
    if indexes else None
if unreadable:
    with st.sidebar.expander(f"{len(unreadable)} folder{'s' * (len(unreadable) > 1)} under {HOME} not shown"):
        for name, problem in unreadable.items():
            st.caption(f"**{name}**: {problem}")
problem = problems.get(index_name) if index_name else None
shown_index = index_name if index_name and problem is None else None  # whose counts and images are shown
# the network and the cells' counts, while the user looks (in a server; AppTest has none)
appdata.warm_up(atlas, shown_index, HOME, freeze=st.runtime.exists())

# several layers in the dataset, and atlases for them: switch between them
if index_name:
    layer_of = cached_atlas_layers(tuple(atlases), tuple(AtlasFolder.named(a, HOME).modified() for a in atlases))
    layers = [layer for layer in cached_layers(index_name, _stamp(index_name)) if layer in layer_of.values()]
    if len(layers) > 1:
        def _switch_layer() -> None:
            chosen = st.session_state["layer"]
            st.session_state["atlas_name"] = next(a for a in atlases if layer_of.get(a) == chosen)
            clear_selection()
        st.session_state["layer"] = atlas.manifest["layer"]
        st.sidebar.radio("Layer", layers, key="layer", horizontal=True, on_change=_switch_layer,
                         help="this dataset samples several layers; each has its own atlas")

if st.session_state.get("view") not in OVERLAYS:
    st.session_state["view"] = "counts"
view = st.sidebar.radio("Overlay", list(OVERLAYS), key="view", format_func=OVERLAYS.get, on_change=clear_selection)
class_name = None
if view == "class":
    categories = atlas.manifest["categories"]
    if st.session_state.get("class_name") not in categories:
        st.session_state["class_name"] = categories[0]
    class_name = st.sidebar.selectbox("Class", categories, key="class_name",
                                      help="cells fade with their mean attribution to this class")
other = None
if view == "compare" and shown_index:
    candidates = [n for n in indexes if n != shown_index and problems[n] is None]
    refused = {n: problems[n] for n in indexes if n != shown_index and problems[n] is not None}
    if st.session_state.get("other") not in candidates:
        st.session_state.pop("other", None)
    other = st.sidebar.selectbox("Compare with", candidates, index=None, key="other",
                                 placeholder="choose a dataset" if candidates else "no other dataset fits this atlas")
    for name, why in refused.items():
        st.sidebar.caption(f"⚠ **{name}** not offered: {why}")

with st.sidebar.expander("Filters", expanded=bool(st.session_state.get("predicted") or
                                                  st.session_state.get("path_pattern"))):
    categories = atlas.manifest["categories"]
    st.session_state["predicted"] = [c for c in st.session_state.get("predicted", []) if c in categories]
    predicted = st.multiselect("Predicted class (top-1)", categories, key="predicted")
    pattern = st.text_input("Path pattern", key="path_pattern", placeholder="cats/  or  */IMG_*.jpg",
                            help="a glob when it holds * ? or [, else any path containing it (any case)")
where = ImageFilter(tuple(appdata.class_number(atlas, c) for c in predicted), pattern.strip())
if not where.everything:
    st.sidebar.caption("Counts, bars and images show only the images that pass the filters.")

if st.session_state.get("tiles") not in ("icons", "exemplars"):
    st.session_state["tiles"] = "icons"
tiles = st.sidebar.radio("Tiles", ["icons", "exemplars"], horizontal=True, key="tiles",
                         format_func=lambda t: "feature visualizations" if t == "icons" else "real exemplars")
style = st.sidebar.radio("Counts on the map", list(STYLES), key="overlay_style", format_func=STYLES.get)
opacity = st.sidebar.slider("Heat opacity", 0.0, 1.0, 0.5, 0.05, key="heat_opacity", disabled=style != "heat")
st.sidebar.caption(appdata.SCORE_HELP)

if atlas.manifest.get("random_weights"):
    st.warning("This atlas was built with RANDOM weights: for tests and smoke runs only; its cells mean nothing.")
if problem:
    st.warning(f"Dataset {index_name!r} cannot be shown on atlas {atlas_name!r}: {problem}. "
               f"The map shows the atlas's own reference counts.")

# ----------------------------------------------------------------------------- placing
atlas_stamp = atlas.files.modified()
for name in [n for n in (shown_index, other) if n]:
    state = cached_placement(atlas_name, atlas_stamp, name, _stamp(name))
    if state in ("missing", "stale"):
        st.info(f"Dataset {name!r} is {'not placed' if state == 'missing' else 'not fully placed'} on atlas "
                f"{atlas_name!r} yet; its counts are {'empty' if state == 'missing' else 'partial'}.")
        if st.button(f"Place {name} now", key=f"place_{name}"):
            with st.spinner("placing…"):
                place_index(atlas_name, name, home=HOME)
            st.cache_data.clear()
            st.rerun()

# ----------------------------------------------------------------------------- overlays, one per level
if st.session_state.get("level") not in atlas.levels:
    st.session_state["level"] = min(atlas.levels)
try:
    rows_by_level = {g: cached_rows(atlas_name, atlas_stamp, shown_index, _stamp(shown_index), g, where)
                     for g in atlas.levels}
    comparisons = {}
    if other:
        comparisons = {g: cached_compare(atlas_name, atlas_stamp, shown_index, other,
                                         (_stamp(shown_index), _stamp(other)), g) for g in atlas.levels}
    search = st.session_state.get("search")
    overlays = {}
    for g in atlas.levels:
        rows, totals = rows_by_level[g]
        if search:
            overlays[g] = appdata.overlay_search(atlas, g, search["cells"].get(g, {}))
        elif view == "class" and class_name:
            overlays[g] = appdata.overlay_class(atlas, g, class_name)
        elif g in comparisons:
            overlays[g] = comparisons[g][0]
        else:
            overlays[g] = appdata.overlay_of_rows(
                rows, legend=(f"{shown_index}: activations per cell; {totals['off_atlas'] / max(totals['activations'], 1):.1%}"
                              f" of {totals['activations']:,} off-atlas") if shown_index
                else "reference activations per cell")
except (appdata.AppError, ValueError, FileNotFoundError, RuntimeError, duckdb.Error) as exc:
    st.error(f"Cannot show dataset {index_name!r}: {exc}" if index_name is not None else str(exc))
    st.stop()

# ----------------------------------------------------------------------------- summary
if shown_index:
    with st.container(border=True):
        opened_off = views.dataset_summary(atlas, shown_index, level=st.session_state["level"], where=where,
                                           home=HOME, facts=cached_facts(atlas_name, atlas_stamp, shown_index,
                                                                         _stamp(shown_index),
                                                                         st.session_state["level"], where))
else:
    opened_off = None


# ----------------------------------------------------------------------------- map and histogram
def _cells_of(keys: list[str]) -> list[tuple[int, int]]:
    return [tuple(map(int, k.split(","))) for k in keys]


def _take_histogram_choice(cells: list[tuple[int, int]]) -> None:
    """Rows clicked in the histogram: their cells become the selection (before the next run draws)."""
    st.session_state["sel_cells"] = [f"{i},{j}" for i, j in cells]
    st.session_state["gallery_page"] = 0
    st.session_state.pop("search", None)


def _keep_view(view: MapState) -> None:
    """The map's level, zoom and centre (written into the URL)."""
    st.session_state["map_level"], st.session_state["zoom"] = view.level, view.zoom
    st.session_state["center"] = tuple(view.center)


def _apply_map_view(view: MapState) -> None:
    """A selection the map sent (a click, a shift-click, a box, Escape): the level it was made at
    and its cells become the app's."""
    if view.level != st.session_state["level"]:
        st.session_state["level"] = view.level
    st.session_state["sel_cells"] = [f"{i},{j}" for g, i, j in view.selected if g == view.level]
    _keep_view(view)
    st.session_state.pop("search", None)
    _selection_changed_elsewhere()


def _unseen_map_message() -> dict | None:
    """What the map sent since it was last taken (None: nothing new)."""
    value = st.session_state.get("atlas_map")
    view = value.get("view") if isinstance(value, dict) else getattr(value, "view", None)
    if not view or view.get("seq") == st.session_state.get("_map_seq"):
        return None
    return view


def _take_map_event() -> None:
    """What the map sent since the last run: a view report (zoom, centre) is kept for the URL; a
    selection is applied before anything is drawn, so the map, the histogram and the gallery all
    show it in this run."""
    view = _unseen_map_message()
    if view is None:
        return
    st.session_state["_map_seq"] = view.get("seq")
    state = MapState.from_dict(view)
    if state.level not in atlas.levels:
        return
    if view.get("kind") == "view":
        _keep_view(state)
    else:
        _apply_map_view(state)


@st.fragment
def map_panel(overlays: dict, tiles: str, style: str, opacity: float) -> None:
    """The map. Zooming and panning happen in the browser; when the view rests the map reports it,
    which reruns this fragment alone (it keeps the view and writes it into the URL). A selection
    made on the map needs the histogram and the gallery too: the whole page reruns."""
    message = _unseen_map_message()
    if message is not None and message.get("kind") != "view":
        st.rerun(scope="app")  # the page's run takes the selection (_take_map_event)
    _take_map_event()
    two_class_caption(atlas)  # "← A · B →" over a two-class atlas, nothing over any other
    level_now = st.session_state["level"]
    selected_now = tuple((level_now, i, j) for i, j in _cells_of(st.session_state.get("sel_cells") or []))
    atlas_map(atlas, overlays, tiles=tiles, overlay_style=style, heat_opacity=opacity, key="atlas_map", height=560,
              state=MapState(level=st.session_state.get("map_level") or level_now,
                             zoom=st.session_state.get("zoom", 1.0), center=st.session_state.get("center", (0.5, 0.5)),
                             selected=selected_now, clicked=None))
    st.caption("Wheel or +/− zooms (finer levels as icons grow), drag or arrows pan, a click selects a cell, "
               "shift-click adds one, shift-drag selects a box, Escape clears.")
    _write_url()


_take_map_event()
left, right = st.columns([3, 2], gap="small")
with left:
    map_panel(overlays, tiles, style, opacity)

with right:
    if shown_index:
        totals_now = rows_by_level[st.session_state["level"]][1]
        st.markdown(f"**Concept histogram** · {shown_index}: activations per cell "
                    f"({totals_now['off_atlas'] / max(totals_now['activations'], 1):.1%} of "
                    f"{totals_now['activations']:,} off-atlas)")
    else:
        st.markdown("**Concept histogram** · the atlas's reference activations per cell")
    level = st.selectbox("Histogram and images at level", atlas.levels, key="level", on_change=_level_chosen,
                         format_func=lambda g: f"{g} × {g}", help="zooming the map to another level and clicking "
                                                                  "a cell there changes it too")
rows, totals = rows_by_level[level]
labels = {f"{r['i']},{r['j']}": f"{r['i']},{r['j']} · {r['top_label']} ({r['activations']:,})" for r in rows}
st.session_state["sel_cells"] = [c for c in st.session_state.get("sel_cells") or [] if c in labels]
picked = st.container()  # the selection's widget, drawn (below) once the gallery is on its way


# ----------------------------------------------------------------------------- images: the selection or a search
@st.dialog("Image", width="large")
def image_dialog(image_id: int, index: str, level: int) -> None:
    details = appdata.image_details(atlas, index, image_id, home=HOME)
    root = appdata.index_root(index, HOME)
    model = outline_model(index)
    # only the part shown is computed (tabs would compute all three; Inspect takes seconds)
    part = st.segmented_control("Show", ["Image", "Inspect", "Layers"], default="Image", key=f"dialog_part_{image_id}",
                                label_visibility="collapsed") or "Image"
    if part == "Image":
        positions = [p for p in details["placements"] if p["level"] == level]
        tile = appdata.image_tile(atlas, root, details["path"], positions, side=560, model=model)
        picture, facts = st.columns([3, 2])
        picture.image(tile.image, output_format="JPEG", width="stretch",
                      caption=f"{details['width']}×{details['height']}" +
                              (f" · unavailable: {tile.unavailable}" if tile.unavailable else ""))
        with facts:
            st.code(details["path"], language=None)  # the copy button copies the path
            st.markdown("**Top-5 predictions**")
            st.dataframe(pd.DataFrame(details["top5"]), hide_index=True, width="stretch",
                         column_config={"probability": st.column_config.ProgressColumn(
                             "probability", min_value=0.0, max_value=1.0, format="percent")})
            st.markdown(f"**Its activations on the atlas** (level {level})")
            st.dataframe(pd.DataFrame([{"position": f"({p['y']},{p['x']})",
                                        "cell": "off-atlas" if p["off_atlas"] else f"{p['i']},{p['j']}",
                                        "distance": round(p["distance"], 4)} for p in positions]),
                         hide_index=True, width="stretch")
    elif part == "Inspect":
        _optional_view("inspect_view", index, details, level)
    else:
        _optional_view("layers_view", index, details, level)


def _optional_view(name: str, index: str, details: dict, level: int) -> None:
    """The Inspect and Layers views of the image, where this atlasq has them."""
    import atlasq.streamlit as aq

    try:
        view_function = getattr(aq, name)
    except (AttributeError, ImportError):
        st.caption(f"This version of atlasq has no {name.replace('_', ' ')}.")
        return
    if name == "inspect_view":
        view_function(index, details["path"], atlas=atlas.name, home=HOME)
    else:
        view_function(index, details["id"], home=HOME)


@st.fragment
def images_panel(index: str | None, level: int, cells: list[tuple[int, int]], where: ImageFilter) -> None:
    """The gallery of the selected cells or the search results; paging, opening and exporting
    rerun this part only."""
    if index is None:
        st.caption("Choose a dataset that fits this atlas to see images.")
        return
    search = st.session_state.get("search")
    if search:
        choice = _search_results(index, search)
    else:
        choice = views.cell_gallery(atlas, index, [(level, i, j) for i, j in cells], where=where, home=HOME,
                                    per_page=PER_PAGE, key="gallery", model=outline_model(index))
    if choice.opened is not None:
        st.session_state["image"] = choice.opened
        image_dialog(choice.opened, index, level)
    if choice.similar is not None:
        st.session_state["search"] = {**appdata.search_indexed(atlas, index, choice.similar, home=HOME),
                                      "query_id": choice.similar}
        st.rerun(scope="app")  # the map lights the results' cells
    _write_url()


def _search_results(index: str, search: dict) -> views.GalleryChoice:
    root = appdata.index_root(index, HOME)
    head = st.columns([1, 4, 1], vertical_alignment="center")
    if search.get("query_id") is not None:
        query = appdata.image_details(atlas, index, search["query_id"], home=HOME)["path"]
        head[0].image(appdata.image_tile(atlas, root, query, [], side=160).image, caption="query", width="stretch")
        title = query
    else:
        head[0].image(search["query_image"], caption="query", width="stretch")
        title = search.get("query_name", "the uploaded image")
    head[1].markdown(f"**Nearest images to {title}** (their cells are lit on the map)")
    if head[2].button("Clear search", key="clear_search", width="stretch"):
        st.session_state.pop("search", None)
        st.rerun(scope="app")
    hits = [{"image_id": h["id"], "path": h["path"], "score": h["score"]} for h in search["hits"]]
    return views.image_grid(atlas, root, hits, key="hits", columns=4,
                            caption=lambda m, t: f"{m['path']} ({m['score']:.3f})" +
                                                 (f" · unavailable: {t.unavailable}" if t.unavailable else ""))


# the gallery is drawn before the histogram beside the map, so that after a click its images reach
# the browser first (the histogram, a table of icons, is the page's largest message)
images_panel(shown_index, level, _cells_of(st.session_state["sel_cells"]), where)
with right:
    views.concept_histogram(
        atlas, shown_index, level=level, rows=rows, comparison=comparisons[level][1] if other else None,
        where=where, home=HOME, selected=_cells_of(st.session_state["sel_cells"]),
        key=f"concept_histogram_{level}_{st.session_state.get('_hist_gen', 0)}", on_select=_take_histogram_choice,
        height=520)
    if other:
        c = comparisons[level][1]
        st.caption(f"**{c.b} vs {c.a}**: Jensen–Shannon divergence {c.jensen_shannon_bits:.4f} bits; "
                   f"{c.significant_cells} of {c.cells} cells differ (q < {c.alpha}); filters do not apply here.")

with picked:
    st.multiselect("Selected cells", list(labels), key="sel_cells", format_func=labels.get,
                   placeholder="click cells on the map (shift-click adds) or rows of the histogram",
                   on_change=_selection_changed_elsewhere)
if opened_off is not None and shown_index:
    image_dialog(opened_off, shown_index, level)

with st.expander("Search by image (or press ≈ under any image)"):
    upload = st.file_uploader("An image to find in the dataset", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"],
                              key="upload")
    if upload is not None and shown_index is not None and st.session_state.get("search_for") != (upload.name,
                                                                                                  upload.size):
        try:
            found = appdata.search_upload(atlas, shown_index, upload.getvalue(), upload.name, home=HOME,
                                          model=model_of(shown_index))
            st.session_state["search"] = {**found, "query_image": upload.getvalue(), "query_name": upload.name}
            st.session_state["search_for"] = (upload.name, upload.size)
        except (appdata.AppError, ValueError, RuntimeError) as exc:
            st.error(str(exc))
        st.rerun()

_write_url()
