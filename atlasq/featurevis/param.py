"""Image parameterisations: a Fourier spectrum with 1/f scaling and decorrelated colour.

Optimising the spectrum rather than pixels, scaled so every frequency starts with equal energy
and mapped through the square root of ImageNet's colour correlation, gives natural-looking
images (Feature Visualization, Distill 2017). Values follow Lucid: spectrum init N(0, 0.01),
scale ``1 / max(f, 1/max(h, w))``, orthonormal inverse FFT, divided by 4, then a sigmoid.
"""

from __future__ import annotations

from typing import Callable

import torch

# Square root of ImageNet's RGB colour correlation (from an SVD), as used by Lucid.
COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]])


def _frequencies(height: int, width: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fft_image(batch: int, size: int, *, sd: float = 0.01, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], Callable[[], torch.Tensor]]:
    """Parameters and a function building a (batch, 3, size, size) image in [0, 1].

    Returns ``(params, image_fn)``: optimise ``params``; ``image_fn()`` gives the image.
    """
    freqs = _frequencies(size, size)
    scale = (1.0 / torch.clamp(freqs, min=1.0 / size)).to(device)
    spectrum = (torch.randn(batch, 3, size, size // 2 + 1, 2, generator=generator) * sd).to(device)
    spectrum.requires_grad_(True)
    colour = (COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()).to(device)

    def image_fn() -> torch.Tensor:
        scaled = torch.view_as_complex(spectrum) * scale
        decorrelated = torch.fft.irfft2(scaled, s=(size, size), norm="ortho") / 4.0
        rgb = torch.einsum("bchw,dc->bdhw", decorrelated, colour)
        return torch.sigmoid(rgb)

    return [spectrum], image_fn
