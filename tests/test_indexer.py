"""Tests for ``atlasq index`` / :func:`atlasq.indexer.build_index` and ``atlasq info``.

Indexes here are small folders of copied sample_data images embedded with the demo network
(random weights unless a test needs meaning), so each build takes a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pytest
from processes import kill_9_when
from PIL import Image
from typer.testing import CliRunner

from atlasq.api import index_info, search_index
from atlasq.cli import app
from atlasq.errors import BusyError, DamagedError, IncompatibleError, InvalidOptionError
from atlasq.images import content_hash
from atlasq.indexer import IndexOptions, build_index
from atlasq.search import sync_faiss
from atlasq.store import IndexStore
from atlasq.embed import EmbedConfig, process_files
from atlasq.home import HOME_MARKER
from atlasq.images import display_path, path_key, scan_folder
from atlasq.model import load_model
from badimages import (HIDDEN_FILE, KINDS, NON_IMAGE_FILE, damaged_image, without_root_privileges,
                       write_bad_images)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
CLASSES = sorted(p.name for p in SAMPLE_DATA.iterdir() if p.is_dir())
RANDOM_DEMO = ("--model", "demo", "--weights", "random", "--precision", "fp32")


# ----------------------------------------------------------------------------- helpers

def sample_files(n: int, offset: int = 0) -> list[Path]:
    """``n`` sample images, round-robin over the classes, starting at each class's ``offset``-th."""
    per_class = {c: sorted(p for p in (SAMPLE_DATA / c).iterdir() if p.is_file()) for c in CLASSES}
    out, i = [], offset
    while len(out) < n:
        for c in CLASSES:
            if len(out) < n:
                out.append(per_class[c][i])
        i += 1
    return out


def copy_samples(dest: Path, n: int, offset: int = 0) -> list[str]:
    """Copy ``n`` sample images into ``dest/<class>/``; return their relative paths."""
    rel = []
    for src in sample_files(n, offset):
        target = dest / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        rel.append(f"{src.parent.name}/{src.name}")
    return rel


def build(root: Path, name: str, home: Path, **kwargs):
    kwargs.setdefault("options", IndexOptions(model="demo", weights="random"))
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("precision", "fp32")
    kwargs.setdefault("workers", 1)
    return build_index(root, name, home=home, progress=False, **kwargs)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_json(result) -> dict:
    """The single JSON object a ``--json`` command printed on stdout."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def sql(folder: Path, query: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(folder / "index.duckdb"), read_only=True)
    try:
        return con.execute(query, list(params)).fetchall()
    finally:
        con.close()


def faiss_ids(path: Path) -> tuple[int, set[int]]:
    import faiss

    index = faiss.read_index(str(path))
    return index.ntotal, set(faiss.vector_to_array(index.id_map).tolist())


def assert_consistent(folder: Path) -> None:
    """No duplicate paths, samples only of indexed images, FAISS file current and equal to DuckDB."""
    assert sql(folder, "SELECT path, count(*) FROM images GROUP BY path HAVING count(*) > 1") == []
    assert sql(folder, "SELECT count(*) FROM samples WHERE image_id NOT IN (SELECT id FROM images)") == [(0,)]
    ids = {r[0] for r in sql(folder, "SELECT id FROM images")}
    ntotal, fids = faiss_ids(folder / "pooled.faiss")
    assert ntotal == len(ids) and fids == ids
    with IndexStore(folder) as store:
        assert store.faiss_is_current("exact")


def snapshot(folder: Path) -> dict:
    """Everything an index run could change: rows, meta, shard folders, FAISS records."""
    return {
        "images": sql(folder, "SELECT id, path, bytes, mtime, hash, shard, row FROM images ORDER BY id"),
        "samples": sql(folder, "SELECT count(*) FROM samples"),
        "errors": sql(folder, "SELECT path, reason FROM errors ORDER BY path"),
        "meta": sql(folder, "SELECT key, value FROM meta ORDER BY key"),
        "shards": sorted(p.name for p in (folder / "shards").iterdir()),
        "faiss": (folder / "pooled.faiss.json").read_text(),
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(root, home, paths): index ``small`` of 24 sample images, demo network, random weights."""
    root = tmp_path_factory.mktemp("small_root")
    home = tmp_path_factory.mktemp("small_home")
    paths = copy_samples(root, 24)
    summary = build(root, "small", home)
    assert summary.total_images == 24
    return root, home, paths


# ----------------------------------------------------------------------------- bad input

