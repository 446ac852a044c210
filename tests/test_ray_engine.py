"""``atlasq index --engine ray``: the Ray Data actor pool gives the index the local engine gives,
survives a worker dying and its driver being killed, and is only needed when asked for.

One local Ray (2 CPUs) serves the whole module; the driver-kill test joins it from a subprocess
with ``--ray-address``. Images: 12 sample images and tests/badimages.py's awkward files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from processes import kill_9_when

from atlasq.errors import AtlasqError, InvalidOptionError
from atlasq.indexer import IndexOptions, build_index
from atlasq.store import IndexStore
from badimages import write_bad_images

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'atlasq[ray]')")
from atlasq.ray_engine import DIE_ONCE_ENV, RayEngine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
OPTIONS = IndexOptions(model="demo", weights="random", attributions=True, samples_per_image=2)


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for this module, stopped at its end."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 sample images, one per class, plus good and bad awkward files."""
    root = tmp_path_factory.mktemp("ray_images")
    classes = sorted(p for p in SAMPLE_DATA.iterdir() if p.is_dir())
    for n in range(12):
        cls = classes[n % len(classes)]
        src = sorted(cls.iterdir())[n // len(classes)]
        (root / cls.name).mkdir(exist_ok=True)
        shutil.copy2(src, root / cls.name / src.name)
    write_bad_images(root / "awkward")
    return root


def count(folder: Path) -> int:
    with IndexStore(folder) as store:
        return store.count("images")


def build(root: Path, home: Path, engine=None, **kwargs):
    return build_index(root, "r", home=home, options=OPTIONS, precision="fp32", batch_size=4, commit_every=8,
                       workers=1, progress=False, engine=engine, **kwargs)


@pytest.fixture(scope="module")
def local_index(images, tmp_path_factory) -> Path:
    """The same images indexed by the local engine: what every Ray run must reproduce."""
    home = tmp_path_factory.mktemp("local")
    summary = build(images, home)
    assert summary.total_images >= 12 and summary.total_errors >= 5
    return home / "r"


def contents(folder: Path) -> dict:
    """Per path: hash, size, top-5 classes, pooled vector and each sample's (y, x, activation,
    attribution); the errors with their reasons; and whether any path is stored twice."""
    con = duckdb.connect(str(folder / "index.duckdb"), read_only=True)
    try:
        twice = con.execute("SELECT path FROM images GROUP BY path HAVING count(*) > 1").fetchall()
        twice += con.execute("SELECT image_id, layer, k FROM samples GROUP BY ALL HAVING count(*) > 1").fetchall()
    finally:
        con.close()
    with IndexStore(folder) as store:
        rows = {r["id"]: r for r in store.images()}
        ids, pooled = store.pooled()
        s = store.samples("mixed4c", attributions=True)
        errors = dict(store.errors())
    out = {r["path"]: {"hash": r["hash"], "bytes": r["bytes"], "top5": list(r["top5_class"]), "samples": {}}
           for r in rows.values()}
    for i, vector in zip(ids, pooled):
        out[rows[int(i)]["path"]]["pooled"] = vector
    for i, k, y, x, a, t in zip(s["image_id"], s["k"], s["y"], s["x"], s["activations"], s["attributions"]):
        out[rows[int(i)]["path"]]["samples"][int(k)] = (int(y), int(x), a.astype(np.float32), t.astype(np.float32))
    return {"images": out, "errors": errors, "twice": twice}


def assert_same_index(got: Path, want: Path) -> None:
    a, b = contents(got), contents(want)
    assert a["twice"] == [] and b["twice"] == []
    assert a["errors"] == b["errors"]
    assert set(a["images"]) == set(b["images"])
    for path, w in b["images"].items():
        g = a["images"][path]
        assert (g["hash"], g["bytes"], g["top5"]) == (w["hash"], w["bytes"], w["top5"]), path
        np.testing.assert_allclose(g["pooled"], w["pooled"], rtol=1e-3, atol=1e-4, err_msg=path)
        assert set(g["samples"]) == set(w["samples"]) == {0, 1}
        for k, (y, x, act, attr) in w["samples"].items():
            gy, gx, gact, gattr = g["samples"][k]
            assert (gy, gx) == (y, x), (path, k)
            np.testing.assert_allclose(gact, act, rtol=1e-2, atol=1e-3, err_msg=path)
            np.testing.assert_allclose(gattr, attr, rtol=1e-2, atol=1e-3, err_msg=path)


def _shards(folder: Path) -> int:
    try:
        return max((int(p.name) for p in (folder / "shards").iterdir() if p.name.isdigit()), default=0)
    except FileNotFoundError:
        return 0


def test_driver_killed_then_a_worker_dying_mid_batch_lose_and_duplicate_nothing_and_give_the_local_index(
        ray_address, images, local_index, tmp_path, monkeypatch):
    """kill -9 of the driver mid-run (a subprocess joining the module's Ray with --ray-address),
    then a run on the same index in which one worker dies in the middle of a batch: Ray restarts
    it and retries the batch. The index is then the local engine's, row for row."""
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "atlasq.cli", "index", str(images), "--name", "r", "--home", str(home),
           "--model", "demo", "--weights", "random", "--attributions", "--samples-per-image", "2",
           "--precision", "fp32", "--batch-size", "2", "--commit-every", "2", "--engine", "ray",
           "--ray-address", ray_address, "--num-workers", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    # two chunks committed: mid-run
    kill_9_when(proc, lambda: _shards(home / "r") >= 2, "Ray indexing subprocess")
    before, total = count(home / "r"), count(local_index)
    assert 2 <= before < total

    marker = tmp_path / "died"
    monkeypatch.setenv(DIE_ONCE_ENV, str(marker))
    resumed = build(images, home, RayEngine(num_workers=2))
    assert marker.exists(), "no worker died: the test hook did not run"
    assert resumed.engine["engine"] == "ray" and not resumed.interrupted
    assert resumed.unchanged == before and resumed.indexed == total - before
    assert_same_index(home / "r", local_index)
    assert not [p for p in (home / "r").rglob("*") if p.name.endswith(".tmp")]
    again = build(images, home, RayEngine(num_workers=2))  # incremental: nothing new, Ray not even started
    assert again.indexed == 0 and again.unchanged == total


def test_ray_is_needed_only_for_the_ray_engine_and_its_absence_is_one_clear_error(tmp_path, monkeypatch, images):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(AtlasqError, match=r"pip install 'atlasq\[ray\]'"):
        build(images, tmp_path / "home", "ray")
    assert not (tmp_path / "home").exists()  # refused before anything was written


def test_ray_options_are_checked(tmp_path, images):
    from typer.testing import CliRunner

    from atlasq.cli import app

    result = CliRunner().invoke(app, ["index", str(images), "--name", "r", "--home", str(tmp_path),
                                      "--num-workers", "2", "--json"])
    assert result.exit_code == 2 and "--engine ray" in result.stdout
    with pytest.raises(InvalidOptionError, match="--num-workers"):
        RayEngine(num_workers=0)
    with pytest.raises(InvalidOptionError, match="--engine"):
        build(images, tmp_path / "home", "spark")
