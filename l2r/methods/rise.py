"""RISE (Petsiuk et al. 2018): random masks scored with the softmax probability.

`n_masks` masks of a `grid_size` grid with P(kept) = `p`, seeded. The paper uses N=4000..8000 at
224 px; 1000 masks of an 8x8 grid are enough for a stable ranking at small resolutions and keep
the cost at 1000 forwards per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from l2r.methods.registry import Method, register


def rise_masks(n_masks: int, grid_size: int, p: float, size, generator=None, device=None) -> torch.Tensor:
    """RISE masks (N,1,H,W) in [0,1] (Petsiuk et al. 2018, section 3.2).

    Binary `s x s` grids with P(1) = p are upsampled bilinearly to `(s+1) * cell` and cropped
    to `H x W` at a random offset in `[0, cell)`, so the soft masks are not aligned to the grid.
    """
    height, width = size
    cell_h, cell_w = math.ceil(height / grid_size), math.ceil(width / grid_size)
    grids = (torch.rand(n_masks, 1, grid_size, grid_size, generator=generator) < p).float()
    upsampled = F.interpolate(grids, size=((grid_size + 1) * cell_h, (grid_size + 1) * cell_w),
                              mode="bilinear", align_corners=False)
    shift_y = torch.randint(0, cell_h, (n_masks,), generator=generator)
    shift_x = torch.randint(0, cell_w, (n_masks,), generator=generator)
    masks = torch.stack([upsampled[i, :, y:y + height, x:x + width]
                         for i, (y, x) in enumerate(zip(shift_y.tolist(), shift_x.tolist()))])
    masks = masks.clamp(0.0, 1.0)  # bilinear rounding can overshoot 1 by an ulp
    return masks.to(device) if device is not None else masks


@torch.no_grad()
def _rise(model, images, targets, n_masks, grid_size, p, batch_size, seed):
    generator = torch.Generator().manual_seed(int(seed))
    masks = rise_masks(int(n_masks), int(grid_size), float(p), images.shape[-2:], generator,
                       device=images.device)
    saliency = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
    rows = torch.arange(images.shape[0], device=images.device)
    # Every image sees the same masks; masking multiplies (black reference, as in the paper).
    masks_per_batch = max(1, int(batch_size) // images.shape[0])
    for start in range(0, masks.shape[0], masks_per_batch):
        chunk = masks[start:start + masks_per_batch]  # (M,1,H,W)
        masked = images[:, None] * chunk[None]  # (B,M,3,H,W)
        probs = model(masked.flatten(0, 1)).reshape(images.shape[0], chunk.shape[0], -1)
        scores = probs[rows, :, targets]  # (B,M)
        saliency += torch.einsum("bm,mhw->bhw", scores, chunk[:, 0])
    return saliency / (masks.shape[0] * float(p))



register(Method("rise", _rise, defaults={"n_masks": 1000, "grid_size": 8, "p": 0.5, "batch_size": 256, "seed": 0},
                cost=lambda settings: (int(settings["n_masks"]), 0), summary="randomised input sampling"))
