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
    from streamlit.runtime.media_file_storage import MediaFileKind
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    atlas = load_atlas("levels80", WORK)
    overlays = {g: appdata.overlay_counts(atlas, "sample", g, home=WORK) for g in atlas.levels}
    cells80 = len(atlas.cells_at(80)["i"])
    storage = MemoryMediaFileStorage("media")
    sent: dict[str, int] = {}

    def register(data: bytes, mimetype: str, name: str) -> str:
        sent[name] = len(data)
        return storage.get_url(storage.load_and_get_id(data, mimetype, MediaFileKind.MEDIA))

    def old_rerun() -> str:
        return appdata.data_uri(appdata.atlas_picture(atlas, 80, overlays[80]))

    def map_rerun() -> str:
        levels = amap.map_payload(atlas, overlays, register=register)
        return json.dumps({"levels": levels, "state": None, "overlay_style": "badge"})

    baseline_s, picture = timed(old_rerun, args.repeat)
    amap._mosaic_jpeg.cache_clear()
    first_s, _ = timed(map_rerun, 1)
    first_bytes = sum(sent.values())
    rerun_s, message = timed(map_rerun, args.repeat)
    print(f"levels={','.join(map(str, atlas.levels))}")
    print(f"cells_80={cells80}")
    print(f"baseline_rerun_s={baseline_s:.4f}")
    print(f"baseline_rerun_bytes={len(picture)}")
    print(f"map_first_draw_s={first_s:.4f}")
    print(f"map_first_draw_bytes={first_bytes}")
    print(f"map_rerun_s={rerun_s:.4f}")
    print(f"map_rerun_bytes={len(message)}")
    print(f"rerun_time_ratio={rerun_s / baseline_s:.3f}")
    print(f"rerun_bytes_ratio={len(message) / len(picture):.4f}")


if __name__ == "__main__":
    main()
