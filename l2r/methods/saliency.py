"""Saliency (Simonyan et al. 2014) through Captum: max |gradient| over channels
(`absolute=False`: the signed sum). One forward and one backward per image.
"""
from __future__ import annotations

import torch

from l2r.methods.common import fresh_input, import_captum, output_fn
from l2r.methods.registry import Method, register


def _saliency(model, images, targets, absolute, output):
    captum_attr = import_captum()
    method = captum_attr.Saliency(output_fn(model, output))
    with torch.enable_grad():
        gradients = method.attribute(fresh_input(images), target=targets, abs=False).detach()
    # Simonyan et al.: max of |gradient| over channels. The signed variant sums the channels.
    return gradients.abs().amax(dim=1) if absolute else gradients.sum(dim=1)



register(Method("saliency", _saliency, defaults={"absolute": True, "output": "logits"}, cost=lambda settings: (1, 1),
                needs_grad=True, package="captum", summary="input gradient"))
