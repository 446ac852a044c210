"""Semantic histograms: datasets placed on a reference atlas built from the demo network's training
split of sample_data/ (at mixed5a, see tests/test_atlas.py), checked for meaning with held-out,
two-class, enriched and novel datasets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from atlasq import demo_model, sampledata
from atlasq.atlas import AtlasOptions, build_atlas, load_atlas
from atlasq.cli import app
from atlasq.errors import IncompatibleError
from atlasq.histogram import (Histogram, PlacementError, ReferenceSearch, _weighted_vote, cell_images, compare,
                              histogram, place_activations, place_index, placement_state)
from atlasq.indexer import IndexOptions, build_index
from atlasq.store import IndexStore

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
LAYER = "mixed5a"
TWO_CLASSES = ("red_discs", "stripes")
ENRICHED = "green_stars"


def _copy(files: list[str], folder: Path) -> Path:
    for rel in files:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SAMPLE_DATA / rel, target)
    return folder


def _index(folder: Path, name: str, home: Path, **options) -> None:
    build_index(folder, name, home=home, progress=False, precision="fp32",
                options=IndexOptions(model="demo", layers=(LAYER,), **options))


def _generated(folder: Path, count: int, draw, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        rng = np.random.default_rng([seed, n])
        size = (int(rng.integers(160, 300)), int(rng.integers(160, 300)))
        draw(rng, size).save(folder / f"gen_{n:03d}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_weights):
    """Reference atlas ``ref`` from the training split; datasets ``held`` (held-out split),
    ``two`` (held-out of two classes), ``held_plus`` (held-out plus generated green stars) and
    ``novel`` (plasma clouds no class resembles)."""
    home = tmp_path_factory.mktemp("hist")
    files = demo_model.labelled_files(SAMPLE_DATA)
    train, held = demo_model.split(files)
    _index(_copy([p for p, _ in train], home / "train_files"), "train", home, attributions=True)
    build_atlas("train", "ref", home=home, progress=False,
                options=AtlasOptions(layer=LAYER, grids=(10, 20), icons=False, seed=3))
    held_dir = _copy([p for p, _ in held], home / "held_files")
    _index(held_dir, "held", home)
    _index(_copy([p for p, _ in held if p.split("/")[0] in TWO_CLASSES], home / "two_files"), "two", home)
    plus = shutil.copytree(held_dir, home / "plus_files")
    _generated(plus / "extra", 60, lambda rng, size: sampledata.draw(ENRICHED, rng, size), seed=11)
    _index(plus, "held_plus", home)
    _index(_generated(home / "novel_files", 24, sampledata.draw_novel, seed=12), "novel", home)
    return home


def _majority_class_of_cells(atlas, home: Path, level: int) -> dict[tuple[int, int], str]:
    with IndexStore(home / "train") as store:
        paths = {r["id"]: r["path"] for r in store.images()}
    ref = atlas.reference.to_pydict()
    votes: dict[tuple[int, int], list[str]] = {}
    for image_id, i, j in zip(ref["image_id"], ref[f"cell_{level}_i"], ref[f"cell_{level}_j"]):
        votes.setdefault((i, j), []).append(paths[image_id].split("/")[0])
    return {cell: max(set(v), key=v.count) for cell, v in votes.items()}


def _placements(home: Path, index: str, level: int) -> list[tuple]:
    with IndexStore(home / index) as store:
        return store.con.execute(
            "SELECT p.image_id, p.k, p.i, p.j, p.off_atlas, im.path FROM placements p JOIN images im ON im.id = p.image_id "
            "WHERE p.level = ?", [level]).fetchall()


# ----------------------------------------------------------------------------- unit level

def test_weighted_vote_takes_the_heaviest_label_and_ignores_non_voters():
    labels = np.array([[3, 5, 5, -1], [-1, -1, -1, -1], [7, 2, 2, 7], [4, 6, -1, -1]])
    weights = np.array([[0.9, 0.5, 0.5, 3.0], [1, 1, 1, 1], [0.6, 0.5, 0.5, 0.3], [0.5, 0.5, 0.9, 0.9]])
    assert _weighted_vote(labels, weights).tolist() == [5, -1, 2, 4]  # a tie goes to the nearer


# ----------------------------------------------------------------------------- meaning

def test_held_out_images_land_in_cells_of_their_own_class(world):
    atlas = load_atlas("ref", world)
    level = min(atlas.levels)
    result = histogram("ref", "held", home=world, level=level)
    majority = _majority_class_of_cells(atlas, world, level)
    rows = _placements(world, "held", level)
    own = [not off and i is not None and majority.get((i, j)) == path.split("/")[0]
           for _, _, i, j, off, path in rows]
    print(f"held-out activations in a cell of their own class: {np.mean(own):.3f} of {len(own)}; "
          f"off-atlas {result.totals.off_atlas_share:.3f}")
    assert len(own) == result.totals.activations > 0
    assert np.mean(own) >= 0.8


def test_reference_activations_placed_without_themselves_land_in_their_own_cells(world):
    atlas = load_atlas("ref", world)
    level = min(atlas.levels)
    search = ReferenceSearch(atlas)
    ids = atlas.reference["image_id"].to_numpy()
    placed = place_activations(search, np.asarray(atlas.activations()), exclude_images=ids)
    ref = atlas.reference.to_pydict()
    kept = np.array(ref[f"kept_{level}"])
    truth = np.stack([ref[f"cell_{level}_i"], ref[f"cell_{level}_j"]], 1)
    same = (placed.cells[level] == truth).all(1)[kept]
    print(f"leave-one-image-out placement in the own cell at {level}x{level}: {same.mean():.3f}")
    assert same.mean() >= 0.8
    # the threshold is the 99th percentile of exactly these distances: about 1% are off-atlas
    assert 0.002 <= placed.off_atlas.mean() <= 0.03


def test_two_class_dataset_fills_cells_labelled_with_those_classes(world):
    result = histogram("ref", "two", home=world)
    total = result.totals.activations
    in_labelled = sum(c.activations for c in result.cells if c.top_label in TWO_CLASSES)
    print(f"two-class dataset in cells labelled with its classes: {in_labelled / total:.3f}")
    assert in_labelled / total >= 0.7


def test_counts_sum_to_totals_at_every_level(world):
    atlas = load_atlas("ref", world)
    with IndexStore(world / "held") as store:
        samples = store.count("samples")
        images = store.count("images")
    for level in atlas.levels:
        result = histogram("ref", "held", home=world, level=level)
        t = result.totals
        assert t.activations == samples and t.images == images
        assert sum(c.activations for c in result.cells) + t.off_atlas + t.outside_kept_cells == samples
        assert len(result.cells) == atlas.manifest["levels"][str(level)]["cells"]


def test_novel_images_raise_the_off_atlas_share(world):
    held = histogram("ref", "held", home=world).totals.off_atlas_share
    novel = histogram("ref", "novel", home=world).totals.off_atlas_share
    print(f"off-atlas share: held-out {held:.3f}, novel plasma images {novel:.3f}")
    assert novel >= 0.5 and novel >= 5 * max(held, 0.01)


def test_compare_ranks_the_enriched_class_first(world, tmp_path):
    result = compare("ref", "held", "held_plus", home=world, out=tmp_path / "cmp")
    over = result.over_represented_in_b
    print(f"JS divergence {result.jensen_shannon_bits:.4f} bits; over-represented: "
          f"{[(c.top_label, round(c.log2_ratio, 2), c.q) for c in over[:5]]}")
    assert over and over[0].top_label == ENRICHED
    assert all(c.top_label == ENRICHED for c in over[:3])
    assert result.jensen_shannon_bits > 0
    for path in result.files.values():
        assert Path(path).is_file()
    same = compare("ref", "held", "held_plus", home=world, out=tmp_path / "cmp")  # idempotent
    assert same.jensen_shannon_bits == result.jensen_shannon_bits


def test_compare_of_one_index_with_itself_is_refused(world):
    with pytest.raises(PlacementError):
        compare("ref", "held", "held", home=world)


# ----------------------------------------------------------------------------- storage and queries

def test_cell_query_returns_the_cells_images_most_typical_first(world):
    result = histogram("ref", "held", home=world)
    fullest = max(result.cells, key=lambda c: c.activations)
    members = cell_images("ref", "held", fullest.i, fullest.j, home=world, k=1000)
    assert len(members.images) == fullest.images == members.total_images and not members.has_more
    distances = [m.cell_distance for m in members.images]
    assert distances == sorted(distances)
    rows = _placements(world, "held", result.level)
    in_cell = {image_id for image_id, _, i, j, off, _ in rows if (i, j) == (fullest.i, fullest.j) and not off}
    assert {m.image_id for m in members.images} == in_cell
    first = members.images[0]
    assert first.positions and {"k", "y", "x", "cell_distance"} <= set(first.positions[0])
    page = cell_images("ref", "held", fullest.i, fullest.j, home=world, k=2, offset=1)
    assert [m.image_id for m in page.images] == [m.image_id for m in members.images[1:3]]
    assert page.has_more == (len(members.images) > 3) and page.total_images == members.total_images


def test_placing_again_after_the_index_grew_places_only_the_new_activations(world, tmp_path):
    folder = _copy([p for p, _ in demo_model.held_out_paths(SAMPLE_DATA)][:10], tmp_path / "grow")
    _index(folder, "grow", world)
    first = place_index("ref", "grow", home=world)
    assert first.placed == 40 and first.already_placed == 0
    _copy([p for p, _ in demo_model.held_out_paths(SAMPLE_DATA)][10:13], folder)
    (folder / demo_model.held_out_paths(SAMPLE_DATA)[0][0]).unlink()
    _index(folder, "grow", world)
    second = place_index("ref", "grow", home=world)
    assert second.placed == 12 and second.already_placed == 36 and second.dropped == 1
    t = histogram("ref", "grow", home=world, place=False).totals
    assert t.activations == 48 and t.images == 12


def test_layer_and_model_mismatches_are_refused(world, tmp_path):
    folder = _copy([p for p, _ in demo_model.held_out_paths(SAMPLE_DATA)][:3], tmp_path / "few")
    build_index(folder, "other_layer", home=world, progress=False, precision="fp32",
                options=IndexOptions(model="demo", layers=("mixed4c",)))
    with pytest.raises(IncompatibleError, match="--layers mixed5a"):
        place_index("ref", "other_layer", home=world)
    build_index(folder, "other_weights", home=world, progress=False, precision="fp32",
                options=IndexOptions(model="demo", weights="random", layers=(LAYER,)))
    with pytest.raises(IncompatibleError, match="weights"):
        place_index("ref", "other_weights", home=world)
    build_index(folder, "other_model", home=world, progress=False, precision="fp32",
                options=IndexOptions(model="inceptionv1", weights="random", layers=(LAYER,)))
    with pytest.raises(IncompatibleError, match="model"):
        place_index("ref", "other_model", home=world)


# ----------------------------------------------------------------------------- command line

def test_histogram_cell_and_compare_commands(world, tmp_path):
    runner = CliRunner()
    home = ["--home", str(world), "--json"]
    result = runner.invoke(app, ["histogram", "--atlas", "ref", "--index", "two", *home])
    assert result.exit_code == 0, result.output
    hist = json.loads(result.stdout.splitlines()[-1])
    picture = Image.open(hist["picture"])
    left, top = (int(v) for v in picture.info["grid_origin"].split(","))  # where the mosaic's cells are
    fullest = max(hist["cells"], key=lambda c: c["activations"])
    # The fullest cell is framed in the top colour of the count ramp (yellow, far more red than blue).
    tile = Image.open(load_atlas("ref", world).tiles_path(hist["level"])).size[0] // hist["level"]
    edge = np.asarray(picture.convert("RGB"), np.float32)[top + fullest["i"] * tile,
                                                          left + fullest["j"] * tile:left + (fullest["j"] + 1) * tile]
    assert edge[:, 0].mean() - edge[:, 2].mean() > 60
    result = runner.invoke(app, ["cell", "--atlas", "ref", "--index", "two", "--cell",
                                 f"{fullest['i']},{fullest['j']}", "-k", "3", *home])
    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout.splitlines()[-1])["images"]
    assert 1 <= len(images) <= 3 and all(m["path"].split("/")[0] in TWO_CLASSES for m in images)
    result = runner.invoke(app, ["compare", "--atlas", "ref", "--index", "held", "--index", "held_plus",
                                 "--out", str(tmp_path / "c"), *home])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["over_represented_in_b"][0]["top_label"] == ENRICHED
    bad = runner.invoke(app, ["cell", "--atlas", "ref", "--index", "two", "--cell", "99,0", *home])
    assert bad.exit_code == 2 and "outside" in json.loads(bad.stdout.splitlines()[-1])["error"]  # a bad option
    bad = runner.invoke(app, ["histogram", "--atlas", "nothing", "--index", "two", *home])
    assert bad.exit_code == 1


# ----------------------------------------------------------------------------- state, identity, results, errors

def test_placement_state_follows_content_not_counts(world, tmp_path):
    """A file whose content is replaced (same name, new mtime) is a new image: the state turns
    stale although every count stays the same, and placing forgets the old id and places the new."""
    held = [p for p, _ in demo_model.held_out_paths(SAMPLE_DATA)]
    folder = _copy(held[:6], tmp_path / "changing")
    _index(folder, "changing", world)
    atlas = load_atlas("ref", world)
    assert placement_state(atlas, "changing", world) == "missing"
    place_index(atlas, "changing", home=world)
    assert placement_state(atlas, "changing", world) == "current"
    with IndexStore(world / "changing") as store:
        old_id = store.find_path(held[0])
    target = folder / held[0]
    target.write_bytes((SAMPLE_DATA / held[5]).read_bytes())
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    _index(folder, "changing", world)
    with IndexStore(world / "changing") as store:
        new_id = store.find_path(held[0])
        per_image = store.meta()["samples_per_image"]
    assert new_id != old_id
    assert placement_state(atlas, "changing", world) == "stale"
    result = histogram(atlas, "changing", home=world)
    assert result.placed.placed == per_image and result.placed.dropped == 1
    placed_ids = {row[0] for row in _placements(world, "changing", min(atlas.levels))}
    assert old_id not in placed_ids and new_id in placed_ids and len(placed_ids) == 6
    assert placement_state(atlas, "changing", world) == "current"
    assert place_index(atlas, "changing", home=world).placed == 0


def test_an_index_of_other_random_weights_is_refused(tmp_path, demo_weights):
    """Random weights drawn with another seed are other weights, though both say "random"."""
    from atlasq.errors import IncompatibleError

    folder = _copy([p for p, _ in demo_model.held_out_paths(SAMPLE_DATA)][::8][:12], tmp_path / "imgs")
    for name, seed in (("seed0", 0), ("seed0_again", 0), ("seed1", 1)):
        build_index(folder, name, home=tmp_path, progress=False, precision="fp32",
                    options=IndexOptions(model="demo", weights="random", seed=seed, layers=(LAYER,),
                                         attributions=name == "seed0"))
    build_atlas("seed0", "random", home=tmp_path, progress=False,
                options=AtlasOptions(layer=LAYER, grids=(2,), min_count=1, icons=False, n_neighbors=8))
    assert place_index("random", "seed0_again", home=tmp_path).placed == 48
    with pytest.raises(IncompatibleError, match="other weights"):
        place_index("random", "seed1", home=tmp_path)
    code, out = _json(CliRunner().invoke(app, ["histogram", "--atlas", "random", "--index", "seed1",
                                                "--home", str(tmp_path), "--json"]))
    assert code == 1 and "other weights" in out["error"]


def _json(result) -> tuple[int, dict]:
    return result.exit_code, json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def test_results_are_dataclasses_the_cli_prints(world, tmp_path):
    result = histogram("ref", "two", home=world)
    assert isinstance(result, Histogram)
    code, printed = _json(CliRunner().invoke(app, ["histogram", "--atlas", "ref", "--index", "two", "--home",
                                                   str(world), "--json"]))
    assert code == 0
    as_dict = result.to_dict()
    assert printed["cells"] == json.loads(json.dumps(as_dict["cells"]))
    assert printed["totals"] == as_dict["totals"] and printed["picture"]
    fullest = max(result.cells, key=lambda c: c.activations)
    members = cell_images("ref", "two", fullest.i, fullest.j, home=world, k=3)
    code, printed = _json(CliRunner().invoke(app, ["cell", "--atlas", "ref", "--index", "two", "--cell",
                                                   f"{fullest.i},{fullest.j}", "-k", "3", "--home", str(world),
                                                   "--json"]))
    assert printed == json.loads(json.dumps(members.to_dict()))
    comparison = compare("ref", "held", "held_plus", home=world, write=False)
    assert comparison.to_dict()["over_represented_in_b"][0]["top_label"] == comparison.over_represented_in_b[0].top_label


def test_user_errors_of_the_reading_commands_are_one_line_naming_the_option(world, tmp_path):
    runner = CliRunner()
    base = ["--atlas", "ref", "--home", str(world), "--json"]
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    for args, named in ((["cell", "--index", "two", "--cell", "0,0", "-k", "-1"], "-k"),
                        (["cell", "--index", "two", "--cell", "0,0", "--offset", "-3"], "--offset"),
                        (["compare", "--index", "held", "--index", "two", "--alpha", "5"], "--alpha"),
                        (["compare", "--index", "held", "--index", "two", "--alpha", "0"], "--alpha"),
                        (["compare", "--index", "held", "--index", "two", "--out", str(a_file)], "--out"),
                        (["histogram", "--index", "two", "--level", "7"], "--level"),
                        (["cell", "--index", "two", "--cell", "0,0", "--level", "7"], "--level")):
        result = runner.invoke(app, args + base)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        code, out = _json(result)
        assert code == 2 and named in out["error"], (args, out)
    assert a_file.read_text() == "mine"
    code, out = _json(runner.invoke(app, ["histogram", "--atlas", "nothing", "--index", "two", "--home", str(world),
                                          "--json"]))
    assert code == 1 and "no atlas" in out["error"]
