"""Model randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A map that explains the model must change when the model does. The target's layers with
parameters are re-initialised from the top (output) down, cascading over a few stages, and
each method's map on the randomised copy is compared with its map on the real model by the
Spearman rank correlation per image. A method whose correlation stays near 1 while the
model is destroyed explains the image, not the model (Quantus calls this check MPRT).

Stage s of S re-initialises the top ceil(s * L / S) of the L parameterised layers (registration
order, which is the forward order for the usual CNNs and ViTs), so the last stage is a fully
random model.

For an amortised explainer (`l2r`) the check reads differently: with the target's own layers
as backbone the explainer reads the randomised features and its map changes; with an
independent backbone (timm) it cannot see the target at all, so the correlation is 1 by
construction. What protects the user then is the target-mismatch guard: an explainer is
only used with the exact target (weights and preprocessing) it was trained for.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

DEFAULT_STAGES = 3


def parameter_layers(net: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in registration order."""
    return [name for name, module in net.named_modules()
            if name and any(True for _ in module.parameters(recurse=False))]


def cascade(net: nn.Module, stages: int = DEFAULT_STAGES) -> list[list[str]]:
    """The layers re-initialised at each stage, top first; each stage includes the previous one."""
    layers = parameter_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no layers with parameters to randomise")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    top_first = layers[::-1]
    return [top_first[:math.ceil(stage * len(layers) / stages)] for stage in range(1, stages + 1)]


def randomised_copy(model: nn.Module, layers: list[str], seed: int = 0) -> nn.Module:
    """A deep copy of `model` (a TargetModel or a bare network) with `layers` of its network
    re-initialised by their own `reset_parameters` (batch norm: running statistics too), seeded."""
    clone = copy.deepcopy(model)
    net = getattr(clone, "net", clone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            module = net.get_submodule(name)
            if not hasattr(module, "reset_parameters"):
                raise ValueError(f"layer {name!r} ({type(module).__name__}) has no reset_parameters to re-initialise it")
            device = next(module.parameters()).device
            module.to("cpu")  # the same seeded values on every device
            module.reset_parameters()
            module.to(device)
    if hasattr(clone, "weights_sha256"):  # the fingerprint of the real weights must not describe these
        from l2r.classifier import weights_sha256

        clone.weights_sha256 = weights_sha256(net)
    return clone.eval()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last dimension, ties sharing their average rank: float64."""
    values = values.double()
    ordered = values.sort(dim=-1).values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    upto = torch.searchsorted(ordered, values.contiguous(), right=True)
    return (below + upto + 1).double() / 2


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image of maps (B, H, W): float64 (B,); NaN for a constant map."""
    a = average_ranks(first.reshape(first.shape[0], -1).cpu())
    b = average_ranks(second.reshape(second.shape[0], -1).cpu())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = (a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)).sqrt()
    correlation = (a * b).sum(dim=1) / denominator
    return torch.where(denominator > 0, correlation, torch.full_like(correlation, float("nan")))
