"""The Streamlit app: its logic with streamlit's AppTest, and end to end in headless Chromium.

The browser tests drive Debian's chromium with Playwright against `streamlit run app.py` (the
checkout's entry) and against `atlasq app` installed from a wheel, on free ports. They need
/usr/bin/chromium (installed by .ci/run); without it they are skipped, unless
ATLASQ_REQUIRE_BROWSER=1 (set by .ci/run), when a missing browser is a failure.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from browser import CHROMIUM, click_map_cell, free_port, headless_chromium, need_browser, served, wait_healthy
from PIL import Image
from streamlit.testing.v1 import AppTest

from atlasq import appdata, demo_model, serve
from atlasq.atlas import load_atlas
from atlasq.histogram import cell_images, histogram
from atlasq.indexer import IndexOptions, build_index
from atlasq.api import search_index
from atlasq.store import IndexStore, index_folder

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
SCREENSHOTS = Path(os.environ.get("ATLASQ_SCREENSHOTS") or REPO / "tests" / "_screenshots")


@pytest.fixture(scope="module")
def app_home(atlas_home, copy_home, tmp_path_factory):
    """A copy of the session's atlas_home (index ``sample``, atlas ``app``: 10×10 and 20×20, quick
    icons) plus index ``two`` (held-out images of two classes), both placed on the atlas, and
    ``layer4c`` (``two`` as if indexed at mixed4c only, so it cannot be placed on ``app``)."""
    home = copy_home(atlas_home)
    folder = tmp_path_factory.mktemp("two_files")
    for rel, _ in demo_model.held_out_paths(SAMPLE_DATA):
        if rel.split("/")[0] in ("red_discs", "stripes"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SAMPLE_DATA / rel, folder / rel)
    build_index(folder, "two", home=home, progress=False, precision="fp32",
                options=IndexOptions(model="demo", layers=("mixed5a",)))
    histogram("app", "sample", home=home)
    histogram("app", "two", home=home)
    shutil.copytree(home / "two", home / "layer4c")
    with IndexStore(index_folder("layer4c", home), read_only=False) as store:
        store.set_meta({"layers": ["mixed4c"]})  # as if indexed at another layer only: cannot be placed on "app"
    return home


def _app(home: Path, monkeypatch, index: str = "sample", query: dict | None = None) -> AppTest:
    """The package's page script (what `atlasq app` serves), as AppTest runs it (with ``query`` as
    the URL's parameters)."""
    monkeypatch.setenv("ATLASQ_HOME", str(home))
    monkeypatch.setattr(sys, "argv", ["webapp.py", "--atlas", "app", "--index", index])
    at = AppTest.from_file(str(serve.PAGE), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def _copy_home(app_home: Path, home: Path, images: Path | None = None) -> Path:
    """A home of its own holding copies of atlas ``app`` and index ``sample``; with ``images``, the
    index's images are copied there too and the index points at the copy (so a test may change them)."""
    shutil.copytree(app_home / "atlases" / "app", home / "atlases" / "app")
    shutil.copytree(app_home / "sample", home / "sample")
    if images is not None:
        shutil.copytree(SAMPLE_DATA, images)
        with IndexStore(index_folder("sample", home), read_only=False) as store:
            store.set_meta({"root": str(images.resolve())})
    return home


def _captions(at: AppTest) -> list[str]:
    """Captions of the gallery's images, in page order."""
    return [image.proto.imgs[0].caption for image in at.get("image")
            if image.proto.imgs[0].caption and image.proto.imgs[0].caption != "query"]


def _cells_by_images(home: Path, index: str = "sample", level: int = 10) -> list:
    """The cells holding images of ``index``, fullest (most activations) first, as the histogram ranks them."""
    result = histogram("app", index, home=home, level=level, place=False)
    return sorted((c for c in result.cells if c.images), key=lambda c: -c.activations)


class Ranked(list):
    """Paths, most typical first, that compare equal to a list of captions holding the same paths
    in the same order of distance (images whose distances tie at the stored precision may come
    in either order)."""

    def __init__(self, paths, distance: dict):
        super().__init__(paths)
        self.distance = distance

    def __getitem__(self, item):
        got = super().__getitem__(item)
        return Ranked(got, self.distance) if isinstance(item, slice) else got

    def __eq__(self, other):
        other = list(other)
        return (len(other) == len(self) and set(other) <= set(self.distance)
                and [self.distance[p] for p in other] == [self.distance[p] for p in self]
                and sorted(other) == sorted(self))

    __hash__ = None


def _union(home: Path, cells: list, index: str = "sample", level: int = 10, keep=lambda path, top1: True) -> Ranked:
    """The paths of the images in any of ``cells``, most typical first (an image ranks by its best
    activation in any of them), computed from :func:`cell_images` one cell at a time."""
    best: dict[int, tuple[float, str]] = {}
    for c in cells:
        for m in cell_images("app", index, c.i, c.j, home=home, level=level, k=100_000).images:
            if m.image_id not in best or m.cell_distance < best[m.image_id][0]:
                best[m.image_id] = (m.cell_distance, m.path)
    with IndexStore(index_folder(index, home)) as store:
        top1 = {r["id"]: r["top5_class"][0] for r in store.images(list(best))}
    kept = [(d, image_id, path) for image_id, (d, path) in best.items() if keep(path, top1[image_id])]
    return Ranked([path for d, image_id, path in sorted(kept)], {path: d for d, _, path in kept})


def _text(at: AppTest) -> str:
    return " ".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info])


