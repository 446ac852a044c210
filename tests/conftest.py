"""Shared fixtures: the trained demo network and an index of sample_data/ built with it.

The demo network is trained once per machine (about a minute and a half on two cores) and
cached under ``$ATLASQ_CACHE`` (default ``~/.cache/atlasq``); later runs load it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atlasq import demo_model
from atlasq.indexer import IndexOptions, build_index

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session")
def demo_weights() -> Path:
    """Path of the trained demo network's weights (trained on first use, then cached)."""
    return demo_model.ensure_trained(SAMPLE_DATA)


@pytest.fixture(scope="session")
def sample_home(tmp_path_factory, demo_weights) -> Path:
    """A home folder holding index ``sample``: all of sample_data/, demo network, attributions at
    mixed4c (the article's layer) and mixed5a (where the demo network's attributions carry its
    classes; see tests/test_atlas.py)."""
    home = tmp_path_factory.mktemp("home")
    summary = build_index(SAMPLE_DATA, "sample", home=home, progress=False, precision="fp32",
                          options=IndexOptions(model="demo", attributions=True, layers=("mixed4c", "mixed5a")))
    assert summary.total_images >= 480 and summary.total_errors == 0
    return home