def test_bad_images_are_recorded_with_reasons_and_good_ones_indexed(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    kinds = write_bad_images(root)
    good_samples = copy_samples(root / "samples", 4)
    good = {p for p, ok in kinds.items() if ok} | {f"samples/{p}" for p in good_samples}
    bad = {p for p, ok in kinds.items() if not ok and (root / p).is_file()}
    assert len(bad) == 5  # empty, text, two truncated, bomb ("folder.jpg" is a directory)

    result = cli("index", root, "--name", "bad", "--home", home, *RANDOM_DEMO, "--json")
    assert result.exit_code == 0, result.output
    summary = one_json(result)
    assert summary["found"] == len(good) + len(bad)
    assert summary["indexed"] == summary["total_images"] == len(good)
    assert summary["new_errors"] == summary["total_errors"] == len(bad)
    assert summary["removed"] == summary["changed"] == summary["unchanged"] == 0

    folder = home / "bad"
    assert {p for (p,) in sql(folder, "SELECT path FROM images")} == good
    reasons = dict(sql(folder, "SELECT path, reason FROM errors"))
    assert set(reasons) == bad
    assert reasons["bad/empty.jpg"] == "empty file"
    assert reasons["bad/text.png"] == "not an image"
    assert reasons["bad/truncated.jpg"] == "truncated file"
    assert reasons["bad/truncated.png"] == "truncated file"
    assert reasons["bad/bomb.png"].startswith("decompression bomb")
    for skipped in (HIDDEN_FILE, NON_IMAGE_FILE, KINDS["directory"][0]):
        assert skipped not in reasons and not sql(folder, "SELECT 1 FROM images WHERE path = ?", [skipped])
    sizes = {p: (w, h) for p, w, h in sql(folder, "SELECT path, width, height FROM images")}
    assert sizes[KINDS["rgb"][0]] == (64, 48)
    assert sizes[KINDS["exif_rotated"][0]] == (40, 60)  # stored 60x40, EXIF orientation 6

    # a second run tries the bad files again (they still fail: not new errors, not fixed)
    again = one_json(cli("index", root, "--name", "bad", "--home", home, "--json"))
    assert (again["indexed"], again["new_errors"], again["retried_errors"], again["fixed_errors"],
            again["unchanged"], again["total_errors"]) == (0, 0, len(bad), 0, len(good), len(bad))
    info = one_json(cli("info", "bad", "--home", home, "--json"))
    assert info["errors"] == len(bad) and dict(map(tuple, info["error_list"])) == reasons


def test_only_bad_files_exits_1(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "empty.jpg").write_bytes(b"")
    (root / "sub" / "text.png").write_text("not a png")
    result = cli("index", root, "--name", "nothing", "--home", tmp_path / "home", *RANDOM_DEMO, "--json")
    assert result.exit_code == 1
    summary = one_json(result)
    assert summary["total_images"] == 0 and summary["total_errors"] == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    home = tmp_path / "home"
    result = cli("index", tmp_path / "no_such_folder", "--name", "x", "--home", home, *RANDOM_DEMO)
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an uncaught exception
    message = " ".join(result.stderr.split())  # rich wraps long lines on stderr
    assert "does not exist" in message and "no_such_folder" in message
    assert "Traceback" not in result.output
    assert not (home / "x").exists()
    as_json = cli("index", tmp_path / "no_such_folder", "--name", "x", "--home", home, *RANDOM_DEMO, "--json")
    assert as_json.exit_code != 0 and "does not exist" in one_json(as_json)["error"]


def test_damaged_png_is_an_error_not_a_half_image(tmp_path):
    """The issue's file: a 200x200 PNG with 64 bytes inverted mid-pixel-data."""
    root = tmp_path / "imgs"
    good = copy_samples(root, 2)
    (root / "damaged.png").write_bytes(damaged_image("PNG"))
    summary = build(root, "dmg", tmp_path / "home")
    assert (summary.indexed, summary.new_errors) == (2, 1)
    folder = tmp_path / "home" / "dmg"
    assert {p for (p,) in sql(folder, "SELECT path FROM images")} == set(good)
    [(reason,)] = sql(folder, "SELECT reason FROM errors WHERE path = 'damaged.png'")
    assert reason.startswith("unreadable: ") and "data stream" in reason


def test_a_home_inside_the_indexed_folder_is_never_indexed(tmp_path, monkeypatch):
    """`cd photos && atlasq index . --name p`: the default home ./indexes lands inside the folder."""
    photos = tmp_path / "photos"
    paths = copy_samples(photos, 4)
    monkeypatch.chdir(photos)
    monkeypatch.delenv("ATLASQ_HOME", raising=False)
    first = one_json(cli("index", ".", "--name", "p", *RANDOM_DEMO, "--json"))
    assert first["indexed"] == 4 and (photos / "indexes" / HOME_MARKER).is_file()
    # what atlasq later writes into its home: heat maps in the index folder, atlas icons and mosaics
    for artefact in ("indexes/p/histograms/a/level_10.png", "indexes/atlases/a/icons/000001.png",
                     "indexes/atlases/a/mosaic.png"):
        (photos / artefact).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 0, 0)).save(photos / artefact)
    (photos / "indexes/atlases/a/manifest.json").write_text("{}")

    again = cli("index", ".", "--name", "p", *RANDOM_DEMO)
    assert again.exit_code == 0, again.output
    assert "skipped atlasq home or index: indexes" in again.stderr
    summary = one_json(cli("index", ".", "--name", "p", "--json"))
    assert (summary["found"], summary["indexed"], summary["unchanged"]) == (4, 0, 4)
    assert summary["skipped_homes"] == ["indexes"]
    assert {p for (p,) in sql(photos / "indexes" / "p", "SELECT path FROM images")} == set(paths)

    # a home written before the marker existed is recognised by its atlases and index folders
    (photos / "indexes" / HOME_MARKER).unlink()
    assert scan_folder(photos).skipped_homes == ["indexes"]
    shutil.rmtree(photos / "indexes" / "atlases")
    assert scan_folder(photos).skipped_homes == ["indexes/p"]
    assert [e.path for e in scan_folder(photos).entries] == sorted(paths)