# ----------------------------------------------------------------------------- app logic (AppTest)

def test_app_starts_with_summary_map_and_histogram_and_no_selection(app_home, monkeypatch):
    at = _app(app_home, monkeypatch)
    assert not at.exception, at.exception
    assert "activations per cell" in _text(at)
    metrics = {m.label: m.value for m in at.metric}
    with IndexStore(index_folder("sample", app_home)) as store:
        assert metrics["images"] == f"{store.count('images'):,}" and metrics["indexing errors"] == "0"
    assert metrics["off-atlas"].endswith("%") and metrics["icon fidelity"]
    assert "layer mixed5a" in _text(at) and "top predicted classes" in _text(at)
    frame = at.dataframe[0].value  # the concept histogram: fullest cell first, shares as bars
    fullest = _cells_by_images(app_home)[0]
    assert frame["cell"][0] == f"{fullest.i},{fullest.j}" and list(frame["activations"]) == \
        sorted(frame["activations"], reverse=True)
    assert "Select cells" in _text(at)
    assert not at.warning  # demo weights are real weights: no random-weights banner


def test_selected_cells_show_the_union_of_their_images_page_by_page(app_home, monkeypatch):
    cells = _cells_by_images(app_home)[:2]
    expected = _union(app_home, cells)
    at = _app(app_home, monkeypatch)
    at.multiselect(key="sel_cells").set_value([f"{c.i},{c.j}" for c in cells]).run()
    assert not at.exception, at.exception
    assert f"{len(expected):,} images" in _text(at) and len(expected) > 12
    assert _captions(at) == expected[:12]
    at.button(key="gallery_next").click().run()
    assert at.session_state["gallery_page"] == 1 and _captions(at) == expected[12:24]
    assert at.query_params["page"] == "1" and at.query_params["sel"] == "_".join(f"{c.i}.{c.j}" for c in cells)
    at.button(key="gallery_prev").click().run()
    assert _captions(at) == expected[:12]
    # the histogram marks the selected cells
    marked = [c for c in at.dataframe[0].value["cell"] if c.startswith("● ")]
    assert sorted(marked) == sorted(f"● {c.i},{c.j}" for c in cells)


def test_positions_are_outlined_from_the_atlas_without_the_network(app_home):
    """The atlas records its network's preprocessing, so the gallery outlines an image's positions
    without loading the network, pixel for pixel as the network's own transform draws them; an
    atlas from before it was recorded outlines them only when given the network."""
    atlas = load_atlas("app", app_home)
    model = appdata.index_network("sample", app_home)
    assert atlas.manifest["preprocess"] == model.transform.geometry.to_dict()
    older = dataclasses.replace(atlas, manifest={k: v for k, v in atlas.manifest.items() if k != "preprocess"})
    root = appdata.index_root("sample", app_home)
    with IndexStore(index_folder("sample", app_home)) as store:
        paths = [row["path"] for row in store.images()[::150]]
    positions = [{"y": 0, "x": 0}, {"y": 2, "x": 1}]
    for path in paths:  # images of other shapes: the boxes map back through resize and crop
        pixels = {name: np.asarray(appdata.image_tile(a, root, path, positions, model=m).image)
                  for name, a, m in (("atlas", atlas, None), ("network", older, model), ("none", older, None))}
        assert np.array_equal(pixels["atlas"], pixels["network"])
        assert not np.array_equal(pixels["atlas"], pixels["none"])  # outlines drawn, not a bare thumbnail
    assert appdata.outline_geometry(older) is None and appdata.outline_geometry(older, model) is model.transform


def _map_click(at: AppTest, level: int, cells: list, seq: int) -> AppTest:
    """What the map sends on a click (or shift-click: several cells selected), as its docstring says."""
    from atlasq.streamlit import MapState

    selected = tuple((level, c.i, c.j) for c in cells)
    at.session_state["atlas_map"] = {"view": {**MapState(level, 1.0, (0.5, 0.5), selected, selected[-1]).to_dict(),
                                              "seq": seq}}
    return at.run()


def test_map_clicks_select_cells_and_a_click_at_another_level_switches_the_level(app_home, monkeypatch):
    cells = _cells_by_images(app_home)[:2]
    at = _app(app_home, monkeypatch)
    _map_click(at, 10, cells[:1], 1)
    assert not at.exception, at.exception
    assert at.session_state["sel_cells"] == [f"{cells[0].i},{cells[0].j}"]
    assert _captions(at) == _union(app_home, cells[:1])[:12]
    _map_click(at, 10, cells, 2)  # shift-click: both
    assert _captions(at) == _union(app_home, cells)[:12]
    fine = _cells_by_images(app_home, level=20)[0]
    _map_click(at, 20, [fine], 3)  # zoomed in to the 20×20 level, then clicked
    assert at.session_state["level"] == 20 and at.selectbox(key="level").value == 20
    assert _captions(at) == _union(app_home, [fine], level=20)[:12]
    assert at.query_params["level"] == "20" and at.query_params["sel"] == f"{fine.i}.{fine.j}"


