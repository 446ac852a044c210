"""Tests for atlasq.model: layer names, staged passes, weights, preprocessing, bf16, relaxation.

Note on the test vehicle: torchvision's GoogLeNet initialisation (truncated normal, std 0.01)
makes activations shrink by orders of magnitude per stage, so the shipped random-weight
network's logits are its fc bias to float32 precision whatever the input. Checks whose meaning
depends on logits reacting to the input therefore also run on ``scaled`` (He-initialised)
copies, where every stage's activations are O(1).
"""

from __future__ import annotations

import copy
import hashlib
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import GoogLeNet_Weights, googlenet
from torchvision.models.googlenet import Inception
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from atlasq import demo_model
from atlasq.embed import EmbedConfig, decode_file, embed_batch
from atlasq.images import scan_images
from atlasq.model import (
    LAYERS,
    RelaxedMaxPool2d,
    TinyInceptionV1,
    WeightsUnavailableError,
    load_model,
    relax_maxpool,
    weights_digest,
)

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
IMAGENET_FILE = "googlenet-1378be20.pth"

# Output channels of each block: InceptionV1's table (Szegedy et al. 2015) and, for the demo,
# the sum of the four branch widths of TinyInceptionV1.BLOCKS.
INCEPTION_WIDTHS = dict(zip(LAYERS, (256, 480, 512, 512, 512, 528, 832, 832, 1024)))
DEMO_WIDTHS = {name: w[1] + w[3] + w[5] + w[6] for name, w in TinyInceptionV1.BLOCKS.items()}


