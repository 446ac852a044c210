"""The zoomable atlas map (atlasq.streamlit.atlas_map, in atlasq/streamlit/map_component.py): what
it sends, and, in headless Chromium, that zooming switches levels and every click or selection
names the cell drawn under the pointer.

The browser tests serve tests/apps/atlas_map_app.py (the map alone, over the session's
``atlas_home`` atlas: levels 10 and 20; every third cell's count set to 0) and drive Debian's
chromium with Playwright, as tests/test_app.py does; without /usr/bin/chromium they are skipped
unless ATLASQ_REQUIRE_BROWSER=1. Where a cell is expected, it is computed from the map's geometry
(zoom 1 fits the atlas square into the canvas; the view's zoom and centre are read from the page)
and checked against the pixels drawn there.
"""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from browser import headless_chromium, need_browser, served
from PIL import Image
from streamlit.testing.v1 import AppTest

from atlasq.appdata import CellOverlay
from atlasq.atlas import load_atlas
from atlasq.errors import InvalidOptionError
from atlasq.streamlit import MapState, atlas_map
from atlasq.streamlit.map_component import MIN_ICON_PX, TILE_PX, _current_state, map_payload

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "apps" / "atlas_map_app.py"
SCREENSHOTS = Path(os.environ.get("ATLASQ_SCREENSHOTS") or REPO / "tests" / "_screenshots")
HEIGHT = 600  # the test page's map height (its width follows the page)


# ----------------------------------------------------------------------------- what Python sends

def _payload(atlas, overlays=None):
    stored = {}

    def register(data: bytes, mimetype: str, name: str) -> str:
        stored[name] = data
        return f"/media/{name}"

    return map_payload(atlas, overlays, register=register), stored


def test_payload_sends_each_level_once_with_honest_top_classes(atlas_home):
    atlas = load_atlas("app", atlas_home)
    cells10 = atlas.cells_at(10)
    # an overlay that lists only some cells: the others hold none of the dataset's activations
    listed = {(i, j): n for i, j, n in zip(cells10["i"], cells10["j"], cells10["count"]) if (i + j) % 2}
    overlay = CellOverlay([{"i": i, "j": j, "value": float(n), "count": int(n), "images": 1, "top_labels": []}
                           for (i, j), n in listed.items()], log=True, legend="counts")
    levels, stored = _payload(atlas, {10: overlay})
    assert [level["size"] for level in levels] == sorted(atlas.levels)
    for level in levels:
        mosaic = Image.open(io.BytesIO(stored[f"atlas_map.mosaic.{level['size']}"]))
        assert mosaic.width == mosaic.height == level["tile"] * level["size"] and level["tile"] <= TILE_PX
    cells = json.loads(stored["atlas_map.cells.10"])
    assert cells["overlay"]["total"] == sum(listed.values())
    for r, (i, j) in enumerate(zip(cells["i"], cells["j"])):
        assert cells["n"][r] == listed.get((i, j), 0)
        row = atlas.cell_row(10, i, j)
        scores = dict(zip(cells10["top_labels"][row], cells10["top_scores"][row]))
        # top classes are the cell's classes with positive attribution, best first, with their score
        assert [label for label, _ in cells["top"][r]] == [k for k, s in scores.items() if s > 0][:3]
        assert all(score > 0 and abs(score - scores[label]) < 1e-3 for label, score in cells["top"][r])
    assert "overlay" not in json.loads(stored["atlas_map.cells.20"])  # no overlay given for 20
    # the same atlas and overlay give the same bytes (so the same media URL: the browser fetches once)
    assert _payload(atlas, {10: overlay})[1] == stored


