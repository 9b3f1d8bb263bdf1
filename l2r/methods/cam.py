"""Grad-CAM on a CNN (`gradcam`) and on a timm ViT (`vit_cam`), through pytorch-grad-cam.

`gradcam` uses the last stage of a CNN (timm `feature_info`, else the last Conv2d with a
spatial output; `target_layer=` overrides); `vit_cam` the last block's `norm1`, prefix tokens
dropped and patch tokens laid out as a grid. ReLU'd and min-max normalised by the library.
One forward and one backward per image.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from l2r.methods.common import fresh_input, import_grad_cam, model_name, output_fn, token_grid, vit_blocks
from l2r.methods.registry import Method, register

_DEFAULT_CAM_LAYER: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cnn_target_layer(model: nn.Module, images: torch.Tensor) -> nn.Module:
    net = getattr(model, "net", model)
    if vit_blocks(net) is not None:
        raise ValueError(f"gradcam needs a CNN but {model_name(model)} is a ViT; use 'vit_cam'")
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
        raise ValueError(f"gradcam needs a convolutional layer; {model_name(model)} has none")
    hooks = [conv.register_forward_hook(record) for conv in convs]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not spatial:
        raise ValueError(f"gradcam needs a convolutional layer with a spatial output; every conv of "
                         f"{model_name(model)} outputs 1x1 at this input size; pass target_layer")
    chosen[size] = spatial[-1]
    return spatial[-1]


class _LogitsModule(nn.Module):
    """What the CAM library sees: [0,1] images -> logits (or probabilities) of the target."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x):
        return output_fn(self.model, self.output)(x)


def _run_grad_cam(model, images, targets, target_layer, reshape_transform, output):
    GradCAM, ClassifierOutputTarget = import_grad_cam()
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
            maps = cam(input_tensor=fresh_input(images), targets=class_targets)
        finally:
            cam.activations_and_grads.release()
            if checkpointing:
                model.gradient_checkpointing = True
    # The library returns per-image min-max normalised, ReLU'd, input-sized numpy maps.
    return torch.from_numpy(maps)


def _gradcam(model, images, targets, output, target_layer=None):
    layer = target_layer if target_layer is not None else cnn_target_layer(model, images)
    if isinstance(layer, str):
        layer = model.net.get_submodule(layer)
    return _run_grad_cam(model, images, targets, layer, None, output)


def _vit_cam(model, images, targets, output, target_layer=None):
    net = getattr(model, "net", model)
    blocks = vit_blocks(net)
    if blocks is None:
        raise ValueError(f"vit_cam needs a timm-style ViT (blocks, patch_embed, num_prefix_tokens); "
                         f"{model_name(model)} is not one; use 'gradcam'")
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
        grid_h, grid_w = token_grid(net, patches.shape[1], height, width)
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[2]).permute(0, 3, 1, 2)

    return _run_grad_cam(model, images, targets, target_layer, tokens_to_grid, output)




def _cam_cost(settings):
    return 1, 1


register(Method("gradcam", _gradcam, defaults={"output": "logits"}, cost=_cam_cost, needs_grad=True,
                package="pytorch_grad_cam", extra_options=("target_layer",), summary="Grad-CAM (CNN)"))
register(Method("vit_cam", _vit_cam, defaults={"output": "logits"}, cost=_cam_cost, needs_grad=True,
                package="pytorch_grad_cam", extra_options=("target_layer",), summary="Grad-CAM (ViT)"))