def test_filters_by_predicted_class_and_path_change_counts_bars_and_images(app_home, monkeypatch):
    cells = _cells_by_images(app_home)[:8]
    at = _app(app_home, monkeypatch)
    at.multiselect(key="sel_cells").set_value([f"{c.i},{c.j}" for c in cells]).run()
    all_bars = at.dataframe[0].value["activations"].sum()
    at.multiselect(key="predicted").set_value(["stripes"]).run()
    assert not at.exception, at.exception
    stripes = demo_model.CATEGORIES.index("stripes")
    expected = _union(app_home, cells, keep=lambda path, top1: top1 == stripes)
    assert 0 < len(expected) < len(_union(app_home, cells))
    assert f"{len(expected):,} images" in _text(at) and _captions(at) == expected[:12]
    bars = at.dataframe[0].value["activations"].sum()
    with IndexStore(index_folder("sample", app_home)) as store:
        counted = store.con.execute(
            "SELECT count(*) FROM placements p JOIN images im ON im.id = p.image_id WHERE atlas = 'app' AND level = 10 "
            "AND NOT off_atlas AND i IS NOT NULL AND im.top5_class[1] = ?", [stripes]).fetchone()[0]
    assert 0 < bars == counted < all_bars
    with IndexStore(index_folder("sample", app_home)) as store:
        kept = sum(r["top5_class"][0] == stripes for r in store.images())
    assert f"{kept:,} pass the filters" in at.metric[0].proto.help  # the summary follows too
    at.multiselect(key="predicted").set_value([]).run()
    at.text_input(key="path_pattern").set_value("red_discs/").run()
    expected = _union(app_home, cells, keep=lambda path, top1: "red_discs/" in path)
    assert _captions(at) == expected[:12] and all(c.startswith("red_discs/") for c in _captions(at))
    assert at.query_params["path"] == "red_discs/"


def test_the_url_holds_the_view_and_a_fresh_session_restores_it(app_home, monkeypatch):
    cells = _cells_by_images(app_home, level=20)[:2]
    at = _app(app_home, monkeypatch)
    at.selectbox(key="level").set_value(20).run()
    at.radio(key="view").set_value("class").run()
    at.selectbox(key="class_name").set_value("stripes").run()
    at.multiselect(key="sel_cells").set_value([f"{c.i},{c.j}" for c in cells]).run()
    at.button(key="gallery_next").click().run()
    url = dict(at.query_params)
    assert url["level"] == "20" and url["overlay"] == "class" and url["class"] == "stripes" and url["page"] == "1"
    assert url["index"] == "sample" and url["atlas"] == "app" and "zoom" in url
    # the map reports its view once a zoom or pan rests (see atlas_map): kept in the URL, and
    # neither the selection nor the page changes
    from atlasq.streamlit import MapState

    selected = tuple((20, c.i, c.j) for c in cells)
    at.session_state["atlas_map"] = {"view": {**MapState(20, 3.5, (0.3, 0.4), selected, None).to_dict(),
                                              "kind": "view", "seq": 41}}
    at.run()
    url = dict(at.query_params)
    assert url["zoom"] == "3.5" and url["center"] == "0.30000,0.40000" and "maplevel" not in url
    assert url["page"] == "1" and at.session_state["sel_cells"] == [f"{c.i},{c.j}" for c in cells]
    fresh = _app(app_home, monkeypatch, index="two", query=url)  # the link opened elsewhere
    assert not fresh.exception, fresh.exception
    assert fresh.session_state["index_name"] == "sample" and fresh.session_state["level"] == 20
    assert fresh.session_state["zoom"] == 3.5 and fresh.session_state["center"] == (0.3, 0.4)
    assert fresh.session_state["view"] == "class" and fresh.session_state["class_name"] == "stripes"
    assert fresh.session_state["sel_cells"] == [f"{c.i},{c.j}" for c in cells]
    assert fresh.session_state["gallery_page"] == 1 and _captions(fresh) == _captions(at)


def test_incompatible_index_is_marked_and_never_the_default_comparison(app_home, monkeypatch):
    home = app_home
    at = _app(home, monkeypatch)
    at.radio(key="view").set_value("compare").run()
    assert not at.exception, at.exception
    other = at.selectbox(key="other")
    assert other.value is None and other.options == ["two"]  # nothing chosen for the user; layer4c not offered
    assert any("layer4c" in c.value and "not offered" in c.value and "mixed5a" in c.value for c in at.sidebar.caption)
    assert not [b for b in at.button if b.key.startswith("place_")]
    other.set_value("two").run()
    frame = at.dataframe[0].value
    assert {"share sample", "share two", "difference"} <= set(frame.columns)
    assert any(d.startswith("★ more in two") for d in frame["difference"])
    at = _app(home, monkeypatch, index="layer4c")  # chosen anyway: the reason, no counts, no "Place it now"
    assert not at.exception, at.exception
    assert any("cannot be shown on atlas" in w.value and "mixed5a" in w.value for w in at.warning)
    assert not [b for b in at.button if b.key.startswith("place_")]
    assert "reference activations per cell" in _text(at)