def test_state_given_by_the_app_and_sent_by_the_browser(monkeypatch):
    import streamlit as st

    monkeypatch.setattr(st, "session_state", {})
    given = MapState(20, 2.0, (0.3, 0.4), ((20, 1, 2),), (20, 1, 2)).to_dict()
    assert _current_state("m", [10, 20], None, None) == MapState(10)  # nothing yet: the coarsest level
    assert _current_state("m", [10, 20], given, None) == MapState.from_dict(given)
    sent = {**MapState(10, 1.0, (0.5, 0.5), ((10, 3, 3),), (10, 3, 3)).to_dict(), "seq": 7}
    assert _current_state("m", [10, 20], given, sent).clicked == (10, 3, 3)  # a click wins
    # the app keeps passing its old state: the browser's latest stays
    assert _current_state("m", [10, 20], given, sent).clicked == (10, 3, 3)
    # a link may carry anything: zoom and centre come back in range, a non-state is refused
    assert MapState.from_dict({"level": 20, "zoom": -3, "center": [2, "nan"]}) == MapState(20, 1.0, (1.0, 0.5))
    for bad in ({"zoom": 2}, {"level": 20, "selected": [[1, 2]]}, {"level": "x"}):
        with pytest.raises(InvalidOptionError):
            MapState.from_dict(bad)
    changed = {**given, "selected": [[20, 5, 5]]}
    assert _current_state("m", [10, 20], changed, sent).selected == ((20, 5, 5),)  # the app's change wins
    assert _current_state("m", [10, 20], changed, sent).selected == ((20, 5, 5),)


def test_map_runs_in_apptest_and_refuses_unknown_styles(atlas_home, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["atlas_map_app.py", "--home", str(atlas_home), "--atlas", "app"])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    assert json.loads(at.code[0].value)["state"]["level"] == 10
    # what the browser sends on a click (see atlas_map's docstring), as a page's tests simulate it
    click = MapState(20, 2.0, (0.3, 0.4), ((20, 4, 9),), (20, 4, 9))
    at.session_state["atlas_map"] = {"view": {**click.to_dict(), "seq": 1}}
    at.run()
    assert MapState.from_dict(json.loads(at.code[0].value)["state"]) == click
    atlas = load_atlas("app", atlas_home)
    with pytest.raises(InvalidOptionError, match="overlay_style"):
        atlas_map(atlas, overlay_style="tint")


# ----------------------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def map_url(atlas_home):
    need_browser()
    with served(APP, "--home", str(atlas_home), "--atlas", "app") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def atlas(atlas_home):
    return load_atlas("app", atlas_home)


