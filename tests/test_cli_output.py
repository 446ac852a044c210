"""The command line reads well: tables with column headers, counts and paging hints, no Python
reprs, dropped and empty cells said in words; with ``--json`` stdout holds only the JSON, whatever
a library prints; and the commands that need no network (``info``, ``atlas info``, ``cell``)
never import torch, so they start at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlasq import api
from atlasq.atlas import load_atlas
from atlasq.cli import app
from atlasq.histogram import histogram

REPO = Path(__file__).resolve().parents[1]
REPR = re.compile(r"\bNone\b|\[['\"(]|\{['\"]|\('")


@pytest.fixture(scope="module")
def placed_home(atlas_home, copy_home):
    """A copy of ``atlas_home`` with index ``sample`` placed on atlas ``app``."""
    home = copy_home(atlas_home)
    histogram("app", "sample", home=home)
    return home


def _run(home: Path, *args: str):
    result = CliRunner().invoke(app, [*args, "--home", str(home)])
    assert result.exit_code == 0, result.output
    return result


def _cells(home: Path):
    """(the fullest kept cell, a cell that is not kept) at the atlas's coarsest level."""
    atlas = load_atlas("app", home)
    level = min(atlas.levels)
    counts = json.loads(_run(home, "histogram", "--atlas", "app", "--index", "sample", "--json").stdout)
    fullest = max(counts["cells"], key=lambda c: c["activations"])
    missing = next((i, j) for i in range(level) for j in range(level) if atlas.cell_row(level, i, j) is None)
    return (fullest["i"], fullest["j"]), missing, atlas


def test_info_and_atlas_info_read_as_words_and_numbers(placed_home):
    facts = json.loads(_run(placed_home, "info", "sample", "--json").stdout)
    text = _run(placed_home, "info", "sample").output
    assert not REPR.search(text), text
    assert facts["samples"] >= 1000 and f"{facts['samples']:,}" in text  # thousands separated
    assert re.search(r"attributions: stored", text) and "mixed5a" in text

    manifest = json.loads((placed_home / "atlases" / "app" / "manifest.json").read_text())
    text = _run(placed_home, "atlas", "info", "app").output
    assert not REPR.search(text), text
    header = next(line for line in text.splitlines() if line.startswith("level"))
    assert "icon fidelity" in header and "kept cells" in header
    for level, fidelity in manifest["icon_fidelity"].items():  # one row per level, with its fidelity
        row = next(line for line in text.splitlines() if line.startswith(f"{level}×{level}"))
        assert f"{fidelity:.2f}" in row and f"{manifest['levels'][level]['cells']}" in row.split()


def test_search_and_cell_print_headed_tables_with_paging_hints(placed_home):
    result = _run(placed_home, "search", "red_discs/red_discs_003.webp", "--index", "sample", "-k", "3")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "top", "class", "path"] and len(lines) == 4
    assert "showing the 3 nearest images; -k 6 for more" in result.stderr

    (i, j), _, _ = _cells(placed_home)
    page = json.loads(_run(placed_home, "cell", "--atlas", "app", "--index", "sample", "--cell", f"{i},{j}",
                           "-k", "2", "--json").stdout)
    assert page["has_more"]
    result = _run(placed_home, "cell", "--atlas", "app", "--index", "sample", "--cell", f"{i},{j}", "-k", "2")
    rows = result.stdout.splitlines()
    assert rows[0].split()[:3] == ["rank", "distance", "activations"] and len(rows) == 3
    assert [row.split()[-1] for row in rows[1:]] == [m["path"] for m in page["images"]]
    assert f"showing images 1–2 of {page['total_images']:,}" in result.stderr
    assert "--offset 2 for the next page" in result.stderr
    # the last page says there is no next one
    last = _run(placed_home, "cell", "--atlas", "app", "--index", "sample", "--cell", f"{i},{j}",
                "-k", "2", "--offset", str(page["total_images"] - 1))
    assert len(last.stdout.splitlines()) == 2 and "next page" not in last.stderr


def test_a_cell_that_is_not_on_the_atlas_says_why(placed_home):
    _, (i, j), atlas = _cells(placed_home)
    level = min(atlas.levels)
    table = atlas.reference
    members = int(((table[f"cell_{level}_i"].to_numpy() == i) & (table[f"cell_{level}_j"].to_numpy() == j)).sum())
    result = _run(placed_home, "cell", "--atlas", "app", "--index", "sample", "--cell", f"{i},{j}")
    assert result.stdout == ""
    assert f"cell {i},{j}" in result.stderr and "not on the atlas" in result.stderr
    assert ("dropped" if members else "empty") in result.stderr


def test_json_stdout_holds_only_the_json_when_a_library_prints(placed_home, monkeypatch, tmp_path):
    # As torch.hub does ("Downloading: …" on stdout) when the query image needs the network.
    real = api.load_model

    def chatty(*args, **kwargs):
        print('Downloading: "https://example.invalid/weights.pth" to cache')
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "load_model", chatty)
    query = tmp_path / "query.png"  # a file outside the index: embedded with the network
    query.write_bytes((REPO / "sample_data" / "stripes" / "stripes_001.png").read_bytes())
    result = CliRunner().invoke(app, ["search", str(query), "--index", "sample", "-k", "2", "--json",
                                      "--home", str(placed_home)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["hits"]) == 2
    assert "Downloading:" in result.stderr
    # an error with --json: stdout holds {"error": …} alone
    failed = CliRunner().invoke(app, ["info", "nonesuch", "--json", "--home", str(placed_home)])
    assert failed.exit_code == 1 and "error" in json.loads(failed.stdout)


def test_commands_that_need_no_network_never_import_torch(placed_home):
    (i, j), _, _ = _cells(placed_home)
    script = (
        "import sys\n"
        "from atlasq.cli import app\n"
        "for args in sys.argv[1:]:\n"
        "    try:\n"
        "        app(args.split('|'))\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, (args, exit.code)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n")
    home = str(placed_home)
    commands = [f"info|sample|--home|{home}", f"atlas|info|app|--home|{home}",
                f"cell|--atlas|app|--index|sample|--cell|{i},{j}|--home|{home}",
                f"search|3|--index|sample|--home|{home}"]
    done = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "level" in done.stdout and "rank" in done.stdout  # the commands did print their tables
    assert done.stdout.strip().endswith("torch loaded: False"), done.stdout[-500:]
