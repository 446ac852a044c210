"""``atlasq atlas export`` / ``import``: an atlas travels as one checksummed file.

The atlas is the session's ``app`` atlas (demo network, mixed5a); exporting only reads it. Each
test imports into a home of its own, holding a copy of the ``sample`` index to place.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atlasq.appdata import atlas_picture, overlay_counts
from atlasq.atlas import load_atlas
from atlasq.atlasdir import AtlasError
from atlasq.bundle import export_atlas, import_atlas, read_bundle_manifest
from atlasq.cli import app
from atlasq.errors import DamagedError
from atlasq.histogram import IncompatibleIndexError, ReferenceSearch, histogram, place_activations
from atlasq.indexer import IndexOptions, build_index
from atlasq.store import IndexStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(atlas_home, tmp_path_factory) -> dict[str, Path]:
    """The ``app`` atlas exported in full and compact (once for the module)."""
    folder = tmp_path_factory.mktemp("exports")
    full = export_atlas("app", folder / "app.atlas", home=atlas_home)
    compact = export_atlas("app", folder / "app-compact.atlas", home=atlas_home, compact=True)
    assert not full.compact and compact.compact
    return {"full": Path(full.file), "compact": Path(compact.file), "compact_summary": compact}


def home_with_sample(atlas_home: Path, tmp_path: Path) -> Path:
    """A fresh home holding a copy of the ``sample`` index (the dataset to place)."""
    home = tmp_path / "elsewhere"
    shutil.copytree(atlas_home / "sample", home / "sample")
    return home


def exact_cells(atlas_home: Path, level: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(image_id, k) → cell at ``level`` by exact placement on the original atlas, in memory."""
    atlas = load_atlas("app", atlas_home)
    with IndexStore(atlas_home / "sample") as store:
        samples = store.samples(atlas.manifest["layer"])
    placement = place_activations(ReferenceSearch(atlas), samples["activations"])
    return {(int(i), int(k)): tuple(map(int, ij))
            for i, k, ij in zip(samples["image_id"], samples["k"], placement.cells[level])}


def placed_cells(home: Path, atlas: str, level: int) -> dict[tuple[int, int], tuple[int, int]]:
    with IndexStore(home / "sample") as store:
        rows = store.con.execute("SELECT image_id, k, coalesce(i, -1), coalesce(j, -1) FROM placements "
                                 "WHERE atlas = ? AND level = ?", [atlas, level]).fetchall()
    return {(int(i), int(k)): (int(a), int(b)) for i, k, a, b in rows}


def test_full_export_imports_file_for_file_and_places_as_the_original(atlas_home, exports, tmp_path):
    home = home_with_sample(atlas_home, tmp_path)
    summary = import_atlas(exports["full"], name="shared", home=home)
    original, imported = atlas_home / "atlases" / "app", home / "atlases" / "shared"
    names = lambda f: {p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()}
    assert names(imported) == names(original) and summary.members == len(names(original))
    for name in names(original) - {"manifest.json"}:
        assert (imported / name).read_bytes() == (original / name).read_bytes(), name
    manifest = json.loads((imported / "manifest.json").read_text())
    assert manifest["name"] == "shared" and manifest["params_hash"] == load_atlas("app", atlas_home).manifest["params_hash"]
    assert not list((home / "tmp").iterdir())  # the scratch folder is left empty

    level = min(load_atlas("shared", home).levels)
    histogram("shared", "sample", level=level, home=home)
    assert placed_cells(home, "shared", level) == exact_cells(atlas_home, level)


