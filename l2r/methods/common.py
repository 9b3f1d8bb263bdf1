"""What the methods share: the model's output to explain, input gradients, map sizes, ViT layout,
and the optional packages."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INSTALL_HINT = 'pip install "l2r[baselines]"'


def model_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    net = getattr(model, "net", model)
    return f"{type(model).__name__}({spec or type(net).__name__})"


def to_input_size(maps: torch.Tensor, size) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.dim() == 4:
        maps = maps[:, 0]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear",
                             align_corners=False)[:, 0]
    return maps


def output_fn(model: nn.Module, output: str):
    if output == "logits":
        return model.logits
    if output == "probs":
        return model
    raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")


def fresh_input(images: torch.Tensor) -> torch.Tensor:
    # A leaf that requires grad: gradients reach activations even though every parameter is frozen.
    return images.detach().clone().requires_grad_(True)


def import_captum():
    try:
        import captum.attr as captum_attr
    except ImportError as error:
        raise ImportError(f"the 'ig' and 'saliency' methods need captum: {INSTALL_HINT}") from error
    return captum_attr


def import_grad_cam():
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as error:
        raise ImportError(
            f"the 'gradcam' and 'vit_cam' methods need pytorch-grad-cam: {INSTALL_HINT}") from error
    return pytorch_grad_cam.GradCAM, ClassifierOutputTarget


def vit_blocks(net: nn.Module):
    """The transformer blocks of a timm-style ViT (token sequence with prefix tokens), or None."""
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "patch_embed") or not hasattr(net, "num_prefix_tokens"):
        return None
    blocks = list(blocks)
    if not blocks or not all(hasattr(block, "attn") for block in blocks):
        return None
    return blocks


# The probed default layer per model and input size, so the probe forward runs once, not per batch.
def token_grid(net, n_patches, height, width):
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (height // patch_h, width // patch_w)
        if grid[0] * grid[1] == n_patches:
            return grid
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"cannot arrange {n_patches} patch tokens on a grid")
    return side, side


