"""Feature visualization in three small parts joined by one loop.

``param``: how an image is parameterised (Fourier spectrum, decorrelated colour, sigmoid).
``transform``: random robustness transforms applied each step.
``objectives``: what to maximise (here: a direction at a layer's centre position).
``render``: the optimisation loop that combines them.
"""

from .objectives import direction_objective
from .param import fft_image
from .render import render_directions
from .transform import robustness_transform

__all__ = ["direction_objective", "fft_image", "render_directions", "robustness_transform"]