def test_errored_files_are_retried_on_every_run(tmp_path):
    """A file fixed without any change of size or modification time is indexed on the next run."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    copy_samples(root, 3)
    valid = sample_files(1, offset=7)[0].read_bytes()
    target = root / "later_fixed.jpg"
    target.write_bytes(bytes(len(valid)))  # same size, but zeros: not an image
    first = build(root, "retry", home)
    assert (first.indexed, first.new_errors, first.total_errors) == (3, 1, 1)
    stat = target.stat()
    target.write_bytes(valid)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    second = build(root, "retry", home)
    assert (second.retried_errors, second.fixed_errors, second.indexed, second.new_errors) == (1, 1, 1, 0)
    assert (second.unchanged, second.total_images, second.total_errors) == (3, 4, 0)
    assert sql(home / "retry", "SELECT path FROM images WHERE path = 'later_fixed.jpg'") == [("later_fixed.jpg",)]
    assert_consistent(home / "retry")
    third = build(root, "retry", home)
    assert (third.retried_errors, third.indexed, third.unchanged) == (0, 0, 4)


def test_file_names_that_are_not_utf8_are_indexed_and_searchable(tmp_path):
    """Names are bytes on POSIX: one that is not UTF-8 is stored escaped, found by its real bytes
    and by its escaped form, and reruns work."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    copy_samples(root, 3)
    latin1 = os.fsdecode(b"caf\xe9_\xff.jpg")
    newline = "two\nlines.jpg"
    for name, src in zip((latin1, newline), sample_files(2, offset=5)):
        shutil.copy2(src, root / name)
    first = cli("index", root, "--name", "names", "--home", home, *RANDOM_DEMO, "--json")
    assert first.exit_code == 0, first.output
    assert (one_json(first)["indexed"], one_json(first)["total_errors"]) == (5, 0)
    stored = dict(sql(home / "names", "SELECT path, id FROM images"))
    assert {"caf\\xe9_\\xff.jpg", "two\\x0alines.jpg"} <= set(stored)
    again = one_json(cli("index", root, "--name", "names", "--home", home, "--json"))
    assert (again["unchanged"], again["indexed"]) == (5, 0)

    def search(query: str) -> dict:
        # the command line gets a name's real bytes as Python decodes argv: with surrogateescape
        return one_json(cli("search", query, "--index", "names", "--home", home, "-k", "2", "--json"))
    key = "caf\\xe9_\\xff.jpg"
    for query in (latin1, str(root / latin1), key):  # the real bytes, relative and absolute; the escaped form
        assert search(query)["query_id"] == stored[key]
    assert search(newline)["query_id"] == stored["two\\x0alines.jpg"]


def test_unreadable_folders_and_dangling_symlinks_are_errors(tmp_path):
    """Reported in the errors table (so `atlasq info` shows them); images already indexed from a
    folder that cannot be listed now are kept, not dropped."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    copy_samples(root, 2)
    copy_samples(root / "locked", 2, offset=3)
    os.symlink(root / "moved_away.jpg", root / "dangling.jpg")
    first = build(root, "u", home)
    assert (first.total_images, first.scan_errors) == (4, 1)
    (root / "locked").chmod(0)
    try:
        done = subprocess.run([*without_root_privileges(), sys.executable, "-m", "atlasq.cli", "index", str(root), "--name", "u",
                               "--home", str(home), "--json"], capture_output=True)
    finally:
        (root / "locked").chmod(0o755)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    second = json.loads(done.stdout)
    assert (second["total_images"], second["removed"], second["scan_errors"]) == (4, 0, 2)
    info = one_json(cli("info", "u", "--home", home, "--json"))
    reasons = dict(map(tuple, info["error_list"]))
    assert reasons["locked"] == "unreadable folder: Permission denied"
    assert reasons["dangling.jpg"].startswith("dangling symlink")
    (root / "dangling.jpg").unlink()
    third = build(root, "u", home)
    assert (third.total_images, third.total_errors, third.scan_errors) == (4, 0, 0)


def test_names_with_newlines_keep_human_output_one_line_per_result(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    root.mkdir()
    for name, src in zip(("a\nb.jpg", "c\rd\x1b[2J.jpg", "plain.jpg"), sample_files(3)):
        shutil.copy2(src, root / name)
    (root / "bad\nname.png").write_bytes(b"not a png")
    indexed = cli("index", root, "--name", "nl", "--home", home, *RANDOM_DEMO)
    assert indexed.exit_code == 0, indexed.output
    assert "  error: bad\\x0aname.png: not an image\n" in indexed.stderr
    found = cli("search", "plain.jpg", "--index", "nl", "--home", home, "-k", "2")
    assert found.exit_code == 0, found.output
    header, *lines = found.stdout.splitlines()  # rank, score, id, top class, path
    assert len(lines) == 2 and all(len(line.split()) == 5 for line in lines)
    assert {line.split()[4] for line in lines} == {"a\\x0ab.jpg", "c\\x0dd\\x1b[2J.jpg"}
    info = cli("info", "nl", "--home", home)
    errors = info.stdout.split("file not indexed")[1].splitlines()[1:]  # the table of errors, one line each
    assert [line.split() for line in errors] == [["bad\\x0aname.png", "not", "an", "image"]]
    assert display_path(root / "a\nb.jpg").endswith("a\\x0ab.jpg")


def test_process_files_gives_the_records_the_indexer_stores(tmp_path):
    """The per-batch unit (file paths in, records out) is the indexer's own decode and embed step."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    copy_samples(root, 3)
    (root / "broken.png").write_bytes(b"nope")
    build(root, "pf", home)
    entries = scan_folder(root).entries
    model = load_model("demo", "random", seed=0)
    decoded, embedded = process_files(model, root, entries, EmbedConfig(precision="fp32"))
    assert [d.entry.path for d in decoded if d.error] == ["broken.png"]
    ok = [d.entry.path for d in decoded if d.error is None]
    ids = dict(sql(home / "pf", "SELECT path, id FROM images"))
    with IndexStore(home / "pf") as store:
        stored_ids, pooled = store.pooled([ids[p] for p in ok])
    order = {int(i): n for n, i in enumerate(stored_ids)}
    np.testing.assert_allclose(embedded.pooled, pooled[[order[ids[p]] for p in ok]], rtol=1e-4, atol=1e-5)
    assert embedded.positions["mixed4c"].shape == (3, 4, 2)


# ----------------------------------------------------------------------------- dimensions

def test_stored_size_is_original_exif_rotated_size_of_large_jpeg(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (800, 1200, 3), dtype=np.uint8))  # 1200 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(root / "rotated.jpg", "JPEG", quality=90, exif=exif)
    picture.save(root / "upright.jpg", "JPEG", quality=90)
    picture.resize((300, 200)).save(root / "small.png")
    build(root, "dims", tmp_path / "home")
    sizes = {p: (w, h) for p, w, h in sql(tmp_path / "home" / "dims", "SELECT path, width, height FROM images")}
    assert sizes == {"rotated.jpg": (800, 1200), "upright.jpg": (1200, 800), "small.png": (300, 200)}


