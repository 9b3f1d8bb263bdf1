"""Attribution methods behind one call, for comparison with the learned explainer.

`attribute(method, model, images, targets, **options) -> (maps, cost)`:

- `model` is a target model (`l2r.classifier.TargetModel` or anything with the same interface):
  `forward(x)` gives softmax probabilities for images in [0,1], `logits(x)` gives logits and
  `.net` is the raw network (used only to find layers / attention blocks).
- `maps` is a float32 tensor (B,H,W) at the input resolution, on the images' device. Only the
  ranking of a map matters to the deletion/insertion metrics.
- `cost` is `{"forward_passes": n, "backward_passes": m}` *per image*, computed exactly from the
  method's settings. The caller measures seconds.

Each method is one module here (its function, defaults, cost, what it needs: `registry.Method`):
`l2r` (learned.py: the trained explainer, option `explainer`), `gradcam` and `vit_cam` (cam.py), `ig` (integrated_gradients.py), `saliency`, `rise`, `rollout`,
and the controls `random` and `gaussian` (controls.py).

Gradient methods use the logits by default (`output="probs"` uses the softmax instead). They
need gradients with respect to the input or to activations, never the frozen parameters, so
they run under `torch.enable_grad()` with a fresh input tensor that requires grad; the model's
parameters are left untouched. Captum and pytorch-grad-cam are optional
(`pip install "l2r[baselines]"`); they are imported only when a method needs them.
"""
from __future__ import annotations

import torch

from l2r.methods import learned, cam, controls, integrated_gradients, rise, rollout, saliency  # noqa: F401 (register)
from l2r.methods.common import import_captum, import_grad_cam, to_input_size
from l2r.methods.controls import gaussian_map
from l2r.methods.registry import Method, control_names, explainer_names, get_method, method_names, register
from l2r.methods.rise import rise_masks

__all__ = ["Method", "attribute", "control_names", "explainer_names", "gaussian_map", "get_method", "method_cost", "method_names",
           "register", "requires_grad", "rise_masks"]

_PACKAGE_CHECKS = {"captum": import_captum, "pytorch_grad_cam": import_grad_cam}


def requires_grad(method: str) -> bool:
    """Whether the method backpropagates through the target model."""
    return get_method(method).needs_grad


def method_cost(method: str, **options) -> dict:
    """Target passes per image for the given settings (the numbers `attribute` returns)."""
    record = get_method(method)
    forwards, backwards = record.cost({**record.defaults, **options})
    return {"forward_passes": int(forwards), "backward_passes": int(backwards)}


def attribute(method: str, model, images: torch.Tensor, targets, **options) -> tuple[torch.Tensor, dict]:
    """Attribution maps (B,H,W) float32 for `targets` (B,) and the per-image cost."""
    record = get_method(method)
    unknown = set(options) - set(record.defaults) - set(record.extra_options)
    if unknown:
        raise TypeError(f"unknown options for {method!r}: {sorted(unknown)}")
    settings = {**record.defaults, **options}
    if images.dim() != 4:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device).reshape(-1)
    if targets.numel() != images.shape[0]:
        raise ValueError(f"need one target per image: {targets.numel()} targets, {images.shape[0]} images")
    if record.needs_grad and torch.is_inference_mode_enabled():
        raise RuntimeError(f"{method} needs gradients: call attribute() outside torch.inference_mode() "
                           f"(torch.no_grad() is fine)")
    if record.package:  # a missing package is reported whatever the model
        _PACKAGE_CHECKS[record.package]()
    maps = record.compute(model, images, targets, **settings)
    maps = to_input_size(maps, images.shape[-2:]).to(device=images.device, dtype=torch.float32)
    return maps, method_cost(method, **settings)
