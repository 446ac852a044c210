"""Shared fixtures, each built once per test run: the trained demo network, an index of
sample_data/ built with it, that index with a quick atlas, and a large synthetic index on it.

The demo network is trained once per machine and cached under ``$ATLASQ_CACHE`` (default
``~/.cache/atlasq``); later runs load it.

The session's homes are shared by every module, so no test may change them: a module that adds
an index or an atlas to a home, or places an index on an atlas, works in its own copy
(``copy_home``), typically by overriding the fixture for the whole module::

    @pytest.fixture(scope="module")
    def sample_home(sample_home, copy_home):
        return copy_home(sample_home)

Each shared home is fingerprinted when built and checked when the run ends, so a test that
changes one fails the run, naming the files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from atlasq import demo_model
from atlasq.atlas import AtlasOptions, build_atlas
from atlasq.indexer import IndexOptions, build_index

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
#: The atlas of ``atlas_home``: the demo network's mixed5a (where its attributions carry its
#: classes), two levels, and quick icons (16 steps), since these tests look at cells, not icons;
#: batches of 16 icons, so that an interrupted build (tests/test_atlas.py) has several.
QUICK_ATLAS = AtlasOptions(layer="mixed5a", grids=(10, 20), steps=16, icon_batch=16, seed=5)
#: Images of ``big_home``'s synthetic index: enough that the fullest cells need many pages and
#: that a cell query has thousands of rows to rank, small enough to build in seconds. The app's
#: speed on 100,000 images is measured by bench/app.py, not here.
BIG_IMAGES = 5_000


def fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _unchanged(folder: Path, before: dict) -> None:
    after = fingerprint(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (f"a test changed the shared home {folder} ({', '.join(changed[:8])}); "
                         f"work in a copy (copy_home) instead")


@pytest.fixture(scope="session")
def copy_home(tmp_path_factory):
    """``copy_home(home)``: a private copy of a home folder, for a test or module that changes it."""
    def copy(home: Path) -> Path:
        target = tmp_path_factory.mktemp(f"{home.name}-copy")
        shutil.copytree(home, target, dirs_exist_ok=True)
        return target
    return copy


@pytest.fixture(scope="session")
def demo_weights() -> Path:
    """Path of the trained demo network's weights (trained on first use, then cached)."""
    return demo_model.ensure_trained(SAMPLE_DATA)


@pytest.fixture(scope="session")
def shared_sample_home(tmp_path_factory, demo_weights) -> Path:
    """What ``sample_home`` returns. The other shared homes start from this one rather than from
    ``sample_home``, so a module that overrides ``sample_home`` with its own copy does not change them."""
    home = tmp_path_factory.mktemp("home")
    summary = build_index(SAMPLE_DATA, "sample", home=home, progress=False, precision="fp32",
                          options=IndexOptions(model="demo", attributions=True, layers=("mixed4c", "mixed5a")))
    assert summary.total_images >= 480 and summary.total_errors == 0
    before = fingerprint(home)
    yield home
    _unchanged(home, before)


@pytest.fixture(scope="session")
def sample_home(shared_sample_home) -> Path:
    """A home folder holding index ``sample``: all of sample_data/, demo network, attributions at
    mixed4c (the article's layer) and mixed5a (where the demo network's attributions carry its
    classes; see tests/test_atlas.py). Shared: read only (see the module's docstring)."""
    return shared_sample_home


@pytest.fixture(scope="session")
def shared_atlas_home(shared_sample_home, copy_home) -> Path:
    """What ``atlas_home`` returns (see ``shared_sample_home`` for why there are two names)."""
    home = copy_home(shared_sample_home)
    build_atlas("sample", "app", home=home, progress=False, options=QUICK_ATLAS)
    before = fingerprint(home)
    yield home
    _unchanged(home, before)


@pytest.fixture(scope="session")
def atlas_home(shared_atlas_home) -> Path:
    """A copy of ``sample_home`` with atlas ``app`` of index ``sample`` (``QUICK_ATLAS``), the index
    not yet placed on it. Shared: read only."""
    return shared_atlas_home


@pytest.fixture(scope="session")
def big_home(shared_atlas_home, copy_home) -> Path:
    """A copy of ``atlas_home`` with index ``big``: ``BIG_IMAGES`` synthetic images placed on atlas
    ``app`` (tests/bigindex.py), seeded. Shared: read only."""
    from bigindex import make_placed_index

    home = copy_home(shared_atlas_home)
    make_placed_index(home, "big", "app", SAMPLE_DATA, images=BIG_IMAGES, seed=0)
    before = fingerprint(home)
    yield home
    _unchanged(home, before)
