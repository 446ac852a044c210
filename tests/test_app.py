"""The Streamlit app: its logic with streamlit's AppTest, and end to end in headless Chromium.

The browser test drives Debian's chromium with Playwright against `streamlit run app.py` on a free
port. It needs /usr/bin/chromium (installed by .ci/run); without it the test is skipped, unless
ATLASQ_REQUIRE_BROWSER=1 (set by .ci/run), when a missing browser is a failure.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from atlasq import appdata, demo_model
from atlasq.atlas import AtlasOptions, build_atlas, load_atlas
from atlasq.histogram import cell_images, histogram
from atlasq.indexer import IndexOptions, build_index
from atlasq.api import search_index

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("ATLASQ_SCREENSHOTS") or REPO / "tests" / "_screenshots")


@pytest.fixture(scope="module")
def app_home(atlas_home, copy_home, tmp_path_factory):
    """A copy of the session's atlas_home (index ``sample``, atlas ``app``: 10×10 and 20×20, quick
    icons) plus index ``two`` (held-out images of two classes), both placed on the atlas."""
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
    return home


def _app(home: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ATLASQ_HOME", str(home))
    monkeypatch.setattr(sys, "argv", ["app.py", "--atlas", "app", "--index", "sample"])
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    return at.run()


def _captions(at: AppTest) -> list[str]:
    """Captions of the images shown, in page order (the colour bar has none)."""
    return [image.proto.imgs[0].caption for image in at.get("image") if image.proto.imgs[0].caption]


def _fullest_cell(home: Path, index: str = "sample", level: int = 10) -> dict:
    result = histogram("app", index, home=home, level=level, place=False)
    return max(result["cells"], key=lambda c: c["images"])


# ----------------------------------------------------------------------------- app logic (AppTest)

def test_app_starts_on_the_atlas_with_counts_and_no_cell(app_home, monkeypatch):
    at = _app(app_home, monkeypatch)
    assert not at.exception, at.exception
    assert "activations per cell" in " ".join(c.value for c in at.caption)
    assert any("Click a cell" in m.value for m in at.markdown)
    assert not at.warning  # demo weights are real weights: no random-weights banner


def test_choosing_a_cell_shows_its_images_and_pages_through_them(app_home, monkeypatch):
    cell = _fullest_cell(app_home)
    at = _app(app_home, monkeypatch)
    at.selectbox(key="cell_picker_10").set_value(f"{cell['i']},{cell['j']}").run()
    assert at.session_state["cell"] == (cell["i"], cell["j"])
    assert at.subheader[0].value == f"Cell {cell['i']},{cell['j']}"
    expected = [m["path"] for m in cell_images("app", "sample", cell["i"], cell["j"], home=app_home, k=1000)["images"]]
    assert len(expected) > 12  # the fullest cell needs a second page
    assert _captions(at) == expected[:12]
    at.button(key="next").click().run()
    assert at.session_state["page"] == 1 and _captions(at) == expected[12:24]
    at.button(key="prev").click().run()
    assert at.session_state["page"] == 0 and _captions(at) == expected[:12]
    first_id = cell_images("app", "sample", cell["i"], cell["j"], home=app_home, k=1)["images"][0]["image_id"]
    at.button(key=f"open_{first_id}").click().run()
    assert at.session_state["image"] == first_id
    assert any(expected[0] in m.value for m in at.markdown)
    assert len(at.table) == 2  # top-5 predictions, and where its activations fall
    at.button(key=f"similar_{first_id}").click().run()
    hits = at.session_state["search"]["hits"]
    assert first_id not in [h["id"] for h in hits]
    # The app shows the library's neighbours of that image, in order; whether neighbours share
    # the query's class is the network's quality, measured over all images in test_search.py.
    library = search_index("sample", str(first_id), k=len(hits), home=app_home)["hits"]
    assert len(hits) >= 8 and [h["id"] for h in hits] == [h["id"] for h in library]
    assert "activations of the search results" in " ".join(c.value for c in at.caption)


def test_compare_mode_lists_cells_that_select_on_click(app_home, monkeypatch):
    at = _app(app_home, monkeypatch)
    at.sidebar.radio(key="view").set_value("compare").run()
    at.sidebar.selectbox(key="other").set_value("two").run()
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "Jensen–Shannon" in text and "More in two" in text
    over = [b for b in at.button if b.key.startswith("cmp_More")]
    assert over and any(label in over[0].label for label in ("red_discs", "stripes"))
    over[0].click().run()
    assert at.session_state["cell"] is not None and at.subheader


def test_class_view_and_level_switch(app_home, monkeypatch):
    at = _app(app_home, monkeypatch)
    at.sidebar.radio(key="view").set_value("class").run()
    at.sidebar.selectbox(key="class_name").set_value("stripes").run()
    assert not at.exception and "attribution to stripes" in " ".join(c.value for c in at.caption)
    at.session_state["cell"] = (0, 0)
    at.sidebar.selectbox(key="level").set_value(20).run()
    assert not at.exception and "cell" not in at.session_state  # a new level clears the selection


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


# ----------------------------------------------------------------------------- end to end, in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(app_home):
    if not CHROMIUM.is_file():
        if os.environ.get("ATLASQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    port = _free_port()
    env = dict(os.environ, ATLASQ_HOME=str(app_home))
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--", "--atlas", "app", "--index", "sample"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser_page(served_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(served_app)
        page.wait_for_selector("[data-testid='stVegaLiteChart'] path.background", timeout=120_000)
        yield page
        browser.close()


def test_browser_click_on_a_cell_shows_that_cells_images(browser_page, app_home):
    page = browser_page
    cell = _fullest_cell(app_home)
    frame = page.locator("[data-testid='stVegaLiteChart'] path.background").first.bounding_box()
    started = time.perf_counter()
    page.mouse.click(frame["x"] + (cell["j"] + 0.5) * frame["width"] / 10,
                     frame["y"] + (cell["i"] + 0.5) * frame["height"] / 10)
    expected = [m["path"] for m in cell_images("app", "sample", cell["i"], cell["j"], home=app_home, k=12)["images"]]
    page.get_by_text(f"Cell {cell['i']},{cell['j']}").wait_for(timeout=60_000)
    captions = page.locator("[data-testid='stImageCaption']")
    page.wait_for_function(f"() => document.querySelectorAll(\"[data-testid='stImageCaption']\").length >= {len(expected)}",
                           timeout=60_000)
    print(f"click to all {len(expected)} images: {time.perf_counter() - started:.2f} s")
    assert captions.all_inner_texts()[:len(expected)] == expected
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app_cell.png"), full_page=True)
    # What the browser drew for the first caption is that image: its pixels match the file's
    # (resized to the drawn size) far better than the second image's.
    drawn = page.locator(f"xpath=//*[@data-testid='stImageCaption'][normalize-space()='{expected[0]}']"
                         "/ancestor::*[.//img][1]//img").first
    shot = Image.open(io.BytesIO(drawn.screenshot())).convert("L")
    root = Path(load_atlas("app", app_home).manifest["index_root"])
    match = [_correlation(shot, Image.open(root / path).convert("L")) for path in expected[:2]]
    assert match[0] > 0.8 and match[0] > match[1] + 0.1, match


def _correlation(shot: Image.Image, source: Image.Image) -> float:
    a = np.asarray(shot, np.float32).ravel()
    b = np.asarray(source.resize(shot.size, Image.Resampling.BILINEAR), np.float32).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_browser_upload_shows_neighbours(browser_page, app_home, tmp_path):
    page = browser_page
    query = tmp_path / "query.png"
    Image.open(SAMPLE_DATA / "stripes" / sorted(os.listdir(SAMPLE_DATA / "stripes"))[0]).save(query)
    page.get_by_text("Search by image").click()
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(query))
    page.get_by_text("Nearest images").wait_for(timeout=120_000)
    captions = [c for c in page.locator("[data-testid='stImageCaption']").all_inner_texts() if "(" in c]
    shown = [c.rsplit(" (", 1)[0] for c in captions]
    # The library's neighbours of that file, in order (their meaning is test_search.py's concern).
    library = search_index("sample", str(query), k=len(shown), home=app_home)["hits"]
    assert len(shown) >= 8 and shown == [h["path"] for h in library]
    assert shown[0] == f"stripes/{sorted(os.listdir(SAMPLE_DATA / 'stripes'))[0]}"  # the file itself
    page.screenshot(path=str(SCREENSHOTS / "app_search.png"), full_page=True)
