"""Test-time refinement of a map (METHOD.md section 5): a few gradient steps on the map itself.

Design (the paper gives no details):
- the map is first made rank-uniform (1 - rank / HW, in [0, 1]): this keeps its
  ordering and puts it in the range of the Sinkhorn anchors, whatever the explainer's scale;
- a correction on a G x G grid (default G = 16: N = 256 keeps the Sinkhorn cheap)
  is optimised with Adam against the soft objective of training, with the
  evaluation's reference and target, a low temperature and no noise;
- the refined map is the rank-uniform map plus the upsampled correction, so the
  order inside a cell is kept where the correction is flat;
- with `verify` (default) the exact metric of both maps decides per image: the refined
  map is kept only where it raises insertion AUC - deletion AUC (the soft objective is
  an approximation, and a few steps can overshoot on single images).
Cost per image: steps x 2 x k target forward and backward passes, plus the exact
curves of both maps when verifying.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from l2r.metrics import Protocol, deletion_insertion
from l2r.objective import ObjectiveConfig, curve_weights, perturbed_target_probs, soft_masks
from l2r.perturbation import soft_references
from l2r.ranking import pixel_ranks


def rank_uniform(maps: torch.Tensor) -> torch.Tensor:
    """Same ordering, values (HW - 1 - rank) / HW in [0, 1): (B, H, W)."""
    b, h, w = maps.shape[0], maps.shape[-2], maps.shape[-1]
    ranks = pixel_ranks(maps.reshape(b, h, w))
    return ((h * w - 1 - ranks).float() / (h * w)).view(b, h, w)


def refine(
    model,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 10,
    lr: float = 0.1,
    tau: float = 0.1,
    grid: int = 16,
    k: int = 16,
    sinkhorn_iters: int = 30,
    verify: bool = True,
    protocol: Protocol = Protocol(),
) -> tuple[torch.Tensor, dict]:
    """Refined maps (B, H, W) and the cost per image (target passes, `refine_cost`).

    The soft objective uses the protocol's reference; the verification scores with the protocol."""
    b, _, h, w = images.shape
    base = rank_uniform(maps)
    grid = min(grid, h, w)
    cfg = ObjectiveConfig(k_train=k, sinkhorn_iters=sinkhorn_iters, reference=protocol.reference, smooth_sigma=0.0)
    base_cells = F.adaptive_avg_pool2d(base[:, None], grid).flatten(1).detach()
    delta = torch.zeros_like(base_cells, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    weights = torch.cat([curve_weights(k, images.device), -curve_weights(k, images.device)])
    with torch.enable_grad():
        for _ in range(steps):
            masks = soft_masks(base_cells + delta, grid, (h, w), tau, cfg, noise=False)
            refs = soft_references(images, masks, protocol.reference, torch.Generator().manual_seed(0))
            y = perturbed_target_probs(model, images, refs, masks, targets)
            loss = (y * weights).sum() / b
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    correction = F.interpolate(delta.detach().view(b, 1, grid, grid), size=(h, w), mode="nearest")
    refined = base + correction[:, 0]
    if verify:
        before = deletion_insertion(model, images, base, targets, protocol)
        after = deletion_insertion(model, images, refined, targets, protocol, clean_probs=before["clean_probs"])
        better = (after["insertion_auc"] - after["deletion_auc"]) > (before["insertion_auc"] - before["deletion_auc"])
        refined = torch.where(better.view(-1, 1, 1), refined, base)
    return refined, refine_cost(steps, k, verify, protocol)


def refine_cost(steps: int, k: int = 16, verify: bool = True, protocol: Protocol = Protocol()) -> dict:
    """Target passes per image of `refine` with these settings."""
    passes = steps * 2 * k
    # Verifying: the clean image once, then each map's interior steps and the reference.
    verification = 1 + 2 * (2 * (protocol.steps - 2) + 1) if verify else 0
    return {"forward_passes": passes + verification, "backward_passes": passes}