def _scale_(net: nn.Module, seed: int) -> nn.Module:
    """He-initialise every conv/linear weight (zero biases) so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.zero_()
    return net


def _random_googlenet_state(seed: int) -> tuple[nn.Module, dict]:
    """A torchvision GoogLeNet with aux heads, He-scaled, and its state dict (aux keys included)."""
    torch.manual_seed(seed)
    src = googlenet(weights=None, aux_logits=True, init_weights=True)
    _scale_(src, seed)
    state = src.state_dict()
    assert any(k.startswith("aux1.") for k in state) and any(k.startswith("aux2.") for k in state)
    return src.eval(), state


def _source_logits(src: nn.Module, x: torch.Tensor) -> torch.Tensor:
    src = copy.deepcopy(src)
    src.transform_input = True
    with torch.no_grad():
        return src.eval()(x)


@pytest.fixture(scope="module")
def inception():
    return load_model("inceptionv1", "random", device="cpu")


@pytest.fixture(scope="module")
def scaled_inception(inception):
    return _scale_(copy.deepcopy(inception.network), 3).eval()


@pytest.fixture(scope="module")
def demo(demo_weights):
    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def demo_random():
    return load_model("demo", "random", device="cpu")


@pytest.fixture(scope="module")
def x128():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def networks(scaled_inception, demo):
    """The two networks, with weights whose logits react to the input."""
    return {"inceptionv1": scaled_inception, "demo": demo.network}


# ----------------------------------------------------------------------------- layer names


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_layers_exposed_in_order_with_article_widths(name, inception, demo_random, x128):
    net = (inception if name == "inceptionv1" else demo_random).network
    assert net.layer_names == LAYERS
    stages = dict(net.stages())
    assert all(isinstance(stages[layer], Inception) for layer in LAYERS)
    with torch.no_grad():
        acts = net.forward_layers(x128, LAYERS)
    assert list(acts) == list(LAYERS)  # returned in network order
    widths = INCEPTION_WIDTHS if name == "inceptionv1" else DEMO_WIDTHS
    assert {k: v.shape[1] for k, v in acts.items()} == widths
    # Spatial sizes halve at pool3 and pool4 only (128 px input: 16, 8, 4).
    assert [acts[k].shape[2] for k in LAYERS] == [16, 16, 8, 8, 8, 8, 8, 4, 4]


def test_inception_layers_are_torchvision_blocks(inception):
    stages = dict(inception.network.stages())
    tv = inception.network.net
    for layer, block in zip(LAYERS, ["inception3a", "inception3b", "inception4a", "inception4b",
                                     "inception4c", "inception4d", "inception4e", "inception5a",
                                     "inception5b"]):
        assert stages[layer] is getattr(tv, block)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_unknown_layer_lists_valid_names(name, inception, demo_random, x128):
    net = (inception if name == "inceptionv1" else demo_random).network
    for call in (lambda: net.forward_layers(x128, ["mixed4c", "mixed9z"]),
                 lambda: net.forward_from("pool3", x128),
                 lambda: net.check_layers(["conv1"])):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert all(layer in message for layer in LAYERS)
    assert "mixed9z" in str(pytest.raises(ValueError, net.forward_layers, x128, ["mixed9z"]).value)


# ----------------------------------------------------------------------------- staged passes


def _count_calls(modules: dict[str, nn.Module]):
    calls = {name: 0 for name in modules}
    handles = []
    for name, mod in modules.items():
        def hook(_m, _i, _o, name=name):
            calls[name] += 1
        handles.append(mod.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
@pytest.mark.parametrize("requested, deepest", [(["mixed4c"], "mixed4c"),
                                                (["mixed4a", "mixed3a"], "mixed4a"),
                                                (["mixed3a"], "mixed3a")])
def test_forward_layers_stops_at_deepest_layer(name, requested, deepest, networks, x128):
    net = networks[name]
    stages = dict(net.stages())
    watched = {layer: stages[layer] for layer in LAYERS}
    watched["pool3"], watched["pool4"] = stages["pool3"], stages["pool4"]
    watched["fc"] = net.net.fc if name == "inceptionv1" else net.fc
    calls, handles = _count_calls(watched)
    try:
        with torch.no_grad():
            out = net.forward_layers(x128, requested)
    finally:
        for h in handles:
            h.remove()
    assert set(out) == set(requested)
    order = [n for n, _ in net.stages()]
    ran = {n for n in order[: order.index(deepest) + 1]}
    for stage, count in calls.items():
        assert count == (1 if stage in ran else 0), (stage, calls)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_forward_layers_equal_activations_of_full_forward(name, networks, x128):
    net = networks[name]
    # For InceptionV1 the reference is torchvision's own GoogLeNet.forward, not our stage list.
    full = net.net if name == "inceptionv1" else net
    stages = dict(net.stages())
    captured, handles = {}, []
    for layer in LAYERS:
        handles.append(stages[layer].register_forward_hook(
            lambda _m, _i, o, layer=layer: captured.__setitem__(layer, o.detach().clone())))
    try:
        with torch.no_grad():
            logits = full(x128)
            ours = net(x128)
            acts = net.forward_layers(x128, LAYERS)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 1e-2  # logits do depend on the input
    for layer in LAYERS:
        torch.testing.assert_close(acts[layer], captured[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
@pytest.mark.parametrize("layer", ["mixed3a", "mixed4c", "mixed4e", "mixed5b"])
def test_forward_from_completes_forward(name, layer, networks, x128):
    net = networks[name]
    assert not net.training
    with torch.no_grad():
        h = net.forward_layers(x128, [layer])[layer]
        resumed = net.forward_from(layer, h)
        logits = net(x128)
        # Resuming from the wrong stage must not agree (the check below has teeth).
        other = net.forward_from(layer, torch.zeros_like(h))
    torch.testing.assert_close(resumed, logits, rtol=1e-5, atol=1e-5)
    assert (other - logits).abs().max() > 1e-2


# ----------------------------------------------------------------------------- weights


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_random_weights_are_seeded_and_identified_by_their_content(name, tmp_path):
    a = load_model(name, "random", device="cpu", seed=0)
    b = load_model(name, "random", device="cpu", seed=0)
    c = load_model(name, "random", device="cpu", seed=1)
    sa, sb, sc = (m.network.state_dict() for m in (a, b, c))
    assert _states_equal(sa, sb)
    conv_weights = [k for k in sa if k.endswith("conv.weight")]
    assert all(not torch.equal(sa[k], sc[k]) for k in conv_weights)
    d = a.describe()
    assert d["random_weights"] is True and d["weights"] == "random" and d["model"] == name
    # the weights' identity: same seed, same hash; another seed, another hash (an index of other
    # random weights must not pass for this one); the same tensors reloaded from a file, same hash
    assert len(d["weights_sha256"]) == 64 and d["weights_sha256"] == weights_digest(a.network)
    assert b.weights_sha256 == a.weights_sha256 and c.weights_sha256 != a.weights_sha256
    path = tmp_path / "same.pt"
    torch.save(a.network.net.state_dict() if name == "inceptionv1" else a.network.state_dict(), path)
    reloaded = load_model(name, str(path), device="cpu", seed=7)
    assert reloaded.weights == "file:same.pt" and reloaded.weights_sha256 == a.weights_sha256


def test_demo_default_uses_cached_trained_weights(demo, demo_random, demo_weights):
    trained = torch.load(demo_weights, map_location="cpu", weights_only=True)
    assert _states_equal(demo.network.state_dict(), trained)
    assert not _states_equal(demo_random.network.state_dict(), trained)
    d = demo.describe()
    assert d["weights"] == "demo" and d["random_weights"] is False
    assert d["weights_sha256"] == weights_digest(demo.network)
    assert load_model("demo", str(demo_weights), device="cpu").weights_sha256 == d["weights_sha256"]
    assert d["num_classes"] == len(demo_model.CATEGORIES) and d["input_size"] == 128


def test_weights_file_loads_googlenet_state_dict(tmp_path, x128):
    src, state = _random_googlenet_state(11)
    path = tmp_path / "my-googlenet.pth"
    torch.save(state, path)
    loaded = load_model("inceptionv1", str(path), device="cpu")
    own = loaded.network.net.state_dict()
    assert _states_equal(own, {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))})
    with torch.no_grad():
        logits = loaded.network(x128)
    expected = _source_logits(src, x128)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    d = loaded.describe()
    assert d["weights"] == "file:my-googlenet.pth" and d["random_weights"] is False
    assert d["weights_sha256"] == weights_digest(loaded.network) != load_model("inceptionv1", "random").weights_sha256


def _bad_file(kind: str, path: Path) -> None:
    if kind == "wrong keys":
        torch.save({"module." + k: v for k, v in googlenet(weights=None, aux_logits=False,
                                                           init_weights=False).state_dict().items()}, path)
    elif kind == "wrong shapes":
        torch.save(googlenet(weights=None, num_classes=10, aux_logits=False,
                             init_weights=False).state_dict(), path)
    elif kind == "not a state dict":
        torch.save([torch.zeros(3), torch.ones(2)], path)
    elif kind == "corrupt":
        torch.save({"fc.weight": torch.zeros(1000, 1024)}, path)
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 50)
    # "missing": nothing written


@pytest.mark.parametrize("kind", ["wrong keys", "wrong shapes", "not a state dict", "corrupt",
                                  "garbage", "missing"])
def test_bad_weights_file_raises_naming_it(kind, tmp_path):
    path = tmp_path / f"bad-{kind.replace(' ', '_')}.pth"
    _bad_file(kind, path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("inceptionv1", str(path), device="cpu")
    assert str(path) in str(info.value)


def test_demo_weights_file_that_does_not_fit_raises_naming_it(tmp_path):
    path = tmp_path / "googlenet.pth"
    torch.save(googlenet(weights=None, aux_logits=False, init_weights=False).state_dict(), path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("demo", str(path), device="cpu")
    message = str(info.value)
    assert str(path) in message
    # a summary, not torch's list of every one of the hundreds of keys
    lines = message.splitlines()
    assert len(lines) <= 4, message
    expected = TinyInceptionV1(len(demo_model.CATEGORIES)).state_dict()
    assert f"{len(expected) - 2} missing: stem.0.conv.weight, " in message  # all but fc.weight, fc.bias
    assert "unexpected: conv1.conv.weight, " in message
    assert f"2 of another shape: fc.weight (1000, 1024) (needs {tuple(expected['fc.weight'].shape)})" in message


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch.hub pointed at an empty folder; the original hub dir is restored afterwards."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored on teardown
    torch.hub.set_dir(str(hub))
    assert torch.hub.get_dir() == str(hub)
    return hub


@pytest.fixture
def offline(monkeypatch):
    """Every torch.hub download fails as it does with no network; counts attempts."""
    attempts = []

    def fail(url, dst, *args, **kwargs):
        attempts.append((url, dst))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return attempts


def test_imagenet_weights_offline_raise_naming_file_and_folder(empty_hub, offline):
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("inceptionv1", device="cpu")
    message = str(info.value)
    folder = empty_hub / "checkpoints"
    assert IMAGENET_FILE in message
    assert str(folder / IMAGENET_FILE) in message  # the exact folder, file name joined
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert len(offline) == 1 and offline[0][0] == GoogLeNet_Weights.IMAGENET1K_V1.url
    assert Path(offline[0][1]).parent == folder
    assert "--weights" in message
    assert socket.getdefaulttimeout() == timeout_before  # the temporary timeout is undone


def test_imagenet_weights_come_from_torch_hub_cache(empty_hub, offline, x128):
    # torch.hub only checks the filename's hash prefix when it downloads, not for a file
    # already cached, so a stand-in state dict placed at the cached path is what gets loaded.
    src, state = _random_googlenet_state(5)
    cached = empty_hub / "checkpoints" / IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    loaded = load_model("inceptionv1", device="cpu")
    assert offline == []  # no download attempted
    assert loaded.describe()["weights"] == "imagenet" and not loaded.random_weights
    with torch.no_grad():
        logits = loaded.network(x128)
    torch.testing.assert_close(logits, _source_logits(src, x128), rtol=1e-5, atol=1e-5)


def test_imagenet_cached_file_that_does_not_fit_names_it(empty_hub, offline):
    cached = empty_hub / "checkpoints" / IMAGENET_FILE
    cached.parent.mkdir(parents=True)
    torch.save(TinyInceptionV1(12).state_dict(), cached)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("inceptionv1", device="cpu")
    assert str(cached) in str(info.value)


# ----------------------------------------------------------------------------- preprocessing


ONE_GREY_LEVEL = 1 / 255 / 0.224 + 1e-5  # in normalised units, for the smallest ImageNet std


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_inception_preprocessing_matches_torchvision_preset(inception, suffix):
    """Our crop-box resample equals the weights' own preset up to one grey level."""
    path = sorted(SAMPLE_DATA.rglob(f"*{suffix}"))[0]
    image = Image.open(path).convert("RGB")
    ours = inception.transform(image)
    preset = GoogLeNet_Weights.IMAGENET1K_V1.transforms()(image)
    assert ours.shape == preset.shape == (3, 224, 224) and ours.dtype == torch.float32
    one_level = ONE_GREY_LEVEL
    assert (ours - preset).abs().max() <= one_level
    assert (ours - preset).abs().mean() < 0.1 * one_level
    # And independently: resize shorter side to 256 (bilinear), centre-crop 224, ImageNet normalisation.
    by_hand = TF.normalize(TF.to_tensor(TF.center_crop(
        TF.resize(image, 256, InterpolationMode.BILINEAR, antialias=True), 224)),
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(preset, by_hand, rtol=0, atol=1e-5)
    assert (ours - by_hand).abs().max() <= one_level


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 200), (256, 256), (100, 900), (1000, 257)])
def test_preprocessing_geometry_matches_preset_for_any_shape(inception, size):
    """Portrait, landscape, upscaled, exact and extreme aspect ratios all crop the same region."""
    rng = np.random.default_rng(size)
    smooth = rng.normal(size=(size[1] // 8 + 2, size[0] // 8 + 2, 3)).cumsum(0).cumsum(1)
    smooth = (smooth - smooth.min()) / np.ptp(smooth) * 255
    image = Image.fromarray(smooth.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    ours = inception.transform(image)
    preset = GoogLeNet_Weights.IMAGENET1K_V1.transforms()(image)
    assert (ours - preset).abs().max() <= ONE_GREY_LEVEL


def test_preprocessing_falls_back_to_preset_for_tensors(inception):
    image = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8)
    torch.testing.assert_close(inception.transform(image), GoogLeNet_Weights.IMAGENET1K_V1.transforms()(image))


# ----------------------------------------------------------------------------- bf16


def _six_images(model):
    entries = {e.path: e for e in scan_images(SAMPLE_DATA)}
    paths = [path for path, _ in demo_model.held_out_paths(SAMPLE_DATA)][::18][:6]
    decoded = [decode_file(SAMPLE_DATA, entries[p], model) for p in paths]
    assert all(d.error is None for d in decoded)
    return torch.stack([d.tensor for d in decoded]), paths


# Measured (2-core AVX512-BF16 CPU, layers mixed3b/mixed4c/mixed5b, 8 samples per image):
#   demo:              pooled cosine min 0.99993; activation rel. L2 per image max 0.0069 / 0.0067 / 0.0138
#   random inceptionv1: pooled cosine min 0.99999; activation rel. L2 per image max 0.0066 / 0.0085 / 0.0114
BF16_MIN_COSINE = 0.999
BF16_MAX_REL_L2 = 0.05
# bf16 keeps 8 bits of mantissa (relative rounding 2^-8 ≈ 0.004 per operation), and the measured
# error of the activations is below 0.015; a class's probability moves by at most a few hundredths
# then. So bf16 may pick another top-1 class only where fp32's two best are closer than this.
BF16_MAX_FLIP_GAP = 0.1


@pytest.mark.parametrize("name", ["demo", "inceptionv1"])
def test_bf16_agrees_with_fp32(name, demo, inception):
    model = demo if name == "demo" else inception
    x, paths = _six_images(model)
    layers = ("mixed3b", "mixed4c", "mixed5b")
    fp32 = embed_batch(model, x, paths, EmbedConfig(layers=layers, samples_per_image=8, precision="fp32"))
    channels_last = copy.copy(model)
    channels_last.network = copy.deepcopy(model.network).to(memory_format=torch.channels_last)
    bf16 = embed_batch(channels_last, x, paths,
                       EmbedConfig(layers=layers, samples_per_image=8, precision="bf16"))
    a, b = fp32.pooled, bf16.pooled
    assert a.dtype == b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= BF16_MIN_COSINE, cosine
    # bf16 really ran: results are not bit-identical to fp32.
    assert not np.array_equal(a, b)
    for layer in layers:
        np.testing.assert_array_equal(fp32.positions[layer], bf16.positions[layer])
        fa, fb = fp32.activations[layer].reshape(6, -1), bf16.activations[layer].reshape(6, -1)
        rel = np.linalg.norm(fa - fb, axis=1) / np.linalg.norm(fa, axis=1)
        assert rel.max() <= BF16_MAX_REL_L2, (layer, rel)
    if name == "demo":
        # The same top-1 class, except where fp32 itself is undecided. Whether the class is the
        # true one is the network's quality, asserted over all held-out images below.
        flipped = fp32.top5_class[:, 0] != bf16.top5_class[:, 0]
        gap = fp32.top5_prob[:, 0] - fp32.top5_prob[:, 1]
        assert (gap[flipped] < BF16_MAX_FLIP_GAP).all(), (fp32.top5_class[:, 0], bf16.top5_class[:, 0], gap)


# The trained demo network's quality, in aggregate over the 108 held-out images, since training
# on another CPU kind gives other weights (see atlasq.demo_model.NUMERICS). Measured held-out
# accuracy: 0.963 (AVX-512 CPU, before training was pinned to AVX2), 0.926 (AVX2-only AMD EPYC
# before, and this AVX-512 AMD EPYC with the AVX2 pin). One image is 0.009; the binomial standard
# deviation at 0.93 over 108 images is 0.025. The floor 0.85 is 3 deviations under the lower
# figure and still 10 times chance (1/12).
DEMO_MIN_ACCURACY = 0.85


def _held_out_batch(model):
    entries = {e.path: e for e in scan_images(SAMPLE_DATA)}
    held = demo_model.held_out_paths(SAMPLE_DATA)
    x = torch.stack([decode_file(SAMPLE_DATA, entries[p], model).tensor for p, _ in held])
    return x, [p for p, _ in held], np.array([label for _, label in held])


def test_demo_network_classifies_held_out_images_in_fp32_and_bf16(demo, demo_weights):
    x, paths, labels = _held_out_batch(demo)
    assert len(labels) >= 100
    layers = ("mixed5b",)
    fp32 = embed_batch(demo, x, paths, EmbedConfig(layers=layers, samples_per_image=1, precision="fp32"))
    bf16 = embed_batch(demo, x, paths, EmbedConfig(layers=layers, samples_per_image=1, precision="bf16"))
    accuracy = float((fp32.top5_class[:, 0] == labels).mean())
    print(f"\ndemo network held-out accuracy: fp32 {accuracy:.3f}, bf16 "
          f"{float((bf16.top5_class[:, 0] == labels).mean()):.3f} ({len(labels)} images)")
    assert accuracy >= DEMO_MIN_ACCURACY
    # The true class is nearly always among the five best.
    assert float((fp32.top5_class == labels[:, None]).any(1).mean()) >= 0.97
    # The training report measured the same accuracy on the same images (same preprocessing).
    assert demo_model.report(demo_weights)["held_out_accuracy"] == pytest.approx(accuracy, abs=1.5 / len(labels))
    # bf16 changes only undecided predictions (see BF16_MAX_FLIP_GAP), which are few.
    flipped = fp32.top5_class[:, 0] != bf16.top5_class[:, 0]
    gap = fp32.top5_prob[:, 0] - fp32.top5_prob[:, 1]
    assert (gap[flipped] < BF16_MAX_FLIP_GAP).all() and flipped.mean() <= 0.05


# ----------------------------------------------------------------------------- relaxation


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_relax_maxpool_keeps_forward_and_wraps_every_pool(name, networks, x128):
    net = networks[name]
    relaxed = relax_maxpool(net)
    pools_before = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools_before) == 13  # stem 2, pool3, pool4, one per Inception block
    wrapped = [m for m in relaxed.modules() if isinstance(m, RelaxedMaxPool2d)]
    assert len(wrapped) == len(pools_before)
    inner = {id(w.pool) for w in wrapped}
    assert all(id(m) in inner for m in relaxed.modules() if isinstance(m, nn.MaxPool2d))
    # The original is untouched.
    assert not any(isinstance(m, RelaxedMaxPool2d) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(relaxed(x128), net(x128), rtol=0, atol=0)
        torch.testing.assert_close(relaxed.forward_layers(x128, ["mixed4c"])["mixed4c"],
                                   net.forward_layers(x128, ["mixed4c"])["mixed4c"], rtol=0, atol=0)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 0), (3, 1, 1), (2, 2, 0)])
def test_relaxed_pool_has_maxpool_value_and_avgpool_gradient(kernel, stride, padding):
    pool = nn.MaxPool2d(kernel, stride=stride, padding=padding, ceil_mode=True)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn_like(pool(x))
    y = RelaxedMaxPool2d(pool)(x)
    torch.testing.assert_close(y, pool(x), rtol=0, atol=0)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    avg = nn.functional.avg_pool2d(x, kernel, stride, padding, ceil_mode=True, count_include_pad=False)
    (g_avg,) = torch.autograd.grad((avg * w).sum(), x)
    (g_max,) = torch.autograd.grad((pool(x) * w).sum(), x)
    torch.testing.assert_close(g, g_avg)
    assert not torch.allclose(g, g_max)
