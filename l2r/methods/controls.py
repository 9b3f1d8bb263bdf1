"""Controls: maps that know nothing about the image or the model.

`random` (uniform noise, seeded) and `gaussian` (a centred bump, sigma = 1/4 side). A real
method should beat both on every metric; when one does not, the metric is being gamed (the
report says so). No target pass.
"""
from __future__ import annotations

import torch

from l2r.methods.registry import Method, register


def _random(model, images, targets, seed):
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(images.shape[0], *images.shape[-2:], generator=generator)


def gaussian_map(size, sigma_fraction: float = 0.25) -> torch.Tensor:
    """Centred Gaussian bump (H,W), sigma = `sigma_fraction` of each side, peak 1."""
    height, width = size
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    sigma_y, sigma_x = sigma_fraction * height, sigma_fraction * width
    return torch.exp(-(ys[:, None] ** 2) / (2 * sigma_y ** 2) - (xs[None, :] ** 2) / (2 * sigma_x ** 2))


def _gaussian(model, images, targets, sigma_fraction):
    bump = gaussian_map(images.shape[-2:], sigma_fraction)
    return bump.expand(images.shape[0], *bump.shape).clone()



register(Method("random", _random, defaults={"seed": 0}, cost=lambda settings: (0, 0), control=True,
                summary="control: uniform noise"))
register(Method("gaussian", _gaussian, defaults={"sigma_fraction": 0.25}, cost=lambda settings: (0, 0), control=True,
                summary="control: centred bump"))