def test_export_csv_holds_exactly_the_union_and_the_zip_its_files(app_home, monkeypatch):
    import csv
    import zipfile

    cells = _cells_by_images(app_home)[:3]
    atlas = load_atlas("app", app_home)
    files = appdata.selection_files(atlas, "sample", 10, [(c.i, c.j) for c in cells], home=app_home)
    rows = list(csv.reader(io.StringIO(appdata.selection_csv(files).decode())))
    assert rows[0] == ["image_id", "path"] and [r[1] for r in rows[1:]] == _union(app_home, cells)
    root = appdata.index_root("sample", app_home)
    with zipfile.ZipFile(io.BytesIO(appdata.selection_zip(root, files[:5]))) as archive:
        assert archive.namelist() == [f["path"] for f in files[:5]]
        assert archive.read(files[0]["path"]) == (root / files[0]["path"]).read_bytes()
    at = _app(app_home, monkeypatch)
    at.multiselect(key="sel_cells").set_value([f"{c.i},{c.j}" for c in cells]).run()
    assert not at.info and [b.proto.label for b in at.get("download_button")] == ["CSV of paths", "zip of files"]
    monkeypatch.setattr(appdata, "ZIP_CAP_BYTES", 1000)  # far below the selection's size
    with pytest.raises(appdata.AppError, match="more than the 0 MB"):
        appdata.selection_zip(root, files)
    at.run()
    assert any("more than the" in i.value and "download the CSV" in i.value for i in at.info)


def test_labels_are_only_classes_with_positive_attribution(app_home):
    atlas = load_atlas("app", app_home)
    stored = atlas.cells.to_pydict()
    negative = sum(s <= 0 for scores in stored["top_scores"] for s in scores)
    assert negative, "the quick atlas has cells whose stored top-5 includes classes they argue against"
    for g in atlas.levels:
        cells = atlas.cells_at(g)
        assert all(s > 0 for scores in cells["top_scores"] for s in scores)
        assert all(len(l) == len(s) == len(c) for l, s, c in zip(cells["top_labels"], cells["top_scores"],
                                                                   cells["top_classes"]))
    rows, _ = appdata.cell_rows(atlas, "sample", 10, home=app_home)
    result = histogram("app", "sample", home=app_home, level=10, place=False)  # what the CLI prints
    assert [r["top_labels"] for r in rows] == [c.top_labels for c in result.cells]


def test_missing_atlas_and_random_weights_are_shown_as_messages(tmp_path, app_home, monkeypatch):
    at = _app(tmp_path, monkeypatch)
    assert not at.exception and "No finished atlas" in at.info[0].value
    home = tmp_path / "copy"
    shutil.copytree(app_home / "atlases" / "app", home / "atlases" / "app")
    manifest = home / "atlases" / "app" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"random_weights": false', '"random_weights": true'))
    at = _app(home, monkeypatch)
    assert not at.exception and "RANDOM weights" in at.warning[0].value


def test_images_are_read_only_from_inside_the_index_root(app_home):
    root = Path(load_atlas("app", app_home).manifest["index_root"])
    assert appdata.safe_image_path(root, "red_discs/red_discs_000.jpg").is_relative_to(root.resolve())
    for escape in ("../../etc/passwd", "/etc/passwd"):
        with pytest.raises(appdata.AppError):
            appdata.safe_image_path(root, escape)


def test_folders_that_are_not_complete_indexes_are_left_out_with_the_reason(app_home, tmp_path, monkeypatch):
    """A failed first `atlasq index` run, a damaged index.duckdb or a stray folder is never offered
    as a dataset (picking one crashed the app with KeyError: 'root'); the app says why it is left out."""
    home = _copy_home(app_home, tmp_path / "home")
    (home / "empty").mkdir()                                  # what a failed run may leave
    IndexStore.create(home / "unfinished").close()            # a database whose first run stopped early
    (home / "garbage").mkdir()
    (home / "garbage" / "index.duckdb").write_text("not a database\n" * 100)
    assert appdata.list_indexes(home) == ["sample"]
    problems = appdata.index_problems(home)
    assert {"empty", "unfinished", "garbage"} <= set(problems) and "sample" not in problems
    assert "atlases" not in problems  # the home's own folders are not candidates
    assert "no index.duckdb" in problems["empty"] and "unfinished" in problems["unfinished"]
    for name in ("unfinished", "garbage"):
        at = _app(home, monkeypatch, index=name)
        assert not at.exception, at.exception
        assert any(name in w.value and "cannot be shown" in w.value for w in at.warning)
        assert at.session_state["index_name"] == "sample"  # the app falls back to a readable dataset
        assert "activations per cell" in _text(at)


def test_images_turned_into_links_out_of_the_root_or_loops_get_unavailable_tiles(app_home, tmp_path, monkeypatch):
    """An indexed image later replaced by a symlink out of the index's folder, or by a symlink
    loop, is shown as a grey "unavailable" tile with the reason, not a traceback."""
    home = _copy_home(app_home, tmp_path / "home", images=tmp_path / "images")
    cell = _cells_by_images(home)[0]
    paths = [m.path for m in cell_images("app", "sample", cell.i, cell.j, home=home, k=12).images]
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64), (0, 128, 255)).save(outside)
    root = appdata.index_root("sample", home)
    (root / paths[0]).unlink()
    (root / paths[0]).symlink_to(outside)
    (root / paths[1]).unlink()
    (root / paths[1]).symlink_to(root / paths[1])             # a loop: the link points at itself

    at = _app(home, monkeypatch)
    at.multiselect(key="sel_cells").set_value([f"{cell.i},{cell.j}"]).run()
    assert not at.exception, at.exception
    captions = _captions(at)
    assert captions[0].startswith(paths[0]) and "unavailable" in captions[0] and "outside" in captions[0]
    assert captions[1].startswith(paths[1]) and "unavailable" in captions[1]
    assert captions[2:] == paths[2:]


# ----------------------------------------------------------------------------- end to end, in a browser

