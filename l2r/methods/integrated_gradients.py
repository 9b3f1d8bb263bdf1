"""Integrated gradients (Sundararajan et al. 2017) through Captum: black baseline, `n_steps`
points; |attribution| summed over channels (`absolute=False`: the signed sum).
`n_steps` forwards and backwards per image (no extra pass: the convergence delta is not asked for).
"""
from __future__ import annotations

import torch

from l2r.methods.common import fresh_input, import_captum, output_fn
from l2r.methods.registry import Method, register


def _integrated_gradients(model, images, targets, n_steps, internal_batch_size, absolute, output):
    captum_attr = import_captum()
    method = captum_attr.IntegratedGradients(output_fn(model, output))
    with torch.enable_grad():
        attributions = method.attribute(fresh_input(images), baselines=torch.zeros_like(images),
                                        target=targets, n_steps=int(n_steps),
                                        internal_batch_size=int(internal_batch_size))
    attributions = attributions.detach()
    return (attributions.abs() if absolute else attributions).sum(dim=1)




register(Method("ig", _integrated_gradients,
                defaults={"n_steps": 32, "internal_batch_size": 256, "absolute": True, "output": "logits"},
                cost=lambda settings: (int(settings["n_steps"]), int(settings["n_steps"])),
                needs_grad=True, package="captum", summary="integrated gradients"))
