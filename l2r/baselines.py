"""Reference attribution methods behind one call, for comparison with the learned explainer.

`attribute(method, model, images, targets, **kwargs) -> (maps, cost)`:

- `model` is a target model (`l2r.classifier.TargetModel` or anything with the same interface):
  `forward(x)` gives softmax probabilities for images in [0,1], `logits(x)` gives logits and
  `.net` is the raw network (used only to find layers / attention blocks).
- `maps` is a float32 tensor (B,H,W) at the input resolution, on the images' device. Only the
  ranking of a map matters to the deletion/insertion metrics.
- `cost` is `{"forward_passes": n, "backward_passes": m}` *per image*, computed exactly from the
  method's settings. The caller measures seconds.

Methods (defaults in `DEFAULTS`; cost per image as forward/backward passes):

- `gradcam`: pytorch-grad-cam GradCAM on the target's logits, at the last stage of a CNN
  (timm `feature_info`, else the last Conv2d; `target_layer=` overrides). ReLU'd, min-max
  normalised by the library. 1/1.
- `vit_cam`: the same on a timm ViT, at the last block's `norm1`, prefix tokens dropped and
  patch tokens laid out as a grid. 1/1.
- `ig`: Captum IntegratedGradients, black baseline, `n_steps`=32; |attribution| summed over
  channels (`absolute=False`: signed sum). n_steps/n_steps.
- `saliency`: Captum Saliency, max |gradient| over channels (`absolute=False`: signed sum). 1/1.
- `rise`: RISE (Petsiuk et al. 2018), `n_masks`=1000 masks from an 8x8 grid with p=0.5, seeded;
  scored with the softmax probability. n_masks/0.
- `rollout`: attention rollout (Abnar & Zuidema 2020) of a timm ViT; class-agnostic. 1/0.
- `random` (uniform noise, seeded) and `gaussian` (centred bump, sigma = 1/4 side): controls. 0/0.

Gradient methods use the logits by default (`output="probs"` uses the softmax instead).
Gradient methods need gradients with respect to the input or to activations, never the frozen
parameters, so every method here runs under `torch.enable_grad()` with a fresh input tensor that
requires grad; the model's parameters are left untouched.

Captum and pytorch-grad-cam are optional (`pip install "l2r[baselines]"`); they are imported
only when a method needs them.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("gradcam", "vit_cam", "ig", "saliency", "rise", "rollout", "random", "gaussian")

# Defaults, documented in one place so reports can quote them.
DEFAULTS = {
    "gradcam": {"output": "logits"},
    "vit_cam": {"output": "logits"},
    "ig": {"n_steps": 32, "internal_batch_size": 256, "absolute": True, "output": "logits"},
    "saliency": {"absolute": True, "output": "logits"},
    # The RISE paper uses N=4000..8000 at 224 px; 1000 masks of an 8x8 grid are enough for a
    # stable ranking at small resolutions and keep the cost at 1000 forwards per image.
    "rise": {"n_masks": 1000, "grid_size": 8, "p": 0.5, "batch_size": 256, "seed": 0},
    "rollout": {},
    "random": {"seed": 0},
    "gaussian": {"sigma_fraction": 0.25},
}

_INSTALL_HINT = 'pip install "l2r[baselines]"'


def requires_grad(method: str) -> bool:
    """Whether the method backpropagates through the target model."""
    _check_method(method)
    return method in ("gradcam", "vit_cam", "ig", "saliency")


def method_cost(method: str, **kwargs) -> dict:
    """Target passes per image for the given settings (same numbers `attribute` returns)."""
    _check_method(method)
    settings = {**DEFAULTS[method], **kwargs}
    if method in ("gradcam", "vit_cam", "saliency"):
        forwards, backwards = 1, 1
    elif method == "ig":
        # Captum evaluates the gradient once per integration step; no extra pass for the
        # convergence delta because we do not ask for it.
        forwards = backwards = int(settings["n_steps"])
    elif method == "rise":
        forwards, backwards = int(settings["n_masks"]), 0
    elif method == "rollout":
        forwards, backwards = 1, 0
    else:  # random, gaussian: the model is never called
        forwards, backwards = 0, 0
    return {"forward_passes": forwards, "backward_passes": backwards}


def attribute(method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
              **kwargs) -> tuple[torch.Tensor, dict]:
    """Attribution maps (B,H,W) float32 for `targets` (B,) and the per-image cost."""
    _check_method(method)
    unknown = set(kwargs) - set(DEFAULTS[method]) - _EXTRA_KWARGS.get(method, set())
    if unknown:
        raise TypeError(f"unknown options for {method!r}: {sorted(unknown)}")
    settings = {**DEFAULTS[method], **kwargs}
    if images.dim() != 4:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device).reshape(-1)
    if targets.numel() != images.shape[0]:
        raise ValueError(f"need one target per image: {targets.numel()} targets, {images.shape[0]} images")

    if requires_grad(method) and torch.is_inference_mode_enabled():
        raise RuntimeError(f"{method} needs gradients: call attribute() outside torch.inference_mode() "
                           f"(torch.no_grad() is fine)")
    # Check optional packages first, so a missing one is reported whatever the model.
    if method in ("ig", "saliency"):
        _import_captum()
    elif method in ("gradcam", "vit_cam"):
        _import_grad_cam()
    maps = _IMPLEMENTATIONS[method](model, images, targets, **settings)
    maps = _to_input_size(maps, images.shape[-2:]).to(device=images.device, dtype=torch.float32)
    cost_settings = {k: v for k, v in settings.items() if k in ("n_steps", "n_masks")}
    return maps, method_cost(method, **cost_settings)


# Options accepted by a method besides those with a default.
_EXTRA_KWARGS = {"gradcam": {"target_layer"}, "vit_cam": {"target_layer"}}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    net = getattr(model, "net", model)
    return f"{type(model).__name__}({spec or type(net).__name__})"


def _to_input_size(maps: torch.Tensor, size) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if maps.dim() == 4:
        maps = maps[:, 0]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear",
                             align_corners=False)[:, 0]
    return maps


def _output_fn(model: nn.Module, output: str):
    if output == "logits":
        return model.logits
    if output == "probs":
        return model
    raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")


def _fresh_input(images: torch.Tensor) -> torch.Tensor:
    # A leaf that requires grad: gradients reach activations even though every parameter is frozen.
    return images.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------- optional imports

def _import_captum():
    try:
        import captum.attr as captum_attr
    except ImportError as error:
        raise ImportError(f"the 'ig' and 'saliency' baselines need captum: {_INSTALL_HINT}") from error
    return captum_attr


def _import_grad_cam():
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as error:
        raise ImportError(
            f"the 'gradcam' and 'vit_cam' baselines need pytorch-grad-cam: {_INSTALL_HINT}") from error
    return pytorch_grad_cam.GradCAM, ClassifierOutputTarget


# ---------------------------------------------------------------- architecture checks

def _vit_blocks(net: nn.Module):
    """The transformer blocks of a timm-style ViT (token sequence with prefix tokens), or None."""
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "patch_embed") or not hasattr(net, "num_prefix_tokens"):
        return None
    blocks = list(blocks)
    if not blocks or not all(hasattr(block, "attn") for block in blocks):
        return None
    return blocks


# The probed default layer per model and input size, so the probe forward runs once, not per batch.
_DEFAULT_CAM_LAYER: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _cnn_target_layer(model: nn.Module, images: torch.Tensor) -> nn.Module:
    net = getattr(model, "net", model)
    if _vit_blocks(net) is not None:
        raise ValueError(f"gradcam needs a CNN but {_model_name(model)} is a ViT; use 'vit_cam'")
    # timm models list their stages; the last one is the usual Grad-CAM layer (block output,
    # after the residual sum) and is better than the last conv inside the block.
    feature_info = getattr(net, "feature_info", None)
    if isinstance(feature_info, (list, tuple)) and feature_info:
        name = feature_info[-1].get("module") if isinstance(feature_info[-1], dict) else None
        if name:
            try:
                return net.get_submodule(name)
            except AttributeError:
                pass
    # Otherwise the last conv, in the order the forward runs it, whose output is still a spatial
    # map. A head conv after global pooling (MobileNetV1's 1x1 classifier) would give every image
    # the same constant map, so it is measured out with one probe forward, not guessed by name.
    size = tuple(images.shape[-2:])
    chosen = _DEFAULT_CAM_LAYER.setdefault(model, {})
    if size in chosen:
        return chosen[size]
    spatial: list[nn.Module] = []

    def record(module, _inputs, output):
        if output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1:
            spatial.append(module)

    convs = [module for module in net.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"gradcam needs a convolutional layer; {_model_name(model)} has none")
    hooks = [conv.register_forward_hook(record) for conv in convs]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not spatial:
        raise ValueError(f"gradcam needs a convolutional layer with a spatial output; every conv of "
                         f"{_model_name(model)} outputs 1x1 at this input size; pass target_layer")
    chosen[size] = spatial[-1]
    return spatial[-1]


class _LogitsModule(nn.Module):
    """What the CAM library sees: [0,1] images -> logits (or probabilities) of the target."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x):
        return _output_fn(self.model, self.output)(x)