# ----------------------------------------------------------------------------- incremental

def test_incremental_update(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    folder = home / "inc"
    paths = copy_samples(root, 30)
    first = build(root, "inc", home, commit_every=8)
    assert (first.indexed, first.total_images) == (30, 30)
    before = {p: (i, h) for i, p, h in sql(folder, "SELECT id, path, hash FROM images")}
    max_id = max(i for i, _ in before.values())

    again = build(root, "inc", home)
    assert (again.indexed, again.unchanged, again.changed, again.removed) == (0, 30, 0, 0)
    assert {p: (i, h) for i, p, h in sql(folder, "SELECT id, path, hash FROM images")} == before

    added = copy_samples(root, 3, offset=20)
    assert not set(added) & set(paths)
    modified, deleted = paths[0], paths[1:3]
    target = root / modified
    old_stat = target.stat()
    target.write_bytes(sample_files(1, offset=30)[0].read_bytes())
    os.utime(target, (old_stat.st_atime, old_stat.st_mtime + 10))
    for p in deleted:
        (root / p).unlink()

    third = build(root, "inc", home)
    assert third.indexed == 4 and third.changed == 1 and third.removed == 2
    assert third.unchanged == 30 - 3 and third.total_images == 31 and third.total_errors == 0
    after = {p: (i, h) for i, p, h in sql(folder, "SELECT id, path, hash FROM images")}
    assert set(after) == (set(paths) - set(deleted)) | set(added)
    assert after[modified][1] != before[modified][1]
    assert after[modified][1] == content_hash(target)
    for p in set(paths) - set(deleted) - {modified}:
        assert after[p] == before[p]  # untouched images keep their id and hash
    new_ids = [after[p][0] for p in [modified, *added]]
    assert min(new_ids) > max_id and len(set(new_ids)) == 4  # ids never reused
    assert sql(folder, "SELECT count(*) FROM samples") == [(31 * 4,)]
    assert_consistent(folder)
    gone = {before[p][0] for p in deleted} | {before[modified][0]}
    hits = search_index("inc", added[0], k=50, home=home, mode="exact")["hits"]
    assert len(hits) == 30 and not {h["id"] for h in hits} & gone


# ----------------------------------------------------------------------------- kill -9 and resume

def _shard_numbers(folder: Path) -> list[int]:
    try:
        return [int(p.name) for p in (folder / "shards").iterdir() if p.name.isdigit()]
    except FileNotFoundError:
        return []


def _samples_by_path(folder: Path) -> dict:
    with IndexStore(folder) as store:
        paths = {r["id"]: r["path"] for r in store.images()}
        s = store.samples("mixed4c")
        ids, vectors = store.pooled()
    samples = {(paths[int(i)], int(k)): (int(y), int(x), a.astype(np.float32))
               for i, k, y, x, a in zip(s["image_id"], s["k"], s["y"], s["x"], s["activations"])}
    pooled = {paths[int(i)]: v for i, v in zip(ids, vectors)}
    return samples, pooled


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    root = tmp_path / "imgs"
    total = len(copy_samples(root, 120))
    killed_home, clean_home = tmp_path / "killed", tmp_path / "clean"
    folder = killed_home / "k"
    cmd = [sys.executable, "-m", "atlasq.cli", "index", str(root), "--name", "k", "--home", str(killed_home),
           *RANDOM_DEMO, "--batch-size", "8", "--commit-every", "8", "--workers", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "ATLASQ_HOME": str(killed_home)})
    # shard 2 can only be written once shard 1's rows are committed: kill mid-run after that
    kill_9_when(proc, lambda: max(_shard_numbers(folder), default=0) >= 2, "indexing subprocess")
    interrupted_count = sql(folder, "SELECT count(*) FROM images")[0][0]
    assert 8 <= interrupted_count < total

    resumed = build_index(root, "k", home=killed_home, precision="fp32", progress=False, batch_size=8,
                          commit_every=8)  # settings come from the index itself
    assert resumed.unchanged == interrupted_count
    assert resumed.indexed == total - interrupted_count and resumed.total_images == total
    clean = build(root, "k", clean_home, batch_size=8, commit_every=8)
    assert clean.total_images == total

    clean_folder = clean_home / "k"
    rows = lambda f: set(sql(f, "SELECT path, hash FROM images"))
    assert rows(folder) == rows(clean_folder) and len(rows(folder)) == total
    got_samples, got_pooled = _samples_by_path(folder)
    want_samples, want_pooled = _samples_by_path(clean_folder)
    assert set(got_samples) == set(want_samples) and len(got_samples) == total * 4
    for key, (y, x, act) in want_samples.items():
        gy, gx, gact = got_samples[key]
        assert (gy, gx) == (y, x), key
        np.testing.assert_allclose(gact, act, rtol=1e-3, atol=1e-3, err_msg=str(key))
    for path, vector in want_pooled.items():
        np.testing.assert_allclose(got_pooled[path], vector, rtol=1e-3, atol=1e-4)
    assert_consistent(folder)
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    committed = {f"{i:06d}" for (i,) in sql(folder, "SELECT id FROM shards")}
    assert {p.name for p in (folder / "shards").iterdir()} == committed
    referenced = {f"{i:06d}" for (i,) in sql(folder, "SELECT DISTINCT shard FROM images")}
    assert referenced <= committed


# ----------------------------------------------------------------------------- stale FAISS