@pytest.fixture(scope="module")
def served_app(app_home):
    need_browser()
    # the checkout's entry, as the README gives it: streamlit run app.py -- --home H
    with served(REPO / "app.py", "--home", str(app_home), "--atlas", "app", "--index", "sample") as url:
        yield url


def _env(**extra) -> dict:
    """The environment without the test's own ATLASQ_HOME (each command names its home)."""
    env = {k: v for k, v in os.environ.items() if k != "ATLASQ_HOME"}
    return {**env, **extra}


def _start(command: list[str], **kwargs) -> subprocess.Popen:
    """Start a command in a session of its own, so that :func:`_stop` ends it with any children."""
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _stop(process: subprocess.Popen) -> tuple[str, str]:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium driven by Playwright (one per module: its sync API cannot nest)."""
    with headless_chromium() as browser:
        yield browser


def _open(chromium, url: str, width: int = 1500, height: int = 1800):
    """A fresh browser page (no session, no cookies) on ``url``, once the app has drawn its gallery
    area and finished running."""
    page = chromium.new_context(viewport={"width": width, "height": height}, accept_downloads=True).new_page()
    page.goto(url)
    page.get_by_text("activations per cell").first.wait_for(timeout=240_000)
    _settled(page)
    return page


_BUSY = """() => !document.querySelector("[data-testid='stStatusWidget'], [data-testid='stSkeleton'], [data-stale='true']")"""


def _settled(page) -> None:
    """Wait until Streamlit has no run in progress and every element is drawn (no status widget,
    no skeleton, nothing stale), twice in a row."""
    for _ in range(2):
        page.wait_for_timeout(300)
        page.wait_for_function(_BUSY, timeout=240_000)


def _gallery_captions(page) -> list[str]:
    return [c for c in page.locator("[data-testid='stImageCaption']").all_inner_texts() if c != "query"]


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def _click_cell(page, level: int, i: int, j: int, *, shift: bool = False) -> None:
    """Click cell (i, j) on the map showing grid ``level`` (shift-click adds it to the selection)."""
    page.wait_for_selector(f".aq-map[data-level='{level}']", timeout=60_000)
    click_map_cell(page, i, j, shift=shift)
    _settled(page)


def test_browser_a_deep_link_restores_the_view(served_app, chromium, app_home):
    cells = _cells_by_images(app_home, level=20)[:2]
    expected = _union(app_home, cells, level=20)
    sel = "_".join(f"{c.i}.{c.j}" for c in cells)
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app&level=20&overlay=class&class=stripes&sel={sel}&page=1")
    try:
        page.get_by_text("attribution to stripes").first.wait_for(timeout=60_000)  # the map's legend
        page.get_by_text("page 2 of").first.wait_for(timeout=60_000)  # the gallery, drawn in its own fragment
        page.wait_for_function("document.querySelectorAll(\"[data-testid='stImageCaption']\").length >= 12",
                               timeout=60_000)  # its tiles arrive after its paging line
        _settled(page)
        assert _gallery_captions(page)[:12] == expected[12:24]
        _shot(page, "app_class.png")
        # the URL keeps the view as the page writes it back
        url = page.url
        assert "level=20" in url and "class=stripes" in url and f"sel={sel}" in url and "page=1" in url
    finally:
        page.close()


def _map_view(page) -> dict:
    """The map's view as the page draws it (its element's data attributes) and its canvas's box."""
    data = page.locator(".aq-map").first.evaluate("e => ({...e.dataset})")
    cx, cy = map(float, data["center"].split(","))
    box = page.locator(".aq-canvas").first.bounding_box()
    return {"level": int(data["level"]), "zoom": float(data["zoom"]), "cx": cx, "cy": cy, "box": box,
            "scale": min(box["width"], box["height"]) * float(data["zoom"])}