def _run_grad_cam(model, images, targets, target_layer, reshape_transform, output):
    GradCAM, ClassifierOutputTarget = _import_grad_cam()
    wrapped = _LogitsModule(model, output)
    class_targets = [ClassifierOutputTarget(int(c)) for c in targets.tolist()]
    # Recomputation under gradient checkpointing would fire the CAM hooks twice.
    checkpointing = getattr(model, "gradient_checkpointing", False)
    with torch.enable_grad():
        cam = GradCAM(model=wrapped, target_layers=[target_layer], reshape_transform=reshape_transform)
        cam.compute_input_gradient = True  # not a GradCAM constructor argument
        try:
            if checkpointing:
                model.gradient_checkpointing = False
            # compute_input_gradient (and the fresh input) make the hooked activation require
            # grad; with frozen parameters it otherwise gets no gradient at all.
            maps = cam(input_tensor=_fresh_input(images), targets=class_targets)
        finally:
            cam.activations_and_grads.release()
            if checkpointing:
                model.gradient_checkpointing = True
    # The library returns per-image min-max normalised, ReLU'd, input-sized numpy maps.
    return torch.from_numpy(maps)


def _gradcam(model, images, targets, output, target_layer=None):
    layer = target_layer if target_layer is not None else _cnn_target_layer(model, images)
    if isinstance(layer, str):
        layer = model.net.get_submodule(layer)
    return _run_grad_cam(model, images, targets, layer, None, output)


