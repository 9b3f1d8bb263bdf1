"""Reference images, deletion masks (soft and hard) and blending.

A mask value of 1 means "deleted": the pixel shows the reference instead of the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from l2r.ranking import pixel_ranks

REFERENCES = ("black", "mean", "blur")
MEAN_COLOUR = (0.485, 0.456, 0.406)
# The paper's blur: kernel 37, sigma 37 at 224 px; both scale with image size.
BLUR_AT_224 = 37.0


def fractions(steps: int, device=None) -> torch.Tensor:
    """K fractions p_k = k / (K - 1), both ends included."""
    if steps < 2:
        raise ValueError(f"need at least 2 steps, got {steps}")
    return torch.linspace(0.0, 1.0, steps, device=device)


def gaussian_kernel1d(sigma: float, size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, any number of channels."""
    b, c, h, w = images.shape
    size = max(1, int(size) | 1)  # odd
    # Reflect padding needs pad < dim; larger kernels fall back to replicate.
    pad = size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    k = gaussian_kernel1d(sigma, size, images.device, images.dtype)
    flat = images.reshape(b * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
    return flat.reshape(b, c, h, w)


def make_reference(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The substrate deleted pixels turn into: black, mean colour, or a blur of the image."""
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "mean":
        colour = torch.tensor(MEAN_COLOUR, device=images.device, dtype=images.dtype)
        return colour.view(1, 3, 1, 1).expand_as(images).clone()
    if kind == "blur":
        scale = BLUR_AT_224 * images.shape[-2] / 224.0
        return gaussian_blur(images, sigma=scale, size=round(scale))
    raise ValueError(f"unknown reference {kind!r}; choose one of {REFERENCES}")


def blend(images: torch.Tensor, reference: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(1 - M) * x + M * r; masks (B, 1, H, W) or broadcastable."""
    return torch.lerp(images, reference, masks)


def soft_deletion_masks(perm: torch.Tensor, fracs: torch.Tensor) -> torch.Tensor:
    """How much each cell is deleted after a fraction p of deletions: (B, K, N).

    C_t = sum_{j<t} P[j, :]; t = p * N, interpolated between floor(t) and ceil(t).
    """
    b, n, _ = perm.shape
    cumulative = torch.cat([perm.new_zeros(b, 1, n), perm.cumsum(dim=1)], dim=1)  # (B, N+1, N)
    t = fracs.to(perm.device, perm.dtype) * n
    lo = t.floor().long().clamp(0, n)
    hi = t.ceil().long().clamp(0, n)
    w = (t - lo.to(t.dtype)).view(1, -1, 1)
    return torch.lerp(cumulative[:, lo], cumulative[:, hi], w)


def grid_to_pixels(cell_masks: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, G*G) cell values -> (B, K, H, W) by nearest upsampling."""
    b, k, _ = cell_masks.shape
    return F.interpolate(cell_masks.reshape(b, k, grid, grid), size=size, mode="nearest")


def smooth_masks(masks: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian smoothing (reflect padding) then clamp to [0, 1]; sigma 0 only clamps."""
    if sigma > 0:
        masks = gaussian_blur(masks, sigma=sigma, size=2 * math.ceil(3 * sigma) + 1)
    return masks.clamp(0.0, 1.0)


def deletion_counts(fracs: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """How many pixels are deleted at each fraction: round(p * H * W)."""
    return torch.round(fracs.double() * num_pixels).long()


def hard_deletion_masks(maps: torch.Tensor, fracs: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Masks (B, K, H, W): the top round(p*HW) pixels of each map deleted at fraction p.

    reverse=True deletes the *least* important pixels first (the insertion metric).
    """
    b = maps.shape[0]
    h, w = maps.shape[-2:]
    ranks = pixel_ranks(maps.reshape(b, h, w))  # 0 = most important
    if reverse:
        ranks = h * w - 1 - ranks
    counts = deletion_counts(fracs, h * w).to(maps.device)
    masks = ranks[:, None, :] < counts[None, :, None]
    return masks.reshape(b, -1, h, w)