def test_browser_a_wheel_zoom_lives_in_the_url_and_a_fresh_browser_restores_it(served_app, chromium, app_home):
    """Zoom and pan happen in the browser; once the view rests the map reports it and the page
    writes it into the URL. That URL opened in a fresh browser draws the same level, zoom and
    centre, and a click at the same place selects the same cell there."""
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app")
    fresh = None
    try:
        box = _map_view(page)["box"]
        # off the centre, so that zooming there moves the view's centre too
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.35)
        for _ in range(40):
            if _map_view(page)["level"] == 20:
                break
            page.mouse.wheel(0, -120)
            page.wait_for_timeout(50)
        page.mouse.wheel(0, -120)  # one step more, so the zoom is not where the level switched
        page.wait_for_timeout(100)
        view = _map_view(page)
        assert view["level"] == 20 and view["zoom"] > 1 and (view["cx"], view["cy"]) != (0.5, 0.5)
        page.wait_for_function("z => new URLSearchParams(location.search).get('zoom') === z",
                               arg=f"{view['zoom']:g}", timeout=60_000)
        _settled(page)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
        assert query["maplevel"] == ["20"] and query["level"] == ["10"]  # the histogram stays at 10 until a click
        cx, cy = map(float, query["center"][0].split(","))
        assert abs(cx - view["cx"]) < 1e-6 and abs(cy - view["cy"]) < 1e-6
        assert "sel" not in query  # a zoom selects nothing

        fresh = _open(chromium, page.url)  # a new browser context: no session, no cookies
        fresh.wait_for_selector(".aq-map[data-level='20']", timeout=60_000)
        fresh.wait_for_timeout(300)  # the first frame with the level's mosaic
        again = _map_view(fresh)
        assert again["level"] == 20 and abs(again["zoom"] - view["zoom"]) < 1e-3
        assert abs(again["cx"] - view["cx"]) < 1e-6 and abs(again["cy"] - view["cy"]) < 1e-6
        _shot(fresh, "app_zoom_link.png")

        # the same point of both pages: a kept cell of level 20 near the canvas's bottom right
        atlas = load_atlas("app", app_home)
        cells = atlas.cells_at(20)

        def where(v, i, j):
            return (v["box"]["x"] + v["box"]["width"] / 2 + ((j + 0.5) / 20 - v["cx"]) * v["scale"],
                    v["box"]["y"] + v["box"]["height"] / 2 + ((i + 0.5) / 20 - v["cy"]) * v["scale"])

        with_images = {(c.i, c.j) for c in _cells_by_images(app_home, level=20)}
        inside = [(i, j) for i, j in zip(cells["i"], cells["j"]) if (i, j) in with_images
                  and box["x"] + 30 < where(view, i, j)[0] < box["x"] + box["width"] - 30
                  and box["y"] + 30 < where(view, i, j)[1] < box["y"] + box["height"] - 30]
        assert inside
        cell = max(inside, key=lambda c: sum(where(view, *c)))
        assert again["box"] == view["box"]
        chosen = []
        for p, v in ((page, view), (fresh, again)):
            p.mouse.click(*where(v, *cell))
            p.wait_for_function("s => new URLSearchParams(location.search).get('sel') === s",
                                arg=f"{cell[0]}.{cell[1]}", timeout=60_000)
            _settled(p)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(p.url).query)
            chosen.append((query["level"], query["sel"], _gallery_captions(p)[:12]))
        assert chosen[0] == chosen[1] and chosen[0][0] == ["20"]
        assert chosen[0][2] == _union(app_home, [SimpleNamespace(i=cell[0], j=cell[1])], level=20)[:12]
    finally:
        page.close()
        if fresh is not None:
            fresh.close()


