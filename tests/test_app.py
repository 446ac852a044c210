"""The Streamlit app: its logic with streamlit's AppTest, and end to end in headless Chromium.

The browser tests drive Debian's chromium with Playwright against `streamlit run app.py` (the
checkout's entry) and against `atlasq app` installed from a wheel, on free ports. They need
/usr/bin/chromium (installed by .ci/run); without it they are skipped, unless
ATLASQ_REQUIRE_BROWSER=1 (set by .ci/run), when a missing browser is a failure.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from atlasq import appdata, demo_model, serve
from atlasq.atlas import AtlasOptions, build_atlas, load_atlas
from atlasq.histogram import cell_images, histogram
from atlasq.indexer import IndexOptions, build_index
from atlasq.api import search_index
from atlasq.store import IndexStore, index_folder

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


def _app(home: Path, monkeypatch, index: str = "sample") -> AppTest:
    """The package's page script (what `atlasq app` serves), as AppTest runs it."""
    monkeypatch.setenv("ATLASQ_HOME", str(home))
    monkeypatch.setattr(sys, "argv", ["webapp.py", "--atlas", "app", "--index", index])
    at = AppTest.from_file(str(serve.PAGE), default_timeout=120)
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
    """Captions of the images shown, in page order (the colour bar has none)."""
    return [image.proto.imgs[0].caption for image in at.get("image") if image.proto.imgs[0].caption]


def _fullest_cell(home: Path, index: str = "sample", level: int = 10) -> dict:
    result = histogram("app", index, home=home, level=level, place=False)
    return max(result.cells, key=lambda c: c.images)


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
    at.selectbox(key="cell_picker_10").set_value(f"{cell.i},{cell.j}").run()
    assert at.session_state["cell"] == (cell.i, cell.j)
    assert at.subheader[0].value == f"Cell {cell.i},{cell.j}"
    expected = [m.path for m in cell_images("app", "sample", cell.i, cell.j, home=app_home, k=1000).images]
    assert len(expected) > 12  # the fullest cell needs a second page
    assert _captions(at) == expected[:12]
    at.button(key="next").click().run()
    assert at.session_state["page"] == 1 and _captions(at) == expected[12:24]
    at.button(key="prev").click().run()
    assert at.session_state["page"] == 0 and _captions(at) == expected[:12]
    first_id = cell_images("app", "sample", cell.i, cell.j, home=app_home, k=1).images[0].image_id
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


def test_folders_that_are_not_complete_indexes_are_left_out_with_the_reason(app_home, tmp_path, monkeypatch):
    """A failed first `atlasq index` run, a damaged index.duckdb or a stray folder is never offered
    as a dataset (picking one crashed the app with KeyError: 'root'); the app says why it is left out."""
    home = _copy_home(app_home, tmp_path / "home")
    (home / "empty").mkdir()                                  # what a failed run may leave
    IndexStore.create(home / "unfinished").close()            # a database whose first run stopped early
    (home / "garbage").mkdir()
    (home / "garbage" / "index.duckdb").write_text("not a database\n" * 100)
    with pytest.raises(ValueError):                           # a real failed run, whatever it leaves
        build_index(SAMPLE_DATA / "stripes", "failed", home=home, progress=False,
                    options=IndexOptions(model="demo", layers=("no_such_layer",)))
    assert appdata.list_indexes(home) == ["sample"]
    problems = appdata.index_problems(home)
    assert {"empty", "unfinished", "garbage"} <= set(problems) and "sample" not in problems
    assert "atlases" not in problems  # the home's own folders are not candidates
    assert "no index.duckdb" in problems["empty"] and "unfinished" in problems["unfinished"]
    assert "garbage" not in appdata.list_indexes(home)
    for name in ("unfinished", "garbage", "empty"):
        at = _app(home, monkeypatch, index=name)
        assert not at.exception, at.exception
        assert any(name in w.value and "cannot be shown" in w.value for w in at.warning)
        assert at.session_state["index_name"] == "sample"  # the app falls back to a readable dataset
        assert "activations per cell" in " ".join(c.value for c in at.caption)