class MapPage:
    """One browser page showing the test app's map, with the map's geometry read from the page."""

    def __init__(self, browser, url: str, query: str = "", level: int = 10):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.goto(f"{url}/{query}")
        self.root = self.page.locator(".aq-map")
        self.page.wait_for_selector(f".aq-map[data-level='{level}']", timeout=120_000)
        self.page.wait_for_timeout(300)  # the first frame after the mosaic arrived

    def fresh(self) -> dict:
        """Back to the whole atlas with nothing selected and the pointer off the map."""
        self.root.focus()
        runs = self.state()["runs"]
        if self.state()["state"]["selected"]:
            self.page.keyboard.press("Escape")
            self.state(runs)
        self.page.keyboard.press("0")
        self.page.mouse.move(1, 1)
        self.page.wait_for_timeout(100)
        self.reported(self.view())  # the whole atlas, once the map has reported it
        return self.view()

    def view(self) -> dict:
        data = self.root.evaluate("e => ({...e.dataset})")
        cx, cy = map(float, data["center"].split(","))
        box = self.page.locator(".aq-canvas").bounding_box()
        return {"level": int(data["level"]), "wanted": int(data["wanted"]), "zoom": float(data["zoom"]),
                "cx": cx, "cy": cy, "box": box, "scale": min(box["width"], box["height"]) * float(data["zoom"])}

    @staticmethod
    def cell_centre(view: dict, level: int, i: int, j: int) -> tuple[float, float]:
        """Where on the page the centre of cell (i, j) of ``level`` is drawn."""
        box, s = view["box"], view["scale"]
        return (box["x"] + box["width"] / 2 + ((j + 0.5) / level - view["cx"]) * s,
                box["y"] + box["height"] / 2 + ((i + 0.5) / level - view["cy"]) * s)

    @staticmethod
    def visible_cells(view: dict, atlas, level: int, margin: float = 0.6) -> list[tuple[int, int]]:
        """The kept cells of ``level`` drawn whole inside the canvas."""
        cells = atlas.cells_at(level)
        box = view["box"]
        out = []
        for i, j in zip(cells["i"], cells["j"]):
            x, y = MapPage.cell_centre(view, level, i, j)
            pad = margin * view["scale"] / level
            if box["x"] + pad < x < box["x"] + box["width"] - pad and box["y"] + pad < y < box["y"] + box["height"] - pad:
                out.append((i, j))
        return out

    def state(self, runs_before: int | None = None) -> dict:
        """The MapState the page's script received (after one more run than ``runs_before``)."""
        code = self.page.locator("[data-testid='stCode'] code")
        if runs_before is not None:
            self.page.wait_for_function(
                "n => { const c = document.querySelector(\"[data-testid='stCode'] code\");"
                " return c && JSON.parse(c.innerText).runs > n; }", arg=runs_before, timeout=60_000)
        return json.loads(code.inner_text())

    def reported(self, view: dict) -> dict:
        """The MapState the page's script received once the map reported ``view`` (zoom and centre)."""
        self.page.wait_for_function(
            "v => { const c = document.querySelector(\"[data-testid='stCode'] code\"); if (!c) return false;"
            " const s = JSON.parse(c.innerText).state; return Math.abs(s.zoom - v.zoom) < 1e-3"
            " && Math.abs(s.center[0] - v.cx) < 1e-4 && Math.abs(s.center[1] - v.cy) < 1e-4; }",
            arg={"zoom": view["zoom"], "cx": view["cx"], "cy": view["cy"]}, timeout=60_000)
        return self.state()["state"]

    def drawn(self, view: dict, level: int, i: int, j: int) -> np.ndarray:
        return drawn(self.screenshot(), view, level, i, j)

    def screenshot(self) -> Image.Image:
        return Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")

    def zoom_in_until(self, level: int, x: float, y: float) -> dict:
        self.page.mouse.move(x, y)
        for _ in range(40):
            if self.view()["level"] == level:
                break
            self.page.mouse.wheel(0, -120)
            self.page.wait_for_timeout(50)
        self.page.wait_for_timeout(200)
        return self.view()

    def click(self, view: dict, level: int, cell: tuple[int, int], *, modifiers=()) -> dict:
        """Click the centre of ``cell`` as drawn; the state the page's script then received."""
        self.reported(view)  # a zoom or pan before has been reported: the next run is the click's
        runs = self.state()["runs"]
        x, y = self.cell_centre(view, level, *cell)
        self.page.mouse.move(x, y)
        for key in modifiers:
            self.page.keyboard.down(key)
        self.page.mouse.click(x, y)
        for key in modifiers:
            self.page.keyboard.up(key)
        return self.state(runs)["state"]


# Parts of a cell's square (left, top, right, bottom, as fractions of its side) that the tests
# read. With icons alone, the map writes the cell's coordinates and top label at the top left:
# MATCH is below them. With counts, a badge sits at the bottom right above a bar: BETWEEN is the
# part of the icon between the labels and the badge.
MATCH = (0.08, 0.5, 0.92, 0.95)
BETWEEN = (0.08, 0.38, 0.45, 0.6)


def drawn(shot: Image.Image, view: dict, level: int, i: int, j: int, part=MATCH) -> np.ndarray:
    """The pixels drawn in ``part`` of cell (i, j)."""
    x, y = MapPage.cell_centre(view, level, i, j)
    c = view["scale"] / level
    left, top, right, bottom = (x - c / 2 + f * c if k % 2 == 0 else y - c / 2 + f * c for k, f in enumerate(part))
    return np.asarray(shot.crop((round(left), round(top), round(right), round(bottom))), np.float32)


