"""Tests for atlasq.attribution: exact agreement with autograd and finite differences, exact
identities, relaxation, chunking, meaning on the trained demo network, and embed_batch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasq import demo_model
from atlasq.attribution import attribute
from atlasq.embed import EmbedConfig, decode_file, embed_batch, sample_positions
from atlasq.images import scan_images
from atlasq.model import load_model, relax_maxpool

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def inception():
    return load_model("inceptionv1", "random", device="cpu")


@pytest.fixture(scope="module")
def demo(demo_weights):
    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def networks(inception, demo):
    return {"inceptionv1": inception.network, "demo": demo.network}


@pytest.fixture(scope="module")
def relaxed(networks):
    return {name: relax_maxpool(net) for name, net in networks.items()}


@pytest.fixture(scope="module")
def images(demo):
    """Four real sample images (one per class of four classes) as demo-network inputs."""
    entries = {e.path: e for e in scan_images(SAMPLE_DATA)}
    paths = [path for path, _ in demo_model.held_out_paths(SAMPLE_DATA)][::27][:4]
    decoded = [decode_file(SAMPLE_DATA, entries[p], demo) for p in paths]
    return torch.stack([d.tensor for d in decoded]), paths


@pytest.fixture(scope="module")
def x128():
    return torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(3))


def _inputs(name, images, x128):
    return images[0][:3] if name == "demo" else x128


def _positions(h: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """(B, K, 2) positions, including a corner and an edge so borders are covered too."""
    batch, _, height, width = h.shape
    rng = np.random.default_rng(seed)
    pos = np.stack([rng.integers(0, height, (batch, k)), rng.integers(0, width, (batch, k))], -1)
    pos[0, 0] = (0, 0)
    pos[-1, -1] = (height - 1, width // 2)
    return pos


def _autograd_reference(net, layer, h, positions, classes):
    """ref[b, k, j] = sum over channels of h[b, :, y, x] * d logit_{classes[j]} / dh[b, :, y, x]."""
    leaf = h.detach().clone().requires_grad_(True)
    logits = net.forward_from(layer, leaf)
    ref = torch.zeros(positions.shape[0], positions.shape[1], len(classes), dtype=h.dtype)
    for j, c in enumerate(classes):
        # Images are independent in eval mode, so one backward gives every image's gradient.
        (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
        for b in range(positions.shape[0]):
            for k, (y, x) in enumerate(positions[b]):
                ref[b, k, j] = (h[b, :, y, x] * grad[b, :, y, x]).sum()
    return ref


def _assert_close_rel(actual, expected, rel):
    scale = float(expected.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


CASES = [("inceptionv1", "mixed4c"), ("inceptionv1", "mixed3b"), ("demo", "mixed4c"),
         ("demo", "mixed3b")]


@pytest.mark.parametrize("name, layer", CASES)
def test_attribution_equals_autograd_grad_times_activation(name, layer, networks, images, x128):
    net = networks[name]
    x = _inputs(name, images, x128)
    with torch.no_grad():
        h = net.forward_layers(x, [layer])[layer]
    positions = _positions(h, 3, seed=len(layer))
    out = attribute(net, layer, h, positions)
    n_classes = 1000 if name == "inceptionv1" else len(demo_model.CATEGORIES)
    assert out.shape == (x.shape[0], 3, n_classes)
    classes = [0, 7, n_classes - 1] if name == "inceptionv1" else list(range(n_classes))
    ref = _autograd_reference(net, layer, h, positions, classes)
    _assert_close_rel(out[..., classes], ref, 1e-4)
    # Different positions of one image get different attributions (position is honoured).
    assert (out[0, 0] - out[0, 1]).norm() > 1e-3 * out[0, 0].norm()


FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
FD_STEPS = (1e-4, 1e-5, 1e-6, 1e-7)


def test_attribution_equals_finite_differences_float64(demo, images):
    # Independent of autograd: d/dt logit(h + t * h_at_(y,x)) by central differences, everything
    # in float64 (network, activations, attribution).
    #
    # The network is piecewise linear in h (ReLU and max-pool), so along the line the logits are
    # exactly linear between kinks, and a central difference over a step that crosses no kink is
    # exact but for rounding. A step that does cross one (a ReLU input or a max-pool's runner-up
    # within eps·|h| of switching) is off by the slope's jump: with eps = 1e-4 one position in a
    # few dozen is, which is what made this test fail at 0.008 with weights trained on another CPU.
    # So each position takes the largest step whose second difference f(+) - 2 f(0) + f(-) is at
    # rounding level (no kink inside), and the tolerance is float64's rounding of that difference.
    net = copy.deepcopy(demo.network).double()
    x = images[0][:2].double()
    with torch.no_grad():
        h = net.forward_layers(x, ["mixed4c"])["mixed4c"]
    assert h.dtype == torch.float64
    positions = np.array([[[2, 3], [5, 5]], [[4, 1], [6, 6]]])
    out = attribute(net, "mixed4c", h, positions)
    assert out.dtype == torch.float64
    for b in range(2):
        for k, (y, xx) in enumerate(positions[b]):
            step = torch.zeros_like(h[b:b + 1])
            step[0, :, y, xx] = h[b, :, y, xx]
            with torch.no_grad():
                centre = net.forward_from("mixed4c", h[b:b + 1])[0]
            # Rounding in one evaluation of the logits, relative to their size: float64's eps
            # times a generous count of accumulated roundings.
            rounding = 1e3 * FLOAT64_EPS * float(centre.abs().max())
            for eps in FD_STEPS:
                with torch.no_grad():
                    up = net.forward_from("mixed4c", h[b:b + 1] + eps * step)[0]
                    down = net.forward_from("mixed4c", h[b:b + 1] - eps * step)[0]
                if float((up - 2 * centre + down).abs().max()) <= 4 * rounding:
                    break
            else:
                pytest.fail(f"every step from {FD_STEPS[0]} to {FD_STEPS[-1]} crosses a kink at {(b, y, xx)}")
            fd = (up - down) / (2 * eps)
            torch.testing.assert_close(out[b, k], fd, rtol=1e-9, atol=2 * rounding / eps)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_relaxed_attribution_equals_autograd_through_relaxed_network(name, networks, relaxed,
                                                                     images, x128):
    net, soft = networks[name], relaxed[name]
    x = _inputs(name, images, x128)
    with torch.no_grad():
        h = net.forward_layers(x, ["mixed4c"])["mixed4c"]
    positions = _positions(h, 3, seed=4)
    n_classes = 1000 if name == "inceptionv1" else len(demo_model.CATEGORIES)
    classes = [1, 500, 999] if name == "inceptionv1" else list(range(n_classes))
    out_soft = attribute(soft, "mixed4c", h, positions)
    _assert_close_rel(out_soft[..., classes], _autograd_reference(soft, "mixed4c", h, positions, classes), 1e-4)
    # max-pools after mixed4c (pool4, the pool branches of 4d…5b) now pass the average-pool
    # gradient, so the attributions change markedly.
    out_plain = attribute(net, "mixed4c", h, positions)
    diff = (out_soft - out_plain).norm() / out_plain.norm()
    assert diff > 0.3, float(diff)  # measured 0.94 (random inceptionv1), 0.80 (demo)


def test_relaxation_changes_nothing_after_the_last_pool(demo, relaxed, images):
    # No max-pool follows mixed5b, so plain and relaxed attributions there are identical.
    net = demo.network
    with torch.no_grad():
        h = net.forward_layers(images[0], ["mixed5b"])["mixed5b"]
    positions = _positions(h, 4, seed=9)
    torch.testing.assert_close(attribute(relaxed["demo"], "mixed5b", h, positions),
                               attribute(net, "mixed5b", h, positions), rtol=0, atol=0)


def _all_positions(h: torch.Tensor) -> np.ndarray:
    batch, _, height, width = h.shape
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(-1, 2)
    return np.broadcast_to(grid, (batch, *grid.shape)).copy()


def test_mixed5b_attributions_over_all_positions_sum_to_logits_minus_bias(demo, images):
    # After mixed5b the network is mean-pool + linear, so the per-position attributions are an
    # exact decomposition of the logits: sum over positions = logits - fc.bias.
    net = demo.network
    x = images[0]
    with torch.no_grad():
        h = net.forward_layers(x, ["mixed5b"])["mixed5b"]
        logits = net(x)
    total = attribute(net, "mixed5b", h, _all_positions(h)).sum(1)
    _assert_close_rel(total, logits - net.fc.bias.detach(), 1e-4)
    # and each position's share is h[:, y, x] · W_c / (H·W)
    y, xx = 2, 1
    share = attribute(net, "mixed5b", h, np.array([[[y, xx]]] * len(x)))[:, 0]
    _assert_close_rel(share, h[:, :, y, xx] @ net.fc.weight.detach().T / (h.shape[2] * h.shape[3]), 1e-5)


@pytest.mark.parametrize("relax", [False, True])
def test_attributions_over_all_positions_sum_to_full_directional_derivative(relax, demo, relaxed,
                                                                            images):
    # Linearity: summed over every position of mixed4c, the attributions equal h · ∇_h logit_c
    # taken over the whole map at once.
    net = relaxed["demo"] if relax else demo.network
    x = images[0][:2]
    with torch.no_grad():
        h = net.forward_layers(x, ["mixed4c"])["mixed4c"]
    total = attribute(net, "mixed4c", h, _all_positions(h)).sum(1)
    leaf = h.clone().requires_grad_(True)
    logits = net.forward_from("mixed4c", leaf)
    expected = torch.stack([(torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)[0] * h)
                            .sum((1, 2, 3)) for c in range(logits.shape[1])], 1)
    _assert_close_rel(total, expected, 1e-4)


@pytest.mark.parametrize("name", ["inceptionv1", "demo"])
def test_chunk_size_does_not_change_results(name, networks, images, x128):
    # Measured: chunk=1 vs chunk=64 differ by at most ~5e-7 relative (batch-size-dependent
    # convolution kernels), never in which pairs are attributed.
    net = networks[name]
    x = _inputs(name, images, x128)
    with torch.no_grad():
        h = net.forward_layers(x, ["mixed4c"])["mixed4c"]
    positions = _positions(h, 3, seed=2)
    one = attribute(net, "mixed4c", h, positions, chunk=1)
    for chunk in (4, 64):
        _assert_close_rel(attribute(net, "mixed4c", h, positions, chunk=chunk), one, 1e-5)


def test_attribution_means_the_true_class_on_held_out_images(demo):
    # Held-out images (never trained on), 4 sampled positions per image as the indexer samples them.
    # Measured with these weights (108 images, 12 classes, chance 0.083):
    #   mixed4c: 0.389 correct (top-3: 0.61); even summing over all 64 positions gives only 0.40,
    #            so gradient×activation at this depth of the tiny network is weakly class-specific
    #            (the network's own logits are 0.963 correct);
    #   mixed5b: 0.963 (the head is linear, so attributions decompose the logits exactly).
    net = demo.network
    held = demo_model.held_out_paths(SAMPLE_DATA)
    entries = {e.path: e for e in scan_images(SAMPLE_DATA)}
    x = torch.stack([decode_file(SAMPLE_DATA, entries[p], demo).tensor for p, _ in held])
    labels = np.array([label for _, label in held])
    with torch.no_grad():
        acts = net.forward_layers(x, ["mixed4c", "mixed5b"])
    accuracy = {}
    for layer in ("mixed4c", "mixed5b"):
        h = acts[layer]
        pos = np.stack([sample_positions(p, layer, 0, h.shape[2], h.shape[3], 4) for p, _ in held])
        summed = attribute(net, layer, h, pos, chunk=256).sum(1).numpy()
        accuracy[layer] = float((summed.argmax(1) == labels).mean())
    assert len(held) >= 100
    assert accuracy["mixed4c"] >= 0.30, accuracy
    assert accuracy["mixed5b"] >= 0.90, accuracy


@pytest.mark.parametrize("relax", [False, True])
def test_embed_batch_attributions_match_attribute(relax, demo, relaxed, images):
    x, paths = images
    layers = ("mixed3b", "mixed4c")
    config = EmbedConfig(layers=layers, samples_per_image=3, attributions=True,
                         relaxed_maxpool=relax, precision="fp32")
    out = embed_batch(demo, x, paths, config, relaxed["demo"] if relax else None)
    target = relaxed["demo"] if relax else demo.network
    with torch.no_grad():
        acts = demo.network.forward_layers(x, layers)
    for layer in layers:
        attr = out.attributions[layer]
        assert attr.shape == (len(paths), 3, len(demo_model.CATEGORIES)) and attr.dtype == np.float32
        pos = out.positions[layer]
        h = acts[layer]
        expected = np.stack([sample_positions(p, layer, 0, h.shape[2], h.shape[3], 3) for p in paths])
        np.testing.assert_array_equal(pos, expected)
        direct = attribute(target, layer, h, pos).numpy()
        np.testing.assert_allclose(attr, direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
        # sampled activations are the attributed ones
        b = np.arange(len(paths))[:, None]
        np.testing.assert_allclose(out.activations[layer], h.permute(0, 2, 3, 1).numpy()[b, pos[..., 0], pos[..., 1]],
                                   rtol=1e-5, atol=1e-6)
    if relax:
        # Without a prepared relaxed copy embed_batch makes one itself, with the same result.
        again = embed_batch(demo, x, paths, config, None)
        for layer in layers:
            np.testing.assert_allclose(again.attributions[layer], out.attributions[layer],
                                       rtol=1e-5, atol=1e-5 * np.abs(out.attributions[layer]).max())
    else:
        assert config.attributions and not EmbedConfig().attributions
        plain = embed_batch(demo, x, paths, EmbedConfig(layers=layers, samples_per_image=3))
        assert plain.attributions == {}
