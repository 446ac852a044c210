"""Tests for similarity search: meaning (trained demo network), query forms, exact vs approximate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from atlasq import demo_model
from atlasq.api import search_index
from atlasq.cli import app
from atlasq.errors import InvalidOptionError, NotFoundError
from atlasq.indexer import IndexOptions, build_index
from atlasq.search import build_faiss_index, search, search_vectors
from atlasq.store import IndexStore

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_json(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def cls(path: str) -> str:
    return path.split("/", 1)[0]


# ----------------------------------------------------------------------------- meaning

def test_neighbours_share_the_query_class(sample_home):
    """precision@5 (query excluded) over every indexed image, and over the held-out fifth."""
    held_out = {path for path, _ in demo_model.held_out_paths(SAMPLE_DATA)}
    precision = {}
    with IndexStore(sample_home / "sample") as store:
        rows = store.images()
        ids, vectors = store.pooled()
        paths = {r["id"]: r["path"] for r in rows}
        assert len(rows) == len(ids) >= 480
        assert store.faiss_is_current("exact")
        index = store.load_faiss("exact")
        batch_scores, neighbours = search_vectors(index, vectors, 6)  # all queries in one batch
        for image_id, row in zip(ids.tolist(), neighbours):
            top = [int(i) for i in row if i != image_id][:5]
            assert len(top) == 5
            precision[paths[image_id]] = np.mean([cls(paths[i]) == cls(paths[image_id]) for i in top])
        for image_id, vector, row, row_scores in list(zip(ids.tolist(), vectors, neighbours, batch_scores))[::25]:
            hits, kind = search(store, vector, 5, exclude=image_id)  # the library path agrees
            expected = [(int(i), float(s)) for i, s in zip(row, row_scores) if i != image_id][:5]
            # A batch of queries and a single one are summed in another order (BLAS against a
            # loop), so near-ties may swap: the same scores, and the same image wherever untied.
            assert kind == "exact"
            np.testing.assert_allclose([h.score for h in hits], [score for _, score in expected], atol=1e-5)
            untied = [n for n, (_, score) in enumerate(expected)
                      if sum(abs(score - other) < 1e-5 for _, other in expected) == 1]
            assert [hits[n].id for n in untied] == [expected[n][0] for n in untied]
            assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    overall = float(np.mean(list(precision.values())))
    held = float(np.mean([precision[p] for p in held_out]))
    print(f"\nprecision@5: all {overall:.3f} ({len(precision)} queries), "
          f"held-out {held:.3f} ({len(held_out)} queries)")
    assert len(held_out) >= 90 and held_out <= set(precision)
    assert overall >= 0.8
    assert held >= 0.7
    # a network with random weights is no good at this: the figure measures meaning
    worst_classes = {}
    for path, p in precision.items():
        worst_classes.setdefault(cls(path), []).append(p)
    assert min(np.mean(v) for v in worst_classes.values()) >= 0.5


# ----------------------------------------------------------------------------- query forms

@pytest.fixture(scope="module")
def query_image(sample_home) -> tuple[str, int]:
    """A held-out JPEG of the sample index and its id."""
    path = next(p for p, _ in demo_model.held_out_paths(SAMPLE_DATA) if p.endswith(".jpg"))
    with IndexStore(sample_home / "sample") as store:
        return path, store.find_path(path)


def test_query_by_id_path_absolute_path_and_relative_to_cwd_agree(sample_home, query_image, monkeypatch):
    path, image_id = query_image
    by_id = search_index("sample", str(image_id), k=8, home=sample_home)
    assert by_id["query_id"] == image_id and len(by_id["hits"]) == 8
    assert image_id not in [h["id"] for h in by_id["hits"]]
    for query in (path, str(SAMPLE_DATA / path)):
        other = search_index("sample", query, k=8, home=sample_home)
        assert other["query_id"] == image_id and other["hits"] == by_id["hits"]
    monkeypatch.chdir(REPO)
    relative = search_index("sample", f"sample_data/{path}", k=8, home=sample_home)
    assert relative["query_id"] == image_id and relative["hits"] == by_id["hits"]


def test_query_by_external_file_finds_the_original_and_its_neighbours(sample_home, query_image, tmp_path):
    path, image_id = query_image
    by_id = [h["id"] for h in search_index("sample", str(image_id), k=5, home=sample_home)["hits"]]
    elsewhere = tmp_path / "copy.jpg"
    Image.open(SAMPLE_DATA / path).convert("RGB").save(elsewhere, "JPEG", quality=90)  # re-encoded
    assert elsewhere.read_bytes() != (SAMPLE_DATA / path).read_bytes()
    external = search_index("sample", str(elsewhere), k=6, home=sample_home)
    assert external["query_id"] is None
    ids = [h["id"] for h in external["hits"]]
    assert ids[0] == image_id and external["hits"][0]["score"] > 0.98
    assert len(set(ids[1:]) & set(by_id)) >= 4, (ids, by_id)

    lossless = tmp_path / "copy.png"  # same pixels: same vector, so exactly the same neighbours
    Image.open(SAMPLE_DATA / path).save(lossless)
    same = search_index("sample", str(lossless), k=6, home=sample_home)["hits"]
    assert [h["id"] for h in same] == [image_id, *by_id] and same[0]["score"] > 0.9999


@pytest.mark.parametrize("query", ["99999999", "no/such/image.jpg", "red_discs/red_discs_999.jpg"])
def test_unknown_query_is_a_clear_error(sample_home, query):
    with pytest.raises(NotFoundError, match="neither an image id, an indexed path, nor an image file"):
        search_index("sample", query, home=sample_home)
    result = cli("search", query, "--index", "sample", "--home", sample_home, "--json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert query in one_json(result)["error"]


def test_unreadable_external_query_is_a_clear_error(sample_home, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture")
    result = cli("search", bad, "--index", "sample", "--home", sample_home, "--json")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # an InvalidOptionError
    assert "not an image" in one_json(result)["error"]


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_refused(sample_home, query_image, k):
    with pytest.raises(InvalidOptionError, match="-k must be"):
        search_index("sample", query_image[0], k=k, home=sample_home)
    result = cli("search", query_image[0], "--index", "sample", "--home", sample_home, "-k", k, "--json")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "-k must be a whole number of at least 1" in one_json(result)["error"]


def test_search_in_missing_index(tmp_path):
    result = cli("search", "1", "--index", "nope", "--home", tmp_path, "--json")
    assert result.exit_code == 1 and "no index" in one_json(result)["error"]


# ----------------------------------------------------------------------------- approximate search

def test_approx_recall_at_10_against_exact():
    rng = np.random.default_rng(0)
    n, dim, clusters = 20_000, 256, 100
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    # wide clusters (noise norm ~2x the centres'): neighbours are not trivially separated
    vectors = centres[labels] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.arange(1, n + 1, dtype=np.int64) * 3  # labels are ids, not row numbers
    exact = build_faiss_index(ids, vectors, "exact")
    approx = build_faiss_index(ids, vectors, "approx")
    assert exact.ntotal == approx.ntotal == n
    queries = centres[rng.integers(0, clusters, 500)] + 2.0 * rng.normal(size=(500, dim)).astype(np.float32)
    _, truth = search_vectors(exact, queries, 10)
    _, found = search_vectors(approx, queries, 10)
    assert set(np.unique(truth)) <= set(ids.tolist())
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    print(f"\nrecall@10 approx vs exact: {recall:.4f}")
    assert recall >= 0.95
    # the exact index really is exact: brute force agrees
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries[:20] / np.linalg.norm(queries[:20], axis=1, keepdims=True)
    brute = ids[np.argsort(-(q @ unit.T), axis=1)[:, :10]]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(brute, truth[:20])]) >= 9.9


def _copy_samples(dest: Path, n: int) -> None:
    files = sorted(p for p in SAMPLE_DATA.rglob("*") if p.is_file() and p.suffix != ".md")[::7][:n]
    assert len(files) == n
    for src in files:
        target = dest / src.relative_to(SAMPLE_DATA)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def test_auto_mode_uses_approx_above_the_threshold(tmp_path):
    root, home = tmp_path / "imgs", tmp_path / "home"
    folder = home / "ap"
    _copy_samples(root, 60)
    opts = IndexOptions(model="demo", weights="random")
    below = build_index(root, "ap", home=home, options=opts, precision="fp32", progress=False,
                        approx_threshold=100)
    assert below.faiss["rebuilt"] == ["exact"] and not (folder / "pooled.approx.faiss").exists()
    assert search_index("ap", "1", k=5, home=home)["search"] == "exact"

    above = build_index(root, "ap", home=home, progress=False, approx_threshold=50)
    assert above.indexed == 0 and above.faiss["rebuilt"] == ["approx"]
    assert (folder / "pooled.approx.faiss").is_file()
    with IndexStore(folder) as store:
        assert store.faiss_is_current("approx") and store.load_faiss("approx").ntotal == 60
    auto = search_index("ap", "1", k=5, home=home)
    assert auto["search"] == "approx"
    exact = search_index("ap", "1", k=5, home=home, mode="exact")
    assert exact["search"] == "exact"
    assert [h["id"] for h in auto["hits"]] == [h["id"] for h in exact["hits"]]  # 60 vectors: HNSW is exact

    # the threshold is remembered by later runs (which keep both files current) and by the CLI
    gone, kept = auto["hits"][0]["path"], auto["hits"][1]["path"]
    (root / gone).unlink()
    later = build_index(root, "ap", home=home, progress=False)
    assert later.removed == 1 and sorted(later.faiss["rebuilt"]) == ["approx", "exact"]
    result = cli("search", kept, "--index", "ap", "--home", home, "--json")
    assert result.exit_code == 0 and one_json(result)["search"] == "approx"
    assert len(one_json(result)["hits"]) == 10 and gone not in {h["path"] for h in one_json(result)["hits"]}
    result = cli("search", kept, "--index", "ap", "--home", home, "--mode", "exact", "--json")
    assert result.exit_code == 0 and one_json(result)["search"] == "exact"
    bad = cli("search", kept, "--index", "ap", "--home", home, "--mode", "fast", "--json")
    assert bad.exit_code == 2 and "--mode" in one_json(bad)["error"]  # an InvalidOptionError


# ----------------------------------------------------------------------------- CLI

def test_cli_search_json(sample_home, query_image):
    path, image_id = query_image
    result = cli("search", path, "--index", "sample", "--home", sample_home, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    payload = one_json(result)
    assert payload["query"] == path and payload["query_id"] == image_id and payload["k"] == 3
    assert payload["search"] == "exact" and len(payload["hits"]) == 3
    for hit in payload["hits"]:
        assert set(hit) == {"id", "path", "score", "top_class"}
        assert (SAMPLE_DATA / hit["path"]).is_file() and hit["id"] != image_id
    scores = [h["score"] for h in payload["hits"]]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0
    assert payload == search_index("sample", path, k=3, home=sample_home) | {"query": path}

    human = cli("search", path, "--index", "sample", "--home", sample_home, "-k", "3")
    assert human.exit_code == 0
    header, *lines = human.stdout.strip().splitlines()  # a header line, then one line per hit
    assert header.split()[-1] == "path"
    assert len(lines) == 3 and all(h["path"] in line for h, line in zip(payload["hits"], lines))
