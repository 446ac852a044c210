"""Debian's chromium driven by Playwright, for the app's and the map's browser tests.

No browser is ever downloaded: the tests use /usr/bin/chromium (``.ci/run`` installs it). Without
it they skip, unless ATLASQ_REQUIRE_BROWSER=1 says a browser must be there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]


def need_browser() -> None:
    """Skip (or, with ATLASQ_REQUIRE_BROWSER=1, fail) the calling test without Debian's chromium."""
    if not CHROMIUM.is_file():
        if os.environ.get("ATLASQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")


@contextmanager
def headless_chromium():
    """A headless chromium for one test module (Playwright's sync API cannot nest)."""
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()


def click_map_cell(page, i: int, j: int, *, shift: bool = False) -> None:
    """Click cell (i, j) of the level the atlas map shows, where the map draws it (its view is in
    the map element's data attributes; zoom 1 fits the atlas square into the canvas); with
    ``shift`` the click adds the cell to the selection."""
    page.locator(".aq-canvas").first.scroll_into_view_if_needed()  # paging may have scrolled it away
    data = page.locator(".aq-map").first.evaluate("e => ({...e.dataset})")
    level, zoom = int(data["level"]), float(data["zoom"])
    cx, cy = map(float, data["center"].split(","))
    box = page.locator(".aq-canvas").first.bounding_box()
    scale = min(box["width"], box["height"]) * zoom
    x = box["x"] + box["width"] / 2 + ((j + 0.5) / level - cx) * scale
    y = box["y"] + box["height"] / 2 + ((i + 0.5) / level - cy) * scale
    page.mouse.move(x, y)
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")


def free_port() -> int:
    """A TCP port nobody listens on now, on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    """Wait until the Streamlit server ``process`` at ``url`` answers its health check."""
    for _ in range(240):
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("streamlit did not start")


@contextmanager
def served(script: Path, *args: str, env: dict | None = None):
    """``streamlit run script -- args`` on a free local port, from the checkout, in ``env`` (default:
    this process's environment without the test's own ATLASQ_HOME, as each test names its home);
    yields the app's URL and stops it afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ATLASQ_HOME"} if env is None else env
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)