def test_images_turned_into_links_out_of_the_root_or_loops_get_unavailable_tiles(app_home, tmp_path, monkeypatch):
    """An indexed image later replaced by a symlink out of the index's folder, or by a symlink
    loop, is shown as a grey "unavailable" tile with the reason, not a traceback."""
    home = _copy_home(app_home, tmp_path / "home", images=tmp_path / "images")
    cell = _fullest_cell(home)
    paths = [m.path for m in cell_images("app", "sample", cell.i, cell.j, home=home, k=12).images]
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64), (0, 128, 255)).save(outside)
    root = appdata.index_root("sample", home)
    (root / paths[0]).unlink()
    (root / paths[0]).symlink_to(outside)
    (root / paths[1]).unlink()
    (root / paths[1]).symlink_to(root / paths[1])             # a loop: the link points at itself

    at = _app(home, monkeypatch)
    at.selectbox(key="cell_picker_10").set_value(f"{cell.i},{cell.j}").run()
    assert not at.exception, at.exception
    captions = _captions(at)
    assert captions[0].startswith(paths[0]) and "unavailable" in captions[0] and "outside" in captions[0]
    assert captions[1].startswith(paths[1]) and "unavailable" in captions[1]
    assert captions[2:] == paths[2:]

    atlas = load_atlas("app", home)
    good, out, loop = (appdata.image_tile(atlas, root, p, []) for p in (paths[2], paths[0], paths[1]))
    assert good.unavailable is None
    assert "outside the index's folder" in out.unavailable
    assert "loop" in loop.unavailable.lower() or "symbolic links" in loop.unavailable
    assert out.image.size == loop.image.size == (192, 192)


# ----------------------------------------------------------------------------- end to end, in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(app_home):
    _need_browser()
    port = _free_port()
    # the checkout's entry, as the README gives it: streamlit run app.py -- --home H
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--", "--home", str(app_home), "--atlas", "app", "--index", "sample"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _env(**extra) -> dict:
    """The environment without the test's own ATLASQ_HOME (each command names its home)."""
    env = {k: v for k, v in os.environ.items() if k != "ATLASQ_HOME"}
    return {**env, **extra}


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    for _ in range(240):
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("streamlit did not start")


def _need_browser() -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("ATLASQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")


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
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser_page(served_app, chromium):
    page = chromium.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(served_app)
    page.wait_for_selector("[data-testid='stVegaLiteChart'] path.background", timeout=120_000)
    yield page
    page.close()


def test_browser_click_on_a_cell_shows_that_cells_images(browser_page, app_home):
    page = browser_page
    cell = _fullest_cell(app_home)
    frame = page.locator("[data-testid='stVegaLiteChart'] path.background").first.bounding_box()
    started = time.perf_counter()
    page.mouse.click(frame["x"] + (cell.j + 0.5) * frame["width"] / 10,
                     frame["y"] + (cell.i + 0.5) * frame["height"] / 10)
    expected = [m.path for m in cell_images("app", "sample", cell.i, cell.j, home=app_home, k=12).images]
    page.get_by_text(f"Cell {cell.i},{cell.j}").wait_for(timeout=60_000)
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
    command = serve.streamlit_command(tmp_path, port=_free_port())
    flags = dict(zip(command[command.index("run") + 2:command.index("--")][::2],
                     command[command.index("run") + 2:command.index("--")][1::2]))
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--client.toolbarMode"] == "minimal"
    assert serve.streamlit_command(tmp_path, host="0.0.0.0", port=_free_port())[command.index("--server.address") + 1] \
        == "0.0.0.0"

    other = _other_local_address()
    for host in (None, "0.0.0.0") if other else (None,):
        port = _free_port()
        app = _start([sys.executable, "-m", "atlasq.cli", "app", "--home", str(tmp_path), "--port", str(port),
                      *(["--host", host] if host else [])], cwd=REPO, env=_env(ATLASQ_HOME="/nonexistent"))
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", app)
            if other:
                assert _reachable(other, port) == (host == "0.0.0.0"), (host, other)
        finally:
            _, err = _stop(app)
        assert f"atlasq app on http://{host or '127.0.0.1'}:{port}" in err


def test_atlasq_app_fails_with_one_line_when_home_is_missing_or_port_is_busy(tmp_path):
    def run(*args):
        process = _start([sys.executable, "-m", "atlasq.cli", "app", *args], cwd=REPO, env=_env())
        try:
            process.wait(timeout=60)
        finally:
            out, err = _stop(process)  # an app that started anyway is stopped, and the test fails below
        return process.returncode, out, err

    code, out, err = run("--home", str(tmp_path / "missing"), "--port", str(_free_port()))
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
    port = _free_port()
    app = _start([str(venv / "bin" / "atlasq"), "app", "--home", str(app_home), "--atlas", "app", "--index", "sample",
                  "--port", str(port)], cwd=elsewhere, env={**env, "BROWSER": "none"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, app)
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
        page.wait_for_selector("[data-testid='stVegaLiteChart'] path.background", timeout=120_000)
        page.get_by_text("activations per cell").first.wait_for(timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.get_by_role("button", name="Deploy").count() == 0
    finally:
        page.close()