def test_compact_export_places_and_serves_the_app_without_raw_activations(atlas_home, exports, tmp_path):
    facts = exports["compact_summary"]
    assert facts.placement_size_ratio < 0.5 and facts.placement_index_bytes < facts.raw_activations_bytes
    assert exports["compact"].stat().st_size < exports["full"].stat().st_size
    home = home_with_sample(atlas_home, tmp_path)
    import_atlas(exports["compact"], name="small", home=home)
    atlas = load_atlas("small", home)
    assert not (home / "atlases" / "small" / "activations.npy").exists()
    with pytest.raises(AtlasError, match="compact.*full export"):
        atlas.activations()

    level = min(atlas.levels)
    result = histogram(atlas, "sample", level=level, home=home)
    assert result.placed.search == "compact" and result.totals.activations > 0
    got, want = placed_cells(home, "small", level), exact_cells(atlas_home, level)
    assert got.keys() == want.keys()
    agreement = np.mean([got[key] == want[key] for key in want])
    assert agreement >= 0.9, agreement
    overlay = overlay_counts(atlas, "sample", level, home=home)  # the app's main view
    assert sum(row["count"] for row in overlay.cells) == result.totals.activations - result.totals.off_atlas \
        - result.totals.outside_kept_cells
    assert atlas_picture(atlas, level, overlay).size[0] > 0


def test_imported_atlas_refuses_an_index_made_with_other_weights(atlas_home, exports, tmp_path):
    home = tmp_path / "elsewhere"
    import_atlas(exports["compact"], home=home)
    assert read_bundle_manifest(exports["compact"])["weights_sha256"] == load_atlas("app", home).manifest["weights_sha256"]
    root = tmp_path / "imgs"
    root.mkdir()
    for image in sorted((REPO / "sample_data" / "red_discs").iterdir())[:4]:
        shutil.copy2(image, root / image.name)
    build_index(root, "other", home=home, progress=False, precision="fp32",
                options=IndexOptions(model="demo", weights="random", layers=("mixed5a",)))
    with pytest.raises(IncompatibleIndexError, match="other weights"):
        histogram("app", "other", home=home)


def _flip_byte_in(file: Path, member: str, out: Path) -> Path:
    """A copy of export ``file`` with one byte of ``member``'s data changed."""
    data = bytearray(file.read_bytes())
    with tarfile.open(file) as tar:
        info = tar.getmember(member)
    data[info.offset_data + info.size // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not an export"])
def test_a_damaged_export_is_refused_with_the_reason_and_nothing_stays(atlas_home, exports, tmp_path, damage):
    home = tmp_path / "elsewhere"
    source = exports["full"]
    bad = tmp_path / "bad.atlas"
    if damage == "flipped byte":
        _flip_byte_in(source, "atlas/cells.parquet", bad)
        reason = "sha256 of cells.parquet"
    elif damage == "truncated":
        bad.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 3])
        reason = "truncated"
    else:
        bad.write_bytes(b"PK\x03\x04 not a tar at all" * 100)
        reason = "not an atlasq atlas export"
    with pytest.raises(DamagedError, match=reason):
        import_atlas(bad, home=home)
    assert not (home / "atlases" / "app").exists()
    assert not list((home / "tmp").glob("*")) if (home / "tmp").exists() else True

    result = CliRunner().invoke(app, ["atlas", "import", str(bad), "--home", str(home), "--json"])
    assert result.exit_code == 1 and reason in json.loads(result.stdout.strip())["error"]


def test_cli_export_and_import_and_an_existing_name_is_refused(atlas_home, tmp_path):
    file = tmp_path / "a.atlas"
    run = lambda *args: CliRunner().invoke(app, [*map(str, args), "--json"])
    exported = run("atlas", "export", "app", file, "--home", atlas_home)
    assert exported.exit_code == 0, exported.stdout
    assert json.loads(exported.stdout)["members"] == len(read_bundle_manifest(file)["members"])
    home = tmp_path / "elsewhere"
    first = run("atlas", "import", file, "--home", home)
    assert first.exit_code == 0 and json.loads(first.stdout)["atlas"] == "app"
    again = run("atlas", "import", file, "--home", home)
    assert again.exit_code == 1 and "already exists" in json.loads(again.stdout)["error"]
