"""Benchmark: how fast the app answers, on an index of 100,000 images.

Builds (once, under bench/_work/app_home/) an index of sample_data/ with the demo network and an
atlas of it, then a synthetic index of ``--images`` images placed on that atlas (see
tests/bigindex.py). It serves `streamlit run app.py` in the environment `atlasq app` serves it in
(:func:`atlasq.serve.app_environment`), opens it in Debian's headless chromium
with Playwright and

- clicks the fullest cells on the map, timing each in the browser from the press to the first
  frame drawn with the cell's first 12 images (``click_to_images_s``, the median; Playwright's
  own round trips to find and press the cell are not in it; they are in
  ``click_to_images_driven_s``, timed from Playwright);
- plays a scripted sequence of mixed interactions (clicks and shift-clicks on the map, paging,
  rows of the histogram, filters, level, overlay, tiles, the image dialog), timing each from the
  action until the app's run for it has finished (Streamlit's ``script_finished`` message, read
  from the page's websocket) and the page shows its result (``interaction_p95_s``, the 95th
  percentile, and ``interaction_median_s``);
- zooms the map with the wheel, one step at a time, and times each from the wheel event until the
  run the map's view report causes has finished, less the map's rest before it reports
  (``view_report_s``, the median: what writing the view into the URL costs).

Needs /usr/bin/chromium. Timings are printed, never compared with a limit.

    python bench/app.py [--images 100000] [--clicks 5]     (--images 0: the sample index itself)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bigindex import make_placed_index  # noqa: E402
from browser import CHROMIUM, click_map_cell, headless_chromium, served  # noqa: E402

from atlasq.atlas import AtlasOptions, build_atlas  # noqa: E402
from atlasq.atlasdir import AtlasFolder  # noqa: E402
from atlasq.histogram import histogram  # noqa: E402
from atlasq.indexer import IndexOptions, build_index  # noqa: E402
from atlasq.serve import app_environment  # noqa: E402
from atlasq.store import ImageFilter, IndexStore, index_folder  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "app_home"
SAMPLE_DATA = REPO / "sample_data"
LEVEL = 10


def prepare(images: int) -> str:
    if not (WORK / "sample").exists():
        build_index(SAMPLE_DATA, "sample", home=WORK, progress=False,
                    options=IndexOptions(model="demo", attributions=True, layers=("mixed5a",)))
    if not AtlasFolder.named("bench", WORK).is_complete():
        build_atlas("sample", "bench", home=WORK, progress=False,
                    options=AtlasOptions(layer="mixed5a", grids=(10, 20), steps=64))
    if not images:  # the sample index itself, placed on its own atlas
        histogram("bench", "sample", home=WORK, level=LEVEL)
        return "sample"
    name = f"big{images}"
    if not (WORK / name).exists():
        make_placed_index(WORK, name, "bench", SAMPLE_DATA, images=images)
    return name


def first_page(index: str, cells: list[tuple[int, int]]) -> list[str]:
    """The paths the gallery shows first for the union of ``cells`` (what a click must bring)."""
    with IndexStore(index_folder(index, WORK)) as store:
        members = store.selection_members("bench", LEVEL, cells, ImageFilter(), limit=12)
    return [m["path"] for m in members]


class Runs:
    """Counts the app's finished runs (whole page or fragment) as the page's websocket reports them."""

    def __init__(self, page):
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.finished = 0

        def frame(payload):
            if isinstance(payload, (bytes, bytearray)):
                msg = ForwardMsg()
                try:
                    msg.ParseFromString(bytes(payload))
                except Exception:  # a frame of another kind: not ours to count
                    return
                if msg.WhichOneof("type") == "script_finished":
                    self.finished += 1

        page.on("websocket", lambda ws: ws.on("framereceived", frame))

    def wait_after(self, page, before: int, timeout: float = 60.0) -> None:
        deadline = time.perf_counter() + timeout
        while self.finished <= before:
            if time.perf_counter() > deadline:
                raise TimeoutError("the app did not finish a run")
            page.wait_for_timeout(10)


# In the page: the time of the last pointer press, and of the first frame painted once the gallery's
# first captions are the expected ones (a MutationObserver sees them arrive; the next animation
# frame is when they are drawn). Both on the browser's clock, so Playwright's own round trips to
# find and press the cell are not counted.
SEEN_SCRIPT = """() => {
  const seen = window.aqSeen = {down: 0, shown: 0, want: null,
    expect(want) { this.want = want; this.down = 0; this.shown = 0; }};
  document.addEventListener("pointerdown", () => { if (seen.want && !seen.down) seen.down = performance.now(); },
                            true);
  const check = () => {
    if (!seen.want || !seen.down || seen.shown) return;
    const now = [...document.querySelectorAll("[data-testid='stImageCaption']")].slice(0, seen.want.length)
      .map((e) => e.innerText);
    if (JSON.stringify(now) === JSON.stringify(seen.want)) {
      seen.want = null;
      requestAnimationFrame(() => { seen.shown = performance.now(); });
    }
  };
  new MutationObserver(check).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000,
                        help="images of the synthetic index (0: the 576-image sample index itself)")
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        sys.exit(f"bench/app.py needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    index = prepare(args.images)
    cells = sorted(histogram("bench", index, home=WORK, level=LEVEL, place=False).cells, key=lambda c: -c.images)
    cells = [(c.i, c.j) for c in cells if c.images]
    clicks, driven, steps, reports = [], [], [], []
    with served(REPO / "app.py", "--home", str(WORK), "--atlas", "bench", env=app_environment()) as url, \
            headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        runs = Runs(page)
        page.goto(f"{url}/?index={index}&atlas=bench&level={LEVEL}")
        page.wait_for_selector(f".aq-map[data-level='{LEVEL}']", timeout=300_000)
        page.get_by_text("activations per cell").first.wait_for(timeout=300_000)
        page.wait_for_timeout(2000)

        def timed(name: str, action, done=None) -> float:
            page.wait_for_timeout(500)  # the page idle before each action (not timed)
            before = runs.finished
            started = time.perf_counter()
            action()
            try:
                runs.wait_after(page, before, timeout=20)
            except TimeoutError:  # the action was lost (the page was redrawing): do it once more
                print(f"{name}: repeated", flush=True)
                started = time.perf_counter()
                action()
                runs.wait_after(page, before)
            if done is not None:
                page.wait_for_function(done[0], arg=done[1], timeout=60_000)
            took = time.perf_counter() - started
            print(f"{name}: {took:.2f} s", flush=True)
            return took

        shown = ("want => JSON.stringify([...document.querySelectorAll(\"[data-testid='stImageCaption']\")]"
                 ".slice(0, want.length).map(e => e.innerText)) === JSON.stringify(want)")
        page.evaluate(SEEN_SCRIPT)
        for i, j in cells[:args.clicks]:
            page.evaluate("want => window.aqSeen.expect(want)", first_page(index, [(i, j)]))
            driven.append(timed(f"click cell {i},{j}", lambda: click_map_cell(page, i, j),
                                (shown, first_page(index, [(i, j)]))))
            page.wait_for_function("() => window.aqSeen.shown > 0", timeout=60_000)
            clicks.append(page.evaluate("() => (window.aqSeen.shown - window.aqSeen.down) / 1000"))
            print(f"  in the browser, from the press to the frame showing its images: {clicks[-1]:.2f} s", flush=True)

        a, b, c = cells[0], cells[1], cells[2]
        sidebar = page.locator("[data-testid='stSidebar']")
        script = [
            ("click a cell", lambda: click_map_cell(page, *a), (shown, first_page(index, [a]))),
            ("shift-click a second cell", lambda: click_map_cell(page, *b, shift=True), (shown, first_page(index, [a, b]))),
            ("next page", lambda: page.get_by_role("button", name="▶", exact=True).click(), None),
            ("next page", lambda: page.get_by_role("button", name="▶", exact=True).click(), None),
            ("previous page", lambda: page.get_by_role("button", name="◀", exact=True).click(), None),
            ("click another cell", lambda: click_map_cell(page, *c), (shown, first_page(index, [c]))),
            ("open an image", lambda: page.get_by_role("button", name="⤢").first.click(), None),
            ("close the dialog", None, None),
            ("next page", lambda: page.get_by_role("button", name="▶", exact=True).click(), None),
            ("path filter", lambda: (sidebar.get_by_text("Filters").click(),
                                     sidebar.get_by_role("textbox", name="Path pattern").fill("stripes"),
                                     sidebar.get_by_role("textbox", name="Path pattern").press("Enter")), None),
            ("clear the path filter", lambda: (sidebar.get_by_role("textbox", name="Path pattern").fill(""),
                                               sidebar.get_by_role("textbox", name="Path pattern").press("Enter")), None),
            ("class overlay", lambda: sidebar.get_by_text("class attribution").click(), None),
            ("counts overlay", lambda: sidebar.get_by_text("dataset counts").click(), None),
            ("exemplar tiles", lambda: sidebar.get_by_text("real exemplars").click(), None),
            ("icon tiles", lambda: sidebar.get_by_text("feature visualizations").click(), None),
            ("click a cell", lambda: click_map_cell(page, *a), (shown, first_page(index, [a]))),
            ("shift-click a cell", lambda: click_map_cell(page, *c, shift=True), (shown, first_page(index, [a, c]))),
            ("next page", lambda: page.get_by_role("button", name="▶", exact=True).click(), None),
            ("heat layer", lambda: sidebar.get_by_text("heat layer").click(), None),
            ("badges", lambda: sidebar.get_by_text("count badges (icons untouched)").click(), None),
            ("click a cell", lambda: click_map_cell(page, *b), (shown, first_page(index, [b]))),
            ("open an image", lambda: page.get_by_role("button", name="⤢").first.click(), None),
            ("close the dialog", None, None),
        ]
        for name, action, done in script:
            if action is None:  # closing a dialog happens in the browser: no run to time
                page.keyboard.press("Escape")
                page.wait_for_timeout(300)
                continue
            steps.append(timed(name, action, done))

        # zoom and pan reach the URL: one run of the map's fragment once the view rests
        from atlasq.streamlit.map_component import VIEW_REST_MS

        page.locator(".aq-canvas").first.scroll_into_view_if_needed()
        box = page.locator(".aq-canvas").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        for step in (-120, -120, -120, 120, 120, 120):
            page.wait_for_timeout(500)
            before = runs.finished
            started = time.perf_counter()
            page.mouse.wheel(0, step)
            runs.wait_after(page, before)
            reports.append(time.perf_counter() - started - VIEW_REST_MS / 1000)
            print(f"zoom {'in' if step < 0 else 'out'}: view reported, run done {reports[-1]:.2f} s after the "
                  f"rest", flush=True)
    steps.sort()
    p95 = steps[min(len(steps) - 1, round(0.95 * (len(steps) - 1)))]
    print(f"interactions={len(steps)}")
    print(f"interaction_median_s={statistics.median(steps):.3f}")
    print(f"interaction_p95_s={p95:.3f}")
    print(f"click_to_images_s={statistics.median(clicks):.3f}")
    print(f"click_to_images_driven_s={statistics.median(driven):.3f}  (as Playwright sees it: finding the cell too)")
    print(f"view_report_s={statistics.median(reports):.3f}")


if __name__ == "__main__":
    main()
