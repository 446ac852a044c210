"""The feature-visualization pieces on their own: parameterisation, transforms, objectives, and the
render loop, on a random TinyInceptionV1 (no training needed: optimisation must make progress on
any network whose activations depend on the image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasq.featurevis import direction_objective, fft_image, render_directions, robustness_transform
from atlasq.featurevis.objectives import OBJECTIVES
from atlasq.model import TinyInceptionV1

LAYER = "mixed4c"


@pytest.fixture(scope="module")
def network():
    """A random TinyInceptionV1, He-initialised: with PyTorch's default initialisation activations
    shrink at every stage, and at mixed4c they are too small (objectives near 1e-11) to mean much."""
    torch.manual_seed(0)
    net = TinyInceptionV1(12)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / module.weight[0].numel()) ** 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def directions(network):
    """Three directions that real activations take: the centre activations of three noise images."""
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = network.forward_layers((x - 0.45) / 0.225, [LAYER])[LAYER]
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2].clone()


def test_fft_image_is_a_seeded_image_in_the_unit_range_with_gradients_to_its_spectrum():
    params, image_fn = fft_image(2, 48, generator=torch.Generator().manual_seed(0))
    image = image_fn()
    values = image.detach()
    assert image.shape == (2, 3, 48, 48)
    assert float(values.min()) > 0 and float(values.max()) < 1  # a sigmoid's range
    # The start is near grey with a little structure: init sd 0.01 on the spectrum.
    assert abs(float(values.mean()) - 0.5) < 0.05 and float(values.std()) > 1e-4
    again = fft_image(2, 48, generator=torch.Generator().manual_seed(0))[1]()
    torch.testing.assert_close(values, again.detach(), rtol=0, atol=0)
    image.sum().backward()
    assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0


def test_robustness_transform_keeps_the_size_and_is_the_identity_without_movement():
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    still = robustness_transform(shift_px=0.0, scale_range=(1.0, 1.0), rotations=torch.zeros(1))
    torch.testing.assert_close(still(images), images, rtol=0, atol=1e-5)
    moving = robustness_transform(generator=torch.Generator().manual_seed(3))
    moved = moving(images)
    assert moved.shape == images.shape
    assert float((moved - images).abs().mean()) > 0.01
    # Each image gets its own transform unless shared: a batch of two equal images splits.
    twins = images[:1].repeat(2, 1, 1, 1)
    apart = robustness_transform(generator=torch.Generator().manual_seed(4))(twins)
    assert float((apart[0] - apart[1]).abs().max()) > 0.01
    together = robustness_transform(shared=True, generator=torch.Generator().manual_seed(4))(twins)
    torch.testing.assert_close(together[0], together[1])


@pytest.mark.parametrize("variant", OBJECTIVES)
def test_objective_is_largest_when_the_centre_activation_is_the_direction(variant, directions):
    v = directions
    acts = torch.zeros(3, v.shape[1], 5, 5)
    acts[:, :, 2, 2] = v
    own = direction_objective(v, variant=variant)(acts)
    swapped = torch.zeros_like(acts)  # another direction, as strong as the own one
    other_direction = v.roll(1, dims=0)
    swapped[:, :, 2, 2] = other_direction * v.norm(dim=1, keepdim=True) / other_direction.norm(dim=1, keepdim=True)
    other = direction_objective(v, variant=variant)(swapped)
    assert own.shape == (3,) and bool((own > other).all()), (own, other)
    if variant == "cosine":  # 1, but for the 1e-8 that keeps the division finite
        squared = (v * v).sum(1)
        torch.testing.assert_close(own, squared / (squared + 1e-8))
    # Only the centre position counts.
    acts[:, :, 0, 0] = 100.0
    torch.testing.assert_close(direction_objective(v, variant=variant)(acts), own)


def test_unknown_objective_is_refused(directions):
    with pytest.raises(ValueError, match="cosine"):
        direction_objective(directions, variant="dot")


@pytest.mark.parametrize("variant", OBJECTIVES)
@pytest.mark.parametrize("whitened", [False, True])
def test_rendering_raises_every_objective_on_a_random_network(variant, whitened, network, directions):
    whitening = None
    if whitened:  # any symmetric positive definite matrix is a valid whitening
        g = torch.Generator().manual_seed(5)
        a = torch.randn(directions.shape[1], directions.shape[1], generator=g) / directions.shape[1] ** 0.5
        whitening = torch.eye(directions.shape[1]) + 0.3 * (a @ a.T)
    out = render_directions(network, LAYER, directions, size=48, steps=16, variant=variant,
                            whitening=whitening, seed=0, settle_steps=4)
    assert out.images.shape == (3, 48, 48, 3) and out.images.dtype == np.uint8
    assert out.history.shape == (16, 3) and np.isfinite(out.history).all()
    # The objective of the untransformed image rises for every direction, and so does the one
    # optimised under the random transforms (first steps against the last ones).
    assert (out.final_objective > out.initial_objective).all(), (out.initial_objective, out.final_objective)
    transformed = out.history[:-4]  # the steps before the 4 settle steps
    assert (transformed[-4:].mean(0) > transformed[:4].mean(0)).all()
    # The final objective is the one of the returned centre activation.
    centre = torch.from_numpy(out.final_activation)[:, :, None, None]
    recomputed = direction_objective(directions, variant=variant, whitening=whitening)(centre)
    np.testing.assert_allclose(recomputed.numpy(), out.final_objective, rtol=1e-4, atol=1e-6)


def test_rendering_is_seeded(network, directions):
    a = render_directions(network, LAYER, directions[:1], size=48, steps=6, seed=3)
    b = render_directions(network, LAYER, directions[:1], size=48, steps=6, seed=3)
    c = render_directions(network, LAYER, directions[:1], size=48, steps=6, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_rendering_leaves_the_network_trainable_and_unchanged(network, directions):
    before = {k: v.clone() for k, v in network.state_dict().items()}
    render_directions(network, LAYER, directions[:1], size=48, steps=3, seed=0)
    assert all(p.requires_grad for p in network.parameters())
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
