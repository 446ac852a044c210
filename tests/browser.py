"""Debian's chromium driven by Playwright, for the app's and the map's browser tests.

No browser is ever downloaded: the tests use /usr/bin/chromium (``.ci/run`` installs it). Without
it they skip, unless ATLASQ_REQUIRE_BROWSER=1 says a browser must be there.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


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
