"""A page that draws only the atlas map, for tests/test_atlas_map.py (and for trying it by hand):

    streamlit run tests/apps/atlas_map_app.py -- --home HOME --atlas NAME

Each level's overlay counts the atlas's reference activations, except that every third cell
(i + j divisible by 3) gets none, so a page shows zero and non-zero cells side by side. The URL
chooses ``?style=`` (badge, heat, fade, off), ``?tiles=`` and ``?overlay=``: ``counts`` (that),
``compare`` (a diverging overlay: +log2 ratio where i + j ≡ 1 mod 3, − where ≡ 2, not significant
elsewhere) or ``class`` (an opacity-only overlay of the counts, as the class view); ``?state=``
a MapState as JSON, to restore (as a link would). The map's returned state is written
below it as JSON (``map-state``), with how many times the page ran (``runs``).
"""

from __future__ import annotations

import argparse
import json
import sys

import streamlit as st

from atlasq.appdata import CellOverlay
from atlasq.atlas import load_atlas
from atlasq.streamlit import MapState, atlas_map

st.set_page_config(page_title="atlas map test", layout="wide")
parser = argparse.ArgumentParser()
parser.add_argument("--home", required=True)
parser.add_argument("--atlas", required=True)
args = parser.parse_args(sys.argv[1:])


@st.cache_resource
def atlas_and_overlays(home: str, name: str, kind: str):
    atlas = load_atlas(name, home)
    overlays = {}
    for level in atlas.levels:
        cells = atlas.cells_at(level)
        rows = []
        for i, j, n, labels in zip(cells["i"], cells["j"], cells["count"], cells["top_labels"]):
            count = 0 if (i + j) % 3 == 0 else int(n)
            value = float(count)
            if kind == "compare":
                value = {0: float("nan"), 1: 1.0 + (n % 3), 2: -1.0 - (n % 2)}[(i + j) % 3]
            rows.append({"i": i, "j": j, "value": value, "count": count, "images": (count + 1) // 2,
                         "top_labels": list(labels[:3])})
        overlays[level] = {
            "counts": CellOverlay(rows, log=True, legend="test: activations per cell"),
            "compare": CellOverlay(rows, diverging=True, legend="test: log2 share ratio B / A (q < 0.05)"),
            "class": CellOverlay(rows, legend="test: attribution to a class (opacity)", opacity_only=True)}[kind]
    return atlas, overlays


atlas, overlays = atlas_and_overlays(args.home, args.atlas, st.query_params.get("overlay", "counts"))
st.session_state["runs"] = st.session_state.get("runs", 0) + 1
left, right = st.columns([3, 1])
with left:
    given = st.query_params.get("state")
    state = atlas_map(atlas, overlays, state=MapState.from_dict(json.loads(given)) if given else None,
                      overlay_style=st.query_params.get("style", "badge"),
                      tiles=st.query_params.get("tiles", "icons"), height=int(st.query_params.get("height", 600)))
with right:
    st.code(json.dumps({"state": state.__dict__, "runs": st.session_state["runs"]}, default=list), language="json")