def _vit_cam(model, images, targets, output, target_layer=None):
    net = getattr(model, "net", model)
    blocks = _vit_blocks(net)
    if blocks is None:
        raise ValueError(f"vit_cam needs a timm-style ViT (blocks, patch_embed, num_prefix_tokens); "
                         f"{_model_name(model)} is not one; use 'gradcam'")
    if target_layer is None:
        # norm1 of the last block: its patch tokens feed the final attention, so the class token's
        # gradient reaches them (the last block's output patch tokens get none under cls pooling).
        target_layer = getattr(blocks[-1], "norm1", blocks[-1])
    elif isinstance(target_layer, str):
        target_layer = net.get_submodule(target_layer)
    prefix = int(net.num_prefix_tokens)
    height, width = images.shape[-2:]

    def tokens_to_grid(tokens):
        patches = tokens[:, prefix:]
        grid_h, grid_w = _token_grid(net, patches.shape[1], height, width)
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[2]).permute(0, 3, 1, 2)

    return _run_grad_cam(model, images, targets, target_layer, tokens_to_grid, output)


def _token_grid(net, n_patches, height, width):
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


# ---------------------------------------------------------------- captum methods

def _integrated_gradients(model, images, targets, n_steps, internal_batch_size, absolute, output):
    captum_attr = _import_captum()
    method = captum_attr.IntegratedGradients(_output_fn(model, output))
    with torch.enable_grad():
        attributions = method.attribute(_fresh_input(images), baselines=torch.zeros_like(images),
                                        target=targets, n_steps=int(n_steps),
                                        internal_batch_size=int(internal_batch_size))
    attributions = attributions.detach()
    return (attributions.abs() if absolute else attributions).sum(dim=1)


