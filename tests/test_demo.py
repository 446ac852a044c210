"""`atlasq demo`, the README's main job: index sample_data/, search, build the sample atlas."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from atlasq import api
from atlasq.cli import app
from atlasq.model import WeightsUnavailableError


def test_demo_indexes_searches_and_builds_an_atlas_then_reuses_it(tmp_path, demo_weights, monkeypatch):
    # Quick icons: this checks the command's path (offline fallback, index, search, atlas, reuse).
    # What 512-step icons look like is tests/test_atlas.py's concern.
    monkeypatch.setitem(api.DEMO_ATLAS, "demo", {**api.DEMO_ATLAS["demo"], "steps": 16})
    real_load_model = api.load_model

    def offline(name, weights=None, **kwargs):  # as on a machine with no cached ImageNet weights
        if name == "inceptionv1":
            raise WeightsUnavailableError("ImageNet weights not in the cache (test)")
        return real_load_model(name, weights, **kwargs)

    monkeypatch.setattr(api, "load_model", offline)
    result = CliRunner().invoke(app, ["demo", "--home", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)  # stdout: the JSON alone
    assert first["model_used"].startswith("demo") and "ImageNet weights unavailable" in first["why"]
    # Said at once, before any work: which network and why; said last: the command that opens it.
    notes = result.stderr.strip().splitlines()
    assert "ImageNet weights" in notes[0] and "demo network" in notes[0]
    assert any("demo network instead of InceptionV1, because" in n and "(test)" in n for n in notes[:3])
    assert notes[-1] == f"open it: atlasq app --home {tmp_path} --index sample --atlas sample"
    # The sample is placed on its own atlas, so the app shows its counts at once.
    assert first["histogram"]["atlas"] == "sample" and first["histogram"]["activations"] == 576 * 4
    assert first["index"]["total_images"] == 576 and first["index"]["total_errors"] == 0
    hits = first["example_search"]["hits"]
    query = first["example_search"]["query"]
    # The library's neighbours of the first file (their meaning: test_search.py, over all images).
    assert len(hits) == 5 and hits == api.search_index("sample", query, k=5, home=tmp_path)["hits"]

    atlas = first["atlas"]
    assert atlas["reused"] is False and atlas["layer"] == "mixed5a" and not atlas["random_weights"]
    for level in ("10", "20"):
        assert atlas["levels"][level]["cells"] >= 12  # at least one cell per class island
        mosaic = Image.open(atlas["files"][f"mosaic_{level}"])
        assert mosaic.size[0] == mosaic.size[1] == int(level) * 96

    again = CliRunner().invoke(app, ["demo", "--home", str(tmp_path), "--json"])
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["index"]["indexed"] == 0 and second["index"]["unchanged"] == 576
    assert second["atlas"]["reused"] is True and second["atlas"]["folder"] == atlas["folder"]
