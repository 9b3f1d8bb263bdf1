"""Reference images, deletion masks (soft and hard) and blending.

A mask value of 1 means "deleted": the pixel shows the reference instead of the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from l2r.imputation import MEAN_COLOUR, NOISE_SIGMA, impute
from l2r.ranking import pixel_ranks

REFERENCES = ("black", "mean", "blur", "impute")
# A pixel at least this deleted counts as removed when a soft mask meets the imputation.
IMPUTE_SOFT_THRESHOLD = 0.5
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


def make_reference(images: torch.Tensor, kind: str, impute_noise: float = NOISE_SIGMA,
                   impute_seed: int = 0) -> torch.Tensor:
    """The substrate deleted pixels turn into: black, mean colour, or a blur of the image.

    For "impute" it is the image with every pixel removed (the mean colour plus the noise),
    the end point of every curve; in between, `delete_pixels` imputes from the kept pixels.
    """
    if kind == "impute":
        return impute(images, torch.ones_like(images[:, :1], dtype=torch.bool), impute_noise, impute_seed)
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "mean":
        colour = torch.tensor(MEAN_COLOUR, device=images.device, dtype=images.dtype)
        return colour.view(1, 3, 1, 1).expand_as(images).clone()
    if kind == "blur":
        scale = BLUR_AT_224 * images.shape[-2] / 224.0
        return gaussian_blur(images, sigma=scale, size=round(scale))
    raise ValueError(f"unknown reference {kind!r}; choose one of {REFERENCES}")


def is_constant_reference(kind: str) -> bool:
    """Whether the fully deleted image is the same for every image (one forward serves all)."""
    return kind in ("black", "mean", "impute")


def delete_pixels(images: torch.Tensor, masks: torch.Tensor, kind: str, reference: torch.Tensor | None = None,
                  impute_noise: float = NOISE_SIGMA, impute_seed: int = 0) -> torch.Tensor:
    """Images (N, 3, H, W) with the pixels of hard masks (N, 1, H, W) removed.

    `reference` (from `make_reference`, per image) saves recomputing it; "impute" ignores it.
    """
    if kind == "impute":
        return impute(images, masks, impute_noise, impute_seed)
    if reference is None:
        reference = make_reference(images, kind)
    return torch.where(masks.to(torch.bool), reference, images)


def soft_references(images: torch.Tensor, masks: torch.Tensor, kind: str,
                    generator: torch.Generator | None = None, impute_noise: float = NOISE_SIGMA) -> torch.Tensor:
    """What soft masks (B, M, H, W) blend each image towards: (B, 1, 3, H, W), or (B, M, 3, H, W).

    For "impute", mask m's reference is the image imputed where the mask is at least
    IMPUTE_SOFT_THRESHOLD (its gradient reaches those pixels' mask values through the blend),
    with fresh noise from `generator`: training should not learn one fixed noise field.
    """
    if kind != "impute":
        return make_reference(images, kind)[:, None]
    b, m, h, w = masks.shape
    c = images.shape[1]
    noise = impute_noise * torch.randn(c, h, w, generator=generator).to(images)
    removed = (masks.detach() >= IMPUTE_SOFT_THRESHOLD).reshape(b * m, 1, h, w)
    flat = impute(images.detach().repeat_interleave(m, dim=0), removed, noise_values=noise)
    return flat.view(b, m, c, h, w)


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
