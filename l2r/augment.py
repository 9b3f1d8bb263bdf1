"""Training augmentation: random resized crops and horizontal flips, batched on the device.

A few hundred photos go further when every step sees a different crop of them. The reader
decodes the training images at `decode_size(image_size, crop_pct)` (the whole centre square
that evaluation's resize-then-centre-crop starts from); each step then takes one random
crop per image (area fraction in `scale`, aspect ratio in [3/4, 4/3], the usual published
settings) and resizes it to the model input with one batched `grid_sample`. At scale 1 and
no flip the crop is the whole square, which evaluation would crop to `crop_pct` of.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ASPECT_RATIO = (3 / 4, 4 / 3)


def decode_size(image_size, crop_pct: float) -> tuple[int, int]:
    """The side the training reader decodes to when crops are random: image_size / crop_pct."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return round(h / crop_pct), round(w / crop_pct)


def random_resized_crop(images: torch.Tensor, size, scale=(0.25, 1.0), flip: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, S, S') -> (B, C, H, W): per image a random crop (area fraction in `scale`, aspect in
    ASPECT_RATIO, clipped to the image), mirrored with probability 1/2 when `flip`, bilinearly resized."""
    b = images.shape[0]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(b, device=images.device, generator=generator)

    area = uniform(float(scale[0]), float(scale[1]))
    ratio = uniform(math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])).exp()  # crop width / height
    crop_w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the source's width and height
    crop_h = (area / ratio).sqrt().clamp(max=1.0)
    # Centre in normalised coordinates [-1, 1], so that the crop stays inside the image.
    cx = uniform(-1.0, 1.0) * (1 - crop_w)
    cy = uniform(-1.0, 1.0) * (1 - crop_h)
    sign = torch.ones(b, device=images.device)
    if flip:
        sign = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = crop_w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(images.dtype), (b, images.shape[1], h, w), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor, size, crop_scale=None, flip: bool = False) -> torch.Tensor:
    """The training job's augmentation (`data.augment`): random resized crops when `crop_scale` is set,
    else at most a random flip per image."""
    if crop_scale is not None:
        return random_resized_crop(images, size, crop_scale, flip)
    if flip:
        mirrored = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
        return torch.where(mirrored, images.flip(-1), images)
    return images

