"""Benchmark: what a rerun costs the atlas map, against the picture the app drew before it.

Builds (once, under bench/_work/map_home/) an index of sample_data/ with the demo network and an
atlas of it with levels 20, 40 and 80 (exemplar mosaics, no icons: the mosaics' size is what
matters here), and places the index on it. Then, in this process:

- baseline: the app's old atlas view per rerun: the 80×80 level's mosaic with the count overlay
  painted in, encoded as a data URI (``appdata.atlas_picture`` + ``appdata.data_uri``), re-sent
  every rerun;
- the map's first draw: every level's mosaic and cells prepared and registered (Streamlit's media
  store), then a rerun that changes nothing: the same, with the mosaics already encoded. The
  browser fetches a mosaic or cells file only when its URL changes, so a rerun sends the URLs.

The sample keeps only a hundred-odd cells at 80×80, so the same is measured again on a stand-in
atlas with every cell of 20×20, 40×40 and 80×80 kept (12,400 cells) and mosaics of smooth noise
at 51 px a tile (as ``atlasq.atlas`` caps an 80×80 mosaic): the ``full_`` lines.

    python bench/atlas_map.py [--repeat 5]

Prints name=value lines; the ratios compare with the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atlasq import appdata  # noqa: E402
from atlasq.atlas import AtlasOptions, build_atlas, load_atlas  # noqa: E402
from atlasq.atlasdir import AtlasFolder  # noqa: E402
from atlasq.histogram import histogram  # noqa: E402
from atlasq.indexer import IndexOptions, build_index  # noqa: E402
from atlasq.streamlit import map_component as amap  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "map_home"
SAMPLE_DATA = REPO / "sample_data"


def prepare() -> None:
    if not (WORK / "sample").exists():
        build_index(SAMPLE_DATA, "sample", home=WORK, progress=False,
                    options=IndexOptions(model="demo", attributions=True, layers=("mixed5a",)))
    if not AtlasFolder.named("levels80", WORK).is_complete():
        build_atlas("sample", "levels80", home=WORK, progress=False,
                    options=AtlasOptions(layer="mixed5a", grids=(20, 40, 80), min_count=1, icons=False))
        histogram("levels80", "sample", home=WORK)


class FullAtlas:
    """Duck-typed stand-in for :class:`atlasq.atlas.Atlas` with every cell kept (see the docstring)."""

    name = "full"
    levels = [20, 40, 80]

    def __init__(self, folder: Path):
        import numpy as np
        from PIL import Image

        self.folder = folder
        rng = np.random.default_rng(0)
        for g in self.levels:
            path = folder / f"mosaic_{g}.png"
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                side = 4080 if g == 80 else g * 80
                small = Image.fromarray(rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8))
                small.resize((side, side), Image.Resampling.BICUBIC).save(path)

    def tiles_path(self, level: int, tiles: str = "icons") -> Path:
        return self.folder / f"mosaic_{level}.png"

    def cells_at(self, level: int) -> dict:
        i = [k // level for k in range(level * level)]
        j = [k % level for k in range(level * level)]
        n = [((a * 7 + b * 13) % 50) * 10 for a, b in zip(i, j)]  # some cells 0, the others up to 490
        return {"i": i, "j": j, "count": n, "top_labels": [["stripes", "waves", "red_discs"]] * len(n),
                "top_scores": [[0.3, 0.1, -0.2]] * len(n)}


def measure(atlas, overlays, level: int, repeat: int) -> dict:
    """The figures of one atlas (see the docstring)."""
    from streamlit.runtime.media_file_storage import MediaFileKind
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    storage = MemoryMediaFileStorage("media")
    sent: dict[str, int] = {}

    def register(data: bytes, mimetype: str, name: str) -> str:
        sent[name] = len(data)
        return storage.get_url(storage.load_and_get_id(data, mimetype, MediaFileKind.MEDIA))

    def old_rerun() -> str:
        return appdata.data_uri(appdata.atlas_picture(atlas, level, overlays[level]))

    def map_rerun() -> str:
        levels = amap.map_payload(atlas, overlays, register=register)
        return json.dumps({"levels": levels, "state": None, "overlay_style": "badge"})

    baseline_s, picture = timed(old_rerun, repeat)
    amap._mosaic_jpeg.cache_clear()
    first_s, _ = timed(map_rerun, 1)
    first_bytes = sum(sent.values())
    rerun_s, message = timed(map_rerun, repeat)
    return {"cells": sum(len(atlas.cells_at(g)["i"]) for g in atlas.levels), "baseline_rerun_s": baseline_s,
            "baseline_rerun_bytes": len(picture), "map_first_draw_s": first_s, "map_first_draw_bytes": first_bytes,
            "map_rerun_s": rerun_s, "map_rerun_bytes": len(message), "rerun_time_ratio": rerun_s / baseline_s,
            "rerun_bytes_ratio": len(message) / len(picture)}


def timed(function, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    prepare()
    atlas = load_atlas("levels80", WORK)
    overlays = {g: appdata.overlay_counts(atlas, "sample", g, home=WORK) for g in atlas.levels}
    full = FullAtlas(WORK / "full_atlas")
    full_overlays = {}
    for g in full.levels:
        cells = full.cells_at(g)
        full_overlays[g] = appdata.CellOverlay(
            [{"i": i, "j": j, "value": float(n), "count": n, "images": n // 2, "top_labels": ["stripes"]}
             for i, j, n in zip(cells["i"], cells["j"], cells["count"])], log=True, legend="activations per cell")
    print(f"levels={','.join(map(str, atlas.levels))}")
    for prefix, figures in (("", measure(atlas, overlays, 80, args.repeat)),
                            ("full_", measure(full, full_overlays, 80, args.repeat))):
        for name, value in figures.items():
            print(f"{prefix}{name}={value:.4f}" if isinstance(value, float) else f"{prefix}{name}={value}")


if __name__ == "__main__":
    main()
