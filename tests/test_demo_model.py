"""The demo network's training and registration (atlasq.demo_model): training runs with pinned
arithmetic, so the caller's thread count and CPU dispatch do not change the weights; the cache
key covers everything that does; the network registers itself with the model registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlasq import demo_model, sampledata
from atlasq.model import load_model, model_names

TINY_RECIPE = dict(demo_model.RECIPE, epochs=1)


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    sampledata.generate(root, per_class=5)
    return root


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_gives_the_same_weights_whatever_the_callers_threads_and_cpu_dispatch(tiny_collection, tmp_path):
    # Two callers as different as one machine can make them: one thread and the CPU's widest
    # vector kernels, against the defaults. Without the pin the thread count alone changes the
    # order of floating-point sums, and so the bits of the weights.
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    one_thread = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ATEN_CPU_CAPABILITY="default")
    report = demo_model.train(tiny_collection, first, recipe=TINY_RECIPE, progress=False, env=one_thread)
    demo_model.train(tiny_collection, second, recipe=TINY_RECIPE, progress=False)
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report["numerics"] == demo_model.NUMERICS and report["recipe"] == TINY_RECIPE
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # x86-64: the cap holds
        assert report["cpu_capability"] == "AVX2"
    assert report["train_images"] == 48 and report["held_out_images"] == 12


def test_cache_key_covers_data_recipe_numerics_and_torch(tiny_collection, monkeypatch):
    files = demo_model.labelled_files(tiny_collection)
    key = demo_model._cache_key(tiny_collection, files)
    assert key == demo_model._cache_key(tiny_collection, files)
    assert key != demo_model._cache_key(tiny_collection, files, dict(demo_model.RECIPE, lr=1e-3))
    assert key != demo_model._cache_key(tiny_collection, files[1:])
    monkeypatch.setitem(demo_model.NUMERICS, "threads", 4)
    assert key != demo_model._cache_key(tiny_collection, files)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key != demo_model._cache_key(tiny_collection, files)


def test_failed_training_raises_and_caches_nothing(tmp_path):
    (tmp_path / "red_discs").mkdir()
    (tmp_path / "red_discs" / "a.png").write_bytes(b"not an image")
    out = tmp_path / "w.pt"
    with pytest.raises(RuntimeError, match="training the demo network failed"):
        demo_model.train(tmp_path, out, recipe=TINY_RECIPE, progress=False)
    assert not out.exists()


def test_demo_network_registers_itself_and_model_does_not_import_it():
    code = ("import sys, atlasq.model as m; before = 'atlasq.demo_model' in sys.modules; "
            "names = m.model_names(); print(before, 'atlasq.demo_model' in sys.modules, names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "['demo',", "'inceptionv1']"]
    assert "demo" in model_names()
    random = load_model("demo", "random", device="cpu")
    assert random.name == "demo" and random.categories == list(demo_model.CATEGORIES)
    # One normalisation for training and use: the preset's ImageNet mean and std.
    preset = random.transform.preset
    assert list(preset.mean) == [0.485, 0.456, 0.406] and list(preset.std) == [0.229, 0.224, 0.225]
    assert json.dumps(demo_model.transform().preset.mean) == json.dumps(preset.mean)


def _current_key() -> str:
    root = demo_model.sample_data_dir()
    return demo_model._cache_key(root, demo_model.labelled_files(root))


def test_an_empty_cache_gets_the_shipped_weights_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATLASQ_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_model, "train", lambda *a, **k: pytest.fail("trained although weights ship"))
    path = demo_model.ensure_trained()
    shipped = demo_model.shipped(_current_key())
    assert path.parent == tmp_path and path.read_bytes() == shipped.read_bytes()
    assert demo_model.report(path) == demo_model.report(shipped)
    assert "weights atlasq ships" in capsys.readouterr().err
    assert load_model("demo").weights_sha256 == load_model("demo", str(shipped)).weights_sha256


def test_the_shipped_demo_network_is_what_training_gives(tmp_path):
    """The shipped weights are named by the current key (sample data, recipe, pinned numerics,
    torch), so changing any of them without `atlasq demo-model --force --ship` fails here; and
    retraining now gives a network of the same held-out accuracy (bit-identical on a CPU that
    computes as the one that trained them)."""
    key = _current_key()
    shipped = demo_model.shipped(key)
    assert shipped is not None, (f"no weights shipped for key {key}: run `atlasq demo-model --force --ship` "
                                 f"after changing the recipe or the sample data")
    retrained = demo_model.train(demo_model.sample_data_dir(), tmp_path / "demo.pt", progress=False)
    expected = demo_model.report(shipped)
    identical = all(torch.equal(a, b) for a, b in zip(_state(tmp_path / "demo.pt").values(), _state(shipped).values()))
    print(f"retrained: held-out accuracy {retrained['held_out_accuracy']:.3f} in {retrained['seconds']} s "
          f"(shipped: {expected['held_out_accuracy']:.3f}, {expected['cpu_capability']}); weights "
          f"{'bit-identical' if identical else 'differ in their last bits'}")
    assert retrained["recipe"] == expected["recipe"] and retrained["held_out"] == expected["held_out"]
    assert retrained["held_out_accuracy"] == pytest.approx(expected["held_out_accuracy"], abs=0.04)