def test_browser_cells_clicked_and_shift_clicked_give_their_union_and_its_csv(served_app, chromium, app_home):
    cells = _cells_by_images(app_home)[:2]
    expected = _union(app_home, cells)
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app")
    try:
        _shot(page, "app_counts.png")
        _click_cell(page, 10, cells[0].i, cells[0].j)
        _click_cell(page, 10, cells[1].i, cells[1].j, shift=True)
        page.get_by_text(f"{len(expected):,} images").first.wait_for(timeout=60_000)
        page.wait_for_function("n => document.querySelectorAll(\"[data-testid='stImageCaption']\").length >= n",
                               arg=min(12, len(expected)), timeout=60_000)  # the tiles come after that line
        _settled(page)
        assert _gallery_captions(page)[:12] == expected[:12]
        with page.expect_download() as download:
            page.get_by_role("button", name="CSV of paths").click()
        rows = Path(download.value.path()).read_text().splitlines()
        assert rows[0] == "image_id,path" and expected == [r.split(",", 1)[1] for r in rows[1:]]
        _shot(page, "app_selection.png")
        page.locator("[data-testid='stButton'] button", has_text="⤢").first.click()
        page.get_by_text("Top-5 predictions").wait_for(timeout=60_000)
        _settled(page)
        page.wait_for_function("() => [...document.querySelectorAll(\"[role='dialog'] img\")]"
                               ".some(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
        dialog = page.locator("[role='dialog']").bounding_box()
        assert dialog["width"] >= 700  # a useful size, not the image's native 65 px
        _shot(page, "app_dialog.png")
        # the Layers view is drawn when chosen (not with the image: the Inspect view takes seconds)
        assert page.locator("[role='dialog']").get_by_text("mixed5a", exact=True).count() == 0
        page.locator("[role='dialog']").get_by_text("Layers", exact=True).click()
        page.locator("[role='dialog']").get_by_text("mixed5a", exact=True).first.wait_for(timeout=120_000)
        _settled(page)
        assert page.get_by_text("Top-5 predictions").count() == 0
        _shot(page, "app_dialog_layers.png")
    finally:
        page.close()


def test_browser_compare_offers_only_placeable_datasets(served_app, chromium):
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app&overlay=compare")
    try:
        page.get_by_text("not offered").first.wait_for(timeout=60_000)
        assert page.get_by_text("layer4c").count() >= 1
        chooser = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").filter(has_text="Compare with")
        box = chooser.locator("input[role='combobox']")
        assert box.input_value() == "" and box.get_attribute("placeholder") == "choose a dataset"  # nothing by default
        assert page.locator("[data-testid='stException']").count() == 0
        box.click()
        page.get_by_role("option", name="two").click()
        page.get_by_text("two vs sample").first.wait_for(timeout=60_000)  # the comparison's summary under the bars
        _settled(page)
        _shot(page, "app_compare.png")
    finally:
        page.close()


def test_browser_at_1000_px_nothing_overlaps_and_no_button_is_empty(served_app, chromium, app_home):
    cells = _cells_by_images(app_home)[:1]
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app&sel={cells[0].i}.{cells[0].j}", width=1000)
    try:
        page.get_by_text("CSV of paths").first.wait_for(timeout=60_000)
        _settled(page)
        _shot(page, "app_1000px.png")
        empty = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stMain"] button')]
            .filter(b => b.offsetParent !== null && !b.closest('details:not([open])') && b.checkVisibility()
                         && !b.innerText.trim() && !b.getAttribute('aria-label')
                         && !b.getAttribute('title') && !b.querySelector('svg,img'))
            .map(b => [b.textContent, b.closest('[data-testid^="st"]:not(button)')?.getAttribute('data-testid'),
                       JSON.stringify(b.getBoundingClientRect())])""")
        assert empty == [], empty
        # the main area's blocks side by side (map | histogram; the gallery's columns) do not overlap
        overlaps = page.evaluate("""() => {
            const out = [];
            for (const row of document.querySelectorAll('[data-testid="stMain"] [data-testid="stHorizontalBlock"]')) {
                const cols = [...row.children].map(c => c.getBoundingClientRect()).filter(r => r.width > 0);
                for (let a = 0; a < cols.length; a++) for (let b = a + 1; b < cols.length; b++)
                    if (cols[a].right > cols[b].left + 1 && cols[b].right > cols[a].left + 1 &&
                        cols[a].bottom > cols[b].top + 1 && cols[b].bottom > cols[a].top + 1) out.push([a, b]);
                for (const child of row.querySelectorAll('[data-testid="stColumn"] > div')) {
                    const c = child.getBoundingClientRect(), p = child.parentElement.getBoundingClientRect();
                    if (c.right > p.right + 2) out.push(['wider than its column', c.width, p.width]);
                }
            }
            return out; }""")
        assert overlaps == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 1000
    finally:
        page.close()


def test_browser_search_results_replace_the_cell_panel(served_app, chromium, app_home, tmp_path):
    query = tmp_path / "query.png"
    first = sorted(os.listdir(SAMPLE_DATA / "stripes"))[0]
    Image.open(SAMPLE_DATA / "stripes" / first).save(query)
    cell = _cells_by_images(app_home)[0]
    page = _open(chromium, f"{served_app}/?index=sample&atlas=app&sel={cell.i}.{cell.j}")
    try:
        page.get_by_text("Search by image").click()
        page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(query))
        page.get_by_text("Nearest images").wait_for(timeout=120_000)
        _settled(page)
        shown = [c.rsplit(" (", 1)[0] for c in _gallery_captions(page) if "(" in c]
        library = search_index("sample", str(query), k=len(shown), home=app_home)["hits"]
        assert len(shown) >= 8 and shown == [h["path"] for h in library], (shown, library)
        assert shown[0] == f"stripes/{first}", shown  # the file itself
        assert page.get_by_text("CSV of paths").count() == 0  # the results replaced the cell's gallery
        assert page.locator("[data-testid='stButton'] button", has_text="≈").count() >= len(shown)
        _shot(page, "app_search.png")
    finally:
        page.close()


# ----------------------------------------------------------------------------- the `atlasq app` command

def _other_local_address() -> str | None:
    """An address of this machine other than loopback (that of the default route), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_atlasq_app_listens_on_this_machine_only_unless_told(tmp_path):
    """The app can write (Place it now), so by default it binds 127.0.0.1 and only --host exposes it;
    Streamlit's usage statistics and developer toolbar (Deploy) are off."""
    command = serve.streamlit_command(tmp_path, port=free_port())
    flags = dict(zip(command[command.index("run") + 2:command.index("--")][::2],
                     command[command.index("run") + 2:command.index("--")][1::2]))
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--client.toolbarMode"] == "minimal"
    assert flags["--runner.postScriptGC"] == "false" and flags["--server.fileWatcherType"] == "none"
    assert serve.streamlit_command(tmp_path, host="0.0.0.0", port=free_port())[command.index("--server.address") + 1] \
        == "0.0.0.0"

    other = _other_local_address()
    for host in (None, "0.0.0.0") if other else (None,):
        port = free_port()
        app = _start([sys.executable, "-m", "atlasq.cli", "app", "--home", str(tmp_path), "--port", str(port),
                      *(["--host", host] if host else [])], cwd=REPO, env=_env(ATLASQ_HOME="/nonexistent"))
        try:
            wait_healthy(f"http://127.0.0.1:{port}", app)
            if other:
                assert _reachable(other, port) == (host == "0.0.0.0"), (host, other)
            environ = Path(f"/proc/{app.pid}/environ")  # Streamlit took the command's process
            if environ.exists():
                values = dict(item.split("=", 1) for item in environ.read_bytes().decode(errors="replace").split("\0")
                              if "=" in item)
                assert values.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS", "1")
        finally:
            _, err = _stop(app)
        assert f"atlasq app on http://{host or '127.0.0.1'}:{port}" in err


def test_the_app_is_served_with_one_thread_per_numeric_pool_unless_the_user_says_otherwise():
    env = serve.app_environment({"PATH": "/bin"})
    assert all(env[name] == "1" for name in serve.APP_THREADS) and env["PATH"] == "/bin"
    assert serve.app_environment({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"


def test_atlasq_app_fails_with_one_line_when_home_is_missing_or_port_is_busy(tmp_path):
    def run(*args):
        process = _start([sys.executable, "-m", "atlasq.cli", "app", *args], cwd=REPO, env=_env())
        try:
            process.wait(timeout=60)
        finally:
            out, err = _stop(process)  # an app that started anyway is stopped, and the test fails below
        return process.returncode, out, err

    code, out, err = run("--home", str(tmp_path / "missing"), "--port", str(free_port()))
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: home folder {tmp_path / 'missing'} does not exist: build an index "
                                        f"there first (`atlasq index DIR --name NAME --home {tmp_path / 'missing'}`) "
                                        f"or pass the right --home"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run("--home", str(tmp_path), "--port", str(port))
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"port {port}" in lines[0] and "in use" in lines[0]
    code, out, err = run("--home", str(tmp_path), "--port", "70000")
    assert code != 0 and err.strip().splitlines() == ["error: --port must be between 1 and 65535, not 70000"]


def test_the_installed_wheel_serves_the_app_from_anywhere(app_home, tmp_path, request):
    """`atlasq app` from a wheel installed (not editable) in a fresh virtual environment, started
    outside the checkout, serves a page whose script runs (seen in the browser where there is one,
    else run by the installed streamlit's AppTest). The fresh environment borrows this one's
    dependencies through a .pth file (torch is not installed twice) but has its own atlasq."""
    browser = request.getfixturevalue("chromium") if CHROMIUM.is_file() or \
        os.environ.get("ATLASQ_REQUIRE_BROWSER") == "1" else None
    package, page, purelib = _serve_installed_wheel(app_home, tmp_path, browser)
    assert package.is_relative_to(purelib) and page.is_relative_to(purelib)  # the wheel's, not the checkout's
    assert page.is_file()


def _serve_installed_wheel(app_home: Path, tmp_path: Path, browser) -> tuple[Path, Path, Path]:
    """Build and install the wheel, serve the app from it; (package folder, page file, the fresh
    venv's site-packages) as the installed interpreter reports them."""
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "atlasq", source / "atlasq", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    isolation = ["--no-build-isolation"] if _importable("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(source)], check=True, env=_env(), cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("atlasq-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[kind] for kind in ("purelib", "platlib"))
    (Path(purelib) / "borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=_env())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in _env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    package, page = subprocess.run([str(python), "-c", "import atlasq.serve; print(atlasq.__file__); print(atlasq.serve.PAGE)"],
                                   cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    port = free_port()
    app = _start([str(venv / "bin" / "atlasq"), "app", "--home", str(app_home), "--atlas", "app", "--index", "sample",
                  "--port", str(port)], cwd=elsewhere, env={**env, "BROWSER": "none"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, app)
        if browser is not None:
            _assert_page_runs(browser, url)
        else:  # no browser here: the installed page script, run by the installed streamlit
            subprocess.run([str(python), "-c", _APPTEST.format(page=page, home=str(app_home))], cwd=elsewhere, env=env,
                           check=True, timeout=300)
    finally:
        _stop(app)
    return Path(package), Path(page), Path(purelib)


_APPTEST = """
import sys
from streamlit.testing.v1 import AppTest
sys.argv = ["webapp.py", "--home", {home!r}, "--atlas", "app", "--index", "sample"]
at = AppTest.from_file({page!r}, default_timeout=120).run()
assert not at.exception, at.exception
assert "activations per cell" in " ".join(c.value for c in at.caption)
"""


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _assert_page_runs(browser, url: str) -> None:
    """The page's script ran to the end (the atlas chart is drawn) without an exception, and there
    is no Deploy button."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        page.goto(url)
        page.get_by_text("activations per cell").first.wait_for(timeout=120_000)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.get_by_role("button", name="Deploy").count() == 0
    finally:
        page.close()


def test_the_readme_dashboard_runs_and_its_views_answer(app_home, monkeypatch):
    """The README's example dashboard, run as written on the demo's names (here the test atlas
    ``app``): it draws the summary, the histogram and (with a row chosen) that cell's images."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- dashboard example: tests/test_app.py runs this block -->\n```python\n", 1)[1]
    code = block.split("```", 1)[0].replace('load_atlas("sample")', 'load_atlas("app")')
    monkeypatch.setenv("ATLASQ_HOME", str(app_home))
    at = AppTest.from_string(code, default_timeout=120).run()
    assert not at.exception, at.exception
    assert {m.label for m in at.metric} >= {"images", "off-atlas", "icon fidelity"}
    filled = _cells_by_images(app_home)
    frame = at.dataframe[0].value
    assert list(frame["cell"]) == [f"{c.i},{c.j}" for c in filled[:20]]  # fullest first, at most 20
    assert "Select cells" in _text(at)  # nothing chosen yet: the gallery says what to do


def test_a_dataset_with_several_layers_switches_between_their_atlases(app_home, tmp_path, monkeypatch):
    """Index ``sample`` samples mixed4c and mixed5a; with an atlas for each, a layer selector
    switches the atlas (here a copy of ``app`` relabelled as a mixed4c atlas stands for one)."""
    import json

    home = _copy_home(app_home, tmp_path / "home")
    shutil.copytree(home / "atlases" / "app", home / "atlases" / "app4c")
    manifest = home / "atlases" / "app4c" / "manifest.json"
    facts = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**facts, "name": "app4c", "layer": "mixed4c"}))
    at = _app(home, monkeypatch)
    assert not at.exception, at.exception
    layer = at.sidebar.radio(key="layer")
    assert layer.options == ["mixed4c", "mixed5a"] and layer.value == "mixed5a"
    layer.set_value("mixed4c").run()
    assert not at.exception, at.exception
    assert at.session_state["atlas_name"] == "app4c" and at.query_params["atlas"] == "app4c"
    assert "layer mixed4c" in _text(at)