def _icon_match(pixels: np.ndarray, atlas, level: int, i: int, j: int) -> float:
    """Correlation of drawn pixels with the same part (MATCH) of cell (i, j)'s tile in the level's mosaic."""
    mosaic = Image.open(atlas.tiles_path(level)).convert("RGB")
    t = mosaic.width // level
    a, b, c, d = MATCH
    tile = mosaic.crop((j * t + a * t, i * t + b * t, j * t + c * t, i * t + d * t))
    tile = np.asarray(tile.resize(pixels.shape[1::-1], Image.Resampling.BILINEAR), np.float32)
    return float(np.corrcoef(pixels.ravel(), tile.ravel())[0, 1])


def _best_match(pixels, atlas, level, i, j) -> tuple[float, float]:
    """(match with cell (i, j), best match with any neighbouring kept cell)."""
    others = [_icon_match(pixels, atlas, level, i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
              if (di or dj) and atlas.cell_row(level, i + di, j + dj) is not None]
    return _icon_match(pixels, atlas, level, i, j), max(others, default=-1.0)


@pytest.fixture(scope="module")
def badge_map(browser, map_url):
    """The test app's map in its default style (count badges); tests start it with ``fresh()``."""
    m = MapPage(browser, map_url)
    yield m
    m.page.close()


@pytest.fixture(scope="module")
def plain_map(browser, map_url):
    """The map with icons alone (``?style=off``)."""
    m = MapPage(browser, map_url, "?style=off")
    yield m
    m.page.close()


def _save(m: MapPage, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    m.page.screenshot(path=str(SCREENSHOTS / name))


def test_wheel_zoom_switches_to_the_finer_level_and_a_click_returns_the_cell_under_it(plain_map, atlas):
    m = plain_map
    start = m.fresh()
    box = start["box"]
    assert start["level"] == 10 and start["scale"] / 10 >= MIN_ICON_PX  # 10×10 fits at >= 48 px an icon
    view = m.zoom_in_until(20, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert view["level"] == 20 and view["zoom"] > 1
    assert view["scale"] / 20 >= MIN_ICON_PX  # the finer level comes in only once its icons are big enough
    # the kept cell farthest from the centre, so a wrong offset or scale would land elsewhere
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    cell = max(m.visible_cells(view, atlas, 20),
               key=lambda c: np.hypot(*np.subtract(m.cell_centre(view, 20, *c), centre)))
    m.page.mouse.move(box["x"] + 2, box["y"] + box["height"] - 2)  # no hover outline over the cell
    own, other = _best_match(m.drawn(view, 20, *cell), atlas, 20, *cell)
    assert own > 0.6 and own > other + 0.2, (own, other)  # that cell's icon is drawn where computed
    state = m.click(view, 20, cell)
    assert state["clicked"] == [20, *cell] and state["selected"] == [[20, *cell]]
    assert state["level"] == 20 and abs(state["zoom"] - view["zoom"]) < 1e-3
    _save(m, "atlas_map_zoomed_20.png")


def test_fullscreen_clicks_land_on_the_cell_drawn_there(plain_map, atlas):
    m = plain_map
    before = m.fresh()
    m.page.locator(".aq-full").click()
    m.page.wait_for_function("() => document.fullscreenElement !== null", timeout=10_000)
    m.page.wait_for_timeout(300)
    try:
        view = m.view()
        assert view["box"]["width"] > before["box"]["width"] and view["box"]["height"] > before["box"]["height"]
        assert view["scale"] > before["scale"]  # the picture grew with the frame, not only the click boxes
        cells = m.visible_cells(view, atlas, view["level"])
        cell = cells[len(cells) // 3]
        m.page.mouse.move(view["box"]["x"] + 2, view["box"]["y"] + 2)
        own, other = _best_match(m.drawn(view, view["level"], *cell), atlas, view["level"], *cell)
        assert own > 0.6 and own > other + 0.2, (own, other)
        assert m.click(view, view["level"], cell)["clicked"] == [view["level"], *cell]
        _save(m, "atlas_map_fullscreen.png")
    finally:
        m.page.evaluate("() => document.fullscreenElement && document.exitFullscreen()")


def test_a_given_state_is_restored_and_the_keyboard_zooms_pans_and_resets(browser, map_url, atlas):
    cells = atlas.cells_at(20)
    centred, other = (20, cells["i"][0], cells["j"][0]), (20, cells["i"][1], cells["j"][1])
    centre = ((centred[2] + 0.5) / 20, (centred[1] + 0.5) / 20)
    given = MapState(20, 2.5, centre, (other,), None)
    m = MapPage(browser, map_url, "?state=" + urllib.parse.quote(json.dumps(given.to_dict())), level=20)
    try:
        restored = m.view()  # as a link would open it: that zoom, centre, level and selection
        assert (restored["zoom"], restored["level"]) == (2.5, 20)
        assert abs(restored["cx"] - centre[0]) < 1e-4 and abs(restored["cy"] - centre[1]) < 1e-4
        assert m.root.evaluate("e => e.querySelector('.aq-status').textContent").endswith("1 selected")
        m.root.focus()
        runs = m.state()["runs"]
        m.page.keyboard.press("Enter")  # selects the cell at the centre of the view
        state = m.state(runs)["state"]
        assert state["clicked"] == list(centred) and state["selected"] == [list(centred)]
        m.page.keyboard.press("0")
        assert m.view()["zoom"] == 1 and m.view()["level"] == 10
        for _ in range(10):
            if m.view()["level"] == 20:
                break
            m.page.keyboard.press("+")
        zoomed = m.view()
        assert zoomed["level"] == 20 and zoomed["scale"] / 20 >= MIN_ICON_PX
        m.page.keyboard.press("ArrowRight")
        m.page.keyboard.press("ArrowDown")
        panned = m.view()
        assert panned["cx"] > zoomed["cx"] and panned["cy"] > zoomed["cy"] and panned["zoom"] == zoomed["zoom"]
        m.page.keyboard.press("-")
        assert m.view()["zoom"] < panned["zoom"]
        m.page.keyboard.press("0")
        reset = m.view()
        assert reset["zoom"] == 1 and (reset["cx"], reset["cy"]) == (0.5, 0.5) and reset["level"] == 10
        # a pinch: two touch pointers moving apart zoom in around their midpoint, in the browser
        m.page.locator(".aq-canvas").evaluate("""c => {
            const r = c.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
            const send = (type, id, dx) => c.dispatchEvent(new PointerEvent(type, {pointerId: id,
                pointerType: "touch", clientX: x + dx, clientY: y, bubbles: true}));
            send("pointerdown", 11, -20); send("pointerdown", 12, 20);
            for (const d of [40, 60, 80]) { send("pointermove", 11, -d); send("pointermove", 12, d); }
            send("pointerup", 11, -80); send("pointerup", 12, 80);
        }""")
        pinched = m.view()
        assert 3.5 < pinched["zoom"] < 4.5 and abs(pinched["cx"] - 0.5) < 0.02, pinched  # 160 / 40 px apart
        # once the view rests, the map reports it (a rerun), as a selection would, but selecting nothing
        reported = m.reported(pinched)
        assert reported["level"] == pinched["level"] and reported["selected"] == state["selected"]
        assert m.view()["zoom"] == pinched["zoom"]  # the page's state, given back, does not move the map
        m.page.keyboard.press("0")
        reset = m.view()
        assert m.reported(reset)["zoom"] == 1
        state = m.click(reset, 10, m.visible_cells(reset, atlas, 10)[0])
        assert state["zoom"] == 1 and state["level"] == 10 and m.view()["zoom"] == 1
    finally:
        m.page.close()


def test_shift_click_and_shift_box_select_the_union(badge_map, atlas):
    m = badge_map
    view = m.fresh()
    cells = m.visible_cells(view, atlas, 10)
    a, b = cells[0], cells[-1]
    assert m.click(view, 10, a)["selected"] == [[10, *a]]
    state = m.click(view, 10, b, modifiers=["Shift"])
    assert sorted(map(tuple, state["selected"])) == sorted([(10, *a), (10, *b)])
    assert state["clicked"] == [10, *a]  # shift-click adds without moving the plain click
    # a box from the centre of cell (3, 3) to that of (6, 5), dragged with shift held
    x0, y0 = m.cell_centre(view, 10, 3, 3)
    x1, y1 = m.cell_centre(view, 10, 6, 5)
    kept = zip(atlas.cells_at(10)["i"], atlas.cells_at(10)["j"])
    inside = {(10, i, j) for i, j in kept if 3 <= i <= 6 and 3 <= j <= 5}
    assert inside - {(10, *a), (10, *b)}
    runs = m.state()["runs"]
    m.page.keyboard.down("Shift")
    m.page.mouse.move(x0 - 3, y0 - 3)
    m.page.mouse.down()
    m.page.mouse.move(x1 + 3, y1 + 3, steps=5)
    m.page.mouse.up()
    m.page.keyboard.up("Shift")
    state = m.state(runs)["state"]
    assert set(map(tuple, state["selected"])) == inside | {(10, *a), (10, *b)}
    assert state["zoom"] == view["zoom"] and state["center"] == [view["cx"], view["cy"]]  # a box drag does not pan
    _save(m, "atlas_map_selection.png")


def test_counts_leave_icons_as_they_are_and_zero_cells_stand_apart(badge_map, plain_map, browser, map_url, atlas):
    """Badges keep each icon's own pixels (no tint); cells the dataset does not reach (the test
    app's every third cell) are drawn faded and grey, so "none" never looks like "a few"."""
    heat = MapPage(browser, map_url, "?style=heat")
    try:
        shots = {}
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for style, m in (("off", plain_map), ("badge", badge_map), ("heat", heat)):
            view = m.fresh()
            shots[style] = (view, m.screenshot())
            shots[style][1].save(SCREENSHOTS / f"atlas_map_{style}.png")
        # the heat layer's switch, in the legend, turns it off in the browser (no rerun)
        heat.page.locator(".aq-heat-on").uncheck()
        heat.page.wait_for_timeout(100)
        shots["heat off"] = (heat.view(), heat.screenshot())
        heat.page.locator(".aq-heat-on").check()
        heat.page.locator(".aq-heat-opacity").fill("0.2")
        heat.page.wait_for_timeout(100)
        shots["heat 0.2"] = (heat.view(), heat.screenshot())
    finally:
        heat.page.close()
    cells = MapPage.visible_cells(shots["off"][0], atlas, 10)
    counts = dict(zip(zip(atlas.cells_at(10)["i"], atlas.cells_at(10)["j"]), atlas.cells_at(10)["count"]))
    zero = [c for c in cells if (c[0] + c[1]) % 3 == 0]
    some = [c for c in cells if (c[0] + c[1]) % 3 and counts[c] > 0]
    assert zero and some

    def pixels(style, cell):
        view, shot = shots[style]
        return drawn(shot, view, 10, *cell, part=BETWEEN)

    def saturation(p):
        return float((p.max(axis=2) - p.min(axis=2)).mean())

    for cell in some:  # the icon is the icon's own pixels
        assert np.abs(pixels("badge", cell) - pixels("off", cell)).mean() < 2, cell
    for cell in zero:  # faded towards white and grey
        off, badge = pixels("off", cell), pixels("badge", cell)
        assert badge.mean() > off.mean() + 20 and saturation(badge) < 0.5 * saturation(off) + 1, cell
    # the heat layer does tint (at the chosen opacity), and leaves zero cells as the badge style does
    assert np.mean([np.abs(pixels("heat", c) - pixels("off", c)).mean() for c in some]) > 15
    assert np.abs(pixels("heat", zero[0]) - pixels("badge", zero[0])).mean() < 2
    tint = {style: np.mean([np.abs(pixels(style, c) - pixels("off", c)).mean() for c in some])
            for style in ("heat", "heat 0.2", "heat off")}
    assert tint["heat off"] < 2 and 2 < tint["heat 0.2"] < 0.6 * tint["heat"], tint