def _saliency(model, images, targets, absolute, output):
    captum_attr = _import_captum()
    method = captum_attr.Saliency(_output_fn(model, output))
    with torch.enable_grad():
        gradients = method.attribute(_fresh_input(images), target=targets, abs=False).detach()
    # Simonyan et al.: max of |gradient| over channels. The signed variant sums the channels.
    return gradients.abs().amax(dim=1) if absolute else gradients.sum(dim=1)


# ---------------------------------------------------------------- RISE

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


# ---------------------------------------------------------------- attention rollout

@torch.no_grad()
def _rollout(model, images, targets):
    net = getattr(model, "net", model)
    blocks = _vit_blocks(net)
    if blocks is None:
        raise ValueError(f"rollout needs a timm-style ViT with attention blocks; "
                         f"{_model_name(model)} is not one")
    attentions = _capture_attention(model, images, blocks)
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens, device=images.device)
    rollout = identity.expand(images.shape[0], tokens, tokens)
    for attention in attentions:
        attention = attention.mean(dim=1)  # heads
        # Abnar & Zuidema: residual connection as identity, then rows renormalised.
        attention = attention + identity
        attention = attention / attention.sum(dim=-1, keepdim=True)
        rollout = attention @ rollout
    prefix = int(net.num_prefix_tokens)
    if getattr(net, "cls_token", None) is not None and getattr(net, "global_pool", "token") == "token":
        relevance = rollout[:, 0, prefix:]
    else:
        # The head pools the patch tokens (avg; attention pooling approximated the same way),
        # so every patch token's row contributes to the output.
        relevance = rollout[:, prefix:, prefix:].mean(dim=1)
    grid_h, grid_w = _token_grid(net, relevance.shape[-1], *images.shape[-2:])
    return relevance.reshape(-1, grid_h, grid_w)


def _capture_attention(model, images, blocks):
    """Attention probabilities (B,heads,T,T) of every block, in order.

    timm's Attention uses fused scaled-dot-product attention, which never materialises the
    probabilities; the unfused path passes them through `attn_drop`, so it is switched on for
    this one forward and `attn_drop` is hooked (identity in eval mode).
    """
    captured = [None] * len(blocks)
    handles, fused_before = [], []
    try:
        for index, block in enumerate(blocks):
            attn = block.attn
            if not hasattr(attn, "attn_drop"):
                raise ValueError(f"rollout cannot read attention of {type(attn).__name__}")
            fused_before.append(getattr(attn, "fused_attn", None))
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = False

            def save(module, inputs, output, index=index):
                captured[index] = output.detach()

            handles.append(attn.attn_drop.register_forward_hook(save))
        model.logits(images)
    finally:
        for handle in handles:
            handle.remove()
        for block, fused in zip(blocks, fused_before):
            if fused is not None:
                block.attn.fused_attn = fused
    if any(attention is None for attention in captured):
        raise ValueError("rollout: some attention blocks did not expose their probabilities")
    return captured


# ---------------------------------------------------------------- controls

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


_IMPLEMENTATIONS = {
    "gradcam": _gradcam,
    "vit_cam": _vit_cam,
    "ig": _integrated_gradients,
    "saliency": _saliency,
    "rise": _rise,
    "rollout": _rollout,
    "random": _random,
    "gaussian": _gaussian,
}