def test_stale_faiss_is_never_trusted(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    folder = home / "st"
    paths = copy_samples(root, 20)
    build(root, "st", home)
    stale = {name: (folder / name).read_bytes() for name in ("pooled.faiss", "pooled.faiss.json")}
    old_ids = dict(sql(folder, "SELECT path, id FROM images"))
    for p in paths[:5]:
        (root / p).unlink()
    assert build(root, "st", home).removed == 5
    assert_consistent(folder)

    # as if a run had been killed after forgetting the files but before writing FAISS
    for name, data in stale.items():
        (folder / name).write_bytes(data)
    assert faiss_ids(folder / "pooled.faiss")[0] == 20
    alive = {r[0] for r in sql(folder, "SELECT id FROM images")}
    assert len(alive) == 15
    with IndexStore(folder) as store:
        assert not store.faiss_is_current("exact")
    assert index_info("st", home=home)["faiss_current"] is False
    result = search_index("st", paths[5], k=50, home=home)
    assert {h["id"] for h in result["hits"]} == alive - {old_ids[paths[5]]}

    with IndexStore(folder, read_only=False) as store:
        assert sync_faiss(store)["rebuilt"] == ["exact"]
    assert_consistent(folder)

    # a record torn by a crash, or a missing file, means "rebuild", not a crash
    record = folder / "pooled.faiss.json"
    record.write_text(record.read_text()[:7])
    with IndexStore(folder) as store:
        assert not store.faiss_is_current("exact")
    assert {h["id"] for h in search_index("st", paths[5], k=50, home=home)["hits"]} == \
        alive - {old_ids[paths[5]]}
    (folder / "pooled.faiss").unlink()
    assert len(search_index("st", paths[5], k=50, home=home)["hits"]) == 14
    assert build(root, "st", home).faiss["rebuilt"] == ["exact"]
    assert_consistent(folder)


# ----------------------------------------------------------------------------- contradictions

@pytest.mark.parametrize("args, word", [
    (("--layers", "mixed4d"), "layers"),
    (("--model", "inceptionv1"), "model"),
    (("--samples-per-image", "2"), "samples_per_image"),
    (("--weights", "demo"), "weights"),
])
def test_contradicting_options_are_refused_and_change_nothing(small, args, word):
    root, home, _ = small
    before = snapshot(home / "small")
    result = cli("index", root, "--name", "small", "--home", home, *args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    message = " ".join(result.stderr.split())
    assert "error" in message and word in message and "another --name" in message
    assert snapshot(home / "small") == before


def test_same_name_from_another_folder_is_refused(small, tmp_path):
    root, home, _ = small
    before = snapshot(home / "small")
    other = tmp_path / "other"
    copy_samples(other, 3)
    result = cli("index", other, "--name", "small", "--home", home, *RANDOM_DEMO, "--json")
    assert result.exit_code == 1
    message = one_json(result)["error"]
    assert str(root.resolve()) in message and str(other.resolve()) in message
    assert snapshot(home / "small") == before


def test_repeating_the_stored_options_is_no_contradiction(small):
    root, home, _ = small
    result = cli("index", root, "--name", "small", "--home", home, "--model", "demo", "--weights", "random",
                 "--layers", "mixed4c", "--samples-per-image", "4", "--seed", "0", "--json")
    assert result.exit_code == 0, result.output
    assert (one_json(result)["indexed"], one_json(result)["unchanged"]) == (0, 24)


def test_index_built_with_a_weights_file_can_be_updated(tmp_path, demo_weights):
    root, home = tmp_path / "imgs", tmp_path / "home"
    paths = copy_samples(root, 6)
    opts = IndexOptions(model="demo", weights=str(demo_weights))
    assert build(root, "wf", home, options=opts).total_images == 6
    (root / paths[0]).unlink()
    again = build(root, "wf", home, options=opts)  # same file again
    assert (again.removed, again.unchanged, again.total_images) == (1, 5, 5)
    copy_samples(root, 1, offset=10)
    third = build(root, "wf", home, options=IndexOptions())  # no settings: the stored ones
    assert (third.indexed, third.total_images) == (1, 6)
    info = index_info("wf", home=home)
    assert info["random_weights"] is False and info["weights_sha256"]
    # queries by external file are embedded with the same weights file
    outside = tmp_path / "query.png"
    Image.open(root / paths[1]).save(outside)
    hits = search_index("wf", str(outside), k=1, home=home)["hits"]
    assert hits[0]["path"] == paths[1] and hits[0]["score"] > 0.999


# ----------------------------------------------------------------------------- info

def test_info_json(small):
    root, home, _ = small
    result = cli("info", "small", "--home", home, "--json")
    assert result.exit_code == 0, result.output
    info = one_json(result)
    assert info["images"] == 24 and info["samples"] == 24 * 4 and info["errors"] == 0
    assert info["error_list"] == []
    assert info["model"] == "demo" and info["weights"] == "random" and info["random_weights"] is True
    assert info["layers"] == ["mixed4c"] and info["layer_dims"]["mixed4c"] == 128
    assert info["root"] == str(root.resolve()) and info["samples_per_image"] == 4
    assert info["faiss_current"] is True
    human = cli("info", "small", "--home", home)
    assert human.exit_code == 0 and "RANDOM, for tests and smoke runs only" in human.stdout


def test_info_of_missing_index(tmp_path):
    result = cli("info", "nope", "--home", tmp_path, "--json")
    assert result.exit_code == 1 and "no index" in one_json(result)["error"]


# ----------------------------------------------------------------------------- network streams

@pytest.mark.parametrize("precision, attributions", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_parallel_network_streams_give_the_same_index_in_the_same_order(tmp_path, precision, attributions):
    """Two batches in the network at once (the CPU default) change nothing but speed, also when
    their attribution passes (forward-mode AD, process-wide state) would overlap."""
    root = tmp_path / "imgs"
    copy_samples(root, 20)
    got = {}
    for streams in (1, 2):
        home = tmp_path / f"home{streams}"
        build_index(root, "s", home=home, precision=precision, progress=False, workers=1, batch_size=3,
                    streams=streams, options=IndexOptions(model="demo", weights="random",
                                                          attributions=attributions))
        got[streams] = (sql(home / "s", "SELECT id, path FROM images ORDER BY id"), _samples_by_path(home / "s"))
        if attributions:
            with IndexStore(home / "s") as store:
                got[streams] += (store.samples("mixed4c", attributions=True)["attributions"],)
    if attributions:
        np.testing.assert_allclose(got[2][2].astype(np.float32), got[1][2].astype(np.float32), rtol=1e-2, atol=1e-3)
        got = {n: got[n][:2] for n in got}
    (rows1, (samples1, pooled1)), (rows2, (samples2, pooled2)) = got[1], got[2]
    assert rows1 == rows2 and len(rows1) == 20
    assert samples1.keys() == samples2.keys()
    for key, (y, x, act) in samples1.items():
        assert samples2[key][:2] == (y, x)
        np.testing.assert_allclose(samples2[key][2], act, rtol=1e-2, atol=1e-2)
    for path, vector in pooled1.items():
        np.testing.assert_allclose(pooled2[path], vector, rtol=1e-2, atol=1e-3)


def test_streams_must_be_positive(tmp_path):
    root = tmp_path / "imgs"
    copy_samples(root, 2)
    with pytest.raises(ValueError, match="streams"):
        build(root, "s", tmp_path / "home", streams=0)


def test_index_can_be_read_while_another_process_is_writing_it(tmp_path):
    """The writer lets go of the DuckDB file between commits, so a reader (the app, a search)
    opens it mid-run, sees only committed images, and never fails on the lock."""
    root = tmp_path / "imgs"
    total = len(copy_samples(root, 120))
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "atlasq.cli", "index", str(root), "--name", "w", "--home", str(home),
           *RANDOM_DEMO, "--batch-size", "8", "--commit-every", "8", "--workers", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, deadline = [], time.monotonic() + 240
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "indexing subprocess made no progress"
            if (home / "w" / "index.duckdb").is_file():
                try:
                    with IndexStore(home / "w") as store:
                        images, samples = store.count("images"), store.count("samples")
                except duckdb.CatalogException:  # the writer has not created the tables yet
                    continue
                assert samples == images * 4  # a reader never sees half a commit
                seen.append(images)
            time.sleep(0.05)
    finally:
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode == 0, err
    mid_run = [n for n in seen if 0 < n < total]
    print(f"{len(seen)} reads during the run, {len(mid_run)} of them mid-run")
    assert len(mid_run) >= 2 and seen == sorted(seen)


# ----------------------------------------------------------------------------- nothing written on failure

def tiny_images(root: Path, n: int) -> list[str]:
    """``n`` small seeded random PNGs (fast to decode and embed) in two subfolders."""
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        rel = f"{'ab'[i % 2]}/img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / rel)
        paths.append(rel)
    return paths


def garbage_file(path: Path) -> Path:
    path.write_bytes(b"\x00not a checkpoint\xff" * 50)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch.hub with an empty cache and every download failing as it does offline."""
    import urllib.error

    import torch

    def fail(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored on teardown
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


@pytest.mark.parametrize("args, words", [
    (("--layers", "mixed9z"), ["unknown layer mixed9z", "mixed4c"]),
    (("--layers", ","), ["--layers"]),
    (("--device", "cuda:7"), ["--device"]),
    (("--device", "toaster"), ["--device"]),
    (("--precision", "fp16"), ["--precision"]),
    (("--weights", "{tmp}/missing.pt"), ["--weights", "missing.pt"]),
    (("--weights", "{garbage}"), ["cannot read weights file", "garbage.pt"]),
    (("--batch-size", "0"), ["--batch-size"]),
    (("--commit-every", "0"), ["--commit-every"]),
    (("--workers", "0"), ["--workers"]),
    (("--streams", "0"), ["--streams"]),
    (("--samples-per-image", "0"), ["--samples-per-image"]),
    (("--seed", "-1"), ["--seed"]),
    (("--approx-threshold", "-5"), ["--approx-threshold"]),
    (("--model", "resnet"), ["--model", "resnet"]),
    (("--model", "inceptionv1", "--weights", "imagenet"), ["ImageNet weights", "not cached"]),
])
def test_failed_index_run_writes_nothing_and_says_why_in_one_line(tmp_path, offline_hub, args, words):
    """Bad options, devices and weights are refused before the home or the index folder exist
    (an empty index folder used to be left behind, which the app then picked and crashed on)."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    tiny_images(root, 2)
    garbage = garbage_file(tmp_path / "garbage.pt")
    given = dict(zip(RANDOM_DEMO[::2], RANDOM_DEMO[1::2]))
    given.update((flag, value.format(tmp=tmp_path, garbage=garbage)) for flag, value in zip(args[::2], args[1::2]))
    result = cli("index", root, "--name", "x", "--home", home, *[x for pair in given.items() for x in pair], "--json")
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    message = one_json(result)["error"]
    assert "Traceback" not in result.output
    for word in words:
        assert word in message, message
    assert len(message.splitlines()) <= 4
    assert not home.exists(), sorted(p.relative_to(tmp_path).as_posix() for p in home.rglob("*"))


def test_bad_options_are_refused_by_the_library_before_anything_is_written(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    tiny_images(root, 2)
    for bad in (dict(samples_per_image=0), dict(layers=()), dict(layers=("mixed4c", "mixed4c")),
                dict(seed=-1), dict(attributions="yes")):
        with pytest.raises(InvalidOptionError):
            IndexOptions(model="demo", weights="random", **bad)
    for bad in (dict(batch_size=0), dict(commit_every=0), dict(workers=0), dict(streams=-1),
                dict(precision="fp16"), dict(batch_size=2.5), dict(approx_threshold=-1)):
        with pytest.raises(InvalidOptionError):
            build(root, "x", home, **bad)
    assert not home.exists()
    options = IndexOptions(model="demo", layers=["mixed4c"])
    assert options.layers == ("mixed4c",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 3  # options objects are frozen


def test_cli_index_defaults_come_from_the_library(tmp_path):
    """The CLI passes only what was given; the library fills in the rest, and --help shows it."""
    from atlasq.indexer import INDEX_DEFAULTS, RUN_DEFAULTS

    root, home = tmp_path / "imgs", tmp_path / "home"
    tiny_images(root, 3)
    result = cli("index", root, "--name", "d", "--home", home, "--model", "demo", "--weights", "random", "--json")
    assert result.exit_code == 0, result.output
    info = index_info("d", home=home)
    assert info["layers"] == list(INDEX_DEFAULTS.layers) and info["samples_per_image"] == INDEX_DEFAULTS.samples_per_image
    assert info["seed"] == INDEX_DEFAULTS.seed
    text = " ".join(CliRunner().invoke(app, ["index", "--help"], env={"COLUMNS": "200"}).stdout.split())
    for shown in (f"[default: ({RUN_DEFAULTS.batch_size})]", f"[default: ({RUN_DEFAULTS.commit_every})]",
                  f"[default: ({','.join(INDEX_DEFAULTS.layers)})]", f"[default: ({RUN_DEFAULTS.device})]"):
        assert shown in text


@pytest.mark.parametrize("home_kind", ["sysfs", "file", "read-only folder"])
def test_unwritable_home_is_one_clear_line(tmp_path, home_kind):
    root = tmp_path / "imgs"
    tiny_images(root, 2)
    if home_kind == "sysfs":  # a folder nobody, root included, can create anything in
        home = Path("/sys/atlasq-test-home")
    elif home_kind == "file":
        home = tmp_path / "home.txt"
        home.write_text("not a folder")
    else:
        home = tmp_path / "home"
        home.mkdir()
        home.chmod(0o555)
    if home_kind == "read-only folder":  # in a process where even root obeys the folder's mode
        done = subprocess.run([*without_root_privileges(), sys.executable, "-m", "atlasq.cli", "index", str(root),
                               "--name", "x", "--home", str(home), *RANDOM_DEMO, "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode not in (0, None) and "Traceback" not in done.stderr, done.stderr
        message = json.loads(done.stdout)["error"]
    else:
        result = cli("index", root, "--name", "x", "--home", home, *RANDOM_DEMO, "--json")
        assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
        message = one_json(result)["error"]
    assert "--home" in message and str(home) in message
    assert not (home / "x").exists()


# ----------------------------------------------------------------------------- damaged files

def _damaged_blocks(db: Path) -> bytes:
    """A real DuckDB file whose data blocks (not its header) were overwritten."""
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE meta AS SELECT 'k' || i AS key, repeat('x', 100) AS value FROM range(20000) t(i)")
    con.close()
    data = bytearray(db.read_bytes())
    for offset in range(8192, len(data) - 400, 4096):
        data[offset + 100:offset + 400] = bytes(300)
    return bytes(data)


@pytest.mark.parametrize("kind", ["text", "garbage", "damaged blocks"])
def test_corrupt_database_is_reported_at_once_as_damaged(tmp_path, kind):
    """Not as a lock held by another process (which used to be waited for, then reported as busy)."""
    folder = tmp_path / "home" / "bad"
    folder.mkdir(parents=True)
    content = {"text": lambda: b"this is not a database\n" * 200, "garbage": lambda: bytes(range(256)) * 64,
               "damaged blocks": lambda: _damaged_blocks(tmp_path / "real.duckdb")}[kind]()
    (folder / "index.duckdb").write_bytes(content)
    with pytest.raises(DamagedError, match="cannot be read as an index database"):
        IndexStore(folder, lock_wait=600)
    root = tmp_path / "imgs"
    tiny_images(root, 2)
    for args in (("info", "bad"), ("search", "1", "--index", "bad"),
                 ("index", root, "--name", "bad", *RANDOM_DEMO)):
        result = cli(*args, "--home", tmp_path / "home", "--json")
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "cannot be read as an index database" in one_json(result)["error"]
    assert (folder / "index.duckdb").read_bytes() == content  # left for the user to look at


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, Path, Path, list[str]]:
    """(root, home, folder, paths): 24 tiny images in 3 shards of 8."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    paths = tiny_images(root, 24)
    assert build(root, "sh", home, commit_every=8, batch_size=8).total_images == 24
    folder = home / "sh"
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["000001", "000002", "000003"]
    return root, home, folder, paths


@pytest.mark.parametrize("damage", ["folder deleted", "array deleted", "array garbage", "array truncated"])
def test_damaged_shard_is_reported_by_readers_and_repaired_by_index(sharded, damage):
    root, home, folder, paths = sharded
    shard = folder / "shards" / "000002"
    in_shard = {p for (p,) in sql(folder, "SELECT path FROM images WHERE shard = 2")}
    assert len(in_shard) == 8
    if damage == "folder deleted":
        shutil.rmtree(shard)
    elif damage == "array deleted":
        (shard / "mixed4c.act.npy").unlink()
    elif damage == "array garbage":
        (shard / "pooled.npy").write_bytes(b"garbage" * 100)
    else:
        np.save(shard / "mixed4c.act.npy", np.load(shard / "mixed4c.act.npy")[:5])
    for args in (("info", "sh"), ("search", paths[0], "--index", "sh")):
        result = cli(*args, "--home", home, "--json")
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        message = one_json(result)["error"]
        assert "damaged" in message and "shard 2" in message and f"atlasq index {root.resolve()} --name sh" in message

    result = cli("index", root, "--name", "sh", "--home", home, "--json")
    assert result.exit_code == 0, result.output
    summary = one_json(result)
    assert list(summary["repaired"]["shards"]) == ["2"] and summary["repaired"]["images_embedded_again"] == 8
    assert summary["indexed"] == 8 and summary["unchanged"] == 16 and summary["total_images"] == 24
    assert {p for (p,) in sql(folder, "SELECT path FROM images WHERE shard > 3")} == in_shard
    assert sql(folder, "SELECT count(*) FROM images WHERE shard = 2") == [(0,)] and not shard.exists()
    assert sql(folder, "SELECT count(*) FROM samples") == [(24 * 4,)]
    assert_consistent(folder)
    assert index_info("sh", home=home)["images"] == 24
    assert len(search_index("sh", paths[0], k=30, home=home)["hits"]) == 23
    assert one_json(cli("index", root, "--name", "sh", "--home", home, "--json"))["repaired"] == {}


@pytest.mark.parametrize("garbage", ["text", "same size"])
def test_garbage_faiss_file_is_not_trusted_and_is_rebuilt(sharded, garbage):
    root, home, folder, paths = sharded
    faiss_file = folder / "pooled.faiss"
    size = faiss_file.stat().st_size
    if garbage == "text":
        faiss_file.write_text("not a FAISS index\n")
    else:  # only loading it can tell
        faiss_file.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    expected = search_index("sh", paths[0], k=5, home=home, mode="exact")  # answered from the shards
    assert len(expected["hits"]) == 5
    if garbage == "text":
        assert index_info("sh", home=home)["faiss_current"] is False
    summary = build(root, "sh", home)
    assert summary.faiss["rebuilt"] == ["exact"] and summary.repaired == {"faiss": ["exact"]}
    assert summary.indexed == 0 and summary.unchanged == 24
    assert_consistent(folder)
    assert search_index("sh", paths[0], k=5, home=home)["hits"] == expected["hits"]


# ----------------------------------------------------------------------------- concurrent writers

def test_two_concurrent_index_runs_of_one_name_neither_corrupt_nor_duplicate(tmp_path):
    """Two real processes index the same name at once: one waits for the other's writer lock, then
    finds everything indexed (or, after waiting too long, fails with one clear line)."""
    root, home = tmp_path / "imgs", tmp_path / "home"
    total = len(tiny_images(root, 40))
    cmd = [sys.executable, "-m", "atlasq.cli", "index", str(root), "--name", "both", "--home", str(home),
           *RANDOM_DEMO, "--batch-size", "4", "--commit-every", "4", "--workers", "1", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append((proc.returncode, out, err))
    finished = [json.loads(out) for rc, out, _ in results if rc == 0]
    failed = [(out, err) for rc, out, err in results if rc != 0]
    assert finished, results
    assert sum(s["indexed"] for s in finished) == total  # nothing embedded twice
    for out, err in failed:
        assert "Traceback" not in err, err
        message = json.loads(out)["error"]
        assert "being written by another run" in message and "pid" in message
    if len(finished) == 2:
        assert sorted(s["unchanged"] for s in finished) == [0, total]
    folder = home / "both"
    assert sql(folder, "SELECT count(*), count(DISTINCT id), count(DISTINCT path) FROM images") == [(total,) * 3]
    assert sql(folder, "SELECT count(*) FROM samples") == [(total * 4,)]
    assert sql(folder, "SELECT count(*), count(DISTINCT image_id || '-' || layer || '-' || k) FROM samples") == \
        [(total * 4, total * 4)]
    assert_consistent(folder)


@contextmanager
def _held_by(code: str, *args):
    """A helper process running ``code``, yielded once it printed "held" and killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_writer_waits_for_another_then_fails_with_a_clear_message(sharded):
    root, home, folder, _ = sharded
    before = snapshot(folder)
    with _held_by("import sys, time\nfrom atlasq.store import IndexStore\n"
                  "with IndexStore.writer(__import__('pathlib').Path(sys.argv[1])):\n"
                  "    print('held', flush=True); time.sleep(600)", folder) as holder:
        with pytest.raises(BusyError, match=f"being written by another run \\(pid {holder.pid}, since"):
            build(root, "sh", home, lock_wait=0.2)
    assert snapshot(folder) == before
    assert build(root, "sh", home, lock_wait=0.2).unchanged == 24  # the lock died with its holder


def test_a_reader_holding_the_database_makes_the_writer_wait_then_fail_clearly(sharded):
    root, home, folder, _ = sharded
    with _held_by("import sys, time, duckdb\nc = duckdb.connect(sys.argv[1], read_only=True)\n"
                  "print('held', flush=True); time.sleep(600)", folder / "index.duckdb") as holder:
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):
            build(root, "sh", home, lock_wait=0.2)


def test_index_records_the_weights_identity_and_refuses_other_weights(tmp_path):
    """Every index records the hash of its weights' tensors (random ones too), so other random
    weights (another --seed) or a rewritten weights file are told apart from its own."""
    import torch

    from atlasq.model import load_model

    root = tmp_path / "imgs"
    tiny_images(root, 3)
    for seed in (0, 1):
        build(root, f"seed{seed}", tmp_path / "home", options=IndexOptions(model="demo", weights="random", seed=seed))
    infos = [index_info(f"seed{seed}", home=tmp_path / "home") for seed in (0, 1)]
    assert infos[0]["weights_sha256"] == load_model("demo", "random", seed=0).weights_sha256
    assert infos[1]["weights_sha256"] == load_model("demo", "random", seed=1).weights_sha256
    assert infos[0]["weights_sha256"] != infos[1]["weights_sha256"]

    weights = tmp_path / "w.pt"
    torch.save(load_model("demo", "random", seed=0).network.state_dict(), weights)
    build(root, "file", tmp_path / "home", options=IndexOptions(model="demo", weights=str(weights)))
    assert index_info("file", home=tmp_path / "home")["weights_sha256"] == infos[0]["weights_sha256"]
    torch.save(load_model("demo", "random", seed=2).network.state_dict(), weights)  # other weights, same file
    copy_samples(root, 1)
    result = cli("index", root, "--name", "file", "--home", tmp_path / "home", "--json")
    assert result.exit_code == 1 and "not those this index was built with" in one_json(result)["error"]
    outside = tmp_path / "query.png"  # a query by external file is embedded with the index's weights
    Image.open(root / "a" / "img000.png").save(outside)
    with pytest.raises(IncompatibleError, match="not those this index was built with"):
        search_index("file", str(outside), home=tmp_path / "home")
