"""Benchmark: how long a click on an atlas cell takes to show its images, on 100,000 images.

Builds (once, under bench/_work/app_home/) an index of sample_data/ with the demo network and an
atlas of it, then a synthetic index of ``--images`` images placed on that atlas (see
tests/bigindex.py). It serves `streamlit run app.py`, opens it in Debian's headless chromium
with Playwright and clicks the fullest cells, timing each click until the cell's first 12
images are shown. Needs /usr/bin/chromium. Timings are printed, never compared with a limit.

    python bench/app.py [--images 100000] [--clicks 5]

Last line: click_to_images_s= (the median).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bigindex import make_placed_index  # noqa: E402

from atlasq.atlas import AtlasOptions, build_atlas  # noqa: E402
from atlasq.atlasdir import AtlasFolder  # noqa: E402
from atlasq.histogram import cell_images, histogram  # noqa: E402
from atlasq.indexer import IndexOptions, build_index  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "app_home"
SAMPLE_DATA = REPO / "sample_data"
CHROMIUM = "/usr/bin/chromium"


def prepare(images: int) -> str:
    if not (WORK / "sample").exists():
        build_index(SAMPLE_DATA, "sample", home=WORK, progress=False,
                    options=IndexOptions(model="demo", attributions=True, layers=("mixed5a",)))
    if not AtlasFolder.named("bench", WORK).is_complete():
        build_atlas("sample", "bench", home=WORK, progress=False,
                    options=AtlasOptions(layer="mixed5a", grids=(10, 20), steps=64))
    name = f"big{images}"
    if not (WORK / name).exists():
        make_placed_index(WORK, name, "bench", SAMPLE_DATA, images=images)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    index = prepare(args.images)
    cells = sorted(histogram("bench", index, home=WORK, level=10, place=False).cells, key=lambda c: -c.images)
    expected = {(c.i, c.j): [m.path for m in cell_images("bench", index, c.i, c.j, home=WORK, k=12).images]
                for c in cells[:args.clicks]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false", "--", "--home", str(WORK), "--atlas", "bench"],
                              cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timings = []
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/?index={index}")
            frame_locator = page.locator("[data-testid='stVegaLiteChart'] path.background").first
            frame_locator.wait_for(timeout=120_000)
            for cell in cells[:args.clicks]:
                frame = frame_locator.bounding_box()
                started = time.perf_counter()
                page.mouse.click(frame["x"] + (cell.j + 0.5) * frame["width"] / 10,
                                 frame["y"] + (cell.i + 0.5) * frame["height"] / 10)
                # done when the first 12 captions are exactly this cell's first page (not the last cell's)
                page.wait_for_function(
                    "want => JSON.stringify([...document.querySelectorAll(\"[data-testid='stImageCaption']\")]"
                    ".slice(0, 12).map(e => e.innerText)) === JSON.stringify(want)", arg=expected[cell.i, cell.j],
                    timeout=60_000)
                timings.append(time.perf_counter() - started)
                print(f"cell {cell.i},{cell.j} ({cell.images:,} images): {timings[-1]:.2f} s", flush=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"click_to_images_s={statistics.median(timings):.3f}")


if __name__ == "__main__":
    main()
